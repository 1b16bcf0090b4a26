"""Int4Weight: packing layout, round trips, the RTN grid and validation."""
import pytest
import torch

from sparsekit.formats.int4 import Int4Weight, pack_int4, rtn_quantize, unpack_int4

GROUPS = [32, 64, 128, -1]


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pack_round_trip_and_dequantize(group_size, symmetric, dtype):
    n, k = 7, 256
    gs = k if group_size == -1 else group_size
    g = k // gs
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = torch.rand(n, g) + 0.01
    zeros = None if symmetric else torch.randint(0, 16, (n, g)).float()
    w = Int4Weight.from_quantized(q, scales, zeros, group_size, symmetric, dtype)
    assert w.qweight.dtype == torch.int32 and w.qweight.shape == (n, k // 8)
    assert w.group_size == gs and w.shape == (n, k) and w.symmetric == symmetric
    assert w.scales.dtype == dtype and (w.zeros is None) == symmetric
    assert torch.equal(w.unpack(), q)
    z = torch.full((n, g), 8.0) if symmetric else zeros
    expect = ((q.to(dtype) - z.to(dtype).repeat_interleave(gs, 1)) * scales.to(dtype).repeat_interleave(gs, 1))
    deq = w.dequantize()
    assert deq.dtype == dtype and torch.equal(deq, expect)
    assert w.nbytes() == n * k // 2 + (1 if symmetric else 2) * n * g * 2


def test_documented_nibble_order():
    # columns 8j+2s and 8j+2s+1 sit in nibbles s and s+4 of word j
    q = torch.arange(8, dtype=torch.uint8).view(1, 8) + 1   # codes 1..8 for columns 0..7
    word = int(pack_int4(q)[0, 0]) & 0xFFFFFFFF
    for s in range(4):
        pair = (word >> (4 * s)) & 0x000F000F
        assert pair & 0xF == 1 + 2 * s and pair >> 16 == 2 + 2 * s
    q2 = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q2)), q2)
    assert pack_int4(torch.full((1, 8), 15, dtype=torch.uint8)).item() == -1


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_grid_and_error_bound(group_size, symmetric):
    w = torch.randn(9, 256)
    q, scales, zeros = rtn_quantize(w, group_size, symmetric)
    gs = 256 if group_size == -1 else group_size
    assert q.dtype == torch.uint8 and q.shape == w.shape and int(q.max()) <= 15
    assert scales.dtype == torch.float32 and scales.shape == (9, 256 // gs) and zeros.shape == scales.shape
    if symmetric:
        assert bool((zeros == 8).all())
    assert bool((zeros == zeros.round()).all()) and bool(((zeros >= 0) & (zeros <= 15)).all())
    s = scales.repeat_interleave(gs, 1)
    what = (q.float() - zeros.repeat_interleave(gs, 1)) * s
    # round to nearest: every weight within half a step of its grid point
    assert bool(((what - w).abs() <= 0.5 * s + 1e-6).all())
    wq = Int4Weight.from_float(w, group_size, symmetric)
    assert wq.dtype == torch.float16
    rel = ((wq.dequantize().float() - w).norm() / w.norm()).item()
    assert rel < (0.2 if group_size == -1 else 0.15)


def test_from_float_dtypes_and_edge_groups():
    w = torch.randn(4, 64, dtype=torch.bfloat16)
    assert Int4Weight.from_float(w, 32).dtype == torch.bfloat16
    assert Int4Weight.from_float(w.float(), 32).dtype == torch.float16
    assert Int4Weight.from_float(w, 32, dtype=torch.float16).dtype == torch.float16
    # an all-zero group and a constant positive group stay exact
    w = torch.zeros(2, 64)
    w[1, :32] = 0.5
    wq = Int4Weight.from_float(w, 32)
    assert torch.equal(wq.dequantize().float(), w)
    assert Int4Weight.from_float(torch.randn(3, 96), -1).group_size == 96


def test_bad_inputs():
    q = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    s = torch.rand(4, 2)
    z = torch.full((4, 2), 3.0)
    with pytest.raises(ValueError, match="K=96 is not a multiple of group_size=64"):
        rtn_quantize(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        Int4Weight.from_float(torch.randn(4, 64), 16)
    with pytest.raises(ValueError, match="multiple of 8"):
        Int4Weight.from_float(torch.randn(4, 60), -1)
    with pytest.raises(ValueError, match=r"outside \[0, 15\]"):
        Int4Weight.from_quantized(q.to(torch.int32) + 1, s, z, 32, False)
    with pytest.raises(TypeError, match="integer codes"):
        Int4Weight.from_quantized(q.float(), s, z, 32, False)
    with pytest.raises(ValueError, match="scales must be a tensor of shape"):
        Int4Weight.from_quantized(q, torch.rand(4, 3), z, 32, False)
    with pytest.raises(ValueError, match="needs zeros"):
        Int4Weight.from_quantized(q, s, None, 32, False)
    with pytest.raises(ValueError, match="fixes every zero point at 8"):
        Int4Weight.from_quantized(q, s, z, 32, True)
    with pytest.raises(ValueError, match="integer values in"):
        Int4Weight.from_quantized(q, s, z + 0.5, 32, False)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        Int4Weight.from_quantized(q, s, z, 32, False, dtype=torch.float32)
    with pytest.raises(TypeError, match="floating point"):
        rtn_quantize(torch.ones(4, 64, dtype=torch.int32))
    good = Int4Weight.from_quantized(q, s, z, 32, False)
    with pytest.raises(TypeError, match="int32"):
        Int4Weight(good.qweight.to(torch.int64), good.scales, good.zeros, (4, 64), 32)
    with pytest.raises(ValueError, match="qweight must have shape"):
        Int4Weight(good.qweight[:, :4], good.scales, good.zeros, (4, 64), 32)
    with pytest.raises(TypeError, match="scale dtype"):
        Int4Weight(good.qweight, good.scales, good.zeros.bfloat16(), (4, 64), 32)
    moved = good.to("cpu")
    assert torch.equal(moved.dequantize(), good.dequantize()) and "Int4Weight(" in repr(moved)
