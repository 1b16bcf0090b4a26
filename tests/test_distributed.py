"""sparsekit.distributed on CPU processes over gloo: tensor parallelism, distributed calibration,
sequence-parallel DraftAttention.

Each world size runs one job: this file executed as a script (``python test_distributed.py
WORLD PORT ERRFILE``) starts WORLD processes with ``torch.multiprocessing.start_processes``
(forked from a parent that has already imported torch and sparsekit, so that the ranks do
not each pay the imports), and every rank runs all the checks of :func:`_job`; the pytest side runs that script in a subprocess under a timeout,
so a hang fails the test instead of stalling the suite.  A rank reports failures through
its exit code and the traceback on stderr.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback

import pytest
import torch

JOB_TIMEOUT_S = 150


# =========================================================================== the checks (run in every rank)
def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _close(out, ref, tol, what):
    e = _rel(out, ref)
    assert e < tol, f"{what}: relative error {e:.3g} >= {tol:g}"


def _modules():
    """(name, module, input dtype, tolerance for exact-math shards, tolerance for rowwise act-quant)."""
    from torch import nn

    from sparsekit.formats.int4 import Int4Weight
    from sparsekit.nn import BlockSparseLinear, QLinear, SparseLinear, SparseQLinear

    torch.manual_seed(0)
    mods = []
    lin = nn.Linear(100, 44)
    mods.append(("linear", lin, 1e-5, None))
    mods.append(("sparse24", SparseLinear.from_dense(nn.Linear(100, 44)), 1e-5, None))
    mods.append(("sparse24_int8", SparseLinear.from_dense(nn.Linear(96, 40), act_bits=8), 1e-5, 3e-2))
    mods.append(("block_sparse", BlockSparseLinear.from_dense(nn.Linear(96, 80), block_size=(16, 16), sparsity=0.5),
                 1e-5, None))
    mods.append(("w4a16", QLinear.from_float(nn.Linear(256, 48), bits=4, group_size=32), 2e-3, None))
    mods.append(("w4a16_sym_awq_scale", QLinear.from_float(nn.Linear(256, 48), bits=4, group_size=64,
                                                           symmetric=True), 2e-3, None))
    mods[-1][1].input_scale = torch.rand(256).add(0.5).half()
    mods.append(("w8a8", QLinear.from_float(nn.Linear(72, 40), bits=8, act_bits=8), 2e-3, 3e-2))
    mods.append(("w4a8_mixed", QLinear.from_float(nn.Linear(128, 40), bits=4, group_size=32, act_bits="mixed",
                                                  frac8=0.5), 2e-3, 8e-2))
    mods.append(("sparse24_int4", SparseQLinear.from_dense(nn.Linear(256, 40), group_size=32), 2e-3, None))
    # act-order int4: groups scattered over the input features (GPTQ desc_act)
    k, n, gs = 128, 24, 32
    g_idx = torch.randperm(k) % (k // gs)
    q = torch.randint(0, 16, (n, k))
    w = Int4Weight.from_g_idx(q, torch.rand(n, k // gs) * 0.02 + 0.01, torch.randint(0, 16, (n, k // gs)).float(),
                              g_idx, gs, dtype=torch.float16)
    mods.append(("w4a16_act_order", QLinear.from_weight(w, torch.randn(n).half()), 2e-3, None))
    for _, m, _, _ in mods:
        m.backend = "reference"
        if hasattr(m, "local"):
            m.local.backend = "reference"
    return mods


def _set_backend(mod, backend="reference"):
    for m in mod.modules():
        if hasattr(m, "backend"):
            m.backend = backend


def _check_tp(rank, world):
    import torch.distributed as dist

    from sparsekit.distributed import shard_module

    torch.manual_seed(1)
    for name, mod, tol, act_tol in _modules():
        x = torch.randn(3, 5, mod.in_features)
        ref = mod(x)
        # colwise: local slice, then gathered
        col = shard_module(mod, None, "colwise", name=name)
        _set_backend(col)
        lo, hi = col.local_range
        _close(col(x), ref[..., lo:hi], tol, f"{name} colwise slice")
        col.gather_output = True
        _close(col(x), ref, tol, f"{name} colwise gathered")
        # rowwise: the input sharded (as after a colwise layer) or replicated
        if name == "w4a16_act_order":
            try:
                shard_module(mod, None, "rowwise", name=name)
            except ValueError as e:
                assert "in_perm" in str(e) and name in str(e), e
            else:
                raise AssertionError("rowwise act-order with a sharded input must raise")
        else:
            row = shard_module(mod, None, "rowwise", name=name)
            _set_backend(row)
            lo, hi = row.local_range
            y = row(x[..., lo:hi])
            _close(y, ref, act_tol or tol, f"{name} rowwise")
            if act_tol is None:
                # partial sums + bias once: the same as the single-process layer within float order
                assert y.dtype == ref.dtype
        rep = shard_module(mod, None, "rowwise", input_is_sharded=False, name=name)
        _set_backend(rep)
        _close(rep(x), ref, act_tol or tol, f"{name} rowwise (replicated input)")
        # every rank ends with the same output
        outs = [torch.empty_like(ref) for _ in range(world)]
        dist.all_gather(outs, rep(x).contiguous())
        for o in outs[1:]:
            assert torch.equal(o, outs[0]), f"{name}: ranks disagree on the all-reduced output"
    if world == 2:
        _check_tp_world2()
    _check_invalid(world)


def _check_tp_world2():
    """Two cases sized for two ranks: an act-order permutation that stays inside each half (rowwise with a
    sharded input is then allowed), and the Triton kernels (interpreter) on a 2:4 shard."""
    from torch import nn

    from sparsekit.distributed import shard_module
    from sparsekit.formats.int4 import Int4Weight
    from sparsekit.nn import QLinear, SparseLinear

    torch.manual_seed(10)
    k, n, gs = 128, 16, 32
    g_idx = torch.cat([torch.arange(64) % 2, 2 + torch.arange(64) % 2])     # groups 0,1 interleaved, then 2,3
    w = Int4Weight.from_g_idx(torch.randint(0, 16, (n, k)), torch.rand(n, 4) * 0.02 + 0.01,
                              torch.randint(0, 16, (n, 4)).float(), g_idx, gs, dtype=torch.float16)
    mod = QLinear.from_weight(w, torch.randn(n).half(), input_scale=torch.rand(k) + 0.5)
    assert mod.in_perm is not None
    _set_backend(mod)
    x = torch.randn(4, k)
    row = shard_module(mod, None, "rowwise")
    _set_backend(row)
    lo, hi = row.local_range
    _close(row(x[..., lo:hi]), mod(x), 2e-3, "rowwise act-order (permutation inside each shard)")
    sl = SparseLinear.from_dense(nn.Linear(40, 24))
    x = torch.randn(3, 40)
    ref = sl(x)
    for style in ("colwise", "rowwise"):
        sh = shard_module(sl, None, style, gather_output=True, input_is_sharded=False)
        _set_backend(sh, "interpret")
        _close(sh(x), ref, 1e-5, f"sparse24 {style} on the interpret backend")


def _check_invalid(world):
    from torch import nn

    from sparsekit.distributed import shard_module
    from sparsekit.nn import QLinear, SparseLinear

    torch.manual_seed(2)
    sl = SparseLinear.from_dense(nn.Linear(64, 16))
    bad = [60] + [1] * (world - 2) + [4 - (world - 2)]          # a split point at 60, inside a metadata byte
    bad_q = [48, 80] if world == 2 else [48, 16, 32, 32]       # a split point at 48, inside an int4 group
    for mod, style, splits, words in [
        (sl, "rowwise", bad, ["SparseLinear", "K (in_features)", "multiples of 8"]),
        (QLinear.from_float(nn.Linear(64, 16), bits=4, group_size=-1), "rowwise", None,
         ["QLinear", "K (in_features)", "group_size=64"]),
        (QLinear.from_float(nn.Linear(128, 16), bits=4, group_size=32), "rowwise", bad_q,
         ["K (in_features)", "at 48", "multiples of 32"]),
    ]:
        try:
            shard_module(mod, None, style, splits=splits)
        except ValueError as e:
            for w in words:
                assert w in str(e), f"{w!r} not in {e}"
        else:
            raise AssertionError(f"an invalid split of {type(mod).__name__} must raise")
    try:
        shard_module(sl, None, "diagonal")
    except ValueError as e:
        assert "style" in str(e)
    else:
        raise AssertionError("a bad style must raise")


def _check_plan(rank, world):
    from torch import nn
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from sparsekit.distributed import parallelize
    from sparsekit.nn import QLinear, SparseLinear

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = SparseLinear.from_dense(nn.Linear(64, 128, bias=False))
            self.up_proj = QLinear.from_float(nn.Linear(64, 128, bias=False), bits=4, group_size=32)
            self.down_proj = SparseLinear.from_dense(nn.Linear(128, 64))

        def forward(self, x):
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    torch.manual_seed(3)
    model = MLP()
    _set_backend(model)
    x = torch.randn(2, 7, 64)
    ref = model(x)
    for plan in ({"*_proj": "colwise", "down_proj": "rowwise"},
                 {"gate_proj": ColwiseParallel(), "up_proj": "colwise", "down_proj": RowwiseParallel()}):
        if "*_proj" in plan:
            try:
                parallelize(MLP(), plan)
            except ValueError as e:
                assert "several plan entries" in str(e)
            else:
                raise AssertionError("overlapping plan entries must raise")
            continue
        torch.manual_seed(3)
        m = parallelize(MLP(), plan)
        _set_backend(m)
        _close(m(x), ref, 2e-3, "parallelized MLP")
    # training: the trainable float parts of a colwise -> rowwise 2:4 pair get the unsharded gradients
    torch.manual_seed(4)
    a, b = SparseLinear.from_dense(nn.Linear(32, 48)), SparseLinear.from_dense(nn.Linear(48, 32))
    _set_backend(a), _set_backend(b)
    xr = torch.randn(5, 32, requires_grad=True)
    b(torch.relu(a(xr))).pow(2).sum().backward()
    from sparsekit.distributed import shard_module

    sb = shard_module(b, None, "rowwise")
    if world == 4:
        # 48 hidden features over 4 ranks: colwise cuts at 12, 24, 36; a 2:4 rowwise layer only at multiples of 8
        assert shard_module(a, None, "colwise").bounds != sb.bounds
    sa = shard_module(a, None, "colwise", multiple_of=8)
    assert sa.bounds == sb.bounds
    _set_backend(sa), _set_backend(sb)
    xs = xr.detach().clone().requires_grad_(True)
    sb(torch.relu(sa(xs))).pow(2).sum().backward()
    lo, hi = sa.local_range
    _close(sa.local.values.grad, a.values.grad[lo:hi], 1e-5, "colwise values grad")
    _close(sa.local.bias.grad, a.bias.grad[lo:hi], 1e-5, "colwise bias grad")
    klo, khi = sb.local_range
    _close(sb.local.values.grad, b.values.grad[:, klo // 2:khi // 2], 1e-5, "rowwise values grad")
    _close(sb.bias.grad, b.bias.grad, 1e-5, "rowwise bias grad")
    _close(xs.grad, xr.grad, 1e-5, "input grad")
    assert not sa.local.meta_codes.requires_grad


def _check_calibration(rank, world):
    import torch.distributed as dist
    from torch import nn

    from sparsekit.compress import compress
    from sparsekit.prune.calibration import collect_layer_stats
    from sparsekit.quant.calibration import collect_linear_inputs

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64)).double()
    batches = [torch.randn(3, 4, 64, dtype=torch.float64) for _ in range(2 * world + 1)]
    mine = batches[rank::world]             # uneven shares (world + 1 ranks' worth of batches)
    single = collect_linear_inputs(model, None, batches, progress=False)
    dist_ = collect_linear_inputs(model, None, mine, progress=False, process_group=dist.group.WORLD)
    for n in single:
        assert dist_[n]["n"] == single[n]["n"], (dist_[n]["n"], single[n]["n"])
        for key in ("H", "mean_abs"):
            _close(dist_[n][key], single[n][key], 1e-12, f"collect_linear_inputs {n} {key}")
    model32 = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
    single = collect_layer_stats(model32, None, [b.float() for b in batches], progress=False)
    dist_ = collect_layer_stats(model32, None, [b.float() for b in mine], progress=False,
                                process_group=dist.group.WORLD)
    for n in single:
        assert dist_[n]["num_samples"] == single[n]["num_samples"]
        assert dist_[n]["fisher_mode"] == single[n]["fisher_mode"] == "sample"
        for key in ("grad", "fisher", "input_norm"):
            _close(dist_[n][key], single[n][key], 1e-5, f"collect_layer_stats {n} {key}")
    # sequential GPTQ over a model (the shared calibration plumbing of compress, quantize_ and prune_model_)
    from sparsekit.quant.calibration import quantize_model_weights

    torch.manual_seed(11)
    base = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64)).double()
    import copy

    m_ref, m_got = copy.deepcopy(base), copy.deepcopy(base)
    quantize_model_weights(m_ref, batches, method="gptq", group_size=32, progress=False)
    quantize_model_weights(m_got, mine, method="gptq", group_size=32, progress=False, process_group=dist.group.WORLD)
    for (n, a), b in zip(m_got.state_dict().items(), m_ref.state_dict().values()):
        _close(a, b, 1e-9, f"quantize_model_weights {n}")
    # compress: every rank calibrates on its share; the compressed model equals the single-process one
    for scheme, method in (("int4", "gptq"), ("2:4", "sparsegpt")):
        torch.manual_seed(6)
        base = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
        fb = [b.float() for b in batches]
        import copy

        ref_model, _ = compress(copy.deepcopy(base), fb, scheme=scheme, method=method, speed="off")
        got_model, _ = compress(copy.deepcopy(base), fb[rank::world], scheme=scheme, method=method, speed="off",
                                process_group=dist.group.WORLD)
        ref_sd, got_sd = ref_model.state_dict(), got_model.state_dict()
        assert ref_sd.keys() == got_sd.keys()
        for key in ref_sd:
            r, g = ref_sd[key], got_sd[key]
            if r.is_floating_point():
                _close(g, r, 1e-4, f"compress {scheme} {key}")
            else:
                same = (r == g).float().mean().item()
                assert same > 0.995, f"compress {scheme} {key}: only {same:.4f} of the codes agree"
        x = fb[0]
        _close(got_model(x), ref_model(x), 1e-3, f"compress {scheme} output")


def _split_model():
    """Two chained blocks; in each, three layers read the same input (one sequential group of three, as
    q/k/v), then an output layer (a group of one): 8 layers, so every rank owns some at world 2 and 4."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(64, 96), nn.Linear(64, 96), nn.Linear(64, 96)
            self.o = nn.Linear(96, 64)

        def forward(self, x):
            return x + self.o(torch.nn.functional.gelu(self.a(x)) * self.b(x) + self.c(x))

    torch.manual_seed(12)
    return nn.Sequential(Block(), Block())


