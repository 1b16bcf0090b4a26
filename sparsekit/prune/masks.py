"""Mask construction for structured sparsity patterns."""
from __future__ import annotations

import torch

__all__ = ["mask_2to4", "is_2to4"]


def _check_2d_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def mask_2to4(weight: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask keeping 2 of every 4 consecutive weights along ``in_features``.

    The two entries with the largest ``scores`` in each group of four are kept;
    ``scores`` defaults to ``|weight|``.  Pass e.g. ``|W| * ||X_j||`` for Wanda.
    When ``in_features`` is not a multiple of 4 the last group is partial: it
    keeps at most two of its real entries (the same rule the format's zero
    padding implies).  Ties are broken towards the lower column index.
    """
    _check_2d_float("weight", weight)
    if scores is None:
        scores = weight.detach().abs()
    else:
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
        if scores.shape != weight.shape:
            raise ValueError(f"scores shape {tuple(scores.shape)} must equal weight shape {tuple(weight.shape)}")
        scores = scores.detach()
    n, k = weight.shape
    kp = (k + 3) // 4 * 4
    s = scores.float()
    if kp != k:
        # padded slots can never be chosen over a real entry
        s = torch.nn.functional.pad(s, (0, kp - k), value=float("-inf"))
    g = s.reshape(n, kp // 4, 4)
    # stable top-2: sort descending, stable keeps lower index first on ties
    order = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :2]
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(-1, order, True)
    return keep.reshape(n, kp)[:, :k].contiguous()


def is_2to4(weight: torch.Tensor) -> bool:
    """True when every group of 4 along the last dim has at most 2 non-zeros."""
    n, k = weight.shape
    kp = (k + 3) // 4 * 4
    nz = (weight != 0)
    if kp != k:
        nz = torch.nn.functional.pad(nz, (0, kp - k), value=False)
    return bool((nz.reshape(n, kp // 4, 4).sum(-1) <= 2).all())
