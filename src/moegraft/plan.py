"""Parameters, FLOPs per token and memory of a model and of the MoE a GraftSpec would make of it.

In: a config.json dict (no weights) and an optional GraftSpec. Out: a PlanReport (JSON or rich tables).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.table import Table

from moegraft.config import GraftSpec, parse_layers
from moegraft.errors import SourceError, SpecError, UnsupportedModelError
from moegraft.formats import BY_NAME

# The "52B-A36B" graft of Gemma 4 31B (30.7B): 16 experts of I/16 = 1344 each, top-4, on all 60
# layers, beside the dense FFN that stays on. The experts hold one more dense FFN's worth of weights
# and each token runs a quarter of it: 51.5B total (x1.68, memory), 35.9B active (x1.17, compute).
#     moegraft plan google/gemma-4-31B-it --experts 16 --top-k 4 --expert-size 1344
EXAMPLE_52B_A36B = GraftSpec(num_experts=16, top_k=4, expert_size=1344, layers="all", format="gemma4")

DENSE_TYPES = ("llama", "mistral", "qwen2", "gemma4_text", "gemma4")
MOE_TYPES = ("qwen2_moe", "glm4_moe")  # + gemma4(_text) with enable_moe_block=True
SUPPORTED_TYPES = DENSE_TYPES + MOE_TYPES
# Output formats that represent each dense input exactly; the first is what format="auto" picks.
FORMATS = {
    "llama": ("qwen2_moe", "glm4_moe"),
    "mistral": ("qwen2_moe", "glm4_moe"),
    "qwen2": ("qwen2_moe", "glm4_moe"),
    "gemma4_text": ("gemma4",),
    "gemma4": ("gemma4",),
}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "gemma4": "Gemma4ForConditionalGeneration",  # text part only
    "gemma4_text": "Gemma4ForCausalLM",
}
BITS = {"fp32": 32, "bf16": 16, "int8": 8, "int4": 4}
KV_BYTES = 2  # the KV cache is reported in bf16 whatever the weight dtype
GIB = 2**30


# ---------------------------------------------------------------------------------------------
# Shapes: one record per decoder layer, read from the transformers config object


@dataclass(frozen=True)
class _Layer:
    """One decoder layer: its attention shape and its parameters, split by who uses them."""

    q_heads: int
    kv_heads: int
    head_dim: int
    window: int | None  # sliding window (keys a token sees, KV kept); None = full attention
    kv_shared: bool  # reuses an earlier layer's K/V (Gemma 4): stores no cache of its own
    matmul: int  # weights every token multiplies: attention, dense FFN, router, gates
    other: int  # every token, not a matmul: norms, biases, scales
    expert: int = 0  # one routed expert, 3·H·I_e
    num_experts: int = 0  # E
    top_k: int = 0  # K


@dataclass(frozen=True)
class _Arch:
    """A whole text model as plain numbers."""

    model_type: str
    architecture: str
    hidden_size: int  # H
    vocab_size: int  # V
    layers: tuple[_Layer, ...]
    embed: int  # lookup tables: embed_tokens (+ Gemma 4's per-layer-input table)
    lm_head: int  # stored lm_head weight; 0 when tied to embed_tokens
    top_matmul: int  # outside the layers, every token: Gemma 4 per_layer_model_projection
    top_other: int  # final norm (+ Gemma 4 per_layer_projection_norm)
    intermediate_size: int  # I of the dense FFN
    max_positions: int | None = None  # max_position_embeddings
    expert_size: int | None = None  # I_e
    qkv_bias: bool = False  # q/k/v carry biases
    o_or_mlp_bias: bool = False  # o_proj or MLP biases: no exact Qwen2-MoE / GLM form


def _hf_config(model_type: str, config: dict) -> Any:
    """Build transformers' own config object, so every default and derived field is its own."""
    from transformers import CONFIG_MAPPING

    body = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return CONFIG_MAPPING[model_type].from_dict(body)
    except Exception as e:  # strict-dataclass validation raises several types; all mean a bad file
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise SourceError(f"config.json ({model_type}) is not valid for transformers: {first}") from None


