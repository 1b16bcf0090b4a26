"""Whole-model conversion: ``sparsify_(model, config)``, ``quantize_(model, config)`` and the engine under
them and :func:`sparsekit.compress.compress`, :func:`convert_model`.

Every scheme comes from the registry (:mod:`sparsekit.schemes`); the config
may be a scheme name (``"2:4"``, ``"int4"``, ...), a scheme config
(``Int4Params(...)``) or one of the classic configs (:class:`Sparse24Config`,
:class:`BlockSparseConfig`, :class:`Int4Config`).  Per-layer ``overrides``
(:mod:`sparsekit.schemes.overrides`) give single layers another scheme, other
parameters, or no conversion.

A conversion has two phases:

1. **check**: find every module to replace (:func:`find_targets`), resolve
   each one's scheme and parameters, and validate every one of them (an error
   names the layer).  Nothing has run and nothing has changed yet.
2. **calibrate and build** (:func:`sparsekit.calibration.blockwise`): block by
   block, calibrate the layers on scratch copies of their weights (the
   model's own tensors are never written), build the new modules and
   * ``sparsify_`` / ``quantize_`` / :func:`plan_conversion` (``commit="end"``):
     keep them; :meth:`ConversionPlan.apply` swaps them all in at once at the
     end.  An error anywhere leaves the model exactly as it was (same module
     objects, equal ``state_dict``).
   * ``compress`` (``commit="block"``): swap each block's new modules in as
     soon as the block is done, so the dense weights of a block are freed
     before the next one is calibrated (bounded memory).  An error after the
     first block leaves the blocks done so far compressed.

* A module object that appears under several names (the same ``nn.Linear``
  used twice) is one target: it is converted once and the new module is put
  at every one of its names, so it stays shared.  It is converted everywhere
  or nowhere: a selection (``include``/``exclude``/``filter_fn``/``layers``)
  that takes it under some names and not others raises ``ValueError``.
* A target whose weight or bias shares memory with another module (tied
  weights, e.g. an output projection tied to an embedding) raises
  ``ValueError``: the new module would hold its own copy and silently untie
  them.  Tie modules by sharing the module object instead.
* The new modules keep the replaced module's ``training`` flag, and a frozen
  weight or bias (``requires_grad=False``) stays frozen in the new module.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .schemes.base import check_linear

__all__ = ["Sparse24Config", "BlockSparseConfig", "Int4Config", "sparsify_", "quantize_",
           "Target", "ConversionPlan", "find_targets", "check_targets", "check_linear", "build_plan",
           "plan_conversion", "scratch_weights", "check_calibration", "convert_model", "ConversionResult",
           "module_bytes"]


# ----------------------------------------------------------------------------- targets
@dataclass(frozen=True, eq=False)
class Target:
    """One module object to replace.

    ``names``: every qualified name under which ``module`` appears in the
    model, in ``named_modules`` order (``name`` = the first one).
    """

    names: tuple
    module: nn.Module

    @property
    def name(self) -> str:
        return self.names[0]

    def describe(self) -> str:
        if len(self.names) == 1:
            return f"layer {self.name!r}"
        return f"layer {self.name!r} (shared, also at {', '.join(repr(n) for n in self.names[1:])})"


def _module_paths(model: nn.Module) -> dict:
    """``{id(module): (module, [every qualified name])}`` over the module graph, every path included."""
    found: dict = {}
    on_path: set = set()

    def visit(mod: nn.Module, name: str) -> None:
        if id(mod) in on_path:
            raise ValueError(f"the module graph has a cycle: {name!r} contains one of its own ancestors")
        found.setdefault(id(mod), (mod, []))[1].append(name)
        on_path.add(id(mod))
        for child_name, child in mod._modules.items():
            if child is not None:
                visit(child, f"{name}.{child_name}" if name else child_name)
        on_path.discard(id(mod))

    visit(model, "")
    return found


def _direct_tensors(mod: nn.Module):
    for kind in ("_parameters", "_buffers"):
        for attr, t in getattr(mod, kind).items():
            if isinstance(t, torch.Tensor):
                yield attr, t


def _span(t: torch.Tensor):
    """``(storage key, start, end)`` in bytes of the memory ``t`` can touch; None when it has none."""
    if t.device.type == "meta" or t.numel() == 0:
        return None
    st = t.untyped_storage()
    es = t.element_size()
    start = st.data_ptr() + t.storage_offset() * es
    extent = (sum((s - 1) * abs(d) for s, d in zip(t.shape, t.stride())) + 1) * es
    return (str(t.device), st.data_ptr()), start, start + extent


def _check_ties(paths: dict, targets: Sequence[Target]) -> None:
    """ValueError when a target's parameter or buffer shares memory with another module's."""
    by_storage: dict = {}
    by_object: dict = {}
    for mod, names in paths.values():
        for attr, t in _direct_tensors(mod):
            by_object.setdefault(id(t), []).append((mod, names[0], attr))
            sp = _span(t)
            if sp is not None:
                by_storage.setdefault(sp[0], []).append((mod, names[0], attr, sp[1], sp[2]))
    for tgt in targets:
        for attr, t in _direct_tensors(tgt.module):
            holders = [(n, a) for m, n, a in by_object.get(id(t), []) if m is not tgt.module]
            sp = _span(t)
            if sp is not None:
                holders += [(n, a) for m, n, a, s, e in by_storage.get(sp[0], [])
                            if m is not tgt.module and s < sp[2] and sp[1] < e and (n, a) not in holders]
            if holders:
                other = ", ".join(f"{n}.{a}" if n else a for n, a in holders)
                raise ValueError(
                    f"{tgt.describe()}: its {attr!r} shares memory with {other} (tied weights); the converted "
                    f"module would hold its own copy and untie them.  Share the module object itself instead "
                    f"(conversion keeps shared modules shared), untie the weights, or leave {tgt.name!r} out "
                    f"(include/exclude/filter_fn)")


def find_targets(model: nn.Module, select: Callable[[str, nn.Module], bool]) -> list:
    """The modules of ``model`` to convert, as :class:`Target` objects (one per module object).

    ``select(name, module)`` is asked under every name of every module.  A
    module shared by several names must be selected under all of them or
    none (else ``ValueError``); the model itself cannot be a target; a
    target's parameters and buffers must not share memory with another
    module's (tied weights, else ``ValueError``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    paths = _module_paths(model)
    targets = []
    for mod, names in paths.values():
        chosen = [n for n in names if select(n, mod)]
        if not chosen:
            continue
        if "" in names:
            raise ValueError("conversion replaces submodules; wrap a bare nn.Linear in a container "
                             "or use the module's from_dense / from_float directly")
        if len(chosen) != len(names):
            left = [n for n in names if n not in chosen]
            raise ValueError(
                f"module {chosen[0]!r} is shared (also at {', '.join(repr(n) for n in names if n != chosen[0])}) "
                f"and is selected at {chosen} but not at {left}; a shared module is converted everywhere or "
                f"nowhere: adjust include/exclude/filter_fn/layers to select all of its names or none")
        targets.append(Target(tuple(names), mod))
    _check_ties(paths, targets)
    return targets


