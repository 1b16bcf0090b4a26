"""Public functional ops (registered with torch.library) and backend dispatch."""
from .block_sparse import block_sparse_linear, block_sparse_linear_packed
from .act_quant import per_token_quant, select_token_bits
from .int4 import int4_linear, int4_linear_packed
from .int8 import int8_linear, int8_linear_packed, w4a8_linear, w4a8_linear_packed
from .dispatch import BACKENDS, ENV_VAR, available_backends, resolve
from .draft_attention import DraftLayout, block_sparse_attention, draft_attention, draft_block_mask, draft_layout
from .sparse24 import sparse24_linear, sparse24_linear_packed
from .sparse24_int8 import sparse24_int8_linear, sparse24_int8_linear_packed
from .sparse24_int4 import sparse24_int4_linear, sparse24_int4_linear_packed
from .triple_gate_conv import TileGates, compact_gates, triple_gate_conv2d, triple_gate_map


def select_backend(op: str, x, weight=None) -> str:
    """The backend ``op`` would choose for input ``x`` (no forcing argument)."""
    k = x.shape[-1] if x.dim() else 1
    m = x.numel() // max(k, 1)
    n = getattr(weight, "out_features", None) if weight is not None else None
    return resolve(op, x.device, None, m, n=n, k=k, dtype=x.dtype)


__all__ = ["BACKENDS", "ENV_VAR", "available_backends", "resolve", "select_backend",
           "sparse24_linear", "sparse24_linear_packed", "block_sparse_linear", "block_sparse_linear_packed",
           "int4_linear", "int4_linear_packed", "sparse24_int4_linear", "sparse24_int4_linear_packed",
           "int8_linear", "int8_linear_packed", "w4a8_linear", "w4a8_linear_packed", "per_token_quant",
           "select_token_bits", "triple_gate_conv2d", "triple_gate_map", "compact_gates", "TileGates",
           "sparse24_int8_linear", "sparse24_int8_linear_packed", "draft_attention", "draft_block_mask",
           "draft_layout", "block_sparse_attention", "DraftLayout"]
