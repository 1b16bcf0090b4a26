"""Benchmark and CPU correctness sweep for ``block_sparse_linear`` (y = x @ W^T + b, W block-sparse).

GPU (``run_gpu``): for each dtype, weight shape (N, K), square block side
``b`` in ``BLOCKS``, block density in ``DENSITIES`` and batch M, time in the
same run

* ``dense``          ``F.linear(x, W, b)`` on the pruned dense weight (cuBLAS; the baseline)
* ``triton``         sparsekit's Triton kernel
* ``sparsekit_auto`` sparsekit's own choice (``chosen_backend`` says which)
* ``torch_bsr``      torch's BSR Triton kernel ``torch.sparse._triton_ops.bsr_dense_mm``
                     on ``W.to_sparse_bsr((b, b))`` (computes ``W @ x^T``; the
                     bias is added afterwards)

The weight keeps its largest-norm blocks (``BlockSparseWeight.from_dense_magnitude``);
the case string records ``density`` and ``block``, e.g.
``density=0.25,block=64,M=256,N=4096,K=4096``.  Every backend's output is
first checked against fp32 math on the same pruned weight (rel err < 1e-2);
a failing backend is reported and not timed.  A peer that cannot run here
gives a ``skip`` row with the reason.

CPU (``cpu_sweep``): no timings; the ``interpret`` and ``reference`` backends
and the automatic choice are compared against float64 math on a few small
odd shapes for fp32 / fp16 / bf16.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from . import harness
from .harness import Backend, Row, format_case

OP = "block_sparse_linear"

SHAPES = [(4096, 4096), (3072, 768), (768, 3072)]
MS = [1, 16, 256, 4096]
DENSITIES = (0.5, 0.25, 0.1)
BLOCKS = (32, 64)
QUICK_SHAPES = [(4096, 4096), (3072, 768)]
QUICK_MS = [1, 16, 256, 4096]
GPU_TOL = 1e-2            # rel err bound for the pre-timing check (fp16/bf16)
BACKENDS = ("dense", "triton", "sparsekit_auto", "torch_bsr")
OWN_FORCED = ("triton", "interpret", "reference")   # sparsekit backends forced by name
CPU_TIMING_BACKENDS = ("dense", "interpret", "reference", "sparsekit_auto", "torch_bsr")

# CPU sweep: shapes (N, K), each with its (block side, density) in CPU_BLOCK_DENSITY
CPU_SHAPES = [(33, 100), (70, 72)]
CPU_BLOCK_DENSITY = {(33, 100): (16, 0.5), (70, 72): (32, 0.25)}
CPU_MS = [1, 3, 17]
CPU_QUICK_SHAPES = [(33, 100)]
CPU_QUICK_MS = [1, 17]
CPU_DTYPES = ("fp32", "fp16", "bf16")
CPU_TOL = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 1e-2}
# the dry run of the timing path (``--dry-run-cpu``) uses these with the CPU_QUICK_* shapes
DRY_DENSITIES = (0.5,)
DRY_BLOCKS = (16,)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# The rows `make gpu-check` times (see bench/sparse24.py GPU_CHECK for the fields).
GPU_CHECK = {
    "d25_b64": dict(
        decides="block-sparse at density 0.25, 64x64 blocks (ideal 4x): Triton vs cuBLAS and torch's BSR kernel",
        kwargs=dict(shapes=[(4096, 4096)], ms=[1, 16, 256, 4096], dtypes=["fp16"],
                    backends=("dense", "triton", "torch_bsr"), densities=(0.25,), blocks=(64,)),
        predict_s=6, warm_s=20),
}


def plan_rows(entry: str = "run_gpu", shapes=SHAPES, ms=MS, dtypes=("fp16",), backends=BACKENDS,
              densities=DENSITIES, blocks=BLOCKS, **_) -> list[dict]:
    """The (op, case, dtype, backends) rows ``run_gpu(**kwargs)`` produces on a GPU, in order."""
    return [dict(op=OP, case=format_case(density=d, block=b, M=m, N=n, K=k), dtype=dname, backends=list(backends))
            for dname in dtypes for (n, k) in shapes for b in blocks for d in densities for m in ms]


def dtype_name(dt: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dt]


def _ops():
    from sparsekit.ops import block_sparse as ops
    from sparsekit.ops import dispatch
    return ops, dispatch


def _short(e: BaseException, n: int = 200) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace(",", ";")
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def make_weight(n: int, k: int, block: int, density: float, dtype: torch.dtype, device,
                gen: torch.Generator | None = None):
    """Random weight pruned to its largest ``density`` fraction of ``block x block`` blocks:
    (pruned dense ``(n, k)``, ``BlockSparseWeight``, bias)."""
    from sparsekit.formats.block_sparse import BlockSparseWeight

    w = torch.randn(n, k, device=device, dtype=torch.float32, generator=gen) * (k ** -0.5)
    sw = BlockSparseWeight.from_dense_magnitude(w, (block, block), sparsity=1.0 - density).to(dtype)
    b = (torch.randn(n, device=device, dtype=torch.float32, generator=gen) * 0.1).to(dtype)
    return sw.to_dense(), sw, b


def sparse_bytes(n: int, k: int, block: int, density: float, itemsize: int) -> int:
    """Bytes of a packed weight with ``density`` of its blocks kept (blocks + int32 indices)."""
    nb, kb = -(-n // block), -(-k // block)
    nnzb = max(1, round(density * nb * kb))
    return nnzb * block * block * itemsize + 4 * (nb + kb + 2 + 3 * nnzb)


def _torch_bsr_fn(bias):
    from torch.sparse._triton_ops import bsr_dense_mm

    def fn(x, w):
        return bsr_dense_mm(w, x.t()).t() + bias
    return fn


# --------------------------------------------------------------------------- GPU benchmark

def _prepare_backends(n: int, k: int, block: int, density: float, dtype: torch.dtype, n_sets: int,
                      wanted: Sequence[str], gen: torch.Generator, device="cuda"):
    """Weights for every backend, ``n_sets`` distinct copies each (for rotation)."""
    ops, dispatch = _ops()
    dev = torch.device(device)
    dense_w, sparse_w = [], []
    bias = None
    for _ in range(n_sets):
        w, sw, b = make_weight(n, k, block, density, dtype, dev, gen)
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
            have = name in dispatch.available_backends(OP, dev)
            why = "" if have else f"{name} backend not available on {dev.type}"
        except Exception as e:
            have, why = False, _short(e)
        out[name] = Backend(name, lambda x, w, _b=name: ops.block_sparse_linear(x, w, bias, backend=_b),
                            sparse_w, sp_bytes, skip=why, tol=GPU_TOL)
    if "sparsekit_auto" in wanted:
        out["sparsekit_auto"] = Backend("sparsekit_auto", lambda x, w: ops.block_sparse_linear(x, w, bias),
                                        sparse_w, sp_bytes, tol=GPU_TOL)
    if "torch_bsr" in wanted:
        try:
            if dev.type != "cuda":
                raise RuntimeError("torch's BSR Triton kernel needs CUDA tensors")
            fn = _torch_bsr_fn(bias)
            ws = [w.to_sparse_bsr((block, block)) for w in dense_w]
            nbytes = sum(t.numel() * t.element_size()
                         for t in (ws[0].values(), ws[0].crow_indices(), ws[0].col_indices()))
            out["torch_bsr"] = Backend("torch_bsr", fn, ws, nbytes, tol=GPU_TOL, peer=True)
        except Exception as e:
            out["torch_bsr"] = Backend("torch_bsr", None, [], 0, skip=f"unavailable: {_short(e)}", peer=True)
    return out, dense_w, bias


def run_gpu(shapes: Iterable[tuple[int, int]] = SHAPES, ms: Iterable[int] = MS,
            dtypes: Iterable[str] = ("fp16",), backends: Sequence[str] = BACKENDS,
            warmup_ms: float = 10.0, rep_ms: float = 50.0, ctx: dict | None = None,
            on_rows: Callable[[list[Row]], None] | None = None, log=print, seed: int = 0,
            device="cuda", timer: Callable | None = None,
            densities: Sequence[float] | None = None, blocks: Sequence[int] | None = None) -> list[Row]:
    """Time every backend on every case; ``on_rows`` gets each (dtype, shape, block, density) group.

    ``device="cpu"`` (with ``timer=harness.time_rotating_cpu``) runs the same
    logic on CPU tensors with tiny blocks: a dry run of the harness, not a benchmark.
    """
    ops, _ = _ops()
    ctx = dict(ctx or {})
    ceilings = ctx.pop("ceilings", None)
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else None
    if densities is None:
        densities = DENSITIES if on_gpu else DRY_DENSITIES
    if blocks is None:
        blocks = BLOCKS if on_gpu else DRY_BLOCKS
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    all_rows: list[Row] = []
    ms = list(ms)
    for dname in dtypes:
        dtype = DTYPES[dname]
        it = torch.empty((), dtype=dtype).element_size()
        for (n, k) in shapes:
            for block in blocks:
                for density in densities:
                    sp_bytes = sparse_bytes(n, k, block, density, it)
                    n_sets = harness.n_rotating_sets(sp_bytes) if on_gpu else 2
                    bk, dense_w, bias = _prepare_backends(n, k, block, density, dtype, n_sets, backends, gen,
                                                          device)
                    group: list[Row] = []
                    for m in ms:
                        case = format_case(density=density, block=block, M=m, N=n, K=k)
                        xs = [torch.randn(m, k, device=device, dtype=torch.float32, generator=gen).to(dtype)
                              for _ in range(n_sets)]
                        ref = F.linear(xs[0].float(), dense_w[0].float(), bias.float())
                        group += harness.time_case(
                            OP, case, dname, [bk[name] for name in backends if name in bk], xs, ref,
                            flops=2 * m * n * k, io_bytes=(m * k + m * n + n) * it, ctx=ctx, timer=timer,
                            warmup_ms=warmup_ms, rep_ms=rep_ms, ceilings=ceilings, sync=sync,
                            choose=lambda x: _select(ops, x), log=log)
                        del xs, ref
                    harness.fill_ratios(group)
                    for r in group:
                        if r.status == "ok":
                            log(f"[{OP}] {r.case:>44} {r.dtype} {r.backend:>14}: p50 {r.p50_ms:8.4f} ms  "
                                f"x dense {r.speedup_vs_dense or float('nan'):5.2f}  "
                                f"{(r.tbps or 0):5.2f} TB/s"
                                + (f"  (chose {r.chosen_backend})" if r.chosen_backend else ""))
                    if on_rows is not None:
                        on_rows(group)
                    all_rows.extend(group)
                    del bk, dense_w, bias
                    if on_gpu:
                        torch.cuda.empty_cache()
    return all_rows


def _select(ops, x: torch.Tensor) -> str:
    _, dispatch = _ops()
    k = x.shape[-1]
    m = x.numel() // max(k, 1)
    return dispatch.resolve(OP, x.device, None, m)


# --------------------------------------------------------------------------- CPU correctness sweep

def _cpu_cases(quick: bool):
    shapes = CPU_QUICK_SHAPES if quick else CPU_SHAPES
    ms = CPU_QUICK_MS if quick else CPU_MS
    for (n, k) in shapes:
        block, density = CPU_BLOCK_DENSITY[(n, k)]
        for m in ms:
            yield format_case(density=density, block=block, M=m, N=n, K=k), (m,), n, k, (block, block), density, False
    if not quick:
        # leading batch dims, a transposed x, non-square blocks
        n, k = CPU_SHAPES[-1]
        block, density = CPU_BLOCK_DENSITY[(n, k)]
        yield (format_case(density=density, block=block, B=2, M=3, N=n, K=k), (2, 3), n, k, (block, block),
               density, False)
        yield (format_case(density=density, block=block, M=5, N=n, K=k, x="transposed"), (5,), n, k,
               (block, block), density, True)
        yield format_case(density=0.5, block="16x64", M=4, N=40, K=130), (4,), 40, 130, (16, 64), 0.5, False


def cpu_sweep(quick: bool = False, dtypes: Sequence[str] = CPU_DTYPES,
              backends: Sequence[str] = ("interpret", "reference", "sparsekit_auto"),
              cases=None, seed: int = 0, log=print) -> tuple[list[Row], bool]:
    """Compare sparsekit's CPU backends with float64 math; returns (rows, all passed).

    ``cases``: iterable of ``(case, lead_dims, N, K, (bm, bk), density, transposed_x)``.
    """
    from sparsekit.formats.block_sparse import BlockSparseWeight

    ops, _ = _ops()
    gen = torch.Generator().manual_seed(seed)
    rows: list[Row] = []
    ctx = dict(gpu="cpu", commit=harness.git_commit(), date=harness.now_iso())
    ctx["torch"], ctx["triton"] = harness.versions()
    for case, lead, n, k, bs, density, transposed in (cases if cases is not None else _cpu_cases(quick)):
        for dname in dtypes:
            dtype = DTYPES[dname]
            w0 = torch.randn(n, k, generator=gen) * (k ** -0.5)
            sw = BlockSparseWeight.from_dense_magnitude(w0, bs, sparsity=1.0 - density).to(dtype)
            w = sw.to_dense()
            b = (torch.randn(n, generator=gen) * 0.1).to(dtype)
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
                        row.chosen_backend = _select(ops, x)
                        out = ops.block_sparse_linear(x, sw, b)
                    else:
                        out = ops.block_sparse_linear(x, sw, b, backend=name)
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
