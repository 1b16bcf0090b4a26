"""Low-bit weights in :class:`~sparsekit.nn.QLinear`: ``"int4"`` (W4A16), ``"w4a8"``, ``"mixed"``, ``"w8a8"``."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from torch import nn

from .base import Scheme, SchemeConfig, dtype_name, parse_dtype, torch_dtype

__all__ = ["Int4Params", "W4A8Params", "MixedParams", "W8A8Params", "Int4Scheme", "W4A8Scheme", "MixedScheme",
           "W8A8Scheme", "quantize_weight"]

QUANT_METHODS = ("rtn", "gptq", "awq")


def quantize_weight(module: nn.Module, stats: Optional[dict], cfg: SchemeConfig, group_size: int, bits: int = 4):
    """Quantize ``module.weight`` (a scratch copy) with ``cfg.method`` and overwrite it with the
    dequantized weight (AWQ: ``Q(W s) / s``); returns the :class:`~sparsekit.quant.QuantResult`.

    The arithmetic is :func:`sparsekit.quant.quantize_model_weights`', step for step.
    """
    from ..quant import awq_search, gptq_quantize, rtn_quantize

    w = module.weight.detach()
    opts = cfg.method_options
    if cfg.method == "rtn":
        res = rtn_quantize(w, group_size, cfg.symmetric, bits)
        w_new = res.dequantize()
    else:
        n = stats["n"]
        d = float(max(n, 1))
        st = {"H": stats["xtx"].mul_(2.0 / d), "n": n}
        if "sumabs" in stats:
            st["mean_abs"] = stats["sumabs"].div_(d)
        if cfg.method == "gptq":
            res = gptq_quantize(w, st["H"], group_size, cfg.symmetric, bits, damp=opts.get("damp", 0.01),
                                block_size=opts.get("block_size", 128),
                                act_order=getattr(cfg, "act_order", opts.get("act_order", False)),
                                static_groups=getattr(cfg, "static_groups", bool(opts.get("act_order", False))))
            w_new = res.dequantize()
        else:
            _, res = awq_search(w, st, group_size, cfg.symmetric, bits, grid=opts.get("grid", 20))
            w_new = res.effective_weight()
    with torch.no_grad():
        module.weight.copy_(w_new.to(module.weight.device, module.weight.dtype))
    return res


def _check_group_size(value, allow_none: bool = True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or value not in (32, 64, 128, -1):
        raise ValueError(f"group_size must be {'None (largest fitting), ' if allow_none else ''}32, 64, 128 or -1 "
                         f"(one group per row), got {value!r}")
    return int(value)


@dataclass
class Int4Params(SchemeConfig):
    """``"int4"`` (W4A16): group-wise int4 weights, 16-bit activations.

    group_size: 32, 64, 128 or -1 (one group per row); None: the largest of
    128/64/32 that divides every converted layer's in_features (else -1).
    symmetric: zero point 8 (no stored zeros).  dtype: compute dtype of the
    new layers, ``"float16"`` / ``"bfloat16"`` (None: the layer's when half
    precision, else float16).

    act_order (``method="gptq"`` only, default False): quantize the input
    features by descending ``diag(H)``.  static_groups (default False, as the
    original GPTQ): with False, groups are ``group_size`` consecutive features
    *in that order* (dynamic groups, what ``desc_act=True`` GPTQ checkpoints
    carry as ``g_idx``); the layer then stores its columns permuted and
    gathers its input once per call (``QLinear.in_perm``).  True: groups of
    consecutive original features, parameters computed up front, no
    permutation at run time.  Config version 2 added these two fields; a
    version-1 config's ``method_options={"act_order": True}`` (which meant
    static groups) still parses, as ``act_order=True, static_groups=True``,
    and so does that option given to a new config.
    """

    group_size: Optional[int] = 128
    symmetric: bool = False
    dtype: Optional[str] = None
    act_order: bool = False
    static_groups: bool = False

    SCHEME: ClassVar[str] = "int4"
    VERSION: ClassVar[int] = 2
    METHODS: ClassVar[tuple] = QUANT_METHODS
    DEFAULT_METHOD: ClassVar[str] = "rtn"
    CALIBRATED_METHOD: ClassVar[str] = "gptq"

    def __post_init__(self):
        super().__post_init__()
        self.group_size = _check_group_size(self.group_size)
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {self.symmetric!r}")
        self.dtype = parse_dtype(self.dtype)
        for name in ("act_order", "static_groups"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if "act_order" in self.method_options:
            # the version-1 spelling: method_options={"act_order": True} meant act-order with static groups
            if self.act_order or self.static_groups:
                raise ValueError("give act_order / static_groups as config fields, not also as "
                                 "method_options['act_order'] (the older spelling, meaning static groups)")
            legacy = self.method_options.pop("act_order")
            self.act_order = self.static_groups = bool(legacy)
        if (self.act_order or self.static_groups) and self.method != "gptq":
            raise ValueError(f"act_order / static_groups apply to method='gptq', got method={self.method!r}")

    @classmethod
    def upgrade(cls, params: dict, version: int) -> dict:
        """Version 1 had no ``act_order`` / ``static_groups`` fields; its ``method_options["act_order"]``
        (static groups) is read by ``__post_init__``."""
        return params


@dataclass
class W4A8Params(Int4Params):
    """``"w4a8"``: int4 weights, activations quantized per token at run time to ``act_bits`` (8; 4 is a
    quality baseline that runs the same kernel)."""

    act_bits: int = 8

    SCHEME: ClassVar[str] = "w4a8"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.act_bits, bool) or self.act_bits not in (8, 4):
            raise ValueError(f"act_bits must be 8 or 4 for scheme 'w4a8', got {self.act_bits!r}")


def _check_frac8(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 1:
        raise ValueError(f"frac8 must be a number in [0, 1], got {value!r}")
    return float(value)


@dataclass
class MixedParams(Int4Params):
    """``"mixed"``: int4 weights; per token the top ``frac8`` of tokens (by activation norm) at 8 bits, the
    rest at 4 (token-adaptive activations)."""

    frac8: float = 0.25

    SCHEME: ClassVar[str] = "mixed"

    def __post_init__(self):
        super().__post_init__()
        self.frac8 = _check_frac8(self.frac8)


@dataclass
class W8A8Params(SchemeConfig):
    """``"w8a8"``: per-output-channel symmetric int8 weights; activations per token at ``act_bits``
    (8, 4 or ``"mixed"`` with ``frac8``).  dtype: the compute dtype (None: the layer's when half
    precision, else float16)."""

    dtype: Optional[str] = None
    act_bits: Union[int, str] = 8
    frac8: float = 0.25

    SCHEME: ClassVar[str] = "w8a8"
    METHODS: ClassVar[tuple] = ("rtn",)
    DEFAULT_METHOD: ClassVar[str] = "rtn"
    CALIBRATED_METHOD: ClassVar[str] = "rtn"

    def __post_init__(self):
        super().__post_init__()
        self.dtype = parse_dtype(self.dtype)
        if isinstance(self.act_bits, bool) or self.act_bits not in (8, 4, "mixed"):
            raise ValueError(f"act_bits must be 8, 4 or 'mixed' for scheme 'w8a8', got {self.act_bits!r}")
        self.frac8 = _check_frac8(self.frac8)


class _Info:
    """A layer's weight dtype, where only the summary of a layer is at hand."""

    def __init__(self, info: dict):
        self.weight = torch.empty(0, dtype=info["dtype"], device="meta")


