"""Seeded adversarial cases for model conversion: ``sparsify_``, ``quantize_`` and ``compress`` on random small
models (nested containers, shared modules, tied weights, frozen layers, eval/train mixes, a bad last layer, random
include/exclude selections).

Every case is classified against an oracle written independently of the conversion code:

* clear-error: a ValueError/TypeError whose message names the layer (or the argument), and the model exactly as
  it was (same module objects at every name, bitwise-equal state_dict, requires_grad and training flags);
* correct-result: every selected layer replaced (shared ones by one object at every name), every other module the
  same object, frozen parameters frozen, modes kept, the compressed weights equal to the scheme applied to the
  original weights, and the model output within the dtype's bound of float64 dense math on those weights.

Anything else (an error of another type or without the name, a bad input accepted, a wrong output, a half
converted model) fails the test.  ``classify`` is the only place that decides; it can be swapped for a shared
harness's classifier with the same contract.
"""
from __future__ import annotations

import copy
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch
from torch import nn

from sparsekit import BlockSparseConfig, Int4Config, Sparse24Config, quantize_, sparsify_
from sparsekit.compress import compress
from sparsekit.formats.block_sparse import BlockSparseWeight
from sparsekit.formats.int4 import Int4Weight
from sparsekit.nn import BlockSparseLinear, QLinear, SparseLinear, SparseQLinear
from sparsekit.prune import is_2to4, mask_2to4
from sparsekit.testing import REL_TOL, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

SEED = 13_000
N_SPARSE24 = 60
N_BLOCK = 40
N_INT4 = 45
N_COMPRESS = 45
INTERPRET_EVERY = 15          # every 15th case forces the interpret backend (Triton kernels on CPU; slower)


