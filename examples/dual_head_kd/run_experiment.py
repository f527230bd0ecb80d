"""Head collapse and its fix on Fashion-MNIST: CE, KD, logit-only, naive (CE + logit loss on one head), DHKD,
DHKD + gradient alignment; several seeds each.

Data: Fashion-MNIST IDX files from the Debian package `dataset-fashion-mnist` (no ../shared data is used).

Command (the one that produced docs/dual_head_kd.md):

    python examples/dual_head_kd/run_experiment.py --out runs/dual_head_kd --seeds 0 1 2 --epochs 3 --threads 1
    python examples/dual_head_kd/run_experiment.py --out runs/dual_head_kd --seeds 0 1 2 --epochs 3 --threads 1 \
        --variants ce kd logit naive dhkd dhkd+ga "naive a=5" "dhkd a=5"

It trains the teacher once (a ResNet, ~0.7M parameters), then every (mode, seed) student (a ResNet with ~20k
parameters and two heads), through `hf-collapse distill`'s own code path. Finished runs are skipped on restart.
It writes `results.jsonl`, `results.md` and `results.png` next to this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

VARIANTS = [  # (label, DualHeadDistillationConfig overrides)
    ("ce", {"mode": "ce"}),
    ("kd", {"mode": "kd", "alpha": 1.0, "kd_temperature": 4.0}),
    ("logit", {"mode": "logit", "alpha": 1.0, "temperature": 2.0}),
    ("naive", {"mode": "naive", "alpha": 1.0, "temperature": 2.0}),
    ("dhkd", {"mode": "dhkd", "alpha": 1.0, "temperature": 2.0}),
    ("dhkd+ga", {"mode": "dhkd", "alpha": 1.0, "temperature": 2.0, "gradient_alignment": True}),
    # stress test: a 5x heavier logit-level loss, where the single-head conflict should be larger
    ("naive a=5", {"mode": "naive", "alpha": 5.0, "temperature": 2.0}),
    ("dhkd a=5", {"mode": "dhkd", "alpha": 5.0, "temperature": 2.0}),
]


def training_args(out: Path, epochs: float, seed: int, **overrides):
    from hf_collapse import DualHeadDistillationConfig

    return DualHeadDistillationConfig(
        output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=128, per_device_eval_batch_size=512,
        learning_rate=0.05, optim="sgd", optim_args="momentum=0.9", weight_decay=5e-4, lr_scheduler_type="cosine",
        warmup_steps=0.02, seed=seed, data_seed=seed, report_to="none", use_cpu=True, save_strategy="no",
        logging_steps=25, disable_tqdm=True, dataloader_num_workers=0, **overrides,
    )  # fmt: skip


def train_teacher(out: Path, data_dir: str, epochs: float, threads: int) -> Path:
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    from hf_collapse import DualHeadDistillationTrainer
    from hf_collapse.scripts.distill import _accuracy
    from hf_collapse.scripts.fashion_mnist import FASHION_MNIST_LABELS, FashionMNIST

    path = out / "teacher"
    if (path / "model.safetensors").exists():
        return path
    torch.set_num_threads(threads)
    torch.manual_seed(1234)
    cfg = ResNetConfig(num_channels=1, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[2, 2, 2],
                       layer_type="basic", num_labels=10, id2label=dict(enumerate(FASHION_MNIST_LABELS)))  # fmt: skip
    teacher = ResNetForImageClassification(cfg)
    args = training_args(path, epochs, 1234, mode="ce")
    trainer = DualHeadDistillationTrainer(
        model=teacher, args=args, train_dataset=FashionMNIST(data_dir, "train"), compute_metrics=_accuracy
    )
    t0 = time.perf_counter()
    trainer.train()
    metrics = trainer.evaluate(FashionMNIST(data_dir, "test"))
    trainer.save_model()
    info = {"test_accuracy": metrics["eval_accuracy"], "train_seconds": time.perf_counter() - t0,
            "parameters": sum(p.numel() for p in teacher.parameters()), "epochs": epochs}  # fmt: skip
    (path / "teacher_result.json").write_text(json.dumps(info, indent=2))
    print("teacher:", info, flush=True)
    return path


def summarize(rows: list[dict], teacher_info: dict, out_md: Path, out_png: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    lines = [
        f"Teacher: ResNet ({teacher_info['parameters']:,} params), test accuracy "
        f"{100 * teacher_info['test_accuracy']:.2f}%.",
        "",
        "| variant | seeds | test accuracy (main head), mean ± std | per-seed | train s/epoch (mean) |",
        "|---|---|---|---|---|",
    ]
    stats = []
    for label, _ in VARIANTS:
        rs = by_label.get(label, [])
        if not rs:
            continue
        accs = [100 * r["test_accuracy"] for r in rs]
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        spe = statistics.mean(r["seconds_per_epoch"] for r in rs)
        stats.append((label, mean, std))
        lines.append(
            f"| {label} | {len(rs)} | {mean:.2f} ± {std:.2f} | {', '.join(f'{a:.2f}' for a in accs)} | {spe:.1f} |"
        )
    table = "\n".join(lines)
    out_md.write_text(table + "\n")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.bar([s[0] for s in stats], [s[1] for s in stats], yerr=[s[2] for s in stats], capsize=4, color="tab:blue")
    lo = min(s[1] - s[2] for s in stats)
    hi = max(s[1] + s[2] for s in stats)
    ax1.set_ylim(lo - 0.5, hi + 0.3)
    ax1.set_ylabel("test accuracy of the main head (%)")
    ax1.set_title("Fashion-MNIST student, mean ± std over seeds")
    for label, _ in VARIANTS:
        rs = [r for r in by_label.get(label, []) if r["seed"] == min(x["seed"] for x in by_label[label])]
        if rs:
            curve = [row for row in rs[0]["train_loss_curve"] if "loss_ce" in row]
            if curve:
                ax2.plot([row["step"] for row in curve], [row["loss_ce"] for row in curve], label=label)
    ax2.set_xlabel("step")
    ax2.set_ylabel("training CE of the main head")
    ax2.set_title("main-head CE during training (first seed)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    return table


def main() -> None:
    from hf_collapse.scripts.fashion_mnist import FASHION_MNIST_DIR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/dual_head_kd")
    p.add_argument("--data_dir", default=FASHION_MNIST_DIR)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--teacher_epochs", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS])
    a = p.parse_args()

    import torch

    from hf_collapse.scripts.distill import DistillScriptArguments, run_distillation

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    teacher = train_teacher(out, a.data_dir, a.teacher_epochs, a.threads)
    teacher_info = json.loads((teacher / "teacher_result.json").read_text())
    rows = []
    for seed in a.seeds:  # seed-major so a partial run still covers every variant
        for label, overrides in VARIANTS:
            if label not in a.variants:
                continue
            run_dir = out / f"{label.replace(' ', '_').replace('=', '')}_seed{seed}"
            done = run_dir / "distill_result.json"
            if not done.exists():
                script_args = DistillScriptArguments(teacher=str(teacher), data_dir=a.data_dir, threads=a.threads)
                res = run_distillation(script_args, training_args(run_dir, a.epochs, seed, **overrides))
                print(f"{label} seed {seed}: acc {100 * res['test_accuracy']:.2f}% "
                      f"({res['seconds_per_epoch']:.1f} s/epoch)", flush=True)  # fmt: skip
            res = json.loads(done.read_text())
            rows.append({"label": label, **res})
    with open(HERE / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if k != "train_loss_curve"}) + "\n")
    print(summarize(rows, teacher_info, HERE / "results.md", HERE / "results.png"))


if __name__ == "__main__":
    main()
