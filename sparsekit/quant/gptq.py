"""GPTQ: second-order (optimal brain surgeon) weight quantization, one column at a time.

For a layer ``y = x W^T`` with calibration inputs ``X`` (n rows), the
quantized ``W_hat`` should minimize ``||X W^T - X W_hat^T||^2``, a quadratic
with Hessian ``H = 2 X^T X / n`` shared by every output row.  Columns are
quantized one after the other; after column ``j`` is rounded, its error
``e = (w_j - q_j) / [H^-1]_jj`` is pushed onto the not-yet-quantized columns
(``w_k -= e [H^-1]_jk``), the OBS update restricted to the remaining columns.
The rows of ``H^-1`` restricted to "columns >= j" are exactly the rows of the
upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``) scaled by ``U_jj``,
so one factorization gives every step.  Updates are applied immediately
inside a block of ``block_size`` columns and lazily (one matmul) to the
columns after the block.

As in the original GPTQ (Frantar et al. 2022, reference implementation):

* dead inputs (``diag(H) == 0``, never active in calibration) get
  ``H_jj = 1`` and their weights are set to 0 before anything else, so a
  large weight on an input that never fires neither widens its group's range
  nor costs anything (it multiplies zeros).  A layer whose inputs are all
  dead (``H == 0``: it never ran in calibration) keeps its weights and is
  rounded to nearest (GPTQ then equals RTN) instead of being zeroed;
* dampening ``damp * mean(diag H)`` (mean taken after the dead inputs' 1s);
* ``act_order``: columns are processed by descending ``diag(H)`` (stable
  sort), the most active inputs first;
* dynamic groups (the default, ``static_groups=False``): a group's scale and
  zero are computed from the group's current (error-updated) weights when its
  first column is reached; groups are ``group_size`` consecutive columns *in
  processing order*.  With ``act_order`` the groups are therefore scattered
  over the original columns: the result carries the processing order
  ``perm`` and ``g_idx[c] = rank of c in perm // group_size`` (what GPTQ
  checkpoints with ``desc_act=True`` store as ``g_idx``).
  sparsekit reads the current weights of the whole group, including the
  eager updates made inside the current block; the reference implementation
  reads the group from the block-start copy, which is the same whenever
  ``block_size`` divides ``group_size`` (e.g. the default 128 / 128), and
  makes the result independent of ``block_size`` otherwise;
* static groups (``static_groups=True``): every group's parameters are
  computed up front from the (dead-zeroed) original weights, groups are
  consecutive original columns, and each column uses its own group's
  parameters whatever the processing order.

The codes are returned in the original column order.
"""
from __future__ import annotations

import torch

from .rtn import QuantResult, _check_weight, check_quant_args, grid_params, quantize_codes

__all__ = ["gptq_quantize", "gptq_inverse_factor", "gptq_act_order"]

_TRI_BLOCK = 256


def _tri_inv_lower(L: torch.Tensor) -> torch.Tensor:
    """Inverse of a lower-triangular matrix by 2x2 block recursion (GEMM-rich, ``K^3 / 3`` multiply-adds)."""
    k = L.shape[0]
    if k <= _TRI_BLOCK:
        eye = torch.eye(k, dtype=L.dtype, device=L.device)
        return torch.linalg.solve_triangular(L, eye, upper=False)
    h = k // 2
    ai = _tri_inv_lower(L[:h, :h])
    di = _tri_inv_lower(L[h:, h:])
    out = torch.zeros_like(L)
    out[:h, :h] = ai
    out[h:, h:] = di
    out[h:, :h] = -(di @ (L[h:, :h] @ ai))
    return out