class _Counting:
    """Counts the calls of a module-level function while it is patched in."""

    def __init__(self, module, name):
        self.module, self.name, self.calls = module, name, 0
        self.orig = getattr(module, name)

    def __enter__(self):
        def wrapped(*a, **k):
            self.calls += 1
            return self.orig(*a, **k)
        setattr(self.module, self.name, wrapped)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.orig)


def _same_state(a, b, what, exact):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), what
    for key in sa:
        x, y = sa[key], sb[key]
        if exact:
            assert torch.equal(x, y), f"{what} {key}: not bit-identical"
        elif x.is_floating_point():
            _close(x, y, 1e-4, f"{what} {key}")
        else:
            same = (x == y).float().mean().item()
            assert same > 0.995, f"{what} {key}: only {same:.4f} of the entries agree"


def _check_quantize_prune(rank, world):
    """quantize_ (int4 GPTQ) and prune_model_ (Wanda, SparseGPT 2:4) with a process group: each rank passes its
    share of the batches; the result equals one process on the union; with the layers split over the ranks
    (each rank solves layer i for i % world == rank, the owners broadcast) it is bit for bit the unsplit one."""
    import copy

    import torch.distributed as dist

    import sparsekit.prune.sequential as seq
    import sparsekit.quant as quant
    from sparsekit.convert import quantize_
    from sparsekit.prune import prune_model_
    from sparsekit.schemes import Int4Params

    g = dist.group.WORLD
    torch.manual_seed(13)
    batches = [torch.randn(2, 5, 64) for _ in range(2 * world + 1)]
    mine = batches[rank::world]
    base = _split_model()
    n_layers = 8
    own = len(range(rank, n_layers, world))
    x = batches[0]

    cfg = Int4Params(method="gptq", group_size=32)
    ref = quantize_(copy.deepcopy(base), cfg, calib=batches, progress=False)
    _set_backend(ref)
    splits = []
    for blocks in ("auto", None):          # block by block (the model's two blocks), and as one whole model
        with _Counting(quant, "gptq_quantize") as cnt:
            splits.append(quantize_(copy.deepcopy(base), cfg, calib=mine, progress=False, process_group=g,
                                    blocks=blocks))
        assert cnt.calls == own, f"quantize_ split: rank {rank} solved {cnt.calls} layers, expected {own}"
    with _Counting(quant, "gptq_quantize") as cnt:
        # unsplit, and calibrated as one whole model instead of block by block (the same layer inputs)
        whole = quantize_(copy.deepcopy(base), cfg, calib=mine, progress=False, process_group=g, split_layers=False,
                          blocks=None)
    assert cnt.calls == n_layers
    _set_backend(whole)
    for split, blocks in zip(splits, ("auto", None)):
        _set_backend(split)
        _same_state(split, whole, f"quantize_ gptq split (blocks={blocks}) vs unsplit", exact=True)
    _same_state(split, ref, "quantize_ gptq distributed vs one process", exact=False)
    _close(split(x), ref(x), 1e-3, "quantize_ gptq output")

    for method in ("wanda", "sparsegpt"):
        m_ref = copy.deepcopy(base)
        masks_ref = prune_model_(m_ref, batches, method=method, progress=False)
        runs = {}
        # the default (None: unsplit for Wanda, split for SparseGPT) and the other choice
        for split_layers in (None, method == "wanda"):
            m = copy.deepcopy(base)
            with _Counting(seq, "sparsegpt_prune") as cs, _Counting(seq, "wanda_mask") as cw:
                masks = prune_model_(m, mine, method=method, progress=False, process_group=g,
                                     split_layers=split_layers)
            calls = cs.calls + cw.calls
            splits = split_layers or (split_layers is None and method == "sparsegpt")
            assert calls == (own if splits else n_layers), (method, split_layers, calls)
            assert list(masks) == list(masks_ref)
            runs[split_layers] = (m, masks)
        (m, masks), (m2, masks2) = runs[None], runs[method == "wanda"]
        _same_state(m2, m, f"prune_model_ {method} split vs unsplit", exact=True)
        for n in masks:
            assert torch.equal(masks[n], masks2[n]), f"{method} {n}: split mask differs"
        for n in masks:
            same = (masks[n] == masks_ref[n]).float().mean().item()
            assert same > 0.995, f"prune_model_ {method} {n}: only {same:.4f} of the mask agrees with one process"
        _same_state(m, m_ref, f"prune_model_ {method} distributed vs one process", exact=False)
        with torch.no_grad():
            _close(m(x), m_ref(x), 1e-4, f"prune_model_ {method} output")
    # the broadcast of a solve's outcome: a structure whose header exceeds the fixed-size message, bit for bit
    from sparsekit.distributed.split import broadcast_payload

    torch.manual_seed(14)
    payload = {f"t{i}": (torch.randn(i % 5, 3).to(dt), i, None) for i, dt in
               enumerate([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8] * 30)}
    payload["mask"] = torch.rand(7, 4) > 0.5
    src = world - 1
    got = broadcast_payload(payload if rank == src else None, src, g, torch.device("cpu"))
    for key, v in payload.items():
        if isinstance(v, tuple):
            assert torch.equal(got[key][0], v[0]) and got[key][0].dtype == v[0].dtype and got[key][1:] == v[1:]
        else:
            assert torch.equal(got[key], v)
    # a solve that fails on its owner fails on every rank (no rank is left waiting in a broadcast)
    try:
        prune_model_(copy.deepcopy(base), mine, method="sparsegpt", damp=-1.0, progress=False, process_group=g)
    except (ValueError, RuntimeError) as e:
        assert "damp" in str(e), e
        if isinstance(e, RuntimeError):
            assert "solving it failed on rank" in str(e), e
    else:
        raise AssertionError("a failing split solve must raise on every rank")
    # the methods that cannot be distributed say so
    from torch import nn

    from sparsekit.quant.calibration import quantize_model_weights

    for call, words in [
        (lambda: prune_model_(copy.deepcopy(base), mine, method="moe_pruner", process_group=g), ["moe_pruner"]),
        (lambda: quantize_model_weights(nn.Sequential(nn.Linear(64, 64)), mine, method="awq", group_size=32,
                                        process_group=g), ["AWQ as published", "published=False"]),
    ]:
        try:
            call()
        except ValueError as e:
            for w in words:
                assert w in str(e), f"{w!r} not in {e}"
        else:
            raise AssertionError(f"{words[0]} with a process group must raise")


