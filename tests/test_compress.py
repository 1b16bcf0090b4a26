"""sparsekit.compress on the digits MLP: every scheme x method, reports, safetensors round trip, CLI."""
import json

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")
from sparsekit import cli  # noqa: E402
from sparsekit.compress import SCHEME_METHODS, compress, load_compressed, module_bytes, save_compressed  # noqa: E402
from sparsekit.nn import BlockSparseLinear, QLinear, SparseLinear, SparseQLinear  # noqa: E402
from sparsekit.prune import is_2to4  # noqa: E402
from sparsekit.workloads import digits_workload  # noqa: E402

CASES = [(s, m) for s in ("2:4", "block", "int4", "2:4+int4") for m in SCHEME_METHODS[s]]
MODULE = {"2:4": SparseLinear, "block": BlockSparseLinear, "int4": QLinear, "2:4+int4": SparseQLinear}


@pytest.fixture(scope="module")
def digits():
    return digits_workload(seed=0)


@pytest.fixture(scope="module")
def compressed(digits):
    out = {}
    for scheme, method in CASES:
        out[(scheme, method)] = compress(digits.model, digits.calib, scheme, method, quality_fn=digits.quality_fn,
                                         inplace=False)
    print("\ndigits test accuracy (dense %.4f): " % digits.dense_quality
          + ", ".join(f"{s} {m}: {r['quality']:.4f}" for (s, m), (_, r) in out.items()))
    return out


def _x(digits):
    return digits.extra["x_test"][:32]


@pytest.mark.parametrize("scheme,method", CASES)
def test_compress_returns_valid_model(digits, compressed, scheme, method):
    model, rep = compressed[(scheme, method)]
    dense_params = [p.clone() for p in digits.model.parameters()]
    names = [n for n, m in digits.model.named_modules() if isinstance(m, nn.Linear)]
    assert rep["scheme"] == scheme and rep["method"] == method
    assert rep["layers"] == names and rep["num_layers"] == 3
    for n in names:
        mod = model.get_submodule(n)
        assert isinstance(mod, MODULE[scheme]), (n, type(mod))
        if scheme in ("2:4", "2:4+int4"):
            w = mod.weight
            assert is_2to4(w)
            groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
            assert int(groups.max()) <= 2
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    # the input model is untouched
    for p, q in zip(digits.model.parameters(), dense_params):
        assert torch.equal(p, q)
    # report fields
    assert rep["dense_bytes"] == module_bytes(digits.model)
    assert rep["compressed_bytes"] == module_bytes(model) < rep["dense_bytes"]
    assert 0 < rep["ratio"] < {"2:4": 0.6, "block": 0.6, "int4": 0.2, "2:4+int4": 0.12}[scheme]
    assert rep["quality_dense"] == pytest.approx(digits.dense_quality)
    assert 0.8 < rep["quality"] <= 1.0 and rep["quality_on"]
    assert rep["speed"].startswith("not measured") and "latency_ms" not in rep  # CPU model
    x = _x(digits)
    dtype = next(model.parameters()).dtype
    y = model(x.to(dtype))
    assert y.shape == (32, 10) and torch.isfinite(y).all()
    json.dumps(rep)


def test_2to4_output_matches_masked_dense(digits, compressed):
    model, _ = compressed[("2:4", "sparsegpt")]
    ref = nn.Sequential(*[m.to_dense() if isinstance(m, SparseLinear) else m for m in model])
    x = _x(digits)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_int4_quality_on_float_copy_matches_qlinear(digits, compressed):
    model, rep = compressed[("int4", "gptq")]
    x = _x(digits)
    out16 = model(x.half()).float()
    ref = nn.Sequential(*[m.to_dense().float() if isinstance(m, QLinear) else m for m in model])
    out32 = ref(x)
    assert (out16 - out32).norm() / out32.norm() < 1e-2
    assert rep["group_size"] == 64


