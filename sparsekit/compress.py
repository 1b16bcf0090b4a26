"""One-call model compression: calibrate, compress block by block, in place; report size, quality and speed.

``compress(model, calib, scheme, method, **options) -> (model, report)``

Every scheme of the registry (:mod:`sparsekit.schemes`) works here:

============ ============================ ===================================================================
scheme       methods (default)            modules in the compressed model
============ ============================ ===================================================================
``2:4``      magnitude, wanda, sparsegpt  :class:`~sparsekit.nn.SparseLinear` (values + 2-bit metadata)
             (sparsegpt)
``2:4+int8`` the same                     :class:`~sparsekit.nn.SparseLinear` ``act_bits=8`` (W8A8 2:4)
``block``    magnitude                    :class:`~sparsekit.nn.BlockSparseLinear` (``block_size``, ``sparsity``)
``w8a8``     rtn                          :class:`~sparsekit.nn.QLinear` ``bits=8`` (int8 weights and activations)
``w4a8``     rtn, gptq, awq (gptq)        :class:`~sparsekit.nn.QLinear` int4, ``act_bits=8``
``mixed``    rtn, gptq, awq (gptq)        :class:`~sparsekit.nn.QLinear` int4, token-adaptive 4/8-bit activations
``int4``     rtn, gptq, awq (gptq)        :class:`~sparsekit.nn.QLinear` (packed nibbles, fp16 group scales)
``2:4+int4`` as 2:4 (sparsegpt)           :class:`~sparsekit.nn.SparseQLinear` (2:4 metadata + int4 kept values)
============ ============================ ===================================================================

``2:4+int4`` prunes with the method (SparseGPT compensates the kept weights
for the pruned ones), then quantizes the kept values round-to-nearest,
group-wise along the compressed row (``group_size`` counts kept values, i.e.
``2 * group_size`` dense input features; default the largest of 128/64/32
that divides it).

**Memory.**  The model is compressed in place (``inplace=True``, the
default): no copy of it is made.  Calibration runs block by block over the
model's repeated blocks (:func:`sparsekit.calibration.blockwise`): the first
block's inputs are recorded once, each block is calibrated on them, and its
compressed outputs feed the next block.  As soon as a block is done its new
modules replace the dense layers, so the memory in use is the model, one
block's scratch weights and statistics, and the activations of the
calibration batches between two blocks.  With ``device="cuda"`` and the model
on CPU, only the block being calibrated (and the activations, within
``activation_budget``) is on the GPU.  ``inplace=False`` compresses a deep copy
and leaves the input untouched (twice the model's memory).

**Errors.**  Every argument and every selected layer is validated before
anything runs.  With ``inplace=True`` an error raised after the first block
was compressed leaves those blocks compressed (the error says how many
layers); with ``inplace=False`` the input model never changes.

**Quality** (``quality_fn`` given): the dense quality is measured before
compressing (or taken from ``dense_quality``), the compressed quality after,
on the same model object -- no second copy.  Modules that compute in
float16/bfloat16 only are evaluated in the model's float dtype: int4 QLinear
layers as float activations times their dequantized weight (the int4 codes
times the stored scales; no activation rounding), activation-quantized layers
(W4A8, mixed, W8A8, 2:4+int8) by their own kernels on inputs cast to their
compute dtype.  ``report["quality_on"]`` says which.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from typing import Callable, Optional

import torch
from torch import nn

from .convert import module_bytes
from .nn._state import upgrade_state_dict

__all__ = ["SCHEMES", "SCHEME_METHODS", "DEFAULT_METHOD", "compress", "save_compressed", "load_compressed",
           "check_output_path", "module_bytes", "evaluation_forwards"]

_FORMAT_ARGS = ("block_size", "sparsity", "group_size", "symmetric", "dtype")


def __getattr__(name):
    # the registry's view, computed on use (so that plug-in schemes appear too)
    from .schemes import registry

    if name == "SCHEME_METHODS":
        return {s.name: tuple(s.methods) for s in registry}
    if name == "SCHEMES":
        return registry.names()
    if name == "DEFAULT_METHOD":
        return {s.name: s.config_cls.CALIBRATED_METHOD for s in registry}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _join(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def option_names(method: str) -> dict:
    """compress's keyword -> the method's option name (``<method>_block_size`` for ``block_size``)."""
    from .schemes import METHODS

    return {(f"{method}_block_size" if o == "block_size" else o): o for o in METHODS[method].options}


def _select_layers(model: nn.Module, layers):
    """``select(name, module)`` for :func:`sparsekit.convert.find_targets` from compress's ``layers``."""
    from collections.abc import Mapping

    if layers is None:
        return lambda n, m: isinstance(m, nn.Linear)
    if isinstance(layers, Mapping):
        items = list(layers.items())
    elif isinstance(layers, (list, tuple)):
        items = [(n, None) for n in layers]
    else:
        raise TypeError(f"layers must be None, a list of layer names or a dict name -> nn.Linear, "
                        f"got {type(layers).__name__}")
    if not items:
        raise ValueError("layers is empty")
    for name, mod in items:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings, got {name!r}")
        try:
            found = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"layers: the model has no submodule named {name!r}") from None
        if mod is not None and found is not mod:
            raise ValueError(f"layers[{name!r}] is not the model's module at {name!r}")
        if not isinstance(found, nn.Linear):
            raise TypeError(f"layers: {name!r} must be an nn.Linear, got {type(found).__name__}")
    wanted = {n for n, _ in items}
    return lambda n, m: n in wanted


