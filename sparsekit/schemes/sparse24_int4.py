"""``"2:4+int4"``: 2:4 sparsity with int4 kept values (:class:`~sparsekit.nn.SparseQLinear`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from .base import Scheme, dtype_name, parse_dtype, torch_dtype
from .sparse24 import Pruned24Config, prune_2to4

__all__ = ["Sparse24Int4Params", "Sparse24Int4Scheme"]


@dataclass
class Sparse24Int4Params(Pruned24Config):
    """``"2:4+int4"``: prune to 2:4 with ``method`` (SparseGPT compensates the kept weights), then
    round the kept values to int4, group-wise along the compressed row.

    group_size: kept values per scale (32, 64, 128 or -1; a group of g kept
    values covers 2g input features); None: per layer, the largest of
    128/64/32 dividing its kept values per row, else -1.  symmetric, dtype:
    as for ``"int4"``.  Calibration passes the pruned (not yet rounded)
    weights on to the later layers.
    """

    group_size: Optional[int] = None
    symmetric: bool = False
    dtype: Optional[str] = None

    SCHEME: ClassVar[str] = "2:4+int4"

    def __post_init__(self):
        super().__post_init__()
        if self.group_size is not None and (isinstance(self.group_size, bool)
                                            or self.group_size not in (32, 64, 128, -1)):
            raise ValueError(f"group_size must be None (largest fitting), 32, 64, 128 or -1 (one group per row), "
                             f"got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {self.symmetric!r}")
        self.dtype = parse_dtype(self.dtype)


def _dtype(cfg, w_dtype) -> torch.dtype:
    if cfg.dtype is not None:
        return torch_dtype(cfg.dtype)
    return w_dtype if w_dtype in (torch.float16, torch.bfloat16) else torch.float16


class Sparse24Int4Scheme(Scheme):
    name = "2:4+int4"
    config_cls = Sparse24Int4Params
    title = "2:4 sparse with int4 kept values"
    stores = ("8 int4 codes of kept values per int32 + per-group scales (and zero points unless symmetric) + "
              "2-bit indices")
    kernels = ("sparse24_int4_linear",)
    kernel_sources = ("kernels/sparse24_int4.py",)
    sparse = True
    quantized = True

    @property
    def module_cls(self):
        from ..nn import SparseQLinear

        return SparseQLinear

    def check(self, module, cfg):
        super().check(module, cfg)
        from ..formats.sparse24_int4 import compressed_group_size

        try:
            compressed_group_size(module.in_features, cfg.group_size)
        except ValueError:
            kc = compressed_group_size(module.in_features, -1)
            raise ValueError(f"group_size={cfg.group_size} (in kept values) does not divide the {kc} kept values "
                             f"per row of in_features={module.in_features}; choose a group size that divides "
                             f"{kc}, or -1") from None

    def calibrate(self, module, stats, cfg):
        return prune_2to4(module, stats, cfg)

    def build(self, module, result, cfg):
        from ..formats.sparse24_int4 import compressed_group_size
        from ..nn import SparseQLinear

        return SparseQLinear.from_dense(module, mask=result,
                                        group_size=compressed_group_size(module.in_features, cfg.group_size),
                                        symmetric=cfg.symmetric, dtype=_dtype(cfg, module.weight.dtype),
                                        backend=cfg.backend)

    def owns(self, module):
        from ..nn import SparseQLinear

        return type(module) is SparseQLinear

    def module_params(self, module):
        return {"in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None, "group_size": module.group_size, "symmetric": module.symmetric,
                "dtype": dtype_name(module.compute_dtype)}

    def rebuild(self, description, device=None, backend=None):
        from ..nn import SparseQLinear

        p = self.check_description(description)
        return SparseQLinear(p["in_features"], p["out_features"], bias=p["bias"], group_size=p.get("group_size"),
                             symmetric=p.get("symmetric", False), dtype=torch_dtype(p["dtype"]), device=device,
                             backend=backend)

    def example_description(self, cfg, linear):
        from ..formats.sparse24_int4 import compressed_group_size, k_padded16

        k = linear.in_features
        gs = compressed_group_size(k, cfg.group_size)
        kc = k_padded16(k) // 2
        return {"scheme": self.name, "format_version": self.format_version, "module": "SparseQLinear",
                "params": {"in_features": k, "out_features": linear.out_features, "bias": linear.bias is not None,
                           "group_size": kc if gs == -1 else gs, "symmetric": cfg.symmetric,
                           "dtype": dtype_name(_dtype(cfg, linear.weight.dtype))}}

    def report_details(self, cfg, layers):
        from ..formats.sparse24_int4 import compressed_group_size

        gsizes = {n: compressed_group_size(v["in_features"], cfg.group_size) for n, v in layers.items()}
        dts = sorted({dtype_name(_dtype(cfg, v["dtype"])) for v in layers.values()})
        return {"group_size": next(iter(set(gsizes.values()))) if len(set(gsizes.values())) == 1 else gsizes,
                "group_size_unit": "compressed columns (kept values)", "symmetric": cfg.symmetric,
                "dtype": dts[0] if len(dts) == 1 else dts}