def _attn_llama_like(cfg: Any, *, q_bias: bool, o_bias: bool) -> tuple[int, int, int, int, int]:
    """(q_heads, kv_heads, head_dim, matmul, bias params) of a Llama-style attention block."""
    H, nq, nkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or H // nq
    matmul = H * nq * hd + 2 * H * nkv * hd + nq * hd * H  # q, k, v, o
    bias = (nq * hd + 2 * nkv * hd if q_bias else 0) + (H if o_bias else 0)
    return nq, nkv, hd, matmul, bias


def _windows(cfg: Any) -> list[int | None]:
    """Per-layer sliding window, as transformers' cache decides it (layer_types, else sliding_window)."""
    L = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    sw = getattr(cfg, "sliding_window", None)
    if types is None:
        return [sw or None] * L
    return [sw if t == "sliding_attention" else None for t in types]


def _llama_family(model_type: str, cfg: Any) -> _Arch:
    """llama / mistral / qwen2 (SmolLM is llama): dense, no MoE."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size  # noqa: E741 (HF name)
    attn_bias = bool(getattr(cfg, "attention_bias", False))  # llama: q, k, v and o
    mlp_bias = bool(getattr(cfg, "mlp_bias", False))
    qkv_bias = model_type == "qwen2" or attn_bias  # Qwen2 always has q/k/v biases, never o
    nq, nkv, hd, attn, bias = _attn_llama_like(cfg, q_bias=qkv_bias, o_bias=attn_bias)
    mlp = 3 * H * I
    layers = tuple(
        _Layer(nq, nkv, hd, w, False, matmul=attn + mlp, other=bias + (2 * I + H if mlp_bias else 0) + 2 * H)
        for w in _windows(cfg)
    )
    return _Arch(
        model_type=model_type,
        architecture=ARCHITECTURES[model_type],
        hidden_size=H,
        vocab_size=V,
        layers=layers,
        embed=V * H,
        lm_head=0 if cfg.tie_word_embeddings else V * H,
        top_matmul=0,
        top_other=H,
        intermediate_size=I,
        max_positions=getattr(cfg, "max_position_embeddings", None),
        qkv_bias=qkv_bias,
        o_or_mlp_bias=attn_bias or mlp_bias,
    )


def _qwen2_moe(cfg: Any) -> _Arch:
    """Qwen2-MoE as given: shared expert + gate, router, experts on the sparse layers."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size  # noqa: E741 (HF name)
    E, K, Ie, Is = (
        cfg.num_experts,
        cfg.num_experts_per_tok,
        cfg.moe_intermediate_size,
        cfg.shared_expert_intermediate_size,
    )
    nq, nkv, hd, attn, bias = _attn_llama_like(cfg, q_bias=cfg.qkv_bias, o_bias=False)
    layers = []
    for i, w in enumerate(_windows(cfg)):
        sparse = i not in cfg.mlp_only_layers and E > 0 and (i + 1) % cfg.decoder_sparse_step == 0
        if sparse:
            # shared_expert (always on) + shared_expert_gate (H→1) + router (E, H)
            lay = _Layer(nq, nkv, hd, w, False, attn + 3 * H * Is + H + E * H, bias + 2 * H, 3 * H * Ie, E, K)
        else:
            lay = _Layer(nq, nkv, hd, w, False, attn + 3 * H * I, bias + 2 * H)
        layers.append(lay)
    return _Arch(
        model_type="qwen2_moe",
        architecture=ARCHITECTURES["qwen2_moe"],
        hidden_size=H,
        vocab_size=V,
        layers=tuple(layers),
        embed=V * H,
        lm_head=0 if cfg.tie_word_embeddings else V * H,
        top_matmul=0,
        top_other=H,
        intermediate_size=I,
        max_positions=getattr(cfg, "max_position_embeddings", None),
        expert_size=Ie,
        qkv_bias=cfg.qkv_bias,
    )


