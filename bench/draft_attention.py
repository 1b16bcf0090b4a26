"""Benchmark and CPU correctness sweep for ``draft_attention`` (draft-guided block-sparse video attention).

GPU (``run_gpu``): B=1 (``ms`` = batch sizes), H=24, D=128, pool 8x16
(128-token blocks), video latents from 8k to 128k tokens (``GEOMETRIES``:
``(frames, height, width, text_tokens)``; ``21x48x80 = 80,640`` among them,
one geometry with partial patches and 226 leading text tokens), sparsity in
``SPARSITIES``.  Timed in the same run, on the same q, k, v:

* ``sdpa_flash``      ``F.scaled_dot_product_attention`` forced to the flash backend
                      (``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``): the dense baseline --
                      ``speedup_vs_dense`` of every row is relative to it
* ``dense``           SDPA with PyTorch's own backend choice
* ``triton``          ``draft_attention(...)`` end to end: pooling, draft map, mask
                      selection, kernel index, block-sparse kernel
* ``triton_kernel``   ``block_sparse_attention`` with the mask precomputed (kernel + index)
* ``draft_overhead``  ``draft_block_mask`` + kernel index building alone (the note gives
                      it as a percentage of ``sdpa_flash``; the permutation is cached per
                      geometry, so it costs nothing per call)
* ``flex``            ``torch.compile(flex_attention)`` with a ``BlockMask`` built from
                      the same block mask (``BlockMask.from_kv_blocks``, 128x128 blocks) on
                      q, k, v already in the patch order (the reorder is not timed for it);
                      padding slots masked by a ``mask_mod``

Case strings: ``S=80640,H=24,D=128,sparsity=0.9,frames=21,height=48,width=80,text=0,B=1``.
``flops`` / TFLOP/s count the work actually done: ``4 B H S^2 D`` times the kept
block density (1 for the SDPA rows), so a sparse row's TFLOP/s is its kernel
efficiency, not a dense-equivalent rate.
Before timing, every row's output is checked on 256 sampled query rows against
fp32 attention with the same token mask (dense for the SDPA rows); a failing
sparsekit backend is reported and not timed, a peer that cannot run gives a
``skip`` row with the reason.  ``run.py`` passes ``shapes``: 3- or 4-tuples are
geometries, a 2-tuple ``(h, w)`` from ``--shapes HxW`` means 21 frames of an
``h x w`` latent.

CPU (``cpu_sweep``): no timings; the ``interpret`` and ``reference`` backends
and the automatic choice are compared against float64 attention with the same
block mask on small odd geometries (partial patches, a 15-token pool, leading
and trailing text), fp32 / fp16 / bf16.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from . import harness
from .harness import Row, format_case

OP = "draft_attention"

HEADS, HEAD_DIM, POOL = 24, 128, (8, 16)
# (frames, height, width, text_tokens): 8k, 16k, 32k (partial patches + text), 80k, 128k tokens
GEOMETRIES = [(4, 32, 64, 0), (8, 32, 64, 0), (9, 45, 80, 226), (21, 48, 80, 0), (32, 64, 64, 0)]
QUICK_GEOMETRIES = [(8, 32, 64, 0), (21, 48, 80, 0)]
SPARSITIES = (0.9, 0.75)
QUICK_SPARSITIES = (0.9,)
DEFAULT_FRAMES = 21
SHAPES = GEOMETRIES               # what run.py passes as ``shapes``
QUICK_SHAPES = QUICK_GEOMETRIES
MS = [1]                           # batch sizes
QUICK_MS = [1]
DEFAULT_DTYPES = ("bf16",)
PLOT_X = "S"                       # x axis of the speedup plot (harness.write_plot(x_key=PLOT_X))
GPU_TOL = {"fp16": 5e-3, "bf16": 2e-2, "fp32": 1e-4}
N_CHECK_ROWS = 256
BACKENDS = ("sdpa_flash", "dense", "triton", "triton_kernel", "draft_overhead", "flex")
OWN = ("triton", "triton_kernel", "draft_overhead", "interpret", "reference", "sparsekit_auto")
CPU_TIMING_BACKENDS = ("dense", "interpret", "reference", "draft_overhead")

# CPU sweep: (frames, height, width, text_tokens, text_position, pool)
CPU_CASES = [(2, 7, 10, 5, "leading", (4, 4)), (1, 5, 11, 3, "trailing", (3, 5))]
CPU_QUICK_CASES = [(2, 7, 10, 5, "leading", (4, 4))]
CPU_SPARSITIES = (0.0, 0.75)
CPU_QUICK_SPARSITIES = (0.75,)
CPU_HEADS, CPU_HEAD_DIM = 2, 64
# head dims on a padded tile (Latte/DiT 72, Allegro 96): the CPU sweep checks them; on a GPU,
# run_gpu(head_dim=(HEAD_DIM,) + EXTRA_HEAD_DIMS) times them next to the tuned 128
EXTRA_HEAD_DIMS = (72, 96)
CPU_HEAD_DIMS = (CPU_HEAD_DIM,) + EXTRA_HEAD_DIMS
CPU_QUICK_SHAPES = [(1, 8, 8, 0)]  # the dry run of the timing path (pool 4x4 there)
CPU_QUICK_MS = [1]
CPU_DTYPES = ("fp32", "fp16", "bf16")
CPU_TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# The rows `make gpu-check` times (see bench/sparse24.py GPU_CHECK for the fields).  One SDPA
# flash call at S = 80640 takes ~0.15 s (8e13 FLOPs), so do_bench runs it ~7 times; flex is
# compiled once per geometry (torch.compile, cached by the warm-up step).
GPU_CHECK = {
    "s80k_sp90": dict(
        decides="DraftAttention at 90% sparsity, S = 80640 (21x48x80 latent): vs SDPA flash and FlexAttention",
        kwargs=dict(shapes=[(21, 48, 80, 0)], ms=[1], dtypes=["bf16"], sparsities=(0.9,),
                    backends=("sdpa_flash", "triton", "triton_kernel", "draft_overhead", "flex")),
        predict_s=18, warm_s=45),
    "s32k_text_sp90": dict(
        decides="DraftAttention at 90% sparsity, S = 32626 (9x45x80 latent with partial patches + 226 text tokens)",
        kwargs=dict(shapes=[(9, 45, 80, 226)], ms=[1], dtypes=["bf16"], sparsities=(0.9,),
                    backends=("sdpa_flash", "triton", "triton_kernel", "draft_overhead", "flex")),
        predict_s=14, warm_s=40),
}


def plan_rows(entry: str = "run_gpu", shapes=GEOMETRIES, ms=MS, dtypes=DEFAULT_DTYPES, backends=BACKENDS,
              sparsities=SPARSITIES, heads: int | None = None, head_dim: int | None = None, pool=None,
              **_) -> list[dict]:
    """The (op, case, dtype, backends) rows ``run_gpu(**kwargs)`` produces on a GPU, in order."""
    order = ["sdpa_flash", "dense", "triton", "triton_kernel", "reference", "draft_overhead", "flex"]
    bks = [b for b in order if b in backends]
    heads = heads or HEADS
    rows = []
    for d in _head_dims(head_dim, HEAD_DIM):
        for dname in dtypes:
            for shape in shapes:
                fr, hh, ww, text = _geometry(shape)
                s = text + fr * hh * ww
                for b in ms:
                    for sp in sparsities:
                        rows.append(dict(op=OP, case=format_case(S=s, H=heads, D=d, sparsity=sp, frames=fr,
                                                                 height=hh, width=ww, text=text, B=b),
                                         dtype=dname, backends=bks))
    return rows


def _head_dims(head_dim, default: int) -> tuple:
    """``head_dim``: None (``default``), an int, or a sequence of head dims (e.g. ``(128,) + EXTRA_HEAD_DIMS``)."""
    if head_dim is None:
        return (default,)
    if isinstance(head_dim, int):
        return (head_dim,)
    return tuple(int(d) for d in head_dim)


def _ops():
    import importlib
    ops = importlib.import_module("sparsekit.ops.draft_attention")  # the package attribute is the function
    return ops


def _short(e: BaseException, n: int = 200) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace(",", ";")
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def _geometry(shape) -> tuple[int, int, int, int]:
    shape = tuple(shape)
    if len(shape) == 4:
        return shape
    if len(shape) == 3:
        return (*shape, 0)
    if len(shape) == 2:
        return (DEFAULT_FRAMES, shape[0], shape[1], 0)
    raise ValueError(f"draft_attention geometry must be (frames, height, width[, text]) or (height, width), "
                     f"got {shape}")


def attention_flops(s: int, heads: int, d: int, batch: int = 1, density: float = 1.0) -> int:
    """Forward attention FLOPs (QK^T and PV) for the kept fraction ``density`` of the S x S scores."""
    return int(4 * batch * heads * s * s * d * density)


def sampled_reference(q, k, v, token_mask_rows: Callable | None, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 attention of the query ``rows`` (B, H, R, D) against all keys; ``token_mask_rows(rows)``
    gives their (B|1, H|1, R, S) bool mask (None = dense)."""
    qs = q[:, :, rows].float()
    s = (qs @ k.float().transpose(-1, -2)) * scale
    if token_mask_rows is not None:
        s = s.masked_fill(~token_mask_rows(rows), float("-inf"))
    return torch.softmax(s, -1) @ v.float()


