"""Attribute judges for labelling generations: a small hashed bag-of-words one, or any transformers classifier.

`HashedBowJudge` (logistic regression on hashed unigram + bigram features, ~1 MB) is the one bundled for
`hf-collapse demo`; `SequenceClassifierJudge` wraps a fine-tuned `AutoModelForSequenceClassification` (stronger,
tens of MB); `load_judge` opens either from a folder. Stored as `model.safetensors` + `judge_config.json` (never a
pickle). Train it on data disjoint from the prefix-training data (check it: SST and Rotten Tomatoes share
sentences) so it is an independent judge.
"""

from __future__ import annotations

import json
import os
import random
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["HashedBowJudge", "SequenceClassifierJudge", "load_judge"]

_WORD = re.compile(r"[a-z0-9']+")
CONFIG_NAME = "judge_config.json"
WEIGHTS_NAME = "model.safetensors"


class HashedBowJudge(nn.Module):
    """Logistic regression over hashed unigram + bigram features (mean-pooled, `n_buckets` hash buckets).

    Calling it on a list of strings returns their predicted labels.
    """

    def __init__(self, labels: Sequence[str], n_buckets: int = 1 << 18) -> None:
        super().__init__()
        if len(labels) < 2:
            raise ValueError("a judge needs at least two labels")
        self.labels = list(labels)
        self.n_buckets = int(n_buckets)
        self.emb = nn.EmbeddingBag(self.n_buckets, len(self.labels), mode="mean")
        nn.init.zeros_(self.emb.weight)
        self.bias = nn.Parameter(torch.zeros(len(self.labels)))
        self.info: dict[str, Any] = {}

    def features(self, text: str) -> list[int]:
        words = _WORD.findall(text.lower())
        grams = words + [a + " " + b for a, b in zip(words, words[1:])]
        return [zlib.crc32(g.encode()) % self.n_buckets for g in grams] or [0]

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Logits `(len(texts), num_labels)`."""
        feats = [self.features(t) for t in texts]
        offsets = torch.tensor([0] + [len(f) for f in feats[:-1]]).cumsum(0)
        flat = torch.tensor([i for f in feats for i in f])
        return self.emb(flat, offsets) + self.bias

    @torch.no_grad()
    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.labels[i] for i in self.forward(list(texts)).argmax(-1).tolist()]

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str]) -> torch.Tensor:
        return self.forward(list(texts)).softmax(-1)

    def fit(self, texts: Sequence[str], labels: Sequence[str], epochs: int = 3, lr: float = 0.05, seed: int = 0) -> None:
        """Adam on cross-entropy, batch 256."""
        idx = {a: i for i, a in enumerate(self.labels)}
        unknown = sorted(set(labels) - set(idx))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the judge's labels {self.labels}")
        rows = list(zip(texts, labels))
        rng = random.Random(seed)
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        for _ in range(epochs):
            rng.shuffle(rows)
            for i in range(0, len(rows), 256):
                batch = rows[i : i + 256]
                loss = nn.functional.cross_entropy(self.forward([t for t, _ in batch]), torch.tensor([idx[y] for _, y in batch]))
                opt.zero_grad()
                loss.backward()
                opt.step()

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
        """Write `model.safetensors` + `judge_config.json` through a temp dir.

        fp16 (the default) halves the file; pass `torch.float32` to keep the exact trained weights.
        """
        from ..modeling.checkpoint_utils import atomic_directory_write

        def write(tmp: str) -> None:
            save_file({"emb": self.emb.weight.detach().to(dtype).contiguous(), "bias": self.bias.detach().float()},
                      os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})  # fmt: skip
            cfg = {"labels": self.labels, "n_buckets": self.n_buckets, "features": "hashed unigram+bigram, crc32", **self.info}
            Path(tmp, CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")

        atomic_directory_write(directory, write)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> HashedBowJudge:
        from ..modeling.checkpoint_utils import check_safetensors_files

        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{directory} is not a judge checkpoint (no {CONFIG_NAME}).")
        cfg = json.loads((directory / CONFIG_NAME).read_text())
        check_safetensors_files(directory)
        judge = cls(cfg["labels"], cfg["n_buckets"])
        weights = load_file(str(directory / WEIGHTS_NAME))
        with torch.no_grad():
            judge.emb.weight.copy_(weights["emb"].float())
            judge.bias.copy_(weights["bias"].float())
        judge.info = {k: v for k, v in cfg.items() if k not in ("labels", "n_buckets", "features")}
        return judge.eval()


class SequenceClassifierJudge:
    """A fine-tuned ``AutoModelForSequenceClassification`` as a judge: label names from the config's ``id2label``.

    Calling :meth:`predict` on a list of strings returns their predicted labels, like ``HashedBowJudge``.
    """

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 128, batch_size: int = 64) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
        self.max_length, self.batch_size = max_length, batch_size

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs: Any) -> SequenceClassifierJudge:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        return cls(AutoModelForSequenceClassification.from_pretrained(directory),
                   AutoTokenizer.from_pretrained(directory), **kwargs)  # fmt: skip

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str]) -> torch.Tensor:
        """``(len(texts), num_labels)`` probabilities, in batches of ``batch_size``."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i : i + self.batch_size]), truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="pt").to(self.model.device)  # fmt: skip
            out.append(self.model(**enc).logits.float().softmax(-1).cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.labels))

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.labels[i] for i in self.predict_proba(texts).argmax(-1).tolist()]


def load_judge(directory: str | os.PathLike, labels: Sequence[str] = ()) -> HashedBowJudge | SequenceClassifierJudge:
    """Open the judge in ``directory``: a ``HashedBowJudge`` (``judge_config.json``) or a transformers sequence
    classifier (``config.json``).

    Raises:
        FileNotFoundError: the folder holds neither.
        ValueError: the judge does not predict every label in ``labels`` (e.g. ``("positive", "negative")``).
    """
    directory = Path(directory)
    if (directory / CONFIG_NAME).is_file():
        judge: HashedBowJudge | SequenceClassifierJudge = HashedBowJudge.from_pretrained(directory)
    elif (directory / "config.json").is_file():
        judge = SequenceClassifierJudge.from_pretrained(directory)
    else:
        raise FileNotFoundError(f"{directory} is not a judge: it has neither {CONFIG_NAME} (a HashedBowJudge) nor "
                                "config.json (a transformers sequence classifier)")  # fmt: skip
    missing = [x for x in labels if x not in judge.labels]
    if missing:
        raise ValueError(f"the judge in {directory} predicts {judge.labels}, not {missing}: use a judge trained for "
                         "these labels (its config's id2label names them)")  # fmt: skip
    return judge
