"""W8A8 / W4A8 / token-adaptive mixed-activation linears: the Triton kernels (interpreter on CPU,
compiled on GPU) vs float64 math on the SAME fake-quantized activations and dequantized weight.

The int32 accumulation is exact, so the kernels differ from that truth only by
the fp32 epilogue and the final fp16/bf16 rounding: tested with the dtype's
relative-norm bound AND elementwise within one output ulp of the reference
backend."""
import pytest
import torch
import torch.nn.functional as F

import sparsekit.kernels as skk
from sparsekit.formats.int4 import Int4Weight
from sparsekit.formats.int8 import Int8Weight
from sparsekit.ops.act_quant import per_token_quant_reference, select_token_bits
from sparsekit.ops.int8 import (dequantize_int4_fp32, int8_linear, int8_linear_packed, w4a8_linear,
                                w4a8_linear_packed)
from sparsekit.testing import assert_all_written, assert_close_rel, noncontiguous, poison_outputs

DTYPES = [torch.float16, torch.bfloat16]
_ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23}


def _w8(n, k, device="cpu"):
    return Int8Weight.from_float(torch.randn(n, k) * k ** -0.5).to(device)


def _w4(n, k, dtype, group_size=32, symmetric=False, device="cpu"):
    return Int4Weight.from_float(torch.randn(n, k) * k ** -0.5, group_size, symmetric, dtype=dtype).to(device)


def _x(shape, dtype, device="cpu"):
    x = torch.randn(*shape)
    if x.shape[-1] > 3:
        x[..., 3] *= 8                     # an outlier channel, as in real activations
    return x.to(dtype=dtype, device=device)


def _wfp32(w):
    if isinstance(w, Int8Weight):
        return w.dequantize()
    return dequantize_int4_fp32(w.qweight, w.scales, w.zeros, w.group_size, w.in_features)


def _ref64(x, w, b, bits):
    """float64 truth on the same fake-quantized activations and the fp32-dequantized weight."""
    q, s = per_token_quant_reference(x, bits)
    y = (q.double() * s.double()) @ _wfp32(w).double().T
    return y + b.double() if b is not None else y


def _check(y, x, w, b, bits, fn, **kw):
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    assert_all_written(y)
    ref = _ref64(x, w, b, bits)
    e = assert_close_rel(y, ref)
    # nearly exact: within one output ulp (plus fp32 epilogue slack) of the reference backend
    yr = fn(x, w, b, backend="reference", **kw).double()
    tol = 1.01 * _ULP[x.dtype] * yr.abs() + 1e-30 + 1e-6 * ref.abs().max()
    bad = (y.double() - yr).abs() > tol
    assert not bool(bad.any()), f"{int(bad.sum())} elements more than 1 ulp from the reference backend"
    return e


# ------------------------------------------------------------------ W8A8
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n,k", [(1, 8), (5, 7), (17, 37), (33, 100)])
def test_w8a8_interpret_matches_fake_quant_math(m, n, k, dtype):
    w = _w8(n, k)
    x = _x((m, k), dtype)
    b = (torch.randn(n) * 0.1).to(dtype) if n % 2 else None
    with poison_outputs():
        y = int8_linear(x, w, b, backend="interpret")
    _check(y, x, w, b, 8, int8_linear)


def test_w8a8_fp32_activations_batch_dims_noncontiguous():
    w = _w8(19, 64)
    x = _x((2, 3, 64), torch.float32)
    b = torch.randn(19)
    with poison_outputs():
        y = int8_linear(noncontiguous(x), w, b, backend="interpret")
    assert y.shape == (2, 3, 19)
    _check(y, x, w, b, 8, int8_linear)
    xt = torch.randn(64, 5).half().t()
    _check(int8_linear(xt, w, None, backend="interpret"), xt, w, None, 8, int8_linear)


