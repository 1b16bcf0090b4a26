"""GPTQ / AutoAWQ GEMM checkpoints -> QLinear (sparsekit.interop.gptq).

Test inputs are packed by auto-round 0.16.1 (the package's CPU packers):

* GPTQ v1 (``checkpoint_format: gptq``, zero points stored minus one):
  ``auto_round_extension.torch.qlinear_torch_zp.QuantLinear.pack`` -- what
  auto-round's ``auto_gptq`` export writes;
* GPTQ v2 layout (zero points stored as is):
  ``auto_round_extension.torch.qlinear_torch.QuantLinear.pack``;
* AutoAWQ GEMM: ``auto_round.export.export_to_awq.utils.WQLinear_GEMM.from_linear``.

The references are the same package's dequantization: the GPTQ ``QuantLinear.forward``
(with ``g_idx``) and the AWQ ``dequantize_gemm``.  auto-round's GPTQ packers take
contiguous groups only and size ``qzeros`` as ``N // 32 * 4`` words (so ``N`` must be a
multiple of 32 there); act-order weights (a permuted ``g_idx``) are packed by running
its packer twice (codes, then zero points / scales) and setting ``g_idx`` on its
module, and ``N = 200`` GPTQ layers use this test's own packer (``own_pack_gptq``),
which is checked against auto-round's output where both apply.
"""
import json
import os

import pytest
import torch
from torch import nn

from sparsekit.formats.int4 import Int4Weight
from sparsekit.interop.gptq import awq_to_int4, gptq_to_int4, load_awq, load_gptq, load_hub_checkpoint
from sparsekit.nn import QLinear
from sparsekit.testing import assert_close_rel, rel_err

SEED = 4321


@pytest.fixture(scope="module")
def ar():
    """auto-round's packers (the import takes seconds: once per module)."""
    pytest.importorskip("auto_round", reason="auto-round is in the test extra")
    import auto_round_extension.torch.qlinear_torch as v2
    import auto_round_extension.torch.qlinear_torch_zp as v1
    from auto_round.export.export_to_awq.utils import WQLinear_GEMM, dequantize_gemm

    return {"gptq": v1.QuantLinear, "gptq_v2": v2.QuantLinear, "awq": WQLinear_GEMM, "awq_deq": dequantize_gemm}


# ---------------------------------------------------------------- layers and packers
def make_layer(n, k, gs, sym, min_zero=0, seed=SEED, g_idx=None):
    """Random codes / fp16 scales / zero points and the float32 weight they dequantize to (exactly)."""
    gen = torch.Generator().manual_seed(seed)
    gse = k if gs == -1 else gs
    g = k // gse
    q = torch.randint(0, 16, (n, k), generator=gen)
    s = (torch.rand(n, g, generator=gen) * 0.02 + 0.001).half().float()
    z = torch.full((n, g), 8) if sym else torch.randint(min_zero, 16, (n, g), generator=gen)
    gi = torch.arange(k) // gse if g_idx is None else g_idx
    w = (q - z[:, gi]).float() * s[:, gi]                  # exact in float32
    bias = torch.randn(n, generator=gen).half()
    return q, s, z, gi, w, bias


def act_order_g_idx(k, gs, seed=SEED):
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.argsort(torch.randperm(k, generator=gen)) // gs).to(torch.int64)


