"""What a model is made of, read off the model transformers itself builds (on the meta device, no memory).

In: a config.json dict, and for a graft the output format that writes it. Out: an `Arch`, one `Layer` record
per decoder layer with its parameters split by who uses them (every token's matmuls, every token's other
weights, one routed expert) and its attention shape.

The MoE side is the model transformers builds from the format's own `moe_config`, the config `convert` writes:
a new format is taught once, in its class, and plan follows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from moegraft.config import GraftSpec, parse_layers
from moegraft.errors import SourceError, SpecError, UnsupportedModelError
from moegraft.formats import (
    BY_NAME,
    DENSE_MODEL_TYPES,
    MOE_MODEL_TYPES,
    OutputFormat,
    format_of_moe,
    is_moe,
    resolve_format,
)
from moegraft.formats.base import TEXT_LAYER_PREFIXES, TOWER_PATTERNS

# every model_type plan reads: what some format converts, and what the formats write
SUPPORTED_TYPES = tuple(dict.fromkeys((*DENSE_MODEL_TYPES, *MOE_MODEL_TYPES)))
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Layer:
    """One decoder layer: its attention shape and its parameters, split by who uses them."""

    q_heads: int  # 0 for a layer without softmax attention (linear attention keeps a fixed-size state)
    kv_heads: int
    head_dim: int
    window: int | None  # sliding window (keys a token sees, KV kept); None = full attention
    kv_shared: bool  # reuses an earlier layer's K/V (Gemma 4): stores no cache of its own
    matmul: int  # weights every token multiplies: attention, dense FFN, router, gates
    other: int  # every token, not a matmul: norms, biases, scales
    expert: int = 0  # one routed expert's weights
    num_experts: int = 0  # E
    top_k: int = 0  # K


@dataclass(frozen=True)
class Arch:
    """A whole text model as plain numbers."""

    model_type: str
    architecture: str
    hidden_size: int  # H
    vocab_size: int  # V
    layers: tuple[Layer, ...]
    embed: int  # lookup tables: embed_tokens (+ Gemma 4's per-layer-input table)
    lm_head: int  # stored lm_head weight; 0 when tied to embed_tokens
    top_matmul: int  # outside the layers, every token: Gemma 4 per_layer_model_projection
    top_other: int  # final norm (+ Gemma 4 per_layer_projection_norm)
    intermediate_size: int  # I of the dense FFN
    max_positions: int | None = None  # max_position_embeddings
    expert_size: int | None = None  # I_e

    @property
    def is_moe(self) -> bool:
        return any(lay.num_experts for lay in self.layers)


def _hf_config(config: dict) -> Any:
    """transformers' own config object, so every default and derived field is its own."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by plan; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    body = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return CONFIG_MAPPING[model_type].from_dict(body)
    except Exception as e:  # strict-dataclass validation raises several types; all mean a bad file
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise SourceError(f"config.json ({model_type}) is not valid for transformers: {first}") from None


def meta_model(config: dict) -> nn.Module:
    """The causal LM transformers builds from this config.json (its text model only), on the meta device: the
    shapes without the memory. Cached: plan reads the same config several times."""
    return _meta_model(json.dumps(config, sort_keys=True))


@lru_cache(maxsize=16)
def _meta_model(config_json: str) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    cfg = _hf_config(json.loads(config_json))
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # building on meta warns about weights it cannot initialise
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    finally:
        logging.set_verbosity(verbosity)


def _windows(cfg: Any) -> list[int | None]:
    """Per-layer sliding window, as transformers' cache decides it (layer_types, else sliding_window)."""
    L = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    sw = getattr(cfg, "sliding_window", None)
    if types is None:
        return [sw or None] * L
    return [sw if t == "sliding_attention" else None for t in types]


def _decoder_layers(model: nn.Module, depth: int) -> nn.ModuleList:
    for name, module in model.named_modules():
        if f"{name}." in TEXT_LAYER_PREFIXES and isinstance(module, nn.ModuleList) and len(module) == depth:
            return module
    raise UnsupportedModelError(f"{type(model).__name__}: found no list of its {depth} decoder layers")


def _attention(layer: nn.Module, cfg: Any) -> tuple[int, int, int, bool]:
    """(q heads, kv heads, head_dim, kv shared) of a decoder layer's softmax attention, from its module."""
    attn = getattr(layer, "self_attn", None)
    if attn is None:  # a linear-attention layer: no KV cache that grows with context
        return 0, 0, 0, False
    nq = cfg.num_attention_heads
    return (
        nq,
        nq // attn.num_key_value_groups,
        attn.head_dim,
        bool(getattr(attn, "is_kv_shared_layer", False)),
    )