@pytest.mark.parametrize("split", [2, 3])
def test_w8a8_split_k_path(split):
    kmod = skk.load("int8", interpret=True)
    w = _w8(40, 200)
    x = _x((3, 200), torch.float16)
    b = torch.randn(40).half()
    q, s = per_token_quant_reference(x, 8)
    out = torch.full((3, 40), float("nan"), dtype=torch.float16)
    kmod.w8a8_linear(q, s[:, 0].contiguous(), w.qweight, w.scales, b, out,
                     config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, SPLIT_K=split))
    assert_close_rel(out, _ref64(x, w, b, 8))


# ------------------------------------------------------------------ W4A8
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n,k", [(1, 64), (17, 96), (33, 160)])
def test_w4a8_interpret_matches_fake_quant_math(m, n, k, dtype):
    w = _w4(n, k, dtype, symmetric=(m == 3))
    x = _x((m, k), dtype)
    b = (torch.randn(n) * 0.1).to(dtype) if n % 2 else None
    with poison_outputs():
        y = w4a8_linear(x, w, b, backend="interpret")
    _check(y, x, w, b, 8, w4a8_linear)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size,k", [(32, 64), (64, 128), (128, 256), (-1, 96), (-1, 40)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_w4a8_group_sizes(group_size, k, symmetric, dtype):
    w = _w4(19, k, dtype, group_size, symmetric)
    x = _x((2, 3, k), dtype)
    b = (torch.randn(19) * 0.1).to(dtype)
    with poison_outputs():
        y = w4a8_linear(x, w, b, backend="interpret")
    _check(y, x, w, b, 8, w4a8_linear)


