"""Publish the Air-Decoding experiment's attribute prefixes as bundled Hub-ready checkpoints.

    python examples/air_decoding/export_checkpoint.py --task sentiment   # -> checkpoints/smollm2-135m-sentiment-prefixes
    python examples/air_decoding/export_checkpoint.py --task topic       # -> checkpoints/smollm2-135m-topic-prefixes
    python examples/air_decoding/export_checkpoint.py --task detox       # -> checkpoints/smollm2-135m-detox-prefixes

Reads the attribute prefixes written by `run_experiment.py train` (in runs/prefixes/<task>)
and writes them again with `hf_collapse.modeling.attribute_prefixes.write_attribute_prefixes`: the Hub base model is
named in `attribute_prefixes.json` and in every `adapter_config.json`, the prompt prefix the prefixes were trained with
is recorded (`start_text`, `start_token_id`: `AttributePrefixModel` applies it itself), the model card carries the experiment's table from docs/air_decoding.md, and the Trainer's
pickled `training_args.bin` is left behind (bundled checkpoints hold safetensors and JSON only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
START = "<|endoftext|>"
START_ID = 0  # SmolLM2's <|endoftext|>


def experiment_table(task: str) -> str:
    """The task's protocol table (`protocol_results_<task>.md`), else the earlier table in docs/air_decoding.md."""
    protocol = HERE / f"protocol_results_{task}.md"
    if protocol.is_file():
        return protocol.read_text()
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
    p.add_argument("--task", choices=["sentiment", "topic", "detox"], default="sentiment")
    p.add_argument("--src", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    src = Path(a.src or REPO / "runs" / "prefixes" / a.task)
    out = Path(a.out or REPO / "checkpoints" / f"smollm2-135m-{a.task}-prefixes")

    from peft import PrefixTuningConfig

    from hf_collapse.model_cards import make_model_card
    from hf_collapse.modeling.attribute_prefixes import read_attribute_prefixes, write_attribute_prefixes

    # the reader validates every adapter (PEFT type, shapes, safetensors headers) before anything is written
    index, prefixes, _ = read_attribute_prefixes(src)
    attributes = index["attributes"]
    peft_config = PrefixTuningConfig.from_pretrained(str(src / attributes[0]))
    base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"

    datasets = ["cornell-movie-review-data/rotten_tomatoes"] if a.task == "sentiment" else ["fancyzhx/ag_news"]
    card = make_model_card(
        "attribute_prefixes",
        model_id=out.name,
        repo_id=f"hf-collapse/{out.name}",
        base_model=base_model,
        datasets=datasets,
        metrics=["accuracy", "perplexity"],
        license="apache-2.0",
        language="en",
        attributes=", ".join(attributes),
        example_target=attributes[0],
        model_description=(
            f"Prefix length {index['num_virtual_tokens']}; every training text started with `{START}`, which "
            "`AttributePrefixModel` puts before every prompt itself (`attribute_prefixes.json` records it as "
            "`start_token_id`). Short training (60 steps), "
            "see the results below."
        ),
        results_table=experiment_table(a.task),
        limitations="Prefixes are tied to SmolLM2-135M-Instruct (the Q4_1 GGUF weights, dequantised); "
        "accuracy was measured with a bag-of-words judge.",
    )

    write_attribute_prefixes(
        out,
        attributes,
        prefixes,
        peft_config,
        base_model=base_model,
        model_card=card,
        extra_index={"start_text": START, "start_token_id": START_ID},
    )
    print("saved", out, sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main()