def ar_gptq(ar, fmt, q, s, z, gi, gs, bias):
    """Pack with auto-round's GPTQ QuantLinear; returns the module (qweight, qzeros, scales, g_idx, bias)."""
    n, k = q.shape
    cls = ar[fmt]
    lin = nn.Linear(k, n, bias=True)
    trivial = torch.equal(gi, torch.arange(k) // (k if gs == -1 else gs))
    ql = cls(4, gs, k, n, True, g_idx=True)
    ql.device = torch.device("cpu")       # qlinear_torch.pack_248_bits reads self.device, which it never sets
    with torch.no_grad():
        lin.bias.copy_(bias.float())
        if trivial:
            gsz = ql.group_size
            lin.weight.copy_((q - z.repeat_interleave(gsz, 1)).float() * s.repeat_interleave(gsz, 1))
            ql.pack(lin, s, z.float(), None, device="cpu")
        else:
            # codes: scale 1, zero point 0 -> round(q) = q, in the original column order
            lin.weight.copy_(q.float())
            ql.pack(lin, torch.ones_like(s), torch.zeros_like(s), None, device="cpu")
            qweight = ql.qweight.clone()
            lin.weight.zero_()
            ql.pack(lin, s, z.float(), None, device="cpu")
            ql.qweight = qweight
            ql.g_idx = gi.to(torch.int32)
    return ql


def ar_gptq_dequant(ql, k):
    """auto-round's own dequantized (N, K) weight: its forward on the identity, without the bias.

    Its g_idx path slices ``scales`` by columns of width K (``scales[:, :K]``), so the forward is
    run on blocks of at most K output features (each block a slice of its own tensors)."""
    saved = (ql.bias, ql.qweight, ql.qzeros, ql.scales, ql.outfeatures)
    n = ql.outfeatures
    step = k - k % 8 if n > k else n
    parts = []
    try:
        ql.bias = None
        with torch.no_grad():
            for c0 in range(0, n, step):
                c1 = min(n, c0 + step)
                ql.qweight, ql.scales = saved[1][:, c0:c1], saved[3][:, c0:c1]
                ql.qzeros, ql.outfeatures = saved[2][:, c0 // 8:c1 // 8], c1 - c0
                parts.append(ql.forward(torch.eye(k, dtype=torch.float16)).t())
    finally:
        ql.bias, ql.qweight, ql.qzeros, ql.scales, ql.outfeatures = saved
    return torch.cat(parts).contiguous()


def own_pack_gptq(q, z, v1):
    """This test's GPTQ packer: qweight (K/8, N) with row k in nibble k % 8 of word k // 8, qzeros (G, N/8)
    with output n in nibble n % 8, zero points minus one when ``v1``."""
    def pack_rows(codes):                     # (R, C) -> (R/8, C), packing along R
        r, c = codes.shape
        x = codes.to(torch.int64).reshape(r // 8, 8, c)
        word = sum(x[:, j] << (4 * j) for j in range(8))
        return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)

    qweight = pack_rows(q.t())
    zz = (z - 1) if v1 else z
    assert int(zz.min()) >= 0
    qzeros = pack_rows(zz.contiguous()).t().contiguous()      # pack along N: (N, G) -> (N/8, G) -> (G, N/8)
    return qweight.contiguous(), qzeros


def ref_forward(x, w_deq, bias):
    return x.double() @ w_deq.double().t() + bias.double()


# ---------------------------------------------------------------- GPTQ against auto-round
# (K, N, group_size, act_order); one group per row has only the trivial g_idx
GPTQ_CASES = [(256, 64, 128, False), (256, 64, 128, True), (320, 224, 32, False), (320, 224, 32, True),
              (256, 96, -1, False)]


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("k,n,gs,act_order", GPTQ_CASES)
def test_gptq_bit_exact_vs_auto_round(ar, fmt, sym, k, n, gs, act_order):
    gi = act_order_g_idx(k, gs) if act_order else None
    q, s, z, gi, w, bias = make_layer(n, k, gs, sym, min_zero=1 if fmt == "gptq" else 0, g_idx=gi)
    ql = ar_gptq(ar, fmt, q, s, z, gi, gs, bias)
    ref = ar_gptq_dequant(ql, k)
    assert torch.equal(ref.float(), w.half().float())            # the packer round-trips our layer
    wt = gptq_to_int4(ql.qweight, ql.qzeros, ql.scales, ql.g_idx, group_size=gs, sym=sym,
                      checkpoint_format=fmt)
    assert (wt.perm is not None) == act_order
    assert wt.symmetric == sym
    assert torch.equal(wt.dequantize(), ref)                      # bit for bit, float16
    # forward: float16 against auto-round's forward and the float64 reference
    mod = QLinear.from_weight(wt, ql.bias)
    assert (mod.in_perm is not None) == act_order
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(1)).half()
    with torch.no_grad():
        y = mod(x)
        y_ar = ql.forward(x)
    r64 = ref_forward(x, ref, ql.bias)
    assert y.dtype == torch.float16
    assert_close_rel(y, r64, torch.float16)
    assert rel_err(y, r64) <= 2 * max(rel_err(y_ar, r64), 1e-4)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_bfloat16_activations(ar, act_order):
    k, n, gs = 256, 64, 32
    gi = act_order_g_idx(k, gs) if act_order else None
    q, s, z, gi, w, bias = make_layer(n, k, gs, False, min_zero=1, g_idx=gi)
    ql = ar_gptq(ar, "gptq", q, s, z, gi, gs, bias)
    ref = ar_gptq_dequant(ql, k)
    wt = gptq_to_int4(ql.qweight, ql.qzeros, ql.scales, ql.g_idx, group_size=gs, sym=False, dtype=torch.bfloat16)
    assert wt.dtype == torch.bfloat16
    mod = QLinear.from_weight(wt, ql.bias)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(2)).bfloat16()
    with torch.no_grad():
        y = mod(x)
    assert y.dtype == torch.bfloat16
    assert_close_rel(y, ref_forward(x, ref, ql.bias), torch.bfloat16)
    # float32 inputs give float32 outputs
    with torch.no_grad():
        y32 = mod(x.float())
    assert y32.dtype == torch.float32
    assert_close_rel(y32, ref_forward(x, ref, ql.bias), torch.bfloat16)


