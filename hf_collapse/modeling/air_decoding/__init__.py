"""Fused Air-Decoding: the generator and the K attribute prefixes in one forward of the base model per step.

* ``configuration_air_decoding``: ``AirDecodingConfig`` (the base model and the prefix checkpoint it points at).
* ``modeling_air_decoding``: ``AirDecodingForCausalLM`` (the wrapper ``generate()`` runs) and ``AirDecodingCache``
  (one cache of K+1 row groups, reordered group by group).

The processors (``hf_collapse.processors.air_decoding``) read the attribute logits this model keeps; this package
imports nothing from them.
"""

from .configuration_air_decoding import AirDecodingConfig
from .modeling_air_decoding import AirDecodingCache, AirDecodingForCausalLM

__all__ = ["AirDecodingCache", "AirDecodingConfig", "AirDecodingForCausalLM"]
