"""Multi-process sparsekit on torch.distributed: tensor parallelism of the packed linear layers
(:mod:`.tp`), distributed calibration (:mod:`.calibration`) and sequence-parallel
DraftAttention (:mod:`.sp_attention`); the per-layer solves of a sequential calibration split over
the ranks (:mod:`.split`)."""
from .calibration import all_reduce_stats, calibration_group, current_calibration_group
from .split import LayerSplit, split_enabled
from .sp_attention import gather_sequence, shard_sequence, sp_draft_attention
from .tp import STYLES, ShardedLinear, parallelize, shard_bounds, shard_module

__all__ = ["shard_module", "parallelize", "ShardedLinear", "shard_bounds", "STYLES", "calibration_group",
           "current_calibration_group", "all_reduce_stats", "sp_draft_attention", "shard_sequence",
           "gather_sequence", "LayerSplit", "split_enabled"]