def test_own_packer_equals_auto_round(ar):
    """This test's packer writes the same words as auto-round (so it can stand in for N % 32 != 0)."""
    for fmt in ("gptq", "gptq_v2"):
        q, s, z, gi, w, bias = make_layer(64, 256, 32, False, min_zero=1)
        ql = ar_gptq(ar, fmt, q, s, z, gi, 32, bias)
        qweight, qzeros = own_pack_gptq(q, z, fmt == "gptq")
        assert torch.equal(qweight, ql.qweight) and torch.equal(qzeros, ql.qzeros)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("gs,act_order", [(32, False), (64, True), (-1, False)])
def test_gptq_odd_shape_own_packer(fmt, gs, act_order):
    k, n = 320, 200
    gi = act_order_g_idx(k, gs) if act_order else None
    q, s, z, gi, w, bias = make_layer(n, k, gs, False, min_zero=1 if fmt == "gptq" else 0, g_idx=gi)
    qweight, qzeros = own_pack_gptq(q, z, fmt == "gptq")
    wt = gptq_to_int4(qweight, qzeros, s.t().half(), gi.to(torch.int32), group_size=gs, sym=False,
                      checkpoint_format=fmt)
    assert torch.equal(wt.dequantize(), w.half())
    mod = QLinear.from_weight(wt, bias)
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(3)).half()
    with torch.no_grad():
        assert_close_rel(mod(x), ref_forward(x, w, bias), torch.float16)


# ---------------------------------------------------------------- AWQ against auto-round
@pytest.mark.parametrize("k,n,gs", [(256, 64, 128), (320, 200, 32), (256, 96, -1), (128, 256, 64)])
def test_awq_gemm_bit_exact_vs_auto_round(ar, k, n, gs):
    q, s, z, gi, w, bias = make_layer(n, k, gs, False)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(bias.float())
    a = ar["awq"].from_linear(lin, 4, gs, scales=s.t().contiguous(), zeros=z.t().contiguous().float(), device="cpu")
    ref = ar["awq_deq"](a.qweight, a.qzeros, a.scales, 4, a.group_size).t().contiguous()
    assert torch.equal(ref.float(), w.half().float())
    wt = awq_to_int4(a.qweight, a.qzeros, a.scales, group_size=gs)
    assert torch.equal(wt.dequantize(), ref)
    mod = QLinear.from_weight(wt, a.bias)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(4)).half()
    with torch.no_grad():
        y, y_ar = mod(x), a(x)
    r64 = ref_forward(x, ref, a.bias)
    assert_close_rel(y, r64, torch.float16)
    assert rel_err(y, r64) <= 2 * max(rel_err(y_ar.reshape(y.shape), r64), 1e-4)
    wb = awq_to_int4(a.qweight, a.qzeros, a.scales, group_size=gs, dtype=torch.bfloat16)
    xb = x.bfloat16()
    with torch.no_grad():
        assert_close_rel(QLinear.from_weight(wb, a.bias)(xb), ref_forward(xb, ref, a.bias), torch.bfloat16)


