"""Command line for the benchmarks: ``sparsekit bench`` / ``python -m sparsekit.bench``.

With a CUDA device: times every selected op's cases (peers in the same run)
and writes, per op, ``<op>.csv`` (appended), ``<op>_<stamp>.md`` and
``<op>_<stamp>.png`` into ``--out`` (default ``bench/results/<gpu-slug>/``).

``--plan gpu-check``: the rows that decide each performance target (each op
module's ``GPU_CHECK`` selections, in the value order of ``GPU_CHECK_ORDER``),
all ops appended to one ``--csv`` as each group finishes, one ``--md``;
``--time-limit`` skips a selection whose predicted time no longer fits;
``--warm-only --workers N`` launches every selection once in N processes
(first-launch compiles into the shared Triton / inductor caches, nothing
timed); ``--list`` prints the exact rows; ``--dry-run-cpu`` runs the same plan
on CPU tensors with tiny shapes and checks that the rows produced are the
rows listed.

Without one: runs each op's CPU correctness sweep (Triton interpreter and
reference backends against float64 math) instead, prints a table, and exits
non-zero if any check fails.

Only the ops named by ``--ops`` run (default: all).  ``--quality`` adds the
real-model compression quality table (``bench/quality.py``, minutes on CPU)
after the ops; without it the table does not run (``sparsekit quality`` runs
it on its own).

Exit status: 0 all good; 1 a sparsekit backend (or dense) failed its check;
2 bad arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import traceback

from . import harness

CPU_MESSAGE = "No CUDA device: GPU timings skipped; ran the CPU correctness sweep (Triton interpreter) instead"


BENCH_EXAMPLES = """examples:
  sparsekit bench                                  every op (GPU timings; CPU: correctness sweep)
  sparsekit bench --ops int4_linear --quick        one op, reduced sweep
  sparsekit bench --quick --quality                every op, then the quality table (digits only)
  sparsekit bench --ops sparse24_linear --shapes 4096x4096 --m 1,16,256 --dtype bf16
  sparsekit bench --ops int4_linear --dry-run-cpu  check the timing path on CPU (not a benchmark)
  sparsekit bench --plan gpu-check --list          the rows of the GPU check plan
  sparsekit bench --cpu-speed                      CPU: each scheme's default path vs the dense nn.Linear
  sparsekit bench --cpu-speed --help               its options (schemes, shapes, M, output directory)
  sparsekit bench --algorithms [--small]           CPU: SparseGPT / GPTQ / AWQ / Hessian vs the original loops
