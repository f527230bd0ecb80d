"""The evaluate-loadable metric modules work offline from their local folders."""

from __future__ import annotations

from pathlib import Path

import evaluate
import pytest
import torch
from air_decoding_utils import tiny_gpt2, tiny_tokenizer

METRICS = Path(__file__).resolve().parents[1] / "hf_collapse" / "metrics"


def test_dist_n():
    m = evaluate.load(str(METRICS / "dist_n"))
    r = m.compute(predictions=["a b a b", "a b c"])
    assert r["dist-1"] == pytest.approx(3 / 7)
    assert r["dist-2"] == pytest.approx(3 / 5)  # ab ba ab | ab bc -> {ab, ba, bc}
    assert r["dist-3"] == pytest.approx(3 / 3)


def test_attribute_accuracy_with_callable_and_pipeline_style_output():
    m = evaluate.load(str(METRICS / "attribute_accuracy"))
    clf = lambda texts: ["positive" if "good" in t else "negative" for t in texts]  # noqa: E731
    r = m.compute(predictions=["good", "bad", "good"], references=["positive", "positive", "positive"], classifier=clf)
    assert r["attribute_accuracy"] == pytest.approx(2 / 3)
    pipe = lambda texts: [{"label": "LABEL_1", "score": 0.9} for _ in texts]  # noqa: E731
    r = m.compute(predictions=["x"], references=["positive"], classifier=pipe, label_map={"LABEL_1": "positive"})
    assert r["attribute_accuracy"] == 1.0


def test_perplexity_matches_manual_loss():
    m = evaluate.load(str(METRICS / "perplexity"))
    model, tok = tiny_gpt2(), tiny_tokenizer()
    r = m.compute(predictions=["the movie was great"], model=model, tokenizer=tok, prompts=["the movie"])
    ids = torch.tensor([tok("the movie was great")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits[1:], ids[0, 2:])
    assert r["perplexities"][0] == pytest.approx(float(torch.exp(nll)), rel=1e-5)
