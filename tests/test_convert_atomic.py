"""All-or-nothing model conversion (sparsify_, quantize_, compress): validation before any swap, shared
modules, tied weights, requires_grad / training preserved, the plan/apply API."""
import copy

import pytest
import torch
from torch import nn

from sparsekit import BlockSparseConfig, Int4Config, Sparse24Config, quantize_, sparsify_
from sparsekit.compress import compress
from sparsekit.convert import ConversionPlan, find_targets, plan_conversion
from sparsekit.nn import BlockSparseLinear, QLinear, SparseLinear
from sparsekit.prune import mask_2to4
from sparsekit.testing import assert_close_rel


def _snapshot(model):
    """(module objects by name, state_dict clones, requires_grad, training) of a model."""
    return ({n: m for n, m in model.named_modules(remove_duplicate=False)},
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()})


def _assert_unchanged(model, snap):
    mods, sd, req, train = snap
    now = dict(model.named_modules(remove_duplicate=False))
    assert now.keys() == mods.keys()
    for n, m in mods.items():
        assert now[n] is m, f"module {n!r} was replaced"
    cur = model.state_dict()
    assert cur.keys() == sd.keys()
    for k, v in sd.items():
        assert cur[k].dtype == v.dtype and torch.equal(cur[k].view(-1).view(torch.uint8) if v.numel() else cur[k],
                                                       v.view(-1).view(torch.uint8) if v.numel() else v), f"{k!r} changed"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == req
    assert {n: m.training for n, m in model.named_modules()} == train


def _ref64(x, w, b):
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


def _mlp(*dims, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(dims) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


# ----------------------------------------------------------------------------- failures leave the model as it was
def test_quantize_bad_last_layer_leaves_model_unchanged():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(60, 8))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer '4'.*K=60"):
        quantize_(model, Int4Config(group_size=32), progress=False)
    _assert_unchanged(model, snap)


def test_quantize_gptq_bad_last_layer_fails_before_calibration():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 8)).half()

    class Calib:  # counts how often calibration reads the data
        reads = 0

        def __iter__(self):
            Calib.reads += 1
            return iter([torch.randn(8, 64).half()])

    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer '4'.*group_size 32 does not divide .*K=40"):
        quantize_(model, Int4Config(group_size=32, method="gptq", calib=Calib()), progress=False)
    assert Calib.reads == 0
    _assert_unchanged(model, snap)


def test_failure_while_building_leaves_model_unchanged():
    """A per-layer block mask of the wrong shape is only found when that (last) layer is built."""
    model = _mlp(40, 64, 32, 10)
    snap = _snapshot(model)
    bad_grid = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"layer '4'.*block_mask"):
        sparsify_(model, BlockSparseConfig(block_size=(16, 16), per_layer={"4": bad_grid}), progress=False)
    _assert_unchanged(model, snap)


