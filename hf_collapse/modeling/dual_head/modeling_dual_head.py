"""Dual-head classifiers (Yang et al., "Dual-Head Knowledge Distillation", arXiv 2411.08937).

Any transformers backbone, two heads on one pooled feature:

    pixel_values / input_ids -> backbone -> pooled feature (B, d) -> classifier      -> logits      (B, C)
                                                                  -> aux_classifier  -> aux_logits  (B, C)

Only `logits` (the main head) is used for prediction. The auxiliary head exists so that a logit-level distillation
loss can shape the shared features without pulling the main linear classifier away from the probability-level loss
("head collapse").
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from ..checkpoint_utils import SafeCheckpointMixin
from .configuration_dual_head import DualHeadConfig

__all__ = [
    "DualHeadClassifierOutput",
    "DualHeadPreTrainedModel",
    "DualHeadModel",
    "DualHeadForImageClassification",
    "DualHeadForSequenceClassification",
]


@dataclass
class DualHeadClassifierOutput(ModelOutput):
    """Output of a dual-head classifier.

    Args:
        loss: cross-entropy of the main head, when `labels` are given.
        logits: `(batch, num_labels)` main-head logits, the ones to predict with.
        aux_logits: `(batch, num_labels)` auxiliary-head logits (training only; ignored by `Trainer.predict`).
        hidden_states: backbone hidden states when `output_hidden_states=True`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    aux_logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def _build_aux_head(config: DualHeadConfig, d: int) -> nn.Module:
    if config.aux_head == "linear":
        return nn.Linear(d, config.num_labels)
    # The official CIFAR head: a small MLP, so the aux head can fit raw teacher logits without a linear constraint.
    return nn.Sequential(
        nn.Linear(d, config.aux_hidden_size),
        nn.Dropout(config.aux_dropout),
        nn.BatchNorm1d(config.aux_hidden_size),
        nn.ReLU(),
        nn.Linear(config.aux_hidden_size, config.num_labels),
    )


