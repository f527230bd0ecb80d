"""State-collapse-robust Mamba-2: transformers' Mamba-2 with the Stuffed Mamba mitigations.

The modules subclass transformers' ``Mamba2*`` classes, so weight names (and checkpoints) are identical to
``Mamba2ForCausalLM``. Only the mixer's forward is rewritten, and only *around* the scan functions, because
transformers swaps them for fused kernels when ``mamba_ssm`` or hub kernels are installed:

* ``insertion_scale`` and ``decay_scale`` only change the scan's inputs (B scaled, A scaled).
* ``mamba2_chunk_scan`` (prefill, multi-token) is called on pieces that end where ``state_norm_max`` caps the state
  or where ``sliding_window`` moves its window boundary; the state at each cut is rebuilt and changed outside the
  scan (``mitigations_robust_mamba2.rebuild_piece_states``), and each piece's output gets what its start state
  contributes (``state_readout``).
* ``mamba2_selective_state_update`` (one-token decoding) gets the same inputs; its updated state is capped and its
  output corrected after the call.

The pure maths lives in ``mitigations_robust_mamba2``, the cache in ``cache_robust_mamba2`` and the choice of kernel
functions in ``kernels_robust_mamba2``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import ModelOutput
from transformers.models.mamba2 import modeling_mamba2 as _m2
from transformers.models.mamba2.modeling_mamba2 import (
    Mamba2Block,
    Mamba2Mixer,
    Mamba2PreTrainedModel,
    Mamba2RMSNorm,
    apply_mask_to_padding_states,
)

from ..checkpoint_utils import SafeCheckpointMixin
from .cache_robust_mamba2 import RobustMamba2Cache, RobustMamba2CacheLayer, as_robust_cache
from .configuration_robust_mamba2 import RobustMamba2Config
from .decode_robust_mamba2 import decode_step
from .kernels_robust_mamba2 import quadratic_scan, resolve_kernels
from .mitigations_robust_mamba2 import (
    SlidingWindowState,
    advance_window,
    cap_state_norm,
    period_pieces,
    rebuild_piece_states,
    rotate_window,
    state_readout,
)

__all__ = [
    "RobustMamba2PreTrainedModel",
    "RobustMamba2Model",
    "RobustMamba2ForCausalLM",
    "RobustMamba2Output",
    "RobustMamba2CausalLMOutput",
]


# --------------------------------------------------------------------------------------------------------------------
# Mixer
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Mitigations:
    """The mitigation fields of the config as one forward call uses them."""

    insertion_scale: float
    decay_scale: torch.Tensor | None  # (h,) decay_scale of this layer's heads, None when all are 1
    caps: torch.Tensor | None  # (h,) state_norm_max caps τ of this layer
    every: int
    window: int | None

    @property
    def period(self) -> int | None:
        # positions where the carried state changes outside the plain recurrence (cap, or new window boundary)
        if self.caps is not None:
            return self.every
        return self.window


class RobustMamba2Mixer(Mamba2Mixer):
    """``Mamba2Mixer`` with ``insertion_scale``, ``decay_scale``, ``state_norm_max`` and ``sliding_window``.

    Tensor names follow transformers: b batch, l positions, h heads, p head_dim, n state size, g groups.

    ``kernel_functions`` is the ``Mamba2Kernels`` set of scan and step functions this mixer calls, chosen once by
    ``resolve_kernels()`` at construction. Assign ``resolve_kernels(cpu_fast_paths=False)`` to call transformers'
    functions for everything, as a GPU with fused kernels does.
    """

    def __init__(self, config: RobustMamba2Config, layer_idx: int, initialize_mixer_weights: bool = True):
        super().__init__(config, layer_idx=layer_idx, initialize_mixer_weights=initialize_mixer_weights)
        # the config is read at every forward, so calibrate_state_norms / edits to the config take effect at once
        self.config = config
        self.kernel_functions = resolve_kernels()
        self._per_head_tensors: dict[str, tuple] = {}

    def _per_head_tensor(self, name: str, values: list[float], device) -> torch.Tensor:
        """(h,) float32 tensor of a per-head config value, rebuilt only when the values or the device change.

        Building a tensor from the config list at every decoding step costs as much as the step itself."""
        key = (tuple(values), str(device))
        cached = self._per_head_tensors.get(name)
        if cached is None or cached[0] != key:
            cached = (key, torch.tensor(values, dtype=torch.float32, device=device))
            self._per_head_tensors[name] = cached
        return cached[1]

    def _mitigations(self, device) -> _Mitigations:
        cfg = self.config
        caps = cfg.state_norm_caps(self.layer_idx)
        decay = cfg.decay_scales(self.layer_idx)
        return _Mitigations(
            insertion_scale=float(cfg.insertion_scale),
            decay_scale=None if all(v == 1.0 for v in decay) else self._per_head_tensor("decay_scale", decay, device),
            caps=None if caps is None else self._per_head_tensor("state_norm_max", caps, device),
            every=int(cfg.state_norm_every),
            window=cfg.sliding_window,
        )

    def forward(self, hidden_states: torch.Tensor, cache: Cache | None = None, attention_mask=None, **kwargs):
        if cache is None and not self.config.has_mitigations and self.kernel_functions.fused_forward:
            # exactly transformers' path, with its fused conv + scan kernel (mamba_ssm installed)
            return super().forward(hidden_states, cache=None, attention_mask=attention_mask, **kwargs)
        if cache is None:
            # one self-contained sequence (a training step): nothing reads the final state, and with a large state
            # computing it (l·h·p·n multiply-adds) is a sizeable part of a short segment's scan (1.2x per step)
            layer = RobustMamba2CacheLayer()
            return self._forward_with_state(hidden_states, layer, attention_mask, keep_state=False)
        layer = cache.layers[self.layer_idx] if self.layer_idx < len(cache.layers) else None
        if not isinstance(layer, RobustMamba2CacheLayer):
            layer = as_robust_cache(cache, self.config.num_hidden_layers).layers[self.layer_idx]
        return self._forward_with_state(hidden_states, layer, attention_mask)

    # ------------------------------------------------------------------------------------------------------------
    def _forward_with_state(
        self, hidden_states, layer: RobustMamba2CacheLayer, attention_mask, keep_state: bool = True
    ):
        """The mixer on one segment, from and into ``layer``'s states. ``keep_state=False`` (a throw-away layer)
        lets the scan skip the final state when nothing else needs it; the layer's states are then not updated."""
        batch, seq_len, _ = hidden_states.shape
        dtype = hidden_states.dtype
        kernels = self.kernel_functions
        mit = self._mitigations(hidden_states.device)
        conv_state, ssm_state = layer.conv_state, layer.ssm_state  # (b, channels, k), (b, h, p, n) or None

        # 1. input projection (padding positions zeroed, as in transformers)
        hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
        projected = self.in_proj(hidden_states)  # (b, l, intermediate + conv_dim + h)
        # gate (b, l, intermediate), xBC (b, l, conv_dim), dt (b, l, h)
        gate, xBC, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)

        decode = seq_len == 1 and ssm_state is not None
        if decode and torch.is_grad_enabled():
            # the one-token steps update the states in place; keep the autograd graph of earlier segments valid
            conv_state, ssm_state = conv_state.clone(), ssm_state.clone()

        # 2. depthwise causal conv, carrying the last conv_kernel inputs
        weight = self.conv1d.weight.squeeze(1)  # (channels, k)
        if decode:
            xBC = kernels.conv_update(xBC[:, 0], conv_state, weight, self.conv1d.bias, self.activation)[:, None]
            new_conv_state = conv_state
        else:
            xBC_t = xBC.transpose(1, 2)  # (b, channels, l)
            full = xBC_t if conv_state is None else torch.cat([conv_state.to(xBC_t.dtype), xBC_t], dim=-1)
            k = self.conv_kernel_size
            # a copy, so the cache does not keep the whole segment's activations alive through a view
            new_conv_state = F.pad(full, (max(0, k - full.shape[-1]), 0))[..., -k:].clone()
            xBC = kernels.conv_fn(full, weight, self.conv1d.bias, activation=self.activation)[..., -seq_len:]
            xBC = xBC.transpose(1, 2)  # (b, l, channels)
        xBC = apply_mask_to_padding_states(xBC, attention_mask)
        # x (b, l, h·p), B and C (b, l, g·n)
        x, B, C = torch.split(
            xBC,
            [self.intermediate_size, self.n_groups * self.ssm_state_size, self.n_groups * self.ssm_state_size],
            dim=-1,
        )

        # 3. discretisation inputs: insertion_scale and decay_scale change only these
        if mit.insertion_scale != 1.0:
            B = B * mit.insertion_scale
        # Δ computed here (not inside the scan) because the window needs Σ Δ; the scan gets dt_softplus=False
        delta = F.softplus(dt + self.dt_bias.to(dt.dtype))  # (b, l, h)
        delta = torch.clamp(delta, min=self.time_step_limit[0], max=self.time_step_limit[1])
        A = -torch.exp(self.A_log.float())  # (h,)
        if mit.decay_scale is not None:
            # α ← α**decay_scale per head; the insertion Δ·B·x is unchanged. Every later use of A (scan, decode step,
            # the window's exp(A·ΣΔ)·h_b readout, the rebuilt states) gets this scaled A
            A = A * mit.decay_scale  # (h,)

        if mit.window is not None and layer.window is None:
            layer.window = SlidingWindowState.zeros(
                batch, self.num_heads, self.head_dim, self.ssm_state_size, device=x.device
            )

        t0 = layer.seen_tokens
        if decode:
            y, ssm_state = self._decode_step(x, B, C, delta, A, ssm_state, layer, mit, t0 + 1)
        else:
            y, ssm_state = self._scan_segment(x, B, C, delta, A, ssm_state, layer, mit, t0, keep_state)
        if ssm_state is not None:
            layer.set_states(new_conv_state, ssm_state)
        layer.seen_tokens = t0 + seq_len

        # 4. gated RMSNorm and output projection, as in transformers
        y = self.norm(y.reshape(batch, seq_len, -1), gate)  # (b, l, intermediate)
        return self.out_proj(y.to(dtype))  # (b, l, d)

    # ------------------------------------------------------------------------------------------------------------
    def _scan(self, x, delta, A, B, C, initial_states, return_final_state: bool = True):
        """One scan call. x (b,l,h,p), delta (b,l,h), B, C (b,l,g,n) -> y (b,l,h,p), final state (b,h,p,n).

        ``return_final_state=False`` lets the quadratic form skip the final state (returned as None); the chunk
        scan always computes it.

        Without a fused kernel the exact quadratic form runs instead, on pieces of at most ``quadratic_max`` tokens
        chained through the state: on CPU it beat the PyTorch chunk scan 4.6x per training step at 1024 tokens (large
        state) and also at prefill (130m shape), since the chunk scan's per-chunk passes and state hand-offs cost
        more than one (l x l) matrix per head."""
        piece = self.kernel_functions.quadratic_max
        if piece:
            if x.shape[1] <= piece:
                return quadratic_scan(x, delta, A, B, C, self.D, initial_states, return_final_state=return_final_state)
            ys, state = [], initial_states
            for start in range(0, x.shape[1], piece):
                end = start + piece
                keep = return_final_state or end < x.shape[1]  # the next piece starts from this one's state
                y, state = quadratic_scan(x[:, start:end], delta[:, start:end], A, B[:, start:end], C[:, start:end],
                                          self.D, state, return_final_state=keep)  # fmt: skip
                ys.append(y)
            return torch.cat(ys, 1), state
        return self.kernel_functions.chunk_scan(
            x,
            delta,
            A,
            B,
            C,
            chunk_size=self.kernel_functions.scan_chunk(self.chunk_size, x.shape[1]),
            D=self.D,
            z=None,
            dt_bias=None,
            dt_softplus=False,
            initial_states=initial_states,
            dt_limit=self.time_step_limit,
            return_final_states=True,
        )

    def _scan_segment(self, x, B, C, delta, A, h, layer, mit, t0, keep_state: bool = True):
        """Prefill or continuation of ``l`` tokens at positions t0+1..t0+l through the chunk scan.

        x (b, l, h·p), B and C (b, l, g·n), delta (b, l, h), A (h,), h (b, h, p, n) or None.
        Returns y (b, l, h, p) and the state after the last token (b, h, p, n); without mitigations and with
        ``keep_state=False`` the state may be None (skipped by the quadratic scan).

        Without ``state_norm_max`` / ``sliding_window`` this is one scan from the carried state. With them, the
        carried state changes outside the linear recurrence at multiples of the period, so the segment is cut there
        into pieces, and:
        1. every piece is scanned from a zero state (the pieces of exactly one period in one batched call, so the
           number of scan calls does not grow with the segment length);
        2. the true state at each cut is rebuilt in order (``rebuild_piece_states``), capped or stored there;
        3. each piece's output gets what its true start state contributes (``state_readout``).
        By linearity of the scan within a piece this is exactly the recurrence with the mitigation."""
        batch, seq_len, _ = x.shape
        H, P, N = self.num_heads, self.head_dim, self.ssm_state_size
        x4 = x.view(batch, seq_len, H, P)
        B4 = B.view(batch, seq_len, self.n_groups, N)
        C4 = C.view(batch, seq_len, self.n_groups, N)
        period = mit.period
        if period is None:
            y, h = self._scan(x4, delta, A, B4, C4, h, return_final_state=keep_state)
            # the scan's final state is a view into all its chunk states; keep only the state itself
            return y, (h.clone() if h is not None else None)

        pieces = period_pieces(t0, seq_len, period)
        full = [i for i, (a, e) in enumerate(pieces) if e - a == period]
        batched = len(full) > 1  # whole periods are consecutive pieces

        def fold(t):  # (b, k·period, ...) -> (k·b, period, ...), piece-major
            a0, e1 = pieces[full[0]][0], pieces[full[-1]][1]
            t = t[:, a0:e1]
            return t.reshape(batch, len(full), period, *t.shape[2:]).transpose(0, 1).reshape(-1, period, *t.shape[2:])

        # 1. local scans from a zero state: y (b, l_i, h, p), s (b, h, p, n)
        local_y, local_s = {}, {}
        for i, (a, e) in enumerate(pieces):
            if not (batched and i in full):
                local_y[i], local_s[i] = self._scan(x4[:, a:e], delta[:, a:e], A, B4[:, a:e], C4[:, a:e], None)
        if batched:
            yb, sb = self._scan(fold(x4), fold(delta), A, fold(B4), fold(C4), None)
            sb = sb.reshape(len(full), batch, H, P, N)
            for j, i in enumerate(full):
                local_s[i] = sb[j]

        # 2. true states at the cuts, in order (cheap: one state update per piece)
        cums = [torch.cumsum(delta[:, a:e].float(), dim=1) for a, e in pieces]  # (b, l_i, h): Σ Δ from piece start
        state = h.float() if h is not None else x.new_zeros(batch, H, P, N, dtype=torch.float32)
        starts, state, window = rebuild_piece_states(
            state,
            [local_s[i] for i in range(len(pieces))],
            cums,
            A,
            [(t0 + e) % period == 0 for _, e in pieces],
            caps=mit.caps,
            window=layer.window if mit.window is not None else None,
        )
        if window is not None:
            layer.window = window

        # 3. outputs: local output + the start state's contribution
        outputs = []
        for i, (a, e) in enumerate(pieces):
            if batched and i == full[0]:
                k = len(full)
                readout = state_readout(
                    fold(C),
                    torch.stack([cums[j] for j in full]).reshape(k * batch, period, H),
                    A,
                    torch.stack([starts[j] for j in full]).reshape(k * batch, H, P, N),
                    self.n_groups,
                )
                y = (yb + readout.to(yb.dtype)).view(k, batch, period, H, P).transpose(0, 1).reshape(batch, -1, H, P)
                outputs.append(y)
            elif not (batched and i in full):
                readout = state_readout(C[:, a:e], cums[i], A, starts[i], self.n_groups)
                outputs.append(local_y[i] + readout.to(local_y[i].dtype))
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return y, state.to(local_s[0].dtype)

    def _decode_step(self, x, B, C, delta, A, h, layer, mit, t):
        """One token at position t; x (b, 1, h·p), B and C (b, 1, g·n), delta (b, 1, h), h (b, h, p, n) in place.

        Returns y (b, 1, h, p) and the updated state."""
        batch = x.shape[0]
        x = x.view(batch, self.num_heads, self.head_dim)
        Bg = B.view(batch, self.n_groups, self.ssm_state_size)
        Cg = C.view(batch, self.n_groups, self.ssm_state_size)
        d = delta[:, 0]  # (b, h)
        if not h.is_contiguous():
            h = h.contiguous()  # a scan's final state can be a strided slice; the in-place step needs a dense one
        y = self.kernel_functions.ssm_update(h, x, d, A, Bg, Cg, self.D)
        y = y.view(batch, 1, self.num_heads, self.head_dim)
        if mit.window is not None:
            layer.window = advance_window(layer.window, d.float())
            window_part = state_readout(C, layer.window.delta_sum_old[:, None], A, layer.window.old, self.n_groups)
            y = y - window_part.to(y.dtype)
        period = mit.period
        if period is not None and t % period == 0:
            if mit.caps is not None:
                cap_state_norm(h, mit.caps, inplace=True)
            if mit.window is not None:
                layer.window = rotate_window(layer.window, h)
        return y, h


