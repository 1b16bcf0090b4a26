"""Benchmark and CPU correctness sweep for ``sparse24_linear`` (y = x @ W^T + b, W 2:4).

GPU (``run_gpu``): for each dtype, weight shape (N, K) and batch M, time in
the same run

* ``dense``          ``F.linear(x, W, b)`` on the pruned dense weight (cuBLAS; the baseline)
* ``triton``         sparsekit's Triton kernel
* ``cuda``           sparsekit's csrc kernels (only where built): the GEMV for M <= 16,
                     the ``mma.sp`` sparse-tensor-core GEMM above (fp16/bf16)
* ``sparsekit_auto`` sparsekit's own choice (``chosen_backend`` says which)
* ``cutlass24``      torch ``to_sparse_semi_structured`` with CUTLASS
* ``cusparselt``     torch ``to_sparse_semi_structured`` with cuSPARSELt

and (``int8``, default: on a GPU) rows of op ``sparse24_int8_linear`` (dtype ``int8``:
W8A8 with a 2:4 weight, fp16 activations quantized per token inside the
timed call): ``cuda`` (sparsekit's int8 ``mma.sp`` kernel) and ``triton``
(its Triton int8 kernel) against ``dense``
= the same per-token quantization + ``torch._int_mm`` on the dense int8
weight + the same scale epilogue (guarded: ``_int_mm`` needs M > 16 and
N, K multiples of 8; otherwise a ``skip`` row says why).

Every backend's output is first checked against fp32 math on the same pruned
weight (rel err < 1e-2); a failing backend is reported and not timed.  A peer
that cannot run here (missing library, shape constraint) gives a ``skip`` row
with the reason.

CPU (``cpu_sweep``): no timings; the ``interpret`` (Triton interpreter) and
``reference`` backends, and the automatic choice, are compared against
float64 math on small odd shapes for fp32 / fp16 / bf16.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from . import harness
from .harness import Backend, Row, format_case

OP = "sparse24_linear"

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)]
MS = [1, 4, 16, 64, 256, 1024, 4096, 8192]
OP_INT8 = "sparse24_int8_linear"
QUICK_SHAPES = [(4096, 4096), (11008, 4096)]
QUICK_MS = [1, 16, 256, 4096]
CUDA_MAX_M = 16           # the csrc GEMV's limit; above it the cuda backend is the mma.sp GEMM (fp16/bf16)
GPU_TOL = 1e-2            # rel err bound for the pre-timing check (fp16/bf16)
BACKENDS = ("dense", "triton", "cuda", "sparsekit_auto", "cutlass24", "cusparselt")
OWN_FORCED = ("triton", "cuda", "interpret", "reference")   # sparsekit backends forced by name
CPU_TIMING_BACKENDS = ("dense", "interpret", "reference", "sparsekit_auto", "cutlass24", "cusparselt")

# CPU sweep
CPU_SHAPES = [(33, 100), (64, 72)]
CPU_MS = [1, 3, 17]
CPU_QUICK_SHAPES = [(33, 100)]
CPU_QUICK_MS = [1, 17]
CPU_DTYPES = ("fp32", "fp16", "bf16")
CPU_TOL = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 1e-2}

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# The rows `make gpu-check` times (scripts/gpu_check.sh; bench/run.py GPU_CHECK_ORDER runs the
# selections of every op most valuable first).  ``kwargs`` go to ``entry`` (default ``run_gpu``);
# ``predict_s``: seconds to time them on an H100/H200 with a warm Triton cache (about 0.12 s a
# small-output row: do_bench 10 + 50 ms, its 5-call estimate and the check; about 0.6 s a row
# with an M x N >= 16M output, whose check moves it to the host in float64; plus the rotated
# weight sets and the peers' packing); ``warm_s``: the first-launch compiles of a fresh machine.
GPU_PEERS = ("dense", "triton", "cuda", "cusparselt", "cutlass24")
GPU_CHECK = {
    "fp16_small_m": dict(
        decides="2:4 at decode sizes (M <= 16, weight-bandwidth bound): compressed reads vs cuBLAS and torch's 2:4",
        kwargs=dict(shapes=[(4096, 4096), (8192, 8192)], ms=[1, 4, 8, 16], dtypes=["fp16"], backends=GPU_PEERS,
                    int8=False),
        predict_s=10, warm_s=15),
    "fp16_large_m": dict(
        decides="2:4 at prefill sizes (M >= 4096, tensor-core bound): mma.sp / Triton vs cuBLAS, cuSPARSELt, CUTLASS",
        kwargs=dict(shapes=[(4096, 4096), (8192, 8192)], ms=[4096, 8192], dtypes=["fp16"], backends=GPU_PEERS,
                    int8=False),
        predict_s=20, warm_s=15),
    "int8": dict(
        entry="run_int8",
        decides="int8 2:4 (W8A8): mma.sp s8 / Triton int8 vs torch._int_mm on the same int8 weight",
        kwargs=dict(shapes=[(4096, 4096), (8192, 8192)], ms=[16, 32, 4096]),
        predict_s=8, warm_s=15),
    "bf16": dict(
        decides="2:4 bf16 rows for the dispatch table (decode and prefill sizes)",
        kwargs=dict(shapes=[(4096, 4096), (8192, 8192)], ms=[1, 16, 4096], dtypes=["bf16"], backends=GPU_PEERS,
                    int8=False),
        predict_s=12, warm_s=15),
}


def plan_rows(entry: str = "run_gpu", shapes=SHAPES, ms=MS, dtypes=("fp16",), backends=BACKENDS,
              int8: bool | None = None, **_) -> list[dict]:
    """The (op, case, dtype, backends) rows ``entry(**kwargs)`` produces on a GPU, in order."""
    rows = []
    if entry == "run_gpu":
        for dname in dtypes:
            for (n, k) in shapes:
                for m in ms:
                    bks = [b for b in backends if not (b == "cuda" and m > CUDA_MAX_M and dname == "fp32")]
                    rows.append(dict(op=OP, case=format_case(M=m, N=n, K=k), dtype=dname, backends=bks))
    if entry == "run_int8" or int8:
        for (n, k) in shapes:
            for m in ms:
                rows.append(dict(op=OP_INT8, case=format_case(M=m, N=n, K=k), dtype="int8",
                                 backends=["cuda", "triton", "dense"]))
    return rows


def dtype_name(dt: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dt]


def _ops():
    import sparsekit.ops as ops
    return ops


def _short(e: BaseException, n: int = 200) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace(",", ";")
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def make_weight(n: int, k: int, dtype: torch.dtype, device, gen: torch.Generator | None = None):
    """Random 2:4-pruned dense weight ``(n, k)``, its ``Sparse24Weight`` and a bias."""
    from sparsekit.formats import Sparse24Weight
    from sparsekit.prune import mask_2to4

    w = torch.randn(n, k, device=device, dtype=torch.float32, generator=gen) * (k ** -0.5)
    w = (w * mask_2to4(w)).to(dtype)
    b = (torch.randn(n, device=device, dtype=torch.float32, generator=gen) * 0.1).to(dtype)
    return w, Sparse24Weight.from_dense(w), b


def _semi_structured_bytes(ws) -> int | None:
    total = 0
    for name in ("packed", "meta"):
        t = getattr(ws, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total or None


def build_semi_structured(w_dense: torch.Tensor, cutlass: bool):
    """torch's own 2:4 layout of the same pruned dense weight (CUTLASS or cuSPARSELt)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    old = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = bool(cutlass)
    try:
        return to_sparse_semi_structured(w_dense)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = old


