"""Input-channel permutation search for 2:4 (sparsekit.prune.permute)."""
import pytest
import torch
from torch import nn

from sparsekit.prune.masks import is_2to4, mask_2to4
from sparsekit.prune.permute import (apply_permutations_, check_permutation, inverse_permutation,
                                     kept_magnitude, permute_input_, permute_linear_pair_, search_permutation)


def _crafted(n_groups=8, rows=64, seed=0):
    """Each row's four large weights all sit in one group of four, so the
    identity order prunes half of them."""
    g = torch.Generator().manual_seed(seed)
    w = 0.01 * torch.randn(rows, 4 * n_groups, generator=g)
    for i in range(rows):
        c = 4 * (i % n_groups)
        w[i, c:c + 4] = 10 + torch.rand(4, generator=g)
    return w


def _brute_kept(w, perm):
    s = w.abs()[:, perm]
    return float(s[mask_2to4(s)].sum())


def test_kept_magnitude_matches_mask():
    w = torch.randn(16, 12, dtype=torch.float64)
    assert kept_magnitude(w) == pytest.approx(float(w.abs()[mask_2to4(w)].sum()), rel=1e-6)
    perm = torch.randperm(12)
    assert kept_magnitude(w, perm) == pytest.approx(_brute_kept(w, perm), rel=1e-6)
    sc = torch.rand(16, 12, dtype=torch.float64)
    assert kept_magnitude(w, perm, scores=sc) == pytest.approx(
        float(sc[:, perm][mask_2to4(w[:, perm], sc[:, perm])].sum()), rel=1e-6)
    # K <= 2: everything is kept
    w2 = torch.randn(5, 2)
    assert kept_magnitude(w2) == pytest.approx(float(w2.abs().sum()), rel=1e-6)


def test_crafted_weight_large_gain():
    w = _crafted()
    base = kept_magnitude(w)
    perm = search_permutation(w)
    after = kept_magnitude(w, perm)
    large_total = float(w.abs()[w.abs() > 5].sum())
    print(f"\ncrafted 64x32: identity keeps {base:.1f}, searched keeps {after:.1f} "
          f"(+{100 * (after - base) / base:.1f}%), all large entries sum {large_total:.1f}")
    assert after > 1.8 * base  # identity keeps about half the large entries
    assert after >= 0.99 * large_total


@pytest.mark.parametrize("shape", [(64, 64), (128, 96), (32, 40)])
def test_random_gaussian_never_worse(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1]))
    base = kept_magnitude(w)
    perm = search_permutation(w)
    after = kept_magnitude(w, perm)
    print(f"\ngaussian {shape}: identity {base:.2f} -> {after:.2f} (+{100 * (after - base) / base:.2f}%)")
    assert sorted(perm.tolist()) == list(range(shape[1]))
    assert after >= base
    assert after > base * 1.005  # random weights: a small but real gain


def test_never_worse_than_identity_even_when_identity_is_optimal():
    # identity is already optimal: two large entries per group in every row
    w = torch.full((8, 16), 0.1)
    w[:, 0::4] = 5.0
    w[:, 1::4] = 5.0
    perm = search_permutation(w, iterations=50)
    assert kept_magnitude(w, perm) >= kept_magnitude(w)
    # iterations=0: only the initial order is compared with the identity
    for seed in range(3):
        x = torch.randn(24, 20, generator=torch.Generator().manual_seed(seed))
        assert kept_magnitude(x, search_permutation(x, iterations=0)) >= kept_magnitude(x)


def test_scores_are_used():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 32, generator=g)
    col = torch.rand(32, generator=g) * 10  # e.g. input-activation norms (Wanda)
    sc = w.abs() * col
    perm = search_permutation(w, scores=sc)
    base, after = kept_magnitude(w, scores=sc), kept_magnitude(w, perm, scores=sc)
    print(f"\nwanda-style scores: identity {base:.2f} -> {after:.2f}")
    assert after > base


