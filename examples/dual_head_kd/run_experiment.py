"""Head collapse in the paper's setting: Fashion-MNIST (10 classes) and Fashion-MNIST pairs (100 classes), trained
to the end-of-training regime with augmentation, ten variants, several seeds, paired statistics and head statistics.

Data: the Fashion-MNIST IDX files of the Debian package `dataset-fashion-mnist` (no ../shared data is used). The
student trains on a fixed, class-balanced subset of the official training split and is tested on the official test
split (a separate file).

Commands (the ones behind docs/dual_head_kd.md; each finished run is skipped on restart, so a stopped command
picks up where it left off):

    python examples/dual_head_kd/run_experiment.py --setting fmnist10 --seeds 0 1 2 3 4
    python examples/dual_head_kd/run_experiment.py --setting pairs100 --seeds 0 1 2 3 4
    python examples/dual_head_kd/run_experiment.py --summarize

Recipe (both settings):
* teacher: a ResNet (~0.7M parameters) trained once on all 60k training images with the same augmentation; the
  100-class teacher is that network applied to each half of a pair, its logit for class 10·a + b being
  z_a + z_b (exactly the log of the product of the two halves' probabilities, up to a constant);
* augmentation: random crop with 2-pixel zero padding and horizontal flip (each 28×28 half of a pair on its own,
  so a flip never swaps the two halves and the label stays right);
* `epochs` augmented views of every training image are drawn once per seed, the teacher's logits are cached per
  view (`precompute_teacher_logits`), and every variant of that seed trains on those same views in the same order:
  the variants of one seed differ only in their loss, so per-seed differences are paired;
* student: a ResNet with stage widths 32/64/128 (a 128-d feature), two heads (`DualHeadForImageClassification`;
  the single-head modes use only the main head), SGD momentum 0.9, lr 0.05, weight decay 5e-4, batch 128, step
  decay ×0.1 at 62.5%, 75% and 87.5% of training (the CRD/DHKD CIFAR schedule, scaled);
* distillation weight warmed up over the first 5% of training and gradients clipped at norm 5 in every variant
  (`alpha_warmup_ratio`, `max_grad_norm`), for stability at 100 classes without changing the loss.

Outputs in `--out` (per run: `result.json`) and, with `--summarize`, `results.md`, `results.jsonl` and
`results.png` next to this script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from hf_collapse.scripts.fashion_mnist import read_split

HERE = Path(__file__).resolve().parent

SETTINGS = {  # name -> (number of classes, training subset size, epochs (views per image), pairs?)
    "fmnist10": dict(num_labels=10, train_size=5000, epochs=100, pairs=False),
    "pairs100": dict(num_labels=100, train_size=5000, epochs=100, pairs=True),
}

_LOGIT = {"temperature": 2.0}
VARIANTS = [  # (label, DualHeadDistillationConfig overrides); naive at α is always paired with logit at α
    ("ce", {"mode": "ce"}),
    ("kd", {"mode": "kd", "alpha": 1.0, "kd_temperature": 4.0}),
    ("logit", {"mode": "logit", "alpha": 1.0, "logit_loss": "binary_kl", **_LOGIT}),
    ("naive", {"mode": "naive", "alpha": 1.0, "logit_loss": "binary_kl", **_LOGIT}),
    ("dhkd", {"mode": "dhkd", "alpha": 1.0, "logit_loss": "binary_kl_norm", **_LOGIT}),
    ("dhkd+ga", {"mode": "dhkd", "alpha": 1.0, "logit_loss": "binary_kl_norm", "gradient_alignment": True, **_LOGIT}),
    ("naive a=3", {"mode": "naive", "alpha": 3.0, "logit_loss": "binary_kl", **_LOGIT}),
    ("logit a=3", {"mode": "logit", "alpha": 3.0, "logit_loss": "binary_kl", **_LOGIT}),
    ("naive a=10", {"mode": "naive", "alpha": 10.0, "logit_loss": "binary_kl", **_LOGIT}),
    ("logit a=10", {"mode": "logit", "alpha": 10.0, "logit_loss": "binary_kl", **_LOGIT}),
]
LABELS = [v[0] for v in VARIANTS]
TEACHER_EPOCHS = 12


# ---------------------------------------------------------------------------------------------------- data
def balanced_subset(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Indices of `size` training images, the same number per class, fixed by `seed` (shared by every run)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = size // len(classes)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per, replace=False) for c in classes]))


def pair_up(images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each image i beside image perm[i]: `(N, 2, 28, 28)` tiles and labels 10·a + b."""
    perm = np.random.default_rng(seed).permutation(len(labels))
    return np.stack([images, images[perm]], 1), labels * 10 + labels[perm], perm


