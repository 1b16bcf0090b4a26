"""One validator per packed format, shared by the containers, the modules' ``load_state_dict``
and the ops' ``*_packed`` entry points.

Each ``validate_*`` function takes the raw tensors of one format and raises a
``TypeError`` (wrong type / dtype) or ``ValueError`` (wrong shape, device or
contents) that names the tensor, the offending value and the valid range.
The checks come in two parts:

* structure (always): tensor types, dtypes, shapes against the declared
  ``shape``, one device -- no data is read, so no GPU synchronization;
* contents (``contents=True``): one O(size) pass over the data -- index ranges
  and monotonicity, 2:4 metadata codes, int4/int8 code and zero-point ranges,
  finite scales, finite values in padding positions.  Skipped for tensors on
  the ``meta`` device, which hold no data.

The validators never change their inputs; contiguity is the caller's business
(the containers store contiguous copies, the ops make operands contiguous).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["has_data", "validate_sparse24", "validate_sparse24_int8", "validate_block_sparse", "validate_int4",
           "validate_int8", "validate_sparse24_int4", "check_shape_pair", "VALID_META_NIBBLES",
           "sparse24_dense", "sparse24_columns"]

#: The six 4-bit 2:4 metadata codes ``i0 | i1 << 2`` with ``i0 < i1`` (kept positions in a group of 4).
VALID_META_NIBBLES = (0x4, 0x8, 0xC, 0x9, 0xD, 0xE)

_LUT_CACHE: dict = {}


def has_data(*ts) -> bool:
    """Whether every given tensor (``None`` ignored) holds data (is not on the ``meta`` device)."""
    return all(t is None or t.device.type != "meta" for t in ts)


def _name(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def check_shape_pair(shape, owner: str = "weight") -> tuple:
    """``shape`` as a pair of non-negative ints ``(out_features, in_features)``."""
    try:
        vals = tuple(shape)
        if len(vals) != 2 or any(isinstance(v, bool) or int(v) != v for v in vals):
            raise ValueError
        n, k = (int(v) for v in vals)
    except (TypeError, ValueError):
        raise ValueError(f"{owner} shape must be a pair of ints (out_features, in_features), got {shape!r}") from None
    if n < 0 or k < 0:
        raise ValueError(f"{owner} shape must be non-negative, got {(n, k)}")
    return n, k


def _tensor(t, owner: str, name: str, dtype=None, shape=None, floating: bool = False):
    full = _name(owner, name)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{full} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        ok = t.dtype in dtype if isinstance(dtype, tuple) else t.dtype == dtype
        if not ok:
            want = " or ".join(str(d).replace("torch.", "") for d in (dtype if isinstance(dtype, tuple) else (dtype,)))
            raise TypeError(f"{full} must be {want}, got {t.dtype}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{full} must be floating point, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{full} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def _same_device(owner: str, **tensors) -> None:
    items = [(k, t) for k, t in tensors.items() if t is not None]
    dev0 = items[0][1].device
    for k, t in items[1:]:
        if t.device != dev0:
            raise ValueError(f"{_name(owner, k)} is on {t.device} but {_name(owner, items[0][0])} is on {dev0}: "
                             "all tensors of a packed weight must be on one device")


def _first_bad(mask: torch.Tensor) -> list:
    return [int(v) for v in mask.nonzero()[0]]


def _check_finite(t: torch.Tensor, owner: str, name: str, what: str = "") -> None:
    if t.numel() == 0 or not t.is_floating_point():
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        idx = _first_bad(bad)
        v = float(t[tuple(idx)])
        raise ValueError(f"{_name(owner, name)}{what} must be finite, got {v} at index {idx}")


def _check_int_range(t: torch.Tensor, owner: str, name: str, lo: int, hi: int, integral: bool = False,
                     what: str = "") -> None:
    if t.numel() == 0:
        return
    tf = t if not t.is_floating_point() else t.float()
    bad = (tf < lo) | (tf > hi)
    if integral and t.is_floating_point():
        bad = bad | (tf != torch.round(tf)) | ~torch.isfinite(tf)
    if bool(bad.any()):
        idx = _first_bad(bad)
        v = t[tuple(idx)].item()
        kind = "integer values" if integral else "values"
        raise ValueError(f"{_name(owner, name)}{what} must hold {kind} in [{lo}, {hi}], got {v} at index {idx}")


# --------------------------------------------------------------------------- 2:4 helpers
def _meta_lut(device) -> torch.Tensor:
    key = str(device)
    lut = _LUT_CACHE.get(key)
    if lut is None:
        ok = torch.zeros(16, dtype=torch.bool)
        ok[list(VALID_META_NIBBLES)] = True
        byte = torch.arange(256)
        lut = (ok[byte & 0xF] & ok[byte >> 4]).to(device)
        _LUT_CACHE[key] = lut
    return lut


def _check_meta_codes(meta: torch.Tensor, owner: str, name: str = "meta") -> None:
    if meta.numel() == 0:
        return
    ok = _meta_lut(meta.device)[meta.to(torch.int64)]
    if not bool(ok.all()):
        r, j = _first_bad(~ok)
        b = int(meta[r, j])
        lo, hi = b & 0xF, b >> 4
        nib, grp = (lo, 2 * j) if lo not in VALID_META_NIBBLES else (hi, 2 * j + 1)
        i0, i1 = nib & 3, nib >> 2
        raise ValueError(
            f"{_name(owner, name)}[{r}, {j}] = 0x{b:02x} holds an invalid 2:4 code 0x{nib:x} for group {grp} "
            f"(columns {4 * grp}..{4 * grp + 3}): kept positions (i0={i0}, i1={i1}) must satisfy i0 < i1, "
            f"i.e. a nibble must be one of {', '.join(f'0x{c:x}' for c in VALID_META_NIBBLES)}")


def sparse24_columns(meta: torch.Tensor) -> torch.Tensor:
    """``(N, Kp/8)`` uint8 metadata -> ``(N, Kp/2)`` int64 dense column of each stored value."""
    m = meta.to(torch.int64)
    n, nbytes = m.shape
    nib = torch.stack([m & 0xF, m >> 4], dim=-1).reshape(n, 2 * nbytes)       # (N, Kp/4)
    idx = torch.stack([nib & 3, nib >> 2], dim=-1)                             # (N, Kp/4, 2)
    base = 4 * torch.arange(2 * nbytes, device=idx.device).view(1, -1, 1)
    return (base + idx).reshape(n, 4 * nbytes)


def sparse24_dense(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    """Dense ``(N, k)`` weight from 2:4 ``values``/``meta`` (no checks; zeros at pruned positions)."""
    n = values.shape[0]
    kp = meta.shape[1] * 8
    dense = torch.zeros(n, kp, dtype=values.dtype, device=values.device)
    if dense.numel():
        dense.scatter_(1, sparse24_columns(meta), values)
    return dense[:, :k].contiguous()


def _check_sparse24_padding(values: torch.Tensor, meta: torch.Tensor, k: int, owner: str,
                            name: str = "values") -> None:
    """Stored values whose column is >= ``k`` (the zero padding of K up to a multiple of 8) must be
    finite: the kernels multiply them by zero activations, and 0 * NaN would poison the output."""
    kp = meta.shape[1] * 8
    if kp == k or values.numel() == 0 or not values.is_floating_point():
        return
    # padding columns k .. kp-1 (fewer than 8) all lie in the last metadata byte
    cols = sparse24_columns(meta[:, -1:]) + (kp - 8)            # (N, 4)
    v = values[:, -4:]
    bad = (cols >= k) & ~torch.isfinite(v)
    if bool(bad.any()):
        r, j = _first_bad(bad)
        raise ValueError(f"{_name(owner, name)}[{r}, {values.shape[1] - 4 + j}] = {float(v[r, j])} sits in the "
                         f"zero padding (column {int(cols[r, j])} >= in_features={k}) and must be finite")


def validate_sparse24(values, meta, shape, *, contents: bool = True, owner: str = "Sparse24Weight",
                      meta_name: str = "meta") -> None:
    """``values`` ``(N, Kp/2)`` float, ``meta`` ``(N, Kp/8)`` uint8 of valid 2:4 codes, padding values finite.
    ``meta_name``: the name errors give the metadata (a module's buffer is ``meta_codes``)."""
    n, k = check_shape_pair(shape, owner)
    kp = (k + 7) // 8 * 8
    _tensor(values, owner, "values", floating=True, shape=(n, kp // 2))
    _tensor(meta, owner, meta_name, dtype=torch.uint8, shape=(n, kp // 8))
    _same_device(owner, **{"values": values, meta_name: meta})
    if contents and has_data(values, meta):
        _check_meta_codes(meta, owner, meta_name)
        _check_sparse24_padding(values, meta, k, owner)


def validate_sparse24_int8(values, meta, scale, shape, *, contents: bool = True,
                           owner: str = "Sparse24Int8Weight", meta_name: str = "meta") -> None:
    """int8 ``values`` in [-127, 127], valid ``meta`` codes, finite float32 ``scale`` ``(N,)``."""
    n, k = check_shape_pair(shape, owner)
    kp = (k + 7) // 8 * 8
    _tensor(values, owner, "values", dtype=torch.int8, shape=(n, kp // 2))
    _tensor(meta, owner, meta_name, dtype=torch.uint8, shape=(n, kp // 8))
    _tensor(scale, owner, "scale", dtype=torch.float32, shape=(n,))
    _same_device(owner, **{"values": values, meta_name: meta, "scale": scale})
    if contents and has_data(values, meta, scale):
        _check_meta_codes(meta, owner, meta_name)
        _check_int_range(values, owner, "values", -127, 127)
        _check_finite(scale, owner, "scale")


# --------------------------------------------------------------------------- block-sparse
def validate_block_sparse(blocks, crow, col, tcol_ptr, trow, tblk, shape, block_size, *, contents: bool = True,
                          owner: str = "BlockSparseWeight") -> None:
    """Blocks ``(nnzb, bm, bk)``, int32 indices of the right lengths; with ``contents``: ``crow``
    starts at 0, is non-decreasing and ends at nnzb, ``col`` in range and strictly increasing within
    a block-row, the transposed index equal to the one ``crow``/``col`` define, padding finite."""
    from .block_sparse import check_block_size, transpose_index

    n, k = check_shape_pair(shape, owner)
    bm, bk = check_block_size(block_size)
    nb, kb = -(-n // bm), -(-k // bk)
    _tensor(blocks, owner, "blocks", floating=True)
    if blocks.dim() != 3 or tuple(blocks.shape[1:]) != (bm, bk):
        raise ValueError(f"{_name(owner, 'blocks')} must have shape (nnzb, {bm}, {bk}) for block_size {(bm, bk)}, "
                         f"got {tuple(blocks.shape)}")
    nnzb = blocks.shape[0]
    want = {"crow": (crow, nb + 1), "col": (col, nnzb), "tcol_ptr": (tcol_ptr, kb + 1), "trow": (trow, nnzb),
            "tblk": (tblk, nnzb)}
    for name, (t, size) in want.items():
        _tensor(t, owner, name, dtype=torch.int32)
        if t.dim() != 1 or t.numel() != size:
            raise ValueError(f"{_name(owner, name)} must have shape ({size},) for a {(n, k)} weight with "
                             f"block_size {(bm, bk)} and {nnzb} blocks, got {tuple(t.shape)}")
    _same_device(owner, blocks=blocks, crow=crow, col=col, tcol_ptr=tcol_ptr, trow=trow, tblk=tblk)
    if not (contents and has_data(blocks, crow, col, tcol_ptr, trow, tblk)):
        return
    check_block_index(crow, col, n, k, (bm, bk), nnzb, owner)
    tptr_want, trow_want, tblk_want = transpose_index(crow, col, kb)
    for name, have, want_t in (("tcol_ptr", tcol_ptr, tptr_want), ("trow", trow, trow_want),
                               ("tblk", tblk, tblk_want)):
        if not torch.equal(have, want_t):
            i = _first_bad(have != want_t)[0]
            raise ValueError(f"the transposed index (tcol_ptr, trow, tblk) does not match crow/col: "
                             f"{_name(owner, name)}[{i}] = {int(have[i])}, expected {int(want_t[i])}; rebuild it "
                             "with BlockSparseWeight.from_blocks")
    _check_block_padding(blocks, crow, col, n, k, bm, bk, nb, kb, owner)


def check_block_index(crow: torch.Tensor, col: torch.Tensor, n: int, k: int, block_size, nnzb: int,
                      owner: str = "BlockSparseWeight") -> None:
    """Contents of the block-row index (any integer dtype): ``crow`` 0 .. nnzb non-decreasing,
    ``col`` in ``[0, KB)`` and strictly increasing within each block-row."""
    bm, bk = block_size
    nb, kb = -(-n // bm), -(-k // bk)
    c = crow.to(torch.int64)
    if int(c[0]) != 0:
        raise ValueError(f"{_name(owner, 'crow')} must start at 0 (and end at nnzb={nnzb}), got crow[0]={int(c[0])}")
    if int(c[-1]) != nnzb:
        raise ValueError(f"{_name(owner, 'crow')} must end at the number of blocks nnzb={nnzb}, got "
                         f"crow[{nb}]={int(c[-1])}")
    dec = c[1:] < c[:-1]
    if bool(dec.any()):
        r = _first_bad(dec)[0]
        raise ValueError(f"{_name(owner, 'crow')} must be non-decreasing: crow[{r}]={int(c[r])} > "
                         f"crow[{r + 1}]={int(c[r + 1])}")
    if nnzb == 0:
        return
    cl = col.to(torch.int64)
    oor = (cl < 0) | (cl >= kb)
    if bool(oor.any()):
        i = _first_bad(oor)[0]
        raise ValueError(f"{_name(owner, 'col')}[{i}] = {int(cl[i])} is out of range: a {(n, k)} weight with "
                         f"block_size {(bm, bk)} has block-columns 0..{kb - 1}")
    from .block_sparse import block_rows

    rows = block_rows(c, nnzb)
    bad = (rows[1:] == rows[:-1]) & (cl[1:] <= cl[:-1])
    if bool(bad.any()):
        i = _first_bad(bad)[0]
        raise ValueError(f"{_name(owner, 'col')} must be strictly increasing within a block-row: block-row "
                         f"{int(rows[i])} has col[{i}]={int(cl[i])} then col[{i + 1}]={int(cl[i + 1])}")


def _check_block_padding(blocks, crow, col, n, k, bm, bk, nb, kb, owner) -> None:
    """The parts of edge blocks beyond N rows / K columns must be finite (the kernels multiply
    them by zeros)."""
    if blocks.shape[0] == 0 or not blocks.is_floating_point():
        return
    if n % bm:
        lo, hi = int(crow[nb - 1]), int(crow[nb])
        if hi > lo:
            pad = blocks[lo:hi, n - (nb - 1) * bm:, :]
            if not bool(torch.isfinite(pad).all()):
                raise ValueError(f"{_name(owner, 'blocks')} of the last block-row hold non-finite values in rows "
                                 f">= out_features={n} (zero padding); they must be finite")
    if k % bk:
        last = (col.to(torch.int64) == kb - 1).nonzero().reshape(-1)
        if last.numel():
            pad = blocks[last][:, :, k - (kb - 1) * bk:]
            if not bool(torch.isfinite(pad).all()):
                raise ValueError(f"{_name(owner, 'blocks')} of the last block-column hold non-finite values in "
                                 f"columns >= in_features={k} (zero padding); they must be finite")


# --------------------------------------------------------------------------- int4 / int8
_SCALE_DTYPES = (torch.float16, torch.bfloat16)


def _check_group(group_size, kc: int, owner: str) -> int:
    from .int4 import resolve_group_size

    return resolve_group_size(group_size, kc)


def validate_int4(qweight, scales, zeros, shape, group_size, symmetric: bool, *, contents: bool = True,
                  owner: str = "Int4Weight") -> None:
    """``qweight`` ``(N, K/8)`` int32, ``scales`` (and ``zeros`` unless symmetric) ``(N, K/group_size)``
    float16/bfloat16; with ``contents``: finite scales, zeros integers in [0, 15]."""
    n, k = check_shape_pair(shape, owner)
    if k % 8:
        raise ValueError(f"{owner}: in_features K={k} must be a multiple of 8 to pack 8 int4 codes per int32 word")
    gs = _check_group(group_size, k, owner)
    g = k // gs if gs else 0
    _tensor(qweight, owner, "qweight", dtype=torch.int32, shape=(n, k // 8))
    _tensor(scales, owner, "scales", dtype=_SCALE_DTYPES, shape=(n, g))
    _check_zeros_arg(zeros, scales, symmetric, owner, (n, g))
    _same_device(owner, qweight=qweight, scales=scales, zeros=zeros)
    if contents and has_data(qweight, scales, zeros):
        _check_finite(scales, owner, "scales")
        if zeros is not None:
            _check_int_range(zeros, owner, "zeros", 0, 15, integral=True, what=" (int4 zero points)")


def _check_zeros_arg(zeros, scales, symmetric, owner, shape) -> None:
    if symmetric:
        if zeros is not None:
            raise ValueError(f"{owner}: a symmetric weight has no zeros (the zero point is fixed at 8); "
                             "pass zeros=None")
        return
    if zeros is None:
        raise ValueError(f"{owner}: an asymmetric weight needs zeros (use symmetric=True for a fixed zero of 8)")
    _tensor(zeros, owner, "zeros", shape=shape)
    if zeros.dtype != scales.dtype:
        raise TypeError(f"{_name(owner, 'zeros')} must have the scale dtype {scales.dtype}, got {zeros.dtype}")


def validate_int8(qweight, scales, shape, *, contents: bool = True, owner: str = "Int8Weight") -> None:
    """``qweight`` ``(N, K)`` int8 in [-127, 127], ``scales`` ``(N,)`` finite float32."""
    n, k = check_shape_pair(shape, owner)
    _tensor(qweight, owner, "qweight", dtype=torch.int8, shape=(n, k))
    _tensor(scales, owner, "scales", dtype=torch.float32, shape=(n,))
    _same_device(owner, qweight=qweight, scales=scales)
    if contents and has_data(qweight, scales):
        _check_int_range(qweight, owner, "qweight", -127, 127)
        _check_finite(scales, owner, "scales")


def validate_sparse24_int4(qweight, scales, zeros, meta, shape, group_size, symmetric: bool, *,
                           contents: bool = True, owner: str = "Sparse24Int4Weight", meta_name: str = "meta") -> None:
    """2:4 ``meta`` ``(N, KC/4)`` of valid codes plus an int4 weight over the ``KC`` compressed
    columns (``KC = round_up(K, 16) / 2``, ``group_size`` in compressed columns)."""
    n, k = check_shape_pair(shape, owner)
    kc = (k + 15) // 16 * 16 // 2
    gs = _check_group(group_size, kc, owner)
    g = kc // gs if gs else 0
    _tensor(qweight, owner, "qweight", dtype=torch.int32, shape=(n, kc // 8))
    _tensor(meta, owner, meta_name, dtype=torch.uint8, shape=(n, kc // 4))
    _tensor(scales, owner, "scales", dtype=_SCALE_DTYPES, shape=(n, g))
    _check_zeros_arg(zeros, scales, symmetric, owner, (n, g))
    _same_device(owner, **{"qweight": qweight, "scales": scales, "zeros": zeros, meta_name: meta})
    if contents and has_data(qweight, scales, zeros, meta):
        _check_meta_codes(meta, owner, meta_name)
        _check_finite(scales, owner, "scales")
        if zeros is not None:
            _check_int_range(zeros, owner, "zeros", 0, 15, integral=True, what=" (int4 zero points)")


def as_contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` itself when contiguous (or None), else a contiguous copy."""
    if t is None or t.is_contiguous():
        return t
    return t.contiguous()
