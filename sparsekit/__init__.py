"""sparsekit: kernels for sparse and low-bit neural networks on NVIDIA GPUs."""
__version__ = "0.1.0"

from . import formats, ops, prune, quant, testing  # noqa: E402
from . import nn  # noqa: E402
from . import calibration, schemes  # noqa: E402
from .compress import load_compressed, save_compressed  # noqa: E402
from .convert import BlockSparseConfig, Int4Config, Sparse24Config, quantize_, sparsify_  # noqa: E402
from .pretrained import load_pretrained, save_pretrained  # noqa: E402
from .schemes import get_scheme, scheme_names  # noqa: E402

# `sparsekit.compress` stays the module (its `compress` function: `from sparsekit.compress import compress`)
__all__ = ["__version__", "formats", "ops", "prune", "quant", "testing", "nn", "calibration", "schemes",
           "Sparse24Config", "BlockSparseConfig", "Int4Config", "sparsify_", "quantize_", "save_compressed",
           "load_compressed", "save_pretrained", "load_pretrained", "get_scheme", "scheme_names"]
