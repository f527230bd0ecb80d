"""RobustMamba2: parity with transformers' Mamba2ForCausalLM, mitigations vs a float64 reference, loading, helpers.

Three modes are checked everywhere: one forward over the whole input, segmented forward (small
``max_segment_length`` and chained calls through ``cache=``), and token-by-token decoding with the cache.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from reference_mamba2 import TINY, reference_logits
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, Mamba2Config, Mamba2ForCausalLM

import hf_collapse
from hf_collapse import (
    RobustMamba2Config,
    RobustMamba2ForCausalLM,
    RobustMamba2Model,
    calibrate_state_norms,
    convert_mamba_ssm_checkpoint,
    recommended_training_length,
)
from hf_collapse.modeling.robust_mamba2 import (
    DECAY_SCALE_CANDIDATES,
    RobustMamba2Cache,
    RobustMamba2CacheLayer,
    calibrate_decay_scales,
    first_token_memory,
    mamba_ssm_config_to_robust,
    resolve_kernels,
)

torch.set_num_threads(1)

# TINY (reference_mamba2) has n_groups > 1; T is not a multiple of its chunk_size
T = 37
SPLITS = [0, 3, 11, 12, 30, T]  # chained calls: odd sizes, one single-token call in the middle
PREFILL = 5
TOL = 1e-4


def _ids(batch=2, length=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY["vocab_size"], (batch, length), generator=g)


def _robust(**mitigations):
    torch.manual_seed(0)
    return RobustMamba2ForCausalLM(RobustMamba2Config(**TINY, **mitigations)).eval()


@torch.no_grad()
def _single(model, ids):
    return model(ids, use_cache=True).logits


@torch.no_grad()
def _segmented(model, ids):
    """Internal segments of 7 tokens, then chained calls through the cache; both must agree with the reference."""
    saved = model.config.max_segment_length
    model.config.max_segment_length = 7
    try:
        internal = model(ids).logits
    finally:
        model.config.max_segment_length = saved
    cache, parts = None, []
    for a, e in zip(SPLITS[:-1], SPLITS[1:]):
        out = model(ids[:, a:e], cache=cache, use_cache=True)
        cache = out.cache
        parts.append(out.logits)
    return internal, torch.cat(parts, dim=1)


@torch.no_grad()
def _decoded(model, ids):
    out = model(ids[:, :PREFILL], use_cache=True)
    cache, parts = out.cache, [out.logits]
    for t in range(PREFILL, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        parts.append(out.logits)
    return torch.cat(parts, dim=1)


def _all_modes(model, ids):
    internal, chained = _segmented(model, ids)
    return {"single": _single(model, ids), "segmented": internal, "chained": chained, "decoding": _decoded(model, ids)}


# ----------------------------------------------------------------------------------------------------------------
# parity with transformers (mitigations off)
# ----------------------------------------------------------------------------------------------------------------


def test_parity_with_transformers_all_modes():
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(Mamba2Config(**TINY)).eval()
    ours = RobustMamba2ForCausalLM.from_mamba2(hf)
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
        hf_cache_out = hf(ids[:, :PREFILL], use_cache=True)
        hf_steps = [hf_cache_out.logits]
        for t in range(PREFILL, T):
            hf_steps.append(hf(ids[:, t : t + 1], cache=hf_cache_out.cache, use_cache=True).logits)
        assert torch.allclose(torch.cat(hf_steps, 1), expected, atol=TOL)  # transformers agrees with itself
        assert torch.allclose(ours(ids).logits, expected, atol=TOL)  # no cache, no mitigations
    for mode, logits in _all_modes(ours, ids).items():
        assert logits.shape == expected.shape, mode
        assert (logits - expected).abs().max() < TOL, mode


def test_weight_names_identical_to_mamba2():
    hf = Mamba2ForCausalLM(Mamba2Config(**TINY))
    assert list(hf.state_dict()) == list(_robust().state_dict())


# ----------------------------------------------------------------------------------------------------------------
# mitigations vs the float64 reference
# ----------------------------------------------------------------------------------------------------------------

MITIGATIONS = {
    "insertion_scale": dict(insertion_scale=0.4),
    "decay_scale": dict(decay_scale=3.0),
    "state_norm_max": dict(state_norm_max=0.002, state_norm_every=5),
    "state_norm_max-per-head": dict(
        state_norm_max=[[0.001, 0.002, 1e3, 0.0005], [0.0005, 0.001, 0.0002, 1e3]], state_norm_every=4
    ),
    "sliding_window": dict(sliding_window=6),
    "scales+state_norm_max": dict(insertion_scale=0.6, decay_scale=1.5, state_norm_max=0.001, state_norm_every=5),
    "scales+sliding_window": dict(insertion_scale=0.6, decay_scale=1.5, sliding_window=5),
    # per-head forgetting: one decay_scale per (layer, head), some heads left at 1
    "decay_scale-per-head": dict(decay_scale=[[1.0, 4.0, 0.5, 2.5], [3.0, 1.0, 1.5, 6.0]]),
    "decay_scale-per-head+sliding_window": dict(
        decay_scale=[[1.0, 4.0, 0.5, 2.5], [3.0, 1.0, 1.5, 6.0]], sliding_window=5
    ),
    "decay_scale-per-head+state_norm_max": dict(
        decay_scale=[[2.0, 1.0, 8.0, 0.7], [1.0, 5.0, 1.0, 3.0]],
        state_norm_max=[[0.001, 0.002, 1e3, 0.0005], [0.0005, 0.001, 0.0002, 1e3]],
        state_norm_every=4,
    ),
}


@pytest.mark.parametrize("name", list(MITIGATIONS))
def test_mitigation_matches_reference_in_all_modes(name):
    model = _robust(**MITIGATIONS[name])
    ids = _ids()
    expected = reference_logits(model, ids).float()
    baseline = reference_logits(_robust(), ids).float()
    # the mitigation must actually change the computation, by far more than the tolerance
    assert (expected - baseline).abs().max() > 20 * TOL, name
    for mode, logits in _all_modes(model, ids).items():
        assert (logits - expected).abs().max() < TOL, (name, mode)


@pytest.mark.parametrize("name", ["none", "state_norm_max-per-head", "decay_scale-per-head+sliding_window"])
def test_chained_quadratic_pieces_match_reference_in_all_modes(name):
    """Segments longer than a quadratic piece (here 8 tokens, so T=37 makes 5 pieces) are scanned as pieces chained
    through the state; every mode still equals the float64 recurrence."""
    model = _robust(**MITIGATIONS.get(name, {}))
    kernels = dataclasses.replace(resolve_kernels(), quadratic_max=8)
    for block in model.backbone.layers:
        block.mixer.kernel_functions = kernels
    ids = _ids()
    expected = reference_logits(model, ids).float()
    for mode, logits in _all_modes(model, ids).items():
        assert (logits - expected).abs().max() < TOL, (name, mode)


@pytest.mark.parametrize("name", ["state_norm_max", "scales+sliding_window", "decay_scale-per-head+sliding_window"])
def test_decoding_through_transformers_kernel_functions(name):
    """On GPU decoding goes through mamba2_selective_state_update / causal_conv1d_update; same result on CPU."""
    model = _robust(**MITIGATIONS[name])
    kernels = resolve_kernels(cpu_fast_paths=False)
    assert not kernels.cpu_steps and not kernels.torch_scan
    for block in model.backbone.layers:
        block.mixer.kernel_functions = kernels
    ids = _ids()
    assert (_decoded(model, ids) - reference_logits(model, ids).float()).abs().max() < TOL


def test_padding_mask_matches_transformers():
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(Mamba2Config(**TINY)).eval()
    ours = RobustMamba2ForCausalLM.from_mamba2(hf)
    ids = _ids(length=12)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, use_cache=True).logits
        b = ours(ids, attention_mask=mask, use_cache=True).logits
    assert (a - b).abs().max() < TOL


# ----------------------------------------------------------------------------------------------------------------
# config validation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(insertion_scale=0.0), "insertion_scale"),
        (dict(insertion_scale=-1.0), "insertion_scale"),
        (dict(decay_scale=0), "decay_scale"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(state_norm_max=[[1.0, 1.0]]), "shape"),
        (dict(state_norm_max=[[1.0] * 4] * 3), "shape"),
        (dict(state_norm_max=-2.0), "state_norm_max"),
        (dict(state_norm_max=1.0, sliding_window=8), "cannot be combined"),
        (dict(state_norm_every=0), "state_norm_every"),
        (dict(max_segment_length=0), "max_segment_length"),
    ],
)
def test_bad_config_raises(bad, message):
    with pytest.raises(ValueError, match=message):
        RobustMamba2Config(**TINY, **bad)


def test_misspelt_field_raises_with_suggestion():
    with pytest.raises(TypeError, match="did you mean 'sliding_window'"):
        RobustMamba2Config(**TINY, sliding_windw=64)
    with pytest.raises(TypeError, match="did you mean 'state_norm_every'"):
        RobustMamba2Config(**TINY, state_norm_evry=16)
    # keys that resemble no field are kept, as transformers does (checkpoints carry extra metadata)
    assert RobustMamba2Config(**TINY, train_length=64).train_length == 64


def test_bad_fields_set_after_construction_are_caught_by_the_model():
    config = RobustMamba2Config(**TINY)
    config.sliding_window = -3
    with pytest.raises(ValueError, match="sliding_window"):
        RobustMamba2ForCausalLM(config)


def test_fields_are_revalidated_at_every_forward():
    """A field made invalid after the model was built raises at the next forward instead of giving NaN logits."""
    ids = _ids(length=9)
    model = _robust()
    model.config.decay_scale = float("nan")
    with pytest.raises(ValueError, match="decay_scale"):
        model(ids)
    model.config.decay_scale = 1.0
    model.config.insertion_scale = float("inf")
    with pytest.raises(ValueError, match="insertion_scale"):
        model.backbone(ids)  # the base model checks too
    model.config.insertion_scale = 1.0
    assert torch.isfinite(model(ids).logits).all()  # valid again: runs

    capped = _robust(state_norm_max=0.01)
    capped.config.sliding_window = 4  # an invalid combination
    with pytest.raises(ValueError, match="cannot be combined"):
        capped(ids)
    capped.config.sliding_window = None
    capped.config.state_norm_max = [[0.01] * 4, [0.01] * 4]
    capped(ids)
    capped.config.state_norm_max[1][2] = -1.0  # edited in place: still seen (compared by value)
    with pytest.raises(ValueError, match=r"state_norm_max\[1\]\[2\]"):
        capped(ids, cache=RobustMamba2Cache(config=capped.config), use_cache=True)
    # and during decoding, through generate()
    model.config.decay_scale = [[1.0] * 4, [1.0, float("nan"), 1.0, 1.0]]
    with pytest.raises(ValueError, match=r"decay_scale\[1\]\[1\]"):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(decay_scale=[[1.0, 2.0]]), "shape"),
        (dict(decay_scale=[[1.0] * 4] * 3), "shape"),
        (dict(decay_scale=[[1.0, 2.0, 0.0, 1.0], [1.0] * 4]), r"decay_scale\[0\]\[2\]"),
        (dict(decay_scale=[[1.0] * 4, [1.0, float("nan"), 1.0, 1.0]]), r"decay_scale\[1\]\[1\]"),
        (dict(decay_scale=[[1.0] * 4, [1.0, 1.0, float("inf"), True]]), "decay_scale"),
    ],
)
def test_bad_per_head_decay_scale_raises(bad, message):
    with pytest.raises(ValueError, match=message):
        RobustMamba2Config(**TINY, **bad)


def test_per_head_decay_scale_table_is_normalised_and_equal_rows_match_the_scalar():
    config = RobustMamba2Config(**TINY, decay_scale=[[1, 2, 3, 4], [1, 1, 1, 1]])
    assert config.decay_scale == [[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]
    assert all(isinstance(v, float) for row in config.decay_scale for v in row)
    assert config.decay_scales(0) == [1.0, 2.0, 3.0, 4.0] and config.has_mitigations
    assert not RobustMamba2Config(**TINY, decay_scale=[[1.0] * 4] * 2).has_mitigations
    ids = _ids(length=20)
    with torch.no_grad():
        table = _robust(decay_scale=[[2.5] * 4] * 2)(ids).logits
        scalar = _robust(decay_scale=2.5)(ids).logits
    assert (table - scalar).abs().max() < 1e-6


def test_norm_before_gate_is_refused():
    with pytest.raises(ValueError, match="norm_before_gate"):
        RobustMamba2Config(**TINY, norm_before_gate=True)
    config = RobustMamba2Config(**TINY, norm_before_gate=False)  # what older transformers configs carry: accepted
    model = RobustMamba2ForCausalLM(config).eval()
    model.config.norm_before_gate = True
    with pytest.raises(ValueError, match="norm_before_gate"):
        model(_ids(length=5))


# ----------------------------------------------------------------------------------------------------------------
# loading and conversion
# ----------------------------------------------------------------------------------------------------------------


def test_from_pretrained_transformers_mamba2_checkpoint(tmp_path):
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(Mamba2Config(**TINY)).eval()
    hf.save_pretrained(tmp_path / "mamba2")
    ours = RobustMamba2ForCausalLM.from_pretrained(tmp_path / "mamba2", sliding_window=6).eval()
    assert ours.config.model_type == "robust_mamba2" and ours.config.sliding_window == 6
    ids = _ids()
    assert (_single(ours, ids) - reference_logits(ours, ids).float()).abs().max() < TOL
    plain = RobustMamba2ForCausalLM.from_pretrained(tmp_path / "mamba2").eval()
    with torch.no_grad():
        assert (plain(ids, use_cache=True).logits - hf(ids).logits).abs().max() < TOL
    # round trip through the Auto classes as a robust_mamba2 checkpoint
    ours.save_pretrained(tmp_path / "robust")
    saved = json.loads((tmp_path / "robust" / "config.json").read_text())
    assert saved["model_type"] == "robust_mamba2" and saved["sliding_window"] == 6
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "robust"), RobustMamba2Config)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "robust").eval()
    assert isinstance(auto, RobustMamba2ForCausalLM)
    with torch.no_grad():
        assert torch.equal(auto(ids).logits, ours(ids).logits)


def test_from_mamba2_rejects_unknown_fields():
    with pytest.raises(TypeError, match="Unknown mitigation"):
        RobustMamba2ForCausalLM.from_mamba2(Mamba2ForCausalLM(Mamba2Config(**TINY)), window=3)


def _ssm_config():
    return {
        "d_model": 16,
        "d_intermediate": 0,
        "n_layer": 2,
        "vocab_size": 45,  # padded to 48 by pad_vocab_size_multiple
        "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8},
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 16,
        "tie_embeddings": True,
    }


def test_convert_mamba_ssm_checkpoint(tmp_path):
    """A small checkpoint in the state-spaces format: tied embeddings, padded vocabulary, backbone.embedding.*."""
    src = tmp_path / "mamba2-tiny-ssm"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_ssm_config()))
    torch.manual_seed(0)
    reference = Mamba2ForCausalLM(
        Mamba2Config(
            hidden_size=16, num_hidden_layers=2, vocab_size=48, state_size=8, head_dim=8, num_heads=4,
            n_groups=1, chunk_size=8, tie_word_embeddings=True,
        )
    ).eval()  # fmt: skip
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in reference.state_dict().items()}
    state.pop("lm_head.weight")  # tied: mamba_ssm checkpoints store the embedding only
    torch.save(state, src / "pytorch_model.bin")

    convert_mamba_ssm_checkpoint(src, tmp_path / "converted")
    assert (tmp_path / "converted" / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "converted").eval()
    assert isinstance(model, RobustMamba2ForCausalLM)
    assert model.config.n_groups == 1 and model.config.vocab_size == 48
    # GPT-NeoX token ids (as transformers' own converter writes them), not Mamba2Config's defaults (pad 1, eos 2)
    ids_written = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert (ids_written["pad_token_id"], ids_written["bos_token_id"], ids_written["eos_token_id"]) == (0, 0, 0)
    generation = json.loads((tmp_path / "converted" / "generation_config.json").read_text())
    assert (generation.get("pad_token_id"), generation.get("bos_token_id"), generation.get("eos_token_id")) == (0, 0, 0)
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (0, 0, 0)
    ids = _ids(length=20)
    with torch.no_grad():
        assert (model(ids, use_cache=True).logits - reference(ids).logits).abs().max() < TOL


def test_convert_refuses_norm_before_gate_and_remote_names(tmp_path):
    config = _ssm_config()
    assert mamba_ssm_config_to_robust(config).eos_token_id == 0
    config["ssm_cfg"] = {**config["ssm_cfg"], "norm_before_gate": True}
    with pytest.raises(ValueError, match="norm_before_gate"):
        mamba_ssm_config_to_robust(config)
    config["ssm_cfg"]["norm_before_gate"] = False  # mamba_ssm's default: fine
    assert mamba_ssm_config_to_robust(config).num_heads == 4
    # a Hub name is not a local folder: the error says to download it first
    with pytest.raises(FileNotFoundError, match="snapshot_download"):
        convert_mamba_ssm_checkpoint(tmp_path / "state-spaces" / "mamba2-130m", tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------------
# long inputs: logits_to_keep, per-segment loss
# ----------------------------------------------------------------------------------------------------------------


def test_logits_to_keep_and_segmented_loss_match_full_computation():
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(Mamba2Config(**TINY)).eval()
    ours = RobustMamba2ForCausalLM.from_mamba2(hf, max_segment_length=6)
    ids = _ids()
    labels = ids.clone()
    labels[0, 10:14] = -100
    with torch.no_grad():
        full = hf(ids, labels=labels)
        last = ours(ids, labels=labels, logits_to_keep=1)
        picked = ours(ids, logits_to_keep=torch.tensor([0, 6, 7, 36]))
    assert last.logits.shape == (2, 1, TINY["vocab_size"])
    assert (last.logits[:, 0] - full.logits[:, -1]).abs().max() < TOL
    assert abs(last.loss.item() - full.loss.item()) < 1e-5
    assert (picked.logits - full.logits[:, [0, 6, 7, 36]]).abs().max() < TOL


def test_training_backward_through_segments_and_mitigations():
    model = _robust(insertion_scale=0.5, sliding_window=6, max_segment_length=9).train()
    ids = _ids()
    out = model(ids, labels=ids)
    out.loss.backward()
    assert model.backbone.layers[0].mixer.A_log.grad is not None
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("piece", [None, 16])
@pytest.mark.parametrize("mitigations", [{}, {"state_norm_max": 5.0, "state_norm_every": 8}])
def test_quadratic_training_path_matches_the_chunk_scan(mitigations, piece, monkeypatch):
    """Training through the quadratic scan: same loss and gradients as transformers' chunk scan, and transformers'
    Mamba2 (without mitigations) sees the same loss. With ``piece=16`` the 40-token sequences are longer than a
    quadratic piece, so they are scanned as pieces chained through the state."""
    import hf_collapse.modeling.robust_mamba2.modeling_robust_mamba2 as modeling

    calls, final_states = [], []
    real = modeling.quadratic_scan

    def spy(*a, **k):
        calls.append(a[0].shape[1])
        final_states.append(k.get("return_final_state", True))
        return real(*a, **k)

    monkeypatch.setattr(modeling, "quadratic_scan", spy)

    def loss_and_grads(quadratic: bool):
        model = _robust(**mitigations).train()
        if not quadratic or piece is not None:
            kernels = dataclasses.replace(resolve_kernels(), quadratic_max=piece if quadratic else 0)
            for block in model.backbone.layers:
                block.mixer.kernel_functions = kernels
        ids = _ids(length=40)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_c, grads_c = loss_and_grads(False)
    assert not calls
    loss_q, grads_q = loss_and_grads(True)
    assert calls and max(calls) <= (piece or resolve_kernels().quadratic_max)  # the quadratic form ran
    if piece is not None and not mitigations:
        assert calls.count(16) >= 2 * len(calls) // 3  # 16 + 16 + 8 per layer: chained pieces
    if not mitigations:  # no cache: each layer's last piece skips the final state, the chained ones keep theirs
        n_layers = len(final_states) // (3 if piece else 1)
        assert final_states.count(False) == n_layers and final_states.count(True) == len(final_states) - n_layers
    assert abs(loss_q.item() - loss_c.item()) < 1e-5
    for gq, gc in zip(grads_q, grads_c):
        torch.testing.assert_close(gq, gc, rtol=1e-3, atol=1e-4)
    if not mitigations:  # and transformers' own Mamba2 computes the same logits
        torch.manual_seed(0)
        hf = Mamba2ForCausalLM(Mamba2Config(**TINY))
        ours = RobustMamba2ForCausalLM.from_mamba2(hf)
        ids = _ids(length=40)
        with torch.no_grad():
            assert (hf(ids).logits - ours(ids).logits).abs().max() < TOL


# ----------------------------------------------------------------------------------------------------------------
# generate()
# ----------------------------------------------------------------------------------------------------------------


def test_generate_greedy_matches_transformers():
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(Mamba2Config(**TINY)).eval()
    ours = RobustMamba2ForCausalLM.from_mamba2(hf)
    ids = _ids(length=9)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), hf.generate(ids, **kw))


@pytest.mark.parametrize("name", ["state_norm_max", "scales+sliding_window"])
def test_generate_with_mitigation_consistent_with_full_forward(name):
    """Greedy decoding with the cache equals re-running the whole sequence each step (use_cache=False)."""
    model = _robust(**MITIGATIONS[name])
    ids = _ids(length=9)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(with_cache, without)
    # and the generated tokens are the reference model's argmax
    ref = reference_logits(model, with_cache[:, :-1]).argmax(-1)[:, ids.shape[1] - 1 :]
    assert torch.equal(ref, with_cache[:, ids.shape[1] :])


def test_generate_sampling_batch_and_num_return_sequences():
    model = _robust(sliding_window=4, decay_scale=1.2)
    ids = _ids(batch=2, length=6)
    torch.manual_seed(3)
    out = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=10, num_return_sequences=3, pad_token_id=0)
    assert out.shape == (6, 11)
    assert torch.equal(out[:3, :6], ids[:1].expand(3, -1)) and torch.equal(out[3:, :6], ids[1:].expand(3, -1))
    beams = model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    assert beams.shape == (2, 10)


def test_plain_dynamic_cache_is_upgraded():
    model = _robust(state_norm_max=0.02, state_norm_every=5)
    ids = _ids()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        a = model(ids[:, :20], cache=cache, use_cache=True).logits
        b = model(ids[:, 20:], cache=cache, use_cache=True).logits
    assert isinstance(cache.layers[0], RobustMamba2CacheLayer)
    assert cache.layers[0].seen_tokens == T
    assert (torch.cat([a, b], 1) - reference_logits(model, ids).float()).abs().max() < TOL
    assert isinstance(RobustMamba2Cache(config=model.config).layers[1], type(cache.layers[1]))


def test_cache_layers_are_built_as_robust_layers_and_foreign_caches_are_refused():
    model = _robust(sliding_window=4)
    cache = RobustMamba2Cache(config=model.config)
    assert [type(layer) for layer in cache.layers] == [RobustMamba2CacheLayer] * TINY["num_hidden_layers"]
    lazy = RobustMamba2Cache()  # without a config the layers are added on first use
    ids = _ids(length=9)
    with torch.no_grad():
        expected = model(ids, cache=RobustMamba2Cache(config=model.config), use_cache=True).logits
        assert torch.equal(model(ids, cache=lazy, use_cache=True).logits, expected)
        assert torch.equal(model(ids, cache=DynamicCache(), use_cache=True).logits, expected)
    assert len(lazy.layers) == TINY["num_hidden_layers"] and lazy.layers[1].seen_tokens == 9
    # a cache that already holds another model's state cannot be taken over
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(Mamba2Config(**TINY)).eval()
    with torch.no_grad():
        used = hf(ids, use_cache=True).cache
        with pytest.raises(ValueError, match="RobustMamba2Cache"):
            model(ids, cache=used, use_cache=True)
    # generate() runs on its own RobustMamba2Cache
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert isinstance(out.cache, RobustMamba2Cache) and out.cache.layers[0].seen_tokens == 11


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def test_calibrate_state_norms():
    model = _robust(state_norm_every=5)
    ids = _ids(length=30)
    caps = calibrate_state_norms(model, ids, margin=1.0)
    assert len(caps) == TINY["num_hidden_layers"] and all(len(row) == TINY["num_heads"] for row in caps)
    assert model.config.state_norm_max is None  # not written unless asked
    with torch.no_grad():
        uncapped = model(ids).logits
    calibrate_state_norms(model, ids, margin=1.0, write_to_config=True)
    assert model.config.state_norm_max == caps
    with torch.no_grad():
        # the caps are the maxima seen at exactly the positions where the cap is checked, so on the same text nothing is cut
        assert (model(ids).logits - uncapped).abs().max() < TOL
    calibrate_state_norms(model, ids, margin=0.3, write_to_config=True)
    with torch.no_grad():
        assert (model(ids).logits - uncapped).abs().max() > 50 * TOL


def test_calibrate_state_norms_validates_before_writing_and_refuses_empty_ids():
    model = _robust(sliding_window=4)
    ids = _ids(length=12)
    with pytest.raises(ValueError, match="cannot be combined"):
        calibrate_state_norms(model, ids, write_to_config=True)
    assert model.config.state_norm_max is None  # nothing was written: the config is still valid
    model(ids)
    for empty in (ids[:, :0], ids[:0]):
        with pytest.raises(ValueError, match="empty"):
            calibrate_state_norms(model, empty)


def _long_memory_model():
    """Heads 0 and 1 of each layer forget slowly (A = −0.2), the others as initialised."""
    model = _robust()
    with torch.no_grad():
        for block in model.backbone.layers:
            block.mixer.A_log[:2] = math.log(0.2)
    return model


def test_first_token_memory_matches_a_direct_computation():
    model = _long_memory_model()
    ids = _ids(length=30)
    log_memory = first_token_memory(model, ids)  # (b, layers, h)
    assert log_memory.shape == (2, TINY["num_hidden_layers"], TINY["num_heads"]) and (log_memory <= 0).all()
    # layer 0, from the equations: Δ_t = clamp(softplus(dt_t + dt_bias)) of the normalised embeddings, memory of
    # position 1 at T = exp(A·Σ_{t=2..T} Δ_t) with A = −exp(A_log)
    mixer, norm = model.backbone.layers[0].mixer, model.backbone.layers[0].norm
    with torch.no_grad():
        h = model.backbone.embeddings.weight.double()[ids]
        h = norm.weight.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        dt = (h @ mixer.in_proj.weight.double().T)[..., -TINY["num_heads"] :]
        delta = torch.nn.functional.softplus(dt + mixer.dt_bias.double()).clamp(*mixer.time_step_limit)
        expected = -torch.exp(mixer.A_log.double()) * delta[:, 1:].sum(dim=1)
    assert torch.allclose(log_memory[:, 0], expected, rtol=1e-5, atol=1e-7)
    # a decay_scale already in the config does not change the measurement (it is taken with decay_scale 1)
    model.config.decay_scale = 3.0
    assert torch.allclose(first_token_memory(model, ids)[:, 0], log_memory[:, 0])
    assert model.config.decay_scale == 3.0
    # nor do the model's internal segments (position 1 is only in the first one)
    model.config.decay_scale, model.config.max_segment_length = 1.0, 7
    assert torch.allclose(first_token_memory(model, ids), log_memory, rtol=1e-6, atol=1e-9)


def test_calibrate_decay_scales():
    model = _long_memory_model()
    ids = _ids(length=30)
    memory = first_token_memory(model, ids).max(dim=0).values.exp()  # (layers, h), the row that remembers most
    threshold = 0.1
    table = calibrate_decay_scales(model, ids, threshold=threshold)
    assert model.config.decay_scale == 1.0  # not written unless asked
    candidates = sorted(DECAY_SCALE_CANDIDATES)
    changed = 0
    for layer in range(TINY["num_hidden_layers"]):
        for head in range(TINY["num_heads"]):
            m, s = float(memory[layer, head]), table[layer][head]
            if m <= threshold:
                assert s == 1.0, (layer, head)
                continue
            changed += 1
            assert m**s < threshold, (layer, head)  # the chosen scale brings the memory below the threshold
            smaller = [c for c in candidates if c < s]
            assert all(m**c >= threshold for c in smaller), (layer, head)  # and is the smallest that does
    assert changed >= 2 and any(s == 1.0 for row in table for s in row)
    # the long-memory heads needed large scales: their memory exp(−0.2·ΣΔ) is close to 1
    assert min(table[0][0], table[0][1], table[1][0], table[1][1]) >= 8

    # mean over rows: never a larger scale than the row that remembers most needs
    mean_table = calibrate_decay_scales(model, ids, threshold=threshold, reduction="mean")
    assert all(a <= b for ra, rb in zip(mean_table, table) for a, b in zip(ra, rb))

    # not enough candidates: the largest is used, with a warning
    with pytest.warns(UserWarning, match="head"):
        short = calibrate_decay_scales(model, ids, threshold=threshold, candidates=[1, 2])
    assert short[0][0] == 2.0

    reference_before = reference_logits(model, ids).float()
    written = calibrate_decay_scales(model, ids, threshold=threshold, write_to_config=True)
    assert model.config.decay_scale == written == table
    expected = reference_logits(model, ids).float()  # the float64 reference with the per-head table
    assert (expected - reference_before).abs().max() > 20 * TOL
    assert (_single(model, ids) - expected).abs().max() < TOL

    for bad in (dict(threshold=0.0), dict(threshold=1.5), dict(candidates=[]), dict(candidates=[0.0, 2.0]),
                dict(reduction="median")):  # fmt: skip
        with pytest.raises(ValueError):
            calibrate_decay_scales(model, ids, **bad)
    with pytest.raises(ValueError, match="empty"):
        calibrate_decay_scales(model, ids[:, :0])


def test_calibrate_decay_scales_validates_before_writing():
    model = _long_memory_model()
    ids = _ids(length=20)
    model.config.max_segment_length = 0  # an invalid field set by hand: the table must not be written
    with pytest.raises(ValueError, match="max_segment_length"):
        calibrate_decay_scales(model, ids, write_to_config=True)
    assert model.config.decay_scale == 1.0


@pytest.mark.parametrize("mitigations", [{}, dict(sliding_window=6, decay_scale=1.5)])
@pytest.mark.parametrize("beta", [0.4, 3.0])
def test_insertion_scale_equals_dividing_D(beta, mitigations):
    """insertion_scale = β scales every state by β (the recurrence is linear from h_0 = 0), so y = C·h + D·x becomes
    β·(C·h + (D/β)·x). The gated RMSNorm removes the factor β: RMSNorm(β·v; ε) = RMSNorm(v; ε/β²). So the model
    with insertion_scale = β is exactly the model with D/β and the gated norm's ε divided by β²."""
    model = _robust(insertion_scale=beta, **mitigations)
    twin = _robust(**mitigations)
    with torch.no_grad():
        for block in twin.backbone.layers:
            block.mixer.D.div_(beta)
            block.mixer.norm.variance_epsilon /= beta**2
    ids = _ids()
    with torch.no_grad():
        scaled, divided = model(ids).logits, twin(ids).logits
        plain = _robust(**mitigations)(ids).logits
    assert (scaled - divided).abs().max() < 1e-5
    assert (scaled - plain).abs().max() > 100 * 1e-5  # while insertion_scale itself does change the logits
    # with a negligible ε, dividing D alone is enough
    tight = dict(TINY, layer_norm_epsilon=1e-12)
    torch.manual_seed(0)
    model = RobustMamba2ForCausalLM(RobustMamba2Config(**tight, insertion_scale=beta, **mitigations)).eval()
    torch.manual_seed(0)
    twin = RobustMamba2ForCausalLM(RobustMamba2Config(**tight, **mitigations)).eval()
    with torch.no_grad():
        for block in twin.backbone.layers:
            block.mixer.D.div_(beta)
        assert (model(ids).logits - twin(ids).logits).abs().max() < 1e-5


