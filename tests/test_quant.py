"""Quantizers: the group-wise grid (RTN), GPTQ, AWQ scale search, calibration plumbing."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

from sparsekit.quant import (GROUP_SIZES, QuantResult, awq_search, collect_linear_inputs, gptq_quantize,
                             quantize_model_weights, rtn_quantize)
from sparsekit.workloads import digits_data, train_digits_mlp


# --------------------------------------------------------------------------- helpers
def hand_quantize(w: torch.Tensor, gs: int, symmetric: bool, bits: int = 4):
    """Element-by-element grid math written out with Python floats (float32 steps)."""
    n, k = w.shape
    gs = k if gs == -1 else gs
    maxq = 2 ** bits - 1
    f32 = lambda v: torch.tensor(v, dtype=torch.float32).item()  # noqa: E731
    q = torch.empty(n, k)
    scales = torch.empty(n, k // gs)
    zeros = torch.empty(n, k // gs)
    for r in range(n):
        for g in range(k // gs):
            vals = w[r, g * gs:(g + 1) * gs].tolist()
            if symmetric:
                amax = max(abs(v) for v in vals)
                scale = f32(amax / (2 ** (bits - 1) - 1)) if amax > 0 else 1.0
                zero = float(2 ** (bits - 1))
            else:
                lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
                scale = f32(f32(hi - lo) / maxq) if hi > lo else 1.0
                zero = min(max(round(-lo / scale), 0), maxq)
            scales[r, g] = scale
            zeros[r, g] = zero
            for c, v in enumerate(vals):
                q[r, g * gs + c] = min(max(round(f32(v / scale)) + zero, 0), maxq)
    return q, scales, zeros


def out_err(X, W, W_hat) -> float:
    """Relative layer-output error ||X W^T - X W_hat^T|| / ||X W^T|| in float64."""
    X, W, W_hat = X.double(), W.double(), W_hat.double()
    return (torch.linalg.norm(X @ W.T - X @ W_hat.T) / torch.linalg.norm(X @ W.T)).item()


def correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """Rows X = Z A (random mixing A, so input features are correlated) with uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(k, k, generator=g) / k ** 0.5
    Z = torch.randn(n, k, generator=g)
    return (Z @ A + 0.05 * torch.randn(n, k, generator=g)) * (0.2 + 2 * torch.rand(k, generator=g))


def hessian(X: torch.Tensor) -> torch.Tensor:
    X = X.reshape(-1, X.shape[-1]).double()
    return 2 * X.T @ X / X.shape[0]


