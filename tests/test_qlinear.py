"""QLinear (W4A16) and quantize_: modules, RTN/GPTQ/AWQ packing, state_dict."""
import io

import pytest
import torch
from torch import nn

from sparsekit import Int4Config, quantize_, sparsify_
from sparsekit.formats.int4 import Int4Weight
from sparsekit.nn import QLinear
from sparsekit.quant import rtn_quantize
from sparsekit.testing import assert_close_rel


def _ref(x, w, b):
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("backend", ["reference", "interpret"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size,symmetric", [(32, False), (64, True), (-1, False)])
def test_qlinear_rtn_matches_dequantized_linear(backend, dtype, group_size, symmetric):
    lin = nn.Linear(64, 19).to(dtype)
    q = QLinear.from_float(lin, group_size=group_size, symmetric=symmetric, backend=backend)
    assert q.scales.dtype == dtype and (q.zeros is None) == symmetric
    w_hat = Int4Weight.from_float(lin.weight.detach(), group_size, symmetric).dequantize()
    assert torch.equal(q.weight, w_hat)
    x = torch.randn(2, 5, 64).to(dtype)
    assert_close_rel(q(x), _ref(x, w_hat, lin.bias))
    dense = q.to_dense()
    assert torch.equal(dense.weight, w_hat) and torch.equal(dense.bias, lin.bias)
    # the quantization itself is close to the float weight
    rel = (w_hat.float() - lin.weight.float()).norm() / lin.weight.float().norm()
    assert rel < 0.15


def test_qlinear_from_float_matches_quant_rtn():
    lin = nn.Linear(128, 8)
    q = QLinear.from_float(lin, group_size=32)
    res = rtn_quantize(lin.weight.detach(), 32, False)
    assert torch.equal(q.weight_format().unpack(), res.q)


def test_qlinear_gptq_and_awq_lower_error_than_rtn():
    torch.manual_seed(0)
    lin = nn.Linear(128, 32).half()
    a = torch.randn(128, 128)
    x = (torch.randn(512, 128) @ a / 8).half()            # correlated inputs
    x[:, :4] *= 10                                        # a few salient channels
    ref = _ref(x, lin.weight.detach().float(), lin.bias)
    errs = {}
    for method in ("rtn", "gptq", "awq"):
        q = QLinear.from_float(lin, group_size=32, method=method, calib_inputs=None if method == "rtn" else x,
                               backend="reference")
        errs[method] = ((q(x).double() - ref).norm() / ref.norm()).item()
    print("output error", errs)
    assert errs["gptq"] < errs["rtn"]
    assert errs["awq"] <= errs["rtn"]
    awq = QLinear.from_float(lin, group_size=32, method="awq", calib_inputs=x)
    assert awq.input_scale is not None and awq.input_scale.shape == (128,)
    # the interpreter path with the runtime input scale equals the reference path
    assert_close_rel(QLinear.from_float(lin, group_size=32, method="awq", calib_inputs=x, backend="interpret")(x[:9]),
                     awq(x[:9]).double(), bound=1e-3)


def test_state_dict_round_trip():
    lin = nn.Linear(64, 10).half()
    for kwargs in (dict(group_size=32), dict(group_size=64, symmetric=True)):
        q = QLinear.from_float(lin, **kwargs)
        buf = io.BytesIO()
        torch.save(q.state_dict(), buf)
        buf.seek(0)
        fresh = QLinear(64, 10, **kwargs)
        fresh.load_state_dict(torch.load(buf))
        x = torch.randn(3, 64).half()
        assert torch.equal(fresh(x), q(x))
    x = torch.randn(64, 64).half()
    awq = QLinear.from_float(lin, group_size=32, method="awq", calib_inputs=x)
    fresh = QLinear(64, 10, group_size=32)
    fresh.load_state_dict(awq.state_dict())
    assert torch.equal(fresh(x), awq(x))


def test_qlinear_errors():
    lin = nn.Linear(64, 10)
    with pytest.raises(NotImplementedError, match="W4A8"):
        QLinear.from_float(lin, act_bits=8)
    with pytest.raises(ValueError, match="act_bits"):
        QLinear(64, 10, act_bits=3)
    with pytest.raises(ValueError, match="4-bit"):
        QLinear(64, 10, bits=8)
    with pytest.raises(ValueError, match="multiple of 8"):
        QLinear(60, 10)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        QLinear(64, 10, dtype=torch.float32)
    with pytest.raises(ValueError, match="calib_inputs"):
        QLinear.from_float(lin, method="gptq")
    with pytest.raises(ValueError, match="unknown method"):
        QLinear.from_float(lin, method="nope")
    q = QLinear.from_float(nn.Linear(128, 10))  # fp32 linear -> fp16 module (group 128)
    with pytest.raises(TypeError):
        q(torch.randn(2, 128))
    with pytest.raises(ValueError, match="does not divide"):
        QLinear.from_float(lin)  # default group 128 does not divide K=64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).half()


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantize_model(method):
    model = _mlp()
    calib = [torch.randn(32, 64).half() for _ in range(4)]
    x = torch.randn(16, 64).half()
    with torch.no_grad():
        dense_out = model(x).double()
    cfg = Int4Config(group_size=32, method=method, calib=None if method == "rtn" else calib, backend="reference")
    quantize_(model, cfg, progress=False)
    assert [type(m).__name__ for m in model] == ["QLinear", "ReLU", "QLinear", "ReLU", "QLinear"]
    out = model(x)
    assert out.dtype == torch.float16
    # the same function as a dense model holding each layer's dequantized weight
    ref = x
    for mod in model:
        ref = mod.to_dense()(ref) if isinstance(mod, QLinear) else mod(ref)
    assert_close_rel(out, ref.double(), bound=1e-3)
    err = ((out.double() - dense_out).norm() / dense_out.norm()).item()
    assert err < 0.2, err


def test_quantize_config_errors():
    with pytest.raises(ValueError, match="calibration"):
        Int4Config(method="gptq")
    with pytest.raises(ValueError, match="group_size"):
        Int4Config(group_size=48)
    with pytest.raises(TypeError, match="quantize_"):
        sparsify_(_mlp(), "int4")
    with pytest.raises(TypeError, match="sparsify_"):
        quantize_(_mlp(), "2:4")
    model = _mlp()
    quantize_(model, Int4Config(group_size=32), filter_fn=lambda m, n: n != "4", progress=False)
    assert [type(m).__name__ for m in model] == ["QLinear", "ReLU", "QLinear", "ReLU", "Linear"]
