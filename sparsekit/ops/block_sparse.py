"""Block-sparse linear: ``y = x @ W^T + bias`` with a :class:`BlockSparseWeight`.

Three ``torch.library`` custom ops (with fake implementations, so they trace
under ``torch.compile``):

* ``sparsekit::block_sparse_linear``       forward, with autograd
* ``sparsekit::block_sparse_grad_input``   dX = dY @ W
* ``sparsekit::block_sparse_grad_blocks``  dBlocks = (dY^T @ X) on the kept blocks

The weight's gradient exists only for the stored blocks, so the block
pattern is preserved through fine-tuning.  Backends: ``triton`` (CUDA
tensors), ``interpret`` (the same kernels on CPU tensors) and ``reference``
(dense PyTorch math); the backward runs on the forward's backend.

NaN/Inf: dropped blocks are structurally absent -- never read, as in any
sparse matmul -- so a NaN/Inf in ``x`` reaches exactly the outputs whose kept
blocks read its column (``y[m, n]`` is the IEEE sum over the kept blocks of
block-row ``n``), on every backend.  With no dropped blocks this is dense
``F.linear``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import testing as _testing
from ..formats._validate import validate_block_sparse
from ..formats.block_sparse import BLOCK_SIDES, BlockSparseWeight, block_rows, dense_from_blocks
from ._checks import as_contiguous, check_bias, check_features, check_x, validate_once
from . import dispatch
from ._dense import cached_weight, cpu_weight, dense_linear

__all__ = ["block_sparse_linear", "block_sparse_linear_packed"]

OP = "block_sparse_linear"
dispatch.register(OP, ("triton", "interpret", "dense", "reference"))
_BACKWARD_BACKEND = {"triton": "triton", "interpret": "interpret", "reference": "reference", "dense": "reference"}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels(backend: str):
    from .. import kernels  # sparsekit.kernels

    return kernels.load("block_sparse", interpret=(backend == "interpret"))


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _dense(blocks, crow, col, out_features, in_features):
    return dense_from_blocks(blocks, crow, col, (out_features, in_features))


def _structural_rows(x2, blocks, crow, col, out_features, in_features):
    """``y`` rows computed over the kept blocks only (no 0 * Inf from dropped blocks)."""
    m = x2.shape[0]
    nnzb, bm, bk = blocks.shape
    nb, kb = crow.shape[0] - 1, -(-in_features // bk)
    xp = F.pad(x2, (0, kb * bk - in_features)).reshape(m, kb, bk)
    acc = torch.zeros(m, nb, bm, dtype=torch.float64 if x2.dtype == torch.float64 else torch.float32,
                      device=x2.device)
    if nnzb:
        part = torch.einsum("bij,mbj->mbi", blocks.to(acc.dtype), xp[:, col.long()].to(acc.dtype))
        acc.index_add_(1, block_rows(crow, nnzb), part)
    return acc.reshape(m, nb * bm)[:, :out_features]


def dense_forward(x, blocks, crow, col, out_features, in_features, bias):
    """The ``dense`` backend's forward (the expansion cached per tensor version; float32 math on CPU)."""
    return _reference_forward(x, blocks, crow, col, out_features, in_features, bias, cached=True)


def block_dense_f32(blocks, crow, col, out_features, in_features) -> torch.Tensor:
    """The dense ``(N, K)`` weight as the ``dense`` backend holds it (float32 on CPU), uncached."""
    return cpu_weight(_dense(blocks.detach(), crow, col, out_features, in_features))


def _reference_forward(x, blocks, crow, col, out_features, in_features, bias, cached: bool = False):
    if cached:      # the dense backend: the expansion kept per weight version, float32 math on CPU
        w = cached_weight(("block", out_features, in_features), (blocks, crow, col),
                          lambda: block_dense_f32(blocks, crow, col, out_features, in_features))
        y = dense_linear(x, w, bias)
    else:
        w = _dense(blocks, crow, col, out_features, in_features)
        y = F.linear(x, w, bias)
    return structural_fixup(y, x, blocks, crow, col, out_features, in_features, bias)


