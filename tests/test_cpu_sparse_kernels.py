"""The CPU sparse matmuls of the C extension (csrc/cpu/sparse_mm.c, sparsekit/ops/_cpu_ext.py): 2:4 and
block-sparse float32 matmuls over the stored weights only, used by the CPU fast path of SparseLinear (up to
any number of rows) and BlockSparseLinear (any rows).

Checked against the float64 matmul of the dense weight on odd shapes (K not a multiple of 8 / of the block,
the half-step tail of the 2:4 loop, partial block rows, every row count around the loops' tile sizes), every
module dtype, leading dimensions, thread counts (the same bits), the non-finite semantics (2:4: as the dense
matmul, via the fallback; block: the kept blocks only, as the kernels), gradients (never the kernel), the
switch-off, and a 2:4 layer too wide for the column index (the kernel only for <= 3 rows).
"""
import dataclasses

import pytest
import torch
from torch import nn

import sparsekit
from sparsekit.formats._validate import sparse24_dense
from sparsekit.ops import _cpu_ext, _dense
from sparsekit.ops.block_sparse import block_dense_f32, block_sparse_linear_packed
from sparsekit.schemes import get_scheme
from sparsekit.testing import assert_close_rel

pytestmark = pytest.mark.skipif(not _cpu_ext.sparse_available(),
                                reason="the C extension's AVX2 sparse matmuls do not run here")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _layer(scheme, k, n, dtype=torch.float32, block=(16, 16), seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(k, n)).to(dtype)
    cfg = get_scheme(scheme).default_config()
    if scheme == "block":
        cfg = dataclasses.replace(cfg, block_size=block)
    sparsekit.sparsify_(m, cfg, progress=False)
    return m[0]


def _dense_weight(layer):
    if hasattr(layer, "blocks"):
        return block_dense_f32(layer.blocks, layer.crow, layer.col, layer.out_features, layer.in_features)
    return sparse24_dense(layer.values.float(), layer.meta_codes, layer.in_features)


def _ref64(layer, x):
    """float64 matmul of the dense weight (zeros where pruned)."""
    w = _dense_weight(layer).double()
    b = None if layer.bias is None else layer.bias.double()
    return nn.functional.linear(x.double(), w, b)


def _kernel_ran(layer):
    plan = layer.__dict__.get(_dense._PLAN_ATTR)
    return plan is not None and callable(plan.kern)


def _close64(y, ref):
    """float32 accumulation in another order than float64: relative to the output scale."""
    err = (y.double() - ref).abs().max().item()
    assert err <= 2e-6 * max(ref.abs().max().item(), 1e-30) * 8, err


@pytest.mark.parametrize("k", [8, 13, 24, 40, 72, 200, 256, 264, 520])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 8, 9, 17, 24, 31, 32, 33, 70])
def test_sp24_kernel_equals_float64_matmul(k, m):
    """Every loop: <= 3 rows (permutes), tiles of up to 32 transposed rows (full, partial, several); K within
    one 128-column chunk of the stored values, several chunks, a partial last chunk with the half-step tail."""
    layer = _layer("2:4", k, 37)
    x = torch.randn(m, k)
    with torch.no_grad():
        y = layer(x)
    assert _kernel_ran(layer)
    _close64(y, _ref64(layer, x))


@pytest.mark.parametrize("threads", [1, 2])
def test_sp24_kernel_many_rows_in_blocks(threads):
    """More rows than one transposed block (1024 rows): the blocks one after another, the same bits on 1 and
    2 threads."""
    layer = _layer("2:4", 264, 53)
    x = torch.randn(2 * 1024 + 37, 264)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.no_grad():
            y = layer(x)
            part = layer(x[1024:1024 + 40])
    finally:
        torch.set_num_threads(before)
    assert _kernel_ran(layer)
    _close64(y, _ref64(layer, x))
    assert torch.equal(y[1024:1024 + 40], part)       # a row's result does not depend on its block


@pytest.mark.parametrize("block", [(16, 16), (32, 64), (64, 32), (128, 16)])
@pytest.mark.parametrize("shape", [(40, 50), (130, 200), (16, 16)])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 17, 64])
def test_block_kernel_equals_float64_matmul(block, shape, m):
    n, k = shape
    layer = _layer("block", k, n, block=block)
    x = torch.randn(m, k)
    with torch.no_grad():
        y = layer(x)
    assert _kernel_ran(layer)
    _close64(y, _ref64(layer, x))


