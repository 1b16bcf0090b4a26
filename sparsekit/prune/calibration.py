"""Calibration statistics for pruning: gradients, empirical Fisher, input norms.

:func:`collect_layer_stats` runs a model over a few calibration batches and
returns, per ``nn.Linear`` layer, what the block scores
(:func:`sparsekit.prune.block_scores`) and activation-aware criteria need.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Union

import torch
from torch import nn

from ..calibration import hooked, model_device, model_input, resolve_layers, split_batch

__all__ = ["OBJECTIVES", "collect_layer_stats", "resolve_layers", "split_batch", "model_output"]

OBJECTIVES = ("output_energy",)

# per-sample gradients are formed this many (sample x N x K) elements at a time
_PER_SAMPLE_CHUNK = 1 << 24


def model_output(out) -> torch.Tensor:
    """The output tensor of a forward: the tensor itself or the first element of a tuple/list."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model output must be a tensor or a tuple whose first element is one, got {type(out).__name__}")


def _loss_fn(objective) -> Callable:
    if callable(objective):
        return objective
    if objective == "output_energy":
        # half-precision outputs are squared in float32; float64 stays float64
        return lambda out, batch: (out if out.dtype == torch.float64 else out.float()).pow(2).mean()
    raise ValueError(f"unknown objective {objective!r}; known: {OBJECTIVES} or a callable(output, batch) -> loss")


