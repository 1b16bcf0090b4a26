"""Untrusted contents: packed formats, checkpoints, strides and NaN/Inf.

Regression tests for inputs that are well shaped but carry crafted or unusual
data: every packed format validates its contents when built or loaded (2:4
codes, block indices, int4 zero points, scales, padding), a load either fully
succeeds or leaves the module untouched, non-contiguous operands give the
reference's result on the kernel path, and NaN/Inf follow dense semantics on
every backend.  All on CPU: the ``reference`` backend and the Triton kernels
under the interpreter (``interpret``).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from sparsekit import ops
from sparsekit.formats import (BlockSparseWeight, Int4Weight, Int8Weight, Sparse24Int4Weight, Sparse24Int8Weight,
                               Sparse24Weight)
from sparsekit.nn import BlockSparseLinear, QLinear, SparseLinear, SparseQLinear, TripleGateConv2d
from sparsekit.ops import triple_gate_conv as tgc
from sparsekit.testing import random_2to4, rel_err

BACKENDS = ("reference", "interpret")


def _clone_sd(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_untouched(m, snap):
    now = m.state_dict()
    assert now.keys() == snap.keys()
    for k in snap:
        assert now[k].shape == snap[k].shape and torch.equal(now[k], snap[k]), k


# ====================================================================== 2:4 metadata and padding

def _bad_meta(meta):
    m = meta.clone()
    m[0, 0] = (m[0, 0] & 0xF0) | 0x5          # group 0: (i0, i1) = (1, 1)
    return m


def test_sparse24_rejects_equal_positions_in_every_format():
    w = random_2to4(8, 40)
    sp = Sparse24Weight.from_dense(w)
    with pytest.raises(ValueError, match=r"i0 < i1"):
        Sparse24Weight(sp.values, _bad_meta(sp.meta), sp.shape)
    q8 = Sparse24Int8Weight.from_dense(w)
    with pytest.raises(ValueError, match=r"i0 < i1"):
        Sparse24Int8Weight(q8.values, _bad_meta(q8.meta), q8.scale, q8.shape)
    q4 = Sparse24Int4Weight.from_dense(random_2to4(8, 64))
    with pytest.raises(ValueError, match=r"i0 < i1"):
        Sparse24Int4Weight(q4.qweight, q4.scales, q4.zeros, _bad_meta(q4.meta), q4.shape, q4.group_size)
    # the packed entry points (validate=True by default) and every module's load_state_dict
    x = torch.randn(3, 40)
    with pytest.raises(ValueError, match=r"i0 < i1"):
        ops.sparse24_linear_packed(x, sp.values, _bad_meta(sp.meta), 40)
    with pytest.raises(ValueError, match=r"i0 < i1"):
        ops.sparse24_int8_linear_packed(x, q8.values, _bad_meta(q8.meta), q8.scale, 40)
    xh = torch.randn(3, 64).half()
    with pytest.raises(ValueError, match=r"i0 < i1"):
        ops.sparse24_int4_linear_packed(xh, q4.qweight, q4.scales, q4.zeros, _bad_meta(q4.meta),
                                        q4.effective_group_size, 64)
    for mod in (SparseLinear.from_dense(torch.nn.Linear(40, 8)),
                SparseLinear.from_dense(torch.nn.Linear(40, 8), act_bits=8),
                SparseQLinear.from_dense(torch.nn.Linear(64, 8))):
        sd = _clone_sd(mod)
        sd["meta_codes"] = _bad_meta(sd["meta_codes"])
        snap = _snapshot(mod)
        with pytest.raises(ValueError, match=r"i0 < i1"):
            mod.load_state_dict(sd)
        _assert_untouched(mod, snap)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sparse24_nonfinite_padding_is_rejected(bad):
    # K = 37: columns 37..39 are zero padding; a crafted non-finite value there
    # would poison the kernel's output (0 * NaN) but not the reference's
    sp = Sparse24Weight.from_dense(random_2to4(6, 37))
    cols = Sparse24Weight.columns_from_meta(sp.meta)
    r, c = [int(i) for i in (cols >= 37).nonzero()[0]]
    v = sp.values.clone()
    v[r, c] = bad
    with pytest.raises(ValueError, match="padding"):
        Sparse24Weight(v, sp.meta, sp.shape)
    with pytest.raises(ValueError, match="padding"):
        ops.sparse24_linear_packed(torch.randn(2, 37), v, sp.meta, 37, backend="interpret")
    mod = SparseLinear.from_dense(torch.nn.Linear(37, 6))
    sd = _clone_sd(mod)
    sd["values"][r, c] = bad
    snap = _snapshot(mod)
    with pytest.raises(ValueError, match="padding"):
        mod.load_state_dict(sd)
    _assert_untouched(mod, snap)


def test_packed_entry_points_check_shapes_against_in_features():
    sp = Sparse24Weight.from_dense(random_2to4(6, 40))
    x = torch.randn(2, 40)
    with pytest.raises(ValueError, match=r"values must have shape \(N, 20\)"):
        ops.sparse24_linear_packed(x, sp.values[:, :12], sp.meta, 40, backend="interpret")
    with pytest.raises(ValueError, match=r"meta must have shape \(6, 5\)"):
        ops.sparse24_linear_packed(x, sp.values, sp.meta[:, :2], 40, backend="interpret")
    q8 = Sparse24Int8Weight.from_sparse24(sp)
    with pytest.raises(ValueError, match=r"values must have shape \(N, 20\)"):
        ops.sparse24_int8_linear_packed(x, q8.values[:, :8], q8.meta, q8.scale, 40, backend="interpret")
    with pytest.raises(ValueError, match=r"meta must have shape"):
        ops.sparse24_int8_linear_packed(x, q8.values, q8.meta[:, :1], q8.scale, 40, backend="interpret")


def test_validation_runs_once_per_tensor_version():
    sp = Sparse24Weight.from_dense(random_2to4(6, 40))
    values, meta = sp.values.clone(), sp.meta.clone()
    x = torch.randn(2, 40)
    ops.sparse24_linear_packed(x, values, meta, 40)
    calls = []
    import sparsekit.ops.sparse24 as s24

    orig = s24.validate_sparse24
    s24.validate_sparse24 = lambda *a, **k: (calls.append(1), orig(*a, **k))[1]
    try:
        ops.sparse24_linear_packed(x, values, meta, 40)
        assert calls == []                               # same tensors, unmodified: no second pass
        meta[0, 0] = 0x55                                # an in-place change is noticed
        with pytest.raises(ValueError, match="i0 < i1"):
            ops.sparse24_linear_packed(x, values, meta, 40)
        assert calls == [1]
    finally:
        s24.validate_sparse24 = orig


# ====================================================================== block-sparse indices

def _bsl():
    torch.manual_seed(0)
    return BlockSparseLinear.from_dense(torch.nn.Linear(64, 40), block_size=16, sparsity=0.5)


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd["crow"].__setitem__(-1, 100000), "crow must end at"),
    (lambda sd: sd["crow"].__setitem__(1, int(sd["crow"][2]) + 1), "non-decreasing"),
    (lambda sd: sd["col"].__setitem__(0, -1), "out of range"),
    (lambda sd: sd["col"].__setitem__(0, 4), "out of range"),
    (lambda sd: sd["tblk"].copy_(sd["tblk"].flip(0)), "transposed index"),
    (lambda sd: sd["trow"].__setitem__(0, 7), "transposed index"),
    (lambda sd: sd["tcol_ptr"].__setitem__(-1, 99), "transposed index"),
])
def test_block_sparse_load_rejects_bad_indices_and_keeps_module(edit, match):
    m = _bsl()
    sd = _clone_sd(m)
    edit(sd)
    snap = _snapshot(m)
    with pytest.raises(ValueError, match=match):
        m.load_state_dict(sd)
    _assert_untouched(m, snap)
    x = torch.randn(3, 64)
    assert rel_err(m(x), m.to_dense()(x)) < 1e-5


def test_block_sparse_load_from_safetensors_file_is_validated(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    m = _bsl()
    sd = _clone_sd(m)
    sd["crow"][-1] = 100000
    path = str(tmp_path / "bad.safetensors")
    st.save_file(sd, path)
    with pytest.raises(ValueError, match="crow"):
        m.load_state_dict(st.load_file(path))


def test_block_sparse_resizing_load_keeps_the_parameter_object():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 40)
    a = BlockSparseLinear.from_dense(lin, block_size=16, sparsity=0.75)
    b = BlockSparseLinear.from_dense(lin, block_size=16, sparsity=0.25)
    p = a.blocks
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    a(torch.randn(2, 64)).sum().backward()
    a.load_state_dict(b.state_dict())
    assert a.blocks is p and a.blocks.shape == b.blocks.shape and a.blocks.grad is None
    x = torch.randn(3, 64)
    assert torch.equal(a(x), b(x))
    a(x).sum().backward()
    before = a.blocks.detach().clone()
    opt.step()                                           # the optimizer still updates the same Parameter
    assert not torch.equal(before, a.blocks.detach())


def test_from_blocks_bad_indices_give_clear_errors():
    blocks = torch.randn(2, 16, 16)
    with pytest.raises(ValueError, match="crow must end at"):
        BlockSparseWeight.from_blocks(blocks, torch.tensor([0, 5]), torch.tensor([0, 1]), (16, 32))
    with pytest.raises(ValueError, match=r"col\[1\] = -1 is out of range"):
        BlockSparseWeight.from_blocks(blocks, torch.tensor([0, 2]), torch.tensor([0, -1]), (16, 32))
    with pytest.raises(ValueError, match="strictly increasing"):
        BlockSparseWeight.from_blocks(blocks, torch.tensor([0, 2]), torch.tensor([1, 1]), (16, 32))
    with pytest.raises(ValueError, match=r"crow must have shape \(2,\)"):
        BlockSparseWeight.from_blocks(blocks, torch.tensor([0, 1, 2]), torch.tensor([0, 1]), (16, 32))
    with pytest.raises(TypeError, match="integer"):
        BlockSparseWeight.from_blocks(blocks, torch.tensor([0.0, 2.0]), torch.tensor([0, 1]), (16, 32))


def test_block_sparse_nonfinite_padding_is_rejected():
    w = torch.randn(20, 40)                               # N % 16 and K % 16 != 0: edge blocks have padding
    s = BlockSparseWeight.from_dense(w, 16)
    blocks = s.blocks.clone()
    last_col = (s.col == 2).nonzero()[0, 0]
    blocks[last_col, 0, 15] = float("nan")                # column 32 + 15 = 47 >= 40
    with pytest.raises(ValueError, match="padding"):
        BlockSparseWeight(blocks, s.crow, s.col, s.tcol_ptr, s.trow, s.tblk, s.shape, s.block_size)
    blocks = s.blocks.clone()
    blocks[-1, 10, 0] = float("inf")                     # row 16 + 10 = 26 >= 20
    with pytest.raises(ValueError, match="padding"):
        ops.block_sparse_linear_packed(torch.randn(2, 40), blocks, s.crow, s.col, s.tcol_ptr, s.trow, s.tblk, 20, 40)


_CRASH_SCRIPT = textwrap.dedent("""
    import torch
    from sparsekit.nn import BlockSparseLinear
    torch.manual_seed(0)
    m = BlockSparseLinear.from_dense(torch.nn.Linear(64, 40), block_size=16, sparsity=0.5, backend="interpret")
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["crow"][-1] = 100000
    try:
        m.load_state_dict(sd)
    except ValueError:
        pass
    y = m(torch.randn(3, 64))
    assert torch.isfinite(y).all()
    print("survived")
