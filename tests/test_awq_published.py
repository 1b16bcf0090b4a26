"""AWQ as published: shared sibling scales, folding, clipping search (sparsekit.quant.awq_model)."""
import copy
import re

import pytest
import torch
from torch import nn

from sparsekit.quant import (AWQ_ADAPTERS, awq_auto_clip, awq_fold_, awq_group_search, awq_quantize_model_,
                             quantize_model_weights, rtn_quantize)

transformers = pytest.importorskip("transformers")


def _llama(seed, outliers=False, bias=False):
    torch.manual_seed(seed)
    if bias:
        cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
        m = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
        m = transformers.LlamaForCausalLM(cfg)
    # LLM-like activation outliers: a few channels much larger than the rest
    return _perturbed(m, seed, lambda n: "layernorm" in n, 1.0 if outliers else 0.3)


def _logits(m, x):
    with torch.no_grad():
        return m(x).logits


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bias", [False, True])
def test_fold_leaves_the_float_function_unchanged(bias):
    m, _, test, _ = _llama(0, bias=bias)
    ref = _logits(m, test)
    g = torch.Generator().manual_seed(1)
    folds = 0
    for blk in m.model.layers:
        for prev, sibs, _mod in AWQ_ADAPTERS["llama"]["groups"]:
            lins = [blk.get_submodule(s) for s in sibs]
            s = torch.exp(torch.randn(lins[0].in_features, generator=g, dtype=torch.float64))
            awq_fold_(blk.get_submodule(prev), lins, s)
            folds += 1
    assert folds == 8
    assert _rel(_logits(m, test), ref) < 1e-10


def test_model_fold_is_exact_before_rounding_and_shared_scales_are_identical():
    m, calib, test, layers = _llama(1, outliers=True)
    ref = _logits(m, test)
    # fold=False: every layer keeps a run-time scale; siblings' scales are the same tensor values
    m1 = copy.deepcopy(m)
    rep = {}
    res = awq_quantize_model_(m1, calib, group_size=32, layers=layers, fold=False, auto_clip=False,
                              progress=False, report=rep)
    assert sorted(rep["input_scale_layers"]) == sorted(layers)
    for i in range(2):
        p = f"model.layers.{i}."
        for sibs in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            s0 = res[p + sibs[0]].input_scale
            for s in sibs[1:]:
                assert torch.equal(res[p + s].input_scale, s0)
    # fold=True: no run-time scale left on a Llama block, and the same alphas as without folding
    m2 = copy.deepcopy(m)
    rep2 = {}
    res2 = awq_quantize_model_(m2, calib, group_size=32, layers=layers, fold=True, auto_clip=False,
                               progress=False, report=rep2)
    assert rep2["input_scale_layers"] == []
    assert all(r.input_scale is None for r in res2.values())
    assert [g["alpha"] for g in rep2["groups"]] == [g["alpha"] for g in rep["groups"]]
    assert all(g["folded"] for g in rep2["groups"])
    # the same fake-quantized function either way (folding moves s, rounding sees the same W s)
    assert _rel(_logits(m2, test), _logits(m1, test)) < 1e-5
    assert _rel(_logits(m2, test), ref) > 0          # it did quantize


