"""Block-by-block calibration with offloading: :func:`blockwise`.

A whole-model calibration (:func:`sparsekit.calibration.sequential`) re-runs
the model from its input for every group of layers, with the whole model on
one device.  :func:`blockwise` gives the same result with memory bounded by
one block:

1. The model's repeated blocks are found (:func:`~sparsekit.calibration.find_blocks`,
   e.g. the decoder layers).  One forward of the first batch checks that the
   blocks are chained (block 1 receives block 0's output and the same keyword
   arguments) and finds the layers that run before the first block.
2. Layers before the first block are calibrated on forwards that stop at it;
   then every batch's inputs to block 0 (positional and keyword arguments) are
   recorded once.
3. For each block in turn: only that block is on the compute device (when
   offloading; the rest of the model stays where it is), its layers are
   calibrated group by group in forward order on the recorded inputs -- each
   group sees the earlier groups already compressed -- and the block's outputs,
   computed with its compressed weights, become the next block's inputs.
4. Layers after the last block (e.g. an output head) are calibrated on forwards
   in which every block is replaced by a stand-in that returns the last
   block's recorded output.

Inputs of layers are bit-for-bit those of the whole-model calibration, so the
results are identical.  Calibration works on scratch copies of the weights: a
processor's ``process`` may overwrite ``module.weight`` (it holds a copy), and
the original tensors are back in every module before ``done`` is called.
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Protocol, Sequence

import torch
from torch import nn

from .blocks import find_blocks
from .core import (InputAccumulator, StopForward, first_calls, hooked, model_input, reiterable, split_batch,
                   zero_stats)
from .offload import ActivationStore, MemoryMeter, Placement, format_bytes

__all__ = ["LayerJob", "Processor", "BlockwiseSummary", "blockwise", "check_blockwise_args"]

_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


@dataclass
class LayerJob:
    """One layer to calibrate and replace.

    ``stats``: the input statistics it needs (:data:`~sparsekit.calibration.STATS`;
    empty: no data); ``max_rows``: stop accumulating after that many rows;
    ``missing``: a layer that never runs in the forward raises (``"error"``) or is
    processed last with zero statistics (``"zeros"``).
    """

    name: str
    module: nn.Module
    stats: tuple = ()
    max_rows: Optional[int] = None
    missing: str = "error"


class Processor(Protocol):
    """What :func:`blockwise` calls, per layer and per block."""

    #: True when ``done`` swaps the new modules into the model (the old ones are then dropped)
    commits: bool

    def process(self, name: str, module: nn.Module, stats: Optional[dict]) -> None:
        """Calibrate one layer from its raw input statistics (None: no data needed).  ``module.weight``
        is a scratch copy: overwrite it with the compressed layer's weight so later layers see it."""

    def build(self, name: str, module: nn.Module) -> nn.Module:
        """The compressed module for a processed layer (its scratch weight still in place)."""

    def done(self, names: Sequence[str], modules: Sequence[nn.Module]) -> None:
        """The new modules of a block (on each layer's own device); the originals are restored."""


@dataclass
class BlockwiseSummary:
    """What a :func:`blockwise` run did."""

    mode: str                      # "blocks", "whole model" or "no data"
    blocks: int                    # blocks calibrated one after another (0 in whole-model mode)
    layers: int
    seconds: float
    device: str
    offload: bool
    memory_label: str
    peak_memory: int
    activations_on_device: int = 0
    activations_offloaded: int = 0
    block_seconds: list = field(default_factory=list)
    fallback: Optional[str] = None  # why found blocks were not used

    def line(self) -> str:
        where = f"{self.blocks} blocks" if self.mode == "blocks" else self.mode
        act = ""
        if self.activations_on_device or self.activations_offloaded:
            act = f", activations {format_bytes(self.activations_on_device)} on {self.device}"
            if self.activations_offloaded:
                act += f" + {format_bytes(self.activations_offloaded)} offloaded"
        return (f"{self.layers} layers ({where}{', offloaded' if self.offload else ''}) in {self.seconds:.1f} s, "
                f"{self.memory_label} {format_bytes(self.peak_memory)}{act}")

    def as_dict(self) -> dict:
        return {"mode": self.mode, "blocks": self.blocks, "layers": self.layers, "seconds": round(self.seconds, 3),
                "device": self.device, "offload": self.offload, "memory": self.memory_label,
                "peak_memory_bytes": self.peak_memory, "activations_on_device_bytes": self.activations_on_device,
                "activations_offloaded_bytes": self.activations_offloaded,
                **({"fallback": self.fallback} if self.fallback else {})}


