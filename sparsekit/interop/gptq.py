"""GPTQ and AutoAWQ (GEMM) checkpoints -> :class:`~sparsekit.nn.QLinear` (int4, W4A16).

GPTQ checkpoints (AutoGPTQ, GPTQModel, auto-round's ``auto_gptq`` export; what
transformers loads with ``quant_method: "gptq"``) and AutoAWQ GEMM checkpoints
(``quant_method: "awq"``, ``version: "gemm"``) store a quantized ``nn.Linear``
named ``L`` as ``L.qweight``, ``L.qzeros``, ``L.scales`` (GPTQ also
``L.g_idx``) and an optional ``L.bias``.  The conversion is an integer repack:
codes and zero points are unpacked with shifts and masks and repacked into
:class:`~sparsekit.formats.Int4Weight`'s layout, never through a float, and the
scales are copied unchanged, so the dequantized weight ``(q - z) * s`` (one
rounding, in the scale dtype) equals the checkpoint's own dequantization bit
for bit.

=================  ==============================================  ==============================================
quantity           GPTQ (``checkpoint_format`` gptq / gptq_v2)     AutoAWQ GEMM (``version: gemm``)
=================  ==============================================  ==============================================
codes              ``qweight`` ``(K/8, N)`` int32, packed along    ``qweight`` ``(K, N/8)`` int32, packed along
                   K: row k of the weight's transpose in word      N: column n in word ``n // 8``, nibble
                   ``k // 8``, nibble ``k % 8`` (sequential)       ``[0, 4, 1, 5, 2, 6, 3, 7][n % 8]`` (AWQ's
                                                                   order ``[0, 2, 4, 6, 1, 3, 5, 7]`` read as
                                                                   "nibble i holds column ORDER[i]")
zero points        ``qzeros`` ``(G, N/8)`` int32, nibble           ``qzeros`` ``(G, N/8)`` int32, AWQ's nibble
                   ``n % 8``; ``gptq`` (v1) stores ``z - 1``,      order, stores ``z``
                   ``gptq_v2`` stores ``z``
scales             ``scales`` ``(G, N)`` float16                   ``scales`` ``(G, N)`` float16
groups             ``g_idx`` ``(K,)``: the group of every input    consecutive (``k // group_size``)
                   feature (``k // group_size``, or any order
                   with ``desc_act``)
=================  ==============================================  ==============================================

sparsekit holds ``qweight`` ``(N, K/8)`` (packed along K, AWQ's nibble order),
``scales`` / ``zeros`` ``(N, G)`` (zeros as integers in the scale dtype, none
when symmetric = all 8).  ``G = K / group_size``; ``group_size`` 32, 64, 128 or
``-1`` (one group per row).

**v1 zero points.**  GPTQ's original format stores ``z - 1``; its kernels
(AutoGPTQ, exllama, vLLM's gptq kernels, auto-round) read a zero point as
``nibble + 1``, so a stored nibble of 15 reads as a zero point of 16, which a
4-bit grid cannot produce (GPTQModel's word-wise conversion reads it as 0 with
a carry into the next nibble instead).  Such a v1 tensor is rejected with a
``ValueError`` (re-export it as ``gptq_v2``, which stores ``z``).

**Act-order (desc_act).**  A ``g_idx`` that is not ``arange(K) // group_size``
assigns input features to groups in any order.  The weight is stored with its
columns permuted so that every group is contiguous (``perm`` = stable argsort
of ``g_idx``, :meth:`Int4Weight.from_g_idx`), and the layer gathers its input
once per call, ``x[..., in_perm]``; the kernels are unchanged.  A trivial
``g_idx`` gives no permutation.  Cost on CPU (2-core CPU, torch 2.13.0+cpu,
QLinear forward through the CPU dense path, 128-wide groups, median of 30
interleaved calls (12 at M=128), milliseconds, without / with ``in_perm``;
measured while other jobs kept the load average at 7-9 on the two cores, so
the absolute times are inflated and noisy)::

    K x N         M     float16          bfloat16
    4096 x 4096   1     9.47 / 9.95      12.7 / 12.9
    4096 x 4096   16    128 / 136        192 / 196
    4096 x 4096   128   288 / 288        310 / 306
    4096 x 11008  1     34.9 / 33.9      27.4 / 27.7
    4096 x 11008  16    454 / 455        447 / 453
    4096 x 11008  128   614 / 595        922 / 940

The with / without ratios lie between 0.97 and 1.06 in this run (0.73 to 1.07
in a repeat under the same load): the difference is within the run-to-run
noise.  The gather alone (``x.index_select(-1, in_perm)``, K = 4096, median of
2000 calls, 500 at M=128) takes 16 us at M=1, 0.18 ms at M=16 and 2.0 ms at
M=128 (float16 and bfloat16 alike): it moves ``M * K`` elements against the
``M * K * N`` multiply-adds of the matmul.

Rejected with a ``ValueError`` naming the field: ``bits`` other than 4, group
sizes other than 32 / 64 / 128 / whole row (and K not a multiple of the group
size), other GPTQ ``checkpoint_format`` values (``marlin``, ``bitblas``, ...),
AWQ versions other than ``gemm`` (``gemv``, ``gemv_fast``, ``marlin``,
``exllama``, ``ipex``), GPTQ ``dynamic`` per-module overrides, and
shapes that disagree with each other or with the skeleton.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from ..formats.int4 import Int4Weight, SYMMETRIC_ZERO
from .compressed_tensors import _read_json, _read_tensors

__all__ = ["gptq_to_int4", "awq_to_int4", "load_gptq", "load_awq", "load_hub_checkpoint",
           "GPTQ_FORMATS", "AWQ_VERSIONS", "AWQ_ORDER"]

GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_VERSIONS = ("gemm",)
_AWQ_OTHER = ("gemv", "gemv_fast", "marlin", "exllama", "exllamav2", "ipex")
# AutoAWQ's interleave: nibble i of a word holds column 8c + AWQ_ORDER[i]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_NIBBLE_OF_COL = (0, 4, 1, 5, 2, 6, 3, 7)
_HALF = (torch.float16, torch.bfloat16)
_GROUPS = (32, 64, 128)


# ------------------------------------------------------------------ integer unpacking
def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """``(R, W)`` int32 -> ``(R, W, 8)`` int64, entry ``i`` = bits ``4i .. 4i+3`` of the word."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=words.device)
    return ((words.to(torch.int64) & 0xFFFFFFFF)[..., None] >> shifts) & 0xF


