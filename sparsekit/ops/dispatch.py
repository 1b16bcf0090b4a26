"""Backend selection for sparsekit ops.

Each op has up to four implementations:

``cuda``       the csrc extension (CUDA tensors, where ``sparsekit._C`` is built)
``triton``     the Triton kernels in ``sparsekit.kernels`` (CUDA tensors)
``interpret``  the same Triton kernels under Triton's interpreter (CPU tensors)
``reference``  plain PyTorch on the dense math: the numerical truth, the CPU
               default and the dense-cuBLAS fallback on the GPU

and some ops have extra backends (``EXTRA_BACKENDS``), e.g. the 2:4 op's

``cusparselt``  NVIDIA cuSPARSELt through torch (``torch._cslt_sparse_mm``)
``dense``       a cached dense expansion of the weight + cuBLAS (costs the dense
               weight's memory; the "never slower than dense" fallback)

A caller forces one with ``backend=`` or the environment variable
``SPARSEKIT_BACKEND`` (``auto`` or unset = choose).  Otherwise CPU tensors use
``reference`` and CUDA tensors follow the op's dispatch table: the table shipped
for this GPU (``tables/<gpu-name>.json``) or ``tables/default.json``.

A table maps each op to a list of rows tried in order; the first row that
matches the call and whose backend is available (and accepts the call's
shape/dtype, see ``register(..., accepts=)``) wins.  A row matches when every
condition it carries holds: ``max_m`` (null = any) / ``min_m`` bound the
number of rows M, ``min_n``/``max_n`` and ``min_k``/``max_k`` the weight's
out/in features, ``dtype`` (a name or list of names: ``fp16``, ``bf16``,
``fp32``, ``int8``) the activation dtype.  A row that constrains N, K or dtype
never matches a call that did not pass that quantity.  Measured per-GPU tables
are built from benchmark CSV rows by :mod:`sparsekit.ops.dispatch_build`.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Callable, Optional

import torch

__all__ = ["BACKENDS", "EXTRA_BACKENDS", "ALL_BACKENDS", "ENV_VAR", "DTYPE_NAMES", "register",
           "available_backends", "resolve", "dispatch_table", "gpu_slug", "row_matches", "select_from_rows"]

BACKENDS = ("cuda", "triton", "interpret", "reference")
EXTRA_BACKENDS = ("cusparselt", "dense")
ALL_BACKENDS = BACKENDS + EXTRA_BACKENDS
ENV_VAR = "SPARSEKIT_BACKEND"
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int8: "int8"}

# op name -> {backend: predicate(device) -> (ok, reason)}
_REGISTRY: dict[str, dict[str, Callable[[torch.device], tuple[bool, str]]]] = {}
# op name -> {backend: accepts(m, n, k, dtype_name) -> bool} (calls a backend cannot run)
_ACCEPTS: dict[str, dict[str, Callable]] = {}


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


def _cusparselt_ok(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "the 'cusparselt' backend needs CUDA tensors"
    try:
        ok = bool(torch.backends.cusparselt.is_available())
    except Exception as e:  # pragma: no cover - very old torch
        return False, f"the 'cusparselt' backend is unavailable: {e}"
    if not ok:
        return False, "the 'cusparselt' backend is unavailable: torch.backends.cusparselt.is_available() is False"
    return True, ""


def _dense_ok(device: torch.device) -> tuple[bool, str]:
    return True, ""


_PREDICATES = {"cuda": _cuda_ok, "triton": _triton_ok, "interpret": _interpret_ok, "reference": _reference_ok,
               "cusparselt": _cusparselt_ok, "dense": _dense_ok}


def register(op: str, backends=BACKENDS, accepts: Optional[dict] = None) -> None:
    """Declare which backends ``op`` implements.

    ``accepts`` optionally maps a backend to ``f(m, n, k, dtype_name) -> bool``
    (arguments may be None when the caller did not pass them): automatic
    dispatch skips a table row whose backend does not accept the call.
    """
    for b in backends:
        if b not in ALL_BACKENDS:
            raise ValueError(f"unknown backend {b!r}")
    for b in (accepts or {}):
        if b not in backends:
            raise ValueError(f"accepts names backend {b!r} that op {op!r} does not implement")
    _REGISTRY[op] = {b: _PREDICATES[b] for b in backends}
    _ACCEPTS[op] = dict(accepts or {})


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
    """The rows that choose ``op``'s backend on ``device`` (see the module docstring)."""
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
    if not isinstance(backend, str) or backend not in ALL_BACKENDS:
        raise ValueError(f"{source}: unknown backend {backend!r}; choose one of {ALL_BACKENDS} or 'auto'")
    return backend


def _dtype_name(dtype) -> Optional[str]:
    if dtype is None or isinstance(dtype, str):
        return dtype
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def row_matches(row: dict, m: int, n: Optional[int] = None, k: Optional[int] = None,
                dtype: Optional[str] = None) -> bool:
    """Whether a dispatch-table row's conditions hold for the call (module docstring)."""
    if row.get("max_m") is not None and m > row["max_m"]:
        return False
    if row.get("min_m") is not None and m < row["min_m"]:
        return False
    for key, val in (("n", n), ("k", k)):
        lo, hi = row.get(f"min_{key}"), row.get(f"max_{key}")
        if lo is None and hi is None:
            continue
        if val is None or (lo is not None and val < lo) or (hi is not None and val > hi):
            return False
    want = row.get("dtype")
    if want is not None:
        names = [want] if isinstance(want, str) else list(want)
        if dtype is None or _dtype_name(dtype) not in names:
            return False
    return True


def resolve(op: str, device, backend: Optional[str] = None, m: int = 1, *, n: Optional[int] = None,
            k: Optional[int] = None, dtype=None) -> str:
    """The backend that runs ``op`` on ``device`` for ``m`` rows (and, where the
    op's table uses them, weight shape ``n`` x ``k`` and activation ``dtype``).

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
        # CPU: the cached dense expansion (never slower than the dense layer; see ops/_dense.py) unless
        # turned off with SPARSEKIT_CPU_DENSE=0, then the reference math
        if "dense" in impls and device.type == "cpu":
            from ._dense import cpu_dense_enabled

            if cpu_dense_enabled():
                return "dense"
        return "reference"
    return select_from_rows(op, dispatch_table(op, device), device, m, n=n, k=k, dtype=dtype)


def select_from_rows(op: str, rows: list, device, m: int, *, n: Optional[int] = None, k: Optional[int] = None,
                     dtype=None) -> str:
    """The first of ``rows`` that matches the call and whose backend can run it (else ``reference``)."""
    device = torch.device(device)
    impls = _op_backends(op)
    dname = _dtype_name(dtype)
    accepts = _ACCEPTS.get(op, {})
    for row in rows:
        b = row["backend"]
        if not row_matches(row, m, n, k, dname) or b not in impls:
            continue
        if b in accepts and not accepts[b](m, n, k, dname):
            continue
        if impls[b](device)[0]:
            return b
    return "reference"
