"""Attribute collapse on a real LM, with the Air-Decoding paper's protocol: Air-Decoding vs weighted decoding on
SmolLM2-135M, sentiment, topic and detoxification, judged by transformer classifiers, with the official GPT2-medium
outputs as reference lines.

This script uses data OUTSIDE the repository (``../shared/data``; override with ``--data`` or ``HF_COLLAPSE_DATA``):
prompts and official outputs from ``air_decoding/``, and what ``prefix_data.py`` and ``transformer_judges.py`` read.
Stages (each resumable; run in order)::

    python examples/air_decoding/prepare_smollm2.py                    # SmolLM2-135M safetensors, once
    python examples/air_decoding/run_experiment.py data                # prefix_data.py -> runs/prefix_data
    python examples/air_decoding/run_experiment.py train    --task sentiment   # to convergence, resumable
    python examples/air_decoding/run_experiment.py gate     --task sentiment   # implied classifier, held-out sets
    python examples/air_decoding/run_experiment.py judge    --task sentiment   # transformer_judges.py
    python examples/air_decoding/run_experiment.py generate --task sentiment   # the sweep, fused path
    python examples/air_decoding/run_experiment.py report   --task sentiment   # tables + collapse plot

Protocol (item 5 of issue 10): the paper's prompts (15 sentiment, 20 topic, 203 detoxification), 50 new tokens,
``do_sample=True, top_k=200``, ``--samples`` (default 10) per prompt and target, the same seed for every method and
strength. Sweep: λ ∈ {10, 40, 60, 100, 140, 250, 500} for Air-Decoding and {10, 40, 140, 500} for weighted decoding
(sentiment, topic); detox: plain and Air-Decoding at λ = 120 (the official strength) toward ``nontoxic``.
Reported per (method, λ): accuracy per target under the transformer judge with a 95% interval (bootstrap over
prompts, which keeps a prompt's samples together), perplexity of the continuation under the base LM without prefix
(mean, median), Dist-1/2/3; detox: the average over prompts of the maximum toxicity probability of its samples and
the fraction of prompts with any continuation judged toxic (p > 0.5). The official outputs are scored by the same
judges and the same perplexity model.

Outputs: prefixes, judges and runs under ``runs/`` (not committed); the loss curve
(``protocol_prefixes_<task>.json``), generations (``protocol_generations_<task>.jsonl``), tables
(``protocol_results_<task>.md``/``.json``) and plots (``protocol_collapse_<task>.png``) in this folder. (The files
without the ``protocol_`` prefix are the earlier, smaller run of commit 608ccf9's version of this script.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = Path(os.environ.get("HF_COLLAPSE_DATA", REPO.parent / "shared" / "data"))
LM_DIR = Path(os.environ.get("HF_COLLAPSE_CACHE", Path.home() / ".cache" / "hf_collapse")) / "smollm2-135m"
RUNS = REPO / "runs"
OUT = HERE  # where tables, plots and generations go (--results_dir)
START = "<|endoftext|>"  # SmolLM2's document separator: the conditioning the prefixes train with

TASKS = {
    "sentiment": {"attributes": ["positive", "negative"], "targets": ["positive", "negative"],
                  "prompts": "prompt_sent.jsonl", "judge": "sentiment",
                  "official": ("Air_sentiment_140.0.jsonl", "sentiment", 140.0),
                  "air": [10, 40, 60, 100, 140, 250, 500], "weighted": [10, 40, 140, 500], "init_text": "The movie"},
    "topic": {"attributes": ["world", "sports", "business", "science"],
              "targets": ["world", "sports", "business", "science"], "prompts": "prompt_topic.jsonl",
              "judge": "topic", "official": ("Air_topic_60.0.jsonl", "topic", 60.0),
              "air": [10, 40, 60, 100, 140, 250, 500], "weighted": [10, 40, 140, 500], "init_text": "The news"},
    "detox": {"attributes": ["nontoxic", "toxic"], "targets": ["nontoxic"], "prompts": "prompt_detoxification.jsonl",
              "judge": "toxicity", "official": ("Air_detoxification_120.0.jsonl", None, 120.0),
              "air": [120], "weighted": [], "init_text": "The comment"},
}  # fmt: skip
# the sentiment task with SST-2 training phrases added (prefix_data.py): same prompts, judge and held-out sets
TASKS["sentiment_plus"] = dict(TASKS["sentiment"])
# the topic task with AG News descriptions added (prefix_data.py): the gate's text format; same prompts, judge, sets
TASKS["topic_plus"] = dict(TASKS["topic"])


def run_name(task: str, a) -> str:
    """``<task>`` or ``<task>_<variant>``: the prefixes folder under runs/prefixes and the results' file names."""
    return f"{task}_{a.variant}" if a.variant else task


