"""The block-sparse linear cases under pytest-benchmark (GPU only).

    pytest bench/ --benchmark-only [--benchmark-json=out.json]

A subset of ``bench/block_sparse.py``'s sweep: (N, K) = (4096, 4096), 64x64
blocks, density in {0.25, 0.1}, M in {1, 16, 4096}, every backend.
pytest-benchmark times with the host clock, so each timed call synchronizes
the device; the numbers include launch overhead and are for tracking
regressions -- the committed results come from ``sparsekit bench`` (CUDA
events, rotated inputs).
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("pytest-benchmark block-sparse cases need a CUDA device (CPU: `sparsekit bench` runs the "
                "correctness sweep instead)", allow_module_level=True)
pytest.importorskip("pytest_benchmark")

import torch.nn.functional as F  # noqa: E402

from . import block_sparse  # noqa: E402

N, K, BLOCK = 4096, 4096, 64
MS = [1, 16, 4096]
DENSITIES = [0.25, 0.1]
N_SETS = 4


@pytest.fixture(scope="module", params=DENSITIES, ids=lambda d: f"density={d}")
def weights(request):
    gen = torch.Generator(device="cuda").manual_seed(0)
    dense, sparse = [], []
    bias = None
    for _ in range(N_SETS):
        w, sw, b = block_sparse.make_weight(N, K, BLOCK, request.param, torch.float16, "cuda", gen)
        dense.append(w)
        sparse.append(sw)
        bias = b if bias is None else bias
    return request.param, dense, sparse, bias


def _impl(backend, weights):
    from sparsekit.ops import block_sparse as ops

    _, dense, sparse, bias = weights
    if backend == "dense":
        return (lambda x, w: F.linear(x, w, bias)), dense
    if backend == "triton":
        return (lambda x, w: ops.block_sparse_linear(x, w, bias, backend="triton")), sparse
    if backend == "sparsekit_auto":
        return (lambda x, w: ops.block_sparse_linear(x, w, bias)), sparse
    try:
        fn = block_sparse._torch_bsr_fn(bias)
        ws = [w.to_sparse_bsr((BLOCK, BLOCK)) for w in dense]
    except Exception as e:
        pytest.skip(f"{backend}: {type(e).__name__}: {e}")
    return fn, ws


@pytest.mark.parametrize("backend", block_sparse.BACKENDS)
@pytest.mark.parametrize("m", MS)
def test_block_sparse_linear(benchmark, weights, backend, m):
    fn, ws = _impl(backend, weights)
    density, dense, _, bias = weights
    gen = torch.Generator(device="cuda").manual_seed(m)
    xs = [torch.randn(m, K, device="cuda", generator=gen).half() for _ in range(N_SETS)]
    # correct before timed
    ref = F.linear(xs[0].float(), dense[0].float(), bias.float())
    try:
        out = fn(xs[0], ws[0])
    except Exception as e:
        if backend == "torch_bsr":
            pytest.skip(f"{backend} could not run: {type(e).__name__}: {e}")
        raise
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < block_sparse.GPU_TOL, f"{backend} rel_err {err:.3g}"

    state = {"i": 0}

    def call():
        i = state["i"] = (state["i"] + 1) % N_SETS
        fn(xs[i], ws[i])
        torch.cuda.synchronize()

    benchmark.extra_info.update(case=f"density={density},block={BLOCK},M={m},N={N},K={K}", backend=backend,
                                dtype="fp16")
    benchmark.pedantic(call, rounds=100, iterations=1, warmup_rounds=10)
