"""Block scores, hardware-aware block costs and block masks (block-sparse linear).

Everything here works on dense weights and boolean *block masks*: a weight of
shape ``(N, K)`` (out_features, in_features) cut into ``(bm, bk)`` blocks has
the block grid ``(NB, KB) = (ceil(N / bm), ceil(K / bk))``; the last block-row
and block-column may be partial (smaller than ``bm`` / ``bk``).  A block mask is
a ``torch.bool`` tensor of the grid's shape, ``True`` = block kept.
:func:`expand_block_mask` turns it into an elementwise ``(N, K)`` mask for the
dense weight; the block-sparse weight container takes the grid mask directly.

Block sides are 16, 32, 64 or 128 (the kernels' tile sizes); non-square blocks
are fine.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping, Optional, Union

import torch

from ..formats.block_sparse import BLOCK_SIDES, block_grid, check_block_size, keep_count

__all__ = [
    "BLOCK_SIDES", "SCORE_METHODS", "check_block_size", "block_grid", "block_reduce", "block_scores",
    "block_cost", "hardware_aware_scores", "block_mask_from_scores", "expand_block_mask",
    "keep_count", "load_latency_table", "latency_key",
]

SCORE_METHODS = ("magnitude", "taylor1", "taylor2")


# --------------------------------------------------------------------------- block geometry
def _check_shape(shape) -> tuple:
    try:
        n, k = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a pair (N, K), got {shape!r}") from None
    if n < 1 or k < 1:
        raise ValueError(f"shape must have positive sides, got {(n, k)}")
    return n, k


def _check_tensor(name: str, t, dims: int = 2) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")


def block_reduce(t: torch.Tensor, block_size) -> torch.Tensor:
    """Sum of ``t`` over each ``(bm, bk)`` block: a ``(NB, KB)`` tensor.

    Edge blocks are partial and sum only their real entries.  Floating inputs
    keep their dtype; bool/integer inputs are summed as int64 (e.g. counting
    the elements of each block with ``torch.ones(N, K, dtype=torch.bool)``).
    """
    _check_tensor("t", t)
    n, k = t.shape
    if n < 1 or k < 1:
        raise ValueError(f"t must have positive sides, got shape {tuple(t.shape)}")
    bm, bk = check_block_size(block_size)
    nb, kb = -(-n // bm), -(-k // bk)
    if not t.is_floating_point():
        if t.is_complex():
            raise TypeError(f"t must be real, got {t.dtype}")
        t = t.to(torch.int64)
    if nb * bm != n or kb * bk != k:
        t = torch.nn.functional.pad(t, (0, kb * bk - k, 0, nb * bm - n))
    return t.reshape(nb, bm, kb, bk).sum(dim=(1, 3))


def _check_like(name: str, t, weight: torch.Tensor, method: str) -> None:
    if t is None:
        raise ValueError(f"block_scores(method={method!r}) needs {name}= (a tensor shaped like the weight, "
                         f"e.g. from sparsekit.prune.collect_layer_stats)")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != weight.shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} must equal weight shape {tuple(weight.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def block_scores(weight: torch.Tensor, block_size, method: str = "magnitude",
                 grad: Optional[torch.Tensor] = None, fisher: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Importance of each ``(bm, bk)`` block of ``weight``: a float ``(NB, KB)`` grid.

    Removing block ``B`` moves its weights by ``delta = -w_B``.  A second-order
    Taylor expansion of the loss ``L`` gives the loss increase

        dL(B) ~= g_B . delta + 1/2 delta^T H_BB delta,   g = dL/dW, H = Hessian,

    and the methods are increasingly complete estimates of it:

    * ``"magnitude"``: ``sum_{i in B} w_i^2`` (``||W_B||_F^2``; ``H`` taken as
      the identity, the gradient ignored).
    * ``"taylor1"``: ``sum_{i in B} |g_i * w_i|`` (first-order Taylor; the
      absolute value per element makes it a saliency: a removal that moves
      the loss either way is important).
    * ``"taylor2"``: ``sum_{i in B} ( |g_i * w_i| + 1/2 * F_i * w_i^2 )``, the
      first-order term plus the second-order term with the Hessian replaced by
      the diagonal of the empirical Fisher ``F = E[(dL/dw)^2]`` (``H_BB ~=
      diag(F_B)``, cross terms dropped).  This is the estimated loss increase
      when block ``B`` is zeroed.

    ``grad`` and ``fisher`` are shaped like ``weight`` (see
    :func:`sparsekit.prune.collect_layer_stats`).  Scores are computed in
    float32 (float64 for a float64 weight) and are >= 0.
    """
    _check_tensor("weight", weight)
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if method not in SCORE_METHODS:
        raise ValueError(f"unknown score method {method!r}; known: {SCORE_METHODS}")
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(acc)
    if method == "magnitude":
        s = w * w
    else:
        _check_like("grad", grad, weight, method)
        s = (grad.detach().to(device=w.device, dtype=acc) * w).abs()
        if method == "taylor2":
            _check_like("fisher", fisher, weight, method)
            f = fisher.detach().to(device=w.device, dtype=acc)
            if bool((f < 0).any()):
                raise ValueError("fisher must be non-negative (a diagonal of squared gradients)")
            s = s + 0.5 * f * w * w
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"block_scores(method={method!r}): non-finite element scores (NaN/inf in the inputs)")
    return block_reduce(s, block_size)


