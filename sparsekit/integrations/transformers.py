"""Hugging Face transformers integration: the quantization method ``"sparsekit"``.

Importing this module registers, through transformers' public registration API
(``transformers.quantizers.register_quantization_config`` / ``register_quantizer``),
:class:`SparsekitConfig` and :class:`SparsekitHfQuantizer` under ``quant_method: "sparsekit"``.
A model compressed by ``sparsekit.compress.compress`` / ``sparsify_`` / ``quantize_`` is written with
:func:`save_pretrained` as an ordinary transformers directory: ``config.json`` holds

    "quantization_config": {"quant_method": "sparsekit", "format_version": 1, "producer": ...,
                            "layers": {module path: description}}

(the descriptions of :func:`sparsekit.schemes.describe_model`) and ``model.safetensors`` the packed
tensors.  ``AutoModelForCausalLM.from_pretrained(dir)`` / ``AutoModel.from_pretrained(dir)`` then build
the architecture on the meta device, put an empty sparsekit module rebuilt from each description
(:meth:`Scheme.rebuild`: no calibration, no compression) at its path, load the tensors and validate
every packed module's contents.  A loaded model saves again with ``model.save_pretrained``.

Errors: an unknown ``format_version``, a described layer the architecture lacks (or has with another
size or type), a dtype that contradicts the compressed layers', or tensors of a compressed layer
missing from the checkpoint raise ``ValueError`` naming the layer.
"""
from __future__ import annotations

import json
import os
from typing import Optional

try:
    import transformers
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as _e:  # pragma: no cover - exercised in a process without transformers
    raise ImportError("sparsekit.integrations.transformers needs Hugging Face transformers; install the extra: "
                      "pip install 'sparsekit[hf]'") from _e

from torch import nn

from ..pretrained import FORMAT_VERSION, check_linear_fits

__all__ = ["QUANT_METHOD", "FORMAT_VERSION", "SparsekitConfig", "SparsekitHfQuantizer", "save_pretrained",
           "quantization_config_for"]

QUANT_METHOD = "sparsekit"
logger = transformers.logging.get_logger(__name__)