def test_unsupported_combinations(digits):
    with pytest.raises(ValueError, match="does not apply"):
        compress(digits.model, digits.calib, "2:4+int4", "gptq")
    with pytest.raises(ValueError, match="does not apply"):
        compress(digits.model, digits.calib, "int4", "wanda")
    with pytest.raises(ValueError, match="unknown scheme"):
        compress(digits.model, digits.calib, "3:8", "magnitude")
    with pytest.raises(ValueError, match="speed"):
        compress(digits.model, digits.calib, "2:4", "magnitude", speed="fast")


@pytest.mark.gpu
def test_compress_reports_kernel_speed_on_cuda(digits):
    import copy

    model = copy.deepcopy(digits.model).cuda().half()
    calib = [(b[0].cuda().half(),) for b in digits.calib]
    comp, rep = compress(model, calib, "2:4", "magnitude")
    assert rep["latency_dense_ms"] > 0 and rep["latency_ms"] > 0
    assert rep["speedup"] == pytest.approx(rep["latency_dense_ms"] / rep["latency_ms"])
    assert torch.cuda.get_device_name() in rep["speed_on"]
    print(f"\ndigits MLP 2:4 on {rep['speed_on']}: dense {rep['latency_dense_ms']:.4f} ms, "
          f"2:4 {rep['latency_ms']:.4f} ms, speedup {rep['speedup']:.2f}x")


@pytest.mark.parametrize("scheme,method", [("2:4", "wanda"), ("block", "magnitude"), ("int4", "rtn"),
                                           ("2:4+int4", "sparsegpt")])
def test_save_compressed_round_trip(tmp_path, digits, compressed, scheme, method):
    model, rep = compressed[(scheme, method)]
    wpath, rpath = save_compressed(model, str(tmp_path / "model.safetensors"), rep)
    assert rpath == str(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["scheme"] == scheme
    # a fresh model of the compressed structure (different weights) takes the saved state back
    other = digits_workload(seed=1)
    fresh, _ = compress(other.model, other.calib, scheme, method)
    x = _x(digits).to(next(model.parameters()).dtype)
    assert not torch.equal(fresh(x), model(x))
    load_compressed(fresh, wpath)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_save_compressed_handles_shared_tensors(tmp_path):
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(8, 8))
    model[2].weight = lin.weight  # tied
    path, rpath = save_compressed(model, str(tmp_path / "tied.safetensors"))
    assert rpath is None
    fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    load_compressed(fresh, path)
    torch.testing.assert_close(fresh[2].weight, lin.weight)
    torch.testing.assert_close(fresh[0].weight, lin.weight)


def test_cli_compress_digits(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["compress", "--workload", "digits", "--scheme", "2:4", "--method", "sparsegpt",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert (out / "model.safetensors").stat().st_size > 0
    assert rep["workload"] == "digits" and rep["scheme"] == "2:4" and rep["method"] == "sparsegpt"
    assert rep["quality"] > 0.9 and "quality_dense" in rep and "compressed_bytes" in printed


def test_cli_compress_rejects_bad_combination(tmp_path, capsys):
    assert cli.main(["compress", "--workload", "digits", "--scheme", "int4", "--method", "wanda",
                     "--out", str(tmp_path)]) == 2
    assert "does not apply" in capsys.readouterr().err


def test_2to4_int4_matches_its_dequantized_weights_and_is_smaller(digits, compressed):
    """2:4+int4 = the 2:4 model of the same method, with its kept values rounded to int4."""
    model, rep = compressed[("2:4+int4", "sparsegpt")]
    sp, rep24 = compressed[("2:4", "sparsegpt")]
    x = _x(digits)
    ref = nn.Sequential(*[m.to_dense().float() if isinstance(m, SparseQLinear) else m for m in model])
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    for n in rep["layers"]:
        a, b = model.get_submodule(n), sp.get_submodule(n)
        assert torch.equal(a.weight_format().mask(), b.weight_format().mask())
        wq, w = a.weight.float(), b.weight.float()
        assert (wq - w).norm() / w.norm() < 0.1   # int4 rounding of the kept values only
    assert rep["layer_compressed_bytes"] < 0.3 * rep24["layer_compressed_bytes"]  # fp32 2:4 values -> int4
    assert rep["group_size_unit"].startswith("compressed")
