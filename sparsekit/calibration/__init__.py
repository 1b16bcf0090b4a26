"""Calibration plumbing shared by every calibrated compression (pruners, quantizers, the schemes).

* :mod:`.core`: layer hooks, forward-order groups of layers, input statistics
  (``X^T X``, ``sum x^2``, ``sum |x|``), and :func:`sequential`, the
  layer-by-layer driver over a whole model.
* :mod:`.blocks`: finding a model's repeated blocks (decoder/encoder layers).
* :mod:`.offload`: moving modules between the compute device and where they
  live, the activation store with its device budget, memory readings.
* :mod:`.pipeline`: :func:`blockwise`, the block-by-block driver: it records
  the first block's inputs once, calibrates one block at a time (only that
  block on the compute device when offloading) and passes each block's
  compressed outputs on to the next.
"""
from .blocks import find_blocks
from .pipeline import BlockwiseSummary, LayerJob, blockwise, check_blockwise_args
from .core import _StopForward  # noqa: F401 - the earlier private name
from .core import (STATS, InputAccumulator, StopForward, accumulate_inputs, first_calls,
                   forward_groups, hooked, model_device, model_dtype, model_input, reiterable, resolve_layers, sequential, split_batch,
                   zero_stats)
from .offload import ActivationStore, Placement, current_rss, format_bytes

__all__ = ["resolve_layers", "split_batch", "reiterable", "model_device", "model_dtype", "model_input", "hooked", "first_calls", "forward_groups",
           "InputAccumulator", "zero_stats", "accumulate_inputs", "sequential", "StopForward", "STATS",
           "find_blocks", "blockwise", "check_blockwise_args", "LayerJob", "BlockwiseSummary", "ActivationStore",
           "Placement",
           "current_rss", "format_bytes"]
