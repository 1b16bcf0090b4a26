"""Block-sparse (BSR-like) weight container.

A weight ``W`` of shape ``(N, K)`` (out_features, in_features) is cut into
``(bm, bk)`` blocks; ``N`` is zero-padded up to ``NB * bm`` and ``K`` up to
``KB * bk`` (``NB = ceil(N / bm)``, ``KB = ceil(K / bk)``).  Only kept blocks
are stored:

* ``blocks``   ``(nnzb, bm, bk)`` in the weight's dtype, block-row major
  (all kept blocks of block-row 0, then row 1, ...), each block row-major.
* ``crow``     int32 ``(NB + 1,)``: the kept blocks of block-row ``r`` are
  ``blocks[crow[r]:crow[r + 1]]``.
* ``col``      int32 ``(nnzb,)``: block-column of each kept block, strictly
  increasing within a block-row.
* the transposed (block-column major) index, used by the input-gradient
  kernel: ``tcol_ptr`` int32 ``(KB + 1,)``; entries ``tcol_ptr[c]:tcol_ptr[c+1]``
  list the kept blocks of block-column ``c`` in increasing block-row order,
  as ``trow`` (their block-row) and ``tblk`` (their index into ``blocks``).

Whole empty block-rows and ``nnzb == 0`` are allowed.  Block sides are 16,
32, 64 or 128 (the tile sizes the kernels use for ``tl.dot``); non-square
blocks are fine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["BlockSparseWeight", "block_grid", "keep_count", "check_block_size", "BLOCK_SIDES"]

BLOCK_SIDES = (16, 32, 64, 128)


def check_block_size(block_size) -> tuple:
    """Normalize ``block_size`` (an int for square blocks, or ``(bm, bk)``)."""
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    try:
        vals = tuple(block_size)
        if len(vals) != 2 or any(isinstance(v, bool) or int(v) != v for v in vals):
            raise ValueError
        bm, bk = (int(v) for v in vals)
    except (TypeError, ValueError):
        raise ValueError(f"block_size must be an int or a pair (bm, bk), got {block_size!r}") from None
    if bm not in BLOCK_SIDES or bk not in BLOCK_SIDES:
        raise ValueError(f"block_size sides must each be one of {BLOCK_SIDES}, got {(bm, bk)}")
    return bm, bk


def block_grid(shape, block_size) -> tuple:
    """``(NB, KB) = (ceil(N / bm), ceil(K / bk))`` for an ``(N, K)`` weight."""
    try:
        n, k = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a pair (out_features, in_features), got {shape!r}") from None
    if n < 0 or k < 0:
        raise ValueError(f"shape must be non-negative, got {(n, k)}")
    bm, bk = check_block_size(block_size)
    return -(-n // bm), -(-k // bk)


def keep_count(nblocks: int, sparsity: float) -> int:
    """Blocks kept at ``sparsity``: ``round((1 - sparsity) * nblocks)``, halves rounded up.

    The one rounding rule used everywhere in sparsekit (magnitude packing,
    block pruning, allocation), so a per-layer sparsity ``1 - k / nblocks``
    maps back to exactly ``k`` blocks.
    """
    s = float(sparsity)
    if not (0.0 <= s <= 1.0):
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    # the small epsilon absorbs float error in (1 - (1 - k/n)) * n
    return int(min(nblocks, max(0, math.floor((1.0 - s) * nblocks + 0.5 + 1e-9))))


def transpose_index(crow: torch.Tensor, col: torch.Tensor, n_block_cols: int):
    """``(tcol_ptr, trow, tblk)`` (int32) from the block-row index ``crow``/``col``."""
    dev = col.device
    nnzb = col.numel()
    nb = crow.numel() - 1
    col64 = col.to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(nb, device=dev), (crow[1:] - crow[:-1]).to(torch.int64),
                                   output_size=nnzb)
    # order by (column, row); within a row columns are unique, so the key is unique
    key = col64 * max(nb, 1) + rows
    tblk = torch.argsort(key)
    trow = rows[tblk]
    counts = torch.bincount(col64, minlength=n_block_cols)[:n_block_cols]
    tcol_ptr = torch.zeros(n_block_cols + 1, dtype=torch.int64, device=dev)
    tcol_ptr[1:] = torch.cumsum(counts, 0)
    return tcol_ptr.to(torch.int32), trow.to(torch.int32), tblk.to(torch.int32)


def block_rows(crow: torch.Tensor, nnzb: int) -> torch.Tensor:
    """int64 ``(nnzb,)``: the block-row of each stored block."""
    nb = crow.numel() - 1
    return torch.repeat_interleave(torch.arange(nb, device=crow.device), (crow[1:] - crow[:-1]).to(torch.int64),
                                   output_size=nnzb)


def dense_from_blocks(blocks: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, shape) -> torch.Tensor:
    """Dense ``(N, K)`` weight from the stored blocks (zeros elsewhere)."""
    n, k = (int(s) for s in shape)
    nnzb, bm, bk = blocks.shape
    nb, kb = crow.numel() - 1, -(-k // bk)
    grid = torch.zeros(nb, kb, bm, bk, dtype=blocks.dtype, device=blocks.device)
    if nnzb:
        grid[block_rows(crow, nnzb), col.to(torch.int64)] = blocks
    return grid.permute(0, 2, 1, 3).reshape(nb * bm, kb * bk)[:n, :k].contiguous()


def _pad_to_blocks(w: torch.Tensor, bm: int, bk: int) -> torch.Tensor:
    n, k = w.shape
    nb, kb = -(-n // bm), -(-k // bk)
    if (nb * bm, kb * bk) != (n, k):
        w = torch.nn.functional.pad(w, (0, kb * bk - k, 0, nb * bm - n))
    return w.reshape(nb, bm, kb, bk).permute(0, 2, 1, 3)  # (NB, KB, bm, bk) view


@dataclass
class BlockSparseWeight:
    """A block-sparse weight: kept ``(bm, bk)`` blocks plus block-row and block-column indices."""

    blocks: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor
    tcol_ptr: torch.Tensor
    trow: torch.Tensor
    tblk: torch.Tensor
    shape: tuple
    block_size: tuple

    def __post_init__(self):
        from ._validate import as_contiguous, check_shape_pair

        self.shape = check_shape_pair(self.shape, "BlockSparseWeight")
        self.block_size = check_block_size(self.block_size)
        self.validate(check_values=False)
        for name in ("blocks", "crow", "col", "tcol_ptr", "trow", "tblk"):
            setattr(self, name, as_contiguous(getattr(self, name)))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self, check_values: bool = True) -> None:
        """Check shapes, dtypes and devices; with ``check_values`` also the contents in one pass:
        ``crow`` starts at 0, is non-decreasing and ends at nnzb; ``col`` is in range and strictly
        increasing within a block-row; the transposed index (``tcol_ptr``, ``trow``, ``tblk``) is the
        one ``crow``/``col`` define; the zero padding of the edge blocks is finite.  See
        :func:`sparsekit.formats._validate.validate_block_sparse`."""
        from ._validate import validate_block_sparse

        validate_block_sparse(self.blocks, self.crow, self.col, self.tcol_ptr, self.trow, self.tblk, self.shape,
                              self.block_size, contents=check_values)

    # ------------------------------------------------------------- properties
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def grid(self) -> tuple:
        """``(NB, KB)``."""
        return block_grid(self.shape, self.block_size)

    @property
    def nnzb(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def density(self) -> float:
        """Fraction of the ``NB x KB`` blocks that are stored (0.0 for an empty grid)."""
        nb, kb = self.grid
        return self.nnzb / (nb * kb) if nb * kb else 0.0

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks.dtype

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def index_tensors(self) -> tuple:
        """``(crow, col, tcol_ptr, trow, tblk)``, the order the ops take them in."""
        return self.crow, self.col, self.tcol_ptr, self.trow, self.tblk

    def nbytes(self) -> int:
        total = self.blocks.numel() * self.blocks.element_size()
        for t in self.index_tensors():
            total += t.numel() * t.element_size()
        return total

    def to(self, *args, **kwargs) -> "BlockSparseWeight":
        """Move/cast like ``Tensor.to``; the index tensors keep dtype int32."""
        blocks = self.blocks.to(*args, **kwargs)
        idx = [t.to(device=blocks.device) for t in self.index_tensors()]
        out = BlockSparseWeight.__new__(BlockSparseWeight)
        out.blocks, (out.crow, out.col, out.tcol_ptr, out.trow, out.tblk) = blocks, idx
        out.shape, out.block_size = self.shape, self.block_size
        out.validate(check_values=False)   # contents were checked when self was built
        if blocks.dtype != self.blocks.dtype and blocks.numel() and blocks.device.type != "meta":
            from ._validate import _check_block_padding

            nb, kb = out.grid
            # a narrowing cast can overflow finite padding values to inf
            _check_block_padding(blocks, out.crow, out.col, *self.shape, *self.block_size, nb, kb,
                                 "BlockSparseWeight")
        return out

    # ------------------------------------------------------------- conversion
    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, shape,
                    block_size=None) -> "BlockSparseWeight":
        """Build from ``blocks``/``crow``/``col``, computing the transposed index.

        ``crow`` / ``col`` may have any integer dtype; their contents are checked
        (ValueError naming the bad entry) before anything is derived from them."""
        from ._validate import check_block_index, check_shape_pair, has_data

        if not isinstance(blocks, torch.Tensor):
            raise TypeError(f"blocks must be a torch.Tensor, got {type(blocks).__name__}")
        if blocks.dim() != 3:
            raise ValueError(f"blocks must be 3-D (nnzb, bm, bk), got shape {tuple(blocks.shape)}")
        if block_size is None:
            block_size = tuple(blocks.shape[1:])
        bm, bk = check_block_size(block_size)
        n, k = check_shape_pair(shape, "BlockSparseWeight")
        nb, kb = -(-n // bm), -(-k // bk)
        nnzb = blocks.shape[0]
        for name, t, size in (("crow", crow, nb + 1), ("col", col, nnzb)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
            if t.dim() != 1 or t.numel() != size:
                raise ValueError(f"{name} must have shape ({size},) for a {(n, k)} weight with block_size "
                                 f"{(bm, bk)} and {nnzb} blocks, got {tuple(t.shape)}")
            if t.device != blocks.device:
                raise ValueError(f"{name} is on {t.device} but blocks are on {blocks.device}")
        if has_data(crow, col):
            check_block_index(crow, col, n, k, (bm, bk), nnzb)
            crow = crow.to(torch.int32)
            col = col.to(torch.int32)
            tcol_ptr, trow, tblk = transpose_index(crow, col, kb)
        else:   # meta tensors: no data to derive the transposed index from
            crow, col = crow.to(torch.int32), col.to(torch.int32)
            tcol_ptr = torch.empty(kb + 1, dtype=torch.int32, device=blocks.device)
            trow = torch.empty(nnzb, dtype=torch.int32, device=blocks.device)
            tblk = torch.empty(nnzb, dtype=torch.int32, device=blocks.device)
        return cls(blocks, crow, col, tcol_ptr, trow, tblk, (n, k), (bm, bk))

    @classmethod
    def from_dense(cls, weight: torch.Tensor, block_size=(32, 32),
                   block_mask: torch.Tensor | None = None) -> "BlockSparseWeight":
        """Pack a dense ``(N, K)`` weight.

        With ``block_mask`` (bool ``(ceil(N/bm), ceil(K/bk))``) exactly those
        blocks are kept (values outside them are dropped); without it every
        block holding any non-zero is kept.
        """
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got {weight.dtype}")
        bm, bk = check_block_size(block_size)
        w = weight.detach()
        if w.device.type == "meta":
            raise ValueError("BlockSparseWeight.from_dense needs the weight's data (the kept blocks depend on it); "
                             "got a tensor on the meta device")
        n, k = w.shape
        nb, kb = -(-n // bm), -(-k // bk)
        tiles = _pad_to_blocks(w, bm, bk)
        if block_mask is None:
            keep = (tiles != 0).flatten(2).any(-1)
        else:
            if not isinstance(block_mask, torch.Tensor):
                raise TypeError(f"block_mask must be a bool tensor, got {type(block_mask).__name__}")
            if tuple(block_mask.shape) != (nb, kb):
                raise ValueError(f"block_mask must have shape {(nb, kb)} (block grid of a {(n, k)} weight with "
                                 f"block_size {(bm, bk)}), got {tuple(block_mask.shape)}")
            if block_mask.dtype != torch.bool:
                raise TypeError(f"block_mask must be bool, got {block_mask.dtype}")
            keep = block_mask.to(device=w.device)
        rows, cols = keep.nonzero(as_tuple=True)          # row-major order: sorted by (row, col)
        blocks = tiles[rows, cols].contiguous()
        counts = torch.bincount(rows, minlength=nb)[:nb] if nb else rows.new_zeros(0)
        crow = torch.zeros(nb + 1, dtype=torch.int64, device=w.device)
        crow[1:] = torch.cumsum(counts, 0)
        return cls.from_blocks(blocks.reshape(-1, bm, bk), crow, cols, (n, k), (bm, bk))

    @staticmethod
    def magnitude_block_mask(weight: torch.Tensor, block_size, sparsity: float) -> torch.Tensor:
        """Keep the :func:`keep_count` ``(nblocks, sparsity)`` blocks of largest
        Frobenius norm (ties go to the lower row-major block index)."""
        bm, bk = check_block_size(block_size)
        tiles = _pad_to_blocks(weight.detach().to(torch.float32), bm, bk)
        nb, kb = tiles.shape[:2]
        total = nb * kb
        keep_n = keep_count(total, sparsity)
        norms = tiles.square().sum((-1, -2)).flatten()
        # stable descending sort: equal norms keep index order
        order = torch.sort(norms, descending=True, stable=True).indices[:keep_n]
        mask = torch.zeros(total, dtype=torch.bool, device=weight.device)
        mask[order] = True
        return mask.reshape(nb, kb)

    @classmethod
    def from_dense_magnitude(cls, weight: torch.Tensor, block_size=(32, 32), sparsity: float = 0.5
                             ) -> "BlockSparseWeight":
        """Prune ``weight`` to its largest-norm blocks (see :meth:`magnitude_block_mask`) and pack it."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("weight must be a 2-D tensor (out_features, in_features)")
        mask = cls.magnitude_block_mask(weight, block_size, sparsity)
        return cls.from_dense(weight, block_size, block_mask=mask)

    def to_dense(self) -> torch.Tensor:
        """Exact dense ``(N, K)`` weight (zeros outside the kept blocks)."""
        return dense_from_blocks(self.blocks, self.crow, self.col, self.shape)

    # ------------------------------------------------------ torch sparse BSR
    def to_torch_bsr(self, pad: bool = False, index_dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """This weight as a torch sparse BSR tensor (``torch.sparse_bsr_tensor(crow, col, blocks, size)``).

        torch's BSR needs a size divisible by the block size.  For a weight whose ``(N, K)`` is a multiple
        of ``(bm, bk)`` the values are ``blocks`` themselves (shared storage).  Otherwise ``pad=True``
        gives the padded ``(NB * bm, KB * bk)`` tensor, with the padding of the edge blocks zeroed (a
        copy of ``blocks``); without it a ValueError.  ``index_dtype``: ``torch.int64`` (torch's
        default) or ``torch.int32`` for ``crow_indices`` / ``col_indices``."""
        if index_dtype not in (torch.int32, torch.int64):
            raise ValueError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype!r}")
        if not isinstance(pad, bool):
            raise TypeError(f"pad must be a bool, got {pad!r}")
        n, k = self.shape
        bm, bk = self.block_size
        nb, kb = self.grid
        blocks = self.blocks
        if (nb * bm, kb * bk) != (n, k):
            if not pad:
                raise ValueError(f"to_torch_bsr: torch's BSR layout needs a size divisible by the block size; "
                                 f"shape {(n, k)} is not a multiple of block_size {(bm, bk)} (pass pad=True for "
                                 f"the zero-padded {(nb * bm, kb * bk)} tensor)")
            blocks = blocks.clone()
            if blocks.numel():
                rows = block_rows(self.crow, self.nnzb)
                if n % bm:
                    blocks[rows == nb - 1, n % bm:, :] = 0
                if k % bk:
                    blocks[self.col == kb - 1, :, k % bk:] = 0
        return torch.sparse_bsr_tensor(self.crow.to(index_dtype), self.col.to(index_dtype), blocks,
                                       size=(nb * bm, kb * bk), dtype=blocks.dtype, device=blocks.device,
                                       check_invariants=False)    # the indices were validated when built

    @classmethod
    def from_torch_bsr(cls, t: torch.Tensor, shape=None) -> "BlockSparseWeight":
        """Build from a 2-D torch sparse BSR tensor (values ``(nnzb, bm, bk)``, no batch or dense dims).

        ``shape``: the weight's ``(N, K)`` when ``t`` is its zero-padded form (``t.shape`` must then be
        ``(ceil(N / bm) * bm, ceil(K / bk) * bk)``); default ``t.shape``.  The blocks are copied only
        where they must be made contiguous; the indices become int32.  The block sides must be among
        the format's (16, 32, 64, 128); the indices are checked as :meth:`from_blocks` checks them
        (``col`` strictly increasing within a block-row, in range)."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"from_torch_bsr: t must be a torch.Tensor with layout torch.sparse_bsr, "
                            f"got {type(t).__name__}")
        if t.layout != torch.sparse_bsr:
            raise ValueError(f"from_torch_bsr: t must have layout torch.sparse_bsr, got {t.layout} (convert with "
                             f"t.to_sparse_bsr(blocksize))")
        if t.dim() != 2 or t.values().dim() != 3:
            raise ValueError(f"from_torch_bsr: t must be a 2-D BSR tensor without batch or dense dimensions "
                             f"(values (nnzb, bm, bk)), got shape {tuple(t.shape)} with values of shape "
                             f"{tuple(t.values().shape)}")
        values = t.values()
        bsz = tuple(int(v) for v in values.shape[1:])
        if bsz[0] not in BLOCK_SIDES or bsz[1] not in BLOCK_SIDES:
            raise ValueError(f"from_torch_bsr: blocksize {bsz} is not supported; BlockSparseWeight's block sides "
                             f"are each one of {BLOCK_SIDES}")
        if not values.is_floating_point():
            raise TypeError(f"from_torch_bsr: t must be floating point, got {values.dtype}")
        from ._validate import check_shape_pair

        full = (int(t.shape[0]), int(t.shape[1]))
        n, k = check_shape_pair(full if shape is None else shape, "BlockSparseWeight")
        padded = (-(-n // bsz[0]) * bsz[0], -(-k // bsz[1]) * bsz[1])
        if padded != full:
            raise ValueError(f"from_torch_bsr: a {full} BSR tensor with blocksize {bsz} does not hold a {(n, k)} "
                             f"weight (its padded size is {padded})")
        return cls.from_blocks(values.contiguous(), t.crow_indices(), t.col_indices(), (n, k), bsz)

    def block_mask(self) -> torch.Tensor:
        """Boolean ``(NB, KB)`` grid of the kept blocks."""
        nb, kb = self.grid
        m = torch.zeros(nb, kb, dtype=torch.bool, device=self.device)
        if self.nnzb:
            m[block_rows(self.crow, self.nnzb), self.col.to(torch.int64)] = True
        return m

    def mask(self) -> torch.Tensor:
        """Boolean ``(N, K)`` mask of the positions covered by kept blocks."""
        bm, bk = self.block_size
        n, k = self.shape
        m = self.block_mask().repeat_interleave(bm, 0).repeat_interleave(bk, 1)
        return m[:n, :k]

    def __repr__(self) -> str:
        return (f"BlockSparseWeight(shape={self.shape}, block_size={self.block_size}, nnzb={self.nnzb}, "
                f"density={self.density:.3f}, dtype={self.dtype}, device={self.device}, nbytes={self.nbytes()})")
