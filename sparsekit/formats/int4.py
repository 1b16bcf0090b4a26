"""Group-wise int4 weight container (4-bit codes, per-group scales and zeros).

Quantization grid, for a weight ``W`` of shape ``(N, K)`` (out_features,
in_features) and groups of ``group_size`` consecutive input features
(``group_size`` in {32, 64, 128} or ``-1`` = the whole row is one group, i.e.
``group_size = K``; ``K % group_size`` must be 0):

* asymmetric (default):  ``lo = min(min(w), 0)``, ``hi = max(max(w), 0)`` over
  the group (the range always contains 0, as GPTQ/AWQ do, so the zero point is
  a valid code); ``scale = (hi - lo) / 15`` (1 where the range is 0);
  ``zero = clamp(round(-lo / scale), 0, 15)``;
  ``q = clamp(round(w / scale) + zero, 0, 15)``.
* symmetric: ``scale = max|w| / 7`` (1 where the group is all zero), the zero
  point is fixed at 8 and not stored, ``q = clamp(round(w / scale) + 8, 0, 15)``.

Dequantized weight: ``w_hat = (q - zero) * scale``, computed in the scale dtype
(``q - zero`` is an exact small integer; the product is rounded once).  The
kernels reproduce this bit for bit.

Storage (:class:`Int4Weight`):

* ``qweight``: ``(N, K // 8)`` int32; word ``j`` of row ``n`` holds the codes of
  columns ``8j .. 8j+7``.  Column ``8j + e`` sits in nibble (bits ``4p .. 4p+3``)

      p = e // 2        for even e   (nibbles 0..3: columns 8j, 8j+2, 8j+4, 8j+6)
      p = 4 + e // 2    for odd e    (nibbles 4..7: columns 8j+1, 8j+3, 8j+5, 8j+7)

  so ``(word >> 4s) & 0x000F000F`` (s = 0..3) yields the codes of columns
  ``8j+2s`` and ``8j+2s+1`` in the low and high 16-bit halves of one 32-bit
  register, ready to be OR-ed into the mantissas of two fp16/bf16 magic
  numbers at once.  ``K`` must be a multiple of 8.
* ``scales``: ``(N, G)`` with ``G = K // group_size``, float16 or bfloat16 (the
  activation dtype).
* ``zeros``: ``(N, G)`` in the scale dtype holding integer values in [0, 15],
  or ``None`` for symmetric weights (zero = 8).

Bytes per weight: 0.5 + (2 or 4) / group_size.

Input permutation (act-order with dynamic groups, GPTQ's ``desc_act=True``):
groups need not be consecutive input features.  Such a weight is described by
``g_idx`` (the group of every input feature) and stored with its columns
permuted so that every group is contiguous again: ``perm`` (int64 ``(K,)``, a
permutation of ``range(K)``) lists the original columns in packed order
(packed column ``i`` is original column ``perm[i]``; ``perm`` is a stable
argsort of ``g_idx``), and ``qweight`` / ``scales`` / ``zeros`` are the
ordinary layout above for the permuted weight.  A layer computes
``y = x[..., perm] @ W_packed^T``: the kernels are unchanged and only the
input is gathered once per call.  :meth:`Int4Weight.dequantize`,
:meth:`Int4Weight.unpack` and :attr:`Int4Weight.g_idx` speak of the original
column order; ``perm`` is None when the groups are consecutive.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Int4Weight", "rtn_quantize", "pack_int4", "unpack_int4", "dequantize_int4", "check_perm",
           "perm_from_g_idx", "ALLOWED_GROUP_SIZES", "SYMMETRIC_ZERO"]

ALLOWED_GROUP_SIZES = (32, 64, 128, -1)
SYMMETRIC_ZERO = 8
SCALE_DTYPES = (torch.float16, torch.bfloat16)

# nibble position of column e (0..7) inside its int32 word
_NIBBLE_POS = [e // 2 if e % 2 == 0 else 4 + e // 2 for e in range(8)]


def resolve_group_size(group_size: int, k: int) -> int:
    """The effective group size for ``k`` input features (``-1`` -> ``k``); ValueError if invalid."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size not in ALLOWED_GROUP_SIZES and group_size != k:
        raise ValueError(f"group_size must be one of {ALLOWED_GROUP_SIZES} (-1 = whole row), got {group_size}")
    gs = k if group_size == -1 else group_size
    if gs <= 0 or k % gs != 0:
        raise ValueError(f"in_features K={k} is not a multiple of group_size={group_size}")
    return gs


