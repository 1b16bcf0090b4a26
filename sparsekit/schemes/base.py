"""The pieces every scheme is made of: calibration methods, the versioned config, the :class:`Scheme` interface."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional, Sequence

import torch
from torch import nn

__all__ = ["Method", "METHODS", "SchemeConfig", "Scheme", "dtype_name", "parse_dtype", "check_linear",
           "configs_equal"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).replace("torch.", "")


def parse_dtype(value, what: str = "dtype", allowed=("float16", "bfloat16")) -> Optional[str]:
    """``value`` (None, a torch.dtype or its name) as a dtype name in ``allowed``; TypeError otherwise."""
    if value is None:
        return None
    name = dtype_name(value) if isinstance(value, torch.dtype) else value
    if not isinstance(name, str) or name not in allowed:
        raise TypeError(f"{what} must be None or one of {', '.join('torch.' + a for a in allowed)}, got {value!r}")
    return name


def torch_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return None if name is None else getattr(torch, name)


def check_linear(module: nn.Module) -> None:
    """Checks every conversion of an ``nn.Linear`` needs: a materialized, finite, floating-point
    ``(out_features, in_features)`` weight with both sizes positive (ValueError / TypeError)."""
    if not isinstance(module, nn.Linear):
        raise TypeError(f"expected an nn.Linear, got {type(module).__name__}")
    w = module.weight
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"weight must be a tensor, got {type(w).__name__}")
    if w.device.type == "meta":
        raise ValueError("weight is on the meta device (not materialized); materialize the model first "
                         "(e.g. model.to_empty(device=...) and load its weights)")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be float16, bfloat16, float32 or float64, got {w.dtype}")
    n, k = module.out_features, module.in_features
    if n < 1 or k < 1:
        raise ValueError(f"cannot convert a layer with out_features={n}, in_features={k}; both must be >= 1")
    if tuple(w.shape) != (n, k):
        raise ValueError(f"weight has shape {tuple(w.shape)}, expected (out_features, in_features) = {(n, k)}")
    bad = int((~torch.isfinite(w.detach())).sum())
    if bad:
        raise ValueError(f"weight has {bad} non-finite value(s) (NaN/Inf); compression needs a finite weight")
    b = module.bias
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (n,)):
        raise ValueError(f"bias must have shape ({n},), got "
                         f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}")


# ----------------------------------------------------------------------------- calibration methods
def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _nonneg_number(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def _bool(name, v):
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {v!r}")


_OPTION_CHECKS = {"damp": _nonneg_number, "block_size": _positive_int, "act_order": _bool, "max_rows": _positive_int,
                  "grid": _positive_int}


@dataclass(frozen=True)
class Method:
    """A calibration method: the statistics of the layer inputs it needs, and its options.

    ``stats``: names from :data:`sparsekit.calibration.STATS` (empty: no data);
    ``missing``: what happens to a layer that never runs in the forward
    (``"error"`` or ``"zeros"``: calibrated from zero statistics).
    """

    name: str
    stats: tuple
    options: tuple
    missing: str
    description: str

    @property
    def needs_data(self) -> bool:
        return bool(self.stats)

    def check_options(self, options: dict, scheme: str) -> dict:
        if not isinstance(options, dict):
            raise TypeError(f"method_options must be a dict, got {type(options).__name__}")
        bad = sorted(k for k in options if k not in self.options)
        if bad:
            raise ValueError(f"method_options {bad} do not apply to method={self.name!r} of scheme {scheme!r}; "
                             f"it takes {list(self.options) or 'none'}")
        for k, v in options.items():
            _OPTION_CHECKS[k](k, v)
        return dict(options)


METHODS = {
    "magnitude": Method("magnitude", (), (), "error", "none (weight magnitudes)"),
    "wanda": Method("wanda", ("sumsq",), (), "error", "input-feature L2 norms"),
    "sparsegpt": Method("sparsegpt", ("xtx",), ("block_size", "damp"), "error", "input Hessian X^T X"),
    "rtn": Method("rtn", (), (), "zeros", "none (round to nearest)"),
    "gptq": Method("gptq", ("xtx",), ("damp", "block_size", "act_order", "max_rows"), "zeros",
                   "input Hessian X^T X"),
    "awq": Method("awq", ("xtx", "sumabs"), ("grid", "max_rows"), "zeros", "X^T X and mean absolute inputs"),
}

# ----------------------------------------------------------------------------- config
def configs_equal(a, b) -> bool:
    """Field-by-field equality of two configs (tensors compared by value)."""
    if type(a) is not type(b):
        return False
    if not dataclasses.is_dataclass(a):
        return a == b
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                    and x.dtype == y.dtype and bool(torch.equal(x.cpu(), y.cpu()))):
                return False
        elif x != y:
            return False
    return True


@dataclass
class SchemeConfig:
    """The parameters of one scheme: a versioned, JSON-serializable dataclass.

    Common fields: ``method`` (the calibration method; None: the scheme's
    data-free default), ``method_options`` (the method's options, e.g.
    ``{"damp": 0.01}``) and ``backend`` (a forced backend for the new modules).
    Subclasses add the format parameters and set the class attributes
    ``SCHEME`` (registry name), ``VERSION``, ``METHODS`` and the defaults
    ``DEFAULT_METHOD`` (no data) / ``CALIBRATED_METHOD`` (with data).
    """

    method: Optional[str] = None
    method_options: dict = field(default_factory=dict)
    backend: Optional[str] = None

    SCHEME: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    METHODS: ClassVar[tuple] = ()
    DEFAULT_METHOD: ClassVar[Optional[str]] = None
    CALIBRATED_METHOD: ClassVar[Optional[str]] = None
    #: fields that hold run-time values (tensors), left out of :meth:`to_dict`
    RUNTIME_FIELDS: ClassVar[tuple] = ()

    def __post_init__(self):
        name = type(self).__name__
        if self.method is None:
            self.method = self.DEFAULT_METHOD
        if not isinstance(self.method, str) or self.method not in self.METHODS:
            raise ValueError(f"method {self.method!r} does not apply to scheme {self.SCHEME!r}; "
                             f"choose from {self.METHODS}")
        self.method_options = METHODS[self.method].check_options(self.method_options, self.SCHEME)
        if self.backend is not None:
            from ..ops.dispatch import ALL_BACKENDS

            if not isinstance(self.backend, str) or self.backend not in ALL_BACKENDS + ("auto",):
                raise ValueError(f"{name}.backend must be None, 'auto' or one of {ALL_BACKENDS}, got {self.backend!r}")

    @property
    def method_spec(self) -> Method:
        return METHODS[self.method]

    def params(self) -> dict:
        """The fields as plain JSON values (run-time fields left out)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in self.RUNTIME_FIELDS:
                continue
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, dict):
                v = dict(v)
            out[f.name] = v
        return out

    def to_dict(self) -> dict:
        """``{"scheme", "version", "params"}``; JSON-serializable (``json.dumps`` works on it)."""
        for k in self.RUNTIME_FIELDS:
            if getattr(self, k, None) is not None:
                raise TypeError(f"{type(self).__name__}.{k} holds a run-time value (a tensor) that a JSON config "
                                f"cannot carry")
        return {"scheme": self.SCHEME, "version": self.VERSION, "params": self.params()}

    @classmethod
    def from_dict(cls, data: dict) -> "SchemeConfig":
        if not isinstance(data, dict):
            raise TypeError(f"a scheme config must be a dict, got {type(data).__name__}")
        if data.get("scheme") != cls.SCHEME:
            raise ValueError(f"config of scheme {data.get('scheme')!r} given to {cls.__name__} ({cls.SCHEME!r})")
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"config version must be a positive int, got {version!r}")
        if version > cls.VERSION:
            raise ValueError(f"scheme {cls.SCHEME!r} config version {version} is newer than this sparsekit's "
                             f"({cls.VERSION}); upgrade sparsekit")
        params = dict(data.get("params") or {})
        params = cls.upgrade(params, version)
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(params) - known)
        if bad:
            raise ValueError(f"unknown {cls.SCHEME!r} config parameters {bad}; known: {sorted(known)}")
        for f in dataclasses.fields(cls):
            if f.name in params and isinstance(params[f.name], list) and f.name != "method_options":
                params[f.name] = tuple(params[f.name])
        return cls(**params)

    @classmethod
    def upgrade(cls, params: dict, version: int) -> dict:
        """Parameters of an older config version, rewritten for :attr:`VERSION` (nothing to do at version 1)."""
        return params