# ----------------------------------------------------------------------------- helpers
class _Scratch:
    """Scratch copies of weights: the calibration may overwrite them; :meth:`restore` puts the originals back."""

    def __init__(self):
        self.saved: dict = {}     # name -> (store, original)

    def add(self, name: str, module: nn.Module) -> None:
        if name in self.saved:
            return
        store = module._parameters if "weight" in module._parameters else module._buffers
        orig = store["weight"]
        copy = orig.detach().clone()
        store["weight"] = nn.Parameter(copy, requires_grad=False) if isinstance(orig, nn.Parameter) else copy
        self.saved[name] = (store, orig)

    def restore(self, names: Optional[Iterable[str]] = None) -> None:
        for n in list(self.saved if names is None else names):
            if n in self.saved:
                store, orig = self.saved.pop(n)
                store["weight"] = orig


class _Modes:
    """Eval mode for a module tree; every module's mode restored on exit."""

    def __init__(self, root: nn.Module):
        self.root = root

    def __enter__(self):
        self.modes = {m: m.training for m in self.root.modules()}
        self.root.eval()
        return self

    def __exit__(self, *exc):
        for m, t in self.modes.items():
            m.train(t)
        return False


def _hidden(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"a block returned {type(out).__name__}; block-by-block calibration needs a tensor or a "
                    f"tuple whose first element is the hidden states (pass blocks=None to calibrate the "
                    f"whole model at once)")


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable ==
        return False


