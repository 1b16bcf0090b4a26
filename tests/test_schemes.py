"""The scheme registry: names, configs (JSON, versions), describe -> rebuild, bytes per weight, plug-ins,
per-layer override resolution."""
import json
import textwrap
import warnings

import pytest
import torch
from torch import nn

from sparsekit import schemes
from sparsekit.compress import compress, module_bytes
from sparsekit.convert import convert_model
from sparsekit.schemes import (BlockParams, Int4Params, Sparse24Params, SchemeRegistry, describe_model, registry,
                               rebuild_modules)
from sparsekit.schemes.sparse24 import Sparse24Scheme

ALL = ("2:4", "2:4+int8", "block", "w8a8", "w4a8", "mixed", "int4", "2:4+int4")
HALF = {"w8a8", "w4a8", "mixed", "int4"}        # QLinear: float16/bfloat16 compute


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32, bias=False), nn.ReLU(),
                         nn.Linear(32, 16)).to(dtype)


def _calib(dtype, n=2):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(12, 64, generator=g).to(dtype) for _ in range(n)]


# ----------------------------------------------------------------------------- registry and configs
def test_registry_holds_every_scheme_and_rejects_duplicates():
    assert set(ALL) <= set(registry.names())
    for name in ALL:
        s = registry.get(name)
        assert s.name == name and s.config_cls.SCHEME == name and s.kernels and s.stores and s.title
        assert registry.for_config(s.default_config()) is s
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Sparse24Scheme())
    with pytest.raises(ValueError, match=r"unknown scheme '3:8'; known: 2:4"):
        registry.get("3:8")
    fresh = SchemeRegistry(entry_point_group=None)
    fresh.register(Sparse24Scheme())
    with pytest.raises(ValueError, match="already registered"):
        fresh.register(Sparse24Scheme())


@pytest.mark.parametrize("name", ALL)
def test_config_json_round_trip(name):
    s = registry.get(name)
    for calibrated in (False, True):
        cfg = s.default_config(calibrated)
        d = json.loads(json.dumps(cfg.to_dict()))
        assert d["scheme"] == name and d["version"] == cfg.VERSION
        back = schemes.config_from_dict(d)
        assert type(back) is type(cfg) and back == cfg
    newer = dict(cfg.to_dict(), version=cfg.VERSION + 1)
    with pytest.raises(ValueError, match="newer than this sparsekit"):
        schemes.config_from_dict(newer)
    bad = cfg.to_dict()
    bad["params"]["bogus"] = 1
    with pytest.raises(ValueError, match="unknown .* config parameters"):
        schemes.config_from_dict(bad)


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="method 'gptq' does not apply to scheme '2:4'"):
        Sparse24Params(method="gptq")
    with pytest.raises(ValueError, match=r"method_options \['grid'\] do not apply to method='gptq'"):
        Int4Params(method="gptq", method_options={"grid": 3})
    with pytest.raises(ValueError, match="damp must be a finite number >= 0"):
        Int4Params(method="gptq", method_options={"damp": -1.0})
    with pytest.raises(ValueError, match="multiple of 4"):
        Sparse24Params(method="sparsegpt", method_options={"block_size": 6})
    with pytest.raises(ValueError, match="group_size"):
        Int4Params(group_size=48)
    with pytest.raises(TypeError, match="dtype"):
        Int4Params(dtype=torch.float32)
    with pytest.raises(ValueError, match="either block_mask or sparsity"):
        BlockParams(block_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="run-time value"):
        BlockParams(block_mask=torch.ones(2, 2, dtype=torch.bool), sparsity=None).to_dict()
    assert Int4Params(dtype=torch.bfloat16).dtype == "bfloat16"


# ----------------------------------------------------------------------------- describe -> rebuild
CASES = [(s, None) for s in ALL] + [("int4", "awq"), ("w4a8", "awq"), ("2:4", "wanda"), ("int4", "rtn")]


@pytest.mark.parametrize("scheme,method", CASES)
def test_describe_rebuild_round_trip(scheme, method):
    """A compressed model's description (JSON) rebuilds empty modules that take its state_dict and give the
    same outputs bit for bit, with no calibration."""
    dtype = torch.float16 if scheme in HALF else torch.float32
    model = _mlp(dtype)
    overrides = {"4": {"sparsity": 0.25}} if scheme == "block" else None   # a per-layer size (num_blocks)
    compress(model, _calib(dtype), scheme, method, overrides=overrides, speed="off")
    desc = json.loads(json.dumps(describe_model(model)))
    assert sorted(desc) == ["0", "2", "4"] and all(d["scheme"] == scheme for d in desc.values())
    assert all(d["format_version"] == registry.get(scheme).format_version for d in desc.values())
    fresh = rebuild_modules(_mlp(dtype, seed=1), desc)
    assert [type(m) for m in fresh] == [type(m) for m in model]
    sd = model.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in fresh.state_dict().items()} == {k: (v.shape, v.dtype)
                                                                              for k, v in sd.items()}
    fresh.load_state_dict(sd)
    x = torch.randn(9, 64).to(dtype)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert describe_model(fresh) == desc


def test_describe_keeps_shared_modules_shared():
    lin = nn.Linear(32, 32)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    compress(model, None, "2:4", "magnitude", speed="off")
    desc = describe_model(model)
    assert desc["2"] == {"same_as": "0"}
    fresh = rebuild_modules(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)),
                            json.loads(json.dumps(desc)))
    assert fresh[0] is fresh[2]
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 32)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("name", ALL)
def test_bytes_per_weight_matches_a_built_module(name):
    s = registry.get(name)
    cfg = s.default_config()
    if name == "int4" or name in ("w4a8", "mixed"):
        cfg = type(cfg)(group_size=64)
    n, k = 96, 256
    lin = nn.Linear(k, n, bias=False, dtype=torch.float16)
    built = s.convert(lin, cfg)
    assert s.bytes_per_weight(cfg, shape=(n, k), dtype=torch.float16) == module_bytes(built) / (n * k)