# ----------------------------------------------------------------------------- classifier
CLEAR_ERRORS = (ValueError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
GOOD = ("clear-error", "correct-result")


@dataclass
class Outcome:
    case: str
    kind: str      # clear-error | correct-result | unclear-error | silent-wrong | wrong-rejection
    detail: str = ""


def classify(case: str, run: Callable, expect: str, mentions=(), after_error: Optional[Callable] = None,
             check: Optional[Callable] = None) -> Outcome:
    """Run one case.  ``expect``: "error", "ok" or "either"; ``mentions``: the error message must contain one
    of these; ``after_error()`` / ``check(result)`` raise AssertionError when the state / result is wrong."""
    try:
        result = run()
    except CLEAR_ERRORS as e:
        msg = " ".join(str(e).split())
        if not msg:
            return Outcome(case, "unclear-error", f"{type(e).__name__} without a message")
        if mentions and not any(m in msg for m in mentions):
            return Outcome(case, "unclear-error", f"{type(e).__name__} names none of {list(mentions)}: {msg}")
        if after_error is not None:
            try:
                after_error()
            except AssertionError as a:
                return Outcome(case, "silent-wrong", f"failed with {msg!r} but changed the state: {a}")
        if expect == "ok":
            return Outcome(case, "wrong-rejection", f"{type(e).__name__}: {msg}")
        return Outcome(case, "clear-error", msg)
    except Exception as e:  # noqa: BLE001 - every other exception is an unclear error
        return Outcome(case, "unclear-error", f"{type(e).__name__}: {' '.join(str(e).split())}")
    if expect == "error":
        return Outcome(case, "silent-wrong", "bad input accepted")
    if check is not None:
        try:
            check(result)
        except AssertionError as a:
            return Outcome(case, "silent-wrong", str(a))
    return Outcome(case, "correct-result")


def summarize(outcomes: list, min_cases: int) -> None:
    counts = Counter(o.kind for o in outcomes)
    print(f"\n{len(outcomes)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    bad = [o for o in outcomes if o.kind not in GOOD]
    assert len(outcomes) >= min_cases
    assert not bad, "\n".join(f"{o.case}: {o.kind}: {o.detail}" for o in bad[:20])
    assert counts["clear-error"] and counts["correct-result"], counts


# ----------------------------------------------------------------------------- random models
DIMS = (8, 16, 24, 32, 40, 48, 64)
ODD_DIMS = (1, 13, 37)          # 2:4 pads K to a multiple of 8, block-sparse to the block size
BAD_KINDS = ("nan", "k60", "k40", "zero_out", "meta", "tie_embed", "tie_linear", "bad_mask")


class Net(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x)


@dataclass
class Case:
    model: Net
    d_in: int
    dtype: torch.dtype
    bad: Optional[str]
    last: nn.Linear                 # the (possibly bad) last layer
    tied: list = field(default_factory=list)   # module objects whose weight is tied to another module's


def random_model(rng: random.Random, dtype, bad_kinds, int4=False) -> Case:
    n = rng.randint(1, 3)
    pool = (32, 64) if int4 and rng.random() < 0.7 else DIMS + (() if int4 else ODD_DIMS)
    dims = [rng.choice(pool) for _ in range(n + 1)]
    bad = rng.choice(bad_kinds) if bad_kinds and rng.random() < 0.5 else None
    if bad == "k60":
        dims[-2] = 60
    elif bad == "k40":
        dims[-2] = 40
    if bad == "zero_out":
        dims[-1] = 0
    layers = []
    shared_at = rng.randrange(n) if rng.random() < 0.35 else None
    for i in range(n):
        last = i == n - 1
        dev = "meta" if last and bad == "meta" else None
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=rng.random() < 0.8, dtype=dtype, device=dev))
        if i == shared_at and not last:
            s = nn.Linear(dims[i + 1], dims[i + 1], dtype=dtype)
            layers += [nn.ReLU(), s, nn.ReLU(), s]
        if not last:
            layers.append(nn.ReLU())
    if len(layers) >= 3 and rng.random() < 0.4:      # nest the first layers in a sub-container
        k = rng.randint(2, len(layers) - 1)
        layers = [nn.Sequential(*layers[:k])] + layers[k:]
    body = nn.Sequential(*layers)
    model = Net(body)
    lin = [m for m in body.modules() if type(m) is nn.Linear]
    last = lin[-1]
    for m in {id(m): m for m in lin}.values():
        r = rng.random()
        if r < 0.2:
            m.requires_grad_(False)
        elif r < 0.3:
            m.weight.requires_grad_(False)
    if rng.random() < 0.5:
        model.eval()
        if rng.random() < 0.3:
            rng.choice(lin).train()
    tied = []
    if bad == "nan":
        with torch.no_grad():
            last.weight[rng.randrange(last.out_features), rng.randrange(last.in_features)] = \
                rng.choice((float("nan"), float("inf"), -float("inf")))
    elif bad == "tie_embed":
        model.side = nn.Embedding(last.out_features, last.in_features, dtype=dtype)
        model.side.weight = last.weight
        tied = [last]
    elif bad == "tie_linear":
        model.side = nn.Linear(last.in_features, last.out_features, dtype=dtype)
        model.side.weight = last.weight
        tied = [last, model.side]
    return Case(model, dims[0], dtype, bad, last, tied)


def paths(model):
    """{id: (module, [names])} by torch's own traversal (the oracle does not use sparsekit's)."""
    out = {}
    for name, m in model.named_modules(remove_duplicate=False):
        out.setdefault(id(m), (m, []))[1].append(name)
    return out


def snapshot(model):
    return (list(model.named_modules(remove_duplicate=False)),
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            [(n, m.training) for n, m in model.named_modules()])


def same_bits(a, b) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.device.type == "meta" or a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_unchanged(model, snap):
    mods, sd, req, train = snap
    now = list(model.named_modules(remove_duplicate=False))
    assert [n for n, _ in now] == [n for n, _ in mods], "module names changed"
    for (n, a), (_, b) in zip(now, mods):
        assert a is b, f"module {n!r} was replaced"
    cur = model.state_dict()
    assert cur.keys() == sd.keys(), "state_dict keys changed"
    for k in sd:
        assert same_bits(cur[k], sd[k]), f"{k!r} changed"
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == req, "requires_grad changed"
    assert [(n, m.training) for n, m in model.named_modules()] == train, "training flags changed"


def dense64(model):
    """A float64 copy of ``model`` with every compressed module replaced by an nn.Linear of its dense weight."""
    ref = copy.deepcopy(model)
    done = {}
    for name, m in list(ref.named_modules(remove_duplicate=False)):
        if isinstance(m, (SparseLinear, BlockSparseLinear, QLinear, SparseQLinear)):
            if id(m) not in done:
                lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=torch.float64)
                with torch.no_grad():
                    lin.weight.copy_(m.weight.detach().double())
                    if m.bias is not None:
                        lin.bias.copy_(m.bias.detach().double())
                done[id(m)] = lin
            parent_name, _, attr = name.rpartition(".")
            ref.get_submodule(parent_name)._modules[attr] = done[id(m)]
    return ref.double()


