"""Adversarial cases for the packed formats and the nn modules (including load_state_dict).

Formats: every constructor and builder gets crafted contents (invalid 2:4
codes, non-finite padding, block indices out of range / unsorted / with a
wrong transposed index, int4 zero points outside [0, 15], int8 code -128,
non-finite scales, wrong shapes, dtypes and devices) and must raise a clear
error; valid but unusual inputs (column-major, N = 0, meta device, casts) must
build a weight equal to the float64 dense math.

Modules: ``load_state_dict`` with crafted tensors must raise a clear error and
leave the module bit-for-bit untouched (checked inside every case); valid
loads (resizing, non-strict, ``assign=True``, nested prefixes) must give a
module computing the dense math; forwards on ``reference`` and ``interpret``
match float64 references, NaN/Inf included.  Crafted checkpoints followed by a
forward on the interpreter run in a child process.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from harness import Case, close_to, print_report, structural_block_linear64, suite_tests

from sparsekit.formats import (BlockSparseWeight, Int4Weight, Int8Weight, Sparse24Int4Weight, Sparse24Int8Weight,
                               Sparse24Weight)
from sparsekit.formats._validate import VALID_META_NIBBLES
from sparsekit.nn import (BlockSparseLinear, DraftAttention, QLinear, SparseLinear, SparseQLinear,
                          TripleGateConv2d)
from sparsekit.ops.act_quant import per_token_quant_reference
from sparsekit.testing import random_2to4

BACKENDS = ("reference", "interpret")
META = torch.device("meta")
INVALID_NIBBLES = [c for c in range(16) if c not in VALID_META_NIBBLES]


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_g(seed)).to(dtype)


def _colmajor(t):
    return t.t().contiguous().t()


# ====================================================================== formats
def _equal_dense(ref64, to_dense=lambda w: w.to_dense()):
    def check(w):
        d = to_dense(w).double()
        assert d.shape == ref64.shape, f"dense shape {tuple(d.shape)} != {tuple(ref64.shape)}"
        assert torch.equal(d, ref64), f"max |diff| {(d - ref64).abs().max().item()}"
    return check


def _format_cases():
    cases = []

    def error(label, fn, names):
        cases.append(Case(f"format {label}", fn, "error", names=names))

    def result(label, fn, check):
        cases.append(Case(f"format {label}", fn, "result", check))

    # ---------------------------------------------------------------- Sparse24Weight
    wd = random_2to4(12, 37, generator=_g(1))
    sp = Sparse24Weight.from_dense(wd)
    v, m = sp.values, sp.meta
    result("sp24 from_dense", lambda: Sparse24Weight.from_dense(wd), _equal_dense(wd.double()))
    result("sp24 column-major", lambda: Sparse24Weight(_colmajor(v), _colmajor(m), (12, 37)),
           _equal_dense(wd.double()))
    result("sp24 N=0", lambda: Sparse24Weight.from_dense(torch.zeros(0, 37)), _equal_dense(torch.zeros(0, 37,
                                                                                                     dtype=torch.double)))
    result("sp24 K=1", lambda: Sparse24Weight.from_dense(wd[:, :1]), _equal_dense(wd[:, :1].double()))
    result("sp24 to-fp16", lambda: sp.to(torch.float16), _equal_dense(wd.half().double()))
    wn = wd.clone()
    wn[wd == 0] = float("nan")               # NaN only at pruned positions: the mask removes it
    result("sp24 nan-at-pruned-with-mask", lambda: Sparse24Weight.from_dense(wn, mask=wd != 0),
           _equal_dense(wd.double()))
    result("sp24 meta-device", lambda: Sparse24Weight(v.to(META), m.to(META), (12, 37)),
           lambda w: None if w.values.device.type == "meta" else (_ for _ in ()).throw(AssertionError("device")))
    for c in INVALID_NIBBLES:
        def bad(c=c):
            mm = m.clone()
            mm[3, 2] = (mm[3, 2] & 0xF0) | c
            return Sparse24Weight(v, mm, (12, 37))
        error(f"sp24 meta-nibble-0x{c:x}", bad, ("i0 < i1",))
    for val in (float("nan"), float("inf"), float("-inf")):
        def pad(val=val):
            cols = Sparse24Weight.columns_from_meta(m)
            vv = v.clone()
            r, c = [int(i) for i in (cols >= 37).nonzero()[-1]]
            vv[r, c] = val
            return Sparse24Weight(vv, m, (12, 37))
        error(f"sp24 padding-{val}", pad, ("padding",))
    error("sp24 not-2:4", lambda: Sparse24Weight.from_dense(torch.ones(4, 8)), ("2:4",))
    error("sp24 mask-shape", lambda: Sparse24Weight.from_dense(wd, mask=torch.ones(3, 3, dtype=torch.bool)), ("mask",))
    error("sp24 from_dense-list", lambda: Sparse24Weight.from_dense([[1.0]]), ("weight",))
    error("sp24 from_dense-int", lambda: Sparse24Weight.from_dense(torch.zeros(4, 8, dtype=torch.int32)), ("floating",))
    error("sp24 from_dense-1d", lambda: Sparse24Weight.from_dense(torch.zeros(8)), ("2-D",))
    error("sp24 shape-len-3", lambda: Sparse24Weight(v, m, (12, 37, 1)), ("shape",))
    error("sp24 shape-negative", lambda: Sparse24Weight(v, m, (-12, 37)), ("shape", "non-negative"))
    error("sp24 shape-str", lambda: Sparse24Weight(v, m, "12x37"), ("shape",))
    error("sp24 values-list", lambda: Sparse24Weight([1.0], m, (12, 37)), ("values",))
    error("sp24 values-int", lambda: Sparse24Weight(v.int(), m, (12, 37)), ("values",))
    error("sp24 values-shape", lambda: Sparse24Weight(v[:, :-1], m, (12, 37)), ("values",))
    error("sp24 meta-int32", lambda: Sparse24Weight(v, m.int(), (12, 37)), ("meta",))
    error("sp24 meta-shape", lambda: Sparse24Weight(v, m[:-1], (12, 37)), ("meta",))
    error("sp24 device-mismatch", lambda: Sparse24Weight(v, m.to(META), (12, 37)), ("device",))
    error("sp24 to-int", lambda: sp.to(torch.int32), ("floating",))
    # ---------------------------------------------------------------- Sparse24Int8Weight
    q8 = Sparse24Int8Weight.from_dense(wd)
    result("sp24i8 from_dense", lambda: Sparse24Int8Weight.from_dense(wd),
           _equal_dense(q8.to_dense(torch.float64), lambda w: w.to_dense(torch.float64)))
    result("sp24i8 column-major", lambda: Sparse24Int8Weight(_colmajor(q8.values), _colmajor(q8.meta),
                                                             q8.scale, (12, 37)),
           _equal_dense(q8.to_dense(torch.float64), lambda w: w.to_dense(torch.float64)))

    def i8edit(name, idx, val):
        def run():
            t = dict(values=q8.values.clone(), meta=q8.meta.clone(), scale=q8.scale.clone())
            t[name][idx] = val
            return Sparse24Int8Weight(t["values"], t["meta"], t["scale"], (12, 37))
        return run

    error("sp24i8 values-minus128", i8edit("values", (0, 0), -128), ("-127, 127",))
    error("sp24i8 scale-nan", i8edit("scale", 3, float("nan")), ("finite",))
    error("sp24i8 scale-inf", i8edit("scale", 3, float("inf")), ("finite",))
    error("sp24i8 meta-0x00", i8edit("meta", (0, 0), 0), ("i0 < i1",))
    error("sp24i8 scale-fp16", lambda: Sparse24Int8Weight(q8.values, q8.meta, q8.scale.half(), (12, 37)), ("scale",))
    error("sp24i8 scale-shape", lambda: Sparse24Int8Weight(q8.values, q8.meta, q8.scale[:-1], (12, 37)), ("scale",))
    error("sp24i8 values-uint8", lambda: Sparse24Int8Weight(q8.values.to(torch.uint8), q8.meta, q8.scale, (12, 37)),
          ("values",))
    wnan = wd.clone()
    wnan[0, wd[0].nonzero()[0, 0]] = float("nan")
    error("sp24i8 from_dense-nan", lambda: Sparse24Int8Weight.from_dense(wnan), ("non-finite",))
    # ---------------------------------------------------------------- BlockSparseWeight
    bw = _randn(40, 37, seed=3)
    mask = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    bs = BlockSparseWeight.from_dense(bw, 16, block_mask=mask)
    ref_b = (bw * mask.repeat_interleave(16, 0).repeat_interleave(16, 1)[:40, :37]).double()
    result("block from_dense", lambda: BlockSparseWeight.from_dense(bw, 16, block_mask=mask), _equal_dense(ref_b))
    result("block from_blocks-int64", lambda: BlockSparseWeight.from_blocks(bs.blocks, bs.crow.long(), bs.col.long(),
                                                                            (40, 37)), _equal_dense(ref_b))
    result("block N=0", lambda: BlockSparseWeight.from_dense(torch.zeros(0, 37), 16),
           _equal_dense(torch.zeros(0, 37, dtype=torch.float64)))
    result("block empty-pattern", lambda: BlockSparseWeight.from_dense(bw, 16, block_mask=torch.zeros(3, 3,
                                                                                                     dtype=torch.bool)),
           _equal_dense(torch.zeros(40, 37, dtype=torch.float64)))
    result("block noncontiguous-blocks", lambda: BlockSparseWeight(bs.blocks.transpose(1, 2).contiguous()
                                                                   .transpose(1, 2), bs.crow, bs.col, bs.tcol_ptr,
                                                                   bs.trow, bs.tblk, (40, 37), 16), _equal_dense(ref_b))

    def bedit(name, fn):
        def run():
            t = dict(blocks=bs.blocks, crow=bs.crow, col=bs.col, tcol_ptr=bs.tcol_ptr, trow=bs.trow, tblk=bs.tblk)
            t[name] = fn(t[name].clone())
            return BlockSparseWeight(t["blocks"], t["crow"], t["col"], t["tcol_ptr"], t["trow"], t["tblk"],
                                     (40, 37), 16)
        return run

    def setv(i, val):
        def f(t):
            t[i] = val
            return t
        return f

    for label, name, fn, names in (
            ("crow-last-huge", "crow", setv(-1, 100000), ("crow",)),
            ("crow-first-1", "crow", setv(0, 1), ("crow",)),
            ("crow-decreasing", "crow", setv(1, 5), ("crow",)),
            ("crow-int32-min", "crow", setv(2, -2 ** 31), ("crow",)),
            ("col-negative", "col", setv(0, -1), ("col",)),
            ("col-past-end", "col", setv(1, 3), ("col",)),
            ("col-int32-max", "col", setv(1, 2 ** 31 - 1), ("col",)),
            ("col-unsorted", "col", lambda t: t[[1, 0, 2, 3, 4]], ("col",)),
            ("tcol_ptr-shifted", "tcol_ptr", lambda t: t + 1, ("transposed",)),
            ("trow-swapped", "trow", lambda t: t.flip(0), ("transposed",)),
            ("tblk-out-of-range", "tblk", setv(0, 50), ("transposed",)),
            ("tblk-negative", "tblk", setv(0, -1), ("transposed",)),
            ("blocks-nan-row-padding", "blocks", setv((-1, 12, 3), float("nan")), ("padding",)),
            ("blocks-inf-col-padding", "blocks", setv((1, 0, 10), float("inf")), ("padding",)),
            ("crow-float", "crow", lambda t: t.float(), ("int32",)),
            ("tblk-int64", "tblk", lambda t: t.long(), ("int32",)),
            ("col-short", "col", lambda t: t[:-1], ("col",)),
            ("blocks-int", "blocks", lambda t: t.int(), ("floating",)),
            ("crow-meta-device", "crow", lambda t: t.to(META), ("device",))):
        error(f"block {label}", bedit(name, fn), names)
    error("block from_blocks-crow", lambda: BlockSparseWeight.from_blocks(bs.blocks, torch.tensor([0, 2, 9, 5]),
                                                                          bs.col, (40, 37)), ("crow",))
    error("block from_blocks-col", lambda: BlockSparseWeight.from_blocks(bs.blocks, bs.crow,
                                                                         torch.tensor([0, 2, -7, 2, 0]), (40, 37)),
          ("col",))
    error("block from_blocks-float", lambda: BlockSparseWeight.from_blocks(bs.blocks, bs.crow.float(), bs.col,
                                                                           (40, 37)), ("crow", "integer"))
    error("block from_blocks-2d-blocks", lambda: BlockSparseWeight.from_blocks(bs.blocks[0], bs.crow, bs.col,
                                                                               (40, 37)), ("blocks",))
    error("block block_size-20", lambda: BlockSparseWeight.from_dense(bw, 20), ("block_size",))
    error("block block_mask-shape", lambda: BlockSparseWeight.from_dense(bw, 16, block_mask=mask[:2]),
          ("block_mask",))
    error("block block_mask-int", lambda: BlockSparseWeight.from_dense(bw, 16, block_mask=mask.int()), ("bool",))
    error("block sparsity-1.5", lambda: BlockSparseWeight.from_dense_magnitude(bw, 16, 1.5), ("sparsity",))
    error("block from_dense-meta", lambda: BlockSparseWeight.from_dense(bw.to(META), 16), ("meta",))
    # ---------------------------------------------------------------- Int4Weight
    w4 = Int4Weight.from_float(_randn(8, 64, seed=4), 32)
    result("int4 column-major", lambda: Int4Weight(_colmajor(w4.qweight), _colmajor(w4.scales), _colmajor(w4.zeros),
                                                   (8, 64), 32),
           _equal_dense(w4.dequantize().double(), lambda w: w.dequantize()))
    result("int4 N=0", lambda: Int4Weight.from_float(torch.zeros(0, 64), 32),
           _equal_dense(torch.zeros(0, 64, dtype=torch.float64), lambda w: w.dequantize()))
    result("int4 group=-1", lambda: Int4Weight.from_float(_randn(8, 40, seed=5), -1),
           lambda w: None if w.group_size == 40 else (_ for _ in ()).throw(AssertionError("group")))

    def zedit(val):
        def run():
            z = w4.zeros.clone()
            z[1, 1] = val
            return Int4Weight(w4.qweight, w4.scales, z, (8, 64), 32)
        return run

    for val in (16.0, -1.0, 7.5, float("nan"), float("inf"), 255.0):
        error(f"int4 zeros-{val}", zedit(val), ("zero",))
    for val in (float("nan"), float("inf"), float("-inf")):
        def sedit(val=val):
            s = w4.scales.clone()
            s[0, 1] = val
            return Int4Weight(w4.qweight, s, w4.zeros, (8, 64), 32)
        error(f"int4 scales-{val}", sedit, ("finite",))
    error("int4 group-48", lambda: Int4Weight(w4.qweight, w4.scales, w4.zeros, (8, 64), 48), ("group_size",))
    error("int4 group-bool", lambda: Int4Weight(w4.qweight, w4.scales, w4.zeros, (8, 64), True), ("group_size",))
    error("int4 K-not-8", lambda: Int4Weight.from_float(_randn(8, 60), -1), ("multiple of 8",))
    error("int4 symmetric-with-zeros", lambda: Int4Weight(w4.qweight, w4.scales, w4.zeros, (8, 64), 32, True),
          ("symmetric",))
    error("int4 asymmetric-no-zeros", lambda: Int4Weight(w4.qweight, w4.scales, None, (8, 64), 32), ("zeros",))
    error("int4 qweight-int64", lambda: Int4Weight(w4.qweight.long(), w4.scales, w4.zeros, (8, 64), 32), ("int32",))
    error("int4 scales-fp32", lambda: Int4Weight(w4.qweight, w4.scales.float(), w4.zeros.float(), (8, 64), 32),
          ("scales",))
    error("int4 zeros-bf16", lambda: Int4Weight(w4.qweight, w4.scales, w4.zeros.bfloat16(), (8, 64), 32), ("zeros",))
    error("int4 from_quantized-16", lambda: Int4Weight.from_quantized(torch.full((8, 64), 16, dtype=torch.uint8),
                                                                      w4.scales, w4.zeros, 32, False), ("[0, 15]",))
    wn4 = _randn(8, 64, seed=6)
    wn4[2, 3] = float("nan")
    error("int4 from_float-nan", lambda: Int4Weight.from_float(wn4, 32), ("non-finite",))
    # ---------------------------------------------------------------- Int8Weight
    w8 = Int8Weight.from_float(_randn(8, 37, seed=7))
    result("int8 column-major", lambda: Int8Weight(_colmajor(w8.qweight), w8.scales, (8, 37)),
           _equal_dense(w8.dequantize().double(), lambda w: w.dequantize()))
    result("int8 K=0", lambda: Int8Weight.from_float(torch.zeros(4, 0)),
           _equal_dense(torch.zeros(4, 0, dtype=torch.float64), lambda w: w.dequantize()))
    qq = w8.qweight.clone()
    qq[0, 0] = -128
    error("int8 code-minus128", lambda: Int8Weight(qq, w8.scales, (8, 37)), ("-127, 127",))
    error("int8 scales-nan", lambda: Int8Weight(w8.qweight, torch.full((8,), float("nan")), (8, 37)), ("finite",))
    error("int8 scales-fp16", lambda: Int8Weight(w8.qweight, w8.scales.half(), (8, 37)), ("scales",))
    error("int8 shape", lambda: Int8Weight(w8.qweight, w8.scales, (8, 36)), ("qweight",))
    wn8 = _randn(8, 37, seed=8)
    wn8[0, 0] = float("inf")
    error("int8 from_float-inf", lambda: Int8Weight.from_float(wn8), ("non-finite",))
    # ---------------------------------------------------------------- Sparse24Int4Weight
    s4 = Sparse24Int4Weight.from_dense(random_2to4(8, 40, generator=_g(9)))
    result("sp24i4 column-major", lambda: Sparse24Int4Weight(_colmajor(s4.qweight), _colmajor(s4.scales),
                                                             _colmajor(s4.zeros), _colmajor(s4.meta), (8, 40),
                                                             s4.group_size),
           _equal_dense(s4.to_dense().double()))

    def s4edit(name, idx, val):
        def run():
            t = dict(qweight=s4.qweight.clone(), scales=s4.scales.clone(), zeros=s4.zeros.clone(),
                     meta=s4.meta.clone())
            t[name][idx] = val
            return Sparse24Int4Weight(t["qweight"], t["scales"], t["zeros"], t["meta"], (8, 40), s4.group_size)
        return run

    error("sp24i4 meta-0x55", s4edit("meta", (0, 0), 0x55), ("i0 < i1",))
    error("sp24i4 meta-0xff", s4edit("meta", (7, 5), 0xFF), ("i0 < i1",))
    error("sp24i4 zeros-16", s4edit("zeros", (0, 0), 16.0), ("zero",))
    error("sp24i4 zeros-neg", s4edit("zeros", (0, 0), -3.0), ("zero",))
    error("sp24i4 scales-nan", s4edit("scales", (1, 0), float("nan")), ("finite",))
    error("sp24i4 symmetric-mismatch", lambda: Sparse24Int4Weight(s4.qweight, s4.scales, s4.zeros, s4.meta, (8, 40),
                                                                  s4.group_size, True), ("symmetric",))
    error("sp24i4 group-7", lambda: Sparse24Int4Weight(s4.qweight, s4.scales, s4.zeros, s4.meta, (8, 40), 7),
          ("group_size",))
    error("sp24i4 not-2:4", lambda: Sparse24Int4Weight.from_dense(torch.ones(8, 40)), ("2:4",))
    error("sp24i4 meta-short", lambda: Sparse24Int4Weight(s4.qweight, s4.scales, s4.zeros, s4.meta[:, :1], (8, 40),
                                                          s4.group_size), ("meta",))
    return cases


# ====================================================================== modules
def _snapshot(mod):
    return {k: (v.detach().clone(), v.dtype, tuple(v.shape)) for k, v in mod.state_dict().items()}, \
        {n: p for n, p in mod.named_parameters()}


def _load_untouched_or_raise(mod, sd, **kw):
    """Load ``sd``; if it raises, the module must be exactly as before (else a RuntimeError that
    the classifier counts as a failure)."""
    snap, params = _snapshot(mod)
    try:
        return mod.load_state_dict(sd, **kw)
    except Exception:
        now = mod.state_dict()
        if now.keys() != snap.keys() or any(not torch.equal(now[k], snap[k][0]) or now[k].dtype != snap[k][1]
                                            for k in snap):
            raise RuntimeError("a failed load_state_dict modified the module") from None
        if any(p is not dict(mod.named_parameters())[n] for n, p in params.items()):
            raise RuntimeError("a failed load_state_dict replaced a Parameter") from None
        raise


class _ModSpec:
    """How to build one module kind, its float64 math, and its crafted state_dict edits."""

    def __init__(self, name, build, ref, x_dtype, k, edits, load_ok=()):
        self.name, self.build, self.ref, self.x_dtype, self.k = name, build, ref, x_dtype, k
        self.edits, self.load_ok = edits, load_ok


def _sp24_ref(mod, x):
    return x.double() @ mod.weight_format().to_dense().double().t() + mod.bias.double()


def _q_ref(mod, x, bits=None):
    w = mod.weight_format()
    if mod.bits == 8:
        wd = w.dequantize().double()
    elif mod.act_bits is not None:
        from sparsekit.ops.int8 import dequantize_int4_fp32

        wd = dequantize_int4_fp32(w.qweight, w.scales, w.zeros, w.group_size, w.in_features).double()
    else:
        wd = w.dequantize().double()
    xs = x if mod.input_scale is None else x / mod.input_scale
    if mod.act_bits is not None:
        q, s = per_token_quant_reference(xs.reshape(-1, xs.shape[-1]), mod.act_bits if bits is None else bits)
        xd = (q.double() * s.double()).reshape(xs.shape)
    else:
        xd = xs.double()
    y = xd @ wd.t()
    return y + mod.bias.double() if mod.bias is not None else y


def _s24i8_ref(mod, x):
    w = mod.weight_format()
    q, s = per_token_quant_reference(x.reshape(-1, x.shape[-1]), 8)
    y = (q.double() * s.double()) @ w.to_dense(torch.float64).t() + mod.bias.double()
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _block_ref(mod, x):
    # sums over the kept blocks only: dropped blocks are never read (structural sparsity)
    return structural_block_linear64(x, mod.weight_format(), mod.bias)


def _set(key, idx, val):
    def edit(sd):
        sd[key][idx] = val
        return sd
    return edit


def _replace(key, fn):
    def edit(sd):
        sd[key] = fn(sd[key])
        return sd
    return edit


def _drop(key):
    def edit(sd):
        del sd[key]
        return sd
    return edit


def _add(key, val):
    def edit(sd):
        sd[key] = val
        return sd
    return edit


_COMMON_EDITS = [("bias-shape", _replace("bias", lambda t: t[:-1]), ("bias",)),
                 ("bias-list", _replace("bias", lambda t: t.tolist()), ("bias", "tensor")),
                 ("bias-int", _replace("bias", lambda t: t.int()), ("bias",)),
                 ("missing-bias", _drop("bias"), ("bias", "missing")),
                 ("unexpected-key", _add("bogus", torch.zeros(1)), ("bogus", "unexpected"))]


def _mod_specs():
    torch.manual_seed(0)
    lin40 = nn.Linear(37, 24)
    lin64 = nn.Linear(64, 24)
    specs = [
        _ModSpec("SparseLinear", lambda: SparseLinear.from_dense(copy.deepcopy(lin40)), _sp24_ref, torch.float32, 37,
                 [("meta_codes-code", _set("meta_codes", (0, 0), 0x55), ("i0 < i1",)),
                  ("meta_codes-uint8-as-int64", _replace("meta_codes", lambda t: t.long()), ("meta_codes",)),
                  ("values-nan-padding", _set("values", (3, -1), float("nan")), ("padding",)),
                  ("values-shape", _replace("values", lambda t: t[:, :-1]), ("values",)),
                  ("meta_codes-shape", _replace("meta_codes", lambda t: t[:-1]), ("meta_codes",)),
                  ("values-fp64-overflow", _replace("values", lambda t: t.double().index_fill(1, torch.tensor([19]),
                                                                                              1e300)),
                   ("padding", "finite"))] + _COMMON_EDITS),
        _ModSpec("SparseLinear-int8", lambda: SparseLinear.from_dense(copy.deepcopy(lin40), act_bits=8), _s24i8_ref,
                 torch.float32, 37,
                 [("meta_codes-code", _set("meta_codes", (1, 1), 0xEE & 0x0F), ("i0 < i1",)),
                  ("values-minus128", _set("values", (0, 0), -128), ("-127, 127",)),
                  ("w_scale-inf", _set("w_scale", 2, float("inf")), ("finite",)),
                  ("values-float", _replace("values", lambda t: t.float()), ("values",)),
                  ("w_scale-shape", _replace("w_scale", lambda t: t[:5]), ("w_scale",))] + _COMMON_EDITS),
        _ModSpec("BlockSparseLinear", lambda: BlockSparseLinear.from_dense(
                     copy.deepcopy(lin40), block_size=16, block_mask=torch.tensor([[1, 0, 1], [0, 1, 1]]).bool()),
                 _block_ref, torch.float32, 37,
                 [("crow-last-huge", _set("crow", -1, 100000), ("crow",)),
                  ("crow-decreasing", _set("crow", 1, 50), ("crow",)),
                  ("col-negative", _set("col", 0, -1), ("col",)),
                  ("col-too-large", _set("col", 0, 3), ("col",)),
                  ("tblk-flipped", _replace("tblk", lambda t: t.flip(0).contiguous()), ("transposed",)),
                  ("trow-bad", _set("trow", 0, 9), ("transposed",)),
                  ("tcol_ptr-bad", _replace("tcol_ptr", lambda t: t.flip(0).contiguous()), ("transposed",)),
                  ("col-blocks-mismatch", _replace("col", lambda t: t[:-1]), ("blocks", "col")),
                  ("blocks-inf-padding", _set("blocks", (-1, 15, 15), float("inf")), ("padding",)),
                  ("blocks-bk-8", _replace("blocks", lambda t: t[:, :, :8]), ("blocks",)),
                  ("crow-int64", _replace("crow", lambda t: t.long()), ("crow",))] + _COMMON_EDITS),
        _ModSpec("QLinear-w4a16", lambda: QLinear.from_float(copy.deepcopy(lin64), group_size=32), _q_ref,
                 torch.float16, 64,
                 [("zeros-16", _set("zeros", (0, 0), 16.0), ("zero",)),
                  ("zeros-fraction", _set("zeros", (1, 1), 0.5), ("zero",)),
                  ("scales-nan", _set("scales", (2, 0), float("nan")), ("finite",)),
                  ("scales-fp32-overflow", _replace("scales", lambda t: t.float().fill_(1e6)), ("finite",)),
                  ("qweight-shape", _replace("qweight", lambda t: t[:, :4]), ("qweight",)),
                  ("qweight-float", _replace("qweight", lambda t: t.float()), ("qweight",)),
                  ("input_scale-2d", _add("input_scale", torch.ones(5, 64)), ("input_scale",)),
                  ("input_scale-zero", _add("input_scale", torch.zeros(64)), ("input_scale",)),
                  ("input_scale-nan", _add("input_scale", torch.full((64,), float("nan"))), ("input_scale",)),
                  ("input_scale-int", _add("input_scale", torch.ones(64, dtype=torch.int32)), ("input_scale",))]
                 + _COMMON_EDITS,
                 load_ok=[("input_scale", _add("input_scale", torch.full((64,), 2.0)))]),
        _ModSpec("QLinear-w8a8", lambda: QLinear.from_float(copy.deepcopy(lin64), bits=8, act_bits=8), _q_ref,
                 torch.float16, 64,
                 [("qweight-minus128", _set("qweight", (0, 0), -128), ("-127, 127",)),
                  ("scales-inf", _set("scales", 0, float("inf")), ("finite",)),
                  ("qweight-int32", _replace("qweight", lambda t: t.int()), ("qweight",)),
                  ("scales-shape", _replace("scales", lambda t: t[:-1]), ("scales",)),
                  ("zeros-unexpected", _add("zeros", torch.zeros(24, 2)), ("zeros", "unexpected"))] + _COMMON_EDITS),
        _ModSpec("QLinear-w4a8", lambda: QLinear.from_float(copy.deepcopy(lin64), group_size=32, act_bits=8), _q_ref,
                 torch.float16, 64,
                 [("zeros-negative", _set("zeros", (0, 0), -2.0), ("zero",)),
                  ("scales-inf", _set("scales", (0, 0), float("inf")), ("finite",))] + _COMMON_EDITS),
        _ModSpec("SparseQLinear", lambda: SparseQLinear.from_dense(copy.deepcopy(lin40)),
                 lambda mod, x: x.double() @ mod.weight.double().t() + mod.bias.double(), torch.float16, 37,
                 [("meta_codes-code", _set("meta_codes", (0, 0), 0x00), ("i0 < i1",)),
                  ("zeros-16", _set("zeros", (0, 0), 16.0), ("zero",)),
                  ("scales-nan", _set("scales", (0, 0), float("nan")), ("finite",)),
                  ("meta_codes-shape", _replace("meta_codes", lambda t: t[:, :1]), ("meta_codes",)),
                  ("qweight-shape", _replace("qweight", lambda t: t[:1]), ("qweight",))] + _COMMON_EDITS),
    ]
    return specs


def _module_cases():
    cases = []
    for spec in _mod_specs():
        cases += _cases_for_module(spec)
    cases += _bsl_resize_cases() + _tgc_module_cases() + _misc_module_cases()
    return cases


def _cases_for_module(spec):
    cases = []
    base = spec.build()
    good_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    pre = f"module {spec.name}"
    for label, edit, names in spec.edits:
        def run(edit=edit):
            mod = spec.build()
            sd = edit({k: v.clone() for k, v in good_sd.items()})
            return _load_untouched_or_raise(mod, sd)
        cases.append(Case(f"{pre} load {label}", run, "error", names=names))
        # the same edit inside a parent module (prefix), strict
        def nested(edit=edit):
            par = nn.Sequential(nn.Identity(), spec.build())
            sd = edit({k: v.clone() for k, v in good_sd.items()})
            return _nested_load(par, {f"1.{k}": v for k, v in sd.items()})
        cases.append(Case(f"{pre} nested-load {label}", nested, "error", names=names))
    # valid loads, then forwards on both backends against float64 math
    x = _randn(3, spec.k, seed=41, dtype=spec.x_dtype)
    xn = x.clone()
    xn[1, 2] = float("nan")
    xi = x.clone()
    xi[2, 0] = float("inf")
    loads = [("same", lambda sd: sd)] + [(n, e) for n, e in spec.load_ok]
    for backend in BACKENDS:
        for lname, ledit in loads:
            for xname, xx in (("x", x), ("nan-row", xn), ("inf-row", xi), ("leading", x.reshape(1, 3, -1))):
                def run(ledit=ledit, xx=xx, backend=backend):
                    mod = spec.build()
                    mod.backend = backend
                    mod.load_state_dict(ledit({k: v.clone() for k, v in good_sd.items()}))
                    with torch.no_grad():
                        return mod(xx), spec.ref(mod, xx)

                def check(out, xx=xx):
                    y, ref = out
                    close_to(ref.to(y.dtype), xx.dtype)(y)
                cases.append(Case(f"{pre} [{backend}] load-{lname} forward-{xname}", run, "result", check))
        # the forward's own input checks
        cases.append(Case(f"{pre} [{backend}] forward-wrong-K",
                          lambda backend=backend: _fwd(spec, backend, _randn(3, spec.k + 8, dtype=spec.x_dtype)),
                          "error", names=("features", "in_features")))
        cases.append(Case(f"{pre} [{backend}] forward-int",
                          lambda backend=backend: _fwd(spec, backend, torch.ones(3, spec.k, dtype=torch.int32)),
                          "error", names=("dtype", "float", "activations")))
        # crafted checkpoint then a forward on the backend, in a child process for the interpreter
        for label, edit, names in spec.edits[:3]:
            def crafted(edit=edit, backend=backend):
                mod = spec.build()
                mod.backend = backend
                sd = edit({k: v.clone() for k, v in good_sd.items()})
                try:
                    mod.load_state_dict(sd)
                finally:
                    with torch.no_grad():
                        y = mod(_randn(2, spec.k, dtype=spec.x_dtype))
                    if not torch.isfinite(y).all():
                        raise RuntimeError("non-finite output after a refused load")
            cases.append(Case(f"{pre} [{backend}] crafted-load-then-forward {label}", crafted, "error",
                              names=names, crash_prone=(backend == "interpret")))
    # non-strict loads: missing keys keep their values, the present ones are validated and loaded
    def nonstrict(spec=spec, good_sd=good_sd):
        mod = spec.build()
        sd = {k: v.clone() for k, v in good_sd.items() if k != "bias"}
        sd["bogus"] = torch.zeros(1)
        res = mod.load_state_dict(sd, strict=False)
        return res, mod

    def check_nonstrict(out):
        res, mod = out
        assert list(res.missing_keys) == ["bias"] and list(res.unexpected_keys) == ["bogus"], res
    cases.append(Case(f"{pre} load-nonstrict", nonstrict, "result", check_nonstrict))

    def nonstrict_bad(spec=spec, good_sd=good_sd):
        mod = spec.build()
        sd = spec.edits[0][1]({k: v.clone() for k, v in good_sd.items()})
        sd.pop("bias", None)
        return _load_untouched_or_raise(mod, sd, strict=False)
    cases.append(Case(f"{pre} load-nonstrict-crafted", nonstrict_bad, "error", names=spec.edits[0][2]))

    def assign(spec=spec, good_sd=good_sd):
        mod = spec.build()
        mod.load_state_dict({k: v.clone() for k, v in good_sd.items()}, assign=True)
        return mod

    def check_assign(mod, spec=spec):
        x = _randn(2, spec.k, seed=5, dtype=spec.x_dtype)
        with torch.no_grad():
            close_to(spec.ref(mod, x).to(spec.x_dtype), spec.x_dtype)(mod(x))
    cases.append(Case(f"{pre} load-assign", assign, "result", check_assign))
    return cases


def _nested_load(parent, sd):
    snap = {k: v.detach().clone() for k, v in parent.state_dict().items()}
    try:
        return parent.load_state_dict(sd)
    except Exception:
        now = parent.state_dict()
        if any(not torch.equal(now[k], snap[k]) for k in snap):
            raise RuntimeError("a failed load_state_dict modified the module") from None
        raise


def _fwd(spec, backend, x):
    mod = spec.build()
    mod.backend = backend
    with torch.no_grad():
        return mod(x)


def _bsl_resize_cases():
    cases = []
    torch.manual_seed(1)
    lin = nn.Linear(37, 24)

    def resize(sa, sb):
        def run():
            a = BlockSparseLinear.from_dense(copy.deepcopy(lin), block_size=16, sparsity=sa)
            b = BlockSparseLinear.from_dense(copy.deepcopy(lin), block_size=16, sparsity=sb)
            p = a.blocks
            a.load_state_dict(b.state_dict())
            return a, b, p
        return run

    def check(out):
        a, b, p = out
        assert a.blocks is p, "the blocks Parameter object was replaced"
        x = _randn(3, 37, seed=3)
        for backend in BACKENDS:
            a.backend = backend
            with torch.no_grad():
                close_to((x.double() @ b.weight.double().t() + b.bias.double()).float(), torch.float32)(a(x))

    for sa, sb in ((0.75, 0.25), (0.25, 0.75), (0.5, 0.5), (1.0, 0.0), (0.0, 1.0)):
        cases.append(Case(f"module BlockSparseLinear resize {sa}->{sb}", resize(sa, sb), "result", check))
    return cases


def _tgc_module_cases():
    cases = []
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    frames = [_randn(1, 4, 9, 9, seed=50)]
    f = frames[0].clone()
    f[0, 1, 4, 4] = float("nan")
    frames.append(f)
    frames.append(frames[0].clone())
    f = frames[0].clone()
    f[0, 2, 0, 8] = float("inf")
    frames.append(f)
    f = frames[0].clone()
    f[0, :, 6:, 6:] += 1.0
    frames.append(f)
    frames.append(f.clone())

    for backend in BACKENDS:
        for tile in (1, 4):
            def video(tile=tile, backend=backend):
                layer = TripleGateConv2d.from_conv(conv, tile=tile, backend=backend).eval()
                with torch.no_grad():
                    return [(layer(fr), conv(fr)) for fr in frames]

            def check(outs):
                for i, (y, ref) in enumerate(outs):
                    close_to(ref, torch.float32, what=f"frame {i}")(y)
            cases.append(Case(f"module TripleGateConv2d [{backend}] nan-video tile={tile}", video, "result", check))
        for how in ("inplace", "load", "data", "bias"):
            def change(how=how, backend=backend):
                c = copy.deepcopy(conv)
                layer = TripleGateConv2d.from_conv(c, tile=4, backend=backend).eval()
                with torch.no_grad():
                    layer(frames[0])
                    if how == "inplace":
                        layer.weight.mul_(-1)
                        c.weight.mul_(-1)
                    elif how == "load":
                        sd = layer.state_dict()
                        sd["weight"] = sd["weight"] * 3
                        layer.load_state_dict(sd)
                        c.weight.mul_(3)
                    elif how == "data":
                        new = torch.randn_like(layer.weight)
                        layer.weight.data = new.clone()
                        c.weight.data = new.clone()
                    else:
                        layer.bias.add_(1)
                        c.bias.add_(1)
                    return layer(frames[0]), c(frames[0])

            cases.append(Case(f"module TripleGateConv2d [{backend}] weight-change-{how}", change, "result",
                              lambda out: close_to(out[1], torch.float32)(out[0])))

        def frame_change(backend=backend):
            layer = TripleGateConv2d.from_conv(conv, tile=4, backend=backend).eval()
            with torch.no_grad():
                layer(frames[0])
                return layer(_randn(1, 4, 8, 9))
        cases.append(Case(f"module TripleGateConv2d [{backend}] frame-size-change", frame_change, "error",
                          names=("reset",)))
        cases.append(Case(f"module TripleGateConv2d [{backend}] channels",
                          lambda backend=backend: TripleGateConv2d.from_conv(conv, backend=backend).eval()(
                              _randn(1, 3, 9, 9)), "error", names=("channel",)))
        cases.append(Case(f"module TripleGateConv2d [{backend}] dtype",
                          lambda backend=backend: TripleGateConv2d.from_conv(conv, backend=backend).eval()(
                              _randn(1, 4, 9, 9).half()), "error", names=("dtype",)))
    base = TripleGateConv2d.from_conv(conv, tile=4)
    good = {k: v.clone() for k, v in base.state_dict().items()}
    for label, edit, names in (("weight-shape", _replace("weight", lambda t: t[:, :3]), ("weight",)),
                               ("bias-shape", _replace("bias", lambda t: t[:2]), ("bias",)),
                               ("log_threshold-nan", _add("log_threshold", torch.tensor(float("nan"))),
                                ("log_threshold",)),
                               ("importance-shape", _replace("importance.weight", lambda t: t[:, :2]),
                                ("importance",)),
                               ("missing-importance", _drop("importance.bias"), ("importance",)),
                               ("weight-int", _replace("weight", lambda t: t.int()), ("weight",))):
        def run(edit=edit):
            m = TripleGateConv2d.from_conv(conv, tile=4)
            return _load_untouched_or_raise(m, edit({k: v.clone() for k, v in good.items()}))
        cases.append(Case(f"module TripleGateConv2d load {label}", run, "error", names=names))
    return cases


def _misc_module_cases():
    cases = []
    q = torch.randn(1, 2, 32, 64, generator=_g(60))
    for backend in BACKENDS:
        def dense(backend=backend):
            m = DraftAttention(2, 4, 4, sparsity=0.0, pool=(2, 2), backend=backend)
            return m(q, q, q)
        cases.append(Case(f"module DraftAttention [{backend}] sparsity-0", dense, "result",
                          close_to(F.scaled_dot_product_attention(q.double(), q.double(), q.double()).float(),
                                   torch.float32)))
        cases.append(Case(f"module DraftAttention [{backend}] wrong-seq",
                          lambda backend=backend: DraftAttention(2, 4, 4, sparsity=0.5, pool=(2, 2),
                                                                 backend=backend)(q[:, :, 1:], q[:, :, 1:], q[:, :, 1:]),
                          "error", names=("sequence length",)))
    cases.append(Case("module DraftAttention mode", lambda: DraftAttention(2, 4, 4, mode="x"), "error",
                      names=("mode",)))
    # meta-device modules: forwards give meta outputs; assign-loading real tensors materializes them
    for name, build, k, dt in (("SparseLinear", lambda d: SparseLinear(37, 24, device=d), 37, torch.float32),
                               ("BlockSparseLinear", lambda d: BlockSparseLinear(37, 24, block_size=16, device=d), 37,
                                torch.float32),
                               ("QLinear", lambda d: QLinear(64, 24, group_size=32, device=d), 64, torch.float16),
                               ("QLinear8", lambda d: QLinear(64, 24, bits=8, act_bits=8, device=d), 64,
                                torch.float16),
                               ("SparseQLinear", lambda d: SparseQLinear(37, 24, device=d), 37, torch.float16)):
        def meta_fwd(build=build, k=k, dt=dt):
            return build(META)(torch.empty(2, k, dtype=dt, device=META))

        def check_meta(y):
            assert y.device.type == "meta" and tuple(y.shape) == (2, 24)
        cases.append(Case(f"module {name} meta-forward", meta_fwd, "result", check_meta))

        def assign(build=build, k=k, dt=dt):
            real = build("cpu")
            m = build(META)
            m.load_state_dict(real.state_dict(), assign=True)
            with torch.no_grad():
                return m(torch.ones(2, k, dtype=dt)), real(torch.ones(2, k, dtype=dt))
        cases.append(Case(f"module {name} meta-assign-load", assign, "result",
                          lambda out: close_to(out[1].double(), out[1].dtype)(out[0])))
    return cases


# ====================================================================== the suite
def build_cases() -> list:
    torch.manual_seed(0)
    cases = _format_cases() + _module_cases()
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "duplicate case names"
    return cases


_CASES = build_cases()
test_case_count, test_case, test_crash_prone_cases_in_a_child_process = suite_tests(
    __file__, "build_cases", _CASES, 300, "crash-prone format/module cases")


if __name__ == "__main__":
    print_report(_CASES)