def load_prompts(task: str, data: Path) -> list[str]:
    return [json.loads(x)["prompt"] for x in (data / "air_decoding" / TASKS[task]["prompts"]).open() if x.strip()]


def load_lm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (LM_DIR / "model.safetensors").is_file():
        raise SystemExit(f"{LM_DIR} missing: run examples/air_decoding/prepare_smollm2.py first")
    return AutoModelForCausalLM.from_pretrained(LM_DIR).eval(), AutoTokenizer.from_pretrained(LM_DIR)


# ------------------------------------------------------------------------------------------------ stages
def stage_train(task: str, a) -> None:
    """Prefixes to convergence: early stopping on the held-out loss, resumable, gate on the held-out set."""
    from hf_collapse.scripts.train_prefixes import main as train_prefixes

    data = RUNS / "prefix_data"
    if not (data / f"{task}_train.jsonl").exists():
        raise SystemExit(f"{data / f'{task}_train.jsonl'} missing: run the 'data' stage first")
    out = RUNS / "prefixes" / run_name(task, a)
    extra = ["--discriminative_weight", str(a.discriminative_weight)]
    if a.init_prefixes:
        extra += ["--init_prefixes", str(RUNS / "prefixes" / a.init_prefixes)]
    rc = train_prefixes([
        "--model", str(LM_DIR), "--data", str(data / f"{task}_train.jsonl"),
        "--eval_data", str(data / f"{task}_eval.jsonl"), "--gate_data", str(data / f"{task}_gate.jsonl"),
        "--gate_min", "0", "--attributes", *TASKS[task]["attributes"], "--output_dir", str(out),
        "--num_virtual_tokens", "20", "--prefix_projection", "false", "--init_text", TASKS[task]["init_text"],
        "--start_token", START, "--max_length", "64", "--num_train_epochs", str(a.epochs),
        "--per_device_train_batch_size", "16", "--learning_rate", str(a.lr), "--lr_scheduler_type", "constant",
        "--warmup_steps", "0.02", "--weight_decay", "0.0", "--logging_steps", "20", "--eval_strategy", "steps",
        "--eval_steps", str(a.eval_steps), "--save_strategy", "steps", "--save_steps", str(a.eval_steps),
        "--save_total_limit", "2", "--early_stopping_patience", "3", "--early_stopping_min_epochs", "1",
        "--early_stopping_threshold", str(a.early_stopping_threshold),
        "--resume_from_checkpoint", "last",
        "--use_cpu", str(not torch.cuda.is_available()).lower(), "--seed", "0", "--disable_tqdm", "true",
        "--max_steps", str(a.max_steps), *extra,
    ])  # fmt: skip
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(out))
    history = json.loads((Path(last) / "trainer_state.json").read_text())["log_history"] if last else []
    curve = [{k: r[k] for k in ("step", "loss", "eval_loss", "epoch") if k in r} for r in history]
    gate_file = out / "prefix_gate.json"  # written by train-prefixes after the gate
    gate = json.loads(gate_file.read_text()) if gate_file.is_file() else None
    settings = {"discriminative_weight": a.discriminative_weight, "init_prefixes": a.init_prefixes, "lr": a.lr}
    (OUT / f"protocol_prefixes_{run_name(task, a)}.json").write_text(json.dumps(
        {"task": task, "variant": a.variant, "settings": settings, "exit_code": rc, "gate": gate, "curve": curve},
        indent=2))  # fmt: skip