def scheme_config(scheme: str, method: Optional[str] = None, block_size=None, sparsity=None, group_size=None,
                  symmetric=None, dtype=None, **method_options):
    """The registry config ``compress`` builds from its arguments (defaults: the scheme's calibrated method;
    int4-family group size None = the largest of 128/64/32 dividing every layer).  ValueError / TypeError
    for an unknown scheme, a method or an argument that does not apply to it, or a bad value."""
    from .schemes import registry

    if not isinstance(scheme, str) or scheme not in registry:
        raise ValueError(f"unknown scheme {scheme!r}; supported: {registry.names()}")
    s = registry.get(scheme)
    if method is not None and (not isinstance(method, str) or method not in s.methods):
        raise ValueError(f"method {method!r} does not apply to scheme {scheme!r}; choose from {s.methods}")
    method = method or s.config_cls.CALIBRATED_METHOD
    given = {"block_size": block_size, "sparsity": sparsity, "group_size": group_size, "symmetric": symmetric,
             "dtype": dtype}
    known = {f.name for f in dataclasses.fields(s.config_cls)}
    for arg, value in given.items():
        if value is not None and arg not in known:
            raise ValueError(f"{arg}={value!r} does not apply to scheme {scheme!r} "
                             f"(only to {_join(registry.with_field(arg))})")
    allowed = option_names(method)
    bad = sorted(k for k in method_options if k not in allowed)
    if bad:
        raise ValueError(f"option(s) {bad} do not apply to scheme {scheme!r} with method {method!r}; "
                         f"it takes {list(allowed) or 'none'}")
    params = {k: v for k, v in given.items() if v is not None}
    if "group_size" in known:
        params.setdefault("group_size", None)       # None: the largest group size that fits
    return s.config(method=method, method_options={allowed[k]: v for k, v in method_options.items()}, **params)


@contextlib.contextmanager
def evaluation_forwards(model: nn.Module):
    """Within the block, modules that compute in float16/bfloat16 only take the model's float dtype
    (:meth:`Scheme.eval_forward`; e.g. int4 QLinear: float activations on the dequantized weight).
    Yields the names of the schemes whose modules were switched."""
    from .schemes import registry

    switched = []
    used = []
    try:
        for mod in {id(m): m for m in model.modules()}.values():
            scheme = registry.for_module(mod)
            fwd = scheme.eval_forward(mod) if scheme is not None else None
            if fwd is not None:
                mod.forward = fwd
                switched.append(mod)
                if scheme.name not in used:
                    used.append(scheme.name)
        yield used
    finally:
        for mod in switched:
            del mod.forward


def _quality_on(used: list) -> str:
    if not used:
        return "compressed model"
    parts = []
    if "int4" in used:
        parts.append("int4 layers (W4A16): the model's float activations times their dequantized weight "
                     "(int4 codes x stored scales), no activation rounding")
    act = [u for u in used if u != "int4"]
    if act:
        parts.append(f"{_join(act)} layers: their own kernels on inputs cast to their compute dtype")
    return "compressed model; " + "; ".join(parts)


