"""The ``sparsekit`` command.

    sparsekit info               versions, device, backends per op, CUDA extension status
    sparsekit info DIR [--json]  describe a saved checkpoint (sparsekit, transformers with quant_method
                                 "sparsekit", or compressed-tensors): format, layers per scheme, bytes, quality
    sparsekit bench [ARGS...]    microbenchmarks of the ops given to --ops (see ``sparsekit bench --help``);
                                 ``--quality`` adds the real-model quality table
    sparsekit quality [ARGS...]  the real-model quality table alone (see ``sparsekit quality --help``)
    sparsekit compress --workload minilm|digits --scheme 2:4 --method sparsegpt --out DIR [--force]
                       [--override LAYER SPEC ...] [--quiet | --progress]
                                 compress a bundled workload; writes DIR/model.safetensors, DIR/report.json
    sparsekit compress --model HF_DIR --calib FILE [--calib-size N] [--seq-len L] --scheme S --method M
                       [--format sparsekit|compressed-tensors] --out DIR [--force] [...]
                                 compress a Hugging Face model directory (see :mod:`sparsekit.cli_model`);
                                 writes a transformers directory (+ tokenizer, report.json) to DIR

Every command's ``--help`` has a description and examples.  ``compress`` prints its report (JSON)
on stdout, with ``"files"`` relative to ``"out"`` (the output directory), and its progress on
stderr: bars on a terminal, one summary line otherwise, nothing with ``--quiet``.

``--scheme`` and ``--method`` take every scheme and method of the registry
(:mod:`sparsekit.schemes`).  ``--override LAYER SPEC`` (repeatable) is the
per-layer override of :func:`sparsekit.compress.compress`: LAYER is a module
name, ``re:<regex>`` or ``_default``; SPEC is ``none`` (leave the layer
dense), a scheme name, ``SCHEME:key=value,...`` or ``:key=value,...``
(parameters of ``--scheme``), e.g. ``--override re:attention none``
``--override encoder.layer.0.output.dense int4:group_size=32``.

User errors (bad arguments, an output directory that cannot be written or already holds a
result, an unknown SPARSEKIT_BACKEND) are reported before any work as one line on stderr,
without a traceback, with exit status 2.  ``compress`` checks, in this order: SPARSEKIT_BACKEND,
the argument syntax, the argument combinations (method for the scheme, --sparsity, --group-size,
the overrides, a forced backend that cannot run the schemes on CPU), the output directory; then,
after loading the workload and before any calibration, every layer against its scheme (e.g. a
group size that does not divide a layer's in_features, an override naming no layer).  With
``--model``, the argument combinations also cover ``--format compressed-tensors`` (a scheme it
cannot hold), the model directory, the ``--calib`` file and the tokenizer a text file needs; the
calibration rows are checked (ids in the vocabulary, length within the model's positions) after
loading the model and before any calibration.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

# ops whose backends `info` lists (those not registered in this build are skipped)
KNOWN_OPS = ("sparse24_linear", "sparse24_grad_input", "sparse24_grad_values", "sparse24_int8_linear",
             "block_sparse_linear", "int4_linear", "int8_linear", "w4a8_linear", "per_token_quant",
             "sparse24_int4_linear", "draft_attention", "triple_gate_conv2d")


class UsageError(Exception):
    """A user error (bad argument, bad output path, bad environment): printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing the usage and exiting."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


OUTPUT_FILES = ("model.safetensors", "report.json")


