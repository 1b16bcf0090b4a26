"""The static performance gate, on CPU: every launcher-chosen kernel config compiled for sm_90 / sm_80.

``sparsekit.bench.static_gate`` records what each launcher in kernels/ would launch on a GPU over a
sweep of shapes and dtypes, compiles each distinct config, and reads the cubin: registers, spills,
shared memory, tensor-core instructions, barriers, load widths.  This test asserts:

* every compiled config passes the gate: no local-memory spills, tensor-core instructions in every
  matmul kernel whose operands allow them (fp16 / bf16 / int8, fp32 with TF32 allowed), shared
  memory within the architecture's limit (autotuner candidates included);
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
    problems = [ln for ln in r.stdout.splitlines() if ln.startswith(("GATE-FAIL", "TABLE-DIFF"))]
    assert r.returncode == 0 and not problems, (
        "static performance gate failed (regenerate the committed table with `make gate-table` if a kernel "
        "changed on purpose):\n" + "\n".join(problems[:60]) + ("\n" + out[-3000:] if not problems else ""))
    missing = [ln for ln in r.stdout.splitlines() if ln.startswith("TABLE-MISSING")]
    if triton.__version__.startswith(GPU_TRITON + "."):
        assert not missing, "\n".join(missing)
    print(summary[0])