def _with_layer(target: Target, e: Exception) -> Exception:
    """``e`` re-raised with the layer named (same type where it can be rebuilt from a message)."""
    msg = f"{target.describe()}: {e}"
    if isinstance(e, (ValueError, TypeError, NotImplementedError)):
        try:
            new = type(e)(msg)
        except Exception:
            new = (TypeError if isinstance(e, TypeError) else ValueError)(msg)
        return new
    return e


def _named(target: Target, fn: Callable, *args):
    try:
        return fn(*args)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise _with_layer(target, e) from e


def check_targets(targets: Sequence[Target], check: Callable[[nn.Module, str], None]) -> None:
    """Run ``check(module, name)`` on every target; the first failure is re-raised naming the layer."""
    for t in targets:
        _named(t, check, t.module, t.name)


def check_calibration(model: nn.Module, calib):
    """Validate calibration batches before any calibration work; returns them re-iterable.

    The model runs once, under ``no_grad`` in eval mode (every module's mode is
    restored), on the first batch: a batch that does not fit the model (e.g.
    the wrong number of input features) raises ``ValueError`` naming its shape
    here, not from deep inside a calibration pass.
    """
    from .calibration import model_input, reiterable, split_batch

    batches = reiterable(calib)
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("calib yielded no batches: give at least one calibration batch")
    x = split_batch(first)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(model_input(x, model))
    except Exception as e:  # noqa: BLE001 - whatever the model raises, the batch does not fit it
        raise ValueError(f"calib: the model's forward fails on the first calibration batch (a "
                         f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')} tensor): {type(e).__name__}: "
                         f"{' '.join(str(e).split())}") from e
    finally:
        for m, t in modes.items():
            m.train(t)
    return batches


