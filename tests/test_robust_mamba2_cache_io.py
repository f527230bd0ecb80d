"""RobustMamba2Cache save / load (resumable streams) and generate() from a prefilled cache (prompt caching).

A stream cut after CUT tokens, saved, loaded in another process and continued must give the logits of an
uninterrupted run; generate() from a deep copy of a prefilled cache must give the tokens of generate() from the full
prompt.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from reference_mamba2 import TINY
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_collapse import RobustMamba2Config, RobustMamba2ForCausalLM
from hf_collapse.modeling.robust_mamba2 import CACHE_FORMAT_VERSION, RobustMamba2Cache
from hf_collapse.modeling.robust_mamba2 import cache_robust_mamba2 as cache_module

torch.set_num_threads(1)

T = 41
CUT = 17  # not a multiple of state_norm_every (5) nor of the window (6): the stream stops mid-period
RESUME_TOL = 1e-5
CASES = {
    "none": {},
    "state_norm_max": dict(state_norm_max=0.002, state_norm_every=5),
    "sliding_window": dict(sliding_window=6, decay_scale=[[1.0, 4.0, 0.5, 2.5], [3.0, 1.0, 1.5, 6.0]]),
}


def _model(**mitigations):
    torch.manual_seed(0)
    return RobustMamba2ForCausalLM(RobustMamba2Config(**TINY, **mitigations)).eval()


def _ids(batch=2, length=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY["vocab_size"], (batch, length), generator=g)


# the other process: load each model and its saved cache, continue the stream (one chunk, then token by token)
_RESUME_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    from hf_collapse import RobustMamba2ForCausalLM
    from hf_collapse.modeling.robust_mamba2 import RobustMamba2Cache

    torch.set_num_threads(1)
    root, cut, names = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    ids = load_file(f"{root}/ids.safetensors")["ids"]
    out = {}
    with torch.no_grad():
        for name in names:
            model = RobustMamba2ForCausalLM.from_pretrained(f"{root}/{name}-model").eval()
            cache = RobustMamba2Cache.load(f"{root}/{name}.cache.safetensors", model.config)
            assert cache.seen_tokens == cut, cache.seen_tokens
            parts = [model(ids[:, cut : cut + 10], cache=cache, use_cache=True).logits]
            for t in range(cut + 10, ids.shape[1]):
                parts.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
            out[name] = torch.cat(parts, dim=1).contiguous()
            out[name + ".seen"] = torch.tensor([cache.seen_tokens])
    save_file(out, f"{root}/resumed.safetensors")
    print("RESUMED_OK")
""")


def test_stream_saved_and_resumed_in_another_process_matches_uninterrupted_run(tmp_path):
    ids = _ids()
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    expected = {}
    for name, mitigations in CASES.items():
        model = _model(**mitigations)
        with torch.no_grad():
            expected[name] = model(ids, use_cache=True).logits[:, CUT:]  # uninterrupted, one forward
            cache = RobustMamba2Cache(config=model.config)
            model(ids[:, :CUT], cache=cache, use_cache=True)
        path = cache.save(tmp_path / f"{name}.cache.safetensors")
        assert path.exists() and [p.name for p in tmp_path.glob(".*.tmp")] == []
        model.save_pretrained(tmp_path / f"{name}-model")
    res = subprocess.run(
        [sys.executable, "-c", _RESUME_SCRIPT, str(tmp_path), str(CUT), ",".join(CASES)],
        capture_output=True,
        text=True,
    )
    assert "RESUMED_OK" in res.stdout, res.stderr[-3000:]
    resumed = load_file(str(tmp_path / "resumed.safetensors"))
    for name in CASES:
        diff = (resumed[name] - expected[name]).abs().max().item()
        assert diff < RESUME_TOL, (name, diff)
        assert int(resumed[name + ".seen"]) == T


