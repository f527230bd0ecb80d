"""Attribute prefixes: the concept module (checkpoint reader/writer, prefixed forward) and AttributePrefixTrainer (one
PEFT prefix per attribute, checkpoint layout, model card, init_text, GA equivalence, errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from air_decoding_utils import manual_prefixed_logits, tiny_gpt2, tiny_llama, tiny_tokenizer, toy_dataset
from datasets import Dataset
from huggingface_hub import ModelCard
from peft import PeftModel

import hf_collapse
from hf_collapse import AttributePrefixConfig, AttributePrefixModel, AttributePrefixTrainer
from hf_collapse.model_cards import make_model_card
from hf_collapse.modeling import attribute_prefixes as ap
from hf_collapse.modeling import checkpoint_utils
from hf_collapse.modeling.attribute_prefixes import flat_prefix_to_layers
from hf_collapse.modeling.checkpoint_utils import CorruptCheckpointError


def _args(tmp_path, **kw) -> AttributePrefixConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        attributes=["positive", "negative"],
        num_virtual_tokens=4,
        encoder_hidden_size=16,
        per_device_train_batch_size=4,
        max_steps=8,
        learning_rate=1e-2,
        logging_steps=1,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return AttributePrefixConfig(**base)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_train_save_and_load_with_plain_peft(make, tmp_path):
    base = make()
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    trainer = AttributePrefixTrainer(
        model=base, args=_args(tmp_path), train_dataset=toy_dataset(), processing_class=tiny_tokenizer()
    )
    before = {n: p.detach().clone() for n, p in trainer.model.encoders.named_parameters()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    # the LM is frozen, the prefixes moved
    for n, p in base.named_parameters():
        assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.encoders.named_parameters())

    ckpt = tmp_path / "prefixes"
    trainer.save_model(str(ckpt))
    index = json.loads((ckpt / "attribute_prefixes.json").read_text())
    assert index["attributes"] == ["positive", "negative"]
    assert index["num_virtual_tokens"] == 4
    assert "base_model" in index and index["hf_collapse_version"]
    card = ModelCard.load(ckpt / "README.md")  # from hub_cards/attribute_prefixes.md
    assert card.data.library_name == "hf-collapse" and "air-decoding" in card.data.tags
    assert (
        card.data.pipeline_tag == "text-generation"
        and card.data.model_name == "air-decoding-prefixes-positive-negative"
    )
    assert card.data.base_model is None  # a model built in memory has no Hub id
    assert "(positive, negative)" in card.text and "Prefix length 4." in card.text
    assert 'AttributePrefixModel.from_pretrained(base, "air-decoding-prefixes-positive-negative")' in card.text
    assert 'AirDecodingLogitsProcessor(attr, target="positive"' in card.text
    # the conditioning trained with ("[eos] + text") is recorded, and AttributePrefixModel applies it itself
    start = tiny_tokenizer().eos_token_id
    assert index["start_token_id"] == start and index["start_text"] == tiny_tokenizer().eos_token
    ids = torch.tensor([tiny_tokenizer()("the movie was great")["input_ids"]])
    with_start = torch.cat([torch.tensor([[start]]), ids], 1)
    am = AttributePrefixModel.from_pretrained(base, ckpt)
    assert am.attributes == ["positive", "negative"] and am.prefix_length == 5
    ours = am(ids).logits
    for k, attr in enumerate(["positive", "negative"]):
        assert sorted(os.listdir(ckpt / attr)) == ["adapter_config.json", "adapter_model.safetensors"]
        pm = PeftModel.from_pretrained(base, str(ckpt / attr))  # plain PEFT, nothing of ours
        with torch.no_grad():
            ref = pm(input_ids=with_start, use_cache=False).logits
        torch.testing.assert_close(ours[k, 0], ref[0, 1:], atol=1e-5, rtol=1e-5)
    # a prompt that already starts with the start token is not given a second one
    first, _ = am.begin(ids)
    again, _ = am.begin(with_start)
    torch.testing.assert_close(again, first, atol=1e-5, rtol=1e-5)
    # trained prefix logits equal the training module's own forward on what it trained with
    with torch.no_grad():
        train_out = trainer.model(input_ids=with_start, attribute_ids=torch.tensor([1])).logits
    torch.testing.assert_close(ours[1, 0], train_out[0, 1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("projection", [True, False])
def test_init_text_copies_the_base_models_key_values(make, projection, tmp_path):
    base = make()
    tok = tiny_tokenizer()
    trainer = AttributePrefixTrainer(
        model=base,
        args=_args(tmp_path, init_text="the movie was", prefix_projection=projection),
        train_dataset=toy_dataset(),
        processing_class=tok,
    )
    phrase = tok("the movie was", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([(phrase * 2)[:4]])
    with torch.no_grad():
        cache = base(input_ids=ids, use_cache=True).cache
        for i in range(2):
            flat = trainer.model.flat_prefix(i)[None]
            for (k, v), layer in zip(flat_prefix_to_layers(flat, trainer.model.shape), cache.layers):
                torch.testing.assert_close(k, layer.keys, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(v, layer.values, atol=1e-4, rtol=1e-4)


def test_unknown_attribute_values_raise(tmp_path):
    ds = Dataset.from_dict({"text": ["good", "bad", "meh"], "attribute": ["positive", "negative", "neutral"]})
    with pytest.raises(ValueError, match=r"unknown attribute values.*'neutral'.*configured attributes.*positive"):
        AttributePrefixTrainer(
            model=tiny_gpt2(), args=_args(tmp_path), train_dataset=ds, processing_class=tiny_tokenizer()
        )
    with pytest.raises(ValueError, match="no column 'label'"):
        AttributePrefixTrainer(
            model=tiny_gpt2(),
            args=_args(tmp_path, attribute_column="label"),
            train_dataset=ds,
            processing_class=tiny_tokenizer(),
        )
    with pytest.raises(ValueError, match="folder name"):
        _args(tmp_path, attributes=["a/b", "c"])


@pytest.mark.parametrize(
    "texts, attrs, attributes, message",
    [
        (["good", "  "], ["positive", "negative"], ["positive", "negative"], "1 train row.*empty.*row 1"),
        (["good", "fine"], ["positive", "positive"], ["positive", "negative"], r"\['negative'\] have no rows"),
        ([], [], ["positive", "negative"], "dataset is empty"),
    ],
)
def test_trainer_refuses_data_it_cannot_learn_from(tmp_path, texts, attrs, attributes, message):
    ds = Dataset.from_dict({"text": texts, "attribute": attrs})
    with pytest.raises(ValueError, match=message):
        AttributePrefixTrainer(model=tiny_gpt2(), args=_args(tmp_path, attributes=attributes), train_dataset=ds,
                               processing_class=tiny_tokenizer())  # fmt: skip


@pytest.mark.parametrize("attributes", [["positive"], [], ["positive", "positive"]])
def test_config_needs_two_distinct_attributes(tmp_path, attributes):
    with pytest.raises(ValueError, match="two attributes|duplicate"):
        _args(tmp_path, attributes=attributes)


def test_config_numbers_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"AttributePrefixConfig\.num_virtual_tokens must be an integer >= 1"):
        _args(tmp_path, num_virtual_tokens=0)
    with pytest.raises(ValueError, match=r"AttributePrefixConfig\.max_length"):
        _args(tmp_path, max_length=1)
    for bad in (float("nan"), -0.5):
        with pytest.raises(ValueError, match=r"AttributePrefixConfig\.discriminative_weight"):
            _args(tmp_path, discriminative_weight=bad)
    with pytest.raises(ValueError, match="init_prefixes needs prefix_projection=False"):
        _args(tmp_path, init_prefixes=str(tmp_path), prefix_projection=True)


@pytest.mark.parametrize(
    "index, message",
    [
        ({"attributes": ["../x", "positive"]}, "folder name"),
        ({"attributes": ["/abs", "positive"]}, "folder name"),
        ({"attributes": ["positive", "positive"]}, "duplicate"),
        ({"attributes": ["positive"]}, "two attributes"),
        ({"attributes": []}, "two attributes"),
        ({}, "'attributes' must be a list"),
        ({"attributes": ["positive", "neutral"]}, "neutral.*missing"),
    ],
)
def test_bad_index_is_refused_on_load(tmp_path, index, message):
    from air_decoding_utils import make_checkpoint

    ckpt = make_checkpoint(tiny_gpt2(), tmp_path / "ckpt")
    (ckpt / "attribute_prefixes.json").write_text(json.dumps(index))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        AttributePrefixModel.from_pretrained(tiny_gpt2(), ckpt)
    (ckpt / "attribute_prefixes.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        AttributePrefixModel.from_pretrained(tiny_gpt2(), ckpt)


def test_default_strength_is_recorded_checked_and_exposed(tmp_path):
    """The strength a publisher evaluated travels in the index; a bad one stops at the writer and at the reader."""
    base = tiny_gpt2()
    cfg, flats = _random_prefixes(base, ["positive", "negative"])
    ckpt = ap.write_attribute_prefixes(tmp_path / "ckpt", ["positive", "negative"], flats, cfg,
                                       extra_index={"default_strength": 60})  # fmt: skip
    assert AttributePrefixModel.from_pretrained(base, ckpt).default_strength == 60.0
    for bad in (float("nan"), -1.0, True, "60"):
        with pytest.raises(ValueError, match="default_strength must be"):
            ap.write_attribute_prefixes(tmp_path / "bad", ["positive", "negative"], flats, cfg,
                                        extra_index={"default_strength": bad})  # fmt: skip
        assert not (tmp_path / "bad").exists()
    index = json.loads((ckpt / "attribute_prefixes.json").read_text())
    for bad in (-1, "60", float("inf")):
        (ckpt / "attribute_prefixes.json").write_text(json.dumps({**index, "default_strength": bad}))
        with pytest.raises(ValueError, match="attribute_prefixes.json.*default_strength must be"):
            AttributePrefixModel.from_pretrained(base, ckpt)
    (ckpt / "attribute_prefixes.json").write_text(json.dumps({k: v for k, v in index.items() if k != "default_strength"}))
    assert AttributePrefixModel.from_pretrained(base, ckpt).default_strength is None


def test_prefixes_of_another_model_are_refused_before_generate(tmp_path):
    from air_decoding_utils import make_checkpoint

    ckpt = make_checkpoint(tiny_gpt2(n_layer=2), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="trained for another model.*2 layers"):
        AttributePrefixModel.from_pretrained(tiny_gpt2(n_layer=3), ckpt)


def test_each_row_trains_only_its_own_prefix(tmp_path):
    ds = Dataset.from_dict({"text": ["the movie was great"] * 8 + ["bad"], "attribute": ["positive"] * 8 + ["negative"]})
    trainer = AttributePrefixTrainer(
        model=tiny_gpt2(), args=_args(tmp_path, max_steps=3), train_dataset=ds, processing_class=tiny_tokenizer()
    )
    # the trainer refuses an attribute without data; train on the positive rows only to see who gets gradient
    trainer.train_dataset = trainer.train_dataset.filter(lambda row: row["attribute_ids"] == 0)
    neg_before = trainer.model.flat_prefix(1).detach().clone()
    pos_before = trainer.model.flat_prefix(0).detach().clone()
    trainer.train()
    torch.testing.assert_close(trainer.model.flat_prefix(1).detach(), neg_before, atol=0, rtol=0)
    assert not torch.allclose(trainer.model.flat_prefix(0).detach(), pos_before)


@pytest.mark.parametrize("discriminative_weight", [0.0, 0.5])
def test_gradient_accumulation_equals_larger_batch(discriminative_weight, tmp_path):
    # texts of very different lengths: a per-micro-batch mean would weight tokens differently than the big batch
    texts = ["great", "the movie was great and the acting was wonderful fun", "bad", "i hated this film very very bad"]
    ds = Dataset.from_dict({"text": texts * 2, "attribute": ["positive", "positive", "negative", "negative"] * 2})

    def run(bs, ga):
        trainer = AttributePrefixTrainer(
            model=tiny_gpt2(),
            args=_args(
                tmp_path,
                per_device_train_batch_size=bs,
                gradient_accumulation_steps=ga,
                max_steps=1,
                optim="sgd",
                learning_rate=1.0,
                max_grad_norm=0.0,
                lr_scheduler_type="constant",
                weight_decay=0.0,
                init_text=None,
                discriminative_weight=discriminative_weight,
            ),
            train_dataset=ds,
            processing_class=tiny_tokenizer(),
        )
        trainer.train()
        return [trainer.model.flat_prefix(i).detach() for i in range(2)], trainer.state.log_history[0]["loss"]

    (big, big_loss), (acc, acc_loss) = run(4, 1), run(2, 2)
    for a, b in zip(big, acc):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert big_loss == pytest.approx(acc_loss, rel=1e-5)


TORCHRUN_SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, {tests!r})
from air_decoding_utils import tiny_gpt2, tiny_tokenizer, toy_dataset
from hf_collapse import AttributePrefixConfig, AttributePrefixTrainer
ws = int(os.environ.get("WORLD_SIZE", "1"))
args = AttributePrefixConfig(output_dir={out!r}, attributes=["positive", "negative"], num_virtual_tokens=4,
    encoder_hidden_size=16, per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2, use_cpu=True,
    save_strategy="no", ddp_backend="gloo" if ws > 1 else None, disable_tqdm=True)
tr = AttributePrefixTrainer(model=tiny_gpt2(), args=args, train_dataset=toy_dataset(), processing_class=tiny_tokenizer())
tr.train()
print("WORLD", tr.args.world_size, type(tr.model_wrapped).__name__)
tr.save_model({ckpt!r})
"""


