"""Packed weight containers: from_dense / to_dense / validation."""
from .sparse24 import Sparse24Weight

__all__ = ["Sparse24Weight"]
