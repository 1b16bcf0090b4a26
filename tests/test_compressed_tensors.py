"""compressed-tensors interop (sparsekit.interop.compressed_tensors) against the package itself.

The reference is compressed-tensors' own code: its qparams (``calculate_qparams``),
compressors (``PackedQuantizationCompressor`` for ``pack-quantized``,
``IntQuantizationCompressor`` for ``int-quantized``), config models and module
matching.  Dequantized weights must agree bit for bit in both directions.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

try:
    import compressed_tensors  # noqa: F401
    from compressed_tensors.compressors.naive_quantized import IntQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.compressors.model_compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    from compressed_tensors.utils import match_named_modules
except ImportError as e:          # pragma: no cover - the test extra installs it
    pytest.skip(f"compressed-tensors is not importable ({e}); install sparsekit[interop]",
                allow_module_level=True)

from safetensors.torch import save_file

from sparsekit.formats.int4 import Int4Weight, unpack_int4
from sparsekit.formats.int8 import Int8Weight
from sparsekit.interop.compressed_tensors import (int4_from_ct, int4_to_ct, int8_from_ct, int8_to_ct,
                                                  load_compressed_tensors, save_compressed_tensors)
from sparsekit.nn import QLinear
from sparsekit.ops.act_quant import per_token_quant_reference
from sparsekit.testing import assert_close_rel, rel_err

SEED = 1234


def _w4_args(gs, sym):
    return QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group" if gs > 0 else "channel",
                            group_size=gs if gs > 0 else None)


W8_ARGS = dict(num_bits=8, type="int", symmetric=True, strategy="channel")
A8_ARGS = dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)


def _ct_int4(w, gs, sym):
    """compressed-tensors' own quantization + packing of ``w``; returns (compressed tensors, ct dequantized, scheme)."""
    args = _w4_args(gs, sym)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    n, k = w.shape
    g = gs if gs > 0 else k
    wg = w.reshape(n, k // g, g)
    scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
    sd = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
    ref = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
    return sd, ref, scheme


def _no_min_code_weight(n, k, dtype, gen):
    """A weight whose largest-magnitude entry in every row is positive, so compressed-tensors' int8 grid
    (absmax / 127.5) never emits the code -128."""
    w = torch.randn(n, k, generator=gen)
    w[:, k // 2] = w.abs().amax(dim=1) * 1.05 + 0.01
    return w.to(dtype)


def _ct_int8(w):
    args = QuantizationArgs(**W8_ARGS)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=QuantizationArgs(**A8_ARGS))
    scale, zp = calculate_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), args)
    sd = IntQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
    ref = IntQuantizationCompressor.decompress(sd, scheme)["weight"]
    return sd, ref, scheme


INT4_CASES = [(32, 100, 96), (64, 96, 256), (128, 97, 384), (-1, 40, 72), (32, 8, 32)]


