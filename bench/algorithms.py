"""CPU time of sparsekit's compression algorithms against the original algorithms' loop structure
(``sparsekit bench --algorithms`` / ``python -m bench.algorithms``).

For one layer ``N x K`` (default 4096 x 4096) and ``rows`` calibration rows
(default 2048; ``--small``: 1024 x 1024, 512 rows), in one process and with
the same threads, each algorithm runs in sparsekit and in a straightforward
reimplementation of the original's loop structure written here (columns of
``W`` updated in place on the ``(N, K)`` weight, float32, ``H^-1`` from
Cholesky -> inverse -> Cholesky; AWQ's loss from a forward of the
calibration rows per grid point; the Hessian from per-batch float32
``X^T X`` with a running rescale):

* ``hessian``: ``2 X^T X / n`` from batches of 128 rows (sparsekit: the
  accumulation hook of :func:`sparsekit.quant.collect_linear_inputs`, fed the
  batches directly, without the model's forward);
* ``sparsegpt_2:4``, ``sparsegpt_unstructured`` (50 %, the original's
  per-block threshold, ``selection="block"``);
* ``gptq_g128``, ``gptq_g128_act_order`` (dynamic groups);
* ``awq_search`` (21 grid points ``alpha = i/20``, one layer).

``ratio = sparsekit / original`` (<= 1.0: sparsekit is at least as fast);
the two sides run alternately ``--repeats`` times (the ``hessian`` row at least 3
times) and each keeps its minimum.  ``match`` checks that both
produce the same result: equal masks / codes, or output errors within 1e-3
relative of each other.  Writes ``algorithms.csv`` and ``algorithms.md`` to
``--out`` (default ``bench/results/cpu/``).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "cpu")
COLUMNS = ("algorithm", "N", "K", "rows", "threads", "sparsekit_s", "original_s", "ratio", "match", "detail")


# ----------------------------------------------------------------------------- original loop structure
def orig_hessian(x: torch.Tensor, batch: int = 128) -> torch.Tensor:
    k = x.shape[1]
    H = torch.zeros(k, k, dtype=torch.float32)
    n = 0
    for i in range(0, x.shape[0], batch):
        inp = x[i:i + batch].float()
        t = inp.shape[0]
        H *= n / (n + t)
        n += t
        inp = math.sqrt(2 / n) * inp
        H += inp.t() @ inp
    return H


def orig_hinv_upper(H: torch.Tensor, W: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0])
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    return torch.linalg.cholesky(H, upper=True)


def _obs_sweep(W: torch.Tensor, Hinv: torch.Tensor, blocksize: int, column) -> torch.Tensor:
    """The block loop SparseGPT and GPTQ share: the columns of ``W`` (updated in place) one at a time in blocks
    of ``blocksize``; ``column(W1, Hinv1, i1, i)`` gives the new value of column ``i`` of the block starting at
    ``i1`` (``W1``: the block's columns with the error of the earlier ones propagated); its error is
    propagated to the rest of the block at once and to the later blocks after the block.  Returns the new
    values of all the columns."""
    n, k = W.shape
    Q = torch.zeros_like(W)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            q = column(W1, Hinv1, i1, i)
            Q1[:, i] = q
            err1 = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q


def orig_sparsegpt(W: torch.Tensor, H: torch.Tensor, prunen: int = 0, prunem: int = 0, sparsity: float = 0.5,
                   blocksize: int = 128) -> torch.Tensor:
    W = W.clone().float()
    Hinv = orig_hinv_upper(H.float(), W)
    mask = torch.zeros_like(W, dtype=torch.bool)

    def column(W1, Hinv1, i1, i):
        mask1 = mask[:, i1:i1 + W1.shape[1]]
        if i == 0 and prunen == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1.copy_(tmp <= thresh)
        if prunen != 0 and i % prunem == 0:
            tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
            mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
        q = W1[:, i].clone()
        q[mask1[:, i]] = 0
        return q

    return _obs_sweep(W, Hinv, blocksize, column), ~mask


def _params(x: torch.Tensor, maxq: int = 15):
    xmin = torch.minimum(x.min(1).values, torch.zeros(x.shape[0]))
    xmax = torch.maximum(x.max(1).values, torch.zeros(x.shape[0]))
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp], xmax[tmp] = -1, 1
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def _q(x, scale, zero, maxq: int = 15):
    return scale * (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero)


def orig_gptq(W: torch.Tensor, H: torch.Tensor, groupsize: int = 128, blocksize: int = 128,
              actorder: bool = False) -> torch.Tensor:
    W = W.clone().float()
    n, k = W.shape
    H = H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    H += 0.01 * torch.mean(torch.diag(H)) * torch.eye(k)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    group = {}

    def column(W1, Hinv1, i1, i):
        if (i1 + i) % groupsize == 0:
            # the group's grid from W's columns as they stand at the start of the block
            group["scale"], group["zero"] = _params(W[:, (i1 + i):(i1 + i + groupsize)])
        return _q(W1[:, i].unsqueeze(1), group["scale"], group["zero"]).flatten()

    Q = _obs_sweep(W, Hinv, blocksize, column)
    if actorder:
        Q = Q[:, torch.argsort(perm)]
    return Q


def orig_awq(W: torch.Tensor, x: torch.Tensor, group_size: int = 128, n_grid: int = 20) -> tuple:
    """Forward-based loss per grid point (alpha = i / n_grid, i = 0 .. n_grid)."""
    n, k = W.shape
    org = x @ W.t()
    xm = x.abs().view(-1, k).mean(0)
    best, best_a, best_s = float("inf"), None, None
    for r in range(n_grid + 1):
        a = r / n_grid
        s = xm.pow(a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        ws = (W * s).reshape(n, k // group_size, group_size)
        sc, z = _params(ws.reshape(-1, group_size))
        wq = _q(ws.reshape(-1, group_size), sc, z).reshape(n, k) / s
        loss = float((x @ wq.t() - org).pow(2).mean())
        if loss < best:
            best, best_a, best_s = loss, a, s
    return best_a, best_s


# ----------------------------------------------------------------------------- driver
def _timed(fn):
    """(seconds, result) of one call of ``fn``."""
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _pair(fn_sk, fn_or, repeats: int):
    """Both sides alternately ``repeats`` times (load drift hits both); the minimum of each."""
    t_sk, t_or, out_sk, out_or = float("inf"), float("inf"), None, None
    for _ in range(repeats):
        t, out_sk = _timed(fn_sk)
        t_sk = min(t_sk, t)
        t, out_or = _timed(fn_or)
        t_or = min(t_or, t)
    return t_sk, out_sk, t_or, out_or


def _rel_err(x, W, Wq):
    return float((x @ (W - Wq.float()).t()).norm() / (x @ W.t()).norm())


def run(n: int, k: int, rows: int, repeats: int = 2, algorithms=None, seed: int = 0) -> list:
    from sparsekit.prune import sparsegpt_prune
    from sparsekit.calibration.core import InputAccumulator
    from sparsekit.quant import awq_search, gptq_quantize

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) / math.sqrt(k)
    x = torch.randn(rows, k, generator=g) * torch.exp(torch.randn(k, generator=g))     # outlier channels
    threads = torch.get_num_threads()
    out = []

    def add(name, sk, orig, match, detail):
        out.append({"algorithm": name, "N": n, "K": k, "rows": rows, "threads": threads,
                    "sparsekit_s": float(f"{sk:.5g}"), "original_s": float(f"{orig:.5g}"), "ratio": round(sk / orig, 3),
                    "match": bool(match), "detail": detail})
        print(f"{name:24s} sparsekit {sk:8.3f}s  original {orig:8.3f}s  ratio {sk / orig:6.3f}  "
              f"match {bool(match)}  {detail}", flush=True)

    want = set(algorithms or ("hessian", "sparsegpt_2:4", "sparsegpt_unstructured", "gptq_g128",
                              "gptq_g128_act_order", "awq_search"))
    lin = nn.Linear(k, n, bias=False)
    batches = [x[i:i + 128] for i in range(0, rows, 128)]

    def sk_hessian():
        # the accumulation collect_linear_inputs' hooks run, without the model's own forward
        acc = InputAccumulator({"": lin}, ("xtx",))
        hook = acc.make_hook("")
        for b in batches:
            hook(lin, (b,))
        a = acc.pop("")
        return a["xtx"].mul_(2.0 / a["n"])

    # seconds per run: at least 3 runs per side, so that one stall of the shared machine does not decide
    t_sk, Hs, t_or, Ho = _pair(sk_hessian, lambda: orig_hessian(x), max(repeats, 3))
    rel = float((Hs - Ho.double()).norm() / Hs.norm())
    if "hessian" in want:
        add("hessian", t_sk, t_or, rel < 1e-3, f"rel diff {rel:.1e} (sparsekit: float32 in-place sum folded into float64; original: float32 running mean)")
    H = Hs
    for pat in ("2:4", "unstructured"):
        name = f"sparsegpt_{pat}"
        if name not in want:
            continue
        t_sk, (ws, ms), t_or, (wo, mo) = _pair(
            lambda: sparsegpt_prune(W, H, pat, 0.5, selection="block"),
            lambda: orig_sparsegpt(W, H.float(), 2 if pat == "2:4" else 0, 4 if pat == "2:4" else 0), repeats)
        agree = float((ms == mo).float().mean())
        es, eo = _rel_err(x, W, ws), _rel_err(x, W, wo)
        add(name, t_sk, t_or, agree == 1.0 or abs(es - eo) <= 1e-3 * eo,
            f"mask agreement {agree:.5f}, output error {es:.5f} vs {eo:.5f}")
    for act in (False, True):
        name = "gptq_g128_act_order" if act else "gptq_g128"
        if name not in want:
            continue
        t_sk, res, t_or, qo = _pair(lambda: gptq_quantize(W, H, 128, act_order=act),
                                    lambda: orig_gptq(W, H.float(), 128, actorder=act), repeats)
        qs = res.dequantize()
        agree = float(torch.isclose(qs, qo, rtol=1e-4, atol=1e-6).float().mean())
        es, eo = _rel_err(x, W, qs), _rel_err(x, W, qo)
        add(name, t_sk, t_or, agree == 1.0 or abs(es - eo) <= 1e-3 * eo,
            f"weights equal {agree:.5f}, output error {es:.5f} vs {eo:.5f}")
    if "awq_search" in want:
        t_sk, (s_sk, res, info), t_or, (a_or, s_or) = _pair(
            lambda: awq_search(W, x, 128, grid=20, return_info=True), lambda: orig_awq(W, x, 128, 20), repeats)
        es = _rel_err(x, W, res.effective_weight())
        sc, z = _params((W * s_or).reshape(-1, 128))
        wq = _q((W * s_or).reshape(-1, 128), sc, z).reshape(n, k) / s_or
        eo = _rel_err(x, W, wq)
        add("awq_search", t_sk, t_or, info["alpha"] == a_or or abs(es - eo) <= 1e-3 * eo,
            f"alpha {info['alpha']:.2f} vs {a_or:.2f}, output error {es:.5f} vs {eo:.5f}")
    return out


def write(rows: list, out_dir: str, header: dict) -> tuple:
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "algorithms.csv")
    md_path = os.path.join(out_dir, "algorithms.md")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with open(md_path, "w") as f:
        f.write("# Compression algorithms on CPU: sparsekit vs the original loop structure\n\n")
        f.write("".join(f"- {k}: {v}\n" for k, v in header.items()))
        f.write("\nratio = sparsekit / original (<= 1.0: sparsekit at least as fast); minimum over repeats.\n\n")
        f.write("| algorithm | N x K | rows | sparsekit s | original s | ratio | same result | detail |\n")
        f.write("|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['algorithm']} | {r['N']}x{r['K']} | {r['rows']} | {r['sparsekit_s']} | "
                    f"{r['original_s']} | {r['ratio']} | {'yes' if r['match'] else 'no'} | {r['detail']} |\n")
    return csv_path, md_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsekit bench --algorithms", description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="1024 x 1024, 512 rows (quick check)")
    p.add_argument("--n", type=int, default=None, help="output features (default 4096; --small 1024)")
    p.add_argument("--k", type=int, default=None, help="input features (default 4096; --small 1024)")
    p.add_argument("--rows", type=int, default=None, help="calibration rows (default 2048; --small 512)")
    p.add_argument("--repeats", type=int, default=2, help="runs per side; the minimum is kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--only", default=None, help="comma-separated algorithms to run")
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default bench/results/cpu)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.n or (1024 if args.small else 4096)
    k = args.k or (1024 if args.small else 4096)
    rows = args.rows or (512 if args.small else 2048)
    if k % 128 or n < 1 or rows < 1:
        print(f"sparsekit bench --algorithms: error: K must be a multiple of 128, got {k}", file=sys.stderr)
        return 2
    only = args.only.split(",") if args.only else None
    res = run(n, k, rows, args.repeats, only)
    from .cpu_speed import _commit, _cpu_name

    header = {"CPU": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "commit": _commit(), "date": datetime.date.today().isoformat()}
    csv_path, md_path = write(res, args.out, header)
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