# --------------------------------------------------------------------------- peers

def _sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


_FLEX = {}


def _flex_fn(layout, block_mask):
    """flex_attention on q, k, v in the patch order with the same block mask; returns (fn(qp, kp, vp), permute)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["fn"]
    ops = _ops()
    idx, cnt = ops._kv_index(block_mask)
    bt = layout.block
    valid = layout.slot_token >= 0
    bmask = block_mask.expand(-1, -1, -1, -1)

    # the full mask (flex's eager path and partial blocks evaluate it; full blocks skip it)
    def mask_mod(b, h, q_idx, kv_idx):
        return bmask[b, h, q_idx // bt, kv_idx // bt] & valid[kv_idx]

    if layout.even:     # every kept block is full: no mask_mod work in the kernel
        bm = BlockMask.from_kv_blocks(torch.zeros_like(cnt), idx, cnt, idx, BLOCK_SIZE=bt, mask_mod=mask_mod)
    else:
        bm = BlockMask.from_kv_blocks(cnt, idx, BLOCK_SIZE=bt, mask_mod=mask_mod)

    def fn(qp, kp, vp):
        return flex(qp, kp, vp, block_mask=bm)
    return fn


# --------------------------------------------------------------------------- GPU benchmark

def run_gpu(shapes: Iterable = GEOMETRIES, ms: Iterable[int] = MS, dtypes: Iterable[str] = DEFAULT_DTYPES,
            backends: Sequence[str] = BACKENDS, warmup_ms: float = 10.0, rep_ms: float = 50.0,
            ctx: dict | None = None, on_rows: Callable[[list[Row]], None] | None = None, log=print,
            seed: int = 0, device="cuda", timer: Callable | None = None,
            sparsities: Sequence[float] | None = None, heads: int | None = None,
            head_dim: int | None = None, pool=None) -> list[Row]:
    """Time every backend on every case (``device="cpu"`` + a CPU timer = a dry run of the harness)."""
    ops = _ops()
    ctx = dict(ctx or {})
    ceilings = ctx.pop("ceilings", None)
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    timer = timer or harness.time_rotating
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    heads = heads or (HEADS if on_gpu else CPU_HEADS)
    dims = _head_dims(head_dim, HEAD_DIM if on_gpu else CPU_HEAD_DIM)
    pool = pool or (POOL if on_gpu else (4, 4))
    sparsities = tuple(sparsities or (SPARSITIES if on_gpu else (0.75,)))
    own_kernel = "triton" if on_gpu else "interpret"
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    all_rows: list[Row] = []
    for d in dims:
        for dname in dtypes:
            dtype = DTYPES[dname]
            it = torch.empty((), dtype=dtype).element_size()
            for shape in shapes:
                fr, hh, ww, text = _geometry(shape)
                layout = ops.draft_layout(fr, hh, ww, pool, text, device=device)
                s = layout.seq_len
                for b in ms:
                    set_bytes = 4 * b * heads * s * d * it
                    n_sets = harness.n_rotating_sets(set_bytes) if on_gpu else 1
                    # (B, S, H, D) buffers viewed as (B, H, S, D): the layout a DiT hands to attention
                    sets = [tuple(torch.randn(b, s, heads, d, device=device, dtype=torch.float32, generator=gen)
                                  .to(dtype).transpose(1, 2) for _ in range(3)) for _ in range(n_sets)]
                    scale = d ** -0.5
                    rows_idx = torch.randperm(s, generator=gen, device=device)[:N_CHECK_ROWS]
                    q0, k0, v0 = sets[0]
                    ref_dense = sampled_reference(q0, k0, v0, None, rows_idx, scale)
                    for sp in sparsities:
                        case = format_case(S=s, H=heads, D=d, sparsity=sp, frames=fr, height=hh, width=ww, text=text, B=b)
                        masks = [ops.draft_block_mask(q, k, layout, sp) for (q, k, _) in sets]
                        density = masks[0].float().mean().item()
                        tb = layout.token_block

                        def tmask(r, _m=masks[0]):
                            return _m.index_select(-2, tb[r]).index_select(-1, tb)
                        ref_sparse = sampled_reference(q0, k0, v0, tmask, rows_idx, scale)
                        group: list[Row] = []
                        fns: dict = {}
                        if "sdpa_flash" in backends:
                            fns["sdpa_flash"] = (lambda q, k, v, m: _sdpa_flash(q, k, v), True)
                        if "dense" in backends:
                            fns["dense"] = (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v), True)
                        if "triton" in backends or (not on_gpu and "interpret" in backends):
                            fns[own_kernel] = (lambda q, k, v, m, _be=own_kernel: ops.draft_attention(
                                q, k, v, frames=fr, height=hh, width=ww, sparsity=sp, pool=pool, text_tokens=text,
                                backend=_be), False)
                        if "triton_kernel" in backends and on_gpu:
                            fns["triton_kernel"] = (lambda q, k, v, m: ops.block_sparse_attention(
                                q, k, v, m, layout, backend="triton"), False)
                        if "reference" in backends:
                            fns["reference"] = (lambda q, k, v, m: ops.block_sparse_attention(
                                q, k, v, m, layout, backend="reference"), False)
                        if "draft_overhead" in backends:
                            fns["draft_overhead"] = (lambda q, k, v, m: ops._kv_index(
                                ops.draft_block_mask(q, k, layout, sp)), None)
                        if "flex" in backends:
                            fns["flex"] = (None, False)
                        for name, (fn, dense_ref) in fns.items():
                            dens = 1.0 if dense_ref else density
                            row = Row(op=OP, case=case, backend=name, dtype=dname, n_sets=n_sets,
                                      flops=attention_flops(s, heads, d, b, dens), bytes=4 * b * heads * s * d * it, **ctx)
                            args = [(q, k, v, m) for (q, k, v), m in zip(sets, masks)]
                            try:
                                if name == "flex":
                                    ffn = _flex_fn(layout, masks[0])
                                    perm = [tuple(layout.permute(t) for t in (q, k, v)) for (q, k, v) in sets]
                                    args = [(*p, None) for p in perm]
                                    fn = (lambda qp, kp, vp, m, _f=ffn: _f(qp, kp, vp))
                                    out = layout.unpermute(fn(*args[0]))
                                else:
                                    out = fn(*args[0])
                                sync()
                                if name == "draft_overhead":
                                    row.flops = row.bytes = None
                                    row.note = "pool + draft softmax + mask selection + kernel index"
                                else:
                                    if tuple(out.shape) != tuple(q0.shape):
                                        raise ValueError(f"output shape {tuple(out.shape)} != {tuple(q0.shape)}")
                                    ref = ref_dense if dense_ref else ref_sparse
                                    row.rel_err = harness.rel_err(out[:, :, rows_idx].float(), ref)
                                    tol = GPU_TOL[dname] if on_gpu else CPU_TOL[dname]
                                    if not row.rel_err < tol:
                                        peer = name in harness.PEER_BACKENDS
                                        row.status = "skip" if peer else "fail"
                                        row.note = f"rel_err {row.rel_err:.3g} >= {tol:g} on {N_CHECK_ROWS} rows: not timed"
                                        group.append(row)
                                        log(f"[{OP}] {case} {dname} {name}: {row.status}: {row.note}")
                                        continue
                                del out
                            except Exception as e:
                                peer = name in harness.PEER_BACKENDS
                                row.status = "skip" if peer else "fail"
                                row.note = ("could not run: " if peer else "error: ") + _short(e)
                                row.flops = row.bytes = None
                                group.append(row)
                                log(f"[{OP}] {case} {dname} {name}: {row.status}: {row.note}")
                                continue
                            try:
                                row.p20_ms, row.p50_ms, row.p80_ms = timer(fn, args, warmup_ms=warmup_ms, rep_ms=rep_ms)
                            except Exception as e:
                                row.status, row.note = "fail", "timing error: " + _short(e)
                            if name == "flex":
                                row.note = "q/k/v pre-permuted to patch order (reorder not timed)"
                            harness.fill_throughput(row, ceilings)
                            group.append(row)
                        _ratios(group)
                        for r in group:
                            if r.status == "ok":
                                log(f"[{OP}] {r.case:>60} {r.dtype} {r.backend:>14}: p50 {r.p50_ms:9.4f} ms  "
                                    f"x flash {r.speedup_vs_dense or float('nan'):6.2f}  {r.note}")
                        if on_rows is not None:
                            on_rows(group)
                        all_rows.extend(group)
                    del sets
                    if on_gpu:
                        torch.cuda.empty_cache()
    return all_rows


def _ratios(group: list[Row]) -> None:
    """Speedups relative to ``sdpa_flash`` (else ``dense``); the overhead row as % of it."""
    harness.fill_ratios(group)
    timed = [r for r in group if r.status == "ok" and r.p50_ms]
    base = next((r for r in timed if r.backend == "sdpa_flash"), None) or \
        next((r for r in timed if r.backend == "dense"), None)
    if base is None:
        return
    for r in timed:
        r.speedup_vs_dense = base.p50_ms / r.p50_ms
        if r.backend == "draft_overhead":
            r.note = f"{100.0 * r.p50_ms / base.p50_ms:.2f}% of {base.backend}; " + r.note


# --------------------------------------------------------------------------- CPU correctness sweep

def cpu_sweep(quick: bool = False, dtypes: Sequence[str] = CPU_DTYPES,
              backends: Sequence[str] = ("interpret", "reference", "sparsekit_auto"),
              cases=None, sparsities: Sequence[float] | None = None, seed: int = 0,
              log=print) -> tuple[list[Row], bool]:
    """Compare sparsekit's CPU backends with float64 attention under the same block mask."""
    from sparsekit.ops import dispatch
    ops = _ops()
    gen = torch.Generator().manual_seed(seed)
    rows: list[Row] = []
    ctx = dict(gpu="cpu", commit=harness.git_commit(), date=harness.now_iso())
    ctx["torch"], ctx["triton"] = harness.versions()
    cases = cases if cases is not None else (CPU_QUICK_CASES if quick else CPU_CASES)
    sparsities = sparsities if sparsities is not None else (CPU_QUICK_SPARSITIES if quick else CPU_SPARSITIES)
    for (fr, hh, ww, text, pos, pool) in cases:
        layout = ops.draft_layout(fr, hh, ww, pool, text, pos)
        s = layout.seq_len
        for hd in (CPU_HEAD_DIMS if not quick else (CPU_HEAD_DIM,)):
            for dname in dtypes:
                if dname not in DTYPES:
                    continue
                dtype = DTYPES[dname]
                q, k, v = (torch.randn(2, CPU_HEADS, s, hd, generator=gen).to(dtype) for _ in range(3))
                for sp in sparsities:
                    case = format_case(S=s, H=CPU_HEADS, D=hd, sparsity=sp, frames=fr, height=hh, width=ww,
                                       text=text, pos=pos, pool=f"{pool[0]}x{pool[1]}", B=2)
                    mask = ops.draft_block_mask(q, k, layout, sp)
                    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                         attn_mask=layout.token_mask(mask))
                    for name in backends:
                        row = Row(op=OP, case=case, backend=name, dtype=dname, **ctx)
                        try:
                            kw = dict(frames=fr, height=hh, width=ww, sparsity=sp, pool=pool, text_tokens=text,
                                      text_position=pos, return_mask=True)
                            if name == "sparsekit_auto":
                                row.chosen_backend = dispatch.resolve(OP, q.device, None, s)
                                out, m = ops.draft_attention(q, k, v, **kw)
                            else:
                                out, m = ops.draft_attention(q, k, v, **kw, backend=name)
                            if not torch.equal(m, mask):
                                raise ValueError("the op chose a different block mask than draft_block_mask")
                            if tuple(out.shape) != tuple(q.shape) or out.dtype != dtype:
                                raise ValueError(f"output {tuple(out.shape)} {out.dtype} != {tuple(q.shape)} {dtype}")
                            row.rel_err = harness.rel_err(out, ref)
                            finite = bool(torch.isfinite(out).all())
                            tol = CPU_TOL[dname]
                            row.status = "ok" if finite and row.rel_err < tol else "fail"
                            row.note = f"tol {tol:g}; block density {mask.float().mean().item():.2f}" + \
                                ("" if finite else "; non-finite output")
                        except Exception as e:
                            row.status, row.note = "fail", "error: " + _short(e)
                        rows.append(row)
    return rows, all(r.status == "ok" for r in rows)


print_cpu_table = harness.print_cpu_table