def __getattr__(name):
    # SCHEMES / SCHEME_OPS: the registry's view, computed on use (plug-in schemes included)
    from sparsekit.schemes import registry

    if name == "SCHEMES":
        return registry.names()
    if name == "SCHEME_OPS":
        # the op a scheme's compressed modules run (checked against a forced SPARSEKIT_BACKEND before any work)
        return {s.name: s.kernels[0] for s in registry}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _join(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


MAIN_EXAMPLES = """examples:
  sparsekit info                                     versions, device and backends per op
  sparsekit bench --ops int4_linear --quick          benchmark one op (CPU: its correctness sweep)
  sparsekit quality --workloads digits               the real-model quality table (digits only)
  sparsekit compress --workload digits --scheme 2:4 --out out/

`sparsekit COMMAND --help` describes each command.
"""

INFO_EXAMPLES = """examples:
  sparsekit info
  SPARSEKIT_BACKEND=reference sparsekit info         show the effect of a forced backend
  sparsekit info out/llama-int4                      describe a checkpoint written by sparsekit compress
  sparsekit info out/llama-int4 --json               the same as JSON
"""

COMPRESS_EXAMPLES = """examples:
  sparsekit compress --workload minilm --scheme 2:4 --method sparsegpt --out out/
  sparsekit compress --workload digits --scheme block --sparsity 0.75 --out out/ --force
  sparsekit compress --workload minilm --scheme int4 --override re:attention none --out out/ --force
  sparsekit compress --workload digits --scheme int4 --group-size 32 --quiet
  sparsekit compress --model llama/ --calib calib.txt --scheme int4 --method gptq --out out/llama-int4
  sparsekit compress --model llama/ --calib ids.pt --scheme w8a8 --format compressed-tensors --out out/ct
  sparsekit compress --model minilm/ --calib text.jsonl --seq-len 64 --scheme 2:4 --method magnitude --out out/m

--model reads a transformers directory (AutoModelForCausalLM for a causal LM, else AutoModel) and
--calib a tokenized file (.pt: a (B, L) LongTensor; .safetensors: input_ids) or text (.txt, .jsonl
with "text") tokenized with the directory's tokenizer; the last 10% of the --calib-size rows (at least
one) are held out for the quality line (perplexity for a causal LM, else the cosine similarity of the
last hidden state to the dense model's).  The output layer (lm_head) stays dense.

The report (JSON) goes to stdout; its "files" are relative to --out.  Progress goes to
stderr: bars on a terminal, one summary line otherwise, nothing with --quiet.
"""


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="sparsekit", description="sparsekit: kernels for sparse and low-bit neural networks.  "
                                              "Commands: info, bench, quality, compress.",
                epilog=MAIN_EXAMPLES, formatter_class=raw)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    i = sub.add_parser("info", help="print versions, the CUDA device, backends per op and the CUDA extension "
                                    "status; with DIR, describe a saved checkpoint",
                       description="Print the versions (sparsekit, python, torch, triton), the CUDA device, the CUDA "
                                   "extension status, SPARSEKIT_BACKEND and, per op, the backends available on this "
                                   "device with the one chosen automatically.  With DIR, describe the checkpoint "
                                   "there instead: its format and version, the compressed layers per scheme, its "
                                   "size in bytes and the quality its report stored.",
                       epilog=INFO_EXAMPLES, formatter_class=raw)
    i.add_argument("dir", nargs="?", default=None, metavar="DIR",
                   help="a checkpoint directory: sparsekit.save_pretrained (sparsekit_config.json), a transformers "
                        "directory with quant_method 'sparsekit' or 'compressed-tensors', or a --workload output")
    i.add_argument("--json", action="store_true", help="with DIR: print the description as JSON")
    # `bench` and `quality` hand their arguments to their own parsers (see main); listed here for --help
    sub.add_parser("bench", help="run the microbenchmarks of the ops given to --ops (CPU correctness sweep "
                                 "without CUDA); `sparsekit bench --help` for its options", add_help=False)
    sub.add_parser("quality", help="the real-model compression quality table (each scheme and method on the "
                                   "bundled workloads); `sparsekit quality --help` for its options", add_help=False)
    c = sub.add_parser("compress", help="compress a bundled workload (minilm or digits) or a Hugging Face model "
                                        "directory and report its quality",
                       description="Compress a bundled workload (--workload) or a Hugging Face model directory "
                                   "(--model, with --calib) and report its quality.  Every argument and the "
                                   "output directory are checked before any work; user errors print one line "
                                   "and exit with status 2.",
                       epilog=COMPRESS_EXAMPLES, formatter_class=raw)
    from sparsekit.schemes import registry

    defaults = {}
    for sch in registry:
        defaults.setdefault(sch.config_cls.CALIBRATED_METHOD, []).append(sch.name)
    what = c.add_mutually_exclusive_group()
    what.add_argument("--workload", choices=("minilm", "digits"), help="a bundled workload")
    what.add_argument("--model", metavar="DIR", default=None,
                      help="a transformers model directory (config.json + weights; a tokenizer for text --calib)")
    c.add_argument("--calib", metavar="FILE", default=None,
                   help="--model only: calibration tokens, a .pt (LongTensor (B, L) of input ids) or .safetensors "
                        "(input_ids) file, or text (.txt, .jsonl with a 'text' field) for the model's tokenizer")
    c.add_argument("--seq-len", type=int, default=None, metavar="L",
                   help="--model only: tokens per calibration row (default: text 128 or the model's "
                        "max_position_embeddings if smaller; tokenized files: their row length)")
    c.add_argument("--device", default=None,
                   help="--model only: the device the model is loaded on, calibrated and evaluated (cpu, cuda, "
                        "cuda:1, ...; default cpu)")
    c.add_argument("--format", choices=("sparsekit", "compressed-tensors"), default=None,
                   help="--model only: output format, a transformers directory with quant_method 'sparsekit' "
                        "(default; every scheme) or compressed-tensors (int4, w4a8, w8a8)")
    c.add_argument("--scheme", choices=registry.names(), default="2:4",
                   help="compression scheme (see the README's scheme table); default 2:4")
    c.add_argument("--method", choices=registry.methods(), default=None,
                   help="calibration method; default: " + "; ".join(f"{m} for {_join(n)}" for m, n in defaults.items()))
    c.add_argument("--out", default=None,
                   help="directory for model.safetensors and report.json (created if missing)")
    c.add_argument("--force", action="store_true", help="overwrite model.safetensors / report.json in --out")
    c.add_argument("--calib-size", type=int, default=None, metavar="N",
                   help="calibration samples (MiniLM: sentences, 1..48, default 16; digits: training images, "
                        "1..1347, default 384) -- the quality table's defaults, so both give the same number; "
                        "recorded in the report as calib_size.  --model: rows read from --calib (default 32), "
                        "the last 10%% (at least 1) held out for the quality")
    c.add_argument("--sparsity", type=float, default=None,
                   help=f"{_join(registry.with_field('sparsity'))} only: fraction of blocks dropped, in [0, 1] "
                        f"(default 0.5)")
    c.add_argument("--group-size", type=int, default=None,
                   help=f"{_join(registry.with_field('group_size'))} only: 32, 64, 128 or -1 (one group per row; "
                        f"default: largest fitting)")
    c.add_argument("--override", nargs=2, action="append", default=None, metavar=("LAYER", "SPEC"),
                   help="per-layer override (repeatable): LAYER is a module name, re:<regex> or _default; SPEC is "
                        "none, a scheme, SCHEME:key=value,... or :key=value,... (parameters of --scheme)")
    shown = c.add_mutually_exclusive_group()
    shown.add_argument("--progress", action="store_true",
                       help="show the progress bars even when stderr is not a terminal")
    shown.add_argument("--quiet", action="store_true", help="no progress bars and no summary line")
    return p


