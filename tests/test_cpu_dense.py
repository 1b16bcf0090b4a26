"""The ``dense`` backend (sparsekit/ops/_dense.py): CPU's default for every compressed linear.

The packed weight is expanded once per weight version and cached (per module:
a ``CpuPlan``); the matmul runs in float32 on CPU, through fbgemm's
float16-weight GEMM for few rows where the weight is exactly float16.  These
tests check it against the float64 math of the packed weight on odd shapes
and every dtype, that in-place updates and new tensors are seen, that freed
weights leave the cache, copies and pickles, and the opt-out.
"""
import copy
import dataclasses
import gc
import io
import weakref

import pytest
import torch
from torch import nn

import sparsekit
from sparsekit.ops import _dense, dispatch
from sparsekit.schemes import get_scheme
from sparsekit.testing import assert_close_rel

SCHEMES = ["2:4", "block", "int4", "w8a8", "w4a8", "2:4+int4", "2:4+int8"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF_ONLY = {"int4", "w8a8", "w4a8", "2:4+int4"}      # compute dtype float16/bfloat16 (float32 in/out allowed)


def _model(scheme, dtype, k=200, n=72, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(k, n), nn.GELU(), nn.Linear(n, 40)).to(dtype)
    cfg = get_scheme(scheme).default_config()
    fields = {f.name for f in dataclasses.fields(cfg)}
    if "block_size" in fields:
        cfg = dataclasses.replace(cfg, block_size=(16, 16))
    if "group_size" in fields and scheme != "2:4+int4":
        cfg = dataclasses.replace(cfg, group_size=None)          # the largest of 128/64/32 dividing K
    (sparsekit.sparsify_ if get_scheme(scheme).sparse else sparsekit.quantize_)(m, cfg, progress=False)
    return m


def _with(monkeypatch, on: bool):
    monkeypatch.setenv(_dense.CPU_DENSE_ENV, "1" if on else "0")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 7])
def test_dense_backend_equals_reference(scheme, dtype, m, monkeypatch):
    model = _model(scheme, dtype, k=200 if scheme not in HALF_ONLY else 192)
    x = torch.randn(m, 3, model[0].in_features, dtype=dtype)
    _with(monkeypatch, False)
    with torch.no_grad():
        ref = model(x)
    _with(monkeypatch, True)
    with torch.no_grad():
        y = model(x)
        y2 = model(x)
    assert y.dtype == ref.dtype == dtype and y.shape == ref.shape
    # the same weights; only the accumulation (float32 on CPU) and the output rounding differ (in the
    # compute dtype: float16 for a float32 model's low-bit layers)
    compute = torch.float16 if scheme in HALF_ONLY and dtype == torch.float32 else dtype
    assert_close_rel(y, ref, compute)
    assert torch.equal(y, y2)


def _plans(model):
    return [m.__dict__.get(_dense._PLAN_ATTR) for m in model.modules() if m.__dict__.get(_dense._PLAN_ATTR)]


def test_expansion_is_cached_and_follows_updates(monkeypatch):
    _with(monkeypatch, True)
    _dense.clear_dense_cache()
    model = _model("2:4", torch.float32)
    x = torch.randn(4, 200)
    with torch.no_grad():
        model(x)
    plans = _plans(model)
    assert len(plans) == 2                             # one plan per layer
    with torch.no_grad():
        model(x)
    assert [id(p) for p in _plans(model)] == [id(p) for p in plans]
    # an in-place update (an optimizer step, copy_) is seen on the next call
    lin = model[0]
    with torch.no_grad():
        lin.values.mul_(2.0)
        y = model(x)
    assert _plans(model)[0] is not plans[0] and _plans(model)[1] is plans[1]
    _with(monkeypatch, False)
    with torch.no_grad():
        ref = model(x)
    assert_close_rel(y, ref, torch.float32)


def test_state_dict_load_and_new_tensors_are_seen(monkeypatch):
    _with(monkeypatch, True)
    a, b = _model("int4", torch.float16, k=192, seed=0), _model("int4", torch.float16, k=192, seed=1)
    x = torch.randn(3, 192, dtype=torch.float16)
    with torch.no_grad():
        ya, yb = a(x), b(x)
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), yb)
        assert not torch.equal(ya, yb)


