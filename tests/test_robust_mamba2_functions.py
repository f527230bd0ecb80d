"""The pure mitigation functions of RobustMamba2, each against a plain float64 loop written from the equations.

Per head (1-indexed positions t), with u_t = Δ_t·x_t B_tᵀ the inserted term:
    h_t = exp(Δ_t·A)·h_{t−1} + u_t
    state_norm_max: if t % S == 0: h_t ← h_t·min(1, τ/‖h_t‖_F)
    sliding_window r: position t reads h_t − exp(A·Σ_{j=b+1..t} Δ_j)·h_b,  b = r·max(0, ⌈t/r⌉ − 2)
The loops below index every tensor element by element; they share no code with the functions under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_collapse.modeling.robust_mamba2 import (
    SlidingWindowState,
    advance_window,
    cap_state_norm,
    period_pieces,
    rebuild_piece_states,
    rotate_window,
    state_readout,
    window_start_state,
)
from hf_collapse.modeling.robust_mamba2.kernels_robust_mamba2 import (
    QUADRATIC_SCAN_MAX,
    conv_update_cpu,
    quadratic_scan,
    resolve_kernels,
    ssm_update_cpu,
)

B_, H, P, N, G = 2, 4, 3, 5, 2  # batch, heads, head_dim, state size, groups
TOL = dict(rtol=1e-5, atol=1e-6)  # the functions compute in float32


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale


def _decay_rates():
    return -torch.tensor([0.3, 1.1, 0.05, 2.0], dtype=torch.float64)  # A (H,), all < 0


def _deltas(length, seed=1):
    return torch.rand(B_, length, H, generator=_gen(seed), dtype=torch.float64) * 0.5 + 0.01  # Δ > 0


def _frobenius(m):
    return math.sqrt(sum(float(v) ** 2 for v in m.flatten()))


def _cap_loop(h, caps):
    """h ← h·min(1, τ/‖h‖_F) for every batch row and head, element by element."""
    out = h.clone()
    for b in range(h.shape[0]):
        for k in range(h.shape[1]):
            norm = _frobenius(h[b, k])
            if norm > 0:
                out[b, k] = h[b, k] * min(1.0, float(caps[k]) / norm)
    return out


def _recurrence(h0, deltas, inserted, A, caps=None, every=None, t0=0):
    """Plain recurrence from h0 over positions t0+1.., returning every state [h_{t0}, h_{t0+1}, ...]."""
    states = [h0.clone()]
    h = h0.clone()
    for i in range(deltas.shape[1]):
        t = t0 + i + 1
        new = torch.empty_like(h)
        for b in range(h.shape[0]):
            for k in range(h.shape[1]):
                new[b, k] = math.exp(float(deltas[b, i, k]) * float(A[k])) * h[b, k] + inserted[i][b, k]
        h = new
        if caps is not None and t % every == 0:
            h = _cap_loop(h, caps)
        states.append(h)
    return states


def _window_at(states, deltas, t, r):
    """SlidingWindowState after position t, from its definition: boundaries at the last two multiples of r."""
    m = t // r
    b_new, b_old = r * m, r * max(0, m - 1)
    return SlidingWindowState(
        old=states[b_old].clone(),
        new=states[b_new].clone(),
        delta_sum_old=deltas[:, b_old:t].sum(dim=1),
        delta_sum_new=deltas[:, b_new:t].sum(dim=1),
    )


# ----------------------------------------------------------------------------------------------------------------
# cap_state_norm
# ----------------------------------------------------------------------------------------------------------------


def test_cap_state_norm_matches_loop():
    h = _randn(3, H, P, N)
    h[1, 2] = 0.0  # a zero state is left alone (no division by zero)
    caps = torch.tensor([0.5, 100.0, 1.0, 2.0], dtype=torch.float64)  # head 1: never reached
    expected = _cap_loop(h, caps)
    torch.testing.assert_close(cap_state_norm(h, caps), expected, **TOL)
    assert torch.equal(cap_state_norm(h, caps)[:, 1], h[:, 1])
    # in place: the same tensor comes back, scaled
    h32 = h.float()
    out = cap_state_norm(h32, caps.float(), inplace=True)
    assert out is h32
    torch.testing.assert_close(out.double(), expected, **TOL)
    norms = out.flatten(2).norm(dim=-1)
    assert (norms <= caps.float()[None, :] * (1 + 1e-6)).all()


# ----------------------------------------------------------------------------------------------------------------
# state_readout
# ----------------------------------------------------------------------------------------------------------------


def test_state_readout_matches_loop():
    length = 6
    C = _randn(B_, length, G * N, seed=2)
    delta_cum = torch.cumsum(_deltas(length), dim=1)
    A = _decay_rates()
    h0 = _randn(B_, H, P, N, seed=3)
    expected = torch.zeros(B_, length, H, P, dtype=torch.float64)
    per_group = H // G
    for b in range(B_):
        for t in range(length):
            for k in range(H):
                g = k // per_group
                decay = math.exp(float(A[k]) * float(delta_cum[b, t, k]))
                for p in range(P):
                    dot = sum(float(h0[b, k, p, n]) * float(C[b, t, g * N + n]) for n in range(N))
                    expected[b, t, k, p] = decay * dot
    out = state_readout(C, delta_cum, A, h0, n_groups=G)
    assert out.shape == (B_, length, H, P)
    torch.testing.assert_close(out.double(), expected, **TOL)
    # C may also come as (b, l, g, n)
    torch.testing.assert_close(state_readout(C.view(B_, length, G, N), delta_cum, A, h0, G), out)


# ----------------------------------------------------------------------------------------------------------------
# period_pieces
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("period", [1, 3, 5, 8])
def test_period_pieces_cut_at_multiples(period):
    for t0 in range(0, 12):
        for length in range(1, 20):
            expected, start = [], 0
            for i in range(1, length + 1):  # local end i is position t0 + i
                if (t0 + i) % period == 0 or i == length:
                    expected.append((start, i))
                    start = i
            assert period_pieces(t0, length, period) == expected, (t0, length, period)


# ----------------------------------------------------------------------------------------------------------------
# sliding window: zeros, advance_window, rotate_window, window_start_state
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 3, 4])
def test_window_functions_follow_the_window_equation_token_by_token(r):
    """Advance by Δ_t, read, rotate at multiples of r: what is read is h_t − exp(A·Σ_{b+1..t}Δ)·h_b at every t."""
    T = 13
    A = _decay_rates()
    deltas = _deltas(T)
    inserted = [_randn(B_, H, P, N, seed=10 + t) for t in range(T)]
    states = _recurrence(torch.zeros(B_, H, P, N, dtype=torch.float64), deltas, inserted, A)
    window = SlidingWindowState.zeros(B_, H, P, N)
    for t in range(1, T + 1):
        window = advance_window(window, deltas[:, t - 1])
        b = r * max(0, math.ceil(t / r) - 2)
        expected = torch.empty_like(states[t])
        for bb in range(B_):
            for k in range(H):
                decay = math.exp(float(A[k]) * float(deltas[bb, b:t, k].sum()))
                expected[bb, k] = states[t][bb, k] - decay * states[b][bb, k]
        torch.testing.assert_close(window_start_state(states[t], window, A).double(), expected, **TOL)
        if t % r == 0:
            window = rotate_window(window, states[t])
        reference = _window_at(states, deltas, t, r)
        for got, want in zip(window, reference):
            torch.testing.assert_close(got.double(), want, **TOL)


def test_rotate_window_copies_the_state():
    window = SlidingWindowState.zeros(B_, H, P, N)
    window = advance_window(window, torch.ones(B_, H))
    state = torch.ones(B_, H, P, N)
    rotated = rotate_window(window, state)
    state.mul_(5.0)  # decoding keeps updating its state in place
    assert torch.equal(rotated.new, torch.ones(B_, H, P, N))
    assert rotated.old is window.new and torch.equal(rotated.delta_sum_old, torch.ones(B_, H))
    assert torch.equal(rotated.delta_sum_new, torch.zeros(B_, H))


# ----------------------------------------------------------------------------------------------------------------
# rebuild_piece_states
# ----------------------------------------------------------------------------------------------------------------


def _pieces_setup(t0, length, period, seed=5):
    A = _decay_rates()
    deltas = _deltas(t0 + length, seed=seed)
    inserted = [_randn(B_, H, P, N, seed=100 + t, scale=0.3) for t in range(t0 + length)]
    pieces = period_pieces(t0, length, period)
    # each piece scanned from zero: s_i, and Σ Δ from its start
    piece_states, cums = [], []
    for a, e in pieces:
        zero = torch.zeros(B_, H, P, N, dtype=torch.float64)
        piece_states.append(_recurrence(zero, deltas[:, t0 + a : t0 + e], inserted[t0 + a : t0 + e], A)[-1])
        cums.append(torch.cumsum(deltas[:, t0 + a : t0 + e], dim=1))
    at_boundary = [(t0 + e) % period == 0 for _, e in pieces]
    return A, deltas, inserted, pieces, piece_states, cums, at_boundary


@pytest.mark.parametrize("t0, length", [(0, 17), (3, 14), (5, 1), (4, 8)])
def test_rebuild_piece_states_without_mitigation_is_the_recurrence(t0, length):
    A, deltas, inserted, pieces, piece_states, cums, at_boundary = _pieces_setup(t0, length, period=4)
    h_init = _randn(B_, H, P, N, seed=7)
    states = _recurrence(h_init, deltas[:, t0:], inserted[t0:], A, t0=t0)
    starts, final, window = rebuild_piece_states(h_init, piece_states, cums, A, at_boundary)
    assert window is None
    for (a, _), start in zip(pieces, starts):
        torch.testing.assert_close(start.double(), states[a], **TOL)
    torch.testing.assert_close(final.double(), states[-1], **TOL)


@pytest.mark.parametrize("t0, length", [(0, 17), (3, 14), (5, 3), (4, 8)])
def test_rebuild_piece_states_caps_at_the_period(t0, length):
    S = 4
    caps = torch.tensor([0.2, 0.5, 1e3, 0.05], dtype=torch.float64)
    A, deltas, inserted, pieces, piece_states, cums, at_boundary = _pieces_setup(t0, length, S)
    h_init = _cap_loop(_randn(B_, H, P, N, seed=8), caps)
    states = _recurrence(h_init, deltas[:, t0:], inserted[t0:], A, caps=caps, every=S, t0=t0)
    uncapped = _recurrence(h_init, deltas[:, t0:], inserted[t0:], A, t0=t0)
    assert (states[-1] - uncapped[-1]).abs().max() > 1e-2  # the cap acts
    starts, final, _ = rebuild_piece_states(h_init, piece_states, cums, A, at_boundary, caps=caps)
    for (a, _), start in zip(pieces, starts):
        torch.testing.assert_close(start.double(), states[a], **TOL)
    torch.testing.assert_close(final.double(), states[-1], **TOL)


@pytest.mark.parametrize("t0, length", [(0, 17), (3, 14), (5, 1), (8, 9)])
def test_rebuild_piece_states_with_window(t0, length):
    r = 4
    A, deltas, inserted, pieces, piece_states, cums, at_boundary = _pieces_setup(t0, length, r)
    states = _recurrence(torch.zeros(B_, H, P, N, dtype=torch.float64), deltas, inserted, A)  # from position 1
    window = _window_at(states, deltas, t0, r)
    starts, final, window = rebuild_piece_states(states[t0], piece_states, cums, A, at_boundary, window=window)
    for (a, _), start in zip(pieces, starts):
        # every position of the piece reads from the same h_b; its start state is h_a − exp(A·Σ_{b+1..a}Δ)·h_b
        b = r * max(0, math.ceil((t0 + a + 1) / r) - 2)
        expected = torch.empty_like(start, dtype=torch.float64)
        for bb in range(B_):
            for k in range(H):
                decay = math.exp(float(A[k]) * float(deltas[bb, b : t0 + a, k].sum()))
                expected[bb, k] = states[t0 + a][bb, k] - decay * states[b][bb, k]
        torch.testing.assert_close(start.double(), expected, **TOL)
    torch.testing.assert_close(final.double(), states[t0 + length], **TOL)
    for got, want in zip(window, _window_at(states, deltas, t0 + length, r)):
        torch.testing.assert_close(got.double(), want, **TOL)


# ----------------------------------------------------------------------------------------------------------------
# CPU decode steps vs transformers' kernel functions
# ----------------------------------------------------------------------------------------------------------------


def test_cpu_steps_match_transformers_functions():
    fast, reference = resolve_kernels(), resolve_kernels(cpu_fast_paths=False)
    assert resolve_kernels() is fast  # chosen once, not per call
    channels, k = 7, 4
    x = torch.randn(B_, channels, generator=_gen(1))
    weight, bias = torch.randn(channels, k, generator=_gen(2)), torch.randn(channels, generator=_gen(3))
    conv_a = torch.randn(B_, channels, k, generator=_gen(4))
    conv_b = conv_a.clone()
    torch.testing.assert_close(
        conv_update_cpu(x, conv_a, weight, bias, "silu"), reference.conv_update(x, conv_b, weight, bias, "silu")
    )
    torch.testing.assert_close(conv_a, conv_b)
    state_a = torch.randn(B_, H, P, N, generator=_gen(5))
    state_b = state_a.clone()
    args = (
        torch.randn(B_, H, P, generator=_gen(6)),
        torch.rand(B_, H, generator=_gen(7)),
        -torch.rand(H, generator=_gen(8)),
        torch.randn(B_, G, N, generator=_gen(9)),
        torch.randn(B_, G, N, generator=_gen(10)),
        torch.randn(H, generator=_gen(11)),
    )
    torch.testing.assert_close(ssm_update_cpu(state_a, *args), reference.ssm_update(state_b, *args))
    torch.testing.assert_close(state_a, state_b)


# ----------------------------------------------------------------------------------------------------------------
# the quadratic (attention-like) scan of short segments
# ----------------------------------------------------------------------------------------------------------------


def _scan_loop(x, dt, A, B, C, D, h0):
    """h_t = exp(Δ_t·A)·h_{t−1} + Δ_t·x_t B_tᵀ, y_t = C_t h_t + D·x_t, element by element in float64."""
    b, length, heads, p = x.shape
    g, n = B.shape[2], B.shape[3]
    y = torch.zeros(b, length, heads, p, dtype=torch.float64)
    h = h0.double().clone() if h0 is not None else torch.zeros(b, heads, p, n, dtype=torch.float64)
    for bi in range(b):
        for hi in range(heads):
            gi = hi // (heads // g)
            for t in range(length):
                decay = math.exp(float(dt[bi, t, hi]) * float(A[hi]))
                for pi in range(p):
                    for ni in range(n):
                        h[bi, hi, pi, ni] = decay * h[bi, hi, pi, ni] + float(dt[bi, t, hi]) * float(
                            x[bi, t, hi, pi]
                        ) * float(B[bi, t, gi, ni])
                    y[bi, t, hi, pi] = sum(float(C[bi, t, gi, ni]) * h[bi, hi, pi, ni] for ni in range(n)) + float(
                        D[hi]
                    ) * float(x[bi, t, hi, pi])
    return y, h


def _scan_inputs(length, groups, seed=0, initial=True):
    g = _gen(seed)
    return (
        torch.randn(B_, length, H, P, generator=g),
        torch.rand(B_, length, H, generator=g) * 0.8,
        -torch.rand(H, generator=g) * 2,
        torch.randn(B_, length, groups, N, generator=g),
        torch.randn(B_, length, groups, N, generator=g),
        torch.randn(H, generator=g),
        torch.randn(B_, H, P, N, generator=g) if initial else None,
    )


@pytest.mark.parametrize("length, groups, initial", [(1, 1, True), (7, 2, True), (13, 4, False), (16, 1, False)])
def test_quadratic_scan_matches_the_recurrence(length, groups, initial):
    args = _scan_inputs(length, groups, initial=initial)
    y, state = quadratic_scan(*args)
    y_ref, state_ref = _scan_loop(*args)
    torch.testing.assert_close(y.double(), y_ref, **TOL)
    torch.testing.assert_close(state.double(), state_ref, **TOL)


@pytest.mark.parametrize("initial", [True, False])
def test_quadratic_scan_without_final_state_gives_the_same_outputs(initial):
    """return_final_state=False (a training step without cache) skips only the state: outputs equal the recurrence."""
    args = _scan_inputs(11, 2, seed=5, initial=initial)
    y, state = quadratic_scan(*args, return_final_state=False)
    assert state is None
    torch.testing.assert_close(y.double(), _scan_loop(*args)[0], **TOL)


@pytest.mark.parametrize("length", [5, 64, 130])
def test_quadratic_scan_matches_transformers_chunk_scan_with_gradients(length):
    """Values and gradients (the training path) agree with transformers' PyTorch chunk scan."""
    chunk_scan = resolve_kernels(cpu_fast_paths=False).chunk_scan
    args = [a.clone().requires_grad_(a.is_floating_point()) for a in _scan_inputs(length, 2, seed=3)]
    x, dt, A, B, C, D, h0 = args
    y_q, s_q = quadratic_scan(x, dt, A, B, C, D, h0)
    grads_q = torch.autograd.grad((y_q.square().sum() + s_q.sum()), args)
    y_c, s_c = chunk_scan(x, dt, A, B, C, chunk_size=32, D=D, z=None, dt_bias=None, dt_softplus=False,
                          initial_states=h0, return_final_states=True)  # fmt: skip
    grads_c = torch.autograd.grad((y_c.square().sum() + s_c.sum()), args)
    torch.testing.assert_close(y_q, y_c, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s_q, s_c, rtol=1e-4, atol=1e-4)
    for gq, gc in zip(grads_q, grads_c):
        torch.testing.assert_close(gq, gc, rtol=1e-3, atol=1e-3)


def test_short_segments_take_the_quadratic_scan_on_cpu():
    fast = resolve_kernels()
    assert fast.quadratic_max == (QUADRATIC_SCAN_MAX if fast.torch_scan else 0)  # only where PyTorch scans
    assert resolve_kernels(cpu_fast_paths=False).quadratic_max == 0