def structural_fixup(y, x, blocks, crow, col, out_features, in_features, bias):
    """``y`` (the dense math's result) with the rows of non-finite inputs recomputed over the kept blocks
    only, as the kernels compute them (dense math multiplies dropped blocks too: 0 * Inf = NaN)."""
    if x.numel() == 0 or blocks.shape[0] == _full_pattern_blocks(crow, in_features, blocks):
        return y.contiguous()
    if math.isfinite(float(y.sum(dtype=torch.float32))):
        # an Inf/NaN input always reaches the output of the dense math (Inf * w, or 0 * Inf = NaN), so a
        # finite output means a finite input: nothing to redo (one reduction over the output per call; a sum
        # that overflows only sends the call to the exact row check below)
        return y.contiguous()
    x2 = x.reshape(-1, in_features)
    bad = ~torch.isfinite(x2).all(dim=-1)
    if bool(bad.any()):
        # dense math multiplies dropped (zero) blocks too: 0 * Inf = NaN where the kernels read nothing
        rows = _structural_rows(x2[bad], blocks, crow, col, out_features, in_features)
        if bias is not None:
            rows = rows + bias.to(rows.dtype)
        y2 = y.reshape(-1, out_features).clone()
        y2[bad] = rows.to(y.dtype)
        y = y2.reshape(y.shape)
    return y.contiguous()


