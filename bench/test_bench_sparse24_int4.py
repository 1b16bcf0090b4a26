"""The 2:4 + int4 cases under pytest-benchmark (GPU only).

    pytest bench/ --benchmark-only [--benchmark-json=out.json]

A subset of ``bench/sparse24_int4.py``'s sweep: (N, K) = (4096, 4096), group
64 compressed columns, fp16, M in {1, 16, 4096}, dense vs sparsekit.
pytest-benchmark times with the host clock (each call synchronizes), so the
numbers include launch overhead and are for tracking regressions -- the
committed results come from ``sparsekit bench`` (CUDA events, rotated inputs).
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("pytest-benchmark 2:4+int4 cases need a CUDA device (CPU: `sparsekit bench` runs the "
                "correctness sweep instead)", allow_module_level=True)
pytest.importorskip("pytest_benchmark")

import torch.nn.functional as F  # noqa: E402

from . import sparse24_int4 as bmod  # noqa: E402

N, K = 4096, 4096
MS = [1, 16, 4096]
N_SETS = 4
BACKENDS = ("dense", "triton", "sparsekit_auto")


@pytest.fixture(scope="module")
def weights():
    gen = torch.Generator(device="cuda").manual_seed(0)
    quants, dense = [], []
    bias = None
    for _ in range(N_SETS):
        _, q, b = bmod.make_weight(N, K, torch.float16, "cuda", gen)
        quants.append(q)
        dense.append(q.to_dense())
        bias = b if bias is None else bias
    return quants, dense, bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", MS)
def test_sparse24_int4_linear(benchmark, weights, backend, m):
    from sparsekit.ops import sparse24_int4 as ops

    quants, dense, bias = weights
    if backend == "dense":
        fn, ws = (lambda x, w: F.linear(x, w, bias)), dense
    elif backend == "triton":
        fn, ws = (lambda x, w: ops.sparse24_int4_linear(x, w, bias, backend="triton")), quants
    else:
        fn, ws = (lambda x, w: ops.sparse24_int4_linear(x, w, bias)), quants
    gen = torch.Generator(device="cuda").manual_seed(m)
    xs = [torch.randn(m, K, device="cuda", generator=gen).half() for _ in range(N_SETS)]
    ref = F.linear(xs[0].float(), dense[0].float(), bias.float())
    out = fn(xs[0], ws[0])
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < bmod.GPU_TOL, f"{backend} rel_err {err:.3g}"

    state = {"i": 0}

    def call():
        i = state["i"] = (state["i"] + 1) % N_SETS
        fn(xs[i], ws[i])
        torch.cuda.synchronize()

    benchmark.extra_info.update(case=f"M={m},N={N},K={K},group={quants[0].effective_group_size}", backend=backend,
                                dtype="fp16")
    benchmark.pedantic(call, rounds=100, iterations=1, warmup_rounds=10)