def augment(tiles: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip of uint8 tiles `(M, 28, 28)`, each tile on its own."""
    m, h, w = tiles.shape
    padded = torch.nn.functional.pad(tiles, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (m,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (m,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(m, h, w)  # (M, H, W)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(m, h, w)
    out = padded[torch.arange(m)[:, None, None], rows, cols]
    flip = torch.rand(m, generator=gen) < 0.5
    return torch.where(flip[:, None, None], out.flip(-1), out)


class Views(torch.utils.data.Dataset):
    """Images `(N, 1, H, W)` stored as uint8, normalised on access, with labels: what `Trainer` reads."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from hf_collapse.scripts.fashion_mnist import _MEAN, _STD

        x = self.images[i].float().div_(255.0).sub_(_MEAN).div_(_STD)
        return {"pixel_values": x[None], "labels": self.labels[i]}


def as_views(tiles: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> Views:
    """`(N, 28, 28)` images or `(N, 2, 28, 28)` pairs (side by side, 28×56) as a `Views` dataset."""
    t = torch.as_tensor(tiles)
    if t.dim() == 4:
        t = torch.cat([t[:, 0], t[:, 1]], dim=-1)
    return Views(t.contiguous(), torch.as_tensor(labels))


def augmented_views(tiles: np.ndarray, labels: np.ndarray, epochs: int, seed: int) -> Views:
    """`epochs` augmented views of every item (epoch-major), drawn with `seed`."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    base = torch.from_numpy(tiles)
    chunks = []
    for _ in range(epochs):
        if base.dim() == 4:  # pairs: each half augmented on its own
            chunks.append(torch.stack([augment(base[:, 0], gen), augment(base[:, 1], gen)], 1))
        else:
            chunks.append(augment(base, gen))
    return as_views(torch.cat(chunks), torch.from_numpy(labels).repeat(epochs))


# ------------------------------------------------------------------------------------------------- models
class PairTeacher(torch.nn.Module):
    """The 10-class teacher on both halves of a `(B, 1, 28, 56)` pair: logit of class 10·a + b = z_a + z_b."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.teacher = teacher
        self.config = type("Cfg", (), {"num_labels": 100})()

    def forward(self, pixel_values: torch.Tensor):
        from transformers.modeling_outputs import ImageClassifierOutput

        z = self.teacher(pixel_values=torch.cat(pixel_values.split(28, dim=-1), 0)).logits  # (2B, 10)
        za, zb = z.chunk(2)
        return ImageClassifierOutput(logits=(za[:, :, None] + zb[:, None, :]).flatten(1))  # (B, 100)


def build_student(num_labels: int):
    from transformers import ResNetConfig

    from hf_collapse import DualHeadForImageClassification
    from hf_collapse.scripts.fashion_mnist import FASHION_MNIST_LABELS

    names = FASHION_MNIST_LABELS if num_labels == 10 else [f"{a} | {b}" for a in FASHION_MNIST_LABELS
                                                           for b in FASHION_MNIST_LABELS]  # fmt: skip
    backbone = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 128], depths=[1, 1, 1],
                            layer_type="basic")  # fmt: skip
    return DualHeadForImageClassification.from_backbone(backbone, num_labels=num_labels, aux_head="mlp",
                                                        id2label=dict(enumerate(names)))


