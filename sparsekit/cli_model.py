"""``sparsekit compress --model DIR`` and ``sparsekit info DIR``: the command line for Hugging Face directories.

``compress --model DIR --calib FILE``: DIR is a transformers directory (``config.json`` + weights),
loaded with ``AutoModelForCausalLM`` when its config names a causal LM architecture
(``architectures`` ending in ``ForCausalLM`` / ``LMHeadModel``), else with ``AutoModel``.  FILE holds
the calibration tokens (:mod:`sparsekit.calibration.text`: a tokenized ``.pt`` / ``.safetensors``
file, or ``.txt`` / ``.jsonl`` text tokenized with DIR's tokenizer) cut into rows of ``--seq-len``
tokens; ``--calib-size`` rows are read, the last 10% of them (at least one) are held out for the
quality line and the rest calibrate.  Every ``nn.Linear`` is compressed but the output embeddings
(``lm_head``), which stay dense.

Quality: for a causal LM the perplexity (lower is better) of the dense and of the compressed model
on the held-out rows; otherwise the mean cosine similarity of the compressed model's last hidden
state to the dense model's, per token (1.0 for the dense model).

``--format sparsekit`` writes an ordinary transformers directory through
:func:`sparsekit.integrations.transformers.save_pretrained` (``AutoModelForCausalLM.from_pretrained``
reloads it after ``import sparsekit.integrations.transformers``); ``--format compressed-tensors``
writes :func:`sparsekit.interop.compressed_tensors.save_compressed_tensors` (int4, w4a8 and w8a8
without AWQ only; checked before any work).  Both copy DIR's tokenizer files and generation config
when it has them and write ``report.json``.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import torch
from torch import nn

from .cli import UsageError, _one_line

ERR = "sparsekit compress: error:"
FORMATS = ("sparsekit", "compressed-tensors")
# what save_compressed_tensors can hold: QLinear int4 (W4A16 / W4A8) and W8A8
CT_SCHEMES = ("int4", "w4a8", "w8a8")
DEFAULT_CALIB_ROWS = 32
DEFAULT_SEQ_LEN = 128
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.txt", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
OTHER_FILES = ("generation_config.json",)
# every file `compress --model --out` may write (checked like model.safetensors / report.json: --force)
MODEL_OUTPUT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "report.json") + \
    TOKENIZER_FILES + OTHER_FILES


# ----------------------------------------------------------------------------- checks before any work
def check_model_args(args, used_schemes) -> None:
    """The ``--model`` arguments that can be checked without loading anything but small files."""
    if args.calib is None:
        raise UsageError(f"{ERR} --model needs --calib FILE (a tokenized .pt / .safetensors file or a "
                         f".txt / .jsonl text file)")
    if args.calib_size is not None and args.calib_size < 2:
        raise UsageError(f"{ERR} --calib-size must be at least 2 with --model (one row calibrates, one is held "
                         f"out for the quality), got {args.calib_size}")
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError(f"{ERR} --seq-len must be a positive number of tokens, got {args.seq_len}")
    fmt = args.format or "sparsekit"
    if fmt == "compressed-tensors":
        bad = [s for s in used_schemes if s not in CT_SCHEMES]
        if bad:
            what = f"--scheme {args.scheme}" if args.scheme in bad else f"the override scheme {bad[0]}"
            raise UsageError(f"{ERR} --format compressed-tensors holds int4, w4a8 and w8a8 layers only, not "
                             f"{what}; use --format sparsekit")
        if args.method == "awq":
            raise UsageError(f"{ERR} --format compressed-tensors cannot hold --method awq (its per-input-channel "
                             f"scale has no compressed-tensors equivalent); use --method gptq or rtn, or "
                             f"--format sparsekit")
    model_dir = args.model
    if not model_dir or not os.path.isdir(model_dir):
        why = "does not exist" if not model_dir or not os.path.exists(model_dir) else "is not a directory"
        raise UsageError(f"{ERR} --model {model_dir!r} {why}; give a transformers model directory "
                         f"(config.json + weights)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UsageError(f"{ERR} --model {model_dir!r} has no config.json; give a transformers model directory")
    from .calibration.text import check_calibration_path, is_text_file

    try:
        check_calibration_path(args.calib)
    except ValueError as e:
        raise UsageError(f"{ERR} --calib: {_one_line(e)}") from None
    if is_text_file(args.calib) and not has_tokenizer(model_dir):
        raise UsageError(f"{ERR} --calib {args.calib!r} is text, but --model {model_dir!r} has no tokenizer "
                         f"(none of {', '.join(TOKENIZER_FILES[:2])}, vocab.txt, ...); save the tokenizer to "
                         f"the directory or give a tokenized --calib file (.pt / .safetensors with input_ids)")


def has_tokenizer(model_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES)


# ----------------------------------------------------------------------------- loading
def _hf():
    try:
        import transformers
    except ImportError:
        raise UsageError(f"{ERR} --model needs Hugging Face transformers; install the extra: "
                         f"pip install 'sparsekit[hf]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def is_causal_lm(config) -> bool:
    """Whether ``config`` describes a causal LM: its ``architectures`` name one (``...ForCausalLM``,
    ``...LMHeadModel``), or, without ``architectures``, its model type is a decoder-only causal LM."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    mt = getattr(config, "model_type", None)
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def max_positions(config):
    for cfg in (config, getattr(config, "get_text_config", lambda **k: None)()):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            v = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def load_model(model_dir: str):
    """``(model, causal)``: DIR loaded in its saved dtype, in eval mode, on CPU."""
    tf = _hf()
    try:
        config = tf.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ...
        raise UsageError(f"{ERR} --model {model_dir!r}: cannot read its config.json: {_one_line(e)}") from None
    if getattr(config, "quantization_config", None) is not None:
        qc = config.quantization_config
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        raise UsageError(f"{ERR} --model {model_dir!r} is already quantized (quantization_config with "
                         f"quant_method {method!r}); give the dense model's directory")
    causal = is_causal_lm(config)
    auto = tf.AutoModelForCausalLM if causal else tf.AutoModel
    try:
        model = auto.from_pretrained(model_dir, config=config, local_files_only=True, dtype="auto")
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{ERR} --model {model_dir!r}: {auto.__name__}.from_pretrained failed: "
                         f"{_one_line(e)}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, causal


