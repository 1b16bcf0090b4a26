"""W4A16 linear: ``y = x @ dequant(W)^T + bias`` with a packed group-wise int4 weight.

One ``torch.library`` custom op, ``sparsekit::int4_linear`` (fake
implementation included, so it traces under ``torch.compile``).  It is an
inference op: autograd gives the gradient of ``x`` (``grad @ dequant(W)``,
computed with the reference dequantization, useful for QAT-style flows) and of
``bias``; asking for a gradient of the packed weight, scales or zeros raises
NotImplementedError.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import testing as _testing
from ..formats._validate import validate_int4
from ..formats.int4 import SCALE_DTYPES, Int4Weight, dequantize_int4
from ._checks import as_contiguous, check_bias, check_features, check_x, validate_once
from . import dispatch
from ._dense import cached_weight, cpu_weight, dense_linear

__all__ = ["int4_linear", "int4_linear_packed"]

dispatch.register("int4_linear", ("triton", "interpret", "dense", "reference"))


def _kernels(backend: str):
    from .. import kernels  # sparsekit.kernels

    return kernels.load("int4", interpret=(backend == "interpret"))


def dense_int4_weight(qweight, scales, zeros, group_size: int, in_features: int) -> torch.Tensor:
    """The ``dense`` backend's dequantized weight (float32 on CPU), cached per tensor version."""
    return cached_weight(("int4", group_size, in_features), (qweight, scales, zeros),
                         lambda: cpu_weight(dequantize_int4(qweight, scales, zeros, group_size, in_features)))


@torch.library.custom_op("sparsekit::int4_linear", mutates_args=())
def _int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                 group_size: int, in_features: int, bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    n = qweight.shape[0]
    lead = x.shape[:-1]
    if in_features == 0:       # no input features: y = bias (as F.linear)
        y = x.new_zeros((*lead, n))
        return y + bias if bias is not None else y
    if backend == "reference":
        w = dequantize_int4(qweight, scales, zeros, group_size, in_features)
        return F.linear(x, w, bias).contiguous()
    if backend == "dense":
        return dense_linear(x, dense_int4_weight(qweight, scales, zeros, group_size, in_features), bias)
    x2 = x.reshape(-1, x.shape[-1])
    qweight, scales, zeros, bias = (as_contiguous(t) for t in (qweight, scales, zeros, bias))
    out = _testing.alloc_output((x2.shape[0], n), x.dtype, x.device)
    if x2.shape[0] > 0 and n > 0:
        _kernels(backend).int4_linear(x2, qweight, scales, zeros, group_size, in_features, bias, out)
    return out.reshape(*lead, n)


@_int4_linear.register_fake
def _(x, qweight, scales, zeros, group_size, in_features, bias, backend):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, group_size, in_features, bias, backend = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.group_size = group_size
    ctx.in_features = in_features
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise NotImplementedError("int4_linear is an inference op: gradients of the int4 scales/zeros are not "
                                  "implemented (only x and bias are differentiable)")
    qweight, scales, zeros = ctx.saved_tensors
    gx = gb = None
    if ctx.needs_input_grad[0]:
        w = dequantize_int4(qweight, scales, zeros, ctx.group_size, ctx.in_features)
        gx = (grad @ w.to(grad.dtype)).contiguous()
    if ctx.has_bias and ctx.needs_input_grad[6]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, None, None, None, None, None, gb, None


_int4_linear.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------- public API
def _check(x, qweight, scales, zeros, group_size, in_features, bias):
    check_features("in_features", in_features)
    check_x(x, in_features)
    if x.dtype not in SCALE_DTYPES:
        raise TypeError(f"int4_linear supports float16 and bfloat16 activations, got {x.dtype}")
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32:
        raise TypeError("qweight must be an int32 tensor (8 packed int4 codes per word)")
    n = qweight.shape[0] if qweight.dim() == 2 else -1
    if in_features % 8 or qweight.dim() != 2 or qweight.shape[1] != in_features // 8:
        raise ValueError(f"qweight must have shape (N, in_features // 8) with in_features a multiple of 8, "
                         f"got {tuple(qweight.shape)} for in_features={in_features}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size} (group_size must "
                         "be a positive divisor of in_features)")
    g = in_features // group_size
    if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != (n, g):
        raise ValueError(f"scales must have shape {(n, g)} (N, in_features // group_size)")
    if scales.dtype != x.dtype:
        raise TypeError(f"x dtype {x.dtype} does not match the weight's scale dtype {scales.dtype}; cast x "
                        "(or quantize with dtype=x.dtype)")
    if zeros is not None:
        if not isinstance(zeros, torch.Tensor) or tuple(zeros.shape) != (n, g) or zeros.dtype != scales.dtype:
            raise ValueError(f"zeros must be None or a {scales.dtype} tensor of shape {(n, g)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None and t.device != x.device:
            raise ValueError(f"x is on {x.device} but the weight's {name} is on {t.device}")
    check_bias(bias, n, x)


def validate_int4_packed(qweight, scales, zeros, group_size, in_features, owner):
    """Content validation of raw int4 tensors, once per tensor version."""
    shape = (qweight.shape[0], in_features)
    validate_once((qweight, scales, zeros), ("int4", shape, group_size),
                  lambda: validate_int4(qweight, scales, zeros, shape, group_size, zeros is None, owner=owner))


def int4_linear_packed(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                       group_size: int, in_features: int, bias: Optional[torch.Tensor] = None, *,
                       backend: Optional[str] = None, validate: bool = True) -> torch.Tensor:
    """:func:`int4_linear` on the raw packed tensors (what a QLinear module holds as buffers).

    ``group_size`` is the effective one (``in_features`` for a single group per
    row); ``zeros=None`` means symmetric (zero point 8).  Shapes, dtypes and devices are always
    checked; ``validate=True`` also checks the contents (finite scales, zero points in [0, 15])
    once per tensor version, ``validate=False`` trusts them (tensors of a validated
    :class:`Int4Weight` or module).
    """
    _check(x, qweight, scales, zeros, group_size, in_features, bias)
    if validate:
        validate_int4_packed(qweight, scales, zeros, group_size, in_features, "int4_linear_packed")
    m = x.numel() // in_features if in_features else x.numel()
    chosen = dispatch.resolve("int4_linear", x.device, backend, m)
    return _int4_linear(x, qweight, scales, zeros, group_size, in_features, bias, chosen)


def int4_linear(x: torch.Tensor, weight: Int4Weight, bias: Optional[torch.Tensor] = None, *,
                backend: Optional[str] = None) -> torch.Tensor:
    """``y = x @ dequant(W)^T (+ bias)`` for an :class:`Int4Weight` ``W`` of shape (N, K).

    ``x`` is ``(..., K)`` in the weight's scale dtype (float16 or bfloat16),
    any strides; the result is ``(..., N)`` in that dtype, accumulated in fp32.
    ``backend`` forces one of ``triton``, ``interpret``, ``reference``
    (default: chosen per device and M, or ``SPARSEKIT_BACKEND``).
    """
    if not isinstance(weight, Int4Weight):
        raise TypeError(f"weight must be an Int4Weight, got {type(weight).__name__} "
                        "(quantize a dense weight with Int4Weight.from_float)")
    if weight.perm is not None:                      # act-order weight: columns stored in packed order
        check_x(x, weight.in_features)
        x = x.index_select(-1, weight.perm)
    return int4_linear_packed(x, weight.qweight, weight.scales, weight.zeros, weight.group_size,
                              weight.in_features, bias, backend=backend,
                              validate=False)      # validated when the weight was built
