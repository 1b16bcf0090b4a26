"""All-or-nothing ``load_state_dict`` for sparsekit modules.

A sparsekit module overrides ``_load_from_state_dict`` with :func:`load_atomic`:
every incoming tensor of the module (and the shapes of its plain child
modules' tensors) is checked first -- presence (``strict``), type, dtype,
shape, then the packed format's contents through the format's validator --
and only then does ``torch.nn.Module`` copy them in.  A bad checkpoint raises
:class:`StateDictError` (a ``ValueError``, and a ``RuntimeError`` like
PyTorch's own load errors) naming the key, and leaves the module untouched.
Copies go into the existing tensors, so parameters keep their identity
(optimizer state stays attached).
"""
from __future__ import annotations

import itertools
import sys
from typing import Callable, Iterable, Optional

import torch
from torch import nn

__all__ = ["StateDictError", "load_atomic", "check_state_dict", "rename_legacy_keys", "upgrade_state_dict"]


class StateDictError(ValueError, RuntimeError):
    """A state_dict that a sparsekit module refuses to load (nothing was copied)."""


def rename_legacy_keys(module: nn.Module, state_dict, prefix: str = "") -> None:
    """In place: move ``state_dict[prefix + old]`` to ``prefix + new`` for each tensor the module's class
    renamed (its ``_RENAMED_KEYS``, old name -> new name), when only the old key is present.  Checkpoints
    written before a rename keep loading; with both keys present the old one stays (and is unexpected)."""
    for old, new in getattr(type(module), "_RENAMED_KEYS", {}).items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def upgrade_state_dict(modules, state_dict) -> dict:
    """A copy of ``state_dict`` (a whole model's) with the old tensor names of every ``(name, module)``
    in ``modules`` (e.g. ``model.named_modules()``) renamed as :func:`rename_legacy_keys` does."""
    out = dict(state_dict)
    for name, mod in modules:
        if getattr(type(mod), "_RENAMED_KEYS", None):
            rename_legacy_keys(mod, out, f"{name}." if name else "")
    return out


def _local_state(module: nn.Module) -> dict:
    bufs = {k: v for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set}
    return {k: v for k, v in itertools.chain(module._parameters.items(), bufs.items()) if v is not None}


def _kind_ok(cur: torch.Tensor, t: torch.Tensor) -> bool:
    if cur.is_floating_point():
        return t.is_floating_point()
    return t.dtype == cur.dtype


def check_state_dict(module: nn.Module, state_dict, prefix: str, strict: bool, assign: bool,
                     resizable: Iterable[str] = (), optional: Iterable[str] = ()) -> dict:
    """The candidate tensors ``{name: tensor}`` this module would hold after loading (incoming
    ones converted to the module's dtype/device as ``copy_`` would, the current ones for keys a
    non-strict load leaves out).  Raises :class:`StateDictError` / ``TypeError`` on a missing
    (strict) or unexpected (strict) key, a non-tensor, a dtype of the wrong kind (index and code
    tensors must match exactly) or a wrong shape (``resizable`` names may change their first dim).
    ``optional`` names may be absent from the module and present in the state_dict (the module
    creates them)."""
    owner = type(module).__name__
    local = _local_state(module)
    resizable, optional = set(resizable), set(optional)
    cand = {}
    for name, cur in local.items():
        key = prefix + name
        if key not in state_dict:
            if strict:
                raise StateDictError(f"{owner}: state_dict has no '{key}' (missing key; the module was not "
                                     "modified). Pass strict=False to keep the current value")
            cand[name] = cur.detach()
            continue
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{owner}: state_dict['{key}'] must be a tensor, got {type(t).__name__}")
        if cur.dim() == 0 and tuple(t.shape) == (1,):      # as nn.Module: a 1-element tensor loads into a scalar
            t = t[0]
        if not _kind_ok(cur, t):
            raise TypeError(f"{owner}: state_dict['{key}'] must be {cur.dtype}"
                            f"{' (or another floating dtype)' if cur.is_floating_point() else ''}, got {t.dtype}")
        if name in resizable:
            if t.dim() != cur.dim() or tuple(t.shape[1:]) != tuple(cur.shape[1:]):
                raise StateDictError(f"{owner}: state_dict['{key}'] must have shape (*, "
                                     f"{', '.join(str(s) for s in cur.shape[1:])}), got {tuple(t.shape)}")
        elif tuple(t.shape) != tuple(cur.shape):
            raise StateDictError(f"{owner}: state_dict['{key}'] has shape {tuple(t.shape)}, expected "
                                 f"{tuple(cur.shape)}")
        cand[name] = t.detach() if assign else t.detach().to(device=cur.device, dtype=cur.dtype)
    for name in optional:
        key = prefix + name
        if name not in local and key in state_dict:
            t = state_dict[key]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{owner}: state_dict['{key}'] must be a tensor, got {type(t).__name__}")
            cand[name] = t.detach()
    if strict:
        for key in state_dict:
            if not key.startswith(prefix):
                continue
            head = key[len(prefix):].split(".", 1)[0]
            if head in module._modules or head in cand or key[len(prefix):] == "_extra_state":
                continue
            raise StateDictError(f"{owner}: unexpected key '{key}' in state_dict (the module holds "
                                 f"{sorted(local)}; the module was not modified)")
    _check_children(module, state_dict, prefix, strict)
    return cand


