"""Input-channel permutation search for 2:4 sparsity.

The 2:4 mask (:func:`sparsekit.prune.mask_2to4`) keeps the two best of every
four *consecutive* input channels.  Which channels share a group of four is an
accident of the layer's layout: when a row's large weights sit in the same
group, two of them are pruned while a neighbouring group keeps two small ones.
Reordering the input channels of a layer (its weight's columns) changes the
groups without changing what the layer can compute, provided whatever feeds
the layer emits its features in the same new order.

* :func:`kept_magnitude` - the total ``|W|`` (or score) the 2:4 mask keeps
  after a given permutation.
* :func:`search_permutation` - a permutation that raises it: an initial
  "striped" order (channels sorted by their score mass and dealt across groups
  in a serpentine, so the heaviest channels land in different groups) followed
  by greedy pairwise swaps between groups.  Every round pairs the groups off
  disjointly (round-robin schedule, so one sweep of rounds meets every pair of
  groups once), scores all 16 channel swaps of every pair at once (only the two
  affected groups change, so a swap's gain is computed from those two groups,
  vectorised over rows) and applies each pair's best improving swap.  It stops
  at a local optimum (a full sweep without an improving swap), after
  ``iterations`` rounds or after ``time_limit`` seconds.  The result is
  deterministic for a seed and never keeps less than the identity order.
* :func:`permute_linear_pair_` - applies a permutation to a producer/consumer
  pair of ``nn.Linear`` so the dense function is unchanged;
  :func:`permute_input_` permutes one layer's columns when its input comes
  from elsewhere (the caller then feeds ``x[..., perm]``);
  :func:`apply_permutations_` searches and applies over named pairs of a model.

Only elementwise operations (ReLU, GELU, SiLU, dropout, scalar scaling, ...)
may sit between producer and consumer: they commute with a reordering of the
features.  Anything that mixes or normalises across features (LayerNorm,
RMSNorm with its per-feature weight left unpermuted, attention heads,
residual additions from other branches, reshapes, a producer that also feeds
another layer) is not handled: permuting such a pair changes the model's output.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from .masks import mask_2to4

__all__ = ["kept_magnitude", "search_permutation", "permute_linear_pair_", "permute_input_",
           "apply_permutations_", "check_permutation", "inverse_permutation"]

# elements of the (pairs, 4, 4, rows, 4) candidate tensors evaluated at once
_CHUNK_ELEMS = 1 << 23
# below this many candidate elements per round the CPU search runs single-threaded
_SMALL_ROUND = 1 << 22


# ----------------------------------------------------------------------------- validation

def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")


def _score_matrix(weight: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    """Non-negative float64 score matrix (``|W|`` by default)."""
    _check_weight(weight)
    if scores is None:
        return weight.detach().abs().to(torch.float64)
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.shape != weight.shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} must equal weight shape {tuple(weight.shape)}")
    if not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"scores must be a real tensor, got {scores.dtype}")
    s = scores.detach().to(device=weight.device, dtype=torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores must be finite")
    if bool((s < 0).any()):
        raise ValueError("scores must be non-negative (e.g. |W| or |W| * ||X_j||)")
    return s


def check_permutation(perm, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Validate ``perm`` as a permutation of ``range(n)``; return it as int64.

    Raises ``TypeError`` for a non-integer tensor/sequence and ``ValueError``
    for a wrong length, out-of-range or repeated entries.
    """
    if isinstance(perm, torch.Tensor):
        if perm.dtype.is_floating_point or perm.dtype.is_complex or perm.dtype == torch.bool:
            raise TypeError(f"perm must be an integer tensor, got {perm.dtype}")
        p = perm.detach().to(torch.int64)
    elif isinstance(perm, (list, tuple, range)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in perm):
            raise TypeError("perm must contain integers")
        p = torch.tensor(list(perm), dtype=torch.int64)
    else:
        raise TypeError(f"perm must be a LongTensor or a sequence of ints, got {type(perm).__name__}")
    if p.dim() != 1 or p.numel() != n:
        raise ValueError(f"perm must be 1-D of length {n}, got shape {tuple(p.shape)}")
    if n and (int(p.min()) < 0 or int(p.max()) >= n):
        raise ValueError(f"perm entries must lie in [0, {n})")
    if n and int(torch.bincount(p.cpu(), minlength=n).max()) != 1:
        raise ValueError("perm is not a permutation (repeated entries)")
    return p.to(device) if device is not None else p


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[j]] = j`` (so ``x[..., perm][..., inv] == x``)."""
    p = check_permutation(perm, perm.numel() if isinstance(perm, torch.Tensor) else len(perm))
    inv = torch.empty_like(p)
    inv[p] = torch.arange(p.numel(), dtype=p.dtype, device=p.device)
    return inv


# ----------------------------------------------------------------------------- objective

def kept_magnitude(weight: torch.Tensor, perm=None, scores: torch.Tensor | None = None) -> float:
    """Total ``|weight|`` (or ``scores``) kept by :func:`mask_2to4` after
    permuting the input channels (columns) by ``perm`` (``weight[:, perm]``).

    ``perm=None`` is the identity order.  Partial last groups follow
    :func:`mask_2to4` (at most two real entries kept).
    """
    s = _score_matrix(weight, scores)
    if perm is not None:
        s = s[:, check_permutation(perm, s.shape[1], s.device)]
    if s.numel() == 0:
        return 0.0
    keep = mask_2to4(s, scores=s)
    return float(s[keep].sum())


def _group_kept(g: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the top-2 of each group: (..., rows, 4) -> (...)."""
    return g.topk(2, dim=-1).values.sum(dim=-1).sum(dim=-1)


