"""The CPU sparse matmuls of the C extension (csrc/cpu/sparse_mm.c, sparsekit/ops/_cpu_ext.py): 2:4 and
block-sparse float32 matmuls over the stored weights only, used by the CPU fast path of SparseLinear (up to
SP24_MAX_ROWS rows) and BlockSparseLinear (any rows).

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


@pytest.mark.parametrize("k", [8, 13, 24, 40, 72, 200, 520])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 8, 9, 17, 24])
def test_sp24_kernel_equals_float64_matmul(k, m):
    layer = _layer("2:4", k, 37)
    x = torch.randn(m, k)
    with torch.no_grad():
        y = layer(x)
    assert _kernel_ran(layer)
    _close64(y, _ref64(layer, x))


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


def test_switched_off_and_row_limit(monkeypatch):
    layer = _layer("2:4", 64, 32)
    with torch.no_grad():
        monkeypatch.setenv(_cpu_ext.CPU_EXT_ENV, "0")
        layer(torch.randn(2, 64))
        assert not _kernel_ran(layer)
        monkeypatch.delenv(_cpu_ext.CPU_EXT_ENV)
        many = torch.randn(_cpu_ext.SP24_MAX_ROWS + 1, 64)
        y = layer(many)
        assert not _kernel_ran(layer)                   # more rows: the dense matmul (kernel not built)
        _close64(y, _ref64(layer, many))
        layer(torch.randn(2, 64))
        assert _kernel_ran(layer)


def test_sp24_wide_layer_without_column_index():
    """K > 65536 (no uint16 column index): the kernel runs for <= 3 rows, the dense matmul above."""
    k = 65536 + 40
    layer = _layer("2:4", k, 3)
    with torch.no_grad():
        for m in (2, 5):
            x = torch.randn(m, k)
            y = layer(x)
            _close64(y, _ref64(layer, x))
        plan = layer.__dict__[_dense._PLAN_ATTR]
        assert plan.kern.keep[2] is None


def test_prepare_rejects_inconsistent_tensors():
    layer = _layer("2:4", 64, 8)
    with pytest.raises(ValueError, match="2:4 weight"):
        _cpu_ext.sp24_kernel(layer.values, layer.meta_codes[:, :-1], 64)
    b = _layer("block", 64, 48)
    with pytest.raises(ValueError, match="block-sparse weight"):
        _cpu_ext.block_kernel(b.blocks, b.crow[:-1], b.col, 48, 64)
