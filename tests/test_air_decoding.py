"""AttributePrefixModel and AirDecodingLogitsProcessor: PEFT equivalence, a slow float64 reference, generate()."""

from __future__ import annotations

import math

import pytest
import torch
from air_decoding_utils import (
    VOCAB,
    assert_composed_scores_match_reference,
    assert_scores_match_reference,
    make_checkpoint,
    manual_prefixed_logits,
    tiny_gpt2,
    tiny_llama,
    tiny_tokenizer,
)
from transformers import LogitsProcessorList

from hf_collapse.processors.air_decoding import AirDecodingLogitsProcessor, WeightedDecodingLogitsProcessor
from hf_collapse.processors.attribute_prefix_model import AttributePrefixModel


@pytest.fixture(scope="module")
def gpt2_setup(tmp_path_factory):
    base = tiny_gpt2()
    ckpt = make_checkpoint(base, tmp_path_factory.mktemp("ckpt_gpt2"))
    return base, ckpt, AttributePrefixModel.from_pretrained(base, ckpt)


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory):
    base = tiny_llama()
    ckpt = make_checkpoint(base, tmp_path_factory.mktemp("ckpt_llama"))
    return base, ckpt, AttributePrefixModel.from_pretrained(base, ckpt)


def _ids(*texts: str) -> torch.Tensor:
    tok = tiny_tokenizer()
    return torch.tensor([tok(t)["input_ids"] for t in texts])


# ----------------------------------------------------------------------------------------------- prefixed forward
@pytest.mark.parametrize("setup", ["gpt2_setup", "llama_setup"])
def test_batched_prefixes_equal_peft_forward(setup, request):
    base, ckpt, am = request.getfixturevalue(setup)
    ids = _ids("the movie was great and", "i hated this film very")
    ours = am(ids).logits  # (K, B, T, V): all K prefixes in one batched forward
    assert ours.shape == (2, 2, ids.shape[1], VOCAB)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    for k, attr in enumerate(am.attributes):
        ref = manual_prefixed_logits(base, str(ckpt / attr), ids)
        torch.testing.assert_close(ours[k], ref, atol=1e-5, rtol=1e-5)
        # a silently dropped prefix would give the base model's logits
        assert (ours[k] - plain).abs().max() > 1e-2


