"""Shape-keyed dispatch: row matching, backend acceptance, the 2:4 op's extra
backends (dense, cusparselt) and the table builder on synthetic benchmark rows."""
from __future__ import annotations

import csv
import io
import json
import os

import pytest
import torch

import sparsekit.ops.sparse24  # noqa: F401  (registers sparse24_linear)
import sparsekit.ops.sparse24_int8  # noqa: F401
from sparsekit.formats import Sparse24Weight
from sparsekit.ops import dispatch, dispatch_build
from sparsekit.ops.sparse24 import dense_weight_cached, sparse24_linear
from sparsekit.testing import assert_close_rel, random_2to4


def test_row_matches_conditions():
    rm = dispatch.row_matches
    assert rm({"max_m": None, "backend": "x"}, 10**6)
    assert rm({"max_m": 16}, 16) and not rm({"max_m": 16}, 17)
    assert rm({"min_m": 17}, 17) and not rm({"min_m": 17}, 16)
    row = {"min_n": 4096, "max_n": 4096, "min_k": 11008, "dtype": ["fp16", "bf16"]}
    assert rm(row, 1, 4096, 11008, "fp16")
    assert rm(row, 1, 4096, 20000, torch.bfloat16)           # torch dtypes are named
    assert not rm(row, 1, 4095, 11008, "fp16")
    assert not rm(row, 1, 4096, 4096, "fp16")
    assert not rm(row, 1, 4096, 11008, "fp32")
    assert not rm(row, 1, None, 11008, "fp16")               # a constrained quantity must be passed
    assert not rm({"dtype": "int8"}, 1, 8, 8, None)


def _rows(*pairs):
    return [dict(p) for p in pairs]


def test_select_from_rows_first_match_and_availability():
    op = "sparse24_linear"
    rows = _rows({"max_m": 16, "dtype": "fp16", "backend": "interpret"},
                 {"max_m": 64, "min_n": 100, "backend": "dense"},
                 {"max_m": None, "backend": "triton"},          # not available on CPU: skipped
                 {"max_m": None, "backend": "reference"})
    sel = dispatch.select_from_rows
    assert sel(op, rows, "cpu", 8, n=64, k=64, dtype=torch.float16) == "interpret"
    assert sel(op, rows, "cpu", 8, n=200, k=64, dtype=torch.float32) == "dense"
    assert sel(op, rows, "cpu", 8, n=64, k=64, dtype=torch.float32) == "reference"
    assert sel(op, rows, "cpu", 65, n=200, k=64, dtype=torch.float16) == "reference"
    assert sel(op, [{"max_m": None, "backend": "cusparselt"}], "cpu", 1) == "reference"  # needs CUDA


def test_accepts_skips_rows_a_backend_cannot_run():
    # 'cusparselt' only accepts fp16/bf16; 'cuda' only M <= 16 for fp32
    acc = dispatch._ACCEPTS["sparse24_linear"]
    assert acc["cusparselt"](64, 64, 64, "fp16") and not acc["cusparselt"](64, 64, 64, "fp32")
    assert acc["cuda"](16, 64, 64, "fp32")
    assert not acc["cuda"](17, 64, 64, "fp32")
    dispatch.register("_test_accepts_op", ("dense", "reference"), accepts={"dense": lambda m, n, k, d: m < 10})
    rows = _rows({"max_m": None, "backend": "dense"}, {"max_m": None, "backend": "reference"})
    assert dispatch.select_from_rows("_test_accepts_op", rows, "cpu", 5) == "dense"
    assert dispatch.select_from_rows("_test_accepts_op", rows, "cpu", 50) == "reference"
    with pytest.raises(ValueError, match="does not implement"):
        dispatch.register("_bad", ("reference",), accepts={"dense": lambda *a: True})
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.register("_bad", ("warp-drive",))


