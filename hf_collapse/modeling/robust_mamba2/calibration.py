"""Helpers for choosing mitigation settings: ``state_norm_max`` calibration and the paper's T_forget fit."""

from __future__ import annotations

import torch

from .cache_robust_mamba2 import RobustMamba2Cache
from .configuration_robust_mamba2 import RobustMamba2Config

__all__ = ["calibrate_state_norms", "recommended_training_length", "state_elements"]


@torch.no_grad()
def calibrate_state_norms(
    model,
    input_ids: torch.Tensor,
    margin: float = 1.0,
    write_to_config: bool = False,
    every: int | None = None,
) -> list[list[float]]:
    """Per-(layer, head) maximum Frobenius norm of the SSM state over in-distribution input.

    Use text *within the training length* (the states the model has learned to handle), never the evaluation text.
    The model is run with its current ``insertion_scale`` / ``decay_scale`` and without ``state_norm_max``, in
    steps of ``every`` tokens (default ``config.state_norm_every``, i.e. where the cap is checked), and the state
    norm is read from the cache after each step.

    Args:
        model: a ``RobustMamba2ForCausalLM`` (or ``RobustMamba2Model``).
        input_ids: (batch, length) token ids; every row is one in-distribution sequence.
        margin: factor applied to the maxima (e.g. 1.1 allows 10% more than seen).
        write_to_config: also set ``model.config.state_norm_max`` to the result (turns the cap on).
        every: step, in tokens, between norm readings.

    Returns:
        A (num_hidden_layers, num_heads) list of caps τ = margin · max norm.
    """
    config: RobustMamba2Config = model.config
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    every = every or config.state_norm_every
    saved = config.state_norm_max
    config.state_norm_max = None  # measure the uncapped states
    was_training = model.training
    model.eval()
    try:
        cache = RobustMamba2Cache(config=config)
        device = next(model.parameters()).device
        input_ids = input_ids.to(device)
        best = torch.zeros(config.num_hidden_layers, config.num_heads, dtype=torch.float64)
        for start in range(0, input_ids.shape[1], every):
            model(input_ids[:, start : start + every], cache=cache, use_cache=True, **_logits_kwargs(model))
            for i, layer in enumerate(cache.layers):
                norms = layer.recurrent_states[0].float().flatten(2).norm(dim=-1)  # (batch, heads)
                best[i] = torch.maximum(best[i], norms.max(dim=0).values.double().cpu())
    finally:
        config.state_norm_max = saved
        model.train(was_training)
    caps = (best * margin).clamp_min(1e-6).tolist()
    if write_to_config:
        config.state_norm_max = caps
        config.check_mitigations()
    return caps


def _logits_kwargs(model) -> dict:
    # the LM head is not needed to read states; ask the causal LM for one position only
    return {"logits_to_keep": 1} if hasattr(model, "lm_head") else {}


def state_elements(config) -> int:
    """Number of recurrent-state elements of the whole model: layers × heads × head_dim × state_size."""
    return config.num_hidden_layers * config.num_heads * config.head_dim * config.state_size


def recommended_training_length(config) -> int:
    """Training length (tokens) above which the model should learn to forget, from the paper's *empirical* fit.

    Chen et al. (Stuffed Mamba, arXiv 2410.07145, Sec. 5) fit T_forget ≈ 5.172·N_S − 4.469, with N_S the state size
    in millions of elements and T_forget in thousands of tokens, on their Mamba-2 runs. This helper evaluates that
    fit with N_S = ``state_elements(config)`` (layers × heads × head_dim × state_size). It is an extrapolation
    outside the paper's range of model sizes, and it is ≤ 0 below about 0.86M state elements; then 0 is returned.
    Train (or continue training) with sequences longer than the returned value.
    """
    n_s = state_elements(config) / 1e6
    t_forget_k = 5.172 * n_s - 4.469
    return max(0, round(t_forget_k * 1000))
