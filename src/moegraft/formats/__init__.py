"""Native MoE output formats, one small class each, picked by the first that represents the model exactly.

In: the dense config.json and the requested format name. Out: the format class to use.
"""

from __future__ import annotations

from moegraft.config import GraftSpec, parse_layers
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
MOE_MODEL_TYPES = {t: f for f in FORMATS for t in f.moe_types}
# every model_type some format converts, in FORMATS order
DENSE_MODEL_TYPES = tuple(dict.fromkeys(t for f in FORMATS for t in f.dense_types))


def is_moe(config: dict) -> bool:
    """Whether `config` is already a MoE: a format's output type that is not also a dense input type, or a Gemma 4
    with its MoE block on."""
    text = config.get("text_config") or config
    mt = config.get("model_type")
    return (mt in MOE_MODEL_TYPES and mt not in DENSE_MODEL_TYPES) or bool(text.get("enable_moe_block"))


def pick_format(config: dict, name: str = "auto") -> type[OutputFormat]:
    """The format that represents this dense model exactly.

    Raises:
        UnsupportedModelError: with the reasons each format gave, in one line.
    """
    if is_moe(config):
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
    mt = config.get("model_type")
    takers = [(f.name, why) for f, why in zip(candidates, reasons, strict=True) if mt in f.dense_types]
    if name == "auto" and takers:  # formats that take this family, each with why not this model
        raise UnsupportedModelError(
            f"no native MoE format holds this {mt} model exactly: "
            + "; ".join(f"{n}: {w}" for n, w in takers)
        )
    if name == "auto":
        raise UnsupportedModelError(
            f"no exact native MoE format for model_type {mt!r}; supported: "
            + "; ".join(f"{f.name} (from {', '.join(f.dense_types)})" for f in FORMATS)
        )
    raise UnsupportedModelError(f"--format {name}: {reasons[0]}; try --format auto")


def resolve_format(config: dict, spec: GraftSpec) -> OutputFormat:
    """The format that holds `spec` on this dense model exactly, with the spec resolved (a carve's expert size from
    the dense I) and its layers and sizes checked: what plan and convert both build on.

    Raises:
        UnsupportedModelError: no exact format, or one that cannot hold a carve.
        SpecError: layers or sizes the format cannot take.
    """
    fmt_cls = pick_format(config, spec.format)
    text = config.get("text_config") or config
    I, depth = int(text["intermediate_size"]), int(text["num_hidden_layers"])
    if spec.init == "carve":
        from moegraft.init.carve import resolve_carve_spec

        if fmt_cls.carve_refusal:
            raise UnsupportedModelError(
                f"--init carve: {fmt_cls.carve_refusal}; carve needs a Llama-family model and --format qwen2_moe"
            )
        spec = resolve_carve_spec(spec, I)  # expert_size = (I - S) / E
    fmt = fmt_cls(config, spec)
    fmt.check_layers(parse_layers(spec.layers, depth) or [], depth)
    fmt.check_sizes(I)
    return fmt


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
    "DENSE_MODEL_TYPES",
    "MOE_MODEL_TYPES",
    "FORMATS",
    "PATHWAYS",
    "TOWERS",
    "TOWER_PATTERNS",
    "OutTensor",
    "OutputFormat",
    "format_of_moe",
    "is_moe",
    "pick_format",
    "resolve_format",
]
