"""CPU tests of the benchmark harness (no GPU needed)."""
from __future__ import annotations

import csv
import os

import pytest

from sparsekit.bench import harness, sparse24
from sparsekit.bench.harness import Row, format_case, parse_case


def _row(case="M=16,N=4096,K=4096", backend="triton", p50=1.0, status="ok", dtype="fp16", **kw):
    return Row(op="sparse24_linear", case=case, backend=backend, dtype=dtype,
               p20_ms=None if p50 is None else p50 * 0.9, p50_ms=p50,
               p80_ms=None if p50 is None else p50 * 1.1, gpu="NVIDIA H100 80GB HBM3", commit="abc1234",
               date="2026-11-23T12:00:00+00:00", status=status, **kw)


# ---------------------------------------------------------------- case strings
def test_format_case_numbers_bare_and_order_kept():
    assert format_case(M=16, N=4096, K=4096) == "M=16,N=4096,K=4096"
    assert format_case(S=80640, H=24, D=128, sparsity=0.9) == "S=80640,H=24,D=128,sparsity=0.9"
    assert format_case({"density": 0.25, "block": 64}, M=256) == "density=0.25,block=64,M=256"
    assert format_case([("a", 1.0), ("b", "x")]) == "a=1,b=x"
    assert format_case(p=1e-7) == "p=1e-07"


def test_format_case_rejects_separators():
    with pytest.raises(ValueError):
        format_case(x="a,b")


def test_parse_case_roundtrip():
    s = format_case(M=1, N=11008, K=4096, sparsity=0.9, layout="t")
    assert parse_case(s) == {"M": 1, "N": 11008, "K": 4096, "sparsity": 0.9, "layout": "t"}
    assert format_case(parse_case(s)) == s


def test_gpu_slug():
    assert harness.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert harness.gpu_slug("NVIDIA H200") == "nvidia-h200"
    assert harness.gpu_slug("") == "unknown-gpu"


def test_environment_fields():
    assert harness.git_commit()  # a short sha or "unknown"
    assert harness.git_commit("/") == "unknown" or harness.git_commit("/")
    d = harness.now_iso()
    assert d[4] == "-" and "T" in d


def test_row_has_required_columns():
    for c in harness.REQUIRED_COLUMNS:
        assert c in harness.COLUMNS
    assert harness.COLUMNS[: len(harness.REQUIRED_COLUMNS)] == harness.REQUIRED_COLUMNS
    for extra in ("tflops", "tbps", "bytes", "speedup_vs_best_peer", "chosen_backend", "rel_err"):
        assert extra in harness.COLUMNS


# ---------------------------------------------------------------- ratios / throughput
def test_fill_ratios_and_throughput():
    rows = [_row(backend="dense", p50=2.0), _row(backend="triton", p50=1.0),
            _row(backend="cusparselt", p50=1.6), _row(backend="cutlass24", p50=None, status="skip"),
            _row(case="M=1,N=4096,K=4096", backend="triton", p50=0.5)]
    harness.fill_ratios(rows)
    dense, tri, csl, cut, other = rows
    assert dense.speedup_vs_dense == pytest.approx(1.0)
    assert tri.speedup_vs_dense == pytest.approx(2.0)
    assert tri.best_peer == "cusparselt" and tri.speedup_vs_best_peer == pytest.approx(1.6)
    assert dense.best_peer == "cusparselt" and dense.speedup_vs_best_peer == pytest.approx(0.8)
    assert cut.speedup_vs_dense is None          # skipped rows get no ratio
    assert other.speedup_vs_dense is None        # no dense row in its case
    r = _row(p50=2.0, flops=4 * 10**12, bytes=6 * 10**9)
    harness.fill_throughput(r, ceilings=(3.0, 800.0))
    assert r.tflops == pytest.approx(2000.0)
    assert r.tbps == pytest.approx(3.0)
    assert r.roofline_ms == pytest.approx(max(6e9 / 3e12, 4e12 / 800e12) * 1e3)
    assert r.pct_roofline == pytest.approx(100 * r.roofline_ms / 2.0)


