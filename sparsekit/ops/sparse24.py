"""2:4 sparse linear: ``y = x @ W^T + bias`` with a compressed 2:4 weight.

Three ``torch.library`` custom ops (fake implementations included, so they
trace under ``torch.compile``):

* ``sparsekit::sparse24_linear``       forward, with autograd
* ``sparsekit::sparse24_grad_input``   dX = dY @ W
* ``sparsekit::sparse24_grad_values``  dValues = (dY^T @ X) at the stored positions

The gradient of the weight is taken with respect to the stored ``values``
only, so the 2:4 mask is preserved through fine-tuning.

Forward backends (``backend=`` or automatic, see :mod:`sparsekit.ops.dispatch`):

``cuda``        csrc: the small-M GEMV kernel for M <= 16 (fp32/fp16/bf16) and
                the ``mma.sp`` sparse-tensor-core GEMM otherwise (fp16/bf16);
                metadata reordered for ``mma.sp`` once per weight and cached
``triton``      the Triton kernels (``interpret``: the same on CPU)
``cusparselt``  ``torch._cslt_sparse_mm`` on a ``torch._cslt_compress``-ed copy
                of the weight, compressed once per weight and cached (fp16/bf16)
``dense``       ``F.linear`` on a dense expansion of the weight, expanded once per
                weight and cached: the dense cuBLAS speed at the dense weight's
                memory cost (kept in addition to the compressed weight)
``reference``   ``F.linear`` on a dense expansion made on every call

The backward of ``cuda``/``cusparselt`` runs the Triton kernels, that of
``dense`` the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import testing as _testing
from ..formats._validate import sparse24_columns, sparse24_dense, validate_sparse24
from ..formats.sparse24 import Sparse24Weight, TensorCache, padded_k
from ._checks import as_contiguous, check_bias, check_features, check_sparse24_shapes, check_x, validate_once
from . import dispatch
from ._dense import cached_weight, cpu_weight, dense_linear

__all__ = ["sparse24_linear", "sparse24_linear_packed"]

_HALF = ("fp16", "bf16")


def _cuda_accepts(m, n, k, dtype) -> bool:
    # GEMV for M <= 16 (any float dtype); mma.sp GEMM beyond (16-bit floats only)
    from . import _cuda

    return (m is not None and m <= _cuda.MAX_M) or (dtype in _HALF and _cuda.has_mma_sp())


def _cusparselt_accepts(m, n, k, dtype) -> bool:
    return dtype in _HALF


dispatch.register("sparse24_linear", dispatch.BACKENDS + ("cusparselt", "dense"),
                  accepts={"cuda": _cuda_accepts, "cusparselt": _cusparselt_accepts})
# the backward ops run on the forward's backend (the csrc kernels and cuSPARSELt
# are forward-only: such a forward differentiates with the Triton kernels)
_BACKWARD_BACKEND = {"cuda": "triton", "triton": "triton", "interpret": "interpret", "reference": "reference",
                     "cusparselt": "triton", "dense": "reference"}

# weight-derived operands cached per values tensor, keyed on (values version, meta version, tag)
_DENSE_CACHE = TensorCache()
_CSLT_CACHE = TensorCache()


def _cached(cache, values: torch.Tensor, meta: torch.Tensor, tag, make):
    return cache.get(values, (values._version, meta._version, id(meta), tag), make)


def dense_weight_cached(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    """The dense ``(N, K)`` weight, expanded once per (values, meta) tensor version (``dense`` backend)."""
    return _cached(_DENSE_CACHE, values, meta, ("dense", k),
                   lambda: _dense_from(values.detach(), meta, k))


# cuSPARSELt wants sizes that are multiples of these (conservative; the weight
# and x are zero-padded, which keeps them 2:4 and changes no result)
_CSLT_PAD_N, _CSLT_PAD_K, _CSLT_PAD_M = 32, 64, 16


def _cslt_compressed(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    def make():
        w = _dense_from(values.detach(), meta, k)
        n = w.shape[0]
        np_ = -(-n // _CSLT_PAD_N) * _CSLT_PAD_N
        kp = -(-k // _CSLT_PAD_K) * _CSLT_PAD_K
        if (np_, kp) != (n, k):
            w = F.pad(w, (0, kp - k, 0, np_ - n))
        return torch._cslt_compress(w.contiguous())
    return _cached(_CSLT_CACHE, values, meta, ("cslt", k), make)


def _cusparselt_linear(x2: torch.Tensor, values, meta, k: int, bias) -> torch.Tensor:
    n = values.shape[0]
    m = x2.shape[0]
    comp = _cslt_compressed(values, meta, k)
    kp = -(-k // _CSLT_PAD_K) * _CSLT_PAD_K
    mp = -(-m // _CSLT_PAD_M) * _CSLT_PAD_M
    np_ = -(-n // _CSLT_PAD_N) * _CSLT_PAD_N
    xt = x2
    if (mp, kp) != (m, k):
        xt = F.pad(x2, (0, kp - k, 0, mp - m))
    b = None
    if bias is not None:
        b = F.pad(bias, (0, np_ - n)) if np_ != n else bias
    # (Np x Kp) @ (Kp x Mp) = y^T
    yt = torch._cslt_sparse_mm(comp, xt.t().contiguous(), b)
    return yt[:n, :m].t().contiguous()


def _kernels(backend: str):
    from .. import kernels  # sparsekit.kernels

    return kernels.load("sparse24", interpret=(backend == "interpret"))


def _dense_from(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    return sparse24_dense(values, meta, k)


def cpu_dense_weight(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    """The ``dense`` backend's expansion (float32 on CPU), cached per (values, meta) version."""
    return cached_weight(("sp24", k), (values, meta), lambda: cpu_weight(_dense_from(values.detach(), meta, k)))


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


