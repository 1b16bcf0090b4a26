"""int4_linear (W4A16): Triton kernels (interpreter on CPU, compiled on GPU) vs the dense math
of the same dequantized weight."""
import pytest
import torch
import torch.nn.functional as F

import sparsekit.kernels as skk
from sparsekit.formats.int4 import Int4Weight
from sparsekit.ops.int4 import int4_linear, int4_linear_packed
from sparsekit.testing import (assert_all_written, assert_close_rel, assert_within_torch_error, noncontiguous,
                               poison_outputs)

DTYPES = [torch.float16, torch.bfloat16]


def _case(m, n, k, dtype, group_size=32, symmetric=False, bias=True, lead=(), device="cpu"):
    w = torch.randn(n, k) * k ** -0.5
    q = Int4Weight.from_float(w, group_size, symmetric, dtype=dtype).to(device)
    x = torch.randn(*lead, m, k).to(dtype=dtype, device=device)
    b = (torch.randn(n) * 0.1).to(dtype=dtype, device=device) if bias else None
    return q, x, b


def _ref64(x, q, b):
    y = x.double() @ q.dequantize().double().T
    return y + b.double() if b is not None else y


def _check(y, x, q, b):
    assert_all_written(y)
    ref = _ref64(x, q, b)
    assert_close_rel(y, ref)
    assert_within_torch_error(y, ref, F.linear(x, q.dequantize(), b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17, 128])
@pytest.mark.parametrize("n,k", [(1, 64), (17, 96), (33, 160), (100, 64)])
def test_forward_interpret_matches_dense(m, n, k, dtype):
    if m == 128 and n > 33:
        pytest.skip("keeps the CPU suite short; covered by the other M")
    q, x, b = _case(m, n, k, dtype, bias=(n % 2 == 1), symmetric=(m == 3))
    with poison_outputs():
        y = int4_linear(x, q, b, backend="interpret")
    assert y.shape == (m, n) and y.dtype == dtype
    _check(y, x, q, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size,k", [(32, 64), (64, 128), (128, 256), (-1, 96), (-1, 40)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_group_sizes(group_size, k, symmetric, dtype):
    q, x, b = _case(5, 19, k, dtype, group_size, symmetric)
    with poison_outputs():
        y = int4_linear(x, q, b, backend="interpret")
    _check(y, x, q, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size,k", [(32, 96), (64, 128), (-1, 40)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block_k", [16, 32, 64])
def test_register_dequant_is_bit_exact(group_size, k, symmetric, dtype, block_k):
    # the kernels' in-register dequantization (shift/mask, magic exponent,
    # scale) equals Int4Weight.dequantize() bit for bit, whether a K tile lies
    # inside a group or spans several
    kmod = skk.load("int4", interpret=True)
    q, _, _ = _case(1, 21, k, dtype, group_size, symmetric)
    out = torch.full((21, k), float("nan"), dtype=dtype)
    kmod.int4_dequantize(q.qweight, q.scales, q.zeros, q.group_size, k, out, block_k=block_k)
    assert torch.equal(out, q.dequantize())


def test_identity_matmul_reproduces_dequantized_weight():
    q, _, _ = _case(1, 24, 64, torch.float16, 32)
    eye = torch.eye(64, dtype=torch.float16)
    y = int4_linear(eye, q, backend="interpret")
    assert torch.equal(y, q.dequantize().T.contiguous())


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_dims_noncontiguous_and_transposed(dtype):
    q, x, b = _case(5, 33, 96, dtype, lead=(2, 3))
    xn = noncontiguous(x)
    with poison_outputs():
        y = int4_linear(xn, q, b, backend="interpret")
    assert y.shape == (2, 3, 5, 33)
    _check(y, x, q, b)
    xt = torch.randn(96, 7).to(dtype).t()
    _check(int4_linear(xt, q, None, backend="interpret"), xt, q, None)


def test_1d_input_empty_batch_and_packed_api():
    q, x, b = _case(1, 17, 64, torch.float16)
    y = int4_linear(x[0], q, b, backend="interpret")
    assert y.shape == (17,)
    assert_close_rel(y, _ref64(x[0], q, b))
    assert int4_linear(torch.randn(0, 64).half(), q, b, backend="interpret").shape == (0, 17)
    yp = int4_linear_packed(x, q.qweight, q.scales, q.zeros, q.group_size, 64, b, backend="interpret")
    assert torch.equal(yp, int4_linear(x, q, b, backend="interpret"))
    yr = int4_linear(x, q, b, backend="reference")
    assert yr.dtype == torch.float16
    assert_close_rel(yr, _ref64(x, q, b))


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k_kernel_path(split, dtype):
    kmod = skk.load("int4", interpret=True)
    q, x, b = _case(3, 40, 224, dtype)
    out = torch.full((3, 40), float("nan"), dtype=dtype)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, SPLIT_K=split)
    kmod.int4_linear(x, q.qweight, q.scales, q.zeros, q.group_size, 224, b, out, config=cfg)
    assert_close_rel(out, _ref64(x, q, b))


