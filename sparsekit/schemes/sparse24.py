"""2:4 semi-structured sparsity: ``"2:4"`` (float values) and ``"2:4+int8"`` (int8 values, W8A8)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from .base import Scheme, SchemeConfig, dtype_name, torch_dtype

__all__ = ["Sparse24Params", "Sparse24Int8Params", "Sparse24Scheme", "Sparse24Int8Scheme", "prune_2to4"]

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")


def prune_2to4(module: nn.Module, stats: Optional[dict], cfg: SchemeConfig) -> torch.Tensor:
    """Prune ``module.weight`` (a scratch copy) to 2:4 in place with ``cfg.method``; returns the keep-mask.

    The arithmetic is :func:`sparsekit.prune.prune_model_`'s, step for step.
    """
    from ..prune import magnitude_mask, sparsegpt_prune, wanda_mask

    w = module.weight
    with torch.no_grad():
        if cfg.method == "magnitude":
            m = magnitude_mask(w, "2:4", 0.5)
            w.mul_(m.to(w.dtype))
        elif cfg.method == "wanda":
            m = wanda_mask(w, stats["sumsq"].sqrt(), "2:4", 0.5)
            w.mul_(m.to(w.dtype))
        else:  # sparsegpt
            h = stats["xtx"].mul_(2.0 / stats["n"])
            opts = cfg.method_options
            w_new, m = sparsegpt_prune(w, h, "2:4", 0.5, block_size=opts.get("block_size", 128),
                                       damp=opts.get("damp", 0.01))
            w.copy_(w_new)
    return m


@dataclass
class Pruned24Config(SchemeConfig):
    """What the configs of the schemes that prune to 2:4 share: the pruning methods (magnitude without
    data, SparseGPT with), and SparseGPT's ``block_size`` a multiple of 4."""

    METHODS: ClassVar[tuple] = PRUNE_METHODS
    DEFAULT_METHOD: ClassVar[str] = "magnitude"
    CALIBRATED_METHOD: ClassVar[str] = "sparsegpt"

    def __post_init__(self):
        super().__post_init__()
        bs = self.method_options.get("block_size")
        if self.method == "sparsegpt" and bs is not None and bs % 4:
            raise ValueError(f"sparsegpt block_size must be a multiple of 4 for 2:4, got {bs}")


@dataclass
class Sparse24Params(Pruned24Config):
    """``"2:4"``: keep 2 of every 4 weights along K; float values + 2-bit indices
    (:class:`~sparsekit.nn.SparseLinear`)."""

    SCHEME: ClassVar[str] = "2:4"


@dataclass
class Sparse24Int8Params(Sparse24Params):
    """``"2:4+int8"``: 2:4 with int8 kept values (per output channel) and per-token int8 activations."""

    SCHEME: ClassVar[str] = "2:4+int8"


class Sparse24Scheme(Scheme):
    name = "2:4"
    config_cls = Sparse24Params
    title = "2:4 semi-structured sparse"
    stores = "kept values (N, K/2) in the layer's dtype + 2-bit indices (N, K/8) uint8"
    kernels = ("sparse24_linear",)
    kernel_sources = ("kernels/sparse24.py", "csrc/sparse24/ mma.sp GEMM and GEMV")
    sparse = True
    act_bits: Optional[int] = None

    @property
    def module_cls(self):
        from ..nn import SparseLinear

        return SparseLinear

    def calibrate(self, module, stats, cfg):
        return prune_2to4(module, stats, cfg)

    def build(self, module, result, cfg):
        from ..nn import SparseLinear

        return SparseLinear.from_dense(module, pattern="2:4", mask=result, backend=cfg.backend,
                                       act_bits=self.act_bits)

    def owns(self, module):
        from ..nn import SparseLinear

        return type(module) is SparseLinear and module.act_bits == self.act_bits

    def module_params(self, module):
        if self.act_bits == 8:
            dtype = module.bias.dtype if module.bias is not None else None
        else:
            dtype = module.values.dtype
        return {"in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None, "pattern": module.pattern, "dtype": dtype_name(dtype)}

    def rebuild(self, description, device=None, backend=None):
        from ..nn import SparseLinear

        p = self.check_description(description)
        return SparseLinear(p["in_features"], p["out_features"], bias=p["bias"], pattern=p.get("pattern", "2:4"),
                            device=device, dtype=torch_dtype(p.get("dtype")), backend=backend,
                            act_bits=self.act_bits)

    def example_description(self, cfg, linear):
        return {"scheme": self.name, "format_version": self.format_version, "module": "SparseLinear",
                "params": {"in_features": linear.in_features, "out_features": linear.out_features,
                           "bias": linear.bias is not None, "pattern": "2:4",
                           "dtype": dtype_name(linear.weight.dtype)}}


class Sparse24Int8Scheme(Sparse24Scheme):
    name = "2:4+int8"
    config_cls = Sparse24Int8Params
    title = "2:4 sparse with int8 values, int8 activations (W8A8)"
    stores = ("kept values (N, K/2) int8 + 2-bit indices (N, K/8) uint8 + one float32 scale per output "
              "channel; activations quantized per token at run time")
    kernels = ("sparse24_int8_linear", "per_token_quant")
    kernel_sources = ("kernels/sparse24.py", "kernels/int8.py")
    sparse = True
    quantized = True
    act_bits = 8

    def eval_forward(self, module):
        # the module computes in its bias dtype; feed it that and hand back the caller's dtype
        def forward(x):
            want = module.bias.dtype if module.bias is not None else x.dtype
            return type(module).forward(module, x.to(want)).to(x.dtype)
        return forward
