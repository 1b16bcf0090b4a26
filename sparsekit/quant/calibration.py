"""Calibration for the quantizers: per-layer input Hessians, and sequential model quantization.

:func:`collect_linear_inputs` runs a model over calibration batches and
accumulates, per ``nn.Linear``, what GPTQ and AWQ need from the layer's
inputs: ``H = 2 X^T X / n`` and ``mean |x_j|``.  :func:`quantize_model_weights`
quantizes a model's linears one at a time in forward order, each layer
calibrated on the outputs of the already-quantized layers before it.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Union

import torch
from torch import nn

from ..calibration import accumulate_inputs, forward_groups, resolve_layers, sequential
from .awq import awq_search
from .gptq import gptq_quantize
from .rtn import check_quant_args, rtn_quantize

__all__ = ["QUANT_METHODS", "collect_linear_inputs", "linear_forward_order", "quantize_model_weights"]

QUANT_METHODS = ("rtn", "gptq", "awq")


def _finish(acc: dict) -> dict:
    """Raw sums (sparsekit.calibration) -> the quantizers' statistics."""
    n = acc["n"]
    d = float(max(n, 1))
    return {"H": acc["xtx"].mul_(2.0 / d), "mean_abs": acc["sumabs"].div_(d), "n": n}


def collect_linear_inputs(model: nn.Module, layers: Union[Mapping[str, nn.Linear], list, None],
                          calib_loader: Iterable, max_rows: Optional[int] = None,
                          progress: bool = True, process_group=None) -> dict:
    """Input statistics of linear layers over calibration batches.

    ``layers``: ``{name: nn.Linear}``, a list of qualified names, or None for
    every ``nn.Linear`` of the model.  ``calib_loader`` yields input tensors
    or ``(x, y, ...)`` tuples (``x`` is fed to the model).  Inputs of any rank
    ``(..., K)`` are flattened to rows; every call of a layer in a forward
    counts.  ``max_rows``: stop accumulating a layer after this many rows
    (the loop ends early once every layer has them).

    Returns ``{name: {"H": (K, K) float64 = 2 X^T X / n, "mean_abs": (K,)
    float64 = mean_i |X_ij|, "n": rows}}`` on each layer's device.  A layer
    that never ran has ``n = 0`` and zero statistics (GPTQ then degenerates
    to round-to-nearest).  The model runs in eval mode under ``no_grad``;
    module modes are restored and the hooks removed afterwards, even on
    error (shared plumbing: :mod:`sparsekit.calibration`).  A tqdm bar shows
    the batches (``progress=False`` hides it).  ``process_group``: each rank passes its
    own share of the batches and the raw sums are added over the group
    (:mod:`sparsekit.distributed.calibration`); every rank gets the statistics of
    the union.
    """
    from ..distributed.calibration import calibration_group

    layers = resolve_layers(model, layers)
    with calibration_group(process_group):
        acc = accumulate_inputs(model, layers, calib_loader, stats=("xtx", "sumabs"), max_rows=max_rows,
                                progress=progress)
    return {n: _finish(acc[n]) for n in layers}


def resolve_quant_layers(model: nn.Module, layers, group_size: int, bits: int) -> dict:
    """:func:`sparsekit.calibration.resolve_layers`, then every layer checked against ``group_size`` /
    ``bits`` (a ValueError naming the layer)."""
    layers = resolve_layers(model, layers)
    for nme, mod in layers.items():
        try:
            check_quant_args(mod.in_features, group_size, bits)
        except ValueError as e:
            raise ValueError(f"layer {nme!r}: {e}") from None
    return layers


def linear_forward_order(model: nn.Module, layers: Mapping[str, nn.Linear], batch) -> list:
    """Names of ``layers`` in the order of their first call in a forward of ``batch``;
    layers that did not run follow in their given order."""
    groups, counts = forward_groups(model, layers, batch)
    order = [n for g in groups for n in g]
    return order + [n for n in layers if counts[n] == 0]