class RobustMamba2Block(Mamba2Block):
    def __init__(self, config, layer_idx):
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = Mamba2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = RobustMamba2Mixer(config, layer_idx=layer_idx, initialize_mixer_weights=False)
        self.gradient_checkpointing = False


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class RobustMamba2Output(ModelOutput):
    """``last_hidden_state`` (b, l, d), ``cache`` and per-layer ``hidden_states``, as ``Mamba2Output``."""

    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class RobustMamba2CausalLMOutput(ModelOutput):
    """``loss``, ``logits`` (b, kept positions, vocab), ``cache`` and ``hidden_states``, as ``Mamba2CausalLMOutput``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class RobustMamba2PreTrainedModel(SafeCheckpointMixin, Mamba2PreTrainedModel):
    config_class = RobustMamba2Config
    config: RobustMamba2Config
    model_card_kind = "robust_mamba2"  # save_pretrained writes a hub_cards/robust_mamba2.md card, via a temp dir
    _no_split_modules = ["RobustMamba2Block"]
    _is_stateful = True

    def model_card_facts(self) -> dict:
        c = self.config
        active = {
            k: getattr(c, k)
            for k in ("insertion_scale", "decay_scale", "sliding_window")
            if not isinstance(getattr(c, k), list) and getattr(c, k) not in (None, 1.0)
        }
        if isinstance(c.decay_scale, list):
            active["decay_scale"] = "per head (layers × heads table)"
        if c.state_norm_max is not None:
            active["state_norm_max"] = f"set (every {c.state_norm_every} tokens)"
        return {"model_id": c.name_or_path or "robust-mamba2", "mitigations": active or "none (defaults)"}

    @classmethod
    def from_mamba2(cls, model: Mamba2PreTrainedModel, **mitigation_kwargs):
        """Convert an in-memory transformers ``Mamba2ForCausalLM`` / ``Mamba2Model`` (same dtype and device), with
        optional mitigation fields, e.g. ``from_mamba2(m, decay_scale=1.5)``.

        The new model *shares* the weight tensors of ``model`` (no copy, no extra memory): training one changes the
        other. ``copy.deepcopy(model)`` first if they must be independent."""
        config = RobustMamba2Config.from_mamba2_config(model.config, **mitigation_kwargs)
        param = next(model.parameters())
        with torch.device("meta"):
            new = cls(config)
        new.load_state_dict(model.state_dict(), strict=True, assign=True)
        new.tie_weights()
        return new.to(device=param.device).train(model.training)


def _stack_hidden_states(segment_layer_outputs: list[tuple], final: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """As transformers: every layer's output (b, l, d) over all segments, then the norm_f output (no embedding)."""
    num_layers = len(segment_layer_outputs[0])
    per_layer = [torch.cat([outs[i] for outs in segment_layer_outputs], dim=1) for i in range(num_layers)]
    return tuple(per_layer) + (final,)


