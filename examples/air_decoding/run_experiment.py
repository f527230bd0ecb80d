"""Attribute collapse on a real LM: Air-Decoding vs naive weighted decoding with SmolLM2-135M.

Uses data from ``../shared/data`` (the sibling ``shared`` checkout next to this repository; override with
``--data``), and the SmolLM2-135M safetensors copy made by ``prepare_smollm2.py``. Stages (run in order)::

    python examples/air_decoding/prepare_smollm2.py
    python examples/air_decoding/run_experiment.py train    --task sentiment   # prefixes on Rotten Tomatoes
    python examples/air_decoding/run_experiment.py judge    --task sentiment   # classifier on SST-2 (shares sentences with RT!)
    python examples/air_decoding/run_experiment.py generate --task sentiment   # lambda x method grid
    python examples/air_decoding/run_experiment.py report   --task sentiment   # table + plot

Outputs: prefixes and judges in ``~/.cache/hf_collapse/experiment`` (not committed); generations, the table
(``results_<task>.md``/``.json``) and the plot (``collapse_<task>.png``) in this folder.
Everything runs on CPU with ``torch.set_num_threads(--threads)`` (default 1).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = Path(os.environ.get("HF_COLLAPSE_DATA", REPO.parent / "shared" / "data"))
CACHE = Path(os.environ.get("HF_COLLAPSE_CACHE", Path.home() / ".cache" / "hf_collapse"))
LM_DIR = CACHE / "smollm2-135m"
WORK = CACHE / "experiment"
START = "<|endoftext|>"  # put before every training text and every prompt (SmolLM2's document separator)

TASKS = {
    "sentiment": {"attributes": ["positive", "negative"], "prompts": "air_decoding/prompt_sent.jsonl"},
    "topic": {"attributes": ["world", "sports", "business", "science"], "prompts": "air_decoding/prompt_topic.jsonl"},
}


# ------------------------------------------------------------------------------------------------ data
def prefix_training_texts(task: str, data: Path, per_attribute: int) -> tuple[list[str], list[str]]:
    rng = random.Random(0)
    texts, attrs = [], []
    if task == "sentiment":  # Rotten Tomatoes sentence polarity (Pang & Lee), 5,331 per class
        for attr, fn in (("positive", "rt-polarity.pos"), ("negative", "rt-polarity.neg")):
            lines = [x.strip() for x in (data / "sentiment/rt_polarity" / fn).read_text("utf-8").splitlines()]
            lines = [x for x in lines if x]
            rng.shuffle(lines)
            texts += lines[:per_attribute]
            attrs += [attr] * len(lines[:per_attribute])
    else:  # the Air-Decoding AG News 5k-per-class files
        for attr in TASKS["topic"]["attributes"]:
            rows = [json.loads(x) for x in (data / f"air_decoding/decoded/agnews_5k_{attr}.jsonl").open()]
            rows = [r["text"].strip() for r in rows if r["text"].strip()]
            rng.shuffle(rows)
            texts += rows[:per_attribute]
            attrs += [attr] * len(rows[:per_attribute])
    return texts, attrs


def judge_data(task: str, data: Path):
    """(train, test) lists of (text, label). Sentiment: NOT disjoint from the rt-polarity prefix data (SST reuses its
    snippets; see docs/air_decoding.md). Topic: AG News dev/test, checked disjoint from the agnews_5k prefix texts."""

    def tsv(path, header):
        with open(path, encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        return rows[1:] if header else rows

    if task == "sentiment":  # SST-2 (alps split): train for training, GLUE dev (test.tsv) for held-out accuracy
        lab = {"1": "positive", "0": "negative"}
        train = [(r[0], lab[r[1]]) for r in tsv(data / "sentiment/sst2_alps/train.tsv", True)]
        test = [(r[0], lab[r[1]]) for r in tsv(data / "sentiment/sst2_alps/test.tsv", True)]
    else:  # AG News dev for training, the official test set for held-out accuracy
        lab = {"World": "world", "Sports": "sports", "Business": "business", "Sci/Tech": "science"}
        train = [(r[0], lab[r[1]]) for r in tsv(data / "topic/agnews_alps/dev.tsv", False) if r[1] in lab]
        test = [(r[0], lab[r[1]]) for r in tsv(data / "topic/agnews_alps/test.tsv", False) if r[1] in lab]
    return train, test


def load_prompts(task: str, data: Path) -> list[str]:
    return [json.loads(x)["prompt"] for x in (data / TASKS[task]["prompts"]).open() if x.strip()]


def load_lm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (LM_DIR / "model.safetensors").is_file():
        raise SystemExit(f"{LM_DIR} missing: run examples/air_decoding/prepare_smollm2.py first")
    return AutoModelForCausalLM.from_pretrained(LM_DIR).eval(), AutoTokenizer.from_pretrained(LM_DIR)


# ------------------------------------------------------------------------------------------------ judge
JUDGE_BUCKETS = 1 << 20


def train_judge(task: str, data: Path) -> dict:
    """Logistic regression on hashed unigram+bigram counts (no sklearn here): hf_collapse's HashedBowJudge."""
    from hf_collapse.evals.sentiment_judge import HashedBowJudge

    train, test = judge_data(task, data)
    judge = HashedBowJudge(TASKS[task]["attributes"], n_buckets=JUDGE_BUCKETS)
    judge.fit([t for t, _ in train], [y for _, y in train], epochs=3, lr=0.05, seed=0)
    pred = judge.predict([t for t, _ in test])
    acc = sum(p == y for p, (_, y) in zip(pred, test)) / len(test)
    WORK.mkdir(parents=True, exist_ok=True)
    judge.save_pretrained(WORK / f"judge_{task}", dtype=torch.float32)
    info = {"task": task, "train_size": len(train), "test_size": len(test), "held_out_accuracy": acc}
    (HERE / f"judge_{task}.json").write_text(json.dumps(info, indent=2) + "\n")
    print(info)
    return info