@pytest.mark.slow
def test_torchrun_two_processes_save_one_checkpoint(tmp_path):
    script = tmp_path / "train.py"
    ckpt = tmp_path / "ckpt"
    script.write_text(
        TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "out"), ckpt=str(ckpt))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # the two ranks print at the same time, so their lines can interleave: count the pieces
    assert res.stdout.count("WORLD") == 2 and res.stdout.count(" 2 DistributedDataParallel") == 2
    assert sorted(os.listdir(ckpt)) == [
        "README.md",
        "attribute_prefixes.json",
        "negative",
        "positive",
        "training_args.bin",
    ]
    AttributePrefixModel.from_pretrained(tiny_gpt2(), ckpt)


def test_evaluate_reports_the_token_mean_loss(tmp_path):
    trainer = AttributePrefixTrainer(
        model=tiny_gpt2(),
        args=_args(tmp_path),
        train_dataset=toy_dataset(),
        eval_dataset=toy_dataset(1),
        processing_class=tiny_tokenizer(),
    )
    metrics = trainer.evaluate()
    assert 0 < metrics["eval_loss"] < 10


@pytest.mark.parametrize("name,expected", [("org/tiny-gpt2", "org/tiny-gpt2"), ("ABS", None)])
def test_model_card_names_only_hub_base_models(name, expected, tmp_path):
    base = tiny_gpt2()
    base.name_or_path = str(tmp_path / "local-lm") if name == "ABS" else name
    trainer = AttributePrefixTrainer(
        model=base, args=_args(tmp_path), train_dataset=toy_dataset(1), processing_class=tiny_tokenizer()
    )
    trainer.save_model(str(tmp_path / "ckpt"))
    card = ModelCard.load(tmp_path / "ckpt" / "README.md")
    assert card.data.base_model == expected
    # the index records the name as given (it is what the prefixes were trained on), the card's YAML only a Hub id
    index = json.loads((tmp_path / "ckpt" / "attribute_prefixes.json").read_text())
    assert index["base_model"] == base.name_or_path
    if expected is None:
        assert str(tmp_path) not in card.content
    else:
        assert f'AutoModelForCausalLM.from_pretrained("{expected}")' in card.text


