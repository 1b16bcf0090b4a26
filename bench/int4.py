"""Benchmark and CPU correctness sweep for ``int4_linear`` (W4A16: y = x @ dequant(W)^T + b).

GPU (``run_gpu``): weights quantized group-wise (group 128, asymmetric, fp16
scales by default) by round-to-nearest; for each dtype, shape (N, K) and batch
M, time in the same run

* ``dense``          ``F.linear(x, W_hat, b)`` on the dequantized dense weight (cuBLAS; the baseline)
* ``triton``         sparsekit's W4A16 Triton kernel
* ``sparsekit_auto`` sparsekit's own choice (``chosen_backend`` says which)
* ``torch_int4mm``   torch's ``torch._weight_int4pack_mm`` (tinygemm) on the same codes, where available
* ``torchao_int4``   torchao's int4 weight-only linear (its own RTN of the dense weight), if importable
* ``gemlite``        GemLite's A16W4 layer on the same codes, if importable

and the int8-activation variants (per-token dynamic activation quantization,
one fused quant launch + one int8 tensor-core GEMM, ``sparsekit.ops.int8``):

* ``triton_w4a8``        the same int4 codes, activations quantized to int8 per token (W4A8)
* ``triton_w4a8_mixed``  W4A8 with token-adaptive bits: top 25% tokens by L2 norm at 8 bits, the rest 4
* ``triton_w8a8``        per-channel int8 weight (RTN of the same float weight), int8 activations
* ``torch_int_mm``       peer for W8A8: the same quantization in torch ops + ``torch._int_mm`` + a torch epilogue

Every backend's output is first checked against fp32 math on the dequantized
weight (rel err < 1e-2; torchao quantizes on its own grid, so it is checked
against the unquantized weight with a loose bound; the int8-activation rows
against fp32 math on the SAME fake-quantized activations and their own
dequantized weight, rel err < 5e-3); a failing sparsekit backend is reported
and not timed, a peer that cannot run gives a ``skip`` row with the reason.
``speedup_vs_dense`` of every row is against ``F.linear`` in the activation
dtype (the W8A8 row quantizes the same float weight to int8 instead of int4).

CPU (``cpu_sweep``): no timings; the ``interpret`` and ``reference`` backends
(and ``interpret_w4a8`` / ``interpret_w4a8_mixed`` / ``interpret_w8a8``) and
the automatic choice are compared against float64 math on the same
dequantized weight (and the same fake-quantized activations), on small odd
shapes, fp16 and bf16.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from . import harness
from .harness import Backend, Row, format_case

OP = "int4_linear"

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)]
MS = [1, 4, 16, 64, 256, 4096]
QUICK_SHAPES = [(4096, 4096), (11008, 4096)]
QUICK_MS = [1, 16, 256, 4096]
GROUP_SIZE = 128
SYMMETRIC = False
GPU_TOL = 1e-2            # rel err bound for the pre-timing check
TORCHAO_TOL = 0.2         # torchao quantizes the dense weight itself: checked vs the float weight
BACKENDS = ("dense", "triton", "sparsekit_auto", "torch_int4mm", "torchao_int4", "gemlite",
            "triton_w4a8", "triton_w4a8_mixed", "triton_w8a8", "torch_int_mm")
OWN_FORCED = ("triton", "interpret", "reference")
CPU_TIMING_BACKENDS = ("dense", "interpret", "reference", "sparsekit_auto", "torch_int4mm",
                       "interpret_w4a8", "interpret_w8a8")
# int8-activation variants: "<own backend>_<variant>"
A8_VARIANTS = {"w4a8": ("int4", 8), "w4a8_mixed": ("int4", "mixed"), "w8a8": ("int8", 8)}
A8_FRAC8 = 0.25           # mixed: fraction of tokens at 8 bits
A8_TOL = 5e-3             # rel err bound vs fp32 math on the same fake-quantized activations
A8_NOTE = "rel_err vs fp32 math on the same fake-quantized activations"

# CPU sweep: (N, K, group_size)
CPU_CASES = [(33, 128, 32), (70, 96, -1), (20, 256, 128)]
CPU_MS = [1, 3, 17]
CPU_QUICK_CASES = [(33, 128, 32)]
CPU_QUICK_MS = [1, 17]
CPU_QUICK_SHAPES = [(33, 128)]     # the dry run of the timing path (group 32 for K < 128)
CPU_DTYPES = ("fp16", "bf16")
CPU_TOL = {"fp16": 1e-3, "bf16": 1e-2}

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# The rows `make gpu-check` times (see bench/sparse24.py GPU_CHECK for the fields).
GPU_CHECK = {
    "w4a16_small_m": dict(
        decides="W4A16 at decode sizes (M <= 16): 4-bit reads vs cuBLAS fp16, tinygemm, torchao/GemLite where installed",
        kwargs=dict(shapes=[(4096, 4096), (8192, 8192)], ms=[1, 4, 8, 16], dtypes=["fp16"],
                    backends=("dense", "triton", "torch_int4mm", "torchao_int4", "gemlite")),
        predict_s=10, warm_s=15),
    "w8a8_w4a8": dict(
        decides="W8A8 / W4A8 / mixed 4-8 bit activations vs cuBLAS fp16 and torch._int_mm (M = 16, 32, 4096)",
        kwargs=dict(shapes=[(4096, 4096), (8192, 8192)], ms=[16, 32, 4096], dtypes=["fp16"],
                    backends=("dense", "triton_w8a8", "triton_w4a8", "triton_w4a8_mixed", "torch_int_mm")),
        predict_s=13, warm_s=20),
}


def plan_rows(entry: str = "run_gpu", shapes=SHAPES, ms=MS, dtypes=("fp16",), backends=BACKENDS, **_) -> list[dict]:
    """The (op, case, dtype, backends) rows ``run_gpu(**kwargs)`` produces on a GPU, in order."""
    return [dict(op=OP, case=format_case(M=m, N=n, K=k, group=_group(k)), dtype=dname, backends=list(backends))
            for dname in dtypes for (n, k) in shapes for m in ms]


def _ops():
    from sparsekit.ops import dispatch
    from sparsekit.ops import int4 as ops
    return ops, dispatch


def _short(e: BaseException, n: int = 200) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace(",", ";")
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def _group(k: int, group_size: int = GROUP_SIZE) -> int:
    return group_size if group_size == -1 or k % group_size == 0 else (32 if k % 32 == 0 else -1)


def make_weight(n: int, k: int, dtype: torch.dtype, device, gen: torch.Generator | None = None,
                group_size: int = GROUP_SIZE, symmetric: bool = SYMMETRIC):
    """A random float weight ``(n, k)``, its RTN ``Int4Weight`` and a bias."""
    from sparsekit.formats.int4 import Int4Weight

    w = torch.randn(n, k, device=device, dtype=torch.float32, generator=gen) * (k ** -0.5)
    q = Int4Weight.from_float(w, _group(k, group_size), symmetric, dtype=dtype)
    b = (torch.randn(n, device=device, dtype=torch.float32, generator=gen) * 0.1).to(dtype)
    return w, q, b


def split_a8(name: str):
    """``"triton_w4a8_mixed"`` -> ``("triton", "w4a8_mixed")``; None for other backend names."""
    for base in OWN_FORCED:
        variant = name[len(base) + 1:] if name.startswith(base + "_") else None
        if variant in A8_VARIANTS:
            return base, variant
    return None


def a8_call(variant: str, x, q4, q8, bias, backend=None):
    """Run an int8-activation variant on ``x`` (``q4``: Int4Weight, ``q8``: Int8Weight)."""
    from sparsekit.ops import int8 as ops8

    weight, act = A8_VARIANTS[variant]
    if weight == "int8":
        return ops8.int8_linear(x, q8, bias, act_bits=act, frac8=A8_FRAC8, backend=backend)
    return ops8.w4a8_linear(x, q4, bias, act_bits=act, frac8=A8_FRAC8, backend=backend)


def a8_reference(variant: str, x, q4, q8, bias, dtype=torch.float32):
    """``dtype`` math on the same fake-quantized activations and the variant's dequantized weight."""
    from sparsekit.ops.act_quant import per_token_quant_reference, select_token_bits
    from sparsekit.ops.int8 import dequantize_int4_fp32

    weight, act = A8_VARIANTS[variant]
    bits = select_token_bits(x, A8_FRAC8) if act == "mixed" else act
    qx, sx = per_token_quant_reference(x, bits)
    xh = qx.to(dtype) * sx.to(dtype)
    if weight == "int8":
        w = q8.dequantize().to(dtype)
    else:
        w = dequantize_int4_fp32(q4.qweight, q4.scales, q4.zeros, q4.group_size, q4.in_features).to(dtype)
    return F.linear(xh, w, bias.to(dtype))


