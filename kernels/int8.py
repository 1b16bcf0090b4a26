"""Triton kernels for int8-activation matmuls: W8A8, W4A8 and the per-token activation quantizer.

Three kernels, all pure integer/fp32 Triton (no inline PTX), so the same code
runs compiled on the GPU and under the interpreter on CPU tensors:

``_act_quant``  one program per token row: ``amax = max|x|``, ``scale =
    amax / qmax`` (1 for an all-zero row, NaN for a row holding NaN or +-Inf,
    whose codes are then 0), ``q = clamp(rint(x / scale), -qmax,
    qmax)`` stored as int8, with ``qmax`` 127 (8-bit) or 7 (4-bit) -- a
    per-token bit width read from a ``bits`` vector, so one launch quantizes
    the 8-bit and the 4-bit tokens of a token-adaptive mixed-precision batch.
    Divisions are IEEE round-to-nearest (``tl.math.div_rn``; Triton's plain
    ``/`` is an approximate division on NVIDIA GPUs) and rounding is
    half-to-even, so ``q`` equals ``sparsekit.ops.act_quant.per_token_quant_reference``
    bit for bit.  Rounding: ``libdevice.rint`` compiled; under the interpreter
    (which cannot run libdevice) ``(v + 1.5 * 2**23) - 1.5 * 2**23``, exact
    round-half-even for ``|v| < 2**22`` (here ``|v| <= 127``).

``_w8a8_fwd``   ``y = (xq @ wq^T) * x_scale[m] * w_scale[n] (+ bias)``: int8 x
    int8 ``tl.dot`` into an int32 accumulator (exact), scales and bias in an
    fp32 epilogue (``acc * (x_scale * w_scale)``: the scales meet first, so no
    intermediate overflows fp32 where the result fits), output fp16/bf16.  ``wq`` is ``(N, K)`` int8 with
    per-output-channel float32 scales (``sparsekit.formats.int8``).

``_w4a8_fwd``   the int4 weight of ``sparsekit.formats.int4`` (8 nibbles per
    int32, column ``8j+2s`` in nibble ``s`` and ``8j+2s+1`` in nibble ``s+4``)
    is unpacked in registers to the exact int8 ``code - zero`` (in [-15, 15];
    symmetric weights use zero 8), then the same int8 dot runs per weight
    group with an int32 accumulator; when a group finishes, its int32 sum is
    converted once and scaled by ``x_scale * group scale`` into an fp32
    accumulator; the bias is added in the epilogue.  ``group_size = K`` (per channel) is a single int32
    accumulation.  A K tile never straddles two groups: BLOCK_K divides the
    group size (or the row is one group).  The per-group conversion is the
    exponent-bias trick (:func:`_i32_to_f32`): ``bits(0x4B400000 + v) - 1.5 *
    2**23`` is exactly ``float(v)`` for ``|v| <= 2**22``, and a group's sum of
    int8 x int8 products is inside that range for groups of up to 256 columns
    (``256 * 128 * 128 = 2**22``), so an integer add and a float subtraction
    replace the slow int-to-float conversion with a bit-identical result.

Both matmuls compute the transposed tile ("swap AB"): ``acc_t (BLOCK_N,
BLOCK_M) = W_tile @ xq_tile^T``.  The W4A8 weight tile unpacked in registers is
then the A operand of the tensor-core op (no store to shared memory and barrier
per K step), both operands are K-major as int8 wgmma requires, and a 16-row M
tile becomes the wgmma N (wgmma's M is 64 per warp group), so small M runs on
Hopper's IGMMA instead of mma.sync.  The packed int4 words are bounded by
``K // 8`` passed as an argument, so a launch specializes its divisibility and
the words arrive in 16-byte ``cp.async`` copies.

The Triton interpreter (triton 3.x) runs int8 ``tl.dot`` with an int32
accumulator exactly, so no interpreter workaround is needed for the dots (the
bf16 quirks of ``kernels._common`` only touch the bf16 output cast here).

Tiling (GPU, heuristic per M bucket like ``kernels.int4``; not tuned on a
GPU yet): M <= 16 is GEMV-like (16-row tiles, split-K when the N tiles cannot
fill the GPU; the split partials are fp32 and meet in ``tl.atomic_add``);
larger M is a grouped-order tiled GEMM.  Split-K cuts K into chunks that never
cross a weight group, so every partial is ``sum_g int32_g * scale_g``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._common import cast_out, grouped_tile

__all__ = ["per_token_quant", "w8a8_linear", "w4a8_linear", "unpack_w4_int8", "int32_to_float", "fwd_config",
           "check_config", "MAX_K", "MAGIC_MAX_GROUP"]

# the int32 accumulator holds up to K * 127 * 127 (W8A8); K <= MAX_K keeps it exact
MAX_K = (2 ** 31 - 1) // (127 * 127)


@triton.jit
def _rint(v, INTERP: tl.constexpr):
    """Round half to even (fp32 in, fp32 out)."""
    if INTERP:
        return (v + 12582912.0) - 12582912.0
    else:
        return libdevice.rint(v)


@triton.jit
def _act_quant(X, Q, S, BITS, M, K, stride_xm, stride_xk, stride_qm,
               HAS_BITS: tl.constexpr, QMAX: tl.constexpr, INTERP: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    xrow = X + row * stride_xm
    qrow = Q + row * stride_qm
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(xrow + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
        ax = tl.abs(x)
        # NaN -> +inf (max() drops NaN), so a == inf flags a row holding NaN or +-Inf
        amax = tl.maximum(amax, tl.where(ax < float("inf"), ax, float("inf")))
    a = tl.max(amax, axis=0)
    finite = a < float("inf")
    if HAS_BITS:
        b = tl.load(BITS + row)
        qmax = tl.where(b == 8, 127.0, 7.0)
    else:
        qmax = tl.full([], QMAX, tl.float32)
    scale = tl.where(a > 0.0, tl.math.div_rn(a, qmax), 1.0)
    # a non-finite row: scale NaN and codes 0, so the row stays NaN downstream (dense semantics)
    scale = tl.where(finite, scale, float("nan"))
    tl.store(S + row, scale)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(xrow + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
        v = _rint(tl.math.div_rn(x, scale), INTERP)
        v = tl.minimum(tl.maximum(v, -qmax), qmax)
        v = tl.where(finite, v, 0.0)
        tl.store(qrow + offs, v.to(tl.int8), mask=offs < K)


# the int32 -> fp32 conversion of a group's accumulator by exponent bias: for
# -2**22 <= v <= 2**22 the bits 0x4B400000 + v are the float 1.5 * 2**23 + v exactly
# (the float's ulp is 1 on [2**23, 2**24), and 2**24 itself is exact), so an integer
# add and an exact float subtraction give the same float as the conversion
# instruction, which runs at 16 results per clock per SM on recent NVIDIA GPUs
# (integer adds 64, float adds 128)
MAGIC_MAX = 2 ** 22
# the largest group whose int32 sum is inside the exact range for ANY int8 x int8
# products (|a|, |b| <= 128): 256 * 128 * 128 = 2**22
MAGIC_MAX_GROUP = MAGIC_MAX // (128 * 128)


@triton.jit
def _i32_to_f32(v, MAGIC: tl.constexpr):
    """int32 -> fp32 (round to nearest, i.e. exact below 2**24); MAGIC: by exponent bias, exact
    and equal to the conversion for |v| <= 2**22 (the caller guarantees the bound)."""
    if MAGIC:
        return (v + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        return v.to(tl.float32)


@triton.jit
def _unpack_i8(Qw, Z, offs_n, k0, g, N, NWORDS, stride_qn, stride_zn,
               SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K) int8 tile of ``code - zero`` for columns k0 .. k0+BLOCK_K-1 (group g).

    ``NWORDS`` (= K // 8, an argument so that a launch specializes its divisibility)
    bounds the packed words: the mask stays constant over 16-byte vectors.  The zero
    point is loaded as a (BLOCK_N, 1) tile, in the words' own register layout.
    """
    KW: tl.constexpr = BLOCK_K // 8
    offs_w = k0 // 8 + tl.arange(0, KW)
    nmask = offs_n[:, None] < N
    words = tl.load(Qw + offs_n[:, None] * stride_qn + offs_w[None, :],
                    mask=nmask & (offs_w[None, :] < NWORDS), other=0)
    if SYMMETRIC:
        zz = 0x08080808                                      # the zero point 8 in every byte
    else:
        # (a tile past the end, a masked step of the W4A8 loop, reads no zero point)
        zmask = nmask & ((tl.zeros((1, 1), tl.int32) + k0 // 8) < NWORDS)
        z = tl.load(Z + offs_n[:, None] * stride_zn + g, mask=zmask, other=0.0).to(tl.float32).to(tl.int32)
        zz = z * 0x01010101
    # four codes per 32-bit op (SIMD within a register): byte b of ``words & 0x0F0F0F0F``
    # is nibble 2b, of ``(words >> 4) & 0x0F0F0F0F`` nibble 2b + 1.  Per byte,
    # (code | 0x80) - zero = 128 + code - zero lies in [113, 143], so subtracting
    # zero * 0x01010101 borrows across no byte; XOR 0x80 then leaves code - zero as
    # the byte's int8 value.  (int32 arithmetic wraps: only the bit pattern matters.)
    M80: tl.constexpr = -0x7F7F7F80                        # 0x80808080 as an int32
    ev4 = ((words & 0x0F0F0F0F) | M80) - zz
    od4 = (((words >> 4) & 0x0F0F0F0F) | M80) - zz
    ev4 = ev4 ^ M80
    od4 = od4 ^ M80
    # nibble p holds column 8j + 2p (p < 4) or 8j + 2(p - 4) + 1: ev4's bytes are the
    # columns (0, 4, 1, 5), od4's (2, 6, 3, 7).  Nested joins build (BLOCK_N, KW, a, b, c)
    # for column 8j + 4a + 2b + c, which reshapes to column order
    e0 = ev4.to(tl.int8)
    e1 = (ev4 >> 8).to(tl.int8)
    e2 = (ev4 >> 16).to(tl.int8)
    e3 = (ev4 >> 24).to(tl.int8)
    o0 = od4.to(tl.int8)
    o1 = (od4 >> 8).to(tl.int8)
    o2 = (od4 >> 16).to(tl.int8)
    o3 = (od4 >> 24).to(tl.int8)
    ev = tl.join(tl.join(e0, e1), tl.join(o0, o1))          # even columns: c = 0
    od = tl.join(tl.join(e2, e3), tl.join(o2, o3))          # odd columns: c = 1
    return tl.reshape(tl.join(ev, od), (BLOCK_N, BLOCK_K))


@triton.jit
def _epilogue_t(acc_t, B, Y, offs_m, offs_n, M, N, stride_ym, stride_yn, pid_k,
                HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, INTERP_BF16: tl.constexpr):
    """acc_t[n, m] (fp32, weight and token scales applied) (+ bias[n]) -> Y[m, n] (or fp32
    atomics for split-K; slice 0 adds the bias).  The swap-AB kernels' transposed tile."""
    ymask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    yp = Y + offs_n[:, None] * stride_yn + offs_m[None, :] * stride_ym
    if HAS_BIAS:
        bias = tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        if SPLIT_K == 1:
            acc_t += bias
        else:
            acc_t += tl.where(pid_k == 0, bias, 0.0)
    if SPLIT_K == 1:
        tl.store(yp, cast_out(acc_t, Y.dtype.element_ty, INTERP_BF16), mask=ymask)
    else:
        tl.atomic_add(yp, acc_t, mask=ymask)


@triton.jit
def _w8a8_fwd(XQ, XS, WQ, WS, B, Y, M, N, K, TPC,
              stride_xm, stride_wn, stride_ym, stride_yn,
              HAS_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # swap AB: acc_t (BLOCK_N, BLOCK_M) = W_tile @ xq_tile^T, both K-major (as int8 wgmma
    # needs); a 16-row M tile becomes the wgmma N (wgmma's M is 64 per warp group)
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    # split pid_k owns the contiguous K tiles [pid_k * TPC, (pid_k + 1) * TPC)
    k_tiles = tl.cdiv(K, BLOCK_K)
    t_end = tl.minimum((pid_k + 1) * TPC, k_tiles)
    for kt in range(pid_k * TPC, t_end):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        a = tl.load(XQ + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & kmask[None, :], other=0)
        w = tl.load(WQ + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=(offs_n[:, None] < N) & kmask[None, :], other=0)
        acc_t = tl.dot(w, tl.trans(a), acc_t, out_dtype=tl.int32)
    ws = tl.load(WS + offs_n, mask=offs_n < N, other=0.0)
    xs = tl.load(XS + offs_m, mask=offs_m < M, other=0.0)
    # the scales multiply each other first: acc * one scale alone can overflow fp32 where the result fits
    out_t = acc_t.to(tl.float32) * (ws[:, None] * xs[None, :])
    _epilogue_t(out_t, B, Y, offs_m, offs_n, M, N, stride_ym, stride_yn, pid_k, HAS_BIAS, SPLIT_K, INTERP_BF16)


@triton.jit
def _w4a8_fwd(XQ, XS, Qw, S, Z, B, Y, M, N, K, KW, G, TPC,
              stride_xm, stride_qn, stride_sn, stride_zn, stride_ym, stride_yn,
              HAS_BIAS: tl.constexpr, SYMMETRIC: tl.constexpr, INTERP_BF16: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
              PER_CHANNEL: tl.constexpr, TILES_PER_GROUP: tl.constexpr, GROUPS_PER_STEP: tl.constexpr,
              MAGIC: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n[:, None] < N
    xs = tl.load(XS + offs_m, mask=offs_m < M, other=0.0)
    # swap AB: acc_t (BLOCK_N, BLOCK_M) = W_tile @ xq_tile^T; the weight tile unpacked in
    # registers is the A operand of the int8 tensor-core op (no round trip through
    # shared memory), and a 16-row M tile becomes the wgmma N
    if PER_CHANNEL:
        # one group per row: one int32 accumulation over split pid_k's K tiles
        # [pid_k * TPC, (pid_k + 1) * TPC), converted and scaled once
        acc_i = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
        k_tiles = tl.cdiv(K, BLOCK_K)
        for kt in range(pid_k * TPC, tl.minimum((pid_k + 1) * TPC, k_tiles)):
            k0 = kt * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(XQ + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
            w = _unpack_i8(Qw, Z, offs_n, k0, 0, N, KW, stride_qn, stride_zn, SYMMETRIC, BLOCK_N, BLOCK_K)
            acc_i = tl.dot(w, tl.trans(a), acc_i, out_dtype=tl.int32)
        s = tl.load(S + offs_n[:, None] * stride_sn, mask=nmask, other=0.0).to(tl.float32)
        # token and weight scales multiply each other first (no fp32 overflow of acc * scale)
        acc_t = _i32_to_f32(acc_i, False) * (s * xs[None, :])
    else:
        # one flat loop over steps of GROUPS_PER_STEP weight groups (split pid_k takes steps
        # pid_k, pid_k + SPLIT_K, ...); each group accumulates its TILES_PER_GROUP K tiles in
        # int32, converted (exactly; MAGIC: by exponent bias) and scaled into the fp32 tile.
        # Groups past G (a last, partial step) are fully masked and add nothing.
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for step in range(pid_k, tl.cdiv(G, GROUPS_PER_STEP), SPLIT_K):
            for j in tl.static_range(GROUPS_PER_STEP):
                g = step * GROUPS_PER_STEP + j
                acc_i = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
                for t in tl.static_range(TILES_PER_GROUP):
                    k0 = (g * TILES_PER_GROUP + t) * BLOCK_K
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    a = tl.load(XQ + offs_m[:, None] * stride_xm + offs_k[None, :],
                                mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
                    w = _unpack_i8(Qw, Z, offs_n, k0, g, N, KW, stride_qn, stride_zn, SYMMETRIC, BLOCK_N, BLOCK_K)
                    acc_i = tl.dot(w, tl.trans(a), acc_i, out_dtype=tl.int32)
                smask = nmask & ((tl.zeros((1, 1), tl.int32) + g) < G)
                s = tl.load(S + offs_n[:, None] * stride_sn + g, mask=smask, other=0.0).to(tl.float32)
                # token and group scales multiply each other first (no fp32 overflow of acc * scale)
                acc_t += _i32_to_f32(acc_i, MAGIC) * (s * xs[None, :])
    _epilogue_t(acc_t, B, Y, offs_m, offs_n, M, N, stride_ym, stride_yn, pid_k, HAS_BIAS, SPLIT_K, INTERP_BF16)


@triton.jit
def _i32_to_f32_kernel(V, OUT, n, MAGIC: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[i] = float(V[i]) through :func:`_i32_to_f32` (tests / debugging)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(V + offs, mask=offs < n, other=0)
    tl.store(OUT + offs, _i32_to_f32(v, MAGIC), mask=offs < n)


@triton.jit
def _w4_unpack(Qw, Z, W, N, K, GS, stride_qn, stride_zn, stride_wn,
               SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[N, K] int8 = code - zero, through the matmul's register path (tests / debugging)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = _unpack_i8(Qw, Z, offs_n, k0, k0 // GS, N, K // 8, stride_qn, stride_zn, SYMMETRIC, BLOCK_N, BLOCK_K)
    tl.store(W + offs_n[:, None] * stride_wn + offs_k[None, :], w,
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


# ----------------------------------------------------------------------------
# launch configuration

_INTERP_FWD = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, SPLIT_K=1)
_LAUNCH_ONLY = ("num_warps", "num_stages")


def _interpreting(t: torch.Tensor) -> bool:
    return not t.is_cuda


def fwd_config(M: int, N: int, K: int, group_size: int | None = None, num_sms: int = 132) -> dict:
    """Tile configuration by bucketed M (heuristic; no per-GPU tuning yet).

    ``group_size`` is the int4 weight's group (W4A8) or None (W8A8).  BLOCK_K
    is in int8 elements (128 = one 128-byte row segment); for grouped int4
    weights it is capped at the group size so a tile stays inside one group,
    and ``GROUPS_PER_STEP`` groups make one step of the W4A8 loop.
    """
    if M <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128 if K < 4096 else 256, GROUP_M=1, num_warps=4, num_stages=4)
    elif M <= 64:
        # W4A8 holds an int32 and an fp32 (BLOCK_N, BLOCK_M) tile: two warp groups keep
        # it near 128 registers a thread (one: 255)
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=4, num_warps=4 if group_size is None else 8,
                   num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    if group_size is not None and group_size < K:
        # W4A8 with groups: a K tile is one group at most, and a loop step takes
        # GROUPS_PER_STEP whole groups (each its own int32 sum) over 128 columns.  Large M
        # uses 64-column tiles (two per 128-group): the 128 x 128 int32 + fp32 tiles leave
        # little room for the unpacked operand on sm_80 (255 -> ~230 registers)
        step = 128
        cfg["BLOCK_K"] = min(64 if M > 64 else step, group_size)
        if group_size < step and step % group_size == 0:
            cfg["GROUPS_PER_STEP"] = step // group_size
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    k_tiles = triton.cdiv(K, cfg["BLOCK_K"] * cfg.get("GROUPS_PER_STEP", 1))
    split = 1
    if M <= 64:
        while tiles * split < num_sms and split * 2 <= k_tiles // 2 and split < 16:
            split *= 2
    cfg["SPLIT_K"] = split
    return cfg


def check_config(cfg: dict, group_size: int | None, K: int) -> None:
    """ValueError unless BLOCK_K is a power of two >= 32 that keeps every K tile inside one weight group."""
    bk = cfg["BLOCK_K"]
    if bk < 32 or bk & (bk - 1):
        raise ValueError(f"BLOCK_K must be a power of two >= 32 (int8 dot), got {bk}")
    if group_size is not None and group_size < K and group_size % bk:
        raise ValueError(f"BLOCK_K={bk} must divide group_size={group_size} (a K tile may not straddle two groups)")
    if cfg.get("SPLIT_K", 1) < 1:
        raise ValueError("SPLIT_K must be >= 1")
    gps = cfg.get("GROUPS_PER_STEP", 1)
    if isinstance(gps, bool) or not isinstance(gps, int) or gps < 1:
        raise ValueError(f"GROUPS_PER_STEP must be an int >= 1, got {gps!r}")


def _config(x, config, M, N, K, group_size):
    if config is None:
        if _interpreting(x):
            config = dict(_INTERP_FWD)
            if group_size is not None and group_size < K:
                config["BLOCK_K"] = min(config["BLOCK_K"], group_size)
        else:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            config = fwd_config(M, N, K, group_size, sms)
    cfg = dict(config)
    if _interpreting(x):
        for key in _LAUNCH_ONLY:
            cfg.pop(key, None)
    check_config(cfg, group_size, K)
    return cfg


def per_token_quant(x: torch.Tensor, bits: torch.Tensor | None, qmax: float, q: torch.Tensor,
                    scale: torch.Tensor, block_k: int | None = None) -> None:
    """Row-wise quantization of 2-D ``x`` (any strides) into ``q`` (M, K) int8 (row stride
    ``q.stride(0)``, unit column stride) and ``scale`` (M,) float32.

    ``bits`` (M,) integer tensor of 4/8 per row, or None (``qmax`` for every row).
    """
    M, K = x.shape
    if M == 0:
        return
    interp = _interpreting(x)
    if block_k is None:
        block_k = min(triton.next_power_of_2(max(K, 1)), 256 if interp else 2048)
    extra = {} if interp else dict(num_warps=4 if block_k <= 1024 else 8)
    _act_quant[(M,)](x, q, scale, bits if bits is not None else scale, M, K,
                     x.stride(0), x.stride(1), q.stride(0),
                     HAS_BITS=bits is not None, QMAX=float(qmax), INTERP=interp, BLOCK_K=block_k, **extra)


def w8a8_linear(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                bias: torch.Tensor | None, out: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """``out[M, N] = (xq @ wq^T) * xs[:, None] * ws[None, :] (+ bias)``.

    xq (M, K) int8 (unit column stride), xs (M,) fp32, wq (N, K) int8, ws (N,)
    fp32, out preallocated fp16/bf16.
    """
    M, K = xq.shape
    N = wq.shape[0]
    cfg = _config(xq, config, M, N, K, None)
    split = cfg.pop("SPLIT_K", 1)
    k_tiles = triton.cdiv(K, cfg["BLOCK_K"])
    split = max(1, min(split, k_tiles))
    tpc = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, tpc)
    target = out if split == 1 else torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split)
    _w8a8_fwd[grid](xq, xs, wq, ws, bias if bias is not None else ws, target, M, N, K, tpc,
                    xq.stride(0), wq.stride(0), target.stride(0), target.stride(1),
                    HAS_BIAS=bias is not None, INTERP_BF16=_interpreting(xq) and out.dtype == torch.bfloat16,
                    SPLIT_K=split, **cfg)
    if split != 1:
        out.copy_(target)
    return out


def w4a8_linear(xq: torch.Tensor, xs: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor | None, group_size: int, K: int, bias: torch.Tensor | None,
                out: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """``out[M, N] = sum_g (xq @ (code - zero)_g^T) * scale_g * xs[:, None] (+ bias)`` for a packed int4 weight."""
    M = xq.shape[0]
    N = qweight.shape[0]
    G = scales.shape[1]
    # (a single group per row passes group_size = K: W4A8 tiles, no group cap)
    cfg = _config(xq, config, M, N, K, group_size if G > 1 else K)
    split = cfg.pop("SPLIT_K", 1)
    # the exponent-bias conversion of the group sums (exact for groups of <= 256
    # columns); config["MAGIC"] = False forces the plain conversion (tests compare both)
    magic = G > 1 and group_size <= MAGIC_MAX_GROUP
    if cfg.setdefault("MAGIC", magic) and not magic:
        raise ValueError(f"MAGIC=True needs group sums inside +-2**22: at most {MAGIC_MAX_GROUP} columns a group "
                         f"(got group_size={group_size}, {G} group(s) a row)")
    bk = cfg["BLOCK_K"]
    k_tiles = triton.cdiv(K, bk)
    gps = cfg.pop("GROUPS_PER_STEP", 1)
    if G > 1:
        tpc = 1
        tpg = group_size // bk
        split = max(1, min(split, triton.cdiv(G, gps)))
    else:
        gps = tpg = 1
        split = max(1, min(split, k_tiles))
        tpc = triton.cdiv(k_tiles, split)
        split = triton.cdiv(k_tiles, tpc)
    target = out if split == 1 else torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split)
    z = zeros if zeros is not None else scales
    _w4a8_fwd[grid](xq, xs, qweight, scales, z, bias if bias is not None else scales, target,
                    M, N, K, K // 8, G, tpc,
                    xq.stride(0), qweight.stride(0), scales.stride(0), z.stride(0),
                    target.stride(0), target.stride(1),
                    HAS_BIAS=bias is not None, SYMMETRIC=zeros is None,
                    INTERP_BF16=_interpreting(xq) and out.dtype == torch.bfloat16, SPLIT_K=split,
                    PER_CHANNEL=G == 1, TILES_PER_GROUP=tpg, GROUPS_PER_STEP=gps, **cfg)
    if split != 1:
        out.copy_(target)
    return out


def int32_to_float(v: torch.Tensor, out: torch.Tensor, magic: bool = True) -> torch.Tensor:
    """``out`` (float32) = ``v`` (int32, contiguous) converted by the W4A8 kernel's per-group
    conversion (``magic``: the exponent-bias trick, exact for ``|v| <= 2**22``; tests / debugging)."""
    n = v.numel()
    if n:
        block = 1024
        _i32_to_f32_kernel[(triton.cdiv(n, block),)](v, out, n, MAGIC=bool(magic), BLOCK=block)
    return out


def unpack_w4_int8(qweight: torch.Tensor, zeros: torch.Tensor | None, group_size: int, K: int,
                   out: torch.Tensor, block_k: int = 32) -> torch.Tensor:
    """``out[N, K]`` int8 = ``code - zero`` by the W4A8 kernel's register unpacking (tests / debugging)."""
    N = qweight.shape[0]
    z = zeros if zeros is not None else qweight
    grid = (triton.cdiv(N, 16), triton.cdiv(K, block_k))
    _w4_unpack[grid](qweight, z, out, N, K, group_size, qweight.stride(0), z.stride(0), out.stride(0),
                     SYMMETRIC=zeros is None, BLOCK_N=16, BLOCK_K=block_k)
    return out