class DualHeadPreTrainedModel(SafeCheckpointMixin, PreTrainedModel):
    """Shared code: the backbone, pooling, weight init, safe save/load with a model card."""

    config_class = DualHeadConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    model_card_kind = "dual_head_classifier"

    def __init__(self, config: DualHeadConfig) -> None:
        super().__init__(config)
        if config.backbone_config is None:
            raise ValueError("DualHeadConfig.backbone_config is required to build a dual-head classifier.")
        self.backbone = AutoModel.from_config(config.backbone_config)
        self._backbone_args = set(inspect.signature(self.backbone.forward).parameters)
        self._build_heads(config)
        self.post_init()

    def _build_heads(self, config: DualHeadConfig) -> None:
        """Classifier subclasses add their heads here."""

    def model_card_facts(self) -> dict[str, Any]:
        return {
            "model_id": self.config.name_or_path or "dual-head-classifier",
            "aux_head": self.config.aux_head,
            "pipeline_tag": "image-classification" if self.main_input_name == "pixel_values" else "text-classification",
        }

    def _init_weights(self, module: nn.Module) -> None:
        # The heads keep PyTorch's default init (the official code's), not the 0.02-normal of transformer LMs.
        # Backbone submodules are PreTrainedModels and are dispatched to their own _init_weights.
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight.shape[1])
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.BatchNorm1d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)

    # ----------------------------------------------------------------------------------------------- pooling
    def _pool(self, outputs: Any, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Pooled feature `(B, d)` from backbone outputs, per `config.pooling` (documented in DualHeadConfig)."""
        mode = self.config.pooling
        pooled = getattr(outputs, "pooler_output", None)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        if mode == "pooler" or (mode == "auto" and pooled is not None):
            if pooled is None:
                raise ValueError(f"pooling='pooler' but the {self.config.backbone_config.model_type} backbone returns none.")
            return pooled.flatten(1)  # ResNet returns (B, C, 1, 1)
        if hidden.dim() == 4 and mode in ("auto", "avg"):  # (B, C, H, W) feature map
            return hidden.mean(dim=(2, 3))
        if hidden.dim() == 3:  # (B, T, D) sequence
            if mode in ("auto", "cls"):
                return hidden[:, 0]
            if mode == "mean":
                if attention_mask is None:
                    return hidden.mean(dim=1)
                m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
                return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        raise ValueError(f"pooling={mode!r} does not apply to a backbone output of shape {tuple(hidden.shape)}.")

    def _run_backbone(self, **kwargs: Any) -> Any:
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k in self._backbone_args}
        return self.backbone(**kwargs, return_dict=True)

    @classmethod
    def from_backbone(
        cls,
        backbone_or_path: PreTrainedModel | Any | str,
        num_labels: int,
        aux_head: str = "mlp",
        **config_kwargs: Any,
    ) -> DualHeadPreTrainedModel:
        """Build a dual-head model around a backbone.

        Args:
            backbone_or_path: a pretrained transformers model (its base model is used, e.g. the `ResNetModel` inside a
                `ResNetForImageClassification`), a path or Hub id loadable with `AutoModel.from_pretrained`, or a
                backbone *config* (random initialisation).
            num_labels: number of classes of both heads.
            aux_head: `"linear"` or `"mlp"`, see `DualHeadConfig`.
            **config_kwargs: other `DualHeadConfig` fields (`aux_hidden_size`, `pooling`, `id2label`, ...).
        """
        from transformers import PretrainedConfig

        if isinstance(backbone_or_path, PretrainedConfig):
            config = DualHeadConfig(backbone_config=backbone_or_path, num_labels=num_labels, aux_head=aux_head, **config_kwargs)
            return cls(config)
        if isinstance(backbone_or_path, str):
            backbone_or_path = AutoModel.from_pretrained(backbone_or_path)
        if not isinstance(backbone_or_path, PreTrainedModel):
            raise TypeError(f"from_backbone expects a PreTrainedModel, a path or a config, got {type(backbone_or_path)}")
        backbone = backbone_or_path.base_model
        bc = backbone.config.__class__.from_dict(backbone.config.to_dict())
        config = DualHeadConfig(backbone_config=bc, num_labels=num_labels, aux_head=aux_head, **config_kwargs)
        model = cls(config)
        missing, _ = model.backbone.load_state_dict(backbone.state_dict(), strict=False)
        if missing:
            raise ValueError(f"from_backbone: backbone weights missing after load: {missing[:5]} ...")
        return model.to(next(backbone.parameters()).dtype)


class DualHeadModel(DualHeadPreTrainedModel):
    """The backbone and its pooling, without heads (registered with `AutoModel`).

    Returns `BaseModelOutputWithPooling` whose `pooler_output` `(B, d)` is the feature both heads read.
    """

    def __init__(self, config: DualHeadConfig) -> None:
        super().__init__(config)
        self.main_input_name = self.backbone.main_input_name

    def forward(self, return_dict: bool | None = None, **inputs: Any) -> BaseModelOutputWithPooling | tuple:
        outputs = self._run_backbone(**inputs)
        pooled = self._pool(outputs, inputs.get("attention_mask"))
        out = BaseModelOutputWithPooling(
            last_hidden_state=outputs[0], pooler_output=pooled, hidden_states=getattr(outputs, "hidden_states", None)
        )
        return out if return_dict is not False else out.to_tuple()


class _DualHeadClassifier(DualHeadPreTrainedModel):
    """Both heads, their outputs and `to_single_head`."""

    _task = ""

    def _build_heads(self, config: DualHeadConfig) -> None:
        d = config.get_feature_size()
        self.classifier = nn.Linear(d, config.num_labels)
        self.aux_classifier = _build_aux_head(config, d)

    def _heads(
        self,
        backbone_outputs: Any,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        return_dict: bool | None,
    ) -> DualHeadClassifierOutput | tuple:
        pooled = self._pool(backbone_outputs, attention_mask)  # (B, d)
        if pooled.shape[-1] != self.classifier.in_features:
            raise ValueError(
                f"the {self.config.backbone_config.model_type} backbone gives {pooled.shape[-1]}-wide features but the "
                f"heads expect {self.classifier.in_features} (config.feature_size={self.config.feature_size}); leave "
                f"feature_size unset to infer it, or set it to {pooled.shape[-1]}."
            )
        logits = self.classifier(pooled)  # (B, C)
        aux_logits = self.aux_classifier(pooled)  # (B, C)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels.view(-1))
        hidden_states = getattr(backbone_outputs, "hidden_states", None)
        out = DualHeadClassifierOutput(loss=loss, logits=logits, aux_logits=aux_logits, hidden_states=hidden_states)
        return out if return_dict is not False else out.to_tuple()

    def to_single_head(self) -> PreTrainedModel:
        """A plain transformers classifier with the backbone and the *main* head, giving identical logits.

        The result (e.g. `ResNetForImageClassification`, `BertForSequenceClassification`, `ViTForImageClassification`)
        has no dependency on hf-collapse and can be deployed as is.

        Raises:
            NotImplementedError: when the backbone family has no matching single-head class here.
            ValueError: when this model's pooling differs from what that class does, so logits could not match.
        """
        family = self.config.backbone_config.model_type
        spec = _SINGLE_HEAD.get((family, self._task))
        if spec is None:
            raise NotImplementedError(
                f"to_single_head: no plain transformers {self._task} classifier is mapped for backbone family "
                f"{family!r} (supported: {sorted(f for f, t in _SINGLE_HEAD if t == self._task)})."
            )
        cls_name, poolings, head_path = spec
        if self.config.pooling not in poolings:
            raise ValueError(
                f"to_single_head: {cls_name} pools with {poolings[-1]!r}; this model uses pooling={self.config.pooling!r}."
            )
        import transformers

        target_cls = getattr(transformers, cls_name)
        cfg = self.config.backbone_config.__class__.from_dict(self.config.backbone_config.to_dict())
        cfg.num_labels = self.config.num_labels
        cfg.id2label = dict(self.config.id2label)
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
        single = target_cls(cfg).to(self.dtype)
        missing, _ = single.base_model.load_state_dict(self.backbone.state_dict(), strict=False)
        if missing:
            raise ValueError(f"to_single_head: backbone weights did not map onto {cls_name}: {missing[:5]}")
        head = single.get_submodule(head_path)
        head.load_state_dict(self.classifier.state_dict())
        return single.to(self.device).train(self.training)


# (backbone model_type, task) -> (class name, poolings that match it, path of its final nn.Linear)
_SINGLE_HEAD: dict[tuple[str, str], tuple[str, tuple[str, ...], str]] = {
    ("resnet", "image"): ("ResNetForImageClassification", ("auto", "pooler"), "classifier.1"),
    ("vit", "image"): ("ViTForImageClassification", ("cls",), "classifier"),
    ("bert", "sequence"): ("BertForSequenceClassification", ("auto", "pooler"), "classifier"),
}


class DualHeadForImageClassification(_DualHeadClassifier):
    """Dual-head image classifier (registered with `AutoModelForImageClassification`)."""

    main_input_name = "pixel_values"
    _task = "image"

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> DualHeadClassifierOutput | tuple:
        """`pixel_values` `(B, C, H, W)`; `labels` `(B,)` class ids for the main head's cross-entropy."""
        outputs = self._run_backbone(pixel_values=pixel_values, output_hidden_states=output_hidden_states, **kwargs)
        return self._heads(outputs, None, labels, return_dict)


class DualHeadForSequenceClassification(_DualHeadClassifier):
    """Dual-head text classifier (registered with `AutoModelForSequenceClassification`)."""

    main_input_name = "input_ids"
    _task = "sequence"

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> DualHeadClassifierOutput | tuple:
        """`input_ids` `(B, T)`; `labels` `(B,)` class ids for the main head's cross-entropy."""
        outputs = self._run_backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        return self._heads(outputs, attention_mask, labels, return_dict)
