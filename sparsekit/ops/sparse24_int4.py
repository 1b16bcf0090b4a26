"""2:4 + int4 linear: ``y = x @ W^T + bias`` with a :class:`~sparsekit.formats.Sparse24Int4Weight`.

One ``torch.library`` custom op, ``sparsekit::sparse24_int4_linear`` (fake
implementation included).  Backends: ``triton`` (CUDA), ``interpret`` (the
same kernel on CPU tensors) and ``reference`` (dequantize, expand, ``F.linear``).
An inference op: autograd gives the gradients of ``x`` (``grad @ W`` with the
dequantized weight) and ``bias``; the packed weight is not differentiable.

``x`` is float16/bfloat16 matching the weight's scale dtype, or float32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import testing as _testing
from ..formats._validate import sparse24_dense, validate_sparse24_int4
from ..formats.int4 import SCALE_DTYPES, dequantize_int4
from ..formats.sparse24_int4 import Sparse24Int4Weight, k_padded16
from ._checks import as_contiguous, check_bias, check_features, check_x, validate_once
from . import dispatch
from ._dense import cached_weight, cpu_weight, dense_linear

__all__ = ["sparse24_int4_linear", "sparse24_int4_linear_packed", "dequantize_sparse24_int4"]

OP = "sparse24_int4_linear"
dispatch.register(OP, ("triton", "interpret", "dense", "reference"))


def _kernels(backend: str):
    from .. import kernels  # sparsekit.kernels

    return kernels.load("sparse24_int4", interpret=(backend == "interpret"))


def dequantize_sparse24_int4(qweight, scales, zeros, meta, group_size: int, in_features: int) -> torch.Tensor:
    """Dense ``(N, in_features)`` weight in the scale dtype from the raw tensors."""
    n = qweight.shape[0]
    kc = qweight.shape[1] * 8
    values = dequantize_int4(qweight, scales, zeros, group_size, kc)
    return sparse24_dense(values, meta, in_features)


def dense_sparse24_int4_weight(qweight, scales, zeros, meta, group_size: int, in_features: int) -> torch.Tensor:
    """The ``dense`` backend's dequantized 2:4 weight (float32 on CPU), cached per tensor version."""
    return cached_weight(("sp24q", group_size, in_features), (qweight, scales, zeros, meta),
                         lambda: cpu_weight(dequantize_sparse24_int4(qweight, scales, zeros, meta, group_size,
                                                                     in_features)))


@torch.library.custom_op("sparsekit::sparse24_int4_linear", mutates_args=())
def _sp24q_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                  meta: torch.Tensor, group_size: int, in_features: int, bias: Optional[torch.Tensor],
                  backend: str) -> torch.Tensor:
    n = qweight.shape[0]
    lead = x.shape[:-1]
    if in_features == 0:       # no input features: y = bias (as F.linear)
        y = x.new_zeros((*lead, n))
        return y + bias if bias is not None else y
    if backend == "reference":
        w = dequantize_sparse24_int4(qweight, scales, zeros, meta, group_size, in_features)
        return F.linear(x, w.to(x.dtype), bias).contiguous()
    if backend == "dense":
        return dense_linear(x, dense_sparse24_int4_weight(qweight, scales, zeros, meta, group_size, in_features),
                            bias)
    x2 = x.reshape(-1, x.shape[-1])
    qweight, scales, zeros, meta, bias = (as_contiguous(t) for t in (qweight, scales, zeros, meta, bias))
    out = _testing.alloc_output((x2.shape[0], n), x.dtype, x.device)
    if x2.shape[0] > 0 and n > 0:
        _kernels(backend).sparse24_int4_linear(x2, qweight, scales, zeros, meta, group_size, in_features, bias, out)
    return out.reshape(*lead, n)


@_sp24q_linear.register_fake
def _(x, qweight, scales, zeros, meta, group_size, in_features, bias, backend):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, meta, group_size, in_features, bias, backend = inputs
    ctx.save_for_backward(qweight, scales, zeros, meta)
    ctx.group_size = group_size
    ctx.in_features = in_features
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise NotImplementedError("sparse24_int4_linear is an inference op: gradients of the int4 scales/zeros "
                                  "are not implemented (only x and bias are differentiable)")
    qweight, scales, zeros, meta = ctx.saved_tensors
    gx = gb = None
    if ctx.needs_input_grad[0]:
        w = dequantize_sparse24_int4(qweight, scales, zeros, meta, ctx.group_size, ctx.in_features)
        gx = (grad @ w.to(grad.dtype)).contiguous()
    if ctx.has_bias and ctx.needs_input_grad[7]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, None, None, None, None, None, None, gb, None