@pytest.mark.parametrize("scheme", ["2:4", "block"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_module_dtypes_and_leading_dims(scheme, dtype, monkeypatch):
    """A float16 / bfloat16 module: float32 math, the result in the module's dtype, as the dense path gives."""
    layer = _layer(scheme, 200, 72, dtype)
    x = torch.randn(2, 3, 200, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        assert _kernel_ran(layer) and y.dtype == dtype and y.shape == (2, 3, 72)
        monkeypatch.setenv(_cpu_ext.CPU_EXT_ENV, "0")
        ref = layer(x)
    assert_close_rel(y, ref, dtype)


@pytest.mark.parametrize("scheme", ["2:4", "block"])
def test_same_bits_on_any_thread_count(scheme):
    """Each output is one thread's sum: the thread count changes nothing."""
    layer = _layer(scheme, 520, 300)
    x = torch.randn(5, 520)
    n = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            y1 = layer(x)
            torch.set_num_threads(max(2, n))
            y2 = layer(x)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(y1, y2)


def test_sp24_non_finite_input_matches_dense_matmul(monkeypatch):
    """The dense matmul multiplies pruned zeros too (0 * Inf = NaN): the kernel declines such an input and
    the dense matmul runs, so the result is the same as without the kernel."""
    layer = _layer("2:4", 64, 24)
    x = torch.randn(3, 64)
    x[0, 5] = float("inf")
    x[2, 9] = float("nan")
    with torch.no_grad():
        y = layer(x)
        monkeypatch.setenv(_cpu_ext.CPU_EXT_ENV, "0")
        ref = layer(x)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    assert torch.equal(y[1], ref[1]) or (y[1] - ref[1]).abs().max() < 1e-5


def test_block_non_finite_input_reaches_only_blocks_that_read_it():
    layer = _layer("block", 64, 48)
    x = torch.randn(3, 64)
    x[0, 0] = float("inf")
    with torch.no_grad():
        y = layer(x)
    assert _kernel_ran(layer)
    ref = block_sparse_linear_packed(x, layer.blocks, layer.crow, layer.col, layer.tcol_ptr, layer.trow, layer.tblk,
                                     layer.out_features, layer.in_features, layer.bias, backend="reference")
    assert torch.equal(y.isfinite(), ref.isfinite()) and y[0].isfinite().any() and not y[0].isfinite().all()
    assert_close_rel(y.nan_to_num(), ref.nan_to_num(), torch.float32)


@pytest.mark.parametrize("scheme", ["2:4", "block"])
def test_gradients_take_the_dense_matmul(scheme):
    layer = _layer(scheme, 64, 32)
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    plan = layer.__dict__.get(_dense._PLAN_ATTR)
    assert plan is None or plan.kern is None            # never built: autograd needs the dense matmul


def test_switched_off_and_any_rows(monkeypatch):
    layer = _layer("2:4", 64, 32)
    with torch.no_grad():
        monkeypatch.setenv(_cpu_ext.CPU_EXT_ENV, "0")
        layer(torch.randn(2, 64))
        assert not _kernel_ran(layer)
        monkeypatch.delenv(_cpu_ext.CPU_EXT_ENV)
        many = torch.randn(300, 64)
        y = layer(many)
        assert _kernel_ran(layer)                       # no row limit
        _close64(y, _ref64(layer, many))


def test_sp24_wide_layer_without_column_index():
    """K > 65536: the one-byte column index is relative to the value's 128-column chunk, so any width runs."""
    k = 65536 + 40
    layer = _layer("2:4", k, 3)
    with torch.no_grad():
        for m in (2, 5):
            x = torch.randn(m, k)
            y = layer(x)
            assert _kernel_ran(layer)
            _close64(y, _ref64(layer, x))


def test_prepare_rejects_inconsistent_tensors():
    layer = _layer("2:4", 64, 8)
    with pytest.raises(ValueError, match="2:4 weight"):
        _cpu_ext.sp24_kernel(layer.values, layer.meta_codes[:, :-1], 64)
    b = _layer("block", 64, 48)
    with pytest.raises(ValueError, match="block-sparse weight"):
        _cpu_ext.block_kernel(b.blocks, b.crow[:-1], b.col, 48, 64)


# ----------------------------------------------------------------------------- int8-code and int4 kernels
def _codes_ref(x, nbits, round_to):
    """The reference per-token quantization (the torch chain) of float32 ``x``."""
    if round_to is not None:
        x = x.to(round_to).float()
    qmax = float(2 ** (nbits - 1) - 1)
    amax = x.abs().amax(-1, keepdim=True)
    s = (amax / qmax).masked_fill_(amax == 0, 1.0)
    return x.div(s).round_().clamp_(-qmax, qmax), s


@pytest.mark.parametrize("k", [8, 24, 40, 200])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 16])
@pytest.mark.parametrize("nbits", [8, 4])
def test_w8a8_kernel_exact_integer_sums(k, m, nbits):
    """Integer codes x integer codes: exact int32 sums; the epilogue as quant_linear's."""
    torch.manual_seed(k + m)
    n = 37
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    cs = torch.rand(n) * 0.01 + 1e-3
    b = torch.randn(n)
    x = torch.randn(m, k) * 3
    y = _cpu_ext.w8a8_kernel(q, cs)(x, nbits, None, b)
    xq, s = _codes_ref(x, nbits, None)
    acc = (xq.double() @ q.double().t()).float()                 # exact integers (< 2**24)
    ref = torch.addcmul(b, acc, s * cs)
    # the same sums; the epilogue's multiply-add may be fused (one rounding) or not (two): a few ulps
    assert torch.allclose(y, ref, rtol=3e-7, atol=3e-7 * ref.abs().max().item())


@pytest.mark.parametrize("k,gs", [(40, 40), (64, 32), (96, 32), (256, 64), (384, 128), (8, 8), (200, 200)])
@pytest.mark.parametrize("m", [1, 2, 4, 5, 16])
@pytest.mark.parametrize("zeros", [True, False])
@pytest.mark.parametrize("round_to", [None, torch.float16, torch.bfloat16])
def test_w4a8_kernel_equals_float64_matmul(k, gs, m, zeros, round_to):
    from sparsekit.formats.int4 import pack_int4
    from sparsekit.ops.int8 import dequantize_int4_fp32

    torch.manual_seed(k + m)
    n = 29
    g = k // gs
    q = pack_int4(torch.randint(0, 16, (n, k)))
    s = (torch.rand(n, g) * 0.1 + 0.01).half()
    z = (torch.randint(0, 16, (n, g)) + 0.5 * torch.randint(0, 2, (n, g))).half() if zeros else None
    b = torch.randn(n)
    x = torch.randn(m, k)
    f = _cpu_ext.w4a8_kernel(q, s, z, gs, k)
    y = f(x, 8, round_to, b)
    xq, st = _codes_ref(x, 8, round_to)
    w = dequantize_int4_fp32(q, s, z, gs, k)
    ref = (xq * st).double() @ w.double().t() + b.double()
    if round_to is None:
        _close64(y, ref)
    else:
        assert_close_rel(y, ref.float().to(round_to).float(), round_to)
        assert torch.equal(y, y.to(round_to).float())            # the result is rounded to round_to


@pytest.mark.parametrize("nbits", [8, 4])
def test_fused_non_finite_rows_are_nan(nbits):
    q = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    x = torch.randn(3, 64)
    x[0, 3] = float("inf")
    x[2, 7] = float("nan")
    y = _cpu_ext.w8a8_kernel(q, torch.ones(16))(x, nbits, None, None)
    assert y[0].isnan().all() and y[2].isnan().all() and y[1].isfinite().all()


def _quant_layer(scheme, k, n, dtype=torch.float32):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(k, n)).to(dtype)
    s = get_scheme(scheme)
    (sparsekit.sparsify_ if s.sparse else sparsekit.quantize_)(m, scheme, progress=False)
    return m[0]


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8", "2:4+int8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 5, 16])
def test_quantized_modules_equal_the_dense_path(scheme, dtype, m, monkeypatch):
    """W8A8 (int8 codes), W4A8 (int4 weight, float32 product) and 2:4+int8 (2:4 codes) through the kernels:
    the same result as the dense float32 matmul up to summation order (outputs in the compute dtype)."""
    layer = _quant_layer(scheme, 256, 72, dtype)
    x = torch.randn(1, m, 256, dtype=dtype) if m > 1 else torch.randn(1, 256, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        assert _kernel_ran(layer)
        monkeypatch.setenv(_cpu_ext.CPU_EXT_ENV, "0")
        ref = layer(x)
    compute = torch.float16 if dtype == torch.float32 and scheme != "2:4+int8" else dtype
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert_close_rel(y, ref, compute)



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 5, 24, 70])
@pytest.mark.parametrize("k", [200, 256])
def test_sparse_int4_module_uses_the_2_4_kernel_from_2_rows(dtype, m, k, monkeypatch):
    """2:4+int4: the 2:4 kernel over the dequantized stored values from 2 rows up (one row: the float16-weight
    GEMM over the expansion); the same result as with the kernels off."""
    layer = _quant_layer("2:4+int4", k, 40, dtype)
    x = torch.randn(m, k, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        assert _kernel_ran(layer) == (m >= 2)
        monkeypatch.setenv(_cpu_ext.CPU_KERNELS_ENV, "0")
        ref = layer(x)
    assert y.dtype == ref.dtype == dtype
    assert_close_rel(y, ref, torch.float16 if dtype == torch.float32 else dtype)



@pytest.mark.parametrize("kind", ["w8a8", "w4a8"])
def test_fused_linear_runs_large_batches_in_blocks(kind, monkeypatch):
    """More rows than FUSED_BLOCK_ROWS: the blocks one after another (bounded scratch); every row's result --
    exact integer sums, then scales, bias and rounding -- equals that of a short batch holding the row."""
    from sparsekit.formats.int4 import pack_int4

    monkeypatch.setattr(_cpu_ext, "FUSED_BLOCK_ROWS", 16)
    torch.manual_seed(0)
    if kind == "w8a8":
        f = _cpu_ext.w8a8_kernel(torch.randint(-127, 128, (29, 40), dtype=torch.int8), torch.rand(29))
        x = torch.randn(53, 40)
    else:
        q4 = pack_int4(torch.randint(0, 16, (29, 256)))
        s4, z4 = (torch.rand(29, 4) * 0.1 + 0.01).half(), torch.randint(0, 16, (29, 4)).half()
        f = _cpu_ext.w4a8_kernel(q4, s4, z4, 64, 256)
        x = torch.randn(53, 256)
    bias = torch.randn(29)
    y = f(x, 8, torch.float16, bias)
    assert y.shape == (53, 29)
    for r0 in (0, 14, 16, 37, 50):
        assert torch.equal(y[r0:r0 + 3], f(x[r0:r0 + 3].contiguous(), 8, torch.float16, bias))


def test_plain_c_loops_equal_the_avx2_loops():
    """The plain C loops (what runs without AVX2 + FMA) compute the same sums as the AVX2 ones: the same integer
    results, float32 results up to summation order."""
    from sparsekit.formats.int4 import pack_int4

    ext = _cpu_ext._ext
    torch.manual_seed(0)
    sp = _layer("2:4", 264, 37)        # three chunks of the stored values, the last partial
    blk = _layer("block", 200, 130, block=(32, 64))
    q8 = torch.randint(-127, 128, (29, 40), dtype=torch.int8)
    q4 = pack_int4(torch.randint(0, 16, (29, 256)))
    s4, z4 = (torch.rand(29, 4) * 0.1 + 0.01).half(), torch.randint(0, 16, (29, 4)).half()
    cases = [
        (lambda m: _cpu_ext.sp24_kernel(sp.values, sp.meta_codes, 264)(torch.randn(m, 264), sp.bias.float()), False),
        (lambda m: _cpu_ext.block_kernel(blk.blocks, blk.crow, blk.col, 130, 200)(torch.randn(m, 200), None), False),
        (lambda m: _cpu_ext.w8a8_kernel(q8, torch.rand(29))(torch.randn(m, 40), 8, None, None), True),
        (lambda m: _cpu_ext.w4a8_kernel(q4, s4, z4, 64, 256)(torch.randn(m, 256), 8, None, None), False),
    ]
    for run, exact in cases:
        for m in (1, 3, 5, 17, 40):
            torch.manual_seed(m)
            y = run(m)
            try:
                ext.force_plain(True)
                torch.manual_seed(m)
                y_plain = run(m)
            finally:
                ext.force_plain(False)
            if exact:
                assert torch.equal(y, y_plain)
            else:
                assert torch.allclose(y, y_plain, rtol=1e-5, atol=1e-5 * y.abs().max().item())
