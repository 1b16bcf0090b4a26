"""Drop-in modules backed by sparsekit ops."""
from .block_sparse_linear import BlockSparseLinear
from .draft_attention import DraftAttention, DraftAttnProcessor, DraftSchedule
from .qlinear import QLinear
from .sparse_linear import SparseLinear
from .sparse_qlinear import SparseQLinear
from .triple_gate_conv import TripleGateConv2d

__all__ = ["SparseLinear", "BlockSparseLinear", "QLinear", "SparseQLinear", "TripleGateConv2d",
           "DraftAttention", "DraftAttnProcessor", "DraftSchedule"]
