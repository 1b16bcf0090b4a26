"""AWQ as published (Lin et al. 2023): shared scales for sibling layers, folding, clipping search.

:func:`awq_quantize_model_` fake-quantizes a model's linears the way the
original AWQ does:

* **groups** -- linears fed by the same tensor (q/k/v projections; gate/up
  projections; in general the layers a forward feeds with the very same
  input tensor) share one per-input-channel scale ``s``.  ``s = mean|x| **
  alpha`` (clamped at ``1e-4``, divided by ``sqrt(max(s) min(s))``) for
  ``alpha`` in ``0, 1/grid, ..., (grid-1)/grid``; the chosen ``alpha``
  minimises the mean squared error of the output of the *module* that holds
  the group (the whole attention / MLP module for the blocks of the adapter
  table, else the concatenated outputs of the siblings), with each sibling's
  weight replaced by ``Q(W s) / s``.
* **folding** (``fold=True``) -- when the adapter table names the op that
  produces the group's input (a LayerNorm / RMSNorm, or a linear whose output
  feeds the group only through a positively homogeneous path: ``v_proj ->
  o_proj``, ``up_proj -> down_proj``, OPT's ``fc1 -> ReLU -> fc2``), ``1/s``
  is folded into that op (norm
  weight and bias; the linear's output rows and bias) and ``s`` into the
  siblings' input columns: the float model computes the same function and no
  run-time scale is left.  Groups without a foldable producer keep a
  per-linear run-time ``input_scale`` (``QuantResult.input_scale``); the
  report lists them.
* **clipping** (``auto_clip=True``) -- per output row and input group, the
  clipping range ``[-m, m]`` with ``m = max|w| * (1 - i/grid)``,
  ``i = 0 .. max_shrink*grid - 1``, that minimises the mean squared error of
  the group's partial dot products on (up to ``clip_tokens``) calibration
  rows is applied before rounding; query/key projections are not clipped (as
  in the original: their error is dominated by the softmax, not the
  partial products).

As in the original, every statistic comes from the float model (scales are
searched block by block on the unquantized model; folds leave its function
unchanged, clipping is applied after all scales are found), then every
layer is rounded to nearest.

The adapter table (:data:`AWQ_ADAPTERS`) knows Llama / Mistral / Qwen2 /
Qwen3-class decoder layers, OPT decoder layers and BERT-class encoder layers
by module names; other models get the generic sibling grouping without
folding.  A fold that is valid only for some configurations of a block
carries a condition on the block (``"fold_if"``): OPT's norm folds need a
pre-LN layer (``do_layer_norm_before``; in a post-LN layer such as OPT-350m's
the norm's output is the residual stream, not only the siblings' input), and
its ``fc1 -> fc2`` fold needs a ReLU between them (``ReLU(z / s) = ReLU(z) / s``
for ``s > 0``; the published OPT models all use ReLU).  A group whose
condition fails keeps a run-time scale.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from .rtn import QuantResult, check_quant_args, rtn_quantize

__all__ = ["AWQ_ADAPTERS", "awq_group_search", "awq_fold_", "awq_auto_clip", "awq_quantize_model_"]

# One adapter per block family: the block is any module holding every path in "needs";
# "groups": (producer path or None, [sibling linear paths], module path whose output is the loss);
# "fold_if" (optional): {producer path: predicate(block) -> bool}, the producer is folded only where it holds.


def _pre_ln(block: nn.Module) -> bool:
    return bool(getattr(block, "do_layer_norm_before", True))


def _relu_between(block: nn.Module) -> bool:
    return isinstance(getattr(block, "activation_fn", None), nn.ReLU)


AWQ_ADAPTERS = {
    "llama": {  # Llama, Mistral, Qwen2, Qwen3 (pre-norm decoder layers, gated MLP)
        "needs": ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                  "mlp.down_proj"),
        "groups": (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
                   ("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
                   ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
                   ("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj")),
    },
    "opt": {
        "needs": ("self_attn_layer_norm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.out_proj", "final_layer_norm", "fc1", "fc2"),
        "groups": (("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    "self_attn"),
                   ("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
                   ("final_layer_norm", ("fc1",), "fc1"),
                   ("fc1", ("fc2",), "fc2")),
        "fold_if": {"self_attn_layer_norm": _pre_ln, "final_layer_norm": _pre_ln, "fc1": _relu_between},
    },
    "bert": {  # post-LN: the LayerNorm before the next layer also feeds the residual, so no norm fold
        "needs": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                  "intermediate.dense", "output.dense"),
        "groups": ((None, ("attention.self.query", "attention.self.key", "attention.self.value"), "attention.self"),
                   ("attention.self.value", ("attention.output.dense",), "attention.output.dense"),
                   (None, ("intermediate.dense",), "intermediate.dense"),
                   (None, ("output.dense",), "output.dense")),
    },
}

_NO_CLIP = ("q_proj", "k_proj", "query", "key")
# a re-run of a module must not append to a key/value cache
_CACHE_KW = ("past_key_values", "past_key_value", "layer_past", "cache_position_unused")


def _first(out):
    from ..calibration.core import first_tensor

    return first_tensor(out, "module output must be a tensor or a tuple starting with one")


def _scale(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    s = mean_abs.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _fake(w: torch.Tensor, s: torch.Tensor, group_size: int, symmetric: bool, bits: int) -> torch.Tensor:
    """``Q(W s) / s`` in ``w``'s dtype."""
    q = rtn_quantize((w * s).to(torch.float64 if w.dtype == torch.float64 else torch.float32),
                     group_size, symmetric, bits).dequantize()
    return (q.to(w.dtype) / s).to(w.dtype)