def test_deterministic_for_seed():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(7))
    p1 = search_permutation(w, seed=5)
    p2 = search_permutation(w, seed=5)
    assert torch.equal(p1, p2)
    p3 = search_permutation(w, seed=6)
    assert kept_magnitude(w, p3) >= kept_magnitude(w)


def test_limits_respected():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    perm = search_permutation(w, iterations=3)
    assert kept_magnitude(w, perm) >= kept_magnitude(w)
    perm = search_permutation(w, time_limit=0.05)
    assert kept_magnitude(w, perm) >= kept_magnitude(w)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 10, 13, 30])
def test_k_not_multiple_of_4(k):
    w = torch.randn(16, k, generator=torch.Generator().manual_seed(k))
    perm = search_permutation(w)
    assert perm.dtype == torch.int64 and sorted(perm.tolist()) == list(range(k))
    assert kept_magnitude(w, perm) >= kept_magnitude(w)
    assert kept_magnitude(w, perm) == pytest.approx(_brute_kept(w, perm), rel=1e-6)
    if k <= 4:
        assert torch.equal(perm, torch.arange(k))


def test_partial_group_gain():
    # 6 channels: groups {0..3} and the partial {4, 5}; each row's big entries
    # are 0, 1, 2 -> one is pruned unless it moves to the partial group
    w = torch.full((4, 6), 0.01)
    w[:, :3] = 3.0
    perm = search_permutation(w)
    assert kept_magnitude(w, perm) == pytest.approx(4 * 9.0 + 4 * 0.01, rel=1e-6)
    assert kept_magnitude(w) == pytest.approx(4 * 6.0 + 4 * 0.02, rel=1e-6)


def _mlp(act, k_hidden=32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, k_hidden), act, nn.Linear(k_hidden, 10)).double()


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU()], ids=["relu", "gelu"])
def test_pair_permutation_preserves_function(act):
    model = _mlp(act)
    with torch.no_grad():  # make the consumer's identity grouping bad
        model[2].weight.copy_(_crafted(n_groups=8, rows=10, seed=1).double())
    x = torch.randn(50, 24, dtype=torch.float64)
    ref = model(x)
    w_before = model[2].weight.detach().clone()
    perm = search_permutation(model[2].weight)
    permute_linear_pair_(model[0], model[2], perm)
    out = model(x)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    w_after = model[2].weight.detach()
    m = mask_2to4(w_after)
    assert is_2to4(w_after * m)
    kept_before = float(w_before.abs()[mask_2to4(w_before)].sum())
    kept_after = float(w_after.abs()[m].sum())
    print(f"\n{act.__class__.__name__} MLP consumer: kept |W| {kept_before:.2f} -> {kept_after:.2f}")
    assert kept_after > kept_before


def test_apply_permutations_model():
    model = nn.Sequential(nn.Linear(16, 40), nn.GELU(), nn.Linear(40, 24), nn.ReLU(),
                          nn.Linear(24, 8)).double()
    x = torch.randn(30, 16, dtype=torch.float64)
    ref = model(x)
    before = {n: kept_magnitude(model.get_submodule(n).weight) for n in ("2", "4")}
    perms = apply_permutations_(model, [("0", "2"), ("2", "4")], seed=1)
    assert set(perms) == {"2", "4"}
    assert torch.allclose(model(x), ref, rtol=1e-12, atol=1e-12)
    for n in ("2", "4"):
        w = model.get_submodule(n).weight
        assert is_2to4(w * mask_2to4(w))
        assert kept_magnitude(w) >= before[n]
        print(f"\nlayer {n}: kept {before[n]:.3f} -> {kept_magnitude(w):.3f}")


def test_apply_permutations_with_scores():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    ref = model(x)
    sc = model[2].weight.detach().abs() * torch.rand(16, dtype=torch.float64)
    perms = apply_permutations_(model, [("0", "2")], scores={"2": sc})
    assert torch.allclose(model(x), ref, rtol=1e-12, atol=1e-12)
    assert kept_magnitude(model[2].weight, scores=sc[:, perms["2"]]) >= kept_magnitude(sc, scores=sc) - 1e-9