def load_tokenizer(model_dir: str):
    tf = _hf()
    try:
        return tf.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{ERR} --model {model_dir!r}: its tokenizer cannot be loaded: {_one_line(e)}") from None


def calibration_rows(args, model, tokenizer) -> tuple:
    """``(calib, heldout, seq_len)``: token rows from ``--calib``."""
    from .calibration.text import is_text_file, load_token_rows, split_holdout

    limit = max_positions(model.config)
    seq_len = args.seq_len
    if seq_len is None and is_text_file(args.calib):
        seq_len = min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN
    if seq_len is not None and limit is not None and seq_len > limit:
        raise UsageError(f"{ERR} --seq-len {seq_len} exceeds the model's max_position_embeddings {limit}")
    rows = args.calib_size if args.calib_size is not None else DEFAULT_CALIB_ROWS
    emb = model.get_input_embeddings()
    vocab = getattr(emb, "num_embeddings", None) or getattr(model.config, "vocab_size", None)
    try:
        ids = load_token_rows(args.calib, seq_len=seq_len, tokenizer=tokenizer, rows=rows, vocab_size=vocab)
    except ValueError as e:
        raise UsageError(f"{ERR} --calib: {_one_line(e)}") from None
    if limit is not None and ids.shape[1] > limit:
        raise UsageError(f"{ERR} --calib rows have {ids.shape[1]} tokens, more than the model's "
                         f"max_position_embeddings {limit}; pass --seq-len {limit} or less")
    if args.calib_size is not None and ids.shape[0] < args.calib_size:
        raise UsageError(f"{ERR} --calib {args.calib!r} gives {ids.shape[0]} rows of {ids.shape[1]} tokens, "
                         f"--calib-size asks for {args.calib_size}")
    try:
        calib, held = split_holdout(ids)
    except ValueError as e:
        raise UsageError(f"{ERR} --calib {args.calib!r}: {_one_line(e)}") from None
    return calib, held, int(ids.shape[1])


# ----------------------------------------------------------------------------- quality
def _forward(model, ids):
    with torch.no_grad():
        return model(input_ids=ids)


