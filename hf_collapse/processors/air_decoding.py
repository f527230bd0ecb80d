"""Air-Decoding (Zhong et al., EMNLP 2023) as a ``LogitsProcessor`` for ``generate()``.

Per step, with p_i the next-token distribution of the prefix-conditional LM for attribute i:

* reconstruction weight ``w_i(x) = -1 / log p_i(x)`` (official code: not normalised over the vocabulary;
  ``normalize=True`` divides by ``sum_x w_i(x)``, the form the paper's text gives);
* history ``H_i = prod_s w_i(x_s)`` over the *generated* tokens only;
* posterior ``P(c_T | x, history) = w_T(x) H_T / sum_i w_i(x) H_i`` (uniform prior);
* result ``log_softmax(scores) + strength * log P(c_T | x, history)``, i.e. q ∝ P_LM · P(c_T|·)^λ.

Everything is computed in **log space, in float64**: ``log w = -log(-log p)`` with ``-log p`` clamped into
``[1e-300, 1e300]``, a running sum of log w for the history, and a logsumexp over attributes. The official fp32
code underflows at large λ and divides by ``log p = 0``; this form has neither fault at any λ.

``WeightedDecodingLogitsProcessor`` is the same with log p_i instead of log w_i: the baseline that shows attribute
collapse.

Two ways to get the attribute logits, one formula (``log_posterior``, the history bookkeeping and the beam-reorder
detection are shared):

* **processor path**: ``attribute_model`` is an ``AttributePrefixModel``. The processor runs it itself (a second
  forward of K·B rows per step) and holds its own decoding state (the prefix cache, mask and positions: a
  ``LogitsProcessor`` sees neither the attention mask nor the model outputs), like transformers'
  ``UnbatchedClassifierFreeGuidanceLogitsProcessor``. The state lives in the processor, not in the attribute model,
  so several processors can share one ``AttributePrefixModel`` in one ``generate()`` call. Works with any generating
  model of the same vocabulary (e.g. a larger generator guided by a smaller attribute model).
* **fused path**: ``attribute_model`` is the ``AirDecodingForCausalLM`` that ``generate()`` runs. Its forward has
  already run the prefixes in the same forward as the generator (one forward of (K+1)·B rows per step); the processor
  only reads the attribute logits it kept for this step. It needs no prompt mask: the fused model sees generate()'s
  attention mask.
"""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor

from ..modeling.air_decoding import AirDecodingForCausalLM
from .attribute_prefix_model import AttributePrefixModel

# -log p is clamped into [_NLP_MIN, _NLP_MAX] so log w stays finite (about ±690.8) at p == 1 and p == 0
_NLP_MIN = 1e-300
_NLP_MAX = 1e300
# the largest strength: beyond it λ·log P(c|x) overflows the float32 scores of generate() (|log P| reaches ~7e4
# after 50 tokens), and sampling then sees rows of -inf
MAX_STRENGTH = 1e6
# weighted decoding: log p clamped from below so that a token impossible under every attribute gives 0/0 -> finite
_LOGP_MIN = -1e4


