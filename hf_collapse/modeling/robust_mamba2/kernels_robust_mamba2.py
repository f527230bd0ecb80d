"""Which scan and step functions the Robust Mamba-2 mixer calls, chosen once.

transformers wraps each Mamba-2 kernel (``mamba2_chunk_scan``, ``mamba2_selective_state_update``,
``causal_conv1d_fn``, ``causal_conv1d_update``, ``mamba2_split_conv1d_scan_combined``) in a function that calls the
fused kernel of ``mamba_ssm`` / ``causal_conv1d`` when one was importable, else its own PyTorch reference; the wrapper
makes that choice when transformers is imported. ``resolve_kernels`` reads those choices once per process and returns
a frozen ``Mamba2Kernels`` that the mixer keeps.

Where only the PyTorch references exist (CPU), the one-token steps are replaced by elementwise twins with the same
arithmetic (transformers' ``F.conv1d`` over a concatenation and its per-element exp dominated CPU decode time), and
the chunk scan is called with a short chunk. With a fused kernel installed, transformers' functions are called.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN
from transformers.models.mamba2 import modeling_mamba2 as _m2

__all__ = [
    "Mamba2Kernels",
    "QUADRATIC_SCAN_MAX",
    "TORCH_SCAN_CHUNK",
    "conv_update_cpu",
    "is_torch_fallback",
    "quadratic_scan",
    "resolve_kernels",
    "ssm_update_cpu",
]

# chunk of the PyTorch chunk scan: its intra-chunk work grows with the chunk and it pads to a multiple of it, so a
# short chunk is faster on CPU (measured: 64 is ~2x faster than 256 at 4K tokens for mamba2-130m shapes); the result
# is the same up to rounding
TORCH_SCAN_CHUNK = 64
# where only PyTorch runs, segments are scanned in the quadratic (attention-like) form, in pieces of at most this many
# tokens chained through the state: one (l × l) matrix per head beats the chunk scan's per-chunk passes and state
# hand-offs, forward and backward, while memory stays bounded by the piece
QUADRATIC_SCAN_MAX = 256


def is_torch_fallback(fn: Callable) -> bool:
    """True when transformers' kernel wrapper ``fn`` dispatches to its own PyTorch reference implementation.

    If it cannot be told (another transformers version, hub kernels), answer False so the wrapper is called."""
    try:
        return inspect.getclosurevars(fn).nonlocals.get("is_new_implementation") is False
    except Exception:  # pragma: no cover - defensive
        return False


def conv_update_cpu(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """One step of the depthwise causal conv; ``conv_state`` is shifted in place.

    Args:
        x: (b, channels) the new input.
        conv_state: (b, channels, kernel) the last ``kernel`` inputs.
        weight: (channels, kernel); bias: (channels,) or None.
        activation: transformers' activation name (Mamba-2: ``"silu"``), or None.

    Returns:
        (b, channels), same as ``causal_conv1d_update``: a shift plus a ``kernel``-tap multiply-add.
    """
    conv_state[:, :, :-1] = conv_state[:, :, 1:].clone()
    conv_state[:, :, -1] = x.to(conv_state.dtype)
    out = torch.einsum("bck,ck->bc", conv_state.to(weight.dtype), weight)
    if bias is not None:
        out = out + bias
    if activation in ("silu", "swish"):
        out = F.silu(out)  # ACT2FN builds a module at every lookup, too slow for a per-token step
    elif activation is not None:
        out = ACT2FN[activation](out)
    return out.to(x.dtype)


def ssm_update_cpu(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """One SSM step, ``state`` updated in place: h ← exp(Δ·A)·h + (Δ·x) Bᵀ, y = C h + D·x.

    Args:
        state: (b, h, p, n) float32, contiguous.
        x: (b, h, p); dt: (b, h) Δ, already softplus-ed and clamped; A: (h,); B, C: (b, g, n); D: (h,).

    Returns:
        (b, h, p) in the dtype of ``x``. Same recurrence as ``mamba2_selective_state_update``, but the decay is
        computed once per (b, h) instead of per state element, and the state is touched in three passes.
    """
    batch, heads, head_dim = x.shape
    n = B.shape[-1]
    rep = heads // B.shape[1]
    Bh = B.float().repeat_interleave(rep, dim=1).reshape(batch * heads, 1, n)
    Ch = C.float().repeat_interleave(rep, dim=1).reshape(batch * heads, 1, n)
    dA = torch.exp(dt.float() * A.float())  # (b, h)
    u = (dt.float()[..., None] * x.float()).reshape(batch * heads, head_dim, 1)  # Δ·x
    flat = state.view(batch * heads, head_dim, n)
    # elementwise forms: measured 4-6x faster on CPU than baddbmm/bmm, which run thousands of tiny GEMMs
    flat.mul_(dA.reshape(-1, 1, 1)).addcmul_(u, Bh)
    y = (flat * Ch).sum(-1).view(batch, heads, head_dim) + D.float()[:, None] * x.float()
    return y.to(x.dtype)


def quadratic_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    initial_states: torch.Tensor | None = None,
    return_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The SSD scan of one segment in its quadratic ("attention") form: exact, no chunking.

    With a_t = Δ_t·A and S_t = Σ_{s≤t} a_s (per head), the recurrence h_t = exp(a_t) h_{t-1} + Δ_t x_t B_tᵀ,
    y_t = C_t h_t + D x_t unrolls to

        y_t = Σ_{s≤t} exp(S_t − S_s) (C_t·B_s) Δ_s x_s  +  exp(S_t) C_t h_0  +  D x_t
        h_l = exp(S_l) h_0 + Σ_s exp(S_l − S_s) Δ_s x_s B_sᵀ

    Args:
        x: (b, l, h, p); dt: (b, l, h) Δ, already softplus-ed and clamped; A: (h,); B, C: (b, l, g, n); D: (h,);
        initial_states: (b, h, p, n) or None (zeros).
        return_final_state: False skips h_l (returned as None). It costs l·h·p·n multiply-adds, a sizeable part of
            a short segment's scan when the state is large, and a training step without cache never reads it.

    Returns:
        y (b, l, h, p) in the dtype of ``x`` and the final state (b, h, p, n) float32 (or None), as
        ``mamba2_chunk_scan`` returns them. Memory grows with l², so longer segments are scanned as chained pieces
        of at most ``QUADRATIC_SCAN_MAX`` tokens (the mixer's ``_scan``).
    """
    b, seq_len, heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    rep = heads // groups  # head i reads group i // rep, as transformers' repeat_interleave
    xf, dtf, Bf, Cf = x.float(), dt.float(), B.float(), C.float()
    S = torch.cumsum(dtf * A.float(), dim=1)  # (b, l, h)
    St = S.transpose(1, 2)  # (b, h, l)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device).tril()
    # S_t − S_s ≤ 0 on and below the diagonal; above it −inf, so exp gives exactly 0 and no overflow
    decay = (St[:, :, :, None] - St[:, :, None, :]).masked_fill(~causal, float("-inf")).exp()  # (b, h, t, s)
    # C_t·B_s once per group, not per head: with n_groups=1 and a large state this is most of the work saved
    CB = torch.einsum("btgn,bsgn->bgts", Cf, Bf)  # (b, g, t, s)
    scores = (decay.view(b, groups, rep, seq_len, seq_len) * CB[:, :, None]).view(b, heads, seq_len, seq_len)
    u = dtf[..., None] * xf  # (b, l, h, p): Δ·x
    y = torch.einsum("bhts,bshp->bthp", scores, u) + D.float()[:, None] * xf
    state = None
    if return_final_state:
        to_end = (S[:, -1:] - S).exp()  # (b, l, h): exp(S_l − S_s)
        w = (u * to_end[..., None]).reshape(b, seq_len, groups, rep * head_dim)
        state = torch.einsum("bsgq,bsgn->bgqn", w, Bf).reshape(b, heads, head_dim, n)
    if initial_states is not None:
        h0 = initial_states.float()
        carried = torch.einsum("btgn,bgqn->btgq", Cf, h0.reshape(b, groups, rep * head_dim, n))
        y = y + carried.reshape(b, seq_len, heads, head_dim) * S.exp()[..., None]
        if state is not None:
            state = state + St[:, :, -1].exp()[..., None, None] * h0
    return y.to(x.dtype), state


