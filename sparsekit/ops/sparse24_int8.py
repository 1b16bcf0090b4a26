"""int8 2:4 linear (W8A8 with a 2:4 weight): ``y = dequant(quant(x) @ Wq^T) + bias``.

The GPUSQ-ViT deployment path: the weight is a :class:`~sparsekit.formats.Sparse24Int8Weight`
(int8 values on the 2:4 pattern, one float32 scale per output channel), the
activations are quantized per token at run time (symmetric, 8-bit,
:func:`sparsekit.ops.act_quant.per_token_quant_reference`), the product is
accumulated exactly in int32 and the epilogue applies both scales::

    y[m, n] = (sum_k xq[m, k] * Wq[n, k]) * x_scale[m] * w_scale[n] + bias[n]

One ``torch.library`` custom op, ``sparsekit::sparse24_int8_linear`` (with a
fake implementation, so it traces under ``torch.compile``).  Autograd, as for
:func:`sparsekit.ops.int8.int8_linear`: the gradient of ``x`` is
straight-through (``dx = dy @ W_hat`` with the dequantized weight), ``bias``
gets ``dy`` summed, the int8 weight and its scales are not differentiable.
A token holding NaN/Inf gives a NaN output row (see
:mod:`sparsekit.ops.act_quant`).  Backends:

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

from ..formats._validate import sparse24_dense, validate_sparse24_int8
from ..formats.sparse24 import Sparse24Int8Weight
from ._checks import as_contiguous, check_bias, check_features, check_sparse24_shapes, check_x, validate_once
from . import dispatch
from ._dense import cached_weight
from .act_quant import per_token_quant_reference

__all__ = ["sparse24_int8_linear", "sparse24_int8_linear_packed", "OP"]

OP = "sparse24_int8_linear"


def _cuda_accepts(m, n, k, dtype) -> bool:
    from . import _cuda

    return _cuda.has_mma_sp()


dispatch.register(OP, ("cuda", "triton", "interpret", "dense", "reference"), accepts={"cuda": _cuda_accepts})



def _int_dense(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    return sparse24_dense(values, meta, k)


def sparse24_int8_codes_f32(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    """The layer's int8 codes as a dense float32 ``(N, K)`` matrix (pruned entries 0), uncached."""
    return _int_dense(values, meta, k).float().contiguous()


def _dense_f32(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    return cached_weight(("sp24i8", k), (values, meta), lambda: sparse24_int8_codes_f32(values, meta, k))


def _dense_math(xq, xs, values, meta, w_scale, in_features):
    acc = xq.float() @ _dense_f32(values, meta, in_features).t()
    # the scales multiply each other first: acc * x_scale alone can overflow fp32 for |x| ~ 1e37
    return acc * (xs * w_scale.float()[None, :])


@torch.library.custom_op("sparsekit::sparse24_int8_linear", mutates_args=())
def _sparse24_int8_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, w_scale: torch.Tensor,
                          in_features: int, bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    n = values.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    if m == 0 or n == 0 or in_features == 0:
        y = x.new_zeros((*lead, n))
        return y + bias if bias is not None and in_features == 0 else y
    values, meta, w_scale, bias = (as_contiguous(t) for t in (values, meta, w_scale, bias))
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
        y = _dense_math(xq, xs, values, meta, w_scale, in_features)
    else:  # reference: exact integer products and sums in float64
        acc = xq.double() @ _int_dense(values, meta, in_features).double().t()
        y = acc * xs.double() * w_scale.double()[None, :]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*lead, n)


@_sparse24_int8_linear.register_fake
def _(x, values, meta, w_scale, in_features, bias, backend):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


# ---------------------------------------------------------------------- autograd (straight-through in x)
def _setup_context(ctx, inputs, output):
    x, values, meta, w_scale, in_features, bias, backend = inputs
    ctx.save_for_backward(values, meta, w_scale)
    ctx.in_features = in_features
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    if ctx.needs_input_grad[3]:
        raise NotImplementedError("sparse24_int8_linear is an inference op: the weight scales are not "
                                  "differentiable (only x, straight-through, and bias are)")
    values, meta, w_scale = ctx.saved_tensors
    gx = gb = None
    if ctx.needs_input_grad[0]:
        w = _int_dense(values, meta, ctx.in_features).float() * w_scale[:, None]
        gx = (grad @ w.to(grad.dtype)).contiguous()
    if ctx.has_bias and ctx.needs_input_grad[5]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, None, None, None, None, gb, None


_sparse24_int8_linear.register_autograd(_backward, setup_context=_setup_context)


def _check(x, values, meta, w_scale, in_features, bias):
    check_features("in_features", in_features)
    for name, t in (("values", values), ("meta", meta), ("w_scale", w_scale)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_x(x, in_features)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"sparse24_int8_linear takes float16, bfloat16 or float32 activations, got {x.dtype}")
    if values.dtype != torch.int8:
        raise TypeError(f"values must be int8, got {values.dtype}")
    if meta.dtype != torch.uint8:
        raise TypeError(f"meta must be uint8, got {meta.dtype}")
    check_sparse24_shapes(values, meta, in_features)
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (values.shape[0],):
        raise ValueError(f"w_scale must be float32 of shape ({values.shape[0]},), got {w_scale.dtype} "
                         f"{tuple(w_scale.shape)}")
    for name, t in (("values", values), ("meta", meta), ("w_scale", w_scale)):
        if t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}")
    check_bias(bias, values.shape[0], x)


def sparse24_int8_linear_packed(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, w_scale: torch.Tensor,
                                in_features: int, bias: Optional[torch.Tensor] = None, *,
                                backend: Optional[str] = None, validate: bool = True) -> torch.Tensor:
    """:func:`sparse24_int8_linear` on the raw tensors (what modules hold).

    Shapes, dtypes and devices are always checked; ``validate=True`` also checks the contents
    (2:4 codes, int8 values in [-127, 127], finite scales) once per tensor version,
    ``validate=False`` trusts them (tensors of a validated :class:`Sparse24Int8Weight` or module).
    """
    _check(x, values, meta, w_scale, in_features, bias)
    if validate:
        shape = (values.shape[0], in_features)
        validate_once((meta, values, w_scale), ("sparse24_int8", in_features),
                      lambda: validate_sparse24_int8(values, meta, w_scale, shape,
                                                     owner="sparse24_int8_linear_packed"))
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
                                       backend=backend, validate=False)      # validated when built
