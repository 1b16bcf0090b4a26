"""The draft_attention cases under pytest-benchmark (GPU only).

    pytest bench/ --benchmark-only [--benchmark-json=out.json]

A subset of ``bench/draft_attention.py``'s sweep: B=1, H=24, D=128, bf16,
8 x 32 x 64 = 16,384 video tokens, pool 8x16, sparsity 0.9; SDPA's flash
backend vs sparsekit's draft attention (end to end and kernel only).
pytest-benchmark times with the host clock (each call synchronizes), so the
numbers include launch overhead and are for tracking regressions -- the
committed results come from ``sparsekit bench`` (CUDA events, rotated inputs).
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("pytest-benchmark draft_attention cases need a CUDA device (CPU: `sparsekit bench` runs the "
                "correctness sweep instead)", allow_module_level=True)
pytest.importorskip("pytest_benchmark")

from . import draft_attention as bd  # noqa: E402

FRAMES, HEIGHT, WIDTH = 8, 32, 64
SPARSITY = 0.9
N_SETS = 2
BACKENDS = ("sdpa_flash", "triton", "triton_kernel")


@pytest.fixture(scope="module")
def inputs():
    import importlib
    ops = importlib.import_module("sparsekit.ops.draft_attention")  # the package attribute is the function

    layout = ops.draft_layout(FRAMES, HEIGHT, WIDTH, bd.POOL, 0, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    sets = []
    for _ in range(N_SETS):
        q, k, v = (torch.randn(1, layout.seq_len, bd.HEADS, bd.HEAD_DIM, device="cuda", generator=gen)
                   .bfloat16().transpose(1, 2) for _ in range(3))
        sets.append((q, k, v, ops.draft_block_mask(q, k, layout, SPARSITY)))
    return layout, sets


@pytest.mark.parametrize("backend", BACKENDS)
def test_draft_attention(benchmark, inputs, backend):
    import importlib
    ops = importlib.import_module("sparsekit.ops.draft_attention")  # the package attribute is the function

    layout, sets = inputs
    if backend == "sdpa_flash":
        fn = lambda q, k, v, m: bd._sdpa_flash(q, k, v)  # noqa: E731
    elif backend == "triton":
        fn = lambda q, k, v, m: ops.draft_attention(q, k, v, frames=FRAMES, height=HEIGHT, width=WIDTH,  # noqa: E731
                                                    sparsity=SPARSITY, pool=bd.POOL, backend="triton")
    else:
        fn = lambda q, k, v, m: ops.block_sparse_attention(q, k, v, m, layout, backend="triton")  # noqa: E731
    q, k, v, m = sets[0]
    rows = torch.randperm(layout.seq_len, device="cuda")[:bd.N_CHECK_ROWS]
    tb = layout.token_block
    tmask = None if backend == "sdpa_flash" else (lambda r: m.index_select(-2, tb[r]).index_select(-1, tb))
    ref = bd.sampled_reference(q, k, v, tmask, rows, bd.HEAD_DIM ** -0.5)
    out = fn(q, k, v, m)[:, :, rows].float()
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < bd.GPU_TOL["bf16"], f"{backend} rel_err {err:.3g}"

    state = {"i": 0}

    def call():
        i = state["i"] = (state["i"] + 1) % N_SETS
        fn(*sets[i])
        torch.cuda.synchronize()

    benchmark.extra_info.update(case=f"S={layout.seq_len},H={bd.HEADS},D={bd.HEAD_DIM},sparsity={SPARSITY}",
                                backend=backend, dtype="bf16")
    benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=3)
