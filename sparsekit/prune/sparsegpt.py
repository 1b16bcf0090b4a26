"""SparseGPT: one-shot pruning with second-order (OBS) weight compensation.

For a linear layer ``y = W x`` and calibration inputs ``X`` (``n x K``, one row
per token), the layer-wise objective is ``||X W^T - X What^T||^2``.  Its
Hessian with respect to each output row is the same ``H = 2 X^T X / n``
(:func:`sparsekit.prune.collect_layer_inputs`, key ``"hessian"``).

Pruning proceeds column by column (input feature ``j = 0 .. K-1``).  With
``U`` the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), row ``j`` of
``U`` scaled by ``1/U_jj`` is the optimal update of the not-yet-processed
columns when column ``j`` is fixed, given that columns ``< j`` are already
fixed.  So for every row: ``err = (w_j - q_j) / U_jj`` and
``w_{j+1:} -= err * U_{j, j+1:}``, where ``q_j`` is ``w_j`` for a kept weight and
0 for a pruned one.  The OBS saliency of pruning ``w_j`` at that point is
``w_j^2 / U_jj^2``; the mask is chosen adaptively from it:

* ``"unstructured"``: at the start of each block of ``block_size`` columns,
  each row ranks all its not-yet-processed columns by saliency (current
  weights) and prunes, within this block, the ones among its lowest ``owed``
  (``owed`` = ``floor(sparsity * K)`` minus what the row already pruned).  The
  last block takes the exact remainder, so every row ends with exactly
  ``floor(sparsity * K)`` pruned weights, while the split across blocks adapts
  to the compensated weights.  Smaller blocks re-choose more often (better
  masks, more Python-level steps); with one block it is a single up-front
  choice.
* ``"2:4"``: at every 4th column, each row keeps the two of the next four
  columns with the largest saliency, using the weights as updated so far
  (a partial last group keeps at most two).

Updates inside a block are applied immediately; the accumulated errors of a
block update later columns once, as one matrix product (lazy batch update).
"""
from __future__ import annotations

import torch

from .masks import mask_2to4
from .wanda import check_pattern, pruned_per_row

__all__ = ["sparsegpt_prune", "inverse_hessian_factor"]


def inverse_hessian_factor(H: torch.Tensor, damp: float = 0.01) -> tuple:
    """``(U, dead)``: the upper Cholesky factor of ``(H + damp*mean(diag H)*I)^-1`` (float64, row-major
    contiguous) and the bool mask of dead inputs (``H_jj == 0``, set to 1 on the diagonal first).

    ``U = J inv(chol(J H J)) J`` (``J`` the reversal permutation): one Cholesky and one triangular
    inverse instead of a Cholesky, an inverse from it and a second Cholesky (the factor is unique,
    so the result is the same up to rounding; see :func:`sparsekit.quant.gptq_inverse_factor`).
    """
    from ..quant.gptq import _tri_inv_lower

    H = H.detach().to(torch.float64).clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    mean = float(diag.mean())
    H[dead, dead] = 1.0
    lam = damp * (mean if mean > 0 else 1.0)
    H += lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if int(info) != 0:
        raise ValueError(f"the Hessian is not positive definite after dampening (damp={damp}); "
                         f"pass a larger damp or more calibration data")
    U = _tri_inv_lower(L).flip(0, 1).contiguous()
    if not (bool(torch.isfinite(U).all()) and bool((torch.diagonal(U) > 0).all())):
        raise ValueError(f"the inverse Hessian is numerically not positive definite (damp={damp}); "
                         f"pass a larger damp")
    return U, dead


