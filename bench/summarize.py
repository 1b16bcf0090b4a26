"""Compact view of benchmark CSVs: one line per (case, dtype), p50 of dense and
speedup vs dense of every other backend.

    python -m sparsekit.bench.summarize bench/results/nvidia-h100-80gb-hbm3/sparse24_linear.csv [--last]

``--last`` keeps only the rows of the newest run in the file (same date and
commit as its last row).
"""
from __future__ import annotations

import argparse
import sys

from .harness import read_csv


def _f(v: str):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def summarize(path: str, last: bool = False, file=None) -> int:
    rows = read_csv(path)
    if not rows:
        print(f"{path}: no rows", file=file)
        return 0
    if last:
        key = (rows[-1].get("date"), rows[-1].get("commit"))
        rows = [r for r in rows if (r.get("date"), r.get("commit")) == key]
    backends: list[str] = []
    groups: dict = {}
    for r in rows:
        if r["backend"] not in backends:
            backends.append(r["backend"])
        groups.setdefault((r["op"], r["case"], r["dtype"]), {})[r["backend"]] = r
    others = [b for b in backends if b != "dense"]
    r0 = rows[-1]
    print(f"{path}: {len(rows)} rows | {r0.get('gpu')} | commit {r0.get('commit')} | {r0.get('date')}", file=file)
    print("speedup vs dense (p50); '-' not run, 'skip'/'FAIL' as recorded; auto's choice in ()", file=file)
    head = f"{'case':<24} {'dtype':<5} {'dense ms':>9} " + " ".join(f"{b[:14]:>14}" for b in others)
    print(head, file=file)
    for (op, case, dtype), g in groups.items():
        d = g.get("dense")
        dms = _f(d["p50_ms"]) if d else None
        cells = []
        for b in others:
            r = g.get(b)
            if r is None:
                cells.append("-")
            elif r.get("status") != "ok":
                cells.append("FAIL" if r.get("status") == "fail" else "skip")
            else:
                s = _f(r.get("speedup_vs_dense"))
                txt = "?" if s is None else f"{s:.2f}x"
                if r.get("chosen_backend"):
                    txt += f"({r['chosen_backend'][:3]})"
                cells.append(txt)
        print(f"{case:<24} {dtype:<5} {('%.4f' % dms) if dms else '-':>9} "
              + " ".join(f"{c:>14}" for c in cells), file=file)
    fails = [r for r in rows if r.get("status") == "fail"]
    for r in fails:
        print(f"FAIL {r['case']} {r['dtype']} {r['backend']}: {r.get('note', '')}", file=file)
    return 1 if fails else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsekit.bench.summarize")
    p.add_argument("csv", nargs="+")
    p.add_argument("--last", action="store_true", help="only the newest run in each file")
    a = p.parse_args(argv)
    rc = 0
    for path in a.csv:
        rc = max(rc, summarize(path, a.last))
    return rc


if __name__ == "__main__":
    sys.exit(main())
