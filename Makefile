# sparsekit developer targets.  PYTHON picks the interpreter (default python3).
#   make install        torch (only if missing) + this checkout, editable, with test extras
#   make test           the test suite (CPU: Triton interpreter + reference; GPU tests skip without CUDA)
#   make test-fast      the inner loop: the suite without the tests marked slow (no install step)
#   make bench          `sparsekit bench` (GPU: timings into bench/results/<gpu>/; CPU: correctness sweep)
#   make quality        `sparsekit quality`: the real-model compression quality table (minutes on CPU;
#                       QUALITY_ARGS="--workloads digits" for the MLP only)
#   make gpu-check      scripts/gpu_check.sh (the one call on the lent GPU machine; writes to $$OUT);
#                       DRY_RUN=1: on CPU, print the plan and run every step that needs no GPU
#   make compile-csrc   scripts/compile_csrc.sh (compile csrc/ sources without installing)
#   make gate-table     static performance gate: compile every launcher config for sm_90/sm_80, rewrite
#                       bench/gate/triton-<version>/ for this PYTHON's triton (GATE_ARGS="--family sparse24" for one family)
#   make test-stack2    STACK2_TESTS on the GPU machine's Triton (3.6) and NumPy generation, in a venv
#                       of its own (scripts/stack2_env.sh; default .ci/stack2)

PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
# e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for a CPU-only torch
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
QUALITY_ARGS ?=
GATE_ARGS ?=

# The second stack: the GPU machine runs triton 3.6 (NumPy 2.5) while this
# machine's default stack runs the newest triton, so an ahead-of-time compile
# test and each kernel family's interpreter tests also run in a venv with
# triton 3.6, NumPy >= 2.4 and the same (CPU) torch.  Add test files or test
# ids to STACK2_TESTS; keep the whole target within a few minutes on 2 cores.
# STACK2_GATE_STRIDE (empty: not run) runs the static performance gate on a
# sample of the configs (`static_gate --check --compare`, as in
# tests/test_static_gate.py): every sampled config must compile on triton 3.6
# and pass the gate or be a known failure (bench/gate/known_failures.csv), and
# the committed bench/gate/triton-3.6.0/ table must match (sources, config
# set, the sampled configs' counts).
STACK2_GATE_STRIDE ?= 90=4,80=8
STACK2_VENV ?= .ci/stack2
STACK2_PYTHON ?= $(PYTHON)
STACK2_TRITON ?= 3.6.0
STACK2_NUMPY ?= >=2.4
STACK2_TESTS ?= \
	tests/test_draft_attention.py::test_kernel_compiles_for_sm90_without_a_gpu \
	tests/test_triton_interpreter_numpy.py \
	tests/test_kernels_loader.py \
	tests/test_sparse24_linear.py::test_forward_interpret_matches_dense \
	tests/test_sparse24_linear.py::test_split_k_kernel_path \
	tests/test_sparse24_linear.py::test_grad_of_pruned_positions_is_not_stored \
	tests/test_sparse24_linear.py::test_interpreter_bf16_output_rounds_to_nearest \
	tests/test_block_sparse_linear.py::test_forward_interpret_matches_dense \
	tests/test_block_sparse_linear.py::test_split_kernel_path \
	tests/test_block_sparse_linear.py::test_grad_blocks_split_path \
	tests/test_block_sparse_linear.py::test_backward_empty_rows_and_columns_interpret \
	tests/test_int4_linear.py::test_forward_interpret_matches_dense \
	tests/test_int4_linear.py::test_register_dequant_is_bit_exact \
	tests/test_int4_linear.py::test_split_k_kernel_path \
	tests/test_int8_linear.py::test_w8a8_interpret_matches_fake_quant_math \
	tests/test_int8_linear.py::test_w4a8_interpret_matches_fake_quant_math \
	tests/test_int8_linear.py::test_mixed_and_a4_match_fake_quant_math \
	tests/test_int8_linear.py::test_gpu_tile_configs_run_in_interpreter \
	tests/test_sparse24_int4.py::test_forward_interpret_matches_dense \
	tests/test_sparse24_int4.py::test_gpu_configs_run_in_the_interpreter \
	tests/test_draft_attention.py::test_given_block_mask_equals_masked_dense \
	tests/test_draft_attention.py::test_broadcast_mask_and_kernel_tile_configs \
	"tests/test_draft_attention.py::test_any_head_dim[dtype1-72]" \
	tests/test_triple_gate_conv.py::test_mixed_gate_equals_composed_reference \
	tests/test_triple_gate_conv.py::test_gate_map_interpret_equals_reference \
	tests/test_triple_gate_conv.py::test_tile_list_and_compaction \
	tests/test_act_quant.py::test_kernel_equals_reference_bit_exact \
	tests/test_act_quant.py::test_kernel_chunked_rows_noncontiguous_and_transposed
STACK2_PYTEST_ARGS ?=

.PHONY: install test test-fast bench quality gpu-check compile-csrc gate-table test-stack2

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

# the inner loop: everything but the tests marked slow (tests/conftest.py: quality studies, fuzz, gate)
test-fast:
	@$(PYTHON) -m pytest tests -q -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: pytest collected no tests (exit 5): failing"; exit 1; fi; \
	exit $$rc

bench: install
	$(PYTHON) -m sparsekit.cli bench $(BENCH_ARGS)

quality: install
	$(PYTHON) -m sparsekit.cli quality $(QUALITY_ARGS)

DRY_RUN ?=
gpu-check:
	PYTHON=$(PYTHON) GPU_CHECK_DRY_RUN=$${GPU_CHECK_DRY_RUN:-$(DRY_RUN)} bash scripts/gpu_check.sh

compile-csrc:
	bash scripts/compile_csrc.sh

gate-table:
	$(PYTHON) -m sparsekit.bench.static_gate --out committed --known update $(GATE_ARGS)

# pytest's exit 5 (no tests collected) fails here too
test-stack2:
	@py=$$(STACK2_VENV="$(STACK2_VENV)" STACK2_PYTHON="$(STACK2_PYTHON)" STACK2_TORCH="$(TORCH_VERSION)" \
		STACK2_TRITON="$(STACK2_TRITON)" STACK2_NUMPY="$(STACK2_NUMPY)" TORCH_PIP_ARGS="$(TORCH_PIP_ARGS)" \
		bash scripts/stack2_env.sh) || exit 1; \
	gate=0; \
	if [ -n "$(STACK2_GATE_STRIDE)" ]; then \
		echo "$$py -m sparsekit.bench.static_gate --check --compare --stride $(STACK2_GATE_STRIDE)"; \
		$$py -m sparsekit.bench.static_gate --check --compare --stride "$(STACK2_GATE_STRIDE)" || gate=1; \
	fi; \
	echo "$$py -m pytest $(strip $(STACK2_TESTS)) -q $(STACK2_PYTEST_ARGS)"; \
	$$py -m pytest $(STACK2_TESTS) -q -p no:cacheprovider $(STACK2_PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-stack2: pytest collected no tests (exit 5): failing"; exit 1; fi; \
	if [ $$gate -ne 0 ]; then echo "make test-stack2: the static performance gate failed on triton $(STACK2_TRITON)"; exit 1; fi; \
	exit $$rc
