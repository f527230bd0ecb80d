"""Training data for prefixes trained to convergence: `{task}_train.jsonl`, `{task}_eval.jsonl` (held-out loss
curve) and `{task}_gate.jsonl` (the prefix quality gate), as `{"text", "attribute"}` lines for
`hf-collapse train-prefixes`.

This script uses data OUTSIDE the repository (../shared/data; see ../shared/data/PROVENANCE.md):

* sentiment (positive / negative): Rotten Tomatoes polarity (`sentiment/rt_polarity/`). Every sentence that also
  occurs in SST-2's labelled held-out sentences (`sentiment/sst2_alps/test.tsv`, the GLUE SST-2 dev set, and
  `dev.tsv`) is removed by normalised match (lower case, letters and digits only), since SST is built from the same
  snippets; the gate set is `sst2_alps/test.tsv`.
* sentiment_plus: the sentiment training texts plus the SST-2 training phrases of at least ``--min_phrase_words``
  words (`sst2_alps/train.tsv`, GLUE SST-2 train without alps' dev split). A phrase is dropped if its normalised
  text occurs inside any sentiment held-out sentence (SST-2 test and dev, and the sentiment eval set), or duplicates
  a training text; the eval and gate sets are the sentiment task's, so the two variants compare directly.
* topic (world / sports / business / science): the Air-Decoding AG News 4 × 5k texts; gate: AG News test
  (`topic/agnews_alps/test.tsv`; the provenance notes report no overlap with the 4 × 5k, rechecked here).
* topic_plus: the topic training texts plus the 10,000 AG News descriptions of `topic/agnews_alps/dev.tsv`. The
  4 x 5k texts are title + description, the gate's texts description only; the converged topic prefixes classify
  in-format held-out texts at 0.845 but the gate's at 0.72, so these add the gate's format. A description is dropped
  if its normalised text occurs in AG News test (the gate), in the topic eval set, or among the kept texts; the eval
  and gate sets are the topic task's, so the two variants compare directly.
* detox (nontoxic / toxic): four fifths of `air_decoding/jigsaw_10k.json` (`transformer_judges.jigsaw_split`); the
  held-out fifth is the gate set and the toxicity judge's test set, never trained on.

5% of each task's training texts (seeded, per attribute) are set aside as `{task}_eval.jsonl`.

    python examples/air_decoding/prefix_data.py --out runs/prefix_data
    hf-collapse train-prefixes --model ~/.cache/hf_collapse/smollm2-135m --data runs/prefix_data/sentiment_train.jsonl \\
        --eval_data runs/prefix_data/sentiment_eval.jsonl --attributes positive negative \\
        --output_dir runs/prefixes/sentiment --num_train_epochs 5 --per_device_train_batch_size 8 \\
        --learning_rate 1e-2 --prefix_projection false --init_text "The movie" --max_length 64 \\
        --eval_strategy steps --eval_steps 200 --save_strategy steps --save_steps 200 --save_total_limit 3 \\
        --early_stopping_patience 3 --resume_from_checkpoint last --use_cpu \\
        --gate_data runs/prefix_data/sentiment_gate.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from transformer_judges import _ALPS_TOPIC, SHARED, TOPICS, _jsonl, _tsv, jigsaw_split, normalise  # noqa: E402


def sentiment() -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict]:
    rt = SHARED / "sentiment" / "rt_polarity"
    rows = [(line.strip(), attr) for attr, fn in (("positive", "rt-polarity.pos"), ("negative", "rt-polarity.neg"))
            for line in (rt / fn).read_text("utf-8", errors="replace").splitlines() if line.strip()]  # fmt: skip
    sst = SHARED / "sentiment" / "sst2_alps"
    test = _tsv(sst / "test.tsv", header=True)
    held = {normalise(r[0]) for r in test} | {normalise(r[0]) for r in _tsv(sst / "dev.tsv", header=True)}
    kept = [r for r in rows if normalise(r[0]) not in held]
    gate = [(r[0], "positive" if r[1] == "1" else "negative") for r in test]
    return kept, gate, {"source": len(rows), "removed_in_sst2_held_out": len(rows) - len(kept)}


def added_texts(
    rows: list[tuple[str, str]], held_out: list[str], already: list[str], inside: bool
) -> tuple[list[tuple[str, str]], int, int]:
    """``rows`` minus duplicates of ``already`` (or of each other) and minus held-out texts (normalised match; with
    ``inside``, a text contained in a held-out one counts too): (kept rows, held-out dropped, duplicates dropped)."""
    held = [normalise(t) for t in held_out]
    held_set = set(held)
    seen = {normalise(t) for t in already}
    kept, in_held, dup = [], 0, 0
    for text, attr in rows:
        n = normalise(text)
        if n in seen:
            dup += 1
        elif n in held_set or (inside and any(n in h for h in held)):
            in_held += 1
        else:
            seen.add(n)
            kept.append((text, attr))
    return kept, in_held, dup


def sst2_phrases(min_words: int, held_out: list[str], already: list[str]) -> tuple[list[tuple[str, str]], dict]:
    """SST-2 training phrases with >= ``min_words`` words, none inside a held-out sentence or equal to a kept text."""
    rows = _tsv(SHARED / "sentiment" / "sst2_alps" / "train.tsv", header=True)
    long = [(r[0].strip(), "positive" if r[1] == "1" else "negative") for r in rows if len(r[0].split()) >= min_words]
    kept, inside, dup = added_texts(long, held_out, already, inside=True)
    return kept, {"sst2_phrases": len(long), "inside_held_out": inside, "duplicates": dup, "added": len(kept)}


def topic() -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict]:
    rows = [(r["text"], TOPICS[r["label"]]) for t in TOPICS
            for r in _jsonl(SHARED / "air_decoding" / "decoded" / f"agnews_5k_{t}.jsonl")]  # fmt: skip
    gate = [(r[0], _ALPS_TOPIC[r[1]]) for r in _tsv(SHARED / "topic" / "agnews_alps" / "test.tsv", header=False)]
    held = {normalise(t) for t, _ in gate}
    kept = [r for r in rows if normalise(r[0]) not in held]
    return kept, gate, {"source": len(rows), "removed_in_ag_news_test": len(rows) - len(kept)}


def agnews_descriptions(held_out: list[str], already: list[str]) -> tuple[list[tuple[str, str]], dict]:
    """AG News descriptions from alps' dev split, none equal to a held-out text or to a kept text (normalised)."""
    rows = [(r[0].strip(), _ALPS_TOPIC[r[1]]) for r in _tsv(SHARED / "topic" / "agnews_alps" / "dev.tsv", header=False)]
    kept, in_held, dup = added_texts(rows, held_out, already, inside=False)
    return kept, {"agnews_dev": len(rows), "in_held_out": in_held, "duplicates": dup, "added": len(kept)}


