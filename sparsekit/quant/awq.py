"""Activation-aware per-input-channel scaling before group quantization (AWQ-style).

Input channels with large activations matter more for the output.  Scaling
column ``j`` of the weight by ``s_j > 1`` before quantization shrinks its
relative rounding error; the input is divided by the same ``s_j`` so the
float product is unchanged: ``x W^T = (x / s) (W s)^T``.  The search tries
``s = mean|x_j| ** alpha`` for ``alpha`` on a grid in ``[0, 1]`` (normalized
to geometric mean ~1, i.e. divided by ``sqrt(max(s) * min(s))``), quantizes
``W s`` with the round-to-nearest grid and keeps the ``alpha`` whose output
error ``||X W^T - (X / s) Q(W s)^T||`` on the calibration inputs is
smallest.  ``alpha = 0`` (``s = 1``) is plain RTN, so the result is never
worse than RTN on the calibration data.

Using the result: the returned :class:`~sparsekit.quant.QuantResult` holds
the quantization of ``W s`` and ``input_scale = s``.  sparsekit assumes the
inference module divides its input by ``s`` at runtime (an option of the
quantized linear), or that the user folds ``1/s`` into the previous op
(a norm's weight, a preceding linear's output rows).  For evaluation or a
fake-quantized float model, ``QuantResult.effective_weight()`` (=
:func:`awq_effective_weight`) is the plain weight ``Q(W s) / s``.
"""
from __future__ import annotations

from typing import Mapping, Union

import torch

from .rtn import QuantResult, _check_weight, check_quant_args, grid_params, quantize_codes, rtn_quantize

__all__ = ["awq_search", "awq_effective_weight"]


def awq_effective_weight(res: QuantResult) -> torch.Tensor:
    """``Q(W s) / s`` as float32 ``(N, K)``: the weight that multiplies unscaled inputs."""
    return res.effective_weight()


def _stats(x_stats_or_inputs, k: int, dev, forward_dtype=None) -> tuple:
    """``(mean|x_j| (K,) float64, G = X^T X (K, K) float64 (up to a positive factor), X or None)``.

    With raw inputs of fewer rows than ``K`` and a ``forward_dtype``, ``G`` is None and the rows
    ``X`` come back in that dtype: the error is then evaluated by a forward (``n K N`` multiply-adds
    per grid point instead of ``N K^2``)."""
    if isinstance(x_stats_or_inputs, torch.Tensor):
        x = x_stats_or_inputs
        if x.dim() < 2 or x.shape[-1] != k:
            raise ValueError(f"calibration inputs must be (..., K={k}), got shape {tuple(x.shape)}")
        x = x.detach().reshape(-1, k)
        if x.shape[0] == 0:
            raise ValueError("calibration inputs hold no rows")
        mean_abs = x.to(dev, torch.float64).abs().mean(0)
        if forward_dtype is not None and x.shape[0] < k:
            return mean_abs, None, x.to(dev, forward_dtype)
        x = x.to(dev, torch.float64)
        return mean_abs, x.T @ x, None
    if isinstance(x_stats_or_inputs, Mapping):
        try:
            mean_abs, H = x_stats_or_inputs["mean_abs"], x_stats_or_inputs["H"]
        except KeyError:
            raise ValueError("calibration stats must hold 'mean_abs' (K,) and 'H' (K, K) "
                             "(see collect_linear_inputs)") from None
        mean_abs = torch.as_tensor(mean_abs).to(dev, torch.float64)
        H = torch.as_tensor(H).to(dev, torch.float64)
        if mean_abs.shape != (k,) or H.shape != (k, k):
            raise ValueError(f"stats shapes must be mean_abs ({k},) and H ({k}, {k}), got "
                             f"{tuple(mean_abs.shape)} and {tuple(H.shape)}")
        return mean_abs, H, None
    raise TypeError("x_stats_or_inputs must be a tensor of calibration inputs (..., K) or a dict with "
                    f"'mean_abs' and 'H', got {type(x_stats_or_inputs).__name__}")


