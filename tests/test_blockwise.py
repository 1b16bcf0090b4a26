"""Block-by-block calibration (sparsekit.calibration.blockwise): same bits as the whole-model path, block
discovery, fallback, the activation store's budget, progress output."""
import copy
import warnings

import pytest
import torch
from torch import nn

from sparsekit.calibration import ActivationStore, find_blocks
from sparsekit.compress import compress


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.gate = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x, scale=None):
        h = torch.relu(self.up(x)) * torch.sigmoid(self.gate(x))
        out = x + self.down(h)
        return out if scale is None else out * scale


class Net(nn.Module):
    """A layer before the blocks (``inp``), chained blocks with a keyword argument, a head after them."""

    def __init__(self, d=32, n=3, between=None):
        super().__init__()
        self.inp = nn.Linear(24, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, 8)
        self.between = between

    def forward(self, x):
        h = self.inp(x)
        s = torch.full((1, d := h.shape[-1]), 1.0 + 1.0 / d)
        for b in self.blocks:
            h = b(h, scale=s)
            if self.between is not None:
                h = h * self.between
        return self.head(h)


def _net(**kw):
    torch.manual_seed(0)
    return Net(**kw).eval()


def _calib(n=3):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(2, 5, 24, generator=g) for _ in range(n)]


def _sd(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_find_blocks():
    model = _net()
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [n for n, _ in find_blocks(model, lin)] == ["blocks.0", "blocks.1", "blocks.2"]
    assert find_blocks(model, lin, None) == []
    assert [n for n, _ in find_blocks(model, lin, "blocks")] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [n for n, _ in find_blocks(model, lin, ["blocks.0", "blocks.2"])] == ["blocks.0", "blocks.2"]
    with pytest.raises(ValueError, match="no submodule named 'nope'"):
        find_blocks(model, lin, ["nope"])
    with pytest.raises(ValueError, match="names a Linear"):
        find_blocks(model, lin, "inp")
    with pytest.raises(ValueError, match="contains another block"):
        find_blocks(model, lin, ["blocks", "blocks.0"])
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))       # no repeated blocks
    assert find_blocks(mlp, [mlp[0], mlp[2]]) == []


@pytest.mark.parametrize("scheme,method", [("2:4", "sparsegpt"), ("int4", "gptq"), ("2:4", "wanda"),
                                           ("2:4+int4", "sparsegpt")])
def test_blocks_give_the_bits_of_the_whole_model_path(scheme, method):
    calib = _calib()
    results = {}
    for key, kw in {"whole": dict(blocks=None), "blocks": {},
                    "offload": dict(device="cpu", offload=True, activation_budget=0)}.items():
        model = _net()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, rep = compress(model, calib, scheme, method, speed="off", **kw)
        results[key] = (_sd(model), rep)
    assert results["whole"][1]["calibration"]["mode"] == "whole model"
    assert results["blocks"][1]["calibration"]["mode"] == "blocks"
    assert results["blocks"][1]["calibration"]["blocks"] == 3
    assert results["blocks"][1]["num_layers"] == 11            # inp (before), 3 x 3 in the blocks, head (after)
    assert _equal(results["whole"][0], results["blocks"][0])
    assert _equal(results["whole"][0], results["offload"][0])


def test_blocks_that_are_not_chained_fall_back_to_the_whole_model():
    calib = _calib()
    ref = _net(between=0.5)
    compress(ref, calib, "2:4", "sparsegpt", blocks=None, speed="off")
    model = _net(between=0.5)
    with pytest.warns(RuntimeWarning, match="does not receive the output of 'blocks.0'"):
        _, rep = compress(model, calib, "2:4", "sparsegpt", speed="off")
    assert rep["calibration"]["mode"] == "whole model" and "fallback" in rep["calibration"]
    assert _equal(_sd(ref), _sd(model))


def test_progress_bar_and_summary_line(capsys):
    compress(_net(), _calib(), "2:4", "sparsegpt", speed="off", progress=True)
    err = capsys.readouterr().err
    assert "compress: 11 layers (3 blocks) in" in err and "RSS" in err
    assert "blocks.2" in err          # the bar's per-block postfix


def test_bad_calibration_batch_is_reported_before_any_block_is_compressed():
    model = _net()
    before = _sd(model)
    calib = _calib(2) + [torch.randn(2, 5, 23)]
    with pytest.raises(ValueError, match=r"calib: the model's forward fails on calibration batch 2 \(a \(2, 5, 23\)"):
        compress(model, calib, "2:4", "sparsegpt", speed="off")
    assert _equal(before, _sd(model)) and all(type(m) is nn.Linear for m in model.modules()
                                              if isinstance(m, nn.Linear))


def test_activation_store_budget():
    # placement logic only (an offload device different from the compute device; meta keeps no data)
    store = ActivationStore("cpu", "meta", budget=3 * 4 * 10 * 4)     # three float32 (4, 10) entries
    for _ in range(3):
        store.append((torch.zeros(4, 10),), {"mask": None})
    assert [e[2] for e in store.entries] == [True, True, True]
    store.append((torch.zeros(4, 10),), {})
    assert [e[2] for e in store.entries] == [True, True, True, False]
    assert store.bytes_on_device == 480 and store.bytes_offloaded == 160
    assert store.entries[3][0][0].device.type == "meta"
    store.set_hidden(0, torch.ones(4, 10))
    assert torch.equal(store.hidden(0), torch.ones(4, 10)) and store.bytes_on_device == 480
    with pytest.raises(ValueError, match="activation_budget"):
        ActivationStore("cpu", "cpu", budget=-1)


def test_llama_blocks_and_head(tmp_path):
    """A transformers Llama model: decoder layers found through _no_split_modules, the rotary embeddings and
    the mask recorded once as keyword arguments, lm_head calibrated after the blocks."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50, max_position_embeddings=32,
                                   use_cache=True)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).eval()
    calib = [torch.randint(0, 50, (2, 9)) for _ in range(2)]
    out = {}
    for blocks in ("auto", None):
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, rep = compress(model, calib, "2:4", "wanda", blocks=blocks, speed="off")
        out[blocks] = (_sd(model), rep)
    assert out["auto"][1]["calibration"]["mode"] == "blocks" and out["auto"][1]["calibration"]["blocks"] == 2
    assert out["auto"][1]["layers"][-1] == "lm_head"
    assert _equal(out["auto"][0], out[None][0])


def test_driver_options_are_checked_before_anything_runs():
    model = _net()
    before = _sd(model)
    cases = [(dict(device="nope"), ValueError, "device='nope' is not a device"),
             (dict(device="meta"), ValueError, "device='meta' cannot calibrate"),
             (dict(offload="yes"), TypeError, "offload must be None or a bool"),
             (dict(activation_budget=-1), ValueError, "activation_budget must be None or a number of bytes"),
             (dict(activation_budget=True), ValueError, "activation_budget must be None or a number of bytes"),
             (dict(blocks=3), TypeError, "blocks must be 'auto', None, a module name or a list")]
    if not torch.cuda.is_available():
        cases.append((dict(device="cuda"), ValueError, "CUDA is not available here"))
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            compress(model, _calib(), "2:4", "sparsegpt", speed="off", **kw)
    assert _equal(before, _sd(model)) and all(type(m) is nn.Linear for m in model.modules()
                                              if isinstance(m, nn.Linear))
    with pytest.raises(ValueError, match="contains another block"):
        find_blocks(model, [m for m in model.modules() if isinstance(m, nn.Linear)], ["blocks.0", "blocks"])
