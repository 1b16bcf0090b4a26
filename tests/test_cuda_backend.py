"""Tests of the csrc 2:4 GEMV kernel (``sparsekit.ops._cuda``) against dense math.

GPU tests are marked ``gpu`` and skip without CUDA or without the extension;
the CPU test checks that the backend reports itself unavailable cleanly.
"""
from __future__ import annotations

import pytest
import torch

from sparsekit.formats import Sparse24Weight
from sparsekit.ops import _cuda
from sparsekit.prune import mask_2to4

_HAS_CUDA = torch.cuda.is_available()


def _cuda_ok() -> bool:
    return _HAS_CUDA and _cuda.available()


needs_cuda_ext = pytest.mark.skipif(
    not _cuda_ok(),
    reason="needs CUDA and the sparsekit._C extension"
    + ("" if not _HAS_CUDA else f" ({_cuda.unavailable_reason()})"),
)

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _make(n: int, k: int, dtype, seed: int, bias: bool):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    s = Sparse24Weight.from_dense((w * mask_2to4(w)).to(dtype)).to("cuda")
    b = (torch.randn(n, generator=g) * 0.1).to(dtype).cuda() if bias else None
    return s, b


def _ref(x: torch.Tensor, s: Sparse24Weight, b) -> torch.Tensor:
    y = x.double() @ s.to_dense().double().T
    if b is not None:
        y = y + b.double()
    return y


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _check(out, x, s, b, dtype):
    m, n = x.shape[0], s.shape[0]
    assert out.shape == (m, n) and out.dtype == dtype and out.device == x.device
    assert bool(torch.isfinite(out).all()), "kernel left non-finite outputs"
    ref = _ref(x, s, b)
    err = _rel(out, ref)
    assert err < TOL[dtype], f"relative error {err:.3e} >= {TOL[dtype]:.0e}"
    # no worse than ~2x PyTorch doing the same dense math in the same dtype
    # (fp32 is held to its absolute bound: TF32 may be on for the peer; tiny
    # outputs are too few roundings for a ratio to mean anything)
    if dtype != torch.float32 and m * n >= 64:
        peer = x @ s.to_dense().T
        if b is not None:
            peer = peer + b
        assert err <= 2 * _rel(peer, ref) + 1e-6, f"error {err:.3e} vs torch {_rel(peer, ref):.3e}"


SHAPES_NK = [(1, 5), (17, 37), (4096 + 3, 4096 + 8), (17, 11008), (4096 + 3, 5), (1, 11008)]


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 8, 16])
@pytest.mark.parametrize("N,K", SHAPES_NK)
@pytest.mark.parametrize("bias", [False, True])
def test_sparse24_gemv_matches_dense(dtype, M, N, K, bias):
    s, b = _make(N, K, dtype, seed=1000 * M + N + K, bias=bias)
    x = torch.randn(M, K, device="cuda").to(dtype)
    out = _cuda.sparse24_linear(x, s.values, s.meta, K, b)
    torch.cuda.synchronize()
    _check(out, x, s, b, dtype)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(2, 33, 64), (5, 17, 37), (16, 300, 4104), (7, 4099, 1000)])
def test_sparse24_gemv_all_M(dtype, M, N, K):
    # every M tile (1, 2, 4, 8, 16) with a partially used tile
    for m in range(1, M + 1):
        s, b = _make(N, K, dtype, seed=m, bias=m % 2 == 0)
        x = torch.randn(m, K, device="cuda").to(dtype)
        _check(_cuda.sparse24_linear(x, s.values, s.meta, K, b), x, s, b, dtype)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sparse24_gemv_noncontiguous_x(dtype):
    M, N, K = 4, 129, 200
    s, b = _make(N, K, dtype, seed=7, bias=True)
    big = torch.randn(M, 2 * K, device="cuda").to(dtype)
    x = big[:, ::2]                         # column stride 2
    assert not x.is_contiguous()
    _check(_cuda.sparse24_linear(x, s.values, s.meta, K, b), x, s, b, dtype)
    rows = torch.randn(2 * M, K + 3, device="cuda").to(dtype)
    x2 = rows[::2, 1:K + 1]                 # row pitch 2*(K+3), unit column stride, odd offset
    _check(_cuda.sparse24_linear(x2, s.values, s.meta, K, b), x2, s, b, dtype)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sparse24_gemv_unaligned_values(dtype):
    # values that is not 16-byte aligned takes the scalar-load path
    M, N, K = 3, 65, 256
    s, b = _make(N, K, dtype, seed=11, bias=False)
    buf = torch.empty(s.values.numel() + 1, dtype=dtype, device="cuda")
    vals = buf[1:].view_as(s.values)
    vals.copy_(s.values)
    assert vals.data_ptr() % 16 != 0
    x = torch.randn(M, K, device="cuda").to(dtype)
    _check(_cuda.sparse24_linear(x, vals, s.meta, K, b), x, s, b, dtype)


