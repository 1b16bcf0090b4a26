"""The `sparsekit` command line: every command's --help, and what `bench` runs (CPU, fast: no quality table)."""
from __future__ import annotations

import argparse
import re

import pytest
import torch

from sparsekit import cli
from sparsekit.bench import quality as bench_quality


def _subcommands() -> list:
    p = cli._parser()
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


def test_the_commands_checked_below_are_all_the_commands():
    assert _subcommands() == sorted(["info", "bench", "quality", "compress"])


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [None, "info", "bench", "quality", "compress"])
def test_help_has_a_description_and_examples(capsys, command):
    argv = ([command] if command else []) + ["--help"]
    text = _help(capsys, argv)
    prog = "sparsekit" + (f" {command}" if command else "")
    assert text.startswith(f"usage: {prog}"), text[:200]
    # the description: a paragraph between the usage and the first option group
    head = text.split("\n\n")
    description = head[1].strip()
    assert len(description.split()) >= 5 and not description.startswith(("options:", "positional")), text[:400]
    # examples: a heading, then at least one command line of this command
    assert "\nexamples:\n" in text, text
    examples = text.split("\nexamples:\n", 1)[1].splitlines()
    pattern = re.compile(r"^\s+(\S+=\S+\s+)?" + re.escape(prog) + r"(\s|$)")
    assert any(pattern.match(line) for line in examples), examples


# ----------------------------------------------------------------------------- bench runs what it is asked
@pytest.fixture
def quality_calls(monkeypatch):
    """Records each quality-table run instead of running it (minutes on CPU)."""
    calls = []

    def fake(out=None, **kw):
        calls.append(kw)
        return []

    monkeypatch.setattr(bench_quality, "print_quality_table", fake)
    return calls


OP = "block_sparse_linear"   # the quickest CPU sweep (seconds)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU sweep runs only without CUDA")
def test_bench_ops_runs_only_those_ops_says_no_cuda_once_and_no_quality_table(capsys, quality_calls):
    from sparsekit.bench.run import CPU_MESSAGE

    assert cli.main(["bench", "--quick", "--ops", OP]) == 0
    out = capsys.readouterr().out
    assert out.count("No CUDA device") == 1 and CPU_MESSAGE in out
    assert f"{OP}: all passed" in out
    others = [op for op in cli.KNOWN_OPS if op != OP and f"{op}: CPU correctness sweep" in out]
    assert others == []
    assert quality_calls == []
    assert "CPU correctness sweep of 1 op(s): all passed" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU sweep runs only without CUDA")
def test_bench_quality_flag_adds_the_table(capsys, quality_calls):
    assert cli.main(["bench", "--quick", "--ops", OP, "--quality", "--quiet"]) == 0
    assert len(quality_calls) == 1
    kw = quality_calls[0]
    assert kw["workloads"] == ("digits",)          # --quick: digits only
    assert kw["log"] is None and kw["progress"] is False   # --quiet
    capsys.readouterr()
    assert cli.main(["bench", "--quick", "--ops", OP, "--quality"]) == 0
    assert quality_calls[1]["log"] is not None      # not quiet: one line per row (stderr is not a terminal here)
    assert quality_calls[1]["progress"] is False


def test_bench_quality_and_no_quality_conflict(capsys, quality_calls):
    assert cli.main(["bench", "--ops", OP, "--quality", "--no-quality"]) == 2
    assert quality_calls == []


def test_bench_dry_run_cpu_with_ops_skips_the_quality_table(capsys, quality_calls, tmp_path):
    assert cli.main(["bench", "--ops", OP, "--quick", "--dry-run-cpu", "--no-plot", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"[bench] {OP}:" in out and "0 failed" in out
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".csv"] == [f"{OP}.csv"]
    assert quality_calls == []


def test_quality_command_runs_the_table(capsys, quality_calls):
    assert cli.main(["quality", "--workloads", "digits", "--configs", "2:4/magnitude", "--quiet"]) == 0
    assert len(quality_calls) == 1
    kw = quality_calls[0]
    assert kw["workloads"] == ("digits",) and tuple(kw["configs"]) == (("2:4", "magnitude"),)
    assert kw["log"] is None and kw["progress"] is False


def test_quality_command_bad_argument_returns_2(capsys, quality_calls):
    assert cli.main(["quality", "--workloads", "mnist"]) == 2
    assert quality_calls == []
