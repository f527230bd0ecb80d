"""Compiled batch-1 decoding for RobustMamba2: one fused step per layer, matrix-vector products at memory speed.

A one-token step of a 130m Mamba-2 is ~200 small eager ops per layer plus three matrix-vector products. On CPU
both cost: the ops' dispatch overhead is a third of the step, and ``F.linear`` with one input row reaches about
10 GB/s (fp32) and 6 GB/s (bf16), a third of what the machine reads. ``torch.compile`` (inductor) of the functions
below turns each layer's step into a few generated C++ loops, and writes the projections as ``(W * x).sum(-1)``, a
reduction inductor vectorises and parallelises itself, converting bf16 weights in registers: on the 2-core machine
of the benchmarks it reads fp32 weights at 18 GB/s on one thread and bf16 at 13 GB/s, and the second thread helps
(``benchmarks/robust_mamba2.py --parts decode_step``).

Enabled with ``RobustMamba2ForCausalLM.compile_decode()``. The functions also run eagerly (``_matvec`` then calls
``F.linear``), which is how ``tests/`` check them against the float64 reference.

Shapes: d hidden, h heads, p head_dim, n state size, g groups, k conv kernel, c conv channels (h·p + 2·g·n).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["decode_layer_step", "decode_head_logits", "decode_step"]


def _materialize_op():
    """``hf_collapse::materialize``: an identity op that is opaque to inductor, defined once per process.

    Inductor inlines whatever computed a matrix-vector product's input (a norm) into the product's inner loop and
    recomputes it per weight row; behind this op the product reads a finished float32 vector instead. Defined
    lazily, and only if absent, because this module can be imported twice (hf_collapse and a ``trust_remote_code``
    copy of the same file) and an op name can be registered only once."""
    try:
        return torch.ops.hf_collapse.materialize.default
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("hf_collapse::materialize", mutates_args=())
    def materialize(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @materialize.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    return torch.ops.hf_collapse.materialize.default


_MATERIALIZE = _materialize_op()


def _matvec(weight: torch.Tensor, x: torch.Tensor, split_input: bool = False) -> torch.Tensor:
    """(rows, cols) @ (cols,) -> (rows,) float32, accumulated in float32.

    Compiled, it is one fused reduction that never materialises ``W * x``, written as 4 partial sums per row (4
    independent accumulator chains: 1.4x faster on one thread than one sum). ``split_input`` puts the opaque
    ``hf_collapse::materialize`` before it: inductor otherwise inlines whatever computed ``x`` (a norm) into the
    inner loop and recomputes it per weight row, which makes a one-thread step compute-bound; with two threads the fused form
    parallelises better than the split one (both measured, ``docs/robust_mamba2.md``). Run eagerly (dynamo falling
    back, e.g. past its recompile limit) the reduction form would materialise ``W * x``, so eager mode takes
    ``F.linear``."""
    if not torch.compiler.is_compiling():
        return F.linear(x.to(weight.dtype), weight).float()
    x = _MATERIALIZE(x.float()) if split_input else x.float()
    rows, cols = weight.shape
    parts = 4 if cols % 4 == 0 else 1
    return (weight.float().view(rows, parts, cols // parts) * x.view(parts, cols // parts)).sum(-1).sum(-1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    # Mamba2RMSNorm: normalise in float32, cast back to the input dtype, then scale
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def decode_layer_step(
    hidden: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    norm_weight: torch.Tensor,
    in_proj_weight: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    decay_scale: torch.Tensor,
    D: torch.Tensor,
    gated_norm_weight: torch.Tensor,
    out_proj_weight: torch.Tensor,
    *,
    n_groups: int,
    state_size: int,
    head_dim: int,
    eps: float,
    gated_eps: float,
    insertion_scale: float,
    time_step_min: float,
    time_step_max: float,
    residual_in_fp32: bool,
    split_input: bool = False,
) -> torch.Tensor:
    """One Mamba-2 block (norm, mixer, residual) for one token of one sequence; the states are updated in place.

    Args:
        hidden: (1, d) the block's input, in the model dtype.
        conv_state: (1, c, k) the last k conv inputs; ssm_state: (1, h, p, n) float32.
        A_log: (h,) the mixer's parameter (A = −exp(A_log)); decay_scale: (h,) float32, ones when off.
        The remaining tensors are the block's parameters (``in_proj``/``out_proj`` without bias, as Mamba-2).

    Returns:
        (1, d) the block's output (residual added), float32 when ``residual_in_fp32``, else the model dtype.
    """
    dtype = norm_weight.dtype  # the model's dtype (hidden is float32 after a residual_in_fp32 block)
    A = -torch.exp(A_log.float()) * decay_scale  # (h,)
    heads = A.shape[0]
    inner = heads * head_dim
    gn = n_groups * state_size
    # Mamba2Block casts its input to the norm's dtype first (a float32 residual becomes bf16 in a bf16 model)
    x_in = _rms_norm(hidden[0].to(norm_weight.dtype), norm_weight, eps, norm_weight.dtype)  # (d,)
    projected = _matvec(in_proj_weight, x_in, split_input).to(dtype)  # (2·inner + 2·g·n + h,)
    gate, xBC, dt = projected.split([inner, inner + 2 * gn, heads])

    # depthwise causal conv over the last k inputs (conv_state shifted in place)
    conv_state.copy_(torch.cat([conv_state[0, :, 1:], xBC[:, None].to(conv_state.dtype)], dim=-1)[None])
    xBC = (conv_state[0].float() * conv_weight.float()).sum(-1)
    if conv_bias is not None:
        xBC = xBC + conv_bias.float()
    xBC = F.silu(xBC).to(dtype)
    x, B, C = xBC.split([inner, gn, gn])

    # h <- exp(Δ·A)·h + Δ·x Bᵀ ; y = C h + D·x   (the recurrence in float32, whatever the weights' dtype)
    delta = F.softplus(dt.float() + dt_bias.float()).clamp(time_step_min, time_step_max)  # (h,)
    rep = heads // n_groups
    Bh = (B.float() * insertion_scale).view(n_groups, 1, state_size).repeat_interleave(rep, 0)  # (h, 1, n)
    Ch = C.float().view(n_groups, 1, state_size).repeat_interleave(rep, 0)
    xh = x.float().view(heads, head_dim)
    state = ssm_state[0]
    new_state = state * torch.exp(delta * A)[:, None, None] + (delta[:, None] * xh)[..., None] * Bh  # (h, p, n)
    ssm_state.copy_(new_state[None])
    y = (new_state * Ch).sum(-1) + D.float()[:, None] * xh  # (h, p)
    y = y.to(dtype).reshape(inner)

    # gated RMSNorm (MambaRMSNormGated: groups of inner / n_groups), then the output projection
    yg = y.float() * F.silu(gate.float())
    yg = yg.view(n_groups, -1)
    yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + gated_eps)
    y = gated_norm_weight * yg.reshape(inner).to(dtype)
    out = _matvec(out_proj_weight, y.to(out_proj_weight.dtype), split_input).to(dtype)  # (d,)
    residual = hidden[0].float() if residual_in_fp32 else hidden[0]
    return (residual + out)[None]


def decode_head_logits(hidden: torch.Tensor, norm_weight: torch.Tensor, eps: float, head_weight: torch.Tensor,
                       split_input: bool = False) -> torch.Tensor:  # fmt: skip
    """``norm_f`` then the LM head for one token of one sequence: (1, d) -> (1, vocab) float32 logits."""
    x = _rms_norm(hidden[0], norm_weight, eps, hidden.dtype)
    return _matvec(head_weight, x.to(head_weight.dtype), split_input)[None]


def decode_step(
    hidden: torch.Tensor,
    conv_states: list[torch.Tensor],
    ssm_states: list[torch.Tensor],
    layer_weights: list[tuple[torch.Tensor | None, ...]],
    norm_f_weight: torch.Tensor,
    head_weight: torch.Tensor,
    *,
    norm_f_eps: float,
    num_threads: int,
    **layer_kwargs,
) -> torch.Tensor:
    """Every layer and the head for one token of one sequence: (1, d) embedding -> (1, vocab) float32 logits.

    Compiled as ONE graph, so a step costs one guard check and one call instead of one per layer (on CPU the
    per-call overhead of 24 separate compiled layers was ~5 ms, as much as reading the fp32 weights of a layer).

    Args:
        conv_states / ssm_states: one per layer, updated in place.
        layer_weights: one tuple per layer, in ``decode_layer_step``'s order: (norm_weight, in_proj_weight,
            conv_weight, conv_bias, dt_bias, A_log, decay_scale, D, gated_norm_weight, out_proj_weight).
        num_threads: ``torch.get_num_threads()``. torch.compile guards on it, so a new thread count recompiles:
            inductor writes the thread count into its C++ loops. It also picks ``split_input`` (one thread only).
        layer_kwargs: ``decode_layer_step``'s keyword arguments, the same for every layer.
    """
    split = num_threads == 1
    for conv_state, ssm_state, weights in zip(conv_states, ssm_states, layer_weights):
        hidden = decode_layer_step(hidden, conv_state, ssm_state, *weights, split_input=split, **layer_kwargs)
    return decode_head_logits(hidden, norm_f_weight, norm_f_eps, head_weight, split)
