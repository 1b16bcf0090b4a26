"""SparseLinear, sparsify_, state_dict, fine-tuning, torch.compile."""
import io

import pytest
import torch
from torch import nn

import sparsekit
from sparsekit import Sparse24Config, sparsify_
from sparsekit.nn import SparseLinear, SparseQLinear
from sparsekit.prune import is_2to4, mask_2to4
from sparsekit.testing import assert_close_rel


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(37, 64), nn.GELU(), nn.Linear(64, 19, bias=False), nn.ReLU(),
                         nn.Linear(19, 5)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_from_dense_matches_pruned_linear(dtype, backend):
    lin = nn.Linear(37, 23).to(dtype)
    sl = SparseLinear.from_dense(lin, backend=backend)
    assert sl.values.dtype == dtype and sl.meta_codes.dtype == torch.uint8 and sl.meta is sl.meta_codes
    pruned = lin.weight.detach() * mask_2to4(lin.weight.detach())
    assert torch.equal(sl.weight, pruned)
    x = torch.randn(4, 3, 37).to(dtype)
    ref = x.double() @ pruned.double().T + lin.bias.double()
    assert_close_rel(sl(x), ref)
    dense = sl.to_dense()
    assert isinstance(dense, nn.Linear)
    assert torch.equal(dense.weight, pruned) and torch.equal(dense.bias, lin.bias)


def test_from_dense_with_scores_and_mask():
    lin = nn.Linear(16, 4)
    scores = torch.rand(4, 16)
    sl = SparseLinear.from_dense(lin, scores=scores)
    assert torch.equal(sl.weight != 0, mask_2to4(lin.weight.detach(), scores) & (lin.weight != 0))
    m = torch.zeros(4, 16, dtype=torch.bool)
    m[:, ::4] = True
    sl2 = SparseLinear.from_dense(lin, mask=m)
    assert torch.equal(sl2.weight, lin.weight.detach() * m)
    bad = torch.ones(4, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="not 2:4"):
        SparseLinear.from_dense(lin, mask=bad)


def test_module_errors():
    with pytest.raises(ValueError, match="pattern"):
        SparseLinear(8, 8, pattern="1:4")
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(3, 3, 1))
    sl = SparseLinear.from_dense(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="in_features=8"):
        sl(torch.randn(2, 9))


def test_state_dict_round_trip_is_compressed():
    lin = nn.Linear(100, 33)
    sl = SparseLinear.from_dense(lin)
    sd = sl.state_dict()
    assert set(sd) == {"values", "meta_codes", "bias"}
    assert sd["values"].shape == (33, 52) and sd["meta_codes"].shape == (33, 13)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = SparseLinear(100, 33)
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(5, 100)
    assert torch.equal(fresh(x), sl(x))
    assert torch.equal(fresh.weight, sl.weight)


