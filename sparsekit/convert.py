"""Whole-model conversion: ``sparsify_(model, config)`` and ``quantize_(model, config)``."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import nn

__all__ = ["Sparse24Config", "BlockSparseConfig", "Int4Config", "sparsify_", "quantize_"]


@dataclass
class _LinearConfig:
    """Which ``nn.Linear`` layers a config converts.

    include / exclude: regular expressions matched (``re.search``) against the
        module's qualified name; a layer is converted when it matches
        ``include`` (or ``include`` is None) and does not match ``exclude``.
    types: module classes to convert (``nn.Linear`` or subclasses; exact type match).
    backend: forced backend for the new modules (None = automatic).
    """

    include: Optional[str] = None
    exclude: Optional[str] = None
    types: tuple = (nn.Linear,)
    backend: Optional[str] = None

    def __post_init__(self):
        for t in self.types:
            if not (isinstance(t, type) and issubclass(t, nn.Linear)):
                raise TypeError(f"{type(self).__name__}.types must be nn.Linear subclasses, got {t!r}")

    def matches(self, name: str, module: nn.Module) -> bool:
        if type(module) not in self.types:
            return False
        if self.include is not None and re.search(self.include, name) is None:
            return False
        if self.exclude is not None and re.search(self.exclude, name) is not None:
            return False
        return True

    def convert(self, module: nn.Linear, name: str) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class Sparse24Config(_LinearConfig):
    """Swap ``nn.Linear`` layers for 2:4 :class:`~sparsekit.nn.SparseLinear` (magnitude mask)."""

    def convert(self, module: nn.Linear, name: str) -> nn.Module:
        from .nn import SparseLinear

        return SparseLinear.from_dense(module, pattern="2:4", backend=self.backend)


@dataclass
class BlockSparseConfig(_LinearConfig):
    """Swap ``nn.Linear`` layers for :class:`~sparsekit.nn.BlockSparseLinear`.

    block_size: ``(bm, bk)``, each in {16, 32, 64, 128}.
    sparsity: fraction of blocks dropped (smallest Frobenius norm first) in
        every converted layer, unless the layer is in ``per_layer``.
    per_layer: layer name -> sparsity (e.g. the result of
        :func:`sparsekit.prune.allocate_block_sparsity`), or -> a bool block
        mask (e.g. from :func:`sparsekit.prune.apply_block_masks`).
    """

    block_size: tuple = (32, 32)
    sparsity: float = 0.5
    per_layer: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        from .formats.block_sparse import check_block_size

        self.block_size = check_block_size(self.block_size)
        if not 0.0 <= float(self.sparsity) <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {self.sparsity}")

    def convert(self, module: nn.Linear, name: str) -> nn.Module:
        from .nn import BlockSparseLinear

        spec = self.per_layer.get(name, self.sparsity)
        if isinstance(spec, torch.Tensor):
            return BlockSparseLinear.from_dense(module, self.block_size, block_mask=spec, backend=self.backend)
        return BlockSparseLinear.from_dense(module, self.block_size, sparsity=float(spec), backend=self.backend)


@dataclass
class Int4Config(_LinearConfig):
    """Swap ``nn.Linear`` layers for int4-weight :class:`~sparsekit.nn.QLinear` (W4A16, or W4A8 / mixed).

    method: ``"rtn"`` (no data), ``"gptq"`` or ``"awq"`` (both need ``calib``,
        an iterable of model input batches; layers are calibrated one after
        another with the earlier ones already quantized).
    group_size: 32, 64, 128 or -1 (one group per row); symmetric: zero point 8.
    dtype: compute dtype of the new layers (float16 / bfloat16; default the
        layer's dtype when half precision, else float16).
    method_kwargs: extra arguments for the quantizer (e.g. ``act_order=True``,
        ``damp=0.01`` for GPTQ; ``grid=20`` for AWQ).
    act_bits: None (W4A16, fp16/bf16 activations), 8 (W4A8: per-token dynamic
        int8 activations), 4 (W4A4, a quality baseline) or ``"mixed"``
        (token-adaptive: the top ``frac8`` of tokens by activation norm at 8
        bits, the rest at 4).
    frac8: fraction of tokens kept at 8 bits when ``act_bits="mixed"``.
    """

    group_size: int = 128
    symmetric: bool = False
    method: str = "rtn"
    calib: object = None
    dtype: Optional[torch.dtype] = None
    method_kwargs: dict = field(default_factory=dict)
    act_bits: Optional[Union[int, str]] = None
    frac8: float = 0.25

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.act_bits, bool) or self.act_bits not in (None, 8, 4, "mixed"):
            raise ValueError(f"act_bits must be None (W4A16), 8, 4 or 'mixed', got {self.act_bits!r}")
        if isinstance(self.frac8, bool) or not isinstance(self.frac8, (int, float)) or not 0 <= self.frac8 <= 1:
            raise ValueError(f"frac8 must be a number in [0, 1], got {self.frac8!r}")
        if self.method not in ("rtn", "gptq", "awq"):
            raise ValueError(f"unknown method {self.method!r}; choose 'rtn', 'gptq' or 'awq'")
        if self.method != "rtn" and self.calib is None:
            raise ValueError(f"method={self.method!r} needs calibration data: Int4Config(calib=batches)")
        if self.group_size not in (32, 64, 128, -1):
            raise ValueError(f"group_size must be one of 32, 64, 128, -1, got {self.group_size}")


_NAMED = {"2:4": Sparse24Config, "int4": Int4Config}


def _resolve(config) -> _LinearConfig:
    if isinstance(config, str):
        try:
            return _NAMED[config]()
        except KeyError:
            raise ValueError(f"unknown config {config!r}; known: {sorted(_NAMED)} "
                             "(or pass a Sparse24Config / BlockSparseConfig / Int4Config)") from None
    if isinstance(config, _LinearConfig):
        return config
    raise TypeError(f"config must be a config object or one of {sorted(_NAMED)}, got {type(config).__name__}")


def _targets(model: nn.Module, cfg: _LinearConfig, filter_fn) -> list:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    targets = [(name, mod) for name, mod in model.named_modules()
               if cfg.matches(name, mod) and (filter_fn is None or filter_fn(mod, name))]
    if any(name == "" for name, _ in targets):
        raise ValueError("conversion replaces submodules; wrap a bare nn.Linear in a container "
                         "or use the module's from_dense / from_float directly")
    return targets


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def quantize_(model: nn.Module, config: Union[str, Int4Config] = "int4",
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, progress: bool = True) -> nn.Module:
    """Replace matching ``nn.Linear`` layers of ``model`` by int4 :class:`~sparsekit.nn.QLinear`, in place.

    ``config`` is ``"int4"`` (RTN, group 128, asymmetric) or an
    :class:`Int4Config`.  Returns ``model``.
    """
    cfg = _resolve(config)
    if not isinstance(cfg, Int4Config):
        raise TypeError(f"quantize_ takes an Int4Config (or 'int4'), got {type(cfg).__name__}; "
                        "sparsity configs go to sparsify_")
    targets = _targets(model, cfg, filter_fn)
    if not targets:
        return model
    from tqdm.auto import tqdm

    from .nn import QLinear

    if cfg.method == "rtn":
        for name, mod in tqdm(targets, desc="quantize_", unit="layer", disable=not progress):
            _replace(model, name, QLinear.from_float(mod, group_size=cfg.group_size, symmetric=cfg.symmetric,
                                                     dtype=cfg.dtype, backend=cfg.backend, act_bits=cfg.act_bits,
                                                     frac8=cfg.frac8))
        return model
    from .quant import quantize_model_weights

    originals = {name: mod for name, mod in targets}
    results = quantize_model_weights(model, cfg.calib, method=cfg.method, group_size=cfg.group_size,
                                     symmetric=cfg.symmetric, bits=4, layers=originals, progress=progress,
                                     **cfg.method_kwargs)
    for name, mod in originals.items():
        _replace(model, name, QLinear.from_quant_result(mod, results[name], dtype=cfg.dtype, backend=cfg.backend,
                                                        act_bits=cfg.act_bits, frac8=cfg.frac8))
    return model


def sparsify_(model: nn.Module, config: Union[str, _LinearConfig] = "2:4",
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, progress: bool = True) -> nn.Module:
    """Replace matching layers of ``model`` in place; returns ``model``.

    ``config`` is ``"2:4"``, a :class:`Sparse24Config` or a
    :class:`BlockSparseConfig`.  ``filter_fn(module, name)`` further restricts
    which matching layers are converted.  A tqdm bar shows progress
    (``progress=False`` hides it).
    """
    cfg = _resolve(config)
    if isinstance(cfg, Int4Config):
        raise TypeError("Int4Config quantizes: use quantize_(model, config)")
    targets = _targets(model, cfg, filter_fn)
    if not targets:
        return model
    if isinstance(cfg, BlockSparseConfig):
        unknown = set(cfg.per_layer) - {name for name, _ in targets}
        if unknown:
            raise ValueError(f"BlockSparseConfig.per_layer names layers that are not converted: {sorted(unknown)}")
    from tqdm.auto import tqdm

    for name, mod in tqdm(targets, desc="sparsify_", unit="layer", disable=not progress):
        _replace(model, name, cfg.convert(mod, name))
    return model