def check_output(model, d_in, dtype, n_layers):
    x = torch.randn(5, d_in, dtype=dtype)
    with torch.no_grad():
        out = model(x)
        ref = dense64(model)(x.double())
    assert out.shape == ref.shape, f"output shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    bound = REL_TOL[dtype] * (2 + 2 * n_layers)
    assert bool(torch.isfinite(out).all()), "non-finite output from finite weights and inputs"
    e = rel_err(out, ref)
    assert e <= bound, f"relative error {e:.2e} vs float64 dense > {bound:.1e}"


# ----------------------------------------------------------------------------- the oracle
def oracle(case: Case, selected: Callable[[str, nn.Module], bool], layer_bad: Callable[[nn.Linear], bool],
           exact_type=True):
    """(expect, mentions, targets) for converting ``case.model`` with ``selected`` and per-layer ``layer_bad``."""
    targets, problems = [], []
    for m, names in paths(case.model).values():
        is_lin = type(m) is nn.Linear if exact_type else isinstance(m, nn.Linear)
        if not is_lin:
            continue
        sel = [selected(n, m) for n in names]
        if any(sel) and not all(sel):
            problems.append(("shared", names))
        elif all(sel):
            targets.append((m, names))
    for m, names in targets:
        if m in case.tied or layer_bad(m) or (case.bad in ("nan", "zero_out", "meta") and m is case.last):
            problems.append(("layer", names))
    if problems:
        mentions = []
        for kind, names in problems:
            mentions += ["shared"] if kind == "shared" else [f"layer {n!r}" for n in names]
        return "error", tuple(mentions), targets
    return "ok", (), targets


def check_converted(case: Case, before: dict, targets, cls, expected_weight: Callable, n_layers: int,
                    model=None, backend_dtype=None, check_modes=True):
    """The correct-result checks (see the module docstring)."""
    model = case.model if model is None else model
    target_ids = {id(m) for m, _ in targets}
    now = dict(model.named_modules(remove_duplicate=False))
    for old, names in before.values():
        if id(old) in target_ids:
            new = now[names[0]]
            assert isinstance(new, cls), f"{names[0]!r} is {type(new).__name__}, not {cls.__name__}"
            for n in names:
                assert now[n] is new, f"shared module not shared after conversion: {names}"
            assert not check_modes or new.training == old.training, f"{names[0]!r}: training flag not kept"
            for pn, p in new.named_parameters():
                src = old.bias if pn == "bias" else old.weight
                if not src.requires_grad:
                    assert not p.requires_grad, f"{names[0]!r}.{pn}: a frozen parameter became trainable"
            want = expected_weight(old, names[0])
            if want is not None:
                got = new.weight.detach().double()
                assert got.shape == want.shape and torch.equal(got, want.double()), \
                    f"{names[0]!r}: compressed weight differs from the scheme applied to the original"
        else:
            for n in names:
                if n in now:
                    assert now[n] is old, f"{n!r} was not selected but was replaced"
    if case.bad not in ("nan", "meta"):    # a left-out NaN / meta layer makes the output meaningless
        check_output(model, case.d_in, backend_dtype or case.dtype, n_layers)


def selection(rng, case):
    """A random (config kwargs, filter_fn, selected(name, module)) triple."""
    names = [n for n, m in case.model.named_modules(remove_duplicate=False) if type(m) is nn.Linear]
    r = rng.random()
    if r < 0.45 or not names:
        return {}, None, lambda n, m: True
    if r < 0.7:
        pat = "^" + re.escape(rng.choice(names)) + "$"
        return {"exclude": pat}, None, lambda n, m: re.search(pat, n) is None
    if r < 0.85:
        pat = r"^body\.0"
        return {"include": pat}, None, lambda n, m: re.search(pat, n) is not None
    k = rng.choice([m.in_features for m in case.model.modules() if type(m) is nn.Linear])
    fn = (lambda m, n: m.in_features != k)
    return {}, fn, lambda n, m: m.in_features != k


def n_linear(model):
    return sum(1 for m in model.modules() if isinstance(m, (nn.Linear, SparseLinear, BlockSparseLinear, QLinear,
                                                             SparseQLinear)))


