"""kernels.load: the interpreter copies must not leave compiled-mode modules decorated as interpreted."""
import subprocess
import sys

import pytest

from sparsekit.kernels import FAMILIES

SCRIPT = r"""
import sys
from sparsekit import kernels
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction
for fam in sys.argv[1:]:
    kernels.load(fam, interpret=True)
bad, seen = [], 0
for name, mod in list(sys.modules.items()):
    if not name.startswith("sparsekit.kernels.") or "_interpreted_" in name:
        continue
    for attr, val in vars(mod).items():
        if isinstance(val, InterpretedFunction):
            bad.append(f"{name}.{attr}")
        seen += isinstance(val, JITFunction)
print("SEEN", seen)
print("BAD", bad)
sys.exit(1 if bad or not seen else 0)
"""


@pytest.mark.parametrize("families", [list(FAMILIES), list(reversed(FAMILIES)), ["sparse24_int4"]])
def test_interpreted_load_keeps_compiled_modules_compiled(families):
    """Loading interpreter copies first (as the CPU tests do before any GPU test in one process)
    must leave ``sparsekit.kernels.<family>`` and ``kernels._common`` compiled: an interpreted
    helper there would break every compiled kernel loaded afterwards."""
    r = subprocess.run([sys.executable, "-c", SCRIPT, *families], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
