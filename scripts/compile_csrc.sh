#!/usr/bin/env bash
# Compile-only check of csrc/ for machines without a GPU (CI).
#
#   * every csrc/**/*.cu: `nvcc -c` for sm_80 and sm_90a (the .cu files include
#     no torch headers, so they build standalone);
#   * csrc/bindings.cpp: `g++ -fsyntax-only` against torch's headers, the
#     Python headers and the CUDA toolkit headers (the toolkit found by
#     scripts/cuda_home.py, as setup.py finds it).
#
# Exits non-zero on the first failure.  Without nvcc it prints a notice and
# exits 0.  Environment: NVCC, CXX, PYTHON override the tools;
# SPARSEKIT_CUDA_ARCHS (default "80;90a") the architectures.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CSRC="$ROOT/csrc"
NVCC_SET="${NVCC:-}"
NVCC="${NVCC:-nvcc}"
CXX="${CXX:-g++}"
PYTHON="${PYTHON:-python}"
ARCHS="${SPARSEKIT_CUDA_ARCHS:-80;90a}"

if ! command -v "$NVCC" >/dev/null 2>&1; then
  # not on PATH: the toolkit's own nvcc, if there is a toolkit
  if [ -z "${NVCC_SET:-}" ] && root="$("$PYTHON" "$ROOT/scripts/cuda_home.py" 2>/dev/null)" && [ -x "$root/bin/nvcc" ]; then
    NVCC="$root/bin/nvcc"
  else
    echo "nvcc not found: skipping CUDA compile check"
    exit 0
  fi
fi

OUTDIR="$(mktemp -d "${TMPDIR:-/tmp}/sparsekit_csrc.XXXXXX")"
trap 'rm -rf "$OUTDIR"' EXIT

GENCODE=()
IFS=';' read -r -a ARCH_LIST <<< "$ARCHS"
for a in "${ARCH_LIST[@]}"; do
  a="${a// /}"
  [ -n "$a" ] && GENCODE+=(-gencode "arch=compute_${a},code=sm_${a}")
done

echo "nvcc: $(command -v "$NVCC") ($("$NVCC" --version | grep -o 'release [0-9.]*' || true))"
echo "archs: $ARCHS"

# ---- CUDA sources
mapfile -t CU_FILES < <(find "$CSRC" -name '*.cu' | sort)
if [ "${#CU_FILES[@]}" -eq 0 ]; then
  echo "no .cu files under csrc/"
fi
for f in "${CU_FILES[@]}"; do
  rel="${f#"$ROOT"/}"
  obj="$OUTDIR/$(echo "$rel" | tr '/' '_').o"
  echo "nvcc -c $rel"
  "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -I"$CSRC" -c -o "$obj" "${GENCODE[@]}" "$f"
done

# ---- torch bindings (syntax only)
BINDINGS="$CSRC/bindings.cpp"
if [ -f "$BINDINGS" ]; then
  TORCH_INC="$("$PYTHON" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))')"
  PY_INC="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  # the toolkit's headers, found as setup.py finds them (CUDA_HOME/CUDA_PATH,
  # nvcc through symlinks and wrapper scripts, /usr/local/cuda*)
  if ! CUDA_ROOT="$(NVCC="$NVCC" "$PYTHON" "$ROOT/scripts/cuda_home.py")"; then
    NVCC="$NVCC" "$PYTHON" "$ROOT/scripts/cuda_home.py" --explain >&2 || true
    echo "error: cannot find the CUDA toolkit headers (include/cuda_runtime.h); set CUDA_HOME" >&2
    exit 1
  fi
  CUDA_INC="$CUDA_ROOT/include"
  INC_FLAGS=()
  for d in $TORCH_INC; do INC_FLAGS+=(-I"$d"); done
  INC_FLAGS+=(-I"$PY_INC" -I"$CUDA_INC" -I"$CSRC")
  # A CUDA build of torch ships c10/cuda/impl/cuda_cmake_macros.h (it only sets
  # the shared-library export macros); the CPU wheel does not, so point
  # c10/cuda/CUDAMacros.h past it.  No code in bindings.cpp is hidden by this.
  EXTRA=()
  TORCH_INC_MAIN="${TORCH_INC%% *}"
  if [ ! -f "$TORCH_INC_MAIN/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    EXTRA+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
  fi
  echo "g++ -fsyntax-only ${BINDINGS#"$ROOT"/} (torch $("$PYTHON" -c 'import torch; print(torch.__version__)'), CUDA headers $CUDA_INC)"
  "$CXX" -std=c++17 -fsyntax-only -Wno-c++20-extensions \
    -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
    "${EXTRA[@]}" "${INC_FLAGS[@]}" "$BINDINGS"
fi

echo "compile_csrc: OK (${#CU_FILES[@]} CUDA file(s) for $ARCHS, bindings syntax-checked)"