def _forced_backend() -> str | None:
    """The backend forced by ``SPARSEKIT_BACKEND`` (None when unset or ``auto``); UsageError if it is not one."""
    from sparsekit.ops.dispatch import ALL_BACKENDS, ENV_VAR

    value = os.environ.get(ENV_VAR)
    if value is None or value == "" or value == "auto":
        return None
    if value not in ALL_BACKENDS:
        raise UsageError(f"sparsekit: error: environment variable {ENV_VAR}={value!r} is not a backend; "
                         f"set it to one of {', '.join(ALL_BACKENDS)} or 'auto', or unset it")
    return value


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if "x" in low and all(p.strip().isdigit() for p in low.split("x")):
        return tuple(int(p) for p in low.split("x"))
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_override_spec(spec: str):
    """``--override`` SPEC -> an overrides value: None, a scheme name, or a parameter dict (``"scheme"`` key
    when a scheme is named).  ValueError for malformed text."""
    text = spec.strip()
    if text.lower() in ("none", "skip", "dense"):
        return None
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep:
        if not name:
            raise ValueError(f"empty override spec {spec!r}")
        return name
    params = {} if not name else {"scheme": name}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"override spec {spec!r}: {item!r} is not key=value")
        key = key.strip().replace("-", "_")
        params[key] = _parse_value(value.strip())
    if not params:
        raise ValueError(f"override spec {spec!r} gives no scheme and no parameters")
    return params


