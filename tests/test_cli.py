"""The `sparsekit` command line (CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import sparsekit
from sparsekit import cli, workloads


def test_info_prints_versions(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert sparsekit.__version__ in out
    assert torch.__version__ in out
    assert "triton" in out
    assert "cuda device" in out and "cuda extension" in out
    assert "sparse24_linear" in out
    if not torch.cuda.is_available():
        assert "none" in out
        assert "interpret" in out and "reference" in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "bench" in capsys.readouterr().out


def test_bench_help_is_forwarded(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_bench_bad_argument_returns_2(capsys):
    assert cli.main(["bench", "--shapes", "4096by4096"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU sweep runs only without CUDA")
def test_bench_quick_runs_cpu_sweep(capsys):
    assert cli.main(["bench", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "No CUDA device: GPU timings skipped; ran the CPU correctness sweep (Triton interpreter) instead" in out
    assert "PASS" in out and "FAIL" not in out
    assert "interpret" in out and "reference" in out


# ----------------------------------------------------------------------------- compress: user errors before any work
class _CountingCalib:
    """Calibration batches that count how often they are read."""

    def __init__(self, batches):
        self.batches = batches
        self.reads = 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _tiny_workload():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    x = torch.randn(32, 64)
    ref = model(x).detach()

    def quality(m):
        with torch.no_grad():
            y = m(x).float()
        return float(torch.nn.functional.cosine_similarity(y, ref, dim=-1).mean())

    return workloads.Workload(name="digits", model=model, calib=_CountingCalib([x[:16], x[16:]]),
                              quality_fn=quality, metric="cosine to dense", group_size=64)


@pytest.fixture
def tiny(monkeypatch):
    """`--workload digits` loads a 64-64-16 MLP (the CLI code path is the same, the work is tiny)."""
    made = []

    def load(name, **kw):
        wl = _tiny_workload()
        made.append(wl)
        return wl

    monkeypatch.setattr(workloads, "load_workload", load)
    return made


@pytest.fixture
def no_workload(monkeypatch):
    """Fails the test if the CLI starts loading a workload."""
    def load(name, **kw):
        raise AssertionError("the workload was loaded before the arguments were checked")

    monkeypatch.setattr(workloads, "load_workload", load)


def _user_error(capsys, argv, match):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv,match", [
    (["--scheme", "2:4", "--sparsity", "0.3"], "--sparsity applies to --scheme block only"),
    (["--scheme", "int4", "--sparsity", "0.3"], "--sparsity applies to --scheme block only"),
    (["--scheme", "block", "--sparsity", "1.5"], "--sparsity must be in [0, 1]"),
    (["--scheme", "block", "--sparsity", "nan"], "--sparsity must be in [0, 1]"),
    (["--scheme", "int4", "--group-size", "48"], "--group-size must be 32, 64, 128 or -1"),
    (["--scheme", "int4", "--group-size", "0"], "--group-size must be 32, 64, 128 or -1"),
    (["--scheme", "2:4", "--group-size", "64"], "--group-size applies to --scheme w4a8, mixed, int4 and 2:4+int4 only"),
    (["--scheme", "block", "--group-size", "64"], "--group-size applies to --scheme w4a8, mixed, int4 and 2:4+int4 only"),
    (["--scheme", "int4", "--group-size", "abc"], "invalid int value: 'abc'"),
    (["--scheme", "int4", "--method", "wanda"], "--method wanda does not apply to --scheme int4"),
    (["--scheme", "3:8"], "invalid choice: '3:8'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_compress_bad_arguments_fail_before_any_work(capsys, no_workload, argv, match):
    _user_error(capsys, ["compress", "--workload", "digits"] + argv, match)


def test_compress_missing_workload_is_one_line(capsys, no_workload):
    _user_error(capsys, ["compress"], "the following arguments are required: --workload")


def test_compress_out_under_a_regular_file(capsys, no_workload, tmp_path):
    (tmp_path / "f").write_text("x")
    _user_error(capsys, ["compress", "--workload", "digits", "--out", str(tmp_path / "f" / "out")],
                "is a regular file, not a directory")
    _user_error(capsys, ["compress", "--workload", "digits", "--out", str(tmp_path / "f")],
                "is a regular file, not a directory")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write into read-only directories")
def test_compress_out_not_writable(capsys, no_workload, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _user_error(capsys, ["compress", "--workload", "digits", "--out", str(ro / "out")], "is not writable")
    finally:
        ro.chmod(0o700)


def test_compress_refuses_to_overwrite_without_force(capsys, tiny, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["compress", "--workload", "digits", "--scheme", "2:4", "--method", "magnitude",
                     "--out", str(out)]) == 0
    first = json.loads((out / "report.json").read_text())
    weights = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    n_loaded = len(tiny)
    _user_error(capsys, ["compress", "--workload", "digits", "--scheme", "block", "--out", str(out)],
                "already holds model.safetensors and report.json; pass --force")
    assert len(tiny) == n_loaded            # refused before loading the workload
    assert (out / "model.safetensors").read_bytes() == weights
    assert cli.main(["compress", "--workload", "digits", "--scheme", "block", "--sparsity", "0.75",
                     "--out", str(out), "--force"]) == 0
    second = json.loads((out / "report.json").read_text())
    assert first["scheme"] == "2:4" and second["scheme"] == "block" and second["sparsity"] == 0.75
    assert sorted(os.listdir(out)) == ["model.safetensors", "report.json"]


def test_compress_bad_group_size_for_the_model_fails_before_calibration(capsys, tiny, tmp_path):
    """The 64-64-16 MLP has K=64: group 128 does not fit; reported before any calibration pass."""
    out = tmp_path / "new" / "out"
    _user_error(capsys, ["compress", "--workload", "digits", "--scheme", "int4", "--method", "gptq",
                         "--group-size", "128", "--out", str(out)], "group_size 128 does not divide")
    assert tiny[0].calib.reads == 0
    assert not (tmp_path / "new").exists()    # the directories made for --out are removed again


def test_compress_runs_and_reports(capsys, tiny, tmp_path):
    out = tmp_path / "o"
    assert cli.main(["compress", "--workload", "digits", "--scheme", "int4", "--method", "gptq",
                     "--group-size", "32", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    rep = json.loads((out / "report.json").read_text())
    assert printed["group_size"] == rep["group_size"] == 32 and rep["method"] == "gptq"
    assert rep["quality"] > 0.9 and rep["layers"] == ["0", "2"]
    from sparsekit.compress import load_compressed
    from sparsekit.nn import QLinear

    fresh = nn.Sequential(QLinear(64, 64, group_size=32), nn.ReLU(), QLinear(64, 16, group_size=32))
    load_compressed(fresh, out / "model.safetensors")
    assert tiny[0].calib.reads > 0


def test_bogus_backend_environment_variable(capsys, monkeypatch, no_workload):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "fastest")
    for argv in (["info"], ["compress", "--workload", "digits"], ["bench", "--quick"]):
        _user_error(capsys, argv, "environment variable SPARSEKIT_BACKEND='fastest' is not a backend")


def test_backend_environment_variable_that_cannot_run_the_scheme(capsys, monkeypatch, no_workload):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "triton")
    _user_error(capsys, ["compress", "--workload", "digits", "--scheme", "2:4"], "the 'triton' backend needs CUDA")
    monkeypatch.setenv("SPARSEKIT_BACKEND", "cusparselt")
    _user_error(capsys, ["compress", "--workload", "digits", "--scheme", "block"], "has no 'cusparselt' backend")


def test_info_reports_the_forced_backend(capsys, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "reference")
    assert cli.main(["info"]) == 0
    assert "reference (forced)" in capsys.readouterr().out


def test_user_error_as_a_subprocess(tmp_path):
    """The installed entry point: one line on stderr, no traceback, status 2."""
    env = dict(os.environ, SPARSEKIT_NO_CUDA_EXT="1")
    env.pop("SPARSEKIT_BACKEND", None)
    (tmp_path / "f").write_text("x")
    for argv, match in ((["--scheme", "2:4", "--sparsity", "0.3"], "--sparsity applies to --scheme block only"),
                        (["--out", str(tmp_path / "f")], "is a regular file")):
        r = subprocess.run([sys.executable, "-m", "sparsekit.cli", "compress", "--workload", "digits"] + argv,
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0 and match in r.stderr, r.stderr


# ----------------------------------------------------------------------------- compress: report paths and progress
def test_compress_report_files_are_relative_to_the_output_directory(capsys, tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in ("rel/out", str(tmp_path / "abs" / "out")):
        assert cli.main(["compress", "--workload", "digits", "--scheme", "2:4", "--method", "magnitude",
                         "--out", out, "--quiet"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["out"] == out
        assert printed["files"] == ["model.safetensors", "report.json"]
        assert all(os.path.isfile(os.path.join(out, f)) for f in printed["files"])


def _record_progress(monkeypatch):
    import sparsekit.compress as comp

    seen = []
    real = comp.compress

    def spy(*a, **kw):
        seen.append(kw["progress"])
        return real(*a, **kw)

    monkeypatch.setattr(comp, "compress", spy)
    return seen


def test_compress_progress_summary_and_quiet(capsys, tiny, tmp_path, monkeypatch):
    seen = _record_progress(monkeypatch)
    argv = ["compress", "--workload", "digits", "--scheme", "2:4", "--method", "magnitude"]
    # not a terminal (pytest's capture): no bars, one summary line on stderr, the report alone on stdout
    assert cli.main(argv + ["--out", str(tmp_path / "a")]) == 0
    cap = capsys.readouterr()
    json.loads(cap.out)
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("sparsekit compress: digits 2:4/magnitude: 2 layers in ") and "quality" in lines[0]
    assert "wrote model.safetensors, report.json in" in lines[0]
    # --quiet: nothing on stderr
    assert cli.main(argv + ["--quiet"]) == 0
    cap = capsys.readouterr()
    json.loads(cap.out)
    assert cap.err == ""
    # a terminal: bars by default; --quiet still silences them
    monkeypatch.setattr(cli, "_stderr_is_tty", lambda: True)
    assert cli.main(argv) == 0
    assert cli.main(argv + ["--quiet"]) == 0
    capsys.readouterr()
    # --progress forces the bars without a terminal
    monkeypatch.setattr(cli, "_stderr_is_tty", lambda: False)
    assert cli.main(argv + ["--progress"]) == 0
    capsys.readouterr()
    assert seen == [False, False, True, False, True]
    _user_error(capsys, argv + ["--quiet", "--progress"], "not allowed with argument")
