"""Static performance gate: compile every kernel config a launcher can choose, read the machine code.

No GPU is needed.  Each launcher in ``kernels/`` (the Python function that does
``kernel[grid](...)``) is called with "meta" tensors over a sweep of shapes and
dtypes while its module believes it is on a GPU; the launched kernel is replaced
by a recorder, so the recorded call carries exactly what the GPU path would pass
(constexprs, num_warps / num_stages, pointer dtypes, split-K buffers).  Every
distinct launch is compiled for sm_90 and sm_80 with the specializations a real
launch gets (16-byte aligned pointers, ints equal to 1 as constants, multiples of
16 marked divisible) and its cubin is disassembled with the ``cuobjdump`` that
ships with Triton.  From the resource usage and the SASS we read:

  regs, stack, smem           registers per thread, stack frame, shared memory (bytes)
  stl, ldl                    local-memory stores / loads (register spills)
  tc, tc_op                   tensor-core instructions (HGMMA/IGMMA = Hopper wgmma, HMMA/IMMA = mma.sync)
  wait0                       ``WARPGROUP.DEPBAR.LE gsb0, 0x0``: waits for *every* wgmma in flight
  inflight                    ``WARPGROUP.DEPBAR.LE gsb0, 0x<n>`` with n >= 1: waits that leave wgmma in flight
                              (software pipelining of the tensor-core work; 0 = each wgmma is waited for)
  bar                         CTA barriers (BAR.SYNC / BAR.RED / BAR.ARV)
  ld16, ld8, ld4, ld2, ld1    global loads (LDG and cp.async LDGSTS) by access width in bytes
  cp_async, tma               LDGSTS (cp.async) and UTMALDG (bulk tensor copy) instructions

Counts are static (instructions in the binary), not executed counts: a proxy that
shows what a change did (a spill gone, a load vectorized) without a GPU.

The gate (:func:`problems`): no spills (stack 0, no STL/LDL) for every config;
tensor-core instructions in every matmul kernel whose operands allow them
(fp16 / bf16 / int8, and fp32 where TF32 is allowed); shared memory within the
architecture's limit, autotuner candidates included.

The family ``csrc`` is the CUDA C++ of csrc/ (no Triton): each .cu is compiled with nvcc for sm_90a
and sm_80 and every __global__ template instantiation is a row, read the same way (see
:func:`run_csrc`); its gate adds tensor-core instructions in the mma.sp kernels.  Without nvcc it
yields no rows and ``--compare`` leaves its committed rows alone.

Command line (also ``make gate-table``)::

    python -m sparsekit.bench.static_gate [--family F ...] [--arch 90 80] [--jobs N]
                                          [--out DIR] [--check] [--sass REGEX]

``--out DIR`` writes ``DIR/sm_<arch>.csv`` (one row per config, sorted) and a
markdown summary; the committed tables live in ``bench/gate/triton-<version>/``.
``--check`` exits 1 if a compiled config breaks the gate and is not on the
ledger of known failures, ``bench/gate/known_failures.csv`` (kernel config,
architecture, mode, the triton versions it fails on, the problem), or if a config
the ledger lists for this triton version now passes (the ledger only shrinks by
being rewritten: ``--known update`` records the compiled configs of a run).  The
ledger is the list of open performance bugs the gate knows about; a new kernel
or launcher config that spills or misses the tensor cores fails the gate.  ``--sass REGEX`` prints the SASS
of the matching kernels (for reading, e.g. ``--sass '_sp24_fwd.*M<=16'``).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import hashlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
import types

ARCHS = (90, 80)
SMEM_LIMIT = {90: 232448, 80: 166912}     # max dynamic shared memory per block: H100/H200, A100
FAMILIES = ("sparse24", "sparse24_int4", "int4", "int8", "block_sparse", "triple_gate_conv", "draft_attention",
            "csrc")
# kernels that do a matrix product (the tensor-core rule applies); the rest are elementwise / bookkeeping
MATMUL_KERNELS = {"_sp24_fwd", "_sp24_dx", "_sp24_dvalues", "_sp24_int8_fwd", "_sp24q_fwd", "_w4a16_fwd",
                  "_w8a8_fwd", "_w4a8_fwd", "_bsr_fwd", "_bsr_dx", "_bsr_dw", "_tg_conv", "_bsa_fwd"}
COLUMNS = ["family", "kernel", "src", "arch", "mode", "config", "args", "regs", "stack", "smem", "stl", "ldl",
           "tc", "tc_op", "wait0", "inflight", "bar", "ld16", "ld8", "ld4", "ld2", "ld1", "cp_async", "tma", "tuned",
           "expect_tc", "status"]
# columns a committed table must reproduce exactly for the same triton version
EXACT = ["regs", "stack", "smem", "stl", "ldl", "tc", "wait0", "inflight", "bar", "ld16", "ld8", "ld4", "ld2", "ld1",
         "cp_async", "tma"]
LAUNCH_OPTS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
# the constexprs that make a kernel config (tile sizes, splits, block shapes, unrolled extents)
CONFIG_KEYS = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_T", "BLOCK_P", "BLOCK_C", "SPLIT_K", "SPLIT", "TILE_GROUPS",
               "BM", "BK", "HEAD_DIM", "KH", "KW", "TTP", "GROUPS_PER_STEP", "TILES_PER_GROUP"}


# ---------------------------------------------------------------------------------------------
# recording launches

class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` records the call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def record(mod, names, launcher, *args, **kwargs):
    """Run ``launcher(*args, **kwargs)`` with ``mod.<name>`` replaced by recorders; [(fn, args, kwargs)]."""
    names = (names,) if isinstance(names, str) else tuple(names)
    saved = {n: getattr(mod, n) for n in names}
    recs = {n: Recorder(f) for n, f in saved.items()}
    for n, r in recs.items():
        setattr(mod, n, r)
    try:
        launcher(*args, **kwargs)
    finally:
        for n, f in saved.items():
            setattr(mod, n, f)
    out = []
    for n, r in recs.items():
        out += [(saved[n], a, k) for a, k in r.calls]
    return out


def gpu_context(num_sms: int = 132, arch: int = 90):
    """Make the kernel modules take their GPU branch for meta tensors (launch configs, no interpreter flags),
    on a device of compute capability ``arch`` (major * 10 + minor) with ``num_sms`` SMs."""
    import torch
    from sparsekit.kernels import (block_sparse, draft_attention, int4, int8, sparse24, sparse24_int4,
                                   triple_gate_conv)
    cap = (arch // 10, arch % 10)
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(
        multi_processor_count=num_sms, major=cap[0], minor=cap[1])
    torch.cuda.get_device_capability = lambda *a, **k: cap
    for m in (block_sparse, draft_attention, int4, int8, sparse24, sparse24_int4, triple_gate_conv):
        m._interpreting = lambda t: False
    triple_gate_conv.autotune_enabled = lambda: False


# ---------------------------------------------------------------------------------------------
# the sweep: every launcher over shapes / dtypes that reach each of its configuration branches

def _meta(*shape, dtype=None):
    import torch
    return torch.empty(shape, dtype=dtype or torch.float16, device="meta")


def _tf32_modes(dt):
    import torch
    return (False, True) if dt == torch.float32 else (None,)


def _set_tf32(flag):
    import torch
    if flag is not None:
        torch.backends.cuda.matmul.allow_tf32 = flag
        torch.backends.cudnn.allow_tf32 = flag


MS = (1, 16, 17, 64, 65, 4096)
NK = ((4096, 4096), (11008, 4096), (4096, 11008), (1024, 8192), (8192, 1024), (512, 512))


def sweep_sparse24():
    import torch
    from sparsekit.kernels import sparse24 as k
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for tf32 in _tf32_modes(dt):
            _set_tf32(tf32)
            for n, kk in NK:
                vals, mt = _meta(n, kk // 2, dtype=dt), _meta(n, kk // 8, dtype=torch.uint8)
                for m in MS:
                    yield "_sp24_fwd", dt, tf32, record(k, "_sp24_fwd", k.sparse24_linear, _meta(m, kk, dtype=dt),
                                                        vals, mt, kk, _meta(n, dtype=dt), _meta(m, n, dtype=dt))
                    yield "_sp24_dx", dt, tf32, record(k, "_sp24_dx", k.sparse24_grad_input, _meta(m, n, dtype=dt),
                                                       vals, mt, kk, _meta(m, kk, dtype=dt))
                yield "_sp24_dvalues", dt, tf32, record(k, "_sp24_dvalues", k.sparse24_grad_values,
                                                        _meta(512, n, dtype=dt), _meta(512, kk, dtype=dt), mt, kk,
                                                        _meta(n, kk // 2, dtype=dt))
    _set_tf32(False)
    for n, kk in NK:
        v8, mt = _meta(n, kk // 2, dtype=torch.int8), _meta(n, kk // 8, dtype=torch.uint8)
        for m in MS:
            for dt in (torch.float16, torch.bfloat16, torch.float32):
                yield "_sp24_int8_fwd", torch.int8, None, record(
                    k, "_sp24_int8_fwd", k.sparse24_int8_linear, _meta(m, kk, dtype=torch.int8),
                    _meta(m, dtype=torch.float32), v8, mt, _meta(n, dtype=torch.float32), kk, _meta(n, dtype=dt),
                    _meta(m, n, dtype=dt))


def sweep_sparse24_int4():
    import torch
    from sparsekit.kernels import sparse24_int4 as k
    for dt in (torch.float16, torch.bfloat16):
        for gs in (32, 128):
            for sym in (False, True):
                for n, kk in NK:
                    kc = kk // 2
                    gc = max(kc // gs, 1)
                    for m in MS:
                        yield "_sp24q_fwd", dt, None, record(
                            k, "_sp24q_fwd", k.sparse24_int4_linear, _meta(m, kk, dtype=dt),
                            _meta(n, kc // 8, dtype=torch.int32), _meta(n, gc, dtype=dt),
                            None if sym else _meta(n, gc, dtype=dt), _meta(n, kc // 4, dtype=torch.uint8), gs, kk,
                            _meta(n, dtype=dt), _meta(m, n, dtype=dt))


def sweep_int4():
    import torch
    from sparsekit.kernels import int4 as k
    for dt in (torch.float16, torch.bfloat16):
        for gs in (32, 128):
            for sym in (False, True):
                for n, kk in NK:
                    g = max(kk // gs, 1)
                    for m in MS:
                        yield "_w4a16_fwd", dt, None, record(
                            k, "_w4a16_fwd", k.int4_linear, _meta(m, kk, dtype=dt),
                            _meta(n, kk // 8, dtype=torch.int32), _meta(n, g, dtype=dt),
                            None if sym else _meta(n, g, dtype=dt), gs, kk, _meta(n, dtype=dt),
                            _meta(m, n, dtype=dt))
                yield "_w4_dequant", dt, None, record(
                    k, "_w4_dequant", k.int4_dequantize, _meta(4096, 512, dtype=torch.int32),
                    _meta(4096, 4096 // gs, dtype=dt), None if sym else _meta(4096, 4096 // gs, dtype=dt), gs, 4096,
                    _meta(4096, 4096, dtype=dt))


def sweep_int8():
    import torch
    from sparsekit.kernels import int8 as k
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for kk in (512, 1000, 4096, 11008):
            for bits in (None, torch.int8):
                for qmax in (127.0, 7.0):
                    yield "_act_quant", dt, None, record(
                        k, "_act_quant", k.per_token_quant, _meta(64, kk, dtype=dt),
                        None if bits is None else _meta(64, dtype=bits), qmax, _meta(64, kk, dtype=torch.int8),
                        _meta(64, dtype=torch.float32))
    for n, kk in NK:
        for m in MS:
            for dt in (torch.float16, torch.bfloat16):
                yield "_w8a8_fwd", torch.int8, None, record(
                    k, "_w8a8_fwd", k.w8a8_linear, _meta(m, kk, dtype=torch.int8), _meta(m, dtype=torch.float32),
                    _meta(n, kk, dtype=torch.int8), _meta(n, dtype=torch.float32), _meta(n, dtype=dt),
                    _meta(m, n, dtype=dt))
                for gs in (32, 128, kk):
                    for sym in (False, True):
                        g = max(kk // gs, 1)
                        yield "_w4a8_fwd", torch.int8, None, record(
                            k, "_w4a8_fwd", k.w4a8_linear, _meta(m, kk, dtype=torch.int8),
                            _meta(m, dtype=torch.float32), _meta(n, kk // 8, dtype=torch.int32),
                            _meta(n, g, dtype=dt), None if sym else _meta(n, g, dtype=dt), gs, kk, _meta(n, dtype=dt),
                            _meta(m, n, dtype=dt))
    for sym in (False, True):
        yield "_w4_unpack", torch.int8, None, record(
            k, "_w4_unpack", k.unpack_w4_int8, _meta(4096, 512, dtype=torch.int32),
            None if sym else _meta(4096, 32, dtype=torch.float16), 128, 4096, _meta(4096, 4096, dtype=torch.int8))


BLOCKS = ((32, 32), (64, 64), (128, 128))


def sweep_block_sparse():
    import torch
    from sparsekit.kernels import block_sparse as k
    N = K = 4096
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for tf32 in _tf32_modes(dt):
            _set_tf32(tf32)
            for bm, bk in BLOCKS:
                nb, kb = N // bm, K // bk
                for dens in (0.01, 0.25):
                    nnzb = max(1, int(nb * kb * dens))
                    blk = _meta(nnzb, bm, bk, dtype=dt)
                    i32 = lambda *s: _meta(*s, dtype=torch.int32)
                    for m in MS:
                        yield "_bsr_fwd", dt, tf32, record(k, "_bsr_fwd", k.block_sparse_linear,
                                                           _meta(m, K, dtype=dt), blk, i32(nb + 1), i32(nnzb), N, K,
                                                           _meta(N, dtype=dt), _meta(m, N, dtype=dt))
                        yield "_bsr_dx", dt, tf32, record(k, "_bsr_dx", k.block_sparse_grad_input,
                                                          _meta(m, N, dtype=dt), blk, i32(kb + 1), i32(nnzb),
                                                          i32(nnzb), K, _meta(m, K, dtype=dt))
                        yield "_bsr_dw", dt, tf32, record(k, "_bsr_dw", k.block_sparse_grad_blocks,
                                                          _meta(m, N, dtype=dt), _meta(m, K, dtype=dt), i32(nnzb),
                                                          i32(nnzb), i32(nnzb), N, K, _meta(nnzb, bm, bk, dtype=dt))
    _set_tf32(False)


def sweep_triple_gate_conv():
    import torch
    from sparsekit.kernels import triple_gate_conv as k

    def frame(n, c, h, w, dt):
        return _meta(n, c, h, w, dtype=dt).to(memory_format=torch.channels_last)

    i32 = lambda *s: _meta(*s, dtype=torch.int32)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for tf32 in _tf32_modes(dt):
            _set_tf32(tf32)
            for c, co in ((3, 64), (16, 32), (64, 64), (128, 128), (256, 256)):
                for ks, st, pd, dl in ((3, 1, 1, 1), (1, 1, 0, 1)):
                    for tile in (8,):
                        n, h = 2, 56
                        ho = (h + 2 * pd - dl * (ks - 1) - 1) // st + 1
                        th = -(-ho // tile)
                        w = _meta(co, c, ks, ks, dtype=dt).to(memory_format=torch.channels_last)
                        for bias in (True, False):
                            yield "_tg_conv", dt, tf32, record(
                                k, "_tg_conv", k.conv, frame(n, c, h, h, dt), w, _meta(co, dtype=dt) if bias else None,
                                i32(n * th * th), i32(3), frame(n, co, ho, ho, dt), (st, st), (pd, pd), (dl, dl),
                                tile)
            if tf32 is not True and dt in k.AUTOTUNE_DTYPES:
                for i, cand in enumerate(k.CONV_CONFIGS):       # the autotuner's candidates, as launched
                    w = _meta(64, 64, 3, 3, dtype=dt).to(memory_format=torch.channels_last)
                    yield "_tg_conv", dt, "tuned", record(
                        k, "_tg_conv", k.conv, frame(2, 64, 56, 56, dt), w, _meta(64, dtype=dt), i32(2 * 7 * 7), i32(3),
                        frame(2, 64, 56, 56, dt), (1, 1), (1, 1), (1, 1), 8, config=dict(cand))
    _set_tf32(False)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for c, h, ks, st, pd, dl, tile, skip, prev in ((64, 56, 3, 1, 1, 1, 8, True, True),
                                                       (128, 64, 1, 1, 0, 1, 16, False, False),
                                                       (3, 224, 7, 2, 3, 1, 4, True, False),
                                                       (32, 40, 3, 1, 2, 2, 1, False, True)):
            ho = (h + 2 * pd - dl * (ks - 1) - 1) // st + 1
            th = -(-ho // tile)
            n = 2
            yield "gate", dt, None, record(
                k, ("_pixel_maps", "_tile_gate"), k.gate, frame(n, c, h, h, dt), frame(n, c, h, h, dt),
                _meta(c, dtype=torch.float32) if skip else None, 0.5,
                _meta(n, th, th, dtype=torch.int8) if prev else None, (ks, ks), (st, st), (pd, pd), (dl, dl), tile,
                0.01, -1.0 if skip else None, _meta(n, th, th, dtype=torch.int8), i32(n * th * th), i32(3))
    for tile in (8, 3):
        th = -(-56 // tile)
        yield "_compact", torch.int8, None, record(k, "_compact", k.compact, _meta(2, th, th, dtype=torch.int8),
                                                   i32(2 * th * th), i32(3), 56, 56, tile)


def sweep_draft_attention():
    import torch
    from sparsekit.kernels import draft_attention as k
    B, H, S = 1, 2, 4096
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for tf32 in _tf32_modes(dt):
            _set_tf32(tf32)
            for d in k.HEAD_DIMS + (72, 96):          # tuned dims, and two on a padded tile
                for block_t in (64, 128):
                    nb = S // block_t
                    for even in (True, False):
                        q = _meta(B, H, S, d, dtype=dt)
                        yield "_bsa_fwd", dt, tf32, record(
                            k, "_bsa_fwd", k.block_sparse_attention, q, q, q, _meta(B, H, S, d, dtype=dt),
                            _meta(nb * block_t, dtype=torch.int32), _meta(B, H, nb, nb, dtype=torch.int32),
                            _meta(B, H, nb, dtype=torch.int32), block_t, d ** -0.5, even)
    _set_tf32(False)


SWEEPS = dict(sparse24=sweep_sparse24, sparse24_int4=sweep_sparse24_int4, int4=sweep_int4, int8=sweep_int8,
              block_sparse=sweep_block_sparse, triple_gate_conv=sweep_triple_gate_conv,
              draft_attention=sweep_draft_attention)


# ---------------------------------------------------------------------------------------------
# compiling one recorded launch

_TYPES = None


def _type_name(dtype):
    global _TYPES
    if _TYPES is None:
        import torch
        _TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int8: "i8",
                  torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}
    return _TYPES[dtype]


def specialize(fn, args, kwargs):
    """(signature, constexprs, attrs, options, description) of a launch, as a real launch specializes it."""
    import torch
    params = list(fn.params)
    bound = dict(zip([p.name for p in params], args), **{k: v for k, v in kwargs.items() if k not in LAUNCH_OPTS})
    if len(bound) != len(params):
        missing = [p.name for p in params if p.name not in bound]
        raise TypeError(f"{fn.__name__}: launch does not bind {missing}")
    sig, const, attrs, ptrs = {}, {}, {}, []
    for i, p in enumerate(params):
        v = bound[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _type_name(v.dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
            ptrs.append(f"{p.name}:{_type_name(v.dtype)}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{fn.__name__}: unexpected argument {p.name}={v!r}")
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        elif v == 1:
            sig[p.name] = "constexpr"
            const[p.name] = 1
        else:
            sig[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    if any(v for n, v in const.items() if n.startswith("INTERP") or n == "INTERP"):
        raise AssertionError(f"{fn.__name__}: interpreter flags set on a GPU launch")
    options = {k: kwargs[k] for k in LAUNCH_OPTS if k in kwargs}
    cfg = {n: v for n, v in const.items() if n.isupper() and not n.startswith("INTERP")}
    return sig, const, attrs, options, cfg, " ".join(ptrs)


def _tools():
    import triton
    d = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    path = os.path.join(d, "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


_OP = re.compile(r"/\*[0-9a-f]{4,5}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
TC_PREFIX = ("HGMMA", "IGMMA", "QGMMA", "HMMA", "IMMA", "BGMMA")


def load_width(op: str) -> int:
    """Bytes per thread of a global load opcode (LDG... / LDGSTS...)."""
    parts = op.split(".")
    for w, n in (("128", 16), ("64", 8)):
        if w in parts:
            return n
    if any(p in ("U8", "S8") for p in parts):
        return 1
    if any(p in ("U16", "S16") for p in parts):
        return 2
    return 4


def analyze(cubin: bytes, shared: int, function: str | None = None) -> dict:
    """Resource usage and SASS counts of a cubin (see the module docstring); ``function`` (a mangled
    name) restricts both to that kernel of a cubin that holds several."""
    tool = _tools()
    only = ["-fun", function] if function else []
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        res = subprocess.run([tool, "-res-usage", *only, path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", *only, path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    m = _RES.search(res)
    regs, stack, _static_smem, local = (int(x) for x in m.groups()) if m else (-1, -1, -1, -1)
    ops = collections.Counter()
    tc_ops = collections.Counter()
    wait0 = inflight = 0
    loads = collections.Counter()
    for op, rest in _OP.findall(sass):
        ops[op] += 1
        if op.startswith(TC_PREFIX):
            tc_ops[op] += 1
        if op.startswith("WARPGROUP.DEPBAR"):
            if re.search(r"gsb0\s*,\s*0x0\b", rest):
                wait0 += 1
            elif re.search(r"gsb0\s*,\s*0x[1-9a-f]", rest):
                inflight += 1
        if op.startswith("LDG") and not op.startswith("LDGDEPBAR"):
            loads[load_width(op)] += 1
    stl = sum(n for op, n in ops.items() if op.startswith("STL"))
    ldl = sum(n for op, n in ops.items() if op.startswith("LDL"))
    return dict(regs=regs, stack=max(stack, local), smem=shared, stl=stl, ldl=ldl,
                tc=sum(tc_ops.values()), tc_op=tc_ops.most_common(1)[0][0] if tc_ops else "",
                wait0=wait0, inflight=inflight, bar=sum(n for op, n in ops.items() if op.startswith("BAR.")),
                ld16=loads[16], ld8=loads[8], ld4=loads[4], ld2=loads[2], ld1=loads[1],
                cp_async=sum(n for op, n in ops.items() if op.startswith("LDGSTS")),
                tma=sum(n for op, n in ops.items() if op.startswith("UTMALDG")), sass=sass)


def _compile_and_analyze(fn, args, kwargs, arch):
    try:
        k = compile_launch(fn, args, kwargs, arch)
        return analyze(k.asm["cubin"], k.metadata.shared), "OK"
    except Exception as e:  # a compile failure is a gate failure, reported as a row
        return None, "COMPILE-ERROR " + type(e).__name__ + ": " + " ".join(str(e).split())[:300]


def compile_isolated(fn, args, kwargs, arch):
    """(stats, status) of one config, compiled in a forked child: Triton's compiler can abort the
    process (``LLVM ERROR`` on some configs), and that must become a failing row, not a dead run."""
    import multiprocessing
    empty = dict({c: -1 for c in EXACT}, tc_op="", sass="")
    if not hasattr(os, "fork"):
        stats, status = _compile_and_analyze(fn, args, kwargs, arch)
        return stats or empty, status
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    err = tempfile.TemporaryFile()

    def child():
        os.dup2(err.fileno(), 2)
        send.send(_compile_and_analyze(fn, args, kwargs, arch))
        send.close()

    proc = ctx.Process(target=child)
    proc.start()
    send.close()
    result = None
    try:
        result = recv.recv()
    except EOFError:
        pass
    proc.join()
    if result is None:
        err.seek(0)
        tail = [ln for ln in err.read().decode(errors="replace").splitlines()
                if "ERROR" in ln or "error:" in ln or "Illegal" in ln][-3:]
        return empty, (f"COMPILE-CRASH exit {proc.exitcode}: " + " | ".join(tail))[:400]
    stats, status = result
    return stats or empty, status


def compile_launch(fn, args, kwargs, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, const, attrs, options, _, _ = specialize(fn, args, kwargs)
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


# ---------------------------------------------------------------------------------------------
# family "csrc": the CUDA C++ kernels of csrc/ (no Triton involved; the rows are the same for every
# triton version, but each version's table carries them)
#
# Every csrc/**/*.cu is compiled with ``nvcc -cubin`` for sm_90a and sm_80 (the architectures setup.py
# builds), and every __global__ function in the cubin (each template instantiation) is read with
# :func:`analyze`: one row per (instantiation, arch).  Shared memory is the kernel's static shared
# memory (its ``.nv.shared.<name>`` ELF section) plus the dynamic shared memory its launcher asks
# for.  The launchers are plain C++ (csrc/sparse24/sparse24.h), so that number comes from running
# them on the CPU: a small host program (:data:`CSRC_PROBE`) links the .cu files against stand-ins
# for the few CUDA runtime entry points a launch goes through and prints every launch's kernel,
# threads per block and dynamic shared memory, over a sweep of shapes, dtypes and alignments that
# reaches every dispatch branch.  Without nvcc (or without the csrc/ sources, or c++filt) the
# family reports why and yields no rows; ``--compare`` then leaves the committed csrc rows alone.

CSRC_ARCH = {90: "90a", 80: "80"}                 # what setup.py / scripts/compile_csrc.sh build
CSRC_MATMUL_KERNELS = {"sparse24_mma_sp_kernel"}  # sparse tensor cores (mma.sp): HMMA / IMMA expected
# template parameter names, for the config column (unknown kernels get positional names)
CSRC_TEMPLATE_PARAMS = {"sparse24_gemv_kernel": ("T", "MT", "FAST", "XVEC"),
                        "sparse24_mma_sp_kernel": ("T", "TO", "TILE"),
                        "TileCfg": ("BN", "BM", "WN", "WM", "STAGES")}
CSRC_TYPES = {"__half": "fp16", "__nv_bfloat16": "bf16", "float": "fp32", "signed char": "i8", "int8_t": "i8",
              "int": "i32"}
CSRC_NVCC_FLAGS = ("-std=c++17", "-O3", "--expt-relaxed-constexpr")
CSRC_RESERVED_SMEM = 1024                         # shared memory the system reserves per block (sm_80+)

# The launch probe: host code only, linked with the csrc objects.  The functions below stand in for the
# CUDA runtime: kernel registration maps each host stub to its kernel's (mangled) name, and a launch
# (``<<<>>>``: push / pop of the launch configuration, then cudaLaunchKernel or, since CUDA 13,
# __cudaGetKernel + __cudaLaunchKernel) prints it.  Device pointers are fake addresses: the launchers
# only check their alignment.
CSRC_PROBE = r"""
#include <cstdint>
#include <cstdio>
#include <map>
#include <cuda_runtime.h>
#include "sparse24/sparse24.h"

