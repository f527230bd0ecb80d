"""``AttributePrefixModel``: K attribute prefixes (PEFT prefix-tuning adapters) over one frozen causal LM.

The model runs **all K prefixes in one batched forward**: the K·B rows are attribute-major (row ``k * B + b`` is
attribute ``k`` on input ``b``) and the prefixes' key/value tensors are stacked into one ``DynamicCache``. It keeps
no decoding state of its own: ``begin`` returns a :class:`PrefixDecodingState` (the cache of the K·B rows, the mask,
the next positions) that the caller owns and passes to ``advance`` / ``reorder_state``. So any number of processors
can share one ``AttributePrefixModel`` in one ``generate()`` call without stepping on each other's cache.

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
    DEFAULT_STRENGTH,
    HeldPrefixesMixin,
    PrefixShape,
    flat_prefix_to_layers,
    layers_to_flat_prefix,
    locate_attribute_prefixes,
    prefix_cache,
    prefixed_forward,
    prefixed_positions,
    read_attribute_prefixes,
    resolve_start_token_id,
)
from ..validation import check_number

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "CHECKPOINT_INDEX",
    "AttributePrefixModel",
    "AttributePrefixOutput",
    "PrefixDecodingState",
    "PrefixShape",
    "flat_prefix_to_layers",
    "layers_to_flat_prefix",
    "prefix_cache",
    "prefixed_positions",
]


@dataclass
class PrefixDecodingState:
    """Decoding state of one user of an ``AttributePrefixModel`` (e.g. one logits processor).

    Attributes:
        cache: key/values of the K·B rows (attribute-major), prefix included.
        mask: ``(B, past)`` attention mask of the real tokens seen so far (no prefix columns).
        next_pos: ``(B,)`` position id of each row's next token (PEFT's convention: real tokens start at P).
    """

    cache: DynamicCache
    mask: torch.Tensor
    next_pos: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]


@dataclass
class AttributePrefixOutput:
    """Logits of all attributes, ``(K, B, T, V)``, and the cache of the K·B rows (attribute-major)."""

    logits: torch.Tensor
    cache: DynamicCache


class AttributePrefixModel(HeldPrefixesMixin, nn.Module):
    """K prefix-conditional LMs (one PEFT prefix per attribute) sharing one frozen base causal LM.

    Args:
        base_model: the causal LM the prefixes were trained on.
        prefixes: attribute name -> PEFT's saved ``prompt_embeddings`` tensor ``(P, num_layers * 2 * token_dim)``.
        shape: the prefix geometry (from the adapters' ``adapter_config.json``).
        start_token_id: the token every training text started with (``AttributePrefixTrainer`` records it in the
            checkpoint; the official recipe trains on ``[eos] + text``). The model puts it between each prefix and
            every prompt itself, so prompts are conditioned the way training saw them whatever the caller passes;
            a prompt that already starts with it is not given a second one.
        default_strength: the control strength the checkpoint's publisher evaluated (``default_strength`` in
            ``attribute_prefixes.json``), or ``None``; a suggestion for callers, never applied implicitly.
    """

    def __init__(
        self,
        base_model: PreTrainedModel,
        prefixes: Mapping[str, torch.Tensor],
        shape: PrefixShape,
        start_token_id: int | None = None,
        default_strength: float | None = None,
    ):
        super().__init__()
        self.default_strength = check_number("AttributePrefixModel", "default_strength", default_strength,
                                             minimum=0.0, allow_none=True)  # fmt: skip
        self.base_model = base_model
        self.base_model.requires_grad_(False).eval()
        self._hold_prefixes(base_model, prefixes, shape, start_token_id)
        self._state: PrefixDecodingState | None = None

    @property
    def _prefix_lm(self) -> PreTrainedModel:
        return self.base_model

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        base_model: PreTrainedModel | str,
        checkpoint_dir: str | Path,
        tokenizer=None,
        *,
        revision: str | None = None,
        **model_kwargs,
    ) -> AttributePrefixModel:
        """Load an attribute-prefix checkpoint (``AttributePrefixTrainer.save_model``, ``write_attribute_prefixes``).

        Args:
            base_model: a loaded causal LM, or a name/path passed to ``AutoModelForCausalLM.from_pretrained``.
            checkpoint_dir: the checkpoint folder, or a Hub repository id (``"hf-collapse/smollm2-135m-topic-prefixes"``),
                fetched into the Hub cache (``locate_attribute_prefixes``).
            tokenizer: only for checkpoints that record their start token as text alone (to look its id up).
            revision: the Hub branch, tag or commit of ``checkpoint_dir`` (a Hub id only).
            model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` when ``base_model`` is a name;
                ``token``, ``cache_dir`` and ``local_files_only`` also apply to fetching the prefixes.

        The start token the prefixes were trained with is applied from the checkpoint's index. The index's
        ``default_strength``, when present, becomes :attr:`default_strength`.

        Raises:
            FileNotFoundError: ``checkpoint_dir`` is no checkpoint folder and no Hub repository that could be fetched.
            ValueError: the checkpoint is malformed, or its prefixes do not fit ``base_model``.
        """
        checkpoint_dir = locate_attribute_prefixes(
            checkpoint_dir, revision=revision, token=model_kwargs.get("token"),
            cache_dir=model_kwargs.get("cache_dir"), local_files_only=bool(model_kwargs.get("local_files_only")),
        )  # fmt: skip
        # read (and validate) the checkpoint before the possibly slow base model load
        ckpt = read_attribute_prefixes(checkpoint_dir)
        start_id = resolve_start_token_id(ckpt.index, tokenizer, checkpoint_dir)
        if isinstance(base_model, str):
            base_model = AutoModelForCausalLM.from_pretrained(base_model, **model_kwargs)
        return cls(base_model, ckpt.prefixes, ckpt.shape, start_token_id=start_id,
                   default_strength=ckpt.index.get(DEFAULT_STRENGTH))  # fmt: skip

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        """Device of the prefixes (and of the cache and logits)."""
        return self.prefix_k_0.device

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
            self.prefix_length,
            cache=cache,
            attention_mask=None if attention_mask is None else attention_mask.to(self.device).repeat(k, 1),
            position_ids=None if position_ids is None else position_ids.to(self.device).repeat(k, 1),
            use_cache=True,
        )
        return AttributePrefixOutput(logits=out.logits.view(k, b, t, -1), cache=out.cache)

    @torch.no_grad()
    def sequence_log_likelihood(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``log p_k(text)`` under each attribute's prefix: ``(K, B)`` sums over each row's real tokens.

        With a start token (the training conditioning) every real token is scored, the first one from the start
        token's prediction; without one the first token has no context and is left out. The argmax over K is the
        classifier the prefixes imply (the quality gate of ``hf_collapse.evals.prefix_gate``).
        """
        b, t = input_ids.shape
        input_ids = input_ids.to(self.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device).long()
        logits = self.forward(input_ids, mask).logits  # (K, B, T, V)
        k = self.num_attributes
        # position t predicts token t + 1; both must be real tokens
        nll = torch.nn.functional.cross_entropy(
            logits[:, :, :-1].reshape(-1, logits.shape[-1]).float(),
            input_ids[:, 1:].repeat(k, 1).reshape(-1),
            reduction="none",
        ).view(k, b, t - 1)
        valid = (mask[:, 1:] * mask[:, :-1]).to(nll.dtype)  # (B, T-1)
        score = -(nll * valid).sum(-1)  # (K, B)
        if self.start_token_id is not None:
            first = input_ids.gather(1, mask.argmax(-1, keepdim=True))[:, 0]  # (B,) each row's first real token
            score = score + torch.log_softmax(self.start_logits, -1)[:, first]
        return score

    # ------------------------------------------------------------------ decoding with caller-owned state
    @torch.no_grad()
    def begin(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, PrefixDecodingState]:
        """Run the prompt ``(B, T)`` through all K prefixes.

        Returns the last-position logits ``(K, B, V)`` and the state to pass to :meth:`advance`.
        """
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=self.device)
        attention_mask = attention_mask.to(self.device).long()
        if self.start_token_id is not None:
            # the start token is already in the prefix cache: hide a prompt's own copy rather than read it twice
            cols = self.own_start_columns(input_ids.to(self.device), attention_mask)
            own = cols >= 0
            attention_mask = attention_mask.clone()
            attention_mask[own, cols[own]] = 0
        out = self.forward(input_ids, attention_mask)
        next_pos = prefixed_positions(attention_mask, self.prefix_length)[:, -1] + 1
        return out.logits[:, :, -1], PrefixDecodingState(out.cache, attention_mask, next_pos)

    @torch.no_grad()
    def advance(self, state: PrefixDecodingState, tokens: torch.LongTensor) -> torch.Tensor:
        """Feed one new token per row ``(B,)`` and update ``state``; returns next-token logits ``(K, B, V)``."""
        tokens = tokens.to(self.device).view(-1, 1)
        state.mask = torch.cat([state.mask, state.mask.new_ones(state.batch_size, 1)], dim=1)
        out = self.forward(tokens, state.mask, cache=state.cache, position_ids=state.next_pos.view(-1, 1))
        state.cache = out.cache
        state.next_pos = state.next_pos + 1
        return out.logits[:, :, -1]

    def reorder_state(self, state: PrefixDecodingState, rows: torch.LongTensor) -> None:
        """Keep input rows ``rows`` of ``state`` (e.g. beam search's parents), for every attribute."""
        rows = rows.to(self.device)
        b = state.batch_size
        if rows.numel() != b:
            raise ValueError(f"reorder needs {b} row indices, got {rows.numel()}")
        all_rows = (torch.arange(self.num_attributes, device=self.device)[:, None] * b + rows[None, :]).reshape(-1)
        state.cache.batch_select_indices(all_rows)
        state.mask = state.mask[rows]
        state.next_pos = state.next_pos[rows]

    # ------------------------------------------------------------------ single-user convenience API
    # start/step/reorder keep one state inside the model, for scripts that drive it by hand; processors use
    # begin/advance/reorder_state so that several of them can share the model.
    def reset(self) -> None:
        """Forget the state kept by ``start``."""
        self._state = None

    @property
    def started(self) -> bool:
        """Whether ``start()`` was called since the last ``reset()``."""
        return self._state is not None

    def start(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`begin`, keeping the state in the model. Returns the last-position logits ``(K, B, V)``."""
        logits, self._state = self.begin(input_ids, attention_mask)
        return logits

    def step(self, tokens: torch.LongTensor) -> torch.Tensor:
        """:meth:`advance` on the state kept by ``start``; returns next-token logits ``(K, B, V)``."""
        if self._state is None:
            raise RuntimeError("AttributePrefixModel.step() called before start()")
        return self.advance(self._state, tokens)

    def reorder(self, rows: torch.LongTensor) -> None:
        """:meth:`reorder_state` on the state kept by ``start``."""
        if self._state is not None:
            self.reorder_state(self._state, rows)
