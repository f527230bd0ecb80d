"""`hf-collapse train-prefixes`: train one PEFT prefix per attribute (Air-Decoding's prefix-conditional LMs).

    hf-collapse train-prefixes --model M --data train.jsonl --attributes positive negative --output_dir prefixes \
        --num_train_epochs 1 --per_device_train_batch_size 8 --learning_rate 1e-2

Options are `TrainPrefixesScriptArguments` (the base model, the data files, early stopping, the quality gate) and
every field of `AttributePrefixConfig` under its `TrainingArguments` name. Long runs: `--save_strategy steps
--save_steps N` writes resumable checkpoints; `--resume_from_checkpoint last` (or a checkpoint folder) continues a
stopped run where it left off; on a run that already converged (early stopping fired, best prefixes saved) it trains
nothing and only runs the gate. Training to convergence: `--eval_data held_out.jsonl --eval_strategy steps
--eval_steps N --save_steps N --early_stopping_patience 3` stops when the held-out loss stops improving and keeps the
best prefixes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..validation import check_number
from .utils import CommandError, parse_args

GATE_RESULT = "prefix_gate.json"  # the quality gate's result, written beside the prefixes

__all__ = ["TrainPrefixesScriptArguments", "main"]


@dataclass
class TrainPrefixesScriptArguments:
    """The base model and the training data of `hf-collapse train-prefixes`."""

    model: str = field(metadata={"help": "Base causal LM (name or path); it stays frozen."})
    data: str = field(metadata={"help": "JSON-lines file with one text and one attribute per line."})
    gate_data: str | None = field(
        default=None,
        metadata={"help": "Held-out JSON-lines file (same columns): after training, report the accuracy of the "
                  "classifier the prefixes imply (argmax over attributes of the text's likelihood) and fail below "
                  "--gate_min."},
    )  # fmt: skip
    gate_min: float = field(default=0.8, metadata={"help": "Least gate accuracy; below it the command exits with 3."})
    eval_data: str | None = field(
        default=None,
        metadata={"help": "Held-out JSON-lines file (same columns) for the next-token loss during training (set "
                  "--eval_strategy steps --eval_steps N)."},
    )  # fmt: skip
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop when the held-out loss has not improved for this many evaluations, and keep the best "
                  "prefixes (needs --eval_data; sets load_best_model_at_end with metric eval_loss)."},
    )  # fmt: skip
    early_stopping_threshold: float = field(
        default=0.0,
        metadata={"help": "Least decrease of the held-out loss that counts as an improvement for "
                  "--early_stopping_patience (nats per token; 0: any decrease)."},
    )  # fmt: skip
    early_stopping_min_epochs: float = field(
        default=0.0,
        metadata={"help": "Evaluations before this many epochs never count towards --early_stopping_patience, so "
                  "training sees every text at least this often (the best prefixes are still tracked)."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        for name in ("data", "gate_data", "eval_data"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise CommandError(f"--{name} {path!r} is not a file")
        check_number("--", "gate_min", self.gate_min, minimum=0.0, maximum=1.0)
        check_number("--", "early_stopping_patience", self.early_stopping_patience, integer=True, minimum=1,
                     allow_none=True)  # fmt: skip
        check_number("--", "early_stopping_min_epochs", self.early_stopping_min_epochs, minimum=0.0)
        check_number("--", "early_stopping_threshold", self.early_stopping_threshold, minimum=0.0)
        if self.early_stopping_patience is not None and self.eval_data is None:
            raise CommandError("--early_stopping_patience needs --eval_data (the held-out loss it watches)")
        if (self.early_stopping_min_epochs > 0 or self.early_stopping_threshold > 0) and (
            self.early_stopping_patience is None
        ):
            raise CommandError("--early_stopping_min_epochs and --early_stopping_threshold only apply with "
                               "--early_stopping_patience")  # fmt: skip


def _early_stopping(patience: int, min_epochs: float, threshold: float = 0.0):
    """`EarlyStoppingCallback` whose patience only starts counting once `min_epochs` epochs are done."""
    from transformers import EarlyStoppingCallback

    class MinEpochsEarlyStopping(EarlyStoppingCallback):
        def check_metric_value(self, args, state, control, metric_value):
            super().check_metric_value(args, state, control, metric_value)
            if (state.epoch or 0.0) < min_epochs:
                self.early_stopping_patience_counter = 0

    return MinEpochsEarlyStopping(early_stopping_patience=patience, early_stopping_threshold=threshold)


def _converged_at(checkpoint: str | None, patience: int | None) -> int | None:
    """The step at which a run stopped by the early-stopping criterion with this `patience`, read from its newest
    checkpoint (the patience counter is saved with every checkpoint, after the evaluation that set it); None if it
    did not (a larger patience, or none, continues training)."""
    if patience is None or checkpoint is None or not (Path(checkpoint) / "trainer_state.json").is_file():
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    for saved in (state.get("stateful_callbacks") or {}).values():
        for entry in saved if isinstance(saved, list) else [saved]:
            counter = (entry.get("attributes") or {}).get("early_stopping_patience_counter")
            if counter is not None and counter >= patience:
                return int(state["global_step"])
    return None


def main(argv: Sequence[str]) -> int:
    """Entry point of `hf-collapse train-prefixes`."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..trainers.attribute_prefix import AttributePrefixConfig, AttributePrefixTrainer

    script_args, config = parse_args([TrainPrefixesScriptArguments, AttributePrefixConfig], argv,
                                     prog="hf-collapse train-prefixes")  # fmt: skip
    ds = load_dataset("json", data_files=script_args.data, split="train")
    eval_ds = load_dataset("json", data_files=script_args.eval_data, split="train") if script_args.eval_data else None
    callbacks = []
    if script_args.early_stopping_patience is not None:
        if config.eval_strategy == "no":
            raise CommandError("--early_stopping_patience needs evaluations: add --eval_strategy steps --eval_steps N")
        # set after TrainingArguments' own checks, so check here what load_best_model_at_end needs: a checkpoint at
        # every evaluation
        if config.save_strategy != config.eval_strategy or (
            config.eval_strategy == "steps" and config.save_steps % config.eval_steps != 0
        ):
            raise CommandError("--early_stopping_patience keeps the best checkpoint, so save when you evaluate: use "
                               "the same --save_strategy as --eval_strategy and --save_steps a multiple of --eval_steps")
        config.load_best_model_at_end, config.metric_for_best_model, config.greater_is_better = True, "eval_loss", False
        callbacks.append(_early_stopping(script_args.early_stopping_patience, script_args.early_stopping_min_epochs,
                                         script_args.early_stopping_threshold))  # fmt: skip
    resume = config.resume_from_checkpoint
    if resume == "last":
        from transformers.trainer_utils import get_last_checkpoint

        from ..modeling.attribute_prefixes import CHECKPOINT_INDEX

        resume = get_last_checkpoint(config.output_dir) if Path(config.output_dir).is_dir() else None
        converged = _converged_at(resume, script_args.early_stopping_patience)
        if converged is not None and not (Path(config.output_dir) / CHECKPOINT_INDEX).is_file():
            converged = None  # killed before its best prefixes were saved: resume, until the criterion fires again
        print(f"the run in {config.output_dir} converged at step {converged} (early stopping) and its best prefixes "
              "are saved: not training again" if converged is not None else f"resuming from {resume}" if resume
              else f"no checkpoint in {config.output_dir}: starting afresh")  # fmt: skip
    else:
        converged = None
    tok = AutoTokenizer.from_pretrained(script_args.model)
    model = AutoModelForCausalLM.from_pretrained(script_args.model)
    if converged is None:
        trainer = AttributePrefixTrainer(model=model, args=config, train_dataset=ds, eval_dataset=eval_ds,
                                         processing_class=tok, callbacks=callbacks)  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(config.output_dir)
        print(f"saved attribute prefixes {config.attributes} to {config.output_dir}")
    if script_args.gate_data is None:
        return 0
    from ..evals.prefix_gate import prefix_gate
    from ..processors.attribute_prefix_model import AttributePrefixModel

    held_out = load_dataset("json", data_files=script_args.gate_data, split="train")
    attr = AttributePrefixModel.from_pretrained(model, config.output_dir, tokenizer=tok)
    gate = prefix_gate(attr, tok, held_out[config.text_column], held_out[config.attribute_column],
                       max_length=config.max_length)  # fmt: skip
    per = ", ".join(f"{a} {v:.3f}" for a, v in gate["per_attribute"].items())
    print(f"prefix gate on {gate['n']} held-out texts: accuracy {gate['accuracy']:.4f} ({per})")
    # recorded beside the prefixes, so a model card or a later check reads the figure instead of a log
    record = {"gate_data": str(script_args.gate_data), "gate_min": script_args.gate_min,
              "passed": gate["accuracy"] >= script_args.gate_min,
              **{k: gate[k] for k in ("n", "accuracy", "per_attribute")}}  # fmt: skip
    tmp = Path(config.output_dir) / f".{GATE_RESULT}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, Path(config.output_dir) / GATE_RESULT)
    if gate["accuracy"] < script_args.gate_min:
        print(f"prefix gate FAILED: {gate['accuracy']:.4f} < --gate_min {script_args.gate_min}", file=sys.stderr)
        return 3
    return 0
