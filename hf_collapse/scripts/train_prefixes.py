"""`hf-collapse train-prefixes`: train one PEFT prefix per attribute (Air-Decoding's prefix-conditional LMs).

    hf-collapse train-prefixes --model M --data train.jsonl --attributes positive negative --output_dir prefixes \
        --num_train_epochs 1 --per_device_train_batch_size 8 --learning_rate 1e-2

Options are `TrainPrefixesScriptArguments` (the base model and the data file) and every field of
`AttributePrefixConfig` under its `TrainingArguments` name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .utils import CommandError, parse_args

__all__ = ["TrainPrefixesScriptArguments", "main"]


@dataclass
class TrainPrefixesScriptArguments:
    """The base model and the training data of `hf-collapse train-prefixes`."""

    model: str = field(metadata={"help": "Base causal LM (name or path); it stays frozen."})
    data: str = field(metadata={"help": "JSON-lines file with one text and one attribute per line."})

    def __post_init__(self) -> None:
        if not Path(self.data).is_file():
            raise CommandError(f"--data {self.data!r} is not a file")


def main(argv: Sequence[str]) -> int:
    """Entry point of `hf-collapse train-prefixes`."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..trainers.attribute_prefix import AttributePrefixConfig, AttributePrefixTrainer

    script_args, config = parse_args([TrainPrefixesScriptArguments, AttributePrefixConfig], argv,
                                     prog="hf-collapse train-prefixes")  # fmt: skip
    ds = load_dataset("json", data_files=script_args.data, split="train")
    tok = AutoTokenizer.from_pretrained(script_args.model)
    model = AutoModelForCausalLM.from_pretrained(script_args.model)
    trainer = AttributePrefixTrainer(model=model, args=config, train_dataset=ds, processing_class=tok)
    trainer.train()
    trainer.save_model(config.output_dir)
    print(f"saved attribute prefixes {config.attributes} to {config.output_dir}")
    return 0
