"""Dual-head classifier: config, registration, save/reload, pooling, to_single_head parity."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    ConvNextConfig,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
)

import hf_collapse  # noqa: F401  (registers the models)
from hf_collapse import DualHeadConfig, DualHeadForImageClassification, DualHeadForSequenceClassification


def tiny_resnet(**kw) -> ResNetConfig:
    return ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **kw)


def tiny_bert(**kw) -> BertConfig:
    return BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw,
    )  # fmt: skip


def test_config_accepts_object_or_dict_and_round_trips(tmp_path):
    c1 = DualHeadConfig(backbone_config=tiny_resnet(), num_labels=4, aux_head="linear")
    c2 = DualHeadConfig(backbone_config=tiny_resnet().to_dict(), num_labels=4, aux_head="linear")
    assert c1.backbone_config.to_dict() == c2.backbone_config.to_dict()
    c1.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, DualHeadConfig)
    assert loaded.backbone_config.model_type == "resnet" and loaded.backbone_config.hidden_sizes == [8, 16]
    assert loaded.num_labels == 4 and loaded.aux_head == "linear"
    assert DualHeadConfig.keys_to_ignore_at_inference == ["aux_logits"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"aux_head": "transformer"}, "aux_head"),
        ({"aux_hidden_size": 0}, "aux_hidden_size"),
        ({"pooling": "max"}, "pooling"),
        ({"backbone_config": {"hidden_size": 4}}, "model_type"),
    ],
)
def test_bad_config_raises(kwargs, match):
    kwargs.setdefault("backbone_config", tiny_resnet())
    with pytest.raises(ValueError, match=match):
        DualHeadConfig(**kwargs)


def test_auto_classes_and_outputs(save_and_reload):
    cfg = DualHeadConfig(backbone_config=tiny_resnet(), num_labels=3)
    model = AutoModelForImageClassification.from_config(cfg)
    assert isinstance(model, DualHeadForImageClassification)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 1])
    out = model(pixel_values=x, labels=y)
    assert out.logits.shape == out.aux_logits.shape == (4, 3)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, y))
    model.eval()
    reloaded = save_and_reload(model, AutoModelForImageClassification).eval()
    assert isinstance(reloaded, DualHeadForImageClassification)
    torch.testing.assert_close(reloaded(pixel_values=x).logits, model(pixel_values=x).logits)
    torch.testing.assert_close(reloaded(pixel_values=x).aux_logits, model(pixel_values=x).aux_logits)


def test_heads_shapes():
    m = DualHeadForImageClassification(DualHeadConfig(backbone_config=tiny_resnet(), num_labels=5, aux_head="mlp"))
    assert isinstance(m.classifier, torch.nn.Linear) and m.classifier.in_features == 16
    kinds = [type(x).__name__ for x in m.aux_classifier]
    assert kinds == ["Linear", "Dropout", "BatchNorm1d", "ReLU", "Linear"] and m.aux_classifier[0].out_features == 200
    lin = DualHeadForImageClassification(DualHeadConfig(backbone_config=tiny_resnet(), num_labels=5, aux_head="linear"))
    assert isinstance(lin.aux_classifier, torch.nn.Linear)


def test_sequence_classifier_registered_and_mean_pooling(save_and_reload):
    cfg = DualHeadConfig(backbone_config=tiny_bert(), num_labels=2, pooling="mean", aux_head="linear")
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    assert isinstance(model, DualHeadForSequenceClassification)
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    out = model(input_ids=ids, attention_mask=mask)
    hidden = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = torch.stack([hidden[0].mean(0), hidden[1, :4].mean(0)])
    torch.testing.assert_close(out.logits, model.classifier(pooled))
    reloaded = save_and_reload(model, AutoModelForSequenceClassification).eval()
    torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, out.logits)


def test_to_single_head_resnet_identical_logits(tmp_path):
    model = DualHeadForImageClassification.from_backbone(tiny_resnet(), num_labels=3).eval()
    single = model.to_single_head().eval()
    assert type(single) is ResNetForImageClassification
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(single(pixel_values=x).logits, model(pixel_values=x).logits)
    # deployable without hf-collapse: it is a plain transformers checkpoint
    single.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "resnet"


def test_to_single_head_bert_and_vit():
    seq = DualHeadForSequenceClassification.from_backbone(tiny_bert(), num_labels=2).eval()
    ids = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(seq.to_single_head().eval()(input_ids=ids).logits, seq(input_ids=ids).logits)

    vit_cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32)  # fmt: skip
    vit = DualHeadForImageClassification.from_backbone(vit_cfg, num_labels=3, pooling="cls").eval()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(vit.to_single_head().eval()(pixel_values=x).logits, vit(pixel_values=x).logits)


def test_to_single_head_unsupported_family_names_it():
    cfg = ConvNextConfig(num_channels=1, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1])
    model = DualHeadForImageClassification.from_backbone(cfg, num_labels=3)
    with pytest.raises(NotImplementedError, match="convnext"):
        model.to_single_head()


def test_from_backbone_copies_pretrained_weights():
    teacher = ResNetForImageClassification(tiny_resnet(num_labels=3))
    model = DualHeadForImageClassification.from_backbone(teacher, num_labels=3, aux_head="linear")
    for name, p in teacher.resnet.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[name], p)
    bert = BertModel(tiny_bert())
    seq = DualHeadForSequenceClassification.from_backbone(bert, num_labels=2)
    torch.testing.assert_close(seq.backbone.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match=r"DualHeadConfig\.aux_hidden_size must be an integer >= 1, got '200'"):
        DualHeadConfig(backbone_config=ResNetConfig(), aux_hidden_size="200")
    with pytest.raises(ValueError, match="aux_dropout"):
        DualHeadConfig(backbone_config=ResNetConfig(), aux_dropout=float("nan"))


def test_feature_size_that_does_not_fit_the_backbone_says_so():
    backbone = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    model = DualHeadForImageClassification(DualHeadConfig(backbone_config=backbone, num_labels=3, feature_size=32))
    with pytest.raises(ValueError, match="16-wide features but the heads expect 32"):
        model(pixel_values=torch.randn(2, 1, 28, 28))


def test_misspelt_config_field_gets_a_suggestion():
    with pytest.raises(TypeError, match="did you mean 'aux_hidden_size'"):
        DualHeadConfig(backbone_config=ResNetConfig(), aux_hiden_size=100)