def test_freed_weights_leave_the_cache(monkeypatch):
    _with(monkeypatch, True)
    _dense.clear_dense_cache()
    model = _model("block", torch.float32)
    with torch.no_grad():
        model(torch.randn(2, 200))                                      # the modules' plans
        sparsekit.ops.block_sparse_linear_packed(                       # the op's cache
            torch.randn(2, 200), *(getattr(model[0], a) for a in ("blocks", "crow", "col", "tcol_ptr", "trow",
                                                                   "tblk")), model[0].out_features, 200,
            None, backend="dense")
    kept = [weakref.ref(p.weight32()) for p in _plans(model)]
    assert len(kept) == 2 and len(_dense._CACHE) == 1
    del model
    gc.collect()
    assert len(_dense._CACHE) == 0 and all(r() is None for r in kept)


def test_training_through_the_dense_backend(monkeypatch):
    """Gradients of the trainable packed parts (2:4 values, kept blocks) equal the reference backend's."""
    for scheme, attr in (("2:4", "values"), ("block", "blocks")):
        grads = {}
        for on in (True, False):
            _with(monkeypatch, on)
            model = _model(scheme, torch.float32)
            x = torch.randn(5, 200)
            model(x).square().sum().backward()
            grads[on] = getattr(model[0], attr).grad.clone()
        assert_close_rel(grads[True], grads[False], torch.float32)


def test_inference_tensors_are_not_cached(monkeypatch):
    _with(monkeypatch, True)
    _dense.clear_dense_cache()
    with torch.inference_mode():
        model = _model("2:4", torch.float32)
        x = torch.randn(2, 200)
        y = model(x)
    assert len(_dense._CACHE) == 0 and not _plans(model)
    _with(monkeypatch, False)
    with torch.inference_mode():
        assert_close_rel(y, model(x), torch.float32)


def test_opt_out_and_bad_values(monkeypatch):
    monkeypatch.setenv(_dense.CPU_DENSE_ENV, "0")
    assert dispatch.resolve("int4_linear", "cpu") == "reference"
    monkeypatch.setenv(_dense.CPU_DENSE_ENV, "maybe")
    with pytest.raises(ValueError, match="SPARSEKIT_CPU_DENSE"):
        dispatch.resolve("int4_linear", "cpu")
    monkeypatch.delenv(_dense.CPU_DENSE_ENV)
    try:
        _dense.set_cpu_dense(False)
        assert dispatch.resolve("sparse24_linear", "cpu") == "reference"
        assert len(_dense._CACHE) == 0
        _dense.set_cpu_dense(True)
        assert dispatch.resolve("sparse24_linear", "cpu") == "dense"
        with pytest.raises(TypeError):
            _dense.set_cpu_dense("yes")
    finally:
        _dense.set_cpu_dense(None)
    # forcing a backend still wins over the CPU default
    assert dispatch.resolve("block_sparse_linear", "cpu", "reference") == "reference"
    assert dispatch.resolve("block_sparse_linear", "cpu", "dense") == "dense"


def test_cpu_speed_benchmark_writes_every_case(tmp_path):
    """`sparsekit bench --cpu-speed` runs end to end (timings are not asserted: a benchmark, not a test)."""
    import csv

    from sparsekit.cli import main

    rc = main(["bench", "--cpu-speed", "--schemes", "2:4", "int4", "--shapes", "64x128", "--m", "1,3",
               "--rounds", "1", "--budget-s", "0.01", "--out", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "cpu_speed.csv")))
    assert [(r["scheme"], r["M"]) for r in rows] == [("2:4", "1"), ("2:4", "3"), ("int4", "1"), ("int4", "3")]
    assert all(r["backend"] == "dense" and float(r["ratio"]) > 0 for r in rows)
    assert "ratio" in (tmp_path / "cpu_speed.md").read_text()


