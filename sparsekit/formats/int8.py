"""Per-output-channel symmetric int8 weight container (the weight of W8A8).

Grid, for a weight ``W`` of shape ``(N, K)`` (out_features, in_features):
``scale[n] = max_k |W[n, k]| / 127`` (1 for an all-zero row), computed in
float32, and ``q[n, k] = clamp(round_half_even(W[n, k] / scale[n]), -127, 127)``
(the code -128 is never used, so the grid is symmetric).

Storage (:class:`Int8Weight`): ``qweight`` ``(N, K)`` int8, row-major (K
contiguous; any K), and ``scales`` ``(N,)`` float32.  The scales stay float32
because the W8A8 kernel applies them in its fp32 epilogue
(``acc_int32 * x_scale[m] * w_scale[n]``); nothing is gained by rounding them.

Dequantized weight: ``q * scale`` in float32 (:meth:`Int8Weight.dequantize`),
cast to a half type on request.  Bytes per weight: 1 + 4 / K.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Int8Weight", "int8_quantize", "QMAX_W8"]

QMAX_W8 = 127


def int8_quantize(w: torch.Tensor):
    """``(q int8 (N, K), scales float32 (N,))`` -- round-to-nearest per-row symmetric int8."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"w must be floating point, got {w.dtype}")
    wf = w.detach().to(torch.float32)
    if wf.device.type != "meta" and not bool(torch.isfinite(wf).all()):
        r, c = (int(i) for i in (~torch.isfinite(wf)).nonzero()[0])
        raise ValueError(f"w holds a non-finite value ({float(wf[r, c])} at row {r}, column {c}); int8 quantization "
                         "needs finite weights")
    amax = wf.abs().amax(dim=1) if wf.shape[1] else torch.zeros(wf.shape[0], device=w.device)
    scales = torch.where(amax > 0, amax / QMAX_W8, torch.ones_like(amax))
    q = torch.clamp(torch.round(wf / scales[:, None]), -QMAX_W8, QMAX_W8)
    return q.to(torch.int8).contiguous(), scales.contiguous()


@dataclass
class Int8Weight:
    """Per-channel symmetric int8 weight; see the module docstring for the grid."""

    qweight: torch.Tensor
    scales: torch.Tensor
    shape: tuple

    def __post_init__(self):
        from ._validate import as_contiguous, check_shape_pair

        self.shape = check_shape_pair(self.shape, "Int8Weight")
        self.validate(contents=False)
        self.qweight, self.scales = as_contiguous(self.qweight), as_contiguous(self.scales)
        self.validate()

    def validate(self, contents: bool = True) -> None:
        """Shapes, dtypes and devices; with ``contents`` also codes in [-127, 127] and finite scales
        (:func:`sparsekit.formats._validate.validate_int8`)."""
        from ._validate import validate_int8

        validate_int8(self.qweight, self.scales, self.shape, contents=contents)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        return self.qweight.numel() + 4 * self.scales.numel()

    def to(self, device) -> "Int8Weight":
        out = Int8Weight.__new__(Int8Weight)
        out.qweight, out.scales, out.shape = self.qweight.to(device), self.scales.to(device), self.shape
        out.validate(contents=False)       # same contents, checked when self was built
        return out

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "Int8Weight":
        """Round-to-nearest per-output-channel quantization of a dense ``(N, K)`` weight."""
        q, s = int8_quantize(w)
        return cls(q, s, tuple(w.shape))

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``q * scale`` ``(N, K)``, float32 unless ``dtype`` is given."""
        w = self.qweight.to(torch.float32) * self.scales[:, None]
        return w if dtype is None else w.to(dtype)

    def __repr__(self) -> str:
        return f"Int8Weight(shape={self.shape}, device={self.device}, nbytes={self.nbytes()})"
