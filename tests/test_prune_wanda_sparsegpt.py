"""Wanda, SparseGPT and sequential layer-by-layer pruning (CPU).

Covers hand-checked Wanda scores/masks, exact pattern validity (2:4 group by
group, per-row unstructured counts) on odd widths, SparseGPT's layer
reconstruction error against magnitude and Wanda on correlated inputs, the
calibration hooks, and the digits MLP workload (test accuracy after one-shot
2:4 pruning, then conversion to SparseLinear).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsekit.prune import is_2to4
from sparsekit.prune.sequential import collect_layer_inputs, prune_model_
from sparsekit.workloads import digits_data, train_digits_mlp
from sparsekit.prune.sparsegpt import sparsegpt_prune
from sparsekit.prune.wanda import magnitude_mask, row_topk_mask, wanda_mask, wanda_scores


# ------------------------------------------------------------------ helpers
def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(n, k, seed=0):
    """Calibration-like inputs with correlated features and uneven scales: X = Z @ A + noise."""
    g = _gen(seed)
    z = torch.randn(n, k, generator=g)
    a = torch.randn(k, k, generator=g) / k ** 0.5
    scale = 0.2 + 3.0 * torch.rand(k, generator=g)
    return (z @ a + 0.1 * torch.randn(n, k, generator=g)) * scale


def _hessian(x):
    x = x.double()
    return 2.0 * x.t() @ x / x.shape[0]


def _recon_err(x, w, w_hat):
    ref = x @ w.t()
    return float((ref - x @ w_hat.t()).norm() / ref.norm())


def _assert_exact_2to4(mask, k):
    """Every full group of 4 keeps exactly 2; a partial last group keeps min(size, 2)."""
    n = mask.shape[0]
    for g0 in range(0, k, 4):
        size = min(4, k - g0)
        kept = mask[:, g0:g0 + size].sum(1)
        assert bool((kept == min(size, 2)).all()), f"group at column {g0} keeps {kept.tolist()} of {size}"
    assert mask.shape == (n, k)


# ------------------------------------------------------------------ Wanda
def test_wanda_scores_and_masks_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0, 0.5],
                      [4.0, 3.0, -2.0, 1.0, -6.0]])
    norm = torch.tensor([4.0, 1.0, 1.0, 0.5, 2.0])
    expect = torch.tensor([[4.0, 2.0, 3.0, 2.0, 1.0],
                           [16.0, 3.0, 2.0, 0.5, 12.0]])
    assert torch.equal(wanda_scores(w, norm), expect)
    # 2:4: columns 0..3 keep the top two scores, the partial group (column 4) is kept
    m24 = wanda_mask(w, norm, "2:4")
    assert m24.tolist() == [[True, False, True, False, True],
                            [True, True, False, False, True]]
    # magnitude would keep columns 2,3 in row 0: the activation norm changes the choice
    assert magnitude_mask(w, "2:4")[0].tolist() == [False, False, True, True, True]
    # unstructured 40% of 5 = 2 pruned per row; ties (4.0 vs 2.0, 2.0) keep the lower index
    mu = wanda_mask(w, norm, "unstructured", 0.4)
    assert mu.tolist() == [[True, True, True, False, False],
                           [True, True, False, False, True]]
    # sparsity 0 keeps everything
    assert bool(wanda_mask(w, norm, "unstructured", 0.0).all())


@pytest.mark.parametrize("k", [37, 100])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.75])
def test_unstructured_per_row_counts(k, sparsity):
    g = _gen(k)
    w = torch.randn(13, k, generator=g)
    x = _correlated_inputs(200, k, seed=k)
    drop = int(sparsity * k + 1e-9)
    mw = wanda_mask(w, x.norm(dim=0), "unstructured", sparsity)
    assert ((~mw).sum(1) == drop).all()
    for bs in (16, 128):  # block quotas floor(s*b) - floor(s*a) must add up to floor(s*K)
        wp, ms = sparsegpt_prune(w, _hessian(x), "unstructured", sparsity, block_size=bs)
        assert ((~ms).sum(1) == drop).all(), (bs, (~ms).sum(1).tolist())
        assert bool((wp[~ms] == 0).all())


def test_row_topk_mask_ties_keep_lower_index():
    s = torch.ones(2, 6)
    assert row_topk_mask(s, 0.5).tolist() == [[True, True, True, False, False, False]] * 2


# ------------------------------------------------------------------ 2:4 validity
@pytest.mark.parametrize("k", [37, 100])
@pytest.mark.parametrize("n", [1, 17])
def test_2to4_valid_group_by_group(n, k):
    g = _gen(n * 1000 + k)
    w = torch.randn(n, k, generator=g)
    x = _correlated_inputs(300, k, seed=k)
    mw = wanda_mask(w, x.norm(dim=0), "2:4")
    _assert_exact_2to4(mw, k)
    assert is_2to4(w * mw)
    for bs in (8, 128):
        wp, ms = sparsegpt_prune(w, _hessian(x), "2:4", block_size=bs)
        _assert_exact_2to4(ms, k)
        assert is_2to4(wp)
        assert bool((wp[~ms] == 0).all())
        assert wp.dtype == w.dtype and wp.shape == w.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_sparsegpt_keeps_dtype(dtype):
    g = _gen(3)
    w = torch.randn(9, 40, generator=g).to(dtype)
    x = _correlated_inputs(100, 40)
    w0 = w.clone()
    wp, m = sparsegpt_prune(w, _hessian(x), "2:4")
    assert wp.dtype == dtype and is_2to4(wp) and torch.isfinite(wp.float()).all()
    assert torch.equal(w, w0)  # input untouched


# ------------------------------------------------------------------ SparseGPT quality
@pytest.mark.parametrize("pattern,sparsity", [("2:4", 0.5), ("unstructured", 0.5), ("unstructured", 0.7)])
@pytest.mark.parametrize("k", [37, 100, 256])
def test_sparsegpt_beats_magnitude_and_wanda(pattern, sparsity, k):
    g = _gen(k)
    w = torch.randn(48, k, generator=g)
    x = _correlated_inputs(4 * k + 200, k, seed=k + 1)
    h = _hessian(x)
    e_mag = _recon_err(x, w, w * magnitude_mask(w, pattern, sparsity))
    e_wanda = _recon_err(x, w, w * wanda_mask(w, x.norm(dim=0), pattern, sparsity))
    # block_size also sets how often the unstructured mask is re-chosen from the
    # updated weights; with 128-column blocks at 70% sparsity Wanda can come out ahead
    wp, _ = sparsegpt_prune(w, h, pattern, sparsity, block_size=16)
    e_sgpt = _recon_err(x, w, wp)
    print(f"\nK={k} {pattern} s={sparsity}: relative ||XW^T - XW'^T||: magnitude {e_mag:.4f}  "
          f"wanda {e_wanda:.4f}  sparsegpt {e_sgpt:.4f}")
    assert e_sgpt < e_mag
    assert e_sgpt < e_wanda


@pytest.mark.parametrize("k", [37, 64])
def test_sparsegpt_identity_hessian_is_magnitude(k):
    g = _gen(k)
    w = torch.randn(11, k, generator=g)
    h = torch.eye(k, dtype=torch.float64) * 2.0
    wp, m = sparsegpt_prune(w, h, "2:4", block_size=16)
    mm = magnitude_mask(w, "2:4")
    assert torch.equal(m, mm)
    assert torch.allclose(wp, w * mm, atol=1e-6)
    # unstructured: with one block the per-row choice is global magnitude; with
    # smaller blocks (per-block quotas) the error is at least not far from it
    wp1, m1 = sparsegpt_prune(w, h, "unstructured", 0.5, block_size=128)
    assert torch.equal(m1, magnitude_mask(w, "unstructured", 0.5))
    x = torch.randn(500, k, generator=g)
    e_mag = _recon_err(x, w, w * mm)
    e_sgpt = _recon_err(x, w, wp)
    assert e_sgpt <= e_mag + 1e-6


def test_sparsegpt_dead_inputs():
    g = _gen(5)
    k = 24
    x = _correlated_inputs(200, k)
    x[:, [3, 10, 11]] = 0.0
    w = torch.randn(6, k, generator=g)
    wp, m = sparsegpt_prune(w, _hessian(x), "2:4")
    assert torch.isfinite(wp).all() and is_2to4(wp)
    assert bool((wp[:, [3, 10, 11]] == 0).all())
    # pruned dead inputs cost nothing: the dead columns are the first to go
    assert not m[:, 3].any()


# ------------------------------------------------------------------ bad input
def test_bad_input_errors():
    w = torch.randn(4, 8)
    h = torch.eye(8)
    with pytest.raises(ValueError, match="input_norm"):
        wanda_scores(w, torch.ones(7))
    with pytest.raises(ValueError, match="non-negative"):
        wanda_scores(w, -torch.ones(8))
    with pytest.raises(ValueError, match="pattern"):
        wanda_mask(w, torch.ones(8), "4:8")
    with pytest.raises(ValueError, match="sparsity"):
        wanda_mask(w, torch.ones(8), "unstructured", 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        wanda_mask(w, torch.ones(8), "unstructured", -0.1)
    with pytest.raises(ValueError, match="fixed sparsity"):
        wanda_mask(w, torch.ones(8), "2:4", 0.7)
    with pytest.raises(TypeError, match="floating"):
        wanda_mask(torch.ones(4, 8, dtype=torch.int32), torch.ones(8))
    with pytest.raises(ValueError, match="2-D"):
        sparsegpt_prune(torch.randn(8), h)
    with pytest.raises(ValueError, match="H must have shape"):
        sparsegpt_prune(w, torch.eye(7))
    with pytest.raises(ValueError, match="NaN"):
        sparsegpt_prune(w, torch.full((8, 8), float("nan")))
    with pytest.raises(ValueError, match="multiple of 4"):
        sparsegpt_prune(w, h, "2:4", block_size=6)
    with pytest.raises(ValueError, match="sparsity"):
        sparsegpt_prune(w, h, "unstructured", 1.5)
    with pytest.raises(ValueError, match="positive definite"):
        sparsegpt_prune(w, -torch.eye(8), damp=0.0)
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="method"):
        prune_model_(model, [torch.randn(2, 8)], method="obs")
    with pytest.raises(ValueError, match="no batches"):
        prune_model_(model, [], method="wanda")


# ------------------------------------------------------------------ calibration plumbing
class _Tokens(nn.Module):
    """3-D inputs; q/k/v-like layers reading one tensor; a layer used twice."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.q = nn.Linear(16, 8)
        self.k = nn.Linear(16, 8)
        self.out = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        a = self.q(h) * self.k(h)
        return self.out(self.out(self.drop(a)))


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_collect_layer_inputs_matches_direct_stats():
    torch.manual_seed(0)
    model = _Tokens()
    batches = [torch.randn(3, 5, 12), torch.randn(2, 5, 12)]
    model.train()
    st = collect_layer_inputs(model, None, batches, progress=False)
    assert model.training and model.drop.training and _no_hooks(model)
    x = torch.cat([b.reshape(-1, 12) for b in batches]).double()
    assert st["inp"]["num_rows"] == 25
    assert torch.allclose(st["inp"]["hessian"], 2 * x.t() @ x / 25)
    assert torch.allclose(st["inp"]["input_norm"], x.norm(dim=0))
    with torch.no_grad():
        model.eval()
        h = torch.relu(model.inp(x.float())).double()
    assert torch.allclose(st["q"]["hessian"], 2 * h.t() @ h / 25, rtol=1e-5, atol=1e-6)
    assert torch.equal(st["q"]["hessian"], st["k"]["hessian"])
    assert st["out"]["num_rows"] == 50  # called twice per forward