def compress(model: nn.Module, calib=None, scheme: str = "2:4", method: Optional[str] = None, *,
             quality_fn: Optional[Callable[[nn.Module], float]] = None, dense_quality: Optional[float] = None,
             layers=None, overrides=None, progress: bool = False, block_size=None, sparsity: Optional[float] = None,
             group_size: Optional[int] = None, symmetric: Optional[bool] = None, dtype: Optional[torch.dtype] = None,
             speed: str = "auto", inplace: bool = True, blocks="auto", device=None, offload: Optional[bool] = None,
             activation_budget: Optional[int] = None, process_group=None, split_layers=None, **method_options):
    """Compress ``model``'s linear layers; returns ``(model, report)`` (the same object unless ``inplace=False``).

    ``scheme``: a registry name (``"2:4"``, ``"2:4+int8"``, ``"block"``, ``"w8a8"``, ``"w4a8"``,
    ``"mixed"``, ``"int4"``, ``"2:4+int4"``, or a plug-in's); ``method``: its calibration
    method (default: the scheme's calibrated one, e.g. sparsegpt for 2:4, gptq for int4).
    ``calib``: calibration batches (tensors or ``(x, ...)`` tuples fed as ``model(x)``),
    needed by wanda, sparsegpt, gptq and awq.  ``layers``: which ``nn.Linear`` layers
    (None = all; a list of qualified names, or a dict name -> layer of ``model``).
    ``overrides``: per-layer schemes, parameters or None (skip), keyed by name,
    ``"re:<regex>"`` or ``"_default"`` (:mod:`sparsekit.schemes.overrides`).
    ``block_size`` (default ``(32, 32)``), ``sparsity`` (default 0.5): block scheme only.
    ``group_size`` (default: the largest of 128/64/32 dividing every layer's in_features),
    ``symmetric`` (default False), ``dtype`` (compute dtype of the quantized modules, default
    the layer's half dtype, else float16): the schemes that have them.  An argument given to
    a scheme it does not apply to raises ``ValueError``.  Other keywords go to the method:
    ``sparsegpt_block_size``, ``damp`` (sparsegpt); ``gptq_block_size``, ``damp``,
    ``act_order``, ``max_rows`` (gptq); ``grid``, ``max_rows`` (awq); anything else raises
    ``ValueError``.

    ``inplace`` (default True): compress the given model (see the module docstring for
    memory and errors); False compresses a deep copy.  ``blocks``, ``device``, ``offload``,
    ``activation_budget``: block-by-block calibration with offloading
    (:func:`sparsekit.calibration.blockwise`; ``device="cuda"`` calibrates a CPU model on the
    GPU one block at a time).  ``progress``: a bar over the blocks and a summary line.

    All arguments and every selected layer are validated (group sizes against every
    layer's ``in_features``, materialized finite weights, no tied weights; see
    :mod:`sparsekit.convert`) before any calibration.  The model is returned in eval mode.
    A module shared by several names stays shared.

    The report holds ``scheme``, ``method``, ``config`` (the scheme config as JSON),
    ``layers`` (converted names; a shared layer once, by its first name), ``num_layers``,
    ``dense_bytes``/``compressed_bytes`` (whole model, parameters + buffers),
    ``layer_dense_bytes``/``layer_compressed_bytes`` (converted layers only), ``ratio``
    (layer compressed / dense), the scheme's parameters, ``calibration`` (blocks, time,
    peak memory), ``shared`` (when some layers are shared: first name -> every name),
    ``layer_schemes`` and ``skipped`` (with ``overrides``), and with ``quality_fn``
    ``quality_dense``, ``quality`` and ``quality_on``.

    ``speed``: ``"auto"`` (default) times the dense and the compressed model's forward on
    the first calibration batch when the model's parameters are on a CUDA device
    (``triton.testing.do_bench`` medians, after warm-up; the dense timing is taken before
    compressing) and reports ``latency_dense_ms``, ``latency_ms``, ``speedup`` and
    ``speed_on``; on CPU it records ``speed = "not measured: ..."``.  ``"off"`` skips it.

    ``process_group`` (a ``torch.distributed`` group or 1-D ``DeviceMesh``): distributed
    calibration -- every rank calls ``compress`` with the same model and arguments and its own
    share of the calibration batches (at least one); the calibration statistics are summed
    over the group, so every rank builds the model that calibrating on the union gives
    (:mod:`sparsekit.distributed.calibration`).  ``split_layers``: each rank solves only its share of
    the layers of every sequential group and the owners broadcast the results
    (:mod:`sparsekit.distributed.split`; same model); None (default): on with a process group
    for gptq, awq and sparsegpt.
    """
    from .convert import _check_targets, convert_model
    from .schemes import registry

    cfg = scheme_config(scheme, method, block_size=block_size, sparsity=sparsity, group_size=group_size,
                        symmetric=symmetric, dtype=dtype, **method_options)
    method = cfg.method
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if speed not in ("auto", "off"):
        raise ValueError(f"speed must be 'auto' or 'off', got {speed!r}")
    if quality_fn is not None and not callable(quality_fn):
        raise TypeError(f"quality_fn must be callable(model) -> float or None, got {type(quality_fn).__name__}")
    if dense_quality is not None and (isinstance(dense_quality, bool) or not isinstance(dense_quality, (int, float))):
        raise TypeError(f"dense_quality must be a number or None, got {dense_quality!r}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    if cfg.method_spec.needs_data:
        if calib is None:
            raise ValueError(f"method {method!r} needs calibration batches: compress(model, calib, ...)")
        if isinstance(calib, (list, tuple)) and len(calib) == 0:
            raise ValueError("calib is empty: give at least one calibration batch")
    select = _select_layers(model, layers)
    if not inplace:
        _check_targets(model, cfg, select, overrides, calib is not None, "overrides")    # fail before copying
        model = copy.deepcopy(model)

    state = {}

    def before_run(names):
        if not names:
            raise ValueError("the model has no nn.Linear layers to compress" if overrides is None else
                             "no layers are left to compress (the overrides skip every selected layer)")
        state["dense_bytes"] = module_bytes(model)
        if quality_fn is not None:
            state["quality_dense"] = float(quality_fn(model) if dense_quality is None else dense_quality)
        if speed == "auto":
            state["speed"] = _time_forward(model, calib)

    from .distributed.calibration import calibration_group

    with calibration_group(process_group):
        result = convert_model(model, cfg, calib=calib, select=select, overrides=overrides,
                               calibrated=calib is not None, commit="block", blocks=blocks, device=device,
                               offload=offload, activation_budget=activation_budget, progress=progress,
                               desc="compress", before_run=before_run, split_layers=split_layers)
    model.eval()
    names = result.names
    primary = [n for n in names if result.schemes[n] == scheme]
    details = {}
    if primary:
        resolved = result.configs[primary[0]]
        details = registry.get(scheme).report_details(resolved, {n: result.layers[n] for n in primary})
        cfg = resolved
    try:
        cfg_json = cfg.to_dict()
    except TypeError:
        cfg_json = None
    layer_bytes = result.layer_compressed_bytes
    report = {
        "scheme": scheme, "method": method, "layers": names, "num_layers": len(names),
        "dense_bytes": state["dense_bytes"], "compressed_bytes": module_bytes(model),
        "layer_dense_bytes": result.layer_dense_bytes, "layer_compressed_bytes": layer_bytes,
        "ratio": layer_bytes / max(result.layer_dense_bytes, 1),
        **details,
        "config": cfg_json, "inplace": inplace,
        "calibration": result.calibration.as_dict() if result.calibration is not None else None,
    }
    if result.shared:
        report["shared"] = result.shared
    if overrides is not None:
        report["layer_schemes"] = dict(result.schemes)
        report["skipped"] = list(result.skipped)
    if quality_fn is not None:
        report["quality_dense"] = state["quality_dense"]
        with evaluation_forwards(model) as used:
            report["quality"] = float(quality_fn(model))
        report["quality_on"] = _quality_on(used)
    if speed == "auto":
        report.update(_speed_report(state["speed"], model, calib))
    return model, report


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _time_forward(model: nn.Module, calib):
    """``(milliseconds, input description)`` of the model's forward on the first calibration batch
    (CUDA only), or the reason it is not measured."""
    dev = _model_device(model)
    if dev.type != "cuda":
        return ("not measured: the model is not on a CUDA device (CPU runs use the reference or "
                "interpreter backends, whose timings say nothing about the kernels)")
    from .calibration import model_input

    first = next(iter(calib), None) if calib is not None else None
    if first is None:
        return "not measured: no calibration batch to time the forward on"
    import triton.testing

    x = model_input(first, model, None, dev)
    with torch.no_grad():
        ms = float(triton.testing.do_bench(lambda: model(x), warmup=25, rep=100, return_mode="median"))
    return ms, f"{torch.cuda.get_device_name(dev)}, input {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"


def _speed_report(dense, compressed: nn.Module, calib) -> dict:
    """Forward latency of the dense (measured before compressing) and the compressed model (CUDA only)."""
    if isinstance(dense, str):
        return {"speed": dense}
    after = _time_forward(compressed, calib)
    if isinstance(after, str):
        return {"speed": after}
    t_dense, on = dense
    t_comp = after[0]
    return {"latency_dense_ms": t_dense, "latency_ms": t_comp, "speedup": t_dense / t_comp, "speed_on": on}


def _fspath(path, what: str) -> str:
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str) or not path:
        raise TypeError(f"{what}: path must be a non-empty str or os.PathLike, got {path!r}")
    return path


