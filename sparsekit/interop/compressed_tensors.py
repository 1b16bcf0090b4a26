"""compressed-tensors checkpoints <-> :class:`~sparsekit.nn.QLinear` (W4A16 / W4A8 ``pack-quantized``,
W8A8 ``int-quantized``).

compressed-tensors (the format of llm-compressor and vLLM) stores a quantized
``nn.Linear`` named ``L`` as tensors ``L.weight_*`` plus a ``quantization_config``
block in ``config.json``.  The conversion here is a pure integer repack: codes
and zero points move between the two layouts with shifts and masks, never
through a float, and the scales are copied unchanged, so the dequantized weights
agree bit for bit (both compute ``(q - zero) * scale`` once, in the scale dtype).

W4 (``format: pack-quantized``, ``num_bits: 4``, ``type: int``):

=================  ========================================  ==================================================
quantity           compressed-tensors                        sparsekit :class:`~sparsekit.formats.Int4Weight`
=================  ========================================  ==================================================
code               signed ``c`` in [-8, 7]                   unsigned ``q = c + 8`` in [0, 15]
packing axis       K: ``weight_packed`` ``(N, ceil(K/8))``   K: ``qweight`` ``(N, K/8)`` int32
                   int32
nibble of column   ``4 * (k % 8)`` (sequential), holding     ``4 * p``, ``p = [0, 4, 1, 5, 2, 6, 3, 7][k % 8]``
``k`` in its word  ``c + 8``                                 (AWQ's order ``[0, 2, 4, 6, 1, 3, 5, 7]``, read
                                                             as "nibble i holds column ORDER[i]")
scale              ``weight_scale`` ``(N, G)``               ``scales`` ``(N, G)``, same dtype (fp16 / bf16)
zero point         ``weight_zero_point``: signed ``z`` in    ``zeros`` ``(N, G)`` holding ``z + 8`` in the
(asymmetric)       [-8, 7] packed along **N**,               scale dtype
                   ``(ceil(N/8), G)`` int32, nibble
                   ``4 * (n % 8)`` holding ``z + 8``
zero point         none (``c * scale``)                      ``zeros=None``, fixed zero 8
(symmetric)
shape              ``weight_shape`` = ``[N, K]``             ``shape`` ``(N, K)``
groups             ``strategy: group``, ``group_size``       ``group_size`` 32, 64, 128
                   ``strategy: channel``                     ``group_size = K`` (``-1``)
=================  ========================================  ==================================================

W8A8 (``format: int-quantized``, weights ``num_bits: 8``, ``strategy: channel``,
symmetric; ``input_activations``: 8-bit, ``strategy: token``, ``dynamic: true``,
symmetric): ``weight`` ``(N, K)`` int8 is :class:`~sparsekit.formats.Int8Weight`'s
``qweight`` as is, ``weight_scale`` ``(N, 1)`` becomes ``scales`` ``(N,)`` float32
(exact widening; exported scales are float32).  ``strategy: tensor`` (one scale)
is read as the same scale on every row.  Dynamic per-token activations are
QLinear's ``act_bits=8``; a ``pack-quantized`` W4 scheme with such
``input_activations`` is ``bits=4, act_bits=8`` (W4A8).

What has no sparsekit equivalent is rejected with a ``ValueError`` naming the
field: other bit widths or float types, group sizes other than 32 / 64 / 128 /
whole row, ``K`` not a multiple of 8 (int4), ``block`` / ``tensor_group``
strategies, int4 ``tensor`` strategy, activation reordering with a
non-trivial ``weight_g_idx`` (``actorder: group``), static or asymmetric
activation quantization, output activations, ``scale_dtype`` settings, and an
int8 code of -128: compressed-tensors' symmetric int8 grid is [-128, 127] with
``scale = absmax / 127.5``, so its own quantizer emits -128 in many rows (those whose
largest-magnitude weight is negative, depending on the rounding of the scale), while :class:`~sparsekit.formats.Int8Weight` holds [-127, 127].  Such a layer
loads only with ``int8_min="clip"`` (-128 becomes -127: those weights move by one
scale step, the rest stay bit exact).
"""
from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from ..formats.int4 import Int4Weight, SYMMETRIC_ZERO
from ..formats.int8 import Int8Weight

__all__ = ["int4_from_ct", "int4_to_ct", "int8_from_ct", "int8_to_ct", "load_compressed_tensors",
           "save_compressed_tensors", "PACK_QUANTIZED", "INT_QUANTIZED"]

PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
MIXED = "mixed-precision"
QUANT_METHOD = "compressed-tensors"
INT4_GROUP_SIZES = (32, 64, 128)
_HALF = (torch.float16, torch.bfloat16)
_INSTALL = "pip install 'sparsekit[interop]'"


