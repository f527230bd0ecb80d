"""Air-Decoding cost in ``generate()``: Air-Decoding (K=2) time / plain sampling time, beside the physical floor.

    python benchmarks/air_decoding.py --threads 1

Model: SmolLM2-135M from ``~/.cache/hf_collapse/smollm2-135m`` if it was prepared
(``examples/air_decoding/prepare_smollm2.py``), else a tiny random Llama. 50 new tokens, batch 1 and 8,
``do_sample=True, top_k=200``. The prefixes are untrained (timing does not depend on their values).

Printed per batch size:
* ``air-decoding / plain sampling``: our generate() time over plain sampling;
* ``floor``: (one cached decode forward of 3·B rows) / (the same forward of B rows): the least this design can
  cost, since each step runs the generator on B rows and the K=2 prefixes on 2·B rows;
* ``split floor``: (forward of B rows + forward of 2·B rows) / forward of B rows: the floor for a
  ``LogitsProcessor``, which cannot merge its rows into the generator's forward;
* ``serial baseline / air-decoding``: a processor that runs the K prefixes as K separate forwards per step (what the
  official code does) over ours (ratio > 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_median, report  # noqa: E402

from hf_collapse.processors.air_decoding import AirDecodingLogitsProcessor  # noqa: E402
from hf_collapse.processors.attribute_prefix_model import AttributePrefixModel  # noqa: E402

SMOLLM2 = Path.home() / ".cache" / "hf_collapse" / "smollm2-135m"
NEW_TOKENS = 50


class SerialAttributePrefixModel(AttributePrefixModel):
    """The official code's schedule: one forward per attribute per step, each with its own cache."""

    def start(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long)
        self._serial = []
        logits = []
        for k in range(self.num_attributes):
            cache = self.prefix_cache(b, attributes=[k])
            out = self._one(k, input_ids, attention_mask, cache)
            self._serial.append(out.cache)
            logits.append(out.logits[0, :, -1])
        self._smask = attention_mask
        return torch.stack(logits)

    def _one(self, k, ids, mask, cache, position_ids=None):
        # forward() with K=1: temporarily view a single attribute
        full = self.attributes
        self.attributes = [full[k]]
        try:
            return self.forward(ids, mask, cache=cache, position_ids=position_ids)
        finally:
            self.attributes = full

    def step(self, tokens):
        self._smask = torch.cat([self._smask, self._smask.new_ones(self._smask.shape[0], 1)], 1)
        pos = (self._smask.cumsum(-1)[:, -1:] - 1) + self.num_virtual_tokens
        logits = []
        for k in range(self.num_attributes):
            out = self._one(k, tokens.view(-1, 1), self._smask, self._serial[k], position_ids=pos)
            logits.append(out.logits[0, :, -1])
        return torch.stack(logits)

    def reset(self):
        self._serial = None
        super().reset()


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (SMOLLM2 / "model.safetensors").is_file():
        return (
            "SmolLM2-135M",
            AutoModelForCausalLM.from_pretrained(SMOLLM2).eval(),
            AutoTokenizer.from_pretrained(SMOLLM2),
        )
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return "tiny-random-llama", LlamaForCausalLM(cfg).eval(), None


def make_prefixes(model, path: str) -> str:
    from hf_collapse.modeling.attribute_prefixes import AttributePrefixLM, peft_prefix_config, save_attribute_prefixes

    lm = AttributePrefixLM(model, ["positive", "negative"], peft_prefix_config(model, num_virtual_tokens=20))
    save_attribute_prefixes(lm, path)
    return path


def bench(b: int, name: str, model, tok, batched, serial, a) -> None:
    """Time one batch size."""
    if tok is not None:
        ids = tok(["The movie"] * b, return_tensors="pt")["input_ids"]
    else:
        ids = torch.randint(3, 1000, (b, 2))
    kw = dict(do_sample=True, top_k=200, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)

    def plain():
        return model.generate(input_ids=ids, **kw)

    def ours():
        return model.generate(
            input_ids=ids, logits_processor=[AirDecodingLogitsProcessor(batched, "positive", 140.0)], **kw
        )

    def official_schedule():
        return model.generate(
            input_ids=ids, logits_processor=[AirDecodingLogitsProcessor(serial, "positive", 140.0)], **kw
        )

    # the floor: one cached single-token decode forward of 3B rows vs B rows (cache of ~prompt + 25 tokens)
    def decode_forward(rows):
        x = torch.randint(3, 1000, (rows, 27))
        with torch.no_grad():
            cache = model(input_ids=x, use_cache=True).cache

        def f():
            with torch.no_grad():
                model(input_ids=x[:, -1:], cache=cache, use_cache=True)
            cache.crop(-1)  # drop the token just added: the cache length stays fixed

        return f

    f3, f2, f1 = decode_forward(3 * b), decode_forward(2 * b), decode_forward(b)
    fl3, fl1 = interleaved_median(f3, f1, repeats=max(a.repeats, 20), warmup=3)
    # what a LogitsProcessor can reach: the generator's B-row forward and the attribute model's 2B-row forward
    # are two separate calls
    fl2, fl1b = interleaved_median(f2, f1, repeats=max(a.repeats, 20), warmup=3)
    floor, split_floor = fl3 / fl1, (fl2 + fl1b) / fl1b
    print(
        f"  floor (forward of {3 * b} rows / forward of {b} rows): {floor:.3f}x; split floor "
        f"(forward of {b} rows + forward of {2 * b} rows) / forward of {b} rows: {split_floor:.3f}x"
    )
    if a.floor_only:
        return
    t_ours, t_plain = interleaved_median(ours, plain, repeats=a.repeats)
    t_serial, t_ours2 = interleaved_median(official_schedule, ours, repeats=a.repeats)
    ratio = report(
        "air_decoding",
        f"air-decoding / plain sampling (batch {b})",
        t_ours,
        t_plain,
        a.repeats,
        a.threads,
        model=name,
        batch=b,
        floor=floor,
        split_floor=split_floor,
    )
    print(f"  ours / floor = {ratio / floor:.3f}, ours / split floor = {ratio / split_floor:.3f}")
    report(
        "air_decoding",
        f"serial baseline / air-decoding (batch {b})",
        t_serial,
        t_ours2,
        a.repeats,
        a.threads,
        model=name,
        batch=b,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--floor-only", action="store_true", help="measure only the forward-time floors")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    name, model, tok = load_model()
    print(f"model {name}, threads {a.threads}, {NEW_TOKENS} new tokens, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_prefixes(model, tmp)
        batched = AttributePrefixModel.from_pretrained(model, ckpt)
        serial = SerialAttributePrefixModel.from_pretrained(model, ckpt)
    for b in [int(x) for x in a.batches.split(",")]:
        bench(b, name, model, tok, batched, serial, a)


if __name__ == "__main__":
    main()