def _check_int32(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (int32), got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (8 packed 4-bit values per word), got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    return t


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or bits != 4:
        raise ValueError(f"bits={bits!r}: only 4-bit GPTQ / AWQ weights load into an int4 QLinear")


def _group(group_size, k: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int (32, 64, 128 or -1), got {type(group_size).__name__}")
    if group_size in (-1, k):
        return k
    if group_size not in _GROUPS:
        raise ValueError(f"group_size={group_size} is not supported by Int4Weight: use 32, 64, 128 or -1 (one "
                         f"group per row)")
    if k % group_size:
        raise ValueError(f"in_features K={k} is not a multiple of group_size={group_size} (a partial last group "
                         "is not supported)")
    return group_size


def _scales(scales, g: int, n: int, dtype, name: str = "scales") -> tuple:
    if not isinstance(scales, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scales).__name__}")
    if not scales.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {scales.dtype}")
    if tuple(scales.shape) != (g, n):
        raise ValueError(f"{name} must have shape {(g, n)} (groups, out_features), got {tuple(scales.shape)}")
    if dtype is not None:
        if dtype not in _HALF:
            raise TypeError(f"dtype must be float16 or bfloat16, got {dtype}")
        return scales, dtype
    if scales.dtype not in _HALF:
        raise ValueError(f"{name} is {scales.dtype}; an int4 QLinear keeps float16 or bfloat16 scales. Pass "
                         "dtype=torch.float16 / torch.bfloat16 to convert them (lossy)")
    return scales, scales.dtype


def _grouping(qweight, qzeros, scales, group_size, k: int, n: int, dtype) -> tuple:
    """The group size and count of a ``(K, N)`` layer, its checked scales and their dtype, and the check of
    ``qzeros``' shape ``(G, N/8)``: ``(group_size, groups, scales, dtype)``."""
    gs = _group(group_size, k)
    g = k // gs
    scales, dt = _scales(scales, g, n, dtype)
    if tuple(qzeros.shape) != (g, n // 8):
        raise ValueError(f"qzeros must have shape {(g, n // 8)} (groups, out_features / 8) for qweight "
                         f"{tuple(qweight.shape)} and group_size={group_size}, got {tuple(qzeros.shape)}")
    return gs, g, scales, dt


def _format(checkpoint_format) -> str:
    f = str(checkpoint_format).lower() if checkpoint_format is not None else "gptq"
    if f not in GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r} is not supported (repacked for another "
                         f"kernel or another method); supported: {', '.join(GPTQ_FORMATS)}")
    return f


def gptq_to_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: Optional[torch.Tensor] = None, *, bits: int = 4, group_size: int, sym: bool,
                 checkpoint_format: str = "gptq", dtype: Optional[torch.dtype] = None) -> Int4Weight:
    """One GPTQ layer as an :class:`Int4Weight` (see the module doc for the layouts).

    ``qweight`` ``(K/8, N)``, ``qzeros`` ``(G, N/8)`` int32, ``scales`` ``(G, N)``
    float16 / bfloat16, ``g_idx`` ``(K,)`` integer or None (= ``arange(K) //
    group_size``).  ``checkpoint_format``: ``"gptq"`` (v1, zero points stored
    minus one) or ``"gptq_v2"``.  ``sym=True`` requires every zero point to be 8
    and gives a symmetric weight (no zeros stored); ``sym=False`` keeps the
    stored zero points.  A ``g_idx`` other than ``arange(K) // group_size``
    (act-order) gives a weight with an input permutation.  ``dtype`` converts the
    scales (lossy unless they already have it).  The result dequantizes to
    exactly ``(q - z) * s`` in the scale dtype, what GPTQ's kernels compute.
    """
    _check_bits(bits)
    fmt = _format(checkpoint_format)
    if not isinstance(sym, bool):
        raise TypeError(f"sym must be a bool, got {type(sym).__name__}")
    _check_int32(qweight, "qweight")
    _check_int32(qzeros, "qzeros")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if k == 0 or n == 0:
        raise ValueError(f"qweight has an empty shape {tuple(qweight.shape)}")
    if n % 8:
        raise ValueError(f"out_features N={n} must be a multiple of 8 (qzeros packs 8 zero points per word)")
    gs, g, scales, dt = _grouping(qweight, qzeros, scales, group_size, k, n, dtype)
    q = _nibbles(qweight.t()).reshape(n, k)                       # (N, K/8, 8) -> column k = 8w + nibble
    z = _nibbles(qzeros).reshape(g, n).t()                        # (N, G)
    if fmt == "gptq":
        if bool((z == 15).any()):
            r, c = (int(i) for i in (z == 15).nonzero()[0])
            raise ValueError(f"qzeros (checkpoint_format 'gptq', zero point minus one) holds 15 at output {r}, "
                             f"group {c}: a zero point of 16 under GPTQ's `nibble + 1` reading, outside the "
                             "4-bit grid; re-export the checkpoint as gptq_v2")
        z = z + 1
    if sym:
        if bool((z != SYMMETRIC_ZERO).any()):
            r, c = (int(i) for i in (z != SYMMETRIC_ZERO).nonzero()[0])
            raise ValueError(f"sym=True but the zero point of output {r}, group {c} is {int(z[r, c])}, not 8 "
                             f"(checkpoint_format {fmt!r}); load it with sym=False")
        zeros = None
    else:
        zeros = z
    st = scales.t()
    if g_idx is None:
        return Int4Weight.from_quantized(q.to(torch.uint8), st, zeros, gs, sym, dtype=dt)
    if not isinstance(g_idx, torch.Tensor):
        raise TypeError(f"g_idx must be a torch.Tensor or None, got {type(g_idx).__name__}")
    if tuple(g_idx.shape) != (k,):
        raise ValueError(f"g_idx must have shape ({k},) (one group index per input feature), got "
                         f"{tuple(g_idx.shape)}")
    return Int4Weight.from_g_idx(q.to(torch.uint8), st, zeros, g_idx, gs, sym, dtype=dt)