@pytest.mark.parametrize("m,group_size", [(1, 32), (1, 128), (1, -1), (40, 32), (130, 128)])
def test_gpu_tile_configs_are_valid(m, group_size):
    # each GPU M-bucket configuration (split-K included) through the interpreter
    kmod = skk.load("int4", interpret=True)
    n, k = 20, 512
    cfg = kmod.fwd_config(m, n, k, k if group_size == -1 else group_size, num_sms=64)
    if m == 1:
        assert cfg["SPLIT_K"] > 1
    q, x, b = _case(m, n, k, torch.float16, group_size)
    out = torch.full((m, n), float("nan"), dtype=torch.float16)
    kmod.int4_linear(x, q.qweight, q.scales, q.zeros, q.group_size, k, b, out, config=cfg)
    assert_close_rel(out, _ref64(x, q, b))


def test_config_rejects_straddling_tiles():
    kmod = skk.load("int4", interpret=True)
    with pytest.raises(ValueError, match="BLOCK_K"):
        kmod.check_config(dict(BLOCK_K=48), 32, 4)
    kmod.check_config(dict(BLOCK_K=128), 96, 1)       # one group per row: any BLOCK_K
    assert kmod.tile_groups(128, 32, 8) == 4 and kmod.tile_groups(32, 128, 8) == 1
    for m in (1, 16, 64, 4096):
        for gs in (32, 64, 128):
            kmod.check_config(kmod.fwd_config(m, 4096, 4096, gs), gs, 4096 // gs)


@pytest.mark.parametrize("backend", ["interpret", "dense", "reference"])
def test_grad_x_and_bias(backend):
    q, x, b = _case(4, 24, 64, torch.float16, lead=(2,))
    xg = x.clone().requires_grad_(True)
    bg = b.clone().requires_grad_(True)
    y = int4_linear(xg, q, bg, backend=backend)
    dy = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (xg, bg), dy)
    assert_close_rel(gx, dy.double() @ q.dequantize().double(), what="grad x")
    assert_close_rel(gb, dy.double().sum((0, 1)), what="grad bias")
    scales = q.scales.clone().requires_grad_(True)
    y = int4_linear_packed(x, q.qweight, scales, q.zeros, q.group_size, 64, b, backend=backend)
    with pytest.raises(NotImplementedError, match="inference op"):
        y.sum().backward()


# ------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors():
    q, x, b = _case(3, 8, 64, torch.float16)
    with pytest.raises(TypeError, match="does not match the weight's scale dtype"):
        int4_linear(x.bfloat16(), q)
    with pytest.raises(TypeError, match="float16 and bfloat16"):
        int4_linear(x.float(), q)
    with pytest.raises(ValueError, match="in_features=64"):
        int4_linear(torch.randn(3, 63).half(), q)
    with pytest.raises(TypeError, match="Int4Weight"):
        int4_linear(x, q.dequantize())
    with pytest.raises(ValueError, match="bias must have shape"):
        int4_linear(x, q, torch.randn(7).half())
    with pytest.raises(TypeError, match="bias must match"):
        int4_linear(x, q, torch.randn(8))
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        int4_linear_packed(x, q.qweight, q.scales, q.zeros, 48, 64)
    with pytest.raises(ValueError, match="scales must have shape"):
        int4_linear_packed(x, q.qweight, q.scales[:, :1], q.zeros, 32, 64)
    with pytest.raises(ValueError, match="unknown backend"):
        int4_linear(x, q, backend="magic")
    with pytest.raises(ValueError, match="CUDA tensors"):
        int4_linear(x, q, backend="triton")
    with pytest.raises(ValueError, match="no 'cuda' backend"):
        int4_linear(x, q, backend="cuda")
    with pytest.raises(ValueError, match="is on"):
        int4_linear(x.to("meta"), q)


