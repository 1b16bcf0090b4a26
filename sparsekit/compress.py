"""One-call model compression: prune or quantize on calibration data, then swap in compressed modules.

``compress(model, calib, scheme, method, **options) -> (compressed_model, report)``

========== ================================ =====================================================
scheme     methods                          modules in the compressed model
========== ================================ =====================================================
``2:4``    magnitude, wanda, sparsegpt      :class:`~sparsekit.nn.SparseLinear` (values + 2-bit metadata)
``block``  magnitude                        :class:`~sparsekit.nn.BlockSparseLinear` (``block_size``, ``sparsity``)
``int4``   rtn, gptq, awq                   :class:`~sparsekit.nn.QLinear` (packed nibbles, fp16 group scales)
``2:4+int4`` magnitude, wanda, sparsegpt    :class:`~sparsekit.nn.SparseQLinear` (2:4 metadata + int4 kept values)
========== ================================ =====================================================

``2:4+int4`` prunes with the method (SparseGPT compensates the kept weights
for the pruned ones), then quantizes the kept values round-to-nearest,
group-wise along the compressed row (``group_size`` counts kept values, i.e.
``2 * group_size`` dense input features; default the largest of 128/64/32
that divides it).

The input model is never modified (the work happens on a deep copy).

Quality (``quality_fn`` given): for 2:4, block and 2:4+int4 it is measured on
the compressed model itself (float32 activations on CPU; SparseQLinear takes
float32 inputs against its dequantized weight).  QLinear computes in
float16/bfloat16 only, so for int4 it is measured on a float32 copy of the
model whose converted layers hold exactly the QLinear's dequantized weight
(``qlinear.weight``, the int4 codes times the stored fp16 scales); only the
activation arithmetic is float32 instead of float16.  ``report["quality_on"]``
says which.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["SCHEMES", "SCHEME_METHODS", "DEFAULT_METHOD", "compress", "save_compressed", "load_compressed",
           "check_output_path", "module_bytes"]

SCHEME_METHODS = {
    "2:4": ("magnitude", "wanda", "sparsegpt"),
    "block": ("magnitude",),
    "int4": ("rtn", "gptq", "awq"),
    "2:4+int4": ("magnitude", "wanda", "sparsegpt"),
}
SCHEMES = tuple(SCHEME_METHODS)
DEFAULT_METHOD = {"2:4": "sparsegpt", "block": "magnitude", "int4": "gptq", "2:4+int4": "sparsegpt"}


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


_ALGO_OPTIONS = {
    # (scheme, method) -> keyword options the algorithm takes
    ("2:4", "magnitude"): (), ("2:4", "wanda"): (), ("2:4", "sparsegpt"): ("sparsegpt_block_size", "damp"),
    ("2:4+int4", "magnitude"): (), ("2:4+int4", "wanda"): (),
    ("2:4+int4", "sparsegpt"): ("sparsegpt_block_size", "damp"),
    ("block", "magnitude"): (),
    ("int4", "rtn"): (), ("int4", "gptq"): ("gptq_block_size", "damp", "act_order", "max_rows"),
    ("int4", "awq"): ("grid", "max_rows"),
}
_NEEDS_CALIB = {"wanda", "sparsegpt", "gptq", "awq"}
_SCHEME_ARGS = {"block_size": ("block",), "sparsity": ("block",), "group_size": ("int4", "2:4+int4"),
                "symmetric": ("int4", "2:4+int4"), "dtype": ("int4", "2:4+int4")}


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


def _int4_group_size(in_features, requested: Optional[int]) -> int:
    if requested is not None:
        return requested
    for g in (128, 64, 32):
        if all(k % g == 0 for k in in_features):
            return g
    return -1


def _check_args(model, calib, scheme, method, quality_fn, dense_quality, speed, block_size, sparsity, group_size,
                symmetric, dtype, options) -> dict:
    """Validate compress's arguments (nothing about the layers yet); returns the resolved scheme arguments."""
    if not isinstance(scheme, str) or scheme not in SCHEME_METHODS:
        raise ValueError(f"unknown scheme {scheme!r}; supported: {SCHEMES}")
    if method is not None and (not isinstance(method, str) or method not in SCHEME_METHODS[scheme]):
        raise ValueError(f"method {method!r} does not apply to scheme {scheme!r}; "
                         f"choose from {SCHEME_METHODS[scheme]}")
    method = method or DEFAULT_METHOD[scheme]
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if speed not in ("auto", "off"):
        raise ValueError(f"speed must be 'auto' or 'off', got {speed!r}")
    if quality_fn is not None and not callable(quality_fn):
        raise TypeError(f"quality_fn must be callable(model) -> float or None, got {type(quality_fn).__name__}")
    if dense_quality is not None and (isinstance(dense_quality, bool) or not isinstance(dense_quality, (int, float))):
        raise TypeError(f"dense_quality must be a number or None, got {dense_quality!r}")
    given = {"block_size": block_size, "sparsity": sparsity, "group_size": group_size, "symmetric": symmetric,
             "dtype": dtype}
    for arg, value in given.items():
        if value is not None and scheme not in _SCHEME_ARGS[arg]:
            raise ValueError(f"{arg}={value!r} does not apply to scheme {scheme!r} "
                             f"(only to {' and '.join(_SCHEME_ARGS[arg])})")
    out = {"method": method}
    if scheme == "block":
        from .formats.block_sparse import check_block_size

        out["block_size"] = check_block_size((32, 32) if block_size is None else block_size)
        sp = 0.5 if sparsity is None else sparsity
        if isinstance(sp, bool) or not isinstance(sp, (int, float)) or not math.isfinite(sp) or not 0 <= sp <= 1:
            raise ValueError(f"sparsity must be a number in [0, 1], got {sp!r}")
        out["sparsity"] = float(sp)
    if scheme in ("int4", "2:4+int4"):
        if group_size is not None and (isinstance(group_size, bool) or group_size not in (32, 64, 128, -1)):
            raise ValueError(f"group_size must be None (largest fitting), 32, 64, 128 or -1 (one group per row), "
                             f"got {group_size!r}")
        if symmetric is not None and not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype!r}")
        out.update(group_size=group_size, symmetric=bool(symmetric),
                   dtype=torch.float16 if dtype is None else dtype)
    allowed = _ALGO_OPTIONS[(scheme, method)]
    bad = sorted(k for k in options if k not in allowed)
    if bad:
        raise ValueError(f"option(s) {bad} do not apply to scheme {scheme!r} with method {method!r}; "
                         f"it takes {list(allowed) or 'none'}")
    if method in _NEEDS_CALIB:
        if calib is None:
            raise ValueError(f"method {method!r} needs calibration batches: compress(model, calib, ...)")
        if isinstance(calib, (list, tuple)) and len(calib) == 0:
            raise ValueError("calib is empty: give at least one calibration batch")
    return out