def _require_ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as e:
        raise ImportError(f"this needs the compressed-tensors package ({_INSTALL}): {e}") from e
    return compressed_tensors


# ------------------------------------------------------------------ integer packing
def _pack_seq4(codes: torch.Tensor) -> torch.Tensor:
    """``(R, C)`` integers in [0, 15] -> ``(R, ceil(C / 8))`` int32, column ``c`` in nibble ``c % 8``."""
    r, c = codes.shape
    w = (c + 7) // 8
    x = codes.to(torch.int64)
    if w * 8 != c:
        x = torch.nn.functional.pad(x, (0, w * 8 - c))
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)
    word = (x.reshape(r, w, 8) << shifts).sum(dim=-1)       # < 2**32, exact in int64
    word = torch.where(word >= 2 ** 31, word - 2 ** 32, word)
    return word.to(torch.int32).contiguous()


def _unpack_seq4(words: torch.Tensor, c: int) -> torch.Tensor:
    """Inverse of :func:`_pack_seq4`: ``(R, W)`` int32 -> ``(R, c)`` int64 in [0, 15]."""
    r, w = words.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=words.device)
    x = ((words.to(torch.int64) & 0xFFFFFFFF)[..., None] >> shifts) & 0xF
    return x.reshape(r, w * 8)[:, :c]


def _shape_pair(weight_shape, what: str = "weight_shape") -> tuple:
    if isinstance(weight_shape, torch.Tensor):
        if weight_shape.is_floating_point() or weight_shape.numel() != 2:
            raise ValueError(f"{what} must hold two integers [out_features, in_features], got {weight_shape}")
        weight_shape = [int(v) for v in weight_shape.reshape(-1).tolist()]
    try:
        n, k = (int(v) for v in weight_shape)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be [out_features, in_features], got {weight_shape!r}") from None
    if n < 1 or k < 1:
        raise ValueError(f"{what} must be positive, got {[n, k]}")
    return n, k


def _check_tensor(t, name: str, dtypes=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    return t


def _scale_dtype(scale: torch.Tensor, dtype: Optional[torch.dtype], name: str = "weight_scale") -> torch.dtype:
    if dtype is not None:
        if dtype not in _HALF:
            raise TypeError(f"dtype must be float16 or bfloat16, got {dtype}")
        return dtype
    if scale.dtype not in _HALF:
        raise ValueError(f"{name} is {scale.dtype}; an int4 QLinear keeps float16 or bfloat16 scales. Pass "
                         f"dtype=torch.float16 / torch.bfloat16 to convert (the dequantized weight then differs "
                         f"by the rounding of the scales)")
    return scale.dtype


def _resolve_int4_group(group_size, k: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int (32, 64, 128, or -1 for strategy 'channel'), got "
                        f"{type(group_size).__name__}")
    if group_size == -1 or group_size == k:
        return k
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is not supported by Int4Weight: use 32, 64, 128, or -1 / "
                         f"in_features ({k}) for strategy 'channel'")
    if k % group_size:
        raise ValueError(f"weight_shape in_features={k} is not a multiple of group_size={group_size}")
    return group_size