def test_auto_clip_lowers_the_error_on_a_layer_with_outliers():
    g = torch.Generator().manual_seed(3)
    n, k, gs = 64, 128, 32
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    idx = torch.randint(0, k, (n, 2), generator=g)
    w.scatter_(1, idx, 8.0 * torch.sign(torch.randn(n, 2, generator=g, dtype=torch.float64)))
    x = torch.randn(1024, k, generator=g, dtype=torch.float64)

    def err(wq):
        return float((x @ (w - wq).t()).norm() / (x @ w.t()).norm())

    m = awq_auto_clip(w, x, gs, grid=20, max_shrink=0.5, max_tokens=512)
    assert m.shape == (n, k // gs)
    wg = w.reshape(n, k // gs, gs)
    assert bool((m <= wg.abs().amax(-1) + 1e-12).all()) and bool((m >= 0.5 * wg.abs().amax(-1) - 1e-12).all())
    clipped = torch.minimum(torch.maximum(wg, -m.unsqueeze(-1)), m.unsqueeze(-1)).reshape(n, k)
    e_clip = err(rtn_quantize(clipped, gs).dequantize().double())
    e_plain = err(rtn_quantize(w, gs).dequantize().double())
    print(f"\nauto_clip: RTN {e_plain:.4f}  clipped {e_clip:.4f}")
    assert e_clip < e_plain


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_awq_beats_rtn_and_reports_against_per_layer_awq(seed):
    m, calib, test, layers = _llama(seed, outliers=True)
    ref = _logits(m, test)
    errs = {}
    for name, kw in (("published", dict(method="awq")), ("per_layer", dict(method="awq", published=False)),
                     ("rtn", dict(method="rtn"))):
        mm = copy.deepcopy(m)
        quantize_model_weights(mm, calib if name != "rtn" else None, group_size=32, layers=layers, progress=False,
                               **kw)
        errs[name] = _rel(_logits(mm, test), ref)
    print(f"\nseed {seed}: " + "  ".join(f"{k} {v:.4f}" for k, v in errs.items()))
    assert errs["published"] < errs["rtn"]


def _fake_q64(w, gs):
    """sparsekit's asymmetric int4 grid, written out in float64."""
    n, k = w.shape
    wg = w.reshape(n, k // gs, gs)
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    hi = wg.amax(-1, keepdim=True).clamp(min=0)
    sc = torch.where(hi - lo > 0, (hi - lo) / 15, torch.ones_like(hi))
    z = torch.clamp(torch.round(-lo / sc), 0, 15)
    q = torch.clamp(torch.round(wg / sc) + z, 0, 15)
    return ((q - z) * sc).reshape(n, k)


def test_mlp_group_search_equals_a_float64_reimplementation():
    m, calib, _, layers = _llama(4, outliers=True)
    blk = m.model.layers[0]
    xs = []
    h = blk.post_attention_layernorm.register_forward_hook(lambda mod, i, o: xs.append(o.detach().clone()))
    with torch.no_grad():
        for b in calib:
            m(b)
    h.remove()
    x = torch.cat([t.reshape(-1, 64) for t in xs])
    mlp = blk.mlp
    Wg, Wu, Wd = (mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone(),
                  mlp.down_proj.weight.detach().clone())

    def mlp64(wg, wu):
        return (torch.nn.functional.silu(x @ wg.t()) * (x @ wu.t())) @ Wd.t()

    # the original algorithm: s = mean|x|^a (clamp 1e-4, / sqrt(max min)), W <- Q(W s)/s, loss = MSE of the MLP output
    org = mlp64(Wg, Wu)
    xm = x.abs().mean(0)
    losses = []
    for i in range(20):
        s = xm.pow(i / 20).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        out = mlp64(_fake_q64(Wg * s, 32) / s, _fake_q64(Wu * s, 32) / s)
        losses.append(float((out - org).pow(2).mean()))
    best = min(range(20), key=lambda i: losses[i])

    refs = [mlp(t).detach().clone() for t in xs]
    s, info = awq_group_search([mlp.gate_proj, mlp.up_proj], xm, lambda: ((mlp(t), r) for t, r in zip(xs, refs)),
                               group_size=32, grid=20, return_info=True)
    assert torch.equal(mlp.gate_proj.weight, Wg)            # weights restored
    torch.testing.assert_close(torch.tensor(info["losses"]), torch.tensor(losses), rtol=1e-5, atol=0)
    assert info["alpha"] == best / 20
    # and the model-level search picked the same alpha for that group (statistics from the float model)
    rep = {}
    awq_quantize_model_(copy.deepcopy(m), calib, group_size=32, layers=layers, auto_clip=False, progress=False,
                        report=rep)
    grp = [g for g in rep["groups"] if g["module"] == "model.layers.0.mlp"]
    assert len(grp) == 1 and grp[0]["alpha"] == best / 20 and grp[0]["folded"]


def test_generic_siblings_share_a_scale_without_fold():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 32)
            self.b = nn.Linear(32, 32)
            self.c = nn.Linear(32, 8)

        def forward(self, x):
            return self.c(self.a(x) * self.b(x))

    torch.manual_seed(0)
    net = Two()
    calib = [torch.randn(8, 32) * torch.exp(torch.randn(32)) for _ in range(3)]
    rep = {}
    res = awq_quantize_model_(net, calib, group_size=32, progress=False, report=rep)
    assert torch.equal(res["a"].input_scale, res["b"].input_scale)
    assert [g["siblings"] for g in rep["groups"]] == [["a", "b"], ["c"]]
    assert sorted(rep["input_scale_layers"]) == ["a", "b", "c"]
    with pytest.raises(TypeError, match="fold"):
        awq_quantize_model_(net, calib, group_size=32, fold=1, progress=False)


def test_awq_search_forward_loss_equals_the_hessian_loss():
    """Fewer rows than K: the error is evaluated by a forward; it matches the X^T X form."""
    from sparsekit.quant import awq_search

    g = torch.Generator().manual_seed(5)
    W = torch.randn(48, 256, generator=g)
    X = torch.randn(100, 256, generator=g) * torch.exp(torch.randn(256, generator=g))
    X64 = X.double()
    _, r1, i1 = awq_search(W, X, 32, return_info=True)
    _, r2, i2 = awq_search(W, {"mean_abs": X64.abs().mean(0), "H": X64.T @ X64}, 32, return_info=True)
    assert i1["alpha"] == i2["alpha"] and torch.equal(r1.q, r2.q)
    torch.testing.assert_close(torch.tensor(i1["errors"]), torch.tensor(i2["errors"]), rtol=1e-5, atol=0)


def test_transform_only_then_int4_conversion_gives_the_published_awq_weights():
    """quantize=False folds the scales and clips the float model; quantize_(model, "int4") then rounds it
    to the codes AWQ as published gives (the packed layer keeps float16 group scales)."""
    from sparsekit import quantize_
    from sparsekit.schemes.int4 import Int4Params

    m, calib, test, layers = _llama(2, outliers=True)
    ref = _logits(m, test)
    # no clipping: the transform alone leaves the float function unchanged
    m0 = copy.deepcopy(m)
    rep0 = {}
    assert awq_quantize_model_(m0, calib, group_size=32, layers=layers, auto_clip=False, progress=False,
                               report=rep0, quantize=False) == {}
    assert all(g["folded"] for g in rep0["groups"]) and rep0["input_scale_layers"] == []
    assert _rel(_logits(m0, test), ref) < 1e-10
    # with clipping, then the packed int4 conversion (round to nearest, the same groups)
    m1, m2 = copy.deepcopy(m), copy.deepcopy(m)
    awq_quantize_model_(m1, calib, group_size=32, layers=layers, progress=False, quantize=False)
    quantize_(m1, Int4Params(group_size=32), filter_fn=lambda mod, name: name in layers, progress=False)
    res = awq_quantize_model_(m2, calib, group_size=32, layers=layers, progress=False)
    for name in layers:
        q = m1.get_submodule(name)
        assert type(q).__name__ == "QLinear"
        want = res[name].effective_weight().double()
        assert _rel(q.weight.double(), want) < 2e-3          # float16 group scales and zeros
    with pytest.raises(ValueError, match="quantize=False needs fold=True"):
        awq_quantize_model_(copy.deepcopy(m), calib, group_size=32, layers=layers, fold=False, quantize=False,
                            progress=False)
    with pytest.raises(TypeError, match="quantize must be a bool"):
        awq_quantize_model_(copy.deepcopy(m), calib, group_size=32, layers=layers, quantize=1, progress=False)


def _opt_or_bert(kind, seed):
    """Tiny OPT (pre-LN, or post-LN like OPT-350m) or BERT, float64, LLM-like norm outliers, random biases."""
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64)
        m = transformers.BertModel(cfg, add_pooling_layer=False)
    else:
        cfg = transformers.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                                     do_layer_norm_before=kind == "opt_pre_ln")
        m = transformers.OPTForCausalLM(cfg)
    return _perturbed(m, seed, lambda n: ("layer_norm" in n or "LayerNorm" in n) and n.endswith("weight"), 1.0)