def awq_group_search(linears: Sequence[nn.Linear], mean_abs: torch.Tensor, run: Callable[[], Iterable[tuple]],
                     group_size: int = 128, symmetric: bool = False, bits: int = 4, grid: int = 20,
                     return_info: bool = False):
    """The shared AWQ scale of sibling linears (same input), searched on a module's output.

    ``mean_abs``: ``mean |x_j|`` of the siblings' common input ``(K,)``.
    ``run()``: yields ``(output, reference_output)`` pairs over the cached
    calibration inputs, ``output`` computed with the siblings' current
    weights (the module that holds them, or the siblings themselves).  For
    each ``alpha`` in ``i / grid`` (``i < grid``) the siblings' weights are
    temporarily replaced by ``Q(W s) / s`` and the loss is the mean squared
    output error.  The weights are restored.  Returns ``s`` (``(K,)``, the
    weights' dtype), with ``return_info`` also ``{"alphas", "losses", "alpha"}``.
    """
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    ws = [lin.weight.detach().clone() for lin in linears]
    k = ws[0].shape[1]
    if any(w.shape[1] != k for w in ws):
        raise ValueError(f"sibling linears must share in_features, got {[tuple(w.shape) for w in ws]}")
    check_quant_args(k, group_size, bits)
    m = mean_abs.detach().to(ws[0].device, ws[0].dtype)
    alphas = [i / grid for i in range(grid)]
    losses = []
    best = None
    try:
        for a in alphas:
            s = _scale(m, a)
            with torch.no_grad():
                for lin, w in zip(linears, ws):
                    lin.weight.copy_(_fake(w, s, group_size, symmetric, bits))
                tot, cnt = 0.0, 0
                for out, ref in run():
                    tot += float((out.to(torch.float64) - ref.to(torch.float64)).pow(2).sum())
                    cnt += out.numel()
            loss = tot / max(cnt, 1)
            losses.append(loss)
            if best is None or loss < best[0]:
                best = (loss, a, s)
    finally:
        with torch.no_grad():
            for lin, w in zip(linears, ws):
                lin.weight.copy_(w)
    if return_info:
        return best[2], {"alphas": alphas, "losses": losses, "alpha": best[1]}
    return best[2]


