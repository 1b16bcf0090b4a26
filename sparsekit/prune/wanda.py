"""Wanda: prune by |weight| x input-activation norm, compared within each output row.

The score of weight ``W[i, j]`` is ``|W[i, j]| * ||X_j||_2``, where ``X_j`` is
input feature ``j`` over every calibration token the layer saw (see
:func:`sparsekit.prune.collect_layer_inputs`, key ``"input_norm"``).  No
weight update: the mask alone is the result.

* ``pattern="2:4"``: keep the two best-scored of every four consecutive
  ``in_features`` (:func:`sparsekit.prune.mask_2to4` with these scores).
* ``pattern="unstructured"``: in each output row keep the best-scored
  ``K - floor(sparsity * K)`` weights (:func:`row_topk_mask`).
"""
from __future__ import annotations

import math

import torch

from .masks import mask_2to4

__all__ = ["PATTERNS", "wanda_scores", "wanda_mask", "row_topk_mask", "magnitude_mask", "check_pattern", "pruned_per_row"]

PATTERNS = ("2:4", "unstructured")


def check_pattern(pattern: str, sparsity: float) -> float:
    """Validate ``pattern`` / ``sparsity`` and return the sparsity as a float.

    ``sparsity`` must be in [0, 1); for ``"2:4"`` it is fixed at 0.5.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown sparsity pattern {pattern!r}; supported: {PATTERNS}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a number, got {type(sparsity).__name__}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if pattern == "2:4" and s != 0.5:
        raise ValueError(f"pattern '2:4' has a fixed sparsity of 0.5, got sparsity={sparsity}")
    return s


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")


def pruned_per_row(k: int, sparsity: float) -> int:
    """Number of weights an unstructured mask drops in a row of ``k``: ``floor(sparsity * k)``."""
    # a tiny slack so that e.g. 0.3 * 10 = 2.9999999999999996 still counts as 3
    return min(k, int(math.floor(sparsity * k + 1e-9)))


def row_topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask keeping, in every row, all but the ``floor(sparsity * K)`` lowest scores.

    Every row has exactly the same number of kept entries; ties are broken
    towards keeping the lower column index.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D, got shape {tuple(scores.shape)}")
    n, k = scores.shape
    drop = pruned_per_row(k, float(sparsity))
    mask = torch.ones(n, k, dtype=torch.bool, device=scores.device)
    if drop == 0:
        return mask
    # stable ascending sort of -score puts the highest first, lower index first on ties;
    # the last ``drop`` positions of that order are dropped
    order = torch.sort(-scores.detach().float(), dim=1, stable=True).indices
    mask.scatter_(1, order[:, k - drop:], False)
    return mask


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` (float32, or float64 when either input is float64), shaped like ``weight``.

    ``input_norm`` is ``(in_features,)``: the L2 norm of each input feature over
    the calibration tokens.
    """
    _check_weight(weight)
    if not isinstance(input_norm, torch.Tensor):
        raise TypeError(f"input_norm must be a torch.Tensor, got {type(input_norm).__name__}")
    if input_norm.dim() != 1 or input_norm.shape[0] != weight.shape[1]:
        raise ValueError(f"input_norm must have shape (in_features,) = ({weight.shape[1]},), "
                         f"got {tuple(input_norm.shape)}")
    if not input_norm.is_floating_point():
        raise TypeError(f"input_norm must be a floating-point tensor, got {input_norm.dtype}")
    if bool((input_norm < 0).any()) or not bool(torch.isfinite(input_norm).all()):
        raise ValueError("input_norm must be finite and non-negative (an L2 norm per input feature)")
    dt = torch.float64 if torch.float64 in (weight.dtype, input_norm.dtype) else torch.float32
    return weight.detach().to(dt).abs() * input_norm.detach().to(device=weight.device, dtype=dt).unsqueeze(0)


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, pattern: str = "2:4",
               sparsity: float = 0.5) -> torch.Tensor:
    """Bool keep-mask (shaped like ``weight``) from Wanda scores.

    ``pattern="2:4"``: two of every four consecutive inputs per row (a partial
    last group keeps at most two); ``pattern="unstructured"``: per row, the
    ``floor(sparsity * K)`` lowest-scored weights are dropped.
    """
    s = check_pattern(pattern, sparsity)
    scores = wanda_scores(weight, input_norm)
    if pattern == "2:4":
        return mask_2to4(weight, scores)
    return row_topk_mask(scores, s)


def magnitude_mask(weight: torch.Tensor, pattern: str = "2:4", sparsity: float = 0.5) -> torch.Tensor:
    """The data-free baseline: the same masks as :func:`wanda_mask` scored by ``|W|`` alone."""
    _check_weight(weight)
    s = check_pattern(pattern, sparsity)
    if pattern == "2:4":
        return mask_2to4(weight)
    return row_topk_mask(weight.detach().abs(), s)
