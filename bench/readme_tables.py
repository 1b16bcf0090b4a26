"""The README's result tables, generated from the committed result files (one source of truth).

``python -m sparsekit.bench.readme_tables --write README.md`` rewrites each
block between ``<!-- NAME:start ... -->`` and ``<!-- NAME:end -->`` from its
file; ``--check README.md`` exits 1 if any block differs (a test runs it).

* ``quality-table``: ``bench/results/cpu/quality.csv`` (``sparsekit quality --out bench/results/cpu``);
* ``cpu-speed-table``: ``bench/results/cpu/cpu_speed.csv`` (``sparsekit bench --cpu-speed``).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "cpu")


def _rows(path: str) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def quality_block(results: str = RESULTS) -> str:
    from .quality import format_table

    return format_table(_rows(os.path.join(results, "quality.csv")))


def cpu_speed_block(results: str = RESULTS) -> str:
    """Ratio dense / compressed per scheme (rows) and shape x M (columns)."""
    rows = _rows(os.path.join(results, "cpu_speed.csv"))
    cols = []
    for r in rows:
        c = (int(r["N"]), int(r["K"]), int(r["M"]))
        if c not in cols:
            cols.append(c)
    schemes = []
    for r in rows:
        if r["scheme"] not in schemes:
            schemes.append(r["scheme"])
    ratio = {(r["scheme"], int(r["N"]), int(r["K"]), int(r["M"])): float(r["ratio"]) for r in rows}
    head = "| scheme | " + " | ".join(f"{n}x{k} M={m}" for n, k, m in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for s in schemes:
        cells = [f"{ratio[(s, n, k, m)]:.2f}" if (s, n, k, m) in ratio else "" for n, k, m in cols]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


BLOCKS = {"quality-table": quality_block, "cpu-speed-table": cpu_speed_block}


def render(text: str, results: str = RESULTS) -> str:
    """``text`` with every generated block replaced by its current content."""
    for name, make in BLOCKS.items():
        pat = re.compile(rf"(<!-- {name}:start[^\n]*-->\n)(.*?)(<!-- {name}:end -->)", re.S)
        if not pat.search(text):
            raise ValueError(f"no <!-- {name}:start --> ... <!-- {name}:end --> block in the README")
        body = make(results)
        text = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text, count=1)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsekit.bench.readme_tables", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", metavar="README", help="rewrite the generated blocks of this file")
    g.add_argument("--check", metavar="README", help="exit 1 if a generated block differs from its result file")
    p.add_argument("--results", default=RESULTS, help="directory of quality.csv / cpu_speed.csv")
    args = p.parse_args(argv)
    path = args.write or args.check
    with open(path) as f:
        text = f.read()
    new = render(text, args.results)
    if args.write:
        if new != text:
            with open(path, "w") as f:
                f.write(new)
        print(f"{path}: generated tables {'rewritten' if new != text else 'already current'}")
        return 0
    if new != text:
        print(f"{path}: a generated table differs from {args.results}; run python -m sparsekit.bench.readme_tables "
              f"--write {path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
