"""Sequence-parallel DraftAttention (Ulysses-style), on torch.distributed.

Each rank holds a contiguous slice of the token sequence of q, k, v ``(B, H, S / P, D)``
(``P`` ranks, rank ``r`` tokens ``r * S/P .. (r + 1) * S/P - 1`` of the layout's natural
order: text tokens then frames x height x width).  One all-to-all turns that into
``H / P`` heads over the *whole* sequence per rank; each rank then runs the unchanged
single-process op (:func:`sparsekit.ops.draft_attention.draft_attention`: pooled draft
map, block mask per head, token reordering, block-sparse kernel) on its heads, and a
second all-to-all returns the output to sequence slices.  The draft map, the mask and the
attention of a head depend on that head alone, so the result equals the single-process op
(the same kernel on the same numbers; the exchanges only move data).  The exchanges are
differentiable (the inverse all-to-all); DraftAttention itself is an inference op (no
backward), so this is too.

Requirements: ``H`` and ``S`` divisible by the world size (ValueError otherwise).

Ring attention (not implemented): with K/V passed around a ring instead of heads
exchanged, each rank would need the draft map of its query blocks against *all* key
blocks.  The pooled q/k are small (one row per 128-token block), so a ring version would
all-gather the pooled keys, build the same block mask on every rank, and skip whole K/V
chunks of the ring whose blocks are all dropped; the reordering of tokens into kernel
blocks would then have to respect the sequence split (a pooled patch must not straddle
two ranks).  Ulysses needs none of that, at the price of ``H >= P``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ops.draft_attention import draft_attention
from . import _comm

__all__ = ["sp_draft_attention", "shard_sequence", "gather_sequence"]


def shard_sequence(x: torch.Tensor, group=None, dim: int = 2) -> torch.Tensor:
    """This rank's contiguous slice of ``x`` along ``dim`` (the sequence of a ``(B, H, S, D)`` tensor)."""
    group = _comm.resolve_group(group)
    ws, r = _comm.world_size(group), _comm.rank(group)
    if x.shape[dim] % ws:
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by the world size {ws}")
    return x.chunk(ws, dim=dim)[r].contiguous()


def gather_sequence(x: torch.Tensor, group=None, dim: int = 2) -> torch.Tensor:
    """The full tensor from every rank's equal slice along ``dim`` (not differentiable)."""
    import torch.distributed as dist

    group = _comm.resolve_group(group)
    parts = [torch.empty_like(x) for _ in range(_comm.world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def sp_draft_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, frames: int, height: int, width: int,
                       group=None, return_mask: bool = False, **kwargs):
    """:func:`~sparsekit.ops.draft_attention.draft_attention` over a sequence split across ``group``.

    ``q, k, v``: this rank's ``(B, H, S / P, D)`` slice (see the module docstring);
    ``frames, height, width`` and ``kwargs`` (``sparsity``, ``pool``, ``text_tokens``,
    ``text_position``, ``mode``, ``mass``, ``scale``, ``backend``) describe the *whole*
    sequence, as for the single-process op.  Returns this rank's ``(B, H, S / P, D)``
    slice of the output; ``return_mask=True`` also returns the block mask of this rank's
    heads ``(B, H / P, n, n)`` (heads ``r * H/P ..``).  ``return_stats`` is not supported
    (the statistics are per head group; compute them on gathered masks if needed).
    """
    if kwargs.get("return_stats"):
        raise ValueError("sp_draft_attention does not support return_stats (use return_mask and draft_stats)")
    kwargs.pop("return_stats", None)
    group = _comm.resolve_group(group)
    ws = _comm.world_size(group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (B, H, S_local, D) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    heads = q.shape[1]
    if heads % ws:
        raise ValueError(f"Ulysses sequence parallelism splits the H={heads} heads over {ws} ranks: H must be "
                         f"divisible by the world size")
    # (B, H, S/P, D) -> scatter heads, gather sequence -> (B, H/P, S, D)
    qh, kh, vh = (_comm.all_to_all_4d(t.contiguous(), group, scatter_dim=1, gather_dim=2) for t in (q, k, v))
    res = draft_attention(qh, kh, vh, frames=frames, height=height, width=width, return_mask=return_mask, **kwargs)
    out, mask = (res if return_mask else (res, None))
    out = _comm.all_to_all_4d(out.contiguous(), group, scatter_dim=2, gather_dim=1)
    return (out, mask) if return_mask else out
