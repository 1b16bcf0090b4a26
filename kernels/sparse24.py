"""Triton kernels for 2:4 semi-structured sparse matmul.

The weight arrives compressed (see ``sparsekit.formats.sparse24``): ``values``
``(N, Kp/2)`` and 4-bit-per-group ``meta`` ``(N, Kp/8)`` uint8.  Every kernel
reads only the compressed bytes from memory and expands a ``(BLOCK_N,
BLOCK_K)`` dense tile in registers (two selects per element), so the DRAM
traffic for the weight is ~56% of a dense fp16 weight.  All bit handling is
plain integer ops, so the same code runs under ``TRITON_INTERPRET=1``.

Kernels:
  * ``_sp24_fwd``:    Y = X @ W^T (+ bias); tiles (M, N), loops over K, with an
                       optional split over K (fp32 atomics) for small M.
  * ``_sp24_dx``:     dX = dY @ W; tiles (M, K), loops over N.
  * ``_sp24_dvalues``: dW = dY^T @ X on (N, K) tiles, then only the stored
                       positions are written, in ``values`` layout.
  * ``_sp24_int8_fwd``: the int8 2:4 forward (W8A8): int8 x (per-token
                       quantized) times the expanded int8 weight tile, int32
                       accumulation, ``acc * x_scale[m] * w_scale[n] (+ bias)``
                       in the epilogue.  The GPU fallback of the csrc mma.sp
                       int8 kernel (dense int8 tensor-core math on the expanded
                       tile, compressed weight reads).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_out, dot_acc, grouped_tile, store_tile


@triton.jit
def _group_codes(m_ptr, offs_n, kt, stride_mn, N, KM, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """(i0, i1): kept positions (0..3) of the BLOCK_G groups of K tile ``kt``
    (groups kt*BLOCK_G ..), each (BLOCK_N, BLOCK_G) int32.

    A row's metadata for the tile is one contiguous run of BLOCK_G / 2 bytes
    (each byte holds two groups; both nibbles are unpacked), bounded by the
    row length ``KM`` (Kp / 8 bytes): a plain int argument, which the launch
    specializes as a multiple of 16 when it is one, so the masked load stays
    a wide (and, in the pipelined loops, asynchronous) access per thread.
    """
    MBYTES: tl.constexpr = BLOCK_G // 2
    offs_b = kt * MBYTES + tl.arange(0, MBYTES)
    bmask = (offs_n[:, None] < N) & (offs_b[None, :] < KM)
    byte = tl.load(m_ptr + offs_n[:, None] * stride_mn + offs_b[None, :], mask=bmask, other=0).to(tl.int32)
    nib = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, BLOCK_G))
    return nib & 3, nib >> 2


@triton.jit
def _expand_tile(v_ptr, m_ptr, offs_n, kt, stride_vn, stride_mn, N, KM,
                 BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """Dense (BLOCK_N, 4*BLOCK_G) tile of W for rows offs_n, K tile ``kt`` (groups kt*BLOCK_G ..).

    Reads BLOCK_G value pairs per row as one contiguous run (a row holds
    Kp / 2 = 4 * KM values), then places each pair at its two decoded
    positions with two selects per dense element.
    """
    offs_v = kt * (2 * BLOCK_G) + tl.arange(0, 2 * BLOCK_G)
    vmask = (offs_n[:, None] < N) & (offs_v[None, :] < 4 * KM)
    v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_v[None, :], mask=vmask, other=0.0)
    v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_G, 2)))
    i0, i1 = _group_codes(m_ptr, offs_n, kt, stride_mn, N, KM, BLOCK_N, BLOCK_G)
    c = tl.arange(0, 4)[None, None, :]
    zero = tl.zeros((BLOCK_N, BLOCK_G, 4), dtype=v0.dtype)
    w3 = tl.where(c == i0[:, :, None], v0[:, :, None], tl.where(c == i1[:, :, None], v1[:, :, None], zero))
    return tl.reshape(w3, (BLOCK_N, 4 * BLOCK_G))


@triton.jit
def _sp24_fwd(X, V, MT, B, Y,
              M, N, K, KM,
              stride_xm, stride_xk, stride_vn, stride_mn, stride_ym, stride_yn,
              HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, INTERP_BF16: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    BLOCK_G: tl.constexpr = BLOCK_K // 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_tiles = (K + BLOCK_K - 1) // BLOCK_K
    for kt in range(pid_k, k_tiles, SPLIT_K):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _expand_tile(V, MT, offs_n, kt, stride_vn, stride_mn, N, KM, BLOCK_N, BLOCK_G)
        acc = dot_acc(x, tl.trans(w), acc, IEEE, INTERP_BF16)
    store_tile(acc, Y, B, offs_m, offs_n, M, N, stride_ym, stride_yn, pid_k, HAS_BIAS, SPLIT_K, INTERP_BF16)


@triton.jit
def _sp24_dx(DY, V, MT, DX,
             M, N, K, KM,
             stride_dym, stride_dyn, stride_vn, stride_mn, stride_dxm, stride_dxk,
             IEEE: tl.constexpr, INTERP_BF16: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    BLOCK_G: tl.constexpr = BLOCK_K // 4
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(DY + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        w = _expand_tile(V, MT, offs_n, pid_k, stride_vn, stride_mn, N, KM, BLOCK_N, BLOCK_G)
        acc = dot_acc(dy, w, acc, IEEE, INTERP_BF16)
    tl.store(DX + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk, cast_out(acc, DX.dtype.element_ty, INTERP_BF16),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit
def _sp24_dvalues(DY, X, MT, DV,
                  M, N, K, KM,
                  stride_dym, stride_dyn, stride_xm, stride_xk, stride_mn, stride_dvn,
                  IEEE: tl.constexpr, INTERP_BF16: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    BLOCK_G: tl.constexpr = BLOCK_K // 4
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        dyt = tl.load(DY + offs_n[:, None] * stride_dyn + offs_m[None, :] * stride_dym,
                      mask=(offs_n[:, None] < N) & (offs_m[None, :] < M), other=0.0)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        acc = dot_acc(dyt, x, acc, IEEE, INTERP_BF16)
    # keep only the stored positions of each group, in values layout
    i0, i1 = _group_codes(MT, offs_n, pid_k, stride_mn, N, KM, BLOCK_N, BLOCK_G)
    c = tl.arange(0, 4)[None, None, :]
    a3 = tl.reshape(acc, (BLOCK_N, BLOCK_G, 4))
    g0 = tl.sum(tl.where(c == i0[:, :, None], a3, 0.0), axis=2)
    g1 = tl.sum(tl.where(c == i1[:, :, None], a3, 0.0), axis=2)
    # interleave back to the (v0, v1) pair layout: one contiguous run per row
    offs_v = 2 * pid_k * BLOCK_G + tl.arange(0, 2 * BLOCK_G)
    gv = tl.reshape(tl.join(g0, g1), (BLOCK_N, 2 * BLOCK_G))
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_v[None, :], cast_out(gv, DV.dtype.element_ty, INTERP_BF16),
             mask=(offs_n[:, None] < N) & (offs_v[None, :] < 4 * KM))


@triton.jit
def _sp24_int8_fwd(XQ, XS, V, MT, WS, B, Y,
                   M, N, K, KM,
                   stride_xm, stride_xk, stride_vn, stride_mn, stride_ym, stride_yn,
                   HAS_BIAS: tl.constexpr, INTERP_BF16: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    BLOCK_G: tl.constexpr = BLOCK_K // 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    k_tiles = (K + BLOCK_K - 1) // BLOCK_K
    for kt in range(0, k_tiles):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(XQ + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        w = _expand_tile(V, MT, offs_n, kt, stride_vn, stride_mn, N, KM, BLOCK_N, BLOCK_G)
        acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
    xs = tl.load(XS + offs_m, mask=offs_m < M, other=0.0)
    ws = tl.load(WS + offs_n, mask=offs_n < N, other=0.0)
    # scales first: acc * x_scale alone overflows fp32 for |x| ~ 1e37 while the result fits
    y = acc.to(tl.float32) * (xs[:, None] * ws[None, :])
    if HAS_BIAS:
        y += tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    ymask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             cast_out(y, Y.dtype.element_ty, INTERP_BF16), mask=ymask)


# ----------------------------------------------------------------------------
# launch configuration

def _is_ieee(dtype: torch.dtype) -> bool:
    if dtype != torch.float32:
        return False
    return not torch.backends.cuda.matmul.allow_tf32


def fwd_config(M: int, N: int, K: int, dtype: torch.dtype, num_sms: int = 132) -> dict:
    """Tile configuration for the forward kernel by M bucket (GemLite-style).

    Small M is memory bound: a 16-row tile (the smallest tensor-core M) with a
    long K step, and split-K when the N tiles alone cannot fill the GPU.
    fp32 without TF32 (IEEE) multiplies on the FMA units, whose dot holds both
    operand tiles in registers: above M = 16 it takes 64x64 tiles on 8 warps
    (128x128 on 8 warps and 64x64 on 4 warps spill 0.5-6.6 KB).
    """
    if M <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    elif M <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    if dtype == torch.float32:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 32)
        if _is_ieee(dtype) and M > 16:
            cfg.update(BLOCK_M=64, BLOCK_N=64, num_warps=8)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    k_tiles = triton.cdiv(K, cfg["BLOCK_K"])
    split = 1
    if M <= 64:
        while tiles * split < num_sms and split * 2 <= k_tiles // 4 and split < 16:
            split *= 2
    cfg["SPLIT_K"] = split
    return cfg


_INTERP_FWD = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, SPLIT_K=1)


def _interpreting(t: torch.Tensor) -> bool:
    return not t.is_cuda


def _interp_bf16(t: torch.Tensor) -> bool:
    return _interpreting(t) and t.dtype == torch.bfloat16


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, K: int,
                    bias: torch.Tensor | None, out: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """``out[M, N] = x[M, K] @ W^T (+ bias)``; x 2-D (any strides), out preallocated."""
    M = x.shape[0]
    N = values.shape[0]
    KM = meta.shape[1]                  # metadata bytes per row (Kp / 8)
    if config is None:
        if _interpreting(x):
            config = dict(_INTERP_FWD)
        else:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            config = fwd_config(M, N, K, x.dtype, sms)
    cfg = dict(config)
    split = cfg.pop("SPLIT_K", 1)
    target = out if split == 1 else torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split)
    _sp24_fwd[grid](x, values, meta, bias if bias is not None else values, target,
                    M, N, K, KM,
                    x.stride(0), x.stride(1), values.stride(0), meta.stride(0), target.stride(0), target.stride(1),
                    HAS_BIAS=bias is not None, IEEE=_is_ieee(x.dtype), INTERP_BF16=_interp_bf16(x), SPLIT_K=split, **cfg)
    if split != 1:
        out.copy_(target)
    return out


def sparse24_grad_input(dy: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, K: int,
                        out: torch.Tensor) -> torch.Tensor:
    """``out[M, K] = dy[M, N] @ W``."""
    M, N = dy.shape
    KM = meta.shape[1]                  # metadata bytes per row (Kp / 8)
    if _interpreting(dy):
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)
    elif _is_ieee(dy.dtype):
        # FMA dot, both operand tiles in registers: 8 warps (4 spill 456-2464 B)
        cfg = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=8, num_stages=3)
    elif dy.dtype == torch.float32:
        # TF32: a 32-row tile takes mma.sync on sm_90 too; a 64-row one goes to wgmma, whose tf32 B
        # operand (the expanded weight tile, stored N-major) triton 3.6 cannot lay out in shared memory
        cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=64 if M <= 64 else 128, BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=3)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"]))
    _sp24_dx[grid](dy, values, meta, out, M, N, K, KM,
                   dy.stride(0), dy.stride(1), values.stride(0), meta.stride(0), out.stride(0), out.stride(1),
                   IEEE=_is_ieee(dy.dtype), INTERP_BF16=_interp_bf16(dy), **cfg)
    return out


def sparse24_grad_values(dy: torch.Tensor, x: torch.Tensor, meta: torch.Tensor, K: int,
                         out: torch.Tensor) -> torch.Tensor:
    """``out`` (values layout, ``(N, Kp/2)``) = (dy^T @ x) at the stored positions."""
    M, N = dy.shape
    KM = meta.shape[1]                  # metadata bytes per row (Kp / 8)
    if _interpreting(dy):
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)
    elif dy.dtype == torch.float32:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(8 * KM, cfg["BLOCK_K"]))
    _sp24_dvalues[grid](dy, x, meta, out, M, N, K, KM,
                        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), meta.stride(0), out.stride(0),
                        IEEE=_is_ieee(dy.dtype), INTERP_BF16=_interp_bf16(dy), **cfg)
    return out


def int8_fwd_config(M: int, arch: int = 90) -> dict:
    """Tiles of the int8 forward by M bucket (int8 tensor-core dots need K tiles >= 32).

    ``arch`` is the compute capability as major * 10 + minor.  Before Hopper
    (mma.sync, both operands through registers) the tiles above M = 16 take
    BLOCK_K = 64: 128 spills 8-40 B on sm_80; the lost K depth goes to a
    fourth pipeline stage.
    """
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    if arch < 90:
        cfg.update(BLOCK_K=64, num_stages=4)
    return cfg


def _arch(t: torch.Tensor) -> int:
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


_INTERP_INT8 = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2)


def sparse24_int8_linear(xq: torch.Tensor, x_scale: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                         w_scale: torch.Tensor, K: int, bias: torch.Tensor | None, out: torch.Tensor,
                         config: dict | None = None) -> torch.Tensor:
    """``out[M, N] = (xq @ Wq^T) * x_scale[:, None] * w_scale[None, :] (+ bias)``.

    ``xq`` int8 ``(M, K)`` (any strides), ``x_scale`` float32 ``(M,)``, ``values``
    int8 / ``meta`` uint8 of a :class:`~sparsekit.formats.sparse24.Sparse24Int8Weight`,
    ``w_scale`` float32 ``(N,)``; ``out`` preallocated (its dtype is the output's).
    """
    M = xq.shape[0]
    N = values.shape[0]
    KM = meta.shape[1]                  # metadata bytes per row (Kp / 8)
    if config is None:
        config = dict(_INTERP_INT8) if _interpreting(xq) else int8_fwd_config(M, _arch(xq))
    cfg = dict(config)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _sp24_int8_fwd[grid](xq, x_scale, values, meta, w_scale, bias if bias is not None else w_scale, out,
                         M, N, K, KM,
                         xq.stride(0), xq.stride(1), values.stride(0), meta.stride(0), out.stride(0), out.stride(1),
                         HAS_BIAS=bias is not None, INTERP_BF16=_interp_bf16(out), **cfg)
    return out
