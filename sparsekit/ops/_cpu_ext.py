"""Optional C extension ``sparsekit._cpu_ext``: the CPU kernels -- fused per-token activation quantization, and
matmuls over compressed weights (see "Sparse and low-bit matmuls" below).

The CPU fast path of the W8A8, W4A8 and 2:4+int8 layers quantizes its activations per token on every call.  As
a chain of torch ops (abs, amax, div, masked_fill, div, round, clamp) that costs ~15-25 us for one 512-wide token
and several passes over the data for many tokens.  :func:`token_quant` does the same in one loop per row, in a
small pure-C CPython extension (``csrc/cpu/token_quant.c``; no torch or numpy headers, plain -O3, no fast-math,
baseline ISA, plus an AVX2 clone of the loop chosen at load time on x86-64 Linux).  The wrapper validates and allocates; the C code receives data pointers and sizes.

Semantics, bit-identical to (``x`` float32 of shape ``(..., K)``, ``K >= 1``)::

    qmax = float(2 ** (nbits - 1) - 1)                          # 127 for 8 bits, 7 for 4 bits
    amax = torch.amax(torch.abs(x), -1, keepdim=True)           # NaN in the row -> NaN, Inf -> Inf
    s = (amax / qmax).masked_fill_(amax == 0, 1.0)              # IEEE float32 division
    codes = x.div(s).round_().clamp_(-qmax, qmax)               # round half to even; NaN stays NaN
    return codes, s                                             # float32, shapes (..., K) and (..., 1)

Bit for bit, including the sign of zero codes (``round(-0.3)`` is ``-0.0`` in both); a NaN code or scale is a
NaN in the same place (its payload bits are not compared).  No reciprocal multiply, no fast-math: the division
``x / s`` is a true IEEE division in both.

Fallback: the extension is optional.  ``setup.py`` builds it where a C compiler exists (``SPARSEKIT_NO_CPU_EXT=1``
skips it) and the install goes on without it otherwise.  :func:`available` says whether it was built and is not
switched off by ``SPARSEKIT_CPU_EXT=0`` (read on each call); callers check it and keep the torch-op chain
otherwise.  :func:`token_quant` raises ``RuntimeError`` when it is not available.

Per-call time (``time.thread_time``, one torch thread, best of several runs on a shared 2-core AMD EPYC with AVX2
(the AVX2 clone of the loop), torch 2.13 CPU, random normal input; the torch chain above vs :func:`token_quant`
with its two output allocations, and the bare C call into preallocated outputs)::

    (rows, K)      torch ops    token_quant    C call only
    (1, 512)         24.5 us       5.0 us        0.2 us
    (16, 2048)       44 us        13 us          7.5 us
    (256, 512)       98 us        38 us         31 us
    (256, 4096)     660 us       310 us        264 us

At one token the time is almost all Python and the two ``torch.empty`` calls; from a few thousand elements on it
is the float32 division (~0.25 ns per element with AVX2, about 2.4x that for the baseline SSE2 loop).

Rounding to the compute dtype: ``token_quant(x, nbits, round_to=torch.float16)`` (or ``torch.bfloat16``) quantizes
``x.to(round_to).float()`` bit for bit, rounding in the same row loop, without the two conversions; :func:`round_`
rounds a float32 tensor in place to float16 / bfloat16 values, bit-identical to ``y.copy_(y.to(dt).float())``.
Both roundings are integer / exact float32 operations on the float32 bits (round to nearest even, float16 overflow
to +-Inf from 65520 on, subnormals exact, signed zeros kept, NaN stays NaN), no F16C or ``_Float16``; they
vectorize like the rest.  Per-call times as above (best of several runs; the shared machine is noisy, about
+-20%), 8 bits::

                     x.to(dt).float()   token_quant     C call  |  y.to(dt)      round_    C call
    dt, (rows, K)    + token_quant      (round_to=dt)   only    |  .to(float32)            only
    fp16 (1, 512)        10.2 us          5.2 us        0.6 us  |     5.4 us      0.9 us   0.3 us
    fp16 (256, 512)      69 us           60 us         52 us    |    32 us       23 us    22 us
    fp16 (256, 4096)    720 us          425 us        420 us    |   250 us      183 us   182 us
    bf16 (1, 512)        12.2 us          5.3 us        0.5 us  |     6.6 us      0.9 us   0.3 us
    bf16 (256, 512)      82 us           52 us         45 us    |    48 us       19 us    17 us
    bf16 (256, 4096)   1290 us          350 us        340 us    |   320 us      127 us   127 us

(the C call without rounding: 0.5, 32 and 280 us).  The float16 rounding costs ~0.15 ns per element with AVX2,
the bfloat16 one ~0.1 ns.

Sparse and low-bit matmuls (``csrc/cpu/sparse_mm.c``; AVX2 + FMA, OpenMP over output columns with torch's thread
count; used by the modules' CPU fast path through :class:`sparsekit.ops._dense.CpuPlan` where
:func:`sparse_available`):

- :func:`sp24_kernel`: 2:4 float32 matmul over the stored values only (half the multiply-adds, 5/8 of the bytes
  of the dense float32 matrix), any number of rows (a tiled transposed copy of the input above 3 rows, 16 KB
  of it in L1 per pass); an input holding Inf/NaN is left to the dense matmul (which multiplies the pruned
  zeros too: 0 * Inf = NaN).
- :func:`block_kernel`: block-sparse float32 matmul over the kept blocks, any number of rows; structural
  semantics (a dropped block never reads its inputs).
- :func:`w8a8_kernel`, :func:`w4a8_kernel`, :func:`sp24_int8_kernel`: the whole W8A8 / W4A8 / 2:4+int8 layer
  in one call -- per-token quantization (bit-identical to :func:`token_quant`), exact int32 sums over the
  integer codes, scales, bias, and the rounding of the result to the compute dtype.

Their results equal the dense float32 matmul of the same weights up to summation order (float32 kernels) or
are exact sums (integer kernels); tests in tests/test_cpu_sparse_kernels.py.  ``SPARSEKIT_CPU_KERNELS=0``
switches them off (the dense float32 / float16-weight matmuls run instead, with the C quantization).
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Tuple

import torch

__all__ = ["CPU_EXT_ENV", "CPU_KERNELS_ENV", "getenv", "env_flag", "available", "unavailable_reason", "token_quant",
           "round_", "sparse_available", "pad_columns", "sp24_kernel", "block_kernel", "w8a8_kernel", "w4a8_kernel",
           "sp24_int8_kernel", "SP24_CHUNK", "NO_ROW_LIMIT"]

#: ``SPARSEKIT_CPU_EXT=0`` switches the extension off at run time (default on where built).
CPU_EXT_ENV = "SPARSEKIT_CPU_EXT"
#: ``SPARSEKIT_CPU_KERNELS=0`` switches off only its matmul kernels (2:4, block-sparse, fused W8A8 / W4A8 /
#: 2:4+int8): the CPU path is then the dense float32 / float16-weight matmul, with the C per-token quantization.
CPU_KERNELS_ENV = "SPARSEKIT_CPU_KERNELS"

try:
    from .. import _cpu_ext as _ext  # type: ignore[attr-defined]
    _import_error: Optional[str] = None
except ImportError as e:  # not built (no C compiler, SPARSEKIT_NO_CPU_EXT=1) or not importable
    _ext = None
    _import_error = f"sparsekit._cpu_ext is not built or not importable ({e})"

_environ = os.environ
# os.environ's own store (posix: bytes keys), kept in step by os.environ's setters: one dict lookup per call
# instead of os.environ.get's key encoding and value decoding (~1 us); os.environ.get where it is not there
try:
    _env_data = _environ._data  # type: ignore[attr-defined]
    _env_encode = _environ.encodekey  # type: ignore[attr-defined]
    _env_decode = _environ.decodevalue  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - not CPython's os._Environ
    _env_data = None
_env_keys: dict = {}
_parsed: dict = {}
_float32 = torch.float32
_ROUND_MODES = {torch.float16: 1, torch.bfloat16: 2}  # the C side's mode numbers
_empty = torch.empty
_empty_like = torch.empty_like


def getenv(name: str) -> Optional[str]:
    """``os.environ.get(name)`` at a tenth of its cost (it runs on every small-layer forward): one lookup in the
    mapping's own dict (``os.environ`` keeps it current under ``putenv``/``setenv``/``monkeypatch``)."""
    if _env_data is None:
        return _environ.get(name)
    key = _env_keys.get(name)
    if key is None:
        key = _env_keys[name] = _env_encode(name)
    raw = _env_data.get(key)
    return None if raw is None else _env_decode(raw)


