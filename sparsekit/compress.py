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

import copy
import json
import os
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["SCHEMES", "SCHEME_METHODS", "compress", "save_compressed", "load_compressed", "module_bytes"]

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


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _linears(model: nn.Module, layers) -> dict:
    from .prune.calibration import resolve_layers

    return resolve_layers(model, layers)


def _int4_group_size(layers: dict, requested: Optional[int]) -> int:
    if requested is not None:
        return requested
    for g in (128, 64, 32):
        if all(m.in_features % g == 0 for m in layers.values()):
            return g
    return -1


def compress(model: nn.Module, calib=None, scheme: str = "2:4", method: Optional[str] = None, *,
             quality_fn: Optional[Callable[[nn.Module], float]] = None, dense_quality: Optional[float] = None,
             layers=None, progress: bool = False, block_size=(32, 32), sparsity: float = 0.5,
             group_size: Optional[int] = None, symmetric: bool = False, dtype: torch.dtype = torch.float16,
             speed: str = "auto", **method_options):
    """Compress ``model``'s linear layers; returns ``(compressed_model, report)``.

    ``calib``: calibration batches (tensors or ``(x, ...)`` tuples fed as ``model(x)``),
    needed by wanda, sparsegpt, gptq and awq.  ``layers``: which ``nn.Linear`` layers
    (None = all; as in :func:`sparsekit.prune.prune_model_`).  ``block_size``, ``sparsity``:
    block scheme.  ``group_size`` (default: the largest of 128/64/32 dividing every layer's
    in_features), ``symmetric``, ``dtype`` (QLinear compute dtype): int4.  Other keywords go to
    the algorithm (e.g. ``damp``, ``block_size`` is taken by the block scheme; use
    ``sparsegpt_block_size``/``gptq_block_size`` for the OBS/GPTQ column blocks).

    The report holds ``scheme``, ``method``, ``layers`` (converted names), ``num_layers``,
    ``dense_bytes``/``compressed_bytes`` (whole model, parameters + buffers),
    ``layer_dense_bytes``/``layer_compressed_bytes`` (converted layers only),
    ``ratio`` (layer compressed / dense), and with ``quality_fn`` ``quality_dense``,
    ``quality`` and ``quality_on``.

    ``speed``: ``"auto"`` (default) times the dense and the compressed model's
    forward on the first calibration batch when the model's parameters are on
    a CUDA device (``triton.testing.do_bench`` medians, after warm-up) and
    reports ``latency_dense_ms``, ``latency_ms``, ``speedup`` and ``speed_on``;
    on CPU it records ``speed = "not measured: ..."`` (CPU runs use the
    reference/interpreter backends, whose timings say nothing about the
    kernels).  ``"off"`` skips it.
    """
    if scheme not in SCHEME_METHODS:
        raise ValueError(f"unknown scheme {scheme!r}; supported: {SCHEMES}")
    method = method or DEFAULT_METHOD[scheme]
    if method not in SCHEME_METHODS[scheme]:
        raise ValueError(f"method {method!r} does not apply to scheme {scheme!r}; "
                         f"choose from {SCHEME_METHODS[scheme]}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if speed not in ("auto", "off"):
        raise ValueError(f"speed must be 'auto' or 'off', got {speed!r}")

    work = copy.deepcopy(model)
    work.eval()
    lin = _linears(work, layers)
    names = list(lin)
    dense_layer_bytes = sum(module_bytes(lin[n]) for n in names)
    dense_bytes = module_bytes(model)
    opts = dict(method_options)
    if "sparsegpt_block_size" in opts:
        opts["block_size"] = opts.pop("sparsegpt_block_size")
    if "gptq_block_size" in opts:
        opts["block_size"] = opts.pop("gptq_block_size")

    eval_model = None
    quality_on = "compressed model"
    details = {}
    if scheme == "2:4":
        from .nn import SparseLinear
        from .prune import prune_model_

        masks = prune_model_(work, calib, method=method, pattern="2:4", layers=lin, progress=progress, **opts)
        for n in names:
            _set_module(work, n, SparseLinear.from_dense(lin[n], mask=masks[n]))
    elif scheme == "2:4+int4":
        from .formats.sparse24_int4 import compressed_group_size
        from .nn import SparseQLinear
        from .prune import prune_model_

        masks = prune_model_(work, calib, method=method, pattern="2:4", layers=lin, progress=progress, **opts)
        gsizes = {}
        for n in names:
            gsizes[n] = compressed_group_size(lin[n].in_features, group_size)
            _set_module(work, n, SparseQLinear.from_dense(lin[n], mask=masks[n], group_size=gsizes[n],
                                                          symmetric=symmetric, dtype=dtype))
        details.update(group_size=sorted(set(gsizes.values()))[0] if len(set(gsizes.values())) == 1 else gsizes,
                       group_size_unit="compressed columns (kept values)", symmetric=symmetric,
                       dtype=str(dtype).replace("torch.", ""))
    elif scheme == "block":
        from .nn import BlockSparseLinear

        for n in names:
            _set_module(work, n, BlockSparseLinear.from_dense(lin[n], block_size=block_size, sparsity=sparsity))
        details.update(block_size=list(block_size) if not isinstance(block_size, int) else block_size,
                       sparsity=sparsity)
    else:  # int4
        from .nn import QLinear
        from .quant import quantize_model_weights

        gs = _int4_group_size(lin, group_size)
        results = quantize_model_weights(work, calib, method=method, group_size=gs, symmetric=symmetric, bits=4,
                                         layers=lin, progress=progress, **opts)
        details.update(group_size=gs, symmetric=symmetric, dtype=str(dtype).replace("torch.", ""))
        if quality_fn is not None:
            eval_model = copy.deepcopy(work)
            eval_lin = _linears(eval_model, names)
        for n in names:
            q = QLinear.from_quant_result(lin[n], results[n], dtype=dtype)
            _set_module(work, n, q)
            if eval_model is not None and method != "awq":
                # AWQ's float copy keeps quantize_model_weights' effective weight Q(W s) / s
                with torch.no_grad():
                    eval_lin[n].weight.copy_(q.weight.to(eval_lin[n].weight.dtype))
        quality_on = "float32 copy holding the QLinear dequantized weights"

    layer_bytes = sum(module_bytes(work.get_submodule(n)) for n in names)
    report = {
        "scheme": scheme, "method": method, "layers": names, "num_layers": len(names),
        "dense_bytes": dense_bytes, "compressed_bytes": module_bytes(work),
        "layer_dense_bytes": dense_layer_bytes, "layer_compressed_bytes": layer_bytes,
        "ratio": layer_bytes / max(dense_layer_bytes, 1),
        **details,
    }
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


def save_compressed(model: nn.Module, path: str, report: Optional[dict] = None) -> tuple:
    """Write ``model.state_dict()`` to ``path`` with safetensors and ``report`` as JSON next to it
    (``<path without .safetensors>.json``, or ``report.json`` when the file is ``model.safetensors``).

    Tensors that share storage are saved as independent contiguous copies (safetensors refuses
    aliases); loading them back with ``load_state_dict`` restores the same values.
    Returns ``(weights_path, report_path or None)``.
    """
    from safetensors.torch import save_file

    sd = model.state_dict()
    seen = set()
    out = {}
    for k, t in sd.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else None
        if key is not None and key in seen or not t.is_contiguous():
            t = t.clone().contiguous()
        elif key is not None:
            seen.add(key)
        out[k] = t.cpu()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(out, path)
    rpath = None
    if report is not None:
        base = os.path.basename(path)
        rname = "report.json" if base == "model.safetensors" else os.path.splitext(base)[0] + ".json"
        rpath = os.path.join(os.path.dirname(os.path.abspath(path)), rname)
        with open(rpath, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return path, rpath


def load_compressed(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load a :func:`save_compressed` file into ``model`` (which must have the compressed
    structure, e.g. from ``compress`` with the same scheme); returns ``model``."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(path), strict=strict)
    return model
