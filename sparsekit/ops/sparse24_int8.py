"""int8 2:4 linear (W8A8 with a 2:4 weight): ``y = dequant(quant(x) @ Wq^T) + bias``.

The GPUSQ-ViT deployment path: the weight is a :class:`~sparsekit.formats.Sparse24Int8Weight`
(int8 values on the 2:4 pattern, one float32 scale per output channel), the
activations are quantized per token at run time (symmetric, 8-bit,
:func:`sparsekit.ops.act_quant.per_token_quant_reference`), the product is
accumulated exactly in int32 and the epilogue applies both scales::

    y[m, n] = (sum_k xq[m, k] * Wq[n, k]) * x_scale[m] * w_scale[n] + bias[n]

One ``torch.library`` custom op, ``sparsekit::sparse24_int8_linear`` (with a
fake implementation, so it traces under ``torch.compile``; inference only,
not differentiable).  Backends:

``cuda``       csrc ``mma.sp`` m16n8k64 s8 GEMM with s32 accumulate and the scales in its epilogue
``triton``     the Triton kernel (``kernels/sparse24.py``: compressed weight reads, the tile
               expanded in registers, int8 dot with int32 accumulate; ``interpret``: the same on CPU)
``dense``      the same math on a cached float32 copy of the int8 weight (exact while
               partial sums stay below 2**24, otherwise within fp32 rounding)
``reference``  the same math in float64 on the fake-quantized operands: exactly the int32 result
"""
from __future__ import annotations

from typing import Optional

import torch

from ..formats.sparse24 import Sparse24Int8Weight, Sparse24Weight, TensorCache, padded_k
from ._checks import check_bias, check_x
from . import dispatch
from .act_quant import per_token_quant_reference

__all__ = ["sparse24_int8_linear", "sparse24_int8_linear_packed", "OP"]

OP = "sparse24_int8_linear"


def _cuda_accepts(m, n, k, dtype) -> bool:
    from . import _cuda

    return _cuda.has_mma_sp()


dispatch.register(OP, ("cuda", "triton", "interpret", "dense", "reference"), accepts={"cuda": _cuda_accepts})

_DENSE = TensorCache()


def _int_dense(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    n = values.shape[0]
    dense = torch.zeros(n, padded_k(k), dtype=torch.int8, device=values.device)
    dense.scatter_(1, Sparse24Weight.columns_from_meta(meta), values)
    return dense[:, :k]


def _dense_f32(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    return _DENSE.get(values, (values._version, meta._version, id(meta), k),
                      lambda: _int_dense(values, meta, k).float().contiguous())


@torch.library.custom_op("sparsekit::sparse24_int8_linear", mutates_args=())
def _sparse24_int8_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, w_scale: torch.Tensor,
                          in_features: int, bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    n = values.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x.new_zeros((*lead, n))
    xq, xs = per_token_quant_reference(x2, 8)          # (M, K) int8, (M, 1) float32
    if backend == "cuda":
        from . import _cuda

        y = _cuda.sparse24_mma_sp_int8(xq, xs.reshape(-1), values, meta, w_scale, in_features, bias, x.dtype)
        return y.reshape(*lead, n)
    if backend in ("triton", "interpret"):
        from .. import kernels
        from .. import testing as _testing

        kmod = kernels.load("sparse24", interpret=(backend == "interpret"))
        out = _testing.alloc_output((m, n), x.dtype, x.device)
        kmod.sparse24_int8_linear(xq, xs.reshape(-1).contiguous(), values, meta, w_scale, in_features, bias, out)
        return out.reshape(*lead, n)
    if backend == "dense":
        acc = xq.float() @ _dense_f32(values, meta, in_features).t()
        y = acc * xs * w_scale.float()[None, :]
    else:  # reference: exact integer products and sums in float64
        acc = xq.double() @ _int_dense(values, meta, in_features).double().t()
        y = acc * xs.double() * w_scale.double()[None, :]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*lead, n)


@_sparse24_int8_linear.register_fake
def _(x, values, meta, w_scale, in_features, bias, backend):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _check(x, values, meta, w_scale, in_features, bias):
    check_x(x, in_features)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"sparse24_int8_linear takes float16, bfloat16 or float32 activations, got {x.dtype}")
    if values.dtype != torch.int8:
        raise TypeError(f"values must be int8, got {values.dtype}")
    if meta.dtype != torch.uint8:
        raise TypeError(f"meta must be uint8, got {meta.dtype}")
    if w_scale.dtype != torch.float32 or w_scale.shape != (values.shape[0],):
        raise ValueError(f"w_scale must be float32 of shape ({values.shape[0]},)")
    for name, t in (("values", values), ("meta", meta), ("w_scale", w_scale)):
        if t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}")
    check_bias(bias, values.shape[0], x)


def sparse24_int8_linear_packed(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, w_scale: torch.Tensor,
                                in_features: int, bias: Optional[torch.Tensor] = None, *,
                                backend: Optional[str] = None) -> torch.Tensor:
    """:func:`sparse24_int8_linear` on the raw tensors (what modules hold)."""
    _check(x, values, meta, w_scale, in_features, bias)
    m = x.numel() // in_features if in_features else x.numel()
    chosen = dispatch.resolve(OP, x.device, backend, m, n=values.shape[0], k=in_features, dtype="int8")
    if chosen == "cuda":
        from . import _cuda

        if not _cuda.has_mma_sp():
            raise ValueError("the 'cuda' int8 2:4 backend needs the mma.sp GEMM in sparsekit._C (rebuild csrc/)")
    return _sparse24_int8_linear(x, values, meta, w_scale, in_features, bias, chosen)


def sparse24_int8_linear(x: torch.Tensor, weight: Sparse24Int8Weight, bias: Optional[torch.Tensor] = None, *,
                         backend: Optional[str] = None) -> torch.Tensor:
    """``y = (q(x) @ Wq^T) * x_scale * w_scale (+ bias)`` for an int8 2:4 weight.

    ``x`` is ``(..., K)`` float16/bfloat16/float32 (quantized per token to
    int8 inside the op); the result is ``(..., N)`` in ``x``'s dtype.
    ``backend``: ``cuda``, ``triton``, ``interpret``, ``dense`` or ``reference``
    (default: the dispatch table, ``reference`` on CPU).
    """
    if not isinstance(weight, Sparse24Int8Weight):
        raise TypeError(f"weight must be a Sparse24Int8Weight, got {type(weight).__name__} "
                        "(make one with Sparse24Int8Weight.from_dense or .from_sparse24)")
    return sparse24_int8_linear_packed(x, weight.values, weight.meta, weight.scale, weight.in_features, bias,
                                       backend=backend)
