"""Per-layer solves of a sequential calibration split over the ranks of a process group.

With distributed calibration (:mod:`sparsekit.distributed.calibration`) every rank holds the
all-reduced statistics of every layer, so every rank could solve every layer (GPTQ, SparseGPT,
the per-layer AWQ search) and get the same result.  :class:`LayerSplit` instead has each rank
solve only its share: the ``i``-th layer handed to it (in calibration order) is solved by rank
``i % world``, and the owner broadcasts the outcome -- the layer's new weight and the solver's
result (codes, scales, zeros, masks: any tensors, in dataclasses, tuples, lists or dicts) -- with
``torch.distributed.broadcast``.  The result on every rank is bit for bit the owner's, which
equals what every rank would have computed itself from the same statistics.

The solves of a sequential group run together: :meth:`LayerSplit.submit` only records a layer;
the pending layers are solved (each rank its own, concurrently) and exchanged by
:meth:`LayerSplit.flush`, which runs on the first forward that reaches one of them (a
forward-pre hook) -- i.e. before the next group's calibration pass uses their weights -- or when
the caller needs the results (building the compressed modules, the end of the run).  Every rank
reaches these points in the same order, so the broadcasts match.

Only metadata travels besides tensors: a small JSON header per layer (structure, shapes,
dtypes), no pickle.  A solve that raises on its owner is reported to every rank (the others raise
a ``RuntimeError`` naming the layer and the rank) instead of leaving them waiting.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Callable, Optional

import torch
import torch.distributed as dist

__all__ = ["SOLVING_METHODS", "split_enabled", "LayerSplit", "broadcast_payload"]

#: the methods whose per-layer solve is worth splitting (the others are cheaper than the broadcast)
SOLVING_METHODS = ("gptq", "sparsegpt", "awq")


def split_enabled(split_layers, group, methods) -> bool:
    """Resolve a ``split_layers`` argument: None -> on when ``group`` (a resolved process group or None)
    has several ranks and one of ``methods`` is in :data:`SOLVING_METHODS`; True -> on with a group of
    several ranks (a no-op with one); False -> off."""
    if split_layers is not None and not isinstance(split_layers, bool):
        raise TypeError(f"split_layers must be None, True or False, got {split_layers!r}")
    if split_layers and group is None:
        raise ValueError("split_layers=True splits the layers over the ranks of a process group: pass "
                         "process_group= as well")
    if group is None or split_layers is False or dist.get_world_size(group) < 2:
        return False
    if split_layers is None:
        return any(m in SOLVING_METHODS for m in methods)
    return True


# ----------------------------------------------------------------------------- payload encoding
_DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


def _encode(obj, tensors: list):
    if isinstance(obj, torch.Tensor):
        name = str(obj.dtype).replace("torch.", "")
        if name not in _DTYPES:
            raise TypeError(f"cannot broadcast a {obj.dtype} tensor")
        tensors.append(obj.detach())
        return {"T": list(obj.shape), "d": name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"V": obj}
    if isinstance(obj, (list, tuple)):
        return {"L": [_encode(v, tensors) for v in obj], "t": isinstance(obj, tuple)}
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {"D": {k: _encode(v, tensors) for k, v in obj.items()}}
    cls = type(obj)
    if dataclasses.is_dataclass(obj) and cls.__module__.startswith("sparsekit."):
        fields = {f.name: _encode(getattr(obj, f.name), tensors) for f in dataclasses.fields(obj) if f.init}
        return {"C": f"{cls.__module__}:{cls.__qualname__}", "F": fields}
    raise TypeError(f"cannot broadcast a {cls.__name__} (tensors, numbers, strings, None, lists, tuples, "
                    f"dicts and sparsekit dataclasses only)")


def _decode(spec, tensors: list):
    if "T" in spec:
        return tensors.pop(0)
    if "V" in spec:
        return spec["V"]
    if "L" in spec:
        vals = [_decode(v, tensors) for v in spec["L"]]
        return tuple(vals) if spec["t"] else vals
    if "D" in spec:
        return {k: _decode(v, tensors) for k, v in spec["D"].items()}
    mod, _, qual = spec["C"].partition(":")
    if not mod.startswith("sparsekit."):
        raise ValueError(f"refusing to rebuild {spec['C']!r}: not a sparsekit class")
    cls = importlib.import_module(mod)
    for part in qual.split("."):
        cls = getattr(cls, part)
    if not dataclasses.is_dataclass(cls):
        raise ValueError(f"{spec['C']!r} is not a dataclass")
    return cls(**{k: _decode(v, tensors) for k, v in spec["F"].items()})


def _specs(spec, out: list) -> list:
    """The tensor leaves' (shape, dtype) in encoding order."""
    if "T" in spec:
        out.append((tuple(spec["T"]), _DTYPES[spec["d"]]))
    elif "L" in spec:
        for v in spec["L"]:
            _specs(v, out)
    elif "D" in spec:
        for v in spec["D"].values():
            _specs(v, out)
    elif "C" in spec:
        for v in spec["F"].values():
            _specs(v, out)
    return out


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


_HEAD = 4096       # bytes of the fixed-size header message


