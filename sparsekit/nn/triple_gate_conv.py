"""``TripleGateConv2d``: a drop-in ``nn.Conv2d`` for video that, frame by frame,
recomputes only the output tiles whose input changed (SpVOS-style triple gate).

Call it with one frame ``(N, C, H, W)`` at a time (batch = N independent
videos, each sample with its own gates) and ``reset()`` between videos.  The
layer keeps the previous input and output; per output tile (``tile x tile``
output pixels, ``tile=1``: per pixel) it chooses

* UPDATE -- recompute with the full convolution (Triton implicit GEMM over the
  UPDATE tiles only, written into the persistent output buffer),
* REUSE  -- keep the previous frame's output (costs nothing),
* SKIP   -- bias only, for spatially unimportant regions.

Inference (``eval()``, or ``train()`` without gate training): the first frame
after ``reset()`` is computed densely; afterwards the gate map and the tile
list are computed on the device (:func:`sparsekit.ops.triple_gate_conv.triple_gate_map`):
UPDATE where the temporal change ``max |x_t - x_{t-1}|`` over a tile's
receptive field exceeds ``threshold`` (0 = lossless: a tile is reused only
when its receptive field is bit-identical), SKIP (once enabled, see
:meth:`TripleGateConv2d.enable_skip`) where the learned spatial importance --
a 1x1 conv averaged over the tile's receptive field -- has
``sigmoid(logit) < skip_threshold``.  :meth:`from_conv` gives threshold-only
gating with SKIP off: no training needed.

Gate training (:meth:`TripleGateConv2d.enable_gate_training`, module in
``train()`` mode): the output is composed softly from a dense conv, the
previous output and the bias with straight-through Gumbel-softmax masks over
the three choices.  The gate is hierarchical: ``P(SKIP) = sigmoid(skip_logit
- importance)``, and among the kept tiles ``P(UPDATE) = sigmoid(sharpness *
(log(change + eps) - log_threshold))``; ``log_threshold`` and the importance
conv are learned.  Its hard decoding (skip iff importance < skip_logit, else
update iff change > threshold) is exactly the inference rule.  :func:`compute_loss`
holds each layer's compute ratio at a target; ``dense_prob`` mixes in dense
frames (mixed sparse training).

Each call records the realized compute ratio (conv FLOPs done / dense FLOPs =
UPDATE output pixels / all output pixels; the gate's own cost is not counted)
in ``compute_ratio`` (last frame) and ``mean_compute_ratio`` (since reset).

NaN / Inf: a tile whose receptive field changed by a non-finite amount (NaN
or Inf in either frame) is UPDATEd, so the output matches the dense conv --
NaN where the dense conv gives NaN, and clean again on the next clean frame.
Weight changes invalidate the cached frame by themselves: when ``weight`` or
``bias`` was modified in place (optimizer step, ``copy_``, ``load_state_dict``)
or replaced (``.to()``, ``.half()``) since the last frame, the next frame is
computed densely.  ``reset()`` is only needed between videos.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import triple_gate_conv as tgc
from . import _state

__all__ = ["TripleGateConv2d", "compute_loss", "compute_ratios"]

_EPS = 1e-6


def _pair(v, name, minimum):
    return tgc._pair(v, name, minimum)


class TripleGateConv2d(nn.Module):
    """Drop-in ``nn.Conv2d`` (NCHW in and out, ``groups=1``, zero padding) with
    per-tile UPDATE / REUSE / SKIP gating across video frames.

    Extra arguments: ``tile`` (output tile edge), ``threshold`` (temporal
    change threshold, input units), ``skip_threshold`` (importance probability
    below which a tile is SKIPped; ``None`` = SKIP off), ``clone_output``
    (return a copy of the persistent output buffer -- safe to keep across
    frames; ``False`` returns the buffer itself, overwritten by the next call),
    ``dense_prob`` (gate training: probability that a frame is computed
    densely), ``gate_temperature`` / ``gate_sharpness`` (Gumbel-softmax
    temperature; slope of the temporal gate in log-change units), ``backend``
    (force an ops backend: ``triton``, ``interpret``, ``reference``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, tile: int = 8, threshold: float = 0.0, skip_threshold: Optional[float] = None,
                 clone_output: bool = True, dense_prob: float = 0.0, gate_temperature: float = 1.0,
                 gate_sharpness: float = 4.0, device=None, dtype=None, backend: Optional[str] = None):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
            raise ValueError(f"tile must be a positive int, got {tile!r}")
        self.tile = tile
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold!r}")
        if not 0.0 <= dense_prob <= 1.0:
            raise ValueError(f"dense_prob must be in [0, 1], got {dense_prob!r}")
        self.skip_threshold = None
        if skip_threshold is not None:
            tgc.skip_logit_of(skip_threshold)  # validates
            self.skip_threshold = float(skip_threshold)
        self.clone_output = bool(clone_output)
        self.dense_prob = float(dense_prob)
        self.gate_temperature = float(gate_temperature)
        self.gate_sharpness = float(gate_sharpness)
        self.backend = backend
        self.gate_training = False
        fk = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **fk))
        self.bias = nn.Parameter(torch.empty(out_channels, **fk)) if bias else None
        # spatial importance: a 1x1 conv (C -> 1) in fp32; starts "everything important"
        self.importance = nn.Conv2d(in_channels, 1, 1, device=device, dtype=torch.float32)
        self.log_threshold = nn.Parameter(torch.tensor(math.log(threshold) if threshold > 0 else -math.inf,
                                                       device=device, dtype=torch.float32))
        self.reset_parameters()
        self.reset()

    def reset_parameters(self) -> None:
        ref = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=self.bias is not None)
        with torch.no_grad():
            self.weight.copy_(ref.weight)
            if self.bias is not None:
                self.bias.copy_(ref.bias)
            self.importance.weight.zero_()
            self.importance.bias.fill_(4.0)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, tile: int = 8, threshold: float = 0.0,
                  skip_threshold: Optional[float] = None, **kwargs) -> "TripleGateConv2d":
        """A TripleGateConv2d with ``conv``'s weight and bias (copied), threshold-only gating."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"grouped convolutions are not supported (groups={conv.groups})")
        if conv.padding_mode != "zeros":
            raise ValueError(f"only zero padding is supported, got padding_mode={conv.padding_mode!r}")
        padding = conv.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0, 0)
            else:  # 'same' (stride 1): symmetric only
                total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
                if any(t % 2 for t in total):
                    raise ValueError("padding='same' with an even effective kernel needs asymmetric padding, "
                                     "which TripleGateConv2d does not support")
                padding = tuple(t // 2 for t in total)
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                  bias=conv.bias is not None, tile=tile, threshold=threshold, skip_threshold=skip_threshold,
                  device=conv.weight.device, dtype=conv.weight.dtype, **kwargs)
        with torch.no_grad():
            mod.weight.copy_(conv.weight)
            if conv.bias is not None:
                mod.bias.copy_(conv.bias)
        return mod

    # ------------------------------------------------------------------ gate settings
    @property
    def threshold(self) -> float:
        v = float(self.log_threshold.detach())
        return 0.0 if v == -math.inf else math.exp(v)

    @threshold.setter
    def threshold(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"threshold must be >= 0, got {value!r}")
        with torch.no_grad():
            self.log_threshold.fill_(math.log(value) if value > 0 else -math.inf)

    def enable_skip(self, skip_threshold: float = 0.5) -> "TripleGateConv2d":
        tgc.skip_logit_of(skip_threshold)
        self.skip_threshold = float(skip_threshold)
        return self

    def disable_skip(self) -> "TripleGateConv2d":
        self.skip_threshold = None
        return self

    def enable_gate_training(self, init_threshold: float = 1e-2, skip: bool = True, skip_threshold: float = 0.5,
                             dense_prob: Optional[float] = None) -> "TripleGateConv2d":
        """Learn the gates in ``train()`` mode (Gumbel-softmax straight-through).

        A zero threshold (log = -inf) is replaced by ``init_threshold`` so that
        it can move; ``skip`` turns the SKIP branch on (the importance conv
        starts at "important everywhere").
        """
        self.gate_training = True
        if not math.isfinite(float(self.log_threshold.detach())):
            self.threshold = init_threshold
        if skip and self.skip_threshold is None:
            self.enable_skip(skip_threshold)
        if dense_prob is not None:
            if not 0.0 <= dense_prob <= 1.0:
                raise ValueError(f"dense_prob must be in [0, 1], got {dense_prob!r}")
            self.dense_prob = float(dense_prob)
        return self

    def disable_gate_training(self) -> "TripleGateConv2d":
        self.gate_training = False
        return self

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the previous frame (call between videos); the next frame is dense."""
        self._drop_frame()
        self._soft_ratio = None
        self._num = None          # UPDATE output pixels of the last frame (tensor or float)
        self._num_sum = None      # ... summed over the frames since reset (no host sync per frame)
        self._den = 1.0           # output pixels per frame
        self._frames = 0

    def _drop_frame(self) -> None:
        """Forget the cached frame (input, output, gates) but not the statistics."""
        self._key = None
        self._wkey = None
        self._prev_x = None
        self._out = None
        self._out_owned = False
        self._gate = None

    def _weights_key(self) -> tuple:
        """Identity, storage and version of the tensors the cached output was computed with."""
        return tuple(None if t is None else (id(t), t.data_ptr(), t._version, t.dtype, t.device)
                     for t in (self.weight, self.bias))

    @property
    def compute_ratio(self) -> Optional[float]:
        """Conv FLOPs done / dense FLOPs on the last frame (None before the first)."""
        return None if self._num is None else float(self._num) / self._den

    @property
    def mean_compute_ratio(self) -> Optional[float]:
        """Average of :attr:`compute_ratio` over the frames since :meth:`reset`."""
        return None if self._frames == 0 else float(self._num_sum) / (self._den * self._frames)

    @property
    def last_gate(self) -> Optional[torch.Tensor]:
        """The last frame's (N, TH, TW) int8 gate map (codes REUSE=0, UPDATE=1, SKIP=2)."""
        return self._gate

    def _record(self, num, den: float) -> None:
        """num: UPDATE output pixels (a device tensor -- read lazily -- or a float); den: all output pixels."""
        if isinstance(num, torch.Tensor):
            num = num.detach()
        self._num = num
        self._den = float(den)
        self._num_sum = num if self._num_sum is None else self._num_sum + num
        self._frames += 1

    def _skip_logit(self) -> Optional[float]:
        return tgc.skip_logit_of(self.skip_threshold)

    def _kernel_weight(self) -> torch.Tensor:
        """The weight with CO contiguous (the kernel's B operand loads rows of CO), cached per version."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if getattr(self, "_kw_key", None) != key:
            self._kw = w.detach().permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
            self._kw_key = key
        return self._kw

    # ------------------------------------------------------------------ forward
    def _check(self, x: torch.Tensor) -> tuple:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"input must be one frame (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"channel mismatch: input has {x.shape[1]} channels, the layer expects "
                             f"in_channels={self.in_channels}")
        if x.dtype != self.weight.dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the layer's weight dtype {self.weight.dtype}")
        if x.device != self.weight.device:
            raise ValueError(f"input is on {x.device} but the layer is on {self.weight.device}")
        key = (tuple(x.shape), x.dtype, x.device)
        if self._key is not None and key != self._key:
            raise ValueError(f"frame changed from {self._key[0]} to {tuple(x.shape)} (batch or frame size) "
                             "without reset(): call reset() between videos")
        ho, wo = tgc.conv_output_size(x.shape[2], x.shape[3], self.kernel_size, self.stride, self.padding,
                                      self.dilation)
        if ho < 1 or wo < 1:
            raise ValueError(f"input {tuple(x.shape[2:])} is too small for kernel {self.kernel_size}")
        return key, ho, wo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.gate_training) and self._wkey is not None \
                and self._wkey != self._weights_key():
            self._drop_frame()      # the weights changed since the cached frame: recompute densely
        key, ho, wo = self._check(x)
        if self.training and self.gate_training:
            y = self._forward_train(x, ho, wo)
        elif self.training:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
            self._store_soft(x, y, None)
            self._record(float(y[:, :1].numel()), y[:, :1].numel())
        else:
            y = self._forward_gated(x, ho, wo)
        self._key = key
        self._wkey = self._weights_key()
        return y

    def _store_soft(self, x, y, gate) -> None:
        self._prev_x = x.detach()
        self._out = y.detach()
        self._out_owned = False     # the caller holds y: copy before writing into it
        self._gate = gate

    def _forward_gated(self, x: torch.Tensor, ho: int, wo: int) -> torch.Tensor:
        n = x.shape[0]
        th, tw = tgc.tile_grid(ho, wo, self.tile)
        xd = x.detach()
        x_cl = xd.contiguous(memory_format=torch.channels_last)
        if self._out is None:
            out = torch.empty((n, self.out_channels, ho, wo), dtype=x.dtype, device=x.device,
                              memory_format=torch.channels_last)
            gates = tgc.dense_gates(n, ho, wo, self.tile, x.device)
        else:
            out = self._out
            if not self._out_owned:
                out = out.contiguous(memory_format=torch.channels_last).clone(memory_format=torch.channels_last)
            skip_logit = self._skip_logit()
            imp_w = self.importance.weight.detach().reshape(-1) if skip_logit is not None else None
            imp_b = float(self.importance.bias.detach()) if skip_logit is not None else 0.0
            gates = tgc.triple_gate_map(x_cl, self._prev_x, self.kernel_size, self.stride, self.padding,
                                        self.dilation, self.tile, self.threshold, importance_weight=imp_w,
                                        importance_bias=imp_b, skip_logit=skip_logit,
                                        prev_gate=self._gate, backend=self.backend)
        bias = None if self.bias is None else self.bias.detach()
        tgc.triple_gate_conv2d(x_cl, self._kernel_weight(), bias, gates, out, self.stride, self.padding,
                               self.dilation, self.tile, backend=self.backend, validate=False)
        # keep our own copy of the frame: the caller may overwrite its input tensor
        self._prev_x = x_cl.clone(memory_format=torch.channels_last) if x_cl is xd else x_cl
        self._out = out
        self._out_owned = True
        self._gate = gates.gate
        self._soft_ratio = None
        self._record(gates.counts[2], n * ho * wo)
        return out.clone(memory_format=torch.channels_last) if self.clone_output else out

    def _forward_train(self, x: torch.Tensor, ho: int, wo: int) -> torch.Tensor:
        n = x.shape[0]
        y_dense = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        dense = self._prev_x is None or (self.dense_prob > 0 and float(torch.rand(())) < self.dense_prob)
        th, tw = tgc.tile_grid(ho, wo, self.tile)
        if dense:
            self._store_soft(x, y_dense, torch.full((n, th, tw), tgc.UPDATE, dtype=torch.int8, device=x.device))
            self._soft_ratio = None
            self._record(float(n * ho * wo), n * ho * wo)
            return y_dense
        skip_logit = self._skip_logit()
        change, imp = tgc.gate_features(x, self._prev_x, self.kernel_size, self.stride, self.padding,
                                        self.dilation, self.tile,
                                        self.importance.weight.reshape(-1) if skip_logit is not None else None,
                                        self.importance.bias if skip_logit is not None else None)
        log_thr = self.log_threshold.clamp(min=math.log(_EPS))
        u = self.gate_sharpness * (torch.log(change + _EPS) - log_thr)
        if skip_logit is not None:
            z = imp - skip_logit
            logits = torch.stack([F.logsigmoid(z) + F.logsigmoid(-u), F.logsigmoid(z) + F.logsigmoid(u),
                                  F.logsigmoid(-z)], dim=-1)
            m = F.gumbel_softmax(logits, tau=self.gate_temperature, hard=True)
            m_r, m_u, m_s = m.unbind(-1)
        else:
            logits = torch.stack([F.logsigmoid(-u), F.logsigmoid(u)], dim=-1)
            m = F.gumbel_softmax(logits, tau=self.gate_temperature, hard=True)
            m_r, m_u = m.unbind(-1)
            m_s = torch.zeros_like(m_r)
        if self._gate is not None:
            # a tile leaving SKIP holds bias only: REUSE becomes UPDATE there (as at inference)
            was_skip = (self._gate == tgc.SKIP).float()
            m_u = m_u + m_r * was_skip
            m_r = m_r * (1.0 - was_skip)
        pu, pr, ps = (tgc.pixel_gate(t, self.tile, ho, wo).to(y_dense.dtype) for t in (m_u, m_r, m_s))
        prev = self._out.to(y_dense.dtype)
        y = pu * y_dense + pr * prev
        if self.bias is not None:
            y = y + ps * self.bias[None, :, None, None]
        w = tgc.tile_pixel_counts(ho, wo, self.tile, x.device)
        ratio = (m_u.float() * w).sum() / (w.sum() * n)
        hard = torch.stack([m_r, m_u, m_s], dim=-1).argmax(-1).to(torch.int8)
        self._store_soft(x, y, hard)
        self._soft_ratio = ratio
        self._record(ratio * (n * ho * wo), n * ho * wo)
        return y

    # ------------------------------------------------------------------ state
    def _validate_tensors(self, t: dict) -> None:
        w = t["weight"]
        want = (self.out_channels, self.in_channels, *self.kernel_size)
        if tuple(w.shape) != want:
            raise ValueError(f"weight must have shape {want}, got {tuple(w.shape)}")
        lt = t["log_threshold"]
        if lt.device.type != "meta" and bool(torch.isnan(lt)):
            raise ValueError("log_threshold must not be NaN (the gate threshold is exp(log_threshold), >= 0)")

    def validate_state_dict(self, state_dict, prefix: str = "", strict: bool = True) -> None:
        """Raise what :meth:`load_state_dict` would raise for ``state_dict``, copying nothing."""
        self._validate_tensors(_state.check_state_dict(self, state_dict, prefix, strict, False))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        _state.load_atomic(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs, self._validate_tensors)

    def compute_loss(self, target: float) -> torch.Tensor:
        """``(ratio - target)^2`` of the last gated training frame (0 after a dense frame)."""
        if self._soft_ratio is None:
            return torch.zeros((), device=self.weight.device)
        return (self._soft_ratio - target) ** 2

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, tile={self.tile}, "
             f"threshold={self.threshold:g}, skip_threshold={self.skip_threshold}")
        return s


def compute_loss(model: nn.Module, target: float) -> torch.Tensor:
    """Mean over the model's TripleGateConv2d layers that ran a gated training frame of
    ``(compute_ratio - target)^2`` (differentiable through the straight-through gates)."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target compute ratio must be in [0, 1], got {target!r}")
    terms = [m.compute_loss(target) for m in model.modules()
             if isinstance(m, TripleGateConv2d) and m._soft_ratio is not None]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")
    return torch.stack(terms).mean()


def compute_ratios(model: nn.Module) -> dict:
    """``{name: mean compute ratio since reset}`` for each TripleGateConv2d in ``model``."""
    return {name: m.mean_compute_ratio for name, m in model.named_modules() if isinstance(m, TripleGateConv2d)}
