"""block_sparse_linear: Triton kernels (interpreter on CPU, compiled on GPU) vs the dense math.

The interpreter is slow, so most cases use 16/32 blocks; a few cover 64/128
and non-square blocks.
"""
import pytest
import torch
import torch.nn.functional as F

import sparsekit.kernels as skk
from sparsekit.formats.block_sparse import BlockSparseWeight
from sparsekit.ops.block_sparse import block_sparse_linear, block_sparse_linear_packed
from sparsekit.testing import (ODD_M, assert_all_written, assert_close_rel, assert_within_torch_error,
                               noncontiguous, poison_outputs)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, K, block, density): odd sizes, non-square blocks, an empty block-row
SMALL_CASES = [(37, 70, (16, 32), 0.5), (50, 33, (32, 16), 0.6), (33, 100, (16, 16), 0.3)]
BIG_BLOCK_CASES = [(130, 200, (64, 64), 0.5), (200, 150, (128, 32), 0.5), (40, 260, (16, 128), 0.5),
                   (129, 129, (128, 128), 0.75)]


def _case(m, n, k, bs, density, dtype, device="cpu", bias=True, lead=(), empty_row=False):
    w = torch.randn(n, k)
    if empty_row:
        w[: bs[0]] = 0.0
    s = BlockSparseWeight.from_dense_magnitude(w, bs, sparsity=1.0 - density)
    if empty_row:
        assert int(s.crow[1]) == 0
    s = s.to(dtype=dtype, device=device)
    wd = s.to_dense()
    x = torch.randn(*lead, m, k).to(dtype=dtype, device=device)
    b = torch.randn(n).to(dtype=dtype, device=device) if bias else None
    return wd, s, x, b


def _ref64(x, w, b):
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