""")


_UNCHECKED_SCRIPT = textwrap.dedent("""
    import torch
    from sparsekit import ops
    from sparsekit.formats import BlockSparseWeight
    torch.manual_seed(0)
    w = BlockSparseWeight.from_dense(torch.randn(40, 64), 16, block_mask=torch.rand(3, 4) < 0.6)
    x = torch.randn(3, 64, requires_grad=True)
    crow = w.crow.clone(); crow[-1] = 100000; crow[1] = -7
    col = w.col.clone(); col[0] = -3; col[1] = 2 ** 30
    tptr = w.tcol_ptr.clone(); tptr[-1] = 10 ** 6
    trow = w.trow.clone(); trow[0] = -100
    tblk = w.tblk.clone(); tblk[0] = 10 ** 7; tblk[1] = -5
    blocks = w.blocks.clone().requires_grad_()
    y = ops.block_sparse_linear_packed(x, blocks, crow, col, tptr, trow, tblk, 40, 64, backend="interpret",
                                       validate=False)
    y.sum().backward()
    print("survived")
""")


def test_unchecked_block_index_never_leaves_the_buffers():
    # validate=False hands a corrupt index straight to the kernels: wrong numbers are allowed
    # (documented), reads/writes out of bounds are not (before the kernels' masks: SIGSEGV)
    r = subprocess.run([sys.executable, "-c", _UNCHECKED_SCRIPT], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "SPARSEKIT_NO_CUDA_EXT": "1"})
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stderr[-2000:])


def test_crafted_crow_cannot_reach_the_interpreted_kernel():
    # in a subprocess: before validation this died with SIGSEGV
    r = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "SPARSEKIT_NO_CUDA_EXT": "1"})
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stderr[-2000:])


# ====================================================================== int4 / int8 / QLinear

def test_int4_zero_points_and_scales_are_validated():
    w = Int4Weight.from_float(torch.randn(8, 64), group_size=32)
    z = w.zeros.clone()
    z[0, 0] = 16
    with pytest.raises(ValueError, match=r"zeros .* \[0, 15\]"):
        Int4Weight(w.qweight, w.scales, z, w.shape, 32)
    z[0, 0] = 2.5
    with pytest.raises(ValueError, match=r"zeros .* integer values"):
        Int4Weight(w.qweight, w.scales, z, w.shape, 32)
    s = w.scales.clone()
    s[1, 1] = float("inf")
    with pytest.raises(ValueError, match="scales must be finite"):
        Int4Weight(w.qweight, s, w.zeros, w.shape, 32)
    with pytest.raises(ValueError, match="zero points"):
        ops.int4_linear_packed(torch.randn(2, 64).half(), w.qweight, w.scales, z, 32, 64)
    q = Int8Weight.from_float(torch.randn(8, 64))
    qw = q.qweight.clone()
    qw[0, 0] = -128
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        Int8Weight(qw, q.scales, q.shape)
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        ops.int8_linear_packed(torch.randn(2, 64), qw, q.scales)


def test_qlinear_load_checks_zero_points_and_input_scale():
    torch.manual_seed(0)
    q = QLinear.from_float(torch.nn.Linear(64, 8), group_size=32)
    for key, value, match in (("zeros", 16.0, r"\[0, 15\]"), ("zeros", -1.0, r"\[0, 15\]"),
                              ("scales", float("nan"), "finite")):
        sd = _clone_sd(q)
        sd[key][0, 0] = value
        snap = _snapshot(q)
        with pytest.raises(ValueError, match=match):
            q.load_state_dict(sd)
        _assert_untouched(q, snap)
    # an AWQ input_scale must be (in_features,), finite and > 0
    for bad, match in ((torch.ones(5, 64), r"shape \(64,\)"), (torch.zeros(64), "> 0"),
                       (torch.full((64,), float("inf")), "finite")):
        sd = _clone_sd(q)
        sd["input_scale"] = bad
        with pytest.raises(ValueError, match=match):
            q.load_state_dict(sd)
        assert q.input_scale is None
    sd = _clone_sd(q)
    sd["input_scale"] = torch.full((64,), 2.0)
    q.load_state_dict(sd)
    assert q.input_scale.shape == (64,)
    x = torch.randn(3, 64).half()
    ref = F.linear(x.float() / 2, q.weight_format().dequantize().float(), q.bias.float())
    assert rel_err(q(x), ref) < 1e-2


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_qlinear_calibration_inputs_are_checked(method):
    lin = torch.nn.Linear(64, 8)
    with pytest.raises(ValueError, match="in_features=64"):
        QLinear.from_float(lin, method=method, group_size=32, calib_inputs=torch.randn(10, 32))   # 320 = 5 x 64
    with pytest.raises(ValueError, match="in_features=64"):
        QLinear.from_float(lin, method=method, group_size=32, calib_inputs=torch.randn(10, 63))
    with pytest.raises(TypeError, match="calib_inputs"):
        QLinear.from_float(lin, method=method, group_size=32, calib_inputs=torch.ones(10, 64, dtype=torch.int64))


def test_load_keeps_parameter_objects_and_is_all_or_nothing():
    torch.manual_seed(0)
    a = SparseLinear.from_dense(torch.nn.Linear(40, 8))
    b = SparseLinear.from_dense(torch.nn.Linear(40, 8))
    pv, pb = a.values, a.bias
    a.load_state_dict(b.state_dict())
    assert a.values is pv and a.bias is pb and torch.equal(a.values, b.values)
    # a bad tensor late in the dict: nothing earlier was copied either
    sd = _clone_sd(b)
    sd["values"] += 1
    sd["meta_codes"][0, 0] = 0x55
    snap = _snapshot(a)
    with pytest.raises(ValueError):
        a.load_state_dict(sd)
    _assert_untouched(a, snap)
    # a missing key under strict loading: also untouched (and still a RuntimeError, as in PyTorch)
    sd = _clone_sd(b)
    sd["values"] += 1
    del sd["meta_codes"]
    with pytest.raises(RuntimeError, match="meta_codes"):
        a.load_state_dict(sd)
    _assert_untouched(a, snap)
    a.load_state_dict(sd, strict=False)                   # non-strict: the present keys load
    assert torch.equal(a.values, sd["values"])


# ====================================================================== strides

def _noncontig_bias(n):
    return torch.randn(2 * n)[::2]


def _colmajor(t):
    return t.t().contiguous().t()


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_bias_every_linear_op(backend):
    torch.manual_seed(0)
    n, k = 24, 64
    x = torch.randn(5, k)
    bias = _noncontig_bias(n)
    assert not bias.is_contiguous()
    wd = random_2to4(n, k)
    cases = [
        (lambda b: ops.sparse24_linear(x, Sparse24Weight.from_dense(wd), b, backend=backend),
         lambda: F.linear(x.double(), wd.double())),
        (lambda b: ops.block_sparse_linear(x, BlockSparseWeight.from_dense(wd, 16), b, backend=backend),
         lambda: F.linear(x.double(), wd.double())),
    ]
    w4 = Int4Weight.from_float(torch.randn(n, k), group_size=32)
    xh, bh = x.half(), torch.randn(2 * n).half()[::2]
    assert not bh.is_contiguous()
    for fn, ref in cases:
        assert rel_err(fn(bias), ref() + bias.double()) < 1e-5
    y = ops.int4_linear(xh, w4, bh, backend=backend)
    assert rel_err(y, F.linear(xh.float(), w4.dequantize().float(), bh.float())) < 2e-3
    w8 = Int8Weight.from_float(torch.randn(n, k))
    y1 = ops.int8_linear(x, w8, bias, backend=backend)
    assert rel_err(y1, ops.int8_linear(x, w8, bias.contiguous(), backend="reference")) < 1e-5
    y2 = ops.w4a8_linear(xh, w4, bh, backend=backend)
    assert rel_err(y2, ops.w4a8_linear(xh, w4, bh.contiguous(), backend="reference")) < 2e-3
    q8 = Sparse24Int8Weight.from_dense(wd)
    y3 = ops.sparse24_int8_linear(x, q8, bias, backend=backend)
    assert rel_err(y3, ops.sparse24_int8_linear(x, q8, bias.contiguous(), backend="reference")) < 1e-5
    q4 = Sparse24Int4Weight.from_dense(wd.half())
    y4 = ops.sparse24_int4_linear(xh, q4, bh, backend=backend)
    assert rel_err(y4, F.linear(xh.float(), q4.to_dense().float(), bh.float())) < 2e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_bias_conv(backend):
    torch.manual_seed(0)
    x = torch.randn(1, 8, 9, 9)
    w = torch.randn(12, 8, 3, 3) * 0.2
    b = _noncontig_bias(12)
    out = torch.zeros(1, 12, 9, 9)
    gates = tgc.dense_gates(1, 9, 9, 4)
    tgc.triple_gate_conv2d(x, w, b, gates, out, 1, 1, 1, 4, backend=backend)
    assert rel_err(out, F.conv2d(x.double(), w.double(), b.double(), 1, 1)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_major_weight_operands(backend):
    torch.manual_seed(0)
    n, k = 24, 64
    x = torch.randn(3, k)
    sp = Sparse24Weight.from_dense(random_2to4(n, k))
    v, m = _colmajor(sp.values), _colmajor(sp.meta)
    assert not v.is_contiguous() and not m.is_contiguous()
    ref = F.linear(x.double(), sp.to_dense().double())
    assert rel_err(ops.sparse24_linear_packed(x, v, m, k, backend=backend), ref) < 1e-5
    assert rel_err(ops.sparse24_linear(x, Sparse24Weight(v, m, (n, k)), backend=backend), ref) < 1e-5
    w4 = Int4Weight.from_float(torch.randn(n, k), group_size=32)
    xh = x.half()
    ref4 = F.linear(xh.float(), w4.dequantize().float())
    y = ops.int4_linear_packed(xh, _colmajor(w4.qweight), _colmajor(w4.scales), _colmajor(w4.zeros), 32, k,
                               backend=backend)
    assert rel_err(y, ref4) < 2e-3
    y = ops.w4a8_linear_packed(xh, _colmajor(w4.qweight), _colmajor(w4.scales), _colmajor(w4.zeros), 32, k,
                               backend=backend)
    assert rel_err(y, ops.w4a8_linear(xh, w4, backend="reference")) < 2e-3
    q8 = Sparse24Int8Weight.from_sparse24(sp)
    scale = torch.stack([q8.scale, q8.scale], 1)[:, 0]   # stride 2
    assert not scale.is_contiguous()
    y = ops.sparse24_int8_linear_packed(x, _colmajor(q8.values), _colmajor(q8.meta), scale, k, backend=backend)
    assert rel_err(y, ops.sparse24_int8_linear(x, q8, backend="reference")) < 1e-5


# ====================================================================== NaN / Inf

def _act_cases():
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    x[2, 9] = float("-inf")
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_quant_nonfinite_tokens_propagate(backend):
    x = _act_cases()
    q, s = ops.per_token_quant(x, backend=backend)
    assert torch.isnan(s[:3]).all() and torch.isfinite(s[3]).all()
    assert (q[:3] == 0).all()                             # +inf is never code -127 (or any made-up code)
    deq = q.float() * s
    assert not torch.isfinite(deq[:3]).any(dim=-1).any() and torch.isfinite(deq[3]).all()
    qr, sr = ops.per_token_quant(x, backend="reference")
    assert torch.equal(q, qr) and torch.equal(torch.isnan(s), torch.isnan(sr))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_activation_ops_propagate_nonfinite_rows(backend):
    x = _act_cases()
    n = 16
    dense_rows = ~torch.isfinite(F.linear(x, torch.randn(n, 64))).all(-1)
    w8 = Int8Weight.from_float(torch.randn(n, 64))
    w4 = Int4Weight.from_float(torch.randn(n, 64), group_size=32)
    q8 = Sparse24Int8Weight.from_dense(random_2to4(n, 64))
    outs = [ops.int8_linear(x, w8, backend=backend),
            ops.int8_linear(x, w8, act_bits="mixed", backend=backend),
            ops.w4a8_linear(x.half(), w4, backend=backend),
            ops.w4a8_linear(x.half(), w4, act_bits=4, backend=backend),
            ops.sparse24_int8_linear(x, q8, backend=backend)]
    ql = QLinear.from_float(torch.nn.Linear(64, n), bits=8, act_bits=8, dtype=torch.float16, backend=backend)
    outs.append(ql(x.half()))
    sl = SparseLinear.from_dense(torch.nn.Linear(64, n), act_bits=8, backend=backend)
    outs.append(sl(x))
    for y in outs:
        bad_rows = ~torch.isfinite(y).all(-1)
        assert torch.equal(bad_rows, dense_rows), bad_rows
        assert not torch.isfinite(y[:3]).any()


@pytest.mark.parametrize("backend", BACKENDS + ("dense",))
def test_int8_2to4_no_fp32_overflow_near_1e37(backend):
    torch.manual_seed(0)
    x = torch.randn(3, 64) * 1e37
    q8 = Sparse24Int8Weight.from_dense(random_2to4(16, 64) * 0.01)
    y = ops.sparse24_int8_linear(x, q8, backend=backend)
    ref = ops.sparse24_int8_linear(x, q8, backend="reference")
    assert torch.isfinite(y).all() and rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wmag, xmag", [(1e-2, 1e37), (1e36, 1e-3)])
def test_int8_and_w4a8_no_fp32_overflow_in_the_epilogue(backend, wmag, xmag):
    torch.manual_seed(0)
    x = torch.randn(3, 256) * xmag
    w8 = Int8Weight.from_float(torch.randn(16, 256) * wmag)
    y = ops.int8_linear(x, w8, backend=backend)
    ref = ops.int8_linear(x, w8, backend="reference")
    assert torch.isfinite(y).all() and rel_err(y, ref) < 1e-5
    w4 = Int4Weight.from_float(torch.randn(16, 256) * min(wmag, 1e4), 32, dtype=torch.bfloat16)
    xb = x.bfloat16()
    y4 = ops.w4a8_linear(xb, w4, backend=backend)
    assert torch.isfinite(y4).all() and rel_err(y4, ops.w4a8_linear(xb, w4, backend="reference")) < 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_triple_gate_nan_frame_updates_and_does_not_stick(backend):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    layer = TripleGateConv2d.from_conv(conv, tile=4, backend=backend).eval()
    f0 = torch.randn(1, 3, 12, 12)
    f1 = f0.clone()
    f1[0, 1, 6, 6] = float("nan")
    f2 = f0.clone()
    f2[0, 0, 2, 2] = float("inf")
    with torch.no_grad():
        for f in (f0, f1, f0, f2, f0, f0):
            y = layer(f)
            ref = conv(f)
            assert torch.equal(torch.isnan(y), torch.isnan(ref))
            assert torch.equal(torch.isinf(y), torch.isinf(ref))
            fin = torch.isfinite(ref)
            assert rel_err(y[fin], ref[fin]) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_triple_gate_gate_map_treats_nan_change_as_update(backend):
    x = torch.randn(1, 3, 8, 8)
    xp = x.clone()
    xp[0, 0, 1, 1] = float("nan")
    g = tgc.triple_gate_map(x, xp, 3, 1, 1, 1, 4, 0.0, backend=backend)
    assert g.gate[0, 0, 0] == tgc.UPDATE and int(g.counts[0]) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["inplace", "load_state_dict", "to", "data"])
def test_triple_gate_weight_change_invalidates_cached_frame(backend, how):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    layer = TripleGateConv2d.from_conv(conv, tile=4, backend=backend).eval()
    f = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        layer(f)
        if how == "inplace":
            layer.weight.mul_(2)
            conv.weight.mul_(2)
        elif how == "load_state_dict":
            conv2 = torch.nn.Conv2d(3, 5, 3, padding=1)
            sd = layer.state_dict()
            sd["weight"], sd["bias"] = conv2.weight.detach().clone(), conv2.bias.detach().clone()
            layer.load_state_dict(sd)
            conv = conv2
        elif how == "to":
            layer.to(torch.bfloat16)
            conv = conv.to(torch.bfloat16)
            f = f.to(torch.bfloat16)
        else:                                             # what Module.to / _apply does: new storage
            new = torch.randn_like(layer.weight)
            layer.weight.data = new.clone()
            conv.weight.data = new.clone()
        y = layer(f)                                      # same frame: every tile would be REUSEd
        assert rel_err(y, conv(f)) < (1e-2 if f.dtype == torch.bfloat16 else 1e-5)


def test_triple_gate_hand_built_tile_ids_are_rejected():
    x = torch.randn(1, 4, 8, 8)
    w = torch.randn(6, 4, 3, 3)
    out = torch.zeros(1, 6, 8, 8)
    good = tgc.compact_gates(torch.ones(1, 2, 2, dtype=torch.int8), (8, 8), 4, backend="reference")
    for tiles, counts, match in (
            (torch.tensor([-3, 1, 2, 3], dtype=torch.int32), good.counts, "outside 0..3"),
            (torch.tensor([0, 1, 2, 99], dtype=torch.int32), good.counts, "outside 0..3"),
            (good.tiles, torch.tensor([9, 0, 64], dtype=torch.int32), "inconsistent"),
            (torch.tensor([0, 0, 1, 2], dtype=torch.int32), good.counts, "exactly")):
        with pytest.raises(ValueError, match=match):
            tgc.triple_gate_conv2d(x, w, None, tgc.TileGates(good.gate, tiles, counts), out, 1, 1, 1, 4,
                                   backend="interpret")


_TILE_SCRIPT = textwrap.dedent("""
    import torch
    from sparsekit.ops import triple_gate_conv as tgc
    x = torch.randn(1, 4, 8, 8)
    w = torch.randn(6, 4, 3, 3)
    big = torch.zeros(3, 1, 6, 8, 8)                       # out is big[1]: guards on both sides
    out = big[1]
    gate = torch.ones(1, 2, 2, dtype=torch.int8)
    tiles = torch.tensor([-1000000, 5000000, 2, -7], dtype=torch.int32)
    counts = torch.tensor([4, 0, 64], dtype=torch.int32)
    tgc.triple_gate_conv2d(x, w, None, tgc.TileGates(gate, tiles, counts), out, 1, 1, 1, 4,
                           backend="interpret", validate=False)
    assert (big[0] == 0).all() and (big[2] == 0).all()     # nothing written outside out
    print("survived")
