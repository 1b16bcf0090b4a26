"""``make gpu-check``: the whole useful GPU check in one call of at most ``GPU_CHECK_BUDGET_S`` seconds.

Run by ``scripts/gpu_check.sh`` from the repository root (``python -m bench.gpu_check``: this
module imports nothing of sparsekit, so it runs before the checkout is installed).  Steps, in
order, each under its own time limit (``STEPS``)::

    env        GPU, driver, torch / triton / nvcc / compute-sanitizer versions
    build      pip install -e . --no-deps --no-build-isolation (offline): csrc/ -> sparsekit._C for
               this GPU's arch; a failed extension build is FAILED (non-zero exit) and the package is
               installed without it so the later steps still run
    smoke      bench/gpu_smoke.py in parallel processes: every kernel family, backend and dtype on
               odd shapes vs float64, poisoned outputs, one line per case into smoke.txt as it goes
    warmup     the benchmark plan launched once in parallel processes (Triton compiles of every
               launch configuration, torch.compile of flex attention, torch's BSR kernels) into the
               shared on-disk caches; nothing is timed while several processes share the GPU
    bench      the benchmark plan (bench/run.py --plan gpu-check), serially, most valuable first,
               rows appended to bench.csv as each group finishes; gets every second the earlier steps
               did not use; a selection whose predicted time no longer fits is not started
    sanitizer  compute-sanitizer memcheck on one small case per family (bench/sanitize_driver.py
               --small); SKIPPED with a note where the sanitizer refuses the device (gVisor)
    tables     dispatch table from bench.csv (sparsekit.ops.dispatch_build) -> dispatch_table.json

The budget holds by construction: step i may run until ``budget - reserve - (budgets of the steps
after it)`` (scaled down when GPU_CHECK_BUDGET_S is below their sum), and no longer than its own
budget unless it is the elastic bench step; a step is stopped with SIGTERM (then SIGKILL) at its
limit, and whatever it wrote so far stays.  ``$OUT`` never holds more than the files of
``OUT_FILES`` (the device machine returns at most 8); logs, plots and the plan go into
``logs.tar.gz``, refreshed after every step.

``GPU_CHECK_STAGE=tests`` (a second call): install if needed, then the GPU test suite
(``pytest -m gpu``, xdist) in the time left.

``GPU_CHECK_DRY_RUN=1`` (no GPU): prints the plan, then runs what runs on CPU -- the install's
metadata (``pip install --dry-run``; with ``GPU_CHECK_DRY_BUILD=1`` also the csrc compile check),
the smoke cases on the Triton interpreter with tiny shapes, the warm-up and the benchmark plan on
CPU tensors (checking that the rows produced are the rows listed), the sanitizer driver's small set
on the interpreter, the dispatch-table builder on a synthetic CSV of the plan's rows, and the
packing of ``$OUT``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUDGET_S = 480
RESERVE_S = 10            # the final summary and packing
GRACE_S = 5               # SIGTERM -> SIGKILL
MAX_OUT_FILES = 8         # what the device machine returns
DRY_FACTOR = 3.0          # a CPU dry run's budgets are this multiple of the GPU ones (the interpreter is slow)


@dataclasses.dataclass
class Step:
    name: str
    budget_s: int
    predict_s: int
    what: str
    elastic: bool = False


# Predictions are for an H100/H200 machine with 16 cores on a fresh start (cold caches):
#  build  ~60 s: bindings.cpp against torch's headers (~45 s; ninja builds it and the two .cu files
#         for one arch in parallel) + pip and the link;
#  smoke  ~40 s: 105 cases in 12 processes, 34 units of family/backend/dtype, each ~5 Triton
#         compiles of 2-4 s plus ~6 s of torch import and CUDA init per process;
#  warmup ~50 s: bounded by the cold torch.compile of flex attention (~30-40 s) in one process,
#         the other units (each selection x shape) compile in parallel beside it;
#  bench  ~135 s: 11 selections predicted 131 s together (see each bench module's GPU_CHECK)
#         plus the bandwidth / matmul ceilings; the last ones are skipped if time is short;
#  sanitizer ~35 s: torch under memcheck starts slowly (~20 s), ~14 tiny cases;
#  tables ~5 s: two Python starts (torch imports) around a few ms of work.
#  env ~8 s: the plan (imports torch and the bench modules; slower on a cold disk) and the versions.
# Budgets: 20 + 115 + 65 + 60 + 150 + 45 + 15 + RESERVE_S 10 = 480 s.  The build keeps 25 s of its
# budget for the fallback install without the extension, the load check and `sparsekit info`.
STEPS = [
    Step("env", 20, 8, "the plan; GPU, driver, torch / triton / nvcc / compute-sanitizer versions"),
    Step("build", 115, 60, "offline editable install + csrc extension for this GPU's arch (FAILED if the "
                           "extension does not build or load; then installed without it)"),
    Step("smoke", 65, 40, "every kernel family x backend x dtype on odd shapes vs float64, poisoned outputs "
                          "(parallel processes, shared Triton cache)"),
    Step("warmup", 60, 50, "benchmark plan launched once in parallel processes: compiles into the shared "
                           "caches; nothing timed"),
    Step("bench", 150, 135, "benchmark plan, serial, most valuable first; rows appended as they finish; "
                            "uses every second earlier steps left", elastic=True),
    Step("sanitizer", 45, 35, "compute-sanitizer memcheck, one small case per family (skipped where the "
                              "sanitizer refuses the device)"),
    Step("tables", 15, 5, "dispatch table from the measured rows (sparsekit.ops.dispatch_build)"),
]
TEST_STEPS = [
    Step("env", 20, 8, "the plan; GPU, driver, torch / triton versions"),
    Step("install", 110, 10, "offline editable install (skipped when this checkout is already installed)"),
    Step("tests", 300, 240, "pytest tests -m gpu (xdist) in the time left", elastic=True),
]
OUT_FILES = {
    "summary.txt": "the plan, every step's verdict and time, smoke failures, benchmark verdicts",
    "smoke.txt": "one line per smoke case: PASS / FAIL / SKIP, relative error vs float64 and the bound",
    "bench.csv": "every timed row, all ops (python -m sparsekit.bench.collect splits it by op)",
    "bench.md": "the benchmark tables, one section per selection",
    "dispatch_table.json": "the measured dispatch table (ship as sparsekit/ops/tables/<gpu-slug>.json)",
    "sanitize.log": "compute-sanitizer memcheck output",
    "logs.tar.gz": "build / smoke / warm-up / bench logs, plots, plan.json, bench_status.json",
}
TEST_OUT_FILES = {
    "summary.txt": "steps and the test verdict",
    "tests.log": "pytest output",
    "logs.tar.gz": "install log, plan.json",
}
# CUT: stopped at its limit with no failure seen in what ran (warm-up, bench, sanitizer; the summary
# says what did not run); SKIPPED, NOT RUN: not run.  None of these makes the exit status non-zero.
BAD = ("FAILED", "TIMEOUT")
SANITIZER_REFUSED = ("Device not supported", "device not supported", "is not supported on this")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


@dataclasses.dataclass
class Result:
    name: str
    status: str = "NOT RUN"     # ok | FAILED | TIMEOUT | CUT | SKIPPED | NOT RUN
    seconds: float = 0.0
    limit: float = 0.0
    note: str = ""
    details: list = dataclasses.field(default_factory=list)


class Check:
    def __init__(self, out: str, budget: float, dry: bool, stage: str, skip: set, work: str | None = None,
                 workers: int | None = None):
        self.out = os.path.abspath(out)
        self.gpu_budget = float(budget)
        factor = float(os.environ.get("GPU_CHECK_DRY_FACTOR") or DRY_FACTOR) if dry else 1.0
        self.factor = factor
        self.budget = float(budget) * factor
        self.dry = dry
        self.stage = stage
        self.steps = TEST_STEPS if stage == "tests" else STEPS
        self.out_files = TEST_OUT_FILES if stage == "tests" else OUT_FILES
        self.skip = skip
        self.work = work or tempfile.mkdtemp(prefix="sparsekit-gpu-check-")
        self.py = sys.executable
        ncpu = os.cpu_count() or 2
        self.workers = workers or (2 if dry else max(1, min(12, ncpu - 2)))
        self.results = [Result(s.name) for s in self.steps]
        self.t0 = time.time()
        self.info: dict = {}
        self.header: list[str] = []
        self.plan_text = ""
        self.finished = False
        os.makedirs(self.out, exist_ok=True)
        os.makedirs(self.work, exist_ok=True)
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        self.env["PIP_NO_INDEX"] = "1"                 # the device machine has no network
        if not dry:
            cache = os.environ.get("GPU_CHECK_CACHE", os.path.join(tempfile.gettempdir(), "sparsekit-gpu-check-cache"))
            self.env.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
            self.env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache, "inductor"))
            self.env["TRITON_CACHE_AUTOTUNING"] = "0"  # each process tunes on its own (never while sharing)

    # ------------------------------------------------------------------ budget
    def scale(self) -> float:
        """Step budgets are ``budget_s * scale``: shrunk when GPU_CHECK_BUDGET_S is below their sum,
        stretched by GPU_CHECK_DRY_FACTOR in a CPU dry run."""
        total = sum(s.budget_s for s in self.steps)
        return self.factor * (min(1.0, max(0.0, self.gpu_budget - RESERVE_S) / total) if total else 1.0)

    def limit_for(self, i: int) -> float:
        """Seconds step ``i`` may run from now: never into the budgets of the steps after it."""
        sc = self.scale()
        later = sum(s.budget_s * sc for j, s in enumerate(self.steps) if j > i and s.name not in self.skip)
        left = self.budget - RESERVE_S * self.factor - (time.time() - self.t0) - later
        own = float("inf") if self.steps[i].elastic else self.steps[i].budget_s * sc
        return max(0.0, min(own, left))

    # ------------------------------------------------------------------ processes
    def run(self, cmd: list[str], log: str, deadline: float, env: dict | None = None, cwd: str = REPO,
            label: str = "") -> tuple[int | None, bool]:
        """Run ``cmd`` (its own process group) so that it has ended by ``deadline``: SIGTERM
        ``GRACE_S`` before it, SIGKILL at it.  Output appended to ``log``.  Returns (exit status,
        or None if there was no time to start it; whether it was stopped at its limit)."""
        timeout = deadline - time.time() - GRACE_S
        with open(log, "a") as f:
            f.write(f"\n[gpu_check] $ {' '.join(shlex.quote(c) for c in cmd)}  (limit {max(0, timeout):.0f} s)\n")
            f.flush()
            if timeout < 2:
                f.write("[gpu_check] not started: no time left in this step\n")
                return None, True
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env or self.env,
                                 start_new_session=True)
            try:
                return p.wait(timeout=timeout), False
            except subprocess.TimeoutExpired:
                f.write(f"\n[gpu_check] time limit reached: SIGTERM to {label or cmd[0]}\n")
                f.flush()
                _killpg(p, signal.SIGTERM)
                try:
                    p.wait(timeout=GRACE_S)
                except subprocess.TimeoutExpired:
                    _killpg(p, signal.SIGKILL)
                    p.wait()
                return p.returncode, True

    def capture(self, cmd: list[str], timeout: float = 20, env: dict | None = None) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env or self.env)
            return (r.stdout + r.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"({type(e).__name__}: {e})"

    # ------------------------------------------------------------------ plan
    def plan(self) -> dict:
        from . import gpu_smoke
        from . import run as bench_run

        sc = self.scale()
        items = bench_run.gpu_check_plan()
        assign = bench_run.assign_warm(items, self.workers)
        smoke_cases = gpu_smoke.dry_run_cases() if self.dry else gpu_smoke.gpu_cases(True)
        return {
            "budget_s": self.gpu_budget, "reserve_s": RESERVE_S, "scale": sc / self.factor, "dry_run": self.dry,
            "dry_factor": self.factor, "stage": self.stage,
            "workers": self.workers,
            "steps": [dict(name=s.name, budget_s=round(s.budget_s * sc / self.factor, 1), predict_s=s.predict_s,
                           what=s.what,
                           elastic=s.elastic, skipped=s.name in self.skip) for s in self.steps],
            "smoke": {"families": sorted({c.family for c in smoke_cases}), "cases": [c.name for c in smoke_cases],
                      "shards": [[c.name for c in sh] for sh in gpu_smoke.shard(smoke_cases, self.workers)]},
            "bench": bench_run.plan_summary(),
            "warmup": [[f"{items[i].key}" + (f" shape {j}" if j is not None else "") for (i, j) in units]
                       for units in assign],
            "out_files": dict(self.out_files),
        }

    def plan_lines(self, plan: dict) -> list[str]:
        L = [f"== plan: stage {self.stage}, budget {self.gpu_budget:.0f} s (steps "
             f"{sum(s['budget_s'] for s in plan['steps']):.0f} s + reserve {RESERVE_S} s), "
             f"{self.workers} worker processes"]
        if self.dry:
            L.append(f"   DRY RUN on CPU: every budget x {self.factor:g} (Triton interpreter, tiny shapes); "
                     "the GPU budgets are the ones listed")
        L.append(f"   {'step':<10} {'budget':>7} {'predicted':>9}  what")
        for s in plan["steps"]:
            L.append(f"   {s['name']:<10} {s['budget_s']:>6.0f}s {s['predict_s']:>8}s  "
                     + ("[elastic: + unused earlier time] " if s["elastic"] else "")
                     + ("[skipped: GPU_CHECK_SKIP] " if s["skipped"] else "") + s["what"])
        if self.stage == "tests":
            L.append("== files that come back in $OUT: " + ", ".join(plan["out_files"]))
            return L
        sm = plan["smoke"]
        L.append(f"== smoke: {len(sm['cases'])} cases, families: {', '.join(sm['families'])}; "
                 f"{len(sm['shards'])} processes")
        L.append("== bench rows (selection: op dtype case backends), most valuable first:")
        for it in plan["bench"]["items"]:
            L.append(f"   {it['index'] + 1:2d}. {it['key']} (predicted {it['predict_s']:.0f} s, compiles "
                     f"{it['warm_s']:.0f} s): {it['decides']}")
            for r in it["rows"]:
                L.append(f"       {r['op']:<21} {r['dtype']:<5} {r['case']:<58} {' '.join(r['backends'])}")
        L.append(f"   {sum(len(i['rows']) for i in plan['bench']['items'])} cases, predicted "
                 f"{plan['bench']['predict_s']:.0f} s timed")
        L.append("== warm-up processes: " + " | ".join(", ".join(u) for u in plan["warmup"]))
        L.append(f"== files that come back in $OUT (<= {MAX_OUT_FILES}):")
        for name, what in plan["out_files"].items():
            L.append(f"   {name:<20} {what}")
        return L

    # ------------------------------------------------------------------ output
    def write_summary(self) -> None:
        """summary.txt: header, plan, each step's details, then the step table and the verdict last
        (the end of the output is what a truncated reply keeps)."""
        L = list(self.header)
        L += [self.plan_text, "", "== results"]
        for r in self.results:
            if r.details:
                L.append(f"== {r.name}")
                L += ["   " + d for d in r.details]
        L.append("== steps")
        L.append(f"   {'step':<10} {'status':<8} {'took':>6} {'limit':>6} {'budget':>7}  note")
        sc = self.scale()
        for s, r in zip(self.steps, self.results):
            L.append(f"   {s.name:<10} {r.status:<8} {r.seconds:>5.0f}s {r.limit:>5.0f}s {s.budget_s * sc:>6.0f}s  {r.note}")
        elapsed = time.time() - self.t0
        if self.finished:
            bad = [r.name for r in self.results if r.status in BAD]
            L.append(f"== gpu-check {'FAILED (' + ', '.join(bad) + ')' if bad else 'ok'} in {elapsed:.0f} s "
                     f"(budget {self.budget:.0f} s)" + (" -- DRY RUN on CPU, nothing measured" if self.dry else ""))
        else:
            running = next((r.name for r in self.results if r.status == "RUNNING"), "?")
            L.append(f"== in progress: step {running}, {elapsed:.0f} s elapsed")
        tmp = os.path.join(self.out, ".summary.txt.tmp")
        with open(tmp, "w") as f:
            f.write("\n".join(L) + "\n")
        os.replace(tmp, os.path.join(self.out, "summary.txt"))

    def pack(self) -> list[str]:
        """Refresh logs.tar.gz from the work directory; keep $OUT to the allowed files (<= 8)."""
        moved = []
        for name in sorted(os.listdir(self.out)):
            path = os.path.join(self.out, name)
            if name not in self.out_files or not os.path.isfile(path):
                if name.startswith(".") and name.endswith(".tmp"):
                    continue
                shutil.move(path, os.path.join(self.work, name))
                moved.append(name)
        tmp = os.path.join(self.out, ".logs.tar.gz.tmp")
        with tarfile.open(tmp, "w:gz") as t:
            for name in sorted(os.listdir(self.work)):
                t.add(os.path.join(self.work, name), arcname=name)
        os.replace(tmp, os.path.join(self.out, "logs.tar.gz"))
        return moved

    def out_listing(self) -> list[str]:
        return sorted(n for n in os.listdir(self.out) if not n.startswith("."))

    # ------------------------------------------------------------------ the run
    def main(self) -> int:
        print(f"[gpu_check] {'DRY RUN on CPU: ' if self.dry else ''}stage {self.stage}, budget {self.budget:.0f} s, "
              f"out {self.out}, work {self.work}", flush=True)
        self.header = [f"== sparsekit gpu-check {_dt.datetime.now().astimezone().replace(microsecond=0).isoformat()} "
                       f"on {os.uname().nodename}" + (" (DRY RUN, CPU)" if self.dry else "")]
        plan = self.plan()
        with open(os.path.join(self.work, "plan.json"), "w") as f:
            json.dump(plan, f, indent=1)
        self.plan_text = "\n".join(self.plan_lines(plan))
        print(self.plan_text, flush=True)
        funcs = {"env": self.step_env, "build": self.step_build, "smoke": self.step_smoke,
                 "warmup": self.step_warmup, "bench": self.step_bench, "sanitizer": self.step_sanitizer,
                 "tables": self.step_tables, "install": self.step_install, "tests": self.step_tests}
        for i, (s, r) in enumerate(zip(self.steps, self.results)):
            if s.name in self.skip:
                r.status, r.note = "SKIPPED", "GPU_CHECK_SKIP"
                continue
            r.limit = self.limit_for(i)
            if r.limit < 3:
                r.status, r.note = "NOT RUN", "no time left in the budget"
                continue
            r.status = "RUNNING"
            self.write_summary()
            print(f"[gpu_check] >>> {s.name} (limit {r.limit:.0f} s, predicted {s.predict_s} s): {s.what}", flush=True)
            t = time.time()
            deadline = t + r.limit
            try:
                funcs[s.name](r, deadline)
            except Exception as e:  # a bug in a step must not cost the later steps
                r.status, r.note = "FAILED", f"step raised {type(e).__name__}: {e}"
            r.seconds = time.time() - t
            if r.status == "RUNNING":
                r.status = "ok"
            print(f"[gpu_check] <<< {s.name}: {r.status} in {r.seconds:.0f} s. {r.note}", flush=True)
            self.write_summary()
            self.pack()
        self.finished = True
        self.write_summary()
        moved = self.pack()
        files = self.out_listing()
        if moved:
            print(f"[gpu_check] moved into logs.tar.gz: {', '.join(moved)}")
        if len(files) > MAX_OUT_FILES:   # cannot happen: pack() keeps only OUT_FILES
            print(f"[gpu_check] ERROR: {len(files)} files in $OUT (> {MAX_OUT_FILES})")
        text = open(os.path.join(self.out, "summary.txt")).read()
        print("\n" + text.split("\n== results\n", 1)[-1])
        print(f"[gpu_check] $OUT ({len(files)} files): {' '.join(files)}")
        return 1 if any(r.status in BAD for r in self.results) else 0

    # ------------------------------------------------------------------ steps
    def step_env(self, r: Result, deadline: float) -> None:
        d = r.details
        py_info = self.capture([self.py, "-c", _ENV_PY], timeout=max(3, deadline - time.time() - 4))
        for line in py_info.splitlines():
            if line.startswith("INFO "):
                k, _, v = line[5:].partition("=")
                self.info[k] = v
            else:
                d.append(line)
        d.append(f"python {sys.version.split()[0]} at {self.py}; {os.cpu_count()} CPUs")
        d.append("torch " + self.info.get("torch", "?") + " cuda " + self.info.get("cuda", "?") + " | triton "
                 + self.info.get("triton", "?") + " | numpy " + self.info.get("numpy", "?"))
        d.append("device: " + self.info.get("device", "none") + " cc " + self.info.get("cc", "-")
                 + " SMs " + self.info.get("sms", "-"))
        smi = shutil.which("nvidia-smi")
        d.append("nvidia-smi: " + (self.capture([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                                 "--format=csv,noheader"], 10) if smi else "not found"))
        nvcc = shutil.which("nvcc")
        d.append("nvcc: " + ((self.capture([nvcc, "--version"], 10).splitlines() or ["?"])[-1] if nvcc else "not found"))
        san = _find_sanitizer()
        d.append("compute-sanitizer: " + ((self.capture([san, "--version"], 10).splitlines() or ["?"])[-1]
                                          if san else "not found"))
        d.append("git: " + self.capture(["git", "rev-parse", "--short", "HEAD"], 5) + ", "
                 + str(len([x for x in self.capture(["git", "status", "--porcelain"], 5).splitlines() if x.strip()]))
                 + " changed files")
        d.append(f"caches: TRITON_CACHE_DIR={self.env.get('TRITON_CACHE_DIR', '(default)')} "
                 f"TORCHINDUCTOR_CACHE_DIR={self.env.get('TORCHINDUCTOR_CACHE_DIR', '(default)')}")
        self.header += d[:]
        r.details = []
        r.note = f"{self.info.get('device', 'no CUDA device')}, torch {self.info.get('torch', '?')}"
        if not self.dry and self.info.get("cuda_available") != "1":
            r.status, r.note = "FAILED", "no CUDA device visible to torch (use GPU_CHECK_DRY_RUN=1 on a CPU machine)"

    def _archs(self) -> str:
        if os.environ.get("SPARSEKIT_CUDA_ARCHS"):
            return os.environ["SPARSEKIT_CUDA_ARCHS"]
        cc = self.info.get("cc", "")
        if "." in cc:
            major, minor = cc.split(".", 1)
            return f"{major}{minor}" + ("a" if major == "9" else "")   # Hopper: 90a for wgmma / setmaxnreg
        return "80;90a"

    def _pip_install(self, log: str, deadline: float, with_ext: bool) -> tuple[int | None, bool]:
        env = dict(self.env)
        if with_ext:
            env.pop("SPARSEKIT_NO_CUDA_EXT", None)
            env["SPARSEKIT_CUDA_ARCHS"] = self._archs()
            env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
        else:
            env["SPARSEKIT_NO_CUDA_EXT"] = "1"
        cmd = [self.py, "-m", "pip", "install"] + (["-v"] if with_ext else []) + [
            "-e", ".", "--no-deps", "--no-build-isolation"]
        return self.run(cmd, log, deadline, env=env, label="pip install")

    def step_build(self, r: Result, deadline: float) -> None:
        log = os.path.join(self.work, "build.log")
        if self.dry:
            rc, to = self.run([self.py, "-m", "pip", "install", "--dry-run", "-e", ".", "--no-deps",
                               "--no-build-isolation"], log, deadline)
            ok = rc == 0 and not to
            notes = ["pip install --dry-run (setup.py metadata): " + ("ok" if ok else f"FAILED (rc {rc})")]
            if _env_flag("GPU_CHECK_DRY_BUILD"):
                env = dict(self.env, SPARSEKIT_CUDA_ARCHS="90a")
                rc2, to2 = self.run(["bash", "scripts/compile_csrc.sh"], log, deadline, env=env)
                ok = ok and rc2 == 0 and not to2
                notes.append("csrc compile check (sm_90a): " + ("ok" if rc2 == 0 and not to2 else
                                                                "TIMEOUT" if to2 else f"FAILED (rc {rc2})"))
            else:
                notes.append("csrc compile not run (GPU_CHECK_DRY_BUILD=1 runs scripts/compile_csrc.sh for sm_90a)")
            r.status = "ok" if ok else "FAILED"
            r.note = "; ".join(notes)
            return
        rc, to = self._pip_install(log, deadline - 25, with_ext=True)
        notes = []
        failed = False
        if rc != 0 or to:
            failed = True
            notes.append("csrc extension build " + ("TIMED OUT" if to else f"FAILED (pip exit {rc})")
                         + ": " + _first_error(log))
            rc2, to2 = self._pip_install(log, deadline, with_ext=False)
            notes.append("installed without the extension" if rc2 == 0 and not to2 else
                         f"install without the extension FAILED too (rc {rc2})")
        check = self.capture([self.py, "-c", _EXT_PY], timeout=max(3, min(30, deadline - time.time())))
        with open(log, "a") as f:
            f.write("\n[gpu_check] extension check:\n" + check + "\n")
        loaded = "EXT loaded=1" in check
        if not loaded and not failed:
            failed = True
            notes.append("sparsekit._C does not load: " + (check.splitlines() or ["?"])[-1])
        elif loaded:
            notes.append(next((x for x in check.splitlines() if x.startswith("EXT")), "EXT loaded=1"))
        info = self.capture([self.py, "-m", "sparsekit.cli", "info"], timeout=max(3, min(20, deadline - time.time())))
        r.details = info.splitlines()[:25]
        r.status = "FAILED" if failed else "ok"
        r.note = f"archs {self._archs()}; " + "; ".join(notes)

    def step_smoke(self, r: Result, deadline: float) -> None:
        from . import gpu_smoke

        out = os.path.join(self.out, "smoke.txt")
        if os.path.exists(out):
            os.remove(out)
        cmd = [self.py, "-m", "sparsekit.bench.gpu_smoke", "--out", out, "--workers", str(self.workers),
               "--work", self.work] + (["--dry-run"] if self.dry else [])
        rc, to = self.run(cmd, os.path.join(self.work, "smoke.log"), deadline, env=self._parallel_env(), label="smoke")
        s = gpu_smoke.summarize(out)
        cases = gpu_smoke.dry_run_cases() if self.dry else gpu_smoke.CASES
        done = gpu_smoke._reported(out)
        missing = [c.name for c in cases if c.name not in done]
        r.note = (f"{s['PASS']} PASS, {s['FAIL']} FAIL, {s['SKIP']} SKIP, {s['WARN']} WARN"
                  + (f", {len(missing)} not reached" if missing else ""))
        r.details = s["fail_lines"][:40] + [f"not reached: {m}" for m in missing[:10]]
        if to:
            r.status = "TIMEOUT"
        elif rc != 0 or s["FAIL"]:
            r.status = "FAILED"

    def _parallel_env(self) -> dict:
        """For the steps that run several processes at once: a few CPU threads each (their host-side
        work is small; Triton's compiles are single-threaded)."""
        env = dict(self.env)
        env.setdefault("OMP_NUM_THREADS", "2")
        return env

    def _plan_cmd(self) -> list[str]:
        return [self.py, "-m", "sparsekit.bench.run", "--plan", "gpu-check", "--no-quality"] + (
            ["--dry-run-cpu"] if self.dry else [])

    def step_warmup(self, r: Result, deadline: float) -> None:
        log = os.path.join(self.work, "warmup.log")
        cmd = self._plan_cmd() + ["--warm-only", "--workers", str(self.workers), "--out", self.work]
        rc, to = self.run(cmd, log, deadline, env=self._parallel_env(), label="warm-up")
        lines = [x.strip() for x in open(log) if x.startswith("[warm]")]
        r.details = lines
        if to:
            # not a failure of the kernels: the timed step compiles what is missing (slower, same numbers)
            r.status, r.note = "CUT", "warm-up cut at its limit: the bench step compiles the rest itself"
        elif rc != 0:
            r.status, r.note = "FAILED", "a warm-up process failed (see warmup.log / warm_worker*.log in logs.tar.gz)"
        else:
            r.note = f"{len(lines) // 2} processes"

    def step_bench(self, r: Result, deadline: float) -> None:
        csv_path = os.path.join(self.out, "bench.csv")
        status = os.path.join(self.work, "bench_status.json")
        for p in (csv_path, status):
            if os.path.exists(p):
                os.remove(p)
        limit = deadline - time.time() - GRACE_S - 5   # run.py stops starting selections before the SIGTERM
        cmd = self._plan_cmd() + ["--csv", csv_path, "--md", os.path.join(self.out, "bench.md"), "--status", status,
                                  "--out", self.work, "--deadline", f"{time.time() + max(1.0, limit):.0f}"]
        rc, to = self.run(cmd, os.path.join(self.work, "bench.log"), deadline, label="bench")
        items = json.load(open(status)) if os.path.exists(status) else []
        for it in items:
            r.details.append(f"{it['index'] + 1:2d}. {it['key']:<36} {it['status']:<11} {it['seconds']:>5.0f}s "
                             f"(pred {it['predict_s']:.0f}s) {it['ok']} ok, {it['fail']} failed, {it['skip']} skipped"
                             + (f" -- {it['note']}" if it["note"] else ""))
        from .run import GPU_CHECK_ORDER

        ran = sum(it["status"] != "not run" for it in items)
        r.note = (f"{ran}/{len(GPU_CHECK_ORDER)} selections run, "
                  f"{sum(it['ok'] for it in items)} rows timed, {sum(it['fail'] for it in items)} failed")
        if any(it["fail"] for it in items) or any(it["status"] == "error" for it in items) or (rc and not to):
            r.status = "FAILED"
        elif to:   # the selection in progress was stopped; every finished row is in bench.csv
            r.status = "CUT"
            r.note += "; stopped at its limit (the predictions were short)"
        if os.path.exists(csv_path):
            r.details += ["", "p50 of the baseline (dense; sdpa_flash for attention) and speedup of each backend:"]
            r.details += bench_digest(csv_path)

    def step_sanitizer(self, r: Result, deadline: float) -> None:
        log_out = os.path.join(self.out, "sanitize.log")
        log = os.path.join(self.work, "sanitize.log")
        san = _find_sanitizer()
        if self.dry:
            rc, to = self.run([self.py, "bench/sanitize_driver.py", "--cpu", "--small"], log, deadline)
            r.status = "TIMEOUT" if to else "ok" if rc == 0 else "FAILED"
            r.note = (f"driver's small set on the interpreter: {_last_match(log, 'sanitize_driver')}; "
                      f"compute-sanitizer {'at ' + san if san else 'not found'} (not run on CPU)")
        elif not san:
            with open(log, "w") as f:
                f.write("compute-sanitizer not found on PATH, /usr/local/cuda/bin or /opt/nvidia\n")
            r.status, r.note = "SKIPPED", "compute-sanitizer not found"
        else:
            env = dict(self.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # each tensor its own allocation
            cmd = [san, "--tool", "memcheck", "--error-exitcode", "1", "--print-limit", "50",
                   self.py, "bench/sanitize_driver.py", "--small"]
            rc, to = self.run(cmd, log, deadline, env=env, label="compute-sanitizer")
            text = open(log).read()
            if any(m in text for m in SANITIZER_REFUSED):
                r.status, r.note = "SKIPPED", "compute-sanitizer refused the device (" + next(
                    m for m in SANITIZER_REFUSED if m in text) + "; e.g. under gVisor): no memcheck verdict"
            elif to and "========= Invalid" not in text and "========= ERROR" not in text:
                n = sum(1 for x in text.splitlines() if x.startswith(("PASS", "ok  ", "FAIL", "SKIP")))
                r.status, r.note = "CUT", (f"stopped at its limit after {n} checks, no memcheck error in those; "
                                           "the rest unchecked")
            elif to:
                r.status, r.note = "FAILED", "memcheck errors (then stopped at its limit): see sanitize.log"
            else:
                r.status = "ok" if rc == 0 else "FAILED"
                r.note = (_last_match(log, "ERROR SUMMARY") or "") + "; " + (_last_match(log, "sanitize_driver") or "")
        shutil.copy2(log, log_out)

    def step_tables(self, r: Result, deadline: float) -> None:
        out = os.path.join(self.out, "dispatch_table.json")
        log = os.path.join(self.work, "tables.log")
        if self.dry:
            src = os.path.join(self.work, "synthetic_bench.csv")
            rc, to = self.run(self._plan_cmd() + ["--synthetic-csv", src], log, deadline)
            note = "from a SYNTHETIC csv of the plan's rows (dry run: the builder is exercised, nothing measured)"
        else:
            src = os.path.join(self.out, "bench.csv")
            note = "from bench.csv"
            if not os.path.exists(src):
                r.status, r.note = "FAILED", "no bench.csv: nothing measured to build a table from"
                return
        rc, to = self.run([self.py, "-m", "sparsekit.ops.dispatch_build", src, "--out", out], log, deadline)
        if rc != 0 or to or not os.path.exists(out):
            r.status, r.note = "FAILED", "dispatch_build failed (see tables.log)"
            return
        table = json.load(open(out))
        ops = {k: len(v) for k, v in table.items() if not k.startswith("_")}
        r.note = f"{note}: " + ", ".join(f"{k} {n} rows" for k, n in ops.items())

    def step_install(self, r: Result, deadline: float) -> None:
        log = os.path.join(self.work, "install.log")
        here = self.capture([self.py, "-c", "import sparsekit, sparsekit.kernels, os; print(os.path.dirname("
                                            "os.path.dirname(sparsekit.__file__)))"], timeout=30)
        if os.path.realpath(here.splitlines()[-1] if here else "") == os.path.realpath(REPO):
            r.note = "this checkout is already installed"
            return
        rc, to = self._pip_install(log, deadline - 30, with_ext=not self.dry)
        if rc != 0 or to:
            rc, to = self._pip_install(log, deadline, with_ext=False)
            r.status, r.note = "FAILED", "install with the extension failed; " + (
                "installed without it" if rc == 0 else "install failed")

    def step_tests(self, r: Result, deadline: float) -> None:
        out = os.path.join(self.out, "tests.log")
        probe = self.capture([self.py, "-c", "import importlib.util as u; print([m for m in ('xdist', 'pytest_timeout')"
                                             " if u.find_spec(m)])"], timeout=20)
        # -v: one line per test as it finishes, so a run cut at its limit still says what passed
        cmd = [self.py, "-m", "pytest", "tests", "-v", "-p", "no:cacheprovider", "-rfE", "-m", "gpu"]
        if self.dry:
            cmd += ["--collect-only", "-q"]    # CPU: which GPU tests the stage would run
        else:
            if "xdist" in probe:
                cmd += ["-n", str(min(8, self.workers))]
            if "pytest_timeout" in probe:
                cmd += ["--timeout", "180"]
        rc, to = self.run(cmd, out, deadline, label="pytest")
        text = open(out, errors="replace").read()
        final = _last_match(out, " passed") or _last_match(out, " failed") or _last_match(out, "collected")
        r.note = final or f"{text.count(' PASSED')} passed, {text.count(' FAILED')} failed before the limit"
        if to:   # -v lists every finished test: a cut run still has a verdict for those
            r.status = "FAILED" if (" FAILED" in text or " ERROR" in text) else "CUT"
        else:
            r.status = "ok" if rc == 0 else "FAILED"


def bench_digest(csv_path: str, limit: int = 120) -> list[str]:
    """One line per (op, case, dtype) of a benchmark CSV: the baseline's p50 and every other backend's
    speedup over it ('skip' / 'FAIL' as recorded)."""
    import csv

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["op"], r["dtype"], r["case"]), {})[r["backend"]] = r   # the newest row wins
    out = []
    for (op, dtype, case), by_backend in groups.items():
        grp = list(by_backend.values())
        base = next((r for r in grp if r["backend"] == "sdpa_flash" and r["status"] == "ok"), None) or \
            next((r for r in grp if r["backend"] == "dense" and r["status"] == "ok"), None)
        cells = []
        for r in grp:
            if r is base:
                continue
            if r["status"] != "ok":
                cells.append(f"{r['backend']} {'FAIL' if r['status'] == 'fail' else 'skip'}")
            else:
                cells.append(f"{r['backend']} {float(r['speedup_vs_dense'] or 'nan'):.2f}x")
        b = f"{base['backend']} {float(base['p50_ms']):.4f} ms" if base else "no baseline"
        out.append(f"{op} {dtype} {case}: {b} | " + " | ".join(cells))
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def _killpg(p: subprocess.Popen, sig) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _find_sanitizer() -> str | None:
    s = shutil.which("compute-sanitizer")
    for c in ("/usr/local/cuda/bin/compute-sanitizer", "/opt/nvidia/compute-sanitizer/compute-sanitizer"):
        if not s and os.access(c, os.X_OK):
            s = c
    return s