# ----------------------------------------------------------------------------------------------- the concept module
def _random_prefixes(base, attributes, p=4, seed=0):
    """A PEFT config for ``base`` and one random flat prefix ``(P, L*2*token_dim)`` per attribute."""
    cfg = ap.peft_prefix_config(base, p, encoder_hidden_size=16)
    shape = ap.PrefixShape.from_peft_config(cfg)
    g = torch.Generator().manual_seed(seed)
    return cfg, {a: torch.randn(p, shape.flat_dim, generator=g) for a in attributes}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_checkpoint_writer_reader_round_trip(tmp_path):
    base = tiny_llama()
    cfg, flats = _random_prefixes(base, ["positive", "negative"])
    card = make_model_card("attribute_prefixes", model_id="m", attributes="positive, negative")
    out = ap.write_attribute_prefixes(
        tmp_path / "ckpt", ["positive", "negative"], flats, cfg, base_model="org/tiny-llama", model_card=card,
        extra_index={"start_text": "<eos>"},
    )  # fmt: skip
    assert out == tmp_path / "ckpt"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging folder left
    assert sorted(os.listdir(out)) == ["README.md", "attribute_prefixes.json", "negative", "positive"]
    index, prefixes, shape = ap.read_attribute_prefixes(out)
    assert index == {
        "format": ap.CHECKPOINT_FORMAT,
        "attributes": ["positive", "negative"],
        "base_model": "org/tiny-llama",
        "num_virtual_tokens": 4,
        "hf_collapse_version": hf_collapse.__version__,
        "start_text": "<eos>",
    }
    assert list(prefixes) == ["positive", "negative"]
    for a in prefixes:
        torch.testing.assert_close(prefixes[a], flats[a], atol=0, rtol=0)
    # GQA: the prefix holds the 2 key/value heads, not the 4 query heads
    assert shape == ap.PrefixShape(num_virtual_tokens=4, num_layers=2, num_heads=2, head_dim=8)
    adapter = json.loads((out / "positive" / ap.ADAPTER_CONFIG).read_text())
    assert adapter["inference_mode"] is True and adapter["base_model_name_or_path"] == "org/tiny-llama"
    assert ModelCard.load(out / "README.md").data.model_name == "m"

    # overwrite with fewer attributes: the dropped attribute's folder goes, files that are not the checkpoint's stay
    (out / "training_args.bin").write_bytes(b"x")
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "optimizer.pt").write_bytes(b"y")
    ap.write_attribute_prefixes(out, ["negative", "neutral"], [flats["positive"], flats["negative"]], cfg)
    assert sorted(os.listdir(out)) == [
        "README.md",  # no new card given: the old one is kept
        "attribute_prefixes.json",
        "checkpoint-5",
        "negative",
        "neutral",
        "training_args.bin",
    ]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    ckpt = ap.read_attribute_prefixes(out)
    assert ckpt.attributes == ["negative", "neutral"] and ckpt.index["base_model"] == ""  # the in-memory model's empty name
    torch.testing.assert_close(ckpt.prefixes["negative"], flats["positive"], atol=0, rtol=0)