# --------------------------------------------------------------------------- peers

def _torch_int_mm_fn(q8, bias):
    """W8A8 in torch ops: per-token quantization (reference), ``torch._int_mm`` (int32), scales + bias."""
    if not hasattr(torch, "_int_mm"):
        raise RuntimeError("this torch has no _int_mm")
    from sparsekit.ops.act_quant import per_token_quant_reference

    wt = q8.qweight.t()               # (K, N) column-major, as cuBLASLt's int8 GEMM wants
    ws = q8.scales

    def fn(x, _w=None):
        qx, sx = per_token_quant_reference(x, 8)
        acc = torch._int_mm(qx, wt)
        return (acc.float() * sx * ws + bias.float()).to(x.dtype)
    return fn


def _torch_int4mm_fn(q, bias):
    """tinygemm (``torch._weight_int4pack_mm``) on the same codes: w = (q - 8) * s + (8 - z) * s."""
    if not hasattr(torch, "_weight_int4pack_mm") or not hasattr(torch, "_convert_weight_to_int4pack"):
        raise RuntimeError("this torch has no _weight_int4pack_mm")
    codes = q.unpack().to(torch.int32)
    n, k = codes.shape
    packed_u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    wp = torch._convert_weight_to_int4pack(packed_u8, 8)
    s = q.scales
    z = (8.0 - q.zero_points().float()) * s.float()
    sz = torch.stack([s, z.to(s.dtype)], dim=-1).transpose(0, 1).contiguous()   # (G, N, 2)
    gs = q.group_size

    def fn(x, _w=None):
        y = torch._weight_int4pack_mm(x, wp, gs, sz)
        return y + bias
    return fn


