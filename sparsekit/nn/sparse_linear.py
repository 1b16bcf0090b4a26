"""Drop-in sparse replacement for ``nn.Linear``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..formats.sparse24 import Sparse24Weight, padded_k
from ..ops.sparse24 import sparse24_linear_packed
from ..prune.masks import mask_2to4

__all__ = ["SparseLinear"]

_PATTERNS = ("2:4",)
_FACTORY_PATTERNS = ("2:4", "block")
# meta byte for two groups that both keep positions (0, 1): code 0b0100 per nibble
_EMPTY_META = 0x44


class SparseLinear(nn.Module):
    """``nn.Linear`` with a compressed 2:4 sparse weight.

    Holds ``values`` (a trainable ``nn.Parameter``, ``(out, Kp/2)``), the packed
    ``meta`` buffer (uint8, ``(out, Kp/8)``) and an optional ``bias``; the
    state_dict stores exactly these, so saving keeps the compressed size.
    Build one with :meth:`from_dense`; fine-tuning updates the kept values and
    never changes the mask.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, pattern: str = "2:4",
                 device=None, dtype=None, backend: Optional[str] = None):
        super().__init__()
        if pattern == "block":
            raise ValueError("construct block-sparse layers with BlockSparseLinear (or SparseLinear.from_dense("
                             "linear, pattern='block', ...))")
        if pattern not in _PATTERNS:
            raise ValueError(f"unsupported sparsity pattern {pattern!r}; supported: {_PATTERNS}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.pattern = pattern
        self.backend = backend
        kp = padded_k(self.in_features)
        factory = dict(device=device, dtype=dtype if dtype is not None else torch.get_default_dtype())
        self.values = nn.Parameter(torch.zeros(out_features, kp // 2, **factory))
        self.register_buffer("meta", torch.full((out_features, kp // 8), _EMPTY_META, dtype=torch.uint8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **factory))
        else:
            self.register_parameter("bias", None)

    # ----------------------------------------------------------------- builders
    @classmethod
    def from_dense(cls, linear: nn.Linear, pattern: str = "2:4", mask: Optional[torch.Tensor] = None,
                   scores: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                   block_size=(32, 32), sparsity: Optional[float] = None) -> nn.Module:
        """Prune ``linear`` to ``pattern`` and compress it.

        ``pattern="2:4"``: the mask is ``mask`` if given (it must be 2:4), else
        :func:`sparsekit.prune.mask_2to4` of ``scores`` (default ``|W|``).

        ``pattern="block"``: returns a :class:`~sparsekit.nn.BlockSparseLinear`
        with ``block_size=(bm, bk)``; ``mask`` is then a bool block grid
        (e.g. from :func:`sparsekit.prune.block_mask_from_scores`), else
        ``sparsity`` drops that fraction of blocks by magnitude.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        if pattern not in _FACTORY_PATTERNS:
            raise ValueError(f"unsupported sparsity pattern {pattern!r}; supported: {_FACTORY_PATTERNS}")
        if pattern == "block":
            if scores is not None:
                raise ValueError("pattern='block' takes a block mask or a sparsity, not element scores")
            from .block_sparse_linear import BlockSparseLinear

            return BlockSparseLinear.from_dense(linear, block_size=block_size, sparsity=sparsity,
                                                block_mask=mask, backend=backend)
        if sparsity is not None:
            raise ValueError("pattern='2:4' has a fixed sparsity of 50%; sparsity= applies to pattern='block'")
        w = linear.weight.detach()
        if mask is None:
            mask = mask_2to4(w, scores)
        packed = Sparse24Weight.from_dense(w, mask=mask)
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, pattern=pattern,
                  device=w.device, dtype=w.dtype, backend=backend)
        with torch.no_grad():
            mod.values.copy_(packed.values)
            mod.meta.copy_(packed.meta)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach())
        return mod

    def weight_format(self) -> Sparse24Weight:
        """The compressed weight (sharing storage with this module)."""
        return Sparse24Weight(self.values.detach(), self.meta, (self.out_features, self.in_features))

    @property
    def weight(self) -> torch.Tensor:
        """Dense ``(out, in)`` weight, materialized on each access (for inspection)."""
        return self.weight_format().to_dense()

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function (pruned entries zero)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse24_linear_packed(x, self.values, self.meta, self.in_features, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, pattern={self.pattern!r}")
