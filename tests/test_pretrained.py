"""save_pretrained / load_pretrained: self-describing checkpoints rebuilt inside a dense (or meta) skeleton without
calibration, for every scheme of the registry; per-layer overrides; clear, all-or-nothing errors."""
import json
import os

import pytest
import torch
from torch import nn

pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import sparsekit  # noqa: E402
from sparsekit.compress import compress  # noqa: E402
from sparsekit.pretrained import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME  # noqa: E402
from sparsekit.schemes import describe_model, registry  # noqa: E402

SCHEMES = registry.names()
HALF = {"w8a8", "w4a8", "mixed", "int4"}        # QLinear: float16/bfloat16 compute


def _dtype(scheme):
    return torch.float16 if scheme in HALF else torch.float32


def _data_free(scheme):
    return registry.get(scheme).config_cls.DEFAULT_METHOD


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48, bias=False), nn.LayerNorm(48),
                         nn.Linear(48, 32)).to(dtype)


def _meta_mlp(dtype):
    with torch.device("meta"):
        return _mlp(dtype)


def _snapshot(model):
    return ({n: m for n, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict().items() if v.device.type != "meta"})


def _assert_unchanged(model, snap):
    mods, sd = snap
    assert {n: m for n, m in model.named_modules()}.keys() == mods.keys()
    for n, m in model.named_modules():
        assert mods[n] is m, n
    cur = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(cur[k], v), k


def _saved_mlp(tmp_path, scheme="2:4", report=True):
    dtype = _dtype(scheme)
    model, rep = compress(_mlp(dtype), None, scheme, _data_free(scheme), speed="off")
    out = tmp_path / "ckpt"
    sparsekit.save_pretrained(model, out, rep if report else None)
    return model, out, dtype


def _rewrite(out, edit_config=None, edit_tensors=None):
    """Rewrite a checkpoint consistently (config, header and tensors)."""
    cpath, wpath = os.path.join(out, CONFIG_NAME), os.path.join(out, WEIGHTS_NAME)
    with open(cpath) as f:
        config = json.load(f)
    with safe_open(wpath, framework="pt") as f:
        meta = f.metadata()
    sd = load_file(wpath)
    if edit_config:
        edit_config(config)
    if edit_tensors:
        edit_tensors(sd)
    meta["sparsekit_layers"] = json.dumps(config["layers"], sort_keys=True)
    save_file(sd, wpath, metadata=meta)
    with open(cpath, "w") as f:
        json.dump(config, f)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("scheme", SCHEMES)
