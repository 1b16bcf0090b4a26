"""Triton kernel for 2:4 sparse weights whose kept values are int4 codes.

The weight (see ``sparsekit.formats.sparse24_int4``) is a 2:4 weight in the
``Sparse24Weight`` layout -- kept values ``(N, Kp/2)`` plus 4-bit-per-group
``meta`` -- whose values matrix is itself stored as a group-wise int4 weight
(``Int4Weight`` layout along the compressed axis: ``qweight (N, Kp/16)`` int32,
``scales`` / ``zeros`` ``(N, Gc)``).  Bytes per dense weight element: 1/4 for
the codes + 1/16 for the metadata + the scales, i.e. ~3.2x fewer than a dense
fp16 weight at group 64 (int4 alone: ~3.6x fewer; 2:4 alone: ~1.8x).

Per K tile of ``BLOCK_K`` dense columns a program

1. dequantizes the ``BLOCK_K/2`` compressed columns of its ``BLOCK_N`` rows in
   registers with the W4A16 kernel's bit tricks (``kernels/int4.py``
   ``_dequant_tile``: two codes per 32-bit op, magic-exponent conversion,
   bit-exact with ``Int4Weight.dequantize``),
2. places each value pair at its two decoded positions of its group of 4
   (``kernels/sparse24.py`` ``_group_codes``: two selects per element), and
3. feeds the dense ``(BLOCK_N, BLOCK_K)`` tile to ``tl.dot`` (fp32 accumulation).

Split-K (fp32 atomics) for small M, grouped tile order otherwise -- the
W4A16 kernel's launch heuristics applied to the compressed K.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_acc, grouped_tile, store_tile
from .int4 import _dequant_tile, check_config, fwd_config as _int4_fwd_config, tile_groups
from .sparse24 import _group_codes


@triton.jit
def _sp24q_fwd(X, Q, S, Z, MT, B, Y,
               M, N, K, KC, KM, GC, GS,
               stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, stride_mn, stride_ym, stride_yn,
               HAS_BIAS: tl.constexpr, SYMMETRIC: tl.constexpr, IS_BF16: tl.constexpr, INTERP_BF16: tl.constexpr,
               INTERP_BF16_X: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_GROUPS: tl.constexpr,
               SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    # K: dense columns of x; KC = Kp / 2 compressed columns; KM = Kp / 8 metadata bytes per row; GC scale groups
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m, pid_n = grouped_tile(pid, num_m, num_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    BLOCK_KC: tl.constexpr = BLOCK_K // 2
    BLOCK_G: tl.constexpr = BLOCK_K // 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_tiles = (2 * KC + BLOCK_K - 1) // BLOCK_K
    for kt in range(pid_k, k_tiles, SPLIT_K):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        v = _dequant_tile(Q, S, Z, offs_n, kt * BLOCK_KC, N, KC, GC, GS, stride_qn, stride_sn, stride_zn,
                          SYMMETRIC, IS_BF16, INTERP_BF16, BLOCK_N, BLOCK_KC, TILE_GROUPS)
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_G, 2)))
        i0, i1 = _group_codes(MT, offs_n, kt, stride_mn, N, KM, BLOCK_N, BLOCK_G)
        c = tl.arange(0, 4)[None, None, :]
        zero = tl.zeros((BLOCK_N, BLOCK_G, 4), dtype=v0.dtype)
        w3 = tl.where(c == i0[:, :, None], v0[:, :, None], tl.where(c == i1[:, :, None], v1[:, :, None], zero))
        w = tl.reshape(w3, (BLOCK_N, BLOCK_K)).to(x.dtype)   # fp32 activations: exact widening
        acc = dot_acc(x, tl.trans(w), acc, IEEE, INTERP_BF16_X)
    store_tile(acc, Y, B, offs_m, offs_n, M, N, stride_ym, stride_yn, pid_k, HAS_BIAS, SPLIT_K, INTERP_BF16_X)


# ----------------------------------------------------------------------------
# launch configuration

def fwd_config(M: int, N: int, K: int, group_size: int, num_sms: int = 132) -> dict:
    """Tile configuration by bucketed M, N, K (dense columns) and the compressed group size.

    The W4A16 heuristics on the compressed K (``K / 2`` columns of codes per
    row), with BLOCK_K counted in dense columns (twice the compressed tile).
    The dequantized and expanded ``(BLOCK_N, BLOCK_K)`` weight tile lives in
    registers next to the accumulator, so the tiles are capped where they
    would spill (triton 3.6, sm_90 and sm_80): M <= 16 takes BLOCK_K = 128
    (256 spills 56-2664 B), M <= 64 keeps 64x64x128 on 8 warps (4 warps spill
    8-16 B), larger M takes 128x128x64 with a fourth pipeline stage (BLOCK_K =
    128 spills 88-368 B).
    """
    cfg = _int4_fwd_config(M, N, max(K // 2, 1), group_size, num_sms)
    cfg["BLOCK_K"] = max(2 * cfg["BLOCK_K"], 32)
    if M <= 16:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 128)
    elif M <= 64:
        cfg["num_warps"] = 8
    else:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 64)
        cfg["num_stages"] = 4
    return cfg


_INTERP_FWD = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, SPLIT_K=1)


def _interpreting(t: torch.Tensor) -> bool:
    return not t.is_cuda
_LAUNCH_ONLY = ("num_warps", "num_stages")


def _fit_block_k(cfg: dict, group_size: int, GC: int) -> None:
    """Shrink/grow BLOCK_K (dense) until its compressed half is compatible with the group size."""
    bk = cfg["BLOCK_K"]
    while bk > 32:
        try:
            tile_groups(bk // 2, group_size, GC)
            break
        except ValueError:
            bk //= 2
    cfg["BLOCK_K"] = bk


def sparse24_int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                         meta: torch.Tensor, group_size: int, K: int, bias: torch.Tensor | None, out: torch.Tensor,
                         config: dict | None = None) -> torch.Tensor:
    """``out[M, N] = x[M, K] @ W^T (+ bias)`` for the 2:4 + int4 weight; x 2-D (any strides), out preallocated.

    x is in the scale dtype (float16/bfloat16) or float32 (the dequantized
    tile is widened exactly; fp32 dot in full precision).

    ``qweight (N, KC/8)``, ``scales``/``zeros (N, GC)`` quantize the compressed
    values ``(N, KC)`` along KC with ``group_size``; ``meta (N, KC/4)`` uint8.
    """
    M = x.shape[0]
    N = qweight.shape[0]
    KC = qweight.shape[1] * 8
    GC = scales.shape[1]
    KM = meta.shape[1]                  # metadata bytes per row (KC / 4)
    interp = _interpreting(x)
    if config is None:
        if interp:
            config = dict(_INTERP_FWD)
        else:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            config = fwd_config(M, N, K, group_size, sms)
        _fit_block_k(config, group_size, GC)
    cfg = dict(config)
    if interp:
        for key in _LAUNCH_ONLY:
            cfg.pop(key, None)
    bk = cfg["BLOCK_K"]
    if bk < 32 or bk & (bk - 1):
        raise ValueError(f"BLOCK_K must be a power of two >= 32 (dense columns), got {bk}")
    check_config(dict(cfg, BLOCK_K=bk // 2), group_size, GC)
    tg = tile_groups(bk // 2, group_size, GC)
    split = cfg.pop("SPLIT_K", 1)
    target = out if split == 1 else torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split)
    z = zeros if zeros is not None else scales
    _sp24q_fwd[grid](x, qweight, scales, z, meta, bias if bias is not None else scales, target,
                     M, N, K, KC, KM, GC, group_size,
                     x.stride(0), x.stride(1), qweight.stride(0), scales.stride(0), z.stride(0), meta.stride(0),
                     target.stride(0), target.stride(1),
                     HAS_BIAS=bias is not None, SYMMETRIC=zeros is None, IS_BF16=scales.dtype == torch.bfloat16,
                     INTERP_BF16=interp and scales.dtype == torch.bfloat16,
                     INTERP_BF16_X=interp and x.dtype == torch.bfloat16, IEEE=x.dtype == torch.float32, TILE_GROUPS=tg, SPLIT_K=split, **cfg)
    if split != 1:
        out.copy_(target)
    return out