namespace {
std::map<const void*, const char*>& names() { static std::map<const void*, const char*> m; return m; }
dim3 g_grid, g_block;
size_t g_smem = 0;
void record(const void* f, dim3 b, size_t smem) {
  auto it = names().find(f);
  std::printf("LAUNCH %s %u %zu\n", it == names().end() ? "?" : it->second, b.x * b.y * b.z, smem);
}
template <typename T> const T* cptr(uintptr_t a) { return reinterpret_cast<const T*>(a); }
template <typename T> T* ptr(uintptr_t a) { return reinterpret_cast<T*>(a); }
constexpr uintptr_t kBase = uintptr_t(1) << 24;  // 16-byte aligned fake device addresses

template <typename T>
void gemv() {
  const int NK[][2] = {{4096, 4096}, {4099, 11008}, {33, 37}, {65, 256}};
  // byte offsets that break the 16-byte alignment of x, values, meta (one at a time, then all)
  const int off[][3] = {{0, 0, 0}, {2, 0, 0}, {0, 4, 0}, {0, 0, 1}, {2, 4, 1}};
  for (auto& nk : NK)
    for (auto& o : off)
      for (int M = 1; M <= sparsekit::kSparse24GemvMaxM; ++M) {
        const int N = nk[0], K = nk[1];
        const int64_t ldx = (M > 1 && K % 8) ? K + 8 - K % 8 : K;  // padded rows too
        sparsekit::sparse24_gemv_launch<T>(cptr<T>(kBase + o[0]), ldx, cptr<T>(2 * kBase + o[1]),
                                           cptr<uint8_t>(3 * kBase + o[2]), cptr<T>(4 * kBase), ptr<T>(5 * kBase),
                                           N, M, N, K, 0);
        sparsekit::sparse24_gemv_launch<T>(cptr<T>(kBase + o[0]), K, cptr<T>(2 * kBase + o[1]),
                                           cptr<uint8_t>(3 * kBase + o[2]), nullptr, ptr<T>(5 * kBase), N, M, N, K, 0);
      }
}

template <typename T>
void mma_sp(int cfg, int M) {
  const int N = 4096, K = 4096, Kpad = 4096;
  sparsekit::sparse24_mma_sp_launch<T>(cptr<T>(kBase), K, K, cptr<T>(2 * kBase), Kpad / 2, cptr<uint32_t>(3 * kBase),
                                       cptr<T>(4 * kBase), ptr<T>(5 * kBase), N, M, N, K, Kpad, cfg, 0);
}

template <typename TO>
void mma_sp_int8(int cfg, int M) {
  const int N = 4096, K = 4096, Kpad = 4096;
  sparsekit::sparse24_mma_sp_int8_launch<TO>(cptr<int8_t>(kBase), K, K, cptr<float>(6 * kBase), cptr<int8_t>(2 * kBase),
                                             Kpad / 2, cptr<uint32_t>(3 * kBase), cptr<float>(7 * kBase),
                                             cptr<TO>(4 * kBase), ptr<TO>(5 * kBase), N, M, N, K, Kpad, cfg, 0);
}
}  // namespace