"""


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
        description="sparsekit microbenchmarks: GPU timings of each op with its peers (dense cuBLAS, torch's "
                    "sparse and low-bit kernels), or, without CUDA, each op's CPU correctness sweep (Triton "
                    "interpreter and reference backends against float64).  Only the ops given to --ops run; the "
                    "real-model quality table runs only with --quality.",
        epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--cpu-speed", action="store_true",
                   help="time each scheme's default CPU path against the dense nn.Linear it replaced (ratio per "
                        "scheme, shape and M; bench/cpu_speed.py, `--cpu-speed --help` for its options)")
    p.add_argument("--algorithms", action="store_true",
                   help="time SparseGPT, GPTQ, AWQ and the Hessian against the original algorithms' loop structure "
                        "(bench/algorithms.py, `--algorithms --help` for its options, --small for a quick check)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--quality", action="store_true",
                   help="after the op benchmarks, also compute and print the real-model compression quality "
                        "table (bench/quality.py; minutes on CPU; with --quick only the digits workload); "
                        "`sparsekit quality` runs the table alone")
    q.add_argument("--no-quality", action="store_true",
                   help="do not print the quality table (the default; kept for existing scripts)")
    p.add_argument("--quiet", action="store_true",
                   help="with --quality: no progress (bars on a terminal, one line per row otherwise)")
    g = p.add_argument_group("the gpu-check plan (scripts/gpu_check.sh)")
    g.add_argument("--plan", choices=["gpu-check"], help="run the rows that decide each performance target "
                   "(every op's GPU_CHECK selections, most valuable first) instead of --ops")
    g.add_argument("--list", action="store_true", help="with --plan: print the exact rows and exit")
    g.add_argument("--json", action="store_true", help="with --list: as JSON")
    g.add_argument("--csv", help="with --plan: one CSV for every op (rows appended as each group finishes)")
    g.add_argument("--md", help="with --plan: one markdown file for every op (rewritten after each selection)")
    g.add_argument("--status", help="with --plan: JSON status of every selection (rewritten after each)")
    g.add_argument("--time-limit", type=float, default=None,
                   help="with --plan: seconds; a selection whose predicted time exceeds what is left is not run")
    g.add_argument("--deadline", type=float, default=None,
                   help="with --plan: the same as an absolute time (seconds since the epoch)")
    g.add_argument("--units", help="with --plan: run only these selections (indexes, 'i' or 'i.shape')")
    g.add_argument("--warm-only", action="store_true",
                   help="with --plan: launch every row once (compiles and first calls; no checks, no timing, "
                        "nothing written)")
    g.add_argument("--workers", type=int, default=1, help="with --plan --warm-only: processes")
    g.add_argument("--synthetic-csv", help="with --plan: write the plan's rows with made-up timings to this CSV "
                   "(gpu 'synthetic (dry run; not a measurement)') for a dry run of the dispatch-table builder")
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="exercise the timing path on CPU tensors (host clock, interpreter/reference backends, "
                        "small shapes) and write its CSV/markdown/plot: a check of the harness, not a benchmark")
    return p


def _on_sigterm(signum, frame):  # so `timeout` still leaves the markdown/plot of finished cases
    raise KeyboardInterrupt(f"signal {signum}")


def _run_cpu(args, mods) -> int:
    print(CPU_MESSAGE, flush=True)
    ok_all = True
    results = []
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
        results.append(ok)
        ok_all &= ok
    # CPU_MESSAGE is printed once, above; the closing line only sums up
    nbad = sum(not r for r in results)
    print(f"\nCPU correctness sweep of {len(results)} op(s): "
          + ("all passed" if ok_all else f"{nbad} op(s) with failures"))
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--algorithms" in argv:
        # its own runner and options (bench/algorithms.py)
        from .algorithms import main as algorithms_main

        argv.remove("--algorithms")
        return algorithms_main(argv)
    if "--cpu-speed" in argv:
        # its own runner and options (bench/cpu_speed.py)
        from .cpu_speed import main as cpu_speed_main

        argv.remove("--cpu-speed")
        return cpu_speed_main(argv)
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

    if args.plan:
        return _plan_main(args, mods)
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


# --------------------------------------------------------------------------- the gpu-check plan

# (op, selection of that op module's GPU_CHECK), most valuable first: the decode-size rows of the
# two weight-bandwidth kernels (2:4, W4A16), 2:4 at prefill sizes, the two video kernels against
# their stated targets, block-sparse, the int8-activation paths, then rows that only widen the
# dispatch table (2:4+int4, bf16) or the coverage (a second attention geometry).
GPU_CHECK_ORDER = [
    ("sparse24_linear", "fp16_small_m"),
    ("int4_linear", "w4a16_small_m"),
    ("sparse24_linear", "fp16_large_m"),
    ("draft_attention", "s80k_sp90"),
    ("triple_gate_conv2d", "d25_60_100"),
    ("block_sparse_linear", "d25_b64"),
    ("int4_linear", "w8a8_w4a8"),
    ("sparse24_linear", "int8"),
    ("sparse24_int4_linear", "fp16"),
    ("sparse24_linear", "bf16"),
    ("draft_attention", "s32k_text_sp90"),
]
SYNTHETIC_GPU = "synthetic (dry run; not a measurement)"


@dataclasses.dataclass
class PlanItem:
    index: int
    op: str                 # the module's OP (key of _known_ops)
    name: str               # key of the module's GPU_CHECK
    entry: str              # the module function that runs it
    kwargs: dict
    predict_s: float        # timed, warm caches
    warm_s: float           # first launch on a fresh machine (compiles)
    decides: str

    @property
    def key(self) -> str:
        return f"{self.op}:{self.name}"


def gpu_check_plan(mods=None) -> list[PlanItem]:
    mods = mods or _known_ops()
    items = []
    for i, (op, name) in enumerate(GPU_CHECK_ORDER):
        sel = mods[op].GPU_CHECK[name]
        items.append(PlanItem(i, op, name, sel.get("entry", "run_gpu"), dict(sel["kwargs"]), float(sel["predict_s"]),
                              float(sel["warm_s"]), sel["decides"]))
    return items


def plan_rows(item: PlanItem, mods=None, kwargs: dict | None = None) -> list[dict]:
    """The rows ``item`` produces: dicts with op, case, dtype, backends."""
    mods = mods or _known_ops()
    return mods[item.op].plan_rows(entry=item.entry, **(item.kwargs if kwargs is None else kwargs))


def plan_summary(mods=None) -> dict:
    """The plan as data (scripts/gpu_check.sh prints it; tests check it)."""
    mods = mods or _known_ops()
    items = gpu_check_plan(mods)
    return {"items": [dict(index=it.index, key=it.key, decides=it.decides, predict_s=it.predict_s,
                           warm_s=it.warm_s, rows=plan_rows(it, mods)) for it in items],
            "predict_s": sum(it.predict_s for it in items)}


def _cpu_backend(op: str, name: str) -> str | None:
    """A plan backend's name for the CPU dry run (None: dropped)."""
    if name == "flex":
        return None            # torch.compile of flex_attention on CPU takes minutes
    if op == "draft_attention":
        return name            # run_gpu maps triton to interpret itself
    if name == "triton":
        return "interpret"
    if op == "int4_linear" and name.startswith("triton_"):
        return "interpret" + name[len("triton"):]
    return name