def _glm4_moe(cfg: Any) -> _Arch:
    """GLM-4.5 MoE as given: dense layers below first_k_dense_replace, MoE above."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size  # noqa: E741 (HF name)
    E, K, Ie = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    nq, nkv, hd, attn, bias = _attn_llama_like(cfg, q_bias=cfg.attention_bias, o_bias=False)
    qk_norm = 2 * hd if cfg.use_qk_norm else 0
    layers = []
    for i, w in enumerate(_windows(cfg)):
        if i >= cfg.first_k_dense_replace:
            # shared experts (always on, Ie·n_shared wide) + router (E, H); e_score_correction_bias is a buffer
            lay = _Layer(
                nq, nkv, hd, w, False, attn + 3 * H * Ie * cfg.n_shared_experts + E * H,
                bias + qk_norm + 2 * H, 3 * H * Ie, E, K,
            )  # fmt: skip
        else:
            lay = _Layer(nq, nkv, hd, w, False, attn + 3 * H * I, bias + qk_norm + 2 * H)
        layers.append(lay)
    return _Arch(
        model_type="glm4_moe",
        architecture=ARCHITECTURES["glm4_moe"],
        hidden_size=H,
        vocab_size=V,
        layers=tuple(layers),
        embed=V * H,
        lm_head=0 if cfg.tie_word_embeddings else V * H,
        top_matmul=0,
        top_other=H,
        intermediate_size=I,
        max_positions=getattr(cfg, "max_position_embeddings", None),
        expert_size=Ie,
        qkv_bias=cfg.attention_bias,
    )


def _gemma4(cfg: Any, tied: bool, model_type: str) -> _Arch:
    """Gemma 4 text model (Gemma4ForCausalLM), dense or with enable_moe_block, shapes per layer."""
    H, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers  # noqa: E741 (HF name)
    nq = cfg.num_attention_heads
    ab = bool(cfg.attention_bias)
    Hp = cfg.hidden_size_per_layer_input or 0  # per-layer-input (PLE) width; 0 = no PLE
    moe = bool(cfg.enable_moe_block)
    E, K, Ie = (cfg.num_experts, cfg.top_k_experts, cfg.moe_intermediate_size) if moe else (0, 0, 0)
    modes = cfg.kv_sharing_modes
    windows = _windows(cfg)
    layers = []
    for i in range(L):
        # full-attention layers override head_dim (global_head_dim) and, with k_eq_v, the KV heads
        lc = cfg.per_layer_config[i]
        hd, nkv = lc.head_dim, lc.num_key_value_heads
        sliding = cfg.layer_types[i] == "sliding_attention"
        shared = modes[i] == "reuse"
        has_v = not (cfg.attention_k_eq_v and not sliding)  # k_eq_v: V is K's projection (full layers)
        matmul = H * nq * hd + nq * hd * H  # q, o
        other = hd + ((nq * hd + H) if ab else 0)  # q_norm, q/o biases
        if not shared:
            kv = nkv * hd * (2 if has_v else 1)
            matmul += H * kv
            other += hd + (kv if ab else 0)  # k_norm (v_norm has no weight), k/v biases
        double = cfg.use_double_wide_mlp and shared  # kv-shared layers get a 2x wide MLP
        matmul += 3 * H * I * (2 if double else 1)
        other += 4 * H  # input, post_attention, pre/post_feedforward norms
        if Hp:
            matmul += 2 * H * Hp  # per_layer_input_gate, per_layer_projection
            other += H  # post_per_layer_input_norm
        lay = _Layer(nq, nkv, hd, windows[i], shared, matmul, other)
        if moe:
            # router.proj (E, H); router.scale H, per_expert_scale E; 3 extra norms
            lay = dataclasses.replace(
                lay,
                matmul=matmul + E * H,
                other=other + H + E + 3 * H,
                expert=3 * H * Ie,
                num_experts=E,
                top_k=K,
            )
        layers.append(lay)
    embed = V * H + (cfg.vocab_size_per_layer_input * L * Hp if Hp else 0)
    return _Arch(
        model_type=model_type,
        architecture=ARCHITECTURES[model_type],
        hidden_size=H,
        vocab_size=V,
        layers=tuple(layers),
        embed=embed,
        lm_head=0 if tied else V * H,
        top_matmul=H * L * Hp,  # per_layer_model_projection
        top_other=H + Hp,  # final norm, per_layer_projection_norm
        intermediate_size=I,
        max_positions=getattr(cfg, "max_position_embeddings", None),
        expert_size=Ie or None,
        qkv_bias=ab,
    )


def _read(config: dict) -> tuple[_Arch, list[str]]:
    """Turn a config.json dict into an _Arch (text model only) and the notes that go with it."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by plan; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    notes: list[str] = []
    cfg = _hf_config(model_type, config)
    text_cfg = cfg.text_config if model_type == "gemma4" else cfg
    if model_type.startswith("gemma4") and text_cfg.attention_k_eq_v:
        notes.append(
            "Gemma 4 attention_k_eq_v: full-attention layers have no v_proj, but their cache still keeps V "
            "(K's projection, normalised without RoPE) beside K"
        )
    if model_type == "gemma4":
        notes.append(
            "gemma4 (multimodal): only the text model is counted (text_config + lm_head); "
            "the vision/audio towers and their embedders are excluded"
        )
        return _gemma4(cfg.text_config, bool(cfg.tie_word_embeddings), model_type), notes
    if model_type == "gemma4_text":
        return _gemma4(cfg, bool(cfg.tie_word_embeddings), model_type), notes
    if model_type == "qwen2_moe":
        return _qwen2_moe(cfg), notes
    if model_type == "glm4_moe":
        notes.append("GLM-4.5 MoE: e_score_correction_bias (E per MoE layer) is a buffer, not counted")
        return _glm4_moe(cfg), notes
    return _llama_family(model_type, cfg), notes