def env_flag(name: str, default: bool = True) -> bool:
    """The on/off environment variable ``name`` (1/true/yes/on, 0/false/no/off; unset or empty: ``default``),
    read on every call at the cost of a dict lookup (parsed values are cached); anything else raises
    ValueError naming the variable."""
    text = getenv(name)
    hit = _parsed.get((name, text, default))
    if hit is None:
        v = (text or "").strip().lower()
        if v in ("0", "false", "no", "off"):
            hit = False
        elif v in ("1", "true", "yes", "on"):
            hit = True
        elif v == "":
            hit = default
        else:
            raise ValueError(f"{name}={text!r}: set it to 1 or 0")
        _parsed[(name, text, default)] = hit
    return hit


def _enabled() -> bool:
    return env_flag(CPU_EXT_ENV)


def unavailable_reason() -> Optional[str]:
    """``None`` if :func:`token_quant` can run, else why not."""
    if _ext is None:
        return _import_error
    if not _enabled():
        return f"{CPU_EXT_ENV}=0 switches the C extension off"
    return None


def available() -> bool:
    """Whether the extension is built, importable and not switched off by ``SPARSEKIT_CPU_EXT=0``."""
    return _ext is not None and _enabled()


def _round_mode(dt, name: str) -> int:
    mode = _ROUND_MODES.get(dt) if isinstance(dt, torch.dtype) else None
    if mode is None:
        raise ValueError(f"{name} must be torch.float16 or torch.bfloat16, got {dt!r}")
    return mode


