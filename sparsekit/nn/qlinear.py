"""Drop-in int4-weight replacement for ``nn.Linear``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..formats.int4 import Int4Weight, resolve_group_size
from ..ops.int4 import int4_linear_packed

__all__ = ["QLinear"]

_SCALE_DTYPES = (torch.float16, torch.bfloat16)


def _check_act_bits(act_bits) -> None:
    if act_bits is None:
        return
    if act_bits in (8, "mixed"):
        raise NotImplementedError(
            f"act_bits={act_bits!r} (W4A8 / token-adaptive mixed activations) has no kernel in sparsekit yet; "
            "use act_bits=None (W4A16: fp16/bf16 activations)")
    raise ValueError(f"act_bits must be None, 8 or 'mixed', got {act_bits!r}")


class QLinear(nn.Module):
    """``nn.Linear`` with a packed group-wise int4 weight (W4A16).

    Buffers: ``qweight`` (int32, 8 codes per word, see
    :mod:`sparsekit.formats.int4`), ``scales`` and, unless symmetric, ``zeros``
    (``(out, in / group_size)`` in the compute dtype, float16 or bfloat16), and
    for AWQ-quantized layers an ``input_scale`` ``(in,)`` that divides the
    input at run time.  ``bias`` stays a parameter.  Inputs must be in the
    module's dtype (like ``nn.Linear``); the output is too.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int = 128, symmetric: bool = False, act_bits=None,
                 dtype: torch.dtype = torch.float16, device=None, backend: Optional[str] = None):
        super().__init__()
        if bits != 4:
            raise ValueError(f"QLinear packs 4-bit weights only, got bits={bits}")
        _check_act_bits(act_bits)
        if dtype not in _SCALE_DTYPES:
            raise TypeError(f"QLinear computes in float16 or bfloat16, got dtype={dtype}")
        if in_features < 8 or in_features % 8:
            raise ValueError(f"in_features must be a positive multiple of 8 (8 codes per int32), got {in_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bits = 4
        self.group_size = resolve_group_size(group_size, self.in_features)
        self.symmetric = bool(symmetric)
        self.act_bits = act_bits
        self.backend = backend
        g = self.in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, g, dtype=dtype, device=device))
        if self.symmetric:
            self.register_buffer("zeros", None)
        else:
            self.register_buffer("zeros", torch.zeros(out_features, g, dtype=dtype, device=device))
        self.register_buffer("input_scale", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    # ----------------------------------------------------------------- builders
    @classmethod
    def from_weight(cls, weight: Int4Weight, bias: Optional[torch.Tensor] = None,
                    input_scale: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> "QLinear":
        if not isinstance(weight, Int4Weight):
            raise TypeError(f"weight must be an Int4Weight, got {type(weight).__name__}")
        n, k = weight.shape
        mod = cls(k, n, bias=bias is not None, group_size=weight.group_size, symmetric=weight.symmetric,
                  dtype=weight.dtype, device=weight.device, backend=backend)
        with torch.no_grad():
            mod.qweight.copy_(weight.qweight)
            mod.scales.copy_(weight.scales)
            if weight.zeros is not None:
                mod.zeros.copy_(weight.zeros)
            if bias is not None:
                mod.bias.copy_(bias.detach().to(weight.dtype))
        if input_scale is not None:
            if input_scale.shape != (k,):
                raise ValueError(f"input_scale must have shape ({k},), got {tuple(input_scale.shape)}")
            mod.input_scale = input_scale.detach().to(device=weight.device, dtype=weight.dtype).clone()
        return mod

    @classmethod
    def from_quant_result(cls, linear: nn.Linear, result, dtype: Optional[torch.dtype] = None,
                          backend: Optional[str] = None) -> "QLinear":
        """Pack a :class:`sparsekit.quant.QuantResult` (RTN, GPTQ or AWQ) for ``linear``'s bias."""
        if result.bits != 4:
            raise ValueError(f"QLinear packs 4-bit results, got bits={result.bits}")
        dtype = dtype or (linear.weight.dtype if linear.weight.dtype in _SCALE_DTYPES else torch.float16)
        w = Int4Weight.from_quantized(result.q, result.scales, None if result.symmetric else result.zeros,
                                      result.group_size, result.symmetric, dtype=dtype)
        return cls.from_weight(w, linear.bias, input_scale=result.input_scale, backend=backend)

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                   act_bits=None, method: str = "rtn", calib_inputs: Optional[torch.Tensor] = None,
                   dtype: Optional[torch.dtype] = None, backend: Optional[str] = None, **method_kwargs) -> "QLinear":
        """Quantize ``linear``: ``method="rtn"`` (no data), ``"gptq"`` or ``"awq"``
        (both need ``calib_inputs``, the layer's inputs ``(..., in_features)``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float expects an nn.Linear, got {type(linear).__name__}")
        if bits != 4:
            raise ValueError(f"QLinear packs 4-bit weights only, got bits={bits}")
        _check_act_bits(act_bits)
        from .. import quant

        w = linear.weight.detach().float()
        if method == "rtn":
            res = quant.rtn_quantize(w, group_size, symmetric, bits=4)
        elif method in ("gptq", "awq"):
            if calib_inputs is None:
                raise ValueError(f"method={method!r} needs calib_inputs (the layer's inputs)")
            x = calib_inputs.detach().reshape(-1, linear.in_features).double()
            if method == "gptq":
                h = 2.0 * (x.T @ x) / x.shape[0]
                res = quant.gptq_quantize(w, h, group_size, symmetric, 4, **method_kwargs)
            else:
                _, res = quant.awq_search(w, x.float(), group_size, symmetric, 4, **method_kwargs)
        else:
            raise ValueError(f"unknown method {method!r}; choose 'rtn', 'gptq' or 'awq'")
        return cls.from_quant_result(linear, res, dtype=dtype, backend=backend)

    def weight_format(self) -> Int4Weight:
        return Int4Weight(self.qweight, self.scales, self.zeros, (self.out_features, self.in_features),
                          self.group_size, self.symmetric)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized ``(out, in)`` weight acting on unscaled inputs (for inspection)."""
        w = self.weight_format().dequantize()
        if self.input_scale is not None:
            w = w / self.input_scale
        return w

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` holding the dequantized weight (same function up to rounding)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.scales.device, dtype=self.scales.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "input_scale"
        if key in state_dict and self.input_scale is None:
            self.input_scale = torch.empty_like(state_dict[key], device=self.scales.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale
        return int4_linear_packed(x, self.qweight, self.scales, self.zeros, self.group_size, self.in_features,
                                  self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits=4, group_size={self.group_size}, symmetric={self.symmetric}, dtype={self.scales.dtype}"
                + (", awq_input_scale=True" if self.input_scale is not None else ""))
