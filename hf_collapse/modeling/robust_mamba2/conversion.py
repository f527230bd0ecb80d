"""Conversion of the original ``state-spaces/mamba2-*`` checkpoints into a ``robust_mamba2`` checkpoint.

The converter reads a *local* folder. To convert a checkpoint from the Hub, download it first (when the Hub is
reachable)::

    from huggingface_hub import snapshot_download
    src = snapshot_download("state-spaces/mamba2-130m")
    convert_mamba_ssm_checkpoint(src, "mamba2-130m-robust")
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .configuration_robust_mamba2 import RobustMamba2Config

__all__ = ["convert_mamba_ssm_checkpoint", "mamba_ssm_config_to_robust"]

# mamba_ssm's Mamba2 layer defaults (mamba_ssm/modules/mamba2.py) for keys a config.json may leave out
_SSM_DEFAULTS = {"d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1, "chunk_size": 256}

# The state-spaces checkpoints use the GPT-NeoX tokenizer, whose <|endoftext|> (id 0) serves as padding, start and
# end; transformers' own mamba2 converter writes the same ids. Mamba2Config's defaults (pad 1, bos 0, eos 2) are
# those of Mistral's Codestral tokenizer and would make generate() stop on, and pad with, the wrong tokens.
GPT_NEOX_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}


def mamba_ssm_config_to_robust(ssm_config: dict, **mitigation_kwargs) -> RobustMamba2Config:
    """Translate a ``mamba_ssm`` ``MambaConfig`` dict (d_model, n_layer, ssm_cfg, ...) into a RobustMamba2Config.

    Token ids are GPT-NeoX's (``pad_token_id = bos_token_id = eos_token_id = 0``), as for every state-spaces
    checkpoint. Raises ``ValueError`` for what the model cannot compute: another layer type, attention layers, or
    ``ssm_cfg.norm_before_gate = True`` (the mixer applies the gate before the gated RMSNorm, mamba_ssm's default).
    """
    ssm_cfg = {**_SSM_DEFAULTS, **(ssm_config.get("ssm_cfg") or {})}
    layer = ssm_cfg.get("layer", "Mamba2")
    if layer != "Mamba2":
        raise ValueError(f"Only Mamba2 checkpoints can be converted, this one has ssm_cfg.layer = {layer!r}")
    if ssm_cfg.get("norm_before_gate", False):
        raise ValueError(
            "This checkpoint has ssm_cfg.norm_before_gate = True (RMSNorm before the gate); RobustMamba2, like "
            "transformers' Mamba-2, only implements the gate before the norm (mamba_ssm's default, False)."
        )
    if ssm_config.get("attn_layer_idx"):
        raise ValueError("Hybrid checkpoints with attention layers (attn_layer_idx) are not supported")
    d_model = ssm_config["d_model"]
    intermediate = ssm_cfg["expand"] * d_model
    # mamba_ssm pads the vocabulary to a multiple of pad_vocab_size_multiple; the weights have the padded size
    vocab = ssm_config["vocab_size"]
    multiple = ssm_config.get("pad_vocab_size_multiple", 1)
    vocab = int(math.ceil(vocab / multiple) * multiple)
    dt_limit = ssm_cfg.get("dt_limit", (0.0, float("inf")))
    return RobustMamba2Config(
        hidden_size=d_model,
        num_hidden_layers=ssm_config["n_layer"],
        vocab_size=vocab,
        state_size=ssm_cfg["d_state"],
        conv_kernel=ssm_cfg["d_conv"],
        expand=ssm_cfg["expand"],
        head_dim=ssm_cfg["headdim"],
        num_heads=intermediate // ssm_cfg["headdim"],
        n_groups=ssm_cfg["ngroups"],
        chunk_size=ssm_cfg["chunk_size"],
        use_bias=bool(ssm_cfg.get("bias", False)),
        use_conv_bias=bool(ssm_cfg.get("conv_bias", True)),
        residual_in_fp32=bool(ssm_config.get("residual_in_fp32", True)),
        tie_word_embeddings=bool(ssm_config.get("tie_embeddings", True)),
        time_step_limit=list(dt_limit),
        time_step_min=float(ssm_cfg.get("dt_min", 0.001)),
        time_step_max=float(ssm_cfg.get("dt_max", 0.1)),
        time_step_floor=float(ssm_cfg.get("dt_init_floor", 1e-4)),
        layer_norm_epsilon=1e-5,
        **GPT_NEOX_TOKEN_IDS,
        **mitigation_kwargs,
    )


def _load_state_dict(src: Path) -> dict[str, torch.Tensor]:
    st_files = sorted(src.glob("*.safetensors"))
    if st_files:
        from safetensors.torch import load_file

        state = {}
        for f in st_files:
            state.update(load_file(str(f)))
        return state
    bin_file = src / "pytorch_model.bin"
    if not bin_file.exists():
        raise FileNotFoundError(f"No *.safetensors or pytorch_model.bin in {src}")
    # weights_only: a pickle checkpoint cannot run code while loading
    return torch.load(bin_file, map_location="cpu", weights_only=True)


def convert_mamba_ssm_checkpoint(src_dir, dst_dir, dtype: torch.dtype | None = None, **mitigation_kwargs):
    """Convert a local ``state-spaces/mamba2-*`` checkpoint folder into a safetensors ``robust_mamba2`` checkpoint.

    ``src_dir`` must be a local folder: this function does not download. For a Hub checkpoint, run
    ``src_dir = huggingface_hub.snapshot_download("state-spaces/mamba2-130m")`` first (when the Hub is reachable).
    The converted config has GPT-NeoX token ids (pad = bos = eos = 0).

    The source has ``config.json`` in mamba_ssm's format (d_model, n_layer, vocab_size, ssm_cfg, tie_embeddings,
    pad_vocab_size_multiple) and weights in ``pytorch_model.bin`` or ``*.safetensors`` named ``backbone.embedding.*``,
    ``backbone.layers.{i}.mixer.*``, ``backbone.layers.{i}.norm.*``, ``backbone.norm_f.*`` and (untied) ``lm_head.*``.

    Args:
        src_dir: local directory of the original checkpoint.
        dst_dir: output directory (``config.json``, ``model.safetensors``, ``generation_config.json``).
        dtype: optional dtype to cast the weights to.
        **mitigation_kwargs: mitigation fields to store in the converted config.

    Returns:
        The converted ``RobustMamba2ForCausalLM`` (on CPU).
    """
    from .modeling_robust_mamba2 import RobustMamba2ForCausalLM

    src, dst = Path(src_dir), Path(dst_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(
            f"{src} is not a local checkpoint folder with a config.json. convert_mamba_ssm_checkpoint reads local "
            "folders only; download a Hub checkpoint first with huggingface_hub.snapshot_download(repo_id)."
        )
    ssm_config = json.loads((src / "config.json").read_text())
    config = mamba_ssm_config_to_robust(ssm_config, **mitigation_kwargs)
    state = _load_state_dict(src)
    renamed = {}
    for key, value in state.items():
        new_key = key.replace("backbone.embedding.", "backbone.embeddings.")
        renamed[new_key] = value if dtype is None else value.to(dtype)
    if "lm_head.weight" not in renamed:
        if not config.tie_word_embeddings:
            raise ValueError("The checkpoint has no lm_head.weight and does not tie embeddings")
        renamed["lm_head.weight"] = renamed["backbone.embeddings.weight"]
    with torch.device("meta"):
        model = RobustMamba2ForCausalLM(config)
    missing, unexpected = model.load_state_dict(renamed, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"Checkpoint does not match the converted config: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.eval()
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    return model