def gptq_inverse_factor(H: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (float64, row-major
    contiguous), and the dead-input mask.

    Inputs whose ``diag(H)`` is 0 (never active in calibration) get ``H_jj = 1``
    (rows and columns otherwise 0), which decouples them; the mean of the
    diagonal is taken after that, as in the original GPTQ.  If the damped
    matrix is still not positive definite (numerically), the dampening is
    multiplied by 10 up to 6 times before a ``ValueError``.

    ``U`` is computed as ``J inv(chol(J H J)) J`` with ``J`` the reversal
    permutation: with ``J H J = L L^T``, ``H^-1 = J L^-T L^-1 J = U^T U`` and
    ``J L^-1 J`` is upper triangular with a positive diagonal.  That is one
    Cholesky and one triangular inverse (``2 K^3 / 3`` multiply-adds) instead
    of a Cholesky, an inverse from it and a second Cholesky.
    """
    H = H.detach().to(torch.float64).clone()
    k = H.shape[0]
    diag = torch.diagonal(H)
    dead = diag <= 0
    if bool(dead.any()):
        H[dead, :] = 0
        H[:, dead] = 0
        H[dead, dead] = 1.0
    mean_diag = float(torch.diagonal(H).mean())
    eye = torch.eye(k, dtype=torch.float64, device=H.device)
    lam = damp * mean_diag
    Hr = H.flip(0, 1)
    for _ in range(7):
        L, info = torch.linalg.cholesky_ex(Hr + lam * eye)
        if int(info) == 0:
            U = _tri_inv_lower(L).flip(0, 1).contiguous()
            if bool(torch.isfinite(U).all()) and bool((torch.diagonal(U) > 0).all()):
                return U, dead
        lam = max(lam * 10, 1e-8 * max(mean_diag, 1.0))
    raise ValueError("H is not positive definite even after dampening; is it a valid X^T X Hessian?")


def gptq_act_order(H: torch.Tensor) -> torch.Tensor:
    """The act-order processing order: input features by descending ``diag(H)`` (stable; dead inputs
    count with ``diag = 1`` as in the original GPTQ), int64 ``(K,)``."""
    d = torch.diagonal(H).detach().to(torch.float64).clone()
    d[d <= 0] = 1.0
    return torch.argsort(d, descending=True, stable=True)


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                  bits: int = 4, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False, static_groups: bool = False) -> QuantResult:
    """GPTQ-quantize a weight ``(N, K)`` given the input Hessian ``H = 2 X^T X / n`` ``(K, K)``.

    ``damp``: ``damp * mean(diag H)`` is added to the diagonal (relative
    dampening, 0.01 is the usual choice).  ``block_size``: columns updated
    eagerly before one lazy matmul updates the rest (speed only; the result
    is the same for every block size up to float rounding).  ``act_order``
    (default False): process columns by descending ``diag(H)``.
    ``static_groups`` (default False, the original's default): group
    parameters from the original weights up front, groups of consecutive
    original columns; False: dynamic groups, computed when reaching a group's
    first column, consecutive in processing order (see the module doc).

    Returns a :class:`QuantResult` with the codes in the original column
    order; with ``act_order`` and dynamic groups (and more than one group per
    row) it carries ``perm`` (the processing order; group ``g`` holds the
    original columns ``perm[g*gs:(g+1)*gs]``), else ``perm`` is None.  The math
    runs in float32 (float64 for a float64 weight) on the weight's device.
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
    for name, v in (("act_order", act_order), ("static_groups", static_groups)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {v!r}")

    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    dev = w.device
    H = H.detach().to(dev, torch.float64)
    ng = k // gs
    dead = torch.diagonal(H) <= 0
    # work on W^T (K, N): column j of W is the contiguous row j
    WT = w.detach().to(dtype).t().contiguous()
    if not bool(dead.all()):
        WT[dead] = 0                                   # dead inputs: weight 0 before any group parameters

    static = None
    if static_groups:
        s0, z0 = grid_params(WT.t().reshape(n, ng, gs), symmetric, bits)       # (N, G)
        static = (s0.t().to(dtype).contiguous(), z0.t().to(dtype).contiguous())  # (G, N)

    if act_order:
        perm = gptq_act_order(H)
        H = H[perm][:, perm]
        WT = WT[perm].contiguous()
        group_of = (perm // gs).tolist()
    else:
        perm = None
        group_of = [j // gs for j in range(k)]
    U, _dead = gptq_inverse_factor(H, damp)
    U = U.to(dtype).contiguous()

    scales_t = torch.empty(ng, n, dtype=torch.float32, device=dev)    # rows: groups (processing order if dynamic)
    zeros_t = torch.empty(ng, n, dtype=torch.float32, device=dev)
    if static is not None:
        scales_t.copy_(static[0])
        zeros_t.copy_(static[1])
    codes_t = torch.empty(k, n, dtype=dtype, device=dev)
    udiag = torch.diagonal(U).tolist()
    s = z = None
    cur_g = -1

    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        W1 = WT[b0:b1]                                  # a view: these rows are final after this block
        E1 = torch.empty(b1 - b0, n, dtype=dtype, device=dev)
        U1 = U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            j = b0 + i
            if static is None:
                if j % gs == 0:
                    # group parameters from the group's current (error-updated) weights
                    g1 = j + gs
                    cur = W1[i:min(g1, b1) - b0]
                    if g1 > b1:
                        # rows past the block still owe this block's pending lazy update
                        rest = torch.addmm(WT[b1:g1], U[b0:j, b1:g1].t(), E1[:i], alpha=-1)
                        cur = torch.cat([cur, rest], dim=0)
                    sg, zg = grid_params(cur.t(), symmetric, bits)
                    scales_t[j // gs] = sg
                    zeros_t[j // gs] = zg
                    s, z = sg.to(dtype), zg.to(dtype)
            else:
                g = group_of[j]
                if g != cur_g:
                    s, z, cur_g = static[0][g], static[1][g], g
            col = W1[i]
            qc = quantize_codes(col, s, z, bits)
            codes_t[j] = qc
            err = E1[i]
            torch.sub(col, (qc - z) * s, out=err)
            err.div_(udiag[j])
            if i + 1 < b1 - b0:
                W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)
        if b1 < k:
            WT[b1:].addmm_(U[b0:b1, b1:].t(), E1, alpha=-1)

    if perm is not None:
        out = torch.empty_like(codes_t)
        out[perm] = codes_t
        codes_t = out
        if ng == 1 or static is not None:
            perm = None          # groups of consecutive original columns: the processing order is not needed
    return QuantResult(q=codes_t.t().to(torch.uint8).contiguous(), scales=scales_t.t().contiguous(),
                       zeros=zeros_t.t().contiguous(), group_size=gs, symmetric=bool(symmetric), bits=bits,
                       perm=perm)
