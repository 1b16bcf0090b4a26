#!/usr/bin/env bash
# One call on the lent GPU machine (H100/H200, no internet): install this
# checkout offline (builds csrc/ into sparsekit._C), print `sparsekit info`,
# run the GPU tests, the benchmarks (CSV / markdown / plot), compute-sanitizer
# memcheck on every GPU kernel, then the full test suite; everything
# lands flat in $OUT (at most 8 files come back from the device machine).
#
#   OUT=/some/dir bash scripts/gpu_check.sh        (default OUT=.out)
#
# Knobs (environment):
#   GPU_CHECK_BUDGET_S  whole-script time budget in s (default 540; one device call is capped at 600)
#   BENCH_ARGS          extra arguments for `sparsekit bench` (default: "--dtype fp16,bf16")
#   SPARSEKIT_CUDA_ARCHS  archs for the csrc build (default: this GPU's, e.g. 90a)
#   PYTHON              interpreter (default python3)
#   GPU_CHECK_SKIP      space-separated step names to skip (build info tests-gpu bench dispatch-table sanitizer tests-all)
#
# Every step runs under `timeout`; a failing step does not stop the script.
# Exit status: the worst step's (0 = everything passed).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-.out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
RESERVE=15                      # seconds kept for packing $OUT and the summary
BENCH_ARGS=${BENCH_ARGS:---dtype fp16,bf16}
SUMMARY="$OUT/summary.txt"
START=$SECONDS
WORST=0
STEPS=()

: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

# run_step NAME MAX_SECONDS LOG CMD...  (appends CMD's output to LOG)
run_step() {
    local name=$1 max=$2 log=$3
    shift 3
    if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
        STEPS+=("$(printf '%-22s rc=%-4s %-8s' "$name" - SKIPPED)")
        say "step $name: skipped (GPU_CHECK_SKIP)"
        return 0
    fi
    local left=$((BUDGET - RESERVE - (SECONDS - START)))
    local lim=$max
    if ((left < lim)); then lim=$left; fi
    local rc=0 t0=$SECONDS notrun=0
    if ((lim < 10)); then
        rc=124 notrun=1
        echo "[gpu_check] $name: not run, out of time budget" | tee -a "$log"
    else
        echo "[gpu_check] >>> $name (limit ${lim}s): $*" | tee -a "$log"
        timeout -k 10 "$lim" "$@" >>"$log" 2>&1 || rc=$?
    fi
    local dt=$((SECONDS - t0))
    local verdict=ok
    if ((notrun)); then verdict="NOT-RUN"; elif ((rc == 124 || rc == 137)); then verdict="TIMEOUT"; elif ((rc != 0)); then verdict="FAIL"; fi
    STEPS+=("$(printf '%-22s rc=%-4s %-8s %4ss  %s' "$name" "$rc" "$verdict" "$dt" "$(basename "$log")")")
    say "step $name: rc=$rc ($verdict) in ${dt}s, log $(basename "$log")"
    echo "----- last lines of $(basename "$log") -----"
    tail -n 12 "$log" || true
    echo "-----"
    if ((rc > WORST)); then WORST=$rc; fi
    return 0
}

# ---------------------------------------------------------------- environment
{
    echo "== gpu_check $(date -Iseconds) on $(hostname)"
    echo "== git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files"
    nvidia-smi || echo "nvidia-smi failed"
    echo "== $($PY --version 2>&1) at $(command -v "$PY")"
    $PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__, "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")' || true
    (nvcc --version 2>/dev/null | tail -n 2) || echo "nvcc not on PATH"
    command -v compute-sanitizer || echo "compute-sanitizer not on PATH"
} 2>&1 | tee -a "$SUMMARY"

if [[ -z "${SPARSEKIT_CUDA_ARCHS:-}" ]]; then
    # build csrc only for this GPU (halves nvcc time); Hopper needs the 'a' suffix for wgmma/setmaxnreg
    SPARSEKIT_CUDA_ARCHS=$($PY -c 'import torch; m,n=torch.cuda.get_device_capability(); print(f"{m}{n}" + ("a" if m == 9 else ""))' 2>/dev/null || echo "80;90a")
fi
export SPARSEKIT_CUDA_ARCHS
export MAX_JOBS=${MAX_JOBS:-16}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1   # the device machine has no network
say "== csrc archs: $SPARSEKIT_CUDA_ARCHS, MAX_JOBS=$MAX_JOBS, budget ${BUDGET}s"

# ---------------------------------------------------------------- 1. install + build csrc
build_and_install() {
    $PY -m pip install -v -e . --no-deps --no-build-isolation || {
        echo "[gpu_check] build with the CUDA extension FAILED; installing without it so the other steps can run"
        SPARSEKIT_NO_CUDA_EXT=1 $PY -m pip install -e . --no-deps --no-build-isolation
        return 1
    }
    $PY -c 'import sparsekit._C as c; print("sparsekit._C loaded from", c.__file__)'
}
export PY
export -f build_and_install
run_step build 240 "$OUT/build.log" bash -c build_and_install

