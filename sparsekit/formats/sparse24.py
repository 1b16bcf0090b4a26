"""Compressed 2:4 (semi-structured) weight container.

Layout, for a weight ``W`` of shape ``(N, K)`` (out_features, in_features):

* ``K`` is zero-padded to ``Kp = ceil(K / 8) * 8`` (a whole metadata byte);
  the padding is zeros, so a row's last partial group must itself have at most
  two non-zeros among its real entries.
* ``values``: ``(N, Kp // 2)`` in the weight's dtype.  Group ``g`` (dense
  columns ``4g .. 4g+3``) stores its two kept entries at ``values[:, 2g]`` and
  ``values[:, 2g + 1]``, in increasing column order.
* ``meta``: ``(N, Kp // 8)`` uint8.  Each group has a 4-bit code
  ``i0 | (i1 << 2)`` with ``i0 < i1`` its two kept positions in ``0..3``;
  byte ``meta[:, j]`` holds group ``2j`` in its low nibble and ``2j + 1`` in its
  high nibble.  A group with fewer than two non-zeros stores its non-zero
  position(s) plus the lowest free position(s), with zero values.

So the compressed weight reads ``Kp/2 * itemsize + Kp/8`` bytes per row:
56.25% of dense for fp16/bf16.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Sparse24Weight"]

# all 6 ways to pick 2 of 4 positions, as (i0, i1) with i0 < i1
_PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def padded_k(k: int) -> int:
    return (k + 7) // 8 * 8


@dataclass
class Sparse24Weight:
    """A 2:4 sparse weight: compressed ``values`` plus packed 2-bit ``meta``."""

    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        if len(self.shape) != 2:
            raise ValueError(f"Sparse24Weight.shape must be (out_features, in_features), got {self.shape}")
        n, k = self.shape
        kp = padded_k(k)
        if not isinstance(self.values, torch.Tensor) or not isinstance(self.meta, torch.Tensor):
            raise TypeError("Sparse24Weight.values and .meta must be tensors")
        if tuple(self.values.shape) != (n, kp // 2):
            raise ValueError(f"values must have shape {(n, kp // 2)} for a {self.shape} weight, got {tuple(self.values.shape)}")
        if tuple(self.meta.shape) != (n, kp // 8):
            raise ValueError(f"meta must have shape {(n, kp // 8)} for a {self.shape} weight, got {tuple(self.meta.shape)}")
        if self.meta.dtype != torch.uint8:
            raise TypeError(f"meta must be uint8, got {self.meta.dtype}")
        if not self.values.is_floating_point():
            raise TypeError(f"values must be floating point, got {self.values.dtype}")
        if self.values.device != self.meta.device:
            raise ValueError(f"values ({self.values.device}) and meta ({self.meta.device}) are on different devices")

    # ------------------------------------------------------------- properties
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel()

    def to(self, *args, **kwargs) -> "Sparse24Weight":
        """Move/cast like ``Tensor.to``; ``meta`` keeps dtype uint8."""
        values = self.values.to(*args, **kwargs)
        meta = self.meta.to(device=values.device)
        return Sparse24Weight(values, meta, self.shape)

    # ------------------------------------------------------------- conversion
    @staticmethod
    def decode_indices(meta: torch.Tensor) -> torch.Tensor:
        """``(N, Kp/8)`` uint8 -> ``(N, Kp/4, 2)`` int64 kept positions per group."""
        m = meta.to(torch.int64)
        nib = torch.stack([m & 0xF, m >> 4], dim=-1).reshape(m.shape[0], -1)  # (N, Kp/4)
        return torch.stack([nib & 3, nib >> 2], dim=-1)

    @staticmethod
    def columns_from_meta(meta: torch.Tensor) -> torch.Tensor:
        """``(N, Kp/8)`` uint8 -> ``(N, Kp/2)`` int64 dense column of each stored value."""
        idx = Sparse24Weight.decode_indices(meta)
        base = 4 * torch.arange(idx.shape[1], device=idx.device).view(1, -1, 1)
        return (base + idx).reshape(meta.shape[0], -1)

    def dense_columns(self) -> torch.Tensor:
        """``(N, Kp/2)`` int64: the dense column index of each stored value."""
        return self.columns_from_meta(self.meta)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> "Sparse24Weight":
        """Compress a dense 2:4-sparse ``(N, K)`` weight.

        If ``mask`` is given, ``weight * mask`` is compressed (the mask must be
        2:4; see :func:`sparsekit.prune.mask_2to4`).  Otherwise ``weight``
        itself must already have at most 2 non-zeros in every group of 4;
        a ValueError names the first group that does not.
        """
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got {weight.dtype}")
        w = weight.detach()
        if mask is not None:
            if mask.shape != w.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} must equal weight shape {tuple(w.shape)}")
            w = w * mask.to(device=w.device, dtype=torch.bool)
        n, k = w.shape
        kp = padded_k(k)
        if kp != k:
            w = torch.nn.functional.pad(w, (0, kp - k))
        g = w.reshape(n, kp // 4, 4)
        nz = g != 0
        cnt = nz.sum(-1)
        bad = cnt > 2
        if bool(bad.any()):
            row, grp = [int(v) for v in bad.nonzero()[0]]
            cols = list(range(4 * grp, min(4 * grp + 4, k)))
            raise ValueError(
                f"weight is not 2:4 sparse: row {row}, columns {cols[0]}..{cols[-1]} hold "
                f"{int(cnt[row, grp])} non-zeros (at most 2 of every 4 consecutive in_features may be non-zero); "
                f"prune it first, e.g. weight * sparsekit.prune.mask_2to4(weight)")
        # choose exactly two positions per group: the non-zeros first, then the
        # lowest free slots (rank by (not nz, position))
        pos = torch.arange(4, device=w.device)
        key = (~nz).to(torch.int64) * 4 + pos
        chosen = torch.sort(torch.topk(key, 2, dim=-1, largest=False).indices, dim=-1).values  # (n, G, 2)
        values = torch.gather(g, -1, chosen).reshape(n, kp // 2).contiguous()
        code = (chosen[..., 0] | (chosen[..., 1] << 2)).to(torch.int64)  # (n, G)
        code = code.reshape(n, kp // 8, 2)
        meta = (code[..., 0] | (code[..., 1] << 4)).to(torch.uint8).contiguous()
        return cls(values, meta, (n, k))

    def to_dense(self) -> torch.Tensor:
        """Exact dense ``(N, K)`` weight (zeros at pruned positions)."""
        n, k = self.shape
        kp = padded_k(k)
        dense = torch.zeros(n, kp, dtype=self.values.dtype, device=self.values.device)
        dense.scatter_(1, self.dense_columns(), self.values)
        return dense[:, :k].contiguous()

    def mask(self) -> torch.Tensor:
        """Boolean ``(N, K)`` mask of the stored positions (both slots of each group)."""
        n, k = self.shape
        m = torch.zeros(n, padded_k(k), dtype=torch.bool, device=self.meta.device)
        m.scatter_(1, self.dense_columns(), True)
        return m[:, :k]

    def __repr__(self) -> str:
        return f"Sparse24Weight(shape={self.shape}, dtype={self.dtype}, device={self.device}, nbytes={self.nbytes()})"
