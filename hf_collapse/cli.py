"""The ``hf-collapse`` command line.

Each subcommand's options are the documented fields of one dataclass, parsed with
``transformers.HfArgumentParser`` (the ecosystem's habit), so ``hf-collapse <cmd> --help`` shows the
dataclass field docs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class _Command:
    help: str
    target: str | None  # "module:function"; the function takes argv and returns an exit code


COMMANDS: dict[str, _Command] = {
    "demo": _Command("Show all three fixes on real bundled checkpoints.", "hf_collapse.demo:demo_main"),
    "generate": _Command(
        "Generate text with Air-Decoding attribute control.", "hf_collapse.processors.cli:generate_main"
    ),
    "train-prefixes": _Command(
        "Train one attribute prefix per attribute (Air-Decoding PC-LMs).",
        "hf_collapse.processors.cli:train_prefixes_main",
    ),
    "distill": _Command(
        "Distil a teacher into a dual-head student (DHKD and its baselines).", "hf_collapse.trainers.cli:distill_main"
    ),
    "passkey": _Command(
        "Passkey-retrieval grid (length x depth) for a causal LM.", "hf_collapse.evals.passkey:passkey_main"
    ),
    "position-loss": _Command(
        "Per-position loss and state-norm statistics over long input.",
        "hf_collapse.evals.position_loss:position_loss_main",
    ),
}


def _build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog="hf-collapse",
        description="hf-collapse: Air-Decoding, state-collapse-robust Mamba-2 and dual-head KD for transformers.",
    )
    parser.add_argument("--version", action="version", version=f"hf-collapse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        sub.add_parser(name, help=cmd.help, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    if not argv or argv[0] not in COMMANDS:
        args = parser.parse_args(argv)  # prints help/version or errors out
        if args.command is None:
            parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    cmd = COMMANDS[name]
    if cmd.target is None:
        print(f"hf-collapse {name}: not built yet in this version ({cmd.help})")
        return 0
    module_name, func_name = cmd.target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
