"""Distributed calibration: each rank calibrates on its own share of the data and the
statistics are summed over a process group, so every rank ends with what one process
calibrating on the union of the shares would have.

What is summed: the raw input statistics of :mod:`sparsekit.calibration` (``X^T X``,
``sum x^2``, ``sum |x|`` in float64, and the row count ``n``) before they are normalized,
so GPTQ's ``H = 2 X^T X / n``, AWQ's ``mean |x|``, Wanda's ``||X_j||`` and SparseGPT's
Hessian equal the single-process ones up to the order of float64 additions; and the
gradient statistics of :func:`sparsekit.prune.collect_layer_stats` (gradient sums, Fisher
sums, input squared norms, batch and sample counts; float32 unless the weight is float64).
Every rank then compresses from identical statistics and builds the same compressed model.

Use it as ``compress(model, my_batches, ..., process_group=group)``,
``collect_linear_inputs(..., process_group=group)``,
``collect_layer_stats(..., process_group=group)``, or wrap any calibration call in
``with calibration_group(group): ...``.  Every rank must take part in every statistics
reduction: give every rank at least one batch, the same model and the same layers.
``max_rows`` caps the rows *per rank*.  The reductions run on the statistics' device (CPU
tensors need a gloo group, CUDA tensors an NCCL one).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch
import torch.distributed as dist

from . import _comm

__all__ = ["calibration_group", "current_calibration_group", "all_reduce_stats", "reduce_input_stats"]

_GROUP: contextvars.ContextVar = contextvars.ContextVar("sparsekit_calibration_group", default=None)


@contextlib.contextmanager
def calibration_group(process_group):
    """Within the block, calibration statistics are summed over ``process_group`` (a
    ``ProcessGroup``, a 1-D ``DeviceMesh`` or None for no reduction)."""
    group = _comm.optional_group(process_group)
    token = _GROUP.set(group)
    try:
        yield group
    finally:
        _GROUP.reset(token)


def current_calibration_group():
    """The group set by :func:`calibration_group` (None outside one)."""
    return _GROUP.get()


def all_reduce_stats(stats: dict, group) -> dict:
    """In place: sum every tensor and every int of ``stats`` (one flat dict) over ``group``; other
    values are left alone.  Keys are visited in sorted order, so ranks must hold the same keys."""
    for key in sorted(stats):
        v = stats[key]
        if isinstance(v, torch.Tensor):
            dist.all_reduce(v, op=dist.ReduceOp.SUM, group=group)
        elif isinstance(v, int) and not isinstance(v, bool):
            t = torch.tensor([v], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            stats[key] = int(t.item())
    return stats


def reduce_input_stats(acc: dict) -> dict:
    """The hook of :mod:`sparsekit.calibration`: sum one layer's raw statistics
    (``{"n": rows, "xtx": ..., ...}``) over the current calibration group, if any."""
    group = _GROUP.get()
    if group is not None and acc is not None:
        all_reduce_stats(acc, group)
    return acc


def reduce_gradient_stats(process_group, names, per_sample_ok: dict, num_batches: int, num_samples: int,
                          *sums: dict) -> tuple:
    """For :func:`sparsekit.prune.collect_layer_stats`: in place, sum every ``sums[i][name]`` over the
    group and AND ``per_sample_ok`` (a layer falls back to the batch Fisher if it did on any rank);
    returns the summed ``(num_batches, num_samples)``."""
    group = _comm.resolve_group(process_group)
    counts = torch.tensor([num_batches, num_samples], dtype=torch.int64)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    ok = torch.tensor([0 if per_sample_ok[n] else 1 for n in names], dtype=torch.int64)
    dist.all_reduce(ok, op=dist.ReduceOp.SUM, group=group)
    for i, n in enumerate(names):
        per_sample_ok[n] = bool(ok[i] == 0)
        for d in sums:
            dist.all_reduce(d[n], op=dist.ReduceOp.SUM, group=group)
    return int(counts[0]), int(counts[1])
