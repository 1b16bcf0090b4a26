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
    with pytest.raises(TypeError, match="6 or 7 arguments"):
        ext.token_quant(0, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="mode must be"):
        ext.token_quant(0, 0, 0, 0, 4, 127, 3)
    with pytest.raises(ValueError, match="k >= 1"):
        ext.token_quant(0, 0, 0, 0, 0, 127)
    with pytest.raises(ValueError, match="null data pointer"):
        ext.token_quant(0, 0, 0, 1, 4, 127)
    ext.token_quant(0, 0, 0, 0, 4, 127)  # zero rows: nothing is touched
    ext.token_quant(0, 0, 0, 0, 4, 127, 1)
    with pytest.raises(TypeError, match="3 arguments"):
        ext.round_(0, 0)
    with pytest.raises(ValueError, match="mode 1"):
        ext.round_(0, 0, 0)
    with pytest.raises(ValueError, match="n >= 0"):
        ext.round_(0, -1, 1)
    with pytest.raises(ValueError, match="null data pointer"):
        ext.round_(0, 3, 2)
    ext.round_(0, 0, 2)  # zero elements: nothing is touched


# ---------------------------------------------------------------------------------------------------------------
# rounding to float16 / bfloat16: token_quant(..., round_to=dt) and round_(y, dt)

ROUND_DTYPES = [torch.float16, torch.bfloat16]


def _from_bits(bits):
    """float32 tensor with the given int64 bit patterns (taken mod 2**32)."""
    b = torch.as_tensor(bits, dtype=torch.int64) & 0xFFFFFFFF
    return torch.where(b >= 2 ** 31, b - 2 ** 32, b).to(torch.int32).view(torch.float32)


def _bits(x):
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def special_values(dt):
    """float32 values where a rounding to ``dt`` can go wrong: overflow boundaries, subnormals, exact ties (built
    from bit patterns), signed zeros, infinities, NaN; both signs."""
    g = _gen(11 if dt is torch.float16 else 12)
    vals = [0.0, 1.0, 1.5, 65504.0, 65505.0, 65519.99, 65520.0, 65520.01, 65536.0, 70000.0, 3e38, 3.4028234e38,
            1e-30, 1e-40, 1.4e-45, 6e-8, 5.96e-8, 6e-5, 6.1e-5, 6.1035156e-05, 2.0 ** -24, 2.0 ** -25, 2.0 ** -26,
            3 * 2.0 ** -25, 5 * 2.0 ** -25, 2.0 ** -14, 2.0 ** -14 - 2.0 ** -25, 1.17549435e-38, 1e-45 * 3,
            math.inf, math.nan]
    x = torch.tensor(vals, dtype=torch.float32)
    # one float32 ulp either side of each value
    x = torch.cat([x, torch.nextafter(x, torch.full_like(x, math.inf)), torch.nextafter(x, torch.zeros_like(x))])
    parts = [x]
    # the boundaries by bit pattern: 65504 (0x477fe000), the midpoint 65520 (0x477ff000) and its neighbours,
    # the largest float32, the bfloat16 overflow midpoint (0x7f7f8000), 2^-14, 2^-25, 2^-24 +- an ulp
    parts.append(_from_bits([0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x477FFFFF, 0x47800000, 0x7F7FFFFF,
                             0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001, 0x7F7F0000, 0x38800000, 0x387FFFFF, 0x387FF000,
                             0x33000000, 0x33000001, 0x32FFFFFF, 0x33800000, 0x337FFFFF, 0x33800001,
                             0x00000001, 0x00007FFF, 0x00008000, 0x00008001, 0x00018000, 0x007FFFFF, 0x007F8000,
                             0x7F800001, 0x7FC00000, 0x7F800100, 0x7FFFFFFF, 0x7FA00000]))
    # exact ties and their neighbours at random mantissas, every exponent: float16 normals drop 13 bits, float16
    # subnormals (exponent 103..112) drop 126 - e bits, bfloat16 drops 16 bits
    n = 4096
    mant = torch.randint(0, 2 ** 23, (n,), generator=g)
    if dt is torch.float16:
        e = torch.randint(100, 145, (n,), generator=g)
        drop = torch.where(e >= 113, torch.full_like(e, 13), (126 - e).clamp(13, 24))
    else:
        e = torch.randint(0, 256, (n,), generator=g)
        drop = torch.full_like(e, 16)
    half = torch.ones_like(drop) << (drop - 1)
    keep = mant & ~((half << 1) - 1)
    for low in (half, half - 1, half + 1):
        parts.append(_from_bits((e << 23) | keep | low))
    # float16 subnormals: every multiple of 2^-25 up to 2^-14 (all the ties there, and the exact values)
    if dt is torch.float16:
        parts.append(torch.arange(0, 2 ** 11 + 3, dtype=torch.float32) * 2.0 ** -25)
    # random bit patterns over the whole float32 range (all exponents, NaNs and infinities included)
    parts.append(_from_bits(torch.randint(0, 2 ** 32, (1 << 16,), generator=g)))
    x = torch.cat(parts)
    return torch.cat([x, -x])


