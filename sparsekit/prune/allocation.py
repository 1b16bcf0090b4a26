"""Per-layer block sparsity by rate-distortion allocation.

Each prunable layer ``i`` gets a distortion curve ``D_i(s)`` (how much the
model output moves when only that layer is block-pruned to sparsity ``s``,
measured on calibration inputs) and a cost curve ``C_i(s)`` (kept FLOPs,
parameters or measured latency).  Assuming distortions add across layers, the
allocation minimizes ``sum_i D_i(s_i)`` subject to ``sum_i C_i(s_i) <= budget``,
either with an equal-slope Lagrangian search (:func:`allocate_equal_slope`) or
exactly, on integer-discretized costs, by dynamic programming
(:func:`allocate_dp`).  :func:`allocate_block_sparsity` runs the whole
pipeline and then refines the grid solution to single blocks so that the
global budget is met within one block per layer; :func:`apply_block_masks`
zeroes the pruned blocks of the dense weights.
"""
from __future__ import annotations

import heapq
import math
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .block import (SCORE_METHODS, block_cost, block_grid, block_mask_from_scores, block_scores,
                    check_block_size, expand_block_mask, keep_count)
from ..calibration import model_input
from .calibration import collect_layer_stats, model_output, resolve_layers, split_batch

__all__ = [
    "DEFAULT_SPARSITIES", "make_score_fn", "distortion_curves", "layer_costs", "allocate_equal_slope",
    "allocate_dp", "allocate_block_sparsity", "apply_block_masks",
]

# levels at which each layer's distortion is measured: 0, 5%, ..., 95%
DEFAULT_SPARSITIES = tuple(round(i / 20, 2) for i in range(20))
COST_KINDS = ("flops", "params", "latency")


# --------------------------------------------------------------------------- helpers
def _batches(calib_inputs) -> list:
    """Calibration inputs as a list of model-input tensors (iterated many times)."""
    if isinstance(calib_inputs, torch.Tensor):
        return [calib_inputs]
    try:
        out = [split_batch(b) for b in calib_inputs]
    except TypeError as e:
        raise TypeError(f"calib_inputs must be a tensor or an iterable of batches: {e}") from None
    if not out:
        raise ValueError("calib_inputs holds no batches")
    return out


def _check_sparsities(sparsities) -> list:
    try:
        out = [float(s) for s in sparsities]
    except TypeError:
        raise TypeError("sparsities must be a sequence of numbers") from None
    if not out:
        raise ValueError("sparsities is empty")
    for s in out:
        if not (0.0 <= s <= 1.0):
            raise ValueError(f"sparsities must lie in [0, 1], got {s}")
    return out


