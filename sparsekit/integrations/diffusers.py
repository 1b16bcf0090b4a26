"""One-call DraftAttention on diffusers video transformers and pipelines.

``apply_draft_attention(pipe_or_transformer, sparsity=0.9, pool=(8, 16), dense_steps=..., dense_layers=...)``
replaces the processor of every *video self-attention* block of a supported diffusers video transformer
(see :data:`FAMILIES`) by a DraftAttention processor; ``remove_draft_attention`` puts the original processor
objects back.  Cross-attention, text-only attention and temporal 1-D attention stay untouched (dense).

How it works:

* **The family's own processor code runs unchanged.**  Each patched processor is an instance of a subclass of
  the block's native processor class whose ``__call__`` is the native ``__call__`` code with one name rebound
  in its globals: the attention function it calls (``dispatch_attention_fn`` for the families that use the
  diffusers dispatcher, ``F.scaled_dot_product_attention`` for the others).  Projections, q/k norms (Wan's
  RMS norm over the full hidden size before the head split), rotary embeddings and output projections are
  the family's own; only the attention itself becomes draft-guided block-sparse.
* **Geometry at call time.**  A forward pre-hook on the transformer reads the latent video shape of each call
  (``hidden_states``' shape, or LTX-Video's ``num_frames/height/width`` arguments) and divides by the patch
  size from the config: every call may use another resolution; layouts are cached per geometry.  Text tokens
  of joint attention (CogVideoX leading; HunyuanVideo, Mochi trailing) are the layout's dense text tokens.
* **Dense-first schedule without touching the loop.**  The same hook counts denoising steps from the
  ``timestep`` argument: a call with a new (smaller) timestep is a new step, a call with the same timestep
  (classifier-free guidance run as a second call) is the same step, a larger timestep starts a new generation
  (step 0).  Without a timestep every call is a step.  Steps whose transformer call is skipped (TeaCache-style
  caching) are not counted: ``dense_steps`` counts executed steps.
* **Masks.**  HunyuanVideo passes a key-padding mask for its padded text: each batch element attends over its
  valid tokens only (video + its valid text, sparse), padded query rows are set to zero (nothing reads them).
  Mochi drops padded text itself and calls attention per batch element.
"""
from __future__ import annotations

import inspect
import itertools
import sys
import types
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..nn.draft_attention import DraftSchedule
from ..ops.draft_attention import MODES, block_sparse_attention, draft_block_mask, draft_layout

__all__ = ["apply_draft_attention", "remove_draft_attention", "latent_grid", "DraftHandle", "FAMILIES",
           "UNSUPPORTED"]


# =========================================================================== families
@dataclass(frozen=True)
class _Family:
    name: str
    blocks: tuple                # attribute paths of the patched attention modules ("*" = every list item)
    processors: tuple            # native processor class names the adapter knows
    call: str                    # "dispatch" (dispatch_attention_fn, (B, S, H, D)) or "sdpa" ((B, H, S, D))
    text: Optional[str]          # None (video tokens only), "leading" or "trailing"
    layout: str                  # how the pre-hook reads the latent grid: "bcfhw", "bfchw", "ltx", "latte"
    mask: str = "none"           # "none" (a mask raises) or "key_padding"
    notes: str = ""


