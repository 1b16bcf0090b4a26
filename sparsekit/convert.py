"""Whole-model conversion: ``sparsify_(model, config)`` and ``quantize_(model, config)``.

Every conversion is all-or-nothing, in two phases:

1. **plan** (:func:`plan_conversion`, or :func:`find_targets` +
   :func:`check_targets` + :func:`build_plan` for callers with their own
   calibration step): find every module to replace, validate every one of
   them, run any calibration, and build every replacement module.  The model
   is not changed (calibration works on scratch copies of the weights).
2. **apply** (:meth:`ConversionPlan.apply`): swap all the new modules in at
   once.

An error in phase 1 leaves the model exactly as it was (same module objects,
equal ``state_dict``); the error names the layer.

* A module object that appears under several names (the same ``nn.Linear``
  used twice) is one target: it is converted once and the new module is put
  at every one of its names, so it stays shared.  It is converted everywhere
  or nowhere: a config whose ``include``/``exclude``/``filter_fn`` selects it
  under some names and not others raises ``ValueError``.
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
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["Sparse24Config", "BlockSparseConfig", "Int4Config", "sparsify_", "quantize_",
           "Target", "ConversionPlan", "find_targets", "check_targets", "check_linear", "build_plan",
           "plan_conversion", "scratch_weights", "check_calibration"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def check_linear(module: nn.Module) -> None:
    """Checks every conversion of an ``nn.Linear`` needs: a materialized, finite, floating-point
    ``(out_features, in_features)`` weight with both sizes positive (ValueError / TypeError)."""
    if not isinstance(module, nn.Linear):
        raise TypeError(f"expected an nn.Linear, got {type(module).__name__}")
    w = module.weight
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"weight must be a tensor, got {type(w).__name__}")
    if w.device.type == "meta":
        raise ValueError("weight is on the meta device (not materialized); materialize the model first "
                         "(e.g. model.to_empty(device=...) and load its weights)")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be float16, bfloat16, float32 or float64, got {w.dtype}")
    n, k = module.out_features, module.in_features
    if n < 1 or k < 1:
        raise ValueError(f"cannot convert a layer with out_features={n}, in_features={k}; both must be >= 1")
    if tuple(w.shape) != (n, k):
        raise ValueError(f"weight has shape {tuple(w.shape)}, expected (out_features, in_features) = {(n, k)}")
    bad = int((~torch.isfinite(w.detach())).sum())
    if bad:
        raise ValueError(f"weight has {bad} non-finite value(s) (NaN/Inf); compression needs a finite weight")
    b = module.bias
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (n,)):
        raise ValueError(f"bias must have shape ({n},), got "
                         f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}")


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
    from .calibration import model_device, reiterable, split_batch

    batches = reiterable(calib)
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("calib yielded no batches: give at least one calibration batch")
    x = split_batch(first)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(x.to(model_device(model, {})))
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


# ----------------------------------------------------------------------------- configs
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

    # the plan's steps, in order; subclasses override check / prepare / build
    def check_all(self, targets: Sequence[Target]) -> None:
        """Checks over the whole set of targets (before any per-layer check)."""

    def check(self, module: nn.Module, name: str) -> None:
        """Cheap per-layer validation, run on every target before any calibration or building."""
        check_linear(module)

    def prepare(self, model: nn.Module, targets: Sequence[Target], progress: bool) -> dict:
        """Work shared by all targets before building (calibration); returns the context
        :meth:`build` receives.  Must not change the model."""
        return {}

    def build(self, target: Target, ctx: dict) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def convert(self, module: nn.Linear, name: str) -> nn.Module:
        """The replacement for one layer on its own (checked, then built; no calibration)."""
        self.check(module, name)
        return self.build(Target((name,), module), {})


def plan_conversion(model: nn.Module, config, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                    progress: bool = False, desc: Optional[str] = None) -> ConversionPlan:
    """Phase 1 of a conversion: find the targets of ``config`` (and ``filter_fn(module, name)``),
    validate every one, run the config's calibration and build every new module.  The model is
    not changed; ``plan.apply()`` swaps the new modules in."""
    cfg = _resolve(config)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(module, name) -> bool or None, got {type(filter_fn).__name__}")
    targets = find_targets(model, lambda n, m: cfg.matches(n, m) and (filter_fn is None or bool(filter_fn(m, n))))
    cfg.check_all(targets)
    check_targets(targets, cfg.check)
    ctx = cfg.prepare(model, targets, progress) if targets else {}
    return build_plan(model, targets, lambda t: cfg.build(t, ctx), progress=progress,
                      desc=desc or type(cfg).__name__)


@dataclass
class Sparse24Config(_LinearConfig):
    """Swap ``nn.Linear`` layers for 2:4 :class:`~sparsekit.nn.SparseLinear` (magnitude mask)."""

    def build(self, target: Target, ctx: dict) -> nn.Module:
        from .nn import SparseLinear

        return SparseLinear.from_dense(target.module, pattern="2:4", backend=self.backend)


def _spec_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu())))
    return a == b


@dataclass
class BlockSparseConfig(_LinearConfig):
    """Swap ``nn.Linear`` layers for :class:`~sparsekit.nn.BlockSparseLinear`.

    block_size: ``(bm, bk)``, each in {16, 32, 64, 128}.
    sparsity: fraction of blocks dropped (smallest Frobenius norm first) in
        every converted layer, unless the layer is in ``per_layer``.
    per_layer: layer name -> sparsity (e.g. the result of
        :func:`sparsekit.prune.allocate_block_sparsity`), or -> a bool block
        mask (e.g. from :func:`sparsekit.prune.apply_block_masks`).  A shared
        layer may be listed under any of its names (not under two with
        different values).
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

    def _spec(self, names: Sequence[str]):
        found = [(n, self.per_layer[n]) for n in names if n in self.per_layer]
        for n, s in found[1:]:
            if not _spec_equal(found[0][1], s):
                raise ValueError(f"per_layer gives the shared layer different values under {found[0][0]!r} and {n!r}")
        return found[0][1] if found else self.sparsity

    def check_all(self, targets: Sequence[Target]) -> None:
        known = {n for t in targets for n in t.names}
        unknown = set(self.per_layer) - known
        if unknown:
            raise ValueError(f"BlockSparseConfig.per_layer names layers that are not converted: {sorted(unknown)}")
        for t in targets:
            _named(t, self._spec, t.names)

    def build(self, target: Target, ctx: dict) -> nn.Module:
        from .nn import BlockSparseLinear

        spec = self._spec(target.names)
        if isinstance(spec, torch.Tensor):
            return BlockSparseLinear.from_dense(target.module, self.block_size, block_mask=spec,
                                                backend=self.backend)
        return BlockSparseLinear.from_dense(target.module, self.block_size, sparsity=float(spec),
                                            backend=self.backend)