# ---------------------------------------------------------------- bad inputs
def test_bad_layer_inputs_raise():
    q, s, z, gi, w, bias = make_layer(64, 256, 32, False, min_zero=1)
    qw, qz = own_pack_gptq(q, z, True)
    sc = s.t().half().contiguous()
    ok = dict(group_size=32, sym=False)
    with pytest.raises(ValueError, match="bits=3"):
        gptq_to_int4(qw, qz, sc, bits=3, **ok)
    with pytest.raises(ValueError, match="marlin"):
        gptq_to_int4(qw, qz, sc, checkpoint_format="marlin", **ok)
    with pytest.raises(ValueError, match="group_size=16"):
        gptq_to_int4(qw, qz, sc, group_size=16, sym=False)
    with pytest.raises(ValueError, match="qzeros must have shape"):
        gptq_to_int4(qw, qz[:, :4], sc, **ok)
    with pytest.raises(ValueError, match="scales must have shape"):
        gptq_to_int4(qw, qz, sc[:, :32], **ok)
    with pytest.raises(TypeError, match="int32"):
        gptq_to_int4(qw.long(), qz, sc, **ok)
    with pytest.raises(ValueError, match="sym=True"):
        gptq_to_int4(qw, qz, sc, group_size=32, sym=True)
    with pytest.raises(ValueError, match="g_idx"):
        gptq_to_int4(qw, qz, sc, torch.zeros(256, dtype=torch.int32), **ok)      # groups of unequal size
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        gptq_to_int4(qw, qz, sc.float(), **ok)
    bad = qz.clone()
    bad[0, 0] = bad[0, 0] | 0xF                                   # a v1 nibble of 15 = zero point 16
    with pytest.raises(ValueError, match="gptq_v2"):
        gptq_to_int4(qw, bad, sc, **ok)
    gptq_to_int4(qw, bad, sc, checkpoint_format="gptq_v2", **ok)  # fine as v2 (zero point 15)
    aq = torch.zeros(256, 8, dtype=torch.int32)
    az = torch.zeros(8, 8, dtype=torch.int32)
    for v in ("gemv", "GEMV_FAST", "marlin", "exllama"):
        with pytest.raises(ValueError, match=v):
            awq_to_int4(aq, az, torch.ones(8, 64, dtype=torch.float16), group_size=32, version=v)
    with pytest.raises(ValueError, match="bits=8"):
        awq_to_int4(aq, az, torch.ones(8, 64, dtype=torch.float16), group_size=32, bits=8)


# ---------------------------------------------------------------- model level
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32, bias=False), nn.LayerNorm(32))


def _gptq_state(model, fmt="gptq_v2", gs=32, act_order=True):
    sd = {k: v.half() for k, v in model.state_dict().items()}
    deq = {}
    for i, name in enumerate(("0", "2")):
        lin = model.get_submodule(name)
        n, k = lin.out_features, lin.in_features
        gi = act_order_g_idx(k, gs, seed=i) if act_order else None
        q, s, z, gi, w, _ = make_layer(n, k, gs, False, min_zero=1, seed=SEED + i, g_idx=gi)
        qw, qz = own_pack_gptq(q, z, fmt == "gptq")
        del sd[name + ".weight"]
        sd.update({name + ".qweight": qw, name + ".qzeros": qz, name + ".scales": s.t().half().contiguous(),
                   name + ".g_idx": gi.to(torch.int32)})
        deq[name] = w.half()
    cfg = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": gs, "desc_act": act_order,
                                   "sym": False, "checkpoint_format": fmt}}
    return sd, cfg, deq


