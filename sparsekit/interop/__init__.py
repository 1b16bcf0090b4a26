"""Interoperability with other checkpoint formats (loaded lazily).

* :mod:`sparsekit.interop.compressed_tensors` -- the ``pack-quantized`` (W4A16 / W4A8)
  and ``int-quantized`` (W8A8) formats of the compressed-tensors library (the format
  vLLM and llm-compressor read and write), to and from :class:`~sparsekit.nn.QLinear`.

The converters are plain PyTorch + safetensors; the ``compressed-tensors`` package
itself (extra ``sparsekit[interop]``) is needed only to expand preset scheme names
(e.g. ``"W4A16": ["Linear"]``) in a configuration.
"""
from __future__ import annotations

import importlib

__all__ = ["compressed_tensors", "int4_from_ct", "int4_to_ct", "int8_from_ct", "int8_to_ct",
           "load_compressed_tensors", "save_compressed_tensors"]

_CT_NAMES = {"int4_from_ct", "int4_to_ct", "int8_from_ct", "int8_to_ct", "load_compressed_tensors",
             "save_compressed_tensors"}


def __getattr__(name):
    if name == "compressed_tensors":
        return importlib.import_module(".compressed_tensors", __name__)
    if name in _CT_NAMES:
        return getattr(importlib.import_module(".compressed_tensors", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
