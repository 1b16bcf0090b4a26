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

from ..calibration import accumulate_inputs, reiterable, resolve_layers, sequential
from .sparsegpt import sparsegpt_prune
from .wanda import check_pattern, magnitude_mask, wanda_mask

__all__ = ["METHODS", "collect_layer_inputs", "prune_model_"]

METHODS = ("magnitude", "wanda", "sparsegpt", "moe_pruner")


def _finish(acc: dict, hessian: bool) -> dict:
    """Raw sums (sparsekit.calibration) -> the pruners' statistics."""
    n = acc["n"]
    st = {"input_norm": acc["sumsq"].sqrt(), "num_rows": n}
    if hessian:
        st["hessian"] = acc["xtx"].mul_(2.0 / n)
    return st


def collect_layer_inputs(model: nn.Module, layers, calib_loader: Iterable, progress: bool = True,
                         hessian: bool = True) -> dict:
    """Input statistics of the given ``nn.Linear`` layers over ``calib_loader``.

    ``layers``: ``{name: nn.Linear}``, a list of qualified names, or None (every
    ``nn.Linear``).  ``calib_loader`` yields input tensors or ``(x, y, ...)``
    tuples (``x`` is fed to the model).  Returns ``{name: stats}`` with

    * ``"hessian"``: ``(K, K)`` float64, ``2 X^T X / n`` (omitted with ``hessian=False``);
    * ``"input_norm"``: ``(K,)`` float64, ``||X_j||_2`` over all rows;
    * ``"num_rows"``: ``n``, the number of input rows (tokens) seen.

    The forward runs in eval mode under ``torch.no_grad()``; the hooks are
    removed and every module's train/eval mode restored afterwards, also on
    error (shared plumbing: :mod:`sparsekit.calibration`).  A layer that never
    ran raises a ValueError.
    """
    layers = resolve_layers(model, layers)
    acc = accumulate_inputs(model, layers, calib_loader, stats=("xtx", "sumsq") if hessian else ("sumsq",),
                            progress=progress)
    out = {}
    for n in layers:
        if acc[n]["n"] == 0:
            raise ValueError(f"layer {n!r} did not run in the model's forward over the calibration data")
        out[n] = _finish(acc[n], hessian)
    return out


def prune_model_(model: nn.Module, calib_loader: Iterable | None = None, method: str = "sparsegpt",
                 pattern: str = "2:4", sparsity: float = 0.5, layers=None, progress: bool = True,
                 block_size: int = 128, damp: float = 0.01, process_group=None, split_layers=None) -> dict:
    """Prune the model's ``nn.Linear`` weights in place, layer by layer; returns ``{name: keep-mask}``.

    ``method``: ``"magnitude"`` (``|W|``, needs no data), ``"wanda"`` (``|W| * ||X_j||``,
    :func:`sparsekit.prune.wanda_mask`) or ``"sparsegpt"`` (mask and OBS weight
    compensation, :func:`sparsekit.prune.sparsegpt_prune` with ``block_size``, ``damp``) or
    ``"moe_pruner"`` (mixture-of-experts models: router-weighted expert statistics, the dense layers by
    Wanda, one calibration pass; :func:`sparsekit.prune.prune_moe_`, whose report -- a dict of masks
    with per-expert token counts -- is returned; ``layers`` then names the dense layers).
    ``pattern``: ``"2:4"`` or ``"unstructured"`` (``floor(sparsity * K)`` pruned per row).
    ``layers``: as in :func:`collect_layer_inputs`.  ``calib_loader`` must be
    re-iterable (a list or DataLoader; a generator is materialized once): it
    is replayed once per group of layers, with earlier layers already pruned
    (:func:`sparsekit.calibration.sequential`; layers reading the same input
    tensor share one pass, and each pass stops once the group has run).

    Pruned weights become exact zeros; each mask can rebuild a compressed
    module, e.g. ``SparseLinear.from_dense(linear, mask=masks[name])`` for 2:4.

    ``process_group`` (a ``torch.distributed`` group or 1-D ``DeviceMesh``): distributed
    calibration -- every rank calls ``prune_model_`` with the same model and arguments and its
    own share of the calibration batches (at least one); the input statistics are summed over
    the group (:mod:`sparsekit.distributed.calibration`), so every rank prunes as one process
    would on the union of the shares.  ``split_layers``: each rank solves only its share of
    the layers of every sequential group (layer ``i`` on rank ``i % world``) and the owners
    broadcast the new weights and masks (:mod:`sparsekit.distributed.split`); the result is the
    same.  None (default): on with a process group for SparseGPT, off for Wanda (whose mask
    costs less than its broadcast).  ``"magnitude"`` needs no data and no communication;
    ``"moe_pruner"`` does not take a process group (``ValueError``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; supported: {METHODS}")
    s = check_pattern(pattern, sparsity)
    if process_group is not None and method == "moe_pruner":
        raise ValueError("method 'moe_pruner' does not support distributed calibration (process_group=): its "
                         "router-weighted expert statistics are gathered in one process; the distributed "
                         "methods are 'wanda', 'sparsegpt' and 'magnitude'")
    from ..distributed.calibration import calibration_group
    from ..distributed.split import LayerSplit, split_enabled

    with calibration_group(process_group) as group:
        split = split_enabled(split_layers, group, [method])
    if method == "moe_pruner":
        from .moe import prune_moe_
        return prune_moe_(model, calib_loader, sparsity=s, pattern=pattern, dense_layers=layers, progress=progress)
    layers = resolve_layers(model, layers)
    masks = {}
    if method == "magnitude":
        with torch.no_grad():
            for name, lin in layers.items():
                m = magnitude_mask(lin.weight, pattern, s)
                lin.weight.mul_(m.to(lin.weight.dtype))
                masks[name] = m
        return masks

    calib_loader = reiterable(calib_loader)
    hess = method == "sparsegpt"

    def solve(name, lin, acc):
        st = _finish(acc, hess)
        with torch.no_grad():
            if method == "wanda":
                m = wanda_mask(lin.weight, st["input_norm"], pattern, s)
                lin.weight.mul_(m.to(lin.weight.dtype))
            else:
                w, m = sparsegpt_prune(lin.weight, st["hessian"], pattern, s, block_size=block_size, damp=damp)
                lin.weight.copy_(w)
        return m

    def store(name, m):
        masks[name] = m

    splitter = LayerSplit(group, solve, store) if split else None

    def process(name, lin, acc):
        if splitter is not None:
            splitter.submit(name, lin, acc)
        else:
            store(name, solve(name, lin, acc))

    try:
        with calibration_group(group):
            sequential(model, layers, calib_loader, process, stats=("xtx", "sumsq") if hess else ("sumsq",),
                       progress=progress, desc=f"{method} {pattern}", missing="error")
            if splitter is not None:
                splitter.flush()
    finally:
        if splitter is not None:
            splitter.discard()
    return masks