def _torchao_fn(w_dense, dtype, bias):
    import torchao  # noqa: F401
    from torchao.quantization import quantize_

    lin = torch.nn.Linear(w_dense.shape[1], w_dense.shape[0], bias=True, device=w_dense.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w_dense.to(dtype))
        lin.bias.copy_(bias)
    try:
        from torchao.quantization import Int4WeightOnlyConfig
        quantize_(lin, Int4WeightOnlyConfig(group_size=GROUP_SIZE))
    except ImportError:
        from torchao.quantization import int4_weight_only
        quantize_(lin, int4_weight_only(group_size=GROUP_SIZE))
    return lambda x, _w=None: lin(x)


def _gemlite_fn(q, dtype, bias):
    import gemlite  # noqa: F401
    from gemlite.core import DType, GemLiteLinear

    n, k = q.shape
    layer = GemLiteLinear(W_nbits=4, group_size=q.group_size, in_features=k, out_features=n,
                          input_dtype=DType.FP16 if dtype == torch.float16 else DType.BF16,
                          output_dtype=DType.FP16 if dtype == torch.float16 else DType.BF16)
    layer.pack(q.unpack(), q.scales, q.zero_points(), bias=bias)
    return lambda x, _w=None: layer(x)


# --------------------------------------------------------------------------- GPU benchmark

