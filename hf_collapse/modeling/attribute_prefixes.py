"""Attribute prefixes (Air-Decoding's prefix-conditional LMs): the one home of the concept.

An *attribute prefix* is a PEFT prefix-tuning adapter: ``P`` virtual tokens whose key/value pairs are put in front of
every layer's attention of one frozen causal LM. One prefix per attribute turns the LM into K attribute-conditional
LMs. Training (``hf_collapse.trainers.attribute_prefix``) and decoding (``hf_collapse.processors``) both build on
what lives here, so neither depends on the other:

* the checkpoint format: its constants, :func:`write_attribute_prefixes`, :func:`read_attribute_prefixes` and
  :func:`locate_attribute_prefixes` (a folder or a Hub repository id);
* the prefix geometry :class:`PrefixShape` and PEFT's flat layout (:func:`flat_prefix_to_layers`);
* :func:`prefixed_forward`, the only code that runs the base LM under per-row prefixes (prefix mask columns, PEFT's
  position convention, the prefix cache);
* :class:`AttributePrefixLM`, the trainable module (frozen LM + one PEFT ``PrefixEncoder`` per attribute).

The checkpoint layout::

    dir/attribute_prefixes.json    {"format", "attributes", "base_model", "num_virtual_tokens", "hf_collapse_version"}
                                   + optional "start_text"/"start_token_id" (the conditioning training used) and
                                   "default_strength" (the control strength the publisher evaluated)
    dir/<attribute>/adapter_config.json, adapter_model.safetensors   # plain PEFT prefix-tuning adapters
    dir/README.md                  model card (optional)

Each adapter folder loads on its own with ``PeftModel.from_pretrained(base, dir/<attribute>)``: it stores what PEFT
itself stores for a prefix (the materialised key/values, ``prompt_embeddings``, with ``inference_mode=True``), so the
MLP reparameterisation used in training is not needed to use it.

Position convention: PEFT's. The prefix occupies positions ``0 .. P-1`` and real tokens start at ``P`` (for a
left-padded row, its first real token is at ``P``), which is what ``PeftModel.forward`` does for unpadded rows.

This module imports nothing from ``processors``, ``trainers``, ``evals`` or ``scripts``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from ..validation import check_number
from ..version import __version__
from .checkpoint_utils import atomic_directory_write, check_safetensors_files

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard
    from peft import PrefixTuningConfig
    from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_INDEX",
    "MODEL_CARD",
    "PROMPT_EMBEDDINGS",
    "START_TEXT",
    "START_TOKEN_ID",
    "DEFAULT_STRENGTH",
    "AttributePrefixCheckpoint",
    "AttributePrefixLM",
    "HeldPrefixesMixin",
    "resolve_start_token_id",
    "check_prefix_shape",
    "expected_prefix_shape",
    "PrefixShape",
    "flat_prefix_to_layers",
    "layers_to_flat_prefix",
    "peft_prefix_config",
    "prefix_cache",
    "prefixed_forward",
    "prefixed_positions",
    "locate_attribute_prefixes",
    "read_attribute_prefixes",
    "save_attribute_prefixes",
    "validate_attribute_names",
    "write_attribute_prefixes",
]

# ---------------------------------------------------------------------------------------------- the format
CHECKPOINT_INDEX = "attribute_prefixes.json"
CHECKPOINT_FORMAT = "hf-collapse/attribute-prefixes"
# PEFT's own file and tensor names, so every attribute folder is a plain PEFT adapter
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROMPT_EMBEDDINGS = "prompt_embeddings"
MODEL_CARD = "README.md"
# the conditioning the prefixes were trained with: every text started with this token ("[eos] + text" officially)
START_TEXT = "start_text"
START_TOKEN_ID = "start_token_id"
# the control strength the checkpoint's publisher evaluated and recommends (its card's headline row); optional
DEFAULT_STRENGTH = "default_strength"

# keys of the index the writer owns; callers add their own facts (e.g. ``start_text``) beside them
_INDEX_KEYS = ("format", "attributes", "base_model", "num_virtual_tokens", "hf_collapse_version")


def _check_default_strength(value: Any, where: str) -> None:
    # JSON cannot hold NaN but a hand-edited index can hold anything: stop a bad value at the writer and the reader
    check_number(where, DEFAULT_STRENGTH, value, minimum=0.0, allow_none=True)


def validate_attribute_names(attributes: Sequence[str]) -> None:
    """Raise ``ValueError`` unless there are at least two attributes, unique and usable as checkpoint folder names.

    Air-Decoding weighs each token by how much more likely it is under the target attribute than under the others,
    so a single attribute would steer nothing.
    """
    if not isinstance(attributes, (list, tuple)):
        raise ValueError(f"attributes must be a list of names, got {type(attributes).__name__}")
    for a in attributes:
        # each attribute becomes a sub-folder of the checkpoint; a name that escapes it must never be written or
        # (when a stale index names it) deleted
        if not isinstance(a, str) or not a or a in {".", ".."} or "/" in a or "\\" in a or a.startswith("."):
            raise ValueError(f"attribute name {a!r} cannot be used as a checkpoint folder name")
    if len(set(attributes)) != len(attributes):
        raise ValueError(f"duplicate attribute names in {list(attributes)}")
    if len(attributes) < 2:
        raise ValueError(f"at least two attributes are needed (Air-Decoding compares them), got {list(attributes)}")


# ---------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class PrefixShape:
    """Geometry of one PEFT prefix: ``P`` virtual tokens, ``num_layers``, KV heads and head size."""

    num_virtual_tokens: int
    num_layers: int
    num_heads: int
    head_dim: int

    @classmethod
    def from_peft_config(cls, cfg: Mapping | object) -> PrefixShape:
        """Read the geometry from a ``PrefixTuningConfig`` or its ``adapter_config.json`` dict.

        ``num_attention_heads`` is the number of *key/value* heads (PEFT fills it so for GQA models).
        """
        get = cfg.get if isinstance(cfg, Mapping) else lambda k: getattr(cfg, k)
        heads = int(get("num_attention_heads"))
        return cls(int(get("num_virtual_tokens")), int(get("num_layers")), heads, int(get("token_dim")) // heads)

    @property
    def flat_dim(self) -> int:
        """Width of PEFT's flat prefix: ``num_layers * 2 * num_heads * head_dim``."""
        return self.num_layers * 2 * self.num_heads * self.head_dim


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