def _perturbed(m, seed, is_norm, spread):
    """``m`` in float64 with its norm weights (``is_norm(name)``) scaled by exp(N(0, spread)) and random biases;
    calibration and test token batches; the names of its linears other than lm_head."""
    m = m.double().eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if is_norm(n):
                p.mul_(torch.exp(torch.randn(p.shape, generator=g, dtype=p.dtype) * spread))
            elif n.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    calib = [torch.randint(0, 128, (2, 16), generator=g) for _ in range(4)]
    test = torch.randint(0, 128, (4, 16), generator=g)
    layers = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and "lm_head" not in n]
    return m, calib, test, layers


def _out(m, x):
    with torch.no_grad():
        o = m(x)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("kind", ["opt_pre_ln", "opt_post_ln", "bert"])
def test_opt_and_bert_folds_leave_the_float_function_unchanged(kind):
    m, calib, test, layers = _opt_or_bert(kind, 0)
    ref = _out(m, test)
    rep = {}
    # folds only (no clipping, no rounding): the float64 function must not change
    awq_quantize_model_(m, calib, group_size=32, layers=layers, auto_clip=False, quantize=False, progress=False,
                        report=rep)
    assert _rel(_out(m, test), ref) < 1e-10
    folded = {re.sub(r"^.*\.\d+\.", "", g["producer"]) for g in rep["groups"] if g["folded"]}
    if kind == "opt_pre_ln":
        assert folded == {"self_attn_layer_norm", "self_attn.v_proj", "final_layer_norm", "fc1"}
        assert rep["input_scale_layers"] == []
    elif kind == "opt_post_ln":
        # post-LN: the norms' outputs are the residual stream, so only v_proj -> out_proj and fc1 -> fc2 fold
        assert folded == {"self_attn.v_proj", "fc1"}
        assert sorted(n.rsplit(".", 1)[-1] for n in rep["input_scale_layers"]) == ["fc1", "fc1", "k_proj", "k_proj",
                                                                                  "q_proj", "q_proj", "v_proj",
                                                                                  "v_proj"]
    else:
        assert folded == {"attention.self.value"}
        assert all(g["producer"] is None for g in rep["groups"] if not g["folded"])