# ------------------------------------------------------------------ per layer: int4
def int4_from_ct(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                 weight_zero_point: Optional[torch.Tensor] = None, *, weight_shape, group_size: int,
                 symmetric: bool, weight_g_idx: Optional[torch.Tensor] = None,
                 dtype: Optional[torch.dtype] = None) -> Int4Weight:
    """A compressed-tensors ``pack-quantized`` 4-bit layer as an :class:`Int4Weight`.

    ``group_size`` is the scheme's: 32 / 64 / 128 (``strategy: group``) or ``-1``
    (``strategy: channel``, one group per row).  ``weight_zero_point`` is required
    exactly when ``symmetric`` is False; it may be packed (int32
    ``(ceil(N/8), G)``, as written by compressed-tensors) or unpacked (integer
    ``(N, G)`` in [-8, 7]).  ``weight_g_idx`` (activation reordering) is accepted
    only when it is the trivial ``k // group_size``.  ``dtype`` converts float32
    scales (lossy); by default they must already be float16 / bfloat16.
    """
    _check_tensor(weight_packed, "weight_packed", (torch.int32,))
    _check_tensor(weight_scale, "weight_scale")
    if not weight_scale.is_floating_point():
        raise TypeError(f"weight_scale must be floating point, got {weight_scale.dtype}")
    n, k = _shape_pair(weight_shape)
    if k % 8:
        raise ValueError(f"weight_shape in_features={k} is not a multiple of 8: Int4Weight packs 8 codes per "
                         "int32 word along in_features")
    gs = _resolve_int4_group(group_size, k)
    g = k // gs
    if weight_packed.dim() != 2 or tuple(weight_packed.shape) != (n, k // 8):
        raise ValueError(f"weight_packed must have shape {(n, k // 8)} for weight_shape {[n, k]}, got "
                         f"{tuple(weight_packed.shape)}")
    if weight_scale.dim() == 1 and g == 1:
        weight_scale = weight_scale[:, None]
    if tuple(weight_scale.shape) != (n, g):
        raise ValueError(f"weight_scale must have shape {(n, g)} (out_features, in_features // group_size), "
                         f"got {tuple(weight_scale.shape)}")
    dt = _scale_dtype(weight_scale, dtype)
    if weight_g_idx is not None:
        _check_tensor(weight_g_idx, "weight_g_idx")
        trivial = torch.arange(k, device=weight_g_idx.device) // gs
        if tuple(weight_g_idx.shape) != (k,) or not torch.equal(weight_g_idx.to(torch.int64), trivial):
            raise ValueError("weight_g_idx reorders input features into groups (actorder 'group'); Int4Weight "
                             "holds contiguous groups only")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    q = _unpack_seq4(weight_packed, k)                 # = signed code + 8 = sparsekit's unsigned code
    if symmetric:
        if weight_zero_point is not None:
            raise ValueError("weight_zero_point given for a symmetric scheme (symmetric codes have no zero point)")
        zeros = None
    else:
        if weight_zero_point is None:
            raise ValueError("an asymmetric scheme needs weight_zero_point")
        _check_tensor(weight_zero_point, "weight_zero_point")
        zp = weight_zero_point
        if zp.dim() == 1 and g == 1:
            zp = zp[:, None]
        if zp.dtype == torch.int32 and tuple(zp.shape) == ((n + 7) // 8, g):
            zeros = _unpack_seq4(zp.t().contiguous(), n).t()                 # packed along N
        elif tuple(zp.shape) == (n, g) and not zp.is_complex() and zp.dtype != torch.bool:
            z = zp.to(torch.float64) if zp.is_floating_point() else zp.to(torch.int64)
            if zp.is_floating_point() and not bool((z == torch.round(z)).all()):
                raise ValueError("weight_zero_point must hold integers")
            z = z.to(torch.int64)
            if z.numel() and (int(z.min()) < -8 or int(z.max()) > 7):
                raise ValueError(f"weight_zero_point must be in [-8, 7] (signed int4), got "
                                 f"[{int(z.min())}, {int(z.max())}]")
            zeros = z + SYMMETRIC_ZERO
        else:
            raise ValueError(f"weight_zero_point must be packed int32 {((n + 7) // 8, g)} or unpacked {(n, g)}, "
                             f"got {zp.dtype} {tuple(zp.shape)}")
    return Int4Weight.from_quantized(q.to(torch.uint8), weight_scale, zeros, gs, symmetric, dtype=dt)


def int4_to_ct(weight: Int4Weight) -> dict:
    """An :class:`Int4Weight` as compressed-tensors ``pack-quantized`` tensors: ``weight_packed``,
    ``weight_scale``, ``weight_shape`` and, when asymmetric, ``weight_zero_point`` (packed along N).

    The scheme's ``group_size`` is ``weight.group_size`` (``strategy: group``) unless it
    is not 32 / 64 / 128, i.e. the whole row (``strategy: channel``); see
    :func:`int4_scheme_args`."""
    if not isinstance(weight, Int4Weight):
        raise TypeError(f"weight must be an Int4Weight, got {type(weight).__name__}")
    if weight.perm is not None:
        raise ValueError("weight has an act-order input permutation (g_idx groups that are not consecutive); "
                         "its compressed-tensors export (weight_g_idx) is not supported")
    n, k = weight.shape
    q = weight.unpack()                                  # sparsekit's unsigned codes = signed + 8
    out = {"weight_packed": _pack_seq4(q), "weight_scale": weight.scales.clone(),
           "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if not weight.symmetric:
        z = weight.zeros.to(torch.int64)                 # integers in [0, 15] (validated)
        out["weight_zero_point"] = _pack_seq4(z.t().contiguous()).t().contiguous()
    return out


def int4_scheme_args(weight: Int4Weight) -> dict:
    """The ``weights`` entry of a compressed-tensors scheme for ``weight``."""
    args = {"num_bits": 4, "type": "int", "symmetric": bool(weight.symmetric), "dynamic": False,
            "actorder": None, "block_structure": None}
    if weight.group_size in INT4_GROUP_SIZES:
        args.update(strategy="group", group_size=int(weight.group_size))
    else:
        args.update(strategy="channel", group_size=None)
    return args


# ------------------------------------------------------------------ per layer: int8
def int8_from_ct(weight: torch.Tensor, weight_scale: torch.Tensor, *, int8_min: str = "error") -> Int8Weight:
    """A compressed-tensors ``int-quantized`` 8-bit symmetric layer (``strategy`` channel: ``weight_scale``
    ``(N, 1)``; tensor: one scale) as an :class:`Int8Weight` (scales widened to float32, exact).

    ``int8_min``: ``"error"`` (default) rejects a code of -128 (Int8Weight holds
    [-127, 127]); ``"clip"`` stores it as -127 (those weights move by one scale step).
    """
    _check_tensor(weight, "weight", (torch.int8,))
    _check_tensor(weight_scale, "weight_scale")
    if int8_min not in ("error", "clip"):
        raise ValueError(f"int8_min must be 'error' or 'clip', got {int8_min!r}")
    if weight.dim() != 2 or 0 in weight.shape:
        raise ValueError(f"weight must be a non-empty 2-D (out_features, in_features) tensor, got "
                         f"{tuple(weight.shape)}")
    if not weight_scale.is_floating_point() or weight_scale.dtype == torch.float64:
        raise TypeError(f"weight_scale must be float16, bfloat16 or float32, got {weight_scale.dtype}")
    n, k = weight.shape
    if weight_scale.numel() == 1 and weight_scale.dim() <= 2:       # strategy: tensor
        s = weight_scale.reshape(1).to(torch.float32).expand(n).contiguous()
    elif tuple(weight_scale.shape) in ((n, 1), (n,)):
        s = weight_scale.reshape(n).to(torch.float32).contiguous()
    else:
        raise ValueError(f"weight_scale must have shape ({n}, 1) (strategy 'channel') or (1,) (strategy "
                         f"'tensor'), got {tuple(weight_scale.shape)}")
    low = weight == -128
    if bool(low.any()):
        if int8_min == "error":
            r, c = (int(i) for i in low.nonzero()[0])
            raise ValueError(f"weight holds the code -128 ({int(low.sum())} entries, first at row {r}, column "
                             f"{c}); Int8Weight holds [-127, 127]. Pass int8_min='clip' to store them as -127")
        weight = torch.where(low, torch.full_like(weight, -127), weight)
    return Int8Weight(weight.contiguous(), s, (n, k))


def int8_to_ct(weight: Int8Weight) -> dict:
    """An :class:`Int8Weight` as compressed-tensors ``int-quantized`` tensors: ``weight`` ``(N, K)`` int8 and
    ``weight_scale`` ``(N, 1)`` float32 (``strategy: channel``, symmetric)."""
    if not isinstance(weight, Int8Weight):
        raise TypeError(f"weight must be an Int8Weight, got {type(weight).__name__}")
    return {"weight": weight.qweight.clone(), "weight_scale": weight.scales.to(torch.float32).reshape(-1, 1).clone()}


INT8_WEIGHT_ARGS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
                    "dynamic": False, "actorder": None, "block_structure": None}
TOKEN_ACT_ARGS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "group_size": None,
                  "dynamic": True, "actorder": None, "block_structure": None}


# ------------------------------------------------------------------ configuration
def _read_json(path: str) -> dict:
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def _quant_block(config: Mapping) -> dict:
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict (config.json or its quantization_config), got "
                        f"{type(config).__name__}")
    q = config.get("quantization_config", config)
    if hasattr(q, "to_dict") and not isinstance(q, Mapping):
        q = q.to_dict()
    if not isinstance(q, Mapping) or "config_groups" not in q:
        raise ValueError("config has no quantization_config with config_groups (not a compressed-tensors "
                         "checkpoint)")
    method = q.get("quant_method", QUANT_METHOD)
    if method != QUANT_METHOD:
        raise ValueError(f"quantization_config.quant_method is {method!r}, expected {QUANT_METHOD!r}")
    status = q.get("quantization_status", "compressed")
    if status != "compressed":
        raise ValueError(f"quantization_config.quantization_status is {status!r}: only 'compressed' checkpoints "
                         "hold packed weights")
    for key in ("kv_cache_scheme", "transform_config"):
        if q.get(key):
            raise ValueError(f"quantization_config.{key} is set; it has no sparsekit equivalent")
    sp = q.get("sparsity_config")
    if sp:
        raise ValueError("quantization_config.sparsity_config is set; sparse compressed-tensors formats are not "
                         "supported")
    return dict(q)


