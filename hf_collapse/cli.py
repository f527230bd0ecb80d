"""The `hf-collapse` command line: dispatches to one module per subcommand in `hf_collapse.scripts`.

Each subcommand's options are the documented fields of its dataclasses, parsed with `transformers.HfArgumentParser`,
so `hf-collapse <cmd> --help` shows the field docs. A user error (bad option value, missing file, unknown attribute)
prints one line and exits with status 2; set `HF_COLLAPSE_DEBUG=1` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# subcommand -> (help, module in hf_collapse.scripts with a `main(argv) -> int`)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("Show all three fixes on real bundled checkpoints.", "demo"),
    "generate": ("Generate text with Air-Decoding attribute control.", "generate"),
    "train-prefixes": ("Train one attribute prefix per attribute (Air-Decoding).", "train_prefixes"),
    "distill": ("Distil a teacher into a dual-head student (DHKD and its baselines).", "distill"),
    "passkey": ("Passkey-retrieval grid (length x depth) for a causal LM.", "passkey"),
    "position-loss": ("Per-position loss and state-norm statistics over long input.", "position_loss"),
}

# errors that mean "the input was wrong", reported as one line; anything else is a bug and keeps its traceback
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, KeyError)


def _build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog="hf-collapse",
        description="hf-collapse: Air-Decoding, state-collapse-robust Mamba-2 and dual-head KD for transformers.",
    )
    parser.add_argument("--version", action="version", version=f"hf-collapse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `hf-collapse <command> [options]`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        args = _build_parser().parse_args(argv)  # prints help/version or exits with an error
        if args.command is None:
            _build_parser().print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(f"hf_collapse.scripts.{COMMANDS[name][1]}")
    try:
        return int(module.main(rest) or 0)
    except _USER_ERRORS as err:
        if os.environ.get("HF_COLLAPSE_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"hf-collapse {name}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
