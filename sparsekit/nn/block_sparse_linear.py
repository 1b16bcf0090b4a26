"""Drop-in block-sparse replacement for ``nn.Linear``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..formats._validate import validate_block_sparse
from ..formats.block_sparse import BlockSparseWeight, check_block_size
from ..ops._cpu_ext import NO_ROW_LIMIT, block_kernel
from ..ops._dense import module_fast_path, module_plan
from ..ops.block_sparse import block_dense_f32, block_sparse_linear_packed, dense_forward, structural_fixup
from . import _state

__all__ = ["BlockSparseLinear"]

# tensors whose length is the number of kept blocks (resized on load)
_NNZ_PARAMS = ("blocks",)
_NNZ_BUFFERS = ("col", "trow", "tblk")


class BlockSparseLinear(nn.Module):
    """``nn.Linear`` whose weight keeps only some ``(bm, bk)`` blocks.

    Holds the kept ``blocks`` (a trainable ``nn.Parameter``, ``(nnzb, bm, bk)``),
    the int32 index buffers of :class:`~sparsekit.formats.BlockSparseWeight`
    (``crow, col, tcol_ptr, trow, tblk``) and an optional ``bias``.  The
    state_dict holds exactly these, and loading resizes the module to the saved
    number of blocks.  Fine-tuning updates kept blocks only; the block pattern
    never changes.

    ``load_state_dict`` validates all incoming tensors first (index ranges,
    monotone ``crow`` ending at nnzb, the transposed index, finite padding; see
    :class:`~sparsekit.formats.BlockSparseWeight`) and either loads all of them
    or raises and leaves the module untouched.  A load that changes the number
    of blocks keeps the ``blocks`` Parameter object (its ``.data`` is replaced
    and its ``.grad`` cleared), so an optimizer built before the load keeps
    updating it -- but optimizer state sized for the old pattern (e.g. Adam
    moments) no longer fits: rebuild the optimizer after such a load.  Build one with :meth:`from_dense` (or
    ``SparseLinear.from_dense(linear, pattern="block", ...)``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size=(32, 32),
                 device=None, dtype=None, backend: Optional[str] = None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.block_size = check_block_size(block_size)
        self.backend = backend
        bm, bk = self.block_size
        nb = -(-self.out_features // bm)
        kb = -(-self.in_features // bk)
        factory = dict(device=device, dtype=dtype if dtype is not None else torch.get_default_dtype())
        idx = dict(device=device, dtype=torch.int32)
        # an empty pattern: no kept blocks (the layer computes bias only)
        self.blocks = nn.Parameter(torch.zeros(0, bm, bk, **factory))
        self.register_buffer("crow", torch.zeros(nb + 1, **idx))
        self.register_buffer("col", torch.zeros(0, **idx))
        self.register_buffer("tcol_ptr", torch.zeros(kb + 1, **idx))
        self.register_buffer("trow", torch.zeros(0, **idx))
        self.register_buffer("tblk", torch.zeros(0, **idx))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **factory))
        else:
            self.register_parameter("bias", None)

    # ----------------------------------------------------------------- builders
    @classmethod
    def from_weight(cls, weight: BlockSparseWeight, bias: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> "BlockSparseLinear":
        """A module holding ``weight`` (copied) and ``bias``."""
        if not isinstance(weight, BlockSparseWeight):
            raise TypeError(f"weight must be a BlockSparseWeight, got {type(weight).__name__}")
        n, k = weight.shape
        mod = cls(k, n, bias=bias is not None, block_size=weight.block_size, device=weight.device,
                  dtype=weight.dtype, backend=backend)
        mod._set_pattern(weight)
        if bias is not None:
            with torch.no_grad():
                mod.bias.copy_(bias.detach())
        return mod

    @classmethod
    def from_dense(cls, linear: nn.Linear, block_size=(32, 32), sparsity: Optional[float] = None,
                   block_mask: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> "BlockSparseLinear":
        """Prune ``linear`` to blocks and pack it.

        ``block_mask`` (bool block grid) keeps exactly those blocks;
        otherwise ``sparsity`` drops that fraction of blocks, smallest
        Frobenius norm first; with neither, every block holding a non-zero is
        kept (for a weight pruned beforehand).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        if block_mask is not None and sparsity is not None:
            raise ValueError("give either block_mask or sparsity, not both")
        w = linear.weight.detach()
        if block_mask is None and sparsity is not None:
            block_mask = BlockSparseWeight.magnitude_block_mask(w, block_size, sparsity)
        packed = BlockSparseWeight.from_dense(w, block_size, block_mask=block_mask)
        return cls.from_weight(packed, linear.bias, backend=backend)

    def _set_pattern(self, weight: BlockSparseWeight) -> None:
        with torch.no_grad():
            self._resize_blocks(weight.blocks.shape[0])
            self.blocks.copy_(weight.blocks.detach())
        for name, t in zip(("crow", "col", "tcol_ptr", "trow", "tblk"), weight.index_tensors()):
            setattr(self, name, t.detach().clone().to(torch.int32))

    def _resize_blocks(self, nnzb: int) -> None:
        """Make room for ``nnzb`` blocks, keeping the Parameter object (``.data`` replaced)."""
        cur = self.blocks
        if cur.shape[0] == nnzb:
            return
        cur.data = torch.empty((nnzb, *cur.shape[1:]), dtype=cur.dtype, device=cur.device)
        cur.grad = None
        for name in _NNZ_BUFFERS:
            b = getattr(self, name)
            setattr(self, name, torch.empty((nnzb,), dtype=b.dtype, device=b.device))

    def weight_format(self) -> BlockSparseWeight:
        """The block-sparse weight (sharing storage with this module)."""
        return BlockSparseWeight(self.blocks.detach(), self.crow, self.col, self.tcol_ptr, self.trow, self.tblk,
                                 (self.out_features, self.in_features), self.block_size)

    @property
    def weight(self) -> torch.Tensor:
        """Dense ``(out, in)`` weight, materialized on each access (for inspection)."""
        return self.weight_format().to_dense()

    @property
    def density(self) -> float:
        """Fraction of the block grid that is kept."""
        nb = self.crow.numel() - 1
        kb = self.tcol_ptr.numel() - 1
        return self.blocks.shape[0] / max(nb * kb, 1)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function (dropped blocks zero)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.blocks.device, dtype=self.blocks.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # ----------------------------------------------------------------- state
    def _validate_tensors(self, t: dict) -> None:
        if t["blocks"].shape[0] != t["col"].shape[0]:
            raise ValueError(f"blocks holds {t['blocks'].shape[0]} blocks but col has {t['col'].shape[0]} entries")
        validate_block_sparse(t["blocks"], t["crow"], t["col"], t["tcol_ptr"], t["trow"], t["tblk"],
                              (self.out_features, self.in_features), self.block_size, owner="BlockSparseLinear")

    def validate_state_dict(self, state_dict, prefix: str = "", strict: bool = True) -> None:
        """Raise what :meth:`load_state_dict` would raise for ``state_dict``, copying nothing."""
        self._validate_tensors(_state.check_state_dict(self, state_dict, prefix, strict, False,
                                                       resizable=_NNZ_PARAMS + _NNZ_BUFFERS))

    def validate(self) -> None:
        """Re-check this module's tensors (e.g. after writing into them in place)."""
        self.weight_format()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        def prepare(cand, assign):
            # the number of kept blocks is data: take the saved pattern's size
            self._resize_blocks(cand["blocks"].shape[0])

        _state.load_atomic(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs, self._validate_tensors, prepare, resizable=_NNZ_PARAMS + _NNZ_BUFFERS)

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self._parameters          # (dict reads: Module.__getattr__ costs more than a small layer's
        blocks = params["blocks"]           # share of a CPU forward)
        if module_fast_path(x, self.backend, self.in_features, (blocks.dtype,)) and not (
                blocks.requires_grad and torch.is_grad_enabled()):
            # CPU: the dense expansion kept per weight version, without the op's per-call machinery
            # (ops/_dense.py)
            bufs = self._buffers
            crow, col, n, k, bias = bufs["crow"], bufs["col"], self.out_features, self.in_features, params["bias"]
            plan = module_plan(self, (blocks, crow, col), lambda: block_dense_f32(blocks, crow, col, n, k), n, k, bias,
                               kernel=(lambda: block_kernel(blocks, crow, col, n, k), NO_ROW_LIMIT))
            if plan is None:
                return dense_forward(x, blocks, crow, col, n, k, bias)
            # the kernel over the kept blocks (ops/_cpu_ext.py) computes the structural result itself; the dense
            # matmul needs the non-finite fix-up
            y = plan.kernel_linear(x, bias)
            if y is not None:
                return y
            return structural_fixup(plan.linear(x, bias), x, blocks, crow, col, n, k, bias)
        # the buffers were validated when built / loaded: no per-call content checks
        return block_sparse_linear_packed(x, self.blocks, self.crow, self.col, self.tcol_ptr, self.trow, self.tblk,
                                          self.out_features, self.in_features, self.bias, backend=self.backend,
                                          validate=False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={self.block_size}, density={self.density:.3f}")
