"""Backend selection for sparsekit ops.

Each op has up to four implementations:

``cuda``       the csrc extension (CUDA tensors, where ``sparsekit._C`` is built)
``triton``     the Triton kernels in ``sparsekit.kernels`` (CUDA tensors)
``interpret``  the same Triton kernels under Triton's interpreter (CPU tensors)
``reference``  plain PyTorch on the dense math: the numerical truth, the CPU
               default and the dense-cuBLAS fallback on the GPU

A caller forces one with ``backend=`` or the environment variable
``SPARSEKIT_BACKEND`` (``auto`` or unset = choose).  Otherwise CPU tensors use
``reference`` and CUDA tensors follow the op's dispatch table: the table shipped
for this GPU (``tables/<gpu-name>.json``) or ``tables/default.json``.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Callable, Optional

import torch

__all__ = ["BACKENDS", "ENV_VAR", "register", "available_backends", "resolve", "dispatch_table", "gpu_slug"]

BACKENDS = ("cuda", "triton", "interpret", "reference")
ENV_VAR = "SPARSEKIT_BACKEND"

# op name -> {backend: predicate(device) -> (ok, reason)}
_REGISTRY: dict[str, dict[str, Callable[[torch.device], tuple[bool, str]]]] = {}


def _triton_ok(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "the 'triton' backend needs CUDA tensors (use 'interpret' for CPU tensors)"
    return True, ""


def _interpret_ok(device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, "the 'interpret' backend runs the Triton kernels on CPU tensors only"
    return True, ""


def _reference_ok(device: torch.device) -> tuple[bool, str]:
    return True, ""


def _cuda_ok(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "the 'cuda' backend needs CUDA tensors"
    try:
        from . import _cuda
    except ImportError as e:  # pragma: no cover - module missing from a broken install
        return False, f"the 'cuda' backend is unavailable: {e}"
    if not _cuda.available():
        return False, f"the 'cuda' backend is unavailable: {_cuda.unavailable_reason()}"
    return True, ""


_PREDICATES = {"cuda": _cuda_ok, "triton": _triton_ok, "interpret": _interpret_ok, "reference": _reference_ok}


def register(op: str, backends=BACKENDS) -> None:
    """Declare which backends ``op`` implements."""
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r}")
    _REGISTRY[op] = {b: _PREDICATES[b] for b in backends}


def _op_backends(op: str) -> dict:
    try:
        return _REGISTRY[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_REGISTRY)}") from None


def available_backends(op: str, device="cpu") -> list[str]:
    """Backends of ``op`` usable for tensors on ``device``."""
    device = torch.device(device)
    return [b for b, ok in _op_backends(op).items() if ok(device)[0]]


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


_TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tables")


@functools.lru_cache(maxsize=None)
def _load_table(slug: Optional[str]) -> dict:
    if slug is not None:
        path = os.path.join(_TABLE_DIR, f"{slug}.json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    with open(os.path.join(_TABLE_DIR, "default.json")) as f:
        return json.load(f)


def dispatch_table(op: str, device) -> list:
    """The (max_m, backend) rows that choose ``op``'s backend on ``device``."""
    device = torch.device(device)
    slug = None
    if device.type == "cuda":
        slug = gpu_slug(torch.cuda.get_device_name(device))
    table = _load_table(slug)
    rows = table.get(op)
    if rows is None:
        rows = _load_table(None).get(op, [{"max_m": None, "backend": "reference"}])
    return rows


def _requested(backend: Optional[str]) -> Optional[str]:
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        source = f"environment variable {ENV_VAR}"
    else:
        source = "backend argument"
    if backend is None or backend == "auto":
        return None
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'")
    return backend


def resolve(op: str, device, backend: Optional[str] = None, m: int = 1) -> str:
    """The backend that runs ``op`` on ``device`` for ``m`` rows.

    A forced backend (argument, else ``SPARSEKIT_BACKEND``) that cannot run
    here raises ValueError saying why; nothing silently falls back.
    """
    device = torch.device(device)
    impls = _op_backends(op)
    want = _requested(backend)
    if want is not None:
        if want not in impls:
            raise ValueError(f"op {op!r} has no {want!r} backend; it has {list(impls)}")
        ok, why = impls[want](device)
        if not ok:
            raise ValueError(f"op {op!r}: {why} (got tensors on {device})")
        return want
    if device.type != "cuda":
        return "reference"
    for row in dispatch_table(op, device):
        max_m = row.get("max_m")
        b = row["backend"]
        if (max_m is None or m <= max_m) and b in impls and impls[b](device)[0]:
            return b
    return "reference"
