"""GPU smoke test: every kernel family, backend and dtype on a few odd shapes against float64 math.

    python -m sparsekit.bench.gpu_smoke [--out smoke.txt] [--workers N] [--dry-run] [--list]

Step b of ``make gpu-check`` (``bench/gpu_check.py``).  Families: 2:4 (fp16, bf16,
fp32 with and without ``allow_tf32``; Triton and, where built, the csrc ``cuda``
backend), int8 2:4 (Triton and ``cuda``), block-sparse, int4 W4A16, W8A8, W4A8,
mixed 4/8-bit activations, 2:4+int4, DraftAttention, the triple-gate conv (gate
map and conv) and the per-token activation quantizer.

Every case draws fresh random inputs, runs the op with its outputs poisoned
(``sparsekit.testing.poison_outputs``: NaN-filled before the kernel runs; for
outputs that the csrc extension allocates itself, a NaN-filled block of the
output's size is handed back to the caching allocator just before the call;
the triple-gate conv's output holds NaN in every UPDATE/SKIP tile), and
checks ``||out - ref|| / ||ref||`` against a float64 reference of the same
pruned / dequantized / fake-quantized weight, with the bounds of
``sparsekit.testing.REL_TOL`` (fp32 1e-5, fp16 1e-3, bf16 1e-2; fp32 with
``allow_tf32``: 1e-3, tf32 keeps fp16's 10-bit mantissa).  Any non-finite
element (an unwritten output) fails the case.  Where PyTorch computes the same
function in the same dtype (cuBLAS / SDPA), its error is reported too, and a
kernel error above 2x PyTorch's is flagged ``WARN`` (the test suite's
stricter criterion; the case still passes on the bound).  The quantizer must
match ``per_token_quant_reference`` bit for bit.

One line per case is appended to ``--out`` as it finishes::

    PASS  sparse24/triton/fp16  M=17,N=70,K=136  rel_err 1.9e-04 <= 1e-03  torch 1.8e-04 (1.1x)  0.41 s

``--workers N`` runs the cases in N processes (grouped by family, backend and
dtype, so each process compiles one family's kernels; Triton's on-disk cache
is shared through ``TRITON_CACHE_DIR``); a case that never reports (its
process died) gets a ``FAIL ... not run: worker exited ...`` line.  Exit
status 1 if any case failed.

``--dry-run`` (no GPU needed): the first case of every family/dtype on CPU
tensors with the ``interpret`` backend (the Triton interpreter), same checks.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import tempfile
import time
import zlib
from typing import Callable

FAMILIES = ("sparse24", "sparse24_int8", "block_sparse", "int4_w4a16", "w8a8", "w4a8", "mixed_a8",
            "sparse24_int4", "draft_attention", "triple_gate_conv", "per_token_quant")
# every family has these backends on a GPU ("cuda" only where the csrc extension is built)
CUDA_FAMILIES = ("sparse24", "sparse24_int8")
TF32_TOL = 1e-3          # fp32 with allow_tf32: fp16's 10-bit mantissa, so fp16's bound
TORCH_FACTOR = 2.0       # WARN when the kernel's error exceeds this multiple of PyTorch's
FRAC8 = 0.25             # mixed activations: fraction of tokens at 8 bits


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    backend: str            # triton | cuda (interpret on a CPU dry run)
    dtype: str              # fp16 | bf16 | fp32 | tf32 (fp32 with torch.backends.cuda.matmul.allow_tf32)
    params: tuple           # family-specific, see CASES
    label: str              # the shape / options as key=value pairs

    @property
    def unit(self) -> str:
        return f"{self.family}/{self.backend}/{self.dtype}"

    @property
    def name(self) -> str:
        return f"{self.unit}  {self.label}"


def _kv(**kw) -> str:
    return ",".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in kw.items())


def _cases() -> list[Case]:
    out: list[Case] = []

    def add(family, backends, dtypes, params_list, label):
        for be in backends:
            for dt in dtypes:
                for p in params_list:
                    out.append(Case(family, be, dt, p, label(*p)))

    # (M or lead dims, N, K): M = 1, a leading batch, odd N/K (K padding), split-K and tiled paths
    sp24 = [(1, 33, 100), (17, 70, 136), ((2, 5), 96, 200), (130, 257, 1000)]
    add("sparse24", ["triton"], ["fp16", "bf16", "fp32", "tf32"], sp24, lambda m, n, k: _kv(M=m, N=n, K=k))
    # csrc: the GEMV (M <= 16, fp16/bf16/fp32) and the mma.sp GEMM (M > 16, fp16/bf16)
    add("sparse24", ["cuda"], ["fp16", "bf16"], [(1, 33, 100), (16, 257, 1000), (17, 70, 136), (130, 257, 1000)],
        lambda m, n, k: _kv(M=m, N=n, K=k))
    add("sparse24", ["cuda"], ["fp32"], [(1, 33, 100), (7, 64, 72)], lambda m, n, k: _kv(M=m, N=n, K=k))
    add("sparse24_int8", ["triton", "cuda"], ["fp16", "bf16"], [(1, 33, 100), (17, 70, 136), (130, 257, 1000)],
        lambda m, n, k: _kv(M=m, N=n, K=k))
    # (M, N, K, (bm, bk), sparsity): non-square blocks, partial edge blocks
    add("block_sparse", ["triton"], ["fp16", "bf16", "fp32", "tf32"],
        [(1, 70, 130, (16, 32), 0.5), (37, 129, 200, (32, 16), 0.75), (300, 257, 520, (64, 64), 0.75)],
        lambda m, n, k, bs, sp: _kv(M=m, N=n, K=k, block=bs, sparsity=sp))
    # (M, N, K, group, symmetric): GEMV/split-K and tiled paths, group 32 / 128 / whole row
    i4 = [(1, 70, 256, 128, False), (16, 129, 512, 32, True), (37, 100, 160, 32, False), (300, 257, 512, -1, False)]
    add("int4_w4a16", ["triton"], ["fp16", "bf16"], i4, lambda m, n, k, g, s: _kv(M=m, N=n, K=k, group=g, sym=int(s)))
    add("w8a8", ["triton"], ["fp16", "bf16"], [(1, 70, 253), (37, 100, 157), (300, 257, 509)],
        lambda m, n, k: _kv(M=m, N=n, K=k))
    add("w4a8", ["triton"], ["fp16", "bf16"], [i4[0], (37, 100, 160, 32, True), i4[3]],
        lambda m, n, k, g, s: _kv(M=m, N=n, K=k, group=g, sym=int(s)))
    # (weight kind, M, N, K, group, symmetric): top 25% of tokens at 8 bits, the rest at 4
    add("mixed_a8", ["triton"], ["fp16", "bf16"], [("w4a8", 37, 100, 160, 32, False), ("w8a8", 300, 257, 509, 0, False)],
        lambda w, m, n, k, g, s: _kv(weight=w, M=m, N=n, K=k) + (f",group={g}" if w == "w4a8" else ""))
    # (M, N, K, group in compressed columns)
    add("sparse24_int4", ["triton"], ["fp16", "bf16"], [(1, 70, 256, 64), (17, 129, 200, -1), (300, 257, 512, 128)],
        lambda m, n, k, g: _kv(M=m, N=n, K=k, group=g))
    # (frames, height, width, pool, text, text position, head dim, sparsity): partial patches, text, D 64/128/256
    draft = [(2, 7, 10, (4, 4), 5, "leading", 64, 0.5), (1, 13, 37, (8, 16), 77, "trailing", 128, 0.9),
             (1, 9, 17, (8, 16), 3, "leading", 256, 0.75)]
    dl = (lambda f, h, w, pool, t, pos, d, sp: _kv(frames=f, height=h, width=w, pool=pool, text=t, pos=pos, D=d,
                                                   sparsity=sp))
    add("draft_attention", ["triton"], ["fp16", "bf16"], draft, dl)
    add("draft_attention", ["triton"], ["fp32"], draft[:1], dl)
    # (N, C, CO, H, W, k, stride, padding, dilation, tile): odd sizes, partial tiles, tile 8 / 4 / 1;
    # the first case of each dtype runs the conv's autotuner (the default GPU path), the others the
    # heuristic configuration (SPARSEKIT_TGC_AUTOTUNE=0), so one process compiles 8 + 2 configurations
    tgc = [(2, 20, 33, 13, 11, 3, 1, 1, 1, 8), (1, 16, 24, 15, 13, 3, 2, 1, 1, 4), (1, 64, 130, 37, 41, 1, 1, 0, 1, 1)]
    add("triple_gate_conv", ["triton"], ["fp16", "bf16", "fp32"], tgc,
        lambda n, c, co, h, w, k, s, p, d, t: _kv(N=n, C=c, CO=co, H=h, W=w, k=k, stride=s, padding=p, dilation=d,
                                                  tile=t))
    # (M, K, bits): 8-bit, 4-bit, per-token mixed
    add("per_token_quant", ["triton"], ["fp16", "bf16", "fp32"], [(1, 100, 8), (37, 257, 4), (300, 1000, "mixed")],
        lambda m, k, b: _kv(M=m, K=k, bits=b))
    return out


CASES = _cases()
# rough per-unit cost on a fresh machine (first-launch Triton compiles dominate), for load balancing
UNIT_COST = {"triple_gate_conv": 4.0, "draft_attention": 2.0, "sparse24": 2.0, "block_sparse": 2.0,
             "sparse24_int8": 1.5, "int4_w4a16": 2.0, "w4a8": 1.5, "w8a8": 1.0, "mixed_a8": 1.5,
             "sparse24_int4": 2.0, "per_token_quant": 0.5}


def gpu_cases(have_cuda_ext: bool = True) -> list[Case]:
    return [c for c in CASES if have_cuda_ext or c.backend != "cuda"]


def dry_run_cases() -> list[Case]:
    """The first case of every family / dtype, on the interpreter (no csrc backend on CPU)."""
    seen, out = set(), []
    for c in CASES:
        if c.backend == "cuda" or (c.family, c.dtype) in seen:
            continue
        seen.add((c.family, c.dtype))
        out.append(dataclasses.replace(c, backend="interpret"))
    return out


def first_per_family(cases: list[Case], dtype: str = "fp16") -> list[Case]:
    """One small case per family and backend (the compute-sanitizer set)."""
    seen, out = set(), []
    for c in cases:
        if c.dtype != dtype or (c.family, c.backend) in seen:
            continue
        seen.add((c.family, c.backend))
        out.append(c)
    return out


# --------------------------------------------------------------------------- one case

@dataclasses.dataclass
class Result:
    status: str                     # PASS | FAIL | SKIP
    rel_err: float | None = None
    bound: float | None = None
    torch_err: float | None = None
    note: str = ""
    seconds: float = 0.0

    @property
    def warn(self) -> bool:
        return (self.status == "PASS" and self.torch_err is not None and self.rel_err is not None
                and self.rel_err > TORCH_FACTOR * max(self.torch_err, 1e-7))


def format_line(case: Case, r: Result) -> str:
    parts = [f"{r.status:<4}", f"{case.unit:<34}", case.label]
    if r.rel_err is not None:
        cmp = "<=" if r.status == "PASS" else ">"
        parts.append(f"rel_err {r.rel_err:.1e} {cmp} {r.bound:.0e}" if r.bound is not None else
                     f"rel_err {r.rel_err:.1e}")
    if r.torch_err is not None and r.rel_err is not None:
        ratio = r.rel_err / max(r.torch_err, 1e-30)
        parts.append(f"torch {r.torch_err:.1e} ({ratio:.1f}x)" + (" WARN >2x torch" if r.warn else ""))
    if r.note:
        parts.append(r.note)
    parts.append(f"{r.seconds:.2f} s")
    return "  ".join(parts)


def _torch_dtype(name: str):
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "tf32": torch.float32}[name]


def _bound(name: str) -> float:
    from sparsekit.testing import REL_TOL
    return TF32_TOL if name == "tf32" else REL_TOL[_torch_dtype(name)]


def _poison_cache(nbytes: int, device) -> None:
    """Hand the caching allocator a NaN-filled block of ``nbytes`` (outputs allocated in C++)."""
    import torch
    if device.type != "cuda" or os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
        return
    t = torch.full((max(1, nbytes // 2),), float("nan"), dtype=torch.float16, device=device)
    del t


def _x(lead, k, dtype, dev, gen):
    import torch
    lead = lead if isinstance(lead, tuple) else (lead,)
    return torch.randn(*lead, k, device=dev, generator=gen).to(dtype)


def _rows(lead) -> int:
    return math.prod(lead) if isinstance(lead, tuple) else lead


def _check_linear(case: Case, run: Callable, ref64, torch_out=None, out_bytes: int = 0, dev=None) -> Result:
    """Run ``run()`` with poisoned outputs; compare with the float64 ``ref64``."""
    import torch
    from sparsekit import testing

    if out_bytes and dev is not None:
        _poison_cache(out_bytes, dev)
    with testing.poison_outputs():
        out = run()
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize()
    return _compare(case, out, ref64, torch_out)


def _compare(case: Case, out, ref64, torch_out=None) -> Result:
    import torch
    from sparsekit import testing

    if tuple(out.shape) != tuple(ref64.shape):
        return Result("FAIL", note=f"output shape {tuple(out.shape)} != {tuple(ref64.shape)}")
    want = _torch_dtype(case.dtype)
    if out.dtype != want:
        return Result("FAIL", note=f"output dtype {out.dtype} != {want}")
    bad = int((~torch.isfinite(out)).sum())
    bound = _bound(case.dtype)
    err = testing.rel_err(out, ref64)
    terr = testing.rel_err(torch_out, ref64) if torch_out is not None else None
    if bad:
        return Result("FAIL", err, bound, terr, note=f"{bad} non-finite output element(s) (unwritten or NaN)")
    return Result("PASS" if err <= bound else "FAIL", err, bound, terr)


class _TF32:
    """``torch.backends.cuda.matmul.allow_tf32`` (and cuDNN's) set for the case, restored after."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        import torch
        self.old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = self.on
        torch.backends.cudnn.allow_tf32 = self.on

    def __exit__(self, *exc):
        import torch
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.old


def _sparse24(case, dev, gen):
    import torch.nn.functional as F
    from sparsekit.formats import Sparse24Weight
    from sparsekit.ops import sparse24_linear
    from sparsekit.prune import mask_2to4
    import torch

    lead, n, k = case.params
    dt = _torch_dtype(case.dtype)
    w = torch.randn(n, k, device=dev, generator=gen) * k ** -0.5
    w = (w * mask_2to4(w)).to(dt)
    b = (torch.randn(n, device=dev, generator=gen) * 0.1).to(dt)
    x = _x(lead, k, dt, dev, gen)
    sw = Sparse24Weight.from_dense(w)
    ref = F.linear(x.double(), w.double(), b.double())
    with _TF32(case.dtype == "tf32"):
        tout = F.linear(x, w, b)
        return _check_linear(case, lambda: sparse24_linear(x, sw, b, backend=case.backend), ref, tout,
                             _rows(lead) * n * x.element_size(), dev)


def _sparse24_int8(case, dev, gen):
    import torch
    from sparsekit.formats import Sparse24Weight
    from sparsekit.formats.sparse24 import Sparse24Int8Weight
    from sparsekit.ops.act_quant import per_token_quant_reference
    from sparsekit.ops.sparse24_int8 import sparse24_int8_linear
    from sparsekit.prune import mask_2to4

    m, n, k = case.params
    dt = _torch_dtype(case.dtype)
    w = torch.randn(n, k, device=dev, generator=gen) * k ** -0.5
    q = Sparse24Int8Weight.from_sparse24(Sparse24Weight.from_dense(w * mask_2to4(w)))
    b = (torch.randn(n, device=dev, generator=gen) * 0.1).to(dt)
    x = _x(m, k, dt, dev, gen)
    xq, xs = per_token_quant_reference(x, 8)
    ref = (xq.double() @ q.int_dense().double().t()) * xs.double() * q.scale.double()[None, :] + b.double()
    r = _check_linear(case, lambda: sparse24_int8_linear(x, q, b, backend=case.backend), ref, None,
                      m * n * x.element_size(), dev)
    r.note = (r.note + "; " if r.note else "") + "vs exact int math on the same int8 activations"
    return r


def _block_sparse(case, dev, gen):
    import torch
    import torch.nn.functional as F
    from sparsekit.formats.block_sparse import BlockSparseWeight
    from sparsekit.ops import block_sparse_linear

    m, n, k, bs, sp = case.params
    dt = _torch_dtype(case.dtype)
    w0 = torch.randn(n, k, device=dev, generator=gen) * k ** -0.5
    sw = BlockSparseWeight.from_dense_magnitude(w0, bs, sparsity=sp).to(dt)
    w = sw.to_dense()
    b = (torch.randn(n, device=dev, generator=gen) * 0.1).to(dt)
    x = _x(m, k, dt, dev, gen)
    ref = F.linear(x.double(), w.double(), b.double())
    with _TF32(case.dtype == "tf32"):
        tout = F.linear(x, w, b)
        return _check_linear(case, lambda: block_sparse_linear(x, sw, b, backend=case.backend), ref, tout)


def _int4(case, dev, gen):
    import torch
    import torch.nn.functional as F
    from sparsekit.formats import Int4Weight
    from sparsekit.ops import int4_linear

    m, n, k, gs, sym = case.params
    dt = _torch_dtype(case.dtype)
    q = Int4Weight.from_float(torch.randn(n, k, device=dev, generator=gen) * k ** -0.5, gs, sym, dtype=dt)
    wd = q.dequantize()
    b = (torch.randn(n, device=dev, generator=gen) * 0.1).to(dt)
    x = _x(m, k, dt, dev, gen)
    ref = F.linear(x.double(), wd.double(), b.double())
    return _check_linear(case, lambda: int4_linear(x, q, b, backend=case.backend), ref, F.linear(x, wd, b))


def _a8(case, dev, gen, kind, act, m, n, k, gs, sym):
    import torch
    from sparsekit.formats import Int4Weight
    from sparsekit.formats.int8 import Int8Weight
    from sparsekit.ops.act_quant import per_token_quant_reference, select_token_bits
    from sparsekit.ops.int8 import dequantize_int4_fp32, int8_linear, w4a8_linear

    dt = _torch_dtype(case.dtype)
    wf = torch.randn(n, k, device=dev, generator=gen) * k ** -0.5
    b = (torch.randn(n, device=dev, generator=gen) * 0.1).to(dt)
    x = _x(m, k, dt, dev, gen)
    if kind == "w8a8":
        q8 = Int8Weight.from_float(wf)
        w64 = q8.qweight.double() * q8.scales.double()[:, None]

        def run():
            return int8_linear(x, q8, b, act_bits=act, frac8=FRAC8, backend=case.backend)
    else:
        q4 = Int4Weight.from_float(wf, gs, sym, dtype=dt)
        w64 = dequantize_int4_fp32(q4.qweight, q4.scales, q4.zeros, q4.group_size, q4.in_features).double()

        def run():
            return w4a8_linear(x, q4, b, act_bits=act, frac8=FRAC8, backend=case.backend)
    bits = select_token_bits(x, FRAC8) if act == "mixed" else act
    qx, sx = per_token_quant_reference(x, bits)
    ref = (qx.double() * sx.double()) @ w64.t() + b.double()
    r = _check_linear(case, run, ref)
    r.note = (r.note + "; " if r.note else "") + "vs float64 math on the same fake-quantized activations"
    return r


def _w8a8(case, dev, gen):
    m, n, k = case.params
    return _a8(case, dev, gen, "w8a8", 8, m, n, k, 0, False)


def _w4a8(case, dev, gen):
    m, n, k, gs, sym = case.params
    return _a8(case, dev, gen, "w4a8", 8, m, n, k, gs, sym)


def _mixed(case, dev, gen):
    kind, m, n, k, gs, sym = case.params
    return _a8(case, dev, gen, kind, "mixed", m, n, k, gs, sym)


def _sparse24_int4(case, dev, gen):
    import torch
    import torch.nn.functional as F
    from sparsekit.formats.sparse24_int4 import Sparse24Int4Weight
    from sparsekit.ops.sparse24_int4 import sparse24_int4_linear
    from sparsekit.prune import mask_2to4

    m, n, k, gs = case.params
    dt = _torch_dtype(case.dtype)
    wf = torch.randn(n, k, device=dev, generator=gen) * k ** -0.5
    q = Sparse24Int4Weight.from_dense(wf, mask=mask_2to4(wf), group_size=gs, dtype=dt)
    wd = q.to_dense()
    b = (torch.randn(n, device=dev, generator=gen) * 0.1).to(dt)
    x = _x(m, k, dt, dev, gen)
    ref = F.linear(x.double(), wd.double(), b.double())
    return _check_linear(case, lambda: sparse24_int4_linear(x, q, b, backend=case.backend), ref,
                         F.linear(x, wd.to(dt), b))


def _draft(case, dev, gen):
    import torch
    import torch.nn.functional as F
    from sparsekit.ops.draft_attention import draft_attention, draft_block_mask, draft_layout

    f, h, w, pool, text, pos, d, sp = case.params
    dt = _torch_dtype(case.dtype)
    lay = draft_layout(f, h, w, pool, text, pos, device=dev)
    q, k, v = (torch.randn(2, 3, lay.seq_len, d, device=dev, generator=gen).to(dt) for _ in range(3))
    mask = draft_block_mask(q, k, lay, sp)
    tm = lay.token_mask(mask)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=tm)
    tout = F.scaled_dot_product_attention(q, k, v, attn_mask=tm)
    got = {}

    def run():
        out, m = draft_attention(q, k, v, frames=f, height=h, width=w, sparsity=sp, pool=pool, text_tokens=text,
                                 text_position=pos, return_mask=True, backend=case.backend)
        got["mask"] = m
        return out
    r = _check_linear(case, run, ref, tout)
    if r.status == "PASS" and not torch.equal(got["mask"], mask):
        r.status, r.note = "FAIL", "the op chose a different block mask than draft_block_mask"
    r.note = (r.note + "; " if r.note else "") + f"block density {mask.float().mean().item():.2f}"
    return r


