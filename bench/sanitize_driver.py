"""Run each GPU kernel of sparsekit once on small odd shapes (for compute-sanitizer).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 \\
        compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_driver.py

Turning off torch's caching allocator makes every tensor its own device
allocation, so an out-of-bounds access by a kernel lands outside any
allocation and memcheck reports it (inside a cached pool block it would not).

Covers: ``sparse24_linear`` forward with the ``triton`` and (where built)
``cuda`` backends (the M <= 16 GEMV and the mma.sp GEMM above it), the int8
2:4 ``mma.sp`` kernel (``sparse24_int8_linear``, cuda vs reference), and the
backward kernels (grad input, grad values) through autograd, both directly on
the op and through ``sparsekit.nn.SparseLinear``.
Each result is also compared with the ``reference`` backend, so the driver
doubles as a quick numerical check; exit status 1 on any mismatch or error.
Without CUDA it prints a note and exits 0.

``--small`` (what ``make gpu-check`` runs under memcheck, where every launch is
slow): one small case per kernel family and backend -- the first fp16 case of
each family in ``bench/gpu_smoke.py`` (same shapes, so the Triton kernels come
from the cache the smoke step filled) -- plus the smallest backward case of
2:4, block-sparse and int4.  ``--cpu --small``: the same on the interpreter.
"""
from __future__ import annotations

import sys
import traceback

import torch

FWD_SHAPES = [(1, 33, 100), (3, 64, 72), (17, 130, 264), (70, 96, 200), (5, 257, 1000)]
CUDA_SHAPES = [(1, 33, 100), (7, 64, 72), (16, 257, 1000), (2, 4096, 4104)]
# the mma.sp GEMM: every tile class (M <= 32, <= 64, larger), odd N/K, K padding, partial tiles
MMA_SHAPES = [(17, 33, 100), (40, 70, 136), (64, 129, 264), (130, 257, 1000), (33, 4096, 4104)]
INT8_24_SHAPES = [(1, 33, 100), (17, 70, 136), (130, 257, 1000)]
BWD_SHAPES = [(3, 33, 100), (19, 70, 136)]
TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-3}

DEVICE = "cuda"   # `--cpu`: run the same checks on CPU tensors with the interpreter (a dry run)

_failures: list[str] = []
_ran = 0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den else (a - b).norm().item()


