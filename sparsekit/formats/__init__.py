"""Packed weight containers: from_dense / to_dense / validation."""
from .block_sparse import BlockSparseWeight, block_grid
from .int4 import Int4Weight
from .int8 import Int8Weight
from .sparse24 import Sparse24Int8Weight, Sparse24Weight
from .sparse24_int4 import Sparse24Int4Weight

__all__ = ["Sparse24Weight", "BlockSparseWeight", "Int4Weight", "Int8Weight", "Sparse24Int4Weight", "Sparse24Int8Weight", "block_grid"]
