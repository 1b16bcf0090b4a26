"""The 2:4 linear cases under pytest-benchmark (GPU only).

    pytest bench/ --benchmark-only [--benchmark-json=out.json]

A subset of ``bench/sparse24.py``'s sweep: (N, K) = (4096, 4096), M in
{1, 16, 4096}, every backend.  pytest-benchmark times with the host clock, so
each timed call synchronizes the device; the numbers include launch overhead
and are for tracking regressions -- the committed results come from
``sparsekit bench`` (CUDA events, rotated inputs).
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("pytest-benchmark 2:4 cases need a CUDA device (CPU: `sparsekit bench` runs the "
                "correctness sweep instead)", allow_module_level=True)
pytest.importorskip("pytest_benchmark")

import torch.nn.functional as F  # noqa: E402

from . import sparse24  # noqa: E402

N, K = 4096, 4096
MS = [1, 16, 4096]
N_SETS = 4   # rotate distinct inputs (4 sparse weights ~ 72 MiB > 50 MiB L2 of an H100)


@pytest.fixture(scope="module")
def weights():
    gen = torch.Generator(device="cuda").manual_seed(0)
    dense, sparse = [], []
    bias = None
    for _ in range(N_SETS):
        w, sw, b = sparse24.make_weight(N, K, torch.float16, "cuda", gen)
        dense.append(w)
        sparse.append(sw)
        bias = b if bias is None else bias
    return dense, sparse, bias


def _impl(backend, weights):
    import sparsekit.ops as ops

    dense, sparse, bias = weights
    if backend == "dense":
        return (lambda x, w: F.linear(x, w, bias)), dense
    if backend in ("triton", "cuda"):
        if backend not in ops.available_backends(sparse24.OP, "cuda"):
            pytest.skip(f"{backend} backend not available here")
        return (lambda x, w: ops.sparse24_linear(x, w, bias, backend=backend)), sparse
    if backend == "sparsekit_auto":
        return (lambda x, w: ops.sparse24_linear(x, w, bias)), sparse
    try:
        if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
            raise RuntimeError("cuSPARSELt not available in this torch")
        ws = [sparse24.build_semi_structured(w, cutlass=(backend == "cutlass24")) for w in dense]
    except Exception as e:
        pytest.skip(f"{backend}: {type(e).__name__}: {e}")
    return (lambda x, w: F.linear(x, w, bias)), ws


@pytest.mark.parametrize("backend", sparse24.BACKENDS)
@pytest.mark.parametrize("m", MS)
def test_sparse24_linear(benchmark, weights, backend, m):
    if backend == "cuda" and m > sparse24.CUDA_MAX_M:
        from sparsekit.ops import _cuda

        if not _cuda.has_mma_sp():
            pytest.skip(f"this build's cuda backend handles M <= {sparse24.CUDA_MAX_M} (no mma.sp GEMM)")
    fn, ws = _impl(backend, weights)
    gen = torch.Generator(device="cuda").manual_seed(m)
    xs = [torch.randn(m, K, device="cuda", generator=gen).half() for _ in range(N_SETS)]
    # correct before timed
    ref = F.linear(xs[0].float(), weights[0][0].float(), weights[2].float())
    try:
        out = fn(xs[0], ws[0])
    except Exception as e:
        if backend in ("cutlass24", "cusparselt"):
            pytest.skip(f"{backend} could not run: {type(e).__name__}: {e}")
        raise
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < sparse24.GPU_TOL, f"{backend} rel_err {err:.3g}"

    state = {"i": 0}

    def call():
        i = state["i"] = (state["i"] + 1) % N_SETS
        fn(xs[i], ws[i])
        torch.cuda.synchronize()

    benchmark.extra_info.update(case=f"M={m},N={N},K={K}", backend=backend, dtype="fp16")
    benchmark.pedantic(call, rounds=100, iterations=1, warmup_rounds=10)
