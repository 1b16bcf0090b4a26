"""DraftAttention: layout/permutation, draft block masks, the block-sparse flash kernel (interpreter on CPU,
compiled on GPU) against dense attention with the same mask, the modules, and a video-like input built
from a real image."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit.kernels as skk
from sparsekit.nn.draft_attention import DraftAttention, DraftAttnProcessor, DraftSchedule
from sparsekit.ops import dispatch
from sparsekit.ops.draft_attention import (block_sparse_attention, draft_attention, draft_block_mask,
                                           draft_layout)
from sparsekit.testing import assert_all_written, assert_close_rel, assert_within_torch_error, poison_outputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# partial patches in both directions (7 = 4 + 3, 10 = 4 + 4 + 2), 5 text tokens (a partial text block)
GEO = dict(frames=2, height=7, width=10, pool=(4, 4))


def _qkv(B, H, S, D, dtype, device="cpu", lead_bshd=False):
    if lead_bshd:   # the (B, S, H, D) layout a DiT produces, viewed as (B, H, S, D): non-contiguous
        return [torch.randn(B, S, H, D, device=device).to(dtype).transpose(1, 2) for _ in range(3)]
    return [torch.randn(B, H, S, D, device=device).to(dtype) for _ in range(3)]


def _sdpa64(q, k, v, mask=None, scale=None):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale)


def _torch_same_dtype(q, k, v, mask=None):
    # PyTorch's own attention in the inputs' dtype (math backend), for the "within 2x of torch" check
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def _random_block_mask(B, H, nb, density, gen):
    m = torch.rand(B, H, nb, nb, generator=gen) < density
    return m | torch.eye(nb, dtype=torch.bool)


# ------------------------------------------------------------------ layout / permutation
@pytest.mark.parametrize("frames,height,width,pool,text,pos", [
    (2, 7, 10, (4, 4), 5, "leading"), (1, 1, 1, (4, 4), 0, "leading"), (3, 5, 13, (3, 5), 17, "trailing"),
    (2, 16, 32, (8, 16), 0, "leading"), (1, 9, 17, (8, 16), 130, "trailing"), (2, 6, 6, (2, 3), 1, "leading")])
def test_permutation_round_trip_and_blocks(frames, height, width, pool, text, pos):
    L = draft_layout(frames, height, width, pool, text, pos)
    S = text + frames * height * width
    assert L.seq_len == S and L.block >= pool[0] * pool[1] and L.block >= 16 and L.block & (L.block - 1) == 0
    x = torch.randn(2, 3, S, 5)
    xp = L.permute(x)
    assert xp.shape == (2, 3, L.n_blocks * L.block, 5)
    assert torch.equal(L.unpermute(xp), x)                   # exact round trip
    st = L.slot_token.long()
    assert torch.equal(torch.sort(st[st >= 0]).values, torch.arange(S))   # every token exactly once
    assert bool((xp.reshape(2, 3, -1, 5)[:, :, st < 0] == 0).all())      # padding slots zero
    assert L.even == bool((st >= 0).all())
    # every pooled patch is one contiguous block; text fills the first blocks in order
    v0 = text if pos == "leading" else 0
    gh, gw = -(-height // pool[0]), -(-width // pool[1])
    assert L.grid == (gh, gw) and L.n_text_blocks == -(-text // L.block)
    f, y, xx = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    want = L.n_text_blocks + (f * gh + y // pool[0]) * gw + xx // pool[1]
    assert torch.equal(L.token_block[v0:v0 + frames * height * width], want.reshape(-1))
    assert torch.equal(L.token_slot // L.block, L.token_block)
    t0 = 0 if pos == "leading" else frames * height * width
    assert torch.equal(L.token_block[t0:t0 + text], torch.arange(text) // L.block)
    assert bool((L.block_count > 0).all()) and int(L.block_count.sum()) == S


def test_layout_is_cached_per_geometry():
    a = draft_layout(2, 7, 10, (4, 4), 5)
    assert draft_layout(2, 7, 10, [4, 4], 5) is a
    assert draft_layout(2, 7, 11, (4, 4), 5) is not a


# ------------------------------------------------------------------ draft mask
def _manual_draft(q, k, L, scale):
    # per head, per patch, with explicit token lists (the slow obvious way)
    B, H, S, D = q.shape
    v0 = L.video_offset
    nt = L.n_text_blocks
    qh = torch.zeros(B, H, L.n_video_blocks, D, dtype=torch.float64)
    kh = torch.zeros_like(qh)
    for blk in range(L.n_video_blocks):
        toks = (L.token_block == blk + nt).nonzero().flatten()
        assert bool(((toks >= v0) & (toks < v0 + L.video_tokens)).all())
        qh[:, :, blk] = q[:, :, toks].double().mean(2)
        kh[:, :, blk] = k[:, :, toks].double().mean(2)
    return torch.softmax(qh @ kh.transpose(-1, -2) * scale, -1)


@pytest.mark.parametrize("mode", ["percentile", "topk", "mass"])
@pytest.mark.parametrize("text,pos", [(0, "leading"), (5, "leading"), (21, "trailing")])
def test_draft_block_mask(mode, text, pos):
    L = draft_layout(2, 7, 10, (4, 4), text, pos)
    B, H, D = 2, 3, 64
    q, k, _ = _qkv(B, H, L.seq_len, D, torch.float32)
    sparsity, mass = 0.7, 0.8
    m, draft = draft_block_mask(q, k, L, sparsity, mode, mass=mass, return_draft=True)
    n, nt = L.n_video_blocks, L.n_text_blocks
    assert m.shape == (B, H, nt + n, nt + n) and m.dtype == torch.bool
    torch.testing.assert_close(draft.double(), _manual_draft(q, k, L, D ** -0.5), rtol=1e-5, atol=1e-6)
    assert bool(m[:, :, :nt].all()) and bool(m[:, :, :, :nt].all())           # text dense both ways
    mv = m[:, :, nt:, nt:]
    assert bool(torch.diagonal(mv, dim1=-2, dim2=-1).all())                  # own block always kept
    off = mv & ~torch.eye(n, dtype=torch.bool)
    if mode == "percentile":
        kk = math.ceil((1 - sparsity) * n * n)
        for b in range(B):
            for h in range(H):
                d = draft[b, h].flatten()
                thr = torch.topk(d, kk).values[-1]
                sel = mv[b, h].flatten()
                assert int(sel.sum()) <= kk + n
                assert bool(sel[d > thr].all()) and not bool(off[b, h].flatten()[d < thr].any())
    elif mode == "topk":
        kk = math.ceil((1 - sparsity) * n)
        cnt = mv.sum(-1)
        assert bool((cnt >= kk).all()) and bool((cnt <= kk + 1).all())
        thr = torch.topk(draft, kk, -1).values[..., -1:]
        assert bool(mv[draft > thr].all()) and not bool(off[draft < thr].any())
    else:
        # per row: the fewest largest blocks reaching the mass, plus the own block (plain Python)
        for b, h, r in ((0, 0, 0), (1, 2, n - 1), (1, 1, n // 2)):
            row = draft[b, h, r].tolist()
            order = sorted(range(n), key=lambda j: -row[j])
            total, want = 0.0, {r}
            for j in order:
                if total >= mass:
                    break
                want.add(j)
                total += row[j]
            assert set(mv[b, h, r].nonzero().flatten().tolist()) == want


def test_draft_mask_extremes():
    L = draft_layout(**GEO, text_tokens=5)
    q, k, _ = _qkv(1, 2, L.seq_len, 64, torch.float16)
    for mode in ("percentile", "topk"):
        assert bool(draft_block_mask(q, k, L, 0.0, mode).all())
        m1 = draft_block_mask(q, k, L, 1.0, mode)[:, :, 1:, 1:]
        assert torch.equal(m1, torch.eye(L.n_video_blocks, dtype=torch.bool).expand_as(m1))
    assert bool(draft_block_mask(q, k, L, mode="mass", mass=1.0).all())


# ------------------------------------------------------------------ the kernel vs dense
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsity0_equals_dense_sdpa(dtype):
    B, H, D, T = 2, 2, 64, 5
    geo = dict(GEO, frames=1)
    S = T + 7 * 10
    q, k, v = _qkv(B, H, S, D, dtype, lead_bshd=(dtype == torch.float16))
    with poison_outputs():
        out = draft_attention(q, k, v, **geo, text_tokens=T, sparsity=0.0, backend="interpret")
    assert out.shape == q.shape and out.dtype == dtype
    assert_all_written(out)
    ref = _sdpa64(q, k, v)
    assert_close_rel(out, ref)
    assert_within_torch_error(out, ref, _torch_same_dtype(q, k, v))
    assert_close_rel(draft_attention(q, k, v, **geo, text_tokens=T, sparsity=0.0, backend="reference"), ref)


@pytest.mark.parametrize("dtype,text,pos,geo", [
    (torch.float32, 5, "leading", GEO),
    (torch.float16, 21, "trailing", GEO),
    (torch.bfloat16, 0, "leading", GEO),
    (torch.float16, 32, "leading", dict(frames=2, height=8, width=8, pool=(4, 8))),     # no padding (EVEN)
    (torch.bfloat16, 3, "leading", dict(frames=1, height=5, width=11, pool=(3, 5))),    # 15-token patches
])
def test_given_block_mask_equals_masked_dense(dtype, text, pos, geo):
    gen = torch.Generator().manual_seed(7)
    geo = dict(geo)
    pool = geo.pop("pool")
    L = draft_layout(**geo, pool=pool, text_tokens=text, text_position=pos)
    assert L.even == (text == 32)
    B, H, D = 2, 2, 64
    q, k, v = _qkv(B, H, L.seq_len, D, dtype)
    bm = _random_block_mask(B, H, L.n_blocks, 0.3, gen)
    tm = L.token_mask(bm)
    ref = _sdpa64(q, k, v, tm)
    for backend in ("interpret", "reference"):
        with poison_outputs():
            out = block_sparse_attention(q, k, v, bm, L, backend=backend)
        assert_all_written(out, backend)
        assert_close_rel(out, ref, what=backend)
    assert_within_torch_error(out, ref, _torch_same_dtype(q, k, v, tm))


@pytest.mark.parametrize("D,dtype", [(128, torch.float16), (256, torch.float32)])
def test_head_dims_128_256(D, dtype):
    gen = torch.Generator().manual_seed(3)
    L = draft_layout(1, 6, 9, (4, 4), 4)
    q, k, v = _qkv(1, 2, L.seq_len, D, dtype)
    bm = _random_block_mask(1, 2, L.n_blocks, 0.5, gen)
    scale = 0.05
    with poison_outputs():
        out = block_sparse_attention(q, k, v, bm, L, scale=scale, backend="interpret")
    assert_all_written(out)
    assert_close_rel(out, _sdpa64(q, k, v, L.token_mask(bm), scale=scale))


def test_broadcast_mask_and_kernel_tile_configs():
    # a (1, 1, NB, NB) mask broadcast over B, H; and every GPU tile config through the interpreter
    gen = torch.Generator().manual_seed(5)
    L = draft_layout(2, 8, 8, (4, 8), 0)          # 4 blocks of 32 tokens: BLOCK_M / BLOCK_N sub-tiles
    q, k, v = _qkv(2, 2, L.seq_len, 64, torch.float16)
    nb = L.n_blocks
    bm = _random_block_mask(1, 1, L.n_blocks, 0.5, gen)
    ref = _sdpa64(q, k, v, L.token_mask(bm))
    assert_close_rel(block_sparse_attention(q, k, v, bm, L, backend="interpret"), ref)
    kmod = skk.load("draft_attention", interpret=True)
    full = bm.expand(2, 2, nb, nb).to(torch.uint8)
    idx = torch.sort(full, dim=-1, descending=True, stable=True).indices.int()
    cnt = full.sum(-1, dtype=torch.int32).contiguous()
    for cfg in (dict(BLOCK_M=32, BLOCK_N=16), kmod.fwd_config(64, 32, q.dtype)):
        out = torch.full_like(q, float("nan"))
        kmod.block_sparse_attention(q, k, v, out, L.slot_token, idx.contiguous(), cnt, L.block, 0.125, L.even,
                                    config=cfg)
        assert_close_rel(out, ref, what=str(cfg))
    # any launch order of the query blocks gives the same result (the default runs the longest rows first)
    assert torch.equal(kmod.row_order(cnt)[0, 0], torch.sort(cnt[0, 0], descending=True, stable=True).indices.int())
    out = torch.full_like(q, float("nan"))
    order = torch.stack([torch.randperm(nb) for _ in range(4)]).view(2, 2, nb)
    kmod.block_sparse_attention(q, k, v, out, L.slot_token, idx.contiguous(), cnt, L.block, 0.125, L.even,
                                order=order)
    assert_close_rel(out, ref, what="random order")
    with pytest.raises(ValueError, match="BLOCK_M"):
        kmod.check_config(dict(BLOCK_M=48, BLOCK_N=16), 64)
    for d in (64, 128, 256):
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            for ieee in (None, False, True):
                kmod.check_config(kmod.fwd_config(d, 128, dt, ieee), 128)
                kmod.check_config(kmod.fwd_config(d, 64, dt, ieee), 64)
    # fp32 follows torch.backends.cuda.matmul.allow_tf32: TF32 wgmma tiles (64 rows) or full-precision FMA tiles
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for flag in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = flag
            assert kmod._is_ieee(torch.float32) is (not flag) and not kmod._is_ieee(torch.float16)
            assert kmod.fwd_config(128, 128, torch.float32)["BLOCK_M"] == (16 if not flag else 64)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    # the fp32 configurations through the interpreter (clipped to the 32-token blocks)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    ref32 = _sdpa64(q32, k32, v32, L.token_mask(bm))
    for ieee in (False, True):
        out = torch.full_like(q32, float("nan"))
        kmod.block_sparse_attention(q32, k32, v32, out, L.slot_token, idx.contiguous(), cnt, L.block, 0.125, L.even,
                                    config=kmod.fwd_config(64, L.block, torch.float32, ieee))
        assert_close_rel(out, ref32, what=f"fp32 ieee={ieee}")


_AOT_SCRIPT = r"""
import inspect, sys, warnings
import torch, triton
warnings.simplefilter("ignore")
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print("SKIP", e); sys.exit(0)
from sparsekit.kernels import draft_attention as kmod
fn = kmod._bsa_fwd
params = list(inspect.signature(fn.fn).parameters)
for dtype, D, even in [(torch.bfloat16, 128, True), (torch.float16, 64, False), (torch.bfloat16, 256, False),
                       (torch.float16, 72, False)]:
    dt = kmod.tile_dim(D)
    cfg = kmod.fwd_config(dt, 128, dtype, real_dim=D)
    ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    const = dict(sqd=1, skd=1, svd=1, sod=1, HEAD_DIM=D, BLOCK_T=128, BLOCK_M=cfg["BLOCK_M"],
                 BLOCK_N=cfg["BLOCK_N"], EVEN=even, IEEE=False, INTERP_BF16=False, D_TILE=dt)
    sig = {p: ("constexpr" if p in const else ptr if p in ("Q", "K", "V", "O") else
               "*i32" if p in ("SLOT", "KV_IDX", "KV_CNT", "ROW_ORDER") else "fp32" if p == "qk_scale" else "i32")
           for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if sig[p] != "constexpr" and p not in ("qk_scale", "H", "NB")}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    except TypeError as e:
        print("SKIP", e); sys.exit(0)
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    except (RuntimeError, FileNotFoundError) as e:
        if "ptxas" in str(e) or isinstance(e, FileNotFoundError):
            print("SKIP", e); sys.exit(0)
        raise
    ptx = k.asm["ptx"]
    print("CFG", D, even, "wgmma" if "wgmma.mma_async" in ptx else "no-wgmma",
          "cp.async" if "cp.async" in ptx else "no-cp.async", k.metadata.shared)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the GPU tests compile and run the kernel")
