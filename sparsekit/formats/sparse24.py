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

Two more pieces live here:

* :func:`mma_sp_meta` -- the metadata reordered into the per-lane order that
  the sparse tensor-core instruction ``mma.sp`` consumes (see its docstring),
  computed with torch ops on the metadata's own device and cached per metadata
  tensor (:func:`cached_mma_sp_meta`), so the CUDA kernel loads one 32-bit word
  per lane with no index arithmetic.
* :class:`Sparse24Int8Weight` -- the int8 variant: the same ``meta``, int8
  ``values`` and one float32 scale per output channel (symmetric, per-channel:
  ``W ~= values * scale[:, None]`` at the stored positions).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ._validate import as_contiguous, check_shape_pair, has_data, sparse24_columns, sparse24_dense, validate_sparse24, \
    validate_sparse24_int8

__all__ = ["Sparse24Weight", "Sparse24Int8Weight", "mma_sp_meta", "cached_mma_sp_meta", "MMA_K_WINDOW",
           "padded_k", "mma_padded_k", "TensorCache"]

#: Dense K columns covered by one metadata word per lane (see :func:`mma_sp_meta`).
MMA_K_WINDOW = 64
# the 4-bit code of a padding group: positions (0, 1) with zero values (valid for mma.sp)
_PAD_NIBBLE = 0x4

# all 6 ways to pick 2 of 4 positions, as (i0, i1) with i0 < i1
_PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def padded_k(k: int) -> int:
    return (k + 7) // 8 * 8


def mma_padded_k(k: int, multiple: int = MMA_K_WINDOW) -> int:
    """``k`` rounded up to ``multiple`` (the K padding of the mma.sp kernel's operands)."""
    return (k + multiple - 1) // multiple * multiple


