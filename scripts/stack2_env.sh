#!/usr/bin/env bash
# The second-stack virtualenv: the GPU machine's Triton (3.6) and NumPy
# generation (>= 2.4; 2.5 there) with this machine's torch (the CPU build),
# and this checkout installed editable, without the CUDA extension.  Used by
# `make test-stack2`; prints the path of the venv's python on its last line.
#
# Environment (defaults in brackets):
#   STACK2_VENV     where the venv lives [.ci/stack2 in the checkout; ignored by git]
#   STACK2_PYTHON   the interpreter the venv is made from [$PYTHON, else python3]
#   STACK2_TORCH    torch version, always pinned [2.13.0]
#   TORCH_PIP_ARGS  extra pip arguments for torch, e.g. a CPU-only index URL []
#   STACK2_TRITON   triton version [3.6.0]
#   STACK2_NUMPY    numpy requirement [>=2.4]
#
# An existing venv made with the same pins is reused (only the checkout is
# reinstalled); one with other pins is made anew.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STACK2_VENV:-$ROOT/.ci/stack2}"
BASE="${STACK2_PYTHON:-${PYTHON:-python3}}"
TORCH="${STACK2_TORCH:-2.13.0}"
TRITON="${STACK2_TRITON:-3.6.0}"
NUMPY="${STACK2_NUMPY:->=2.4}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

PINS="python=$("$BASE" -c 'import sys; print("%d.%d" % sys.version_info[:2])') torch==$TORCH triton==$TRITON numpy$NUMPY ${TORCH_PIP_ARGS:-}"
STAMP="$VENV/.sparsekit-stack2"
PY="$VENV/bin/python"

if [ -x "$PY" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$PINS" ]; then
  echo "stack2: reusing $VENV ($PINS)" >&2
else
  if [ -e "$VENV" ]; then
    if [ ! -f "$VENV/pyvenv.cfg" ]; then
      echo "stack2: $VENV exists and is not a virtualenv; not touching it" >&2
      exit 1
    fi
    rm -rf "$VENV"
  fi
  echo "stack2: creating $VENV from $BASE ($PINS)" >&2
  "$BASE" -m venv "$VENV"
  "$PY" -m pip install -q "setuptools>=64" wheel >&2
  # torch pinned, and alone first: an unpinned torch would pull a multi-GB CUDA build
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --only-binary=:all: "torch==$TORCH" ${TORCH_PIP_ARGS:-} >&2
  "$PY" -m pip install -q --only-binary=:all: "triton==$TRITON" "numpy$NUMPY" "pytest>=7" >&2
  echo "$PINS" >"$STAMP"
fi

SPARSEKIT_NO_CUDA_EXT=1 "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >&2
"$PY" - "$TORCH" "$TRITON" "$ROOT" >&2 <<'EOF'
import os, sys
import numpy, torch, triton
import sparsekit, sparsekit.kernels as k
want_torch, want_triton, root = sys.argv[1:]
print(f"stack2: python {sys.version.split()[0]} | torch {torch.__version__} | triton {triton.__version__}"
      f" | numpy {numpy.__version__} | sparsekit from {os.path.dirname(sparsekit.__file__)}")
assert torch.__version__.split("+")[0] == want_torch, torch.__version__
assert triton.__version__ == want_triton, triton.__version__
assert os.path.realpath(k.__file__).startswith(os.path.realpath(root) + os.sep), k.__file__
EOF
echo "$PY"