def _check_awq_version(version) -> None:
    v = str(version).lower()
    if v not in AWQ_VERSIONS:
        kind = "a layout" if v in _AWQ_OTHER else "an unknown version"
        raise ValueError(f"AWQ version {version!r} is {kind} this loader does not read; only 'gemm' (AutoAWQ's "
                         f"WQLinear_GEMM packing) is supported")


def awq_to_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, group_size: int,
                bits: int = 4, version: str = "gemm", dtype: Optional[torch.dtype] = None) -> Int4Weight:
    """One AutoAWQ GEMM layer as an (asymmetric) :class:`Int4Weight`.

    ``qweight`` ``(K, N/8)`` and ``qzeros`` ``(G, N/8)`` int32 in AWQ's interleaved
    nibble order, ``scales`` ``(G, N)``.  ``version`` must be ``"gemm"``: the
    GEMV / Marlin / exllama / ipex layouts are other packings and raise
    ``ValueError``.  The result dequantizes to exactly AutoAWQ's
    ``(q - z) * s`` in the scale dtype.
    """
    _check_bits(bits)
    _check_awq_version(version)
    _check_int32(qweight, "qweight")
    _check_int32(qzeros, "qzeros")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    if k == 0 or n == 0:
        raise ValueError(f"qweight has an empty shape {tuple(qweight.shape)}")
    if k % 8:
        raise ValueError(f"in_features K={k} must be a multiple of 8 (Int4Weight packs 8 codes per int32 "
                         "along in_features)")
    gs, g, scales, dt = _grouping(qweight, qzeros, scales, group_size, k, n, dtype)
    col = torch.tensor(_AWQ_NIBBLE_OF_COL, device=qweight.device)
    q = _nibbles(qweight).index_select(-1, col).reshape(k, n).t()          # (N, K)
    z = _nibbles(qzeros).index_select(-1, col.to(qzeros.device)).reshape(g, n).t()
    return Int4Weight.from_quantized(q.to(torch.uint8), scales.t(), z, gs, False, dtype=dt)