def _schemes(q: Mapping) -> list:
    """``[(group name, scheme dict)]`` with preset names expanded (that needs compressed-tensors)."""
    groups = q["config_groups"]
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError("quantization_config.config_groups must be a non-empty dict")
    out = []
    for name, scheme in groups.items():
        if isinstance(scheme, (list, tuple)):            # preset name -> targets
            _require_ct()
            from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
            try:
                scheme = preset_name_to_scheme(name, list(scheme)).model_dump()
            except KeyError as e:
                raise ValueError(f"config_groups.{name}: unknown preset scheme") from e
        if not isinstance(scheme, Mapping) or not scheme.get("targets"):
            raise ValueError(f"config_groups.{name} must be a scheme with non-empty targets")
        out.append((name, dict(scheme)))
    return out


def _check_scheme(gname: str, scheme: Mapping, fmt_default: str) -> dict:
    """Validate one scheme; returns ``{format, bits, group_size, symmetric, act_bits}``."""
    where = f"config_groups.{gname}"
    fmt = scheme.get("format") or fmt_default
    if fmt == MIXED:
        raise ValueError(f"{where}.format: a mixed-precision config needs a format on every scheme")
    if fmt not in (PACK_QUANTIZED, INT_QUANTIZED):
        raise ValueError(f"{where}.format is {fmt!r}; supported: {PACK_QUANTIZED!r} (W4A16 / W4A8) and "
                         f"{INT_QUANTIZED!r} (W8A8)")
    w = scheme.get("weights")
    if not isinstance(w, Mapping):
        raise ValueError(f"{where}.weights is missing")
    if scheme.get("output_activations"):
        raise ValueError(f"{where}.output_activations is set; output quantization is not supported")
    if w.get("type", "int") != "int":
        raise ValueError(f"{where}.weights.type is {w.get('type')!r}; only 'int' is supported")
    if w.get("dynamic", False) not in (False, None):
        raise ValueError(f"{where}.weights.dynamic must be false")
    if w.get("block_structure") is not None:
        raise ValueError(f"{where}.weights.block_structure is set; block strategies are not supported")
    if w.get("actorder") not in (None, "weight", "static"):
        raise ValueError(f"{where}.weights.actorder is {w.get('actorder')!r}; only None / 'weight' (no stored "
                         "reordering) are supported")
    if w.get("scale_dtype") is not None:
        raise ValueError(f"{where}.weights.scale_dtype is {w.get('scale_dtype')!r}; only unrounded scales are "
                         "supported")
    bits = w.get("num_bits", 8)
    strategy = w.get("strategy")
    gs = w.get("group_size")
    if strategy is None:
        strategy = "tensor" if gs is None else ("group" if gs > 0 else "channel")
    sym = bool(w.get("symmetric", True))
    if fmt == PACK_QUANTIZED:
        if bits != 4:
            raise ValueError(f"{where}.weights.num_bits is {bits}; pack-quantized layers load as int4 (4 bits)")
        if strategy == "group":
            if gs not in INT4_GROUP_SIZES:
                raise ValueError(f"{where}.weights.group_size is {gs}; Int4Weight supports {INT4_GROUP_SIZES} "
                                 "(or strategy 'channel')")
        elif strategy == "channel":
            gs = -1
        else:
            raise ValueError(f"{where}.weights.strategy is {strategy!r}; int4 supports 'group' and 'channel'")
    else:
        if bits != 8:
            raise ValueError(f"{where}.weights.num_bits is {bits}; int-quantized layers load as int8 (8 bits)")
        if strategy not in ("channel", "tensor"):
            raise ValueError(f"{where}.weights.strategy is {strategy!r}; int8 supports 'channel' and 'tensor'")
        if not sym:
            raise ValueError(f"{where}.weights.symmetric is false; Int8Weight is symmetric")
        gs = -1
    a = scheme.get("input_activations")
    act_bits = None
    if a:
        if (a.get("type", "int") != "int" or a.get("num_bits") != 8 or a.get("strategy") != "token"
                or a.get("dynamic") is not True or not a.get("symmetric", True)):
            raise ValueError(f"{where}.input_activations must be 8-bit int, symmetric, strategy 'token', "
                             f"dynamic true (QLinear's per-token act_bits=8), got {dict(a)}")
        act_bits = 8
    elif bits == 8:
        raise ValueError(f"{where}.input_activations is missing: int8 weights run as W8A8 (per-token dynamic "
                         "8-bit activations)")
    return {"format": fmt, "bits": bits, "group_size": gs, "symmetric": sym, "act_bits": act_bits}


