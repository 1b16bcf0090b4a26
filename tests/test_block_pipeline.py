"""Calibration -> rate-distortion allocation -> block masks -> BlockSparseLinear modules."""
import pytest
import torch
from torch import nn

from sparsekit import BlockSparseConfig, sparsify_
from sparsekit.nn import BlockSparseLinear
from sparsekit.prune import allocate_block_sparsity, apply_block_masks, collect_layer_stats
from sparsekit.testing import assert_close_rel


@pytest.mark.parametrize("score", ["magnitude", "taylor2"])
def test_allocation_to_block_sparse_modules(score):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10))
    calib = [torch.randn(32, 64) for _ in range(4)]
    stats = collect_layer_stats(model, None, calib, progress=False) if score == "taylor2" else None
    alloc, info = allocate_block_sparsity(model, calib, target_density=0.4, block_size=(16, 16), score=score,
                                          stats=stats, progress=False, return_info=True)
    assert set(alloc) == {"0", "2", "4"}
    masks = apply_block_masks(model, alloc, (16, 16), score_fn="magnitude" if score == "magnitude" else
                              _taylor_fn(stats))
    x = torch.randn(7, 64)
    with torch.no_grad():
        masked_dense = model(x)
    sparsify_(model, BlockSparseConfig(block_size=(16, 16), per_layer=masks, backend="interpret"), progress=False)
    assert all(isinstance(model[i], BlockSparseLinear) for i in (0, 2, 4))
    for name, grid in masks.items():
        assert torch.equal(model.get_submodule(name).weight_format().block_mask(), grid)
    assert_close_rel(model(x), masked_dense.double(), bound=1e-5)
    # the realized global budget: within one block per layer of the target
    assert info["realized_cost"] <= info["target_cost"] + 1e-6
    assert info["target_cost"] - info["realized_cost"] <= sum(info["max_block_cost"].values()) + 1e-6


def _taylor_fn(stats):
    from sparsekit.prune import make_score_fn

    return make_score_fn("taylor2", (16, 16), stats=stats)
