"""One dtype rule for every compressed module (README "dtype rules").

A module converted from a model of dtype D takes inputs of dtype D and returns
D: float16/bfloat16 models compute in their own dtype; a float32 model's
low-bit modules compute in their compute dtype (float16 unless chosen) and
cast only at the boundary.  Calibration casts floating-point batches to the
model's dtype.
"""
import pytest
import torch
from torch import nn

import sparsekit
from sparsekit.compress import compress
from sparsekit.calibration import model_input


def _mlp(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).to(dtype)


def _rel(a, b):
    return float((a.detach().double() - b.double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("scheme", ["int4", "w4a8", "w8a8", "2:4+int4", "2:4", "block"])
def test_float32_model_takes_and_returns_float32(scheme):
    dense = _mlp(torch.float32)
    x = torch.randn(5, 128)
    ref = dense(x)
    model, _ = compress(_mlp(torch.float32), None, scheme, "magnitude" if scheme in ("2:4", "block", "2:4+int4")
                        else "rtn", speed="off", progress=False)
    with torch.no_grad():
        y = model(x)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert torch.isfinite(y).all()
    # a compressed model, not an exact one: but the same function up to its compression error
    bound = {"2:4": 0.9, "block": 0.9, "2:4+int4": 0.9}.get(scheme, 0.2)
    assert _rel(y, ref.detach()) < bound
    # half inputs of the compute dtype run too and return that dtype (low-bit modules)
    if scheme in ("int4", "w4a8", "w8a8"):
        yh = model(x.half())
        assert yh.dtype == torch.float16
        assert _rel(yh.float(), y) < 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_returns_its_dtype_and_rejects_other_half(dtype):
    m = _mlp(dtype)
    sparsekit.quantize_(m, "int4", progress=False)
    x = torch.randn(3, 128, dtype=dtype)
    assert m(x).dtype == dtype
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    with pytest.raises(TypeError):
        m(x.to(other))


def test_float32_boundary_equals_half_compute(monkeypatch):
    """float32 in/out is exactly the compute-dtype module on the cast input, cast back (CPU's dense path
    multiplies the float32 input itself: the same within float16 rounding)."""
    m = _mlp(torch.float32)
    sparsekit.quantize_(m, "int4", progress=False)
    x = torch.randn(4, 128)
    q = m[0]
    dense_path = q(x)
    monkeypatch.setenv("SPARSEKIT_CPU_DENSE", "0")
    assert torch.equal(q(x), q(x.half()).float())
    assert _rel(dense_path, q(x)) < 2e-3


@pytest.mark.parametrize("method,scheme", [("gptq", "int4"), ("awq", "int4"), ("sparsegpt", "2:4"),
                                           ("wanda", "2:4")])
def test_calibration_casts_batches_to_the_model_dtype(method, scheme):
    calib32 = [torch.randn(16, 128) for _ in range(2)]
    calib16 = [b.half() for b in calib32]
    m32, _ = compress(_mlp(torch.float16), calib32, scheme, method, speed="off", progress=False)
    m16, _ = compress(_mlp(torch.float16), calib16, scheme, method, speed="off", progress=False)
    x = torch.randn(3, 128, dtype=torch.float16)
    # the float32 batches were cast to float16 before the model saw them: the same compressed model
    assert torch.equal(m32(x), m16(x))


def test_model_input_keeps_token_ids_and_casts_floats():
    m = _mlp(torch.bfloat16)
    assert model_input(torch.randn(2, 128), m).dtype == torch.bfloat16
    assert model_input((torch.randn(2, 128).double(), torch.zeros(2)), m).dtype == torch.bfloat16
    ids = torch.randint(0, 10, (2, 7))
    assert model_input(ids, m).dtype == torch.long
