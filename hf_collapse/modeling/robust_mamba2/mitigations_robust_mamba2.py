"""The state-collapse mitigations of Robust Mamba-2 as pure tensor functions.

No module state and no cache objects: each function takes tensors and numbers and returns new tensors (only
``cap_state_norm(..., inplace=True)`` writes into its argument, for the decode step that keeps its state in place).
``tests/test_robust_mamba2_functions.py`` checks each one against a float64 loop written from the equations.

Names follow transformers' Mamba-2: b batch, l positions, h heads, p head_dim, n state size, g groups. Per head, with
Δ_t the softplus-ed, clamped time step and A = −exp(A_log)·decay_scale < 0 (positions t are 1-indexed):

    h_t = exp(Δ_t·A)·h_{t−1} + Δ_t·x_t B_tᵀ,        y_t = C_tᵀ h_t + D·x_t.

Over a run of positions that starts from a state h_0 the recurrence is linear, so h_t is what the run inserted (a scan
from a zero state) plus exp(A·Σ_{j≤t} Δ_j)·h_0. The prefill scans runs from zero and adds the second term with
``state_readout``; ``rebuild_piece_states`` chains the runs and changes the carried state where the mitigations act:
``state_norm_max`` caps it (``cap_state_norm``) and ``sliding_window`` stores it as a window boundary
(``rotate_window``), both at multiples of a period.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = [
    "SlidingWindowState",
    "advance_window",
    "cap_state_norm",
    "period_pieces",
    "rebuild_piece_states",
    "rotate_window",
    "state_readout",
    "window_start_state",
]


def cap_state_norm(state: torch.Tensor, caps: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``state_norm_max``: h ← h·min(1, τ_h / ‖h‖_F), per batch row and head.

    Args:
        state: (b, h, p, n) states.
        caps: (h,) caps τ of one layer.
        inplace: scale ``state`` itself and return it (the decode step updates its state in place).

    Returns:
        (b, h, p, n) capped states.
    """
    norm = state.float().flatten(2).norm(dim=-1)  # (b, h)
    # clamp_min: a zero state has norm 0, and its factor must be 1, not nan
    factor = torch.clamp(caps[None, :] / norm.clamp_min(1e-30), max=1.0)[..., None, None].to(state.dtype)
    return state.mul_(factor) if inplace else state * factor


