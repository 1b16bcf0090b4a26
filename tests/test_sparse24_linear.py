"""sparse24_linear: Triton kernels (interpreter on CPU, compiled on GPU) vs the dense math."""
import pytest
import torch
import torch.nn.functional as F

import sparsekit.kernels as skk
from sparsekit.formats import Sparse24Weight
from sparsekit.ops import sparse24_linear
from sparsekit.testing import (ODD_M, ODD_NK, assert_all_written, assert_close_rel, assert_within_torch_error,
                               noncontiguous, poison_outputs, random_2to4)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(m, n, k, dtype, device="cpu", bias=True, lead=()):
    w = random_2to4(n, k, dtype=dtype, device=device)
    s = Sparse24Weight.from_dense(w)
    x = torch.randn(*lead, m, k).to(dtype=dtype, device=device)
    b = torch.randn(n).to(dtype=dtype, device=device) if bias else None
    return w, s, x, b


def _ref64(x, w, b):
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", ODD_M)
@pytest.mark.parametrize("n,k", ODD_NK)
def test_forward_interpret_matches_dense(m, n, k, dtype):
    w, s, x, b = _case(m, n, k, dtype, bias=(n % 2 == 1))
    with poison_outputs():
        y = sparse24_linear(x, s, b, backend="interpret")
    assert y.shape == (m, n) and y.dtype == dtype
    assert_all_written(y)
    ref = _ref64(x, w, b)
    assert_close_rel(y, ref)
    # no worse than 2x PyTorch's own error for the same math in this dtype
    assert_within_torch_error(y, ref, F.linear(x, w, b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_batch_dims_and_noncontiguous(dtype):
    w, s, x, b = _case(5, 33, 100, dtype, lead=(2, 3))
    xn = noncontiguous(x)
    assert not xn.is_contiguous()
    with poison_outputs():
        y = sparse24_linear(xn, s, b, backend="interpret")
    assert y.shape == (2, 3, 5, 33)
    assert_all_written(y)
    assert_close_rel(y, _ref64(x, w, b))
    # a transposed 2-D x (column-major) goes in with its strides as they are
    xt = torch.randn(100, 7).to(dtype).t()
    assert_close_rel(sparse24_linear(xt, s, None, backend="interpret"), _ref64(xt, w, None))


def test_forward_1d_input_and_empty_batch():
    w, s, x, b = _case(1, 17, 37, torch.float32)
    y = sparse24_linear(x[0], s, b, backend="interpret")
    assert y.shape == (17,)
    assert_close_rel(y, _ref64(x[0], w, b))
    e = sparse24_linear(torch.randn(0, 37), s, b, backend="interpret")
    assert e.shape == (0, 17)


@pytest.mark.parametrize("split", [2, 3])
def test_split_k_kernel_path(split):
    # the small-M GPU configuration splits K across programs with fp32 atomics
    k_mod = skk.load("sparse24", interpret=True)
    for dtype in DTYPES:
        w, s, x, b = _case(3, 40, 200, dtype)
        out = torch.full((3, 40), float("nan"), dtype=dtype)
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, SPLIT_K=split)
        k_mod.sparse24_linear(x, s.values, s.meta, 200, b, out, config=cfg)
        assert_close_rel(out, _ref64(x, w, b))


@pytest.mark.parametrize("m", [1, 40, 130])
def test_gpu_tile_configs_are_valid(m):
    # run each GPU M-bucket configuration (with split-K forced) through the interpreter
    k_mod = skk.load("sparse24", interpret=True)
    n, k = 70, 1030
    cfg = k_mod.fwd_config(m, n, k, torch.float16, num_sms=64)
    if m == 1:
        assert cfg["SPLIT_K"] > 1
    w, s, x, b = _case(m, n, k, torch.float16)
    out = torch.full((m, n), float("nan"), dtype=torch.float16)
    cfg.pop("num_warps"), cfg.pop("num_stages")
    k_mod.sparse24_linear(x, s.values, s.meta, k, b, out, config=cfg)
    assert_close_rel(out, _ref64(x, w, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 5, 7), (3, 17, 37), (17, 33, 100), (40, 65, 129)])
@pytest.mark.parametrize("backend", ["interpret", "dense", "reference"])
def test_backward_matches_dense_autograd(m, n, k, dtype, backend):
    w, s, x, b = _case(m, n, k, dtype, lead=(2,))
    values = s.values.clone().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    bg = b.clone().requires_grad_(True)
    y = sparse24_linear(xg, Sparse24Weight(values, s.meta, s.shape), bg, backend=backend)
    dy = torch.randn_like(y)
    with poison_outputs():
        gx, gv, gb = torch.autograd.grad(y, (xg, values, bg), dy)
    # reference: dense autograd in float64 on the same pruned weight
    wd = w.double().requires_grad_(True)
    xd = x.double().requires_grad_(True)
    bd = b.double().requires_grad_(True)
    yd = F.linear(xd, wd, bd)
    rx, rw, rb = torch.autograd.grad(yd, (xd, wd, bd), dy.double())
    kp = s.values.shape[1] * 2
    rv = torch.gather(F.pad(rw, (0, kp - k)), 1, s.dense_columns())
    assert_all_written(gx), assert_all_written(gv)
    assert gv.shape == s.values.shape and gv.dtype == dtype
    assert_close_rel(gx, rx, what="grad x")
    assert_close_rel(gv, rv, what="grad values")
    assert_close_rel(gb, rb, what="grad bias")


