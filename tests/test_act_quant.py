"""Per-token activation quantization: the fused Triton kernel (interpreter on CPU) == the PyTorch
reference bit for bit, and the token-adaptive 4/8-bit selection policy."""
import pytest
import torch

import sparsekit.kernels as skk
from sparsekit.ops.act_quant import (n_tokens_8bit, per_token_dequant_reference, per_token_quant,
                                     per_token_quant_reference, select_token_bits, token_importance)
from sparsekit.testing import noncontiguous

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _bits(shape, gen=None):
    return torch.where(torch.rand(shape, generator=gen) < 0.5, 8, 4).to(torch.int8)


def _assert_same(q, s, x, bits):
    qr, sr = per_token_quant_reference(x, bits)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*x.shape[:-1], 1)
    assert torch.equal(q, qr), (q.int() - qr.int()).abs().max()
    assert torch.equal(s, sr)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (3, 37), (2, 5, 100), (17, 1)])
@pytest.mark.parametrize("mode", [8, 4, "per_token"])
def test_kernel_equals_reference_bit_exact(shape, dtype, mode):
    x = (torch.randn(shape) * 3).to(dtype)
    if shape[0] > 1:
        x[0] = 0                                   # an all-zero token: scale 1, q 0
        x[-1, ..., 0] = 40.0                        # an outlier token
    bits = _bits(shape[:-1]) if mode == "per_token" else mode
    q, s = per_token_quant(x, bits, backend="interpret")
    _assert_same(q, s, x, bits)
    qref, sref = per_token_quant(x, bits, backend="reference")
    assert torch.equal(qref, q) and torch.equal(sref, s)


def test_kernel_chunked_rows_noncontiguous_and_transposed():
    # rows longer than the kernel's K chunk (two passes over several chunks), strided inputs
    kmod = skk.load("int8", interpret=True)
    x = torch.randn(6, 300).half()
    bits = _bits((6,))
    for xin in (x, noncontiguous(x), torch.randn(300, 6).half().t()):
        q = torch.full((6, 300), 99, dtype=torch.int8)
        s = torch.full((6,), float("nan"))
        kmod.per_token_quant(xin, bits, 127.0, q, s, block_k=64)
        qr, sr = per_token_quant_reference(xin, bits)
        assert torch.equal(q, qr) and torch.equal(s, sr[:, 0])
    q, s = per_token_quant(noncontiguous(x), 8, backend="interpret")
    _assert_same(q, s, x, 8)


def test_round_half_to_even_and_clamp():
    # amax 127 -> scale exactly 1, so x / scale hits exact .5 ties
    row = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -126.5])
    x = torch.stack([row, row * (7 / 127)])
    q, s = per_token_quant(x, 8, backend="interpret")
    assert torch.equal(q[0], torch.tensor([127, 0, 2, 2, 0, -2, 4, -126], dtype=torch.int8))
    _assert_same(q, s, x, 8)
    q4, s4 = per_token_quant(x, torch.tensor([4, 8], dtype=torch.int8), backend="interpret")
    assert int(q4[0].abs().max()) == 7 and int(q4[1].abs().max()) == 127
    _assert_same(q4, s4, x, torch.tensor([4, 8]))


@pytest.mark.parametrize("bits,bound", [(8, 0.5 / 127), (4, 0.5 / 7)])
def test_reference_error_is_half_a_step(bits, bound):
    x = torch.randn(9, 64)
    q, s = per_token_quant_reference(x, bits)
    xh = per_token_dequant_reference(q, s)
    amax = x.abs().amax(-1, keepdim=True)
    assert bool(((xh - x).abs() <= bound * amax * (1 + 1e-6)).all())


def test_select_token_bits_policy():
    x = torch.randn(2, 10, 16)
    norms = x.float().norm(dim=-1)
    bits = select_token_bits(x, frac8=0.3)
    assert bits.shape == (2, 10) and bits.dtype == torch.int8
    n8 = n_tokens_8bit(20, 0.3)
    assert n8 == 6 and int((bits == 8).sum()) == 6 and int((bits == 4).sum()) == 14
    # the 8-bit tokens are exactly the highest-norm ones
    assert norms[bits == 8].min() > norms[bits == 4].max()
    # a given importance score (e.g. attention received) overrides the norm
    score = torch.arange(20.0).reshape(2, 10)
    b2 = select_token_bits(x, 0.25, importance=score)
    assert torch.equal(b2.reshape(-1) == 8, torch.arange(20) >= 15)
    assert bool((select_token_bits(x, 0.0) == 4).all()) and bool((select_token_bits(x, 1.0) == 8).all())
    assert n_tokens_8bit(7, 0.5) == 4 and n_tokens_8bit(1, 0.01) == 1 and n_tokens_8bit(0, 0.5) == 0
    torch.testing.assert_close(token_importance(x), norms)


def test_bad_inputs():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="must be 4, 8"):
        per_token_quant(x, 3)
    with pytest.raises(ValueError, match="4 or 8"):
        per_token_quant(x, torch.tensor([4, 8, 5, 4]))
    with pytest.raises(ValueError, match="shape"):
        per_token_quant(x, torch.tensor([4, 8]))
    with pytest.raises(TypeError, match="integer"):
        per_token_quant(x, torch.tensor([4.0, 8.0, 4.0, 4.0]))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        per_token_quant(x.to(torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        per_token_quant([1.0, 2.0])
    with pytest.raises(ValueError, match="frac8"):
        select_token_bits(x, 1.5)
    with pytest.raises(ValueError, match="one score per token"):
        select_token_bits(x, 0.5, importance=torch.randn(5))
    with pytest.raises(ValueError, match="CUDA tensors"):
        per_token_quant(x, 8, backend="triton")
    with pytest.raises(ValueError, match="per-token bits"):
        per_token_quant_reference(x, torch.tensor([4, 8, 6, 4]))


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_opcheck(backend):
    x = torch.randn(2, 3, 40).half()
    op = torch.ops.sparsekit.per_token_quant.default
    torch.library.opcheck(op, (x, None, 8, backend))
    torch.library.opcheck(op, (x, _bits((2, 3)), 8, backend))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 4096), (300, 4096), (77, 11008), (5, 100)])
def test_triton_gpu_bit_exact(m, k, dtype):
    x = (torch.randn(m, k, device="cuda") * 2).to(dtype)
    x[0, :7] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5], device="cuda")   # exact ties
    for bits in (8, 4, _bits((m,)).cuda()):
        q, s = per_token_quant(x, bits, backend="triton")
        qr, sr = per_token_quant_reference(x, bits)
        assert torch.equal(q, qr) and torch.equal(s, sr)
