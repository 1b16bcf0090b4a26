"""Self-describing checkpoints: ``save_pretrained(model, out_dir)`` / ``load_pretrained(out_dir, model)``.

A checkpoint is a directory with two files:

* ``model.safetensors``: the model's ``state_dict`` (and its non-persistent
  buffers, under the key prefix ``#nonpersistent:``, so that a skeleton built
  on the meta device gets them too).  The header metadata names the format
  (``sparsekit_format``, ``sparsekit_format_version``) and repeats the layer
  descriptions (``sparsekit_layers``, JSON), so the file describes itself.
* ``sparsekit_config.json``: ``format``, ``format_version``, ``producer``,
  ``weights`` (the file name), ``layers`` -- module path -> the registry's
  description of the compressed module there (:meth:`Scheme.describe`:
  ``scheme``, ``format_version``, ``module`` and ``params`` such as bits,
  group size, symmetric, act_bits, block size, pattern, dtype) -- and
  ``report`` (the compression report, or null).

``load_pretrained`` puts an empty module rebuilt from each description
(:meth:`Scheme.rebuild`; no calibration, no compression) at that path of a
dense skeleton -- the same architecture as the saved model, with plain
``nn.Linear`` layers, possibly built under ``torch.device("meta")`` -- and
loads the weights.  Everything is checked before the model changes: the
format version of the checkpoint and of every layer, that every described
layer is an ``nn.Linear`` of the described size in the skeleton, that the file
holds exactly the tensors of the rebuilt model with the skeleton's shapes and
dtypes, and the contents of every packed module (its own ``load_state_dict``
validates indices and codes).
"""
from __future__ import annotations

import itertools
import json
import os
from typing import Optional

import torch
from torch import nn

from .compress import _atomic_write, _bits, _blocking_file, _fspath, _safetensors, tensors_to_save
from .nn._state import upgrade_state_dict

__all__ = ["save_pretrained", "load_pretrained", "FORMAT", "FORMAT_VERSION", "CONFIG_NAME", "WEIGHTS_NAME"]

FORMAT = "sparsekit"
FORMAT_VERSION = 1
CONFIG_NAME = "sparsekit_config.json"
WEIGHTS_NAME = "model.safetensors"
NONPERSISTENT_PREFIX = "#nonpersistent:"


def _few(keys, n=6) -> str:
    keys = list(keys)
    return ", ".join(repr(k) for k in keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _nonpersistent_buffers(model: nn.Module) -> dict:
    out = {}
    for name, mod in model.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            t = mod._buffers.get(b)
            if t is not None:
                out[f"{name}.{b}" if name else b] = t
    return out


def save_pretrained(model: nn.Module, out_dir, report: Optional[dict] = None) -> str:
    """Write ``model`` (compressed by ``compress``, ``sparsify_``, ``quantize_``) to the directory
    ``out_dir`` as ``model.safetensors`` and ``sparsekit_config.json``; returns ``out_dir``.

    ``report``: the compression report (stored in the config; values JSON cannot hold are written as
    strings).  The directory is created if missing; each file is written to a temporary file and renamed
    into place (mode as the umask gives).  A regular file at ``out_dir`` or among its parents raises
    NotADirectoryError, a meta-device tensor ValueError.
    """
    from . import __version__
    from .schemes import describe_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_pretrained: model must be an nn.Module, got {type(model).__name__}")
    if report is not None and not isinstance(report, dict):
        raise TypeError(f"save_pretrained: report must be a dict or None, got {type(report).__name__}")
    out_dir = _fspath(out_dir, "save_pretrained")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"save_pretrained: {out_dir!r} is a file; give a directory")
    blocker = _blocking_file(os.path.join(out_dir, WEIGHTS_NAME))
    if blocker is not None:
        raise NotADirectoryError(f"save_pretrained: cannot create {out_dir!r}: {blocker!r} is a regular file")
    layers = describe_model(model)
    layers_json = json.dumps(layers, sort_keys=True)
    tensors = dict(model.state_dict())
    for k, t in _nonpersistent_buffers(model).items():
        tensors[NONPERSISTENT_PREFIX + k] = t
    tensors = tensors_to_save(tensors, "save_pretrained")
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "producer": f"sparsekit {__version__}",
              "weights": WEIGHTS_NAME, "num_layers": len(layers), "layers": layers,
              "report": json.loads(json.dumps(report, default=str)) if report is not None else None}
    meta = {"format": "pt", "producer": f"sparsekit {__version__}", "sparsekit_format": FORMAT,
            "sparsekit_format_version": str(FORMAT_VERSION), "sparsekit_layers": layers_json}
    st = _safetensors()
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write(os.path.join(out_dir, WEIGHTS_NAME), lambda tmp: st.save_file(tensors, tmp, metadata=meta))

    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    _atomic_write(os.path.join(out_dir, CONFIG_NAME), dump)
    return out_dir


