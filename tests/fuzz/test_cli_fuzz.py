"""Seeded adversarial ``sparsekit compress`` command lines, run in-process through ``sparsekit.cli.main(argv)``.

Random combinations of good and bad arguments (workload, scheme, method, --sparsity, --group-size, --out in every
state: new, nested, existing, already holding a result, a regular file, under a regular file, empty; --force,
unknown flags) and ``SPARSEKIT_BACKEND`` values.  The workload loader is replaced by a tiny 64-64-16 MLP (the CLI
code path is the real one; the compression work is small), whose calibration batches count their reads.

An oracle written from the documented CLI contract predicts each outcome:

* clear-error: exit status 2, exactly one line on stderr containing ``error:`` and no traceback; nothing
  computed (the workload is not even loaded for argument errors, no calibration pass for a group size that
  does not fit the model), the output directory as it was (new directories removed again);
* correct-result: exit status 0, the JSON report on stdout for the requested scheme and method, and with --out
  ``model.safetensors`` holding the compressed modules' tensors and ``report.json``.

``classify`` is local to this file and can be swapped for a shared harness's classifier.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from sparsekit import cli, workloads

SEED = 13_100
N_CASES = 90
METHODS = {"2:4": ("magnitude", "wanda", "sparsegpt"), "block": ("magnitude",), "int4": ("rtn", "gptq", "awq"),
           "2:4+int4": ("magnitude", "wanda", "sparsegpt")}
CPU_BACKENDS = {"2:4": ("interpret", "reference", "dense")}    # forced backends that run the scheme on CPU
RANK = {"not a backend": 0, "invalid choice": 1, "invalid float": 1, "invalid int": 1, "required": 1,
        "unrecognized arguments": 1, "does not apply": 2, "--sparsity applies": 3, "--sparsity must be": 3,
        "--group-size applies": 4, "--group-size must be": 4, "SPARSEKIT_BACKEND": 5, "regular file": 6,
        "--out must be": 6, "--force": 6, "does not divide": 7}
KEYS = {"2:4": ("values", "meta_codes"), "block": ("blocks", "crow", "col"), "int4": ("qweight", "scales"),
        "2:4+int4": ("qweight", "meta_codes", "scales")}


# ----------------------------------------------------------------------------- classifier
@dataclass
class Outcome:
    case: str
    kind: str      # clear-error | correct-result | unclear-error | silent-wrong | wrong-rejection
    detail: str = ""


def classify(case: str, argv: list, expect: str, check_error, check_ok) -> Outcome:
    """Run ``main(argv)`` in-process; ``expect`` is "error" or "ok"; the checks raise AssertionError."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(argv)
    except SystemExit as e:
        return Outcome(case, "unclear-error", f"SystemExit({e.code}) escaped main: {err.getvalue().strip()}")
    except Exception as e:  # noqa: BLE001 - a traceback for any input is a failure
        return Outcome(case, "unclear-error", f"{type(e).__name__}: {e}")
    stderr = err.getvalue()
    if rc != 0:
        lines = stderr.strip().splitlines()
        if rc != 2 or len(lines) != 1 or "error:" not in lines[0] or "Traceback" in stderr:
            return Outcome(case, "unclear-error", f"rc={rc}, stderr={stderr!r}")
        try:
            check_error(lines[0])
        except AssertionError as a:
            return Outcome(case, "silent-wrong", f"{lines[0]} -- but {a}")
        if expect == "ok":
            return Outcome(case, "wrong-rejection", lines[0])
        return Outcome(case, "clear-error", lines[0])
    if expect == "error":
        return Outcome(case, "silent-wrong", f"accepted: {argv}")
    try:
        check_ok(out.getvalue())
    except AssertionError as a:
        return Outcome(case, "silent-wrong", str(a))
    return Outcome(case, "correct-result")


# ----------------------------------------------------------------------------- the tiny workload
class _Calib:
    def __init__(self, batches):
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    x = torch.randn(32, 64)
    ref = model(x).detach()

    def quality(m):
        with torch.no_grad():
            return float(nn.functional.cosine_similarity(m(x).float(), ref, dim=-1).mean())

    return workloads.Workload(name="digits", model=model, calib=_Calib([x[:16], x[16:]]), quality_fn=quality,
                              metric="cosine to dense")