def _conv_update_wrapper(fn, x, conv_state, weight, bias, activation):
    # transformers' causal_conv1d_update works on (b, channels, l)
    return fn(x[..., None], conv_state, weight, bias, activation=activation)[..., 0]


def _ssm_update_wrapper(fn, state, x, dt, A, B, C, D):
    # mamba2_selective_state_update takes dt, A and D per head_dim element (and per state element for A)
    head_dim, state_size = x.shape[-1], state.shape[-1]
    return fn(
        state,
        x,
        dt[..., None].expand(-1, -1, head_dim),
        A[:, None, None].expand(-1, head_dim, state_size),
        B,
        C,
        D[:, None].expand(-1, head_dim),
        z=None,
        dt_bias=None,
        dt_softplus=False,
    )


@dataclass(frozen=True)
class Mamba2Kernels:
    """The functions one mixer calls. Every field is fixed when the set is built by ``resolve_kernels``.

    * ``chunk_scan``: ``mamba2_chunk_scan`` (multi-token scan, transformers' signature).
    * ``conv_fn``: ``causal_conv1d_fn`` (multi-token conv, transformers' signature).
    * ``conv_update(x, conv_state, weight, bias, activation)``: one conv step, as ``conv_update_cpu``.
    * ``ssm_update(state, x, dt, A, B, C, D)``: one SSM step, as ``ssm_update_cpu``.
    * ``fused_forward``: ``mamba2_split_conv1d_scan_combined`` is a fused kernel, so a call without cache and
      without mitigations can run transformers' own forward unchanged.
    * ``torch_scan``: ``chunk_scan`` is the PyTorch reference and is called with a chunk of at most
      ``TORCH_SCAN_CHUNK``.
    * ``cpu_steps``: ``ssm_update`` is ``ssm_update_cpu`` (the PyTorch fallbacks are in use for decoding).
    * ``quadratic_max``: segments go through ``quadratic_scan`` instead of ``chunk_scan``, in pieces of at most this
      many tokens chained through the state (0: never; ``QUADRATIC_SCAN_MAX`` where the chunk scan is the PyTorch
      reference).
    """

    chunk_scan: Callable
    conv_fn: Callable
    conv_update: Callable
    ssm_update: Callable
    fused_forward: bool
    torch_scan: bool
    cpu_steps: bool
    quadratic_max: int = 0

    def scan_chunk(self, chunk_size: int, length: int) -> int:
        """The chunk to call ``chunk_scan`` with for ``length`` tokens (fused kernels keep the configured one)."""
        if not self.torch_scan:
            return chunk_size
        return min(chunk_size, TORCH_SCAN_CHUNK, 1 << (length - 1).bit_length())