def _check_format_version(v, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= FORMAT_VERSION:
        raise ValueError(f"{where}: unknown sparsekit format_version {v!r}; this sparsekit reads format versions "
                         f"1..{FORMAT_VERSION} (a newer one needs a newer sparsekit)")
    return v


class SparsekitConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a sparsekit-compressed transformers model.

    ``layers``: module path -> description (:func:`sparsekit.schemes.describe_model`);
    ``format_version``: the checkpoint format (:data:`sparsekit.pretrained.FORMAT_VERSION`);
    ``producer``: the sparsekit version that wrote it; ``report``: the compression report or None.
    """

    def __init__(self, layers: Optional[dict] = None, format_version: int = FORMAT_VERSION,
                 producer: Optional[str] = None, report: Optional[dict] = None, **kwargs):
        quant_method = kwargs.pop("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            raise ValueError(f"SparsekitConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if kwargs:
            raise ValueError(f"SparsekitConfig: unknown fields {sorted(kwargs)}; known: layers, format_version, "
                             f"producer, report")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.producer = producer
        self.layers = layers if layers is not None else {}
        self.report = report
        self.post_init()

    def post_init(self):
        _check_format_version(self.format_version, "SparsekitConfig")
        if not isinstance(self.layers, dict):
            raise ValueError(f"SparsekitConfig: layers must be a dict path -> description, got "
                             f"{type(self.layers).__name__}")
        for name, desc in self.layers.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"SparsekitConfig: layer paths must be non-empty strings, got {name!r}")
            if not isinstance(desc, dict) or not (isinstance(desc.get("scheme"), str) or set(desc) == {"same_as"}):
                raise ValueError(f"SparsekitConfig: layer {name!r}: a description needs a 'scheme' (or is "
                                 f"{{'same_as': path}}), got {desc!r}")
        if self.report is not None and not isinstance(self.report, dict):
            raise ValueError(f"SparsekitConfig: report must be a dict or None, got {type(self.report).__name__}")

    def to_dict(self) -> dict:
        out = {"quant_method": QUANT_METHOD, "format_version": self.format_version, "producer": self.producer,
               "layers": json.loads(json.dumps(self.layers))}
        if self.report is not None:
            out["report"] = json.loads(json.dumps(self.report, default=str))
        return out


def quantization_config_for(model: nn.Module, report: Optional[dict] = None) -> SparsekitConfig:
    """The :class:`SparsekitConfig` describing every compressed module of ``model``."""
    from .. import __version__
    from ..schemes import describe_model

    return SparsekitConfig(layers=describe_model(model), producer=f"sparsekit {__version__}", report=report)


def _text_configs(config) -> list:
    out = [config]
    get = getattr(config, "get_text_config", None)
    if get is not None:
        try:
            text = get(decoder=True)
        except TypeError:
            text = get()
        if text is not None and text is not config:
            out.append(text)
    return out


def _untie_compressed(model: nn.Module, replaced) -> None:
    """Drop tied-weight pairs that involve a compressed module (its dense weight is gone, so it is not tied)."""
    from ..pretrained import _inside

    tied = getattr(model, "all_tied_weights_keys", None)
    if not tied:
        return
    for target, source in list(tied.items()):
        if _inside(target.rpartition(".")[0], replaced) or _inside(source.rpartition(".")[0], replaced):
            tied.pop(target)
            for cfg in _text_configs(model.config):
                if getattr(cfg, "tie_word_embeddings", False):
                    cfg.tie_word_embeddings = False


def save_pretrained(model: nn.Module, out_dir, report: Optional[dict] = None, **kwargs) -> str:
    """Write the compressed transformers ``model`` to ``out_dir`` with ``model.save_pretrained`` (so the
    weights go to ``model.safetensors`` and the generation config as usual), after setting
    ``model.config.quantization_config`` to the :class:`SparsekitConfig` of its compressed modules.
    ``kwargs`` go to ``model.save_pretrained``; returns ``out_dir``.

    Embeddings tied to a compressed output layer are no longer tied (the layer has no dense weight):
    the saved config says ``tie_word_embeddings: false`` then.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"save_pretrained: model must be a transformers PreTrainedModel, got "
                        f"{type(model).__name__} (use sparsekit.save_pretrained for other modules)")
    if report is not None and not isinstance(report, dict):
        raise TypeError(f"save_pretrained: report must be a dict or None, got {type(report).__name__}")
    qcfg = quantization_config_for(model, report)
    if not qcfg.layers:
        raise ValueError("save_pretrained: the model has no sparsekit-compressed module; compress it first "
                         "(sparsekit.compress.compress, sparsify_ or quantize_)")
    replaced = {k for k, v in qcfg.layers.items()}
    _untie_compressed(model, replaced)
    model.config.quantization_config = qcfg
    model.save_pretrained(out_dir, **kwargs)
    return os.fspath(out_dir)


def _checkpoint_keys(files) -> Optional[set]:
    keys = set()
    for f in files or ():
        if not isinstance(f, str) or not f.endswith(".safetensors"):
            return None
        from safetensors import safe_open

        with safe_open(f, framework="pt") as fh:
            keys.update(fh.keys())
    return keys


