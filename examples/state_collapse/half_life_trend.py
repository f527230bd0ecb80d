"""How the recurrent state's memory grows during the emergent-collapse runs, read from their `half_lives.jsonl`
(`emergent_training.py` appends each head's half-life, measured on a fixed held-out text, at every checkpoint).

    python examples/state_collapse/half_life_trend.py --runs runs/emergent/t128_s0 [runs/emergent/t128_s1 ...]

Writes `emergent/half_life_trend.md` (per checkpoint: the longest half-life and how many heads remember a token for
longer than 1×, 4× and 16× the training length) and `emergent/half_life_trend.png`, and copies each run's
`half_lives.jsonl` beside them (runs/ is not committed). A head whose half-life is far above the training length
never had to forget within a training window: the paper's cause of state collapse.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--out", default=str(HERE / "emergent"))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| run | step | tokens | longest half-life (layer, head) | heads > 1× T | > 4× T | > 16× T |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    series = {}
    for run in map(Path, a.runs):
        train_length = json.loads((run / "run_args.json").read_text())["train_length"]
        records = [json.loads(x) for x in (run / "half_lives.jsonl").open() if x.strip()]
        if not records:
            raise SystemExit(f"{run / 'half_lives.jsonl'} is empty: the run has not reached its first checkpoint")
        shutil.copyfile(run / "half_lives.jsonl", out / f"{run.name}_half_lives.jsonl")
        pts = []
        for r in records:
            flat = [(h, li, hi) for li, layer in enumerate(r["half_lives"]) for hi, h in enumerate(layer)]
            longest = max(flat)
            counts = [sum(h > k * train_length for h, _, _ in flat) for k in (1, 4, 16)]
            lines.append(f"| {run.name} | {r['step']} | {r['tokens'] / 1e6:.1f}M | {longest[0]:.0f} ({longest[1]}, "
                         f"{longest[2]}) | {counts[0]} | {counts[1]} | {counts[2]} |")  # fmt: skip
            pts.append((r["tokens"], longest[0], counts))
        series[f"{run.name} (T={train_length})"] = pts
    (out / "half_life_trend.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, pts in series.items():
        xs = [t / 1e6 for t, _, _ in pts]
        axes[0].plot(xs, [h for _, h, _ in pts], "o-", label=name)
        axes[1].plot(xs, [c[1] for _, _, c in pts], "o-", label=name)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("longest per-head half-life (tokens)")
    axes[1].set_ylabel("heads with half-life > 4× training length")
    for ax in axes:
        ax.set_xlabel("training tokens (M)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "half_life_trend.png", dpi=110)


if __name__ == "__main__":
    main()
