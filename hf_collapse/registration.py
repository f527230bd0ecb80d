"""Registration of hf-collapse configs and models with transformers' ``Auto*`` classes."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["register", "REGISTRY"]


@dataclass(frozen=True)
class _Entry:
    module: str  # module that defines the classes
    config: str  # config class name; its ``model_type`` is the registry key
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
)


def _available(module_name: str):
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # a component that is not built yet is skipped; a missing dependency inside it is a real error
        if err.name is not None and module_name.startswith(err.name):
            return None
        raise
    # a folder without __init__.py (namespace package) is a component still being written
    return module if getattr(module, "__file__", None) else None


def register() -> list[str]:
    """Register every hf-collapse config and model with ``AutoConfig`` and the ``AutoModel*`` classes.

    Safe to call any number of times (``exist_ok=True``). ``import hf_collapse`` calls it once.

    Returns:
        The ``model_type`` strings that are registered.
    """
    import transformers

    registered = []
    for entry in REGISTRY:
        module = _available(entry.module)
        if module is None:
            continue
        config_cls = getattr(module, entry.config)
        transformers.AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for auto_name, model_name in entry.models:
            getattr(transformers, auto_name).register(config_cls, getattr(module, model_name), exist_ok=True)
        registered.append(config_cls.model_type)
    return registered