def make_score_fn(method: str, block_size, stats: Optional[Mapping] = None) -> Callable:
    """``score_fn(name, layer) -> (NB, KB)`` block scores for ``method``.

    ``"magnitude"`` needs nothing; ``"taylor1"``/``"taylor2"`` need ``stats``
    from :func:`~sparsekit.prune.collect_layer_stats` and use the mean batch
    gradient ``grad / num_batches`` and the collected Fisher diagonal.
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"unknown score method {method!r}; known: {SCORE_METHODS}")
    bs = check_block_size(block_size)
    if method != "magnitude" and stats is None:
        raise ValueError(f"score {method!r} needs calibration stats (sparsekit.prune.collect_layer_stats)")

    def score_fn(name: str, layer: nn.Linear) -> torch.Tensor:
        if method == "magnitude":
            return block_scores(layer.weight, bs, "magnitude")
        if name not in stats:
            raise ValueError(f"no calibration stats for layer {name!r}")
        st = stats[name]
        grad = st["grad"] / max(1, int(st.get("num_batches", 1)))
        return block_scores(layer.weight, bs, method, grad=grad, fisher=st.get("fisher"))

    return score_fn


def _resolve_score_fn(score_fn, block_size) -> Callable:
    if isinstance(score_fn, str):
        return make_score_fn(score_fn, block_size)
    if not callable(score_fn):
        raise TypeError(f"score_fn must be a callable(name, layer) -> scores or a method name, got {type(score_fn).__name__}")
    return score_fn


def _scores_for(score_fn, name: str, layer: nn.Linear, block_size) -> torch.Tensor:
    s = score_fn(name, layer)
    grid = block_grid(layer.weight.shape, block_size)
    if not isinstance(s, torch.Tensor) or tuple(s.shape) != grid:
        got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise ValueError(f"score_fn returned {got} for layer {name!r}; expected a tensor of the block grid {grid}")
    return s


@torch.no_grad()
def _forward_all(model: nn.Module, batches: list) -> list:
    return [model_output(model(model_input(x, model))).detach().to(torch.float64) for x in batches]


# --------------------------------------------------------------------------- distortion and cost curves
def distortion_curves(model: nn.Module, layers, calib_inputs, sparsities: Sequence[float], block_size,
                      score_fn: Union[str, Callable] = "magnitude", progress: bool = True) -> dict:
    """``{name: [D(s) for s in sparsities]}``: output distortion per layer and level.

    For each layer and sparsity only that layer is pruned: its block mask is
    ``block_mask_from_scores(score_fn(name, layer), s)`` and the pruned blocks
    of its weight are zeroed in place, then restored bit-exactly.  ``D`` is
    the mean squared difference between the model output and the dense
    model's output over every output element of every calibration batch (the
    model runs in eval mode, which is restored afterwards).  ``calib_inputs``
    is a tensor or an iterable of batches (tensors or ``(x, y)`` tuples);
    ``layers`` as in :func:`~sparsekit.prune.collect_layer_stats`.
    """
    layers = resolve_layers(model, layers)
    levels = _check_sparsities(sparsities)
    bs = check_block_size(block_size)
    score_fn = _resolve_score_fn(score_fn, bs)
    batches = _batches(calib_inputs)
    modes = {m: m.training for m in model.modules()}
    from tqdm.auto import tqdm

    curves = {}
    try:
        model.eval()
        ref = _forward_all(model, batches)
        total = sum(r.numel() for r in ref)
        bar = tqdm(total=len(layers) * len(levels), desc="distortion", unit="eval", disable=not progress)
        for name, layer in layers.items():
            scores = _scores_for(score_fn, name, layer, bs)
            w = layer.weight
            saved = w.detach().clone()
            row = []
            try:
                for s in levels:
                    if keep_count(scores.numel(), s) == scores.numel():
                        row.append(0.0)
                        bar.update(1)
                        continue
                    mask = expand_block_mask(block_mask_from_scores(scores, s), w.shape, bs)
                    with torch.no_grad():
                        w.mul_(mask.to(device=w.device, dtype=w.dtype))
                    outs = _forward_all(model, batches)
                    with torch.no_grad():
                        w.copy_(saved)
                    err = sum(float((o - r).pow(2).sum()) for o, r in zip(outs, ref))
                    row.append(err / total)
                    bar.update(1)
            finally:
                with torch.no_grad():
                    w.copy_(saved)
            curves[name] = row
        bar.close()
    finally:
        for m, t in modes.items():
            m.train(t)
    return curves


def _cost_grid(layer: nn.Linear, block_size, kind: str, m, latency_table, dtype) -> torch.Tensor:
    shape = layer.weight.shape
    if kind == "latency":
        if latency_table is None:
            raise ValueError("cost='latency' needs latency_table= (dict or JSON path)")
        return block_cost(shape, block_size, latency_table=latency_table, dtype=dtype)
    if kind == "params":
        return block_cost(shape, block_size, m=0.5)
    return block_cost(shape, block_size, m=m)


def _cumulative_costs(cost_grid: torch.Tensor, scores: Optional[torch.Tensor]) -> np.ndarray:
    """``cum[k]``: cost of the ``k`` blocks kept first (score order, as the masks keep them)."""
    c = cost_grid.flatten().to(torch.float64)
    if scores is not None:
        order = torch.sort(scores.detach().to(torch.float64).flatten().cpu(), descending=True, stable=True).indices
        c = c[order]
    else:
        # no scores: every block counts the layer's mean block cost
        c = torch.full_like(c, float(c.mean()))
    return np.concatenate([[0.0], np.cumsum(c.numpy())])


def layer_costs(layers: Mapping[str, nn.Linear], sparsities: Sequence[float], block_size, m=1,
                cost: str = "flops", latency_table=None, dtype=torch.float16,
                scores: Optional[Mapping[str, torch.Tensor]] = None) -> dict:
    """``{name: [C(s) for s in sparsities]}``: the kept cost of each layer at each level.

    The layer keeps ``keep_count(nblocks, s)`` blocks; a kept block costs
    :func:`~sparsekit.prune.block_cost`: ``cost="flops"`` (``2 * m * rows *
    cols`` of its real entries; ``m`` an int or ``{name: m}``), ``"params"``
    (its element count) or ``"latency"`` (microseconds from ``latency_table``
    for ``(block_size, dtype)``).  With ``scores`` (``{name: (NB, KB)}``) the
    cost is that of the exact blocks the mask would keep (edge blocks are
    cheaper); without, each kept block counts the layer's mean block cost.
    """
    if cost not in COST_KINDS:
        raise ValueError(f"unknown cost {cost!r}; known: {COST_KINDS}")
    levels = _check_sparsities(sparsities)
    bs = check_block_size(block_size)
    out = {}
    for name, layer in layers.items():
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"layer {name!r} must be an nn.Linear, got {type(layer).__name__}")
        mi = m[name] if isinstance(m, Mapping) else m
        grid = _cost_grid(layer, bs, cost, mi, latency_table, dtype)
        sc = None if scores is None else scores[name]
        cum = _cumulative_costs(grid, sc)
        nb = grid.numel()
        out[name] = [float(cum[keep_count(nb, s)]) for s in levels]
    return out


# --------------------------------------------------------------------------- allocation
def _check_curves(curves: Mapping, costs: Mapping) -> tuple:
    if not isinstance(curves, Mapping) or not isinstance(costs, Mapping):
        raise TypeError("curves and costs must be dicts name -> list of floats")
    if list(curves) != list(costs) and set(curves) != set(costs):
        raise ValueError(f"curves and costs must have the same layers, got {sorted(curves)} vs {sorted(costs)}")
    if not curves:
        raise ValueError("curves is empty")
    names = list(curves)
    D, C = [], []
    for n in names:
        d = np.asarray(curves[n], dtype=np.float64)
        c = np.asarray(costs[n], dtype=np.float64)
        if d.ndim != 1 or d.size == 0 or d.shape != c.shape:
            raise ValueError(f"layer {n!r}: distortion and cost lists must be non-empty and of equal length, "
                             f"got {d.shape} and {c.shape}")
        if not (np.isfinite(d).all() and np.isfinite(c).all()):
            raise ValueError(f"layer {n!r}: non-finite distortion or cost")
        if (c < 0).any():
            raise ValueError(f"layer {n!r}: costs must be >= 0")
        D.append(d)
        C.append(c)
    return names, D, C


def _result(names, idx, sparsities):
    if sparsities is None:
        return {n: int(i) for n, i in zip(names, idx)}
    levels = _check_sparsities(sparsities)
    return {n: levels[int(i)] for n, i in zip(names, idx)}


def _feasibility(C, budget) -> float:
    budget = float(budget)
    if not math.isfinite(budget):
        raise ValueError(f"budget must be finite, got {budget}")
    cmin = sum(float(c.min()) for c in C)
    if cmin > budget * (1 + 1e-12) + 1e-300:
        raise ValueError(f"budget {budget:.6g} is below the smallest reachable total cost {cmin:.6g}; "
                         f"add higher sparsity levels or raise the budget")
    return budget


def allocate_equal_slope(curves: Mapping[str, Sequence[float]], costs: Mapping[str, Sequence[float]],
                         budget: float, sparsities: Optional[Sequence[float]] = None, iters: int = 200) -> dict:
    """Equal-slope (Lagrangian) allocation by bisection on ``lambda``.

    For a multiplier ``lambda >= 0`` each layer independently picks the level
    minimizing ``D_i(s) + lambda * C_i(s)`` (ties: the cheaper level, then the
    lower index); the total cost is non-increasing in ``lambda``.  The search
    returns the choice at the smallest ``lambda`` (to bisection precision)
    whose total cost is ``<= budget``.  Such points lie on each layer's lower
    convex hull, so the total cost is the largest one reachable on the hulls
    without exceeding the budget; it can fall short of the budget (exact
    equality is generally impossible on a discrete grid) and is never better
    than :func:`allocate_dp`'s optimum.

    Returns ``{name: sparsities[level]}``, or ``{name: level index}`` when
    ``sparsities`` is omitted.  ``ValueError`` when even the cheapest levels
    exceed the budget.
    """
    names, D, C = _check_curves(curves, costs)
    budget = _feasibility(C, budget)
    tol = budget * 1e-12

    def pick(lam: float) -> list:
        idx = []
        for d, c in zip(D, C):
            v = d + lam * c
            vmin = v.min()
            cand = np.flatnonzero(v <= vmin + 1e-12 * max(1.0, abs(vmin)))
            idx.append(int(cand[np.argmin(c[cand])]))
        return idx

    def total(idx) -> float:
        return sum(float(c[i]) for c, i in zip(C, idx))

    best = pick(0.0)
    if total(best) <= budget + tol:
        return _result(names, best, sparsities)
    # above every pairwise slope each layer picks its cheapest level
    hi = 1.0
    for d, c in zip(D, C):
        dc = np.abs(c[:, None] - c[None, :])
        dd = np.abs(d[:, None] - d[None, :])
        pos = dc > 0
        if pos.any():
            hi = max(hi, float((dd[pos] / dc[pos]).max()) * 2.0 + 1.0)
    lo = 0.0
    for _ in range(int(iters)):
        mid = 0.5 * (lo + hi)
        if total(pick(mid)) <= budget + tol:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-15 * hi:
            break
    return _result(names, pick(hi), sparsities)


def allocate_dp(curves: Mapping[str, Sequence[float]], costs: Mapping[str, Sequence[float]], budget: float,
                resolution: int = 1000, sparsities: Optional[Sequence[float]] = None) -> dict:
    """Minimize ``sum_i D_i(s_i)`` subject to ``sum_i C_i(s_i) <= budget`` by dynamic programming.

    Each layer's cheapest level is its baseline; the costs above the
    baselines are discretized to integer units of ``u = (budget - sum of
    baselines) / resolution``, rounded *up*, so every solution of the
    discretized problem also meets the real budget.  The DP over layers x
    ``resolution + 1`` capacities is exact for that discretized problem
    (distortions assumed additive); with integer costs and ``resolution`` equal
    to the budget above the baselines it is exact, full stop.  Among equal
    distortions the cheaper total wins.

    Returns ``{name: sparsities[level]}``, or ``{name: level index}`` when
    ``sparsities`` is omitted.  ``ValueError`` when even the cheapest levels
    exceed the budget.
    """
    names, D, C = _check_curves(curves, costs)
    budget = _feasibility(C, budget)
    if isinstance(resolution, bool) or int(resolution) != resolution or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    R = int(resolution)
    base = [float(c.min()) for c in C]
    spare = budget - sum(base)
    if spare <= 0:
        # only the cheapest levels fit: the least distortion among them
        idx = []
        for d, c in zip(D, C):
            cand = np.flatnonzero(c <= c.min())
            idx.append(int(cand[np.argmin(d[cand])]))
        return _result(names, idx, sparsities)
    unit = spare / R
    INF = math.inf
    dp = np.full(R + 1, INF)
    dp[0] = 0.0
    choices = []
    for d, c, b in zip(D, C, base):
        w = np.ceil((c - b) / unit - 1e-9).astype(np.int64)
        w = np.maximum(w, 0)
        new = np.full(R + 1, INF)
        arg = np.full(R + 1, -1, dtype=np.int64)
        for j in range(d.size):
            if w[j] > R:
                continue
            cand = np.full(R + 1, INF)
            cand[w[j]:] = dp[: R + 1 - w[j]] + d[j]
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
        choices.append((arg, w))
    finite = np.flatnonzero(np.isfinite(dp))
    cap = int(finite[np.argmin(dp[finite])])  # argmin takes the lowest capacity on ties
    idx = [0] * len(names)
    for i in range(len(names) - 1, -1, -1):
        arg, w = choices[i]
        j = int(arg[cap])
        idx[i] = j
        cap -= int(w[j])
    return _result(names, idx, sparsities)


# --------------------------------------------------------------------------- the pipeline
@torch.no_grad()
def _rows_per_batch(model: nn.Module, layers: Mapping[str, nn.Linear], batches: list) -> dict:
    """Average number of input rows (tokens x batch) each layer sees per calibration batch."""
    rows = {n: 0 for n in layers}
    hooks = []
    for n, mod in layers.items():
        def hook(mod, inputs, out, n=n):
            rows[n] += inputs[0].numel() // max(1, inputs[0].shape[-1])
        hooks.append(mod.register_forward_hook(hook))
    try:
        _forward_all(model, batches)
    finally:
        for h in hooks:
            h.remove()
    return {n: max(1.0, r / len(batches)) for n, r in rows.items()}


def _fill_to_budget(names, nb, k0, cum, levels_k, curves_k, budget) -> list:
    """Add single blocks (in score order) until no layer's next block fits the budget.

    ``curves_k[i]`` maps kept-block counts ``levels_k[i]`` to distortion; the
    marginal gain of a block is read off the piecewise-linear interpolation
    between measured levels, and blocks go first to the best gain per unit cost.
    """
    k = list(k0)
    spent = sum(cum[i][k[i]] for i in range(len(names)))
    slack = budget - spent
    eps = 1e-12 * max(1.0, abs(budget))

    def segment(i):
        """(slope, end) of the interpolation segment starting at k[i]."""
        ks, ds = levels_k[i], curves_k[i]
        j = int(np.searchsorted(ks, k[i], side="right"))
        if j >= len(ks):
            return None
        lo = j - 1
        d_lo = ds[lo] + (ds[j] - ds[lo]) * (k[i] - ks[lo]) / (ks[j] - ks[lo]) if lo >= 0 else ds[j]
        dc = cum[i][ks[j]] - cum[i][k[i]]
        gain = (d_lo - ds[j]) / dc if dc > 0 else math.inf
        return gain, int(ks[j])

    heap = []
    for i in range(len(names)):
        seg = segment(i)
        if seg is not None:
            heapq.heappush(heap, (-seg[0], i, seg[1]))
    while heap:
        _, i, end = heapq.heappop(heap)
        # the most blocks of this segment the slack still pays for
        limit = cum[i][k[i]] + slack + eps
        reach = int(np.searchsorted(cum[i], limit, side="right")) - 1
        new_k = min(end, reach)
        if new_k <= k[i]:
            continue  # its next block does not fit: this layer is done
        slack -= cum[i][new_k] - cum[i][k[i]]
        k[i] = new_k
        if new_k == end:
            seg = segment(i)
            if seg is not None:
                heapq.heappush(heap, (-seg[0], i, seg[1]))
    return k


def allocate_block_sparsity(model: nn.Module, calib_inputs, target_density: float, block_size,
                            method: str = "dp", score: Union[str, Callable] = "magnitude",
                            sparsities: Sequence[float] = DEFAULT_SPARSITIES, layers=None, cost: str = "flops",
                            latency_table=None, dtype=torch.float16, m=None, stats: Optional[Mapping] = None,
                            resolution: int = 1000, progress: bool = True, return_info: bool = False):
    """Per-layer block sparsities meeting a global budget with least output distortion.

    ``target_density`` is the kept fraction of the prunable cost summed over
    ``layers`` (default: every ``nn.Linear``): FLOPs (``cost="flops"``, each
    layer weighted by the rows ``m`` it sees per batch, measured on the
    calibration inputs unless given), parameters (``"params"``) or latency
    (``"latency"`` with ``latency_table``, see :func:`~sparsekit.prune.block_cost`).

    Steps: block scores (``score``: a method name, for Taylor scores with
    ``stats`` from :func:`~sparsekit.prune.collect_layer_stats` (collected on
    ``calib_inputs`` when omitted), or a ``score_fn(name, layer)``);
    :func:`distortion_curves` on the ``sparsities`` grid; exact per-level
    costs of the blocks each mask keeps; :func:`allocate_dp` (``method="dp"``)
    or :func:`allocate_equal_slope` on the grid; then a refinement to single
    blocks: starting from the grid solution, blocks are added one at a time
    (in score order, best interpolated distortion drop per unit cost first)
    while they fit.  The realized kept cost therefore never exceeds the
    target and falls short of it by less than the next block of any layer
    not yet dense, i.e. the budget is met within one block per layer (as
    long as the target is reachable on the grid).

    Returns ``{name: sparsity}`` with ``sparsity = 1 - k / nblocks`` for the
    chosen kept-block count ``k`` (so :func:`apply_block_masks`, using
    :func:`~sparsekit.prune.keep_count`, keeps exactly ``k`` blocks).  With
    ``return_info=True`` returns ``(allocation, info)``; ``info`` holds the
    ``curves``, ``costs``, ``grid_allocation``, ``kept_blocks``, ``nblocks``,
    ``target_cost``, ``realized_cost``, ``total_cost`` and ``max_block_cost``
    (per layer).
    """
    if method not in ("dp", "equal_slope"):
        raise ValueError(f"method must be 'dp' or 'equal_slope', got {method!r}")
    if cost not in COST_KINDS:
        raise ValueError(f"unknown cost {cost!r}; known: {COST_KINDS}")
    td = float(target_density)
    if not (0.0 <= td <= 1.0):
        raise ValueError(f"target_density must be in [0, 1], got {target_density!r}")
    bs = check_block_size(block_size)
    layers = resolve_layers(model, layers)
    levels = _check_sparsities(sparsities)
    batches = _batches(calib_inputs)
    names = list(layers)

    if isinstance(score, str):
        if score not in SCORE_METHODS:
            raise ValueError(f"unknown score {score!r}; known: {SCORE_METHODS}")
        if score != "magnitude" and stats is None:
            stats = collect_layer_stats(model, layers, batches, progress=progress)
        score_fn = make_score_fn(score, bs, stats)
    else:
        score_fn = _resolve_score_fn(score, bs)

    if cost == "flops" and m is None:
        m = _rows_per_batch(model, layers, batches)
    elif m is None:
        m = 1
    scores = {n: _scores_for(score_fn, n, layers[n], bs) for n in names}
    grids = {n: _cost_grid(layers[n], bs, cost, m[n] if isinstance(m, Mapping) else m, latency_table, dtype)
             for n in names}
    cum = [_cumulative_costs(grids[n], scores[n]) for n in names]
    nb = [grids[n].numel() for n in names]
    total_cost = float(sum(c[-1] for c in cum))
    budget = td * total_cost

    costs = {n: [float(cum[i][keep_count(nb[i], s)]) for s in levels] for i, n in enumerate(names)}
    curves = distortion_curves(model, layers, batches, levels, bs, score_fn, progress=progress)
    if method == "dp":
        grid_idx = allocate_dp(curves, costs, budget, resolution=resolution)
    else:
        grid_idx = allocate_equal_slope(curves, costs, budget)

    k0, levels_k, curves_k = [], [], []
    for i, n in enumerate(names):
        k0.append(keep_count(nb[i], levels[grid_idx[n]]))
        # distortion as a function of kept blocks; dense (k = nblocks) is exact, D = 0
        pts = {nb[i]: 0.0}
        for s, d in zip(levels, curves[n]):
            kk = keep_count(nb[i], s)
            pts[kk] = min(d, pts.get(kk, math.inf)) if kk != nb[i] else 0.0
        ks = sorted(pts)
        levels_k.append(np.asarray(ks, dtype=np.int64))
        curves_k.append(np.asarray([pts[kk] for kk in ks], dtype=np.float64))
    kept = _fill_to_budget(names, nb, k0, cum, levels_k, curves_k, budget)

    alloc = {n: 1.0 - kept[i] / nb[i] for i, n in enumerate(names)}
    if not return_info:
        return alloc
    info = {
        "curves": curves,
        "costs": costs,
        "sparsities": levels,
        "grid_allocation": {n: levels[grid_idx[n]] for n in names},
        "kept_blocks": dict(zip(names, kept)),
        "nblocks": dict(zip(names, nb)),
        "target_cost": budget,
        "realized_cost": float(sum(cum[i][kept[i]] for i in range(len(names)))),
        "total_cost": total_cost,
        "max_block_cost": {n: float(grids[n].max()) for n in names},
    }
    return alloc, info


@torch.no_grad()
def apply_block_masks(model: nn.Module, allocation: Mapping[str, float], block_size,
                      score_fn: Union[str, Callable] = "magnitude") -> dict:
    """Zero the pruned blocks of each allocated layer's dense weight, in place.

    ``allocation`` maps qualified layer names to sparsities; each layer keeps
    ``keep_count(nblocks, sparsity)`` blocks, the top ones by
    ``score_fn(name, layer)`` (or a method name, see :func:`make_score_fn`).
    Returns ``{name: (NB, KB) bool block mask}`` for building block-sparse
    weights.
    """
    if not isinstance(allocation, Mapping):
        raise TypeError(f"allocation must be a dict name -> sparsity, got {type(allocation).__name__}")
    bs = check_block_size(block_size)
    score_fn = _resolve_score_fn(score_fn, bs)
    layers = resolve_layers(model, list(allocation))
    # scores of every layer first, so pruning one layer cannot change another's
    scores = {n: _scores_for(score_fn, n, layers[n], bs) for n in layers}
    masks = {}
    for name, layer in layers.items():
        bmask = block_mask_from_scores(scores[name], float(allocation[name]))
        w = layer.weight
        w.mul_(expand_block_mask(bmask, w.shape, bs).to(device=w.device, dtype=w.dtype))
        masks[name] = bmask
    return masks
