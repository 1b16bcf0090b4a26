"""CPU emulator of the csrc ``mma.sp`` 2:4 GEMM's warp-level data flow.

No GPU can check the CUDA kernel (``csrc/sparse24/sparse24_mma_sp.cu``) where
sparsekit is developed, so this module replays, in float64 torch ops, exactly
what each of the 32 lanes of a warp loads and what the sparse tensor-core
instruction does with it, following the PTX ISA's description of

* ``ldmatrix.sync.aligned.m8n8.x4.shared.b16``: matrix ``j`` of an ``.x4`` load
  takes its 8 row addresses from lanes ``8j .. 8j+7``; lane ``i`` receives, in
  its register ``j``, 32-bit word ``i % 4`` of row ``i // 4`` of matrix ``j``;
* ``mma.sp.sync.aligned.m16n8k32.row.col.f32.{f16,bf16}`` and
  ``mma.sp.sync.aligned.m16n8k64.row.col.s32.s8.s8.s32``: the fragment layouts
  of the compressed A (16 x K/2), the dense B (K x 8) and the accumulators, and
  the sparsity metadata (which lane supplies which 4-bit group code, chosen by
  the sparsity selector).

The kernel computes ``y^T = W x^T``: the 2:4 weight ``W`` (N x K) is the
sparse A operand (its rows are the instruction's M), the activations ``x``
(M x K, row-major) are B in the ``.col`` layout.  Every index formula the
kernel uses is a named function here (``a_ldsm_row`` ...) and the kernel
carries the same formula next to a comment naming it, so the test of this
emulator against dense math (``tests/test_sparse24_mma.py``) checks the
kernel's indexing: the metadata reorder of :func:`~sparsekit.formats.sparse24.mma_sp_meta`,
the ldmatrix addressing, the selector per k-step, the epilogue's mapping of
accumulator registers to ``y[m, n]``, and the zero padding of odd N/K/M.

What it cannot check is whether the hardware follows the PTX documentation as
read here (``mma_sp`` below states the reading); the GPU tests do that.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..formats.sparse24 import MMA_K_WINDOW, Sparse24Int8Weight, Sparse24Weight, mma_padded_k, mma_sp_meta

__all__ = ["KINDS", "a_ldsm_row", "a_ldsm_chunk", "b_ldsm_row", "b_ldsm_chunk", "ldmatrix_x4", "mma_sp",
           "step_selector", "epilogue_coords", "emulate_sparse24_gemm", "emulate_sparse24_linear",
           "emulate_sparse24_int8_linear"]

LANES = 32
# kind -> (elements per 32-bit word, dense K of one mma, dense K per pipeline stage)
KINDS = {"f16": (2, 32, 64), "s8": (4, 64, 128)}


def _lanes() -> torch.Tensor:
    return torch.arange(LANES)


# ------------------------------------------------------------------ kernel index formulas
# (csrc/sparse24/sparse24_mma_sp.cu uses the same expressions; see the comments there)

def a_ldsm_row(lane: torch.Tensor) -> torch.Tensor:
    """Row (within the 16-row weight tile) whose address lane ``lane`` gives to ldmatrix.x4 for A."""
    return (lane & 7) + ((lane >> 3) & 1) * 8


def a_ldsm_chunk(lane: torch.Tensor) -> torch.Tensor:
    """16-byte chunk (0 or 1) of the step's 32 compressed bytes per row that lane ``lane`` addresses for A."""
    return lane >> 4


def b_ldsm_row(lane: torch.Tensor) -> torch.Tensor:
    """Row of x (within the 8-row tile) whose address lane ``lane`` gives to ldmatrix.x4 for B."""
    return lane & 7


def b_ldsm_chunk(lane: torch.Tensor) -> torch.Tensor:
    """16-byte chunk (0..3) of the step's 64 bytes of an x row that lane ``lane`` addresses for B."""
    return lane >> 3


def step_selector(kind: str, k_dense: int) -> tuple[int, int]:
    """(metadata window, sparsity selector) of the mma step starting at dense column ``k_dense``."""
    w = k_dense // MMA_K_WINDOW
    if kind == "f16":  # two k32 steps per window: selector 0 (lanes t=0,1), then 1 (t=2,3)
        return w, (k_dense % MMA_K_WINDOW) // 32
    return w, 0        # s8: one k64 step per window, every lane supplies metadata


