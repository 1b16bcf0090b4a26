"""Public functional ops (registered with torch.library) and backend dispatch."""
from .block_sparse import block_sparse_linear, block_sparse_linear_packed
from .int4 import int4_linear, int4_linear_packed
from .dispatch import BACKENDS, ENV_VAR, available_backends, resolve
from .sparse24 import sparse24_linear, sparse24_linear_packed
from .sparse24_int4 import sparse24_int4_linear, sparse24_int4_linear_packed


def select_backend(op: str, x, weight=None) -> str:
    """The backend ``op`` would choose for input ``x`` (no forcing argument)."""
    k = x.shape[-1] if x.dim() else 1
    m = x.numel() // max(k, 1)
    return resolve(op, x.device, None, m)


__all__ = ["BACKENDS", "ENV_VAR", "available_backends", "resolve", "select_backend",
           "sparse24_linear", "sparse24_linear_packed", "block_sparse_linear", "block_sparse_linear_packed",
           "int4_linear", "int4_linear_packed", "sparse24_int4_linear", "sparse24_int4_linear_packed"]