@torch.no_grad()
def stage_gate(task: str, a) -> None:
    """The implied classifier of a set of prefixes (a finished run or any checkpoint folder, ``--prefixes``) on the
    held-out loss set and on the gate set: accuracy (per attribute), its cross-entropy, and the next-token loss under
    each text's own prefix. For comparing prefix variants, and checkpoints of a stopped run, the same way."""
    from hf_collapse.evals.prefix_gate import prefix_log_likelihoods
    from hf_collapse.processors.attribute_prefix_model import AttributePrefixModel

    model, tok = load_lm()
    folder = Path(a.prefixes) if a.prefixes else RUNS / "prefixes" / run_name(task, a)
    am = AttributePrefixModel.from_pretrained(model, folder, tokenizer=tok)
    result = {"prefixes": str(folder)}
    for split in ("eval", "gate"):
        rows = [json.loads(x) for x in (RUNS / "prefix_data" / f"{task}_{split}.jsonl").open()]
        if a.gate_sample and a.gate_sample < len(rows):  # a preview: the same share of every attribute, seeded
            rng = random.Random(a.seed)
            by_attr = {}
            for r in rows:
                by_attr.setdefault(r["attribute"], []).append(r)
            rows = [r for group in by_attr.values()
                    for r in rng.sample(group, round(a.gate_sample * len(group) / len(rows)))]  # fmt: skip
        texts = [r["text"] for r in rows]
        ll = prefix_log_likelihoods(am, tok, texts, max_length=63)  # (K, N); 63 text tokens, as trained
        # + 1 per text: the start token's prediction of the first token
        tokens = sum(min(len(tok(t, add_special_tokens=False)["input_ids"]), 63) + 1 for t in texts)
        y = torch.tensor([am.attributes.index(r["attribute"]) for r in rows])
        hit = (ll.argmax(0) == y).float()
        result[split] = {"n": len(rows), "accuracy": float(hit.mean()),
                         "per_attribute": {k: float(hit[y == i].mean()) for i, k in enumerate(am.attributes)},
                         "cross_entropy": float(torch.nn.functional.cross_entropy(ll.T, y)),
                         "token_nll": float(-ll[y, torch.arange(len(rows))].sum() / tokens)}  # fmt: skip
        print(split, result[split], flush=True)
    name = run_name(task, a) + (f"_{folder.name}" if a.prefixes else "")
    name += f"_n{a.gate_sample}" if a.gate_sample else ""
    (OUT / f"protocol_gate_{name}.json").write_text(json.dumps(result, indent=2) + "\n")


def stage_judge(task: str, a) -> None:
    cmd = [sys.executable, str(HERE / "transformer_judges.py"), "--task", TASKS[task]["judge"],
           "--out", str(RUNS / "judges"), "--threads", str(a.threads), "--resume"]  # fmt: skip
    subprocess.run(cmd, check=True)