# ---------------------------------------------------------------------------------------------
# The graft: every selected layer keeps its dense FFN and gains E experts + a router


def _resolve_format(arch: _Arch, spec: GraftSpec) -> str:
    allowed = FORMATS[arch.model_type]
    fmt = allowed[0] if spec.format == "auto" else spec.format
    if fmt not in allowed:
        raise SpecError(
            f"--format {fmt} cannot hold a {arch.model_type} model exactly; use --format {' or '.join(allowed)}"
        )
    return fmt


def _graft(arch: _Arch, spec: GraftSpec, config: dict) -> tuple[_Arch, str, list[str]]:
    """The MoE the graft would write: same attention, dense FFN kept, experts + router added."""
    if any(lay.num_experts for lay in arch.layers):
        raise SpecError(
            f"the model ({arch.architecture}) is already a MoE; plan it without a spec, or graft its dense base"
        )
    if spec.top_k > spec.num_experts:  # GraftSpec validates this; guard specs built with model_construct
        raise SpecError(
            f"--top-k {spec.top_k} > --experts {spec.num_experts}: lower --top-k or raise --experts"
        )
    fmt = _resolve_format(arch, spec)
    carve = spec.init == "carve"
    if carve:
        from moegraft.init.carve import resolve_carve_spec

        if fmt != "qwen2_moe":
            raise UnsupportedModelError(
                f"--init carve: {fmt} cannot hold a carved FFN exactly; carve needs a Llama-family model "
                "and --format qwen2_moe"
            )
        spec = resolve_carve_spec(spec, arch.intermediate_size)  # expert_size = (I - S) / E
    L, H, E, K, Ie = len(arch.layers), arch.hidden_size, spec.num_experts, spec.top_k, spec.expert_size
    selected = set(parse_layers(spec.layers, L) or [])
    notes: list[str] = []
    if not selected:
        raise SpecError(f"--layers {spec.layers!r} selects no layer of {L}; use --layers all")
    # the exact-format rules (biases, layer sets, sizes) live once, in the format classes
    fmt_obj = BY_NAME[fmt](config, spec)
    reason = fmt_obj.unsupported_reason(config)
    if reason:
        raise UnsupportedModelError(f"{arch.architecture}: {reason}")
    fmt_obj.check_layers(sorted(selected), L)
    fmt_obj.check_sizes(arch.intermediate_size)
    if fmt == "glm4_moe":
        notes.append("GLM-4.5 MoE: e_score_correction_bias (E per MoE layer) is a buffer, not counted")

    layers = []
    for i, lay in enumerate(arch.layers):
        matmul, other = lay.matmul, lay.other
        if fmt == "qwen2_moe" and not arch.qkv_bias:
            # qkv_bias=True on every layer: vLLM always builds the bias, moegraft writes zeros
            other += (lay.q_heads + 2 * lay.kv_heads) * lay.head_dim
        if i in selected:
            matmul += E * H  # router (E, H)
            if fmt == "gemma4":
                other += H + E + 3 * H  # router.scale, router.per_expert_scale, 3 norms
            elif fmt == "qwen2_moe":
                matmul += H  # shared_expert_gate (1, H)
            if carve:
                # the dense FFN (I neurons) shrinks to the shared expert (S); the rest moves to the experts
                matmul -= 3 * H * (arch.intermediate_size - spec.shared_size)
            lay = dataclasses.replace(
                lay, matmul=matmul, other=other, expert=3 * H * Ie, num_experts=E, top_k=K
            )
        else:
            lay = dataclasses.replace(lay, matmul=matmul, other=other)
        layers.append(lay)
    if carve:
        I, S = arch.intermediate_size, spec.shared_size
        active = S + K * Ie
        notes.append(
            f"carve: each token runs {active} of {I} FFN neurons ({active / I:.0%}): the shared expert's {S} + "
            f"top-{K} of {E} experts x {Ie}; the FFN's FLOPs fall by {1 - active / I:.0%}, its weights stay"
        )
        notes.append(
            "carve costs quality until recovered: `moegraft train CARVED OUT --data DOMAIN` distils it from the "
            "dense model (measured costs: the README's 'Graft or carve?')"
        )
    arch_moe = dataclasses.replace(
        arch,
        # Gemma 4 stays its own class (enable_moe_block=True); the others change class
        architecture=arch.architecture if fmt == "gemma4" else ARCHITECTURES[fmt],
        layers=tuple(layers),
        expert_size=Ie,
        qkv_bias=arch.qkv_bias or fmt == "qwen2_moe",
    )
    return arch_moe, fmt, notes


