"""2:4 sparse weight with int4 kept values (the "2:4 + int4" compression scheme).

Built from a dense ``(N, K)`` weight that is 2:4 sparse (or a 2:4 mask):

1. ``K`` is zero-padded to ``Kp``, a multiple of 16, and compressed with
   :class:`~sparsekit.formats.Sparse24Weight`: kept values ``(N, Kp/2)`` and
   ``meta`` ``(N, Kp/8)`` uint8 (a 4-bit code per group of 4 columns);
2. the values matrix -- ``KC = Kp/2`` "compressed columns" per row -- is
   quantized group-wise to int4 along KC with :class:`~sparsekit.formats.Int4Weight`
   (``group_size`` in {32, 64, 128, -1} compressed columns, asymmetric or
   symmetric, scales in float16/bfloat16).

So a scale group of ``g`` compressed columns covers ``2g`` dense input
features.  Dequantized weight: expand ``Int4Weight.dequantize()`` through the
metadata (zeros elsewhere) -- exactly what the Triton kernel computes in
registers.  Padding groups (beyond ``K``) hold zeros.

Bytes per dense element at group size 64 with fp16 scales and zeros:
``(0.5 * 0.5) + 1/16 + 2 * 2 / (2 * 64) = 0.34`` -> 5.9x smaller than fp16
(int4 alone: 3.8x; 2:4 alone: 1.8x).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._validate import as_contiguous, check_shape_pair, validate_sparse24_int4
from .int4 import SCALE_DTYPES, Int4Weight, dequantize_int4, resolve_group_size
from .sparse24 import Sparse24Weight

__all__ = ["Sparse24Int4Weight", "k_padded16", "compressed_group_size"]


def k_padded16(k: int) -> int:
    """``k`` rounded up to a multiple of 16 (the compressed row then packs into whole int32 words)."""
    return (k + 15) // 16 * 16


def compressed_group_size(in_features: int, requested: Optional[int] = None) -> int:
    """The int4 group size (in compressed columns) for ``in_features``: ``requested`` if it fits, else
    the largest of 128/64/32 dividing ``KC = Kp/2``, else -1 (one group per row)."""
    kc = k_padded16(in_features) // 2
    if requested is not None:
        resolve_group_size(requested, kc)
        return requested
    for g in (128, 64, 32):
        if kc % g == 0:
            return g
    return -1


@dataclass
class Sparse24Int4Weight:
    """``qweight (N, KC/8)`` int32, ``scales``/``zeros (N, GC)``, ``meta (N, KC/4)`` uint8; see the module doc."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    meta: torch.Tensor
    shape: tuple           # (N, K) dense
    group_size: int        # in compressed columns; -1 is stored as KC
    symmetric: bool = False

    def __post_init__(self):
        self.shape = check_shape_pair(self.shape, "Sparse24Int4Weight")
        self.symmetric = bool(self.symmetric)
        self.validate(contents=False)
        self.qweight, self.scales, self.zeros, self.meta = (
            as_contiguous(t) for t in (self.qweight, self.scales, self.zeros, self.meta))
        self.validate()

    @classmethod
    def _trusted(cls, qweight, scales, zeros, meta, shape, group_size, symmetric) -> "Sparse24Int4Weight":
        out = cls.__new__(cls)
        out.qweight, out.scales, out.zeros, out.meta = (as_contiguous(t) for t in (qweight, scales, zeros, meta))
        out.shape, out.group_size, out.symmetric = tuple(int(v) for v in shape), group_size, bool(symmetric)
        out.validate(contents=False)
        return out

    def validate(self, contents: bool = True) -> None:
        """Shapes, dtypes and devices; with ``contents`` also valid 2:4 codes, finite scales and zero
        points in [0, 15] (:func:`sparsekit.formats._validate.validate_sparse24_int4`)."""
        validate_sparse24_int4(self.qweight, self.scales, self.zeros, self.meta, self.shape, self.group_size,
                               self.symmetric, contents=contents)

    # ------------------------------------------------------------------ properties
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def compressed_k(self) -> int:
        return k_padded16(self.in_features) // 2

    @property
    def effective_group_size(self) -> int:
        return resolve_group_size(self.group_size, self.compressed_k)

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        ts = [self.qweight, self.scales, self.meta] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def to(self, device) -> "Sparse24Int4Weight":
        return Sparse24Int4Weight._trusted(self.qweight.to(device), self.scales.to(device),
                                           None if self.zeros is None else self.zeros.to(device),
                                           self.meta.to(device), self.shape, self.group_size, self.symmetric)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: Optional[torch.Tensor] = None, group_size: Optional[int] = None,
                   symmetric: bool = False, dtype: Optional[torch.dtype] = None) -> "Sparse24Int4Weight":
        """Compress a 2:4 ``(N, K)`` weight (or ``weight * mask``) and quantize its kept values (RTN).

        ``group_size``: compressed columns per scale (default: :func:`compressed_group_size`).
        ``dtype``: scale dtype (default: the weight's if float16/bfloat16, else float16).
        A weight that is not 2:4 raises ValueError (from :class:`Sparse24Weight`).
        """
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        if dtype is None:
            dtype = weight.dtype if weight.dtype in SCALE_DTYPES else torch.float16
        if dtype not in SCALE_DTYPES:
            raise TypeError(f"scale dtype must be float16 or bfloat16, got {dtype}")
        n, k = weight.shape
        gs = compressed_group_size(k, group_size)
        kp = k_padded16(k)
        w = weight.detach()
        if mask is not None:
            if mask.shape != w.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} must equal weight shape {tuple(w.shape)}")
            # where, not a product: a NaN at a pruned position must not survive as NaN * 0
            w = torch.where(mask.to(device=w.device, dtype=torch.bool), w, w.new_zeros(()))
        sp = Sparse24Weight.from_dense(torch.nn.functional.pad(w, (0, kp - k)))
        q = Int4Weight.from_float(sp.values.float(), gs, symmetric, dtype)
        return cls(q.qweight, q.scales, q.zeros, sp.meta, (n, k), gs, bool(symmetric))

    # ------------------------------------------------------------------ views
    def values(self) -> torch.Tensor:
        """``(N, KC)`` dequantized kept values in the scale dtype."""
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.effective_group_size, self.compressed_k)

    def sparse24(self) -> Sparse24Weight:
        """The dequantized weight as a (padded-K) :class:`Sparse24Weight`."""
        return Sparse24Weight._trusted(self.values(), self.meta, (self.out_features, 2 * self.compressed_k))

    def to_dense(self) -> torch.Tensor:
        """``(N, K)`` dense dequantized weight in the scale dtype (zeros at pruned positions)."""
        return self.sparse24().to_dense()[:, : self.in_features].contiguous()

    def mask(self) -> torch.Tensor:
        """Boolean ``(N, K)`` mask of the stored positions."""
        return self.sparse24().mask()[:, : self.in_features]

    def __repr__(self) -> str:
        return (f"Sparse24Int4Weight(shape={self.shape}, group_size={self.group_size}, symmetric={self.symmetric}, "
                f"dtype={self.dtype}, device={self.device}, nbytes={self.nbytes()})")

