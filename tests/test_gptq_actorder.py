"""GPTQ as the original: dead inputs, act-order with dynamic groups (g_idx), and how the input permutation is
carried by Int4Weight / QLinear / checkpoints."""
import json

import pytest
import torch
from torch import nn

import sparsekit
from sparsekit import quantize_
from sparsekit.formats.int4 import Int4Weight
from sparsekit.nn import QLinear
from sparsekit.ops.act_quant import per_token_quant_reference
from sparsekit.quant import QuantResult, gptq_quantize
from sparsekit.schemes import Int4Params, W4A8Params, registry
from sparsekit.testing import assert_close_rel


# ----------------------------------------------------------------------------- the original, in float64
def _find_params(x):
    """Asymmetric 4-bit grid of the rows of ``x`` (range always contains 0)."""
    lo = x.min(dim=1).values.clamp(max=0)
    hi = x.max(dim=1).values.clamp(min=0)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale)
    return scale, zero


def original_gptq(W, H, groupsize, blocksize, actorder=False, static_groups=False, percdamp=0.01,
                  zero_dead=True):
    """The published GPTQ loop (reference implementation ``GPTQ.fasterquant``) in float64.

    ``zero_dead=False`` is the behaviour before dead inputs were zeroed (their weights kept and rounded with
    their group's parameters).  Returns ``(dequantized weight, codes, perm)`` in the original column order."""
    W = W.double().clone()
    H = H.double().clone()
    k = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    if zero_dead:
        W[:, dead] = 0
    if static_groups:
        groups = [_find_params(W[:, i:i + groupsize]) for i in range(0, k, groupsize)]
    perm = None
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    H = H + damp * torch.eye(k, dtype=torch.float64)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    scale = zero = None
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if not static_groups:
                if (i1 + i) % groupsize == 0:
                    scale, zero = _find_params(W[:, i1 + i:i1 + i + groupsize])
            else:
                idx = i1 + i
                if actorder:
                    idx = int(perm[idx])
                scale, zero = groups[idx // groupsize]
            qc = torch.clamp(torch.round(w / scale) + zero, 0, 15)
            q = scale * (qc - zero)
            codes[:, i1 + i] = qc
            Q[:, i1 + i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q, codes = Q[:, invperm], codes[:, invperm]
    return Q, codes, perm


def _inputs(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    scale = torch.rand(k, generator=g) * 3 + 0.2            # uneven activity: act-order matters
    return (torch.randn(n, k, generator=g) @ a) * scale


def _hessian(X):
    X = X.double()
    return 2 * X.T @ X / X.shape[0]


def _out_err(X, W, W_hat):
    X = X.double()
    ref = X @ W.double().T
    return float((ref - X @ W_hat.double().T).norm() / ref.norm())


# ----------------------------------------------------------------------------- dead inputs
def test_dead_inputs_zeroed_before_group_parameters():
    N, K, gs = 64, 256, 32
    g = torch.Generator().manual_seed(1)
    W = torch.randn(N, K, generator=g)
    X = _inputs(1024, K, 2)
    dead = [3, 70, 71]
    X[:, dead] = 0
    W[:, dead] = 40.0                       # large weights on inputs that never fire
    H = _hessian(X)
    for act_order in (False, True):
        res = gptq_quantize(W, H, gs, act_order=act_order, block_size=gs)
        deq = res.dequantize()
        assert bool((deq[:, dead] == 0).all())
        ref, _, _ = original_gptq(W, H, gs, gs, actorder=act_order)
        old, _, _ = original_gptq(W, H, gs, gs, actorder=act_order, zero_dead=False)
        e, e_ref, e_old = _out_err(X, W, deq), _out_err(X, W, ref), _out_err(X, W, old)
        print(f"\nact_order={act_order}: output error {e:.5f}, original {e_ref:.5f}, dead weights kept {e_old:.5f}")
        assert e <= e_ref * (1 + 1e-4)
        assert e < (0.5 if not act_order else 0.8) * e_old
        # the groups holding a dead input are no longer widened by it
        gi = res.g_idx
        for c in dead:
            assert bool((res.scales[:, gi[c]] < 1.0).all())


# ----------------------------------------------------------------------------- dynamic act-order
@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_matches_original(static_groups):
    N, K, gs = 64, 256, 32
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(3)).double()
    X = _inputs(1024, K, 4)
    H = _hessian(X)
    ref, ref_codes, ref_perm = original_gptq(W, H, gs, gs, actorder=True, static_groups=static_groups)
    # the original reads a group at its block's start: the same as sparsekit when block_size divides group_size
    for bs in (gs, 16):
        res = gptq_quantize(W, H, gs, act_order=True, static_groups=static_groups, block_size=bs)
        mism = (res.q.double() != ref_codes).double().mean().item()
        assert mism < 0.005, (bs, mism)
        e, e_ref = _out_err(X, W, res.dequantize()), _out_err(X, W, ref)
        assert abs(e - e_ref) <= 1e-6 * e_ref, (bs, e, e_ref)
    # sparsekit's groups read the current weights, so the block size is speed only
    res128 = gptq_quantize(W, H, gs, act_order=True, static_groups=static_groups, block_size=128)
    assert (res128.q != res.q).double().mean().item() < 0.005
    if static_groups:
        assert res.perm is None                       # consecutive original groups: nothing to carry
        return
    assert torch.equal(res.perm, ref_perm) and res.perm.dtype == torch.int64
    d = torch.diagonal(H)[res.perm]
    assert bool((d[1:] <= d[:-1]).all())                          # descending diag(H)
    gi = res.g_idx
    assert gi.shape == (K,) and torch.equal(torch.bincount(gi, minlength=K // gs), torch.full((K // gs,), gs))
    rank = torch.argsort(res.perm)
    assert torch.equal(gi, rank // gs)
    # float32 weights: the same up to rounding
    r32 = gptq_quantize(W.float(), H, gs, act_order=True)
    assert abs(_out_err(X, W, r32.dequantize()) - _out_err(X, W, ref)) < 1e-3 * _out_err(X, W, ref)


def test_act_order_beats_plain_gptq_on_uneven_inputs():
    N, K, gs = 64, 256, 32
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(5))
    X = _inputs(1024, K, 6)
    H = _hessian(X)
    e = {name: _out_err(X, W, gptq_quantize(W, H, gs, **kw).dequantize())
         for name, kw in (("plain", {}), ("static", dict(act_order=True, static_groups=True)),
                          ("dynamic", dict(act_order=True)))}
    print("\noutput error:", {k: f"{v:.4f}" for k, v in e.items()})
    assert e["dynamic"] < e["plain"]


def test_quant_result_packs_with_perm():
    N, K, gs = 24, 128, 32
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(7))
    X = _inputs(512, K, 8)
    res = gptq_quantize(W, _hessian(X), gs, act_order=True)
    assert res.perm is not None
    for dtype in (torch.float16, torch.bfloat16):
        w = Int4Weight.from_quantized(res.q, res.scales, res.zeros, gs, False, dtype=dtype, perm=res.perm)
        assert torch.equal(w.perm, res.perm) and torch.equal(w.g_idx, res.g_idx)
        assert torch.equal(w.unpack(), res.q)
        gi = res.g_idx
        ref = (res.q.to(dtype) - res.zeros.to(dtype)[:, gi]) * res.scales.to(dtype)[:, gi]
        assert torch.equal(w.dequantize(), ref)
        # the packed layout: groups contiguous in the order perm
        assert torch.equal(Int4Weight(w.qweight, w.scales, w.zeros, (N, K), gs).unpack(), res.q[:, res.perm])
        # the same weight from the per-column group index (how g_idx checkpoints describe it)
        # (members of a group may sit in another order: perm = stable argsort(g_idx))
        w2 = Int4Weight.from_g_idx(res.q, res.scales, res.zeros, res.g_idx, gs, dtype=dtype)
        assert torch.equal(w2.perm, torch.argsort(res.g_idx, stable=True))
        assert torch.equal(w2.g_idx, w.g_idx) and torch.equal(w2.dequantize(), w.dequantize())
    # one group per row: the order does not matter, no permutation
    assert gptq_quantize(W, _hessian(X), -1, act_order=True).perm is None


def test_from_g_idx_trivial_and_shuffled():
    N, K, gs = 8, 64, 32
    g = torch.Generator().manual_seed(9)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    s = torch.rand(N, K // gs, generator=g) + 0.1
    z = torch.randint(0, 16, (N, K // gs), generator=g).float()
    w = Int4Weight.from_g_idx(q, s, z, torch.arange(K) // gs, gs)
    assert w.perm is None and torch.equal(w.unpack(), q)
    gi = torch.randperm(K, generator=g) % (K // gs)
    w = Int4Weight.from_g_idx(q, s, z, gi, gs)
    assert torch.equal(w.perm, torch.argsort(gi, stable=True)) and torch.equal(w.g_idx, gi)
    ref = (q.half() - z.half()[:, gi]) * s.half()[:, gi]
    assert torch.equal(w.dequantize(), ref)
    assert torch.equal(w.to("cpu").perm, w.perm) and "act_order_perm=True" in repr(w)
    assert w.nbytes() == Int4Weight.from_quantized(q, s, z, gs, False).nbytes() + 8 * K


def test_bad_perm_and_g_idx_errors():
    N, K, gs = 8, 64, 32
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    s, z = torch.rand(N, 2) + 0.1, torch.full((N, 2), 8.0)
    w = Int4Weight.from_quantized(q, s, z, gs, False)
    args = (w.qweight, w.scales, w.zeros, (N, K), gs)
    dup = torch.arange(K)
    dup[5] = 6
    with pytest.raises(ValueError, match="permutation of range\\(64\\); index 5 appears 0"):
        Int4Weight(*args, perm=dup)
    with pytest.raises(ValueError, match="holds the index 64"):
        Int4Weight(*args, perm=torch.arange(1, K + 1))
    with pytest.raises(ValueError, match="shape \\(64,\\)"):
        Int4Weight(*args, perm=torch.arange(K - 1))
    with pytest.raises(TypeError, match="integer indices"):
        Int4Weight(*args, perm=torch.arange(K).float())
    with pytest.raises(ValueError, match="permutation"):
        Int4Weight.from_quantized(q, s, z, gs, False, perm=dup)
    with pytest.raises(ValueError, match="exactly group_size=32 members; group 0 has 33"):
        Int4Weight.from_g_idx(q, s, z, torch.cat([torch.zeros(33), torch.ones(31)]).long(), gs)
    with pytest.raises(ValueError, match="group index 2"):
        Int4Weight.from_g_idx(q, s, z, torch.arange(K) // gs * 2, gs)
    with pytest.raises(ValueError, match="shape \\(64,\\)"):
        Int4Weight.from_g_idx(q, s, z, torch.arange(K - 8) // gs, gs)
    with pytest.raises(TypeError, match="integer group indices"):
        Int4Weight.from_g_idx(q, s, z, (torch.arange(K) // gs).float(), gs)
    # a QLinear refuses a state_dict with a bad in_perm, and a wrong input width
    lin = QLinear.from_weight(Int4Weight.from_g_idx(q, s, z, torch.arange(K) % 2, gs))
    assert lin.in_perm is not None
    sd = lin.state_dict()
    sd["in_perm"] = dup
    with pytest.raises(ValueError, match="in_perm must be a permutation"):
        lin.load_state_dict(sd)
    with pytest.raises(ValueError, match="in_features=64"):
        lin(torch.randn(2, 2 * K).half())


# ----------------------------------------------------------------------------- QLinear with in_perm
def _act_order_qlinear(dtype, act_bits, backend, bias=True):
    N, K, gs = 19, 128, 32
    torch.manual_seed(11)
    lin = nn.Linear(K, N, bias=bias).to(dtype)
    X = _inputs(512, K, 12)
    q = QLinear.from_float(lin, group_size=gs, method="gptq", calib_inputs=X.to(dtype), act_order=True,
                           act_bits=act_bits, backend=backend)
    return lin, q


def _fake_quant_ref(x, w_fp32, b, bits):
    q, s = per_token_quant_reference(x, bits)
    y = (q.double() * s.double()) @ w_fp32.double().T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("backend", ["reference", "dense", "interpret", None])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act_bits", [None, 8])
def test_qlinear_in_perm_matches_dequantized_weight(backend, dtype, act_bits):
    if backend == "dense" and act_bits is not None:
        backend = None                              # W4A8 has no dense backend: its CPU default
    lin, q = _act_order_qlinear(dtype, act_bits, backend)
    assert q.in_perm is not None and q.in_perm.dtype == torch.int64
    assert not torch.equal(q.in_perm, torch.arange(128))
    wf = q.weight_format()
    gi = wf.g_idx
    codes = wf.unpack()
    w_orig = (codes.to(dtype) - q.zeros[:, gi]) * q.scales[:, gi]       # original column order
    assert torch.equal(q.weight, w_orig) and torch.equal(q.to_dense().weight, w_orig)
    x = torch.randn(2, 5, 128).to(dtype)[..., ::1]
    xs = [x, torch.randn(5, 256).to(dtype)[:, ::2]]                       # also a non-contiguous input
    for xi in xs:
        y = q(xi)
        assert y.dtype == dtype and y.shape == (*xi.shape[:-1], 19)
        if act_bits is None:
            assert_close_rel(y, (xi.double() @ w_orig.double().T) + lin.bias.double())
        else:
            w32 = (codes.float() - q.zeros.float()[:, gi]) * q.scales.float()[:, gi]
            assert_close_rel(y, _fake_quant_ref(xi, w32, lin.bias, 8))
    # float32 in, float32 out (the CPU fast path for W4A16 with the automatic backend)
    x32 = torch.randn(3, 128)
    y32 = q(x32)
    assert y32.dtype == torch.float32
    if act_bits is None:
        assert_close_rel(y32, x32.double() @ w_orig.double().T + lin.bias.double(), bound=2e-2)
    assert "act_order_in_perm=True" in repr(q)


def test_ops_take_int4_weight_with_perm():
    from sparsekit.ops.int4 import int4_linear
    from sparsekit.ops.int8 import w4a8_linear

    lin, q = _act_order_qlinear(torch.float16, None, "reference")
    wf = q.weight_format()
    x = torch.randn(4, 128).half()
    assert_close_rel(int4_linear(x, wf, backend="reference"), x.double() @ wf.dequantize().double().T)
    w32 = wf.dequantize().float()
    assert_close_rel(w4a8_linear(x, wf, backend="reference"), _fake_quant_ref(x, w32, None, 8))


def test_state_dict_round_trip_with_in_perm():
    lin, q = _act_order_qlinear(torch.bfloat16, None, "reference")
    fresh = QLinear(128, 19, group_size=32, dtype=torch.bfloat16, backend="reference")
    assert fresh.in_perm is None
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.in_perm, q.in_perm)
    x = torch.randn(6, 128).bfloat16()
    assert torch.equal(fresh(x), q(x))


# ----------------------------------------------------------------------------- configs, quantize_, checkpoints
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64)).half()


def _calib(n=8):
    g = torch.Generator().manual_seed(13)
    scale = torch.rand(128, generator=g) * 3 + 0.2
    return [(torch.randn(128, 128, generator=g) * scale).half() for _ in range(n)]


def test_config_fields_and_versions():
    cfg = Int4Params(method="gptq", act_order=True, static_groups=False)
    d = cfg.to_dict()
    assert d["version"] == 2 and d["params"]["act_order"] is True and d["params"]["static_groups"] is False
    assert Int4Params.from_dict(json.loads(json.dumps(d))) == cfg
    # version 1 spelled act-order (static groups) as a method option; it still parses with that meaning
    old = Int4Params.from_dict({"scheme": "int4", "version": 1,
                                "params": {"method": "gptq", "method_options": {"act_order": True, "damp": 0.02}}})
    assert old.act_order and old.static_groups and old.method_options == {"damp": 0.02}
    assert not Int4Params.from_dict({"scheme": "int4", "version": 1, "params": {"method": "gptq"}}).act_order
    w = W4A8Params(method="gptq", act_order=True)
    assert w.act_order and not w.static_groups
    with pytest.raises(ValueError, match="method='gptq'"):
        Int4Params(method="rtn", act_order=True)
    with pytest.raises(TypeError, match="act_order must be a bool"):
        Int4Params(method="gptq", act_order=1)
    with pytest.raises(ValueError, match="not also as"):
        Int4Params(method="gptq", act_order=True, method_options={"act_order": True})


@pytest.mark.parametrize("scheme_cls", [Int4Params, W4A8Params])
def test_quantize_and_pretrained_round_trip(tmp_path, scheme_cls):
    model = _mlp()
    x = _calib(9)[8][:32]                                # held-out rows of the calibration distribution
    with torch.no_grad():
        dense = model(x).double()
        rtn = quantize_(_mlp(), scheme_cls(group_size=32), progress=False)(x).double()
    quantize_(model, scheme_cls(method="gptq", group_size=32, act_order=True, static_groups=False),
              calib=_calib(), progress=False)
    assert all(isinstance(model[i], QLinear) and model[i].in_perm is not None for i in (0, 2))
    with torch.no_grad():
        y = model(x)
    rel, rel_rtn = (((t - dense).norm() / dense.norm()).item() for t in (y.double(), rtn))
    print(f"\n{scheme_cls.SCHEME}: output error GPTQ act-order {rel:.4f}, RTN {rel_rtn:.4f}")
    assert rel < rel_rtn
    desc = registry.get(scheme_cls.SCHEME).describe(model[0])
    assert desc["format_version"] == 2 and desc["params"]["in_perm"] is True
    sparsekit.save_pretrained(model, tmp_path / "ckpt")
    for skeleton in (_mlp(seed=1), _mlp(seed=2).to("meta")):
        loaded = sparsekit.load_pretrained(tmp_path / "ckpt", skeleton)
        assert torch.equal(loaded[0].in_perm, model[0].in_perm)
        with torch.no_grad():
            assert torch.equal(loaded(x), y)
    # static groups: no permutation to carry
    model = _mlp()
    quantize_(model, Int4Params(method="gptq", group_size=32, act_order=True, static_groups=True),
              calib=_calib(), progress=False)
    assert model[0].in_perm is None
    assert registry.get("int4").describe(model[0])["params"]["in_perm"] is False


def test_result_perm_none_without_act_order():
    W = torch.randn(16, 64)
    res = gptq_quantize(W, _hessian(_inputs(256, 64, 14)), 32)
    assert res.perm is None and torch.equal(res.g_idx, torch.arange(64) // 32)
    assert isinstance(res, QuantResult)