@pytest.mark.parametrize("kind", ["opt_pre_ln", "opt_post_ln"])
def test_opt_published_awq_beats_rtn(kind):
    """Measured (relative logit error, seeds 0/1/2): pre-LN published 0.043/0.064/0.040 vs RTN 0.051/0.065/0.066
    (per-linear run-time-scale AWQ 0.038/0.083/0.030: no consistent order, not asserted); post-LN published
    0.011/0.008/0.006 vs RTN 0.033/0.032/0.009 and per-linear 0.018/0.013/0.018.  (Before the post-LN
    condition the norm folds changed the function there: published 0.53-0.72.)  BERT is not asserted:
    published 0.0023/0.0061/0.0102 vs RTN 0.0052/0.0056/0.0109 -- no consistent order."""
    for seed in range(3):
        m, calib, test, layers = _opt_or_bert(kind, seed)
        ref = _out(m, test)
        errs = {}
        for name, kw in (("published", dict(method="awq")), ("per_layer", dict(method="awq", published=False)),
                         ("rtn", dict(method="rtn"))):
            mm = copy.deepcopy(m)
            quantize_model_weights(mm, calib if name != "rtn" else None, group_size=32, layers=layers,
                                   progress=False, **kw)
            errs[name] = _rel(_out(mm, test), ref)
        assert errs["published"] < errs["rtn"], (seed, errs)
        if kind == "opt_post_ln":
            assert errs["published"] < errs["per_layer"], (seed, errs)
