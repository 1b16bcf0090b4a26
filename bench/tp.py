"""Tensor-parallel layers (``sparsekit.distributed.shard_module``): time one sharded layer per rank.

GPU, under torchrun (one process per GPU, NCCL)::

    torchrun --nproc-per-node 2 -m bench.tp [--out DIR]

For every case (module kind x style x shape) each rank times, in the same run,

* ``tp_local``  the local shard's op alone (no communication),
* ``tp``        the sharded layer's forward (local op + all-gather / all-reduce),
* ``dense``     ``F.linear`` on this rank's dense shard of the weight (the per-rank baseline),

with ``triton.testing.do_bench`` medians on rotating inputs, after a correctness check of the
sharded output against the unsharded module (rel err < 1e-2).  Rows go to
``bench/results/<gpu>/tp_rank<r>.csv`` (op ``tp_linear``; ``case`` carries
``kind, style, M, N, K, world, rank``).

CPU: ``python -m bench.tp --dry-run`` builds every case of the list at 1/16 of its size in one
gloo process group (world size 1 unless started under torchrun) and checks the sharded
outputs against the unsharded modules on the reference backend; it times nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

# (kind, style, N, K); M is swept
CASES = [(kind, style, n, k) for kind in ("sparse24", "int4", "w8a8", "block_sparse")
         for style in ("colwise", "rowwise") for n, k in ((4096, 4096), (11008, 4096), (4096, 11008))]
MS = (1, 16, 256)


def build(kind: str, n: int, k: int, dtype, device, backend=None):
    from torch import nn

    from sparsekit.nn import BlockSparseLinear, QLinear, SparseLinear

    lin = nn.Linear(k, n, device=device, dtype=torch.float32)
    if kind == "sparse24":
        mod = SparseLinear.from_dense(lin.to(dtype))
    elif kind == "int4":
        mod = QLinear.from_float(lin, bits=4, group_size=128 if k % 128 == 0 else 32, dtype=dtype)
    elif kind == "w8a8":
        mod = QLinear.from_float(lin, bits=8, act_bits=8, dtype=dtype)
    elif kind == "block_sparse":
        mod = BlockSparseLinear.from_dense(lin.to(dtype), block_size=(64, 64) if min(n, k) >= 256 else (16, 16),
                                           sparsity=0.5)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    for m in mod.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return mod


def _set_backend(mod, backend):
    for m in mod.modules():
        if hasattr(m, "backend"):
            m.backend = backend


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_case(kind, style, n, k, m, dtype, device, backend, tol=1e-2) -> float:
    """Sharded vs unsharded output of one case; returns the relative error (raises above ``tol``)."""
    from sparsekit.distributed import shard_module

    torch.manual_seed(0)
    mod = build(kind, n, k, dtype, device, backend)
    x = torch.randn(m, k, device=device, dtype=dtype)
    ref = mod(x)
    sh = shard_module(mod, None, style, gather_output=True, input_is_sharded=False)
    _set_backend(sh, backend)
    err = _rel(sh(x), ref)
    tol = tol if not (kind == "w8a8" and style == "rowwise") else 3e-2     # per-shard activation scales
    if not err < tol:
        raise AssertionError(f"{kind} {style} N={n} K={k} M={m}: sharded output rel err {err:.3g} >= {tol}")
    return err


def _init(backend: str):
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    return True


def dry_run(scale: int = 16) -> int:
    import torch.distributed as dist

    os.environ.setdefault("SPARSEKIT_NO_CUDA_EXT", "1")
    made = _init("gloo")
    try:
        world = dist.get_world_size()
        bad = 0
        for kind, style, n, k in CASES:
            n_s, k_s = max(64, n // scale), max(64, k // scale)
            n_s, k_s = n_s // 64 * 64, k_s // 64 * 64          # keep every case's units (block 16, group 32)
            for m in (1, 5):
                try:
                    err = check_case(kind, style, n_s, k_s, m, torch.float16, "cpu", "reference")
                    status = f"ok (rel err {err:.2e})"
                except Exception as e:           # report every case, then fail
                    bad += 1
                    status = f"FAIL: {e}"
                if dist.get_rank() == 0:
                    print(f"{kind:13s} {style:8s} N={n_s:5d} K={k_s:5d} M={m} world={world}: {status}")
        return 1 if bad else 0
    finally:
        if made:
            dist.destroy_process_group()


def run_gpu(out_dir=None) -> int:
    import torch.distributed as dist
    import torch.nn.functional as F

    from bench import harness
    from sparsekit.distributed import shard_module

    if not torch.cuda.is_available():
        print("bench.tp needs CUDA GPUs (use --dry-run on CPU)", file=sys.stderr)
        return 2
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    made = _init("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", local_rank)
    gpu, commit, date = harness.gpu_name(), harness.git_commit(), harness.now_iso()
    rows = []
    try:
        for kind, style, n, k in CASES:
            torch.manual_seed(0)
            mod = build(kind, n, k, torch.float16, dev)
            try:
                sh = shard_module(mod, None, style)
            except ValueError as e:
                if rank == 0:
                    print(f"skip {kind} {style} N={n} K={k}: {e}")
                continue
            w_local = sh.local.weight.detach().to(torch.float16)
            lo, hi = sh.local_range
            for m in MS:
                case = harness.format_case(kind=kind, style=style, M=m, N=n, K=k, world=world, rank=rank)
                xs_full = [torch.randn(m, k, device=dev, dtype=torch.float16) for _ in range(4)]
                xs = xs_full if style == "colwise" else [x[:, lo:hi].contiguous() for x in xs_full]
                err = check_case(kind, style, n, k, m, torch.float16, dev, None)
                timings = {
                    "tp_local": harness.time_rotating(lambda x: sh.local(x), [(x,) for x in xs]),
                    "tp": harness.time_rotating(lambda x: sh(x), [(x,) for x in xs]),
                    "dense": harness.time_rotating(lambda x: F.linear(x, w_local), [(x,) for x in xs]),
                }
                for backend, (p20, p50, p80) in timings.items():
                    rows.append(harness.Row(op="tp_linear", case=case, backend=backend, dtype="fp16", p20_ms=p20,
                                            p50_ms=p50, p80_ms=p80,
                                            speedup_vs_dense=timings["dense"][1] / p50, gpu=gpu, commit=commit,
                                            date=date, rel_err=err))
        out = out_dir or harness.default_out_dir(gpu)
        os.makedirs(out, exist_ok=True)
        path = harness.write_csv(rows, os.path.join(out, f"tp_rank{rank}.csv"))
        print(f"rank {rank}: wrote {path}")
        return 0
    finally:
        if made:
            dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="check the case list on CPU (gloo), no timings")
    ap.add_argument("--out", default=None, help="output directory (default bench/results/<gpu>)")
    args = ap.parse_args(argv)
    return dry_run() if args.dry_run else run_gpu(args.out)


if __name__ == "__main__":
    sys.exit(main())
