"""Per-token dynamic activation quantization (symmetric, int8 storage).

Every row (token) ``x[..., :]`` gets its own scale ``amax(|row|) / qmax`` with
``qmax = 2**(bits-1) - 1`` (127 for 8-bit, 7 for 4-bit), and
``q = clamp(round_half_even(x / scale), -qmax, qmax)`` stored as int8 whatever
the bit width, so 4- and 8-bit tokens share one int8 tensor-core dot.
``bits`` may be a per-token tensor of 4s and 8s (token-adaptive mixed
precision).  A row of zeros gets scale 1 and q = 0.

Non-finite tokens keep dense semantics: a row holding any NaN or +-Inf gets
scale NaN and codes 0, so its dequantized row ``q * scale`` -- and every output
row an int8 matmul computes from it -- is NaN on every backend (never finite
codes made up from the Inf / NaN).

Two implementations of the same function:

* :func:`per_token_quant_reference` -- plain PyTorch, the numerical truth;
* the fused Triton kernel ``kernels.int8._act_quant`` (one program per token:
  amax, scale and int8 codes in one launch, IEEE division and round-half-even
  so ``q`` is bit-identical to the reference), exposed as the custom op
  ``sparsekit::per_token_quant`` and :func:`per_token_quant` (dispatch name
  ``per_token_quant``: ``triton`` / ``interpret`` / ``reference``).

Token-adaptive mixed precision (Agile-Quant / Squat style):
:func:`token_importance` scores each token -- by default the L2 norm of its
activation row, or a score the caller supplies (e.g. the attention each
token received) -- and :func:`select_token_bits` gives the top ``frac8``
fraction of tokens (ranked over all leading dims together) 8 bits and the rest
4 bits.  The selection is plain PyTorch (a norm and a ``topk``); the resulting
per-token ``bits`` vector drives one quantization launch and one int8 GEMM
for both groups (:mod:`sparsekit.ops.int8`).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from . import dispatch

__all__ = ["per_token_quant_reference", "per_token_dequant_reference", "qmax_for_bits", "per_token_quant",
           "token_importance", "select_token_bits", "resolve_act_bits", "ACT_BITS"]

ACT_BITS = (8, 4, "mixed")

dispatch.register("per_token_quant", ("triton", "interpret", "reference"))


def qmax_for_bits(bits: Union[int, torch.Tensor]):
    """127 for 8 bits, 7 for 4 bits (tensor in, tensor out)."""
    if isinstance(bits, torch.Tensor):
        if not bool(((bits == 4) | (bits == 8)).all()):
            raise ValueError("per-token bits must each be 4 or 8")
        return (2 ** (bits.to(torch.int32) - 1) - 1).to(torch.float32)
    if bits not in (4, 8):
        raise ValueError(f"activation bits must be 4 or 8, got {bits!r}")
    return float(2 ** (bits - 1) - 1)


def per_token_quant_reference(x: torch.Tensor, bits: Union[int, torch.Tensor] = 8):
    """(q int8 of x's shape, scale float32 of shape x.shape[:-1] + (1,)).

    ``x ~= q * scale`` row by row.  ``bits``: 8, 4, or an integer tensor of
    shape ``x.shape[:-1]`` holding 4 or 8 per token.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (tokens x features)")
    if x.shape[-1] == 0:
        raise ValueError(f"x has 0 features in its last dim (shape {tuple(x.shape)}); per-token quantization "
                         "needs at least one feature per token")
    qmax = qmax_for_bits(bits)
    if isinstance(qmax, torch.Tensor):
        if qmax.shape != x.shape[:-1]:
            raise ValueError(f"per-token bits must have shape {tuple(x.shape[:-1])}, got {tuple(qmax.shape)}")
        qmax = qmax.to(x.device).unsqueeze(-1)
    xf = x.float()
    finite = torch.isfinite(xf).all(dim=-1, keepdim=True)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    q = torch.round(xf / scale)
    q = torch.maximum(torch.minimum(q, torch.as_tensor(qmax, device=x.device)),
                      -torch.as_tensor(qmax, device=x.device))
    q = torch.where(finite, q, torch.zeros_like(q))
    return q.to(torch.int8), scale


def per_token_dequant_reference(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``q * scale`` in ``dtype`` (the fake-quantized activation)."""
    return (q.float() * scale).to(dtype)


# --------------------------------------------------------------------------- fused kernel path
def _kernels(backend: str):
    from .. import kernels  # sparsekit.kernels

    return kernels.load("int8", interpret=(backend == "interpret"))


def quantize_rows(x2: torch.Tensor, nbits: int, bits: Optional[torch.Tensor], backend: str):
    """``(q (M, K) int8, scale (M,) float32)`` of a 2-D ``x2`` by ``backend`` (no checks).

    ``bits`` (M,) integer tensor of 4/8 per row, or None (``nbits`` for every row).
    """
    m, k = x2.shape
    if backend == "reference":
        q, s = per_token_quant_reference(x2, nbits if bits is None else bits.reshape(m))
        return q, s.reshape(m)
    q = torch.empty((m, k), dtype=torch.int8, device=x2.device)
    s = torch.empty((m,), dtype=torch.float32, device=x2.device)
    if m:
        b = None if bits is None else bits.reshape(m).contiguous()
        _kernels(backend).per_token_quant(x2, b, qmax_for_bits(nbits), q, s)
    return q, s


@torch.library.custom_op("sparsekit::per_token_quant", mutates_args=())
def _per_token_quant(x: torch.Tensor, bits: Optional[torch.Tensor], nbits: int,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    lead = x.shape[:-1]
    q, s = quantize_rows(x.reshape(-1, x.shape[-1]), nbits, bits, backend)
    return q.reshape(x.shape), s.reshape(*lead, 1)


@_per_token_quant.register_fake
def _(x, bits, nbits, backend):
    return (torch.empty(x.shape, dtype=torch.int8, device=x.device),
            torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device))


def _check_x(x: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{what} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{what} must have at least one dimension (tokens x features)")


def _check_bits_tensor(bits: torch.Tensor, x: torch.Tensor) -> None:
    if bits.is_floating_point() or bits.is_complex() or bits.dtype == torch.bool:
        raise TypeError(f"per-token bits must be an integer tensor, got {bits.dtype}")
    if tuple(bits.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"per-token bits must have shape {tuple(x.shape[:-1])} (x.shape[:-1]), "
                         f"got {tuple(bits.shape)}")
    if bits.device != x.device:
        raise ValueError(f"per-token bits are on {bits.device} but x is on {x.device}")
    if bits.numel() and bits.device.type != "meta" and not bool(((bits == 4) | (bits == 8)).all()):
        raise ValueError("per-token bits must each be 4 or 8")


def per_token_quant(x: torch.Tensor, bits: Union[int, torch.Tensor] = 8, *,
                    backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``q`` int8 of ``x``'s shape, ``scale`` float32 ``x.shape[:-1] + (1,)``.

    Same function as :func:`per_token_quant_reference` (``q`` bit for bit);
    ``bits`` is 8, 4 or an integer tensor of shape ``x.shape[:-1]`` holding 4
    or 8 per token.  ``x`` is float16/bfloat16/float32, any strides, with at
    least one feature.  A token holding NaN or +-Inf gets scale NaN and codes 0
    (see the module docstring).  ``backend``: ``triton``, ``interpret`` or
    ``reference`` (default: chosen per device, or ``SPARSEKIT_BACKEND``).
    """
    _check_x(x)
    if x.shape[-1] == 0:
        raise ValueError(f"x has 0 features in its last dim (shape {tuple(x.shape)}); per-token quantization "
                         "needs at least one feature per token")
    nbits, bt = 8, None
    if isinstance(bits, torch.Tensor):
        _check_bits_tensor(bits, x)
        bt = bits
    elif isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"activation bits must be 4, 8 or a per-token tensor of 4/8, got {bits!r}")
    else:
        nbits = int(bits)
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    chosen = dispatch.resolve("per_token_quant", x.device, backend, m)
    return _per_token_quant(x, bt, nbits, chosen)


# --------------------------------------------------------------------------- mixed-precision policy
def token_importance(x: torch.Tensor, importance: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token importance, shape ``x.shape[:-1]``, float32.

    Default: the L2 norm of each token's activation row (large-norm tokens
    carry outliers that 4 bits would clip hardest).  A given ``importance``
    (e.g. the attention each token received, summed over heads and queries)
    is validated and returned as float32.
    """
    _check_x(x)
    if importance is None:
        return torch.linalg.vector_norm(x.detach().float(), dim=-1)
    if not isinstance(importance, torch.Tensor):
        raise TypeError(f"importance must be a tensor of shape {tuple(x.shape[:-1])} or None, "
                        f"got {type(importance).__name__}")
    if tuple(importance.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"importance must have one score per token, shape {tuple(x.shape[:-1])}, "
                         f"got {tuple(importance.shape)}")
    if importance.device != x.device:
        raise ValueError(f"importance is on {importance.device} but x is on {x.device}")
    if importance.is_complex() or importance.dtype == torch.bool:
        raise TypeError(f"importance must be real-valued, got {importance.dtype}")
    return importance.detach().float()


def n_tokens_8bit(n_tokens: int, frac8: float) -> int:
    """How many of ``n_tokens`` get 8 bits: ``ceil(frac8 * n_tokens)`` (0 when frac8 = 0)."""
    return min(n_tokens, int(math.ceil(float(frac8) * n_tokens - 1e-9)))


def _check_frac8(frac8) -> float:
    if isinstance(frac8, bool) or not isinstance(frac8, (int, float)) or not 0.0 <= float(frac8) <= 1.0:
        raise ValueError(f"frac8 (fraction of tokens kept at 8 bits) must be a number in [0, 1], got {frac8!r}")
    return float(frac8)


def select_token_bits(x: torch.Tensor, frac8: float = 0.25,
                      importance: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token bit widths (int8 tensor of shape ``x.shape[:-1]``, values 8 or 4).

    The ``ceil(frac8 * T)`` most important of the ``T`` tokens (all leading
    dims ranked together; ties broken by ``torch.topk``) get 8 bits, the rest
    4.  Importance: :func:`token_importance` (row L2 norm unless given).
    """
    frac8 = _check_frac8(frac8)
    score = token_importance(x, importance).reshape(-1)
    t = score.numel()
    bits = torch.full((t,), 4, dtype=torch.int8, device=x.device)
    n8 = n_tokens_8bit(t, frac8)
    if n8:
        # NaN scores (never expected) rank last instead of poisoning topk
        score = torch.nan_to_num(score, nan=-math.inf)
        bits[torch.topk(score, n8, sorted=False).indices] = 8
    return bits.reshape(x.shape[:-1])


def resolve_act_bits(x: torch.Tensor, act_bits, frac8: float = 0.25,
                     importance: Optional[torch.Tensor] = None) -> tuple[int, Optional[torch.Tensor]]:
    """``act_bits`` (8, 4, ``"mixed"`` or a per-token tensor) -> ``(nbits, bits_tensor_or_None)``."""
    if isinstance(act_bits, torch.Tensor):
        _check_bits_tensor(act_bits, x)
        return 8, act_bits
    if isinstance(act_bits, str):
        if act_bits != "mixed":
            raise ValueError(f"act_bits must be 8, 4, 'mixed' or a per-token tensor of 4/8, got {act_bits!r}")
        return 8, select_token_bits(x, frac8, importance)
    if isinstance(act_bits, bool) or act_bits not in (4, 8):
        raise ValueError(f"act_bits must be 8, 4, 'mixed' or a per-token tensor of 4/8, got {act_bits!r}")
    if importance is not None:
        raise ValueError("importance only applies to act_bits='mixed'")
    return int(act_bits), None
