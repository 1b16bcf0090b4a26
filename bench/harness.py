"""Benchmark harness shared by every op's benchmark.

Pieces:

* :func:`format_case` / :func:`parse_case` -- the ``case`` column
  (``key=value`` pairs joined by commas, numbers bare: ``M=16,N=4096,K=4096``).
* :class:`Row` -- one measured (or skipped / failed) backend on one case.
* :func:`time_rotating` -- GPU timing with ``triton.testing.do_bench``
  (quantiles 0.2/0.5/0.8) over several distinct input sets, cycled call by
  call so that the working set exceeds L2 and caches do not flatter.
* :func:`fill_ratios` -- speedup vs dense and vs the best peer, per case.
* writers: :func:`write_csv` (append-safe, header once), :func:`write_markdown`,
  :func:`write_plot` (matplotlib, Agg).
* environment: :func:`gpu_name`, :func:`gpu_slug`, :func:`git_commit`,
  :func:`now_iso`, :func:`measure_ceilings`.

Nothing here needs a GPU at import time; the GPU-only functions import
triton lazily.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import io
import itertools
import math
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "bench", "results")

# Peers that sparsekit's own backends are compared against ("best peer").
PEER_BACKENDS = ("dense", "cutlass24", "cusparselt", "cudnn", "sdpa_flash", "flex",
                 "torch_bsr", "torchao_int4", "gemlite", "torch_int_mm", "torch_int4mm")
# sparsekit's own backends (everything not a peer is treated as ours).
OWN_BACKENDS = ("cuda", "triton", "sparsekit_auto", "interpret", "reference",
                "triton_w4a8", "triton_w4a8_mixed", "triton_w8a8", "interpret_w4a8", "interpret_w4a8_mixed",
                "interpret_w8a8", "reference_w4a8", "reference_w4a8_mixed", "reference_w8a8",
                "triton_24", "triton_int4")


# --------------------------------------------------------------------------- case strings

def _fmt_value(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.6g}"
    s = str(v)
    if "," in s or "=" in s:
        raise ValueError(f"case value {s!r} may not contain ',' or '='")
    return s


def format_case(*pairs, **kv) -> str:
    """``format_case(M=16, N=4096, K=4096) -> "M=16,N=4096,K=4096"``.

    Accepts keyword arguments (order kept), or one dict / sequence of
    ``(key, value)`` pairs.  Numbers are written bare (``0.9``, ``64``).
    """
    items: list = []
    for p in pairs:
        items.extend(p.items() if isinstance(p, dict) else p)
    items.extend(kv.items())
    return ",".join(f"{k}={_fmt_value(v)}" for k, v in items)


def parse_case(case: str) -> dict:
    """Inverse of :func:`format_case`; numeric values come back as int/float."""
    out: dict = {}
    if not case:
        return out
    for part in case.split(","):
        k, _, v = part.partition("=")
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


# --------------------------------------------------------------------------- the record

@dataclass
class Row:
    """One backend on one case.  ``status`` is ``ok``, ``skip`` or ``fail``."""

    op: str
    case: str
    backend: str
    dtype: str
    p20_ms: float | None = None
    p50_ms: float | None = None
    p80_ms: float | None = None
    speedup_vs_dense: float | None = None
    gpu: str = ""
    commit: str = ""
    date: str = ""
    # extras
    speedup_vs_best_peer: float | None = None
    best_peer: str = ""
    tflops: float | None = None       # dense-equivalent FLOPs / p50
    tbps: float | None = None         # bytes / p50 (weight as stored + x + y)
    bytes: int | None = None
    flops: int | None = None
    roofline_ms: float | None = None  # max(bytes / peak BW, flops / peak FLOP/s) as measured on this GPU
    pct_roofline: float | None = None
    rel_err: float | None = None
    status: str = "ok"
    chosen_backend: str = ""
    n_sets: int | None = None         # rotated input sets
    note: str = ""
    torch: str = ""
    triton: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


COLUMNS = [f.name for f in dataclasses.fields(Row)]
REQUIRED_COLUMNS = ["op", "case", "backend", "dtype", "p20_ms", "p50_ms", "p80_ms",
                    "speedup_vs_dense", "gpu", "commit", "date"]


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.6g}"
    return str(v)


# --------------------------------------------------------------------------- environment

def now_iso() -> str:
    """Local time, ISO 8601 with offset, to the second."""
    return _dt.datetime.now().astimezone().replace(microsecond=0).isoformat()


def git_commit(repo: str = REPO_ROOT) -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo,
                           capture_output=True, text=True, timeout=10)
        sha = r.stdout.strip()
        return sha if r.returncode == 0 and sha else "unknown"
    except Exception:
        return "unknown"


def gpu_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception:
        pass
    return "cpu"


def gpu_slug(name: str | None = None) -> str:
    """``"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"``."""
    name = gpu_name() if name is None else name
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-gpu"


def versions() -> tuple[str, str]:
    try:
        import torch
        tv = torch.__version__
    except Exception:
        tv = ""
    try:
        import triton
        trv = triton.__version__
    except Exception:
        trv = ""
    return tv, trv


def default_out_dir(name: str | None = None) -> str:
    return os.path.join(RESULTS_DIR, gpu_slug(name))


def l2_bytes(default: int = 50 * 2**20) -> int:
    try:
        import torch
        if torch.cuda.is_available():
            v = int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0))
            if v > 0:
                return v
    except Exception:
        pass
    return default


# --------------------------------------------------------------------------- timing

def n_rotating_sets(bytes_per_set: int, l2: int | None = None, factor: float = 2.0,
                    max_sets: int = 8, max_total: int = 4 * 2**30) -> int:
    """How many distinct input sets make the rotated working set exceed ``factor * L2``."""
    l2 = l2_bytes() if l2 is None else l2
    bytes_per_set = max(1, int(bytes_per_set))
    n = math.ceil(factor * l2 / bytes_per_set)
    n = min(n, max_sets, max(1, max_total // bytes_per_set))
    return max(1, n)


def rotating(fn: Callable, arg_sets: Sequence[tuple]) -> Callable[[], object]:
    """A no-argument callable that calls ``fn(*arg_sets[i])`` with i cycling."""
    cyc = itertools.cycle(arg_sets)
    if len(arg_sets) == 1:
        args = arg_sets[0]
        return lambda: fn(*args)
    return lambda: fn(*next(cyc))


def time_rotating(fn: Callable, arg_sets: Sequence[tuple], warmup_ms: float = 10.0,
                  rep_ms: float = 50.0) -> tuple[float, float, float]:
    """(p20, p50, p80) in ms of ``fn(*args)`` with ``args`` cycling over ``arg_sets``.

    ``do_bench`` warms up for ``warmup_ms``, then times each call with CUDA
    events for about ``rep_ms`` (it also flushes L2 between calls).
    """
    import triton.testing
    call = rotating(fn, arg_sets)
    qs = triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
    p20, p50, p80 = (float(q) for q in qs)
    return p20, p50, p80


def quantiles(samples: Sequence[float], qs=(0.2, 0.5, 0.8)) -> tuple[float, ...]:
    """Linear-interpolated quantiles (what torch.quantile gives), no numpy needed."""
    xs = sorted(float(v) for v in samples)
    if not xs:
        raise ValueError("no samples")
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(xs) - 1)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return tuple(out)


def time_rotating_cpu(fn: Callable, arg_sets: Sequence[tuple], warmup_ms: float = 10.0,
                      rep_ms: float = 50.0, min_reps: int = 3, max_reps: int = 1000) -> tuple[float, float, float]:
    """Host-clock version of :func:`time_rotating` for CPU tensors (dry runs of the harness)."""
    import time
    call = rotating(fn, arg_sets)
    t_end = time.perf_counter() + warmup_ms * 1e-3
    call()
    while time.perf_counter() < t_end:
        call()
    samples: list[float] = []
    t_end = time.perf_counter() + rep_ms * 1e-3
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t0) * 1e3)
    p20, p50, p80 = quantiles(samples)
    return p20, p50, p80


def measure_ceilings(size_mib: int = 1024, mm: int = 8192) -> tuple[float, float]:
    """Measured (TB/s device-to-device copy counting read+write, fp16 matmul TFLOP/s)."""
    import torch
    import triton.testing
    n = size_mib * 2**20 // 2
    a = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=5, rep=30, return_mode="median")
    tbps = 2 * a.numel() * 2 / (ms * 1e-3) / 1e12
    del a, b
    x = torch.randn(mm, mm, dtype=torch.float16, device="cuda")
    y = torch.randn(mm, mm, dtype=torch.float16, device="cuda")
    ms = triton.testing.do_bench(lambda: x @ y, warmup=5, rep=50, return_mode="median")
    tflops = 2 * mm**3 / (ms * 1e-3) / 1e12
    return tbps, tflops


def fill_throughput(row: Row, ceilings: tuple[float, float] | None = None) -> Row:
    """Set tflops / tbps / roofline from ``row.flops``, ``row.bytes`` and ``row.p50_ms``."""
    if row.p50_ms and row.p50_ms > 0:
        s = row.p50_ms * 1e-3
        if row.flops:
            row.tflops = row.flops / s / 1e12
        if row.bytes:
            row.tbps = row.bytes / s / 1e12
    if ceilings and row.bytes and row.flops:
        bw, peak = ceilings
        if bw > 0 and peak > 0:
            row.roofline_ms = max(row.bytes / (bw * 1e12), row.flops / (peak * 1e12)) * 1e3
            if row.p50_ms:
                row.pct_roofline = 100.0 * row.roofline_ms / row.p50_ms
    return row


def fill_ratios(rows: Iterable[Row]) -> list[Row]:
    """Per (op, case, dtype): speedup vs the dense row and vs the best peer.

    The best peer of a row is the fastest *other* peer backend that was timed
    in the same run (for sparsekit's own backends: the fastest peer overall).
    """
    rows = list(rows)
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.op, r.case, r.dtype), []).append(r)
    for grp in groups.values():
        timed = [r for r in grp if r.status == "ok" and r.p50_ms]
        dense = next((r for r in timed if r.backend == "dense"), None)
        peers = [r for r in timed if r.backend in PEER_BACKENDS]
        for r in timed:
            if dense is not None:
                r.speedup_vs_dense = dense.p50_ms / r.p50_ms
            others = [p for p in peers if p is not r]
            if others:
                best = min(others, key=lambda p: p.p50_ms)
                r.best_peer = best.backend
                r.speedup_vs_best_peer = best.p50_ms / r.p50_ms
    return rows


# --------------------------------------------------------------------------- writers

def write_csv(rows: Iterable[Row], path: str) -> str:
    """Append rows to ``path``; the header is written once (when the file is new).

    If the file exists with a different header (columns added since), it is
    rewritten once with the union of the columns, old rows kept.
    """
    rows = list(rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = [{k: _cell(v) for k, v in r.as_dict().items()} for r in rows]
    header = list(COLUMNS)
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    if exists:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_header = list(reader.fieldnames or [])
            if old_header != header:
                old_rows = list(reader)
                union = old_header + [c for c in header if c not in old_header]
                with open(path, "w", newline="") as g:
                    w = csv.DictWriter(g, fieldnames=union, restval="")
                    w.writeheader()
                    w.writerows(old_rows)
                header = union
            else:
                header = old_header
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, restval="", extrasaction="ignore")
        if not exists:
            w.writeheader()
        w.writerows(new)
    return path


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def markdown_table(rows: Iterable[Row], title: str | None = None) -> str:
    rows = list(rows)
    out = io.StringIO()
    if title:
        out.write(f"### {title}\n\n")
    if rows:
        r0 = rows[0]
        out.write(f"GPU: {r0.gpu or 'n/a'} | commit: {r0.commit or 'n/a'} | date: {r0.date or 'n/a'} | "
                  f"torch {r0.torch or '?'} | triton {r0.triton or '?'}\n\n")
    cols = ["case", "dtype", "backend", "p50_ms", "p20_ms", "p80_ms", "speedup_vs_dense",
            "speedup_vs_best_peer", "best_peer", "tflops", "tbps", "pct_roofline", "rel_err", "status", "note"]
    heads = ["case", "dtype", "backend", "p50 ms", "p20 ms", "p80 ms", "x dense",
             "x best peer", "best peer", "TFLOP/s", "TB/s", "% roofline", "rel err", "status", "note"]
    out.write("| " + " | ".join(heads) + " |\n")
    out.write("|" + "|".join("---:" if h not in ("case", "dtype", "backend", "best peer", "status", "note")
                             else "---" for h in heads) + "|\n")
    for r in rows:
        d = r.as_dict()
        note = d["note"]
        if d["chosen_backend"]:
            note = (f"chose {d['chosen_backend']}; " + note).rstrip("; ")
        cells = []
        for c in cols:
            v = note if c == "note" else d[c]
            if c in ("p50_ms", "p20_ms", "p80_ms"):
                cells.append("" if v is None else f"{v:.4f}")
            elif c in ("speedup_vs_dense", "speedup_vs_best_peer"):
                cells.append("" if v is None else f"{v:.2f}")
            elif c in ("tflops", "tbps", "pct_roofline"):
                cells.append("" if v is None else f"{v:.1f}" if c != "tbps" else f"{v:.2f}")
            elif c == "rel_err":
                cells.append("" if v is None else f"{v:.1e}")
            else:
                cells.append(str(v).replace("|", "/"))
        out.write("| " + " | ".join(cells) + " |\n")
    out.write("\nx dense / x best peer: time ratio (>1 = faster). TFLOP/s counts dense-equivalent 2*M*N*K; "
              "TB/s counts the weight as stored + x + y; % roofline = max(bytes/BW, flops/peak) / p50 "
              "with BW and peak measured on this GPU in the same run.\n")
    return out.getvalue()


def write_markdown(rows: Iterable[Row], path: str, title: str | None = None) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(markdown_table(rows, title))
    return path


def write_plot(rows: Iterable[Row], path: str, title: str | None = None, x_key: str = "M") -> str | None:
    """Speedup vs dense over ``x_key`` (log2), one panel per (rest of case, dtype), one line per backend."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.status == "ok" and r.speedup_vs_dense is not None]
    if not rows:
        return None
    panels: dict = {}
    for r in rows:
        kv = parse_case(r.case)
        if x_key not in kv:
            continue
        x = kv.pop(x_key)
        key = (format_case(kv), r.dtype)
        panels.setdefault(key, {}).setdefault(r.backend, []).append((x, r.speedup_vs_dense))
    if not panels:
        return None
    keys = sorted(panels)
    ncol = min(4, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for backend in sorted(panels[key]):
            pts = sorted(panels[key][backend])
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            style = "--" if backend == "dense" else "-"
            ax.plot(xs, ys, style, marker="o", ms=3, label=backend)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{key[0]} {key[1]}", fontsize=9)
        ax.set_xlabel(x_key)
        ax.set_ylabel("speedup vs dense")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_stamp(date: str | None = None, commit: str | None = None) -> str:
    """File-name stamp for one run: ``20261123T1140-abc1234``."""
    date = date or now_iso()
    d = re.sub(r"[^0-9T]", "", date.split("+")[0])[:13]
    return f"{d}-{commit or git_commit()}"


def write_run(rows: Sequence[Row], op: str, out_dir: str, plot: bool = True) -> list[str]:
    """CSV (appended) + markdown + plot for one op of one run; returns the paths written."""
    rows = list(rows)
    paths = [write_csv(rows, os.path.join(out_dir, f"{op}.csv"))]
    r0 = rows[0] if rows else None
    stamp = run_stamp(r0.date if r0 else None, r0.commit if r0 else None)
    title = f"{op} on {r0.gpu if r0 else '?'} ({stamp})"
    paths.append(write_markdown(rows, os.path.join(out_dir, f"{op}_{stamp}.md"), title))
    if plot:
        try:
            p = write_plot(rows, os.path.join(out_dir, f"{op}_{stamp}.png"), title)
            if p:
                paths.append(p)
        except Exception as e:  # a plotting problem must not lose the measurements
            print(f"[bench] plot failed: {type(e).__name__}: {e}")
    return paths


def rel_err(out, ref) -> float:
    """``||out - ref|| / ||ref||`` in float64 (sparsekit.testing's when present)."""
    try:
        from sparsekit.testing import rel_err as _re
        return float(_re(out, ref))
    except ImportError:
        pass
    o = out.detach().to("cpu").double()
    r = ref.detach().to("cpu").double()
    den = r.norm().item()
    num = (o - r).norm().item()
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def print_table(headers: Sequence[str], rows: Sequence[Sequence], file=None) -> None:
    """Plain fixed-width table on stdout."""
    srows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in srows]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line, file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for r in srows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)), file=file)


