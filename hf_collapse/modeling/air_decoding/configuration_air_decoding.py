"""Configuration of the fused Air-Decoding model: a pointer to a base causal LM and an attribute-prefix checkpoint."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...validation import check_known_fields

__all__ = ["AirDecodingConfig"]


class AirDecodingConfig(PretrainedConfig):
    r"""
    Configuration of [`AirDecodingForCausalLM`]: the base causal LM and the K attribute prefixes (one PEFT
    prefix-tuning adapter per attribute) that the fused model runs together in one forward per decoding step.

    It holds no weights and no architecture of its own: the saved folder is this `config.json` (and a short
    `README.md`), and loading it loads the base model with `AutoModelForCausalLM.from_pretrained` and the prefixes
    with `read_attribute_prefixes`.

    Args:
        base_model_name_or_path (`str`, *optional*):
            The base causal LM: a Hub id or a local folder, as passed to `AutoModelForCausalLM.from_pretrained`. A
            relative path is looked up in the saved folder first, then taken as it is.
        prefixes (`str`, *optional*):
            The attribute-prefix checkpoint folder (`attribute_prefixes.json` + one PEFT adapter per attribute).
            `save_pretrained` stores it relative to the saved folder when it lies inside it (so the folder can be
            moved as a whole), else as an absolute path. A relative path is resolved against the saved folder. A
            Hub repository id (prefixes loaded from the Hub) is recorded as it is and fetched again at load time.
        prefixes_revision (`str`, *optional*):
            The Hub branch, tag or commit of `prefixes` when it is a Hub repository id (default: the default branch).
        kwargs:
            Passed to [`~transformers.PretrainedConfig`].

    Example:

    ```python
    >>> from hf_collapse import AirDecodingConfig
    >>> AirDecodingConfig(base_model_name_or_path="HuggingFaceTB/SmolLM2-135M", prefixes="prefixes").model_type
    'air_decoding'
    ```
    """

    model_type = "air_decoding"

    def __init__(
        self,
        base_model_name_or_path: str | None = None,
        prefixes: str | None = None,
        prefixes_revision: str | None = None,
        **kwargs: Any,
    ):
        # a keyword close to one of this config's own fields is a typo; PretrainedConfig's own keys pass through
        check_known_fields("AirDecodingConfig", [k for k in kwargs if not hasattr(PretrainedConfig, k)],
                           ["base_model_name_or_path", "prefixes", "prefixes_revision"])  # fmt: skip
        self.base_model_name_or_path = None if base_model_name_or_path is None else str(base_model_name_or_path)
        self.prefixes = None if prefixes is None else str(prefixes)
        self.prefixes_revision = None if prefixes_revision is None else str(prefixes_revision)
        super().__init__(**kwargs)