def test_recommended_training_length():
    # mamba2-130m shape: 24 layers x 24 heads x 64 x 128 = 4.72M state elements -> 5.172*4.72 - 4.469 = 19.9K tokens
    config = RobustMamba2Config(hidden_size=768, num_hidden_layers=24, num_heads=24, head_dim=64, state_size=128)
    assert recommended_training_length(config) == round((5.172 * 24 * 24 * 64 * 128 / 1e6 - 4.469) * 1000)
    assert 19_000 < recommended_training_length(config) < 21_000
    assert recommended_training_length(RobustMamba2Config(**TINY)) == 0


def test_public_api_and_auto_registration():
    assert hf_collapse.RobustMamba2Model is RobustMamba2Model
    assert "robust_mamba2" in hf_collapse.register()
    model = AutoModelForCausalLM.from_config(RobustMamba2Config(**TINY))
    assert isinstance(model, RobustMamba2ForCausalLM) and model.can_generate()


@pytest.mark.parametrize("mitigation", [{}, {"sliding_window": 8}, {"state_norm_max": 5.0, "state_norm_every": 4}])
def test_bf16_model_keeps_its_recurrent_state_in_fp32_and_matches_fp32(mitigation):
    """A bf16 model's SSM state stays float32 in prefill and decode, and its logits match fp32 to bf16 tolerance."""
    import copy

    from hf_collapse import RobustMamba2Cache

    torch.manual_seed(0)
    cfg = RobustMamba2Config(num_heads=4, head_dim=8, hidden_size=16, state_size=8, n_groups=1, expand=2,
                             num_hidden_layers=2, vocab_size=64, chunk_size=8, **mitigation)  # fmt: skip
    fp32 = RobustMamba2ForCausalLM(cfg).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 30))
    c32, c16 = RobustMamba2Cache(config=fp32.config), RobustMamba2Cache(config=bf16.config)
    with torch.no_grad():
        steps = [(0, 20)] + [(t, t + 1) for t in range(20, 30)]  # prefill, then token by token
        for a, b in steps:
            ref = fp32(ids[:, a:b], cache=c32, use_cache=True).logits
            got = bf16(ids[:, a:b], cache=c16, use_cache=True).logits
            assert got.dtype == torch.float32  # logits are upcast, as transformers' Mamba2
            torch.testing.assert_close(got, ref, atol=5e-2, rtol=5e-2)
            for layer in c16.layers:
                assert layer.recurrent_states[0].dtype == torch.float32