# ----------------------------------------------------------------------------- plug-ins
def _plugin(tmp_path, group):
    (tmp_path / "toyplugin.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from typing import ClassVar
        from sparsekit.schemes.sparse24 import Sparse24Params, Sparse24Scheme

        LOADS = []

        @dataclass
        class ToyParams(Sparse24Params):
            SCHEME: ClassVar[str] = "toy-2:4"

        class ToyScheme(Sparse24Scheme):
            name = "toy-2:4"
            config_cls = ToyParams

        def register(registry):
            LOADS.append(registry)
            registry.register(ToyScheme())
        """))
    dist = tmp_path / "toyplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\ntoy = toyplugin:register\nbroken = no_such_module:thing\n")


def test_plugins_load_on_first_lookup(tmp_path, monkeypatch):
    group = "sparsekit.schemes.testplugins"
    _plugin(tmp_path, group)
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = SchemeRegistry(entry_point_group=group)
    reg.register(Sparse24Scheme())
    import toyplugin

    assert toyplugin.LOADS == []                     # nothing loaded at construction or registration
    with pytest.warns(RuntimeWarning, match="plug-in 'broken'"):
        assert "toy-2:4" in reg
    assert toyplugin.LOADS == [reg] and reg.names() == ("2:4", "toy-2:4")
    reg.get("toy-2:4")
    assert toyplugin.LOADS == [reg]                  # once
    with pytest.raises(ValueError, match="already registered"):
        reg.register(toyplugin.ToyScheme())
    assert schemes.ENTRY_POINT_GROUP == "sparsekit.schemes"


# ----------------------------------------------------------------------------- overrides
def _resolved(model, config, overrides, calibrated=False):
    res = convert_model(model, config, overrides=overrides, calibrated=calibrated, commit="end",
                        calib=_calib(torch.float32))
    return {n: (res.schemes[n], res.configs[n]) for n in res.names}, res


def test_override_precedence_exact_regex_default_and_skip():
    model = _mlp()
    got, res = _resolved(model, "2:4", {"re:^[24]$": {"scheme": "block", "sparsity": 0.75},
                                       "re:^4$": "int4", "4": None, "_default": "2:4+int4"})
    assert got["0"][0] == "2:4+int4"                 # no exact key, no pattern: _default
    assert got["2"][0] == "block" and got["2"][1].sparsity == 0.75   # the first matching pattern
    assert "4" not in got and res.skipped == ["4"]   # the exact key beats both patterns
    int4 = {"scheme": "int4", "group_size": 32}
    got, _ = _resolved(_mlp(), Sparse24Params(method="wanda"), {"2": "2:4+int4", "4": int4})
    assert got["2"][1].method == "wanda"             # the default config's method where it applies
    assert got["4"][1].method == "rtn"               # else the scheme's data-free default
    got, _ = _resolved(_mlp(), Sparse24Params(method="wanda"), {"4": int4}, calibrated=True)
    assert got["4"][1].method == "gptq"
    got, _ = _resolved(_mlp(), BlockParams(block_size=(16, 16)), {"2": {"sparsity": 0.25}})
    assert got["2"][1].block_size == (16, 16) and got["2"][1].sparsity == 0.25 and got["0"][1].sparsity == 0.5


def test_override_errors():
    with pytest.raises(ValueError, match=r"overrides names layers that are not converted: \['9'\]"):
        _resolved(_mlp(), "2:4", {"9": None})
    with pytest.raises(ValueError, match="not a valid regular expression"):
        _resolved(_mlp(), "2:4", {"re:(": None})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['group_size'\] for scheme '2:4'"):
        _resolved(_mlp(), "2:4", {"0": {"group_size": 32}})
    with pytest.raises(ValueError, match="unknown scheme 'int5'"):
        _resolved(_mlp(), "2:4", {"0": "int5"})
    with pytest.raises(TypeError, match="a value must be None, a scheme name"):
        _resolved(_mlp(), "2:4", {"0": 3})
    lin = nn.Linear(32, 32)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    with pytest.raises(ValueError, match="different values under '0' and '2'"):
        _resolved(model, "2:4", {"0": None, "2": "block"})
    with pytest.raises(ValueError, match="different values under '0' and '2'"):
        _resolved(model, "2:4", {"re:^2$": "block"})
    got, _ = _resolved(model, "2:4", {"2": "block"})      # one name is enough for a shared layer
    assert got == {"0": ("block", got["0"][1])}


def test_override_with_a_classic_config_and_scheme_config_objects():
    from sparsekit import Int4Config

    model = _mlp(torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, _ = _resolved(model, "2:4", {"0": Int4Config(group_size=32), "2": Int4Params(group_size=-1)})
    assert got["0"][0] == "int4" and got["0"][1].group_size == 32 and got["2"][1].group_size == -1


def test_readme_scheme_table_is_generated_from_the_registry():
    import os

    from sparsekit.schemes.table import END, START, replace_table, schemes_table

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    text = open(path).read()
    assert START in text and END in text
    assert replace_table(text, schemes_table()) == text, \
        "README.md's scheme table is out of date: python -m sparsekit.schemes.table --write README.md"
    table = schemes_table()
    assert all(f"| `{name}` |" in table for name in ALL)
