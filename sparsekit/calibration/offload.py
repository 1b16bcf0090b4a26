"""Offloading for block-by-block calibration: module placement, the activation store, memory readings."""
from __future__ import annotations

import os
from typing import Iterable, Optional

import torch
from torch import nn

__all__ = ["Placement", "ActivationStore", "to_device", "tensor_bytes", "current_rss", "peak_rss",
           "reset_peak_rss", "format_bytes", "MemoryMeter"]


class Placement:
    """Moves the parameters and buffers of some modules to a device, and each one back to where it was.

    Parameters keep their identity (their ``.data`` moves, as ``Module.to`` does), so
    tied parameters and optimizers holding them are not disturbed.  :meth:`restore`
    moves everything moved so far back (also after an error).
    """

    def __init__(self):
        self._params: dict = {}    # id(param) -> (param, original device)
        self._buffers: list = []   # (module, attr, original device)

    def move(self, modules: Iterable[nn.Module], device: torch.device) -> None:
        """Move each module's own parameters and buffers (not its children's) to ``device``."""
        device = torch.device(device)
        for mod in modules:
            for p in mod._parameters.values():
                if p is None or p.device == device or id(p) in self._params:
                    continue
                self._params[id(p)] = (p, p.device)
                p.data = p.data.to(device)
            for attr, b in list(mod._buffers.items()):
                if b is None or b.device == device:
                    continue
                self._buffers.append((mod, attr, b.device))
                mod._buffers[attr] = b.to(device)

    def forget(self, modules: Iterable[nn.Module]) -> None:
        """Stop tracking these modules (e.g. replaced by compressed ones): :meth:`restore` leaves them alone."""
        ids = {id(m) for m in modules}
        drop = set()
        for m in modules:
            for p in m._parameters.values():
                if p is not None:
                    drop.add(id(p))
        self._params = {k: v for k, v in self._params.items() if k not in drop}
        self._buffers = [(m, a, d) for m, a, d in self._buffers if id(m) not in ids]

    def restore(self) -> None:
        for mod, attr, dev in reversed(self._buffers):
            b = mod._buffers.get(attr)
            if b is not None and b.device != dev:
                mod._buffers[attr] = b.to(dev)
        for p, dev in self._params.values():
            if p.device != dev:
                p.data = p.data.to(dev)
        self._params = {}
        self._buffers = []


def to_device(obj, device):
    """``obj`` with every tensor in it (tuples, lists, dicts, nested) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):       # namedtuple
        return type(obj)(*(to_device(o, device) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def _tensors(obj, out: list) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


def tensor_bytes(obj) -> int:
    """Bytes of the distinct tensor storages in ``obj`` (tuples, lists, dicts, nested)."""
    seen = set()
    total = 0
    for t in _tensors(obj, []):
        if t.device.type == "meta":
            continue
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


class ActivationStore:
    """The inputs of the block being calibrated, one ``(args, kwargs)`` entry per calibration batch.

    Entries stay on the compute ``device`` while their total is within ``budget``
    bytes (None: no limit); the rest wait on ``offload_device`` and are moved to
    ``device`` for each use.  :meth:`set_hidden` replaces an entry's first
    positional argument (the hidden states) by the previous block's output.
    """

    def __init__(self, device, offload_device=None, budget: Optional[int] = None):
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device) if offload_device is not None else torch.device("cpu")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f"activation_budget must be None or a number of bytes >= 0, got {budget!r}")
        self.budget = budget
        self.entries: list = []        # [args, kwargs, on_device]
        self.bytes_on_device = 0
        self.bytes_offloaded = 0

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, args: tuple, kwargs: dict) -> None:
        size = tensor_bytes((args, kwargs))
        keep = (self.offload_device == self.device or self.budget is None
                or self.bytes_on_device + size <= self.budget)
        if keep:
            self.entries.append([to_device(args, self.device), to_device(kwargs, self.device), True])
            self.bytes_on_device += size
        else:
            self.entries.append([to_device(args, self.offload_device), to_device(kwargs, self.offload_device),
                                 False])
            self.bytes_offloaded += size

    def get(self, j: int) -> tuple:
        args, kwargs, on_dev = self.entries[j]
        if on_dev:
            return args, kwargs
        return to_device(args, self.device), to_device(kwargs, self.device)

    def set_hidden(self, j: int, hidden: torch.Tensor) -> None:
        entry = self.entries[j]
        old = entry[0][0]
        new = hidden.detach().to(self.device if entry[2] else self.offload_device)
        delta = tensor_bytes(new) - (tensor_bytes(old) if isinstance(old, torch.Tensor) else 0)
        if entry[2]:
            self.bytes_on_device += delta
        else:
            self.bytes_offloaded += delta
        entry[0] = (new,) + tuple(entry[0][1:])

    def hidden(self, j: int) -> torch.Tensor:
        return self.get(j)[0][0]

    def clear(self) -> None:
        self.entries = []
        self.bytes_on_device = self.bytes_offloaded = 0


def current_rss() -> int:
    """This process's resident memory in bytes (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (since the last :func:`reset_peak_rss` on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def reset_peak_rss() -> bool:
    """Reset the peak-RSS mark (Linux ``/proc/self/clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class MemoryMeter:
    """Peak memory of the compute device per block: CUDA's allocator peak on a CUDA device, else RSS."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.label = f"peak {self.device} memory" if self.cuda else "RSS"
        self.overall = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> int:
        value = torch.cuda.max_memory_allocated(self.device) if self.cuda else current_rss()
        self.overall = max(self.overall, value)
        return value