# ---------------------------------------------------------------------------------------------
# Costs


class ModelCost(BaseModel):
    """What one model costs: parameters, FLOPs per token, memory."""

    model_config = ConfigDict(frozen=True)

    architecture: str
    num_layers: int
    moe_layers: int
    num_experts: int | None  # E
    top_k: int | None  # K
    expert_size: int | None  # I_e
    total_params: int
    active_params: int  # per token, embedding table counted once (the "3.8B active" convention)
    embedding_params: int  # token/per-layer-input tables and an untied lm_head
    total_params_non_embedding: int
    active_params_non_embedding: int
    matmul_flops_per_token: int  # 2 x active matmul weights (lm_head included)
    attention_flops_per_token: int  # QK^T and AV at the given context
    flops_per_token: int
    weight_bytes: dict[str, int]  # fp32, bf16, int8, int4
    kv_cache_bytes: int  # bf16, context x batch
    fits: dict[str, bool] | None  # weights (per dtype) + bf16 KV <= gpu_memory_gb GiB


def _cost(arch: _Arch, context: int, batch: int, gpu_memory_gb: float | None) -> ModelCost:
    layers = arch.layers
    body_total = sum(lay.matmul + lay.other + lay.num_experts * lay.expert for lay in layers)
    body_active = sum(lay.matmul + lay.other + lay.top_k * lay.expert for lay in layers)
    top = arch.top_matmul + arch.top_other
    embedding = arch.embed + arch.lm_head
    total = body_total + top + embedding
    active = body_active + top + embedding
    # the lm_head multiplies every token whether or not its weight is tied to the lookup table
    matmul = (
        sum(lay.matmul + lay.top_k * lay.expert for lay in layers)
        + arch.top_matmul
        + arch.vocab_size * arch.hidden_size
    )
    # one token attending to `context` keys: QK^T and AV are 2·head_dim FLOPs per (head, key) each
    keys = [min(context, lay.window) if lay.window else context for lay in layers]
    attn = sum(4 * lay.q_heads * lay.head_dim * n for lay, n in zip(layers, keys, strict=True))
    kv = sum(
        2 * lay.kv_heads * lay.head_dim * n * batch * KV_BYTES  # K and V
        for lay, n in zip(layers, keys, strict=True)
        if not lay.kv_shared
    )
    weight_bytes = {d: math.ceil(total * b / 8) for d, b in BITS.items()}
    fits = None
    if gpu_memory_gb is not None:
        fits = {d: wb + kv <= gpu_memory_gb * GIB for d, wb in weight_bytes.items()}
    moe = [lay for lay in layers if lay.num_experts]
    return ModelCost(
        architecture=arch.architecture,
        num_layers=len(layers),
        moe_layers=len(moe),
        num_experts=moe[0].num_experts if moe else None,
        top_k=moe[0].top_k if moe else None,
        expert_size=arch.expert_size if moe else None,
        total_params=total,
        active_params=active,
        embedding_params=embedding,
        total_params_non_embedding=total - embedding,
        active_params_non_embedding=active - embedding,
        matmul_flops_per_token=2 * matmul,
        attention_flops_per_token=attn,
        flops_per_token=2 * matmul + attn,
        weight_bytes=weight_bytes,
        kv_cache_bytes=kv,
        fits=fits,
    )