FAMILIES = {
    "WanTransformer3DModel": _Family(
        "Wan 2.x", ("blocks.*.attn1",), ("WanAttnProcessor", "WanAttnProcessor2_0"), "dispatch", None, "bcfhw",
        notes="self-attention attn1; cross-attention attn2 (text and I2V image context) stays dense"),
    "SkyReelsV2Transformer3DModel": _Family(
        "SkyReels-V2", ("blocks.*.attn1",), ("SkyReelsV2AttnProcessor", "SkyReelsV2AttnProcessor2_0"), "dispatch",
        None, "bcfhw", notes="Wan-derived; diffusion forcing's causal self-attention mask raises"),
    "WanVACETransformer3DModel": _Family(
        "Wan VACE", ("blocks.*.attn1", "vace_blocks.*.attn1"), ("WanAttnProcessor", "WanAttnProcessor2_0"),
        "dispatch", None, "bcfhw", notes="the main and the VACE control blocks' self-attention"),
    "ChronoEditTransformer3DModel": _Family(
        "ChronoEdit", ("blocks.*.attn1",), ("WanAttnProcessor", "WanAttnProcessor2_0"), "dispatch", None, "bcfhw",
        notes="Wan-derived"),
    "HunyuanVideoTransformer3DModel": _Family(
        "HunyuanVideo", ("transformer_blocks.*.attn", "single_transformer_blocks.*.attn"),
        ("HunyuanVideoAttnProcessor2_0",), "dispatch", "trailing", "bcfhw", "key_padding",
        notes="joint attention, trailing text; the text padding mask is honoured per batch element"),
    "CogVideoXTransformer3DModel": _Family(
        "CogVideoX", ("transformer_blocks.*.attn1",), ("CogVideoXAttnProcessor2_0",), "sdpa", "leading",
        "bfchw", notes="joint attention, leading text"),
    "LTXVideoTransformer3DModel": _Family(
        "LTX-Video", ("transformer_blocks.*.attn1",), ("LTXVideoAttnProcessor", "LTXVideoAttentionProcessor2_0"),
        "dispatch", None, "ltx", notes="self-attention attn1; cross-attention attn2 stays dense"),
    "MochiTransformer3DModel": _Family(
        "Mochi", ("transformer_blocks.*.attn1",), ("MochiAttnProcessor2_0",), "sdpa", "trailing", "bcfhw",
        notes="joint attention, trailing text; the processor drops padded text per batch element"),
    "LatteTransformer3DModel": _Family(
        "Latte", ("transformer_blocks.*.attn1",), ("AttnProcessor2_0",), "sdpa", None, "latte",
        notes="spatial self-attention (one frame's height x width grid per call); temporal attention "
              "(over frames only) and cross-attention stay dense"),
    "AllegroTransformer3DModel": _Family(
        "Allegro", ("transformer_blocks.*.attn1",), ("AllegroAttnProcessor2_0",), "sdpa", None, "bcfhw",
        notes="self-attention attn1; cross-attention attn2 stays dense"),
}

# every other transformer class of diffusers.models.transformers that has a video (frames) axis, and why it
# is not adapted; image/audio/other transformers are not video models (their attention has no frames axis).
UNSUPPORTED = {
    "WanAnimateTransformer3DModel": "its face/motion adapter attention is not adapted or tested",
    "WanAnimate2Transformer3DModel": "its face/motion adapter attention is not adapted or tested",
    "HunyuanVideo15Transformer3DModel": "its processor and mask convention are not adapted or tested",
    "HunyuanVideoFramepackTransformer3DModel": "its packed history latents (several resolutions in one "
                                                "sequence) do not form one frames x height x width grid",
    "ConsisIDTransformer3DModel": "its identity-conditioning processor is not adapted or tested",
    "EasyAnimateTransformer3DModel": "its processor is not adapted or tested",
    "LTX2VideoTransformer3DModel": "its joint audio-video attention is not adapted or tested",
    "CosmosTransformer3DModel": "its processor is not adapted or tested",
    "Cosmos3OmniTransformer": "its processor is not adapted or tested",
    "SanaVideoTransformer3DModel": "it uses linear attention (no softmax attention map to sparsify)",
    "SanaWMTransformer3DModel": "it uses linear attention / world-model memory, not adapted",
    "SanaWMLTX2RefinerTransformer3DModel": "not adapted or tested",
    "Kandinsky5Transformer3DModel": "its processor is not adapted or tested",
    "Kandinsky6Transformer3DModel": "its processor is not adapted or tested",
    "Kandinsky6SRTransformer3DModel": "its processor is not adapted or tested",
    "MotifVideoTransformer3DModel": "its processor is not adapted or tested",
    "HeliosTransformer3DModel": "its processor is not adapted or tested",
    "AnyFlowTransformer3DModel": "its processor is not adapted or tested",
    "AnyFlowFARTransformer3DModel": "its processor is not adapted or tested",
    "MiniMaxH3Transformer3DModel": "its processor is not adapted or tested",
    "JoyImageEditTransformer3DModel": "an image-editing model, not a video grid",
    "JoyImageEditPlusTransformer3DModel": "an image-editing model, not a video grid",
    "TransformerTemporalModel": "temporal attention over frames only (no spatial grid)",
}