def load_judge(task: str):
    from hf_collapse.evals.sentiment_judge import HashedBowJudge

    return HashedBowJudge.from_pretrained(WORK / f"judge_{task}")


# ------------------------------------------------------------------------------------------------ prefixes
def train_prefixes(task: str, data: Path, a) -> None:
    from datasets import Dataset

    from hf_collapse import AttributePrefixConfig, AttributePrefixTrainer

    model, tok = load_lm()
    texts, attrs = prefix_training_texts(task, data, a.per_attribute)
    ds = Dataset.from_dict({"text": texts, "attribute": attrs}).shuffle(seed=0)
    out = WORK / f"prefixes_{task}"
    args = AttributePrefixConfig(
        output_dir=str(WORK / f"run_{task}"),
        attributes=TASKS[task]["attributes"],
        num_virtual_tokens=20,
        prefix_projection=a.prefix_projection,
        init_text="The following text is",
        start_token=START,
        max_length=a.max_length,
        per_device_train_batch_size=a.batch_size,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="linear",
        warmup_steps=max(1, a.steps // 10),
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=10,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = AttributePrefixTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    t0 = time.time()
    trainer.train()
    trainer.save_model(str(out))
    log = [h for h in trainer.state.log_history if "loss" in h]
    info = {
        "task": task,
        "texts": len(ds),
        "steps": a.steps,
        "batch_size": a.batch_size,
        "lr": a.lr,
        "prefix_projection": a.prefix_projection,
        "train_seconds": round(time.time() - t0, 1),
        "loss_first": log[0]["loss"] if log else None,
        "loss_last": log[-1]["loss"] if log else None,
        "loss_curve": [(h["step"], round(h["loss"], 4)) for h in log],
    }
    (HERE / f"prefixes_{task}.json").write_text(json.dumps(info, indent=2) + "\n")
    print({k: v for k, v in info.items() if k != "loss_curve"})


# ------------------------------------------------------------------------------------------------ generation
def generate_grid(task: str, data: Path, a) -> None:
    from hf_collapse import AttributePrefixModel
    from hf_collapse.processors.air_decoding import AirDecodingLogitsProcessor, WeightedDecodingLogitsProcessor

    model, tok = load_lm()
    tok.padding_side = "left"
    am = AttributePrefixModel.from_pretrained(model, WORK / f"prefixes_{task}")
    prompts = load_prompts(task, data)
    targets = TASKS[task]["attributes"]
    grid = [("plain", 0.0, False)]
    for lam in a.strengths:
        if lam > 0:
            grid += [("air", lam, False), ("weighted", lam, False)]
    for lam in a.normalize_strengths:
        grid.append(("air-normalized", lam, True))
    out_path = HERE / f"generations_{task}.jsonl"
    done = set()
    if out_path.exists():
        for line in out_path.open():
            r = json.loads(line)
            done.add((r["method"], r["strength"], r["target"], r.get("seed", 0)))
    enc = tok([START + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    for method, lam, normalize in grid:
        for target in targets:
            if (method, lam, target, a.seed) in done:
                continue
            torch.manual_seed(a.seed)
            procs = []
            if method != "plain":
                cls = WeightedDecodingLogitsProcessor if method == "weighted" else AirDecodingLogitsProcessor
                procs = [cls(am, target, lam, prompt_attention_mask=enc["attention_mask"], normalize=normalize)]
            t0 = time.time()
            with torch.no_grad():
                seqs = model.generate(
                    **enc,
                    logits_processor=procs,
                    do_sample=True,
                    top_k=200,
                    top_p=1.0,
                    temperature=1.0,
                    max_new_tokens=a.length,
                    min_new_tokens=a.length,
                    num_return_sequences=a.samples,
                    pad_token_id=tok.pad_token_id,
                )
            dt = time.time() - t0
            t_in = enc["input_ids"].shape[1]
            with out_path.open("a") as f:
                for r, row in enumerate(seqs):
                    p = prompts[r // a.samples]
                    cont = tok.decode(row[t_in:], skip_special_tokens=True)
                    rec = {
                        "method": method,
                        "strength": lam,
                        "target": target,
                        "seed": a.seed,
                        "prompt": p,
                        "continuation": cont,
                    }
                    f.write(json.dumps(rec) + "\n")
            print(f"{method} lambda={lam} target={target}: {len(seqs)} texts in {dt:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------------ report
def report(task: str, a) -> None:
    import importlib.util

    metrics = REPO / "hf_collapse" / "metrics"

    def load(name):
        spec = importlib.util.spec_from_file_location(name, metrics / name / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    dist_n, perplexity = load("dist_n").dist_n, load("perplexity").perplexities
    model, tok = load_lm()
    judge = load_judge(task)
    rows = [json.loads(x) for x in (HERE / f"generations_{task}.jsonl").open()]
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["strength"]), []).append(r)
    table = []
    for (method, lam), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        full = [r["prompt"] + r["continuation"] for r in rs]
        pred = judge.predict(full)
        acc = sum(p == r["target"] for p, r in zip(pred, rs)) / len(rs)
        ppl = perplexity(full, model, tok, prompts=[r["prompt"] for r in rs], prefix=START)
        ppl = sorted(p for p in ppl if p == p and math.isfinite(p))
        # Dist-n per (target, seed) group, then averaged: plain sampling gives the same texts for every target
        parts: dict = {}
        for r in rs:
            parts.setdefault((r["target"], r.get("seed", 0)), []).append(r["continuation"])
        ds = [dist_n(v) for v in parts.values()]
        d = {k: sum(x[k] for x in ds) / len(ds) for k in ds[0]}
        table.append(
            {
                "method": method,
                "strength": lam,
                "n": len(rs),
                "accuracy": acc,
                "ppl_mean": sum(ppl) / len(ppl),
                "ppl_median": ppl[len(ppl) // 2],
                **d,
            }
        )
        print(table[-1], flush=True)
    (HERE / f"results_{task}.json").write_text(json.dumps(table, indent=2) + "\n")
    lines = [
        "| method | λ | texts | attribute acc. | PPL mean | PPL median | Dist-1 | Dist-2 | Dist-3 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(
            f"| {t['method']} | {t['strength']:g} | {t['n']} | {t['accuracy']:.3f} | {t['ppl_mean']:.1f} | "
            f"{t['ppl_median']:.1f} | {t['dist-1']:.3f} | {t['dist-2']:.3f} | {t['dist-3']:.3f} |"
        )
    (HERE / f"results_{task}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(task, table)


def plot(task: str, table: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = [t for t in table if t["method"] == "plain"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, style in (("air", "o-"), ("weighted", "s--"), ("air-normalized", "^:")):
        pts = sorted((t["strength"], t) for t in table if t["method"] == method)
        if not pts:
            continue
        pts = [(0.0, plain[0])] + pts if plain else pts
        xs = [max(x, 1.0) for x, _ in pts]  # λ = 0 drawn at 1 on the log axis
        axes[0].plot(xs, [t["ppl_median"] for _, t in pts], style, label=method)
        axes[1].plot(xs, [t["accuracy"] for _, t in pts], style, label=method)
    for ax, name in zip(axes, ("perplexity (median, base LM without prefix)", "attribute accuracy (judge)")):
        ax.set_xscale("log")
        ax.set_xlabel("control strength λ (λ=0 plotted at 1)")
        ax.set_ylabel(name)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(f"Attribute collapse, SmolLM2-135M, {task}")
    fig.tight_layout()
    fig.savefig(HERE / f"collapse_{task}.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["train", "judge", "generate", "report"])
    ap.add_argument("--task", choices=list(TASKS), default="sentiment")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument(
        "--prefix-projection",
        type=int,
        default=0,
        help="1: PEFT's MLP reparameterisation (diverged here at lr 5e-3); 0: train the K/V directly",
    )
    ap.add_argument("--per-attribute", type=int, default=5000)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--length", type=int, default=30)
    ap.add_argument("--strengths", type=float, nargs="+", default=[0, 10, 40, 140, 500])
    ap.add_argument("--normalize-strengths", type=float, nargs="*", default=[140])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = Path(a.data)
    if a.stage == "train":
        train_prefixes(a.task, data, a)
    elif a.stage == "judge":
        train_judge(a.task, data)
    elif a.stage == "generate":
        generate_grid(a.task, data, a)
    else:
        report(a.task, a)


if __name__ == "__main__":
    main()
