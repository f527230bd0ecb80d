"""Passkey retrieval (Stuffed Mamba / Landmark Attention layout): accuracy over a context-length × depth grid.

The command ``hf-collapse passkey --model DIR --lengths 1024,4096 --depths 0,0.5,1 --output_dir out`` writes
``passkey.json`` (the grid and every trial) and ``passkey.png`` (heatmap).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

__all__ = ["INSTRUCTION", "FILLER", "QUESTION", "build_passkey_prompt", "run_passkey", "plot_passkey"]

INSTRUCTION = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it."
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The passkey is {key}. Remember it. {key} is the passkey."
QUESTION = "What is the pass key? The passkey is"


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def build_passkey_prompt(tokenizer, target_length: int, depth: float, key: str) -> list[int]:
    """Token ids of the passkey prompt closest to ``target_length`` tokens (never longer, unless the fixed parts are).

    Layout: instruction, filler lines, the needle line after a fraction ``depth`` (0 = first, 1 = last) of the
    filler lines, more filler lines, question. Parts are joined with single spaces and tokenised separately so the
    length arithmetic is exact for any tokenizer.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head = _encode(tokenizer, INSTRUCTION)
    needle = _encode(tokenizer, " " + NEEDLE.format(key=key))
    question = _encode(tokenizer, " " + QUESTION)
    filler = _encode(tokenizer, " " + FILLER)
    n_fill = max(0, (target_length - len(head) - len(needle) - len(question)) // len(filler))
    before = round(depth * n_fill)
    return head + filler * before + needle + filler * (n_fill - before) + question


@torch.no_grad()
def run_passkey(
    model,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int = 1,
    max_new_tokens: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Greedy passkey retrieval over ``lengths × depths``; a trial is correct iff the 5 digits appear in the output.

    Returns ``{"lengths", "depths", "accuracy": [[...per depth] per length], "trials": [...]}``.
    """
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    device = next(model.parameters()).device
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)
    records, accuracy = [], []
    bar = tqdm(total=len(lengths) * len(depths) * trials, desc="passkey", disable=not progress)
    for length in lengths:
        row = []
        for depth in depths:
            correct = 0
            for _ in range(trials):
                key = f"{rng.randint(0, 99999):05d}"
                ids = torch.tensor([build_passkey_prompt(tokenizer, length, depth, key)], device=device)
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
                answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
                ok = key in answer
                correct += ok
                records.append(
                    {
                        "length": length,
                        "prompt_tokens": ids.shape[1],
                        "depth": depth,
                        "key": key,
                        "answer": answer,
                        "correct": ok,
                    }
                )
                bar.update(1)
            row.append(correct / trials)
        accuracy.append(row)
    bar.close()
    return {"lengths": list(lengths), "depths": list(depths), "accuracy": accuracy, "trials": records}


def plot_passkey(result: dict, path, title: str = "passkey retrieval") -> None:
    """Heatmap of accuracy (rows: depth, columns: context length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    acc = np.array(result["accuracy"]).T  # (depths, lengths)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(result["lengths"]), 1.2 + 0.5 * len(result["depths"])))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result["lengths"])), [str(v) for v in result["lengths"]], rotation=45)
    ax.set_yticks(range(len(result["depths"])), [f"{d:.2f}" for d in result["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