def test_load_gptq_state_dict_pair_and_errors():
    sd, cfg, deq = _gptq_state(_mlp())
    model = load_gptq((sd, cfg), _mlp())
    assert isinstance(model[0], QLinear) and isinstance(model[2], QLinear)
    assert model[0].in_perm is not None and model[2].bias is None
    assert torch.equal(model[0].weight, deq["0"]) and torch.equal(model[2].weight, deq["2"])
    assert torch.equal(model[3].weight, sd["3.weight"].float())
    ref = _mlp().half()
    with torch.no_grad():
        ref[0].weight.copy_(deq["0"])
        ref[0].bias.copy_(sd["0.bias"])
        ref[2].weight.copy_(deq["2"])
        ref[3].load_state_dict({"weight": sd["3.weight"], "bias": sd["3.bias"]})
        x = torch.randn(4, 256).half()
        assert_close_rel(model.half()(x), ref.double()(x.double()), torch.float16)
    # errors: wrong skeleton size, missing tensor, stray tensor, wrong method, unsupported format
    small = nn.Sequential(nn.Linear(256, 48), nn.ReLU(), nn.Linear(64, 32, bias=False), nn.LayerNorm(32))
    with pytest.raises(ValueError, match="skeleton's Linear is"):
        load_gptq((sd, cfg), small)
    with pytest.raises(ValueError, match="'2.qzeros' is missing"):
        load_gptq(({k: v for k, v in sd.items() if k != "2.qzeros"}, cfg), _mlp())
    with pytest.raises(ValueError, match="lacks '3.bias'"):
        load_gptq(({k: v for k, v in sd.items() if k != "3.bias"}, cfg), _mlp())
    with pytest.raises(ValueError, match="no place"):
        load_gptq((dict(sd, extra=torch.zeros(1)), cfg), _mlp())
    with pytest.raises(ValueError, match="expected 'gptq'"):
        load_gptq((sd, {"quant_method": "awq"}), _mlp())
    with pytest.raises(ValueError, match="bitblas"):
        load_gptq((sd, dict(cfg["quantization_config"], checkpoint_format="bitblas")), _mlp())
    with pytest.raises(ValueError, match="bits=8"):
        load_gptq((sd, dict(cfg["quantization_config"], bits=8)), _mlp())
    with pytest.raises(ValueError, match="version 'gemv'"):
        load_awq((sd, {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}), _mlp())
    fresh = _mlp()
    with pytest.raises(ValueError):
        load_gptq(({k: v for k, v in sd.items() if k != "2.qzeros"}, cfg), fresh)
    assert all(type(m) is not QLinear for m in fresh)          # untouched on failure