# ---------------------------------------------------------------------- forward
@torch.library.custom_op("sparsekit::sparse24_linear", mutates_args=())
def _sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, in_features: int,
                     bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    n = values.shape[0]
    lead = x.shape[:-1]
    if backend == "reference":
        w = _dense_from(values, meta, in_features)
        return F.linear(x, w, bias).contiguous()
    if backend == "dense":
        if x.device.type == "cpu":
            return dense_linear(x, cpu_dense_weight(values, meta, in_features), bias)
        return F.linear(x, dense_weight_cached(values, meta, in_features), bias).contiguous()
    # the kernels take row strides only: every weight-side operand with unit inner stride
    values, meta, bias = as_contiguous(values), as_contiguous(meta), as_contiguous(bias)
    x2 = _as_2d(x)
    out = _testing.alloc_output((x2.shape[0], n), x.dtype, x.device)
    if x2.shape[0] > 0 and n > 0:
        if in_features == 0:
            out.zero_()
            if bias is not None:
                out += bias
        elif backend == "cuda":
            from . import _cuda

            if x2.shape[0] <= _cuda.MAX_M:
                out = _cuda.sparse24_linear(x2, values, meta, in_features, bias)
            else:
                out = _cuda.sparse24_mma_sp(x2, values, meta, in_features, bias)
        elif backend == "cusparselt":
            out = _cusparselt_linear(x2, values, meta, in_features, bias)
        else:
            _kernels(backend).sparse24_linear(x2, values, meta, in_features, bias, out)
    return out.reshape(*lead, n)


@_sparse24_linear.register_fake
def _(x, values, meta, in_features, bias, backend):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


# ---------------------------------------------------------------------- backward ops
@torch.library.custom_op("sparsekit::sparse24_grad_input", mutates_args=())
def _sparse24_grad_input(grad: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, in_features: int,
                         backend: str) -> torch.Tensor:
    lead = grad.shape[:-1]
    if backend == "reference":
        w = _dense_from(values, meta, in_features)
        return (grad @ w).contiguous()
    g2 = _as_2d(grad)
    values, meta = as_contiguous(values), as_contiguous(meta)
    out = _testing.alloc_output((g2.shape[0], in_features), grad.dtype, grad.device)
    if out.numel():
        if values.shape[0] == 0:
            out.zero_()
        else:
            _kernels(backend).sparse24_grad_input(g2, values, meta, in_features, out)
    return out.reshape(*lead, in_features)


@_sparse24_grad_input.register_fake
def _(grad, values, meta, in_features, backend):
    return grad.new_empty((*grad.shape[:-1], in_features))


