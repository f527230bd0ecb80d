"""Attribute accuracy: the share of generations an external classifier assigns to the target attribute.

Loadable offline: ``evaluate.load("<path>/hf_collapse/metrics/attribute_accuracy")``. The classifier is any
text-classification ``pipeline`` (its output dicts' ``"label"`` is used) or any callable mapping a list of strings to
a list of labels.
"""

import datasets
import evaluate

_DESCRIPTION = "Accuracy of an external attribute classifier on generated texts against their target attributes."
_INPUTS = (
    "predictions: generated strings; references: target attribute (string) per text; classifier: a "
    "text-classification pipeline or callable(list[str]) -> list[label]; label_map: optional dict mapping the "
    "classifier's labels to attribute names."
)


def _labels(classifier, texts):
    out = classifier(list(texts))
    return [o["label"] if isinstance(o, dict) else o for o in out]


class AttributeAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Zhong et al. 2023, Air-Decoding (EMNLP)",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, classifier=None, label_map=None):
        if classifier is None:
            raise ValueError("attribute_accuracy needs classifier=<text-classification pipeline or callable>")
        labels = _labels(classifier, predictions)
        if label_map:
            labels = [label_map.get(x, x) for x in labels]
        hits = sum(str(p) == str(r) for p, r in zip(labels, references))
        return {"attribute_accuracy": hits / len(references) if references else 0.0}