@pytest.mark.parametrize("setup", ["gpt2_setup", "llama_setup"])
def test_incremental_steps_and_left_padding_match_full_forward(setup, request):
    _, _, am = request.getfixturevalue(setup)
    ids = _ids("the movie was great and it")
    full = am(ids).logits[:, 0]  # (K, T, V)
    # left-padded batch: row 0 padded by 3, row 1 unpadded; prompt = first 3 real tokens, then stepped token by token
    pad = torch.tensor([[1, 1, 1]])
    prompt = torch.cat([torch.cat([pad, ids[:, :3]], 1), ids[:, :6]], 0)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    am.reset()
    last = am.start(prompt, mask)
    torch.testing.assert_close(last[:, 0], full[:, 2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last[:, 1], full[:, 5], atol=1e-5, rtol=1e-5)
    for t in range(3, 6):
        step = am.step(torch.tensor([ids[0, t], 5]))
        torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
    am.reset()


# ----------------------------------------------------------------------------------------------- reference checks
def _generate(model, proc, prompt, mask, **kw):
    return model.generate(
        input_ids=prompt,
        attention_mask=mask,
        logits_processor=LogitsProcessorList([proc]),
        max_new_tokens=5,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=1,
        eos_token_id=None,
        **kw,
    )


@pytest.mark.parametrize(
    "method,normalize,strength",
    [("air", False, 10.0), ("air", True, 140.0), ("air", False, 140.0), ("weighted", False, 10.0)],
)
def test_greedy_matches_slow_reference(gpt2_setup, method, normalize, strength):
    base, ckpt, am = gpt2_setup
    cls = AirDecodingLogitsProcessor if method == "air" else WeightedDecodingLogitsProcessor
    prompt = _ids("the movie")
    mask = torch.ones_like(prompt)
    proc = cls(am, "positive", strength, prompt_attention_mask=mask, normalize=normalize)
    out = _generate(base, proc, prompt, mask, do_sample=False)
    assert_scores_match_reference(out, prompt, mask, base, ckpt, am.attributes, 0, strength, method, normalize)


def test_sampling_batch_left_padding_num_return_sequences(gpt2_setup):
    base, ckpt, am = gpt2_setup
    prompt = torch.tensor([[1, 1, 5, 6], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    proc = AirDecodingLogitsProcessor(am, "negative", 40.0, prompt_attention_mask=mask)
    out = _generate(base, proc, prompt, mask, do_sample=True, top_k=0, num_return_sequences=2)
    assert out.sequences.shape == (4, 9)
    assert_scores_match_reference(out, prompt, mask, base, ckpt, am.attributes, 1, 40.0, "air", False, n_ret=2)


def test_left_padded_row_generates_like_unpadded(gpt2_setup):
    base, _, am = gpt2_setup
    proc = AirDecodingLogitsProcessor(am, "positive", 140.0)
    alone = _generate(base, proc, torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long), do_sample=False)
    batch = torch.tensor([[1, 1, 5, 6], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    proc = AirDecodingLogitsProcessor(am, "positive", 140.0, prompt_attention_mask=mask)
    both = _generate(base, proc, batch, mask, do_sample=False)
    assert both.sequences[0, 4:].tolist() == alone.sequences[0, 2:].tolist()


def test_beam_search_reorders_history(gpt2_setup):
    base, ckpt, am = gpt2_setup
    prompt = _ids("the movie")
    proc = AirDecodingLogitsProcessor(am, "positive", 10.0)
    out = base.generate(
        input_ids=prompt,
        logits_processor=LogitsProcessorList([proc]),
        max_new_tokens=6,
        num_beams=3,
        do_sample=False,
        pad_token_id=1,
        eos_token_id=None,
    )
    assert out.shape == (1, 8)
    assert proc.reorders > 0
    # the processor's final state (rows = beams) must equal the reference history of each beam's own tokens
    t0 = prompt.shape[1]
    for r in range(proc._ids.shape[0]):
        seq = proc._ids[r]
        per_attr = [manual_prefixed_logits(base, str(ckpt / a), seq[None])[0] for a in am.attributes]
        hist = torch.zeros(2, dtype=torch.float64)
        for s, tok in enumerate(seq[t0:].tolist()):
            lp = torch.stack([torch.log_softmax(pa[t0 - 1 + s].double(), -1) for pa in per_attr])
            hist += -torch.log(-lp[:, tok])
        # at its last call the processor has added the weights of every generated token in that call's input_ids
        torch.testing.assert_close(proc._history[:, r].cpu(), hist, atol=1e-4, rtol=1e-5)


def test_llama_generation_with_smaller_attribute_model(llama_setup):
    _, _, am = llama_setup
    generator = tiny_gpt2(seed=3, n_layer=3)  # a different, larger model; same vocabulary
    prompt = _ids("the movie")
    proc = AirDecodingLogitsProcessor(am, "positive", 140.0)
    out = generator.generate(
        input_ids=prompt, logits_processor=[proc], max_new_tokens=4, do_sample=True, top_k=20, pad_token_id=1
    )
    assert prompt.shape[1] < out.shape[1] <= prompt.shape[1] + 4
    assert proc._ids is not None and proc._ids.shape[1] == out.shape[1] - 1  # ran on every step


def test_two_processors_compose_to_product_of_posteriors(gpt2_setup, tmp_path):
    base, _, am = gpt2_setup
    am2 = AttributePrefixModel.from_pretrained(
        base, make_checkpoint(base, tmp_path / "topic", ("sports", "science"), seed=7)
    )
    ids = _ids("the movie was")
    scores = torch.randn(1, VOCAB)
    p1 = AirDecodingLogitsProcessor(am, "positive", 3.0)
    p2 = AirDecodingLogitsProcessor(am2, "sports", 5.0)
    both = LogitsProcessorList([p1, p2])(ids, scores.clone())
    lp1 = p1.log_posterior(am.start(ids), torch.zeros(2, 1, dtype=torch.float64))[0]
    lp2 = p2.log_posterior(am2.start(ids), torch.zeros(2, 1, dtype=torch.float64))[0]
    expected = torch.log_softmax(torch.log_softmax(scores.double(), -1) + 3.0 * lp1 + 5.0 * lp2, -1)
    torch.testing.assert_close(torch.log_softmax(both.double(), -1), expected, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- robustness / errors
def test_bad_arguments_raise_clear_errors(gpt2_setup):
    _, _, am = gpt2_setup
    with pytest.raises(ValueError, match=r"unknown target attribute 'sports'.*positive.*negative"):
        AirDecodingLogitsProcessor(am, "sports", 1.0)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="strength"):
            AirDecodingLogitsProcessor(am, "positive", bad)
    proc = AirDecodingLogitsProcessor(am, "positive", 1.0, prompt_attention_mask=torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt_attention_mask"):
        proc(torch.tensor([[5, 6], [5, 6]]), torch.randn(2, VOCAB))
    proc = AirDecodingLogitsProcessor(am, "positive", 1.0)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        proc(torch.tensor([[5, 6]]), torch.randn(1, VOCAB + 3))


def test_consecutive_generate_calls_reuse_one_processor(gpt2_setup):
    base, _, am = gpt2_setup
    proc = AirDecodingLogitsProcessor(am, "positive", 10.0)
    kw = dict(logits_processor=[proc], max_new_tokens=3, do_sample=False, pad_token_id=1)
    first = base.generate(input_ids=_ids("the movie"), **kw)
    other = base.generate(input_ids=_ids("i hated this"), **kw)
    again = base.generate(input_ids=_ids("the movie"), **kw)
    assert again.tolist() == first.tolist()
    fresh = base.generate(input_ids=_ids("i hated this"), logits_processor=[AirDecodingLogitsProcessor(am, "positive",
                          10.0)], max_new_tokens=3, do_sample=False, pad_token_id=1)  # fmt: skip
    assert other.tolist() == fresh.tolist()


def test_text_generation_pipeline_with_several_prompts(gpt2_setup):
    from transformers import pipeline

    base, _, am = gpt2_setup
    tok = tiny_tokenizer()
    proc = AirDecodingLogitsProcessor(am, "positive", 10.0)
    pipe = pipeline("text-generation", model=base, tokenizer=tok)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=1)
    outs = pipe(["the movie", "i hated this"], logits_processor=LogitsProcessorList([proc]), **kw)
    for prompt, out in zip(["the movie", "i hated this"], outs):
        alone = base.generate(input_ids=_ids(prompt), logits_processor=[AirDecodingLogitsProcessor(am, "positive",
                              10.0)], **kw)  # fmt: skip
        assert out[0]["generated_text"].replace(" ", "") == tok.decode(alone[0]).replace(" ", "")


def test_processors_sharing_one_attribute_model_match_the_cache_free_reference(gpt2_setup):
    """Two targets of ONE AttributePrefixModel in one generate(): each processor keeps its own cache."""
    base, ckpt, am = gpt2_setup
    prompt = _ids("the movie")
    p_pos = AirDecodingLogitsProcessor(am, "positive", 3.0)
    p_neg = AirDecodingLogitsProcessor(am, "negative", 2.0)
    out = base.generate(input_ids=prompt, logits_processor=LogitsProcessorList([p_pos, p_neg]), max_new_tokens=4,
                        do_sample=False, output_scores=True, output_logits=True, return_dict_in_generate=True,
                        pad_token_id=1, eos_token_id=None)  # fmt: skip
    assert_composed_scores_match_reference(out, prompt.shape[1], base, ckpt, am.attributes, {0: 3.0, 1: 2.0})


def test_prompt_mask_must_match_the_batch(gpt2_setup):
    base, _, am = gpt2_setup
    two = torch.tensor([[5, 6, 7], [8, 9, 10]])
    proc = AirDecodingLogitsProcessor(am, "positive", 10.0, prompt_attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="2 different prompts"):
        proc(two, torch.randn(2, VOCAB))
    # copies of one prompt (num_return_sequences) may share its one-row mask
    AirDecodingLogitsProcessor(am, "positive", 10.0, prompt_attention_mask=torch.ones(1, 3, dtype=torch.long))(
        torch.tensor([[5, 6, 7], [5, 6, 7]]), torch.randn(2, VOCAB)
    )


def test_left_padded_batch_without_mask_raises(gpt2_setup):
    _, _, am = gpt2_setup
    padded = torch.tensor([[1, 1, 5], [5, 6, 7]])
    with pytest.raises(ValueError, match="left-padded"):
        AirDecodingLogitsProcessor(am, "positive", 10.0, pad_token_id=1)(padded, torch.randn(2, VOCAB))


def test_strength_is_bounded_and_safe_at_the_bound(gpt2_setup):
    base, _, am = gpt2_setup
    for bad in (1e300, 1e6 * 1.01):
        with pytest.raises(ValueError, match=r"strength must be a finite number in \[0, 1e\+06\]"):
            AirDecodingLogitsProcessor(am, "positive", bad)
    proc = AirDecodingLogitsProcessor(am, "positive", 1e6)
    out = base.generate(input_ids=_ids("the movie"), logits_processor=[proc], max_new_tokens=6, do_sample=True,
                        top_k=0, pad_token_id=1, eos_token_id=None)  # fmt: skip
    assert out.shape[1] == _ids("the movie").shape[1] + 6


@pytest.mark.parametrize("cls", [AirDecodingLogitsProcessor, WeightedDecodingLogitsProcessor])
def test_extreme_inputs_never_give_nan(gpt2_setup, cls):
    _, _, am = gpt2_setup
    ids = _ids("the movie")
    for strength in (0.0, 1.0, 140.0, 1e6):
        proc = cls(am, "positive", strength)
        scores = torch.randn(1, VOCAB)
        scores[0, 3] = float("nan")
        scores[0, 4] = float("-inf")
        scores[0, 5] = float("inf")
        out = proc(ids, scores)
        assert not torch.isnan(out).any()
        assert torch.isfinite(out).any()
        out = proc(torch.cat([ids, torch.tensor([[7]])], 1), torch.full((1, VOCAB), float("nan")))
        assert not torch.isnan(out).any()
    # attribute distributions with probabilities exactly 0 and 1
    proc = cls(am, "positive", 1e6)
    logits = torch.full((2, 1, VOCAB), -math.inf)
    logits[:, :, 7] = 0.0  # p = 1 for token 7 and p = 0 elsewhere, for both attributes
    logits[1, :, 8] = 0.0
    log_post, _ = proc.log_posterior(logits, torch.zeros(2, 1, dtype=torch.float64))
    assert not torch.isnan(log_post).any()
    out = torch.log_softmax(torch.randn(1, VOCAB).double(), -1) + 1e6 * log_post
    assert not torch.isnan(out).any()