def step_decay(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    marks = [int(f * total_steps) for f in (0.625, 0.75, 0.875)]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 ** sum(s >= m for m in marks))


def config(out: Path, seed: int, **overrides):
    from hf_collapse import DualHeadDistillationConfig

    base = dict(
        output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=128, per_device_eval_batch_size=1000,
        seed=seed, data_seed=seed, report_to="none", use_cpu=True, save_strategy="no", logging_steps=100,
        disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=5.0, alpha_warmup_ratio=0.05,
    )  # fmt: skip
    return DualHeadDistillationConfig(**{**base, **overrides})


def train(model, args, views, teacher=None):
    from hf_collapse import DualHeadDistillationTrainer

    steps = math.ceil(len(views) / args.per_device_train_batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    trainer = DualHeadDistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=views,
                                          optimizers=(opt, step_decay(opt, steps)))  # fmt: skip
    trainer.train()
    return trainer


@torch.no_grad()
def accuracy(model, views: Views, batch: int = 1000) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(views), batch):
        items = [views[j] for j in range(i, min(i + batch, len(views)))]
        x = torch.stack([it["pixel_values"] for it in items])
        y = torch.stack([it["labels"] for it in items])
        hits += int((model(pixel_values=x).logits.argmax(-1) == y).sum())
    return hits / len(views)


def head_statistics(weight: torch.Tensor) -> dict[str, float]:
    """Norms of the classifier rows and the mean pairwise cosine between them (the paper's head diagnostics)."""
    w = weight.detach().double()
    norms = w.norm(dim=1)
    unit = w / norms[:, None].clamp_min(1e-12)
    cos = unit @ unit.T
    off = cos[~torch.eye(len(w), dtype=torch.bool)]
    return {"row_norm_mean": norms.mean().item(), "row_norm_cv": (norms.std() / norms.mean()).item(),
            "cos_mean": off.mean().item(), "cos_std": off.std().item(),
            "cos_equiangular": -1.0 / (len(w) - 1)}  # fmt: skip


def atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------- runs
def teacher_path(out: Path, data_dir: str) -> Path:
    """Train the 10-class teacher once (all 60k training images, augmented) and return its folder."""
    from transformers import ResNetConfig, ResNetForImageClassification

    from hf_collapse.scripts.fashion_mnist import FASHION_MNIST_LABELS

    path = out / "teacher"
    if (path / "teacher_result.json").exists():
        return path
    images, labels = read_split(data_dir, "train")
    torch.manual_seed(1234)
    cfg = ResNetConfig(num_channels=1, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[2, 2, 2],
                       layer_type="basic", num_labels=10, id2label=dict(enumerate(FASHION_MNIST_LABELS)))  # fmt: skip
    teacher = ResNetForImageClassification(cfg)
    t0 = time.perf_counter()
    views = augmented_views(images, labels, TEACHER_EPOCHS, seed=1234)
    trainer = train(teacher, config(path, 1234, mode="ce"), views)
    test_images, test_labels = read_split(data_dir, "test")
    info = {"test_accuracy": accuracy(teacher, as_views(test_images, test_labels)),
            "train_seconds": time.perf_counter() - t0, "epochs": TEACHER_EPOCHS,
            "parameters": sum(p.numel() for p in teacher.parameters())}  # fmt: skip
    trainer.save_model()
    atomic_json(path / "teacher_result.json", info)
    print("teacher:", info, flush=True)
    return path


