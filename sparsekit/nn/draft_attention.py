"""DraftAttention modules: a functional wrapper and a diffusers-style attention processor.

* :class:`DraftAttention` -- ``nn.Module`` holding a geometry and sparsity
  config; ``forward(q, k, v)`` on ``(B, H, S, D)`` tensors is
  :func:`sparsekit.ops.draft_attention.draft_attention` (or dense SDPA while
  the schedule says dense).
* :class:`DraftAttnProcessor` -- usable as the ``processor`` of a diffusers
  ``Attention`` block in a video DiT: ``processor(attn, hidden_states,
  encoder_hidden_states=None, attention_mask=None, **kw)`` uses
  ``attn.to_q / to_k / to_v / to_out / heads`` (and ``norm_q`` / ``norm_k``
  when present).  With ``joint_text=True`` (CogVideoX-style joint attention)
  ``encoder_hidden_states`` are prepended to the video tokens as leading text
  tokens and the processor returns ``(hidden_states, encoder_hidden_states)``.
  Cross-attention (``encoder_hidden_states`` without ``joint_text``), an
  explicit ``attention_mask`` and dense steps/layers run dense SDPA.
* :class:`DraftSchedule` -- when to be dense: the first ``dense_steps``
  denoising steps and the layers in ``dense_layers`` (an int = the first N
  layers, or a collection of layer indices).  One schedule is shared by all
  processors of a model; call ``schedule.set_step(i)`` each denoising step.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.draft_attention import MODES, draft_attention, draft_layout

__all__ = ["DraftSchedule", "DraftAttention", "DraftAttnProcessor"]


class DraftSchedule:
    """Dense-first schedule: dense while ``step < dense_steps`` or the layer is a dense layer."""

    def __init__(self, dense_steps: int = 0, dense_layers: Union[int, Iterable[int]] = 0):
        if isinstance(dense_steps, bool) or not isinstance(dense_steps, int) or dense_steps < 0:
            raise ValueError(f"dense_steps must be an int >= 0, got {dense_steps!r}")
        if isinstance(dense_layers, int) and not isinstance(dense_layers, bool):
            if dense_layers < 0:
                raise ValueError(f"dense_layers must be >= 0 (the first N layers) or a set of indices, "
                                 f"got {dense_layers}")
            self.dense_layers = frozenset(range(dense_layers))
        else:
            try:
                layers = frozenset(int(i) for i in dense_layers)
            except TypeError:
                raise TypeError(f"dense_layers must be an int or an iterable of layer indices, "
                                f"got {type(dense_layers).__name__}") from None
            self.dense_layers = layers
        self.dense_steps = dense_steps
        self.step = 0

    def set_step(self, step: int) -> None:
        """The current denoising step (0 = first)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self.step = step

    def is_dense(self, layer_index: Optional[int] = None) -> bool:
        if self.step < self.dense_steps:
            return True
        return layer_index is not None and layer_index in self.dense_layers

    def __repr__(self) -> str:
        return (f"DraftSchedule(dense_steps={self.dense_steps}, dense_layers={sorted(self.dense_layers)}, "
                f"step={self.step})")


class _DraftConfig:
    def _init_config(self, frames, height, width, sparsity, pool, text_tokens, text_position, mode, mass,
                     backend, layer_index, schedule):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if schedule is not None and not isinstance(schedule, DraftSchedule):
            raise TypeError(f"schedule must be a DraftSchedule or None, got {type(schedule).__name__}")
        self.sparsity = sparsity
        self.pool = tuple(pool) if not isinstance(pool, int) else (pool, pool)
        self.text_position = text_position
        self.mode = mode
        self.mass = mass
        self.backend = backend
        self.layer_index = layer_index
        self.schedule = schedule if schedule is not None else DraftSchedule()
        self.set_geometry(frames, height, width, text_tokens)

    def set_geometry(self, frames: int, height: int, width: int, text_tokens: Optional[int] = None) -> None:
        """The latent token grid of the next calls (validated now; the layout is cached per geometry)."""
        tt = self.text_tokens if text_tokens is None else text_tokens
        draft_layout(frames, height, width, self.pool, tt, self.text_position)   # validates
        self.frames, self.height, self.width, self.text_tokens = frames, height, width, tt

    def set_step(self, step: int) -> None:
        self.schedule.set_step(step)

    def is_dense(self) -> bool:
        return self.sparsity == 0 or self.schedule.is_dense(self.layer_index)

    def _attend(self, q, k, v, text_tokens: int):
        if self.is_dense():
            return F.scaled_dot_product_attention(q, k, v)
        return draft_attention(q, k, v, frames=self.frames, height=self.height, width=self.width,
                               sparsity=self.sparsity, pool=self.pool, text_tokens=text_tokens,
                               text_position=self.text_position, mode=self.mode, mass=self.mass,
                               backend=self.backend)


