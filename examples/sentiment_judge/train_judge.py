"""Train the bundled `sentiment-judge` (hashed-BoW logistic regression) used by `hf-collapse demo`.

Uses ../shared/data/sentiment/sst2_alps (SST-2: train.tsv to train, test.tsv = GLUE dev to measure accuracy).
It is NOT disjoint from the Rotten Tomatoes sentences (rt-polarity) the sentiment prefixes are trained on: SST is
built from the same snippets. By normalised match (lower case, letters and digits only), 4,850 of the 10,662
rt-polarity sentences occur in SST-2 train, 680 in test.tsv (GLUE dev) and 651 in the alps dev split. The prefix data
of the Air-Decoding protocol run (`examples/air_decoding/prefix_data.py`) therefore drops every rt-polarity sentence
found in test.tsv or dev.tsv (1,331), so the judge's test sentences stay unseen by the prefixes.

    python examples/sentiment_judge/train_judge.py --out checkpoints/sentiment-judge
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("HF_COLLAPSE_DATA", REPO.parent / "shared" / "data"))


def read_tsv(path: Path) -> list[tuple[str, str]]:
    lab = {"1": "positive", "0": "negative"}
    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [(r[0], lab[r[1]]) for r in rows]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="checkpoints/sentiment-judge")
    p.add_argument("--n_buckets", type=int, default=1 << 18)
    a = p.parse_args()

    import torch

    from hf_collapse.evals.sentiment_judge import HashedBowJudge

    torch.manual_seed(0)
    torch.set_num_threads(1)
    train = read_tsv(DATA / "sentiment/sst2_alps/train.tsv")
    test = read_tsv(DATA / "sentiment/sst2_alps/test.tsv")
    judge = HashedBowJudge(["negative", "positive"], n_buckets=a.n_buckets)
    judge.fit([t for t, _ in train], [y for _, y in train])
    pred = judge.predict([t for t, _ in test])
    acc = sum(p == y for p, (_, y) in zip(pred, test)) / len(test)
    judge.info = {
        "task": "sentiment",
        "trained_on": "SST-2 train (sst2_alps/train.tsv)",
        "train_size": len(train),
        "held_out": "SST-2 GLUE dev (sst2_alps/test.tsv)",
        "held_out_size": len(test),
        "held_out_accuracy": round(acc, 4),
    }
    judge.save_pretrained(a.out)
    write_card(Path(a.out), acc, len(train), len(test))
    print(judge.info)


def write_card(out: Path, acc: float, n_train: int, n_test: int) -> None:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    data = ModelCardData(
        license="apache-2.0", library_name="hf-collapse", tags=["hf-collapse", "sentiment", "judge", "air-decoding"],
        datasets=["stanfordnlp/sst2"], metrics=["accuracy"], pipeline_tag="text-classification", model_name="sentiment-judge",
        eval_results=[EvalResult(task_type="text-classification", dataset_type="stanfordnlp/sst2",
                                 dataset_name="SST-2 (GLUE dev)", metric_type="accuracy", metric_value=round(acc, 4))],
    )  # fmt: skip
    body = f"""
# sentiment-judge

A deliberately simple sentiment judge for `hf-collapse demo`: logistic regression on hashed unigram + bigram
features (2^18 buckets, fp16 weights in safetensors, no pickle). Trained on SST-2 train ({n_train:,} phrases),
{100 * acc:.2f}% accuracy on the SST-2 GLUE dev set ({n_test} sentences). It is independent of the Rotten Tomatoes
sentences used to train the sentiment prefixes.

```python
from hf_collapse.evals.sentiment_judge import HashedBowJudge
judge = HashedBowJudge.from_pretrained("checkpoints/sentiment-judge")
judge.predict(["a gorgeous, moving film", "a dull mess"])  # ['positive', 'negative']
```

Limitations: a bag of words misses negation and sarcasm; use it to compare decoding methods, not as ground truth.
Script: `examples/sentiment_judge/train_judge.py`.
"""
    ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(out / "README.md")


if __name__ == "__main__":
    main()