# ----------------------------------------------------------------------------- sparsify_ / quantize_
def _run_convert(i, rng, scheme):
    int4 = scheme == "int4"
    dtype = torch.float16 if int4 else torch.float32
    case = random_model(rng, dtype, BAD_KINDS if scheme == "block" else BAD_KINDS[:-1], int4=int4)
    sel_kw, filter_fn, selected = selection(rng, case)
    backend = "interpret" if i % INTERPRET_EVERY == 0 else rng.choice((None, "reference"))
    per_layer, bad_mask_names = {}, ()
    if scheme == "2:4":
        cfg = Sparse24Config(backend=backend, **sel_kw)
        cls = SparseLinear

        def expected_weight(old, name):
            w = old.weight.detach()
            return w * mask_2to4(w)

        def layer_bad(m):
            return False
    elif scheme == "block":
        bs = (rng.choice((16, 32)), rng.choice((16, 32)))
        sp = rng.choice((0.0, 0.25, 0.5, 0.75, 1.0))
        if case.bad == "bad_mask":
            bad_mask_names = tuple(paths(case.model)[id(case.last)][1])
            per_layer = {bad_mask_names[0]: torch.ones(7, 5, dtype=torch.bool)}
        cfg = BlockSparseConfig(block_size=bs, sparsity=sp, per_layer=per_layer, backend=backend, **sel_kw)
        cls = BlockSparseLinear

        def expected_weight(old, name):
            w = old.weight.detach()
            mask = BlockSparseWeight.magnitude_block_mask(w, bs, sp)
            full = mask.repeat_interleave(bs[0], 0).repeat_interleave(bs[1], 1)[: w.shape[0], : w.shape[1]]
            return w * full

        def layer_bad(m):
            return m is case.last and case.bad == "bad_mask"
    else:
        gs = rng.choice((32, 64, 128, -1))
        sym = rng.random() < 0.5
        cfg = Int4Config(group_size=gs, symmetric=sym, backend=backend, **sel_kw)
        cls = QLinear

        def expected_weight(old, name):
            return Int4Weight.from_float(old.weight.detach(), gs, sym).dequantize()

        def layer_bad(m):
            k = m.in_features
            return k % 8 != 0 or (gs != -1 and k % gs != 0)
    expect, mentions, targets = oracle(case, selected, layer_bad)
    if per_layer and not any(id(m) == id(case.last) for m, _ in targets) and expect == "ok":
        expect, mentions = "error", ("not converted",)       # per_layer names a layer that is left out
    before = paths(case.model)
    snap = snapshot(case.model)
    fn = quantize_ if int4 else sparsify_
    return classify(f"{scheme}#{i} bad={case.bad} sel={sel_kw or ('filter' if filter_fn else 'all')}",
                    lambda: fn(case.model, cfg, filter_fn=filter_fn, progress=False), expect, mentions,
                    after_error=lambda: assert_unchanged(case.model, snap),
                    check=lambda _: check_converted(case, before, targets, cls, expected_weight,
                                                    n_linear(case.model)))


@pytest.mark.parametrize("scheme,count", [("2:4", N_SPARSE24), ("block", N_BLOCK), ("int4", N_INT4)])
def test_fuzz_sparsify_quantize(scheme, count):
    rng = random.Random(f"{SEED}-{scheme}")
    torch.manual_seed(SEED)
    outcomes = [_run_convert(i, rng, scheme) for i in range(count)]
    summarize(outcomes, count)


