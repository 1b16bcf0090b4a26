"""Drop-in modules backed by sparsekit ops."""
from .sparse_linear import SparseLinear

__all__ = ["SparseLinear"]
