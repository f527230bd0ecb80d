"""The quality gate of the bundled attribute prefixes: accuracy of the classifier they imply on held-out data.

    python examples/air_decoding/prefix_gate.py --threads 2

Uses ../shared/data (not shipped with the package): SST-2 test (the GLUE SST-2 dev set, 872 sentences) for the
sentiment prefixes, and a class-balanced sample of the official AG News test set (``--topic_per_class`` per class, fixed
seed) for the topic prefixes. Writes ``prefix_gate.json`` and ``prefix_gate.md`` next to this script.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SHARED = REPO.parent / "shared" / "data"
TOPIC_LABELS = {"World": "world", "Sports": "sports", "Business": "business", "Sci/Tech": "science"}


def sst2_test() -> tuple[list[str], list[str]]:
    rows = list(csv.reader((SHARED / "sentiment/sst2_alps/test.tsv").open(), delimiter="\t"))[1:]
    return [r[0].strip() for r in rows], ["positive" if r[1] == "1" else "negative" for r in rows]


def agnews_test(per_class: int, seed: int) -> tuple[list[str], list[str]]:
    rows = list(csv.reader((SHARED / "topic/agnews_alps/test.tsv").open(), delimiter="\t"))
    by_class: dict[str, list[str]] = {}
    for text, label in rows:
        by_class.setdefault(TOPIC_LABELS[label], []).append(text.strip())
    rng = random.Random(seed)
    texts, labels = [], []
    for label in sorted(by_class):
        for text in rng.sample(by_class[label], per_class):
            texts.append(text)
            labels.append(label)
    return texts, labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--topic_per_class", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--tasks", nargs="+", default=["sentiment", "topic"], choices=["sentiment", "topic"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from hf_collapse.evals.prefix_gate import prefix_gate
    from hf_collapse.processors.attribute_prefix_model import AttributePrefixModel
    from hf_collapse.scripts.smollm2 import load_smollm2
    from hf_collapse.scripts.utils import bundled_checkpoint

    model, tok = load_smollm2()
    out_json = HERE / "prefix_gate.json"
    saved = json.loads(out_json.read_text()) if out_json.is_file() else {"runs": {}}
    results = saved.setdefault("runs", {})
    data = {"sentiment": sst2_test, "topic": lambda: agnews_test(a.topic_per_class, a.seed)}
    for task in a.tasks:
        texts, labels = data[task]()
        attr = AttributePrefixModel.from_pretrained(model, bundled_checkpoint(f"smollm2-135m-{task}-prefixes"))
        t0 = time.perf_counter()
        gate = prefix_gate(attr, tok, texts, labels, batch_size=a.batch_size)
        gate.pop("predictions")
        gate["seconds"] = round(time.perf_counter() - t0, 1)
        results[task] = {"args": vars(a), **gate}
        print(task, json.dumps(gate), flush=True)
        out_json.write_text(json.dumps(saved, indent=2) + "\n")  # after every task: a stopped run keeps its results
    lines = ["| prefixes | held-out data | n | gate accuracy | per attribute (recall) |", "|---|---|---|---|---|"]
    names = {"sentiment": "SST-2 test (GLUE dev)", "topic": "AG News test, {}/class sample"}
    for task, r in results.items():
        per = ", ".join(f"{k} {v:.3f}" for k, v in r["per_attribute"].items())
        where = names[task].format(r["args"]["topic_per_class"])
        lines.append(f"| smollm2-135m-{task}-prefixes | {where} | {r['n']} | {r['accuracy']:.4f} | {per} |")
    (HERE / "prefix_gate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
