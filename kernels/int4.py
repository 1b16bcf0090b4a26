"""Triton kernels for the W4A16 matmul (int4 weights, fp16/bf16 activations).

The weight arrives packed (see ``sparsekit.formats.int4``): ``qweight``
``(N, K/8)`` int32, 8 codes per word with column ``8j+2s`` in nibble ``s`` and
column ``8j+2s+1`` in nibble ``s+4``; ``scales`` / ``zeros`` ``(N, G)`` in the
activation dtype.  Each program reads packed words and dequantizes a
``(BLOCK_N, BLOCK_K)`` tile in registers with integer bit tricks only (no
inline PTX, so the same code runs under ``TRITON_INTERPRET=1``):

1. ``t = ((word >> 4s) & 0x000F000F) | MAGIC2`` -- one shift, AND and OR put
   two codes into the mantissas of two 16-bit floats at once (SIMD within a
   32-bit register).  ``MAGIC2`` is ``0x64006400`` (two fp16 1024.0) for fp16
   and ``0x43004300`` (two bf16 128.0) for bf16; the ulp at 1024 (fp16) /
   128 (bf16) is 1, so each half reads exactly ``BIAS + code``.
2. The halves are split (truncation / ``>> 16``) and bitcast to the float type.
3. ``(BIAS + code) - (BIAS + zero)`` is the exact integer ``code - zero``;
   one multiply by the group scale rounds once, so the tile equals
   ``Int4Weight.dequantize()`` bit for bit.  The words are read as a
   ``(BLOCK_N, groups in the tile, words per group)`` tile, so each (row, group)
   scale / zero is loaded once, in the words' own register layout, and this
   step runs before the columns are interleaved.
4. The four (low, high) pairs are interleaved back into column order with
   ``tl.join`` + ``tl.reshape``, and the tile goes to ``tl.dot`` (fp32 accumulation).

BLOCK_K and the group size: a K tile either lies inside one group
(``group_size % BLOCK_K == 0``: one scale per row), spans whole groups
(``BLOCK_K % group_size == 0``: ``BLOCK_K / group_size`` scales per row,
broadcast over their columns), or the row is a single group (``G == 1``, any
BLOCK_K, e.g. ``group_size = K = 96``).  :func:`check_config` enforces this.

The product is computed transposed ("swap AB"): ``acc_t (BLOCK_N, BLOCK_M) =
W_tile @ x_tile^T``, so the weight tile built in registers is the A operand of
the tensor-core op.  On Hopper that is a wgmma with A in registers, which Triton
software-pipelines (wgmma left in flight across K steps), and a 16-row M tile
becomes the wgmma N; the weight tile as the B operand would instead be stored to
shared memory every K step and each wgmma waited for.  The packed words are read
with 16-byte ``cp.async`` copies: their bound is ``K // 8`` passed as an argument,
so a launch specializes its divisibility and the mask stays constant over a vector.

Small M (<= 16) uses a 16-row tile and split-K (fp32 atomics) when the N tiles
alone cannot fill the GPU; larger M a tiled GEMM with grouped program ordering.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_out, dot_acc, grouped_tile


@triton.jit
def store_tile_t(acc_t, Y, B, offs_m, offs_n, M, N, stride_ym, stride_yn, pid_k,
                 HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, INTERP_BF16: tl.constexpr):
    """``kernels._common.store_tile`` for a transposed accumulator ``acc_t[n, m]`` (swap-AB kernels):
    ``Y[offs_m, offs_n] = acc_t^T (+ bias)``, or fp32 atomics into Y for split-K (slice 0 adds the bias)."""
    ymask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    yp = Y + offs_n[:, None] * stride_yn + offs_m[None, :] * stride_ym
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc_t += tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        tl.store(yp, cast_out(acc_t, Y.dtype.element_ty, INTERP_BF16), mask=ymask)
    else:
        if HAS_BIAS:
            if pid_k == 0:
                acc_t += tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        tl.atomic_add(yp, acc_t, mask=ymask)


@triton.jit
def _halves(t, FDT: tl.constexpr):
    """int32 holding two 16-bit floats -> (low, high) as FDT."""
    lo = t.to(tl.int16).to(FDT, bitcast=True)
    hi = (t >> 16).to(tl.int16).to(FDT, bitcast=True)
    return lo, hi


@triton.jit
def _scale_half(v, zb, s, FDT: tl.constexpr, CDT: tl.constexpr, INTERP_BF16: tl.constexpr):
    """(BIAS + code) - (BIAS + zero), times the scale: one rounding, as ``Int4Weight.dequantize``."""
    d = v.to(CDT) - zb
    if INTERP_BF16:
        # (code - zero) * scale is exact in fp32; round to nearest even by hand
        return cast_out(d * s.to(tl.float32), FDT, INTERP_BF16)
    else:
        return d * s


@triton.jit
def _dequant_tile(Q, S, Z, offs_n, k0, N, NWORDS, G, GS,
                  stride_qn, stride_sn, stride_zn,
                  SYMMETRIC: tl.constexpr, IS_BF16: tl.constexpr, INTERP_BF16: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_GROUPS: tl.constexpr):
    """Dense (BLOCK_N, BLOCK_K) tile of W = (q - zero) * scale, columns k0 .. k0+BLOCK_K-1.

    The packed words are read as a (BLOCK_N, TILE_GROUPS, WPG) tile (WPG words per
    group slice), so each (row, group) scale and zero is loaded once and broadcast
    over its words in the words' own register layout, and the zero/scale math runs
    before the columns are interleaved.  ``NWORDS`` (= K // 8, an argument so that a
    launch specializes its divisibility) bounds the words: the mask stays constant
    over 16-byte vectors.
    """
    TG: tl.constexpr = TILE_GROUPS
    WPG: tl.constexpr = BLOCK_K // 8 // TILE_GROUPS
    nmask = offs_n < N
    offs_g = tl.arange(0, TG)
    offs_w = k0 // 8 + offs_g[:, None] * WPG + tl.arange(0, WPG)[None, :]
    words = tl.load(Q + offs_n[:, None, None] * stride_qn + offs_w[None, :, :],
                    mask=nmask[:, None, None] & (offs_w[None, :, :] < NWORDS), other=0)
    if IS_BF16:
        FDT: tl.constexpr = tl.bfloat16
        MAGIC2: tl.constexpr = 0x43004300
        BIAS: tl.constexpr = 128.0
    else:
        FDT: tl.constexpr = tl.float16
        MAGIC2: tl.constexpr = 0x64006400
        BIAS: tl.constexpr = 1024.0
    # CDT: the dtype of the subtraction.  The interpreter stores bf16 as raw
    # uint16 and cannot do bf16 arithmetic, so interpreted bf16 launches work
    # in fp32 (exact: every operand is a small integer or a bf16 value)
    if INTERP_BF16:
        CDT: tl.constexpr = tl.float32
    else:
        CDT: tl.constexpr = FDT
    # the groups of the tile: TILE_GROUPS whole groups, or one group holding the
    # whole tile (clamped: the row may be a single group with GS = K)
    if TG == 1:
        offs_gg = tl.minimum(k0 // GS, G - 1) + offs_g
    else:
        offs_gg = k0 // GS + offs_g
    # (BLOCK_N, TG, 1): loaded in the words' register layout, broadcast over WPG
    gmask = nmask[:, None, None] & (offs_gg[None, :, None] < G)
    s3 = tl.load(S + offs_n[:, None, None] * stride_sn + offs_gg[None, :, None], mask=gmask, other=0.0)
    if SYMMETRIC:
        zb3 = tl.full((BLOCK_N, TG, 1), BIAS + 8.0, CDT)
    else:
        zb3 = tl.load(Z + offs_n[:, None, None] * stride_zn + offs_gg[None, :, None], mask=gmask,
                      other=0.0).to(CDT) + BIAS
    # two codes per 32-bit op: columns (8j+2s, 8j+2s+1) land in (low, high) halves
    lo0, hi0 = _halves(((words >> 0) & 0x000F000F) | MAGIC2, FDT)
    lo1, hi1 = _halves(((words >> 4) & 0x000F000F) | MAGIC2, FDT)
    lo2, hi2 = _halves(((words >> 8) & 0x000F000F) | MAGIC2, FDT)
    lo3, hi3 = _halves(((words >> 12) & 0x000F000F) | MAGIC2, FDT)
    lo0 = _scale_half(lo0, zb3, s3, FDT, CDT, INTERP_BF16)
    lo1 = _scale_half(lo1, zb3, s3, FDT, CDT, INTERP_BF16)
    lo2 = _scale_half(lo2, zb3, s3, FDT, CDT, INTERP_BF16)
    lo3 = _scale_half(lo3, zb3, s3, FDT, CDT, INTERP_BF16)
    hi0 = _scale_half(hi0, zb3, s3, FDT, CDT, INTERP_BF16)
    hi1 = _scale_half(hi1, zb3, s3, FDT, CDT, INTERP_BF16)
    hi2 = _scale_half(hi2, zb3, s3, FDT, CDT, INTERP_BF16)
    hi3 = _scale_half(hi3, zb3, s3, FDT, CDT, INTERP_BF16)
    # column 8j + e with e = 4a + 2b + c (c = low/high half, s = 2a + b): nested
    # joins build (BLOCK_N, TG, WPG, a, b, c), which reshapes to column order
    ev = tl.join(tl.join(lo0, lo2), tl.join(lo1, lo3))
    od = tl.join(tl.join(hi0, hi2), tl.join(hi1, hi3))
    return tl.reshape(tl.join(ev, od), (BLOCK_N, BLOCK_K))


@triton.jit
def _w4a16_fwd(X, Q, S, Z, B, Y,
               M, N, K, KW, G, GS,
               stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, stride_ym, stride_yn,
               HAS_BIAS: tl.constexpr, SYMMETRIC: tl.constexpr, IS_BF16: tl.constexpr, INTERP_BF16: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_GROUPS: tl.constexpr,
               SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # swap AB: acc_t (BLOCK_N, BLOCK_M) = W_tile @ x_tile^T, so the weight tile
    # dequantized in registers is the A operand of the tensor-core op (Hopper's wgmma
    # takes A from registers and Triton pipelines it; a weight tile as the B operand
    # would be stored to shared memory every iteration and waited for), and BLOCK_M
    # <= 16 becomes the wgmma N (wgmma's M is 64 per warp group)
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_tiles = (K + BLOCK_K - 1) // BLOCK_K
    # at least one (possibly fully masked) iteration: with a loop that may run zero
    # times the zero-trip path re-materializes the accumulator after the loop, and
    # ptxas then serializes every wgmma of the loop (C7515)
    for kt in range(pid_k, tl.maximum(k_tiles, pid_k + 1), SPLIT_K):
        k0 = kt * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _dequant_tile(Q, S, Z, offs_n, k0, N, KW, G, GS, stride_qn, stride_sn, stride_zn,
                          SYMMETRIC, IS_BF16, INTERP_BF16, BLOCK_N, BLOCK_K, TILE_GROUPS)
        acc_t = dot_acc(w, tl.trans(x), acc_t, False, INTERP_BF16)
    store_tile_t(acc_t, Y, B, offs_m, offs_n, M, N, stride_ym, stride_yn, pid_k, HAS_BIAS, SPLIT_K, INTERP_BF16)


@triton.jit
def _w4_dequant(Q, S, Z, W, N, K, G, GS, stride_qn, stride_sn, stride_zn, stride_wn,
                SYMMETRIC: tl.constexpr, IS_BF16: tl.constexpr, INTERP_BF16: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_GROUPS: tl.constexpr):
    """W[N, K] = dequantized weight (the same register path as the matmul)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = _dequant_tile(Q, S, Z, offs_n, k0, N, K // 8, G, GS, stride_qn, stride_sn, stride_zn,
                      SYMMETRIC, IS_BF16, INTERP_BF16, BLOCK_N, BLOCK_K, TILE_GROUPS)
    tl.store(W + offs_n[:, None] * stride_wn + offs_k[None, :], w,
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


# ----------------------------------------------------------------------------
# launch configuration

def tile_groups(block_k: int, group_size: int, G: int) -> int:
    """How many groups a BLOCK_K tile spans (1 when it lies inside one); ValueError if it straddles."""
    if G <= 1 or group_size % block_k == 0:
        return 1
    if block_k % group_size == 0:
        return block_k // group_size
    raise ValueError(f"BLOCK_K={block_k} must divide group_size={group_size} or be a multiple of it "
                     f"(unless the row is a single group)")


def check_config(cfg: dict, group_size: int, G: int) -> None:
    bk = cfg["BLOCK_K"]
    if bk < 16 or bk & (bk - 1):
        raise ValueError(f"BLOCK_K must be a power of two >= 16, got {bk}")
    tile_groups(bk, group_size, G)


def fwd_config(M: int, N: int, K: int, group_size: int, num_sms: int = 132) -> dict:
    """Tile configuration by bucketed M, N, K and group size (GemLite-style).

    M <= 16 is memory bound (GEMV-like): a 16-row tile, a long K step and
    split-K when the N tiles alone cannot fill the GPU.  Larger M: tiled GEMM.
    """
    G = max(K // max(group_size, 1), 1)
    if M <= 16:
        # BLOCK_N = 64: the wgmma M of one warp group (the weight tile is the A operand);
        # BLOCK_K = 128 keeps the register tile small (~100-130 registers), so several
        # CTAs per SM keep their cp.async stages of weights in flight
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    elif M <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    # keep BLOCK_K compatible with the group size (both powers of two otherwise)
    if G > 1 and group_size % cfg["BLOCK_K"] and cfg["BLOCK_K"] % group_size:
        cfg["BLOCK_K"] = 32
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    k_tiles = triton.cdiv(K, cfg["BLOCK_K"])
    split = 1
    if M <= 64:
        while tiles * split < num_sms and split * 2 <= k_tiles // 2 and split < 16:
            split *= 2
    cfg["SPLIT_K"] = split
    return cfg


_INTERP_FWD = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, SPLIT_K=1)
_LAUNCH_ONLY = ("num_warps", "num_stages")


def _interpreting(t: torch.Tensor) -> bool:
    return not t.is_cuda


def _interp_bf16(t: torch.Tensor) -> bool:
    return _interpreting(t) and t.dtype == torch.bfloat16


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int, K: int, bias: torch.Tensor | None, out: torch.Tensor,
                config: dict | None = None) -> torch.Tensor:
    """``out[M, N] = x[M, K] @ dequant(W)^T (+ bias)``; x 2-D (any strides), out preallocated."""
    M = x.shape[0]
    N = qweight.shape[0]
    G = scales.shape[1]
    if config is None:
        if _interpreting(x):
            config = dict(_INTERP_FWD)
        else:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            config = fwd_config(M, N, K, group_size, sms)
    cfg = dict(config)
    if _interpreting(x):
        for key in _LAUNCH_ONLY:
            cfg.pop(key, None)
    check_config(cfg, group_size, G)
    split = cfg.pop("SPLIT_K", 1)
    tg = tile_groups(cfg["BLOCK_K"], group_size, G)
    if K == 0:
        # nothing to accumulate (the kernel's loop always runs one, masked, iteration)
        out.copy_(bias.expand(out.shape) if bias is not None else torch.zeros_like(out))
        return out
    target = out if split == 1 else torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split)
    z = zeros if zeros is not None else scales
    _w4a16_fwd[grid](x, qweight, scales, z, bias if bias is not None else scales, target,
                     M, N, K, K // 8, G, group_size,
                     x.stride(0), x.stride(1), qweight.stride(0), scales.stride(0), z.stride(0),
                     target.stride(0), target.stride(1),
                     HAS_BIAS=bias is not None, SYMMETRIC=zeros is None, IS_BF16=x.dtype == torch.bfloat16,
                     INTERP_BF16=_interp_bf16(x), TILE_GROUPS=tg, SPLIT_K=split, **cfg)
    if split != 1:
        out.copy_(target)
    return out


def int4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int, K: int, out: torch.Tensor, block_k: int = 32) -> torch.Tensor:
    """``out[N, K]`` = the weight dequantized by the kernels' register path (for tests / debugging)."""
    N = qweight.shape[0]
    G = scales.shape[1]
    cfg = dict(BLOCK_N=16, BLOCK_K=block_k)
    check_config(cfg, group_size, G)
    tg = tile_groups(block_k, group_size, G)
    z = zeros if zeros is not None else scales
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(K, block_k))
    _w4_dequant[grid](qweight, scales, z, out, N, K, G, group_size,
                      qweight.stride(0), scales.stride(0), z.stride(0), out.stride(0),
                      SYMMETRIC=zeros is None, IS_BF16=scales.dtype == torch.bfloat16,
                      INTERP_BF16=_interpreting(qweight) and scales.dtype == torch.bfloat16,
                      TILE_GROUPS=tg, **cfg)
    return out
