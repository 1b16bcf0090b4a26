"""Drop-in sparse replacement for ``nn.Linear``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..formats._validate import validate_sparse24, validate_sparse24_int8
from ..formats.sparse24 import Sparse24Int8Weight, Sparse24Weight, padded_k
from ..ops._cpu_ext import NO_ROW_LIMIT, sp24_int8_kernel, sp24_kernel
from ..ops._dense import cpu_weight, module_fast_path, module_plan
from ..ops.sparse24 import sparse24_dense, sparse24_linear_packed
from ..ops.sparse24_int8 import sparse24_int8_codes_f32, sparse24_int8_linear_packed
from ..prune.masks import mask_2to4
from . import _state

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["SparseLinear"]

_PATTERNS = ("2:4",)
_FACTORY_PATTERNS = ("2:4", "block")
# meta byte for two groups that both keep positions (0, 1): code 0b0100 per nibble
_EMPTY_META = 0x44


class SparseLinear(nn.Module):
    """``nn.Linear`` with a compressed 2:4 sparse weight.

    Holds ``values`` (a trainable ``nn.Parameter``, ``(out, Kp/2)``), the packed
    ``meta_codes`` buffer (uint8, ``(out, Kp/8)``: the 2:4 metadata) and an
    optional ``bias``; the state_dict stores exactly these, so saving keeps the
    compressed size.  (The buffer was once named ``meta``, which clashes with
    ``torch.fx.GraphModule.meta`` under ``torch.export``; state dicts with the old
    key still load.)
    Build one with :meth:`from_dense`; fine-tuning updates the kept values and
    never changes the mask.  ``load_state_dict`` validates every incoming
    tensor (shapes, 2:4 codes, finite padding; see
    :class:`~sparsekit.formats.Sparse24Weight`) before copying any, so it either
    loads all of them or raises and leaves the module untouched.

    ``act_bits=8`` makes it the int8 2:4 layer (GPUSQ-ViT's deployment form):
    ``values`` is then an int8 buffer with a float32 ``w_scale`` buffer (one
    scale per output channel), activations are quantized per token to int8 at
    run time and the op (:func:`sparsekit.ops.sparse24_int8.sparse24_int8_linear`)
    accumulates in int32; ``dtype`` is the activation/output dtype.  Inference
    only: the int8 layer has no trainable weight.
    """

    # state_dict keys renamed since earlier releases (old -> new); old checkpoints load into the new names
    _RENAMED_KEYS = {"meta": "meta_codes"}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, pattern: str = "2:4",
                 device=None, dtype=None, backend: Optional[str] = None, act_bits: Optional[int] = None):
        super().__init__()
        if act_bits not in (None, 8):
            raise ValueError(f"act_bits must be None (float activations) or 8 (int8 2:4), got {act_bits!r}")
        if pattern == "block":
            raise ValueError("construct block-sparse layers with BlockSparseLinear (or SparseLinear.from_dense("
                             "linear, pattern='block', ...))")
        if pattern not in _PATTERNS:
            raise ValueError(f"unsupported sparsity pattern {pattern!r}; supported: {_PATTERNS}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.pattern = pattern
        self.backend = backend
        self.act_bits = act_bits
        kp = padded_k(self.in_features)
        factory = dict(device=device, dtype=dtype if dtype is not None else torch.get_default_dtype())
        if act_bits == 8:
            self.register_buffer("values", torch.zeros(out_features, kp // 2, dtype=torch.int8, device=device))
            self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        else:
            self.values = nn.Parameter(torch.zeros(out_features, kp // 2, **factory))
        self.register_buffer("meta_codes", torch.full((out_features, kp // 8), _EMPTY_META, dtype=torch.uint8,
                                                      device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **factory))
        else:
            self.register_parameter("bias", None)

    @property
    def meta(self) -> torch.Tensor:
        """The ``meta_codes`` buffer under its former name (read-only)."""
        return self.meta_codes

    # ----------------------------------------------------------------- builders
    @classmethod
    def from_dense(cls, linear: nn.Linear, pattern: str = "2:4", mask: Optional[torch.Tensor] = None,
                   scores: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                   block_size=(32, 32), sparsity: Optional[float] = None,
                   act_bits: Optional[int] = None) -> nn.Module:
        """Prune ``linear`` to ``pattern`` and compress it.

        ``pattern="2:4"``: the mask is ``mask`` if given (it must be 2:4), else
        :func:`sparsekit.prune.mask_2to4` of ``scores`` (default ``|W|``).

        ``pattern="block"``: returns a :class:`~sparsekit.nn.BlockSparseLinear`
        with ``block_size=(bm, bk)``; ``mask`` is then a bool block grid
        (e.g. from :func:`sparsekit.prune.block_mask_from_scores`), else
        ``sparsity`` drops that fraction of blocks by magnitude.

        ``act_bits=8`` (2:4 only): the int8 2:4 layer -- the pruned weight is
        quantized per output channel (:class:`~sparsekit.formats.Sparse24Int8Weight`)
        and activations per token at run time.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        if pattern not in _FACTORY_PATTERNS:
            raise ValueError(f"unsupported sparsity pattern {pattern!r}; supported: {_FACTORY_PATTERNS}")
        if pattern == "block":
            if scores is not None:
                raise ValueError("pattern='block' takes a block mask or a sparsity, not element scores")
            from .block_sparse_linear import BlockSparseLinear

            return BlockSparseLinear.from_dense(linear, block_size=block_size, sparsity=sparsity,
                                                block_mask=mask, backend=backend)
        if sparsity is not None:
            raise ValueError("pattern='2:4' has a fixed sparsity of 50%; sparsity= applies to pattern='block'")
        if act_bits not in (None, 8):
            raise ValueError(f"act_bits must be None (float activations) or 8 (int8 2:4), got {act_bits!r}")
        w = linear.weight.detach()
        if mask is None:
            mask = mask_2to4(w, scores)
        packed = Sparse24Weight.from_dense(w, mask=mask)
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, pattern=pattern,
                  device=w.device, dtype=w.dtype, backend=backend, act_bits=act_bits)
        with torch.no_grad():
            if act_bits == 8:
                q = Sparse24Int8Weight.from_sparse24(packed)
                mod.values.copy_(q.values)
                mod.w_scale.copy_(q.scale)
            else:
                mod.values.copy_(packed.values)
            mod.meta_codes.copy_(packed.meta)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach())
        return mod

    # ----------------------------------------------------------------- state
    def _validate_tensors(self, t: dict) -> None:
        shape = (self.out_features, self.in_features)
        if self.act_bits == 8:
            validate_sparse24_int8(t["values"], t["meta_codes"], t["w_scale"], shape, owner="SparseLinear",
                                   meta_name="meta_codes")
        else:
            validate_sparse24(t["values"], t["meta_codes"], shape, owner="SparseLinear", meta_name="meta_codes")

    def validate_state_dict(self, state_dict, prefix: str = "", strict: bool = True) -> None:
        """Raise what :meth:`load_state_dict` would raise for ``state_dict``, copying nothing."""
        state_dict = dict(state_dict)
        _state.rename_legacy_keys(self, state_dict, prefix)
        self._validate_tensors(_state.check_state_dict(self, state_dict, prefix, strict, False))

    def validate(self) -> None:
        """Re-check this module's tensors (e.g. after writing into them in place)."""
        self._validate_tensors(dict(values=self.values.detach(), meta_codes=self.meta_codes,
                                    w_scale=getattr(self, "w_scale", None)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        _state.load_atomic(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs, self._validate_tensors)

    def weight_format(self):
        """The compressed weight (sharing storage with this module): a
        :class:`Sparse24Weight`, or a :class:`Sparse24Int8Weight` when ``act_bits=8``."""
        shape = (self.out_features, self.in_features)
        if self.act_bits == 8:
            return Sparse24Int8Weight(self.values, self.meta_codes, self.w_scale, shape)
        return Sparse24Weight(self.values.detach(), self.meta_codes, shape)

    def _float_dtype(self) -> torch.dtype:
        if self.act_bits == 8:
            return self.bias.dtype if self.bias is not None else torch.get_default_dtype()
        return self.values.dtype

    @property
    def weight(self) -> torch.Tensor:
        """Dense ``(out, in)`` weight (dequantized when ``act_bits=8``), materialized on each access."""
        if self.act_bits == 8:
            return self.weight_format().to_dense(self._float_dtype())
        return self.weight_format().to_dense()

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function (pruned entries zero; for
        ``act_bits=8`` the dequantized weight, without the activation rounding)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self._float_dtype())
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits == 8:
            if module_fast_path(x, self.backend, self.in_features, _FLOATS) and not (
                    x.requires_grad and torch.is_grad_enabled()):      # the op's backward is straight-through
                # CPU: the dense backend's math (the int8 codes expanded once, as float32), without the op's
                # machinery; the activations quantized from the input's dtype, as the op does
                values, meta, k = self.values, self.meta_codes, self.in_features
                plan = module_plan(self, (values, meta), lambda: sparse24_int8_codes_f32(values, meta, k),
                                   self.out_features, k, self.bias, self.w_scale,
                                   kernel=(lambda: sp24_int8_kernel(values, meta, k, self.w_scale), NO_ROW_LIMIT))
                if plan is not None:
                    y = plan.quant_linear(x.float(), 8, self.bias)
                    return y if x.dtype is torch.float32 else y.to(x.dtype)
            return sparse24_int8_linear_packed(x, self.values, self.meta_codes, self.w_scale, self.in_features,
                                               self.bias, backend=self.backend, validate=False)
        values = self._parameters.get("values")       # a Parameter (trainable) or a buffer
        if values is None:
            values = self._buffers["values"]
        if module_fast_path(x, self.backend, self.in_features, (values.dtype,)) and not (
                values.requires_grad and torch.is_grad_enabled()):
            # CPU: the dense expansion kept per weight version, without the op's per-call machinery
            # (ops/_dense.py)
            meta, k = self._buffers["meta_codes"], self.in_features
            bias = self._parameters.get("bias")
            plan = module_plan(self, (values, meta), lambda: cpu_weight(sparse24_dense(values.detach(), meta, k)),
                               self.out_features, k, bias,
                               kernel=(lambda: sp24_kernel(values, meta, k), NO_ROW_LIMIT))
            if plan is not None:
                return plan.linear(x, bias)
        # the buffers were validated when built / loaded: no per-call content checks
        return sparse24_linear_packed(x, self.values, self.meta_codes, self.in_features, self.bias,
                                      backend=self.backend, validate=False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, pattern={self.pattern!r}"
                + (f", act_bits={self.act_bits}" if self.act_bits else ""))