# ---------------------------------------------------------------- 2. info
run_step info 60 "$OUT/build.log" $PY -m sparsekit.cli info
sed -n '/>>> info/,$p' "$OUT/build.log" | tail -n +2 | head -n 30 >>"$SUMMARY" || true

# ---------------------------------------------------------------- 3. GPU tests
run_step tests-gpu 120 "$OUT/tests.log" $PY -m pytest tests -m gpu -q -p no:cacheprovider

# ---------------------------------------------------------------- 4. benchmarks (before the sanitizer: measuring is what the GPU minutes are for)
# shellcheck disable=SC2086
run_step bench 240 "$OUT/bench.log" $PY -m sparsekit.bench --out "$OUT" $BENCH_ARGS

# ---------------------------------------------------------------- 4b. measured 2:4 dispatch table from this run's rows
# (the fastest backend per (dtype, N, K, M bucket), dense where nothing beat it;
# commit it as sparsekit/ops/tables/<gpu-slug>.json after review)
build_dispatch_table() {
    shopt -s nullglob
    local csvs=("$OUT"/*.csv)
    if ((${#csvs[@]} == 0)); then echo "no benchmark CSV in $OUT"; return 1; fi
    $PY -m sparsekit.ops.dispatch_build "${csvs[@]}" --out "$OUT/dispatch_table.json" && cat "$OUT/dispatch_table.json"
}
export -f build_dispatch_table
export OUT
run_step dispatch-table 30 "$OUT/bench.log" bash -c build_dispatch_table

# ---------------------------------------------------------------- 5. compute-sanitizer
SANITIZER=$(command -v compute-sanitizer || true)
for c in /usr/local/cuda/bin/compute-sanitizer /opt/nvidia/compute-sanitizer/compute-sanitizer; do
    if [[ -z "$SANITIZER" && -x "$c" ]]; then SANITIZER=$c; fi
done
if [[ -n "$SANITIZER" ]]; then
    # no caching allocator: each tensor is its own allocation, so memcheck sees out-of-bounds accesses
    run_step sanitizer 150 "$OUT/sanitize.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SANITIZER" --tool memcheck --error-exitcode 1 --print-limit 50 $PY bench/sanitize_driver.py
else
    echo "compute-sanitizer not found" >"$OUT/sanitize.log"
    STEPS+=("$(printf '%-22s rc=%-4s %-8s' sanitizer - MISSING)")
    say "step sanitizer: compute-sanitizer not found (not run)"
fi

# ---------------------------------------------------------------- 6. full test suite (whatever time is left)
XDIST=()
if $PY -c 'import xdist' 2>/dev/null; then XDIST=(-n 8); fi
run_step tests-all 600 "$OUT/tests.log" $PY -m pytest tests -q -x -p no:cacheprovider "${XDIST[@]}"

# ---------------------------------------------------------------- summary + pack
{
    echo
    echo "== benchmark summary"
    for f in "$OUT"/*.csv; do
        [[ -e "$f" ]] && $PY -m sparsekit.bench.summarize "$f" --last || true
    done
} 2>&1 | tee -a "$SUMMARY" >/dev/null

# at most 8 files come back: keep the most useful ones, tar the rest (all files) into one archive
$PY - "$OUT" <<'PYEOF' || true
import os, sys, tarfile
out = sys.argv[1]
files = sorted(f for f in os.listdir(out) if os.path.isfile(os.path.join(out, f)))
dirs = [d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))]
if len(files) <= 8 and not dirs:
    sys.exit(0)
order = ["summary.txt", ".csv", ".md", "tests.log", "sanitize.log", ".png", "bench.log", "build.log"]
rank = lambda f: (min([i for i, p in enumerate(order) if f.endswith(p)] or [len(order)]), f)
keep = sorted(files, key=rank)[:7]
with tarfile.open(os.path.join(out, "all_outputs.tar.gz"), "w:gz") as t:
    for f in files + dirs:
        t.add(os.path.join(out, f), arcname=f)
for f in files:
    if f not in keep:
        os.remove(os.path.join(out, f))
print("[gpu_check] packed", len(files), "files into all_outputs.tar.gz; kept", keep)
PYEOF

echo
echo "================ gpu_check summary ($((SECONDS - START))s) ================"
cat "$SUMMARY" | sed -n '/== benchmark summary/,$p'
for s in "${STEPS[@]}"; do echo "$s"; done
echo "exit status: $WORST"
{ for s in "${STEPS[@]}"; do echo "$s"; done; echo "exit status: $WORST"; } >>"$SUMMARY"
exit "$WORST"