class SparsekitHfQuantizer(HfQuantizer):
    """Loads ``quant_method: "sparsekit"`` checkpoints: rebuilds each described layer as its sparsekit module
    before the weights are loaded, validates every packed module after.  Loading only (the layers are
    compressed by sparsekit, not by transformers): ``requires_calibration``."""

    requires_calibration = True
    quantization_config: SparsekitConfig

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._replaced: dict = {}

    # ------------------------------------------------------------------ environment
    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and ("disk" in device_map.values()):
            raise ValueError("sparsekit checkpoints cannot be offloaded to disk; give a device_map without 'disk'")

    # modules that take float32 inputs besides their compute dtype (README "dtype rules")
    _CASTING_MODULES = ("QLinear", "SparseQLinear")

    def update_dtype(self, dtype):
        """The compressed layers keep their saved dtype; ``dtype`` (the rest of the model) must be one every
        layer takes as input: its own dtype, or also float32 for QLinear / SparseQLinear."""
        if dtype is None:
            return dtype
        want = str(dtype).replace("torch.", "")
        for name, desc in self.quantization_config.layers.items():
            params = desc.get("params") if isinstance(desc, dict) else None
            have = params.get("dtype") if isinstance(params, dict) else None
            if not isinstance(have, str):
                continue
            module = desc.get("module")
            takes = (have, "float32") if module in self._CASTING_MODULES else (have,)
            if want not in takes:
                raise ValueError(f"layer {name!r} ({module}, saved in {have}) takes {' or '.join(takes)} inputs; "
                                 f"loading the model with dtype={dtype} would feed it {want}: load with "
                                 f"dtype='auto' (the saved dtype) or {' / '.join('torch.' + t for t in takes)}")
        return dtype

    # ------------------------------------------------------------------ paths
    @staticmethod
    def _resolve(model, names) -> dict:
        """checkpoint layer path -> its path in ``model``, or None for a layer to leave out.

        The checkpoint may come from another class of the same architecture: from the model with a head
        while ``model`` is its base model (paths lose the ``base_model_prefix``), or the other way round
        (paths gain it).  Then, as transformers does with such a checkpoint's tensors, layers ``model`` does
        not have (``lm_head``, a pooler) are left out.  A checkpoint of ``model``'s own class keeps every path
        (a layer the model lacks is an error).
        """
        prefix = getattr(model, "base_model_prefix", "") or ""
        is_head = bool(prefix) and isinstance(getattr(model, prefix, None), nn.Module)

        def exists(p):
            try:
                model.get_submodule(p)
                return True
            except AttributeError:
                return False
        own = [n for n in names if exists(n)]
        if not prefix or own:
            return {n: n for n in names}
        if not is_head and any(n.startswith(prefix + ".") for n in names):
            # a head model's checkpoint in the base model
            cut = {n: n[len(prefix) + 1:] for n in names if n.startswith(prefix + ".")}
            return {n: cut[n] if n in cut and exists(cut[n]) else None for n in names}
        if is_head and any(exists(f"{prefix}.{n}") for n in names):
            # a base model's checkpoint in the model with a head
            return {n: f"{prefix}.{n}" if exists(f"{prefix}.{n}") else None for n in names}
        return {n: n for n in names}

    # ------------------------------------------------------------------ loading
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from ..schemes import registry

        cfg = self.quantization_config
        _check_format_version(cfg.format_version, "quantization_config")
        paths = self._resolve(model, list(cfg.layers))
        skipped = [name for name in cfg.layers if paths[name] is None]
        if skipped:
            logger.info(f"sparsekit: {len(skipped)} described layer(s) are not part of {type(model).__name__} "
                        f"(a checkpoint of another class of the architecture) and are left out: {skipped[:4]}")
        layers = {paths[name]: (name, desc) for name, desc in cfg.layers.items() if paths[name] is not None}
        built = {}
        for path, (name, desc) in layers.items():
            if isinstance(desc, dict) and set(desc) == {"same_as"}:
                continue
            try:
                target = model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"quantization_config: layer {name!r} is not in the {type(model).__name__} "
                                 f"built from this config (no module at {path!r}); the checkpoint does not "
                                 f"fit the architecture") from None
            if desc["scheme"] not in registry:
                raise ValueError(f"quantization_config: layer {name!r} uses the unknown scheme {desc['scheme']!r}; "
                                 f"known: {', '.join(registry.names())}")
            if not isinstance(target, nn.Linear):
                raise ValueError(f"quantization_config: layer {name!r} is a {type(target).__name__} in "
                                 f"{type(model).__name__}; a {desc['scheme']!r} layer replaces an nn.Linear")
            check_linear_fits(target, desc.get("params"),
                              f"quantization_config: layer {name!r} does not fit {type(model).__name__}",
                              "the architecture's")
            try:
                built[path] = registry.get(desc["scheme"]).rebuild(desc, device="meta")
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"quantization_config: layer {name!r} ({desc['scheme']}): {e}") from e
        for path, (name, desc) in layers.items():
            if isinstance(desc, dict) and set(desc) == {"same_as"}:
                src = paths.get(desc["same_as"])
                if src not in built:
                    raise ValueError(f"quantization_config: layer {name!r} is the same module as "
                                     f"{desc['same_as']!r}, which is not described")
                built[path] = built[src]
        keys = _checkpoint_keys(checkpoint_files)
        if keys is not None:
            self._check_checkpoint_keys(model, built, keys)
        for path, mod in built.items():
            parent_name, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, mod)
        _untie_compressed(model, set(built))
        self._replaced = built
        return model

    @staticmethod
    def _check_checkpoint_keys(model, built: dict, keys: set) -> None:
        """The checkpoint's tensors against the rebuilt modules (transformers would initialize a missing tensor
        at random and skip an unexpected one): every tensor of a rebuilt module present, none it lacks, and
        no packed tensors at a dense ``nn.Linear`` the config does not describe."""
        prefix = getattr(model, "base_model_prefix", "") or ""
        by_owner: dict = {}     # module path (as it may be in the model) -> tensor names in the checkpoint
        for k in keys:
            owner, _, leaf = k.rpartition(".")
            names = {owner}
            if prefix:
                names.add(f"{prefix}.{owner}" if owner else prefix)
                if owner.startswith(prefix + "."):
                    names.add(owner[len(prefix) + 1:])
            for n in names:
                by_owner.setdefault(n, set()).add(leaf)
        seen = set()
        for path, mod in built.items():
            if id(mod) in seen:     # a shared module's tensors are saved once, under its first path
                continue
            seen.add(id(mod))
            have = by_owner.get(path, set())
            want = set(mod.state_dict())
            if want - have:
                raise ValueError(f"layer {path!r} ({type(mod).__name__}) is described in quantization_config but "
                                 f"the checkpoint has no tensor {path + '.' + sorted(want - have)[0]!r}")
            if have - want:
                raise ValueError(f"layer {path!r} ({type(mod).__name__}): the checkpoint holds tensors its "
                                 f"{type(mod).__name__} does not have: {sorted(have - want)} (the file and "
                                 f"quantization_config come from different saves)")
        from ..pretrained import _inside

        for name, mod in model.named_modules():
            if type(mod) is nn.Linear and not _inside(name, set(built)):
                have = by_owner.get(name, set())
                if have and "weight" not in have:
                    raise ValueError(f"layer {name!r} has tensors {sorted(have)} in the checkpoint but no weight, and "
                                     f"quantization_config does not describe it (the file and the config come "
                                     f"from different saves)")

    def _process_model_after_weight_loading(self, model, **kwargs):
        seen = set()
        for path, mod in self._replaced.items():
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            for k, t in list(mod.named_parameters()) + list(mod.named_buffers()):
                if t.device.type == "meta":
                    raise ValueError(f"layer {path!r}: tensor {k!r} was not loaded from the checkpoint")
            try:
                mod.validate_state_dict(mod.state_dict(), strict=True)
            except (ValueError, TypeError, RuntimeError, IndexError) as e:
                raise ValueError(f"layer {path!r} ({type(mod).__name__}): the checkpoint's tensors do not fit: "
                                 f"{' '.join(str(e).split())}") from e
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return False


def _register() -> None:
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not SparsekitConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(SparsekitConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not SparsekitHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(SparsekitHfQuantizer)


_register()