def test_writer_and_reader_reject_malformed_input(tmp_path):
    base = tiny_gpt2()
    cfg, flats = _random_prefixes(base, ["a", "b"])
    with pytest.raises(ValueError, match="folder name"):
        ap.write_attribute_prefixes(tmp_path / "x", ["../a"], [flats["a"]], cfg)
    with pytest.raises(ValueError, match="shape"):
        ap.write_attribute_prefixes(tmp_path / "x", ["a", "b"], [flats["a"][:2], flats["b"]], cfg)
    with pytest.raises(ValueError, match="own keys"):
        ap.write_attribute_prefixes(tmp_path / "x", ["a", "b"], flats, cfg, extra_index={"attributes": []})
    with pytest.raises(ValueError, match="two attributes"):
        ap.write_attribute_prefixes(tmp_path / "x", ["a"], [flats["a"]], cfg)
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError, match="not an attribute-prefix checkpoint"):
        ap.read_attribute_prefixes(tmp_path)
    ckpt = ap.write_attribute_prefixes(tmp_path / "ckpt", ["a", "b"], flats, cfg)
    (ckpt / "b" / ap.ADAPTER_WEIGHTS).write_bytes((ckpt / "b" / ap.ADAPTER_WEIGHTS).read_bytes()[:-8])
    with pytest.raises(CorruptCheckpointError, match="adapter_model.safetensors"):
        ap.read_attribute_prefixes(ckpt)


