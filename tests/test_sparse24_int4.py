"""2:4 + int4 (Sparse24Int4Weight, sparse24_int4_linear, SparseQLinear): the Triton kernel
(interpreter on CPU, compiled on GPU) vs the dense math of the same dequantized 2:4 weight."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit.kernels as skk
from sparsekit.formats.int4 import Int4Weight
from sparsekit.formats.sparse24 import Sparse24Weight
from sparsekit.formats.sparse24_int4 import Sparse24Int4Weight, compressed_group_size, k_padded16
from sparsekit.nn import SparseQLinear
from sparsekit.ops.sparse24_int4 import sparse24_int4_linear, sparse24_int4_linear_packed
from sparsekit.prune import is_2to4, mask_2to4
from sparsekit.testing import (assert_all_written, assert_close_rel, assert_within_torch_error, noncontiguous,
                               poison_outputs, random_2to4)

DTYPES = [torch.float16, torch.bfloat16]


def _case(m, n, k, dtype, group_size=None, symmetric=False, bias=True, lead=(), xdtype=None, device="cpu"):
    w = random_2to4(n, k) * k ** -0.5
    q = Sparse24Int4Weight.from_dense(w, group_size=group_size, symmetric=symmetric, dtype=dtype).to(device)
    xdtype = xdtype or dtype
    x = torch.randn(*lead, m, k).to(dtype=xdtype, device=device)
    b = (torch.randn(n) * 0.1).to(dtype=xdtype, device=device) if bias else None
    return q, x, b


def _check(y, x, q, b):
    assert_all_written(y)
    w = q.to_dense()
    ref = x.double() @ w.double().T + (b.double() if b is not None else 0)
    assert_close_rel(y, ref)
    assert_within_torch_error(y, ref, F.linear(x, w.to(x.dtype), b))


# ------------------------------------------------------------------ format
@pytest.mark.parametrize("n,k", [(1, 8), (5, 7), (17, 37), (33, 100), (65, 129), (8, 256)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_format_keeps_mask_and_rounds_kept_values(n, k, symmetric):
    w = torch.randn(n, k)
    mask = mask_2to4(w)
    q = Sparse24Int4Weight.from_dense(w, mask=mask, symmetric=symmetric)
    assert q.qweight.shape == (n, k_padded16(k) // 16) and q.meta.shape == (n, k_padded16(k) // 8)
    d = q.to_dense()
    assert d.shape == (n, k) and d.dtype == torch.float16
    assert is_2to4(d) and not bool((d != 0)[~mask].any())
    # the kept values are exactly the RTN int4 of the 2:4 values matrix
    sp = Sparse24Weight.from_dense(F.pad(w * mask, (0, k_padded16(k) - k)))
    ref = Int4Weight.from_float(sp.values, q.effective_group_size, symmetric, dtype=torch.float16).dequantize()
    assert torch.equal(q.values(), ref)
    assert bool((q.mask() | (d == 0)).all())    # every non-zero sits at a stored position
    assert q.nbytes() < 0.2 * n * k * 2 + 64 * n  # << fp16 dense


def test_group_size_choice_and_errors():
    assert compressed_group_size(256) == 128 and compressed_group_size(192) == 32 and compressed_group_size(40) == -1
    assert compressed_group_size(512, 64) == 64
    with pytest.raises(ValueError, match="multiple"):
        compressed_group_size(100, 32)       # KC = 56
    with pytest.raises(ValueError, match="group_size"):
        compressed_group_size(256, 48)
    w = torch.randn(4, 16)
    with pytest.raises(ValueError, match="not 2:4"):
        Sparse24Int4Weight.from_dense(w)
    with pytest.raises(ValueError, match="mask shape"):
        Sparse24Int4Weight.from_dense(w, mask=torch.ones(4, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        Sparse24Int4Weight.from_dense(w, mask=mask_2to4(w), dtype=torch.float32)
    with pytest.raises(ValueError, match="2-D"):
        Sparse24Int4Weight.from_dense(torch.randn(16))


# ------------------------------------------------------------------ kernel vs dense
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n,k", [(1, 64), (17, 37), (33, 160), (20, 512)])
def test_forward_interpret_matches_dense(m, n, k, dtype):
    q, x, b = _case(m, n, k, dtype, bias=(n % 2 == 1), symmetric=(m == 3))
    with poison_outputs():
        y = sparse24_int4_linear(x, q, b, backend="interpret")
    assert y.shape == (m, n) and y.dtype == dtype
    _check(y, x, q, b)


@pytest.mark.parametrize("wdtype", DTYPES)
def test_float32_activations(wdtype):
    q, x, b = _case(5, 19, 96, wdtype, xdtype=torch.float32)
    with poison_outputs():
        y = sparse24_int4_linear(x, q, b, backend="interpret")
    assert y.dtype == torch.float32
    _check(y, x, q, b)


@pytest.mark.parametrize("group_size,k", [(32, 128), (64, 256), (-1, 96)])
def test_group_sizes_and_batch_dims_and_strides(group_size, k):
    q, x, b = _case(3, 21, k, torch.float16, group_size=group_size, lead=(2,))
    xs = noncontiguous(x)
    with poison_outputs():
        y = sparse24_int4_linear(xs, q, b, backend="interpret")
    assert y.shape == (2, 3, 21)
    _check(y, xs, q, b)


@pytest.mark.parametrize("m", [4, 40, 200])
def test_gpu_configs_run_in_the_interpreter(m):
    """The launch configs the GPU would use (split-K for small M), run through the interpreter."""
    kern = skk.load("sparse24_int4", interpret=True)
    n, k = 48, 512
    q, x, b = _case(m, n, k, torch.float16)
    cfg = kern.fwd_config(m, n, k, q.effective_group_size, num_sms=4)
    cfg = {key: v for key, v in cfg.items() if key not in ("num_warps", "num_stages")}
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], 32)
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], 32)
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 128)
    out = torch.full((m, n), float("nan"), dtype=torch.float16)
    kern.sparse24_int4_linear(x, q.qweight, q.scales, q.zeros, q.meta, q.effective_group_size, k, b, out, config=cfg)
    _check(out, x, q, b)


def test_reference_backend_and_autograd():
    q, x, b = _case(4, 12, 64, torch.float16, xdtype=torch.float32)
    x.requires_grad_(True)
    b.requires_grad_(True)
    y = sparse24_int4_linear(x, q, b, backend="reference")
    _check(y.detach(), x.detach(), q, b.detach())
    y.square().sum().backward()
    w = q.to_dense().float()
    torch.testing.assert_close(x.grad, (2 * y.detach()) @ w)
    torch.testing.assert_close(b.grad, (2 * y.detach()).sum(0))


def test_bad_inputs():
    q, x, b = _case(2, 8, 64, torch.float16)
    with pytest.raises(ValueError, match="in_features=64"):
        sparse24_int4_linear(torch.randn(2, 63).half(), q, backend="interpret")
    with pytest.raises(TypeError, match="scale dtype"):
        sparse24_int4_linear(x.bfloat16(), q, backend="interpret")
    with pytest.raises(TypeError, match="Sparse24Int4Weight"):
        sparse24_int4_linear(x, q.sparse24(), backend="interpret")
    with pytest.raises(ValueError, match="bias"):
        sparse24_int4_linear(x, q, torch.zeros(7).half(), backend="interpret")
    with pytest.raises(ValueError, match="meta"):
        sparse24_int4_linear_packed(x, q.qweight, q.scales, q.zeros, q.meta[:, :-1], q.effective_group_size, 64)
    with pytest.raises(ValueError, match="triton"):
        sparse24_int4_linear(x, q, backend="triton")   # CPU tensors


def test_opcheck():
    q, x, b = _case(3, 8, 64, torch.float16)
    for backend in ("reference", "interpret"):
        torch.library.opcheck(torch.ops.sparsekit.sparse24_int4_linear.default,
                              (x, q.qweight, q.scales, q.zeros, q.meta, q.effective_group_size, 64, b, backend))


# ------------------------------------------------------------------ module
def test_sparse_qlinear_module_round_trip():
    torch.manual_seed(0)
    lin = nn.Linear(72, 30)
    mod = SparseQLinear.from_dense(lin, backend="interpret")
    assert compressed_group_size(72) == -1 and mod.group_size == 40   # one group: KC = 80 / 2
    x = torch.randn(2, 5, 72).half()
    with poison_outputs():
        y = mod(x)
    dense = mod.to_dense()
    assert isinstance(dense, nn.Linear) and is_2to4(dense.weight)
    assert_close_rel(y, dense.double()(x.double()))
    # magnitude 2:4 then int4: close to the masked float layer
    ref = F.linear(x.float(), lin.weight * mask_2to4(lin.weight), lin.bias)
    assert (y.float() - ref).norm() / ref.norm() < 0.1
    other = SparseQLinear(72, 30, backend="interpret")
    other.load_state_dict(mod.state_dict())
    assert torch.equal(other(x), y)
    assert "2:4" in repr(mod)
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseQLinear.from_dense(nn.Conv2d(3, 3, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 16, 64, 333])
def test_triton_gpu_matches_dense(m, dtype):
    q, x, b = _case(m, 4096 + 17, 4096, dtype, group_size=64, device="cuda")
    with poison_outputs():
        y = sparse24_int4_linear(x, q, b, backend="triton")
    _check(y, x, q, b)