def test_saved_file_layout_and_metadata(tmp_path):
    model = _model(**CASES["sliding_window"])
    cache = RobustMamba2Cache(config=model.config)
    with torch.no_grad():
        model(_ids(length=CUT), cache=cache, use_cache=True)
    path = cache.save(tmp_path / "sub" / "stream.safetensors")  # the folder is created
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["robust_mamba2_cache"])
        keys = set(f.keys())
    assert meta["format_version"] == CACHE_FORMAT_VERSION and meta["num_layers"] == 2
    assert [layer["seen_tokens"] for layer in meta["layers"]] == [CUT, CUT]
    assert all(layer["state"] and layer["window"] for layer in meta["layers"])
    assert meta["state_settings"] == {
        "insertion_scale": 1.0,
        "decay_scale": CASES["sliding_window"]["decay_scale"],
        "state_norm_max": None,
        "state_norm_every": 128,
        "sliding_window": 6,
    }
    per_layer = {"conv_state", "ssm_state", "window.old", "window.new", "window.delta_sum_old", "window.delta_sum_new"}
    assert keys == {f"layers.{i}.{k}" for i in range(2) for k in per_layer}
    # loaded tensors equal the saved ones, and the window state is restored
    loaded = RobustMamba2Cache.load(path, model.config)
    for a, b in zip(cache.layers, loaded.layers):
        assert torch.equal(a.ssm_state, b.ssm_state) and torch.equal(a.conv_state, b.conv_state)
        assert all(torch.equal(x, y) for x, y in zip(a.window, b.window))
        assert b.seen_tokens == CUT
    # without a window: no window tensors; an empty cache saves and loads too
    plain = _model()
    cache = RobustMamba2Cache(config=plain.config)
    RobustMamba2Cache(config=plain.config).save(tmp_path / "empty.safetensors")
    assert RobustMamba2Cache.load(tmp_path / "empty.safetensors", plain.config).seen_tokens == 0
    with torch.no_grad():
        plain(_ids(length=5), cache=cache, use_cache=True)
    with safe_open(str(cache.save(tmp_path / "plain.safetensors")), framework="pt") as f:
        assert not any("window" in k for k in f.keys())


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(decay_scale=2.0), "decay_scale"),
        (dict(sliding_window=8), "sliding_window"),
        (dict(sliding_window=None, decay_scale=1.0), "sliding_window"),
        (dict(insertion_scale=0.5), "insertion_scale"),
    ],
)
def test_load_refuses_other_mitigation_settings(tmp_path, other, message):
    model = _model(**CASES["sliding_window"])
    cache = RobustMamba2Cache(config=model.config)
    with torch.no_grad():
        model(_ids(length=9), cache=cache, use_cache=True)
    path = cache.save(tmp_path / "c.safetensors")
    config = RobustMamba2Config(**TINY, **{**CASES["sliding_window"], **other})
    with pytest.raises(ValueError, match=f"other mitigation settings.*{message}"):
        RobustMamba2Cache.load(path, config)
    # max_segment_length does not change the state: accepted
    RobustMamba2Cache.load(path, RobustMamba2Config(**TINY, **CASES["sliding_window"], max_segment_length=3))


def test_load_refuses_other_shapes_and_foreign_files(tmp_path):
    model = _model(state_norm_max=0.01)
    cache = RobustMamba2Cache(config=model.config)
    with torch.no_grad():
        model(_ids(length=9), cache=cache, use_cache=True)
    path = cache.save(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="3 layers|2-layer"):
        RobustMamba2Cache.load(path, RobustMamba2Config(**{**TINY, "num_hidden_layers": 3}, state_norm_max=0.01))
    with pytest.raises(ValueError, match="shape"):
        RobustMamba2Cache.load(path, RobustMamba2Config(**{**TINY, "head_dim": 4}, state_norm_max=0.01))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a RobustMamba2Cache file"):
        RobustMamba2Cache.load(tmp_path / "other.safetensors", model.config)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["robust_mamba2_cache"])
    meta["format_version"] = CACHE_FORMAT_VERSION + 1
    save_file(tensors, str(tmp_path / "future.safetensors"), metadata={"robust_mamba2_cache": json.dumps(meta)})
    with pytest.raises(ValueError, match="format version"):
        RobustMamba2Cache.load(tmp_path / "future.safetensors", model.config)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = _model()
    cache = RobustMamba2Cache(config=model.config)
    with torch.no_grad():
        model(_ids(length=9), cache=cache, use_cache=True)
    path = cache.save(tmp_path / "c.safetensors")
    before = path.read_bytes()

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # half a file, then the process is interrupted
            f.write(b"\x00" * 10)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr("safetensors.torch.save_file", interrupted)
    with torch.no_grad():
        model(_ids(length=3, seed=2), cache=cache, use_cache=True)
    with pytest.raises(KeyboardInterrupt):
        cache.save(path)
    assert path.read_bytes() == before  # the previous file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # and no temporary file is left


