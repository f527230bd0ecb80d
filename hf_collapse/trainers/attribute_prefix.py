"""``AttributePrefixTrainer``: train one PEFT prefix-tuning adapter per attribute (Air-Decoding's PC-LMs).

All attributes train in one run over one mixed dataset: every row is conditioned on its own attribute's prefix, so
a batch mixes attributes and each prefix gets the gradient of its own rows only. The base LM stays frozen.

The module trained (``AttributePrefixLM``), the prefixed forward and the checkpoint format live in
``hf_collapse.modeling.attribute_prefixes``; this module holds the training recipe only. ``save_model(dir)`` writes
an attribute-prefix checkpoint (``write_attribute_prefixes``) with a model card from ``hub_cards/attribute_prefixes.md``,
plus the Trainer's usual ``training_args.bin``. Each adapter folder loads on its own with
``PeftModel.from_pretrained(base, dir/<attribute>)``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..model_cards import make_model_card
from ..modeling.attribute_prefixes import (
    START_TEXT,
    START_TOKEN_ID,
    AttributePrefixLM,
    layers_to_flat_prefix,
    peft_prefix_config,
    read_attribute_prefixes,
    save_attribute_prefixes,
    validate_attribute_names,
)
from ..modeling.checkpoint_utils import check_safetensors_files
from ..validation import check_finite_fields, check_number

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard

__all__ = ["AttributePrefixConfig", "AttributePrefixTrainer", "TRAINING_STATE"]

# the prefix encoders' parameters, beside the attribute-prefix checkpoint: what resume_from_checkpoint reads
TRAINING_STATE = "prefix_encoders.safetensors"


@dataclass
class AttributePrefixConfig(TrainingArguments):
    """``TrainingArguments`` plus the attribute-prefix settings.

    The official Air-Decoding recipe is lr 3e-5, weight decay 0.01, linear schedule with 10% warm-up, grad clip
    1.0, batch 4, 5 epochs. With ``init_text`` and ``prefix_projection=False`` (the K/V trained directly) lr 1e-2
    trains at once on SmolLM2-135M. With the MLP reparameterisation keep the lr small: on SmolLM2-135M lr 5e-3 made
    the loss rise from 5.5 to 8 within 20 steps, because Adam moves every MLP weight by about lr per step and the
    prefix moves with the sum of those moves.
    """

    attributes: list[str] = field(default_factory=list, metadata={"help": "Attribute names, one prefix each."})
    num_virtual_tokens: int = field(default=20, metadata={"help": "Prefix length P."})
    prefix_projection: bool = field(
        default=True, metadata={"help": "Reparameterise the prefix with PEFT's MLP (as the official code does)."}
    )
    encoder_hidden_size: int = field(default=512, metadata={"help": "Hidden size of the prefix MLP."})
    text_column: str = field(default="text", metadata={"help": "Dataset column holding the text."})
    attribute_column: str = field(default="attribute", metadata={"help": "Dataset column holding the attribute."})
    max_length: int = field(default=128, metadata={"help": "Truncate texts to this many tokens (incl. the EOS)."})
    start_token: str | None = field(
        default=None,
        metadata={
            "help": "Token put before every text. None: the tokenizer's eos token, as the official code does "
            "('[eos] + text'); use the same token before prompts at generation time."
        },
    )
    init_text: str | None = field(
        default="The following text is",
        metadata={
            "help": "Initialise every prefix from the base model's own key/values for this phrase (repeated to P "
            "tokens). None keeps PEFT's random init, which trains far worse."
        },
    )
    discriminative_weight: float = field(
        default=0.0,
        metadata={
            "help": "Add this weight times the loss of the classifier the prefixes imply (cross-entropy of the "
            "attribute against a softmax over attributes of the text's log-likelihood under each prefix): GeDi's "
            "hybrid generative-discriminative training. 0 is the official, purely generative recipe. Each step then "
            "runs every text under every prefix (K forwards instead of one)."
        },
    )
    init_prefixes: str | None = field(
        default=None,
        metadata={
            "help": "Start from the prefixes of this attribute-prefix checkpoint (same attribute names and prefix "
            "length) instead of init_text, e.g. to fine-tune generatively trained prefixes with "
            "discriminative_weight. Needs prefix_projection=False: a saved prefix has no MLP to restore."
        },
    )
    # a prefix trainer's extra column (attribute_ids) must survive the Trainer's column pruning
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: the trainer tokenizes itself."})

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            validate_attribute_names(self.attributes)
        except ValueError as err:
            raise ValueError(f"AttributePrefixConfig.attributes: {err}") from err
        if self.label_names is None:
            # the training module's forward has no `labels` argument, so the Trainer would not find it by itself
            self.label_names = ["labels"]
        owner = "AttributePrefixConfig"
        check_number(owner, "num_virtual_tokens", self.num_virtual_tokens, integer=True, minimum=1)
        check_number(owner, "encoder_hidden_size", self.encoder_hidden_size, integer=True, minimum=1)
        # the start token plus at least one text token, or there is nothing to predict
        check_number(owner, "max_length", self.max_length, integer=True, minimum=2)
        check_number(owner, "discriminative_weight", self.discriminative_weight, minimum=0.0)
        if self.init_prefixes is not None and self.prefix_projection:
            raise ValueError(
                "AttributePrefixConfig.init_prefixes needs prefix_projection=False: a saved prefix is the "
                "materialised key/values, with no MLP to restore. Set prefix_projection=False."
            )
        check_finite_fields("AttributePrefixConfig", self)  # TrainingArguments itself lets learning_rate=nan through


class _Collator:
    """Right-pads token ids; labels are -100 at pads; ``shift_labels`` lets the Trainer count targets exactly."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for r, f in enumerate(features):
            ids[r, : len(f["input_ids"])] = torch.as_tensor(f["input_ids"])
            mask[r, : len(f["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        shift = torch.cat([labels[:, 1:], labels.new_full((len(features), 1), -100)], dim=1)
        attr = torch.as_tensor([f["attribute_ids"] for f in features], dtype=torch.long)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "attribute_ids": attr,
            "labels": labels,
            "shift_labels": shift,
        }


class AttributePrefixTrainer(Trainer):
    """Trains one PEFT prefix per attribute on a ``datasets.Dataset`` with text and attribute columns.

    Usage::

        trainer = AttributePrefixTrainer(model=causal_lm, args=AttributePrefixConfig(output_dir="out",
                                         attributes=["positive", "negative"]), train_dataset=ds,
                                         processing_class=tokenizer)
        trainer.train(); trainer.save_model("prefixes")

    The loss is next-token NLL of ``[eos] + text`` (the official recipe), summed over target tokens and divided by
    the number of target tokens in the whole accumulated batch, so gradient accumulation gives the same update as
    the equivalent larger batch.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        args: AttributePrefixConfig,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        **kwargs: Any,
    ):
        if not isinstance(args, AttributePrefixConfig):
            raise TypeError("AttributePrefixTrainer needs args=AttributePrefixConfig(...)")
        if processing_class is None:
            raise ValueError("AttributePrefixTrainer needs processing_class=<tokenizer> to tokenize the texts")
        if isinstance(model, AttributePrefixLM):
            prefix_lm = model
        else:
            peft_cfg = peft_prefix_config(
                model, args.num_virtual_tokens, args.prefix_projection, args.encoder_hidden_size
            )
            prefix_lm = AttributePrefixLM(model, args.attributes, peft_cfg)
            if args.init_prefixes is not None:
                self._init_from_checkpoint(prefix_lm, args.init_prefixes)
            elif args.init_text is not None:
                self._init_from_text(prefix_lm, processing_class, args.init_text)
        tok = processing_class
        start_id = self._start_token_id(tok, args)
        pad = tok.pad_token_id if tok.pad_token_id is not None else start_id
        train_dataset = self._tokenize(train_dataset, tok, args) if train_dataset is not None else None
        eval_dataset = self._tokenize(eval_dataset, tok, args, "eval") if eval_dataset is not None else None
        kwargs.setdefault("data_collator", _Collator(pad))
        self._loss_parts: dict[str, defaultdict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        super().__init__(
            model=prefix_lm,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )

    # ------------------------------------------------------------------ data
    @staticmethod
    def _start_token_id(tok, args: AttributePrefixConfig) -> int:
        if args.start_token is not None:
            vocab = tok.get_vocab()
            if args.start_token not in vocab:
                raise ValueError(f"start_token {args.start_token!r} is not a single token of this tokenizer")
            return vocab[args.start_token]
        start = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
        if start is None:
            raise ValueError("the tokenizer has neither an eos nor a bos token to start each text with")
        return start

    @classmethod
    def _tokenize(cls, dataset, tok, args: AttributePrefixConfig, split: str = "train"):
        if len(dataset) == 0:
            raise ValueError(f"the {split} dataset is empty")
        cols = set(dataset.column_names)
        for c in (args.text_column, args.attribute_column):
            if c not in cols:
                raise ValueError(f"dataset has no column {c!r} (columns: {sorted(cols)})")
        values = set(dataset.unique(args.attribute_column))
        bad = sorted(map(str, values - set(args.attributes)))
        if bad:
            raise ValueError(
                f"unknown attribute values in column {args.attribute_column!r}: {bad}; configured attributes: "
                f"{args.attributes}"
            )
        missing = [a for a in args.attributes if a not in values]
        if missing and split == "train":
            raise ValueError(
                f"configured attributes {missing} have no rows in the training data (column "
                f"{args.attribute_column!r}); their prefixes would be saved untrained. Add data or drop them."
            )
        index = {a: i for i, a in enumerate(args.attributes)}
        eos = cls._start_token_id(tok, args)
        texts = dataset[args.text_column]
        empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if empty:
            raise ValueError(
                f"{len(empty)} {split} row(s) have an empty or non-text {args.text_column!r} (first: row {empty[0]}); "
                "an empty text has no token to learn from. Remove them."
            )

        def encode(batch):
            ids = tok(batch[args.text_column], add_special_tokens=False)["input_ids"]
            return {
                "input_ids": [[eos] + x[: args.max_length - 1] for x in ids],
                "attribute_ids": [index[a] for a in batch[args.attribute_column]],
            }

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names)

    @staticmethod
    @torch.no_grad()
    def _init_from_text(prefix_lm: AttributePrefixLM, tok, text: str) -> None:
        """Set every prefix to the base model's key/values for ``text`` repeated to P tokens.

        With ``prefix_projection`` the MLP output must equal that target; its last affine layer is solved by least
        squares against the MLP's hidden states (exact, since the hidden size >= P).
        """
        phrase = tok(text, add_special_tokens=False)["input_ids"]
        if not phrase:
            raise ValueError(f"init_text {text!r} tokenizes to nothing")
        p = prefix_lm.shape.num_virtual_tokens
        ids = (phrase * (p // len(phrase) + 1))[:p]
        base = prefix_lm.base_model
        dev = base.get_input_embeddings().weight.device
        out = base(input_ids=torch.tensor([ids], device=dev), use_cache=True)
        layers = [(layer.keys, layer.values) for layer in out.cache.layers][: prefix_lm.shape.num_layers]
        target = layers_to_flat_prefix(layers).double()  # (P, L*2*D)
        for enc in prefix_lm.encoders.values():
            if getattr(enc, "prefix_projection", False):
                hidden = enc.transform[1](enc.transform[0](enc.embedding(prefix_lm.prefix_tokens))).double()
                w = torch.linalg.pinv(hidden) @ target  # (E, L*2*D)
                last = enc.transform[2]
                last.weight.copy_(w.T.to(last.weight.dtype))
                last.bias.zero_()
            else:
                enc.embedding.weight.copy_(target.to(enc.embedding.weight.dtype))

    @staticmethod
    @torch.no_grad()
    def _init_from_checkpoint(prefix_lm: AttributePrefixLM, checkpoint_dir: str) -> None:
        """Copy each attribute's materialised prefix from an attribute-prefix checkpoint (matched by name)."""
        ckpt = read_attribute_prefixes(checkpoint_dir)
        if sorted(ckpt.attributes) != sorted(prefix_lm.attributes):
            raise ValueError(
                f"init_prefixes {checkpoint_dir} has attributes {ckpt.attributes}, this run trains "
                f"{prefix_lm.attributes}; use a checkpoint with the same attribute names"
            )
        if ckpt.shape != prefix_lm.shape:
            raise ValueError(
                f"init_prefixes {checkpoint_dir} has prefix shape {ckpt.shape}, this run needs {prefix_lm.shape} "
                "(set num_virtual_tokens to the checkpoint's, and use the base model it was trained on)"
            )
        for i, attribute in enumerate(prefix_lm.attributes):
            enc = prefix_lm.encoders[f"a{i}"]
            enc.embedding.weight.copy_(ckpt.prefixes[attribute].to(enc.embedding.weight.dtype))

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # inputs is not mutated: prediction_step reads the labels from it after compute_loss
        shift_labels = inputs["shift_labels"]
        if self.args.discriminative_weight > 0:
            return self._hybrid_loss(model, inputs, return_outputs, num_items_in_batch)
        out = model(**{k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")})
        logits = out.logits.float()
        nll = F.cross_entropy(
            logits.view(-1, logits.shape[-1]), shift_labels.view(-1), ignore_index=-100, reduction="sum"
        )
        loss = self._normalise(nll, shift_labels, num_items_in_batch)
        return (loss, out) if return_outputs else loss

    def _hybrid_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """Generative NLL under each row's own prefix plus ``discriminative_weight`` x the implied classifier's loss.

        Every text runs under every prefix in one forward of K*B rows; its own attribute's rows give the usual
        next-token loss, and the K summed log-likelihoods are the logits of the classifier the gate measures.
        """
        shift_labels = inputs["shift_labels"]  # (B, T)
        attribute_ids = inputs["attribute_ids"]  # (B,)
        b, k = shift_labels.shape[0], len(self.args.attributes)
        every = torch.arange(k, device=attribute_ids.device).repeat_interleave(b)  # (K*B,): attribute of each row
        out = model(
            input_ids=inputs["input_ids"].repeat(k, 1),
            attribute_ids=every,
            attention_mask=inputs["attention_mask"].repeat(k, 1),
        )
        logits = out.logits.float()  # (K*B, T, V)
        token_nll = F.cross_entropy(
            logits.view(-1, logits.shape[-1]), shift_labels.repeat(k, 1).view(-1), ignore_index=-100, reduction="none"
        ).view(k, b, -1)  # (K, B, T); 0 at ignored positions
        log_likelihood = -token_nll.sum(-1)  # (K, B)
        rows = torch.arange(b, device=attribute_ids.device)
        nll = token_nll[attribute_ids, rows].sum()
        # a mean over the texts of this micro-batch; with num_items_in_batch the Trainer sums micro-batches instead
        # of averaging them, so divide by the accumulation steps here
        texts = b * (self.args.gradient_accumulation_steps if num_items_in_batch is not None else 1)
        classification = F.cross_entropy(log_likelihood.T, attribute_ids, reduction="sum") / texts
        # the two terms and the implied classifier's accuracy, logged beside the loss (see log())
        parts = self._loss_parts["train" if model.training else "eval"]
        parts["token_nll"].append(float(nll) / max(int(shift_labels.ne(-100).sum()), 1))
        parts["classification_loss"].append(float(classification) * texts / b)
        parts["implied_accuracy"].append(float((log_likelihood.argmax(0) == attribute_ids).float().mean()))
        loss = self._normalise(nll, shift_labels, num_items_in_batch) + self.args.discriminative_weight * classification
        if return_outputs:
            # the outputs of each row under its own prefix, as the generative path returns them
            out.logits = out.logits.view(k, b, *out.logits.shape[1:])[attribute_ids, rows]
            return loss, out
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds, with ``discriminative_weight``, the mean over batches since the last log of the next-token loss
        (``token_nll``), the classification loss and the implied classifier's accuracy (``eval_`` ones too)."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        parts = self._loss_parts[mode]
        logs.update({("eval_" if mode == "eval" else "") + k: sum(v) / len(v) for k, v in parts.items() if v})
        parts.clear()
        super().log(logs, start_time)

    def _normalise(self, nll, shift_labels, num_items_in_batch):
        """Summed token NLL -> the loss the Trainer expects (per target token, over the accumulated batch)."""
        if num_items_in_batch is not None:
            # normalised over the whole accumulated (and, with average_tokens_across_devices, global) batch
            loss = nll / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
            self.loss_is_scaled_for_ga = True
        else:
            loss = nll / shift_labels.ne(-100).sum().clamp(min=1)
            self.loss_is_scaled_for_ga = False  # a per-batch mean: let the Trainer divide by the GA steps
        return loss

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # transformers 5 calls _save on every rank under DDP and lets the base method return on non-writers; without
        # this check two ranks raced on the same staging folder (a flaky failure of the torchrun test)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        prefix_lm: AttributePrefixLM = self.accelerator.unwrap_model(self.model)
        # the conditioning is recorded so that AttributePrefixModel applies it itself at generation time
        start_id = self._start_token_id(self.processing_class, self.args)
        conditioning = {START_TEXT: self.processing_class.convert_ids_to_tokens(start_id), START_TOKEN_ID: start_id}
        save_attribute_prefixes(prefix_lm, output_dir, model_card=self._model_card(prefix_lm), extra_index=conditioning)
        if os.path.basename(os.path.normpath(output_dir)).startswith(PREFIX_CHECKPOINT_DIR):
            # a Trainer checkpoint: training resumes from the encoders themselves (with prefix_projection their MLP
            # is not recoverable from the materialised prefixes), written whole or not at all
            tmp = os.path.join(output_dir, f".{TRAINING_STATE}.tmp")
            save_file({k: v.detach().cpu().contiguous() for k, v in prefix_lm.encoders.state_dict().items()}, tmp)
            os.replace(tmp, os.path.join(output_dir, TRAINING_STATE))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_prefix_training_state(self, checkpoint_dir: str) -> None:
        path = os.path.join(checkpoint_dir, TRAINING_STATE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint_dir} has no {TRAINING_STATE}: it was not written by AttributePrefixTrainer (or by a "
                "version before resumable training), so training cannot resume from it"
            )
        check_safetensors_files(checkpoint_dir)
        prefix_lm: AttributePrefixLM = self.accelerator.unwrap_model(self.model)
        state = load_file(path)
        expected = prefix_lm.encoders.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            raise ValueError(
                f"{path} does not match this run's prefixes (attributes {prefix_lm.attributes}, "
                f"{prefix_lm.shape.num_virtual_tokens} virtual tokens, prefix_projection="
                f"{self.args.prefix_projection}); resume with the configuration the checkpoint was trained with"
            )
        prefix_lm.encoders.load_state_dict(state)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_prefix_training_state(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_prefix_training_state(self.state.best_model_checkpoint)

    def _model_card(self, prefix_lm: AttributePrefixLM) -> ModelCard:
        """The checkpoint's card, from the ``attribute_prefixes`` template in ``hub_cards/``."""
        attributes = prefix_lm.attributes
        base = prefix_lm.peft_config.base_model_name_or_path
        return make_model_card(
            "attribute_prefixes",
            model_id=f"air-decoding-prefixes-{'-'.join(attributes)}",
            base_model=_hub_model_id(base),
            attributes=", ".join(attributes),
            example_target=attributes[0],
            model_description=f"Prefix length {prefix_lm.shape.num_virtual_tokens}.",
        )


def _hub_model_id(name: str | None) -> str | None:
    """``name`` if it can be a Hub model id; ``None`` for a local folder (the card's YAML may only name Hub ids)."""
    if not name or os.path.isabs(name) or os.path.isdir(name):
        return None
    return name
