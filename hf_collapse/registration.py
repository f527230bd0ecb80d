"""Registration of hf-collapse configs and models with transformers' `Auto*` classes."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["register", "REGISTRY"]


@dataclass(frozen=True)
class _Entry:
    module: str  # module that defines the classes
    config: str  # config class name; its `model_type` is the registry key
    models: tuple[tuple[str, str], ...]  # (transformers Auto class, model class name)


REGISTRY: tuple[_Entry, ...] = (
    _Entry(
        "hf_collapse.modeling.dual_head",
        "DualHeadConfig",
        (
            ("AutoModel", "DualHeadModel"),
            ("AutoModelForImageClassification", "DualHeadForImageClassification"),
            ("AutoModelForSequenceClassification", "DualHeadForSequenceClassification"),
        ),
    ),
    _Entry(
        "hf_collapse.modeling.robust_mamba2",
        "RobustMamba2Config",
        (("AutoModel", "RobustMamba2Model"), ("AutoModelForCausalLM", "RobustMamba2ForCausalLM")),
    ),
    _Entry(
        "hf_collapse.modeling.air_decoding",
        "AirDecodingConfig",
        (("AutoModelForCausalLM", "AirDecodingForCausalLM"),),
    ),
)


def register() -> list[str]:
    """Register every hf-collapse config and model with `AutoConfig` and the `AutoModel*` classes.

    transformers' Auto mappings hold classes, not names, so this imports the modeling packages. Safe to call
    any number of times (`exist_ok=True`); `import hf_collapse` calls it once.

    Returns:
        The `model_type` strings that are registered.
    """
    import transformers

    registered = []
    for entry in REGISTRY:
        module = importlib.import_module(entry.module)
        config_cls = getattr(module, entry.config)
        transformers.AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for auto_name, model_name in entry.models:
            getattr(transformers, auto_name).register(config_cls, getattr(module, model_name), exist_ok=True)
        registered.append(config_cls.model_type)
    return registered
