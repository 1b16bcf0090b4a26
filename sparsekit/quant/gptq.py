"""GPTQ: second-order (optimal brain surgeon) weight quantization, one column at a time.

For a layer ``y = x W^T`` with calibration inputs ``X`` (n rows), the
quantized ``W_hat`` should minimize ``||X W^T - X W_hat^T||^2``, a quadratic
with Hessian ``H = 2 X^T X / n`` shared by every output row.  Columns are
quantized left to right; after column ``j`` is rounded, its error
``e = (w_j - q_j) / [H^-1]_jj`` is pushed onto the not-yet-quantized columns
(``w_k -= e [H^-1]_jk``), the OBS update restricted to the remaining columns.
The rows of ``H^-1`` restricted to "columns >= j" are exactly the rows of the
upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``) scaled by ``U_jj``,
so one factorization gives every step.  Updates are applied immediately
inside a block of ``block_size`` columns and lazily (one matmul) to the
columns after the block.

Grid details (see :mod:`sparsekit.quant.rtn`): group scales/zeros are
computed from the current (already error-updated) weights of a group when
its first column is reached.  With ``act_order=True`` the columns are
processed by descending ``diag(H)``, but groups keep their *original*
membership (consecutive input features, as the packed int4 layout needs):
the group parameters are computed up front from the original weights
("static groups") and each column uses its original group's parameters.
The codes are returned in the original column order.
"""
from __future__ import annotations

import torch

from .rtn import QuantResult, _check_weight, check_quant_args, grid_params, quantize_codes

__all__ = ["gptq_quantize", "gptq_inverse_factor"]


def gptq_inverse_factor(H: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (float64), and the
    dead-input mask.

    Inputs whose ``diag(H)`` is 0 (never active in calibration) get ``H_jj = 1``,
    which decouples them: they are rounded to nearest and push no error onto
    other columns.  If the damped matrix is still not positive definite
    (numerically), the dampening is multiplied by 10 up to 6 times before a
    ``ValueError``.
    """
    H = H.detach().to(torch.float64).clone()
    k = H.shape[0]
    diag = torch.diagonal(H)
    dead = diag <= 0
    if bool(dead.any()):
        H[dead, :] = 0
        H[:, dead] = 0
        H[dead, dead] = 1.0
    mean_diag = float(torch.diagonal(H)[~dead].mean()) if bool((~dead).any()) else 1.0
    eye = torch.eye(k, dtype=torch.float64, device=H.device)
    lam = damp * mean_diag
    for _ in range(7):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0 and bool(torch.isfinite(U).all()):
                return U, dead
        lam = max(lam * 10, 1e-8 * max(mean_diag, 1.0))
    raise ValueError("H is not positive definite even after dampening; is it a valid X^T X Hessian?")


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                  bits: int = 4, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False) -> QuantResult:
    """GPTQ-quantize a weight ``(N, K)`` given the input Hessian ``H = 2 X^T X / n`` ``(K, K)``.

    ``damp``: ``damp * mean(diag H)`` is added to the diagonal (relative
    dampening, 0.01 is the usual choice).  ``block_size``: columns updated
    eagerly before one lazy matmul updates the rest (speed only; the result
    is the same for every block size up to float rounding).  ``act_order``:
    process columns by descending ``diag(H)`` with static (original-order)
    groups, see the module doc.  Returns a :class:`QuantResult` in the
    original column order; the math runs in float32 (float64 for a float64
    weight) on the weight's device.
    """
    w = _check_weight(w)
    n, k = w.shape
    gs = check_quant_args(k, group_size, bits)
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"H must be a torch.Tensor, got {type(H).__name__}")
    if H.shape != (k, k):
        raise ValueError(f"H must be (K, K) = ({k}, {k}) for a weight of shape {tuple(w.shape)}, got {tuple(H.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("H holds non-finite values")
    if not (isinstance(damp, (int, float)) and damp >= 0):
        raise ValueError(f"damp must be a non-negative number, got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")

    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    dev = w.device
    W = w.detach().to(dtype).clone()
    ng = k // gs
    scales = torch.empty(n, ng, dtype=torch.float32, device=dev)
    zeros = torch.empty(n, ng, dtype=torch.float32, device=dev)

    if act_order:
        hd = torch.diagonal(H.to(dev, torch.float64))
        perm = torch.argsort(hd, descending=True, stable=True)
        # static groups: parameters from the original weights, original group membership
        s0, z0 = grid_params(W.reshape(n, ng, gs), symmetric, bits)
        scales.copy_(s0)
        zeros.copy_(z0)
        # the OBS updates follow the processing order: factor the permuted Hessian
        U, _dead = gptq_inverse_factor(H.to(dev)[perm][:, perm], damp)
        W = W[:, perm].contiguous()
        group_of = (perm // gs).to(dev)
    else:
        perm = None
        U, _dead = gptq_inverse_factor(H.to(dev), damp)
        group_of = torch.arange(k, device=dev) // gs
    U = U.to(dtype)
    codes = torch.empty(n, k, dtype=dtype, device=dev)

    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        W1 = W[:, b0:b1].clone()
        E1 = torch.zeros(n, b1 - b0, dtype=dtype, device=dev)
        U1 = U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            j = b0 + i
            if not act_order and j % gs == 0:
                # group parameters from the group's current (error-updated) weights
                g1 = j + gs
                cur = W1[:, i:min(g1, b1) - b0]
                if g1 > b1:
                    # columns past the block still owe this block's pending lazy update
                    rest = W[:, b1:g1] - E1[:, :i] @ U[b0:j, b1:g1]
                    cur = torch.cat([cur, rest], dim=1)
                s, z = grid_params(cur, symmetric, bits)
                scales[:, j // gs] = s
                zeros[:, j // gs] = z
            g = int(group_of[j])
            s = scales[:, g]
            z = zeros[:, g]
            col = W1[:, i]
            qc = quantize_codes(col, s, z, bits)
            codes[:, j] = qc
            deq = (qc - z.to(dtype)) * s.to(dtype)
            err = (col - deq) / U1[i, i]
            E1[:, i] = err
            if i + 1 < b1 - b0:
                W1[:, i + 1:] -= err.unsqueeze(1) * U1[i, i + 1:].unsqueeze(0)
        if b1 < k:
            W[:, b1:] -= E1 @ U[b0:b1, b1:]

    if perm is not None:
        out = torch.empty_like(codes)
        out[:, perm] = codes
        codes = out
    return QuantResult(q=codes.to(torch.uint8), scales=scales, zeros=zeros, group_size=gs,
                       symmetric=bool(symmetric), bits=bits)
