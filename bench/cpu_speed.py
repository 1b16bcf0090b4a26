"""CPU speed of every compressed linear against the ``nn.Linear`` it replaced (``sparsekit bench --cpu-speed``).

For each scheme, layer shape ``N x K`` and batch ``M``: a float32 ``nn.Linear``
and the module its scheme converts it to (``sparsify_`` / ``quantize_`` with
the scheme's defaults, no calibration) run the same input under
``torch.no_grad``, alternating, in one process; each side's time is the
median over rounds of the mean of a few calls.  ``ratio`` is the median over
rounds of the round's dense time / compressed time (paired: the two sides of
a round run back to back, so a slow spell of a shared machine hits both;
>= 1.0: the compressed layer is at least as fast).  The default CPU path is
what automatic dispatch picks (``dense``: the expansion cached per weight
version, see ``sparsekit/ops/_dense.py``); ``--backend reference`` times the
per-call expansion instead.  Writes ``cpu_speed.csv`` and ``cpu_speed.md`` to
``--out`` (default ``bench/results/cpu/``).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

SCHEMES = ("2:4", "block", "int4", "w8a8", "w4a8", "2:4+int4", "2:4+int8")
SHAPES = ((512, 512), (2048, 2048), (4096, 4096))
MS = (1, 16, 256)
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "cpu")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def convert(scheme: str, linear: nn.Linear) -> nn.Module:
    """``linear``'s compressed module under ``scheme``'s default config (no calibration)."""
    import sparsekit
    from sparsekit.schemes import get_scheme

    s = get_scheme(scheme)
    holder = nn.Sequential(linear)
    (sparsekit.sparsify_ if s.sparse else sparsekit.quantize_)(holder, scheme, progress=False)
    return holder[0]


def _time(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def measure(dense: nn.Module, comp: nn.Module, x: torch.Tensor, rounds: int, budget_s: float) -> tuple:
    """(dense seconds, compressed seconds, ratio) per call: medians over alternating rounds; the ratio is the
    median of the per-round ratios (each round's two sides run back to back; the first side alternates)."""
    with torch.no_grad():
        for _ in range(2):                       # warm-up (and the cached expansion on the first call)
            dense(x)
            comp(x)
        t1 = max(_time(lambda: dense(x), 1), 1e-6)
        calls = max(1, min(50, int(budget_s / rounds / 2 / t1)))
        td, tc = [], []
        for r in range(rounds):
            if r % 2:
                tc.append(_time(lambda: comp(x), calls))
                td.append(_time(lambda: dense(x), calls))
            else:
                td.append(_time(lambda: dense(x), calls))
                tc.append(_time(lambda: comp(x), calls))
    return statistics.median(td), statistics.median(tc), statistics.median(a / b for a, b in zip(td, tc))


def _matmul_kind(comp: nn.Module, m: int) -> str:
    """Which matmul the module's CPU fast path ran for ``m`` rows: ``kernel`` (a matmul of the C extension
    over the stored weights: 2:4, block-sparse, or the fused W8A8 / W4A8 / 2:4+int8 integer-code linear),
    ``fp16w`` (fbgemm's float16-weight GEMM, the weight exactly float16), ``fp32`` (F.linear on the float32
    expansion) or ``op`` (no fast path)."""
    from sparsekit.ops import _dense

    plan = comp.__dict__.get(_dense._PLAN_ATTR)
    if plan is None:
        return "op"
    if callable(plan.kern) and plan.kmin <= m <= plan.kmax:
        return "kernel"
    return "fp16w" if plan.fp16 and m <= _dense.FP16_GEMM_MAX_ROWS else "fp32"


def _torch_lowbit(scheme: str, n: int, k: int):
    """torch's own CPU low-bit matmul for ``scheme``'s weight kind, as a callable builder ``x -> fn`` (None if
    torch lacks it or the scheme has no counterpart): int4 (``_weight_int4pack_mm_for_cpu``, group 128 or K)
    and int8 weights (``_weight_int8pack_mm``: int8 weights, unquantized activations).  Timed as peers."""
    aten = torch.ops.aten
    if scheme == "int4" and hasattr(aten, "_weight_int4pack_mm_for_cpu") and k % 2 == 0:
        gs = 128 if k % 128 == 0 else k
        try:
            packed = aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 8)
        except RuntimeError:
            return None

        def build(x):
            sz = torch.rand(k // gs, n, 2, dtype=x.dtype)
            return lambda: aten._weight_int4pack_mm_for_cpu(x, packed, gs, sz)
        return build
    if scheme == "w8a8" and hasattr(aten, "_weight_int8pack_mm"):
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)

        def build(x):
            s = torch.rand(n, dtype=x.dtype)
            return lambda: aten._weight_int8pack_mm(x, w8, s)
        return build
    return None


def _peer_ms(build, x, rounds, budget_s):
    if build is None:
        return ""
    try:
        fn = build(x)
        with torch.no_grad():
            fn()
            t1 = max(_time(fn, 1), 1e-6)
            calls = max(1, min(50, int(budget_s / rounds / 2 / t1)))
            return round(statistics.median(_time(fn, calls) for _ in range(rounds)) * 1e3, 4)
    except RuntimeError:
        return ""


