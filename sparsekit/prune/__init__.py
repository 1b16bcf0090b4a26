"""Compression algorithms that produce sparsity masks."""
from .masks import mask_2to4, is_2to4

__all__ = ["mask_2to4", "is_2to4"]
