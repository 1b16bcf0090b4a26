"""`sparsekit compress --model DIR` and `sparsekit info DIR` (CPU, offline): a tiny Llama built from a config with
random weights and a word-level tokenizer trained on a few sentences, both saved to a directory; the command
compresses it end to end, and what it writes reloads through transformers (quant_method "sparsekit") or
compressed-tensors into a model whose logits equal the compressed model's bit for bit.  The report's quality line
is recomputed from the reloaded model on the same held-out rows."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast  # noqa: E402

import sparsekit.integrations.transformers  # noqa: E402,F401  (registers quant_method "sparsekit")
from sparsekit import cli, cli_model, workloads  # noqa: E402
from sparsekit.calibration.text import load_token_rows, split_holdout  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

SEQ = 16


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(workloads.SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama with its tokenizer: (directory, vocabulary size)."""
    d = tmp_path_factory.mktemp("llama")
    tok = _tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=64,
                         architectures=["LlamaForCausalLM"])
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d), len(tok)


@pytest.fixture(scope="module")
def calib_files(tmp_path_factory, llama_dir):
    d = tmp_path_factory.mktemp("calib")
    text = d / "calib.txt"
    text.write_text("\n".join(workloads.SENTENCES))
    jsonl = d / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": s}) for s in workloads.SENTENCES))
    ids = torch.randint(0, llama_dir[1], (10, 24), generator=torch.Generator().manual_seed(3))
    pt = d / "ids.pt"
    torch.save(ids, pt)
    st = d / "ids.safetensors"
    save_file({"input_ids": ids}, str(st))
    return {"txt": str(text), "jsonl": str(jsonl), "pt": str(pt), "safetensors": str(st), "ids": ids}


@pytest.fixture
def captured(monkeypatch):
    """The models `compress` returned during the test (the CLI writes them; the test compares with them)."""
    import sparsekit.compress as comp

    seen = []
    real = comp.compress

    def spy(*a, **kw):
        model, report = real(*a, **kw)
        seen.append(model)
        return model, report

    monkeypatch.setattr(comp, "compress", spy)
    return seen


def _run(capsys, argv):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return json.loads(cap.out), cap.err


