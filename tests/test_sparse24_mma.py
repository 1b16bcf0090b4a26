"""The mma.sp path: metadata reorder, the CPU emulator of the kernel's warp-level
data flow, the int8 2:4 format/op/module, and (GPU only) the csrc kernel.

The emulator (``sparsekit/ops/_mma_sp_emulator.py``) replays what each lane of
``csrc/sparse24/sparse24_mma_sp.cu`` loads and what ``mma.sp`` does with it, per
the PTX ISA; agreeing with dense math on odd shapes is the CPU evidence that
the kernel's indexing (reorder, ldmatrix addresses, selectors, epilogue,
padding) is right.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsekit.formats.sparse24 import (MMA_K_WINDOW, Sparse24Int8Weight, Sparse24Weight, cached_mma_sp_meta,
                                        mma_sp_meta)
from sparsekit.ops import _cuda
from sparsekit.ops import _mma_sp_emulator as emu
from sparsekit.ops.act_quant import per_token_quant_reference
from sparsekit.ops.sparse24_int8 import sparse24_int8_linear
from sparsekit.testing import assert_all_written, assert_close_rel, poison_outputs, random_2to4, rel_err

# (M, N, K): size 1, primes, non-multiples of 8/16/64/128, K < one window, several windows
SHAPES = [(1, 1, 8), (1, 17, 5), (13, 37, 100), (9, 16, 64), (17, 33, 130), (8, 50, 264), (3, 19, 200)]


def _weight(n, k, dtype=torch.float32, gen=None):
    w = random_2to4(n, k, dtype=torch.float32, generator=gen)
    # some groups with fewer than two non-zeros (padding codes, zero values)
    w[:, 1:4] = 0
    return w.to(dtype), Sparse24Weight.from_dense(w.to(dtype))


# ------------------------------------------------------------------ metadata reorder
def test_mma_meta_shape_padding_and_word_formula():
    n, k = 19, 100
    w, s = _weight(n, k)
    words = mma_sp_meta(s.meta, k)
    assert words.dtype == torch.int32 and words.is_contiguous()
    assert tuple(words.shape) == (2, 2, 32)               # ceil(19/16) tiles, ceil(100/64) windows, 32 lanes
    u = words.to(torch.int64) & 0xFFFFFFFF
    meta = s.meta.to(torch.int64)

    def H(r, b):  # row r's 16-bit metadata of dense columns 16b..16b+15 (padding: code (0,1))
        if r >= n or 2 * b >= meta.shape[1]:
            return 0x4444
        lo = int(meta[r, 2 * b])
        hi = int(meta[r, 2 * b + 1]) if 2 * b + 1 < meta.shape[1] else 0x44
        return lo | hi << 8

    for tile in range(2):
        for win in range(2):
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                want = H(16 * tile + g, 4 * win + t) | H(16 * tile + g + 8, 4 * win + t) << 16
                assert int(u[tile, win, lane]) == want, (tile, win, lane)


def test_mma_meta_padding_codes_are_valid_and_k_multiple():
    _, s = _weight(5, 8)
    words = mma_sp_meta(s.meta, 8, 128) .to(torch.int64) & 0xFFFFFFFF
    assert tuple(words.shape) == (1, 2, 32)
    nib = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], -1)
    assert bool(((nib & 3) != (nib >> 2)).all()), "every code must name two distinct positions"
    with pytest.raises(ValueError, match="multiple of 64"):
        mma_sp_meta(s.meta, 8, 96)
    with pytest.raises(ValueError, match="bytes per row"):
        mma_sp_meta(s.meta, 100)
    with pytest.raises(TypeError):
        mma_sp_meta(s.meta.to(torch.int32), 8)


def test_mma_meta_cache_follows_inplace_changes():
    _, s = _weight(16, 64)
    a = s.mma_meta()
    assert s.mma_meta() is a                              # cached on the metadata tensor
    _, s2 = _weight(16, 64, gen=torch.Generator().manual_seed(99))
    s.meta.copy_(s2.meta)                                 # in-place change bumps the version
    b = s.mma_meta()
    assert b is not a and torch.equal(b, mma_sp_meta(s2.meta, 64))
    assert cached_mma_sp_meta(s.meta, 64) is b


# ------------------------------------------------------------------ emulator vs dense math
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_f16_kernel_matches_dense(m, n, k, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    w, s = _weight(n, k, dtype, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    y = emu.emulate_sparse24_linear(x, s, b)
    ref = x.double() @ w.double().T + b.double()
    # float64 sums of exactly representable products: only summation-order rounding
    assert rel_err(y, ref) < 1e-12


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_emulated_s8_kernel_is_exact(m, n, k):
    gen = torch.Generator().manual_seed(7 * m + n + k)
    w, s = _weight(n, k, torch.float32, gen)
    q = Sparse24Int8Weight.from_sparse24(s)
    xq = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    xs = torch.rand(m, generator=gen) + 0.1
    bias = torch.randn(n, generator=gen)
    acc, y = emu.emulate_sparse24_int8_linear(xq, xs, q, bias)
    ref = xq.double() @ q.int_dense().double().T
    assert torch.equal(acc, ref)                          # int32 accumulation is exact
    torch.testing.assert_close(y, ref * xs.double()[:, None] * q.scale.double()[None, :] + bias.double())


def test_emulator_detects_layout_mistakes():
    # the emulation is sensitive: the raw (unreordered) metadata, a swapped
    # selector or a wrong ldmatrix address all give wrong results
    gen = torch.Generator().manual_seed(5)
    w, s = _weight(32, 128, torch.float32, gen)
    x = torch.randn(8, 128, generator=gen)
    ref = x.double() @ w.double().T
    good = emu.emulate_sparse24_linear(x, s)
    assert rel_err(good, ref) < 1e-12
    raw = s.meta.to(torch.int64).reshape(2, 16, -1)      # bytes as if they were lane words
    bogus = torch.zeros(2, 2, 32, dtype=torch.int32)
    bogus.view(torch.uint8).view(2, 2, 128)[:] = raw.reshape(2, 16, 2, 8).permute(0, 2, 1, 3).reshape(2, 2, 128).to(torch.uint8)
    try:
        assert rel_err(emu.emulate_sparse24_linear(x, s, meta_words=bogus), ref) > 1e-2
    except ValueError:
        pass                                              # or an invalid code (undefined behaviour)
    orig = emu.step_selector
    try:
        emu.step_selector = lambda kind, kd: (kd // MMA_K_WINDOW, 1 - (kd % MMA_K_WINDOW) // 32)
        assert rel_err(emu.emulate_sparse24_linear(x, s), ref) > 1e-2
    finally:
        emu.step_selector = orig
    orig_row = emu.a_ldsm_row
    try:
        emu.a_ldsm_row = lambda lane: (lane & 7) + (lane >> 4) * 8   # row halves swapped
        assert rel_err(emu.emulate_sparse24_linear(x, s), ref) > 1e-2
    finally:
        emu.a_ldsm_row = orig_row


def test_ldmatrix_emulation_follows_ptx():
    # lane i's register j = word i%4 of row i//4 of matrix j (rows addressed by lanes 8j..8j+7)
    tile = torch.arange(16 * 8, dtype=torch.float64).reshape(16, 8, 1)   # 16 rows x 8 words
    lane = torch.arange(32)
    regs = emu.ldmatrix_x4(tile, emu.a_ldsm_row(lane), emu.a_ldsm_chunk(lane))
    for i in range(32):
        for j in range(4):
            row = (i // 4) + 8 * (j % 2)
            word = (i % 4) + 4 * (j // 2)
            assert regs[i, j, 0] == tile[row, word, 0]


# ------------------------------------------------------------------ int8 2:4 format / op / module
def test_int8_weight_roundtrip_and_validation():
    w, s = _weight(33, 100)
    q = Sparse24Int8Weight.from_dense(w)
    assert q.values.dtype == torch.int8 and q.scale.shape == (33,)
    assert torch.equal(q.meta, s.meta)
    deq = q.to_dense()
    assert bool((deq[w == 0] == 0).all())                 # the 2:4 pattern is kept
    assert rel_err(deq, w) < 1e-2                         # per-channel int8 rounding
    assert torch.equal(q.int_dense() != 0, (q.int_dense() != 0) & (w != 0))
    with pytest.raises(TypeError, match="int8"):
        Sparse24Int8Weight(q.values.float(), q.meta, q.scale, q.shape)
    with pytest.raises(ValueError, match="scale"):
        Sparse24Int8Weight(q.values, q.meta, q.scale[:-1], q.shape)
    with pytest.raises(ValueError, match="not 2:4"):
        Sparse24Int8Weight.from_dense(torch.randn(4, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "dense"])
def test_int8_op_matches_fake_quant_math(dtype, backend):
    gen = torch.Generator().manual_seed(3)
    w, _ = _weight(37, 100, torch.float32, gen)
    q = Sparse24Int8Weight.from_dense(w)
    x = torch.randn(2, 5, 100, generator=gen).to(dtype)
    b = torch.randn(37, generator=gen).to(dtype)
    y = sparse24_int8_linear(x, q, b, backend=backend)
    assert y.shape == (2, 5, 37) and y.dtype == dtype
    xq, xs = per_token_quant_reference(x.reshape(-1, 100), 8)
    ref = (xq.double() @ q.int_dense().double().T) * xs.double() * q.scale.double() + b.double()
    assert_close_rel(y.reshape(-1, 37), ref, dtype)
    # and close to the float layer (activation + weight rounding only)
    assert rel_err(y.reshape(-1, 37), x.reshape(-1, 100).double() @ w.double().T + b.double()) < 3e-2


@pytest.mark.parametrize("m,n,k", [(1, 1, 8), (13, 37, 100), (17, 33, 130), (3, 19, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_triton_kernel_interpreted(m, n, k, dtype):
    gen = torch.Generator().manual_seed(m + 31 * n + k)
    w, _ = _weight(n, k, torch.float32, gen)
    q = Sparse24Int8Weight.from_dense(w)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    with poison_outputs():
        y = sparse24_int8_linear(x, q, b, backend="interpret")
    assert_all_written(y)
    ref = sparse24_int8_linear(x, q, b, backend="reference")
    # the int32 accumulation is exact; the epilogue rounds once (fp32 math, then the output dtype)
    exact = (per_token_quant_reference(x, 8)[0].double() @ q.int_dense().double().T
             * per_token_quant_reference(x, 8)[1].double() * q.scale.double() + b.double())
    assert_close_rel(y, exact, dtype)
    assert rel_err(y, ref.double()) <= max(2 * rel_err(ref, exact), 1e-6)


def test_int8_op_emulated_kernel_equals_reference():
    # the s8 kernel emulation on the op's own quantized operands = the reference op
    gen = torch.Generator().manual_seed(4)
    w, _ = _weight(21, 136, torch.float32, gen)
    q = Sparse24Int8Weight.from_dense(w)
    x = torch.randn(11, 136, generator=gen)
    xq, xs = per_token_quant_reference(x, 8)
    _, y_emu = emu.emulate_sparse24_int8_linear(xq, xs.reshape(-1), q)
    y_ref = sparse24_int8_linear(x, q, backend="reference")
    torch.testing.assert_close(y_emu.float(), y_ref, rtol=1e-6, atol=1e-6)


def test_int8_op_bad_inputs_and_dispatch():
    from sparsekit.ops import dispatch

    w, _ = _weight(8, 16)
    q = Sparse24Int8Weight.from_dense(w)
    with pytest.raises(ValueError, match="in_features"):
        sparse24_int8_linear(torch.randn(2, 15), q)
    with pytest.raises(TypeError, match="float16"):
        sparse24_int8_linear(torch.randn(2, 16).double(), q)
    with pytest.raises(TypeError, match="Sparse24Int8Weight"):
        sparse24_int8_linear(torch.randn(2, 16), Sparse24Weight.from_dense(w))
    with pytest.raises(ValueError, match="bias"):
        sparse24_int8_linear(torch.randn(2, 16), q, torch.zeros(7))
    assert dispatch.resolve("sparse24_int8_linear", "cpu") == "dense"       # the CPU default (cached expansion)
    with pytest.raises(ValueError, match="no 'cusparselt' backend"):
        sparse24_int8_linear(torch.randn(2, 16), q, backend="cusparselt")
    with pytest.raises(ValueError, match="CUDA tensors"):
        sparse24_int8_linear(torch.randn(2, 16), q, backend="triton")
    empty = sparse24_int8_linear(torch.randn(0, 16), q)
    assert empty.shape == (0, 8)


def test_sparse_linear_act_bits_8():
    from sparsekit.nn.sparse_linear import SparseLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 33)
    mod = SparseLinear.from_dense(lin, act_bits=8)
    assert mod.values.dtype == torch.int8 and mod.w_scale.dtype == torch.float32
    assert "act_bits=8" in repr(mod)
    assert not any(p.dtype == torch.int8 for p in mod.parameters())
    x = torch.randn(3, 7, 100)
    y = mod(x)
    fq = mod.weight_format()
    assert isinstance(fq, Sparse24Int8Weight)
    assert torch.equal(y, sparse24_int8_linear(x, fq, mod.bias, backend="dense"))      # CPU's default
    assert rel_err(y, sparse24_int8_linear(x, fq, mod.bias, backend="reference")) < 1e-6
    dense = mod.to_dense()
    assert rel_err(y, dense(x)) < 2e-2
    sd = mod.state_dict()
    assert set(sd) == {"values", "w_scale", "meta_codes", "bias"}
    mod2 = SparseLinear(100, 33, act_bits=8)
    mod2.load_state_dict(sd)
    assert torch.equal(mod2(x), y)
    with pytest.raises(ValueError, match="act_bits"):
        SparseLinear.from_dense(lin, act_bits=4)


# ------------------------------------------------------------------ GPU: the csrc kernel
_HAS_CUDA = torch.cuda.is_available()


def _mma_ok() -> bool:
    return _HAS_CUDA and _cuda.available() and _cuda.has_mma_sp()


needs_mma = pytest.mark.skipif(not _mma_ok(), reason="needs CUDA and sparsekit._C with the mma.sp GEMM")
GPU_SHAPES = [(17, 1, 8), (33, 37, 100), (64, 129, 264), (65, 96, 64), (100, 4099, 4104), (300, 1000, 11008),
              (1000, 257, 130), (4099, 64, 1024)]


@pytest.mark.gpu
@needs_mma
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
@pytest.mark.parametrize("tile", [-1, 0, 1, 2])
def test_mma_sp_kernel_matches_dense(m, n, k, dtype, tile):
    from sparsekit.testing import assert_within_torch_error

    gen = torch.Generator().manual_seed(m + n + k)
    w, s = _weight(n, k, dtype, gen)
    s = s.to("cuda")
    w = w.cuda()
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    b = torch.randn(n, generator=gen).to(dtype).cuda()
    with poison_outputs():
        y = _cuda.sparse24_mma_sp(x, s.values, s.meta, k, b, tile_config=tile)
    torch.cuda.synchronize()
    assert_all_written(y)
    ref = x.double() @ w.double().T + b.double()
    assert_close_rel(y, ref, dtype)
    assert_within_torch_error(y, ref, F.linear(x, w, b))


@pytest.mark.gpu
@needs_mma
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_sp_via_op_noncontiguous_and_batched(dtype):
    from sparsekit.ops import sparse24_linear

    w, s = _weight(96, 200, dtype)
    s, w = s.to("cuda"), w.cuda()
    x = torch.randn(3, 400, 70, device="cuda").to(dtype)[:, ::2, :].transpose(1, 2)  # (3, 70, 200) strided
    y = sparse24_linear(x, s, None, backend="cuda")
    assert_close_rel(y, x.double() @ w.double().T, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("out", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 17, 100), (33, 37, 264), (300, 4099, 4104)])
def test_int8_triton_kernel_gpu(m, n, k, out):
    gen = torch.Generator().manual_seed(m + n + k)
    w, _ = _weight(n, k, torch.float32, gen)
    q = Sparse24Int8Weight.from_dense(w).to("cuda")
    x = torch.randn(m, k, generator=gen).to(out).cuda()
    with poison_outputs():
        y = sparse24_int8_linear(x, q, None, backend="triton")
    assert_all_written(y)
    assert_close_rel(y, sparse24_int8_linear(x, q, None, backend="reference").double(), out)


@pytest.mark.gpu
@needs_mma
@pytest.mark.parametrize("out", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,n,k", [(1, 17, 100), (33, 37, 264), (300, 4099, 4104), (129, 1000, 11008)])
def test_mma_sp_int8_kernel_matches_fake_quant(m, n, k, out):
    gen = torch.Generator().manual_seed(m * n + k)
    w, _ = _weight(n, k, torch.float32, gen)
    q = Sparse24Int8Weight.from_dense(w).to("cuda")
    x = torch.randn(m, k, generator=gen).to(out).cuda()
    b = torch.randn(n, generator=gen).to(out).cuda()
    y = sparse24_int8_linear(x, q, b, backend="cuda")
    ref = sparse24_int8_linear(x, q, b, backend="reference")
    assert y.dtype == out
    assert_close_rel(y, ref.double(), out if out != torch.float32 else torch.float16)


# ------------------------------------------------------------------ operand preparation (plain torch, CPU)
def test_mma_operand_padding_is_cached_and_zero_filled():
    _, s = _weight(9, 100, torch.float16)
    kpad = 128
    v = _cuda.mma_values(s.values, kpad)
    assert v.shape == (9, 64) and v.is_contiguous()
    c = s.values.shape[1]                                         # Kp/2 = 52
    assert torch.equal(v[:, :c], s.values) and bool((v[:, c:] == 0).all())
    assert _cuda.mma_values(s.values, kpad) is v                  # padded once per tensor
    _, s64 = _weight(9, 128, torch.float16)
    if s64.values.data_ptr() % 16 == 0:
        assert _cuda.mma_values(s64.values, 128) is s64.values    # already in the kernel's layout
    x = torch.randn(5, 100, dtype=torch.float16)
    xk, kx = _cuda._mma_x(x, 100, kpad, 8)                       # K % 8 != 0: zero-padded copy
    assert kx == kpad and torch.equal(xk[:, :100], x) and bool((xk[:, 100:] == 0).all())
    x2 = torch.randn(5, 128, dtype=torch.float16)
    if x2.data_ptr() % 16 == 0:
        assert _cuda._mma_x(x2, 128, 128, 8) == (x2, 128)


def test_int8_bench_rows_dry_run_on_cpu():
    from sparsekit.bench import harness, sparse24 as bench

    rows = bench.run_int8(shapes=[(24, 40)], ms=[1, 20], device="cpu", timer=harness.time_rotating_cpu,
                          warmup_ms=0.5, rep_ms=1, log=lambda *a: None)
    assert {(r.backend, r.status) for r in rows} == {("cuda", "skip"), ("triton", "skip"), ("dense", "skip")}
    assert all(r.op == "sparse24_int8_linear" and r.dtype == "int8" and r.note for r in rows)


def test_kernel_source_uses_the_emulated_formulas():
    # the CUDA kernel carries the emulator's index formulas verbatim; editing one
    # side without the other fails here (the emulator test then covers the kernel)
    import inspect
    import os

    src = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "csrc", "sparse24", "sparse24_mma_sp.cu")).read()
    for line in ("const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8;", "const int a_chunk = lane >> 4;",
                 "const int b_row = lane & 7;", "const int b_chunk = lane >> 3;",
                 "MmaSp<T, 0>::run(acc[i][j], a[i], b[j], e[i]);", "MmaSp<T, 1>::run(acc[i][j], a[i], b[j], e[i]);",
                 "e[i] = m_s[tl * 32 + lane];", "e[i] = m_s[tl * 64 + step * 32 + lane];",
                 "const int64_t n = n0 + warp_n * C::WN + 16 * i + g + 8 * h;",
                 "const int64_t m = m0 + warp_m * C::WM + 8 * j + 2 * t + c;"):
        assert line in src, line
    for fn, expr in ((emu.a_ldsm_row, "(lane & 7) + ((lane >> 3) & 1) * 8"), (emu.a_ldsm_chunk, "lane >> 4"),
                     (emu.b_ldsm_row, "lane & 7"), (emu.b_ldsm_chunk, "lane >> 3")):
        assert f"return {expr}" in inspect.getsource(fn)
    g, t = 3, 2
    assert [tuple(int(v) for v in emu.epilogue_coords(torch.tensor(4 * g + t), i)) for i in range(4)] == \
        [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]
