"""hf-collapse: fixes for three collapses, as Hugging Face Transformers components.

* Attribute collapse (Air-Decoding): ``AirDecodingLogitsProcessor``, ``AttributePrefixTrainer``.
* State collapse in Mamba-2 (Stuffed Mamba): ``RobustMamba2ForCausalLM``.
* Head collapse in knowledge distillation (Dual-Head KD): ``DualHeadForImageClassification``,
  ``DualHeadDistillationTrainer``.

``import hf_collapse`` registers every config and model with the ``Auto*`` classes. Everything else is
imported lazily on first attribute access, so the import stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .registration import register
from .version import __version__

# public name -> submodule that defines it (imported on first access)
_LAZY: dict[str, str] = {
    # dual-head KD
    "DualHeadConfig": "hf_collapse.modeling.dual_head",
    "DualHeadPreTrainedModel": "hf_collapse.modeling.dual_head",
    "DualHeadModel": "hf_collapse.modeling.dual_head",
    "DualHeadForImageClassification": "hf_collapse.modeling.dual_head",
    "DualHeadForSequenceClassification": "hf_collapse.modeling.dual_head",
    "DualHeadClassifierOutput": "hf_collapse.modeling.dual_head",
    "DualHeadDistillationConfig": "hf_collapse.trainers.dual_head_distillation",
    "DualHeadDistillationTrainer": "hf_collapse.trainers.dual_head_distillation",
    # robust Mamba-2
    "RobustMamba2Config": "hf_collapse.modeling.robust_mamba2",
    "RobustMamba2Model": "hf_collapse.modeling.robust_mamba2",
    "RobustMamba2ForCausalLM": "hf_collapse.modeling.robust_mamba2",
    "convert_mamba_ssm_checkpoint": "hf_collapse.modeling.robust_mamba2",
    "calibrate_state_norms": "hf_collapse.modeling.robust_mamba2",
    "recommended_training_length": "hf_collapse.modeling.robust_mamba2",
    # Air-Decoding
    "AttributePrefixConfig": "hf_collapse.trainers.attribute_prefix",
    "AttributePrefixTrainer": "hf_collapse.trainers.attribute_prefix",
    "AttributePrefixModel": "hf_collapse.processors.attribute_prefix_model",
    "AirDecodingLogitsProcessor": "hf_collapse.processors.air_decoding",
    "WeightedDecodingLogitsProcessor": "hf_collapse.processors.air_decoding",
    "HashedBowJudge": "hf_collapse.evals.sentiment_judge",
}

__all__ = ["__version__", "register", *_LAZY]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hf_collapse' has no attribute {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise AttributeError(f"hf_collapse.{name} is not available in this version ({module_name} missing)") from err
        raise
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover - for IDEs and type checkers only
    from .modeling.dual_head import (  # noqa: F401
        DualHeadConfig,
        DualHeadForImageClassification,
        DualHeadForSequenceClassification,
    )
    from .trainers.dual_head_distillation import DualHeadDistillationConfig, DualHeadDistillationTrainer  # noqa: F401

register()