@torch.library.custom_op("sparsekit::sparse24_grad_values", mutates_args=())
def _sparse24_grad_values(grad: torch.Tensor, x: torch.Tensor, meta: torch.Tensor, in_features: int,
                          backend: str) -> torch.Tensor:
    n = meta.shape[0]
    kp = padded_k(in_features)
    g2 = _as_2d(grad)
    x2 = _as_2d(x)
    if backend == "reference":
        dw = g2.transpose(0, 1) @ x2
        if kp != in_features:
            dw = F.pad(dw, (0, kp - in_features))
        return torch.gather(dw, 1, sparse24_columns(meta)).contiguous()
    meta = as_contiguous(meta)
    out = _testing.alloc_output((n, kp // 2), grad.dtype, grad.device)
    if out.numel():
        if g2.shape[0] == 0:
            out.zero_()
        else:
            _kernels(backend).sparse24_grad_values(g2, x2, meta, in_features, out)
    return out


@_sparse24_grad_values.register_fake
def _(grad, x, meta, in_features, backend):
    return grad.new_empty((meta.shape[0], padded_k(in_features) // 2))


# ---------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, values, meta, in_features, bias, backend = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.in_features = in_features
    ctx.backend = backend
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, values, meta = ctx.saved_tensors
    k = ctx.in_features
    backend = _BACKWARD_BACKEND[ctx.backend]
    gx = gv = gb = None
    if ctx.needs_input_grad[0]:
        gx = _sparse24_grad_input(grad, values, meta, k, backend)
    if ctx.needs_input_grad[1]:
        gv = _sparse24_grad_values(grad, x, meta, k, backend)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = _as_2d(grad).sum(0)
    return gx, gv, None, None, gb, None


_sparse24_linear.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------- public API
def _check(x, values, meta, in_features, bias):
    check_features("in_features", in_features)
    if not isinstance(values, torch.Tensor) or not isinstance(meta, torch.Tensor):
        raise TypeError(f"values and meta must be tensors, got {type(values).__name__} and {type(meta).__name__}")
    check_x(x, in_features)
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.dtype != values.dtype:
        raise TypeError(f"x dtype {x.dtype} does not match the weight dtype {values.dtype}; cast one of them")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"sparse24_linear supports float16, bfloat16 and float32, got {x.dtype}")
    if x.device != values.device:
        raise ValueError(f"x is on {x.device} but the weight is on {values.device}")
    if meta.device != values.device or meta.dtype != torch.uint8:
        raise ValueError("meta must be a uint8 tensor on the weight's device")
    check_sparse24_shapes(values, meta, in_features)
    check_bias(bias, values.shape[0], x)


def _validate_packed(values, meta, in_features):
    shape = (values.shape[0], in_features)
    validate_once((meta, values), ("sparse24", in_features),
                  lambda: validate_sparse24(values, meta, shape, owner="sparse24_linear_packed"))


def sparse24_linear_packed(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, in_features: int,
                           bias: Optional[torch.Tensor] = None, *, backend: Optional[str] = None,
                           validate: bool = True) -> torch.Tensor:
    """:func:`sparse24_linear` on the raw ``values``/``meta`` tensors (what modules hold).

    Shapes, dtypes and devices are always checked.  ``validate=True`` also checks the contents
    (2:4 codes, finite padding; :func:`sparsekit.formats._validate.validate_sparse24`) once per
    tensor version: later calls on the same unmodified tensors skip it.  ``validate=False`` trusts
    the contents -- for tensors that come from a validated :class:`Sparse24Weight` or module.
    """
    _check(x, values, meta, in_features, bias)
    if validate:
        _validate_packed(values, meta, in_features)
    m = x.numel() // in_features if in_features else x.numel()
    n = values.shape[0]
    chosen = dispatch.resolve("sparse24_linear", x.device, backend, m, n=n, k=in_features, dtype=x.dtype)
    if chosen == "cuda" and not _cuda_accepts(m, n, in_features, dispatch.DTYPE_NAMES.get(x.dtype)):
        from . import _cuda

        if x.dtype == torch.float32:
            raise ValueError(f"the 'cuda' 2:4 backend runs float32 only for M <= {_cuda.MAX_M} rows (the GEMV "
                             f"kernel; mma.sp has no 2:4 float32 form), got M={m}; use float16/bfloat16, "
                             "backend='triton' or automatic dispatch")
        raise ValueError(f"the 'cuda' 2:4 GEMM (mma.sp) is missing from the loaded extension and the GEMV kernel "
                         f"handles at most {_cuda.MAX_M} rows, got M={m}; rebuild csrc/ or use backend='triton'")
    if chosen == "cusparselt" and x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the 'cusparselt' backend supports float16 and bfloat16, got {x.dtype}")
    return _sparse24_linear(x, values, meta, in_features, bias, chosen)


def sparse24_linear(x: torch.Tensor, weight: Sparse24Weight, bias: Optional[torch.Tensor] = None, *,
                    backend: Optional[str] = None) -> torch.Tensor:
    """``y = x @ W^T (+ bias)`` for a 2:4 :class:`Sparse24Weight` ``W`` of shape (N, K).

    ``x`` is ``(..., K)`` in the weight's dtype (float16, bfloat16 or float32)
    with any strides; the result is ``(..., N)``.  ``backend`` forces one of
    ``cuda``, ``triton``, ``interpret``, ``reference``, ``cusparselt``, ``dense``
    (default: chosen per device, M, N, K and dtype from the dispatch table, or
    ``SPARSEKIT_BACKEND``).  Differentiable in ``x``, the
    stored values and ``bias``.
    """
    if not isinstance(weight, Sparse24Weight):
        raise TypeError(f"weight must be a Sparse24Weight, got {type(weight).__name__} "
                        "(compress a dense weight with Sparse24Weight.from_dense)")
    return sparse24_linear_packed(x, weight.values, weight.meta, weight.in_features, bias, backend=backend,
                                  validate=False)      # validated when the weight was built