@pytest.mark.parametrize("group_size,k", [(32, 96), (-1, 40), (64, 128)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_w4_register_unpack_is_exact(group_size, k, symmetric):
    kmod = skk.load("int8", interpret=True)
    w = _w4(21, k, torch.float16, group_size, symmetric)
    out = torch.full((21, k), 99, dtype=torch.int8)
    kmod.unpack_w4_int8(w.qweight, w.zeros, w.group_size, k, out, block_k=32)
    expect = w.unpack().int() - w.zero_points().int().repeat_interleave(w.group_size, 1)
    assert torch.equal(out.int(), expect)


@pytest.mark.parametrize("group_size,k,split", [(32, 224, 3), (-1, 200, 2), (64, 256, 4)])
def test_w4a8_split_k_path(group_size, k, split):
    kmod = skk.load("int8", interpret=True)
    w = _w4(40, k, torch.bfloat16, group_size)
    x = _x((3, k), torch.bfloat16)
    b = (torch.randn(40) * 0.1).bfloat16()
    q, s = per_token_quant_reference(x, 8)
    out = torch.full((3, 40), float("nan"), dtype=torch.bfloat16)
    kmod.w4a8_linear(q, s[:, 0].contiguous(), w.qweight, w.scales, w.zeros, w.group_size, k, b, out,
                     config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, SPLIT_K=split))
    assert_close_rel(out, _ref64(x, w, b, 8))


@pytest.mark.parametrize("m,group_size", [(1, 128), (1, -1), (40, 32)])
def test_gpu_tile_configs_run_in_interpreter(m, group_size):
    # each GPU M-bucket configuration (split-K included) through the interpreter
    kmod = skk.load("int8", interpret=True)
    n, k = 20, 512
    gs = k if group_size == -1 else group_size
    cfg = kmod.fwd_config(m, n, k, gs, num_sms=64)
    if m == 1:
        assert cfg["SPLIT_K"] > 1
    w = _w4(n, k, torch.float16, group_size)
    x = _x((m, k), torch.float16)
    q, s = per_token_quant_reference(x, 8)
    out = torch.full((m, n), float("nan"), dtype=torch.float16)
    kmod.w4a8_linear(q, s[:, 0].contiguous(), w.qweight, w.scales, w.zeros, w.group_size, k, None, out, config=cfg)
    assert_close_rel(out, _ref64(x, w, None, 8))
    w8 = _w8(n, k)
    cfg8 = kmod.fwd_config(m, n, k, None, num_sms=64)
    kmod.w8a8_linear(q, s[:, 0].contiguous(), w8.qweight, w8.scales, None, out, config=cfg8)
    assert_close_rel(out, _ref64(x, w8, None, 8))


def test_config_checks():
    kmod = skk.load("int8", interpret=True)
    with pytest.raises(ValueError, match="power of two >= 32"):
        kmod.check_config(dict(BLOCK_K=16), None, 64)
    with pytest.raises(ValueError, match="straddle"):
        kmod.check_config(dict(BLOCK_K=64), 32, 128)
    kmod.check_config(dict(BLOCK_K=128), 96, 96)         # one group per row: any BLOCK_K
    for m in (1, 16, 64, 4096):
        for gs in (32, 64, 128, None):
            kmod.check_config(kmod.fwd_config(m, 4096, 4096, gs), gs, 4096)


# ------------------------------------------------------------------ A4 and token-adaptive mixed
@pytest.mark.parametrize("which", ["w8a8", "w4a8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_and_a4_match_fake_quant_math(which, dtype):
    k = 96
    w = _w8(23, k) if which == "w8a8" else _w4(23, k, dtype, 32)
    fn = int8_linear if which == "w8a8" else w4a8_linear
    x = _x((2, 9, k), dtype)
    x[0, 4] *= 5                                              # a high-norm token
    b = (torch.randn(23) * 0.1).to(dtype)
    bits = select_token_bits(x, frac8=0.25)
    assert int(bits[0, 4]) == 8
    with poison_outputs():
        ym = fn(x, w, b, act_bits="mixed", frac8=0.25, backend="interpret")
    _check(ym, x, w, b, bits, fn, act_bits="mixed", frac8=0.25)
    # the same launch with the explicit per-token bits
    assert torch.equal(ym, fn(x, w, b, act_bits=bits, backend="interpret"))
    # all-4-bit tokens (A4) and all-8-bit tokens
    y4 = fn(x, w, b, act_bits=4, backend="interpret")
    _check(y4, x, w, b, 4, fn, act_bits=4)
    y8 = fn(x, w, b, backend="interpret")
    # 8-bit tokens of the mixed batch are computed exactly as in the all-8-bit batch, 4-bit ones as in A4
    sel = bits == 8
    assert torch.equal(ym[sel], y8[sel]) and torch.equal(ym[~sel], y4[~sel])


def test_mixed_importance_score_picks_tokens():
    w = _w4(16, 64, torch.float16, 32)
    x = _x((10, 64), torch.float16)
    score = torch.zeros(10)
    score[[2, 7]] = 1.0                                       # e.g. attention received
    y = w4a8_linear(x, w, None, act_bits="mixed", frac8=0.2, importance=score, backend="interpret")
    bits = torch.full((10,), 4, dtype=torch.int8)
    bits[[2, 7]] = 8
    assert torch.equal(y, w4a8_linear(x, w, None, act_bits=bits, backend="interpret"))
    assert_close_rel(y, _ref64(x, w, None, bits))


def test_activation_quant_error_levels():
    # the quality effect on a random layer with outliers: A8 << mixed << A4
    torch.manual_seed(0)
    w = _w4(64, 256, torch.float16, 64)
    x = _x((64, 256), torch.float16)
    x[::8] *= 6                                                # 1/8 of the tokens are outlier tokens
    dense = F.linear(x.double(), _wfp32(w).double())
    errs = {}
    for name, kw in (("A8", {}), ("mixed25", dict(act_bits="mixed", frac8=0.25)), ("A4", dict(act_bits=4))):
        y = w4a8_linear(x, w, None, backend="reference", **kw)
        errs[name] = ((y.double() - dense).norm() / dense.norm()).item()
    print("W4 layer output rel. error vs W4A16 math:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert errs["A8"] < errs["mixed25"] < errs["A4"]


# ------------------------------------------------------------------ autograd
@pytest.mark.parametrize("backend", ["interpret", "dense", "reference"])
@pytest.mark.parametrize("which", ["w8a8", "w4a8"])
def test_grad_x_straight_through_and_bias(backend, which):
    k = 64
    w = _w8(24, k) if which == "w8a8" else _w4(24, k, torch.float16, 32)
    fn = int8_linear if which == "w8a8" else w4a8_linear
    x = _x((2, 4, k), torch.float16).requires_grad_(True)
    b = (torch.randn(24) * 0.1).half().requires_grad_(True)
    y = fn(x, w, b, act_bits="mixed", backend=backend)
    dy = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, b), dy)
    assert_close_rel(gx, dy.double() @ _wfp32(w).double(), what="grad x")
    assert_close_rel(gb, dy.double().sum((0, 1)), what="grad bias")


# ------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors():
    w8 = _w8(8, 64)
    w4 = _w4(8, 64, torch.float16, 32)
    x = torch.randn(3, 64).half()
    with pytest.raises(TypeError, match="Int8Weight"):
        int8_linear(x, w4)
    with pytest.raises(TypeError, match="Int4Weight"):
        w4a8_linear(x, w8)
    with pytest.raises(ValueError, match="in_features=64"):
        int8_linear(torch.randn(3, 63).half(), w8)
    with pytest.raises(TypeError, match="activations"):
        int8_linear(x.to(torch.int32), w8)
    with pytest.raises(TypeError, match="does not match the weight's scale dtype"):
        w4a8_linear(x.bfloat16(), w4)
    with pytest.raises(ValueError, match="act_bits"):
        int8_linear(x, w8, act_bits=6)
    with pytest.raises(ValueError, match="act_bits"):
        w4a8_linear(x, w4, act_bits="dynamic")
    with pytest.raises(ValueError, match="4 or 8"):
        w4a8_linear(x, w4, act_bits=torch.tensor([4, 8, 2]))
    with pytest.raises(ValueError, match="shape"):
        w4a8_linear(x, w4, act_bits=torch.tensor([4, 8]))
    with pytest.raises(ValueError, match="frac8"):
        w4a8_linear(x, w4, act_bits="mixed", frac8=-0.1)
    with pytest.raises(ValueError, match="one score per token"):
        w4a8_linear(x, w4, act_bits="mixed", importance=torch.ones(4))
    with pytest.raises(ValueError, match="only applies"):
        w4a8_linear(x, w4, act_bits=8, importance=torch.ones(3))
    with pytest.raises(ValueError, match="bias must have shape"):
        int8_linear(x, w8, torch.randn(7).half())
    with pytest.raises(TypeError, match="bias must match"):
        int8_linear(x, w8, torch.randn(8))
    with pytest.raises(ValueError, match="wscale"):
        int8_linear_packed(x, w8.qweight, w8.scales.half())
    with pytest.raises(TypeError, match="int8 tensor"):
        int8_linear_packed(x, w8.qweight.int(), w8.scales)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        w4a8_linear_packed(x, w4.qweight, w4.scales, w4.zeros, 48, 64)
    with pytest.raises(ValueError, match="too large"):
        int8_linear_packed(torch.randn(1, 140000), torch.zeros(2, 140000, dtype=torch.int8), torch.ones(2))
    with pytest.raises(ValueError, match="CUDA tensors"):
        w4a8_linear(x, w4, backend="triton")
    with pytest.raises(ValueError, match="is on"):
        int8_linear(x.to("meta"), w8)
    with pytest.raises(TypeError, match="int8"):
        Int8Weight(w8.qweight.int(), w8.scales, (8, 64))
    with pytest.raises(ValueError, match="scales must have shape"):
        Int8Weight(w8.qweight, w8.scales[:4], (8, 64))


def test_format_and_dispatch():
    from sparsekit.ops import dispatch

    w = torch.randn(6, 40)
    q = Int8Weight.from_float(w)
    assert int(q.qweight.abs().max()) <= 127 and q.nbytes() == 6 * 40 + 24
    assert ((q.dequantize() - w).abs() <= q.scales[:, None] / 2 * (1 + 1e-6)).all()
    z = Int8Weight.from_float(torch.zeros(2, 8))
    assert torch.equal(z.scales, torch.ones(2)) and not z.qweight.any()
    for op in ("int8_linear", "w4a8_linear"):
        assert dispatch.resolve(op, "cpu") == "dense"
        assert dispatch.available_backends(op, "cpu") == ["interpret", "dense", "reference"]
    assert dispatch.resolve("per_token_quant", "cpu") == "reference"
    assert dispatch.available_backends("per_token_quant", "cpu") == ["interpret", "reference"]
    x = torch.randn(2, 40).half()
    assert torch.equal(int8_linear(x, q), int8_linear(x, q, backend="reference"))
    assert int8_linear(torch.randn(0, 40).half(), q, backend="interpret").shape == (0, 6)
    assert w4a8_linear(x[0], _w4(5, 40, torch.float16, -1), backend="interpret").shape == (5,)


# ------------------------------------------------------------------ torch.library
@pytest.mark.parametrize("backend", ["reference", "interpret"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(backend, dtype):
    x = _x((2, 3, 64), dtype)
    bits = select_token_bits(x, 0.5)
    b = (torch.randn(17) * 0.1).to(dtype)
    w8 = _w8(17, 64)
    w4 = _w4(17, 64, dtype, 32, symmetric=(dtype == torch.bfloat16))
    op8 = torch.ops.sparsekit.int8_linear.default
    op4 = torch.ops.sparsekit.w4a8_linear.default
    torch.library.opcheck(op8, (x, w8.qweight, w8.scales, b, 8, None, backend))
    torch.library.opcheck(op8, (x.clone().requires_grad_(True), w8.qweight, w8.scales, None, 8, bits, backend))
    torch.library.opcheck(op4, (x, w4.qweight, w4.scales, w4.zeros, 32, 64, b, 8, bits, backend))
    torch.library.opcheck(op4, (x.clone().requires_grad_(True), w4.qweight, w4.scales, w4.zeros, 32, 64, None,
                                4, None, backend))


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 300])
@pytest.mark.parametrize("n,k", [(1, 64), (17, 96), (4099, 4096), (1000, 11008), (11008, 4096)])
@pytest.mark.parametrize("act", [8, "mixed"])
def test_triton_gpu_w8a8(m, n, k, dtype, act):
    w = _w8(n, k, "cuda")
    x = _x((m, k), dtype, "cuda")
    b = (torch.randn(n, device="cuda") * 0.1).to(dtype)
    with poison_outputs():
        y = int8_linear(x, w, b, act_bits=act, backend="triton")
    bits = 8 if act == 8 else select_token_bits(x, 0.25)
    _check(y, x, w, b, bits, int8_linear, act_bits=act)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 300])
