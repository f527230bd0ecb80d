"""Hub distribution: remote-code export and upload (model cards are built in `hf_collapse.model_cards`).

* `export_for_hub(model, out_dir)` writes a checkpoint that loads with `trust_remote_code=True` where hf-collapse
  is not installed: flat modeling files (relative imports within the folder only) and a complete `auto_map`.
* `push(checkpoint_dir, repo_id)` checks every file of a folder (`scan_for_upload`) and uploads it with
  `HfApi.upload_folder`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from .model_cards import CARD_KINDS, card_template_path, make_model_card
from .version import __version__

__all__ = ["CARD_KINDS", "make_model_card", "export_for_hub", "push", "scan_for_upload", "card_template_path"]

# ------------------------------------------------------------------------------------------- remote code
_RELATIVE_IMPORT = re.compile(r"^(\s*from\s+)(\.+)([\w.]*)(\s+import\s+)", re.M)


def _local_modules(module_name: str, seen: dict[str, str]) -> None:
    """Collect `module_name` and every hf_collapse module it imports relatively (recursively)."""
    if module_name in seen:
        return
    module = importlib.import_module(module_name)
    source = inspect.getsource(module)
    seen[module_name] = source
    package = module_name if Path(module.__file__).name == "__init__.py" else module_name.rsplit(".", 1)[0]
    tree = ast.parse(source)
    for node in tree.body:  # module-level absolute imports of the package would break remote code
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node.__dict__.get("level", 0) == 0:
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(n and n.split(".")[0] == "hf_collapse" for n in names):
                raise ValueError(f"{module_name} imports hf_collapse absolutely; remote code needs relative imports")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                continue
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            _local_modules(target, seen)


def _flatten(source: str) -> str:
    """Rewrite `from ..a.b import x` into `from .b import x`: all exported files sit in one folder."""

    def repl(m: re.Match) -> str:
        return f"{m.group(1)}.{m.group(3).rsplit('.', 1)[-1]}{m.group(4)}"

    return _RELATIVE_IMPORT.sub(repl, source)


def export_for_hub(model: Any, out_dir: str | os.PathLike, model_card: ModelCard | None = None) -> Path:
    """Save `model` with self-contained modeling code, loadable with `trust_remote_code=True` without hf-collapse.

    The folder gets the weights (safetensors), `config.json` with a complete `auto_map` (AutoConfig, AutoModel and
    every task Auto class the config is registered with), flat copies of the configuration/modeling files, and the
    model card.
    """
    from .registration import REGISTRY

    out_dir = Path(out_dir)
    config_cls, model_cls = type(model.config), type(model)
    entry = next((e for e in REGISTRY if e.config == config_cls.__name__), None)
    if entry is None:
        raise ValueError(f"export_for_hub: {model_cls.__name__} is not an hf-collapse model.")
    sources: dict[str, str] = {}
    _local_modules(config_cls.__module__, sources)
    _local_modules(model_cls.__module__, sources)
    file_of = {name: name.rsplit(".", 1)[-1] for name in sources}
    if len(set(file_of.values())) != len(file_of):
        raise ValueError(f"export_for_hub: two modules share a file name: {sorted(file_of)}")

    auto_map = {"AutoConfig": f"{file_of[config_cls.__module__]}.{config_cls.__name__}"}
    module = importlib.import_module(entry.module)
    for auto_name, cls_name in entry.models:
        cls = getattr(module, cls_name)
        auto_map[auto_name] = f"{file_of[cls.__module__]}.{cls_name}"
        _local_modules(cls.__module__, sources)

    def write_code(folder: str) -> None:
        for name, source in sources.items():
            if name.endswith("__init__"):
                continue
            Path(folder, f"{file_of[name]}.py").write_text(_flatten(source))

    if model_card is None and getattr(model, "model_card_kind", None):
        model_card = make_model_card(model.model_card_kind, remote_code=True, **model.model_card_facts())

    def write(folder: str) -> None:
        model.save_pretrained(folder, model_card=model_card)
        write_code(folder)

    from .modeling.checkpoint_utils import atomic_directory_write

    # the weights, config and code are swapped in together: an interrupted export never leaves code of another version
    model.config.auto_map = auto_map
    try:
        atomic_directory_write(out_dir, write)
    finally:
        del model.config.auto_map
    return out_dir


# files a Trainer or an interrupted save leaves beside a checkpoint: never published, skipped with a note
_TRAINING_ARTEFACTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json")
_TRAINING_ARTEFACT_PREFIXES = ("rng_state", "checkpoint-", "runs", ".")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy")


def scan_for_upload(checkpoint_dir: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """Check every file under `checkpoint_dir` before an upload.

    Returns `(files to upload, {skipped path: why})` with paths relative to `checkpoint_dir`. Training artefacts
    (`training_args.bin`, optimizer and scheduler states, `checkpoint-*/`, `runs/`) and hidden temporaries are
    skipped. Raises `ValueError` naming the file for a pickle anywhere else (hf-collapse publishes safetensors only)
    and `CorruptCheckpointError` for a truncated or corrupt safetensors file anywhere in the tree.
    """
    from .modeling.checkpoint_utils import check_safetensors_files

    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    upload, skipped = [], {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(_TRAINING_ARTEFACT_PREFIXES) for part in rel.parts) or rel.name in _TRAINING_ARTEFACTS:
            if path.is_file():
                skipped[rel.as_posix()] = "training artefact or temporary file, not part of the model"
            continue
        if path.is_dir():
            check_safetensors_files(path)
            continue
        if path.name.endswith(_PICKLE_SUFFIXES):
            raise ValueError(
                f"{path} is a pickle-format file ({path.suffix}); hf-collapse publishes safetensors only. Convert it "
                "with safetensors.torch.save_file or remove it before pushing."
            )
        upload.append(rel.as_posix())
    check_safetensors_files(root)
    return upload, skipped


def push(checkpoint_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False,
         commit_message: str | None = None) -> str:  # fmt: skip
    """Create `repo_id` if needed and upload `checkpoint_dir` after `scan_for_upload` checked every file in it.

    Training artefacts and temporaries are left out (each is named in a printed note). Returns the commit URL.
    """
    from huggingface_hub import HfApi

    checkpoint_dir = Path(checkpoint_dir)
    upload, skipped = scan_for_upload(checkpoint_dir)
    for rel, why in skipped.items():
        print(f"[hf-collapse] not uploading {rel}: {why}")
    if not upload:
        raise ValueError(f"{checkpoint_dir} holds nothing to upload")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(checkpoint_dir),
        repo_id=repo_id,
        allow_patterns=upload,
        commit_message=commit_message or f"Upload {checkpoint_dir.name} with hf-collapse {__version__}",
    )
    return str(info)
