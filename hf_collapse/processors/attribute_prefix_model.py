"""``AttributePrefixModel``: K attribute prefixes (PEFT prefix-tuning adapters) over one frozen causal LM.

The model runs **all K prefixes in one batched forward**: the K·B rows are attribute-major (row ``k * B + b`` is
attribute ``k`` on input ``b``) and the prefixes' key/value tensors are stacked into one ``DynamicCache``. It keeps
its own cache across decoding steps (``start`` / ``step`` / ``reorder``), because a ``LogitsProcessor`` sees neither
the model outputs nor the cache of ``generate()``.

Position convention: PEFT's. The prefix occupies positions ``0 .. P-1`` and real tokens start at ``P`` (for a
left-padded row, its first real token is at ``P``). That is what ``PeftModel.forward`` does and what
``AttributePrefixTrainer`` trains with, so the logits here equal ``PeftModel``'s own forward with ``use_cache=False``.

We never go through ``PeftModel.generate()``: with transformers 5.x + peft 0.21 it silently drops the prefix
(5.x passes ``cache=`` and PEFT injects the deprecated ``past_key_values=``, which is then ignored).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

CHECKPOINT_INDEX = "attribute_prefixes.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class PrefixShape:
    """Geometry of one PEFT prefix: ``P`` virtual tokens, ``num_layers``, KV heads and head size."""

    num_virtual_tokens: int
    num_layers: int
    num_heads: int
    head_dim: int

    @classmethod
    def from_peft_config(cls, cfg: Mapping | object) -> PrefixShape:
        get = cfg.get if isinstance(cfg, Mapping) else lambda k: getattr(cfg, k)
        heads = int(get("num_attention_heads"))
        return cls(int(get("num_virtual_tokens")), int(get("num_layers")), heads, int(get("token_dim")) // heads)


def flat_prefix_to_layers(flat: torch.Tensor, shape: PrefixShape) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Turn PEFT's flat prefix ``(B, P, num_layers * 2 * token_dim)`` into per-layer ``(key, value)`` pairs.

    Each returned tensor is ``(B, heads, P, head_dim)``. The layout (layer ``l`` key at slot ``2l``, value at
    ``2l + 1``) is the one ``PeftModel.get_prompt`` uses, so a saved ``prompt_embeddings`` tensor means the same
    thing here as in PEFT.
    """
    b = flat.shape[0]
    x = flat.view(b, shape.num_virtual_tokens, shape.num_layers * 2, shape.num_heads, shape.head_dim)
    x = x.permute(2, 0, 3, 1, 4)  # (2L, B, H, P, hd)
    return [(x[2 * i], x[2 * i + 1]) for i in range(shape.num_layers)]


def layers_to_flat_prefix(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Inverse of :func:`flat_prefix_to_layers` for one row: per-layer ``(1, H, P, hd)`` pairs -> ``(P, L*2*H*hd)``."""
    stacked = torch.stack([t[0] for kv in layers for t in kv])  # (2L, H, P, hd)
    p = stacked.shape[2]
    return stacked.permute(2, 0, 1, 3).reshape(p, -1)


def prefix_cache(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], config) -> DynamicCache:
    """A fresh ``DynamicCache`` holding the given per-layer prefix key/values (one entry per row)."""
    return DynamicCache(ddp_cache_data=[(k.contiguous(), v.contiguous()) for k, v in layers], config=config)


def prefixed_positions(attention_mask: torch.Tensor, num_virtual_tokens: int) -> torch.Tensor:
    """Position ids under PEFT's convention: the first real token of every row sits at position ``P``.

    Pads (mask 0) get a harmless repeated position; they are masked out anyway.
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0) + num_virtual_tokens


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
        """Load an attribute-prefix checkpoint written by ``AttributePrefixTrainer.save_model``.

        ``base_model`` is a loaded causal LM, or a name/path passed to ``AutoModelForCausalLM.from_pretrained``.
        """
        checkpoint_dir = Path(checkpoint_dir)
        index_path = checkpoint_dir / CHECKPOINT_INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{checkpoint_dir} is not an attribute-prefix checkpoint (no {CHECKPOINT_INDEX})")
        index = json.loads(index_path.read_text())
        if isinstance(base_model, str):
            base_model = AutoModelForCausalLM.from_pretrained(base_model, **model_kwargs)
        prefixes: dict[str, torch.Tensor] = {}
        shape: PrefixShape | None = None
        for attr in index["attributes"]:
            sub = checkpoint_dir / attr
            cfg = json.loads((sub / ADAPTER_CONFIG).read_text())
            if cfg.get("peft_type") != "PREFIX_TUNING":
                raise ValueError(f"{sub}: expected a PREFIX_TUNING adapter, got {cfg.get('peft_type')!r}")
            s = PrefixShape.from_peft_config(cfg)
            if shape is not None and s != shape:
                raise ValueError(f"{sub}: prefix shape {s} differs from the other attributes' {shape}")
            shape = s
            prefixes[attr] = load_file(str(sub / ADAPTER_WEIGHTS))["prompt_embeddings"]
        assert shape is not None
        return cls(base_model, prefixes, shape)

    # ------------------------------------------------------------------ properties
    @property
    def num_attributes(self) -> int:
        return len(self.attributes)

    @property
    def num_virtual_tokens(self) -> int:
        return self.shape.num_virtual_tokens

    @property
    def vocab_size(self) -> int:
        return self.base_model.get_output_embeddings().weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.prefix_k_0.device

    def attribute_index(self, attribute: str) -> int:
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
        dev = self.device
        input_ids = input_ids.to(dev)
        if cache is None:
            cache = self.prefix_cache(b)
        if attention_mask is None:
            past = cache.get_seq_length() - self.num_virtual_tokens
            attention_mask = torch.ones(b, past + t, dtype=torch.long, device=dev)
        attention_mask = attention_mask.to(dev).long()
        if position_ids is None:
            position_ids = prefixed_positions(attention_mask, self.num_virtual_tokens)[:, -t:]
        full_mask = torch.cat([attention_mask.new_ones(b, self.num_virtual_tokens), attention_mask], dim=1)
        out = self.base_model(
            input_ids=input_ids.repeat(k, 1),
            attention_mask=full_mask.repeat(k, 1),
            position_ids=position_ids.to(dev).repeat(k, 1),
            cache=cache,
            use_cache=True,
        )
        return AttributePrefixOutput(logits=out.logits.view(k, b, t, -1), cache=out.cache)

    # ------------------------------------------------------------------ stateful decoding API
    def reset(self) -> None:
        """Forget the decoding state (cache, mask, positions)."""
        self._state = None

    @property
    def started(self) -> bool:
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
