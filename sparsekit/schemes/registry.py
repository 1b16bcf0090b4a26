""":class:`SchemeRegistry`: scheme name -> :class:`~sparsekit.schemes.Scheme`, with plug-ins loaded on first lookup."""
from __future__ import annotations

import warnings
from typing import Iterator, Optional

from torch import nn

from .base import Scheme, SchemeConfig

__all__ = ["SchemeRegistry", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "sparsekit.schemes"


class SchemeRegistry:
    """Every compression scheme by name.  Registering a name twice raises ``ValueError``.

    Plug-ins are installed packages that declare an entry point in the group
    ``sparsekit.schemes`` (``[project.entry-points."sparsekit.schemes"]``); the
    entry point names a :class:`Scheme` instance, a list of them, or a function
    that takes the registry and registers its schemes.  They are loaded once,
    on the first lookup (not when sparsekit is imported); a plug-in that fails
    to load is reported with a ``RuntimeWarning`` and skipped.
    """

    def __init__(self, entry_point_group: Optional[str] = ENTRY_POINT_GROUP):
        self._schemes: dict = {}
        self._by_config: dict = {}
        self._group = entry_point_group
        self._plugins_loaded = entry_point_group is None
        self._loading = False

    # ------------------------------------------------------------------ registration
    def register(self, scheme: Scheme) -> Scheme:
        if not isinstance(scheme, Scheme):
            raise TypeError(f"register takes a Scheme instance, got {type(scheme).__name__}")
        if not isinstance(scheme.name, str) or not scheme.name:
            raise ValueError(f"a scheme needs a non-empty name, got {scheme.name!r}")
        if scheme.name in self._schemes:
            raise ValueError(f"scheme {scheme.name!r} is already registered "
                             f"({type(self._schemes[scheme.name]).__name__}); scheme names are unique")
        cfg_cls = scheme.config_cls
        if not (isinstance(cfg_cls, type) and issubclass(cfg_cls, SchemeConfig)):
            raise TypeError(f"scheme {scheme.name!r}: config_cls must be a SchemeConfig subclass, got {cfg_cls!r}")
        if cfg_cls.SCHEME != scheme.name:
            raise ValueError(f"scheme {scheme.name!r}: its config class {cfg_cls.__name__} says SCHEME="
                             f"{cfg_cls.SCHEME!r}")
        if cfg_cls in self._by_config:
            raise ValueError(f"config class {cfg_cls.__name__} already belongs to scheme "
                             f"{self._by_config[cfg_cls].name!r}")
        self._schemes[scheme.name] = scheme
        self._by_config[cfg_cls] = scheme
        return scheme

    def _load_plugins(self) -> None:
        if self._plugins_loaded or self._loading:
            return
        self._loading = True
        try:
            from importlib.metadata import entry_points

            for ep in entry_points(group=self._group):
                try:
                    obj = ep.load()
                    if isinstance(obj, Scheme):
                        self.register(obj)
                    elif isinstance(obj, (list, tuple)):
                        for s in obj:
                            self.register(s)
                    elif callable(obj):
                        obj(self)
                    else:
                        raise TypeError(f"entry point gives a {type(obj).__name__}, not a Scheme, a list of "
                                        f"Schemes or a function(registry)")
                except Exception as e:  # noqa: BLE001 - one broken plug-in must not break the others
                    warnings.warn(f"sparsekit scheme plug-in {ep.name!r} ({ep.value}) was not loaded: "
                                  f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=3)
        finally:
            self._plugins_loaded = True
            self._loading = False

    # ------------------------------------------------------------------ lookup
    def get(self, name: str) -> Scheme:
        """The scheme called ``name``; ``ValueError`` naming the known schemes otherwise."""
        self._load_plugins()
        if not isinstance(name, str):
            raise TypeError(f"a scheme name must be a str, got {type(name).__name__}")
        try:
            return self._schemes[name]
        except KeyError:
            raise ValueError(f"unknown scheme {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> tuple:
        self._load_plugins()
        return tuple(self._schemes)

    def __contains__(self, name) -> bool:
        self._load_plugins()
        return name in self._schemes

    def __iter__(self) -> Iterator[Scheme]:
        self._load_plugins()
        return iter(list(self._schemes.values()))

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._schemes)

    def for_config(self, cfg: SchemeConfig) -> Scheme:
        """The scheme a config object belongs to."""
        self._load_plugins()
        try:
            return self._by_config[type(cfg)]
        except KeyError:
            raise TypeError(f"{type(cfg).__name__} is not the config of a registered scheme") from None

    def for_module(self, module: nn.Module) -> Optional[Scheme]:
        """The scheme that built ``module`` (None for a module no scheme describes)."""
        self._load_plugins()
        for s in self._schemes.values():
            if s.owns(module):
                return s
        return None

    def config_from_dict(self, data: dict) -> SchemeConfig:
        """A config from its :meth:`SchemeConfig.to_dict` form."""
        if not isinstance(data, dict) or "scheme" not in data:
            raise ValueError(f"a scheme config dict needs a 'scheme' key, got {data!r}")
        return self.get(data["scheme"]).config_cls.from_dict(data)

    def methods(self) -> tuple:
        """Every calibration method of every scheme, in first-seen order."""
        out = []
        for s in self:
            for m in s.methods:
                if m not in out:
                    out.append(m)
        return tuple(out)

    def with_field(self, name: str) -> tuple:
        """Names of the schemes whose config has the field ``name``."""
        import dataclasses

        return tuple(s.name for s in self if name in {f.name for f in dataclasses.fields(s.config_cls)})