def cpu_kwargs(item: PlanItem, mod) -> dict:
    """``item``'s arguments for a CPU dry run: the module's tiny CPU shape, one batch size, one
    density (a check of the plan's structure and the timing path, not of the numbers)."""
    kw = dict(item.kwargs)
    kw["shapes"] = list(mod.CPU_QUICK_SHAPES)[:1]
    kw["ms"] = list(mod.CPU_QUICK_MS)[:1]
    if "densities" in kw:
        kw["densities"] = tuple(kw["densities"])[:1]
    if "backends" in kw:
        kw["backends"] = [b for b in (_cpu_backend(item.op, n) for n in kw["backends"]) if b]
    if item.op == "block_sparse_linear":
        kw["blocks"] = tuple(mod.DRY_BLOCKS)
    if item.op == "draft_attention":
        kw.update(heads=mod.CPU_HEADS, head_dim=mod.CPU_HEAD_DIM, pool=(4, 4), ms=[1])
    if item.op == "triple_gate_conv2d":
        kw["ms"] = [1]
    return kw


def _warm_timer(fn, arg_sets, warmup_ms=0.0, rep_ms=0.0):
    """The warm-up's 'timer': one call (compiles and first launch), no timing."""
    fn(*arg_sets[0])
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception:
        pass
    return 0.0, 0.0, 0.0


def _parse_units(spec: str | None, items: list[PlanItem]) -> list[tuple[int, int | None]]:
    if not spec:
        return [(it.index, None) for it in items]
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        i, _, j = part.partition(".")
        if not i.isdigit() or int(i) >= len(items) or (j and not j.isdigit()):
            raise SystemExit(f"--units: bad unit {part!r} (expected i or i.shape, i < {len(items)})")
        out.append((int(i), int(j) if j else None))
    return out


def warm_units(items: list[PlanItem]) -> list[tuple[int, int | None, float]]:
    """(item, shape index, predicted seconds): every selection split by weight shape, so that the
    warm-up's processes share the compiles of the slow selections."""
    units = []
    for it in items:
        shapes = it.kwargs.get("shapes") or [None]
        for j in range(len(shapes)):
            units.append((it.index, j if len(shapes) > 1 else None, it.warm_s))
    return units


def assign_warm(items: list[PlanItem], workers: int) -> list[list[tuple[int, int | None]]]:
    """Warm-up units over ``workers`` processes, longest first (LPT)."""
    units = warm_units(items)
    bins: list[list] = [[0.0, []] for _ in range(max(1, min(workers, len(units))))]
    for (i, j, cost) in sorted(units, key=lambda u: -u[2]):
        b = min(bins, key=lambda b: b[0])
        b[0] += cost
        b[1].append((i, j))
    return [b[1] for b in bins if b[1]]