def _prepare_backends(n, k, dtype, n_sets, wanted, gen, device, log=print):
    ops, dispatch = _ops()
    dev = torch.device(device)
    floats, quants, bias = [], [], None
    for _ in range(n_sets):
        w, q, b = make_weight(n, k, dtype, dev, gen)
        floats.append(w)
        quants.append(q)
        bias = b if bias is None else bias
    dense_w = [q.dequantize() for q in quants]
    it = torch.empty((), dtype=dtype).element_size()
    qbytes = quants[0].nbytes()
    out: dict[str, Backend] = {}
    if "dense" in wanted:
        out["dense"] = Backend("dense", lambda x, w: F.linear(x, w, bias), dense_w, n * k * it, tol=GPU_TOL)
    for name in OWN_FORCED:
        if name not in wanted:
            continue
        ok, why = dispatch._op_backends(OP)[name](dev)
        out[name] = Backend(name, lambda x, w, _b=name: ops.int4_linear(x, w, bias, backend=_b),
                            quants, qbytes, skip="" if ok else why, tol=GPU_TOL)
    if "sparsekit_auto" in wanted:
        out["sparsekit_auto"] = Backend("sparsekit_auto", lambda x, w: ops.int4_linear(x, w, bias), quants, qbytes,
                                        tol=GPU_TOL)
    a8 = [name for name in wanted if split_a8(name) is not None]
    q8s = []
    if any(A8_VARIANTS[split_a8(name)[1]][0] == "int8" for name in a8) or "torch_int_mm" in wanted:
        from sparsekit.formats.int8 import Int8Weight
        q8s = [Int8Weight.from_float(w) for w in floats]
    for name in a8:
        base, variant = split_a8(name)
        ok, why = dispatch._op_backends("int8_linear")[base](dev)
        int8w = A8_VARIANTS[variant][0] == "int8"
        pairs = list(zip(quants, q8s)) if int8w else [(q, None) for q in quants]
        out[name] = Backend(
            name, lambda x, w, _v=variant, _b=base: a8_call(_v, x, w[0], w[1], bias, backend=_b), pairs,
            (q8s[0].nbytes() if int8w else qbytes), skip="" if ok else why, tol=A8_TOL,
            ref_fn=lambda x, _v=variant, _p=pairs[0]: a8_reference(_v, x, _p[0], _p[1], bias), note=A8_NOTE)
    if "torch_int_mm" in wanted:
        try:
            fns = [_torch_int_mm_fn(q, bias) for q in q8s]
            out["torch_int_mm"] = Backend("torch_int_mm", lambda x, f: f(x), fns, q8s[0].nbytes(), tol=A8_TOL,
                                          ref_fn=lambda x, _q=q8s[0]: a8_reference("w8a8", x, None, _q, bias),
                                          note=A8_NOTE, peer=True)
        except Exception as e:
            out["torch_int_mm"] = Backend("torch_int_mm", None, [], 0, skip=f"unavailable: {_short(e)}", peer=True)
    peers = {
        "torch_int4mm": lambda: ([_torch_int4mm_fn(q, bias) for q in quants], {}),
        "torchao_int4": lambda: ([_torchao_fn(w, dtype, bias) for w in floats],
                                 dict(tol=TORCHAO_TOL, note="own RTN grid; rel_err vs the unquantized weight",
                                      ref_fn=lambda x: F.linear(x.float(), floats[0].float(), bias.float()))),
        "gemlite": lambda: ([_gemlite_fn(q, dtype, bias) for q in quants], {}),
    }
    for name, build in peers.items():
        if name not in wanted:
            continue
        try:
            fns, kw = build()
            out[name] = Backend(name, lambda x, f: f(x), fns, qbytes, peer=True, **dict(dict(tol=GPU_TOL), **kw))
        except Exception as e:
            out[name] = Backend(name, None, [], 0, skip=f"unavailable: {_short(e)}", peer=True)
    return out, dense_w, floats, bias


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
    all_rows: list[Row] = []
    ms = list(ms)
    for dname in dtypes:
        dtype = DTYPES[dname]
        it = torch.empty((), dtype=dtype).element_size()
        for (n, k) in shapes:
            gs = _group(k)
            qbytes = n * k // 2 + 2 * n * (k // (k if gs == -1 else gs)) * it
            n_sets = harness.n_rotating_sets(qbytes) if on_gpu else 2
            bk, dense_w, floats, bias = _prepare_backends(n, k, dtype, n_sets, backends, gen, device, log)
            group: list[Row] = []
            for m in ms:
                case = format_case(M=m, N=n, K=k, group=gs)
                xs = [torch.randn(m, k, device=device, dtype=torch.float32, generator=gen).to(dtype)
                      for _ in range(n_sets)]
                ref = F.linear(xs[0].float(), dense_w[0].float(), bias.float())
                auto_w = bk["sparsekit_auto"].weights[0] if "sparsekit_auto" in bk else None
                group += harness.time_case(
                    OP, case, dname, [bk[name] for name in backends if name in bk], xs, ref,
                    flops=2 * m * n * k, io_bytes=(m * k + m * n + n) * it, ctx=ctx, timer=timer,
                    warmup_ms=warmup_ms, rep_ms=rep_ms, ceilings=ceilings, sync=sync,
                    choose=lambda x, _w=auto_w: ops_pkg.select_backend(OP, x, _w), log=log)
                del xs, ref
            harness.fill_ratios(group)
            for r in group:
                if r.status == "ok":
                    log(f"[{OP}] {r.case:>30} {r.dtype} {r.backend:>14}: p50 {r.p50_ms:8.4f} ms  "
                        f"x dense {r.speedup_vs_dense or float('nan'):5.2f}  {(r.tbps or 0):5.2f} TB/s"
                        + (f"  (chose {r.chosen_backend})" if r.chosen_backend else ""))
            if on_rows is not None:
                on_rows(group)
            all_rows.extend(group)
            del bk, dense_w, floats, bias
            if on_gpu:
                torch.cuda.empty_cache()
    return all_rows


