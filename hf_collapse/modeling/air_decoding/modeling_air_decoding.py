"""Fused Air-Decoding: the generator and the K attribute prefixes in ONE forward of the base model per step.

``AirDecodingLogitsProcessor`` on its own (the processor path) sees only the generator's scores, so it runs the K
attribute prefixes in a second forward per step. :class:`AirDecodingForCausalLM` wraps the base model instead: its
forward extends generate()'s B rows with the K·B prefix rows, runs the base model once on all (K+1)·B rows with one
cache, returns the generator's logits to ``generate()`` and keeps the attribute logits ``(K, B, V)`` for the
processor, which then needs no forward of its own.

Rows (all tensors below): generator rows ``0 .. B-1``, then attribute-major prefix rows: row ``B + k·B + b`` is
attribute ``k`` on input ``b`` (the layout ``AttributePrefixModel`` uses for its K·B rows).

The cache (:class:`AirDecodingCache`) holds ``L + past`` slots for every row, ``L`` the prefix length: ``P``, plus
one when the checkpoint records the start token its prefixes were trained with (``start_token_id``, e.g. ``[eos]``):

* prefix rows: their prefix's key/values in slots ``0 .. P-1`` (and the start token's, computed once under each
  prefix at position ``P``), then their real tokens; PEFT's position convention (first real token at position ``L``,
  also for a left-padded row), as ``prefixed_forward`` does. A prompt whose first real token already is the start
  token has that copy hidden from its prefix rows, exactly as ``AttributePrefixModel`` does (the cache remembers the
  hidden column of each input row, ``AirDecodingCache.start_columns``);
* generator rows: ``L`` zero-filled slots that their attention mask always hides (mask 0), then their real tokens at
  the positions generate() computes. A masked key gets exactly zero attention weight, so the generator's logits are
  the plain base model's (tested to float tolerance).

What transformers 5.24's ``generate()`` does with the cache, and why this works with the extra P slots:

* ``_prepare_cache_for_generation`` builds the cache before the prefill; we override it to build an *empty*
  ``AirDecodingCache``. It must stay empty until the first forward: ``_prefill`` reads ``cache.get_seq_length()``
  and, when it is not 0, slices that many tokens off the prompt (cache continuation). The first forward fills the
  prefix slots, then runs the prompt.
* After the prefill ``generate()`` feeds one token per step (``next_sequence_length=1``) and never reads the cache
  length again; the base model's mask builder does (``get_query_offset`` / ``get_mask_sizes`` = ``L + past``), which
  is why the 2-D mask we pass has ``L + past + T`` columns and the physical cache length must stay ``L + past``.
* ``attention_mask``: generate() keeps a ``(B, past + T)`` mask over the *real* tokens and grows it by one column per
  step; it drops it (``None``) from the start when the prompt has no padding. Either way we rebuild the
  ``(rows, L + past + T)`` mask here (ones when ``None``).
* ``position_ids``: generate() keeps ``cumsum(mask) - 1`` (0 at pads) and grows it by one per step;
  ``prepare_inputs_for_generation`` slices it to the new tokens. The generator rows use them unchanged; the prefix rows
  get PEFT's positions from the mask (``prefixed_positions``).
* ``num_return_sequences`` / ``num_beams``: ``_expand_inputs_for_generation`` repeats input ids and mask before the
  prefill, while the cache is still empty, so nothing needs expanding there. Beam search calls
  ``cache.reorder_cache(beam_idx)`` with generator-row indices ``(B,)`` after each step; ``AirDecodingCache`` applies
  them to every group (and to its per-row start columns). ``batch_repeat_interleave`` and ``batch_select_indices``
  (not called by 5.24's built-in strategies, but part of the ``Cache`` API) act on every group too.
* ``crop`` (used by ``DeferredStopCheck`` on mps and assisted decoding) removes trailing slots, which is the same
  operation for every row, so the base class's method is right.

This module imports nothing from ``processors``: the processors import it.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..attribute_prefixes import (
    HeldPrefixesMixin,
    PrefixShape,
    check_prefix_shape,
    locate_attribute_prefixes,
    prefixed_positions,
    read_attribute_prefixes,
    resolve_start_token_id,
    validate_attribute_names,
)
from ..checkpoint_utils import atomic_directory_write, check_model_type
from .configuration_air_decoding import AirDecodingConfig

__all__ = ["AirDecodingCache", "AirDecodingForCausalLM"]

CONFIG_NAME = "config.json"
MODEL_CARD = "README.md"

# said by every error about a model the fused path cannot serve
_PROCESSOR_PATH_HINT = (
    "To steer another model (e.g. a larger generator guided by a smaller attribute model), use the processor path: "
    "AirDecodingLogitsProcessor(AttributePrefixModel.from_pretrained(guide_model, prefixes_dir), ...)."
)


# ---------------------------------------------------------------------------------------------- the cache
class AirDecodingCache(DynamicCache):
    """A ``DynamicCache`` of ``num_groups`` groups of B rows: the B generator rows, then one group per attribute.

    Every batch operation generate() (or a user) applies with *generator-row* indices is applied to each group, so
    row ``g·B + b`` always stays attribute ``g - 1`` (or the generator, ``g = 0``) on input ``b``.

    Args:
        config: the base model's config (one ``DynamicLayer`` per layer).
        num_groups: ``K + 1``.
        prefix_length: ``L``, the prefix slots in front of every row (``P``, +1 with a start token).

    Attributes:
        start_columns: ``(B,)`` per input row, the column (among its real-token columns) of a prompt's own start
            token, hidden from the prefix rows because the prefix slots already hold one; ``-1`` when there is none,
            ``-2`` while the row has had no real token yet. ``None`` without a start token.
    """

    def __init__(self, config, num_groups: int, prefix_length: int):
        super().__init__(config=config)
        self.num_groups = int(num_groups)
        self.prefix_length = int(prefix_length)
        self.start_columns: torch.Tensor | None = None

    @property
    def prefix_filled(self) -> bool:
        """Whether the prefix slots were written (by the first forward)."""
        return self.get_seq_length() > 0

    @property
    def group_batch_size(self) -> int:
        """B, the number of generator rows (0 while empty)."""
        if not self.prefix_filled:
            return 0
        return self.layers[0].keys.shape[0] // self.num_groups

    def real_length(self) -> int:
        """Tokens seen so far by each row, without the L prefix slots."""
        return max(self.get_seq_length() - self.prefix_length, 0) if self.prefix_filled else 0

    def fill_prefix_slots(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write the L prefix slots of all rows: per layer ``(key, value)`` of shape ``((K+1)·B, H, L, hd)``."""
        if self.prefix_filled:
            raise RuntimeError("the prefix slots of this AirDecodingCache are already filled")
        if len(layers) != len(self.layers):
            raise ValueError(f"{len(layers)} prefix layers for a cache of {len(self.layers)} layers")
        for layer, (k, v) in zip(self.layers, layers):
            layer.update(k.contiguous(), v.contiguous())

    def _all_groups(self, indices: torch.Tensor) -> torch.Tensor:
        """Generator-row indices ``(N,)`` -> the same rows in every group ``(num_groups·N,)``, group-major."""
        b = self.group_batch_size
        device = self.layers[0].keys.device
        offsets = torch.arange(self.num_groups, device=device) * b
        return (offsets[:, None] + _row_indices(indices, device)[None, :]).reshape(-1)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: generator row ``i`` continues row ``beam_idx[i]``; so does every prefix row of input ``i``."""
        if self.prefix_filled:
            self._select_start_columns(beam_idx)
            super().reorder_cache(self._all_groups(beam_idx))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep generator rows ``indices`` and, for each, its K prefix rows."""
        if self.prefix_filled:
            self._select_start_columns(indices)
            super().batch_select_indices(self._all_groups(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each input ``repeats`` times within every group (what ``repeat_interleave`` does to B rows)."""
        if self.prefix_filled:
            rows = torch.arange(self.group_batch_size, device=self.layers[0].keys.device).repeat_interleave(repeats)
            self._select_start_columns(rows)
            super().batch_select_indices(self._all_groups(rows))

    def _select_start_columns(self, indices: torch.Tensor) -> None:
        if self.start_columns is not None:
            self.start_columns = self.start_columns[_row_indices(indices, self.start_columns.device)]


def _row_indices(indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Row indices ``(N,)`` (long) from indices or a boolean row mask, as the ``Cache`` batch operations accept."""
    indices = torch.as_tensor(indices, device=device)
    if indices.dtype == torch.bool:
        indices = indices.nonzero()
    return indices.view(-1).long()


@dataclass
class _AttributeStep:
    """The attribute logits of the last forward and what identifies its step."""

    logits: torch.Tensor  # (K, B, V) float32, last position
    batch_size: int  # B
    length: int  # past + T: the length of generate()'s input_ids at this step
    last_tokens: torch.Tensor  # (B,) the last input token of every row


# ---------------------------------------------------------------------------------------------- the model
class AirDecodingForCausalLM(HeldPrefixesMixin, PreTrainedModel, GenerationMixin):
    r"""
    A base causal LM plus K attribute prefixes, run as ONE forward of ``(K+1)·B`` rows per step: ``generate()`` gets
    the generator's logits, :class:`~hf_collapse.AirDecodingLogitsProcessor` (or the weighted-decoding processor) reads
    the attribute logits ``(K, B, V)`` of the same forward.

    Build it with :meth:`from_base` (in memory) or :meth:`from_pretrained` (a folder written by
    :meth:`save_pretrained`, or ``AutoModelForCausalLM.from_pretrained`` after ``import hf_collapse``).

    Args:
        config: its [`AirDecodingConfig`].
        base_model: the causal LM (frozen and put in eval mode here).
        prefixes: attribute name -> PEFT's ``prompt_embeddings`` ``(P, num_layers * 2 * token_dim)``.
        shape: the prefix geometry; must fit ``base_model`` (``check_prefix_shape``).
        prefixes_dir: the checkpoint folder the prefixes came from (recorded by :meth:`save_pretrained`).
        prefixes_repo_id: the Hub repository the prefixes were fetched from, when they were (``prefixes_dir`` is
            then its copy in the Hub cache): :meth:`save_pretrained` records the repository id, not the cache path.
        start_token_id: the token every training text started with (recorded in the checkpoint by
            ``AttributePrefixTrainer``); it is put between each prefix and every prompt, and a prompt's own copy is
            hidden from the prefix rows, exactly as ``AttributePrefixModel`` does.

    Example:

    ```python
    >>> import hf_collapse
    >>> from hf_collapse import AirDecodingForCausalLM, AirDecodingLogitsProcessor
    >>> fused = AirDecodingForCausalLM.from_base(lm, "prefixes")
    >>> proc = AirDecodingLogitsProcessor(fused, target="positive", strength=140.0)
    >>> out = fused.generate(**tok(prompts, return_tensors="pt", padding=True), logits_processor=[proc],
    ...                      do_sample=True, top_k=200, max_new_tokens=50)
    ```
    """

    config_class = AirDecodingConfig
    base_model_prefix = "model"  # PreTrainedModel.base_model then returns the wrapped LM
    main_input_name = "input_ids"
    _supports_sdpa = True  # the wrapper has no attention of its own: the base model's choice applies

    def __init__(
        self,
        config: AirDecodingConfig,
        base_model: PreTrainedModel,
        prefixes: Mapping[str, torch.Tensor],
        shape: PrefixShape,
        prefixes_dir: str | os.PathLike | None = None,
        start_token_id: int | None = None,
        prefixes_repo_id: str | None = None,
    ):
        super().__init__(config)
        attributes = list(prefixes)
        validate_attribute_names(attributes)
        try:
            check_prefix_shape(shape, base_model)
        except ValueError as err:
            raise ValueError(
                f"{err} The fused model runs the prefixes inside the base model's own forward, so they must come from "
                f"that same base model. {_PROCESSOR_PATH_HINT}"
            ) from err
        base_config = base_model.config.get_text_config(decoder=True)
        probe = DynamicCache(config=base_config)
        if len(probe.layers) != shape.num_layers or any(type(layer) is not DynamicLayer for layer in probe.layers):
            kinds = sorted({type(layer).__name__ for layer in probe.layers})
            raise ValueError(
                f"the fused Air-Decoding model needs a base model whose {shape.num_layers} layers all use full "
                f"attention (a sliding window would drop the prefix slots); this one's cache layers are {kinds}. "
                f"{_PROCESSOR_PATH_HINT}"
            )
        self.model = base_model
        self.model.requires_grad_(False).eval()
        self.prefixes_dir = None if prefixes_dir is None else Path(os.path.abspath(prefixes_dir))
        self.prefixes_repo_id = prefixes_repo_id
        # generate() reads pad/eos/max_length defaults from here: those of the base model
        self.generation_config = copy.deepcopy(base_model.generation_config)
        # the same held prefixes (start token baked in) as AttributePrefixModel, so both paths condition alike
        self._hold_prefixes(base_model, prefixes, shape, start_token_id)
        self._base_keeps_logits = "logits_to_keep" in inspect.signature(base_model.forward).parameters
        self._step: _AttributeStep | None = None
        self.eval()
        # no post_init(): this class owns no weights to initialise, and it must not touch the base model's

    @property
    def _prefix_lm(self) -> PreTrainedModel:
        return self.model

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(
        cls,
        base_model: PreTrainedModel,
        prefixes_dir: str | os.PathLike,
        base_model_name_or_path: str | None = None,
        tokenizer: Any = None,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> AirDecodingForCausalLM:
        """Wrap a loaded base model and an attribute-prefix checkpoint (shapes checked before anything runs).

        Args:
            base_model: the causal LM the prefixes were trained on (its weights are shared, not copied).
            prefixes_dir: the attribute-prefix checkpoint folder, or a Hub repository id, fetched into the Hub cache
                (``locate_attribute_prefixes``); the config then records the id (and ``revision``), not the cache.
            base_model_name_or_path: what :meth:`save_pretrained` records as the base model; by default the base
                model's ``name_or_path``.
            tokenizer: only for checkpoints that record their start token as text alone (to look its id up).
            revision, token, cache_dir, local_files_only: for a Hub repository id, as ``huggingface_hub`` takes them.

        Raises:
            FileNotFoundError: ``prefixes_dir`` is no checkpoint folder and no Hub repository that could be fetched.
            ValueError: the prefixes do not fit ``base_model`` (another model's prefixes), or the base model has
                sliding-window layers.
        """
        local, repo_id = _locate_prefixes(prefixes_dir, revision=revision, token=token, cache_dir=cache_dir,
                                          local_files_only=local_files_only)  # fmt: skip
        ckpt = read_attribute_prefixes(local)
        start_id = resolve_start_token_id(ckpt.index, tokenizer, local)
        name = base_model_name_or_path or getattr(base_model, "name_or_path", None) or None
        config = AirDecodingConfig(base_model_name_or_path=name, prefixes=repo_id or str(local),
                                   prefixes_revision=revision if repo_id else None)  # fmt: skip
        return cls(config, base_model, ckpt.prefixes, ckpt.shape, prefixes_dir=local, start_token_id=start_id,
                   prefixes_repo_id=repo_id)  # fmt: skip

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any
    ) -> AirDecodingForCausalLM:
        """Load a folder written by :meth:`save_pretrained`: the base model, then the prefixes.

        The folder must be local. ``config=`` (as ``AutoModelForCausalLM`` passes it) may replace its
        ``config.json``; ``tokenizer=`` is only needed for prefix checkpoints that record their start token as text
        alone; every other keyword (``dtype``, ``device_map``, ``attn_implementation``, ``token``, ...) goes to
        ``AutoModelForCausalLM.from_pretrained`` of the base model.
        """
        if model_args:
            raise TypeError("AirDecodingForCausalLM.from_pretrained takes no positional model arguments")
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise OSError(
                f"{pretrained_model_name_or_path} is not a local folder; an AirDecodingForCausalLM is loaded from the "
                "folder save_pretrained wrote (download a Hub repo first, e.g. huggingface_hub.snapshot_download)"
            )
        config = kwargs.pop("config", None)
        tokenizer = kwargs.pop("tokenizer", None)
        # what AutoModelForCausalLM adds for any model class; they concern this folder, not the base model
        for key in ("_from_auto", "adapter_kwargs", "revision", "subfolder", "code_revision", "_commit_hash"):
            kwargs.pop(key, None)
        if kwargs.get("trust_remote_code") is None:
            kwargs.pop("trust_remote_code", None)
        if not isinstance(config, AirDecodingConfig):
            check_model_type(folder, AirDecodingConfig)
            config = AirDecodingConfig.from_pretrained(folder)
        if not config.prefixes:
            raise ValueError(f"{folder / CONFIG_NAME} names no prefix checkpoint ('prefixes')")
        if not config.base_model_name_or_path:
            raise ValueError(f"{folder / CONFIG_NAME} names no base model ('base_model_name_or_path')")
        prefixes_dir, repo_id = _locate_prefixes(
            _resolve(folder, config.prefixes), revision=config.prefixes_revision, token=kwargs.get("token"),
            cache_dir=kwargs.get("cache_dir"), local_files_only=bool(kwargs.get("local_files_only")),
        )  # fmt: skip
        base_ref = _resolve(folder, config.base_model_name_or_path)
        if Path(os.path.abspath(base_ref)) == Path(os.path.abspath(folder)):
            raise ValueError(f"{folder} names itself as its base model")
        # read (and validate) the small prefix checkpoint before the possibly slow base model load
        ckpt = read_attribute_prefixes(prefixes_dir)
        start_id = resolve_start_token_id(ckpt.index, tokenizer, prefixes_dir)
        base_model = AutoModelForCausalLM.from_pretrained(base_ref, **kwargs)
        if isinstance(base_model, AirDecodingForCausalLM):
            raise ValueError(f"the base model of {folder} is itself an AirDecodingForCausalLM ({base_ref})")
        config = copy.deepcopy(config)
        return cls(config, base_model, ckpt.prefixes, ckpt.shape, prefixes_dir=prefixes_dir, start_token_id=start_id,
                   prefixes_repo_id=repo_id)  # fmt: skip

    def save_pretrained(self, save_directory: str | os.PathLike, model_card: Any = None, **kwargs: Any) -> None:
        """Write ``config.json`` (and a short ``README.md`` when the folder has none), never the base weights.

        The write is atomic (``atomic_directory_write``): other files in the folder are kept, stale weight files
        removed. The prefix checkpoint is recorded relative to the folder when it lies inside it, else as an
        absolute path; the base model as its name or path. Other ``save_pretrained`` keywords
        (``safe_serialization``, ``max_shard_size``, ...) have nothing to act on and are ignored.

        Args:
            save_directory: the folder.
            model_card: a ``huggingface_hub.ModelCard`` to write as ``README.md`` instead of the default one.
        """
        if kwargs.get("push_to_hub"):
            raise NotImplementedError(
                "push the saved folder (with its prefix checkpoint inside it) with huggingface_hub.upload_folder"
            )
        if not self.config.base_model_name_or_path:
            raise ValueError(
                "the base model has no name or path to record: save it first (base.save_pretrained(dir)) and pass "
                "AirDecodingForCausalLM.from_base(base, prefixes_dir, base_model_name_or_path=dir)"
            )
        if self.prefixes_dir is None:
            raise ValueError("this model was built without a prefix checkpoint folder; there is nothing to point at")
        target = Path(os.path.abspath(save_directory))
        config = copy.deepcopy(self.config)
        config.architectures = [type(self).__name__]
        if self.prefixes_repo_id is not None:  # fetched from the Hub: the id travels, the cache path would not
            config.prefixes = self.prefixes_repo_id
        else:
            try:
                config.prefixes = self.prefixes_dir.relative_to(target).as_posix()
            except ValueError:  # not inside the folder
                config.prefixes = str(self.prefixes_dir)
            config.prefixes_revision = None
        has_card = (target / MODEL_CARD).exists()

        def write(tmp: str) -> None:
            config.to_json_file(os.path.join(tmp, CONFIG_NAME), use_diff=True)
            card = model_card
            if card is None and not has_card:
                card = self._default_card(config)
            if card is not None:
                card.save(os.path.join(tmp, MODEL_CARD))

        atomic_directory_write(target, write)

    def _default_card(self, config: AirDecodingConfig):
        from ...model_cards import make_model_card

        base = config.base_model_name_or_path
        hub_base = base if base and not os.path.isabs(base) and not os.path.isdir(base) else None
        return make_model_card(
            "air_decoding",
            model_id=f"air-decoding-{'-'.join(self.attributes)}",
            base_model=hub_base,
            base_model_path=base,
            prefixes=config.prefixes,
            attributes=", ".join(self.attributes),
            num_virtual_tokens=self.shape.num_virtual_tokens,
            example_target=self.attributes[0],
        )

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return self.model.get_output_embeddings()

    # ------------------------------------------------------------------ cache
    def new_cache(self) -> AirDecodingCache:
        """An empty cache for this model; its prefix slots are filled by the first forward."""
        return AirDecodingCache(
            self.model.config.get_text_config(decoder=True), self.num_attributes + 1, self.prefix_length
        )

    def _prefix_slots(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(key, value)`` of the L slots of all ``(K+1)·B`` rows: zeros for the generator rows."""
        layers = []
        for i in range(self.shape.num_layers):
            slots = []
            for name in ("prefix_k", "prefix_v"):
                prefix = getattr(self, f"{name}_{i}")  # (K, H, L, hd)
                gen = prefix.new_zeros(batch_size, *prefix.shape[1:])  # (B, H, L, hd): masked, never read
                slots.append(torch.cat([gen, prefix.repeat_interleave(batch_size, dim=0)]))  # ((K+1)B, H, L, hd)
            layers.append((slots[0], slots[1]))
        return layers

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args: Any, **kwargs: Any) -> None:
        # generate() would build a plain DynamicCache; ours must know its K+1 row groups (beam reordering) and stay
        # empty until the first forward (see the module docstring)
        cache = model_kwargs.get("cache")
        if cache is not None:
            if not isinstance(cache, AirDecodingCache):
                raise TypeError(
                    f"AirDecodingForCausalLM needs its own cache, got a {type(cache).__name__}; pass no cache (or "
                    "model.new_cache())"
                )
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.use_cache is False:
            return None
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported by the fused "
                "Air-Decoding model (it needs its own dynamic cache)"
            )
        model_kwargs["cache"] = self.new_cache()
        return None

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: AirDecodingCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Run the generator rows and the K·B prefix rows in one forward of the base model.

        Args:
            input_ids: ``(B, T)`` the new tokens of the generator rows.
            attention_mask: ``(B, past + T)`` over the real tokens seen so far (generate()'s mask, without prefix
                columns); ``None`` means no padding.
            position_ids: ``(B, T)`` positions of the generator rows; by default ``cumsum(mask) - 1`` (0 at pads),
                as generate() computes them.
            cache: an :class:`AirDecodingCache` (empty: its prefix slots are filled here); ``None`` starts a fresh
                one, returned only with ``use_cache``.
            use_cache: return the extended cache (default True).
            logits_to_keep: as for the base model; the generator's logits keep that many last positions.

        Returns:
            ``CausalLMOutputWithPast`` with the generator's ``logits`` ``(B, T or logits_to_keep, V)`` and the
            ``cache``. The attribute logits of the last position, ``(K, B, V)`` float32, are kept for the processor
            (:meth:`attribute_logits_for`).
        """
        if inputs_embeds is not None or input_ids is None:
            raise NotImplementedError("the fused Air-Decoding model needs input_ids (inputs_embeds is not supported)")
        if kwargs.pop("output_attentions", False) or kwargs.pop("output_hidden_states", False):
            raise NotImplementedError("the fused Air-Decoding model returns no attentions or hidden states")
        if kwargs.pop("labels", None) is not None:
            raise NotImplementedError("the fused Air-Decoding model is for decoding: it computes no loss (labels)")
        use_cache = True if use_cache is None else use_cache
        b, t = input_ids.shape
        k, p = self.num_attributes, self.prefix_length  # p: the L prefix slots (P, +1 with a start token)
        device = input_ids.device

        if cache is None:
            cache = self.new_cache()
        elif not isinstance(cache, AirDecodingCache):
            raise TypeError(f"AirDecodingForCausalLM needs an AirDecodingCache, got a {type(cache).__name__}")
        if cache.num_groups != k + 1 or cache.prefix_length != p:
            raise ValueError(
                f"this cache has {cache.num_groups} row groups and {cache.prefix_length} prefix slots; the model "
                f"needs {k + 1} and {p} (use model.new_cache())"
            )
        if not cache.prefix_filled:
            cache.fill_prefix_slots(self._prefix_slots(b))
            past = 0
        else:
            past = cache.real_length()
            if cache.group_batch_size != b:
                raise ValueError(f"the cache holds {cache.group_batch_size} generator rows, input_ids has {b}")

        if attention_mask is None:
            mask = torch.ones(b, past + t, dtype=torch.long, device=device)
        else:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (b, past + t):
                raise ValueError(
                    f"attention_mask must be (batch, past + new) = {(b, past + t)} over the real tokens (the prefix "
                    f"slots are added here), got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask.to(device).long()
        if position_ids is None:
            # generate()'s own rule (_prepare_position_ids_for_generation): cumsum - 1, pads at 0
            gen_pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -t:]
        else:
            gen_pos = position_ids.to(device)[..., -t:]
            if tuple(gen_pos.shape) != (b, t):
                gen_pos = gen_pos.expand(b, t)
        # the prefix rows see the real tokens without a prompt's own start token (the slots hold one already)
        pre_real = self._prefix_rows_mask(cache, input_ids, mask, past)  # (B, past + T)
        pre_pos = prefixed_positions(pre_real, p)[:, -t:]  # PEFT's convention: first real token at L

        # rows: generator (B), then attribute-major prefix rows (K·B)
        rows_ids = torch.cat([input_ids, input_ids.repeat(k, 1)])  # ((K+1)B, T)
        gen_mask = torch.cat([mask.new_zeros(b, p), mask], dim=1)  # (B, L + past + T): prefix slots hidden
        pre_mask = torch.cat([mask.new_ones(b, p), pre_real], dim=1).repeat(k, 1)  # (KB, L + past + T)
        rows_mask = torch.cat([gen_mask, pre_mask])  # ((K+1)B, L + past + T)
        rows_pos = torch.cat([gen_pos.long(), pre_pos.repeat(k, 1)])  # ((K+1)B, T)
        if self._base_keeps_logits:
            kwargs["logits_to_keep"] = logits_to_keep
        out = self.model(
            input_ids=rows_ids,
            attention_mask=rows_mask,
            position_ids=rows_pos,
            cache=cache,
            use_cache=True,  # the cache holds the prefix slots even for a single forward
            **kwargs,
        )
        logits = out.logits  # ((K+1)B, T', V)
        if not self._base_keeps_logits and logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        self._step = _AttributeStep(
            logits=logits[b:, -1].detach().float().view(k, b, -1),
            batch_size=b,
            length=past + t,
            last_tokens=input_ids[:, -1].detach().clone(),
        )
        return CausalLMOutputWithPast(logits=logits[:b], cache=cache if use_cache else None)

    def _prefix_rows_mask(
        self, cache: AirDecodingCache, input_ids: torch.LongTensor, mask: torch.Tensor, past: int
    ) -> torch.Tensor:
        """The real-token mask ``(B, past + T)`` of the prefix rows: ``mask`` with each prompt's own start token hidden.

        As ``AttributePrefixModel.begin``: the start token is baked into the prefix slots, so a prompt whose first
        real token is the start token would read it twice. Its column is found when the row's first real token
        arrives (the prefill, or a later chunk of a chunked prefill) and kept in the cache, which reorders it with the
        rows; later steps hide the same column.
        """
        if self.start_token_id is None:
            return mask
        b = mask.shape[0]
        cols = cache.start_columns
        if cols is None:
            cols = torch.full((b,), -2, dtype=torch.long, device=mask.device)  # -2: no real token seen yet
        cols = cols.to(mask.device)
        pending = (cols == -2) & mask[:, past:].bool().any(-1)
        if bool(pending.any()):  # the first real token arrived in this call's new columns
            cols = torch.where(pending, self.own_start_columns(input_ids, mask, offset=past), cols)
        cache.start_columns = cols
        hide = cols >= 0
        if not bool(hide.any()):
            return mask
        mask = mask.clone()
        mask[hide, cols[hide]] = 0
        return mask

    # ------------------------------------------------------------------ the hand-over to the processors
    def attribute_logits_for(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """The attribute logits ``(K, B, V)`` (float32) of the forward that produced the scores of ``input_ids``.

        ``input_ids`` ``(B, L)`` is what ``generate()`` hands a logits processor. Raises ``RuntimeError`` unless the
        last forward of this model ran exactly this step (same batch, same length, same last tokens): e.g. when the
        processor is used while generating with another model.
        """
        step = self._step
        b, length = input_ids.shape
        if step is None:
            raise RuntimeError(
                f"AirDecodingForCausalLM has no attribute logits for this step (input_ids {(b, length)}): it has not "
                "run since its last generate(). The fused processor only works inside fused_model.generate(...). "
                + _PROCESSOR_PATH_HINT
            )
        if (step.batch_size, step.length) != (b, length) or not torch.equal(
            step.last_tokens, input_ids[:, -1].to(step.last_tokens.device)
        ):
            raise RuntimeError(
                f"AirDecodingForCausalLM's last forward was for input_ids {(step.batch_size, step.length)}, not for this "
                f"step's {(b, length)} (or other tokens): the model generating is not this fused model. The fused "
                "processor only works inside fused_model.generate(...). " + _PROCESSOR_PATH_HINT
            )
        return step.logits

    def forget_step(self) -> None:
        """Drop the kept attribute logits (generate() does so before and after each call)."""
        self._step = None

    def generate(self, *args: Any, **kwargs: Any):
        """``GenerationMixin.generate``; the attribute logits kept for the processors live only during the call."""
        self.forget_step()
        try:
            return super().generate(*args, **kwargs)
        finally:
            self.forget_step()


def _locate_prefixes(ref: str | os.PathLike, **hub: Any) -> tuple[Path, str | None]:
    """The prefix checkpoint's local folder, and its Hub repository id when it is one (fetched or found in the Hub
    cache by ``locate_attribute_prefixes``), which :meth:`AirDecodingForCausalLM.save_pretrained` records instead of
    the cache path."""
    repo_id = None if Path(ref).is_dir() else str(ref)
    return locate_attribute_prefixes(ref, **hub), repo_id


def _resolve(folder: Path, ref: str) -> str:
    """A path recorded in the config: absolute, relative to ``folder`` when it exists there, else as recorded."""
    if os.path.isabs(ref):
        return ref
    inside = folder / ref
    return str(inside) if inside.exists() else ref
