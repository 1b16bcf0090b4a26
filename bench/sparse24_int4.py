"""Benchmark and CPU correctness sweep for ``sparse24_int4_linear`` (2:4 sparse weight, int4 kept values).

GPU (``run_gpu``): a random weight is pruned 2:4 by magnitude and its kept
values quantized to int4 (RTN, asymmetric, group 64 compressed columns =
128 input features, fp16 scales).  For each dtype, shape (N, K) and batch M,
time in the same run

* ``dense``          ``F.linear`` on the dequantized dense weight (cuBLAS; the baseline)
* ``triton``         sparsekit's 2:4+int4 Triton kernel
* ``sparsekit_auto`` sparsekit's own choice (``chosen_backend`` says which)
* ``triton_24``      sparsekit's 2:4 kernel with fp16 kept values (same mask, unquantized values)
* ``triton_int4``    sparsekit's W4A16 kernel on the dense-with-zeros weight (int4, group 128)
* ``cusparselt`` / ``cutlass24``  torch's semi-structured 2:4 (fp16 values) where available

The two single-compression rows show what each half of the scheme buys;
every row is checked against fp32 math on its own weight before it is timed
(a failing sparsekit row is reported, not timed).

CPU (``cpu_sweep``): no timings; the ``interpret`` and ``reference``
backends and the automatic choice vs float64 math on the dequantized
weight, on small odd shapes, fp16 and bf16 (and float32 activations).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from . import harness
from .harness import Backend, Row, format_case

OP = "sparse24_int4_linear"

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)]
MS = [1, 4, 16, 64, 256, 4096]
QUICK_SHAPES = [(4096, 4096), (11008, 4096)]
QUICK_MS = [1, 16, 256, 4096]
GROUP_SIZE = 64            # compressed columns (128 input features)
GPU_TOL = 1e-2
BACKENDS = ("dense", "triton", "sparsekit_auto", "triton_24", "triton_int4", "cusparselt", "cutlass24")
CPU_TIMING_BACKENDS = ("dense", "interpret", "reference", "sparsekit_auto")
CPU_QUICK_SHAPES = [(33, 128)]
CPU_QUICK_MS = [1, 17]
CPU_CASES = [(33, 128, 32), (70, 96, -1), (20, 256, 64)]
CPU_MS = [1, 3, 17]
CPU_QUICK_CASES = [(33, 128, 32)]
CPU_DTYPES = ("fp16", "bf16")
CPU_TOL = {"fp16": 1e-3, "bf16": 1e-2, "fp32": 1e-5}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# The rows `make gpu-check` times (see bench/sparse24.py GPU_CHECK for the fields).
GPU_CHECK = {
    "fp16": dict(
        decides="2:4 + int4 vs cuBLAS, each half alone (2:4 fp16, dense int4) and cuSPARSELt",
        kwargs=dict(shapes=[(4096, 4096), (8192, 8192)], ms=[1, 16, 4096], dtypes=["fp16"],
                    backends=("dense", "triton", "triton_24", "triton_int4", "cusparselt")),
        predict_s=10, warm_s=20),
}


def plan_rows(entry: str = "run_gpu", shapes=SHAPES, ms=MS, dtypes=("fp16",), backends=BACKENDS, **_) -> list[dict]:
    """The (op, case, dtype, backends) rows ``run_gpu(**kwargs)`` produces on a GPU, in order."""
    order = ["dense", "triton", "interpret", "reference", "sparsekit_auto", "triton_24", "triton_int4",
             "cutlass24", "cusparselt"]
    bks = [b for b in order if b in backends]
    return [dict(op=OP, case=format_case(M=m, N=n, K=k, group=plan_group(k)), dtype=dname, backends=bks)
            for dname in dtypes for (n, k) in shapes for m in ms]


def plan_group(k: int, requested: int = GROUP_SIZE) -> int:
    """The ``group`` of a case string -- the weight's effective group size in compressed columns --
    without importing sparsekit (the gpu-check plan is printed before the checkout is installed).
    Mirrors ``_group`` + ``Sparse24Int4Weight.effective_group_size``; tests hold them equal."""
    kc = (k + 15) // 16 * 16 // 2
    if kc % requested == 0:
        return requested
    return next((g for g in (128, 64, 32) if kc % g == 0), kc)


def _group(k: int, requested: int = GROUP_SIZE) -> int:
    from sparsekit.formats.sparse24_int4 import compressed_group_size

    try:
        return compressed_group_size(k, requested)
    except ValueError:
        return compressed_group_size(k)


def make_weight(n: int, k: int, dtype: torch.dtype, device, gen: torch.Generator | None = None,
                group_size: int | None = None):
    """(masked dense fp weight, Sparse24Int4Weight, bias) on ``device``; scales in ``dtype``
    (float16 for float32 activations)."""
    from sparsekit.formats.sparse24_int4 import Sparse24Int4Weight
    from sparsekit.prune import mask_2to4

    w = torch.randn(n, k, device=device, generator=gen) * k ** -0.5
    w = w * mask_2to4(w)
    sdt = dtype if dtype != torch.float32 else torch.float16
    q = Sparse24Int4Weight.from_dense(w, group_size=group_size if group_size is not None else _group(k), dtype=sdt)
    b = (torch.randn(n, device=device, generator=gen) * 0.1).to(dtype)
    return w, q, b


def _prepare(n, k, dtype, n_sets, wanted, gen, device):
    from sparsekit import ops
    from sparsekit.formats import Int4Weight, Sparse24Weight

    dev = torch.device(device)
    ws, qs, dense = [], [], []
    bias = None
    for _ in range(n_sets):
        w, q, b = make_weight(n, k, dtype, dev, gen)
        ws.append(w)
        qs.append(q)
        dense.append(q.to_dense().to(dtype))
        bias = b if bias is None else bias
    it = torch.empty((), dtype=dtype).element_size()
    out: list[Backend] = []

    if "dense" in wanted:
        out.append(Backend("dense", lambda x, w: F.linear(x, w, bias), dense, n * k * it, tol=GPU_TOL))
    own = "triton" if dev.type == "cuda" else "interpret"
    avail = ops.available_backends(OP, dev)
    for name in ("triton", "interpret", "reference"):
        if name in wanted:
            out.append(Backend(name, lambda x, w, _b=name: ops.sparse24_int4_linear(x, w, bias, backend=_b), qs,
                               qs[0].nbytes(), tol=GPU_TOL,
                               skip="" if name in avail else f"{name} backend not available on {dev.type}"))
    if "sparsekit_auto" in wanted:
        out.append(Backend("sparsekit_auto", lambda x, w: ops.sparse24_int4_linear(x, w, bias), qs, qs[0].nbytes(),
                           tol=GPU_TOL))
    if "triton_24" in wanted:
        try:
            sp = [Sparse24Weight.from_dense(w.to(dtype)) for w in ws]
            out.append(Backend("triton_24", lambda x, w: ops.sparse24_linear(x, w, bias, backend=own), sp,
                               sp[0].nbytes(), tol=GPU_TOL,
                               ref_fn=lambda x, _w=ws[0]: F.linear(x.float(), _w.float(), bias.float()),
                               note="2:4 fp values (unquantized)"))
        except Exception as e:
            out.append(Backend("triton_24", None, skip=f"could not build: {harness._short(e)}"))
    if "triton_int4" in wanted:
        try:
            sdt = dtype if dtype != torch.float32 else torch.float16
            i4 = [Int4Weight.from_float(w, 128 if k % 128 == 0 else -1, dtype=sdt) for w in ws]
            ok = dtype in (torch.float16, torch.bfloat16)
            out.append(Backend("triton_int4", lambda x, w: ops.int4_linear(x, w, bias, backend=own), i4,
                               i4[0].nbytes(), tol=GPU_TOL,
                               ref_fn=lambda x, _q=i4[0]: F.linear(x.float(), _q.dequantize().float(), bias.float()),
                               skip="" if ok else "W4A16 takes fp16/bf16 activations",
                               note="dense int4 (zeros kept)"))
        except Exception as e:
            out.append(Backend("triton_int4", None, skip=f"could not build: {harness._short(e)}"))
    for name, cutlass in (("cutlass24", True), ("cusparselt", False)):
        if name not in wanted:
            continue
        try:
            if dev.type != "cuda":
                raise RuntimeError("needs CUDA")
            from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

            SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
            if not cutlass and not torch.backends.cusparselt.is_available():
                raise RuntimeError("torch.backends.cusparselt.is_available() is False")
            sw = [to_sparse_semi_structured(w.to(dtype)) for w in ws]
            out.append(Backend(name, lambda x, w: F.linear(x, w, bias), sw, n * k * it // 2 + n * k // 8,
                               tol=GPU_TOL, peer=True,
                               ref_fn=lambda x, _w=ws[0]: F.linear(x.float(), _w.float(), bias.float()),
                               note="2:4 fp values (unquantized)"))
        except Exception as e:
            out.append(Backend(name, None, skip=f"unavailable: {harness._short(e)}", peer=True))
    return out, qs, bias


def run_gpu(shapes: Iterable[tuple[int, int]] = SHAPES, ms: Iterable[int] = MS,
            dtypes: Iterable[str] = ("fp16",), backends: Sequence[str] = BACKENDS,
            warmup_ms: float = 10.0, rep_ms: float = 50.0, ctx: dict | None = None,
            on_rows: Callable[[list[Row]], None] | None = None, log=print, seed: int = 0,
            device="cuda", timer: Callable | None = None) -> list[Row]:
    """Time every backend on every case (``device="cpu"`` + a CPU timer = a dry run of the harness)."""
    import sparsekit.ops as ops_pkg

    ctx = dict(ctx or {})
    ceilings = ctx.pop("ceilings", None)
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    rows_all: list[Row] = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        it = torch.empty((), dtype=dtype).element_size()
        for (n, k) in shapes:
            qbytes = n * k // 4 + n * k // 8
            n_sets = harness.n_rotating_sets(qbytes) if on_gpu else 2
            bk, qs, bias = _prepare(n, k, dtype, n_sets, backends, gen, device)
            group: list[Row] = []
            for m in ms:
                xs = [torch.randn(m, k, device=device, generator=gen).to(dtype) for _ in range(n_sets)]
                ref = F.linear(xs[0].float(), qs[0].to_dense().float(), bias.float())
                group += harness.time_case(
                    OP, format_case(M=m, N=n, K=k, group=qs[0].effective_group_size), dname, bk, xs, ref,
                    flops=2 * m * n * k, io_bytes=(m * k + m * n + n) * it, ctx=ctx, timer=timer,
                    warmup_ms=warmup_ms, rep_ms=rep_ms, ceilings=ceilings, sync=sync,
                    choose=lambda x: ops_pkg.dispatch.resolve(OP, x.device, None, x.shape[0]), log=log)
                del xs, ref
            harness.fill_ratios(group)
            for r in group:
                if r.status == "ok":
                    log(f"[{OP}] {r.case:>34} {r.dtype} {r.backend:>14}: p50 {r.p50_ms:8.4f} ms  "
                        f"x dense {r.speedup_vs_dense or float('nan'):5.2f}")
            if on_rows is not None:
                on_rows(group)
            rows_all += group
            del bk, qs
            if on_gpu:
                torch.cuda.empty_cache()
    return rows_all


# --------------------------------------------------------------------------- CPU correctness sweep

def _cpu_cases(quick: bool):
    for (n, k, gs) in (CPU_QUICK_CASES if quick else CPU_CASES):
        for m in (CPU_QUICK_MS if quick else CPU_MS):
            yield format_case(M=m, N=n, K=k, group=gs), (m,), n, k, gs
    if not quick:
        n, k, gs = CPU_CASES[0]
        yield format_case(B=2, M=3, N=n, K=k, group=gs), (2, 3), n, k, gs


def cpu_sweep(quick: bool = False, dtypes: Sequence[str] = CPU_DTYPES, seed: int = 0,
              log=print) -> tuple[list[Row], bool]:
    """sparsekit's CPU backends vs float64 math on the dequantized 2:4 weight."""
    import sparsekit.ops as ops_pkg
    from sparsekit import ops

    gen = torch.Generator().manual_seed(seed)
    rows: list[Row] = []
    ctx = dict(gpu="cpu", commit=harness.git_commit(), date=harness.now_iso())
    ctx["torch"], ctx["triton"] = harness.versions()
    for case, lead, n, k, gs in _cpu_cases(quick):
        for dname in list(dtypes) + ([] if quick else ["fp32"]):
            dtype = DTYPES[dname]
            _, q, b = make_weight(n, k, dtype, "cpu", gen, group_size=gs)
            x = torch.randn(*lead, k, generator=gen).to(dtype)
            ref = F.linear(x.double(), q.to_dense().double(), b.double())
            for name in ("interpret", "reference", "sparsekit_auto"):
                row = Row(op=OP, case=case, backend=name, dtype=dname, **ctx)
                try:
                    if name == "sparsekit_auto":
                        row.chosen_backend = ops_pkg.dispatch.resolve(OP, x.device, None, x.numel() // k)
                        out = ops.sparse24_int4_linear(x, q, b)
                    else:
                        out = ops.sparse24_int4_linear(x, q, b, backend=name)
                    if tuple(out.shape) != tuple(ref.shape) or out.dtype != dtype:
                        raise ValueError(f"output {tuple(out.shape)} {out.dtype} != {tuple(ref.shape)} {dtype}")
                    row.rel_err = harness.rel_err(out, ref)
                    finite = bool(torch.isfinite(out).all())
                    tol = CPU_TOL[dname]
                    row.status = "ok" if finite and row.rel_err < tol else "fail"
                    row.note = f"tol {tol:g}" + ("" if finite else "; non-finite output")
                except Exception as e:
                    row.status, row.note = "fail", "error: " + harness._short(e)
                rows.append(row)
    return rows, all(r.status == "ok" for r in rows)


print_cpu_table = harness.print_cpu_table
