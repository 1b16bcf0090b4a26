"""Tensor parallelism for sparsekit's packed linear layers (and ``nn.Linear``), on torch.distributed.

:func:`shard_module` splits one layer over the ranks of a process group (or a 1-D
``DeviceMesh``); every rank keeps only its own shard of every packed tensor and runs
the same op as the unsharded module on it.

* ``style="colwise"``: output features ``N`` are split.  Every rank sees the whole input
  and produces its slice of the output (its rows of the packed weight, its slice of the
  bias and of any per-output-channel scale).  ``gather_output=True`` all-gathers the
  slices into the full output.
* ``style="rowwise"``: input features ``K`` are split.  Every rank multiplies its slice
  of the input by its columns of the packed weight; the partial products are summed
  with an all-reduce and the bias is added once, after the sum.  The input is either
  already split along its last dim (``input_is_sharded=True``, the default, as after a
  colwise layer) or the full input, which each rank slices itself.

Where a packed format may be cut (``K`` splits, rowwise; ``N`` splits, colwise):

====================  =========================================  ==========================
module                colwise: N split at multiples of           rowwise: K split at multiples of
====================  =========================================  ==========================
nn.Linear             1                                          1
SparseLinear (2:4)    1 (values/meta_codes rows; int8 w_scale)    8 (one metadata byte = two 2:4 groups)
BlockSparseLinear     bm (block rows; crow/col re-based)          bk (block columns; index rebuilt)
QLinear bits=4        1 (qweight/scales/zeros rows)               group_size (scales/zeros follow)
QLinear bits=8        1 (qweight rows, per-channel scales)        1 (scales replicated)
SparseQLinear         1                                          2 * group_size (compressed groups)
====================  =========================================  ==========================

A group of one whole row (int4 ``group_size=-1``) cannot be split along ``K``.  The last
shard may be shorter (``K`` or ``N`` not a multiple of the unit, or of the world size);
``splits=`` gives explicit per-rank sizes.  A split that breaks a constraint raises a
``ValueError`` naming the module, the dimension and the constraint.

Activation quantization in rowwise layers (``act_bits`` 8/4 of QLinear, ``act_bits=8`` of
SparseLinear): the per-token scale is computed by each rank over its own slice of the
input (as tensor-parallel W8A8 inference engines do), so the result differs from the
unsharded layer's by activation rounding only (a finer quantization, not a coarser one).
``act_bits="mixed"`` chooses its 8-bit tokens from the norm of the *whole* token: the
shards' squared norms are all-reduced first, so every rank picks the same tokens as the
unsharded layer.

Act-order int4 weights (``QLinear.in_perm``): colwise keeps the whole permutation.
Rowwise cuts the weight by *packed* (permuted) position, so that groups stay whole:
with a replicated input (``input_is_sharded=False``) each rank gathers its own packed
columns ``x[..., in_perm[lo:hi]]``.  With a sharded input this is only possible when
every shard's packed columns are exactly its own input features (a permutation that
never crosses a shard boundary); otherwise a ``ValueError`` says so.
"""
from __future__ import annotations

import fnmatch
import math
import re
from typing import Optional, Sequence

import torch
from torch import nn

from ..formats.block_sparse import BlockSparseWeight
from ..formats.int4 import Int4Weight
from ..formats.int8 import Int8Weight
from ..formats.sparse24 import padded_k
from ..formats.sparse24_int4 import Sparse24Int4Weight, k_padded16
from ..nn.block_sparse_linear import BlockSparseLinear
from ..nn.qlinear import QLinear
from ..nn.sparse_linear import SparseLinear
from ..nn.sparse_qlinear import SparseQLinear
from . import _comm

__all__ = ["ShardedLinear", "shard_module", "parallelize", "shard_bounds", "STYLES"]

STYLES = ("colwise", "rowwise")
_SUPPORTED = (nn.Linear, SparseLinear, BlockSparseLinear, QLinear, SparseQLinear)


