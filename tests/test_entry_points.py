"""sparsify_, quantize_, compress and `sparsekit compress` go through one registry: the same scheme and
calibration give identical modules, per-layer overrides apply in every entry point, compress works in place."""
import os

import pytest
import torch
from torch import nn

from sparsekit import cli, quantize_, sparsify_, workloads
from sparsekit.compress import compress, scheme_config
from sparsekit.schemes import registry

CASES = [("2:4", "sparsegpt"), ("2:4", "wanda"), ("2:4+int8", "sparsegpt"), ("block", "magnitude"), ("w8a8", "rtn"),
         ("w4a8", "gptq"), ("mixed", "rtn"), ("int4", "gptq"), ("2:4+int4", "sparsegpt")]


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.broken = False            # error-path tests: the forward raises

    def forward(self, x):
        if self.broken:
            raise RuntimeError("this block is broken")
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self, d=64, n=2):
        super().__init__()
        self.inp = nn.Linear(32, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, 16)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def _calib():
    g = torch.Generator().manual_seed(5)
    return [torch.randn(12, 32, generator=g) for _ in range(2)]


def _sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _types(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if n and not isinstance(m, (nn.ModuleList, Block))}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture
def workload(monkeypatch):
    """`--workload digits` loads a fresh Net (same seed) with _calib() as its calibration batches."""
    def load(name, **kw):
        model = _net()
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            ref = model(x)

        def quality(m):
            with torch.no_grad():
                return float(nn.functional.cosine_similarity(m(x).float(), ref, dim=-1).mean())
        return workloads.Workload(name="digits", model=model, calib=_calib(), quality_fn=quality, metric="cosine")

    monkeypatch.setattr(workloads, "load_workload", load)


def _cli(tmp_path, argv):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    assert cli.main(["compress", "--workload", "digits", "--out", str(out), "--force"] + argv) == 0
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("scheme,method", CASES)
def test_every_entry_point_builds_identical_modules(tmp_path, workload, capsys, scheme, method):
    calib = _calib()
    ref = _net()
    _, rep = compress(ref, calib, scheme, method, speed="off")
    assert rep["calibration"]["mode"] == ("blocks" if registry.get(scheme).config_cls.METHODS and
                                          scheme_config(scheme, method).method_spec.needs_data else "no data")
    want = _sd(ref)
    cfg = scheme_config(scheme, method)            # compress's config: the same scheme and calibration
    s = registry.get(scheme)
    entry_points = ([sparsify_] if s.sparse else []) + ([quantize_] if s.quantized else [])
    assert entry_points
    for fn in entry_points:
        model = _net()
        assert fn(model, cfg, calib=calib, progress=False) is model
        assert _types(model) == _types(ref), fn.__name__
        _same(_sd(model), want)
    _same(_cli(tmp_path, ["--scheme", scheme, "--method", method]), want)
    capsys.readouterr()


OVERRIDES = {"inp": None, "re:up$": {"scheme": "int4", "group_size": 32},
             "blocks.1.down": {"scheme": "block", "block_size": (16, 16), "sparsity": 0.25}}
CLI_OVERRIDES = ["--override", "inp", "none", "--override", "re:up$", "int4:group_size=32",
                 "--override", "blocks.1.down", "block:block_size=16x16,sparsity=0.25"]


def test_overrides_apply_in_every_entry_point(tmp_path, workload, capsys):
    calib = _calib()
    ref = _net()
    _, rep = compress(ref, calib, "2:4+int4", "sparsegpt", overrides=OVERRIDES, speed="off")
    types = _types(ref)
    assert types == {"inp": "Linear", "blocks.0.up": "QLinear", "blocks.0.down": "SparseQLinear",
                     "blocks.1.up": "QLinear", "blocks.1.down": "BlockSparseLinear", "head": "SparseQLinear"}
    assert rep["skipped"] == ["inp"] and rep["layer_schemes"]["blocks.1.down"] == "block"
    assert ref.blocks[0].up.group_size == 32 and ref.blocks[1].down.density == pytest.approx(0.75)
    assert rep["calibration"]["mode"] == "blocks"
    want = _sd(ref)
    cfg = scheme_config("2:4+int4", "sparsegpt")
    for fn in (sparsify_, quantize_):
        model = _net()
        fn(model, cfg, calib=calib, overrides=OVERRIDES, progress=False)
        assert _types(model) == types, fn.__name__
        _same(_sd(model), want)
    _same(_cli(tmp_path, ["--scheme", "2:4+int4", "--method", "sparsegpt"] + CLI_OVERRIDES), want)
    capsys.readouterr()


