"""The int4 (W4A16) cases under pytest-benchmark (GPU only).

    pytest bench/ --benchmark-only [--benchmark-json=out.json]

A subset of ``bench/int4.py``'s sweep: (N, K) = (4096, 4096), group 128
asymmetric, fp16, M in {1, 16, 4096}, dense vs sparsekit (W4A16, and the
int8-activation rows W4A8, mixed 4/8-bit W4A8 and W8A8).  pytest-benchmark
times with the host clock (each call synchronizes), so the numbers include
launch overhead and are for tracking regressions -- the committed results
come from ``sparsekit bench`` (CUDA events, rotated inputs).
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("pytest-benchmark int4 cases need a CUDA device (CPU: `sparsekit bench` runs the "
                "correctness sweep instead)", allow_module_level=True)
pytest.importorskip("pytest_benchmark")

import torch.nn.functional as F  # noqa: E402

from . import int4  # noqa: E402

N, K = 4096, 4096
MS = [1, 16, 4096]
N_SETS = 4
BACKENDS = ("dense", "triton", "sparsekit_auto", "triton_w4a8", "triton_w4a8_mixed", "triton_w8a8")


@pytest.fixture(scope="module")
def weights():
    from sparsekit.formats.int8 import Int8Weight

    gen = torch.Generator(device="cuda").manual_seed(0)
    quants, dense, q8s = [], [], []
    bias = None
    for _ in range(N_SETS):
        w, q, b = int4.make_weight(N, K, torch.float16, "cuda", gen)
        quants.append(q)
        dense.append(q.dequantize())
        q8s.append(Int8Weight.from_float(w))
        bias = b if bias is None else bias
    return quants, dense, bias, q8s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", MS)
def test_int4_linear(benchmark, weights, backend, m):
    from sparsekit.ops import int4 as ops

    quants, dense, bias, q8s = weights
    a8 = int4.split_a8(backend)
    tol = int4.GPU_TOL
    if backend == "dense":
        fn, ws = (lambda x, w: F.linear(x, w, bias)), dense
    elif backend == "triton":
        fn, ws = (lambda x, w: ops.int4_linear(x, w, bias, backend="triton")), quants
    elif a8 is not None:
        fn = (lambda x, w: int4.a8_call(a8[1], x, w[0], w[1], bias, backend=a8[0]))
        ws = list(zip(quants, q8s))
        tol = int4.A8_TOL
    else:
        fn, ws = (lambda x, w: ops.int4_linear(x, w, bias)), quants
    gen = torch.Generator(device="cuda").manual_seed(m)
    xs = [torch.randn(m, K, device="cuda", generator=gen).half() for _ in range(N_SETS)]
    if a8 is not None:   # the same fake-quantized activations and the variant's own weight
        ref = int4.a8_reference(a8[1], xs[0], quants[0], q8s[0], bias)
    else:
        ref = F.linear(xs[0].float(), dense[0].float(), bias.float())
    out = fn(xs[0], ws[0])
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < tol, f"{backend} rel_err {err:.3g}"

    state = {"i": 0}

    def call():
        i = state["i"] = (state["i"] + 1) % N_SETS
        fn(xs[i], ws[i])
        torch.cuda.synchronize()

    benchmark.extra_info.update(case=f"M={m},N={N},K={K},group={int4.GROUP_SIZE}", backend=backend, dtype="fp16")
    benchmark.pedantic(call, rounds=100, iterations=1, warmup_rounds=10)
