"""BlockSparseLinear, SparseLinear.from_dense(pattern="block"), BlockSparseConfig."""
import io

import pytest
import torch
from torch import nn

from sparsekit import BlockSparseConfig, sparsify_
from sparsekit.formats import BlockSparseWeight
from sparsekit.nn import BlockSparseLinear, SparseLinear
from sparsekit.testing import assert_close_rel


@pytest.mark.parametrize("backend", ["reference", "interpret"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_dense_sparsity_matches_masked_linear(backend, dtype):
    lin = nn.Linear(70, 45).to(dtype)
    m = SparseLinear.from_dense(lin, pattern="block", block_size=(16, 32), sparsity=0.6, backend=backend)
    assert isinstance(m, BlockSparseLinear)
    grid = BlockSparseWeight.magnitude_block_mask(lin.weight.detach(), (16, 32), 0.6)
    assert m.blocks.shape[0] == int(grid.sum())
    keep = grid.repeat_interleave(16, 0).repeat_interleave(32, 1)[:45, :70]
    pruned = lin.weight.detach() * keep
    assert torch.equal(m.weight, pruned)
    x = torch.randn(2, 5, 70).to(dtype)
    ref = x.double() @ pruned.double().T + lin.bias.double()
    assert_close_rel(m(x), ref)
    dense = m.to_dense()
    assert torch.equal(dense.weight, pruned) and torch.equal(dense.bias, lin.bias)


def test_from_dense_block_mask_and_errors():
    lin = nn.Linear(64, 32, bias=False)
    grid = torch.zeros(2, 2, dtype=torch.bool)
    grid[1, 0] = True
    m = BlockSparseLinear.from_dense(lin, (16, 32), block_mask=grid)
    assert m.blocks.shape == (1, 16, 32) and m.density == 0.25
    assert torch.equal(m.weight[16:, :32], lin.weight.detach()[16:, :32])
    assert bool((m.weight[:16] == 0).all()) and bool((m.weight[:, 32:] == 0).all())
    with pytest.raises(ValueError, match="either block_mask or sparsity"):
        BlockSparseLinear.from_dense(lin, (16, 32), sparsity=0.5, block_mask=grid)
    with pytest.raises(ValueError, match="block"):
        BlockSparseLinear.from_dense(lin, (24, 32), sparsity=0.5)
    with pytest.raises(ValueError, match="element scores"):
        SparseLinear.from_dense(lin, pattern="block", scores=torch.rand(32, 64))
    with pytest.raises(ValueError, match="sparsity= applies"):
        SparseLinear.from_dense(lin, pattern="2:4", sparsity=0.5)
    with pytest.raises(ValueError, match="BlockSparseLinear"):
        SparseLinear(64, 32, pattern="block")


def test_empty_pattern_computes_bias():
    lin = nn.Linear(33, 17)
    m = BlockSparseLinear.from_dense(lin, (16, 16), sparsity=1.0)
    assert m.blocks.shape[0] == 0
    x = torch.randn(4, 33)
    for backend in ("reference", "interpret"):
        m.backend = backend
        assert_close_rel(m(x), lin.bias.detach().expand(4, 17).double())


def test_state_dict_round_trip_resizes():
    lin = nn.Linear(100, 50)
    m = BlockSparseLinear.from_dense(lin, (16, 32), sparsity=0.5)
    sd = m.state_dict()
    assert set(sd) == {"blocks", "crow", "col", "tcol_ptr", "trow", "tblk", "bias"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = BlockSparseLinear(100, 50, block_size=(16, 32))
    assert fresh.blocks.shape[0] == 0
    fresh.load_state_dict(torch.load(buf))
    assert fresh.blocks.shape == m.blocks.shape
    x = torch.randn(3, 100)
    assert torch.equal(fresh(x), m(x))
    assert torch.equal(fresh.weight, m.weight)


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_finetune_keeps_block_pattern(backend):
    torch.manual_seed(0)
    lin = nn.Linear(48, 40)
    m = BlockSparseLinear.from_dense(lin, (16, 16), sparsity=0.5, backend=backend)
    keep = m.weight != 0
    x = torch.randn(64, 48)
    teacher = torch.randn(40, 48) * keep
    target = x @ teacher.T
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (m(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert bool((m.weight[~keep] == 0).all())


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_sparsify_block_config_uniform_and_per_layer():
    model = _mlp()
    x = torch.randn(5, 40)
    grid = torch.ones(1, 2, dtype=torch.bool)  # layer "4": (10, 32) with 16x16 blocks -> 1 x 2 grid
    grid[0, 1] = False
    cfg = BlockSparseConfig(block_size=(16, 16), sparsity=0.5, per_layer={"2": 0.75, "4": grid})
    sparsify_(model, cfg, progress=False)
    assert [type(m).__name__ for m in model] == ["BlockSparseLinear", "ReLU", "BlockSparseLinear", "ReLU",
                                                 "BlockSparseLinear"]
    assert model[0].density == pytest.approx(0.5, abs=1 / 12)
    assert model[2].density == pytest.approx(0.25, abs=1 / 8)
    assert model[4].density == 0.5 and bool((model[4].weight[:, 16:] == 0).all())
    ref = x
    for mod in model:
        ref = mod.to_dense()(ref) if isinstance(mod, BlockSparseLinear) else mod(ref)
    assert_close_rel(model(x), ref)


def test_block_config_errors():
    with pytest.raises(ValueError, match="block"):
        BlockSparseConfig(block_size=(8, 8))
    with pytest.raises(ValueError, match="sparsity"):
        BlockSparseConfig(sparsity=1.5)
    with pytest.raises(ValueError, match="not converted"):
        sparsify_(_mlp(), BlockSparseConfig(per_layer={"nope": 0.5}), progress=False)


def test_torch_compile_block_sparse_model():
    model = _mlp()
    sparsify_(model, BlockSparseConfig(block_size=(16, 16), sparsity=0.5, backend="interpret"), progress=False)
    x = torch.randn(6, 40)
    eager = model(x).detach()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_close_rel(compiled(x), eager, bound=1e-6)
    xg = x.clone().requires_grad_(True)
    compiled(xg).sum().backward()
    assert xg.grad is not None and bool(torch.isfinite(xg.grad).all())