def run(schemes=SCHEMES, shapes=SHAPES, ms=MS, rounds: int = 15, budget_s: float = 1.0, backend=None,
        progress=print, peers: bool = True) -> list:
    from sparsekit.ops import dispatch

    rows = []
    for n, k in shapes:
        torch.manual_seed(0)
        base = nn.Linear(k, n)
        for scheme in schemes:
            lin = nn.Linear(k, n)
            lin.load_state_dict(base.state_dict())
            comp = convert(scheme, lin)
            if backend is not None:
                comp.backend = backend
            op = getattr(__import__("sparsekit.schemes", fromlist=["get_scheme"]).get_scheme(scheme), "kernels")[0]
            for m in ms:
                x = torch.randn(m, k)
                chosen = dispatch.resolve(op, "cpu", backend, m)
                td, tc, ratio = measure(base, comp, x, rounds, budget_s)
                row = {"scheme": scheme, "op": op, "backend": chosen, "matmul": _matmul_kind(comp, m),
                       "N": n, "K": k, "M": m, "dtype": "fp32",
                       "dense_ms": round(td * 1e3, 4), "compressed_ms": round(tc * 1e3, 4),
                       "ratio": round(ratio, 3)}
                peer = _torch_lowbit(scheme, n, k) if peers else None
                row["torch_lowbit_fp32_ms"] = _peer_ms(peer, x, rounds, budget_s)
                row["torch_lowbit_bf16_ms"] = _peer_ms(peer, x.bfloat16(), rounds, budget_s)
                rows.append(row)
                if progress:
                    progress(f"{scheme:9s} {n}x{k} M={m:<4d} {chosen:9s} dense {row['dense_ms']:9.3f} ms  "
                             f"compressed {row['compressed_ms']:9.3f} ms  ratio {row['ratio']:.2f}")
    return rows


def write(rows: list, out: str, header: dict) -> tuple:
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "cpu_speed.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md_path = os.path.join(out, "cpu_speed.md")
    lines = ["# CPU: compressed linear vs the dense nn.Linear it replaced", "",
             "Generated by `sparsekit bench --cpu-speed` (bench/cpu_speed.py).  ratio = dense time / compressed "
             "time, measured side by side in one run (>= 1.0: not slower).", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "torch low-bit: torch's own CPU matmul for the weight kind, timed as a peer (int4: "
              "`_weight_int4pack_mm_for_cpu`, w8a8: `_weight_int8pack_mm`, weight-only int8), fp32 / bf16 input.",
              "", "matmul: what the compressed layer's CPU fast path ran -- `kernel`: a matmul of the C extension "
              "over the stored weights (2:4 and block-sparse in float32; W8A8, W4A8 and 2:4+int8 fused with the "
              "per-token quantization, exact integer sums), `fp16w`: fbgemm's float16-weight GEMM (the expanded "
              "weight is exactly float16: int4 dequantized in float16, integer codes), `fp32`: F.linear on the "
              "float32 expansion.", "",
              "| scheme | backend | matmul | N x K | M | dense ms | compressed ms | ratio | torch low-bit ms (fp32 / bf16) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peer = (f"{r['torch_lowbit_fp32_ms']} / {r['torch_lowbit_bf16_ms']}"
                if r.get("torch_lowbit_fp32_ms") != "" or r.get("torch_lowbit_bf16_ms") != "" else "")
        lines.append(f"| {r['scheme']} | {r['backend']} | {r.get('matmul', '')} | {r['N']}x{r['K']} | {r['M']} | "
                     f"{r['dense_ms']} | "
                     f"{r['compressed_ms']} | {r['ratio']:.2f} | {peer} |")
    worst = min(rows, key=lambda r: r["ratio"])
    lines += ["", f"Lowest ratio: {worst['ratio']:.2f} ({worst['scheme']}, {worst['N']}x{worst['K']}, M={worst['M']})."]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsekit bench --cpu-speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), help="schemes to time (default: all)")
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK list, comma separated")
    p.add_argument("--m", default=",".join(str(m) for m in MS), help="batch sizes M, comma separated")
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds per case (median)")
    p.add_argument("--budget-s", type=float, default=1.0, help="seconds of calls per case and side, roughly")
    p.add_argument("--backend", default=None, help="force a backend (e.g. reference) instead of the CPU default")
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default bench/results/cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-peers", action="store_true", help="skip timing torch's own low-bit CPU matmuls")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        ms = [int(v) for v in args.m.split(",")]
    except ValueError:
        print(f"sparsekit bench --cpu-speed: error: bad --shapes {args.shapes!r} or --m {args.m!r}", file=sys.stderr)
        return 2
    rows = run(args.schemes, shapes, ms, args.rounds, args.budget_s, args.backend, peers=not args.no_peers)
    header = {"CPU": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "commit": _commit(), "date": datetime.date.today().isoformat(),
              "backend": args.backend or "automatic (CPU: dense unless SPARSEKIT_CPU_DENSE=0)"}
    csv_path, md_path = write(rows, args.out, header)
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
