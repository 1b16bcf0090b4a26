"""Triple-gate sparse conv (SpVOS): Triton kernels (interpreter on CPU, compiled on GPU)
and the reference vs dense ``conv2d`` math; the TripleGateConv2d module's frame state,
gating and gate training."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit.kernels as skk
from sparsekit.nn.triple_gate_conv import TripleGateConv2d, compute_loss, compute_ratios
from sparsekit.ops import triple_gate_conv as tgc
from sparsekit.ops.triple_gate_conv import (REUSE, SKIP, UPDATE, compact_gates, dense_gates, triple_gate_conv2d,
                                            triple_gate_map)
from sparsekit.testing import assert_all_written, assert_close_rel, assert_within_torch_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _geom(h, w, k, s, p, d, tile):
    ho, wo = tgc.conv_output_size(h, w, k, s, p, d)
    th, tw = tgc.tile_grid(ho, wo, tile)
    return ho, wo, th, tw


def _case(n, c, co, h, w, k, dtype, bias=True, cl=True):
    x = torch.randn(n, c, h, w).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(co, c, k, k) * (c * k * k) ** -0.5).to(dtype)
    b = (torch.randn(co) * 0.5).to(dtype) if bias else None
    return x, wt, b


def _ref64(x, wt, b, s, p, d):
    return F.conv2d(x.double(), wt.double(), None if b is None else b.double(), s, p, d)


def _composed(prev, ref, b, gate, tile):
    """The three-way composition the ops must produce (float64)."""
    ho, wo = ref.shape[2:]
    pg = tgc.pixel_gate(gate, tile, ho, wo)
    bias = (b.double() if b is not None else torch.zeros(ref.shape[1], dtype=torch.float64))
    bias = bias[None, :, None, None].expand_as(ref)
    return torch.where(pg == UPDATE, ref, torch.where(pg == SKIP, bias, prev.double()))


# ------------------------------------------------------------------ all-UPDATE equals conv2d

# (dtype, N, C, CO, H, W, k, stride, padding, dilation, tile)
DENSE_CASES = [
    (torch.float32, 1, 16, 17, 13, 11, 3, 1, 1, 1, 8),
    (torch.float16, 2, 16, 24, 15, 13, 3, 2, 1, 1, 4),
    (torch.bfloat16, 2, 20, 16, 11, 13, 3, 1, 2, 2, 4),
    (torch.float32, 2, 24, 16, 11, 9, 5, 2, 2, 1, 4),
    (torch.float16, 1, 16, 33, 9, 11, 1, 1, 0, 1, 8),
    (torch.bfloat16, 1, 17, 16, 12, 10, 5, 1, 1, 1, 2),
    (torch.float32, 2, 16, 16, 13, 11, 3, 2, 3, 2, 1),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c))
def test_all_update_equals_conv2d(case):
    dtype, n, c, co, h, w, k, s, p, d, tile = case
    x, wt, b = _case(n, c, co, h, w, k, dtype, bias=(co % 2 == 1 or dtype != torch.float16))
    ho, wo, th, tw = _geom(h, w, k, s, p, d, tile)
    out = torch.full((n, co, ho, wo), float("nan"), dtype=dtype).contiguous(memory_format=torch.channels_last)
    gates = dense_gates(n, ho, wo, tile)
    assert gates.counts.tolist() == [th * tw * n, 0, n * ho * wo]
    triple_gate_conv2d(x, wt, b, gates, out, s, p, d, tile, backend="interpret")
    assert_all_written(out)
    ref = _ref64(x, wt, b, s, p, d)
    assert_close_rel(out, ref)
    torch_out = F.conv2d(x.float(), wt.float(), None if b is None else b.float(), s, p, d).to(dtype)
    assert_within_torch_error(out, ref, torch_out)


_KMOD_CONFIGS = skk.load("triple_gate_conv", interpret=True).CONV_CONFIGS


@pytest.mark.parametrize("tile,c,co,cfg", [(8, 64, 64, None), (4, 40, 160, None), (1, 16, 24, None)]
                         + [(8 if i % 2 else 4, 24, 40, i) for i in range(len(_KMOD_CONFIGS))])
def test_gpu_tile_configs_are_valid(tile, c, co, cfg):
    # the heuristic GPU configuration (fp16, fp32 with TF32, full fp32) and every autotuner candidate
    # (fp16 / bf16 only) through the interpreter
    kmod = skk.load("triple_gate_conv", interpret=True)
    cases = ([(torch.float16, kmod.CONV_CONFIGS[cfg])] if cfg is not None else
             [(torch.float16, kmod.conv_config(tile, c, co)),
              (torch.float32, kmod.conv_config(tile, c, co, torch.float32, False)),
              (torch.float32, kmod.conv_config(tile, c, co, torch.float32, True))])
    for dtype, conf in cases:
        conf = dict(conf)
        kmod.check_config(conf)
        x, wt, b = _case(1, c, co, 9, 11, 3, dtype)
        ho, wo, th, tw = _geom(9, 11, 3, 1, 1, 1, tile)
        g = dense_gates(1, ho, wo, tile)
        out = torch.full((1, co, ho, wo), float("nan"), dtype=dtype)
        kmod.conv(x, wt, b, g.tiles, g.counts, out, (1, 1), (1, 1), (1, 1), tile, config=conf)
        assert_close_rel(out, _ref64(x, wt, b, 1, 1, 1), what=f"{dtype} {conf}")


def test_fp32_precision_follows_cudnn_allow_tf32():
    # fp32 products: TF32 when cuDNN may use it (F.conv2d's switch), full fp32 otherwise; the autotuner
    # serves fp16 / bf16 only, fp32 takes the heuristic configuration (full fp32: a 64-row FMA tile)
    kmod = skk.load("triple_gate_conv", interpret=True)
    old = torch.backends.cudnn.allow_tf32
    try:
        for flag in (False, True):
            torch.backends.cudnn.allow_tf32 = flag
            assert kmod._is_ieee(torch.float32) is (not flag)
            assert not kmod._is_ieee(torch.float16) and not kmod._is_ieee(torch.bfloat16)
    finally:
        torch.backends.cudnn.allow_tf32 = old
    assert torch.float32 not in kmod.AUTOTUNE_DTYPES
    for c, co in ((3, 64), (64, 64), (256, 256)):
        ieee = kmod.conv_config(8, c, co, torch.float32, True)
        assert ieee["BLOCK_M"] == 64 and ieee["BLOCK_N"] <= 64 and ieee["BLOCK_K"] <= 32 and ieee["num_warps"] == 4
        assert kmod.conv_config(8, c, co, torch.float32, False)["BLOCK_K"] <= 32


def test_nchw_input_and_output_and_weight_layout():
    # any strides: NCHW-contiguous x / out, a channels_last weight
    x, wt, b = _case(1, 16, 16, 9, 10, 3, torch.float32, cl=False)
    wt_cl = wt.contiguous(memory_format=torch.channels_last)
    ho, wo, th, tw = _geom(9, 10, 3, 1, 1, 1, 4)
    out = torch.full((1, 16, ho, wo), float("nan"))
    triple_gate_conv2d(x, wt_cl, b, dense_gates(1, ho, wo, 4), out, 1, 1, 1, 4, backend="interpret")
    assert_close_rel(out, _ref64(x, wt, b, 1, 1, 1))


# ------------------------------------------------------------------ REUSE / SKIP / mixed

@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_all_reuse_leaves_output_bit_exact(backend):
    x, wt, b = _case(2, 16, 16, 11, 9, 3, torch.float16)
    ho, wo, th, tw = _geom(11, 9, 3, 1, 1, 1, 4)
    prev = torch.randn(2, 16, ho, wo).half().contiguous(memory_format=torch.channels_last)
    out = prev.clone()
    gate = torch.full((2, th, tw), REUSE, dtype=torch.int8)
    triple_gate_conv2d(x, wt, b, gate, out, 1, 1, 1, 4, backend=backend)
    assert torch.equal(out, prev)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_all_skip_equals_bias(backend, bias):
    x, wt, b = _case(2, 16, 17, 10, 11, 3, torch.bfloat16, bias=bias)
    ho, wo, th, tw = _geom(10, 11, 3, 2, 1, 1, 2)
    out = torch.full((2, 17, ho, wo), float("nan"), dtype=torch.bfloat16)
    gate = torch.full((2, th, tw), SKIP, dtype=torch.int8)
    triple_gate_conv2d(x, wt, b, gate, out, 2, 1, 1, 2, backend=backend)
    want = (b if bias else torch.zeros(17, dtype=torch.bfloat16))[None, :, None, None].expand_as(out)
    assert torch.equal(out, want)


@pytest.mark.parametrize("dtype,tile,k,s,d", [(torch.float32, 4, 3, 1, 1), (torch.float16, 3, 3, 2, 1),
                                              (torch.bfloat16, 1, 3, 1, 2), (torch.float16, 8, 5, 1, 1)])
def test_mixed_gate_equals_composed_reference(dtype, tile, k, s, d):
    n, c, co, h, w = 2, 16, 18, 13, 11
    p = d * (k - 1) // 2
    x, wt, b = _case(n, c, co, h, w, k, dtype)
    ho, wo, th, tw = _geom(h, w, k, s, p, d, tile)
    gate = torch.randint(0, 3, (n, th, tw), dtype=torch.int8)
    gate.view(-1)[:3] = torch.tensor([UPDATE, REUSE, SKIP], dtype=torch.int8)   # every code present
    prev = torch.randn(n, co, ho, wo).to(dtype).contiguous(memory_format=torch.channels_last)
    ref = _composed(prev, _ref64(x, wt, b, s, p, d), b, gate, tile)
    for backend in ("interpret", "reference"):
        out = prev.clone()
        triple_gate_conv2d(x, wt, b, gate, out, s, p, d, tile, backend=backend)
        assert_close_rel(out, ref, what=backend)
        keep = (tgc.pixel_gate(gate, tile, ho, wo) == REUSE).expand_as(out)
        assert torch.equal(out[keep], prev[keep]), backend


def test_tile_list_and_compaction():
    gate = torch.randint(0, 3, (2, 3, 5), dtype=torch.int8)
    ho, wo, tile = 11, 18, 4
    for backend in ("interpret", "reference"):
        g, tiles, counts = compact_gates(gate, (ho, wo), tile, backend=backend)
        flat = gate.reshape(-1)
        nu, ns, npix = counts.tolist()
        assert nu == int((flat == UPDATE).sum()) and ns == int((flat == SKIP).sum())
        assert npix == int((tgc.pixel_gate(gate, tile, ho, wo) == UPDATE).sum())
        assert npix / (2 * ho * wo) == pytest.approx(float(tgc.update_ratio(gate, tile, ho, wo)))
        assert sorted(tiles[:nu].tolist()) == (flat == UPDATE).nonzero().reshape(-1).tolist()
        assert sorted(tiles[tiles.numel() - ns:].tolist()) == (flat == SKIP).nonzero().reshape(-1).tolist()


# ------------------------------------------------------------------ the gate op

def _gate_case(n=2, c=16, h=13, w=11):
    x = torch.randn(n, c, h, w)
    xp = x.clone()
    xp[0, :, 3, 4] += 0.5            # local changes, well above / below the threshold
    xp[1, 2, 10, 1] -= 0.05
    xp[1, :, 0, 9] += 2.0
    return x, xp


@pytest.mark.parametrize("k,s,p,d,tile", [(3, 1, 1, 1, 4), (3, 2, 1, 1, 2), (3, 1, 2, 2, 4), (5, 1, 2, 1, 8),
                                          (1, 1, 0, 1, 1)])
def test_gate_map_interpret_equals_reference(k, s, p, d, tile):
    x, xp = _gate_case()
    wi = torch.randn(16)
    ho, wo, th, tw = _geom(13, 11, k, s, p, d, tile)
    prev_gate = torch.randint(0, 3, (2, th, tw), dtype=torch.int8)
    kw = dict(importance_weight=wi, importance_bias=0.2, skip_logit=-0.4, prev_gate=prev_gate)
    gates = {}
    for thr, extra in ((0.1, kw), (0.0, {})):
        res = gates[thr] = {b: triple_gate_map(x, xp, k, s, p, d, tile, thr, backend=b, **extra)
               for b in ("interpret", "reference")}
        gi, gr = res["interpret"], res["reference"]
        assert torch.equal(gi.gate, gr.gate)
        assert torch.equal(gi.counts, gr.counts)
        nu, ns, _ = gr.counts.tolist()
        t = gr.tiles.numel()
        assert sorted(gi.tiles[:nu].tolist()) == sorted(gr.tiles[:nu].tolist())
        assert sorted(gi.tiles[t - ns:].tolist()) == sorted(gr.tiles[t - ns:].tolist())
    # the rule: prev SKIP -> UPDATE unless SKIP again; SKIP only where importance is low
    change, imp = tgc.gate_features(x, xp, (k, k), (s, s), (p, p), (d, d), tile, wi, 0.2)
    g = gates[0.1]["reference"].gate
    assert bool((g[imp < -0.4] == SKIP).all()) and bool((g[imp >= -0.4] != SKIP).all())


def test_gate_marks_exactly_the_affected_tiles():
    # threshold 0: UPDATE iff some output pixel of the tile sees a changed input pixel
    k, s, p, d, tile = 3, 1, 2, 2, 4
    x, xp = _gate_case()
    ho, wo, th, tw = _geom(13, 11, k, s, p, d, tile)
    changed = (x != xp).any(dim=1, keepdim=True).double()
    hit = F.conv2d(changed, torch.ones(1, 1, k, k, dtype=torch.float64), None, s, p, d) > 0
    hit = F.pad(hit.double(), (0, tw * tile - wo, 0, th * tile - ho))
    want = (F.max_pool2d(hit, tile, tile)[:, 0] > 0)
    for backend in ("interpret", "reference"):
        g = triple_gate_map(x, xp, k, s, p, d, tile, 0.0, backend=backend).gate
        assert torch.equal(g == UPDATE, want), backend
        assert int((g == SKIP).sum()) == 0


# ------------------------------------------------------------------ the module

def _module(c=16, co=16, k=3, s=1, p=1, d=1, tile=4, dtype=torch.float32, backend="interpret", **kw):
    conv = nn.Conv2d(c, co, k, s, p, d).to(dtype)
    return conv, TripleGateConv2d.from_conv(conv, tile=tile, backend=backend, **kw).eval()


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_static_video_costs_nothing_and_local_change_recomputes_affected_tiles(backend):
    conv, m = _module(backend=backend)
    x = torch.randn(2, 16, 11, 13)
    y0 = m(x)
    assert m.compute_ratio == 1.0 and bool((m.last_gate == UPDATE).all())
    assert_close_rel(y0, _ref64(x, conv.weight, conv.bias, 1, 1, 1))
    y1 = m(x.clone())
    assert m.compute_ratio == 0.0 and bool((m.last_gate == REUSE).all())
    assert torch.equal(y1, y0)                          # REUSE is bit-exact
    x2 = x.clone()
    x2[1, :, 5, 6] += 1.0                               # one pixel of sample 1
    y2 = m(x2)
    g = m.last_gate
    assert bool((g[0] == REUSE).all())                  # each sample has its own gates
    # outputs (4..6, 5..7) see pixel (5, 6): tiles rows 1, cols 1..1 (tile 4: cols 4..7)
    want = torch.zeros_like(g)
    want[1, 1, 1] = UPDATE
    assert torch.equal(g, want)
    assert m.compute_ratio == pytest.approx(16 / (2 * 11 * 13))
    assert_close_rel(y2, _ref64(x2, conv.weight, conv.bias, 1, 1, 1))   # threshold 0 is lossless
    assert torch.equal(y2[0], y0[0])
    assert m.mean_compute_ratio == pytest.approx((1.0 + 0.0 + 16 / 286) / 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_module_video_matches_dense_conv(dtype):
    # a short video with moving content: every frame equals the dense conv
    conv, m = _module(c=16, co=17, k=3, s=2, p=1, tile=2, dtype=dtype)
    base = torch.randn(1, 16, 12, 13)
    for t in range(3):
        x = base.clone()
        x[..., 2 + 3 * t: 5 + 3 * t, 3:6] += 1.0
        x = x.to(dtype)
        y = m(x)
        ref = _ref64(x, conv.weight, conv.bias, 2, 1, 1)
        assert_close_rel(y, ref, what=f"frame {t}")
        assert y.shape == ref.shape and y.dtype == dtype
    assert 0.0 < m.compute_ratio < 1.0


def test_train_mode_without_gate_training_is_a_differentiable_dense_conv():
    conv, m = _module(backend="reference")
    m.train()
    x = torch.randn(1, 16, 9, 8)
    y = m(x)
    assert torch.allclose(y, conv(x)) and m.compute_ratio == 1.0
    y.sum().backward()
    assert m.weight.grad is not None
    m.eval()                                            # then inference continues from that frame
    y2 = m(x)
    assert m.compute_ratio == 0.0 and torch.equal(y2, y.detach())


def test_clone_output_false_returns_the_persistent_buffer():
    _, m = _module(backend="reference", clone_output=False)
    x = torch.randn(1, 16, 9, 9)
    y0 = m(x)
    y1 = m(x)
    assert y1.data_ptr() == y0.data_ptr()


def test_skip_and_leaving_skip():
    conv, m = _module(backend="interpret", tile=4)
    m.enable_skip(0.5)
    with torch.no_grad():                               # importance = channel 0 of the input
        m.importance.weight.zero_()
        m.importance.weight[0, 0] = 1.0
        m.importance.bias.zero_()
    x = torch.randn(1, 16, 12, 12)
    x[:, 0] = 5.0
    x[:, 0, :4, :4] = -5.0                             # tile (0, 0) is unimportant
    m(x)                                                 # dense first frame
    y = m(x)
    g = m.last_gate
    assert g[0, 0, 0] == SKIP and int((g == SKIP).sum()) == 1
    assert torch.equal(y[0, :, :4, :4], conv.bias.detach()[:, None, None].expand(16, 4, 4))
    x2 = x.clone()
    x2[:, 0, :4, :4] = 5.0                               # important again: recomputed
    y2 = m(x2)
    assert m.last_gate[0, 0, 0] == UPDATE
    assert_close_rel(y2, _ref64(x2, conv.weight, conv.bias, 1, 1, 1))
    assert m(x2) is not None and m.last_gate[0, 0, 0] == REUSE


def test_bad_inputs_raise():
    _, m = _module(backend="reference")
    with pytest.raises(ValueError, match="channel mismatch"):
        m(torch.randn(1, 8, 9, 9))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(1, 16, 9, 9).half())
    with pytest.raises(ValueError, match="N, C, H, W"):
        m(torch.randn(16, 9, 9))
    m(torch.randn(1, 16, 9, 9))
    with pytest.raises(ValueError, match="without reset"):
        m(torch.randn(1, 16, 9, 10))
    with pytest.raises(ValueError, match="without reset"):
        m(torch.randn(2, 16, 9, 9))
    m.reset()
    m(torch.randn(2, 16, 9, 10))                         # fine after reset
    assert m.compute_ratio == 1.0
    with pytest.raises(ValueError, match="too small"):
        TripleGateConv2d(4, 4, 5).eval()(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match="groups"):
        TripleGateConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        TripleGateConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        TripleGateConv2d.from_conv(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="tile"):
        TripleGateConv2d(4, 4, 3, tile=0)
    with pytest.raises(ValueError, match="skip_threshold"):
        TripleGateConv2d(4, 4, 3, skip_threshold=1.5)


def test_op_bad_inputs_raise():
    x, wt, b = _case(1, 16, 16, 9, 9, 3, torch.float32)
    out = torch.zeros(1, 16, 9, 9)
    g = dense_gates(1, 9, 9, 4)
    with pytest.raises(ValueError, match="channel mismatch"):
        triple_gate_conv2d(x[:, :8], wt, b, g, out, 1, 1, 1, 4)
    with pytest.raises(ValueError, match="out must have shape"):
        triple_gate_conv2d(x, wt, b, g, out[..., :8], 1, 1, 1, 4)
    with pytest.raises(ValueError, match="gate must be"):
        triple_gate_conv2d(x, wt, b, torch.zeros(1, 2, 3, dtype=torch.int8), out, 1, 1, 1, 4)
    with pytest.raises(ValueError, match="gate must be"):
        triple_gate_conv2d(x, wt, b, dense_gates(1, 8, 8, 4), out, 1, 1, 1, 4)
    with pytest.raises(TypeError, match="weight dtype"):
        triple_gate_conv2d(x, wt.half(), b, g, out, 1, 1, 1, 4)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        triple_gate_conv2d(x.double(), wt, b, g, out, 1, 1, 1, 4)
    with pytest.raises(ValueError, match="bias"):
        triple_gate_conv2d(x, wt, b[:3], g, out, 1, 1, 1, 4)
    with pytest.raises(ValueError, match="stride"):
        triple_gate_conv2d(x, wt, b, g, out, 0, 1, 1, 4)
    with pytest.raises(ValueError, match="x_prev"):
        triple_gate_map(x, x[..., :8], 3, 1, 1, 1, 4)
    with pytest.raises(ValueError, match="skip_logit needs"):
        triple_gate_map(x, x, 3, 1, 1, 1, 4, skip_logit=0.0)
    with pytest.raises(ValueError, match="threshold"):
        triple_gate_map(x, x, 3, 1, 1, 1, 4, threshold=-1.0)
    with pytest.raises(ValueError, match="interpret"):
        triple_gate_map(x, x, 3, 1, 1, 1, 4, backend="triton")


def test_opcheck():
    x, wt, b = _case(1, 16, 16, 9, 7, 3, torch.float32)
    xp = x.clone()
    xp[0, :, 2, 2] += 1
    ho, wo, th, tw = _geom(9, 7, 3, 1, 1, 1, 4)
    wi = torch.randn(16)
    args = (x, xp, torch.zeros(1, th, tw, dtype=torch.int8), wi, 0.1, [3, 3], [1, 1], [1, 1], [1, 1], 4, 0.0,
            -0.5, "reference")
    torch.library.opcheck(torch.ops.sparsekit.triple_gate_map.default, args)
    g = compact_gates(torch.randint(0, 3, (1, th, tw), dtype=torch.int8), (ho, wo), 4, backend="reference")
    out = torch.randn(1, 16, ho, wo)
    for backend in ("reference", "interpret"):
        torch.library.opcheck(torch.ops.sparsekit.triple_gate_conv2d_.default,
                              (x, wt, b, g.gate, g.tiles, g.counts, out.clone(), [1, 1], [1, 1], [1, 1], 4, backend))


def test_torch_compile_fullgraph():
    # gate op + mutating conv op trace without graph breaks and give the eager result
    x, wt, b = _case(1, 16, 16, 9, 7, 3, torch.float32)
    xp = x.clone()
    xp[0, :, 2, 2] += 1

    def frame(x, xp, out):
        g = triple_gate_map(x, xp, 3, 1, 1, 1, 4, 0.0, backend="interpret")
        triple_gate_conv2d(x, wt, b, g, out, 1, 1, 1, 4, backend="interpret")
        return out

    prev = torch.randn(1, 16, 9, 7)
    compiled = torch.compile(frame, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, xp, prev.clone()), frame(x, xp, prev.clone()))


# ------------------------------------------------------------------ gate training

def _moving_squares(t_frames=8, h=32, w=32, noise=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    bg = F.avg_pool2d(torch.randn(1, 3, h, w, generator=g), 5, 1, 2) * 3
    frames = []
    for t in range(t_frames):
        f = bg + noise * torch.randn(1, 3, h, w, generator=g)
        for (r0, c0, dr, dc, col) in ((4, 3, 1, 2, 1.0), (20, 24, -1, -2, -1.0)):
            r, c = r0 + dr * t, c0 + dc * t
            f[:, :, r:r + 6, c:c + 6] += col
        frames.append(f)
    return frames


def _eval_video(layer, conv, frames):
    layer.eval()
    layer.reset()
    errs = []
    with torch.no_grad():
        for f in frames:
            y = layer(f)
            errs.append((y - conv(f)).norm().item() / conv(f).norm().item())
    return layer.mean_compute_ratio, max(errs)


def test_gate_training_moves_compute_to_target_with_bounded_error():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    for prm in conv.parameters():
        prm.requires_grad_(False)
    layer = TripleGateConv2d.from_conv(conv, tile=4, backend="reference")
    layer.enable_gate_training(init_threshold=1e-3, skip=False, dense_prob=0.2)
    for prm in (layer.weight, layer.bias):
        prm.requires_grad_(False)
    frames = _moving_squares()
    ratio0, err0 = _eval_video(layer, conv, frames[1:])
    target = 0.3
    opt = torch.optim.Adam([layer.log_threshold], lr=0.3)
    layer.train()
    for epoch in range(6):
        layer.reset()
        for f in frames:
            y = layer(f)
            with torch.no_grad():
                ref = conv(f)
            loss = (y - ref).pow(2).mean() / ref.pow(2).mean() + 4.0 * compute_loss(layer, target)
            if not loss.requires_grad:          # a dense frame: nothing to learn from
                continue
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert layer.compute_loss(target).item() >= 0.0
    ratio1, err1 = _eval_video(layer, conv, frames[1:])
    print(f"\ngate training: compute ratio {ratio0:.3f} -> {ratio1:.3f} (target {target}), "
          f"max rel err {err0:.3g} -> {err1:.3g}, threshold {layer.threshold:.3g}")
    assert ratio0 > 0.9
    assert abs(ratio1 - target) < 0.2 and ratio1 < ratio0 - 0.4
    assert err1 < 0.15
    assert compute_ratios(nn.Sequential(layer))["0"] == pytest.approx(ratio1)


def test_gate_training_skip_branch_and_mixed_dense_frames():
    # the SKIP branch receives gradients and the compute loss reaches the importance conv
    torch.manual_seed(1)
    layer = TripleGateConv2d(3, 4, 3, padding=1, tile=4, backend="reference")
    layer.enable_gate_training(init_threshold=1e-3, skip=True, dense_prob=0.0)
    layer.train()
    frames = _moving_squares(t_frames=3, h=16, w=16)
    layer(frames[0])
    assert compute_loss(layer, 0.2).item() == 0.0        # first frame is dense: no ratio term
    y = layer(frames[1])
    loss = compute_loss(layer, 0.0)
    loss.backward()
    assert layer.importance.weight.grad is not None and layer.log_threshold.grad is not None
    assert float(layer.log_threshold.grad) < 0          # lowering compute raises the threshold
    assert y.shape == (1, 4, 16, 16)
    layer.dense_prob = 1.0                               # mixed training: this frame is dense
    layer(frames[2])
    assert layer.compute_ratio == 1.0 and layer._soft_ratio is None


# ------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32", [(torch.float32, False), (torch.float32, True), (torch.float16, None),
                                        (torch.bfloat16, None)])
def test_gpu_triton_matches_reference(dtype, tf32):
    # fp32 follows torch.backends.cudnn.allow_tf32 like F.conv2d: full fp32 (1e-5) without it, TF32 tensor
    # cores with it (fp16's 10-bit mantissa: 1e-3, and within 2x of F.conv2d's own TF32 error)
    dev = "cuda"
    old = torch.backends.cudnn.allow_tf32
    if tf32 is not None:
        torch.backends.cudnn.allow_tf32 = tf32
    try:
        x, wt, b = (t.to(dev) if t is not None else t for t in _case(2, 64, 96, 37, 41, 3, dtype))
        xp = x.clone()
        xp[:, :, 10:14, 20:23] += 1
        for s, p, d in ((1, 1, 1), (2, 1, 1), (1, 2, 2)):
            ho, wo, th, tw = _geom(37, 41, 3, s, p, d, 8)
            res = {bk: triple_gate_map(x, xp, 3, s, p, d, 8, 0.0, backend=bk) for bk in ("triton", "reference")}
            assert torch.equal(res["triton"].gate, res["reference"].gate)
            prev = torch.randn(2, 96, ho, wo, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
            outs = {}
            for bk in ("triton", "reference"):
                outs[bk] = prev.clone()
                triple_gate_conv2d(x, wt, b, res[bk], outs[bk], s, p, d, 8, backend=bk)
            gate = res["reference"].gate
            ref = _composed(prev, _ref64(x, wt, b, s, p, d), b, gate, 8)
            if tf32:
                assert_close_rel(outs["triton"], ref, bound=1e-3)
                assert_within_torch_error(outs["triton"], ref, _composed(prev, F.conv2d(x, wt, b, s, p, d), b, gate, 8))
            else:
                assert_close_rel(outs["triton"], ref)
    finally:
        torch.backends.cudnn.allow_tf32 = old


@pytest.mark.gpu
def test_gpu_module_video():
    conv = nn.Conv2d(64, 64, 3, padding=1).cuda().half()
    m = TripleGateConv2d.from_conv(conv).eval()
    x = torch.randn(2, 64, 67, 45, device="cuda").half()
    y0 = m(x)
    assert_close_rel(y0, _ref64(x, conv.weight, conv.bias, 1, 1, 1))
    y1 = m(x.clone())
    assert m.compute_ratio == 0.0 and torch.equal(y0, y1)
    x2 = x.clone()
    x2[1, :, 30, 20] += 1.0                              # outputs 29..31 x 19..21: tile (3, 2) only
    y2 = m(x2)
    assert int((m.last_gate == UPDATE).sum()) == 1 and m.last_gate[1, 3, 2] == UPDATE
    assert m.compute_ratio == pytest.approx(64 / (2 * 67 * 45))
    assert_close_rel(y2, _ref64(x2, conv.weight, conv.bias, 1, 1, 1))