# ---------------------------------------------------------------------------------------------- the prefixed forward
def prefix_cache(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], config) -> DynamicCache:
    """A fresh ``DynamicCache`` holding the given per-layer prefix key/values ``(N, H, P, hd)`` (one entry per row)."""
    return DynamicCache(ddp_cache_data=[(k.contiguous(), v.contiguous()) for k, v in layers], config=config)


def prefixed_positions(attention_mask: torch.Tensor, num_virtual_tokens: int) -> torch.Tensor:
    """Position ids ``(N, L)`` for a real-token mask ``(N, L)`` under PEFT's convention: first real token at ``P``.

    Pads (mask 0) get a harmless repeated position; they are masked out anyway.
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0) + num_virtual_tokens


def prefixed_forward(
    base_model: PreTrainedModel,
    input_ids: torch.LongTensor,
    num_virtual_tokens: int,
    *,
    prefix: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    cache: DynamicCache | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    use_cache: bool = False,
) -> CausalLMOutputWithPast:
    """Run ``base_model`` on ``input_ids`` ``(N, T)`` with every row under its own prefix.

    The one place that knows how a prefix enters the LM: the prefix's key/values sit in the cache, ``P`` always-on
    columns are put in front of the attention mask, and real tokens get PEFT's positions (first real token at ``P``).
    Both ``AttributePrefixLM`` (training) and ``AttributePrefixModel`` (decoding) call it.

    Args:
        base_model: the frozen causal LM.
        input_ids: ``(N, T)`` the new tokens.
        num_virtual_tokens: ``P``.
        prefix: per-layer ``(key, value)``, each ``(N, H, P, hd)``: start from a fresh cache holding only these.
        cache: or continue a cache that already holds the prefixes (and maybe earlier tokens) of the N rows; it is
            extended in place. Give exactly one of ``prefix`` and ``cache``.
        attention_mask: ``(N, past + T)`` over the *real* tokens seen so far (without the prefix columns); ``None``
            means no padding.
        position_ids: ``(N, T)``; by default derived from ``attention_mask`` under PEFT's convention.
        use_cache: passed to the base model (``False`` for training: the cache is thrown away anyway).

    Returns:
        The base model's output: ``logits`` ``(N, T, V)`` and, with ``use_cache``, the extended ``cache``.
    """
    if (prefix is None) == (cache is None):
        raise ValueError("prefixed_forward needs exactly one of prefix= (a fresh prefix) or cache= (continue one)")
    n, t = input_ids.shape
    if cache is None:
        cache = prefix_cache(prefix, base_model.config)
    if attention_mask is None:
        # the cache holds P prefix columns plus the real tokens seen before this call
        past = cache.get_seq_length() - num_virtual_tokens
        attention_mask = torch.ones(n, past + t, dtype=torch.long, device=input_ids.device)
    attention_mask = attention_mask.to(input_ids.device).long()
    if position_ids is None:
        position_ids = prefixed_positions(attention_mask, num_virtual_tokens)[:, -t:]
    full_mask = torch.cat([attention_mask.new_ones(n, num_virtual_tokens), attention_mask], dim=1)  # (N, P+past+T)
    return base_model(
        input_ids=input_ids,
        attention_mask=full_mask,
        position_ids=position_ids.to(input_ids.device),
        cache=cache,
        use_cache=use_cache,
    )


# ---------------------------------------------------------------------------------------------- the trainable module
def peft_prefix_config(
    base_model: PreTrainedModel,
    num_virtual_tokens: int,
    prefix_projection: bool = True,
    encoder_hidden_size: int = 512,
) -> PrefixTuningConfig:
    """The ``PrefixTuningConfig`` PEFT itself would build for ``base_model`` (heads, token_dim, layers filled in)."""
    from peft import PrefixTuningConfig, TaskType

    # PEFT fills token_dim/num_layers/num_attention_heads (KV heads for GQA models) in this helper; reusing it keeps
    # our adapters byte-compatible with what get_peft_model would produce
    from peft.utils.other import _prepare_prompt_learning_config

    cfg = PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=prefix_projection,
        encoder_hidden_size=encoder_hidden_size,
    )
    cfg = _prepare_prompt_learning_config(cfg, base_model.config.to_dict())
    cfg.base_model_name_or_path = getattr(base_model, "name_or_path", None) or getattr(
        base_model.config, "_name_or_path", None
    )
    return cfg


class AttributePrefixLM(nn.Module):
    """A frozen causal LM plus one PEFT ``PrefixEncoder`` per attribute: what ``AttributePrefixTrainer`` trains.

    ``forward(input_ids, attribute_ids, attention_mask)`` conditions every row on its own attribute's prefix
    (PEFT's position convention) and returns the base model's output.

    Args:
        base_model: the causal LM; its parameters are frozen here.
        attributes: attribute names, one prefix each (the order of ``attribute_ids``).
        peft_config: a ``PrefixTuningConfig`` for ``base_model``, e.g. from :func:`peft_prefix_config`.
    """

    # makes the Trainer count label tokens over the whole accumulated batch (num_items_in_batch)
    accepts_loss_kwargs = True

    def __init__(self, base_model: PreTrainedModel, attributes: Sequence[str], peft_config: PrefixTuningConfig):
        super().__init__()
        from peft.tuners.prefix_tuning import PrefixEncoder

        self.base_model = base_model
        self.base_model.requires_grad_(False)
        self.attributes = list(attributes)
        self.peft_config = peft_config
        self.shape = PrefixShape.from_peft_config(peft_config)
        # ModuleDict keys cannot contain dots; attribute names can, so index by position
        self.encoders = nn.ModuleDict({f"a{i}": PrefixEncoder(peft_config) for i in range(len(self.attributes))})
        self.register_buffer("prefix_tokens", torch.arange(peft_config.num_virtual_tokens), persistent=False)
        # Trainer reads model.config in a few places (e.g. use_cache, model card)
        self.config = base_model.config

    def flat_prefix(self, i: int) -> torch.Tensor:
        """Attribute ``i``'s materialised prefix ``(P, num_layers * 2 * token_dim)``, PEFT's saved layout."""
        return self.encoders[f"a{i}"](self.prefix_tokens)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attribute_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits ``(B, T, V)`` of ``input_ids`` ``(B, T)``, row ``b`` under attribute ``attribute_ids[b]``'s prefix."""
        # each prefix is computed once (its MLP is the costly part), then gathered per row
        flats = torch.stack([self.flat_prefix(i) for i in range(len(self.attributes))])  # (K, P, D')
        dtype = next(self.base_model.parameters()).dtype
        rows = flats[attribute_ids].to(dtype)  # (B, P, D')
        return prefixed_forward(
            self.base_model,
            input_ids,
            self.shape.num_virtual_tokens,
            prefix=flat_prefix_to_layers(rows, self.shape),
            attention_mask=attention_mask,
            use_cache=False,
        )


def save_attribute_prefixes(
    prefix_lm: AttributePrefixLM,
    output_dir: str | os.PathLike,
    model_card: ModelCard | None = None,
    extra_index: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``prefix_lm``'s prefixes as an attribute-prefix checkpoint (see :func:`write_attribute_prefixes`)."""
    with torch.no_grad():
        # PEFT saves float32; the base model's dtype may be lower
        flats = [prefix_lm.flat_prefix(i).detach().float().cpu() for i in range(len(prefix_lm.attributes))]
    return write_attribute_prefixes(
        output_dir, prefix_lm.attributes, flats, prefix_lm.peft_config, model_card=model_card, extra_index=extra_index
    )


# ---------------------------------------------------------------------------------------------- writer
def write_attribute_prefixes(
    output_dir: str | os.PathLike,
    attributes: Sequence[str],
    flat_prefixes: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    peft_config: PrefixTuningConfig,
    *,
    base_model: str | None = None,
    model_card: ModelCard | None = None,
    extra_index: Mapping[str, Any] | None = None,
) -> Path:
    """Write an attribute-prefix checkpoint to ``output_dir``, all or nothing.

    Everything is written to a temporary sibling folder and swapped in as a whole (``atomic_directory_write``): a
    failure or a kill at any point leaves either the old checkpoint, byte-identical, or the new one, never old and
    new prefixes mixed. Other files in ``output_dir`` (it may be a Trainer's ``output_dir`` with its ``checkpoint-*``
    folders) are kept; attribute folders of the old checkpoint that the new one does not have are removed.

    Args:
        output_dir: the checkpoint folder (created if missing).
        attributes: attribute names, one sub-folder each.
        flat_prefixes: per attribute, PEFT's ``prompt_embeddings`` ``(P, num_layers * 2 * token_dim)``; a sequence in
            the order of ``attributes`` or a mapping attribute -> tensor.
        peft_config: the ``PrefixTuningConfig`` the prefixes belong to; saved (with ``inference_mode=True``, as PEFT
            does) as every folder's ``adapter_config.json``.
        base_model: the base model's name to record; by default ``peft_config.base_model_name_or_path``.
        model_card: written as ``README.md`` when given; without one an existing ``README.md`` is kept.
        extra_index: more facts for ``attribute_prefixes.json`` (e.g. ``{"start_text": ...}``, or
            ``{"default_strength": 60.0}``, the control strength the checkpoint was evaluated at, which
            ``AttributePrefixModel.default_strength`` and ``hf-collapse generate`` use when none is given).

    Returns:
        The checkpoint folder.
    """
    attributes = list(attributes)
    validate_attribute_names(attributes)
    if isinstance(flat_prefixes, Mapping):
        missing = [a for a in attributes if a not in flat_prefixes]
        if missing:
            raise ValueError(f"no prefix given for attributes {missing}")
        flats = [flat_prefixes[a] for a in attributes]
    else:
        flats = list(flat_prefixes)
    if len(flats) != len(attributes):
        raise ValueError(f"{len(flats)} prefixes for {len(attributes)} attributes")
    shape = PrefixShape.from_peft_config(peft_config)
    for a, flat in zip(attributes, flats):
        if tuple(flat.shape) != (shape.num_virtual_tokens, shape.flat_dim):
            raise ValueError(
                f"prefix of {a!r} has shape {tuple(flat.shape)}, the config needs "
                f"{(shape.num_virtual_tokens, shape.flat_dim)}"
            )
    clash = sorted(set(extra_index or {}) & set(_INDEX_KEYS))
    if clash:
        raise ValueError(f"extra_index may not set the index's own keys {clash}")
    _check_default_strength((extra_index or {}).get(DEFAULT_STRENGTH), "extra_index")

    cfg = copy.deepcopy(peft_config)
    cfg.inference_mode = True  # what PEFT itself saves: the materialised prefix, no MLP
    if base_model is not None:
        cfg.base_model_name_or_path = base_model
    index = {
        "format": CHECKPOINT_FORMAT,
        "attributes": attributes,
        "base_model": cfg.base_model_name_or_path,
        "num_virtual_tokens": shape.num_virtual_tokens,
        "hf_collapse_version": __version__,
        **(extra_index or {}),
    }

    target = Path(output_dir)
    old_entries = _old_checkpoint_entries(target) if target.is_dir() else set()

    def write(staged: str) -> None:
        for attr, flat in zip(attributes, flats):
            sub = Path(staged) / attr
            sub.mkdir()
            cfg.save_pretrained(str(sub))
            tensor = flat.detach().to("cpu", torch.float32).contiguous()
            save_file({PROMPT_EMBEDDINGS: tensor}, str(sub / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (Path(staged) / CHECKPOINT_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if model_card is not None:
            model_card.save(str(Path(staged) / MODEL_CARD))

    # the old checkpoint's index and attribute folders are replaced as a whole; anything else in the folder (a
    # Trainer's checkpoint-* folders, logs) is kept
    atomic_directory_write(target, write, drop_old=lambda entry: entry.name in old_entries)
    return target


def _old_checkpoint_entries(target: Path) -> set[str]:
    """Names in ``target`` that belong to the checkpoint already there (its index and attribute folders)."""
    try:
        attrs = json.loads((target / CHECKPOINT_INDEX).read_text()).get("attributes", [])
        validate_attribute_names(attrs)
    except (OSError, ValueError, AttributeError, TypeError):
        # no (readable) index: only the index name itself is ours; never drop folders an index does not vouch for
        return {CHECKPOINT_INDEX}
    return {CHECKPOINT_INDEX, *attrs}


# ---------------------------------------------------------------------------------------------- held prefixes
def resolve_start_token_id(index: Mapping[str, Any], tokenizer: Any, checkpoint_dir: str | os.PathLike) -> int | None:
    """The start token the prefixes were trained with, from a checkpoint's index (``None``: no conditioning)."""
    start_id = index.get(START_TOKEN_ID)
    if start_id is None and index.get(START_TEXT) is not None:
        if tokenizer is None:
            raise ValueError(
                f"{checkpoint_dir} records its start token as text ({index[START_TEXT]!r}) but not its id; pass "
                "tokenizer=... so it can be looked up"
            )
        start_id = tokenizer.convert_tokens_to_ids(index[START_TEXT])
    return start_id


class HeldPrefixesMixin:
    """K attribute prefixes held as key/value buffers next to one frozen base LM, conditioned like training.

    The one implementation behind ``AttributePrefixModel`` (processor path) and ``AirDecodingForCausalLM`` (fused
    path): validation against the base model, the start token baked in after every prefix, the buffers
    ``prefix_k_<layer>`` / ``prefix_v_<layer>`` ``(K, H, L, hd)`` with L = P (+1 with a start token), and the
    properties both expose. The class using it is an ``nn.Module`` that sets ``_prefix_lm`` (the base model).
    """

    attributes: list[str]
    shape: PrefixShape
    start_token_id: int | None

    def _hold_prefixes(
        self,
        base_model: PreTrainedModel,
        prefixes: Mapping[str, torch.Tensor],
        shape: PrefixShape,
        start_token_id: int | None,
    ) -> None:
        validate_attribute_names(list(prefixes))
        check_prefix_shape(shape, base_model)
        self.attributes = list(prefixes)
        self.shape = shape
        self.start_token_id = start_token_id
        device = base_model.get_input_embeddings().weight.device
        dtype = next(base_model.parameters()).dtype
        flat = torch.stack([prefixes[a].to(device=device, dtype=dtype) for a in self.attributes])  # (K, P, D')
        layers = flat_prefix_to_layers(flat, shape)  # per layer (K, H, P, hd)
        if start_token_id is not None:
            layers = self._append_start_token(base_model, layers, start_token_id)
        # buffers, so that .to(device / dtype) moves them with the base model
        for i, (k, v) in enumerate(layers):
            self.register_buffer(f"prefix_k_{i}", k.contiguous(), persistent=False)
            self.register_buffer(f"prefix_v_{i}", v.contiguous(), persistent=False)

    @torch.no_grad()
    def _append_start_token(
        self, base_model: PreTrainedModel, layers: list[tuple[torch.Tensor, torch.Tensor]], start_token_id: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prefix key/values followed by the start token's, computed once under each prefix (at position P)."""
        if not 0 <= start_token_id < base_model.get_input_embeddings().weight.shape[0]:
            raise ValueError(f"start_token_id {start_token_id} is outside the base model's vocabulary")
        k = layers[0][0].shape[0]
        ids = torch.full((k, 1), start_token_id, dtype=torch.long, device=layers[0][0].device)
        out = prefixed_forward(base_model, ids, self.shape.num_virtual_tokens,
                               cache=prefix_cache(layers, base_model.config), use_cache=True)  # fmt: skip
        # the start token's own prediction is the probability of a text's first token (sequence likelihoods)
        self.register_buffer("start_logits", out.logits[:, -1].float(), persistent=False)  # (K, V)
        return [(layer.keys, layer.values) for layer in out.cache.layers][: self.shape.num_layers]

    def own_start_columns(self, input_ids: torch.Tensor, mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``(B,)`` per row, the mask column of the prompt's own start token, or -1 when the row has none.

        The start token is baked into the prefix slots, so a prompt whose first real token is that token would read
        it twice; callers hide this column from the prefix rows. ``mask`` ``(B, offset + T)`` covers the real tokens
        seen so far, ``input_ids`` ``(B, T)`` the last ``T`` of them.
        """
        first = mask.argmax(-1)  # (B,) column of each row's first real token
        tok = input_ids.gather(1, (first - offset).clamp(min=0)[:, None])[:, 0]
        return torch.where(tok == self.start_token_id, first, torch.full_like(first, -1))

    @property
    def num_attributes(self) -> int:
        """K, the number of attributes."""
        return len(self.attributes)

    @property
    def num_virtual_tokens(self) -> int:
        """P, the prefix length."""
        return self.shape.num_virtual_tokens

    @property
    def prefix_length(self) -> int:
        """L, the cached slots before a prompt: P, plus one for the start token when the checkpoint has one."""
        return self.prefix_k_0.shape[2]

    @property
    def vocab_size(self) -> int:
        """Size of the base model's output vocabulary."""
        return self._prefix_lm.get_output_embeddings().weight.shape[0]

    def attribute_index(self, attribute: str) -> int:
        """Position of ``attribute`` in ``attributes`` (the K axis of the attribute logits)."""
        if attribute not in self.attributes:
            raise ValueError(f"unknown attribute {attribute!r}; this checkpoint has {self.attributes}")
        return self.attributes.index(attribute)


# ---------------------------------------------------------------------------------------------- reader
class AttributePrefixCheckpoint(NamedTuple):
    """What :func:`read_attribute_prefixes` returns; unpacks as ``index, prefixes, shape``.

    Attributes:
        index: the parsed ``attribute_prefixes.json``.
        prefixes: attribute -> ``prompt_embeddings`` ``(P, num_layers * 2 * token_dim)``, in the index's order.
        shape: the prefix geometry shared by all attributes.
    """

    index: dict[str, Any]
    prefixes: dict[str, torch.Tensor]
    shape: PrefixShape

    @property
    def attributes(self) -> list[str]:
        """Attribute names in the checkpoint's order."""
        return list(self.prefixes)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def expected_prefix_shape(base_model: PreTrainedModel, num_virtual_tokens: int) -> PrefixShape:
    """The prefix geometry PEFT would give ``base_model`` (layers, key/value heads, head size)."""
    return PrefixShape.from_peft_config(peft_prefix_config(base_model, num_virtual_tokens))


def check_prefix_shape(shape: PrefixShape, base_model: PreTrainedModel) -> None:
    """Raise ``ValueError`` if prefixes of ``shape`` do not fit ``base_model`` (checked before any forward)."""
    expected = expected_prefix_shape(base_model, shape.num_virtual_tokens)
    if shape != expected:
        name = getattr(base_model.config, "_name_or_path", "") or type(base_model).__name__
        raise ValueError(
            f"these prefixes were trained for another model: they have {shape.num_layers} layers x "
            f"{shape.num_heads} key/value heads x {shape.head_dim} dims, {name} needs {expected.num_layers} x "
            f"{expected.num_heads} x {expected.head_dim}. Load them with the base model they were trained on."
        )


def locate_attribute_prefixes(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local folder of an attribute-prefix checkpoint given as a folder or as a Hub repository id.

    A folder is returned as it is. Anything else is taken as a Hub repository id (``"org/name"``) and fetched with
    ``huggingface_hub.snapshot_download`` into the usual Hub cache, only the files the format has (the index, each
    attribute's ``adapter_config.json`` and ``adapter_model.safetensors``, the card), or found in that cache when
    ``local_files_only`` is set or ``HF_HUB_OFFLINE=1``.

    Args:
        name_or_path: a checkpoint folder, or a Hub repository id.
        revision: the Hub branch, tag or commit (default: the default branch).
        token: the Hub token, as ``huggingface_hub`` takes it.
        cache_dir: the Hub cache to use instead of the default one.
        local_files_only: never reach the network; use the Hub cache only.

    Raises:
        FileNotFoundError: ``name_or_path`` is neither a folder nor a Hub repository that could be fetched (the
            Hub's own error is chained, and its message repeated).
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    repo_id = str(name_or_path)
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=[CHECKPOINT_INDEX, f"*/{ADAPTER_CONFIG}", f"*/{ADAPTER_WEIGHTS}", MODEL_CARD],
        )
    except HFValidationError as err:  # e.g. "prefixes/typo" that is no folder and no valid repository id
        raise FileNotFoundError(
            f"{repo_id!r} is not a folder, and not a valid Hub repository id either ({err}). Pass the folder of an "
            f"attribute-prefix checkpoint (the one holding {CHECKPOINT_INDEX}) or a Hub id such as 'org/name'."
        ) from err
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as err:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder, and fetching it from the Hub failed: {type(err).__name__}: {err}. "
            "Check the repository id, the revision and your token; without network access, download it once "
            "(huggingface_hub.snapshot_download) or pass a local folder."
        ) from err
    return Path(folder)


def read_attribute_prefixes(checkpoint_dir: str | os.PathLike) -> AttributePrefixCheckpoint:
    """Read an attribute-prefix checkpoint (any written since the format's first version).

    Raises:
        FileNotFoundError: ``checkpoint_dir`` has no ``attribute_prefixes.json``.
        ValueError: the index, an adapter config or a prefix tensor is not what the format says.
        hf_collapse.modeling.checkpoint_utils.CorruptCheckpointError: a truncated or corrupt weight file.
    """
    checkpoint_dir = Path(checkpoint_dir)
    index_path = checkpoint_dir / CHECKPOINT_INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not an attribute-prefix checkpoint (no {CHECKPOINT_INDEX})")
    index = _read_json(index_path)
    # "format" was written from the start, but a hand-made index without it is accepted
    if index.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise ValueError(f"{index_path}: format {index['format']!r} is not {CHECKPOINT_FORMAT!r}")
    attributes = index.get("attributes")
    if not isinstance(attributes, list):
        raise ValueError(f"{index_path}: 'attributes' must be a list of attribute names")
    validate_attribute_names(attributes)
    prefixes: dict[str, torch.Tensor] = {}
    shape: PrefixShape | None = None
    for attr in attributes:
        sub = checkpoint_dir / attr
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (sub / name).is_file():
                raise FileNotFoundError(f"{index_path} lists attribute {attr!r} but {sub / name} is missing")
        cfg = _read_json(sub / ADAPTER_CONFIG)
        if cfg.get("peft_type") != "PREFIX_TUNING":
            raise ValueError(f"{sub}: expected a PREFIX_TUNING adapter, got {cfg.get('peft_type')!r}")
        s = PrefixShape.from_peft_config(cfg)
        if shape is not None and s != shape:
            raise ValueError(f"{sub}: prefix shape {s} differs from the other attributes' {shape}")
        shape = s
        check_safetensors_files(sub)
        flat = load_file(str(sub / ADAPTER_WEIGHTS))[PROMPT_EMBEDDINGS]
        if tuple(flat.shape) != (s.num_virtual_tokens, s.flat_dim):
            raise ValueError(
                f"{sub}: {PROMPT_EMBEDDINGS} has shape {tuple(flat.shape)}, its config needs "
                f"{(s.num_virtual_tokens, s.flat_dim)}"
            )
        prefixes[attr] = flat
    assert shape is not None  # validate_attribute_names rejected an empty list
    start_id = index.get(START_TOKEN_ID)
    if start_id is not None and (isinstance(start_id, bool) or not isinstance(start_id, int) or start_id < 0):
        raise ValueError(f"{index_path}: {START_TOKEN_ID} must be a token id (int >= 0), got {start_id!r}")
    _check_default_strength(index.get(DEFAULT_STRENGTH), str(index_path))
    if index.get("num_virtual_tokens", shape.num_virtual_tokens) != shape.num_virtual_tokens:
        raise ValueError(
            f"{index_path}: num_virtual_tokens {index['num_virtual_tokens']} but the adapters have "
            f"{shape.num_virtual_tokens}"
        )
    return AttributePrefixCheckpoint(index, prefixes, shape)
