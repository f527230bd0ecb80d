"""State-collapse-robust Mamba-2: transformers' Mamba-2 with the Stuffed Mamba mitigations.

The modules subclass transformers' ``Mamba2*`` classes, so weight names (and checkpoints) are identical to
``Mamba2ForCausalLM``. Only the mixer's forward is rewritten, and only *around* the two scan functions:

* ``mamba2_chunk_scan`` (prefill / multi-token) is called on sub-segments that end where M2 caps the state or where
  M3 moves its window boundary; the returned final state is capped (M2) or stored as a boundary state (M3) before
  it is passed back as ``initial_states``. M1 only changes the inputs (B scaled, A scaled); M3's correction is
  subtracted from the output.
* ``mamba2_selective_state_update`` (one-token decoding) gets the same changed inputs; its updated state is capped
  and its output corrected in the same way.

When ``mamba_ssm`` or hub kernels replace those functions with fused GPU kernels, the mitigations therefore stay
active. The inside of the scan functions is never edited.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, LinearAttentionLayer
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
from .configuration_robust_mamba2 import RobustMamba2Config

__all__ = [
    "RobustMamba2Cache",
    "RobustMamba2CacheLayer",
    "RobustMamba2PreTrainedModel",
    "RobustMamba2Model",
    "RobustMamba2ForCausalLM",
    "RobustMamba2Output",
    "RobustMamba2CausalLMOutput",
]


# --------------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------------


class RobustMamba2CacheLayer(LinearAttentionLayer):
    """A ``LinearAttentionLayer`` (conv state + SSM state) plus what M2 and M3 need to resume exactly.

    * ``seen_tokens``: tokens this layer has processed (the 1-indexed position of the last one). M2 caps at
      multiples of ``state_norm_every`` and M3 moves its boundary at multiples of ``sliding_window`` of this count.
    * ``window_old`` (batch, heads, head_dim, state): h_b, the state at the boundary the current output window
      starts after (M3); ``window_new``: the state at the latest multiple of the window (the next h_b).
    * ``delta_sum_old`` / ``delta_sum_new`` (batch, heads): Σ Δ since those two boundaries, so the decay of h_b is
      exp(A·ΣΔ): computed from a sum (stable), never from a product of α.

    Tensors are stored by assignment (not ``copy_``) so that chained training forwards keep a valid autograd graph.
    """

    def __init__(self, number_of_states: int = 1, **kwargs):
        super().__init__(number_of_states=number_of_states, **kwargs)
        self._init_robust()

    def _init_robust(self) -> None:
        self.seen_tokens = 0
        self.window_old: torch.Tensor | None = None
        self.window_new: torch.Tensor | None = None
        self.delta_sum_old: torch.Tensor | None = None
        self.delta_sum_new: torch.Tensor | None = None

    # -- state accessors used by the mixer ------------------------------------------------------------------------
    @property
    def ssm_state(self) -> torch.Tensor | None:
        return self.recurrent_states[0] if self.has_previous_state[0] else None

    @property
    def conv_state(self) -> torch.Tensor | None:
        return self.conv_states[0] if self.has_previous_state[0] else None

    def set_states(self, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        self.conv_states[0] = conv_state
        self.recurrent_states[0] = ssm_state
        self.conv_kernel_size[0] = conv_state.shape[-1]
        self.is_conv_states_initialized[0] = True
        self.is_recurrent_states_initialized[0] = True
        self.has_previous_state[0] = True
        self.dtype, self.device = conv_state.dtype, conv_state.device

    def _robust_tensors(self) -> tuple[str, ...]:
        return ("window_old", "window_new", "delta_sum_old", "delta_sum_new")

    def _map_batch(self, fn) -> None:
        for i in range(self.number_of_states):
            if self.is_conv_states_initialized[i]:
                self.conv_states[i] = fn(self.conv_states[i])
            if self.is_recurrent_states_initialized[i]:
                self.recurrent_states[i] = fn(self.recurrent_states[i])
        for name in self._robust_tensors():
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))

    # -- cache API ------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._init_robust()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])


class RobustMamba2Cache(DynamicCache):
    """``DynamicCache`` whose layers are ``RobustMamba2CacheLayer`` (position counter, boundary states, ΣΔ).

    A plain ``DynamicCache(config=model.config)`` passed to the model is upgraded in place on first use
    (see ``RobustMamba2Cache.ensure``), so users and ``generate()`` can keep using ``DynamicCache``.
    """

    def __init__(self, config=None, **kwargs):
        super().__init__(config=config, **kwargs)
        self.ensure(self)

    @staticmethod
    def ensure(cache: Cache) -> Cache:
        """Upgrade the linear-attention layers of ``cache`` in place to ``RobustMamba2CacheLayer``; return it."""
        for layer in cache.layers:
            if isinstance(layer, RobustMamba2CacheLayer):
                continue
            if type(layer) is not LinearAttentionLayer:
                raise TypeError(
                    f"RobustMamba2 needs a DynamicCache built from its config (linear-attention layers); got a "
                    f"{type(layer).__name__} layer. Use RobustMamba2Cache(config=model.config)."
                )
            if any(layer.has_previous_state.values()):
                raise ValueError(
                    "This DynamicCache already holds a state written by another model; RobustMamba2 needs its own "
                    "cache (it tracks positions and window states). Start from an empty cache."
                )
            layer.__class__ = RobustMamba2CacheLayer
            layer._init_robust()
        return cache


# --------------------------------------------------------------------------------------------------------------------
# Fast CPU decode steps (used only where no fused kernel is installed; mathematically identical to the fallbacks)
# --------------------------------------------------------------------------------------------------------------------


_FALLBACK_CACHE: dict[int, bool] = {}

# chunk size of the PyTorch chunk scan (see RobustMamba2Mixer._scan_segment)
TORCH_SCAN_CHUNK = 64


def _is_torch_fallback(fn) -> bool:
    """True when transformers' kernel wrapper ``fn`` dispatches to its own PyTorch reference implementation.

    If it cannot be told (another transformers version, hub kernels), answer False so the wrapper is called."""
    key = id(fn)
    if key not in _FALLBACK_CACHE:
        try:
            value = inspect.getclosurevars(fn).nonlocals.get("is_new_implementation") is False
        except Exception:  # pragma: no cover - defensive
            value = False
        _FALLBACK_CACHE[key] = value
    return _FALLBACK_CACHE[key]


def _conv_update_torch(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """One step of the depthwise causal conv: x (batch, channels), conv_state (batch, channels, kernel), in place.

    transformers' fallback runs ``F.conv1d`` over a concatenation, which dominated CPU decode time; a shift plus a
    4-tap multiply-add is the same arithmetic."""
    conv_state[:, :, :-1] = conv_state[:, :, 1:].clone()
    conv_state[:, :, -1] = x.to(conv_state.dtype)
    out = torch.einsum("bck,ck->bc", conv_state.to(weight.dtype), weight)
    if bias is not None:
        out = out + bias
    return F.silu(out).to(x.dtype)


def _ssm_update_torch(state, x, dt, A, B, C, D):
    """One SSM step in place. state (b,h,p,n) fp32; x (b,h,p); dt (b,h) already softplus-ed; A (h,); B, C (b,g,n).

    Same recurrence as ``mamba2_selective_state_update``, but the decay exp(Δ·A) is computed once per head (b, h)
    instead of per state element, and the state is touched in three passes (decay, rank-1 insertion, readout)."""
    batch, heads, head_dim = x.shape
    n = B.shape[-1]
    rep = heads // B.shape[1]
    Bh = B.float().repeat_interleave(rep, dim=1).reshape(batch * heads, 1, n)
    Ch = C.float().repeat_interleave(rep, dim=1).reshape(batch * heads, 1, n)
    dA = torch.exp(dt.float() * A.float())  # (b, h)
    u = (dt.float()[..., None] * x.float()).reshape(batch * heads, head_dim, 1)  # Δ·x
    flat = state.view(batch * heads, head_dim, n)
    # elementwise forms: measured 4-6x faster on CPU than baddbmm/bmm, which run thousands of tiny GEMMs
    flat.mul_(dA.reshape(-1, 1, 1)).addcmul_(u, Bh)  # h ← α·h + (Δ·x) Bᵀ
    y = (flat * Ch).sum(-1).view(batch, heads, head_dim) + D.float()[:, None] * x.float()
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Mixer
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Mitigations:
    insertion_scale: float
    decay_scale: float
    caps: torch.Tensor | None  # (heads,) M2 caps τ of this layer
    every: int
    window: int | None

    @property
    def period(self) -> int | None:
        # positions where the carried state changes outside the plain recurrence (cap, or new window boundary)
        if self.caps is not None:
            return self.every
        return self.window


class RobustMamba2Mixer(Mamba2Mixer):
    """``Mamba2Mixer`` with M1 (scaled B and A), M2 (state-norm cap) and M3 (window by state difference).

    Tensor names follow transformers: b batch, l positions, h heads, p head_dim, n state size, g groups.
    """

    # Tests flip this to run decoding through transformers' ``mamba2_selective_state_update`` /
    # ``causal_conv1d_update`` even on CPU (the GPU path), to check the fast CPU steps against them.
    force_kernel_functions = False

    def __init__(self, config: RobustMamba2Config, layer_idx: int, initialize_mixer_weights: bool = True):
        super().__init__(config, layer_idx=layer_idx, initialize_mixer_weights=initialize_mixer_weights)
        # the config is read at every forward, so calibrate_state_norms / edits to the config take effect at once
        self.config = config

    def _mitigations(self, device) -> _Mitigations:
        cfg = self.config
        caps = cfg.state_norm_caps(self.layer_idx)
        caps_tensor = None
        if caps is not None:
            # cached: building a tensor from the config list at every decoding step costs as much as the step
            key = (tuple(caps), str(device))
            cached = getattr(self, "_caps_cache", None)
            if cached is None or cached[0] != key:
                cached = (key, torch.tensor(caps, dtype=torch.float32, device=device))
                self._caps_cache = cached
            caps_tensor = cached[1]
        return _Mitigations(
            insertion_scale=float(cfg.insertion_scale),
            decay_scale=float(cfg.decay_scale),
            caps=caps_tensor,
            every=int(cfg.state_norm_every),
            window=cfg.sliding_window,
        )

    def forward(self, hidden_states: torch.Tensor, cache: Cache | None = None, attention_mask=None, **kwargs):
        if (
            cache is None
            and not self.config.has_mitigations
            and not _is_torch_fallback(_m2.mamba2_split_conv1d_scan_combined)
        ):
            # exactly transformers' path, with its fused conv + scan kernel (mamba_ssm installed)
            return super().forward(hidden_states, cache=None, attention_mask=attention_mask, **kwargs)
        if cache is not None:
            layer = cache.layers[self.layer_idx]
            if not isinstance(layer, RobustMamba2CacheLayer):
                RobustMamba2Cache.ensure(cache)
                layer = cache.layers[self.layer_idx]
        else:
            layer = RobustMamba2CacheLayer()  # throw-away state: one self-contained sequence
        return self._forward_with_state(hidden_states, layer, attention_mask)

    # ------------------------------------------------------------------------------------------------------------
    def _forward_with_state(self, hidden_states, layer: RobustMamba2CacheLayer, attention_mask):
        batch, seq_len, _ = hidden_states.shape
        dtype = hidden_states.dtype
        mit = self._mitigations(hidden_states.device)
        conv_state, ssm_state = layer.conv_state, layer.ssm_state

        # 1. input projection (padding positions zeroed, as in transformers)
        hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
        projected = self.in_proj(hidden_states)
        gate, xBC, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)

        decode = seq_len == 1 and ssm_state is not None
        if decode and torch.is_grad_enabled():
            # the one-token steps update the states in place; keep the autograd graph of earlier segments valid
            conv_state, ssm_state = conv_state.clone(), ssm_state.clone()
        torch_steps = not self.force_kernel_functions and _is_torch_fallback(_m2.mamba2_selective_state_update)

        # 2. depthwise causal conv, carrying the last conv_kernel inputs
        weight = self.conv1d.weight.squeeze(1)  # (channels, kernel)
        if decode:
            if torch_steps and _is_torch_fallback(_m2.causal_conv1d_update):
                xBC = _conv_update_torch(xBC[:, 0], conv_state, weight, self.conv1d.bias)[:, None]
            else:
                xBC = _m2.causal_conv1d_update(
                    xBC.transpose(1, 2), conv_state, weight, self.conv1d.bias, activation=self.activation
                ).transpose(1, 2)
            new_conv_state = conv_state
        else:
            xBC_t = xBC.transpose(1, 2)  # (b, channels, l)
            full = xBC_t if conv_state is None else torch.cat([conv_state.to(xBC_t.dtype), xBC_t], dim=-1)
            k = self.conv_kernel_size
            # a copy, so the cache does not keep the whole segment's activations alive through a view
            new_conv_state = F.pad(full, (max(0, k - full.shape[-1]), 0))[..., -k:].clone()
            xBC = _m2.causal_conv1d_fn(full, weight, self.conv1d.bias, activation=self.activation)[..., -seq_len:]
            xBC = xBC.transpose(1, 2)
        xBC = apply_mask_to_padding_states(xBC, attention_mask)
        x, B, C = torch.split(
            xBC,
            [self.intermediate_size, self.n_groups * self.ssm_state_size, self.n_groups * self.ssm_state_size],
            dim=-1,
        )

        # 3. discretisation inputs; mitigations M1 change only these inputs
        if mit.insertion_scale != 1.0:
            B = B * mit.insertion_scale  # M1: insert less
        # Δ computed here (not inside the scan) because M3 needs Σ Δ; the scan gets dt_softplus=False, dt_bias=None
        delta = F.softplus(dt + self.dt_bias.to(dt.dtype))  # (b, l, h)
        delta = torch.clamp(delta, min=self.time_step_limit[0], max=self.time_step_limit[1])
        A = -torch.exp(self.A_log.float())  # (h,)
        if mit.decay_scale != 1.0:
            A = A * mit.decay_scale  # M1: α ← α**decay_scale; the insertion Δ·B·x is unchanged

        if mit.window is not None and layer.window_old is None:
            zeros = torch.zeros(batch, self.num_heads, self.head_dim, self.ssm_state_size, device=x.device)
            layer.window_old, layer.window_new = zeros, zeros
            layer.delta_sum_old = torch.zeros(batch, self.num_heads, device=x.device)
            layer.delta_sum_new = layer.delta_sum_old

        t0 = layer.seen_tokens
        if decode:
            y, ssm_state = self._decode_step(x, B, C, delta, A, ssm_state, layer, mit, torch_steps, t0 + 1)
        else:
            y, ssm_state = self._scan_segment(x, B, C, delta, A, ssm_state, layer, mit, t0)
        layer.set_states(new_conv_state, ssm_state)
        layer.seen_tokens = t0 + seq_len

        # 4. gated RMSNorm and output projection, as in transformers
        y = self.norm(y.reshape(batch, seq_len, -1), gate)
        return self.out_proj(y.to(dtype))

    # ------------------------------------------------------------------------------------------------------------
    def _cap(self, h: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
        """M2: h (b, h, p, n) ← h · min(1, τ_h / ‖h‖_F) per batch row and head."""
        norm = h.float().flatten(2).norm(dim=-1)  # (b, h)
        factor = torch.clamp(caps[None, :] / norm.clamp_min(1e-30), max=1.0)
        return h * factor[..., None, None].to(h.dtype)

    def _state_readout(self, C, delta_cum, A, h0):
        """exp(A·ΣΔ)·(C_tᵀ h0): what a state h0 held before a run of positions contributes to their outputs.

        C (b, l, g·n), delta_cum (b, l, h) = Σ Δ from the start of the run to t, h0 (b, h, p, n) -> (b, l, h, p).
        Used for the carried state of a sub-segment scanned from zero, and (with a minus sign) for M3's h_b."""
        batch, length = C.shape[:2]
        C = C.float().view(batch, length, self.n_groups, self.ssm_state_size)
        h0 = h0.float().view(batch, self.n_groups, self.num_heads // self.n_groups, self.head_dim, self.ssm_state_size)
        # (b,l,g,n) x (b,g,k,p,n) -> (b,l,g,k,p): C_tᵀ h0 for every head k of group g
        ch = torch.einsum("blgn,bgkpn->blgkp", C, h0).reshape(batch, length, self.num_heads, self.head_dim)
        return torch.exp(A[None, None, :] * delta_cum)[..., None] * ch

    def _scan(self, x, delta, A, B, C, initial_states, torch_scan):
        """One ``mamba2_chunk_scan`` call. x (b,l,h,p), delta (b,l,h), B, C (b,l,g,n) -> y (b,l,h,p), h (b,h,p,n)."""
        chunk = self.chunk_size
        if torch_scan:
            # PyTorch scan only (fused kernels keep the configured chunk): its intra-chunk work grows with the chunk
            # size, and it pads to a multiple of it, so a short chunk is faster on CPU (measured: 64 is ~2x faster
            # than 256 at 4K tokens for mamba2-130m shapes). The result is the same up to rounding.
            chunk = min(chunk, TORCH_SCAN_CHUNK, 1 << (x.shape[1] - 1).bit_length())
        return _m2.mamba2_chunk_scan(
            x,
            delta,
            A,
            B,
            C,
            chunk_size=chunk,
            D=self.D,
            z=None,
            dt_bias=None,
            dt_softplus=False,
            initial_states=initial_states,
            dt_limit=self.time_step_limit,
            return_final_states=True,
        )

    def _scan_segment(self, x, B, C, delta, A, h, layer, mit, t0):
        """Prefill or continuation of ``l`` tokens at positions t0+1..t0+l through ``mamba2_chunk_scan``.

        Without M2/M3 this is one scan from the carried state. With them, the carried state changes outside the
        linear recurrence at multiples of the period (M2 caps it, M3 stores it as a window boundary), so the segment
        is cut there into pieces, and:
        1. every piece is scanned from a zero state (the pieces of exactly one period in one batched call, so the
           number of scan calls does not grow with the segment length);
        2. the true state at each cut is rebuilt in order, h_end = exp(A·ΣΔ_piece)·h_start + s_piece, and capped
           or stored there;
        3. each piece's output gets what its true start state contributes, exp(A·ΣΔ)·C_tᵀ·h_start (for M3 the
           start state minus the decayed h_b, which is the window subtraction).
        By linearity of the scan within a piece this is exactly the recurrence with the mitigation."""
        batch, seq_len, _ = x.shape
        H, P, N = self.num_heads, self.head_dim, self.ssm_state_size
        torch_scan = not self.force_kernel_functions and _is_torch_fallback(_m2.mamba2_chunk_scan)
        x4 = x.view(batch, seq_len, H, P)
        B4 = B.view(batch, seq_len, self.n_groups, N)
        C4 = C.view(batch, seq_len, self.n_groups, N)
        period = mit.period
        if period is None:
            y, h = self._scan(x4, delta, A, B4, C4, h, torch_scan)
            # the scan's final state is a view into all its chunk states; keep only the state itself
            return y, h.clone()

        first = (t0 // period + 1) * period - t0  # local end of the first piece
        cuts = sorted({0, seq_len, *range(first, seq_len, period)})
        pieces = list(zip(cuts[:-1], cuts[1:]))
        full = [i for i, (a, e) in enumerate(pieces) if e - a == period]
        batched = len(full) > 1  # whole periods are consecutive pieces

        def fold(t):  # (b, k·period, ...) -> (k·b, period, ...), piece-major
            a0, e1 = pieces[full[0]][0], pieces[full[-1]][1]
            t = t[:, a0:e1]
            return t.reshape(batch, len(full), period, *t.shape[2:]).transpose(0, 1).reshape(-1, period, *t.shape[2:])

        # 1. local scans from a zero state
        local_y, local_s = {}, {}
        for i, (a, e) in enumerate(pieces):
            if not (batched and i in full):
                local_y[i], local_s[i] = self._scan(
                    x4[:, a:e], delta[:, a:e], A, B4[:, a:e], C4[:, a:e], None, torch_scan
                )
        if batched:
            yb, sb = self._scan(fold(x4), fold(delta), A, fold(B4), fold(C4), None, torch_scan)
            sb = sb.reshape(len(full), batch, H, P, N)
            for j, i in enumerate(full):
                local_s[i] = sb[j]

        # 2. true states at the cuts, in order (cheap: one state update per piece)
        state = h.float() if h is not None else x.new_zeros(batch, H, P, N, dtype=torch.float32)
        starts, cums = [], []
        for i, (a, e) in enumerate(pieces):
            cum = torch.cumsum(delta[:, a:e].float(), dim=1)  # (b, l, h): Σ Δ from the piece start
            start = state
            if mit.window is not None:
                # M3: outputs read h_t − exp(A·Σ_{b+1..t}Δ)·h_b; over this piece that is a fixed start state
                start = state - torch.exp(A * layer.delta_sum_old)[..., None, None] * layer.window_old
                layer.delta_sum_old = layer.delta_sum_old + cum[:, -1]
                layer.delta_sum_new = layer.delta_sum_new + cum[:, -1]
            starts.append(start)
            cums.append(cum)
            state = torch.exp(A * cum[:, -1])[..., None, None] * state + local_s[i].float()
            if (t0 + e) % period == 0:
                if mit.caps is not None:
                    state = self._cap(state, mit.caps)
                if mit.window is not None:
                    self._rotate_window(layer, state)

        # 3. outputs: local output + the start state's contribution
        outputs = []
        for i, (a, e) in enumerate(pieces):
            if batched and i == full[0]:
                k = len(full)
                readout = self._state_readout(
                    fold(C),
                    torch.stack([cums[j] for j in full]).reshape(k * batch, period, H),
                    A,
                    torch.stack([starts[j] for j in full]).reshape(k * batch, H, P, N),
                )
                y = (yb + readout.to(yb.dtype)).view(k, batch, period, H, P).transpose(0, 1).reshape(batch, -1, H, P)
                outputs.append(y)
            elif not (batched and i in full):
                outputs.append(local_y[i] + self._state_readout(C[:, a:e], cums[i], A, starts[i]).to(local_y[i].dtype))
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return y, state.to(local_s[0].dtype)

    @staticmethod
    def _rotate_window(layer, h):
        # at t = m·r: the next outputs read h_t − exp(A·Σ_{j=(m−1)r+1..t}Δ)·h_{(m−1)r}. A copy, because decoding
        # updates the carried state in place.
        layer.window_old, layer.window_new = layer.window_new, h.clone()
        layer.delta_sum_old, layer.delta_sum_new = layer.delta_sum_new, torch.zeros_like(layer.delta_sum_new)

    def _decode_step(self, x, B, C, delta, A, h, layer, mit, torch_steps, t):
        """One token at position t through ``mamba2_selective_state_update`` (or its fast CPU twin); h updated in place."""
        batch = x.shape[0]
        x = x.view(batch, self.num_heads, self.head_dim)
        Bg = B.view(batch, self.n_groups, self.ssm_state_size)
        Cg = C.view(batch, self.n_groups, self.ssm_state_size)
        d = delta[:, 0]  # (b, h)
        if not h.is_contiguous():
            h = h.contiguous()  # a scan's final state can be a strided slice; the in-place step needs a dense one
        if torch_steps:
            y = _ssm_update_torch(h, x, d, A, Bg, Cg, self.D)
        else:
            y = _m2.mamba2_selective_state_update(
                h,
                x,
                d[..., None].expand(-1, -1, self.head_dim),
                A[:, None, None].expand(-1, self.head_dim, self.ssm_state_size),
                Bg,
                Cg,
                self.D[:, None].expand(-1, self.head_dim),
                z=None,
                dt_bias=None,
                dt_softplus=False,
            )
        y = y.view(batch, 1, self.num_heads, self.head_dim)
        if mit.window is not None:
            layer.delta_sum_old = layer.delta_sum_old + d.float()
            layer.delta_sum_new = layer.delta_sum_new + d.float()
            y = y - self._state_readout(C, layer.delta_sum_old[:, None], A, layer.window_old).to(y.dtype)
        period = mit.period
        if period is not None and t % period == 0:
            if mit.caps is not None:
                h.mul_(
                    torch.clamp(mit.caps[None, :] / h.float().flatten(2).norm(dim=-1).clamp_min(1e-30), max=1.0)[
                        ..., None, None
                    ]
                )
            if mit.window is not None:
                self._rotate_window(layer, h)
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

    def model_card_facts(self) -> dict:
        c = self.config
        active = {k: getattr(c, k) for k in ("insertion_scale", "decay_scale", "sliding_window") if getattr(c, k) not in (None, 1.0)}
        if c.state_norm_max is not None:
            active["state_norm_max"] = f"set (every {c.state_norm_every} tokens)"
        return {"model_id": c.name_or_path or "robust-mamba2", "mitigations": active or "none (defaults)"}
    _no_split_modules = ["RobustMamba2Block"]
    _is_stateful = True

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


class RobustMamba2Model(RobustMamba2PreTrainedModel):
    """Mamba-2 backbone (``embeddings``, ``layers``, ``norm_f``) with the mitigations and model-level segmenting."""

    def __init__(self, config: RobustMamba2Config):
        super().__init__(config)
        config.check_mitigations()
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

    def _prepare_cache(self, cache, use_cache, total_len):
        if cache is not None:
            return RobustMamba2Cache.ensure(cache)
        if use_cache or total_len > self.config.max_segment_length or self.config.has_mitigations:
            # segments and mitigations need positions and states carried between calls even without use_cache
            return RobustMamba2Cache(config=self.config)
        return None

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
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache if not self.training else False)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if "cache_params" in kwargs:  # deprecated name, as transformers
            cache = kwargs.pop("cache_params")
        total = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        cache = self._prepare_cache(cache, use_cache, total)
        outs, layer_outs = [], []
        for _, _, h, hs in self.iter_segments(input_ids, inputs_embeds, cache, attention_mask, output_hidden_states):
            outs.append(h)
            layer_outs.append(hs)
        hidden_states = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        all_hidden = None
        if output_hidden_states:
            # as transformers: every layer's output, then the norm_f output (no embedding entry)
            per_layer = [torch.cat([hs[i] for hs in layer_outs], dim=1) for i in range(len(self.layers))]
            all_hidden = tuple(per_layer) + (hidden_states,)
        out_cache = cache if use_cache else None
        if not return_dict:
            return tuple(v for v in [hidden_states, out_cache, all_hidden] if v is not None)
        return RobustMamba2Output(last_hidden_state=hidden_states, cache=out_cache, hidden_states=all_hidden)


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
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        return self.backbone.set_input_embeddings(new_embeddings)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if isinstance(model_kwargs.get("cache"), DynamicCache):
            RobustMamba2Cache.ensure(model_kwargs["cache"])

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
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache if not self.training else False)
        if "cache_params" in kwargs:
            cache = kwargs.pop("cache_params")
        source = input_ids if input_ids is not None else inputs_embeds
        total = source.shape[1]
        cache = self.backbone._prepare_cache(cache, use_cache, total)
        keep = _keep_positions(total, logits_to_keep, source.device)
        num_items = kwargs.get("num_items_in_batch")

        kept_logits, layer_outs, final_hidden = [], [], []
        loss_sum, n_tokens = None, 0
        for start, end, h, hs in self.backbone.iter_segments(
            input_ids, inputs_embeds, cache, attention_mask, output_hidden_states
        ):
            if isinstance(keep, slice):
                sel = slice(max(keep.start, start) - start, max(min(keep.stop, end), start) - start)
                h_keep = h[:, sel]
            else:
                idx = keep[(keep >= start) & (keep < end)] - start
                h_keep = h[:, idx]
            seg_logits = None
            if labels is not None:
                # next-token loss of this segment: position i predicts labels[i + 1]; the last one has no target
                seg_logits = self.lm_head(h.to(self.lm_head.weight.dtype)).float()  # (b, l, vocab)
                target = labels[:, start + 1 : end + 1].to(seg_logits.device)
                if target.shape[1] < end - start:
                    target = F.pad(target, (0, end - start - target.shape[1]), value=-100)
                seg_loss = F.cross_entropy(
                    seg_logits.reshape(-1, seg_logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
                )
                loss_sum = seg_loss if loss_sum is None else loss_sum + seg_loss
                n_tokens += int((target != -100).sum())
            if h_keep.shape[1] > 0:
                if seg_logits is not None and isinstance(keep, slice):
                    kept_logits.append(seg_logits[:, sel])
                else:
                    kept_logits.append(self.lm_head(h_keep.to(self.lm_head.weight.dtype)).float())
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
            denom = num_items if num_items is not None else max(n_tokens, 1)
            if isinstance(denom, torch.Tensor):
                denom = denom.to(loss_sum.device)
            loss = loss_sum / denom
        all_hidden = None
        if output_hidden_states:
            per_layer = [torch.cat([hs[i] for hs in layer_outs], dim=1) for i in range(self.config.num_hidden_layers)]
            all_hidden = tuple(per_layer) + (torch.cat(final_hidden, dim=1),)
        out_cache = cache if use_cache else None
        if not return_dict:
            output = tuple(v for v in (logits, out_cache, all_hidden) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return RobustMamba2CausalLMOutput(loss=loss, logits=logits, cache=out_cache, hidden_states=all_hidden)
