"""Input checks shared by the ops' public entry points (clear errors before any kernel runs)."""
from __future__ import annotations

import weakref
from typing import Optional

import torch

__all__ = ["check_x", "check_bias", "validate_once", "check_not_meta", "as_contiguous", "check_features"]


def check_x(x, in_features: int) -> None:
    """``x`` is a tensor ``(..., in_features)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but the weight expects "
                         f"in_features={in_features}")


def check_bias(bias: Optional[torch.Tensor], n: int, x: torch.Tensor) -> None:
    """``bias`` is None or an ``(n,)`` tensor with ``x``'s dtype and device."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if bias.dtype != x.dtype or bias.device != x.device:
        raise TypeError(f"bias must match x ({x.dtype} on {x.device}), got {bias.dtype} on {bias.device}")


# --------------------------------------------------------------------------- validate once per tensor version
class _ValidatedCache:
    """Remembers which packed operands passed content validation, keyed by the identity and
    version counter (``Tensor._version``) of every tensor involved: a ``*_packed`` call on the
    same, unmodified tensors skips the O(size) pass; any in-place change (or a new tensor)
    validates again.  Entries hold weak references only and go with their first tensor."""

    def __init__(self):
        self._data: dict = {}

    def _drop(self, key, ref):
        hit = self._data.get(key)
        if hit is not None and hit[0][0] is ref:
            del self._data[key]

    def run(self, tensors: tuple, extra, fn) -> None:
        ts = [t for t in tensors if t is not None]
        if not ts:
            fn()
            return
        anchor = ts[0]
        key = id(anchor)
        versions = tuple(t._version for t in ts)
        hit = self._data.get(key)
        if hit is not None:
            refs, vers, ext = hit
            if (len(refs) == len(ts) and all(r() is t for r, t in zip(refs, ts)) and vers == versions
                    and ext == extra):
                return
        fn()
        try:
            refs = []
            for i, t in enumerate(ts):
                refs.append(weakref.ref(t, (lambda r, k=key, d=self: d._drop(k, r)) if i == 0 else None))
        except TypeError:     # not weakly referenceable: no caching
            return
        self._data[key] = (refs, versions, extra)

    def __len__(self) -> int:
        return len(self._data)


VALIDATED = _ValidatedCache()


def check_sparse24_shapes(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> None:
    """Packed 2:4 operands against in_features: values (N, Kp / 2), meta (N, Kp / 8), Kp = in_features padded to 8."""
    from ..formats.sparse24 import padded_k

    kp = padded_k(in_features)
    if values.dim() != 2 or values.shape[1] != kp // 2:
        raise ValueError(f"values must have shape (N, {kp // 2}) for in_features={in_features}, got "
                         f"{tuple(values.shape)}")
    if tuple(meta.shape) != (values.shape[0], kp // 8):
        raise ValueError(f"meta must have shape {(values.shape[0], kp // 8)} for in_features={in_features}, got "
                         f"{tuple(meta.shape)}")


def validate_once(tensors: tuple, extra, fn) -> None:
    """Run the validator ``fn()`` unless these exact tensors, unmodified, already passed it with
    the same ``extra`` (shape, group size, ...)."""
    VALIDATED.run(tensors, extra, fn)


def check_not_meta(*tensors, what: str = "this op") -> None:
    """ValueError if a tensor is on the meta device where real data is needed."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            raise ValueError(f"{what} needs tensor data, got a tensor on the meta device "
                             "(materialize the model with .to_empty(device=...) and load its weights first)")


def as_contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` itself when contiguous (or None), else one contiguous copy: kernels take unit inner strides."""
    if t is None or t.is_contiguous():
        return t
    return t.contiguous()


def check_features(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TypeError(f"{name} must be a non-negative int, got {v!r}")
    return v