@torch.no_grad()
def perplexity(model: nn.Module, rows: torch.Tensor, batch_size: int = 8) -> float:
    """exp of the mean next-token negative log-likelihood over every position of ``rows`` but the first."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, rows.shape[0], batch_size):
        ids = rows[i:i + batch_size].to(dev)
        logits = _forward(model, ids).logits[:, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / max(count, 1), dtype=torch.float64)))


@torch.no_grad()
def last_hidden(model: nn.Module, rows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    dev = next(model.parameters()).device
    outs = [_forward(model, rows[i:i + batch_size].to(dev)).last_hidden_state.double().cpu()
            for i in range(0, rows.shape[0], batch_size)]
    return torch.cat(outs)


def quality_function(causal: bool, held: torch.Tensor, reference=None):
    """``(metric, quality_fn)`` for the held-out rows; ``reference``: the dense model's last hidden state
    (non-causal models)."""
    if causal:
        return "perplexity (held-out calibration rows; lower is better)", lambda m: perplexity(m, held)

    def cosine(m):
        h = last_hidden(m, held)
        return float(torch.nn.functional.cosine_similarity(h, reference, dim=-1).mean())
    return "cosine similarity of the last hidden state to the dense model's (held-out rows)", cosine


# ----------------------------------------------------------------------------- the command
def compressible_layers(model: nn.Module) -> list:
    """Every ``nn.Linear`` but the output embeddings (``lm_head``: left dense, as is usual for LLMs)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def _copy_side_files(src: str, out: str) -> list:
    copied = []
    for f in TOKENIZER_FILES + OTHER_FILES:
        p = os.path.join(src, f)
        if os.path.isfile(p) and not os.path.exists(os.path.join(out, f)):
            shutil.copyfile(p, os.path.join(out, f))
            copied.append(f)
    return copied


def write_output(model, fmt: str, out: str, report: dict, src_dir: str) -> list:
    """Write the compressed model in ``fmt`` to ``out`` with the source's tokenizer files and generation
    config; returns the files written (names in ``out``).  ``out`` was checked by the caller (no file of
    :data:`MODEL_OUTPUT_FILES` there without ``--force``)."""
    for f in MODEL_OUTPUT_FILES:        # stale files of an earlier run (--force) go first
        p = os.path.join(out, f)
        if os.path.isfile(p) or os.path.islink(p):
            os.unlink(p)
    before = set(os.listdir(out))
    if fmt == "sparsekit":
        from .integrations.transformers import save_pretrained

        save_pretrained(model, out, report)
    else:
        from .interop.compressed_tensors import save_compressed_tensors

        save_compressed_tensors(model, out)
    _copy_side_files(src_dir, out)
    return sorted(f for f in os.listdir(out) if f not in before and os.path.isfile(os.path.join(out, f)))


def compress_model_cmd(args, out_stream, prepare_out, remove_created, summary_line, stderr_is_tty) -> int:
    """``sparsekit compress --model DIR``: returns the exit status; raises UsageError for user errors."""
    check_model_args(args, getattr(args, "used_schemes", [args.scheme]))
    fmt = args.format or "sparsekit"
    created = prepare_out(args.out, args.force, MODEL_OUTPUT_FILES) if args.out is not None else []
    quiet = getattr(args, "quiet", False)
    try:
        from .calibration.text import is_text_file
        from .compress import compress

        tokenizer = load_tokenizer(args.model) if is_text_file(args.calib) else None
        model, causal = load_model(args.model)
        if args.device is not None:
            try:
                model.to(args.device)
            except (RuntimeError, ValueError) as e:
                raise UsageError(f"{ERR} --device {args.device}: cannot move the model there: {_one_line(e)}") \
                    from None
        calib, held, seq_len = calibration_rows(args, model, tokenizer)
        try:    # one forward of the dense model before any work: models it cannot drive fail here
            out1 = _forward(model, held[:1].to(next(model.parameters()).device))
            if not hasattr(out1, "logits" if causal else "last_hidden_state"):
                raise ValueError(f"{type(out1).__name__} has no {'logits' if causal else 'last_hidden_state'}")
        except Exception as e:  # noqa: BLE001 - whatever the architecture raises
            raise UsageError(f"{ERR} --model {args.model!r}: {type(model).__name__}(input_ids=...) does not run "
                             f"({_one_line(e)}); --model takes causal LMs and encoders that run on input_ids "
                             f"alone") from None
        reference = None if causal else last_hidden(model, held)
        metric, quality_fn = quality_function(causal, held, reference)
        from .calibration.text import batches

        opts = {}
        if args.sparsity is not None:
            opts["sparsity"] = args.sparsity
        if args.group_size is not None:
            opts["group_size"] = args.group_size
        bars = not quiet and (getattr(args, "progress", False) or stderr_is_tty())
        t0 = time.perf_counter()
        try:
            dev = next(model.parameters()).device
            model, report = compress(model, [b.to(dev) for b in batches(calib)], scheme=args.scheme, method=args.method,
                                     quality_fn=quality_fn, progress=bars, layers=compressible_layers(model),
                                     overrides=getattr(args, "overrides", None), **opts)
        except (NotImplementedError, ValueError, TypeError) as e:
            raise UsageError(f"{ERR} {_one_line(e)}") from None
        report = {"model": args.model, "architecture": type(model).__name__, "metric": metric,
                  "device": str(next(model.parameters()).device),
                  "calib_size": int(calib.shape[0]), "eval_size": int(held.shape[0]), "seq_len": seq_len,
                  "format": fmt, **report}
        if args.out is not None:
            try:
                files = write_output(model, fmt, args.out, report, args.model)
                report["out"] = args.out
                report["files"] = sorted(set(files) | {"report.json"})
                with open(os.path.join(args.out, "report.json"), "w", encoding="utf-8") as f:
                    json.dump(report, f, indent=2, default=str)
            except (OSError, ValueError, TypeError) as e:
                raise UsageError(f"{ERR} writing --out {args.out!r} failed: {_one_line(e)}") from None
            created = []
    finally:
        remove_created(created)
    if not quiet:
        import sys

        print(summary_line(report, time.perf_counter() - t0), file=sys.stderr, flush=True)
    shown = {k: v for k, v in report.items() if k != "layers"}
    print(json.dumps(shown, indent=2, default=str), file=out_stream)
    return 0


