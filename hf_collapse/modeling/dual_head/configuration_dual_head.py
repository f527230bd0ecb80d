"""Configuration of the dual-head classifier (Dual-Head Knowledge Distillation, Yang et al. 2024)."""

from __future__ import annotations

import inspect
from typing import Any

from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

from ...validation import check_known_fields, check_number

AUX_HEADS = ("linear", "mlp")
POOLINGS = ("auto", "pooler", "cls", "mean", "avg")


class DualHeadConfig(PretrainedConfig):
    r"""Configuration for [`DualHeadForImageClassification`] and [`DualHeadForSequenceClassification`].

    A dual-head classifier is any transformers backbone plus two classification heads on the same pooled feature:
    the *main* head (a plain `nn.Linear`, used for prediction, trained with the probability-level loss) and the
    *auxiliary* head (trained only with the logit-level distillation loss, dropped at inference).

    Args:
        backbone_config (`PretrainedConfig` or `dict`):
            Config of the backbone, anything `AutoModel.from_config` can build (`ResNetConfig`, `ViTConfig`,
            `BertConfig`, ...). A `dict` must carry `model_type` (the output of `config.to_dict()`). It is saved
            nested in `config.json`.
        aux_head (`str`, *optional*, defaults to `"mlp"`):
            `"linear"`: `Linear(d, num_labels)` (the paper's ImageNet head).
            `"mlp"`: `Linear(d, aux_hidden_size) -> Dropout(0.1) -> BatchNorm1d -> ReLU -> Linear(aux_hidden_size,
            num_labels)` (the paper's CIFAR head).
        aux_hidden_size (`int`, *optional*, defaults to 200):
            Width of the MLP auxiliary head.
        aux_dropout (`float`, *optional*, defaults to 0.1):
            Dropout inside the MLP auxiliary head.
        pooling (`str`, *optional*, defaults to `"auto"`):
            How the pooled feature is taken from the backbone output. `"auto"` uses `pooler_output` when the backbone
            returns one, else global average pooling for feature maps `(B, C, H, W)` and the first (CLS) token for
            sequences `(B, T, D)`. `"pooler"`, `"cls"`, `"mean"` (masked mean over the sequence) and `"avg"`
            (global average pooling of a feature map) force one of them.
        feature_size (`int`, *optional*):
            Width `d` of the pooled feature. Inferred from the backbone config (`hidden_sizes[-1]` or
            `hidden_size`) when not given.
        num_labels, id2label, label2id:
            As in every transformers classifier.
    """

    model_type = "dual_head_classifier"
    sub_configs = {"backbone_config": AutoConfig}
    # Trainer.predict / evaluate drop these output keys, so compute_metrics sees only the main head's logits.
    keys_to_ignore_at_inference = ["aux_logits"]

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict[str, Any] | None = None,
        aux_head: str = "mlp",
        aux_hidden_size: int = 200,
        aux_dropout: float = 0.1,
        pooling: str = "auto",
        feature_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(backbone_config, dict):
            backbone_config = dict(backbone_config)
            model_type = backbone_config.pop("model_type", None)
            if model_type is None:
                raise ValueError(
                    "DualHeadConfig: a dict backbone_config needs a 'model_type' key (pass config.to_dict() of a "
                    "transformers config, e.g. ResNetConfig().to_dict())."
                )
            if model_type not in CONFIG_MAPPING:
                raise ValueError(f"DualHeadConfig: unknown backbone model_type {model_type!r}.")
            backbone_config = CONFIG_MAPPING[model_type](**backbone_config)
        elif backbone_config is not None and not isinstance(backbone_config, PretrainedConfig):
            raise TypeError(
                f"DualHeadConfig: backbone_config must be a PretrainedConfig or its to_dict(), got {type(backbone_config)}"
            )
        if aux_head not in AUX_HEADS:
            raise ValueError(f"DualHeadConfig: aux_head must be one of {AUX_HEADS}, got {aux_head!r}.")
        aux_hidden_size = check_number("DualHeadConfig", "aux_hidden_size", aux_hidden_size, integer=True, minimum=1)
        aux_dropout = check_number("DualHeadConfig", "aux_dropout", aux_dropout, minimum=0.0, maximum=1.0,
                                   exclusive_maximum=True)  # fmt: skip
        feature_size = check_number("DualHeadConfig", "feature_size", feature_size, integer=True, minimum=1,
                                    allow_none=True)  # fmt: skip
        if pooling not in POOLINGS:
            raise ValueError(f"DualHeadConfig: pooling must be one of {POOLINGS}, got {pooling!r}.")
        # a keyword close to one of this config's own fields is a typo; PretrainedConfig's own keys pass through
        base_keys = {*inspect.signature(PretrainedConfig.__init__).parameters, *PretrainedConfig().to_dict(), "name_or_path"}
        own = [p for p in inspect.signature(DualHeadConfig.__init__).parameters if p not in ("self", "kwargs")]
        check_known_fields("DualHeadConfig", [k for k in kwargs if k not in base_keys], own)
        self.backbone_config = backbone_config
        self.aux_head = aux_head
        self.aux_hidden_size = aux_hidden_size
        self.aux_dropout = aux_dropout
        self.pooling = pooling
        self.feature_size = feature_size
        super().__init__(**kwargs)

    def get_feature_size(self) -> int:
        """Width of the pooled feature the two heads read."""
        if self.feature_size is not None:
            return int(self.feature_size)
        bc = self.backbone_config
        if bc is None:
            raise ValueError("DualHeadConfig: backbone_config is required to build a model.")
        hidden_sizes = getattr(bc, "hidden_sizes", None)
        if hidden_sizes:
            return int(hidden_sizes[-1])
        for name in ("hidden_size", "d_model", "dim"):
            if getattr(bc, name, None):
                return int(getattr(bc, name))
        raise ValueError(
            f"DualHeadConfig: cannot infer the feature width of a {bc.model_type!r} backbone; set feature_size."
        )
