"""save_compressed / load_compressed: paths, safetensors only (no pickle), all-or-nothing validation against the
model, round trips of every compressed module."""
import json
import os
import struct

import pytest
import torch
from torch import nn

pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402

from sparsekit import BlockSparseConfig, Int4Config, quantize_, sparsify_  # noqa: E402
from sparsekit.compress import load_compressed, save_compressed  # noqa: E402
from sparsekit.nn import QLinear, SparseQLinear  # noqa: E402
from sparsekit.testing import assert_close_rel  # noqa: E402


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).to(dtype)


def _snapshot(model):
    return ({n: m for n, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def _assert_unchanged(model, snap):
    mods, sd = snap
    assert {n: m for n, m in model.named_modules()}.keys() == mods.keys()
    for n, m in model.named_modules():
        assert mods[n] is m
    cur = model.state_dict()
    assert cur.keys() == sd.keys()
    for k, v in sd.items():
        assert cur[k].shape == v.shape and torch.equal(cur[k], v), k


def _build(kind, seed):
    if kind == "2:4":
        return sparsify_(_mlp(seed), "2:4", progress=False), torch.float32
    if kind == "block":
        return sparsify_(_mlp(seed), BlockSparseConfig(block_size=(16, 16), sparsity=0.5), progress=False), \
            torch.float32
    if kind == "int4":
        return quantize_(_mlp(seed, torch.float16), Int4Config(group_size=32, backend="reference"),
                         progress=False), torch.float16
    m = _mlp(seed)
    m[0] = SparseQLinear.from_dense(m[0], group_size=32)
    m[2] = SparseQLinear.from_dense(m[2], group_size=32)
    return m, torch.float32


@pytest.mark.parametrize("kind", ["2:4", "block", "int4", "2:4+int4"])
def test_round_trip_every_module(tmp_path, kind):
    model, dtype = _build(kind, 0)
    wpath, rpath = save_compressed(model, tmp_path / "sub" / "model.safetensors", {"kind": kind})
    assert os.path.isfile(wpath) and json.loads(open(rpath).read()) == {"kind": kind}
    assert sorted(os.listdir(tmp_path / "sub")) == ["model.safetensors", "report.json"]   # no temporary files
    fresh, _ = _build(kind, 1)
    x = torch.randn(5, 64, dtype=dtype)
    assert not torch.equal(fresh(x), model(x))
    assert load_compressed(fresh, wpath) is fresh
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    # against float64 dense math on the loaded weights
    ref = x.double()
    for m in fresh:
        ref = ref @ m.weight.double().T + m.bias.double() if hasattr(m, "bias") else m(ref)
    assert_close_rel(fresh(x), ref, dtype=dtype)


# ----------------------------------------------------------------------------- paths
def test_load_directory_is_a_clear_error(tmp_path):
    """A directory was reported as 'No such device (os error 19)'."""
    with pytest.raises(IsADirectoryError, match="is a directory, not a safetensors file"):
        load_compressed(_mlp(), tmp_path)
    save_compressed(_mlp(), tmp_path / "model.safetensors")
    with pytest.raises(IsADirectoryError, match="did you mean .*model.safetensors"):
        load_compressed(_mlp(), str(tmp_path))


def test_save_under_a_regular_file_is_a_clear_error(tmp_path):
    """save_compressed under a regular file raised FileExistsError from os.makedirs."""
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"'.*f' is a regular file, not a directory"):
        save_compressed(_mlp(), tmp_path / "f" / "deeper" / "model.safetensors")
    with pytest.raises(NotADirectoryError, match="regular file"):
        load_compressed(_mlp(), tmp_path / "f" / "model.safetensors")
    assert (tmp_path / "f").read_text() == "x"


def test_save_to_a_directory_and_missing_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="give a file path"):
        save_compressed(_mlp(), tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_compressed(_mlp(), tmp_path / "nope.safetensors")
    with pytest.raises(TypeError, match="path"):
        save_compressed(_mlp(), 3)
    with pytest.raises(TypeError, match="model"):
        load_compressed("model", tmp_path / "x.safetensors")


def test_failed_save_keeps_the_old_file(tmp_path):
    class Extra(nn.Linear):
        def get_extra_state(self):
            return {"not": "a tensor"}

        def set_extra_state(self, state):
            pass

    path = tmp_path / "model.safetensors"
    save_compressed(_mlp(), path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="not a tensor"):
        save_compressed(nn.Sequential(Extra(4, 4)), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=["umask022", "umask077", "umask002"])
def test_saved_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        wpath, rpath = save_compressed(_mlp(), tmp_path / "model.safetensors", {"k": 1})
        (tmp_path / "plain").write_text("x")   # what open() gives under this umask
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert (tmp_path / "plain").stat().st_mode & 0o777 == want
    for p in (wpath, rpath):
        assert os.stat(p).st_mode & 0o777 == want, (p, oct(os.stat(p).st_mode))
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "plain", "report.json"]


