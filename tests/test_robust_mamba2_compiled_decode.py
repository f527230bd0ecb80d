"""``RobustMamba2ForCausalLM.compile_decode``: the fused one-token step against the float64 reference and the eager
path, its fallbacks, and generate() with it.

The step functions (``decode_robust_mamba2``) are checked uncompiled against ``reference_mamba2`` (written from the
equations, not from the fast code) in every mitigation the compiled step supports; one compiled run checks that
inductor's code equals the eager model, in fp32 and in bf16.
"""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch
from reference_mamba2 import TINY, reference_logits
from test_robust_mamba2 import PREFILL
from test_robust_mamba2 import _decoded as _decode_logits  # prefill PREFILL tokens, then one token per forward

from hf_collapse import RobustMamba2Config, RobustMamba2ForCausalLM
from hf_collapse.modeling.robust_mamba2 import RobustMamba2Cache
from hf_collapse.modeling.robust_mamba2.decode_robust_mamba2 import decode_step

torch.set_num_threads(1)

T = 17
HAS_CXX = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
MITIGATIONS = [
    {},
    {"decay_scale": [[1.0, 4.0, 1.0, 16.0], [2.0, 1.0, 1.0, 1.0]]},  # per-head table (layers, heads)
    {"state_norm_max": 0.005, "state_norm_every": 4},  # caps inside the decoded part (positions 8, 12, 16)
    {"insertion_scale": 0.5, "decay_scale": 2.0},
]


def _model(**mitigations) -> RobustMamba2ForCausalLM:
    torch.manual_seed(0)
    return RobustMamba2ForCausalLM(RobustMamba2Config(**TINY, **mitigations)).eval()


def _ids(length=T):
    return torch.randint(3, TINY["vocab_size"], (1, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mitigation", MITIGATIONS, ids=["plain", "decay_table", "caps", "insertion_decay"])
def test_decode_step_matches_the_float64_reference(mitigation):
    """``decode_step`` run eagerly in place of the compiled function: every decoded token's logits equal the
    float64 reference of the whole prefix (n_groups = 2, caps at positions inside the decoded part)."""
    model = _model(**mitigation)
    model.compile_decode()
    calls = []

    def eager_step(*args, **kwargs):
        calls.append(1)
        return decode_step(*args, **kwargs)

    model._compiled_decode = eager_step  # the same function, not compiled
    ids = _ids()
    got = _decode_logits(model, ids)
    ref = reference_logits(model, ids).float()
    assert len(calls) == T - PREFILL  # every decoded token went through the step function
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    if mitigation:  # the mitigation really changes the decoded logits, so the comparison can fail
        assert (ref[:, PREFILL:] - reference_logits(_model(), ids)[:, PREFILL:].float()).abs().max() > 1e-3


def test_step_is_used_only_where_it_applies():
    """Batches, sliding windows, gradients and hidden-state requests take the eager path (same results)."""
    model = _model(sliding_window=6)
    model.compile_decode()
    model._compiled_decode = lambda *a, **k: pytest.fail("the fused step must not run with a sliding window")
    ids = _ids()
    torch.testing.assert_close(_decode_logits(model, ids), reference_logits(model, ids).float(), atol=1e-4, rtol=1e-4)

    model = _model()
    model.compile_decode()
    model._compiled_decode = lambda *a, **k: pytest.fail("the fused step is for one sequence")
    two = torch.cat([_ids(), _ids()])
    torch.testing.assert_close(_decode_logits(model, two), reference_logits(model, two).float(), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        cache = model(_ids()[:, :PREFILL], use_cache=True).cache
        out = model(_ids()[:, PREFILL : PREFILL + 1], cache=cache, use_cache=True, output_hidden_states=True)
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    cache = model(_ids()[:, :PREFILL], use_cache=True).cache
    model(_ids()[:, PREFILL : PREFILL + 1], cache=cache, use_cache=True).logits.sum().backward()  # grad enabled

    model.compile_decode(False)
    assert model._compiled_decode is None
    with pytest.raises(ValueError, match="use_bias"):
        RobustMamba2ForCausalLM(RobustMamba2Config(**{**TINY, "use_bias": True})).compile_decode()


def test_a_failed_compilation_warns_and_decodes_eagerly():
    import torch._inductor.exc as inductor_exc

    model = _model()
    ids = _ids()
    expected = _decode_logits(model, ids)
    model.compile_decode()

    def broken(*args, **kwargs):
        raise inductor_exc.CppCompileError(["c++", "kernel.cpp"], "c++: command not found")

    model._compiled_decode = broken
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        got = _decode_logits(model, ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert model._compiled_decode is None

    model.compile_decode()
    model._compiled_decode = lambda *a, **k: (_ for _ in ()).throw(IndexError("a real bug"))
    with pytest.raises(IndexError):  # errors that are not compilation failures are not hidden
        _decode_logits(model, ids)


@pytest.mark.skipif(not HAS_CXX, reason="torch.compile (inductor) needs a C++ compiler")
def test_compiled_decode_equals_eager_in_fp32_and_bf16_and_in_generate():
    """Inductor's code for the step: fp32 equal to the eager model, bf16 within bf16 tolerance of fp32 with the
    recurrent state kept in float32, greedy generate() identical, the cache's position counter advanced."""
    torch._dynamo.reset()
    eager = _model(state_norm_max=0.005, state_norm_every=4)
    compiled = copy.deepcopy(eager).compile_decode()
    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compilation failure would silently test eager vs eager
        ref = _decode_logits(eager, ids)
        torch.testing.assert_close(_decode_logits(compiled, ids), ref, atol=1e-5, rtol=1e-5)
        torch.set_num_threads(2)  # another thread count recompiles, and the step's reduction form differs there
        try:
            torch.testing.assert_close(_decode_logits(compiled, ids), ref, atol=1e-5, rtol=1e-5)
        finally:
            torch.set_num_threads(1)
        bf16 = copy.deepcopy(eager).to(torch.bfloat16).compile_decode()
        cache = RobustMamba2Cache(config=bf16.config)
        with torch.no_grad():
            bf16(ids[:, :PREFILL], cache=cache, use_cache=True)
            for t in range(PREFILL, T):
                got = bf16(ids[:, t : t + 1], cache=cache, use_cache=True).logits
                assert got.dtype == torch.float32
                torch.testing.assert_close(got[:, 0], ref[:, t], atol=5e-2, rtol=5e-2)
        assert all(layer.recurrent_states[0].dtype == torch.float32 for layer in cache.layers)
        assert all(layer.seen_tokens == T for layer in cache.layers)
        prompt = ids[:, :PREFILL]
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            torch.testing.assert_close(compiled.generate(prompt, **kw), eager.generate(prompt, **kw), atol=0, rtol=0)
    assert compiled._compiled_decode is not None  # still compiled: nothing fell back