def _compute_dtype(cfg_dtype: Optional[str], module: nn.Module) -> torch.dtype:
    if cfg_dtype is not None:
        return torch_dtype(cfg_dtype)
    w = module.weight
    return w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float16


class _QLinearScheme(Scheme):
    quantized = True
    bits = 4

    @property
    def module_cls(self):
        from ..nn import QLinear

        return QLinear

    def _act(self, cfg) -> tuple:
        return None, 0.25

    def _owns_act(self, act_bits) -> bool:
        raise NotImplementedError

    def owns(self, module):
        from ..nn import QLinear

        return type(module) is QLinear and module.bits == self.bits and self._owns_act(module.act_bits)

    def module_params(self, module):
        p = {"in_features": module.in_features, "out_features": module.out_features,
             "bias": module.bias is not None, "bits": module.bits, "group_size": module.group_size,
             "symmetric": module.symmetric, "act_bits": module.act_bits, "frac8": module.frac8,
             "dtype": dtype_name(module.dtype), "input_scale": module.input_scale is not None}
        if self.bits == 4:
            p["in_perm"] = module.in_perm is not None
        return p

    def rebuild(self, description, device=None, backend=None):
        from ..nn import QLinear

        p = self.check_description(description)
        if p.get("bits") != self.bits:
            raise ValueError(f"scheme {self.name!r} rebuilds bits={self.bits} layers, got bits={p.get('bits')!r}")
        dtype = torch_dtype(p["dtype"])
        mod = QLinear(p["in_features"], p["out_features"], bias=p["bias"], bits=self.bits,
                      group_size=p.get("group_size", 128), symmetric=p.get("symmetric", False),
                      act_bits=p.get("act_bits"), frac8=p.get("frac8", 0.25), dtype=dtype, device=device,
                      backend=backend)
        if p.get("input_scale"):
            mod.input_scale = torch.ones(p["in_features"], dtype=dtype, device=device)
        if p.get("in_perm"):
            if self.bits != 4:
                raise ValueError(f"scheme {self.name!r}: in_perm (an act-order input permutation) applies to "
                                 "bits=4 layers only")
            mod.in_perm = torch.arange(p["in_features"], dtype=torch.int64, device=device)
        return mod

    def report_details(self, cfg, layers):
        out = {"group_size": cfg.group_size, "symmetric": cfg.symmetric}
        if getattr(cfg, "act_order", False):
            out["act_order"] = "static groups" if cfg.static_groups else "dynamic groups (input permutation)"
        dts = sorted({dtype_name(_compute_dtype(cfg.dtype, _Info(v))) for v in layers.values()})
        out["dtype"] = dts[0] if len(dts) == 1 else dts
        return out


