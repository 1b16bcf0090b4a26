"""Regressions: each reported failure of model conversion, save/load and the CLI, reproduced as it was reported.

Where the same behaviour has a fuller test elsewhere the test name says so:
test_convert_atomic.py (conversion), test_save_load.py (files), test_cli.py (command line),
tests/fuzz/ (seeded adversarial cases).
"""
import ast
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from sparsekit import BlockSparseConfig, Int4Config, quantize_, sparsify_
from sparsekit.compress import compress, load_compressed, save_compressed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(model):
    return ([(n, m) for n, m in model.named_modules(remove_duplicate=False)],
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def _assert_same(model, state):
    mods, sd = state
    now = list(model.named_modules(remove_duplicate=False))
    assert [n for n, _ in now] == [n for n, _ in mods]
    assert all(a is b for (_, a), (_, b) in zip(now, mods))
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


# ----------------------------------------------------------------------------- conversion
def test_second_use_of_a_shared_module_is_converted():
    """sparsify_ / quantize_ left the second use of a shared nn.Linear as a plain nn.Linear."""
    lin = nn.Linear(32, 32)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    sparsify_(model, "2:4", progress=False)
    assert type(model[2]).__name__ == "SparseLinear" and model[0] is model[2]
    lin = nn.Linear(32, 32).half()
    model = nn.Sequential(lin, nn.ReLU(), lin)
    quantize_(model, Int4Config(group_size=32), progress=False)
    assert type(model[2]).__name__ == "QLinear" and model[0] is model[2]


def test_quantize_with_a_bad_last_layer_does_not_half_convert():
    """quantize_ on a model whose last layer has a bad K replaced the earlier layers, then raised."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(60, 8))
    state = _state(model)
    with pytest.raises(ValueError, match=r"layer '2'"):
        quantize_(model, Int4Config(group_size=32), progress=False)
    _assert_same(model, state)


def test_frozen_layers_stay_frozen_and_eval_stays_eval():
    """Conversion made frozen layers trainable and returned new modules in train mode after model.eval()."""
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    model.requires_grad_(False)
    model.eval()
    sparsify_(model, BlockSparseConfig(block_size=16), progress=False)
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())


def test_meta_device_model_is_a_clear_error():
    """A meta-device model failed with 'Tensor.item() cannot be called on meta tensors'."""
    model = nn.Sequential(nn.Linear(64, 64, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        sparsify_(model, "2:4", progress=False)
    with pytest.raises(ValueError, match="meta device"):
        quantize_(model, "int4", progress=False)
    with pytest.raises(ValueError, match="meta device"):
        compress(model, None, "2:4", "magnitude")


def test_zero_output_features_is_a_clear_error():
    """An N = 0 layer failed inside torch."""
    model = nn.Sequential(nn.Linear(16, 0))
    for fn in (lambda: sparsify_(model, "2:4", progress=False), lambda: quantize_(model, "int4", progress=False),
               lambda: compress(model, None, "block")):
        with pytest.raises(ValueError, match="out_features=0"):
            fn()


def test_gptq_calibration_batches_with_the_wrong_k():
    """GPTQ calibration batches with the wrong number of features failed with 'mat1 and mat2 shapes ...'."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).half()
    state = _state(model)
    with pytest.raises(ValueError, match=r"calib: the model's forward fails on the first calibration batch "
                                         r"\(a \(8, 60\) float16 tensor\)"):
        quantize_(model, Int4Config(group_size=32, method="gptq", calib=[torch.randn(8, 60).half()]),
                  progress=False)
    _assert_same(model, state)
    with pytest.raises(ValueError, match=r"calib: .*\(8, 60\)"):
        compress(model.float(), [torch.randn(8, 60)], "int4", "gptq")
    with pytest.raises(ValueError, match=r"calib: .*\(8, 60\)"):
        compress(model.float(), [torch.randn(8, 60)], "2:4", "sparsegpt")


# ----------------------------------------------------------------------------- save / load
def test_load_compressed_on_a_directory(tmp_path):
    """load_compressed on a directory said 'No such device (os error 19)'."""
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_compressed(nn.Sequential(nn.Linear(4, 4)), str(tmp_path))


def test_save_compressed_under_a_regular_file(tmp_path):
    """save_compressed under a regular file raised FileExistsError from os.makedirs."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a regular file"):
        save_compressed(nn.Sequential(nn.Linear(4, 4)), str(tmp_path / "file" / "model.safetensors"))


def test_safetensors_is_a_base_dependency():
    """safetensors was only a test extra, so `sparsekit compress` failed on a plain pip install."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    reqs = None
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            reqs = ast.literal_eval(node.value)
    assert reqs is not None and any(r.split(">")[0].split("=")[0].strip() == "safetensors" for r in reqs), reqs


def test_crafted_block_sparse_checkpoint_is_rejected(tmp_path):
    """A crafted .safetensors with crow[-1] = 100000 loaded, and the next interpret forward died with SIGSEGV."""
    from safetensors.torch import load_file, save_file

    model = sparsify_(nn.Sequential(nn.Linear(64, 64)), BlockSparseConfig(block_size=16), progress=False)
    path = str(tmp_path / "m.safetensors")
    save_compressed(model, path)
    sd = load_file(path)
    sd["0.crow"][-1] = 100000
    save_file(sd, path)
    state = _state(model)
    try:
        load_compressed(model, path)
    except ValueError:
        _assert_same(model, state)
        return
    raise AssertionError("a crafted crow was loaded")


def test_crafted_int4_zero_points_are_rejected(tmp_path):
    """QLinear loaded zero points outside [0, 15]."""
    from safetensors.torch import load_file, save_file

    from sparsekit.nn import QLinear

    model = nn.Sequential(QLinear(64, 16, group_size=32))
    path = str(tmp_path / "m.safetensors")
    save_compressed(model, path)
    sd = load_file(path)
    sd["0.zeros"][:] = 99
    save_file(sd, path)
    state = _state(model)
    try:
        load_compressed(model, path)
    except ValueError:
        _assert_same(model, state)
        return
    raise AssertionError("zero points of 99 were loaded")


# ----------------------------------------------------------------------------- command line
def _cli(*argv, env=None):
    e = dict(os.environ, SPARSEKIT_NO_CUDA_EXT="1")
    e.pop("SPARSEKIT_BACKEND", None)
    e.update(env or {})
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "sparsekit.cli", *argv], capture_output=True, text=True, env=e,
                       timeout=300)
    return r, time.perf_counter() - t0


