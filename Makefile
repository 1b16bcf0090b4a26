# sparsekit developer targets.  PYTHON picks the interpreter (default python3).
#   make install        torch (only if missing) + this checkout, editable, with test extras
#   make test           the test suite (CPU: Triton interpreter + reference; GPU tests skip without CUDA)
#   make bench          `sparsekit bench` (GPU: timings into bench/results/<gpu>/; CPU: correctness sweep)
#   make gpu-check      scripts/gpu_check.sh (the one call on the lent GPU machine; writes to $$OUT);
#                       DRY_RUN=1: on CPU, print the plan and run every step that needs no GPU
#   make compile-csrc   scripts/compile_csrc.sh (compile csrc/ sources without installing)
#   make gate-table     static performance gate: compile every launcher config for sm_90/sm_80, rewrite
#                       bench/gate/triton-<version>/ for this PYTHON's triton (GATE_ARGS="--family sparse24" for one family)

PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
# e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for a CPU-only torch
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
GATE_ARGS ?=

.PHONY: install test bench gpu-check compile-csrc gate-table

install:
	@$(PYTHON) -c "import torch" 2>/dev/null \
		&& echo "torch already installed: $$($(PYTHON) -c 'import torch; print(torch.__version__)')" \
		|| $(PIP) install "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(PIP) install -q "setuptools>=64" wheel
	# no build isolation: setup.py must see the installed torch to build csrc/ where torch has CUDA
	$(PIP) install --no-build-isolation -e ".[test]"

# pytest exits 5 when it collects no tests: that is a failure here too
test: install
	@$(PYTHON) -m pytest tests -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): failing"; exit 1; fi; \
	exit $$rc

bench: install
	$(PYTHON) -m sparsekit.cli bench $(BENCH_ARGS)

DRY_RUN ?=
gpu-check:
	PYTHON=$(PYTHON) GPU_CHECK_DRY_RUN=$${GPU_CHECK_DRY_RUN:-$(DRY_RUN)} bash scripts/gpu_check.sh

compile-csrc:
	bash scripts/compile_csrc.sh

gate-table:
	$(PYTHON) -m sparsekit.bench.static_gate --out committed $(GATE_ARGS)