def test_dispatch():
    from sparsekit.ops import dispatch

    assert dispatch.resolve("int4_linear", "cpu") == "dense"
    assert dispatch.available_backends("int4_linear", "cpu") == ["interpret", "dense", "reference"]


# ------------------------------------------------------------------ torch.library
@pytest.mark.parametrize("backend", ["reference", "interpret"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck(backend, dtype, symmetric):
    q, x, b = _case(3, 17, 64, dtype, symmetric=symmetric, lead=(2,))
    op = torch.ops.sparsekit.int4_linear.default
    torch.library.opcheck(op, (x, q.qweight, q.scales, q.zeros, q.group_size, 64, b, backend))
    torch.library.opcheck(op, (x.requires_grad_(True), q.qweight, q.scales, q.zeros, q.group_size, 64, None,
                               backend))


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 300])
@pytest.mark.parametrize("n,k,group_size", [(1, 64, 32), (17, 96, 32), (4099, 4096, 128), (4096, 4096, 64),
                                            (1000, 11008, 128), (4096, 4096, -1), (11008, 4096, 32)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_triton_gpu_forward(m, n, k, group_size, dtype, symmetric):
    q, x, b = _case(m, n, k, dtype, group_size, symmetric, device="cuda")
    with poison_outputs():
        y = int4_linear(x, q, b, backend="triton")
    _check(y, x, q, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_triton_gpu_dequant_bit_exact(dtype, group_size):
    kmod = skk.load("int4")
    q, _, _ = _case(1, 300, 4096, dtype, group_size, device="cuda")
    for bk in (32, 64, 128, 256):
        out = torch.full((300, 4096), float("nan"), dtype=dtype, device="cuda")
        kmod.int4_dequantize(q.qweight, q.scales, q.zeros, q.group_size, 4096, out, block_k=bk)
        assert torch.equal(out, q.dequantize())


@pytest.mark.gpu
def test_auto_dispatch_on_gpu_matches_reference():
    for m in (1, 16, 17, 512):
        q, x, b = _case(m, 4096, 4096, torch.float16, 128, device="cuda")
        y = int4_linear(x, q, b)
        assert_close_rel(y, _ref64(x, q, b))
        assert_close_rel(y, int4_linear(x, q, b, backend="reference").double(), bound=2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k_programs_without_tiles(dtype):
    # the kernel's K loop always runs at least once (a loop that may run zero times makes
    # ptxas serialize the pipelined wgmma); a split-K program that owns no K tile runs one
    # fully masked step that must add nothing (and the bias exactly once)
    kmod = skk.load("int4", interpret=True)
    q, x, b = _case(5, 24, 64, dtype)
    out = torch.full((5, 24), float("nan"), dtype=dtype)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, SPLIT_K=5)     # 2 K tiles, 5 splits
    kmod.int4_linear(x, q.qweight, q.scales, q.zeros, q.group_size, 64, b, out, config=cfg)
    _check(out, x, q, b)


@pytest.mark.parametrize("bias", [False, True])
def test_kernel_launcher_k_zero(bias):
    kmod = skk.load("int4", interpret=True)
    b = torch.randn(6).half() if bias else None
    out = torch.full((3, 6), float("nan"), dtype=torch.float16)
    kmod.int4_linear(torch.empty(3, 0).half(), torch.empty(6, 0, dtype=torch.int32), torch.empty(6, 0).half(),
                     None, 1, 0, b, out)
    assert torch.equal(out, b.expand(3, 6) if bias else torch.zeros(3, 6).half())