def _check_sp(rank, world):
    from sparsekit.distributed import shard_sequence, sp_draft_attention
    from sparsekit.ops.draft_attention import draft_attention

    torch.manual_seed(7)
    cases = [dict(B=2, H=4, frames=2, height=4, width=8, pool=(4, 8), text_tokens=world * 4, D=16,
                  sparsity=0.5, mode="percentile", backend="reference"),
             dict(B=1, H=world, frames=4, height=4, width=4, pool=(4, 4), text_tokens=0, D=16, sparsity=0.5,
                  mode="topk", backend="reference")]
    if world == 2:
        cases.append(dict(B=1, H=2, frames=2, height=4, width=4, pool=(4, 4), text_tokens=0, D=16, sparsity=0.5,
                          mode="topk", backend="interpret"))
    for c in cases:
        S = c["text_tokens"] + c["frames"] * c["height"] * c["width"]
        # structured inputs (smooth along the sequence) so that the draft is informative
        base = torch.randn(c["B"], c["H"], 1, c["D"])
        t = torch.linspace(0, 3, S).view(1, 1, S, 1)
        q, k, v = (base * torch.cos(t * (i + 1)) + 0.3 * torch.randn(c["B"], c["H"], S, c["D"]) for i in range(3))
        kw = dict(frames=c["frames"], height=c["height"], width=c["width"], pool=c["pool"],
                  text_tokens=c["text_tokens"], sparsity=c["sparsity"], mode=c["mode"], backend=c["backend"])
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ref, mask = draft_attention(q, k, v, return_mask=True, **kw)
            ql, kl, vl = (shard_sequence(a) for a in (q, k, v))
            out, lmask = sp_draft_attention(ql, kl, vl, return_mask=True, **kw)
        hp = c["H"] // world
        assert torch.equal(lmask, mask[:, rank * hp:(rank + 1) * hp]), "SP block mask differs"
        _close(out, shard_sequence(ref), 1e-6, f"SP draft attention {c['backend']} {c['mode']}")
    # the exchange and its inverse are each other's gradient (the op itself is inference-only)
    import torch.distributed as dist

    from sparsekit.distributed._comm import all_to_all_4d

    xs = torch.randn(2, 2 * world, 3, 8, requires_grad=True)
    y = all_to_all_4d(xs, dist.group.WORLD, scatter_dim=1, gather_dim=2)
    assert tuple(y.shape) == (2, 2, 3 * world, 8)
    full = [torch.empty_like(xs) for _ in range(world)]
    dist.all_gather(full, xs.detach())
    assert torch.equal(y, torch.cat(full, 2)[:, 2 * rank:2 * rank + 2])
    c = torch.randn_like(y)
    (y * c).sum().backward()
    assert torch.equal(xs.grad, all_to_all_4d(c, dist.group.WORLD, scatter_dim=2, gather_dim=1))
    c = cases[0]
    S = c["text_tokens"] + c["frames"] * c["height"] * c["width"]
    kw = dict(frames=c["frames"], height=c["height"], width=c["width"], pool=c["pool"],
              text_tokens=c["text_tokens"], sparsity=0.0, backend="reference")
    ql, kl, vl = (torch.randn(1, c["H"], S // world, c["D"]) for _ in range(3))
    try:
        sp_draft_attention(ql[:, :world - 1] if world > 1 else ql, kl[:, :world - 1], vl[:, :world - 1], **kw)
    except ValueError as e:
        assert "divisible" in str(e)
    else:
        raise AssertionError("H not divisible by the world size must raise")


def _fsdp_model():
    """A small model mixing dense and packed layers (trainable float parts: weights, 2:4 values,
    kept blocks, biases; packed codes and metadata are buffers)."""
    from torch import nn

    from sparsekit.nn import BlockSparseLinear, QLinear, SparseLinear

    torch.manual_seed(8)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), SparseLinear.from_dense(nn.Linear(64, 64)), nn.ReLU(),
                      BlockSparseLinear.from_dense(nn.Linear(64, 64), block_size=(16, 16), sparsity=0.5), nn.ReLU(),
                      QLinear.from_float(nn.Linear(64, 16), bits=4, group_size=32))
    _set_backend(m)
    return m