def _check_fraction(what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
    return float(value)


@dataclass
class Int4Config(_LinearConfig):
    """Swap ``nn.Linear`` layers for int4-weight :class:`~sparsekit.nn.QLinear` (W4A16, or W4A8 / mixed).

    method: ``"rtn"`` (no data), ``"gptq"`` or ``"awq"`` (both need ``calib``,
        an iterable of model input batches; layers are calibrated one after
        another with the earlier ones already quantized, on scratch copies of
        the weights: the model's own weights are never modified).
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
            import inspect

            from .quant import quantize_model_weights

            params = inspect.signature(quantize_model_weights).parameters
            allowed = {"gptq": ("damp", "block_size", "act_order", "max_rows"),
                       "awq": ("grid", "max_rows"), "rtn": ()}[self.method]
            bad = sorted(k for k in self.method_kwargs if k not in allowed or k not in params)
            if bad:
                raise ValueError(f"method_kwargs {bad} do not apply to method={self.method!r}; "
                                 f"it takes {list(allowed) or 'none'}")

    def check(self, module: nn.Module, name: str) -> None:
        check_linear(module)
        from .quant.rtn import check_quant_args

        k = module.in_features
        if k % 8:
            raise ValueError(f"in_features K={k} is not a multiple of 8 (int4 packs 8 codes per int32 word)")
        check_quant_args(k, self.group_size, 4)

    def prepare(self, model: nn.Module, targets: Sequence[Target], progress: bool) -> dict:
        if self.method == "rtn":
            return {}
        from .quant import quantize_model_weights

        layers = {t.name: t.module for t in targets}
        calib = check_calibration(model, self.calib)
        with scratch_weights(targets):
            results = quantize_model_weights(model, calib, method=self.method, group_size=self.group_size,
                                             symmetric=self.symmetric, bits=4, layers=layers, progress=progress,
                                             **self.method_kwargs)
        return {"results": results}

    def build(self, target: Target, ctx: dict) -> nn.Module:
        from .nn import QLinear

        if self.method == "rtn":
            return QLinear.from_float(target.module, group_size=self.group_size, symmetric=self.symmetric,
                                      dtype=self.dtype, backend=self.backend, act_bits=self.act_bits,
                                      frac8=self.frac8)
        if "results" not in ctx:
            raise ValueError(f"method={self.method!r} builds from calibration results: use quantize_ or "
                             f"plan_conversion, which calibrate first")
        return QLinear.from_quant_result(target.module, ctx["results"][target.name], dtype=self.dtype,
                                         backend=self.backend, act_bits=self.act_bits, frac8=self.frac8)


_NAMED = {"2:4": Sparse24Config, "int4": Int4Config}


def _resolve(config) -> _LinearConfig:
    if isinstance(config, str):
        try:
            return _NAMED[config]()
        except KeyError:
            raise ValueError(f"unknown config {config!r}; known: {sorted(_NAMED)} "
                             "(or pass a Sparse24Config / BlockSparseConfig / Int4Config)") from None
    if isinstance(config, _LinearConfig):
        return config
    raise TypeError(f"config must be a config object or one of {sorted(_NAMED)}, got {type(config).__name__}")


# ----------------------------------------------------------------------------- entry points
def quantize_(model: nn.Module, config: Union[str, Int4Config] = "int4",
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, progress: bool = True) -> nn.Module:
    """Replace matching ``nn.Linear`` layers of ``model`` by int4 :class:`~sparsekit.nn.QLinear`, in place.

    ``config`` is ``"int4"`` (RTN, group 128, asymmetric) or an
    :class:`Int4Config`.  All or nothing: every layer is validated,
    calibrated (on scratch copies of the weights) and built before any is
    replaced; on error the model is unchanged.  Returns ``model``.
    """
    cfg = _resolve(config)
    if not isinstance(cfg, Int4Config):
        raise TypeError(f"quantize_ takes an Int4Config (or 'int4'), got {type(cfg).__name__}; "
                        "sparsity configs go to sparsify_")
    return plan_conversion(model, cfg, filter_fn, progress=progress, desc="quantize_").apply()


def sparsify_(model: nn.Module, config: Union[str, _LinearConfig] = "2:4",
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, progress: bool = True) -> nn.Module:
    """Replace matching layers of ``model`` in place; returns ``model``.

    ``config`` is ``"2:4"``, a :class:`Sparse24Config` or a
    :class:`BlockSparseConfig`.  ``filter_fn(module, name)`` further restricts
    which matching layers are converted.  All or nothing: every layer is
    validated and its replacement built before any is swapped in; on error
    the model is unchanged.  A tqdm bar shows progress (``progress=False``
    hides it).
    """
    cfg = _resolve(config)
    if isinstance(cfg, Int4Config):
        raise TypeError("Int4Config quantizes: use quantize_(model, config)")
    return plan_conversion(model, cfg, filter_fn, progress=progress, desc="sparsify_").apply()
