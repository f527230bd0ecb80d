"""Configuration of the state-collapse-robust Mamba-2 (the training-free mitigations of "Stuffed Mamba")."""

from __future__ import annotations

import inspect

from transformers import Mamba2Config

from ...validation import check_known_fields, check_number

__all__ = ["RobustMamba2Config"]

# fields added to Mamba2Config; every default is a no-op, so a converted mamba2 config behaves exactly like it
MITIGATION_FIELDS = (
    "insertion_scale",
    "decay_scale",
    "state_norm_max",
    "state_norm_every",
    "sliding_window",
    "max_segment_length",
)

# the fields whose value changes the recurrent state (and so the cache): a saved cache only resumes under the same ones
STATE_FIELDS = ("insertion_scale", "decay_scale", "state_norm_max", "state_norm_every", "sliding_window")

# keys that older transformers versions wrote to config.json: not fields any more, but not typos either.
# norm_before_gate: older transformers Mamba2Config field (always False there); accepted, and refused when True
_LEGACY_CONFIG_KEYS = ("use_return_dict", "tie_encoder_decoder", "sep_token_id", "norm_before_gate")

_KNOWN_FIELDS = (
    *MITIGATION_FIELDS,
    *(name for name in inspect.signature(Mamba2Config.__init__).parameters if name != "self"),
    *_LEGACY_CONFIG_KEYS,
)

_OWNER = "RobustMamba2Config"