class _FailOnCall:
    """Wraps a function; the ``n``-th call raises (once), the others go through."""

    def __init__(self, fn, n):
        self.fn, self.n, self.calls = fn, n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise OSError("disk full (simulated)")
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("where", ["second safetensors file", "carrying other files over", "swapping in"])
def test_failed_write_leaves_the_old_checkpoint_byte_identical(where, tmp_path, monkeypatch):
    base = tiny_gpt2()
    cfg, old = _random_prefixes(base, ["positive", "negative"], seed=0)
    card = make_model_card("attribute_prefixes", model_id="old", attributes="positive, negative")
    ckpt = ap.write_attribute_prefixes(tmp_path / "ckpt", ["positive", "negative"], old, cfg, model_card=card)
    (ckpt / "training_args.bin").write_bytes(b"keep me")
    before = _snapshot(tmp_path)
    _, new = _random_prefixes(base, ["positive", "negative", "neutral"], seed=1)
    new_card = make_model_card("attribute_prefixes", model_id="new", attributes="positive, negative, neutral")
    if where == "second safetensors file":
        monkeypatch.setattr(ap, "save_file", _FailOnCall(ap.save_file, 2))
    elif where == "carrying other files over":  # training_args.bin is hard-linked into the new folder
        monkeypatch.setattr(checkpoint_utils, "_link_tree", _FailOnCall(checkpoint_utils._link_tree, 1))
    else:
        monkeypatch.setattr(checkpoint_utils, "_exchange", _FailOnCall(checkpoint_utils._exchange, 1))
    with pytest.raises(OSError, match="simulated"):
        ap.write_attribute_prefixes(ckpt, ["positive", "negative", "neutral"], new, cfg, model_card=new_card)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before  # same files, same bytes
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging or backup folder left
    index, prefixes, _ = ap.read_attribute_prefixes(ckpt)
    assert index["attributes"] == ["positive", "negative"]
    torch.testing.assert_close(prefixes["negative"], old["negative"], atol=0, rtol=0)

    # a failed first save leaves nothing at all
    monkeypatch.setattr(ap, "save_file", _FailOnCall(ap.save_file, 2))
    with pytest.raises(OSError, match="simulated"):
        ap.write_attribute_prefixes(tmp_path / "fresh", ["positive", "negative"], old, cfg)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_prefixed_forward_equals_peft_forward(make, tmp_path):
    base = make()
    cfg, flats = _random_prefixes(base, ["positive", "negative"])
    ckpt = ap.write_attribute_prefixes(tmp_path / "ckpt", ["positive", "negative"], flats, cfg)
    shape = ap.PrefixShape.from_peft_config(cfg)
    tok = tiny_tokenizer()
    long, short = tok("the movie was great and")["input_ids"], tok("i hated this")["input_ids"]
    pad = len(long) - len(short)
    # row 0 under "positive", row 1 left-padded under "negative": per-row prefixes in one forward
    ids = torch.tensor([long, [1] * pad + short])
    mask = torch.tensor([[1] * len(long), [0] * pad + [1] * len(short)])
    layers = ap.flat_prefix_to_layers(torch.stack([flats["positive"], flats["negative"]]), shape)
    with torch.no_grad():
        out = ap.prefixed_forward(base, ids, shape.num_virtual_tokens, prefix=layers, attention_mask=mask).logits
        plain = base(input_ids=ids[:1]).logits
    ref_pos = manual_prefixed_logits(base, str(ckpt / "positive"), ids[:1])
    ref_neg = manual_prefixed_logits(base, str(ckpt / "negative"), torch.tensor([short]))
    torch.testing.assert_close(out[0], ref_pos[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, pad:], ref_neg[0], atol=1e-5, rtol=1e-5)
    assert (out[0] - plain[0]).abs().max() > 1e-2  # the prefix was not silently dropped

    # continuing a cache gives the same logits as the one-shot forward
    with torch.no_grad():
        first = ap.prefixed_forward(
            base, ids[:, :-2], shape.num_virtual_tokens, prefix=layers, attention_mask=mask[:, :-2], use_cache=True
        )
        rest = ap.prefixed_forward(
            base, ids[:, -2:], shape.num_virtual_tokens, cache=first.cache, attention_mask=mask, use_cache=True
        )
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        ap.prefixed_forward(base, ids, shape.num_virtual_tokens)