def detox() -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict]:
    names = {0: "toxic", 1: "nontoxic"}
    train, held = jigsaw_split()
    gate = [(r["text"], names[r["label"]]) for r in held]
    held_norm = {normalise(t) for t, _ in gate}
    rows = [(r["text"], names[r["label"]]) for r in train]
    kept = [r for r in rows if normalise(r[0]) not in held_norm]  # exact duplicates across the split
    return kept, gate, {"source": len(rows), "removed_duplicates_of_held_out": len(rows) - len(kept)}


def write(path: Path, rows: list[tuple[str, str]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for text, attr in rows:
            f.write(json.dumps({"text": text, "attribute": attr}) + "\n")
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/prefix_data")
    p.add_argument("--eval_fraction", type=float, default=0.05)
    p.add_argument("--min_phrase_words", type=int, default=10, help="sentiment_plus: shortest SST-2 phrase kept")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for task, build in (("sentiment", sentiment), ("topic", topic), ("detox", detox)):
        rows, gate, info = build()
        rng = np.random.default_rng(0)
        eval_idx = set()
        for attr in sorted({r[1] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r[1] == attr]
            eval_idx.update(rng.choice(idx, int(len(idx) * a.eval_fraction), replace=False).tolist())
        train = [r for i, r in enumerate(rows) if i not in eval_idx]
        write(out / f"{task}_train.jsonl", [train[i] for i in rng.permutation(len(train))])
        write(out / f"{task}_eval.jsonl", [rows[i] for i in sorted(eval_idx)])
        write(out / f"{task}_gate.jsonl", gate)
        report[task] = {**info, "train": len(train), "eval": len(eval_idx), "gate": len(gate)}
        print(task, report[task], flush=True)
        # the "_plus" variant: more training text, the same eval and gate sets, so the two compare directly
        if task == "sentiment":
            held = [t for t, _ in gate] + [r[0] for r in _tsv(SHARED / "sentiment" / "sst2_alps" / "dev.tsv", True)]
            held += [rows[i][0] for i in eval_idx]
            extra, info = sst2_phrases(a.min_phrase_words, held, [t for t, _ in rows])
        elif task == "topic":
            held = [t for t, _ in gate] + [rows[i][0] for i in eval_idx]
            extra, info = agnews_descriptions(held, [t for t, _ in train])
        else:
            continue
        plus = train + extra
        write(out / f"{task}_plus_train.jsonl", [plus[i] for i in rng.permutation(len(plus))])
        write(out / f"{task}_plus_eval.jsonl", [rows[i] for i in sorted(eval_idx)])
        write(out / f"{task}_plus_gate.jsonl", gate)
        report[f"{task}_plus"] = {**info, "train": len(plus), "eval": len(eval_idx), "gate": len(gate)}
        print(f"{task}_plus", report[f"{task}_plus"], flush=True)
    (out / "prefix_data.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
