"""AttributePrefixTrainer: one PEFT prefix per attribute, checkpoint layout, init_text, GA equivalence, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from air_decoding_utils import tiny_gpt2, tiny_llama, tiny_tokenizer, toy_dataset
from datasets import Dataset
from huggingface_hub import ModelCard
from peft import PeftModel

from hf_collapse import AttributePrefixConfig, AttributePrefixModel, AttributePrefixTrainer


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
    card = ModelCard.load(ckpt / "README.md")
    assert card.data.library_name == "hf-collapse" and "air-decoding" in card.data.tags
    ids = torch.tensor([tiny_tokenizer()("the movie was great")["input_ids"]])
    am = AttributePrefixModel.from_pretrained(base, ckpt)
    assert am.attributes == ["positive", "negative"]
    ours = am(ids).logits
    for k, attr in enumerate(["positive", "negative"]):
        assert sorted(os.listdir(ckpt / attr)) == ["adapter_config.json", "adapter_model.safetensors"]
        pm = PeftModel.from_pretrained(base, str(ckpt / attr))  # plain PEFT, nothing of ours
        with torch.no_grad():
            ref = pm(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(ours[k, 0], ref[0], atol=1e-5, rtol=1e-5)
    # trained prefix logits equal the training module's own forward
    with torch.no_grad():
        train_out = trainer.model(input_ids=ids, attribute_ids=torch.tensor([1])).logits
    torch.testing.assert_close(ours[1, 0], train_out[0], atol=1e-5, rtol=1e-5)


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
            from hf_collapse.processors.attribute_prefix_model import flat_prefix_to_layers

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
        _args(tmp_path, attributes=["a/b"])


def test_each_row_trains_only_its_own_prefix(tmp_path):
    ds = Dataset.from_dict({"text": ["the movie was great"] * 8, "attribute": ["positive"] * 8})
    trainer = AttributePrefixTrainer(
        model=tiny_gpt2(), args=_args(tmp_path, max_steps=3), train_dataset=ds, processing_class=tiny_tokenizer()
    )
    neg_before = trainer.model.flat_prefix(1).detach().clone()
    pos_before = trainer.model.flat_prefix(0).detach().clone()
    trainer.train()
    torch.testing.assert_close(trainer.model.flat_prefix(1).detach(), neg_before, atol=0, rtol=0)
    assert not torch.allclose(trainer.model.flat_prefix(0).detach(), pos_before)


def test_gradient_accumulation_equals_larger_batch(tmp_path):
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
    assert res.stdout.count("WORLD 2 DistributedDataParallel") == 2
    assert sorted(os.listdir(ckpt)) == [
        "README.md",
        "attribute_prefixes.json",
        "negative",
        "positive",
        "training_args.bin",
    ]
    AttributePrefixModel.from_pretrained(tiny_gpt2(), ckpt)


def test_cli_train_prefixes_then_generate(tmp_path, capsys):
    from hf_collapse.cli import main

    model_dir = tmp_path / "lm"
    tiny_gpt2().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    toy_dataset().to_json(str(data))
    out = tmp_path / "prefixes"
    rc = main(
        [
            "train-prefixes",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--attributes",
            "positive,negative",
            "--output",
            str(out),
            "--num-virtual-tokens",
            "4",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
        ]
    )
    assert rc == 0 and (out / "attribute_prefixes.json").is_file()
    rc = main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--prefixes",
            str(out),
            "--attribute",
            "positive",
            "--strength",
            "140",
            "--num-samples",
            "2",
            "--max-new-tokens",
            "4",
            "the movie",
        ]
    )
    assert rc == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("the movie")]
    assert len(lines) == 2


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
