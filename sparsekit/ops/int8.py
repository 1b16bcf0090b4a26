"""Int8-activation linears: W8A8, W4A8 and token-adaptive mixed 4/8-bit activations.

``y = fake_quant(x) @ W_hat^T (+ bias)`` where ``fake_quant`` is the per-token
dynamic symmetric quantization of :mod:`sparsekit.ops.act_quant` (8 bits,
4 bits, or per token 4 or 8 bits), computed on the GPU as

1. one fused quantization launch (``kernels.int8._act_quant``): int8 codes +
   one fp32 scale per token, whatever the token's bit width;
2. one int8 x int8 tensor-core GEMM with an int32 accumulator
   (``_w8a8_fwd`` for an :class:`~sparsekit.formats.int8.Int8Weight`,
   ``_w4a8_fwd`` for an :class:`~sparsekit.formats.int4.Int4Weight`, whose
   nibbles are unpacked to int8 in registers), weight and token scales in the
   fp32 epilogue.  4-bit tokens are int8 codes in [-7, 7], so the same launch
   serves both groups of a mixed batch.

Two ``torch.library`` custom ops, with fake implementations:
``sparsekit::int8_linear`` (W8A8; dispatch name ``int8_linear``) and
``sparsekit::w4a8_linear`` (W4A8; dispatch name ``w4a8_linear``).  Backends:
``triton`` (CUDA), ``interpret`` (the same kernels on CPU) and ``reference``
(plain PyTorch: the reference quantizer, then fp32 math on the fake-quantized
activations and the fp32-dequantized weight -- the numerical truth).

Autograd: the gradient of ``x`` is straight-through (the rounding of the
activation quantizer is treated as identity): ``dx = dy @ W_hat``; ``bias``
gets ``dy`` summed.  Weight tensors are not differentiable (inference ops).

Activation bits (``act_bits``): ``8`` (W8A8 / W4A8), ``4`` (A4: the QuartDepth
setting, stored as int8, so no extra speed over A8 -- a quality baseline),
``"mixed"`` (the top ``frac8`` fraction of tokens by importance get 8 bits,
the rest 4; importance = row L2 norm or a given per-token score), or an
explicit per-token tensor of 4/8.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .. import testing as _testing
from ..formats.int4 import SYMMETRIC_ZERO, Int4Weight, unpack_int4
from ..formats._validate import validate_int8
from ..formats.int8 import Int8Weight
from ._checks import as_contiguous, check_bias, check_x, validate_once
from . import dispatch
from ._dense import cached_weight
from .act_quant import quantize_rows, resolve_act_bits

__all__ = ["int8_linear", "int8_linear_packed", "w4a8_linear", "w4a8_linear_packed", "dequantize_int4_fp32"]

dispatch.register("int8_linear", ("triton", "interpret", "dense", "reference"))
dispatch.register("w4a8_linear", ("triton", "interpret", "dense", "reference"))


def _kernels(backend: str):
    from .. import kernels  # sparsekit.kernels

    return kernels.load("int8", interpret=(backend == "interpret"))


def dequantize_int4_fp32(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                         group_size: int, k: int) -> torch.Tensor:
    """``(code - zero) * scale`` in float32 ``(N, K)`` -- the weight the W4A8 kernel multiplies by
    (its epilogue applies the half-precision group scale in fp32, without rounding the product)."""
    n = qweight.shape[0]
    q = unpack_int4(qweight, k).to(torch.float32).reshape(n, k // group_size, group_size)
    z = zeros.float() if zeros is not None else torch.full(scales.shape, float(SYMMETRIC_ZERO),
                                                          device=scales.device)
    return ((q - z[..., None]) * scales.float()[..., None]).reshape(n, k)


def _w8_dequant(qweight, wscale):
    return qweight.to(torch.float32) * wscale[:, None]


def dense_w8_weight(qweight: torch.Tensor, wscale: torch.Tensor) -> torch.Tensor:
    """The ``dense`` backend's float32 W8 weight, cached per tensor version."""
    return cached_weight(("w8",), (qweight, wscale), lambda: _w8_dequant(qweight, wscale).contiguous())


