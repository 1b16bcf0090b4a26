"""Build a per-GPU dispatch table from measured benchmark rows.

    python -m sparsekit.ops.dispatch_build bench/results/<gpu>/sparse24_linear.csv \\
        --out sparsekit/ops/tables/<gpu-slug>.json

Input: the benchmark CSV rows (``op, case, backend, dtype, p50_ms, status``;
``case`` holds ``M=..,N=..,K=..``) of one GPU.  For every (op, dtype, N, K)
measured and every M, the chosen backend is the fastest one that is a backend
of the op *and* beat the ``dense`` row of the same case (by ``margin``);
when none did, the choice is ``dense``.  So the table never picks a path
that measured slower than dense.  Consecutive Ms with the same choice merge
into one row ``{"dtype", "min_n", "max_n", "min_k", "max_k", "max_m", "backend"}``
(``max_m`` of the last run is null: larger M keep the last choice).

Unmeasured shapes get per-dtype rows: at each measured M, the backend that
beat dense on *every* measured shape (fastest by total time), else ``dense``;
and a last catch-all row (``fallback``, default ``dense``).  Rows for cases
without a timed ``dense`` row are not produced (nothing to compare against).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from typing import Iterable, Optional, Sequence

__all__ = ["CANDIDATES", "choose", "build_op_rows", "build_table", "main"]

# benchmark backend name -> dispatch backend, per op (names not listed are peers only)
CANDIDATES = {
    "sparse24_linear": ("cuda", "triton", "cusparselt", "dense"),
    "sparse24_int8_linear": ("cuda", "triton", "dense"),
}


def _parse_case(case: str) -> dict:
    out = {}
    for part in (case or "").split(","):
        k, _, v = part.partition("=")
        try:
            out[k] = int(v)
        except ValueError:
            out[k] = v
    return out


def _time(row: dict) -> Optional[float]:
    if (row.get("status") or "ok") != "ok":
        return None
    try:
        t = float(row.get("p50_ms") or "nan")
    except ValueError:
        return None
    return t if t > 0 and math.isfinite(t) else None


def choose(times: dict, candidates: Sequence[str], margin: float = 0.0) -> Optional[str]:
    """The fastest candidate that beats ``times['dense']`` by ``margin``; ``dense`` when none does;
    None without a dense time."""
    dense = times.get("dense")
    if dense is None:
        return None
    best, best_t = "dense", dense
    for b in candidates:
        if b == "dense" or b not in times:
            continue
        t = times[b]
        if t < dense * (1.0 - margin) and t < best_t:
            best, best_t = b, t
    return best


def _runs(choices: list) -> list:
    """[(m, backend)] sorted by m -> merged rows [(max_m or None, backend)]."""
    out = []
    for i, (m, b) in enumerate(choices):
        last = i == len(choices) - 1
        if not last and choices[i + 1][1] == b:
            continue
        out.append((None if last else m, b))
    return out


def build_op_rows(rows: Iterable[dict], op: str, margin: float = 0.0, fallback: str = "dense") -> list:
    """Dispatch rows for ``op`` from benchmark CSV rows (see the module docstring)."""
    cands = CANDIDATES.get(op)
    if cands is None:
        raise ValueError(f"no candidate backends known for op {op!r}; known: {sorted(CANDIDATES)}")
    times: dict = defaultdict(dict)   # (dtype, n, k, m) -> {backend: p50}
    for r in rows:
        if r.get("op") != op or r.get("backend") not in cands:
            continue
        c = _parse_case(r.get("case", ""))
        if not all(isinstance(c.get(key), int) for key in ("M", "N", "K")):
            continue
        t = _time(r)
        if t is None:
            continue
        key = (r.get("dtype"), c["N"], c["K"], c["M"])
        prev = times[key].get(r["backend"])
        times[key][r["backend"]] = t if prev is None else min(prev, t)
    per_shape: dict = defaultdict(list)  # (dtype, n, k) -> [(m, choice)]
    per_m: dict = defaultdict(list)      # (dtype, m) -> [times dict]
    for (dt, n, k, m), tb in sorted(times.items(), key=lambda kv: (str(kv[0][0]),) + kv[0][1:]):
        ch = choose(tb, cands, margin)
        if ch is None:
            continue
        per_shape[(dt, n, k)].append((m, ch))
        per_m[(dt, m)].append(tb)
    out = []
    for (dt, n, k), choices in sorted(per_shape.items(), key=lambda kv: (str(kv[0][0]), kv[0][1], kv[0][2])):
        choices.sort()
        for max_m, b in _runs(choices):
            out.append({"dtype": dt, "min_n": n, "max_n": n, "min_k": k, "max_k": k, "max_m": max_m, "backend": b})
    # generic rows per dtype: a backend must beat dense on every measured shape at that M
    by_dtype: dict = defaultdict(list)
    for (dt, m), tbs in per_m.items():
        ok = []
        for b in cands:
            if b == "dense":
                continue
            if all(b in tb and tb[b] < tb["dense"] * (1.0 - margin) for tb in tbs):
                ok.append((sum(tb[b] for tb in tbs), b))
        by_dtype[dt].append((m, min(ok)[1] if ok else "dense"))
    for dt in sorted(by_dtype, key=str):
        choices = sorted(by_dtype[dt])
        for max_m, b in _runs(choices):
            out.append({"dtype": dt, "max_m": max_m, "backend": b})
    out.append({"max_m": None, "backend": fallback})
    return out


def build_table(rows: Iterable[dict], ops: Optional[Sequence[str]] = None, margin: float = 0.0,
                gpu: str = "") -> dict:
    """``{op: rows}`` for every op in ``ops`` (default: every op with candidates present in ``rows``)."""
    rows = list(rows)
    present = {r.get("op") for r in rows}
    ops = [o for o in (ops or sorted(CANDIDATES)) if o in present]
    table = {"_comment": "built by sparsekit.ops.dispatch_build from measured benchmark rows"
                         + (f" on {gpu}" if gpu else "") + f"; margin {margin:g} over dense"}
    for op in ops:
        table[op] = build_op_rows(rows, op, margin)
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparsekit.ops.dispatch_build", description=__doc__.split("\n")[0])
    ap.add_argument("csv", nargs="+", help="benchmark CSV files of one GPU")
    ap.add_argument("--out", help="output JSON (default: stdout)")
    ap.add_argument("--margin", type=float, default=0.02, help="fraction a backend must beat dense by (default 0.02)")
    ap.add_argument("--op", action="append", help="ops to include (default: all known)")
    args = ap.parse_args(argv)
    rows: list = []
    gpu = ""
    for path in args.csv:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                rows.append(r)
                gpu = gpu or r.get("gpu", "")
    table = build_table(rows, args.op, args.margin, gpu)
    text = json.dumps(table, indent=1) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
