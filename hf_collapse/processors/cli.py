"""``hf-collapse train-prefixes`` and ``hf-collapse generate`` (Air-Decoding).

Examples::

    hf-collapse train-prefixes --model M --data train.jsonl --attributes positive,negative --output prefixes
    hf-collapse generate --model M --prefixes prefixes --attribute positive --strength 140 --num-samples 5 "The movie"
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class TrainPrefixesArguments:
    """Train one PEFT prefix per attribute on a JSON-lines file with a text and an attribute column."""

    model: str = field(metadata={"help": "Base causal LM (name or path); it stays frozen."})
    data: str = field(metadata={"help": "JSON-lines file with one text and one attribute per line."})
    attributes: str = field(metadata={"help": "Comma-separated attribute names, e.g. positive,negative."})
    output: str = field(metadata={"help": "Directory for the attribute-prefix checkpoint."})
    text_column: str = field(default="text", metadata={"help": "Field holding the text."})
    attribute_column: str = field(default="attribute", metadata={"help": "Field holding the attribute."})
    num_virtual_tokens: int = field(default=20, metadata={"help": "Prefix length P."})
    init_text: str = field(
        default="The following text is", metadata={"help": "Initialise prefixes from this phrase ('' = random)."}
    )
    max_length: int = field(default=128, metadata={"help": "Truncate texts to this many tokens."})
    epochs: float = field(default=1.0, metadata={"help": "Training epochs."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many steps (-1: use epochs)."})
    learning_rate: float = field(default=1e-2, metadata={"help": "Learning rate (1e-2 suits init_text)."})
    batch_size: int = field(default=8, metadata={"help": "Per-device batch size."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    seed: int = field(default=42, metadata={"help": "Random seed."})


@dataclass
class GenerateArguments:
    """Generate text steered toward an attribute with Air-Decoding. Prompts are the positional arguments."""

    model: str = field(metadata={"help": "Generating causal LM (name or path)."})
    prefixes: str = field(metadata={"help": "Attribute-prefix checkpoint directory (from train-prefixes)."})
    attribute: str = field(metadata={"help": "Target attribute."})
    strength: float = field(default=140.0, metadata={"help": "Control strength lambda (>= 0)."})
    num_samples: int = field(default=5, metadata={"help": "Samples per prompt."})
    max_new_tokens: int = field(default=50, metadata={"help": "Tokens to generate."})
    top_k: int = field(default=200, metadata={"help": "Top-k sampling after the processor (official: 200)."})
    method: str = field(default="air", metadata={"help": "air (Air-Decoding) or weighted (naive baseline)."})
    normalize: bool = field(default=False, metadata={"help": "Normalise w_i over the vocabulary (paper's text)."})
    attribute_model: str | None = field(
        default=None, metadata={"help": "Base LM of the prefixes if it is not --model (same vocabulary)."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed."})


def train_prefixes_main(argv: Sequence[str]) -> int:
    from transformers import HfArgumentParser

    (a,) = HfArgumentParser(TrainPrefixesArguments, prog="hf-collapse train-prefixes").parse_args_into_dataclasses(
        list(argv)
    )
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..trainers.attribute_prefix import AttributePrefixConfig, AttributePrefixTrainer

    attributes = [x.strip() for x in a.attributes.split(",") if x.strip()]
    ds = load_dataset("json", data_files=a.data, split="train")
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    args = AttributePrefixConfig(
        output_dir=a.output,
        attributes=attributes,
        text_column=a.text_column,
        attribute_column=a.attribute_column,
        num_virtual_tokens=a.num_virtual_tokens,
        init_text=a.init_text or None,
        max_length=a.max_length,
        num_train_epochs=a.epochs,
        max_steps=a.max_steps,
        learning_rate=a.learning_rate,
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.gradient_accumulation_steps,
        seed=a.seed,
        save_strategy="no",
        logging_steps=10,
    )
    trainer = AttributePrefixTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    trainer.save_model(a.output)
    print(f"saved attribute prefixes {attributes} to {a.output}")
    return 0


def generate_main(argv: Sequence[str]) -> int:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(GenerateArguments, prog="hf-collapse generate")
    a, prompts = parser.parse_args_into_dataclasses(list(argv), return_remaining_strings=True)
    unknown = [p for p in prompts if p.startswith("--")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not prompts:
        parser.error('give at least one prompt, e.g. hf-collapse generate ... "The movie"')
    if a.method not in ("air", "weighted"):
        parser.error("--method must be air or weighted")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .air_decoding import AirDecodingLogitsProcessor, WeightedDecodingLogitsProcessor
    from .attribute_prefix_model import AttributePrefixModel

    tok = AutoTokenizer.from_pretrained(a.model)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.model).eval()
    attr_base = model if a.attribute_model is None else AutoModelForCausalLM.from_pretrained(a.attribute_model)
    am = AttributePrefixModel.from_pretrained(attr_base, a.prefixes)
    cls = AirDecodingLogitsProcessor if a.method == "air" else WeightedDecodingLogitsProcessor
    torch.manual_seed(a.seed)
    for prompt in prompts:
        enc = tok([prompt], return_tensors="pt")
        proc = cls(am, a.attribute, a.strength, prompt_attention_mask=enc["attention_mask"], normalize=a.normalize)
        out = model.generate(
            **enc,
            logits_processor=[proc],
            do_sample=True,
            top_k=a.top_k,
            top_p=1.0,
            max_new_tokens=a.max_new_tokens,
            num_return_sequences=a.num_samples,
            pad_token_id=tok.pad_token_id,
        )
        for row in out:
            print(tok.decode(row, skip_special_tokens=True).replace("\n", " "))
        print()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(generate_main(sys.argv[1:]))
