"""hf-collapse: fixes for three collapses, as Hugging Face Transformers components.

* Attribute collapse (Air-Decoding): `AirDecodingLogitsProcessor`, `AttributePrefixTrainer`, and the fused
  `AirDecodingForCausalLM` (generator and attribute prefixes in one forward per step).
* State collapse in Mamba-2 (Stuffed Mamba): `RobustMamba2ForCausalLM`.
* Head collapse in knowledge distillation (Dual-Head KD): `DualHeadForImageClassification`,
  `DualHeadDistillationTrainer`.

`import hf_collapse` registers every config and model with the `Auto*` classes, which imports the modeling
packages (transformers' Auto mappings need the classes themselves). Everything else (processors, trainers, metrics,
evaluations, the command line) is imported on first attribute access.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from .registration import register
from .version import __version__

# public name -> module that defines it (imported on first access)
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
    "precompute_teacher_logits": "hf_collapse.trainers.teacher_logits",
    # robust Mamba-2
    "RobustMamba2Config": "hf_collapse.modeling.robust_mamba2",
    "RobustMamba2Model": "hf_collapse.modeling.robust_mamba2",
    "RobustMamba2ForCausalLM": "hf_collapse.modeling.robust_mamba2",
    "RobustMamba2Cache": "hf_collapse.modeling.robust_mamba2",
    "convert_mamba_ssm_checkpoint": "hf_collapse.modeling.robust_mamba2",
    "calibrate_state_norms": "hf_collapse.modeling.robust_mamba2",
    "calibrate_decay_scales": "hf_collapse.modeling.robust_mamba2",
    "recommended_training_length": "hf_collapse.modeling.robust_mamba2",
    # Air-Decoding
    "AttributePrefixConfig": "hf_collapse.trainers.attribute_prefix",
    "AttributePrefixTrainer": "hf_collapse.trainers.attribute_prefix",
    "AttributePrefixModel": "hf_collapse.processors.attribute_prefix_model",
    "AirDecodingLogitsProcessor": "hf_collapse.processors.air_decoding",
    "AirDecodingConfig": "hf_collapse.modeling.air_decoding",
    "AirDecodingForCausalLM": "hf_collapse.modeling.air_decoding",
    "WeightedDecodingLogitsProcessor": "hf_collapse.processors.air_decoding",
    # Hub
    "make_model_card": "hf_collapse.model_cards",
    "export_for_hub": "hf_collapse.hub",
    "push": "hf_collapse.hub",
}

# names that left the top-level API: still importable from here, with a warning that says where they live now
_MOVED: dict[str, str] = {"HashedBowJudge": "hf_collapse.evals.sentiment_judge"}

__all__ = ["__version__", "register", *_LAZY]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None and name in _MOVED:
        module_name = _MOVED[name]
        warnings.warn(
            f"hf_collapse.{name} is deprecated; import it from {module_name} instead.", FutureWarning, stacklevel=2
        )
        return getattr(importlib.import_module(module_name), name)
    if module_name is None:
        raise AttributeError(f"module 'hf_collapse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover - for IDEs and type checkers only
    from .hub import export_for_hub, push  # noqa: F401
    from .model_cards import make_model_card  # noqa: F401
    from .modeling.air_decoding import AirDecodingConfig, AirDecodingForCausalLM  # noqa: F401
    from .modeling.dual_head import (  # noqa: F401
        DualHeadClassifierOutput,
        DualHeadConfig,
        DualHeadForImageClassification,
        DualHeadForSequenceClassification,
        DualHeadModel,
        DualHeadPreTrainedModel,
    )
    from .modeling.robust_mamba2 import (  # noqa: F401
        RobustMamba2Cache,
        RobustMamba2Config,
        RobustMamba2ForCausalLM,
        RobustMamba2Model,
        calibrate_decay_scales,
        calibrate_state_norms,
        convert_mamba_ssm_checkpoint,
        recommended_training_length,
    )
    from .processors.air_decoding import AirDecodingLogitsProcessor, WeightedDecodingLogitsProcessor  # noqa: F401
    from .processors.attribute_prefix_model import AttributePrefixModel  # noqa: F401
    from .trainers.attribute_prefix import AttributePrefixConfig, AttributePrefixTrainer  # noqa: F401
    from .trainers.dual_head_distillation import DualHeadDistillationConfig, DualHeadDistillationTrainer  # noqa: F401
    from .trainers.teacher_logits import precompute_teacher_logits  # noqa: F401

register()
