"""Drop-in low-bit replacement for ``nn.Linear``: W4A16, W4A8, W8A8 and token-adaptive mixed activations.

:class:`QLinear` holds a packed weight and picks its op from two settings:

=========  ============  ==========================================================
``bits``   ``act_bits``  forward
=========  ============  ==========================================================
4          None          W4A16: :func:`sparsekit.ops.int4.int4_linear` (fp16/bf16 activations)
4          8 / 4         W4A8 / W4A4: :func:`sparsekit.ops.int8.w4a8_linear` (per-token int8 activations)
4          "mixed"       W4A8 with the top ``frac8`` tokens (by importance) at 8 bits, the rest at 4
8          8 / 4 / mixed W8A8 (etc.): :func:`sparsekit.ops.int8.int8_linear`
=========  ============  ==========================================================

Activation quantization is dynamic (scales computed per token at run time),
so nothing about it is stored: ``act_bits`` and ``frac8`` are constructor
settings, and a state_dict carries only the weight buffers (and bias).  In
``"mixed"`` mode ``forward(x, importance=...)`` accepts a per-token score
(e.g. the attention each token received); the default is the token's
activation L2 norm.  ``act_bits=4`` stores 4-bit activations in int8 (same
kernel as A8): a quality baseline, not a faster path.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..formats._validate import validate_int4, validate_int8
from ..formats.int4 import Int4Weight, check_perm, resolve_group_size
from ..formats.int8 import Int8Weight
from ..ops.act_quant import _check_frac8
from ..ops._checks import check_x
from ..formats.int4 import dequantize_int4
from ..ops._cpu_ext import NO_ROW_LIMIT, w4a8_kernel, w8a8_kernel
from ..ops._dense import cpu_weight, module_plan, module_fast_path
from ..ops.int4 import int4_linear_packed
from ..ops.int8 import dequantize_int4_fp32, int8_linear_packed, w4a8_linear_packed
from . import _state

_F32_ONLY = (torch.float32,)

__all__ = ["QLinear"]

_SCALE_DTYPES = (torch.float16, torch.bfloat16)


def _check_act_bits(act_bits, bits: int = 4) -> None:
    if act_bits is None:
        if bits == 8:
            raise ValueError("bits=8 (W8A8) quantizes the activations too: pass act_bits=8, 4 or 'mixed' "
                             "(int8 weights with fp16/bf16 activations have no kernel)")
        return
    if isinstance(act_bits, bool) or act_bits not in (8, 4, "mixed"):
        raise ValueError(f"act_bits must be None (W4A16), 8, 4 or 'mixed', got {act_bits!r}")


def _check_input_scale(s: torch.Tensor, k: int) -> None:
    """An AWQ input scale: shape (in_features,), finite and > 0 (the input is divided by it)."""
    if tuple(s.shape) != (k,):
        raise ValueError(f"input_scale must have shape ({k},) (one scale per input feature), got {tuple(s.shape)}")
    if s.numel() and s.device.type != "meta":
        bad = ~(torch.isfinite(s) & (s > 0))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"input_scale must be finite and > 0, got {float(s[i])} at index {i}")


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"QLinear packs 4-bit (group-wise int4) or 8-bit (per-channel int8) weights, got bits={bits}")
    return int(bits)


class QLinear(nn.Module):
    """``nn.Linear`` with a packed low-bit weight (W4A16, W4A8, W8A8, mixed 4/8-bit activations).

    ``bits=4`` buffers: ``qweight`` (int32, 8 codes per word, see
    :mod:`sparsekit.formats.int4`), ``scales`` and, unless symmetric, ``zeros``
    (``(out, in / group_size)`` in the compute dtype, float16 or bfloat16).
    ``bits=8`` buffers: ``qweight`` ``(out, in)`` int8 and ``scales`` ``(out,)``
    float32 (per-channel symmetric, :mod:`sparsekit.formats.int8`).  AWQ-quantized
    layers also hold an ``input_scale`` ``(in,)`` that divides the input at run
    time.  Act-order int4 weights whose groups are not consecutive input
    features (GPTQ with dynamic groups, ``g_idx`` checkpoints) are stored with
    permuted columns and hold an ``in_perm`` ``(in,)`` int64 buffer: the input
    is gathered once per call, ``x[..., in_perm]``, before the unchanged
    kernels (see :mod:`sparsekit.formats.int4`).  ``bias`` stays a parameter.  Inputs: the compute dtype (float16 or
    bfloat16, chosen at conversion) or float32; the output has the input's
    dtype (a float32 input is cast to the compute dtype for the kernel and the
    result back to float32, so a module converted from a float32 model takes
    and returns float32).  See the module docstring for ``act_bits`` / ``frac8``.

    ``load_state_dict`` validates every incoming tensor first (shapes, finite
    scales, zero points integers in [0, 15], int8 codes in [-127, 127], an
    ``input_scale`` of shape ``(in_features,)`` that is finite and > 0, an
    ``in_perm`` that is a permutation of ``range(in_features)``) and
    either loads all of them or raises and leaves the module untouched.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int = 128, symmetric: bool = False, act_bits: Union[None, int, str] = None,
                 frac8: float = 0.25, dtype: torch.dtype = torch.float16, device=None,
                 backend: Optional[str] = None):
        super().__init__()
        bits = _check_bits(bits)
        _check_act_bits(act_bits, bits)
        self.frac8 = _check_frac8(frac8)
        if dtype not in _SCALE_DTYPES:
            raise TypeError(f"QLinear computes in float16 or bfloat16, got dtype={dtype}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bits = bits
        self.act_bits = act_bits
        self.backend = backend
        self.compute_dtype = dtype
        if bits == 4:
            if in_features < 8 or in_features % 8:
                raise ValueError(f"in_features must be a positive multiple of 8 (8 codes per int32), got {in_features}")
            self.group_size = resolve_group_size(group_size, self.in_features)
            self.symmetric = bool(symmetric)
            g = self.in_features // self.group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 8, dtype=torch.int32,
                                                        device=device))
            self.register_buffer("scales", torch.ones(out_features, g, dtype=dtype, device=device))
            if self.symmetric:
                self.register_buffer("zeros", None)
            else:
                self.register_buffer("zeros", torch.zeros(out_features, g, dtype=dtype, device=device))
        else:
            if in_features < 1:
                raise ValueError(f"in_features must be positive, got {in_features}")
            self.group_size = self.in_features          # per output channel
            self.symmetric = True
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
            self.register_buffer("zeros", None)
        self.register_buffer("input_scale", None)
        self.register_buffer("in_perm", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    # ----------------------------------------------------------------- builders
    @property
    def dtype(self) -> torch.dtype:
        """The compute (input/output) dtype."""
        if self.bits == 4:
            return self._buffers["scales"].dtype     # (dict reads: read on every CPU forward)
        bias = self._parameters["bias"]
        return bias.dtype if bias is not None else self.compute_dtype

    @classmethod
    def from_weight(cls, weight: Union[Int4Weight, Int8Weight], bias: Optional[torch.Tensor] = None,
                    input_scale: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                    act_bits: Union[None, int, str] = None, frac8: float = 0.25,
                    dtype: Optional[torch.dtype] = None) -> "QLinear":
        """Wrap a packed :class:`Int4Weight` (bits=4) or :class:`Int8Weight` (bits=8; then
        ``dtype`` -- default the bias dtype, else float16 -- is the compute dtype)."""
        if isinstance(weight, Int8Weight):
            n, k = weight.shape
            dtype = dtype or (bias.dtype if bias is not None and bias.dtype in _SCALE_DTYPES else torch.float16)
            mod = cls(k, n, bias=bias is not None, bits=8, act_bits=act_bits, frac8=frac8, dtype=dtype,
                      device=weight.device, backend=backend)
        elif isinstance(weight, Int4Weight):
            n, k = weight.shape
            if dtype is not None and dtype != weight.dtype:
                raise TypeError(f"an Int4Weight computes in its scale dtype {weight.dtype}, got dtype={dtype}")
            dtype = weight.dtype
            mod = cls(k, n, bias=bias is not None, group_size=weight.group_size, symmetric=weight.symmetric,
                      act_bits=act_bits, frac8=frac8, dtype=dtype, device=weight.device, backend=backend)
        else:
            raise TypeError(f"weight must be an Int4Weight or Int8Weight, got {type(weight).__name__}")
        with torch.no_grad():
            mod.qweight.copy_(weight.qweight)
            mod.scales.copy_(weight.scales)
            if getattr(weight, "zeros", None) is not None:
                mod.zeros.copy_(weight.zeros)
            if bias is not None:
                mod.bias.copy_(bias.detach().to(dtype))
        if input_scale is not None:
            if not isinstance(input_scale, torch.Tensor):
                raise TypeError(f"input_scale must be a tensor or None, got {type(input_scale).__name__}")
            s = input_scale.detach().to(device=weight.device, dtype=dtype).clone()
            _check_input_scale(s, k)
            mod.input_scale = s
        if isinstance(weight, Int4Weight) and weight.perm is not None:
            mod.in_perm = weight.perm.detach().to(weight.device, torch.int64).clone()
        return mod

    @classmethod
    def from_quant_result(cls, linear: nn.Linear, result, dtype: Optional[torch.dtype] = None,
                          backend: Optional[str] = None, act_bits: Union[None, int, str] = None,
                          frac8: float = 0.25) -> "QLinear":
        """Pack a 4-bit :class:`sparsekit.quant.QuantResult` (RTN, GPTQ or AWQ) for ``linear``'s bias."""
        if result.bits != 4:
            raise ValueError(f"QLinear packs 4-bit quantizer results, got bits={result.bits}")
        dtype = dtype or (linear.weight.dtype if linear.weight.dtype in _SCALE_DTYPES else torch.float16)
        w = Int4Weight.from_quantized(result.q, result.scales, None if result.symmetric else result.zeros,
                                      result.group_size, result.symmetric, dtype=dtype,
                                      perm=getattr(result, "perm", None))
        return cls.from_weight(w, linear.bias, input_scale=result.input_scale, backend=backend,
                               act_bits=act_bits, frac8=frac8)

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                   act_bits: Union[None, int, str] = None, method: str = "rtn",
                   calib_inputs: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None,
                   backend: Optional[str] = None, frac8: float = 0.25, **method_kwargs) -> "QLinear":
        """Quantize ``linear``.

        ``bits=4``: group-wise int4 by ``method="rtn"`` (no data), ``"gptq"`` or
        ``"awq"`` (both need ``calib_inputs``, the layer's inputs
        ``(..., in_features)``); ``act_bits`` None (W4A16), 8, 4 or ``"mixed"``.
        ``bits=8``: per-channel symmetric int8 by RTN (``group_size`` and
        ``symmetric`` do not apply), ``act_bits`` 8, 4 or ``"mixed"`` (W8A8).
        ``frac8``: in ``"mixed"`` mode, the fraction of tokens kept at 8 bits.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float expects an nn.Linear, got {type(linear).__name__}")
        bits = _check_bits(bits)
        _check_act_bits(act_bits, bits)
        _check_frac8(frac8)
        if method not in ("rtn", "gptq", "awq"):
            raise ValueError(f"unknown method {method!r}; choose 'rtn', 'gptq' or 'awq'")
        dtype = dtype or (linear.weight.dtype if linear.weight.dtype in _SCALE_DTYPES else torch.float16)
        w = linear.weight.detach().float()
        if bits == 8:
            if method != "rtn":
                raise ValueError(f"bits=8 (per-channel int8) is quantized by round-to-nearest; got method={method!r}")
            bias = None if linear.bias is None else linear.bias.detach().to(dtype)
            return cls.from_weight(Int8Weight.from_float(w), bias, backend=backend, act_bits=act_bits, frac8=frac8,
                                   dtype=dtype)
        from .. import quant

        if method == "rtn":
            res = quant.rtn_quantize(w, group_size, symmetric, bits=4)
        else:
            if calib_inputs is None:
                raise ValueError(f"method={method!r} needs calib_inputs (the layer's inputs)")
            if not isinstance(calib_inputs, torch.Tensor) or not calib_inputs.is_floating_point():
                raise TypeError(f"calib_inputs must be a floating-point tensor (..., in_features), got "
                                f"{getattr(calib_inputs, 'dtype', type(calib_inputs).__name__)}")
            if calib_inputs.dim() < 1 or calib_inputs.shape[-1] != linear.in_features:
                raise ValueError(f"calib_inputs must have in_features={linear.in_features} in the last dim, got "
                                 f"shape {tuple(calib_inputs.shape)}")
            if calib_inputs.numel() == 0:
                raise ValueError("calib_inputs holds no tokens")
            x = calib_inputs.detach().reshape(-1, linear.in_features).double()
            if method == "gptq":
                h = 2.0 * (x.T @ x) / x.shape[0]
                res = quant.gptq_quantize(w, h, group_size, symmetric, 4, **method_kwargs)
            else:
                _, res = quant.awq_search(w, x.float(), group_size, symmetric, 4, **method_kwargs)
        return cls.from_quant_result(linear, res, dtype=dtype, backend=backend, act_bits=act_bits, frac8=frac8)

    def weight_format(self) -> Union[Int4Weight, Int8Weight]:
        if self.bits == 8:
            return Int8Weight(self.qweight, self.scales.float(), (self.out_features, self.in_features))
        return Int4Weight(self.qweight, self.scales, self.zeros, (self.out_features, self.in_features),
                          self.group_size, self.symmetric, self.in_perm)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized ``(out, in)`` weight acting on unscaled inputs, in the compute dtype and the original
        input order (for inspection)."""
        w = self.weight_format().dequantize()
        if self.input_scale is not None:
            w = w / self.input_scale
        return w.to(self.dtype)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` holding the dequantized weight.

        The same function as this module for W4A16 (up to rounding); with
        ``act_bits`` set, the dense layer computes on unquantized activations
        (the activation quantization is dynamic and has no dense equivalent).
        """
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.scales.device, dtype=self.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # ----------------------------------------------------------------- state
    def _validate_tensors(self, t: dict) -> None:
        shape = (self.out_features, self.in_features)
        if self.bits == 8:
            validate_int8(t["qweight"], t["scales"], shape, owner="QLinear")
        else:
            validate_int4(t["qweight"], t["scales"], t.get("zeros"), shape, self.group_size, self.symmetric,
                          owner="QLinear")
        if t.get("input_scale") is not None:
            s = t["input_scale"]
            if not s.is_floating_point():
                raise TypeError(f"QLinear.input_scale must be floating point, got {s.dtype}")
            _check_input_scale(s.to(self.dtype), self.in_features)
        if t.get("in_perm") is not None:
            if self.bits == 8:
                raise ValueError("QLinear.in_perm (an act-order input permutation) applies to bits=4 weights only")
            check_perm(t["in_perm"], self.in_features, "QLinear.in_perm")

    def validate_state_dict(self, state_dict, prefix: str = "", strict: bool = True) -> None:
        """Raise what :meth:`load_state_dict` would raise for ``state_dict``, copying nothing."""
        self._validate_tensors(_state.check_state_dict(self, state_dict, prefix, strict, False,
                                                       optional=("input_scale", "in_perm")))

    def validate(self) -> None:
        """Re-check this module's tensors (e.g. after writing into them in place)."""
        self._validate_tensors(dict(qweight=self.qweight, scales=self.scales, zeros=self.zeros,
                                    input_scale=self.input_scale, in_perm=self.in_perm))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        def prepare(cand, assign):
            if self.input_scale is None and cand.get("input_scale") is not None:
                # an AWQ checkpoint: the module gets the (already validated) input_scale buffer
                self.input_scale = torch.empty(self.in_features, dtype=self.dtype, device=self.scales.device)
            if self.in_perm is None and cand.get("in_perm") is not None:
                # an act-order checkpoint: the module gets the (already validated) input permutation
                self.in_perm = torch.empty(self.in_features, dtype=torch.int64, device=self.scales.device)

        _state.load_atomic(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs, self._validate_tensors, prepare, optional=("input_scale", "in_perm"))

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, importance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``importance`` (``x.shape[:-1]``, mixed mode only): per-token scores choosing the 8-bit tokens."""
        if importance is not None and self.act_bits != "mixed":
            raise ValueError(f"importance only applies to act_bits='mixed' (this layer has act_bits={self.act_bits!r})")
        bufs = self._buffers        # (buffers read from the dict: Module.__getattr__ costs more than a small layer's
        #                              share of a forward on CPU)
        if isinstance(x, torch.Tensor) and x.dtype is torch.float32 and self.dtype is not torch.float32:
            # the dtype rule of every low-bit module: float32 in, float32 out; the kernels run in the
            # compute dtype (float16/bfloat16, chosen at conversion) and only the boundary is cast
            if bufs["input_scale"] is not None:
                x = x / self.input_scale.float()
            if bufs["in_perm"] is not None:
                x = self._permute_input(x)
            if module_fast_path(x, self.backend, self.in_features, _F32_ONLY):
                y = self._cpu_dense_forward(x)
                if y is not None:
                    return y
            return self._forward_compute(x.to(self.dtype), importance).float()
        if self.input_scale is not None:
            x = x / self.input_scale
        if self.in_perm is not None:
            x = self._permute_input(x)
        return self._forward_compute(x, importance)

    def _permute_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x[..., in_perm]``: the input in the packed column order of an act-order weight."""
        check_x(x, self.in_features)
        return x.index_select(-1, self.in_perm)

    def _cpu_dense_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """CPU's dense path (ops/_dense.py): the float32 weight kept per weight version, without the op's
        per-call machinery; a float32 input is used as is for weight-only layers (not rounded to the compute
        dtype first).  None where it does not apply (mixed or per-token activation widths, an inference
        tensor)."""
        act = self.act_bits
        if act is not None and (act not in (8, 4) or (x.requires_grad and torch.is_grad_enabled())):
            return None             # mixed widths; or a gradient: the ops' backward is straight-through
        bufs = self._buffers
        q, s, z, bias = bufs["qweight"], bufs["scales"], bufs["zeros"], self._parameters["bias"]
        gs, k = self.group_size, self.in_features
        if self.bits == 8:          # W8A8: the integer codes, the channel scale applied after the matmul
            plan = module_plan(self, (q,), lambda: q.float(), self.out_features, k, bias, s,
                               kernel=(lambda: w8a8_kernel(q, s), NO_ROW_LIMIT))
        elif act is None:
            plan = module_plan(self, (q, s, z), lambda: cpu_weight(dequantize_int4(q, s, z, gs, k)),
                               self.out_features, k, bias)
        else:
            plan = module_plan(self, (q, s, z), lambda: dequantize_int4_fp32(q, s, z, gs, k).contiguous(),
                               self.out_features, k, bias, kernel=(lambda: w4a8_kernel(q, s, z, gs, k), NO_ROW_LIMIT))
        if plan is None:
            return None
        if act is None:
            return plan.linear(x, bias)
        # the activations are quantized from the compute dtype and the result is rounded to it, as on every
        # other path (a float32 input rounded to float16 first can land on another integer code)
        dt = s.dtype if self.bits == 4 else self.dtype
        if x.dtype is dt:
            return plan.quant_linear(x.float(), act, bias).to(dt)
        return plan.quant_linear(x, act, bias, round_to=dt)       # float32 in, float32 out

    def _forward_compute(self, x: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
        if importance is None and module_fast_path(x, self.backend, self.in_features, (self.dtype,)):
            y = self._cpu_dense_forward(x)
            if y is not None:
                return y
        if self.bits == 8:
            if isinstance(x, torch.Tensor) and x.dtype != self.dtype:
                raise TypeError(f"QLinear computes in {self.dtype}; got input of dtype {x.dtype} (give "
                                f"{self.dtype} or float32 inputs)")
            return int8_linear_packed(x, self.qweight, self.scales.float(), self.bias, act_bits=self.act_bits,
                                      frac8=self.frac8, importance=importance, backend=self.backend,
                                      validate=False)
        # the buffers were validated when built / loaded: no per-call content checks
        if self.act_bits is None:
            return int4_linear_packed(x, self.qweight, self.scales, self.zeros, self.group_size, self.in_features,
                                      self.bias, backend=self.backend, validate=False)
        return w4a8_linear_packed(x, self.qweight, self.scales, self.zeros, self.group_size, self.in_features,
                                  self.bias, act_bits=self.act_bits, frac8=self.frac8, importance=importance,
                                  backend=self.backend, validate=False)

    def extra_repr(self) -> str:
        if self.bits == 8:
            wdesc = "bits=8 (per-channel int8)"
        else:
            wdesc = f"bits=4, group_size={self.group_size}, symmetric={self.symmetric}"
        act = "act_bits=16" if self.act_bits is None else f"act_bits={self.act_bits!r}"
        if self.act_bits == "mixed":
            act += f", frac8={self.frac8:g}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{wdesc}, {act}, dtype={self.dtype}"
                + (", awq_input_scale=True" if self.input_scale is not None else "")
                + (", act_order_in_perm=True" if self.in_perm is not None else ""))