def test_resolve_forcing_extra_backends(monkeypatch):
    assert dispatch.resolve("sparse24_linear", "cpu", "dense") == "dense"
    with pytest.raises(ValueError, match="cusparselt"):
        dispatch.resolve("sparse24_linear", "cpu", "cusparselt")
    with pytest.raises(ValueError, match="no 'cusparselt' backend"):
        dispatch.resolve("sparse24_int8_linear", "cpu", "cusparselt")
    assert dispatch.resolve("sparse24_int8_linear", "cpu", "interpret") == "interpret"
    monkeypatch.setenv(dispatch.ENV_VAR, "dense")
    assert dispatch.resolve("sparse24_linear", "cpu", None, 5, n=3, k=8, dtype=torch.float16) == "dense"
    # CPU auto dispatch takes the cached dense expansion whatever the table says
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert dispatch.resolve("sparse24_linear", "cpu", None, 5, n=3, k=8, dtype=torch.float16) == "dense"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_backend_caches_the_expansion(dtype):
    w = random_2to4(33, 100, dtype=dtype)
    s = Sparse24Weight.from_dense(w)
    x = torch.randn(5, 100).to(dtype)
    y = sparse24_linear(x, s, None, backend="dense")
    assert_close_rel(y, x.double() @ w.double().T, dtype)
    d1 = dense_weight_cached(s.values, s.meta, 100)
    assert dense_weight_cached(s.values, s.meta, 100) is d1         # expanded once
    with torch.no_grad():
        s.values.mul_(2)                                            # in-place update: re-expanded
    d2 = dense_weight_cached(s.values, s.meta, 100)
    assert d2 is not d1 and torch.equal(d2, 2 * d1)
    # backward of the dense backend = the reference's
    xg = x.clone().requires_grad_(True)
    v = s.values.clone().requires_grad_(True)
    sparse24_linear(xg, Sparse24Weight(v, s.meta, s.shape), None, backend="dense").sum().backward()
    assert xg.grad is not None and v.grad is not None


def test_cusparselt_backend_rejects_fp32_and_cpu():
    s = Sparse24Weight.from_dense(random_2to4(32, 64))
    with pytest.raises(ValueError, match="cusparselt"):
        sparse24_linear(torch.randn(2, 64), s, None, backend="cusparselt")


def test_default_table_is_well_formed_and_conservative():
    for name in os.listdir(dispatch._TABLE_DIR):
        with open(os.path.join(dispatch._TABLE_DIR, name)) as f:
            table = json.load(f)
        for op in ("sparse24_linear", "sparse24_int8_linear"):
            rows = table.get(op)
            if rows is None:
                continue
            last = rows[-1]
            assert set(last) == {"max_m", "backend"} and last["max_m"] is None, f"{name}:{op} catch-all"
            for r in rows:
                assert r["backend"] in dispatch._REGISTRY[op], (name, op, r)
    with open(os.path.join(dispatch._TABLE_DIR, "default.json")) as f:
        rows = json.load(f)["sparse24_linear"]
    # unknown GPUs: no unmeasured sparse path above the memory-bound M <= 16 regime
    assert all(r["backend"] == "dense" for r in rows if r["max_m"] is None or r["max_m"] > 16)