# --------------------------------------------------------------------------- split points
def shard_bounds(size: int, world: int, unit: int, *, name: str = "module", dim: str = "K",
                 constraint: str = "", splits: Optional[Sequence[int]] = None) -> list:
    """``[(lo, hi)]`` per rank: contiguous pieces of ``range(size)`` whose inner boundaries are
    multiples of ``unit``.  Default: as even as the unit allows (the last piece may be short);
    ``splits``: explicit sizes.  ValueError naming ``name``, ``dim`` and ``constraint`` otherwise."""
    why = f" ({constraint})" if constraint else ""
    if splits is not None:
        splits = [int(s) for s in splits]
        if len(splits) != world:
            raise ValueError(f"{name}: splits has {len(splits)} sizes for a world of {world} ranks")
        if sum(splits) != size or any(s < 1 for s in splits):
            raise ValueError(f"{name}: splits {splits} must be positive and sum to {dim}={size}")
        bounds, lo = [], 0
        for s in splits:
            bounds.append((lo, lo + s))
            lo += s
        for lo, _ in bounds[1:]:
            if lo % unit:
                raise ValueError(f"{name}: cannot split {dim}={size} at {lo}: split points along {dim} must be "
                                 f"multiples of {unit}{why}")
        return bounds
    units = math.ceil(size / unit)
    if units < world:
        raise ValueError(f"{name}: cannot split {dim}={size} over {world} ranks: split points along {dim} must be "
                         f"multiples of {unit}{why}, which leaves only {units} piece(s)")
    base, rem = divmod(units, world)
    bounds, u = [], 0
    for r in range(world):
        n = base + (1 if r < rem else 0)
        bounds.append((u * unit, min(size, (u + n) * unit)))
        u += n
    return bounds


def _constraint(mod: nn.Module, style: str):
    """(unit, description) of the split dimension of ``mod`` for ``style``."""
    if style == "colwise":
        if isinstance(mod, BlockSparseLinear):
            return mod.block_size[0], f"whole block rows of bm={mod.block_size[0]}"
        return 1, ""
    if isinstance(mod, SparseLinear):
        return 8, "2:4 metadata: one byte holds two groups of 4 input features"
    if isinstance(mod, BlockSparseLinear):
        return mod.block_size[1], f"whole block columns of bk={mod.block_size[1]}"
    if isinstance(mod, QLinear):
        if mod.bits == 4:
            return mod.group_size, f"int4 groups of group_size={mod.group_size} (scales/zeros follow)"
        return 1, ""
    if isinstance(mod, SparseQLinear):
        return 2 * mod.group_size, (f"2:4+int4 groups of {mod.group_size} compressed = {2 * mod.group_size} dense "
                                    "input features")
    return 1, ""


# --------------------------------------------------------------------------- local shards
def _sl(t: Optional[torch.Tensor], lo: int, hi: int, dim: int = 0) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t.detach().narrow(dim, lo, hi - lo).clone()


