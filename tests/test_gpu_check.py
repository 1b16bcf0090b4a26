"""`make gpu-check` on CPU: the plan (budgets, coverage, files), its budget arithmetic, the smoke
runner, the plan's rows against what the benchmark code produces, collect's new layout, and the
fast part of the dry run (scripts/gpu_check.sh with GPU_CHECK_DRY_RUN=1)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from sparsekit.bench import collect, gpu_check, gpu_smoke
from sparsekit.bench import run as bench_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, SPARSEKIT_NO_CUDA_EXT="1", PYTHONUNBUFFERED="1")
BENCH_OPS = {"sparse24_linear", "sparse24_int8_linear", "block_sparse_linear", "int4_linear", "sparse24_int4_linear",
             "draft_attention", "triple_gate_conv2d"}


@pytest.fixture(scope="module")
def plan():
    """The GPU plan as scripts/gpu_check.sh prints it (--plan-json)."""
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--plan-json"], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def _kv(case):
    from sparsekit.bench.harness import parse_case
    return parse_case(case)


# ---------------------------------------------------------------- the plan
def test_budgets_sum_within_480_and_cover_predictions(plan):
    assert plan["budget_s"] == gpu_check.DEFAULT_BUDGET_S == 480
    steps = plan["steps"]
    assert [s["name"] for s in steps] == ["env", "build", "smoke", "warmup", "bench", "sanitizer", "tables"]
    assert sum(s["budget_s"] for s in steps) + plan["reserve_s"] <= 480
    for s in steps:
        assert s["predict_s"] <= s["budget_s"], s
    # the timed selections fit the bench budget by their own predictions
    bench_budget = next(s["budget_s"] for s in steps if s["name"] == "bench")
    assert plan["bench"]["predict_s"] <= bench_budget
    assert all(it["predict_s"] > 0 and it["warm_s"] > 0 for it in plan["bench"]["items"])


def test_every_family_in_smoke_and_bench(plan):
    smoke = plan["smoke"]
    assert set(smoke["families"]) == set(gpu_smoke.FAMILIES)
    names = smoke["cases"]
    units = {n.split()[0] for n in names}
    for dt in ("fp16", "bf16", "fp32", "tf32"):
        assert f"sparse24/triton/{dt}" in units
    for u in ("sparse24/cuda/fp16", "sparse24/cuda/bf16", "sparse24_int8/cuda/fp16", "sparse24_int8/triton/bf16"):
        assert u in units
    for fam in gpu_smoke.FAMILIES:
        assert {n.split()[0].split("/")[2] for n in names if n.startswith(fam + "/")} >= {"fp16", "bf16"}, fam
    assert sum(len(s) for s in smoke["shards"]) == len(names)
    rows = [r for it in plan["bench"]["items"] for r in it["rows"]]
    assert {r["op"] for r in rows} == BENCH_OPS


def _rows(plan, op, **want):
    out = []
    for it in plan["bench"]["items"]:
        for r in it["rows"]:
            kv = _kv(r["case"])
            if r["op"] == op and all(f(kv.get(k)) if callable(f) else kv.get(k) == f for k, f in want.items()):
                out.append((it["index"], r))
    return out


def test_bench_rows_decide_each_target_with_peers(plan):
    small = _rows(plan, "sparse24_linear", M=lambda m: m <= 16)
    large = _rows(plan, "sparse24_linear", M=lambda m: m >= 4096)
    for rows in (small, large):
        assert {(_kv(r["case"])["N"], _kv(r["case"])["K"]) for _, r in rows} >= {(4096, 4096), (8192, 8192)}
        for _, r in rows:
            assert {"dense", "triton", "cuda", "cusparselt", "cutlass24"} <= set(r["backends"])
    assert {_kv(r["case"])["M"] for _, r in small if r["dtype"] == "fp16"} >= {1, 16}
    w4 = [r for _, r in _rows(plan, "int4_linear", M=lambda m: m <= 16) if "triton" in r["backends"]]
    assert w4 and all({"dense", "torchao_int4", "gemlite"} <= set(r["backends"]) for r in w4)
    bs = _rows(plan, "block_sparse_linear", density=0.25, block=64)
    assert bs and all({"dense", "triton", "torch_bsr"} <= set(r["backends"]) for _, r in bs)
    da = _rows(plan, "draft_attention", sparsity=0.9, S=lambda s: s >= 32768)
    assert da and all({"sdpa_flash", "flex", "triton"} <= set(r["backends"]) for _, r in da)
    tg = _rows(plan, "triple_gate_conv2d", density=0.25)
    assert tg and all({"dense", "triton"} <= set(r["backends"]) for _, r in tg)
    a8 = [r for _, r in _rows(plan, "int4_linear") if "torch_int_mm" in r["backends"]]
    assert {_kv(r["case"])["M"] for r in a8} >= {16, 4096}
    assert all({"dense", "triton_w8a8", "triton_w4a8"} <= set(r["backends"]) for r in a8)
    assert _rows(plan, "sparse24_int8_linear", M=16) and _rows(plan, "sparse24_int8_linear", M=4096)
    # most valuable first: the decode-size 2:4 rows lead, the bf16 / second attention geometry close
    assert min(i for i, _ in small) == 0
    assert plan["bench"]["items"][-1]["key"].startswith("draft_attention")


def test_out_files_at_most_8(plan):
    assert len(plan["out_files"]) <= gpu_check.MAX_OUT_FILES
    assert set(plan["out_files"]) == set(gpu_check.OUT_FILES)
    assert len(gpu_check.TEST_OUT_FILES) <= gpu_check.MAX_OUT_FILES


def test_plan_is_built_without_importing_sparsekit():
    """On the GPU machine the plan is printed before the checkout is installed."""
    code = ("import builtins, sys\n"
            "real = builtins.__import__\n"
            "def imp(name, g=None, l=None, f=(), level=0):\n"
            "    if level == 0 and name.split('.')[0] == 'sparsekit':\n"
            "        raise ImportError('sparsekit imported while planning: ' + name)\n"
            "    return real(name, g, l, f, level)\n"
            "builtins.__import__ = imp\n"
            "from bench import gpu_check\n"
            "c = gpu_check.Check(sys.argv[1], 480, False, 'main', set(), sys.argv[2], 12)\n"
            "p = c.plan()\n"
            "print(len(p['bench']['items']), len(p['smoke']['cases']))\n")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-c", code, os.path.join(d, "o"), os.path.join(d, "w")], cwd=REPO,
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == [str(len(bench_run.GPU_CHECK_ORDER)), str(len(gpu_smoke.CASES))]


@pytest.mark.parametrize("k", [100, 128, 200, 256, 4096, 11008, 8192, 4104])
def test_sparse24_int4_plan_group_matches_the_weight(k):
    import torch
    from sparsekit.bench import sparse24_int4

    _, q, _ = sparse24_int4.make_weight(8, k, torch.float16, "cpu")
    assert sparse24_int4.plan_group(k) == q.effective_group_size


def test_warm_up_covers_every_selection_and_shape():
    items = bench_run.gpu_check_plan()
    assign = bench_run.assign_warm(items, 12)
    flat = [u for units in assign for u in units]
    assert sorted(flat, key=str) == sorted([(i, j) for (i, j, _) in bench_run.warm_units(items)], key=str)
    assert len(assign) <= 12 and len(set(flat)) == len(flat)


# ---------------------------------------------------------------- budget arithmetic
def _check(tmp_path, budget=480.0, skip=()):
    return gpu_check.Check(str(tmp_path / "out"), budget, dry=False, stage="main", skip=set(skip),
                           work=str(tmp_path / "work"), workers=2)


def test_step_limits_never_eat_later_budgets(tmp_path):
    c = _check(tmp_path)
    total = sum(s.budget_s for s in c.steps)
    assert total + gpu_check.RESERVE_S <= 480
    elapsed = 0.0
    for i, s in enumerate(c.steps):
        c.t0 = time.time() - elapsed
        lim = c.limit_for(i)
        later = sum(x.budget_s for x in c.steps[i + 1:])
        assert elapsed + lim + later + gpu_check.RESERVE_S <= 480 + 1e-6
        if not s.elastic:
            assert lim <= s.budget_s + 1e-6
        elapsed += lim * 0.5          # each step uses half its limit: the bench step inherits the rest
    bench = next(i for i, s in enumerate(c.steps) if s.elastic)
    c.t0 = time.time() - sum(s.budget_s * 0.5 for s in c.steps[:bench])
    assert c.limit_for(bench) > c.steps[bench].budget_s


def test_smaller_budget_scales_every_step(tmp_path):
    c = _check(tmp_path, budget=250.0)
    assert abs(c.scale() - (250 - gpu_check.RESERVE_S) / sum(s.budget_s for s in c.steps)) < 1e-9
    c.t0 = time.time()
    for i, s in enumerate(c.steps):
        if not s.elastic:
            assert c.limit_for(i) <= s.budget_s * c.scale() + 1e-6
    # a skipped step's budget goes to the elastic bench step
    full, skipped = _check(tmp_path), _check(tmp_path, skip=("sanitizer",))
    full.t0 = skipped.t0 = time.time()
    b = next(i for i, s in enumerate(full.steps) if s.elastic)
    san = next(s.budget_s for s in full.steps if s.name == "sanitizer")
    assert skipped.limit_for(b) - full.limit_for(b) == pytest.approx(san, abs=1.0)


def test_pack_keeps_out_to_the_listed_files(tmp_path):
    c = _check(tmp_path)
    for name in ("summary.txt", "bench.csv", "stray.log", "plot.png"):
        (tmp_path / "out" / name).write_text("x")
    (tmp_path / "work" / "build.log").write_text("log")
    moved = c.pack()
    assert sorted(moved) == ["plot.png", "stray.log"]
    files = c.out_listing()
    assert set(files) <= set(gpu_check.OUT_FILES) and len(files) <= gpu_check.MAX_OUT_FILES
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as t:
        assert {"build.log", "plot.png", "stray.log"} <= set(t.getnames())


# ---------------------------------------------------------------- smoke runner
def test_smoke_dry_cases_cover_every_family_and_dtype():
    cases = gpu_smoke.dry_run_cases()
    assert {c.family for c in cases} == set(gpu_smoke.FAMILIES)
    assert all(c.backend == "interpret" for c in cases)
    gpu = {(c.family, c.dtype) for c in gpu_smoke.CASES if c.backend != "cuda"}
    assert {(c.family, c.dtype) for c in cases} == gpu
    for sh in (gpu_smoke.shard(gpu_smoke.CASES, 12), gpu_smoke.shard(cases, 2)):
        flat = [c.name for s in sh for c in s]
        assert len(flat) == len(set(flat))
    assert len({c.name for c in gpu_smoke.CASES}) == len(gpu_smoke.CASES)


@pytest.mark.parametrize("family,dtype", [("sparse24", "fp16"), ("sparse24", "tf32"), ("per_token_quant", "bf16"),
                                          ("w8a8", "fp16")])
def test_smoke_case_passes_on_the_interpreter(family, dtype):
    case = next(c for c in gpu_smoke.dry_run_cases() if c.family == family and c.dtype == dtype)
    r = gpu_smoke.run_case(case)
    line = gpu_smoke.format_line(case, r)
    assert r.status == "PASS", line
    assert line.startswith("PASS") and case.name.split("  ")[1] in line


def test_smoke_catches_unwritten_output_and_errors(monkeypatch):
    import sparsekit.ops
    from sparsekit import testing

    case = next(c for c in gpu_smoke.dry_run_cases() if c.family == "sparse24" and c.dtype == "fp16")

    def lazy(x, w, b=None, backend=None):   # allocates its output like the ops, writes half of it
        out = testing.alloc_output((x.shape[0], w.shape[0]), x.dtype, x.device)
        out[:, : w.shape[0] // 2] = 0
        return out
    monkeypatch.setattr(sparsekit.ops, "sparse24_linear", lazy)
    r = gpu_smoke.run_case(case)
    assert r.status == "FAIL" and "non-finite" in r.note

    def broken(*a, **k):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(sparsekit.ops, "sparse24_linear", broken)
    r = gpu_smoke.run_case(case)
    assert r.status == "FAIL" and "kernel exploded" in r.note


def test_smoke_summary_counts(tmp_path):
    out = tmp_path / "smoke.txt"
    cases = gpu_smoke.dry_run_cases()[:2]
    out.write_text(gpu_smoke.format_line(cases[0], gpu_smoke.Result("PASS", 1e-4, 1e-3, 1e-4)) + "\n"
                   + gpu_smoke.format_line(cases[1], gpu_smoke.Result("FAIL", note="error: x")) + "\n")
    s = gpu_smoke.summarize(str(out))
    assert (s["PASS"], s["FAIL"]) == (1, 1) and len(s["fail_lines"]) == 1
    assert gpu_smoke._reported(str(out)) == {cases[0].name, cases[1].name}


# ---------------------------------------------------------------- the plan's rows are the rows produced
def test_dry_run_rows_match_the_listed_plan(tmp_path):
    """The sparse24 decode-size and block-sparse selections on CPU tensors (timing path, tiny shapes):
    the (op, case, dtype) rows written are exactly those the plan lists for the same arguments."""
    st = tmp_path / "status.json"
    r = subprocess.run([sys.executable, "-m", "sparsekit.bench.run", "--plan", "gpu-check", "--dry-run-cpu",
                        "--units", "0,5", "--csv", str(tmp_path / "b.csv"), "--status", str(st), "--no-plot"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    status = json.loads(st.read_text())
    assert [s["status"] for s in status] == ["ok", "ok"], status
    assert all("match the listed plan" in s["note"] for s in status)
    with open(tmp_path / "b.csv") as f:
        ops = {row["op"] for row in csv.DictReader(f)}
    assert ops == {"sparse24_linear", "block_sparse_linear"}


# ---------------------------------------------------------------- collect
def _write_run(d, gpu="NVIDIA H200", extra_rows=()):
    from sparsekit.bench import harness
    from sparsekit.bench.harness import Row

    d.mkdir(parents=True, exist_ok=True)
    ctx = dict(gpu=gpu, commit="abc1234", date="2026-12-01T10:00:00+00:00")
    rows = []
    for m in (1, 16, 4096):
        for b, t in (("dense", 1.0), ("triton", 0.6 if m <= 16 else 1.2), ("cuda", 0.5 if m <= 16 else 1.1)):
            rows.append(Row(op="sparse24_linear", case=f"M={m},N=4096,K=4096", backend=b, dtype="fp16", p50_ms=t,
                            **ctx))
    rows.append(Row(op="int4_linear", case="M=1,N=4096,K=4096,group=128", backend="dense", dtype="fp16", p50_ms=1.0,
                    **ctx))
    rows += list(extra_rows)
    harness.fill_ratios(rows)
    harness.write_csv(rows, str(d / "bench.csv"))
    subprocess.run([sys.executable, "-m", "sparsekit.ops.dispatch_build", str(d / "bench.csv"), "--out",
                    str(d / "dispatch_table.json")], check=True, env=ENV, timeout=120)
    for name in ("bench.md", "summary.txt", "smoke.txt", "sanitize.log"):
        (d / name).write_text(name)
    stamp = harness.run_stamp(ctx["date"], ctx["commit"])
    png = d / f"sparse24_linear_{stamp}.png"
    png.write_bytes(b"\x89PNG")
    with tarfile.open(d / "logs.tar.gz", "w:gz") as t:
        t.add(png, arcname=png.name)
    png.unlink()
    return stamp


def test_collect_splits_bench_csv_and_ships_the_table(tmp_path):
    from sparsekit.bench.harness import Row

    cpu_row = Row(op="sparse24_linear", case="M=1,N=33,K=100", backend="dense", dtype="fp16", p50_ms=1.0,
                  gpu="cpu (dry run)", commit="abc1234", date="2026-12-01T10:00:00+00:00")
    stamp = _write_run(tmp_path / "out", extra_rows=[cpu_row])
    res, tables = tmp_path / "results", tmp_path / "tables"
    tables.mkdir()
    paths = collect.collect(str(tmp_path / "out"), str(res), table=True, tables_dir=str(tables), log=lambda *a: None)
    slug = res / "nvidia-h200"
    with open(slug / "sparse24_linear.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and all(r["gpu"] == "NVIDIA H200" for r in rows)      # the CPU row is left out
    assert (slug / "int4_linear.csv").exists()
    for name in (f"gpu_check_{stamp}.md", f"gpu_check_{stamp}_summary.txt", f"gpu_check_{stamp}_smoke.txt",
                 f"gpu_check_{stamp}_sanitize.log", f"gpu_check_{stamp}_dispatch_table.json",
                 f"sparse24_linear_{stamp}.png"):
        assert (slug / name).exists(), name
    table = json.loads((tables / "nvidia-h200.json").read_text())
    assert str(tables / "nvidia-h200.json") in paths
    rows4096 = [r for r in table["sparse24_linear"] if r.get("min_n") == 4096]
    assert [(r["max_m"], r["backend"]) for r in rows4096] == [(16, "cuda"), (None, "dense")]
    # a second collect appends (header once)
    collect.collect(str(tmp_path / "out"), str(res), log=lambda *a: None)
    with open(slug / "sparse24_linear.csv") as f:
        assert len(list(csv.DictReader(f))) == 18


def test_collect_refuses_a_synthetic_table(tmp_path):
    out = tmp_path / "out"
    _write_run(out, gpu="synthetic (dry run; not a measurement)")
    with pytest.raises(SystemExit, match="exactly one GPU"):
        collect.collect(str(out), str(tmp_path / "res"), table=True, tables_dir=str(tmp_path), log=lambda *a: None)
    t = json.loads((out / "dispatch_table.json").read_text())
    assert any("synthetic" in p for p in collect.check_table(t))
    assert collect.check_table({"_comment": "x", "sparse24_linear": [{"max_m": 16, "backend": "cuda"}]})


# ---------------------------------------------------------------- the dry run itself (fast part)
def test_dry_run_script_plan_tables_and_packing(tmp_path):
    """scripts/gpu_check.sh with GPU_CHECK_DRY_RUN=1, the slow interpreter steps skipped: the plan is
    printed, the dispatch table is built from a synthetic CSV of the plan, $OUT holds <= 8 files."""
    out = tmp_path / "out"
    env = dict(ENV, GPU_CHECK_DRY_RUN="1", OUT=str(out), GPU_CHECK_WORK=str(tmp_path / "work"),
               GPU_CHECK_SKIP="build smoke warmup bench sanitizer", PYTHON=sys.executable)
    r = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "== plan: stage main, budget 480 s" in r.stdout and "DRY RUN on CPU" in r.stdout
    assert "== files that come back in $OUT" in r.stdout
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and set(files) <= set(gpu_check.OUT_FILES), files
    assert {"summary.txt", "dispatch_table.json", "logs.tar.gz"} <= set(files)
    table = json.loads((out / "dispatch_table.json").read_text())
    assert "synthetic" in table["_comment"] and table["sparse24_linear"]
    summary = (out / "summary.txt").read_text()
    assert "gpu-check ok" in summary and "DRY RUN" in summary
    with tarfile.open(out / "logs.tar.gz") as t:
        assert {"plan.json", "synthetic_bench.csv", "tables.log"} <= set(t.getnames())
