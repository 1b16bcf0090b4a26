"""Triton kernel for DraftAttention: block-sparse flash attention through a token permutation.

Tokens of a video latent (``frames x height x width``, plus optional text
tokens) are grouped into *blocks*: one block per pooled patch
(``pool_h x pool_w`` tokens of one frame) and ``ceil(text / BLOCK_T)`` text
blocks.  ``slot_token`` (``n_blocks * BLOCK_T`` int32, built once per geometry
by :mod:`sparsekit.ops.draft_attention`) says which original token sits in
each slot of the reordered sequence, ``-1`` for a padding slot (a partial
patch at the right/bottom edge, a pool whose size is not a power of two, the
last text block).

The kernel never materializes the reordered Q/K/V: every program gathers its
query rows, and each key/value block it visits, straight from the original
``(B, H, S, D)`` tensors through ``slot_token`` (rows of ``D`` contiguous
elements, so the loads stay coalesced), and scatters its output rows back to
their original positions.  Padding slots are masked: their keys get a score of
``-inf`` and their query rows are not stored.

Which key blocks a query block visits comes from ``kv_idx`` / ``kv_cnt``
(``(B, H, n_blocks, n_blocks)`` / ``(B, H, n_blocks)`` int32: the kept block
ids of each row, ascending, then anything).  Every row keeps its own block, and
every block holds at least one real token, so no softmax row is empty.  The
query blocks of a head are launched in ``ROW_ORDER`` (by default most kept
blocks first: longest-job-first, so a dense text row or a "sink" row does not
become the tail of the launch).

Math: FlashAttention-2 style online softmax in fp32 (``exp2`` with the scale
folded into ``log2(e)``), ``P`` rounded to the value dtype before ``P @ V``,
fp32 accumulator, one division at the end.  Inputs fp16 / bf16 or fp32 (TF32
products when ``torch.backends.cuda.matmul.allow_tf32`` is set, full-precision
fp32 otherwise, PyTorch's default), head dims 64, 128 and 256.

Pipelining (Hopper): Q K^T and P V run on wgmma with K / V gathered by
cp.async.  The softmax consumes Q K^T in the same step, so Triton waits for all
wgmma there; P V is issued asynchronously and stays in flight across the loop
back-edge, over the next step's index loads, K / V copies and Q K^T issue.

Interpreter launches (``INTERP_BF16``) work around the interpreter's bf16
``tl.dot`` and truncating casts inline, the same way ``_common.dot_acc`` /
``cast_out`` do; the kernel calls no sparsekit ``@triton.jit`` helper, so it is
unaffected by which mode ``_common`` was first imported in.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

HEAD_DIMS = (64, 128, 256)          # the tuned head dims (tile width = head dim)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def check_head_dim(d: int) -> None:
    """Any multiple of 8 in [16, 256]: other dims than 16/32/64/128/256 run on the next power-of-two tile
    width with the extra columns masked (no copies of q/k/v)."""
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and d % 8 == 0):
        raise ValueError(f"head dim {d} is not supported: it must be a multiple of 8 in "
                         f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")


def tile_dim(d: int) -> int:
    """The kernel's tile width for head dim ``d``: the next power of two (at least 16)."""
    t = 16
    while t < d:
        t *= 2
    return t
LOG2E = 1.4426950408889634