# ---------------------------------------------------------------------------------------------
# Report


def _fmt_params(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: float) -> str:
    for div, unit in ((GIB, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_flops(n: float) -> str:
    for div, unit in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "KFLOP")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} FLOP"


class PlanReport(BaseModel):
    """A dense model's costs and, with a spec, those of the MoE it would become."""

    model_config = ConfigDict(frozen=True)

    dense: ModelCost
    moe: ModelCost | None
    context: int
    batch: int
    gpu_memory_gb: float | None
    spec: dict | None
    format: str | None
    notes: list[str]

    @property
    def ratios(self) -> dict[str, float] | None:
        """MoE / dense for total, active, FLOPs and memory: memory follows total, compute follows active."""
        if self.moe is None:
            return None
        d, m = self.dense, self.moe
        return {
            "total_params": m.total_params / d.total_params,
            "active_params": m.active_params / d.active_params,
            "active_params_non_embedding": m.active_params_non_embedding / d.active_params_non_embedding,
            "flops_per_token": m.flops_per_token / d.flops_per_token,
            "weight_bytes": m.weight_bytes["bf16"] / d.weight_bytes["bf16"],
            "kv_cache_bytes": m.kv_cache_bytes / d.kv_cache_bytes if d.kv_cache_bytes else 1.0,
        }

    def to_json(self) -> dict:
        """Plain dict for `--json`: both costs, the ratios and the notes."""
        out = self.model_dump(mode="json")
        out["ratios"] = self.ratios
        return out

    def headline(self) -> str:
        """One line that says where memory and compute go."""
        d, m = self.dense, self.moe
        if m is None:
            return (
                f"{d.architecture}: {_fmt_params(d.total_params)} total (memory), "
                f"{_fmt_params(d.active_params)} active per token (compute)"
            )
        r = self.ratios or {}
        return (
            f"Memory follows total: {_fmt_params(d.total_params)} -> {_fmt_params(m.total_params)} "
            f"(x{r['total_params']:.2f}). Compute follows active: {_fmt_params(d.active_params)} -> "
            f"{_fmt_params(m.active_params)} (x{r['active_params']:.2f}), FLOPs/token x{r['flops_per_token']:.2f}."
        )

    def render(self, console: Console) -> None:
        """Print the costs side by side (with MoE/dense ratios), then the headline and the notes."""
        models = [self.dense] if self.moe is None else [self.dense, self.moe]
        table = Table(
            title=f"moegraft plan — context {self.context}, batch {self.batch}", title_justify="left"
        )
        table.add_column("")
        table.add_column(
            f"{'dense' if self.dense.moe_layers == 0 else 'model'}\n{self.dense.architecture}",
            justify="right",
        )
        if self.moe is not None:
            table.add_column(f"MoE\n{self.moe.architecture}", justify="right")
            table.add_column("MoE / dense", justify="right")

        def row(label: str, cell, value=None) -> None:
            """One line: `cell` formats each model; `value` (a number) gives the MoE/dense ratio."""
            cells = [cell(c) for c in models]
            if self.moe is not None:
                a = value(self.dense) if value else 0
                cells.append(f"x{value(self.moe) / a:.2f}" if a else "")
            table.add_row(label, *cells)

        def counted(get, fmt):
            return lambda c: fmt(get(c)), get

        def layers(c: ModelCost) -> str:
            if not c.moe_layers:
                return f"{c.num_layers} (dense)"
            return f"{c.num_layers} ({c.moe_layers} MoE: E={c.num_experts} K={c.top_k} I_e={c.expert_size})"

        row("layers", layers)
        row("total params  (memory)", *counted(lambda c: c.total_params, _fmt_params))
        row("active params / token  (compute)", *counted(lambda c: c.active_params, _fmt_params))
        row("  active, non-embedding", *counted(lambda c: c.active_params_non_embedding, _fmt_params))
        row("FLOPs / token", *counted(lambda c: c.flops_per_token, _fmt_flops))
        row("  matmul (2 x active weights)", *counted(lambda c: c.matmul_flops_per_token, _fmt_flops))
        row(f"  attention @ {self.context} keys", *counted(lambda c: c.attention_flops_per_token, _fmt_flops))
        for d in BITS:
            row(f"weights {d}", *counted(lambda c, d=d: c.weight_bytes[d], _fmt_bytes))
        row(
            f"KV cache bf16 ({self.context} x {self.batch})", *counted(lambda c: c.kv_cache_bytes, _fmt_bytes)
        )
        if self.gpu_memory_gb is not None:
            for d in BITS:
                row(
                    f"fits {self.gpu_memory_gb:g} GiB @ {d}",
                    lambda c, d=d: (
                        ("yes" if c.fits and c.fits[d] else "NO")
                        + f" ({_fmt_bytes(c.weight_bytes[d] + c.kv_cache_bytes)})"
                    ),
                )
        console.print(table)
        console.print(self.headline())
        for note in self.notes:
            console.print(f"- {note}", highlight=False)


