"""Triple-gate sparse convolution for video (SpVOS-style): per output tile of a
frame, UPDATE (recompute with the full conv), REUSE (keep the previous frame's
output) or SKIP (bias only).

Two functional ops, each a ``torch.library`` custom op with a fake
implementation (so they trace under ``torch.compile``):

* :func:`triple_gate_map` -- ``sparsekit::triple_gate_map``: the gate map
  ``(N, TH, TW)`` int8 (codes :data:`REUSE`, :data:`UPDATE`, :data:`SKIP`)
  and the compact tile list, computed from two frames:

  - temporal change: ``max |x_t - x_{t-1}|`` over the channels and the exact
    receptive field of the tile (every input tap of its output pixels);
    UPDATE when it exceeds ``threshold`` (``threshold=0`` reuses a tile only
    when its whole receptive field is bit-identical: lossless);
  - spatial importance (optional): a learned 1x1 conv ``w . x_t + b``
    averaged over each output pixel's in-bounds taps, then over the tile's
    output pixels; SKIP when this logit is below ``skip_logit``;
  - a tile that was SKIP in ``prev_gate`` and is not SKIP now is UPDATEd
    (its stored output is bias only).

* :func:`triple_gate_conv2d` -- ``sparsekit::triple_gate_conv2d_``: mutates
  the persistent output buffer: UPDATE tiles get the convolution, SKIP tiles
  the bias (0 without one), REUSE tiles are not touched.

The tile list (see :class:`TileGates`) is an int32 array of ``T = N*TH*TW``
slots, UPDATE tile ids packed from the front and SKIP ids from the back, with
``counts = [n_update, n_skip]`` on the device: nothing here synchronizes with
the host, and the Triton conv only does work for UPDATE/SKIP tiles.
``counts[2]`` counts the output pixels of the UPDATE tiles (the realized
compute ratio is ``counts[2] / (N * Ho * Wo)``).  A tile id
is ``n * TH * TW + i * TW + j``.

Backends: ``triton`` (CUDA), ``interpret`` (the same kernels on CPU under the
Triton interpreter) and ``reference`` (plain PyTorch: a dense conv composed
with the gate map; the numerical truth).  Besides the ops this module holds
the differentiable PyTorch gate features used by the training path of
:class:`sparsekit.nn.TripleGateConv2d` (:func:`gate_features`).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from ._checks import check_bias
from . import dispatch

__all__ = ["REUSE", "UPDATE", "SKIP", "TileGates", "triple_gate_conv2d", "triple_gate_map", "compact_gates",
           "validate_tile_gates",
           "dense_gates", "gate_features", "decide_gates", "pixel_gate", "update_ratio", "conv_output_size",
           "tile_grid", "tile_pixel_counts", "skip_logit_of"]

REUSE = 0
UPDATE = 1
SKIP = 2

OP = "triple_gate_conv2d"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

dispatch.register(OP, ("triton", "interpret", "reference"))


class TileGates(NamedTuple):
    """A gate map and its compact tile list (all on the device).

    ``gate`` (N, TH, TW) int8 codes; ``tiles`` (N*TH*TW,) int32, UPDATE ids
    in ``tiles[:counts[0]]`` and SKIP ids in ``tiles[T - counts[1]:]`` (order
    within each part unspecified); ``counts`` (3,) int32: ``[n_update,
    n_skip, update_pixels]`` -- the last is the number of output pixels in
    UPDATE tiles, so ``update_pixels / (N * Ho * Wo)`` is the compute ratio.
    """

    gate: torch.Tensor
    tiles: torch.Tensor
    counts: torch.Tensor


class _BuiltGates(TileGates):
    """A :class:`TileGates` made by :func:`triple_gate_map`, :func:`compact_gates` or
    :func:`dense_gates`: consistent by construction, so :func:`triple_gate_conv2d` does not
    re-check it (a plain ``TileGates(...)`` built by hand is checked)."""

    __slots__ = ()


def _kernels(backend: str):
    from .. import kernels  # sparsekit.kernels

    return kernels.load("triple_gate_conv", interpret=(backend == "interpret"))


# --------------------------------------------------------------------------- geometry

def _pair(v, name: str, minimum: int) -> tuple:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        v = (v, v)
    try:
        v = tuple(v)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    if len(v) != 2 or not all(isinstance(a, int) and not isinstance(a, bool) for a in v):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def conv_output_size(h: int, w: int, kernel_size, stride=1, padding=0, dilation=1) -> tuple:
    kh, kw = _pair(kernel_size, "kernel_size", 1)
    sh, sw = _pair(stride, "stride", 1)
    ph, pw = _pair(padding, "padding", 0)
    dh, dw = _pair(dilation, "dilation", 1)
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def tile_grid(ho: int, wo: int, tile: int) -> tuple:
    """(TH, TW): the number of output tiles down and across."""
    return -(-ho // tile), -(-wo // tile)


def tile_pixel_counts(ho: int, wo: int, tile: int, device="cpu") -> torch.Tensor:
    """(TH, TW) float32: output pixels in each tile (edge tiles are clipped)."""
    th, tw = tile_grid(ho, wo, tile)
    rows = torch.clamp(ho - torch.arange(th, device=device) * tile, max=tile).float()
    cols = torch.clamp(wo - torch.arange(tw, device=device) * tile, max=tile).float()
    return rows[:, None] * cols[None, :]


def pixel_gate(gate: torch.Tensor, tile: int, ho: int, wo: int) -> torch.Tensor:
    """(N, TH, TW) per-tile values -> (N, 1, Ho, Wo) per output pixel."""
    g = gate.repeat_interleave(tile, dim=1).repeat_interleave(tile, dim=2)
    return g[:, None, :ho, :wo]


def update_ratio(gate: torch.Tensor, tile: int, ho: int, wo: int) -> torch.Tensor:
    """Realized compute ratio of a gate map: UPDATE output pixels / all output pixels
    (= conv FLOPs done / dense conv FLOPs), as a 0-d float32 tensor on the gate's device."""
    w = tile_pixel_counts(ho, wo, tile, gate.device)
    total = (w.sum() * gate.shape[0]).clamp(min=1.0)
    return ((gate == UPDATE).float() * w).sum() / total


