"""Block pruning: block scores, costs, masks, calibration stats and rate-distortion allocation."""
import copy
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from sparsekit.prune.allocation import (allocate_block_sparsity, allocate_dp, allocate_equal_slope,
                                        apply_block_masks, distortion_curves, layer_costs, make_score_fn)
from sparsekit.prune.block import (block_cost, block_grid, block_mask_from_scores, block_reduce, block_scores,
                                   expand_block_mask, hardware_aware_scores, keep_count, latency_key)
from sparsekit.prune.calibration import collect_layer_stats
from sparsekit.workloads import digits_data, train_digits_mlp

# (N, K, block_size): exact multiples, partial last block-row/column, a single partial block, non-square
GRIDS = [(32, 64, 16), (37, 50, (16, 32)), (5, 7, 16), (130, 33, (64, 16)), (16, 200, (128, 32)), (1, 129, (32, 128))]


def _blocks(n, k, block_size):
    """(row slice, col slice) of every block, row-major, edges cropped."""
    bm, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    for r in range(0, n, bm):
        for c in range(0, k, bk):
            yield slice(r, min(n, r + bm)), slice(c, min(k, c + bk))


def _loop_reduce(t, block_size):
    n, k = t.shape
    nb, kb = block_grid((n, k), block_size)
    vals = [float(t[rs, cs].double().sum()) for rs, cs in _blocks(n, k, block_size)]
    return torch.tensor(vals, dtype=torch.float64).reshape(nb, kb)


# --------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("n,k,bs", GRIDS)
def test_block_reduce_matches_loop(n, k, bs):
    t = torch.randn(n, k, dtype=torch.float64)
    out = block_reduce(t, bs)
    assert out.shape == block_grid((n, k), bs) and out.dtype == torch.float64
    torch.testing.assert_close(out, _loop_reduce(t, bs))
    # counting elements: edge blocks hold fewer
    cnt = block_reduce(torch.ones(n, k, dtype=torch.bool), bs)
    assert cnt.dtype == torch.int64 and int(cnt.sum()) == n * k
    torch.testing.assert_close(cnt.double(), _loop_reduce(torch.ones(n, k), bs))


@pytest.mark.parametrize("n,k,bs", GRIDS)
def test_expand_block_mask(n, k, bs):
    grid = block_grid((n, k), bs)
    bmask = torch.rand(grid) < 0.5
    full = expand_block_mask(bmask, (n, k), bs)
    assert full.shape == (n, k) and full.dtype == torch.bool
    for (rs, cs), keep in zip(_blocks(n, k, bs), bmask.flatten().tolist()):
        assert bool((full[rs, cs] == keep).all())
    # a block counts as many elements as block_reduce says it has
    sizes = block_reduce(torch.ones(n, k, dtype=torch.bool), bs)
    assert torch.equal(block_reduce(full, bs), sizes * bmask)


def test_geometry_errors():
    with pytest.raises(ValueError, match="block_size"):
        block_reduce(torch.randn(8, 8), 8)
    with pytest.raises(ValueError, match="block_size"):
        block_reduce(torch.randn(8, 8), (16, 48))
    with pytest.raises(ValueError, match="block_size"):
        block_reduce(torch.randn(8, 8), (16, 16, 16))
    with pytest.raises(ValueError, match="2-D"):
        block_reduce(torch.randn(8), 16)
    with pytest.raises(TypeError, match="Tensor"):
        block_reduce([[1.0]], 16)
    with pytest.raises(ValueError, match="grid"):
        expand_block_mask(torch.ones(2, 2, dtype=torch.bool), (40, 40), 16)
    with pytest.raises(TypeError, match="bool"):
        expand_block_mask(torch.ones(3, 3), (40, 40), 16)


