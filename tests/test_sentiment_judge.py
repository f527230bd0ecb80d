"""HashedBowJudge: learns a separable toy task, round-trips through safetensors, rejects corrupt files."""

from __future__ import annotations

import pytest

from hf_collapse.evals.sentiment_judge import HashedBowJudge
from hf_collapse.modeling.checkpoint_utils import CorruptCheckpointError


def test_fit_predict_save_load(tmp_path):
    pos = ["a great film", "wonderful and great", "great acting, wonderful story"] * 20
    neg = ["a terrible film", "awful and boring", "terrible acting, boring story"] * 20
    judge = HashedBowJudge(["negative", "positive"], n_buckets=1024)
    judge.fit(pos + neg, ["positive"] * len(pos) + ["negative"] * len(neg), epochs=5)
    assert judge.predict(["great story", "boring film"]) == ["positive", "negative"]
    judge.save_pretrained(tmp_path / "j")
    assert sorted(p.name for p in (tmp_path / "j").iterdir()) == ["judge_config.json", "model.safetensors"]
    again = HashedBowJudge.from_pretrained(tmp_path / "j")
    assert again.predict(["great story", "boring film"]) == ["positive", "negative"]
    w = tmp_path / "j" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        HashedBowJudge.from_pretrained(tmp_path / "j")


def test_unknown_label_raises():
    with pytest.raises(ValueError, match="not among"):
        HashedBowJudge(["a", "b"], n_buckets=16).fit(["x"], ["c"])


def _tiny_classifier(tmp_path, id2label):
    """A random 2-layer BERT sequence classifier with a word-level tokenizer, saved to a folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "great", "boring", "film", "story"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]")
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, num_labels=len(id2label), id2label=id2label,
                     label2id={v: k for k, v in id2label.items()})  # fmt: skip
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return model, tok


def test_sequence_classifier_judge_matches_the_model_and_load_judge_picks_the_kind(tmp_path):
    import torch

    from hf_collapse.evals.sentiment_judge import SequenceClassifierJudge, load_judge

    model, tok = _tiny_classifier(tmp_path / "clf", {0: "negative", 1: "positive"})
    texts = ["great film", "boring story film", "great", "film story great boring"]
    judge = load_judge(tmp_path / "clf", labels=("positive", "negative"))
    assert isinstance(judge, SequenceClassifierJudge) and judge.labels == ["negative", "positive"]
    judge.batch_size = 3  # two batches, the second padded differently
    with torch.no_grad():
        expect = [model(**tok([t], return_tensors="pt")).logits.softmax(-1)[0] for t in texts]
    torch.testing.assert_close(judge.predict_proba(texts), torch.stack(expect), atol=1e-5, rtol=1e-5)
    assert judge.predict(texts) == [judge.labels[int(e.argmax())] for e in expect]

    bow = HashedBowJudge(["negative", "positive"], n_buckets=16)
    bow.save_pretrained(tmp_path / "bow")
    assert isinstance(load_judge(tmp_path / "bow"), HashedBowJudge)
    with pytest.raises(FileNotFoundError, match="neither judge_config.json"):
        load_judge(tmp_path)
    _tiny_classifier(tmp_path / "topic", {0: "world", 1: "sports"})
    with pytest.raises(ValueError, match=r"predicts \['world', 'sports'\], not \['positive', 'negative'\]"):
        load_judge(tmp_path / "topic", labels=("positive", "negative"))
