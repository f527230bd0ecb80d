"""State-collapse-robust Mamba-2 (Stuffed Mamba mitigations) as a transformers model.

* ``configuration_robust_mamba2``: ``RobustMamba2Config`` (Mamba2Config + the mitigation fields).
* ``mitigations_robust_mamba2``: the mitigations as pure tensor functions.
* ``cache_robust_mamba2``: ``RobustMamba2Cache`` and its layers.
* ``kernels_robust_mamba2``: the scan / step functions the mixer calls, chosen once.
* ``modeling_robust_mamba2``: mixer, block and models.
"""

from .cache_robust_mamba2 import RobustMamba2Cache, RobustMamba2CacheLayer, as_robust_cache
from .calibration import calibrate_state_norms, recommended_training_length, state_elements
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
    "Mamba2Kernels",
    "resolve_kernels",
]