def _user_error(capsys, argv, match):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsekit ") and "error:" in lines[0], err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]
    return lines[0]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _info(capsys, path):
    rc = cli.main(["info", path, "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return json.loads(cap.out)


IDS = torch.randint(0, 50, (2, 13), generator=torch.Generator().manual_seed(11))


# ----------------------------------------------------------------------------- --format sparsekit
@pytest.mark.parametrize("scheme,method,calib,module", [
    ("2:4", "sparsegpt", "txt", "SparseLinear"),
    ("2:4", "magnitude", "safetensors", "SparseLinear"),
    ("int4", "gptq", "pt", "QLinear"),
    ("w8a8", "rtn", "jsonl", "QLinear"),
])
def test_compress_model_sparsekit_format_reloads_exactly(capsys, tmp_path, llama_dir, calib_files, captured,
                                                         scheme, method, calib, module):
    model_dir, vocab = llama_dir
    out = str(tmp_path / "out")
    argv = ["compress", "--model", model_dir, "--calib", calib_files[calib], "--calib-size", "8",
            "--scheme", scheme, "--method", method, "--out", out]
    if calib != "txt":
        argv += ["--seq-len", str(SEQ)]
    if calib == "safetensors":
        argv += ["--device", "cpu"]
    report, err = _run(capsys, argv)
    compressed = captured[-1]
    # the report: what was compressed, on what, and the quality line
    assert report["scheme"] == scheme and report["method"] == method and report["format"] == "sparsekit"
    assert report["device"] == "cpu"
    assert report["calib_size"] + report["eval_size"] == 8 and report["eval_size"] == 1
    assert report["seq_len"] == SEQ if calib != "txt" else report["seq_len"] == 64   # min(128, max positions)
    assert report["metric"].startswith("perplexity") and report["architecture"] == "LlamaForCausalLM"
    assert report["num_layers"] == 14 and "lm_head" not in json.dumps(report.get("layer_schemes", {}))
    assert 1.0 < report["quality_dense"] < 10 * vocab and 1.0 < report["quality"] < 10 * vocab
    assert err.startswith(f"sparsekit compress: {model_dir} {scheme}/{method}: 14 layers in ")
    for f in ("config.json", "model.safetensors", "report.json", "tokenizer.json", "tokenizer_config.json"):
        assert f in report["files"] and os.path.isfile(os.path.join(out, f)), f
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["quality"] == report["quality"]
    # the directory reloads through transformers into the same model
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded.model.layers[1].mlp.down_proj).__name__ == module
    assert type(loaded.lm_head) is torch.nn.Linear
    ids = IDS % vocab
    assert torch.equal(_logits(loaded, ids), _logits(compressed, ids))
    # the quality line, recomputed from the reloaded model (and the dense source) on the same held-out rows
    tok = AutoTokenizer.from_pretrained(out)          # the copied tokenizer loads
    rows = load_token_rows(calib_files[calib], seq_len=report["seq_len"], tokenizer=tok, rows=8)
    _, held = split_holdout(rows)
    assert cli_model.perplexity(loaded, held) == pytest.approx(report["quality"], rel=1e-9)
    dense = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert cli_model.perplexity(dense, held) == pytest.approx(report["quality_dense"], rel=1e-9)
    # sparsekit info DIR
    info = _info(capsys, out)
    assert info["format"].startswith("sparsekit (transformers") and info["format_version"] == 1
    assert info["layers"] == {scheme: 14} and info["num_layers"] == 14
    assert info["report"]["quality"] == report["quality"] and info["weights"] == ["model.safetensors"]
    assert info["weights_bytes"] == os.path.getsize(os.path.join(out, "model.safetensors"))
    assert cli.main(["info", out]) == 0
    text = capsys.readouterr().out
    assert f"14: 14 {scheme}" in text and "quality" in text and "perplexity" in text


def test_force_overwrites_and_refuses_without_it(capsys, tmp_path, llama_dir, calib_files, captured):
    out = str(tmp_path / "out")
    argv = ["compress", "--model", llama_dir[0], "--calib", calib_files["pt"], "--calib-size", "4",
            "--scheme", "2:4", "--method", "magnitude", "--out", out, "--quiet"]
    _run(capsys, argv)
    _user_error(capsys, argv, "already holds config.json and model.safetensors")
    report, err = _run(capsys, argv + ["--force"])
    assert err == "" and "report.json" in report["files"]


# ----------------------------------------------------------------------------- --format compressed-tensors
def test_compress_model_compressed_tensors_int4_loads_into_a_fresh_skeleton(capsys, tmp_path, llama_dir,
                                                                            calib_files, captured):
    from sparsekit.interop.compressed_tensors import load_compressed_tensors

    model_dir, vocab = llama_dir
    out = str(tmp_path / "ct")
    report, _ = _run(capsys, ["compress", "--model", model_dir, "--calib", calib_files["pt"], "--calib-size", "6",
                              "--seq-len", str(SEQ), "--scheme", "int4", "--method", "rtn", "--group-size", "32",
                              "--format", "compressed-tensors", "--out", out, "--quiet"])
    assert report["format"] == "compressed-tensors" and report["eval_size"] == 1 and report["calib_size"] == 5
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["lm_head"]
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    skeleton = AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(model_dir)).eval()
    loaded = load_compressed_tensors(out, skeleton)
    ids = IDS % vocab
    assert torch.equal(_logits(loaded, ids), _logits(captured[-1], ids))
    info = _info(capsys, out)
    assert info["format"] == "compressed-tensors (pack-quantized)"
    assert info["layers"] == {"W4A16 group 32 asymmetric": 14} and info["dense_linear_layers"] == 1
    assert info["report"]["quality"] == report["quality"]