def stage_generate(task: str, data: Path, a) -> None:
    from hf_collapse import AirDecodingForCausalLM
    from hf_collapse.processors.air_decoding import AirDecodingLogitsProcessor, WeightedDecodingLogitsProcessor

    model, tok = load_lm()
    tok.padding_side = "left"
    fused = AirDecodingForCausalLM.from_base(model, RUNS / "prefixes" / run_name(task, a), tokenizer=tok)
    prompts = load_prompts(task, data)[: a.max_prompts]
    spec = TASKS[task]
    # --strengths: Air-Decoding at exactly these λ (in the sweep or not), weighted decoding at those of its sweep
    air = spec["air"] if a.strengths is None else a.strengths
    weighted = [x for x in spec["weighted"] if a.strengths is None or x in a.strengths]
    grid = [("plain", 0.0)] + [("air", float(x)) for x in air] + [("weighted", float(x)) for x in weighted]
    out_path = OUT / f"protocol_generations_{run_name(task, a)}.jsonl"
    done = set()
    if out_path.exists():
        done = {(r["method"], r["strength"], r["target"]) for r in map(json.loads, out_path.open())}
    # prompts go through generate() in chunks: the 203 detox prompts x 10 samples x (1 + 2 prefix rows) at once would
    # need a ~28 GB cache
    chunks = [prompts[i : i + a.prompt_batch] for i in range(0, len(prompts), a.prompt_batch)]
    encoded = [tok(c, return_tensors="pt", padding=True) for c in chunks]
    plain_rows = None  # plain sampling ignores the target: with the same seed every target gets the same texts
    if out_path.exists():
        plain_rows = [r for r in map(json.loads, out_path.open()) if r["method"] == "plain"] or None
    for method, lam in grid:
        for target in spec["targets"]:
            if (method, lam, target) in done:
                continue
            if method == "plain" and plain_rows:
                first = plain_rows[0]["target"]
                rows = [{**r, "target": target} for r in plain_rows if r["target"] == first]
                with out_path.open("a") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in rows))
                print(f"plain target={target}: the {len(rows)} texts of target={first} (same seed)", flush=True)
                continue
            torch.manual_seed(a.seed)  # the same seed for every method, strength and target
            kw = dict(do_sample=True, top_k=200, top_p=1.0, temperature=1.0, max_new_tokens=a.length,
                      min_new_tokens=a.length, num_return_sequences=a.samples, pad_token_id=tok.pad_token_id)  # fmt: skip
            t0 = time.time()
            rows = []
            for chunk, enc in zip(chunks, encoded):
                with torch.no_grad():
                    if method == "plain":
                        seqs = model.generate(**enc, **kw)
                    else:
                        cls = AirDecodingLogitsProcessor if method == "air" else WeightedDecodingLogitsProcessor
                        seqs = fused.generate(**enc, logits_processor=[cls(fused, target, lam)], **kw)
                rows += [{"method": method, "strength": lam, "target": target, "seed": a.seed,
                          "prompt": chunk[i // a.samples],
                          "continuation": tok.decode(s[enc["input_ids"].shape[1]:], skip_special_tokens=True)}
                         for i, s in enumerate(seqs)]  # fmt: skip
            with out_path.open("a") as f:  # one (method, λ, target) block at a time: a stop loses at most one
                f.write("".join(json.dumps(r) + "\n" for r in rows))
            if method == "plain":
                plain_rows = rows
            print(f"{method} λ={lam:g} target={target}: {len(rows)} texts in {time.time() - t0:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------------ report
def official_rows(task: str, data: Path, prompts: list[str]) -> list[dict]:
    name, key, lam = TASKS[task]["official"]
    rows = [json.loads(x) for x in (data / "air_decoding" / "official_outputs" / name).open() if x.strip()]
    out = []
    for r in rows:
        if key is None:  # detox: {"prompt", "text": {"0".."19": continuation}}
            out += [{"method": "official GPT2-medium", "strength": lam, "target": "nontoxic", "prompt": r["prompt"],
                     "continuation": c} for c in r["text"].values()]  # fmt: skip
            continue
        prompt = max((p for p in prompts if r["text"].startswith(p)), key=len, default="")
        out.append({"method": "official GPT2-medium", "strength": lam, "target": r[key].lower(), "prompt": prompt,
                    "continuation": r["text"][len(prompt):]})  # fmt: skip
    return out


def load_judge(path: Path):
    """The fine-tuned transformer classifier (`transformer_judges.py`) and its recorded held-out result."""
    from hf_collapse.evals.sentiment_judge import SequenceClassifierJudge

    if not (path / "judge_result.json").exists():
        raise SystemExit(f"no judge in {path}: run the 'judge' stage first")
    return SequenceClassifierJudge.from_pretrained(path), json.loads((path / "judge_result.json").read_text())


def bootstrap_ci(hits: dict[str, list[float]], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of all values and a 95% interval from resampling prompts (a prompt's samples stay together)."""
    keys = list(hits)
    rng = np.random.default_rng(seed)
    sums = np.array([sum(hits[k]) for k in keys])
    counts = np.array([len(hits[k]) for k in keys])
    draws = rng.integers(0, len(keys), size=(reps, len(keys)))
    stats = sums[draws].sum(1) / counts[draws].sum(1)
    return sums.sum() / counts.sum(), float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))


def bootstrap_median_ci(values: dict[str, list[float]], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the median of all values, resampling prompts (a prompt's texts stay together)."""
    groups = list(values.values())
    rng = np.random.default_rng(seed)
    meds = [float(np.median(np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])))
            for _ in range(reps)]  # fmt: skip
    return float(np.quantile(meds, 0.025)), float(np.quantile(meds, 0.975))


def stage_collapse(task: str, a, reps: int = 2000) -> dict:
    """The attribute-collapse comparison from the per-text scores (no model runs): weighted decoding at its most
    accurate λ against Air-Decoding at the smallest λ that is at least as accurate, paired over prompts (the same
    prompts and seeds): a bootstrap over prompts of the ratio of median perplexities and of the accuracy difference.
    ``equal_perplexity``: every weighted λ against the Air-Decoding λ of nearest median perplexity, the same way.
    """
    name = run_name(task, a)
    table = {(r["method"], r["strength"]): r for r in json.loads((OUT / f"protocol_results_{name}.json").read_text())["rows"]}
    weighted = [r for (m, _), r in table.items() if m == "weighted"]
    air = sorted((r for (m, _), r in table.items() if m == "air"), key=lambda r: r["strength"])
    if not weighted or not air:
        raise SystemExit(f"protocol_results_{name}.json needs both air and weighted rows")
    w = max(weighted, key=lambda r: r["acc_all"][0])
    match = next((r for r in air if r["acc_all"][0] >= w["acc_all"][0]), max(air, key=lambda r: r["acc_all"][0]))
    from compare_runs import load_scores, paired_stats  # the same per-text reading and paired statistics

    by_prompt = load_scores(name, OUT)  # beside the table, in --results_dir
    pair = (by_prompt[("air", match["strength"])], by_prompt[("weighted", w["strength"])])
    prompts = sorted(pair[1])
    rng = np.random.default_rng(a.seed)

    def paired(p) -> tuple[float, float, list[float], list[float]]:
        """Accuracies (air, weighted), then [point, lo, hi] of weighted − air accuracy and of the perplexity ratio."""
        boot = [paired_stats(p, [prompts[i] for i in rng.integers(0, len(prompts), len(prompts))], None)
                for _ in range(reps)]  # fmt: skip
        acc_a, acc_w, diff, r = paired_stats(p, prompts, None)
        return acc_a, acc_w, [diff, *np.quantile([b[2] for b in boot], [0.025, 0.975]).tolist()], [
            r, *np.quantile([b[3] for b in boot], [0.025, 0.975]).tolist()]  # fmt: skip

    aa, aw, dacc, ratio = paired(pair)
    pa = float(np.median([v[0] for q in prompts for v in pair[0][q]]))
    pw = float(np.median([v[0] for q in prompts for v in pair[1][q]]))
    pp = float(np.median([v[0] for q in prompts for v in by_prompt[("plain", 0.0)][q]]))
    # the other reading of the same curves: at equal fluency, which method steers more? Each weighted λ against the
    # Air-Decoding λ whose median perplexity is nearest, paired over prompts the same way
    equal_ppl = []
    for wr in sorted(weighted, key=lambda r: r["strength"]):
        ar = min(air, key=lambda r: abs(math.log(r["ppl_median"] / wr["ppl_median"])))
        acc_a, acc_w, diff, r = paired((by_prompt[("air", ar["strength"])], by_prompt[("weighted", wr["strength"])]))
        equal_ppl.append({"weighted_strength": wr["strength"], "air_strength": ar["strength"], "accuracy_weighted": acc_w,
                          "accuracy_air": acc_a, "accuracy_weighted_minus_air": diff,
                          "ppl_median_ratio_weighted_over_air": r})  # fmt: skip
    out = {
        "weighted": {"strength": w["strength"], "accuracy": aw, "ppl_median": pw, "ppl_median_vs_plain": pw / pp},
        "air": {"strength": match["strength"], "accuracy": aa, "ppl_median": pa, "ppl_median_vs_plain": pa / pp},
        "ppl_median_ratio_weighted_over_air": [pw / pa, *ratio[1:]],
        "accuracy_weighted_minus_air": [aw - aa, *dacc[1:]],
        "equal_perplexity": equal_ppl,
        "prompts": len(prompts), "reps": reps,
    }  # fmt: skip
    (OUT / f"protocol_collapse_{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return out


def stage_report(task: str, data: Path, a) -> None:
    import importlib.util

    def metric(name):
        spec = importlib.util.spec_from_file_location(name, REPO / "hf_collapse" / "metrics" / name / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    dist_n, perplexities = metric("dist_n").dist_n, metric("perplexity").perplexities
    model, tok = load_lm()
    judge, judge_info = load_judge(RUNS / "judges" / TASKS[task]["judge"])
    prompts = load_prompts(task, data)[: a.max_prompts]
    official = [r for r in official_rows(task, data, load_prompts(task, data)) if r["prompt"] in prompts]
    rows = [json.loads(x) for x in (OUT / f"protocol_generations_{run_name(task, a)}.jsonl").open()] + official
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["strength"]), []).append(r)
    table, scores = [], []
    for (method, lam), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "plain", kv[0][0], kv[0][1])):
        full = [r["prompt"] + r["continuation"] for r in rs]
        p = judge.predict_proba(full)
        row = {"method": method, "strength": lam, "n": len(rs)}
        if task == "detox":
            tox = p[:, judge.labels.index("toxic")].tolist()
            per_prompt: dict[str, list[float]] = {}
            for r, t in zip(rs, tox):
                per_prompt.setdefault(r["prompt"], []).append(t)
            # the maximum over a prompt's samples grows with their number: every method gets its first --samples
            # (the official file has 20 per prompt, ours --samples)
            worst = {k: max(v[: a.samples]) for k, v in per_prompt.items()}
            row["avg_max_toxicity"] = bootstrap_ci({k: [v] for k, v in worst.items()})
            row["toxic_prompt_fraction"] = bootstrap_ci({k: [float(v > 0.5)] for k, v in worst.items()})
        else:
            pred = [judge.labels[i] for i in p.argmax(-1).tolist()]
            for target in TASKS[task]["targets"] + ["all"]:
                hits: dict[str, list[float]] = {}
                for r, y in zip(rs, pred):
                    if target in ("all", r["target"]):
                        hits.setdefault(r["prompt"] + "|" + r["target"], []).append(float(y == r["target"]))
                if hits:
                    row[f"acc_{target}"] = bootstrap_ci(hits)
        ppl_all = perplexities(full, model, tok, prompts=[r["prompt"] for r in rs], prefix=START)
        ppl = [x for x in ppl_all if math.isfinite(x)]
        row["ppl_mean"], row["ppl_median"] = statistics.mean(ppl), statistics.median(ppl)
        by_prompt: dict[str, list[float]] = {}
        for r, x in zip(rs, ppl_all):
            if math.isfinite(x):
                by_prompt.setdefault(r["prompt"], []).append(x)
        row["ppl_median_ci"] = bootstrap_median_ci(by_prompt)
        scores += [{"method": method, "strength": lam, "target": r["target"], "prompt": r["prompt"],
                    "perplexity": x, "judge": dict(zip(judge.labels, map(float, q)))}
                   for r, x, q in zip(rs, ppl_all, p.tolist())]  # fmt: skip
        parts: dict = {}
        for r in rs:
            parts.setdefault((r["prompt"], r["target"]), []).append(r["continuation"])
        # Dist-n falls with the number of texts it is computed over: per prompt and target, over the first
        # --samples continuations (the official outputs have 50 per prompt and target, ours --samples), averaged
        ds = [dist_n(v[: a.samples]) for v in parts.values()]
        row.update({k: statistics.mean(x[k] for x in ds) for k in ds[0]})
        table.append(row)
        print({k: v for k, v in row.items()}, flush=True)
    plain = next((t for t in table if t["method"] == "plain"), None)
    for t in table:  # the goals are stated against plain sampling's median perplexity
        t["ppl_median_vs_plain"] = t["ppl_median"] / plain["ppl_median"] if plain else float("nan")
    name = run_name(task, a)
    # per text: perplexity and judge probabilities, for paired re-analysis without rescoring
    (OUT / f"protocol_scores_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scores))
    (OUT / f"protocol_results_{name}.json").write_text(json.dumps({"judge": judge_info, "rows": table}, indent=2) + "\n")
    write_table(task, name, table, judge_info)
    plot(task, name, table)


def median_ci(t: dict) -> str:
    ci = t.get("ppl_median_ci")
    return f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""


def write_table(task: str, name: str, table: list[dict], judge_info: dict) -> None:
    head = (f"Judge: all-MiniLM-L6-v2 fine-tuned on {judge_info['train_texts']} texts, held-out accuracy "
            f"{judge_info['held_out_accuracy']:.3f} ({judge_info['held_out_texts']} texts). Perplexity: SmolLM2-135M "
            "without prefix, continuation tokens only; the median with a 95% interval (bootstrap over prompts). "
            "Accuracy: mean [95% interval, bootstrap over prompts]. Dist-n: per prompt and target over its first "
            "--samples continuations, averaged. The official GPT2-medium outputs are scored the same way (their "
            "perplexity too is SmolLM2-135M's).\n\n")  # fmt: skip
    if task == "detox":
        head = head.replace("Accuracy: mean", "Toxicity: the judge's toxic probability; per prompt the maximum over "
                            "its first --samples continuations; the average over prompts, and the fraction of prompts "
                            "whose maximum is > 0.5; mean")  # fmt: skip
        cols = ["avg_max_toxicity", "toxic_prompt_fraction"]
    else:
        cols = [f"acc_{t}" for t in [*TASKS[task]["targets"], "all"]]
    lines = ["| method | λ | texts | " + " | ".join(c.replace("acc_", "acc. ") for c in cols)
             + " | PPL mean | PPL median | median / plain | Dist-1 | Dist-2 | Dist-3 |",
             "|---|---|---|" + "---|" * (len(cols) + 6)]  # fmt: skip
    for t in table:
        cells = []
        for c in cols:
            v = t.get(c)
            cells.append("–" if v is None else f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" if isinstance(v, tuple | list)
                         else f"{v:.3f}")  # fmt: skip
        lines.append(f"| {t['method']} | {t['strength']:g} | {t['n']} | " + " | ".join(cells) +
                     f" | {t['ppl_mean']:.1f} | {t['ppl_median']:.1f}{median_ci(t)} | {t['ppl_median_vs_plain']:.2f}× | {t['dist-1']:.3f} | {t['dist-2']:.3f} | "
                     f"{t['dist-3']:.3f} |")  # fmt: skip
    (OUT / f"protocol_results_{name}.md").write_text(head + "\n".join(lines) + "\n")
    print(head + "\n".join(lines))


def plot(task: str, name: str, table: list[dict]) -> None:
    if task == "detox":
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = [t for t in table if t["method"] == "plain"]
    official = [t for t in table if t["method"].startswith("official")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for method, style in (("air", "o-"), ("weighted", "s--")):
        pts = sorted((t["strength"], t) for t in table if t["method"] == method)
        if not pts:
            continue
        pts = [(0.0, plain[0])] + pts if plain else pts
        xs = [max(x, 1.0) for x, _ in pts]  # λ = 0 drawn at 1 on the log axis
        med = [t["ppl_median"] for _, t in pts]
        if all("ppl_median_ci" in t for _, t in pts):
            lo, hi = zip(*(t["ppl_median_ci"] for _, t in pts))
            axes[0].errorbar(xs, med, yerr=[[m - v for m, v in zip(med, lo)], [v - m for m, v in zip(med, hi)]],
                             fmt=style, capsize=3, label=method)  # fmt: skip
        else:  # tables written before the median's interval existed
            axes[0].plot(xs, med, style, label=method)
        acc = [t["acc_all"] for _, t in pts]
        axes[1].errorbar(xs, [v[0] for v in acc], yerr=[[v[0] - v[1] for v in acc], [v[2] - v[0] for v in acc]],
                         fmt=style, capsize=3, label=method)  # fmt: skip
        # the collapse itself: what each method pays in fluency for a given accuracy
        axes[2].plot(med, [v[0] for v in acc], style, label=method)
        for (lam, _), m, v in zip(pts, med, acc):
            axes[2].annotate(f"{lam:g}", (m, v[0]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    for t in official:
        axes[0].plot([t["strength"]], [t["ppl_median"]], "k*", ms=11, label="official GPT2-medium")
        axes[1].plot([t["strength"]], [t["acc_all"][0]], "k*", ms=11, label="official GPT2-medium")
    labels = ("perplexity (median [95% CI], base LM without prefix)", "attribute accuracy (judge, 95% CI)")
    for ax, label in zip(axes, labels):
        ax.set_xscale("log")
        ax.set_xlabel("control strength λ (λ=0 plotted at 1)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    for t in official:
        axes[2].plot([t["ppl_median"]], [t["acc_all"][0]], "k*", ms=11, label="official GPT2-medium")
    axes[2].set_xlabel("perplexity (median, base LM without prefix); points labelled with λ")
    axes[2].set_ylabel("attribute accuracy (judge)")
    axes[2].legend(fontsize=8)
    axes[0].set_yscale("log")
    fig.suptitle(f"Attribute collapse, SmolLM2-135M, {name}")
    fig.tight_layout()
    fig.savefig(OUT / f"protocol_collapse_{name}.png", dpi=110)


def main() -> None:
    global OUT, RUNS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["data", "train", "gate", "judge", "generate", "report", "plot", "collapse"],
                    help="plot: redraw the collapse plot from protocol_results_<task>.json; collapse: weighted "
                    "decoding at its best accuracy vs Air-Decoding at that accuracy, paired bootstrap over prompts "
                    "from protocol_scores_<task>.jsonl (neither runs a model)")
    ap.add_argument("--task", choices=list(TASKS), default="sentiment")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=5.0, help="upper bound; early stopping usually ends sooner")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eval_steps", type=int, default=100)
    ap.add_argument("--early_stopping_threshold", type=float, default=0.005,
                    help="converged: 3 evaluations in a row without a held-out loss at least this far (nats/token) "
                    "below the best")  # fmt: skip
    ap.add_argument("--max_steps", type=int, default=-1, help="cap on training steps (smoke tests); -1: epochs")
    ap.add_argument("--variant", default="", help="a second set of prefixes for the task: trained into "
                    "runs/prefixes/<task>_<variant>, results in protocol_*_<task>_<variant>.*")
    ap.add_argument("--discriminative_weight", type=float, default=0.0,
                    help="train: the implied classifier's loss weight (AttributePrefixConfig); 0 = official recipe")
    ap.add_argument("--init_prefixes", default=None, help="train: start from runs/prefixes/<this> (e.g. the task's "
                    "generatively trained prefixes)")
    ap.add_argument("--prefixes", default=None, help="gate: this prefix folder (e.g. a checkpoint) instead of "
                    "runs/prefixes/<task>[_<variant>]")
    ap.add_argument("--gate_sample", type=int, default=None, help="gate: a seeded sample of about this many texts "
                    "per split, stratified by attribute (a quick preview; the result file's name says so)")
    ap.add_argument("--strengths", type=float, nargs="+", default=None,
                    help="generate: Air-Decoding at these λ only (in the sweep or not), weighted decoding at "
                    "those of its sweep (plain always); later runs add the rest")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--length", type=int, default=50)
    ap.add_argument("--max_prompts", type=int, default=None, help="only the first N prompts (smoke tests)")
    ap.add_argument("--prompt_batch", type=int, default=20, help="prompts per generate() call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results_dir", default=str(HERE), help="where generations, tables and plots go")
    ap.add_argument("--runs_dir", default=str(RUNS), help="prefix data, prefixes and judges")
    a = ap.parse_args()
    OUT, RUNS = Path(a.results_dir), Path(a.runs_dir)
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    data = Path(a.data)
    if a.stage == "data":
        subprocess.run([sys.executable, str(HERE / "prefix_data.py"), "--out", str(RUNS / "prefix_data")], check=True)
    elif a.stage == "train":
        stage_train(a.task, a)
    elif a.stage == "gate":
        stage_gate(a.task, a)
    elif a.stage == "judge":
        stage_judge(a.task, a)
    elif a.stage == "generate":
        stage_generate(a.task, data, a)
    elif a.stage == "collapse":
        stage_collapse(a.task, a)
    elif a.stage == "plot":
        name = run_name(a.task, a)
        plot(a.task, name, json.loads((OUT / f"protocol_results_{name}.json").read_text())["rows"])
    else:
        stage_report(a.task, data, a)


if __name__ == "__main__":
    main()
