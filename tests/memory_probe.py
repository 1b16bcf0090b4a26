"""Peak extra memory of ``compress`` on Llama-class models of N decoder blocks (run by test_compress_memory.py).

Run in a fresh process with ``MALLOC_MMAP_THRESHOLD_=16384`` so that every tensor of 16 KiB or more is its own
mapping, returned to the system when freed: the resident set size then follows the live tensors, and the peak
(``VmHWM``, reset through ``/proc/self/clear_refs``) is the peak of the live memory.

    python tests/memory_probe.py gptq:2,4,8 sparsegpt:2,4,8

prints one JSON object per line: method, blocks, model_bytes, block_bytes, the peak extra RSS of the
block-by-block in-place run and of the whole-model run (``blocks=None``), and whether both give bit-identical
state dicts.
"""
import gc
import json
import math
import os
import sys
import warnings

import torch
from torch import nn

HIDDEN, INTER, VOCAB, HEADS = (int(v) for v in os.environ.get("PROBE_DIMS", "192,384,64,4").split(","))
SCHEME = {"gptq": "int4", "sparsegpt": "2:4", "magnitude": "2:4"}


class _RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class _DecoderLayer(nn.Module):
    """A Llama decoder layer without rotary embeddings: the same seven linear layers (q/k/v/o, gate/up/down)."""

    def __init__(self, d, inter, heads):
        super().__init__()
        self.heads = heads
        self.input_layernorm = _RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.post_attention_layernorm = _RMSNorm(d)
        self.gate_proj = nn.Linear(d, inter, bias=False)
        self.up_proj = nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)

    def forward(self, h, attention_mask=None):
        b, t, d = h.shape
        x = self.input_layernorm(h)
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + attention_mask
        h = h + self.o_proj((att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))
        x = self.post_attention_layernorm(h)
        return h + self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _Decoder(nn.Module):
    def __init__(self, n_blocks):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([_DecoderLayer(HIDDEN, INTER, HEADS) for _ in range(n_blocks)])
        self.norm = _RMSNorm(HIDDEN)


class TorchLlama(nn.Module):
    """The block structure of ``LlamaForCausalLM`` in plain torch (used when transformers is not installed)."""

    def __init__(self, n_blocks):
        super().__init__()
        self.model = _Decoder(n_blocks)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids):
        h = self.model.embed_tokens(ids)
        t = ids.shape[-1]
        mask = torch.full((t, t), float("-inf")).triu(1)
        for layer in self.model.layers:
            h = layer(h, attention_mask=mask)
        return self.lm_head(self.model.norm(h))


def build(n_blocks: int, seed: int = 0):
    torch.manual_seed(seed)
    try:
        if os.environ.get("PROBE_TORCH_ONLY"):
            raise ImportError
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return TorchLlama(n_blocks).float().eval()
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=n_blocks,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
                      max_position_embeddings=64, use_cache=False, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float().eval()


def calib_batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(2)]


def measure(run):
    """``(result, peak extra RSS in bytes)`` of ``run()``."""
    from sparsekit.calibration.offload import current_rss, peak_rss, reset_peak_rss

    gc.collect()
    base = current_rss()
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    out = run()
    return out, peak_rss() - base


def case(method: str, n: int, inplace: bool = True) -> dict:
    from sparsekit.compress import compress
    from sparsekit.convert import module_bytes

    calib = calib_batches()
    model = build(n)
    model_bytes = module_bytes(model)
    block_bytes = module_bytes(model.model.layers[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # no fallback to the whole model
        (out, rep), extra = measure(lambda: compress(model, calib, SCHEME[method], method, speed="off",
                                                     inplace=inplace))
    row = {"model": type(model).__name__, "method": method, "blocks": n, "inplace": inplace, "model_bytes": model_bytes, "block_bytes": block_bytes,
           "extra_blockwise": extra, "mode": rep["calibration"]["mode"], "num_layers": rep["num_layers"]}
    if not inplace:
        return row
    sd = {k: v.clone() for k, v in out.state_dict().items()}
    del model, out, rep
    model = build(n)
    (out, rep), extra_whole = measure(lambda: compress(model, calib, SCHEME[method], method, speed="off",
                                                       blocks=None))
    sd2 = out.state_dict()
    row.update(extra_whole_model=extra_whole, whole_mode=rep["calibration"]["mode"],
               equal=sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd))
    return row


def main(argv):
    torch.set_num_threads(1)
    # warm-up: one-time allocations (lazy imports, kernels' first calls) stay out of the measurements
    from sparsekit.compress import compress

    for method in ("gptq", "sparsegpt"):
        compress(build(1), calib_batches(), SCHEME[method], method, speed="off")
    for spec in argv:
        method, _, ns = spec.partition(":")
        inplace = not method.endswith("-copy")
        method = method.replace("-copy", "")
        for n in (int(x) for x in ns.split(",")):
            print(json.dumps(case(method, n, inplace)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
