"""QLinear (W4A16, W4A8, W8A8, mixed 4/8-bit activations) and quantize_: modules, RTN/GPTQ/AWQ packing,
state_dict."""
import io

import pytest
import torch
from torch import nn

from sparsekit import Int4Config, quantize_, sparsify_
from sparsekit.formats.int4 import Int4Weight
from sparsekit.formats.int8 import Int8Weight
from sparsekit.nn import QLinear
from sparsekit.ops.act_quant import per_token_quant_reference, select_token_bits
from sparsekit.ops.int8 import dequantize_int4_fp32
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
    with pytest.raises(ValueError, match="act_bits"):
        QLinear(64, 10, act_bits=3)
    with pytest.raises(ValueError, match="act_bits=8"):
        QLinear(64, 10, bits=8)                       # W8 needs quantized activations
    with pytest.raises(ValueError, match="bits=3"):
        QLinear(64, 10, bits=3)
    with pytest.raises(ValueError, match="frac8"):
        QLinear(64, 10, act_bits="mixed", frac8=2.0)
    with pytest.raises(ValueError, match="round-to-nearest"):
        QLinear.from_float(lin, bits=8, act_bits=8, method="gptq")
    with pytest.raises(ValueError, match="importance only applies"):
        QLinear.from_float(lin, group_size=32, act_bits=8)(torch.randn(2, 64).half(), importance=torch.ones(2))
    with pytest.raises(TypeError, match="computes in"):
        QLinear.from_float(lin, bits=8, act_bits=8)(torch.randn(2, 64).bfloat16())   # float32 is accepted
    with pytest.raises(ValueError, match="multiple of 8"):
        QLinear(60, 10)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        QLinear(64, 10, dtype=torch.float32)
    with pytest.raises(ValueError, match="calib_inputs"):
        QLinear.from_float(lin, method="gptq")
    with pytest.raises(ValueError, match="unknown method"):
        QLinear.from_float(lin, method="nope")
    q = QLinear.from_float(nn.Linear(128, 10))  # fp32 linear -> fp16 module (group 128)
    assert q(torch.randn(2, 128)).dtype == torch.float32    # float32 in, float32 out (cast at the boundary)
    with pytest.raises(TypeError):
        q(torch.randn(2, 128).bfloat16())                   # another half dtype than the compute dtype
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
    with pytest.raises(ValueError, match="act_bits"):
        Int4Config(act_bits=16)
    with pytest.raises(ValueError, match="frac8"):
        Int4Config(act_bits="mixed", frac8=-1)
    with pytest.raises(TypeError, match="quantize_"):
        sparsify_(_mlp(), "int4")
    with pytest.raises(TypeError, match="sparsify_"):
        quantize_(_mlp(), "2:4")
    model = _mlp()
    quantize_(model, Int4Config(group_size=32), filter_fn=lambda m, n: n != "4", progress=False)
    assert [type(m).__name__ for m in model] == ["QLinear", "ReLU", "QLinear", "ReLU", "Linear"]


# ------------------------------------------------------------------ int8 activations: W4A8, W8A8, mixed
def _fake_quant_ref(x, w_fp32, b, bits):
    q, s = per_token_quant_reference(x, bits)
    y = (q.double() * s.double()) @ w_fp32.double().T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("backend", ["reference", "interpret"])
@pytest.mark.parametrize("act_bits", [8, 4, "mixed"])
@pytest.mark.parametrize("bits", [4, 8])
def test_qlinear_int8_activation_paths(backend, act_bits, bits):
    dtype = torch.float16 if act_bits != 4 else torch.bfloat16
    lin = nn.Linear(64, 19).to(dtype)
    q = QLinear.from_float(lin, bits=bits, group_size=32, act_bits=act_bits, frac8=0.5, backend=backend)
    assert q.bits == bits and q.act_bits == act_bits and q.dtype == dtype
    if bits == 4:
        wf = q.weight_format()
        w32 = dequantize_int4_fp32(wf.qweight, wf.scales, wf.zeros, wf.group_size, 64)
        assert torch.equal(wf.unpack(), Int4Weight.from_float(lin.weight.detach(), 32).unpack())
    else:
        assert q.qweight.dtype == torch.int8 and q.scales.dtype == torch.float32
        w32 = Int8Weight.from_float(lin.weight.detach()).dequantize()
        assert torch.equal(q.weight_format().dequantize(), w32)
    x = torch.randn(2, 5, 64).to(dtype)
    bits_t = select_token_bits(x, 0.5) if act_bits == "mixed" else act_bits
    y = q(x)
    assert y.dtype == dtype and y.shape == (2, 5, 19)
    assert_close_rel(y, _fake_quant_ref(x, w32, lin.bias, bits_t))
    dense = q.to_dense()
    assert isinstance(dense, nn.Linear) and dense.weight.dtype == dtype
    assert torch.equal(dense.weight, q.weight) and torch.equal(dense.bias, lin.bias)
    assert f"act_bits={act_bits!r}" in repr(q)


