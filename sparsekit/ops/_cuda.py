"""The ``cuda`` backend: thin access to the csrc/ extension ``sparsekit._C``.

``available()`` never raises and never builds anything on a machine without a
usable CUDA device.  The extension comes from the installed package
(``setup.py`` builds it where CUDA torch and nvcc exist) or, when the
environment sets ``SPARSEKIT_CUDA_JIT=1``, from a one-time JIT build of the
same ``csrc/`` sources with ``torch.utils.cpp_extension.load`` into a cache
directory (``SPARSEKIT_CUDA_JIT_DIR``, default
``~/.cache/sparsekit/cuda_jit/<torch version>``).
"""
from __future__ import annotations

import glob
import os
import shutil
import threading

import torch

__all__ = ["MAX_M", "available", "unavailable_reason", "sparse24_linear"]

#: Largest number of activation rows the 2:4 GEMV kernel accepts.
MAX_M = 16

_lock = threading.Lock()
_module = None
_checked = False
_reason: str | None = "not checked yet"

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")


def _jit_build():
    """Build csrc/ with torch's JIT loader; returns (module or None, reason)."""
    if torch.version.cuda is None:
        return None, f"SPARSEKIT_CUDA_JIT=1 but torch {torch.__version__} is not a CUDA build"
    from torch.utils.cpp_extension import CUDA_HOME, load

    if shutil.which("nvcc") is None and CUDA_HOME is None:
        return None, "SPARSEKIT_CUDA_JIT=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    if not os.path.isdir(_CSRC):
        return None, f"SPARSEKIT_CUDA_JIT=1 but the csrc/ sources are not next to the package ({_CSRC})"
    sources = sorted(glob.glob(os.path.join(_CSRC, "**", "*.cu"), recursive=True))
    sources += sorted(glob.glob(os.path.join(_CSRC, "**", "*.cpp"), recursive=True))
    if not sources:
        return None, f"no sources under {_CSRC}"
    tag = torch.__version__.replace("+", "_").replace(".", "_")
    build_dir = os.environ.get("SPARSEKIT_CUDA_JIT_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "sparsekit", "cuda_jit", tag)
    os.makedirs(build_dir, exist_ok=True)
    mod = load(
        name="sparsekit_cuda_jit",
        sources=sources,
        extra_include_paths=[_CSRC],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        build_directory=build_dir,
        verbose=os.environ.get("SPARSEKIT_CUDA_JIT_VERBOSE", "0") == "1",
    )
    return mod, None


def _load():
    global _module, _checked, _reason
    if _checked:
        return _module
    with _lock:
        if _checked:
            return _module
        mod, reason = None, None
        try:
            if not torch.cuda.is_available():
                reason = "torch.cuda.is_available() is False"
            else:
                try:
                    from sparsekit import _C as mod  # noqa: N811
                except Exception as e:  # not built here, or built for another torch/CUDA
                    mod = None
                    reason = f"sparsekit._C could not be imported ({type(e).__name__}: {e})"
                    if os.environ.get("SPARSEKIT_CUDA_JIT", "0") == "1":
                        try:
                            mod, jit_reason = _jit_build()
                        except Exception as je:  # compiler errors, missing toolchain, ...
                            mod, jit_reason = None, f"JIT build failed ({type(je).__name__}: {je})"
                        reason = None if mod is not None else f"{reason}; {jit_reason}"
                if mod is not None and not hasattr(mod, "sparse24_linear"):
                    reason = f"{getattr(mod, '__name__', 'extension')} has no sparse24_linear"
                    mod = None
        except Exception as e:  # never raise from availability checks
            mod, reason = None, f"{type(e).__name__}: {e}"
        _module = mod
        _reason = None if mod is not None else reason
        _checked = True
        return _module


def available() -> bool:
    """True when the CUDA extension is loaded and a CUDA device is usable."""
    try:
        return _load() is not None
    except Exception:  # pragma: no cover - _load already guards everything
        return False


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    _load()
    return _reason


def sparse24_linear(x2d: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, K: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x2d @ W^T (+ bias)`` with the csrc GEMV kernel, for ``x2d.shape[0] <= MAX_M``.

    ``values``/``meta`` are a :class:`~sparsekit.formats.Sparse24Weight`'s
    fields and ``K`` its in_features.  Returns a new ``(M, N)`` tensor in
    ``x2d``'s dtype.  Raises RuntimeError when the backend is unavailable;
    bad shapes, dtypes or devices raise ValueError/TypeError from the
    extension, and M > MAX_M raises RuntimeError.
    """
    mod = _load()
    if mod is None:
        raise RuntimeError(f"sparsekit cuda backend unavailable: {_reason}")
    return mod.sparse24_linear(x2d, values, meta, int(K), bias)
