"""``SparseQLinear``: a drop-in ``nn.Linear`` whose weight is 2:4 sparse with int4 kept values."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..formats._validate import sparse24_columns, validate_sparse24_int4
from ..formats.int4 import SCALE_DTYPES, resolve_group_size
from ..formats.sparse24_int4 import Sparse24Int4Weight, compressed_group_size, k_padded16
from ..ops._cpu_ext import NO_ROW_LIMIT, pad_columns, sp24_kernel
from ..ops._dense import cpu_weight, dense_linear, module_fast_path, module_plan
from ..ops.sparse24_int4 import dense_sparse24_int4_weight, dequantize_sparse24_int4, sparse24_int4_linear_packed
from . import _state

__all__ = ["SparseQLinear"]


class SparseQLinear(nn.Module):
    """``nn.Linear`` with a 2:4 + int4 weight (:class:`~sparsekit.formats.Sparse24Int4Weight`).

    Buffers: ``qweight`` ``(out, KC/8)`` int32, ``scales`` and (unless
    symmetric) ``zeros`` ``(out, KC/group_size)`` in the compute dtype,
    ``meta_codes`` ``(out, KC/4)`` uint8 (the 2:4 metadata; once named ``meta``,
    a key that still loads), with ``KC = round_up(in, 16) / 2``
    compressed columns and ``group_size`` counted in compressed columns.
    ``bias`` stays a parameter in the compute dtype.  Inputs: the compute
    dtype (float16/bfloat16) or float32; the output has the input's dtype.
    ``load_state_dict`` validates every incoming tensor first (shapes, 2:4
    codes, finite scales, zero points in [0, 15]) and either loads all of them
    or raises and leaves the module untouched.
    """

    # state_dict keys renamed since earlier releases (old -> new); old checkpoints load into the new names
    _RENAMED_KEYS = {"meta": "meta_codes"}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: Optional[int] = None,
                 symmetric: bool = False, dtype: torch.dtype = torch.float16, device=None,
                 backend: Optional[str] = None):
        super().__init__()
        if dtype not in SCALE_DTYPES:
            raise TypeError(f"SparseQLinear stores float16 or bfloat16 scales, got dtype={dtype}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        kc = k_padded16(self.in_features) // 2
        self.group_size = resolve_group_size(compressed_group_size(self.in_features, group_size), kc)
        self.symmetric = bool(symmetric)
        self.compute_dtype = dtype
        self.backend = backend
        g = kc // self.group_size
        self.register_buffer("qweight", torch.zeros(out_features, kc // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, g, dtype=dtype, device=device))
        if self.symmetric:
            self.register_buffer("zeros", None)
        else:
            self.register_buffer("zeros", torch.zeros(out_features, g, dtype=dtype, device=device))
        # all-zero groups: positions (0, 1) -> code 0b0100 per nibble
        self.register_buffer("meta_codes", torch.full((out_features, kc // 4), 0x44, dtype=torch.uint8,
                                                      device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @property
    def meta(self) -> torch.Tensor:
        """The ``meta_codes`` buffer under its former name (read-only)."""
        return self.meta_codes

    # ----------------------------------------------------------------- builders
    @classmethod
    def from_weight(cls, weight: Sparse24Int4Weight, bias: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> "SparseQLinear":
        if not isinstance(weight, Sparse24Int4Weight):
            raise TypeError(f"weight must be a Sparse24Int4Weight, got {type(weight).__name__}")
        n, k = weight.shape
        mod = cls(k, n, bias=bias is not None, group_size=weight.effective_group_size, symmetric=weight.symmetric,
                  dtype=weight.dtype, device=weight.device, backend=backend)
        with torch.no_grad():
            mod.qweight.copy_(weight.qweight)
            mod.scales.copy_(weight.scales)
            mod.meta_codes.copy_(weight.meta)
            if weight.zeros is not None:
                mod.zeros.copy_(weight.zeros)
            if bias is not None:
                mod.bias.copy_(bias.detach().to(weight.dtype))
        return mod

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Optional[torch.Tensor] = None, group_size: Optional[int] = None,
                   symmetric: bool = False, dtype: Optional[torch.dtype] = None,
                   backend: Optional[str] = None) -> "SparseQLinear":
        """Prune ``linear`` with the 2:4 ``mask`` (default: the magnitude mask) and quantize the kept
        values round-to-nearest.  ``group_size``: compressed columns per scale (default: the largest of
        128/64/32 dividing ``KC``, else one group per row).  ``dtype``: compute/scale dtype (default:
        the layer's if float16/bfloat16, else float16)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if mask is None:
            from ..prune import mask_2to4

            mask = mask_2to4(w)
        if dtype is None:
            dtype = w.dtype if w.dtype in SCALE_DTYPES else torch.float16
        fmt = Sparse24Int4Weight.from_dense(w.float(), mask=mask, group_size=group_size, symmetric=symmetric,
                                            dtype=dtype)
        return cls.from_weight(fmt, linear.bias, backend=backend)

    # ----------------------------------------------------------------- state
    def _validate_tensors(self, t: dict) -> None:
        validate_sparse24_int4(t["qweight"], t["scales"], t.get("zeros"), t["meta_codes"],
                               (self.out_features, self.in_features), self.group_size, self.symmetric,
                               owner="SparseQLinear", meta_name="meta_codes")

    def validate_state_dict(self, state_dict, prefix: str = "", strict: bool = True) -> None:
        """Raise what :meth:`load_state_dict` would raise for ``state_dict``, copying nothing."""
        state_dict = dict(state_dict)
        _state.rename_legacy_keys(self, state_dict, prefix)
        self._validate_tensors(_state.check_state_dict(self, state_dict, prefix, strict, False))

    def validate(self) -> None:
        """Re-check this module's tensors (e.g. after writing into them in place)."""
        self.weight_format()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        _state.load_atomic(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs, self._validate_tensors)

    # ----------------------------------------------------------------- views
    def weight_format(self) -> Sparse24Int4Weight:
        return Sparse24Int4Weight(self.qweight, self.scales, self.zeros, self.meta_codes,
                                  (self.out_features, self.in_features), self.group_size, self.symmetric)

    @property
    def weight(self) -> torch.Tensor:
        """The dense dequantized ``(out, in)`` weight in the compute dtype (a new tensor)."""
        return self.weight_format().to_dense()

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` holding the dequantized 2:4 weight (compute dtype)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.qweight.device, dtype=self.compute_dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._parameters["bias"]
        if module_fast_path(x, self.backend, self.in_features, (self.compute_dtype, torch.float32)):
            # CPU: the dense expansion kept per weight version, without the op's per-call machinery
            # (ops/_dense.py)
            bufs = self._buffers    # (dict reads: Module.__getattr__ costs more than a small layer's CPU forward share)
            q, s, z, m = bufs["qweight"], bufs["scales"], bufs["zeros"], bufs["meta_codes"]
            gs, k = self.group_size, self.in_features
            plan = module_plan(self, (q, s, z, m), lambda: cpu_weight(dequantize_sparse24_int4(q, s, z, m, gs, k)),
                               self.out_features, k, bias,
                               kernel=(lambda: _sp24_int4_kernel(q, s, z, m, gs, k), NO_ROW_LIMIT, 2))
            if plan is not None:
                return plan.linear(x, bias)
            return dense_linear(x, dense_sparse24_int4_weight(q, s, z, m, gs, k), bias)
        if bias is not None and x.dtype != bias.dtype:
            bias = bias.to(x.dtype)
        # the buffers were validated when built / loaded: no per-call content checks
        return sparse24_int4_linear_packed(x, self.qweight, self.scales, self.zeros, self.meta_codes,
                                           self.group_size, self.in_features, bias, backend=self.backend,
                                           validate=False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"pattern=2:4, bits=4, group_size={self.group_size} (compressed columns), "
                f"symmetric={self.symmetric}, dtype={self.compute_dtype}")


def _sp24_int4_kernel(q, s, z, m, gs: int, k: int):
    """The CPU 2:4 kernel (ops/_cpu_ext.sp24_kernel) over this layer's stored values, dequantized as the dense
    expansion dequantizes them (in the scale dtype); used from 2 rows up (one row: fbgemm's float16-weight GEMM
    over the expansion reads fewer bytes)."""
    dense = pad_columns(cpu_weight(dequantize_sparse24_int4(q, s, z, m, gs, k)), m.shape[1] * 8)
    return sp24_kernel(dense.gather(1, sparse24_columns(m)), m, k)