def _match_class(module: nn.Module, target: str) -> bool:
    return any(issubclass(c, nn.Module) and (c.__name__ == target or (c.__name__ == "LinearBase"
                                                                       and target == "Linear"))
               for c in type(module).__mro__)


def _match_name(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def _is_match(name: str, module: nn.Module, targets) -> bool:
    return any(_match_name(name, t) or _match_class(module, t) for t in targets)


def _assign(model: nn.Module, q: Mapping) -> dict:
    """``{module name: (group name, checked scheme)}`` following compressed-tensors' matching rules:
    ``ignore`` wins; among the matching targets an exact name beats a ``re:`` pattern beats a class name."""
    fmt_default = q.get("format") or PACK_QUANTIZED
    target_to = {}
    for gname, scheme in _schemes(q):
        for t in scheme["targets"]:
            target_to[t] = (gname, scheme)
    ignore = list(q.get("ignore") or [])
    out = {}
    for name, mod in model.named_modules():
        if not name:
            continue
        if not any(_match_name(name, t) or _match_class(mod, t) for t in target_to):
            continue
        if ignore and _is_match(name, mod, ignore):
            continue
        ordered = sorted(target_to, key=lambda t: (t.startswith("re:"), t))
        hit = [t for t in ordered if _match_name(name, t)] + [t for t in ordered if _match_class(mod, t)]
        gname, scheme = target_to[hit[0]]
        if not isinstance(mod, nn.Linear):
            if isinstance(mod, nn.Embedding):
                raise ValueError(f"layer {name!r} (Embedding) is targeted by config_groups.{gname}; only "
                                 "nn.Linear layers can become QLinear")
            continue                 # compressed-tensors quantizes only Linear / Embedding among matches
        out[name] = (gname, _check_scheme(gname, scheme, fmt_default))
    return out


# ------------------------------------------------------------------ model level
def _read_tensors(source, pair: str = "(state_dict, config)") -> tuple:
    """(state dict, config.json contents) of a checkpoint directory (every ``*.safetensors`` file, each tensor in
    one file only), or the given ``(state_dict, config)`` pair."""
    from safetensors.torch import load_file

    if isinstance(source, (str, os.PathLike)):
        d = os.fspath(source)
        if not os.path.isdir(d):
            raise ValueError(f"{d!r} is not a directory")
        files = sorted(glob.glob(os.path.join(d, "*.safetensors")))
        if not files:
            raise ValueError(f"{d!r} holds no *.safetensors file")
        sd = {}
        for f in files:
            part = load_file(f)
            dup = set(part) & set(sd)
            if dup:
                raise ValueError(f"tensor {sorted(dup)[0]!r} appears in more than one file of {d!r}")
            sd.update(part)
        cfg_path = os.path.join(d, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"{d!r} has no config.json")
        return sd, _read_json(cfg_path)
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], Mapping):
        return dict(source[0]), source[1]
    raise TypeError(f"source must be a checkpoint directory or a {pair} pair, got {type(source).__name__}")


