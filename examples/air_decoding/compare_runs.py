"""Two prefix runs of one task, paired over prompts: accuracy difference and median-perplexity ratio at each λ both
generated, with 95% intervals from a bootstrap over prompts (the runs share prompts, seeds and plain sampling).

    python examples/air_decoding/compare_runs.py sentiment sentiment_plus   # -> protocol_compare_sentiment_vs_sentiment_plus.md

Reads only the committed per-text scores (`protocol_scores_<run>.jsonl`, written by `run_experiment.py report`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def load_scores(run: str, folder: Path = HERE) -> dict[tuple[str, float], dict[str, list[tuple[float, bool, str]]]]:
    """Per (method, λ), per prompt: (perplexity, judged as the target, target) of each text in
    ``folder/protocol_scores_<run>.jsonl``."""
    out: dict[tuple[str, float], dict[str, list[tuple[float, bool, str]]]] = {}
    for line in (folder / f"protocol_scores_{run}.jsonl").open():
        r = json.loads(line)
        hit = max(r["judge"], key=r["judge"].get) == r["target"]
        out.setdefault((r["method"], r["strength"]), {}).setdefault(r["prompt"], []).append(
            (r["perplexity"], hit, r["target"])
        )
    return out


def paired_stats(pair, sample: list[str], target: str | None) -> tuple[float, float, float, float]:
    """Accuracy of each run, their difference and the ratio of median perplexities over ``sample``'s texts."""
    rows_b = [v for q in sample for v in pair[0][q] if target in (None, v[2])]
    rows_o = [v for q in sample for v in pair[1][q] if target in (None, v[2])]
    acc_b, acc_o = float(np.mean([v[1] for v in rows_b])), float(np.mean([v[1] for v in rows_o]))
    ratio = float(np.median([v[0] for v in rows_o]) / np.median([v[0] for v in rows_b]))
    return acc_b, acc_o, acc_o - acc_b, ratio


def interval(point: float, boot: list[float], fmt: str) -> str:
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return f"{fmt.format(point)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base")
    p.add_argument("other")
    p.add_argument("--reps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    base, other = load_scores(a.base), load_scores(a.other)
    keys = sorted(k for k in set(base) & set(other) if k[0] != "plain" and not k[0].startswith("official"))
    if not keys:
        raise SystemExit(f"{a.base} and {a.other} share no (method, λ) block besides plain sampling")
    rng = np.random.default_rng(a.seed)
    all_targets = sorted({t for q in base[keys[0]] for _, _, t in base[keys[0]][q]})
    lines = [f"Paired over prompts ({a.reps} bootstrap resamples): `{a.other}` minus / over `{a.base}`, same prompts and "
             "seeds. Accuracy under the task's judge; perplexity under the base LM without prefix.", "",
             f"| method | λ | acc. {a.base} | acc. {a.other} | difference [95% CI] | "
             + " | ".join(f"{t} diff." for t in all_targets) + " | median PPL ratio [95% CI] |",
             "|---|---|---|---|---|" + "---|" * len(all_targets) + "---|"]  # fmt: skip
    for key in keys:
        prompts = sorted(set(base[key]) & set(other[key]))
        pair = (base[key], other[key])
        boots = {t: [] for t in (None, *all_targets)}
        for _ in range(a.reps):
            sample = [prompts[i] for i in rng.integers(0, len(prompts), len(prompts))]
            for t in boots:
                boots[t].append(paired_stats(pair, sample, t))
        point = {t: paired_stats(pair, prompts, t) for t in boots}
        acc_b, acc_o, _, _ = point[None]
        per = [interval(point[t][2], [b[2] for b in boots[t]], "{:+.3f}") for t in all_targets]
        lines.append(f"| {key[0]} | {key[1]:g} | {acc_b:.3f} | {acc_o:.3f} | "
                     f"{interval(point[None][2], [b[2] for b in boots[None]], '{:+.3f}')} | {' | '.join(per)} | "
                     f"{interval(point[None][3], [b[3] for b in boots[None]], '{:.2f}×')} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    (HERE / f"protocol_compare_{a.base}_vs_{a.other}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