def mma_sp_meta(meta: torch.Tensor, in_features: int, k_multiple: int = MMA_K_WINDOW) -> torch.Tensor:
    """Reorder 2:4 metadata into the per-lane words of ``mma.sp`` (m16n8k32 f16/bf16, m16n8k64 s8).

    ``meta`` is a :class:`Sparse24Weight`'s ``(N, Kp/8)`` uint8 metadata of a
    weight with ``in_features`` columns.  Returns an int32 tensor (bit
    patterns of uint32 words) of shape ``(ceil(N/16), Kpad/64, 32)`` with
    ``Kpad = mma_padded_k(in_features, k_multiple)``, on ``meta``'s device,
    contiguous, so the words a warp needs for one 16-row tile and one 64-column
    K window are 128 consecutive bytes.

    The sparse operand of the instruction is the weight (rows = output
    features).  For the 16-row tile ``T`` and the K window ``w`` (dense columns
    ``64w .. 64w+63``), lane ``l = 4*g + t`` (``g = l >> 2`` its group,
    ``t = l & 3`` its index in the group) holds::

        word = H[16T + g, 4w + t] | H[16T + g + 8, 4w + t] << 16

    where ``H[r, b]`` is row ``r``'s 16-bit metadata of dense columns
    ``16b .. 16b+15``: four 4-bit group codes ``i0 | i1 << 2``, the lowest
    group in the lowest bits -- which is exactly ``meta[r, 2b] | meta[r, 2b+1] << 8``
    of this format (the PTX ISA's metadata nibble is the same ``i0 | i1 << 2``
    with ``i0 < i1``, so no re-encoding is needed, only the move).

    * f16/bf16 ``mma.sp.m16n8k32``: a window is two k32 steps.  Step 0 uses
      sparsity selector 0 (lanes with ``t`` = 0, 1 supply the metadata: row
      ``g`` in the low half, row ``g+8`` in the high half, ``t`` = 0 for the
      step's columns 0-15 and ``t`` = 1 for 16-31); step 1 uses selector 1
      (``t`` = 2, 3 the same way).  One word load serves both steps.
    * s8 ``mma.sp.m16n8k64``: a window is one k64 step; every lane supplies
      metadata (selector 0), lane ``t`` the step's columns ``16t .. 16t+15``
      (the same word formula).

    Rows ``>= N`` and columns ``>= Kp`` are padding: code ``(0, 1)`` (a valid
    pattern) over zero values.  ``sparsekit/ops/_mma_sp_emulator.py`` replays
    the kernel's use of these words lane by lane and is tested against dense
    math; ``csrc/sparse24/sparse24_mma_sp.cu`` uses the same index formulas.
    """
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.uint8 or meta.dim() != 2:
        raise TypeError("meta must be a 2-D uint8 tensor (a Sparse24Weight's meta)")
    kp = padded_k(in_features)
    n = meta.shape[0]
    if meta.shape[1] != kp // 8:
        raise ValueError(f"meta has {meta.shape[1]} bytes per row; in_features={in_features} needs {kp // 8}")
    if k_multiple % MMA_K_WINDOW:
        raise ValueError(f"k_multiple must be a multiple of {MMA_K_WINDOW}, got {k_multiple}")
    kpad = mma_padded_k(max(in_features, 1), k_multiple)
    nt = (n + 15) // 16
    pad_byte = _PAD_NIBBLE | (_PAD_NIBBLE << 4)
    full = torch.full((nt * 16, kpad // 8), pad_byte, dtype=torch.uint8, device=meta.device)
    full[:n, : kp // 8] = meta
    b = full.to(torch.int64).view(nt * 16, kpad // 16, 2)
    h = b[..., 0] | (b[..., 1] << 8)                                  # (16 nt, Kpad/16): H[r, block]
    h = h.view(nt, 2, 8, kpad // 64, 4)                               # tile, row half, g, window, t
    words = h[:, 0] | (h[:, 1] << 16)                                 # (nt, g, window, t)
    words = words.permute(0, 2, 1, 3).reshape(nt, kpad // 64, 32)     # lane = 4 g + t
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    return words.to(torch.int32).contiguous()


class TensorCache:
    """A cache of values derived from tensors, keyed by tensor identity (not
    equality) and dropped when the tensor is freed; each entry remembers a key
    (e.g. the tensor's ``_version``) and is recomputed when that key changes."""

    def __init__(self):
        self._data: dict = {}

    def get(self, t: torch.Tensor, key, make):
        tid = id(t)
        hit = self._data.get(tid)
        if hit is not None and hit[0]() is t and hit[1] == key:
            return hit[2]
        value = make()
        try:
            ref = weakref.ref(t, lambda _r, tid=tid, d=self._data: d.pop(tid, None)
                              if d.get(tid, (None,))[0] is _r else None)
        except TypeError:  # not weakly referenceable: no caching
            return value
        self._data[tid] = (ref, key, value)
        return value

    def __len__(self) -> int:
        return len(self._data)


# metadata tensor -> ((version, in_features, k_multiple), reordered words)
_MMA_META_CACHE = TensorCache()


def cached_mma_sp_meta(meta: torch.Tensor, in_features: int, k_multiple: int = MMA_K_WINDOW) -> torch.Tensor:
    """:func:`mma_sp_meta`, computed once per metadata tensor (and again only
    if the tensor is modified in place: the cache is keyed on its version)."""
    key = (meta._version, int(in_features), int(k_multiple))
    return _MMA_META_CACHE.get(meta, key, lambda: mma_sp_meta(meta, in_features, k_multiple))


@dataclass
class Sparse24Weight:
    """A 2:4 sparse weight: compressed ``values`` plus packed 2-bit ``meta``.

    Built (and loaded) weights are validated once, in one O(size) pass
    (:func:`sparsekit.formats._validate.validate_sparse24`): shapes against
    ``shape``, every metadata nibble one of the six codes with ``i0 < i1``, and
    the values that sit in the zero padding of K (columns ``>= in_features``)
    finite.  ``values``/``meta`` are stored contiguous (a non-contiguous tensor
    is copied).  Tensors on the ``meta`` device get the structure checks only.
    """

    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple

    def __post_init__(self):
        self.shape = check_shape_pair(self.shape, "Sparse24Weight")
        self.validate(contents=False)
        self.values, self.meta = as_contiguous(self.values), as_contiguous(self.meta)
        self.validate()

    @classmethod
    def _trusted(cls, values: torch.Tensor, meta: torch.Tensor, shape) -> "Sparse24Weight":
        """A container around tensors whose contents are known valid (structure still checked)."""
        out = cls.__new__(cls)
        out.values, out.meta, out.shape = as_contiguous(values), as_contiguous(meta), tuple(int(s) for s in shape)
        out.validate(contents=False)
        return out

    # ------------------------------------------------------------------ checks
    def validate(self, contents: bool = True) -> None:
        """Raise ValueError/TypeError unless this is a well-formed 2:4 weight (see the class docstring)."""
        validate_sparse24(self.values, self.meta, self.shape, contents=contents)

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
        if not values.is_floating_point():
            raise TypeError(f"Sparse24Weight values must stay floating point, got {values.dtype}")
        meta = self.meta.to(device=values.device)
        if values.dtype != self.values.dtype and has_data(values) and values.numel():
            return Sparse24Weight(values, meta, self.shape)      # a cast can overflow padding values: re-check
        return Sparse24Weight._trusted(values, meta, self.shape)

    def mma_meta(self, k_multiple: int = MMA_K_WINDOW) -> torch.Tensor:
        """The metadata in ``mma.sp`` lane order (:func:`mma_sp_meta`), cached on ``meta``."""
        return cached_mma_sp_meta(self.meta, self.in_features, k_multiple)

    def to_int8(self) -> "Sparse24Int8Weight":
        """The int8 variant: same mask and metadata, values quantized per output channel."""
        return Sparse24Int8Weight.from_sparse24(self)

    # ------------------------------------------------------------- conversion
    @staticmethod
    def decode_indices(meta: torch.Tensor) -> torch.Tensor:
        """``(N, Kp/8)`` uint8 -> ``(N, Kp/4, 2)`` int64 kept positions per group."""
        m = meta.to(torch.int64)
        nib = torch.stack([m & 0xF, m >> 4], dim=-1).reshape(m.shape[0], 2 * m.shape[1])  # (N, Kp/4)
        return torch.stack([nib & 3, nib >> 2], dim=-1)

    @staticmethod
    def columns_from_meta(meta: torch.Tensor) -> torch.Tensor:
        """``(N, Kp/8)`` uint8 -> ``(N, Kp/2)`` int64 dense column of each stored value."""
        return sparse24_columns(meta)

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
            # where, not a product: a NaN at a pruned position must not survive as NaN * 0
            w = torch.where(mask.to(device=w.device, dtype=torch.bool), w, w.new_zeros(()))
        n, k = w.shape
        kp = padded_k(k)
        if kp != k:
            w = torch.nn.functional.pad(w, (0, kp - k))
        g = w.reshape(n, kp // 4, 4)
        nz = g != 0
        cnt = nz.sum(-1)
        bad = cnt > 2
        if has_data(w) and bool(bad.any()):
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
        # the codes are valid by construction and the padding holds zeros
        return cls._trusted(values, meta, (n, k))

    def to_dense(self) -> torch.Tensor:
        """Exact dense ``(N, K)`` weight (zeros at pruned positions)."""
        return sparse24_dense(self.values, self.meta, self.in_features)

    def mask(self) -> torch.Tensor:
        """Boolean ``(N, K)`` mask of the stored positions (both slots of each group)."""
        n, k = self.shape
        m = torch.zeros(n, padded_k(k), dtype=torch.bool, device=self.meta.device)
        m.scatter_(1, self.dense_columns(), True)
        return m[:, :k]

    def __repr__(self) -> str:
        return f"Sparse24Weight(shape={self.shape}, dtype={self.dtype}, device={self.device}, nbytes={self.nbytes()})"


@dataclass
class Sparse24Int8Weight:
    """A 2:4 sparse weight with int8 values and per-output-channel scales.

    ``values`` ``(N, Kp/2)`` int8 and ``meta`` ``(N, Kp/8)`` uint8 are laid out
    exactly as in :class:`Sparse24Weight`; ``scale`` ``(N,)`` float32 makes the
    represented weight ``W[n, k] = values * scale[n]`` at the stored positions
    (zero elsewhere).  Quantization is symmetric per output channel:
    ``scale = max|W[n, :]| / 127`` and ``values = clamp(round(W / scale), -127, 127)``.
    This is the weight half of the int8 2:4 path (GPUSQ-ViT style W8A8 with
    2:4 sparsity); activations are quantized per token at run time.
    """

    values: torch.Tensor
    meta: torch.Tensor
    scale: torch.Tensor
    shape: tuple

    def __post_init__(self):
        self.shape = check_shape_pair(self.shape, "Sparse24Int8Weight")
        self.validate(contents=False)
        self.values, self.meta, self.scale = (as_contiguous(t) for t in (self.values, self.meta, self.scale))
        self.validate()

    @classmethod
    def _trusted(cls, values, meta, scale, shape) -> "Sparse24Int8Weight":
        out = cls.__new__(cls)
        out.values, out.meta, out.scale = (as_contiguous(t) for t in (values, meta, scale))
        out.shape = tuple(int(s) for s in shape)
        out.validate(contents=False)
        return out

    def validate(self, contents: bool = True) -> None:
        """Raise ValueError/TypeError unless well formed: shapes, valid 2:4 codes, int8 values in
        [-127, 127], finite float32 scales."""
        validate_sparse24_int8(self.values, self.meta, self.scale, self.shape, contents=contents)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.values.device

    def nbytes(self) -> int:
        return self.values.numel() + self.meta.numel() + 4 * self.scale.numel()

    def to(self, device) -> "Sparse24Int8Weight":
        """Move to ``device`` (the dtypes are fixed)."""
        return Sparse24Int8Weight._trusted(self.values.to(device), self.meta.to(device), self.scale.to(device),
                                           self.shape)

    def mma_meta(self, k_multiple: int = 2 * MMA_K_WINDOW) -> torch.Tensor:
        """The metadata in ``mma.sp`` lane order (:func:`mma_sp_meta`), cached on ``meta``."""
        return cached_mma_sp_meta(self.meta, self.in_features, k_multiple)

    @classmethod
    def from_sparse24(cls, weight: Sparse24Weight) -> "Sparse24Int8Weight":
        """Quantize a float :class:`Sparse24Weight` (same mask, same metadata)."""
        if not isinstance(weight, Sparse24Weight):
            raise TypeError(f"weight must be a Sparse24Weight, got {type(weight).__name__}")
        v = weight.values.detach().float()
        if has_data(v) and not bool(torch.isfinite(v).all()):
            r, c = (int(i) for i in (~torch.isfinite(v)).nonzero()[0])
            raise ValueError(f"weight holds a non-finite value ({float(v[r, c])} in row {r}); int8 quantization "
                             "needs finite weights")
        amax = v.abs().amax(dim=1) if v.shape[1] else torch.zeros(v.shape[0], device=v.device)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = torch.clamp(torch.round(v / scale[:, None]), -127, 127).to(torch.int8)
        return cls(q.contiguous(), weight.meta.clone(), scale.contiguous(), weight.shape)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> "Sparse24Int8Weight":
        """Compress a dense 2:4 weight (as :meth:`Sparse24Weight.from_dense`) and quantize it."""
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            weight = weight.detach().float()
        return cls.from_sparse24(Sparse24Weight.from_dense(weight, mask))

    def int_dense(self) -> torch.Tensor:
        """The int8 dense ``(N, K)`` weight (zeros at pruned positions)."""
        return sparse24_dense(self.values, self.meta, self.in_features)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized dense weight ``values * scale`` in ``dtype``."""
        return (self.int_dense().float() * self.scale[:, None]).to(dtype)

    def __repr__(self) -> str:
        return f"Sparse24Int8Weight(shape={self.shape}, device={self.device}, nbytes={self.nbytes()})"
