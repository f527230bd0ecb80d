"""Air-Decoding cost in ``generate()``: Air-Decoding (K=2) time / plain sampling time, beside the physical floor, for
the processor path (``AttributePrefixModel``: a second forward per step) and the fused path
(``AirDecodingForCausalLM``: one forward of 3·B rows per step), in the same run.

    python benchmarks/air_decoding.py --threads 1
    python benchmarks/air_decoding.py --tiny          # smoke test: tiny random model, a few tokens, seconds

Model: SmolLM2-135M from ``~/.cache/hf_collapse/smollm2-135m`` if it was prepared
(``examples/air_decoding/prepare_smollm2.py``), else (or with ``--tiny``) a tiny random Llama. 50 new tokens, batch 1
and 8, ``do_sample=True, top_k=200``. The prefixes are untrained (timing does not depend on their values). Torch's
intra-op threads are pinned to ``--threads`` and inter-op threads to 1.

Printed per batch size:
* ``floor``: (one cached decode forward of 3·B rows) / (the same forward of B rows): the least this design can
  cost, since each step runs the generator on B rows and the K=2 prefixes on 2·B rows;
* ``generate() floor``: plain sampling of 3·B rows / plain sampling of B rows, both in ``generate()``: the same
  floor measured where the fused path runs (the cache grows over the 50 steps, and ``generate()`` samples 3·B rows
  where the fused path samples B, so this floor slightly favours the fused path);
* ``split floor``: (forward of B rows + forward of 2·B rows) / forward of B rows: the floor for a
  ``LogitsProcessor``, which cannot merge its rows into the generator's forward;
* ``air-decoding / plain sampling``: the processor path's generate() time over plain sampling (and over the floors);
* ``serial baseline / air-decoding``: a processor that runs the K prefixes as K separate forwards per step (what the
  official code does) over the processor path (ratio > 1 means ours is faster);
* ``fused air-decoding / plain sampling``: the fused path's generate() time over plain sampling, and over the floor
  (the fused path runs exactly the floor's forward once per step);
* ``serial baseline / fused air-decoding``: the speed-up of the fused path over the serial K + 1 forwards;
* ``processor path / fused air-decoding``: what fusing saves over the processor path.

With ``--tiny`` the three paths are also checked to sample the same tokens under one seed, and nothing is appended
to ``results/air_decoding.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import interleaved_median, report  # noqa: E402

from hf_collapse.modeling.air_decoding import AirDecodingForCausalLM  # noqa: E402
from hf_collapse.modeling.attribute_prefixes import prefixed_positions  # noqa: E402
from hf_collapse.processors.air_decoding import AirDecodingLogitsProcessor  # noqa: E402
from hf_collapse.processors.attribute_prefix_model import AttributePrefixModel  # noqa: E402

SMOLLM2 = Path.home() / ".cache" / "hf_collapse" / "smollm2-135m"
NEW_TOKENS = 50
TINY_NEW_TOKENS = 8


@dataclass
class SerialState:
    """Decoding state of the serial schedule: one cache per attribute (B rows each)."""

    caches: list
    mask: torch.Tensor
    next_pos: torch.Tensor


class SerialAttributePrefixModel(AttributePrefixModel):
    """The official code's schedule: one forward per attribute per step, each with its own cache.

    It overrides the caller-owned-state API the processor uses (``begin`` / ``advance`` / ``reorder_state``). The
    benchmark's prefixes have no start token, so the start-token handling of ``AttributePrefixModel.begin`` is not
    needed here.
    """

    def begin(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long)
        caches, logits = [], []
        for k in range(self.num_attributes):
            out = self._one(k, input_ids, attention_mask, self.prefix_cache(b, attributes=[k]))
            caches.append(out.cache)
            logits.append(out.logits[0, :, -1])
        next_pos = prefixed_positions(attention_mask, self.prefix_length)[:, -1] + 1
        return torch.stack(logits), SerialState(caches, attention_mask, next_pos)

    def _one(self, k, ids, mask, cache, position_ids=None):
        # forward() with K=1: temporarily view a single attribute
        full = self.attributes
        self.attributes = [full[k]]
        try:
            return self.forward(ids, mask, cache=cache, position_ids=position_ids)
        finally:
            self.attributes = full

    def advance(self, state, tokens):
        state.mask = torch.cat([state.mask, state.mask.new_ones(state.mask.shape[0], 1)], 1)
        logits = []
        for k in range(self.num_attributes):
            out = self._one(k, tokens.view(-1, 1), state.mask, state.caches[k], position_ids=state.next_pos.view(-1, 1))
            logits.append(out.logits[0, :, -1])
        state.next_pos = state.next_pos + 1
        return torch.stack(logits)

    def reorder_state(self, state, rows):
        for cache in state.caches:
            cache.batch_select_indices(rows)
        state.mask = state.mask[rows]
        state.next_pos = state.next_pos[rows]


def load_model(tiny: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not tiny and (SMOLLM2 / "model.safetensors").is_file():
        return (
            "SmolLM2-135M",
            AutoModelForCausalLM.from_pretrained(SMOLLM2).eval(),
            AutoTokenizer.from_pretrained(SMOLLM2),
        )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return "tiny-random-llama", LlamaForCausalLM(cfg).eval(), None


def make_prefixes(model, path: str, num_virtual_tokens: int = 20) -> str:
    from hf_collapse.modeling.attribute_prefixes import AttributePrefixLM, peft_prefix_config, save_attribute_prefixes

    lm = AttributePrefixLM(model, ["positive", "negative"], peft_prefix_config(model, num_virtual_tokens))
    save_attribute_prefixes(lm, path)
    return path


def bench(b: int, name: str, model, tok, batched, serial, fused, a) -> None:
    """Time one batch size."""
    if tok is not None:
        ids = tok(["The movie"] * b, return_tensors="pt")["input_ids"]
    else:
        ids = torch.randint(3, 1000, (b, 2))
    kw = dict(do_sample=True, top_k=200, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, pad_token_id=0)

    def plain():
        return model.generate(input_ids=ids, **kw)

    ids3 = ids.repeat(3, 1)

    def plain_3b():  # plain sampling of 3B rows: the floor inside generate() (growing cache, sampling, bookkeeping)
        return model.generate(input_ids=ids3, **kw)

    def ours():
        return model.generate(
            input_ids=ids, logits_processor=[AirDecodingLogitsProcessor(batched, "positive", 140.0)], **kw
        )

    def official_schedule():
        return model.generate(
            input_ids=ids, logits_processor=[AirDecodingLogitsProcessor(serial, "positive", 140.0)], **kw
        )

    def fused_path():
        # the same generate() call, on the fused model: the processor reads the attribute logits of its forward
        return fused.generate(
            input_ids=ids, logits_processor=[AirDecodingLogitsProcessor(fused, "positive", 140.0)], **kw
        )

    if a.tiny:  # correctness smoke: the three schedules sample the same tokens under one seed
        samples = []
        for f in (ours, official_schedule, fused_path):
            torch.manual_seed(0)
            samples.append(f())
        same = all(torch.equal(samples[0], s) for s in samples[1:])
        print(f"  batch {b}: processor, serial and fused paths sample the same tokens: {same}")
        if not same:
            raise SystemExit("the three Air-Decoding schedules disagree")

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

    floor_repeats = a.repeats if a.tiny else max(a.repeats, 20)
    f3, f2, f1 = decode_forward(3 * b), decode_forward(2 * b), decode_forward(b)
    fl3, fl1 = interleaved_median(f3, f1, repeats=floor_repeats, warmup=3)
    # what a LogitsProcessor can reach: the generator's B-row forward and the attribute model's 2B-row forward
    # are two separate calls
    fl2, fl1b = interleaved_median(f2, f1, repeats=floor_repeats, warmup=3)
    floor, split_floor = fl3 / fl1, (fl2 + fl1b) / fl1b
    print(
        f"  floor (forward of {3 * b} rows / forward of {b} rows): {floor:.3f}x; split floor "
        f"(forward of {b} rows + forward of {2 * b} rows) / forward of {b} rows: {split_floor:.3f}x"
    )
    t_plain3, t_plain1 = interleaved_median(plain_3b, plain, repeats=a.repeats)
    generate_floor = t_plain3 / t_plain1
    print(f"  generate() floor (plain sampling of {3 * b} rows / of {b} rows): {generate_floor:.3f}x")
    if a.floor_only:
        return
    common = dict(model=name, batch=b, new_tokens=a.new_tokens)
    # processor path (unchanged measurements)
    t_ours, t_plain = interleaved_median(ours, plain, repeats=a.repeats)
    ratio = report("air_decoding", f"air-decoding / plain sampling (batch {b})", t_ours, t_plain, a.repeats,
                   a.threads, floor=floor, split_floor=split_floor, **common)  # fmt: skip
    print(f"  ours / floor = {ratio / floor:.3f}, ours / split floor = {ratio / split_floor:.3f}")
    t_serial, t_ours2 = interleaved_median(official_schedule, ours, repeats=a.repeats)
    report("air_decoding", f"serial baseline / air-decoding (batch {b})", t_serial, t_ours2, a.repeats, a.threads,
           **common)  # fmt: skip
    # fused path, in the same run
    t_fused, t_plain2 = interleaved_median(fused_path, plain, repeats=a.repeats)
    fused_ratio = report("air_decoding", f"fused air-decoding / plain sampling (batch {b})", t_fused, t_plain2,
                         a.repeats, a.threads, floor=floor, generate_floor=generate_floor, path="fused",
                         **common)  # fmt: skip
    print(f"  fused / floor = {fused_ratio / floor:.3f}, fused / generate() floor = {fused_ratio / generate_floor:.3f}")
    t_serial2, t_fused2 = interleaved_median(official_schedule, fused_path, repeats=a.repeats)
    report("air_decoding", f"serial baseline / fused air-decoding (batch {b})", t_serial2, t_fused2, a.repeats,
           a.threads, path="fused", **common)  # fmt: skip
    t_ours3, t_fused3 = interleaved_median(ours, fused_path, repeats=a.repeats)
    report("air_decoding", f"processor path / fused air-decoding (batch {b})", t_ours3, t_fused3, a.repeats,
           a.threads, path="fused", **common)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--floor-only", action="store_true", help="measure only the forward-time floors")
    ap.add_argument(
        "--tiny",
        action="store_true",
        help=f"smoke test: tiny random model, {TINY_NEW_TOKENS} new tokens, 1 repeat, P = 4, results not logged",
    )
    a = ap.parse_args()
    a.new_tokens = TINY_NEW_TOKENS if a.tiny else NEW_TOKENS
    if a.tiny:
        a.repeats = 1
        _common.RESULTS = Path(tempfile.mkdtemp(prefix="air_decoding_tiny_"))  # keep the real log clean
    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (or parallel work already started) in this process
        pass
    name, model, tok = load_model(tiny=a.tiny)
    print(f"model {name}, threads {a.threads}, {a.new_tokens} new tokens, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_prefixes(model, tmp, num_virtual_tokens=4 if a.tiny else 20)
        batched = AttributePrefixModel.from_pretrained(model, ckpt)
        serial = SerialAttributePrefixModel.from_pretrained(model, ckpt)
        fused = AirDecodingForCausalLM.from_base(model, ckpt)  # reads the prefixes now; the folder may go
    for b in [int(x) for x in a.batches.split(",")]:
        bench(b, name, model, tok, batched, serial, fused, a)


if __name__ == "__main__":
    main()
