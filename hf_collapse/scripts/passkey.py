"""`hf-collapse passkey`: passkey-retrieval accuracy over a context-length × depth grid.

    hf-collapse passkey --model DIR --lengths 1024,4096 --depths 0,0.5,1 --output_dir out

writes `passkey.json` (the grid and every trial) and `passkey.png` (heatmap).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..validation import check_number
from .utils import CommandError, ModelArguments, load_model_and_tokenizer, parse_args, parse_list

__all__ = ["PasskeyScriptArguments", "main"]


@dataclass
class PasskeyScriptArguments(ModelArguments):
    """Options of `hf-collapse passkey`."""

    lengths: str = field(default="1024,2048,4096", metadata={"help": "Comma-separated context lengths (tokens)."})
    depths: str = field(default="0,0.25,0.5,0.75,1", metadata={"help": "Comma-separated needle depths in [0, 1]."})
    trials: int = field(default=1, metadata={"help": "Random keys per (length, depth) cell."})
    max_new_tokens: int = field(default=5, metadata={"help": "Greedy tokens generated after the question."})
    seed: int = field(default=0, metadata={"help": "Seed of the random keys."})
    output_dir: str = field(default="passkey_out", metadata={"help": "Where passkey.json and passkey.png go."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("--", "trials", self.trials, integer=True, minimum=1)
        check_number("--", "max_new_tokens", self.max_new_tokens, integer=True, minimum=1)
        for length in self.length_list():
            check_number("--", "lengths", length, integer=True, minimum=1)
        for depth in self.depth_list():
            check_number("--", "depths", depth, minimum=0.0, maximum=1.0)

    def length_list(self) -> list[int]:
        return parse_list(self.lengths, int, "--lengths")

    def depth_list(self) -> list[float]:
        return parse_list(self.depths, float, "--depths")


def main(argv: Sequence[str]) -> int:
    """Entry point of `hf-collapse passkey`."""
    import torch

    from ..evals.passkey import plot_passkey, run_passkey

    (args,) = parse_args([PasskeyScriptArguments], argv, prog="hf-collapse passkey")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.device, **args.mitigation_overrides())
    result = run_passkey(
        model,
        tokenizer,
        args.length_list(),
        args.depth_list(),
        trials=args.trials,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    if not result["trials"]:
        raise CommandError("no passkey trial ran; check --lengths, --depths and --trials")
    result["args"] = vars(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "passkey.json").write_text(json.dumps(result, indent=1))
    plot_passkey(result, out / "passkey.png", title=f"passkey: {Path(args.model).name}")
    print(f"wrote {out / 'passkey.json'} and {out / 'passkey.png'}")
    return 0
