"""``AttributePrefixTrainer``: train one PEFT prefix-tuning adapter per attribute (Air-Decoding's PC-LMs).

All attributes train in one run over one mixed dataset: every row is conditioned on its own attribute's prefix, so
a batch mixes attributes and each prefix gets the gradient of its own rows only. The base LM stays frozen.

``save_model(dir)`` writes an *attribute-prefix checkpoint*::

    dir/attribute_prefixes.json    {"attributes", "base_model", "num_virtual_tokens", "hf_collapse_version", ...}
    dir/<attribute>/adapter_config.json, adapter_model.safetensors   # plain PEFT prefix-tuning adapters
    dir/README.md                  model card

Each adapter folder loads on its own with ``PeftModel.from_pretrained(base, dir/<attribute>)``.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PrefixTuningConfig, TaskType
from peft.tuners.prefix_tuning import PrefixEncoder
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments

from ..processors.attribute_prefix_model import (
    ADAPTER_WEIGHTS,
    CHECKPOINT_INDEX,
    PrefixShape,
    flat_prefix_to_layers,
    layers_to_flat_prefix,
    prefix_cache,
    prefixed_positions,
)
from ..version import __version__


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
    # a prefix trainer's extra column (attribute_ids) must survive the Trainer's column pruning
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: the trainer tokenizes itself."})
    report_to: str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})

    def __post_init__(self):
        super().__post_init__()
        if not self.attributes:
            raise ValueError("AttributePrefixConfig.attributes must name at least one attribute")
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"duplicate attribute names in {self.attributes}")
        for a in self.attributes:
            # each attribute becomes a sub-folder of the checkpoint
            if not a or a in {".", ".."} or "/" in a or "\\" in a or a.startswith("."):
                raise ValueError(f"attribute name {a!r} cannot be used as a checkpoint folder name")
        if self.label_names is None:
            # the training module's forward has no `labels` argument, so the Trainer would not find it by itself
            self.label_names = ["labels"]
        if self.num_virtual_tokens < 1:
            raise ValueError("num_virtual_tokens must be >= 1")


def _peft_prefix_config(base: PreTrainedModel, args: AttributePrefixConfig) -> PrefixTuningConfig:
    """The ``PrefixTuningConfig`` PEFT itself would build for ``base`` (heads, token_dim, layers filled in)."""
    # PEFT fills token_dim/num_layers/num_attention_heads (KV heads for GQA models) in this helper; reusing it keeps
    # our adapters byte-compatible with what get_peft_model would produce.
    from peft.utils.other import _prepare_prompt_learning_config

    cfg = PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=args.num_virtual_tokens,
        prefix_projection=args.prefix_projection,
        encoder_hidden_size=args.encoder_hidden_size,
    )
    cfg = _prepare_prompt_learning_config(cfg, base.config.to_dict())
    cfg.base_model_name_or_path = getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", None)
    return cfg


class AttributePrefixLM(nn.Module):
    """The module the Trainer trains: a frozen causal LM plus one ``PrefixEncoder`` per attribute.

    ``forward(input_ids, attention_mask, attribute_ids)`` conditions every row on its own attribute's prefix
    (PEFT's position convention: real tokens start at position P) and returns the base model's output.
    """

    # makes the Trainer count label tokens over the whole accumulated batch (num_items_in_batch)
    accepts_loss_kwargs = True

    def __init__(self, base_model: PreTrainedModel, attributes: list[str], peft_config: PrefixTuningConfig):
        super().__init__()
        self.base_model = base_model
        self.base_model.requires_grad_(False)
        self.attributes = list(attributes)
        self.peft_config = peft_config
        self.shape = PrefixShape.from_peft_config(peft_config)
        # ModuleDict keys cannot contain dots; attribute names can, so index by position
        self.encoders = nn.ModuleDict({f"a{i}": PrefixEncoder(peft_config) for i in range(len(attributes))})
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
    ):
        b = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # compute each prefix once, then gather one per row
        flats = torch.stack([self.flat_prefix(i) for i in range(len(self.attributes))])  # (K, P, D')
        dtype = next(self.base_model.parameters()).dtype
        rows = flats[attribute_ids].to(dtype)  # (B, P, D')
        cache = prefix_cache(flat_prefix_to_layers(rows, self.shape), self.base_model.config)
        p = self.shape.num_virtual_tokens
        return self.base_model(
            input_ids=input_ids,
            attention_mask=torch.cat([attention_mask.new_ones(b, p), attention_mask], dim=1),
            position_ids=prefixed_positions(attention_mask, p),
            cache=cache,
            use_cache=False,
        )


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
            peft_cfg = _peft_prefix_config(model, args)
            prefix_lm = AttributePrefixLM(model, args.attributes, peft_cfg)
            if args.init_text is not None:
                self._init_from_text(prefix_lm, processing_class, args.init_text)
        tok = processing_class
        start_id = self._start_token_id(tok, args)
        pad = tok.pad_token_id if tok.pad_token_id is not None else start_id
        train_dataset = self._tokenize(train_dataset, tok, args) if train_dataset is not None else None
        eval_dataset = self._tokenize(eval_dataset, tok, args) if eval_dataset is not None else None
        kwargs.setdefault("data_collator", _Collator(pad))
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
    def _tokenize(cls, dataset, tok, args: AttributePrefixConfig):
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
        index = {a: i for i, a in enumerate(args.attributes)}
        eos = cls._start_token_id(tok, args)

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

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # inputs is not mutated: prediction_step reads the labels from it after compute_loss
        shift_labels = inputs["shift_labels"]
        out = model(**{k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")})
        logits = out.logits.float()
        nll = F.cross_entropy(
            logits.view(-1, logits.shape[-1]), shift_labels.view(-1), ignore_index=-100, reduction="sum"
        )
        if num_items_in_batch is not None:
            # normalised over the whole accumulated (and, with average_tokens_across_devices, global) batch
            loss = nll / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
            self.loss_is_scaled_for_ga = True
        else:
            loss = nll / shift_labels.ne(-100).sum().clamp(min=1)
            self.loss_is_scaled_for_ga = False  # a per-batch mean: let the Trainer divide by the GA steps
        return (loss, out) if return_outputs else loss

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        prefix_lm: AttributePrefixLM = self.accelerator.unwrap_model(self.model)
        save_attribute_prefixes(prefix_lm, output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))


def save_attribute_prefixes(prefix_lm: AttributePrefixLM, output_dir: str | os.PathLike) -> None:
    """Write the attribute-prefix checkpoint layout (see the module docstring) for ``prefix_lm``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_name = prefix_lm.peft_config.base_model_name_or_path
    for i, attr in enumerate(prefix_lm.attributes):
        sub = out / attr
        sub.mkdir(exist_ok=True)
        cfg = copy.deepcopy(prefix_lm.peft_config)
        cfg.inference_mode = True  # what PEFT itself saves: the materialised prefix, no MLP
        cfg.save_pretrained(str(sub))
        with torch.no_grad():
            flat = prefix_lm.flat_prefix(i).detach().float().cpu().contiguous()
        save_file({"prompt_embeddings": flat}, str(sub / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    index = {
        "format": "hf-collapse/attribute-prefixes",
        "attributes": prefix_lm.attributes,
        "base_model": base_name,
        "num_virtual_tokens": prefix_lm.shape.num_virtual_tokens,
        "hf_collapse_version": __version__,
    }
    (out / CHECKPOINT_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    _write_model_card(out, prefix_lm.attributes, base_name, prefix_lm.shape.num_virtual_tokens)


def _write_model_card(out: Path, attributes: list[str], base_model: str | None, num_virtual_tokens: int) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="hf-collapse",
        tags=["hf-collapse", "air-decoding", "peft", "prefix-tuning", "controllable-generation"],
        base_model=base_model if base_model and not os.path.isabs(base_model) else None,
        pipeline_tag="text-generation",
    )
    attrs = ", ".join(f"`{a}`" for a in attributes)
    description = (
        f"Air-Decoding attribute prefixes ({attrs}), one PEFT prefix-tuning adapter of {num_virtual_tokens} "
        f"virtual tokens per attribute, trained with `hf_collapse.AttributePrefixTrainer` on a frozen "
        f"`{base_model}`.\n\n"
        "Use for controlled generation:\n\n"
        "```python\n"
        "from hf_collapse import AttributePrefixModel, AirDecodingLogitsProcessor\n"
        "am = AttributePrefixModel.from_pretrained(base_model, checkpoint_dir)\n"
        f"proc = AirDecodingLogitsProcessor(am, target={attributes[0]!r}, strength=140.0)\n"
        "model.generate(**inputs, do_sample=True, top_k=200, logits_processor=[proc])\n"
        "```\n\n"
        "Each sub-folder is a plain PEFT adapter: `PeftModel.from_pretrained(base, dir/<attribute>)`."
    )
    card = ModelCard.from_template(
        data, model_id=f"air-decoding-prefixes-{'-'.join(attributes)}", model_description=description
    )
    card.save(str(out / "README.md"))
