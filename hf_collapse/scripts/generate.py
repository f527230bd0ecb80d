"""`hf-collapse generate`: sample text steered toward an attribute with Air-Decoding (or weighted decoding).

    hf-collapse generate --model M --prefixes prefixes --attribute positive --num_samples 5 "The movie"
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..validation import check_number
from .utils import CommandError, parse_args

__all__ = ["GenerateScriptArguments", "main", "METHODS", "PAPER_STRENGTH", "resolve_strength"]

METHODS = ("air", "weighted")
PAPER_STRENGTH = 140.0  # the official sentiment strength, for checkpoints that record none


def resolve_strength(given: float | None, default_strength: float | None) -> float:
    """The control strength to steer with: ``given`` (``--strength``) if set, else the checkpoint's
    ``default_strength``, else ``PAPER_STRENGTH``; says on stderr which one was taken when none was given."""
    if given is not None:
        return given
    if default_strength is None:
        strength, source = PAPER_STRENGTH, "the checkpoint records no default_strength: the paper's sentiment one"
    else:
        strength, source = default_strength, "the checkpoint's default_strength"
    print(f"--strength not given: lambda = {strength:g} ({source})", file=sys.stderr)
    return strength


@dataclass
class GenerateScriptArguments:
    """Generate text steered toward an attribute with Air-Decoding. Prompts are the positional arguments."""

    model: str = field(metadata={"help": "Generating causal LM (name or path)."})
    prefixes: str = field(metadata={"help": "Attribute-prefix checkpoint: a folder (from train-prefixes) or a Hub repository id."})
    attribute: str = field(metadata={"help": "Target attribute."})
    strength: float | None = field(
        default=None,
        metadata={"help": "Control strength lambda (>= 0). Default: the checkpoint's `default_strength` (the strength "
                  "its card evaluates), else 140 (the paper's sentiment strength)."},
    )  # fmt: skip
    num_samples: int = field(default=5, metadata={"help": "Samples per prompt."})
    max_new_tokens: int = field(default=50, metadata={"help": "Tokens to generate."})
    top_k: int = field(default=200, metadata={"help": "Top-k sampling after the processor (official: 200)."})
    method: str = field(default="air", metadata={"help": f"One of {METHODS}: Air-Decoding or the naive baseline."})
    normalize: bool = field(default=False, metadata={"help": "Normalise w_i over the vocabulary (paper's text)."})
    attribute_model: str | None = field(
        default=None, metadata={"help": "Base LM of the prefixes if it is not --model (same vocabulary)."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed."})

    def __post_init__(self) -> None:
        check_number("--", "strength", self.strength, minimum=0.0, allow_none=True)
        check_number("--", "num_samples", self.num_samples, integer=True, minimum=1)
        check_number("--", "max_new_tokens", self.max_new_tokens, integer=True, minimum=1)
        check_number("--", "top_k", self.top_k, integer=True, minimum=0)
        if self.method not in METHODS:
            raise CommandError(f"--method must be one of {METHODS}, got {self.method!r}")


def main(argv: Sequence[str]) -> int:
    """Entry point of `hf-collapse generate`."""
    args, prompts = parse_args([GenerateScriptArguments], argv, prog="hf-collapse generate",
                               return_remaining_strings=True)  # fmt: skip
    unknown = [p for p in prompts if p.startswith("--")]
    if unknown:
        raise CommandError(f"unrecognized arguments: {' '.join(unknown)}")
    if not prompts:
        raise CommandError('give at least one prompt, e.g. hf-collapse generate ... "The movie"')
    if any(not p.strip() for p in prompts):
        raise CommandError("a prompt is empty; give at least one word per prompt")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..processors.air_decoding import AirDecodingLogitsProcessor, WeightedDecodingLogitsProcessor
    from ..processors.attribute_prefix_model import AttributePrefixModel

    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    attr_base = model if args.attribute_model is None else AutoModelForCausalLM.from_pretrained(args.attribute_model)
    attr = AttributePrefixModel.from_pretrained(attr_base, args.prefixes)
    if args.attribute not in attr.attributes:
        raise CommandError(f"unknown --attribute {args.attribute!r}; {args.prefixes} has {attr.attributes}")
    cls = AirDecodingLogitsProcessor if args.method == "air" else WeightedDecodingLogitsProcessor
    strength = resolve_strength(args.strength, attr.default_strength)
    torch.manual_seed(args.seed)
    for prompt in prompts:
        enc = tok([prompt], return_tensors="pt")
        proc = cls(attr, args.attribute, strength, prompt_attention_mask=enc["attention_mask"],
                   normalize=args.normalize)  # fmt: skip
        out = model.generate(
            **enc,
            logits_processor=[proc],
            do_sample=True,
            top_k=args.top_k,
            top_p=1.0,
            max_new_tokens=args.max_new_tokens,
            num_return_sequences=args.num_samples,
            pad_token_id=tok.pad_token_id,
        )
        for row in out:
            print(tok.decode(row, skip_special_tokens=True).replace("\n", " "))
        print()
    return 0
