"""State-collapse-robust Mamba-2 (Stuffed Mamba mitigations) as a transformers model."""

from .calibration import calibrate_state_norms, recommended_training_length, state_elements
from .configuration_robust_mamba2 import RobustMamba2Config
from .conversion import convert_mamba_ssm_checkpoint, mamba_ssm_config_to_robust
from .modeling_robust_mamba2 import (
    RobustMamba2Cache,
    RobustMamba2CacheLayer,
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
]
