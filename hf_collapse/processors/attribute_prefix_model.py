"""``AttributePrefixModel``: K attribute prefixes (PEFT prefix-tuning adapters) over one frozen causal LM.

The model runs **all K prefixes in one batched forward**: the K·B rows are attribute-major (row ``k * B + b`` is
attribute ``k`` on input ``b``) and the prefixes' key/value tensors are stacked into one ``DynamicCache``. It keeps
its own cache across decoding steps (``start`` / ``step`` / ``reorder``), because a ``LogitsProcessor`` sees neither
the model outputs nor the cache of ``generate()``.

The checkpoint format, the prefix geometry and the prefixed forward (prefix mask columns, PEFT's position convention:
real tokens start at ``P``) come from ``hf_collapse.modeling.attribute_prefixes``, the same code
``AttributePrefixTrainer`` trains with, so the logits here equal ``PeftModel``'s own forward with ``use_cache=False``.

We never go through ``PeftModel.generate()``: with transformers 5.x + peft 0.21 it silently drops the prefix
(5.x passes ``cache=`` and PEFT injects the deprecated ``past_key_values=``, which is then ignored).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

# the concept (format, geometry, prefixed forward) lives in modeling; CHECKPOINT_INDEX and the geometry helpers are
# re-exported because code imported them from this module before they moved
from ..modeling.attribute_prefixes import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHECKPOINT_INDEX,
    PrefixShape,
    flat_prefix_to_layers,
    layers_to_flat_prefix,
    prefix_cache,
    prefixed_forward,
    prefixed_positions,
    read_attribute_prefixes,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "CHECKPOINT_INDEX",
    "AttributePrefixModel",
    "AttributePrefixOutput",
    "PrefixShape",
    "flat_prefix_to_layers",
    "layers_to_flat_prefix",
    "prefix_cache",
    "prefixed_positions",
]


@dataclass
class AttributePrefixOutput:
    """Logits of all attributes, ``(K, B, T, V)``, and the cache of the K·B rows (attribute-major)."""

    logits: torch.Tensor
    cache: DynamicCache


class AttributePrefixModel(nn.Module):
    """K prefix-conditional LMs (one PEFT prefix per attribute) sharing one frozen base causal LM.

    Args:
        base_model: the causal LM the prefixes were trained on.
        prefixes: attribute name -> PEFT's saved ``prompt_embeddings`` tensor ``(P, num_layers * 2 * token_dim)``.
        shape: the prefix geometry (from the adapters' ``adapter_config.json``).
    """

    def __init__(self, base_model: PreTrainedModel, prefixes: Mapping[str, torch.Tensor], shape: PrefixShape):
        super().__init__()
        if not prefixes:
            raise ValueError("AttributePrefixModel needs at least one attribute prefix")
        self.base_model = base_model
        self.base_model.requires_grad_(False).eval()
        self.attributes: list[str] = list(prefixes)
        self.shape = shape
        device = base_model.get_input_embeddings().weight.device
        dtype = next(base_model.parameters()).dtype
        flat = torch.stack([prefixes[a].to(device=device, dtype=dtype) for a in self.attributes])
        # per layer: key/value (K, H, P, hd), kept as buffers so .to(device) moves them
        for i, (k, v) in enumerate(flat_prefix_to_layers(flat, shape)):
            self.register_buffer(f"prefix_k_{i}", k.contiguous(), persistent=False)
            self.register_buffer(f"prefix_v_{i}", v.contiguous(), persistent=False)
        self._state: dict | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, base_model: PreTrainedModel | str, checkpoint_dir: str | Path, **model_kwargs
    ) -> AttributePrefixModel:
        """Load an attribute-prefix checkpoint (``AttributePrefixTrainer.save_model``, ``write_attribute_prefixes``).

        ``base_model`` is a loaded causal LM, or a name/path passed to ``AutoModelForCausalLM.from_pretrained``.
        """
        # read (and validate) the checkpoint before the possibly slow base model load
        ckpt = read_attribute_prefixes(checkpoint_dir)
        if isinstance(base_model, str):
            base_model = AutoModelForCausalLM.from_pretrained(base_model, **model_kwargs)
        return cls(base_model, ckpt.prefixes, ckpt.shape)

    # ------------------------------------------------------------------ properties
    @property
    def num_attributes(self) -> int:
        """K, the number of attributes."""
        return len(self.attributes)

    @property
    def num_virtual_tokens(self) -> int:
        """P, the prefix length."""
        return self.shape.num_virtual_tokens

    @property
    def vocab_size(self) -> int:
        """Size of the base model's output vocabulary."""
        return self.base_model.get_output_embeddings().weight.shape[0]

    @property
    def device(self) -> torch.device:
        """Device of the prefixes (and of the cache and logits)."""
        return self.prefix_k_0.device

    def attribute_index(self, attribute: str) -> int:
        """Position of ``attribute`` in ``attributes`` (the K axis of the logits)."""
        if attribute not in self.attributes:
            raise ValueError(f"unknown attribute {attribute!r}; this checkpoint has {self.attributes}")
        return self.attributes.index(attribute)

    def prefix_cache(self, batch_size: int, attributes: Sequence[int] | None = None) -> DynamicCache:
        """A cache of ``len(attributes) * batch_size`` rows (attribute-major) holding only the prefixes."""
        idx = torch.arange(self.num_attributes) if attributes is None else torch.as_tensor(list(attributes))
        layers = []
        for i in range(self.shape.num_layers):
            k = getattr(self, f"prefix_k_{i}")[idx].repeat_interleave(batch_size, dim=0)
            v = getattr(self, f"prefix_v_{i}")[idx].repeat_interleave(batch_size, dim=0)
            layers.append((k, v))
        return prefix_cache(layers, self.base_model.config)

    # ------------------------------------------------------------------ stateless forward
    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        position_ids: torch.LongTensor | None = None,
    ) -> AttributePrefixOutput:
        """One batched forward of all K attributes over ``input_ids`` ``(B, T)``.

        ``attention_mask`` covers the real tokens seen so far (past + current, ``(B, past + T)``); the prefix
        columns are added here. Without ``cache`` a fresh prefix cache is built. Returns logits ``(K, B, T, V)``.
        """
        b, t = input_ids.shape
        k = self.num_attributes
        if cache is None:
            cache = self.prefix_cache(b)
        # rows are attribute-major: row k * B + b is attribute k on input b
        out = prefixed_forward(
            self.base_model,
            input_ids.to(self.device).repeat(k, 1),  # (K*B, T)
            self.num_virtual_tokens,
            cache=cache,
            attention_mask=None if attention_mask is None else attention_mask.to(self.device).repeat(k, 1),
            position_ids=None if position_ids is None else position_ids.to(self.device).repeat(k, 1),
            use_cache=True,
        )
        return AttributePrefixOutput(logits=out.logits.view(k, b, t, -1), cache=out.cache)

    # ------------------------------------------------------------------ stateful decoding API
    def reset(self) -> None:
        """Forget the decoding state (cache, mask, positions)."""
        self._state = None

    @property
    def started(self) -> bool:
        """Whether ``start()`` was called since the last ``reset()``."""
        return self._state is not None

    @torch.no_grad()
    def start(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt through all K prefixes; keep the cache. Returns the last-position logits ``(K, B, V)``."""
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=self.device)
        attention_mask = attention_mask.to(self.device).long()
        out = self.forward(input_ids, attention_mask)
        self._state = {
            "cache": out.cache,
            "mask": attention_mask,
            "next_pos": prefixed_positions(attention_mask, self.num_virtual_tokens)[:, -1] + 1,
            "batch": b,
        }
        return out.logits[:, :, -1]

    @torch.no_grad()
    def step(self, tokens: torch.LongTensor) -> torch.Tensor:
        """Feed one new token per row ``(B,)``; returns next-token logits ``(K, B, V)``."""
        if self._state is None:
            raise RuntimeError("AttributePrefixModel.step() called before start()")
        st = self._state
        tokens = tokens.to(self.device).view(-1, 1)
        st["mask"] = torch.cat([st["mask"], st["mask"].new_ones(st["batch"], 1)], dim=1)
        out = self.forward(tokens, st["mask"], cache=st["cache"], position_ids=st["next_pos"].view(-1, 1))
        st["cache"] = out.cache
        st["next_pos"] = st["next_pos"] + 1
        return out.logits[:, :, -1]

    def reorder(self, rows: torch.LongTensor) -> None:
        """Keep input rows ``rows`` (e.g. beam search's parents), for every attribute."""
        if self._state is None:
            return
        st = self._state
        rows = rows.to(self.device)
        b = st["batch"]
        if rows.numel() != b:
            raise ValueError(f"reorder needs {b} row indices, got {rows.numel()}")
        all_rows = (torch.arange(self.num_attributes, device=self.device)[:, None] * b + rows[None, :]).reshape(-1)
        st["cache"].batch_select_indices(all_rows)
        st["mask"] = st["mask"][rows]
        st["next_pos"] = st["next_pos"][rows]
