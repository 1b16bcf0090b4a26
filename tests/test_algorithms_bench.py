"""bench/algorithms.py: sparsekit vs the original loop structure (results only; no timing assertions)."""
import csv

import torch

from bench import algorithms
from sparsekit.calibration import core
from sparsekit.quant import collect_linear_inputs


def test_small_mode_writes_the_table_and_both_sides_agree(tmp_path):
    rows = algorithms.run(256, 256, 128, repeats=1)
    names = [r["algorithm"] for r in rows]
    assert names == ["hessian", "sparsegpt_2:4", "sparsegpt_unstructured", "gptq_g128", "gptq_g128_act_order",
                     "awq_search"]
    for r in rows:
        assert r["match"], r
        assert r["sparsekit_s"] > 0 and r["original_s"] > 0
    csv_path, md_path = algorithms.write(rows, str(tmp_path), {"CPU": "test"})
    with open(csv_path) as f:
        got = list(csv.DictReader(f))
    assert tuple(got[0].keys()) == algorithms.COLUMNS and len(got) == 6
    assert abs(float(got[0]["ratio"]) - float(got[0]["sparsekit_s"]) / float(got[0]["original_s"])) < 0.01
    assert "| awq_search |" in open(md_path).read()
    assert algorithms.main(["--n", "128", "--k", "128", "--rows", "64", "--repeats", "1", "--only", "gptq_g128",
                            "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "algorithms.csv").exists()


def test_float32_xtx_products_are_within_the_documented_tolerance():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(512, 8)
    batches = [torch.randn(2048, 512, generator=g) * torch.exp(torch.randn(512, generator=g)) for _ in range(2)]
    h32 = collect_linear_inputs(lin, None, batches, progress=False)[""]["H"]
    old = core.set_xtx_dtype(torch.float64)
    try:
        h64 = collect_linear_inputs(lin, None, batches, progress=False)[""]["H"]
    finally:
        core.set_xtx_dtype(old)
    x = torch.cat(batches).double()
    ref = 2 * x.T @ x / x.shape[0]
    assert h32.dtype == torch.float64
    assert float((h64 - ref).norm() / ref.norm()) < 1e-12
    rel = float((h32 - ref).norm() / ref.norm())
    assert 0 < rel < 1e-5
    # folding the float32 buffer into the float64 sum every 256 rows: within the same tolerance
    old = core.set_xtx_fold_rows(256)
    try:
        hf = collect_linear_inputs(lin, None, batches, progress=False)[""]["H"]
    finally:
        core.set_xtx_fold_rows(old)
    assert 0 < float((hf - ref).norm() / ref.norm()) < 1e-5