@triton.jit
def _bsa_fwd(Q, K, V, O, SLOT, KV_IDX, KV_CNT, ROW_ORDER,
             H, NB, qk_scale,
             sqb, sqh, sqs, sqd, skb, skh, sks, skd,
             svb, svh, svs, svd, sob, soh, sos, sod,
             sib, sih, sir,
             HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             EVEN: tl.constexpr, IEEE: tl.constexpr, INTERP_BF16: tl.constexpr, D_TILE: tl.constexpr):
    # program (rank of the query block, sub-tile of BLOCK_M rows; batch*head).  The
    # query blocks of a head run in ROW_ORDER (most kept key blocks first), so
    # the long rows start early instead of forming a tail.
    SUB_M: tl.constexpr = BLOCK_T // BLOCK_M
    SUB_N: tl.constexpr = BLOCK_T // BLOCK_N
    # D_TILE > HEAD_DIM: the columns past the head dim are masked (zeros in q/k/v, not stored)
    DPAD: tl.constexpr = D_TILE != HEAD_DIM
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    sm = pid % SUB_M
    b = bh // H
    h = bh % H
    row0 = bh.to(tl.int64) * NB                       # ROW_ORDER / KV_CNT are contiguous (B, H, NB)
    qb = tl.load(ROW_ORDER + row0 + pid // SUB_M)

    offs_d = tl.arange(0, D_TILE)
    d_ok = offs_d < HEAD_DIM
    slots_m = qb * BLOCK_T + sm * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_m = tl.load(SLOT + slots_m)
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    q_ptrs = q_base + tok_m.to(tl.int64)[:, None] * sqs + offs_d[None, :] * sqd
    if DPAD:
        q = tl.load(q_ptrs, mask=(tok_m >= 0)[:, None] & d_ok[None, :], other=0.0)
    elif EVEN:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=(tok_m >= 0)[:, None], other=0.0)
    if INTERP_BF16:
        q = q.to(tl.float32)

    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    idx_base = KV_IDX + b.to(tl.int64) * sib + h.to(tl.int64) * sih + qb.to(tl.int64) * sir
    cnt = tl.load(KV_CNT + row0 + qb)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_TILE), tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    # one flat loop over (kept block, BLOCK_N sub-tile) so the loads pipeline
    for it in range(0, cnt * SUB_N):
        kb = tl.load(idx_base + it // SUB_N)
        slots_n = kb * BLOCK_T + (it % SUB_N) * BLOCK_N + offs_n
        tok_n = tl.load(SLOT + slots_n)
        tn = tok_n.to(tl.int64)
        k_ptrs = k_base + tn[None, :] * sks + offs_d[:, None] * skd
        v_ptrs = v_base + tn[:, None] * svs + offs_d[None, :] * svd
        if DPAD:
            kt = tl.load(k_ptrs, mask=(tok_n >= 0)[None, :] & d_ok[:, None], other=0.0)
        elif EVEN:
            kt = tl.load(k_ptrs)
        else:
            kt = tl.load(k_ptrs, mask=(tok_n >= 0)[None, :], other=0.0)
        if INTERP_BF16:
            kt = kt.to(tl.float32)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, kt) * qk_scale
        if not EVEN:
            s = tl.where((tok_n >= 0)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DPAD:
            v = tl.load(v_ptrs, mask=(tok_n >= 0)[:, None] & d_ok[None, :], other=0.0)
        elif EVEN:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=(tok_n >= 0)[:, None], other=0.0)
        if INTERP_BF16:
            # the interpreter's bf16 dot is wrong and its casts truncate: round
            # P to bf16 by hand (as cast_out does), multiply in fp32 (exact)
            pb = p.to(tl.uint32, bitcast=True)
            pb = (pb + 0x7FFF + ((pb >> 16) & 1)) & 0xFFFF0000
            acc = tl.dot(pb.to(tl.float32, bitcast=True), v.to(tl.float32), acc)
        elif IEEE:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(V.dtype.element_ty), v, acc)
        m_i = m_new

    out = acc / l_i[:, None]
    if INTERP_BF16:
        # round to nearest even by hand (the interpreter truncates fp32 -> bf16), as _common.cast_out
        ob = out.to(tl.uint32, bitcast=True)
        ob = ob + 0x7FFF + ((ob >> 16) & 1)
        res = (ob >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        res = out.to(O.dtype.element_ty)
    o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + tok_m.to(tl.int64)[:, None] * sos \
        + offs_d[None, :] * sod
    if DPAD:
        tl.store(o_ptrs, res, mask=(tok_m >= 0)[:, None] & d_ok[None, :])
    elif EVEN:
        tl.store(o_ptrs, res)
    else:
        tl.store(o_ptrs, res, mask=(tok_m >= 0)[:, None])


# ----------------------------------------------------------------------------
# launch configuration

def _interpreting(t: torch.Tensor) -> bool:
    return not t.is_cuda


def _is_ieee(dtype: torch.dtype) -> bool:
    """Full-precision fp32 products: fp32 without ``torch.backends.cuda.matmul.allow_tf32`` (as the linear kernels)."""
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def fwd_config(head_dim: int, block_t: int, dtype: torch.dtype, ieee: bool | None = None,
               real_dim: int | None = None) -> dict:
    """Tile configuration for the GPU.

    BLOCK_M query rows per program (a divisor of the block, so a 128-token
    patch gives one or two programs) and BLOCK_N keys per inner step, 8 warps
    (two warpgroups share the rows: half the registers of one warpgroup
    holding 128 rows).  D=256 halves both to stay within registers / shared
    memory.  fp32 follows ``torch.backends.cuda.matmul.allow_tf32`` (``ieee``
    = not allowed; default: the current flag): TF32 tensor cores on 64-row
    tiles (wgmma's minimum), or full-precision FMAs, which hold both operands
    of each product in registers, with 16 x 16 tiles past D=64.
    """
    if ieee is None:
        ieee = _is_ieee(dtype)
    if dtype == torch.float32 and ieee:
        bm, bn, warps, stages = (32, 32, 4, 2) if head_dim <= 64 else (16, 16, 4, 2)
    elif dtype == torch.float32:
        bm, bn, warps, stages = 64, 32, 4 if head_dim <= 64 else 8, 2
    elif head_dim <= 128:
        bm, bn, warps, stages = 128, 64, 8, 3
    else:
        bm, bn, warps, stages = 64, 32, 8, 2
    if real_dim is not None and real_dim < head_dim:
        # a head dim below its tile width (e.g. 72 or 96 on 128): the column masks cost registers; half
        # the key step (half precision) keeps the tile spill-free, and fp32 FMA tiles padded by 48
        # columns or more take twice the warps (static gate, triton 3.6: 72 spills on 4 warps, 96 on 8)
        if dtype == torch.float32 and ieee:
            warps = 8 if head_dim - real_dim >= 48 else warps
        elif dtype != torch.float32:
            bn = min(bn, 32)
    bm = min(bm, block_t)
    bn = min(bn, block_t)
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)