_sp24q_linear.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------- public API
def _check(x, qweight, scales, zeros, meta, group_size, in_features, bias):
    check_features("in_features", in_features)
    check_x(x, in_features)
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise TypeError("qweight must be a 2-D int32 tensor (8 packed int4 codes per word)")
    n = qweight.shape[0]
    kc = k_padded16(in_features) // 2
    if qweight.shape[1] != kc // 8:
        raise ValueError(f"qweight must have shape (N, {kc // 8}) for in_features={in_features}, "
                         f"got {tuple(qweight.shape)}")
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.uint8 or tuple(meta.shape) != (n, kc // 4):
        raise ValueError(f"meta must be a uint8 tensor of shape {(n, kc // 4)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or kc % group_size:
        raise ValueError(f"the compressed row ({kc} columns) is not a multiple of group_size={group_size}")
    g = kc // group_size
    if not isinstance(scales, torch.Tensor) or scales.dtype not in SCALE_DTYPES or tuple(scales.shape) != (n, g):
        raise ValueError(f"scales must be a float16/bfloat16 tensor of shape {(n, g)}")
    if x.dtype not in (scales.dtype, torch.float32):
        raise TypeError(f"x dtype {x.dtype} must be the weight's scale dtype {scales.dtype} or float32")
    if zeros is not None:
        if not isinstance(zeros, torch.Tensor) or tuple(zeros.shape) != (n, g) or zeros.dtype != scales.dtype:
            raise ValueError(f"zeros must be None or a {scales.dtype} tensor of shape {(n, g)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("meta", meta)):
        if t is not None and t.device != x.device:
            raise ValueError(f"x is on {x.device} but the weight's {name} is on {t.device}")
    check_bias(bias, n, x)


def sparse24_int4_linear_packed(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                                zeros: Optional[torch.Tensor], meta: torch.Tensor, group_size: int, in_features: int,
                                bias: Optional[torch.Tensor] = None, *, backend: Optional[str] = None,
                                validate: bool = True) -> torch.Tensor:
    """:func:`sparse24_int4_linear` on the raw tensors (what a SparseQLinear holds as buffers);
    ``group_size`` is the effective one in compressed columns.

    Shapes, dtypes and devices are always checked; ``validate=True`` also checks the contents
    (2:4 codes, finite scales, zero points in [0, 15]) once per tensor version, ``validate=False``
    trusts them (tensors of a validated :class:`Sparse24Int4Weight` or module).
    """
    _check(x, qweight, scales, zeros, meta, group_size, in_features, bias)
    if validate:
        shape = (qweight.shape[0], in_features)
        validate_once((meta, qweight, scales, zeros), ("sparse24_int4", shape, group_size),
                      lambda: validate_sparse24_int4(qweight, scales, zeros, meta, shape, group_size, zeros is None,
                                                     owner="sparse24_int4_linear_packed"))
    m = x.numel() // in_features if in_features else x.numel()
    chosen = dispatch.resolve(OP, x.device, backend, m)
    return _sp24q_linear(x, qweight, scales, zeros, meta, group_size, in_features, bias, chosen)


def sparse24_int4_linear(x: torch.Tensor, weight: Sparse24Int4Weight, bias: Optional[torch.Tensor] = None, *,
                         backend: Optional[str] = None) -> torch.Tensor:
    """``y = x @ W^T (+ bias)`` for a 2:4 + int4 weight ``W`` (N, K); x ``(..., K)``, any strides.

    ``backend`` forces ``triton``, ``interpret`` or ``reference`` (default:
    chosen per device and M, or ``SPARSEKIT_BACKEND``).
    """
    if not isinstance(weight, Sparse24Int4Weight):
        raise TypeError(f"weight must be a Sparse24Int4Weight, got {type(weight).__name__} "
                        "(build one with Sparse24Int4Weight.from_dense)")
    return sparse24_int4_linear_packed(x, weight.qweight, weight.scales, weight.zeros, weight.meta,
                                       weight.effective_group_size, weight.in_features, bias, backend=backend,
                                       validate=False)      # validated when the weight was built