def check_round(y, dt):
    want = y.to(dt).float()
    got = _cpu_ext.round_(y.clone(), dt)
    assert_bit_identical(got, want)
    # the result is a dt value: rounding it again changes nothing (NaNs included, bit for bit)
    again = _cpu_ext.round_(got.clone(), dt)
    assert torch.equal(_bits(again), _bits(got))
    return got


@needs_ext
@pytest.mark.parametrize("dt", ROUND_DTYPES)
def test_round_special_values(dt):
    x = special_values(dt)
    got = check_round(x, dt)
    if dt is torch.float16:
        pos = {v: float(got[(x == v).nonzero()[0, 0]]) for v in (65504.0, 65519.99, 65520.0, 3e38)}
        assert pos == {65504.0: 65504.0, 65519.99: 65504.0, 65520.0: math.inf, 3e38: math.inf}
        sub = _from_bits([0x33000000, 0x33000001, 0xB3000000, 0x33C00000])  # 2^-25, just above, -2^-25, 3*2^-25
        assert _bits(_cpu_ext.round_(sub.clone(), dt)).tolist() == [0, 0x33800000, 0x80000000, 0x34000000]
    else:
        # below the midpoint to 2^128, the midpoint (ties to even: up, to Inf), a subnormal tie to 0 and one up
        big = _from_bits([0x7F7F7FFF, 0x7F7F8000, 0x7F7E8000, 0x00008000, 0x00018000])
        assert _bits(_cpu_ext.round_(big.clone(), dt)).tolist() == [0x7F7F0000, 0x7F800000, 0x7F7E0000, 0, 0x20000]
    # signs of zero, infinities, NaN
    z = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, -1e-42])
    got = check_round(z, dt)
    assert _bits(got[:4]).tolist() == [0, 0x80000000, 0x7F800000, 0xFF800000]
    assert bool(torch.isnan(got[4:6]).all()) and _bits(got[6:]).tolist() == [0x80000000 if dt is torch.float16
                                                                             else _bits(z[6:]).item() & 0xFFFF0000]


@needs_ext
@pytest.mark.parametrize("dt", ROUND_DTYPES)
@pytest.mark.parametrize("shape", [(1, 512), (256, 512), (3, 5, 33), (7, 1), (1,), (300, 4096), (0, 8), (0,)])
def test_round_random_normal(shape, dt):
    g = _gen(hash((shape, str(dt))) % 2 ** 31)
    y = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[:-1] + (1,) if shape else (), generator=g) * 8)
    check_round(y, dt)
    # in place, the same tensor returned
    z = y.clone()
    assert _cpu_ext.round_(z, dt) is z


def check_quant_rounded(x, nbits, dt):
    before = x.clone()
    codes, s = _cpu_ext.token_quant(x, nbits, round_to=dt)
    ref_codes, ref_s = torch_chain(x.to(dt).float(), nbits)
    assert_bit_identical(s, ref_s)
    assert_bit_identical(codes, ref_codes)
    assert torch.equal(_bits(x), _bits(before))  # the input is not rounded in place
    return codes, s


@needs_ext
@pytest.mark.parametrize("dt", ROUND_DTYPES)
@pytest.mark.parametrize("nbits", [8, 4])
@pytest.mark.parametrize("shape", [(1, 512), (256, 512), (3, 5, 33), (7, 1), (1, 1), (2, 3, 4, 127), (300, 4096)])
def test_quant_round_to_random(shape, nbits, dt):
    g = _gen(hash((shape, nbits, str(dt))) % 2 ** 31)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[:-1] + (1,), generator=g) * 6)
    check_quant_rounded(x, nbits, dt)
    # a row whose float32 amax is below a value that rounds up: the scale comes from the rounded row
    y = x.to(dt).float()
    check_quant_rounded(y, nbits, dt)


