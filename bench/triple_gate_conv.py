"""Benchmark and CPU correctness sweep for ``triple_gate_conv2d`` (gated video conv).

GPU (``run_gpu``): a 3x3 conv (stride 1, padding 1, C_in = C_out = C, tile 8)
on one frame of ``N x C x H x W`` (``shapes`` are ``(C, H)`` pairs with
``W = H``; ``ms`` are the batch sizes ``N``), for each UPDATE density in
``densities`` (the rest REUSE), timed in the same run:

* ``dense``   cuDNN ``F.conv2d`` -- NCHW and channels_last are both timed and
              the faster is the row (``note`` gives both); the baseline
* ``triton``  sparsekit's Triton implicit-GEMM conv over the UPDATE tiles
              (autotuned tile sizes; ``note`` names the configuration),
              three stages told apart by the ``stage`` key of the case:
  - ``stage=conv``  the conv on a given gate map (tile list prepared),
  - ``stage=frame`` a whole frame: gate map + tile list from two frames
    (fused Triton kernels) and the conv -- what the module costs per frame,
  - ``stage=gate``  the gate map + tile list alone (its overhead; "x dense"
    there is dense time / gate time).

On CUDA every backend (dense included) is timed as CUDA-graph replays (one
graph per rotated input set): at these sizes one cuDNN call takes ~10-100 us
and the host's per-call Python/launch overhead would otherwise be measured
instead of the GPU; the eager p50 stays in ``note`` (``graphs=False`` turns
this off).

The frames of ``stage=frame`` differ from the previous frame at the centre
pixel of the chosen tiles only, so the gate selects exactly those tiles; the
realized density is checked.  Every timed output is first compared with fp32
math (``F.conv2d`` composed with the gate map; rel err < 1e-2).

CPU (``cpu_sweep``): no timings; the ``interpret`` and ``reference`` backends
and the automatic choice against float64 math on small odd shapes (stride 2,
dilation, 1x1 / 5x5, tile 1 / 4 / 8), fp32 / fp16 / bf16, both stages.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from . import harness
from .harness import Row, format_case

OP = "triple_gate_conv2d"

SHAPES = [(64, 128), (128, 128), (256, 128), (64, 256), (128, 256), (256, 256)]   # (C, H = W)
MS = [1]                                                                           # batch N
QUICK_SHAPES = [(128, 128), (256, 256)]
QUICK_MS = [1]
DENSITIES = (0.1, 0.25, 0.5, 1.0)
STAGES = ("conv", "frame", "gate")
KERNEL = 3
TILE = 8
PLOT_X = "density"        # the case key to plot the speedup over
GPU_TOL = 1e-2
BACKENDS = ("dense", "triton")
OWN_FORCED = ("triton", "interpret", "reference")
CPU_TIMING_BACKENDS = ("dense", "interpret", "reference")
CPU_QUICK_SHAPES = [(16, 16)]
CPU_QUICK_MS = [1]
CPU_DENSITIES = (0.25, 1.0)

# CPU sweep: (N, C, CO, H, W, k, stride, padding, dilation, tile, density)
CPU_CASES = [
    (1, 16, 17, 13, 11, 3, 1, 1, 1, 4, 0.5),
    (2, 16, 16, 15, 13, 3, 2, 1, 1, 4, 0.25),
    (1, 20, 16, 11, 13, 3, 1, 2, 2, 8, 0.5),
    (1, 16, 24, 9, 11, 1, 1, 0, 1, 1, 0.25),
    (2, 16, 16, 11, 9, 5, 1, 2, 1, 4, 1.0),
]
CPU_QUICK_CASES = CPU_CASES[:2]
CPU_DTYPES = ("fp32", "fp16", "bf16")
CPU_TOL = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 1e-2}

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# The rows `make gpu-check` times (see bench/sparse24.py GPU_CHECK for the fields).  The targets:
# >= 2.4x over cuDNN at 25% UPDATE density, break-even at >= 60%, < 5% overhead at 100%.
GPU_CHECK = {
    "d25_60_100": dict(
        decides="triple-gate conv at 25% / 60% / 100% UPDATE tiles vs the best cuDNN layout (3x3, C = 128, 256)",
        kwargs=dict(shapes=[(128, 256), (256, 256)], ms=[1], dtypes=["fp16"], densities=(0.25, 0.6, 1.0),
                    backends=("dense", "triton")),
        predict_s=10, warm_s=30),
}


def plan_rows(entry: str = "run_gpu", shapes=SHAPES, ms=MS, dtypes=("fp16",), backends=BACKENDS,
              densities=DENSITIES, stages=STAGES, **_) -> list[dict]:
    """The (op, case, dtype, backends) rows ``run_gpu(**kwargs)`` produces on a GPU, in order."""
    rows = []
    for dname in dtypes:
        for (c, h) in shapes:
            for n in ms:
                for density in densities:
                    base = dict(density=density, C=c, H=h, W=h, k=KERNEL, N=n, tile=TILE)
                    for stage in stages:
                        rows.append(dict(op=OP, case=format_case(base, stage=stage), dtype=dname,
                                         backends=list(backends)))
    return rows


def _ops():
    from sparsekit.ops import dispatch
    from sparsekit.ops import triple_gate_conv as ops
    return ops, dispatch


def _short(e: BaseException, n: int = 200) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace(",", ";")
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def random_gate(n: int, th: int, tw: int, density: float, device, gen: torch.Generator) -> torch.Tensor:
    """An int8 gate map with exactly ``round(density * T)`` UPDATE tiles, the rest REUSE."""
    ops, _ = _ops()
    t = n * th * tw
    k = int(round(density * t))
    perm = torch.randperm(t, generator=gen, device=gen.device).to(device)
    g = torch.full((t,), ops.REUSE, dtype=torch.int8, device=device)
    g[perm[:k]] = ops.UPDATE
    return g.reshape(n, th, tw)


def frames_for_gate(gate: torch.Tensor, c: int, h: int, w: int, dtype, gen: torch.Generator, tile: int = TILE,
                    memory_format=torch.channels_last):
    """(x_prev, x): random frames that differ at the centre input pixel of each UPDATE tile
    (3x3, stride 1, padding 1: that pixel's outputs stay inside the tile)."""
    n = gate.shape[0]
    dev = gate.device
    xp = torch.randn(n, c, h, w, device=dev, dtype=torch.float32, generator=gen).to(dtype)
    x = xp.clone()
    idx = gate.nonzero()
    if idx.numel():
        r = (idx[:, 1] * tile + tile // 2).clamp(max=h - 1)
        q = (idx[:, 2] * tile + tile // 2).clamp(max=w - 1)
        x[idx[:, 0], :, r, q] += 1.0
    return xp.contiguous(memory_format=memory_format), x.contiguous(memory_format=memory_format)


def _composed64(prev, x, w, b, gate, stride, padding, dilation, tile):
    ops, _ = _ops()
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding, dilation)
    ho, wo = ref.shape[2:]
    pg = ops.pixel_gate(gate, tile, ho, wo)
    bias = (b.double() if b is not None else torch.zeros(ref.shape[1], dtype=torch.float64, device=ref.device))
    bias = bias[None, :, None, None].expand_as(ref)
    return torch.where(pg == ops.UPDATE, ref, torch.where(pg == ops.SKIP, bias, prev.double()))


def graph_timer(timer: Callable) -> Callable:
    """``timer`` applied to CUDA-graph replays of ``fn(*args)`` (one graph per input set):
    GPU time without the host's Python/launch overhead, which dominates small frames."""
    def timed(fn, arg_sets, warmup_ms=10.0, rep_ms=50.0):
        graphs = []
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for args in arg_sets:
                fn(*args)
                fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        for args in arg_sets:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn(*args)
            graphs.append(g)
        return timer(lambda g: g.replay(), [(g,) for g in graphs], warmup_ms=warmup_ms, rep_ms=rep_ms)
    return timed


def _timed(row: Row, fn, args, timer, warmup_ms, rep_ms, use_graphs: bool) -> None:
    """Eager timing; with ``use_graphs`` the row's p20/p50/p80 are CUDA-graph replays and
    the note keeps the eager p50 (both methods time every backend the same way)."""
    eager = timer(fn, args, warmup_ms=warmup_ms, rep_ms=rep_ms)
    row.p20_ms, row.p50_ms, row.p80_ms = eager
    if not use_graphs:
        return
    try:
        row.p20_ms, row.p50_ms, row.p80_ms = graph_timer(timer)(fn, args, warmup_ms=warmup_ms, rep_ms=rep_ms)
        row.note = (row.note + "; " if row.note else "") + f"CUDA graph replay; eager p50 {eager[1]:.4f} ms"
    except Exception as e:  # capture failed: keep the eager numbers
        row.note = (row.note + "; " if row.note else "") + f"eager (graph capture failed: {_short(e, 80)})"


def _conv_config_note() -> str:
    """Which conv tile configuration ran (the autotuner's pick for the last key, or the heuristic)."""
    from sparsekit import kernels
    kmod = kernels.load("triple_gate_conv")
    tuned = getattr(kmod, "_tuned", None)
    if kmod.autotune_enabled() and tuned is not None and getattr(tuned, "best_config", None) is not None:
        return "autotuned " + str(tuned.best_config).replace(",", "")
    return "heuristic config (SPARSEKIT_TGC_AUTOTUNE=0)"


def _kernel_weight(w: torch.Tensor) -> torch.Tensor:
    """The layout TripleGateConv2d hands the kernel: CO contiguous."""
    return w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


# --------------------------------------------------------------------------- GPU benchmark

def run_gpu(shapes: Iterable[tuple[int, int]] = SHAPES, ms: Iterable[int] = MS,
            dtypes: Iterable[str] = ("fp16",), backends: Sequence[str] = BACKENDS,
            warmup_ms: float = 10.0, rep_ms: float = 50.0, ctx: dict | None = None,
            on_rows: Callable[[list[Row]], None] | None = None, log=print, seed: int = 0,
            device="cuda", timer: Callable | None = None, densities: Sequence[float] | None = None,
            stages: Sequence[str] = STAGES, graphs: bool | None = None) -> list[Row]:
    """Time every backend on every case (``device="cpu"`` + a CPU timer = a dry run of the harness).

    ``graphs`` (default: on for CUDA): time CUDA-graph replays of every backend
    (dense included) -- the per-call Python and launch overhead of the host
    would otherwise dominate the small frames; the eager p50 is kept in ``note``.
    """
    ops, dispatch = _ops()
    ctx = dict(ctx or {})
    ceilings = ctx.pop("ceilings", None)
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    timer = timer or harness.time_rotating
    use_graphs = on_gpu if graphs is None else (bool(graphs) and on_gpu)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    densities = list(densities if densities is not None else (DENSITIES if on_gpu else CPU_DENSITIES))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    old_bench = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    all_rows: list[Row] = []
    k, s, p, d, tile = KERNEL, 1, 1, 1, TILE
    try:
        for dname in dtypes:
            dtype = DTYPES[dname]
            it = torch.empty((), dtype=dtype).element_size()
            for (c, h) in shapes:
                w_ = h
                for n in ms:
                    ho, wo = ops.conv_output_size(h, w_, k, s, p, d)
                    th, tw = ops.tile_grid(ho, wo, tile)
                    flops = 2 * n * ho * wo * c * c * k * k
                    io_bytes = (n * c * h * w_ + n * c * ho * wo + c * c * k * k + c) * it
                    n_sets = harness.n_rotating_sets(io_bytes) if on_gpu else 2
                    wts = [(torch.randn(c, c, k, k, device=device, generator=gen) * (c * k * k) ** -0.5).to(dtype)
                           for _ in range(n_sets)]
                    bias = (torch.randn(c, device=device, generator=gen) * 0.1).to(dtype)
                    kws = [_kernel_weight(wt) for wt in wts]
                    dense_row = None
                    group: list[Row] = []
                    for density in densities:
                        gates = [random_gate(n, th, tw, density, device, gen) for _ in range(n_sets)]
                        frames = [frames_for_gate(g, c, h, w_, dtype, gen, tile) for g in gates]
                        prevs = [torch.randn(n, c, ho, wo, device=device, generator=gen).to(dtype)
                                 .contiguous(memory_format=torch.channels_last) for _ in range(n_sets)]
                        lists = [ops.compact_gates(g, (ho, wo), tile, backend="reference" if not on_gpu else None)
                                 for g in gates]
                        base = dict(density=density, C=c, H=h, W=w_, k=k, N=n, tile=tile)
                        # ---- dense baseline (timed once per shape; the same row for every density)
                        if "dense" in backends and dense_row is None:
                            dense_row = _time_dense(frames, wts, bias, s, p, d, timer, warmup_ms, rep_ms, sync,
                                                    dname, n_sets, ctx, log, use_graphs)
                        for stage in stages:
                            case = format_case(base, stage=stage)
                            stage_rows: list[Row] = []
                            if dense_row is not None:
                                dr = Row(**{**dense_row.as_dict(), "case": case})
                                dr.flops, dr.bytes = flops, io_bytes
                                harness.fill_throughput(dr, ceilings)
                                stage_rows.append(dr)
                            for name in backends:
                                if name == "dense":
                                    continue
                                row = Row(op=OP, case=case, backend=name, dtype=dname, n_sets=n_sets,
                                          flops=flops, bytes=io_bytes, **ctx)
                                if name not in OWN_FORCED:
                                    row.status, row.note = "skip", f"unknown backend {name!r}"
                                    stage_rows.append(row)
                                    continue
                                ok, why = dispatch._op_backends(OP)[name](device)
                                if not ok:
                                    row.status, row.note = "skip", why
                                    stage_rows.append(row)
                                    continue
                                _time_own(row, name, stage, frames, kws, wts, bias, gates, lists, prevs,
                                          (s, s), (p, p), (d, d), tile, density, timer, warmup_ms, rep_ms, sync,
                                          ceilings, log, use_graphs)
                                stage_rows.append(row)
                            harness.fill_ratios(stage_rows)
                            group.extend(stage_rows)
                        del gates, frames, prevs, lists
                    for r in group:
                        if r.status == "ok":
                            log(f"[{OP}] {r.case:>62} {r.dtype} {r.backend:>7}: p50 {r.p50_ms:8.4f} ms  "
                                f"x dense {r.speedup_vs_dense or float('nan'):5.2f}")
                    if on_rows is not None:
                        on_rows(group)
                    all_rows.extend(group)
                    del wts, kws
                    if on_gpu:
                        torch.cuda.empty_cache()
    finally:
        torch.backends.cudnn.benchmark = old_bench
    return all_rows


def _time_dense(frames, wts, bias, s, p, d, timer, warmup_ms, rep_ms, sync, dname, n_sets, ctx, log,
                use_graphs=False) -> Row:
    """cuDNN F.conv2d in NCHW and channels_last; the faster layout is the dense row."""
    row = Row(op=OP, case="", backend="dense", dtype=dname, n_sets=n_sets, **ctx)
    timings = {}
    for layout, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        xs = [x.contiguous(memory_format=fmt) for _, x in frames]
        ws = [w.contiguous(memory_format=fmt) for w in wts]
        fn = lambda x, w: F.conv2d(x, w, bias, s, p, d)  # noqa: E731
        try:
            out = fn(xs[0], ws[0])
            sync()
            ref = F.conv2d(xs[0].float(), ws[0].float(), bias.float(), s, p, d)
            err = harness.rel_err(out.float(), ref)
            if not err < GPU_TOL:
                raise ValueError(f"rel_err {err:.3g} vs fp32")
            r = Row(op=OP, case="", backend="dense", dtype=dname)
            _timed(r, fn, list(zip(xs, ws)), timer, warmup_ms, rep_ms, use_graphs)
            timings[layout] = r
        except Exception as e:
            log(f"[{OP}] dense {layout}: {_short(e)}")
    if not timings:
        row.status, row.note = "fail", "cuDNN conv failed in both layouts"
        return row
    best = min(timings, key=lambda k: timings[k].p50_ms)
    b = timings[best]
    row.p20_ms, row.p50_ms, row.p80_ms = b.p20_ms, b.p50_ms, b.p80_ms
    row.note = (f"cuDNN {best}; " + "; ".join(f"{k} p50 {v.p50_ms:.4f} ms" for k, v in timings.items())
                + (f"; {b.note}" if b.note else ""))
    return row


def _time_own(row, name, stage, frames, kws, wts, bias, gates, lists, prevs, stride, padding, dilation, tile,
              density, timer, warmup_ms, rep_ms, sync, ceilings, log, use_graphs=False) -> None:
    ops, _ = _ops()
    k = wts[0].shape[-1]
    outs = [pv.clone() for pv in prevs]
    try:
        if stage == "gate":
            def fn(xp, x):
                return ops.triple_gate_map(x, xp, k, stride, padding, dilation, tile, 0.0, backend=name)
            g = fn(*frames[0])
            sync()
            if not torch.equal(g.gate, gates[0]):
                raise ValueError("gate map differs from the intended one")
            args = list(frames)
        elif stage == "conv":
            def fn(x, w, gl, out):
                return ops.triple_gate_conv2d(x, w, bias, gl, out, stride, padding, dilation, tile, backend=name)
            fn(frames[0][1], kws[0], lists[0], outs[0])
            sync()
            ref = _composed64(prevs[0], frames[0][1], wts[0], bias, gates[0], stride, padding, dilation, tile)
            row.rel_err = harness.rel_err(outs[0].float(), ref)
            args = [(fr[1], kw, gl, o) for fr, kw, gl, o in zip(frames, kws, lists, outs)]
        else:  # frame: gate + conv
            def fn(xp, x, w, out):
                g = ops.triple_gate_map(x, xp, k, stride, padding, dilation, tile, 0.0, backend=name)
                return ops.triple_gate_conv2d(x, w, bias, g, out, stride, padding, dilation, tile, backend=name)
            fn(frames[0][0], frames[0][1], kws[0], outs[0])
            sync()
            ref = _composed64(prevs[0], frames[0][1], wts[0], bias, gates[0], stride, padding, dilation, tile)
            row.rel_err = harness.rel_err(outs[0].float(), ref)
            args = [(fr[0], fr[1], kw, o) for fr, kw, o in zip(frames, kws, outs)]
        if row.rel_err is not None and not row.rel_err < GPU_TOL:
            row.status, row.note = "fail", f"rel_err {row.rel_err:.3g} >= {GPU_TOL:g} vs fp32 math: not timed"
            log(f"[{OP}] {row.case} {row.dtype} {name}: {row.note}")
            return
    except Exception as e:
        row.status, row.note = "fail", "error: " + _short(e)
        log(f"[{OP}] {row.case} {row.dtype} {name}: {row.note}")
        return
    row.note = f"realized density {float(gates[0].float().mean()):.3f}"
    try:
        _timed(row, fn, args, timer, warmup_ms, rep_ms, use_graphs)
    except Exception as e:
        row.status, row.note = "fail", "timing error: " + _short(e)
        return
    if name == "triton" and stage != "gate":
        row.note += "; " + _conv_config_note()
    harness.fill_throughput(row, ceilings)


# --------------------------------------------------------------------------- CPU correctness sweep

def cpu_sweep(quick: bool = False, dtypes: Sequence[str] = CPU_DTYPES,
              backends: Sequence[str] = ("interpret", "reference", "sparsekit_auto"),
              cases=None, seed: int = 0, log=print) -> tuple[list[Row], bool]:
    """Compare sparsekit's CPU backends with float64 math (conv stage on a random gate
    map; frame stage = gate op + conv on frames built for that gate map)."""
    ops, _ = _ops()
    gen = torch.Generator().manual_seed(seed)
    rows: list[Row] = []
    ctx = dict(gpu="cpu", commit=harness.git_commit(), date=harness.now_iso())
    ctx["torch"], ctx["triton"] = harness.versions()
    for (n, c, co, h, w, k, s, p, d, tile, density) in (cases if cases is not None else
                                                         (CPU_QUICK_CASES if quick else CPU_CASES)):
        ho, wo = ops.conv_output_size(h, w, k, s, p, d)
        th, tw = ops.tile_grid(ho, wo, tile)
        for dname in dtypes:
            if dname not in DTYPES:
                continue
            dtype = DTYPES[dname]
            wt = (torch.randn(co, c, k, k, generator=gen) * (c * k * k) ** -0.5).to(dtype)
            b = (torch.randn(co, generator=gen) * 0.1).to(dtype)
            gate = random_gate(n, th, tw, density, "cpu", gen)
            xp = torch.randn(n, c, h, w, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
            x = xp.clone()
            x[:, :, : h // 2, : w // 3] += 0.5                 # frame stage: a local change
            prev = torch.randn(n, co, ho, wo, generator=gen).to(dtype)
            for stage in ("conv", "frame"):
                case = format_case(density=density, N=n, C=c, CO=co, H=h, W=w, k=k, stride=s, padding=p,
                                   dilation=d, tile=tile, stage=stage)
                for name in backends:
                    row = Row(op=OP, case=case, backend=name, dtype=dname, **ctx)
                    be = None if name == "sparsekit_auto" else name
                    try:
                        if name == "sparsekit_auto":
                            import sparsekit.ops.dispatch as dsp
                            row.chosen_backend = dsp.resolve(OP, x.device, None, n * ho * wo)
                        out = prev.clone()
                        if stage == "conv":
                            g = gate
                            ops.triple_gate_conv2d(x, wt, b, g, out, s, p, d, tile, backend=be)
                        else:
                            gl = ops.triple_gate_map(x, xp, k, s, p, d, tile, 0.25, backend=be)
                            g = gl.gate
                            gr = ops.triple_gate_map(x, xp, k, s, p, d, tile, 0.25, backend="reference").gate
                            if not torch.equal(g, gr):
                                raise ValueError("gate map differs from the reference gate map")
                            ops.triple_gate_conv2d(x, wt, b, gl, out, s, p, d, tile, backend=be)
                        ref = _composed64(prev, x, wt, b, g, (s, s), (p, p), (d, d), tile)
                        row.rel_err = harness.rel_err(out, ref)
                        finite = bool(torch.isfinite(out).all())
                        tol = CPU_TOL[dname]
                        row.status = "ok" if finite and row.rel_err < tol else "fail"
                        row.note = f"tol {tol:g}" + ("" if finite else "; non-finite output")
                        if stage == "frame":
                            row.note += f"; {int((g == ops.UPDATE).sum())}/{g.numel()} tiles updated"
                    except Exception as e:
                        row.status, row.note = "fail", "error: " + _short(e)
                    rows.append(row)
    return rows, all(r.status == "ok" for r in rows)


print_cpu_table = harness.print_cpu_table
