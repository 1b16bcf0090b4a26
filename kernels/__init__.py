"""Triton kernels, one module per kernel family (installed as ``sparsekit.kernels``).

Kernels are pure functions on tensors.  :func:`load` returns a family's
module either compiled for the GPU (``interpret=False``) or as a second copy
whose ``@triton.jit`` functions run under Triton's interpreter on CPU tensors
(``interpret=True``), so both backends can live in one process.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import threading

__all__ = ["load", "FAMILIES"]

FAMILIES = ("sparse24", "block_sparse", "int4", "int8", "draft_attention", "triple_gate_conv", "sparse24_int4")

_lock = threading.Lock()
_interp_modules: dict = {}
_state = threading.local()
_shim_installed = False


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