def _check_children(module: nn.Module, state_dict, prefix: str, strict: bool) -> None:
    """Shapes of the state of plain (non-sparsekit) child modules, so that their copy, which
    runs after the parent's, cannot fail half way."""
    for cname, child in module._modules.items():
        if child is None or hasattr(child, "validate_state_dict"):
            continue
        cprefix = f"{prefix}{cname}."
        for name, cur in child.state_dict().items():
            key = cprefix + name
            if key not in state_dict:
                if strict:
                    raise StateDictError(f"{type(module).__name__}: state_dict has no '{key}' (missing key; the "
                                         "module was not modified)")
                continue
            t = state_dict[key]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{type(module).__name__}: state_dict['{key}'] must be a tensor, got "
                                f"{type(t).__name__}")
            if tuple(t.shape) != tuple(cur.shape) or not _kind_ok(cur, t):
                raise StateDictError(f"{type(module).__name__}: state_dict['{key}'] is {t.dtype} "
                                     f"{tuple(t.shape)}, expected {cur.dtype} {tuple(cur.shape)}")


def caller_strict() -> Optional[bool]:
    """The ``strict`` flag the caller gave ``nn.Module.load_state_dict`` (None if not called from it).

    PyTorch passes ``strict=True`` to every ``_load_from_state_dict`` whatever the caller asked for
    and applies strictness only after every module has copied its tensors; to refuse a strict load
    with a missing or unexpected key *before* copying anything, the caller's flag is read from the
    ``load_state_dict`` frame on the stack."""
    code = nn.Module.load_state_dict.__code__
    f = sys._getframe(1)
    while f is not None:
        if f.f_code is code:
            return bool(f.f_locals.get("strict", True))
        f = f.f_back
    return None


def load_atomic(module: nn.Module, state_dict, prefix: str, local_metadata, strict: bool, missing_keys,
                unexpected_keys, error_msgs, validate: Callable[[dict], None],
                prepare: Callable[[dict, bool], None] = None, resizable: Iterable[str] = (),
                optional: Iterable[str] = ()) -> None:
    """Body of a sparsekit module's ``_load_from_state_dict``: :func:`check_state_dict`, then
    ``validate(candidates)`` (the format validator: raises ValueError/TypeError), then
    ``prepare(candidates, assign)`` (e.g. resizing), then the ordinary ``nn.Module`` copy.

    Strictness is the caller's (:func:`caller_strict`): a strict load with a missing or unexpected
    key raises here, before anything is copied; a non-strict one keeps the current tensors for the
    missing keys (and validates them together with the incoming ones).  Called other than through
    ``nn.Module.load_state_dict``, missing / unexpected keys are left to the caller's bookkeeping."""
    rename_legacy_keys(module, state_dict, prefix)
    assign = bool(local_metadata.get("assign_to_params_buffers", False))
    flag = caller_strict()
    cand = check_state_dict(module, state_dict, prefix, bool(flag) if flag is not None else False, assign,
                            resizable, optional)
    try:
        validate(cand)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{type(module).__name__}: cannot load state_dict (prefix '{prefix}'): {e}; the module "
                      "was not modified") from None
    if prepare is not None:
        prepare(cand, assign)
    # PyTorch's own strict (always True here) makes it record missing / unexpected keys for the caller
    nn.Module._load_from_state_dict(module, state_dict, prefix, local_metadata, strict, missing_keys,
                                    unexpected_keys, error_msgs)