def _layer_weight(name: str, spec: dict, sd: Mapping, dtype, int8_min: str):
    p = name + "."
    extra = []
    try:
        zp = sd.get(p + "weight_zero_point")
        if spec["symmetric"] and zp is not None:
            # some writers keep an all-zero (unpacked) zero point for symmetric schemes: accept only that
            if zp.is_floating_point() or zp.dtype == torch.int32 or bool((zp != 0).any()):
                raise ValueError(f"tensor {p + 'weight_zero_point'!r} is present for a symmetric scheme and is not "
                                 "an all-zero unpacked zero point")
            extra.append(p + "weight_zero_point")
        if spec["bits"] == 4:
            keys = ["weight_packed", "weight_scale", "weight_shape"] + ([] if spec["symmetric"]
                                                                         else ["weight_zero_point"])
            missing = [p + k for k in keys if p + k not in sd]
            if missing:
                raise ValueError(f"tensor {missing[0]!r} is missing")
            w = int4_from_ct(sd[p + "weight_packed"], sd[p + "weight_scale"], sd.get(p + "weight_zero_point"),
                             weight_shape=sd[p + "weight_shape"], group_size=spec["group_size"],
                             symmetric=spec["symmetric"], weight_g_idx=sd.get(p + "weight_g_idx"), dtype=dtype)
            used = keys + (["weight_g_idx"] if p + "weight_g_idx" in sd else [])
        else:
            missing = [p + k for k in ("weight", "weight_scale") if p + k not in sd]
            if missing:
                raise ValueError(f"tensor {missing[0]!r} is missing")
            w = int8_from_ct(sd[p + "weight"], sd[p + "weight_scale"], int8_min=int8_min)
            used = ["weight", "weight_scale"]
    except (ValueError, TypeError) as e:
        raise type(e)(f"layer {name!r}: {e}") from e
    return w, [p + k for k in used] + extra