@pytest.mark.parametrize(
    "name", ["smollm2-135m-sentiment-prefixes", "smollm2-135m-topic-prefixes", "smollm2-135m-detox-prefixes"]
)
def test_bundled_checkpoints_load_with_the_concept_reader(name):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(__file__).resolve().parents[1] / "checkpoints" / name
    index, prefixes, shape = ap.read_attribute_prefixes(path)
    assert index["start_text"] == "<|endoftext|>" and list(prefixes) == index["attributes"]
    assert shape == ap.PrefixShape(num_virtual_tokens=20, num_layers=30, num_heads=3, head_dim=64)
    # a tiny random LM with SmolLM2-135M's key/value geometry (30 layers, 3 KV heads of 64) stands in for it
    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=32, num_hidden_layers=30, num_attention_heads=3,
                    num_key_value_heads=3, head_dim=64)
    ).eval()  # fmt: skip
    am = AttributePrefixModel.from_pretrained(lm, path)
    assert am.attributes == index["attributes"]
    # the demo and `hf-collapse generate` steer at the strength the card evaluates
    assert am.default_strength == {"sentiment": 140.0, "topic": 60.0, "detox": 120.0}[name.split("-")[2]]
    assert am(torch.tensor([[3, 4, 5]])).logits.shape == (len(prefixes), 1, 3, 50)


# a child process that keeps rewriting one attribute-prefix checkpoint, alternating 2 and 3 attributes
_PREFIX_SAVER = """
import sys, torch
from air_decoding_utils import tiny_gpt2
from hf_collapse.modeling import attribute_prefixes as ap
base = tiny_gpt2()
cfg = ap.peft_prefix_config(base, 64)
shape = ap.PrefixShape.from_peft_config(cfg)
print("ready", flush=True)
version = 0
while True:
    version += 1
    attrs = ["a", "b", "c"][: 2 + version % 2]
    flats = [torch.full((shape.num_virtual_tokens, shape.flat_dim), float(version)) for _ in attrs]
    ap.write_attribute_prefixes(sys.argv[1], attrs, flats, cfg, extra_index={"version": version})
"""


def test_kill_during_prefix_save_leaves_old_or_new_never_a_mix(tmp_path):
    import time

    target = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    seen = set()
    for delay in (0.05, 0.2, 0.4, 0.7, 1.0):
        proc = subprocess.Popen([sys.executable, "-c", _PREFIX_SAVER, str(target)], stdout=subprocess.PIPE, text=True,
                                env=env)  # fmt: skip
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        if (target / "attribute_prefixes.json").exists():
            ckpt = ap.read_attribute_prefixes(target)
            version = ckpt.index["version"]
            assert ckpt.attributes == ["a", "b", "c"][: 2 + version % 2]
            assert {float(t.unique()) for t in ckpt.prefixes.values()} == {float(version)}
            on_disk = sorted(p.name for p in target.iterdir() if p.is_dir())
            assert on_disk == ckpt.attributes, "a folder of another version is left beside the index"
            seen.add(version)
    assert seen, "no save finished before any kill"