# ------------------------------------------------------------------ the table builder
def _csv_rows(spec):
    """spec: {(dtype, M, N, K): {backend: p50 or 'skip'}} -> CSV dict rows (through a real CSV)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["op", "case", "backend", "dtype", "p50_ms", "status", "gpu"])
    w.writeheader()
    for (dt, m, n, k), times in spec.items():
        for b, t in times.items():
            w.writerow({"op": "sparse24_linear", "case": f"M={m},N={n},K={k}", "backend": b, "dtype": dt,
                        "p50_ms": "" if t == "skip" else t, "status": "skip" if t == "skip" else "ok",
                        "gpu": "Fake GPU"})
    buf.seek(0)
    return list(csv.DictReader(buf))


def test_builder_picks_fastest_and_never_slower_than_dense():
    spec = {
        ("fp16", 1, 4096, 4096): {"dense": 0.030, "cuda": 0.018, "triton": 0.020, "cutlass24": 0.001},
        ("fp16", 16, 4096, 4096): {"dense": 0.031, "cuda": 0.019, "triton": 0.021},
        ("fp16", 256, 4096, 4096): {"dense": 0.050, "cuda": 0.060, "triton": 0.055, "cusparselt": 0.049},
        ("fp16", 4096, 4096, 4096): {"dense": 0.80, "cuda": 0.55, "cusparselt": 0.62, "triton": "skip"},
        ("fp16", 8192, 4096, 4096): {"dense": 1.60, "cuda": 1.10, "cusparselt": 1.20},
        ("fp16", 1, 11008, 4096): {"dense": 0.070, "cuda": 0.080},      # nothing beats dense
        ("fp16", 4096, 11008, 4096): {"dense": 2.0, "cuda": 1.5},
        ("bf16", 4096, 4096, 4096): {"cuda": 0.5},                        # no dense row: no decision
    }
    rows = dispatch_build.build_op_rows(_csv_rows(spec), "sparse24_linear", margin=0.0)
    shape = [r for r in rows if r.get("min_n") == 4096]
    assert shape == [
        {"dtype": "fp16", "min_n": 4096, "max_n": 4096, "min_k": 4096, "max_k": 4096, "max_m": 16, "backend": "cuda"},
        {"dtype": "fp16", "min_n": 4096, "max_n": 4096, "min_k": 4096, "max_k": 4096, "max_m": 256,
         "backend": "cusparselt"},
        {"dtype": "fp16", "min_n": 4096, "max_n": 4096, "min_k": 4096, "max_k": 4096, "max_m": None,
         "backend": "cuda"},
    ]
    other = [r for r in rows if r.get("min_n") == 11008]
    assert other[0]["backend"] == "dense" and other[0]["max_m"] == 1
    assert other[-1]["backend"] == "cuda" and other[-1]["max_m"] is None
    # generic fp16 rows: at M=1 cuda beat dense on 4096x4096 only -> dense
    generic = [r for r in rows if "min_n" not in r and "dtype" in r]
    assert generic[0] == {"dtype": "fp16", "max_m": 1, "backend": "dense"}
    assert generic[-1]["backend"] == "cuda" and generic[-1]["max_m"] is None
    assert not any(r.get("dtype") == "bf16" for r in rows)
    assert rows[-1] == {"max_m": None, "backend": "dense"}
    # the choice never measured slower than dense: replay every measured case
    for (dt, m, n, k), times in spec.items():
        if "dense" not in times:
            continue
        got = dispatch.select_from_rows("sparse24_linear", [r for r in rows if r["backend"] in ("dense", "cuda",
                                        "cusparselt", "triton")], "cpu", m, n=n, k=k, dtype=dt)
        # on CPU only 'dense' (and 'reference') are available: check the row itself instead
        row = next(r for r in rows if dispatch.row_matches(r, m, n, k, dt))
        t = times.get(row["backend"])
        assert isinstance(t, float) and t <= times["dense"], (dt, m, n, k, row)
        assert got in ("dense", "reference")


def test_builder_margin_and_table_cli(tmp_path):
    spec = {("fp16", 64, 256, 256): {"dense": 1.0, "triton": 0.99}}
    rows = dispatch_build.build_op_rows(_csv_rows(spec), "sparse24_linear", margin=0.02)
    assert rows[0]["backend"] == "dense"                       # 1% faster is within the margin
    path = tmp_path / "bench.csv"
    data = _csv_rows({("fp16", 64, 256, 256): {"dense": 1.0, "triton": 0.5}})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(data[0]))
        w.writeheader()
        w.writerows(data)
    out = tmp_path / "table.json"
    assert dispatch_build.main([str(path), "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert "Fake GPU" in table["_comment"]
    assert table["sparse24_linear"][0]["backend"] == "triton"
    assert "sparse24_int8_linear" not in table                 # no rows for it
    with pytest.raises(ValueError, match="no candidate"):
        dispatch_build.build_op_rows([], "nope")


def test_choose_helper():
    c = dispatch_build.choose
    assert c({"cuda": 1.0}, ("cuda", "dense")) is None
    assert c({"dense": 1.0, "cuda": 1.0}, ("cuda", "dense")) == "dense"   # a tie keeps dense
    assert c({"dense": 1.0, "cuda": 0.5, "triton": 0.4}, ("cuda", "dense")) == "cuda"  # triton not a candidate