def load_compressed_tensors(source, model: nn.Module, config: Optional[Mapping] = None, *,
                            backend: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                            int8_min: str = "error", strict: bool = True, device=None) -> nn.Module:
    """Load a compressed-tensors checkpoint into a dense skeleton, replacing the quantized ``nn.Linear``
    layers with :class:`~sparsekit.nn.QLinear`.

    ``source`` is a directory (``config.json`` with a ``quantization_config`` and
    ``*.safetensors``) or a ``(state_dict, config)`` pair, where ``config`` is
    ``config.json``'s content or its ``quantization_config`` (``config=`` overrides
    the directory's).  ``model`` holds plain ``nn.Linear`` layers (possibly on the
    meta device; those tensors are then created on ``device``, default CPU).
    Targets and ``ignore`` follow compressed-tensors: class names (``"Linear"``),
    exact module names and ``re:`` regexes.  Every targeted layer is converted and
    validated before the model changes; with ``strict`` a tensor the model does
    not take, or a dense tensor the checkpoint lacks, raises ``ValueError``.
    ``dtype``: scale dtype for int4 checkpoints with float32 scales (lossy);
    ``int8_min``: see :func:`int8_from_ct`.  Returns ``model`` (modified in place).
    """
    from ..nn.qlinear import QLinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sd, cfg = _read_tensors(source)
    if config is not None:
        cfg = config
    q = _quant_block(cfg)
    plan = _assign(model, q)
    target = torch.device(device) if device is not None else torch.device("cpu")
    built, used = {}, set()
    for name, (gname, spec) in plan.items():
        lin = model.get_submodule(name)
        w, keys = _layer_weight(name, spec, sd, dtype, int8_min)
        if w.shape != (lin.out_features, lin.in_features):
            raise ValueError(f"layer {name!r}: the checkpoint's weight is {tuple(w.shape)}, the skeleton's "
                             f"Linear is {(lin.out_features, lin.in_features)}")
        bias = sd.get(name + ".bias")
        if (bias is None) != (lin.bias is None):
            raise ValueError(f"layer {name!r}: bias {'missing from the checkpoint' if bias is None else 'present'} "
                             f"but the skeleton's Linear has bias={lin.bias is not None}")
        if bias is not None:
            if tuple(bias.shape) != (lin.out_features,):
                raise ValueError(f"layer {name!r}: bias has shape {tuple(bias.shape)}, expected "
                                 f"({lin.out_features},)")
            keys.append(name + ".bias")
        ldt = None
        if spec["bits"] == 8:
            s = sd[name + ".weight_scale"].dtype
            ldt = dtype or (s if s in _HALF else (lin.weight.dtype if lin.weight.dtype in _HALF else torch.float16))
        w = w.to(target)
        mod = QLinear.from_weight(w, None if bias is None else bias.to(target), backend=backend,
                                  act_bits=spec["act_bits"], dtype=ldt)
        built[name] = mod
        used.update(keys)
    if not built:
        raise ValueError("no nn.Linear layer of the model matches the config's targets (or all are ignored)")
    # dense tensors: everything not consumed by a converted layer
    dense = {k: v for k, v in sd.items() if k not in used}
    inside = tuple(n + "." for n in built)
    stray = [k for k in dense if k.startswith(inside)]
    if stray and strict:
        raise ValueError(f"tensor {stray[0]!r} belongs to a converted layer but is not used (static activation "
                         "scales, or a tensor of another format)")
    dense = {k: v for k, v in dense.items() if not k.startswith(inside)}
    expected = {k: t for k, t in model.state_dict().items() if not k.startswith(inside)}
    if strict:
        unexpected = sorted(set(dense) - set(expected))
        missing = sorted(set(expected) - set(dense))
        if unexpected:
            raise ValueError(f"tensor {unexpected[0]!r} of the checkpoint has no place in the model "
                             f"({len(unexpected)} such)")
        if missing:
            raise ValueError(f"the checkpoint lacks {missing[0]!r} ({len(missing)} dense tensors missing)")
    for k, v in dense.items():
        if k in expected and tuple(expected[k].shape) != tuple(v.shape):
            raise ValueError(f"tensor {k!r} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(expected[k].shape)}")
    # --- every check passed: change the model
    for name, mod in built.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, mod)
    for mod in model.modules():
        if isinstance(mod, QLinear):
            continue
        for attr, t in list(mod._parameters.items()):
            if t is not None and t.device.type == "meta":
                mod._parameters[attr] = nn.Parameter(torch.empty_like(t, device=target),
                                                     requires_grad=t.requires_grad)
        for attr, t in list(mod._buffers.items()):
            if t is not None and t.device.type == "meta":
                mod._buffers[attr] = torch.empty_like(t, device=target)
    model.load_state_dict(dense, strict=False)
    return model