# ----------------------------------------------------------------------------- sparsekit info DIR
def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _count_layers(layers: dict) -> dict:
    counts: dict = {}
    for desc in layers.values():
        if isinstance(desc, dict) and set(desc) == {"same_as"}:
            counts["(shared)"] = counts.get("(shared)", 0) + 1
        elif isinstance(desc, dict):
            s = str(desc.get("scheme"))
            counts[s] = counts.get(s, 0) + 1
    return counts


def _ct_scheme_name(group: dict) -> str:
    w = group.get("weights") or {}
    a = group.get("input_activations") or {}
    bits = w.get("num_bits")
    act = a.get("num_bits") if a else 16
    name = f"W{bits}A{act}"
    if w.get("strategy") == "group" and w.get("group_size"):
        name += f" group {w['group_size']}"
    elif w.get("strategy"):
        name += f" per {w['strategy']}"
    if bits == 4:
        name += " symmetric" if w.get("symmetric", True) else " asymmetric"
    return name


def _hub_format(qc: dict) -> str:
    """'GPTQ (gptq_v2)' / 'AWQ (gemm)': the method and its packing (sparsekit.interop.gptq reads these)."""
    if qc.get("quant_method") == "gptq":
        return f"GPTQ ({qc.get('checkpoint_format', qc.get('format', 'gptq'))})"
    return f"AWQ ({str(qc.get('version', 'gemm')).lower()})"


def _hub_scheme(qc: dict) -> str:
    bits = qc.get("bits", qc.get("w_bit"))
    gs = qc.get("group_size", qc.get("q_group_size"))
    name = f"W{bits}A16" + (f" group {gs}" if gs not in (None, -1) else " per channel")
    if qc.get("quant_method") == "gptq":
        name += " symmetric" if qc.get("sym", True) else " asymmetric"
        if qc.get("desc_act"):
            name += " desc_act"
    else:
        name += " asymmetric" if qc.get("zero_point", True) else " symmetric"
    return name


def _count_qweights(path: str) -> int:
    """Quantized layers of a GPTQ / AWQ directory: its ``<layer>.qweight`` tensors (read from the headers)."""
    from safetensors import safe_open

    n = 0
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), framework="pt") as sf:
                n += sum(1 for k in sf.keys() if k.endswith(".qweight"))
    return n