class RobustMamba2Model(RobustMamba2PreTrainedModel):
    """Mamba-2 backbone (``embeddings``, ``layers``, ``norm_f``) with the mitigations and model-level segmenting."""

    def __init__(self, config: RobustMamba2Config):
        super().__init__(config)
        self._validated_mitigations: tuple | None = None
        self.check_mitigations()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([RobustMamba2Block(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.norm_f = Mamba2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self._register_load_state_dict_pre_hook(_m2.Mamba2Model.load_hook)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings = new_embeddings

    def check_mitigations(self) -> None:
        """``config.check_mitigations()``, re-run only when a mitigation field changed since the last check.

        Called at every forward: the mixers read the config directly, so a field set to NaN (or to an invalid
        combination) after the model was built must raise a ``ValueError`` naming it instead of producing NaN logits.
        Comparing the fields' values with those of the last successful check costs microseconds per call."""
        key = self.config.mitigation_key()
        if key != self._validated_mitigations:
            self.config.check_mitigations()
            self._validated_mitigations = self.config.mitigation_key()  # after normalisation (ints become floats)

    def _check_and_record_mitigations(self, cache: Cache | None) -> None:
        """``check_mitigations()``, then record on ``cache`` what its state is produced with (for
        ``RobustMamba2Cache.save``; an immutable tuple, no copy). Opens every forward, eager or compiled."""
        self.check_mitigations()
        if cache is not None:
            cache.mitigation_key = self._validated_mitigations

    def iter_segments(
        self,
        input_ids=None,
        inputs_embeds=None,
        cache: Cache | None = None,
        attention_mask=None,
        output_hidden_states: bool = False,
        segment_length: int | None = None,
    ):
        """Run the input segment by segment (all layers for one segment, then the next), state carried in ``cache``.

        Yields ``(start, end, hidden_states, layer_hidden_states)`` with hidden_states (b, end−start, d) after
        ``norm_f``; layer_hidden_states is the tuple of every layer's output for the segment, or None. Only one
        segment's activations are alive at a time, so a caller that does not keep them runs in O(segment) memory.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        self._check_and_record_mitigations(cache)
        total = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        seg = segment_length or self.config.max_segment_length
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, -total:]
            if torch.all(attention_mask == 1):
                attention_mask = None
        elif attention_mask is not None:
            raise ValueError("RobustMamba2 accepts only a 2D padding mask (batch, length)")
        for start in range(0, total, seg):
            end = min(total, start + seg)
            h = self.embeddings(input_ids[:, start:end]) if inputs_embeds is None else inputs_embeds[:, start:end]
            mask = None if attention_mask is None else attention_mask[:, start:end]
            if mask is not None and h.shape[1] == 1 and cache is not None and cache.layers[0].has_previous_state[0]:
                mask = None  # a decoding token is never padding (as transformers)
            layer_outputs = () if output_hidden_states else None
            for block in self.layers:
                h = block(h, cache=cache, attention_mask=mask)
                if output_hidden_states:
                    layer_outputs += (h,)
            h = self.norm_f(h)
            yield start, end, h, layer_outputs

    def _prepare_forward(self, input_ids, inputs_embeds, cache, use_cache, output_hidden_states, return_dict, kwargs):
        """The opening shared by this model's and ``RobustMamba2ForCausalLM``'s forward.

        Fills ``use_cache`` / ``output_hidden_states`` / ``return_dict`` from the config, accepts the deprecated
        ``cache_params`` name (popped from ``kwargs``), and returns the cache the segments run on:
        ``(cache, use_cache, output_hidden_states, return_dict)``."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        # the mitigation fields are re-validated once per forward, in iter_segments, before any layer runs
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache if not self.training else False)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if "cache_params" in kwargs:  # deprecated name, as transformers
            cache = kwargs.pop("cache_params")
        total = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if cache is not None:
            cache = as_robust_cache(cache, self.config.num_hidden_layers)
        elif use_cache or total > self.config.max_segment_length or self.config.has_mitigations:
            # segments and mitigations need positions and states carried between calls even without use_cache
            cache = RobustMamba2Cache(config=self.config)
        return cache, use_cache, output_hidden_states, return_dict

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | RobustMamba2Output:
        cache, use_cache, output_hidden_states, return_dict = self._prepare_forward(
            input_ids, inputs_embeds, cache, use_cache, output_hidden_states, return_dict, kwargs
        )
        outs, layer_outs = [], []
        for _, _, h, hs in self.iter_segments(input_ids, inputs_embeds, cache, attention_mask, output_hidden_states):
            outs.append(h)
            layer_outs.append(hs)
        hidden_states = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (b, l, d)
        all_hidden = _stack_hidden_states(layer_outs, hidden_states) if output_hidden_states else None
        out_cache = cache if use_cache else None
        if not return_dict:
            return tuple(v for v in [hidden_states, out_cache, all_hidden] if v is not None)
        return RobustMamba2Output(last_hidden_state=hidden_states, cache=out_cache, hidden_states=all_hidden)


def _is_compile_failure(err: Exception) -> bool:
    """Whether ``err`` comes from torch.compile itself (no C++ compiler, an inductor bug), not from the inputs."""
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc

    names = [(dynamo_exc, "BackendCompilerFailed"), (dynamo_exc, "InternalTorchDynamoError"),
             (inductor_exc, "InductorError"), (inductor_exc, "CppCompileError")]  # fmt: skip
    failures = tuple(c for c in (getattr(mod, name, None) for mod, name in names) if isinstance(c, type))
    return bool(failures) and isinstance(err, failures)


def _keep_positions(total: int, logits_to_keep, device) -> torch.Tensor | slice:
    """transformers' ``logits_to_keep``: int k>0 keeps the last k positions, 0 keeps all, a 1D tensor lists them."""
    if isinstance(logits_to_keep, int):
        return slice(0, total) if logits_to_keep == 0 else slice(max(0, total - logits_to_keep), total)
    return torch.as_tensor(logits_to_keep, device=device).long().flatten() % total


class RobustMamba2ForCausalLM(RobustMamba2PreTrainedModel, GenerationMixin):
    """Mamba-2 causal LM with the Stuffed Mamba mitigations; weight names identical to ``Mamba2ForCausalLM``.

    Long inputs are processed in segments of ``config.max_segment_length`` tokens; logits are only materialised
    for the positions ``logits_to_keep`` asks for, and the loss is computed per segment, so ``model(ids,
    labels=ids, logits_to_keep=1)`` over a million tokens never builds a (T × vocab) tensor.
    """

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: RobustMamba2Config):
        super().__init__(config)
        self.backbone = RobustMamba2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._compiled_decode = None  # torch.compile(decode_step), see compile_decode
        self._decode_arguments: tuple | None = None  # (key, layer weights, keyword arguments) of the compiled step
        self.post_init()

    def compile_decode(self, enable: bool = True, **compile_kwargs) -> RobustMamba2ForCausalLM:
        """Decode single sequences with a compiled step: every layer and the head as one ``torch.compile`` graph.

        After this call, every one-token forward of one sequence (batch 1) with a prefilled cache, without
        gradients, without ``sliding_window`` and without ``output_hidden_states`` (what ``generate()`` does for
        one prompt) runs ``decode_robust_mamba2.decode_step``, every layer and the head compiled with inductor as
        one graph. The layers' parameters are looked up once: after replacing a module (not its weights' values),
        call ``compile_decode()`` again. On a 2-core CPU a 130m model's step was 2.3-2.8x faster in fp32 and 2.8-3.3x in
        bf16 than the eager step, and the second thread helps (``benchmarks/robust_mamba2.py``, docs/robust_mamba2.md). Every other
        call takes the eager path unchanged; ``state_norm_max`` caps and ``decay_scale`` apply on both.

        The first compiled step takes tens of seconds (inductor generates and compiles C++, so a C++ compiler must
        be installed; later processes reuse torch's on-disk cache). If compiling fails, a warning says why and the
        model decodes eagerly.

        Args:
            enable: False switches back to the eager step.
            compile_kwargs: passed to ``torch.compile``. Defaults: ``dynamic=False`` and, unless ``mode`` is given,
                ``options={"size_asserts": False}`` (inductor's per-call stride checks of every buffer cost more than
                the step's arithmetic on a small model; dynamo's guards already check the inputs).

        Returns:
            The model itself.
        """
        self._decode_arguments = None
        if not enable:
            self._compiled_decode = None
            return self
        if self.config.use_bias:
            raise ValueError("compile_decode supports Mamba-2's default projections without bias (use_bias=False)")
        compile_kwargs.setdefault("dynamic", False)
        if "mode" not in compile_kwargs:
            compile_kwargs["options"] = {"size_asserts": False, **compile_kwargs.get("options", {})}
        self._compiled_decode = torch.compile(decode_step, **compile_kwargs)
        return self

    def _uses_compiled_decode(self, input_ids, inputs_embeds, cache, attention_mask, labels, output_hidden_states,
                              logits_to_keep) -> bool:  # fmt: skip
        if self._compiled_decode is None or torch.is_grad_enabled() or labels is not None or output_hidden_states:
            return False
        source = input_ids if input_ids is not None else inputs_embeds
        if source is None or source.shape[:2] != (1, 1) or not isinstance(cache, Cache) or not cache.layers:
            return False
        layer = cache.layers[0]
        if not isinstance(layer, RobustMamba2CacheLayer) or layer.ssm_state is None:
            return False
        if self.config.sliding_window is not None or type(self.lm_head) is not nn.Linear:
            return False
        if type(self.backbone.layers[0].mixer.in_proj) is not nn.Linear:  # e.g. dynamically quantized
            return False
        if attention_mask is not None and not bool(torch.all(attention_mask[:, -1:] == 1)):
            return False
        return isinstance(logits_to_keep, int)

    def _decode_step_arguments(self, device) -> tuple[list, dict]:
        """The compiled step's per-layer weights and keyword arguments, rebuilt when a mitigation field changes."""
        key = (self.backbone._validated_mitigations, self.lm_head.weight.dtype, str(device))
        if self._decode_arguments is not None and self._decode_arguments[0] == key:
            return self._decode_arguments[1:]
        layer_weights = []
        for block in self.backbone.layers:
            mixer = block.mixer
            decay = mixer._mitigations(device).decay_scale
            if decay is None:
                decay = torch.ones(mixer.num_heads, dtype=torch.float32, device=device)
            layer_weights.append((block.norm.weight, mixer.in_proj.weight, mixer.conv1d.weight[:, 0],
                                  mixer.conv1d.bias, mixer.dt_bias, mixer.A_log, decay, mixer.D, mixer.norm.weight,
                                  mixer.out_proj.weight))  # fmt: skip
        block, mixer = self.backbone.layers[0], self.backbone.layers[0].mixer
        kwargs = dict(
            norm_f_eps=self.backbone.norm_f.variance_epsilon, n_groups=mixer.n_groups,
            state_size=mixer.ssm_state_size, head_dim=mixer.head_dim, eps=block.norm.variance_epsilon,
            gated_eps=mixer.norm.variance_epsilon, insertion_scale=float(self.config.insertion_scale),
            time_step_min=float(mixer.time_step_limit[0]), time_step_max=float(mixer.time_step_limit[1]),
            residual_in_fp32=block.residual_in_fp32,
        )  # fmt: skip
        self._decode_arguments = (key, layer_weights, kwargs)
        return layer_weights, kwargs

    def _compiled_decode_logits(self, input_ids, inputs_embeds, cache) -> torch.Tensor:
        """One token of one sequence through every layer with the compiled step; (1, 1, vocab) float32 logits."""
        backbone = self.backbone
        backbone._check_and_record_mitigations(cache)
        h = backbone.embeddings(input_ids[:, 0]) if inputs_embeds is None else inputs_embeds[:, 0]  # (1, d)
        layer_weights, kwargs = self._decode_step_arguments(h.device)
        layers = cache.layers[: len(backbone.layers)]
        for layer in layers:  # the step updates the states in place: they must be dense
            if not (layer.conv_state.is_contiguous() and layer.ssm_state.is_contiguous()):
                layer.set_states(layer.conv_state.contiguous(), layer.ssm_state.contiguous())
        logits = self._compiled_decode(h, [layer.conv_state for layer in layers],
                                       [layer.ssm_state for layer in layers], layer_weights,
                                       backbone.norm_f.weight, self.lm_head.weight,
                                       num_threads=torch.get_num_threads(), **kwargs)  # fmt: skip
        t = layers[0].seen_tokens + 1
        capping = self.config.state_norm_max is not None and t % self.config.state_norm_every == 0
        for block, layer in zip(backbone.layers, layers):
            if capping:  # a cap changes the state the NEXT token reads: capping after the whole step is the eager order
                caps = block.mixer._mitigations(h.device).caps
                if caps is not None:
                    cap_state_norm(layer.ssm_state, caps, inplace=True)
            layer.seen_tokens = t
        return logits[:, None]

    def _head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of the LM head. A dynamically quantized head (``torch.ao.quantization.quantize_dynamic``)
        exposes ``weight()`` as a method and takes float32 input."""
        weight = self.lm_head.weight
        dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
        return self.lm_head(hidden.to(dtype)).float()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        return self.backbone.set_input_embeddings(new_embeddings)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if cache is None or isinstance(cache, RobustMamba2Cache):
            return
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            # transformers' default: a DynamicCache of LinearAttentionLayer, which cannot hold the window states
            model_kwargs["cache"] = RobustMamba2Cache(config=self.config)
        else:
            as_robust_cache(cache, self.config.num_hidden_layers)  # a user's cache: usable if still empty

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # generate() repeats the inputs for num_beams / num_return_sequences but not a cache passed in: a prefilled
        # RobustMamba2Cache (one state per prompt row) gets its rows repeated the same way, in place
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        cache = model_kwargs.get("cache")
        if expand_size > 1 and input_ids is not None and isinstance(cache, Cache) and cache.layers:
            state = getattr(cache.layers[0], "ssm_state", None)  # (b, h, p, n) or None while empty
            if state is not None and state.shape[0] * expand_size == input_ids.shape[0]:
                cache.batch_repeat_interleave(expand_size)
        return input_ids, model_kwargs

    def prepare_inputs_for_generation(
        self,
        input_ids,
        inputs_embeds=None,
        use_cache=None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        # as Mamba2ForCausalLM: after the prefill, a decoding token needs no padding mask
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=cache,
            attention_mask=attention_mask,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if use_cache and not is_first_iteration:
            model_inputs["attention_mask"] = None
        return model_inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> tuple | RobustMamba2CausalLMOutput:
        cache, use_cache, output_hidden_states, return_dict = self.backbone._prepare_forward(
            input_ids, inputs_embeds, cache, use_cache, output_hidden_states, return_dict, kwargs
        )
        if self._uses_compiled_decode(input_ids, inputs_embeds, cache, attention_mask, labels, output_hidden_states,
                                      logits_to_keep):  # fmt: skip
            try:
                logits = self._compiled_decode_logits(input_ids, inputs_embeds, cache)
            except Exception as err:  # noqa: BLE001 - inductor raises many types; the eager path is always right
                if not _is_compile_failure(err):
                    raise
                warnings.warn(f"compile_decode: compiling the decode step failed, decoding eagerly instead ({err})",
                              RuntimeWarning, stacklevel=2)  # fmt: skip
                self._compiled_decode = None
            else:
                out_cache = cache if use_cache else None
                if not return_dict:
                    return tuple(v for v in (logits, out_cache) if v is not None)
                return RobustMamba2CausalLMOutput(logits=logits, cache=out_cache)
        source = input_ids if input_ids is not None else inputs_embeds
        total = source.shape[1]
        keep = _keep_positions(total, logits_to_keep, source.device)
        num_items = kwargs.get("num_items_in_batch")

        kept_logits, layer_outs, final_hidden = [], [], []
        loss_sum, n_tokens = None, 0
        for start, end, h, hs in self.backbone.iter_segments(
            input_ids, inputs_embeds, cache, attention_mask, output_hidden_states
        ):
            # h (b, end − start, d)
            if isinstance(keep, slice):
                sel = slice(max(keep.start, start) - start, max(min(keep.stop, end), start) - start)
                h_keep = h[:, sel]
            else:
                idx = keep[(keep >= start) & (keep < end)] - start
                h_keep = h[:, idx]
            seg_logits = None
            if labels is not None:
                # next-token loss of this segment: position i predicts labels[i + 1]; the last one has no target
                seg_logits = self._head_logits(h)  # (b, l, vocab)
                target = labels[:, start + 1 : end + 1].to(seg_logits.device)
                if target.shape[1] < end - start:
                    target = F.pad(target, (0, end - start - target.shape[1]), value=-100)
                seg_loss = F.cross_entropy(
                    seg_logits.reshape(-1, seg_logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
                )
                loss_sum = seg_loss if loss_sum is None else loss_sum + seg_loss
                n_tokens = n_tokens + (target != -100).sum()  # a tensor: no host sync (and no torch.compile break)
            if h_keep.shape[1] > 0:
                if seg_logits is not None and isinstance(keep, slice):
                    kept_logits.append(seg_logits[:, sel])
                else:
                    kept_logits.append(self._head_logits(h_keep))
            if output_hidden_states:
                layer_outs.append(hs)
                final_hidden.append(h)
        vocab = self.config.vocab_size
        logits = (
            torch.cat(kept_logits, dim=1)
            if kept_logits
            else source.new_zeros((source.shape[0], 0, vocab), dtype=torch.float)
        )
        loss = None
        if labels is not None:
            denom = num_items if num_items is not None else torch.clamp(torch.as_tensor(n_tokens), min=1)
            if isinstance(denom, torch.Tensor):
                denom = denom.to(loss_sum.device)
            loss = loss_sum / denom
        all_hidden = _stack_hidden_states(layer_outs, torch.cat(final_hidden, dim=1)) if output_hidden_states else None
        out_cache = cache if use_cache else None
        if not return_dict:
            output = tuple(v for v in (logits, out_cache, all_hidden) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return RobustMamba2CausalLMOutput(loss=loss, logits=logits, cache=out_cache, hidden_states=all_hidden)
