"""sparsekit.ops._cpu_ext: the fused C per-token quantization is bit-identical to the torch-op chain it replaces."""
import math

import pytest
import torch

from sparsekit.ops import _cpu_ext

needs_ext = pytest.mark.skipif(_cpu_ext._ext is None,
                               reason=f"C extension not built: {_cpu_ext._import_error}")


def torch_chain(x, nbits):
    """The torch ops the extension replaces (the specification)."""
    qmax = float(2 ** (nbits - 1) - 1)
    amax = torch.amax(torch.abs(x), -1, keepdim=True)
    s = (amax / qmax).masked_fill_(amax == 0, 1.0)
    codes = x.div(s).round_().clamp_(-qmax, qmax)
    return codes, s


def assert_bit_identical(got, want):
    assert got.dtype == want.dtype == torch.float32
    assert got.shape == want.shape
    nan_g, nan_w = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_g, nan_w), "NaN positions differ"
    # everything that is not NaN bit for bit (stricter than torch.equal, which treats -0.0 == 0.0)
    assert torch.equal(got.masked_fill(nan_g, 0.0).view(torch.int32), want.masked_fill(nan_w, 0.0).view(torch.int32))


def check(x, nbits):
    codes, s = _cpu_ext.token_quant(x, nbits)
    ref_codes, ref_s = torch_chain(x, nbits)
    assert_bit_identical(s, ref_s)
    assert_bit_identical(codes, ref_codes)
    return codes, s


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@needs_ext
@pytest.mark.parametrize("nbits", [8, 4])
@pytest.mark.parametrize("shape", [(1, 512), (7, 1), (1, 1), (3, 5, 33), (16, 2048), (2, 3, 4, 127), (300, 4096)])
def test_random_normal(shape, nbits):
    x = torch.randn(shape, generator=_gen(hash((shape, nbits)) % 2 ** 31)) * 3.0
    codes, s = check(x, nbits)
    qmax = 2 ** (nbits - 1) - 1
    # sanity beyond bit identity: every row uses the full code range and the codes are integers
    assert torch.equal(codes.abs().amax(-1), torch.full(shape[:-1], float(qmax)))
    assert torch.equal(codes, codes.round())
    assert s.shape == shape[:-1] + (1,)


@needs_ext
@pytest.mark.parametrize("nbits", [8, 4])
def test_half_ties(nbits):
    # amax == qmax gives s == 1, so x / s lands exactly on k + 0.5: round half to even
    qmax = 2 ** (nbits - 1) - 1
    halves = torch.arange(-qmax, qmax, dtype=torch.float32) + 0.5
    x = torch.cat([torch.tensor([float(qmax)]), halves, torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, -3.5])])
    x = torch.stack([x, -x, x.flip(0)])
    codes, s = check(x, nbits)
    assert torch.equal(s, torch.ones(3, 1))
    want = torch.tensor([0.0, -0.0, 2.0, -2.0, 2.0, -4.0])  # half to even, not half away from zero
    assert torch.equal(codes[0, -6:].view(torch.int32), want.view(torch.int32))
    # ties at a scale other than 1: x = (k + 0.5) * s with s a power of two
    y = torch.cat([torch.tensor([qmax * 0.25]), (torch.arange(-qmax, qmax, dtype=torch.float32) + 0.5) * 0.25])
    check(y.unsqueeze(0), nbits)


@needs_ext
@pytest.mark.parametrize("nbits", [8, 4])
def test_special_rows(nbits):
    g = _gen(1)
    k = 37
    rows = [torch.randn(k, generator=g) for _ in range(8)]
    rows[0].zero_()                                    # all zero: scale 1, codes 0
    rows[1][5] = math.inf                              # +Inf: scale Inf, codes NaN / clamp
    rows[2][0] = -math.inf                             # -Inf
    rows[3][k - 1] = math.nan                          # NaN: scale NaN, codes NaN
    rows[4][3] = math.nan
    rows[4][7] = math.inf
    rows[5] = torch.randn(k, generator=g) * 1e-40      # subnormal only (amax / qmax may flush to 0 or stay tiny)
    rows[6] = torch.randn(k, generator=g).sign() * 3e38  # huge
    rows[7].fill_(-0.0)                                # negative zeros
    x = torch.stack(rows)
    check(x, nbits)
    # each special row on its own too (one-row calls take the same loop, but a different torch broadcast)
    for r in rows:
        check(r.unsqueeze(0), nbits)
    # the smallest subnormals: amax / qmax underflows to 0, x / 0 is +-Inf (clamped) and 0 / 0 NaN
    tiny = torch.tensor([[1e-45, -1e-45, 0.0, 2e-45], [1.4e-45, 0.0, 0.0, 0.0]])
    codes, s = check(tiny, nbits)
    assert bool((s == 0).all()) and bool(torch.isnan(codes[1, 1:]).all())
    check(torch.full((2, 9), math.inf), nbits)
    check(torch.full((2, 9), math.nan), nbits)


@needs_ext
@pytest.mark.parametrize("nbits", [8, 4])
def test_empty_and_layouts(nbits):
    for shape in [(0, 8), (2, 0, 5), (0, 1)]:
        x = torch.randn(shape)
        codes, s = check(x, nbits)
        assert codes.shape == shape and s.shape == shape[:-1] + (1,)
    x = torch.randn(5)  # 1-D: one row
    check(x, nbits)
    # non-contiguous input (transposed, sliced) is made contiguous by the wrapper
    base = torch.randn(64, 48, generator=_gen(2))
    check(base.t(), nbits)
    check(base[::3, 1::2], nbits)
    check(base[5:9], nbits)  # storage offset
    # input left untouched
    before = base.clone()
    _cpu_ext.token_quant(base, nbits)
    assert torch.equal(base, before)