@pytest.mark.parametrize("n,k,group_size", [(1, 64, 32), (17, 96, 32), (4099, 4096, 128), (4096, 4096, 64),
                                            (1000, 11008, 128), (4096, 4096, -1), (11008, 4096, 32)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_triton_gpu_w4a8(m, n, k, group_size, dtype, symmetric):
    w = _w4(n, k, dtype, group_size, symmetric, "cuda")
    x = _x((m, k), dtype, "cuda")
    b = (torch.randn(n, device="cuda") * 0.1).to(dtype)
    act = "mixed" if m % 2 else 8
    with poison_outputs():
        y = w4a8_linear(x, w, b, act_bits=act, backend="triton")
    bits = 8 if act == 8 else select_token_bits(x, 0.25)
    _check(y, x, w, b, bits, w4a8_linear, act_bits=act)


# ------------------------------------------------------------------ benchmark module (CPU paths)
def test_bench_int4_a8_rows_cpu():
    from sparsekit.bench import harness
    from sparsekit.bench import int4 as bench_int4

    assert bench_int4.split_a8("triton_w4a8_mixed") == ("triton", "w4a8_mixed")
    assert bench_int4.split_a8("triton") is None and bench_int4.split_a8("torch_int_mm") is None
    names = ("interpret_w4a8", "interpret_w4a8_mixed", "interpret_w8a8")
    rows, ok = bench_int4.cpu_sweep(quick=True, dtypes=("bf16",), backends=names)
    assert ok and len(rows) == 2 * len(names) and all(r.rel_err < 1e-2 for r in rows)
    # the GPU timing path, dry-run on CPU tensors with the host clock
    rows = bench_int4.run_gpu(shapes=[(24, 64)], ms=[3], backends=("dense", "reference_w4a8", "interpret_w8a8",
                                                                   "torch_int_mm"),
                              device="cpu", timer=harness.time_rotating_cpu, warmup_ms=0.5, rep_ms=1.0,
                              log=lambda *a: None)
    by = {r.backend: r for r in rows}
    assert by["reference_w4a8"].status == "ok" and by["reference_w4a8"].rel_err < bench_int4.A8_TOL
    assert by["interpret_w8a8"].status == "ok" and by["interpret_w8a8"].speedup_vs_dense is not None
    assert by["torch_int_mm"].status in ("ok", "skip")


# ------------------------------------------------------------------ W4A8: exact per-group conversion
def test_exponent_bias_conversion_is_exact_on_its_whole_range():
    # bits(0x4B400000 + v) - 1.5 * 2**23 == float(v) for -2**22 <= v <= 2**22 (both ends included),
    # bit for bit the same float as the plain conversion
    kmod = skk.load("int8", interpret=True)
    lim = kmod.MAGIC_MAX
    edges = torch.tensor([-lim, -lim + 1, -lim + 2, -1, 0, 1, lim - 2, lim - 1, lim], dtype=torch.int32)
    v = torch.cat([edges, torch.randint(-lim, lim + 1, (5000,), dtype=torch.int32)])
    fast = kmod.int32_to_float(v, torch.full(v.shape, float("nan")), magic=True)
    plain = kmod.int32_to_float(v, torch.full(v.shape, float("nan")), magic=False)
    assert torch.equal(fast, v.double().float()) and torch.equal(plain, fast)
    # the bound is tight: one past either end is wrong, so the kernel must never see such a group sum
    out = kmod.int32_to_float(torch.tensor([lim + 1, -lim - 1], dtype=torch.int32), torch.empty(2))
    assert out.tolist() != [lim + 1, -lim - 1]
    # any int8 x int8 group sum of up to MAGIC_MAX_GROUP columns is inside the range
    assert kmod.MAGIC_MAX_GROUP * 128 * 128 <= lim and (kmod.MAGIC_MAX_GROUP + 1) * 128 * 128 > lim


def _w4_extreme(n, k, group_size, dtype, sign):
    """An Int4Weight whose ``code - zero`` is -15 or +15 everywhere (codes 0 / 15 against zeros 15 / 0),
    alternating per row when sign == 0, with power-of-two scales."""
    rows = torch.arange(n)[:, None]
    neg = torch.full((n, 1), sign < 0) if sign else (rows % 2 == 0)
    q = torch.where(neg, 0, 15).expand(n, k).to(torch.uint8)
    g = k // group_size
    zeros = torch.where(neg, 15.0, 0.0).expand(n, g)
    scales = 2.0 ** -torch.randint(2, 6, (n, g)).float()
    return Int4Weight.from_quantized(q, scales, zeros.contiguous(), group_size, False, dtype)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("sign", [-1, 1, 0])
def test_w4a8_worst_case_group_sums_are_exact(group_size, sign):
    # the largest group sums a W4A8 kernel can meet: activation codes -128 / +127 against
    # code - zero = +-15 in every column, |sum| = group_size * 128 * 15.  With power-of-two
    # scales every step of the kernel's fp32 math is exact, so the output is the exact value
    # rounded once to fp16; the exponent-bias and the plain conversion agree bit for bit.
    kmod = skk.load("int8", interpret=True)
    k, n, m = 4 * group_size, 18, 3
    w = _w4_extreme(n, k, group_size, torch.float16, sign)
    xq = torch.full((m, k), -128, dtype=torch.int8)
    xq[1] = 127
    xq[2, ::2] = 127                         # mixed signs: partial cancellation
    xs = torch.tensor([2.0 ** -14, 2.0 ** -12, 2.0 ** -13])
    wq = (w.unpack().int() - w.zero_points().int().repeat_interleave(group_size, 1)).double()
    assert int(wq.abs().min()) == 15
    wscale = w.scales.double().repeat_interleave(group_size, 1)
    exact = ((xq.double() * xs.double()[:, None]) @ (wq * wscale).T)
    group_sums = xq.double().reshape(m, 1, 4, group_size) * wq.reshape(1, n, 4, group_size)
    assert group_sums.sum(-1).abs().max() == group_size * 128 * 15
    outs = []
    for magic in (True, False):
        out = torch.full((m, n), float("nan"), dtype=torch.float16)
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, SPLIT_K=1, MAGIC=magic)
        kmod.w4a8_linear(xq, xs, w.qweight, w.scales, w.zeros, group_size, k, None, out, config=cfg)
        outs.append(out)
    assert torch.equal(outs[0], exact.to(torch.float16))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("group_size,k,block_k", [(32, 160, 32), (64, 256, 32), (128, 384, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_w4a8_exponent_bias_matches_plain_conversion_bitwise(group_size, k, block_k, dtype):
    # on random data (arbitrary scales, 8- and 4-bit tokens, bias) the kernel's output is the
    # same bits whether the group sums are converted by exponent bias or by the conversion op
    kmod = skk.load("int8", interpret=True)
    w = _w4(23, k, dtype, group_size)
    x = _x((5, k), dtype)
    q, s = per_token_quant_reference(x, torch.tensor([8, 4, 8, 8, 4]))
    b = (torch.randn(23) * 0.1).to(dtype)
    outs = []
    for magic in (True, False):
        out = torch.full((5, 23), float("nan"), dtype=dtype)
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=block_k, GROUP_M=1, SPLIT_K=1, MAGIC=magic)
        kmod.w4a8_linear(q, s[:, 0].contiguous(), w.qweight, w.scales, w.zeros, group_size, k, b, out, config=cfg)
        outs.append(out)
    assert_all_written(outs[0])
    assert torch.equal(outs[0], outs[1])
    assert_close_rel(outs[0], _ref64(x, w, b, torch.tensor([8, 4, 8, 8, 4])))


def test_w4a8_exponent_bias_refused_for_large_groups():
    kmod = skk.load("int8", interpret=True)
    w = _w4(4, 1024, torch.float16, -1)
    q, s = per_token_quant_reference(_x((2, 1024), torch.float16), 8)
    out = torch.empty((2, 4), dtype=torch.float16)
    with pytest.raises(ValueError, match="MAGIC"):
        kmod.w4a8_linear(q, s[:, 0].contiguous(), w.qweight, w.scales, w.zeros, 1024, 1024, None, out,
                         config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, SPLIT_K=1, MAGIC=True))


@pytest.mark.parametrize("group_size,k,gps,split", [(32, 160, 4, 2), (32, 224, 2, 3), (64, 192, 2, 1), (32, 96, 8, 1)])
def test_w4a8_groups_per_step(group_size, k, gps, split):
    # several whole groups per loop step (each its own int32 sum and conversion); a last,
    # partial step masks the groups past the end, and a split without groups adds nothing
    kmod = skk.load("int8", interpret=True)
    w = _w4(21, k, torch.float16, group_size)
    x = _x((4, k), torch.float16)
    b = (torch.randn(21) * 0.1).half()
    q, s = per_token_quant_reference(x, 8)
    out = torch.full((4, 21), float("nan"), dtype=torch.float16)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, SPLIT_K=split, GROUPS_PER_STEP=gps)
    kmod.w4a8_linear(q, s[:, 0].contiguous(), w.qweight, w.scales, w.zeros, group_size, k, b, out, config=cfg)
    assert_all_written(out)
    assert_close_rel(out, _ref64(x, w, b, 8))
    ref = torch.full_like(out, float("nan"))
    kmod.w4a8_linear(q, s[:, 0].contiguous(), w.qweight, w.scales, w.zeros, group_size, k, b, ref,
                     config=dict(cfg, SPLIT_K=1, GROUPS_PER_STEP=1))
    if split == 1:
        assert torch.equal(out, ref)          # the same sums in the same order


def test_w4a8_groups_per_step_is_checked():
    kmod = skk.load("int8", interpret=True)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="GROUPS_PER_STEP"):
            kmod.check_config(dict(BLOCK_K=32, GROUPS_PER_STEP=bad), 32, 128)