def _blocking_file(path: str) -> Optional[str]:
    """The regular file among ``path``'s ancestors that makes it impossible to create, if any."""
    probe = os.path.dirname(os.path.abspath(path))
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if probe and os.path.exists(probe) and not os.path.isdir(probe):
        return probe
    return None


def check_output_path(path, what: str = "save_compressed") -> str:
    """Validate a file path to write (no directory there, no regular file among its parents);
    returns it as a str.  Raises IsADirectoryError / NotADirectoryError / TypeError."""
    path = _fspath(path, what)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what}: {path!r} is a directory; give a file path, "
                                f"e.g. {os.path.join(path, 'model.safetensors')!r}")
    blocker = _blocking_file(path)
    if blocker is not None:
        raise NotADirectoryError(f"{what}: cannot write {path!r}: {blocker!r} is a regular file, not a directory")
    return path


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, then rename it over ``path``.

    The temporary file is created with mode 0o666 (``O_EXCL``), which the
    kernel reduces by the process umask; that mode is set again after
    ``write`` (a writer may replace the file: safetensors 0.8's ``save_file``
    leaves a new one with mode 0o600).  So the result has the mode a plain
    ``open(path, "w")`` gives (e.g. 0o644 under umask 022), not ``mkstemp``'s
    0o600, and the process umask is never read or changed.
    """
    import secrets

    d = os.path.dirname(os.path.abspath(path))
    for _ in range(100):
        tmp = os.path.join(d, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise FileExistsError(f"could not create a temporary file next to {path!r}")
    try:
        mode = os.fstat(fd).st_mode & 0o777        # 0o666 & ~umask, as the kernel applied it
    finally:
        os.close(fd)
    try:
        write(tmp)
        if os.stat(tmp).st_mode & 0o777 != mode:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # a dependency of the base install; only a broken environment lacks it
        raise ImportError(f"save_compressed / load_compressed need the safetensors package "
                          f"(pip install safetensors): {e}") from e
    return st


def tensors_to_save(sd: dict, what: str) -> dict:
    """``sd`` as safetensors can store it: detached CPU tensors, tensors that share storage (and
    non-contiguous ones) as independent contiguous copies.  TypeError for a non-tensor entry, ValueError
    for a tensor on the meta device."""
    seen = set()
    out = {}
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: state_dict entry {k!r} is a {type(t).__name__}, not a tensor "
                            f"(safetensors stores tensors only)")
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(f"{what}: {k!r} is on the meta device (no data to save)")
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else None
        if key is not None and key in seen or not t.is_contiguous():
            t = t.clone().contiguous()
        elif key is not None:
            seen.add(key)
        out[k] = t.cpu()
    return out


def save_compressed(model: nn.Module, path, report: Optional[dict] = None) -> tuple:
    """Write ``model.state_dict()`` to ``path`` with safetensors and ``report`` as JSON next to it
    (``<path without .safetensors>.json``, or ``report.json`` when the file is ``model.safetensors``).

    Missing parent directories are created.  Each file is written to a temporary
    file in the same directory and renamed into place, so a failed save never
    leaves a truncated file.  A directory given as ``path`` raises
    IsADirectoryError, a regular file among its parents NotADirectoryError.
    Tensors that share storage are saved as independent contiguous copies (safetensors refuses
    aliases); loading them back with ``load_state_dict`` restores the same values.
    Returns ``(weights_path, report_path or None)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_compressed: model must be an nn.Module, got {type(model).__name__}")
    if report is not None and not isinstance(report, dict):
        raise TypeError(f"save_compressed: report must be a dict or None, got {type(report).__name__}")
    path = check_output_path(path)
    rpath = None
    if report is not None:
        base = os.path.basename(path)
        rname = "report.json" if base == "model.safetensors" else os.path.splitext(base)[0] + ".json"
        rpath = os.path.join(os.path.dirname(os.path.abspath(path)), rname)
        if os.path.abspath(rpath) == os.path.abspath(path):
            raise ValueError(f"save_compressed: the report would overwrite the weights at {path!r}; "
                             f"give the weights a .safetensors name")
        check_output_path(rpath)
    st = _safetensors()
    out = tensors_to_save(model.state_dict(), "save_compressed")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from . import __version__

    meta = {"format": "pt", "producer": f"sparsekit {__version__}"}
    _atomic_write(path, lambda tmp: st.save_file(out, tmp, metadata=meta))
    if rpath is not None:
        def dump(tmp):
            with open(tmp, "w") as f:
                json.dump(report, f, indent=2, default=str)
        _atomic_write(rpath, dump)
    return path, rpath