# ------------------------------------------------------------------ layout facts
def test_nibble_order_is_awqs():
    """sparsekit's nibble order inside an int32 is AutoAWQ's: AWQ unpacks the 8 nibbles sequentially and
    reorders them with AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7] (awq/utils/packing_utils.py)."""
    gen = torch.Generator().manual_seed(SEED)
    qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (5, 6), generator=gen, dtype=torch.int64).to(torch.int32)
    shifts = torch.arange(0, 32, 4)
    seq = (qweight.to(torch.int64)[:, :, None] >> shifts) & 0xF            # nibble i of each word
    awq = seq[:, :, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(5, 48)
    assert torch.equal(unpack_int4(qweight).to(torch.int64), awq)


# ------------------------------------------------------------------ int4, layer level
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs,n,k", INT4_CASES)
def test_int4_import_matches_ct_bit_for_bit(gs, n, k, sym):
    gen = torch.Generator().manual_seed(SEED + n + k)
    dtype = torch.bfloat16 if gs == 64 else torch.float16
    w = torch.randn(n, k, generator=gen).to(dtype)
    sd, ref, _ = _ct_int4(w, gs, sym)
    iw = int4_from_ct(sd["weight_packed"], sd["weight_scale"], sd.get("weight_zero_point"),
                      weight_shape=sd["weight_shape"], group_size=gs, symmetric=sym)
    assert iw.symmetric == sym and iw.group_size == (gs if gs > 0 else k) and iw.dtype == dtype
    assert ref.dtype == dtype and torch.equal(iw.dequantize(), ref)
    # the export reproduces compressed-tensors' tensors exactly (packing, zero points, scales, shape)
    back = int4_to_ct(iw)
    assert set(back) == set(sd)
    for key, t in sd.items():
        assert torch.equal(back[key], t), key


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs,n,k", [(32, 100, 96), (128, 97, 384), (-1, 24, 40)])
def test_int4_export_decompresses_bit_for_bit(gs, n, k, sym, method):
    gen = torch.Generator().manual_seed(SEED + 7 * n + k)
    lin = nn.Linear(k, n).to(torch.float16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen))
    calib = torch.randn(64, k, generator=gen).to(torch.float16) if method == "gptq" else None
    ql = QLinear.from_float(lin, bits=4, group_size=gs, symmetric=sym, method=method, calib_inputs=calib)
    iw = ql.weight_format()
    tensors = int4_to_ct(iw)
    scheme = QuantizationScheme(targets=["Linear"], weights=_w4_args(gs, sym))
    ct_w = PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]
    assert ct_w.dtype == torch.float16 and torch.equal(ct_w, iw.dequantize())
    # and back: the imported weight is the same packed weight
    again = int4_from_ct(tensors["weight_packed"], tensors["weight_scale"], tensors.get("weight_zero_point"),
                         weight_shape=tensors["weight_shape"], group_size=gs, symmetric=sym)
    assert torch.equal(again.qweight, iw.qweight) and torch.equal(again.scales, iw.scales)
    assert (again.zeros is None) == sym and (sym or torch.equal(again.zeros, iw.zeros))


@pytest.mark.parametrize("sym", [True, False])
def test_int4_imported_qlinear_forward(sym):
    gen = torch.Generator().manual_seed(SEED + 3)
    n, k = 96, 256
    w = torch.randn(n, k, generator=gen).to(torch.float16)
    bias = torch.randn(n, generator=gen).to(torch.float16)
    sd, ref, _ = _ct_int4(w, 64, sym)
    iw = int4_from_ct(sd["weight_packed"], sd["weight_scale"], sd.get("weight_zero_point"),
                      weight_shape=sd["weight_shape"], group_size=64, symmetric=sym)
    ql = QLinear.from_weight(iw, bias, backend="reference")
    x = torch.randn(3, 5, k, generator=gen).to(torch.float16)
    out = ql(x)
    ref64 = F.linear(x.double(), ref.double(), bias.double())
    torch_out = F.linear(x.float(), ref.float(), bias.float()).half()      # PyTorch's own fp16-rounded result
    e = assert_close_rel(out, ref64, torch.float16)
    assert e <= 2 * rel_err(torch_out, ref64) + 2.0 ** -11


# ------------------------------------------------------------------ int8, layer level
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", [(50, 77), (96, 256)])
def test_int8_import_matches_ct_bit_for_bit(n, k, dtype):
    gen = torch.Generator().manual_seed(SEED + n)
    w = _no_min_code_weight(n, k, dtype, gen)
    sd, ref, _ = _ct_int8(w)
    assert sd["weight"].dtype == torch.int8 and tuple(sd["weight_scale"].shape) == (n, 1)
    iw = int8_from_ct(sd["weight"], sd["weight_scale"])
    assert torch.equal(iw.dequantize(dtype), ref)
    back = int8_to_ct(iw)
    assert torch.equal(back["weight"], sd["weight"])
    assert torch.equal(back["weight_scale"].to(dtype), sd["weight_scale"])


def test_int8_tensor_strategy_import():
    gen = torch.Generator().manual_seed(SEED + 14)
    w = _no_min_code_weight(24, 40, torch.float16, gen)
    w[:, 20] = w.abs().max() * 1.1                       # the tensor-wide absmax is positive too
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor")
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=QuantizationArgs(**A8_ARGS))
    scale, zp = calculate_qparams(w.amin().reshape(1), w.amax().reshape(1), args)
    sd = IntQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
    ref = IntQuantizationCompressor.decompress(sd, scheme)["weight"]
    assert sd["weight_scale"].numel() == 1
    iw = int8_from_ct(sd["weight"], sd["weight_scale"])
    assert torch.equal(iw.dequantize(torch.float16), ref)