def _unit_str(u) -> str:
    return str(u[0]) if u[1] is None else f"{u[0]}.{u[1]}"


def _print_plan(items: list[PlanItem], mods, as_json: bool) -> None:
    if as_json:
        print(json.dumps(plan_summary(mods), indent=1))
        return
    total = 0
    for it in items:
        rows = plan_rows(it, mods)
        total += len(rows)
        print(f"{it.index + 1:2d}. {it.key}  ({len(rows)} cases, predicted {it.predict_s:.0f} s timed, "
              f"{it.warm_s:.0f} s first-launch compiles)")
        print(f"    decides: {it.decides}")
        for r in rows:
            print(f"    {r['op']:<22} {r['dtype']:<5} {r['case']:<58} {' '.join(r['backends'])}")
    print(f"{len(items)} selections, {total} cases, predicted {sum(i.predict_s for i in items):.0f} s timed")


def _synthetic_csv(items: list[PlanItem], mods, path: str) -> int:
    """The plan's rows with made-up timings (a dry run of the dispatch-table builder only)."""
    factor = {"cuda": (0.55, 0.8), "triton": (0.6, 1.1), "cusparselt": (0.9, 0.85), "cutlass24": (1.0, 0.9)}
    rows = []
    ctx = dict(gpu=SYNTHETIC_GPU, commit=harness.git_commit(), date=harness.now_iso())
    for it in items:
        for r in plan_rows(it, mods):
            kv = harness.parse_case(r["case"])
            m, n, k = kv.get("M", 1), kv.get("N", 1), kv.get("K", 1)
            dense = 2e3 * m * n * k / 600e12 + 1e3 * 2 * (n * k + m * k + m * n) / 3e12 + 0.005
            for b in r["backends"]:
                f = factor.get(b, (0.95, 0.95))[0 if m <= 16 else 1] if b != "dense" else 1.0
                t = dense * f
                rows.append(harness.Row(op=r["op"], case=r["case"], backend=b, dtype=r["dtype"], p20_ms=t * 0.98,
                                        p50_ms=t, p80_ms=t * 1.02, note="synthetic timing", **ctx))
    harness.fill_ratios(rows)
    if os.path.exists(path):
        os.remove(path)
    harness.write_csv(rows, path)
    print(f"[plan] wrote {len(rows)} synthetic rows to {path}")
    return 0


def _warm_parallel(args, items: list[PlanItem]) -> int:
    """The warm-up in ``args.workers`` processes (units split by shape, longest first)."""
    assign = assign_warm(items, args.workers)
    mod_name = (__spec__.name if globals().get("__spec__") is not None and __spec__.name != "__main__"
                else "sparsekit.bench.run")
    log_dir = args.out or "."
    os.makedirs(log_dir, exist_ok=True)
    procs = []
    for w, units in enumerate(assign):
        cmd = [sys.executable, "-m", mod_name, "--plan", "gpu-check", "--warm-only", "--no-quality",
               "--units", ",".join(_unit_str(u) for u in units)] + (["--dry-run-cpu"] if args.dry_run_cpu else [])
        log = open(os.path.join(log_dir, f"warm_worker{w}.log"), "w")
        print(f"[warm] worker {w}: units {','.join(_unit_str(u) for u in units)} "
              f"({', '.join(items[u[0]].key for u in units)})", flush=True)
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, w, time.time()))
    rc = 0
    for p, log, w, t0 in procs:
        r = p.wait()
        log.close()
        print(f"[warm] worker {w}: exit {r} after {time.time() - t0:.0f} s", flush=True)
        rc = max(rc, 1 if r else 0)
    return rc