# ----------------------------------------------------------------------------- compress
def _run_compress(i, rng):
    scheme = rng.choice(("2:4", "block", "int4", "2:4+int4"))
    method = rng.choice({"2:4": ("magnitude", "wanda", "sparsegpt"), "block": ("magnitude",),
                         "int4": ("rtn", "gptq", "awq"), "2:4+int4": ("magnitude", "sparsegpt")}[scheme])
    case = random_model(rng, torch.float32, ("nan", "k60", "k40", "zero_out", "meta", "tie_embed"),
                        int4=scheme == "int4")
    calib = [torch.randn(8, case.d_in) for _ in range(2)]
    kwargs, group = {}, None
    if scheme == "block":
        kwargs = {"block_size": rng.choice((16, 32)), "sparsity": rng.choice((0.25, 0.5))}
    elif scheme in ("int4", "2:4+int4") and rng.random() < 0.5:
        group = kwargs["group_size"] = rng.choice((32, 64, -1))
    names_all = [n for n, m in case.model.named_modules(remove_duplicate=False) if isinstance(m, nn.Linear)]
    layers = None
    if rng.random() < 0.3 and len(names_all) > 1:
        layers = rng.sample(names_all, rng.randint(1, len(names_all)))

    def selected(n, m):
        return layers is None or n in layers

    lin_objs = [m for m, names in paths(case.model).values() if isinstance(m, nn.Linear) and all(map(
        lambda n: selected(n, m), names))]

    def layer_bad(m):
        k = m.in_features
        if scheme == "int4":
            ks = [x.in_features for x in lin_objs]
            gs = group if group is not None else next((g for g in (128, 64, 32) if all(q % g == 0 for q in ks)), -1)
            return k % 8 != 0 or (gs != -1 and k % gs != 0)
        if scheme == "2:4+int4" and group not in (None, -1):
            kc = (k + 15) // 16 * 8
            return kc % group != 0
        return False

    expect, mentions, targets = oracle(case, selected, layer_bad, exact_type=False)
    # a calibrated method needs every selected layer on the forward path (the side Linear of a tie is not)
    before = paths(case.model)
    snap = snapshot(case.model)
    cls = {"2:4": SparseLinear, "block": BlockSparseLinear, "int4": QLinear, "2:4+int4": SparseQLinear}[scheme]

    def expected_weight(old, name):
        w = old.weight.detach()
        if scheme == "2:4" and method == "magnitude":
            return w * mask_2to4(w)
        if scheme == "block":
            bs = kwargs["block_size"]
            mask = BlockSparseWeight.magnitude_block_mask(w, (bs, bs), kwargs["sparsity"])
            return w * mask.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[: w.shape[0], : w.shape[1]]
        return None

    def check(result):
        out, rep = result
        assert_unchanged(case.model, snap)                    # the input model is never modified
        assert rep["scheme"] == scheme and rep["method"] == method
        assert sorted(rep["layers"]) == sorted(names[0] for _, names in targets)
        now = dict(out.named_modules(remove_duplicate=False))
        for old, names in targets:
            new = now[names[0]]
            w = new.weight.detach().float()
            if scheme in ("2:4", "2:4+int4"):
                assert is_2to4(w), f"{names[0]!r} is not 2:4"
            ref = old.weight.detach().float()
            if scheme == "2:4" and method == "wanda":          # a mask of the original weight
                assert torch.equal(w, ref * (w != 0)), f"{names[0]!r}: wanda changed kept weights"
            elif method != "sparsegpt" and scheme in ("int4", "2:4+int4"):   # int4 rounding error only
                e = rel_err(w, ref * (w != 0) if scheme == "2:4+int4" else ref)
                assert e < 0.3, f"{names[0]!r}: weight error {e:.2f} against the original"
        all_converted = not any(isinstance(m, nn.Linear) for m in out.modules())
        dt = torch.float16 if scheme == "int4" else torch.float32
        if scheme != "int4" or all_converted:
            check_converted(case, {id(o): (o, list(n)) for o, n in targets}, targets, cls, expected_weight,
                            n_linear(out), model=out, backend_dtype=dt, check_modes=False)
            assert not out.training, "compress returns an eval-mode model"

    def run():
        return compress(case.model, calib, scheme, method, layers=layers, speed="off", inplace=False, **kwargs)

    return classify(f"compress#{i} {scheme}/{method} bad={case.bad} layers={layers} {kwargs}", run, expect,
                    mentions, after_error=lambda: assert_unchanged(case.model, snap), check=check)


def test_fuzz_compress():
    rng = random.Random(f"{SEED}-compress")
    torch.manual_seed(SEED + 1)
    outcomes = [_run_compress(i, rng) for i in range(N_COMPRESS)]
    summarize(outcomes, N_COMPRESS)


# ----------------------------------------------------------------------------- save_compressed / load_compressed
N_LOAD = 130
N_SAVE = 24