# ------------------------------------------------------------------ configuration
def _read_source(source) -> tuple:
    return _read_tensors(source, "(state_dict, quantization_config)")


def _quant_config(cfg, method: str) -> dict:
    if hasattr(cfg, "to_dict") and not isinstance(cfg, Mapping):
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise TypeError(f"config must be a dict (config.json or its quantization_config), got {type(cfg).__name__}")
    q = cfg.get("quantization_config", cfg)
    if hasattr(q, "to_dict") and not isinstance(q, Mapping):
        q = q.to_dict()
    if not isinstance(q, Mapping):
        raise ValueError("config has no quantization_config")
    got = q.get("quant_method", method)
    if str(got).lower() != method:
        raise ValueError(f"quantization_config.quant_method is {got!r}, expected {method!r}")
    return dict(q)


def _gptq_spec(q: dict) -> dict:
    _check_bits(q.get("bits", 4))
    if q.get("dynamic"):
        raise ValueError("quantization_config.dynamic (per-module GPTQ overrides) is not supported")
    fmt = q.get("checkpoint_format", q.get("format", "gptq"))
    sym = q.get("sym", True)
    if not isinstance(sym, bool):
        raise ValueError(f"quantization_config.sym must be true or false, got {sym!r}")
    gs = q.get("group_size", 128)
    return {"checkpoint_format": _format(fmt), "sym": sym, "group_size": int(gs) if gs is not None else -1}