def test_mlp_round_trip_every_scheme(tmp_path, scheme):
    model, out, dtype = _saved_mlp(tmp_path, scheme)
    with open(out / CONFIG_NAME) as f:
        config = json.load(f)
    assert config["format"] == "sparsekit" and config["format_version"] == FORMAT_VERSION
    assert config["weights"] == WEIGHTS_NAME and config["num_layers"] == 3
    assert config["layers"] == json.loads(json.dumps(describe_model(model)))
    assert sorted(config["layers"]) == ["0", "2", "4"]
    for desc in config["layers"].values():
        assert desc["scheme"] == scheme and desc["format_version"] == registry.get(scheme).format_version
        assert desc["params"]["in_features"] in (64, 48) and "dtype" in desc["params"]
    assert config["report"]["scheme"] == scheme and config["report"]["num_layers"] == 3
    with safe_open(str(out / WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata()
    assert meta["sparsekit_format"] == "sparsekit" and meta["sparsekit_format_version"] == str(FORMAT_VERSION)
    assert json.loads(meta["sparsekit_layers"]) == config["layers"]

    x = torch.randn(7, 64).to(dtype)
    with torch.no_grad():
        ref = model(x)
    for skeleton in (_mlp(dtype, seed=1), _meta_mlp(dtype)):
        loaded = sparsekit.load_pretrained(out, skeleton)
        assert loaded is skeleton and not loaded.training
        assert [type(m) for m in loaded] == [type(m) for m in model]
        assert all(t.device.type == "cpu" for t in list(loaded.parameters()) + list(loaded.buffers()))
        assert describe_model(loaded) == config["layers"]
        with torch.no_grad():
            assert torch.equal(loaded(x), ref)


def test_no_calibration_or_compression_on_load(tmp_path, monkeypatch):
    model, out, dtype = _saved_mlp(tmp_path, "int4")
    for s in registry:
        for name in ("calibrate", "build", "convert"):
            monkeypatch.setattr(type(s), name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("compressed")))
    loaded = sparsekit.load_pretrained(out, _meta_mlp(dtype))
    x = torch.randn(3, 64).to(dtype)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_per_layer_overrides_round_trip(tmp_path):
    model, _ = compress(_mlp(torch.float16), None, "int4", "rtn", speed="off",
                        overrides={"2": {"scheme": "2:4+int4", "method": "magnitude"}, "4": "w8a8"})
    sparsekit.save_pretrained(model, tmp_path)
    with open(tmp_path / CONFIG_NAME) as f:
        layers = json.load(f)["layers"]
    assert {k: v["scheme"] for k, v in layers.items()} == {"0": "int4", "2": "2:4+int4", "4": "w8a8"}
    x = torch.randn(5, 64, dtype=torch.float16)
    for skeleton in (_mlp(torch.float16, 3), _meta_mlp(torch.float16)):
        loaded = sparsekit.load_pretrained(tmp_path, skeleton)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


def test_skipped_layers_and_shared_modules(tmp_path):
    lin = nn.Linear(32, 32)
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(32, 8))
    compress(model, None, "2:4", "magnitude", speed="off", overrides={"3": None})
    sparsekit.save_pretrained(model, tmp_path)
    with open(tmp_path / CONFIG_NAME) as f:
        assert json.load(f)["layers"]["2"] == {"same_as": "0"}
    with torch.device("meta"):
        shared = nn.Linear(32, 32)
        skeleton = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(32, 8))
    sparsekit.load_pretrained(tmp_path, skeleton)
    assert skeleton[0] is skeleton[2] and type(skeleton[3]) is nn.Linear
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(skeleton(x), model(x))


def test_tied_weights_stay_tied_on_a_meta_skeleton(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(16, 32)
            self.mid = nn.Linear(32, 32)
            self.head = nn.Linear(32, 16, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.mid(self.emb(ids)))

    torch.manual_seed(0)
    model = Tied()
    compress(model, None, "2:4", "magnitude", speed="off", layers=["mid"])
    sparsekit.save_pretrained(model, tmp_path)
    with torch.device("meta"):
        skeleton = Tied()
    sparsekit.load_pretrained(tmp_path, skeleton)
    assert skeleton.head.weight is skeleton.emb.weight
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        assert torch.equal(skeleton(ids), model(ids))


# ----------------------------------------------------------------------------- transformers
def _llama_config():
    transformers = pytest.importorskip("transformers")
    return transformers, transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)


def _llama(cfg, dtype, seed=0):
    transformers, config = cfg
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_llama_round_trip_every_scheme(tmp_path, scheme):
    cfg = _llama_config()
    dtype = _dtype(scheme)
    model, report = compress(_llama(cfg, dtype), None, scheme, _data_free(scheme), speed="off")
    sparsekit.save_pretrained(model, tmp_path, report)
    with open(tmp_path / CONFIG_NAME) as f:
        layers = json.load(f)["layers"]
    assert len(layers) == 2 * 7 + 1 and "lm_head" in layers     # q k v o gate up down per block, and the head
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits
    with torch.device("meta"):
        meta_skeleton = _llama(cfg, dtype, seed=1)
    for skeleton in (_llama(cfg, dtype, seed=1), meta_skeleton):
        sparsekit.load_pretrained(tmp_path, skeleton)
        assert type(skeleton.model.layers[1].self_attn.q_proj) is type(model.model.layers[1].self_attn.q_proj)
        with torch.no_grad():
            assert torch.equal(skeleton(ids).logits, ref)


