"""The cache of Robust Mamba-2: transformers' linear-attention cache layer plus what the mitigations need to resume.

A ``RobustMamba2Cache`` holds the whole state of a stream (per layer: conv and SSM states, the window boundary states,
the position counter), so it can be saved to one safetensors file and resumed later, in another process, with
``RobustMamba2Cache.save(path)`` / ``RobustMamba2Cache.load(path, config)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
from transformers.cache_utils import Cache, DynamicCache, LinearAttentionLayer

from .mitigations_robust_mamba2 import SlidingWindowState

# version of the file layout written by RobustMamba2Cache.save; load refuses other versions
CACHE_FORMAT_VERSION = 1
_METADATA_KEY = "robust_mamba2_cache"
_WINDOW_FIELDS = SlidingWindowState._fields  # old, new, delta_sum_old, delta_sum_new

__all__ = ["CACHE_FORMAT_VERSION", "RobustMamba2Cache", "RobustMamba2CacheLayer", "as_robust_cache"]


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
    added on first use. ``generate()`` builds one by itself, and continues from one passed as ``cache=`` (pass only
    the new tokens as ``input_ids``: the cache already holds the earlier ones).

    ``save(path)`` writes the whole stream state to one safetensors file and ``load(path, config)`` restores it, so a
    stream (or a prefilled prompt) can be resumed in another process. ``mitigation_key`` is set by the model at every
    forward: the (validated) mitigation settings the state was produced with, which ``save`` records.
    """

    def __init__(self, config=None, offloading: bool = False, offload_only_non_sliding: bool = False):
        # not DynamicCache.__init__: it would build transformers' LinearAttentionLayer objects from config.layer_types
        kwargs = dict(offloading=offloading, offload_only_non_sliding=offload_only_non_sliding)
        if config is None:
            Cache.__init__(self, layer_class_to_replicate=RobustMamba2CacheLayer, **kwargs)
        else:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
            Cache.__init__(self, layers=[RobustMamba2CacheLayer() for _ in range(num_layers)], **kwargs)
        self.mitigation_key: tuple | None = None

    @property
    def seen_tokens(self) -> int:
        """Tokens the stream has processed (the position of the last one); 0 for an empty cache."""
        return self.layers[0].seen_tokens if self.layers else 0

    # -- save / load ----------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the stream state to one safetensors file, atomically; returns the path.

        Tensors ``layers.{i}.conv_state`` (b, channels, conv_kernel), ``layers.{i}.ssm_state`` (b, h, p, n) and, with
        ``sliding_window``, ``layers.{i}.window.{old,new}`` (b, h, p, n) and ``layers.{i}.window.delta_sum_{old,new}``
        (b, h). The safetensors metadata holds one JSON string: format version, number of layers, per layer its
        ``seen_tokens`` and which tensors exist, and the mitigation settings the state was produced with.

        The file is written to a temporary file in the same folder and moved into place with ``os.replace``, so an
        interrupted save leaves the previous file (if any) intact, never a truncated one.
        """
        from safetensors.torch import save_file

        path = Path(path)
        layers_meta, tensors = [], {}
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, RobustMamba2CacheLayer):
                raise TypeError(
                    f"RobustMamba2Cache.save: layer {i} is a {type(layer).__name__}, not a RobustMamba2CacheLayer"
                )
            has_state = layer.ssm_state is not None
            has_window = has_state and layer.window is not None
            layers_meta.append({"seen_tokens": layer.seen_tokens, "state": has_state, "window": has_window})
            if has_state:
                # contiguous copies: safetensors refuses views and tensors that share memory (the window's two
                # boundary states start as one tensor)
                tensors[f"layers.{i}.conv_state"] = layer.conv_state.detach().contiguous().clone()
                tensors[f"layers.{i}.ssm_state"] = layer.ssm_state.detach().contiguous().clone()
            if has_window:
                for name, value in zip(_WINDOW_FIELDS, layer.window):
                    tensors[f"layers.{i}.window.{name}"] = value.detach().contiguous().clone()
        if self.mitigation_key is None and any(m["state"] for m in layers_meta):
            raise ValueError(
                "RobustMamba2Cache.save: this cache holds a state but no record of the settings it was produced with "
                "(it was not filled by a RobustMamba2 model's forward)."
            )
        metadata = {
            "format_version": CACHE_FORMAT_VERSION,
            "num_layers": len(self.layers),
            "layers": layers_meta,
            "state_settings": None if self.mitigation_key is None else _state_settings_from_key(self.mitigation_key),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={_METADATA_KEY: json.dumps(metadata)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, config, device: torch.device | str | None = None) -> RobustMamba2Cache:
        """Read a cache written by ``save`` for a model with ``config``; tensors go to ``device`` (default CPU).

        Raises ``ValueError`` when the file cannot resume a stream of this model: another format version or number of
        layers, state shapes that do not fit the config, or mitigation settings that differ from the config's in a
        way that changes the state (``insertion_scale``, ``decay_scale``, ``state_norm_max``, ``state_norm_every``,
        ``sliding_window``): continuing under other settings would compute something neither setting computes.
        """
        from safetensors import safe_open

        path = Path(path)
        config.check_mitigations()  # compare normalised values
        with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
            raw = (f.metadata() or {}).get(_METADATA_KEY)
            if raw is None:
                raise ValueError(f"{path} is not a RobustMamba2Cache file (no {_METADATA_KEY!r} metadata).")
            meta = json.loads(raw)
            if meta.get("format_version") != CACHE_FORMAT_VERSION:
                raise ValueError(
                    f"{path} has cache format version {meta.get('format_version')!r}; this RobustMamba2Cache "
                    f"reads version {CACHE_FORMAT_VERSION}."
                )
            if meta["num_layers"] != config.num_hidden_layers:
                raise ValueError(
                    f"{path} holds the state of a {meta['num_layers']}-layer model; this config has "
                    f"{config.num_hidden_layers} layers."
                )
            saved, current = meta["state_settings"], config.state_settings()
            if saved is not None:
                differ = {k: (saved.get(k), current[k]) for k in current if saved.get(k) != current[k]}
                if differ:
                    details = ", ".join(f"{k}: saved {a!r}, config {b!r}" for k, (a, b) in differ.items())
                    raise ValueError(
                        f"{path} was produced with other mitigation settings than this config ({details}). The state "
                        "depends on them: load it into a model with the same settings."
                    )
            cache = cls(config=config)
            cache.mitigation_key = config.mitigation_key()
            for i, (layer, layer_meta) in enumerate(zip(cache.layers, meta["layers"])):
                layer.seen_tokens = int(layer_meta["seen_tokens"])
                if not layer_meta["state"]:
                    continue
                conv, ssm = f.get_tensor(f"layers.{i}.conv_state"), f.get_tensor(f"layers.{i}.ssm_state")
                _check_state_shapes(path, i, config, conv, ssm)
                layer.set_states(conv, ssm)
                if layer_meta["window"]:
                    layer.window = SlidingWindowState(*(f.get_tensor(f"layers.{i}.window.{n}") for n in _WINDOW_FIELDS))
        return cache


def _state_settings_from_key(key: tuple) -> dict:
    """The JSON-ready ``STATE_FIELDS`` of a ``RobustMamba2Config.mitigation_key()``."""
    from .configuration_robust_mamba2 import STATE_FIELDS

    def thaw(value):
        return [thaw(v) for v in value] if isinstance(value, tuple) else value

    fields = dict(key)
    return {name: thaw(fields[name]) for name in STATE_FIELDS}


def _check_state_shapes(path, i: int, config, conv: torch.Tensor, ssm: torch.Tensor) -> None:
    intermediate = int(config.expand * config.hidden_size)
    conv_dim = intermediate + 2 * config.n_groups * config.state_size
    ssm_ok = ssm.ndim == 4 and tuple(ssm.shape[1:]) == (config.num_heads, config.head_dim, config.state_size)
    conv_ok = (
        conv.ndim == 3 and tuple(conv.shape[1:]) == (conv_dim, config.conv_kernel) and conv.shape[0] == ssm.shape[0]
    )
    if not (ssm_ok and conv_ok):
        raise ValueError(
            f"{path}: layer {i} holds states of shape conv {tuple(conv.shape)}, ssm {tuple(ssm.shape)}; this config "
            f"needs conv (batch, {conv_dim}, {config.conv_kernel}) and ssm (batch, {config.num_heads}, "
            f"{config.head_dim}, {config.state_size})."
        )


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