def awq_search(w: torch.Tensor, x_stats_or_inputs: Union[torch.Tensor, Mapping], group_size: int = 128,
               symmetric: bool = False, bits: int = 4, grid: int = 20,
               return_info: bool = False):
    """Search the AWQ input-channel scale of a weight ``(N, K)``.

    ``x_stats_or_inputs``: calibration inputs of the layer ``(..., K)``, or a
    stats dict with ``"mean_abs"`` ``(K,)`` and ``"H"`` ``(K, K)`` (any
    positive multiple of ``X^T X``, e.g. one entry of
    :func:`~sparsekit.quant.collect_linear_inputs`); the output error
    ``||X D^T||^2 = trace(D X^T X D^T)`` is evaluated from ``X^T X``, or, for
    raw inputs with fewer rows than ``K``, as ``||X D^T||^2`` by a forward in
    the weight's compute dtype (float32, or float64 for a float64 weight;
    the sum of squares in float64), which is cheaper.
    ``grid``: ``alpha`` takes the ``grid + 1`` values ``0, 1/grid, ..., 1``.

    Returns ``(s, result)``: ``s`` float32 ``(K,)``; ``result`` the
    RTN quantization of ``W * s`` with ``result.input_scale = s``.  With
    ``return_info=True`` also a dict ``{"alphas", "errors", "alpha"}``
    (errors are relative: ``||X (W - W_eff)^T|| / ||X W^T||``).
    """
    w = _check_weight(w)
    n, k = w.shape
    check_quant_args(k, group_size, bits)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    dev = w.device
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    mean_abs, G, X = _stats(x_stats_or_inputs, k, dev, forward_dtype=cdt)
    # the difference W - W_eff: float64 for the X^T X form, the compute dtype for the forward
    edt = torch.float64 if X is None else cdt
    We = w.detach().to(edt)

    def sq_err(D):
        if X is not None:
            # per-row norms in the compute dtype (one output buffer reused), their squares summed in float64
            torch.mm(X, D.t(), out=ybuf)
            return float(torch.linalg.vector_norm(ybuf, dim=1).to(torch.float64).square().sum())
        return float(torch.einsum("nk,kl,nl->", D, G, D).clamp_min(0.0))

    ybuf = torch.empty(X.shape[0], n, dtype=edt, device=dev) if X is not None else None
    ref = sq_err(We)
    ref = ref if ref > 0 else 1.0

    # channels that never fired would get s -> 0; floor them at a small fraction of the largest
    m = mean_abs.clamp_min(0.0)
    mmax = float(m.max())
    m = m.clamp_min(mmax * 1e-4) if mmax > 0 else torch.ones_like(m)

    alphas = [i / grid for i in range(grid + 1)]
    errors = []
    best = None
    gs = check_quant_args(k, group_size, bits)
    maxq = (1 << bits) - 1
    # W s rounded to float32: for a weight of at most float32 precision the float32 product is the
    # correctly rounded exact product, the same as the float64 product rounded to float32
    wsrc = w.detach().to(torch.float64) if w.dtype == torch.float64 else w.detach().float()

    def scaled(s32, out=None):
        if wsrc.dtype == torch.float64:
            return (wsrc * s32.to(torch.float64)).float()
        return torch.mul(wsrc, s32, out=out)

    wsb = torch.empty(n, k, dtype=torch.float32, device=dev)      # W s, reused per grid point
    t = torch.empty(n, k, dtype=torch.float32, device=dev)        # Q(W s) / s, then W - Q(W s) / s
    tg = t.view(n, k // gs, gs)
    for a in alphas:
        s = m.pow(a)
        s = s / torch.sqrt(s.max() * s.min())
        s32 = s.to(torch.float32)
        ws = scaled(s32, out=wsb)
        # rtn_quantize(ws).effective_weight() in place (the same float32 operations as quantize_codes
        # and the dequantization), without a result object per grid point
        wg = ws.view(n, k // gs, gs)
        sc, z = grid_params(wg, symmetric, bits)
        scu, zu = sc.unsqueeze(-1), z.unsqueeze(-1)
        torch.div(wg, scu, out=tg)
        tg.round_().add_(zu).clamp_(0, maxq).sub_(zu).mul_(scu)
        t.div_(s32)
        if edt == torch.float32:
            err = sq_err(torch.sub(We, t, out=t))
        else:
            err = sq_err(We - t.to(edt))
        rel = (err / ref) ** 0.5
        errors.append(rel)
        if best is None or rel < best[0]:
            best = (rel, a, s32)
    del wsb, t, ybuf
    _, alpha, s = best
    ws = scaled(s)
    res = rtn_quantize(ws, group_size, symmetric, bits)
    res.input_scale = s
    if return_info:
        return s, res, {"alphas": alphas, "errors": errors, "alpha": alpha}
    return s, res
