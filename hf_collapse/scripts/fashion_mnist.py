"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (IDX files), for `distill`, the demo and examples."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["read_idx", "read_split", "FashionMNIST", "FASHION_MNIST_DIR", "FASHION_MNIST_LABELS", "DEMO_SAMPLE", "demo_sample"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # `apt-get install -y dataset-fashion-mnist`
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_MEAN, _STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics


def _normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 `(N, 28, 28)` -> normalised float `(N, 1, 28, 28)`, as the bundled student was trained."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return (x - _MEAN) / _STD


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of MNIST and Fashion-MNIST."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number).")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[data[2]]
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} items, found {arr.size}.")
    return arr.reshape(shape)


def read_split(root: str | os.PathLike = FASHION_MNIST_DIR, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The raw split: uint8 images `(N, 28, 28)` and int64 labels `(N,)` from the IDX files in `root`."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)

    def find(stem: str) -> Path:
        for name in (stem, stem + ".gz"):
            if (root / name).exists():
                return root / name
        raise FileNotFoundError(
            f"{root / stem}[.gz] not found. Install Fashion-MNIST with `apt-get install -y dataset-fashion-mnist` "
            f"(files land in {FASHION_MNIST_DIR}) or pass the folder that holds the IDX files."
        )

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    return images, read_idx(find(f"{prefix}-labels-idx1-ubyte")).astype(np.int64)


DEMO_SAMPLE = "demo_data/fashion_mnist_test_300.safetensors"  # inside hf_collapse.scripts; see its PROVENANCE.md


class FashionMNIST(Dataset):
    """Fashion-MNIST as `{"pixel_values": (1, 28, 28) float, "labels": int}` items, ready for `Trainer`.

    Args:
        root: folder with the four IDX files (`train-images-idx3-ubyte[.gz]`, ...).
        split: `"train"` or `"test"`.
        limit: keep only the first `limit` examples.
    """

    def __init__(self, root: str | os.PathLike = FASHION_MNIST_DIR, split: str = "train", limit: int | None = None):
        images, labels = read_split(root, split)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.pixel_values = _normalise(images)
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


def demo_sample() -> FashionMNIST:
    """The 300 Fashion-MNIST test images shipped with the package (for the demo on machines without the dataset)."""
    import importlib.resources

    from safetensors.torch import load_file

    path = importlib.resources.files("hf_collapse.scripts") / DEMO_SAMPLE
    with importlib.resources.as_file(path) as file:
        data = load_file(str(file))
    sample = FashionMNIST.__new__(FashionMNIST)
    sample.pixel_values, sample.labels = _normalise(data["images"].numpy()), data["labels"].long()
    return sample