def test_int8_export_decompresses_bit_for_bit():
    gen = torch.Generator().manual_seed(SEED + 11)
    iw = Int8Weight.from_float(torch.randn(70, 130, generator=gen))
    tensors = int8_to_ct(iw)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**W8_ARGS),
                                input_activations=QuantizationArgs(**A8_ARGS))
    ct_w = IntQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]
    assert ct_w.dtype == torch.float32 and torch.equal(ct_w, iw.dequantize())


def test_int8_min_code_rejected_or_clipped():
    gen = torch.Generator().manual_seed(SEED + 12)
    w = torch.randn(40, 64, generator=gen).to(torch.bfloat16)
    w[3, 5] = -w.abs().max() * 2                        # row 3's absmax is negative -> code -128
    sd, ref, _ = _ct_int8(w)
    low = sd["weight"] == -128
    assert bool(low.any())
    with pytest.raises(ValueError, match=r"-128.*int8_min='clip'"):
        int8_from_ct(sd["weight"], sd["weight_scale"])
    iw = int8_from_ct(sd["weight"], sd["weight_scale"], int8_min="clip")
    assert torch.equal(iw.qweight[~low], sd["weight"][~low]) and bool((iw.qweight[low] == -127).all())
    assert torch.equal(iw.dequantize(torch.bfloat16)[~low], ref[~low])
    step = sd["weight_scale"].float().expand(40, 64)
    exact = sd["weight"].float() * step                  # compressed-tensors' values before bf16 rounding
    assert torch.equal(iw.dequantize()[low] - exact[low], step[low])


def test_w8a8_imported_qlinear_forward():
    gen = torch.Generator().manual_seed(SEED + 13)
    n, k = 48, 96
    w = _no_min_code_weight(n, k, torch.float16, gen)
    sd, ref, _ = _ct_int8(w)
    iw = int8_from_ct(sd["weight"], sd["weight_scale"])
    bias = torch.randn(n, generator=gen).to(torch.float16)
    ql = QLinear.from_weight(iw, bias, act_bits=8, backend="reference", dtype=torch.float16)
    x = torch.randn(7, k, generator=gen).to(torch.float16)
    out = ql(x)
    # exact math of W8A8 on the same codes: per-token int8 activations x int8 weight, both scales
    xq, xs = per_token_quant_reference(x)
    exact = (xq.double() @ sd["weight"].double().t()) * xs.double().reshape(-1, 1) \
        * sd["weight_scale"].double().reshape(1, -1) + bias.double()
    assert_close_rel(out, exact, torch.float16)
    # and within activation-quantization error of the dense layer with compressed-tensors' weight
    assert rel_err(out, F.linear(x.double(), ref.double(), bias.double())) < 1e-2


# ------------------------------------------------------------------ model level
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 96)
        self.norm = nn.LayerNorm(96)
        self.down = nn.Linear(96, 64, bias=False)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(64, 32)

    def forward(self, x):
        for b in self.blocks:
            x = b.down(F.relu(b.norm(b.up(x))))
        return self.head(x)


def _tiny(dtype=torch.float16, seed=SEED):
    torch.manual_seed(seed)
    m = Tiny().to(dtype)
    with torch.no_grad():      # int8 test weights free of compressed-tensors' -128 code
        for mod in m.modules():
            if isinstance(mod, nn.Linear):
                mod.weight[:, 0] = mod.weight.abs().amax(dim=1) * 1.1 + 0.01
    return m