# --------------------------------------------------------------------------- GPU benchmark

def _prepare_backends(n: int, k: int, dtype: torch.dtype, n_sets: int, wanted: Sequence[str],
                      gen: torch.Generator, device="cuda", log=print):
    """Weights for every backend, ``n_sets`` distinct copies each (for rotation)."""
    ops = _ops()
    dev = torch.device(device)
    dense_w, sparse_w = [], []
    bias = None
    for _ in range(n_sets):
        w, sw, b = make_weight(n, k, dtype, dev, gen)
        dense_w.append(w)
        sparse_w.append(sw)
        bias = b if bias is None else bias
    it = torch.empty((), dtype=dtype).element_size()
    out: dict[str, Backend] = {}
    if "dense" in wanted:
        out["dense"] = Backend("dense", lambda x, w: F.linear(x, w, bias), dense_w, n * k * it, tol=GPU_TOL)
    sp_bytes = sparse_w[0].nbytes()
    for name in OWN_FORCED:
        if name not in wanted:
            continue
        try:
            have = name in ops.available_backends(OP, dev)
            why = "" if have else f"{name} backend not available on {dev.type}" + (
                " (csrc extension not built)" if name == "cuda" else "")
        except Exception as e:
            have, why = False, _short(e)
        out[name] = Backend(name, lambda x, w, _b=name: ops.sparse24_linear(x, w, bias, backend=_b),
                            sparse_w, sp_bytes, skip=why, tol=GPU_TOL)
    if "sparsekit_auto" in wanted:
        out["sparsekit_auto"] = Backend("sparsekit_auto", lambda x, w: ops.sparse24_linear(x, w, bias),
                                        sparse_w, sp_bytes, tol=GPU_TOL)
    for name, cutlass in (("cutlass24", True), ("cusparselt", False)):
        if name not in wanted:
            continue
        try:
            if not cutlass and not torch.backends.cusparselt.is_available():
                raise RuntimeError("torch.backends.cusparselt.is_available() is False")
            ws = [build_semi_structured(w, cutlass) for w in dense_w]
            nbytes = _semi_structured_bytes(ws[0]) or sp_bytes
            out[name] = Backend(name, lambda x, w: F.linear(x, w, bias), ws, nbytes, tol=GPU_TOL, peer=True)
        except Exception as e:
            out[name] = Backend(name, None, [], 0, skip=f"unavailable: {_short(e)}", peer=True)
    return out, dense_w, bias


