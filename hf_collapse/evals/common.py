"""Shared pieces of the long-context evaluations: a byte tokenizer, model loading, state statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ByteTokenizer", "load_model_and_tokenizer", "recurrent_states", "state_statistics", "ModelArguments"]


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


@dataclass
class ModelArguments:
    """The model, device and mitigation-override options shared by the long-context evaluation commands."""

    model: str = field(metadata={"help": "Checkpoint folder of a causal LM (e.g. a robust_mamba2 or mamba2 one)."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer folder, or 'bytes' for byte-level models; default: the model's."}
    )
    device: str = field(default="cpu", metadata={"help": "torch device."})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (CPU runs)."})
    insertion_scale: float | None = field(default=None, metadata={"help": "M1 override (loads as RobustMamba2)."})
    decay_scale: float | None = field(default=None, metadata={"help": "M1 override (loads as RobustMamba2)."})
    state_norm_max: float | None = field(default=None, metadata={"help": "M2 cap override (loads as RobustMamba2)."})
    state_norm_every: int | None = field(default=None, metadata={"help": "M2 period override."})
    sliding_window: int | None = field(default=None, metadata={"help": "M3 window override (loads as RobustMamba2)."})

    def mitigation_overrides(self) -> dict:
        """The mitigation fields that were given (then the model is loaded as RobustMamba2ForCausalLM)."""
        names = ("insertion_scale", "decay_scale", "state_norm_max", "state_norm_every", "sliding_window")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def load_model_and_tokenizer(model_path: str, tokenizer: str | None = None, device: str = "cpu", **mitigations):
    """Load any causal LM checkpoint; with mitigation overrides load it as ``RobustMamba2ForCausalLM``.

    ``tokenizer``: a tokenizer folder, ``"bytes"`` for ``ByteTokenizer``, or None for the model folder's own.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_collapse  # noqa: F401  (registers robust_mamba2 with the Auto classes)

    if mitigations:
        from ..modeling.robust_mamba2 import RobustMamba2ForCausalLM

        model = RobustMamba2ForCausalLM.from_pretrained(model_path, **mitigations)
        model.config.check_mitigations()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path)
    model = model.to(device).eval()
    if tokenizer == "bytes":
        tok = ByteTokenizer()
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer or model_path)
    return model, tok


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