def test_permute_input_and_inverse():
    lin = nn.Linear(12, 5).double()
    x = torch.randn(7, 12, dtype=torch.float64)
    ref = lin(x)
    w0 = lin.weight.detach().clone()
    perm = torch.randperm(12)
    inv = permute_input_(lin, perm)
    assert torch.allclose(lin(x[..., perm]), ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(lin.weight.detach()[:, inv], w0)
    assert torch.equal(inv, inverse_permutation(perm))
    assert torch.equal(x[..., perm][..., inv], x)


def test_bad_inputs():
    p, c = nn.Linear(4, 8), nn.Linear(8, 3)
    with pytest.raises(ValueError):
        permute_linear_pair_(p, c, torch.tensor([0, 1, 2, 3, 4, 5, 6, 6]))  # repeated
    with pytest.raises(ValueError):
        permute_linear_pair_(p, c, torch.arange(7))  # wrong length
    with pytest.raises(ValueError):
        permute_linear_pair_(p, c, torch.tensor([0, 1, 2, 3, 4, 5, 6, 8]))  # out of range
    with pytest.raises(TypeError):
        permute_linear_pair_(p, c, torch.arange(8).float())
    with pytest.raises(ValueError):
        permute_linear_pair_(nn.Linear(4, 6), c, torch.arange(8))  # size mismatch
    with pytest.raises(TypeError):
        permute_linear_pair_(nn.Conv1d(4, 8, 1), c, torch.arange(8))
    with pytest.raises(ValueError):
        permute_input_(c, torch.arange(3))
    with pytest.raises(ValueError):
        kept_magnitude(torch.randn(3, 8), torch.tensor([1, 1, 2, 3, 4, 5, 6, 7]))
    with pytest.raises(TypeError):
        search_permutation([[1.0, 2.0]])
    with pytest.raises(ValueError):
        search_permutation(torch.randn(8))
    with pytest.raises(TypeError):
        search_permutation(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError):
        search_permutation(torch.randn(3, 8), scores=torch.rand(3, 7))
    with pytest.raises(ValueError):
        search_permutation(torch.randn(3, 8), scores=-torch.rand(3, 8))
    with pytest.raises(ValueError):
        search_permutation(torch.randn(3, 8), iterations=-1)
    with pytest.raises(ValueError):
        search_permutation(torch.randn(3, 8), time_limit=0)
    with pytest.raises(TypeError):
        check_permutation("abc", 3)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(6, 3))
    w0 = model[0].weight.detach().clone()
    with pytest.raises(ValueError):
        apply_permutations_(model, [("0", "2")])  # 8 != 6
    with pytest.raises(ValueError):
        apply_permutations_(model, [("0", "missing")])
    with pytest.raises(TypeError):
        apply_permutations_(model, [("0", "1")])  # ReLU is not a Linear
    model2 = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError):
        apply_permutations_(model2, [("0", "2"), ("0", "4")])  # layer reused
    with pytest.raises(ValueError):
        apply_permutations_(model2, [("0", "2")], scores={"4": torch.rand(3, 8)})
    with pytest.raises(ValueError):
        apply_permutations_(model2, [("0", "2")], scores={"2": torch.rand(3, 8)})
    assert torch.equal(model[0].weight.detach(), w0)  # nothing modified on failure


def test_default_is_a_time_budget_not_a_round_cap():
    import inspect

    from sparsekit.prune import permute

    sig = inspect.signature(search_permutation)
    assert sig.parameters["iterations"].default is None
    assert sig.parameters["time_limit"].default == permute.DEFAULT_TIME_LIMIT > 0
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 512, generator=g) * torch.rand(512, generator=g)
    capped = kept_magnitude(w, search_permutation(w, iterations=3))
    full = kept_magnitude(w, search_permutation(w))                  # runs to a local optimum
    assert full >= capped