def dense_w4_weight(qweight, scales, zeros, group_size: int, in_features: int) -> torch.Tensor:
    """The ``dense`` backend's float32 W4A8 weight, cached per tensor version."""
    return cached_weight(("w4", group_size, in_features), (qweight, scales, zeros),
                         lambda: dequantize_int4_fp32(qweight, scales, zeros, group_size, in_features).contiguous())


def _empty_k(x, n, bias):
    y = torch.zeros((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    return y + bias if bias is not None else y


def _reference(x, w_fp32, bias, nbits, bits):
    x2 = x.reshape(-1, x.shape[-1])
    q, s = quantize_rows(x2, nbits, bits, "reference")
    xh = q.float() * s[:, None]
    y = F.linear(xh, w_fp32, None if bias is None else bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], w_fp32.shape[0])


# ---------------------------------------------------------------------- W8A8 op
@torch.library.custom_op("sparsekit::int8_linear", mutates_args=())
def _int8_linear(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: Optional[torch.Tensor],
                 nbits: int, bits: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    n = qweight.shape[0]
    if x.shape[-1] == 0:       # no input features: the product is empty, y = bias (as F.linear)
        return _empty_k(x, n, bias)
    if backend == "reference":
        return _reference(x, _w8_dequant(qweight, wscale), bias, nbits, bits).contiguous()
    if backend == "dense":
        return _reference(x, dense_w8_weight(qweight, wscale), bias, nbits, bits).contiguous()
    x2 = x.reshape(-1, x.shape[-1])
    qweight, wscale, bias = (as_contiguous(t) for t in (qweight, wscale, bias))
    out = _testing.alloc_output((x2.shape[0], n), x.dtype, x.device)
    if x2.shape[0] > 0 and n > 0:
        xq, xs = quantize_rows(x2, nbits, bits, backend)
        _kernels(backend).w8a8_linear(xq, xs, qweight, wscale, bias, out)
    return out.reshape(*x.shape[:-1], n)


@_int8_linear.register_fake
def _(x, qweight, wscale, bias, nbits, bits, backend):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _setup_w8(ctx, inputs, output):
    x, qweight, wscale, bias, nbits, bits, backend = inputs
    ctx.save_for_backward(qweight, wscale)
    ctx.has_bias = bias is not None


def _backward_w8(ctx, grad):
    if ctx.needs_input_grad[2]:
        raise NotImplementedError("int8_linear is an inference op: the weight scales are not differentiable "
                                  "(only x, straight-through, and bias are)")
    qweight, wscale = ctx.saved_tensors
    gx = gb = None
    if ctx.needs_input_grad[0]:
        gx = (grad @ _w8_dequant(qweight, wscale).to(grad.dtype)).contiguous()
    if ctx.has_bias and ctx.needs_input_grad[3]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, None, None, gb, None, None, None


_int8_linear.register_autograd(_backward_w8, setup_context=_setup_w8)


# ---------------------------------------------------------------------- W4A8 op
@torch.library.custom_op("sparsekit::w4a8_linear", mutates_args=())
def _w4a8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                 group_size: int, in_features: int, bias: Optional[torch.Tensor], nbits: int,
                 bits: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    n = qweight.shape[0]
    if in_features == 0:       # no input features: y = bias (as F.linear)
        return _empty_k(x, n, bias)
    if backend in ("reference", "dense"):
        def make():
            return dequantize_int4_fp32(qweight, scales, zeros, group_size, in_features).contiguous()
        w = make() if backend == "reference" else dense_w4_weight(qweight, scales, zeros, group_size, in_features)
        return _reference(x, w, bias, nbits, bits).contiguous()
    x2 = x.reshape(-1, x.shape[-1])
    qweight, scales, zeros, bias = (as_contiguous(t) for t in (qweight, scales, zeros, bias))
    out = _testing.alloc_output((x2.shape[0], n), x.dtype, x.device)
    if x2.shape[0] > 0 and n > 0:
        xq, xs = quantize_rows(x2, nbits, bits, backend)
        _kernels(backend).w4a8_linear(xq, xs, qweight, scales, zeros, group_size, in_features, bias, out)
    return out.reshape(*x.shape[:-1], n)


@_w4a8_linear.register_fake
def _(x, qweight, scales, zeros, group_size, in_features, bias, nbits, bits, backend):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _setup_w4(ctx, inputs, output):
    x, qweight, scales, zeros, group_size, in_features, bias, nbits, bits, backend = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.group_size = group_size
    ctx.in_features = in_features
    ctx.has_bias = bias is not None


def _backward_w4(ctx, grad):
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise NotImplementedError("w4a8_linear is an inference op: gradients of the int4 scales/zeros are not "
                                  "implemented (only x, straight-through, and bias are differentiable)")
    qweight, scales, zeros = ctx.saved_tensors
    gx = gb = None
    if ctx.needs_input_grad[0]:
        w = dequantize_int4_fp32(qweight, scales, zeros, ctx.group_size, ctx.in_features)
        gx = (grad @ w.to(grad.dtype)).contiguous()
    if ctx.has_bias and ctx.needs_input_grad[6]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, None, None, None, None, None, gb, None, None, None


_w4a8_linear.register_autograd(_backward_w4, setup_context=_setup_w4)


# ---------------------------------------------------------------------- checks
def _check_x(x, in_features, dtypes, what):
    check_x(x, in_features)
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{what} supports {names} activations, got {x.dtype}")


# the int32 accumulator holds up to K * 127 * 127 (same as kernels.int8.MAX_K)
MAX_K = (2 ** 31 - 1) // (127 * 127)


def _check_k(k):
    if k > MAX_K:
        raise ValueError(f"in_features={k} is too large for an exact int32 accumulator (at most {MAX_K})")


# ---------------------------------------------------------------------- public API: W8A8
def int8_linear_packed(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, *, act_bits: Union[int, str, torch.Tensor] = 8,
                       frac8: float = 0.25, importance: Optional[torch.Tensor] = None,
                       backend: Optional[str] = None, validate: bool = True) -> torch.Tensor:
    """:func:`int8_linear` on the raw tensors: ``qweight`` (N, K) int8, ``wscale`` (N,) float32.

    Shapes, dtypes and devices are always checked; ``validate=True`` also checks the contents
    (codes in [-127, 127], finite scales) once per tensor version, ``validate=False`` trusts them
    (tensors of a validated :class:`Int8Weight` or module).
    """
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise TypeError("qweight must be a 2-D int8 tensor (out_features, in_features)")
    n, k = qweight.shape
    _check_x(x, k, (torch.float16, torch.bfloat16, torch.float32), "int8_linear")
    if not isinstance(wscale, torch.Tensor) or wscale.dtype != torch.float32 or tuple(wscale.shape) != (n,):
        raise ValueError(f"wscale must be a float32 tensor of shape ({n},) (one scale per output channel)")
    for name, t in (("qweight", qweight), ("wscale", wscale)):
        if t.device != x.device:
            raise ValueError(f"x is on {x.device} but the weight's {name} is on {t.device}")
    check_bias(bias, n, x)
    _check_k(k)
    if validate:
        validate_once((qweight, wscale), ("int8", n, k),
                      lambda: validate_int8(qweight, wscale, (n, k), owner="int8_linear_packed"))
    nbits, bits = resolve_act_bits(x, act_bits, frac8, importance)
    m = x.numel() // k if k else 0
    chosen = dispatch.resolve("int8_linear", x.device, backend, m)
    return _int8_linear(x, qweight, wscale, bias, nbits, bits, chosen)


def int8_linear(x: torch.Tensor, weight: Int8Weight, bias: Optional[torch.Tensor] = None, *,
                act_bits: Union[int, str, torch.Tensor] = 8, frac8: float = 0.25,
                importance: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """W8A8: ``y = fake_quant(x) @ (q * scale)^T (+ bias)`` for an :class:`Int8Weight` (N, K).

    ``x`` ``(..., K)`` float16/bfloat16/float32, any strides; the result is
    ``(..., N)`` in x's dtype.  ``act_bits``: 8, 4, ``"mixed"`` (top ``frac8``
    of tokens by ``importance`` -- row L2 norm unless given, shape
    ``x.shape[:-1]`` -- at 8 bits, the rest at 4) or a per-token tensor of 4/8.
    ``backend``: ``triton``, ``interpret``, ``reference`` (default: per device).
    """
    if not isinstance(weight, Int8Weight):
        raise TypeError(f"weight must be an Int8Weight, got {type(weight).__name__} "
                        "(quantize a dense weight with Int8Weight.from_float)")
    return int8_linear_packed(x, weight.qweight, weight.scales, bias, act_bits=act_bits, frac8=frac8,
                              importance=importance, backend=backend,
                              validate=False)      # validated when the weight was built


# ---------------------------------------------------------------------- public API: W4A8
def w4a8_linear_packed(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: Optional[torch.Tensor], group_size: int, in_features: int,
                       bias: Optional[torch.Tensor] = None, *, act_bits: Union[int, str, torch.Tensor] = 8,
                       frac8: float = 0.25, importance: Optional[torch.Tensor] = None,
                       backend: Optional[str] = None, validate: bool = True) -> torch.Tensor:
    """:func:`w4a8_linear` on the raw packed int4 tensors (what a QLinear holds as buffers).

    ``group_size`` is the effective one (``in_features`` for one group per
    row); ``zeros=None`` means symmetric (zero point 8).  ``validate`` as in
    :func:`sparsekit.ops.int4.int4_linear_packed`.
    """
    from .int4 import _check as _check_int4, validate_int4_packed

    _check_int4(x, qweight, scales, zeros, group_size, in_features, bias)
    if validate:
        validate_int4_packed(qweight, scales, zeros, group_size, in_features, "w4a8_linear_packed")
    if in_features // group_size > 1 and group_size % 32:
        raise ValueError(f"w4a8_linear needs group_size to be a multiple of 32 (or one group per row), "
                         f"got {group_size}")
    _check_k(in_features)
    nbits, bits = resolve_act_bits(x, act_bits, frac8, importance)
    m = x.numel() // in_features if in_features else x.numel()
    chosen = dispatch.resolve("w4a8_linear", x.device, backend, m)
    return _w4a8_linear(x, qweight, scales, zeros, group_size, in_features, bias, nbits, bits, chosen)


def w4a8_linear(x: torch.Tensor, weight: Int4Weight, bias: Optional[torch.Tensor] = None, *,
                act_bits: Union[int, str, torch.Tensor] = 8, frac8: float = 0.25,
                importance: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """W4A8: ``y = fake_quant(x) @ W_hat^T (+ bias)`` for a group-wise :class:`Int4Weight` (N, K).

    ``x`` ``(..., K)`` in the weight's scale dtype (float16 or bfloat16); the
    result has x's dtype.  ``act_bits`` / ``frac8`` / ``importance`` as in
    :func:`int8_linear`.  ``W_hat = (code - zero) * scale`` in fp32.
    """
    if not isinstance(weight, Int4Weight):
        raise TypeError(f"weight must be an Int4Weight, got {type(weight).__name__} "
                        "(quantize a dense weight with Int4Weight.from_float)")
    if weight.perm is not None:                      # act-order weight: columns stored in packed order
        check_x(x, weight.in_features)
        x = x.index_select(-1, weight.perm)
    return w4a8_linear_packed(x, weight.qweight, weight.scales, weight.zeros, weight.group_size,
                              weight.in_features, bias, act_bits=act_bits, frac8=frac8, importance=importance,
                              backend=backend, validate=False)      # validated when the weight was built

