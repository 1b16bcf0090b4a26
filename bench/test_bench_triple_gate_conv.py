"""The triple-gate conv cases under pytest-benchmark (GPU only).

    pytest bench/ --benchmark-only [--benchmark-json=out.json]

A subset of ``bench/triple_gate_conv.py``'s sweep: 3x3 conv, C = 128,
128x128, batch 1, fp16, tile 8, UPDATE density in {0.25, 1.0}: cuDNN
(channels_last) vs sparsekit's Triton conv on a prepared gate map, and a whole
gated frame (gate map + tile list + conv).  pytest-benchmark times with the
host clock (each call synchronizes), so the numbers include launch overhead
and are for tracking regressions -- the committed results come from
``sparsekit bench`` (CUDA events, rotated inputs).
"""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("pytest-benchmark triple-gate conv cases need a CUDA device (CPU: `sparsekit bench` runs the "
                "correctness sweep instead)", allow_module_level=True)
pytest.importorskip("pytest_benchmark")

import torch.nn.functional as F  # noqa: E402

from . import triple_gate_conv as tgb  # noqa: E402

C, H, W, N, K, TILE = 128, 128, 128, 1, 3, 8
DENSITIES = [0.25, 1.0]
N_SETS = 4
BACKENDS = ("dense", "triton", "triton_frame")


@pytest.fixture(scope="module")
def weights():
    gen = torch.Generator(device="cuda").manual_seed(0)
    ws = [(torch.randn(C, C, K, K, device="cuda", generator=gen) * (C * K * K) ** -0.5).half()
          for _ in range(N_SETS)]
    bias = (torch.randn(C, device="cuda", generator=gen) * 0.1).half()
    return ws, bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", DENSITIES)
def test_triple_gate_conv2d(benchmark, weights, backend, density):
    from sparsekit.ops import triple_gate_conv as ops

    ws, bias = weights
    gen = torch.Generator(device="cuda").manual_seed(int(density * 100))
    th, tw = ops.tile_grid(H, W, TILE)
    gates = [tgb.random_gate(N, th, tw, density, "cuda", gen) for _ in range(N_SETS)]
    frames = [tgb.frames_for_gate(g, C, H, W, torch.float16, gen, TILE) for g in gates]
    outs = [torch.randn(N, C, H, W, device="cuda", generator=gen).half().contiguous(memory_format=torch.channels_last)
            for _ in range(N_SETS)]
    prev0 = outs[0].clone()
    kws = [tgb._kernel_weight(w) for w in ws]
    ws_cl = [w.contiguous(memory_format=torch.channels_last) for w in ws]
    if backend == "dense":
        def fn(i):
            return F.conv2d(frames[i][1], ws_cl[i], bias, 1, 1)
    elif backend == "triton":
        lists = [ops.compact_gates(g, (H, W), TILE) for g in gates]

        def fn(i):
            return ops.triple_gate_conv2d(frames[i][1], kws[i], bias, lists[i], outs[i], 1, 1, 1, TILE,
                                          backend="triton")
    else:
        def fn(i):
            g = ops.triple_gate_map(frames[i][1], frames[i][0], K, 1, 1, 1, TILE, 0.0, backend="triton")
            return ops.triple_gate_conv2d(frames[i][1], kws[i], bias, g, outs[i], 1, 1, 1, TILE, backend="triton")
    out = fn(0)
    if backend == "dense":
        ref = F.conv2d(frames[0][1].float(), ws[0].float(), bias.float(), 1, 1)
    else:
        ref = tgb._composed64(prev0, frames[0][1], ws[0], bias, gates[0], (1, 1), (1, 1), (1, 1), TILE).float()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < tgb.GPU_TOL, f"{backend} rel_err {err:.3g}"

    state = {"i": 0}

    def call():
        i = state["i"] = (state["i"] + 1) % N_SETS
        fn(i)
        torch.cuda.synchronize()

    benchmark.extra_info.update(case=f"density={density},C={C},H={H},W={W},k={K},N={N},tile={TILE}",
                                backend=backend, dtype="fp16")
    benchmark.pedantic(call, rounds=100, iterations=1, warmup_rounds=10)