def collect_layer_stats(model: nn.Module, layers: Union[Mapping[str, nn.Linear], list, None],
                        calib_loader: Iterable, objective: Union[str, Callable] = "output_energy",
                        fisher: str = "sample", progress: bool = True, process_group=None) -> dict:
    """Per-layer gradient statistics of ``L`` over calibration batches.

    The loss of a batch is ``L = mean(f(x)^2)`` for ``objective="output_energy"``
    (``f`` = the model output, mean over every output element), or
    ``objective(output, batch)`` for a callable (it should be a mean over the
    batch's samples for the per-sample Fisher below to be exact).

    ``calib_loader`` yields input tensors or ``(x, y, ...)`` tuples (``x`` is
    fed to the model, the rest is passed through to a callable objective).
    ``layers``: ``{name: nn.Linear}``, a list of qualified names, or None for
    every ``nn.Linear`` of the model.

    Returns ``{name: stats}`` with, shaped like the layer's weight (float32, or
    float64 for a float64 weight):

    * ``"grad"``: ``sum over batches b of dL_b/dW``.
    * ``"fisher"``: the empirical-Fisher diagonal.  With ``fisher="sample"``
      (default) it is the mean over all calibration samples ``s`` of
      ``(dl_s/dW)^2``, where ``l_s`` is sample ``s``'s own loss (``L_b`` is the
      mean of the ``l_s`` of its batch, so ``dl_s/dW = B * (sample s's
      contribution to dL_b/dW)``).  Per-sample gradients of a linear layer
      are ``sum_t dL/dy_{s,t} x_{s,t}^T``, formed from the layer's input and
      output gradient a chunk of samples at a time (same FLOPs as one
      backward).  A "sample" is an index along the layer input's first
      dimension; a layer whose input's first dimension is not the model
      batch size (e.g. it sees flattened tokens) falls back to the batch
      estimate.  With ``fisher="batch"``: the mean over batches of
      ``(dL_b/dW)^2`` (cheaper, noisier, ``~1/B`` the scale of the former).
    * ``"input_norm"``: ``(in_features,)``, ``||X_j||_2`` of each input column
      over every row the layer saw (all batches, tokens flattened) — the
      activation norm Wanda-style scores use.
    * ``"fisher_mode"`` (``"sample"`` or ``"batch"``, what was actually used),
      ``"num_batches"``, ``"num_samples"``.

    The model runs in eval mode on its own device; afterwards every module's
    train/eval mode and every parameter's ``requires_grad`` are restored, and
    parameters' ``.grad`` fields are untouched.  A tqdm bar shows the batches
    (``progress=False`` hides it).

    ``process_group``: distributed calibration -- each rank passes its own share of
    the batches; the sums (gradients, Fisher sums, input squared norms) and the batch
    and sample counts are added over the group before the means, so every rank gets
    the statistics of the union (:mod:`sparsekit.distributed.calibration`).
    """
    if fisher not in ("sample", "batch"):
        raise ValueError(f"fisher must be 'sample' or 'batch', got {fisher!r}")
    layers = resolve_layers(model, layers)
    loss_fn = _loss_fn(objective)
    names = list(layers)
    mods = [layers[n] for n in names]
    dev = model_device(model, layers)
    req = {p: p.requires_grad for p in model.parameters()}
    for mod in mods:
        req.setdefault(mod.weight, mod.weight.requires_grad)

    acc_dtype = {n: (torch.float64 if layers[n].weight.dtype == torch.float64 else torch.float32) for n in names}
    grad_sum = {n: torch.zeros(layers[n].weight.shape, dtype=acc_dtype[n], device=layers[n].weight.device) for n in names}
    fb_sum = {n: torch.zeros_like(grad_sum[n]) for n in names}
    fs_sum = {n: torch.zeros_like(grad_sum[n]) for n in names}
    sq_in = {n: torch.zeros(layers[n].in_features, dtype=acc_dtype[n], device=layers[n].weight.device) for n in names}
    per_sample_ok = {n: fisher == "sample" for n in names}
    num_batches = 0
    num_samples = 0

    records = {n: [] for n in names}

    def make_hook(name):
        def hook(mod, inputs, out):
            records[name].append((inputs[0].detach(), out))
            # hand the rest of the network a copy, so an in-place op downstream
            # (e.g. ReLU(inplace=True)) cannot alter the recorded output
            return out.clone()
        return hook

    try:
        for p in req:
            p.requires_grad_(False)
        for mod in mods:
            mod.weight.requires_grad_(True)
        with hooked(model, layers, make_hook, kind="post"):
            from tqdm.auto import tqdm

            total = len(calib_loader) if hasattr(calib_loader, "__len__") else None
            for batch in tqdm(calib_loader, desc="calibration", unit="batch", total=total, disable=not progress):
                x = model_input(batch, model, layers, dev)
                for n in names:
                    records[n].clear()
                with torch.enable_grad():
                    out = model_output(model(x))
                    loss = loss_fn(out, batch)
                    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                        raise TypeError("the objective must return a scalar tensor")
                    flat = [(n, i) for n in names for i in range(len(records[n]))]
                    if not flat:
                        raise ValueError("none of the layers ran in the model's forward")
                    outs = [records[n][i][1] for n, i in flat]
                    gys = torch.autograd.grad(loss, outs, allow_unused=True)
                b = int(x.shape[0])
                num_batches += 1
                num_samples += b
                gy_of = {key: g for key, g in zip(flat, gys)}
                for n in names:
                    calls = []
                    for i, (xin, _) in enumerate(records[n]):
                        gy = gy_of[(n, i)]
                        if gy is None:
                            gy = torch.zeros(xin.shape[:-1] + (layers[n].out_features,), dtype=xin.dtype, device=xin.device)
                        calls.append((xin.to(acc_dtype[n]), gy.to(acc_dtype[n])))
                        sq_in[n] += xin.to(acc_dtype[n]).reshape(-1, xin.shape[-1]).pow(2).sum(0)
                    g = torch.zeros_like(grad_sum[n])
                    for xin, gy in calls:
                        g += gy.reshape(-1, gy.shape[-1]).t() @ xin.reshape(-1, xin.shape[-1])
                    grad_sum[n] += g
                    fb_sum[n] += g * g
                    if per_sample_ok[n]:
                        if not calls or any(xin.dim() < 2 or xin.shape[0] != b for xin, _ in calls):
                            per_sample_ok[n] = False
                        else:
                            _accumulate_per_sample(fs_sum[n], calls, b)
                for n in names:
                    records[n].clear()
    finally:
        for p, r in req.items():
            p.requires_grad_(r)

    if process_group is not None:
        from ..distributed.calibration import reduce_gradient_stats

        num_batches, num_samples = reduce_gradient_stats(process_group, names, per_sample_ok, num_batches,
                                                         num_samples, grad_sum, fb_sum, fs_sum, sq_in)
    if num_batches == 0:
        raise ValueError("calib_loader yielded no batches")
    stats = {}
    for n in names:
        mode = "sample" if per_sample_ok[n] else "batch"
        fish = fs_sum[n] / num_samples if mode == "sample" else fb_sum[n] / num_batches
        stats[n] = {
            "grad": grad_sum[n],
            "fisher": fish,
            "input_norm": sq_in[n].sqrt(),
            "fisher_mode": mode,
            "num_batches": num_batches,
            "num_samples": num_samples,
        }
    return stats


def _accumulate_per_sample(dst: torch.Tensor, calls: list, b: int) -> None:
    """``dst += sum_s (B * dL/dW restricted to sample s)^2`` over a batch of ``b`` samples."""
    n_out, k_in = dst.shape
    chunk = max(1, _PER_SAMPLE_CHUNK // max(1, n_out * k_in))
    for s0 in range(0, b, chunk):
        s1 = min(b, s0 + chunk)
        g = None
        for xin, gy in calls:
            xs = xin[s0:s1].reshape(s1 - s0, -1, k_in)
            gs = gy[s0:s1].reshape(s1 - s0, -1, n_out)
            part = torch.einsum("stn,stk->snk", gs, xs)
            g = part if g is None else g + part
        g = g * b
        dst += (g * g).sum(0)