def _tgc(case, dev, gen):
    import torch
    from sparsekit.bench.triple_gate_conv import _composed64
    from sparsekit.ops import triple_gate_conv as tgc

    n, c, co, h, w, k, s, p, d, tile = case.params
    dt = _torch_dtype(case.dtype)
    x = torch.randn(n, c, h, w, device=dev, generator=gen).to(dt).contiguous(memory_format=torch.channels_last)
    xp = x.clone()
    xp[:, :, : h // 2, : w // 3] += 0.5
    wt = (torch.randn(co, c, k, k, device=dev, generator=gen) * (c * k * k) ** -0.5).to(dt)
    b = (torch.randn(co, device=dev, generator=gen) * 0.1).to(dt)
    imp = torch.randn(c, device=dev, generator=gen)
    ho, wo = tgc.conv_output_size(h, w, k, s, p, d)
    th, tw = tgc.tile_grid(ho, wo, tile)
    prev_gate = torch.randint(0, 3, (n, th, tw), device=dev, generator=gen).to(torch.int8)
    kw = dict(importance_weight=imp, importance_bias=0.1, skip_logit=-0.3, prev_gate=prev_gate)
    g = tgc.triple_gate_map(x, xp, k, s, p, d, tile, 0.25, backend=case.backend, **kw)
    gr = tgc.triple_gate_map(x, xp, k, s, p, d, tile, 0.25, backend="reference", **kw)
    if not torch.equal(g.gate, gr.gate) or not torch.equal(g.counts, gr.counts):
        return Result("FAIL", note="gate map / tile counts differ from the reference")
    prev = torch.randn(n, co, ho, wo, device=dev, generator=gen).to(dt)
    pg = tgc.pixel_gate(gr.gate, tile, ho, wo)
    # poisoned: every UPDATE / SKIP pixel must be written, REUSE pixels keep the previous output
    out = torch.where(pg == tgc.REUSE, prev, torch.full_like(prev, float("nan")))
    out = out.contiguous(memory_format=torch.channels_last)
    ref = _composed64(prev, x, wt, b, gr.gate, (s, s), (p, p), (d, d), tile)
    first = case.params == next(cc.params for cc in CASES if cc.family == case.family)
    old = os.environ.get("SPARSEKIT_TGC_AUTOTUNE")
    os.environ["SPARSEKIT_TGC_AUTOTUNE"] = "1" if first else "0"
    try:
        tgc.triple_gate_conv2d(x, wt, b, g, out, s, p, d, tile, backend=case.backend)
    finally:
        if old is None:
            os.environ.pop("SPARSEKIT_TGC_AUTOTUNE", None)
        else:
            os.environ["SPARSEKIT_TGC_AUTOTUNE"] = old
    if dev.type == "cuda":
        torch.cuda.synchronize()
    r = _compare(case, out, ref)
    upd = int((gr.gate == tgc.UPDATE).sum())
    r.note = (r.note + "; " if r.note else "") + (
        f"{upd}/{gr.gate.numel()} tiles UPDATE; gate map equal; conv "
        + ("interpreter config" if dev.type != "cuda" else "autotuned" if first else "heuristic config"))
    return r


def _act_quant(case, dev, gen):
    import torch
    from sparsekit.ops.act_quant import per_token_quant, per_token_quant_reference, select_token_bits

    m, k, bits = case.params
    dt = _torch_dtype(case.dtype)
    x = _x(m, k, dt, dev, gen)
    bb = select_token_bits(x, FRAC8) if bits == "mixed" else bits
    q, s = per_token_quant(x, bb, backend=case.backend)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    qr, sr = per_token_quant_reference(x, bb)
    from sparsekit import testing
    err = testing.rel_err(q.double() * s.double(), qr.double() * sr.double())
    diff_q = int((q != qr).sum())
    diff_s = int((s != sr).sum())
    ok = diff_q == 0 and diff_s == 0 and q.dtype == torch.int8
    note = ("codes and scales bit-identical to the reference" if ok else
            f"{diff_q} code(s) and {diff_s} scale(s) differ from per_token_quant_reference")
    return Result("PASS" if ok else "FAIL", err, None, None, note=note)


RUNNERS = {"sparse24": _sparse24, "sparse24_int8": _sparse24_int8, "block_sparse": _block_sparse,
           "int4_w4a16": _int4, "w8a8": _w8a8, "w4a8": _w4a8, "mixed_a8": _mixed, "sparse24_int4": _sparse24_int4,
           "draft_attention": _draft, "triple_gate_conv": _tgc, "per_token_quant": _act_quant}


def run_case(case: Case, device=None, seed: int = 0) -> Result:
    """One case (never raises: an exception is a FAIL with its message)."""
    import torch

    dev = torch.device(device or ("cuda" if case.backend in ("triton", "cuda") else "cpu"))
    t0 = time.time()
    if case.backend == "cuda":
        from sparsekit.ops import _cuda
        if not _cuda.available():
            return Result("SKIP", note=f"cuda backend not available: {_cuda.unavailable_reason()}")
        if case.family == "sparse24_int8" or (case.family == "sparse24" and _rows(case.params[0]) > _cuda.MAX_M):
            if not _cuda.has_mma_sp():
                return Result("FAIL", note="sparsekit._C has no mma.sp GEMM (rebuild csrc/)")
    gen = torch.Generator(device=dev).manual_seed(seed + zlib.crc32(case.name.encode()) % 100003)
    try:
        r = RUNNERS[case.family](case, dev, gen)
    except Exception as e:  # a crash inside the op is a failure of the case, not of the run
        msg = f"{type(e).__name__}: {e}".replace("\n", " ")
        r = Result("FAIL", note="error: " + (msg if len(msg) < 300 else msg[:297] + "..."))
    r.seconds = time.time() - t0
    return r


# --------------------------------------------------------------------------- runners

def _emit(line: str, out_path: str | None) -> None:
    print(line, flush=True)
    if out_path:
        with open(out_path, "a") as f:   # O_APPEND, one short write per line: safe across processes
            f.write(line + "\n")
            f.flush()


def run_cases(cases: list[Case], out_path: str | None = None, device=None) -> int:
    nfail = 0
    for c in cases:
        r = run_case(c, device)
        nfail += r.status == "FAIL"
        _emit(format_line(c, r), out_path)
    return nfail


def shard(cases: list[Case], workers: int) -> list[list[Case]]:
    """Cases grouped by unit (family/backend/dtype: one process compiles one family's kernels), units
    spread over ``workers`` by longest-processing-time first."""
    units: dict[str, list[Case]] = {}
    for c in cases:
        units.setdefault(c.unit, []).append(c)
    cost = {u: UNIT_COST.get(cs[0].family, 1.0) * (1 + 0.2 * len(cs)) for u, cs in units.items()}
    bins: list[list] = [[0.0, []] for _ in range(max(1, min(workers, len(units))))]
    for u in sorted(units, key=lambda u: -cost[u]):
        b = min(bins, key=lambda b: b[0])
        b[0] += cost[u]
        b[1].extend(units[u])
    return [b[1] for b in bins if b[1]]


def _module_name() -> str:
    spec = globals().get("__spec__")
    return spec.name if spec is not None and spec.name != "__main__" else "sparsekit.bench.gpu_smoke"


def run_parallel(cases: list[Case], out_path: str, workers: int, extra: list[str] | None = None,
                 work_dir: str | None = None) -> int:
    """Each shard in its own process (``--names``); a case that never reports is a FAIL line.
    Shard lists and worker logs go to ``work_dir`` (not next to ``out_path``)."""
    work_dir = work_dir or tempfile.mkdtemp(prefix="sparsekit-smoke-")
    os.makedirs(work_dir, exist_ok=True)
    shards = shard(cases, workers)
    procs = []
    for i, sh in enumerate(shards):
        names_file = os.path.join(work_dir, f"smoke_worker{i}.cases")
        log_file = os.path.join(work_dir, f"smoke_worker{i}.log")
        with open(names_file, "w") as f:
            f.write("\n".join(c.name for c in sh) + "\n")
        cmd = [sys.executable, "-m", _module_name(), "--names", names_file, "--out", out_path] + (extra or [])
        with open(log_file, "w") as log:
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), sh, log_file))
    rc_all = 0
    for p, sh, log_file in procs:
        rc = p.wait()
        rc_all = max(rc_all, 1 if rc else 0)
        done = _reported(out_path)
        for c in sh:
            if c.name not in done:
                _emit(format_line(c, Result("FAIL", note=f"not run: worker exited with status {rc} "
                                                          f"(see {os.path.basename(log_file)})")), out_path)
                rc_all = 1
    return rc_all