def test_rotation_and_quantiles():
    seen = []
    call = harness.rotating(lambda a: seen.append(a), [(1,), (2,), (3,)])
    for _ in range(7):
        call()
    assert seen == [1, 2, 3, 1, 2, 3, 1]
    assert harness.quantiles([1, 2, 3, 4, 5]) == pytest.approx((1.8, 3.0, 4.2))
    assert harness.n_rotating_sets(10 * 2**20, l2=50 * 2**20) == 8      # capped
    assert harness.n_rotating_sets(30 * 2**20, l2=50 * 2**20) == 4
    assert harness.n_rotating_sets(200 * 2**20, l2=50 * 2**20) == 1
    p20, p50, p80 = harness.time_rotating_cpu(lambda a: a + 1, [(1,), (2,)], warmup_ms=1, rep_ms=2)
    assert 0 <= p20 <= p50 <= p80


# ---------------------------------------------------------------- writers
def test_csv_header_once_and_append(tmp_path):
    path = str(tmp_path / "r" / "sparse24_linear.csv")
    harness.write_csv([_row(backend="dense", p50=2.0), _row(backend="triton")], path)
    harness.write_csv([_row(backend="cuda", p50=0.7)], path)
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    assert sum(line.startswith("op,case,backend,dtype,") for line in lines) == 1
    rows = harness.read_csv(path)
    assert [r["backend"] for r in rows] == ["dense", "triton", "cuda"]
    assert rows[0]["case"] == "M=16,N=4096,K=4096"          # quoted commas survive
    assert float(rows[2]["p50_ms"]) == pytest.approx(0.7)
    assert rows[0]["speedup_vs_dense"] == ""                # None -> empty cell


def test_csv_widens_old_header(tmp_path):
    path = tmp_path / "op.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(harness.REQUIRED_COLUMNS)
        w.writerow(["sparse24_linear", "M=1,N=8,K=8", "dense", "fp16", 1, 2, 3, 1, "g", "c", "d"])
    harness.write_csv([_row()], str(path))
    rows = harness.read_csv(str(path))
    assert len(rows) == 2 and rows[0]["p50_ms"] == "2" and rows[1]["backend"] == "triton"
    assert set(harness.COLUMNS) <= set(rows[0])


def test_markdown_and_plot(tmp_path):
    rows = []
    for m in (1, 16, 256):
        for be, t in (("dense", 2.0), ("triton", 1.0 + m / 256), ("sparsekit_auto", 1.0)):
            rows.append(_row(case=format_case(M=m, N=4096, K=4096), backend=be, p50=t,
                             chosen_backend="triton" if be == "sparsekit_auto" else ""))
    rows.append(_row(case="M=1,N=4096,K=4096", backend="cusparselt", p50=None, status="skip",
                     note="unavailable: no cuSPARSELt"))
    harness.fill_ratios(rows)
    md = harness.write_markdown(rows, str(tmp_path / "t.md"), title="sparse24_linear test")
    text = open(md).read()
    assert "| case | dtype | backend | p50 ms" in text
    assert "| M=16,N=4096,K=4096 | fp16 | triton |" in text
    assert "chose triton" in text and "unavailable: no cuSPARSELt" in text
    assert sum(line.startswith("|") for line in text.splitlines()) == len(rows) + 2  # header, rule, rows
    png = harness.write_plot(rows, str(tmp_path / "t.png"), title="test")
    assert png and os.path.getsize(png) > 1000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert harness.write_plot([_row(p50=None, status="skip")], str(tmp_path / "none.png")) is None