@needs_ext
@pytest.mark.parametrize("dt", ROUND_DTYPES)
@pytest.mark.parametrize("nbits", [8, 4])
def test_quant_round_to_special_rows(nbits, dt):
    v = special_values(dt)
    for k in (37, 1, 255):  # odd K, many rows
        n = v.numel() // k * k
        rows = v[:n].reshape(-1, k)
        check_quant_rounded(rows, nbits, dt)
    finite = v[torch.isfinite(v)]
    # rows without Inf/NaN, so that the scales and codes are finite and meaningful (huge rows: float16 Inf)
    n = finite.numel() // 129 * 129
    check_quant_rounded(finite[:n].reshape(-1, 129), nbits, dt)
    small = finite[finite.abs() < 1e-3]
    n = small.numel() // 31 * 31
    codes, s = check_quant_rounded(small[:n].reshape(-1, 31), nbits, dt)
    assert bool((s > 0).any())
    for row in ([65519.99, 1.0, -2.0], [65520.0, 1.0, 3.0], [-3e38, 1.0, 0.5], [1e-8, -2e-8, 3e-8],
                [2.0 ** -25, -(2.0 ** -25), 0.0], [-0.0, -0.0, -0.0], [math.nan, 1.0, 2.0]):
        check_quant_rounded(torch.tensor([row]), nbits, dt)
    check_quant_rounded(torch.empty(0, 9), nbits, dt)  # zero rows
    check_quant_rounded(torch.empty(2, 0, 5), nbits, dt)


@needs_ext
@pytest.mark.parametrize("nbits", [8, 4])
def test_round_to_none_unchanged(nbits):
    g = _gen(21)
    x = torch.randn(17, 301, generator=g) * torch.exp(torch.randn(17, 1, generator=g) * 10)
    x[3, 4] = math.nan
    a = _cpu_ext.token_quant(x, nbits)
    b = _cpu_ext.token_quant(x, nbits, round_to=None)
    ref = torch_chain(x, nbits)
    for got, want in zip(a + b, ref + ref):
        assert_bit_identical(got, want)
    # and the rounding is not a no-op: the row maxima are not float16 / bfloat16 numbers, so the scales move
    for dt in ROUND_DTYPES:
        _, s = _cpu_ext.token_quant(x, nbits, round_to=dt)
        moved = (s != a[1]) & ~torch.isnan(a[1])
        assert int(moved.sum()) >= 12


@needs_ext
def test_round_wrapper_errors():
    y = torch.randn(4, 6)
    for bad in (torch.float32, torch.float64, "float16", None, torch.int8):
        with pytest.raises(ValueError, match="dt must be torch.float16 or torch.bfloat16"):
            _cpu_ext.round_(y, bad)
    for bad in (torch.float32, "bfloat16", torch.float8_e4m3fn if hasattr(torch, "float8_e4m3fn") else 1):
        with pytest.raises(ValueError, match="round_to must be"):
            _cpu_ext.token_quant(y, 8, round_to=bad)
    with pytest.raises(TypeError, match="float32"):
        _cpu_ext.round_(y.double(), torch.float16)
    with pytest.raises(TypeError, match="float32"):
        _cpu_ext.round_(y.half(), torch.float16)
    with pytest.raises(TypeError, match="torch.Tensor"):
        _cpu_ext.round_(y.numpy(), torch.float16)
    with pytest.raises(ValueError, match="contiguous"):
        _cpu_ext.round_(y.t(), torch.float16)
    if torch.device("meta").type == "meta":
        with pytest.raises(ValueError, match="CPU"):
            _cpu_ext.round_(torch.empty(3, 8, device="meta"), torch.bfloat16)
    # views with a storage offset are rounded where they lie, the rest untouched
    base = torch.randn(8, 16, generator=_gen(5)) * 1000
    keep = base.clone()
    _cpu_ext.round_(base[2:5], torch.bfloat16)
    assert torch.equal(base[2:5], keep[2:5].bfloat16().float())
    assert torch.equal(base[:2], keep[:2]) and torch.equal(base[5:], keep[5:])


def test_round_unavailable_raises(monkeypatch):
    monkeypatch.setattr(_cpu_ext, "_ext", None)
    monkeypatch.setattr(_cpu_ext, "_import_error", "not built (test)")
    with pytest.raises(RuntimeError, match="round_ is not available.*not built"):
        _cpu_ext.round_(torch.randn(2, 8), torch.float16)
