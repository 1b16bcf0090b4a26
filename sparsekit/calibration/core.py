"""Calibration plumbing shared by the pruners and the quantizers.

Every calibration-based algorithm in sparsekit (Wanda, SparseGPT, GPTQ, AWQ,
the block-pruning scores) needs the same machinery: pick a model's linear
layers, run the model over a calibration loader with hooks on those layers,
accumulate statistics of each layer's inputs, and -- for the sequential
(layer-by-layer) algorithms -- revisit the layers in forward order with the
earlier layers already compressed.  This module is that machinery:

* :func:`resolve_layers`, :func:`split_batch`, :func:`reiterable`: argument handling;
* :func:`hooked`: a context manager that registers hooks, puts the model in
  eval mode, and always removes the hooks and restores every module's mode;
* :func:`forward_groups`: the layers in the order of their first call, grouped
  when they read the very same input tensor (e.g. q/k/v projections);
* :func:`accumulate_inputs`: raw sums over every input row of each layer
  (``X^T X``, ``sum x^2``, ``sum |x|``, row count), memory-bounded, with an
  optional row cap and an early stop of each forward once the layers of
  interest have run;
* :func:`sequential`: the layer-by-layer driver: for each group, collect its
  inputs over the whole loader with the current (partly compressed) model and
  hand each layer its statistics to a callback.

Statistics are float64 on each layer's weight device.  Only one group's
statistics are alive at a time.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["resolve_layers", "split_batch", "reiterable", "model_device", "model_dtype", "model_input", "hooked", "first_calls", "forward_groups",
           "InputAccumulator", "zero_stats", "accumulate_inputs", "sequential", "StopForward", "STATS",
           "set_xtx_dtype", "set_xtx_fold_rows"]

# statistics accumulate_inputs can gather: "xtx" (K, K) = X^T X, "sumsq" (K,) = sum_i x_ij^2,
# "sumabs" (K,) = sum_i |x_ij|; "n" (rows) is always there
STATS = ("xtx", "sumsq", "sumabs")


def resolve_layers(model: nn.Module, layers=None) -> dict:
    """``{name: nn.Linear}`` from ``layers``: None (every ``nn.Linear`` of the
    model, by qualified name), a dict, or a list of qualified names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if layers is None:
        out = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
        if not out:
            raise ValueError("model has no nn.Linear layers to prune")
        return out
    if isinstance(layers, Mapping):
        items = list(layers.items())
    elif isinstance(layers, (list, tuple)):
        items = []
        for name in layers:
            if not isinstance(name, str):
                raise TypeError(f"layer names must be strings, got {type(name).__name__}")
            try:
                items.append((name, model.get_submodule(name)))
            except AttributeError:
                raise ValueError(f"model has no submodule named {name!r}") from None
    else:
        raise TypeError(f"layers must be None, a dict name -> nn.Linear or a list of names, got {type(layers).__name__}")
    if not items:
        raise ValueError("layers is empty")
    for name, mod in items:
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"layer {name!r} must be an nn.Linear, got {type(mod).__name__}")
    return dict(items)


