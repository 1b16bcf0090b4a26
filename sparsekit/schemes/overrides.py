"""Per-layer overrides: a different scheme, different parameters, or no conversion, per module path.

One mapping serves every entry point (``sparsify_``, ``quantize_``, ``compress``,
``sparsekit compress --override``).  Keys:

* an exact module name (``"model.layers.0.mlp.down_proj"``);
* ``"re:<regex>"``: every layer whose name matches (``re.search``; the first
  matching pattern in the mapping's order wins);
* ``"_default"``: every other layer (instead of the entry point's scheme).

An exact name beats a pattern, a pattern beats ``"_default"``.  Values:

* ``None``: leave the layer as it is;
* a scheme name (``"int4"``): that scheme's defaults -- the default scheme's
  own config when it is the same scheme; another scheme takes the default
  config's calibration method (and its options) when it has that method,
  else its calibrated default (e.g. GPTQ) when the entry point was given
  calibration data, else its data-free default (e.g. RTN);
* a dict of parameters (``{"group_size": 64}``, ``{"sparsity": 0.75}``) that
  replace those of the default config, or with a ``"scheme"`` key
  (``{"scheme": "int4", "group_size": 64}``) a config of that scheme;
* a config object (``Int4Params(...)``, or ``Int4Config(...)``).

A layer used under several names (a shared module) is converted once: the
overrides must give all its names the same value (``ValueError`` otherwise).
An exact key that names no layer being converted raises ``ValueError``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional, Sequence

from .base import SchemeConfig, configs_equal

__all__ = ["DEFAULT_KEY", "REGEX_PREFIX", "normalize_spec", "resolve_overrides", "check_overrides"]

DEFAULT_KEY = "_default"
REGEX_PREFIX = "re:"
_NO_MATCH = object()


def _fresh(scheme, base: Optional[SchemeConfig], calibrated: bool, params: dict) -> SchemeConfig:
    params = dict(params)
    if params.get("method") is None:
        params.pop("method", None)
        if base is not None and base.method in scheme.methods:
            params["method"] = base.method
            params.setdefault("method_options", dict(base.method_options))
        else:
            params["method"] = scheme.config_cls.CALIBRATED_METHOD if calibrated else scheme.config_cls.DEFAULT_METHOD
    return _construct(scheme.config_cls, params, scheme.name)


def _construct(cls, params: dict, scheme_name: str, base: Optional[SchemeConfig] = None) -> SchemeConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(params) - known)
    if bad:
        raise ValueError(f"unknown parameter(s) {bad} for scheme {scheme_name!r}; it takes {sorted(known)}")
    if base is not None:
        return dataclasses.replace(base, **params)
    return cls(**params)


def normalize_spec(value, base: Optional[SchemeConfig], registry, calibrated: bool = False,
                   where: str = "overrides") -> Optional[SchemeConfig]:
    """``value`` (see the module docstring) as a scheme config, or None for "leave the layer alone".

    ``base``: the entry point's default config (what a parameter dict modifies);
    ``calibrated``: a new scheme's default method is its calibrated one (True,
    as ``compress`` does) or its data-free one.
    """
    if value is None:
        return None
    if isinstance(value, SchemeConfig):
        registry.for_config(value)
        return value
    to_cfg = getattr(value, "scheme_config", None)
    if callable(to_cfg) and not isinstance(value, (str, dict)):
        return to_cfg()
    if isinstance(value, str):
        scheme = registry.get(value)
        if base is not None and base.SCHEME == value:
            return base
        return _fresh(scheme, base, calibrated, {})
    if isinstance(value, Mapping):
        params = dict(value)
        name = params.pop("scheme", None)
        if name is None or (base is not None and name == base.SCHEME):
            if base is None:
                raise ValueError(f"{where}: {value!r} gives parameters without a 'scheme' and there is no "
                                 f"default scheme to apply them to")
            return _construct(type(base), params, base.SCHEME, base=base)
        return _fresh(registry.get(name), base, calibrated, params)
    raise TypeError(f"{where}: a value must be None, a scheme name, a dict of parameters or a scheme config, "
                    f"got {type(value).__name__}")


def check_overrides(overrides, what: str = "overrides") -> dict:
    """Validate the keys of an overrides mapping (types, regexes); returns it as a dict."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"{what} must be a dict (module name, 're:<regex>' or '_default' -> scheme, parameters, "
                        f"config or None), got {type(overrides).__name__}")
    out = {}
    for k, v in overrides.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"{what} keys must be module names, 're:<regex>' or '_default', got {k!r}")
        if k.startswith(REGEX_PREFIX):
            try:
                re.compile(k[len(REGEX_PREFIX):])
            except re.error as e:
                raise ValueError(f"{what}: {k!r} is not a valid regular expression: {e}") from None
        out[k] = v
    return out


def _same(a, b) -> bool:
    return a is b or (a is not None and b is not None and configs_equal(a, b))


def resolve_overrides(targets: Sequence, base: Optional[SchemeConfig], overrides, registry,
                      calibrated: bool = False, what: str = "overrides") -> list:
    """``[(target, config or None)]`` for each :class:`~sparsekit.convert.Target` (see the module docstring)."""
    overrides = check_overrides(overrides, what)
    norm = {k: normalize_spec(v, base, registry, calibrated, f"{what}[{k!r}]") for k, v in overrides.items()}
    exact = {k for k in overrides if not k.startswith(REGEX_PREFIX) and k != DEFAULT_KEY}
    patterns = [(k, re.compile(k[len(REGEX_PREFIX):])) for k in overrides if k.startswith(REGEX_PREFIX)]
    known = {n for t in targets for n in t.names}
    unknown = sorted(exact - known)
    if unknown:
        raise ValueError(f"{what} names layers that are not converted: {unknown}")
    default = norm[DEFAULT_KEY] if DEFAULT_KEY in norm else base
    out = []
    for t in targets:
        hits = [(n, norm[n]) for n in t.names if n in exact]
        if hits:
            for n, c in hits[1:]:
                if not _same(hits[0][1], c):
                    raise ValueError(f"{what} give the shared layer different values under {hits[0][0]!r} and {n!r}")
            out.append((t, hits[0][1]))
            continue
        found = []
        for n in t.names:
            v = _NO_MATCH
            for k, rx in patterns:
                if rx.search(n) is not None:
                    v = norm[k]
                    break
            found.append((n, v))
        first = found[0][1]
        for n, v in found[1:]:
            if not (v is first or (v is not _NO_MATCH and first is not _NO_MATCH and _same(v, first))):
                raise ValueError(f"{what} give the shared layer different values under {found[0][0]!r} and {n!r}")
        out.append((t, default if first is _NO_MATCH else first))
    return out