def run_setting(name: str, seeds: list[int], variants: list[str], out: Path, data_dir: str) -> None:
    from transformers import AutoModelForImageClassification

    from hf_collapse import precompute_teacher_logits

    s = SETTINGS[name]
    teacher = AutoModelForImageClassification.from_pretrained(teacher_path(out, data_dir)).eval()
    if s["pairs"]:
        teacher = PairTeacher(teacher)
    images, labels = read_split(data_dir, "train")
    idx = balanced_subset(labels, s["train_size"])
    train_tiles, train_labels = images[idx], labels[idx]
    test_tiles, test_labels = read_split(data_dir, "test")
    if s["pairs"]:
        train_tiles, train_labels, _ = pair_up(train_tiles, train_labels, seed=1)
        test_tiles, test_labels, _ = pair_up(test_tiles, test_labels, seed=2)
    train_plain, test = as_views(train_tiles, train_labels), as_views(test_tiles, test_labels)
    for seed in seeds:
        todo = [v for v in VARIANTS if v[0] in variants and not (out / name / f"{_slug(v[0])}_seed{seed}" /
                                                                 "result.json").exists()]  # fmt: skip
        if not todo:
            continue
        t0 = time.perf_counter()
        views = augmented_views(train_tiles, train_labels, s["epochs"], seed)
        cached = precompute_teacher_logits(teacher, views, batch_size=1000, dtype=torch.float32)
        print(f"[{name} seed {seed}] {len(views)} views, teacher logits cached in {time.perf_counter() - t0:.0f} s",
              flush=True)  # fmt: skip
        for label, overrides in todo:
            run_dir = out / name / f"{_slug(label)}_seed{seed}"
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            student = build_student(s["num_labels"])
            trainer = train(student, config(run_dir, seed, **overrides), cached)
            losses = [r for r in trainer.state.log_history if "loss" in r]
            finite = all(math.isfinite(r["loss"]) for r in losses)
            res = {"setting": name, "label": label, "seed": seed, **overrides,
                   "test_accuracy": accuracy(student, test), "train_accuracy": accuracy(student, train_plain),
                   "diverged": not finite, "train_seconds": time.perf_counter() - t0,
                   "head": head_statistics(student.classifier.weight), "loss_curve": losses}  # fmt: skip
            res["diverged"] = res["diverged"] or res["test_accuracy"] < 2.0 / s["num_labels"]
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_json(run_dir / "result.json", res)
            if label == "dhkd" and seed == seeds[0]:
                trainer.save_model(str(run_dir / "model"))  # the bundled checkpoint is exported from here
            print(f"[{name} seed {seed}] {label}: test {100 * res['test_accuracy']:.2f}%, train "
                  f"{100 * res['train_accuracy']:.2f}%, cos {res['head']['cos_mean']:.3f}, "
                  f"{res['train_seconds']:.0f} s{' DIVERGED' if res['diverged'] else ''}", flush=True)  # fmt: skip


def _slug(label: str) -> str:
    return label.replace(" ", "_").replace("=", "").replace("+", "_")


