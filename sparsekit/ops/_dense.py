"""The ``dense`` backend: a packed weight expanded once per weight version, then one dense matmul.

Where no sparse or low-bit kernel runs (the CPU), re-expanding a packed
weight on every call makes a compressed layer several times slower than the
``nn.Linear`` it replaced.  The ``dense`` backend of every linear op keeps the
expanded weight instead:

* the expansion (2:4 values + metadata, kept blocks, int4 codes + scales and
  zero points, int8 codes + scales) is computed once and cached, keyed by the
  identity of the packed tensors and their ``_version`` counters: an in-place
  update (an optimizer step on 2:4 ``values`` or ``blocks``, ``copy_`` into a
  buffer, ``load_state_dict``) or a new tensor rebuilds it on the next call, a
  freed weight drops its entry;
* on CPU it is held in float32 and the matmul runs in float32 (the CPU's
  float16/bfloat16 GEMMs are 2-3x slower than its float32 one); the result is
  cast to the input's dtype.  On CUDA the expansion keeps the op's own dtype.

Memory: one float32 ``(N, K)`` copy per compressed layer on CPU (4 bytes per
dense weight; twice a float16 model's dense weight).  It is opt-out:
``SPARSEKIT_CPU_DENSE=0`` (or :func:`set_cpu_dense` ``(False)``) makes the
CPU dispatch pick ``reference`` again (expansion per call, no memory kept),
:func:`clear_dense_cache` frees what is held.  Inference tensors (made under
``torch.inference_mode``) carry no version counter and are expanded per call.

Modules call :func:`module_plan` instead (their CPU fast path): the same
expansion, held per module in a :class:`CpuPlan` and checked against the
packed tensors' identity and version with a few attribute reads, plus a
second matmul for few rows.  Where every entry of the float32 expansion is a
float16 number (int4 weights dequantized in float16, the integer codes of
W8A8 and 2:4+int8 layers, float16 models), a batch of at most
:data:`FP16_GEMM_MAX_ROWS` rows runs fbgemm's float16-weight GEMM
(``torch.fbgemm_linear_fp16_weight_fp32_activation``: the weight read as
float16, converted to float32 in registers, float32 products and sums) --
the same values as the float32 matmul, half the weight bytes to read.
Measured on a 2-core AMD EPYC (AVX2), one thread, CPU time, ``F.linear`` time
/ fbgemm time: 2.2x (512x512) to 1.4x (4096x4096) at one row, 1.4-2.6x at
16, 1.1-1.7x at 64, 0.97-1.2x at 256; with two threads ``F.linear`` uses
both and fbgemm one, and at 256 rows fbgemm measured 0.7x at 512x512.  The
limit (32 rows) keeps to the rows where it won clearly.  Its packed copy is a further 2 bytes per weight, built on the first
call with few rows; the float32 copy is built on the first call with more.
Torch builds without fbgemm (or a release that drops the deprecated call)
use the float32 matmul for every batch.

Ahead of both, a plan may hold a kernel of the C extension (``module_plan(...,
kernel=(make, max_rows[, min_rows]))``, :meth:`CpuPlan.kernel_linear`,
:meth:`CpuPlan.quant_linear`; ops/_cpu_ext.py): the 2:4 and block-sparse
float32 matmuls over the stored weights only, and the fused W8A8 / W4A8 /
2:4+int8 linears over integer codes.  They run where the extension is built
and the CPU has AVX2 + FMA (``SPARSEKIT_CPU_KERNELS=0`` switches them off)
and keep their own compact arrays instead of the dense copies.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..formats.sparse24 import TensorCache
from . import _cpu_ext

__all__ = ["CPU_DENSE_ENV", "FP16_GEMM_MAX_ROWS", "CpuPlan", "cpu_dense_enabled", "set_cpu_dense",
           "clear_dense_cache", "cached_weight", "dense_linear", "module_fast_path", "module_plan"]

CPU_DENSE_ENV = "SPARSEKIT_CPU_DENSE"
_override: Optional[bool] = None
_CACHE = TensorCache()


def cpu_dense_enabled() -> bool:
    """Whether automatic dispatch on CPU picks the ``dense`` backend (default yes)."""
    if _override is not None:
        return _override
    return _cpu_ext.env_flag(CPU_DENSE_ENV)


def set_cpu_dense(enabled: Optional[bool]) -> None:
    """Turn the CPU ``dense`` dispatch on/off for this process (None: follow ``SPARSEKIT_CPU_DENSE``)."""
    global _override
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_cpu_dense takes True, False or None, got {enabled!r}")
    _override = enabled
    if enabled is False:
        clear_dense_cache()


def clear_dense_cache() -> None:
    """Free every cached expansion (the op's cache and every module's :class:`CpuPlan`)."""
    global _plan_epoch
    _CACHE._data.clear()
    _plan_epoch += 1          # plans built before are dropped on their module's next call


def cached_weight(tag, tensors: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()`` (the expanded weight), cached on ``tensors[0]`` and keyed by ``tag`` and the identity
    and version of every tensor in ``tensors`` (None entries allowed)."""
    key = [tag]
    for t in tensors:
        if t is None:
            key.append(None)
        elif t.is_inference():          # no version counter: cannot tell an in-place update
            return make()
        else:
            key.append((id(t), t._version))
    if _is_compiling():
        return make()
    return _CACHE.get(tensors[0], tuple(key), lambda: make().detach())


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear`` on the expanded weight ``w``: float32 math on CPU (result in ``x``'s dtype), the input's
    dtype elsewhere."""
    if x.is_cpu:
        if x.dtype == torch.float32 and w.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):
            return F.linear(x, w, bias)
        if bias is not None and bias.dtype != torch.float32:
            if torch.is_grad_enabled() and bias.requires_grad:
                bias = bias.float()                     # differentiable
            else:
                bias = cached_weight(("bias32",), (bias,), lambda: bias.float())
        y = F.linear(x if x.dtype == torch.float32 else x.float(), w if w.dtype == torch.float32 else w.float(), bias)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype)).contiguous()


def cpu_weight(t: torch.Tensor) -> torch.Tensor:
    """An expansion as the dense backend holds it: float32 on CPU, as is elsewhere."""
    return t.float().contiguous() if t.is_cpu else t.contiguous()


def module_fast_path(x, backend: Optional[str], in_features: int, dtypes) -> bool:
    """Whether a compressed module may run its ``dense`` math directly, without the op's dispatch and custom-op
    machinery (tens to hundreds of microseconds per call, more than a small dense layer takes): ``x`` is a plain
    CPU tensor of one of ``dtypes`` with ``in_features`` in its last dimension, the backend is automatic (argument
    and ``SPARSEKIT_BACKEND``) with the CPU dense default on, or forced to ``dense``, and nothing is tracing or
    compiling.  Anything else (including inputs the op must reject with its own error) takes the op.

    Called on every forward of a small layer, so it is written for speed: a few attribute reads, one environment
    lookup per variable, no allocation."""
    if type(x) is not torch.Tensor or not x.is_cpu or x.dtype not in dtypes:
        return False
    shape = x.shape
    if not shape or shape[-1] != in_features or in_features == 0:
        return False
    if backend is None:
        backend = _getenv("SPARSEKIT_BACKEND") or None
    if backend is not None and backend != "auto" and backend != "dense":
        return False
    if backend != "dense" and not cpu_dense_enabled():
        return False
    if _is_compiling() or _tracing_state() is not None:
        return False
    return True


_is_compiling = torch.compiler.is_compiling
_tracing_state = torch._C._get_tracing_state
_getenv = _cpu_ext.getenv


# ----------------------------------------------------------------------------- per-module plans
FP16_GEMM_MAX_ROWS = 32
_PLAN_ATTR = "_sparsekit_cpu_plan"
_plan_epoch = 0
_fbgemm_ok: Optional[bool] = None       # None: not tried yet


def _fbgemm_pack(w32: torch.Tensor):
    """fbgemm's packed float16 copy of ``w32`` (None where torch has no fbgemm)."""
    global _fbgemm_ok
    if _fbgemm_ok is False:
        return None
    try:
        with warnings.catch_warnings():     # the call is marked deprecated (torch 2.x); used while it exists
            warnings.simplefilter("ignore")
            pk = torch.fbgemm_pack_gemm_matrix_fp16(w32)
            if _fbgemm_ok is None:          # one trial call, so the per-call path never warns
                torch.fbgemm_linear_fp16_weight_fp32_activation(w32.new_zeros(1, w32.shape[1]), pk, None)
        _fbgemm_ok = True
        return pk
    except (AttributeError, RuntimeError):
        _fbgemm_ok = False
        return None


class CpuPlan:
    """What one module's CPU fast path keeps between calls.

    ``srcs``: the packed tensors (and bias) the expansion was made from, with their versions; the plan is
    used only while every one of them is the same object at the same version (:func:`module_plan` checks,
    a few attribute reads).  ``make()`` returns the float32 ``(N, K)`` matrix the matmul reads (the expanded
    weight, or a layer's integer codes); it is built lazily: ``w32`` on the first call with more than
    :data:`FP16_GEMM_MAX_ROWS` rows, the fbgemm float16 copy ``pk16`` on the first call with fewer, when
    every entry of the matrix is a float16 number (``fp16``: None until checked).  ``bias32``: the bias in
    float32 (None without one).  ``col_scale``: a per-output-channel float32 scale for code matrices
    (W8A8, 2:4+int8), else None.  ``kmake``/``kmin``/``kmax``: the C-extension kernel's builder and the row
    range it serves (``kmax`` -1: none); ``kern``: the built kernel (None until the first call in range,
    False where it does not run here).  Not copied by ``copy.deepcopy`` nor pickled (rebuilt on the next
    call)."""

    __slots__ = ("srcs", "versions", "epoch", "make", "w32", "pk16", "fp16", "bias32", "col_scale", "n", "k",
                 "kmake", "kmax", "kmin", "kern")

    def __init__(self, srcs: tuple, make: Callable[[], torch.Tensor], bias: Optional[torch.Tensor],
                 col_scale: Optional[torch.Tensor], n: int, k: int, kernel: Optional[tuple] = None):
        self.srcs = srcs
        self.versions = tuple(-1 if t is None else t._version for t in srcs)
        self.epoch = _plan_epoch
        self.make = make
        self.w32 = None
        self.pk16 = None
        self.fp16 = None
        self.bias32 = None if bias is None else bias.detach().float()
        self.col_scale = None if col_scale is None else col_scale.detach().float().contiguous()
        self.n, self.k = n, k
        # a sparse matmul over the stored weights only (ops/_cpu_ext.py): (make, max_rows[, min_rows]); built on
        # first use
        self.kmake, self.kmax = kernel[:2] if kernel is not None else (None, -1)
        self.kmin = kernel[2] if kernel is not None and len(kernel) > 2 else 1
        self.kern = None

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_no_plan, ())

    def weight32(self) -> torch.Tensor:
        """The float32 weight ``F.linear`` reads: ``make()``, times ``col_scale`` per row for a code matrix."""
        w = self.w32
        if w is None:
            w = self.make()
            if self.col_scale is not None:
                w = w.mul_(self.col_scale[:, None])
            self.w32 = w
        return w

    def _packed16(self):
        if self.fp16 is None:
            w = self.w32 if self.w32 is not None and self.col_scale is None else self.make()
            self.fp16 = bool(w.numel()) and bool(torch.equal(w.half().float(), w))
            if self.fp16:
                self.pk16 = _fbgemm_pack(w)
                self.fp16 = self.pk16 is not None
        return self.pk16

    def matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``x @ W^T + bias`` in float32 (``x`` float32, any leading dimensions; a plan without
        ``col_scale``)."""
        if x.numel() <= FP16_GEMM_MAX_ROWS * self.k and self.fp16 is not False:
            pk = self._packed16()
            if pk is not None:
                return _fbgemm_linear(x, pk, bias)
        return F.linear(x, self.weight32(), bias)

    def _kernel(self, rows: int):
        """The plan's sparse kernel for ``rows`` rows (built on first use), or None."""
        if rows > self.kmax or rows < self.kmin or rows == 0 or not _cpu_ext.sparse_available():
            return None
        kern = self.kern
        if kern is None:
            kern = self.kern = self.kmake() or False
        return kern or None

    def kernel_linear(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The layer on ``x`` through the plan's sparse kernel (float32 math over the stored weights, result
        in ``x``'s dtype), or None where it does not run: no kernel for this plan or on this machine, more
        rows than it takes, autograd needed, or the kernel declined (a 2:4 input with Inf/NaN)."""
        if self.kmax < 0:
            return None
        k = self.k
        rows = x.numel() // k
        if _grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return None
        kern = self._kernel(rows)
        if kern is None or getattr(kern, "quant", False):       # (a fused quantized linear: quant_linear's)
            return None
        x32 = x if x.dtype is _F32 else x.float()
        shape = x.shape
        flat = len(shape) == 2          # (a view costs ~1-2 us: none for the common 2-D input)
        x2 = (x32 if flat else x32.reshape(rows, k)).contiguous()
        cs = self.col_scale
        if cs is None:
            y = kern(x2, self.bias32)
        else:                           # a code kernel: raw sums, then the channel scale and the bias
            y = kern(x2, None)
            if y is not None:
                y = y.mul_(cs) if self.bias32 is None else torch.addcmul(self.bias32, y, cs)
        if y is None:
            return None
        if not flat:
            y = y.view(*shape[:-1], self.n)
        return y if x.dtype is _F32 else y.to(x.dtype)

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer on ``x`` (a CPU float tensor), in ``x``'s dtype; float32 math.  ``bias``: the module's
        own bias tensor -- where autograd needs it (grad mode and ``x`` or ``bias`` requiring grad) the
        float32 matmul runs with it, differentiable in both.  The plan's sparse kernel first, where it runs
        (:meth:`kernel_linear`)."""
        if self.kmax >= 0:
            y = self.kernel_linear(x, bias)
            if y is not None:
                return y
        if _grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return dense_linear(x, self.weight32(), bias)
        if x.dtype is _F32:
            return self.matmul(x, self.bias32)
        return self.matmul(x.float(), self.bias32).to(x.dtype)

    def quant_linear(self, x: torch.Tensor, nbits: int, bias: Optional[torch.Tensor],
                     round_to: Optional[torch.dtype] = None) -> torch.Tensor:
        """The layer on ``x`` (float32 values; no gradient through it) quantized per token to ``nbits``
        (symmetric, scale = row amax / qmax, all-zero rows scale 1: the codes of
        :func:`sparsekit.ops.act_quant.per_token_quant_reference`), float32 math, float32 result.  A code
        matrix (``col_scale`` set) on few rows: ``(codes @ C^T) * (scale * col_scale) + bias`` with the
        integer matrix ``C`` in fbgemm's float16 GEMM (the two scales multiply each other first); otherwise
        ``(codes * scale) @ W^T + bias`` with the float32 weight (bias fused into the matmul, one pass fewer
        over the output).  A row holding Inf/NaN gives a NaN output row.  ``bias`` as in :meth:`linear`
        (added differentiably where it requires grad).  ``round_to`` (float16/bfloat16: a layer computing in
        that dtype): the input is rounded to it before quantizing and the result after, as
        ``x.to(round_to).float()`` and ``y.to(round_to).float()``; the result stays float32."""
        if self.kmax >= 0 and not (bias is not None and bias.requires_grad and _grad_enabled()):
            k = self.k
            rows = x.numel() // k
            kern = self._kernel(rows)
            if kern is not None:
                # the whole layer in one C call (ops/_cpu_ext.py: quantization, integer / 2:4 matmul, epilogue,
                # rounding)
                shape = x.shape
                y = kern((x if len(shape) == 2 else x.reshape(rows, k)).contiguous(), nbits, round_to, self.bias32)
                return y if len(shape) == 2 else y.view(*shape[:-1], self.n)
        ext = _cpu_ext.available()
        if ext:
            # one pass per row in C (ops/_cpu_ext.py), bit-identical to the chain below
            xq, s = _cpu_ext.token_quant(x, nbits, round_to)
        else:
            if round_to is not None:
                x = x.to(round_to).float()
            # every constant a tensor made once: a Python float operand costs a wrapped tensor per call, more
            # than the op on a one-token row
            qmax, nqmax, zero = _QMAX[nbits]
            amax = torch.amax(torch.abs(x), -1, True)
            s = (amax / qmax).masked_fill_(amax == zero, 1.0)
            xq = x.div(s).round_().clamp_(nqmax, qmax)
        live = bias is not None and bias.requires_grad and _grad_enabled()
        b = None if live else self.bias32
        pk = (self._packed16() if self.fp16 is not False and xq.numel() <= FP16_GEMM_MAX_ROWS * self.k
              else None)
        if pk is None:
            y = F.linear(xq.mul_(s), self.weight32(), b)
        elif self.col_scale is None:
            y = _fbgemm_linear(xq.mul_(s), pk, b)
        else:
            y = _fbgemm_linear(xq, pk, None)
            y = y.mul_(s * self.col_scale) if b is None else torch.addcmul(b, y, s * self.col_scale)
        if live:
            y = y + bias.float()
        if round_to is None:
            return y
        if ext and not live:
            return _cpu_ext.round_(y, round_to)       # in place, one pass
        return y.to(round_to).float()


_QMAX = {b: (torch.tensor(float(2 ** (b - 1) - 1)), torch.tensor(float(1 - 2 ** (b - 1))), torch.tensor(0.0))
         for b in (4, 8)}
_F32 = torch.float32
_grad_enabled = torch.is_grad_enabled


def _no_plan():
    return None


_fbgemm_linear = getattr(torch, "fbgemm_linear_fp16_weight_fp32_activation", None)


def module_plan(module, srcs: tuple, make: Callable[[], torch.Tensor], n: int, k: int,
                bias: Optional[torch.Tensor] = None, col_scale: Optional[torch.Tensor] = None,
                kernel: Optional[tuple] = None) -> Optional[CpuPlan]:
    """``module``'s :class:`CpuPlan` for the packed tensors ``srcs`` (and ``bias``, ``col_scale``; an
    ``(n, k)`` layer), built on first use and again whenever one of them is replaced or written in place;
    None where a tensor has no version counter (an inference tensor: the caller expands per call).
    ``kernel``: ``(make_kernel, max_rows[, min_rows])``, a sparse matmul over the stored weights for
    ``min_rows`` (default 1) to ``max_rows`` rows (:meth:`CpuPlan.kernel_linear`; ``make_kernel()`` returns
    it, or None where it does not run)."""
    plan = module.__dict__.get(_PLAN_ATTR)
    if plan is not None and plan.epoch == _plan_epoch:
        old = plan.srcs
        if len(old) == len(srcs) + 2:
            for a, b, v in zip(old, srcs + (bias, col_scale), plan.versions):
                if a is not b or (b is not None and b._version != v):
                    break
            else:
                return plan
    allsrc = srcs + (bias, col_scale)
    for t in allsrc:
        if t is not None and t.is_inference():
            return None
    plan = CpuPlan(allsrc, make, bias, col_scale, n, k, kernel)
    module.__dict__[_PLAN_ATTR] = plan
    return plan
