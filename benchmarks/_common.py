"""Shared benchmark helpers: interleaved median timing and the JSON-lines result log."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def interleaved_median(ours: Callable[[], object], baseline: Callable[[], object], repeats: int = 5, warmup: int = 1):
    """Time ``ours`` and ``baseline`` alternately; return (median ours s, median baseline s)."""
    for _ in range(warmup):
        ours()
        baseline()
    t_ours, t_base = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours()
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        baseline()
        t_base.append(time.perf_counter() - t0)
    return statistics.median(t_ours), statistics.median(t_base)


def report(script: str, name: str, ours_s: float, baseline_s: float, repeats: int, threads: int, **extra) -> float:
    """Print ``name: ratio = X (ours Y s, baseline Z s)`` and append a JSON line to ``results/<script>.jsonl``."""
    import torch
    import transformers

    ratio = ours_s / baseline_s
    print(f"{name}: ratio = {ratio:.3f}x (ours {ours_s:.4f} s, baseline {baseline_s:.4f} s)")
    RESULTS.mkdir(exist_ok=True)
    record = {
        "name": name,
        "ratio": ratio,
        "ours_s": ours_s,
        "baseline_s": baseline_s,
        "repeats": repeats,
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    }
    with open(RESULTS / f"{script}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return ratio