@pytest.mark.gpu
@needs_cuda_ext
def test_sparse24_gemv_bad_inputs():
    K, N = 64, 32
    s, b = _make(N, K, torch.float16, seed=3, bias=True)
    x = torch.randn(_cuda.MAX_M + 1, K, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"M = 17"):
        _cuda.sparse24_linear(x, s.values, s.meta, K, b)
    x = torch.randn(2, K, device="cuda", dtype=torch.float16)
    with pytest.raises((ValueError, RuntimeError), match="CUDA"):
        _cuda.sparse24_linear(x.cpu(), s.values, s.meta, K, b)
    with pytest.raises((ValueError, RuntimeError), match="CUDA"):
        _cuda.sparse24_linear(x, s.values.cpu(), s.meta.cpu(), K, b)
    with pytest.raises((TypeError, RuntimeError), match="dtype"):
        _cuda.sparse24_linear(x.float(), s.values, s.meta, K, b)
    with pytest.raises((ValueError, RuntimeError), match="columns"):
        _cuda.sparse24_linear(x[:, :-1], s.values, s.meta, K, b)
    with pytest.raises((ValueError, RuntimeError), match="meta"):
        _cuda.sparse24_linear(x, s.values, s.meta[:, :-1], K, b)
    with pytest.raises((ValueError, RuntimeError), match="bias"):
        _cuda.sparse24_linear(x, s.values, s.meta, K, b[:-1])
    with pytest.raises((TypeError, RuntimeError), match="meta must be uint8"):
        _cuda.sparse24_linear(x, s.values, s.meta.to(torch.int16), K, b)


@pytest.mark.gpu
@needs_cuda_ext
def test_sparse24_gemv_empty_and_stream():
    s, b = _make(8, 16, torch.float16, seed=5, bias=True)
    out = _cuda.sparse24_linear(torch.empty(0, 16, device="cuda", dtype=torch.float16), s.values, s.meta, 16, b)
    assert out.shape == (0, 8)
    # runs on the current (non-default) stream
    x = torch.randn(3, 16, device="cuda", dtype=torch.float16)
    st = torch.cuda.Stream()
    with torch.cuda.stream(st):
        out = _cuda.sparse24_linear(x, s.values, s.meta, 16, b)
    st.synchronize()
    _check(out, x, s, b, torch.float16)


def test_cuda_backend_unavailable_without_cuda():
    if _HAS_CUDA:
        pytest.skip("CUDA is available here")
    assert _cuda.available() is False
    reason = _cuda.unavailable_reason()
    assert isinstance(reason, str) and reason
    assert _cuda.MAX_M == 16
    with pytest.raises(RuntimeError, match="unavailable"):
        _cuda.sparse24_linear(torch.zeros(1, 8), torch.zeros(1, 4), torch.zeros(1, 1, dtype=torch.uint8), 8, None)


def test_mma_sp_unavailable_without_cuda():
    if _HAS_CUDA:
        pytest.skip("CUDA is available here")
    assert _cuda.has_mma_sp() is False
    x = torch.zeros(32, 64, dtype=torch.float16)
    s = Sparse24Weight.from_dense(torch.zeros(16, 64, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="unavailable"):
        _cuda.sparse24_mma_sp(x, s.values, s.meta, 64, None)
    with pytest.raises(RuntimeError, match="unavailable"):
        _cuda.sparse24_mma_sp_int8(x.to(torch.int8), torch.ones(32), s.values.to(torch.int8), s.meta,
                                   torch.ones(16), 64, None, torch.float16)


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_backend_routes_by_m_and_dtype():
    from sparsekit.ops import sparse24_linear

    s, b = _make(64, 128, torch.float16, seed=9, bias=True)
    for m in (1, 16, 17, 300):                     # GEMV up to 16 rows, mma.sp GEMM above
        x = torch.randn(m, 128, device="cuda", dtype=torch.float16)
        if m > _cuda.MAX_M and not _cuda.has_mma_sp():
            continue
        _check(sparse24_linear(x, s, b, backend="cuda"), x, s, b, torch.float16)
    s32, b32 = _make(64, 128, torch.float32, seed=9, bias=True)
    with pytest.raises(ValueError, match="float32 only for M <= 16"):
        sparse24_linear(torch.randn(17, 128, device="cuda"), s32, b32, backend="cuda")
