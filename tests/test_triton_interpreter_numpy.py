"""Triton < 3.8's interpreter with NumPy >= 2.4: runtime loop bounds (``range(0, K, BLOCK)``).

Those interpreters convert a scalar tensor with ``int(ndarray)`` on a 1-element
1-D array, which NumPy 2.4 refuses; ``sparsekit.kernels`` patches it
(``_install_numpy_index_patch``).  These tests run a loop with a runtime bound
through both interpreter entry points on whatever Triton/NumPy is installed:
on triton 3.6 + NumPy >= 2.4 (``make test-stack2``) they fail without the patch.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import triton

import sparsekit.kernels as skk
from sparsekit.testing import rel_err

NEEDED = skk._needs_numpy_index_patch(triton.__version__, np.__version__)


@pytest.mark.parametrize("tv, nv, want", [
    ("3.6.0", "2.5.2", True),     # the GPU machine
    ("3.6.0", "2.4.0", True),
    ("3.7.1", "2.4.6", True),
    ("3.6.0", "2.3.5", False),    # NumPy only warned before 2.4
    ("3.6.0", "1.26.4", False),
    ("3.8.0", "2.5.2", False),    # the interpreter converts through the element itself
    ("3.9.0", "2.4.6", False),
    ("3.10.0", "2.5.0", False),
    ("3.6.0+git1a2b3c", "2.5.0rc1", True),
])
def test_patch_gate(tv, nv, want):
    assert skk._needs_numpy_index_patch(tv, nv) is want


def test_version_tuple():
    assert skk._version_tuple("3.6.0+git1a2b") == (3, 6, 0)
    assert skk._version_tuple("2.5.0rc1") == (2, 5, 0)
    assert skk._version_tuple("3.10") == (3, 10)
    assert skk._version_tuple("dev") == ()


class _Handle:
    def __init__(self, data):
        self.data = data


class _Tensor:
    def __init__(self, data):
        self.handle = _Handle(data)


@pytest.mark.parametrize("data", [np.array([7], dtype=np.int32), np.array(7, dtype=np.int64),
                                  np.array([[7]], dtype=np.uint8)])
def test_scalar_index_takes_the_single_element(data):
    v = skk._scalar_index(_Tensor(data))
    assert v == 7 and type(v) is int


# the kernel: a masked, runtime-bounded reduction, as the linear kernels' K loops do
KERNEL = r'''
import triton
import triton.language as tl


@triton.jit
def rowsum(x_ptr, out_ptr, K, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + row * stride + offs, mask=offs < K, other=0.0)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))
'''


def _check_rowsum(rowsum_kernel):
    x = torch.randn(3, 101, dtype=torch.float32)
    out = torch.full((3,), float("nan"))
    rowsum_kernel[(3,)](x, out, 101, x.stride(0), BLOCK=16)
    ref = x.double().sum(1)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-5


def test_runtime_loop_bound_through_load(tmp_path, monkeypatch):
    """The interpreter copy made the way kernels.load makes one (TRITON_INTERPRET=1 only while decorating)."""
    import importlib.util

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    skk.load("int4", interpret=True)  # installs the interpreter shim and the NumPy patch
    assert skk._index_patch_state.get("installed") is NEEDED
    path = tmp_path / "rowsum_kernel.py"
    path.write_text(KERNEL)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec = importlib.util.spec_from_file_location("rowsum_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.delenv("TRITON_INTERPRET")
    import triton.language as tl
    before = tl.tensor.__dict__.get("__index__")
    _check_rowsum(mod.rowsum)
    # the interpreter's per-launch patches (ours included) are undone after the launch
    assert tl.tensor.__dict__.get("__index__") is before


SUBPROCESS = r'''
import sys
sys.path.insert(0, sys.argv[1])
import sparsekit.kernels as skk   # with TRITON_INTERPRET=1 this installs the patch
import torch
import rowsum_kernel
sys.path.insert(0, sys.argv[2])
from test_triton_interpreter_numpy import _check_rowsum
_check_rowsum(rowsum_kernel.rowsum)
print("PATCH", skk._index_patch_state.get("installed"))
'''


def test_runtime_loop_bound_whole_process_interpret(tmp_path):
    """A process run entirely under TRITON_INTERPRET=1 that imports sparsekit.kernels."""
    (tmp_path / "rowsum_kernel.py").write_text(KERNEL)
    env = dict(os.environ, TRITON_INTERPRET="1")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", SUBPROCESS, str(tmp_path), tests_dir], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"PATCH {NEEDED}" in r.stdout
