"""Per-token loss against position, and SSM state statistics, over arbitrarily long input (streamed).

The input is fed in steps of ``stats_every`` tokens through the model's cache, so memory does not grow with the
input length. After every step the recurrent state of every layer is read from the cache (any model whose cache
has linear-attention layers: RobustMamba2, transformers' Mamba2) and its mean, variance and Frobenius norm per
(layer, head) are recorded. Losses are averaged in buckets of ``bucket_size`` positions.

The command ``hf-collapse position-loss --model DIR --text_file book.txt --max_tokens 65536 --output_dir out`` writes
``position_loss.json``, ``position_loss.png`` and ``state_norms.png``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import recurrent_states, state_statistics

__all__ = ["position_loss", "plot_position_loss", "plot_state_norms"]


@torch.no_grad()
def position_loss(
    model,
    input_ids: torch.Tensor,
    bucket_size: int = 1024,
    stats_every: int = 128,
    progress: bool = True,
) -> dict:
    """Stream ``input_ids`` (batch, T) through ``model`` and measure loss by position and state statistics.

    The loss of the token at 0-indexed position p (predicted from the p tokens before it) goes into bucket
    p // bucket_size. Position 0 has no prediction and is skipped.

    Returns a dict with ``buckets`` (start, end, mean_loss, count), ``stats_positions`` (tokens seen when the state
    was read) and ``state_mean`` / ``state_var`` / ``state_norm`` (one (layers, heads) list per reading; empty if the
    model's cache exposes no recurrent state).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    total = input_ids.shape[1]
    n_buckets = math.ceil(total / bucket_size)
    loss_sum = torch.zeros(n_buckets, dtype=torch.float64)
    counts = torch.zeros(n_buckets, dtype=torch.long)
    stats = {"positions": [], "mean": [], "var": [], "norm": []}
    cache, prev_logits = None, None
    bar = tqdm(total=total, desc="position-loss", unit="tok", disable=not progress)
    for start in range(0, total, stats_every):
        end = min(total, start + stats_every)
        out = model(input_ids[:, start:end], cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits.float()  # (batch, l, vocab)
        # predictions for positions start..end-1: the previous step's last logits, then this step's but last
        preds = logits[:, :-1] if prev_logits is None else torch.cat([prev_logits, logits[:, :-1]], dim=1)
        targets = input_ids[:, start + 1 : end] if prev_logits is None else input_ids[:, start:end]
        first = start + 1 if prev_logits is None else start
        if targets.shape[1] > 0:
            nll = F.cross_entropy(preds.reshape(-1, preds.shape[-1]), targets.reshape(-1), reduction="none")
            nll = nll.view(targets.shape).double().sum(0)  # (l,) summed over the batch
            pos = torch.arange(first, first + targets.shape[1])
            loss_sum.index_add_(0, (pos // bucket_size), nll.cpu())
            counts.index_add_(0, (pos // bucket_size), torch.full_like(pos, input_ids.shape[0]))
        prev_logits = logits[:, -1:]
        states = recurrent_states(cache)
        if states is not None:
            s = state_statistics(states)
            stats["positions"].append(end)
            for k in ("mean", "var", "norm"):
                stats[k].append(s[k])
        bar.update(end - start)
    bar.close()
    buckets = [
        {
            "start": b * bucket_size,
            "end": min(total, (b + 1) * bucket_size),
            "mean_loss": (loss_sum[b] / counts[b]).item() if counts[b] > 0 else None,
            "count": int(counts[b]),
        }
        for b in range(n_buckets)
    ]
    return {
        "tokens": total,
        "batch": int(input_ids.shape[0]),
        "bucket_size": bucket_size,
        "stats_every": stats_every,
        "buckets": buckets,
        "stats_positions": stats["positions"],
        "state_mean": stats["mean"],
        "state_var": stats["var"],
        "state_norm": stats["norm"],
    }


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_position_loss(results: dict, path, train_length: int | None = None, title: str = "loss vs position") -> None:
    """Loss per bucket against position; ``results`` maps a label to a ``position_loss`` result."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, res in results.items():
        xs = [(b["start"] + b["end"]) / 2 for b in res["buckets"] if b["mean_loss"] is not None]
        ys = [b["mean_loss"] for b in res["buckets"] if b["mean_loss"] is not None]
        ax.plot(xs, ys, marker=".", label=label)
    if train_length:
        ax.axvline(train_length, color="k", ls="--", lw=1, label=f"T_train = {train_length}")
    ax.set_xscale("log")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("mean loss in bucket (nats/token)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_state_norms(results: dict, path, train_length: int | None = None, title: str = "state norm") -> None:
    """Per layer: the largest head's state norm against position, one line per label in ``results``."""
    plt = _plt()
    first = next(iter(results.values()))
    n_layers = len(first["state_norm"][0]) if first["state_norm"] else 0
    if n_layers == 0:
        return
    fig, axes = plt.subplots(1, n_layers, figsize=(4 * n_layers, 3.5), squeeze=False)
    for label, res in results.items():
        for i in range(n_layers):
            ys = [max(point[i]) for point in res["state_norm"]]
            axes[0, i].plot(res["stats_positions"], ys, label=label)
    for i in range(n_layers):
        ax = axes[0, i]
        if train_length:
            ax.axvline(train_length, color="k", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("position (tokens)")
        ax.set_title(f"layer {i}: max over heads of ‖h‖_F")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