@needs_ext
@pytest.mark.parametrize("nbits", [8, 4])
def test_near_ties(nbits):
    # values at and one ulp either side of (k + 0.5) * s for random scales: here x / s and x * (1 / s) round
    # differently (hundreds of codes), so only a true division is bit-identical
    qmax = 2 ** (nbits - 1) - 1
    g = _gen(3 + nbits)
    amax = torch.exp(torch.randn(64, 1, generator=g) * 5)
    s = amax / qmax
    t = (torch.randint(-qmax, qmax, (64, 254), generator=g).float() + 0.5) * s
    for v in (torch.nextafter(t, torch.full_like(t, -math.inf)), t, torch.nextafter(t, torch.full_like(t, math.inf))):
        x = torch.cat([amax, v], 1)
        _, got_s = check(x, nbits)
        assert torch.equal(got_s, s)


@needs_ext
@pytest.mark.parametrize("nbits", [8, 4])
def test_tensor_constant_chain(nbits):
    # the same chain with 0-d tensor constants (as the CPU fast path writes it) gives the same bits
    qmax, nqmax, zero = (torch.tensor(float(2 ** (nbits - 1) - 1)), torch.tensor(float(1 - 2 ** (nbits - 1))),
                         torch.tensor(0.0))
    g = _gen(7)
    x = torch.randn(33, 257, generator=g) * torch.exp(torch.randn(33, 1, generator=g) * 10)
    x[0] = 0.0
    x[1, 4] = math.nan
    x[2, 9] = -math.inf
    amax = torch.amax(torch.abs(x), -1, True)
    s = (amax / qmax).masked_fill_(amax == zero, 1.0)
    want = x.div(s).round_().clamp_(nqmax, qmax)
    codes, got_s = _cpu_ext.token_quant(x, nbits)
    assert_bit_identical(got_s, s)
    assert_bit_identical(codes, want)


@needs_ext
def test_many_random_seeds():
    # wide dynamic range per row, odd K, both bit widths: hunting for any 1-ulp mismatch
    for seed in range(20):
        g = _gen(100 + seed)
        k = int(torch.randint(1, 300, (1,), generator=g))
        x = torch.randn(13, k, generator=g) * torch.exp(torch.randn(13, 1, generator=g) * 20)
        check(x, 8)
        check(x, 4)


@needs_ext
def test_runtime_opt_out(monkeypatch):
    x = torch.randn(2, 8)
    monkeypatch.setenv("SPARSEKIT_CPU_EXT", "0")
    assert not _cpu_ext.available()
    assert "SPARSEKIT_CPU_EXT=0" in _cpu_ext.unavailable_reason()
    with pytest.raises(RuntimeError, match="not available"):
        _cpu_ext.token_quant(x, 8)
    monkeypatch.setenv("SPARSEKIT_CPU_EXT", "1")
    assert _cpu_ext.available() and _cpu_ext.unavailable_reason() is None
    check(x, 8)
    monkeypatch.delenv("SPARSEKIT_CPU_EXT")
    assert _cpu_ext.available()
    monkeypatch.setenv("SPARSEKIT_CPU_EXT", "maybe")
    with pytest.raises(ValueError, match="SPARSEKIT_CPU_EXT"):
        _cpu_ext.available()


def test_unavailable_raises(monkeypatch):
    monkeypatch.setattr(_cpu_ext, "_ext", None)
    monkeypatch.setattr(_cpu_ext, "_import_error", "not built (test)")
    assert not _cpu_ext.available()
    with pytest.raises(RuntimeError, match="not built"):
        _cpu_ext.token_quant(torch.randn(2, 8), 8)


@needs_ext
def test_wrapper_errors():
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match="float32"):
        _cpu_ext.token_quant(x.double(), 8)
    with pytest.raises(TypeError, match="float32"):
        _cpu_ext.token_quant(x.half(), 8)
    with pytest.raises(TypeError, match="torch.Tensor"):
        _cpu_ext.token_quant(x.numpy(), 8)
    with pytest.raises(ValueError, match="nbits"):
        _cpu_ext.token_quant(x, 3)
    with pytest.raises(ValueError, match="nbits"):
        _cpu_ext.token_quant(x, 8.0)
    with pytest.raises(ValueError, match="last dimension"):
        _cpu_ext.token_quant(torch.randn(3, 0), 8)
    with pytest.raises(ValueError, match="last dimension"):
        _cpu_ext.token_quant(torch.tensor(1.0), 8)
    if torch.device("meta").type == "meta":
        with pytest.raises(ValueError, match="CPU"):
            _cpu_ext.token_quant(torch.empty(3, 8, device="meta"), 8)


@needs_ext
def test_raw_function_checks_its_sizes():
    ext = _cpu_ext._ext
    with pytest.raises(TypeError, match="6 arguments"):
        ext.token_quant(0, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="k >= 1"):
        ext.token_quant(0, 0, 0, 0, 0, 127)
    with pytest.raises(ValueError, match="null data pointer"):
        ext.token_quant(0, 0, 0, 1, 4, 127)
    ext.token_quant(0, 0, 0, 0, 4, 127)  # zero rows: nothing is touched
