"""Interoperability with other checkpoint formats (loaded lazily).

* :mod:`sparsekit.interop.compressed_tensors` -- the ``pack-quantized`` (W4A16 / W4A8)
  and ``int-quantized`` (W8A8) formats of the compressed-tensors library (the format
  vLLM and llm-compressor read and write), to and from :class:`~sparsekit.nn.QLinear`.
* :mod:`sparsekit.interop.gptq` -- GPTQ (``gptq`` / ``gptq_v2``, with act-order
  ``g_idx``) and AutoAWQ GEMM checkpoints into :class:`~sparsekit.nn.QLinear` (int4),
  and :func:`load_hub_checkpoint`, which picks the loader from ``quant_method``.

The converters are plain PyTorch + safetensors; the ``compressed-tensors`` package
itself (extra ``sparsekit[interop]``) is needed only to expand preset scheme names
(e.g. ``"W4A16": ["Linear"]``) in a configuration.
"""
from __future__ import annotations

import importlib

__all__ = ["compressed_tensors", "gptq", "int4_from_ct", "int4_to_ct", "int8_from_ct", "int8_to_ct",
           "load_compressed_tensors", "save_compressed_tensors", "gptq_to_int4", "awq_to_int4", "load_gptq",
           "load_awq", "load_hub_checkpoint"]

_CT_NAMES = {"int4_from_ct", "int4_to_ct", "int8_from_ct", "int8_to_ct", "load_compressed_tensors",
             "save_compressed_tensors"}
_GPTQ_NAMES = {"gptq_to_int4", "awq_to_int4", "load_gptq", "load_awq", "load_hub_checkpoint"}


def __getattr__(name):
    if name in ("compressed_tensors", "gptq"):
        return importlib.import_module("." + name, __name__)
    if name in _CT_NAMES:
        return getattr(importlib.import_module(".compressed_tensors", __name__), name)
    if name in _GPTQ_NAMES:
        return getattr(importlib.import_module(".gptq", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
