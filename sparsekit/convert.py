"""Whole-model conversion: ``sparsify_(model, config)``."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Union

from torch import nn

__all__ = ["Sparse24Config", "sparsify_"]


@dataclass
class Sparse24Config:
    """Swap ``nn.Linear`` layers for 2:4 :class:`~sparsekit.nn.SparseLinear`.

    include / exclude: regular expressions matched (``re.search``) against the
        module's qualified name; a layer is converted when it matches
        ``include`` (or ``include`` is None) and does not match ``exclude``.
    types: module classes to convert (subclasses of ``nn.Linear``).
    backend: forced backend for the new modules (None = automatic).
    """

    include: Optional[str] = None
    exclude: Optional[str] = None
    types: tuple = (nn.Linear,)
    backend: Optional[str] = None

    def __post_init__(self):
        for t in self.types:
            if not (isinstance(t, type) and issubclass(t, nn.Linear)):
                raise TypeError(f"Sparse24Config.types must be nn.Linear subclasses, got {t!r}")

    def matches(self, name: str, module: nn.Module) -> bool:
        if type(module) not in self.types:
            return False
        if self.include is not None and re.search(self.include, name) is None:
            return False
        if self.exclude is not None and re.search(self.exclude, name) is not None:
            return False
        return True

    def convert(self, module: nn.Linear) -> nn.Module:
        from .nn import SparseLinear

        return SparseLinear.from_dense(module, pattern="2:4", backend=self.backend)


_NAMED = {"2:4": Sparse24Config}


def _resolve(config) -> Sparse24Config:
    if isinstance(config, str):
        try:
            return _NAMED[config]()
        except KeyError:
            raise ValueError(f"unknown sparsity config {config!r}; known: {sorted(_NAMED)}") from None
    if isinstance(config, Sparse24Config):
        return config
    raise TypeError(f"config must be a config object or one of {sorted(_NAMED)}, got {type(config).__name__}")


def sparsify_(model: nn.Module, config: Union[str, Sparse24Config] = "2:4",
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, progress: bool = True) -> nn.Module:
    """Replace matching layers of ``model`` in place; returns ``model``.

    ``filter_fn(module, name)`` further restricts which matching layers are
    converted.  A tqdm bar shows progress (``progress=False`` hides it).
    """
    cfg = _resolve(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    targets = [(name, mod) for name, mod in model.named_modules()
               if cfg.matches(name, mod) and (filter_fn is None or filter_fn(mod, name))]
    if not targets:
        return model
    from tqdm.auto import tqdm

    for name, mod in tqdm(targets, desc="sparsify_", unit="layer", disable=not progress):
        new = cfg.convert(mod)
        if name == "":
            raise ValueError("sparsify_ converts submodules; wrap a bare nn.Linear in a container "
                             "or use SparseLinear.from_dense directly")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
    return model
