"""Shared helpers for the Air-Decoding tests: tiny in-process models, a word-level tokenizer, a toy dataset and a
slow float64 reference of the Air-Decoding / weighted-decoding formulas (written from the paper and the official
code, deliberately in probability space and without any cache)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "the a movie film was is great good wonderful fun bad awful boring terrible plot acting story very not and "
    "i it this loved hated team game won lost market stock price science study found new old"
).split()
SPECIALS = ["<eos>", "<pad>", "<unk>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    return tok


VOCAB = len(SPECIALS) + len(WORDS)


def tiny_gpt2(seed: int = 0, vocab_size: int = VOCAB, n_layer: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=128,
        n_embd=32,
        n_layer=n_layer,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,  # deterministic training steps
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0, vocab_size: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


POSITIVE = [
    "the movie was great",
    "i loved this film",
    "great acting and a wonderful story",
    "very good fun",
    "the plot was wonderful",
    "i loved the acting",
]
NEGATIVE = [
    "the movie was awful",
    "i hated this film",
    "terrible acting and a boring story",
    "very bad plot",
    "the story was boring",
    "i hated the acting",
]


def toy_dataset(n_repeat: int = 2):
    from datasets import Dataset

    texts = (POSITIVE + NEGATIVE) * n_repeat
    attrs = (["positive"] * len(POSITIVE) + ["negative"] * len(NEGATIVE)) * n_repeat
    return Dataset.from_dict({"text": texts, "attribute": attrs})


# ---------------------------------------------------------------------------------------------------------------
# slow reference
def reference_processed_scores(
    lm_logits: torch.Tensor,
    attr_logits_per_step: list[torch.Tensor],
    generated: list[int],
    target: int,
    strength: float,
    method: str = "air",
    normalize: bool = False,
) -> torch.Tensor:
    """Log of q(x) ∝ P_LM(x) · P(c_T | x, history)^λ for ONE row at one step, in plain float64 probability space.

    ``attr_logits_per_step[s]`` are the K attribute logits ``(K, V)`` at generated step ``s`` (0 = right after the
    prompt), ``generated`` are the tokens chosen at steps ``0 .. s-1``; the last entry of
    ``attr_logits_per_step`` is the current step. Official code: w_i = -1/log p_i (not normalised);
    H_i = prod_s w_i(x_s); P(c_T|x) = w_T H_T / sum_i w_i H_i; q ∝ softmax(lm) · P^λ.
    """

    def weights(logits: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits.double(), dim=-1)
        if method == "weighted":
            return p
        w = -1.0 / torch.log(p)
        if normalize:
            w = w / w.sum(-1, keepdim=True)
        return w

    k = attr_logits_per_step[-1].shape[0]
    hist = torch.ones(k, dtype=torch.float64)
    for s, tok in enumerate(generated):
        hist = hist * weights(attr_logits_per_step[s])[:, tok]
    w = weights(attr_logits_per_step[-1])  # (K, V)
    joint = w * hist[:, None]
    post = joint[target] / joint.sum(0)
    q = torch.softmax(lm_logits.double(), -1) * post**strength
    return torch.log(q / q.sum())


def manual_prefixed_logits(base, adapter_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``PeftModel.from_pretrained(base, adapter_dir)`` with ``use_cache=False`` (PEFT's own forward)."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(base, adapter_dir)
    with torch.no_grad():
        return pm(input_ids=input_ids, use_cache=False).logits


def make_checkpoint(base, path, attributes=("positive", "negative"), num_virtual_tokens: int = 4, seed: int = 1):
    """An attribute-prefix checkpoint with PEFT's random prefix init (no training): strong, distinct prefixes."""
    from hf_collapse.modeling.attribute_prefixes import AttributePrefixLM, peft_prefix_config, save_attribute_prefixes

    torch.manual_seed(seed)
    cfg = peft_prefix_config(base, num_virtual_tokens, encoder_hidden_size=16)
    save_attribute_prefixes(AttributePrefixLM(base, list(attributes), cfg), path)
    return path


def make_start_token_checkpoint(base, path, start_token_id: int = 0, num_virtual_tokens: int = 4, seed: int = 1):
    """Like :func:`make_checkpoint`, with the start token the trainer records (``[eos] + text`` conditioning)."""
    from hf_collapse.modeling.attribute_prefixes import AttributePrefixLM, peft_prefix_config, save_attribute_prefixes

    torch.manual_seed(seed)
    cfg = peft_prefix_config(base, num_virtual_tokens, encoder_hidden_size=16)
    lm = AttributePrefixLM(base, ["positive", "negative"], cfg)
    save_attribute_prefixes(lm, path, extra_index={"start_token_id": start_token_id})
    return path