@contextlib.contextmanager
def scratch_weights(targets: Sequence[Target]):
    """Within the block, each target's ``weight`` is a detached copy (a calibration may overwrite it);
    on exit, even on error, the original tensor objects are back, untouched."""
    saved = []
    try:
        for t in targets:
            mod = t.module
            store = mod._parameters if "weight" in mod._parameters else mod._buffers
            orig = store["weight"]
            copy = orig.detach().clone()
            store["weight"] = nn.Parameter(copy, requires_grad=False) if isinstance(orig, nn.Parameter) else copy
            saved.append((store, orig))
        yield
    finally:
        for store, orig in reversed(saved):
            store["weight"] = orig


def _carry_state(old: nn.Module, new: nn.Module) -> None:
    """The new module takes the old one's train/eval mode; a frozen weight or bias stays frozen."""
    new.train(old.training)
    w = getattr(old, "weight", None)
    b = getattr(old, "bias", None)
    w_frozen = isinstance(w, torch.Tensor) and not w.requires_grad
    b_frozen = (isinstance(b, torch.Tensor) and not b.requires_grad) if b is not None else w_frozen
    for pname, p in new.named_parameters():
        frozen = b_frozen if pname.rsplit(".", 1)[-1] == "bias" else w_frozen
        if frozen:
            p.requires_grad_(False)


class ConversionPlan:
    """Replacement modules built for every target, not yet in the model; :meth:`apply` swaps them in."""

    def __init__(self, model: nn.Module, targets: Sequence[Target], modules: Sequence[nn.Module]):
        if len(targets) != len(modules):
            raise ValueError(f"{len(targets)} targets but {len(modules)} new modules")
        self.model = model
        self.targets = list(targets)
        self.modules = list(modules)
        self.applied = False

    def __len__(self) -> int:
        return len(self.targets)

    def __iter__(self):
        return iter(zip(self.targets, self.modules))

    @property
    def names(self) -> list:
        """The canonical name of every target."""
        return [t.name for t in self.targets]

    def _slots(self) -> list:
        slots = []
        for t, new in self:
            for name in t.names:
                parent_name, _, attr = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                if parent._modules.get(attr) is not t.module:
                    raise RuntimeError(f"the model changed after the conversion was planned: {name!r} no longer "
                                       f"holds the planned module; plan again")
                slots.append((parent, attr, t.module, new))
        return slots

    def apply(self) -> nn.Module:
        """Swap every new module in (at every name of its target); returns the model.

        Checks first that every name still holds the planned module; if a swap
        fails midway the earlier ones are undone.
        """
        if self.applied:
            raise RuntimeError("this conversion plan was already applied")
        slots = self._slots()
        done = []
        try:
            for parent, attr, old, new in slots:
                setattr(parent, attr, new)
                done.append((parent, attr, old))
        except BaseException:
            for parent, attr, old in reversed(done):
                parent._modules[attr] = old
            raise
        self.applied = True
        return self.model


