"""Publish the DHKD student of examples/dual_head_kd as the bundled Hub-ready checkpoint.

    python examples/dual_head_kd/export_checkpoint.py --run runs/dual_head_kd_v2/fmnist10/dhkd_seed0 \
        --out checkpoints/dual-head-fashion-mnist

Seed 0 of the 10-class setting of run_experiment.py is taken (not the best seed) so the bundled model is not
cherry-picked. The card carries the experiment's tables from examples/dual_head_kd/results.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default="runs/dual_head_kd_v2/fmnist10/dhkd_seed0")
    p.add_argument("--out", default="checkpoints/dual-head-fashion-mnist")
    p.add_argument("--limitations", required=True, help="what the experiment did not show (goes on the card)")
    a = p.parse_args()

    from transformers import AutoModelForImageClassification

    import hf_collapse  # noqa: F401
    from hf_collapse.model_cards import make_model_card

    model = AutoModelForImageClassification.from_pretrained(Path(a.run) / "model", use_safetensors=True)
    result = json.loads((Path(a.run) / "result.json").read_text())
    teacher = json.loads((Path(a.run).parent.parent / "teacher" / "teacher_result.json").read_text())
    card = make_model_card(
        "dual_head_classifier",
        model_id="dual-head-fashion-mnist",
        repo_id="hf-collapse/dual-head-fashion-mnist",
        datasets=["zalando-datasets/fashion_mnist"],
        metrics=["accuracy"],
        license="mit",
        eval_results=[{"task_type": "image-classification", "dataset_type": "zalando-datasets/fashion_mnist",
                       "dataset_name": "Fashion-MNIST (test, 10k)", "metric_type": "accuracy",
                       "metric_value": round(result["test_accuracy"], 4)}],  # fmt: skip
        aux_head=model.config.aux_head,
        model_description=(
            f"A {sum(p.numel() for p in model.parameters()):,}-parameter ResNet student distilled from a "
            f"{teacher['parameters']:,}-parameter ResNet teacher ({100 * teacher['test_accuracy']:.2f}% test accuracy) on "
            f"Fashion-MNIST; this seed reaches {100 * result['test_accuracy']:.2f}% test accuracy with its main head."
        ),
        training_description=(
            "`DualHeadDistillationTrainer(mode='dhkd', alpha=1, temperature=2, alpha_warmup_ratio=0.05)`, 100 "
            "augmented epochs (random crop with 2-pixel padding, horizontal flip) of a class-balanced 5,000-image subset "
            "of the training split, teacher logits cached per augmented view, SGD (momentum 0.9, lr 0.05, step decay "
            "x0.1 at 62.5/75/87.5% of training, weight decay 5e-4), batch 128, gradients clipped at 5, seed 0, on CPU. "
            "Script: `examples/dual_head_kd/run_experiment.py --setting fmnist10`."
        ),
        results_table="Test accuracy of the main head per variant and seed (from the hf-collapse experiment):\n\n"
        + (HERE / "results.md").read_text(),
        limitations=a.limitations,
    )
    model.save_pretrained(a.out, model_card=card)
    print("saved", a.out)


if __name__ == "__main__":
    main()