def _read_config(out_dir: str) -> dict:
    path = os.path.join(out_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_pretrained: no {CONFIG_NAME} in {out_dir!r} (not a save_pretrained "
                                f"directory)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"load_pretrained: {path!r} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"load_pretrained: {path!r} must hold a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT:
        raise ValueError(f"load_pretrained: {path!r} has format {config.get('format')!r}, expected {FORMAT!r}")
    v = config.get("format_version")
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= FORMAT_VERSION:
        raise ValueError(f"load_pretrained: {path!r} has unknown format_version {v!r}; this sparsekit reads "
                         f"format versions 1..{FORMAT_VERSION} (a newer one needs a newer sparsekit)")
    layers = config.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"load_pretrained: {path!r}: 'layers' must be an object path -> description, "
                         f"got {type(layers).__name__}")
    weights = config.get("weights", WEIGHTS_NAME)
    if not isinstance(weights, str) or not weights or os.path.basename(weights) != weights \
            or weights in (".", ".."):
        raise ValueError(f"load_pretrained: {path!r}: 'weights' must be a file name in the directory, "
                         f"got {weights!r}")
    return config


def _read_weights(path: str) -> tuple:
    st = _safetensors()
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_pretrained: no weights file {path!r}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        sd = st.load_file(path)
    except Exception as e:  # SafetensorError (invalid header, truncated data, ...)
        if isinstance(e, (PermissionError, MemoryError)):
            raise
        raise ValueError(f"load_pretrained: {path!r} is not a valid safetensors file: {e}") from e
    return sd, meta


def _rebuild(layers: dict, model: nn.Module, device, backend) -> dict:
    """path -> rebuilt empty module (shared modules shared); ValueError naming the layer otherwise."""
    from .schemes import registry

    built = {}
    for name, desc in layers.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"load_pretrained: layer paths must be non-empty strings, got {name!r}")
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load_pretrained: layer {name!r} of the checkpoint is not in the model (the skeleton "
                             f"has no module at {name!r})") from None
        if isinstance(desc, dict) and set(desc) == {"same_as"}:
            continue
        if not isinstance(desc, dict) or not isinstance(desc.get("scheme"), str):
            raise ValueError(f"load_pretrained: layer {name!r}: a description needs a 'scheme', got {desc!r}")
        if desc["scheme"] not in registry:
            raise ValueError(f"load_pretrained: layer {name!r} uses the unknown scheme {desc['scheme']!r}; "
                             f"known: {', '.join(registry.names())}")
        params = desc.get("params")
        if not isinstance(target, nn.Linear):
            raise ValueError(f"load_pretrained: layer {name!r} is a {type(target).__name__} in the model; the "
                             f"checkpoint's {desc['scheme']!r} layer replaces an nn.Linear (give a dense skeleton)")
        check_linear_fits(target, params, f"load_pretrained: layer {name!r} does not match the skeleton",
                          "the model's")
        dev = device if device is not None else target.weight.device
        if torch.device(dev).type == "meta":
            dev = torch.device("cpu")
        try:
            built[name] = registry.get(desc["scheme"]).rebuild(desc, device=dev, backend=backend)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"load_pretrained: layer {name!r} ({desc['scheme']}): {e}") from e
    for name, desc in layers.items():
        if isinstance(desc, dict) and set(desc) == {"same_as"}:
            if desc["same_as"] not in built:
                raise ValueError(f"load_pretrained: layer {name!r} is described as the same module as "
                                 f"{desc['same_as']!r}, which is not described")
            built[name] = built[desc["same_as"]]
    return built


def check_linear_fits(target: nn.Linear, params, what: str, whose: str) -> None:
    """``ValueError`` starting with ``what`` if a layer description's ``params`` (in/out features, bias) differ
    from the ``nn.Linear`` it replaces (``whose``: how the message names that layer's owner)."""
    if not isinstance(params, dict):
        return
    want = (params.get("in_features"), params.get("out_features"), params.get("bias"))
    have = (target.in_features, target.out_features, target.bias is not None)
    if want != have:
        raise ValueError(f"{what}: the checkpoint has in_features={want[0]}, out_features={want[1]}, "
                         f"bias={want[2]}; {whose} nn.Linear has in_features={have[0]}, out_features={have[1]}, "
                         f"bias={have[2]}")


def _under(key: str, paths) -> Optional[str]:
    parts = key.split(".")
    for i in range(1, len(parts)):
        head = ".".join(parts[:i])
        if head in paths:
            return head
    return None