def test_qlinear_mixed_importance_and_quality_order():
    torch.manual_seed(0)
    lin = nn.Linear(128, 32).half()
    x = torch.randn(40, 128).half()
    x[::5] *= 8                                        # outlier tokens
    ref = _ref(x, lin.weight.detach().float(), lin.bias)
    errs = {}
    for act in (None, 8, "mixed", 4):
        q = QLinear.from_float(lin, group_size=32, act_bits=act, frac8=0.25, backend="reference")
        errs[str(act)] = ((q(x).double() - ref).norm() / ref.norm()).item()
    print("QLinear output rel. error vs the float layer:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert errs["8"] < 1.05 * errs["None"] and errs["8"] < errs["mixed"] < errs["4"]
    # importance given: exactly the chosen tokens run at 8 bits (interpreter == explicit bits)
    q = QLinear.from_float(lin, group_size=32, act_bits="mixed", frac8=0.1, backend="interpret")
    score = torch.zeros(40)
    score[[1, 2, 30, 31]] = 1.0
    y = q(x[:40], importance=score)
    bits = torch.full((40,), 4, dtype=torch.int8)
    bits[[1, 2, 30, 31]] = 8
    w32 = dequantize_int4_fp32(q.qweight, q.scales, q.zeros, 32, 128)
    assert_close_rel(y, _fake_quant_ref(x, w32, lin.bias, bits))


@pytest.mark.parametrize("kwargs", [dict(bits=8, act_bits=8), dict(bits=4, group_size=32, act_bits="mixed"),
                                    dict(bits=4, group_size=64, symmetric=True, act_bits=8)])
def test_state_dict_round_trip_int8_activations(kwargs):
    lin = nn.Linear(64, 10).bfloat16()
    q = QLinear.from_float(lin, **kwargs)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    fresh = QLinear(64, 10, dtype=torch.bfloat16, **kwargs)
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(3, 64).bfloat16()
    assert torch.equal(fresh(x), q(x))
    assert torch.equal(fresh.to_dense().weight, q.to_dense().weight)


def test_qlinear_from_weight_int8_and_awq_with_act_bits():
    w = Int8Weight.from_float(torch.randn(12, 40))
    q = QLinear.from_weight(w, torch.randn(12).half(), act_bits=8)
    assert q.bits == 8 and q.in_features == 40 and q.dtype == torch.float16
    x = torch.randn(4, 40).half()
    assert_close_rel(q(x), _fake_quant_ref(x, w.dequantize(), q.bias, 8))
    # AWQ input scale divides x before the activation quantizer
    lin = nn.Linear(64, 16).half()
    xc = torch.randn(64, 64).half()
    awq = QLinear.from_float(lin, group_size=32, method="awq", calib_inputs=xc, act_bits=8)
    assert awq.input_scale is not None
    xs = (xc[:5] / awq.input_scale)
    w32 = dequantize_int4_fp32(awq.qweight, awq.scales, awq.zeros, 32, 64)
    assert_close_rel(awq(xc[:5]), _fake_quant_ref(xs, w32, lin.bias, 8))


def test_quantize_model_with_act_bits():
    calib = [torch.randn(32, 64).half() for _ in range(2)]
    x = torch.randn(16, 64).half()
    outs = {}
    for act in (None, 8, "mixed"):
        model = _mlp()
        with torch.no_grad():
            dense_out = model(x).double()
        quantize_(model, Int4Config(group_size=32, act_bits=act, frac8=0.5, backend="reference"), progress=False)
        assert all(m.act_bits == act for m in model if isinstance(m, QLinear))
        outs[str(act)] = ((model(x).double() - dense_out).norm() / dense_out.norm()).item()
    model = _mlp()
    quantize_(model, Int4Config(group_size=32, method="gptq", calib=calib, act_bits=8), progress=False)
    assert all(m.act_bits == 8 for m in model if isinstance(m, QLinear))
    print("MLP output rel. error:", outs)
    assert outs["None"] < 0.2 and outs["8"] < 0.2 and outs["mixed"] < 0.3


def test_quality_on_digits_mlp():
    """Measured (printed) quality of W4A16 / W4A8 / mixed / W4A4 / W8A8 on the digits MLP workload."""
    pytest.importorskip("sklearn")
    from sparsekit.workloads import digits_workload

    wl = digits_workload(epochs=8)
    xte, yte = wl.extra["x_test"], wl.extra["y_test"]
    dense = wl.model.half()
    with torch.no_grad():
        ref = dense(xte.half()).double()
    acc_dense = float((ref.argmax(-1) == yte).float().mean())
    rows = {}
    for name, kw in (("W4A16", dict(bits=4)), ("W4A8", dict(bits=4, act_bits=8)),
                     ("W4A8/4 mixed 25%", dict(bits=4, act_bits="mixed", frac8=0.25)),
                     ("W4A4", dict(bits=4, act_bits=4)), ("W8A8", dict(bits=8, act_bits=8))):
        model = nn.Sequential(*[QLinear.from_float(m, group_size=64, backend="reference", **kw)
                                if isinstance(m, nn.Linear) else m for m in dense])
        with torch.no_grad():
            out = model(xte.half()).double()
        rows[name] = (((out - ref).norm() / ref.norm()).item(), float((out.argmax(-1) == yte).float().mean()))
    print(f"digits MLP, dense fp16 accuracy {acc_dense:.4f}")
    for name, (err, acc) in rows.items():
        print(f"  {name:>18}: logits rel. err {err:.3e}  accuracy {acc:.4f}")
    assert rows["W8A8"][0] < rows["W4A8"][0] < rows["W4A4"][0]
    assert rows["W4A8/4 mixed 25%"][0] < rows["W4A4"][0]
    assert rows["W4A8"][1] > acc_dense - 0.03