@functools.cache
def resolve_kernels(cpu_fast_paths: bool = True) -> Mamba2Kernels:
    """The kernel set for this process (computed once per argument and cached).

    Args:
        cpu_fast_paths: use the elementwise decode steps and the short scan chunk where transformers' functions are
            their PyTorch references. ``False`` calls transformers' functions for everything, which is what runs
            on a GPU with fused kernels; tests use it to check the fast steps against them on CPU.
    """
    cpu_ssm = cpu_fast_paths and is_torch_fallback(_m2.mamba2_selective_state_update)
    cpu_conv = cpu_ssm and is_torch_fallback(_m2.causal_conv1d_update)
    torch_scan = cpu_fast_paths and is_torch_fallback(_m2.mamba2_chunk_scan)
    return Mamba2Kernels(
        chunk_scan=_m2.mamba2_chunk_scan,
        conv_fn=_m2.causal_conv1d_fn,
        conv_update=conv_update_cpu if cpu_conv else functools.partial(_conv_update_wrapper, _m2.causal_conv1d_update),
        ssm_update=(
            ssm_update_cpu if cpu_ssm else functools.partial(_ssm_update_wrapper, _m2.mamba2_selective_state_update)
        ),
        fused_forward=not is_torch_fallback(_m2.mamba2_split_conv1d_scan_combined),
        torch_scan=torch_scan,
        cpu_steps=cpu_ssm,
        quadratic_max=QUADRATIC_SCAN_MAX if torch_scan else 0,
    )