def broadcast_payload(obj, src: int, group, device: torch.device, error: Optional[str] = None):
    """Send ``obj`` (on the global rank ``src``; ignored elsewhere) to every rank of ``group``; returns it
    everywhere (receivers get tensors on ``device``, the sender its own objects).  ``error`` (on ``src``):
    send that message instead; every receiver then raises it as a ``RuntimeError``.
    Two messages: a fixed-size header (JSON; a longer one follows in a third) and one buffer holding every
    tensor's bytes."""
    me = dist.get_rank()
    head = torch.zeros(_HEAD, dtype=torch.uint8, device=device)
    if me == src:
        tensors: list = []
        header = {"E": error} if error is not None else {"S": _encode(obj, tensors)}
        text = json.dumps(header).encode()
        head[:8] = torch.tensor(list(len(text).to_bytes(8, "little")), dtype=torch.uint8)
        if len(text) <= _HEAD - 8:
            head[8:8 + len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    dist.broadcast(head, src=src, group=group)        # the header (and its length) in one fixed-size message
    n = len(text) if me == src else int.from_bytes(bytes(head[:8].cpu().tolist()), "little")
    if n <= _HEAD - 8:
        raw = head[8:8 + n]
    else:                                             # a long header follows in full
        raw = torch.tensor(list(text), dtype=torch.uint8, device=device) if me == src else \
            torch.empty(n, dtype=torch.uint8, device=device)
        dist.broadcast(raw, src=src, group=group)
    if me != src:
        header = json.loads(bytes(raw.cpu().tolist()).decode())
        if "E" in header:
            raise RuntimeError(header["E"])
    if "E" in header:
        return None
    shapes = _specs(header["S"], [])
    sizes = [int(torch.Size(s).numel()) * torch.empty((), dtype=d).element_size() for s, d in shapes]
    total = sum(sizes)
    if total:
        if me == src:
            buf = torch.cat([_bytes_of(t.to(device)) for t in tensors]) if tensors else \
                torch.empty(0, dtype=torch.uint8, device=device)
        else:
            buf = torch.empty(total, dtype=torch.uint8, device=device)
        dist.broadcast(buf, src=src, group=group)
    if me == src:
        return obj
    out, off = [], 0
    for (shape, dt), size in zip(shapes, sizes):
        chunk = buf[off:off + size].clone() if size else torch.empty(0, dtype=torch.uint8, device=device)
        out.append(chunk.view(dt).reshape(shape))
        off += size
    return _decode(header["S"], out)


# ----------------------------------------------------------------------------- the splitter
class LayerSplit:
    """Deferred per-layer solves, each on one rank, the outcomes broadcast (see the module docstring).

    ``solve(name, module, stats) -> result`` computes a layer's result and overwrites ``module.weight``
    with the weight later layers must see; ``store(name, result)`` receives every layer's result on
    every rank.  ``group``: a resolved process group.
    """

    def __init__(self, group, solve: Callable, store: Callable):
        self.group = group
        self.world = dist.get_world_size(group)
        self.me = dist.get_rank()
        self.ranks = dist.get_process_group_ranks(group)
        self.solve, self.store = solve, store
        self.count = 0
        self.pending: list = []        # [name, module, stats, owner (global rank), hook handle]
        self.solved: list = []         # the layers this rank solved itself

    def owner(self, index: int) -> int:
        return self.ranks[index % self.world]

    def submit(self, name: str, module: torch.nn.Module, stats) -> None:
        owner = self.owner(self.count)
        self.count += 1
        handle = module.register_forward_pre_hook(lambda mod, args: self.flush())
        self.pending.append([name, module, stats if owner == self.me else None, owner, handle])

    def discard(self) -> None:
        """Drop the pending layers unsolved (after an error) and remove their hooks."""
        pending, self.pending = self.pending, []
        for entry in pending:
            entry[4].remove()

    def flush(self) -> None:
        """Solve this rank's pending layers, then exchange every pending layer's outcome."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        for entry in pending:
            entry[4].remove()
        results, errors = {}, {}
        with torch.no_grad():
            for name, module, stats, owner, _ in pending:
                if owner != self.me:
                    continue
                try:
                    results[name] = self.solve(name, module, stats)
                    self.solved.append(name)
                except Exception as e:            # reported to the other ranks below, then re-raised
                    errors[name] = e
            first_error = None
            for name, module, _, owner, _ in pending:
                dev = module.weight.device
                if owner == self.me:
                    err = errors.get(name)
                    msg = None if err is None else f"layer {name!r}: solving it failed on rank {owner}: " \
                                                   f"{type(err).__name__}: {err}"
                    broadcast_payload({"r": results.get(name), "w": module.weight.detach()}, owner, self.group,
                                      dev, error=msg)
                    if err is None:
                        self.store(name, results[name])
                    elif first_error is None:
                        first_error = err
                else:
                    try:
                        got = broadcast_payload(None, owner, self.group, dev)
                    except RuntimeError as e:
                        if first_error is None:
                            first_error = e
                        continue
                    module.weight.copy_(got["w"].to(module.weight.dtype))
                    self.store(name, got["r"])
            if first_error is not None:
                raise first_error