def quantize_model_weights(model: nn.Module, calib_loader: Optional[Iterable], method: str = "rtn",
                           group_size: int = 128, symmetric: bool = False, bits: int = 4,
                           layers: Union[Mapping[str, nn.Linear], list, None] = None,
                           max_rows: Optional[int] = None, progress: bool = True,
                           damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                           grid: int = 20, published: bool = True, fold: bool = True,
                           auto_clip: bool = True, report: Optional[dict] = None, process_group=None) -> dict:
    """Quantize a model's linear weights in place (fake-quantized) and return ``{name: QuantResult}``.

    ``method``: ``"rtn"`` (no calibration; ``calib_loader`` may be None),
    ``"gptq"`` (``damp``, ``block_size``, ``act_order`` as in
    :func:`~sparsekit.quant.gptq_quantize`) or ``"awq"`` (``grid`` as in
    :func:`~sparsekit.quant.awq_search`; results carry ``input_scale``).
    ``layers``: as in :func:`collect_linear_inputs` (default every
    ``nn.Linear``).

    AWQ: ``published=True`` (default) runs AWQ as published,
    :func:`~sparsekit.quant.awq_quantize_model_`: sibling layers share one
    scale searched on their module's output, ``fold`` folds it into the
    producing norm / linear where the adapter table allows (those producers'
    weights change, the float function does not; the other layers keep a
    run-time ``input_scale``), ``auto_clip`` searches clipping ranges;
    statistics come from the float model (not sequential), ``max_rows`` caps
    the rows cached per group and ``report`` (a dict) receives the groups and
    the layers that kept an ``input_scale``.  ``published=False``: one scale
    per layer, searched on the layer's own output from ``X^T X``, sequential as
    below (``fold`` / ``auto_clip`` do not apply).

    Sequential (:func:`sparsekit.calibration.sequential`): the layers are
    visited in forward order (found with the first calibration batch); for
    each, its inputs are collected over the whole ``calib_loader`` with the
    current model, in which every earlier layer already holds its
    fake-quantized weight, then it is quantized and its weight overwritten
    with the dequantized values (for AWQ with ``Q(W s) / s``).  Layers that
    read the same input tensor (q/k/v) share one calibration pass, and each
    pass stops once its layers have run; only one group's statistics live at
    a time.  Layers that never run are quantized last from zero statistics
    (GPTQ then equals RTN).  Biases, other parameters and module modes are
    left as they were.  A tqdm bar shows the layer groups.  ``process_group``: distributed
    calibration, as in :func:`collect_linear_inputs`.
    """
    if method not in QUANT_METHODS:
        raise ValueError(f"unknown quantization method {method!r}; known: {QUANT_METHODS}")
    layers = resolve_quant_layers(model, layers, group_size, bits)
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be None or a positive int, got {max_rows!r}")

    if method == "awq" and published:
        if calib_loader is None:
            raise ValueError(f"method {method!r} needs a calib_loader")
        if process_group is not None:
            raise ValueError("AWQ as published (published=True) searches on each module's cached inputs in one "
                             "process; distributed calibration supports the per-layer AWQ search "
                             "(published=False), GPTQ and RTN")
        from .awq_model import awq_quantize_model_

        return awq_quantize_model_(model, calib_loader, group_size, symmetric, bits, layers=layers, grid=grid,
                                   fold=fold, auto_clip=auto_clip, max_rows=max_rows, progress=progress,
                                   report=report)
    results = {}

    def process(nme, mod, acc):
        w = mod.weight.detach()
        if method == "rtn":
            res = rtn_quantize(w, group_size, symmetric, bits)
            w_new = res.dequantize()
        else:
            stats = _finish(acc)
            if method == "gptq":
                res = gptq_quantize(w, stats["H"], group_size, symmetric, bits, damp=damp,
                                    block_size=block_size, act_order=act_order)
                w_new = res.dequantize()
            else:
                _, res = awq_search(w, stats, group_size, symmetric, bits, grid=grid)
                w_new = res.effective_weight()
        with torch.no_grad():
            mod.weight.copy_(w_new.to(mod.weight.device, mod.weight.dtype))
        results[nme] = res

    if method == "rtn":
        from tqdm.auto import tqdm

        for nme in tqdm(list(layers), desc="quantize (rtn)", unit="layer", disable=not progress):
            process(nme, layers[nme], None)
        return results
    if calib_loader is None:
        raise ValueError(f"method {method!r} needs a calib_loader")
    from ..distributed.calibration import calibration_group

    with calibration_group(process_group):
        sequential(model, layers, calib_loader, process, stats=("xtx", "sumabs"), max_rows=max_rows,
                   progress=progress, desc=f"quantize ({method})", missing="zeros")
    return results
