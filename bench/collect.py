"""File a GPU run's outputs under ``bench/results/<gpu-slug>/``.

    python -m sparsekit.bench.collect DIR [--results bench/results]

``DIR`` is where a run wrote its files (e.g. the ``$OUT`` of
``scripts/gpu_check.sh`` as fetched from the device machine).  Each
``<op>.csv`` there is appended (header once) to
``<results>/<gpu-slug>/<op>.csv``, the slug taken from the rows' ``gpu``
column; the run's ``<op>_<stamp>.md`` / ``.png`` are copied beside it.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys

from .harness import COLUMNS, RESULTS_DIR, gpu_slug


def collect(src: str, results: str = RESULTS_DIR) -> list[str]:
    written: list[str] = []
    for name in sorted(os.listdir(src)):
        if not name.endswith(".csv"):
            continue
        op = name[:-4]
        with open(os.path.join(src, name), newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = list(reader.fieldnames or COLUMNS)
        if not rows:
            continue
        by_gpu: dict = {}
        for r in rows:
            by_gpu.setdefault(gpu_slug(r.get("gpu") or "unknown"), []).append(r)
        for slug, grp in by_gpu.items():
            dst_dir = os.path.join(results, slug)
            os.makedirs(dst_dir, exist_ok=True)
            dst = os.path.join(dst_dir, name)
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
                w.writerows(grp)
            written.append(dst)
            for extra in sorted(os.listdir(src)):
                if extra.startswith(op + "_") and extra.endswith((".md", ".png")):
                    shutil.copy2(os.path.join(src, extra), os.path.join(dst_dir, extra))
                    written.append(os.path.join(dst_dir, extra))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsekit.bench.collect")
    p.add_argument("src", help="directory holding a run's <op>.csv / .md / .png")
    p.add_argument("--results", default=RESULTS_DIR, help="results root (default bench/results)")
    a = p.parse_args(argv)
    paths = collect(a.src, a.results)
    for path in paths:
        print(path)
    if not paths:
        print(f"no CSV results found in {a.src}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