# --------------------------------------------------------------------------- one case: check, then time

@dataclass
class Backend:
    """One implementation to time on a case: ``fn(x, w)`` with per-input-set weights ``weights``.

    ``skip``: a reason not to run it (a ``skip`` row).  ``tol``: bound on the
    relative error vs the reference before it is timed.  ``ref_fn(x)``: its
    own fp32 reference (e.g. on fake-quantized activations); default: the
    case's.  ``peer``: a failure of a peer is a ``skip`` row (it could not run
    here), of sparsekit or dense a ``fail`` row.
    """

    name: str
    fn: Callable | None
    weights: Sequence = ()
    weight_bytes: int = 0
    skip: str = ""
    tol: float = 1e-2
    ref_fn: Callable | None = None
    note: str = ""
    peer: bool = False


def _short(e: BaseException, n: int = 200) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) <= n else s[: n - 3] + "..."


def time_case(op: str, case: str, dtype: str, backends: Sequence[Backend], xs: Sequence, ref, *,
              flops: int | None, io_bytes: int, ctx: dict | None = None, timer: Callable | None = None,
              warmup_ms: float = 10.0, rep_ms: float = 50.0, ceilings: tuple | None = None,
              sync: Callable | None = None, choose: Callable | None = None, log=print) -> list[Row]:
    """Rows for one case: each backend is run once and checked against ``ref`` (or its own
    ``ref_fn``); only backends within their ``tol`` are timed (``timer``, default
    :func:`time_rotating`, over ``zip(xs, backend.weights)``).  ``choose(x)``: the backend
    name sparsekit's automatic dispatch picks (recorded on a ``sparsekit_auto`` row).
    Throughput columns are filled; ratios are left to :func:`fill_ratios` over the group."""
    timer = timer or time_rotating
    sync = sync or (lambda: None)
    rows: list[Row] = []
    for b in backends:
        row = Row(op=op, case=case, backend=b.name, dtype=dtype, n_sets=len(xs), flops=flops,
                  bytes=b.weight_bytes + io_bytes, note=b.note, **(ctx or {}))
        if b.skip:
            row.status, row.note = "skip", b.skip
            row.bytes = row.flops = None
            rows.append(row)
            continue
        try:
            if b.name == "sparsekit_auto" and choose is not None:
                row.chosen_backend = choose(xs[0])
            out = b.fn(xs[0], b.weights[0])
            sync()
            r = b.ref_fn(xs[0]) if b.ref_fn is not None else ref
            if tuple(out.shape) != tuple(r.shape):
                raise ValueError(f"output shape {tuple(out.shape)} != {tuple(r.shape)}")
            row.rel_err = rel_err(out.float(), r)
        except Exception as e:
            row.status = "skip" if b.peer else "fail"
            row.note = ("could not run: " if b.peer else "error: ") + _short(e)
            rows.append(row)
            log(f"[{op}] {case} {dtype} {b.name}: {row.status}: {row.note}")
            continue
        if not (row.rel_err < b.tol):
            row.status = "skip" if b.peer else "fail"
            row.note = f"rel_err {row.rel_err:.3g} >= {b.tol:g} vs the reference: not timed"
            rows.append(row)
            log(f"[{op}] {case} {dtype} {b.name}: {row.status}: {row.note}")
            continue
        try:
            row.p20_ms, row.p50_ms, row.p80_ms = timer(b.fn, list(zip(xs, b.weights)),
                                                       warmup_ms=warmup_ms, rep_ms=rep_ms)
        except Exception as e:
            row.status, row.note = "fail", "timing error: " + _short(e)
        fill_throughput(row, ceilings)
        rows.append(row)
    return rows


def print_cpu_table(rows: Sequence[Row], file=None) -> None:
    """The CPU correctness sweep's table: case, dtype, backend (and the automatic choice), rel_err, pass."""
    table = []
    for r in rows:
        be = r.backend + (f" ({r.chosen_backend})" if r.chosen_backend else "")
        table.append([r.case, r.dtype, be, "" if r.rel_err is None else f"{r.rel_err:.2e}",
                      "PASS" if r.status == "ok" else "FAIL", r.note])
    print_table(["case", "dtype", "backend", "rel_err", "pass", "note"], table, file=file)
