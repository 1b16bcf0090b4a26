"""Weight quantizers onto sparsekit's group-wise integer grid (int4 by default, int8 too).

* :func:`rtn_quantize`: round to nearest, per group of consecutive input features.
* :func:`gptq_quantize`: GPTQ (second-order, column-by-column with error
  propagation; blocked lazy updates; dead inputs zeroed; optional act-order
  with dynamic groups -- the result carries the column order ``perm`` /
  ``g_idx`` -- or static groups).
* :func:`awq_search`: AWQ-style activation-aware per-input-channel scales of one layer;
  :func:`awq_quantize_model_`: AWQ as published (shared sibling scales searched
  on the module output, folded into the producing norm / linear, clipping search).
* :func:`collect_linear_inputs`: per-layer ``H = 2 X^T X / n`` and ``mean|x|``
  from calibration batches; :func:`quantize_model_weights`: sequential,
  layer-by-layer fake quantization of a model.

Every quantizer returns a :class:`QuantResult` (uint8 codes, float32 group
scales and zeros, ``.dequantize()``); the grid is documented in
:mod:`sparsekit.quant.rtn`.
"""
from .awq import awq_effective_weight, awq_search
from .awq_model import AWQ_ADAPTERS, awq_auto_clip, awq_fold_, awq_group_search, awq_quantize_model_
from .calibration import QUANT_METHODS, collect_linear_inputs, linear_forward_order, quantize_model_weights
from .gptq import gptq_act_order, gptq_inverse_factor, gptq_quantize
from .rtn import (GROUP_SIZES, QuantResult, check_quant_args, dequantize_codes, g_idx_from_perm, grid_params,
                  quantize_codes, rtn_quantize)

__all__ = [
    "GROUP_SIZES", "QuantResult", "check_quant_args", "grid_params", "quantize_codes", "dequantize_codes",
    "rtn_quantize", "g_idx_from_perm",
    "gptq_quantize", "gptq_inverse_factor", "gptq_act_order",
    "awq_search", "awq_effective_weight", "AWQ_ADAPTERS", "awq_group_search", "awq_fold_", "awq_auto_clip",
    "awq_quantize_model_",
    "QUANT_METHODS", "collect_linear_inputs", "linear_forward_order", "quantize_model_weights",
]