def _check_f32_cpu(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype is not _float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if not t.is_cpu:
        raise ValueError(f"{name} must be on the CPU, got device {t.device}")


def token_quant(x: torch.Tensor, nbits: int,
                round_to: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization of float32 CPU ``x`` (..., K): ``(codes, scale)`` as float32 tensors of
    shapes (..., K) and (..., 1), bit-identical to the torch-op chain in the module docstring.  ``round_to``
    (``torch.float16`` or ``torch.bfloat16``) first rounds ``x`` to that dtype, as ``x.to(round_to).float()``, in
    the same loop; ``x`` itself is left untouched."""
    if _ext is None or not _enabled():
        raise RuntimeError(f"sparsekit.ops._cpu_ext.token_quant is not available: {unavailable_reason()}")
    if type(nbits) is not int or (nbits != 8 and nbits != 4):
        raise ValueError(f"nbits must be 4 or 8, got {nbits!r}")
    mode = 0 if round_to is None else _round_mode(round_to, "round_to")
    _check_f32_cpu(x, "x")
    shape = x.shape
    if not shape or shape[-1] < 1:
        raise ValueError(f"x must have a last dimension of size >= 1, got shape {tuple(shape)}")
    if not x.is_contiguous():
        x = x.contiguous()
    k = shape[-1]
    codes = _empty_like(x)  # x is contiguous: so is codes (same strides)
    scale = _empty(*shape[:-1], 1, dtype=_float32)  # unpacked sizes: ~2 us less than passing a torch.Size
    _ext.token_quant(x.data_ptr(), codes.data_ptr(), scale.data_ptr(), x.numel() // k, k, 127 if nbits == 8 else 7,
                     mode)
    return codes, scale


def round_(y: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """Rounds the contiguous float32 CPU tensor ``y`` in place to ``dt`` (``torch.float16`` or ``torch.bfloat16``)
    values and returns it: bit-identical to ``y.copy_(y.to(dt).float())`` (round to nearest even, float16
    overflow to +-Inf, subnormals exact, NaN stays NaN)."""
    if _ext is None or not _enabled():
        raise RuntimeError(f"sparsekit.ops._cpu_ext.round_ is not available: {unavailable_reason()}")
    mode = _round_mode(dt, "dt")
    _check_f32_cpu(y, "y")
    if not y.is_contiguous():
        raise ValueError(f"y must be contiguous (it is rounded in place), got strides {y.stride()} for shape "
                         f"{tuple(y.shape)}")
    _ext.round_(y.data_ptr(), y.numel(), mode)
    return y


# ----------------------------------------------------------------------------- sparse matmuls (csrc/cpu/sparse_mm.c)
#: The 2:4 and block-sparse kernels and the fused W8A8 / W4A8 / 2:4+int8 linears take any number of rows.
NO_ROW_LIMIT = sys.maxsize
_SIMD = bool(_ext is not None and hasattr(_ext, "simd") and _ext.simd())
_get_threads = torch.get_num_threads
_uint8 = torch.uint8


def sparse_available() -> bool:
    """Whether the matmul kernels of the extension (2:4, block-sparse, fused W8A8 / W4A8 / 2:4+int8) run here:
    built, not switched off, and the CPU has AVX2 + FMA (their plain-C loops elsewhere are slower than a dense
    BLAS matmul, so callers keep the dense one there)."""
    return _SIMD and env_flag(CPU_EXT_ENV) and env_flag(CPU_KERNELS_ENV)


def pad_columns(x2: torch.Tensor, width: int) -> torch.Tensor:
    """``x2`` (rows, K) with zero columns up to ``width`` (the kernels read whole groups / blocks); ``x2`` itself
    when it is that wide."""
    if x2.shape[1] == width:
        return x2
    out = x2.new_zeros(x2.shape[0], width)
    out[:, :x2.shape[1]] = x2
    return out


#: The stored 2:4 values are laid out in chunks of this many input columns (csrc/cpu/sparse_mm.c: SP24_KC).
SP24_CHUNK = 128


def _chunk_major(a: torch.Tensor) -> torch.Tensor:
    """(N, kh) per-value array in the kernel's chunk-major order: for each chunk of SP24_CHUNK/2 values per row,
    that chunk of row 0, of row 1, ... (a pass over one chunk reads the weights sequentially)."""
    c = SP24_CHUNK // 2
    return torch.cat([a[:, t0:t0 + c].reshape(-1) for t0 in range(0, a.shape[1], c)])


def sp24_kernel(values: torch.Tensor, meta: torch.Tensor, k: int):
    """A callable ``f(x2, bias32) -> y`` computing ``x2 @ W^T + bias32`` in float32 over the stored 2:4 values
    only (``values`` (N, Kp/2), ``meta`` (N, Kp/8) uint8: sparsekit's packed layout; ``x2`` a contiguous float32
    (rows, k) CPU tensor, any number of rows; ``bias32`` float32 (N,) or None), or None where the kernel does not
    run here (:func:`sparse_available`).  ``f`` returns None when ``x2`` holds an Inf or NaN: the dense matmul
    multiplies the pruned zeros too (0 * Inf = NaN), which the caller reproduces by running it.  Prepared once
    per weight: a float32 copy of the values and a one-byte column index per value, both in chunk-major order
    (5 bytes per stored value); per call, more than 3 rows: a transposed float32 copy of up to 1024 rows of
    ``x2`` at a time."""
    if not sparse_available():
        return None
    from ..formats._validate import sparse24_columns

    n, kh = values.shape
    kp = 2 * kh
    if kh % 4 or meta.shape != (n, kp // 8) or not 0 < k <= kp:
        raise ValueError(f"sp24_kernel: values {tuple(values.shape)} / meta {tuple(meta.shape)} do not describe "
                         f"a 2:4 weight with in_features={k}")
    vals = _chunk_major(values.detach().to(torch.float32))
    off = _chunk_major((sparse24_columns(meta) % SP24_CHUNK).to(_uint8))      # column within the value's chunk
    vp, op = vals.data_ptr(), off.data_ptr()
    keep = (vals, off)
    mm, fin = _ext.sp24_mm, _ext.all_finite

    def f(x2: torch.Tensor, bias32: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        rows = x2.shape[0]
        if not fin(x2.data_ptr(), x2.numel()):
            return None
        xp = pad_columns(x2, kp) if rows <= 3 else x2
        y = _empty(rows, n, dtype=_float32)
        mm(xp.data_ptr(), rows, k, xp.shape[1], vp, op, kh, n, 0 if bias32 is None else bias32.data_ptr(),
           y.data_ptr(), _get_threads())
        return y

    f.keep = keep       # the prepared tensors live as long as the callable
    return f


def block_kernel(blocks: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, n: int, k: int):
    """A callable ``f(x2, bias32) -> y`` computing ``x2 @ W^T + bias32`` in float32 over the kept blocks only
    (``blocks`` (nnzb, bm, bk), ``crow``/``col`` the block-row pointers and block columns: sparsekit's packed
    layout of an (n, k) weight; ``x2`` a contiguous float32 (rows, k) CPU tensor, any number of rows), or None
    where the kernel does not run here.  Dropped blocks are never read, so an Inf/NaN input only reaches the
    outputs of blocks that read it (the kernels' structural semantics).  Prepared once per weight: the blocks
    transposed, in float32 (the size of ``blocks`` in float32)."""
    if not sparse_available():
        return None
    nnzb, bm, bk = blocks.shape
    if bm % 16 or crow.shape[0] != -(-n // bm) + 1 or col.shape[0] != nnzb:
        raise ValueError(f"block_kernel: blocks {tuple(blocks.shape)}, crow {tuple(crow.shape)}, col "
                         f"{tuple(col.shape)} do not describe an ({n}, {k}) block-sparse weight")
    bT = blocks.detach().to(torch.float32).transpose(1, 2).contiguous()
    crow64 = crow.to(torch.int64).contiguous()
    col64 = col.to(torch.int64).contiguous()
    width = -(-k // bk) * bk
    bp, cp, colp = bT.data_ptr(), crow64.data_ptr(), col64.data_ptr()
    mm = _ext.block_mm

    def f(x2: torch.Tensor, bias32: Optional[torch.Tensor]) -> torch.Tensor:
        rows = x2.shape[0]
        xp = pad_columns(x2, width)
        y = _empty(rows, n, dtype=_float32)
        mm(xp.data_ptr(), rows, width, bp, cp, colp, n, bm, bk, 0 if bias32 is None else bias32.data_ptr(),
           y.data_ptr(), _get_threads())
        return y

    f.keep = (bT, crow64, col64)
    return f


#: Rows per call of a fused quantized linear (larger batches run in blocks of this many rows).
FUSED_BLOCK_ROWS = 1024


def _fused(kind: int, n: int, k: int, w, aux1, aux2, gs: int, col_scale: Optional[torch.Tensor], keep: tuple):
    """The callable of a fused quantized linear (see :func:`w8a8_kernel`; kind 0: int8 codes, 1: int4)."""
    cs = None if col_scale is None else col_scale.detach().float().contiguous()
    cp = 0 if cs is None else cs.data_ptr()
    wp, a1, a2 = w.data_ptr(), 0 if aux1 is None else aux1.data_ptr(), 0 if aux2 is None else aux2.data_ptr()
    run = _ext.qlinear

    def f(x2: torch.Tensor, nbits: int, round_to: Optional[torch.dtype],
          bias32: Optional[torch.Tensor]) -> torch.Tensor:
        rows = x2.shape[0]
        y = _empty(rows, n, dtype=_float32)
        r = 0 if round_to is None else _ROUND_MODES[round_to]
        bp, qmax, th = 0 if bias32 is None else bias32.data_ptr(), 127 if nbits == 8 else 7, _get_threads()
        xp, yp = x2.data_ptr(), y.data_ptr()
        # at most FUSED_BLOCK_ROWS rows per call: the call's scratch (the codes: 6 bytes per input element for
        # W8A8) stays bounded whatever the batch; every row's result is independent of the others (exact sums)
        for r0 in range(0, rows, FUSED_BLOCK_ROWS):
            rr = min(FUSED_BLOCK_ROWS, rows - r0)
            run(kind, xp + 4 * r0 * k, rr, k, wp, a1, a2, gs, n, cp, bp, yp + 4 * r0 * n, qmax, r, r, th)
        return y

    f.keep = keep + (cs,)
    f.quant = True          # called by CpuPlan.quant_linear with (x2, nbits, round_to, bias32)
    return f


def w8a8_kernel(q: torch.Tensor, col_scale: torch.Tensor):
    """A fused W8A8 linear over int8 weight codes ``q`` (N, K) with per-channel ``col_scale`` (N,), or None where
    it does not run here.  The callable ``f(x2, nbits, round_to, bias32)`` takes a contiguous float32 (rows, K)
    CPU input and returns the float32 (rows, N) result of: per-token quantization to ``nbits`` (8 or 4; the
    input first rounded to ``round_to`` (float16/bfloat16) where given, bit-identical to :func:`token_quant`),
    the exact int32 sums over the codes, ``sum * (s_tok * col_scale) + bias32``, the result rounded to
    ``round_to`` (kept in float32) -- the math of :meth:`sparsekit.ops._dense.CpuPlan.quant_linear`, in one C
    call (csrc/cpu/sparse_mm.c).  An input row with Inf/NaN gives a NaN row."""
    if not sparse_available():
        return None
    if q.dtype != torch.int8 or q.dim() != 2 or col_scale.shape != (q.shape[0],):
        raise ValueError(f"w8a8_kernel: need (N, K) int8 codes and (N,) scales, got {q.dtype} {tuple(q.shape)}, "
                         f"{tuple(col_scale.shape)}")
    n, k = q.shape
    if k > 65536:
        return None
    kp = -(-k // 16) * 16
    qq = pad_columns(q.detach(), kp).contiguous()
    return _fused(0, n, k, qq, None, None, 0, col_scale, (qq,))


def w4a8_kernel(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group_size: int,
                k: int):
    """A fused W4A8 linear (int4 weight ``(code - zero) * scale``, :func:`sparsekit.ops.int8.dequantize_int4_fp32`),
    or None where it does not run here: as :func:`w8a8_kernel`, with exact int32 sums of activation codes x
    weight codes per group, then ``s_tok * (sum_g scale_g * sum_g - sum_g (scale_g * zero_g) * (sum of the group's
    codes)) + bias`` in float32.  Prepared once per weight: the codes re-packed in 32-column blocks (byte ``i`` of
    block ``b`` holds columns ``32b + i`` and ``32b + 16 + i``), float32 scales and the products scale * zero
    (transposed)."""
    if not sparse_available():
        return None
    from ..formats.int4 import SYMMETRIC_ZERO, unpack_int4

    n = qweight.shape[0]
    g = k // group_size
    if g * group_size != k or scales.shape != (n, g) or (zeros is not None and zeros.shape != (n, g)):
        raise ValueError(f"w4a8_kernel: scales {tuple(scales.shape)} / zeros do not describe an ({n}, {k}) int4 "
                         f"weight with group_size={group_size}")
    if k > 65536:
        return None
    codes = unpack_int4(qweight, k)                                         # (N, K) uint8
    gs = group_size
    if gs % 32:
        if g != 1:
            return None                 # (group sizes are 32 / 64 / 128 or one group per row)
        gs = -(-k // 32) * 32           # one group per row: padding columns (code 0, zero input)
        codes = pad_columns(codes, gs)
    kp = codes.shape[1]
    blk = codes.reshape(n, kp // 32, 2, 16)
    packed = (blk[:, :, 0] | (blk[:, :, 1] << 4)).reshape(n, kp // 2).contiguous()
    sc = scales.detach().float().contiguous()
    zr = zeros.detach().float() if zeros is not None else torch.full((n, g), float(SYMMETRIC_ZERO))
    sz = (sc * zr).t().contiguous()                                         # (G, N): scale * zero per group
    return _fused(1, n, k, packed, sc, sz, gs, None, (packed, sc, sz))


def sp24_int8_kernel(values: torch.Tensor, meta: torch.Tensor, k: int, col_scale: torch.Tensor):
    """A fused 2:4+int8 linear, or None where it does not run here: the 2:4 int8 codes ``values``/``meta``
    expanded once to a dense int8 code matrix (zeros at the pruned positions; half the bytes of the float16
    copy the GEMM path keeps) and :func:`w8a8_kernel`'s exact integer sums over it -- the integer path reads
    one byte per weight and beats a gather over the 2:4 positions here."""
    if not sparse_available():
        return None
    from ..formats._validate import sparse24_dense

    if values.dtype != torch.int8:
        raise ValueError(f"sp24_int8_kernel: need int8 codes, got {values.dtype}")
    return w8a8_kernel(sparse24_dense(values.detach(), meta, k), col_scale)
