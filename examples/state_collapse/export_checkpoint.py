"""Publish the state-collapse experiment's Mamba-2 as the bundled `checkpoints/robust-mamba2-tiny`.

    python examples/state_collapse/export_checkpoint.py --run examples/state_collapse/out \
        --out checkpoints/robust-mamba2-tiny

Takes the trained weights in `<run>/model`, writes the calibrated per-(layer, head) state-norm caps that the
experiment logged (calibrated on training text within T_train only, every 16 tokens) into the config
(`state_norm_max` on), and
adds `demo_text.txt`: 16 KB of a held-out State of the Union address (US government work, public domain; from
../shared/data/corpus/state_union.zip, never used for training or calibration) for `hf-collapse demo`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


# run labels of logs written before the labels named the config fields (the paper's numbering) -> current labels
_OLD_LABEL_PREFIXES = {"M1 ": "", "M2 ": "state_norm_max ", "M3 window ": "sliding_window="}


def _label(name: str) -> str:
    for old, new in _OLD_LABEL_PREFIXES.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default=str(HERE / "out"))
    p.add_argument("--out", default="checkpoints/robust-mamba2-tiny")
    p.add_argument("--data_dir", default=str(HERE.parents[1].parent / "shared" / "data" / "corpus"))
    a = p.parse_args()

    import hf_collapse  # noqa: F401
    from hf_collapse import RobustMamba2ForCausalLM
    from hf_collapse.hub import make_model_card

    run = Path(a.run)
    log = (run / "log.txt").read_text()
    caps = json.loads(re.findall(r"calibrated state_norm_max \(layer x head\): (\[.*\])", log)[-1])
    rows = {_label(m.group(1)): m.group(0) for m in re.finditer(r"^([^:\n]+): loss.*$", log, re.M)}
    model = RobustMamba2ForCausalLM.from_pretrained(run / "model", state_norm_max=caps, state_norm_every=16)
    model.config.train_length = 64
    model.config.tokenizer = "bytes (token id = UTF-8 byte value)"

    with zipfile.ZipFile(Path(a.data_dir) / "state_union.zip") as z:
        last = sorted(n for n in z.namelist() if n.endswith(".txt"))[-1]
        text = z.read(last)[:16384]

    table = "| evaluation on held-out speeches (32K bytes) | loss, nats/byte |\n|---|---|\n" + "\n".join(
        f"| {name} | {line.split(': ', 1)[1].split(';')[0]} |" for name, line in rows.items()
    )
    card = make_model_card(
        "robust_mamba2",
        model_id="robust-mamba2-tiny",
        repo_id="hf-collapse/robust-mamba2-tiny",
        datasets=["nltk/state_union", "nltk/inaugural"],
        metrics=["loss"],
        license="apache-2.0",
        language="en",
        model_description=(
            "A byte-level, 2-layer Mamba-2 (0.27M parameters) trained at T_train = 64 with 4 of 8 heads per layer "
            "frozen to a 4K-token half-life: a controlled model of a pretrained checkpoint that never learned to "
            "forget. Its config switches on state normalisation (`state_norm_max`) with caps calibrated on training "
            "text."
        ),
        mitigations=f"state_norm_max = calibrated per (layer, head), state_norm_every = 16 (from {run.name}/log.txt)",
        results_table=table,
        limitations="Too small to retrieve a passkey at any length; one training seed.",
    )
    model.save_pretrained(a.out, model_card=card)
    (Path(a.out) / "demo_text.txt").write_bytes(text)
    print("saved", a.out, f"(demo text from {last})")


if __name__ == "__main__":
    main()
