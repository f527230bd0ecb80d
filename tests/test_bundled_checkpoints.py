"""The bundled checkpoints in checkpoints/: Hub-ready (weights, config, card), safetensors only, small, loadable;
and the demo sections that need no downloads."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from hf_collapse.cli import main

ROOT = Path(__file__).resolve().parents[1] / "checkpoints"
NAMES = [
    "smollm2-135m-sentiment-prefixes",
    "smollm2-135m-topic-prefixes",
    "smollm2-135m-detox-prefixes",
    "robust-mamba2-tiny",
    "dual-head-fashion-mnist",
    "sentiment-judge",
]


@pytest.mark.parametrize("name", NAMES)
def test_bundled_checkpoint_is_hub_ready(name):
    path = ROOT / name
    files = [p for p in path.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl")], "pickle files in a bundled checkpoint"
    assert any(p.suffix == ".safetensors" for p in files)
    card = ModelCard.load(path / "README.md")
    assert card.data.library_name == "hf-collapse" and "hf-collapse" in card.data.tags


def test_bundled_models_load_with_auto_classes():
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification

    import hf_collapse  # noqa: F401

    mamba = AutoModelForCausalLM.from_pretrained(ROOT / "robust-mamba2-tiny", use_safetensors=True)
    assert type(mamba).__name__ == "RobustMamba2ForCausalLM" and mamba.config.state_norm_max is not None
    student = AutoModelForImageClassification.from_pretrained(ROOT / "dual-head-fashion-mnist", use_safetensors=True)
    assert type(student).__name__ == "DualHeadForImageClassification"
    assert student(pixel_values=torch.zeros(1, 1, 28, 28)).logits.shape == (1, 10)


@pytest.mark.parametrize("name", ["smollm2-135m-sentiment-prefixes", "smollm2-135m-topic-prefixes"])
def test_bundled_prefixes_are_plain_peft_adapters(name):
    index = json.loads((ROOT / name / "attribute_prefixes.json").read_text())
    assert index["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for attr in index["attributes"]:
        cfg = json.loads((ROOT / name / attr / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["num_virtual_tokens"] == index["num_virtual_tokens"]


def test_demo_mamba_and_dhkd_sections(tmp_path, capsys):
    root = tmp_path / "fmnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    for stem, arr in (("t10k-images-idx3-ubyte", rng.integers(0, 256, (16, 28, 28))),
                      ("t10k-labels-idx1-ubyte", rng.integers(0, 10, (16,)))):  # fmt: skip
        header = bytes([0, 0, 8, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
        with gzip.open(root / f"{stem}.gz", "wb") as f:
            f.write(header + arr.astype(np.uint8).tobytes())
    assert main(["demo", "--only", "dhkd", "--fashion_mnist_dir", str(root)]) == 0
    assert main(["demo", "--only", "mamba", "--mamba_tokens", "512"]) == 0
    out = capsys.readouterr().out
    assert "accuracy on the first" in out and "loss, no mitigation" in out


def test_demo_classifies_the_shipped_sample_without_the_dataset(tmp_path, capsys):
    """On a fresh machine (no Fashion-MNIST installed) the demo uses the 300 test images shipped in the package."""
    from hf_collapse.scripts.fashion_mnist import demo_sample

    sample = demo_sample()
    assert sample.pixel_values.shape == (300, 1, 28, 28) and sample.labels.shape == (300,)
    assert main(["demo", "--only", "dhkd", "--fashion_mnist_dir", str(tmp_path / "absent")]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("accuracy on the 300 test images shipped with hf-collapse:")[1].split("%")[0])
    assert accuracy > 80.0  # the bundled student is an ~88% classifier; chance is 10%


def test_robust_mamba2_runs_with_int8_dynamic_quantization():
    """torch's dynamic int8 quantization of every Linear, LM head included, runs and keeps the bundled model's loss
    on its held-out demo text within 1% (a quantized head exposes weight() as a method; the model handles it)."""
    import warnings

    from torch.ao.quantization import quantize_dynamic
    from transformers import AutoModelForCausalLM

    import hf_collapse  # noqa: F401

    path = ROOT / "robust-mamba2-tiny"
    ids = torch.tensor([list((path / "demo_text.txt").read_bytes()[:512])])
    fp32 = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization points to torchao
        int8 = quantize_dynamic(AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval(),
                                {torch.nn.Linear}, dtype=torch.qint8)  # fmt: skip
    with torch.no_grad():
        a, b = fp32(ids, labels=ids).loss.item(), int8(ids, labels=ids).loss.item()
    assert abs(b - a) < 0.01 * a