# --------------------------------------------------------------------------- hardware-aware cost
def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    if isinstance(dtype, str):
        return dtype.replace("torch.", "")
    raise TypeError(f"dtype must be a torch.dtype or a name, got {type(dtype).__name__}")


def latency_key(block_size, dtype) -> str:
    """The latency-table key for a block size and dtype, e.g. ``"64x32:float16"``."""
    bm, bk = check_block_size(block_size)
    return f"{bm}x{bk}:{_dtype_name(dtype)}"


def load_latency_table(table: Union[str, os.PathLike, Mapping]) -> dict:
    """A per-GPU latency table as ``{"<bm>x<bk>:<dtype>": microseconds per kept block}``.

    ``table`` is a dict or the path of a JSON file holding one.  Accepted
    layouts: the flat mapping above; the same mapping under a top-level
    ``"us_per_block"`` key (other top-level keys such as ``"gpu"`` or ``"m"``
    are metadata and ignored); or dict keys given as ``((bm, bk), dtype)`` /
    ``(bm, bk, dtype)`` tuples.  Values must be positive numbers.
    """
    if isinstance(table, (str, os.PathLike)):
        with open(table) as fh:
            table = json.load(fh)
    if not isinstance(table, Mapping):
        raise TypeError(f"latency_table must be a dict or a JSON path, got {type(table).__name__}")
    if "us_per_block" in table:
        table = table["us_per_block"]
        if not isinstance(table, Mapping):
            raise ValueError("latency_table['us_per_block'] must be a mapping")
    out = {}
    for key, val in table.items():
        if isinstance(key, tuple):
            if len(key) == 2:
                (bs, dt) = key
            elif len(key) == 3:
                bs, dt = key[:2], key[2]
            else:
                raise ValueError(f"latency_table key {key!r} must be ((bm, bk), dtype) or (bm, bk, dtype)")
            key = latency_key(bs, dt)
        elif isinstance(key, str):
            try:
                sides, dt = key.split(":")
                bm, bk = (int(v) for v in sides.lower().split("x"))
            except ValueError:
                raise ValueError(f"latency_table key {key!r} must look like '64x32:float16'") from None
            key = latency_key((bm, bk), dt)
        else:
            raise ValueError(f"latency_table key {key!r} must be a string like '64x32:float16' or a tuple")
        try:
            v = float(val)
        except (TypeError, ValueError):
            raise ValueError(f"latency_table[{key!r}] must be a number (microseconds), got {val!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"latency_table[{key!r}] must be positive and finite, got {v}")
        out[key] = v
    return out


def block_cost(shape, block_size, m: int = 1, latency_table=None, dtype=torch.float16) -> torch.Tensor:
    """Cost of keeping each block of an ``(N, K)`` weight: a float64 ``(NB, KB)`` grid.

    * With ``latency_table`` (dict or JSON path, see :func:`load_latency_table`):
      the measured microseconds per kept block for ``(block_size, dtype)`` on
      the target GPU, the same for every block (the kernel processes a full
      tile whether or not it is an edge block).  ``m`` is ignored: the table
      was measured at the benchmark's M.
    * Otherwise the FLOP proxy ``2 * m * rows * cols`` of the block's real
      entries, i.e. ``2 * m * bm * bk`` for interior blocks and less for the
      partial edge blocks, so the grid sums to the layer's dense FLOPs
      ``2 * m * N * K``.  ``m`` is the number of input rows (tokens x batch)
      the layer sees; with ``m = 0.5`` the cost counts parameters.
    """
    n, k = _check_shape(shape)
    bm, bk = check_block_size(block_size)
    nb, kb = -(-n // bm), -(-k // bk)
    if latency_table is not None:
        table = load_latency_table(latency_table)
        key = latency_key((bm, bk), dtype)
        if key not in table:
            raise ValueError(f"latency table has no entry {key!r}; it has {sorted(table)}")
        return torch.full((nb, kb), table[key], dtype=torch.float64)
    if not (isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0):
        raise ValueError(f"m must be a positive number of rows, got {m!r}")
    rows = torch.full((nb,), float(bm), dtype=torch.float64)
    rows[-1] = n - (nb - 1) * bm
    cols = torch.full((kb,), float(bk), dtype=torch.float64)
    cols[-1] = k - (kb - 1) * bk
    return 2.0 * float(m) * rows[:, None] * cols[None, :]


def hardware_aware_scores(scores: torch.Tensor, cost, beta: float = 1.0) -> torch.Tensor:
    """``scores / cost ** beta``: importance per unit of hardware cost.

    ``cost`` is a positive scalar or a tensor broadcastable to ``scores`` (e.g.
    :func:`block_cost`).  ``beta = 0`` leaves the scores unchanged; ``beta = 1``
    ranks blocks by importance per microsecond (or per FLOP), the greedy
    knapsack order for a latency budget; values in between trade the two.
    Within one layer of uniform block cost the ranking does not change; it
    matters when blocks of different layers (or edge blocks) are compared.
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    beta = float(beta)
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be finite and >= 0, got {beta}")
    c = torch.as_tensor(cost, dtype=torch.float64, device=scores.device)
    if bool((c <= 0).any()) or not bool(torch.isfinite(c).all()):
        raise ValueError("cost must be positive and finite")
    try:
        out = scores.to(torch.float64) / c.pow(beta)
    except RuntimeError as e:
        raise ValueError(f"cost of shape {tuple(c.shape)} does not broadcast to scores {tuple(scores.shape)}") from e
    if out.shape != scores.shape:
        raise ValueError(f"cost of shape {tuple(c.shape)} does not broadcast to scores {tuple(scores.shape)}")
    return out.to(scores.dtype) if scores.is_floating_point() else out


# --------------------------------------------------------------------------- masks
def block_mask_from_scores(scores: torch.Tensor, sparsity: Optional[float] = None,
                           keep: Optional[int] = None) -> torch.Tensor:
    """Boolean grid keeping the highest-scoring blocks.

    Give exactly one of ``sparsity`` (keeps ``round((1 - sparsity) * nblocks)``
    blocks, see :func:`keep_count`; 0 keeps all, 1 keeps none) or ``keep`` (an
    exact block count).  Ties are broken towards the lower row-major block
    index.
    """
    _check_tensor("scores", scores)
    if (sparsity is None) == (keep is None):
        raise ValueError("give exactly one of sparsity= or keep=")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"scores must be real numbers, got {scores.dtype}")
    s = scores.detach().to(torch.float64).flatten()
    if bool(torch.isnan(s).any()):
        raise ValueError("scores contain NaN")
    n = s.numel()
    if keep is None:
        keep = keep_count(n, sparsity)
    else:
        if isinstance(keep, bool) or int(keep) != keep or not (0 <= int(keep) <= n):
            raise ValueError(f"keep must be an integer in [0, {n}], got {keep!r}")
        keep = int(keep)
    order = torch.sort(s, descending=True, stable=True).indices[:keep]
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    mask[order] = True
    return mask.reshape(scores.shape)


def expand_block_mask(block_mask: torch.Tensor, shape, block_size) -> torch.Tensor:
    """The elementwise ``(N, K)`` bool mask of a ``(NB, KB)`` block mask (edges cropped)."""
    _check_tensor("block_mask", block_mask)
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be torch.bool, got {block_mask.dtype}")
    n, k = _check_shape(shape)
    bm, bk = check_block_size(block_size)
    grid = (-(-n // bm), -(-k // bk))
    if tuple(block_mask.shape) != grid:
        raise ValueError(f"block_mask shape {tuple(block_mask.shape)} does not match the grid {grid} of a "
                         f"{(n, k)} weight with block_size {(bm, bk)}")
    full = block_mask.repeat_interleave(bm, dim=0).repeat_interleave(bk, dim=1)
    return full[:n, :k].contiguous()
