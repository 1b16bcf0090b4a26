"""Triton kernels for the triple-gate sparse convolution (SpVOS-style video conv).

A frame's output ``(N, Ho, Wo, CO)`` is cut into ``TILE x TILE`` output tiles;
each (sample, tile) carries a gate code (see :data:`REUSE`, :data:`UPDATE`,
:data:`SKIP`).  The output buffer persists from frame to frame, so:

* UPDATE tiles are recomputed with the full convolution,
* REUSE tiles are not touched at all (they keep the previous frame's values),
* SKIP tiles get the bias only (zero without a bias).

Tile list.  The gate kernel writes one int32 list of ``T = N * TH * TW``
slots: UPDATE tile ids are packed from the front (``[0, n_update)``) and SKIP
tile ids from the back (``[T - n_skip, T)``); ``counts = [n_update, n_skip,
update_pixels]`` (the last: output pixels of the UPDATE tiles, for the compute
ratio) stays on the device.  The conv kernel is launched over all ``T`` slots
(the grid needs no host sync); a program whose slots all lie in the REUSE gap
exits at once, so REUSE tiles cost one empty program each.  Every kernel is
plain Triton (no inline asm), so the interpreter runs the same code on CPU.

Conv kernel (:func:`_tg_conv`): an implicit GEMM.  Rows are (slot, pixel)
pairs -- ``TTP = next_pow2(TILE*TILE)`` pixel rows per slot (rows past
``TILE*TILE`` are masked) -- so one program covers ``BLOCK_M // TTP`` tiles,
or a part of one tile when ``TTP > BLOCK_M``.  In one flat K loop over
(filter tap ``(kh, kw)``, block of ``BLOCK_K`` input channels) the program
gathers ``A[rows, c] = x[n, oh*SH - PH + kh*DH, ow*SW - PW + kw*DW, c]``
(zero outside the image: padding) and ``B[c, co] = w[co, c, kh, kw]`` and
accumulates ``A @ B`` in fp32 on the tensor cores (fp32 inputs: TF32 when
``torch.backends.cudnn.allow_tf32`` is set, as for ``F.conv2d``, else full-precision
FMAs).  Inputs and outputs take any strides; NHWC (``channels_last``) makes the
channel loads contiguous.

Gate kernels: :func:`_pixel_maps` reads both frames once and writes, per
input pixel, ``max_c |x_t - x_{t-1}|`` and the learned importance
``sum_c x_t * w_imp``; :func:`_tile_gate` (a block of (sample, tile) pairs
per program) pools them over the tile's receptive field -- the exact set of taps of the
tile's output pixels -- decides the code and appends the tiles to the list
(one atomic per program for the base slot, a prefix sum inside the block;
the order of the list is therefore unspecified).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_out, dot_acc

REUSE = 0
UPDATE = 1
SKIP = 2


@triton.jit
def _tg_conv(X, Wt, B, Y, TILES, COUNTS,
             T, C, H, W, CO, Ho, Wo, TH, TW,
             sxn, sxc, sxh, sxw, swo, swc, swh, sww, syn, syc, syh, syw,
             SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
             DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
             TILE: tl.constexpr, TTP: tl.constexpr,
             HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, INTERP_BF16: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_upd = tl.load(COUNTS)
    n_skip = tl.load(COUNTS + 1)
    skip0 = T - n_skip
    e_first = (pid_m * BLOCK_M) // TTP
    e_last = (pid_m * BLOCK_M + BLOCK_M - 1) // TTP
    if (e_first < n_upd) | (e_last >= skip0):
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        entry = rows // TTP
        p = rows % TTP
        upd = (entry < n_upd) & (entry < T)
        skp = (entry >= skip0) & (entry < T)
        t = tl.load(TILES + entry, mask=upd | skp, other=0)
        per_n = TH * TW
        n = t // per_n
        rem = t % per_n
        oh = (rem // TW) * TILE + p // TILE
        ow = (rem % TW) * TILE + p % TILE
        # last line of defence: a tile id outside 0..T-1 (a corrupt list) is never read or written
        valid = (upd | skp) & (t >= 0) & (t < T) & (p < TILE * TILE) & (oh < Ho) & (ow < Wo)
        n64 = n.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < CO
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if e_first < n_upd:
            live = valid & upd
            xrow = X + n64 * sxn
            n_ck = tl.cdiv(C, BLOCK_K)
            # one flat loop over (tap, channel block): a single pipelined K loop
            for kk in range(0, KH * KW * n_ck):
                tap = kk // n_ck
                c0 = (kk - tap * n_ck) * BLOCK_K
                kh = tap // KW
                kw = tap - kh * KW
                ih = oh * SH - PH + kh * DH
                iw = ow * SW - PW + kw * DW
                pm = live & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                offs_k = c0 + tl.arange(0, BLOCK_K)
                kmask = offs_k < C
                a = tl.load((xrow + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None] + offs_k[None, :] * sxc,
                            mask=pm[:, None] & kmask[None, :], other=0.0)
                b = tl.load(Wt + kh * swh + kw * sww + offs_k[:, None] * swc + offs_n[None, :] * swo,
                            mask=kmask[:, None] & nmask[None, :], other=0.0)
                acc = dot_acc(a, b, acc, IEEE, INTERP_BF16)
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        yp = Y + (n64 * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw)[:, None] + offs_n[None, :] * syc
        tl.store(yp, cast_out(acc, Y.dtype.element_ty, INTERP_BF16), mask=valid[:, None] & nmask[None, :])


@triton.jit
def _pixel_maps(X, XP, WI, DMAP, IMAP, NP, C, H, W,
                sxn, sxc, sxh, sxw, spn, spc, sph, spw,
                HAS_IMP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per input pixel: DMAP = max_c |x - x_prev|, IMAP = sum_c x * w_imp (fp32)."""
    pid = tl.program_id(0)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < NP
    hw = H * W
    n = (offs_p // hw).to(tl.int64)
    r = offs_p % hw
    h = (r // W).to(tl.int64)
    w = (r % W).to(tl.int64)
    xb = X + n * sxn + h * sxh + w * sxw
    pb = XP + n * spn + h * sph + w * spw
    dmax = tl.zeros((BLOCK_P,), dtype=tl.float32)
    imp = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m = pmask[:, None] & (offs_c[None, :] < C)
        x = tl.load(xb[:, None] + offs_c[None, :] * sxc, mask=m, other=0.0).to(tl.float32)
        xp = tl.load(pb[:, None] + offs_c[None, :] * spc, mask=m, other=0.0).to(tl.float32)
        d = tl.abs(x - xp)
        # NaN (NaN or Inf on either frame) -> +inf: a non-finite change always UPDATEs (max() drops NaN)
        dmax = tl.maximum(dmax, tl.max(tl.where(d == d, d, float("inf")), axis=1))
        if HAS_IMP:
            wi = tl.load(WI + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
            imp += tl.sum(x * wi[None, :], axis=1)
    tl.store(DMAP + offs_p, dmax, mask=pmask)
    if HAS_IMP:
        tl.store(IMAP + offs_p, imp, mask=pmask)


@triton.jit
def _append(TILES, COUNTS, T, t, is_u, is_s, npix):
    """Append the block's UPDATE ids to the front of the list and its SKIP ids to the
    back: one atomic per list per program, slots inside the block by prefix sum.
    COUNTS[2] accumulates the UPDATE tiles' output pixels (``npix`` per tile)."""
    tl.atomic_add(COUNTS + 2, tl.sum(tl.where(is_u, npix, 0), axis=0))
    nu = tl.sum(is_u.to(tl.int32), axis=0)
    ns = tl.sum(is_s.to(tl.int32), axis=0)
    base_u = tl.atomic_add(COUNTS, nu)
    base_s = tl.atomic_add(COUNTS + 1, ns)
    slot_u = base_u + tl.cumsum(is_u.to(tl.int32), axis=0) - 1
    slot_s = base_s + tl.cumsum(is_s.to(tl.int32), axis=0) - 1
    tl.store(TILES + slot_u, t, mask=is_u)
    tl.store(TILES + (T - 1 - slot_s), t, mask=is_s)


@triton.jit
def _tile_gate(DMAP, IMAP, PREV, GATE, TILES, COUNTS,
               T, H, W, Ho, Wo, TH, TW, threshold, skip_logit, imp_bias,
               SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
               DH: tl.constexpr, DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
               TILE: tl.constexpr, TTP: tl.constexpr, BLOCK_T: tl.constexpr,
               HAS_SKIP: tl.constexpr, HAS_PREV: tl.constexpr):
    """BLOCK_T (sample, tile) pairs per program: pool the pixel maps over each tile's
    receptive field, decide REUSE / UPDATE / SKIP, append UPDATE/SKIP tiles to the list."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    per_n = TH * TW
    n = t // per_n
    rem = t % per_n
    p = tl.arange(0, TTP)
    oh = ((rem // TW) * TILE)[:, None] + (p // TILE)[None, :]
    ow = ((rem % TW) * TILE)[:, None] + (p % TILE)[None, :]
    pval = tmask[:, None] & (p < TILE * TILE)[None, :] & (oh < Ho) & (ow < Wo)
    base = (n.to(tl.int64) * H * W)[:, None]
    change = tl.zeros((BLOCK_T, TTP), dtype=tl.float32)
    isum = tl.zeros((BLOCK_T, TTP), dtype=tl.float32)
    icnt = tl.zeros((BLOCK_T, TTP), dtype=tl.float32)
    for kh in tl.static_range(KH):
        ih = oh * SH - PH + kh * DH
        for kw in tl.static_range(KW):
            iw = ow * SW - PW + kw * DW
            m = pval & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            off = base + ih.to(tl.int64) * W + iw
            change = tl.maximum(change, tl.load(DMAP + off, mask=m, other=0.0))
            if HAS_SKIP:
                isum += tl.load(IMAP + off, mask=m, other=0.0)
                icnt += m.to(tl.float32)
    code = tl.where(tl.max(change, axis=1) > threshold, 1, 0)
    if HAS_PREV:
        # a tile leaving SKIP holds bias only: it must be recomputed
        code = tl.where(tl.load(PREV + t, mask=tmask, other=0).to(tl.int32) == 2, 1, code)
    if HAS_SKIP:
        pix_mean = tl.where(pval, isum / tl.maximum(icnt, 1.0), 0.0)
        n_pix = tl.maximum(tl.sum(pval.to(tl.float32), axis=1), 1.0)
        logit = tl.sum(pix_mean, axis=1) / n_pix + imp_bias
        code = tl.where(logit < skip_logit, 2, code)
    tl.store(GATE + t, code.to(tl.int8), mask=tmask)
    npix = tl.sum(pval.to(tl.int32), axis=1)
    _append(TILES, COUNTS, T, t, tmask & (code == 1), tmask & (code == 2), npix)


@triton.jit
def _compact(GATE, TILES, COUNTS, T, Ho, Wo, TH, TW, TILE: tl.constexpr, BLOCK_T: tl.constexpr):
    """Tile list of a given gate map (BLOCK_T tiles per program)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    code = tl.load(GATE + t, mask=tmask, other=0).to(tl.int32)
    rem = t % (TH * TW)
    npix = tl.minimum(Ho - (rem // TW) * TILE, TILE) * tl.minimum(Wo - (rem % TW) * TILE, TILE)
    _append(TILES, COUNTS, T, t, tmask & (code == 1), tmask & (code == 2), npix)


# ----------------------------------------------------------------------------
# launch configuration

def next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def conv_config(tile: int, C: int, CO: int, dtype: torch.dtype = torch.float16, ieee: bool = False) -> dict:
    """GPU tile configuration: ~64-128 pixel rows, BLOCK_N by output channels, BLOCK_K by input channels.

    fp32 follows ``torch.backends.cudnn.allow_tf32`` like the dense peer ``F.conv2d``: with TF32 the
    products run on the tensor cores (``BLOCK_K`` capped at 32: 128 bytes of fp32 per row, and
    mma.sync on sm_80 stages its TF32 operands in registers); without it (``ieee``) they are
    full-precision fp32 FMAs, whose operands all go through registers: a 64-row tile with 4 warps
    keeps them spill-free.
    """
    ttp = next_pow2(tile * tile)
    block_n = 128 if CO >= 128 else (64 if CO > 32 else 32)
    block_k = 64 if C >= 64 else (32 if C > 16 else 16)
    if ieee:
        return dict(BLOCK_M=64, BLOCK_N=min(block_n, 64), BLOCK_K=min(block_k, 32), num_warps=4, num_stages=3)
    block_m = 128 if CO <= 64 else 64
    if ttp > block_m and ttp <= 128:
        block_m = ttp
    if dtype == torch.float32:
        block_k = min(block_k, 32)
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=3)


# GPU candidates for the autotuner (keyed by C, CO, tile, kernel size and dtype), fp16 / bf16 only
# (AUTOTUNE_DTYPES); the heuristic conv_config is used for fp32 (TF32 or IEEE) and when autotuning is
# off (SPARSEKIT_TGC_AUTOTUNE=0)
CONV_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
]
AUTOTUNE_ENV = "SPARSEKIT_TGC_AUTOTUNE"
AUTOTUNE_DTYPES = (torch.float16, torch.bfloat16)
_tuned = None

_INTERP_CONV = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16)
_LAUNCH_ONLY = ("num_warps", "num_stages")


def check_config(cfg: dict) -> None:
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = cfg[key]
        if v < 16 or v & (v - 1):
            raise ValueError(f"{key} must be a power of two >= 16 (tl.dot), got {v}")


def _interpreting(t: torch.Tensor) -> bool:
    return not t.is_cuda


def _is_ieee(dtype: torch.dtype) -> bool:
    """Full-precision fp32 products: fp32 without ``torch.backends.cudnn.allow_tf32`` (F.conv2d's switch)."""
    return dtype == torch.float32 and not torch.backends.cudnn.allow_tf32


def autotune_enabled() -> bool:
    import os
    return os.environ.get(AUTOTUNE_ENV, "1") not in ("0", "", "false", "False")


def _tuned_conv():
    """``_tg_conv`` under ``triton.autotune`` (compiled launches only).  Re-running the
    kernel while tuning is harmless: it is idempotent on ``out`` (UPDATE tiles get the
    same values again, SKIP tiles the bias, REUSE tiles are never written)."""
    global _tuned
    if _tuned is None:
        cfgs = [triton.Config({k: v for k, v in c.items() if k not in _LAUNCH_ONLY},
                              num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in CONV_CONFIGS]
        _tuned = triton.autotune(configs=cfgs, key=["C", "CO", "TTP", "KH", "KW"])(_tg_conv)
    return _tuned


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tiles: torch.Tensor,
         counts: torch.Tensor, out: torch.Tensor, stride: tuple, padding: tuple, dilation: tuple,
         tile: int, config: dict | None = None) -> torch.Tensor:
    """Write UPDATE tiles of ``out`` with the conv and SKIP tiles with the bias; REUSE untouched.

    ``x`` ``(N, C, H, W)`` and ``out`` ``(N, CO, Ho, Wo)`` with any strides
    (channels_last is the fast layout), ``weight`` ``(CO, C, KH, KW)`` any
    strides, ``tiles`` / ``counts`` as written by :func:`gate`.  ``config``: explicit
    tile sizes; by default the interpreter uses a small fixed one and CUDA, for
    fp16 / bf16, the autotuner over :data:`CONV_CONFIGS` (or :func:`conv_config`
    with ``SPARSEKIT_TGC_AUTOTUNE=0``), for fp32 :func:`conv_config`.  fp32
    products run on TF32 tensor cores when ``torch.backends.cudnn.allow_tf32``
    is set (PyTorch's default; the switch ``F.conv2d`` follows), in full fp32
    otherwise.
    """
    N, C, H, W = x.shape
    CO, _, KH, KW = weight.shape
    _, _, Ho, Wo = out.shape
    TH, TW = triton.cdiv(Ho, tile), triton.cdiv(Wo, tile)
    T = N * TH * TW
    if T == 0 or CO == 0:
        return out
    ttp = next_pow2(tile * tile)
    interp = _interpreting(x)
    ieee = _is_ieee(x.dtype)
    if config is None and not interp and x.dtype in AUTOTUNE_DTYPES and autotune_enabled():
        kernel, cfg = _tuned_conv(), {}

        def grid(meta):
            return (triton.cdiv(T * ttp, meta["BLOCK_M"]), triton.cdiv(CO, meta["BLOCK_N"]))
    else:
        if config is None:
            config = dict(_INTERP_CONV) if interp else conv_config(tile, C, CO, x.dtype, ieee)
        cfg = dict(config)
        if interp:
            for key in _LAUNCH_ONLY:
                cfg.pop(key, None)
        check_config(cfg)
        kernel = _tg_conv
        grid = (triton.cdiv(T * ttp, cfg["BLOCK_M"]), triton.cdiv(CO, cfg["BLOCK_N"]))
    kernel[grid](x, weight, bias if bias is not None else weight, out, tiles, counts,
                   T, C, H, W, CO, Ho, Wo, TH, TW,
                   x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                   weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3),
                   out.stride(0), out.stride(1), out.stride(2), out.stride(3),
                   SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
                   KH=KH, KW=KW, TILE=tile, TTP=ttp, HAS_BIAS=bias is not None,
                   IEEE=ieee, INTERP_BF16=interp and x.dtype == torch.bfloat16, **cfg)
    return out


def gate(x: torch.Tensor, x_prev: torch.Tensor, imp_weight: torch.Tensor | None, imp_bias: float,
         prev_gate: torch.Tensor | None, kernel_size: tuple, stride: tuple, padding: tuple, dilation: tuple,
         tile: int, threshold: float, skip_logit: float | None,
         gate_out: torch.Tensor, tiles: torch.Tensor, counts: torch.Tensor) -> None:
    """Gate map ``gate_out`` (N, TH, TW) int8 and the tile list ``tiles`` / ``counts`` (zeroed here)."""
    N, C, H, W = x.shape
    TH, TW = gate_out.shape[1], gate_out.shape[2]
    KH, KW = kernel_size
    Ho = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    T = N * TH * TW
    counts.zero_()
    if T == 0:
        return
    has_skip = skip_logit is not None and imp_weight is not None
    NP = N * H * W
    dmap = torch.empty(NP, dtype=torch.float32, device=x.device)
    imap = torch.empty(NP if has_skip else 1, dtype=torch.float32, device=x.device)
    block_p = 32 if _interpreting(x) else 64
    block_c = min(64, max(16, next_pow2(C)))
    _pixel_maps[(triton.cdiv(NP, block_p),)](
        x, x_prev, imp_weight if has_skip else dmap, dmap, imap, NP, C, H, W,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        x_prev.stride(0), x_prev.stride(1), x_prev.stride(2), x_prev.stride(3),
        HAS_IMP=has_skip, BLOCK_P=block_p, BLOCK_C=block_c)
    ttp = next_pow2(tile * tile)
    block_t = max(1, (64 if _interpreting(x) else 256) // ttp)
    prev = prev_gate if prev_gate is not None else gate_out
    _tile_gate[(triton.cdiv(T, block_t),)](
        dmap, imap, prev, gate_out, tiles, counts, T, H, W, Ho, Wo, TH, TW, float(threshold),
        float(skip_logit) if has_skip else 0.0, float(imp_bias),
        SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        KH=KH, KW=KW, TILE=tile, TTP=ttp, BLOCK_T=block_t, HAS_SKIP=has_skip, HAS_PREV=prev_gate is not None)


def compact(gate_map: torch.Tensor, tiles: torch.Tensor, counts: torch.Tensor, ho: int, wo: int, tile: int) -> None:
    """Tile list of a given int8 gate map (N, TH, TW) of a (Ho, Wo) output (``counts`` zeroed here)."""
    counts.zero_()
    T = gate_map.numel()
    if T:
        _compact[(triton.cdiv(T, 256),)](gate_map, tiles, counts, T, ho, wo, gate_map.shape[1], gate_map.shape[2],
                                         TILE=tile, BLOCK_T=256)