def _structures():
    """name -> make(seed) building a small model of that structure (same structure for every seed)."""
    def mlp(seed, dtype=torch.float32, shared=False):
        torch.manual_seed(seed)
        s = nn.Linear(24, 24, dtype=dtype)
        layers = [nn.Linear(32, 24, dtype=dtype), nn.ReLU()] + ([s, nn.ReLU(), s, nn.ReLU()] if shared else []) + \
            [nn.Linear(24, 16, dtype=dtype)]
        return Net(nn.Sequential(*layers))

    def tied(seed):
        m = mlp(seed)
        m.side = nn.Embedding(16, 24)
        m.side.weight = m.body[2].weight
        return m

    def sq(seed):
        m = mlp(seed)
        for i in (0, 2):
            m.body[i] = SparseQLinear.from_dense(m.body[i], group_size=-1)
        return m

    def awq(seed):
        m = mlp(seed, torch.float16)
        torch.manual_seed(seed + 100)
        x = torch.randn(32, 32, dtype=torch.float16)
        m.body[0] = QLinear.from_float(m.body[0], group_size=32, method="awq", calib_inputs=x)
        return m

    return {
        "dense": lambda s: mlp(s),
        "dense_shared": lambda s: mlp(s, shared=True),
        "tied": tied,
        "2:4": lambda s: sparsify_(mlp(s, shared=True), "2:4", progress=False),
        "block": lambda s: sparsify_(mlp(s), BlockSparseConfig(block_size=(16, 16), sparsity=0.5), progress=False),
        "int4": lambda s: quantize_(mlp(s, torch.float16), Int4Config(group_size=-1), progress=False),
        "int4_sym_shared": lambda s: quantize_(mlp(s, torch.float16, shared=True),
                                               Int4Config(group_size=-1, symmetric=True), progress=False),
        "int4_awq": awq,
        "2:4+int4": sq,
    }


LOAD_OK = ("valid", "float_cast", "subset_nonstrict", "replace_float", "extra_nonstrict")
LOAD_ERR = ("truncate", "garbage", "empty", "huge_header", "bad_json", "pickle", "drop_key", "extra_key",
            "rename_key", "int_dtype", "float_to_int", "shape", "tie_mismatch", "swap", "dir", "under_file",
            "missing", "wrong_structure", "offsets")
LOAD_EITHER = ("header_byte",)


def _model_dtype(model):
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _block_key(model, key):
    """Keys of a BlockSparseLinear: their contents and shapes belong to the format's validator."""
    owner = key.rpartition(".")[0]
    try:
        return isinstance(model.get_submodule(owner), BlockSparseLinear)
    except AttributeError:
        return False


def _raw(path):
    import json
    import struct

    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, n, json.loads(raw[8:8 + n])


def _with_header(raw, n, header):
    import json
    import struct

    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + raw[8 + n:]