def _layer_check(scheme: str, args: dict, in_features: list):
    """Per-layer validation for the scheme (run on every layer before any calibration)."""
    from .convert import check_linear

    if scheme == "int4":
        from .quant.rtn import check_quant_args

        gs = _int4_group_size(in_features, args["group_size"])
        args["resolved_group_size"] = gs

        def check(mod, name):
            check_linear(mod)
            if mod.in_features % 8:
                raise ValueError(f"in_features K={mod.in_features} is not a multiple of 8 "
                                 f"(int4 packs 8 codes per int32 word)")
            check_quant_args(mod.in_features, gs, 4)
        return check
    if scheme == "2:4+int4":
        from .formats.sparse24_int4 import compressed_group_size

        def check(mod, name):
            check_linear(mod)
            try:
                compressed_group_size(mod.in_features, args["group_size"])
            except ValueError:
                kc = compressed_group_size(mod.in_features, -1)
                raise ValueError(f"group_size={args['group_size']} (in kept values) does not divide the "
                                 f"{kc} kept values per row of in_features={mod.in_features}; choose a "
                                 f"group size that divides {kc}, or -1") from None
        return check

    def check(mod, name):
        check_linear(mod)
    return check


def compress(model: nn.Module, calib=None, scheme: str = "2:4", method: Optional[str] = None, *,
             quality_fn: Optional[Callable[[nn.Module], float]] = None, dense_quality: Optional[float] = None,
             layers=None, progress: bool = False, block_size=None, sparsity: Optional[float] = None,
             group_size: Optional[int] = None, symmetric: Optional[bool] = None, dtype: Optional[torch.dtype] = None,
             speed: str = "auto", **method_options):
    """Compress ``model``'s linear layers; returns ``(compressed_model, report)``.

    ``calib``: calibration batches (tensors or ``(x, ...)`` tuples fed as ``model(x)``),
    needed by wanda, sparsegpt, gptq and awq.  ``layers``: which ``nn.Linear`` layers
    (None = all; a list of qualified names, or a dict name -> layer of ``model``).
    ``block_size`` (default ``(32, 32)``), ``sparsity`` (default 0.5): block scheme only.
    ``group_size`` (default: the largest of 128/64/32 dividing every layer's in_features),
    ``symmetric`` (default False), ``dtype`` (QLinear / SparseQLinear compute dtype, default
    float16): int4 and 2:4+int4 only.  An argument given to a scheme it does not apply to
    raises ``ValueError``.  Other keywords go to the algorithm: ``sparsegpt_block_size``,
    ``damp`` (sparsegpt); ``gptq_block_size``, ``damp``, ``act_order``, ``max_rows`` (gptq);
    ``grid``, ``max_rows`` (awq); anything else raises ``ValueError``.

    All arguments and every selected layer are validated (group sizes against
    every layer's ``in_features``, materialized finite weights, no tied weights;
    see :mod:`sparsekit.convert`) before any calibration.  The input model is
    never modified; the work happens on a deep copy, returned in eval mode.  A
    module shared by several names stays shared in the result.

    The report holds ``scheme``, ``method``, ``layers`` (converted names; a shared layer
    once, by its first name), ``num_layers``,
    ``dense_bytes``/``compressed_bytes`` (whole model, parameters + buffers),
    ``layer_dense_bytes``/``layer_compressed_bytes`` (converted layers only),
    ``ratio`` (layer compressed / dense), ``shared`` (when some layers are shared:
    first name -> every name), and with ``quality_fn`` ``quality_dense``,
    ``quality`` and ``quality_on``.

    ``speed``: ``"auto"`` (default) times the dense and the compressed model's
    forward on the first calibration batch when the model's parameters are on
    a CUDA device (``triton.testing.do_bench`` medians, after warm-up) and
    reports ``latency_dense_ms``, ``latency_ms``, ``speedup`` and ``speed_on``;
    on CPU it records ``speed = "not measured: ..."`` (CPU runs use the
    reference/interpreter backends, whose timings say nothing about the
    kernels).  ``"off"`` skips it.
    """
    from .convert import build_plan, check_targets, find_targets

    args = _check_args(model, calib, scheme, method, quality_fn, dense_quality, speed, block_size, sparsity,
                       group_size, symmetric, dtype, method_options)
    method = args["method"]
    select = _select_layers(model, layers)
    # phase 1a: every layer is validated on the input model before any copy or calibration
    targets = find_targets(model, select)
    if not targets:
        raise ValueError("the model has no nn.Linear layers to compress")
    check_targets(targets, _layer_check(scheme, args, [t.module.in_features for t in targets]))
    if method in _NEEDS_CALIB:
        from .convert import check_calibration

        calib = check_calibration(model, calib)

    work = copy.deepcopy(model)
    work.eval()
    wtargets = find_targets(work, select)
    names = [t.name for t in wtargets]
    lin = {t.name: t.module for t in wtargets}
    dense_layer_bytes = sum(module_bytes(t.module) for t in wtargets)
    dense_bytes = module_bytes(model)
    opts = dict(method_options)
    if "sparsegpt_block_size" in opts:
        opts["block_size"] = opts.pop("sparsegpt_block_size")
    if "gptq_block_size" in opts:
        opts["block_size"] = opts.pop("gptq_block_size")

    # phase 1b: calibrate on the copy and build every new module
    eval_model = None
    quality_on = "compressed model"
    details = {}
    if scheme == "2:4":
        from .nn import SparseLinear
        from .prune import prune_model_

        masks = prune_model_(work, calib, method=method, pattern="2:4", layers=lin, progress=progress, **opts)
        plan = build_plan(work, wtargets, lambda t: SparseLinear.from_dense(t.module, mask=masks[t.name]))
    elif scheme == "2:4+int4":
        from .formats.sparse24_int4 import compressed_group_size
        from .nn import SparseQLinear
        from .prune import prune_model_

        masks = prune_model_(work, calib, method=method, pattern="2:4", layers=lin, progress=progress, **opts)
        gsizes = {n: compressed_group_size(lin[n].in_features, args["group_size"]) for n in names}
        plan = build_plan(work, wtargets, lambda t: SparseQLinear.from_dense(
            t.module, mask=masks[t.name], group_size=gsizes[t.name], symmetric=args["symmetric"],
            dtype=args["dtype"]))
        details.update(group_size=sorted(set(gsizes.values()))[0] if len(set(gsizes.values())) == 1 else gsizes,
                       group_size_unit="compressed columns (kept values)", symmetric=args["symmetric"],
                       dtype=str(args["dtype"]).replace("torch.", ""))
    elif scheme == "block":
        from .nn import BlockSparseLinear

        bs, sp = args["block_size"], args["sparsity"]
        plan = build_plan(work, wtargets, lambda t: BlockSparseLinear.from_dense(t.module, block_size=bs, sparsity=sp))
        details.update(block_size=list(bs), sparsity=sp)
    else:  # int4
        from .nn import QLinear
        from .quant import quantize_model_weights

        gs = args["resolved_group_size"]
        results = quantize_model_weights(work, calib, method=method, group_size=gs, symmetric=args["symmetric"],
                                         bits=4, layers=lin, progress=progress, **opts)
        details.update(group_size=gs, symmetric=args["symmetric"], dtype=str(args["dtype"]).replace("torch.", ""))
        plan = build_plan(work, wtargets, lambda t: QLinear.from_quant_result(t.module, results[t.name],
                                                                              dtype=args["dtype"]))
        if quality_fn is not None:
            # a float32 copy holding the QLinear's dequantized weights (the copy keeps the sharing)
            eval_model = copy.deepcopy(work)
            for t, q in plan:
                if method != "awq":
                    # AWQ's float copy keeps quantize_model_weights' effective weight Q(W s) / s
                    ev = eval_model.get_submodule(t.name)
                    with torch.no_grad():
                        ev.weight.copy_(q.weight.to(ev.weight.dtype))
        quality_on = "float32 copy holding the QLinear dequantized weights"
    # phase 2: swap every new module in at once
    plan.apply()

    layer_bytes = sum(module_bytes(new) for _, new in plan)
    report = {
        "scheme": scheme, "method": method, "layers": names, "num_layers": len(names),
        "dense_bytes": dense_bytes, "compressed_bytes": module_bytes(work),
        "layer_dense_bytes": dense_layer_bytes, "layer_compressed_bytes": layer_bytes,
        "ratio": layer_bytes / max(dense_layer_bytes, 1),
        **details,
    }
    shared = {t.name: list(t.names) for t in wtargets if len(t.names) > 1}
    if shared:
        report["shared"] = shared
    if quality_fn is not None:
        report["quality_dense"] = float(quality_fn(model) if dense_quality is None else dense_quality)
        report["quality"] = float(quality_fn(eval_model if eval_model is not None else work))
        report["quality_on"] = quality_on
    if speed == "auto":
        report.update(_speed_report(model, work, calib))
    return work, report


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _speed_report(dense: nn.Module, compressed: nn.Module, calib) -> dict:
    """Forward latency of the dense and the compressed model on the first calibration batch (CUDA only)."""
    dev = _model_device(dense)
    if dev.type != "cuda":
        return {"speed": "not measured: the model is not on a CUDA device (CPU runs use the reference or "
                         "interpreter backends, whose timings say nothing about the kernels)"}
    from .calibration import split_batch

    first = next(iter(calib), None) if calib is not None else None
    if first is None:
        return {"speed": "not measured: no calibration batch to time the forward on"}
    import triton.testing

    x = split_batch(first).to(dev)

    def timed(m):
        with torch.no_grad():
            return float(triton.testing.do_bench(lambda: m(x), warmup=25, rep=100, return_mode="median"))

    t_dense = timed(dense)
    t_comp = timed(compressed)
    return {"latency_dense_ms": t_dense, "latency_ms": t_comp, "speedup": t_dense / t_comp,
            "speed_on": f"{torch.cuda.get_device_name(dev)}, input {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"}


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
    """``write(tmp)`` to a temporary file next to ``path``, then rename it over ``path``."""
    import tempfile

    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        write(tmp)
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

    sd = model.state_dict()
    seen = set()
    out = {}
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"save_compressed: state_dict entry {k!r} is a {type(t).__name__}, not a tensor "
                            f"(safetensors stores tensors only)")
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(f"save_compressed: {k!r} is on the meta device (no data to save)")
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else None
        if key is not None and key in seen or not t.is_contiguous():
            t = t.clone().contiguous()
        elif key is not None:
            seen.add(key)
        out[k] = t.cpu()
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
    _check_against_model(model, sd, strict, path)
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as e:  # should not happen after the checks above
        raise ValueError(f"load_compressed: {path!r} could not be loaded into the model: {e}") from e
    return model