def _reported(out_path: str) -> set[str]:
    done = set()
    if os.path.exists(out_path):
        with open(out_path) as f:
            for line in f:
                parts = line.split("  ")
                parts = [p.strip() for p in parts if p.strip()]
                if len(parts) >= 3:
                    done.add(f"{parts[1]}  {parts[2]}")
    return done


def summarize(out_path: str) -> dict:
    """Counts of PASS / FAIL / SKIP / WARN lines in a smoke file, and the FAIL lines."""
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0, "WARN": 0}
    fails = []
    if os.path.exists(out_path):
        with open(out_path) as f:
            for line in f:
                tag = line[:4]
                if tag in counts:
                    counts[tag] += 1
                    if tag == "FAIL":
                        fails.append(line.rstrip())
                if "WARN" in line:
                    counts["WARN"] += 1
    counts["fail_lines"] = fails
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparsekit.bench.gpu_smoke", description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="append one line per case to this file (as each finishes)")
    ap.add_argument("--workers", type=int, default=1, help="processes (cases grouped by family/backend/dtype)")
    ap.add_argument("--dry-run", action="store_true", help="CPU: first case per family/dtype on the interpreter")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--work", help="directory for the workers' case lists and logs (default: a temp dir)")
    ap.add_argument("--names", help=argparse.SUPPRESS)   # a worker's shard: a file of case names
    a = ap.parse_args(argv)
    if a.dry_run:
        cases = dry_run_cases()
    else:
        import torch
        if not a.list and not torch.cuda.is_available():
            print("gpu_smoke: no CUDA device (use --dry-run for the interpreter version)", file=sys.stderr)
            return 2
        cases = CASES
    if a.names:
        with open(a.names) as f:
            wanted = {line.strip() for line in f if line.strip()}
        by_name = {c.name: c for c in cases}
        return 1 if run_cases([by_name[n] for n in by_name if n in wanted], a.out) else 0
    if a.list:
        for c in cases:
            print(c.name)
        print(f"{len(cases)} cases, {len({c.family for c in cases})} families")
        return 0
    t0 = time.time()
    if a.workers > 1:
        if not a.out:
            ap.error("--workers needs --out")
        rc = run_parallel(cases, a.out, a.workers, ["--dry-run"] if a.dry_run else [], a.work)
    else:
        rc = 1 if run_cases(cases, a.out) else 0
    if a.out:
        s = summarize(a.out)
        print(f"gpu_smoke: {s['PASS']} PASS, {s['FAIL']} FAIL, {s['SKIP']} SKIP, {s['WARN']} WARN "
              f"({len(cases)} cases, {time.time() - t0:.0f} s)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
