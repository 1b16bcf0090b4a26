"""Drop-in modules backed by sparsekit ops."""
from .block_sparse_linear import BlockSparseLinear
from .qlinear import QLinear
from .sparse_linear import SparseLinear

__all__ = ["SparseLinear", "BlockSparseLinear", "QLinear"]