def _check_compress_args(args) -> None:
    """Everything about the compress arguments that can be checked without loading the workload."""
    import math

    from sparsekit.compress import scheme_config
    from sparsekit.schemes import normalize_spec, registry

    err = "sparsekit compress: error:"
    scheme = registry.get(args.scheme)
    if args.workload is None and args.model is None:
        raise UsageError(f"{err} the following arguments are required: --workload or --model (exactly one) "
                         f"(see `sparsekit compress --help`)")
    if args.workload is not None:
        given = [o for o, v in (("--calib", args.calib), ("--seq-len", args.seq_len), ("--format", args.format),
                                ("--device", args.device)) if v is not None]
        if given:
            raise UsageError(f"{err} {given[0]} applies to --model only, not to --workload")
    if args.method is not None and args.method not in scheme.methods:
        raise UsageError(f"{err} --method {args.method} does not apply to --scheme {args.scheme}; "
                         f"choose from {', '.join(scheme.methods)}")
    if args.sparsity is not None:
        with_sparsity = registry.with_field("sparsity")
        if args.scheme not in with_sparsity:
            why = "has a fixed 50% sparsity" if "2:4" in args.scheme else "does not prune"
            raise UsageError(f"{err} --sparsity applies to --scheme {_join(with_sparsity)} only (--scheme "
                             f"{args.scheme} {why})")
        if not math.isfinite(args.sparsity) or not 0.0 <= args.sparsity <= 1.0:
            raise UsageError(f"{err} --sparsity must be in [0, 1], got {args.sparsity}")
    if args.group_size is not None:
        with_groups = registry.with_field("group_size")
        if args.scheme not in with_groups:
            raise UsageError(f"{err} --group-size applies to --scheme {_join(with_groups)} only, "
                             f"not to --scheme {args.scheme}")
        if args.group_size not in (32, 64, 128, -1):
            raise UsageError(f"{err} --group-size must be 32, 64, 128 or -1 (one group per row), "
                             f"got {args.group_size}")
    try:
        base = scheme_config(args.scheme, args.method, sparsity=args.sparsity, group_size=args.group_size)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{err} {_one_line(e)}") from None
    overrides = None
    used = [scheme]
    if args.override:
        overrides = {}
        for layer, spec in args.override:
            try:
                value = parse_override_spec(spec)
                if not layer:
                    raise ValueError("LAYER is empty")
                if layer.startswith("re:"):
                    import re

                    re.compile(layer[3:])
                cfg = normalize_spec(value, base, registry, calibrated=True, where=f"--override {layer}")
            except (ValueError, TypeError, Exception) as e:  # noqa: BLE001 - re.error and friends
                raise UsageError(f"{err} --override {layer} {spec}: {_one_line(e)}") from None
            if cfg is not None:
                used.append(registry.for_config(cfg))
            overrides[layer] = value
    args.overrides = overrides
    args.used_schemes = list(dict.fromkeys(s.name for s in used))
    device = "cpu"
    if getattr(args, "device", None) is not None:
        import torch

        try:
            device = torch.device(args.device).type
        except (RuntimeError, ValueError):
            raise UsageError(f"{err} --device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"{err} --device {args.device}: CUDA is not available here")
        if device not in ("cpu", "cuda"):
            raise UsageError(f"{err} --device must be cpu or a cuda device, got {args.device!r}")
    forced = _forced_backend()
    if forced is not None:
        from sparsekit.ops import dispatch

        for sch in {s.name: s for s in used}.values():
            op = sch.kernels[0]
            try:
                dispatch.resolve(op, device)
            except ValueError as e:
                what = f"--scheme {sch.name}" if sch is scheme else f"the override scheme {sch.name}"
                raise UsageError(f"{err} environment variable {dispatch.ENV_VAR}={forced!r} cannot run the "
                                 f"{what} modules on {device.upper()}: {e}") from None
    args.method = args.method or scheme.config_cls.CALIBRATED_METHOD


def _prepare_out(out: str, force: bool, files=OUTPUT_FILES) -> list:
    """Check (and create) the output directory before any work; returns the directories created.

    UsageError for a regular file in the way, an unwritable directory, or an existing
    output file (``files``: model.safetensors / report.json) without ``force``.
    """
    import tempfile

    err = "sparsekit compress: error: --out"
    if not out:
        raise UsageError(f"{err} must be a directory path, got an empty string")
    out_abs = os.path.abspath(out)
    if os.path.exists(out_abs) and not os.path.isdir(out_abs):
        raise UsageError(f"{err} {out!r} is a regular file, not a directory")
    from sparsekit.compress import _blocking_file

    blocker = _blocking_file(os.path.join(out_abs, "x"))
    if blocker is not None:
        raise UsageError(f"{err} {out!r} cannot be created: {blocker!r} is a regular file, not a directory")
    existing = [f for f in files if os.path.lexists(os.path.join(out_abs, f))]
    for f in existing:
        if os.path.isdir(os.path.join(out_abs, f)):
            raise UsageError(f"{err} {os.path.join(out, f)!r} is a directory; remove it or choose another --out")
    if existing and not force:
        raise UsageError(f"{err} {out!r} already holds {' and '.join(existing)}; pass --force to overwrite, "
                         f"or choose another directory")
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise UsageError("sparsekit compress: error: writing --out needs the safetensors package "
                         "(pip install safetensors)") from None
    created = []
    probe = out_abs
    while not os.path.exists(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    try:
        os.makedirs(out_abs, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sparsekit-write-test.", dir=out_abs)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        _remove_created(created)
        raise UsageError(f"{err} {out!r} is not writable: {e.strerror or e}") from None
    return created


def _remove_created(created: list) -> None:
    for d in created:  # deepest first
        try:
            os.rmdir(d)
        except OSError:
            pass


def compress_cmd(args, out=None) -> int:
    """``sparsekit compress``: returns the exit status; raises UsageError for user errors."""
    out = out or sys.stdout
    import json

    _check_compress_args(args)
    if args.model is not None:
        from sparsekit import cli_model

        return cli_model.compress_model_cmd(args, out, _prepare_out, _remove_created, _summary_line,
                                            _stderr_is_tty)
    created = _prepare_out(args.out, args.force) if args.out is not None else []
    try:
        from sparsekit.compress import compress, save_compressed
        from sparsekit import workloads

        err = "sparsekit compress: error:"
        try:
            wl = workloads.load_workload(args.workload, num_calib=getattr(args, "calib_size", None))
        except (ImportError, OSError, ValueError) as e:
            raise UsageError(f"{err} cannot load workload {args.workload!r}: {_one_line(e)}") from None
        opts = {}
        if args.sparsity is not None:
            opts["sparsity"] = args.sparsity
        if args.group_size is not None:
            opts["group_size"] = args.group_size
        quiet = getattr(args, "quiet", False)
        bars = not quiet and (getattr(args, "progress", False) or _stderr_is_tty())
        t0 = time.perf_counter()
        try:
            model, report = compress(wl.model, wl.calib, scheme=args.scheme, method=args.method,
                                     quality_fn=wl.quality_fn, dense_quality=wl.dense_quality,
                                     progress=bars, overrides=getattr(args, "overrides", None), **opts)
        except (NotImplementedError, ValueError, TypeError) as e:
            raise UsageError(f"{err} {_one_line(e)}") from None
        report = {"workload": wl.name, "metric": wl.metric, "calib_size": wl.extra.get("calib_size"), **report}
        if args.out is not None:
            try:
                wpath, rpath = save_compressed(model, os.path.join(args.out, "model.safetensors"), report)
            except (OSError, ValueError, TypeError) as e:
                raise UsageError(f"{err} writing --out {args.out!r} failed: {_one_line(e)}") from None
            # relative to the output directory (its path is "out")
            report["out"] = args.out
            report["files"] = [os.path.relpath(f, os.path.abspath(args.out)) for f in (wpath, rpath) if f]
            created = []
    finally:
        _remove_created(created)
    if not quiet:
        print(_summary_line(report, time.perf_counter() - t0), file=sys.stderr, flush=True)
    shown = {k: v for k, v in report.items() if k != "layers"}
    print(json.dumps(shown, indent=2, default=str), file=out)
    return 0


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):   # replaced or closed stream
        return False


def _summary_line(report: dict, seconds: float) -> str:
    """One line for stderr after ``compress``: what was compressed, how long it took, the quality."""
    what = report.get("workload") or report.get("model")
    parts = [f"sparsekit compress: {what} {report.get('scheme')}/{report.get('method')}: "
             f"{report.get('num_layers', len(report.get('layers', ())))} layers in {seconds:.1f} s"]
    if isinstance(report.get("quality"), float):
        q = f"quality {report['quality']:.4f}"
        if isinstance(report.get("quality_dense"), float):
            q += f" (dense {report['quality_dense']:.4f})"
        parts.append(q)
    if report.get("out") is not None:
        parts.append(f"wrote {', '.join(report['files'])} in {report['out']}")
    return "; ".join(parts)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _cuda_extension_status() -> str:
    try:
        from sparsekit.ops import _cuda
    except ImportError as e:
        return f"not available (sparsekit.ops._cuda missing: {e})"
    try:
        if _cuda.available():
            return "built (sparsekit._C loaded)"
        why = getattr(_cuda, "unavailable_reason", None)
        return "not built" + (f": {why()}" if callable(why) else "")
    except Exception as e:
        return f"not available ({type(e).__name__}: {e})"


def info(out=None) -> int:
    out = out or sys.stdout
    import sparsekit

    def pr(k, v):
        print(f"{k:<18} {v}", file=out)

    pr("sparsekit", getattr(sparsekit, "__version__", "unknown"))
    pr("python", platform.python_version())
    try:
        import torch
        pr("torch", f"{torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU build'})")
    except ImportError as e:
        pr("torch", f"not importable: {e}")
        return 1
    try:
        import triton
        pr("triton", triton.__version__)
    except ImportError:
        pr("triton", "not installed")
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        pr("cuda device", f"{torch.cuda.get_device_name(idx)} (sm_{props.major}{props.minor}, "
                          f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)")
        device = "cuda"
    else:
        pr("cuda device", "none")
        device = "cpu"
    pr("cuda extension", _cuda_extension_status())
    pr("SPARSEKIT_BACKEND", f"{os.environ['SPARSEKIT_BACKEND']} (forced)" if os.environ.get("SPARSEKIT_BACKEND")
       not in (None, "", "auto") else "unset (automatic choice per op)")
    try:
        import torch.backends.cusparselt as csl
        pr("cusparselt", f"available (version {csl.version()})" if csl.is_available() else "not available")
    except Exception:
        pr("cusparselt", "unknown")
    try:
        from sparsekit import ops
        available = ops.available_backends
    except Exception as e:  # a broken install should still print what it can
        pr("backends", f"unavailable: {type(e).__name__}: {e}")
        return 1
    print(f"backends on {device}:", file=out)
    for op in KNOWN_OPS:
        try:
            bks = available(op, device)
        except ValueError:
            continue  # op not in this build
        except Exception as e:
            bks = [f"error: {type(e).__name__}: {e}"]
        chosen = ""
        try:
            from sparsekit.ops import dispatch
            chosen = dispatch.resolve(op, device, None, 1)
        except Exception:
            pass
        print(f"  {op:<24} {', '.join(bks) or '-'}" + (f"   (auto at M=1: {chosen})" if chosen else ""), file=out)
    return 0


def main(argv=None) -> int:
    """Run the ``sparsekit`` command; returns the exit status.

    User errors (bad arguments, a bad output path, an unknown ``SPARSEKIT_BACKEND``) print one
    line ``...: error: ...`` on stderr, with no traceback, and return 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _forced_backend()
        # `bench` hands every remaining argument to the benchmark runner untouched
        if argv and argv[0] == "bench":
            from sparsekit.bench.run import main as bench_main
            return int(bench_main(argv[1:]) or 0)
        if argv and argv[0] == "quality":
            from sparsekit.bench.quality import main as quality_main
            try:
                return int(quality_main(argv[1:], prog="sparsekit quality") or 0)
            except SystemExit as e:   # argparse: --help exits 0 (passed on), bad arguments 2
                code = e.code if isinstance(e.code, int) else 2
                if code == 0:
                    raise
                return code
        parser = _parser()
        args = parser.parse_args(argv)
        if args.command == "info":
            if args.dir is not None:
                from sparsekit import cli_model

                return cli_model.info_dir_cmd(args.dir, args.json, sys.stdout)
            if args.json:
                raise UsageError("sparsekit info: error: --json applies to `sparsekit info DIR` only")
            return info()
        if args.command == "compress":
            return compress_cmd(args)
        parser.print_help()
        return 2
    except UsageError as e:
        print(_one_line(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
