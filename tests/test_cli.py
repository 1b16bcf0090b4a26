"""The `sparsekit` command line (CPU)."""
from __future__ import annotations

import pytest
import torch

import sparsekit
from sparsekit import cli


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