def _run_load(i, rng, pool, tmp):
    import os

    from safetensors.torch import load_file, save_file

    from sparsekit.compress import load_compressed, save_compressed

    name = rng.choice(sorted(pool))
    source, target0 = pool[name]
    target = copy.deepcopy(target0)
    kind = rng.choice(LOAD_OK) if rng.random() < 0.35 else rng.choice(LOAD_ERR + LOAD_EITHER)
    path = os.path.join(tmp, f"case{i}.safetensors")
    save_compressed(source, path)
    sd = {k: v.clone() for k, v in load_file(path).items()}
    keys = sorted(sd)
    strict = True
    expect = "error" if kind in LOAD_ERR else "ok" if kind in LOAD_OK else "either"
    mentions = ("load_compressed",)
    floats = [k for k in keys if sd[k].is_floating_point()]
    ints = [k for k in keys if not sd[k].is_floating_point()]
    if kind == "valid":
        pass
    elif kind == "float_cast":
        dt = rng.choice((torch.float64, torch.float32, torch.float16, torch.bfloat16))
        sd = {k: v.to(dt) if v.is_floating_point() else v for k, v in sd.items()}
        save_file(sd, path)
    elif kind in ("subset_nonstrict", "extra_nonstrict"):
        strict = False
        if kind == "subset_nonstrict":     # whole modules left out, so what is loaded stays consistent
            owners = sorted({k.rpartition(".")[0] for k in keys})
            drop = set(rng.sample(owners, rng.randint(1, len(owners))))
            sd = {k: v for k, v in sd.items() if k.rpartition(".")[0] not in drop}
        else:
            sd["body.99.weight"] = torch.randn(3, 3)
        save_file(sd, path)
    elif kind == "replace_float":
        cands = [k for k in floats if k.rpartition(".")[2] in ("weight", "bias", "values", "blocks")]
        k = rng.choice(cands)
        sd[k] = torch.randn(sd[k].shape).to(sd[k].dtype)
        for other in keys:   # keep the names of one shared tensor identical
            if other != k and source.state_dict()[other].data_ptr() == source.state_dict()[k].data_ptr():
                sd[other] = sd[k].clone()
        save_file(sd, path)
    elif kind == "truncate":
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[: rng.randrange(len(raw))])
    elif kind == "garbage":
        open(path, "wb").write(bytes(rng.randrange(256) for _ in range(rng.randint(1, 400))))
    elif kind == "empty":
        open(path, "wb").write(b"")
    elif kind == "huge_header":
        import struct

        raw = open(path, "rb").read()
        open(path, "wb").write(struct.pack("<Q", rng.choice((1 << 40, 1 << 62, len(raw) + 1))) + raw[8:])
    elif kind == "bad_json":
        raw, n, _ = _raw(path)
        open(path, "wb").write(raw[:8] + b"[" + raw[9:8 + n] + raw[8 + n:])
    elif kind == "offsets":
        raw, n, header = _raw(path)
        k = rng.choice(keys)
        a, b = header[k]["data_offsets"]
        header[k]["data_offsets"] = rng.choice(([a, b + 4], [b, a], [a, 10 ** 12], [-1, b]))
        open(path, "wb").write(_with_header(raw, n, header))
    elif kind == "header_byte":
        raw, n, _ = _raw(path)
        pos = 8 + rng.randrange(n)
        b = bytearray(raw)
        b[pos] ^= 1 << rng.randrange(8)
        open(path, "wb").write(bytes(b))
    elif kind == "pickle":
        torch.save(source.state_dict(), path)
    elif kind == "drop_key":
        sd.pop(rng.choice(keys))
        save_file(sd, path)
    elif kind == "extra_key":
        sd[rng.choice(("body.9.weight", "side.bias", keys[0] + "_x"))] = torch.zeros(2)
        save_file(sd, path)
    elif kind == "rename_key":
        k = rng.choice(keys)
        sd[k.replace(".", "._", 1)] = sd.pop(k)
        save_file(sd, path)
    elif kind == "int_dtype":
        if not ints:
            kind, expect = "float_to_int", "error"
        else:
            k = rng.choice(ints)
            choices = [d for d in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float32)
                       if d != sd[k].dtype]
            sd[k] = sd[k].to(rng.choice(choices))
            save_file(sd, path)
    if kind == "float_to_int":
        k = rng.choice(floats)
        sd[k] = sd[k].to(torch.int32)
        save_file(sd, path)
    elif kind == "shape":
        cands = [k for k in keys if not _block_key(source, k) and sd[k].dim() >= 1]
        if not cands:     # every tensor belongs to a BlockSparseLinear (whose shapes its validator checks)
            kind = "drop_key"
            sd.pop(rng.choice(keys))
        else:
            k = rng.choice(cands)
            t = sd[k]
            sd[k] = torch.cat([t, t[:1]]) if rng.random() < 0.5 or t.shape[0] < 2 else t[:-1]
        save_file(sd, path)
    elif kind == "tie_mismatch":
        ssd = source.state_dict()
        pairs = [(a, b) for a in keys for b in keys if a < b and ssd[a].numel()
                 and ssd[a].data_ptr() == ssd[b].data_ptr() and ssd[a].shape == ssd[b].shape]
        if not pairs:
            kind, expect = "drop_key", "error"
            sd.pop(rng.choice(keys))
        else:
            a, b = rng.choice(pairs)
            sd[b] = sd[b] + 1 if sd[b].is_floating_point() else sd[b] ^ 1
        save_file(sd, path)
    elif kind == "swap":
        pairs = [(a, b) for a in keys for b in keys if a < b and (sd[a].shape != sd[b].shape or
                                                                    sd[a].dtype != sd[b].dtype)]
        a, b = rng.choice(pairs)
        sd[a], sd[b] = sd[b], sd[a]
        save_file(sd, path)
    elif kind == "dir":
        path = tmp
    elif kind == "under_file":
        path = os.path.join(path, "model.safetensors")
    elif kind == "missing":
        path = os.path.join(tmp, f"missing{i}.safetensors")
    elif kind == "wrong_structure":
        others = [n for n in pool if pool[n][0].state_dict().keys() != source.state_dict().keys()]
        save_compressed(pool[rng.choice(sorted(others))][0], path)

    snap = snapshot(target)
    x = torch.randn(4, 32, dtype=_model_dtype(source))

    def check(_):
        file_sd = load_file(path)
        cur = target.state_dict()
        for k, v in file_sd.items():
            if k in cur:
                assert same_bits(cur[k], v.to(cur[k].dtype)), f"{k!r} is not what the file holds"
        if not strict:
            loaded_ptrs = {cur[k].data_ptr() for k in file_sd if k in cur}
            for k in cur:     # untouched unless it is another name of a loaded tensor (shared module)
                if k not in file_sd and cur[k].data_ptr() not in loaded_ptrs:
                    assert same_bits(cur[k], snap[1][k]), f"{k!r} changed although the file lacks it"
        with torch.no_grad():
            if kind == "valid":
                assert same_bits(target(x), source(x)), "a valid file did not reproduce the source's output"
            out = target(x)
            ref = dense64(target)(x.double())
        e = rel_err(out, ref)
        assert e <= REL_TOL[x.dtype] * 8, f"output vs float64 dense of the loaded weights: {e:.2e}"

    case = f"load#{i} {name}/{kind} strict={strict}"
    return classify(case, lambda: load_compressed(target, path, strict=strict), expect, mentions,
                    after_error=lambda: assert_unchanged(target, snap), check=check)