def test_cli_bad_group_size_and_unwritable_out_are_reported_at_once(tmp_path):
    """A bad --group-size or an unwritable --out was reported after ~2 minutes of compression, with a traceback."""
    (tmp_path / "f").write_text("x")
    for argv, match in ((("--scheme", "int4", "--group-size", "100"), "--group-size must be 32, 64, 128 or -1"),
                        (("--out", str(tmp_path / "f" / "out")), "is a regular file")):
        r, secs = _cli("compress", "--workload", "minilm", *argv)
        assert r.returncode == 2 and "Traceback" not in r.stderr and match in r.stderr, r.stderr
        assert secs < 60, f"took {secs:.0f} s: the error came after the work"


def test_cli_existing_out_is_not_overwritten(tmp_path, capsys):
    """An existing --out was overwritten silently."""
    from sparsekit import cli

    (tmp_path / "model.safetensors").write_bytes(b"old")
    assert cli.main(["compress", "--workload", "digits", "--out", str(tmp_path)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (tmp_path / "model.safetensors").read_bytes() == b"old"


def test_cli_sparsity_for_a_non_block_scheme(capsys):
    """--sparsity was silently ignored for non-block schemes."""
    from sparsekit import cli

    for scheme in ("2:4", "int4", "2:4+int4"):
        assert cli.main(["compress", "--workload", "digits", "--scheme", scheme, "--sparsity", "0.9"]) == 2
        assert "--sparsity applies to --scheme block only" in capsys.readouterr().err


def test_cli_bogus_backend_environment_variable():
    """A bogus SPARSEKIT_BACKEND was not reported."""
    r, _ = _cli("compress", "--workload", "digits", env={"SPARSEKIT_BACKEND": "fast"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "SPARSEKIT_BACKEND='fast' is not a backend" in r.stderr