def check_config(cfg: dict, block_t: int) -> None:
    for key in ("BLOCK_M", "BLOCK_N"):
        v = cfg[key]
        if v < 16 or v & (v - 1) or block_t % v:
            raise ValueError(f"{key}={v} must be a power of two >= 16 dividing the block size {block_t}")


_INTERP_CFG = dict(BLOCK_M=16, BLOCK_N=16)
_LAUNCH_ONLY = ("num_warps", "num_stages")


def row_order(kv_cnt: torch.Tensor) -> torch.Tensor:
    """Query blocks of each head by decreasing kept-block count (the launch order), int32 (B, H, NB)."""
    return torch.argsort(kv_cnt, dim=-1, descending=True, stable=True).to(torch.int32).contiguous()


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           slot_token: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor,
                           block_t: int, scale: float, even: bool, config: dict | None = None,
                           order: torch.Tensor | None = None) -> torch.Tensor:
    """``out[b, h, tok] = softmax(q k^T * scale + block mask) v`` over the kept blocks.

    q, k, v, out: ``(B, H, S, D)``, any strides; slot_token ``(NB * block_t,)``
    int32; kv_idx ``(B, H, NB, >= max count)`` int32 (last dim contiguous),
    kv_cnt ``(B, H, NB)`` int32 contiguous.  ``even``: no ``-1`` in
    ``slot_token`` (skips the masks).  ``order``: launch order of the query
    blocks (default :func:`row_order`; any permutation per head is correct).
    """
    B, H, S, D = q.shape
    nb = slot_token.numel() // block_t
    check_head_dim(D)
    dt = tile_dim(D)
    interp = _interpreting(q)
    if config is None:
        config = dict(_INTERP_CFG) if interp else fwd_config(dt, block_t, q.dtype, real_dim=D)
    cfg = dict(config)
    if interp:
        for key in _LAUNCH_ONLY:
            cfg.pop(key, None)
    check_config(cfg, block_t)
    if B * H == 0 or nb == 0:
        return out
    if kv_idx.stride(-1) != 1 or not kv_cnt.is_contiguous() or tuple(kv_cnt.shape) != (B, H, nb):
        raise ValueError("kv_idx must have a contiguous last dim and kv_cnt be a contiguous (B, H, NB) tensor")
    order = row_order(kv_cnt) if order is None else order.to(torch.int32).contiguous()
    grid = (nb * (block_t // cfg["BLOCK_M"]), B * H)
    _bsa_fwd[grid](q, k, v, out, slot_token, kv_idx, kv_cnt, order,
                   H, nb, float(scale) * LOG2E,
                   *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                   kv_idx.stride(0), kv_idx.stride(1), kv_idx.stride(2),
                   HEAD_DIM=D, BLOCK_T=block_t, EVEN=bool(even), IEEE=_is_ieee(q.dtype),
                   INTERP_BF16=interp and q.dtype == torch.bfloat16, D_TILE=dt, **cfg)
    return out
