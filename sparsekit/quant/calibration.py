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

from ..prune.calibration import resolve_layers, split_batch
from .awq import awq_search
from .gptq import gptq_quantize
from .rtn import QuantResult, check_quant_args, rtn_quantize

__all__ = ["QUANT_METHODS", "collect_linear_inputs", "linear_forward_order", "quantize_model_weights"]

QUANT_METHODS = ("rtn", "gptq", "awq")


def _device(model: nn.Module, layers: Mapping[str, nn.Linear]):
    try:
        return next(model.parameters()).device
    except StopIteration:
        return next(iter(layers.values())).weight.device


def _check_max_rows(max_rows):
    if max_rows is None:
        return None
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be None or a positive int, got {max_rows!r}")
    return max_rows


def collect_linear_inputs(model: nn.Module, layers: Union[Mapping[str, nn.Linear], list, None],
                          calib_loader: Iterable, max_rows: Optional[int] = None,
                          progress: bool = True) -> dict:
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
    error.  A tqdm bar shows the batches (``progress=False`` hides it).
    """
    layers = resolve_layers(model, layers)
    max_rows = _check_max_rows(max_rows)
    names = list(layers)
    dev = _device(model, layers)
    acc = {}
    for nme, mod in layers.items():
        k = mod.in_features
        wd = mod.weight.device
        acc[nme] = {"xtx": torch.zeros(k, k, dtype=torch.float64, device=wd),
                    "abs": torch.zeros(k, dtype=torch.float64, device=wd), "n": 0}

    def make_hook(name):
        def hook(mod, inputs):
            a = acc[name]
            if max_rows is not None and a["n"] >= max_rows:
                return None
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if max_rows is not None:
                x = x[: max_rows - a["n"]]
            x = x.to(a["xtx"].device, torch.float64)
            a["xtx"].addmm_(x.T, x)
            a["abs"] += x.abs().sum(0)
            a["n"] += int(x.shape[0])
            return None
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = []
    num_batches = 0
    try:
        model.eval()
        for nme in names:
            handles.append(layers[nme].register_forward_pre_hook(make_hook(nme)))
        from tqdm.auto import tqdm

        total = len(calib_loader) if hasattr(calib_loader, "__len__") else None
        with torch.no_grad():
            for batch in tqdm(calib_loader, desc="calibration", unit="batch", total=total, disable=not progress):
                model(split_batch(batch).to(dev))
                num_batches += 1
                if max_rows is not None and all(acc[nme]["n"] >= max_rows for nme in names):
                    break
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.train(t)
    if num_batches == 0:
        raise ValueError("calib_loader yielded no batches")

    out = {}
    for nme in names:
        a = acc[nme]
        n = a["n"]
        d = float(max(n, 1))
        out[nme] = {"H": a["xtx"].mul_(2.0 / d), "mean_abs": a["abs"].div_(d), "n": n}
    return out


def linear_forward_order(model: nn.Module, layers: Mapping[str, nn.Linear], batch) -> list:
    """Names of ``layers`` in the order of their first call in a forward of ``batch``;
    layers that did not run follow in their given order."""
    order = []
    seen = set()

    def make_hook(name):
        def hook(mod, inputs):
            if name not in seen:
                seen.add(name)
                order.append(name)
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        model.eval()
        for nme, mod in layers.items():
            handles.append(mod.register_forward_pre_hook(make_hook(nme)))
        with torch.no_grad():
            model(split_batch(batch).to(_device(model, layers)))
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.train(t)
    return order + [nme for nme in layers if nme not in seen]


def quantize_model_weights(model: nn.Module, calib_loader: Optional[Iterable], method: str = "rtn",
                           group_size: int = 128, symmetric: bool = False, bits: int = 4,
                           layers: Union[Mapping[str, nn.Linear], list, None] = None,
                           max_rows: Optional[int] = None, progress: bool = True,
                           damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                           grid: int = 20) -> dict:
    """Quantize a model's linear weights in place (fake-quantized) and return ``{name: QuantResult}``.

    ``method``: ``"rtn"`` (no calibration; ``calib_loader`` may be None),
    ``"gptq"`` (``damp``, ``block_size``, ``act_order`` as in
    :func:`~sparsekit.quant.gptq_quantize`) or ``"awq"`` (``grid`` as in
    :func:`~sparsekit.quant.awq_search`; results carry ``input_scale``).
    ``layers``: as in :func:`collect_linear_inputs` (default every
    ``nn.Linear``).

    Sequential: the layers are visited in forward order (found with the first
    calibration batch); for each, its inputs are collected over the whole
    ``calib_loader`` with the current model, in which every earlier layer
    already holds its fake-quantized weight, then it is quantized and its
    weight overwritten with the dequantized values (for AWQ with
    ``Q(W s) / s``).  Only one layer's statistics live at a time, at the cost
    of one calibration pass per layer.  Biases, other parameters and module
    modes are left as they were.  A tqdm bar shows the layers.
    """
    if method not in QUANT_METHODS:
        raise ValueError(f"unknown quantization method {method!r}; known: {QUANT_METHODS}")
    layers = resolve_layers(model, layers)
    for nme, mod in layers.items():
        try:
            check_quant_args(mod.in_features, group_size, bits)
        except ValueError as e:
            raise ValueError(f"layer {nme!r}: {e}") from None
    max_rows = _check_max_rows(max_rows)

    if method == "rtn":
        order = list(layers)
    else:
        if calib_loader is None:
            raise ValueError(f"method {method!r} needs a calib_loader")
        first = None
        for batch in calib_loader:
            first = batch
            break
        if first is None:
            raise ValueError("calib_loader yielded no batches")
        order = linear_forward_order(model, layers, first)

    from tqdm.auto import tqdm

    results = {}
    for nme in tqdm(order, desc=f"quantize ({method})", unit="layer", disable=not progress):
        mod = layers[nme]
        w = mod.weight.detach()
        if method == "rtn":
            res = rtn_quantize(w, group_size, symmetric, bits)
            w_new = res.dequantize()
        else:
            stats = collect_linear_inputs(model, {nme: mod}, calib_loader, max_rows=max_rows, progress=False)[nme]
            if method == "gptq":
                res = gptq_quantize(w, stats["H"], group_size, symmetric, bits, damp=damp,
                                    block_size=block_size, act_order=act_order)
                w_new = res.dequantize()
            else:
                _, res = awq_search(w, stats, group_size, symmetric, bits, grid=grid)
                w_new = res.effective_weight()
            del stats
        with torch.no_grad():
            mod.weight.copy_(w_new.to(mod.weight.device, mod.weight.dtype))
        results[nme] = res
    return results