def test_hooks_removed_and_modes_restored_on_error():
    model = _Tokens()
    model.train()
    with pytest.raises(Exception):
        collect_layer_inputs(model, None, [torch.randn(2, 5, 12), torch.randn(2, 5, 7)], progress=False)
    assert model.training and _no_hooks(model)
    with pytest.raises(TypeError):
        prune_model_(model, ["not a tensor"], method="sparsegpt", progress=False)
    assert model.training and _no_hooks(model)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_prune_model_masks_and_zeros(method, pattern):
    torch.manual_seed(1)
    model = _Tokens()
    model.train()
    batches = (torch.randn(4, 5, 12) for _ in range(3))  # a one-shot generator is accepted
    masks = prune_model_(model, batches, method=method, pattern=pattern, sparsity=0.5, progress=False)
    assert set(masks) == {"inp", "q", "k", "out"}
    assert model.training and _no_hooks(model)
    for name, m in masks.items():
        w = model.get_submodule(name).weight
        assert m.dtype == torch.bool and m.shape == w.shape
        assert bool((w[~m] == 0).all())
        if pattern == "2:4":
            _assert_exact_2to4(m, w.shape[1])
        else:
            assert ((~m).sum(1) == w.shape[1] // 2).all()


def test_prune_model_is_sequential():
    """Layer 2's statistics are those of the network with layer 0 already pruned."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16))
    calib = [torch.randn(64, 20) for _ in range(2)]
    ref = copy.deepcopy(model)
    prune_model_(model, calib, method="sparsegpt", progress=False)
    # redo by hand: prune layer 0, then collect layer 2's Hessian on the pruned network
    h0 = collect_layer_inputs(ref, ["0"], calib, progress=False)["0"]["hessian"]
    w0, _ = sparsegpt_prune(ref[0].weight, h0)
    with torch.no_grad():
        ref[0].weight.copy_(w0)
    h2 = collect_layer_inputs(ref, ["2"], calib, progress=False)["2"]["hessian"]
    w2, _ = sparsegpt_prune(ref[2].weight, h2)
    assert torch.equal(model[0].weight, w0)
    assert torch.allclose(model[2].weight, w2, atol=1e-6)


# ------------------------------------------------------------------ digits workload
def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def digits_results():
    xtr, ytr, xte, yte = digits_data(0, n_train=1200, scaling="unit")
    model = train_digits_mlp(xtr, ytr, seed=0, epochs=30, lr=1e-3, batch_size=64)
    calib = [xtr[i:i + 64] for i in range(0, 256, 64)]  # 256 training images, no fine-tuning
    acc = {"dense": _accuracy(model, xte, yte)}
    pruned = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        m = copy.deepcopy(model)
        masks = prune_model_(m, calib, method=method, pattern="2:4", progress=False)
        acc[method] = _accuracy(m, xte, yte)
        pruned[method] = (m, masks)
    print("\ndigits MLP 64-256-256-10, 2:4 one-shot, test accuracy: "
          + "  ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    return acc, pruned, xte


def test_digits_sparsegpt_keeps_more_accuracy_than_magnitude(digits_results):
    acc, _, _ = digits_results
    assert acc["dense"] > 0.95
    assert acc["sparsegpt"] >= acc["magnitude"], acc


@pytest.mark.xfail(strict=False, reason=(
    "measured: on this digits MLP Wanda at 2:4 loses more test accuracy than magnitude "
    "(6 training seeds, raw pixel inputs: magnitude 0.948-0.967, wanda 0.920-0.938); "
    "its per-layer reconstruction error is lower, but that does not carry over to accuracy here"))
def test_digits_wanda_keeps_more_accuracy_than_magnitude(digits_results):
    acc, _, _ = digits_results
    assert acc["wanda"] >= acc["magnitude"], acc


def test_digits_sparsegpt_converts_to_sparse_linear(digits_results):
    from sparsekit.nn import SparseLinear

    _, pruned, xte = digits_results
    model, masks = pruned["sparsegpt"]
    sparse = copy.deepcopy(model)
    for name, mask in masks.items():
        idx = int(name)
        sparse[idx] = SparseLinear.from_dense(model[idx], mask=mask, backend="reference")
        assert isinstance(sparse[idx], SparseLinear)
        assert torch.equal(sparse[idx].weight, model[idx].weight)
    with torch.no_grad():
        out, ref = sparse(xte), model(xte)
    assert float((out - ref).norm() / ref.norm()) < 1e-5


def _layer(seed, n=128, k=256, rows=512):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, k, generator=g) * torch.rand(k, generator=g) * 3
    return torch.randn(n, k, generator=g), 2 * X.T @ X / rows, X


def test_sparsegpt_unstructured_block_selection_is_the_originals_rule():
    """selection="block": one threshold per block over every row (the original's rule); the layer's
    sparsity is the requested one while the per-row counts vary; selection="row" keeps exact per-row
    counts and, on these layers, a reconstruction error no larger."""
    for seed in range(3):
        W, H, X = _layer(seed)
        Wr, mr = sparsegpt_prune(W, H, "unstructured", 0.5, block_size=64, selection="row")
        Wb, mb = sparsegpt_prune(W, H, "unstructured", 0.5, block_size=64, selection="block")
        assert ((~mr).sum(1) == 128).all()
        per_block = (~mb).reshape(128, 4, 64).sum(dim=(0, 2))
        assert (per_block == int(128 * 64 * 0.5)).all()           # the count is per block, over all rows
        assert len(set((~mb).sum(1).tolist())) > 1                # rows differ
        err = lambda Wp: float(((W - Wp) @ X.T).norm() / (W @ X.T).norm())  # noqa: E731
        assert err(Wr) <= err(Wb) * 1.001
    with pytest.raises(ValueError, match="selection"):
        sparsegpt_prune(W, H, "unstructured", 0.5, selection="global")


def test_sparsegpt_row_ranks_equal_a_double_sort():
    """The one-sort rank (scatter of the order) gives the mask the double sort gave."""
    g = torch.Generator().manual_seed(5)
    sal = torch.randint(0, 5, (16, 40), generator=g).float()          # many ties
    order = torch.sort(sal, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(40).expand_as(order))
    assert torch.equal(rank, torch.sort(order, dim=1).indices)
