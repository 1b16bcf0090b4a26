"""``"block"``: block-sparse weights (:class:`~sparsekit.nn.BlockSparseLinear`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from .base import Scheme, SchemeConfig, dtype_name, torch_dtype

__all__ = ["BlockParams", "BlockScheme"]


def _fraction(what: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
    return float(value)


@dataclass
class BlockParams(SchemeConfig):
    """``"block"``: keep whole ``(bm, bk)`` blocks of the weight.

    block_size: ``(bm, bk)``, each in {16, 32, 64, 128}.  sparsity: fraction of
    blocks dropped, smallest Frobenius norm first.  block_mask: a bool block
    grid that says exactly which blocks to keep (a per-layer value, e.g. from
    :func:`sparsekit.prune.apply_block_masks`; not part of the JSON form);
    ``sparsity`` must then be None.
    """

    block_size: tuple = (32, 32)
    sparsity: Optional[float] = 0.5
    block_mask: Optional[torch.Tensor] = None

    SCHEME: ClassVar[str] = "block"
    METHODS: ClassVar[tuple] = ("magnitude",)
    DEFAULT_METHOD: ClassVar[str] = "magnitude"
    CALIBRATED_METHOD: ClassVar[str] = "magnitude"
    RUNTIME_FIELDS: ClassVar[tuple] = ("block_mask",)

    def __post_init__(self):
        super().__post_init__()
        from ..formats.block_sparse import check_block_size

        self.block_size = check_block_size(self.block_size)
        if self.block_mask is not None:
            if not isinstance(self.block_mask, torch.Tensor) or self.block_mask.dtype != torch.bool \
                    or self.block_mask.dim() != 2:
                what = (f"a {self.block_mask.dtype} tensor of shape {tuple(self.block_mask.shape)}"
                        if isinstance(self.block_mask, torch.Tensor) else type(self.block_mask).__name__)
                raise TypeError(f"block_mask must be a 2-D bool block mask, got {what}")
            if self.sparsity is not None:
                raise ValueError("give either block_mask or sparsity (set sparsity=None with a block_mask)")
        elif self.sparsity is not None:
            self.sparsity = _fraction("sparsity", self.sparsity)


class BlockScheme(Scheme):
    name = "block"
    config_cls = BlockParams
    title = "block-sparse"
    stores = ("kept (bm, bk) blocks in the layer's dtype + int32 block indices (row pointers, columns and a "
              "transposed index)")
    kernels = ("block_sparse_linear",)
    kernel_sources = ("kernels/block_sparse.py",)
    sparse = True

    @property
    def module_cls(self):
        from ..nn import BlockSparseLinear

        return BlockSparseLinear

    def check(self, module, cfg):
        super().check(module, cfg)
        if cfg.block_mask is not None:
            from ..formats.block_sparse import block_grid

            grid = tuple(block_grid((module.out_features, module.in_features), cfg.block_size))
            if tuple(cfg.block_mask.shape) != grid:
                raise ValueError(f"block_mask must have shape {grid} (block grid of a "
                                 f"{(module.out_features, module.in_features)} weight with block_size "
                                 f"{cfg.block_size}), got {tuple(cfg.block_mask.shape)}")

    def calibrate(self, module, stats, cfg):
        from ..formats.block_sparse import BlockSparseWeight
        from ..prune import expand_block_mask

        w = module.weight
        if cfg.block_mask is not None:
            mask = cfg.block_mask.to(w.device)
        elif cfg.sparsity is not None:
            mask = BlockSparseWeight.magnitude_block_mask(w.detach(), cfg.block_size, cfg.sparsity)
        else:
            return None            # keep every block that holds a non-zero
        with torch.no_grad():
            w.mul_(expand_block_mask(mask, tuple(w.shape), cfg.block_size).to(w.dtype))
        return mask

    def build(self, module, result, cfg):
        from ..nn import BlockSparseLinear

        return BlockSparseLinear.from_dense(module, cfg.block_size, block_mask=result, backend=cfg.backend)

    def owns(self, module):
        from ..nn import BlockSparseLinear

        return type(module) is BlockSparseLinear

    def module_params(self, module):
        return {"in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None, "block_size": list(module.block_size),
                "dtype": dtype_name(module.blocks.dtype), "num_blocks": int(module.blocks.shape[0])}

    def rebuild(self, description, device=None, backend=None):
        from ..nn import BlockSparseLinear

        p = self.check_description(description)
        dtype = torch_dtype(p.get("dtype"))
        mod = BlockSparseLinear(p["in_features"], p["out_features"], bias=p["bias"],
                                block_size=tuple(p["block_size"]), device=device, dtype=dtype, backend=backend)
        nnz = p["num_blocks"]
        if isinstance(nnz, bool) or not isinstance(nnz, int) or nnz < 0:
            raise ValueError(f"num_blocks must be an int >= 0, got {nnz!r}")
        bm, bk = mod.block_size
        nb, kb = mod.crow.numel() - 1, mod.tcol_ptr.numel() - 1
        if nnz > nb * kb:
            raise ValueError(f"num_blocks={nnz} exceeds the {nb} x {kb} block grid")
        mod.blocks = nn.Parameter(torch.zeros(nnz, bm, bk, device=device, dtype=mod.blocks.dtype))
        for name in ("col", "trow", "tblk"):
            setattr(mod, name, torch.zeros(nnz, device=device, dtype=torch.int32))
        return mod

    def example_description(self, cfg, linear):
        from ..formats.block_sparse import block_grid, keep_count

        nb, kb = block_grid((linear.out_features, linear.in_features), cfg.block_size)
        keep = keep_count(nb * kb, cfg.sparsity if cfg.sparsity is not None else 0.0)
        return {"scheme": self.name, "format_version": self.format_version, "module": "BlockSparseLinear",
                "params": {"in_features": linear.in_features, "out_features": linear.out_features,
                           "bias": linear.bias is not None, "block_size": list(cfg.block_size),
                           "dtype": dtype_name(linear.weight.dtype), "num_blocks": keep}}

    def report_details(self, cfg, layers):
        return {"block_size": list(cfg.block_size), "sparsity": cfg.sparsity}
