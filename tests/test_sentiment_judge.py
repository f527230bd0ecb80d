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