def _awq_spec(q: dict) -> dict:
    bits = q.get("bits", q.get("w_bit", 4))
    _check_bits(bits)
    _check_awq_version(q.get("version", "gemm"))
    gs = q.get("group_size", q.get("q_group_size", 128))
    return {"group_size": int(gs) if gs is not None else -1}


# ------------------------------------------------------------------ model level
def _aliases(model: nn.Module) -> dict:
    """state_dict key -> the set of keys sharing its tensor (tied weights)."""
    by_id: dict = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        if p is not None:
            by_id.setdefault(id(p), set()).add(name)
    return {n: s for s in by_id.values() for n in s}


def _rebuilt_buffer(mod: nn.Module, attr: str, target: torch.device):
    """A non-persistent buffer of a module built from a config (``type(mod)(mod.config)``, as transformers'
    rotary embeddings are), computed on ``target``; None where the module cannot be rebuilt so."""
    cfg = getattr(mod, "config", None)
    if cfg is None:
        return None
    try:
        with torch.device(target):
            fresh = type(mod)(cfg)
    except Exception:                    # noqa: BLE001 - any failure means "cannot rebuild"
        return None
    t = fresh._buffers.get(attr)
    if t is None or t.device.type == "meta" or tuple(t.shape) != tuple(mod._buffers[attr].shape):
        return None
    return t