def _check_forward(m, n, k, bs, density, dtype, backend="interpret", **kw):
    w, s, x, b = _case(m, n, k, bs, density, dtype, **kw)
    with poison_outputs():
        y = block_sparse_linear(x, s, b, backend=backend)
    assert y.shape == (*x.shape[:-1], n) and y.dtype == dtype
    assert_all_written(y)
    ref = _ref64(x, w, b)
    assert_close_rel(y, ref)
    assert_within_torch_error(y, ref, F.linear(x, w, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", ODD_M)
@pytest.mark.parametrize("n,k,bs,density", SMALL_CASES)
def test_forward_interpret_matches_dense(m, n, k, bs, density, dtype):
    _check_forward(m, n, k, bs, density, dtype, bias=(n % 2 == 1), empty_row=(k == 100))


@pytest.mark.parametrize("n,k,bs,density", BIG_BLOCK_CASES)
def test_forward_big_and_non_square_blocks(n, k, bs, density):
    _check_forward(3, n, k, bs, density, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_reference_backend(dtype):
    for m in (1, 17):
        _check_forward(m, 37, 70, (16, 32), 0.5, dtype, backend="reference")


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_batch_dims_and_noncontiguous(dtype):
    w, s, x, b = _case(5, 33, 50, (16, 16), 0.5, dtype, lead=(2, 3))
    xn = noncontiguous(x)
    assert not xn.is_contiguous()
    with poison_outputs():
        y = block_sparse_linear(xn, s, b, backend="interpret")
    assert y.shape == (2, 3, 5, 33)
    assert_all_written(y)
    assert_close_rel(y, _ref64(x, w, b))
    # a transposed 2-D x (column-major) goes in with its strides as they are
    xt = torch.randn(50, 7).to(dtype).t()
    assert_close_rel(block_sparse_linear(xt, s, None, backend="interpret"), _ref64(xt, w, None))


def test_forward_1d_input_empty_batch_and_no_blocks():
    w, s, x, b = _case(1, 17, 37, (16, 16), 0.5, torch.float32)
    y = block_sparse_linear(x[0], s, b, backend="interpret")
    assert y.shape == (17,)
    assert_close_rel(y, _ref64(x[0], w, b))
    assert block_sparse_linear(torch.randn(0, 37), s, b, backend="interpret").shape == (0, 17)
    # nnzb == 0: the output is the bias (or zeros)
    e = BlockSparseWeight.from_dense(torch.zeros(17, 37), 16)
    for backend in ("interpret", "reference"):
        with poison_outputs():
            y = block_sparse_linear(x, e, b, backend=backend)
        assert torch.equal(y, b.expand(1, 17))
        assert torch.equal(block_sparse_linear(x, e, None, backend=backend), torch.zeros(1, 17))


@pytest.mark.parametrize("split", [2, 3])
def test_split_kernel_path(split):
    # the small-M GPU configuration splits a row's blocks over programs (fp32 atomics)
    km = skk.load("block_sparse", interpret=True)
    for dtype in DTYPES:
        w, s, x, b = _case(3, 40, 200, (16, 16), 0.6, dtype, empty_row=True)
        out = torch.full((3, 40), float("nan"), dtype=dtype)
        cfg = dict(BLOCK_M=16, GROUP_M=1, SPLIT=split)
        km.block_sparse_linear(x, s.blocks, s.crow, s.col, 40, 200, b, out, config=cfg)
        assert_close_rel(out, _ref64(x, w, b))


@pytest.mark.parametrize("m", [1, 40, 130])
def test_gpu_forward_configs_are_valid(m):
    # each GPU M-bucket configuration (split forced for small M) through the interpreter
    km = skk.load("block_sparse", interpret=True)
    n, k, bs = 48, 512, (16, 32)
    w, s, x, b = _case(m, n, k, bs, 0.5, torch.float16)
    cfg = km.fwd_config(m, s.grid[0], s.nnzb, *bs, torch.float16, num_sms=64)
    if m == 1:
        assert cfg["SPLIT"] > 1
    cfg.pop("num_warps"), cfg.pop("num_stages")
    out = torch.full((m, n), float("nan"), dtype=torch.float16)
    km.block_sparse_linear(x, s.blocks, s.crow, s.col, n, k, b, out, config=cfg)
    assert_close_rel(out, _ref64(x, w, b))


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_swapped_forward_path(split, dtype):
    # SWAP: the transposed product W_blk @ X^T (the block on the tensor-core M side) and its
    # transposed epilogue: odd M over several M tiles, bias on / off, strided x, split row blocks
    km = skk.load("block_sparse", interpret=True)
    for m, n, k, bs, bias in ((5, 40, 200, (16, 32), True), (33, 37, 70, (32, 16), False)):
        w, s, x, b = _case(m, n, k, bs, 0.6, dtype, bias=bias)
        xs = noncontiguous(x)
        out = torch.full((m, n), float("nan"), dtype=dtype)
        cfg = dict(BLOCK_M=16, GROUP_M=2, SPLIT=split, SWAP=True)
        km.block_sparse_linear(xs, s.blocks, s.crow, s.col, n, k, b, out, config=cfg)
        assert_all_written(out)
        assert_close_rel(out, _ref64(x, w, b), what=f"m={m} bs={bs}")


def test_fwd_config_swap_and_fp32_precision():
    # short M tiles against 64+ row blocks run the transposed product, except full-precision fp32 (FMAs)
    km = skk.load("block_sparse", interpret=True)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for dt in DTYPES:
                ieee = dt == torch.float32 and not tf32
                for bm, bk in [(128, 128), (64, 64), (32, 32), (128, 32)]:
                    for m in (1, 16, 17, 64, 65, 4096):
                        cfg = km.fwd_config(m, 32, 512, bm, bk, dt)
                        assert cfg["SWAP"] == (cfg["BLOCK_M"] < 64 and bm >= 64 and not ieee), (cfg, dt, tf32)
                        assert cfg["num_warps"] in (4, 8) and cfg["num_stages"] >= 2
                for m in (1, 17, 65):
                    d = km.dx_config(m, 128, 128, dt)
                    assert d["BLOCK_M"] * 128 <= 64 * 128 and d["num_stages"] >= 2
                    if ieee and m > 16:
                        assert d["BLOCK_M"] == 32 and d["num_warps"] == 8
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("m", [1, 40, 130])
def test_gpu_grad_input_configs_are_valid(m):
    # each GPU M-bucket configuration of dX = dY @ W through the interpreter (fp32: FMA and TF32 variants)
    km = skk.load("block_sparse", interpret=True)
    n, k, bs = 48, 80, (16, 16)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for dt, tf32 in ((torch.float16, False), (torch.float32, False), (torch.float32, True)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            w, s, _, _ = _case(m, n, k, bs, 0.5, dt)
            dy = torch.randn(m, n).to(dt)
            cfg = km.dx_config(m, *bs, dt)
            cfg.pop("num_warps"), cfg.pop("num_stages")
            out = torch.full((m, k), float("nan"), dtype=dt)
            km.block_sparse_grad_input(dy, s.blocks, s.tcol_ptr, s.trow, s.tblk, k, out, config=cfg)
            assert_close_rel(out, dy.double() @ w.double(), what=f"{dt} tf32={tf32}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_fwd_config_limits_for_big_blocks():
    km = skk.load("block_sparse", interpret=True)
    for bm, bk in [(128, 128), (128, 32), (16, 128), (64, 64)]:
        for m in (1, 64, 4096):
            for dt in DTYPES:
                cfg = km.fwd_config(m, 32, 512, bm, bk, dt)
                it = torch.empty((), dtype=dt).element_size()
                assert cfg["BLOCK_M"] >= 16 and cfg["BLOCK_M"] * bm <= 128 * 128
                assert cfg["num_stages"] * (cfg["BLOCK_M"] + bm) * bk * it <= 160 * 1024
                assert cfg["SPLIT"] >= 1


def test_grad_blocks_split_path():
    km = skk.load("block_sparse", interpret=True)
    for dtype in (torch.float32, torch.bfloat16):
        w, s, x, b = _case(70, 40, 50, (16, 32), 0.5, dtype)
        dy = torch.randn(70, 40).to(dtype)
        out = torch.full(s.blocks.shape, float("nan"), dtype=dtype)
        km.block_sparse_grad_blocks(dy, x, s.col, s.trow, s.tblk, 40, 50, out, config=dict(BLOCK_M=16, SPLIT=3))
        dw = dy.double().T @ x.double()
        got = BlockSparseWeight(out, *s.index_tensors(), s.shape, s.block_size).to_dense()
        assert_close_rel(got, dw * s.mask())


# ------------------------------------------------------------------ backward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,bs", [(1, 5, 7, (16, 16)), (3, 37, 70, (16, 32)), (17, 50, 33, (32, 16)),
                                      (5, 70, 140, (64, 16))])
@pytest.mark.parametrize("backend", ["interpret", "dense", "reference"])
def test_backward_matches_dense_autograd(m, n, k, bs, dtype, backend):
    w, s, x, b = _case(m, n, k, bs, 0.5, dtype, lead=(2,))
    blocks = s.blocks.clone().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    bg = b.clone().requires_grad_(True)
    ws = BlockSparseWeight(blocks, *s.index_tensors(), s.shape, s.block_size)
    y = block_sparse_linear(xg, ws, bg, backend=backend)
    dy = torch.randn_like(y)
    with poison_outputs():
        gx, gblk, gb = torch.autograd.grad(y, (xg, blocks, bg), dy)
    # reference: dense autograd in float64 on the same pruned weight
    wd = w.double().requires_grad_(True)
    xd = x.double().requires_grad_(True)
    bd = b.double().requires_grad_(True)
    rx, rw, rb = torch.autograd.grad(F.linear(xd, wd, bd), (xd, wd, bd), dy.double())
    assert_all_written(gx), assert_all_written(gblk)
    assert gblk.shape == s.blocks.shape and gblk.dtype == dtype
    assert_close_rel(gx, rx, what="grad x")
    got_w = BlockSparseWeight(gblk, *s.index_tensors(), s.shape, s.block_size).to_dense()
    assert_close_rel(got_w, rw * s.mask(), what="grad blocks")
    assert_close_rel(gb, rb, what="grad bias")


def test_backward_empty_rows_and_columns_interpret():
    # block-row 0 and block-column 1 hold no blocks: dX's column 1 is zero, every output written
    w0 = torch.randn(40, 80)
    keep = torch.rand(3, 5) < 0.7
    keep[0, :] = False
    keep[:, 1] = False
    keep[2, 4] = True
    s = BlockSparseWeight.from_dense(w0, (16, 16), block_mask=keep)
    w = s.to_dense()
    x = torch.randn(4, 80)
    blocks = s.blocks.clone().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    y = block_sparse_linear(xg, BlockSparseWeight(blocks, *s.index_tensors(), s.shape, s.block_size), None,
                            backend="interpret")
    dy = torch.randn_like(y)
    with poison_outputs():
        gx, gblk = torch.autograd.grad(y, (xg, blocks), dy)
    assert_all_written(gx)
    assert bool((gx[:, 16:32] == 0).all())
    assert_close_rel(gx, dy.double() @ w.double())
    got_w = BlockSparseWeight(gblk, *s.index_tensors(), s.shape, s.block_size).to_dense()
    assert_close_rel(got_w, (dy.double().T @ x.double()) * s.mask())


def test_grad_step_keeps_block_pattern():
    w, s, x, b = _case(4, 33, 40, (16, 16), 0.5, torch.float32)
    blocks = s.blocks.clone().requires_grad_(True)
    y = block_sparse_linear(x, BlockSparseWeight(blocks, *s.index_tensors(), s.shape, s.block_size), b,
                            backend="interpret")
    y.square().sum().backward()
    stepped = BlockSparseWeight((blocks - 0.1 * blocks.grad).detach(), *s.index_tensors(), s.shape,
                                s.block_size).to_dense()
    assert bool((stepped[~s.mask()] == 0).all())
    assert not torch.equal(stepped, w)


# ------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors():
    w, s, x, b = _case(3, 20, 40, (16, 16), 0.5, torch.float32)
    idx = s.index_tensors()
    with pytest.raises(TypeError, match="dtype"):
        block_sparse_linear(x.half(), s, None)
    with pytest.raises(ValueError, match="in_features=40"):
        block_sparse_linear(torch.randn(3, 39), s, None)
    with pytest.raises(TypeError, match="BlockSparseWeight"):
        block_sparse_linear(x, w, None)
    with pytest.raises(ValueError, match="bias must have shape"):
        block_sparse_linear(x, s, torch.randn(7))
    with pytest.raises(TypeError, match="bias must match"):
        block_sparse_linear(x, s, torch.randn(20).half())
    with pytest.raises(TypeError, match="floating point"):
        block_sparse_linear(torch.ones(3, 40, dtype=torch.int64), s, None)
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        block_sparse_linear(x.double(), s.to(torch.float64), None)
    with pytest.raises(ValueError, match="unknown backend"):
        block_sparse_linear(x, s, None, backend="magic")
    with pytest.raises(ValueError, match="CUDA tensors"):
        block_sparse_linear(x, s, None, backend="triton")
    with pytest.raises(ValueError, match="no 'cuda' backend"):
        block_sparse_linear(x, s, None, backend="cuda")
    with pytest.raises(ValueError, match="is on"):
        block_sparse_linear(x.to("meta"), s, None)
    # packed entry point: block size, index arrays, feature counts
    with pytest.raises(ValueError, match="block size"):
        block_sparse_linear_packed(x, torch.randn(2, 16, 24), *idx, 20, 40)
    with pytest.raises(ValueError, match="3-D"):
        block_sparse_linear_packed(x, s.blocks[0], *idx, 20, 40)
    with pytest.raises(TypeError, match="crow must be int32"):
        block_sparse_linear_packed(x, s.blocks, idx[0].long(), *idx[1:], 20, 40)
    with pytest.raises(ValueError, match=r"crow must have shape \(4,\).*got \(3,\)"):
        block_sparse_linear_packed(x, s.blocks, *idx, 40, 40)
    with pytest.raises(ValueError, match="col must have shape"):
        block_sparse_linear_packed(x, s.blocks, idx[0], idx[1][:-1], *idx[2:], 20, 40)
    with pytest.raises(ValueError, match="tcol_ptr must have shape"):
        block_sparse_linear_packed(x[:, :32], s.blocks, *idx, 20, 32)
    with pytest.raises(TypeError, match="out_features must be"):
        block_sparse_linear_packed(x, s.blocks, *idx, 20.0, 40)


# ------------------------------------------------------------------ dispatch
def test_dispatch_default_and_env(monkeypatch):
    from sparsekit.ops import available_backends, resolve

    assert resolve("block_sparse_linear", "cpu") == "dense"          # the cached expansion; SPARSEKIT_CPU_DENSE=0: reference
    assert set(available_backends("block_sparse_linear", "cpu")) == {"interpret", "dense", "reference"}
    monkeypatch.setenv("SPARSEKIT_BACKEND", "interpret")
    assert resolve("block_sparse_linear", "cpu") == "interpret"
    w, s, x, b = _case(3, 20, 40, (16, 16), 0.5, torch.float32)
    assert_close_rel(block_sparse_linear(x, s, b), _ref64(x, w, b))


# ------------------------------------------------------------------ torch.library
@pytest.mark.parametrize("backend", ["reference", "interpret"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(backend, dtype):
    w, s, x, b = _case(3, 20, 37, (16, 16), 0.5, dtype, lead=(2,))
    idx = s.index_tensors()
    x.requires_grad_(True)
    blocks = s.blocks.clone().requires_grad_(True)
    ops = torch.ops.sparsekit
    torch.library.opcheck(ops.block_sparse_linear.default, (x, blocks, *idx, 20, 37, b, backend))
    torch.library.opcheck(ops.block_sparse_linear.default, (x, blocks, *idx, 20, 37, None, backend))
    dy = torch.randn(2, 3, 20, dtype=dtype)
    torch.library.opcheck(ops.block_sparse_grad_input.default, (dy, s.blocks, *idx, 20, 37, backend))
    torch.library.opcheck(ops.block_sparse_grad_blocks.default, (dy, x.detach(), *idx, 16, 16, backend))


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 128, 300])
@pytest.mark.parametrize("n,k,bs,density", SMALL_CASES + BIG_BLOCK_CASES + [(4099, 4100, (64, 64), 0.25),
                                                                             (1000, 3000, (32, 32), 0.1)])
def test_triton_gpu_forward(m, n, k, bs, density, dtype):
    _check_forward(m, n, k, bs, density, dtype, backend="triton", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [(16, 16), (32, 32), (64, 64), (128, 32), (32, 128), (128, 128)])
def test_triton_gpu_backward(dtype, bs):
    w, s, x, b = _case(37, 300, 500, bs, 0.3, dtype, device="cuda", lead=(2,))
    blocks = s.blocks.clone().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    y = block_sparse_linear(xg, BlockSparseWeight(blocks, *s.index_tensors(), s.shape, s.block_size), b,
                            backend="triton")
    dy = torch.randn_like(y)
    with poison_outputs():
        gx, gblk = torch.autograd.grad(y, (xg, blocks), dy)
    assert_close_rel(gx, dy.double() @ w.double())
    got_w = BlockSparseWeight(gblk, *s.index_tensors(), s.shape, s.block_size).to_dense()
    rw = dy.double().reshape(-1, 300).T @ x.double().reshape(-1, 500)
    assert_close_rel(got_w, rw * s.mask())


@pytest.mark.gpu
def test_triton_gpu_grad_blocks_split_for_long_m():
    # few blocks, long M: the dW launch splits M over programs
    w, s, x, b = _case(8192, 64, 64, (32, 32), 0.5, torch.float16, device="cuda")
    dy = torch.randn(8192, 64, device="cuda").half()
    km = skk.load("block_sparse")
    with poison_outputs():
        out = torch.full(s.blocks.shape, float("nan"), dtype=torch.float16, device="cuda")
        km.block_sparse_grad_blocks(dy, x, s.col, s.trow, s.tblk, 64, 64, out)
    got = BlockSparseWeight(out, *s.index_tensors(), s.shape, s.block_size).to_dense()
    assert_close_rel(got, (dy.double().T @ x.double()) * s.mask())


@pytest.mark.gpu
def test_auto_dispatch_on_gpu_matches_reference():
    for m in (1, 16, 17, 512):
        w, s, x, b = _case(m, 256, 512, (32, 32), 0.25, torch.float16, device="cuda")
        assert_close_rel(block_sparse_linear(x, s, b), _ref64(x, w, b))


def test_interpreter_bf16_output_rounds_to_nearest():
    w, s, x, b = _case(33, 64, 256, (32, 32), 0.5, torch.bfloat16, bias=False)
    y = block_sparse_linear(x, s, backend="interpret")
    same = (y == (x.float() @ w.float().T).bfloat16()).float().mean().item()
    assert same > 0.97, f"only {same:.1%} of outputs equal the rounded fp32 result"


@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_density_sweep(density, dtype):
    # a 9 x 17 block grid: density 0.05 keeps 8 blocks, leaving most block-rows empty
    _check_forward(17, 130, 260, (16, 16), density, dtype)
    w, s, x, b = _case(17, 130, 260, (16, 16), density, dtype)
    from sparsekit.formats.block_sparse import keep_count
    assert s.nnzb == keep_count(9 * 17, 1.0 - density)


@pytest.mark.parametrize("density", [0.05, 1.0])
def test_backward_density_sweep(density):
    w, s, x, b = _case(9, 130, 260, (16, 16), density, torch.float32)
    blocks = s.blocks.clone().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    sw = BlockSparseWeight(blocks, s.crow, s.col, s.tcol_ptr, s.trow, s.tblk, s.shape, s.block_size)
    y = block_sparse_linear(xg, sw, b, backend="interpret")
    dy = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (xg, blocks), dy)
    assert_close_rel(gx, dy.double() @ w.double(), what="grad x")
    dw = dy.double().T @ x.double()
    ref = BlockSparseWeight.from_dense(dw, (16, 16), block_mask=s.block_mask()).blocks
    assert_close_rel(gb, ref, what="grad blocks")