def awq_fold_(prev: nn.Module, linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """Fold ``1/s`` into ``prev`` (a norm's weight and bias, or a linear's output rows and bias) and ``s``
    into the input columns of ``linears``: the float function is unchanged."""
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            if prev.out_features != s.numel():
                raise ValueError(f"cannot fold a scale of {s.numel()} features into a linear with "
                                 f"{prev.out_features} outputs")
            prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))
        else:
            if getattr(prev, "weight", None) is None or prev.weight.shape != s.shape:
                raise ValueError(f"cannot fold a scale of {s.numel()} features into {type(prev).__name__}")
            prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
        for lin in linears:
            lin.weight.mul_(s.to(lin.weight.dtype))


def _foldable(prev: Optional[nn.Module], linears: Sequence[nn.Linear]) -> bool:
    k = linears[0].in_features
    if prev is None:
        return False
    if isinstance(prev, nn.Linear):
        return prev.out_features == k
    name = type(prev).__name__
    if isinstance(prev, nn.LayerNorm) or (name.endswith("RMSNorm") and not name.startswith("Gemma")):
        w = getattr(prev, "weight", None)
        return isinstance(w, torch.Tensor) and tuple(w.shape) == (k,)
    return False


def awq_auto_clip(w: torch.Tensor, x: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                  bits: int = 4, grid: int = 20, max_shrink: float = 0.5, max_tokens: int = 512,
                  row_batch: int = 256) -> torch.Tensor:
    """AWQ's clipping search: the per-(row, group) clip value ``m`` ``(N, K // group_size)``.

    For ``i = 0 .. int(max_shrink * grid) - 1`` the weight is clamped to
    ``[-m, m]``, ``m = max|w_group| (1 - i / grid)``, rounded to nearest and
    each group's partial outputs ``x_g . w_g`` on up to ``max_tokens``
    calibration rows (every ``rows // max_tokens``-th) are compared with the
    unclipped float ones; the ``m`` with the least mean squared error wins
    (``i = 0``, no clipping, included).  Apply with ``w.clamp(-m, m)`` per group.
    """
    n, k = w.shape
    gs = check_quant_args(k, group_size, bits)
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    x = x.detach().reshape(-1, k).to(w.device, cdt)
    step = max(1, x.shape[0] // max_tokens)
    x = x[::step][:max_tokens]
    ng = k // gs
    xg = x.reshape(-1, ng, gs)                                   # (T, G, gs)
    wg_all = w.detach().to(cdt).reshape(n, ng, gs)
    steps = max(1, int(max_shrink * grid))
    best_all = torch.empty(n, ng, dtype=cdt, device=w.device)
    for r0 in range(0, n, row_batch):
        wg = wg_all[r0:r0 + row_batch]                           # (R, G, gs)
        org_max = wg.abs().amax(dim=-1, keepdim=True)            # (R, G, 1)
        org_out = torch.einsum("tgk,rgk->rtg", xg, wg)
        best_err = torch.full(org_max.shape[:2], float("inf"), dtype=cdt, device=w.device)
        best = org_max[..., 0].clone()
        for i in range(steps):
            mx = org_max * (1 - i / grid)
            cur = torch.minimum(torch.maximum(wg, -mx), mx)
            q = rtn_quantize(cur.reshape(-1, k), gs, symmetric, bits).dequantize().to(cdt).reshape(wg.shape)
            err = (torch.einsum("tgk,rgk->rtg", xg, q) - org_out).pow(2).mean(dim=1)     # (R, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, mx[..., 0], best)
        best_all[r0:r0 + row_batch] = best
    return best_all


def _clip_(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    ng = m.shape[1]
    wg = w.reshape(n, ng, k // ng)
    mm = m.to(w.dtype).unsqueeze(-1)
    return torch.minimum(torch.maximum(wg, -mm), mm).reshape(n, k)


def _plan_groups(model: nn.Module, layers: Mapping[str, nn.Linear], batch) -> list:
    """``[(producer name or None, [sibling names], module name or None)]`` in forward order."""
    from ..calibration import forward_groups

    planned, covered = [], set()
    for bname, block in model.named_modules():
        for ad in AWQ_ADAPTERS.values():
            try:
                subs = {p: block.get_submodule(p) for p in ad["needs"]}
            except AttributeError:
                continue
            pre = f"{bname}." if bname else ""
            for prev, sibs, modp in ad["groups"]:
                full = [pre + s for s in sibs]
                if not all(f in layers and layers[f] is subs[s] for f, s in zip(full, sibs)):
                    continue
                if any(f in covered for f in full):
                    continue
                cond = ad.get("fold_if", {}).get(prev)
                if prev and cond is not None and not cond(block):
                    prev = None
                planned.append((pre + prev if prev else None, full, pre + modp))
                covered.update(full)
            break
    groups, counts = forward_groups(model, layers, batch)
    order = {n: i for i, g in enumerate(groups) for n in g}
    out = list(planned)
    for g in groups:
        rest = [n for n in g if n not in covered]
        if rest:
            out.append((None, rest, None))
    out.sort(key=lambda t: min(order.get(n, len(order)) for n in t[1]))
    return out, [n for n in layers if counts[n] == 0]


class _Stop(Exception):
    pass


def _capture(model, layers, calib, mod: Optional[nn.Module], first: nn.Linear, sibs, max_rows):
    """Cached calibration data of one group: the siblings' input rows, and per batch either the module's
    ``(args, kwargs, output)`` or the siblings' input."""
    from ..calibration.core import model_input

    rows, recs = [], []
    cur = {}
    hooks = []

    def on_first(m, inp, out):
        rows.append(inp[0].detach().reshape(-1, first.in_features).clone())
        if mod is None:
            recs.append(("x", inp[0].detach().clone(), None))
            raise _Stop()

    def pre(m, args, kwargs):
        cur["a"] = (tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args),
                    {k: (None if k in _CACHE_KW else v.detach().clone() if isinstance(v, torch.Tensor) else v)
                     for k, v in kwargs.items()})

    def post(m, args, kwargs, out):
        recs.append(("m", cur["a"], _first(out).detach().clone()))
        raise _Stop()

    hooks.append(first.register_forward_hook(on_first))
    if mod is not None:
        hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(mod.register_forward_hook(post, with_kwargs=True))
    n = 0
    try:
        with torch.no_grad():
            for batch in calib:
                try:
                    model(model_input(batch, model, layers))
                except _Stop:
                    pass
                n = sum(r.shape[0] for r in rows)
                if max_rows is not None and n >= max_rows:
                    break
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(rows, 0), recs


def awq_quantize_model_(model: nn.Module, calib_loader, group_size: int = 128, symmetric: bool = False,
                        bits: int = 4, layers=None, grid: int = 20, fold: bool = True, auto_clip: bool = True,
                        max_shrink: float = 0.5, clip_tokens: int = 512, max_rows: Optional[int] = None,
                        progress: bool = True, report: Optional[dict] = None, quantize: bool = True) -> dict:
    """AWQ as published on a whole model, in place (fake-quantized); returns ``{name: QuantResult}``.

    See the module doc.  ``layers``: as in
    :func:`~sparsekit.quant.collect_linear_inputs`.  ``fold``: fold the scales
    into the producing norm / linear where the adapter table allows it (the
    producer's weights change, the float function does not); with False
    every layer keeps a run-time ``input_scale``.  ``auto_clip``: the clipping
    search (``grid``, ``max_shrink``, ``clip_tokens`` rows).  ``report``: a
    dict that receives ``"groups"`` (producer, siblings, module, alpha, folded)
    and ``"input_scale_layers"`` (layers that kept a run-time scale).
    Layers that never run are rounded to nearest.

    ``quantize=False`` (needs ``fold=True``): only transform the float model -- fold the scales of
    the foldable groups and clip those groups' weights -- and leave the rounding to a later
    round-to-nearest conversion with the same ``group_size`` / ``symmetric`` / ``bits`` (e.g.
    ``sparsekit.quantize_(model, "int4")``), which then yields this function's codes for those
    layers.  Groups without a foldable producer are left unchanged (no scale, no clipping: their
    scale would need a run-time division); ``report["input_scale_layers"]`` lists them.  Returns
    ``{}``.
    """
    from ..calibration import reiterable
    from .calibration import resolve_quant_layers
    from tqdm.auto import tqdm

    layers = resolve_quant_layers(model, layers, group_size, bits)
    for nm, v in (("fold", fold), ("auto_clip", auto_clip), ("quantize", quantize)):
        if not isinstance(v, bool):
            raise TypeError(f"{nm} must be a bool, got {v!r}")
    if not quantize and not fold:
        raise ValueError("quantize=False needs fold=True (an unfolded scale needs a run-time division, which "
                         "a later round-to-nearest conversion does not apply)")
    if not (isinstance(max_shrink, (int, float)) and 0 < max_shrink <= 1):
        raise ValueError(f"max_shrink must be in (0, 1], got {max_shrink!r}")
    calib = reiterable(calib_loader)
    first = next(iter(calib), None)
    if first is None:
        raise ValueError("calib_loader yielded no batches")
    was = {m: m.training for m in model.modules()}
    model.eval()
    plan, absent = _plan_groups(model, layers, first)
    scales, clips, info = {}, {}, []
    try:
        for prev_n, sibs, mod_n in tqdm(plan, desc="awq", unit="group", disable=not progress):
            lins = [layers[s] for s in sibs]
            mod = model.get_submodule(mod_n) if mod_n else None
            if mod is not None and len(sibs) == 1 and mod is lins[0]:
                mod = None
            x, recs = _capture(model, layers, calib, mod, lins[0], sibs, max_rows)
            mean_abs = x.abs().mean(0)

            def run(recs=recs, lins=lins, mod=mod):
                for kind, a, ref in recs:
                    if kind == "m":
                        yield _first(mod(*a[0], **a[1])), ref
                    else:
                        w = torch.cat([lin.weight for lin in lins], 0)
                        w0 = torch.cat([lin._awq_w0 for lin in lins], 0)
                        yield a @ w.t(), a @ w0.t()

            for lin in lins:
                lin._awq_w0 = lin.weight.detach().clone()
            try:
                s, inf = awq_group_search(lins, mean_abs, run, group_size, symmetric, bits, grid,
                                          return_info=True)
            finally:
                for lin in lins:
                    del lin._awq_w0
            prev = model.get_submodule(prev_n) if prev_n else None
            folded = bool(fold) and _foldable(prev, lins)
            if folded:
                awq_fold_(prev, lins, s)
            for nme in sibs:
                scales[nme] = (s, folded)
            if auto_clip and (folded or quantize):
                xs = (x / s.to(x.dtype))
                for nme, lin in zip(sibs, lins):
                    if any(t in nme.rsplit(".", 1)[-1] for t in _NO_CLIP):
                        continue
                    w = lin.weight.detach() if folded else lin.weight.detach() * s.to(lin.weight.dtype)
                    clips[nme] = awq_auto_clip(w, xs, group_size, symmetric, bits, grid, max_shrink, clip_tokens)
            info.append({"producer": prev_n, "siblings": list(sibs), "module": mod_n, "alpha": inf["alpha"],
                         "folded": folded})
            del x, recs
        results = {}
        with torch.no_grad():
            for nme, lin in (layers.items() if quantize else ()):
                s, folded = scales.get(nme, (None, True))
                w = lin.weight.detach()
                if s is not None and not folded:
                    w = w * s.to(w.dtype)
                if nme in clips:
                    w = _clip_(w, clips[nme])
                res = rtn_quantize(w.to(torch.float64 if w.dtype == torch.float64 else torch.float32),
                                   group_size, symmetric, bits)
                if s is not None and not folded:
                    res.input_scale = s.to(torch.float32)
                lin.weight.copy_(res.effective_weight().to(lin.weight.dtype))
                results[nme] = res
            if not quantize:
                for nme, m in clips.items():
                    lin = layers[nme]
                    lin.weight.copy_(_clip_(lin.weight.detach(), m).to(lin.weight.dtype))
    finally:
        for m, t in was.items():
            m.train(t)
    if report is not None:
        report["groups"] = info
        report["input_scale_layers"] = [n for n in layers if n in scales and not scales[n][1]]
        report["not_run"] = absent
    return results