def _local_linear(mod: nn.Linear, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` (a slice of ``mod``'s) and ``bias``, on ``mod``'s device and
    dtype, its weight trainable as ``mod``'s is."""
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=mod.weight.device,
                    dtype=mod.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    out.weight.requires_grad_(mod.weight.requires_grad)
    return out


def _local_block_sparse(mod: BlockSparseLinear, lo: int, hi: int, dim: int,
                        bias: Optional[torch.Tensor]) -> BlockSparseLinear:
    """The shard of a BlockSparseLinear over the features ``[lo, hi)`` of weight dimension ``dim`` (0: output
    features, 1: input features; ``lo`` a multiple of the block size along ``dim``): the kept blocks of the
    block rows (``dim=0``) or block columns (``dim=1``) that the range covers, with ``bias``."""
    w = mod.weight_format()
    b = mod.block_size[dim]
    i0, i1 = lo // b, math.ceil(hi / b)
    crow, col = w.crow.long(), w.col.long()
    rows = torch.repeat_interleave(torch.arange(len(crow) - 1, device=col.device), crow.diff())
    at = rows if dim == 0 else col
    keep = (at >= i0) & (at < i1)
    rows, col = rows[keep], col[keep]
    if dim == 0:
        rows, n_rows, shape = rows - i0, i1 - i0, (hi - lo, mod.in_features)
    else:
        col, n_rows, shape = col - i0, len(crow) - 1, (mod.out_features, hi - lo)
    counts = torch.bincount(rows, minlength=n_rows)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    local = BlockSparseWeight.from_blocks(w.blocks.detach()[keep].clone(), crow, col, shape, mod.block_size)
    out = BlockSparseLinear.from_weight(local, bias, backend=mod.backend)
    out.blocks.requires_grad_(mod.blocks.requires_grad)
    return out


def _local_colwise(mod: nn.Module, lo: int, hi: int) -> nn.Module:
    n = hi - lo
    bias = _sl(mod.bias, lo, hi)
    if isinstance(mod, nn.Linear):
        return _local_linear(mod, mod.weight[lo:hi], bias)
    if isinstance(mod, SparseLinear):
        out = SparseLinear(mod.in_features, n, bias=bias is not None, device=mod.meta_codes.device,
                           dtype=mod._float_dtype(), backend=mod.backend, act_bits=mod.act_bits)
        with torch.no_grad():
            out.values.copy_(mod.values[lo:hi])
            out.meta_codes.copy_(mod.meta_codes[lo:hi])
            if mod.act_bits == 8:
                out.w_scale.copy_(mod.w_scale[lo:hi])
            if bias is not None:
                out.bias.copy_(bias)
        return out
    if isinstance(mod, BlockSparseLinear):
        return _local_block_sparse(mod, lo, hi, 0, bias)
    if isinstance(mod, QLinear):
        if mod.bits == 8:
            w = Int8Weight(_sl(mod.qweight, lo, hi), _sl(mod.scales, lo, hi).float(), (n, mod.in_features))
        else:
            w = Int4Weight(_sl(mod.qweight, lo, hi), _sl(mod.scales, lo, hi), _sl(mod.zeros, lo, hi),
                           (n, mod.in_features), mod.group_size, mod.symmetric,
                           None if mod.in_perm is None else mod.in_perm.clone())
        return QLinear.from_weight(w, bias, input_scale=mod.input_scale, backend=mod.backend, act_bits=mod.act_bits,
                                   frac8=mod.frac8, dtype=mod.dtype)
    if isinstance(mod, SparseQLinear):
        w = Sparse24Int4Weight(_sl(mod.qweight, lo, hi), _sl(mod.scales, lo, hi), _sl(mod.zeros, lo, hi),
                               _sl(mod.meta_codes, lo, hi), (n, mod.in_features), mod.group_size, mod.symmetric)
        return SparseQLinear.from_weight(w, bias, backend=mod.backend)
    raise TypeError(f"cannot shard a {type(mod).__name__}")


def _local_rowwise(mod: nn.Module, lo: int, hi: int, gather: Optional[torch.Tensor]) -> nn.Module:
    """The ``[lo, hi)`` input-feature shard of ``mod`` without bias (added once after the sum).
    ``gather``: for an act-order QLinear with a replicated input, the original columns of the
    shard (the caller gathers them; the local layer then holds no permutation)."""
    k = hi - lo
    n = mod.out_features
    if isinstance(mod, nn.Linear):
        return _local_linear(mod, mod.weight[:, lo:hi], None)
    if isinstance(mod, SparseLinear):
        out = SparseLinear(k, n, bias=False, device=mod.meta_codes.device, dtype=mod._float_dtype(),
                           backend=mod.backend, act_bits=mod.act_bits)
        kp_hi = lo + padded_k(k)
        with torch.no_grad():
            out.values.copy_(mod.values[:, lo // 2:kp_hi // 2])
            out.meta_codes.copy_(mod.meta_codes[:, lo // 8:kp_hi // 8])
            if mod.act_bits == 8:
                out.w_scale.copy_(mod.w_scale)
        out.validate()
        return out
    if isinstance(mod, BlockSparseLinear):
        return _local_block_sparse(mod, lo, hi, 1, None)
    if isinstance(mod, QLinear):
        if mod.bits == 8:
            w = Int8Weight(_sl(mod.qweight, lo, hi, 1), mod.scales.detach().float().clone(), (n, k))
            perm = None
            in_scale = _sl(mod.input_scale, lo, hi)
        else:
            gs = mod.group_size
            w = None
            perm = None
            in_scale = None
            if mod.in_perm is not None:
                if gather is not None:
                    perm = None
                    if mod.input_scale is not None:
                        in_scale = mod.input_scale.detach()[gather].clone()
                else:
                    perm = (mod.in_perm[lo:hi] - lo).clone()
                    in_scale = _sl(mod.input_scale, lo, hi)
            else:
                in_scale = _sl(mod.input_scale, lo, hi)
            w = Int4Weight(_sl(mod.qweight, lo // 8, hi // 8, 1), _sl(mod.scales, lo // gs, hi // gs, 1),
                           _sl(mod.zeros, lo // gs, hi // gs, 1), (n, k), gs, mod.symmetric, perm)
        return QLinear.from_weight(w, None, input_scale=in_scale, backend=mod.backend, act_bits=mod.act_bits,
                                   frac8=mod.frac8, dtype=mod.dtype)
    if isinstance(mod, SparseQLinear):
        gs = mod.group_size
        c_lo, c_hi = lo // 2, (lo + k_padded16(k)) // 2
        w = Sparse24Int4Weight(_sl(mod.qweight, c_lo // 8, c_hi // 8, 1), _sl(mod.scales, c_lo // gs, c_hi // gs, 1),
                               _sl(mod.zeros, c_lo // gs, c_hi // gs, 1), _sl(mod.meta_codes, c_lo // 4, c_hi // 4, 1),
                               (n, k), gs, mod.symmetric)
        return SparseQLinear.from_weight(w, None, backend=mod.backend)
    raise TypeError(f"cannot shard a {type(mod).__name__}")


# --------------------------------------------------------------------------- the sharded module
class ShardedLinear(nn.Module):
    """One rank's shard of a tensor-parallel linear layer (built by :func:`shard_module`).

    ``local`` is an ordinary sparsekit module (or ``nn.Linear``) over the local packed
    tensors; ``bounds`` are every rank's ``(lo, hi)`` along the split dimension
    (``N`` for colwise, ``K`` for rowwise).  Rowwise layers hold the ``bias`` here
    (added once after the all-reduce).  Its state_dict is the local shard's.
    """

    def __init__(self, local: nn.Module, style: str, group, bounds: list, in_features: int, out_features: int,
                 gather_output: bool = False, input_is_sharded: bool = True, bias: Optional[torch.Tensor] = None,
                 gather_index: Optional[torch.Tensor] = None, global_importance: bool = False):
        super().__init__()
        self.local = local
        self.style = style
        self.group = group
        self.bounds = [tuple(b) for b in bounds]
        self.rank = _comm.rank(group)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.gather_output = bool(gather_output)
        self.input_is_sharded = bool(input_is_sharded)
        self.global_importance = bool(global_importance)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        else:
            self.register_parameter("bias", None)
        self.register_buffer("gather_index", gather_index, persistent=False)

    @property
    def local_range(self) -> tuple:
        return self.bounds[self.rank]

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.style == "colwise":
            y = self.local(_comm.copy_to_parallel(x, self.group), **kwargs)
            if self.gather_output:
                y = _comm.gather_last_dim(y, self.group, [hi - lo for lo, hi in self.bounds])
            return y
        lo, hi = self.local_range
        if not self.input_is_sharded:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"rowwise shard with a replicated input expects {self.in_features} features in "
                                 f"the last dim, got {x.shape[-1]}")
            x = x.index_select(-1, self.gather_index) if self.gather_index is not None else x[..., lo:hi]
        elif x.shape[-1] != hi - lo:
            raise ValueError(f"rowwise shard of rank {self.rank} expects its slice of the input: {hi - lo} features "
                             f"(input features {lo}..{hi - 1} of {self.in_features}), got {x.shape[-1]}")
        if self.global_importance and kwargs.get("importance") is None:
            # act_bits="mixed": choose the 8-bit tokens by the norm of the whole token, as unsharded
            sq = torch.linalg.vector_norm(x.detach().float(), dim=-1).pow(2)
            kwargs["importance"] = _comm.all_reduce_sum(sq, self.group).sqrt()
        y = _comm.reduce_from_parallel(self.local(x, **kwargs), self.group)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        lo, hi = self.local_range
        dim = "out" if self.style == "colwise" else "in"
        extra = (f", gather_output={self.gather_output}" if self.style == "colwise"
                 else f", input_is_sharded={self.input_is_sharded}")
        return (f"style={self.style!r}, rank={self.rank}/{len(self.bounds)}, {dim}_features[{lo}:{hi}] of "
                f"{self.in_features if dim == 'in' else self.out_features}{extra}")


def shard_module(module: nn.Module, mesh_or_group=None, style: str = "colwise", *, gather_output: bool = False,
                 input_is_sharded: bool = True, splits: Optional[Sequence[int]] = None,
                 multiple_of: int = 1, name: Optional[str] = None) -> ShardedLinear:
    """This rank's tensor-parallel shard of ``module`` (see the module docstring).

    ``module``: an ``nn.Linear``, :class:`~sparsekit.nn.SparseLinear` (2:4, float or int8),
    :class:`~sparsekit.nn.BlockSparseLinear`, :class:`~sparsekit.nn.QLinear` (W4A16, W4A8,
    W8A8, mixed; with ``input_scale`` / ``in_perm``) or :class:`~sparsekit.nn.SparseQLinear`,
    identical on every rank (e.g. loaded from the same checkpoint).  ``mesh_or_group``: a 1-D
    ``DeviceMesh``, a ``ProcessGroup`` or None (the default group).  ``style``: ``"colwise"``
    or ``"rowwise"``.  ``gather_output`` (colwise): all-gather the full output.
    ``input_is_sharded`` (rowwise): the input holds this rank's input features only (default)
    or all of them.  ``splits``: explicit per-rank sizes of the split dimension.
    ``multiple_of``: also put the default split points at multiples of this (e.g. a colwise
    layer whose output feeds a rowwise 2:4 layer: ``multiple_of=8``, so that both cut the
    hidden features at the same points).  ``name``: the module's name in error messages.
    """
    label = name or type(module).__name__
    if style not in STYLES:
        raise ValueError(f"{label}: style must be one of {STYLES}, got {style!r}")
    if isinstance(module, ShardedLinear):
        raise ValueError(f"{label} is already sharded ({module.style})")
    if not isinstance(module, _SUPPORTED):
        raise TypeError(f"{label}: shard_module supports {', '.join(t.__name__ for t in _SUPPORTED)}; got "
                        f"{type(module).__name__}")
    group = _comm.resolve_group(mesh_or_group)
    world, r = _comm.world_size(group), _comm.rank(group)
    unit, why = _constraint(module, style)
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"{label}: multiple_of must be a positive int, got {multiple_of!r}")
    if multiple_of > 1:
        lcm = unit * multiple_of // math.gcd(unit, multiple_of)
        why = f"{why}; multiple_of={multiple_of}" if why else f"multiple_of={multiple_of}"
        unit = lcm
    if style == "colwise":
        bounds = shard_bounds(module.out_features, world, unit, name=label, dim="N (out_features)", constraint=why,
                              splits=splits)
        lo, hi = bounds[r]
        local = _local_colwise(module, lo, hi)
        return ShardedLinear(local, style, group, bounds, module.in_features, module.out_features,
                             gather_output=gather_output)
    bounds = shard_bounds(module.in_features, world, unit, name=label, dim="K (in_features)", constraint=why,
                          splits=splits)
    lo, hi = bounds[r]
    gather = None
    if isinstance(module, QLinear) and module.in_perm is not None:
        if input_is_sharded:
            for a, b in bounds:
                got = torch.sort(module.in_perm[a:b]).values
                if not torch.equal(got, torch.arange(a, b, device=got.device)):
                    raise ValueError(
                        f"{label}: rowwise sharding of an act-order int4 weight (in_perm) cuts it by packed position "
                        f"to keep groups whole, and the packed columns {a}..{b - 1} hold input features outside the "
                        f"input shard {a}..{b - 1}; pass input_is_sharded=False (each rank gathers its packed "
                        "columns from the full input) or quantize without act_order")
        else:
            gather = module.in_perm[lo:hi].clone()
    bias = None if module.bias is None else module.bias.detach()
    if bias is not None and isinstance(module, (QLinear, SparseQLinear)):
        bias = bias.to(module.dtype if isinstance(module, QLinear) else module.scales.dtype)
    local = _local_rowwise(module, lo, hi, gather)
    sharded = ShardedLinear(local, style, group, bounds, module.in_features, module.out_features,
                            input_is_sharded=input_is_sharded, bias=bias, gather_index=gather,
                            global_importance=isinstance(module, QLinear) and module.act_bits == "mixed")
    if module.bias is not None:
        sharded.bias.requires_grad_(module.bias.requires_grad)
    return sharded


# --------------------------------------------------------------------------- plans
def _style_of(spec, key: str) -> dict:
    """A plan entry -> shard_module keywords.  Strings, dicts, or torch's ColwiseParallel /
    RowwiseParallel objects (their input/output layouts mapped to gather_output /
    input_is_sharded)."""
    if isinstance(spec, str):
        if spec not in STYLES:
            raise ValueError(f"plan[{key!r}]: style must be one of {STYLES}, got {spec!r}")
        return {"style": spec}
    if isinstance(spec, dict):
        kw = dict(spec)
        if kw.get("style") not in STYLES:
            raise ValueError(f"plan[{key!r}]: a dict entry needs style in {STYLES}, got {kw.get('style')!r}")
        unknown = set(kw) - {"style", "gather_output", "input_is_sharded", "splits", "multiple_of"}
        if unknown:
            raise ValueError(f"plan[{key!r}]: unknown keys {sorted(unknown)}")
        return kw
    try:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    except ImportError:         # pragma: no cover
        ColwiseParallel = RowwiseParallel = None
    if ColwiseParallel is not None and isinstance(spec, ColwiseParallel):
        if not isinstance(spec.input_layouts[0], Replicate):
            raise ValueError(f"plan[{key!r}]: ColwiseParallel with input_layouts={spec.input_layouts} is not "
                             "supported (the input of a colwise shard is replicated)")
        out = spec.output_layouts[0]
        if not isinstance(out, (Replicate, Shard)) or (isinstance(out, Shard) and out.dim != -1):
            raise ValueError(f"plan[{key!r}]: ColwiseParallel output_layouts={spec.output_layouts} is not supported "
                             "(Shard(-1) or Replicate())")
        return {"style": "colwise", "gather_output": isinstance(out, Replicate)}
    if RowwiseParallel is not None and isinstance(spec, RowwiseParallel):
        out = spec.output_layouts[0]
        if not isinstance(out, Replicate):
            raise ValueError(f"plan[{key!r}]: RowwiseParallel output_layouts={spec.output_layouts} is not supported "
                             "(the output of a rowwise shard is all-reduced: Replicate())")
        inp = spec.input_layouts[0]
        if isinstance(inp, Shard) and inp.dim != -1:
            raise ValueError(f"plan[{key!r}]: RowwiseParallel input_layouts={spec.input_layouts} is not supported "
                             "(Shard(-1) or Replicate())")
        return {"style": "rowwise", "input_is_sharded": isinstance(inp, Shard)}
    raise TypeError(f"plan[{key!r}] must be 'colwise', 'rowwise', a dict or a ColwiseParallel / RowwiseParallel, "
                    f"got {type(spec).__name__}")


def _match(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def parallelize(model: nn.Module, plan: dict, mesh_or_group=None) -> nn.Module:
    """Shard ``model``'s layers in place by ``plan`` and return the model.

    ``plan``: ``{name pattern: style}``, the pattern an fnmatch glob over qualified module
    names (``"layers.*.mlp.up_proj"``) or ``"re:<regex>"``; the style ``"colwise"``,
    ``"rowwise"``, a dict of :func:`shard_module` keywords (``{"style": "colwise",
    "gather_output": True}``) or torch's ``ColwiseParallel()`` / ``RowwiseParallel()``
    (``output_layouts=Replicate()`` -> ``gather_output=True``; ``input_layouts=Replicate()``
    -> ``input_is_sharded=False``).  A module matched by two patterns, or a pattern that
    matches nothing, raises ``ValueError``.  Code that depends on the local widths (e.g.
    an attention block's head count) must read them from the sharded layers.
    """
    if not isinstance(plan, dict) or not plan:
        raise TypeError(f"plan must be a non-empty dict {{name pattern: style}}, got {plan!r}")
    group = _comm.resolve_group(mesh_or_group)
    specs = {k: _style_of(v, k) for k, v in plan.items()}
    chosen, used = {}, {k: 0 for k in plan}
    for name, mod in model.named_modules():
        if not name:
            continue
        hits = [k for k in plan if _match(k, name)]
        if not hits:
            continue
        if len(hits) > 1:
            raise ValueError(f"module {name!r} matches several plan entries: {hits}")
        chosen[name] = (mod, specs[hits[0]])
        used[hits[0]] += 1
    unused = [k for k, c in used.items() if c == 0]
    if unused:
        raise ValueError(f"plan entries {unused} match no module of the model")
    for name, (mod, kw) in chosen.items():
        sharded = shard_module(mod, group, name=name, **kw)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, sharded)
    return model