def run_gpu(shapes: Iterable[tuple[int, int]] = SHAPES, ms: Iterable[int] = MS,
            dtypes: Iterable[str] = ("fp16",), backends: Sequence[str] = BACKENDS,
            warmup_ms: float = 10.0, rep_ms: float = 50.0, ctx: dict | None = None,
            on_rows: Callable[[list[Row]], None] | None = None, log=print, seed: int = 0,
            device="cuda", timer: Callable | None = None, int8: bool | None = None) -> list[Row]:
    """Time every backend on every case; ``on_rows`` gets each (dtype, shape) group as it finishes.

    ``device="cpu"`` (with ``timer=harness.time_rotating_cpu``) runs the same
    logic on CPU tensors: a dry run of the harness, not a benchmark.
    """
    ops = _ops()
    ctx = dict(ctx or {})
    ceilings = ctx.pop("ceilings", None)
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    all_rows: list[Row] = []
    ms = list(ms)
    for dname in dtypes:
        dtype = DTYPES[dname]
        it = torch.empty((), dtype=dtype).element_size()
        for (n, k) in shapes:
            # rotate enough distinct weight/x sets that the working set of the
            # smallest (sparse) weight alone is > 2x L2
            sp_bytes = (n * ((k + 7) // 8 * 8) // 2) * it + n * ((k + 7) // 8)
            n_sets = harness.n_rotating_sets(sp_bytes) if on_gpu else 2
            bk, dense_w, bias = _prepare_backends(n, k, dtype, n_sets, backends, gen, device, log)
            group: list[Row] = []
            for m in ms:
                case = format_case(M=m, N=n, K=k)
                xs = [torch.randn(m, k, device=device, dtype=torch.float32, generator=gen).to(dtype)
                      for _ in range(n_sets)]
                ref = F.linear(xs[0].float(), dense_w[0].float(), bias.float())
                sel = []
                for name in backends:
                    b = bk.get(name)
                    if b is None or (name == "cuda" and m > CUDA_MAX_M and dtype == torch.float32):
                        continue  # no 2:4 fp32 tensor-core form; the GEMV stops at M = 16
                    if name in ("cutlass24", "cusparselt") and m % 8 and not b.skip:
                        b = dataclasses.replace(b, note=f"torch pads M {m}->{(m + 7) // 8 * 8} internally")
                    sel.append(b)
                auto_w = bk["sparsekit_auto"].weights[0] if "sparsekit_auto" in bk else None
                group += harness.time_case(
                    OP, case, dname, sel, xs, ref, flops=2 * m * n * k, io_bytes=(m * k + m * n + n) * it, ctx=ctx,
                    timer=timer, warmup_ms=warmup_ms, rep_ms=rep_ms, ceilings=ceilings, sync=sync,
                    choose=lambda x, _w=auto_w: ops.select_backend(OP, x, _w), log=log)
                del xs, ref
            harness.fill_ratios(group)
            for r in group:
                if r.status == "ok":
                    log(f"[{OP}] {r.case:>22} {r.dtype} {r.backend:>14}: p50 {r.p50_ms:8.4f} ms  "
                        f"x dense {r.speedup_vs_dense or float('nan'):5.2f}  "
                        f"{(r.tbps or 0):5.2f} TB/s  {(r.tflops or 0):6.1f} TFLOP/s"
                        + (f"  (chose {r.chosen_backend})" if r.chosen_backend else ""))
            if on_rows is not None:
                on_rows(group)
            all_rows.extend(group)
            del bk, dense_w, bias
            if on_gpu:
                torch.cuda.empty_cache()
    if int8 is None:
        int8 = on_gpu  # the int8 rows come with every GPU run; CPU dry runs ask for them explicitly
    if int8:
        ctx2 = dict(ctx)
        if ceilings is not None:
            ctx2["ceilings"] = ceilings
        all_rows.extend(run_int8(shapes, ms, warmup_ms=warmup_ms, rep_ms=rep_ms, ctx=ctx2, on_rows=on_rows,
                                 log=log, seed=seed, device=device, timer=timer))
    return all_rows


def _int8_dense_peer(w_int: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor):
    """quant(x) -> torch._int_mm(xq, Wq^T) -> scales (+ bias): the dense int8 peer."""
    from sparsekit.ops.act_quant import per_token_quant_reference

    wt = w_int.contiguous().t()       # (K, N), column-major: the layout cuBLASLt's int8 GEMM takes

    def fn(x, _w):
        xq, xs = per_token_quant_reference(x, 8)
        acc = torch._int_mm(xq, wt)
        return (acc.float() * xs * w_scale[None, :] + bias.float()).to(x.dtype)
    return fn


def run_int8(shapes: Iterable[tuple[int, int]] = SHAPES, ms: Iterable[int] = MS, warmup_ms: float = 10.0,
             rep_ms: float = 50.0, ctx: dict | None = None, on_rows: Callable[[list[Row]], None] | None = None,
             log=print, seed: int = 0, device="cuda", timer: Callable | None = None) -> list[Row]:
    """int8 2:4 rows (op ``sparse24_int8_linear``, dtype ``int8``): sparsekit ``cuda`` vs ``_int_mm`` dense."""
    from sparsekit.formats.sparse24 import Sparse24Int8Weight as Q
    from sparsekit.ops import dispatch
    from sparsekit.ops.sparse24_int8 import sparse24_int8_linear

    ctx = dict(ctx or {})
    ceilings = ctx.pop("ceilings", None)
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + 8)
    rows_all: list[Row] = []
    have_cuda = "cuda" in dispatch.available_backends(OP_INT8, device)
    for (n, k) in shapes:
        w, sw, b = make_weight(n, k, torch.float16, device, gen)
        q = Q.from_sparse24(sw)
        w_int = q.int_dense()
        group: list[Row] = []
        for m in ms:
            case = format_case(M=m, N=n, K=k)
            xs = [torch.randn(m, k, device=device, dtype=torch.float32, generator=gen).half() for _ in range(2)]
            ref = sparse24_int8_linear(xs[0], q, b, backend="reference").float()
            none = [None] * len(xs)
            io = (m * k + m * n) * 2
            why = ""
            if not on_gpu:
                why = "torch._int_mm needs CUDA"
            elif m <= 16 or k % 8 or n % 8:
                why = f"torch._int_mm needs M > 16 and N, K multiples of 8 (M={m}, N={n}, K={k})"
            impls = [
                Backend("cuda", lambda x, _w: sparse24_int8_linear(x, q, b, backend="cuda"), none, q.nbytes(),
                        skip="" if have_cuda else "cuda backend not available (csrc extension not built)",
                        tol=GPU_TOL),
                Backend("triton", lambda x, _w: sparse24_int8_linear(x, q, b, backend="triton"), none, q.nbytes(),
                        skip="" if on_gpu else "triton backend needs CUDA tensors", tol=GPU_TOL),
                Backend("dense", _int8_dense_peer(w_int, q.scale, b), none, n * k, skip=why, tol=GPU_TOL, peer=True,
                        note="torch._int_mm on the same int8 quantization"),
            ]
            group += harness.time_case(OP_INT8, case, "int8", impls, xs, ref, flops=2 * m * n * k, io_bytes=io,
                                       ctx=ctx, timer=timer, warmup_ms=warmup_ms, rep_ms=rep_ms,
                                       ceilings=ceilings, sync=sync, log=log)
        harness.fill_ratios(group)
        for r in group:
            log(f"[{OP_INT8}] {r.case:>22} {r.backend:>6}: {r.status} "
                + (f"p50 {r.p50_ms:.4f} ms x dense {r.speedup_vs_dense or float('nan'):.2f}" if r.p50_ms else r.note))
        if on_rows is not None:
            on_rows(group)
        rows_all.extend(group)
    return rows_all



# --------------------------------------------------------------------------- CPU correctness sweep

def _cpu_cases(quick: bool):
    shapes = CPU_QUICK_SHAPES if quick else CPU_SHAPES
    ms = CPU_QUICK_MS if quick else CPU_MS
    for (n, k) in shapes:
        for m in ms:
            yield format_case(M=m, N=n, K=k), (m,), n, k, False
    if not quick:
        # leading batch dims and a non-contiguous (transposed) x
        n, k = CPU_SHAPES[-1]
        yield format_case(B=2, M=3, N=n, K=k), (2, 3), n, k, False
        yield format_case(M=5, N=n, K=k, x="transposed"), (5,), n, k, True


def cpu_sweep(quick: bool = False, dtypes: Sequence[str] = CPU_DTYPES,
              backends: Sequence[str] = ("interpret", "reference", "sparsekit_auto"),
              cases=None, seed: int = 0, log=print) -> tuple[list[Row], bool]:
    """Compare sparsekit's CPU backends with float64 math; returns (rows, all passed)."""
    ops = _ops()
    gen = torch.Generator().manual_seed(seed)
    rows: list[Row] = []
    ctx = dict(gpu="cpu", commit=harness.git_commit(), date=harness.now_iso())
    ctx["torch"], ctx["triton"] = harness.versions()
    for case, lead, n, k, transposed in (cases if cases is not None else _cpu_cases(quick)):
        for dname in dtypes:
            dtype = DTYPES[dname]
            w, sw, b = make_weight(n, k, dtype, "cpu", gen)
            if transposed:
                x = torch.randn(k, *lead, generator=gen).to(dtype).t()
            else:
                x = torch.randn(*lead, k, generator=gen).to(dtype)
            ref = F.linear(x.double(), w.double(), b.double())
            try:
                torch_err = harness.rel_err(F.linear(x, w, b), ref)
            except Exception:
                torch_err = None
            for name in backends:
                row = Row(op=OP, case=case, backend=name, dtype=dname, **ctx)
                try:
                    if name == "sparsekit_auto":
                        row.chosen_backend = ops.select_backend(OP, x, sw)
                        out = ops.sparse24_linear(x, sw, b)
                    else:
                        out = ops.sparse24_linear(x, sw, b, backend=name)
                    if tuple(out.shape) != tuple(ref.shape):
                        raise ValueError(f"output shape {tuple(out.shape)} != {tuple(ref.shape)}")
                    if out.dtype != dtype:
                        raise TypeError(f"output dtype {out.dtype} != {dtype}")
                    row.rel_err = harness.rel_err(out, ref)
                    finite = bool(torch.isfinite(out).all())
                    tol = CPU_TOL[dname]
                    ok = finite and row.rel_err < tol
                    row.status = "ok" if ok else "fail"
                    row.note = f"tol {tol:g}" + (f"; torch {dname} err {torch_err:.1e}" if torch_err is not None else "")
                    if not finite:
                        row.note += "; non-finite output"
                except Exception as e:
                    row.status, row.note = "fail", "error: " + _short(e)
                rows.append(row)
    return rows, all(r.status == "ok" for r in rows)


print_cpu_table = harness.print_cpu_table