# ----------------------------------------------------------------------------- scheme
class Scheme:
    """One compression scheme: its config, the layers it applies to, its calibration, and its modules.

    Subclasses set the class attributes and implement :meth:`calibrate`,
    :meth:`build`, :meth:`owns`, :meth:`module_params` and :meth:`rebuild`.
    """

    name: str = ""
    config_cls: type = SchemeConfig
    module_cls: type = nn.Module
    title: str = ""             # one line: what it is
    stores: str = ""            # what a converted layer stores
    kernels: tuple = ()         # the sparsekit.ops ops its modules run (the first decides a forced backend)
    kernel_sources: tuple = ()  # where those ops' kernels live (kernels/*.py, csrc/)
    sparse: bool = False        # sparsify_ takes it
    quantized: bool = False     # quantize_ takes it
    format_version: int = 1     # version of :meth:`describe`'s description

    # ------------------------------------------------------------------ config
    def config(self, **params) -> SchemeConfig:
        return self.config_cls(**params)

    def default_config(self, calibrated: bool = False) -> SchemeConfig:
        method = self.config_cls.CALIBRATED_METHOD if calibrated else self.config_cls.DEFAULT_METHOD
        return self.config_cls(method=method)

    @property
    def methods(self) -> tuple:
        return self.config_cls.METHODS

    def applies_to(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    # ------------------------------------------------------------------ checks
    def check_all(self, cfg: SchemeConfig, modules: Sequence[nn.Module]) -> SchemeConfig:
        """Checks over every layer converted with ``cfg``; returns ``cfg`` with model-wide choices resolved."""
        return cfg

    def check(self, module: nn.Module, cfg: SchemeConfig) -> None:
        """Cheap per-layer validation, before any calibration."""
        if not self.applies_to(module):
            raise TypeError(f"scheme {self.name!r} applies to nn.Linear layers, got {type(module).__name__}")
        check_linear(module)

    # ------------------------------------------------------------------ calibration and building
    def calibrate(self, module: nn.Module, stats: Optional[dict], cfg: SchemeConfig):
        """Calibrate one layer from its raw input statistics (None when the method needs no data).

        ``module.weight`` is a scratch copy: it is overwritten with the weight the
        compressed layer computes with, so that later layers are calibrated on
        the compressed outputs.  Returns what :meth:`build` needs.
        """
        raise NotImplementedError

    def build(self, module: nn.Module, result, cfg: SchemeConfig) -> nn.Module:
        """The compressed module for ``module`` (its weight: as :meth:`calibrate` left it)."""
        raise NotImplementedError

    def convert(self, module: nn.Module, cfg: Optional[SchemeConfig] = None) -> nn.Module:
        """One layer on its own, with a data-free method: checked, calibrated on a scratch weight, built."""
        cfg = cfg if cfg is not None else self.default_config()
        if cfg.method_spec.needs_data:
            raise ValueError(f"method {cfg.method!r} needs calibration data; convert whole models with "
                             f"sparsify_ / quantize_ / compress (calib=...)")
        cfg = self.check_all(cfg, [module])
        self.check(module, cfg)
        scratch = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                            device="meta")
        scratch.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)
        scratch.bias = module.bias
        result = self.calibrate(scratch, None, cfg)
        return self.build(scratch, result, cfg)

    # ------------------------------------------------------------------ description
    def owns(self, module: nn.Module) -> bool:
        """True when ``module`` is one this scheme builds (and describes)."""
        return False

    def module_params(self, module: nn.Module) -> dict:
        raise NotImplementedError

    def describe(self, module: nn.Module) -> dict:
        """``{"scheme", "format_version", "module", "params"}``: enough to rebuild ``module``'s structure
        (its tensors' shapes and dtypes) without calibration; JSON-serializable."""
        if not self.owns(module):
            raise TypeError(f"scheme {self.name!r} does not describe a {type(module).__name__}")
        return {"scheme": self.name, "format_version": self.format_version, "module": type(module).__name__,
                "params": self.module_params(module)}

    def rebuild(self, description: dict, device=None, backend: Optional[str] = None) -> nn.Module:
        """An empty module with the described structure (fill it with ``load_state_dict``)."""
        raise NotImplementedError

    def check_description(self, description: dict) -> dict:
        if not isinstance(description, dict):
            raise TypeError(f"a module description must be a dict, got {type(description).__name__}")
        if description.get("scheme") != self.name:
            raise ValueError(f"description of scheme {description.get('scheme')!r} given to scheme {self.name!r}")
        v = description.get("format_version")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"format_version must be a positive int, got {v!r}")
        if v > self.format_version:
            raise ValueError(f"scheme {self.name!r} module format version {v} is newer than this sparsekit's "
                             f"({self.format_version}); upgrade sparsekit")
        params = description.get("params")
        if not isinstance(params, dict):
            raise ValueError(f"description params must be a dict, got {type(params).__name__}")
        return params

    # ------------------------------------------------------------------ reporting
    def bytes_per_weight(self, cfg: Optional[SchemeConfig] = None, shape=(4096, 4096),
                         dtype: torch.dtype = torch.float16) -> float:
        """Stored bytes per dense weight of a ``shape`` layer (no bias) converted from ``dtype``."""
        cfg = cfg if cfg is not None else self.default_config()
        n, k = shape
        lin = nn.Linear(k, n, bias=False, dtype=dtype, device="meta")
        mod = self.rebuild(self.example_description(cfg, lin), device="meta")
        total = sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers()))
        return total / (n * k)

    def example_description(self, cfg: SchemeConfig, linear: nn.Linear) -> dict:
        """The description of ``linear`` converted with ``cfg`` (for :meth:`bytes_per_weight`)."""
        raise NotImplementedError

    def report_details(self, cfg: SchemeConfig, layers: dict) -> dict:
        """Scheme parameters for a compression report (``layers``: name -> ``{"in_features", "dtype"}``
        of each converted layer)."""
        return {}

    def eval_forward(self, module: nn.Module) -> Optional[Callable]:
        """A forward for quality evaluation in the model's float dtype, or None (the module's own)."""
        return None
