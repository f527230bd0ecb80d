"""Helpers for choosing mitigation settings: ``state_norm_max`` and ``decay_scale`` calibration, the T_forget fit.

Both calibrations run the model on in-distribution text *within the training length* and, with
``write_to_config=True``, validate the new value on a copy of the config before writing it, so a value that cannot be
used (e.g. caps on a model with a sliding window) raises and leaves the config as it was.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .cache_robust_mamba2 import RobustMamba2Cache
from .configuration_robust_mamba2 import RobustMamba2Config

__all__ = [
    "DECAY_SCALE_CANDIDATES",
    "DEFAULT_MEMORY_THRESHOLD",
    "calibrate_decay_scales",
    "calibrate_state_norms",
    "first_token_memory",
    "recommended_training_length",
    "state_elements",
]

# powers of two: each step halves the half-life of a head; 256 turns a head that keeps 99% of the first token over
# the training length into one that keeps 0.99**256 ≈ 8%
DECAY_SCALE_CANDIDATES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)

# Default for calibrate_decay_scales: the largest fraction of the first token's state a head may still hold at the
# end of the training length. Why 0.1: with a decay that keeps m of the state over T tokens, a head's state can grow
# past position T by at most a factor 1/(1 − m) over what it reached at T (inputs of equal size all pointing the
# same way; about 1/sqrt(1 − m²) for unrelated inputs). m ≤ 0.1 bounds that growth to ~11%, about the margin one
# gives calibrated norm caps, so beyond the training length the head sees states of the sizes it was trained on. A
# threshold of 0.5 would allow the state to double; much lower thresholds change heads that already forget.
DEFAULT_MEMORY_THRESHOLD = 0.1


def _check_ids(name: str, input_ids: torch.Tensor) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError(
            f"{name}: input_ids must be a (batch, length) tensor, got {getattr(input_ids, 'shape', type(input_ids))}"
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"{name}: input_ids is empty (shape {tuple(input_ids.shape)}); pass at least one row of in-distribution "
            "text within the training length."
        )


def _write_validated(config: RobustMamba2Config, name: str, value) -> None:
    """Set ``config.<name> = value`` only if the config stays valid with it; otherwise raise and change nothing."""
    candidate = copy.deepcopy(config)
    setattr(candidate, name, value)
    candidate.check_mitigations()  # raises ValueError with the field's name
    setattr(config, name, getattr(candidate, name))  # the normalised value


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

    Raises:
        ValueError: empty ``input_ids``, ``margin`` ≤ 0, or (with ``write_to_config``) caps the config cannot take,
            e.g. on a model with ``sliding_window``; then the config is left unchanged.
    """
    config: RobustMamba2Config = model.config
    _check_ids("calibrate_state_norms", input_ids)
    if not margin > 0:
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
    # clamp_min: a head whose state stayed exactly zero (e.g. zero weights) still needs a cap > 0 to be valid
    caps = (best * margin).clamp_min(1e-6).tolist()
    if write_to_config:
        _write_validated(config, "state_norm_max", caps)
    return caps