def _special_rows(m, k, dtype):
    x = torch.randn(m, k, dtype=dtype) * 3
    x[1] = 0.0                                          # all-zero row: scale 1, codes 0
    x[2, 5] = float("inf")                              # a non-finite row: NaN out, as the ops
    x[3, 7] = float("nan")
    x[4] *= 1e-3
    return x


# float32 results: a few units in the last place; float16/bfloat16 results: at most one rounding step apart
_CODES_BOUND = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_paths_equal_the_dense_op(dtype, monkeypatch):
    """The modules' CPU fast paths (no op dispatch) give the ``dense`` op's result, special rows included: the
    same NaN rows, the same integer codes, float32 sums that may differ in order (the code-matrix layers
    apply the token and channel scales after the matmul; few rows run fbgemm's float16-weight GEMM)."""
    from sparsekit.ops.block_sparse import block_sparse_linear_packed
    from sparsekit.ops.int8 import int8_linear_packed
    from sparsekit.ops.sparse24_int8 import sparse24_int8_linear_packed

    _with(monkeypatch, True)
    k = 192
    x = _special_rows(6, k, dtype)
    with torch.no_grad():
        m = _model("2:4+int8", dtype, k=k)[0]
        y = m(x)
        ref = sparse24_int8_linear_packed(x, m.values, m.meta_codes, m.w_scale, m.in_features, m.bias,
                                          backend="dense")
        assert torch.equal(y.isnan(), ref.isnan()) and y[2:4].isnan().all()
        assert_close_rel(y.nan_to_num(), ref.nan_to_num(), dtype, bound=_CODES_BOUND[dtype])
        q = _model("w8a8", dtype, k=k)[0]
        xq = x.to(q.dtype)
        y = q(xq)
        ref = int8_linear_packed(xq, q.qweight, q.scales.float(), q.bias, act_bits=8, backend="dense")
        assert torch.equal(y.isnan(), ref.isnan()) and y[2:4].isnan().all()
        assert_close_rel(y.nan_to_num(), ref.nan_to_num(), q.dtype, bound=_CODES_BOUND[q.dtype])
        b = _model("block", dtype, k=k)[0]
        xb = torch.randn(3, k, dtype=dtype)
        xb[0, 0] = float("inf")         # outputs whose kept blocks do not read column 0 stay finite
        assert not b.weight[:, 0].all()                 # (some output rows dropped that block)
        y = b(xb)
        ref = block_sparse_linear_packed(xb, b.blocks, b.crow, b.col, b.tcol_ptr, b.trow, b.tblk, b.out_features,
                                         b.in_features, b.bias, backend="reference")
        assert torch.equal(y.isfinite(), ref.isfinite()) and y[0].isfinite().any() and not y[0].isfinite().all()
        assert_close_rel(y.nan_to_num(), ref.nan_to_num(), dtype)


