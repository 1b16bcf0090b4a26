#!/usr/bin/env bash
# The one call on the lent GPU machine (H100/H200, no internet): everything useful in at most
# GPU_CHECK_BUDGET_S seconds (default 480), results flushed into $OUT as they come.
#
#   OUT=/some/dir bash scripts/gpu_check.sh                 (default OUT=.out)
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh          (CPU: print the plan, run what runs without a GPU)
#   GPU_CHECK_STAGE=tests bash scripts/gpu_check.sh        (a second call: the GPU test suite)
#   python -m bench.gpu_check --plan                       (just the plan)
#
# Steps (budgets in bench/gpu_check.py STEPS): env, build (offline pip install -e . + csrc),
# smoke (every kernel family vs float64), warmup (parallel first-launch compiles), bench (the
# rows that decide each performance target, most valuable first), sanitizer (memcheck, one small
# case per family), tables (dispatch table).  $OUT receives at most 7 files: summary.txt,
# smoke.txt, bench.csv, bench.md, dispatch_table.json, sanitize.log, logs.tar.gz.
#
# Knobs (environment): GPU_CHECK_BUDGET_S, GPU_CHECK_DRY_RUN, GPU_CHECK_STAGE (main|tests),
# GPU_CHECK_SKIP (step names), GPU_CHECK_WORKERS (parallel processes, default min(12, cores - 2)),
# GPU_CHECK_CACHE (Triton / inductor cache root, default /tmp/sparsekit-gpu-check-cache),
# GPU_CHECK_WORK (logs before packing), GPU_CHECK_DRY_BUILD=1 (dry run: also compile csrc),
# SPARSEKIT_CUDA_ARCHS (default: this GPU's, e.g. 90a), MAX_JOBS, PYTHON (default python3).
#
# Exit status: 1 when a step FAILED (a failed or unloadable extension build included) or the smoke
# step ran out of time before every case ran; a warm-up, bench or sanitizer step stopped at its
# limit with no failure in what it ran is CUT (listed in summary.txt, exit status 0); 2 for bad
# arguments.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
exec "$PY" -m bench.gpu_check "$@"
