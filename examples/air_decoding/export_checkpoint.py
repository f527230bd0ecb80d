"""Publish the Air-Decoding experiment's attribute prefixes as bundled Hub-ready checkpoints.

    python examples/air_decoding/export_checkpoint.py --task sentiment   # -> checkpoints/smollm2-135m-sentiment-prefixes
    python examples/air_decoding/export_checkpoint.py --task topic       # -> checkpoints/smollm2-135m-topic-prefixes

Copies the PEFT adapters written by `run_experiment.py train` (in $HF_COLLAPSE_CACHE/experiment/prefixes_<task>),
drops the Trainer's pickled `training_args.bin` (bundled checkpoints hold safetensors and JSON only), names the Hub
base model in `attribute_prefixes.json`, records the prompt prefix the prefixes were trained with (`start_text`), and
writes a model card with the experiment's table from docs/air_decoding.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = Path(os.environ.get("HF_COLLAPSE_CACHE", Path.home() / ".cache" / "hf_collapse"))
START = "<|endoftext|>"


def experiment_table(task: str) -> str:
    """The task's results table from docs/air_decoding.md (sentiment: the first table, topic: the second)."""
    lines = (REPO / "docs" / "air_decoding.md").read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("| method | λ |")]
    which = 0 if task == "sentiment" else 1
    if len(starts) <= which:
        return "See docs/air_decoding.md in the hf-collapse repository."
    table = []
    for line in lines[starts[which] :]:
        if not line.startswith("|"):
            break
        table.append(line)
    return "\n".join(table)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", choices=["sentiment", "topic"], default="sentiment")
    p.add_argument("--src", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    src = Path(a.src or CACHE / "experiment" / f"prefixes_{a.task}")
    out = Path(a.out or REPO / "checkpoints" / f"smollm2-135m-{a.task}-prefixes")

    from hf_collapse.hub import make_model_card
    from hf_collapse.modeling.checkpoint_utils import atomic_directory_write, check_safetensors_files

    index = json.loads((src / "attribute_prefixes.json").read_text())
    for attr in index["attributes"]:
        check_safetensors_files(src / attr)
    index["base_model"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    index["start_text"] = START

    datasets = ["cornell-movie-review-data/rotten_tomatoes"] if a.task == "sentiment" else ["fancyzhx/ag_news"]
    card = make_model_card(
        "attribute_prefixes",
        model_id=out.name,
        repo_id=f"hf-collapse/{out.name}",
        base_model=index["base_model"],
        datasets=datasets,
        metrics=["accuracy", "perplexity"],
        license="apache-2.0",
        language="en",
        attributes=", ".join(index["attributes"]),
        example_target=index["attributes"][0],
        model_description=(
            f"Prefix length {index['num_virtual_tokens']}; every training text started with `{START}`, so prepend it "
            "to prompts (`attribute_prefixes.json` records it as `start_text`). Short training (60 steps), "
            "see the results below."
        ),
        results_table=experiment_table(a.task),
        limitations="Prefixes are tied to SmolLM2-135M-Instruct (the Q4_1 GGUF weights, dequantised); "
        "accuracy was measured with a bag-of-words judge.",
    )

    def write(tmp: str) -> None:
        for attr in index["attributes"]:
            shutil.copytree(src / attr, Path(tmp) / attr, ignore=shutil.ignore_patterns("*.bin", "README.md"))
            cfg_path = Path(tmp) / attr / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = index["base_model"]
            cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        Path(tmp, "attribute_prefixes.json").write_text(json.dumps(index, indent=2) + "\n")
        card.save(str(Path(tmp) / "README.md"))

    if out.exists():
        shutil.rmtree(out)
    atomic_directory_write(out, write)
    print("saved", out, sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main()