def _ct_checkpoint(model, qcfg, out_dir):
    """compressed-tensors' own path: apply the config, calibrate min-max qparams, compress, save."""
    apply_quantization_config(model, qcfg)
    for _, mod in match_named_modules(model, [t for s in qcfg.config_groups.values() for t in s.targets],
                                      qcfg.ignore):
        args = mod.quantization_scheme.weights
        w = mod.weight.data
        n, k = w.shape
        g = args.group_size if args.strategy == "group" else k
        wg = w.reshape(n, k // g, g)
        scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
        mod.weight_scale.data = scale.reshape(mod.weight_scale.shape)
        mod.weight_zero_point.data = zp.reshape(mod.weight_zero_point.shape)
    comp = ModelCompressor.from_pretrained_model(model)
    comp.compress_model(model)
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, "model.safetensors"))
    comp.update_config(out_dir)


def _ct_dequantized(sd, prefix, scheme):
    local = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    fmt = scheme.format
    comp = PackedQuantizationCompressor if fmt == "pack-quantized" else IntQuantizationCompressor
    return comp.decompress(local, scheme)["weight"]


@pytest.mark.parametrize("kind", ["w4a16_asym_g32", "w4a16_sym_channel", "w8a8"])
def test_load_ct_checkpoint(tmp_path, kind):
    from safetensors.torch import load_file

    if kind == "w8a8":
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**W8_ARGS),
                                    input_activations=QuantizationArgs(**A8_ARGS))
    else:
        gs, sym = (32, False) if kind == "w4a16_asym_g32" else (-1, True)
        scheme = QuantizationScheme(targets=["Linear"], weights=_w4_args(gs, sym))
    # ignore: the head by name and the second block's down projection by regex
    qcfg = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["head", r"re:.*1\.down$"])
    src = _tiny()
    dense_ref = _tiny()
    _ct_checkpoint(src, qcfg, str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["quantization_config"]["format"] == ("int-quantized" if kind == "w8a8" else "pack-quantized")

    model = load_compressed_tensors(str(tmp_path), _tiny(seed=99))
    quantized = {"blocks.0.up", "blocks.0.down", "blocks.1.up"}
    assert {n for n, m in model.named_modules() if isinstance(m, QLinear)} == quantized
    assert type(model.head) is nn.Linear and type(model.blocks[1].down) is nn.Linear
    assert torch.equal(model.head.weight, dense_ref.head.weight)
    assert torch.equal(model.blocks[1].down.weight, dense_ref.blocks[1].down.weight)
    assert torch.equal(model.blocks[0].norm.weight, dense_ref.blocks[0].norm.weight)
    sd = load_file(str(tmp_path / "model.safetensors"))
    ct_scheme = QuantizationConfig.model_validate(cfg["quantization_config"]).config_groups["group_0"]
    ct_scheme.format = ct_scheme.format or cfg["quantization_config"]["format"]
    for name in quantized:
        ql = model.get_submodule(name)
        ref = _ct_dequantized(sd, name, ct_scheme)
        wf = ql.weight_format()
        got = wf.dequantize(ref.dtype) if kind == "w8a8" else wf.dequantize()
        assert torch.equal(got, ref), name
        assert (ql.act_bits == 8) == (kind == "w8a8")
    if kind != "w8a8":
        # whole-model forward against the same model with compressed-tensors' dequantized weights (fp32 math)
        dense = _tiny().float()
        for name in quantized:
            dense.get_submodule(name).weight.data = _ct_dequantized(sd, name, ct_scheme).float()
        for name, mod in model.named_modules():
            if isinstance(mod, QLinear):
                mod.backend = "reference"
        x = torch.randn(4, 64)
        assert_close_rel(model(x.half()), dense(x), torch.float16, bound=1e-2)


def _sparsekit_model():
    torch.manual_seed(SEED + 5)
    m = _tiny()
    gen = torch.Generator().manual_seed(SEED + 6)
    calib = torch.randn(32, 96, generator=gen).half()
    m.blocks[0].up = QLinear.from_float(m.blocks[0].up, bits=4, group_size=32, symmetric=False)
    m.blocks[0].down = QLinear.from_float(m.blocks[0].down, bits=4, group_size=32, symmetric=True,
                                          method="gptq", calib_inputs=calib)
    m.blocks[1].up = QLinear.from_float(m.blocks[1].up, bits=8, act_bits=8)
    m.blocks[1].down = QLinear.from_float(m.blocks[1].down, bits=4, group_size=32, symmetric=False, act_bits=8)
    for mod in m.modules():
        if isinstance(mod, QLinear):
            mod.backend = "reference"
    return m   # head stays dense


def test_save_then_ct_decompress_and_round_trip(tmp_path):
    from safetensors.torch import load_file

    model = _sparsekit_model()
    path = save_compressed_tensors(model, tmp_path, config={"model_type": "tiny"})
    cfg = json.load(open(path))
    assert cfg["model_type"] == "tiny"
    qc = QuantizationConfig.model_validate(cfg["quantization_config"])   # compressed-tensors accepts the block
    assert qc.format == "mixed-precision" and qc.ignore == ["head"]
    # and so does transformers' loader config, as compressed-tensors builds its compressor from it
    transformers = pytest.importorskip("transformers")
    hf = transformers.CompressedTensorsConfig.from_dict(cfg["quantization_config"])
    assert ModelCompressor.from_compression_config(hf).quantization_config.config_groups.keys() == \
        qc.config_groups.keys()
    # compressed-tensors' matcher resolves the targets to exactly the QLinear layers
    skeleton = _tiny()
    targets = [t for s in qc.config_groups.values() for t in s.targets]
    matched = {n for n, _ in match_named_modules(skeleton, targets, qc.ignore)}
    assert matched == {n for n, m in model.named_modules() if isinstance(m, QLinear)}
    sd = load_file(str(tmp_path / "model.safetensors"))
    for scheme in qc.config_groups.values():
        for name in scheme.targets:
            ql = model.get_submodule(name)
            ref = _ct_dequantized(sd, name, scheme)
            assert torch.equal(ref, ql.weight_format().dequantize()), name
            assert (scheme.input_activations is not None) == (ql.act_bits == 8)
    # back into sparsekit: same modules, same outputs bit for bit
    loaded = load_compressed_tensors(tmp_path, _tiny(seed=7), backend="reference")
    x = torch.randn(5, 64).half()
    assert torch.equal(loaded(x), model(x))
    for name, mod in model.named_modules():
        if isinstance(mod, QLinear):
            other = loaded.get_submodule(name)
            assert (other.bits, other.act_bits, other.group_size, other.symmetric) == \
                (mod.bits, mod.act_bits, mod.group_size, mod.symmetric)


def test_meta_skeleton_and_state_dict_source(tmp_path):
    model = _sparsekit_model()
    save_compressed_tensors(model, tmp_path)
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "model.safetensors"))
    cfg = json.load(open(tmp_path / "config.json"))
    with torch.device("meta"):
        skel = Tiny().half()
    loaded = load_compressed_tensors((sd, cfg["quantization_config"]), skel, backend="reference")
    x = torch.randn(3, 64).half()
    assert torch.equal(loaded(x), model(x))