# ----------------------------------------------------------------------------- errors
def test_unknown_format_versions(tmp_path):
    _, out, dtype = _saved_mlp(tmp_path)
    _rewrite(out, lambda c: c.update(format_version=FORMAT_VERSION + 1))
    skeleton = _mlp(dtype)
    snap = _snapshot(skeleton)
    with pytest.raises(ValueError, match=r"unknown format_version 2"):
        sparsekit.load_pretrained(out, skeleton)
    _assert_unchanged(skeleton, snap)

    _rewrite(out, lambda c: c.update(format_version=FORMAT_VERSION))
    _rewrite(out, lambda c: c["layers"]["2"].update(format_version=99))
    with pytest.raises(ValueError, match=r"layer '2' \(2:4\): .*format version 99 is newer"):
        sparsekit.load_pretrained(out, skeleton)
    _assert_unchanged(skeleton, snap)

    _rewrite(out, lambda c: c["layers"]["2"].update(format_version=1, scheme="3:8"))
    with pytest.raises(ValueError, match=r"layer '2' uses the unknown scheme '3:8'"):
        sparsekit.load_pretrained(out, skeleton)
    _assert_unchanged(skeleton, snap)


def test_missing_and_extra_layers(tmp_path):
    _, out, dtype = _saved_mlp(tmp_path)
    # the skeleton lacks a layer of the checkpoint
    short = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48, bias=False), nn.LayerNorm(48))
    snap = _snapshot(short)
    with pytest.raises(ValueError, match=r"layer '4' of the checkpoint is not in the model"):
        sparsekit.load_pretrained(out, short)
    _assert_unchanged(short, snap)
    # a described layer without tensors in the file
    _rewrite(out, edit_tensors=lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("2.")])
    skeleton = _mlp(dtype)
    snap = _snapshot(skeleton)
    with pytest.raises(ValueError, match=r"layer '2' is described in sparsekit_config.json but .* no tensors"):
        sparsekit.load_pretrained(out, skeleton)
    _assert_unchanged(skeleton, snap)
    # compressed tensors of a layer the config does not describe
    _, out, dtype = _saved_mlp(tmp_path / "b")
    _rewrite(out, lambda c: c["layers"].pop("4"))
    with pytest.raises(ValueError, match=r"layer '4' has compressed tensors .* does not describe it"):
        sparsekit.load_pretrained(out, skeleton)
    _assert_unchanged(skeleton, snap)


def test_mismatched_skeletons(tmp_path):
    _, out, dtype = _saved_mlp(tmp_path)
    wrong = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 40, bias=False), nn.LayerNorm(40),
                          nn.Linear(40, 32))
    snap = _snapshot(wrong)
    with pytest.raises(ValueError, match=r"layer '2' does not match the skeleton: .*out_features=48.*"
                                         r"out_features=40"):
        sparsekit.load_pretrained(out, wrong)
    _assert_unchanged(wrong, snap)
    biased = _mlp(dtype)
    biased[2] = nn.Linear(64, 48, bias=True)
    with pytest.raises(ValueError, match=r"layer '2' does not match the skeleton: .*bias=False.*bias=True"):
        sparsekit.load_pretrained(out, biased)
    not_linear = _mlp(dtype)
    not_linear[4] = nn.Identity()
    with pytest.raises(ValueError, match=r"layer '4' is a Identity in the model"):
        sparsekit.load_pretrained(out, not_linear)
    # a dense tensor of another shape or dtype than the skeleton's
    norm = _mlp(dtype)
    norm[3] = nn.LayerNorm(48, elementwise_affine=True, bias=False)
    snap = _snapshot(norm)
    with pytest.raises(ValueError, match=r"unexpected tensors '3.bias'"):
        sparsekit.load_pretrained(out, norm)
    _assert_unchanged(norm, snap)
    half = _mlp(torch.float16)
    snap = _snapshot(half)
    with pytest.raises(ValueError, match=r"'3.weight' is torch.float32 in .* the skeleton's is torch.float16"):
        sparsekit.load_pretrained(out, half)
    _assert_unchanged(half, snap)
    _rewrite(out, edit_tensors=lambda sd: sd.update({"3.weight": torch.ones(50)}))
    with pytest.raises(ValueError, match=r"'3.weight' has shape \(50,\) in .* expects \(48,\)"):
        sparsekit.load_pretrained(out, _mlp(dtype))