def _sanitize(kwargs: dict) -> dict:
    """A block's keyword arguments for replay: no KV cache (calibration never needs one)."""
    out = dict(kwargs)
    for k in _CACHE_KWARGS:
        if out.get(k) is not None:
            out[k] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def _describe_batch(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {tuple(x.shape)} {str(x.dtype).replace('torch.', '')} tensor"
    return f"a {type(x).__name__}"


def _calib_error(e: Exception, index: int, x) -> ValueError:
    which = "the first calibration batch" if index == 0 else f"calibration batch {index}"
    return ValueError(f"calib: the model's forward fails on {which} ({_describe_batch(x)}): "
                      f"{type(e).__name__}: {' '.join(str(e).split())}")


def _model_call(model: nn.Module, batch, index: int, dev):
    """``model(x)`` for a calibration batch; an error of the forward names the batch."""
    x = split_batch(batch)
    try:
        return model(model_input(x, model, None, dev))
    except StopForward:
        raise
    except Exception as e:
        raise _calib_error(e, index, x) from e


class _Replay(nn.Module):
    """Stands in for a block: returns ``fn(args, kwargs)``; other attributes come from the block it replaces."""

    def __init__(self, block: nn.Module, fn: Callable):
        super().__init__()
        object.__setattr__(self, "_replaced", block)
        object.__setattr__(self, "_fn", fn)

    def forward(self, *args, **kwargs):
        return self._fn(args, kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_replaced"), name)


def _parent(model: nn.Module, name: str):
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def check_blockwise_args(blocks="auto", device=None, offload=None, activation_budget=None) -> Optional[torch.device]:
    """Validate :func:`blockwise`'s options (ValueError / TypeError); returns the device (None: the model's)."""
    if blocks is not None and not isinstance(blocks, (str, list, tuple)):
        raise TypeError(f"blocks must be 'auto', None, a module name or a list of module names, "
                        f"got {type(blocks).__name__}")
    if offload is not None and not isinstance(offload, bool):
        raise TypeError(f"offload must be None or a bool, got {offload!r}")
    if activation_budget is not None and (isinstance(activation_budget, bool)
                                          or not isinstance(activation_budget, int) or activation_budget < 0):
        raise ValueError(f"activation_budget must be None or a number of bytes >= 0, got {activation_budget!r}")
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available here; calibrate on 'cpu' or on a CUDA machine")
    if dev.type == "meta":
        raise ValueError("device='meta' cannot calibrate (meta tensors hold no data)")
    return dev


# ----------------------------------------------------------------------------- the driver
class _Run:
    def __init__(self, model, calib, jobs, processor, blocks, device, offload, activation_budget, progress, desc):
        self.model = model
        self.processor = processor
        self.jobs = {j.name: j for j in jobs}
        for j in jobs:
            if j.missing not in ("error", "zeros"):
                raise ValueError(f"LayerJob.missing must be 'error' or 'zeros', got {j.missing!r}")
        self.home = {n: j.module.weight.device for n, j in self.jobs.items()}
        model_dev = next((t.device for t in list(model.parameters()) + list(model.buffers())), torch.device("cpu"))
        self.model_dev = model_dev
        device = check_blockwise_args(blocks, device, offload, activation_budget)
        self.dev = device if device is not None else model_dev
        if self.dev.type == "cuda" and self.dev.index is None and torch.cuda.is_available():
            self.dev = torch.device("cuda", torch.cuda.current_device())
        self.offload = (self.dev != model_dev) if offload is None else bool(offload)
        self.budget = activation_budget
        if activation_budget is None and self.dev.type == "cuda" and torch.cuda.is_available():
            self.budget = int(torch.cuda.get_device_properties(self.dev).total_memory // 4)
        self.calib = calib
        self.blocks_arg = blocks
        self.progress = progress
        self.desc = desc
        self.scratch = _Scratch()
        self.meter = MemoryMeter(self.dev)
        self.block_seconds = []
        self.fallback = None
        self.act_bytes = (0, 0)
        self._placements = []
        self.deferred = []

    # ------------------------------------------------------------------ stages
    def _finish(self, names: list, defer: bool = False) -> None:
        """Build the new modules of ``names``, restore the originals, hand them to the processor
        (``defer``: only at the end of the run, by :meth:`done_deferred`)."""
        news = []
        for n in names:
            news.append(self.processor.build(n, self.jobs[n].module))
        self.scratch.restore(names)
        news = [m.to(self.home[n]) for n, m in zip(names, news)]
        if defer:
            self.deferred.append((names, news))
            return
        self._done(names, news)

    def done_deferred(self) -> None:
        while self.deferred:
            self._done(*self.deferred.pop(0))

    def _done(self, names: list, news: list) -> None:
        old = [self.jobs[n].module for n in names]
        self.processor.done(names, news)
        if self.processor.commits:
            for p in self._placements:
                p.forget(old)
        for n in names:
            self.jobs.pop(n).module = None
        del old, news

    def _process(self, name: str, stats: Optional[dict]) -> None:
        self.scratch.add(name, self.jobs[name].module)
        self.processor.process(name, self.jobs[name].module, stats)

    def _calibrate(self, root: nn.Module, names: list, runs: Callable[[], Iterable[Callable]]) -> None:
        """Calibrate ``names`` (all inside ``root``) group by group on the forwards ``runs()`` yields."""
        if not names:
            return
        layers = {n: self.jobs[n].module for n in names}
        if not any(self.jobs[n].stats for n in names):
            for n in names:
                self._process(n, None)
            return
        first = next(iter(runs()), None)
        if first is None:
            raise ValueError("calib yielded no batches: give at least one calibration batch")
        groups, counts = first_calls(root, layers, first)
        absent = [n for n in names if counts[n] == 0]
        bad = [n for n in absent if self.jobs[n].stats and self.jobs[n].missing == "error"]
        if bad:
            raise ValueError(f"layers {bad} did not run in the model's forward over the calibration data")
        for group in groups:
            need = [n for n in group if self.jobs[n].stats]
            if not need:
                for n in group:
                    self._process(n, None)
                continue
            acc = InputAccumulator({n: layers[n] for n in group}, {n: self.jobs[n].stats for n in group},
                                   {n: self.jobs[n].max_rows for n in group}, {n: counts[n] for n in group})
            with hooked(root, {n: layers[n] for n in group}, acc.make_hook), torch.no_grad():
                for run in runs():
                    acc.new_forward()
                    try:
                        run()
                    except StopForward:
                        pass
                    if acc.full():
                        break
            for n in group:
                self._process(n, acc.pop(n) if self.jobs[n].stats else None)
            del acc
        for n in absent:
            self._process(n, zero_stats(layers[n], self.jobs[n].stats) if self.jobs[n].stats else None)

    # ------------------------------------------------------------------ modes
    def _bar(self, total: int):
        from tqdm.auto import tqdm

        # a tick is a whole block (seconds to minutes on a real model): redraw on every one, so each
        # block's time and memory is shown (tqdm's default 0.1 s redraw interval skips fast ticks)
        return tqdm(total=total, desc=self.desc, unit="block", disable=not self.progress, mininterval=0, miniters=1)

    def _tick(self, bar, t0: float, label: str) -> None:
        dt = time.perf_counter() - t0
        self.block_seconds.append(dt)
        mem = self.meter.read()
        bar.set_postfix_str(f"{label}: {dt:.2f} s, {self.meter.label} {format_bytes(mem)}", refresh=False)
        bar.update(1)

    def no_data(self, found: list) -> str:
        """No layer needs calibration data: nothing runs; each layer is processed, built and handed over on
        its own (one scratch weight at a time), block by block."""
        stages = []
        inside = set()
        for name, block in found:
            ids = {id(m) for m in block.modules()}
            names = [n for n, j in self.jobs.items() if id(j.module) in ids]
            inside.update(names)
            stages.append((name, block, names))
        rest = [n for n in self.jobs if n not in inside]
        if rest:
            stages.append(("(rest)", None, rest))
        with self._bar(len(stages)) as bar:
            for label, block, names in stages:
                t0 = time.perf_counter()
                self.meter.start()
                place = Placement()
                self._placements = [place]
                try:
                    if self.offload:
                        place.move(block.modules() if block is not None else
                                   [self.jobs[n].module for n in names], self.dev)
                    for n in names:
                        self._process(n, None)
                        self._finish([n])
                finally:
                    self.scratch.restore()
                    place.restore()
                self._tick(bar, t0, label)
        return "no data"

    def whole_model(self, calib) -> None:
        """No usable blocks: the whole model is one block (on the compute device during calibration)."""
        place = Placement()
        self._placements = [place]
        with self._bar(1) as bar:
            t0 = time.perf_counter()
            self.meter.start()
            try:
                if self.dev != self.model_dev:
                    place.move(self.model.modules(), self.dev)
                model, dev = self.model, self.dev

                def runs():
                    for i, b in enumerate(calib):
                        yield lambda b=b, i=i: _model_call(model, b, i, dev)

                self._calibrate(model, list(self.jobs), runs)
                self._finish(list(self.jobs))
            finally:
                self.scratch.restore()
                place.restore()
            self._tick(bar, t0, "model")

    def blocks(self, calib, found: list) -> bool:
        """Block by block; False when the blocks turn out not to be chained (nothing was changed then)."""
        model, dev = self.model, self.dev
        block_ids = [{id(m) for m in b.modules()} for _, b in found]
        all_inside = set().union(*block_ids)
        outside_mods = [m for m in model.modules() if id(m) not in all_inside]
        per_block = [[n for n, j in self.jobs.items() if id(j.module) in ids] for ids in block_ids]
        outside_jobs = [n for n, j in self.jobs.items() if id(j.module) not in all_inside]
        first_block = found[0][1]
        place_out = Placement()
        place_block = Placement()
        self._placements = [place_out, place_block]
        stubs = []
        batches = calib
        try:
            place_out.move(outside_mods, dev)
            # ---- 1. one forward of the first batch: chaining, and the layers before block 0
            place_block.move(first_block.modules(), dev)
            rec: dict = {}
            counts = {n: 0 for n in outside_jobs}
            before = {}

            def count_hook(name):
                def hook(mod, inputs):
                    counts[name] += 1
                return hook

            def pre0(mod, args, kwargs):
                before.update({n: c for n, c in counts.items()})
                rec["in0"] = (args, kwargs)

            def post0(mod, args, kwargs, out):
                rec["out0"] = out

            def pre1(mod, args, kwargs):
                rec["in1"] = (args, kwargs)
                raise StopForward

            handles = [first_block.register_forward_pre_hook(pre0, with_kwargs=True),
                       first_block.register_forward_hook(post0, with_kwargs=True)]
            if len(found) > 1:
                handles.append(found[1][1].register_forward_pre_hook(pre1, with_kwargs=True))
            handles += [self.jobs[n].module.register_forward_pre_hook(count_hook(n)) for n in outside_jobs]
            first = next(iter(batches), None)
            if first is None:
                raise ValueError("calib yielded no batches: give at least one calibration batch")
            try:
                with _Modes(model), torch.no_grad():
                    try:
                        _model_call(model, first, 0, dev)
                    except StopForward:
                        pass
            finally:
                for h in handles:
                    h.remove()
            place_block.restore()
            why = None
            if "in0" not in rec:
                why = f"the first block {found[0][0]!r} did not run in the model's forward"
            elif len(found) > 1:
                if "in1" not in rec or "out0" not in rec:
                    why = f"block {found[1][0]!r} did not run after {found[0][0]!r}"
                else:
                    a0, k0 = rec["in0"]
                    a1, k1 = rec["in1"]
                    out0 = rec["out0"]
                    h0 = out0 if isinstance(out0, torch.Tensor) else (
                        out0[0] if isinstance(out0, (tuple, list)) and out0 else None)
                    if not a1 or h0 is None or a1[0] is not h0:
                        why = (f"block {found[1][0]!r} does not receive the output of {found[0][0]!r} as its "
                               f"first argument")
                    elif len(a0) != len(a1) or not _same(tuple(a0[1:]), tuple(a1[1:])) \
                            or not _same(_sanitize(k0), _sanitize(k1)):
                        why = f"blocks {found[0][0]!r} and {found[1][0]!r} receive different arguments"
            if why is not None:
                self.fallback = why
                return False
            out0 = rec.get("out0")
            out_len = None if out0 is None or isinstance(out0, torch.Tensor) else len(out0)
            prefix = [n for n in outside_jobs if before.get(n, 0) > 0]
            suffix = [n for n in outside_jobs if n not in prefix]
            rec.clear()
            out0 = a0 = k0 = a1 = k1 = h0 = None  # noqa: F841 - drop the first batch's activations

            def stop_at_block0(mod, args, kwargs):
                raise StopForward

            def model_runs():
                for i, b in enumerate(batches):
                    yield lambda b=b, i=i: _model_call(model, b, i, dev)

            total = len(found) + (1 if prefix else 0) + (1 if suffix else 0)
            with self._bar(total) as bar:
                # ---- 2. layers before block 0, then block 0's inputs
                t0 = time.perf_counter()
                self.meter.start()
                h = first_block.register_forward_pre_hook(stop_at_block0, with_kwargs=True)
                try:
                    self._calibrate(model, prefix, model_runs)
                finally:
                    h.remove()
                store = ActivationStore(dev, torch.device("cpu") if dev.type != "cpu" else dev, self.budget)

                def capture(mod, args, kwargs):
                    store.append(tuple(args), _sanitize(kwargs))
                    raise StopForward

                h = first_block.register_forward_pre_hook(capture, with_kwargs=True)
                try:
                    with _Modes(model), torch.no_grad():
                        for i, b in enumerate(batches):
                            n_before = len(store)
                            try:
                                _model_call(model, b, i, dev)
                            except StopForward:
                                pass
                            if len(store) != n_before + 1:
                                raise ValueError(f"calib: the first block {found[0][0]!r} did not run on "
                                                 f"calibration batch {i}")
                finally:
                    h.remove()
                if prefix:
                    # the layers before the blocks run again in the forwards of step 4: they keep their
                    # dense modules until the end
                    self._finish(prefix, defer=True)
                    self._tick(bar, t0, "before the blocks")
                # ---- 3. the blocks
                last = len(found) - 1
                for i, ((bname, block), names) in enumerate(zip(found, per_block)):
                    t0 = time.perf_counter()
                    self.meter.start()
                    if self.offload:
                        place_block.move(block.modules(), dev)

                    def block_runs(block=block):
                        for j in range(len(store)):
                            def run(j=j):
                                a, k = store.get(j)
                                return block(*a, **k)
                            yield run

                    self._calibrate(block, names, block_runs)
                    if i < last or suffix:
                        with _Modes(block), torch.no_grad():
                            for j in range(len(store)):
                                a, k = store.get(j)
                                store.set_hidden(j, _hidden(block(*a, **k)))
                                del a, k
                    self._finish(names)
                    place_block.restore()
                    self._tick(bar, t0, bname)
                # ---- 4. layers after the last block
                if suffix:
                    t0 = time.perf_counter()
                    self.meter.start()
                    current = {"j": 0}

                    def structured(hidden):
                        return hidden if out_len is None else (hidden,) + (None,) * (out_len - 1)

                    for k, (bname, block) in enumerate(found):
                        if k == 0:
                            fn = (lambda args, kwargs: structured(store.hidden(current["j"])))
                        else:
                            fn = (lambda args, kwargs: structured(args[0]))
                        parent, attr = _parent(model, bname)
                        stubs.append((parent, attr, block))
                        parent._modules[attr] = _Replay(block, fn)

                    def suffix_runs():
                        for j, b in enumerate(batches):
                            def run(j=j, b=b):
                                current["j"] = j
                                return _model_call(model, b, j, dev)
                            yield run

                    self._calibrate(model, suffix, suffix_runs)
                    for parent, attr, block in reversed(stubs):
                        parent._modules[attr] = block
                    stubs = []
                    self._finish(suffix)
                    self._tick(bar, t0, "after the blocks")
                self.act_bytes = (store.bytes_on_device, store.bytes_offloaded)
                store.clear()
                self.done_deferred()
        finally:
            for parent, attr, block in reversed(stubs):
                parent._modules[attr] = block
            self.scratch.restore()
            place_block.restore()
            place_out.restore()
        return True


def blockwise(model: nn.Module, calib, jobs: Sequence[LayerJob], processor: Processor, *,
              blocks="auto", device=None, offload: Optional[bool] = None, activation_budget: Optional[int] = None,
              progress: bool = False, desc: str = "calibrate") -> BlockwiseSummary:
    """Calibrate and replace ``jobs``' layers of ``model`` block by block (see the module docstring).

    ``calib``: calibration batches (tensors or ``(x, ...)`` tuples fed as ``model(x)``);
    only read when some job needs statistics.  ``blocks``: ``"auto"``, None (the
    whole model is one block), a module name or a list of names
    (:func:`~sparsekit.calibration.find_blocks`).  ``device``: the compute device
    (default: where the model is).  ``offload``: keep each block where it is
    and move it to ``device`` only while it is calibrated (default: when
    ``device`` differs from the model's device); without blocks the whole model
    moves.  Every module is back on its own device afterwards (the new modules
    on their layer's device).  ``activation_budget``: bytes of recorded block
    inputs kept on ``device`` (default: a quarter of a CUDA device's memory, no
    limit on CPU); the rest waits on the model's device.  ``progress``: one
    tqdm bar over the blocks (time and memory per block) and a final summary
    line on stderr.
    """
    run = _Run(model, calib, list(jobs), processor, blocks, device, offload, activation_budget, progress, desc)
    t0 = time.perf_counter()
    n_layers = len(run.jobs)
    needs_data = any(j.stats for j in run.jobs.values())
    found = find_blocks(model, [j.module for j in run.jobs.values()], blocks)
    mode = "blocks"
    if not needs_data:
        run.no_data(found)
        mode = "no data"
        n_blocks = len(found)
    else:
        calib = reiterable(calib)
        used = bool(found) and run.blocks(calib, found)
        if not used:
            if run.fallback is not None:
                warnings.warn(f"block-by-block calibration is not possible ({run.fallback}); calibrating the "
                              f"whole model at once", RuntimeWarning, stacklevel=2)
            run.whole_model(calib)
            mode = "whole model"
        n_blocks = len(found) if used else 0
    summary = BlockwiseSummary(mode=mode, blocks=n_blocks, layers=n_layers, seconds=time.perf_counter() - t0,
                               device=str(run.dev), offload=run.offload and mode != "whole model",
                               memory_label=run.meter.label, peak_memory=run.meter.overall,
                               activations_on_device=run.act_bytes[0], activations_offloaded=run.act_bytes[1],
                               block_seconds=run.block_seconds, fallback=run.fallback)
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(f"{desc}: {summary.line()}", file=sys.stderr)
    return summary