def test_write_run_files(tmp_path):
    rows = [_row(backend="dense", p50=2.0), _row(backend="triton")]
    harness.fill_ratios(rows)
    paths = harness.write_run(rows, "sparse24_linear", str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    assert names[0] == "sparse24_linear.csv"
    assert any(n.endswith(".md") for n in names) and any(n.endswith(".png") for n in names)


# ---------------------------------------------------------------- the CPU correctness sweep
def test_cpu_sweep_one_tiny_case():
    cases = [(format_case(M=3, N=20, K=36), (3,), 20, 36, False)]
    rows, ok = sparse24.cpu_sweep(dtypes=("fp32", "bf16"), cases=cases)
    assert ok, [(r.case, r.dtype, r.backend, r.rel_err, r.note) for r in rows if r.status != "ok"]
    assert {r.backend for r in rows} == {"interpret", "reference", "sparsekit_auto"}
    assert all(r.rel_err is not None and r.rel_err < 1e-2 for r in rows)


def test_cpu_sweep_reports_failure(monkeypatch):
    import sparsekit.ops as ops

    real = ops.sparse24_linear

    def broken(x, w, bias=None, *, backend=None):
        out = real(x, w, bias, backend=backend)
        return out * 1.5 if backend == "interpret" else out

    monkeypatch.setattr(ops, "sparse24_linear", broken)
    cases = [(format_case(M=1, N=8, K=16), (1,), 8, 16, False)]
    rows, ok = sparse24.cpu_sweep(dtypes=("fp32",), backends=("interpret", "reference"), cases=cases)
    assert not ok
    assert [r.status for r in rows] == ["fail", "ok"]


def test_timing_path_dry_run_on_cpu(tmp_path):
    """The GPU benchmark's logic (checks, skips, ratios) on CPU tensors with the host clock."""
    got = []
    rows = sparse24.run_gpu(shapes=[(24, 40)], ms=[1, 5], dtypes=["fp32"],
                            backends=("dense", "reference", "sparsekit_auto", "triton", "cutlass24"),
                            warmup_ms=0.5, rep_ms=1, device="cpu", timer=harness.time_rotating_cpu,
                            ctx=dict(gpu="cpu", commit="x", date="d"), on_rows=got.append, log=lambda *a: None)
    assert len(got) == 1 and got[0] == rows
    by = {(r.case, r.backend): r for r in rows}
    d = by[("M=5,N=24,K=40", "dense")]
    assert d.status == "ok" and d.speedup_vs_dense == pytest.approx(1.0) and d.p50_ms > 0
    ref = by[("M=5,N=24,K=40", "reference")]
    assert ref.status == "ok" and ref.rel_err < 1e-5 and ref.speedup_vs_dense > 0 and ref.tflops > 0
    assert by[("M=1,N=24,K=40", "sparsekit_auto")].chosen_backend == "dense"       # the CPU default (cached expansion)
    assert by[("M=1,N=24,K=40", "triton")].status == "skip"      # triton needs CUDA tensors
    assert by[("M=1,N=24,K=40", "cutlass24")].status == "skip"


def test_time_case_checks_before_timing():
    import torch

    x = [torch.randn(3, 4), torch.randn(3, 4)]
    w = [torch.randn(5, 4), torch.randn(5, 4)]
    ref = x[0] @ w[0].T

    def boom(a, b):
        raise RuntimeError("no kernel here")

    bks = [harness.Backend("dense", lambda a, b: a @ b.T, w, 80),
           harness.Backend("triton", lambda a, b: a @ b.T + 1.0, w, 40),          # wrong: fail, not timed
           harness.Backend("cusparselt", boom, w, 40, peer=True),                  # a peer that cannot run
           harness.Backend("cutlass24", None, skip="unavailable: test"),
           harness.Backend("sparsekit_auto", lambda a, b: a @ b.T, w, 40)]
    rows = harness.time_case("sparse24_linear", "M=3,N=5,K=4", "fp32", bks, x, ref, flops=120, io_bytes=12,
                             timer=harness.time_rotating_cpu, warmup_ms=0.1, rep_ms=0.5,
                             choose=lambda a: "reference", log=lambda *a: None)
    by = {r.backend: r for r in rows}
    assert by["dense"].status == "ok" and by["dense"].p50_ms > 0 and by["dense"].rel_err == 0
    assert by["triton"].status == "fail" and by["triton"].p50_ms is None and "not timed" in by["triton"].note
    assert by["cusparselt"].status == "skip" and "no kernel here" in by["cusparselt"].note
    assert by["cutlass24"].status == "skip" and by["cutlass24"].bytes is None
    assert by["sparsekit_auto"].chosen_backend == "reference" and by["sparsekit_auto"].n_sets == 2
    assert by["dense"].bytes == 92