def test_compressed_tensors_rejects_other_schemes_before_any_work(capsys, tmp_path, llama_dir, calib_files,
                                                                  monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli_model, "load_model", refuse)
    base = ["compress", "--model", llama_dir[0], "--calib", calib_files["pt"], "--format", "compressed-tensors"]
    out = tmp_path / "never"
    _user_error(capsys, base + ["--scheme", "2:4", "--out", str(out)],
                "--format compressed-tensors holds int4, w4a8 and w8a8 layers only, not --scheme 2:4")
    _user_error(capsys, base + ["--scheme", "int4", "--override", "re:mlp", "block"],
                "not the override scheme block")
    _user_error(capsys, base + ["--scheme", "int4", "--method", "awq"], "cannot hold --method awq")
    assert not out.exists()


# ----------------------------------------------------------------------------- user errors
def test_model_user_errors(capsys, tmp_path, llama_dir, calib_files, monkeypatch):
    model_dir = llama_dir[0]
    # a directory without a tokenizer and a text calibration file: one line, before loading the model
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        os.link(os.path.join(model_dir, f), bare / f)
    real_load = cli_model.load_model

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli_model, "load_model", refuse)
    line = _user_error(capsys, ["compress", "--model", str(bare), "--calib", calib_files["txt"]], "has no tokenizer")
    assert "give a tokenized --calib file" in line
    _user_error(capsys, ["compress", "--model", model_dir, "--workload", "digits"],
                "argument --workload: not allowed with argument --model")
    _user_error(capsys, ["compress", "--scheme", "2:4"], "the following arguments are required: --workload or --model")
    _user_error(capsys, ["compress", "--model", model_dir], "--model needs --calib FILE")
    _user_error(capsys, ["compress", "--workload", "digits", "--calib", calib_files["pt"]],
                "--calib applies to --model only")
    _user_error(capsys, ["compress", "--model", str(tmp_path / "nope"), "--calib", calib_files["pt"]],
                "does not exist")
    _user_error(capsys, ["compress", "--model", model_dir, "--calib", str(tmp_path / "x.csv")], "unknown suffix")
    _user_error(capsys, ["compress", "--model", model_dir, "--calib", calib_files["pt"], "--calib-size", "1"],
                "--calib-size must be at least 2")
    _user_error(capsys, ["compress", "--workload", "digits", "--device", "cpu"], "--device applies to --model only")
    _user_error(capsys, ["compress", "--model", model_dir, "--calib", calib_files["pt"], "--device", "meta"],
                "--device must be cpu or a cuda device")
    _user_error(capsys, ["compress", "--model", model_dir, "--calib", calib_files["pt"], "--device", "gpu0"],
                "--device 'gpu0' is not a device")
    if not torch.cuda.is_available():
        _user_error(capsys, ["compress", "--model", model_dir, "--calib", calib_files["pt"], "--device", "cuda"],
                    "--device cuda: CUDA is not available here")
    # errors found once the model is loaded (before calibration)
    monkeypatch.setattr(cli_model, "load_model", real_load)
    _user_error(capsys, ["compress", "--model", model_dir, "--calib", calib_files["pt"], "--seq-len", "65"],
                "--seq-len 65 exceeds the model's max_position_embeddings 64")
    _user_error(capsys, ["compress", "--model", model_dir, "--calib", calib_files["pt"], "--calib-size", "11"],
                "gives 10 rows of 24 tokens, --calib-size asks for 11")
    torch.save(torch.randint(0, 50, (4, 8)), tmp_path / "small.pt")
    big = tmp_path / "big.pt"
    torch.save(torch.full((4, 8), llama_dir[1]), big)
    _user_error(capsys, ["compress", "--model", model_dir, "--calib", str(big)], "outside the model's vocabulary")
    floats = tmp_path / "floats.pt"
    torch.save(torch.zeros(4, 8), floats)
    _user_error(capsys, ["compress", "--model", model_dir, "--calib", str(floats)], "2-D integer tensor")
    t5 = tmp_path / "t5"        # an encoder-decoder: its forward needs decoder inputs
    transformers.T5Model(transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                                               vocab_size=50)).save_pretrained(t5)
    _user_error(capsys, ["compress", "--model", str(t5), "--calib", str(big).replace("big", "small")],
                "T5Model(input_ids=...) does not run")
    _user_error(capsys, ["info", model_dir], "holds a dense transformers model")
    _user_error(capsys, ["info", str(tmp_path / "nope")], "does not exist")
    _user_error(capsys, ["info", "--json"], "--json applies to `sparsekit info DIR` only")


