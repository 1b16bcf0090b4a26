"""compress's peak extra memory stays ~constant in the number of blocks (in place, block by block).

tests/memory_probe.py compresses Llama-class models (transformers' LlamaForCausalLM built offline from a config,
or, without transformers, a plain-torch decoder with the same seven linear layers per block) of N = 2, 4 and 8
decoder blocks with GPTQ (int4) and SparseGPT (2:4) in a fresh process whose allocator returns every
tensor of 16 KiB or more to the system when it is freed, so that the peak resident set size (reset before
each run) is the peak of the live memory.  (tracemalloc cannot measure this: torch's CPU allocator bypasses
Python's, so tensors do not show in it.)  Each model is also compressed with the whole model as one block
(``blocks=None``, the non-block path), which must give the same bits.
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def probe():
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    env = dict(os.environ, SPARSEKIT_NO_CUDA_EXT="1", MALLOC_MMAP_THRESHOLD_="16384", MALLOC_TRIM_THRESHOLD_="0",
               MALLOC_ARENA_MAX="1", OMP_NUM_THREADS="1")
    env.pop("SPARSEKIT_BACKEND", None)
    r = subprocess.run([sys.executable, os.path.join(HERE, "memory_probe.py"), "gptq:2,4,8", "sparsegpt:2,4,8"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    print("\n" + "\n".join(f"{x['model']} {x['method']:>9} N={x['blocks']}: model {x['model_bytes'] / 2**20:5.1f} MiB, peak extra "
                            f"block by block {x['extra_blockwise'] / 2**20:5.2f} MiB, whole model "
                            f"{x['extra_whole_model'] / 2**20:5.2f} MiB" for x in rows))
    return rows


@pytest.mark.parametrize("method", ["gptq", "sparsegpt"])
def test_peak_extra_memory_is_constant_in_the_number_of_blocks(probe, method):
    rows = {x["blocks"]: x for x in probe if x["method"] == method}
    assert sorted(rows) == [2, 4, 8]
    block = rows[2]["block_bytes"]
    assert all(x["mode"] == "blocks" for x in rows.values())
    extra = {n: x["extra_blockwise"] for n, x in rows.items()}
    # the 6 more blocks of N=8 would add ~6 blocks if memory followed the model; it adds < 1
    assert max(extra.values()) - min(extra.values()) < block, extra
    assert extra[8] < 1.5 * extra[2] + block, extra
    # well below the whole-model path at N=8
    assert extra[8] < 0.6 * rows[8]["extra_whole_model"], (extra, rows[8]["extra_whole_model"])
    # the measurement does see memory that grows with the model: the whole-model path keeps a scratch copy
    # of every layer's weight
    whole = {n: x["extra_whole_model"] for n, x in rows.items()}
    assert whole[8] - whole[2] > 4 * block, whole


@pytest.mark.parametrize("method", ["gptq", "sparsegpt"])
def test_block_by_block_result_equals_the_whole_model_path(probe, method):
    rows = [x for x in probe if x["method"] == method]
    assert len(rows) == 3 and all(x["equal"] for x in rows), rows
    assert all(x["whole_mode"] == "whole model" for x in rows)
    assert [x["num_layers"] for x in rows] == [7 * n + 1 for n in (2, 4, 8)]     # the head (after the blocks) too