""")


def test_triple_gate_kernel_masks_out_of_range_tile_ids():
    r = subprocess.run([sys.executable, "-c", _TILE_SCRIPT], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "SPARSEKIT_NO_CUDA_EXT": "1"})
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stderr[-2000:])


# ====================================================================== clear errors

def test_zero_sized_dimensions():
    with pytest.raises(ValueError, match="0 features"):
        ops.per_token_quant(torch.randn(3, 0))
    with pytest.raises(ValueError, match="0 features"):
        ops.per_token_quant(torch.randn(3, 0), backend="interpret")
    # N = 0 weights: an empty output, like F.linear
    x = torch.randn(2, 64)
    for y in (ops.sparse24_linear(x, Sparse24Weight.from_dense(torch.zeros(0, 64)), backend="interpret"),
              ops.int8_linear(x, Int8Weight.from_float(torch.zeros(0, 64)), backend="interpret"),
              ops.sparse24_int8_linear(x, Sparse24Int8Weight.from_dense(torch.zeros(0, 64)), backend="interpret")):
        assert y.shape == (2, 0)
    # K = 0 weights: the bias, like F.linear
    b = torch.randn(4)
    y = ops.int8_linear(torch.randn(2, 0), Int8Weight.from_float(torch.zeros(4, 0)), b, backend="interpret")
    assert torch.equal(y, b.expand(2, 4))


def test_meta_device_tensors():
    m = torch.device("meta")
    y = SparseLinear(16, 4, device=m)(torch.randn(2, 16, device=m))
    assert y.shape == (2, 4) and y.device.type == "meta"
    w = BlockSparseWeight(torch.empty(1, 16, 16, device=m), torch.zeros(2, dtype=torch.int32, device=m),
                          torch.zeros(1, dtype=torch.int32, device=m), torch.zeros(2, dtype=torch.int32, device=m),
                          torch.zeros(1, dtype=torch.int32, device=m), torch.zeros(1, dtype=torch.int32, device=m),
                          (16, 16), 16)
    assert w.nnzb == 1
    sp = Sparse24Weight.from_dense(torch.empty(8, 32, device=m))
    assert sp.meta.device.type == "meta"
    with pytest.raises(ValueError, match="meta device"):
        BlockSparseWeight.from_dense(torch.empty(16, 16, device=m), 16)
    q = QLinear(64, 4, group_size=32, device=m)
    assert q(torch.randn(2, 64, device=m, dtype=torch.half)).shape == (2, 4)


def test_backward_through_sparse24_int8_is_straight_through():
    q8 = Sparse24Int8Weight.from_dense(random_2to4(8, 32))
    x = torch.randn(3, 32, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    y = ops.sparse24_int8_linear(x, q8, b)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ q8.to_dense(), atol=1e-5)
    assert torch.allclose(b.grad, g.sum(0))
    # the same rule as int8_linear
    w8 = Int8Weight(q8.int_dense(), q8.scale, (8, 32))
    x2 = x.detach().clone().requires_grad_()
    ops.int8_linear(x2, w8).backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_bogus_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_BACKEND", "bogus")
    sp = Sparse24Weight.from_dense(random_2to4(4, 16))
    with pytest.raises(ValueError, match=r"SPARSEKIT_BACKEND.*'bogus'"):
        ops.sparse24_linear(torch.randn(2, 16), sp)
    monkeypatch.setenv("SPARSEKIT_BACKEND", "Triton")
    with pytest.raises(ValueError, match=r"unknown backend 'Triton'"):
        ops.per_token_quant(torch.randn(2, 16))