def _scheme_key(mod) -> tuple:
    if mod.bits == 4:
        gs = mod.group_size if mod.group_size in INT4_GROUP_SIZES else -1
        return (4, gs, bool(mod.symmetric), mod.act_bits)
    return (8, -1, True, mod.act_bits)


def save_compressed_tensors(model: nn.Module, out_dir, *, config: Optional[Mapping] = None) -> str:
    """Write ``model`` as a compressed-tensors checkpoint: ``model.safetensors`` and ``config.json`` with its
    ``quantization_config`` (one config group per distinct QLinear setting, targeting the layers by name;
    plain ``nn.Linear`` layers are listed in ``ignore``).

    Supported layers: :class:`~sparsekit.nn.QLinear` with int4 weights and
    ``act_bits`` None (W4A16) or 8 (W4A8), or int8 weights with ``act_bits=8``
    (W8A8).  Any other sparsekit module, an AWQ ``input_scale`` or another
    ``act_bits`` raises ``ValueError`` naming the layer.  ``config`` (e.g. the
    model's ``config.json`` content) is written alongside; a ``config`` attribute
    of the model with ``to_dict()`` is used when ``config`` is not given.
    Returns the path of ``config.json``.
    """
    from safetensors.torch import save_file

    from ..nn.qlinear import QLinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    qlayers, dense_linears = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, QLinear):
            if not name:
                raise ValueError("the model itself is a QLinear; wrap it in a container (e.g. nn.Sequential)")
            if mod.input_scale is not None:
                raise ValueError(f"layer {name!r}: QLinear with an AWQ input_scale has no compressed-tensors "
                                 "equivalent (fold the scale into the previous layer first)")
            ok = (mod.bits == 4 and mod.act_bits in (None, 8)) or (mod.bits == 8 and mod.act_bits == 8)
            if not ok:
                raise ValueError(f"layer {name!r}: QLinear bits={mod.bits}, act_bits={mod.act_bits!r} has no "
                                 "compressed-tensors format here (supported: W4A16, W4A8, W8A8 with act_bits=8)")
            qlayers[name] = mod
        elif type(mod).__module__.startswith("sparsekit.") and not any(
                name.startswith(q + ".") for q in qlayers):
            raise ValueError(f"layer {name!r} is a {type(mod).__name__}; compressed-tensors export supports "
                             "QLinear (int4 / W8A8) and dense layers only")
        elif isinstance(mod, nn.Linear):
            dense_linears.append(name)
    if not qlayers:
        raise ValueError("the model holds no QLinear layer to export")
    tensors = {}
    for k, v in model.state_dict().items():
        owner = k.rpartition(".")[0]
        if owner in qlayers:
            continue
        if v.device.type == "meta":
            raise ValueError(f"tensor {k!r} is on the meta device")
        tensors[k] = v.detach().to("cpu").clone().contiguous()
    groups: dict = {}
    for name, mod in qlayers.items():
        wf = mod.weight_format().to("cpu")
        packed = int4_to_ct(wf) if mod.bits == 4 else int8_to_ct(wf)
        for k, v in packed.items():
            tensors[f"{name}.{k}"] = v.contiguous()
        if mod.bias is not None:
            tensors[f"{name}.bias"] = mod.bias.detach().to("cpu").clone().contiguous()
        key = _scheme_key(mod)
        if key not in groups:
            if mod.bits == 4:
                scheme = {"weights": int4_scheme_args(wf), "format": PACK_QUANTIZED,
                          "input_activations": dict(TOKEN_ACT_ARGS) if mod.act_bits == 8 else None}
            else:
                scheme = {"weights": dict(INT8_WEIGHT_ARGS), "format": INT_QUANTIZED,
                          "input_activations": dict(TOKEN_ACT_ARGS)}
            scheme.update(targets=[], output_activations=None)
            groups[key] = scheme
        groups[key]["targets"].append(name)
    formats = {s["format"] for s in groups.values()}
    qcfg = {"config_groups": {f"group_{i}": s for i, s in enumerate(groups.values())},
            "format": formats.pop() if len(formats) == 1 else MIXED,
            "quant_method": QUANT_METHOD, "quantization_status": "compressed", "ignore": dense_linears,
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
            "transform_config": {}}
    if config is None and hasattr(model, "config") and hasattr(model.config, "to_dict"):
        config = model.config.to_dict()
    full = dict(config or {})
    full["quantization_config"] = qcfg
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"out_dir {out_dir!r} exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    path = os.path.join(out_dir, "config.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(full, f, indent=2, sort_keys=True)
    return path