class DraftAttention(nn.Module, _DraftConfig):
    """``forward(q, k, v)`` = draft-guided block-sparse attention on (B, H, S, D) tensors.

    ``S = text_tokens + frames * height * width``.  Dense SDPA while
    ``schedule`` says so (``set_step``) or when ``sparsity == 0``.
    """

    def __init__(self, frames: int, height: int, width: int, sparsity: float = 0.9, pool: Sequence[int] = (8, 16),
                 text_tokens: int = 0, text_position: str = "leading", mode: str = "percentile",
                 mass: float = 0.9, backend: Optional[str] = None, layer_index: Optional[int] = None,
                 schedule: Optional[DraftSchedule] = None):
        super().__init__()
        self._init_config(frames, height, width, sparsity, pool, text_tokens, text_position, mode, mass,
                          backend, layer_index, schedule)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._attend(q, k, v, self.text_tokens)

    def extra_repr(self) -> str:
        return (f"frames={self.frames}, height={self.height}, width={self.width}, sparsity={self.sparsity}, "
                f"pool={self.pool}, text_tokens={self.text_tokens}, mode={self.mode!r}")


class DraftAttnProcessor(_DraftConfig):
    """A diffusers-style attention processor running DraftAttention.

    ``processor(attn, hidden_states, encoder_hidden_states=None,
    attention_mask=None, **kwargs)``.  ``attn`` needs ``to_q``, ``to_k``,
    ``to_v``, ``to_out`` (a module or a list ``[linear, dropout]``) and
    ``heads``; ``norm_q`` / ``norm_k`` are applied to the per-head q / k when
    present.  ``rotary(x, image_rotary_emb) -> x`` applies a rotary embedding
    passed as ``image_rotary_emb`` (to the video tokens only, as CogVideoX does);
    without it a given ``image_rotary_emb`` raises ValueError.
    """

    def __init__(self, frames: int, height: int, width: int, sparsity: float = 0.9, pool: Sequence[int] = (8, 16),
                 joint_text: bool = False, text_position: str = "leading", mode: str = "percentile",
                 mass: float = 0.9, backend: Optional[str] = None, layer_index: Optional[int] = None,
                 schedule: Optional[DraftSchedule] = None, rotary: Optional[Callable] = None):
        self.joint_text = bool(joint_text)
        self.rotary = rotary
        self._init_config(frames, height, width, sparsity, pool, 0, text_position, mode, mass, backend,
                          layer_index, schedule)

    def _heads(self, attn, x, batch):
        return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, image_rotary_emb=None, **kwargs):
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be (batch, tokens, channels), got {tuple(hidden_states.shape)}")
        if image_rotary_emb is not None and self.rotary is None:
            raise ValueError("image_rotary_emb was given but the processor has no rotary function; construct it "
                             "with rotary=<fn(x, emb) -> x>")
        batch = hidden_states.shape[0]
        n_text = 0
        joint = self.joint_text and encoder_hidden_states is not None
        cross = encoder_hidden_states is not None and not joint
        if joint:
            n_text = encoder_hidden_states.shape[1]
            x = (torch.cat([encoder_hidden_states, hidden_states], dim=1) if self.text_position == "leading"
                 else torch.cat([hidden_states, encoder_hidden_states], dim=1))
            kv_in = x
        else:
            x = hidden_states
            kv_in = encoder_hidden_states if cross else hidden_states
        q = self._heads(attn, attn.to_q(x), batch)
        k = self._heads(attn, attn.to_k(kv_in), batch)
        v = self._heads(attn, attn.to_v(kv_in), batch)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            lo, hi = (n_text, q.shape[2]) if self.text_position == "leading" else (0, q.shape[2] - n_text)
            q = torch.cat([q[:, :, :lo], self.rotary(q[:, :, lo:hi], image_rotary_emb), q[:, :, hi:]], dim=2)
            if not cross:
                k = torch.cat([k[:, :, :lo], self.rotary(k[:, :, lo:hi], image_rotary_emb), k[:, :, hi:]], dim=2)
        if cross or attention_mask is not None:
            # not a video self-attention the draft applies to: dense
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        else:
            o = self._attend(q, k, v, n_text)
        o = o.transpose(1, 2).reshape(batch, -1, o.shape[1] * o.shape[3]).to(q.dtype)
        out = attn.to_out
        if isinstance(out, (nn.ModuleList, list, tuple)):
            for layer in out:
                o = layer(o)
        else:
            o = out(o)
        if joint:
            if self.text_position == "leading":
                return o[:, n_text:], o[:, :n_text]
            return o[:, :o.shape[1] - n_text], o[:, o.shape[1] - n_text:]
        return o
