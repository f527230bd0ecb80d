"""Hub distribution: model cards from `hub_cards/`, remote-code export, upload.

* `make_model_card(kind, **facts)` builds a `huggingface_hub.ModelCard` from a template in `hub_cards/`.
* `export_for_hub(model, out_dir)` writes a checkpoint that loads with `trust_remote_code=True` where hf-collapse
  is not installed: flat modeling files (relative imports within the folder only) and a complete `auto_map`.
* `push(checkpoint_dir, repo_id)` uploads a folder with `HfApi.upload_folder`.
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

__all__ = ["CARD_KINDS", "make_model_card", "export_for_hub", "push", "card_template_path"]

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

    model.config.auto_map = auto_map
    try:
        model.save_pretrained(out_dir, model_card=model_card)
    finally:
        del model.config.auto_map
    write_code(str(out_dir))
    return out_dir


def push(checkpoint_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False,
         commit_message: str | None = None) -> str:  # fmt: skip
    """Create `repo_id` if needed and upload `checkpoint_dir` (weights must be safetensors). Returns the commit URL."""
    from huggingface_hub import HfApi

    from .modeling.checkpoint_utils import check_safetensors_files

    checkpoint_dir = Path(checkpoint_dir)
    if any(checkpoint_dir.glob("*.bin")) or any(checkpoint_dir.glob("*.pt")):
        raise ValueError(f"{checkpoint_dir} holds pickle weight files; hf-collapse publishes safetensors only.")
    check_safetensors_files(checkpoint_dir)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(checkpoint_dir),
        repo_id=repo_id,
        commit_message=commit_message or f"Upload {checkpoint_dir.name} with hf-collapse {__version__}",
    )
    return str(info)