class Int4Scheme(_QLinearScheme):
    # description format 2: params gained "in_perm" (act-order layers hold a QLinear.in_perm buffer);
    # version-1 descriptions (no in_perm) still rebuild
    format_version = 2
    name = "int4"
    config_cls = Int4Params
    title = "int4 weights, 16-bit activations (W4A16)"
    stores = ("8 int4 codes per int32 + per-group scales (and zero points unless symmetric) in float16/bfloat16")
    kernels = ("int4_linear",)
    kernel_sources = ("kernels/int4.py",)

    def _owns_act(self, act_bits):
        return act_bits is None

    def check_all(self, cfg, modules):
        if cfg.group_size is None:
            ks = [m.in_features for m in modules]
            g = next((g for g in (128, 64, 32) if all(k % g == 0 for k in ks)), -1)
            cfg = dataclasses.replace(cfg, group_size=g)
        return cfg

    def check(self, module, cfg):
        super().check(module, cfg)
        from ..quant.rtn import check_quant_args

        k = module.in_features
        if k % 8:
            raise ValueError(f"in_features K={k} is not a multiple of 8 (int4 packs 8 codes per int32 word)")
        check_quant_args(k, cfg.group_size, 4)

    def calibrate(self, module, stats, cfg):
        return quantize_weight(module, stats, cfg, cfg.group_size, 4)

    def build(self, module, result, cfg):
        from ..nn import QLinear

        act_bits, frac8 = self._act(cfg)
        return QLinear.from_quant_result(module, result, dtype=_compute_dtype(cfg.dtype, module),
                                         backend=cfg.backend, act_bits=act_bits, frac8=frac8)

    def example_description(self, cfg, linear):
        k = linear.in_features
        gs = self.check_all(cfg, [linear]).group_size
        act_bits, frac8 = self._act(cfg)
        return {"scheme": self.name, "format_version": self.format_version, "module": "QLinear",
                "params": {"in_features": k, "out_features": linear.out_features, "bias": linear.bias is not None,
                           "bits": 4, "group_size": k if gs == -1 else gs, "symmetric": cfg.symmetric,
                           "act_bits": act_bits, "frac8": frac8,
                           "dtype": dtype_name(_compute_dtype(cfg.dtype, linear)), "input_scale": False,
                           "in_perm": bool(cfg.act_order and not cfg.static_groups and cfg.method == "gptq"
                                           and gs not in (-1, k))}}

    def eval_forward(self, module):
        # QLinear computes in float16/bfloat16 only: evaluate the float model on the dequantized weight
        def forward(x):
            w = module.weight.to(x.dtype)
            b = module.bias.to(x.dtype) if module.bias is not None else None
            return nn.functional.linear(x, w, b)
        return forward


