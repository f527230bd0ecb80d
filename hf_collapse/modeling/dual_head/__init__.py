"""Dual-head classifiers for Dual-Head Knowledge Distillation."""

from .configuration_dual_head import DualHeadConfig
from .modeling_dual_head import (
    DualHeadClassifierOutput,
    DualHeadForImageClassification,
    DualHeadForSequenceClassification,
    DualHeadModel,
    DualHeadPreTrainedModel,
)

__all__ = [
    "DualHeadConfig",
    "DualHeadClassifierOutput",
    "DualHeadPreTrainedModel",
    "DualHeadModel",
    "DualHeadForImageClassification",
    "DualHeadForSequenceClassification",
]