def _full_pattern_blocks(crow, in_features, blocks):
    """The number of blocks of a fully dense pattern (no dropped blocks)."""
    return (crow.shape[0] - 1) * -(-in_features // blocks.shape[2])


# ---------------------------------------------------------------------- forward
@torch.library.custom_op("sparsekit::block_sparse_linear", mutates_args=())
def _block_sparse_linear(x: torch.Tensor, blocks: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                         tcol_ptr: torch.Tensor, trow: torch.Tensor, tblk: torch.Tensor,
                         out_features: int, in_features: int, bias: Optional[torch.Tensor],
                         backend: str) -> torch.Tensor:
    n = out_features
    lead = x.shape[:-1]
    if backend in ("reference", "dense"):
        return _reference_forward(x, blocks, crow, col, out_features, in_features, bias, backend == "dense")
    x2 = _as_2d(x)
    blocks, crow, col, bias = (as_contiguous(t) for t in (blocks, crow, col, bias))
    out = _testing.alloc_output((x2.shape[0], n), x.dtype, x.device)
    if out.numel():
        if in_features == 0 or blocks.shape[0] == 0:
            out.zero_()
            if bias is not None:
                out += bias
        else:
            _kernels(backend).block_sparse_linear(x2, blocks, crow, col, n, in_features, bias, out)
    return out.reshape(*lead, n)


@_block_sparse_linear.register_fake
def _(x, blocks, crow, col, tcol_ptr, trow, tblk, out_features, in_features, bias, backend):
    return x.new_empty((*x.shape[:-1], out_features))


# ---------------------------------------------------------------------- backward ops
@torch.library.custom_op("sparsekit::block_sparse_grad_input", mutates_args=())
def _block_sparse_grad_input(grad: torch.Tensor, blocks: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                             tcol_ptr: torch.Tensor, trow: torch.Tensor, tblk: torch.Tensor,
                             out_features: int, in_features: int, backend: str) -> torch.Tensor:
    lead = grad.shape[:-1]
    if backend == "reference":
        w = _dense(blocks, crow, col, out_features, in_features)
        return (grad @ w).contiguous()
    g2 = _as_2d(grad)
    blocks, tcol_ptr, trow, tblk = (as_contiguous(t) for t in (blocks, tcol_ptr, trow, tblk))
    out = _testing.alloc_output((g2.shape[0], in_features), grad.dtype, grad.device)
    if out.numel():
        if out_features == 0 or blocks.shape[0] == 0:
            out.zero_()
        else:
            _kernels(backend).block_sparse_grad_input(g2, blocks, tcol_ptr, trow, tblk, in_features, out)
    return out.reshape(*lead, in_features)


@_block_sparse_grad_input.register_fake
def _(grad, blocks, crow, col, tcol_ptr, trow, tblk, out_features, in_features, backend):
    return grad.new_empty((*grad.shape[:-1], in_features))


@torch.library.custom_op("sparsekit::block_sparse_grad_blocks", mutates_args=())
def _block_sparse_grad_blocks(grad: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                              tcol_ptr: torch.Tensor, trow: torch.Tensor, tblk: torch.Tensor,
                              bm: int, bk: int, backend: str) -> torch.Tensor:
    nnzb = col.shape[0]
    g2 = _as_2d(grad)
    x2 = _as_2d(x)
    n, k = g2.shape[1], x2.shape[1]
    if backend == "reference":
        nb, kb = crow.shape[0] - 1, tcol_ptr.shape[0] - 1
        dw = g2.transpose(0, 1) @ x2
        dw = F.pad(dw, (0, kb * bk - k, 0, nb * bm - n))
        tiles = dw.reshape(nb, bm, kb, bk).permute(0, 2, 1, 3)
        return tiles[block_rows(crow, nnzb), col.to(torch.int64)].contiguous()
    col, trow, tblk = (as_contiguous(t) for t in (col, trow, tblk))
    out = _testing.alloc_output((nnzb, bm, bk), grad.dtype, grad.device)
    if out.numel():
        if g2.shape[0] == 0:
            out.zero_()
        else:
            _kernels(backend).block_sparse_grad_blocks(g2, x2, col, trow, tblk, n, k, out)
    return out


@_block_sparse_grad_blocks.register_fake
def _(grad, x, crow, col, tcol_ptr, trow, tblk, bm, bk, backend):
    return grad.new_empty((col.shape[0], bm, bk))


# ---------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, blocks, crow, col, tcol_ptr, trow, tblk, out_features, in_features, bias, backend = inputs
    ctx.save_for_backward(x, blocks, crow, col, tcol_ptr, trow, tblk)
    ctx.out_features = out_features
    ctx.in_features = in_features
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, blocks, crow, col, tcol_ptr, trow, tblk = ctx.saved_tensors
    backend = _BACKWARD_BACKEND[ctx.backend]
    gx = gblk = gb = None
    if ctx.needs_input_grad[0]:
        gx = _block_sparse_grad_input(grad, blocks, crow, col, tcol_ptr, trow, tblk,
                                      ctx.out_features, ctx.in_features, backend)
    if ctx.needs_input_grad[1]:
        gblk = _block_sparse_grad_blocks(grad, x, crow, col, tcol_ptr, trow, tblk,
                                         blocks.shape[1], blocks.shape[2], backend)
    if ctx.has_bias and ctx.needs_input_grad[9]:
        gb = _as_2d(grad).sum(0)
    return gx, gblk, None, None, None, None, None, None, None, gb, None


_block_sparse_linear.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------- public API
def _check(x, blocks, crow, col, tcol_ptr, trow, tblk, out_features, in_features, bias):
    """Shape / dtype / device checks (no data-dependent checks: those would sync the GPU;
    the contents are validated once per tensor version, see :func:`block_sparse_linear_packed`)."""
    if not isinstance(blocks, torch.Tensor):
        raise TypeError(f"blocks must be a torch.Tensor, got {type(blocks).__name__}")
    check_features("out_features", out_features)
    check_features("in_features", in_features)
    check_x(x, in_features)
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.dtype != blocks.dtype:
        raise TypeError(f"x dtype {x.dtype} does not match the weight dtype {blocks.dtype}; cast one of them")
    if x.dtype not in _DTYPES:
        raise TypeError(f"block_sparse_linear supports float16, bfloat16 and float32, got {x.dtype}")
    if x.device != blocks.device:
        raise ValueError(f"x is on {x.device} but the weight is on {blocks.device}")
    if blocks.dim() != 3:
        raise ValueError(f"blocks must be 3-D (nnzb, bm, bk), got shape {tuple(blocks.shape)}")
    nnzb, bm, bk = blocks.shape
    if bm not in BLOCK_SIDES or bk not in BLOCK_SIDES:
        raise ValueError(f"block size {(bm, bk)} is not supported: each side must be one of {BLOCK_SIDES}")
    nb, kb = -(-out_features // bm), -(-in_features // bk)
    want = {"crow": (crow, nb + 1), "col": (col, nnzb), "tcol_ptr": (tcol_ptr, kb + 1),
            "trow": (trow, nnzb), "tblk": (tblk, nnzb)}
    for name, (t, size) in want.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != size:
            raise ValueError(f"{name} must have shape ({size},) for a ({out_features}, {in_features}) weight with "
                             f"block size {(bm, bk)} and {nnzb} blocks, got {tuple(t.shape)}")
        if t.device != blocks.device:
            raise ValueError(f"{name} is on {t.device} but the blocks are on {blocks.device}")
    check_bias(bias, out_features, x)


def block_sparse_linear_packed(x: torch.Tensor, blocks: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                               tcol_ptr: torch.Tensor, trow: torch.Tensor, tblk: torch.Tensor,
                               out_features: int, in_features: int, bias: Optional[torch.Tensor] = None, *,
                               backend: Optional[str] = None, validate: bool = True) -> torch.Tensor:
    """:func:`block_sparse_linear` on the raw tensors (what modules hold as parameters/buffers).

    The block size is ``blocks.shape[1:]``; the index tensors are those of
    :class:`BlockSparseWeight` (``crow, col, tcol_ptr, trow, tblk``, int32).  Shapes, dtypes and
    devices are always checked; ``validate=True`` also checks the index contents and the padding
    (:func:`sparsekit.formats._validate.validate_block_sparse`) once per tensor version (later
    calls on the same unmodified tensors skip it).  ``validate=False`` trusts them -- for tensors
    that come from a validated :class:`BlockSparseWeight` or module.
    """
    _check(x, blocks, crow, col, tcol_ptr, trow, tblk, out_features, in_features, bias)
    if validate:
        shape, bsz = (out_features, in_features), tuple(blocks.shape[1:])
        validate_once((crow, col, tcol_ptr, trow, tblk, blocks), ("block", shape),
                      lambda: validate_block_sparse(blocks, crow, col, tcol_ptr, trow, tblk, shape, bsz,
                                                    owner="block_sparse_linear_packed"))
    m = x.numel() // in_features if in_features else x.numel()
    chosen = dispatch.resolve(OP, x.device, backend, m)
    return _block_sparse_linear(x, blocks, crow, col, tcol_ptr, trow, tblk, out_features, in_features,
                                bias, chosen)


def block_sparse_linear(x: torch.Tensor, weight: BlockSparseWeight, bias: Optional[torch.Tensor] = None, *,
                        backend: Optional[str] = None) -> torch.Tensor:
    """``y = x @ W^T (+ bias)`` for a :class:`BlockSparseWeight` ``W`` of shape (N, K).

    ``x`` is ``(..., K)`` in the weight's dtype (float16, bfloat16 or float32)
    with any strides; the result is ``(..., N)``.  ``backend`` forces one of
    ``triton``, ``interpret``, ``reference`` (default: chosen per device and
    M, or ``SPARSEKIT_BACKEND``).  Differentiable in ``x``, the stored blocks
    and ``bias``.
    """
    if not isinstance(weight, BlockSparseWeight):
        raise TypeError(f"weight must be a BlockSparseWeight, got {type(weight).__name__} "
                        "(pack a dense weight with BlockSparseWeight.from_dense)")
    return block_sparse_linear_packed(x, weight.blocks, *weight.index_tensors(), weight.out_features,
                                      weight.in_features, bias, backend=backend,
                                      validate=False)      # validated when the weight was built
