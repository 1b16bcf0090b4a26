"""Compression schemes: one object per scheme, in one registry behind every entry point.

``sparsify_``, ``quantize_``, ``compress``, ``sparsekit compress`` and the
quality table find their schemes here (``registry.get("int4")``).  A
:class:`Scheme` knows

* its config: a versioned, JSON-serializable :class:`SchemeConfig` dataclass
  (``cfg.to_dict()`` / ``registry.config_from_dict(d)``);
* which layers it applies to (``nn.Linear``) and how to check one;
* how it calibrates: its methods (:data:`METHODS`: the statistics of the
  layer inputs each needs) and ``calibrate(layer, stats, cfg)``;
* how it builds the compressed module from a dense layer and the calibration
  result (``build``);
* how it describes a built module for a checkpoint (``describe``: scheme,
  format version, parameters) and rebuilds an empty module of that structure
  from the description, without calibration (``rebuild``; fill it with
  ``load_state_dict``).

Per-layer overrides (:mod:`sparsekit.schemes.overrides`) give single layers
another scheme, other parameters or no conversion.  Other packages add
schemes through the entry-point group ``sparsekit.schemes`` (loaded on the
first lookup).  ``python -m sparsekit.schemes.table`` prints the README's
scheme table.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .base import METHODS, Method, Scheme, SchemeConfig, check_linear, configs_equal
from .block import BlockParams, BlockScheme
from .int4 import Int4Params, Int4Scheme, MixedParams, MixedScheme, W4A8Params, W4A8Scheme, W8A8Params, W8A8Scheme
from .overrides import DEFAULT_KEY, REGEX_PREFIX, normalize_spec, resolve_overrides
from .registry import ENTRY_POINT_GROUP, SchemeRegistry
from .sparse24 import Sparse24Int8Params, Sparse24Int8Scheme, Sparse24Params, Sparse24Scheme
from .sparse24_int4 import Sparse24Int4Params, Sparse24Int4Scheme

__all__ = ["registry", "get_scheme", "scheme_names", "register_scheme", "config_from_dict", "describe_module",
           "describe_model", "rebuild_module", "rebuild_modules", "SchemeRegistry", "Scheme", "SchemeConfig",
           "Method", "METHODS", "ENTRY_POINT_GROUP", "DEFAULT_KEY", "REGEX_PREFIX", "normalize_spec",
           "resolve_overrides", "check_linear", "configs_equal",
           "Sparse24Params", "Sparse24Int8Params", "BlockParams", "W8A8Params", "W4A8Params", "MixedParams",
           "Int4Params", "Sparse24Int4Params"]

registry = SchemeRegistry()
for _scheme in (Sparse24Scheme(), Sparse24Int8Scheme(), BlockScheme(), W8A8Scheme(), W4A8Scheme(), MixedScheme(),
                Int4Scheme(), Sparse24Int4Scheme()):
    registry.register(_scheme)
del _scheme


def get_scheme(name: str) -> Scheme:
    return registry.get(name)


def scheme_names() -> tuple:
    return registry.names()


def register_scheme(scheme: Scheme) -> Scheme:
    """Add a scheme to the registry (a name already taken raises ``ValueError``)."""
    return registry.register(scheme)


def config_from_dict(data: dict) -> SchemeConfig:
    return registry.config_from_dict(data)


def describe_module(module: nn.Module) -> dict:
    """The description of a compressed module (``TypeError`` for a module no scheme built)."""
    scheme = registry.for_module(module)
    if scheme is None:
        raise TypeError(f"no registered scheme describes a {type(module).__name__}")
    return scheme.describe(module)


def describe_model(model: nn.Module) -> dict:
    """``{module path: description}`` for every compressed module of ``model``.

    A module used under several paths is described at its first one; the
    others hold ``{"same_as": first path}``.
    """
    out = {}
    first: dict = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        scheme = registry.for_module(mod)
        if scheme is None:
            continue
        if id(mod) in first:
            out[name] = {"same_as": first[id(mod)]}
            continue
        first[id(mod)] = name
        out[name] = scheme.describe(mod)
    return out


def rebuild_module(description: dict, device=None, backend: Optional[str] = None) -> nn.Module:
    """An empty module with the described structure (fill it with ``load_state_dict``)."""
    if not isinstance(description, dict) or "scheme" not in description:
        raise ValueError(f"a module description needs a 'scheme' key, got {description!r}")
    return registry.get(description["scheme"]).rebuild(description, device=device, backend=backend)


def rebuild_modules(model: nn.Module, descriptions: dict, device=None) -> nn.Module:
    """Put an empty rebuilt module at every path of ``descriptions`` (from :func:`describe_model`), keeping
    shared modules shared.  Every description is rebuilt before any module is replaced."""
    if not isinstance(descriptions, dict):
        raise TypeError(f"descriptions must be a dict path -> description, got {type(descriptions).__name__}")
    built = {}
    for name, desc in descriptions.items():
        if isinstance(desc, dict) and set(desc) == {"same_as"}:
            continue
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no module at {name!r}") from None
        built[name] = rebuild_module(desc, device=device)
    for name, desc in descriptions.items():
        if isinstance(desc, dict) and set(desc) == {"same_as"}:
            if desc["same_as"] not in built:
                raise ValueError(f"{name!r} is described as the same module as {desc['same_as']!r}, "
                                 f"which is not described")
            built[name] = built[desc["same_as"]]
    for name, mod in built.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, mod)
    return model