def _fsdp_data():
    torch.manual_seed(9)
    return torch.randn(8, 32)


def _fsdp_step(model, x):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model(x).float().pow(2).mean().backward()
    opt.step()


def _fsdp_sharded(mesh):
    """A fresh :func:`_fsdp_model` with each sparsekit layer and the whole model sharded by FSDP2 over ``mesh``."""
    from torch.distributed.fsdp import fully_shard

    model = _fsdp_model()
    for i in (0, 2, 4, 6):
        fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_loaded(mesh, checkpoint_id):
    """A fresh sharded model with its parameters zeroed, then loaded in place (into its local shards; the
    buffers are replicated) from the DCP checkpoint ``checkpoint_id``."""
    import torch.distributed.checkpoint as dcp

    model = _fsdp_sharded(mesh)
    sd = model.state_dict()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    dcp.load(sd, checkpoint_id=checkpoint_id)
    return model


def _check_fsdp(rank, world):
    """FSDP2 over sparsekit modules: forward equals the unsharded model; one training step on each rank's share
    of the batch equals the single-process step on the whole batch (gradients averaged over ranks); the
    packed buffers stay plain replicated tensors; the state is saved with torch.distributed.checkpoint
    (loaded at world size 1 by the test itself) and reloaded at this world size; a checkpoint saved by the
    world-2 job (``SPARSEKIT_TEST_CKPT_FROM``) loads into a freshly sharded model at this world size."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,))
    ref, model = _fsdp_model(), _fsdp_sharded(mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert not any(isinstance(b, DTensor) for b in model.buffers())
    assert not model[2].meta_codes.requires_grad and not model[6].qweight.is_floating_point()
    x = _fsdp_data()
    with torch.no_grad():
        _close(model(x), ref(x), 1e-6, "FSDP2 forward")
    xs = x.chunk(world)[rank]
    _fsdp_step(model, xs)
    _fsdp_step(ref, x)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        _close(p.full_tensor(), q, 1e-5, f"FSDP2 step {n}")
    assert torch.equal(model[2].meta_codes, ref[2].meta_codes)
    ckpt = os.environ["SPARSEKIT_TEST_CKPT"]
    dcp.save(model.state_dict(), checkpoint_id=ckpt)
    # and back into a fresh sharded model (in place into its local shards; the buffers are replicated)
    fresh = _fsdp_loaded(mesh, ckpt)
    with torch.no_grad():
        _close(fresh(x), ref(x), 1e-5, "FSDP2 model reloaded from its DCP checkpoint")
    other = os.environ.get("SPARSEKIT_TEST_CKPT_FROM")
    if other:
        # saved at another world size: DCP reshards the parameters on load; the replicated buffers are read whole
        fresh = _fsdp_loaded(mesh, other)
        for (n, p), (_, q) in zip(fresh.named_parameters(), ref.named_parameters()):
            _close(p.full_tensor(), q, 1e-5, f"DCP checkpoint of another world size -> {world}: {n}")
        with torch.no_grad():
            _close(fresh(x), ref(x), 1e-5, f"FSDP2 model at world {world} loaded from another world size's checkpoint")
        if dist.get_rank() == 0:
            open(ckpt + ".cross", "w").write(other)


def _check_bench_cases(rank, world):
    """bench/tp.py's case list (kinds x styles) at a small size, sharded over this world."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.tp import CASES, check_case

    for kind, style in sorted({(c[0], c[1]) for c in CASES}):
        check_case(kind, style, 128, 256, 3, torch.float16, "cpu", "reference")