def test_sequence_log_likelihood_matches_peft_and_the_gate_uses_it(tmp_path):
    """log p_k(text) sums PEFT's own per-token log-probs (start token included); the gate takes the argmax."""
    from hf_collapse.evals.prefix_gate import prefix_gate

    base, tok = tiny_gpt2(), tiny_tokenizer()
    cfg, flats = _random_prefixes(base, ["positive", "negative"])
    ckpt = ap.write_attribute_prefixes(tmp_path / "ckpt", ["positive", "negative"], flats, cfg,
                                       extra_index={"start_token_id": tok.eos_token_id})  # fmt: skip
    am = AttributePrefixModel.from_pretrained(base, ckpt)
    texts = ["the movie was great", "i hated this"]
    ids = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    batch = torch.tensor([[0] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    scores = am.sequence_log_likelihood(batch, mask)
    for k, attr in enumerate(am.attributes):
        pm = PeftModel.from_pretrained(base, str(ckpt / attr))
        for r, x in enumerate(ids):
            full = torch.tensor([[tok.eos_token_id, *x]])
            with torch.no_grad():
                lp = torch.log_softmax(pm(input_ids=full, use_cache=False).logits[0].double(), -1)
            expected = sum(float(lp[i, full[0, i + 1]]) for i in range(len(x)))
            assert abs(float(scores[k, r]) - expected) < 1e-3, (attr, r)
    labels = [am.attributes[int(i)] for i in scores.argmax(0)]
    gate = prefix_gate(am, tok, texts, labels)
    assert gate["accuracy"] == 1.0 and gate["predictions"] == labels
    flipped = prefix_gate(am, tok, texts, [("negative" if y == "positive" else "positive") for y in labels])
    assert flipped["accuracy"] == 0.0
    with pytest.raises(ValueError, match="not attributes"):
        prefix_gate(am, tok, texts, ["happy", "sad"])


def test_training_resumes_from_a_checkpoint_exactly(tmp_path):
    """8 steps in one run equal 4 steps, a stop, and 4 more resumed from checkpoint-4 in a new trainer (the prefix
    MLP, the optimizer and the data order all restored)."""

    def trainer(out):
        return AttributePrefixTrainer(
            model=tiny_gpt2(),
            args=_args(tmp_path, output_dir=str(out), per_device_train_batch_size=2, save_strategy="steps",
                       save_steps=4, init_text=None),  # fmt: skip
            train_dataset=toy_dataset(),
            processing_class=tiny_tokenizer(),
        )

    straight = trainer(tmp_path / "straight")
    straight.train()
    from transformers import TrainerCallback

    class StopAt4(TrainerCallback):  # a run killed after its first checkpoint
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 4

    first = trainer(tmp_path / "stopped")
    first.add_callback(StopAt4())
    first.train()
    ckpt = tmp_path / "stopped" / "checkpoint-4"
    assert (ckpt / "prefix_encoders.safetensors").is_file() and (ckpt / "attribute_prefixes.json").is_file()
    resumed = trainer(tmp_path / "stopped")
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 8
    for i in range(2):
        torch.testing.assert_close(resumed.model.flat_prefix(i), straight.model.flat_prefix(i), rtol=1e-5, atol=1e-6)
    # the final save is a plain attribute-prefix checkpoint: no training state in it
    resumed.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "prefix_encoders.safetensors").exists()


def test_resume_refuses_a_folder_without_training_state(tmp_path):
    t = AttributePrefixTrainer(model=tiny_gpt2(), args=_args(tmp_path, init_text=None), train_dataset=toy_dataset(),
                               processing_class=tiny_tokenizer())  # fmt: skip
    t.save_model(str(tmp_path / "checkpoint-1"))  # looks like a checkpoint, written by save_model...
    (tmp_path / "checkpoint-1" / "prefix_encoders.safetensors").unlink()  # ...but without the training state
    with pytest.raises(FileNotFoundError, match="prefix_encoders.safetensors"):
        t._load_from_checkpoint(str(tmp_path / "checkpoint-1"))


def test_early_stopping_keeps_the_best_prefixes(tmp_path):
    from transformers import EarlyStoppingCallback

    t = AttributePrefixTrainer(
        model=tiny_gpt2(),
        args=_args(tmp_path, init_text=None, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                   load_best_model_at_end=True, metric_for_best_model="eval_loss", max_steps=12),  # fmt: skip
        train_dataset=toy_dataset(),
        eval_dataset=toy_dataset(1),
        processing_class=tiny_tokenizer(),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=2)],
    )
    t.train()
    best = t.state.best_model_checkpoint
    assert best is not None
    reference = ap.read_attribute_prefixes(best).prefixes
    for i, attr in enumerate(t.model.attributes):
        torch.testing.assert_close(t.model.flat_prefix(i).detach(), reference[attr])


def test_only_the_writer_rank_saves(tmp_path, monkeypatch):
    """transformers calls _save on every DDP rank; a non-writer rank must write nothing (two writers raced)."""
    t = AttributePrefixTrainer(model=tiny_gpt2(), args=_args(tmp_path, init_text=None), train_dataset=toy_dataset(),
                               processing_class=tiny_tokenizer())  # fmt: skip
    monkeypatch.setattr(type(t.args), "should_save", property(lambda self: False))
    t.save_model(str(tmp_path / "not_written"))
    assert not (tmp_path / "not_written").exists()


