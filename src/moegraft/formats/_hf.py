"""Reading a dense config.json through transformers' own config classes (normalises legacy fields).

In: a config dict. Out: the transformers config object, or an UnsupportedModelError.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig

from moegraft.errors import UnsupportedModelError


def hf_config(config: dict) -> PreTrainedConfig:
    """transformers' config object for a config.json dict (legacy rope_theta/rope_scaling become rope_parameters)."""
    model_type = config.get("model_type")
    if not model_type:
        raise UnsupportedModelError(
            "config.json has no model_type; is this a Hugging Face transformers model?"
        )
    try:
        return AutoConfig.for_model(**config)
    except ValueError as e:
        raise UnsupportedModelError(f"model_type {model_type!r} is unknown to transformers ({e})") from None