def test_grad_of_pruned_positions_is_not_stored():
    # the values' gradient only exists at kept positions: a step keeps the mask
    w, s, x, b = _case(4, 8, 16, torch.float32)
    values = s.values.clone().requires_grad_(True)
    y = sparse24_linear(x, Sparse24Weight(values, s.meta, s.shape), b, backend="interpret")
    y.square().sum().backward()
    stepped = Sparse24Weight((values - 0.1 * values.grad).detach(), s.meta, s.shape).to_dense()
    assert bool((stepped[w == 0] == 0).all())
    assert not torch.equal(stepped, w)


# ------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors():
    w, s, x, b = _case(3, 8, 16, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        sparse24_linear(x.half(), s, None)
    with pytest.raises(ValueError, match="in_features=16"):
        sparse24_linear(torch.randn(3, 15), s, None)
    with pytest.raises(TypeError, match="Sparse24Weight"):
        sparse24_linear(x, w, None)
    with pytest.raises(ValueError, match="bias must have shape"):
        sparse24_linear(x, s, torch.randn(7))
    with pytest.raises(TypeError, match="floating point"):
        sparse24_linear(torch.ones(3, 16, dtype=torch.int64), s, None)
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        s64 = Sparse24Weight.from_dense(w.double())
        sparse24_linear(x.double(), s64, None)
    with pytest.raises(ValueError, match="unknown backend"):
        sparse24_linear(x, s, None, backend="magic")
    with pytest.raises(ValueError, match="CUDA tensors"):
        sparse24_linear(x, s, None, backend="triton")
    with pytest.raises(ValueError, match="not 2:4"):
        Sparse24Weight.from_dense(torch.randn(4, 8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_device_mismatch_and_cuda_backend_on_cpu():
    w, s, x, b = _case(3, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="CUDA tensors|unavailable"):
        sparse24_linear(x, s, None, backend="cuda")
    with pytest.raises(ValueError, match="is on"):
        sparse24_linear(x.to("meta"), s, None)


# ------------------------------------------------------------------ dispatch
def test_dispatch_default_and_env(monkeypatch):
    from sparsekit.ops import available_backends, resolve

    assert resolve("sparse24_linear", "cpu") == "dense"          # the cached expansion (ops/_dense.py)
    monkeypatch.setenv("SPARSEKIT_CPU_DENSE", "0")
    assert resolve("sparse24_linear", "cpu") == "reference"
    monkeypatch.delenv("SPARSEKIT_CPU_DENSE")
    assert "interpret" in available_backends("sparse24_linear", "cpu")
    assert "triton" not in available_backends("sparse24_linear", "cpu")
    monkeypatch.setenv("SPARSEKIT_BACKEND", "interpret")
    assert resolve("sparse24_linear", "cpu") == "interpret"
    w, s, x, b = _case(3, 8, 16, torch.float32)
    assert_close_rel(sparse24_linear(x, s, b), _ref64(x, w, b))
    monkeypatch.setenv("SPARSEKIT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SPARSEKIT_BACKEND"):
        resolve("sparse24_linear", "cpu")
    monkeypatch.setenv("SPARSEKIT_BACKEND", "auto")
    assert resolve("sparse24_linear", "cpu") == "dense"
    with pytest.raises(ValueError, match="unknown op"):
        resolve("nope", "cpu")


def test_dispatch_tables_are_well_formed():
    import json
    import os

    from sparsekit.ops import dispatch

    import sparsekit.ops.sparse24_int8  # noqa: F401  (registers its op)

    for name in os.listdir(dispatch._TABLE_DIR):
        with open(os.path.join(dispatch._TABLE_DIR, name)) as f:
            table = json.load(f)
        for op, rows in table.items():
            if op.startswith("_"):
                continue
            # every table's rows are well formed; ops of other families may be
            # registered by modules this test does not import
            assert rows and rows[-1]["max_m"] is None, f"{name}:{op} needs a catch-all last row"
            for r in rows:
                assert r["backend"] in dispatch.ALL_BACKENDS, (name, op, r)
                if op in dispatch._REGISTRY:
                    assert r["backend"] in dispatch._REGISTRY[op], (name, op, r)
    assert "sparse24_linear" in dispatch._REGISTRY


# ------------------------------------------------------------------ torch.library
@pytest.mark.parametrize("backend", ["reference", "interpret"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(backend, dtype):
    w, s, x, b = _case(3, 17, 37, dtype, lead=(2,))
    x.requires_grad_(True)
    values = s.values.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.sparsekit.sparse24_linear.default, (x, values, s.meta, 37, b, backend))
    torch.library.opcheck(torch.ops.sparsekit.sparse24_linear.default, (x, values, s.meta, 37, None, backend))
    dy = torch.randn(2, 3, 17, dtype=dtype)
    torch.library.opcheck(torch.ops.sparsekit.sparse24_grad_input.default, (dy, s.values, s.meta, 37, backend))
    torch.library.opcheck(torch.ops.sparsekit.sparse24_grad_values.default, (dy, x.detach(), s.meta, 37, backend))


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 128, 300])
@pytest.mark.parametrize("n,k", [(1, 8), (17, 37), (96, 61), (4099, 4104), (1000, 11008)])
def test_triton_gpu_forward(m, n, k, dtype):
    w, s, x, b = _case(m, n, k, dtype, device="cuda")
    with poison_outputs():
        y = sparse24_linear(x, s, b, backend="triton")
    assert_all_written(y)
    ref = _ref64(x, w, b)
    assert_close_rel(y, ref)
    assert_within_torch_error(y, ref, F.linear(x, w, b))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_gpu_backward(dtype):
    w, s, x, b = _case(37, 129, 200, dtype, device="cuda", lead=(2,))
    values = s.values.clone().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    y = sparse24_linear(xg, Sparse24Weight(values, s.meta, s.shape), b, backend="triton")
    dy = torch.randn_like(y)
    gx, gv = torch.autograd.grad(y, (xg, values), dy)
    rx = dy.double() @ w.double()
    rw = dy.double().reshape(-1, 129).T @ x.double().reshape(-1, 200)
    rv = torch.gather(F.pad(rw, (0, s.values.shape[1] * 2 - 200)), 1, s.dense_columns())
    assert_close_rel(gx, rx)
    assert_close_rel(gv, rv)


@pytest.mark.gpu
def test_auto_dispatch_on_gpu_matches_reference():
    for m in (1, 16, 17, 512):
        w, s, x, b = _case(m, 256, 512, torch.float16, device="cuda")
        assert_close_rel(sparse24_linear(x, s, b), _ref64(x, w, b))


def test_interpreter_bf16_output_rounds_to_nearest():
    # the kernel's bf16 epilogue must round like torch (nearest even), not truncate
    w = random_2to4(64, 256, dtype=torch.bfloat16)
    s = Sparse24Weight.from_dense(w)
    x = torch.randn(33, 256).bfloat16()
    y = sparse24_linear(x, s, backend="interpret")
    same = (y == (x.float() @ w.float().T).bfloat16()).float().mean().item()
    assert same > 0.97, f"only {same:.1%} of outputs equal the rounded fp32 result"


# ------------------------------------------------------------------ metadata views
def _sliced_meta(meta: torch.Tensor, offset: int, pad: int = 0) -> torch.Tensor:
    """The same metadata as a view at ``offset`` bytes into a wider buffer of random bytes (row stride + pad)."""
    n, kb = meta.shape
    buf = torch.randint(0, 256, (n, kb + offset + pad), dtype=torch.uint8)
    buf[:, offset:offset + kb] = meta
    return buf[:, offset:offset + kb]


@pytest.mark.parametrize("k", [96, 100])
@pytest.mark.parametrize("offset,pad", [(0, 0), (1, 3), (4, 0), (0, 2)])
def test_metadata_views_bounded_by_row_length(k, offset, pad):
    # the kernels bound a metadata row by its length (meta.shape[1]), not by the buffer: a view
    # into a wider buffer of random bytes, at any offset and row stride, gives the same results
    # in all three kernels (k = 100: the last K tile runs past the row)
    k_mod = skk.load("sparse24", interpret=True)
    m, n = 5, 24
    w, s, x, b = _case(m, n, k, torch.float32)
    meta = _sliced_meta(s.meta, offset, pad)
    assert torch.equal(meta, s.meta)
    out = torch.full((m, n), float("nan"))
    k_mod.sparse24_linear(x, s.values, meta, k, b, out)
    assert_close_rel(out, _ref64(x, w, b))
    dy = torch.randn(m, n)
    gx = torch.full((m, k), float("nan"))
    k_mod.sparse24_grad_input(dy, s.values, meta, k, gx)
    assert_close_rel(gx, dy.double() @ w.double(), what="grad x")
    gv = torch.full(s.values.shape, float("nan"))
    k_mod.sparse24_grad_values(dy, x, meta, k, gv)
    rw = dy.double().T @ x.double()
    assert_close_rel(gv, torch.gather(F.pad(rw, (0, s.values.shape[1] * 2 - k)), 1, s.dense_columns()),
                     what="grad values")