# --------------------------------------------------------------------------- scores
@pytest.mark.parametrize("n,k,bs", GRIDS[:4])
def test_block_scores_match_hand_computation(n, k, bs):
    w = torch.randn(n, k)
    g = torch.randn(n, k)
    f = torch.rand(n, k)
    wd, gd, fd = w.double(), g.double(), f.double()
    blocks = list(_blocks(n, k, bs))
    grid = block_grid((n, k), bs)
    mag = torch.tensor([float((wd[b] ** 2).sum()) for b in blocks], dtype=torch.float64).reshape(grid)
    t1 = torch.tensor([float((gd[b] * wd[b]).abs().sum()) for b in blocks], dtype=torch.float64).reshape(grid)
    t2 = torch.tensor([float(((gd[b] * wd[b]).abs() + 0.5 * fd[b] * wd[b] ** 2).sum()) for b in blocks], dtype=torch.float64).reshape(grid)
    for method, ref, kw in (("magnitude", mag, {}), ("taylor1", t1, {"grad": g}),
                            ("taylor2", t2, {"grad": g, "fisher": f})):
        out = block_scores(w, bs, method, **kw)
        assert out.shape == grid and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # a float64 weight is scored in float64
    assert block_scores(wd, bs).dtype == torch.float64
    # taylor2 = taylor1 + the Fisher term alone
    torch.testing.assert_close(block_scores(wd, bs, "taylor2", grad=gd, fisher=fd),
                               block_scores(wd, bs, "taylor1", grad=gd) + 0.5 * block_scores(wd.mul(fd.sqrt()), bs))


def test_block_scores_errors():
    w = torch.randn(20, 40)
    with pytest.raises(ValueError, match="needs grad"):
        block_scores(w, 16, "taylor1")
    with pytest.raises(ValueError, match="needs fisher"):
        block_scores(w, 16, "taylor2", grad=torch.randn(20, 40))
    with pytest.raises(ValueError, match="grad shape"):
        block_scores(w, 16, "taylor1", grad=torch.randn(40, 20))
    with pytest.raises(ValueError, match="fisher shape"):
        block_scores(w, 16, "taylor2", grad=torch.randn(20, 40), fisher=torch.rand(20, 39))
    with pytest.raises(ValueError, match="non-negative"):
        block_scores(w, 16, "taylor2", grad=torch.randn(20, 40), fisher=-torch.rand(20, 40))
    with pytest.raises(ValueError, match="unknown score method"):
        block_scores(w, 16, "hessian")
    with pytest.raises(TypeError, match="floating"):
        block_scores(torch.ones(20, 40, dtype=torch.int32), 16)
    with pytest.raises(ValueError, match="non-finite"):
        block_scores(torch.full((20, 40), float("nan")), 16)


# --------------------------------------------------------------------------- costs
def test_block_cost_flop_proxy_and_latency_table(tmp_path):
    n, k, bs, m = 37, 50, (16, 32), 8
    c = block_cost((n, k), bs, m=m)
    assert c.shape == block_grid((n, k), bs) and c.dtype == torch.float64
    assert float(c[0, 0]) == 2 * m * 16 * 32                     # interior block: 2 m bm bk
    assert float(c[-1, -1]) == 2 * m * (37 - 32) * (50 - 32)     # partial corner block
    assert float(c.sum()) == 2 * m * n * k                       # sums to the dense FLOPs
    table = {"16x32:float16": 0.25, "64x64:bfloat16": 1.5}
    lat = block_cost((n, k), bs, latency_table=table)
    assert torch.equal(lat, torch.full(c.shape, 0.25, dtype=torch.float64))
    path = tmp_path / "lat.json"
    path.write_text(json.dumps({"gpu": "H100", "us_per_block": table}))
    assert float(block_cost((300, 200), 64, latency_table=str(path), dtype=torch.bfloat16)[0, 0]) == 1.5
    assert float(block_cost((n, k), bs, latency_table={((16, 32), "float16"): 0.5})[0, 0]) == 0.5
    assert latency_key((16, 32), torch.float16) == "16x32:float16"
    with pytest.raises(ValueError, match="no entry"):
        block_cost((n, k), (32, 32), latency_table=table)
    with pytest.raises(ValueError, match="positive"):
        block_cost((n, k), bs, latency_table={"16x32:float16": -1})
    with pytest.raises(ValueError, match="m must"):
        block_cost((n, k), bs, m=0)


