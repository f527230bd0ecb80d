"""Perplexity of generated texts under any causal LM passed in (offline; ``evaluate``'s own needs the Hub).

Loadable offline: ``evaluate.load("<path>/hf_collapse/metrics/perplexity")``. With ``prompts``, only the
continuation tokens are scored, conditioned on the prompt.
"""

import math

import datasets
import evaluate
import torch

_DESCRIPTION = "Per-text perplexity under a given causal LM; mean and median over texts."
_INPUTS = (
    "predictions: full texts (prompt + continuation); model: a causal LM; tokenizer: its tokenizer; prompts: "
    "optional list of prompts (only later tokens are scored); prefix: optional string put before every text "
    "(e.g. a document-start token)."
)


@torch.no_grad()
def perplexities(texts, model, tokenizer, prompts=None, prefix=""):
    device = next(model.parameters()).device
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer(prefix + text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        start = 1
        if prompts is not None:
            start = max(1, len(tokenizer(prefix + prompts[i], add_special_tokens=False)["input_ids"]))
        if ids.shape[1] <= start:
            out.append(float("nan"))
            continue
        logits = model(input_ids=ids).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits[start - 1 :], ids[0, start:], reduction="mean")
        out.append(math.exp(nll.item()))
    return out


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model=None, tokenizer=None, prompts=None, prefix=""):
        if model is None or tokenizer is None:
            raise ValueError("perplexity needs model=<causal LM> and tokenizer=<its tokenizer>")
        ppl = perplexities(predictions, model, tokenizer, prompts, prefix)
        finite = sorted(p for p in ppl if p == p)
        mean = sum(finite) / len(finite) if finite else float("nan")
        median = finite[len(finite) // 2] if finite else float("nan")
        return {"perplexities": ppl, "mean_perplexity": mean, "median_perplexity": median}
