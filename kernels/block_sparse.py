"""Triton kernels for block-sparse linear layers.

The weight arrives in sparsekit's BSR-like layout (see
``sparsekit.formats.block_sparse``): ``blocks`` ``(nnzb, BM, BK)`` (each block
contiguous), block-row pointers ``crow`` / block-columns ``col``, and the
block-column-major transpose ``tcol_ptr`` / ``trow`` / ``tblk``.  Every kernel
visits kept blocks only, so the work and the weight traffic scale with the
density.  All index handling is scalar loads and integer arithmetic, so the
same code runs under the Triton interpreter.

Kernels:
  * ``_bsr_fwd``: Y = X @ W^T (+ bias).  One program per (M tile, block-row),
                  looping over that row's kept blocks; optionally the row's
                  blocks are split over SPLIT programs that add fp32 partial
                  sums atomically (small M).
  * ``_bsr_dx``:  dX = dY @ W.  One program per (M tile, block-column),
                  looping over the column's kept blocks (transposed index).
  * ``_bsr_dw``:  dBlocks[b] = dY[:, rows(b)]^T @ X[:, cols(b)] for kept
                  blocks only.  One program per kept block (optionally split
                  over M with fp32 atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_out, dot_acc, grouped_tile


@triton.jit
def _add_bias(acc, B, offs_n, N, SWAP: tl.constexpr):
    """acc + bias[offs_n] along the output-feature axis (rows of acc when SWAP, columns otherwise)."""
    bias = tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    if SWAP:
        return acc + bias[:, None]
    else:
        return acc + bias[None, :]


@triton.jit
def _bsr_fwd(X, BLK, CROW, COL, B, Y,
             M, N, K, NB, NNZ,
             stride_xm, stride_xk, stride_ym, stride_yn,
             HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, INTERP_BF16: tl.constexpr,
             BLOCK_M: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
             SPLIT: tl.constexpr, GROUP_M: tl.constexpr, SWAP: tl.constexpr):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    # grouped order: GROUP_M consecutive M tiles walk the block-rows together
    pid_m, rb = grouped_tile(pid, num_m, NB, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = rb * BM + tl.arange(0, BM)
    offs_bm = tl.arange(0, BM)
    offs_bk = tl.arange(0, BK)
    m_ok = offs_m[:, None] < M
    # last line of defence (the index is validated when built / loaded): stay inside the blocks
    start = tl.minimum(tl.maximum(tl.load(CROW + rb), 0), NNZ)
    end = tl.minimum(tl.maximum(tl.load(CROW + rb + 1), start), NNZ)
    # SWAP: the transposed product acc_t(BM, BLOCK_M) = W_blk @ X_tile^T, so the block is the
    # tensor-core M side (wgmma needs M >= 64, N can be 8..256) and a small M tile the N side
    if SWAP:
        acc = tl.zeros((BM, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BM), dtype=tl.float32)
    # 64-bit block offset (walked by pointer increments): nnzb * BM * BK may exceed 2**31
    wp = BLK + (start + pid_s).to(tl.int64) * (BM * BK) + offs_bm[:, None] * BK + offs_bk[None, :]
    for i in range(start + pid_s, end, SPLIT):
        c = tl.load(COL + i)
        offs_k = c * BK + offs_bk
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok & (offs_k[None, :] >= 0) & (offs_k[None, :] < K), other=0.0)
        w = tl.load(wp)
        wp += SPLIT * BM * BK
        if SWAP:
            acc = dot_acc(w, tl.trans(x), acc, IEEE, INTERP_BF16)
        else:
            acc = dot_acc(x, tl.trans(w), acc, IEEE, INTERP_BF16)
    if SWAP:
        ymask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        yp = Y + offs_n[:, None] * stride_yn + offs_m[None, :] * stride_ym
    else:
        ymask = m_ok & (offs_n[None, :] < N)
        yp = Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if SPLIT == 1:
        if HAS_BIAS:
            acc = _add_bias(acc, B, offs_n, N, SWAP)
        tl.store(yp, cast_out(acc, Y.dtype.element_ty, INTERP_BF16), mask=ymask)
    else:
        if HAS_BIAS:
            if pid_s == 0:
                acc = _add_bias(acc, B, offs_n, N, SWAP)
        tl.atomic_add(yp, acc, mask=ymask)


@triton.jit
def _bsr_dx(DY, BLK, TPTR, TROW, TBLK, DX,
            M, N, K, NNZ,
            stride_dym, stride_dyn, stride_dxm, stride_dxk,
            IEEE: tl.constexpr, INTERP_BF16: tl.constexpr,
            BLOCK_M: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    cb = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = cb * BK + tl.arange(0, BK)
    offs_bm = tl.arange(0, BM)
    offs_bk = tl.arange(0, BK)
    m_ok = offs_m[:, None] < M
    start = tl.minimum(tl.maximum(tl.load(TPTR + cb), 0), NNZ)
    end = tl.minimum(tl.maximum(tl.load(TPTR + cb + 1), start), NNZ)
    acc = tl.zeros((BLOCK_M, BK), dtype=tl.float32)
    for j in range(start, end):
        r = tl.load(TROW + j)
        b = tl.load(TBLK + j)
        # a block-row / block id outside the weight contributes nothing (and reads nothing)
        ok = (r >= 0) & (r < (N + BM - 1) // BM) & (b >= 0) & (b < NNZ)
        b = tl.where(ok, b, 0)
        offs_n = tl.where(ok, r * BM, N) + offs_bm          # not ok: every row >= N, masked
        dy = tl.load(DY + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=m_ok & (offs_n[None, :] < N), other=0.0)
        w = tl.load(BLK + b.to(tl.int64) * (BM * BK) + offs_bm[:, None] * BK + offs_bk[None, :])
        acc = dot_acc(dy, w, acc, IEEE, INTERP_BF16)
    tl.store(DX + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
             cast_out(acc, DX.dtype.element_ty, INTERP_BF16), mask=m_ok & (offs_k[None, :] < K))


@triton.jit
def _bsr_dw(DY, X, TROW, TBLK, COL, DB,
            M, N, K, NNZ,
            stride_dym, stride_dyn, stride_xm, stride_xk,
            IEEE: tl.constexpr, INTERP_BF16: tl.constexpr,
            BLOCK_M: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr):
    # program j handles the j-th entry of the transposed index (block tblk[j]),
    # which gives its block-row directly
    j = tl.program_id(0)
    pid_s = tl.program_id(1)
    r = tl.load(TROW + j)
    b = tl.minimum(tl.maximum(tl.load(TBLK + j), 0), NNZ - 1)
    c = tl.load(COL + b)
    offs_n = r * BM + tl.arange(0, BM)
    offs_k = c * BK + tl.arange(0, BK)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    m_tiles = (M + BLOCK_M - 1) // BLOCK_M
    for mt in range(pid_s, m_tiles, SPLIT):
        offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        dyt = tl.load(DY + offs_n[:, None] * stride_dyn + offs_m[None, :] * stride_dym,
                      mask=(offs_n[:, None] >= 0) & (offs_n[:, None] < N) & (offs_m[None, :] < M), other=0.0)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] >= 0) & (offs_k[None, :] < K), other=0.0)
        acc = dot_acc(dyt, x, acc, IEEE, INTERP_BF16)
    offs_bm = tl.arange(0, BM)
    offs_bk = tl.arange(0, BK)
    dp = DB + b.to(tl.int64) * (BM * BK) + offs_bm[:, None] * BK + offs_bk[None, :]
    if SPLIT == 1:
        tl.store(dp, cast_out(acc, DB.dtype.element_ty, INTERP_BF16))
    else:
        tl.atomic_add(dp, acc)


# ----------------------------------------------------------------------------
# launch configuration

def _is_ieee(dtype: torch.dtype) -> bool:
    if dtype != torch.float32:
        return False
    return not torch.backends.cuda.matmul.allow_tf32


def _interpreting(t: torch.Tensor) -> bool:
    return not t.is_cuda


def _interp_bf16(t: torch.Tensor) -> bool:
    return _interpreting(t) and t.dtype == torch.bfloat16


def fwd_config(M: int, NB: int, nnzb: int, BM: int, BK: int, dtype: torch.dtype, num_sms: int = 132) -> dict:
    """Forward launch configuration by M bucket.

    Small M is memory bound on the blocks: a 16-row tile, and the row's
    blocks split over several programs (fp32 atomics) when the block-rows
    alone cannot fill the GPU.  Larger M uses taller tiles so each block is
    read once per BLOCK_M rows.  A tile shorter than 64 rows against blocks of
    64+ rows runs the transposed product (``SWAP``): the block is the
    tensor-core M side, so Hopper's wgmma serves M <= 16 straight from shared
    memory (no register copy of the block: few registers, high occupancy for
    the memory-bound small-M case), pipelined with the block loads.
    Full-precision fp32 (no TF32) keeps the untransposed FMA product.
    """
    if M <= 16:
        cfg = dict(BLOCK_M=16, GROUP_M=1, num_stages=4)
    elif M <= 64:
        cfg = dict(BLOCK_M=64, GROUP_M=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, GROUP_M=8, num_stages=3)
    # keep the register tile and the staged loads within budget for big blocks: fewer stages (down
    # to 3), a shorter M tile (down to 32 rows: each block is read once per tile), 2 stages, 16 rows.
    # Full-precision fp32 FMAs hold their operands in registers: their M tile shrinks first.
    itemsize = torch.empty((), dtype=dtype).element_size()
    ieee = _is_ieee(dtype)

    def staged():
        return cfg["num_stages"] * (cfg["BLOCK_M"] + BM) * BK * itemsize > 160 * 1024

    while cfg["num_stages"] > 3 and staged():
        cfg["num_stages"] -= 1
    while cfg["BLOCK_M"] > 16 and (cfg["BLOCK_M"] * BM > 128 * 128 or
                                   (staged() and (ieee or cfg["BLOCK_M"] > 32))):
        cfg["BLOCK_M"] //= 2
    while cfg["num_stages"] > 2 and staged():
        cfg["num_stages"] -= 1
    while cfg["BLOCK_M"] > 16 and staged():
        cfg["BLOCK_M"] //= 2
    if ieee:
        cfg["num_warps"] = 8 if M > 64 and BM * BK >= 64 * 64 else 4
    else:
        # 8 warps from a 64 x 128 fp32 accumulator up (64 registers a thread)
        cfg["num_warps"] = 8 if cfg["BLOCK_M"] * BM >= 64 * 128 else 4
    cfg["SWAP"] = cfg["BLOCK_M"] < 64 and BM >= 64 and not ieee
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * max(NB, 1)
    per_row = nnzb / max(NB, 1)
    split = 1
    if M <= 64:
        while tiles * split < num_sms and split * 2 <= per_row / 2 and split < 16:
            split *= 2
    cfg["SPLIT"] = split
    return cfg


_INTERP_FWD = dict(BLOCK_M=16, GROUP_M=2, SPLIT=1)


def block_sparse_linear(x: torch.Tensor, blocks: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                        N: int, K: int, bias: torch.Tensor | None, out: torch.Tensor,
                        config: dict | None = None) -> torch.Tensor:
    """``out[M, N] = x[M, K] @ W^T (+ bias)``; x 2-D (any strides), out preallocated."""
    M = x.shape[0]
    nnzb, BM, BK = blocks.shape
    NB = crow.shape[0] - 1
    if config is None:
        if _interpreting(x):
            config = dict(_INTERP_FWD)
        else:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            config = fwd_config(M, NB, nnzb, BM, BK, x.dtype, sms)
    cfg = dict(config)
    split = cfg.pop("SPLIT", 1)
    cfg.setdefault("SWAP", False)
    target = out if split == 1 else torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * NB, split)
    _bsr_fwd[grid](x, blocks, crow, col, bias if bias is not None else blocks, target,
                   M, N, K, NB, nnzb,
                   x.stride(0), x.stride(1), target.stride(0), target.stride(1),
                   HAS_BIAS=bias is not None, IEEE=_is_ieee(x.dtype), INTERP_BF16=_interp_bf16(x),
                   BM=BM, BK=BK, SPLIT=split, **cfg)
    if split != 1:
        out.copy_(target)
    return out


def dx_config(M: int, BM: int, BK: int, dtype: torch.dtype) -> dict:
    """Launch configuration of ``dX = dY @ W`` by M bucket.

    fp32 holds more in registers than fp16 / bf16: 2 stages for 128 x 128
    blocks, 8 warps for wide tiles; full-precision FMAs keep both operands in
    registers, so a 128-column block gets a 32-row tile there.
    """
    fp32 = dtype == torch.float32
    stages = 2 if fp32 and BM * BK >= 128 * 128 else None
    if M <= 16:
        return dict(BLOCK_M=16, num_warps=4, num_stages=4)
    if BK >= 128 and _is_ieee(dtype):
        return dict(BLOCK_M=32, num_warps=8, num_stages=stages or 3)
    if M <= 64:
        return dict(BLOCK_M=64, num_warps=8 if fp32 and BK >= 128 else 4, num_stages=stages or 4)
    block_m = 128 if BM * BK <= 64 * 64 else 64
    return dict(BLOCK_M=block_m, num_warps=8 if BK >= 64 or (fp32 and block_m * BK >= 128 * 32) else 4,
                num_stages=stages or 3)


def block_sparse_grad_input(dy: torch.Tensor, blocks: torch.Tensor, tcol_ptr: torch.Tensor, trow: torch.Tensor,
                            tblk: torch.Tensor, K: int, out: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """``out[M, K] = dy[M, N] @ W``."""
    M, N = dy.shape
    nnzb, BM, BK = blocks.shape
    KB = tcol_ptr.shape[0] - 1
    if config is None:
        config = dict(BLOCK_M=16) if _interpreting(dy) else dx_config(M, BM, BK, dy.dtype)
    grid = (triton.cdiv(M, config["BLOCK_M"]), KB)
    _bsr_dx[grid](dy, blocks, tcol_ptr, trow, tblk, out, M, N, K, nnzb,
                  dy.stride(0), dy.stride(1), out.stride(0), out.stride(1),
                  IEEE=_is_ieee(dy.dtype), INTERP_BF16=_interp_bf16(dy), BM=BM, BK=BK, **config)
    return out


def block_sparse_grad_blocks(dy: torch.Tensor, x: torch.Tensor, col: torch.Tensor, trow: torch.Tensor,
                             tblk: torch.Tensor, N: int, K: int, out: torch.Tensor,
                             config: dict | None = None) -> torch.Tensor:
    """``out[b] = dy[:, rows(b)]^T @ x[:, cols(b)]`` for every kept block ``b``; out ``(nnzb, BM, BK)``."""
    M = dy.shape[0]
    nnzb, BM, BK = out.shape
    if config is None:
        if _interpreting(dy):
            config = dict(BLOCK_M=16, SPLIT=1)
        else:
            sms = torch.cuda.get_device_properties(dy.device).multi_processor_count
            # fp32 FMAs (no TF32) hold a 128 x 128 block's accumulator and operands in registers: 8 warps
            config = dict(BLOCK_M=64 if dy.dtype != torch.float32 else 32,
                          num_warps=8 if _is_ieee(dy.dtype) and BM * BK >= 128 * 128 else 4, num_stages=3)
            m_tiles = triton.cdiv(M, config["BLOCK_M"])
            split = 1
            # few blocks and a long M: spread M over programs too
            while nnzb * split < 2 * sms and split * 2 <= m_tiles // 8 and split < 32:
                split *= 2
            config["SPLIT"] = split
    cfg = dict(config)
    split = cfg.pop("SPLIT", 1)
    target = out if split == 1 else torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    _bsr_dw[(nnzb, split)](dy, x, trow, tblk, col, target, M, N, K, nnzb,
                           dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
                           IEEE=_is_ieee(dy.dtype), INTERP_BF16=_interp_bf16(dy), BM=BM, BK=BK, SPLIT=split, **cfg)
    if split != 1:
        out.copy_(target)
    return out