def test_hardware_aware_scores():
    s = torch.rand(3, 4)
    c = block_cost((40, 64), 16, m=2)
    torch.testing.assert_close(hardware_aware_scores(s, c, beta=0.0), s)
    torch.testing.assert_close(hardware_aware_scores(s, c, beta=1.0), (s.double() / c).float())
    torch.testing.assert_close(hardware_aware_scores(s, 4.0, beta=0.5), s / 2)
    with pytest.raises(ValueError, match="positive"):
        hardware_aware_scores(s, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="beta"):
        hardware_aware_scores(s, c, beta=-1)
    with pytest.raises(ValueError, match="broadcast"):
        hardware_aware_scores(s, torch.ones(5))


# --------------------------------------------------------------------------- masks
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (16, 16), (5, 13)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.7, 0.99, 1.0])
def test_block_mask_counts(shape, sparsity):
    s = torch.randn(shape)
    mask = block_mask_from_scores(s, sparsity)
    n = s.numel()
    assert mask.shape == s.shape and mask.dtype == torch.bool
    assert int(mask.sum()) == math.floor((1 - sparsity) * n + 0.5) == keep_count(n, sparsity)
    if 0 < int(mask.sum()) < n:
        assert float(s[mask].min()) >= float(s[~mask].max())
    assert int(block_mask_from_scores(s, keep=n // 2).sum()) == n // 2


def test_block_mask_ties_and_errors():
    s = torch.tensor([[1.0, 2.0, 2.0], [2.0, 0.0, 2.0]])
    # four blocks tie at 2.0: the lower row-major indices win
    assert block_mask_from_scores(s, keep=2).tolist() == [[False, True, True], [False, False, False]]
    assert block_mask_from_scores(s, keep=3).tolist() == [[False, True, True], [True, False, False]]
    assert block_mask_from_scores(torch.zeros(2, 3), keep=4).tolist() == [[True, True, True], [True, False, False]]
    assert keep_count(16, 1 - 5 / 16) == 5  # a sparsity 1 - k/n maps back to k
    with pytest.raises(ValueError, match="exactly one"):
        block_mask_from_scores(s)
    with pytest.raises(ValueError, match="exactly one"):
        block_mask_from_scores(s, 0.5, keep=1)
    with pytest.raises(ValueError, match="keep"):
        block_mask_from_scores(s, keep=7)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        block_mask_from_scores(s, 1.5)
    with pytest.raises(ValueError, match="NaN"):
        block_mask_from_scores(torch.tensor([[float("nan"), 1.0]]), 0.5)


# --------------------------------------------------------------------------- allocation solvers
def _brute_force(D, C, budget):
    best = (math.inf, None)
    for idx in itertools.product(*(range(len(d)) for d in D)):
        cost = sum(c[i] for c, i in zip(C, idx))
        if cost <= budget + 1e-9:
            dist = sum(d[i] for d, i in zip(D, idx))
            best = min(best, (dist, idx))
    return best


def _random_instance(rng, levels=4):
    """3 layers: distortion falls and cost rises with kept blocks (integer costs)."""
    curves, costs = {}, {}
    for name in ("a", "b", "c"):
        c = np.sort(rng.choice(np.arange(1, 40), size=levels, replace=False))[::-1]   # sparsity up, cost down
        d = np.sort(rng.random(levels) * rng.choice([0.1, 1, 10]))                   # sparsity up, distortion up
        curves[name], costs[name] = d.tolist(), c.astype(float).tolist()
    return curves, costs


def test_dp_optimal_vs_brute_force_and_equal_slope_never_better():
    rng = np.random.default_rng(0)
    for trial in range(40):
        curves, costs = _random_instance(rng)
        names = list(curves)
        D = [curves[n] for n in names]
        C = [costs[n] for n in names]
        lo, hi = sum(min(c) for c in C), sum(max(c) for c in C)
        for budget in np.linspace(lo, hi, 5):
            budget = float(round(budget))
            if budget < lo:
                continue
            opt, _ = _brute_force(D, C, budget)
            spare = int(budget - lo)
            dp = allocate_dp(curves, costs, budget, resolution=max(1, spare))
            dp_cost = sum(costs[n][dp[n]] for n in names)
            dp_dist = sum(curves[n][dp[n]] for n in names)
            assert dp_cost <= budget + 1e-9
            assert dp_dist == pytest.approx(opt, rel=1e-12, abs=1e-15), (trial, budget)
            es = allocate_equal_slope(curves, costs, budget)
            assert sum(costs[n][es[n]] for n in names) <= budget + 1e-9
            assert sum(curves[n][es[n]] for n in names) >= opt - 1e-12
        # real-valued costs with the default resolution: always feasible, never better than the optimum
        fcosts = {n: [c * 1.37 + 0.01 for c in costs[n]] for n in names}
        budget = 0.6 * sum(max(c) for c in fcosts.values())
        if budget >= sum(min(c) for c in fcosts.values()):
            dp = allocate_dp(curves, fcosts, budget)
            assert sum(fcosts[n][dp[n]] for n in names) <= budget
            assert sum(curves[n][dp[n]] for n in names) >= _brute_force(D, [fcosts[n] for n in names], budget)[0] - 1e-12


def test_allocators_return_sparsities_and_reject_bad_input():
    curves = {"a": [0.0, 1.0, 5.0], "b": [0.0, 0.1, 0.2]}
    costs = {"a": [10.0, 5.0, 1.0], "b": [10.0, 5.0, 1.0]}
    lv = [0.0, 0.5, 0.9]
    # b is cheap to prune: both solvers prune b first
    assert allocate_dp(curves, costs, 11.0, sparsities=lv) == {"a": 0.0, "b": 0.9}
    assert allocate_equal_slope(curves, costs, 11.0, sparsities=lv) == {"a": 0.0, "b": 0.9}
    assert allocate_dp(curves, costs, 100.0, sparsities=lv) == {"a": 0.0, "b": 0.0}
    with pytest.raises(ValueError, match="below the smallest"):
        allocate_dp(curves, costs, 1.0)
    with pytest.raises(ValueError, match="below the smallest"):
        allocate_equal_slope(curves, costs, 1.0)
    with pytest.raises(ValueError, match="equal length"):
        allocate_dp({"a": [0.0, 1.0]}, {"a": [1.0]}, 5.0)
    with pytest.raises(ValueError, match="same layers"):
        allocate_dp({"a": [0.0]}, {"b": [1.0]}, 5.0)
    with pytest.raises(ValueError, match="resolution"):
        allocate_dp(curves, costs, 11.0, resolution=0)


# --------------------------------------------------------------------------- calibration
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


@pytest.mark.parametrize("tokens", [None, 4])
def test_collect_layer_stats_matches_autograd(tokens):
    torch.manual_seed(0)
    model = _Tiny().double()
    model.train()
    model.fc2.bias.requires_grad_(False)
    shape = (lambda b: (b, 5)) if tokens is None else (lambda b: (b, tokens, 5))
    batches = [torch.randn(shape(b), dtype=torch.float64) for b in (4, 3, 6)]
    loader = [(x, torch.zeros(len(x))) for x in batches]
    stats = collect_layer_stats(model, None, loader, progress=False)
    stats_b = collect_layer_stats(model, ["fc1", "fc2"], batches, fisher="batch", progress=False)
    # state restored, .grad untouched
    assert model.training and model.fc1.training and model.drop.training
    assert model.fc1.weight.requires_grad and not model.fc2.bias.requires_grad
    assert all(p.grad is None for p in model.parameters())

    model.eval()
    ws = [model.fc1.weight, model.fc2.weight]
    grad = [torch.zeros_like(w) for w in ws]
    fb = [torch.zeros_like(w) for w in ws]
    fs = [torch.zeros_like(w) for w in ws]
    sq = torch.zeros(5, dtype=torch.float64)
    for x in batches:
        gb = torch.autograd.grad(model(x).pow(2).mean(), ws)
        for a, g in zip(grad, gb):
            a += g
        for a, g in zip(fb, gb):
            a += g * g
        for s in range(len(x)):  # per-sample loss l_s = mean(f(x_s)^2)
            gs = torch.autograd.grad(model(x[s:s + 1]).pow(2).mean(), ws)
            for a, g in zip(fs, gs):
                a += g * g
        sq += x.reshape(-1, 5).pow(2).sum(0)
    nsamp = sum(len(x) for x in batches)
    for i, name in enumerate(["fc1", "fc2"]):
        st = stats[name]
        assert st["fisher_mode"] == "sample" and st["num_batches"] == 3 and st["num_samples"] == nsamp
        torch.testing.assert_close(st["grad"], grad[i], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(st["fisher"], fs[i] / nsamp, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stats_b[name]["grad"], grad[i], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stats_b[name]["fisher"], fb[i] / 3, rtol=1e-10, atol=1e-12)
        assert stats_b[name]["fisher_mode"] == "batch"
    torch.testing.assert_close(stats["fc1"]["input_norm"], sq.sqrt())


def test_collect_layer_stats_errors_restore_state():
    model = _Tiny()
    model.eval()
    with pytest.raises(TypeError, match="calibration batches"):
        collect_layer_stats(model, None, ["not a tensor"], progress=False)
    assert not model.training and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="no batches"):
        collect_layer_stats(model, None, [], progress=False)
    with pytest.raises(ValueError, match="unknown objective"):
        collect_layer_stats(model, None, [torch.randn(2, 5)], objective="ce", progress=False)
    with pytest.raises(TypeError, match="nn.Linear"):
        collect_layer_stats(model, {"act": model.act}, [torch.randn(2, 5)], progress=False)
    with pytest.raises(ValueError, match="no submodule"):
        collect_layer_stats(model, ["fc9"], [torch.randn(2, 5)], progress=False)


# --------------------------------------------------------------------------- curves, budget, masks
def _odd_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(70, 50), nn.GELU(), nn.Linear(50, 33), nn.GELU(), nn.Linear(33, 10))


def test_distortion_curves_prune_one_layer_and_restore():
    model = _odd_mlp()
    x = torch.randn(40, 70)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    levels = [0.0, 0.5, 1.0]
    curves = distortion_curves(model, None, [x[:20], (x[20:], None)], levels, 16, "magnitude", progress=False)
    assert list(curves) == ["0", "2", "4"] and all(len(v) == 3 for v in curves.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for name, row in curves.items():
        assert row[0] == 0.0 and row[2] > 0
        # hand check of the 50% point
        pruned = copy.deepcopy(model)
        lin = pruned.get_submodule(name)
        bm = block_mask_from_scores(block_scores(lin.weight, 16), 0.5)
        with torch.no_grad():
            lin.weight.mul_(expand_block_mask(bm, lin.weight.shape, 16))
            ref = (pruned(x).double() - model(x).double()).pow(2).mean().item()
        assert row[1] == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("method", ["dp", "equal_slope"])
@pytest.mark.parametrize("cost", ["flops", "params"])
@pytest.mark.parametrize("density", [0.2, 0.3, 0.55, 0.8])
def test_budget_met_within_one_block_per_layer(method, cost, density):
    model = _odd_mlp(1)
    x = torch.randn(64, 70)
    bs = (16, 32)
    alloc, info = allocate_block_sparsity(model, x, density, bs, method=method, cost=cost, progress=False,
                                          sparsities=[0.0, 0.3, 0.6, 0.9], return_info=True)
    target, real = info["target_cost"], info["realized_cost"]
    one_block_each = sum(info["max_block_cost"].values())
    assert real <= target * (1 + 1e-12)
    assert target - real <= one_block_each
    # the masks apply_block_masks builds keep exactly that cost
    pruned = copy.deepcopy(model)
    masks = apply_block_masks(pruned, alloc, bs)
    kept = 0.0
    for name, bm in masks.items():
        lin = pruned.get_submodule(name)
        assert int(bm.sum()) == info["kept_blocks"][name]
        grid_cost = block_cost(lin.weight.shape, bs, m=64 if cost == "flops" else 0.5)
        kept += float(grid_cost[bm].sum())
        assert bool((lin.weight[~expand_block_mask(bm, lin.weight.shape, bs)] == 0).all())
    assert kept == pytest.approx(real, rel=1e-12)


def test_allocate_with_taylor_scores_and_latency_costs():
    model = _odd_mlp(2)
    x = torch.randn(32, 70)
    stats = collect_layer_stats(model, None, [x[:16], x[16:]], progress=False)
    alloc, info = allocate_block_sparsity(model, [x[:16], x[16:]], 0.5, 16, score="taylor2", stats=stats,
                                          cost="latency", latency_table={"16x16:float16": 0.2},
                                          progress=False, return_info=True)
    # uniform latency per block: the budget counts blocks
    nblocks = sum(info["nblocks"].values())
    kept = sum(info["kept_blocks"].values())
    assert kept == math.floor(0.5 * nblocks + 1e-9)
    masks = apply_block_masks(copy.deepcopy(model), alloc, 16, make_score_fn("taylor2", 16, stats))
    assert sum(int(m.sum()) for m in masks.values()) == kept
    with pytest.raises(ValueError, match="needs calibration stats"):
        make_score_fn("taylor1", 16)
    with pytest.raises(ValueError, match="latency_table"):
        allocate_block_sparsity(model, x, 0.5, 16, cost="latency", progress=False)
    with pytest.raises(ValueError, match="target_density"):
        allocate_block_sparsity(model, x, 1.5, 16, progress=False)
    costs = layer_costs({"0": model[0]}, [0.0, 0.5, 1.0], 16, m=2)
    assert costs["0"][0] == 2 * 2 * 70 * 50 and costs["0"][2] == 0.0


# --------------------------------------------------------------------------- acceptance: digits MLP
def test_rate_distortion_beats_uniform_on_digits():
    """Same 30% global FLOP budget, 16x16 blocks, magnitude scores, no fine-tuning:
    the rate-distortion (DP) allocation keeps test accuracy at least as well as
    uniform per-layer sparsity (margin >= 0.1 over seeds 0-8 on this recipe was
    0.24-0.57)."""
    pytest.importorskip("sklearn.datasets")
    Xtr, ytr, Xte, yte = digits_data(0, n_train=1300, scaling="unit")
    model = train_digits_mlp(Xtr, ytr, seed=0, epochs=15, lr=2e-3, batch_size=100)

    def accuracy(m):
        with torch.no_grad():
            return (m(Xte).argmax(1) == yte).float().mean().item()

    dense = accuracy(model)
    assert dense > 0.93
    density, bs = 0.3, 16
    rd = copy.deepcopy(model)
    alloc, info = allocate_block_sparsity(rd, Xtr[:256], density, bs, method="dp", progress=False, return_info=True)
    apply_block_masks(rd, alloc, bs)
    uni = copy.deepcopy(model)
    apply_block_masks(uni, {n: 1.0 - density for n in alloc}, bs)
    acc_rd, acc_uni = accuracy(rd), accuracy(uni)

    # the same budget: RD never above it, uniform within one 16x16 block per layer of it
    def kept_flops(m):
        return sum(float((m.get_submodule(n).weight != 0).sum()) for n in alloc)
    total = sum(model.get_submodule(n).weight.numel() for n in alloc)
    assert kept_flops(rd) <= density * total + 1e-6 <= kept_flops(uni) + 3 * 256
    print(f"\ndigits MLP: dense {dense:.3f}  rate-distortion {acc_rd:.3f}  uniform {acc_uni:.3f}  "
          f"allocation {({n: round(s, 3) for n, s in alloc.items()})}")
    assert acc_rd >= acc_uni
    assert acc_rd - acc_uni >= 0.1