# ----------------------------------------------------------------------------- what loading trusts
def test_pickle_is_never_loaded(tmp_path):
    """A torch.save (pickle) checkpoint whose unpickling would run code is rejected without running it."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "model.safetensors"
    torch.save({"0.weight": Evil()}, path)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_compressed(_mlp(), path)
    assert not marker.exists()


@pytest.mark.parametrize("corrupt", ["truncated", "garbage", "huge_header", "empty", "bad_json", "offsets"])
def test_corrupt_files_are_clear_errors(tmp_path, corrupt):
    path = tmp_path / "model.safetensors"
    model = _mlp()
    save_compressed(model, path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    if corrupt == "truncated":
        data = raw[: len(raw) - 100]
    elif corrupt == "garbage":
        data = os.urandom(300)
    elif corrupt == "huge_header":
        data = struct.pack("<Q", 1 << 60) + raw[8:]
    elif corrupt == "empty":
        data = b""
    elif corrupt == "bad_json":
        data = raw[:8] + b"{" * n + raw[8 + n:]
    else:
        header["0.weight"]["data_offsets"] = [0, 10 ** 9]
        h = json.dumps(header).encode()
        data = struct.pack("<Q", len(h)) + h + raw[8 + n:]
    path.write_bytes(data)
    target = _mlp(1)
    snap = _snapshot(target)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_compressed(target, path)
    _assert_unchanged(target, snap)


def test_key_mismatches_leave_the_model_unchanged(tmp_path):
    path = tmp_path / "m.safetensors"
    sd = {k: v.clone() for k, v in _mlp(1).state_dict().items()}
    target = _mlp(0)
    snap = _snapshot(target)
    save_file({k: v for k, v in sd.items() if k != "2.bias"}, str(path))
    with pytest.raises(ValueError, match=r"missing keys '2.bias'"):
        load_compressed(target, path)
    _assert_unchanged(target, snap)
    save_file({**sd, "9.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=r"unexpected keys '9.weight'"):
        load_compressed(target, path)
    _assert_unchanged(target, snap)
    # strict=False loads what is there
    save_file({k: v for k, v in sd.items() if k.startswith("0.")}, str(path))
    load_compressed(target, path, strict=False)
    assert torch.equal(target[0].weight, sd["0.weight"]) and torch.equal(target[2].weight, snap[1]["2.weight"])


def test_shape_mismatch_in_a_later_layer_leaves_earlier_layers_untouched(tmp_path):
    """load_state_dict copies every matching tensor before it reports a size mismatch; load_compressed does not."""
    path = tmp_path / "m.safetensors"
    sd = {k: v.clone() for k, v in _mlp(1).state_dict().items()}
    sd["2.weight"] = torch.randn(32, 65)
    save_file(sd, str(path))
    target = _mlp(0)
    snap = _snapshot(target)
    with pytest.raises(ValueError, match=r"'2.weight' has shape \(32, 65\).*expects \(32, 64\)"):
        load_compressed(target, path)
    _assert_unchanged(target, snap)


def test_dtypes(tmp_path):
    path = tmp_path / "m.safetensors"
    model = sparsify_(_mlp(1), "2:4", progress=False)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    target = sparsify_(_mlp(0), "2:4", progress=False)
    snap = _snapshot(target)
    save_file({**sd, "0.meta_codes": sd["0.meta_codes"].float()}, str(path))   # metadata codes as floats
    with pytest.raises(ValueError, match=r"'0.meta_codes' is torch.float32 .* expects torch.uint8"):
        load_compressed(target, path)
    _assert_unchanged(target, snap)
    # floating tensors of another float dtype are cast, as load_state_dict does
    save_file({k: (v.double() if v.is_floating_point() else v) for k, v in sd.items()}, str(path))
    load_compressed(target, path)
    x = torch.randn(3, 64)
    torch.testing.assert_close(target(x), model(x), rtol=0, atol=0)


def test_packed_module_loader_runs_before_anything_is_changed(tmp_path):
    """A packed module whose own load_state_dict rejects the file: the layers loaded before it are untouched."""
    path = tmp_path / "m.safetensors"
    model = quantize_(_mlp(1, torch.float16), Int4Config(group_size=32), progress=False)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["2.qweight"] = torch.zeros(32, 7, dtype=torch.int32)       # K/8 = 8 words per row expected
    save_file(sd, str(path))
    target = quantize_(_mlp(0, torch.float16), Int4Config(group_size=32), progress=False)
    snap = _snapshot(target)
    with pytest.raises(ValueError, match=r"does not fit module '2' \(QLinear\)"):
        load_compressed(target, path)
    _assert_unchanged(target, snap)

    class Validating(nn.Linear):           # stands for a module that validates its contents when loaded
        def _load_from_state_dict(self, state_dict, prefix, *args):
            if bool((state_dict[prefix + "weight"] < -5).any()):
                raise ValueError("weight entries below -5 are invalid for this layer")
            super()._load_from_state_dict(state_dict, prefix, *args)

    good = nn.Sequential(nn.Linear(4, 4), Validating(4, 4))
    bad = {k: v.clone() for k, v in good.state_dict().items()}
    bad["0.weight"] += 1
    bad["1.weight"][0, 0] = -9
    save_file(bad, str(path))
    snap = _snapshot(good)
    with pytest.raises(ValueError, match="below -5"):
        load_compressed(good, path)
    _assert_unchanged(good, snap)


def test_qlinear_takes_an_awq_input_scale_it_did_not_have(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(64, 16).half()
    x = torch.randn(64, 64).half()
    awq = nn.Sequential(QLinear.from_float(lin, group_size=32, method="awq", calib_inputs=x, backend="reference"))
    plain = nn.Sequential(QLinear.from_float(nn.Linear(64, 16).half(), group_size=32, backend="reference"))
    assert plain[0].input_scale is None and awq[0].input_scale is not None
    path, _ = save_compressed(awq, tmp_path / "awq.safetensors")
    load_compressed(plain, path)
    torch.testing.assert_close(plain(x), awq(x), rtol=0, atol=0)


def test_shared_and_tied_tensors(tmp_path):
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    path, _ = save_compressed(model, tmp_path / "shared.safetensors")
    fresh_lin = nn.Linear(8, 8)
    fresh = nn.Sequential(fresh_lin, nn.ReLU(), fresh_lin)
    load_compressed(fresh, path)
    assert torch.equal(fresh[0].weight, lin.weight) and fresh[0] is fresh[2]
    # a crafted file with different values for the two names of one tensor is refused
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["2.weight"] += 1
    save_file(sd, str(path))
    snap = _snapshot(fresh)
    with pytest.raises(ValueError, match=r"'0.weight' and '2.weight' are the same tensor in the model"):
        load_compressed(fresh, path)
    _assert_unchanged(fresh, snap)


def test_meta_model_is_a_clear_error(tmp_path):
    path, _ = save_compressed(_mlp(), tmp_path / "m.safetensors")
    with torch.device("meta"):
        meta = _mlp()
    with pytest.raises(ValueError, match="meta device"):
        load_compressed(meta, path)


@pytest.mark.parametrize("kind", ["2:4", "2:4+int4"])
def test_files_with_the_old_meta_key_load(tmp_path, kind):
    """Files written when the 2:4 metadata buffer was named ``meta`` load into ``meta_codes``."""
    model, dtype = _build(kind, 0)
    path = tmp_path / "old.safetensors"
    sd = model.state_dict()
    old = {(k[:-len("meta_codes")] + "meta" if k.endswith(".meta_codes") else k): v.contiguous()
           for k, v in sd.items()}
    assert any(k.endswith(".meta") for k in old) and not any(k.endswith("meta_codes") for k in old)
    save_file(old, str(path))
    fresh, _ = _build(kind, 1)
    x = torch.randn(5, 64, dtype=dtype)
    assert not torch.equal(fresh(x), model(x))
    assert load_compressed(fresh, path) is fresh
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v), k
