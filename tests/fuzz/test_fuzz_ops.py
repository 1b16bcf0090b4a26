"""Adversarial cases for the functional ops, on the ``reference`` and ``interpret`` backends.

Every public linear op (2:4, block-sparse, int4, W8A8, W4A8, int8 2:4, 2:4+int4),
in both its format form and its ``*_packed`` form, the per-token activation
quantizer, the triple-gate conv ops and the draft attention ops get valid
inputs that are unusual (non-contiguous, column-major, leading dims, M = 0,
N = 0, NaN/Inf rows, huge values, ...) -- checked against float64 dense
references -- and invalid ones (shapes, dtypes, devices, backends, crafted
contents) -- which must raise a ValueError/TypeError naming the problem.
Cases that hand crafted indices to interpreted kernels run in a child process
(a crash fails the test instead of killing the run).  Seeded: the same cases
every run.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness import Case, close_to, print_report, structural_block_linear64, suite_tests

from sparsekit import ops
from sparsekit.formats import (BlockSparseWeight, Int4Weight, Int8Weight, Sparse24Int4Weight, Sparse24Int8Weight,
                               Sparse24Weight)
from sparsekit.ops import triple_gate_conv as tgc
from sparsekit.ops.act_quant import per_token_quant_reference, select_token_bits
from sparsekit.testing import noncontiguous, random_2to4

BACKENDS = ("reference", "interpret")
N = 24
META = torch.device("meta")


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=_g(seed)) * scale).to(dtype)


def _colmajor(t):
    return t.t().contiguous().t() if t is not None and t.dim() == 2 else t


# ====================================================================== float64 references
def _linear64(x, w64, bias):
    y = x.double() @ w64.t()
    return y + bias.double() if bias is not None else y


def _fake_quant64(x, bits):
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x2.double().reshape(x.shape)
    b = bits if not isinstance(bits, torch.Tensor) else bits.reshape(-1)
    q, s = per_token_quant_reference(x2, b)
    return (q.double() * s.double()).reshape(*lead, x.shape[-1])


# ====================================================================== linear op specs
class Spec:
    """One linear op family: how to build its weight, its float64 math, its two call forms and
    the crafted-content corruptions of its packed tensors."""

    name = ""
    k = 40
    x_dtypes = (torch.float32,)
    act_bits = None                  # per-token fake-quantized activations (8 / 4) or None

    def weight(self, n, k, dtype, seed):
        raise NotImplementedError

    def w64(self, w):
        raise NotImplementedError

    def call(self, x, w, bias, backend, **kw):
        raise NotImplementedError

    def tensors(self, w) -> dict:
        raise NotImplementedError

    def call_packed(self, x, t, bias, backend, **kw):
        raise NotImplementedError

    def ref(self, x, w, bias, **kw):
        xd = _fake_quant64(x, kw.get("bits", self.act_bits)) if self.act_bits else x.double()
        return _linear64(xd, self.w64(w), bias)

    def corruptions(self):
        """(label, edit(tensors) -> tensors or kwargs, names) of invalid packed contents."""
        return []

    def out_dtype(self, x):
        return x.dtype


class Sp24(Spec):
    name, k, x_dtypes = "sparse24", 37, (torch.float32, torch.float16, torch.bfloat16)

    def weight(self, n, k, dtype, seed):
        torch.manual_seed(seed)
        return Sparse24Weight.from_dense(random_2to4(n, k, dtype=dtype, generator=_g(seed)))

    def w64(self, w):
        return w.to_dense().double()

    def call(self, x, w, bias, backend, **kw):
        return ops.sparse24_linear(x, w, bias, backend=backend)

    def tensors(self, w):
        return dict(values=w.values, meta=w.meta, in_features=w.in_features)

    def call_packed(self, x, t, bias, backend, **kw):
        return ops.sparse24_linear_packed(x, t["values"], t["meta"], t["in_features"], bias, backend=backend)

    def corruptions(self):
        def bad_code(t):
            m = t["meta"].clone()
            m[1, 0] = 0x55
            return {**t, "meta": m}

        def nan_pad(t):
            cols = Sparse24Weight.columns_from_meta(t["meta"])
            v = t["values"].clone()
            r, c = [int(i) for i in (cols >= t["in_features"]).nonzero()[0]]
            v[r, c] = float("nan")
            return {**t, "values": v}

        return [("meta-i0==i1", bad_code, ("i0 < i1",)),
                ("meta-0xff", lambda t: {**t, "meta": torch.full_like(t["meta"], 0xFF)}, ("i0 < i1",)),
                ("nan-padding", nan_pad, ("padding",)),
                ("values-short", lambda t: {**t, "values": t["values"][:, :-2]}, ("values",)),
                ("meta-short", lambda t: {**t, "meta": t["meta"][:, :-1]}, ("meta",)),
                ("meta-int32", lambda t: {**t, "meta": t["meta"].to(torch.int32)}, ("meta",)),
                ("values-int", lambda t: {**t, "values": t["values"].to(torch.int32)}, ("dtype",)),
                ("in_features-negative", lambda t: {**t, "in_features": -1}, ("in_features",)),
                ("in_features-float", lambda t: {**t, "in_features": 37.0}, ("in_features",)),
                ("in_features-mismatch", lambda t: {**t, "in_features": 41}, ("in_features", "features"))]


class Block(Spec):
    name, k, x_dtypes = "block_sparse", 37, (torch.float32, torch.float16, torch.bfloat16)

    def weight(self, n, k, dtype, seed):
        bm, bk = 16, 16
        mask = torch.rand(-(-n // bm), -(-k // bk), generator=_g(seed)) < 0.6
        mask[0, 0] = True
        mask[0, -1] = True                    # the last block-column (with K padding) holds a block
        mask[:, 1] = False                    # one block-column with no kept block at all
        return BlockSparseWeight.from_dense(_randn(n, k, seed=seed, dtype=dtype), (bm, bk), block_mask=mask)

    def w64(self, w):
        return w.to_dense().double()

    def ref(self, x, w, bias, **kw):
        return structural_block_linear64(x, w, bias)

    def call(self, x, w, bias, backend, **kw):
        return ops.block_sparse_linear(x, w, bias, backend=backend)

    def tensors(self, w):
        return dict(blocks=w.blocks, crow=w.crow, col=w.col, tcol_ptr=w.tcol_ptr, trow=w.trow, tblk=w.tblk,
                    n=w.out_features, k=w.in_features)

    def call_packed(self, x, t, bias, backend, **kw):
        return ops.block_sparse_linear_packed(x, t["blocks"], t["crow"], t["col"], t["tcol_ptr"], t["trow"],
                                              t["tblk"], t["n"], t["k"], bias, backend=backend)

    def corruptions(self):
        def setv(name, i, v):
            def edit(t):
                a = t[name].clone()
                a[i] = v
                return {**t, name: a}
            return edit

        def pad_nan(t):
            b = t["blocks"].clone()
            last = int((t["col"] == t["col"].max()).nonzero()[0])
            b[last, 0, -1] = float("inf")             # column >= K in the last block-column
            return {**t, "blocks": b}

        return [("crow-last-huge", setv("crow", -1, 100000), ("crow",)),
                ("crow-first", setv("crow", 0, 1), ("crow",)),
                ("crow-decreasing", lambda t: setv("crow", 1, int(t["crow"][-1]) + 1)(t), ("crow",)),
                ("crow-negative", setv("crow", 1, -5), ("crow",)),
                ("col-negative", setv("col", 0, -1), ("col",)),
                ("col-too-large", setv("col", 0, 3), ("col",)),
                ("col-huge", setv("col", 0, 2 ** 30), ("col",)),
                ("tblk-permuted", lambda t: {**t, "tblk": t["tblk"].flip(0).contiguous()}, ("transposed",)),
                ("tblk-huge", setv("tblk", 0, 10 ** 6), ("transposed", "tblk")),
                ("trow-bad", setv("trow", 0, 7), ("transposed", "trow")),
                ("tcol_ptr-bad", setv("tcol_ptr", -1, 99), ("transposed", "tcol_ptr")),
                ("blocks-inf-padding", pad_nan, ("padding",)),
                ("crow-int64", lambda t: {**t, "crow": t["crow"].long()}, ("int32",)),
                ("col-short", lambda t: {**t, "col": t["col"][:-1]}, ("col",)),
                ("blocks-side-8", lambda t: {**t, "blocks": t["blocks"][:, :8, :8].contiguous()}, ("block",)),
                ("blocks-2d", lambda t: {**t, "blocks": t["blocks"][0]}, ("blocks",)),
                ("out_features-bool", lambda t: {**t, "n": True}, ("out_features",))]


class Int4(Spec):
    name, k, x_dtypes = "int4", 64, (torch.float16, torch.bfloat16)

    def weight(self, n, k, dtype, seed):
        return Int4Weight.from_float(_randn(n, k, seed=seed), 32, symmetric=bool(seed % 2), dtype=dtype)

    def w64(self, w):
        return w.dequantize().double()

    def call(self, x, w, bias, backend, **kw):
        return ops.int4_linear(x, w, bias, backend=backend)

    def tensors(self, w):
        return dict(qweight=w.qweight, scales=w.scales, zeros=w.zeros, group_size=w.group_size, k=w.in_features)

    def call_packed(self, x, t, bias, backend, **kw):
        return ops.int4_linear_packed(x, t["qweight"], t["scales"], t["zeros"], t["group_size"], t["k"], bias,
                                      backend=backend)

    def corruptions(self):
        return _int4_corruptions()


def _int4_corruptions():
    def zero(v):
        def edit(t):
            if t["zeros"] is None:
                z = torch.full_like(t["scales"], 8.0)
            else:
                z = t["zeros"].clone()
            z[0, 0] = v
            return {**t, "zeros": z}
        return edit

    def scale(v):
        def edit(t):
            s = t["scales"].clone()
            s[1, 0] = v
            return {**t, "scales": s}
        return edit

    return [("zeros-16", zero(16.0), ("zero",)), ("zeros-negative", zero(-1.0), ("zero",)),
            ("zeros-fraction", zero(2.5), ("zero",)), ("zeros-nan", zero(float("nan")), ("zero",)),
            ("scales-inf", scale(float("inf")), ("finite",)), ("scales-nan", scale(float("nan")), ("finite",)),
            ("qweight-short", lambda t: {**t, "qweight": t["qweight"][:, :-1]}, ("qweight",)),
            ("qweight-int64", lambda t: {**t, "qweight": t["qweight"].long()}, ("qweight", "int32")),
            ("group_size-48", lambda t: {**t, "group_size": 48}, ("group_size",)),
            ("group_size-16", lambda t: {**t, "group_size": 16, "scales": t["scales"].repeat_interleave(2, 1),
                                         "zeros": None if t["zeros"] is None else
                                         t["zeros"].repeat_interleave(2, 1)}, ("group_size",)),
            ("group_size-zero", lambda t: {**t, "group_size": 0}, ("group_size",)),
            ("scales-fp32", lambda t: {**t, "scales": t["scales"].float()}, ("dtype",)),
            ("scales-short", lambda t: {**t, "scales": t["scales"][:-1]}, ("scales",))]


class W8A8(Spec):
    name, k, x_dtypes, act_bits = "int8", 64, (torch.float32, torch.float16, torch.bfloat16), 8

    def weight(self, n, k, dtype, seed):
        return Int8Weight.from_float(_randn(n, k, seed=seed))

    def w64(self, w):
        return w.dequantize().double()

    def call(self, x, w, bias, backend, **kw):
        return ops.int8_linear(x, w, bias, backend=backend, **kw)

    def tensors(self, w):
        return dict(qweight=w.qweight, wscale=w.scales)

    def call_packed(self, x, t, bias, backend, **kw):
        return ops.int8_linear_packed(x, t["qweight"], t["wscale"], bias, backend=backend, **kw)

    def corruptions(self):
        def q(v):
            def edit(t):
                a = t["qweight"].clone()
                a[2, 3] = v
                return {**t, "qweight": a}
            return edit

        def s(v):
            def edit(t):
                a = t["wscale"].clone()
                a[0] = v
                return {**t, "wscale": a}
            return edit

        return [("qweight-minus128", q(-128), ("-127, 127",)), ("wscale-nan", s(float("nan")), ("finite",)),
                ("wscale-inf", s(float("inf")), ("finite",)),
                ("wscale-short", lambda t: {**t, "wscale": t["wscale"][:-1]}, ("wscale",)),
                ("wscale-fp16", lambda t: {**t, "wscale": t["wscale"].half()}, ("wscale",)),
                ("qweight-int16", lambda t: {**t, "qweight": t["qweight"].to(torch.int16)}, ("qweight",)),
                ("qweight-1d", lambda t: {**t, "qweight": t["qweight"][0]}, ("qweight",))]


class W4A8(Spec):
    name, k, x_dtypes, act_bits = "w4a8", 64, (torch.float16, torch.bfloat16), 8

    def weight(self, n, k, dtype, seed):
        return Int4Weight.from_float(_randn(n, k, seed=seed), 32, symmetric=bool(seed % 2), dtype=dtype)

    def w64(self, w):
        from sparsekit.ops.int8 import dequantize_int4_fp32

        return dequantize_int4_fp32(w.qweight, w.scales, w.zeros, w.group_size, w.in_features).double()

    def call(self, x, w, bias, backend, **kw):
        return ops.w4a8_linear(x, w, bias, backend=backend, **kw)

    def tensors(self, w):
        return dict(qweight=w.qweight, scales=w.scales, zeros=w.zeros, group_size=w.group_size, k=w.in_features)

    def call_packed(self, x, t, bias, backend, **kw):
        return ops.w4a8_linear_packed(x, t["qweight"], t["scales"], t["zeros"], t["group_size"], t["k"], bias,
                                      backend=backend, **kw)

    def corruptions(self):
        return _int4_corruptions()


class Sp24Int8(Spec):
    name, k, x_dtypes, act_bits = "sparse24_int8", 37, (torch.float32, torch.float16, torch.bfloat16), 8

    def weight(self, n, k, dtype, seed):
        return Sparse24Int8Weight.from_dense(random_2to4(n, k, generator=_g(seed)))

    def w64(self, w):
        return w.to_dense(torch.float64)

    def call(self, x, w, bias, backend, **kw):
        return ops.sparse24_int8_linear(x, w, bias, backend=backend)

    def tensors(self, w):
        return dict(values=w.values, meta=w.meta, scale=w.scale, k=w.in_features)

    def call_packed(self, x, t, bias, backend, **kw):
        return ops.sparse24_int8_linear_packed(x, t["values"], t["meta"], t["scale"], t["k"], bias, backend=backend)

    def corruptions(self):
        def bad_code(t):
            m = t["meta"].clone()
            m[0, 1] = 0xAA
            return {**t, "meta": m}

        def v128(t):
            v = t["values"].clone()
            v[0, 0] = -128
            return {**t, "values": v}

        def s_inf(t):
            s = t["scale"].clone()
            s[3] = float("inf")
            return {**t, "scale": s}

        return [("meta-i0==i1", bad_code, ("i0 < i1",)), ("values-minus128", v128, ("-127, 127",)),
                ("scale-inf", s_inf, ("finite",)),
                ("values-short", lambda t: {**t, "values": t["values"][:, :4]}, ("values",)),
                ("meta-short", lambda t: {**t, "meta": t["meta"][:, :1]}, ("meta",)),
                ("scale-short", lambda t: {**t, "scale": t["scale"][:3]}, ("scale",)),
                ("values-float", lambda t: {**t, "values": t["values"].float()}, ("values", "int8")),
                ("k-mismatch", lambda t: {**t, "k": 64}, ("features", "in_features"))]


class Sp24Int4(Spec):
    name, k, x_dtypes = "sparse24_int4", 40, (torch.float16, torch.float32)

    def weight(self, n, k, dtype, seed):
        return Sparse24Int4Weight.from_dense(random_2to4(n, k, generator=_g(seed)), symmetric=bool(seed % 2),
                                             dtype=torch.float16)

    def w64(self, w):
        return w.to_dense().double()

    def call(self, x, w, bias, backend, **kw):
        return ops.sparse24_int4_linear(x, w, bias, backend=backend)

    def tensors(self, w):
        return dict(qweight=w.qweight, scales=w.scales, zeros=w.zeros, meta=w.meta, group_size=w.effective_group_size,
                    k=w.in_features)

    def call_packed(self, x, t, bias, backend, **kw):
        return ops.sparse24_int4_linear_packed(x, t["qweight"], t["scales"], t["zeros"], t["meta"], t["group_size"],
                                               t["k"], bias, backend=backend)

    def corruptions(self):
        def bad_code(t):
            m = t["meta"].clone()
            m[2, 0] = 0x00
            return {**t, "meta": m}

        def zero16(t):
            if t["zeros"] is None:
                return {**t, "zeros": torch.full_like(t["scales"], 16.0)}
            z = t["zeros"].clone()
            z[0, 0] = 16
            return {**t, "zeros": z}

        def s_nan(t):
            s = t["scales"].clone()
            s[0, 0] = float("nan")
            return {**t, "scales": s}

        return [("meta-code-0", bad_code, ("i0 < i1",)), ("zeros-16", zero16, ("zero",)),
                ("scales-nan", s_nan, ("finite",)),
                ("qweight-short", lambda t: {**t, "qweight": t["qweight"][:, :1]}, ("qweight",)),
                ("meta-short", lambda t: {**t, "meta": t["meta"][:, :2]}, ("meta",)),
                ("group_size-7", lambda t: {**t, "group_size": 7}, ("group_size",))]


SPECS = (Sp24(), Block(), Int4(), W8A8(), W4A8(), Sp24Int8(), Sp24Int4())


def _linear_cases(spec: Spec, backend: str) -> list:
    cases = []
    k = spec.k
    dt = spec.x_dtypes[0]
    w = spec.weight(N, k, dt, 1)
    bias = _randn(N, seed=2, dtype=dt)
    pre = f"{spec.name}[{backend}]"

    def result(label, x, wt=None, b="default", packed=None, dtype=None, tol=None, bits_ref=None, **kw):
        wt = w if wt is None else wt
        bb = bias.to(x.dtype) if isinstance(b, str) else b
        if packed is None:
            run = (lambda: spec.call(x, wt, bb, backend, **kw))
        else:
            run = (lambda: spec.call_packed(x, packed, bb, backend, **kw))
        ref = spec.ref(x, wt, bb, **({} if bits_ref is None else {"bits": bits_ref}))
        od = dtype or spec.out_dtype(x)
        cases.append(Case(f"{pre} {label}", run, "result", close_to(ref.to(od), od, tol)))

    def error(label, fn, names, crash_prone=False):
        cases.append(Case(f"{pre} {label}", fn, "error", names=names, crash_prone=crash_prone))

    x = _randn(3, k, seed=3, dtype=dt)
    # ------------------------------------------------------------- valid, unusual inputs
    result("base", x)
    result("M=1", x[:1])
    result("leading-dims", _randn(2, 3, k, seed=4, dtype=dt))
    result("x-noncontiguous", noncontiguous(x))
    result("x-column-major", _colmajor(x))
    result("bias-none", x, b=None)
    result("bias-noncontiguous", x, b=_randn(2 * N, seed=5, dtype=dt)[::2])
    result("M=0", x[:0])
    result("zeros", torch.zeros(3, k, dtype=dt))
    for label, val in (("nan-row", float("nan")), ("inf-row", float("inf")), ("neginf-row", float("-inf"))):
        xx = x.clone()
        xx[1, k // 2] = val
        result(label, xx)
    xx = x.clone()
    xx[0, 0], xx[2, k - 1] = float("nan"), float("inf")
    result("nan-and-inf-rows", xx)
    big = 1e36 if dt != torch.float16 else 1e3
    result("huge-values", x * big)
    for other in spec.x_dtypes[1:]:
        w2 = spec.weight(N, k, other if spec.name not in ("int8", "sparse24_int8", "sparse24_int4") else dt, 6)
        result(f"dtype-{str(other)[6:]}", _randn(3, k, seed=7, dtype=other), wt=w2, b=_randn(N, seed=8, dtype=other))
    t = spec.tensors(w)
    result("packed", x, packed=t)
    result("packed-column-major", x, packed={n: _colmajor(v) if isinstance(v, torch.Tensor) else v
                                             for n, v in t.items()})
    w0 = spec.weight(0, k, dt if spec.name not in ("int4", "w4a8") else torch.float16, 9) \
        if spec.name != "block_sparse" else BlockSparseWeight.from_dense(torch.zeros(0, k, dtype=dt), 16)
    result("N=0", x, wt=w0, b=None)
    if spec.act_bits and spec.name != "sparse24_int8":       # the int8 2:4 op quantizes to 8 bits only
        result("act_bits=4", x, act_bits=4, bits_ref=4)
        result("act_bits=mixed", x, act_bits="mixed", frac8=0.5, bits_ref=select_token_bits(x, 0.5))
        result("act_bits=tensor", x, act_bits=torch.tensor([8, 4, 8]), bits_ref=torch.tensor([8, 4, 8]))
        error("act_bits=5", lambda: spec.call(x, w, bias, backend, act_bits=5), ("act_bits",))
        error("frac8=2", lambda: spec.call(x, w, bias, backend, act_bits="mixed", frac8=2.0), ("frac8",))
        error("importance-shape", lambda: spec.call(x, w, bias, backend, act_bits="mixed",
                                                    importance=torch.ones(7)), ("importance",))
        error("importance-not-mixed", lambda: spec.call(x, w, bias, backend, importance=torch.ones(3)),
              ("importance",))
    # ------------------------------------------------------------- invalid inputs
    error("x-wrong-K", lambda: spec.call(_randn(3, k + 1, dtype=dt), w, bias, backend), ("features",))
    error("x-int", lambda: spec.call(torch.ones(3, k, dtype=torch.int32), w, None, backend), ("dtype", "float"))
    error("x-float64", lambda: spec.call(x.double(), w, None, backend), ("dtype", "float"))
    error("x-list", lambda: spec.call([[1.0] * k], w, None, backend), ("x", "tensor"))
    error("x-0d", lambda: spec.call(torch.tensor(1.0, dtype=dt), w, None, backend), ("dimension", "features"))
    error("bias-wrong-shape", lambda: spec.call(x, w, _randn(N + 1, dtype=dt), backend), ("bias",))
    error("bias-wrong-dtype", lambda: spec.call(x, w, bias.double(), backend), ("bias",))
    error("bias-list", lambda: spec.call(x, w, [0.0] * N, backend), ("bias",))
    error("bias-meta", lambda: spec.call(x, w, torch.zeros(N, dtype=dt, device=META), backend), ("bias", "device"))
    error("weight-dense-tensor", lambda: spec.call(x, torch.randn(N, k), bias, backend), ("weight",))
    error("weight-none", lambda: spec.call(x, None, bias, backend), ("weight",))
    error("backend-bogus", lambda: spec.call(x, w, bias, "bogus"), ("backend",))
    error("backend-triton-on-cpu", lambda: spec.call(x, w, bias, "triton"), ("triton", "cuda"))
    error("x-on-meta", lambda: spec.call(torch.zeros(3, k, dtype=dt, device=META), w, bias, backend),
          ("device", "meta"))
    for label, edit, names in spec.corruptions():
        error(f"packed-{label}", lambda edit=edit: spec.call_packed(x, edit(dict(t)), bias, backend), names,
              crash_prone=(backend == "interpret"))
    return cases


# ====================================================================== per-token quantization
def _ptq_check(x, bits):
    q_ref, s_ref = per_token_quant_reference(x, bits) if x.shape[0] else (None, None)

    def check(out):
        q, s = out
        assert q.dtype == torch.int8 and s.dtype == torch.float32
        assert q.shape == x.shape and s.shape == (*x.shape[:-1], 1)
        if q_ref is None:
            return
        assert torch.equal(q, q_ref), f"codes differ at {(q != q_ref).nonzero()[:3].tolist()}"
        assert torch.equal(torch.isnan(s), torch.isnan(s_ref)), "NaN scales differ"
        fin = ~torch.isnan(s_ref)
        assert torch.equal(s[fin], s_ref[fin]), "scales differ"
        bad = ~torch.isfinite(x).all(-1, keepdim=True)
        assert torch.isnan(s[bad]).all() and (q * bad == 0).all(), "a non-finite token must get scale NaN, codes 0"
        # finite tokens: q * scale within half a step of x (where the scale is a normal number)
        ok = (fin & (s > 1e-30)).expand_as(x)
        if ok.any():
            err = ((q.double() * s.double() - x.double()).abs() / s.double())[ok].max().item()
            assert err <= 0.5 + 1e-3, f"dequantization error {err} steps > 0.5"
    return check


def _ptq_cases(backend):
    cases = []
    pre = f"per_token_quant[{backend}]"
    x = _randn(5, 48, seed=11)

    def result(label, xx, bits=8):
        cases.append(Case(f"{pre} {label}", lambda: ops.per_token_quant(xx, bits, backend=backend), "result",
                          _ptq_check(xx.reshape(-1, xx.shape[-1]) if xx.dim() > 2 else xx, bits)
                          if xx.dim() <= 2 else _ptq_check_nd(xx, bits)))

    def error(label, fn, names):
        cases.append(Case(f"{pre} {label}", fn, "error", names=names))

    result("bits=8", x)
    result("bits=4", x, 4)
    result("bits-tensor", x, torch.tensor([8, 4, 4, 8, 8], dtype=torch.int8))
    result("noncontiguous", noncontiguous(x))
    result("column-major", _colmajor(x))
    result("leading-dims", _randn(2, 3, 48, seed=12))
    xx = x.clone()
    xx[0, 3], xx[1, 5], xx[2, 7] = float("nan"), float("inf"), float("-inf")
    result("nan-inf-rows", xx)
    result("nan-inf-rows-4bit", xx, 4)
    result("zero-row", torch.cat([torch.zeros(1, 48), x]))
    result("huge-3e38", x / x.abs().max() * 3e38)
    result("tiny-1e-40", x * 1e-40)
    result("fp16", x.half())
    result("bf16", x.bfloat16())
    result("M=0", x[:0])
    result("K=1", x[:, :1])
    error("K=0", lambda: ops.per_token_quant(torch.randn(3, 0), backend=backend), ("features",))
    error("bits=5", lambda: ops.per_token_quant(x, 5, backend=backend), ("bits",))
    error("bits=True", lambda: ops.per_token_quant(x, True, backend=backend), ("bits",))
    error("bits-tensor-shape", lambda: ops.per_token_quant(x, torch.full((4,), 8), backend=backend), ("bits",))
    error("bits-tensor-6", lambda: ops.per_token_quant(x, torch.full((5,), 6), backend=backend), ("bits",))
    error("bits-tensor-float", lambda: ops.per_token_quant(x, torch.full((5,), 8.0), backend=backend), ("bits",))
    error("x-int", lambda: ops.per_token_quant(torch.ones(3, 4, dtype=torch.int32), backend=backend), ("x",))
    error("x-0d", lambda: ops.per_token_quant(torch.tensor(1.0), backend=backend), ("dimension",))
    error("x-float64", lambda: ops.per_token_quant(x.double(), backend=backend), ("float",))
    error("backend-bogus", lambda: ops.per_token_quant(x, backend="Interpret"), ("backend",))
    error("select-frac8", lambda: select_token_bits(x, 1.5), ("frac8",))
    error("select-importance-shape", lambda: select_token_bits(x, 0.5, torch.ones(4)), ("importance",))
    return cases


def _ptq_check_nd(x, bits):
    inner = _ptq_check(x.reshape(-1, x.shape[-1]), bits)

    def check(out):
        q, s = out
        assert q.shape == x.shape and s.shape == (*x.shape[:-1], 1)
        inner((q.reshape(-1, x.shape[-1]), s.reshape(-1, 1)))

    return check


# ====================================================================== triple-gate conv
def _conv_ref(x, w, b, prev, gate, tile, stride, pad):
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, pad)
    ho, wo = ref.shape[2:]
    pg = tgc.pixel_gate(gate, tile, ho, wo)
    bias = (b.double() if b is not None else torch.zeros(ref.shape[1], dtype=torch.float64))[None, :, None, None]
    return torch.where(pg == tgc.UPDATE, ref, torch.where(pg == tgc.SKIP, bias.expand_as(ref), prev.double()))


def _tg_cases(backend):
    cases = []
    pre = f"triple_gate[{backend}]"
    x = _randn(1, 6, 10, 10, seed=21)
    w = _randn(7, 6, 3, 3, seed=22, scale=0.3)
    b = _randn(7, seed=23)
    prev = _randn(1, 7, 10, 10, seed=24)
    tile = 4
    gmap = torch.tensor([[[1, 0, 2], [2, 1, 0], [0, 0, 1]]], dtype=torch.int8)

    def result(label, xx=x, ww=w, bb=b, gate=gmap, stride=1, pad=1, cl=False, **kw):
        ho = (xx.shape[2] + 2 * pad - 3) // stride + 1
        wo = (xx.shape[3] + 2 * pad - 3) // stride + 1
        p = prev[:, :, :ho, :wo].contiguous()
        g = gate if isinstance(gate, torch.Tensor) else gate(ho, wo)
        gm = g if isinstance(g, torch.Tensor) else g.gate
        ref = _conv_ref(xx, ww, bb, p, gm, tile, stride, pad)

        def run():
            out = p.clone(memory_format=torch.channels_last) if cl else p.clone()
            return tgc.triple_gate_conv2d(xx, ww, bb, g, out, stride, pad, 1, tile, backend=backend, **kw)

        cases.append(Case(f"{pre} conv {label}", run, "result", close_to(ref.float(), torch.float32)))

    def error(label, fn, names, crash_prone=False):
        cases.append(Case(f"{pre} {label}", fn, "error", names=names, crash_prone=crash_prone))

    result("gate-map")
    result("tilegates", gate=lambda ho, wo: tgc.compact_gates(gmap, (ho, wo), tile, backend="reference"))
    result("dense-gates", gate=lambda ho, wo: tgc.dense_gates(1, ho, wo, tile))
    result("channels-last", xx=x.contiguous(memory_format=torch.channels_last), cl=True)
    result("bias-noncontiguous", bb=_randn(14, seed=25)[::2])
    result("bias-none", bb=None)
    result("weight-noncontiguous", ww=w.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2))
    result("stride-2", stride=2, gate=lambda ho, wo: tgc.dense_gates(1, ho, wo, tile))
    xn = x.clone()
    xn[0, 2, 4, 4] = float("nan")
    result("nan-input", xx=xn, gate=lambda ho, wo: tgc.dense_gates(1, ho, wo, tile))
    xi = x.clone()
    xi[0, 0, 1, 8] = float("inf")
    result("inf-input", xx=xi)
    good = tgc.compact_gates(gmap, (10, 10), tile, backend="reference")
    out0 = torch.zeros(1, 7, 10, 10)
    for label, tiles, counts, names in (
            ("tiles-negative", torch.tensor([-5, 4, 8, 2, 3, 0, 0, 0, 0], dtype=torch.int32), good.counts,
             ("tile id", "outside")),
            ("tiles-past-end", torch.tensor([0, 4, 99, 2, 3, 0, 0, 0, 0], dtype=torch.int32), good.counts,
             ("tile id", "outside")),
            ("tiles-huge", torch.tensor([2 ** 31 - 1] * 9, dtype=torch.int32), good.counts, ("tile id", "outside")),
            ("tiles-duplicate", torch.tensor([0, 0, 8, 2, 3, 0, 0, 0, 0], dtype=torch.int32), good.counts,
             ("exactly",)),
            ("counts-too-large", good.tiles, torch.tensor([50, 0, 9], dtype=torch.int32), ("counts",)),
            ("counts-negative", good.tiles, torch.tensor([-1, 2, 9], dtype=torch.int32), ("counts",)),
            ("counts-pixels", good.tiles, torch.tensor([3, 2, 1000], dtype=torch.int32), ("counts[2]",)),
            ("tiles-int64", good.tiles.long(), good.counts, ("tiles",)),
            ("counts-short", good.tiles, good.counts[:2], ("counts",))):
        error(f"conv {label}", lambda tiles=tiles, counts=counts: tgc.triple_gate_conv2d(
            x, w, b, tgc.TileGates(good.gate, tiles, counts), out0.clone(), 1, 1, 1, tile, backend=backend),
            names, crash_prone=(backend == "interpret"))
    error("conv gate-code-3", lambda: tgc.triple_gate_conv2d(x, w, b, torch.full((1, 3, 3), 3, dtype=torch.int8),
                                                             out0.clone(), 1, 1, 1, tile, backend=backend),
          ("gate code", "gate"))
    error("conv gate-shape", lambda: tgc.triple_gate_conv2d(x, w, b, torch.ones(1, 2, 3, dtype=torch.int8),
                                                            out0.clone(), 1, 1, 1, tile, backend=backend), ("gate",))
    error("conv channels", lambda: tgc.triple_gate_conv2d(x, w[:, :5], b, gmap, out0.clone(), 1, 1, 1, tile,
                                                          backend=backend), ("channel",))
    error("conv out-shape", lambda: tgc.triple_gate_conv2d(x, w, b, gmap, torch.zeros(1, 7, 9, 10), 1, 1, 1, tile,
                                                           backend=backend), ("out",))
    error("conv out-dtype", lambda: tgc.triple_gate_conv2d(x, w, b, gmap, out0.half(), 1, 1, 1, tile,
                                                           backend=backend), ("out",))
    error("conv tile-0", lambda: tgc.triple_gate_conv2d(x, w, b, gmap, out0.clone(), 1, 1, 1, 0, backend=backend),
          ("tile",))
    error("conv bias-shape", lambda: tgc.triple_gate_conv2d(x, w, b[:3], gmap, out0.clone(), 1, 1, 1, tile,
                                                            backend=backend), ("bias",))
    error("conv x-3d", lambda: tgc.triple_gate_conv2d(x[0], w, b, gmap, out0.clone(), 1, 1, 1, tile,
                                                      backend=backend), ("4-D", "x"))
    error("conv stride-0", lambda: tgc.triple_gate_conv2d(x, w, b, gmap, out0.clone(), 0, 1, 1, tile,
                                                          backend=backend), ("stride",))
    error("conv gate-list", lambda: tgc.triple_gate_conv2d(x, w, b, [1, 2, 3], out0.clone(), 1, 1, 1, tile,
                                                           backend=backend), ("gate",))
    error("conv backend", lambda: tgc.triple_gate_conv2d(x, w, b, gmap, out0.clone(), 1, 1, 1, tile,
                                                         backend="cuda"), ("cuda",))
    error("compact codes", lambda: tgc.compact_gates(torch.full((1, 3, 3), -1, dtype=torch.int8), (10, 10), tile,
                                                     backend=backend), ("gate code", "gate"))
    error("compact shape", lambda: tgc.compact_gates(gmap, (20, 10), tile, backend=backend), ("gate",))
    # ---- gate map
    xp = x.clone()
    xp[0, 1, 9, 0] += 1.0
    xq = x.clone()
    xq[0, 3, 0, 9] = float("nan")

    def gate_case(label, a, bprev, want_update, **kw):
        def check(g):
            assert isinstance(g, tgc.TileGates)
            upd = (g.gate == tgc.UPDATE).nonzero()[:, 1:].tolist()
            assert sorted(upd) == sorted(want_update), f"UPDATE tiles {upd}, expected {want_update}"
            assert int(g.counts[0]) == len(want_update)
            assert sorted(g.tiles[:int(g.counts[0])].tolist()) == sorted(i * 3 + j for i, j in want_update)

        cases.append(Case(f"{pre} map {label}", lambda: tgc.triple_gate_map(a, bprev, 3, 1, 1, 1, tile,
                                                                              backend=backend, **kw),
                          "result", check))

    gate_case("static", x, x.clone(), [])
    gate_case("local-change", x, xp, [[2, 0]])
    gate_case("nan-change", x, xq, [[0, 2]])
    gate_case("nan-both-frames", xq, xq.clone(), [[0, 2]])
    gate_case("threshold-large", x, xp, [], threshold=5.0)
    error("map threshold-negative", lambda: tgc.triple_gate_map(x, x, 3, 1, 1, 1, tile, -1.0, backend=backend),
          ("threshold",))
    error("map threshold-nan", lambda: tgc.triple_gate_map(x, x, 3, 1, 1, 1, tile, float("nan"), backend=backend),
          ("threshold",))
    error("map prev-shape", lambda: tgc.triple_gate_map(x, x[:, :, :9], 3, 1, 1, 1, tile, backend=backend),
          ("x_prev",))
    error("map prev-gate", lambda: tgc.triple_gate_map(x, x, 3, 1, 1, 1, tile, prev_gate=torch.zeros(1, 2, 2),
                                                       backend=backend), ("prev_gate",))
    error("map importance-size", lambda: tgc.triple_gate_map(x, x, 3, 1, 1, 1, tile, importance_weight=torch.ones(3),
                                                             skip_logit=0.0, backend=backend), ("importance_weight",))
    error("map skip-without-weight", lambda: tgc.triple_gate_map(x, x, 3, 1, 1, 1, tile, skip_logit=0.0,
                                                                 backend=backend), ("importance_weight",))
    error("map kernel-too-big", lambda: tgc.triple_gate_map(x, x, 13, 1, 0, 1, tile, backend=backend),
          ("too small",))
    return cases


# ====================================================================== draft attention
def _attn_ref64(q, k, v, mask, layout, scale=None):
    tb = layout.token_block
    tm = mask.expand(q.shape[0], q.shape[1], -1, -1).index_select(-2, tb).index_select(-1, tb)
    sc = (q.shape[-1] ** -0.5) if scale is None else scale
    qd, kd, vd = q.double(), k.double(), v.double()
    s = torch.where(tm, qd @ kd.transpose(-1, -2) * sc, torch.tensor(-math.inf, dtype=torch.float64))
    p = torch.softmax(s, -1)
    # masked keys are never read: a NaN/Inf value row reaches only the queries attending it
    vf = torch.isfinite(vd)
    o = p @ torch.where(vf, vd, 0.0)
    hit = (tm.double() @ (~vf).double()) > 0
    return torch.where(hit, torch.tensor(math.nan, dtype=torch.float64), o)


def _draft_cases(backend):
    cases = []
    pre = f"draft_attention[{backend}]"
    geo = dict(frames=2, height=4, width=4, pool=(2, 2))
    lay = ops.draft_layout(2, 4, 4, (2, 2))
    s = lay.seq_len
    q, k, v = (_randn(1, 2, s, 64, seed=31 + i) for i in range(3))
    mask = torch.eye(lay.n_blocks, dtype=torch.bool)[None, None].repeat(1, 2, 1, 1)
    mask[:, :, 0, 3] = True
    mask[:, 1, 5, 2] = True

    def result(label, qq=q, kk=k, vv=v, mm=mask, dtype=torch.float32, **kw):
        ref = _attn_ref64(qq, kk, vv, mm, lay, kw.get("scale"))
        cases.append(Case(f"{pre} block {label}",
                          lambda: ops.block_sparse_attention(qq, kk, vv, mm, lay, backend=backend, **kw), "result",
                          close_to(ref.to(dtype), dtype, 5e-4 if dtype == torch.float32 else None)))

    def error(label, fn, names):
        cases.append(Case(f"{pre} {label}", fn, "error", names=names))

    result("base")
    result("mask-broadcast-heads", mm=mask[:, :1])
    result("fp16", q.half(), k.half(), v.half(), dtype=torch.float16)
    result("noncontiguous", q.transpose(2, 3).contiguous().transpose(2, 3), k, v)
    result("scale", scale=0.05)
    for what in ("q", "k", "v"):
        for tok in (3, 9):
            t = {"q": q, "k": k, "v": v}
            t = {n: a.clone() for n, a in t.items()}
            t[what][0, 0, tok, 1] = float("nan") if tok == 3 else float("inf")
            result(f"{what}-nonfinite-token{tok}", t["q"], t["k"], t["v"])

    def draft_check(qq, kk, vv):
        def check(out):
            o, m = out
            close_to(_attn_ref64(qq, kk, vv, m, lay).float(), torch.float32, 5e-4)(o)
        return check

    for sp in (0.0, 0.5, 1.0):
        cases.append(Case(f"{pre} draft sparsity={sp}",
                          lambda sp=sp: ops.draft_attention(q, k, v, sparsity=sp, backend=backend, return_mask=True,
                                                            **geo), "result", draft_check(q, k, v)))
    qn = q.clone()
    qn[0, 1, 5, :] = float("nan")
    cases.append(Case(f"{pre} draft nan-query", lambda: ops.draft_attention(qn, k, v, sparsity=0.5, backend=backend,
                                                                            return_mask=True, **geo),
                      "result", draft_check(qn, k, v)))
    error("head-dim-44", lambda: ops.draft_attention(q[..., :44], k[..., :44], v[..., :44], backend=backend, **geo),
          ("head dim",))                                   # not a multiple of 8 (48 is valid: a padded tile)
    error("seq-mismatch", lambda: ops.draft_attention(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], backend=backend,
                                                      **geo), ("sequence length",))
    error("dtype-mismatch", lambda: ops.draft_attention(q, k.half(), v, backend=backend, **geo), ("dtype",))
    error("sparsity-1.5", lambda: ops.draft_attention(q, k, v, sparsity=1.5, backend=backend, **geo), ("sparsity",))
    error("mode-bogus", lambda: ops.draft_attention(q, k, v, mode="bogus", backend=backend, **geo), ("mode",))
    error("mask-no-diagonal", lambda: ops.block_sparse_attention(q, k, v, torch.zeros_like(mask), lay,
                                                                 backend=backend), ("diagonal",))
    error("mask-shape", lambda: ops.block_sparse_attention(q, k, v, mask[..., :-1], lay, backend=backend),
          ("block_mask",))
    error("mask-int", lambda: ops.block_sparse_attention(q, k, v, mask.int(), lay, backend=backend), ("bool",))
    error("layout-none", lambda: ops.block_sparse_attention(q, k, v, mask, None, backend=backend), ("layout",))
    error("pool-1x1", lambda: ops.draft_attention(q, k, v, frames=2, height=4, width=4, pool=(1, 1),
                                                  backend=backend), ("pool",))
    error("frames-0", lambda: ops.draft_layout(0, 4, 4), ("frames",))
    error("qkv-3d", lambda: ops.draft_attention(q[0], k[0], v[0], backend=backend, **geo), ("(B, H, S, D)",))
    return cases


# ====================================================================== the suite
def build_cases() -> list:
    torch.manual_seed(0)
    cases = []
    for backend in BACKENDS:
        for spec in SPECS:
            cases += _linear_cases(spec, backend)
        cases += _ptq_cases(backend)
        cases += _tg_cases(backend)
        cases += _draft_cases(backend)
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "duplicate case names"
    return cases


_CASES = build_cases()
# the adversarial suite of the ops (the formats / modules add theirs in test_fuzz_formats_modules.py)
test_case_count, test_case, test_crash_prone_cases_in_a_child_process = suite_tests(
    __file__, "build_cases", _CASES, 500, "crash-prone op cases")


if __name__ == "__main__":
    print_report(_CASES)