# --------------------------------------------------------------------------- CPU correctness sweep

def _cpu_cases(quick: bool):
    cases = CPU_QUICK_CASES if quick else CPU_CASES
    ms = CPU_QUICK_MS if quick else CPU_MS
    for (n, k, gs) in cases:
        for m in ms:
            yield format_case(M=m, N=n, K=k, group=gs), (m,), n, k, gs, False
    if not quick:
        n, k, gs = CPU_CASES[0]
        yield format_case(B=2, M=3, N=n, K=k, group=gs), (2, 3), n, k, gs, False
        yield format_case(M=5, N=n, K=k, group=gs, x="transposed"), (5,), n, k, gs, True


CPU_SWEEP_BACKENDS = ("interpret", "reference", "sparsekit_auto", "interpret_w4a8", "interpret_w4a8_mixed",
                      "interpret_w8a8")


def cpu_sweep(quick: bool = False, dtypes: Sequence[str] = CPU_DTYPES,
              backends: Sequence[str] = CPU_SWEEP_BACKENDS,
              cases=None, seed: int = 0, log=print) -> tuple[list[Row], bool]:
    """Compare sparsekit's CPU backends with float64 math on the dequantized weight
    (int8-activation backends: on the same fake-quantized activations)."""
    from sparsekit.formats.int8 import Int8Weight

    import sparsekit.ops as ops_pkg
    ops, _ = _ops()
    gen = torch.Generator().manual_seed(seed)
    rows: list[Row] = []
    ctx = dict(gpu="cpu", commit=harness.git_commit(), date=harness.now_iso())
    ctx["torch"], ctx["triton"] = harness.versions()
    for case, lead, n, k, gs, transposed in (cases if cases is not None else _cpu_cases(quick)):
        for dname in dtypes:
            if dname not in DTYPES:
                continue
            dtype = DTYPES[dname]
            _, q, b = make_weight(n, k, dtype, "cpu", gen, group_size=gs)
            if transposed:
                x = torch.randn(k, *lead, generator=gen).to(dtype).t()
            else:
                x = torch.randn(*lead, k, generator=gen).to(dtype)
            wd = q.dequantize()
            ref = F.linear(x.double(), wd.double(), b.double())
            q8 = Int8Weight.from_float(wd.float())
            for name in backends:
                row = Row(op=OP, case=case, backend=name, dtype=dname, **ctx)
                a8 = split_a8(name)
                try:
                    if a8 is not None:
                        out = a8_call(a8[1], x, q, q8, b, backend=a8[0])
                        ref_a8 = a8_reference(a8[1], x, q, q8, b, dtype=torch.float64)
                        if tuple(out.shape) != tuple(ref_a8.shape) or out.dtype != dtype:
                            raise ValueError(f"output {tuple(out.shape)} {out.dtype} != {tuple(ref_a8.shape)} {dtype}")
                        row.rel_err = harness.rel_err(out, ref_a8)
                        finite = bool(torch.isfinite(out).all())
                        tol = CPU_TOL[dname]
                        row.status = "ok" if finite and row.rel_err < tol else "fail"
                        row.note = (f"tol {tol:g}; vs the same fake-quantized activations"
                                    + ("" if finite else "; non-finite output"))
                        rows.append(row)
                        continue
                    if name == "sparsekit_auto":
                        row.chosen_backend = ops_pkg.select_backend(OP, x, q)
                        out = ops.int4_linear(x, q, b)
                    else:
                        out = ops.int4_linear(x, q, b, backend=name)
                    if tuple(out.shape) != tuple(ref.shape) or out.dtype != dtype:
                        raise ValueError(f"output {tuple(out.shape)} {out.dtype} != {tuple(ref.shape)} {dtype}")
                    row.rel_err = harness.rel_err(out, ref)
                    finite = bool(torch.isfinite(out).all())
                    tol = CPU_TOL[dname]
                    row.status = "ok" if finite and row.rel_err < tol else "fail"
                    row.note = f"tol {tol:g}" + ("" if finite else "; non-finite output")
                except Exception as e:
                    row.status, row.note = "fail", "error: " + _short(e)
                rows.append(row)
    return rows, all(r.status == "ok" for r in rows)


print_cpu_table = harness.print_cpu_table