@pytest.mark.parametrize("scheme", ["w8a8", "2:4+int8"])
def test_activation_quantized_gradients_stay_straight_through(scheme, monkeypatch):
    """A grad-requiring input takes the op (straight-through backward), not the fast path (round has no gradient)."""
    _with(monkeypatch, True)
    mod = _model(scheme, torch.float32, k=192)[0]
    x = torch.randn(4, 192, requires_grad=True)
    mod(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fp16_gemm_for_few_rows_equals_float32(scheme, monkeypatch):
    """Few rows take fbgemm's float16-weight GEMM exactly where every weight entry is a float16 number (the
    int4 layers dequantized in float16, integer-code layers); the result equals the float32 matmul's within
    float32 summation order; more rows than FP16_GEMM_MAX_ROWS take the float32 matmul."""
    _with(monkeypatch, True)
    layer = _model(scheme, torch.float32, k=200 if scheme not in HALF_ONLY else 192, n=72)[0]
    k = layer.in_features
    few, many = torch.randn(3, k), torch.randn(_dense.FP16_GEMM_MAX_ROWS + 1, k)
    with torch.no_grad():
        y_few = layer(few)
        plan = layer.__dict__[_dense._PLAN_ATTR]
        w = plan.make()
        if plan.kern:           # a kernel of the C extension ran instead (tests/test_cpu_sparse_kernels.py)
            assert scheme in ("2:4", "block", "w8a8", "w4a8", "2:4+int4", "2:4+int8") and plan.fp16 is None
            plan._packed16()
        assert plan.fp16 == (bool(torch.equal(w.half().float(), w)) and _dense._fbgemm_ok is True)
        if scheme in ("int4", "w8a8", "2:4+int4", "2:4+int8"):
            assert plan.fp16 or _dense._fbgemm_ok is False      # exact by construction (torch with fbgemm)
        if scheme in ("2:4", "block"):
            assert plan.fp16 is False                           # float32 weights of a float32 model
        assert plan.w32 is None or not plan.fp16                # only what was needed is built
        # the float32 matmul on the same rows (a code matrix: the fp16 GEMM reads the codes themselves)
        ref = torch.nn.functional.linear(few, w)
        got = (_dense._fbgemm_linear(few, plan.pk16, None) if plan.col_scale is not None and plan.fp16
               else plan.matmul(few, None) if plan.col_scale is None else ref)
        assert_close_rel(got, ref, torch.float32, bound=1e-6)
        y_many = layer(many)
        assert plan.w32 is not None or (plan.kern and plan.kmax >= many.shape[0])   # (or the kernel took them)
        _with(monkeypatch, False)
        assert_close_rel(y_few, layer(few), torch.float16 if scheme in HALF_ONLY else torch.float32)
        assert_close_rel(y_many, layer(many), torch.float16 if scheme in HALF_ONLY else torch.float32)


def test_plans_are_not_copied_or_pickled_and_follow_clear(monkeypatch):
    _with(monkeypatch, True)
    model = _model("int4", torch.float16, k=192)
    x = torch.randn(2, 192, dtype=torch.float16)
    with torch.no_grad():
        y = model(x)
        twin = copy.deepcopy(model)
        assert not _plans(twin) and len(_plans(model)) == 2
        assert torch.equal(twin(x), y) and len(_plans(twin)) == 2
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert not _plans(loaded) and torch.equal(loaded(x), y)
        old = _plans(model)
        _dense.clear_dense_cache()
        assert torch.equal(model(x), y) and all(a is not b for a, b in zip(old, _plans(model)))


def test_bias_gradient_through_the_fast_path(monkeypatch):
    """In grad mode a trainable bias gets its gradient on the fast path (the frozen packed weight does not)."""
    grads = {}
    for on in (True, False):
        _with(monkeypatch, on)
        for scheme in ("int4", "w8a8", "2:4+int4"):
            layer = _model(scheme, torch.float32, k=192)[0]
            x = torch.randn(5, 192)
            layer(x).square().sum().backward()
            grads[on, scheme] = layer.bias.grad.clone()
    for scheme in ("int4", "w8a8", "2:4+int4"):
        assert grads[True, scheme].abs().sum() > 0
        assert_close_rel(grads[True, scheme].float(), grads[False, scheme].float(), torch.float16)


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8", "2:4+int8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, _dense.FP16_GEMM_MAX_ROWS + 3])
def test_c_token_quant_path_equals_the_torch_path(scheme, dtype, m, monkeypatch):
    """The C per-token quantization (ops/_cpu_ext.py, with the compute-dtype rounding of input and output)
    gives the same result, bit for bit, as the torch-op chain it replaces, special rows included."""
    from sparsekit.ops import _cpu_ext

    if not _cpu_ext.available():
        pytest.skip(f"C extension not available: {_cpu_ext.unavailable_reason()}")
    _with(monkeypatch, True)
    monkeypatch.setenv(_cpu_ext.CPU_KERNELS_ENV, "0")   # (the fused kernels sum in another order: tested apart)
    layer = _model(scheme, dtype, k=192)[0]
    x = _special_rows(max(m, 6), 192, dtype)[:m]
    with torch.no_grad():
        y_c = layer(x)
        monkeypatch.setenv(_cpu_ext.CPU_EXT_ENV, "0")
        y_t = layer(x)
    assert y_c.dtype == y_t.dtype == dtype
    assert torch.equal(y_c.isnan(), y_t.isnan()) and torch.equal(y_c.nan_to_num(), y_t.nan_to_num())
