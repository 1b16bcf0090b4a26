"""Compression algorithms that produce sparsity masks.

* 2:4 and unstructured: :func:`mask_2to4` (magnitude or any per-weight
  score), Wanda (:func:`wanda_mask`), SparseGPT (:func:`sparsegpt_prune`,
  Hessian-based with OBS weight compensation) and :func:`prune_model_`, which
  prunes a model layer by layer on calibration data; an input-channel
  permutation search (:func:`search_permutation`, applied with the producing
  layer by :func:`permute_linear_pair_`) raises the magnitude a 2:4 mask keeps
  without changing the dense function.
* mixture-of-experts: MoE-Pruner (:func:`prune_moe_`, router-weighted
  expert statistics; adapters per MoE block type) and expert-wise
  distillation of the kept weights (:func:`distill_experts_`).
* blocks (LPViT-style): block scores (magnitude, first- and second-order
  Taylor with an empirical-Fisher diagonal), hardware-aware costs, calibration
  statistics, and per-layer sparsity allocation by rate-distortion (equal-slope
  lambda search and an exact dynamic program under a FLOP/latency budget).
"""
from .allocation import (DEFAULT_SPARSITIES, allocate_block_sparsity, allocate_dp, allocate_equal_slope,
                         apply_block_masks, distortion_curves, layer_costs, make_score_fn)
from .block import (BLOCK_SIDES, SCORE_METHODS, block_cost, block_grid, block_mask_from_scores, block_reduce,
                    block_scores, expand_block_mask, hardware_aware_scores, keep_count, latency_key,
                    load_latency_table)
from .calibration import collect_layer_stats
from .masks import is_2to4, mask_2to4
from .moe import (MoEAdapter, MoEPruneReport, collect_moe_stats, distill_experts_, find_moe_blocks, moe_adapter,
                  prune_moe_, register_moe_adapter)
from .permute import (apply_permutations_, check_permutation, inverse_permutation, kept_magnitude, permute_input_,
                      permute_linear_pair_, search_permutation)
from .sequential import METHODS, collect_layer_inputs, prune_model_
from .sparsegpt import inverse_hessian_factor, sparsegpt_prune
from .wanda import PATTERNS, magnitude_mask, row_topk_mask, wanda_mask, wanda_scores

__all__ = [
    "mask_2to4", "is_2to4",
    "PATTERNS", "magnitude_mask", "row_topk_mask", "wanda_scores", "wanda_mask",
    "inverse_hessian_factor", "sparsegpt_prune", "METHODS", "collect_layer_inputs", "prune_model_",
    "kept_magnitude", "search_permutation", "permute_linear_pair_", "permute_input_", "apply_permutations_",
    "check_permutation", "inverse_permutation",
    "BLOCK_SIDES", "SCORE_METHODS", "block_grid", "block_reduce", "block_scores", "block_cost",
    "hardware_aware_scores", "block_mask_from_scores", "expand_block_mask", "keep_count",
    "load_latency_table", "latency_key",
    "collect_layer_stats",
    "MoEAdapter", "MoEPruneReport", "register_moe_adapter", "moe_adapter", "find_moe_blocks", "collect_moe_stats",
    "prune_moe_", "distill_experts_",
    "DEFAULT_SPARSITIES", "make_score_fn", "distortion_curves", "layer_costs", "allocate_equal_slope",
    "allocate_dp", "allocate_block_sparsity", "apply_block_masks",
]
