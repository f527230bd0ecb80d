"""Fused Air-Decoding (AirDecodingForCausalLM): one forward of (K+1)·B rows per step, same scores as the processor
path (AttributePrefixModel) and as the slow float64 reference, in every generate() mode."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from air_decoding_utils import (
    VOCAB,
    assert_composed_scores_match_reference,
    assert_same_steered_output,
    assert_scores_match_reference,
    generate_steered,
    make_checkpoint,
    make_start_token_checkpoint,
    manual_prefixed_logits,
    reference_history,
    tiny_gpt2,
    tiny_llama,
    tiny_tokenizer,
)
from transformers import AutoModelForCausalLM, DynamicCache

import hf_collapse
from hf_collapse.modeling.air_decoding import AirDecodingCache, AirDecodingConfig, AirDecodingForCausalLM
from hf_collapse.processors.air_decoding import AirDecodingLogitsProcessor, WeightedDecodingLogitsProcessor
from hf_collapse.processors.attribute_prefix_model import AttributePrefixModel

# a left-padded batch: row 0 has two pads
PADDED = torch.tensor([[1, 1, 5, 6], [5, 6, 7, 8]])
PADDED_MASK = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])


def _setup(base, path):
    ckpt = make_checkpoint(base, path)
    return base, ckpt, AttributePrefixModel.from_pretrained(base, ckpt), AirDecodingForCausalLM.from_base(base, ckpt)


@pytest.fixture(scope="module")
def gpt2_setup(tmp_path_factory):
    return _setup(tiny_gpt2(), tmp_path_factory.mktemp("fused_gpt2"))


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory):
    return _setup(tiny_llama(), tmp_path_factory.mktemp("fused_llama"))


SETUPS = ["gpt2_setup", "llama_setup"]  # absolute positions; RoPE + GQA


def _both_paths(setup, cls, target, strength, prompt, mask, seed=None, **kw):
    """The same generate() call on the fused path and on the processor path (processors kept for inspection)."""
    base, _, am, fused = setup
    runs = []
    for model, attribute_model in ((fused, fused), (base, am)):
        proc = cls(attribute_model, target, strength, prompt_attention_mask=mask)
        if seed is not None:
            torch.manual_seed(seed)
        runs.append((generate_steered(model, proc, prompt, mask, **kw), proc))
    return runs


# ----------------------------------------------------------------------------------------------- the fused forward
@pytest.mark.parametrize("setup", SETUPS)
def test_fused_forward_gives_base_logits_and_prefixed_logits(setup, request):
    """Generator rows: the plain base model's logits (the masked prefix slots change nothing); prefix rows: PEFT's."""
    base, ckpt, _, fused = request.getfixturevalue(setup)
    steps = torch.tensor([[9, 10], [11, 12], [13, 14]])  # three decoding steps, one token per row each
    full = torch.cat([PADDED, steps.T], 1)  # (2, 7)
    full_mask = torch.cat([PADDED_MASK, torch.ones(2, 3, dtype=torch.long)], 1)
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)  # generate()'s positions
    with torch.no_grad():
        plain = base(input_ids=full, attention_mask=full_mask, position_ids=positions).logits  # (2, 7, V)
        out = fused(PADDED, attention_mask=PADDED_MASK)
        assert isinstance(out.cache, AirDecodingCache) and out.cache.get_seq_length() == 4 + 4  # P + prompt
        gen = [out.logits[:, -1]]
        attr = [fused._step.logits]
        for s in range(3):
            out = fused(steps[s][:, None], attention_mask=full_mask[:, : 5 + s], cache=out.cache)
            gen.append(out.logits[:, -1])
            attr.append(fused._step.logits)
    real = PADDED_MASK.bool()
    with torch.no_grad():
        first = fused(PADDED, attention_mask=PADDED_MASK).logits
    torch.testing.assert_close(first[real], plain[:, :4][real], atol=1e-5, rtol=1e-5)
    for s in range(4):
        torch.testing.assert_close(gen[s], plain[:, 3 + s], atol=1e-5, rtol=1e-5)
    # attribute logits (K, B, V) at every step equal PEFT's own forward on each row's real tokens
    for b in range(2):
        seq = full[b][full_mask[b].bool()]
        start = int(real[b].sum()) - 1
        for k, a in enumerate(fused.attributes):
            ref = manual_prefixed_logits(base, str(ckpt / a), seq[None])[0]
            for s in range(4):
                torch.testing.assert_close(attr[s][k, b], ref[start + s], atol=1e-5, rtol=1e-5)
            assert (attr[0][k, b] - gen[0][b]).abs().max() > 1e-2  # the prefix does act


def test_cache_batch_operations_act_on_every_group(gpt2_setup):
    _, _, _, fused = gpt2_setup
    with torch.no_grad():
        cache = fused(PADDED, attention_mask=PADDED_MASK).cache
    keys = cache.layers[0].keys.clone()  # ((K+1)·B, H, P+T, hd) = (6, ...)
    groups = keys.view(3, 2, *keys.shape[1:])  # (K+1, B, ...)
    cache.batch_repeat_interleave(2)
    assert cache.group_batch_size == 4
    torch.testing.assert_close(cache.layers[0].keys.view(3, 4, *keys.shape[1:]), groups.repeat_interleave(2, 1))
    cache.reorder_cache(torch.tensor([3, 2, 1, 0]))
    torch.testing.assert_close(cache.layers[0].keys.view(3, 4, *keys.shape[1:]), groups.flip(1).repeat_interleave(2, 1))
    cache.batch_select_indices(torch.tensor([0]))
    assert cache.group_batch_size == 1
    torch.testing.assert_close(cache.layers[0].keys.view(3, 1, *keys.shape[1:]), groups[:, 1:2])


# ----------------------------------------------------------------------------------------------- generate() modes
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("method,strength", [("air", 140.0), ("weighted", 10.0)])
def test_greedy_equals_processor_path_and_reference(setup, method, strength, request):
    s = request.getfixturevalue(setup)
    base, ckpt, am, _ = s
    cls = AirDecodingLogitsProcessor if method == "air" else WeightedDecodingLogitsProcessor
    prompt = torch.tensor([[5, 6]])
    mask = torch.ones_like(prompt)
    (fused_out, _), (proc_out, _) = _both_paths(s, cls, "positive", strength, prompt, mask, do_sample=False)
    assert_same_steered_output(fused_out, proc_out)
    assert_scores_match_reference(fused_out, prompt, mask, base, ckpt, am.attributes, 0, strength, method)


@pytest.mark.parametrize("setup", SETUPS)
def test_sampling_left_padding_num_return_sequences(setup, request):
    """Same seed -> identical samples on both paths; every processed step matches the float64 reference."""
    s = request.getfixturevalue(setup)
    base, ckpt, am, _ = s
    runs = _both_paths(
        s, AirDecodingLogitsProcessor, "negative", 40.0, PADDED, PADDED_MASK, seed=0,
        do_sample=True, top_k=0, num_return_sequences=2,
    )  # fmt: skip
    (fused_out, _), (proc_out, _) = runs
    assert fused_out.sequences.shape == (4, 9)
    assert_same_steered_output(fused_out, proc_out)
    assert_scores_match_reference(fused_out, PADDED, PADDED_MASK, base, ckpt, am.attributes, 1, 40.0, n_ret=2)


def test_left_padded_greedy_batch_matches_reference(llama_setup):
    base, ckpt, am, fused = llama_setup
    proc = AirDecodingLogitsProcessor(fused, "positive", 140.0)  # no prompt mask needed on the fused path
    out = generate_steered(fused, proc, PADDED, PADDED_MASK, do_sample=False)
    assert_scores_match_reference(out, PADDED, PADDED_MASK, base, ckpt, am.attributes, 0, 140.0)


@pytest.mark.parametrize("setup", SETUPS)
def test_beam_search_reorders_every_row_group(setup, request):
    s = request.getfixturevalue(setup)
    base, ckpt, am, _ = s
    prompt = torch.tensor([[5, 6]])
    runs = _both_paths(s, AirDecodingLogitsProcessor, "positive", 10.0, prompt, None, max_new_tokens=6, num_beams=3,
                       do_sample=False)  # fmt: skip
    (fused_out, fused_proc), (proc_out, _) = runs
    assert_same_steered_output(fused_out, proc_out)
    assert fused_proc.reorders > 0
    # the fused processor's final rows (= beams) carry the history of each beam's own tokens
    for r in range(fused_proc._ids.shape[0]):
        hist = reference_history(base, ckpt, am.attributes, fused_proc._ids[r], prompt.shape[1])
        torch.testing.assert_close(fused_proc._history[:, r].cpu(), hist, atol=1e-4, rtol=1e-5)


def test_without_cache_equals_with_cache(gpt2_setup):
    _, _, _, fused = gpt2_setup
    outs = [
        generate_steered(fused, AirDecodingLogitsProcessor(fused, "positive", 40.0), PADDED, PADDED_MASK,
                         do_sample=False, use_cache=use_cache)
        for use_cache in (True, False)
    ]  # fmt: skip
    assert_same_steered_output(*outs)


def test_two_processors_over_one_fused_model_compose(gpt2_setup):
    base, ckpt, am, fused = gpt2_setup
    prompt = torch.tensor([[5, 6]])
    outs = []
    for model, attribute_model in ((fused, fused), (base, am)):
        procs = [
            AirDecodingLogitsProcessor(attribute_model, "positive", 3.0),
            AirDecodingLogitsProcessor(attribute_model, "negative", 2.0),
        ]
        outs.append(generate_steered(model, procs, prompt, None, max_new_tokens=4, do_sample=False))
    assert_same_steered_output(*outs)
    assert_composed_scores_match_reference(outs[0], prompt.shape[1], base, ckpt, am.attributes, {0: 3.0, 1: 2.0})


def test_text_generation_pipeline_over_the_fused_model(gpt2_setup):
    from transformers import pipeline

    _, _, _, fused = gpt2_setup
    tok = tiny_tokenizer()
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=1)
    pipe = pipeline("text-generation", model=fused, tokenizer=tok)
    prompts = ["the movie", "i hated this"]
    outs = pipe(prompts, logits_processor=[AirDecodingLogitsProcessor(fused, "positive", 10.0)], **kw)
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        alone = fused.generate(input_ids=ids, logits_processor=[AirDecodingLogitsProcessor(fused, "positive", 10.0)],
                               **kw)  # fmt: skip
        assert out[0]["generated_text"].replace(" ", "") == tok.decode(alone[0]).replace(" ", "")


# ----------------------------------------------------------------------------------------------- start token
@pytest.fixture(scope="module", params=["gpt2", "llama"])
def start_setup(request, tmp_path_factory):
    base = tiny_gpt2() if request.param == "gpt2" else tiny_llama()
    ckpt = make_start_token_checkpoint(base, tmp_path_factory.mktemp(f"start_{request.param}"), start_token_id=0)
    return base, ckpt, AttributePrefixModel.from_pretrained(base, ckpt), AirDecodingForCausalLM.from_base(base, ckpt)


def test_start_token_is_baked_in_like_the_processor_path(start_setup):
    """The recorded start token sits in the prefix slots; a prompt's own copy is hidden from the prefix rows only."""
    base, ckpt, am, fused = start_setup
    assert fused.prefix_length == am.prefix_length == fused.num_virtual_tokens + 1
    with torch.no_grad():
        fused(torch.tensor([[5, 6]]))
        bare = fused._step.logits
        fused(torch.tensor([[0, 5, 6]]))
        own = fused._step.logits
    torch.testing.assert_close(own, bare, atol=1e-5, rtol=1e-5)  # not read twice
    with torch.no_grad():
        cache = fused(torch.tensor([[0, 5], [5, 6]])).cache
    assert cache.start_columns.tolist() == [0, -1]  # the hidden column of each input row ...
    cache.reorder_cache(torch.tensor([1, 0]))
    assert cache.start_columns.tolist() == [-1, 0]  # ... follows its row
    for k, a in enumerate(fused.attributes):  # = PEFT's forward on [start] + prompt
        ref = manual_prefixed_logits(base, str(ckpt / a), torch.tensor([[0, 5, 6]]))[0, -1]
        torch.testing.assert_close(bare[k, 0], ref, atol=1e-5, rtol=1e-5)
    # rows with their own start token (one left-padded), and one without, in every generate() mode
    prompt = torch.tensor([[0, 5, 6, 7], [1, 1, 0, 8], [1, 5, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    s = (base, ckpt, am, fused)
    for kw in (dict(do_sample=False), dict(do_sample=True, top_k=0, num_return_sequences=2)):
        (fused_out, _), (proc_out, _) = _both_paths(s, AirDecodingLogitsProcessor, "positive", 40.0, prompt, mask,
                                                    seed=0, **kw)  # fmt: skip
        assert_same_steered_output(fused_out, proc_out)
    (fused_out, fused_proc), (proc_out, _) = _both_paths(
        s, AirDecodingLogitsProcessor, "negative", 10.0, prompt[1:2], mask[1:2], max_new_tokens=6, num_beams=3,
        do_sample=False,
    )  # fmt: skip
    assert_same_steered_output(fused_out, proc_out)
    assert fused_proc.reorders > 0


# ----------------------------------------------------------------------------------------------- saving and loading
@pytest.mark.parametrize("prefixes_inside", [True, False])
def test_save_writes_only_a_config_and_auto_class_loads_it(gpt2_setup, tmp_path, prefixes_inside):
    base, ckpt, _, fused = gpt2_setup
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    out_dir = tmp_path / "fused"
    prefixes = out_dir / "prefixes" if prefixes_inside else ckpt
    if prefixes_inside:
        shutil.copytree(ckpt, prefixes)
    model = AirDecodingForCausalLM.from_base(base, prefixes, base_model_name_or_path=str(base_dir))
    model.save_pretrained(out_dir)
    top = sorted(p.name for p in out_dir.iterdir())
    assert top == (["README.md", "config.json", "prefixes"] if prefixes_inside else ["README.md", "config.json"])
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["model_type"] == "air_decoding" and cfg["architectures"] == ["AirDecodingForCausalLM"]
    assert cfg["prefixes"] == ("prefixes" if prefixes_inside else str(ckpt))
    if prefixes_inside:  # a relative pointer: the folder can be moved as a whole
        moved = tmp_path / "moved"
        shutil.move(str(out_dir), str(moved))
        out_dir = moved
    loaded = AutoModelForCausalLM.from_pretrained(out_dir)
    assert type(loaded) is AirDecodingForCausalLM and isinstance(loaded.config, AirDecodingConfig)
    assert loaded.attributes == fused.attributes and loaded.num_virtual_tokens == fused.num_virtual_tokens
    assert hf_collapse.AirDecodingForCausalLM is AirDecodingForCausalLM
    runs = [
        generate_steered(m, AirDecodingLogitsProcessor(m, "positive", 140.0), PADDED, PADDED_MASK, do_sample=False)
        for m in (fused, loaded)
    ]
    assert_same_steered_output(*runs)


def _hub_cache(ckpt, cache_dir, repo_id="org/prefixes", refs=("main", "v1")):
    """A Hugging Face Hub cache holding ``ckpt`` as ``repo_id``, laid out as ``huggingface_hub`` writes it, so the
    real ``snapshot_download(local_files_only=True)`` finds it with no network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(ckpt, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


def test_prefixes_load_from_a_hub_repository_id(gpt2_setup, tmp_path):
    base, ckpt, attr, fused = gpt2_setup
    snapshot = _hub_cache(ckpt, tmp_path / "hub")
    hub = {"cache_dir": str(tmp_path / "hub"), "local_files_only": True}
    from_hub = AttributePrefixModel.from_pretrained(base, "org/prefixes", revision="v1", **hub)
    assert from_hub.attributes == attr.attributes
    held = dict(attr.named_buffers())
    for name, buf in from_hub.named_buffers():  # the per-layer prefix keys/values, exactly
        if name.startswith("prefix_"):
            torch.testing.assert_close(buf, held[name], rtol=0, atol=0)
    # the fused model records the repository id and revision, never the cache path, so a saved folder travels
    model = AirDecodingForCausalLM.from_base(base, "org/prefixes", revision="v1", **hub)
    assert model.prefixes_dir == snapshot
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    model.config.base_model_name_or_path = str(base_dir)
    model.save_pretrained(tmp_path / "fused")
    cfg = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert cfg["prefixes"] == "org/prefixes" and cfg["prefixes_revision"] == "v1"
    loaded = AirDecodingForCausalLM.from_pretrained(tmp_path / "fused", **hub)
    assert loaded.prefixes_dir == snapshot and loaded.prefixes_repo_id == "org/prefixes"
    runs = [
        generate_steered(m, AirDecodingLogitsProcessor(m, "positive", 140.0), PADDED, PADDED_MASK, do_sample=False)
        for m in (fused, loaded)
    ]
    assert_same_steered_output(*runs)
    # a local checkpoint saved beside it records a path and no revision
    local = AirDecodingForCausalLM.from_base(base, ckpt, base_model_name_or_path=str(base_dir))
    local.save_pretrained(tmp_path / "fused_local")
    cfg = json.loads((tmp_path / "fused_local" / "config.json").read_text())
    assert cfg["prefixes"] == str(ckpt) and cfg.get("prefixes_revision") is None


def test_missing_prefixes_name_what_was_tried(gpt2_setup, tmp_path):
    base = gpt2_setup[0]
    hub = {"cache_dir": str(tmp_path / "hub"), "local_files_only": True}
    with pytest.raises(FileNotFoundError, match=r"'org/missing' is not a local folder, and fetching it from the Hub"):
        AttributePrefixModel.from_pretrained(base, "org/missing", **hub)
    with pytest.raises(FileNotFoundError, match=r"not a folder, and not a valid Hub repository id"):
        AttributePrefixModel.from_pretrained(base, str(tmp_path / "no" / "such" / "prefixes"), **hub)
    with pytest.raises(FileNotFoundError, match="fetching it from the Hub failed"):
        AirDecodingForCausalLM.from_base(base, "org/missing", **hub)
    _hub_cache(gpt2_setup[1], tmp_path / "hub", refs=("main",))
    with pytest.raises(FileNotFoundError, match="fetching it from the Hub failed"):  # no such revision cached
        AttributePrefixModel.from_pretrained(base, "org/prefixes", revision="v2", **hub)


# ----------------------------------------------------------------------------------------------- errors
def test_fused_model_as_guide_of_another_generator_raises(gpt2_setup):
    base, _, _, fused = gpt2_setup
    prompt = torch.tensor([[5, 6]])
    for generator in (base, tiny_gpt2(seed=3, n_layer=3)):
        proc = AirDecodingLogitsProcessor(fused, "positive", 10.0)
        with pytest.raises(RuntimeError, match=r"only works inside fused_model.generate.*AttributePrefixModel"):
            generate_steered(generator, proc, prompt, None, do_sample=False)
    # even right after a fused generate() of the same prompt: its logits do not outlive that call
    generate_steered(fused, AirDecodingLogitsProcessor(fused, "positive", 10.0), prompt, None, do_sample=False)
    with pytest.raises(RuntimeError, match="AttributePrefixModel"):
        generate_steered(base, AirDecodingLogitsProcessor(fused, "positive", 10.0), prompt, None, do_sample=False)
    # a forward run by hand for other tokens is not this step either
    with torch.no_grad():
        fused(torch.tensor([[7, 8]]))
    with pytest.raises(RuntimeError, match="not for this step"):
        AirDecodingLogitsProcessor(fused, "positive", 10.0)(prompt, torch.randn(1, VOCAB))


def test_prefixes_of_another_model_are_refused(gpt2_setup, llama_setup):
    gpt2 = gpt2_setup[0]
    llama_ckpt = llama_setup[1]
    with pytest.raises(ValueError, match=r"trained for another model.*same base model.*AttributePrefixModel"):
        AirDecodingForCausalLM.from_base(gpt2, llama_ckpt)


def test_foreign_cache_is_refused(gpt2_setup):
    _, _, _, fused = gpt2_setup
    with pytest.raises(TypeError, match="AirDecodingCache"):
        fused(torch.tensor([[5, 6]]), cache=DynamicCache())
    with pytest.raises(TypeError, match="needs its own cache"):
        fused.generate(input_ids=torch.tensor([[5, 6]]), cache=DynamicCache(), max_new_tokens=2, pad_token_id=1)


def test_config_typo_gets_a_suggestion():
    from hf_collapse import AirDecodingConfig

    with pytest.raises(TypeError, match="did you mean 'prefixes'"):
        AirDecodingConfig(prefixs="x")