def test_failure_during_calibration_leaves_weights_untouched():
    """GPTQ calibration whose forward fails on a batch: the layers already quantized are not kept."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).half()
    snap = _snapshot(model)
    calib = [torch.randn(8, 64).half(), torch.randn(8, 63).half()]  # second batch has the wrong K
    with pytest.raises(Exception):
        quantize_(model, Int4Config(group_size=32, method="gptq", calib=calib), progress=False)
    _assert_unchanged(model, snap)


def test_calibration_never_writes_the_original_weights():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).half()
    old = [model[0], model[2]]
    w0 = [m.weight.detach().clone() for m in old]
    quantize_(model, Int4Config(group_size=32, method="gptq", calib=[torch.randn(16, 64).half()]), progress=False)
    assert isinstance(model[0], QLinear) and isinstance(model[2], QLinear)
    for m, w in zip(old, w0):          # the replaced layers keep their float weights (not fake-quantized)
        assert torch.equal(m.weight, w)


def test_meta_zero_size_and_nonfinite_layers_are_clear_errors():
    meta = nn.Sequential(nn.Linear(64, 64, device="meta"))
    for fn in (lambda: sparsify_(meta, "2:4", progress=False), lambda: quantize_(meta, "int4", progress=False)):
        with pytest.raises(ValueError, match=r"layer '0'.*meta device"):
            fn()
    empty = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 0))
    snap = _snapshot(empty)
    with pytest.raises(ValueError, match=r"layer '1'.*out_features=0"):
        sparsify_(empty, "2:4", progress=False)
    _assert_unchanged(empty, snap)
    nan = _mlp(16, 16, 16)
    with torch.no_grad():
        nan[2].weight[3, 5] = float("nan")
    snap = _snapshot(nan)
    with pytest.raises(ValueError, match=r"layer '2'.*non-finite"):
        sparsify_(nan, "2:4", progress=False)
    _assert_unchanged(nan, snap)


def test_module_graph_cycle_is_a_clear_error():
    model = _mlp(16, 16)
    inner = nn.Sequential(nn.Linear(16, 16))
    model.add_module("inner", inner)
    inner.add_module("back", model)
    with pytest.raises(ValueError, match="cycle"):
        sparsify_(model, "2:4", progress=False)


# ----------------------------------------------------------------------------- shared modules and tied weights
@pytest.mark.parametrize("convert", ["2:4", "block", "int4"])
def test_shared_module_is_converted_once_and_stays_shared(convert):
    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), lin, nn.ReLU(), lin)
    if convert == "int4":
        model = model.half()
        quantize_(model, Int4Config(group_size=32, backend="reference"), progress=False)
        cls = QLinear
    elif convert == "block":
        sparsify_(model, BlockSparseConfig(block_size=(16, 16), sparsity=0.5), progress=False)
        cls = BlockSparseLinear
    else:
        sparsify_(model, "2:4", progress=False)
        cls = SparseLinear
    assert isinstance(model[2], cls) and model[2] is model[4]
    assert not any(type(m) is nn.Linear for m in model.modules())
    # the whole model against float64 dense math on the converted weights
    dtype = torch.float16 if convert == "int4" else torch.float32
    x = torch.randn(5, 32, dtype=dtype)
    ref = x.double()
    for m in model:
        ref = _ref64(ref, m.weight, m.bias) if isinstance(m, cls) else m(ref)
    assert_close_rel(model(x), ref, dtype=dtype)


def test_shared_module_selected_under_one_name_only_is_an_error():
    lin = nn.Linear(16, 16)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="shared"):
        sparsify_(model, Sparse24Config(exclude=r"^2$"), progress=False)
    with pytest.raises(ValueError, match="shared"):
        sparsify_(model, "2:4", filter_fn=lambda m, n: n == "0", progress=False)
    _assert_unchanged(model, snap)


def test_shared_module_per_layer_under_any_name():
    lin = nn.Linear(32, 32)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    sparsify_(model, BlockSparseConfig(block_size=(16, 16), per_layer={"2": 0.75}), progress=False)
    assert model[0] is model[2] and model[0].density == pytest.approx(0.25)
    lin = nn.Linear(32, 32)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    with pytest.raises(ValueError, match="different values"):
        sparsify_(model, BlockSparseConfig(block_size=(16, 16), per_layer={"0": 0.75, "2": 0.5}), progress=False)
    assert model[0] is lin


def test_tied_weights_raise_clearly():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 16)
            self.body = nn.Linear(16, 16)
            self.head = nn.Linear(16, 10, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'head'.*shares memory with embed.weight.*tied"):
        sparsify_(model, "2:4", progress=False)
    _assert_unchanged(model, snap)
    # leaving the tied layer out is fine, and the tie survives
    sparsify_(model, Sparse24Config(exclude="head"), progress=False)
    assert isinstance(model.body, SparseLinear) and model.head.weight is model.embed.weight
    # two linears sharing one weight tensor (not one module): raise, nothing converted
    a = nn.Linear(16, 16)
    b = nn.Linear(16, 16)
    b.weight = a.weight
    m2 = nn.Sequential(a, nn.ReLU(), b)
    snap = _snapshot(m2)
    with pytest.raises(ValueError, match="tied"):
        quantize_(m2.half(), Int4Config(group_size=16 * 2), progress=False)
    # a weight that is a view into another module's parameter counts as tied too
    big = nn.Linear(16, 32)
    view = nn.Linear(16, 16)
    view.weight = nn.Parameter(big.weight.data[:16])
    m3 = nn.Sequential(big, nn.ReLU(), nn.Linear(32, 16), view)
    with pytest.raises(ValueError, match=r"layer '0'.*shares memory with 3.weight"):
        sparsify_(m3, "2:4", progress=False)


# ----------------------------------------------------------------------------- requires_grad and training mode
def test_frozen_layers_stay_frozen_and_modes_are_kept():
    model = _mlp(32, 32, 32, 16)
    model[0].requires_grad_(False)          # frozen layer
    model[2].weight.requires_grad_(False)   # frozen weight, trainable bias
    model.eval()
    model[4].train()
    sparsify_(model, "2:4", progress=False)
    assert not model[0].values.requires_grad and not model[0].bias.requires_grad
    assert not model[2].values.requires_grad and model[2].bias.requires_grad
    assert model[4].values.requires_grad and model[4].bias.requires_grad
    assert not model[0].training and not model[2].training and model[4].training
    model2 = _mlp(32, 32, 16)
    model2.requires_grad_(False)
    sparsify_(model2, BlockSparseConfig(block_size=(16, 16)), progress=False)
    assert not any(p.requires_grad for p in model2.parameters())
    assert all(m.training for m in model2.modules())


def test_quantize_keeps_eval_mode_and_frozen_bias():
    model = _mlp(64, 32, 16).half()
    model.requires_grad_(False)
    model.eval()
    quantize_(model, Int4Config(group_size=32), progress=False)
    assert all(not m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- the plan / apply API
def test_plan_then_apply():
    model = _mlp(32, 32, 16)
    snap = _snapshot(model)
    plan = plan_conversion(model, "2:4")
    assert isinstance(plan, ConversionPlan) and plan.names == ["0", "2"] and len(plan) == 2
    _assert_unchanged(model, snap)                  # planning changes nothing
    w = model[2].weight.detach()
    assert plan.apply() is model
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], SparseLinear)
    assert torch.equal(model[2].weight, w * mask_2to4(w))
    with pytest.raises(RuntimeError, match="already applied"):
        plan.apply()


def test_plan_is_stale_after_the_model_changes():
    model = _mlp(32, 32, 16)
    plan = plan_conversion(model, "2:4")
    model[2] = nn.Linear(32, 16)
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="changed after the conversion was planned"):
        plan.apply()
    _assert_unchanged(model, snap)


def test_apply_undoes_earlier_swaps_when_one_fails():
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = nn.Linear(16, 16)

        def __setattr__(self, name, value):
            if name == "b" and isinstance(value, SparseLinear):
                raise AttributeError("b is read-only here")
            super().__setattr__(name, value)

    model = Picky()
    snap = _snapshot(model)
    with pytest.raises(AttributeError, match="read-only"):
        sparsify_(model, "2:4", progress=False)
    _assert_unchanged(model, snap)


def test_find_targets_reports_every_name_of_a_shared_module():
    lin = nn.Linear(8, 8)
    model = nn.Sequential(nn.Sequential(lin), nn.ReLU(), lin)
    (t,) = find_targets(model, lambda n, m: isinstance(m, nn.Linear))
    assert t.module is lin and t.names == ("0.0", "2")
    with pytest.raises(ValueError, match="wrap a bare nn.Linear"):
        find_targets(lin, lambda n, m: isinstance(m, nn.Linear))


def test_config_validation():
    with pytest.raises(ValueError, match="regular expression"):
        Sparse24Config(include="(")
    with pytest.raises(ValueError, match="backend"):
        Sparse24Config(backend="gpu")
    with pytest.raises(TypeError, match="dtype"):
        Int4Config(dtype=torch.float32)
    with pytest.raises(ValueError, match="method_kwargs"):
        Int4Config(method="gptq", calib=[torch.randn(2, 8)], method_kwargs={"grid": 3})
    with pytest.raises(ValueError, match="per_layer"):
        BlockSparseConfig(per_layer={"0": 2.0})
    with pytest.raises(TypeError, match="filter_fn"):
        sparsify_(_mlp(8, 8, 8), "2:4", filter_fn="0", progress=False)


# ----------------------------------------------------------------------------- compress
def test_compress_validates_every_layer_before_calibration():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(72, 8))

    class Calib:
        reads = 0

        def __iter__(self):
            Calib.reads += 1
            return iter([torch.randn(4, 64)])

    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer '4'.*group_size 64 does not divide"):
        compress(model, Calib(), "int4", "gptq", group_size=64)
    with pytest.raises(ValueError, match=r"sparsity=0.3 does not apply to scheme '2:4'"):
        compress(model, Calib(), "2:4", "sparsegpt", sparsity=0.3)
    with pytest.raises(ValueError, match=r"group_size=32 does not apply to scheme 'block'"):
        compress(model, Calib(), "block", group_size=32)
    with pytest.raises(ValueError, match=r"\['grid'\] do not apply"):
        compress(model, Calib(), "int4", "gptq", grid=10)
    with pytest.raises(ValueError, match="needs calibration"):
        compress(model, None, "2:4", "wanda")
    with pytest.raises(ValueError, match="no submodule"):
        compress(model, Calib(), "2:4", "magnitude", layers=["9"])
    assert Calib.reads == 0
    _assert_unchanged(model, snap)


def test_compress_keeps_shared_modules_shared_and_input_untouched():
    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), lin, nn.ReLU(), lin)
    snap = _snapshot(model)
    calib = [torch.randn(16, 32) for _ in range(2)]
    out, rep = compress(model, calib, "2:4", "sparsegpt", inplace=False)
    _assert_unchanged(model, snap)
    assert out[2] is out[4] and isinstance(out[2], SparseLinear)
    assert rep["layers"] == ["0", "2"] and rep["shared"] == {"2": ["2", "4"]}
    x = torch.randn(3, 32)
    ref = x.double()
    for m in out:
        ref = _ref64(ref, m.weight, m.bias) if isinstance(m, SparseLinear) else m(ref)
    assert_close_rel(out(x), ref)
    # a list naming only one of the shared module's names is an error
    with pytest.raises(ValueError, match="shared"):
        compress(model, calib, "2:4", "magnitude", layers=["2"])


def test_compress_tied_weights_raise():
    a = nn.Linear(16, 16)
    b = nn.Linear(16, 16)
    b.weight = a.weight
    with pytest.raises(ValueError, match="tied"):
        compress(nn.Sequential(a, nn.ReLU(), b), None, "2:4", "magnitude")


def test_compress_keeps_frozen_parameters_frozen():
    model = _mlp(32, 32, 16)
    model[0].requires_grad_(False)
    out, _ = compress(copy.deepcopy(model), None, "block", block_size=16, sparsity=0.5)
    assert not out[0].blocks.requires_grad and not out[0].bias.requires_grad
    assert out[2].blocks.requires_grad