def test_hybrid_loss_matches_a_reference_built_from_peft(tmp_path):
    """discriminative_weight: token-mean NLL under each text's own prefix plus w x the cross-entropy of a softmax
    over attributes of the summed log-likelihoods, each log-probability taken from plain PEFT models."""
    base, tok = tiny_gpt2(), tiny_tokenizer()
    w = 0.7
    texts = ["the movie was great fun", "bad", "i hated this film", "wonderful acting"]
    attrs = ["positive", "negative", "negative", "positive"]
    trainer = AttributePrefixTrainer(
        model=base,
        args=_args(tmp_path, init_text=None, prefix_projection=False, discriminative_weight=w),
        train_dataset=Dataset.from_dict({"text": texts, "attribute": attrs}),
        processing_class=tok,
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # random prefixes large enough that the attributes disagree
        for enc in trainer.model.encoders.values():
            enc.embedding.weight.copy_(torch.randn(enc.embedding.weight.shape, generator=g))
    trainer.save_model(str(tmp_path / "ckpt"))
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss, out = trainer.compute_loss(trainer.model, inputs, return_outputs=True)

    loglik = torch.zeros(2, 4, dtype=torch.float64)
    for k, attr in enumerate(trainer.args.attributes):
        pm = PeftModel.from_pretrained(base, str(tmp_path / "ckpt" / attr))
        for r, row in enumerate(trainer.train_dataset):
            full = torch.tensor([row["input_ids"]])  # the start token, then the text
            with torch.no_grad():
                lp = torch.log_softmax(pm(input_ids=full, use_cache=False).logits[0].double(), -1)
            loglik[k, r] = sum(lp[i, full[0, i + 1]] for i in range(full.shape[1] - 1))
    own = torch.tensor([trainer.args.attributes.index(a) for a in attrs])
    targets = sum(len(row["input_ids"]) - 1 for row in trainer.train_dataset)
    generative = -loglik[own, torch.arange(4)].sum() / targets
    classification = torch.nn.functional.cross_entropy(loglik.T, own)
    assert float(classification) > 0.05  # the check below would not see a wrong sign or a missing term otherwise
    assert float(loss) == pytest.approx(float(generative + w * classification), rel=1e-4)
    # the outputs returned are each row's under its own prefix, as without the discriminative term
    trainer.args.discriminative_weight = 0.0
    _, plain_out = trainer.compute_loss(trainer.model, inputs, return_outputs=True)
    torch.testing.assert_close(out.logits, plain_out.logits, atol=1e-5, rtol=1e-5)


def test_hybrid_training_raises_the_implied_classifiers_accuracy(tmp_path):
    """With the classification term the prefixes learn to tell the attributes apart (the point of the option)."""
    from hf_collapse.evals.prefix_gate import prefix_gate

    ds = toy_dataset(4)
    tok = tiny_tokenizer()

    def gate(w):
        t = AttributePrefixTrainer(
            model=tiny_gpt2(),
            args=_args(tmp_path, output_dir=str(tmp_path / f"w{w}"), prefix_projection=False, init_text=None,
                       discriminative_weight=w, max_steps=30, learning_rate=5e-2),  # fmt: skip
            train_dataset=ds,
            processing_class=tok,
        )
        t.train()
        if w:  # the two terms and the implied classifier's accuracy are logged beside the loss
            logged = [h for h in t.state.log_history if "loss" in h]
            assert all({"token_nll", "classification_loss", "implied_accuracy"} <= set(h) for h in logged)
            assert logged[-1]["implied_accuracy"] > logged[0]["implied_accuracy"]
            assert set(t.evaluate(t.train_dataset)) >= {"eval_loss", "eval_token_nll", "eval_implied_accuracy"}
        t.save_model(str(tmp_path / f"w{w}"))
        am = AttributePrefixModel.from_pretrained(tiny_gpt2(), tmp_path / f"w{w}")
        return prefix_gate(am, tok, ds["text"], ds["attribute"])["accuracy"]

    # on these 24 texts the generative loss alone leaves the classifier at 0.83 (and a wrong sign drops it to 0.25)
    assert gate(1.0) == 1.0 > gate(0.0)


def test_init_prefixes_starts_from_a_checkpoint(tmp_path):
    base, tok = tiny_gpt2(), tiny_tokenizer()
    cfg, flats = _random_prefixes(base, ["positive", "negative"])
    ckpt = ap.write_attribute_prefixes(tmp_path / "ckpt", ["positive", "negative"], flats, cfg)
    # another attribute order: prefixes are matched by name
    t = AttributePrefixTrainer(
        model=base,
        args=_args(tmp_path, attributes=["negative", "positive"], prefix_projection=False, init_prefixes=str(ckpt)),
        train_dataset=toy_dataset(),
        processing_class=tok,
    )
    for i, attr in enumerate(["negative", "positive"]):
        torch.testing.assert_close(t.model.flat_prefix(i).detach(), flats[attr], atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"attributes \['positive', 'negative'\].*same attribute names"):
        AttributePrefixTrainer(
            model=tiny_gpt2(),
            args=_args(tmp_path, attributes=["happy", "sad"], prefix_projection=False, init_prefixes=str(ckpt)),
            train_dataset=Dataset.from_dict({"text": ["a", "b"], "attribute": ["happy", "sad"]}),
            processing_class=tok,
        )
    with pytest.raises(ValueError, match="prefix shape.*num_virtual_tokens"):
        AttributePrefixTrainer(
            model=tiny_gpt2(),
            args=_args(tmp_path, num_virtual_tokens=3, prefix_projection=False, init_prefixes=str(ckpt)),
            train_dataset=toy_dataset(),
            processing_class=tok,
        )
    with pytest.raises(FileNotFoundError, match="not an attribute-prefix checkpoint"):
        AttributePrefixTrainer(
            model=tiny_gpt2(),
            args=_args(tmp_path, prefix_projection=False, init_prefixes=str(tmp_path)),
            train_dataset=toy_dataset(),
            processing_class=tok,
        )
