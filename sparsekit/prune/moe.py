"""MoE-Pruner: router-weighted pruning of mixture-of-experts models.

Each routed expert's weight ``W`` (out, in) is pruned per output row by the
score ``|W_ij| * ||X_j||_w`` where the input statistic is taken over the tokens
routed to that expert, each weighted by its gate probability for the expert::

    ||X_j||_w = sqrt( sum_{t routed to e} g_te * x_tj^2 )

(MoE-Pruner, Xie et al. 2024).  The gate/up projections read the block input
``x``; the down projection reads the expert's intermediate activation
``act(gate(x)) * up(x)``, which is recomputed in the calibration hook from the
block input and the expert's dense weights.  That recomputation costs one
extra gate/up GEMM per routed token and expert (about two thirds of the
experts' forward FLOPs again) and one ``(tokens, intermediate)`` buffer per
expert at a time -- fine for calibration, not free for large models.

Pieces:

* :class:`MoEAdapter` -- what the pruner needs from one MoE block type: the
  routing (top-k gate probabilities computed exactly as the block does,
  including the renormalisation of the top-k probabilities where the model
  does it), per-expert weight views (``gate``/``up``/``down``, shape
  ``(out, in)``; for the fused 3-D expert tensors of transformers >= 5 these
  are views into ``gate_up_proj[e]`` / ``down_proj[e]``, so masking them
  writes the fused parameter in place), the expert's forward, and the block's
  dense shared parts (Qwen2-MoE ``shared_expert``, DeepSeek ``shared_experts``).  Adapters for the
  transformers blocks ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock``,
  ``Qwen3MoeSparseMoeBlock``, ``OlmoeSparseMoeBlock``, ``DeepseekV2Moe`` and
  ``DeepseekV3MoE`` (shared experts plus routed experts) are registered;
  :func:`register_moe_adapter` adds block types.
* :func:`collect_moe_stats` -- one calibration pass: router-weighted (and,
  for comparison, unweighted) per-expert input statistics, token counts and
  gate mass, plus plain Wanda statistics of the dense layers.
* :func:`prune_moe_` -- the one-shot pruner (unstructured with an exact count
  per row, or 2:4; the dense layers -- attention, shared experts -- by Wanda
  or SparseGPT); returns a :class:`MoEPruneReport`.
* :func:`distill_experts_` -- optional expert-wise distillation of the kept
  weights towards a dense teacher's MoE-block outputs.

Experts that receive no calibration token have no input statistic; with
``empty="magnitude"`` (default) they are pruned by ``|W|`` alone, with
``empty="keep"`` they are left dense.  Either way they are listed in the
report.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from ..calibration import InputAccumulator, hooked, model_input, reiterable, resolve_layers
from .sparsegpt import sparsegpt_prune
from .wanda import check_pattern, magnitude_mask, wanda_mask

__all__ = ["MoEAdapter", "FusedExpertsAdapter", "MixtralAdapter", "QwenMoeAdapter", "DeepseekMoeAdapter", "register_moe_adapter",
           "moe_adapter", "find_moe_blocks", "collect_moe_stats", "MoEPruneReport", "prune_moe_",
           "distill_experts_", "WEIGHTINGS", "PROJECTIONS", "SHARED_METHODS"]

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# how prune_moe_ treats the dense layers (attention, shared experts)
SHARED_METHODS = ("wanda", "sparsegpt", "none")
# per-expert statistic: "router" (MoE-Pruner, gate-weighted over routed tokens), "routed" (plain Wanda
# over the expert's routed tokens), "all" (plain Wanda over every token of the block, as if dense)
WEIGHTINGS = ("router", "routed", "all")


class MoEAdapter:
    """Interface between the pruner and one MoE block (subclass it for a new block type).

    Required: :attr:`num_experts`, :attr:`top_k`, :meth:`route`, :meth:`expert_weight`,
    :attr:`act`.  Optional: :meth:`shared_linears`, :meth:`excluded_linears`,
    :meth:`shared_forward`, :meth:`trainable_parameters`.
    """

    def __init__(self, block: nn.Module):
        self.block = block

    num_experts: int
    top_k: int

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights (T, top_k), index (T, top_k))`` for tokens ``x`` (T, hidden), as the block routes them."""
        raise NotImplementedError

    def expert_weight(self, e: int, proj: str) -> torch.Tensor:
        """The ``(out, in)`` weight of projection ``proj`` (one of :data:`PROJECTIONS`) of expert ``e``;
        a view that shares storage with the model's parameter."""
        raise NotImplementedError

    def act(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def intermediate(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """The down projection's input ``act(x Wg^T) * (x Wu^T)`` of expert ``e``."""
        wg, wu = self.expert_weight(e, "gate_proj"), self.expert_weight(e, "up_proj")
        return self.act(x @ wg.to(x.dtype).t()) * (x @ wu.to(x.dtype).t())

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate(e, x) @ self.expert_weight(e, "down_proj").to(x.dtype).t()

    def shared_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The block's dense shared-expert output for tokens ``x`` (T, hidden), or None."""
        return None

    def shared_linears(self) -> dict:
        """``{relative name: nn.Linear}`` of the block's dense shared parts (pruned like attention)."""
        return {}

    def excluded_linears(self) -> dict:
        """``{relative name: nn.Linear}`` inside the block never pruned (routers, shared-expert gates)."""
        return {}

    def trainable_parameters(self) -> list:
        """Parameters that :func:`distill_experts_` trains (their zeros stay zero)."""
        return [lin.weight for lin in self.shared_linears().values()]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The block output recomputed from :meth:`route` and the expert weights (a reference)."""
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        w, idx = self.route(x)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            tok, pos = torch.where(idx == e)
            if tok.numel():
                y = self.expert_forward(e, x[tok]) * w[tok, pos, None].to(x.dtype)
                out.index_add_(0, tok, y)
        s = self.shared_forward(x)
        if s is not None:
            out = out + s
        return out.reshape(shape)


def _softmax_topk(logits: torch.Tensor, top_k: int, normalize: bool, out_dtype) -> tuple:
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    val, idx = torch.topk(probs, top_k, dim=-1)
    if normalize:
        val = val / val.sum(dim=-1, keepdim=True)
    return val.to(out_dtype), idx


class FusedExpertsAdapter(MoEAdapter):
    """transformers >= 5 layout: ``block.gate`` (a top-k router with ``weight`` (E, hidden)) and
    ``block.experts`` with fused ``gate_up_proj`` (E, 2I, hidden; gate rows first) and ``down_proj``
    (E, hidden, I).  Routing: ``softmax(x Wr^T)`` in float32, top-k, divided by the top-k sum when
    ``norm_topk_prob`` (:attr:`normalize`), cast to the logits' dtype."""

    def __init__(self, block: nn.Module):
        super().__init__(block)
        ex = getattr(block, "experts", None)
        for attr in ("gate_up_proj", "down_proj", "act_fn"):
            if not hasattr(ex, attr):
                raise ValueError(f"{type(block).__name__}: experts have no {attr!r}; this adapter handles fused "
                                 "3-D expert tensors (transformers >= 5)")
        if getattr(ex, "is_transposed", False) or not getattr(ex, "is_concatenated", True) \
                or getattr(ex, "has_bias", False) or not getattr(ex, "has_gate", True):
            raise ValueError(f"{type(block).__name__}: only concatenated, non-transposed, bias-free gated "
                             "experts are supported")
        self.experts = ex
        self.router = block.gate
        self.num_experts = int(ex.gate_up_proj.shape[0])
        self.inter = int(ex.gate_up_proj.shape[1]) // 2
        self.top_k = int(self.router.top_k)

    @property
    def normalize(self) -> bool:
        return bool(getattr(self.router, "norm_topk_prob", False))

    def route(self, x):
        logits = torch.nn.functional.linear(x, self.router.weight)
        return _softmax_topk(logits, self.top_k, self.normalize, logits.dtype)

    def act(self, t):
        return self.experts.act_fn(t)

    def expert_weight(self, e, proj):
        if proj == "gate_proj":
            return self.experts.gate_up_proj[e, : self.inter]
        if proj == "up_proj":
            return self.experts.gate_up_proj[e, self.inter:]
        if proj == "down_proj":
            return self.experts.down_proj[e]
        raise ValueError(f"proj must be one of {PROJECTIONS}, got {proj!r}")

    def trainable_parameters(self):
        return [self.experts.gate_up_proj, self.experts.down_proj] + super().trainable_parameters()


class MixtralAdapter(FusedExpertsAdapter):
    """Mixtral: softmax of the float32 logits, the top-k probabilities always renormalised and kept in
    float32 (the experts multiply their outputs by them in type promotion)."""

    normalize = True

    def route(self, x):
        logits = torch.nn.functional.linear(x, self.router.weight).float()
        return _softmax_topk(logits, self.top_k, True, torch.float32)


class QwenMoeAdapter(FusedExpertsAdapter):
    """Qwen2-MoE: fused experts plus a dense ``shared_expert`` scaled by ``sigmoid(shared_expert_gate(x))``."""

    def shared_forward(self, x):
        b = self.block
        return torch.sigmoid(b.shared_expert_gate(x)) * b.shared_expert(x)

    def shared_linears(self):
        return {f"shared_expert.{n}": m for n, m in self.block.shared_expert.named_modules()
                if isinstance(m, nn.Linear)}

    def excluded_linears(self):
        return {"shared_expert_gate": self.block.shared_expert_gate}


class DeepseekMoeAdapter(FusedExpertsAdapter):
    """DeepSeek-V2 / V3 (``DeepseekV2Moe``, ``DeepseekV3MoE``): fused routed experts, a router that
    returns ``(logits, weights, index)`` (V2: softmax, greedy or group-limited top-k; V3: sigmoid
    scores, bias-corrected group-limited choice, optional renormalisation; both times
    ``routed_scaling_factor``), and an always-on dense ``shared_experts`` MLP added to the routed
    output.  :meth:`route` calls the block's own router, so the routing is the block's exactly; the
    shared experts are dense parts (pruned with the attention by :func:`prune_moe_`'s ``shared``)."""

    def route(self, x):
        _, w, idx = self.router(x)
        return w, idx

    def shared_forward(self, x):
        return self.block.shared_experts(x)

    def shared_linears(self):
        return {f"shared_experts.{n}": m for n, m in self.block.shared_experts.named_modules()
                if isinstance(m, nn.Linear)}


# block class (or class name) -> adapter factory
_REGISTRY: dict = {
    "MixtralSparseMoeBlock": MixtralAdapter,
    "Qwen2MoeSparseMoeBlock": QwenMoeAdapter,
    "Qwen3MoeSparseMoeBlock": FusedExpertsAdapter,
    "OlmoeSparseMoeBlock": FusedExpertsAdapter,
    "DeepseekV2Moe": DeepseekMoeAdapter,
    "DeepseekV3MoE": DeepseekMoeAdapter,
}


def register_moe_adapter(block_type, factory: Callable[[nn.Module], MoEAdapter]) -> None:
    """Register ``factory(block) -> MoEAdapter`` for MoE blocks of ``block_type`` (a class, matched
    with isinstance, or a class name, matched exactly)."""
    if not (isinstance(block_type, (type, str))):
        raise TypeError(f"block_type must be a class or a class name, got {type(block_type).__name__}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    _REGISTRY[block_type] = factory


def _factory(mod: nn.Module):
    f = _REGISTRY.get(type(mod).__name__)
    if f is not None:
        return f
    for k, f in _REGISTRY.items():
        if isinstance(k, type) and isinstance(mod, k):
            return f
    return None


def moe_adapter(block: nn.Module) -> MoEAdapter:
    """The registered adapter for ``block``; ValueError naming the class if none is registered."""
    f = _factory(block)
    if f is None:
        known = sorted(k if isinstance(k, str) else k.__name__ for k in _REGISTRY)
        raise ValueError(f"unsupported MoE block class {type(block).__name__!r}; registered: {known} "
                         "(add one with sparsekit.prune.register_moe_adapter)")
    return f(block)


def _looks_like_moe(mod: nn.Module) -> bool:
    return hasattr(mod, "experts") and any(hasattr(mod, a) for a in ("gate", "router"))


def find_moe_blocks(model: nn.Module) -> dict:
    """``{qualified name: MoEAdapter}`` for every MoE block of ``model`` (outermost matches only).

    A module that has ``experts`` and a ``gate``/``router`` but no registered adapter raises a
    ValueError naming its class; no MoE block at all raises a ValueError too."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    out = {}
    for name, mod in model.named_modules():
        if "" in out or any(name.startswith(p + ".") for p in out):
            continue
        if _factory(mod) is not None or _looks_like_moe(mod):
            out[name] = moe_adapter(mod)
    if not out:
        raise ValueError(f"model {type(model).__name__} has no mixture-of-experts block "
                         f"(registered: {sorted(k if isinstance(k, str) else k.__name__ for k in _REGISTRY)})")
    return out


def _block_input(args, kwargs):
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise ValueError("MoE block called without a hidden-state input")


def _dense_layers(model: nn.Module, blocks: Mapping[str, MoEAdapter], layers) -> dict:
    """The dense linears to prune with Wanda: ``layers`` or every nn.Linear except routers, shared-expert
    gates and the output head."""
    if layers is not None:
        return resolve_layers(model, layers)
    excluded = set()
    for bname, ad in blocks.items():
        excluded.update(id(m) for m in ad.excluded_linears().values())
        for attr in ("gate", "router"):
            r = getattr(ad.block, attr, None)
            if isinstance(r, nn.Module):
                excluded.update(id(m) for m in r.modules())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module):
        excluded.add(id(head))
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in excluded}


def collect_moe_stats(model: nn.Module, calib_loader: Iterable, blocks: Optional[Mapping[str, MoEAdapter]] = None,
                      dense_layers: Optional[Mapping[str, nn.Linear]] = None, all_tokens: bool = False,
                      progress: bool = False, dense_stats=("sumsq",)) -> dict:
    """One calibration pass (eval mode, no_grad) collecting, per MoE block and expert ``e``:

    * ``tokens[e]``: routed token count; ``mass[e]``: summed gate probability;
    * ``sumsq_w[(e, "in"|"mid")]`` (router-weighted ``sum g x^2``), ``sumsq[(e, ...)]`` (unweighted over
      routed tokens), where ``"in"`` is the block input (gate/up) and ``"mid"`` the intermediate (down);
    * ``in_all``: unweighted ``sum x^2`` over every token of the block; with ``all_tokens=True`` also
      ``sumsq_all[e]``, the unweighted ``"mid"`` statistic over every token (each expert's intermediate
      is then computed for all tokens, ``num_experts / top_k`` times the routed cost);

    and the raw sums ``dense_stats`` of :mod:`sparsekit.calibration` for ``dense_layers`` (Wanda's
    ``sumsq``; add ``"xtx"`` for SparseGPT's Hessian).  Float64, on each block's expert-weight device.  Returns
    ``{"blocks": {name: stats}, "dense": raw sums of sparsekit.calibration}``.
    """
    blocks = find_moe_blocks(model) if blocks is None else dict(blocks)
    dense_layers = {} if dense_layers is None else dict(dense_layers)
    calib_loader = reiterable(calib_loader)
    stats = {}
    for name, ad in blocks.items():
        e_n = ad.num_experts
        h = ad.expert_weight(0, "gate_proj").shape[1]
        i = ad.expert_weight(0, "down_proj").shape[1]
        dev = ad.expert_weight(0, "gate_proj").device
        z = lambda k: torch.zeros(k, dtype=torch.float64, device=dev)  # noqa: E731
        stats[name] = {"tokens": torch.zeros(e_n, dtype=torch.long, device=dev), "mass": z(e_n), "n_all": 0,
                       "in_all": z(h),
                       "sumsq_w": {(e, s): z(h if s == "in" else i) for e in range(e_n) for s in ("in", "mid")},
                       "sumsq": {(e, s): z(h if s == "in" else i) for e in range(e_n) for s in ("in", "mid")},
                       "sumsq_all": {e: z(i) for e in range(e_n)}}

    def make_block_hook(name):
        ad, st = blocks[name], stats[name]

        def hook(mod, args, kwargs):
            hid = _block_input(args, kwargs).detach()
            x = hid.reshape(-1, hid.shape[-1])
            w, idx = ad.route(x)
            dev = st["in_all"].device
            xd = x.to(device=dev, dtype=torch.float64)
            st["n_all"] += x.shape[0]
            st["in_all"] += xd.pow(2).sum(0)
            cdt = torch.promote_types(x.dtype, torch.float32)
            for e in range(ad.num_experts):
                tok, pos = torch.where(idx == e)
                if all_tokens:
                    mid_all = ad.intermediate(e, x.to(cdt)).to(device=dev, dtype=torch.float64)
                    st["sumsq_all"][e] += mid_all.pow(2).sum(0)
                if tok.numel() == 0:
                    continue
                g = w[tok, pos].to(device=dev, dtype=torch.float64)
                tc = tok.to(dev)
                xe = xd[tc]
                me = mid_all[tc] if all_tokens else ad.intermediate(e, x[tok].to(cdt)).to(device=dev,
                                                                                        dtype=torch.float64)
                st["tokens"][e] += tok.numel()
                st["mass"][e] += g.sum()
                st["sumsq_w"][(e, "in")] += (g[:, None] * xe.pow(2)).sum(0)
                st["sumsq_w"][(e, "mid")] += (g[:, None] * me.pow(2)).sum(0)
                st["sumsq"][(e, "in")] += xe.pow(2).sum(0)
                st["sumsq"][(e, "mid")] += me.pow(2).sum(0)
        return hook

    accum = InputAccumulator(dense_layers, tuple(dense_stats))
    handles = []
    from tqdm.auto import tqdm
    with hooked(model, dense_layers, accum.make_hook), torch.no_grad():
        try:
            for name, ad in blocks.items():
                handles.append(ad.block.register_forward_pre_hook(make_block_hook(name), with_kwargs=True))
            nb = 0
            for batch in tqdm(calib_loader, desc="moe calibration", disable=not progress, leave=False):
                accum.new_forward()
                model(model_input(batch, model, dense_layers))
                nb += 1
        finally:
            for hd in handles:
                hd.remove()
    if nb == 0:
        raise ValueError("calib_loader yielded no batches")
    accum.flush()   # float32 partial X^T X sums (the "xtx" statistic) into the float64 totals
    return {"blocks": stats, "dense": accum.acc}


class MoEPruneReport(dict):
    """``{tensor name: bool keep-mask}`` (as :func:`sparsekit.prune.prune_model_` returns), plus:

    * ``experts``: ``{block name: {"tokens": [...], "mass": [...], "empty": [...]}}`` -- routed token
      count, summed gate probability and the experts that received no calibration token;
    * ``empty_experts``: ``[(block name, expert)]``; ``empty``: the policy used for them;
    * ``sparsity``: ``{tensor name: achieved fraction of zeros}``.

    Expert tensors are named ``<block>.experts.<e>.<gate_proj|up_proj|down_proj>`` (for fused
    parameters: rows of ``gate_up_proj[e]`` / ``down_proj[e]``); dense layers by their module name.
    """

    def __init__(self):
        super().__init__()
        self.experts = {}
        self.empty_experts = []
        self.sparsity = {}
        self.empty = None
        self.weighting = None

    def summary(self) -> str:
        lines = [f"MoE-Pruner report ({len(self)} tensors, weighting={self.weighting}, empty experts -> "
                 f"{self.empty})"]
        for b, s in self.experts.items():
            lines.append(f"  {b}: tokens {s['tokens']}, gate mass {[round(m, 3) for m in s['mass']]}, "
                         f"empty {s['empty']}")
        if self.sparsity:
            v = list(self.sparsity.values())
            lines.append(f"  sparsity min {min(v):.4f} max {max(v):.4f}")
        return "\n".join(lines)


def _mask(weight, norm, pattern, s):
    if norm is None:
        return magnitude_mask(weight, pattern, s)
    return wanda_mask(weight, norm, pattern, s)


def prune_moe_(model: nn.Module, calib_loader: Iterable, sparsity: float = 0.5, pattern: str = "unstructured",
               shared: str = "wanda", weighting: str = "router", empty: str = "magnitude", dense_layers=None,
               progress: bool = False, block_size: int = 128, damp: float = 0.01) -> MoEPruneReport:
    """Prune a mixture-of-experts model in place with MoE-Pruner; returns a :class:`MoEPruneReport`.

    Every routed expert's gate/up/down weight is pruned per output row by
    ``|W_ij| * sqrt(sum_t g_t x_tj^2)`` over the tokens routed to it (``weighting="router"``; for
    comparison ``"routed"`` is plain Wanda over the same tokens and ``"all"`` plain Wanda over every
    token of the block).  ``pattern``: ``"unstructured"`` (exactly ``floor(sparsity * in)`` zeros per
    row) or ``"2:4"`` (sparsity 0.5).  ``shared``: ``"wanda"`` prunes the dense layers (attention,
    shared experts; every ``nn.Linear`` except routers, shared-expert gates and the output head, or
    ``dense_layers``) with plain Wanda statistics from the same pass; ``"sparsegpt"`` prunes them with
    SparseGPT (mask and OBS compensation of the kept weights, :func:`sparsekit.prune.sparsegpt_prune`
    with ``block_size`` and ``damp``) on the Hessian ``2 X^T X / n`` of the same pass -- the dense
    model's inputs, not re-collected layer by layer as :func:`sparsekit.prune.prune_model_` does;
    ``"none"`` leaves them dense.
    ``empty``: experts that got no calibration token are pruned by magnitude (``"magnitude"``) or
    left dense (``"keep"``); a dense layer that did not run in the pass is pruned by magnitude.  All
    statistics come from one pass over ``calib_loader`` with the dense model (not layer by layer).  Masked weights become exact zeros, fused 3-D expert tensors included.
    """
    s = check_pattern(pattern, sparsity)
    if shared not in SHARED_METHODS:
        raise ValueError(f"shared must be one of {SHARED_METHODS}, got {shared!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if empty not in ("magnitude", "keep"):
        raise ValueError(f"empty must be 'magnitude' or 'keep', got {empty!r}")
    blocks = find_moe_blocks(model)
    dense = _dense_layers(model, blocks, dense_layers) if shared != "none" else {}
    if shared != "none" and dense_layers is None:
        # the routed experts are not nn.Linear in fused layouts; if some block keeps per-expert linears,
        # the adapter already covers them -- never prune those twice
        routed = set()
        for ad in blocks.values():
            for e in range(ad.num_experts):
                for p in PROJECTIONS:
                    routed.add(ad.expert_weight(e, p).data_ptr())
        dense = {n: m for n, m in dense.items() if m.weight.data_ptr() not in routed}
    st = collect_moe_stats(model, calib_loader, blocks, dense, all_tokens=weighting == "all", progress=progress,
                           dense_stats=("sumsq", "xtx") if shared == "sparsegpt" else ("sumsq",))
    report = MoEPruneReport()
    report.empty, report.weighting = empty, weighting
    with torch.no_grad():
        for bname, ad in blocks.items():
            bs = st["blocks"][bname]
            empties = [e for e in range(ad.num_experts) if int(bs["tokens"][e]) == 0]
            report.experts[bname] = {"tokens": bs["tokens"].tolist(), "mass": bs["mass"].tolist(),
                                     "empty": empties}
            report.empty_experts += [(bname, e) for e in empties]
            for e in range(ad.num_experts):
                if e in empties and empty == "keep":
                    continue
                for p in PROJECTIONS:
                    w = ad.expert_weight(e, p)
                    side = "mid" if p == "down_proj" else "in"
                    if e in empties:
                        norm = None
                    elif weighting == "router":
                        norm = bs["sumsq_w"][(e, side)].sqrt()
                    elif weighting == "routed":
                        norm = bs["sumsq"][(e, side)].sqrt()
                    else:
                        norm = (bs["sumsq_all"][e] if side == "mid" else bs["in_all"]).sqrt()
                    m = _mask(w, norm, pattern, s)
                    w.mul_(m.to(device=w.device, dtype=w.dtype))
                    tname = f"{bname}.experts.{e}.{p}" if bname else f"experts.{e}.{p}"
                    report[tname] = m
                    report.sparsity[tname] = float((w == 0).double().mean())
        for name, lin in dense.items():
            acc = st["dense"][name]
            if shared == "sparsegpt" and acc["n"] > 0:
                w, m = sparsegpt_prune(lin.weight, acc["xtx"].mul_(2.0 / acc["n"]), pattern, s,
                                       block_size=block_size, damp=damp)
                lin.weight.copy_(w)
            else:
                norm = acc["sumsq"].sqrt() if acc["n"] > 0 else None
                m = _mask(lin.weight, norm, pattern, s)
                lin.weight.mul_(m.to(lin.weight.dtype))
            report[name] = m
            report.sparsity[name] = float((lin.weight == 0).double().mean())
    return report


def _capture_block_io(model: nn.Module, blocks: Mapping[str, MoEAdapter], calib_loader) -> dict:
    """``{block name: [(input, output), ...]}`` per calibration batch (no_grad, eval mode)."""
    io = {n: [] for n in blocks}

    def make_hook(name):
        def hook(mod, args, kwargs, out):
            o = out[0] if isinstance(out, tuple) else out
            io[name].append((_block_input(args, kwargs).detach().clone(), o.detach().clone()))
        return hook

    with hooked(model, {}, lambda n: None), torch.no_grad():
        handles = [ad.block.register_forward_hook(make_hook(n), with_kwargs=True) for n, ad in blocks.items()]
        try:
            for batch in calib_loader:
                model(model_input(batch, model))
        finally:
            for h in handles:
                h.remove()
    return io


def _block_mse(block, pairs) -> float:
    num, n = 0.0, 0
    for x, y in pairs:
        o = block(x)
        o = o[0] if isinstance(o, tuple) else o
        num += float((o.double() - y.double()).pow(2).sum())
        n += y.numel()
    return num / max(n, 1)


def distill_experts_(student: nn.Module, teacher: nn.Module, calib_loader: Iterable, steps: int = 50,
                     lr: float = 1e-3, progress: bool = False) -> dict:
    """Expert-wise distillation: train the kept weights of each MoE block of ``student`` (routed experts
    and shared experts; routers and shared-expert gates stay fixed) so the block output matches the
    ``teacher``'s block output on the same block input (MSE), the teacher's block inputs over
    ``calib_loader`` being captured once.  The masks are fixed: a weight that is zero when this is
    called receives no gradient and stays exactly zero.  Blocks are matched by name and trained one
    after another with Adam for ``steps`` steps each (one calibration batch per step, cycling).

    Keeps every block's inputs and outputs in memory (tokens x hidden x 2 per block).
    Returns ``{block name: {"mse_before": ..., "mse_after": ...}}`` on the calibration inputs.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    calib_loader = reiterable(calib_loader)
    sb, tb = find_moe_blocks(student), find_moe_blocks(teacher)
    if set(sb) != set(tb):
        raise ValueError(f"student and teacher MoE blocks differ: {sorted(set(sb) ^ set(tb))}")
    io = _capture_block_io(teacher, tb, calib_loader)
    modes = {m: m.training for m in student.modules()}
    grads = {p: p.requires_grad for p in student.parameters()}
    out = {}
    try:
        student.eval()  # no router jitter / dropout
        for p in student.parameters():
            p.requires_grad_(False)
        for name, ad in sb.items():
            pairs = io[name]
            if not pairs:
                continue
            params = list({id(p): p for p in ad.trainable_parameters()}.values())
            masks = [(p != 0) for p in params]
            for p in params:
                p.requires_grad_(True)
            with torch.no_grad():
                before = _block_mse(ad.block, pairs)
            opt = torch.optim.Adam(params, lr=lr)
            for step in range(steps):
                x, y = pairs[step % len(pairs)]
                opt.zero_grad(set_to_none=False)
                o = ad.block(x)
                o = o[0] if isinstance(o, tuple) else o
                loss = torch.nn.functional.mse_loss(o, y.to(o.dtype))
                loss.backward()
                for p, m in zip(params, masks):
                    if p.grad is not None:
                        p.grad.mul_(m.to(p.grad.dtype))
                opt.step()
                with torch.no_grad():
                    for p, m in zip(params, masks):
                        p.mul_(m.to(p.dtype))
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            with torch.no_grad():
                after = _block_mse(ad.block, pairs)
            out[name] = {"mse_before": before, "mse_after": after}
    finally:
        for p, r in grads.items():
            p.requires_grad_(r)
        for m, t in modes.items():
            m.train(t)
    return out
