"""`hf-collapse demo`: the three fixes on real bundled checkpoints, one section each.

* `air`:   SmolLM2-135M, plain sampling next to Air-Decoding with the bundled prefixes of one task (`--air_task`):
           toward positive and negative (judged by the bundled sentiment classifier), toward each news topic, or
           toward non-toxic text; other tasks are labelled when `--judge` names a classifier for their labels.
* `mamba`: the bundled small Mamba-2 over a long input, with and without the state-collapse mitigations.
* `dhkd`:  the bundled dual-head student classifying Fashion-MNIST test images (the installed dataset, else the 300
           test images shipped in the package).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..validation import check_number
from .fashion_mnist import FASHION_MNIST_DIR
from .generate import resolve_strength
from .utils import CHECKPOINTS_ENV, CommandError, checkpoints_dir, parse_args

SECTIONS = ("air", "mamba", "dhkd")


@dataclass(frozen=True)
class AirDemoTask:
    """One bundled prefix checkpoint as the demo shows it."""

    checkpoint: str
    targets: tuple[str, ...]  # steered toward; detox shows only the direction a user wants
    prompts: str


AIR_TASKS = {
    "sentiment": AirDemoTask("smollm2-135m-sentiment-prefixes", ("positive", "negative"), "The movie|The book"),
    "topic": AirDemoTask("smollm2-135m-topic-prefixes", ("world", "sports", "business", "science"),
                         "In summary|This essay discusses"),
    "detox": AirDemoTask("smollm2-135m-detox-prefixes", ("nontoxic",),
                         "He looked at me and said|The comments under the video called him a"),
}  # fmt: skip


@dataclass
class DemoScriptArguments:
    """Options of `hf-collapse demo`."""

    only: str | None = field(default=None, metadata={"help": f"Run one section only: one of {SECTIONS}."})
    checkpoints: str | None = field(
        default=None,
        metadata={"help": "Folder of the bundled checkpoints (default: $HF_COLLAPSE_CHECKPOINTS, else the installed package's)."},
    )
    air_task: str = field(
        default="sentiment",
        metadata={"help": f"Which bundled prefixes the Air-Decoding section steers with: one of {tuple(AIR_TASKS)}."},
    )
    prompts: str | None = field(
        default=None,
        metadata={"help": "'|'-separated prompts for the Air-Decoding section (default: two per --air_task)."},
    )
    strength: float | None = field(
        default=None,
        metadata={"help": "Air-Decoding control strength lambda (default: the checkpoint's `default_strength`, the "
                  "strength its card evaluates: sentiment 140, topic 60, detox 120)."},
    )  # fmt: skip
    max_new_tokens: int = field(default=24, metadata={"help": "Tokens generated per continuation."})
    mamba_tokens: int = field(default=8192, metadata={"help": "Length of the long input of the Mamba-2 section."})
    fashion_mnist_dir: str = field(
        default=FASHION_MNIST_DIR, metadata={"help": "Folder of the Fashion-MNIST IDX files."}
    )
    judge: str | None = field(
        default=None,
        metadata={"help": "Folder of the sentiment judge that labels the Air-Decoding section: a transformers "
                  "sequence classifier with 'positive'/'negative' labels (examples/air_decoding/transformer_judges.py "
                  "builds one) or a HashedBowJudge (default: the bundled sentiment-judge for --air_task sentiment; "
                  "other tasks are shown unlabelled unless --judge names a classifier with their labels)."},
    )  # fmt: skip
    seed: int = field(default=0, metadata={"help": "Random seed of the sampling."})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (default: torch's)."})

    def __post_init__(self) -> None:
        if self.air_task not in AIR_TASKS:
            raise CommandError(f"--air_task must be one of {tuple(AIR_TASKS)}, got {self.air_task!r}")
        check_number("--", "strength", self.strength, minimum=0.0, allow_none=True)
        check_number("--", "max_new_tokens", self.max_new_tokens, integer=True, minimum=1)
        check_number("--", "mamba_tokens", self.mamba_tokens, integer=True, minimum=16)
        check_number("--", "threads", self.threads, integer=True, minimum=1, allow_none=True)


def _need(path: Path) -> bool:
    if (path / "README.md").is_file():
        return True
    print(f"  (skipped: bundled checkpoint {path} not found; set --checkpoints or ${CHECKPOINTS_ENV})")
    return False


def _header(title: str) -> None:
    print("\n" + "=" * 100 + f"\n{title}\n" + "=" * 100, flush=True)


# ------------------------------------------------------------------------------------------------ sections
def section_air(a: DemoScriptArguments, ckpt: Path) -> None:
    task = AIR_TASKS[a.air_task]
    _header(f"Attribute collapse -> Air-Decoding (SmolLM2-135M + bundled {a.air_task} prefixes)")
    prefixes = ckpt / task.checkpoint
    if a.judge:
        judge_dir: Path | None = Path(a.judge)
    elif a.air_task == "sentiment":
        judge_dir = ckpt / "sentiment-judge"
        if not _need(judge_dir):
            return
    else:
        judge_dir = None
    if not _need(prefixes):
        return
    import torch

    from ..evals.sentiment_judge import load_judge
    from ..processors.air_decoding import AirDecodingLogitsProcessor
    from ..processors.attribute_prefix_model import AttributePrefixModel
    from .smollm2 import load_smollm2

    judge = None
    if judge_dir is not None:
        try:  # before the LM: a wrong --judge should not cost its loading time
            judge = load_judge(judge_dir, labels=task.targets)
        except (FileNotFoundError, ValueError) as e:
            raise CommandError(f"--judge: {e}") from e
    model, tok = load_smollm2()
    attr = AttributePrefixModel.from_pretrained(model, prefixes)
    strength = resolve_strength(a.strength, attr.default_strength)
    # the base LM reads the prompt the way the prefixes were trained (after the start text); the prefix model
    # holds the start token in its cache and hides the prompt's own copy
    start = json.loads((prefixes / "attribute_prefixes.json").read_text()).get("start_text", "")
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    from tqdm.auto import tqdm

    prompts = [p for p in (a.prompts or task.prompts).split("|") if p]
    jobs = [(p, t) for p in prompts for t in (None, *task.targets)]
    rows = []
    for prompt, target in tqdm(jobs, desc="generating", unit="text"):
        torch.manual_seed(a.seed)
        enc = tok([start + prompt], return_tensors="pt")
        procs = []
        if target is not None:
            procs = [AirDecodingLogitsProcessor(attr, target, strength, prompt_attention_mask=enc["attention_mask"])]
        out = model.generate(**enc, logits_processor=procs, do_sample=True, top_k=200, top_p=1.0,
                             max_new_tokens=a.max_new_tokens, pad_token_id=tok.pad_token_id)  # fmt: skip
        text = prompt + tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        text = " ".join(text.split())
        verdict = judge.predict([text])[0] if judge is not None else None
        rows.append((target or "plain", verdict, text))
    print(f"lambda = {strength:g}, the same seed for every row")
    width = max(len(m) for m, _, _ in rows)
    for method, verdict, text in rows:
        label = f" | judge: {verdict:>8}" if verdict is not None else ""
        print(f"[{method:>{width}}{label}] {text}")


def section_mamba(a: DemoScriptArguments, ckpt: Path) -> None:
    _header("State collapse -> robust Mamba-2 (bundled robust-mamba2-tiny, long input)")
    path = ckpt / "robust-mamba2-tiny"
    if not _need(path):
        return
    import torch

    from ..evals.position_loss import position_loss
    from ..modeling.robust_mamba2 import RobustMamba2ForCausalLM

    text_file = path / "demo_text.txt"
    if not text_file.is_file():
        print(f"  (skipped: {text_file} missing)")
        return
    data = text_file.read_bytes()
    reps = a.mamba_tokens // max(len(data), 1) + 1
    ids = torch.tensor(list((data * reps)[: a.mamba_tokens]))[None]  # byte-level model: token id = byte value
    mitigated = RobustMamba2ForCausalLM.from_pretrained(path).eval()
    mitig_cfg = {k: getattr(mitigated.config, k) for k in ("insertion_scale", "decay_scale", "sliding_window")}
    mitig_cfg["state_norm_max"] = "calibrated" if mitigated.config.state_norm_max is not None else None
    plain = RobustMamba2ForCausalLM.from_pretrained(path, state_norm_max=None, sliding_window=None,
                                                    insertion_scale=1.0, decay_scale=1.0).eval()  # fmt: skip
    train_len = json.loads((path / "config.json").read_text()).get("train_length")
    bucket = max(a.mamba_tokens // 8, 1)
    with torch.no_grad():
        r_plain = position_loss(plain, ids, bucket_size=bucket, stats_every=1024, progress=True)
        r_mit = position_loss(mitigated, ids, bucket_size=bucket, stats_every=1024, progress=True)
    print(f"training length: {train_len} tokens; mitigations: {mitig_cfg}")
    print(f"{'positions':>14} | {'loss, no mitigation':>20} | {'loss, mitigated':>16}")
    for b0, b1 in zip(r_plain["buckets"], r_mit["buckets"]):
        print(f"{b0['start']:>6}-{b0['end']:<7} | {b0['mean_loss']:>20.3f} | {b1['mean_loss']:>16.3f}")


def section_dhkd(a: DemoScriptArguments, ckpt: Path) -> None:
    _header("Head collapse -> dual-head KD (bundled dual-head-fashion-mnist student)")
    path = ckpt / "dual-head-fashion-mnist"
    if not _need(path):
        return
    import torch
    from transformers import AutoModelForImageClassification

    from .fashion_mnist import FashionMNIST, demo_sample

    try:
        test, source = FashionMNIST(a.fashion_mnist_dir, "test", limit=1000), "the first 1000 test images"
    except FileNotFoundError:
        # no dataset installed: the package ships 300 test images (see scripts/demo_data/PROVENANCE.md)
        test, source = demo_sample(), "the 300 test images shipped with hf-collapse"
    model = AutoModelForImageClassification.from_pretrained(path, use_safetensors=True).eval()
    with torch.no_grad():
        logits = model(pixel_values=test.pixel_values).logits  # main head only
    pred = logits.argmax(-1)
    for i in range(8):
        ok = "ok " if pred[i] == test.labels[i] else "MISS"
        print(f"  image {i}: predicted {model.config.id2label[int(pred[i])]:<12} true "
              f"{model.config.id2label[int(test.labels[i])]:<12} {ok}")  # fmt: skip
    print(f"  accuracy on {source}: {100 * (pred == test.labels).float().mean():.1f}%")


def main(argv: Sequence[str]) -> int:
    """Entry point of `hf-collapse demo`."""
    (a,) = parse_args([DemoScriptArguments], argv, prog="hf-collapse demo")
    if a.only is not None and a.only not in SECTIONS:
        raise CommandError(f"--only must be one of {SECTIONS}, got {a.only!r}")
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    ckpt = checkpoints_dir(a.checkpoints)
    t0 = time.perf_counter()
    runners = {"air": section_air, "mamba": section_mamba, "dhkd": section_dhkd}
    for name in SECTIONS:
        if a.only in (None, name):
            runners[name](a, ckpt)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0
