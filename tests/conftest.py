"""Test conventions: tiny random models built in-process, no downloads, fixed seeds.

Tests marked ``@pytest.mark.slow`` run only with ``HF_COLLAPSE_SLOW=1``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

SEED = 0


def pytest_collection_modifyitems(config, items):
    if os.environ.get("HF_COLLAPSE_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow test; set HF_COLLAPSE_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _fixed_seed():
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    yield


@pytest.fixture
def save_and_reload(tmp_path):
    """``save_and_reload(model, loader=type(model))`` round-trips a model through ``save_pretrained``."""

    def _roundtrip(model, loader=None, **kwargs):
        path = tmp_path / f"ckpt_{type(model).__name__}"
        model.save_pretrained(path)
        loader = loader if loader is not None else type(model)
        return loader.from_pretrained(path, **kwargs)

    return _roundtrip