# =========================================================================== geometry
def _patch(config, family: _Family):
    """(p_t, p_h, p_w) of a transformer config; p_t None means CogVideoX 1.0 (no temporal patching)."""
    p = config.patch_size
    if isinstance(p, (tuple, list)):
        return tuple(int(x) for x in p)
    pt = getattr(config, "patch_size_t", 1)
    if family.layout == "bfchw":
        return (pt, int(p), int(p))
    return (1 if pt is None else int(pt), int(p), int(p))


def _grid_from_latents(family: _Family, config, f: int, h: int, w: int) -> tuple:
    pt, ph, pw = _patch(config, family)
    if family.layout == "latte":
        return (1, h // ph, w // pw)
    ft = f if pt is None else -(-f // pt)     # CogVideoX 1.5 pads the frames to a multiple of patch_size_t
    return (ft, h // ph, w // pw)


def latent_grid(pipe_or_transformer, *, height: int, width: int, num_frames: int) -> tuple:
    """The (frames, height, width) token grid of the patched self-attention for a generation of
    ``num_frames`` frames of ``height`` x ``width`` pixels: pixels -> latents through the pipeline's VAE
    compression (``vae_scale_factor_spatial`` / ``vae_scale_factor_temporal``), then the patch size of the
    transformer config.  A bare transformer takes latent sizes (``height``/``width``/``num_frames`` of the
    latents)."""
    transformers = _transformers(pipe_or_transformer)
    family = _family(transformers[0])
    for name, v in (("height", height), ("width", width), ("num_frames", num_frames)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if transformers[0] is not pipe_or_transformer:
        pipe = pipe_or_transformer
        ss = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None)
        ts = getattr(pipe, "vae_scale_factor_temporal", None) or 1
        if ss is None:
            raise ValueError(f"{type(pipe).__name__} has no vae_scale_factor_spatial / vae_scale_factor: pass "
                             f"the transformer and latent sizes instead")
        if family.layout == "latte":
            f, h, w = num_frames, height // ss, width // ss          # Latte's VAE is per frame
        else:
            f, h, w = (num_frames - 1) // ts + 1, height // ss, width // ss
    else:
        f, h, w = num_frames, height, width
    return _grid_from_latents(family, transformers[0].config, f, h, w)


# =========================================================================== state
class _State:
    """Shared by all processors (and transformers) of one apply_draft_attention call."""

    def __init__(self, schedule: DraftSchedule):
        self.schedule = schedule
        self.grid: Optional[tuple] = None
        self.last_t: Optional[float] = None
        self.calls = 0               # transformer calls
        self.sparse_calls = 0        # attention calls that took the block-sparse path
        self.dense_calls = 0         # patched self-attention calls run dense (schedule / sparsity 0)

    def reset(self) -> None:
        self.last_t = None
        self.calls = 0
        self.schedule.set_step(0)

    def on_call(self, grid: tuple, t: Optional[float]) -> None:
        self.grid = grid
        s = self.schedule.step
        if t is None:
            s = self.calls
        elif self.last_t is None or t > self.last_t:
            s = 0                          # first call, or a new generation (timesteps decrease in one)
        elif t < self.last_t:
            s += 1
        self.schedule.set_step(s)
        self.last_t = t
        self.calls += 1


def _timestep_value(t) -> Optional[float]:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.detach().float().max()) if t.numel() else None
    return float(t)


def _bind(module, args, kwargs):
    try:
        return inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return dict(kwargs)


def _make_pre_hook(state: _State, family: _Family):
    def hook(module, args, kwargs):
        a = _bind(module, args, kwargs)
        if family.layout == "ltx":
            dims = (a.get("num_frames"), a.get("height"), a.get("width"))
            if any(d is None for d in dims):
                raise ValueError("LTXVideoTransformer3DModel must be called with num_frames, height and width "
                                 "for DraftAttention to know the token grid")
            f, h, w = (int(d) for d in dims)
        else:
            hs = a.get("hidden_states")
            if not isinstance(hs, torch.Tensor) or hs.dim() != 5:
                raise ValueError(f"{type(module).__name__}: DraftAttention expects 5-D latent hidden_states, got "
                                 f"{None if hs is None else tuple(getattr(hs, 'shape', ()))}")
            if family.layout == "bfchw":
                _, f, _, h, w = hs.shape
            else:
                _, _, f, h, w = hs.shape
        state.on_call(_grid_from_latents(family, module.config, int(f), int(h), int(w)),
                      _timestep_value(a.get("timestep")))
    return hook


# =========================================================================== processors
_COUNTER = itertools.count()


def _native_call_with(native_call, replace: dict):
    """The native ``__call__`` code with some global names rebound.  Its globals are the ``__dict__`` of a
    module registered in ``sys.modules`` (torch.compile installs compiled code into the module named by a
    frame's ``__name__``); ``__package__`` stays the native one for the function's relative imports."""
    name = f"{__name__}._patched_{next(_COUNTER)}"
    mod = types.ModuleType(name)
    g = mod.__dict__
    g.update(native_call.__globals__)
    g.update(replace)
    g["__name__"] = name
    sys.modules[name] = mod
    # a code object of its own: torch.compile caches compiled frames per code object, and a frame compiled
    # with one globals dict must not be reused with another
    code = native_call.__code__.replace()
    fn = types.FunctionType(code, g, native_call.__name__, native_call.__defaults__, native_call.__closure__)
    fn.__kwdefaults__ = native_call.__kwdefaults__
    return fn


_CLASS_CACHE: dict = {}


def _draft_class(native_cls):
    """A subclass of the native processor class whose __call__ keeps the native signature (diffusers filters
    the keyword arguments it passes by that signature)."""
    cls = _CLASS_CACHE.get(native_cls)
    if cls is None:
        native_call = native_cls.__call__

        def __call__(self, attn, *args, **kwargs):
            return self._draft_call(self, attn, *args, **kwargs)

        __call__.__signature__ = inspect.signature(native_call)
        cls = type(f"Draft{native_cls.__name__}", (native_cls,), {"__call__": __call__, "__module__": __name__})
        _CLASS_CACHE[native_cls] = cls
    return cls


class _Attend:
    """The attention function handed to the native processor code of one layer."""

    def __init__(self, family: _Family, native_fn: Callable, state: _State, layer_index: int, sparsity: float,
                 pool: tuple, mode: str, mass: float, backend: Optional[str]):
        self.family, self.native_fn, self.state, self.layer_index = family, native_fn, state, layer_index
        self.sparsity, self.pool, self.mode, self.mass, self.backend = sparsity, pool, mode, mass, backend

    def is_dense(self) -> bool:
        return self.sparsity == 0 or self.state.schedule.is_dense(self.layer_index)

    def __call__(self, *args, **kwargs):
        q, k, v = (list(args[:3]) + [kwargs.get(n) for n in ("query", "key", "value")][len(args):])[:3]
        bshd = self.family.call == "dispatch"
        sdim = 1 if bshd else 2
        if q.shape[sdim] != k.shape[sdim]:          # cross-attention (e.g. an I2V image context): dense
            return self.native_fn(*args, **kwargs)
        if self.is_dense():
            self.state.dense_calls += 1
            return self.native_fn(*args, **kwargs)
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        dropout = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
        causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
        scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
        if dropout or causal:
            raise ValueError(f"{self.family.name}: DraftAttention supports non-causal attention without dropout "
                             f"(got dropout_p={dropout}, is_causal={causal})")
        if bshd:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = self._sparse(q, k, v, mask, scale)
        return out.transpose(1, 2) if bshd else out

    def _n_text(self, seq: int) -> int:
        frames, height, width = self.state.grid
        nv = frames * height * width
        nt = seq - nv
        if nt < 0 or (nt and self.family.text is None):
            raise ValueError(f"{self.family.name}: attention sequence length {seq} does not match the latent "
                             f"grid frames*height*width={frames}*{height}*{width}={nv}"
                             + ("" if self.family.text is None else " plus text tokens"))
        return nt

    def _one(self, q, k, v, scale):
        frames, height, width = self.state.grid
        nt = self._n_text(q.shape[2])
        layout = draft_layout(frames, height, width, self.pool, nt, self.family.text or "leading", q.device)
        bm = draft_block_mask(q, k, layout, self.sparsity, self.mode, self.mass, scale)
        self.state.sparse_calls += 1
        return block_sparse_attention(q, k, v, bm, layout, scale=scale, backend=self.backend)

    def _sparse(self, q, k, v, mask, scale):
        if mask is None:
            return self._one(q, k, v, scale)
        if self.family.mask != "key_padding":
            raise ValueError(f"{self.family.name}: an attention_mask on the video self-attention is not supported "
                             f"by DraftAttention (shape {tuple(mask.shape)})")
        B, H, S, D = q.shape
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 \
                or mask.shape[-1] != S or mask.shape[0] not in (1, B):
            raise ValueError(f"{self.family.name}: expected a bool key-padding mask of shape (B, 1, 1, {S}), got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        keys = mask[:, 0, 0].expand(B, S)
        frames, height, width = self.state.grid
        nv = frames * height * width
        v0 = self._n_text(S) if self.family.text == "leading" else 0
        out = torch.zeros_like(q)
        for b in range(B):
            if not bool(keys[b, v0:v0 + nv].all()):
                raise ValueError(f"{self.family.name}: the attention mask masks video tokens; DraftAttention "
                                 f"supports masks of padded text only")
            idx = torch.nonzero(keys[b]).flatten()
            if idx.numel() == S:
                out[b:b + 1] = self._one(q[b:b + 1], k[b:b + 1], v[b:b + 1], scale)
            else:
                sel = lambda t: t[b:b + 1].index_select(2, idx)  # noqa: E731
                out[b:b + 1].index_copy_(2, idx, self._one(sel(q), sel(k), sel(v), scale))
        return out


# =========================================================================== apply / remove
def _transformers(obj) -> list:
    if isinstance(obj, torch.nn.Module) and hasattr(obj, "config") and type(obj).__name__ in {
            *FAMILIES, *UNSUPPORTED} or (isinstance(obj, torch.nn.Module) and not hasattr(obj, "transformer")):
        return [obj]
    found = [getattr(obj, n, None) for n in ("transformer", "transformer_2")]
    found = [t for t in found if isinstance(t, torch.nn.Module)]
    if not found:
        raise TypeError(f"apply_draft_attention needs a diffusers pipeline with a .transformer or a video "
                        f"transformer module, got {type(obj).__name__}")
    return found


def _family(transformer) -> _Family:
    name = type(transformer).__name__
    if name in FAMILIES:
        return FAMILIES[name]
    for base in type(transformer).__mro__[1:]:
        if base.__name__ in FAMILIES:
            return FAMILIES[base.__name__]
    if name in UNSUPPORTED:
        raise NotImplementedError(f"DraftAttention does not support {name}: {UNSUPPORTED[name]}")
    raise NotImplementedError(f"DraftAttention does not support {name}: not a known diffusers video transformer "
                              f"(supported: {', '.join(sorted(FAMILIES))})")


def _modules_at(root, path: str) -> list:
    mods = [root]
    for part in path.split("."):
        nxt = []
        for m in mods:
            if part == "*":
                nxt.extend(list(m))
            else:
                c = getattr(m, part, None)
                if c is not None:
                    nxt.append(c)
        mods = nxt
    return mods


@dataclass
class DraftHandle:
    """What :func:`apply_draft_attention` installed.  ``schedule`` (the dense-first schedule and its current
    ``step``), ``state.grid`` (the token grid of the last call), ``state.sparse_calls`` / ``dense_calls``
    (patched attention calls by path); ``reset()`` restarts the step counter; ``remove()`` = remove_draft_attention."""

    transformers: list
    state: _State
    originals: list = field(default_factory=list)          # (attention module, original processor)
    hooks: list = field(default_factory=list)
    expected_grid: Optional[tuple] = None

    @property
    def schedule(self) -> DraftSchedule:
        return self.state.schedule

    def reset(self) -> None:
        self.state.reset()

    def remove(self) -> None:
        for m, p in self.originals:
            patched = m.processor
            _set_processor(m, p)
            fn = getattr(patched, "_draft_call", None)
            if fn is not None:
                sys.modules.pop(fn.__globals__["__name__"], None)
        for h in self.hooks:
            h.remove()
        for t in self.transformers:
            if getattr(t, "_sparsekit_draft", None) is self:
                del t._sparsekit_draft
        self.originals, self.hooks = [], []


def _set_processor(module, proc) -> None:
    module.processor = proc        # a plain attribute on diffusers attention modules (set_processor also logs)


def apply_draft_attention(pipe_or_transformer, *, height: Optional[int] = None, width: Optional[int] = None,
                          num_frames: Optional[int] = None, sparsity: float = 0.9,
                          pool: Union[int, Sequence[int]] = (8, 16), dense_steps: int = 0,
                          dense_layers: Union[int, Iterable[int]] = 0, mode: str = "percentile",
                          mass: float = 0.9, backend: Optional[str] = None) -> DraftHandle:
    """Make the video self-attention of a diffusers pipeline (its ``transformer``, and ``transformer_2`` where
    present) or of a bare video transformer DraftAttention.  Returns a :class:`DraftHandle`.

    ``height`` / ``width`` / ``num_frames`` (pixels for a pipeline, latent sizes for a transformer) are
    optional: given, the token grid is derived from the configs now (:func:`latent_grid`) and validated
    against ``pool``; the grid actually used is read from each call's inputs.  ``sparsity`` (fraction of
    video-video blocks dropped), ``pool``, ``mode``, ``mass``: as in
    :func:`sparsekit.ops.draft_attention.draft_attention`.  ``dense_steps``: the first N denoising steps run
    dense; ``dense_layers``: the first N patched layers (an int) or a collection of layer indices stay dense
    (layers numbered in block order).  ``backend``: the draft_attention backend (None = automatic).
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    pool = (pool, pool) if isinstance(pool, int) and not isinstance(pool, bool) else tuple(pool)
    draft_layout(1, 1, 1, pool)                       # validates pool
    schedule = DraftSchedule(dense_steps, dense_layers)
    transformers = _transformers(pipe_or_transformer)
    families = [_family(t) for t in transformers]
    for t in transformers:
        if getattr(t, "_sparsekit_draft", None) is not None:
            raise RuntimeError(f"DraftAttention is already applied to this {type(t).__name__}; call "
                               f"remove_draft_attention first")
    expected = None
    if height is not None or width is not None or num_frames is not None:
        if height is None or width is None or num_frames is None:
            raise ValueError("give height, width and num_frames together (or none of them)")
        expected = latent_grid(pipe_or_transformer, height=height, width=width, num_frames=num_frames)
        draft_layout(*expected, pool)
    state = _State(schedule)
    handle = DraftHandle(transformers, state, expected_grid=expected)
    try:
        for t, fam in zip(transformers, families):
            layer = 0
            for path in fam.blocks:
                for m in _modules_at(t, path):
                    proc = getattr(m, "processor", None)
                    if type(proc).__name__ not in fam.processors:
                        raise NotImplementedError(
                            f"{type(t).__name__}.{path}: DraftAttention adapts the native processors "
                            f"{fam.processors}, this block has {type(proc).__name__} (restore the default "
                            f"processor, e.g. unfuse QKV projections, first)")
                    heads = int(m.heads)
                    inner = m.to_q.out_features
                    d = inner // heads
                    if not (16 <= d <= 256 and d % 8 == 0):
                        raise NotImplementedError(f"{type(t).__name__}: head dim {d} is not supported by "
                                                  f"DraftAttention (a multiple of 8 in [16, 256])")
                    native_call = type(proc).__call__
                    if fam.call == "dispatch":
                        native_fn = native_call.__globals__["dispatch_attention_fn"]
                    else:
                        native_fn = F.scaled_dot_product_attention
                    attend = _Attend(fam, native_fn, state, layer, float(sparsity), pool, mode, mass, backend)
                    if fam.call == "dispatch":
                        repl = {"dispatch_attention_fn": attend}
                    else:
                        fmod = types.ModuleType(F.__name__)
                        fmod.__dict__.update(F.__dict__)
                        fmod.scaled_dot_product_attention = attend
                        repl = {"F": fmod}
                    new = object.__new__(_draft_class(type(proc)))
                    new.__dict__.update(proc.__dict__)
                    new._draft_call = _native_call_with(native_call, repl)
                    new.draft = attend
                    handle.originals.append((m, proc))
                    _set_processor(m, new)
                    layer += 1
            if layer == 0:
                raise NotImplementedError(f"{type(t).__name__}: no attention block found at {fam.blocks}")
            handle.hooks.append(t.register_forward_pre_hook(_make_pre_hook(state, fam), with_kwargs=True))
            t._sparsekit_draft = handle
    except Exception:
        handle.remove()
        raise
    return handle


def remove_draft_attention(pipe_or_transformer) -> None:
    """Undo :func:`apply_draft_attention`: the original processor objects and no hook."""
    done = False
    for t in _transformers(pipe_or_transformer):
        h = getattr(t, "_sparsekit_draft", None)
        if h is not None:
            h.remove()
            done = True
    if not done:
        raise ValueError(f"DraftAttention is not applied to this {type(pipe_or_transformer).__name__}")
