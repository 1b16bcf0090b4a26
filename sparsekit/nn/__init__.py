"""Drop-in modules backed by sparsekit ops."""
from .block_sparse_linear import BlockSparseLinear
from .sparse_linear import SparseLinear

__all__ = ["SparseLinear", "BlockSparseLinear"]