def _check_k8(k: int) -> None:
    if k % 8 != 0:
        raise ValueError(f"in_features K={k} must be a multiple of 8 to pack 8 int4 codes per int32 word")


def check_perm(perm, k: int, name: str = "perm") -> torch.Tensor:
    """``perm`` as a contiguous int64 ``(k,)`` tensor; TypeError / ValueError unless it is a permutation
    of ``range(k)`` (contents are not checked on the meta device)."""
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (int64, a permutation of range({k})), got "
                        f"{type(perm).__name__}")
    if perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer indices (int64), got {perm.dtype}")
    if tuple(perm.shape) != (k,):
        raise ValueError(f"{name} must have shape ({k},) (one index per input feature), got {tuple(perm.shape)}")
    p = perm.detach().to(torch.int64).contiguous()
    if k and p.device.type != "meta":
        lo, hi = int(p.min()), int(p.max())
        if lo < 0 or hi >= k:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} must be a permutation of range({k}); it holds the index {bad}")
        counts = torch.bincount(p, minlength=k)
        if bool((counts != 1).any()):
            i = int((counts != 1).nonzero()[0])
            raise ValueError(f"{name} must be a permutation of range({k}); index {i} appears {int(counts[i])} "
                             "times")
    return p


def perm_from_g_idx(g_idx, group_size: int, k: Optional[int] = None) -> Optional[torch.Tensor]:
    """The packed column order of a per-column group index: stable argsort of ``g_idx`` (int64 ``(K,)``),
    or None when the groups are already consecutive (``g_idx == arange(K) // group_size``).

    Every group ``0 .. K / group_size - 1`` must have exactly ``group_size`` members (ValueError)."""
    if not isinstance(g_idx, torch.Tensor):
        raise TypeError(f"g_idx must be a torch.Tensor of group indices (K,), got {type(g_idx).__name__}")
    if g_idx.is_floating_point() or g_idx.is_complex() or g_idx.dtype == torch.bool:
        raise TypeError(f"g_idx must hold integer group indices, got {g_idx.dtype}")
    if g_idx.dim() != 1 or (k is not None and g_idx.shape[0] != k):
        raise ValueError(f"g_idx must have shape ({k if k is not None else 'K'},) (one group index per input "
                         f"feature), got {tuple(g_idx.shape)}")
    k = g_idx.shape[0]
    gs = resolve_group_size(group_size, k)
    ng = k // gs
    gi = g_idx.detach().to(torch.int64)
    if k:
        lo, hi = int(gi.min()), int(gi.max())
        if lo < 0 or hi >= ng:
            raise ValueError(f"g_idx holds the group index {lo if lo < 0 else hi}; with K={k} and group_size={gs} "
                             f"groups are 0..{ng - 1}")
        counts = torch.bincount(gi, minlength=ng)
        if bool((counts != gs).any()):
            g = int((counts != gs).nonzero()[0])
            raise ValueError(f"g_idx: every group must have exactly group_size={gs} members; group {g} has "
                             f"{int(counts[g])}")
    if bool((gi == torch.arange(k, device=gi.device) // gs).all()):
        return None
    return torch.argsort(gi, stable=True)


def _g_idx_of(perm: Optional[torch.Tensor], k: int, gs: int, device) -> torch.Tensor:
    if perm is None:
        return torch.arange(k, device=device) // gs
    rank = torch.empty_like(perm)
    rank[perm] = torch.arange(k, device=perm.device)
    return rank // gs


def rtn_quantize(w: torch.Tensor, group_size: int = 128, symmetric: bool = False):
    """Round-to-nearest group-wise int4 quantization of a 2-D weight.

    Returns ``(q, scales, zeros)``: ``q`` uint8 ``(N, K)`` in [0, 15], ``scales``
    and ``zeros`` float32 ``(N, G)`` (zeros are all 8 when ``symmetric``).
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"w must be floating point, got {w.dtype}")
    n, k = w.shape
    gs = resolve_group_size(group_size, k)
    g = k // gs if gs else 0
    if w.device.type != "meta" and not bool(torch.isfinite(w).all()):
        r, c = (int(i) for i in (~torch.isfinite(w)).nonzero()[0])
        raise ValueError(f"w holds a non-finite value ({float(w[r, c])} at row {r}, column {c}); int4 quantization "
                         "needs finite weights")
    wg = w.detach().to(torch.float32).reshape(n, g, gs)
    if symmetric:
        amax = wg.abs().amax(dim=-1)
        scales = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))
        zeros = torch.full_like(scales, float(SYMMETRIC_ZERO))
    else:
        lo = wg.amin(dim=-1).clamp(max=0.0)
        hi = wg.amax(dim=-1).clamp(min=0.0)
        rng = hi - lo
        scales = torch.where(rng > 0, rng / 15.0, torch.ones_like(rng))
        zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.clamp(torch.round(wg / scales[..., None]) + zeros[..., None], 0, 15)
    return q.reshape(n, k).to(torch.uint8), scales.contiguous(), zeros.contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` integer codes in [0, 15] -> ``(N, K // 8)`` int32 in the module's nibble order."""
    n, k = q.shape
    _check_k8(k)
    q8 = q.to(torch.int64).reshape(n, k // 8, 8)
    shifts = torch.tensor([4 * p for p in _NIBBLE_POS], dtype=torch.int64, device=q.device)
    word = (q8 << shifts).sum(dim=-1)                 # < 2**32, exact in int64
    word = torch.where(word >= 2 ** 31, word - 2 ** 32, word)
    return word.to(torch.int32).contiguous()


def unpack_int4(qweight: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
    """``(N, K // 8)`` int32 -> ``(N, K)`` uint8 codes."""
    n, kw = qweight.shape
    word = qweight.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.tensor([4 * p for p in _NIBBLE_POS], dtype=torch.int64, device=qweight.device)
    q = (word[..., None] >> shifts) & 0xF
    q = q.reshape(n, kw * 8).to(torch.uint8)
    if k is not None and k != kw * 8:
        raise ValueError(f"qweight holds {kw * 8} columns, expected K={k}")
    return q


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                    group_size: int, k: int) -> torch.Tensor:
    """``(q - zero) * scale`` as an ``(N, K)`` tensor in the scale dtype (raw-tensor form)."""
    n = qweight.shape[0]
    q = unpack_int4(qweight, k).to(scales.dtype).reshape(n, k // group_size, group_size)
    z = zeros if zeros is not None else torch.full_like(scales, float(SYMMETRIC_ZERO))
    return ((q - z[..., None]) * scales[..., None]).reshape(n, k)


@dataclass
class Int4Weight:
    """Packed group-wise int4 weight; see the module docstring for the exact layout.

    ``perm`` (optional, int64 ``(K,)``): the input permutation of an act-order
    weight with non-consecutive groups (packed column ``i`` is original column
    ``perm[i]``); build such weights with :meth:`from_g_idx` or
    :meth:`from_quantized` (``perm=``).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    shape: tuple
    group_size: int
    symmetric: bool = False
    perm: Optional[torch.Tensor] = None

    def __post_init__(self):
        from ._validate import as_contiguous, check_shape_pair

        self.shape = check_shape_pair(self.shape, "Int4Weight")
        if isinstance(self.group_size, int) and not isinstance(self.group_size, bool) and self.group_size == -1:
            self.group_size = self.shape[1]
        self.symmetric = bool(self.symmetric)
        self.validate(check_values=False)
        self.qweight, self.scales, self.zeros = (as_contiguous(t) for t in (self.qweight, self.scales, self.zeros))
        if self.perm is not None:
            self.perm = check_perm(self.perm, self.shape[1]).to(self.qweight.device)
        self.validate()

    @classmethod
    def _trusted(cls, qweight, scales, zeros, shape, group_size, symmetric, perm=None) -> "Int4Weight":
        from ._validate import as_contiguous

        out = cls.__new__(cls)
        out.qweight, out.scales, out.zeros = (as_contiguous(t) for t in (qweight, scales, zeros))
        out.shape, out.group_size, out.symmetric = tuple(int(v) for v in shape), group_size, bool(symmetric)
        out.perm = perm
        out.validate(check_values=False)
        return out

    # ------------------------------------------------------------------ checks
    def validate(self, check_values: bool = True) -> None:
        """Shapes, dtypes and devices; with ``check_values`` also the contents (finite scales, zero
        points integers in [0, 15]).  See :func:`sparsekit.formats._validate.validate_int4`."""
        from ._validate import validate_int4

        validate_int4(self.qweight, self.scales, self.zeros, self.shape, self.group_size, self.symmetric,
                      contents=check_values)

    # ------------------------------------------------------------- properties
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def num_groups(self) -> int:
        return self.shape[1] // self.group_size

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def g_idx(self) -> torch.Tensor:
        """int64 ``(K,)``: the group of every original input feature (``arange(K) // group_size`` without
        a permutation)."""
        return _g_idx_of(self.perm, self.in_features, self.group_size, self.qweight.device)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        total = self.qweight.numel() * 4 + self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            total += self.zeros.numel() * self.zeros.element_size()
        if self.perm is not None:
            total += self.perm.numel() * self.perm.element_size()
        return total

    def to(self, device) -> "Int4Weight":
        """A copy on ``device`` (dtypes unchanged)."""
        zeros = self.zeros.to(device) if self.zeros is not None else None
        perm = self.perm.to(device) if self.perm is not None else None
        return Int4Weight._trusted(self.qweight.to(device), self.scales.to(device), zeros, self.shape,
                                   self.group_size, self.symmetric, perm)

    # ------------------------------------------------------------- conversion
    @classmethod
    def from_quantized(cls, q: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                       group_size: int, symmetric: bool, dtype: torch.dtype = torch.float16,
                       perm: Optional[torch.Tensor] = None) -> "Int4Weight":
        """Pack given integer codes ``q`` ``(N, K)`` in [0, 15] with ``scales``/``zeros`` ``(N, G)``.

        ``scales`` and ``zeros`` are cast to ``dtype`` (float16 or bfloat16).
        Symmetric weights take ``zeros=None`` (or all-8 zeros, which are dropped).
        ``perm`` (optional, a permutation of ``range(K)``): groups are
        consecutive in that order, i.e. group ``g`` holds the original columns
        ``perm[g * group_size:(g + 1) * group_size]`` (what
        :func:`sparsekit.quant.gptq_quantize` returns with act-order and
        dynamic groups); ``q`` is in the original column order either way.
        A ``perm`` that keeps every group consecutive is dropped.
        """
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
        if q.dim() != 2:
            raise ValueError(f"q must be 2-D (out_features, in_features), got shape {tuple(q.shape)}")
        if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
            raise TypeError(f"q must hold integer codes (e.g. uint8), got {q.dtype}")
        if dtype not in SCALE_DTYPES:
            raise TypeError(f"dtype (of scales/zeros) must be float16 or bfloat16, got {dtype}")
        n, k = q.shape
        _check_k8(k)
        gs = resolve_group_size(group_size, k)
        g = k // gs
        if q.numel() and q.device.type != "meta" and (int(q.min()) < 0 or int(q.max()) > 15):
            raise ValueError(f"q holds codes outside [0, 15] (min {int(q.min())}, max {int(q.max())})")
        if perm is not None:
            perm = check_perm(perm, k).to(q.device)
            if bool((_g_idx_of(perm, k, gs, q.device) == torch.arange(k, device=q.device) // gs).all()):
                perm = None                  # every group is already consecutive: no permutation needed
            else:
                q = q.index_select(1, perm)
        if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != (n, g):
            raise ValueError(f"scales must be a tensor of shape {(n, g)} (N, K // group_size), "
                             f"got {tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__}")
        if not scales.is_floating_point():
            raise TypeError(f"scales must be floating point, got {scales.dtype}")
        if zeros is not None:
            if not isinstance(zeros, torch.Tensor) or tuple(zeros.shape) != (n, g):
                raise ValueError(f"zeros must be a tensor of shape {(n, g)} or None")
            zeros = zeros.to(device=q.device, dtype=dtype)
        if symmetric:
            if zeros is not None and not bool((zeros == SYMMETRIC_ZERO).all()):
                raise ValueError("symmetric=True fixes every zero point at 8; got other zeros")
            zeros = None
        elif zeros is None:
            raise ValueError("an asymmetric weight needs zeros (use symmetric=True for a fixed zero of 8)")
        return cls(pack_int4(q), scales.to(device=q.device, dtype=dtype).contiguous(),
                   None if zeros is None else zeros.contiguous(), (n, k), gs, bool(symmetric), perm)

    @classmethod
    def from_g_idx(cls, q: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                   g_idx: torch.Tensor, group_size: int, symmetric: bool = False,
                   dtype: torch.dtype = torch.float16) -> "Int4Weight":
        """Pack codes whose groups are given per input feature, as GPTQ checkpoints with
        ``desc_act=True`` store them.

        ``q``: integer codes ``(N, K)`` in [0, 15] in the original column order;
        ``scales`` / ``zeros``: ``(N, G)``, column ``g`` the parameters of group
        ``g`` (``G = K / group_size``; ``zeros=None`` when ``symmetric``);
        ``g_idx``: integer ``(K,)``, the group of every column, so that
        ``w_hat[:, c] = (q[:, c] - zeros[:, g_idx[c]]) * scales[:, g_idx[c]]``.
        Every group must have exactly ``group_size`` members (ValueError
        otherwise).  The columns are stored in the order ``perm = stable
        argsort(g_idx)`` (None when ``g_idx`` is already ``arange(K) //
        group_size``), see the module doc; :meth:`dequantize` returns the
        weight in the original column order.
        """
        if not isinstance(q, torch.Tensor) or q.dim() != 2:
            raise ValueError(f"q must be a 2-D tensor (out_features, in_features), got "
                             f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
        k = q.shape[1]
        _check_k8(k)
        gs = resolve_group_size(group_size, k)
        perm = perm_from_g_idx(g_idx.to(q.device) if isinstance(g_idx, torch.Tensor) else g_idx, gs, k)
        return cls.from_quantized(q, scales, zeros, gs, symmetric, dtype=dtype, perm=perm)

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                   dtype: Optional[torch.dtype] = None) -> "Int4Weight":
        """Round-to-nearest quantization (:func:`rtn_quantize`) of a dense ``(N, K)`` weight.

        The scale dtype is ``dtype`` if given, else ``w.dtype`` for float16 /
        bfloat16 weights and float16 otherwise.
        """
        if dtype is None:
            dtype = w.dtype if isinstance(w, torch.Tensor) and w.dtype in SCALE_DTYPES else torch.float16
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            _check_k8(w.shape[1])
        q, scales, zeros = rtn_quantize(w, group_size, symmetric)
        return cls.from_quantized(q, scales, None if symmetric else zeros, group_size, symmetric, dtype)

    def unpack(self) -> torch.Tensor:
        """``(N, K)`` uint8 codes in [0, 15], in the original column order."""
        q = unpack_int4(self.qweight, self.in_features)
        return q if self.perm is None else _unpermute(q, self.perm)

    def zero_points(self) -> torch.Tensor:
        """``(N, G)`` zero points in the scale dtype (all 8 when symmetric)."""
        if self.zeros is None:
            return torch.full_like(self.scales, float(SYMMETRIC_ZERO))
        return self.zeros

    def dequantize(self) -> torch.Tensor:
        """``(N, K)`` dense weight ``(q - zero) * scale`` in the scale dtype, in the original column order."""
        w = dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, self.in_features)
        return w if self.perm is None else _unpermute(w, self.perm)

    def __repr__(self) -> str:
        return (f"Int4Weight(shape={self.shape}, group_size={self.group_size}, symmetric={self.symmetric}, "
                f"dtype={self.dtype}, device={self.device}, nbytes={self.nbytes()}"
                + (", act_order_perm=True" if self.perm is not None else "") + ")")


def _unpermute(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Columns of ``t`` (packed order) back in the original order: ``out[:, perm[i]] = t[:, i]``."""
    out = torch.empty_like(t)
    out[:, perm] = t
    return out

