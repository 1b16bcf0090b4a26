"""Command line for the benchmarks: ``sparsekit bench`` / ``python -m sparsekit.bench``.

With a CUDA device: times every selected op's cases (peers in the same run)
and writes, per op, ``<op>.csv`` (appended), ``<op>_<stamp>.md`` and
``<op>_<stamp>.png`` into ``--out`` (default ``bench/results/<gpu-slug>/``).

Without one: runs each op's CPU correctness sweep (Triton interpreter and
reference backends against float64 math) instead, prints a table, and exits
non-zero if any check fails.

Exit status: 0 all good; 1 a sparsekit backend (or dense) failed its check;
2 bad arguments.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from . import harness

CPU_MESSAGE = "No CUDA device: GPU timings skipped; ran the CPU correctness sweep (Triton interpreter) instead"


def _known_ops() -> dict:
    from . import block_sparse, draft_attention, int4, sparse24, sparse24_int4, triple_gate_conv
    return {sparse24.OP: sparse24, block_sparse.OP: block_sparse, int4.OP: int4, sparse24_int4.OP: sparse24_int4,
            triple_gate_conv.OP: triple_gate_conv, draft_attention.OP: draft_attention}


def _parse_shapes(s: str) -> list[tuple[int, int]]:
    out = []
    for part in s.replace(" ", "").split(","):
        if not part:
            continue
        try:
            n, k = part.lower().split("x")
            out.append((int(n), int(k)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad shape {part!r}: expected NxK, e.g. 4096x4096") from None
    if not out:
        raise argparse.ArgumentTypeError("no shapes given")
    return out


def _parse_ints(s: str) -> list[int]:
    try:
        out = [int(v) for v in s.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad integer list {s!r}: expected e.g. 1,16,256") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"bad integer list {s!r}: values must be >= 1")
    return out


def _parse_dtypes(s: str) -> list[str]:
    if s in ("both", "all"):
        return ["fp16", "bf16"]
    out = [v for v in s.replace(" ", "").split(",") if v]
    for v in out:
        if v not in ("fp16", "bf16", "fp32"):
            raise argparse.ArgumentTypeError(f"unknown dtype {v!r}: choose from fp16, bf16, fp32 (or 'both')")
    return out


def build_parser() -> argparse.ArgumentParser:
    ops = sorted(_known_ops())
    p = argparse.ArgumentParser(
        prog="sparsekit bench",
        description="sparsekit microbenchmarks (GPU timings with peers; CPU correctness sweep without CUDA).")
    p.add_argument("--ops", nargs="+", choices=ops, default=ops, metavar="OP",
                   help=f"ops to run (default: all: {', '.join(ops)})")
    p.add_argument("--quick", action="store_true",
                   help="a reduced sweep (fewer shapes and M; shorter timing)")
    p.add_argument("--dtype", type=_parse_dtypes, default=None,
                   help="GPU: fp16 (default), bf16, 'fp16,bf16' or 'both'; CPU: restricts the sweep's dtypes")
    p.add_argument("--shapes", type=_parse_shapes, default=None,
                   help="shapes AxB, comma separated: linear ops NxK (default 4096x4096,11008x4096,4096x11008,8192x8192); "
                        "triple_gate_conv2d CxH (W = H); draft_attention HxW latent (21 frames)")
    p.add_argument("--m", type=_parse_ints, default=None, help="batch sizes M, comma separated")
    p.add_argument("--backends", nargs="+", default=None, help="subset of backends to time")
    p.add_argument("--out", default=None,
                   help="directory for CSV / markdown / plot (default bench/results/<gpu-slug>/)")
    p.add_argument("--rep-ms", type=float, default=None, help="do_bench rep per timing in ms (default 50, quick 25)")
    p.add_argument("--warmup-ms", type=float, default=None, help="do_bench warmup in ms (default 10, quick 5)")
    p.add_argument("--no-plot", action="store_true", help="skip the matplotlib plot")
    p.add_argument("--no-ceilings", action="store_true",
                   help="do not measure copy bandwidth / matmul peak (roofline columns stay empty)")
    p.add_argument("--cpu", action="store_true", help="run the CPU correctness sweep even if CUDA is available")
    p.add_argument("--no-quality", action="store_true",
                   help="skip the real-model compression quality table printed at the end (bench/quality.py)")
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="exercise the timing path on CPU tensors (host clock, interpreter/reference backends, "
                        "small shapes) and write its CSV/markdown/plot: a check of the harness, not a benchmark")
    return p


def _on_sigterm(signum, frame):  # so `timeout` still leaves the markdown/plot of finished cases
    raise KeyboardInterrupt(f"signal {signum}")


def _run_cpu(args, mods) -> int:
    print(CPU_MESSAGE, flush=True)
    ok_all = True
    for name in args.ops:
        mod = mods[name]
        kw = {}
        if args.dtype:
            kw["dtypes"] = args.dtype
        t0 = time.time()
        rows, ok = mod.cpu_sweep(quick=args.quick, **kw)
        print(f"\n{name}: CPU correctness sweep ({len(rows)} checks, {time.time() - t0:.1f} s)")
        mod.print_cpu_table(rows)
        nfail = sum(r.status != "ok" for r in rows)
        print(f"{name}: {'all passed' if ok else f'{nfail} FAILED'}")
        ok_all &= ok
    print("\n" + CPU_MESSAGE)
    return 0 if ok_all else 1


def _run_gpu(args, mods) -> int:
    dry = args.dry_run_cpu
    gpu = "cpu (dry run)" if dry else harness.gpu_name()
    if dry and not args.out:
        import tempfile
        args.out = tempfile.mkdtemp(prefix="sparsekit-bench-dry-")
    out_dir = args.out or harness.default_out_dir(gpu)
    tv, trv = harness.versions()
    ctx = dict(gpu=gpu, commit=harness.git_commit(), date=harness.now_iso(), torch=tv, triton=trv)
    print(f"[bench] GPU {gpu} | torch {tv} | triton {trv} | commit {ctx['commit']} | L2 "
          f"{harness.l2_bytes() / 2**20:.0f} MiB | out {out_dir}", flush=True)
    if not args.no_ceilings and not dry:
        try:
            bw, peak = harness.measure_ceilings()
            ctx["ceilings"] = (bw, peak)
            print(f"[bench] measured ceilings: copy {bw:.2f} TB/s (read+write), fp16 matmul {peak:.0f} TFLOP/s",
                  flush=True)
        except Exception as e:
            print(f"[bench] could not measure ceilings: {type(e).__name__}: {e}")
    rep = args.rep_ms if args.rep_ms is not None else (25.0 if args.quick else 50.0)
    warm = args.warmup_ms if args.warmup_ms is not None else (5.0 if args.quick else 10.0)
    rc = 0
    written: list[str] = []
    for name in args.ops:
        mod = mods[name]
        shapes = args.shapes or (mod.QUICK_SHAPES if args.quick else mod.SHAPES)
        ms = args.m or (mod.QUICK_MS if args.quick else mod.MS)
        dtypes = args.dtype or list(getattr(mod, "DEFAULT_DTYPES", ["fp16"]))
        backends = args.backends or list(mod.BACKENDS)
        extra = {}
        if dry:
            shapes = args.shapes or mod.CPU_QUICK_SHAPES
            ms = args.m or mod.CPU_QUICK_MS
            backends = args.backends or list(mod.CPU_TIMING_BACKENDS)
            extra = dict(device="cpu", timer=harness.time_rotating_cpu)
        csv_path = os.path.join(out_dir, f"{name}.csv")
        rows: list = []

        def on_rows(group, _csv=csv_path, _rows=rows):
            harness.write_csv(group, _csv)   # appended as each group finishes
            _rows.extend(group)

        t0 = time.time()
        interrupted = None
        try:
            mod.run_gpu(shapes=shapes, ms=ms, dtypes=dtypes, backends=backends, warmup_ms=warm,
                        rep_ms=rep, ctx=ctx, on_rows=on_rows, **extra)
        except KeyboardInterrupt as e:
            interrupted = e
            print(f"[bench] {name}: interrupted ({e}); writing the {len(rows)} finished rows", flush=True)
        if rows:
            stamp = harness.run_stamp(ctx["date"], ctx["commit"])
            title = f"{name} on {gpu} ({stamp})"
            md = harness.write_markdown(rows, os.path.join(out_dir, f"{name}_{stamp}.md"), title)
            written += [csv_path, md]
            if not args.no_plot:
                try:
                    png = harness.write_plot(rows, os.path.join(out_dir, f"{name}_{stamp}.png"), title,
                                             x_key=getattr(mod, "PLOT_X", "M"))
                    if png:
                        written.append(png)
                except Exception as e:
                    print(f"[bench] plot failed: {type(e).__name__}: {e}")
            print()
            print(harness.markdown_table(rows, title))
        bad = [r for r in rows if r.status == "fail"
               and (r.backend in harness.OWN_BACKENDS or r.backend == "dense")]
        for r in bad:
            print(f"[bench] FAILED: {r.op} {r.case} {r.dtype} {r.backend}: {r.note}")
        print(f"[bench] {name}: {len(rows)} rows in {time.time() - t0:.0f} s, {len(bad)} failed")
        if bad:
            rc = max(rc, 1)
        if interrupted is not None:
            rc = max(rc, 1)
            break
    for p in written:
        print(f"[bench] wrote {p}")
    return rc


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
        if code == 0:   # --help
            raise
        return code
    mods = _known_ops()
    import torch

    if not args.dry_run_cpu and (args.cpu or not torch.cuda.is_available()):
        rc = _run_cpu(args, mods)
        _quality_table(args)
        return rc
    old = None
    try:
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main thread
        pass
    try:
        rc = _run_gpu(args, mods)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    _quality_table(args)
    return rc


def _quality_table(args) -> None:
    """The real-model quality table (bench/quality.py) after the op benchmarks; --no-quality skips it,
    --quick keeps only the digits workload (seconds instead of about a minute for MiniLM too)."""
    if getattr(args, "no_quality", False):
        return
    try:
        from sparsekit.bench.quality import print_quality_table
    except ImportError:
        from quality import print_quality_table  # run as a script from bench/
    try:
        print_quality_table(workloads=("digits",) if args.quick else ("digits", "minilm"))
    except Exception as e:  # the table is a report: a failure must not mask the benchmarks' exit status
        print(f"quality table failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
