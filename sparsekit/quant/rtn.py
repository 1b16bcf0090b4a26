"""The group-wise integer grid shared by every sparsekit quantizer, and round-to-nearest.

Grid (the same one :mod:`sparsekit.formats.int4` packs): the input features
(columns) of a weight ``(N, K)`` are cut into groups of ``group_size``
consecutive columns (``-1``: one group per row); each row and group has a
float32 ``scale`` and ``zero`` and integer codes ``q`` in ``0 .. 2**bits - 1``
with ``w_hat = (q - zero) * scale``.

* asymmetric: ``lo = min(min(w), 0)``, ``hi = max(max(w), 0)`` over the group
  (the range always contains 0, so 0 is exactly representable and an
  all-positive or all-negative group is not clipped),
  ``scale = (hi - lo) / (2**bits - 1)``,
  ``zero = clamp(round(-lo / scale), 0, 2**bits - 1)``,
  ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)``;
* symmetric: ``zero = 2**(bits - 1)`` (8 for int4, 128 for int8),
  ``scale = max|w| / (2**(bits - 1) - 1)`` (``/ 7`` for int4, ``/ 127`` for int8),
  ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)``.

An all-zero group gets ``scale = 1``.  ``round`` is :func:`torch.round` (ties
to even).  For ``bits=4`` this is exactly the grid of
:func:`sparsekit.formats.int4.rtn_quantize`, so the codes, scales and zeros
pack into :class:`sparsekit.formats.int4.Int4Weight` unchanged (its scales
are stored in float16/bfloat16, which rounds them once more).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = [
    "GROUP_SIZES", "QuantResult", "check_quant_args", "grid_params", "quantize_codes", "dequantize_codes",
    "rtn_quantize", "g_idx_from_perm",
]

# group sizes of the packed int4 layout (-1 = one group per row)
GROUP_SIZES = (32, 64, 128, -1)
_MIN_BITS, _MAX_BITS = 2, 8


@dataclass
class QuantResult:
    """Output of every quantizer (RTN, GPTQ, AWQ).

    ``q``: uint8 codes ``(N, K)``; ``scales``/``zeros``: float32 ``(N, G)``
    with ``G = K / group_size``; ``group_size``: the effective group size
    (``K`` when ``-1`` was asked for); ``symmetric``; ``bits``.

    ``input_scale`` (AWQ only, else None): float32 ``(K,)`` per-input-channel
    scale ``s``; the codes then quantize ``W * s`` (columns scaled), so the
    layer must compute ``(x / s) @ dequantize().T`` (or fold ``1/s`` into the
    previous op).  :meth:`effective_weight` is ``dequantize() / s``, the plain
    weight that does the same with unscaled inputs.

    ``perm`` (GPTQ with act-order and dynamic groups only, else None): int64
    ``(K,)``, the order in which the columns were processed; groups are
    consecutive in that order, so group ``g`` holds the original columns
    ``perm[g * group_size:(g + 1) * group_size]`` and ``scales[:, g]`` /
    ``zeros[:, g]`` are theirs.  ``q`` stays in the original column order;
    :attr:`g_idx` is the group of every original column.  Pack it with
    ``Int4Weight.from_quantized(q, scales, zeros, ..., perm=perm)``.
    """
    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    symmetric: bool
    bits: int
    input_scale: Optional[torch.Tensor] = None
    perm: Optional[torch.Tensor] = None

    @property
    def shape(self) -> tuple:
        return tuple(self.q.shape)

    @property
    def num_groups(self) -> int:
        return int(self.scales.shape[1])

    @property
    def g_idx(self) -> torch.Tensor:
        """int64 ``(K,)``: the group of every original column (``rank in perm // group_size``)."""
        k = self.q.shape[1]
        if self.perm is None:
            return torch.arange(k, device=self.q.device) // self.group_size
        return g_idx_from_perm(self.perm, self.group_size)

    def dequantize(self) -> torch.Tensor:
        """``(q - zero) * scale`` as float32 ``(N, K)`` in the original column order (still in the
        ``W * s`` domain for AWQ)."""
        return dequantize_codes(self.q, self.scales, self.zeros, self.group_size,
                                None if self.perm is None else self.g_idx)

    def effective_weight(self) -> torch.Tensor:
        """The float32 ``(N, K)`` weight to use with unscaled inputs: ``dequantize() / input_scale``."""
        w = self.dequantize()
        if self.input_scale is not None:
            w = w / self.input_scale.to(w.device, torch.float32)
        return w


def check_quant_args(k: int, group_size: int, bits: int = 4) -> int:
    """Validate ``(group_size, bits)`` for ``K = k`` input features; return the effective group size."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not _MIN_BITS <= bits <= _MAX_BITS:
        raise ValueError(f"bits must be between {_MIN_BITS} and {_MAX_BITS} (codes are uint8), got {bits}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} (-1 = whole row), got {group_size}")
    if group_size == -1:
        return int(k)
    if k % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide the number of input features K={k}")
    return group_size


def _check_weight(w) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {w.dtype}")
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds non-finite values")
    return w


def grid_params(wg: torch.Tensor, symmetric: bool, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` (float32, shape ``wg.shape[:-1]``) of the groups along the last dim of ``wg``."""
    maxq = (1 << bits) - 1
    wg = wg.float()
    if symmetric:
        half = 1 << (bits - 1)
        amax = wg.abs().amax(dim=-1)
        scale = amax / (half - 1)
        scale = torch.where(amax > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, float(half))
        return scale, zero
    lo = wg.amin(dim=-1).clamp(max=0.0)
    hi = wg.amax(dim=-1).clamp(min=0.0)
    rng = hi - lo
    scale = torch.where(rng > 0, rng / maxq, torch.ones_like(rng))
    zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Codes ``clamp(round(w / scale) + zero, 0, 2**bits - 1)`` (same float dtype as ``w``; broadcasting)."""
    maxq = (1 << bits) - 1
    return torch.clamp(torch.round(w / scale.to(w.dtype)) + zero.to(w.dtype), 0, maxq)


def g_idx_from_perm(perm: torch.Tensor, group_size: int) -> torch.Tensor:
    """int64 ``(K,)`` group of every column for groups consecutive in the order ``perm``."""
    perm = perm.to(torch.int64)
    rank = torch.empty_like(perm)
    rank[perm] = torch.arange(perm.numel(), device=perm.device)
    return rank // group_size


def dequantize_codes(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                     g_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float32 ``(q - zero) * scale`` of uint8 codes ``(N, K)`` with per-group ``(N, G)`` parameters;
    ``g_idx`` (``(K,)``, optional): the group of each column (default: consecutive groups)."""
    n, k = q.shape
    if g_idx is not None:
        gi = g_idx.to(device=q.device, dtype=torch.int64)
        return (q.to(torch.float32) - zeros.to(torch.float32)[:, gi]) * scales.to(torch.float32)[:, gi]
    g = k // group_size
    qg = q.to(torch.float32).reshape(n, g, group_size)
    out = (qg - zeros.to(torch.float32).reshape(n, g, 1)) * scales.to(torch.float32).reshape(n, g, 1)
    return out.reshape(n, k)


def rtn_quantize(w: torch.Tensor, group_size: int = 128, symmetric: bool = False, bits: int = 4) -> QuantResult:
    """Round-to-nearest group-wise quantization of a weight ``(N, K)`` (see the module doc for the grid)."""
    w = _check_weight(w)
    n, k = w.shape
    gs = check_quant_args(k, group_size, bits)
    wg = w.detach().float().reshape(n, k // gs, gs)
    scale, zero = grid_params(wg, symmetric, bits)
    q = quantize_codes(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return QuantResult(q=q.reshape(n, k).to(torch.uint8), scales=scale.contiguous(), zeros=zero.contiguous(),
                       group_size=gs, symmetric=bool(symmetric), bits=bits)