def _check(label: str, out: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    global _ran
    _ran += 1
    err = _rel(out, ref)
    ok = bool(torch.isfinite(out).all()) and err < TOL[dtype]
    print(f"{'ok  ' if ok else 'FAIL'} {label}: rel_err {err:.2e}", flush=True)
    if not ok:
        _failures.append(f"{label}: rel_err {err:.2e}")


def _guard(label: str, fn) -> None:
    try:
        fn()
    except Exception as e:
        print(f"FAIL {label}: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
        _failures.append(f"{label}: {type(e).__name__}: {e}")
    finally:
        if DEVICE == "cuda":
            torch.cuda.synchronize()


def _weight(n, k, dtype, gen):
    from sparsekit.formats import Sparse24Weight
    from sparsekit.prune import mask_2to4

    w = torch.randn(n, k, device=DEVICE, generator=gen) * k ** -0.5
    w = (w * mask_2to4(w)).to(dtype)
    b = (torch.randn(n, device=DEVICE, generator=gen) * 0.1).to(dtype)
    return w, Sparse24Weight.from_dense(w), b


def forward(backend: str, shapes, dtypes, gen) -> None:
    from sparsekit.ops import sparse24_linear

    for (m, n, k) in shapes:
        for dtype in dtypes:
            def one():
                w, sw, b = _weight(n, k, dtype, gen)
                x = torch.randn(m, k, device=DEVICE, generator=gen).to(dtype)
                out = sparse24_linear(x, sw, b, backend=backend)
                ref = sparse24_linear(x, sw, b, backend="reference")
                _check(f"fwd {backend} M={m} N={n} K={k} {dtype}", out, ref, dtype)
            _guard(f"fwd {backend} M={m} N={n} K={k} {dtype}", one)


def int8_24(backend: str, shapes, dtypes, gen) -> None:
    """int8 2:4 forward (per-token int8 activations, int8 2:4 weight) vs the fake-quant reference."""
    from sparsekit.formats.sparse24 import Sparse24Int8Weight
    from sparsekit.ops.sparse24_int8 import sparse24_int8_linear

    for (m, n, k) in shapes:
        for dtype in dtypes:
            def one():
                w, sw, b = _weight(n, k, torch.float32, gen)
                q = Sparse24Int8Weight.from_sparse24(sw)
                x = torch.randn(m, k, device=DEVICE, generator=gen).to(dtype)
                bb = b.to(dtype)
                out = sparse24_int8_linear(x, q, bb, backend=backend)
                ref = sparse24_int8_linear(x, q, bb, backend="reference")
                _check(f"int8-2:4 {backend} M={m} N={n} K={k} {dtype}", out, ref, dtype)
            _guard(f"int8-2:4 {backend} M={m} N={n} K={k} {dtype}", one)


def backward_op(backend: str, shapes, dtypes, gen) -> None:
    """grad input through the op itself (the weight container is not a leaf)."""
    from sparsekit.ops import sparse24_linear

    for (m, n, k) in shapes:
        for dtype in dtypes:
            def one():
                w, sw, b = _weight(n, k, dtype, gen)
                x = torch.randn(m, k, device=DEVICE, generator=gen).to(dtype)
                g = torch.randn(m, n, device=DEVICE, generator=gen).to(dtype)
                grads = []
                for be in (backend, "reference"):
                    xx = x.clone().requires_grad_(True)
                    y = sparse24_linear(xx, sw, b, backend=be)
                    grads.append(torch.autograd.grad(y, xx, g)[0])
                _check(f"bwd-op dx {backend} M={m} N={n} K={k} {dtype}", grads[0], grads[1], dtype)
            _guard(f"bwd-op {backend} M={m} N={n} K={k} {dtype}", one)


def backward_module(backend: str, shapes, dtypes, gen) -> None:
    """dx, dvalues and dbias through sparsekit.nn.SparseLinear."""
    try:
        from sparsekit.nn import SparseLinear
    except ImportError as e:
        print(f"skip SparseLinear backward: {e}")
        return
    for (m, n, k) in shapes:
        for dtype in dtypes:
            def one():
                lin = torch.nn.Linear(k, n, bias=True, device=DEVICE, dtype=dtype)
                x = torch.randn(2, m, k, device=DEVICE, generator=gen).to(dtype)
                g = torch.randn(2, m, n, device=DEVICE, generator=gen).to(dtype)
                res = []
                for be in (backend, "reference"):
                    mod = SparseLinear.from_dense(lin, backend=be)
                    xx = x.clone().requires_grad_(True)
                    params = [xx, mod.values] + ([mod.bias] if mod.bias is not None else [])
                    y = mod(xx)
                    res.append(torch.autograd.grad(y, params, g))
                for name, a, r in zip(("dx", "dvalues", "dbias"), res[0], res[1]):
                    _check(f"bwd-module {name} {backend} M=2x{m} N={n} K={k} {dtype}", a, r, dtype)
            _guard(f"bwd-module {backend} M=2x{m} N={n} K={k} {dtype}", one)


BLOCK_CASES = [  # (M, N, K, block_size, sparsity): odd edges, non-square blocks, empty rows
    (1, 70, 130, (16, 32), 0.5),
    (37, 129, 200, (32, 16), 0.75),
    (300, 257, 520, (64, 64), 0.9),
    (5, 96, 64, (128, 32), 0.0),
]


def block_sparse(backend: str, cases, dtypes, gen) -> None:
    """Forward and backward (dx, dblocks, dbias) of BlockSparseLinear vs its reference."""
    from sparsekit.nn import BlockSparseLinear

    for (m, n, k, bs, sp) in cases:
        for dtype in dtypes:
            def one():
                lin = torch.nn.Linear(k, n, bias=True, device=DEVICE, dtype=dtype)
                x = torch.randn(m, k, device=DEVICE, generator=gen).to(dtype)
                g = torch.randn(m, n, device=DEVICE, generator=gen).to(dtype)
                res = []
                for be in (backend, "reference"):
                    mod = BlockSparseLinear.from_dense(lin, bs, sparsity=sp, backend=be)
                    xx = x.clone().requires_grad_(True)
                    y = mod(xx)
                    res.append((y.detach(),) + torch.autograd.grad(y, [xx, mod.blocks, mod.bias], g))
                for name, a, r in zip(("y", "dx", "dblocks", "dbias"), res[0], res[1]):
                    _check(f"block {name} {backend} M={m} N={n} K={k} b={bs} s={sp} {dtype}", a, r, dtype)
            _guard(f"block {backend} M={m} N={n} K={k} b={bs} {dtype}", one)


INT4_CASES = [  # (M, N, K, group_size, symmetric): GEMV/split-K and tiled paths, every group size
    (1, 70, 256, 128, False),
    (16, 129, 512, 32, True),
    (37, 100, 160, 32, False),
    (300, 257, 512, -1, False),
]


def int4(backend: str, cases, dtypes, gen) -> None:
    """W4A16 forward (and the grad of x) vs the reference on the dequantized weight."""
    from sparsekit.formats import Int4Weight
    from sparsekit.ops import int4_linear

    for (m, n, k, gs, sym) in cases:
        for dtype in dtypes:
            def one():
                w = Int4Weight.from_float(torch.randn(n, k, device=DEVICE, generator=gen), gs, sym, dtype=dtype)
                x = torch.randn(m, k, device=DEVICE, generator=gen).to(dtype)
                b = torch.randn(n, device=DEVICE, generator=gen).to(dtype)
                g = torch.randn(m, n, device=DEVICE, generator=gen).to(dtype)
                res = []
                for be in (backend, "reference"):
                    xx = x.clone().requires_grad_(True)
                    y = int4_linear(xx, w, b, backend=be)
                    res.append((y.detach(), torch.autograd.grad(y, xx, g)[0]))
                for name, a, r in zip(("y", "dx"), res[0], res[1]):
                    _check(f"int4 {name} {backend} M={m} N={n} K={k} g={gs} sym={sym} {dtype}", a, r, dtype)
            _guard(f"int4 {backend} M={m} N={n} K={k} g={gs} {dtype}", one)


INT8_CASES = [  # (M, N, K, group_size, symmetric): W4A8 GEMV/split-K and tiled paths; W8A8 on K - 3 (odd)
    (1, 70, 256, 128, False),
    (16, 129, 512, 32, True),
    (37, 100, 160, 32, False),
    (300, 257, 512, -1, False),
]


def int8_act(backend: str, cases, dtypes, gen) -> None:
    """W4A8 / W8A8 with per-token int8 and mixed 4/8-bit activations, and the per-token quantizer, vs reference."""
    from sparsekit.formats.int4 import Int4Weight
    from sparsekit.formats.int8 import Int8Weight
    from sparsekit.ops.act_quant import per_token_quant
    from sparsekit.ops.int8 import int8_linear, w4a8_linear

    for (m, n, k, gs, sym) in cases:
        for dtype in dtypes:
            def one():
                wf = torch.randn(n, k, device=DEVICE, generator=gen)
                w4 = Int4Weight.from_float(wf, gs, sym, dtype=dtype)
                w8 = Int8Weight.from_float(wf[:, :k - 3])
                x = torch.randn(m, k, device=DEVICE, generator=gen).to(dtype)
                b = torch.randn(n, device=DEVICE, generator=gen).to(dtype)
                for act in (8, "mixed"):
                    out = w4a8_linear(x, w4, b, act_bits=act, backend=backend)
                    ref = w4a8_linear(x, w4, b, act_bits=act, backend="reference")
                    _check(f"w4a8 act={act} {backend} M={m} N={n} K={k} g={gs} sym={sym} {dtype}", out, ref, dtype)
                    x8 = x[:, :k - 3]
                    out = int8_linear(x8, w8, b, act_bits=act, backend=backend)
                    ref = int8_linear(x8, w8, b, act_bits=act, backend="reference")
                    _check(f"w8a8 act={act} {backend} M={m} N={n} K={k - 3} {dtype}", out, ref, dtype)
                q, s = per_token_quant(x, 8, backend=backend)
                qr, sr = per_token_quant(x, 8, backend="reference")
                _check(f"act-quant {backend} M={m} K={k} {dtype}", q.float() * s, qr.float() * sr, dtype)
            _guard(f"int8-act {backend} M={m} N={n} K={k} g={gs} {dtype}", one)


# (N, C, CO, H, W, k, stride, padding, dilation, tile): odd sizes, partial tiles, tile 1 / 3 / 8
TGC_CASES = [(2, 20, 33, 13, 11, 3, 1, 1, 1, 8), (1, 16, 24, 15, 13, 3, 2, 1, 1, 4), (2, 17, 16, 11, 9, 5, 1, 4, 2, 3),
             (1, 64, 130, 37, 41, 1, 1, 0, 1, 1)]


def triple_gate_conv(backend: str, cases, dtypes, gen) -> None:
    """Gate kernels (pixel maps + tile gate + list) and the gated conv (UPDATE/SKIP/REUSE mix) vs reference."""
    from sparsekit.ops import triple_gate_conv as tgc

    for (n, c, co, h, w, k, s, p, d, tile) in cases:
        for dtype in dtypes:
            def one():
                x = torch.randn(n, c, h, w, device=DEVICE, generator=gen).to(dtype)
                x = x.contiguous(memory_format=torch.channels_last)
                xp = x.clone()
                xp[:, :, : h // 2, : w // 3] += 0.5
                wt = (torch.randn(co, c, k, k, device=DEVICE, generator=gen) * (c * k * k) ** -0.5).to(dtype)
                b = (torch.randn(co, device=DEVICE, generator=gen) * 0.1).to(dtype)
                imp = torch.randn(c, device=DEVICE, generator=gen)
                ho, wo = tgc.conv_output_size(h, w, k, s, p, d)
                th, tw = tgc.tile_grid(ho, wo, tile)
                prev_gate = torch.randint(0, 3, (n, th, tw), device=DEVICE, generator=gen).to(torch.int8)
                kw = dict(importance_weight=imp, importance_bias=0.1, skip_logit=-0.3, prev_gate=prev_gate)
                g = tgc.triple_gate_map(x, xp, k, s, p, d, tile, 0.25, backend=backend, **kw)
                gr = tgc.triple_gate_map(x, xp, k, s, p, d, tile, 0.25, backend="reference", **kw)
                if not torch.equal(g.gate, gr.gate) or not torch.equal(g.counts, gr.counts):
                    raise AssertionError("gate map / counts differ from the reference")
                prev = torch.randn(n, co, ho, wo, device=DEVICE, generator=gen).to(dtype)
                out = prev.clone().contiguous(memory_format=torch.channels_last)
                tgc.triple_gate_conv2d(x, wt, b, g, out, s, p, d, tile, backend=backend)
                ref = prev.clone()
                tgc.triple_gate_conv2d(x, wt, b, gr.gate, ref, s, p, d, tile, backend="reference")
                _check(f"tgconv {backend} N={n} C={c} CO={co} {h}x{w} k={k} s={s} p={p} d={d} tile={tile} {dtype}",
                       out, ref, dtype)
            _guard(f"tgconv {backend} {h}x{w} k={k} tile={tile} {dtype}", one)


DRAFT_CASES = [  # (frames, height, width, pool, text_tokens, text_position, head_dim, sparsity)
    (2, 7, 10, (4, 4), 5, "leading", 64, 0.5),
    (1, 13, 37, (8, 16), 77, "trailing", 128, 0.9),
    (2, 16, 32, (8, 16), 0, "leading", 128, 0.0),
    (1, 9, 17, (8, 16), 3, "leading", 256, 0.75),
]


def draft(backend: str, cases, dtypes, gen) -> None:
    """Draft attention vs the reference with the same block mask (partial patches, text, D 64/128/256)."""
    from sparsekit.ops.draft_attention import block_sparse_attention, draft_block_mask, draft_layout

    for (f, h, w, pool, text, pos, d, sp) in cases:
        for dtype in dtypes:
            def one():
                lay = draft_layout(f, h, w, pool, text, pos, device=DEVICE)
                q, k, v = (torch.randn(2, 3, lay.seq_len, d, device=DEVICE, generator=gen).to(dtype)
                           for _ in range(3))
                m = draft_block_mask(q, k, lay, sp)
                a = block_sparse_attention(q, k, v, m, lay, backend=backend)
                r = block_sparse_attention(q, k, v, m, lay, backend="reference")
                _check(f"draft {backend} {f}x{h}x{w} pool={pool} text={text} D={d} s={sp} {dtype}", a, r, dtype)
            _guard(f"draft {backend} {f}x{h}x{w} D={d} {dtype}", one)


SP24Q_CASES = [  # (M, N, K, group_size in compressed columns): K padded to 16, single group, split-K sizes
    (1, 70, 256, 64),
    (17, 129, 200, -1),
    (300, 257, 512, 128),
]


def sparse24_int4(backend: str, cases, dtypes, gen) -> None:
    """2:4 + int4 forward vs the reference on the same dequantized weight."""
    from sparsekit.formats.sparse24_int4 import Sparse24Int4Weight
    from sparsekit.ops.sparse24_int4 import sparse24_int4_linear
    from sparsekit.prune import mask_2to4

    for (m, n, k, gs) in cases:
        for dtype in dtypes:
            def one():
                wf = torch.randn(n, k, device=DEVICE, generator=gen)
                w = Sparse24Int4Weight.from_dense(wf, mask=mask_2to4(wf), group_size=gs, dtype=dtype)
                x = torch.randn(m, k, device=DEVICE, generator=gen).to(dtype)
                b = torch.randn(n, device=DEVICE, generator=gen).to(dtype)
                out = sparse24_int4_linear(x, w, b, backend=backend)
                ref = sparse24_int4_linear(x, w, b, backend="reference")
                _check(f"sparse24_int4 {backend} M={m} N={n} K={k} g={gs} {dtype}", out, ref, dtype)
            _guard(f"sparse24_int4 {backend} M={m} N={n} K={k} {dtype}", one)



def small(device: str, gen) -> None:
    """One small case per family and backend (gpu_smoke's first fp16 case of each) + small backward cases."""
    global _ran
    from sparsekit.bench import gpu_smoke

    if device == "cuda":
        from sparsekit.ops import _cuda
        all_cases = gpu_smoke.gpu_cases(_cuda.available())
        cases = gpu_smoke.first_per_family(all_cases)
        # the csrc mma.sp GEMM too (the first 2:4 cuda case is the M <= 16 GEMV)
        cases += [c for c in all_cases if c.family == "sparse24" and c.backend == "cuda" and c.dtype == "fp16"
                  and c.params[0] == 17]
        if not _cuda.available():
            print(f"skip cuda backend: {_cuda.unavailable_reason()}", flush=True)
        backend = "triton"
    else:
        cases = gpu_smoke.first_per_family(gpu_smoke.dry_run_cases())
        backend = "interpret"
    for c in cases:
        r = gpu_smoke.run_case(c, device)
        _ran += 1
        print(gpu_smoke.format_line(c, r), flush=True)
        if r.status == "FAIL":
            _failures.append(f"{c.name}: {r.note or r.rel_err}")
        if device == "cuda":
            torch.cuda.synchronize()
    backward_op(backend, BWD_SHAPES[:1], [torch.float16], gen)
    block_sparse(backend, BLOCK_CASES[:1], [torch.float16], gen)
    int4(backend, INT4_CASES[:1], [torch.float16], gen)


def main(argv=None) -> int:
    global DEVICE
    argv = sys.argv[1:] if argv is None else argv
    if "--cpu" in argv:
        return _cpu_dry_run(small_only="--small" in argv)
    if not torch.cuda.is_available():
        print("sanitize_driver: no CUDA device; nothing to run (`--cpu` for a dry run on the interpreter)")
        return 0
    DEVICE = "cuda"
    try:
        from sparsekit.ops import available_backends
    except ImportError as e:
        print(f"sanitize_driver: sparsekit.ops not importable: {e}")
        return 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    backends = available_backends("sparse24_linear", "cuda")
    print(f"device {torch.cuda.get_device_name()} | sparse24_linear backends: {backends}", flush=True)
    if "--small" in argv:
        small("cuda", gen)
        print(f"sanitize_driver (small): {_ran} checks, {len(_failures)} failed")
        for f in _failures:
            print(f"  FAILED {f}")
        return 1 if _failures else 0
    half = [torch.float16, torch.bfloat16]
    # every shape in fp16; fewer for the other dtypes (memcheck slows every launch)
    forward("triton", FWD_SHAPES, [torch.float16], gen)
    forward("triton", FWD_SHAPES[1:4], [torch.bfloat16, torch.float32], gen)
    if "cuda" in backends:
        forward("cuda", CUDA_SHAPES, half, gen)
        from sparsekit.ops import _cuda
        if _cuda.has_mma_sp():
            forward("cuda", MMA_SHAPES, half, gen)
            int8_24("cuda", INT8_24_SHAPES, [torch.float16, torch.bfloat16], gen)
        else:
            print("skip cuda mma.sp GEMM: not in this build of sparsekit._C")
    else:
        print("skip cuda backend: not available (csrc extension not built)")
    int8_24("triton", INT8_24_SHAPES, [torch.float16], gen)
    backward_op("triton", BWD_SHAPES, half + [torch.float32], gen)
    backward_module("triton", BWD_SHAPES, [torch.float16, torch.float32], gen)
    block_sparse("triton", BLOCK_CASES, [torch.float16, torch.bfloat16], gen)
    int4("triton", INT4_CASES, [torch.float16, torch.bfloat16], gen)
    int8_act("triton", INT8_CASES, half, gen)
    sparse24_int4("triton", SP24Q_CASES, half, gen)
    triple_gate_conv("triton", TGC_CASES, [torch.float16, torch.bfloat16, torch.float32], gen)
    draft("triton", DRAFT_CASES, half, gen)
    print(f"sanitize_driver: {_ran} checks, {len(_failures)} failed")
    for f in _failures:
        print(f"  FAILED {f}")
    return 1 if _failures else 0


def _cpu_dry_run(small_only: bool = False) -> int:
    """The same code paths on CPU tensors with the ``interpret`` backend (tiny shapes)."""
    global DEVICE
    DEVICE = "cpu"
    gen = torch.Generator().manual_seed(0)
    if small_only:
        small("cpu", gen)
        print(f"sanitize_driver (cpu dry run, small): {_ran} checks, {len(_failures)} failed")
        for f in _failures:
            print(f"  FAILED {f}")
        return 1 if _failures else 0
    forward("interpret", FWD_SHAPES[:2], [torch.float16, torch.float32], gen)
    int8_24("dense", INT8_24_SHAPES[:2], [torch.float32], gen)
    int8_24("interpret", INT8_24_SHAPES[:2], [torch.float16], gen)
    backward_op("interpret", BWD_SHAPES[:1], [torch.float32], gen)
    backward_module("interpret", BWD_SHAPES[:1], [torch.float32], gen)
    block_sparse("interpret", BLOCK_CASES[:2], [torch.float32, torch.bfloat16], gen)
    int4("interpret", INT4_CASES[:1] + INT4_CASES[2:3], [torch.float16, torch.bfloat16], gen)
    int8_act("interpret", INT8_CASES[:2], [torch.float16], gen)
    sparse24_int4("interpret", SP24Q_CASES[:2], [torch.float16, torch.bfloat16], gen)
    triple_gate_conv("interpret", TGC_CASES[:2], [torch.float16], gen)
    draft("interpret", DRAFT_CASES[:1], [torch.float32, torch.bfloat16], gen)
    print(f"sanitize_driver (cpu dry run): {_ran} checks, {len(_failures)} failed")
    return 1 if _failures else 0


if __name__ == "__main__":
    sys.exit(main())
