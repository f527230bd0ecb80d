"""State-collapse-robust Mamba-2 (Stuffed Mamba mitigations) as a transformers model.

* ``configuration_robust_mamba2``: ``RobustMamba2Config`` (Mamba2Config + the mitigation fields).
* ``mitigations_robust_mamba2``: the mitigations as pure tensor functions.
* ``cache_robust_mamba2``: ``RobustMamba2Cache`` (with ``save`` / ``load`` to resume a stream) and its layers.
* ``kernels_robust_mamba2``: the scan / step functions the mixer calls, chosen once.
* ``modeling_robust_mamba2``: mixer, block and models.
* ``calibration``: ``calibrate_state_norms``, ``calibrate_decay_scales``, ``recommended_training_length``.
* ``conversion``: ``convert_mamba_ssm_checkpoint`` for the original state-spaces checkpoints.
"""

from .cache_robust_mamba2 import CACHE_FORMAT_VERSION, RobustMamba2Cache, RobustMamba2CacheLayer, as_robust_cache
from .calibration import (
    DECAY_SCALE_CANDIDATES,
    DEFAULT_MEMORY_THRESHOLD,
    calibrate_decay_scales,
    calibrate_state_norms,
    first_token_memory,
    recommended_training_length,
    state_elements,
)
from .configuration_robust_mamba2 import RobustMamba2Config
from .conversion import convert_mamba_ssm_checkpoint, mamba_ssm_config_to_robust
from .kernels_robust_mamba2 import Mamba2Kernels, resolve_kernels
from .mitigations_robust_mamba2 import (
    SlidingWindowState,
    advance_window,
    cap_state_norm,
    period_pieces,
    rebuild_piece_states,
    rotate_window,
    state_readout,
    window_start_state,
)
from .modeling_robust_mamba2 import (
    RobustMamba2CausalLMOutput,
    RobustMamba2ForCausalLM,
    RobustMamba2Model,
    RobustMamba2Output,
    RobustMamba2PreTrainedModel,
)

__all__ = [
    "RobustMamba2Config",
    "RobustMamba2Model",
    "RobustMamba2ForCausalLM",
    "RobustMamba2PreTrainedModel",
    "RobustMamba2Cache",
    "RobustMamba2CacheLayer",
    "RobustMamba2Output",
    "RobustMamba2CausalLMOutput",
    "convert_mamba_ssm_checkpoint",
    "mamba_ssm_config_to_robust",
    "calibrate_state_norms",
    "calibrate_decay_scales",
    "first_token_memory",
    "DECAY_SCALE_CANDIDATES",
    "DEFAULT_MEMORY_THRESHOLD",
    "recommended_training_length",
    "state_elements",
    # the mitigations as pure functions
    "SlidingWindowState",
    "advance_window",
    "cap_state_norm",
    "period_pieces",
    "rebuild_piece_states",
    "rotate_window",
    "state_readout",
    "window_start_state",
    # cache and kernel plumbing
    "as_robust_cache",
    "CACHE_FORMAT_VERSION",
    "Mamba2Kernels",
    "resolve_kernels",
]
