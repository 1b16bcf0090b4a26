"""Sequential, layer-by-layer calibration and pruning of a whole model.

:func:`collect_layer_inputs` runs the model over a calibration loader and
accumulates, per ``nn.Linear``, the statistics of its inputs (every row of the
input, leading dims flattened): the Hessian ``H = 2 X^T X / n`` (float64) that
SparseGPT needs and the per-feature norm ``||X_j||_2`` that Wanda needs.

:func:`prune_model_` prunes the model's linear layers in forward order.  The
inputs of each layer are collected with all earlier layers already pruned, so
later layers compensate for (Wanda: are scored on) what the network actually
feeds them after pruning.  Only one group of layers' statistics is alive at a
time; layers that read the very same input tensor (e.g. the query, key and
value projections of an attention block) form one group and share one pass.
Each pass stops the forward as soon as the group's layers have run.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .calibration import resolve_layers, split_batch
from .sparsegpt import sparsegpt_prune
from .wanda import check_pattern, magnitude_mask, wanda_mask

__all__ = ["METHODS", "collect_layer_inputs", "prune_model_"]

METHODS = ("magnitude", "wanda", "sparsegpt")


class _StopForward(Exception):
    """Raised from a hook to end a calibration forward early."""


def _reiterable(calib_loader):
    if calib_loader is None:
        raise TypeError("calib_loader must be an iterable of batches, got None")
    try:
        it = iter(calib_loader)
    except TypeError:
        raise TypeError(f"calib_loader must be an iterable of batches, got {type(calib_loader).__name__}") from None
    # a one-shot iterator (generator) is materialized so that it can be replayed per layer group
    return list(it) if it is calib_loader else calib_loader


def _device(model: nn.Module, mods) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return mods[0].weight.device


def collect_layer_inputs(model: nn.Module, layers, calib_loader: Iterable, progress: bool = True,
                         hessian: bool = True, _stop_after: dict | None = None) -> dict:
    """Input statistics of the given ``nn.Linear`` layers over ``calib_loader``.

    ``layers``: ``{name: nn.Linear}``, a list of qualified names, or None (every
    ``nn.Linear``).  ``calib_loader`` yields input tensors or ``(x, y, ...)``
    tuples (``x`` is fed to the model).  Returns ``{name: stats}`` with

    * ``"hessian"``: ``(K, K)`` float64, ``2 X^T X / n`` (omitted with ``hessian=False``);
    * ``"input_norm"``: ``(K,)`` float64, ``||X_j||_2`` over all rows;
    * ``"num_rows"``: ``n``, the number of input rows (tokens) seen.

    The forward runs in eval mode under ``torch.no_grad()``; the hooks are
    removed and every module's train/eval mode restored afterwards, also on
    error.  A layer that never ran raises a ValueError.
    """
    layers = resolve_layers(model, layers)
    names = list(layers)
    mods = [layers[n] for n in names]
    dev = _device(model, mods)
    sums = {}
    sq = {}
    rows = {n: 0 for n in names}
    calls = {n: 0 for n in names}
    for n, m in layers.items():
        kin = m.in_features
        wdev = m.weight.device
        if hessian:
            sums[n] = torch.zeros(kin, kin, dtype=torch.float64, device=wdev)
        sq[n] = torch.zeros(kin, dtype=torch.float64, device=wdev)

    def make_hook(name):
        def hook(mod, inputs):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(device=sq[name].device, dtype=torch.float64)
            if hessian:
                sums[name].addmm_(x.t(), x)
            sq[name] += x.pow(2).sum(0)
            rows[name] += x.shape[0]
            calls[name] += 1
            if _stop_after is not None and all(calls[k] >= c for k, c in _stop_after.items()):
                raise _StopForward
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = []
    num_batches = 0
    try:
        model.eval()
        for n, mod in zip(names, mods):
            handles.append(mod.register_forward_pre_hook(make_hook(n)))
        from tqdm.auto import tqdm

        total = len(calib_loader) if hasattr(calib_loader, "__len__") else None
        with torch.no_grad():
            for batch in tqdm(calib_loader, desc="calibration", unit="batch", total=total,
                              disable=not progress, leave=False):
                x = split_batch(batch).to(dev)
                if _stop_after is not None:
                    for k in calls:
                        calls[k] = 0
                try:
                    model(x)
                except _StopForward:
                    pass
                num_batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.train(t)
    if num_batches == 0:
        raise ValueError("calib_loader yielded no batches")
    out = {}
    for n in names:
        if rows[n] == 0:
            raise ValueError(f"layer {n!r} did not run in the model's forward over the calibration data")
        st = {"input_norm": sq[n].sqrt(), "num_rows": rows[n]}
        if hessian:
            st["hessian"] = sums[n].mul_(2.0 / rows[n])
        out[n] = st
    return out


def _forward_groups(model: nn.Module, layers: dict, batch, dev) -> tuple:
    """Layers grouped by shared input, in the order of their first call, and each layer's call count
    (from one forward over ``batch``)."""
    order = []        # (name, input tensor) per first call
    counts = {n: 0 for n in layers}

    def make_hook(name):
        def hook(mod, inputs):
            if counts[name] == 0:
                order.append((name, inputs[0]))
            counts[name] += 1
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        model.eval()
        for n, mod in layers.items():
            handles.append(mod.register_forward_pre_hook(make_hook(n)))
        with torch.no_grad():
            model(split_batch(batch).to(dev))
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.train(t)
    missing = [n for n in layers if counts[n] == 0]
    if missing:
        raise ValueError(f"layers {missing} did not run in the model's forward over the calibration data")
    groups = []
    for name, x in order:
        if groups and groups[-1][1] is x:
            groups[-1][0].append(name)
        else:
            groups.append(([name], x))
    return [g for g, _ in groups], counts


def prune_model_(model: nn.Module, calib_loader: Iterable | None = None, method: str = "sparsegpt",
                 pattern: str = "2:4", sparsity: float = 0.5, layers=None, progress: bool = True,
                 block_size: int = 128, damp: float = 0.01) -> dict:
    """Prune the model's ``nn.Linear`` weights in place, layer by layer; returns ``{name: keep-mask}``.

    ``method``: ``"magnitude"`` (``|W|``, needs no data), ``"wanda"`` (``|W| * ||X_j||``,
    :func:`sparsekit.prune.wanda_mask`) or ``"sparsegpt"`` (mask and OBS weight
    compensation, :func:`sparsekit.prune.sparsegpt_prune` with ``block_size``, ``damp``).
    ``pattern``: ``"2:4"`` or ``"unstructured"`` (``floor(sparsity * K)`` pruned per row).
    ``layers``: as in :func:`collect_layer_inputs`.  ``calib_loader`` must be
    re-iterable (a list or DataLoader; a generator is materialized once): it
    is replayed once per group of layers, with earlier layers already pruned.

    Pruned weights become exact zeros; each mask can rebuild a compressed
    module, e.g. ``SparseLinear.from_dense(linear, mask=masks[name])`` for 2:4.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; supported: {METHODS}")
    s = check_pattern(pattern, sparsity)
    layers = resolve_layers(model, layers)
    masks = {}
    if method == "magnitude":
        with torch.no_grad():
            for name, lin in layers.items():
                m = magnitude_mask(lin.weight, pattern, s)
                lin.weight.mul_(m.to(lin.weight.dtype))
                masks[name] = m
        return masks

    calib_loader = _reiterable(calib_loader)
    first = next(iter(calib_loader), None)
    if first is None:
        raise ValueError("calib_loader yielded no batches")
    dev = _device(model, list(layers.values()))
    groups, counts = _forward_groups(model, layers, first, dev)
    from tqdm.auto import tqdm

    for group in tqdm(groups, desc=f"{method} {pattern}", unit="group", disable=not progress):
        stats = collect_layer_inputs(model, {n: layers[n] for n in group}, calib_loader, progress=progress,
                                     hessian=(method == "sparsegpt"),
                                     _stop_after={n: counts[n] for n in group})
        with torch.no_grad():
            for name in group:
                lin = layers[name]
                st = stats.pop(name)
                if method == "wanda":
                    m = wanda_mask(lin.weight, st["input_norm"], pattern, s)
                    lin.weight.mul_(m.to(lin.weight.dtype))
                else:
                    w, m = sparsegpt_prune(lin.weight, st["hessian"], pattern, s, block_size=block_size, damp=damp)
                    lin.weight.copy_(w)
                masks[name] = m
                del st
        del stats
    return masks