def _plan_main(args, mods) -> int:
    import torch

    items = gpu_check_plan(mods)
    if args.list:
        _print_plan(items, mods, args.json)
        return 0
    if args.synthetic_csv:
        return _synthetic_csv(items, mods, args.synthetic_csv)
    dry = args.dry_run_cpu
    if not dry and not torch.cuda.is_available():
        print("[plan] no CUDA device: use --dry-run-cpu (or --list)", file=sys.stderr)
        return 2
    if args.warm_only and args.workers > 1:
        return _warm_parallel(args, items)
    old = None
    try:
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):
        pass
    try:
        return _run_plan(args, mods, items)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _run_plan(args, mods, items: list[PlanItem]) -> int:
    dry, warm = args.dry_run_cpu, args.warm_only
    units = _parse_units(args.units, items)
    gpu = "cpu (dry run)" if dry else harness.gpu_name()
    tv, trv = harness.versions()
    ctx = dict(gpu=gpu, commit=harness.git_commit(), date=harness.now_iso(), torch=tv, triton=trv)
    if warm:
        # compiles and first launches only: one input set, no checks, no timings, nothing written
        harness.n_rotating_sets = lambda *a, **k: 1
        harness.rel_err = lambda out, ref: 0.0
    elif not dry and not args.no_ceilings:
        try:
            ctx["ceilings"] = harness.measure_ceilings()
            print(f"[plan] measured ceilings: copy {ctx['ceilings'][0]:.2f} TB/s, fp16 matmul "
                  f"{ctx['ceilings'][1]:.0f} TFLOP/s", flush=True)
        except Exception as e:
            print(f"[plan] could not measure ceilings: {type(e).__name__}: {e}", flush=True)
    rep = args.rep_ms if args.rep_ms is not None else (1.0 if dry else 50.0)
    wu = args.warmup_ms if args.warmup_ms is not None else (0.0 if dry else 10.0)
    print(f"[plan] {'warm-up' if warm else 'dry run' if dry else 'timing'} on {gpu} | torch {tv} | triton {trv} | "
          f"commit {ctx['commit']} | {len(units)} unit(s)" +
          (f" | {args.deadline - time.time():.0f} s left" if args.deadline else "") +
          (f" | time limit {args.time_limit:.0f} s" if args.time_limit else ""), flush=True)
    t_start = time.time()
    deadline = args.deadline
    if args.time_limit is not None:
        deadline = min(deadline or float("inf"), t_start + args.time_limit)
    status: list[dict] = []
    by_item: dict[int, list] = {}
    rc = 0
    for (idx, sj) in units:
        it = items[idx]
        mod = mods[it.op]
        kw = cpu_kwargs(it, mod) if dry else dict(it.kwargs)
        if sj is not None:
            kw["shapes"] = [kw["shapes"][min(sj, len(kw["shapes"]) - 1)]]
        st = dict(index=idx, key=it.key, decides=it.decides, predict_s=it.predict_s, seconds=0.0, rows=0, ok=0,
                  fail=0, skip=0, status="ok", note="")
        status.append(st)
        left = (deadline - time.time()) if deadline is not None else None
        if left is not None and not warm and it.predict_s > left:
            st["status"], st["note"] = "not run", f"predicted {it.predict_s:.0f} s > {left:.0f} s left"
            print(f"[plan] {it.key}: NOT RUN ({st['note']})", flush=True)
            _write_plan_outputs(args, items, status, by_item, ctx)
            continue
        rows = by_item.setdefault(idx, [])

        def on_rows(group, _rows=rows):
            if args.csv and not warm:
                harness.write_csv(group, args.csv)
            _rows.extend(group)

        extra = dict(device="cpu", timer=harness.time_rotating_cpu) if dry else {}
        if warm:
            extra["timer"] = _warm_timer
        print(f"[plan] {it.key}: {it.decides}", flush=True)
        t0 = time.time()
        interrupted = None
        try:
            getattr(mod, it.entry)(**kw, warmup_ms=wu, rep_ms=rep, ctx=ctx, on_rows=on_rows, **extra)
        except KeyboardInterrupt as e:
            interrupted = e
        except Exception as e:
            st["status"], st["note"] = "error", f"{type(e).__name__}: {e}"[:300]
            traceback.print_exc()
            rc = 1
        st["seconds"] = round(time.time() - t0, 1)
        st["rows"] = len(rows)
        st["ok"] = sum(r.status == "ok" for r in rows)
        st["skip"] = sum(r.status == "skip" for r in rows)
        bad = [r for r in rows if r.status == "fail" and (r.backend in harness.OWN_BACKENDS or r.backend == "dense")]
        st["fail"] = len(bad)
        for r in bad:
            print(f"[plan] FAILED: {r.op} {r.case} {r.dtype} {r.backend}: {r.note}", flush=True)
        if bad:
            rc, st["status"] = 1, "failures"
        if dry and interrupted is None and st["status"] != "error":
            want = {(r["op"], r["case"], r["dtype"]) for r in plan_rows(it, mods, kw)}
            got = {(r.op, r.case, r.dtype) for r in rows}
            if want != got:
                st["status"] = "error"
                st["note"] = (f"rows differ from the listed plan: missing {sorted(want - got)[:3]}, "
                              f"unexpected {sorted(got - want)[:3]}")
                rc = 1
            else:
                st["note"] = f"{len(want)} cases match the listed plan"
        if interrupted is not None:
            st["status"], st["note"] = "interrupted", f"{interrupted}; {len(rows)} finished rows kept"
            rc = 1
        print(f"[plan] {it.key}: {st['status']} in {st['seconds']:.0f} s (predicted "
              f"{it.predict_s if not warm else it.warm_s:.0f} s): {st['rows']} rows, {st['ok']} ok, "
              f"{st['fail']} failed, {st['skip']} skipped" + (f"; {st['note']}" if st["note"] else ""), flush=True)
        if not warm:
            _write_plan_outputs(args, items, status, by_item, ctx)
        if interrupted is not None:
            break
    if not warm and not args.no_plot and args.out:
        _plan_plots(args, items, by_item, ctx)
    print(f"[plan] done in {time.time() - t_start:.0f} s: "
          + ", ".join(f"{s['key']} {s['status']}" for s in status), flush=True)
    return rc


