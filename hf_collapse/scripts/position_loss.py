"""`hf-collapse position-loss`: per-position loss and state-norm statistics over long input.

    hf-collapse position-loss --model DIR --text_file book.txt --max_tokens 65536 --output_dir out

writes `position_loss.json`, `position_loss.png` and `state_norms.png`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..validation import check_number
from .utils import CommandError, ModelArguments, load_model_and_tokenizer, parse_args

__all__ = ["PositionLossScriptArguments", "main"]

SYNTHETIC_INPUTS = ("newlines",)


@dataclass
class PositionLossScriptArguments(ModelArguments):
    """Options of `hf-collapse position-loss`."""

    text_file: str | None = field(default=None, metadata={"help": "UTF-8 text to score (read whole)."})
    synthetic: str | None = field(
        default=None, metadata={"help": "'newlines': the paper's synthetic prompt, a long run of newline characters."}
    )
    max_tokens: int = field(default=65536, metadata={"help": "Score at most this many tokens."})
    bucket_size: int = field(default=1024, metadata={"help": "Positions averaged per loss bucket."})
    stats_every: int = field(default=128, metadata={"help": "Read state statistics every N tokens (feed step)."})
    train_length: int | None = field(default=None, metadata={"help": "Training length, drawn as a line on plots."})
    output_dir: str = field(default="position_loss_out", metadata={"help": "Where the JSON and PNG files go."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.text_file is None) == (self.synthetic is None):
            raise CommandError("give exactly one of --text_file and --synthetic")
        if self.synthetic is not None and self.synthetic not in SYNTHETIC_INPUTS:
            raise CommandError(f"unknown --synthetic {self.synthetic!r} (known: {', '.join(SYNTHETIC_INPUTS)})")
        check_number("--", "max_tokens", self.max_tokens, integer=True, minimum=2)
        check_number("--", "bucket_size", self.bucket_size, integer=True, minimum=1)
        check_number("--", "stats_every", self.stats_every, integer=True, minimum=1)
        check_number("--", "train_length", self.train_length, integer=True, minimum=1, allow_none=True)


def main(argv: Sequence[str]) -> int:
    """Entry point of `hf-collapse position-loss`."""
    import torch

    from ..evals.position_loss import plot_position_loss, plot_state_norms, position_loss

    (args,) = parse_args([PositionLossScriptArguments], argv, prog="hf-collapse position-loss")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.device, **args.mitigation_overrides())
    if args.synthetic is not None:
        ids = list(tokenizer.encode("\n" * 64, add_special_tokens=False))
        ids = (ids * (args.max_tokens // max(1, len(ids)) + 1))[: args.max_tokens]
    else:
        ids = list(tokenizer.encode(Path(args.text_file).read_text(encoding="utf-8"), add_special_tokens=False))
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise CommandError(f"{args.text_file} gives {len(ids)} token(s); position-loss needs at least 2")
    result = position_loss(model, torch.tensor([ids]), bucket_size=args.bucket_size, stats_every=args.stats_every)
    result["args"] = vars(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "position_loss.json").write_text(json.dumps(result))
    name = Path(args.model).name
    plot_position_loss({name: result}, out / "position_loss.png", args.train_length, title=f"loss vs position: {name}")
    plot_state_norms({name: result}, out / "state_norms.png", args.train_length, title=f"state norms: {name}")
    print(f"wrote {out / 'position_loss.json'}, position_loss.png, state_norms.png")
    return 0