def test_tiny_llama_gptq_directory(ar, tmp_path):
    """A tiny Llama quantized with auto-round's GPTQ (v1) packer, written as a hub directory, loaded into a
    fresh skeleton: logits equal those of the model holding the dequantized weights."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    gs = 32
    n_q = 0
    for i, (name, lin) in enumerate(model.named_modules()):
        if not isinstance(lin, nn.Linear) or name == "lm_head":
            continue
        n, k = lin.out_features, lin.in_features
        act_order = n_q % 2 == 1                                   # every other layer with a desc_act g_idx
        gi = act_order_g_idx(k, gs, seed=i) if act_order else None
        q, s, z, gi, w, bias = make_layer(n, k, gs, False, min_zero=1, seed=SEED + i, g_idx=gi)
        ql = ar_gptq(ar, "gptq", q, s, z, gi, gs, bias)
        with torch.no_grad():
            lin.weight.copy_(ar_gptq_dequant(ql, k))              # the reference model: dequantized weights
        del sd[name + ".weight"]
        sd.update({name + ".qweight": ql.qweight, name + ".qzeros": ql.qzeros, name + ".scales": ql.scales,
                   name + ".g_idx": ql.g_idx})
        n_q += 1
    assert n_q == 14
    d = tmp_path / "tiny-llama-gptq"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    full = cfg.to_dict()
    full["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": gs, "desc_act": True,
                                   "sym": False, "checkpoint_format": "gptq", "static_groups": False,
                                   "true_sequential": True, "damp_percent": 0.01}
    (d / "config.json").write_text(json.dumps(full))
    with torch.device("meta"):                                     # no memory for the dense weights
        skeleton = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    loaded = load_hub_checkpoint(d, skeleton)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QLinear)
    assert sum(isinstance(m, QLinear) for m in loaded.modules()) == 14
    assert sum(m.in_perm is not None for m in loaded.modules() if isinstance(m, QLinear)) == 7
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out, ref = loaded(ids).logits, model(ids).logits
        ref32 = model.float()(ids).logits
    assert_close_rel(out, ref32, torch.float16)
    assert rel_err(out, ref32) <= 2 * max(rel_err(ref, ref32), 1e-4)
    # sparsekit info describes the directory
    from sparsekit.cli_model import describe_checkpoint

    info = describe_checkpoint(str(d))
    assert info["format"].startswith("GPTQ") and info["num_layers"] == 14


def test_load_awq_directory_modules_to_not_convert(ar, tmp_path):
    """An AutoAWQ GEMM directory (auto-round's packer): the quantized layer becomes a QLinear, the layer in
    modules_to_not_convert stays dense, and a dispatch through load_hub_checkpoint gives the same model."""
    from safetensors.torch import save_file

    def mlp():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 16)).half()

    dense = mlp()
    q, s, z, gi, w, bias = make_layer(64, 128, 64, False, seed=7)
    lin = nn.Linear(128, 64)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(bias.float())
    a = ar["awq"].from_linear(lin, 4, 64, scales=s.t().contiguous(), zeros=z.t().contiguous().float(), device="cpu")
    sd = {"0.qweight": a.qweight, "0.qzeros": a.qzeros, "0.scales": a.scales, "0.bias": a.bias,
          "2.weight": dense[2].weight.detach(), "2.bias": dense[2].bias.detach()}
    qc = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "GEMM",
          "modules_to_not_convert": ["2"]}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc}))
    model = load_hub_checkpoint(tmp_path, mlp())
    assert isinstance(model[0], QLinear) and type(model[2]) is nn.Linear
    ref = ar["awq_deq"](a.qweight, a.qzeros, a.scales, 4, 64).t()
    assert torch.equal(model[0].weight, ref)
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(8)).half()
    ref_model = mlp()
    with torch.no_grad():
        ref_model[0].weight.copy_(ref)
        ref_model[0].bias.copy_(a.bias)
        assert_close_rel(model(x), ref_model.double()(x.double()), torch.float16)
        assert torch.equal(load_awq((sd, qc), mlp())(x), model(x))
    with pytest.raises(ValueError, match="modules_to_not_convert"):
        load_awq((sd, dict(qc, modules_to_not_convert=["0"])), mlp())


def test_meta_skeleton_with_tied_weights():
    """A checkpoint that omits a tied output weight (as transformers saves them) loads into a meta skeleton:
    the tie survives materialization."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(16, 64)
            self.proj = nn.Linear(64, 64)
            self.head = nn.Linear(64, 16, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.proj(self.emb(ids)))

    q, s, z, gi, w, bias = make_layer(64, 64, 32, True)
    qw, qz = own_pack_gptq(q, z, False)
    emb = torch.randn(16, 64).half()
    sd = {"emb.weight": emb, "proj.qweight": qw, "proj.qzeros": qz, "proj.scales": s.t().half().contiguous(),
          "proj.bias": bias}
    cfg = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "checkpoint_format": "gptq_v2"}
    with torch.device("meta"):
        skel = Tied().half()
    model = load_gptq((sd, cfg), skel)
    assert model.head.weight is model.emb.weight and torch.equal(model.emb.weight, emb)
    assert model.proj.symmetric and model.proj.zeros is None
    ids = torch.arange(16)
    with torch.no_grad():
        ref = (emb.double()[ids] @ w.double().t() + bias.double()) @ emb.double().t()
        assert_close_rel(model(ids), ref, torch.float16)