def _write_plan_outputs(args, items, status, by_item, ctx) -> None:
    if args.status:
        with open(args.status, "w") as f:
            json.dump(status, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"# sparsekit gpu-check benchmarks on {ctx['gpu']} (commit {ctx['commit']}, {ctx['date']})\n\n")
            for st in status:
                rows = by_item.get(st["index"], [])
                f.write(f"## {st['index'] + 1}. {st['key']}: {st['status']} ({st['seconds']:.0f} s)\n\n"
                        f"{st['decides']}" + (f" -- {st['note']}" if st["note"] else "") + "\n\n")
                if rows:
                    f.write(harness.markdown_table(rows) + "\n")


def _plan_plots(args, items, by_item, ctx) -> None:
    mods = _known_ops()
    by_op: dict = {}
    for idx, rows in by_item.items():
        for r in rows:
            by_op.setdefault(r.op, []).append(r)
    stamp = harness.run_stamp(ctx["date"], ctx["commit"])
    for op, rows in by_op.items():
        x_key = getattr(mods[op], "PLOT_X", "M") if op in mods else "M"
        try:
            png = harness.write_plot(rows, os.path.join(args.out, f"{op}_{stamp}.png"), f"{op} on {ctx['gpu']}",
                                     x_key=x_key)
            if png:
                print(f"[plan] wrote {png}")
        except Exception as e:
            print(f"[plan] plot for {op} failed: {type(e).__name__}: {e}")


def _quality_table(args) -> None:
    """The real-model quality table (bench/quality.py) after the op benchmarks, only with --quality;
    --quick keeps only the digits workload (seconds instead of minutes for MiniLM too).  Progress:
    bars on a terminal, one line per row otherwise, none with --quiet."""
    if not getattr(args, "quality", False):
        return
    try:
        from sparsekit.bench.quality import DEFAULT_WORKLOADS, print_quality_table
    except ImportError:
        from quality import DEFAULT_WORKLOADS, print_quality_table  # run as a script from bench/
    try:
        quiet = getattr(args, "quiet", False)
        print_quality_table(workloads=("digits",) if args.quick else DEFAULT_WORKLOADS,
                            progress=not quiet and sys.stderr.isatty(), log=None if quiet else sys.stderr)
    except Exception as e:  # the table is a report: a failure must not mask the benchmarks' exit status
        print(f"quality table failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
