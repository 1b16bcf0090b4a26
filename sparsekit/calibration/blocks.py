"""The repeated blocks of a model (decoder / encoder layers), the unit of block-by-block calibration."""
from __future__ import annotations

from typing import Iterable, Optional, Union

from torch import nn

__all__ = ["find_blocks"]


def _contains(block: nn.Module, target_ids: set) -> int:
    return sum(1 for m in block.modules() if id(m) in target_ids)


def _no_split_classes(model: nn.Module) -> set:
    """Class names a Hugging Face model declares as never to be split (``_no_split_modules``)."""
    names = set()
    for m in model.modules():
        found = getattr(type(m), "_no_split_modules", None)
        if isinstance(found, (list, tuple, set)):
            names.update(n for n in found if isinstance(n, str))
    return names


def _outermost(found: list) -> list:
    """Drop every candidate that lies inside another candidate."""
    out = []
    for name, mod in found:
        if any(name.startswith(o + ".") for o, _ in out):
            continue
        out.append((name, mod))
    return out


def _auto(model: nn.Module, target_ids: set) -> list:
    named = list(model.named_modules())
    # 1. classes the model declares as its blocks (transformers' _no_split_modules)
    classes = _no_split_classes(model)
    if classes:
        by_class: dict = {}
        for name, mod in named:
            if name and type(mod).__name__ in classes and id(mod) not in target_ids:
                by_class.setdefault(type(mod).__name__, []).append((name, mod))
        best = None
        for found in by_class.values():
            found = [(n, m) for n, m in _outermost(found) if _contains(m, target_ids)]
            if len(found) >= 2 and (best is None or len(found) > len(best)):
                best = found
        if best is not None:
            return best
    # 2. the ModuleList / Sequential of same-class containers holding the most layers to compress
    best = None
    for name, mod in named:
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        children = [(f"{name}.{k}" if name else k, c) for k, c in mod._modules.items() if c is not None]
        if len(children) < 2 or len({type(c) for _, c in children}) != 1:
            continue
        if any(id(c) in target_ids for _, c in children):
            continue
        holding = [(n, c) for n, c in children if _contains(c, target_ids)]
        if len(holding) < 2 or len(holding) != len(children):
            continue
        if best is None or len(holding) > len(best):
            best = holding
    return best or []


def _valid(blocks: list, target_ids: set) -> Optional[str]:
    """Why ``blocks`` cannot be calibrated one after another (None when they can)."""
    ids = {id(mod): name for name, mod in blocks}
    for name, mod in blocks:
        for m in mod.modules():
            if m is not mod and id(m) in ids:
                return f"block {name!r} contains another block ({ids[id(m)]!r})"
    seen = set()
    owner: dict = {}
    for name, mod in blocks:
        if id(mod) in seen:
            return f"block {name!r} appears twice (a shared block)"
        seen.add(id(mod))
        if id(mod) in target_ids:
            return f"block {name!r} is itself a layer to compress"
        for m in mod.modules():
            if id(m) in target_ids:
                if id(m) in owner and owner[id(m)] != name:
                    return f"a layer to compress is in two blocks ({owner[id(m)]!r} and {name!r})"
                owner[id(m)] = name
    return None


def find_blocks(model: nn.Module, targets: Iterable[nn.Module],
                blocks: Union[None, str, Iterable[str]] = "auto") -> list:
    """``[(name, block)]``: the blocks in which ``targets`` are calibrated one after another, in model order.

    ``blocks``:

    * ``"auto"``: the classes a Hugging Face model names in ``_no_split_modules``
      (e.g. ``LlamaDecoderLayer``, ``BertLayer``) when at least two of them hold
      layers to compress; else the ``nn.ModuleList`` / ``nn.Sequential`` of
      same-class containers (e.g. ``model.layers``, ``blocks``) whose every
      child holds layers to compress, the one with the most children.  ``[]``
      when there is none (the whole model is then calibrated as one block), or
      when the found blocks cannot be calibrated one after another (a shared
      block, a layer in two blocks).
    * ``None``: ``[]``.
    * the name of an ``nn.ModuleList`` / ``nn.Sequential``: its children.
    * a list of module names: those modules.

    Explicit blocks that cannot be used raise ``ValueError``.
    """
    target_ids = {id(t) for t in targets}
    if blocks is None:
        return []
    if isinstance(blocks, str) and blocks == "auto":
        found = _auto(model, target_ids)
        return found if found and _valid(found, target_ids) is None else []
    if isinstance(blocks, str):
        try:
            parent = model.get_submodule(blocks)
        except AttributeError:
            raise ValueError(f"blocks: the model has no submodule named {blocks!r}") from None
        if not isinstance(parent, (nn.ModuleList, nn.Sequential)):
            raise ValueError(f"blocks={blocks!r} names a {type(parent).__name__}; name an nn.ModuleList or "
                             f"nn.Sequential of blocks, or give a list of block names")
        found = [(f"{blocks}.{k}" if blocks else k, c) for k, c in parent._modules.items() if c is not None]
    else:
        try:
            names = list(blocks)
        except TypeError:
            raise TypeError(f"blocks must be 'auto', None, a module name or a list of module names, "
                            f"got {type(blocks).__name__}") from None
        found = []
        for n in names:
            if not isinstance(n, str):
                raise TypeError(f"blocks: names must be strings, got {n!r}")
            try:
                found.append((n, model.get_submodule(n)))
            except AttributeError:
                raise ValueError(f"blocks: the model has no submodule named {n!r}") from None
    if not found:
        raise ValueError(f"blocks={blocks!r} names no modules")
    why = _valid(found, target_ids)
    if why is not None:
        raise ValueError(f"blocks={blocks!r} cannot be calibrated one after another: {why}")
    return found
