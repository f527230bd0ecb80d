"""Dist-n: distinct n-grams / all n-grams over a set of generations (Li et al., 2016), as used by Air-Decoding.

Loadable offline: ``evaluate.load("<path>/hf_collapse/metrics/dist_n")``. Words are whitespace tokens.
"""

import datasets
import evaluate

_DESCRIPTION = "Dist-1/2/3: number of distinct word n-grams divided by the number of all word n-grams, over all texts."
_INPUTS = "predictions: list of generated strings. max_n (int, default 3)."


def dist_n(texts, max_n=3):
    """Plain-Python Dist-1..max_n over ``texts`` (word n-grams pooled over all texts)."""
    out = {}
    for n in range(1, max_n + 1):
        grams = []
        for t in texts:
            words = t.split()
            grams.extend(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        out[f"dist-{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    return out


class DistN(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Li et al. 2016, A Diversity-Promoting Objective Function for Neural Conversation Models",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, max_n=3):
        return dist_n(predictions, max_n)