def describe_checkpoint(path: str) -> dict:
    """What ``sparsekit info DIR`` prints: format, version, layers per scheme, bytes, stored quality.
    ValueError when ``path`` is not a checkpoint this knows."""
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a directory" if os.path.exists(path) else f"{path!r} does not exist")
    info: dict = {"path": path}
    report = None
    sk_cfg = os.path.join(path, "sparsekit_config.json")
    hf_cfg = os.path.join(path, "config.json")
    try:
        if os.path.isfile(sk_cfg):
            cfg = _read_json(sk_cfg)
            info.update(format="sparsekit", format_version=cfg.get("format_version"), producer=cfg.get("producer"),
                        layers=_count_layers(cfg.get("layers") or {}))
            report = cfg.get("report")
        elif os.path.isfile(hf_cfg):
            cfg = _read_json(hf_cfg)
            qc = cfg.get("quantization_config") or {}
            method = qc.get("quant_method") if isinstance(qc, dict) else None
            info["architecture"] = ", ".join(cfg.get("architectures") or []) or cfg.get("model_type")
            if method == "sparsekit":
                info.update(format="sparsekit (transformers quant_method 'sparsekit')",
                            format_version=qc.get("format_version"), producer=qc.get("producer"),
                            layers=_count_layers(qc.get("layers") or {}))
                report = qc.get("report")
            elif method == "compressed-tensors":
                counts: dict = {}
                for g in (qc.get("config_groups") or {}).values():
                    name = _ct_scheme_name(g)
                    counts[name] = counts.get(name, 0) + len(g.get("targets") or [])
                info.update(format=f"compressed-tensors ({qc.get('format')})", format_version=qc.get("version"),
                            producer=None, layers=counts, dense_linear_layers=len(qc.get("ignore") or []))
            elif method in ("gptq", "awq"):
                info.update(format=_hub_format(qc), format_version=None, producer=None,
                            layers={_hub_scheme(qc): _count_qweights(path)})
            elif method is None:
                raise ValueError(f"{path!r} holds a dense transformers model (config.json has no "
                                 f"quantization_config), not a compressed checkpoint")
            else:
                raise ValueError(f"{path!r} is quantized with quant_method {method!r}, not by sparsekit or as "
                                 f"compressed-tensors")
        elif os.path.isfile(os.path.join(path, "report.json")) and os.path.isfile(
                os.path.join(path, "model.safetensors")):
            report = _read_json(os.path.join(path, "report.json"))
            info.update(format="sparsekit state dict (sparsekit compress --workload; load with "
                               "sparsekit.compress.load_compressed)", format_version=None, producer=None)
            if isinstance(report, dict):
                if isinstance(report.get("layer_schemes"), dict):
                    info["layers"] = _count_schemes(report["layer_schemes"])
                else:
                    info["layers"] = {str(report.get("scheme")): report.get("num_layers")}
        else:
            raise ValueError(f"{path!r} holds no sparsekit_config.json, config.json or report.json: not a "
                             f"checkpoint")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path!r}: cannot read its configuration: {_one_line(e)}") from None
    if report is None and os.path.isfile(os.path.join(path, "report.json")):
        try:
            report = _read_json(os.path.join(path, "report.json"))
        except (OSError, json.JSONDecodeError):
            report = None
    info["num_layers"] = sum(v for v in (info.get("layers") or {}).values() if isinstance(v, int))
    weights = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    info["weights"] = weights
    info["weights_bytes"] = sum(os.path.getsize(os.path.join(path, f)) for f in weights)
    info["total_bytes"] = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                              if os.path.isfile(os.path.join(path, f)))
    if isinstance(report, dict):
        for k in ("scheme", "method", "metric", "quality", "quality_dense", "ratio", "dense_bytes",
                  "compressed_bytes", "calib_size", "seq_len", "model", "workload"):
            if report.get(k) is not None:
                info.setdefault("report", {})[k] = report[k]
    return info


def _count_schemes(layer_schemes: dict) -> dict:
    counts: dict = {}
    for s in layer_schemes.values():
        counts[str(s)] = counts.get(str(s), 0) + 1
    return counts


def info_dir_cmd(path: str, as_json: bool, out) -> int:
    try:
        info = describe_checkpoint(path)
    except ValueError as e:
        raise UsageError(f"sparsekit info: error: {_one_line(e)}") from None
    if as_json:
        print(json.dumps(info, indent=2, default=str), file=out)
        return 0

    def pr(k, v):
        print(f"{k:<18} {v}", file=out)

    pr("checkpoint", info["path"])
    pr("format", info["format"])
    if info.get("architecture"):
        pr("architecture", info["architecture"])
    pr("format version", info.get("format_version") if info.get("format_version") is not None else "-")
    if info.get("producer"):
        pr("producer", info["producer"])
    layers = info.get("layers") or {}
    pr("compressed layers", f"{info['num_layers']}" + (": " + ", ".join(f"{v} {k}" for k, v in layers.items())
                                                       if layers else ""))
    if "dense_linear_layers" in info:
        pr("dense linears", info["dense_linear_layers"])
    pr("weights", f"{info['weights_bytes']:,} bytes in {', '.join(info['weights']) or '-'}")
    pr("directory", f"{info['total_bytes']:,} bytes")
    rep = info.get("report") or {}
    if rep:
        if rep.get("scheme"):
            pr("scheme / method", f"{rep.get('scheme')} / {rep.get('method')}")
        if isinstance(rep.get("ratio"), (int, float)):
            pr("layer ratio", f"{rep['ratio']:.3f} (compressed / dense bytes of the compressed layers)")
        if rep.get("quality") is not None:
            q = f"{rep['quality']:.6g}"
            if rep.get("quality_dense") is not None:
                q += f" (dense {rep['quality_dense']:.6g})"
            pr("quality", q + (f"; {rep['metric']}" if rep.get("metric") else ""))
    else:
        pr("quality", "not stored")
    return 0
