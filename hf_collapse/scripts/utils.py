"""Helpers shared by the `hf-collapse` subcommands: bundled checkpoints, argument parsing, model loading."""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINTS_ENV",
    "CommandError",
    "ModelArguments",
    "bundled_checkpoint",
    "checkpoints_dir",
    "load_model_and_tokenizer",
    "parse_args",
    "parse_list",
]

CHECKPOINTS_ENV = "HF_COLLAPSE_CHECKPOINTS"


class CommandError(ValueError):
    """A user error in a command's arguments or inputs: `hf-collapse` prints its message alone and exits with 2."""


def checkpoints_dir(override: str | os.PathLike | None = None) -> Path:
    """Folder of the bundled checkpoints: `override`, else `$HF_COLLAPSE_CHECKPOINTS`, else the package data.

    The checkpoints ship inside the wheel as `hf_collapse/checkpoints/` (package data), so they are found through
    `importlib.resources` wherever the package is installed, not through paths relative to a source tree.
    """
    if override:
        return Path(override)
    env = os.environ.get(CHECKPOINTS_ENV)
    if env:
        return Path(env)
    return Path(str(importlib.resources.files("hf_collapse") / "checkpoints"))


def bundled_checkpoint(name: str, override: str | os.PathLike | None = None) -> Path:
    """Path of the bundled checkpoint `name` (e.g. `"robust-mamba2-tiny"`); raises `FileNotFoundError` if absent."""
    path = checkpoints_dir(override) / name
    if not (path / "README.md").is_file():
        raise FileNotFoundError(
            f"bundled checkpoint {name!r} not found at {path}; reinstall hf-collapse or point "
            f"${CHECKPOINTS_ENV} (or --checkpoints) at a folder holding it."
        )
    return path


def parse_args(dataclass_types: Sequence[type], argv: Sequence[str], prog: str, **kwargs: Any) -> tuple:
    """`HfArgumentParser(dataclass_types).parse_args_into_dataclasses(argv)`; a dataclass's `__post_init__`
    `ValueError`/`TypeError` becomes a `CommandError` (one line, exit status 2)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(tuple(dataclass_types), prog=prog)

    def error(message: str):  # argparse would print the whole usage block; one line is what the CLI promises
        raise CommandError(f"{message} (see {prog} --help)")

    parser.error = error
    try:
        return parser.parse_args_into_dataclasses(args=list(argv), **kwargs)
    except (ValueError, TypeError) as err:
        raise CommandError(str(err)) from err


def parse_list(text: str, kind: type, name: str) -> list:
    """Parse a comma-separated option such as `--lengths 1024,2048` into a non-empty list of `kind`."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise CommandError(f"{name} must be a comma-separated list of {kind.__name__} values, got {text!r}") from err
    if not values:
        raise CommandError(f"{name} is empty")
    return values


@dataclass
class ModelArguments:
    """The model, device and mitigation options shared by the long-context evaluation commands."""

    model: str = field(metadata={"help": "Checkpoint folder of a causal LM (e.g. a robust_mamba2 or mamba2 one)."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer folder, or 'bytes' for byte-level models; default: the model's."}
    )
    device: str = field(default="cpu", metadata={"help": "torch device."})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (CPU runs)."})
    insertion_scale: float | None = field(default=None, metadata={"help": "insertion_scale override (robust_mamba2)."})
    decay_scale: float | None = field(default=None, metadata={"help": "decay_scale override (robust_mamba2)."})
    state_norm_max: float | None = field(default=None, metadata={"help": "State-norm cap override (robust_mamba2)."})
    state_norm_every: int | None = field(default=None, metadata={"help": "state_norm_every override (robust_mamba2)."})
    sliding_window: int | None = field(default=None, metadata={"help": "sliding_window override (robust_mamba2)."})

    def __post_init__(self) -> None:
        from ..validation import check_number

        check_number("--", "threads", self.threads, integer=True, minimum=1, allow_none=True)
        for name in ("insertion_scale", "decay_scale", "state_norm_max"):
            check_number("--", name, getattr(self, name), minimum=0.0, exclusive_minimum=True, allow_none=True)
        for name in ("state_norm_every", "sliding_window"):
            check_number("--", name, getattr(self, name), integer=True, minimum=1, allow_none=True)

    def mitigation_overrides(self) -> dict[str, Any]:
        """The mitigation fields that were given; with any of them the model loads as `RobustMamba2ForCausalLM`."""
        names = ("insertion_scale", "decay_scale", "state_norm_max", "state_norm_every", "sliding_window")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def load_model_and_tokenizer(model_path: str, tokenizer: str | None = None, device: str = "cpu", **mitigations: Any):
    """Load any causal LM checkpoint; with mitigation overrides load it as `RobustMamba2ForCausalLM`.

    `tokenizer`: a tokenizer folder, `"bytes"` for `ByteTokenizer`, or None for the model folder's own.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..evals.common import ByteTokenizer
    from ..registration import register

    register()
    if mitigations:
        from ..modeling.robust_mamba2 import RobustMamba2ForCausalLM

        model = RobustMamba2ForCausalLM.from_pretrained(model_path, **mitigations)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path)
    model = model.to(device).eval()
    tok = ByteTokenizer() if tokenizer == "bytes" else AutoTokenizer.from_pretrained(tokenizer or model_path)
    return model, tok
