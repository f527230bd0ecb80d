"""Fashion-MNIST IDX reader and the `hf-collapse distill` command on tiny generated IDX files."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification

from hf_collapse.cli import main
from hf_collapse.scripts.fashion_mnist import FashionMNIST, read_idx


def write_idx(path, arr: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def fake_fashion_mnist(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    for prefix, n in (("train", 32), ("t10k", 16)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    return root


def test_reader_shapes_and_errors(fake_fashion_mnist, tmp_path):
    ds = FashionMNIST(fake_fashion_mnist, "train")
    assert len(ds) == 32 and ds[0]["pixel_values"].shape == (1, 28, 28) and 0 <= int(ds[0]["labels"]) < 10
    bad = tmp_path / "bad-idx"
    write_idx(bad, np.zeros((4, 28, 28)), gz=False)
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(bad)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "nowhere", "train")


def test_distill_command_end_to_end(fake_fashion_mnist, tmp_path):
    teacher = ResNetForImageClassification(
        ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=10)
    )
    teacher.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "student"
    rc = main(["distill", "--teacher", str(tmp_path / "teacher"), "--data_dir", str(fake_fashion_mnist),
               "--output_dir", str(out), "--mode", "dhkd", "--max_steps", "2", "--per_device_train_batch_size", "16",
               "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--save_single_head"])  # fmt: skip
    assert rc == 0
    result = json.loads((out / "distill_result.json").read_text())
    assert result["mode"] == "dhkd" and 0.0 <= result["test_accuracy"] <= 1.0
    student = AutoModelForImageClassification.from_pretrained(out, use_safetensors=True)
    assert type(student).__name__ == "DualHeadForImageClassification"
    single = AutoModelForImageClassification.from_pretrained(out / "single_head")
    assert type(single).__name__ == "ResNetForImageClassification"
