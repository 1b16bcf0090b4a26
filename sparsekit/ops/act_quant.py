"""Per-token dynamic activation quantization (symmetric, int8 storage).

Every row (token) ``x[..., :]`` gets its own scale ``amax(|row|) / qmax`` with
``qmax = 2**(bits-1) - 1`` (127 for 8-bit, 7 for 4-bit), and
``q = clamp(round_half_even(x / scale), -qmax, qmax)`` stored as int8 whatever
the bit width, so 4- and 8-bit tokens share one int8 tensor-core dot.
``bits`` may be a per-token tensor of 4s and 8s (token-adaptive mixed
precision).  A row of zeros gets scale 1 and q = 0.

This module holds the reference (plain PyTorch, the numerical truth the int8
kernels are tested against).
"""
from __future__ import annotations

from typing import Union

import torch

__all__ = ["per_token_quant_reference", "per_token_dequant_reference", "qmax_for_bits"]


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
    qmax = qmax_for_bits(bits)
    if isinstance(qmax, torch.Tensor):
        if qmax.shape != x.shape[:-1]:
            raise ValueError(f"per-token bits must have shape {tuple(x.shape[:-1])}, got {tuple(qmax.shape)}")
        qmax = qmax.to(x.device).unsqueeze(-1)
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.round(xf / scale)
    q = torch.maximum(torch.minimum(q, torch.as_tensor(qmax, device=x.device)),
                      -torch.as_tensor(qmax, device=x.device))
    return q.to(torch.int8), scale


def per_token_dequant_reference(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``q * scale`` in ``dtype`` (the fake-quantized activation)."""
    return (q.float() * scale).to(dtype)
