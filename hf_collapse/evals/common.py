"""Shared pieces of the long-context evaluations: a byte tokenizer and state statistics."""

from __future__ import annotations

import torch

__all__ = ["ByteTokenizer", "recurrent_states", "state_statistics"]


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (for byte-level models such as the ones in ``examples/state_collapse``)."""

    vocab_size = 256
    eos_token_id = None
    pad_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def recurrent_states(cache) -> list[torch.Tensor] | None:
    """The SSM state (batch, heads, head_dim, state) of every layer of a recurrent ``DynamicCache``, or None."""
    if cache is None or not hasattr(cache, "layers"):
        return None
    states = []
    for layer in cache.layers:
        rec = getattr(layer, "recurrent_states", None)
        if not rec or rec.get(0) is None:
            return None
        states.append(rec[0])
    return states


def state_statistics(states: list[torch.Tensor]) -> dict[str, list[list[float]]]:
    """Mean, variance and Frobenius norm of each (layer, head) state, averaged over the batch: (layers, heads) lists."""
    out = {"mean": [], "var": [], "norm": []}
    for h in states:
        flat = h.float().flatten(2)  # (batch, heads, head_dim * state)
        out["mean"].append(flat.mean(-1).mean(0).tolist())
        out["var"].append(flat.var(-1, unbiased=False).mean(0).tolist())
        out["norm"].append(flat.norm(dim=-1).mean(0).tolist())
    return out