def plan(
    config: dict,
    spec: GraftSpec | None = None,
    *,
    context: int = 4096,
    batch: int = 1,
    gpu_memory_gb: float | None = None,
) -> PlanReport:
    """Cost a model from its config.json alone and, with a spec, the MoE the graft would make.

    Args:
        config: the model's config.json as a dict (multimodal gemma4: only the text model is costed).
        spec: the graft; None reports the model as given (which may already be a MoE).
        context: tokens in context, for the KV cache and the attention FLOPs of one decoded token.
        batch: sequences held in the KV cache.
        gpu_memory_gb: GPU memory in GiB; when given, each dtype says whether weights + KV fit.

    Returns:
        PlanReport with `.dense`, `.moe` (None without a spec), MoE/dense `.ratios` and `.notes`.

    Raises:
        UnsupportedModelError: unknown model_type, or no exact MoE format for this model.
        SpecError: impossible spec (top_k > experts, bad layers, already a MoE, wrong format).
        SourceError: the config cannot be read by transformers.
    """
    if context < 1 or batch < 1:
        raise SpecError(f"context and batch must be >= 1 (got context={context}, batch={batch})")
    arch, notes = _read(config)
    moe, fmt = None, None
    if spec is not None:
        arch_moe, fmt, graft_notes = _graft(arch, spec, config)
        moe = _cost(arch_moe, context, batch, gpu_memory_gb)
        notes += [n for n in graft_notes if n not in notes]
    dense = _cost(arch, context, batch, gpu_memory_gb)
    tied = "tied to" if arch.lm_head == 0 else "separate from"
    notes += [
        "active params count the embedding table once (the convention of Gemma 4 26B-A4B's '3.8B active'); "
        f"'non-embedding' drops the lookup tables and an untied lm_head (here the lm_head is {tied} the embedding)",
        f"FLOPs/token = 2 x active matmul weights (lm_head included, lookups not) + attention QK^T and AV "
        f"(4 x heads x head_dim x keys) for one token decoded with {context} tokens in context; "
        "sliding-window layers see at most their window",
        f"KV cache in bf16 for batch {batch} x {context} tokens, K and V per layer (GQA kv heads, per-layer "
        "head_dim); sliding layers keep at most their window, kv-shared layers keep none",
        "int8/int4 weights assume every parameter quantised, without scale overhead",
    ]
    if arch.max_positions and context > arch.max_positions:
        notes.append(f"context {context} exceeds max_position_embeddings {arch.max_positions}")
    if gpu_memory_gb is not None:
        notes.append(
            f"fits = weights at that dtype + bf16 KV cache <= {gpu_memory_gb:g} GiB (GPU 'GB' are binary); "
            "activations and runtime buffers are not counted"
        )
    if moe is not None and moe.flops_per_token > dense.flops_per_token:
        notes.append(
            "an additive graft costs more compute per token than its dense base: its win is capacity per FLOP, "
            "not speed"
        )
    return PlanReport(
        dense=dense,
        moe=moe,
        context=context,
        batch=batch,
        gpu_memory_gb=gpu_memory_gb,
        spec=spec.model_dump() if spec is not None else None,
        format=fmt,
        notes=notes,
    )