def _run_save(i, rng, pool, tmp):
    import os

    from safetensors.torch import load_file

    from sparsekit.compress import save_compressed

    name = rng.choice(sorted(pool))
    source = pool[name][0]
    kind = rng.choice(("ok", "ok_nested", "ok_report", "dir", "under_file", "report_type", "report_clash",
                       "extra_state", "meta", "path_type"))
    path = os.path.join(tmp, f"save{i}", "m.safetensors")
    model, report, expect, mentions = source, None, "error", ("save_compressed",)
    if kind == "ok":
        expect = "ok"
    elif kind == "ok_nested":
        path = os.path.join(tmp, f"save{i}", "a", "b", "model.safetensors")
        expect = "ok"
    elif kind == "ok_report":
        report, expect = {"scheme": name, "n": i}, "ok"
    elif kind == "dir":
        os.makedirs(path)
    elif kind == "under_file":
        os.makedirs(os.path.dirname(path))
        open(os.path.join(os.path.dirname(path), "f"), "w").write("x")
        path = os.path.join(os.path.dirname(path), "f", "m.safetensors")
    elif kind == "report_type":
        report = ["not", "a", "dict"]
    elif kind == "report_clash":
        path, report = os.path.join(tmp, f"save{i}", "m.json"), {"a": 1}
    elif kind == "extra_state":
        class Extra(nn.Linear):
            def get_extra_state(self):
                return "state"

            def set_extra_state(self, state):
                pass

        model = nn.Sequential(Extra(4, 4))
    elif kind == "meta":
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(4, 4))
    elif kind == "path_type":
        path = rng.choice((None, 3, b"", ""))

    def check(result):
        wpath, rpath = result
        got = load_file(wpath)
        want = model.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            assert same_bits(got[k], want[k].contiguous()), f"{k!r} saved wrong"
        assert (rpath is None) == (report is None)
        d = os.path.dirname(os.path.abspath(wpath))
        assert not [f for f in os.listdir(d) if f.endswith(".tmp")], "temporary files left behind"

    before = sorted(os.listdir(tmp))
    return classify(f"save#{i} {name}/{kind}", lambda: save_compressed(model, path, report), expect, mentions,
                    after_error=lambda: None if kind in ("dir", "under_file") else
                    _assert_no_new_files(tmp, before, i), check=check)


def _assert_no_new_files(tmp, before, i):
    import os

    new = sorted(set(os.listdir(tmp)) - set(before))
    for d in new:
        for root, _, files in os.walk(os.path.join(tmp, d)):
            assert not files, f"a failed save left files: {files}"


def test_fuzz_save_load(tmp_path):
    pytest.importorskip("safetensors")
    torch.manual_seed(SEED + 2)
    pool = {name: (make(1), make(2)) for name, make in _structures().items()}
    rng = random.Random(f"{SEED}-load")
    outcomes = [_run_load(i, rng, pool, str(tmp_path)) for i in range(N_LOAD)]
    rng = random.Random(f"{SEED}-save")
    outcomes += [_run_save(i, rng, pool, str(tmp_path)) for i in range(N_SAVE)]
    summarize(outcomes, N_LOAD + N_SAVE)