def _load(sd: dict, model: nn.Module, convert, tensors: tuple, *, backend, strict: bool, device,
          skip=()) -> nn.Module:
    from ..nn.qlinear import QLinear
    from ..pretrained import materialize_meta

    target = torch.device(device) if device is not None else torch.device("cpu")
    layers = sorted(k[: -len(".qweight")] for k in sd if k.endswith(".qweight"))
    if not layers:
        raise ValueError("the checkpoint holds no '<layer>.qweight' tensor: no quantized layer")
    modules = dict(model.named_modules())
    built, used = {}, set()
    for name in layers:
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear):
            what = "is not in the model" if lin is None else f"is a {type(lin).__name__}, not an nn.Linear"
            raise ValueError(f"layer {name!r} of the checkpoint {what}")
        if name in skip or name.rpartition(".")[2] in skip:
            raise ValueError(f"layer {name!r} is listed in modules_to_not_convert but holds quantized tensors")
        p = name + "."
        missing = [p + t for t in tensors if p + t not in sd]
        if missing:
            raise ValueError(f"layer {name!r}: tensor {missing[0]!r} is missing")
        try:
            w, keys = convert(name, sd)
        except (ValueError, TypeError) as e:
            raise type(e)(f"layer {name!r}: {e}") from e
        if w.shape != (lin.out_features, lin.in_features):
            raise ValueError(f"layer {name!r}: the checkpoint's weight is {tuple(w.shape)} (out, in), the "
                             f"skeleton's Linear is {(lin.out_features, lin.in_features)}")
        bias = sd.get(p + "bias")
        if bias is not None and lin.bias is None:
            raise ValueError(f"layer {name!r}: the checkpoint has a bias, the skeleton's Linear has bias=False")
        if bias is None and lin.bias is not None and strict:
            raise ValueError(f"layer {name!r}: bias missing from the checkpoint (the skeleton's Linear has one)")
        if bias is not None:
            if tuple(bias.shape) != (lin.out_features,):
                raise ValueError(f"layer {name!r}: bias has shape {tuple(bias.shape)}, expected "
                                 f"({lin.out_features},)")
            keys.append(p + "bias")
        mod = QLinear.from_weight(w.to(target), None if bias is None else bias.to(target), backend=backend)
        if bias is None and lin.bias is not None:
            mod.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=mod.dtype, device=target))
        built[name] = mod
        used.update(keys)
    inside = tuple(n + "." for n in built)
    stray = [k for k in sd if k.startswith(inside) and k not in used]
    if stray and strict:
        raise ValueError(f"tensor {stray[0]!r} belongs to a quantized layer but is not used")
    dense = {k: v for k, v in sd.items() if not k.startswith(inside)}
    expected = {k: t for k, t in model.state_dict(keep_vars=True).items() if not k.startswith(inside)}
    if strict:
        unexpected = sorted(set(dense) - set(expected))
        if unexpected:
            raise ValueError(f"tensor {unexpected[0]!r} of the checkpoint has no place in the model "
                             f"({len(unexpected)} such)")
        alias = _aliases(model)
        missing = sorted(k for k in set(expected) - set(dense) if not (alias.get(k, {k}) & set(dense)))
        if missing:
            raise ValueError(f"the checkpoint lacks {missing[0]!r} ({len(missing)} dense tensors missing)")
    for k, v in dense.items():
        if k in expected and tuple(expected[k].shape) != tuple(v.shape):
            raise ValueError(f"tensor {k!r} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    # non-persistent buffers (not in any checkpoint, e.g. rotary inv_freq) of a meta skeleton: rebuilt
    np_fix = {}
    for mname, mod in model.named_modules():
        if mname in built or any(mname.startswith(b) for b in inside):
            continue
        for attr in getattr(mod, "_non_persistent_buffers_set", ()):
            t = mod._buffers.get(attr)
            if t is not None and t.device.type == "meta":
                fresh_t = _rebuilt_buffer(mod, attr, target)
                if fresh_t is None:
                    raise ValueError(f"buffer {(mname + '.' if mname else '') + attr!r} is on the meta device and is "
                                     "not saved in checkpoints (non-persistent); build the skeleton on a real "
                                     "device")
                np_fix[(mname, attr)] = fresh_t
    # --- every check passed: change the model
    for (mname, attr), t in np_fix.items():
        model.get_submodule(mname)._buffers[attr] = t
    for name, mod in built.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, mod)
    # the skeleton's other meta tensors, materialized (tied weights stay tied)
    materialize_meta((m for m in model.modules() if not isinstance(m, QLinear)), target)
    model.load_state_dict({k: v for k, v in dense.items() if k in expected}, strict=False)
    return model