def test_kernel_compiles_for_sm90_without_a_gpu():
    # the interpreter never runs the compiled branch: compile it ahead of time for an H100 (sm_90) with the
    # shipped configs and the specializations a real launch gets (unit head-dim strides, 16-aligned
    # pointers), and check it uses wgmma with pipelined (cp.async) K/V loads.  In a fresh process: once the
    # interpreter has run in a process, triton.language stays patched for it and compiling breaks.
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    if r.stdout.startswith("SKIP"):
        pytest.skip("ahead-of-time compile unavailable here: " + r.stdout.strip())
    lines = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("CFG")]
    assert len(lines) == 4, r.stdout
    for ln in lines:
        assert ln[3] == "wgmma" and ln[4] == "cp.async" and int(ln[5]) <= 227 * 1024, ln


# ------------------------------------------------------------------ a video-like input from a real image
def _video_qkv(frames=4, th=12, tw=20, patch=4, heads=2, D=64, seed=0, noise=0.5, qk_gain=0.5, pe_gain=4.0):
    from sklearn.datasets import load_sample_image

    img = torch.tensor(load_sample_image("china.jpg")).float().div(255)        # (427, 640, 3)
    g = torch.Generator().manual_seed(seed)
    ph, pw = th * patch, tw * patch
    crops = [img[40 + 6 * f: 40 + 6 * f + ph, 100 + 16 * f: 100 + 16 * f + pw] for f in range(frames)]  # pan
    vid = torch.stack(crops)                                                         # (F, ph, pw, 3)
    patches = vid.reshape(frames, th, patch, tw, patch, 3).permute(0, 1, 3, 2, 4, 5).reshape(frames, th, tw, -1)
    patches = (patches - patches.mean()) / patches.std()
    C = heads * D
    x = patches.reshape(-1, patches.shape[-1]) @ torch.randn(patches.shape[-1], C, generator=g) * 0.25
    # fixed sinusoidal (t, y, x) position code so attention is local as in a video DiT
    f, y, xx = torch.meshgrid(torch.arange(frames), torch.arange(th), torch.arange(tw), indexing="ij")
    pos = torch.stack([f, y, xx], -1).reshape(-1, 3).float()
    freqs = torch.exp(torch.linspace(0, -3, C // 6))
    ang = (pos[:, :, None] * freqs).reshape(pos.shape[0], -1)
    pe = torch.cat([ang.sin(), ang.cos()], -1)
    x = x + pe_gain * F.pad(pe, (0, C - pe.shape[1]))
    # k's projection is q's plus noise: similar tokens (in content and position) attend to each other
    wq, wn, wv = (torch.randn(C, C, generator=g) * C ** -0.5 for _ in range(3))
    wk = wq + noise * wn
    proj = lambda w: (x @ w).reshape(1, -1, heads, D).transpose(1, 2).contiguous()  # noqa: E731
    return proj(wq) * qk_gain, proj(wk) * qk_gain, proj(wv), dict(frames=frames, height=th, width=tw)


def test_real_image_video_error_vs_dense(capsys):
    q, k, v, geo = _video_qkv()
    dtype = torch.float16
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    dense = _sdpa64(q, k, v)
    L = draft_layout(**geo, pool=(4, 4))
    gen = torch.Generator().manual_seed(11)
    errs = {}
    for sp in (0.75, 0.9):
        out, m = draft_attention(q, k, v, **geo, pool=(4, 4), sparsity=sp, backend="reference", return_mask=True)
        density = m.float().mean().item()
        rnd = _random_block_mask(1, 2, L.n_blocks, max(density - 1 / L.n_blocks, 0.0), gen)
        e_draft = assert_close_rel(out, dense, bound=1.0)
        e_rand = assert_close_rel(block_sparse_attention(q, k, v, rnd, L, backend="reference"), dense, bound=2.0)
        errs[sp] = (e_draft, e_rand, density)
        if sp == 0.9:   # the kernel gives the same answer as the reference with this mask (head 1)
            q1, k1, v1, m1 = q[:, 1:], k[:, 1:], v[:, 1:], m[:, 1:]
            kout = block_sparse_attention(q1, k1, v1, m1, L, backend="interpret")
            assert_close_rel(kout, _sdpa64(q1, k1, v1, L.token_mask(m1)))
    with capsys.disabled():
        for sp, (e, er, dens) in errs.items():
            print(f"\n[draft_attention] china.jpg video {geo} pool (4,4): sparsity {sp:.2f} (block density "
                  f"{dens:.3f}): rel err vs dense {e:.4f}; random mask of the same density {er:.4f}")
    # measured (fp16, CPU): 0.75 -> 0.089 (random mask 0.205), 0.9 -> 0.140 (random 0.278); bounds with margin,
    # and the draft mask must clearly beat a random mask of the same density
    assert errs[0.75][0] < 0.15 and errs[0.9][0] < 0.22
    assert errs[0.75][0] < 0.7 * errs[0.75][1] and errs[0.9][0] < 0.7 * errs[0.9][1]


# ------------------------------------------------------------------ bad input / dispatch / library
def test_bad_inputs_raise_clear_errors():
    S = 5 + 140
    q, k, v = _qkv(1, 2, S, 64, torch.float16)
    kw = dict(**GEO, text_tokens=5)
    with pytest.raises(ValueError, match="does not match the geometry"):
        draft_attention(q, k, v, **dict(kw, width=11))
    for bad in (44, 8, 264):                            # not a multiple of 8, or outside [16, 256]
        with pytest.raises(ValueError, match=f"head dim {bad}"):
            draft_attention(*_qkv(1, 2, S, bad, torch.float16), **kw)
    with pytest.raises(ValueError, match=r"\(B, H, S, D\)"):
        draft_attention(q[0], k[0], v[0], **kw)
    with pytest.raises(TypeError, match="share a dtype"):
        draft_attention(q, k.float(), v, **kw)
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        draft_attention(q.double(), k.double(), v.double(), **kw)
    with pytest.raises(TypeError, match="torch.Tensor"):
        draft_attention([1], k, v, **kw)
    with pytest.raises(ValueError, match="same shape"):
        draft_attention(q, k[:, :1], v, **kw)
    with pytest.raises(ValueError, match="sparsity must be in"):
        draft_attention(q, k, v, **kw, sparsity=1.5)
    with pytest.raises(ValueError, match="mode must be"):
        draft_attention(q, k, v, **kw, mode="best")
    with pytest.raises(ValueError, match="pool"):
        draft_attention(q, k, v, **dict(kw, pool=(4, 4, 1)))
    with pytest.raises(ValueError, match="frames must be >= 1"):
        draft_attention(q, k, v, **dict(kw, frames=0))
    with pytest.raises(ValueError, match="text_position"):
        draft_attention(q, k, v, **kw, text_position="middle")
    with pytest.raises(ValueError, match="unknown backend"):
        draft_attention(q, k, v, **kw, backend="magic")
    with pytest.raises(ValueError, match="CUDA tensors"):
        draft_attention(q, k, v, **kw, backend="triton")
    L = draft_layout(**GEO, text_tokens=5)
    nb = L.n_blocks
    with pytest.raises(ValueError, match="diagonal"):
        block_sparse_attention(q, k, v, torch.zeros(1, 2, nb, nb, dtype=torch.bool), L)
    with pytest.raises(ValueError, match="block_mask must have shape"):
        block_sparse_attention(q, k, v, torch.ones(1, 2, nb, nb + 1, dtype=torch.bool), L)
    with pytest.raises(TypeError, match="bool"):
        block_sparse_attention(q, k, v, torch.ones(1, 2, nb, nb), L)
    with pytest.raises(TypeError, match="DraftLayout"):
        block_sparse_attention(q, k, v, torch.ones(1, 2, nb, nb, dtype=torch.bool), None)


def test_dispatch():
    assert dispatch.resolve("draft_attention", "cpu") == "reference"
    assert dispatch.available_backends("draft_attention", "cpu") == ["interpret", "reference"]


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_opcheck_and_no_backward(backend):
    L = draft_layout(1, 4, 4, (4, 4), 3)
    q, k, v = _qkv(1, 2, L.seq_len, 64, torch.float16)
    bm = torch.ones(1, 2, L.n_blocks, L.n_blocks, dtype=torch.bool)
    op = torch.ops.sparsekit.draft_attention.default
    torch.library.opcheck(op, (q, k, v, bm, L.slot_token, L.token_block, L.block, L.even, 0.125, backend),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    qg = q.clone().requires_grad_(True)
    out = block_sparse_attention(qg, k, v, bm, L, backend=backend)
    with pytest.raises(NotImplementedError, match="inference op"):
        out.sum().backward()


# ------------------------------------------------------------------ nn
class _Attn(nn.Module):
    """The attribute names of a diffusers ``Attention`` block (diffusers itself is not needed)."""

    def __init__(self, dim, heads, qk_norm=False):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.LayerNorm(dim // heads) if qk_norm else None
        self.norm_k = nn.LayerNorm(dim // heads) if qk_norm else None

    def dense(self, x, enc=None):
        b = x.shape[0]
        kv = x if enc is None else enc
        sp = lambda t: t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = sp(self.to_q(x)), sp(self.to_k(kv)), sp(self.to_v(kv))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[1](self.to_out[0](o.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3])))


@torch.no_grad()
def test_processor_dense_first_then_sparse_and_joint_text():
    torch.manual_seed(0)
    geo = dict(frames=2, height=4, width=8)
    attn = _Attn(128, 2, qk_norm=True)
    x = torch.randn(2, 64, 128)
    sched = DraftSchedule(dense_steps=1, dense_layers=[3])
    proc = DraftAttnProcessor(**geo, sparsity=0.5, pool=(4, 4), layer_index=0, schedule=sched, backend="reference")
    torch.testing.assert_close(proc(attn, x), attn.dense(x))                 # step 0: dense
    sched.set_step(1)
    assert not proc.is_dense() and sched.is_dense(3)
    y = proc(attn, x)
    b = x.shape[0]
    sp = lambda t: t.view(b, -1, 2, 64).transpose(1, 2)  # noqa: E731
    q, k, v = attn.norm_q(sp(attn.to_q(x))), attn.norm_k(sp(attn.to_k(x))), sp(attn.to_v(x))
    o = draft_attention(q, k, v, **geo, sparsity=0.5, pool=(4, 4), backend="reference")
    want = attn.to_out[0](o.transpose(1, 2).reshape(b, -1, 128))
    torch.testing.assert_close(y, want)
    assert not torch.allclose(y, attn.dense(x), atol=1e-3)                 # really sparse
    # the module form (interpreter kernel) gives the same attention
    mod = DraftAttention(**geo, sparsity=0.5, pool=(4, 4), backend="interpret")
    assert_close_rel(mod(q, k, v), o.double(), bound=1e-5)
    # CogVideoX-style joint attention: 5 leading text tokens, returns (video, text)
    jp = DraftAttnProcessor(**geo, sparsity=0.0, pool=(4, 4), joint_text=True, backend="reference")
    enc = torch.randn(2, 5, 128)
    hv, ht = jp(attn, x, encoder_hidden_states=enc)
    full = attn.dense(torch.cat([enc, x], 1))
    torch.testing.assert_close(hv, full[:, 5:])
    torch.testing.assert_close(ht, full[:, :5])
    # a rotary hook sees the video tokens only (q and k)
    rp = DraftAttnProcessor(**geo, sparsity=0.0, pool=(4, 4), joint_text=True, backend="reference",
                            rotary=lambda t, emb: t * emb)
    hv_r, ht_r = rp(attn, x, encoder_hidden_states=enc, image_rotary_emb=torch.tensor(0.0))
    b5 = torch.cat([enc, x], 1)
    qf, kf, vf = attn.norm_q(sp(attn.to_q(b5))), attn.norm_k(sp(attn.to_k(b5))), sp(attn.to_v(b5))
    qf, kf = qf.clone(), kf.clone()
    qf[:, :, 5:] = 0
    kf[:, :, 5:] = 0
    of = attn.to_out[0](F.scaled_dot_product_attention(qf, kf, vf).transpose(1, 2).reshape(b, -1, 128))
    torch.testing.assert_close(torch.cat([ht_r, hv_r], 1), of)
    jp.sparsity = 0.5
    hv2, _ = jp(attn, x, encoder_hidden_states=enc)
    assert hv2.shape == (2, 64, 128) and bool(torch.isfinite(hv2).all())
    # cross-attention (no joint text) and an explicit mask: dense
    torch.testing.assert_close(proc(attn, x, encoder_hidden_states=enc), attn.dense(x, enc))
    with pytest.raises(ValueError, match="rotary"):
        proc(attn, x, image_rotary_emb=torch.zeros(1))
    with pytest.raises(ValueError, match="does not match the geometry"):
        proc(attn, torch.randn(2, 65, 128))
    proc.set_geometry(1, 8, 8)
    assert proc(attn, x).shape == x.shape


def test_schedule_and_config_errors():
    s = DraftSchedule(dense_steps=2, dense_layers=2)
    assert s.is_dense(5) and (s.set_step(2) is None) and not s.is_dense(5) and s.is_dense(1)
    with pytest.raises(ValueError, match="dense_steps"):
        DraftSchedule(dense_steps=-1)
    with pytest.raises(ValueError, match="step"):
        s.set_step(-3)
    with pytest.raises(ValueError, match="mode"):
        DraftAttention(2, 4, 4, mode="x")
    with pytest.raises(TypeError, match="DraftSchedule"):
        DraftAttnProcessor(2, 4, 4, schedule=3)
    with pytest.raises(ValueError, match="height"):
        DraftAttention(2, 0, 4)


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("geo,text", [(dict(frames=3, height=21, width=40), 0),
                                      (dict(frames=2, height=16, width=32), 256),
                                      (dict(frames=2, height=13, width=37), 77)])
def test_triton_gpu_matches_dense_and_masked(geo, text, D, dtype):
    L = draft_layout(**geo, text_tokens=text, device="cuda")
    q, k, v = _qkv(2, 3, L.seq_len, D, dtype, device="cuda", lead_bshd=True)
    with poison_outputs():
        out = draft_attention(q, k, v, **geo, text_tokens=text, sparsity=0.0, backend="triton")
    assert_all_written(out)
    ref = _sdpa64(q, k, v)
    assert_close_rel(out, ref)
    assert_within_torch_error(out, ref, F.scaled_dot_product_attention(q, k, v))
    out, m = draft_attention(q, k, v, **geo, text_tokens=text, sparsity=0.9, backend="triton", return_mask=True)
    assert_close_rel(out, _sdpa64(q, k, v, L.token_mask(m)))


@pytest.mark.gpu
def test_triton_gpu_fp32_and_auto_dispatch():
    L = draft_layout(2, 9, 17, (8, 16), 5, device="cuda")
    q, k, v = _qkv(1, 2, L.seq_len, 64, torch.float32, device="cuda")
    out, m = draft_attention(q, k, v, frames=2, height=9, width=17, text_tokens=5, sparsity=0.5,
                             return_mask=True)
    assert_close_rel(out, _sdpa64(q, k, v, L.token_mask(m)))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128, 256])
def test_triton_gpu_fp32_tf32(D):
    # fp32 with torch.backends.cuda.matmul.allow_tf32: TF32 tensor cores (fp16's 10-bit mantissa: 1e-3)
    L = draft_layout(2, 9, 17, (8, 16), 5, device="cuda")
    q, k, v = _qkv(1, 2, L.seq_len, D, torch.float32, device="cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        out, m = draft_attention(q, k, v, frames=2, height=9, width=17, text_tokens=5, sparsity=0.5,
                                 backend="triton", return_mask=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert_close_rel(out, _sdpa64(q, k, v, L.token_mask(m)), bound=1e-3)


# ------------------------------------------------------------------ benchmark module (CPU paths)
def test_bench_cpu_sweep_and_dry_run():
    from sparsekit.bench import draft_attention as bd
    from sparsekit.bench import harness

    rows, ok = bd.cpu_sweep(dtypes=("fp16",), sparsities=(0.75,), backends=("interpret", "reference"),
                            cases=[(1, 5, 11, 3, "trailing", (3, 5))])
    # one row per backend and head dim (64 and the padded-tile dims 72 and 96)
    assert ok and len(rows) == 2 * len(bd.CPU_HEAD_DIMS) and all(r.rel_err < 2e-3 for r in rows)
    assert {r.case.split(",D=")[1].split(",")[0] for r in rows} == {str(d) for d in bd.CPU_HEAD_DIMS}
    rows = bd.run_gpu(shapes=[(1, 8, 8, 0)], ms=[1], dtypes=["fp32"], sparsities=(0.5,),
                      backends=("dense", "reference", "draft_overhead"), warmup_ms=0.0, rep_ms=0.0,
                      device="cpu", timer=harness.time_rotating_cpu, ctx=dict(gpu="cpu"), log=lambda *a: None)
    by = {r.backend: r for r in rows}
    assert set(by) == {"dense", "reference", "draft_overhead"} and all(r.status == "ok" for r in rows)
    assert by["reference"].rel_err < 1e-5 and by["dense"].speedup_vs_dense == 1.0
    assert "% of dense" in by["draft_overhead"].note
    assert bd._geometry((48, 80)) == (21, 48, 80, 0) and bd._geometry((2, 3, 4)) == (2, 3, 4, 0)


# ------------------------------------------------------------------ guidance: stats and the unstructured-input warning
def test_stats_tell_structured_from_random_inputs():
    da = importlib.import_module("sparsekit.ops.draft_attention")

    q, k, v, geo = _video_qkv()
    out, st = draft_attention(q, k, v, **geo, pool=(4, 4), sparsity=0.75, backend="reference", return_stats=True)
    assert abs(st["kept_fraction"] - 0.25) < 0.03 and st["kept_fraction_per_head"].shape == (1, 2)
    assert st["draft_dropped_mass"] < 0.05 and st["draft_entropy"] < 0.7       # real video tokens
    g = torch.Generator().manual_seed(0)
    qr, kr, vr = (torch.randn(q.shape, generator=g) for _ in range(3))
    out_r, mask_r, st_r = draft_attention(qr, kr, vr, **geo, pool=(4, 4), sparsity=0.75, backend="reference",
                                          return_mask=True, return_stats=True)
    assert st_r["draft_entropy"] > da.UNIFORM_DRAFT_ENTROPY and st_r["draft_dropped_mass"] > 0.6
    assert mask_r.dtype == torch.bool and out_r.shape == q.shape
    # the proxy orders the errors as dense attention does
    err = lambda o, a, b, c: float((o.double() - _sdpa64(a, b, c).double()).norm() / _sdpa64(a, b, c).double().norm())  # noqa: E731
    assert err(out, q, k, v) < 0.2 < 0.9 < err(out_r, qr, kr, vr)


def test_unstructured_input_warns_once(monkeypatch):
    import warnings

    da = importlib.import_module("sparsekit.ops.draft_attention")

    q, k, v, geo = _video_qkv()
    monkeypatch.setattr(da, "_STRUCTURE_CHECKED", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # structured inputs: no warning
        draft_attention(q, k, v, **geo, pool=(4, 4), sparsity=0.75, backend="reference")
    g = torch.Generator().manual_seed(1)
    qr, kr, vr = (torch.randn(q.shape, generator=g) for _ in range(3))
    monkeypatch.setattr(da, "_STRUCTURE_CHECKED", False)
    with pytest.warns(RuntimeWarning, match="nearly uniform"):
        draft_attention(qr, kr, vr, **geo, pool=(4, 4), sparsity=0.75, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # once per process
        draft_attention(qr, kr, vr, **geo, pool=(4, 4), sparsity=0.75, backend="reference")



# ------------------------------------------------------------------ any head dim (multiple of 8 in [16, 256])
@pytest.mark.parametrize("d", [32, 72, 80, 96, 160])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_any_head_dim(d, dtype):
    """Head dims outside 64/128/256 run on the next power-of-two tile width with masked columns: at
    sparsity 0 the op equals SDPA, at 50% the masked dense attention with the same block mask."""
    geo = dict(frames=2, height=3, width=5, pool=(2, 4), text_tokens=3)      # odd resolution, partial patches
    S = 3 + 2 * 3 * 5
    g = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(1, 2, S, d, generator=g).to(dtype) for _ in range(3))
    for backend in ("interpret", "reference"):
        out = draft_attention(q, k, v, **geo, sparsity=0.0, backend=backend)
        assert out.shape == q.shape and out.dtype == dtype
        assert_close_rel(out, _sdpa64(q, k, v))
        out, mask = draft_attention(q, k, v, **geo, sparsity=0.5, backend=backend, return_mask=True)
        L = draft_layout(2, 3, 5, (2, 4), 3)
        assert_close_rel(out, _sdpa64(q, k, v, L.token_mask(mask)))
