"""Packed weight containers: from_dense / to_dense / validation."""
from .block_sparse import BlockSparseWeight, block_grid
from .sparse24 import Sparse24Weight

__all__ = ["Sparse24Weight", "BlockSparseWeight", "block_grid"]