# ---------------------------------------------------------------------------------------------------------------
# generate() helpers shared by the processor-path and fused-path tests
def generate_steered(model, processors, prompt: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int = 5, **kw):
    """``model.generate`` with the given logits processors, returning scores, raw logits and sequences."""
    from transformers import LogitsProcessorList

    procs = processors if isinstance(processors, (list, tuple)) else [processors]
    return model.generate(
        input_ids=prompt,
        attention_mask=mask,
        logits_processor=LogitsProcessorList(procs),
        max_new_tokens=max_new_tokens,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=1,
        eos_token_id=None,
        **kw,
    )


def assert_same_steered_output(ours, theirs, atol: float = 1e-4, rtol: float = 1e-5) -> float:
    """Same sequences; processed scores (as log-distributions) and raw logits equal to tolerance. Returns the largest
    score difference seen (finite entries)."""
    assert torch.equal(ours.sequences, theirs.sequences), (ours.sequences, theirs.sequences)
    assert len(ours.scores) == len(theirs.scores)
    worst = 0.0
    for a, b in zip(ours.scores, theirs.scores):
        la, lb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
        torch.testing.assert_close(la, lb, atol=atol, rtol=rtol)
        finite = torch.isfinite(la) & torch.isfinite(lb)
        worst = max(worst, (la - lb)[finite].abs().max().item())
    for a, b in zip(ours.logits, theirs.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    return worst


def assert_scores_match_reference(
    out, prompt, prompt_mask, base, ckpt, attributes, target, strength, method="air", normalize=False, n_ret=1
) -> None:
    """Recompute every processed step of every returned row of a non-beam ``generate()`` with the slow float64
    reference (PEFT's own forward for the attribute logits, no cache)."""
    t0 = prompt.shape[1]
    seqs = out.sequences
    prompt_mask = prompt_mask.repeat_interleave(n_ret, 0)
    for r in range(seqs.shape[0]):
        real = seqs[r, :t0][prompt_mask[r].bool()]
        gen = seqs[r, t0:].tolist()
        per_attr = [
            manual_prefixed_logits(base, str(ckpt / a), torch.cat([real, seqs[r, t0:]])[None])[0] for a in attributes
        ]
        attr_steps = [torch.stack([pa[len(real) - 1 + s] for pa in per_attr]) for s in range(len(gen))]
        for s in range(len(gen)):
            ref = reference_processed_scores(
                out.logits[s][r], attr_steps[: s + 1], gen[:s], target, strength, method, normalize
            )
            ours = torch.log_softmax(out.scores[s][r].double(), -1)
            ok = ref > -600  # beyond that the reference's P^λ itself underflows in float64
            torch.testing.assert_close(ours[ok], ref[ok], atol=2e-3, rtol=1e-4)


def assert_composed_scores_match_reference(out, t0: int, base, ckpt, attributes, strengths: dict[int, float]) -> None:
    """Processors for several targets of one attribute-prefix set composed in one greedy ``generate()`` (row 0):
    every step's scores equal ``log_softmax(lm) + sum_k λ_k log P(c_k | x, history)`` from the float64 reference."""
    seq = out.sequences[0]
    per_attr = [manual_prefixed_logits(base, str(ckpt / a), seq[None])[0] for a in attributes]
    gen = seq[t0:].tolist()
    vocab = out.logits[0].shape[-1]
    for s in range(len(gen)):
        steps = [torch.stack([pa[t0 - 1 + j] for pa in per_attr]) for j in range(s + 1)]
        expected = torch.log_softmax(out.logits[s][0].double(), -1)
        for k, strength in strengths.items():  # log P(c_k | ...) is the reference at λ = 1 on a flat LM
            expected = expected + strength * reference_processed_scores(torch.zeros(vocab), steps, gen[:s], k, 1.0)
        expected = torch.log_softmax(expected, -1)  # log P^λ is known up to a constant
        torch.testing.assert_close(torch.log_softmax(out.scores[s][0].double(), -1), expected, atol=2e-3, rtol=1e-4)


def reference_history(base, ckpt, attributes, seq: torch.Tensor, t0: int) -> torch.Tensor:
    """The Air-Decoding history ``(K,)`` (sum of log w at the generated tokens) of one unpadded sequence."""
    per_attr = [manual_prefixed_logits(base, str(ckpt / a), seq[None])[0] for a in attributes]
    hist = torch.zeros(len(attributes), dtype=torch.float64)
    for s, tok in enumerate(seq[t0:].tolist()):
        lp = torch.stack([torch.log_softmax(pa[t0 - 1 + s].double(), -1) for pa in per_attr])
        hist += -torch.log(-lp[:, tok])
    return hist