def _job(rank, world, port, errfile):
    os.environ["SPARSEKIT_NO_CUDA_EXT"] = "1"
    os.environ.setdefault("SPARSEKIT_TEST_CKPT", f"{errfile}.ckpt")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        import time

        checks = (_check_tp, _check_plan, _check_calibration, _check_quantize_prune, _check_sp)
        checks += (_check_bench_cases,) if world == 2 else ()
        checks += (_check_fsdp,)
        for check in checks:
            t0 = time.perf_counter()
            check(rank, world)
            dist.barrier()
            if rank == 0:
                print(f"world={world} {check.__name__}: {time.perf_counter() - t0:.1f} s", flush=True)
    except BaseException:
        with open(f"{errfile}.{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# =========================================================================== pytest side
@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """Shared by the jobs of this module: the world-2 job's DCP checkpoint is loaded by the world-4 job."""
    return tmp_path_factory.mktemp("dcp")


@pytest.mark.parametrize("world", [2, 4])          # in this order: world 4 loads world 2's checkpoint
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_distributed_job(world, tmp_path, ckpt_dir):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    errfile = str(tmp_path / "err")
    ckpt = str(ckpt_dir / f"world{world}.ckpt")
    source = str(ckpt_dir / "world2.ckpt") if world != 2 else ""
    if source and not os.path.exists(source):
        import warnings

        warnings.warn(f"world={world}: the DCP load of a world-2 checkpoint is not checked (the world-2 job did "
                      f"not run first in this session)")
        source = ""
    env = dict(os.environ, SPARSEKIT_NO_CUDA_EXT="1", OMP_NUM_THREADS="1", SPARSEKIT_TEST_CKPT=ckpt,
               SPARSEKIT_TEST_CKPT_FROM=source)
    try:
        proc = subprocess.run([sys.executable, __file__, str(world), str(_free_port()), errfile], env=env,
                              capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"world={world}: the distributed job did not finish in {JOB_TIMEOUT_S} s (hang?)\n"
                    f"{(e.stderr or b'')[-3000:]}")
    errs = "".join(open(f"{errfile}.{r}").read() for r in range(world) if os.path.exists(f"{errfile}.{r}"))
    assert proc.returncode == 0, f"world={world} failed (rc={proc.returncode}):\n{errs or proc.stderr[-5000:]}"
    # the FSDP2 job's checkpoint, saved at this world size, loads at world size 1 into a plain model
    import torch.distributed.checkpoint as dcp

    ref = _fsdp_model()
    _fsdp_step(ref, _fsdp_data())
    plain = _fsdp_model()
    sd = plain.state_dict()
    for v in sd.values():
        if v.is_floating_point():
            v.zero_()
    dcp.load(sd, checkpoint_id=ckpt)
    plain.load_state_dict(sd)
    for (n, a), b in zip(plain.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), f"DCP world={world} -> 1: {n}"
    x = _fsdp_data()
    assert torch.allclose(plain(x), ref(x), rtol=1e-5, atol=1e-6)
    if source:
        assert open(ckpt + ".cross").read() == source, f"world={world}: the world-2 checkpoint was not loaded"


def test_shard_bounds():
    from sparsekit.distributed import shard_bounds

    assert shard_bounds(100, 4, 8) == [(0, 32), (32, 56), (56, 80), (80, 100)]
    assert shard_bounds(64, 2, 32, splits=[32, 32]) == [(0, 32), (32, 64)]
    with pytest.raises(ValueError, match="layer.0: cannot split K=64 at 40: .*multiples of 32 \\(int4 groups\\)"):
        shard_bounds(64, 2, 32, name="layer.0", dim="K", constraint="int4 groups", splits=[40, 24])
    with pytest.raises(ValueError, match="only 1 piece"):
        shard_bounds(64, 2, 64, name="q", dim="K")
    with pytest.raises(ValueError, match="sum to"):
        shard_bounds(64, 2, 8, splits=[8, 8])


def test_split_layers_arguments():
    """split_layers needs a process group; a bad value names the argument (no process group needed to check)."""
    from torch import nn

    from sparsekit.convert import quantize_
    from sparsekit.distributed import split_enabled
    from sparsekit.prune import prune_model_
    from sparsekit.schemes import Int4Params

    batches = [torch.randn(4, 32)]
    with pytest.raises(ValueError, match="split_layers=True .* process_group="):
        prune_model_(nn.Sequential(nn.Linear(32, 16)), batches, method="sparsegpt", split_layers=True, progress=False)
    with pytest.raises(ValueError, match="split_layers=True .* process_group="):
        quantize_(nn.Sequential(nn.Linear(32, 16)), Int4Params(method="gptq", group_size=32), calib=batches,
                  progress=False, split_layers=True)
    with pytest.raises(TypeError, match="split_layers must be None, True or False, got 'yes'"):
        split_enabled("yes", None, ["gptq"])
    assert split_enabled(None, None, ["gptq"]) is False and split_enabled(False, None, ["gptq"]) is False


def test_split_payload_encoding():
    """The JSON header + byte buffer of a split broadcast round-trips results bit for bit (the encoder alone)."""
    from sparsekit.distributed.split import _bytes_of, _decode, _encode, _specs
    from sparsekit.quant import rtn_quantize

    torch.manual_seed(0)
    res = rtn_quantize(torch.randn(8, 64), 32, False, 4)
    obj = {"r": (res, torch.rand(3, 5) > 0.5, None, 2.5), "w": torch.randn(4, 4, dtype=torch.float64).half()}
    tensors = []
    spec = _encode(obj, tensors)
    import json

    spec = json.loads(json.dumps(spec))
    buf = torch.cat([_bytes_of(t) for t in tensors])
    out, off = [], 0
    for shape, dt in _specs(spec, []):
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dt).element_size()
        out.append(buf[off:off + n].clone().view(dt).reshape(shape))
        off += n
    back = _decode(spec, out)
    r2, mask, none, num = back["r"]
    assert type(r2) is type(res) and none is None and num == 2.5 and torch.equal(mask, obj["r"][1])
    for f in ("q", "scales", "zeros"):
        assert torch.equal(getattr(r2, f), getattr(res, f)) and getattr(r2, f).dtype == getattr(res, f).dtype
    assert (r2.group_size, r2.symmetric, r2.bits) == (res.group_size, res.symmetric, res.bits)
    assert torch.equal(back["w"], obj["w"]) and back["w"].dtype == torch.float16
    with pytest.raises(TypeError, match="cannot broadcast a object"):
        _encode(object(), [])


def test_requires_initialized_group():
    from torch import nn

    from sparsekit.distributed import shard_module

    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(RuntimeError, match="not initialized"):
        shard_module(nn.Linear(8, 8), None, "colwise")


if __name__ == "__main__":
    import torch.multiprocessing as mp

    _world, _port, _err = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    # import everything and run one op (which imports torch's compiler stack, ~5 s of CPU) once here, then
    # fork: the ranks inherit the imported modules instead of paying for them each (single-threaded parent,
    # no process group yet, so forking is safe)
    torch.set_num_threads(1)
    os.environ["SPARSEKIT_NO_CUDA_EXT"] = "1"
    import sparsekit.compress  # noqa: F401
    import sparsekit.distributed  # noqa: F401
    from torch import nn

    from sparsekit.nn import SparseLinear

    _warm = SparseLinear.from_dense(nn.Linear(8, 8))
    _warm.backend = "reference"
    _warm(torch.randn(2, 8))
    mp.start_processes(_job, args=(_world, _port, _err), nprocs=_world, join=True, start_method="fork")