class RobustMamba2Config(Mamba2Config):
    r"""
    A [`~transformers.Mamba2Config`] plus the training-free state-collapse mitigations of Chen et al., "Stuffed
    Mamba" (arXiv 2410.07145). Every extra field defaults to a no-op, so with the defaults the model computes
    exactly what [`~transformers.Mamba2ForCausalLM`] computes (same weight names too).

    Notation, per layer and head: Δ_t = softplus(dt_t + dt_bias) (clamped to `time_step_limit`), A = −exp(A_log),
    α_t = exp(Δ_t·A), h_t = α_t·h_{t−1} + Δ_t·B_t x_tᵀ, y_t = C_tᵀ h_t + D·x_t. Positions t are 1-indexed and count
    every token the model has seen, across segments, chained forward calls and decoding steps.

    insertion_scale (`float`, *optional*, defaults to 1.0):
        "Remember less": B_t ← insertion_scale · B_t, after the convolution and SiLU. Must be > 0. Kept for
        fidelity to the paper, not recommended: with h_0 = 0 it scales every state by β = insertion_scale, which the
        gated RMSNorm cancels except against the D·x skip, so it is exactly the model with D/β (and the gated norm's
        ε divided by β²). It does not change what the state remembers.
    decay_scale (`float` or `list[list[float]]`, *optional*, defaults to 1.0):
        "Forget more": α_t ← α_t ** decay_scale, i.e. A ← A·decay_scale: the decay exponent Δ_t·A is multiplied by it
        while the insertion term Δ_t·B_t·x_t is unchanged. Values > 1 forget more. One float for all heads, or one per
        (layer, head) with shape (num_hidden_layers, num_heads), e.g. from [`~hf_collapse.calibrate_decay_scales`],
        which scales only the heads that still remember the first token at the end of the training length. Every
        value must be > 0.
    state_norm_max (`float` or `list[list[float]]`, *optional*):
        State normalisation: a cap τ on the Frobenius norm of each head's state, one float for all, or one per
        (layer, head) with shape (num_hidden_layers, num_heads). After the state update at every position t with
        `t % state_norm_every == 0`, h_t ← h_t · min(1, τ / ‖h_t‖_F), per batch row, layer and head. The output y_t
        at that position still reads the state before the cap; the cap acts on the state carried forward.
        Calibrate it on in-distribution text within the training length with
        [`~hf_collapse.calibrate_state_norms`]. Must be > 0.
    state_norm_every (`int`, *optional*, defaults to 128):
        Period S, in tokens, of the `state_norm_max` check (the paper's reference code uses 128).
    sliding_window (`int`, *optional*):
        Sliding window by state difference: with r = sliding_window, the output at position t reads
        h_t − exp(A·decay_scale·Σ_{j=b+1..t} Δ_j)·h_b (with the same per-head decay_scale as the recurrence) with
        b = r·max(0, ⌈t/r⌉ − 2), i.e. exactly the contributions of tokens b+1..t: between r+1 and 2r tokens (the
        window is chunked so only two boundary states are kept). The recurrent state itself stays the full h_t.
        Cannot be combined with `state_norm_max`, because the state difference needs the linear recurrence that the
        cap breaks.
    max_segment_length (`int`, *optional*, defaults to 4096):
        inputs longer than this are processed in segments of this many tokens (all layers for one segment, then the
        next) with the state carried over, so memory does not grow with input length except for returned tensors.

    Example:

    ```python
    >>> from hf_collapse import RobustMamba2Config, RobustMamba2ForCausalLM
    >>> config = RobustMamba2Config(num_heads=4, head_dim=8, hidden_size=16, state_size=8, n_groups=1,
    ...                             num_hidden_layers=2, vocab_size=64, decay_scale=1.5, sliding_window=512)
    >>> model = RobustMamba2ForCausalLM(config)
    ```
    """

    model_type = "robust_mamba2"
    # checkpoints of these types load too (get_config_dict rewrites their model_type)
    convertible_model_types = ("mamba2",)

    # int is accepted too (JSON and CLI users write 1 for 1.0); values are normalised to float in __post_init__
    insertion_scale: float | int = 1.0
    decay_scale: float | int | list = 1.0
    state_norm_max: float | int | list | None = None
    state_norm_every: int = 128
    sliding_window: int | None = None
    max_segment_length: int = 4096

    def __post_init__(self, **kwargs):
        # keywords that are not fields arrive here (transformers keeps them as extra attributes): refuse the ones that
        # look like a misspelt field, which would otherwise silently leave a mitigation off
        check_known_fields(_OWNER, kwargs, _KNOWN_FIELDS)
        super().__post_init__(**kwargs)
        self.check_mitigations()

    def check_mitigations(self) -> None:
        """Raise ``ValueError`` if a mitigation field is invalid; normalise numbers to float.

        Called at construction, and again by the model whenever a mitigation field has changed since its last check
        (fields may be changed after construction, e.g. by ``from_pretrained(..., **kwargs)``, by the calibration
        helpers or by hand), so an invalid value raises instead of producing NaN logits.
        """
        if getattr(self, "norm_before_gate", False):
            raise ValueError(
                f"{_OWNER}: norm_before_gate=True is not supported. The mixer applies the gate before the gated "
                "RMSNorm (y ← RMSNorm(y·silu(z))), as transformers' Mamba-2 and mamba_ssm's default do; a checkpoint "
                "trained with the norm before the gate would compute something else."
            )
        self.insertion_scale = check_number(
            _OWNER, "insertion_scale", self.insertion_scale, minimum=0, exclusive_minimum=True
        )
        self.decay_scale = self._check_scalar_or_table("decay_scale", self.decay_scale)
        check_number(_OWNER, "state_norm_every", self.state_norm_every, integer=True, minimum=1)
        check_number(_OWNER, "sliding_window", self.sliding_window, integer=True, minimum=1, allow_none=True)
        check_number(_OWNER, "max_segment_length", self.max_segment_length, integer=True, minimum=1)
        if self.state_norm_max is None:
            return
        if self.sliding_window is not None:
            raise ValueError(
                f"{_OWNER}: state_norm_max cannot be combined with sliding_window: the sliding window subtracts a "
                "decayed earlier state, which is only exact for the linear recurrence that the norm cap breaks. Use "
                "one of them (decay_scale combines with either)."
            )
        self.state_norm_max = self._check_scalar_or_table("state_norm_max", self.state_norm_max)

    def _check_scalar_or_table(self, name: str, value) -> float | list[list[float]]:
        """One finite number > 0, or a (num_hidden_layers, num_heads) list of them; returned as float(s)."""
        if not isinstance(value, (list, tuple)):
            return check_number(_OWNER, name, value, minimum=0, exclusive_minimum=True)
        shape_ok = len(value) == self.num_hidden_layers and all(
            isinstance(row, (list, tuple)) and len(row) == self.num_heads for row in value
        )
        if not shape_ok:
            got = [len(row) if isinstance(row, (list, tuple)) else type(row).__name__ for row in value]
            raise ValueError(
                f"{_OWNER}.{name} must be one float or a list of shape (num_hidden_layers, num_heads) = "
                f"({self.num_hidden_layers}, {self.num_heads}); got {len(value)} rows of lengths {got}."
            )
        return [
            [check_number(_OWNER, f"{name}[{i}][{k}]", v, minimum=0, exclusive_minimum=True) for k, v in enumerate(row)]
            for i, row in enumerate(value)
        ]

    def mitigation_key(self) -> tuple:
        """The mitigation fields as one hashable value (lists become tuples): it changes whenever a field does.

        The model compares it with the key of its last successful ``check_mitigations`` to re-validate only after a
        change (cheap enough for every decoding step). A NaN never equals itself, so a NaN field is always re-checked.
        """
        return tuple((name, _freeze(getattr(self, name, None))) for name in (*MITIGATION_FIELDS, "norm_before_gate"))

    def state_settings(self) -> dict:
        """The fields that change the recurrent state, as JSON-ready values (``STATE_FIELDS``).

        ``RobustMamba2Cache.save`` stores them and ``RobustMamba2Cache.load`` refuses a config whose settings differ:
        a state produced under other settings would resume as a different computation."""
        return {name: getattr(self, name) for name in STATE_FIELDS}

    @property
    def has_mitigations(self) -> bool:
        """Whether any mitigation field changes the computation."""
        decay = self.decay_scale
        decay_on = any(v != 1.0 for row in decay for v in row) if isinstance(decay, list) else decay != 1.0
        return (
            self.insertion_scale != 1.0
            or decay_on
            or self.state_norm_max is not None
            or self.sliding_window is not None
        )

    def decay_scales(self, layer_idx: int) -> list[float]:
        """The ``decay_scale`` of one layer, one per head."""
        decay = self.decay_scale
        if isinstance(decay, list):
            return list(decay[layer_idx])
        return [decay] * self.num_heads

    def state_norm_caps(self, layer_idx: int) -> list[float] | None:
        """The ``state_norm_max`` caps τ of one layer, one per head, or None when the cap is off."""
        tau = self.state_norm_max
        if tau is None:
            return None
        if isinstance(tau, list):
            return list(tau[layer_idx])
        return [tau] * self.num_heads

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """As transformers, but a transformers ``mamba2`` checkpoint's config is converted (model_type rewritten), so
        ``RobustMamba2ForCausalLM.from_pretrained(mamba2_dir, **mitigations)`` loads it without a type warning."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "mamba2":
            config_dict = {**config_dict, "model_type": cls.model_type}
            config_dict.pop("architectures", None)
        return config_dict, kwargs

    @classmethod
    def from_mamba2_config(cls, mamba2_config, **mitigation_kwargs) -> RobustMamba2Config:
        """A ``RobustMamba2Config`` with every field of a transformers ``Mamba2Config`` plus the given mitigations."""
        unknown = set(mitigation_kwargs) - set(MITIGATION_FIELDS)
        if unknown:
            raise TypeError(
                f"Unknown mitigation field(s) {sorted(unknown)}; expected some of {list(MITIGATION_FIELDS)}"
            )
        fields = mamba2_config.to_dict()
        for key in ("model_type", "transformers_version", "architectures", *MITIGATION_FIELDS):
            fields.pop(key, None)
        return cls(**fields, **mitigation_kwargs)


def _freeze(value):
    """A (layers, heads) table as a tuple of tuples (immutable, compared by value); other values as they are.

    Two levels only, without recursion: this runs at every forward, decoding steps included."""
    if isinstance(value, (list, tuple)):
        return tuple(tuple(row) if isinstance(row, (list, tuple)) else row for row in value)
    return value