extern "C" {
void** CUDARTAPI __cudaRegisterFatBinary(void*) { static void* handle = nullptr; return &handle; }
void CUDARTAPI __cudaRegisterFatBinaryEnd(void**) {}
void CUDARTAPI __cudaUnregisterFatBinary(void**) {}
void CUDARTAPI __cudaRegisterFunction(void**, const char* host_fun, char* device_fun, const char*, int, uint3*, uint3*,
                                      dim3*, dim3*, int*) {
  names()[host_fun] = device_fun;
}
void CUDARTAPI __cudaRegisterVar(void**, char*, char*, const char*, int, size_t, int, int) {}
char CUDARTAPI __cudaInitModule(void**) { return 1; }
unsigned CUDARTAPI __cudaPushCallConfiguration(dim3 g, dim3 b, size_t s, struct CUstream_st*) {
  g_grid = g; g_block = b; g_smem = s;
  return 0;
}
cudaError_t CUDARTAPI __cudaPopCallConfiguration(dim3* g, dim3* b, size_t* s, void*) {
  *g = g_grid; *b = g_block; *s = g_smem;
  return cudaSuccess;
}
cudaError_t CUDARTAPI __cudaGetKernel(cudaKernel_t* k, const void* f) { *k = (cudaKernel_t)f; return cudaSuccess; }
cudaError_t CUDARTAPI __cudaLaunchKernel(cudaKernel_t k, dim3, dim3 b, void**, size_t s, cudaStream_t) {
  record((const void*)k, b, s);
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaLaunchKernel(const void* f, dim3, dim3 b, void**, size_t s, cudaStream_t) {
  record(f, b, s);
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t CUDARTAPI cudaGetLastError(void) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) { return cudaSuccess; }
const char* CUDARTAPI cudaGetErrorString(cudaError_t) { return "probe"; }
}

int main() {
  gemv<float>();
  gemv<__half>();
  gemv<__nv_bfloat16>();
  for (int cfg = -1; cfg < 3; ++cfg)
    for (int M : {1, 33, 65, 4096}) {
      mma_sp<__half>(cfg, M);
      mma_sp<__nv_bfloat16>(cfg, M);
      mma_sp_int8<__half>(cfg, M);
      mma_sp_int8<__nv_bfloat16>(cfg, M);
      mma_sp_int8<float>(cfg, M);
    }
  return 0;
}
"""


def csrc_root() -> str | None:
    """The checkout's csrc/ directory (None for an installed copy without the sources)."""
    d = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    return d if os.path.isdir(d) else None


def find_nvcc() -> str | None:
    """nvcc: $NVCC, the one on PATH, the toolkit scripts/cuda_home.py finds (if the checkout has it),
    $CUDA_HOME / $CUDA_PATH, /usr/local/cuda*; None if there is none."""
    import glob
    import shutil
    if os.environ.get("NVCC"):
        return shutil.which(os.environ["NVCC"])
    found = shutil.which("nvcc")
    if found:
        return found
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    homes = []
    finder = os.path.join(root, "scripts", "cuda_home.py")
    if os.path.exists(finder):
        try:
            r = subprocess.run([sys.executable, finder], capture_output=True, text=True, timeout=60)
            if r.returncode == 0 and r.stdout.strip():
                homes.append(r.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError):
            pass
    homes += [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    homes += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for h in homes:
        if h and os.access(os.path.join(h, "bin", "nvcc"), os.X_OK):
            return os.path.join(h, "bin", "nvcc")
    return None


def _csrc_demangler() -> str | None:
    import shutil
    return shutil.which("c++filt") or shutil.which("cu++filt")


def demangle(names: list, tool: str) -> dict:
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def _csrc_key(demangled: str) -> str:
    """A kernel's name without the file-specific anonymous namespace, for matching across compiles."""
    return " ".join(demangled.replace("(anonymous namespace)::", "").split())


def _split_args(text: str) -> list:
    """Top-level comma split of a template argument list."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _template(text: str):
    """'ns::name<a, b<c> >(params)' -> ('name', ['a', 'b<c>'])."""
    text = text.strip()
    if text.startswith("void "):
        text = text[5:]
    depth, lt = 0, -1
    for i, ch in enumerate(text):                    # the template list of the outermost name
        if ch == "<":
            if depth == 0 and lt < 0:
                lt = i
            depth += 1
        elif ch == ">":
            depth -= 1
            if depth == 0 and lt >= 0:
                return text[:lt].split("::")[-1], _split_args(text[lt + 1:i])
        elif ch == "(" and depth == 0:
            break
    return text.split("(")[0].split("::")[-1], []


def _csrc_value(arg: str) -> str:
    arg = arg.replace("(anonymous namespace)::", "").replace("sparsekit::", "")
    if arg in CSRC_TYPES:
        return CSRC_TYPES[arg]
    if arg in ("true", "false"):
        return str(int(arg == "true"))
    name, args = _template(arg)
    if args:
        params = CSRC_TEMPLATE_PARAMS.get(name, ())
        return " ".join(f"{params[i] if i < len(params) else f'{name}{i}'}={_csrc_value(a)}"
                        for i, a in enumerate(args))
    return arg.replace(" ", "")


def csrc_describe(demangled: str):
    """(kernel, mode, config) of a kernel instantiation: mode = the first template argument's type."""
    name, args = _template(demangled.replace("(anonymous namespace)::", ""))
    params = CSRC_TEMPLATE_PARAMS.get(name, ())
    mode, items = "", []
    for i, a in enumerate(args):
        p = params[i] if i < len(params) else f"A{i}"
        v = _csrc_value(a)
        if i == 0 and p == "T":
            mode = v
        elif "=" in v:
            items.append(v)
        else:
            items.append(f"{p}={v}")
    return name, mode or "-", " ".join(items)


def _elf_sections(blob: bytes) -> dict:
    """{section name: size} of an ELF64 little-endian file (a cubin)."""
    import struct
    if blob[:4] != b"\x7fELF" or blob[4] != 2:
        return {}
    shoff, = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", blob, 0x3A)
    heads = [struct.unpack_from("<IIQQQQIIQQ", blob, shoff + i * shentsize) for i in range(shnum)]
    str_off = heads[shstrndx][4]

    def name(off):
        end = blob.index(b"\0", str_off + off)
        return blob[str_off + off:end].decode(errors="replace")
    return {name(h[0]): h[5] for h in heads}


def csrc_sources(root: str) -> list:
    import glob
    return sorted(glob.glob(os.path.join(root, "**", "*.cu"), recursive=True))


def csrc_source_hash(root: str, src: str) -> str:
    """Hash of a .cu file and of every header under csrc/ (what its kernels can include), except the CPU C
    extension's own (csrc/cpu/: compiled by the host compiler into sparsekit._cpu_ext, never by nvcc)."""
    import glob
    h = hashlib.sha1()
    cpu = os.path.join(root, "cpu") + os.sep
    headers = sorted(p for p in glob.glob(os.path.join(root, "**", "*.h"), recursive=True)
                     + glob.glob(os.path.join(root, "**", "*.cuh"), recursive=True) if not p.startswith(cpu))
    for p in [src] + headers:
        h.update(os.path.relpath(p, root).encode() + b"\0")
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def compile_cubin(nvcc: str, root: str, src: str, arch: int) -> bytes:
    a = CSRC_ARCH[arch]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "k.cubin")
        subprocess.run([nvcc, *CSRC_NVCC_FLAGS, "-I" + root, "-cubin", "-gencode", f"arch=compute_{a},code=sm_{a}",
                        "-o", out, src], capture_output=True, text=True, check=True)
        with open(out, "rb") as f:
            return f.read()


def csrc_launches(nvcc: str, root: str, demangler: str) -> dict:
    """{kernel key: (threads, dynamic smem)} of every launch the csrc launchers make over the probe's
    sweep.  Compiled and run once per source state (cached under the temp dir; a lock serializes
    the per-arch workers)."""
    import fcntl
    sources = csrc_sources(root)
    h = hashlib.sha1(CSRC_PROBE.encode() + nvcc.encode())
    for s in sources:
        h.update(csrc_source_hash(root, s).encode())
    d = os.path.join(tempfile.gettempdir(), f"sparsekit_gate_csrc_{os.getuid()}", h.hexdigest()[:16])
    os.makedirs(d, exist_ok=True)
    out_path = os.path.join(d, "launches.txt")
    with open(os.path.join(d, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(out_path):
            probe = os.path.join(d, "probe.cpp")
            with open(probe, "w") as f:
                f.write(CSRC_PROBE)
            exe = os.path.join(d, "probe")
            # PTX only: the probe needs the host stubs, not machine code
            subprocess.run([nvcc, *CSRC_NVCC_FLAGS, "-cudart", "none", "-I" + root,
                            "-gencode", "arch=compute_80,code=compute_80", "-o", exe, probe, *sources],
                           capture_output=True, text=True, check=True, cwd=d)
            text = subprocess.run([exe], capture_output=True, text=True, check=True, timeout=120).stdout
            with open(out_path + ".tmp", "w") as f:
                f.write(text)
            os.replace(out_path + ".tmp", out_path)
    with open(out_path) as f:
        lines = [ln.split() for ln in f if ln.startswith("LAUNCH ")]
    names = demangle(sorted({ln[1] for ln in lines}), demangler)
    out = {}
    for ln in lines:
        key = _csrc_key(names[ln[1]])
        threads, smem = int(ln[2]), int(ln[3])
        prev = out.get(key, (threads, 0))
        out[key] = (threads, max(smem, prev[1]))
    return out


def _csrc_functions(cubin: bytes) -> list:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        res = subprocess.run([_tools(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    return re.findall(r"^\s*Function\s+(\S+):\s*$", res, re.M)


def run_csrc(archs=ARCHS, sass_pattern: str | None = None, strides: dict | None = None,
             compile_: bool = True) -> list:
    """Rows of the csrc kernels: every __global__ instantiation of every csrc/**/*.cu, per arch.

    A stride of 0 for an arch (or ``compile_=False``) skips that arch: a .cu compiles as a whole, so
    any other stride compiles every kernel.  No rows (and a printed reason) without nvcc, c++filt or
    the sources."""
    root, nvcc, demangler = csrc_root(), find_nvcc(), _csrc_demangler()
    why = ("no csrc/ sources next to the package" if root is None else "nvcc not found" if nvcc is None
           else "no c++filt to demangle kernel names" if demangler is None else None)
    if why:
        print(f"CSRC-SKIP csrc: {why}")
        return []
    archs = [a for a in archs if compile_ and (strides or {}).get(a, 1) > 0]
    if not archs:
        return []
    pat = re.compile(sass_pattern) if sass_pattern else None
    try:
        launches = csrc_launches(nvcc, root, demangler)
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", "") or str(e)
        print(f"CSRC-PROBE-ERROR launch probe failed (dynamic shared memory unknown): {' '.join(err.split())[:400]}")
        launches = None
    rows = []
    for src in csrc_sources(root):
        rel = os.path.relpath(src, root)
        src_hash = csrc_source_hash(root, src)
        for arch in archs:
            t0 = time.perf_counter()
            try:
                cubin = compile_cubin(nvcc, root, src, arch)
            except subprocess.CalledProcessError as e:
                rows.append(dict(family="csrc", kernel=os.path.basename(rel), src=src_hash, arch=arch, mode="-",
                                 config="", args=rel, tuned=0, expect_tc=0, **{c: -1 for c in EXACT}, tc_op="",
                                 status="COMPILE-ERROR " + " ".join((e.stderr or "").split())[:300]))
                continue
            sections = _elf_sections(cubin)
            # sm_90 cubins count the 1 KiB the system reserves per block (present when the cubin has a
            # .nv.shared.reserved section) in each kernel's .nv.shared section; like Triton's
            # metadata.shared (and the limits in SMEM_LIMIT), smem counts what the kernel allocates
            reserved = CSRC_RESERVED_SMEM if any(k.startswith(".nv.shared.reserved") for k in sections) else 0
            fns = _csrc_functions(cubin)
            names = demangle(fns, demangler)
            for fn in fns:
                key = _csrc_key(names[fn])
                kernel, mode, cfg = csrc_describe(names[fn])
                static = max(sections.get(".nv.shared." + fn, 0) - reserved, 0)
                if launches is not None:
                    threads, dyn = launches.get(key, (0, 0))
                    cfg = (cfg + f" threads={threads}" if threads else cfg + " launched=0").strip()
                else:
                    dyn = 0
                row = dict(family="csrc", kernel=kernel, src=src_hash, arch=arch, mode=mode, config=cfg, args=rel,
                           tuned=0, expect_tc=int(kernel in CSRC_MATMUL_KERNELS))
                stats = analyze(cubin, static + dyn, function=fn)
                sass = stats.pop("sass")
                row.update(stats, status="OK", compile_s=round(time.perf_counter() - t0, 2))
                probs = problems(row)
                if probs:
                    row["status"] = "FAIL " + "; ".join(probs)
                if pat and pat.search(f"{kernel} sm_{arch} {mode} {cfg}"):
                    print(f"==== {kernel} sm_{arch} {mode} {cfg} {rel}\n{sass}")
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# the gate

def mode_of(dtype, tf32) -> str:
    name = _type_name(dtype)
    if name != "fp32":
        return name
    return "fp32-tf32" if tf32 is True else "fp32-ieee"


def expects_tc(kernel: str, mode: str) -> bool:
    return kernel in MATMUL_KERNELS and mode != "fp32-ieee"


def problems(row: dict) -> list:
    """Why a row breaks the gate ([] = it passes)."""
    out = []
    if row["status"] == "NOT-COMPILED":
        return out
    if str(row["status"]).startswith("COMPILE-"):
        return [row["status"]]
    if int(row["stack"]) > 0 or int(row["stl"]) > 0 or int(row["ldl"]) > 0:
        out.append(f"spills (stack {row['stack']} B, {row['stl']} STL / {row['ldl']} LDL)")
    if str(row["expect_tc"]) in ("1", "True") and int(row["tc"]) == 0:
        out.append("no tensor-core instructions")
    if int(row["smem"]) > SMEM_LIMIT[int(row["arch"])]:
        out.append(f"shared memory {row['smem']} B over the sm_{row['arch']} limit {SMEM_LIMIT[int(row['arch'])]}")
    return out


def _fmt_cfg(kernel, cfg, options):
    items = [f"{k}={v}" for k, v in sorted(cfg.items())] + [f"{k}={v}" for k, v in sorted(options.items())]
    return " ".join(items)


def collect(family: str, arch: int = 90) -> list:
    """The distinct launches of a family on an sm_``arch`` device: [(kernel, mode, tuned, config, args, fn, a, kw)]
    (launchers may choose per architecture: each architecture compiles what it would be given)."""
    gpu_context(arch=arch)
    seen = {}
    for _label, dtype, tf32, launches in SWEEPS[family]():
        tuned = tf32 == "tuned"
        for fn, a, kw in launches:
            _, const, attrs, options, cfg, ptrs = specialize(fn, a, kw)
            name = fn.__name__
            mode = mode_of(dtype, None if tuned else tf32)
            if name in ("_act_quant", "_pixel_maps", "_tile_gate"):
                mode = _type_name(dtype)
            # a config = the tile / pipeline choices; shape ints, strides and feature flags (bias,
            # zero points, masking) are specializations of the same config: the first one seen stands
            # for them (the sweeps put the most general variant first: bias on, asymmetric, M=1 for small M)
            shape = tuple(sorted((n, min(v, 2) if n.startswith("SPLIT") else v)
                                 for n, v in cfg.items() if n in CONFIG_KEYS))
            key = (name, mode, ptrs, shape, tuple(sorted(options.items())))
            if key not in seen:
                seen[key] = (name, mode, tuned, _fmt_cfg(name, cfg, options), ptrs, fn, a, kw)
    return list(seen.values())


def source_hash(fn) -> str:
    """Triton's own hash of a kernel's source and of every @triton.jit helper it calls."""
    return hashlib.sha1(fn.cache_key.encode()).hexdigest()[:12]


def sampled(family, name, mode, cfg, ptrs, arch, stride: int) -> bool:
    """Deterministic 1-in-``stride`` choice of configs (stride 1 = all, 0 = none)."""
    if stride <= 0:
        return False
    h = int(hashlib.sha1(f"{family}|{name}|{mode}|{cfg}|{ptrs}|{arch}".encode()).hexdigest()[:8], 16)
    return h % stride == 0


def run_family(family: str, archs=ARCHS, sass_pattern: str | None = None, strides: dict | None = None,
               compile_: bool = True) -> list:
    """Rows for a family's configs; ``strides`` {arch: n} compiles 1 in n (default all); configs not
    compiled (or ``compile_=False``) come back with status ``NOT-COMPILED`` and no numbers."""
    if family == "csrc":
        return run_csrc(archs, sass_pattern, strides, compile_)
    rows = []
    pat = re.compile(sass_pattern) if sass_pattern else None
    for arch in archs:
        for name, mode, tuned, cfg, ptrs, fn, a, kw in collect(family, arch):
            row = dict(family=family, kernel=name, src=source_hash(fn), arch=arch, mode=mode, config=cfg, args=ptrs,
                       tuned=int(tuned), expect_tc=int(expects_tc(name, mode)))
            if not compile_ or not sampled(family, name, mode, cfg, ptrs, arch, (strides or {}).get(arch, 1)):
                row["status"] = "NOT-COMPILED"
                rows.append(row)
                continue
            t0 = time.perf_counter()
            stats, status = compile_isolated(fn, a, kw, arch)
            row["status"] = status
            row["compile_s"] = round(time.perf_counter() - t0, 2)
            sass = stats.pop("sass")
            row.update(stats)
            probs = problems(row)
            if probs and row["status"] == "OK":
                row["status"] = "FAIL " + "; ".join(probs)
            if pat and pat.search(f"{name} sm_{arch} {mode} {cfg}"):
                print(f"==== {name} sm_{arch} {mode} {cfg} {ptrs}\n{sass}")
            rows.append(row)
    return rows


def _row_key(r):
    return (r["family"], r["kernel"], int(r["arch"]), r["mode"], r["args"], r["config"])


def write_tables(rows: list, out_dir: str) -> list:
    """Write ``sm_<arch>.csv`` per architecture (rows of other families already there are kept) + summary.md."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    families = {r["family"] for r in rows}
    everything = []
    for arch in sorted({int(r["arch"]) for r in rows}, reverse=True):
        path = os.path.join(out_dir, f"sm_{arch}.csv")
        kept = [r for r in read_table(path) if r["family"] not in families] if os.path.exists(path) else []
        rs = sorted(kept + [r for r in rows if int(r["arch"]) == arch], key=_row_key)
        everything += rs
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            w.writerows(rs)
        paths.append(path)
    md = os.path.join(out_dir, "summary.md")
    ver = os.path.basename(os.path.normpath(out_dir))
    with open(md, "w") as f:
        f.write(summary_markdown(everything, ver[len("triton-"):] if ver.startswith("triton-") else None))
    paths.append(md)
    return paths


def summary_markdown(rows: list, version: str | None = None) -> str:
    import triton
    lines = [f"# Static performance gate (triton {version or triton.__version__})", "",
             "Per kernel, architecture and mode: configs compiled, the worst register count, configs with spills, "
             "configs missing tensor cores that should have them, the tensor-core instruction, the most "
             "wait-for-all-wgmma points and CTA barriers in one config, and global loads by width summed over the "
             "configs.  Generated by `python -m sparsekit.bench.static_gate --out committed`; one row per config "
             "in the CSVs beside this.",
             "", "| kernel | arch | mode | configs | max regs | spilling | no TC | tc op | wait0 max | "
             "in-flight waits | bar max | 16B loads | 8B loads | 4B loads | <4B loads | failing |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["kernel"], int(r["arch"]), r["mode"])].append(r)
    for (kernel, arch, mode), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
        ok = [r for r in rs if r["status"] == "OK" or str(r["status"]).startswith("FAIL")]
        spill = sum(1 for r in ok if int(r["stack"]) or int(r["stl"]) or int(r["ldl"]))
        notc = sum(1 for r in ok if int(r["expect_tc"]) and not int(r["tc"]))
        ops = sorted({r["tc_op"].split(".")[0] for r in ok if r["tc_op"]})
        fail = sum(1 for r in rs if problems(r))
        tot = lambda c: sum(int(r[c]) for r in ok)
        lines.append(f"| {kernel} | sm_{arch} | {mode} | {len(ok)} | {max((int(r['regs']) for r in ok), default=-1)} "
                     f"| {spill} | {notc} | {' '.join(ops)} "
                     f"| {max((int(r['wait0']) for r in ok), default=0)} | {tot('inflight')} "
                     f"| {max((int(r['bar']) for r in ok), default=0)} "
                     f"| {tot('ld16')} | {tot('ld8')} | {tot('ld4')} | {tot('ld2') + tot('ld1')} | {fail} |")
    return "\n".join(lines) + "\n"


def read_table(path: str) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def compare(rows: list, committed: list) -> list:
    """Differences between fresh rows and a committed table of the same triton version: the config set,
    each kernel's source hash, and (for rows compiled now) every count in :data:`EXACT`."""
    new = {_row_key(r): r for r in rows}
    old = {_row_key(r): r for r in committed}
    diffs = []
    for k in sorted(set(new) | set(old), key=str):
        if k not in old:
            diffs.append(f"config not in the committed table: {k}")
        elif k not in new:
            diffs.append(f"committed config no longer launched: {k}")
        elif str(old[k]["src"]) != str(new[k]["src"]):
            diffs.append(f"{k}: kernel source changed since the table was written ({old[k]['src']} -> {new[k]['src']})")
        elif new[k]["status"] != "NOT-COMPILED":
            ch = [f"{c} {old[k][c]} -> {new[k][c]}" for c in EXACT if str(old[k][c]) != str(new[k][c])]
            if ch:
                diffs.append(f"{k}: " + ", ".join(ch))
    return diffs


KNOWN_COLUMNS = ["family", "kernel", "arch", "mode", "args", "config", "triton", "problem"]


def known_path(root: str | None = None) -> str:
    """The ledger of known gate failures (one file for every triton version)."""
    root = root or os.path.join(os.path.dirname(os.path.abspath(__file__)), "gate")
    return os.path.join(root, "known_failures.csv")


def read_known(path: str | None = None) -> dict:
    """{row key: ledger entry}; ``entry["triton"]`` is the set of triton versions the config fails on."""
    path = path or known_path()
    if not os.path.exists(path):
        return {}
    out = {}
    for e in read_table(path):
        e = dict(e, arch=int(e["arch"]), triton=set(e["triton"].split()))
        out[_row_key(e)] = e
    return out


def split_known(rows: list, known: dict, version: str):
    """(new failures, known failures, fixed): rows breaking the gate that the ledger does not list for
    this triton version, rows it does list, and listed configs that compiled here and now pass."""
    new, old, fixed = [], [], []
    for r in rows:
        if r["status"] == "NOT-COMPILED":
            continue
        e = known.get(_row_key(r))
        listed = e is not None and version in e["triton"]
        p = problems(r)
        if p:
            (old if listed else new).append((r, p))
        elif listed:
            fixed.append(r)
    return new, old, fixed


def update_known(rows: list, version: str, path: str | None = None) -> str:
    """Record this run in the ledger: every compiled row that breaks the gate is listed for ``version``,
    every compiled row that passes is taken off for ``version`` (entries left with no version go);
    configs not compiled here keep their entries; entries of a family and architecture this run swept
    whose config no launcher chooses any more are taken off for ``version``."""
    path = path or known_path()
    known = read_known(path)
    swept = {(r["family"], int(r["arch"])) for r in rows}
    chosen = {_row_key(r) for r in rows}
    for k, e in known.items():
        if (e["family"], e["arch"]) in swept and k not in chosen:
            e["triton"].discard(version)
    for r in rows:
        if r["status"] == "NOT-COMPILED":
            continue
        k = _row_key(r)
        p = problems(r)
        if p:
            e = known.setdefault(k, dict(family=r["family"], kernel=r["kernel"], arch=int(r["arch"]), mode=r["mode"],
                                         args=r["args"], config=r["config"], triton=set(), problem=""))
            e["triton"].add(version)
            e["problem"] = "; ".join(q.split(" (")[0] for q in p)
        elif k in known:
            known[k]["triton"].discard(version)
    entries = sorted((e for e in known.values() if e["triton"]), key=_row_key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=KNOWN_COLUMNS, lineterminator="\n")
        w.writeheader()
        for e in entries:
            w.writerow(dict(e, triton=" ".join(sorted(e["triton"]))))
    return path


def table_dir(root: str | None = None) -> str:
    import triton
    root = root or os.path.join(os.path.dirname(os.path.abspath(__file__)), "gate")
    return os.path.join(root, f"triton-{triton.__version__}")


def _worker(args):
    family, archs, sass, strides, compile_ = args
    import warnings
    warnings.simplefilter("ignore")
    buf = io.StringIO()
    old, sys.stdout = sys.stdout, buf
    try:
        rows = run_family(family, archs, sass, strides, compile_)
    finally:
        sys.stdout = old
    return family, rows, buf.getvalue()


def run(families=FAMILIES, archs=ARCHS, jobs: int | None = None, sass: str | None = None,
        strides: dict | None = None, compile_: bool = True) -> list:
    """Rows of the families, compiled in worker processes (spawned: no state leaks into the caller).

    The work is split by (family, arch) so both cores stay busy."""
    import multiprocessing
    tasks = [(f, (a,), sass, strides, compile_) for f in families for a in archs]
    # biggest first: the pool then ends together
    weight = dict(block_sparse=6, triple_gate_conv=5, int8=3, sparse24=3, sparse24_int4=2, int4=2, csrc=2,
                  draft_attention=1)
    tasks.sort(key=lambda t: -weight.get(t[0], 1))
    jobs = jobs or min(len(tasks), os.cpu_count() or 1)
    rows = []
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for _family, rs, text in pool.map(_worker, tasks):
            if text:
                print(text, end="")
            rows += rs
    return rows


def parse_strides(text: str | None, archs) -> dict:
    """'90=1,80=4' -> {90: 1, 80: 4} (1 = every config, n = one in n, 0 = none); missing archs -> 1."""
    out = {a: 1 for a in archs}
    for part in (text or "").split(","):
        if part.strip():
            a, n = part.split("=")
            out[int(a)] = int(n)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparsekit.bench.static_gate", description=__doc__.split("\n")[0])
    ap.add_argument("--family", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--arch", nargs="*", type=int, default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--stride", default=None, help="compile one config in n per arch, e.g. '90=1,80=4' (default all)")
    ap.add_argument("--out", default=None, help="write sm_<arch>.csv + summary.md here ('committed' = bench/gate/triton-<ver>)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a compiled config breaks the gate")
    ap.add_argument("--compare", action="store_true",
                    help="exit 1 if the committed table for this triton version disagrees (configs, sources, counts); "
                         "also checks every committed row against the gate")
    ap.add_argument("--summary", default=None, metavar="DIR",
                    help="only rebuild DIR/summary.md from the CSVs there ('committed' = this triton's table)")
    ap.add_argument("--known", choices=("check", "update"), default="check",
                    help="known failures (bench/gate/known_failures.csv): 'check' (default) lets the configs listed "
                         "for this triton version fail and reports listed ones that pass; 'update' rewrites this "
                         "version's entries for the configs compiled in this run")
    ap.add_argument("--sass", default=None, help="print the SASS of configs matching this regex ('kernel sm_90 mode config')")
    args = ap.parse_args(argv)
    import triton
    if args.summary:
        d = table_dir() if args.summary == "committed" else args.summary
        rows = [r for a in ARCHS if os.path.exists(os.path.join(d, f"sm_{a}.csv"))
                for r in read_table(os.path.join(d, f"sm_{a}.csv"))]
        with open(os.path.join(d, "summary.md"), "w") as f:
            ver = os.path.basename(os.path.normpath(d))
            f.write(summary_markdown(rows, ver[len("triton-"):] if ver.startswith("triton-") else None))
        print("wrote", os.path.join(d, "summary.md"))
        return 0
    strides = parse_strides(args.stride, args.arch)
    t0 = time.time()
    rows = run(args.family, args.arch, args.jobs, args.sass, strides)
    compiled = [r for r in rows if r["status"] != "NOT-COMPILED"]
    version = triton.__version__
    known = read_known()
    bad, listed, fixed = split_known(rows, known, version)
    print(f"static gate (triton {version}): {len(rows)} configs, {len(compiled)} compiled "
          f"({', '.join(args.family)}; sm_{', sm_'.join(map(str, args.arch))}) in {time.time() - t0:.0f}s; "
          f"{len(bad)} new failures, {len(listed)} known failures (bench/gate/known_failures.csv), "
          f"{len(fixed)} listed but passing")
    for r, p in listed:
        print(f"GATE-KNOWN {r['kernel']} sm_{r['arch']} {r['mode']} [{r['config']}] {r['args']} :: {'; '.join(p)}")
    for r, p in bad:
        print(f"GATE-FAIL {r['kernel']} sm_{r['arch']} {r['mode']} [{r['config']}] {r['args']} :: {'; '.join(p)}")
    for r in fixed:
        print(f"GATE-FIXED {r['kernel']} sm_{r['arch']} {r['mode']} [{r['config']}] {r['args']} :: passes now: "
              f"take it off the ledger (--known update)")
    rc = 1 if (args.check and (bad or fixed)) else 0
    if args.compare:
        for arch in args.arch:
            path = os.path.join(table_dir(), f"sm_{arch}.csv")
            if not os.path.exists(path):
                print(f"TABLE-MISSING no committed table {path} for this triton version: nothing to compare")
                continue
            committed = [r for r in read_table(path) if r["family"] in args.family]
            if not any(r["family"] == "csrc" and int(r["arch"]) == arch for r in rows):
                # csrc not compiled here (no nvcc, or a stride of 0): its committed rows are not compared
                committed = [r for r in committed if r["family"] != "csrc"]
            diffs = compare([r for r in rows if int(r["arch"]) == arch], committed)
            diffs += [f"committed row breaks the gate and is not on the ledger: {_row_key(r)}: {'; '.join(problems(r))}"
                      for r in committed if problems(r)
                      and version not in known.get(_row_key(dict(r, arch=int(r["arch"]))), {}).get("triton", ())]
            for d in diffs:
                print(f"TABLE-DIFF sm_{arch} {d}")
            if diffs:
                rc = 1
    if args.known == "update":
        print("wrote", update_known(rows, version))
    if args.out:
        if any(r["status"] == "NOT-COMPILED" for r in rows):
            print("not writing tables: some configs were not compiled (use the default --stride)")
            return rc or 1
        out = table_dir() if args.out == "committed" else args.out
        for p in write_tables(rows, out):
            print("wrote", p)
    return rc


if __name__ == "__main__":
    sys.exit(main())