@torch.no_grad()
def first_token_memory(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Per row, layer and head: how much of the state at position 1 survives to position T = ``input_ids.shape[1]``.

    That is Π_{t=2..T} α_t = exp(A·Σ_{t=2..T} Δ_t) with A = −exp(A_log), i.e. with ``decay_scale`` 1 (the model as
    trained); a ``decay_scale`` s turns it into memory**s. The model is run once with ``decay_scale`` temporarily
    set to 1 and its other fields as configured; Δ_t is read from each mixer's input projection.

    Args:
        model: a ``RobustMamba2ForCausalLM`` (or ``RobustMamba2Model``).
        input_ids: (batch, T) token ids.

    Returns:
        (batch, num_hidden_layers, num_heads) float64 log-memory A·Σ_{t=2..T} Δ_t (≤ 0); ``exp`` of it is the memory.
    """
    _check_ids("first_token_memory", input_ids)
    config: RobustMamba2Config = model.config
    backbone = getattr(model, "backbone", model)
    mixers = [block.mixer for block in backbone.layers]
    sums: list[torch.Tensor | None] = [None] * len(mixers)  # (b, h): Σ Δ over positions 2..T, per layer

    def hook_for(i, mixer):
        def hook(_module, _inputs, projected):
            # in_proj output (b, l, ... + h): Δ_t = clamp(softplus(dt_t + dt_bias)), exactly as the mixer computes it
            dt = projected[..., -mixer.num_heads :].float()
            delta = F.softplus(dt + mixer.dt_bias.float()).clamp(*mixer.time_step_limit)  # (b, l, h)
            if sums[i] is None:
                delta = delta[:, 1:]  # the first call holds position 1, whose own Δ does not decay its state
                sums[i] = delta.sum(dim=1).double()
            else:
                sums[i] = sums[i] + delta.sum(dim=1).double()

        return hook

    saved = config.decay_scale
    config.decay_scale = 1.0
    was_training = model.training
    model.eval()
    handles = [m.in_proj.register_forward_hook(hook_for(i, m)) for i, m in enumerate(mixers)]
    try:
        device = next(model.parameters()).device
        model(input_ids.to(device), use_cache=False, **_logits_kwargs(model))
    finally:
        for handle in handles:
            handle.remove()
        config.decay_scale = saved
        model.train(was_training)
    A = torch.stack([-torch.exp(m.A_log.detach().double().cpu()) for m in mixers])  # (layers, h)
    delta_sums = torch.stack([s.cpu() for s in sums], dim=1)  # (b, layers, h)
    return A[None] * delta_sums


@torch.no_grad()
def calibrate_decay_scales(
    model,
    input_ids: torch.Tensor,
    threshold: float = DEFAULT_MEMORY_THRESHOLD,
    candidates: Sequence[float] = DECAY_SCALE_CANDIDATES,
    write_to_config: bool = False,
    reduction: str = "max",
) -> list[list[float]]:
    """Per-(layer, head) ``decay_scale``: scale only the heads that still remember the first token at the end.

    Use in-distribution text *within the training length* T (each row of ``input_ids`` one sequence of T tokens). For
    every (layer, head) the memory m = exp(A·Σ_{t=2..T} Δ_t) of the state at position 1 at position T is measured
    (``first_token_memory``, with ``decay_scale`` 1). A head with m ≤ ``threshold`` already forgets within the
    training length and keeps 1.0. For the others, the smallest candidate s with m**s < ``threshold`` is chosen (a
    scale s multiplies A, so it raises the memory to the power s); if no candidate is enough, the largest one is used
    and a warning says how many heads that was.

    Args:
        model: a ``RobustMamba2ForCausalLM`` (or ``RobustMamba2Model``).
        input_ids: (batch, T) token ids.
        threshold: largest memory a head may keep at position T, in (0, 1); see ``DEFAULT_MEMORY_THRESHOLD`` for why
            0.1 is the default.
        candidates: scales to choose from, each > 0 (default 1, 2, 4, …, 256).
        write_to_config: also set ``model.config.decay_scale`` to the table, after checking that the config is
            valid with it (if not, it raises and the config is unchanged).
        reduction: how rows are combined: ``"max"`` (default) uses the row that remembers most, so every
            calibration row ends below the threshold; ``"mean"`` uses the mean memory over rows.

    Returns:
        A (num_hidden_layers, num_heads) list of scales (1.0 for heads left unchanged).
    """
    _check_ids("calibrate_decay_scales", input_ids)
    if not 0 < threshold < 1:
        raise ValueError(f"calibrate_decay_scales: threshold must be in (0, 1), got {threshold!r}")
    if reduction not in ("max", "mean"):
        raise ValueError(f"calibrate_decay_scales: reduction must be 'max' or 'mean', got {reduction!r}")
    scales = sorted(set(float(c) for c in candidates))
    if not scales or not all(c > 0 and c == c and c != float("inf") for c in scales):
        raise ValueError(f"calibrate_decay_scales: candidates must be finite numbers > 0, got {list(candidates)!r}")
    log_memory = first_token_memory(model, input_ids)  # (b, layers, h), ≤ 0

    def memory(s: float) -> torch.Tensor:  # (layers, h): the rows' memory with decay_scale s
        if reduction == "max":
            return torch.exp(s * log_memory.max(dim=0).values)
        return torch.exp(s * log_memory).mean(dim=0)

    table = torch.ones(log_memory.shape[1:], dtype=torch.float64)
    todo = memory(1.0) > threshold  # heads that still remember the first token
    for s in scales:
        chosen = todo & (memory(s) < threshold)
        table[chosen] = s
        todo &= ~chosen
    if todo.any():
        table[todo] = scales[-1]
        warnings.warn(
            f"calibrate_decay_scales: {int(todo.sum())} head(s) keep more than {threshold} of the first token even "
            f"with decay_scale {scales[-1]:g}; they get {scales[-1]:g}. Add larger candidates to go further.",
            stacklevel=2,
        )
    result = table.tolist()
    if write_to_config:
        _write_validated(model.config, "decay_scale", result)
    return result


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
