"""Shared helpers for sparsekit's numerical-equivalence tests.

Every kernel family's tests use these: relative-norm error bounds per dtype,
output poisoning (NaN-filled outputs, so an element a kernel forgot to write is
caught), odd-shape generators and the "no worse than 2x PyTorch's own error"
check.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator, Sequence

import torch

__all__ = [
    "REL_TOL", "rel_err", "tolerance", "assert_close_rel", "assert_within_torch_error",
    "poison_outputs", "poisoning", "alloc_output", "assert_all_written",
    "ODD_M", "ODD_NK", "odd_shapes", "noncontiguous", "randn", "random_2to4",
]

# relative-norm bounds ||out - ref|| / ||ref|| against a float64 reference
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}

# unit roundoff, the floor used when PyTorch's own error is ~0
_UNIT = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` computed in float64 (0 when both are 0)."""
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: out {tuple(out.shape)} vs ref {tuple(ref.shape)}")
    o = out.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    num = torch.linalg.vector_norm(o - r).item()
    den = torch.linalg.vector_norm(r).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def tolerance(dtype: torch.dtype) -> float:
    try:
        return REL_TOL[dtype]
    except KeyError:
        raise ValueError(f"no tolerance defined for {dtype}") from None


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None,
                     bound: float | None = None, what: str = "output") -> float:
    """Assert all-finite ``out`` within the dtype's relative-norm bound of ``ref``."""
    dtype = dtype or out.dtype
    bound = tolerance(dtype) if bound is None else bound
    if not bool(torch.isfinite(out).all()):
        bad = (~torch.isfinite(out)).nonzero()[0].tolist()
        raise AssertionError(f"{what}: non-finite value at index {bad} (unwritten output?)")
    e = rel_err(out, ref)
    if not e <= bound:
        raise AssertionError(f"{what}: relative error {e:.3e} exceeds {bound:.1e} for {dtype}")
    return e


def assert_within_torch_error(out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor,
                              factor: float = 2.0, what: str = "output") -> tuple[float, float]:
    """The kernel's error against the fp64 truth is at most ``factor`` x PyTorch's
    error for the same computation in the same dtype (FlashAttention-style),
    with the dtype's unit roundoff as a floor."""
    ek = rel_err(out, ref64)
    et = rel_err(torch_out, ref64)
    floor = 4 * _UNIT.get(out.dtype, 0.0)
    if not ek <= factor * max(et, floor):
        raise AssertionError(f"{what}: kernel error {ek:.3e} > {factor} x torch error {et:.3e} (floor {floor:.1e})")
    return ek, et


# --------------------------------------------------------------------------- poisoning
_poison = threading.local()


def poisoning() -> bool:
    return getattr(_poison, "on", False)


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Within this block every op output allocated by sparsekit is NaN-filled
    before the kernel runs, so :func:`assert_all_written` finds holes."""
    prev = poisoning()
    _poison.on = True
    try:
        yield
    finally:
        _poison.on = prev


def alloc_output(shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """Output allocation used by every op: ``empty`` normally, NaN when poisoning."""
    if poisoning() and dtype.is_floating_point:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def assert_all_written(out: torch.Tensor, what: str = "output") -> None:
    nan = torch.isnan(out)
    if bool(nan.any()):
        idx = nan.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(nan.sum())} element(s) never written (first at {idx})")


# --------------------------------------------------------------------------- shapes and data
# M values every GEMM-like op is tested at: 1, odd, prime, one above a tile
ODD_M = (1, 3, 17, 128)
# (N, K) pairs: size 1, primes, and sizes one off every block size
ODD_NK = ((1, 8), (5, 7), (17, 37), (33, 100), (65, 129), (96, 61))


def odd_shapes(ms: Sequence[int] = ODD_M, nks: Sequence[tuple] = ODD_NK) -> list:
    """Cartesian product of M values and (N, K) pairs as (M, N, K) tuples."""
    return [(m, n, k) for m in ms for (n, k) in nks]


def randn(*shape, dtype=torch.float32, device="cpu", generator=None, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator, dtype=torch.float32) * scale).to(dtype=dtype, device=device)


def noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """A view of ``x``'s values whose last dim has stride 2 (not contiguous)."""
    buf = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    buf[..., ::2] = x
    buf[..., 1::2] = float("nan")
    view = buf[..., ::2]
    assert not view.is_contiguous() or x.shape[-1] <= 1
    return view


def random_2to4(n: int, k: int, dtype=torch.float32, device="cpu", generator=None) -> torch.Tensor:
    """A random dense (n, k) weight pruned to 2:4 by magnitude."""
    from .prune import mask_2to4

    w = torch.randn(n, k, generator=generator, dtype=torch.float32)
    return (w * mask_2to4(w)).to(dtype=dtype, device=device)
