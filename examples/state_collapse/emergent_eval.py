"""Evaluate the emergent-collapse runs of `emergent_training.py`: loss past the training length against each model's
own in-window loss, with 95% intervals, the state norms per head, and each training-free mitigation.

This script uses data OUTSIDE the repository: the held-out part of ``../shared/data/corpus`` defined in
`emergent_training.load_corpus` (never trained on).

    python examples/state_collapse/emergent_eval.py --runs runs/emergent/t128_s0 runs/emergent/t128_s1 \\
        runs/emergent/t128_dtmin runs/emergent/t1024_s0 --length 65536 --sequences 8 \\
        --out examples/state_collapse/emergent

Per run (its `model/` folder and `run_args.json`):
* the evaluation sequences: `--sequences` consecutive, non-overlapping `--length`-byte pieces of the held-out text
  (documents concatenated), streamed as one batch through the cache;
* the same tokens with the state reset every T_train tokens (the model's own in-window regime): per bucket of
  positions, the paired difference streamed − reset, averaged over sequences, with a t-interval;
* the in-window baseline over `--windows` random held-out windows of T_train bytes;
* mitigations, each calibrated on training-text windows of length T_train only: `state_norm_max` (caps,
  `calibrate_state_norms`), per-head `decay_scale` (`calibrate_decay_scales`), and `sliding_window` = T_train.

The imposed-heads models of `run_experiment.py` (which trains on the speeches only and never sees Brown) are
evaluated the same way, calibrated on their own training text:

    python examples/state_collapse/run_experiment.py --seed 0 --out runs/imposed/s0   # and --seed 1
    python examples/state_collapse/emergent_eval.py --runs runs/imposed/s0 runs/imposed/s1 --length 16384 \
        --sequences 8 --calibrate_on speeches --out examples/state_collapse/imposed

Writes `<out>/emergent_eval_<run>.json` per run (`--reuse` skips a run already evaluated with the same settings),
and for all `--runs` together `emergent_eval.json`, `emergent_eval.md`, `emergent_loss.png` and
`emergent_state_norms.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

RANGES = [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64)]  # in multiples of 1024 positions


def t_interval(values: list[float]) -> tuple[float, float]:
    from scipy import stats

    m = statistics.mean(values)
    if len(values) < 2:
        return m, float("nan")
    return m, stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


@torch.no_grad()
def per_token_loss(model, ids: torch.Tensor, reset_every: int | None, step: int = 1024):
    """Loss of every prediction `(batch, T−1)` (index p: the token at position p+1), and the state norm per (layer,
    head) after each piece `[(position, (layers, heads) norms averaged over the batch)]`. With `reset_every` the state
    starts from zero every that many tokens, and the first token after a reset (no prediction) is NaN."""
    from hf_collapse.evals.common import recurrent_states, state_statistics

    losses, norms, cache, prev, start = [], [], None, None, 0
    while start < ids.shape[1]:
        end = min(ids.shape[1], start + step)
        if reset_every is not None:
            if start % reset_every == 0:
                cache, prev = None, None
            end = min(end, (start // reset_every + 1) * reset_every)
        out = model(ids[:, start:end], cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits.float()
        if prev is None:
            if start > 0:
                losses.append(torch.full((ids.shape[0], 1), float("nan"), device=ids.device))
            preds, targets = logits[:, :-1], ids[:, start + 1 : end]
        else:
            preds, targets = torch.cat([prev, logits[:, :-1]], 1), ids[:, start:end]
        losses.append(F.cross_entropy(preds.transpose(1, 2), targets, reduction="none"))
        prev = logits[:, -1:]
        states = recurrent_states(cache)
        if states is not None and reset_every is None:
            norms.append((end, state_statistics(states)["norm"]))
        start = end
    return torch.cat(losses, 1), norms


def bucket_table(stream: torch.Tensor, reset: torch.Tensor) -> list[dict]:
    rows = []
    for lo, hi in RANGES:
        a, b = lo * 1024, min(hi * 1024, stream.shape[1])
        if a >= b:
            break
        s, r = stream[:, a:b], reset[:, a:b]
        ok = ~torch.isnan(r)
        per_seq = [float(s[i][ok[i]].mean() - r[i][ok[i]].mean()) for i in range(stream.shape[0])]
        m, h = t_interval(per_seq)
        # the absolute streamed loss, so that models trained at different lengths compare on the same tokens
        stream_per_seq = s.mean(1).tolist()
        sm, sh = t_interval(stream_per_seq)
        rows.append({"positions": f"{lo}K-{hi}K", "stream": sm, "stream_ci": sh, "reset": float(r[ok].mean()),
                     "diff": m, "diff_ci": h, "stream_per_seq": stream_per_seq})  # fmt: skip
    return rows


def table(variants: dict, title: list[str], cell, names) -> list[str]:
    """Markdown lines: ``title``, then one row per variant in ``names`` with ``cell(bucket)`` per position range."""
    positions = [b["positions"] for b in variants["none"]["buckets"]]
    rows = [f"| {n} | " + " | ".join(cell(b) for b in variants[n]["buckets"]) + " |" for n in names]
    return [*title, "| mitigation | " + " | ".join(positions) + " |", "|---|" + "---|" * len(positions), *rows]


def add_paired_vs_none(variants: dict) -> None:
    """Per mitigation and bucket: mitigated minus unmitigated streamed loss, paired over the same sequences."""
    none = variants["none"]["buckets"]
    for name, v in variants.items():
        if name == "none":
            continue
        for b, b0 in zip(v["buckets"], none):
            paired = [x - y for x, y in zip(b["stream_per_seq"], b0["stream_per_seq"])]
            b["vs_none"], b["vs_none_ci"] = t_interval(paired)


def paired_across_runs(results: dict, reference: str) -> dict[str, list[tuple[float, float]]]:
    """Per (run, mitigation) and bucket: its streamed loss minus the reference run's unmitigated streamed loss, paired
    over sequences (every run streams the same held-out sequences). For models trained differently on the same
    tokens, e.g. a model trained on short windows with a mitigation against the control trained on longer ones."""
    ref = results[reference]["variants"]["none"]["buckets"]
    out = {}
    for run, res in results.items():
        if not all("stream_per_seq" in b for v in res["variants"].values() for b in v["buckets"]):
            print(f"{run}: its result file predates per-sequence losses; left out of the comparison across runs")
            continue
        for name, v in res["variants"].items():
            if run == reference and name == "none":
                continue
            out[f"{run}, {name}"] = [t_interval([x - y for x, y in zip(b["stream_per_seq"], b0["stream_per_seq"])])
                                     for b, b0 in zip(v["buckets"], ref)]  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--out", default=str(HERE / "emergent"))
    p.add_argument("--length", type=int, default=65536)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--windows", type=int, default=256)
    p.add_argument("--calibration_windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse", action="store_true",
                   help="reuse <out>/emergent_eval_<run>.json of a run evaluated with the same settings")
    p.add_argument("--calibrate_on", choices=["corpus", "speeches"], default="corpus",
                   help="training text the calibration windows come from: this experiment's training corpus, or "
                        "only the speeches (for run_experiment.py's imposed-heads models, which never saw the rest)")
    p.add_argument("--data_dir", default=None, help="the corpus folder (default: ../shared/data/corpus)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="evaluated in fp32 there (TF32 off), so that CPU and GPU results compare")
    p.add_argument("--compare_to", default=None, metavar="RUN",
                   help="name of one of --runs (e.g. t1024_dtmin, the longer-trained control): adds every run's "
                   "streamed loss minus this run's unmitigated streamed loss, paired over the same sequences")  # fmt: skip
    a = p.parse_args()
    if a.compare_to is not None and a.compare_to not in [Path(r).name for r in a.runs]:
        raise SystemExit(f"--compare_to {a.compare_to!r} is not one of the --runs ({[Path(r).name for r in a.runs]})")
    torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(a.device)

    from emergent_training import DATA, load_corpus

    from hf_collapse import RobustMamba2ForCausalLM, calibrate_decay_scales, calibrate_state_norms

    data_dir = Path(a.data_dir) if a.data_dir else DATA
    train_bytes, held_bytes = load_corpus(data_dir)
    if a.calibrate_on == "speeches":
        from run_experiment import load_speeches

        train_bytes = b"\n\n".join(load_speeches(data_dir)[0])
    need = a.length * a.sequences
    if len(held_bytes) < need:
        raise SystemExit(f"held-out text has {len(held_bytes)} bytes, {need} needed; lower --length or --sequences")
    held = torch.from_numpy(np.frombuffer(held_bytes, dtype=np.uint8).astype(np.int64))
    seqs = held[:need].view(a.sequences, a.length).to(device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    settings = {k: getattr(a, k) for k in ("length", "sequences", "windows", "calibration_windows", "calibrate_on")}
    for run in map(Path, a.runs):
        # one file per run, so that adding a run does not re-evaluate the others (about an hour each on one thread)
        cached = out / f"emergent_eval_{run.name}.json"
        if a.reuse and cached.is_file():
            res = json.loads(cached.read_text())
            if res.get("settings") == settings:
                print(run.name, "reused from", cached, flush=True)
                results[run.name] = res
                continue
            print(run.name, f"{cached} has other settings ({res.get('settings')}): evaluating again", flush=True)
        if not (run / "run_args.json").is_file():
            raise SystemExit(f"{run}: no run_args.json, and no reusable {cached} (--reuse, same settings): restore "
                             "the run (finished models: examples/state_collapse/emergent/models/) or leave it out of --runs")
        args = json.loads((run / "run_args.json").read_text())
        T = args["train_length"]
        rng = np.random.default_rng(0)
        train_ids = torch.from_numpy(np.frombuffer(train_bytes, dtype=np.uint8).astype(np.int64))
        calib = torch.stack([train_ids[s : s + T] for s in rng.integers(0, len(train_ids) - T, a.calibration_windows)])
        windows = torch.stack([held[s : s + T] for s in rng.integers(0, len(held) - T, a.windows)])
        calib, windows = calib.to(device), windows.to(device)
        variants = {"none": {}}
        base = RobustMamba2ForCausalLM.from_pretrained(run / "model").to(device).eval()
        variants["state_norm_max"] = {"state_norm_max": calibrate_state_norms(base, calib, every=16),
                                      "state_norm_every": 16}  # fmt: skip
        variants["decay_scale"] = {"decay_scale": calibrate_decay_scales(base, calib)}
        variants["sliding_window"] = {"sliding_window": T}
        res = {"train_length": T, "settings": settings, "variants": {}}
        with torch.no_grad():
            logits = base(windows).logits.float()
        per_window = F.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none").mean(1)
        res["in_window_loss"], res["in_window_ci"] = t_interval(per_window.tolist())
        reset, _ = per_token_loss(base, seqs, reset_every=T)
        for name, fields in variants.items():
            model = RobustMamba2ForCausalLM.from_pretrained(run / "model", **fields).to(device).eval()
            stream, norms = per_token_loss(model, seqs, reset_every=None)
            res["variants"][name] = {"fields": fields if name != "state_norm_max" else "calibrated",
                                     "buckets": bucket_table(stream, reset), "state_norms": norms}  # fmt: skip
            print(run.name, name, [(b["positions"], round(b["diff"], 3)) for b in res["variants"][name]["buckets"]],
                  flush=True)  # fmt: skip
        add_paired_vs_none(res["variants"])
        tmp = cached.with_name(cached.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        tmp.replace(cached)
        results[run.name] = res
    across = paired_across_runs(results, a.compare_to) if a.compare_to else None
    payload = dict(results, **({"paired_across_runs": across} if across else {}))
    (out / "emergent_eval.json").write_text(json.dumps(payload, indent=2))
    lines = []
    for run, res in results.items():
        variants = res["variants"]
        heading = (f"### {run} (T_train = {res['train_length']}; in-window loss over {a.windows} held-out windows: "
                   f"{res['in_window_loss']:.3f} ± {res['in_window_ci']:.3f} nats/byte)")
        lines += table(variants, [heading, ""], lambda b: f"{b['diff']:+.3f} ± {b['diff_ci']:.3f}", variants)
        absolute = "Absolute streamed loss (nats/byte; mean over sequences ± 95% t-interval):"
        lines += table(variants, ["", absolute, ""], lambda b: f"{b['stream']:.3f} ± {b['stream_ci']:.3f}", variants)
        mitigations = [n for n in variants if n != "none"]
        if all("vs_none" in b for n in mitigations for b in variants[n]["buckets"]):  # not in older result files
            paired = ("Mitigated minus unmitigated streamed loss (nats/byte; paired over the same sequences, "
                      "± 95% t-interval):")
            lines += table(variants, ["", paired, ""], lambda b: f"{b['vs_none']:+.4f} ± {b['vs_none_ci']:.4f}",
                           mitigations)  # fmt: skip
        lines.append("")
    if across:
        positions = [b["positions"] for b in results[a.compare_to]["variants"]["none"]["buckets"]]
        lines += [f"### Across runs: streamed loss minus {a.compare_to}'s unmitigated streamed loss on the same "
                  "sequences (nats/byte, paired over sequences, ± 95% t-interval)", "",
                  "| run, mitigation | " + " | ".join(positions) + " |", "|---|" + "---|" * len(positions)]  # fmt: skip
        lines += [f"| {row} | " + " | ".join(f"{m:+.4f} ± {h:.4f}" for m, h in cells) + " |" for row, cells in across.items()]
        lines.append("")
    text = "Streamed loss minus the same tokens' loss with the state reset every T_train (nats/byte; mean over "
    text += f"{a.sequences} held-out sequences ± 95% t-interval)\n\n" + "\n".join(lines)
    (out / "emergent_eval.md").write_text(text)
    plot(results, out)
    print(text)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one y scale for every run: the panels are read side by side
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False, sharey=True)
    for ax, (run, res) in zip(axes[0], results.items()):
        for name, v in res["variants"].items():
            x = list(range(len(v["buckets"])))
            m = [b["diff"] for b in v["buckets"]]
            h = [0.0 if math.isnan(b["diff_ci"]) else b["diff_ci"] for b in v["buckets"]]
            ax.errorbar(x, m, yerr=h, capsize=3, marker="o", label=name)
            ax.set_xticks(x, [b["positions"] for b in v["buckets"]], rotation=45)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_title(f"{run} (T_train {res['train_length']})")
        ax.set_ylabel("streamed − reset loss (nats/byte)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "emergent_loss.png", dpi=110)
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, (run, res) in zip(axes[0], results.items()):
        norms = res["variants"]["none"]["state_norms"]
        pos = [n[0] for n in norms]
        for layer in range(len(norms[0][1])):
            for head in range(len(norms[0][1][layer])):
                ax.plot(pos, [n[1][layer][head] for n in norms], lw=0.7)
        ax.axvline(res["train_length"], color="gray", ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{run}: state norm per (layer, head), no mitigation")
        ax.set_xlabel("position")
    fig.tight_layout()
    fig.savefig(out / "emergent_state_norms.png", dpi=110)


if __name__ == "__main__":
    main()
