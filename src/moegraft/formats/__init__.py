"""Native MoE output formats, one small class each, picked by the first that represents the model exactly.

In: the dense config.json and the requested format name. Out: the format class to use.
"""

from __future__ import annotations

from moegraft.errors import UnsupportedModelError
from moegraft.formats.base import PATHWAYS, TOWER_PATTERNS, TOWERS, OutputFormat, OutTensor
from moegraft.formats.gemma4 import Gemma4MoeFormat
from moegraft.formats.gemma_moe import GemmaMoeFormat
from moegraft.formats.glm4_moe import Glm4MoeFormat
from moegraft.formats.qwen2_moe import Qwen2MoeFormat
from moegraft.formats.qwen3_5_moe import Qwen3_5MoeFormat

# Order matters for --format auto: the first exact format wins (Qwen2-MoE before GLM for Llama).
FORMATS: list[type[OutputFormat]] = [
    Gemma4MoeFormat,
    Qwen2MoeFormat,
    Glm4MoeFormat,
    Qwen3_5MoeFormat,
    GemmaMoeFormat,  # moegraft's own class: only where no native one is exact
]
BY_NAME = {f.name: f for f in FORMATS}
# model_type of each format's own output, for loading a converted model back (train, eval, finetune)
MOE_MODEL_TYPES = {
    "gemma4_text": Gemma4MoeFormat,
    "gemma4": Gemma4MoeFormat,
    "qwen2_moe": Qwen2MoeFormat,
    "glm4_moe": Glm4MoeFormat,
    "qwen3_5_moe_text": Qwen3_5MoeFormat,
    "moegraft_gemma3_text": GemmaMoeFormat,
    "moegraft_gemma2": GemmaMoeFormat,
}


def pick_format(config: dict, name: str = "auto") -> type[OutputFormat]:
    """The format that represents this dense model exactly.

    Raises:
        UnsupportedModelError: with the reasons each format gave, in one line.
    """
    text = config.get("text_config") or config
    mt = config.get("model_type")
    # Gemma 4 is dense and MoE in one model_type; every other MoE output type is MoE by its name
    already = text.get("enable_moe_block") if mt in ("gemma4_text", "gemma4") else mt in MOE_MODEL_TYPES
    if already:
        raise UnsupportedModelError(
            f"this model is already a MoE ({config.get('model_type')}); convert its dense base model instead"
        )
    candidates = FORMATS if name == "auto" else [BY_NAME[name]]
    reasons = []
    for fmt in candidates:
        why = fmt.unsupported_reason(config)
        if why is None:
            return fmt
        reasons.append(why)
    if name == "auto":
        raise UnsupportedModelError(
            f"no exact native MoE format for model_type {mt!r}; supported: gemma4 (Gemma 4 dense), "
            "qwen2_moe and glm4_moe (llama, mistral, qwen2, phi3, SmolLM; glm4_moe also qwen3), qwen3_5_moe "
            "(Qwen3.5 dense), gemma_moe (Gemma 2/3, moegraft's own class)"
        )
    raise UnsupportedModelError(f"--format {name}: {reasons[0]}; try --format auto")


def format_of_moe(config: dict) -> type[OutputFormat]:
    """The format class of an already converted (MoE) checkpoint, for its pathway map."""
    fmt = MOE_MODEL_TYPES.get(config.get("model_type", ""))
    if fmt is None:
        raise UnsupportedModelError(
            f"model_type {config.get('model_type')!r} is not a moegraft MoE format; "
            f"expected one of {', '.join(MOE_MODEL_TYPES)}"
        )
    return fmt


__all__ = [
    "BY_NAME",
    "FORMATS",
    "PATHWAYS",
    "TOWERS",
    "TOWER_PATTERNS",
    "OutTensor",
    "OutputFormat",
    "format_of_moe",
    "pick_format",
]
