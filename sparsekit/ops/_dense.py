"""The ``dense`` backend: a packed weight expanded once per weight version, then one dense matmul.

Where no sparse or low-bit kernel runs (the CPU), re-expanding a packed
weight on every call makes a compressed layer several times slower than the
``nn.Linear`` it replaced.  The ``dense`` backend of every linear op keeps the
expanded weight instead:

* the expansion (2:4 values + metadata, kept blocks, int4 codes + scales and
  zero points, int8 codes + scales) is computed once and cached, keyed by the
  identity of the packed tensors and their ``_version`` counters: an in-place
  update (an optimizer step on 2:4 ``values`` or ``blocks``, ``copy_`` into a
  buffer, ``load_state_dict``) or a new tensor rebuilds it on the next call, a
  freed weight drops its entry;
* on CPU it is held in float32 and the matmul runs in float32 (the CPU's
  float16/bfloat16 GEMMs are 2-3x slower than its float32 one); the result is
  cast to the input's dtype.  On CUDA the expansion keeps the op's own dtype.

Memory: one float32 ``(N, K)`` copy per compressed layer on CPU (4 bytes per
dense weight; twice a float16 model's dense weight).  It is opt-out:
``SPARSEKIT_CPU_DENSE=0`` (or :func:`set_cpu_dense` ``(False)``) makes the
CPU dispatch pick ``reference`` again (expansion per call, no memory kept),
:func:`clear_dense_cache` frees what is held.  Inference tensors (made under
``torch.inference_mode``) carry no version counter and are expanded per call.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..formats.sparse24 import TensorCache

__all__ = ["CPU_DENSE_ENV", "cpu_dense_enabled", "set_cpu_dense", "clear_dense_cache", "cached_weight",
           "dense_linear", "module_fast_path"]

CPU_DENSE_ENV = "SPARSEKIT_CPU_DENSE"
_override: Optional[bool] = None
_CACHE = TensorCache()


def cpu_dense_enabled() -> bool:
    """Whether automatic dispatch on CPU picks the ``dense`` backend (default yes)."""
    if _override is not None:
        return _override
    raw = _environ.get(CPU_DENSE_ENV)
    hit = _parsed.get(raw)
    if hit is None:
        v = (raw or "1").strip().lower()
        if v in ("0", "false", "no", "off"):
            hit = False
        elif v in ("", "1", "true", "yes", "on"):
            hit = True
        else:
            raise ValueError(f"{CPU_DENSE_ENV}={v!r}: set it to 1 (cached dense expansion on CPU, the default) or 0")
        _parsed[raw] = hit
    return hit


_parsed: dict = {}


def set_cpu_dense(enabled: Optional[bool]) -> None:
    """Turn the CPU ``dense`` dispatch on/off for this process (None: follow ``SPARSEKIT_CPU_DENSE``)."""
    global _override
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_cpu_dense takes True, False or None, got {enabled!r}")
    _override = enabled
    if enabled is False:
        clear_dense_cache()


def clear_dense_cache() -> None:
    """Free every cached expansion."""
    _CACHE._data.clear()


def cached_weight(tag, tensors: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()`` (the expanded weight), cached on ``tensors[0]`` and keyed by ``tag`` and the identity
    and version of every tensor in ``tensors`` (None entries allowed)."""
    key = [tag]
    for t in tensors:
        if t is None:
            key.append(None)
        elif t.is_inference():          # no version counter: cannot tell an in-place update
            return make()
        else:
            key.append((id(t), t._version))
    if _is_compiling():
        return make()
    return _CACHE.get(tensors[0], tuple(key), lambda: make().detach())


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear`` on the expanded weight ``w``: float32 math on CPU (result in ``x``'s dtype), the input's
    dtype elsewhere."""
    if x.is_cpu:
        if x.dtype == torch.float32 and w.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):
            return F.linear(x, w, bias)
        if bias is not None and bias.dtype != torch.float32:
            if torch.is_grad_enabled() and bias.requires_grad:
                bias = bias.float()                     # differentiable
            else:
                bias = cached_weight(("bias32",), (bias,), lambda: bias.float())
        y = F.linear(x if x.dtype == torch.float32 else x.float(), w if w.dtype == torch.float32 else w.float(), bias)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype)).contiguous()


def cpu_weight(t: torch.Tensor) -> torch.Tensor:
    """An expansion as the dense backend holds it: float32 on CPU, as is elsewhere."""
    return t.float().contiguous() if t.is_cpu else t.contiguous()


def module_fast_path(x, backend: Optional[str], in_features: int, dtypes) -> bool:
    """Whether a compressed module may run its ``dense`` math directly, without the op's dispatch and custom-op
    machinery (tens to hundreds of microseconds per call, more than a small dense layer takes): ``x`` is a plain
    CPU tensor of one of ``dtypes`` with ``in_features`` in its last dimension, the backend is automatic (argument
    and ``SPARSEKIT_BACKEND``) with the CPU dense default on, or forced to ``dense``, and nothing is tracing or
    compiling.  Anything else (including inputs the op must reject with its own error) takes the op.

    Called on every forward of a small layer, so it is written for speed: a few attribute reads, one environment
    lookup per variable, no allocation."""
    if type(x) is not torch.Tensor or not x.is_cpu or x.dtype not in dtypes:
        return False
    shape = x.shape
    if not shape or shape[-1] != in_features or in_features == 0:
        return False
    if backend is None:
        backend = _environ.get("SPARSEKIT_BACKEND") or None
    if backend is not None and backend != "auto" and backend != "dense":
        return False
    if backend != "dense" and not cpu_dense_enabled():
        return False
    if _is_compiling() or _tracing_state() is not None:
        return False
    return True


_environ = os.environ
_is_compiling = torch.compiler.is_compiling
_tracing_state = torch._C._get_tracing_state
