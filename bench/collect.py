"""File a GPU run's outputs under ``bench/results/<gpu-slug>/`` (and ship its dispatch table).

    python -m sparsekit.bench.collect DIR [--results bench/results] [--table]

``DIR`` is where a run wrote its files: the ``$OUT`` of ``scripts/gpu_check.sh`` as fetched from
the device machine, or a ``sparsekit bench --out`` directory.

* ``bench.csv`` (gpu-check: every op in one file) and ``<op>.csv`` (``sparsekit bench``): rows are
  appended (header once, widened if columns were added) to ``<results>/<gpu-slug>/<op>.csv``,
  split by the ``op`` column, the slug taken from the rows' ``gpu`` column.  Rows of CPU dry runs
  (``gpu`` "cpu ..." or the synthetic rows of a dry run) are not results and are left out
  (``--allow-cpu`` keeps them).
* gpu-check's per-run files are copied beside them with the run's stamp
  (``<date>-<commit>``): ``bench.md`` -> ``gpu_check_<stamp>.md``, ``summary.txt`` ->
  ``gpu_check_<stamp>_summary.txt``, ``smoke.txt`` -> ``gpu_check_<stamp>_smoke.txt``,
  ``sanitize.log`` -> ``gpu_check_<stamp>_sanitize.log``, ``dispatch_table.json`` ->
  ``gpu_check_<stamp>_dispatch_table.json``, and the plots ``<op>_<stamp>.png`` from
  ``logs.tar.gz``; ``sparsekit bench``'s ``<op>_<stamp>.md`` / ``.png`` as they are.
* ``--table``: also install ``dispatch_table.json`` as ``sparsekit/ops/tables/<gpu-slug>.json``
  (what dispatch loads on that GPU), after checking that every op's rows name known backends
  and end with a catch-all row; a table built from synthetic (dry-run) rows is refused.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tarfile

from .harness import COLUMNS, REPO_ROOT, RESULTS_DIR, gpu_slug, run_stamp

TABLES_DIR = os.path.join(REPO_ROOT, "sparsekit", "ops", "tables")
RUN_FILES = {"bench.md": "gpu_check_{stamp}.md", "summary.txt": "gpu_check_{stamp}_summary.txt",
             "smoke.txt": "gpu_check_{stamp}_smoke.txt", "sanitize.log": "gpu_check_{stamp}_sanitize.log",
             "dispatch_table.json": "gpu_check_{stamp}_dispatch_table.json"}


def _not_a_result(row: dict) -> bool:
    g = (row.get("gpu") or "").strip().lower()
    return g.startswith("cpu") or g.startswith("synthetic") or not g


def _append(dst: str, rows: list[dict], fields: list[str]) -> None:
    exists = os.path.exists(dst) and os.path.getsize(dst) > 0
    header = fields
    if exists:
        with open(dst, newline="") as f:
            old_header = next(csv.reader(f), None) or fields
        missing = [c for c in fields if c not in old_header]
        if missing:  # widen the committed file once
            with open(dst, newline="") as f:
                old_rows = list(csv.DictReader(f))
            header = old_header + missing
            with open(dst, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=header, restval="")
                w.writeheader()
                w.writerows(old_rows)
        else:
            header = old_header
    with open(dst, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, restval="", extrasaction="ignore")
        if not exists:
            w.writeheader()
        w.writerows(rows)


def check_table(table: dict) -> list[str]:
    """Problems with a dispatch table (empty list: fine to ship)."""
    from sparsekit.ops.dispatch import ALL_BACKENDS

    problems = []
    comment = str(table.get("_comment", "")).lower()
    if "synthetic" in comment or "dry run" in comment or " on cpu" in comment:
        problems.append(f"built from non-measured rows ({table.get('_comment')!r})")
    ops = [k for k in table if not k.startswith("_")]
    if not ops:
        problems.append("no op in the table")
    for op in ops:
        rows = table[op]
        if not isinstance(rows, list) or not rows:
            problems.append(f"{op}: no rows")
            continue
        for r in rows:
            if not isinstance(r, dict) or r.get("backend") not in ALL_BACKENDS:
                problems.append(f"{op}: row {r!r} names no known backend ({', '.join(ALL_BACKENDS)})")
        last = rows[-1]
        if any(last.get(k) is not None for k in ("max_m", "min_m", "min_n", "max_n", "min_k", "max_k", "dtype")):
            problems.append(f"{op}: the last row {last!r} is not a catch-all")
    return problems


def collect(src: str, results: str = RESULTS_DIR, table: bool = False, tables_dir: str = TABLES_DIR,
            allow_cpu: bool = False, log=print) -> list[str]:
    written: list[str] = []
    names = sorted(os.listdir(src))
    slugs: set = set()
    stamp = None
    dropped = 0
    for name in names:
        if not name.endswith(".csv"):
            continue
        with open(os.path.join(src, name), newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = list(reader.fieldnames or COLUMNS)
        keep = [r for r in rows if allow_cpu or not _not_a_result(r)]
        dropped += len(rows) - len(keep)
        by_dst: dict = {}
        for r in keep:
            slug = gpu_slug(r.get("gpu") or "unknown")
            op = r.get("op") or name[:-4]
            by_dst.setdefault((slug, op), []).append(r)
            slugs.add(slug)
            stamp = stamp or run_stamp(r.get("date") or None, r.get("commit") or None)
        for (slug, op), grp in sorted(by_dst.items()):
            dst_dir = os.path.join(results, slug)
            os.makedirs(dst_dir, exist_ok=True)
            dst = os.path.join(dst_dir, f"{op}.csv")
            _append(dst, grp, fields)
            written.append(dst)
        if name != "bench.csv":     # sparsekit bench's own markdown / plots of this op
            for extra in names:
                if extra.startswith(name[:-4] + "_") and extra.endswith((".md", ".png")):
                    for slug in {gpu_slug(r.get("gpu") or "unknown") for r in keep}:
                        shutil.copy2(os.path.join(src, extra), os.path.join(results, slug, extra))
                        written.append(os.path.join(results, slug, extra))
    if dropped:
        log(f"collect: left out {dropped} row(s) of CPU dry runs / synthetic timings (not results)")
    if len(slugs) > 1:
        log(f"collect: rows of several GPUs ({', '.join(sorted(slugs))}); the run's files go to each")
    for slug in sorted(slugs):
        dst_dir = os.path.join(results, slug)
        for name, pattern in RUN_FILES.items():
            if name in names:
                dst = os.path.join(dst_dir, pattern.format(stamp=stamp))
                shutil.copy2(os.path.join(src, name), dst)
                written.append(dst)
        tar = os.path.join(src, "logs.tar.gz")
        if os.path.exists(tar):
            with tarfile.open(tar) as t:
                for m in t.getmembers():
                    base = os.path.basename(m.name)
                    if m.isfile() and base == m.name and base.endswith(".png") and stamp and stamp in base:
                        data = t.extractfile(m).read()
                        dst = os.path.join(dst_dir, base)
                        with open(dst, "wb") as f:
                            f.write(data)
                        written.append(dst)
    if table:
        path = os.path.join(src, "dispatch_table.json")
        if not os.path.exists(path):
            raise SystemExit(f"collect --table: no dispatch_table.json in {src}")
        if len(slugs) != 1:
            raise SystemExit(f"collect --table: need the rows of exactly one GPU, found {sorted(slugs) or 'none'}")
        with open(path) as f:
            tbl = json.load(f)
        problems = check_table(tbl)
        if problems:
            raise SystemExit("collect --table: not shipping the table:\n  " + "\n  ".join(problems))
        dst = os.path.join(tables_dir, f"{next(iter(slugs))}.json")
        with open(dst, "w") as f:
            json.dump(tbl, f, indent=1)
            f.write("\n")
        written.append(dst)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsekit.bench.collect")
    p.add_argument("src", help="directory holding a run's files (gpu-check's $OUT, or sparsekit bench --out)")
    p.add_argument("--results", default=RESULTS_DIR, help="results root (default bench/results)")
    p.add_argument("--table", action="store_true",
                   help="also install dispatch_table.json as sparsekit/ops/tables/<gpu-slug>.json")
    p.add_argument("--tables-dir", default=TABLES_DIR, help=argparse.SUPPRESS)
    p.add_argument("--allow-cpu", action="store_true", help="keep rows of CPU dry runs (for testing collect)")
    a = p.parse_args(argv)
    paths = collect(a.src, a.results, a.table, a.tables_dir, a.allow_cpu)
    for path in paths:
        print(path)
    if not paths:
        print(f"no GPU results found in {a.src}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