def test_preset_config_group(tmp_path):
    q = QLinear.from_float(nn.Linear(128, 16).half(), bits=4, group_size=128, symmetric=True)
    model = nn.Sequential(nn.Linear(64, 128).half(), nn.ReLU(), q)
    save_compressed_tensors(model, tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    # the preset "W4A16" (symmetric int4, group 128) targeting layer 2 by regex, layer 0 ignored
    cfg["quantization_config"]["config_groups"] = {"W4A16": ["re:^2$"]}
    cfg["quantization_config"]["ignore"] = ["0"]
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    loaded = load_compressed_tensors(tmp_path, nn.Sequential(nn.Linear(64, 128), nn.ReLU(),
                                                             nn.Linear(128, 16)).half())
    assert isinstance(loaded[2], QLinear) and type(loaded[0]) is nn.Linear
    assert torch.equal(loaded[2].weight_format().dequantize(), q.weight_format().dequantize())


@pytest.mark.parametrize("class_target", ["Linear", "re:.*"])
def test_target_precedence_and_ignore(tmp_path, class_target):
    """compressed-tensors' rules: ``ignore`` wins, an exact name beats a regex or class target, and matched
    modules that are not Linear (ReLU under ``re:.*``) are left alone."""
    def mlp():
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 8)).half()

    model = mlp()
    model[0] = QLinear.from_float(model[0], bits=4, group_size=32)
    model[2] = QLinear.from_float(model[2], bits=8, act_bits=8)
    save_compressed_tensors(model, tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    q = cfg["quantization_config"]
    g4, g8 = (next(g for g in q["config_groups"].values() if g["format"] == f) for f in
              ("pack-quantized", "int-quantized"))
    g4["targets"], g8["targets"] = [class_target], ["2"]
    q["config_groups"], q["ignore"] = {"a": g4, "b": g8}, ["re:^3$"]
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    loaded = load_compressed_tensors(tmp_path, mlp())
    assert (loaded[0].bits, loaded[2].bits) == (4, 8) and type(loaded[3]) is nn.Linear
    x = torch.randn(3, 64).half()
    assert torch.equal(loaded(x), model(x))
    emb = nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 32).half())
    q["config_groups"] = {"a": dict(g4, targets=["re:.*"])}
    q["ignore"] = []
    with pytest.raises(ValueError, match="layer '0' .Embedding"):
        load_compressed_tensors((dict(), q), emb)


