"""The quality gate of attribute prefixes: the classifier they imply.

A prefix trained on an attribute's texts makes the LM more likely to produce such texts, so the attribute whose prefix
gives a text the highest likelihood is a classifier: argmax_k log p_k(text). Prefixes that cannot tell the attributes
apart this way cannot steer generation toward one of them either. Air-Decoding's reconstructed attribute
distribution is built from the same per-token probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["prefix_classifier_predictions", "prefix_gate", "prefix_log_likelihoods"]


@torch.no_grad()
def prefix_log_likelihoods(
    attribute_model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 16, max_length: int = 128
) -> torch.Tensor:
    """``(K, N)``: log p_k(text) of every text under every attribute's prefix.

    Args:
        attribute_model: an ``AttributePrefixModel`` (its start token, if any, is applied as in training).
        tokenizer: the base model's tokenizer.
        texts: the texts to score (non-empty strings).
        batch_size: texts per forward (each forward runs K·batch_size rows).
        max_length: texts are cut to this many tokens.
    """
    if any(not isinstance(t, str) or not t.strip() for t in texts):
        raise ValueError("prefix_log_likelihoods needs non-empty texts")
    scores = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in chunk]
        width = max(len(x) for x in ids)
        # left padding, as in generation: every row's last token sits in the last column
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for r, x in enumerate(ids):
            input_ids[r, width - len(x) :] = torch.tensor(x)
            mask[r, width - len(x) :] = 1
        scores.append(attribute_model.sequence_log_likelihood(input_ids, mask))  # (K, B)
    return torch.cat(scores, dim=1)


def prefix_classifier_predictions(
    attribute_model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 16, max_length: int = 128
) -> list[str]:
    """The attribute whose prefix gives each text the highest log-likelihood (arguments as
    :func:`prefix_log_likelihoods`)."""
    scores = prefix_log_likelihoods(attribute_model, tokenizer, texts, batch_size, max_length)
    return [attribute_model.attributes[i] for i in scores.argmax(0).tolist()]


def prefix_gate(
    attribute_model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[str],
    batch_size: int = 16,
    max_length: int = 128,
) -> dict[str, Any]:
    """Accuracy of the classifier the prefixes imply on labelled texts (labels are attribute names).

    Returns ``{"accuracy", "n", "per_attribute": {attribute: recall}, "predictions"}``.
    """
    if len(texts) != len(labels) or not texts:
        raise ValueError(f"prefix_gate needs as many labels as texts, and at least one ({len(texts)} / {len(labels)})")
    unknown = sorted(set(labels) - set(attribute_model.attributes))
    if unknown:
        raise ValueError(f"labels {unknown} are not attributes of these prefixes ({attribute_model.attributes})")
    preds = prefix_classifier_predictions(attribute_model, tokenizer, texts, batch_size, max_length)
    per = {}
    for a in attribute_model.attributes:
        rows = [p for p, y in zip(preds, labels) if y == a]
        if rows:
            per[a] = sum(p == a for p in rows) / len(rows)
    accuracy = sum(p == y for p, y in zip(preds, labels)) / len(labels)
    return {"accuracy": accuracy, "n": len(labels), "per_attribute": per, "predictions": preds}