# --------------------------------------------------------------------------- validation

def _check_frame(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")


def _check_geometry(x, kernel_size, stride, padding, dilation, tile):
    ks = _pair(kernel_size, "kernel_size", 1)
    st = _pair(stride, "stride", 1)
    pd = _pair(padding, "padding", 0)
    dl = _pair(dilation, "dilation", 1)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int, got {tile!r}")
    ho, wo = conv_output_size(x.shape[2], x.shape[3], ks, st, pd, dl)
    if ho < 1 or wo < 1:
        raise ValueError(f"input {tuple(x.shape[2:])} is too small for kernel {ks} with padding {pd} and "
                         f"dilation {dl} (output would be {ho}x{wo})")
    return ks, st, pd, dl, ho, wo


def _check_gates(gates: TileGates, n: int, th: int, tw: int, device) -> None:
    g, tiles, counts = gates
    if not isinstance(g, torch.Tensor) or g.dtype != torch.int8 or tuple(g.shape) != (n, th, tw):
        raise ValueError(f"gate must be an int8 tensor of shape {(n, th, tw)} (N, TH, TW), got "
                         f"{getattr(g, 'dtype', type(g).__name__)} {tuple(getattr(g, 'shape', ()))}")
    if not isinstance(tiles, torch.Tensor) or tiles.dtype != torch.int32 or tuple(tiles.shape) != (n * th * tw,):
        raise ValueError(f"tiles must be an int32 tensor of shape ({n * th * tw},), got "
                         f"{getattr(tiles, 'dtype', type(tiles).__name__)} {tuple(getattr(tiles, 'shape', ()))}")
    if not isinstance(counts, torch.Tensor) or counts.dtype != torch.int32 or tuple(counts.shape) != (3,):
        raise ValueError(f"counts must be an int32 tensor of shape (3,), got "
                         f"{getattr(counts, 'dtype', type(counts).__name__)} {tuple(getattr(counts, 'shape', ()))}")
    for name, t in (("gate", g), ("tiles", tiles), ("counts", counts)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _check_gate_codes(gate: torch.Tensor, name: str = "gate") -> None:
    if gate.numel() and gate.device.type != "meta":
        bad = (gate < 0) | (gate > 2)
        if bool(bad.any()):
            idx = [int(i) for i in bad.nonzero()[0]]
            raise ValueError(f"{name}{idx} = {int(gate[tuple(idx)])} is not a gate code: use REUSE=0, UPDATE=1 "
                             "or SKIP=2")


def validate_tile_gates(gates: TileGates, out_hw: tuple, tile: int) -> None:
    """Check a (hand-built) :class:`TileGates` against its gate map, in one O(T log T) pass with a
    host sync: codes in {0, 1, 2}; ``0 <= counts[0], counts[1]`` and ``counts[0] + counts[1] <= T``;
    ``tiles[:counts[0]]`` exactly the UPDATE tile ids and ``tiles[T - counts[1]:]`` exactly the SKIP
    ids (each once, any order); ``counts[2]`` the UPDATE tiles' output pixels.  ValueError otherwise.
    :func:`triple_gate_map`, :func:`compact_gates` and :func:`dense_gates` build valid gates."""
    g, tiles, counts = gates
    if not all(t.device.type != "meta" for t in (g, tiles, counts)):
        return
    ho, wo = out_hw
    _check_gate_codes(g)
    t = g.numel()
    nu, ns, npix = (int(v) for v in counts.tolist())
    if nu < 0 or ns < 0 or nu + ns > t:
        raise ValueError(f"counts = [{nu}, {ns}, {npix}] is inconsistent with a list of T={t} tiles: need "
                         f"0 <= counts[0], 0 <= counts[1] and counts[0] + counts[1] <= {t}")
    flat = g.reshape(-1)
    for what, code, part in (("UPDATE", UPDATE, tiles[:nu]), ("SKIP", SKIP, tiles[t - ns:] if ns else tiles[:0])):
        want = (flat == code).nonzero().reshape(-1)
        have = part.to(torch.int64)
        if have.numel() and bool(((have < 0) | (have >= t)).any()):
            bad = int(have[(have < 0) | (have >= t)][0])
            raise ValueError(f"tiles holds the {what} tile id {bad}, outside 0..{t - 1} (T = N*TH*TW = {t})")
        if have.numel() != want.numel() or not torch.equal(torch.sort(have).values, want):
            raise ValueError(f"the {what} part of tiles ({have.numel()} ids) does not list exactly the {want.numel()} "
                             f"{what} tiles of the gate map; rebuild the list with compact_gates(gate, ...)")
    want_pix = int(((g == UPDATE).float() * tile_pixel_counts(ho, wo, tile, g.device)).sum())
    if npix != want_pix:
        raise ValueError(f"counts[2] = {npix} must be the number of output pixels in UPDATE tiles, {want_pix}")


# --------------------------------------------------------------------------- tile lists

def dense_gates(n: int, ho: int, wo: int, tile: int, device="cpu") -> TileGates:
    """All-UPDATE gates for an (N, CO, Ho, Wo) output (the first frame after a reset)."""
    th, tw = tile_grid(ho, wo, tile)
    t = n * th * tw
    return _BuiltGates(torch.full((n, th, tw), UPDATE, dtype=torch.int8, device=device),
                     torch.arange(t, dtype=torch.int32, device=device),
                     torch.tensor([t, 0, n * ho * wo], dtype=torch.int32, device=device))


def _compact_reference(gate: torch.Tensor, ho: int, wo: int, tile: int) -> tuple:
    flat = gate.reshape(-1)
    t = flat.numel()
    upd = (flat == UPDATE).nonzero().reshape(-1).to(torch.int32)
    skp = (flat == SKIP).nonzero().reshape(-1).to(torch.int32)
    tiles = torch.zeros(t, dtype=torch.int32, device=gate.device)
    tiles[: upd.numel()] = upd
    if skp.numel():
        tiles[t - skp.numel():] = skp.flip(0)
    pix = ((gate == UPDATE).float() * tile_pixel_counts(ho, wo, tile, gate.device)).sum().to(torch.int32)
    counts = torch.stack([torch.tensor(upd.numel(), dtype=torch.int32, device=gate.device),
                          torch.tensor(skp.numel(), dtype=torch.int32, device=gate.device), pix])
    return tiles, counts


def compact_gates(gate: torch.Tensor, out_hw: tuple, tile: int, *, backend: Optional[str] = None) -> TileGates:
    """The :class:`TileGates` of a given (N, TH, TW) int8 gate map (codes 0/1/2) for an
    output of spatial size ``out_hw = (Ho, Wo)`` cut into ``tile x tile`` tiles."""
    if not isinstance(gate, torch.Tensor) or gate.dtype != torch.int8 or gate.dim() != 3:
        raise ValueError(f"gate must be an int8 tensor of shape (N, TH, TW), got "
                         f"{getattr(gate, 'dtype', type(gate).__name__)} {tuple(getattr(gate, 'shape', ()))}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int, got {tile!r}")
    ho, wo = _pair(tuple(out_hw) if isinstance(out_hw, (tuple, list)) else out_hw, "out_hw", 1)
    if tile_grid(ho, wo, tile) != tuple(gate.shape[1:]):
        raise ValueError(f"gate must be an int8 tensor of shape (N, {tile_grid(ho, wo, tile)}) for a {ho}x{wo} "
                         f"output and tile {tile}, got {tuple(gate.shape)}")
    gate = gate.contiguous()
    _check_gate_codes(gate)
    chosen = dispatch.resolve(OP, gate.device, backend, gate.numel())
    if chosen == "reference":
        tiles, counts = _compact_reference(gate, ho, wo, tile)
    else:
        tiles = torch.empty(gate.numel(), dtype=torch.int32, device=gate.device)
        counts = torch.empty(3, dtype=torch.int32, device=gate.device)
        _kernels(chosen).compact(gate, tiles, counts, ho, wo, tile)
    return _BuiltGates(gate, tiles, counts)


# --------------------------------------------------------------------------- gate features (reference)

def gate_features(x: torch.Tensor, x_prev: torch.Tensor, kernel_size, stride, padding, dilation, tile: int,
                  imp_weight: Optional[torch.Tensor] = None, imp_bias=None) -> tuple:
    """Per (sample, tile) features in float32: ``change`` (max |x - x_prev| over the
    channels and the tile's receptive field; no gradient) and, with
    ``imp_weight`` (C,), the importance logit (differentiable in
    ``imp_weight`` / ``imp_bias``; ``None`` without a weight)."""
    kh, kw = kernel_size
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    n, c, h, w = x.shape
    ho, wo = conv_output_size(h, w, kernel_size, stride, padding, dilation)
    th, tw = tile_grid(ho, wo, tile)
    with torch.no_grad():
        d = (x.detach().float() - x_prev.detach().float()).abs()
        # a NaN change (NaN or Inf on either frame) counts as an infinite change: UPDATE
        d = torch.nan_to_num(d, nan=math.inf).amax(dim=1, keepdim=True)
        d = F.pad(d, (pw, pw, ph, ph))
        pix = F.max_pool2d(d, (kh, kw), (sh, sw), dilation=(dh, dw))[:, :, :ho, :wo]
        pix = F.pad(pix, (0, tw * tile - wo, 0, th * tile - ho))
        change = F.max_pool2d(pix, tile, tile)[:, 0]
    imp = None
    if imp_weight is not None:
        ones_k = torch.ones(1, 1, kh, kw, device=x.device)
        m = F.pad(torch.ones(1, 1, h, w, device=x.device), (pw, pw, ph, ph))
        cnt = F.conv2d(m, ones_k, stride=(sh, sw), dilation=(dh, dw))[:, :, :ho, :wo]
        imap = torch.einsum("nchw,c->nhw", x.float(), imp_weight.float().reshape(-1))[:, None]
        s = F.conv2d(F.pad(imap, (pw, pw, ph, ph)), ones_k, stride=(sh, sw), dilation=(dh, dw))[:, :, :ho, :wo]
        pix_mean = s / cnt.clamp(min=1.0)
        pad = (0, tw * tile - wo, 0, th * tile - ho)
        tsum = F.avg_pool2d(F.pad(pix_mean, pad), tile, tile, divisor_override=1)[:, 0]
        tcnt = tile_pixel_counts(ho, wo, tile, x.device)
        imp = tsum / tcnt
        if imp_bias is not None:
            imp = imp + imp_bias
    return change, imp


def decide_gates(change: torch.Tensor, threshold: float, importance: Optional[torch.Tensor] = None,
                 skip_logit: Optional[float] = None, prev_gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The hard gate rule shared by every backend: SKIP if ``importance < skip_logit``;
    else UPDATE if ``change > threshold`` (a NaN change counts as UPDATE) or the tile was SKIP in
    ``prev_gate``; else REUSE."""
    code = torch.where(~(change <= threshold), UPDATE, REUSE).to(torch.int8)
    if prev_gate is not None:
        code = torch.where(prev_gate == SKIP, torch.full_like(code, UPDATE), code)
    if importance is not None and skip_logit is not None:
        code = torch.where(importance < skip_logit, torch.full_like(code, SKIP), code)
    return code


# --------------------------------------------------------------------------- custom ops

@torch.library.custom_op("sparsekit::triple_gate_map", mutates_args=())
def _gate_op(x: torch.Tensor, x_prev: torch.Tensor, prev_gate: Optional[torch.Tensor],
             imp_weight: Optional[torch.Tensor], imp_bias: float, kernel_size: List[int], stride: List[int],
             padding: List[int], dilation: List[int], tile: int, threshold: float, skip_logit: Optional[float],
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, _, h, w = x.shape
    ho, wo = conv_output_size(h, w, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
    th, tw = tile_grid(ho, wo, tile)
    if backend == "reference":
        change, imp = gate_features(x, x_prev, tuple(kernel_size), tuple(stride), tuple(padding),
                                    tuple(dilation), tile, imp_weight if skip_logit is not None else None,
                                    imp_bias)
        g = decide_gates(change, threshold, imp, skip_logit, prev_gate)
        tiles, counts = _compact_reference(g, ho, wo, tile)
        return g, tiles, counts
    g = torch.empty((n, th, tw), dtype=torch.int8, device=x.device)
    tiles = torch.empty(n * th * tw, dtype=torch.int32, device=x.device)   # slots past the counts are never read
    counts = torch.empty(3, dtype=torch.int32, device=x.device)            # zeroed by the kernel launcher
    _kernels(backend).gate(x, x_prev, imp_weight, imp_bias, prev_gate, tuple(kernel_size), tuple(stride),
                           tuple(padding), tuple(dilation), tile, threshold, skip_logit, g, tiles, counts)
    return g, tiles, counts


@_gate_op.register_fake
def _(x, x_prev, prev_gate, imp_weight, imp_bias, kernel_size, stride, padding, dilation, tile, threshold,
      skip_logit, backend):
    n, _, h, w = x.shape
    ho, wo = conv_output_size(h, w, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
    th, tw = tile_grid(ho, wo, tile)
    return (x.new_empty((n, th, tw), dtype=torch.int8), x.new_empty((n * th * tw,), dtype=torch.int32),
            x.new_empty((3,), dtype=torch.int32))


@torch.library.custom_op("sparsekit::triple_gate_conv2d_", mutates_args=("out",))
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gate: torch.Tensor,
             tiles: torch.Tensor, counts: torch.Tensor, out: torch.Tensor, stride: List[int], padding: List[int],
             dilation: List[int], tile: int, backend: str) -> None:
    if backend == "reference":
        ho, wo = out.shape[2], out.shape[3]
        if x.device.type == "cpu" and x.dtype != torch.float32:
            y = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(), tuple(stride),
                         tuple(padding), tuple(dilation)).to(x.dtype)
        else:
            y = F.conv2d(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation))
        pg = pixel_gate(gate, tile, ho, wo)
        b = (bias if bias is not None else torch.zeros(out.shape[1], dtype=out.dtype, device=out.device))
        b = b.to(out.dtype)[None, :, None, None].expand_as(out)
        new = torch.where(pg == UPDATE, y, torch.where(pg == SKIP, b, out))
        out.copy_(new)
        return
    bias = bias if bias is None or bias.is_contiguous() else bias.contiguous()   # the kernel reads bias[co]
    tiles = tiles if tiles.is_contiguous() else tiles.contiguous()
    _kernels(backend).conv(x, weight, bias, tiles, counts.contiguous(), out, tuple(stride), tuple(padding),
                           tuple(dilation), tile)


@_conv_op.register_fake
def _(x, weight, bias, gate, tiles, counts, out, stride, padding, dilation, tile, backend):
    return None


# --------------------------------------------------------------------------- public API

def triple_gate_map(x: torch.Tensor, x_prev: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1,
                    tile: int = 8, threshold: float = 0.0, *, importance_weight: Optional[torch.Tensor] = None,
                    importance_bias: float = 0.0, skip_logit: Optional[float] = None,
                    prev_gate: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> TileGates:
    """Gate map and tile list for frame ``x`` (N, C, H, W) given the previous frame ``x_prev``.

    ``kernel_size`` / ``stride`` / ``padding`` / ``dilation`` are the conv's
    (they define each tile's receptive field).  ``threshold``: UPDATE when the
    pooled ``max |x - x_prev|`` exceeds it.  ``importance_weight`` (C,) /
    ``importance_bias`` and ``skip_logit``: SKIP when the pooled importance
    logit is below ``skip_logit`` (``None``: no SKIP).  ``prev_gate``: the
    previous frame's gate map (tiles leaving SKIP are recomputed).
    """
    _check_frame(x)
    _check_frame(x_prev, "x_prev")
    if x_prev.shape != x.shape or x_prev.dtype != x.dtype or x_prev.device != x.device:
        raise ValueError(f"x_prev must match x ({tuple(x.shape)} {x.dtype} on {x.device}), got "
                         f"{tuple(x_prev.shape)} {x_prev.dtype} on {x_prev.device}")
    ks, st, pd, dl, ho, wo = _check_geometry(x, kernel_size, stride, padding, dilation, tile)
    th, tw = tile_grid(ho, wo, tile)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold >= 0:
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    if skip_logit is not None:
        if importance_weight is None:
            raise ValueError("skip_logit needs importance_weight (the 1x1 importance conv's weight, shape (C,))")
        skip_logit = float(skip_logit)
    if importance_weight is not None:
        if not isinstance(importance_weight, torch.Tensor) or importance_weight.numel() != x.shape[1]:
            raise ValueError(f"importance_weight must be a tensor with C={x.shape[1]} elements")
        if importance_weight.device != x.device:
            raise ValueError(f"importance_weight is on {importance_weight.device} but x is on {x.device}")
        importance_weight = importance_weight.detach().reshape(-1).float().contiguous()
    if prev_gate is not None:
        if (not isinstance(prev_gate, torch.Tensor) or prev_gate.dtype != torch.int8
                or tuple(prev_gate.shape) != (x.shape[0], th, tw) or prev_gate.device != x.device):
            raise ValueError(f"prev_gate must be an int8 tensor of shape {(x.shape[0], th, tw)} on {x.device}")
        prev_gate = prev_gate.contiguous()
    chosen = dispatch.resolve(OP, x.device, backend, x.shape[0] * ho * wo)
    g, tiles, counts = _gate_op(x, x_prev, prev_gate, importance_weight, float(importance_bias), list(ks),
                                list(st), list(pd), list(dl), tile, float(threshold), skip_logit, chosen)
    return _BuiltGates(g, tiles, counts)


def triple_gate_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       gate: Union[TileGates, torch.Tensor], out: torch.Tensor, stride=1, padding=0, dilation=1,
                       tile: int = 8, *, backend: Optional[str] = None, validate: bool = True) -> torch.Tensor:
    """Gated conv into the persistent buffer ``out``; returns ``out``.

    ``x`` (N, C, H, W), ``weight`` (CO, C, KH, KW), ``bias`` (CO,) or None,
    all one dtype (float16, bfloat16 or float32) and device, any strides
    (``channels_last`` is the fast layout for ``x`` and ``out``).  ``out``
    (N, CO, Ho, Wo) holds the previous frame's output.  ``gate`` is a
    :class:`TileGates` (from :func:`triple_gate_map`) or an int8 gate map
    (N, TH, TW) whose tile list is then built here.  UPDATE tiles of ``out``
    get ``conv2d(x, weight, bias)``, SKIP tiles the bias (0 without one),
    REUSE tiles are left as they are.  Inference only (no autograd).

    A :class:`TileGates` built by hand is checked against its gate map
    (:func:`validate_tile_gates`: codes, tile ids, counts; one host sync);
    gates returned by :func:`triple_gate_map`, :func:`compact_gates` or
    :func:`dense_gates` are consistent by construction and not re-checked, nor
    is anything with ``validate=False``.  The kernels also mask tile ids outside
    ``0 .. T-1``, so even unchecked gates never write outside ``out``.
    """
    _check_frame(x)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (CO, C, KH, KW), got shape {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"channel mismatch: x has C={x.shape[1]} channels but the weight expects "
                         f"{weight.shape[1]} (grouped convs are not supported)")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    co = weight.shape[0]
    check_bias(bias, co, x)
    ks, st, pd, dl, ho, wo = _check_geometry(x, tuple(weight.shape[2:]), stride, padding, dilation, tile)
    n = x.shape[0]
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n, co, ho, wo):
        raise ValueError(f"out must have shape {(n, co, ho, wo)} (N, CO, Ho, Wo), got "
                         f"{tuple(getattr(out, 'shape', ()))}")
    if out.dtype != x.dtype or out.device != x.device:
        raise TypeError(f"out must be {x.dtype} on {x.device}, got {out.dtype} on {out.device}")
    th, tw = tile_grid(ho, wo, tile)
    chosen = dispatch.resolve(OP, x.device, backend, n * ho * wo)
    if isinstance(gate, torch.Tensor):
        if gate.dtype != torch.int8 or tuple(gate.shape) != (n, th, tw):
            raise ValueError(f"gate must be an int8 tensor of shape {(n, th, tw)} (N, TH, TW), got "
                             f"{gate.dtype} {tuple(gate.shape)}")
        gate = compact_gates(gate, (ho, wo), tile, backend=chosen)
    elif not isinstance(gate, tuple) or len(gate) != 3:
        raise TypeError(f"gate must be a TileGates or an int8 gate map, got {type(gate).__name__}")
    else:
        _check_gates(gate, n, th, tw, x.device)
        if validate and not isinstance(gate, _BuiltGates):
            validate_tile_gates(gate, (ho, wo), tile)
    _check_gates(gate, n, th, tw, x.device)
    _conv_op(x, weight, bias, gate.gate, gate.tiles, gate.counts, out, list(st), list(pd), list(dl), tile,
             chosen)
    return out


def skip_logit_of(skip_threshold: Optional[float]) -> Optional[float]:
    """Importance probability threshold in (0, 1) -> the logit the gate compares with."""
    if skip_threshold is None:
        return None
    if not 0.0 < float(skip_threshold) < 1.0:
        raise ValueError(f"skip_threshold must be in (0, 1), got {skip_threshold!r}")
    p = float(skip_threshold)
    return math.log(p / (1.0 - p))
