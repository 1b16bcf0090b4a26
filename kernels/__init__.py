"""Triton kernels, one module per kernel family (installed as ``sparsekit.kernels``).

Kernels are pure functions on tensors.  :func:`load` returns a family's
module either compiled for the GPU (``interpret=False``) or as a second copy
whose ``@triton.jit`` functions run under Triton's interpreter on CPU tensors
(``interpret=True``), so both backends can live in one process.

Interpreted runs (through :func:`load`, or a whole process under
``TRITON_INTERPRET=1``) also get :func:`_install_numpy_index_patch`, which
makes older Triton interpreters work with NumPy >= 2.4.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import threading

__all__ = ["load", "FAMILIES"]

FAMILIES = ("sparse24", "block_sparse", "int4", "int8", "draft_attention", "triple_gate_conv", "sparse24_int4")

_lock = threading.Lock()
_interp_modules: dict = {}
_state = threading.local()
_shim_installed = False
_index_patch_lock = threading.Lock()
_index_patch_state: dict = {}  # "installed": bool, once decided

# Triton releases whose interpreter converts scalar tensors with
# ``int(ndarray)`` (see _install_numpy_index_patch); 3.8.0 and 3.9.0 already
# use ``int(data.squeeze())``.
_INDEX_PATCH_TRITON_BELOW = (3, 8)
_INDEX_PATCH_NUMPY_FROM = (2, 4)


def _version_tuple(version: str) -> tuple:
    """``"3.6.0+git1a2b"`` -> ``(3, 6, 0)``, ``"2.5.0rc1"`` -> ``(2, 5, 0)``."""
    m = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in m.group(0).split(".")) if m else ()


def _needs_numpy_index_patch(triton_version: str, numpy_version: str) -> bool:
    """Whether this Triton interpreter breaks on this NumPy (see _install_numpy_index_patch)."""
    return (_version_tuple(triton_version)[:2] < _INDEX_PATCH_TRITON_BELOW
            and _version_tuple(numpy_version)[:2] >= _INDEX_PATCH_NUMPY_FROM)


def _scalar_index(self) -> int:
    # a scalar tensor's handle holds a 1-element array (0-d or 1-d)
    return int(self.handle.data.reshape(-1)[0])


def _install_numpy_index_patch() -> bool:
    """Fix ``tl.tensor.__index__`` in Triton < 3.8's interpreter for NumPy >= 2.4.

    The interpreter stores a scalar (a program id, a runtime argument such as
    ``K``) as a 1-element 1-D NumPy array, and while a kernel runs it sets
    ``tl.tensor.__index__`` to ``int(self.handle.data)``.  NumPy 2.4 turned
    the ``int()`` of an array with ``ndim > 0`` from a deprecation warning
    into ``TypeError: only 0-dimensional arrays can be converted to Python
    scalars``, so every ``range(0, K, BLOCK_K)`` with a runtime bound fails.
    Triton 3.8 converts through the single element instead; this does the
    same for the older interpreters by wrapping their ``_patch_lang_tensor``
    (run at each interpreted launch) and re-setting ``__index__`` after it.
    Only installed for Triton < 3.8 with NumPy >= 2.4; returns whether it
    is installed.
    """
    with _index_patch_lock:
        if "installed" in _index_patch_state:
            return _index_patch_state["installed"]
        _index_patch_state["installed"] = False
        try:
            import numpy
            import triton
            from triton.runtime import interpreter
        except ImportError:
            return False
        if not _needs_numpy_index_patch(triton.__version__, numpy.__version__):
            return False
        original = getattr(interpreter, "_patch_lang_tensor", None)
        if original is None:  # a layout this patch does not know: leave it alone
            return False

        def _patch_lang_tensor(tensor, *rest):
            original(tensor, *rest)
            scope = rest[0] if rest else None
            if hasattr(scope, "set_attr"):  # restored after the launch
                scope.set_attr(tensor, "__index__", _scalar_index)
            else:  # older interpreters set the attributes for good
                tensor.__index__ = _scalar_index

        interpreter._patch_lang_tensor = _patch_lang_tensor
        _index_patch_state["installed"] = True
        return True


def _install_interpreter_shim() -> None:
    """Let interpreted kernels call compiled-mode ``@triton.jit`` helpers.

    Triton decides at decoration time whether a ``@triton.jit`` function is
    compiled (``JITFunction``) or interpreted.  Our interpreter copies of the
    kernel modules are decorated in interpreter mode, but Triton's own helpers
    (``tl.sum``, ``tl.max``, ``tl.cdiv`` ... in ``triton.language.standard``) were
    decorated when triton was first imported, normally.  While one of our
    interpreted launches runs (and only then) a call to such a helper is
    forwarded to an interpreted copy of it -- exactly what Triton itself does
    when ``TRITON_INTERPRET=1`` is set for the whole process.  Compiled kernels
    never go through ``JITFunction.__call__``, so the GPU path is untouched.
    """
    global _shim_installed
    if _shim_installed:
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    original_call = JITFunction.__call__
    original_run = InterpretedFunction.run
    copies: dict = {}

    def call(self, *args, **kwargs):
        if getattr(_state, "depth", 0) > 0:
            fn = copies.get(self.fn)
            if fn is None:
                fn = copies[self.fn] = InterpretedFunction(self.fn)
            return fn(*args, **kwargs)
        return original_call(self, *args, **kwargs)

    def run(self, *args, **kwargs):
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            return original_run(self, *args, **kwargs)
        finally:
            _state.depth -= 1

    JITFunction.__call__ = call
    InterpretedFunction.run = run
    _shim_installed = True


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load(family: str, interpret: bool = False):
    """The kernel module for ``family``; ``interpret=True`` gives the interpreter copy."""
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}; known: {FAMILIES}")
    if not interpret or _interpret_env():
        # with TRITON_INTERPRET=1 in the environment the regular import is
        # already interpreted
        if _interpret_env():
            _install_numpy_index_patch()
        return importlib.import_module(f"{__name__}.{family}")
    with _lock:
        mod = _interp_modules.get(family)
        if mod is not None:
            return mod
        # triton itself must be imported (and its helpers decorated) normally
        import triton  # noqa: F401
        import triton.language  # noqa: F401

        # so must the compiled family module and everything it imports
        # (kernels._common, helpers shared with other families): the
        # interpreter copy's relative imports then find them in sys.modules.
        # Imported for the first time while TRITON_INTERPRET=1 is set below,
        # they would be cached as interpreted functions, and every compiled
        # kernel loaded later in the process would break.
        importlib.import_module(f"{__name__}.{family}")
        _install_interpreter_shim()
        _install_numpy_index_patch()
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{family}.py")
        name = f"{__name__}._interpreted_{family}"
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        finally:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old
        _interp_modules[family] = mod
        return mod


# a whole-process TRITON_INTERPRET=1 run imports the family modules directly
# (``from sparsekit.kernels import int4``), which runs this file first
if _interpret_env():
    _install_numpy_index_patch()
