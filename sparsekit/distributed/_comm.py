"""Process groups and the autograd-aware collectives of tensor/sequence parallelism (torch.distributed only)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["resolve_group", "world_size", "rank", "reduce_from_parallel", "copy_to_parallel",
           "gather_last_dim"]


def resolve_group(mesh_or_group):
    """A ``ProcessGroup`` from a 1-D ``DeviceMesh``, a ``ProcessGroup`` or None (the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                           "(or init_device_mesh) first")
    if mesh_or_group is None:
        return dist.group.WORLD
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:         # pragma: no cover - every supported torch has it
        DeviceMesh = ()
    if isinstance(mesh_or_group, DeviceMesh):
        if mesh_or_group.ndim != 1:
            raise ValueError(f"mesh_or_group: pass a 1-D DeviceMesh (or one dimension of it, mesh['tp']), got a "
                             f"{mesh_or_group.ndim}-D mesh")
        return mesh_or_group.get_group()
    if isinstance(mesh_or_group, dist.ProcessGroup):
        return mesh_or_group
    raise TypeError(f"mesh_or_group must be a DeviceMesh, a ProcessGroup or None, got {type(mesh_or_group).__name__}")


def world_size(group) -> int:
    return dist.get_world_size(group)


def rank(group) -> int:
    return dist.get_rank(group)


def _reduce_dtype(t: torch.Tensor, group) -> torch.dtype:
    # gloo's half-precision reductions are not dependable across versions: reduce in float32 there
    if t.dtype in (torch.float16, torch.bfloat16) and dist.get_backend(group) == "gloo":
        return torch.float32
    return t.dtype


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Out-of-place sum over ``group`` (half tensors summed in float32 on gloo, then rounded once)."""
    rd = _reduce_dtype(t, group)
    buf = t.detach().to(rd).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(t.dtype)


class _ReduceFromParallel(torch.autograd.Function):
    """Forward: sum of the ranks' partial results; backward: identity (each rank's partial
    product needs the full output gradient, which every rank already holds)."""

    @staticmethod
    def forward(ctx, t, group):
        return all_reduce_sum(t, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToParallel(torch.autograd.Function):
    """Forward: identity (a replicated input); backward: sum of the ranks' input gradients."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad.contiguous(), ctx.group), None


class _GatherLastDim(torch.autograd.Function):
    """Forward: concatenation of every rank's slice along the last dim (slices may differ in
    size: padded to the largest for the collective); backward: this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, t, group, sizes):
        r = dist.get_rank(group)
        ctx.lo = sum(sizes[:r])
        ctx.n = sizes[r]
        width = max(sizes)
        t = t.contiguous()
        if t.shape[-1] < width:
            t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
        parts = [torch.empty_like(t) for _ in sizes]
        dist.all_gather(parts, t, group=group)
        return torch.cat([p[..., :s] for p, s in zip(parts, sizes)], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.lo:ctx.lo + ctx.n].contiguous(), None, None


def reduce_from_parallel(t: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromParallel.apply(t, group)


def copy_to_parallel(t: torch.Tensor, group) -> torch.Tensor:
    if not (torch.is_grad_enabled() and t.requires_grad):
        return t
    return _CopyToParallel.apply(t, group)


def gather_last_dim(t: torch.Tensor, group, sizes) -> torch.Tensor:
    return _GatherLastDim.apply(t, group, list(sizes))


def all_to_all_4d(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """``x`` split into ``world`` equal chunks along ``scatter_dim``, chunk ``j`` sent to rank ``j``;
    the received chunks concatenated along ``gather_dim`` in rank order (Ulysses' exchange).
    Differentiable: the backward is the inverse exchange."""
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        s, g = ctx.dims
        return _all_to_all(grad.contiguous(), ctx.group, g, s), None, None, None


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    ws = dist.get_world_size(group)
    chunks = [c.contiguous() for c in torch.chunk(x, ws, dim=scatter_dim)]
    # all_to_all_single on one contiguous buffer (gloo implements it; the list form it does not everywhere)
    send = torch.stack(chunks, 0)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(list(recv.unbind(0)), dim=gather_dim)


def optional_group(process_group) -> Optional[object]:
    """None stays None; otherwise :func:`resolve_group`."""
    return None if process_group is None else resolve_group(process_group)