# ---------------------------------------------------------------------------------------------- summary
def t_interval(diffs: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval of paired differences."""
    from scipy import stats

    n = len(diffs)
    mean = statistics.mean(diffs)
    if n < 2:
        return mean, float("nan")
    return mean, stats.t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)


def summarize(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/*/result.json"))]
    teacher = json.loads((out / "teacher" / "teacher_result.json").read_text())
    with open(HERE / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if k != "loss_curve"}) + "\n")
    md = [f"Teacher: ResNet ({teacher['parameters']:,} parameters), {teacher['epochs']} augmented epochs on all 60k "
          f"training images, test accuracy {100 * teacher['test_accuracy']:.2f}% (10 classes).", ""]  # fmt: skip
    for name in SETTINGS:
        rs = [r for r in rows if r["setting"] == name]
        if not rs:
            continue
        acc = {(r["label"], r["seed"]): 100 * r["test_accuracy"] for r in rs}
        md += [f"### {name} ({SETTINGS[name]['num_labels']} classes, {SETTINGS[name]['train_size']} training "
               f"{'pairs' if SETTINGS[name]['pairs'] else 'images'}, {SETTINGS[name]['epochs']} epochs)", "",
               "| variant | runs (diverged) | test acc. % mean ± std | − kd, paired [95% CI] | − ce, paired [95% CI] "
               "| train acc. % | row-norm CV | mean cos (equiangular) |",
               "|---|---|---|---|---|---|---|---|"]  # fmt: skip

        def paired(label: str, base: str, acc: dict = acc) -> str:
            seeds = sorted(s for (lab, s) in acc if lab == label and (base, s) in acc)
            if not seeds or label == base:
                return "–"
            m, h = t_interval([acc[(label, s)] - acc[(base, s)] for s in seeds])
            return f"{m:+.2f} [{m - h:+.2f}, {m + h:+.2f}]" if math.isfinite(h) else f"{m:+.2f}"

        for label in LABELS:
            mine = [r for r in rs if r["label"] == label]
            if not mine:
                continue
            a = [100 * r["test_accuracy"] for r in mine]
            sd = statistics.stdev(a) if len(a) > 1 else 0.0
            h = [r["head"] for r in mine]
            md.append(f"| {label} | {len(mine)} ({sum(r['diverged'] for r in mine)}) | {statistics.mean(a):.2f} ± "
                      f"{sd:.2f} | {paired(label, 'kd')} | {paired(label, 'ce')} | "
                      f"{statistics.mean(100 * r['train_accuracy'] for r in mine):.2f} | "
                      f"{statistics.mean(x['row_norm_cv'] for x in h):.3f} | "
                      f"{statistics.mean(x['cos_mean'] for x in h):+.3f} ({h[0]['cos_equiangular']:+.3f}) |")  # fmt: skip
        md += ["", "naive against logit alone at the same weight (paired, [95% CI]): " + "; ".join(
            f"α={a}: {paired(f'naive{sfx}', f'logit{sfx}')}" for a, sfx in (("1", ""), ("3", " a=3"), ("10", " a=10"))
        ), ""]  # fmt: skip
    text = "\n".join(md)
    (HERE / "results.md").write_text(text + "\n")
    plot(rows, HERE / "results.png")
    return text


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SETTINGS if any(r["setting"] == n for r in rows)]
    fig, axes = plt.subplots(len(names), 2, figsize=(13, 4.2 * len(names)), squeeze=False)
    for ax, name in zip(axes, names):
        rs = [r for r in rows if r["setting"] == name]
        labels = [lab for lab in LABELS if any(r["label"] == lab for r in rs)]
        means, halves, cos = [], [], []
        for lab in labels:
            a = [100 * r["test_accuracy"] for r in rs if r["label"] == lab]
            m, h = t_interval(a) if len(a) > 1 else (a[0], 0.0)
            means.append(m)
            halves.append(h)
            cos.append([r["head"]["cos_mean"] for r in rs if r["label"] == lab])
        ax[0].bar(labels, means, yerr=halves, capsize=3, color="tab:blue")
        ax[0].set_ylim(min(m - h for m, h in zip(means, halves)) - 1, max(m + h for m, h in zip(means, halves)) + 0.5)
        ax[0].set_ylabel("test accuracy % (mean, 95% CI)")
        ax[0].set_title(f"{name}: main-head accuracy")
        ax[0].tick_params(axis="x", rotation=45)
        ax[1].boxplot(cos, tick_labels=labels)
        ax[1].axhline(rs[0]["head"]["cos_equiangular"], color="gray", ls="--", label="equiangular −1/(C−1)")
        ax[1].set_ylabel("mean pairwise cosine of classifier rows")
        ax[1].set_title(f"{name}: main-head geometry")
        ax[1].tick_params(axis="x", rotation=45)
        ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from hf_collapse.scripts.fashion_mnist import FASHION_MNIST_DIR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=list(SETTINGS))
    p.add_argument("--out", default="runs/dual_head_kd_v2")
    p.add_argument("--data_dir", default=FASHION_MNIST_DIR)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--variants", nargs="+", default=LABELS, choices=LABELS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--summarize", action="store_true", help="only write results.md/.jsonl/.png from finished runs")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    if a.setting:
        run_setting(a.setting, a.seeds, a.variants, out, a.data_dir)
    if a.summarize or a.setting:
        print(summarize(out))


if __name__ == "__main__":
    main()
