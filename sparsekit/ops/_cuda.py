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

__all__ = ["MAX_M", "available", "unavailable_reason", "sparse24_linear", "has_mma_sp", "sparse24_mma_sp",
           "sparse24_mma_sp_int8"]

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


# ---------------------------------------------------------------------------- mma.sp GEMM
#: K padding multiple of the mma.sp kernel's operands (fp16/bf16, int8)
MMA_STAGE_K = {"f16": 64, "s8": 128}

def _padded_cache():
    from ..formats.sparse24 import TensorCache

    global _PADDED_VALUES
    if _PADDED_VALUES is None:
        _PADDED_VALUES = TensorCache()
    return _PADDED_VALUES


# values tensor -> ((version, Kpad), zero-padded contiguous copy)
_PADDED_VALUES = None


def has_mma_sp() -> bool:
    """True when the loaded extension has the mma.sp GEMM (builds from before it do not)."""
    mod = _load()
    return mod is not None and hasattr(mod, "sparse24_mma_sp")


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def mma_values(values: torch.Tensor, kpad: int) -> torch.Tensor:
    """``values`` as the kernel needs it: ``Kpad/2`` unit-stride columns, 16-byte aligned rows.

    The format's own tensor is used when it already qualifies (K a multiple of
    the stage depth: 4096, 11008, 8192 ... in fp16/bf16); otherwise a
    zero-padded copy is made once and cached per tensor (re-made only when the
    tensor is modified in place), at the cost of one more copy of the values.
    """
    cols = kpad // 2
    isz = values.element_size()
    if (values.shape[1] == cols and values.stride(1) == 1 and (values.stride(0) * isz) % 16 == 0
            and _aligned(values)):
        return values
    def make():
        padded = torch.zeros(values.shape[0], cols, dtype=values.dtype, device=values.device)
        padded[:, : values.shape[1]] = values.detach()
        return padded
    return _padded_cache().get(values, (values._version, kpad), make)


def _mma_x(x2d: torch.Tensor, k: int, kpad: int, chunk: int) -> tuple[torch.Tensor, int]:
    """(x with unit column stride and 16-byte aligned rows, number of readable columns)."""
    isz = x2d.element_size()
    if (x2d.stride(1) == 1 or x2d.shape[1] == 1) and k % chunk == 0 and _aligned(x2d) \
            and (x2d.stride(0) * isz) % 16 == 0:
        return x2d, k
    xp = torch.zeros(x2d.shape[0], kpad, dtype=x2d.dtype, device=x2d.device)
    xp[:, :k] = x2d
    return xp, kpad


def sparse24_mma_sp(x2d: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, K: int,
                    bias: torch.Tensor | None = None, tile_config: int = -1) -> torch.Tensor:
    """``x2d @ W^T (+ bias)`` on sparse tensor cores (fp16/bf16, any M).

    ``values``/``meta`` are a :class:`~sparsekit.formats.Sparse24Weight`'s
    fields; the metadata reorder (:func:`~sparsekit.formats.sparse24.cached_mma_sp_meta`)
    and any K padding of the values are done once per tensor and cached.
    """
    from ..formats.sparse24 import cached_mma_sp_meta, mma_padded_k

    mod = _load()
    if mod is None:
        raise RuntimeError(f"sparsekit cuda backend unavailable: {_reason}")
    if not hasattr(mod, "sparse24_mma_sp"):
        raise RuntimeError("the loaded sparsekit._C has no sparse24_mma_sp (rebuild csrc/)")
    kpad = mma_padded_k(max(int(K), 1), MMA_STAGE_K["f16"])
    words = cached_mma_sp_meta(meta, int(K), MMA_STAGE_K["f16"])
    vals = mma_values(values, kpad)
    xk, kx = _mma_x(x2d, int(K), kpad, 8)
    return mod.sparse24_mma_sp(xk, kx, vals, words, int(K), kpad, bias, int(tile_config))


def sparse24_mma_sp_int8(xq: torch.Tensor, x_scale: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                         w_scale: torch.Tensor, K: int, bias: torch.Tensor | None, out_dtype: torch.dtype,
                         tile_config: int = -1) -> torch.Tensor:
    """``(xq @ Wq^T) * x_scale * w_scale (+ bias)`` with int8 mma.sp (s32 accumulate), output ``out_dtype``."""
    from ..formats.sparse24 import cached_mma_sp_meta, mma_padded_k

    mod = _load()
    if mod is None:
        raise RuntimeError(f"sparsekit cuda backend unavailable: {_reason}")
    if not hasattr(mod, "sparse24_mma_sp_int8"):
        raise RuntimeError("the loaded sparsekit._C has no sparse24_mma_sp_int8 (rebuild csrc/)")
    names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
    if out_dtype not in names:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    kpad = mma_padded_k(max(int(K), 1), MMA_STAGE_K["s8"])
    words = cached_mma_sp_meta(meta, int(K), MMA_STAGE_K["s8"])
    vals = mma_values(values, kpad)
    xk, kx = _mma_x(xq, int(K), kpad, 16)
    return mod.sparse24_mma_sp_int8(xk, kx, x_scale.float(), vals, words, w_scale.float(), int(K), kpad, bias,
                                    names[out_dtype], int(tile_config))