def read_arch(config: dict, moe_format: type[OutputFormat] | None = None) -> Arch:
    """The shapes of the model `config` describes, counted on the model transformers builds.

    Args:
        config: a config.json dict (multimodal: its text model and lm_head; the towers are left out).
        moe_format: the format that wrote `config`, when it is a MoE: its pathway map says which parameters are
            routed experts and its `top_k_key` how many each token runs.
    """
    model = meta_model(config)
    cfg = model.config.get_text_config()
    H, V, depth = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    expert_rx = [re.compile(rx) for rx in (moe_format.pathways()["experts"] if moe_format else ())]
    top_k = int(getattr(cfg, moe_format.top_k_key, 0) or 0) if moe_format else 0
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    per_layer = [{"matmul": 0, "other": 0, "experts": 0, "E": 0} for _ in range(depth)]
    embed = lm_head = top_matmul = top_other = 0
    for name, p in model.named_parameters():  # tied weights are listed once
        if any(re.search(rx, name) for rx in TOWER_PATTERNS):
            continue  # a multimodal model's vision/audio towers: not the text model
        n, m = p.numel(), _LAYER.search(name)
        if id(p) in lookups:
            embed += n
        elif m is None:
            if name.startswith("lm_head."):
                lm_head += n
            elif p.ndim >= 2:
                top_matmul += n
            else:
                top_other += n
        else:
            rec = per_layer[int(m[1])]
            # routed experts are the fused (E, out, in) tensors of the experts pathway; its norms (Gemma 4's
            # post_feedforward_layernorm_2) run for every token
            if p.ndim == 3 and any(rx.search(name) for rx in expert_rx):
                rec["experts"] += n
                rec["E"] = p.shape[0]
            else:
                rec["matmul" if p.ndim >= 2 else "other"] += n
    windows = _windows(cfg)
    layers = []
    for i, (module, rec) in enumerate(zip(_decoder_layers(model, depth), per_layer, strict=True)):
        nq, nkv, hd, shared = _attention(module, cfg)
        E = rec["E"]
        layers.append(
            Layer(
                nq,
                nkv,
                hd,
                windows[i],
                shared,
                rec["matmul"],
                rec["other"],
                expert=rec["experts"] // E if E else 0,
                num_experts=E,
                top_k=top_k if E else 0,
            )  # fmt: skip
        )
    expert = next((lay.expert for lay in layers if lay.num_experts), 0)
    return Arch(
        model_type=config["model_type"],
        architecture=(config.get("architectures") or [type(model).__name__])[0],
        hidden_size=H,
        vocab_size=V,
        layers=tuple(layers),
        embed=embed,
        lm_head=lm_head,
        top_matmul=top_matmul,
        top_other=top_other,
        # the dense FFN's I (a MoE without one, Qwen3.5's, keeps it as its shared expert)
        intermediate_size=getattr(cfg, "intermediate_size", None) or cfg.shared_expert_intermediate_size,
        max_positions=getattr(cfg, "max_position_embeddings", None),
        expert_size=expert // (3 * H) if expert else None,  # gate, up (I_e, H) and down (H, I_e)
    )


def read_model(config: dict) -> tuple[Arch, list[str]]:
    """A model as given (dense, or a MoE some format writes) and the notes that go with it."""
    fmt = format_of_moe(config) if is_moe(config) else None
    arch = read_arch(config, fmt)
    notes = []
    text = config.get("text_config") or config
    if config.get("model_type", "").startswith("gemma4") and text.get("attention_k_eq_v"):
        notes.append(
            "Gemma 4 attention_k_eq_v: full-attention layers have no v_proj, but their cache still keeps V "
            "(K's projection, normalised without RoPE) beside K"
        )
    if config.get("text_config") is not None:
        notes.append(
            f"{config['model_type']} (multimodal): only the text model is counted (text_config + lm_head); "
            "the vision/audio towers and their embedders are excluded"
        )
    if fmt is not None and fmt.name == "glm4_moe":
        notes.append("GLM-4.5 MoE: e_score_correction_bias (E per MoE layer) is a buffer, not counted")
    return arch, notes


def graft_config(config: dict, spec: GraftSpec) -> tuple[type[OutputFormat], GraftSpec, dict]:
    """(format, resolved spec, the config.json `convert` would write) for grafting `spec` onto `config`.

    Raises:
        SpecError: already a MoE, top_k > experts, a format that cannot hold the model, bad layers or sizes.
        UnsupportedModelError: no exact format (the format's own reason, e.g. biases it cannot hold).
    """
    if is_moe(config):
        raise SpecError(
            f"the model ({config.get('model_type')}) is already a MoE; plan it without a spec, or graft its "
            "dense base"
        )
    if spec.top_k > spec.num_experts:  # GraftSpec validates this; guard specs built with model_construct
        raise SpecError(
            f"--top-k {spec.top_k} > --experts {spec.num_experts}: lower --top-k or raise --experts"
        )
    mt = config.get("model_type")
    if mt not in SUPPORTED_TYPES:
        _hf_config(config)  # the one-line "not supported by plan" error
    if spec.format != "auto":
        fmt_cls = BY_NAME[spec.format]
        if mt not in fmt_cls.dense_types:
            allowed = [f.name for f in BY_NAME.values() if mt in f.dense_types]
            raise SpecError(
                f"--format {spec.format} cannot hold a {mt} model exactly; use --format {' or '.join(allowed)}"
            )
    text = config.get("text_config") or config
    depth = int(text["num_hidden_layers"])
    layers = parse_layers(spec.layers, depth) or []
    if not layers:
        raise SpecError(f"--layers {spec.layers!r} selects no layer of {depth}; use --layers all")
    fmt = resolve_format(config, spec)
    return type(fmt), fmt.spec, fmt.moe_config(layers, torch.bfloat16)


__all__ = ["SUPPORTED_TYPES", "Arch", "Layer", "graft_config", "meta_model", "read_arch", "read_model"]