def first_tensor(obj, error: str) -> torch.Tensor:
    """``obj`` if it is a tensor, else the first item of a tuple/list starting with one; else
    ``TypeError(f"{error}, got <type>")``."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return obj[0]
    raise TypeError(f"{error}, got {type(obj).__name__}")


def split_batch(batch):
    """The model input of a calibration batch: the batch itself, or ``x`` of an ``(x, y, ...)`` tuple."""
    return first_tensor(batch, "calibration batches must be tensors or (x, y) tuples")


def reiterable(calib_loader):
    """``calib_loader`` if it can be iterated more than once, else its batches as a list.

    A one-shot iterator (a generator) is materialized so that the sequential
    algorithms can replay it once per layer group.
    """
    if calib_loader is None:
        raise TypeError("calib_loader must be an iterable of batches, got None")
    try:
        it = iter(calib_loader)
    except TypeError:
        raise TypeError(f"calib_loader must be an iterable of batches, got {type(calib_loader).__name__}") from None
    return list(it) if it is calib_loader else calib_loader


def model_device(model: nn.Module, layers: Mapping[str, nn.Module]) -> torch.device:
    """Where the model's inputs go: its first parameter's device (else the first layer's weight)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return next(iter(layers.values())).weight.device


def model_dtype(model: nn.Module, layers: Mapping[str, nn.Module]) -> Optional[torch.dtype]:
    """The floating-point dtype of the model's inputs: its first floating-point parameter's (else the
    first layer's weight's); None if it has neither."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    for mod in layers.values():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            return w.dtype
    return None


def model_input(batch, model: nn.Module, layers: Mapping[str, nn.Module] = None, dev=None):
    """The model input of a calibration batch on the model's device; a floating-point input is cast to
    the model's dtype (:func:`model_dtype`), so float32 batches calibrate a float16/bfloat16 model.
    Integer inputs (token ids) keep their dtype."""
    layers = {} if layers is None else layers
    x = split_batch(batch)
    x = x.to(dev if dev is not None else model_device(model, layers))
    if x.is_floating_point():
        dt = model_dtype(model, layers)
        if dt is not None and x.dtype != dt:
            x = x.to(dt)
    return x


@contextlib.contextmanager
def hooked(model: nn.Module, layers: Mapping[str, nn.Module], make_hook: Callable[[str], Callable],
           kind: str = "pre"):
    """Register ``make_hook(name)`` on each layer (``kind``: ``"pre"`` forward-pre
    hooks ``hook(mod, inputs)``, ``"post"`` forward hooks ``hook(mod, inputs, out)``)
    and put the model in eval mode; on exit, even on error, remove the hooks and
    restore every module's train/eval mode."""
    if kind not in ("pre", "post"):
        raise ValueError(f"kind must be 'pre' or 'post', got {kind!r}")
    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        model.eval()
        for name, mod in layers.items():
            hook = make_hook(name)
            handles.append(mod.register_forward_pre_hook(hook) if kind == "pre" else mod.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.train(t)


class StopForward(Exception):
    """Raised from a hook to end a calibration forward early (the calibration loops catch it)."""


_StopForward = StopForward  # the earlier private name


def first_calls(root: nn.Module, layers: Mapping[str, nn.Module], run: Callable[[], object]) -> tuple[list, dict]:
    """``(groups, counts)`` from one forward done by ``run()`` (hooks on ``layers``, ``root`` in eval mode,
    under ``no_grad``; a :class:`StopForward` raised inside ends the forward quietly).

    ``groups``: lists of layer names in the order of their first call; layers
    whose first call read the very same input tensor as the previous layer's
    share a group.  ``counts``: calls per layer in that forward (0 for a layer
    that did not run; such layers are in no group).
    """
    order = []        # (name, input tensor) per first call
    counts = {n: 0 for n in layers}

    def make_hook(name):
        def hook(mod, inputs):
            if counts[name] == 0:
                order.append((name, inputs[0]))
            counts[name] += 1
        return hook

    with hooked(root, layers, make_hook), torch.no_grad():
        try:
            run()
        except StopForward:
            pass
    groups = []
    for name, x in order:
        if groups and groups[-1][1] is x:
            groups[-1][0].append(name)
        else:
            groups.append(([name], x))
    return [g for g, _ in groups], counts


def forward_groups(model: nn.Module, layers: Mapping[str, nn.Module], batch) -> tuple[list, dict]:
    """``(groups, counts)`` from one forward over ``batch`` (see :func:`first_calls`).

    ``groups``: lists of layer names in the order of their first call; layers
    whose first call read the very same input tensor as the previous layer's
    share a group.  ``counts``: calls per layer in that forward (0 for a layer
    that did not run; such layers are in no group).
    """
    return first_calls(model, layers, lambda: model(model_input(batch, model, layers)))


def _check_stats(stats: Sequence[str]) -> tuple:
    stats = tuple(stats)
    for s in stats:
        if s not in STATS:
            raise ValueError(f"unknown statistic {s!r}; known: {STATS}")
    return stats


def _check_max_rows(max_rows) -> None:
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be None or a positive int, got {max_rows!r}")


#: dtype of the ``X^T X`` accumulation.  float32 (default): each batch's product is added in place
#: into a float32 ``(K, K)`` buffer (one BLAS call per batch, as fast as the original algorithms'
#: float32 running sum), which is folded into the float64 statistic every :data:`XTX_FOLD_ROWS` rows
#: and at the end; against the float64 sum the result differs by a relative Frobenius norm of order
#: ``1e-7 sqrt(rows per fold)`` (tested: < 1e-5 for 4096 rows).  float64 (:func:`set_xtx_dtype`):
#: float64 products summed in float64 (exact up to float64 rounding); float64 inputs always
#: accumulate in float64.  The statistic handed out is float64 either way.
XTX_DTYPE = torch.float32

#: rows accumulated in the float32 buffer before it is folded into the float64 sum
XTX_FOLD_ROWS = 8192


def set_xtx_dtype(dtype: torch.dtype) -> torch.dtype:
    """Set the ``X^T X`` accumulation dtype (``torch.float32`` or ``torch.float64``); returns the old one."""
    global XTX_DTYPE
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    old, XTX_DTYPE = XTX_DTYPE, dtype
    return old


def set_xtx_fold_rows(rows: int) -> int:
    """Set :data:`XTX_FOLD_ROWS` (a positive int: rows summed in float32 between two folds into the
    float64 statistic); returns the old value."""
    global XTX_FOLD_ROWS
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive int, got {rows!r}")
    old, XTX_FOLD_ROWS = XTX_FOLD_ROWS, rows
    return old


def zero_stats(module: nn.Linear, stats: Sequence[str]) -> dict:
    """Raw statistics of a layer that saw no rows (``n = 0``, zero sums), as :func:`accumulate_inputs` lays them out."""
    k, wd = module.in_features, module.weight.device
    a = {"n": 0}
    if "xtx" in stats:
        a["xtx"] = torch.zeros(k, k, dtype=torch.float64, device=wd)
    if "sumsq" in stats:
        a["sumsq"] = torch.zeros(k, dtype=torch.float64, device=wd)
    if "sumabs" in stats:
        a["sumabs"] = torch.zeros(k, dtype=torch.float64, device=wd)
    return a


class InputAccumulator:
    """Raw sums over the input rows of some layers, fed by forward-pre hooks (see :func:`accumulate_inputs`).

    ``stats`` and ``max_rows`` are one value for every layer or a dict per layer name.
    ``stop_after``: ``{name: calls}`` -- a hook raises :class:`StopForward` once every listed
    layer has run that many times since :meth:`new_forward`.
    """

    def __init__(self, layers: Mapping[str, nn.Linear], stats: Union[Sequence[str], Mapping[str, Sequence[str]]],
                 max_rows: Union[None, int, Mapping[str, Optional[int]]] = None,
                 stop_after: Optional[Mapping[str, int]] = None):
        self.layers = dict(layers)
        self.stats = {n: _check_stats(stats[n] if isinstance(stats, Mapping) else stats) for n in self.layers}
        self.max_rows = {n: (max_rows.get(n) if isinstance(max_rows, Mapping) else max_rows) for n in self.layers}
        for v in self.max_rows.values():
            _check_max_rows(v)
        self.stop_after = stop_after
        self.acc = {n: zero_stats(mod, self.stats[n]) for n, mod in self.layers.items()}
        self.calls = {n: 0 for n in self.layers}
        self._part = {}

    def new_forward(self) -> None:
        for k in self.calls:
            self.calls[k] = 0

    def make_hook(self, name: str):
        a = self.acc[name]
        wd = self.layers[name].weight.device
        k = self.layers[name].in_features
        max_rows = self.max_rows[name]
        calls = self.calls
        stop_after = self.stop_after
        part = self._part                   # name -> [float32 (K, K) partial sum, rows in it]

        def hook(mod, inputs):
            calls[name] += 1
            if max_rows is None or a["n"] < max_rows:
                x = inputs[0].detach()
                if x.shape[-1] != k:
                    raise ValueError(f"layer {name!r} receives inputs with {x.shape[-1]} features; its "
                                     f"in_features is {k}")
                x = x.reshape(-1, x.shape[-1])
                if max_rows is not None:
                    x = x[: max_rows - a["n"]]
                rows = int(x.shape[0])
                if "xtx" in a:
                    if x.dtype == torch.float64 or XTX_DTYPE == torch.float64:
                        x64 = x.to(device=wd, dtype=torch.float64)
                        a["xtx"].addmm_(x64.t(), x64)
                    else:
                        x32 = x.to(device=wd, dtype=torch.float32)
                        p = part.get(name)
                        if p is None:
                            p = part[name] = [torch.zeros(k, k, dtype=torch.float32, device=wd), 0]
                        p[0].addmm_(x32.t(), x32)
                        p[1] += rows
                        if p[1] >= XTX_FOLD_ROWS:
                            self._fold(name)
                if "sumsq" in a or "sumabs" in a:
                    x = x.to(device=wd, dtype=torch.float64)
                    if "sumsq" in a:
                        a["sumsq"] += x.pow(2).sum(0)
                    if "sumabs" in a:
                        a["sumabs"] += x.abs().sum(0)
                a["n"] += rows
            if stop_after is not None and all(calls[k] >= c for k, c in stop_after.items()):
                raise StopForward
        return hook

    def _fold(self, name: str) -> None:
        p = self._part.get(name)
        if p is not None and p[1]:
            self.acc[name]["xtx"].add_(p[0])
            p[0].zero_()
            p[1] = 0

    def flush(self) -> None:
        """Fold every float32 partial ``X^T X`` into the float64 statistics and free the buffers
        (after the last batch; :meth:`pop` and :func:`accumulate_inputs` do it)."""
        for name in list(self._part):
            self._fold(name)
            del self._part[name]

    def full(self) -> bool:
        """Every layer has a row cap and has reached it (more batches would add nothing)."""
        return all(self.max_rows[n] is not None and self.acc[n]["n"] >= self.max_rows[n] for n in self.layers)

    def pop(self, name: str) -> dict:
        if name in self._part:
            self._fold(name)
            del self._part[name]
        return _reduce(self.acc.pop(name))


def accumulate_inputs(model: nn.Module, layers: Mapping[str, nn.Linear], calib_loader: Iterable,
                      stats: Sequence[str] = ("xtx", "sumsq"), max_rows: Optional[int] = None,
                      stop_after: Optional[Mapping[str, int]] = None, progress: bool = True,
                      desc: str = "calibration") -> dict:
    """Raw sums over every input row (leading dims flattened) of each layer.

    Returns ``{name: {"n": rows, <stat>: tensor for each of stats}}``, float64
    on the layer's weight device (see :data:`STATS`).  ``max_rows``: stop
    accumulating a layer after that many rows; the loop ends early once
    every layer has them.  ``stop_after``: ``{name: calls}`` -- end each
    forward (by an exception from the hook) once every listed layer has run
    that many times, which saves the rest of the network's compute.
    ``calib_loader`` yields tensors or ``(x, y, ...)`` tuples.  Runs under
    ``no_grad`` in eval mode (:func:`hooked`).  No batches -> ValueError.
    ``stats`` and ``max_rows`` may also be dicts per layer name.
    """
    if not isinstance(stats, Mapping):
        stats = _check_stats(stats)
    if not isinstance(max_rows, Mapping):
        _check_max_rows(max_rows)
    dev = model_device(model, layers)
    accum = InputAccumulator(layers, stats, max_rows, stop_after)

    from tqdm.auto import tqdm

    total = len(calib_loader) if hasattr(calib_loader, "__len__") else None
    num_batches = 0
    with hooked(model, layers, accum.make_hook), torch.no_grad():
        for batch in tqdm(calib_loader, desc=desc, unit="batch", total=total, disable=not progress, leave=False):
            x = model_input(batch, model, layers, dev)
            accum.new_forward()
            try:
                model(x)
            except StopForward:
                pass
            num_batches += 1
            if max_rows is not None and accum.full():
                break
    if num_batches == 0:
        raise ValueError("calib_loader yielded no batches")
    accum.flush()
    for name in accum.acc:
        _reduce(accum.acc[name])
    return accum.acc


def _reduce(acc: dict) -> dict:
    """Sum one layer's raw statistics over the distributed calibration group, when one is set
    (:func:`sparsekit.distributed.calibration.calibration_group`); otherwise ``acc`` as is."""
    from ..distributed.calibration import reduce_input_stats

    return reduce_input_stats(acc)


def sequential(model: nn.Module, layers: Union[Mapping[str, nn.Linear], list, None], calib_loader: Iterable,
               process: Callable[[str, nn.Linear, dict], None], stats: Sequence[str] = ("xtx",),
               max_rows: Optional[int] = None, progress: bool = True, desc: str = "calibrate",
               missing: str = "error") -> list:
    """Layer-by-layer calibration driver; returns the layer names in the order processed.

    The layers are grouped by :func:`forward_groups` (first calibration batch).
    For each group in forward order, the inputs of its layers are accumulated
    over the whole ``calib_loader`` with the current model -- every earlier
    group already compressed by ``process`` -- stopping each forward as soon
    as the group's layers have run, then ``process(name, layer, raw_stats)``
    is called per layer (raw sums of :func:`accumulate_inputs`).  ``missing``:
    layers that never run in the forward raise ValueError (``"error"``) or are
    processed last with zero statistics and ``n = 0`` (``"zeros"``).  A tqdm
    bar shows the groups.
    """
    if missing not in ("error", "zeros"):
        raise ValueError(f"missing must be 'error' or 'zeros', got {missing!r}")
    layers = resolve_layers(model, layers)
    stats = _check_stats(stats)
    calib_loader = reiterable(calib_loader)
    first = next(iter(calib_loader), None)
    if first is None:
        raise ValueError("calib_loader yielded no batches")
    groups, counts = forward_groups(model, layers, first)
    absent = [n for n in layers if counts[n] == 0]
    if absent and missing == "error":
        raise ValueError(f"layers {absent} did not run in the model's forward over the calibration data")

    from tqdm.auto import tqdm

    done = []
    for group in tqdm(groups, desc=desc, unit="group", disable=not progress):
        acc = accumulate_inputs(model, {n: layers[n] for n in group}, calib_loader, stats=stats,
                                max_rows=max_rows, stop_after={n: counts[n] for n in group}, progress=False)
        for name in group:
            process(name, layers[name], acc.pop(name))
            done.append(name)
        del acc
    for name in absent:
        mod = layers[name]
        zero = zero_stats(mod, stats)
        process(name, mod, zero)
        done.append(name)
    return done
