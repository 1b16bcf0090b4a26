"""Adversarial-case harness: classify each case as a clear error or a correct result.

A :class:`Case` is a zero-argument callable plus what it should do:

* ``expect="error"``: the input is invalid; the case passes when it raises a
  ``ValueError`` / ``TypeError`` whose message names the problem (contains one
  of ``names``, case-insensitive);
* ``expect="result"``: the input is valid; the case passes when it returns and
  ``check(result)`` (comparison with a float64 dense reference) holds;
* ``expect="any"``: either of the two.

:func:`classify` returns an :class:`Outcome` whose ``kind`` is one of

``clear-error`` / ``correct-result``   passes
``silent-wrong``      a result for invalid input, or a result that fails its check
``unclear-error``     any other exception, or a ValueError/TypeError whose message
                      does not name the problem, or an error for valid input
``crash``             the process died (only seen by :func:`run_isolated`)

Crash-prone cases (crafted indices handed to interpreted kernels, ...) run in a
child process through :func:`run_isolated`: the child announces each case before
running it, so if it dies the parent records a ``crash`` for that case and
restarts the child on the remaining ones.  Case lists are built by a factory
function in a module file, deterministically (seeded), so parent and child see
the same cases.

The helpers at the end compare outputs with float64 references: shapes and
dtypes equal, the same elements non-finite, and a relative-norm error bound on
the finite elements.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import traceback
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

__all__ = ["Case", "Outcome", "classify", "run_all", "run_isolated", "summarize", "assert_no_failures",
           "suite_tests", "print_report", "close_to", "PASS_KINDS", "FAIL_KINDS", "tol_for",
           "structural_block_linear64"]

PASS_KINDS = ("clear-error", "correct-result")
FAIL_KINDS = ("crash", "silent-wrong", "unclear-error")


@dataclasses.dataclass
class Case:
    name: str
    run: Callable[[], Any]
    expect: str = "result"                       # "error" | "result" | "any"
    check: Optional[Callable[[Any], None]] = None
    names: Sequence[str] = ()                    # an error message must contain one of these
    crash_prone: bool = False

    def __post_init__(self):
        if self.expect not in ("error", "result", "any"):
            raise ValueError(f"expect must be 'error', 'result' or 'any', got {self.expect!r}")
        if self.expect != "result" and not self.names:
            raise ValueError(f"case {self.name}: an error case needs names (words a clear message contains)")


@dataclasses.dataclass
class Outcome:
    name: str
    kind: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.kind in PASS_KINDS


def _names_problem(msg: str, names: Iterable[str]) -> bool:
    low = msg.lower()
    return len(msg) >= 10 and any(n.lower() in low for n in names)


def classify(case: Case) -> Outcome:
    """Run one case in this process and classify it."""
    try:
        result = case.run()
    except (ValueError, TypeError) as e:
        msg = f"{type(e).__name__}: {e}"
        if case.expect == "result":
            return Outcome(case.name, "unclear-error", f"error for valid input: {msg[:400]}")
        if not _names_problem(str(e), case.names):
            return Outcome(case.name, "unclear-error", f"message does not name {list(case.names)}: {msg[:400]}")
        return Outcome(case.name, "clear-error", msg[:200])
    except Exception as e:          # noqa: BLE001 - classifying every exception is the point
        tb = traceback.format_exc(limit=3)
        return Outcome(case.name, "unclear-error", f"{type(e).__name__}: {str(e)[:300]} | {tb[-300:]}")
    if case.expect == "error":
        return Outcome(case.name, "silent-wrong", f"returned {_describe(result)} for invalid input")
    if case.check is not None:
        try:
            case.check(result)
        except AssertionError as e:
            return Outcome(case.name, "silent-wrong", f"wrong result: {str(e)[:400]}")
        except Exception as e:      # noqa: BLE001
            return Outcome(case.name, "unclear-error", f"check raised {type(e).__name__}: {str(e)[:300]}")
    return Outcome(case.name, "correct-result", "")


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a tensor {tuple(v.shape)} {v.dtype}"
    if isinstance(v, (tuple, list)):
        return f"a {type(v).__name__} of {len(v)}"
    return type(v).__name__


def run_all(cases: Sequence[Case]) -> list:
    return [classify(c) for c in cases]


# --------------------------------------------------------------------------- isolated (child process) runs
def _load_module(path: str):
    name = "_fuzz_cases_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec.loader.exec_module(mod)
    return mod


def _child_main(path: str, factory: str, indices: list) -> None:
    cases = getattr(_load_module(path), factory)()
    for i in indices:
        print(f"START {i}", flush=True)
        out = classify(cases[i])
        print("DONE " + json.dumps({"i": i, "kind": out.kind, "detail": out.detail}), flush=True)


def run_isolated(path: str, factory: str, indices: Optional[Sequence[int]] = None, timeout: float = 600.0,
                 names: Optional[Sequence[str]] = None) -> list:
    """Classify the cases ``factory()`` of the module file ``path`` builds (all, or ``indices``) in
    child processes.  A case during which the child dies (signal, abort, non-zero exit, timeout)
    is a ``crash``; the remaining cases then run in a fresh child."""
    if indices is None:
        if names is None:
            raise ValueError("give indices or names")
        indices = list(range(len(names)))
    todo = list(indices)
    results: dict = {}
    env = dict(os.environ)
    env.setdefault("SPARSEKIT_NO_CUDA_EXT", "1")
    while todo:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", path, factory, *map(str, todo)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            stderr, rc = "timeout", "timeout"
        started = None
        for line in stdout.splitlines():
            if line.startswith("START "):
                started = int(line.split()[1])
            elif line.startswith("DONE "):
                d = json.loads(line[5:])
                results[d["i"]] = (d["kind"], d["detail"])
                started = None
        progressed = any(i in results for i in todo)
        if started is not None:
            results[started] = ("crash", f"child died while running it (exit {rc}): {stderr[-500:]}")
        elif not progressed:
            # the child died outside any case (import error, ...): the remaining cases fail
            for i in todo:
                results[i] = ("crash", f"child died outside a case (exit {rc}): {stderr[-500:]}")
        todo = [i for i in todo if i not in results]
    label = names if names is not None else None
    return [Outcome(label[i] if label else str(i), *results[i]) for i in indices]


def summarize(outcomes: Sequence[Outcome]) -> dict:
    counts = {k: 0 for k in PASS_KINDS + FAIL_KINDS}
    for o in outcomes:
        counts[o.kind] = counts.get(o.kind, 0) + 1
    return counts


def assert_no_failures(outcomes: Sequence[Outcome], what: str = "fuzz") -> None:
    bad = [o for o in outcomes if not o.ok]
    if bad:
        lines = "\n".join(f"  [{o.kind}] {o.name}: {o.detail}" for o in bad[:40])
        raise AssertionError(f"{what}: {len(bad)} of {len(outcomes)} cases failed {summarize(outcomes)}\n{lines}")


# --------------------------------------------------------------------------- a suite's pytest tests
def suite_tests(path: str, factory: str, cases: Sequence[Case], min_count: int, what: str) -> tuple:
    """The pytest tests of the suite ``cases``, built by the function ``factory`` of the module file ``path``:
    ``(test_case_count, test_case, test_crash_prone_cases_in_a_child_process)`` -- the suite holds at least
    ``min_count`` cases; each case that is not crash-prone is classified in this process (one test a case);
    the crash-prone ones are classified in child processes (:func:`run_isolated`), ``what`` naming them in
    the failure message.  The module assigns them to its own names of the same spelling, for pytest to
    collect."""
    import pytest

    in_process = [c for c in cases if not c.crash_prone]
    isolated = [i for i, c in enumerate(cases) if c.crash_prone]

    def test_case_count():
        assert len(cases) >= min_count, len(cases)

    @pytest.mark.parametrize("case", in_process, ids=[c.name for c in in_process])
    def test_case(case):
        out = classify(case)
        assert out.ok, f"[{out.kind}] {out.detail}"

    def test_crash_prone_cases_in_a_child_process():
        outs = run_isolated(path, factory, isolated, names=[c.name for c in cases])
        assert len(outs) == len(isolated)
        assert_no_failures(outs, what)

    return test_case_count, test_case, test_crash_prone_cases_in_a_child_process


def print_report(cases: Sequence[Case]) -> None:
    """Classify every case in this process; print the counts per kind and each failing case."""
    outs = run_all(cases)
    print(summarize(outs))
    for o in outs:
        if not o.ok:
            print(o.kind, o.name, o.detail)


# --------------------------------------------------------------------------- comparisons with float64 references
_TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def tol_for(dtype: torch.dtype) -> float:
    return _TOL[dtype]


def close_to(ref: torch.Tensor, dtype: Optional[torch.dtype] = None, tol: Optional[float] = None,
             what: str = "output") -> Callable[[torch.Tensor], None]:
    """A check: the result has ``ref``'s shape (and ``dtype``), exactly the elements that are
    non-finite in the float64 reference are non-finite, and the finite elements are within a
    relative-norm ``tol`` of it (default by dtype)."""

    def check(out):
        assert isinstance(out, torch.Tensor), f"{what}: expected a tensor, got {type(out).__name__}"
        assert tuple(out.shape) == tuple(ref.shape), f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        if dtype is not None:
            assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
        o = out.detach().to(torch.float64).cpu()
        r = ref.detach().to(torch.float64).cpu()
        fo, fr = torch.isfinite(o), torch.isfinite(r)
        if not torch.equal(fo, fr):
            idx = (fo != fr).nonzero()[0].tolist()
            raise AssertionError(f"{what}: non-finite pattern differs from the float64 reference at {idx} "
                                 f"(got {o[tuple(idx)].item()}, reference {r[tuple(idx)].item()})")
        t = tol if tol is not None else tol_for(dtype or out.dtype)
        if fr.any():
            num = torch.linalg.vector_norm(o[fr] - r[fr]).item()
            den = torch.linalg.vector_norm(r[fr]).item()
            err = num / den if den > 0 else (0.0 if num == 0 else math.inf)
            assert err <= t, f"{what}: relative error {err:.3e} > {t:.1e} against the float64 reference"

    return check


def structural_block_linear64(x: torch.Tensor, w, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """float64 ``x @ W^T + bias`` for a :class:`~sparsekit.formats.BlockSparseWeight`, summed over the
    kept blocks only: dropped blocks are never read (a NaN/Inf in ``x`` reaches exactly the outputs
    whose kept blocks read its column), which is dense ``F.linear`` for finite inputs."""
    import torch.nn.functional as F

    n, k = w.shape
    bm, bk = w.block_size
    nb, kb = w.grid
    x2 = x.reshape(-1, k).double()
    xp = F.pad(x2, (0, kb * bk - k))
    y = torch.zeros(x2.shape[0], nb * bm, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(nb), (w.crow[1:] - w.crow[:-1]).long())
    for i in range(w.nnzb):
        r, c = int(rows[i]), int(w.col[i])
        y[:, r * bm:(r + 1) * bm] += xp[:, c * bk:(c + 1) * bk] @ w.blocks[i].detach().double().t()
    y = y[:, :n]
    if bias is not None:
        y = y + bias.detach().double()
    return y.reshape(*x.shape[:-1], n)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        _child_main(sys.argv[2], sys.argv[3], [int(a) for a in sys.argv[4:]])
    else:
        print("usage: harness.py --child <cases.py> <factory> <index>...", file=sys.stderr)
        sys.exit(2)