def epilogue_coords(lane: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row of W = output feature n, column of B = token m) of accumulator register ``i`` in ``lane``."""
    g, t = lane >> 2, lane & 3
    return g + 8 * (i >> 1), 2 * t + (i & 1)


# ------------------------------------------------------------------ instructions

def ldmatrix_x4(tile: torch.Tensor, rows: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
    """``ldmatrix.x4`` from ``tile`` (``(..., R, C, E)``: rows of 32-bit words of E elements).

    ``rows[l]``/``chunks[l]`` is the row / 16-byte chunk lane ``l`` addresses.
    Returns ``(..., 32, 4, E)``: lane ``i``'s register ``j`` is word ``i % 4``
    of chunk ``chunks[8j + i//4]`` of row ``rows[8j + i//4]``.
    """
    lane = _lanes()
    j = torch.arange(4)
    src = 8 * j[None, :] + (lane[:, None] >> 2)          # (32, 4): the lane whose address feeds (i, j)
    r = rows[src]
    wcol = chunks[src] * 4 + (lane[:, None] & 3)
    return tile[..., r, wcol, :]


def mma_sp(a: torch.Tensor, b: torch.Tensor, e: torch.Tensor, kind: str, selector: int) -> torch.Tensor:
    """The sparse MMA as the PTX ISA describes it, on per-lane fragments.

    ``a``: ``(..., 32, 4, E)`` compressed-A registers; ``b``: ``(..., 32, 4, E)``
    B registers; ``e``: ``(..., 32)`` metadata words (int64 bit patterns).
    Returns the D fragments ``(..., 32, 4)`` (float64) of ``D = A_dense @ B``.

    Reading of the PTX ISA used (g = lane >> 2, t = lane & 3, E = elements per
    register: 2 for f16/bf16, 4 for s8; CK = compressed K = 16 or 32):

    * A register ``j`` element ``x``: row ``g + 8 (j % 2)``, compressed column
      ``E t + x + (CK/2) (j // 2)``;
    * B register ``j`` element ``x``: row (k) ``E t + x + 4 E j``, column ``g``;
    * D register ``i``: row ``g + 8 (i // 2)``, column ``2 t + i % 2``;
    * metadata of row ``r``'s 4-column group ``c`` (of CK/2): 4 bits at bit
      ``16 (r // 8) + 4 (c % 4)`` of the word of lane ``4 (r % 8) + s + c // 4``,
      ``s = 2 * selector`` for f16/bf16 (selector 0: lanes t = 0, 1; selector 1:
      t = 2, 3) and ``s = 0`` for s8 (all four lanes, selector 0); the code is
      ``i0 | i1 << 2``: the group's two stored values sit at dense columns
      ``4c + i0`` and ``4c + i1`` (equal indices are undefined behaviour).
    """
    E, kstep, _ = KINDS[kind]
    ck = kstep // 2
    lead = a.shape[:-3]
    lane = _lanes()
    g, t = lane >> 2, lane & 3
    # compressed A (16 x CK) from the registers
    ac = torch.zeros(*lead, 16, ck, dtype=torch.float64)
    for j in range(4):
        for x in range(E):
            rows = g + 8 * (j % 2)
            cols = E * t + x + (ck // 2) * (j // 2)
            ac[..., rows, cols] = a[..., :, j, x].to(torch.float64)
    # decode the metadata into dense A (16 x kstep)
    r = torch.arange(16)[:, None]
    c = torch.arange(ck // 2)[None, :]
    s = 2 * selector if kind == "f16" else 0
    holder = 4 * (r % 8) + s + c // 4                       # (16, CK/2)
    shift = 16 * (r // 8) + 4 * (c % 4)
    words = e[..., holder.reshape(-1)].reshape(*lead, 16, ck // 2)
    code = (words >> shift) & 0xF
    i0, i1 = code & 3, code >> 2
    if bool((i0 == i1).any()):
        raise ValueError("invalid metadata code (equal indices): undefined behaviour on the hardware")
    dense = torch.zeros(*lead, 16, kstep, dtype=torch.float64)
    dense.scatter_(-1, 4 * c + i0, ac[..., 0::2])
    dense.scatter_(-1, 4 * c + i1, ac[..., 1::2])
    # dense B (kstep x 8) from the registers
    bd = torch.zeros(*b.shape[:-3], kstep, 8, dtype=torch.float64)
    for j in range(4):
        for x in range(E):
            bd[..., E * t + x + 4 * E * j, g] = b[..., :, j, x].to(torch.float64)
    dmat = dense @ bd                                        # (..., 16, 8)
    out = []
    for i in range(4):
        rr, cc = epilogue_coords(lane, i)
        out.append(dmat[..., rr, cc])
    return torch.stack(out, dim=-1)


# ------------------------------------------------------------------ the GEMM

def emulate_sparse24_gemm(values: torch.Tensor, meta_words: torch.Tensor, x: torch.Tensor, n: int, k: int,
                          kind: str) -> torch.Tensor:
    """Raw accumulators ``acc[m, n] = sum_k x[m, k] W[n, k]`` (float64) the way the kernel forms them.

    ``values``: the weight's ``(N, Kp/2)`` stored values (float or int8);
    ``meta_words``: :func:`mma_sp_meta` output; ``x``: ``(M, K)``.
    The kernel's global -> shared copies are 16-byte chunks with zero fill
    outside the operands (rows >= N or >= M, columns >= K), so the emulated
    shared-memory tiles are the zero-padded operands; then every k-step of
    every (16-row weight tile, 8-row x tile) goes through ``ldmatrix_x4`` with
    the kernel's lane addresses and through ``mma_sp`` with the metadata word
    and selector the kernel passes.
    """
    E, kstep, kstage = KINDS[kind]
    m = x.shape[0]
    nt, kw = meta_words.shape[0], meta_words.shape[1]
    kpad = kw * MMA_K_WINDOW
    if kpad != mma_padded_k(max(k, 1), kstage):
        raise ValueError(f"meta_words covers K={kpad}; kind {kind!r} pads K={k} to {mma_padded_k(max(k, 1), kstage)}")
    mt = (m + 7) // 8
    a_g = torch.zeros(nt * 16, kpad // 2, dtype=torch.float64)
    a_g[:n, : values.shape[1]] = values.to(torch.float64)
    x_g = torch.zeros(mt * 8, kpad, dtype=torch.float64)
    x_g[:m, :k] = x.to(torch.float64)
    lane = _lanes()
    ck = kstep // 2
    acc = torch.zeros(nt, mt, LANES, 4, dtype=torch.float64)
    words = meta_words.to(torch.int64) & 0xFFFFFFFF
    for kb in range(0, kpad, kstep):
        # shared-memory tiles of this k-step, as rows of 32-bit words
        a_tile = a_g[:, kb // 2: kb // 2 + ck].reshape(nt, 16, ck // E, E)        # 32 bytes per row
        x_tile = x_g[:, kb: kb + kstep].reshape(mt, 8, kstep // E, E)             # 64 bytes per row
        a_regs = ldmatrix_x4(a_tile, a_ldsm_row(lane), a_ldsm_chunk(lane))       # (nt, 32, 4, E)
        b_regs = ldmatrix_x4(x_tile, b_ldsm_row(lane), b_ldsm_chunk(lane))       # (mt, 32, 4, E)
        w, sel = step_selector(kind, kb)
        e = words[:, w, :]                                                        # (nt, 32)
        acc += mma_sp(a_regs[:, None], b_regs[None, :], e[:, None], kind, sel)
    # epilogue: register i of lane l of tile (T, U) -> y[8U + col, 16T + row]
    y = torch.zeros(mt * 8, nt * 16, dtype=torch.float64)
    tiles_n = torch.arange(nt)[:, None, None]
    tiles_m = torch.arange(mt)[None, :, None]
    for i in range(4):
        rr, cc = epilogue_coords(lane, i)
        y[(8 * tiles_m + cc).expand(nt, mt, LANES), (16 * tiles_n + rr).expand(nt, mt, LANES)] = acc[..., i]
    return y[:m, :n]


def emulate_sparse24_linear(x: torch.Tensor, weight: Sparse24Weight, bias: Optional[torch.Tensor] = None,
                            meta_words: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fp16/bf16 kernel's result in float64 (before its single rounding to the output dtype)."""
    n, k = weight.shape
    if meta_words is None:
        meta_words = mma_sp_meta(weight.meta, k, KINDS["f16"][2])
    y = emulate_sparse24_gemm(weight.values, meta_words, x.reshape(-1, k), n, k, "f16")
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.reshape(*x.shape[:-1], n)


def emulate_sparse24_int8_linear(xq: torch.Tensor, x_scale: torch.Tensor, weight: Sparse24Int8Weight,
                                 bias: Optional[torch.Tensor] = None,
                                 meta_words: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32-exact accumulators, epilogue ``acc * x_scale[m] * w_scale[n] (+ bias)``) of the s8 kernel."""
    n, k = weight.shape
    if meta_words is None:
        meta_words = mma_sp_meta(weight.meta, k, KINDS["s8"][2])
    acc = emulate_sparse24_gemm(weight.values, meta_words, xq.reshape(-1, k), n, k, "s8")
    y = acc * x_scale.reshape(-1, 1).to(torch.float64) * weight.scale.to(torch.float64)[None, :]
    if bias is not None:
        y = y + bias.to(torch.float64)
    return acc.reshape(*xq.shape[:-1], n), y.reshape(*xq.shape[:-1], n)