def test_save_refuses_a_state_without_settings(tmp_path):
    model = _model()
    cache = RobustMamba2Cache(config=model.config)
    with torch.no_grad():
        model(_ids(length=4), cache=cache, use_cache=True)
    cache.mitigation_key = None  # as if the state had been written by hand
    with pytest.raises(ValueError, match="settings"):
        cache.save(tmp_path / "c.safetensors")
    assert cache_module.CACHE_FORMAT_VERSION == CACHE_FORMAT_VERSION


# ----------------------------------------------------------------------------------------------------------------
# generate() from a prefilled cache
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_generate_continues_from_a_prefilled_cache(name):
    """Prefill a document once; every continuation generates from a deep copy of that cache, with ONLY the new tokens
    as input_ids, and must equal generate() from the full prompt."""
    model = _model(**CASES[name])
    document = _ids(length=29, seed=5)
    prefilled = RobustMamba2Cache(config=model.config)
    with torch.no_grad():
        model(document, cache=prefilled, use_cache=True, logits_to_keep=1)
    snapshot = [layer.ssm_state.clone() for layer in prefilled.layers]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    for k, length in enumerate([1, 4, 7]):
        continuation = _ids(length=length, seed=10 + k)
        full = model.generate(torch.cat([document, continuation], dim=1), **kw)
        cache = copy.deepcopy(prefilled)
        cont = model.generate(continuation, cache=cache, **kw)
        # the output starts with the continuation (the document is in the cache, not in the output)
        assert torch.equal(cont.sequences[:, :length], continuation)
        assert torch.equal(cont.sequences[:, length:], full.sequences[:, document.shape[1] + length :]), (name, k)
        diff = max((a - b).abs().max().item() for a, b in zip(cont.scores, full.scores))
        assert diff < 1e-4, (name, k, diff)
        assert cache.seen_tokens == document.shape[1] + length + 7  # the last generated token is not fed back
    # the prefilled cache itself was never touched
    assert prefilled.seen_tokens == document.shape[1]
    assert all(torch.equal(layer.ssm_state, s) for layer, s in zip(prefilled.layers, snapshot))


def test_generate_from_a_prefilled_cache_with_beams_and_several_sequences():
    """num_beams / num_return_sequences repeat the prompt rows; a prefilled cache passed in is repeated with them."""
    model = _model(**CASES["state_norm_max"])
    document, continuation = _ids(length=21, seed=5), _ids(length=3, seed=6)
    prefilled = RobustMamba2Cache(config=model.config)
    with torch.no_grad():
        model(document, cache=prefilled, use_cache=True, logits_to_keep=1)
    full_ids = torch.cat([document, continuation], dim=1)
    kw = dict(max_new_tokens=5, pad_token_id=0)
    beams = model.generate(continuation, cache=copy.deepcopy(prefilled), num_beams=3, do_sample=False, **kw)
    assert torch.equal(
        beams[:, 3:], model.generate(full_ids, num_beams=3, do_sample=False, **kw)[:, full_ids.shape[1] :]
    )
    torch.manual_seed(7)
    sampled = model.generate(continuation, cache=copy.deepcopy(prefilled), do_sample=True, num_return_sequences=2, **kw)
    torch.manual_seed(7)
    expected = model.generate(full_ids, do_sample=True, num_return_sequences=2, **kw)
    assert sampled.shape == (4, 8) and torch.equal(sampled[:, 3:], expected[:, full_ids.shape[1] :])


def test_generate_from_a_cache_loaded_from_disk(tmp_path):
    """Prompt caching across processes: prefill, save; later load and generate the continuation."""
    model = _model(**CASES["sliding_window"])
    document, continuation = _ids(length=26, seed=5), _ids(length=2, seed=8)
    cache = RobustMamba2Cache(config=model.config)
    with torch.no_grad():
        model(document, cache=cache, use_cache=True, logits_to_keep=1)
    cache.save(tmp_path / "prompt.safetensors")
    loaded = RobustMamba2Cache.load(tmp_path / "prompt.safetensors", model.config)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = model.generate(continuation, cache=loaded, **kw)
    full = model.generate(torch.cat([document, continuation], dim=1), **kw)
    assert torch.equal(out[:, 2:], full[:, 28:])
