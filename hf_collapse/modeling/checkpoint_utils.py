"""Safe checkpoint I/O shared by every hf-collapse model class.

Kept free of package-absolute imports so that `hf_collapse.hub.export_for_hub` can copy it next to the modeling
files for `trust_remote_code` users.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["CorruptCheckpointError", "SafeCheckpointMixin", "check_safetensors_files", "atomic_directory_write"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


class CorruptCheckpointError(OSError):
    """A weight file of a checkpoint is truncated or corrupt."""


def check_safetensors_files(directory: str | os.PathLike) -> None:
    """Open the header of every `*.safetensors` file in `directory`; raise `CorruptCheckpointError` naming a bad one."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(directory).glob("*.safetensors")):
        try:
            # safe_open validates the header against the file size ("file not fully covered" when truncated)
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError, ValueError) as err:
            raise CorruptCheckpointError(
                f"{path} is corrupt or truncated ({err}). Re-download or re-save the checkpoint."
            ) from err


def atomic_directory_write(target: str | os.PathLike, write: Any) -> None:
    """Call `write(tmp_dir)`, then move its files into `target`.

    Nothing in `target` changes until `write` has finished, and each file is moved with an atomic `os.replace`, so an
    interrupted save never leaves a half-written weight file. Weight files of an older checkpoint in `target` that
    the new one does not have (e.g. stale shards) are removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(str(tmp))
        target.mkdir(exist_ok=True)
        new_files = {p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file()}
        for old in target.iterdir():
            if old.is_file() and old.name.endswith(_WEIGHT_SUFFIXES) and Path(old.name) not in new_files:
                old.unlink()
        for rel in sorted(new_files):
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, target / rel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class SafeCheckpointMixin:
    """`save_pretrained` through a temp dir (+ model card); `from_pretrained` safetensors-only with clear errors.

    Put it first in the bases: `class X(SafeCheckpointMixin, PreTrainedModel)`. Subclasses set `model_card_kind`
    (a template name in `hub_cards/`) and may override `model_card_facts()`.
    """

    model_card_kind: str | None = None

    def model_card_facts(self) -> dict[str, Any]:
        """Facts for the model card template; checkpoints produced by experiments pass richer ones to `save_pretrained`."""
        return {}

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, model_card: Any = None, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained`, written to a temp dir first, plus a `README.md` model card.

        Args:
            model_card: a `huggingface_hub.ModelCard` to write; by default one is built with
                `hf_collapse.model_cards.make_model_card` unless the folder already has a README.md.
        """
        if kwargs.get("push_to_hub"):
            return super().save_pretrained(save_directory, *args, **kwargs)
        kwargs.setdefault("safe_serialization", True)
        if kwargs["safe_serialization"] is not True:
            raise ValueError("hf-collapse checkpoints are safetensors only (safe_serialization=True).")
        kwargs.pop("safe_serialization")
        has_card = (Path(save_directory) / "README.md").exists()

        def write(tmp: str) -> None:
            super(SafeCheckpointMixin, self).save_pretrained(tmp, *args, **kwargs)
            card = model_card
            if card is None and not has_card and self.model_card_kind is not None:
                try:
                    from hf_collapse.model_cards import make_model_card
                except ImportError:  # exported remote-code copy without hf-collapse installed
                    return
                card = make_model_card(self.model_card_kind, **self.model_card_facts())
            if card is not None:
                card.save(os.path.join(tmp, "README.md"))

        atomic_directory_write(save_directory, write)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """`PreTrainedModel.from_pretrained` with `use_safetensors=True` and a clear error for corrupt weights."""
        kwargs.setdefault("use_safetensors", True)
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            check_safetensors_files(path)
        from safetensors import SafetensorError

        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as err:  # e.g. a remote file, which the local check above cannot see
            raise CorruptCheckpointError(
                f"a weight file of {pretrained_model_name_or_path} is corrupt or truncated ({err})."
            ) from err