def _custom_loader(mod: nn.Module) -> bool:
    return (type(mod)._load_from_state_dict is not nn.Module._load_from_state_dict
            or bool(getattr(mod, "_load_state_dict_pre_hooks", None))
            or bool(getattr(mod, "_load_state_dict_post_hooks", None)))


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().reshape(-1).contiguous()
    return t.view(torch.uint8) if t.element_size() and t.numel() else t


def _check_against_model(model: nn.Module, sd: dict, strict: bool, path: str) -> None:
    """Every check :func:`load_compressed` makes before it changes the model."""
    expected = model.state_dict()
    # modules with their own loader (sparsekit's packed modules validate their contents there; they may
    # also take keys their current state lacks, e.g. QLinear's input_scale): the outermost ones
    custom = []
    inside: set = set()        # names under an outermost custom module
    for name, mod in model.named_modules(remove_duplicate=False):
        parent = name.rpartition(".")[0] if name else None
        if name and (parent in inside or ("" in inside)):
            inside.add(name)
            continue
        if _custom_loader(mod):
            custom.append((name, mod))
            inside.add(name)

    custom_names = {c for c, _ in custom}

    def owner(key):
        if "" in custom_names:
            return ""
        parts = key.split(".")
        for i in range(1, len(parts)):
            head = ".".join(parts[:i])
            if head in custom_names:
                return head
        return None

    if strict:
        missing = [k for k in expected if k not in sd and owner(k) is None]
        unexpected = [k for k in sd if k not in expected and owner(k) is None]
        if missing or unexpected:
            def few(keys):
                return ", ".join(repr(k) for k in keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
            parts = ([f"missing keys {few(missing)}"] if missing else []) + \
                    ([f"unexpected keys {few(unexpected)}"] if unexpected else [])
            raise ValueError(f"load_compressed: {path!r} does not match the model: {'; '.join(parts)} "
                             f"(build the model with the same scheme and layers, or pass strict=False)")
    for k, t in sd.items():
        if k not in expected:
            continue
        want = expected[k]
        if want.device.type == "meta":
            raise ValueError(f"load_compressed: the model's {k!r} is on the meta device, where loading would "
                             f"keep no data; materialize the model first (model.to_empty(device=...))")
        if t.dtype != want.dtype and not (t.dtype.is_floating_point and want.dtype.is_floating_point):
            raise ValueError(f"load_compressed: {k!r} is {t.dtype} in {path!r}, the model expects {want.dtype}")
    # tensors the model shares (tied weights, shared modules) must come back identical
    groups: dict = {}
    for k, t in expected.items():
        if k in sd and isinstance(t, torch.Tensor) and t.numel() and t.device.type != "meta":
            ident = (str(t.device), t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                     tuple(t.stride()), t.dtype)
            groups.setdefault(ident, []).append(k)
    for keys in groups.values():
        first = sd[keys[0]]
        for k in keys[1:]:
            other = sd[k]
            if other.shape != first.shape or other.dtype != first.dtype or not torch.equal(_bits(other), _bits(first)):
                raise ValueError(f"load_compressed: {keys[0]!r} and {k!r} are the same tensor in the model "
                                 f"(shared or tied) but differ in {path!r}")
    # modules with their own loader: a dry run of their load_state_dict on a scratch copy
    for name, mod in custom:
        prefix = f"{name}." if name else ""
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sub and not strict:
            continue
        scratch = copy.deepcopy(mod)
        try:
            scratch.load_state_dict(sub, strict=strict)
        except (ValueError, TypeError, RuntimeError, IndexError) as e:
            what = f"module {name!r} ({type(mod).__name__})" if name else f"the model ({type(mod).__name__})"
            raise ValueError(f"load_compressed: {path!r} does not fit {what}: {' '.join(str(e).split())}") from e
        finally:
            del scratch
    # the other modules: exact shapes, as load_state_dict demands
    for name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            k = prefix + attr
            if t is None or k not in sd or owner(k) is not None \
                    or attr in getattr(mod, "_non_persistent_buffers_set", ()):
                continue
            if tuple(sd[k].shape) != tuple(t.shape):
                raise ValueError(f"load_compressed: {k!r} has shape {tuple(sd[k].shape)} in {path!r}, "
                                 f"the model expects {tuple(t.shape)}")


def load_compressed(model: nn.Module, path, strict: bool = True) -> nn.Module:
    """Load a :func:`save_compressed` file into ``model`` (which must have the compressed
    structure, e.g. from ``compress`` with the same scheme); returns ``model``.

    Reads safetensors only (never pickle).  All or nothing: the file's keys,
    dtypes and shapes are checked against the model, tensors the model shares
    must be identical in the file, and every module with its own
    ``load_state_dict`` (the packed sparsekit modules, which validate their
    indices and codes there) first loads its part into a scratch copy; only
    when all of that passes is the model changed.  A missing file raises
    FileNotFoundError, a directory IsADirectoryError, a path under a regular
    file NotADirectoryError, a file that is not valid safetensors or does not
    fit the model ValueError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_compressed: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"load_compressed: strict must be a bool, got {strict!r}")
    path = _fspath(path, "load_compressed")
    if os.path.isdir(path):
        inside = os.path.join(path, "model.safetensors")
        hint = f"; did you mean {inside!r}?" if os.path.isfile(inside) else ""
        raise IsADirectoryError(f"load_compressed: {path!r} is a directory, not a safetensors file{hint}")
    if not os.path.exists(path):
        blocker = _blocking_file(path)
        if blocker is not None:
            raise NotADirectoryError(f"load_compressed: {path!r} does not exist: {blocker!r} is a regular file, "
                                     f"not a directory")
        raise FileNotFoundError(f"load_compressed: no such file {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"load_compressed: {path!r} is not a regular file")
    st = _safetensors()
    try:
        sd = st.load_file(path)
    except Exception as e:  # SafetensorError (invalid header, truncated data, ...) and friends
        if isinstance(e, (PermissionError, MemoryError)):
            raise
        raise ValueError(f"load_compressed: {path!r} is not a valid safetensors file: {e}") from e
    # tensors renamed since the file was written (e.g. a 2:4 layer's ``meta`` -> ``meta_codes``)
    sd = upgrade_state_dict(model.named_modules(remove_duplicate=False), sd)
    _check_against_model(model, sd, strict, path)
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as e:  # should not happen after the checks above
        raise ValueError(f"load_compressed: {path!r} could not be loaded into the model: {e}") from e
    return model
