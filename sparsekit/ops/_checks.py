"""Input checks shared by the ops' public entry points (clear errors before any kernel runs)."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["check_x", "check_bias"]


def check_x(x, in_features: int) -> None:
    """``x`` is a tensor ``(..., in_features)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but the weight expects "
                         f"in_features={in_features}")


def check_bias(bias: Optional[torch.Tensor], n: int, x: torch.Tensor) -> None:
    """``bias`` is None or an ``(n,)`` tensor with ``x``'s dtype and device."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if bias.dtype != x.dtype or bias.device != x.device:
        raise TypeError(f"bias must match x ({x.dtype} on {x.device}), got {bias.dtype} on {bias.device}")