def test_info_describes_a_save_pretrained_checkpoint(capsys, tmp_path):
    import sparsekit
    from sparsekit.compress import compress

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    model, report = compress(model, None, "block", "magnitude", speed="off")
    sparsekit.save_pretrained(model, tmp_path / "ck", report)
    info = _info(capsys, str(tmp_path / "ck"))
    assert info["format"] == "sparsekit" and info["format_version"] == 1
    assert info["layers"] == {"block": 2} and info["report"]["scheme"] == "block"
    assert info["weights_bytes"] == os.path.getsize(tmp_path / "ck" / "model.safetensors")


# ----------------------------------------------------------------------------- a real model: MiniLM (BERT)
def test_minilm_directory_with_text_calibration(capsys, tmp_path, captured):
    try:
        model_dir = workloads.minilm_model_dir()
    except ImportError as e:
        pytest.skip(str(e))
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(workloads.SENTENCES))
    out = str(tmp_path / "minilm")
    report, _ = _run(capsys, ["compress", "--model", model_dir, "--calib", str(text), "--calib-size", "10",
                              "--seq-len", "32", "--scheme", "2:4", "--method", "magnitude", "--out", out,
                              "--quiet"])
    assert report["architecture"] == "BertModel" and report["metric"].startswith("cosine similarity")
    assert report["quality_dense"] == pytest.approx(1.0, abs=1e-12)
    assert 0.5 < report["quality"] < 1.0 and report["num_layers"] == 37   # 6 x 6 encoder linears + the pooler
    loaded = transformers.AutoModel.from_pretrained(out).eval()
    ids = torch.randint(0, 30522, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, captured[-1](input_ids=ids).last_hidden_state)
    assert _info(capsys, out)["layers"] == {"2:4": 37}


# ----------------------------------------------------------------------------- calibration files
def test_load_token_rows_formats_and_errors(tmp_path):
    tok = _tokenizer()
    ids = torch.randint(0, 40, (5, 12), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "d.pt")
    got = load_token_rows(tmp_path / "d.pt", seq_len=7, rows=3, vocab_size=40)
    assert got.dtype == torch.int64 and torch.equal(got, ids[:3, :7].long())
    # text: documents concatenated in order, cut into full rows; reading stops once enough rows are there
    docs = workloads.SENTENCES[:6]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n\n")
    flat = [t for d in docs for t in tok(d)["input_ids"]]
    got = load_token_rows(tmp_path / "t.jsonl", seq_len=10, tokenizer=tok)
    assert torch.equal(got.reshape(-1), torch.tensor(flat[:len(flat) // 10 * 10]))
    assert torch.equal(load_token_rows(tmp_path / "t.jsonl", seq_len=10, tokenizer=tok, rows=2), got[:2])
    calib, held = split_holdout(got)
    assert held.shape[0] == 1 and torch.equal(torch.cat([calib, held]), got)
    bad = [("x.jsonl", '{"text": "a b"}\nnot json\n', "line 2 is not JSON"),
           ("y.jsonl", '{"txt": "a"}\n', "line 1 is not an object with a string 'text' field"),
           ("z.txt", "  \n", "holds no text"),
           ("w.txt", "short", "fewer than one row")]
    for name, content, match in bad:
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=match):
            load_token_rows(tmp_path / name, seq_len=10, tokenizer=tok)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_token_rows(tmp_path / "t.jsonl", seq_len=10)
    torch.save({"ids": ids}, tmp_path / "e.pt")
    with pytest.raises(ValueError, match="without 'input_ids'"):
        load_token_rows(tmp_path / "e.pt")
    save_file({"tokens": ids}, str(tmp_path / "e.safetensors"))
    with pytest.raises(ValueError, match="has no 'input_ids' tensor"):
        load_token_rows(tmp_path / "e.safetensors")
    with pytest.raises(ValueError, match="at least 2 token rows"):
        split_holdout(got[:1])