# --------------------------------------------------------------------------- the grid
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_rtn_grid_matches_hand_computation(group_size, symmetric, gen):
    n, k = 3, 256
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    res = rtn_quantize(w, group_size, symmetric)
    q, s, z = hand_quantize(w, group_size, symmetric)
    gs = k if group_size == -1 else group_size
    assert isinstance(res, QuantResult)
    assert res.q.dtype == torch.uint8 and res.q.shape == (n, k)
    assert res.scales.dtype == torch.float32 and res.scales.shape == (n, k // gs)
    assert res.zeros.dtype == torch.float32 and res.zeros.shape == (n, k // gs)
    assert res.group_size == gs and res.symmetric is symmetric and res.bits == 4
    assert torch.equal(res.scales, s)
    assert torch.equal(res.zeros, z)
    # a tie w/scale = m + 0.5 could round either way between the two computations; there are none here
    assert torch.equal(res.q.float(), q)
    deq = res.dequantize()
    assert deq.dtype == torch.float32
    ref = (q - z.repeat_interleave(gs, 1)) * s.repeat_interleave(gs, 1)
    assert torch.equal(deq, ref)
    if symmetric:
        assert bool((res.zeros == 8).all())
    # half a step bounds the rounding error inside the group's range
    step = s.repeat_interleave(gs, 1)
    assert bool(((deq - w).abs() <= 0.5 * step + 1e-6).all())


def test_rtn_grid_edge_cases():
    # the asymmetric range always holds 0: constant and one-signed groups lose nothing at the ends,
    # and an all-zero group gets scale 1
    w = torch.tensor([[0.3] * 32 + [-0.7] * 32, [0.0] * 32 + [1.0] + [0.0] * 31])
    for sym in (False, True):
        res = rtn_quantize(w, 32, symmetric=sym)
        assert torch.allclose(res.dequantize()[0], w[0], atol=1e-7)
        assert float(res.scales[1, 0]) == 1.0
        assert bool((res.dequantize()[1] == w[1]).all())
    pos = torch.rand(2, 64) + 0.5
    res = rtn_quantize(pos, 32)
    assert bool((res.zeros == 0).all()) and bool((res.dequantize() - pos).abs().max() <= 0.5 * res.scales.max())
    # int8: symmetric zero 128 and scale max|w|/127; asymmetric codes reach 0 and 255
    w = torch.randn(4, 64)
    r8 = rtn_quantize(w, 32, symmetric=True, bits=8)
    assert bool((r8.zeros == 128).all())
    assert torch.allclose(r8.scales, w.reshape(4, 2, 32).abs().amax(-1) / 127)
    a8 = rtn_quantize(w, -1, symmetric=False, bits=8)
    assert int(a8.q.min()) == 0 and int(a8.q.max()) == 255
    assert (a8.dequantize() - w).abs().max() <= 0.5 * a8.scales.max() + 1e-6
    # more bits, smaller error
    e4 = (rtn_quantize(w, 32).dequantize() - w).norm()
    e8 = (rtn_quantize(w, 32, bits=8).dequantize() - w).norm()
    assert e8 < e4 / 8


def test_quantizers_reject_bad_arguments():
    w = torch.randn(8, 96)
    H = torch.eye(96)
    for fn in (lambda **kw: rtn_quantize(w, **kw), lambda **kw: gptq_quantize(w, H, **kw),
               lambda **kw: awq_search(w, torch.randn(10, 96), **kw)):
        with pytest.raises(ValueError, match="does not divide"):
            fn(group_size=64)
        for bad in (0, 16, 48, -2, 256):
            with pytest.raises(ValueError, match="group_size"):
                fn(group_size=bad)
        for bad in (1, 9, 16):
            with pytest.raises(ValueError, match="bits"):
                fn(group_size=32, bits=bad)
        with pytest.raises(TypeError, match="bits"):
            fn(group_size=32, bits=4.0)
    with pytest.raises(ValueError, match="2-D"):
        rtn_quantize(torch.randn(96))
    with pytest.raises(TypeError, match="floating"):
        rtn_quantize(torch.ones(8, 96, dtype=torch.int32), 32)
    with pytest.raises(ValueError, match="non-finite"):
        rtn_quantize(torch.full((8, 96), float("nan")), 32)
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(w, torch.eye(95), 32)
    with pytest.raises(ValueError, match="calibration inputs"):
        awq_search(w, torch.randn(10, 95), 32)
    with pytest.raises(ValueError, match="mean_abs"):
        awq_search(w, {"H": H}, 32)


# --------------------------------------------------------------------------- packing into the int4 format
def test_codes_pack_into_int4_format(gen):
    try:
        int4 = importlib.import_module("sparsekit.formats.int4")
    except ImportError:
        pytest.skip("sparsekit.formats.int4 is not available (yet)")
    w = torch.randn(48, 256, generator=gen)
    w[0, :32] = w[0, :32].abs()                      # a one-signed group
    w[1, 32:64] = 0                                  # an all-zero group
    X = correlated_inputs(512, 256, seed=3)
    for gs in GROUP_SIZES:
        for sym in (False, True):
            # the same grid as the format's own round-to-nearest
            r = rtn_quantize(w, gs, sym)
            q, s, z = int4.rtn_quantize(w, gs, sym)
            assert torch.equal(r.q, q) and torch.equal(r.scales, s) and torch.equal(r.zeros, z), (gs, sym)
            for res in (r, gptq_quantize(w, hessian(X), gs, sym, act_order=True, static_groups=True)):
                for dtype in (torch.float16, torch.bfloat16):
                    packed = int4.Int4Weight.from_quantized(res.q, res.scales, res.zeros, gs, sym, dtype=dtype)
                    assert torch.equal(packed.unpack(), res.q)
                    # the format stores the scales in the activation dtype: (q - zero) * scale rounded once
                    ref = (res.q.float() - res.zeros.repeat_interleave(res.group_size, 1)) \
                        * res.scales.to(dtype).float().repeat_interleave(res.group_size, 1)
                    assert torch.equal(packed.dequantize(), ref.to(dtype)), (gs, sym, dtype)
                    assert torch.allclose(packed.dequantize().float(), res.dequantize(), rtol=1e-2, atol=1e-3)


# --------------------------------------------------------------------------- GPTQ
def naive_gptq(W: torch.Tensor, H: torch.Tensor, damp: float = 0.01, bits: int = 4):
    """Whole-row-group GPTQ by the textbook OBS recursion: explicit H^-1, updated by a
    Schur complement after every column (no Cholesky, no blocks)."""
    W = W.double().clone()
    k = W.shape[1]
    H = H.double() + damp * torch.diagonal(H).double().mean() * torch.eye(k, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    res0 = rtn_quantize(W.float(), -1)           # whole-row group: parameters from the original row
    s, z = res0.scales[:, 0].double(), res0.zeros[:, 0].double()
    maxq = 2 ** bits - 1
    Q = torch.empty_like(W)
    for j in range(k):
        q = torch.clamp(torch.round(W[:, j] / s) + z, 0, maxq)
        Q[:, j] = (q - z) * s
        e = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j:] -= e[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return Q


def test_gptq_matches_textbook_recursion(gen):
    W = torch.randn(16, 96, generator=gen)
    X = correlated_inputs(400, 96, seed=5)
    H = hessian(X)
    ref = naive_gptq(W, H)
    for bs in (128, 32, 7, 1):
        got = gptq_quantize(W.double(), H, -1, block_size=bs).dequantize().double()
        # identical but for the odd code flipped by float rounding at a tie
        mismatch = (got - ref).abs().gt(1e-6).float().mean().item()
        assert mismatch < 0.01, (bs, mismatch)
        assert abs(out_err(X, W, got) - out_err(X, W, ref)) < 1e-3


@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(group_size, act_order, gen):
    N, K = 96, 256
    W = torch.randn(N, K, generator=gen)
    Xc = correlated_inputs(2048, K, seed=11)     # calibration rows
    H = hessian(Xc)
    for sym in (False, True):
        r = rtn_quantize(W, group_size, sym)
        q = gptq_quantize(W, H, group_size, sym, act_order=act_order)
        assert q.q.dtype == torch.uint8 and q.scales.shape == r.scales.shape
        e_rtn, e_gptq = out_err(Xc, W, r.dequantize()), out_err(Xc, W, q.dequantize())
        print(f"\ngs={group_size} sym={sym} act_order={act_order}: output error RTN {e_rtn:.4f}  GPTQ {e_gptq:.4f}")
        assert e_gptq < 0.85 * e_rtn


def test_gptq_generalizes_and_block_size_is_speed_only(gen):
    # error measured on held-out rows of the same input distribution
    K = 128
    W = torch.randn(64, K, generator=gen)
    X = correlated_inputs(3072, K, seed=21)
    Xc, Xt = X[:2048], X[2048:]
    H = hessian(Xc)
    r = rtn_quantize(W, 32)
    q1 = gptq_quantize(W, H, 32, block_size=128)
    q2 = gptq_quantize(W, H, 32, block_size=24)      # blocks not aligned with the groups
    assert out_err(Xt, W, q1.dequantize()) < 0.9 * out_err(Xt, W, r.dequantize())
    assert (q1.q != q2.q).float().mean().item() < 0.005
    assert torch.allclose(q1.scales, q2.scales, rtol=1e-4, atol=1e-6)


def test_gptq_identity_hessian_is_rtn_like(gen):
    W = torch.randn(64, 256, generator=gen)
    X = torch.randn(4096, 256, generator=gen)       # uncorrelated, H ~ 2 I
    for H in (2 * torch.eye(256), hessian(X)):
        for gs in (32, -1):
            e_rtn = out_err(X, W, rtn_quantize(W, gs).dequantize())
            e_gptq = out_err(X, W, gptq_quantize(W, H, gs).dequantize())
            print(f"\nuncorrelated gs={gs}: RTN {e_rtn:.4f}  GPTQ {e_gptq:.4f}")
            assert e_gptq <= 1.02 * e_rtn


def test_gptq_dead_inputs_and_int8(gen):
    W = torch.randn(32, 64, generator=gen)
    X = correlated_inputs(512, 64, seed=2)
    X[:, 5] = 0
    X[:, 40:44] = 0
    H = hessian(X)
    q = gptq_quantize(W, H, 32, act_order=True)
    deq = q.dequantize()
    assert bool(torch.isfinite(deq).all())
    # dead inputs are set to 0 before any group parameters (as the original GPTQ): they multiply zeros
    dead = [5, 40, 41, 42, 43]
    assert bool((deq[:, dead] == 0).all())
    # all-zero H: pure RTN
    q0 = gptq_quantize(W, torch.zeros(64, 64), 32)
    assert torch.equal(q0.q, rtn_quantize(W, 32).q)
    # int8 through GPTQ: far smaller error than int4
    e8 = out_err(X, W, gptq_quantize(W, H, 32, symmetric=True, bits=8).dequantize())
    e4 = out_err(X, W, gptq_quantize(W, H, 32, symmetric=True, bits=4).dequantize())
    assert q.q.max() <= 15 and e8 < e4 / 8


# --------------------------------------------------------------------------- AWQ
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_awq_never_worse_than_rtn(group_size, gen):
    K = 256
    W = torch.randn(64, K, generator=gen)
    X = correlated_inputs(1024, K, seed=7)
    X[:, :8] *= 20                                   # a few salient input channels
    for sym in (False, True):
        s, res, info = awq_search(W, X, group_size, sym, grid=20, return_info=True)
        assert s.shape == (K,) and s.dtype == torch.float32 and bool((s > 0).all())
        assert torch.equal(res.input_scale, s)
        assert info["alphas"][0] == 0.0 and len(info["alphas"]) == 21
        # the search's alpha = 0 is exactly RTN
        e_rtn = out_err(X, W, rtn_quantize(W, group_size, sym).dequantize())
        assert info["errors"][0] == pytest.approx(e_rtn, rel=1e-6)
        e_awq = out_err(X, W, res.effective_weight())
        print(f"\nAWQ gs={group_size} sym={sym}: alpha {info['alpha']:.2f}  RTN {e_rtn:.4f}  AWQ {e_awq:.4f}")
        assert e_awq <= e_rtn + 1e-9
        assert e_awq == pytest.approx(min(info["errors"]), rel=1e-6)
        # the codes quantize W * s; effective weight = Q(W s) / s
        assert torch.allclose(res.effective_weight(), res.dequantize() / s)
        ref = rtn_quantize(W * s, group_size, sym)
        assert torch.equal(ref.q, res.q)
        # statistics instead of raw inputs give the same choice
        X2 = X.double()
        s2, res2 = awq_search(W, {"H": 2 * X2.T @ X2 / len(X2), "mean_abs": X2.abs().mean(0)}, group_size, sym)
        assert torch.allclose(s2, s) and torch.equal(res2.q, res.q)
    # salient channels make a nonzero alpha pay off
    assert info["alpha"] > 0


# --------------------------------------------------------------------------- calibration plumbing
class Tokens(nn.Module):
    """(B, T, K) activations through two linears and a norm."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.norm = nn.LayerNorm(64)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


def test_collect_linear_inputs_3d_and_hooks_removed(gen):
    model = Tokens()
    model.train()
    batches = [torch.randn(3, 5, 32, generator=gen) for _ in range(4)]
    stats = collect_linear_inputs(model, None, batches, progress=False)
    assert set(stats) == {"fc1", "fc2"}
    X = torch.cat([b.reshape(-1, 32) for b in batches]).double()
    assert stats["fc1"]["n"] == 60
    assert torch.allclose(stats["fc1"]["H"], 2 * X.T @ X / 60)
    assert torch.allclose(stats["fc1"]["mean_abs"], X.abs().mean(0))
    assert stats["fc2"]["H"].shape == (64, 64) and stats["fc2"]["H"].dtype == torch.float64
    # fc2's inputs were taken in eval mode (dropout off)
    with torch.no_grad():
        model.eval()
        h = torch.cat([torch.relu(model.norm(model.fc1(b))).reshape(-1, 64) for b in batches]).double()
    assert torch.allclose(stats["fc2"]["H"], 2 * h.T @ h / 60, atol=1e-10)
    # modes restored and no hooks left behind
    model.train()
    stats = collect_linear_inputs(model, ["fc2"], [(b, None) for b in batches], max_rows=17, progress=False)
    assert stats["fc2"]["n"] == 17
    assert model.training and model.drop.training
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    # a layer that never ran: n = 0, zero statistics
    extra = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    extra.forward = lambda x: extra[0](x)
    stats = collect_linear_inputs(extra, None, [torch.randn(2, 8)], progress=False)
    assert stats["1"]["n"] == 0 and not bool(stats["1"]["H"].any())
    with pytest.raises(ValueError, match="no batches"):
        collect_linear_inputs(model, None, [], progress=False)


def test_quantize_model_weights_sequential_3d(gen):
    model = Tokens()
    batches = [torch.randn(4, 6, 32, generator=gen) for _ in range(3)]
    ref = copy.deepcopy(model)
    for method in ("rtn", "gptq", "awq"):
        m = copy.deepcopy(model)
        m.train()
        res = quantize_model_weights(m, batches if method != "rtn" else None, method, group_size=32,
                                     progress=False)
        assert list(res) == ["fc1", "fc2"]
        assert m.training and m.drop.training
        for mod in m.modules():
            assert not mod._forward_pre_hooks and not mod._forward_hooks
        for name in res:
            got = m.get_submodule(name).weight
            assert torch.equal(got, res[name].effective_weight())
            assert torch.equal(m.get_submodule(name).bias, ref.get_submodule(name).bias)
        if method == "awq":
            assert res["fc1"].input_scale is not None
    # sequential: fc2's GPTQ saw fc1 already quantized
    m = copy.deepcopy(model)
    res = quantize_model_weights(m, batches, "gptq", group_size=32, progress=False)
    m1 = copy.deepcopy(model)
    with torch.no_grad():
        m1.fc1.weight.copy_(res["fc1"].dequantize())
    H = collect_linear_inputs(m1, ["fc2"], batches, progress=False)["fc2"]["H"]
    assert torch.equal(gptq_quantize(model.fc2.weight, H, 32).q, res["fc2"].q)
    with pytest.raises(ValueError, match="method"):
        quantize_model_weights(copy.deepcopy(model), batches, "nf4", progress=False)
    with pytest.raises(ValueError, match="calib_loader"):
        quantize_model_weights(copy.deepcopy(model), None, "gptq", group_size=32, progress=False)
    with pytest.raises(ValueError, match="fc1"):
        quantize_model_weights(copy.deepcopy(model), None, "rtn", group_size=64, progress=False)


# --------------------------------------------------------------------------- acceptance: digits MLP
def test_gptq_int4_keeps_digits_accuracy_vs_rtn():
    pytest.importorskip("sklearn.datasets")
    Xtr, ytr, Xte, yte = digits_data(0, n_train=1300, scaling="unit")
    model = train_digits_mlp(Xtr, ytr, seed=0, epochs=15, lr=2e-3, batch_size=100)

    def accuracy(m):
        with torch.no_grad():
            return (m(Xte).argmax(1) == yte).float().mean().item()

    def logit_err(m):
        with torch.no_grad():
            return (torch.linalg.norm(m(Xte) - model(Xte)) / torch.linalg.norm(model(Xte))).item()

    dense = accuracy(model)
    assert dense > 0.93
    calib = [Xtr[i:i + 128] for i in range(0, 512, 128)]
    out = {}
    for method in ("rtn", "gptq", "awq"):
        m = copy.deepcopy(model)
        quantize_model_weights(m, calib, method, group_size=32, bits=4, progress=False)
        out[method] = (accuracy(m), logit_err(m))
    print(f"\ndigits MLP int4 g32: dense {dense:.3f}  " + "  ".join(
        f"{k} acc {a:.3f} logit-err {e:.4f}" for k, (a, e) in out.items()))
    assert out["gptq"][0] >= out["rtn"][0]
    assert out["gptq"][1] < out["rtn"][1]