class AirDecodingLogitsProcessor(LogitsProcessor):
    """Steer ``generate()`` toward ``target`` with Air-Decoding.

    Args:
        attribute_model: an ``AttributePrefixModel`` (processor path: its vocabulary must match the generating
            model's), or the ``AirDecodingForCausalLM`` whose ``generate()`` this processor is passed to (fused path:
            no second forward).
        target: the attribute to steer toward; one of ``attribute_model.attributes``.
        strength: λ in [0, 1e6] (official: 140 sentiment, 60 topic, 120 detox). Beyond 1e6 the control term no
            longer fits the float32 scores ``generate()`` works in, so larger values are refused.
        prompt_attention_mask: the prompt's attention mask ``(batch, prompt_len)``; required for a left-padded
            batch. Its rows are repeated for ``num_return_sequences`` / ``num_beams`` when the batch is an exact
            multiple made of copies of the same prompts (checked against the input ids). Not used by the fused path.
        normalize: normalise each reconstructed w_i over the vocabulary first (the paper's text). Default False
            is the official code's formula.
        pad_token_id: the pad token, to detect a left-padded batch given without ``prompt_attention_mask``
            (default: the attribute model's ``generation_config.pad_token_id``).

    A call whose ``input_ids`` do not continue the previous call's sequences starts a new generation, so one
    instance serves consecutive ``generate()`` calls (e.g. a ``pipeline("text-generation")`` over several prompts).
    Works with greedy, sampling (``do_sample=True, top_k=200`` reproduces the official order, since custom
    processors run before the warpers), batches with left padding, ``num_return_sequences`` and beam search
    (reordered rows are detected by matching each row's history and the cache is reordered).
    """

    method = "air-decoding"

    def __init__(
        self,
        attribute_model: AttributePrefixModel | AirDecodingForCausalLM,
        target: str,
        strength: float,
        prompt_attention_mask: torch.Tensor | None = None,
        normalize: bool = False,
        pad_token_id: int | None = None,
    ):
        self.fused = isinstance(attribute_model, AirDecodingForCausalLM)
        if not self.fused and (not hasattr(attribute_model, "attributes") or not hasattr(attribute_model, "begin")):
            raise TypeError("attribute_model must be an AttributePrefixModel or an AirDecodingForCausalLM")
        if target not in attribute_model.attributes:
            raise ValueError(f"unknown target attribute {target!r}; valid attributes: {attribute_model.attributes}")
        try:
            strength = float(strength)
        except (TypeError, ValueError) as err:
            raise ValueError(f"strength must be a number, got {strength!r}") from err
        if not math.isfinite(strength) or not 0 <= strength <= MAX_STRENGTH:
            raise ValueError(f"strength must be a finite number in [0, {MAX_STRENGTH:g}], got {strength}")
        if prompt_attention_mask is not None and prompt_attention_mask.dim() != 2:
            raise ValueError(
                f"prompt_attention_mask must be 2-D (batch, prompt_len), got {tuple(prompt_attention_mask.shape)}"
            )
        self.attribute_model = attribute_model
        self.target = target
        self.target_index = attribute_model.attributes.index(target)
        self.strength = strength
        self.prompt_attention_mask = prompt_attention_mask
        self.normalize = bool(normalize)
        if pad_token_id is None:
            gen_cfg = getattr(getattr(attribute_model, "base_model", None), "generation_config", None)
            pad_token_id = getattr(gen_cfg, "pad_token_id", None)
        self.pad_token_id = pad_token_id if isinstance(pad_token_id, int) else None
        self.reorders = 0  # number of beam reorderings seen (diagnostics, tests)
        self.reset()

    def reset(self) -> None:
        """Forget the previous ``generate()`` call (the next call starts a new generation anyway)."""
        self._ids: torch.Tensor | None = None
        self._state = None  # processor path: PrefixDecodingState of the attribute model's K·B rows
        self._history: torch.Tensor | None = None  # (K, B) running sum of log w at generated tokens
        self._last_log_w: torch.Tensor | None = None  # (K, B, V) log w of the previous step

    # ------------------------------------------------------------------ the formula
    def _log_weights(self, log_p: torch.Tensor) -> torch.Tensor:
        """log w_i = -log(-log p_i), float64, finite everywhere; optionally normalised over the vocabulary.

        ``log_p`` is a fresh tensor owned by the caller, so it is transformed in place (these (K, B, V) float64
        passes are most of the processor's time at a 50k vocabulary).
        """
        log_w = log_p.neg_().clamp_(min=_NLP_MIN, max=_NLP_MAX).log_().neg_()
        if self.normalize:
            log_w = log_w - torch.logsumexp(log_w, dim=-1, keepdim=True)
        return log_w

    def log_posterior(self, attribute_logits: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log P(c_T | x, history) (B, V), log w (K, B, V))`` from attribute logits ``(K, B, V)``."""
        log_p = torch.log_softmax(_finite_rows(attribute_logits.double()), dim=-1)
        log_w = self._log_weights(log_p)
        joint = log_w + history[:, :, None]  # (K, B, V)
        # logaddexp is one fused pass per attribute; logsumexp over a short K axis costs several
        norm = joint[0]
        for i in range(1, joint.shape[0]):
            norm = torch.logaddexp(norm, joint[i])
        return joint[self.target_index] - norm, log_w

    # ------------------------------------------------------------------ generate() hook
    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        am = self.attribute_model
        if scores.shape[-1] != am.vocab_size:
            raise ValueError(
                f"vocabulary mismatch: the generating model gives {scores.shape[-1]} logits, the attribute model "
                f"{am.vocab_size}; Air-Decoding needs one shared vocabulary"
            )
        b = input_ids.shape[0]
        rows = self._continuation_rows(input_ids)
        if rows is None:  # the first step of a generate() call
            self.reset()
            if self.fused:
                attr_logits = am.attribute_logits_for(input_ids)  # (K, B, V), from generate()'s own forward
            else:
                attr_logits, self._state = am.begin(input_ids, self._prompt_mask(input_ids))
            self._history = torch.zeros(am.num_attributes, b, dtype=torch.float64, device=am.device)
        else:
            tok = self._follow_history(input_ids, rows)
            if self.fused:
                # generate() has already reordered the fused model's cache (AirDecodingCache.reorder_cache)
                attr_logits = am.attribute_logits_for(input_ids)
            else:
                attr_logits = am.advance(self._state, tok)
        self._ids = input_ids.detach().clone()
        log_post, self._last_log_w = self.log_posterior(attr_logits, self._history)
        out = torch.log_softmax(_finite_rows(scores.double()), dim=-1).add_(log_post.to(scores.device), alpha=self.strength)
        return out.to(scores.dtype)

    def _continuation_rows(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """For each row, the previous call's row it continues (beam search may reorder), or None for a new call."""
        prev = self._ids
        if prev is None or input_ids.shape != (prev.shape[0], prev.shape[1] + 1):
            return None
        parents = input_ids[:, :-1].to(prev.device)
        if torch.equal(parents, prev):
            return torch.arange(prev.shape[0], device=prev.device)
        same = (parents[:, None, :] == prev[None, :, :]).all(-1)  # (B new, B old)
        if not bool(same.any(-1).all()):
            return None
        return same.float().argmax(-1)

    def _prompt_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """The prompt mask for the ``(B, T)`` prompt ``generate()`` started with, checked and expanded."""
        mask = self.prompt_attention_mask
        b, t = input_ids.shape
        if mask is None:
            if self.pad_token_id is not None and b > 1:
                starts_with_pad = input_ids[:, 0] == self.pad_token_id
                if bool(starts_with_pad.any()) and not bool(starts_with_pad.all()):
                    raise ValueError(
                        "the batch looks left-padded (some rows start with the pad token, others do not) but no "
                        "prompt_attention_mask was given; pass the tokenizer's attention_mask as "
                        "AirDecodingLogitsProcessor(..., prompt_attention_mask=enc['attention_mask'])"
                    )
            return None
        m = mask.shape[0]
        if mask.shape[1] != t or m == 0 or b % m != 0:
            raise ValueError(
                f"prompt_attention_mask has shape {tuple(mask.shape)} but generate() started with input_ids of shape "
                f"{(b, t)}; pass the prompt's own attention mask (rows may be repeated for num_return_sequences/beams)"
            )
        if b != m:
            # only num_return_sequences / num_beams make the batch a multiple: then it holds r copies of each prompt
            copies = input_ids.view(m, b // m, t)
            if not bool((copies == copies[:, :1]).all()):
                raise ValueError(
                    f"prompt_attention_mask has {m} row(s) but generate() got {b} different prompts; pass the mask "
                    "of the whole batch (its rows are repeated only for num_return_sequences / num_beams)"
                )
        return mask.repeat_interleave(b // m, dim=0)

    def _follow_history(self, input_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Carry the history to this call's rows (``rows``: each row's parent) and add the weight of each row's
        newest token; returns those tokens ``(B,)``. The processor path reorders its prefix state too."""
        prev = self._ids
        assert prev is not None and self._history is not None and self._last_log_w is not None
        if not torch.equal(rows, torch.arange(prev.shape[0], device=rows.device)):
            # beam search reordered rows: follow each row's parent
            if not self.fused:
                self.attribute_model.reorder_state(self._state, rows)
            dev = self._history.device
            self._history = self._history[:, rows.to(dev)]
            self._last_log_w = self._last_log_w[:, rows.to(dev)]
            self.reorders += 1
        tok = input_ids[:, -1].to(self._history.device)
        self._history = self._history + self._last_log_w.gather(
            -1, tok.view(1, -1, 1).expand(self._history.shape[0], -1, 1)
        ).squeeze(-1)
        return tok


class WeightedDecodingLogitsProcessor(AirDecodingLogitsProcessor):
    """Naive weighted decoding: the Air-Decoding formula with log p_i in place of log w_i.

    q ∝ P_LM · (p_T H_T / sum_i p_i H_i)^λ with H_i = prod_s p_i(x_s). This is the baseline that collapses
    (unreadable text) once λ passes a critical value. ``normalize`` has no effect (p_i is already normalised).
    """

    method = "weighted-decoding"

    def _log_weights(self, log_p: torch.Tensor) -> torch.Tensor:
        return log_p.clamp(min=_LOGP_MIN)


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float64) with NaN as -inf, +inf as the largest float, and rows with no finite entry uniform (zeros), so
    log_softmax never yields NaN. Checked in one pass first: logits are almost always finite."""
    if bool(torch.isfinite(x).all()):
        return x
    x = torch.nan_to_num(x, nan=-math.inf, posinf=torch.finfo(x.dtype).max)
    bad = ~torch.isfinite(x).any(-1, keepdim=True)
    return torch.where(bad, torch.zeros_like(x), x)
