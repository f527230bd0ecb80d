"""The cache of Robust Mamba-2: transformers' linear-attention cache layer plus what the mitigations need to resume."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, LinearAttentionLayer

from .mitigations_robust_mamba2 import SlidingWindowState

__all__ = ["RobustMamba2Cache", "RobustMamba2CacheLayer", "as_robust_cache"]


class RobustMamba2CacheLayer(LinearAttentionLayer):
    """A ``LinearAttentionLayer`` (conv state + SSM state) plus what the mitigations need to resume exactly.

    * ``seen_tokens``: tokens this layer has processed (the 1-indexed position of the last one). ``state_norm_max``
      caps at multiples of ``state_norm_every`` of this count, and ``sliding_window`` moves its boundary at
      multiples of the window.
    * ``window``: the ``SlidingWindowState`` (two boundary states and the Σ Δ since each), or None while
      ``sliding_window`` is off.

    Tensors are stored by assignment (not ``copy_``) so that chained training forwards keep a valid autograd graph.
    """

    def __init__(self, number_of_states: int = 1, **kwargs):
        super().__init__(number_of_states=number_of_states, **kwargs)
        self.seen_tokens = 0
        self.window: SlidingWindowState | None = None

    @property
    def ssm_state(self) -> torch.Tensor | None:
        """(b, h, p, n) recurrent state, or None before the first token."""
        return self.recurrent_states[0] if self.has_previous_state[0] else None

    @property
    def conv_state(self) -> torch.Tensor | None:
        """(b, channels, conv_kernel) last conv inputs, or None before the first token."""
        return self.conv_states[0] if self.has_previous_state[0] else None

    def set_states(self, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        self.conv_states[0] = conv_state
        self.recurrent_states[0] = ssm_state
        self.conv_kernel_size[0] = conv_state.shape[-1]
        self.is_conv_states_initialized[0] = True
        self.is_recurrent_states_initialized[0] = True
        self.has_previous_state[0] = True
        self.dtype, self.device = conv_state.dtype, conv_state.device

    def _map_batch(self, fn) -> None:
        for i in range(self.number_of_states):
            if self.is_conv_states_initialized[i]:
                self.conv_states[i] = fn(self.conv_states[i])
            if self.is_recurrent_states_initialized[i]:
                self.recurrent_states[i] = fn(self.recurrent_states[i])
        if self.window is not None:
            self.window = SlidingWindowState(*(fn(t) for t in self.window))

    # -- cache API ------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
        self.window = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])


class RobustMamba2Cache(DynamicCache):
    """``DynamicCache`` whose layers are ``RobustMamba2CacheLayer`` (position counter, window states).

    ``RobustMamba2Cache(config=model.config)`` holds one layer per model layer. Without a config the layers are
    added on first use. ``generate()`` builds one by itself.
    """

    def __init__(self, config=None, offloading: bool = False, offload_only_non_sliding: bool = False):
        # not DynamicCache.__init__: it would build transformers' LinearAttentionLayer objects from config.layer_types
        kwargs = dict(offloading=offloading, offload_only_non_sliding=offload_only_non_sliding)
        if config is None:
            Cache.__init__(self, layer_class_to_replicate=RobustMamba2CacheLayer, **kwargs)
        else:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
            Cache.__init__(self, layers=[RobustMamba2CacheLayer() for _ in range(num_layers)], **kwargs)


def as_robust_cache(cache: Cache, num_layers: int) -> Cache:
    """``cache`` with ``num_layers`` ``RobustMamba2CacheLayer`` layers, so the model can run on it; same object.

    A ``RobustMamba2Cache`` gets any missing layers. A fresh ``DynamicCache`` (e.g. ``DynamicCache(config=...)``)
    gets new ``RobustMamba2CacheLayer`` objects in place of its empty layers. A cache holding another model's state,
    or layers of another kind, raises: use ``RobustMamba2Cache(config=model.config)``.
    """
    layers = cache.layers
    for i in range(num_layers):
        layer = layers[i] if i < len(layers) else None
        if isinstance(layer, RobustMamba2CacheLayer):
            continue
        if layer is not None and type(layer) is not LinearAttentionLayer:
            raise TypeError(
                f"RobustMamba2 needs a RobustMamba2Cache; got a {type(cache).__name__} with a {type(layer).__name__} "
                "layer. Use RobustMamba2Cache(config=model.config)."
            )
        if layer is not None and any(layer.has_previous_state.values()):
            raise ValueError(
                "This cache already holds a state written by another model; RobustMamba2 needs its own cache (it "
                "tracks positions and window states). Use a new RobustMamba2Cache(config=model.config)."
            )
        if layer is None:
            layers.append(RobustMamba2CacheLayer())
        else:
            layers[i] = RobustMamba2CacheLayer()
    return cache
