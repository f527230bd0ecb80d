"""Model cards of every hf-collapse checkpoint, from the templates in `hub_cards/`.

The one place cards are built: the models' `save_pretrained`, both trainers, `export_for_hub` and the example export
scripts all call `make_model_card`. A leaf module: it imports nothing from hf_collapse but the version, so any
module may import it without creating an import circle.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .version import __version__

__all__ = ["CARD_KINDS", "card_template_path", "make_model_card"]

# kind -> defaults of the YAML metadata
CARD_KINDS: dict[str, dict[str, Any]] = {
    "robust_mamba2": {"pipeline_tag": "text-generation", "tags": ["mamba2", "state-collapse", "stuffed-mamba"]},
    "attribute_prefixes": {
        "pipeline_tag": "text-generation",
        "tags": ["air-decoding", "attribute-collapse", "prefix-tuning", "peft", "controllable-generation"],
    },
    "air_decoding": {
        "pipeline_tag": "text-generation",
        "tags": ["air-decoding", "attribute-collapse", "controllable-generation"],
    },
    "dual_head_classifier": {
        "pipeline_tag": "image-classification",
        "tags": ["dual-head-kd", "knowledge-distillation", "head-collapse"],
    },
}


def card_template_path(kind: str) -> Path:
    """Path of the card template for `kind` (shipped in the wheel as `hf_collapse/hub_cards/`)."""
    if kind not in CARD_KINDS:
        raise ValueError(f"unknown model card kind {kind!r}; choose one of {sorted(CARD_KINDS)}")
    return Path(str(importlib.resources.files("hf_collapse") / "hub_cards" / f"{kind}.md"))


def make_model_card(
    kind: str,
    model_id: str = "hf-collapse-model",
    base_model: str | None = None,
    datasets: list[str] | None = None,
    metrics: list[str] | None = None,
    license: str = "apache-2.0",
    eval_results: list[EvalResult | dict[str, Any]] | None = None,
    tags: list[str] | None = None,
    pipeline_tag: str | None = None,
    language: str | list[str] | None = None,
    **facts: Any,
) -> ModelCard:
    """Build the model card of an hf-collapse checkpoint.

    Args:
        kind: `"robust_mamba2"`, `"attribute_prefixes"`, `"air_decoding"` or `"dual_head_classifier"` (a template in
            `hub_cards/`).
        model_id: name shown as the title (and used in the usage snippet unless `repo_id` is given in `facts`).
        base_model, datasets, metrics, license, language: YAML metadata.
        eval_results: `huggingface_hub.EvalResult`s or dicts of their fields; written as `model-index`.
        tags: extra tags; `hf-collapse` and the method's tags are always present.
        pipeline_tag: overrides the kind's default.
        **facts: template variables (`results_table`, `training_description`, `limitations`, `repo_id`, ...).

    Returns:
        A `huggingface_hub.ModelCard`; `card.save(path)` writes it.
    """
    defaults = CARD_KINDS.get(kind)
    if defaults is None:
        raise ValueError(f"unknown model card kind {kind!r}; choose one of {sorted(CARD_KINDS)}")
    all_tags = ["hf-collapse", *defaults["tags"], *(tags or [])]
    results = [r if isinstance(r, EvalResult) else EvalResult(**r) for r in (eval_results or [])]
    data = ModelCardData(
        language=language,
        license=license,
        library_name="hf-collapse",
        tags=list(dict.fromkeys(all_tags)),
        base_model=base_model,
        datasets=datasets,
        metrics=metrics,
        pipeline_tag=pipeline_tag or defaults["pipeline_tag"],
        model_name=model_id,
        eval_results=results or None,
    )
    facts.setdefault("hf_collapse_version", __version__)
    return ModelCard.from_template(data, template_path=str(card_template_path(kind)), model_id=model_id, **facts)
