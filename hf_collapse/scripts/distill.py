"""`hf-collapse distill`: distil a teacher into a dual-head (or single-head baseline) student on Fashion-MNIST.

    hf-collapse distill --teacher TEACHER_DIR --output_dir out --mode dhkd --alpha 1 --num_train_epochs 3

Options are `DistillScriptArguments` (data and student) and every field of `DualHeadDistillationConfig` under its
`TrainingArguments` name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..validation import check_number
from .fashion_mnist import FASHION_MNIST_DIR
from .utils import CommandError, parse_args, parse_list

__all__ = ["DistillScriptArguments", "build_student", "run_distillation", "main"]


@dataclass
class DistillScriptArguments:
    """Data and student options of `hf-collapse distill` (the training options are `DualHeadDistillationConfig`'s)."""

    teacher: str | None = field(
        default=None, metadata={"help": "Folder of a trained teacher classifier (any AutoModelForImageClassification)."}
    )
    data_dir: str = field(
        default=FASHION_MNIST_DIR,
        metadata={"help": "Folder with the Fashion-MNIST IDX files (`apt-get install -y dataset-fashion-mnist`)."},
    )
    train_limit: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    eval_limit: int | None = field(default=None, metadata={"help": "Use only the first N test images."})
    student_embedding_size: int = field(default=8, metadata={"help": "Stem width of the student ResNet."})
    student_hidden_sizes: str = field(default="8,16,32", metadata={"help": "Comma-separated stage widths."})
    student_depths: str = field(default="1,1,1", metadata={"help": "Comma-separated blocks per stage."})
    aux_head: str = field(default="mlp", metadata={"help": "Auxiliary head: 'mlp' or 'linear'."})
    save_single_head: bool = field(
        default=False, metadata={"help": "Also save the main head as a plain ResNetForImageClassification."}
    )
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (CPU runs)."})

    def __post_init__(self) -> None:
        check_number("--", "train_limit", self.train_limit, integer=True, minimum=1, allow_none=True)
        check_number("--", "eval_limit", self.eval_limit, integer=True, minimum=1, allow_none=True)
        check_number("--", "student_embedding_size", self.student_embedding_size, integer=True, minimum=1)
        check_number("--", "threads", self.threads, integer=True, minimum=1, allow_none=True)
        for name in ("student_hidden_sizes", "student_depths"):
            for value in parse_list(getattr(self, name), int, f"--{name}"):
                check_number("--", name, value, integer=True, minimum=1)
        if len(parse_list(self.student_hidden_sizes, int, "")) != len(parse_list(self.student_depths, int, "")):
            raise CommandError("--student_hidden_sizes and --student_depths need one entry per stage each")
        if self.aux_head not in ("mlp", "linear"):
            raise CommandError(f"--aux_head must be 'mlp' or 'linear', got {self.aux_head!r}")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_student(script_args: DistillScriptArguments, num_labels: int = 10, id2label: dict | None = None):
    """A small ResNet dual-head student for 1-channel 28×28 images."""
    from transformers import ResNetConfig

    from ..modeling.dual_head import DualHeadForImageClassification

    backbone = ResNetConfig(
        num_channels=1,
        embedding_size=script_args.student_embedding_size,
        hidden_sizes=_ints(script_args.student_hidden_sizes),
        depths=_ints(script_args.student_depths),
        layer_type="basic",
    )
    kwargs = {"id2label": id2label} if id2label else {}
    return DualHeadForImageClassification.from_backbone(backbone, num_labels=num_labels, aux_head=script_args.aux_head, **kwargs)


def _accuracy(pred: Any) -> dict[str, float]:
    import numpy as np

    return {"accuracy": float((np.asarray(pred.predictions).argmax(-1) == pred.label_ids).mean())}


def run_distillation(script_args: DistillScriptArguments, training_args: Any) -> dict[str, Any]:
    """Train one student; return its test accuracy (main head), loss curve and time per epoch."""
    import torch
    from transformers import AutoModelForImageClassification

    from ..trainers.dual_head_distillation import DualHeadDistillationTrainer
    from .fashion_mnist import FASHION_MNIST_LABELS, FashionMNIST

    if script_args.threads:
        torch.set_num_threads(script_args.threads)
    train = FashionMNIST(script_args.data_dir, "train", limit=script_args.train_limit)
    test = FashionMNIST(script_args.data_dir, "test", limit=script_args.eval_limit)
    teacher = None
    if training_args.mode != "ce":
        if script_args.teacher is None:
            raise ValueError(f"--teacher is required for mode={training_args.mode!r}")
        teacher = AutoModelForImageClassification.from_pretrained(script_args.teacher, use_safetensors=True)
    torch.manual_seed(training_args.seed)
    student = build_student(script_args, 10, dict(enumerate(FASHION_MNIST_LABELS)))
    trainer = DualHeadDistillationTrainer(
        model=student, teacher_model=teacher, args=training_args, train_dataset=train, compute_metrics=_accuracy
    )
    t0 = time.perf_counter()
    train_out = trainer.train()
    train_s = time.perf_counter() - t0
    metrics = trainer.evaluate(test)
    trainer.save_model()
    if script_args.save_single_head and trainer.args.should_save:
        student.to_single_head().save_pretrained(Path(training_args.output_dir) / "single_head")
    epochs = max(float(train_out.metrics.get("epoch", training_args.num_train_epochs)), 1e-9)
    result = {
        "mode": training_args.mode,
        "gradient_alignment": training_args.gradient_alignment,
        "seed": training_args.seed,
        "test_accuracy": metrics["eval_accuracy"],
        "train_seconds": train_s,
        "seconds_per_epoch": train_s / epochs,
        "epochs": epochs,
        "train_loss_curve": [
            {k: row[k] for k in row if k.startswith("loss") or k in ("step", "epoch")}
            for row in trainer.state.log_history
            if "loss" in row
        ],
    }
    if trainer.args.should_save:
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(training_args.output_dir) / "distill_result.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: Sequence[str]) -> int:
    """Entry point of `hf-collapse distill`."""
    from ..trainers.dual_head_distillation import DualHeadDistillationConfig

    script_args, training_args = parse_args([DistillScriptArguments, DualHeadDistillationConfig], argv, "hf-collapse distill")
    result = run_distillation(script_args, training_args)
    print(json.dumps({k: v for k, v in result.items() if k != "train_loss_curve"}, indent=2))
    return 0