def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, pattern: str = "2:4", sparsity: float = 0.5,
                    block_size: int = 128, damp: float = 0.01, selection: str = "row") -> tuple:
    """Prune ``weight`` (``(out, in)``) given the layer-input Hessian ``H`` (``(in, in)``).

    Returns ``(pruned_weight, mask)``: the compensated weight, zero where
    ``mask`` is False, in ``weight``'s dtype and device (the math runs in
    float32, or float64 for a float64 weight; the inverse Hessian is always
    formed in float64), and the bool keep-mask.  ``weight`` is not modified.

    ``pattern``: ``"2:4"`` (then ``sparsity`` must be 0.5) or
    ``"unstructured"`` (exactly ``floor(sparsity * in)`` pruned per row).
    ``block_size``: columns per lazy-update block (a multiple of 4 for 2:4);
    for unstructured it is also how often the mask is re-chosen.
    ``damp``: ``damp * mean(diag(H))`` is added to the diagonal.
    Inputs that never fired (``H_jj == 0``) get weight 0 and are pruned first.
    ``selection`` (unstructured only): ``"row"`` (default) prunes exactly ``floor(sparsity * in)`` per
    row, re-ranked at every block (lower error than the original on the layers tested); ``"block"``
    is the original SparseGPT rule: one saliency threshold over each whole block, so rows end with
    different counts and the layer's overall sparsity is ``sparsity`` up to ties.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"H must be a torch.Tensor, got {type(H).__name__}")
    n, k = weight.shape
    if tuple(H.shape) != (k, k):
        raise ValueError(f"H must have shape (in_features, in_features) = ({k}, {k}), got {tuple(H.shape)}")
    if not H.is_floating_point():
        raise TypeError(f"H must be a floating-point tensor, got {H.dtype}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("H contains NaN or Inf")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf")
    s = check_pattern(pattern, sparsity)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if pattern == "2:4" and block_size % 4 != 0:
        raise ValueError(f"block_size must be a multiple of 4 for pattern '2:4', got {block_size}")
    if not float(damp) >= 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if selection not in ("row", "block"):
        raise ValueError(f"selection must be 'row' (exact count per row) or 'block' (the original's per-block "
                         f"threshold), got {selection!r}")

    cdt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    dev = weight.device
    U64, dead = inverse_hessian_factor(H.to(dev), float(damp))
    U = U64.to(cdt).contiguous()
    # work on W^T (K, N): column j of W is the contiguous row j, so the per-column steps touch
    # contiguous memory and the in-block update is one rank-1 BLAS call (addr_)
    WT = weight.detach().to(cdt).t().contiguous()
    WT[dead] = 0
    maskT = torch.ones(k, n, dtype=torch.bool, device=dev)
    total = pruned_per_row(k, s)
    udiag = torch.diagonal(U)

    for a in range(0, k, block_size):
        b = min(k, a + block_size)
        W1 = WT[a:b]                                    # a view: these rows are final after this block
        U1 = U[a:b, a:b]
        d = udiag[a:b]
        dl = d.tolist()
        E1 = torch.empty(b - a, n, dtype=cdt, device=dev)
        M1 = torch.ones(b - a, n, dtype=torch.bool, device=dev)
        if pattern == "unstructured" and total > 0:
            if selection == "row":
                # each row still owes ``total - pruned so far``; rank every remaining
                # column (current weights, current diagonal) and prune this block's share
                sal = (WT[a:].pow(2) / udiag[a:].pow(2).unsqueeze(1)).t()          # (N, K - a)
                owed = total - (~maskT[:a]).sum(0).unsqueeze(1)
                # the rank of each column within its row (one sort; ties: the lower index ranks lower)
                order = torch.sort(sal, dim=1, stable=True).indices
                rank = torch.empty_like(order)
                rank.scatter_(1, order, torch.arange(order.shape[1], device=dev).expand_as(order))
                M1 = (rank[:, :b - a] >= owed).t().contiguous()
            else:
                # the original's rule: one threshold over the whole block (every row), per-row counts vary
                blk = W1.pow(2) / d.pow(2).unsqueeze(1)
                cnt = int(blk.numel() * s)
                if cnt > 0:
                    thr = torch.sort(blk.flatten()).values[cnt - 1]
                    M1 = blk > thr
        for jj in range(b - a):
            if pattern == "2:4" and jj % 4 == 0:
                g = min(4, b - a - jj)
                wg = W1[jj:jj + g].t()
                sal = wg.pow(2) / d[jj:jj + g].pow(2).unsqueeze(0)
                M1[jj:jj + g] = mask_2to4(wg, sal).t()
            w = W1[jj]
            err = E1[jj]
            torch.mul(w, ~M1[jj], out=err)              # w - q: the pruned weights
            err.div_(dl[jj])
            if jj + 1 < b - a:
                W1[jj + 1:].addr_(U1[jj, jj + 1:], err, alpha=-1)
            w.mul_(M1[jj])
        maskT[a:b] = M1
        if b < k:
            WT[b:].addmm_(U[a:b, b:].t(), E1, alpha=-1)
    WT.mul_(maskT)
    return WT.t().to(weight.dtype).contiguous(), maskT.t().contiguous()


def _drop_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask dropping exactly ``count`` lowest scores per row (ties: the higher index is dropped)."""
    n, m = scores.shape
    mask = torch.ones(n, m, dtype=torch.bool, device=scores.device)
    if count > 0:
        order = torch.sort(-scores, dim=1, stable=True).indices
        mask.scatter_(1, order[:, m - count:], False)
    return mask
