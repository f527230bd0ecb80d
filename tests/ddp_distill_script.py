"""Launched by tests/test_dual_head_ddp.py, as `torchrun --nproc_per_node N tests/ddp_distill_script.py OUT BS`.

Full-batch DHKD on a fixed synthetic text set (16 rows): every step sees all rows whatever the world size, so the
loss curve of 2 processes × batch 8 must match 1 process × batch 16.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_collapse import (
    DualHeadConfig,
    DualHeadDistillationConfig,
    DualHeadDistillationTrainer,
    DualHeadForSequenceClassification,
)


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 50, (16, 6), generator=g)
        self.y = torch.randint(0, 3, (16,), generator=g)

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.y[i]}


def cfg(**kw):
    return BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)  # fmt: skip


def main() -> None:
    out, bs = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(cfg(num_labels=3))
    student = DualHeadForSequenceClassification(DualHeadConfig(backbone_config=cfg(), num_labels=3, aux_head="linear"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = DualHeadDistillationConfig(
        output_dir=out, mode="dhkd", beta=0.5, per_device_train_batch_size=bs, max_steps=6, optim="sgd",
        learning_rate=0.3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, ddp_backend="gloo" if world > 1 else None, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = DualHeadDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Rows())
    trainer.train()
    trainer.save_model()
    if trainer.args.process_index == 0:
        with open(os.path.join(out, "curve.json"), "w") as f:
            json.dump({"world": world, "wrapped": type(trainer.model_wrapped).__name__,
                       "history": [r for r in trainer.state.log_history if "loss" in r]}, f)  # fmt: skip


if __name__ == "__main__":
    main()