class W4A8Scheme(Int4Scheme):
    name = "w4a8"
    config_cls = W4A8Params
    title = "int4 weights, int8 activations per token (W4A8)"
    stores = Int4Scheme.stores + "; activations quantized per token at run time"
    kernels = ("w4a8_linear", "per_token_quant")
    kernel_sources = ("kernels/int8.py",)

    def _act(self, cfg):
        return cfg.act_bits, 0.25

    def _owns_act(self, act_bits):
        return act_bits in (8, 4)

    def eval_forward(self, module):
        def forward(x):
            return type(module).forward(module, x.to(module.dtype)).to(x.dtype)
        return forward


class MixedScheme(W4A8Scheme):
    name = "mixed"
    config_cls = MixedParams
    title = "int4 weights, token-adaptive 4/8-bit activations"
    stores = Int4Scheme.stores + "; the top frac8 of tokens quantized to 8 bits at run time, the rest to 4"

    def _act(self, cfg):
        return "mixed", cfg.frac8

    def _owns_act(self, act_bits):
        return act_bits == "mixed"


class W8A8Scheme(_QLinearScheme):
    name = "w8a8"
    config_cls = W8A8Params
    title = "int8 weights per output channel, int8 activations per token (W8A8)"
    stores = "int8 codes (N, K) + one float32 scale per output channel; activations quantized per token at run time"
    kernels = ("int8_linear", "per_token_quant")
    kernel_sources = ("kernels/int8.py",)
    bits = 8

    def _owns_act(self, act_bits):
        return act_bits in (8, 4, "mixed")

    def calibrate(self, module, stats, cfg):
        from ..formats.int8 import Int8Weight

        q = Int8Weight.from_float(module.weight.detach().float())
        with torch.no_grad():
            module.weight.copy_(q.dequantize(torch.float32).to(module.weight.device, module.weight.dtype))
        return q

    def build(self, module, result, cfg):
        from ..nn import QLinear

        dtype = _compute_dtype(cfg.dtype, module)
        bias = None if module.bias is None else module.bias.detach().to(dtype)
        return QLinear.from_weight(result, bias, backend=cfg.backend, act_bits=cfg.act_bits, frac8=cfg.frac8,
                                   dtype=dtype)

    def example_description(self, cfg, linear):
        return {"scheme": self.name, "format_version": self.format_version, "module": "QLinear",
                "params": {"in_features": linear.in_features, "out_features": linear.out_features,
                           "bias": linear.bias is not None, "bits": 8, "group_size": linear.in_features,
                           "symmetric": True, "act_bits": cfg.act_bits, "frac8": cfg.frac8,
                           "dtype": dtype_name(_compute_dtype(cfg.dtype, linear)), "input_scale": False}}

    def eval_forward(self, module):
        def forward(x):
            return type(module).forward(module, x.to(module.dtype)).to(x.dtype)
        return forward

    def report_details(self, cfg, layers):
        dts = sorted({dtype_name(_compute_dtype(cfg.dtype, _Info(v))) for v in layers.values()})
        return {"act_bits": cfg.act_bits, "dtype": dts[0] if len(dts) == 1 else dts}
