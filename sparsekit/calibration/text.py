"""Calibration token rows from a file: ``load_token_rows(path, seq_len=..., tokenizer=...) -> (R, L) int64``.

Two kinds of file:

* **tokenized**: ``.pt`` holding a 2-D integer tensor ``(B, L)`` of input ids (or a dict with an
  ``"input_ids"`` entry; read with ``torch.load(weights_only=True)``, never unpickling code), or
  ``.safetensors`` with an ``input_ids`` tensor.  Rows are used as they are; with ``seq_len`` smaller
  than ``L`` each row is cut to its first ``seq_len`` ids.
* **text**: ``.txt`` (the whole file is one document) or ``.jsonl`` (one JSON object per line, its
  ``"text"`` field a document).  Each document is tokenized with ``tokenizer`` (special tokens as the
  tokenizer adds them), the documents are concatenated and cut into rows of exactly ``seq_len`` ids
  (the incomplete tail is dropped), so no row needs padding.

Errors (a missing file, an unknown suffix, a tensor that is not 2-D integers, a text file without a
tokenizer, a file too short for one row, ids outside ``[0, vocab_size)``) raise ``ValueError`` naming
the file and the problem.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

__all__ = ["TOKENIZED_SUFFIXES", "TEXT_SUFFIXES", "is_text_file", "check_calibration_path", "iter_documents",
           "load_token_rows", "split_holdout", "batches"]

TOKENIZED_SUFFIXES = (".pt", ".safetensors")
TEXT_SUFFIXES = (".txt", ".jsonl")


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def is_text_file(path) -> bool:
    """Whether ``path`` names a text calibration file (``.txt`` / ``.jsonl``), which needs a tokenizer."""
    return _suffix(os.fspath(path)) in TEXT_SUFFIXES


def check_calibration_path(path) -> str:
    """``path`` as a string; ValueError when it is not an existing file with a known suffix."""
    path = os.fspath(path)
    suffix = _suffix(path)
    if suffix not in TOKENIZED_SUFFIXES + TEXT_SUFFIXES:
        raise ValueError(f"calibration file {path!r}: unknown suffix {suffix or '(none)'!r}; give a tokenized "
                         f"tensor file (.pt, .safetensors with 'input_ids') or a text file (.txt, .jsonl with "
                         f"a 'text' field)")
    if not os.path.isfile(path):
        raise ValueError(f"calibration file {path!r} does not exist" if not os.path.exists(path) else
                         f"calibration file {path!r} is not a regular file")
    return path


def _read_tokenized(path: str) -> torch.Tensor:
    if _suffix(path) == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                if "input_ids" not in f.keys():
                    raise ValueError(f"calibration file {path!r} has no 'input_ids' tensor (it holds "
                                     f"{sorted(f.keys())[:6]})")
                ids = f.get_tensor("input_ids")
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"calibration file {path!r} is not a readable safetensors file: {e}") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle / zip errors of every kind
            raise ValueError(f"calibration file {path!r} is not a tensor file torch.load can read with "
                             f"weights_only=True: {' '.join(str(e).split())[:200]}") from None
        if isinstance(obj, dict):
            if "input_ids" not in obj:
                raise ValueError(f"calibration file {path!r} holds a dict without 'input_ids' (keys "
                                 f"{sorted(map(str, obj))[:6]})")
            obj = obj["input_ids"]
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"calibration file {path!r} holds a {type(obj).__name__}, not a tensor of input ids")
        ids = obj
    if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"calibration file {path!r}: input_ids must be a 2-D integer tensor (B, L), got "
                         f"{tuple(ids.shape)} {str(ids.dtype).replace('torch.', '')}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"calibration file {path!r}: input_ids is empty, shape {tuple(ids.shape)}")
    return ids.to(torch.int64).contiguous()


def iter_documents(path: str):
    """The non-blank documents of a ``.txt`` (one) or ``.jsonl`` (one per line, field ``"text"``) file,
    read lazily (a ``.jsonl`` file line by line)."""
    with open(path, encoding="utf-8") as f:
        if _suffix(path) == ".txt":
            text = f.read()
            if text.strip():
                yield text
        else:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"calibration file {path!r} line {i} is not JSON: {e.msg}") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ValueError(f"calibration file {path!r} line {i} is not an object with a string "
                                     f"'text' field")
                if rec["text"].strip():
                    yield rec["text"]


def _tokenize(path: str, tokenizer, seq_len: int, max_rows: Optional[int]) -> torch.Tensor:
    ids: list = []
    docs = 0
    for doc in iter_documents(path):
        docs += 1
        ids.extend(int(t) for t in tokenizer(doc)["input_ids"])
        if max_rows is not None and len(ids) >= max_rows * seq_len:
            break                       # enough rows: the rest of the file is not read
    if docs == 0:
        raise ValueError(f"calibration file {path!r} holds no text")
    rows = len(ids) // seq_len
    if rows == 0:
        raise ValueError(f"calibration file {path!r} gives {len(ids)} tokens, fewer than one row of "
                         f"seq_len={seq_len}")
    return torch.tensor(ids[:rows * seq_len], dtype=torch.int64).reshape(rows, seq_len)


def load_token_rows(path, *, seq_len: Optional[int] = None, tokenizer=None, rows: Optional[int] = None,
                    vocab_size: Optional[int] = None) -> torch.Tensor:
    """Token rows ``(R, L)`` int64 from a calibration file (see the module docstring).

    ``seq_len``: row length (required for text files; cuts the rows of tokenized files);
    ``rows``: keep the first ``rows`` rows (all when None or when the file has fewer);
    ``vocab_size``: every id must be in ``[0, vocab_size)``.
    """
    path = check_calibration_path(path)
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if is_text_file(path):
        if tokenizer is None:
            raise ValueError(f"calibration file {path!r} is text and needs a tokenizer")
        if seq_len is None:
            raise ValueError("seq_len is required for a text calibration file")
        ids = _tokenize(path, tokenizer, seq_len, rows)
    else:
        ids = _read_tokenized(path)
        if seq_len is not None:
            ids = ids[:, :seq_len].contiguous()
    if rows is not None:
        ids = ids[:rows]
    if vocab_size is not None:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"calibration file {path!r} holds token ids in [{lo}, {hi}], outside the model's "
                             f"vocabulary [0, {vocab_size})")
    return ids


def split_holdout(ids: torch.Tensor, fraction: float = 0.1) -> tuple:
    """``(calib, heldout)``: the last ``max(1, round(fraction * R))`` rows are held out (R >= 2 needed)."""
    r = ids.shape[0]
    if r < 2:
        raise ValueError(f"need at least 2 token rows (1 to calibrate, 1 held out for the quality), got {r}")
    hold = min(max(1, round(fraction * r)), r - 1)
    return ids[:r - hold], ids[r - hold:]


def batches(ids: torch.Tensor, batch_size: int = 8) -> list:
    """``ids`` cut into batches of at most ``batch_size`` rows."""
    return [ids[i:i + batch_size] for i in range(0, ids.shape[0], batch_size)]