def _first_error(log: str) -> str:
    try:
        lines = open(log, errors="replace").read().splitlines()
    except OSError:
        return "?"
    for line in lines:
        low = line.lower()
        if "error" in low and "warning" not in low and "-werror" not in low:
            return line.strip()[:240]
    return (lines[-1].strip()[:240] if lines else "?")


def _last_match(log: str, needle: str) -> str:
    try:
        lines = [x.strip() for x in open(log, errors="replace") if needle in x]
    except OSError:
        return ""
    return lines[-1][:240] if lines else ""


_ENV_PY = r"""
import sys
try:
    import torch
    print("INFO torch=" + torch.__version__); print("INFO cuda=" + str(torch.version.cuda))
    ok = torch.cuda.is_available(); print("INFO cuda_available=" + ("1" if ok else "0"))
    if ok:
        p = torch.cuda.get_device_properties(0)
        print("INFO device=" + torch.cuda.get_device_name(0)); print(f"INFO cc={p.major}.{p.minor}")
        print(f"INFO sms={p.multi_processor_count}"); print(f"INFO mem_gib={p.total_memory / 2**30:.0f}")
except Exception as e:
    print("torch: " + repr(e))
try:
    import triton; print("INFO triton=" + triton.__version__)
except Exception as e:
    print("triton: " + repr(e))
try:
    import numpy; print("INFO numpy=" + numpy.__version__)
except Exception as e:
    print("numpy: " + repr(e))
"""

