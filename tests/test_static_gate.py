"""The static performance gate, on CPU: every launcher-chosen kernel config compiled for sm_90 / sm_80.

``sparsekit.bench.static_gate`` records what each launcher in kernels/ would launch on a GPU over a
sweep of shapes and dtypes, compiles each distinct config, and reads the cubin: registers, spills,
shared memory, tensor-core instructions, barriers, load widths.  This test asserts:

* every compiled config passes the gate (no local-memory spills, tensor-core instructions in every
  matmul kernel whose operands allow them (fp16 / bf16 / int8, fp32 with TF32 allowed), shared
  memory within the architecture's limit, autotuner candidates included) or is a known failure
  listed for this triton version in ``bench/gate/known_failures.csv``; no listed config passes
  (the ledger is rewritten with ``--known update`` when a fix lands);
* where a table is committed for the running triton version (``bench/gate/triton-<version>/``),
  it is current: the same configs, the same kernel sources (Triton's hash of each kernel and its
  helpers), and the same counts for every config compiled here; every committed row passes the gate.
  Regenerate it with ``make gate-table`` after changing a kernel or a launcher.

How much is compiled is set by ``SPARSEKIT_GATE_STRIDE`` (``"90=1,80=4"``: every sm_90 config, one
sm_80 config in four, chosen by a stable hash).  Default: all sm_90 configs and one in four sm_80
configs on the GPU machine's triton (3.6), one sm_90 config in three on any other version.
"""
import os
import subprocess
import sys

import pytest
import torch
import triton

GPU_TRITON = "3.6"           # the GPU machine's triton: its table must be committed and current


def _default_stride() -> str:
    return "90=1,80=4" if triton.__version__.startswith(GPU_TRITON + ".") else "90=3,80=0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the GPU tests compile and run the kernels")
def test_static_gate():
    stride = os.environ.get("SPARSEKIT_GATE_STRIDE", _default_stride())
    cmd = [sys.executable, "-m", "sparsekit.bench.static_gate", "--check", "--compare", "--stride", stride]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    out = r.stdout + r.stderr
    if "Cannot find ptxas" in out or "FileNotFoundError" in out and "ptxas" in out:
        pytest.skip("ahead-of-time compile unavailable here (no ptxas)")
    summary = [ln for ln in r.stdout.splitlines() if ln.startswith("static gate")]
    assert summary, out[-4000:]
    problems = [ln for ln in r.stdout.splitlines() if ln.startswith(("GATE-FAIL", "GATE-FIXED", "TABLE-DIFF"))]
    assert r.returncode == 0 and not problems, (
        "static performance gate failed (a new failure: fix it; a fix or a kernel changed on purpose: "
        "regenerate the table and the ledger with `make gate-table`):\n" + "\n".join(problems[:60]) + ("\n" + out[-3000:] if not problems else ""))
    missing = [ln for ln in r.stdout.splitlines() if ln.startswith("TABLE-MISSING")]
    if triton.__version__.startswith(GPU_TRITON + "."):
        assert not missing, "\n".join(missing)
    print(summary[0])


def _row(kernel="_k", arch=90, status="OK", stack=0, tc=1, expect_tc=1, config="BLOCK_M=16"):
    from sparsekit.bench.static_gate import EXACT
    r = dict(family="f", kernel=kernel, src="s", arch=arch, mode="fp16", config=config, args="X:fp16",
             tuned=0, expect_tc=expect_tc, status=status, tc_op="HGMMA", **{c: 0 for c in EXACT})
    r.update(stack=stack, stl=stack // 8, ldl=stack // 8, tc=tc)
    return r


def test_known_failure_ledger(tmp_path):
    """The ledger of known failures: listed failures pass the check on their triton version only, new ones
    fail, a listed config that passes is reported, and an update records exactly the compiled rows."""
    from sparsekit.bench.static_gate import read_known, split_known, update_known
    path = str(tmp_path / "known.csv")
    spill = _row("_a", stack=64)
    notc = _row("_b", tc=0)
    good = _row("_c")
    skipped = _row("_d", status="NOT-COMPILED")
    update_known([spill, notc, good, skipped], "3.6.0", path)
    known = read_known(path)
    assert sorted(e["kernel"] for e in known.values()) == ["_a", "_b"]
    assert all(e["triton"] == {"3.6.0"} for e in known.values())
    assert {e["kernel"]: e["problem"] for e in known.values()} == {"_a": "spills", "_b": "no tensor-core instructions"}
    new, old, fixed = split_known([spill, notc, good], known, "3.6.0")
    assert (new, [r["kernel"] for r, _ in old], fixed) == ([], ["_a", "_b"], [])
    # another triton version: the same failures are new there
    new, old, fixed = split_known([spill, notc, good], known, "3.9.0")
    assert ([r["kernel"] for r, _ in new], old, fixed) == (["_a", "_b"], [], [])
    # a fix: the listed config passes -> reported; the update takes it off, a config not compiled keeps its entry
    fixed_a = _row("_a")
    new, old, fixed = split_known([fixed_a, skipped], known, "3.6.0")
    assert (new, old, [r["kernel"] for r in fixed]) == ([], [], ["_a"])
    update_known([fixed_a, _row("_b", status="NOT-COMPILED")], "3.6.0", path)
    assert sorted(e["kernel"] for e in read_known(path).values()) == ["_b"]
    # a second version adds to an entry instead of replacing it
    update_known([notc], "3.9.0", path)
    assert [e["triton"] for e in read_known(path).values()] == [{"3.6.0", "3.9.0"}]
    # a compile error is a failure too
    update_known([_row("_e", status="COMPILE-ERROR x")], "3.6.0", path)
    assert "_e" in {e["kernel"] for e in read_known(path).values()}
