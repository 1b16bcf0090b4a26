"""Drop-in modules backed by sparsekit ops."""
from .block_sparse_linear import BlockSparseLinear
from .qlinear import QLinear
from .sparse_linear import SparseLinear
from .sparse_qlinear import SparseQLinear

__all__ = ["SparseLinear", "BlockSparseLinear", "QLinear", "SparseQLinear"]