# ----------------------------------------------------------------------------- search

_WITHOUT = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])


def _top2_without_each(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For (P, N, 4) groups: the largest and second-largest of the other three
    slots, for each slot removed in turn, both (P, N, 4)."""
    three = g[..., _WITHOUT.to(g.device)]  # (P, N, 4, 3)
    hi = three.amax(dim=-1)
    mid = three.sum(dim=-1) - hi - three.amin(dim=-1)
    return hi, mid

def _round_robin(labels: list[int]) -> list[list[tuple[int, int]]]:
    """Rounds of disjoint pairs covering every pair of ``labels`` exactly once
    (circle method; with an odd count one label sits out each round)."""
    lab = list(labels)
    if len(lab) % 2:
        lab.append(-1)
    m = len(lab)
    rounds = []
    for _ in range(m - 1):
        pairs = [(lab[i], lab[m - 1 - i]) for i in range(m // 2)]
        rounds.append([(a, b) for a, b in pairs if a >= 0 and b >= 0])
        lab = [lab[0], lab[-1]] + lab[1:-1]
    return rounds


def _striped_groups(mass: torch.Tensor, k: int, n_groups: int) -> torch.Tensor:
    """(G, 4) channel indices: channels in decreasing ``mass`` dealt across
    groups in a serpentine; padding slots (only in the last group) hold ``k``."""
    real_last = k - 4 * (n_groups - 1)
    slots = []
    for s in range(4):
        order = range(n_groups) if s % 2 == 0 else range(n_groups - 1, -1, -1)
        for g in order:
            if g == n_groups - 1 and s >= real_last:
                continue
            slots.append(g * 4 + s)
    ch = torch.sort(mass, descending=True, stable=True).indices.cpu()
    flat = torch.full((n_groups * 4,), k, dtype=torch.int64)
    flat[torch.tensor(slots, dtype=torch.int64)] = ch
    return flat.view(n_groups, 4)


def _identity_groups(k: int, n_groups: int) -> torch.Tensor:
    flat = torch.full((n_groups * 4,), k, dtype=torch.int64)
    flat[:k] = torch.arange(k)
    return flat.view(n_groups, 4)


def _groups_to_perm(groups: torch.Tensor, k: int) -> torch.Tensor:
    flat = groups.reshape(-1)
    return flat[flat < k].clone()


DEFAULT_TIME_LIMIT = 30.0


def search_permutation(weight: torch.Tensor, scores: torch.Tensor | None = None, iterations: int | None = None,
                       seed: int = 0, time_limit: float | None = DEFAULT_TIME_LIMIT) -> torch.Tensor:
    """Input-channel permutation (LongTensor of length ``in_features``) that
    raises the magnitude (or ``scores`` mass) kept by the 2:4 mask of
    ``weight[:, perm]``.

    The search runs until a local optimum (a full sweep of rounds without an
    improving swap), bounded by a time budget: ``time_limit`` seconds (default
    30; None: no limit) and, optionally, ``iterations`` swap rounds (each
    round tries all 16 channel swaps for ``~G/2`` disjoint pairs of the ``G``
    groups; default None: no cap -- a round cap stopped wide layers early,
    e.g. 384 x 1536 before converging).  A search that converges within its
    budget depends only on the inputs and ``seed`` (for a given device); one
    cut short by ``time_limit`` also depends on the machine's speed.  It never
    keeps less than the identity order (the identity is returned on a tie).
    """
    s = _score_matrix(weight, scores)
    if iterations is not None:
        if isinstance(iterations, bool) or not isinstance(iterations, int):
            raise TypeError(f"iterations must be an int or None, got {type(iterations).__name__}")
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if time_limit is not None:
        if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)):
            raise TypeError(f"time_limit must be a number or None, got {type(time_limit).__name__}")
        if not time_limit > 0:
            raise ValueError(f"time_limit must be > 0, got {time_limit}")

    n, k = s.shape
    identity = torch.arange(k, dtype=torch.int64)
    n_groups = (k + 3) // 4
    if n_groups <= 1 or n == 0:
        return identity  # one group: every order keeps the same entries
    deadline = None if time_limit is None else time.monotonic() + float(time_limit)

    # column k is the zero padding of the partial last group (scores are >= 0,
    # so a zero pad never displaces a real entry from the top-2 sum)
    sp = torch.cat([s, s.new_zeros(n, 1)], dim=1).t().contiguous()  # (K+1, N): rows of channels

    def kept_of(groups: torch.Tensor) -> torch.Tensor:  # (P, 4) -> (P,)
        return _group_kept(sp[groups.to(sp.device)].permute(0, 2, 1))

    candidates = [_identity_groups(k, n_groups), _striped_groups(s.sum(dim=0), k, n_groups)]
    values = [kept_of(c) for c in candidates]
    best = max(range(len(candidates)), key=lambda i: float(values[i].sum()))
    groups = candidates[best].clone()
    cur = values[best].clone()  # (G,) kept mass per group, float64
    tol = 1e-12 * max(float(cur.sum()), 1e-300)

    real_last = k - 4 * (n_groups - 1)
    valid = torch.ones(n_groups, 4, dtype=torch.bool)
    valid[-1, real_last:] = False
    per_pair = 2 * 16 * n
    chunk = max(1, _CHUNK_ELEMS // per_pair)
    gen = torch.Generator().manual_seed(seed)

    # a round is many small tensor ops: on CPU, intra-op threads cost more in
    # synchronisation than they save unless the round is large
    threads = torch.get_num_threads()
    single = sp.device.type == "cpu" and threads > 1 and (n_groups // 2) * per_pair < _SMALL_ROUND
    if single:
        torch.set_num_threads(1)
    try:
        rounds_done = 0
        stop = iterations == 0
        while not stop:
            labels = torch.randperm(n_groups, generator=gen).tolist()
            improved_in_sweep = False
            for rnd in _round_robin(labels):
                if (iterations is not None and rounds_done >= iterations) or (
                        deadline is not None and time.monotonic() > deadline):
                    stop = True
                    break
                rounds_done += 1
                pa = torch.tensor([a for a, _ in rnd], dtype=torch.int64)
                pb = torch.tensor([b for _, b in rnd], dtype=torch.int64)
                for c0 in range(0, pa.numel(), chunk):
                    ga, gb = pa[c0:c0 + chunk], pb[c0:c0 + chunk]
                    ca, cb = groups[ga], groups[gb]  # (P, 4) channel ids
                    A = sp[ca.to(sp.device)].permute(0, 2, 1)  # (P, N, 4)
                    B = sp[cb.to(sp.device)].permute(0, 2, 1)
                    # top-2 of {three kept slots} + {incoming x} = m1 + max(m2, x),
                    # with m1 >= m2 the two largest of the three kept slots
                    a1, a2 = _top2_without_each(A)  # (P, N, 4): slot i removed
                    b1, b2 = _top2_without_each(B)
                    # new_a[p, i, j]: group a with slot i replaced by b's slot j
                    new_a = a1.sum(1)[:, :, None] + torch.maximum(a2[:, :, :, None], B[:, :, None, :]).sum(1)
                    new_b = b1.sum(1)[:, None, :] + torch.maximum(b2[:, :, None, :], A[:, :, :, None]).sum(1)
                    gain = (new_a + new_b - (cur[ga] + cur[gb]).to(sp.device)[:, None, None]).cpu()
                    ok = valid[ga][:, :, None] & valid[gb][:, None, :]
                    gain = gain.masked_fill(~ok, float("-inf")).reshape(-1, 16)
                    best_gain, arg = gain.max(dim=1)
                    for p in torch.nonzero(best_gain > tol).flatten().tolist():
                        i, j = divmod(int(arg[p]), 4)
                        a, b = int(ga[p]), int(gb[p])
                        groups[a, i], groups[b, j] = int(cb[p, j]), int(ca[p, i])
                        cur[a] = float(new_a[p, i, j])
                        cur[b] = float(new_b[p, i, j])
                        improved_in_sweep = True
            if not improved_in_sweep:
                stop = True
    finally:
        if single:
            torch.set_num_threads(threads)

    perm = _groups_to_perm(groups, k)
    if kept_magnitude(s, perm, scores=s) > kept_magnitude(s, None, scores=s):
        return perm
    return identity


# ----------------------------------------------------------------------------- applying

def _check_linear(name: str, m) -> None:
    if not isinstance(m, nn.Linear):
        raise TypeError(f"{name} must be a torch.nn.Linear, got {type(m).__name__}")


@torch.no_grad()
def permute_input_(linear: nn.Linear, perm) -> torch.Tensor:
    """Permute ``linear``'s input columns in place (``W[:, perm]``).

    The layer then expects its input reordered the same way: feed
    ``x[..., perm]`` and the output is unchanged.  Returns the inverse
    permutation ``inv`` (``weight[:, inv]`` restores the original layout and
    ``x_perm[..., inv]`` recovers the original input order).
    """
    _check_linear("linear", linear)
    p = check_permutation(perm, linear.in_features, linear.weight.device)
    linear.weight.copy_(linear.weight[:, p])
    return inverse_permutation(p.cpu())


@torch.no_grad()
def permute_linear_pair_(producer: nn.Linear, consumer: nn.Linear, perm) -> None:
    """Reorder the features passed from ``producer`` to ``consumer`` by ``perm``,
    in place, leaving ``consumer(act(producer(x)))`` unchanged for any
    elementwise ``act``.

    The consumer's columns become ``W_c[:, perm]`` and the producer's output
    rows ``W_p[perm]`` (and bias ``b_p[perm]``).  Nothing that mixes features
    may sit between the two (see the module docstring).
    """
    _check_linear("producer", producer)
    _check_linear("consumer", consumer)
    if producer is consumer:
        raise ValueError("producer and consumer must be different layers")
    if producer.out_features != consumer.in_features:
        raise ValueError(f"producer.out_features ({producer.out_features}) must equal "
                         f"consumer.in_features ({consumer.in_features})")
    p = check_permutation(perm, consumer.in_features)
    pp = p.to(producer.weight.device)
    producer.weight.copy_(producer.weight[pp])
    if producer.bias is not None:
        producer.bias.copy_(producer.bias[pp])
    pc = p.to(consumer.weight.device)
    consumer.weight.copy_(consumer.weight[:, pc])


def apply_permutations_(model: nn.Module, pairs, scores: dict | None = None,
                        **search_kwargs) -> dict[str, torch.Tensor]:
    """For each ``(producer_name, consumer_name)`` in ``pairs``: search a
    permutation on the consumer's weight (with ``scores[consumer_name]`` when
    given, e.g. Wanda scores) and apply it to the pair with
    :func:`permute_linear_pair_`.  ``search_kwargs`` go to
    :func:`search_permutation`.  Returns ``{consumer_name: perm}``.

    All pairs are validated before anything is modified.  A layer may be the
    producer of one pair and the consumer of another (rows and columns are
    permuted independently), but not the producer (or consumer) of two; a
    producer whose output also feeds another layer must not be listed.  Only
    elementwise ops may connect a pair.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__iter__"):
        raise TypeError("pairs must be a list of (producer_name, consumer_name)")
    pairs = list(pairs)
    if scores is not None and not isinstance(scores, dict):
        raise TypeError(f"scores must be a dict {{consumer_name: tensor}} or None, got {type(scores).__name__}")
    seen_producers: set[str] = set()
    seen_consumers: set[str] = set()
    resolved = []
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise TypeError(f"each pair must be (producer_name, consumer_name), got {pair!r}")
        if pair[0] == pair[1]:
            raise ValueError(f"producer and consumer must be different layers, got {pair!r}")
        mods = []
        for name, seen, role in ((pair[0], seen_producers, "producer"), (pair[1], seen_consumers, "consumer")):
            if name in seen:
                raise ValueError(f"layer {name!r} is the {role} of more than one pair")
            seen.add(name)
            try:
                m = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"model has no submodule {name!r}") from None
            _check_linear(name, m)
            mods.append(m)
        if mods[0].out_features != mods[1].in_features:
            raise ValueError(f"{pair[0]}.out_features ({mods[0].out_features}) must equal "
                             f"{pair[1]}.in_features ({mods[1].in_features})")
        resolved.append((pair[1], mods[0], mods[1]))
    if scores is not None:
        unknown = set(scores) - {c for c, _, _ in resolved}
        if unknown:
            raise ValueError(f"scores given for layers that are not consumers: {sorted(unknown)}")
        for cname, _, cons in resolved:
            if scores.get(cname) is not None:
                _score_matrix(cons.weight, scores[cname])
    out = {}
    for cname, prod, cons in resolved:
        sc = None if scores is None else scores.get(cname)
        perm = search_permutation(cons.weight, scores=sc, **search_kwargs)
        permute_linear_pair_(prod, cons, perm)
        out[cname] = perm
    return out