# ----------------------------------------------------------------------------- one case
def _case(i, rng, tmp, loads, monkeypatch):
    argv, problems, static = ["compress"], [], True
    clean = rng.random() < 0.3          # a case built from valid choices only (it must succeed)
    workload = rng.choice(("digits", "minilm") if clean else ("digits",) * 8 + ("minilm", "mnist"))
    if clean or rng.random() > 0.03:
        argv += ["--workload", workload]
    else:
        problems.append("required")
    if workload == "mnist":
        problems.append("invalid choice")
    scheme = rng.choice(("2:4", "block", "int4", "2:4+int4") if clean else ("2:4", "block", "int4", "2:4+int4",
                                                                             "2:4", "3:8"))
    if scheme != "2:4" or rng.random() < 0.5:
        argv += ["--scheme", scheme]
    if scheme == "3:8":
        problems.append("invalid choice")
        scheme = "2:4"
    method = None
    r = rng.random()
    if r < 0.35 or (clean and r < 0.7):
        method = rng.choice(METHODS[scheme])
    elif r < 0.55 and not clean:
        method = rng.choice(("magnitude", "wanda", "sparsegpt", "rtn", "gptq", "awq", "obs"))
    if method is not None:
        argv += ["--method", method]
        if method == "obs":
            problems.append("invalid choice")
        elif method not in METHODS[scheme]:
            problems.append("does not apply")
    sparsity = rng.choice((None,) * 5 + ("0.5", "0", "1", "0.75", "1.5", "-0.1", "nan", "inf", "abc"))
    if clean:
        sparsity = rng.choice((None, "0.5", "0", "1", "0.75")) if scheme == "block" else None
    if sparsity is not None:
        argv += ["--sparsity", sparsity]
        try:
            v = float(sparsity)
        except ValueError:
            problems.append("invalid float")
        else:
            if scheme != "block":
                problems.append("--sparsity applies")
            elif not (math.isfinite(v) and 0 <= v <= 1):
                problems.append("--sparsity must be")
    group = rng.choice((None,) * 5 + ("32", "64", "128", "-1", "48", "0", "abc", "1e3"))
    if clean:
        group = rng.choice(("32", "-1")) if scheme in ("int4", "2:4+int4") and rng.random() < 0.6 else None
    divisibility = False
    if group is not None:
        argv += ["--group-size", group]
        try:
            g = int(group)
        except ValueError:
            problems.append("invalid int")
        else:
            if scheme not in ("int4", "2:4+int4"):
                problems.append("--group-size applies")
            elif g not in (32, 64, 128, -1):
                problems.append("--group-size must be")
            elif (scheme == "int4" and g == 128) or (scheme == "2:4+int4" and g in (64, 128)):
                divisibility = True        # K = 64 (int4) / 32 kept columns (2:4+int4): found after loading
    out_kind = rng.choice(("none", "new", "nested", "empty_dir", "has_result") if clean else
                          ("none", "none", "new", "nested", "empty_dir", "has_result", "has_result", "file",
                           "under_file", "empty"))
    out = os.path.join(tmp, f"out{i}")
    if out_kind == "nested":
        out = os.path.join(out, "a", "b")
    elif out_kind == "empty_dir":
        os.makedirs(out)
    elif out_kind == "has_result":
        os.makedirs(out)
        for f in ("model.safetensors", "report.json") if rng.random() < 0.5 else ("report.json",):
            with open(os.path.join(out, f), "w") as fh:
                fh.write("old")
    elif out_kind == "file":
        with open(out, "w") as fh:
            fh.write("old")
    elif out_kind == "under_file":
        with open(out, "w") as fh:
            fh.write("old")
        out = os.path.join(out, "sub")
    elif out_kind == "empty":
        out = ""
    created_before = set(os.listdir(tmp))
    force = rng.random() < 0.35 or (clean and out_kind == "has_result")
    if out_kind != "none":
        argv += ["--out", out]
    if force:
        argv.append("--force")
    if out_kind in ("file", "under_file"):
        problems.append("regular file")
    elif out_kind == "empty":
        problems.append("--out must be")
    elif out_kind == "has_result" and not force:
        problems.append("--force")
    if not clean and rng.random() < 0.05:
        argv.append(rng.choice(("--fast", "--block-size=16", "-x")))
        problems.append("unrecognized arguments")
    if rng.random() < 0.08:
        argv.append("--progress")
    env = rng.choice((None,) * 8 + ("reference", "auto", "", "bogus", "triton", "cusparselt", "dense", "interpret"))
    if clean:
        env = rng.choice((None, None, None, "reference", "auto", "") + (("dense",) if scheme == "2:4" else ()))
    if env is None:
        monkeypatch.delenv("SPARSEKIT_BACKEND", raising=False)
    else:
        monkeypatch.setenv("SPARSEKIT_BACKEND", env)
        if env not in ("", "auto", "reference", "interpret", "triton", "cusparselt", "dense", "cuda"):
            problems.append("not a backend")
        elif env not in ("", "auto", "reference", "interpret") and env not in CPU_BACKENDS.get(scheme, ()):
            problems.append("SPARSEKIT_BACKEND")
    if divisibility and not problems:
        problems += ["does not divide"]
        static = False
    expect = "error" if problems else "ok"
    method_eff = method if method not in (None, "obs") else {"2:4": "sparsegpt", "block": "magnitude",
                                                             "int4": "gptq", "2:4+int4": "sparsegpt"}[scheme]
    prior = {}
    base = os.path.join(tmp, f"out{i}")
    if os.path.isfile(base):
        prior[base] = open(base, "rb").read()
    for root, _, files in os.walk(base):
        for f in files:
            prior[os.path.join(root, f)] = open(os.path.join(root, f), "rb").read()
    n_loads = len(loads)

    first = [p for p in problems if RANK[p] == min(RANK[q] for q in problems)] if problems else []

    def check_error(line):
        # the CLI checks in a documented order: SPARSEKIT_BACKEND, argument syntax, combinations, --out, layers
        assert any(p in line for p in first), f"names none of {first} (problems: {problems})"
        if static:
            assert len(loads) == n_loads, "the workload was loaded before the arguments were checked"
        else:
            assert loads[-1].calib.reads == 0, "calibration ran before the group size was checked"
        for p, data in prior.items():
            assert open(p, "rb").read() == data, f"{p} was modified"
        new = set(os.listdir(tmp)) - created_before
        for d in new:
            for root, _, files in os.walk(os.path.join(tmp, d)):
                assert not files, f"files left in {root}: {files}"
            if out_kind in ("new", "nested"):
                raise AssertionError(f"the directory {d} made for --out was left behind")

    def check_ok(stdout):
        rep = json.loads(stdout)
        assert rep["scheme"] == scheme and rep["method"] == method_eff, (rep["scheme"], rep["method"])
        assert math.isfinite(rep["quality"]) and rep["num_layers"] == 2
        if scheme == "block" and sparsity is not None:
            assert rep["sparsity"] == float(sparsity)
        if group is not None:
            assert rep["group_size"] == int(group)
        if out_kind != "none":
            from safetensors.torch import load_file

            saved = json.load(open(os.path.join(out, "report.json")))
            assert saved["scheme"] == scheme and saved["method"] == method_eff
            keys = load_file(os.path.join(out, "model.safetensors")).keys()
            for layer in ("0", "2"):
                for attr in KEYS[scheme]:
                    assert f"{layer}.{attr}" in keys, f"{layer}.{attr} not saved"

    case = f"cli#{i} env={env!r} {' '.join(argv)}"
    return classify(case, argv, expect, check_error, check_ok)


def test_fuzz_cli(tmp_path, monkeypatch):
    loads = []

    def load(name, **kw):
        wl = _tiny()
        loads.append(wl)
        return wl

    monkeypatch.setattr(workloads, "load_workload", load)
    rng = random.Random(SEED)
    outcomes = [_case(i, rng, str(tmp_path), loads, monkeypatch) for i in range(N_CASES)]
    counts = Counter(o.kind for o in outcomes)
    print(f"\n{len(outcomes)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    bad = [o for o in outcomes if o.kind not in ("clear-error", "correct-result")]
    assert not bad, "\n".join(f"{o.case}: {o.kind}: {o.detail}" for o in bad[:20])
    assert counts["clear-error"] and counts["correct-result"] >= 5, counts