def test_invalid_packed_contents_change_nothing(tmp_path):
    _, out, dtype = _saved_mlp(tmp_path, "int4")
    _rewrite(out, edit_tensors=lambda sd: sd.update({"4.qweight": torch.zeros(32, 5, dtype=torch.int32)}))
    skeleton = _meta_mlp(dtype)
    names = {n: m for n, m in skeleton.named_modules()}
    with pytest.raises(ValueError, match=r"layer '4' \(int4\): .* does not fit its QLinear"):
        sparsekit.load_pretrained(out, skeleton)
    assert {n: m for n, m in skeleton.named_modules()} == names
    assert all(p.device.type == "meta" for p in skeleton.parameters())


def test_inconsistent_files_and_paths(tmp_path):
    _, out, dtype = _saved_mlp(tmp_path)
    with open(out / CONFIG_NAME) as f:
        config = json.load(f)
    config["layers"].pop("0")
    with open(out / CONFIG_NAME, "w") as f:     # the header still describes layer '0'
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"describe different layers \(e.g. '0'\)"):
        sparsekit.load_pretrained(out, _mlp(dtype))
    config["weights"] = "../elsewhere.safetensors"
    with open(out / CONFIG_NAME, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="'weights' must be a file name in the directory"):
        sparsekit.load_pretrained(out, _mlp(dtype))
    (out / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        sparsekit.load_pretrained(out, _mlp(dtype))
    os.remove(out / CONFIG_NAME)
    with pytest.raises(FileNotFoundError, match="no sparsekit_config.json"):
        sparsekit.load_pretrained(out, _mlp(dtype))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        sparsekit.load_pretrained(tmp_path / "nothing", _mlp(dtype))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        sparsekit.save_pretrained(_mlp(), tmp_path / "file")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sparsekit.load_pretrained(out, "model")


def test_fresh_process_loads_without_compressing(tmp_path):
    """Another Python process, with every scheme's calibration and building disabled, loads the checkpoint into
    a meta skeleton and computes the saved model's outputs exactly."""
    import subprocess
    import sys
    import textwrap

    model, out, dtype = _saved_mlp(tmp_path, "2:4+int4")
    x = torch.randn(6, 64).to(dtype)
    # a CPU matmul's rounding depends on how its threads split the work: one thread on both sides
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ref = model(x)
    finally:
        torch.set_num_threads(threads)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    code = textwrap.dedent(f"""
        import torch
        from torch import nn
        from safetensors.torch import load_file, save_file
        import sparsekit
        from sparsekit.schemes import registry

        torch.set_num_threads(1)

        def fail(*a, **k):
            raise AssertionError("compression ran")
        for s in registry:
            for name in ("calibrate", "build", "convert"):
                setattr(type(s), name, fail)
        with torch.device("meta"):
            skeleton = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48, bias=False),
                                     nn.LayerNorm(48), nn.Linear(48, 32)).to({dtype})
        sparsekit.load_pretrained({str(out)!r}, skeleton)
        x = load_file({str(tmp_path / "x.safetensors")!r})["x"]
        with torch.no_grad():
            save_file({{"y": skeleton(x)}}, {str(tmp_path / "y.safetensors")!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert torch.equal(load_file(str(tmp_path / "y.safetensors"))["y"], ref)


@pytest.mark.parametrize("scheme", ["2:4", "2:4+int4"])
def test_checkpoint_with_the_old_meta_key_loads(tmp_path, scheme):
    """Checkpoints written when the 2:4 metadata buffer was named ``meta`` load into ``meta_codes``."""
    model, out, dtype = _saved_mlp(tmp_path, scheme)

    def to_old(sd):
        for k in [k for k in sd if k.endswith(".meta_codes")]:
            sd[k[:-len("meta_codes")] + "meta"] = sd.pop(k)

    _rewrite(out, edit_tensors=to_old)
    assert any(k.endswith(".meta") for k in load_file(str(out / WEIGHTS_NAME)))
    x = torch.randn(7, 64).to(dtype)
    with torch.no_grad():
        ref = model(x)
    for skeleton in (_mlp(dtype, seed=1), _meta_mlp(dtype)):
        loaded = sparsekit.load_pretrained(out, skeleton)
        with torch.no_grad():
            assert torch.equal(loaded(x), ref)
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
