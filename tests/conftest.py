import os

import pytest
import torch

# tests choose their backend explicitly; an inherited forcing variable would
# change what the "auto" tests exercise
os.environ.pop("SPARSEKIT_BACKEND", None)

HAS_CUDA = torch.cuda.is_available()


# the longest tests on 2 CPU cores (quality studies, whole-suite sweeps, the static gate, the fuzz
# suites): marked slow, so `make test-fast` (-m "not slow") is the inner loop; `make test` runs them all
SLOW = (
    "tests/fuzz/",
    "tests/test_static_gate.py::test_static_gate",
    "tests/test_prune_wanda_sparsegpt.py::test_digits_",
    "tests/test_quant.py::test_gptq_int4_keeps_digits_accuracy",
    "tests/test_prune_block.py::test_rate_distortion_beats_uniform",
    "tests/test_qlinear.py::test_quality_on_digits_mlp",
    "tests/test_cli.py::test_bench_quick_runs_cpu_sweep",
    "tests/test_compress.py::",
    "tests/test_compress_memory.py::",
    "tests/test_workloads.py::",
)


def _listed_slow() -> tuple:
    path = os.path.join(os.path.dirname(__file__), "slow_tests.txt")
    with open(path, encoding="utf-8") as f:
        return tuple(line.strip() for line in f if line.strip() and not line.startswith("#"))


SLOW = SLOW + _listed_slow()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(4321)