_EXT_PY = r"""
import sparsekit
from sparsekit.ops import _cuda
ok = _cuda.available()
print(f"EXT loaded={int(ok)} mma_sp={int(ok and _cuda.has_mma_sp())} reason={_cuda.unavailable_reason()}")
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, ".out"))
    ap.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S") or DEFAULT_BUDGET_S))
    ap.add_argument("--dry-run", action="store_true", default=_env_flag("GPU_CHECK_DRY_RUN"))
    ap.add_argument("--stage", choices=["main", "tests"], default=os.environ.get("GPU_CHECK_STAGE") or "main")
    ap.add_argument("--skip", default=os.environ.get("GPU_CHECK_SKIP", ""),
                    help="steps not to run (space or comma separated)")
    ap.add_argument("--workers", type=int, default=int(os.environ.get("GPU_CHECK_WORKERS") or 0) or None)
    ap.add_argument("--work", default=os.environ.get("GPU_CHECK_WORK") or None)
    ap.add_argument("--plan", action="store_true", help="print the plan and exit")
    ap.add_argument("--plan-json", action="store_true", help="print the plan as JSON and exit")
    a = ap.parse_args(argv)
    skip = {s for s in a.skip.replace(",", " ").split() if s}
    names = {s.name for s in (TEST_STEPS if a.stage == "tests" else STEPS)}
    if skip - names:
        ap.error(f"GPU_CHECK_SKIP: unknown step(s) {sorted(skip - names)}; steps: {sorted(names)}")
    if a.budget <= RESERVE_S + 10:
        ap.error(f"GPU_CHECK_BUDGET_S={a.budget:g} is too small (> {RESERVE_S + 10} s needed)")
    chk = Check(a.out, a.budget, a.dry_run, a.stage, skip, a.work, a.workers)
    if a.plan or a.plan_json:
        plan = chk.plan()
        print(json.dumps(plan, indent=1) if a.plan_json else "\n".join(chk.plan_lines(plan)))
        return 0
    return chk.main()


if __name__ == "__main__":
    sys.exit(main())