def _inside(name: str, paths) -> bool:
    """Whether module ``name`` is one of ``paths`` or below one of them."""
    return name in paths or _under(name, paths) is not None


def materialize_meta(modules, device) -> None:
    """Put an uninitialized tensor on ``device`` (same shape, dtype and ``requires_grad``) in place of every
    meta parameter and buffer of ``modules``, an iterable of modules; a tensor held in several places (tied
    weights) is replaced by one tensor in all of them."""
    new_tensors: dict = {}
    for mod in modules:
        for attr, t in list(mod._parameters.items()):
            if t is not None and t.device.type == "meta":
                if id(t) not in new_tensors:
                    new_tensors[id(t)] = nn.Parameter(torch.empty_like(t, device=device),
                                                      requires_grad=t.requires_grad)
                mod._parameters[attr] = new_tensors[id(t)]
        for attr, t in list(mod._buffers.items()):
            if t is not None and t.device.type == "meta":
                if id(t) not in new_tensors:
                    new_tensors[id(t)] = torch.empty_like(t, device=device)
                mod._buffers[attr] = new_tensors[id(t)]


def load_pretrained(out_dir, model: nn.Module, *, device=None, backend: Optional[str] = None) -> nn.Module:
    """Load a :func:`save_pretrained` directory into ``model``, a dense skeleton of the saved architecture
    (plain ``nn.Linear`` layers where the saved model has compressed ones; possibly on the meta device);
    returns ``model`` (in eval mode) with the compressed modules rebuilt in place and every tensor loaded.

    No calibration and no compression run: each layer's module is rebuilt from its description
    (:meth:`Scheme.rebuild`) and filled from the file.  Tensors of the skeleton on the meta device are
    materialized on ``device`` (default: CPU); rebuilt modules go to ``device`` or to the device of the
    layer they replace.  ``backend``: a forced backend for the rebuilt modules (default: auto).

    All or nothing: the model changes only when every check passed.  An unknown format version, a layer
    the skeleton lacks or has with another size, a described layer without tensors in the file, compressed
    tensors of an undescribed layer, missing or unexpected tensors, other shapes or dtypes than the
    skeleton's, or contents a packed module rejects raise ValueError (naming the layer or tensor); a
    missing directory or file FileNotFoundError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_pretrained: model must be an nn.Module, got {type(model).__name__}")
    out_dir = _fspath(out_dir, "load_pretrained")
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"load_pretrained: {out_dir!r} is not a directory")
    if device is not None:
        device = torch.device(device)
        if device.type == "meta":
            raise ValueError("load_pretrained: device must hold data, got the meta device")
    config = _read_config(out_dir)
    layers = config["layers"]
    wpath = os.path.join(out_dir, config.get("weights", WEIGHTS_NAME))
    sd, meta = _read_weights(wpath)
    if meta.get("sparsekit_format", FORMAT) != FORMAT:
        raise ValueError(f"load_pretrained: {wpath!r} has format {meta.get('sparsekit_format')!r}, "
                         f"expected {FORMAT!r}")
    if "sparsekit_layers" in meta:
        try:
            header_layers = json.loads(meta["sparsekit_layers"])
        except json.JSONDecodeError as e:
            raise ValueError(f"load_pretrained: {wpath!r}: its header's sparsekit_layers is not JSON: {e}") from e
        if header_layers != layers:
            differ = sorted(set(header_layers) ^ set(layers)) or sorted(
                k for k in layers if header_layers.get(k) != layers[k])
            raise ValueError(f"load_pretrained: {CONFIG_NAME} and {WEIGHTS_NAME} of {out_dir!r} describe different "
                             f"layers (e.g. {_few(differ, 3)}): they come from different saves")
    nonpersistent = {k[len(NONPERSISTENT_PREFIX):]: sd.pop(k) for k in list(sd) if k.startswith(NONPERSISTENT_PREFIX)}

    built = _rebuild(layers, model, device, backend)
    replaced = set(built)
    # tensors renamed since the checkpoint was written (e.g. a 2:4 layer's ``meta`` -> ``meta_codes``)
    sd = upgrade_state_dict(itertools.chain(model.named_modules(), built.items()), sd)

    # the state the model will expect: the skeleton's outside the replaced layers, the rebuilt modules' inside
    skeleton = model.state_dict(keep_vars=True)
    expected = {k: t for k, t in skeleton.items() if _under(k, replaced) is None}
    for name, mod in built.items():
        for k, t in mod.state_dict(keep_vars=True).items():
            expected[f"{name}.{k}"] = t
    # layer-level errors first: a described layer with no tensors, compressed tensors of an undescribed layer
    for name in layers:
        if not any(k.startswith(name + ".") for k in sd):
            raise ValueError(f"load_pretrained: layer {name!r} is described in {CONFIG_NAME} but {wpath!r} holds "
                             f"no tensors for it")
    unexpected = [k for k in sd if k not in expected]
    missing = [k for k in expected if k not in sd]
    for k in unexpected:
        owner = k.rpartition(".")[0]
        try:
            mod = model.get_submodule(owner) if owner else model
        except AttributeError:
            continue
        if isinstance(mod, nn.Linear) and owner not in replaced:
            raise ValueError(f"load_pretrained: layer {owner!r} has compressed tensors in {wpath!r} "
                             f"({_few([x for x in unexpected if x.rpartition('.')[0] == owner])}) but "
                             f"{CONFIG_NAME} does not describe it")
    if missing or unexpected:
        parts = ([f"missing tensors {_few(missing)}"] if missing else []) + \
                ([f"unexpected tensors {_few(unexpected)}"] if unexpected else [])
        raise ValueError(f"load_pretrained: {wpath!r} does not fit the model: {'; '.join(parts)}")
    # the skeleton's own tensors: same shapes and dtypes (outputs equal the saved model's only then)
    for k, want in expected.items():
        if _under(k, replaced) is not None:
            continue
        got = sd[k]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"load_pretrained: {k!r} has shape {tuple(got.shape)} in {wpath!r}, the skeleton "
                             f"expects {tuple(want.shape)}")
        if got.dtype != want.dtype:
            raise ValueError(f"load_pretrained: {k!r} is {got.dtype} in {wpath!r}, the skeleton's is {want.dtype} "
                             f"(build the skeleton in the saved dtype, e.g. model.to({got.dtype}))")
    # tensors the model shares (tied weights, shared layers) must come back identical
    groups: dict = {}
    for k, t in expected.items():
        groups.setdefault(id(t), []).append(k)
    for keys in groups.values():
        for k in keys[1:]:
            a, b = sd[keys[0]], sd[k]
            if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(_bits(a), _bits(b)):
                raise ValueError(f"load_pretrained: {keys[0]!r} and {k!r} are the same tensor in the model "
                                 f"(shared or tied) but differ in {wpath!r}")
    # non-persistent buffers of a meta skeleton come from the file
    meta_buffers = {}
    for name, mod in model.named_modules():
        if _inside(name, replaced):
            continue
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            t = mod._buffers.get(b)
            key = f"{name}.{b}" if name else b
            if t is not None and t.device.type == "meta":
                if key not in nonpersistent:
                    raise ValueError(f"load_pretrained: the skeleton's non-persistent buffer {key!r} is on the meta "
                                     f"device and {wpath!r} does not hold it")
                if tuple(nonpersistent[key].shape) != tuple(t.shape) or nonpersistent[key].dtype != t.dtype:
                    raise ValueError(f"load_pretrained: non-persistent buffer {key!r} is {tuple(t.shape)} {t.dtype} "
                                     f"in the skeleton, {tuple(nonpersistent[key].shape)} "
                                     f"{nonpersistent[key].dtype} in {wpath!r}")
                meta_buffers[key] = nonpersistent[key]
    # the packed modules validate their contents in their own loader: load the fresh, unattached modules now
    for name, mod in built.items():
        sub = {k[len(name) + 1:]: v for k, v in sd.items() if _under(k, {name}) == name}
        try:
            mod.load_state_dict(sub, strict=True)
        except (ValueError, TypeError, RuntimeError, IndexError) as e:
            raise ValueError(f"load_pretrained: layer {name!r} ({layers[name].get('scheme', 'shared')}): "
                             f"{wpath!r} does not fit its {type(mod).__name__}: {' '.join(str(e).split())}") from e

    # --- every check passed: change the model
    target = device if device is not None else torch.device("cpu")
    materialize_meta((mod for name, mod in model.named_modules(remove_duplicate=False)
                      if not _inside(name, replaced)), target)
    for name, mod in built.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, mod)
    dense = {k: v for k, v in sd.items() if _under(k, replaced) is None}
    result = model.load_state_dict(dense, strict=False)
    if result.unexpected_keys or any(_under(k, replaced) is None for k in result.missing_keys):
        raise ValueError(f"load_pretrained: {wpath!r} could not be loaded into the model: {result}")
    with torch.no_grad():
        for key, t in meta_buffers.items():
            owner, _, b = key.rpartition(".")
            mod = model.get_submodule(owner) if owner else model
            mod._buffers[b].copy_(t)
    model.eval()
    return model
