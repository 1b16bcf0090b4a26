"""Packed weight containers: from_dense / to_dense / validation."""
from .block_sparse import BlockSparseWeight, block_grid
from .int4 import Int4Weight
from .sparse24 import Sparse24Weight

__all__ = ["Sparse24Weight", "BlockSparseWeight", "Int4Weight", "block_grid"]
