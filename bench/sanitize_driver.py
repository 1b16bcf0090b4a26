"""Run each GPU kernel of sparsekit once on small odd shapes (for compute-sanitizer).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 \\
        compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_driver.py

Turning off torch's caching allocator makes every tensor its own device
allocation, so an out-of-bounds access by a kernel lands outside any
allocation and memcheck reports it (inside a cached pool block it would not).

Covers: ``sparse24_linear`` forward with the ``triton`` and (where built)
``cuda`` backends, and the backward kernels (grad input, grad values) through
autograd, both directly on the op and through ``sparsekit.nn.SparseLinear``.
Each result is also compared with the ``reference`` backend, so the driver
doubles as a quick numerical check; exit status 1 on any mismatch or error.
Without CUDA it prints a note and exits 0.
"""
from __future__ import annotations

import sys
import traceback

import torch

FWD_SHAPES = [(1, 33, 100), (3, 64, 72), (17, 130, 264), (70, 96, 200), (5, 257, 1000)]
CUDA_SHAPES = [(1, 33, 100), (7, 64, 72), (16, 257, 1000), (2, 4096, 4104)]
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


def main(argv=None) -> int:
    global DEVICE
    argv = sys.argv[1:] if argv is None else argv
    if "--cpu" in argv:
        return _cpu_dry_run()
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
    half = [torch.float16, torch.bfloat16]
    # every shape in fp16; fewer for the other dtypes (memcheck slows every launch)
    forward("triton", FWD_SHAPES, [torch.float16], gen)
    forward("triton", FWD_SHAPES[1:4], [torch.bfloat16, torch.float32], gen)
    if "cuda" in backends:
        forward("cuda", CUDA_SHAPES, half, gen)
    else:
        print("skip cuda backend: not available (csrc extension not built)")
    backward_op("triton", BWD_SHAPES, half + [torch.float32], gen)
    backward_module("triton", BWD_SHAPES, [torch.float16, torch.float32], gen)
    block_sparse("triton", BLOCK_CASES, [torch.float16, torch.bfloat16], gen)
    int4("triton", INT4_CASES, [torch.float16, torch.bfloat16], gen)
    print(f"sanitize_driver: {_ran} checks, {len(_failures)} failed")
    for f in _failures:
        print(f"  FAILED {f}")
    return 1 if _failures else 0


def _cpu_dry_run() -> int:
    """The same code paths on CPU tensors with the ``interpret`` backend (tiny shapes)."""
    global DEVICE
    DEVICE = "cpu"
    gen = torch.Generator().manual_seed(0)
    forward("interpret", FWD_SHAPES[:2], [torch.float16, torch.float32], gen)
    backward_op("interpret", BWD_SHAPES[:1], [torch.float32], gen)
    backward_module("interpret", BWD_SHAPES[:1], [torch.float32], gen)
    block_sparse("interpret", BLOCK_CASES[:2], [torch.float32, torch.bfloat16], gen)
    int4("interpret", INT4_CASES[:1] + INT4_CASES[2:3], [torch.float16, torch.bfloat16], gen)
    print(f"sanitize_driver (cpu dry run): {_ran} checks, {len(_failures)} failed")
    return 1 if _failures else 0


if __name__ == "__main__":
    sys.exit(main())