# ------------------------------------------------------------------ bad input
def _int4_tensors(gs=32, sym=False, n=16, k=64):
    iw = Int4Weight.from_float(torch.randn(n, k), group_size=gs, symmetric=sym)
    return int4_to_ct(iw)


def test_layer_level_errors():
    t = _int4_tensors()
    kw = dict(weight_shape=t["weight_shape"], symmetric=False)
    args = (t["weight_packed"], t["weight_scale"], t["weight_zero_point"])
    with pytest.raises(ValueError, match="group_size=16"):
        int4_from_ct(*args, group_size=16, **kw)
    with pytest.raises(ValueError, match="weight_packed must have shape"):
        int4_from_ct(t["weight_packed"][:, :-1], t["weight_scale"], t["weight_zero_point"], group_size=32, **kw)
    with pytest.raises(ValueError, match="weight_scale must have shape"):
        int4_from_ct(t["weight_packed"], t["weight_scale"][:, :1], t["weight_zero_point"], group_size=32, **kw)
    with pytest.raises(ValueError, match="weight_scale is torch.float32"):
        int4_from_ct(t["weight_packed"], t["weight_scale"].float(), t["weight_zero_point"], group_size=32, **kw)
    with pytest.raises(ValueError, match="needs weight_zero_point"):
        int4_from_ct(t["weight_packed"], t["weight_scale"], None, group_size=32, **kw)
    with pytest.raises(ValueError, match="symmetric scheme"):
        int4_from_ct(*args, group_size=32, weight_shape=t["weight_shape"], symmetric=True)
    with pytest.raises(ValueError, match="weight_g_idx"):
        int4_from_ct(*args, group_size=32, weight_g_idx=torch.arange(64).flip(0) // 32, **kw)
    ok = int4_from_ct(*args, group_size=32, weight_g_idx=torch.arange(64) // 32, **kw)   # trivial g_idx
    assert ok.group_size == 32
    with pytest.raises(ValueError, match="weight_shape in_features=60"):
        int4_from_ct(torch.zeros(16, 8, dtype=torch.int32), torch.ones(16, 1).half(), None, weight_shape=[16, 60],
                     group_size=-1, symmetric=True)
    with pytest.raises(TypeError, match="weight_packed must be torch.int32"):
        int4_from_ct(t["weight_packed"].to(torch.int64), t["weight_scale"], t["weight_zero_point"], group_size=32,
                     **kw)
    with pytest.raises(ValueError, match=r"weight_scale must have shape \(4, 1\)"):
        int8_from_ct(torch.zeros(4, 8, dtype=torch.int8), torch.ones(3, 1))
    with pytest.raises(TypeError, match="weight must be torch.int8"):
        int8_from_ct(torch.zeros(4, 8, dtype=torch.int32), torch.ones(4, 1))
    with pytest.raises(TypeError, match="Int4Weight"):
        int4_to_ct(torch.zeros(3))


def _cfg_with(tmp_path, mutate):
    model = nn.Sequential(nn.Linear(64, 32).half())
    model[0] = QLinear.from_float(model[0], bits=4, group_size=32)
    save_compressed_tensors(model, tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    mutate(cfg["quantization_config"])
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    return str(tmp_path)


@pytest.mark.parametrize("mutate,match", [
    (lambda q: q["config_groups"]["group_0"]["weights"].update(actorder="group"), "actorder"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=16), "group_size is 16"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="tensor", group_size=None),
     "strategy is 'tensor'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=8), "num_bits is 8"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(type="float"), "weights.type"),
    (lambda q: q["config_groups"]["group_0"].update(format="nvfp4-pack-quantized"), "format is 'nvfp4-pack-quantized'"),
    (lambda q: q.update(quantization_status="frozen"), "quantization_status"),
    (lambda q: q["config_groups"]["group_0"].update(
        input_activations=dict(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False)),
     "input_activations"),
    (lambda q: q["config_groups"]["group_0"].update(targets=["re:nothing"]), "no nn.Linear layer"),
])
def test_config_errors(tmp_path, mutate, match):
    d = _cfg_with(tmp_path, mutate)
    skel = nn.Sequential(nn.Linear(64, 32).half())
    with pytest.raises(ValueError, match=match):
        load_compressed_tensors(d, skel)
    assert type(skel[0]) is nn.Linear          # untouched


def test_symmetric_zero_point_tensor(tmp_path):
    """An all-zero unpacked zero point next to a symmetric scheme (kept by some writers) is accepted; any
    other is rejected by name."""
    model = nn.Sequential(QLinear.from_float(nn.Linear(64, 32).half(), bits=8, act_bits=8))
    save_compressed_tensors(model, tmp_path)
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "model.safetensors"))
    cfg = json.load(open(tmp_path / "config.json"))
    sd["0.weight_zero_point"] = torch.zeros(32, 1, dtype=torch.int8)
    loaded = load_compressed_tensors((sd, cfg), nn.Sequential(nn.Linear(64, 32).half()))
    assert torch.equal(loaded[0].qweight, model[0].qweight)
    sd["0.weight_zero_point"][3] = 1
    with pytest.raises(ValueError, match="layer '0'.*weight_zero_point"):
        load_compressed_tensors((sd, cfg), nn.Sequential(nn.Linear(64, 32).half()))