def test_cli_override_errors_come_before_any_work(capsys, monkeypatch):
    def load(name, **kw):
        raise AssertionError("the workload was loaded before the arguments were checked")

    monkeypatch.setattr(workloads, "load_workload", load)
    for spec, match in (("int5", "unknown scheme 'int5'"), ("int4:group_size=48", "group_size must be"),
                        (":group_size=32", "unknown parameter(s) ['group_size'] for scheme '2:4'"),
                        ("int4:oops", "is not key=value")):
        assert cli.main(["compress", "--workload", "digits", "--override", "inp", spec]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err and match in err, err


def test_compress_is_in_place_by_default():
    model = _net()
    old_inp = model.inp
    out, rep = compress(model, _calib(), "2:4", "sparsegpt", speed="off")
    assert out is model and rep["inplace"] is True
    assert model.inp is not old_inp and type(model.inp).__name__ == "SparseLinear"
    kept = _net()
    before = _sd(kept)
    out, rep = compress(kept, _calib(), "2:4", "sparsegpt", speed="off", inplace=False)
    assert out is not kept and rep["inplace"] is False
    assert type(kept.inp) is nn.Linear
    _same(_sd(kept), before)
    _same(_sd(out), _sd(model))


def test_an_error_after_the_first_block_says_what_was_compressed():
    """In place, the blocks done before the error stay compressed and the error says so; inplace=False and
    sparsify_ leave the input model unchanged."""
    model = _net()
    model.blocks[1].broken = True
    with pytest.raises(RuntimeError, match="this block is broken") as info:
        compress(model, _calib(), "2:4", "sparsegpt", speed="off")
    assert any("2 of 6 layers were already compressed in place" in n for n in getattr(info.value, "__notes__", []))
    assert type(model.blocks[0].up).__name__ == "SparseLinear" and type(model.blocks[1].up) is nn.Linear
    assert type(model.inp) is nn.Linear      # layers before the blocks are swapped in at the end
    for run in (lambda m: compress(m, _calib(), "2:4", "sparsegpt", speed="off", inplace=False),
                lambda m: sparsify_(m, scheme_config("2:4", "sparsegpt"), calib=_calib(), progress=False)):
        m = _net()
        m.blocks[1].broken = True
        before = _sd(m)
        with pytest.raises(RuntimeError, match="this block is broken"):
            run(m)
        assert all(type(x) is nn.Linear for x in m.modules() if isinstance(x, nn.Linear))
        _same(_sd(m), before)


def test_classic_configs_still_work():
    from sparsekit import BlockSparseConfig, Int4Config, Sparse24Config

    model = _net()
    sparsify_(model, Sparse24Config(exclude="head"), progress=False)
    assert type(model.head) is nn.Linear and type(model.inp).__name__ == "SparseLinear"
    model = _net().half()
    quantize_(model, Int4Config(group_size=32, method="gptq", calib=[c.half() for c in _calib()]), progress=False)
    assert all(type(m).__name__ == "QLinear" for m in model.modules() if hasattr(m, "in_features"))
    model = _net()
    sparsify_(model, BlockSparseConfig(block_size=16, per_layer={"head": 0.75}), progress=False)
    assert model.head.density == pytest.approx(0.25) and model.inp.density == pytest.approx(0.5)
    with pytest.raises(ValueError, match="give the calibration batches once"):
        quantize_(_net(), Int4Config(method="gptq", calib=_calib()), calib=_calib(), progress=False)
    with pytest.raises(ValueError, match=r"need calibration batches"):
        sparsify_(_net(), scheme_config("2:4", "sparsegpt"), progress=False)
    assert os.environ.get("SPARSEKIT_BACKEND") is None