def test_fresh_module_is_zero_and_valid():
    sl = SparseLinear(13, 3, bias=False)
    assert torch.equal(sl.weight, torch.zeros(3, 13))
    assert torch.equal(sl(torch.randn(2, 13)), torch.zeros(2, 3))


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_finetune_keeps_mask_and_lowers_loss(backend):
    torch.manual_seed(0)
    lin = nn.Linear(24, 12)
    sl = SparseLinear.from_dense(lin, backend=backend)
    mask0 = sl.weight != 0
    x = torch.randn(64, 24)
    teacher = torch.randn(12, 24) * mask0  # reachable without leaving the mask
    target = x @ teacher.T
    opt = torch.optim.SGD(sl.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (sl(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert not bool((sl.weight[~mask0] != 0).any())
    assert is_2to4(sl.weight)


def test_interpret_training_matches_reference():
    states = {}
    for backend in ("reference", "interpret"):
        torch.manual_seed(0)
        sl = SparseLinear.from_dense(nn.Linear(24, 12), backend=backend)
        x = torch.randn(16, 24)
        opt = torch.optim.SGD(sl.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            sl(x).square().mean().backward()
            opt.step()
        states[backend] = sl.values.detach().clone()
    assert_close_rel(states["interpret"], states["reference"], bound=1e-5)


def test_sparsify_swaps_matching_linears():
    model = _mlp()
    x = torch.randn(7, 37)
    expected = []
    for mod in model:
        if isinstance(mod, nn.Linear):
            expected.append(mod.weight.detach() * mask_2to4(mod.weight.detach()))
    ret = sparsify_(model, "2:4", progress=False)
    assert ret is model
    lins = [m for m in model if isinstance(m, SparseLinear)]
    assert len(lins) == 3
    for sl, w in zip(lins, expected):
        assert torch.equal(sl.weight, w)
    # same function as the dense model with pruned weights
    ref = x
    for mod in model:
        ref = mod.to_dense()(ref) if isinstance(mod, SparseLinear) else mod(ref)
    assert_close_rel(model(x), ref)


def test_sparsify_filters():
    model = _mlp()
    sparsify_(model, Sparse24Config(exclude=r"^4$"), progress=False)
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], SparseLinear)
    assert type(model[4]) is nn.Linear
    model = _mlp()
    sparsify_(model, Sparse24Config(include=r"^2$"), progress=False)
    assert [type(m).__name__ for m in model] == ["Linear", "GELU", "SparseLinear", "ReLU", "Linear"]
    model = _mlp()
    sparsify_(model, "2:4", filter_fn=lambda mod, name: mod.out_features > 10, progress=False)
    assert [type(m).__name__ for m in model] == ["SparseLinear", "GELU", "SparseLinear", "ReLU", "Linear"]


def test_sparsify_bad_config():
    with pytest.raises(ValueError, match="unknown config"):
        sparsify_(_mlp(), "3:7")
    with pytest.raises(TypeError, match="config"):
        sparsify_(_mlp(), 42)
    with pytest.raises(TypeError, match="nn.Linear subclasses"):
        Sparse24Config(types=(nn.Conv2d,))


def test_sparsify_progress_bar(capsys):
    sparsify_(_mlp(), "2:4", progress=True)
    assert "sparsify_" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_torch_compile_small_model(backend):
    model = _mlp()
    sparsify_(model, Sparse24Config(backend=backend), progress=False)
    x = torch.randn(6, 37)
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_close_rel(compiled(x), eager.detach(), bound=1e-6)
    # backward through the compiled graph
    xg = x.clone().requires_grad_(True)
    compiled(xg).sum().backward()
    assert xg.grad is not None and bool(torch.isfinite(xg.grad).all())


def test_torch_compile_inductor_cpu():
    model = _mlp()
    sparsify_(model, "2:4", progress=False)
    x = torch.randn(6, 37)
    compiled = torch.compile(model, fullgraph=True)
    assert_close_rel(compiled(x), model(x).detach(), bound=1e-6)


def _packed(case, seed=0):
    torch.manual_seed(seed)
    if case == "2:4":
        return SparseLinear.from_dense(nn.Linear(37, 23), backend="reference"), torch.float32
    if case == "2:4-int8":
        return SparseLinear.from_dense(nn.Linear(37, 23), act_bits=8, backend="reference"), torch.float32
    return SparseQLinear.from_dense(nn.Linear(40, 24), backend="reference"), torch.float16


PACKED = ["2:4", "2:4-int8", "2:4+int4"]


@pytest.mark.parametrize("case", PACKED)
def test_torch_export_top_level_and_in_a_sequential(case):
    mod, dtype = _packed(case)
    x = torch.randn(4, mod.in_features).to(dtype)
    for model in (mod, nn.Sequential(nn.Identity(), mod, nn.ReLU())):
        with torch.no_grad():
            ep = torch.export.export(model, (x,))
            assert any(k.endswith("meta_codes") for k in ep.state_dict)
            exported = ep.module()
            assert torch.equal(exported(x), model(x))
            x2 = torch.randn(4, mod.in_features).to(dtype)
            assert torch.equal(exported(x2), model(x2))


@pytest.mark.parametrize("case", PACKED)
def test_state_dict_with_the_old_meta_key_loads(case):
    mod, dtype = _packed(case)
    sd = mod.state_dict()
    assert "meta_codes" in sd and "meta" not in sd
    old = {("meta" if k == "meta_codes" else k): v.clone() for k, v in sd.items()}
    fresh, _ = _packed(case, seed=1)
    x = torch.randn(5, mod.in_features).to(dtype)
    assert not torch.equal(fresh(x), mod(x))
    fresh.validate_state_dict(old)
    result = fresh.load_state_dict(old, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(fresh(x), mod(x)) and torch.equal(fresh.meta_codes, mod.meta_codes)
    assert "meta" in old and "meta_codes" not in old          # the caller's dict is not changed
    # inside a model, under a prefix
    target = nn.Sequential(nn.Identity(), _packed(case, seed=2)[0])
    target.load_state_dict({f"1.{k}": v for k, v in old.items()})
    assert torch.equal(target(x), mod(x))
    # both names: the old one is an unexpected key, and nothing is copied
    other = _packed(case, seed=3)[0]
    before = other.meta_codes.clone()
    with pytest.raises(RuntimeError, match="meta"):
        other.load_state_dict({**sd, "meta": sd["meta_codes"]})
    assert torch.equal(other.meta_codes, before)
    # a bad tensor under the old key is refused, named by the new one
    bad = dict(old, meta=torch.zeros_like(old["meta"]))
    with pytest.raises(ValueError, match=r"meta_codes.*i0 < i1"):
        other.load_state_dict(bad)


def test_version():
    assert isinstance(sparsekit.__version__, str)