def load_gptq(source, model: nn.Module, config: Optional[Mapping] = None, *, backend: Optional[str] = None,
              dtype: Optional[torch.dtype] = None, strict: bool = True, device=None) -> nn.Module:
    """Load a GPTQ checkpoint into a dense skeleton, replacing its quantized ``nn.Linear`` layers with
    :class:`~sparsekit.nn.QLinear` (int4, W4A16).

    ``source``: a directory (``config.json`` with a ``quantization_config`` --
    ``quant_method: gptq``, ``bits: 4``, ``group_size``, ``sym``, ``desc_act``,
    ``checkpoint_format`` (or ``format``) ``gptq`` / ``gptq_v2`` -- and
    ``*.safetensors``) or a ``(state_dict, config)`` pair, ``config`` being
    ``config.json``'s content or its ``quantization_config`` (``config=``
    overrides).  Every ``<layer>.qweight`` of the checkpoint names a quantized
    layer (``qzeros``, ``scales``, ``g_idx`` optional, ``bias`` optional); the
    other tensors load into the skeleton as they are.  ``model``: plain
    ``nn.Linear`` layers, possibly on the meta device (created on ``device``,
    default CPU).  ``dtype``: the scale (= compute) dtype, default the
    checkpoint's (float16); ``torch.bfloat16`` rounds the scales (lossy).  With
    ``strict``, a tensor the model does not take or a dense tensor the
    checkpoint lacks raises ``ValueError``; every layer is converted and checked
    before the model changes.  Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sd, cfg = _read_source(source)
    spec = _gptq_spec(_quant_config(config if config is not None else cfg, "gptq"))

    def convert(name, sd):
        p = name + "."
        w = gptq_to_int4(sd[p + "qweight"], sd[p + "qzeros"], sd[p + "scales"], sd.get(p + "g_idx"),
                         group_size=spec["group_size"], sym=spec["sym"],
                         checkpoint_format=spec["checkpoint_format"], dtype=dtype)
        return w, [p + t for t in ("qweight", "qzeros", "scales", "g_idx") if p + t in sd]

    return _load(sd, model, convert, ("qweight", "qzeros", "scales"), backend=backend, strict=strict,
                 device=device)


def load_awq(source, model: nn.Module, config: Optional[Mapping] = None, *, backend: Optional[str] = None,
             dtype: Optional[torch.dtype] = None, strict: bool = True, device=None) -> nn.Module:
    """Load an AutoAWQ GEMM checkpoint (``quant_method: awq``, ``version: gemm``, ``bits`` / ``w_bit`` 4,
    ``group_size`` / ``q_group_size``) into a dense skeleton; as :func:`load_gptq` otherwise.
    Layers in ``modules_to_not_convert`` must be dense in the checkpoint."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sd, cfg = _read_source(source)
    q = _quant_config(config if config is not None else cfg, "awq")
    spec = _awq_spec(q)

    def convert(name, sd):
        p = name + "."
        w = awq_to_int4(sd[p + "qweight"], sd[p + "qzeros"], sd[p + "scales"], group_size=spec["group_size"],
                        dtype=dtype)
        return w, [p + t for t in ("qweight", "qzeros", "scales")]

    return _load(sd, model, convert, ("qweight", "qzeros", "scales"), backend=backend, strict=strict,
                 device=device, skip=tuple(q.get("modules_to_not_convert") or ()))


def load_hub_checkpoint(path, model: nn.Module, **kwargs) -> nn.Module:
    """Load a quantized checkpoint directory into ``model`` by its ``config.json``'s
    ``quantization_config.quant_method``: ``gptq`` (:func:`load_gptq`), ``awq`` (:func:`load_awq`),
    ``compressed-tensors`` (:func:`~sparsekit.interop.compressed_tensors.load_compressed_tensors`);
    a directory with ``sparsekit_config.json`` goes to :func:`sparsekit.load_pretrained`."""
    d = os.fspath(path)
    if not os.path.isdir(d):
        raise ValueError(f"{d!r} is not a directory")
    if os.path.isfile(os.path.join(d, "sparsekit_config.json")):
        from ..pretrained import load_pretrained

        return load_pretrained(d, model, **kwargs)
    cfg_path = os.path.join(d, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{d!r} has neither sparsekit_config.json nor config.json")
    q = _read_json(cfg_path).get("quantization_config")
    method = q.get("quant_method") if isinstance(q, Mapping) else None
    if method == "gptq":
        return load_gptq(d, model, **kwargs)
    if method == "awq":
        return load_awq(d, model, **kwargs)
    if method == "compressed-tensors":
        from .compressed_tensors import load_compressed_tensors

        return load_compressed_tensors(d, model, **kwargs)
    if method == "sparsekit":
        raise ValueError(f"{d!r} is a sparsekit transformers directory: load it with "
                         "AutoModel*.from_pretrained after importing sparsekit.integrations.transformers")
    raise ValueError(f"{d!r}: quantization_config.quant_method is {method!r}; supported: gptq, awq, "
                     "compressed-tensors (or a sparsekit_config.json directory)")