def test_checkpoint_mismatch_errors(tmp_path):
    d = _cfg_with(tmp_path, lambda q: None)
    with pytest.raises(ValueError, match="layer '0'.*skeleton"):
        load_compressed_tensors(d, nn.Sequential(nn.Linear(64, 48).half()))
    with pytest.raises(ValueError, match="no place in the model|lacks"):
        load_compressed_tensors(d, nn.Sequential(nn.Linear(64, 32).half(), nn.Linear(32, 8).half()))
    with pytest.raises(ValueError, match="not a directory"):
        load_compressed_tensors(str(tmp_path / "nope"), nn.Sequential(nn.Linear(64, 32)))


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    import sys

    from sparsekit.interop import compressed_tensors as interop_ct

    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    with pytest.raises(ImportError, match=r"sparsekit\[interop\]"):
        interop_ct._require_ct()
    d = _cfg_with(tmp_path, lambda q: q.update(config_groups={"W4A16": ["Linear"]}))
    with pytest.raises(ImportError, match=r"sparsekit\[interop\]"):
        load_compressed_tensors(d, nn.Sequential(nn.Linear(64, 32).half()))


def test_save_errors(tmp_path):
    from sparsekit.nn import SparseLinear

    lin = nn.Linear(64, 32).half()
    m = nn.Sequential(QLinear.from_float(lin, bits=4, group_size=32), SparseLinear.from_dense(nn.Linear(32, 16)))
    with pytest.raises(ValueError, match="layer '1' is a SparseLinear"):
        save_compressed_tensors(m, tmp_path)
    m = nn.Sequential(QLinear.from_float(lin, bits=4, group_size=32, act_bits="mixed"))
    with pytest.raises(ValueError, match="layer '0'.*act_bits='mixed'"):
        save_compressed_tensors(m, tmp_path)
    with pytest.raises(ValueError, match="no QLinear"):
        save_compressed_tensors(nn.Sequential(lin), tmp_path)