def build_plan(model: nn.Module, targets: Sequence[Target], build: Callable[[Target], nn.Module],
               progress: bool = False, desc: str = "convert") -> ConversionPlan:
    """Build ``build(target)`` for every target (errors name the layer) into a :class:`ConversionPlan`.

    Each new module takes its target's train/eval mode, and its parameters are
    frozen where the target's weight (bias for ``*.bias``) was frozen.
    """
    from tqdm.auto import tqdm

    new_modules = []
    for t in tqdm(targets, desc=desc, unit="layer", disable=not progress):
        new = _named(t, build, t)
        if not isinstance(new, nn.Module):
            raise TypeError(f"{t.describe()}: the conversion built a {type(new).__name__}, not an nn.Module")
        _carry_state(t.module, new)
        new_modules.append(new)
    return ConversionPlan(model, targets, new_modules)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each distinct tensor storage counted once)."""
    seen = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------- the engine
@dataclass
class ConversionResult:
    """What :func:`convert_model` did.

    ``names``: the converted layers (a shared layer once, by its first name), in
    model order; ``schemes`` / ``configs``: per name, the scheme and its
    resolved config; ``shared``: first name -> every name of a shared layer;
    ``skipped``: selected layers an override left alone; ``layers``: per name,
    ``{"in_features", "dtype"}`` of the dense layer; ``calibration``: the
    :class:`~sparsekit.calibration.BlockwiseSummary`; ``plan``: with
    ``commit="end"``, the :class:`ConversionPlan` (not applied yet).
    """

    model: nn.Module
    names: list
    schemes: dict
    configs: dict
    shared: dict
    skipped: list
    layers: dict
    layer_dense_bytes: int
    layer_compressed_bytes: int
    calibration: object = None
    plan: Optional["ConversionPlan"] = None


class _Processor:
    """Calibrates, builds and places the new modules for :func:`sparsekit.calibration.blockwise`."""

    def __init__(self, model: nn.Module, entries: dict, commits: bool, split_group=None):
        self.model = model
        self.entries = entries            # name -> (Target, Scheme, config); popped when done
        self.commits = commits
        self.results: dict = {}
        self.stash: list = []
        self.compressed_bytes = 0
        self.committed = 0
        self.splitter = None
        if split_group is not None:
            from .distributed.split import LayerSplit

            self.splitter = LayerSplit(split_group, self._calibrate, self.results.__setitem__)

    def _calibrate(self, name, module, stats):
        t, scheme, cfg = self.entries[name]
        return _named(t, scheme.calibrate, module, stats, cfg)

    def process(self, name, module, stats):
        if self.splitter is not None:
            self.splitter.submit(name, module, stats)       # solved by one rank, broadcast (see flush)
        else:
            self.results[name] = self._calibrate(name, module, stats)

    def build(self, name, module):
        if self.splitter is not None:
            self.splitter.flush()
        t, scheme, cfg = self.entries[name]
        new = _named(t, scheme.build, module, self.results.pop(name), cfg)
        if not isinstance(new, nn.Module):
            raise TypeError(f"{t.describe()}: scheme {scheme.name!r} built a {type(new).__name__}, not an nn.Module")
        return new

    def done(self, names, modules):
        targets = [self.entries[n][0] for n in names]
        for t, new in zip(targets, modules):
            _carry_state(t.module, new)
            self.compressed_bytes += module_bytes(new)
        if self.commits:
            ConversionPlan(self.model, targets, modules).apply()
            self.committed += len(names)
        else:
            self.stash.extend(zip(targets, modules))
        for n in names:
            self.entries.pop(n)


def _exact_linear(name: str, module: nn.Module) -> bool:
    return type(module) is nn.Linear


def _check_targets(model, config, select, overrides, calibrated, what) -> tuple:
    """Phase 1: targets, their schemes and configs, every check.  Returns ``(entries, skipped, shared)``."""
    from .schemes import registry
    from .schemes.overrides import normalize_spec, resolve_overrides

    base = normalize_spec(config, None, registry, calibrated, "config")
    targets = find_targets(model, select if select is not None else (lambda n, m: isinstance(m, nn.Linear)))
    assigned = resolve_overrides(targets, base, overrides, registry, calibrated, what)
    skipped = [t.name for t, c in assigned if c is None]
    shared = {t.name: list(t.names) for t, c in assigned if c is not None and len(t.names) > 1}
    groups: dict = {}
    for t, c in assigned:
        if c is not None:
            groups.setdefault(id(c), (c, []))[1].append(t)
    resolved = {}
    for key, (c, ts) in groups.items():
        scheme = registry.for_config(c)
        resolved[key] = (scheme, scheme.check_all(c, [t.module for t in ts]))
    entries = {}
    for t, c in assigned:
        if c is None:
            continue
        scheme, rc = resolved[id(c)]
        _named(t, scheme.check, t.module, rc)
        entries[t.name] = (t, scheme, rc)
    return entries, skipped, shared


def convert_model(model: nn.Module, config, *, calib=None, select: Optional[Callable[[str, nn.Module], bool]] = None,
                  overrides=None, calibrated: bool = False, commit: str = "end", blocks="auto", device=None,
                  offload: Optional[bool] = None, activation_budget: Optional[int] = None, progress: bool = False,
                  desc: str = "convert", what: str = "overrides",
                  before_run: Optional[Callable[[list], None]] = None, split_layers=None) -> ConversionResult:
    """Convert the layers of ``model`` that ``select(name, module)`` picks (default: every ``nn.Linear``).

    ``config``: the default scheme (a registry name, a scheme config, a classic
    config, or None when only ``overrides`` convert); ``overrides``: per-layer
    schemes / parameters / None (:mod:`sparsekit.schemes.overrides`);
    ``calibrated``: a scheme named without a method takes its calibrated default
    method instead of its data-free one (the entry points set it when they have
    calibration data).  ``calib``: calibration
    batches, needed when a layer's method needs data.  ``commit``: ``"end"``
    (all or nothing: returns the plan in ``result.plan``, not applied) or
    ``"block"`` (each block's new modules replace the old ones as soon as it is
    done).  ``blocks``, ``device``, ``offload``, ``activation_budget``,
    ``progress``: see :func:`sparsekit.calibration.blockwise`.  ``before_run(names)``
    is called once every check has passed, before any calibration.

    Inside :func:`sparsekit.distributed.calibration_group` (distributed calibration), ``split_layers``
    splits the per-layer solves over the group's ranks (:mod:`sparsekit.distributed.split`; None:
    on for GPTQ, SparseGPT and AWQ, whose solves cost more than the broadcast of their results).
    """
    from .calibration import LayerJob, blockwise, check_blockwise_args

    if commit not in ("end", "block"):
        raise ValueError(f"commit must be 'end' or 'block', got {commit!r}")
    check_blockwise_args(blocks, device, offload, activation_budget)
    entries, skipped, shared = _check_targets(model, config, select, overrides, calibrated, what)
    needs = sorted({e[2].method for e in entries.values() if e[2].method_spec.needs_data})
    if needs and calib is None:
        raise ValueError(f"method(s) {needs} need calibration batches: pass calib=")
    if needs and isinstance(calib, (list, tuple)) and len(calib) == 0:
        raise ValueError("calib is empty: give at least one calibration batch")
    names = list(entries)
    if before_run is not None:
        before_run(names)
    order = {n: i for i, n in enumerate(names)}
    layers = {n: {"in_features": e[0].module.in_features, "dtype": e[0].module.weight.dtype}
              for n, e in entries.items()}
    dense = sum(module_bytes(e[0].module) for e in entries.values())
    schemes = {n: e[1].name for n, e in entries.items()}
    configs = {n: e[2] for n, e in entries.items()}
    jobs = [LayerJob(n, e[0].module, e[2].method_spec.stats, e[2].method_options.get("max_rows"),
                     e[2].method_spec.missing) for n, e in entries.items()]
    from .distributed.calibration import current_calibration_group
    from .distributed.split import split_enabled

    group = current_calibration_group()
    split = split_enabled(split_layers, group, [e[2].method for e in entries.values()])
    processor = _Processor(model, entries, commit == "block", group if split else None)
    del entries          # from here on the processor and the jobs hold the only references to the old layers
    try:
        summary = blockwise(model, calib, jobs, processor, blocks=blocks, device=device, offload=offload,
                            activation_budget=activation_budget, progress=progress, desc=desc)
    except BaseException as e:
        if processor.splitter is not None:
            processor.splitter.discard()
        if processor.committed and hasattr(e, "add_note"):
            e.add_note(f"{processor.committed} of {len(names)} layers were already compressed in place when "
                       f"this error happened (compress with inplace=False to keep the input model unchanged)")
        raise
    plan = None
    if commit == "end":
        stash = sorted(processor.stash, key=lambda tm: order[tm[0].name])
        plan = ConversionPlan(model, [t for t, _ in stash], [m for _, m in stash])
    return ConversionResult(model, names, schemes, configs, shared, skipped, layers, dense,
                            processor.compressed_bytes, summary, plan)


# ----------------------------------------------------------------------------- classic configs
@dataclass
class _LinearConfig:
    """Which ``nn.Linear`` layers a config converts.

    include / exclude: regular expressions matched (``re.search``) against the
        module's qualified name; a layer is converted when it matches
        ``include`` (or ``include`` is None) and does not match ``exclude``.
    types: module classes to convert (``nn.Linear`` or subclasses; exact type match).
    backend: forced backend for the new modules (None = automatic).
    """

    include: Optional[str] = None
    exclude: Optional[str] = None
    types: tuple = (nn.Linear,)
    backend: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.types, type):
            self.types = (self.types,)
        try:
            self.types = tuple(self.types)
        except TypeError:
            raise TypeError(f"{type(self).__name__}.types must be a tuple of nn.Linear subclasses, "
                            f"got {self.types!r}") from None
        for t in self.types:
            if not (isinstance(t, type) and issubclass(t, nn.Linear)):
                raise TypeError(f"{type(self).__name__}.types must be nn.Linear subclasses, got {t!r}")
        for key in ("include", "exclude"):
            pat = getattr(self, key)
            if pat is None:
                continue
            if not isinstance(pat, str):
                raise TypeError(f"{type(self).__name__}.{key} must be a regular expression string or None, "
                                f"got {type(pat).__name__}")
            try:
                re.compile(pat)
            except re.error as e:
                raise ValueError(f"{type(self).__name__}.{key}={pat!r} is not a valid regular expression: {e}") \
                    from None
        if self.backend is not None:
            from .ops.dispatch import ALL_BACKENDS

            if not isinstance(self.backend, str) or self.backend not in ALL_BACKENDS + ("auto",):
                raise ValueError(f"{type(self).__name__}.backend must be None, 'auto' or one of {ALL_BACKENDS}, "
                                 f"got {self.backend!r}")

    def matches(self, name: str, module: nn.Module) -> bool:
        if type(module) not in self.types:
            return False
        if self.include is not None and re.search(self.include, name) is None:
            return False
        if self.exclude is not None and re.search(self.exclude, name) is not None:
            return False
        return True

    def scheme_config(self):  # pragma: no cover - abstract
        """The registry scheme config this config stands for."""
        raise NotImplementedError

    def layer_overrides(self) -> Optional[dict]:
        """Per-layer overrides this config carries (None: none)."""
        return None

    def convert(self, module: nn.Linear, name: str = "") -> nn.Module:
        """The replacement for one layer on its own (checked, then built; data-free methods only)."""
        from .schemes import registry

        cfg = self.scheme_config()
        scheme = registry.for_config(cfg)
        t = Target((name,), module)
        return _named(t, scheme.convert, module, cfg)


@dataclass
class Sparse24Config(_LinearConfig):
    """Swap ``nn.Linear`` layers for 2:4 :class:`~sparsekit.nn.SparseLinear` (magnitude mask); the
    registry scheme ``"2:4"``."""

    def scheme_config(self):
        from .schemes import Sparse24Params

        return Sparse24Params(method="magnitude", backend=self.backend)


@dataclass
class BlockSparseConfig(_LinearConfig):
    """Swap ``nn.Linear`` layers for :class:`~sparsekit.nn.BlockSparseLinear` (registry scheme ``"block"``).

    block_size: ``(bm, bk)``, each in {16, 32, 64, 128}.
    sparsity: fraction of blocks dropped (smallest Frobenius norm first) in
        every converted layer, unless the layer is in ``per_layer``.
    per_layer: layer name -> sparsity (e.g. the result of
        :func:`sparsekit.prune.allocate_block_sparsity`), or -> a bool block
        mask (e.g. from :func:`sparsekit.prune.apply_block_masks`).  A shared
        layer may be listed under any of its names (not under two with
        different values).  These become per-layer overrides.
    """

    block_size: tuple = (32, 32)
    sparsity: float = 0.5
    per_layer: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        from .formats.block_sparse import check_block_size

        self.block_size = check_block_size(self.block_size)
        self.sparsity = _check_fraction("sparsity", self.sparsity)
        if not isinstance(self.per_layer, dict):
            raise TypeError(f"per_layer must be a dict layer name -> sparsity or bool block mask, "
                            f"got {type(self.per_layer).__name__}")
        for key, spec in self.per_layer.items():
            if not isinstance(key, str):
                raise TypeError(f"per_layer keys must be layer names (str), got {key!r}")
            if isinstance(spec, torch.Tensor):
                if spec.dtype != torch.bool or spec.dim() != 2:
                    raise TypeError(f"per_layer[{key!r}] must be a sparsity or a 2-D bool block mask, "
                                    f"got a {spec.dtype} tensor of shape {tuple(spec.shape)}")
            else:
                _check_fraction(f"per_layer[{key!r}]", spec)

    def scheme_config(self):
        from .schemes import BlockParams

        return BlockParams(block_size=self.block_size, sparsity=self.sparsity, backend=self.backend)

    def layer_overrides(self) -> Optional[dict]:
        if not self.per_layer:
            return None
        return {k: ({"block_mask": v, "sparsity": None} if isinstance(v, torch.Tensor) else {"sparsity": float(v)})
                for k, v in self.per_layer.items()}


def _check_fraction(what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
    return float(value)


@dataclass
class Int4Config(_LinearConfig):
    """Swap ``nn.Linear`` layers for int4-weight :class:`~sparsekit.nn.QLinear`: the registry schemes
    ``"int4"`` (W4A16), ``"w4a8"`` (``act_bits`` 8 or 4) and ``"mixed"``.

    method: ``"rtn"`` (no data), ``"gptq"`` or ``"awq"`` (both need ``calib``,
        an iterable of model input batches; layers are calibrated one after
        another -- block by block -- with the earlier ones already quantized, on
        scratch copies of the weights: the model's own weights are never modified).
    group_size: 32, 64, 128 or -1 (one group per row); symmetric: zero point 8.
    dtype: compute dtype of the new layers (float16 / bfloat16; default the
        layer's dtype when half precision, else float16).
    method_kwargs: extra arguments for the quantizer (e.g. ``act_order=True``,
        ``damp=0.01`` for GPTQ; ``grid=20`` for AWQ).
    act_bits: None (W4A16, fp16/bf16 activations), 8 (W4A8: per-token dynamic
        int8 activations), 4 (W4A4, a quality baseline) or ``"mixed"``
        (token-adaptive: the top ``frac8`` of tokens by activation norm at 8
        bits, the rest at 4).
    frac8: fraction of tokens kept at 8 bits when ``act_bits="mixed"``.
    """

    group_size: int = 128
    symmetric: bool = False
    method: str = "rtn"
    calib: object = None
    dtype: Optional[torch.dtype] = None
    method_kwargs: dict = field(default_factory=dict)
    act_bits: Optional[Union[int, str]] = None
    frac8: float = 0.25

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.act_bits, bool) or self.act_bits not in (None, 8, 4, "mixed"):
            raise ValueError(f"act_bits must be None (W4A16), 8, 4 or 'mixed', got {self.act_bits!r}")
        if isinstance(self.frac8, bool) or not isinstance(self.frac8, (int, float)) or not 0 <= self.frac8 <= 1:
            raise ValueError(f"frac8 must be a number in [0, 1], got {self.frac8!r}")
        if self.method not in ("rtn", "gptq", "awq"):
            raise ValueError(f"unknown method {self.method!r}; choose 'rtn', 'gptq' or 'awq'")
        if self.method != "rtn" and self.calib is None:
            raise ValueError(f"method={self.method!r} needs calibration data: Int4Config(calib=batches)")
        if isinstance(self.group_size, bool) or self.group_size not in (32, 64, 128, -1):
            raise ValueError(f"group_size must be one of 32, 64, 128, -1, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {self.symmetric!r}")
        if self.dtype is not None and self.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be None, torch.float16 or torch.bfloat16, got {self.dtype!r}")
        if not isinstance(self.method_kwargs, dict):
            raise TypeError(f"method_kwargs must be a dict, got {type(self.method_kwargs).__name__}")
        if self.method_kwargs:
            allowed = {"gptq": ("damp", "block_size", "act_order", "max_rows"),
                       "awq": ("grid", "max_rows"), "rtn": ()}[self.method]
            bad = sorted(k for k in self.method_kwargs if k not in allowed)
            if bad:
                raise ValueError(f"method_kwargs {bad} do not apply to method={self.method!r}; "
                                 f"it takes {list(allowed) or 'none'}")
        self.scheme_config()        # the option values too

    def scheme_config(self):
        from .schemes import Int4Params, MixedParams, W4A8Params

        common = dict(method=self.method, method_options=dict(self.method_kwargs), backend=self.backend,
                      group_size=self.group_size, symmetric=self.symmetric, dtype=self.dtype)
        if self.act_bits is None:
            return Int4Params(**common)
        if self.act_bits == "mixed":
            return MixedParams(frac8=float(self.frac8), **common)
        return W4A8Params(act_bits=self.act_bits, **common)


# ----------------------------------------------------------------------------- entry points
def _resolve(config) -> tuple:
    """``(select, scheme config, per-layer overrides, calib)`` of an entry point's ``config``."""
    from .schemes import SchemeConfig, registry

    if isinstance(config, str):
        if config not in registry:
            raise ValueError(f"unknown config {config!r}; known: {list(registry.names())} "
                             "(or pass a Sparse24Config / BlockSparseConfig / Int4Config or a scheme config)")
        return _exact_linear, registry.get(config).default_config(), None, None
    if isinstance(config, _LinearConfig):
        return config.matches, config.scheme_config(), config.layer_overrides(), getattr(config, "calib", None)
    if isinstance(config, SchemeConfig):
        registry.for_config(config)
        return _exact_linear, config, None, None
    raise TypeError(f"config must be a scheme name ({', '.join(registry.names())}), a scheme config or a "
                    f"Sparse24Config / BlockSparseConfig / Int4Config, got {type(config).__name__}")


def _plan(model, config, filter_fn, progress, desc, calib, overrides, blocks, device, offload, activation_budget,
          kind: Optional[str] = None, process_group=None, split_layers=None) -> ConversionPlan:
    from .schemes import registry

    select, cfg, legacy, cfg_calib = _resolve(config)
    scheme = registry.for_config(cfg)
    label = config if isinstance(config, str) else type(config).__name__
    if kind == "sparsify" and not scheme.sparse:
        raise TypeError(f"{label} quantizes (scheme {scheme.name!r}): use quantize_(model, config)")
    if kind == "quantize" and not scheme.quantized:
        raise TypeError(f"quantize_ takes a quantization scheme or config (e.g. Int4Config or 'int4'), got "
                        f"{label} (scheme {scheme.name!r}); sparsity configs go to sparsify_")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(module, name) -> bool or None, got {type(filter_fn).__name__}")
    if cfg_calib is not None and calib is not None:
        raise ValueError("give the calibration batches once: in the config (calib=) or as calib=, not both")
    calib = calib if calib is not None else cfg_calib
    what = "overrides"
    if legacy:
        if overrides:
            legacy = {**legacy, **overrides}
        else:
            what = f"{type(config).__name__}.per_layer"
        overrides = legacy
    sel = select if filter_fn is None else (lambda n, m: select(n, m) and bool(filter_fn(m, n)))
    from .distributed.calibration import calibration_group

    with calibration_group(process_group):
        result = convert_model(model, cfg, calib=calib, select=sel, overrides=overrides,
                               calibrated=calib is not None, commit="end", blocks=blocks, device=device,
                               offload=offload, activation_budget=activation_budget, progress=progress, desc=desc,
                               what=what, split_layers=split_layers)
    return result.plan


def plan_conversion(model: nn.Module, config, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                    progress: bool = False, desc: Optional[str] = None, *, calib=None, overrides=None,
                    blocks="auto", device=None, offload: Optional[bool] = None,
                    activation_budget: Optional[int] = None, process_group=None,
                    split_layers=None) -> ConversionPlan:
    """Find the targets of ``config`` (and ``filter_fn(module, name)``), validate every one, calibrate and
    build every new module.  The model is not changed; ``plan.apply()`` swaps the new modules in.
    ``process_group`` / ``split_layers``: as in :func:`quantize_`."""
    return _plan(model, config, filter_fn, progress, desc or "convert", calib, overrides, blocks, device, offload,
                 activation_budget, process_group=process_group, split_layers=split_layers)


def quantize_(model: nn.Module, config="int4", filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
              progress: bool = True, *, calib=None, overrides=None, blocks="auto", device=None,
              offload: Optional[bool] = None, activation_budget: Optional[int] = None, process_group=None,
              split_layers=None) -> nn.Module:
    """Replace matching ``nn.Linear`` layers of ``model`` by quantized modules, in place; returns ``model``.

    ``config``: ``"int4"`` (RTN, group 128, asymmetric), another quantization
    scheme's name (``"w4a8"``, ``"mixed"``, ``"w8a8"``, ``"2:4+int4"``,
    ``"2:4+int8"``), a scheme config (``Int4Params(method="gptq")``) or an
    :class:`Int4Config`.  ``calib``: calibration batches for GPTQ / AWQ (or in
    ``Int4Config(calib=...)``).  ``overrides``: per-layer schemes, parameters or
    None (:mod:`sparsekit.schemes.overrides`).  ``blocks`` / ``device`` /
    ``offload`` / ``activation_budget``: block-by-block calibration
    (:func:`sparsekit.calibration.blockwise`).  All or nothing: every layer is
    validated, calibrated (on scratch copies of the weights) and built before
    any is replaced; on error the model is unchanged.

    ``process_group`` (a ``torch.distributed`` group or 1-D ``DeviceMesh``): distributed
    calibration -- every rank calls ``quantize_`` with the same model and arguments and its own
    share of ``calib`` (at least one batch); the input statistics are summed over the group
    (:mod:`sparsekit.distributed.calibration`), so every rank builds the model that calibrating
    on the union gives.  ``split_layers``: each rank solves only its share of the layers of
    every sequential group and the owners broadcast the results (codes, scales, zeros, masks)
    (:mod:`sparsekit.distributed.split`); None (default): on with a process group for GPTQ /
    AWQ / SparseGPT.
    """
    return _plan(model, config, filter_fn, progress, "quantize_", calib, overrides, blocks, device, offload,
                 activation_budget, kind="quantize", process_group=process_group,
                 split_layers=split_layers).apply()


def sparsify_(model: nn.Module, config="2:4", filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
              progress: bool = True, *, calib=None, overrides=None, blocks="auto", device=None,
              offload: Optional[bool] = None, activation_budget: Optional[int] = None, process_group=None,
              split_layers=None) -> nn.Module:
    """Replace matching layers of ``model`` in place; returns ``model``.

    ``config``: ``"2:4"``, ``"block"``, another sparsity scheme's name
    (``"2:4+int8"``, ``"2:4+int4"``), a scheme config
    (``Sparse24Params(method="sparsegpt")``, with ``calib``), a
    :class:`Sparse24Config` or a :class:`BlockSparseConfig`.
    ``filter_fn(module, name)`` further restricts which matching layers are
    converted; ``overrides`` gives layers other schemes or parameters.  All or
    nothing: every layer is validated and its replacement built before any is
    swapped in; on error the model is unchanged.  A tqdm bar shows progress
    (``progress=False`` hides it).  ``process_group`` / ``split_layers``: distributed calibration,
    as in :func:`quantize_`.
    """
    return _plan(model, config, filter_fn, progress, "sparsify_", calib, overrides, blocks, device, offload,
                 activation_budget, kind="sparsify", process_group=process_group,
                 split_layers=split_layers).apply()