def state_readout(
    C: torch.Tensor, delta_cum: torch.Tensor, A: torch.Tensor, h0: torch.Tensor, n_groups: int
) -> torch.Tensor:
    """exp(A·ΣΔ)·(C_tᵀ h0): what a state h0 held before a run of positions contributes to their outputs.

    Used for the carried state of a run scanned from zero, and (subtracted) for the sliding window's h_b.

    Args:
        C: (b, l, g·n) or (b, l, g, n) read-out vectors of the run.
        delta_cum: (b, l, h) Σ Δ from the start of the run up to and including each position.
        A: (h,) decay rates.
        h0: (b, h, p, n) state before the run.
        n_groups: g; head k reads group k // (h / g), as in transformers.

    Returns:
        (b, l, h, p), float32 (float64 if ``A`` or ``delta_cum`` is).
    """
    batch, length = C.shape[:2]
    heads, head_dim, state_size = h0.shape[1:]
    C = C.float().reshape(batch, length, n_groups, state_size)
    h0 = h0.float().reshape(batch, n_groups, heads // n_groups, head_dim, state_size)
    # (b, l, g, n) x (b, g, k, p, n) -> (b, l, g, k, p): C_tᵀ h0 for every head k of group g
    ch = torch.einsum("blgn,bgkpn->blgkp", C, h0).reshape(batch, length, heads, head_dim)
    return torch.exp(A[None, None, :] * delta_cum)[..., None] * ch


def period_pieces(t0: int, length: int, period: int) -> list[tuple[int, int]]:
    """Cut positions t0+1 .. t0+length where the state changes outside the recurrence, at multiples of ``period``.

    Returns local ``(start, end)`` pairs (end exclusive) that cover ``range(length)``; every piece but the last ends
    at a multiple of ``period``, the last one may end at ``length``.
    """
    first = (t0 // period + 1) * period - t0  # local end of the first piece
    cuts = sorted({0, length, *range(first, length, period)})
    return list(zip(cuts[:-1], cuts[1:]))


class SlidingWindowState(NamedTuple):
    """What ``sliding_window`` needs to resume exactly, per layer.

    With r = sliding_window the output at position t reads h_t − exp(A·Σ_{j=b+1..t} Δ_j)·h_b, b = r·max(0, ⌈t/r⌉ − 2).
    The decay of h_b comes from a sum of Δ (stable), never from a product of α.
    """

    old: torch.Tensor  # (b, h, p, n): h_b, the boundary state the current output window starts after
    new: torch.Tensor  # (b, h, p, n): the state at the latest multiple of r, the next h_b
    delta_sum_old: torch.Tensor  # (b, h): Σ Δ since the boundary of `old`
    delta_sum_new: torch.Tensor  # (b, h): Σ Δ since the boundary of `new`

    @classmethod
    def zeros(cls, batch: int, heads: int, head_dim: int, state_size: int, device=None) -> SlidingWindowState:
        """The window before the first token: h_0 = 0 at both boundaries."""
        state = torch.zeros(batch, heads, head_dim, state_size, device=device)
        sums = torch.zeros(batch, heads, device=device)
        return cls(state, state, sums, sums)


def advance_window(window: SlidingWindowState, delta_sum: torch.Tensor) -> SlidingWindowState:
    """Account for new positions: ``delta_sum`` (b, h), their Σ Δ, is added to both sums."""
    return window._replace(
        delta_sum_old=window.delta_sum_old + delta_sum, delta_sum_new=window.delta_sum_new + delta_sum
    )


def rotate_window(window: SlidingWindowState, state: torch.Tensor) -> SlidingWindowState:
    """At t = m·r, with ``state`` (b, h, p, n) = h_t: the next outputs read h − exp(A·Σ_{j=(m−1)r+1..}Δ)·h_{(m−1)r}.

    ``state`` is copied, because the decode step goes on updating it in place.
    """
    return SlidingWindowState(
        old=window.new,
        new=state.clone(),
        delta_sum_old=window.delta_sum_new,
        delta_sum_new=torch.zeros_like(window.delta_sum_new),
    )


def window_start_state(state: torch.Tensor, window: SlidingWindowState, A: torch.Tensor) -> torch.Tensor:
    """h − exp(A·ΣΔ_old)·h_b: the part of ``state`` (b, h, p, n) that the window lets the outputs read.

    Over a run with no boundary inside, the run's outputs read exactly this state as their start state.
    """
    return state - torch.exp(A * window.delta_sum_old)[..., None, None] * window.old


def rebuild_piece_states(
    state: torch.Tensor,
    piece_states: Sequence[torch.Tensor],
    delta_cums: Sequence[torch.Tensor],
    A: torch.Tensor,
    at_boundary: Sequence[bool],
    caps: torch.Tensor | None = None,
    window: SlidingWindowState | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, SlidingWindowState | None]:
    """The true state at every cut of a segment whose pieces were scanned from a zero state.

    Piece i starts from h_start and, by linearity, ends at h_end = exp(A·ΣΔ_i)·h_start + s_i, with s_i its final
    state when scanned from zero. Where a piece ends at a multiple of the period, h_end is capped (``caps``) or
    becomes a window boundary (``window``) before the next piece starts from it.

    Args:
        state: (b, h, p, n) float32 state before the first piece.
        piece_states: per piece, (b, h, p, n): s_i.
        delta_cums: per piece, (b, l_i, h) float32: Σ Δ from the piece's start up to each of its positions.
        A: (h,) decay rates.
        at_boundary: per piece, whether it ends at a multiple of the period.
        caps: (h,) ``state_norm_max`` caps of this layer, or None.
        window: ``sliding_window`` state before the first piece, or None.

    Returns:
        ``(starts, state, window)``: per piece the (b, h, p, n) start state its outputs read (with a window: the
        start state minus the decayed h_b), the (b, h, p, n) float32 state after the last piece, and the window
        after the last piece (None without one).
    """
    starts = []
    for s_piece, cum, boundary in zip(piece_states, delta_cums, at_boundary):
        start = state
        if window is not None:
            start = window_start_state(state, window, A)
            window = advance_window(window, cum[:, -1])
        starts.append(start)
        state = torch.exp(A * cum[:, -1])[..., None, None] * state + s_piece.float()
        if boundary:
            if caps is not None:
                state = cap_state_norm(state, caps)
            if window is not None:
                window = rotate_window(window, state)
    return starts, state, window
