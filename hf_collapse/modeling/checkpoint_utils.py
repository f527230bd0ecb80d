"""Safe checkpoint I/O shared by every hf-collapse model class.

Kept free of package-absolute imports so that `hf_collapse.hub.export_for_hub` can copy it next to the modeling
files for `trust_remote_code` users.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "CorruptCheckpointError",
    "SafeCheckpointMixin",
    "WrongCheckpointError",
    "atomic_directory_write",
    "check_model_type",
    "check_safetensors_files",
    "remove_stale_temporaries",
]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


class CorruptCheckpointError(OSError):
    """A weight file of a checkpoint is truncated or corrupt."""


class WrongCheckpointError(ValueError):
    """A folder is not a checkpoint of the model class asked to load it (no config.json, another model_type)."""


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


def check_model_type(directory: str | os.PathLike, config_class: Any) -> None:
    """Raise `WrongCheckpointError` unless `directory/config.json` exists and names a model type `config_class` loads."""
    import json

    accepted = (config_class.model_type, *getattr(config_class, "convertible_model_types", ()))
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        found = sorted(p.name for p in Path(directory).iterdir())[:8]
        raise WrongCheckpointError(
            f"{directory} has no config.json, so it is not a {config_class.model_type!r} checkpoint (found: {found}). "
            "Pass the folder that save_pretrained wrote."
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise WrongCheckpointError(f"{config_file} is not a JSON object ({err}).") from err
    if model_type not in accepted:
        raise WrongCheckpointError(
            f"{directory} holds a {model_type!r} checkpoint; {config_class.__name__} loads {list(accepted)}. Load it "
            "with its own class, or with transformers' AutoModel* classes (hf-collapse registers its models there)."
        )


_TMP_TAG, _OLD_TAG = ".tmp-", ".old-"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link copy of `src` at `dst` (a plain copy where hard links are not possible): no data is duplicated."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(str(src), str(dst))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(target: str | os.PathLike) -> None:
    """Delete the `.<name>.tmp-*` / `.<name>.old-*` siblings that an interrupted `atomic_directory_write` left."""
    target = Path(target)
    if target.parent.is_dir():
        for tag in (_TMP_TAG, _OLD_TAG):
            for stale in target.parent.glob(f".{target.name}{tag}*"):
                shutil.rmtree(stale, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root`, so that the swap never publishes files whose data is not on disk yet."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _is_weight_file(entry: Path) -> bool:
    return entry.is_file() and entry.name.endswith(_WEIGHT_SUFFIXES)


def atomic_directory_write(
    target: str | os.PathLike, write: Callable[[str], Any], drop_old: Callable[[Path], bool] = _is_weight_file
) -> None:
    """Call `write(tmp_dir)` on an empty temporary sibling of `target`, then swap it in as a whole.

    A kill at any point leaves `target` holding either the complete old content or the complete new content, never
    a mix: the new folder is finished before anything at `target` changes, and the swap is one atomic
    `renameat2(RENAME_EXCHANGE)` on Linux (elsewhere two renames, with the old folder kept beside until the second
    one is done). Entries of the old folder that the new write does not produce (a Trainer's `checkpoint-*` folders,
    logs, a hand-written README) are carried over as hard links, except those `drop_old` says belong to the old
    checkpoint (by default its weight files, e.g. stale shards). Temporaries left by an earlier interrupted write are
    removed first.
    """
    target = Path(os.path.abspath(target))  # "." or "x/.." must name the folder itself, so tmp is a true sibling
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP_TAG}", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would otherwise become the checkpoint folder's mode
    try:
        write(str(tmp))
        _fsync_tree(tmp)
        if target.is_dir():
            for old in target.iterdir():
                if os.path.lexists(tmp / old.name) or drop_old(old):
                    continue
                _link_tree(old, tmp / old.name)
            if _exchange(tmp, target):
                return  # tmp now holds the old folder; `finally` removes it
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}{_OLD_TAG}", dir=target.parent))
            os.replace(target, backup / target.name)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
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
        """`PreTrainedModel.from_pretrained` with `use_safetensors=True` and clear errors for wrong or corrupt folders.

        A local folder must hold a `config.json` of this model's `model_type` (or of one the config converts, see
        `convertible_model_types`) before anything is built: without it transformers would build a default-size model.
        """
        kwargs.setdefault("use_safetensors", True)
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            if kwargs.get("config") is None:
                check_model_type(path, cls.config_class)
            check_safetensors_files(path)
        from safetensors import SafetensorError

        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as err:  # e.g. a remote file, which the local check above cannot see
            raise CorruptCheckpointError(
                f"a weight file of {pretrained_model_name_or_path} is corrupt or truncated ({err})."
            ) from err
