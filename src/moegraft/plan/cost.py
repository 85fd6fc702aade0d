"""What one model costs: parameters (total and active per token), FLOPs per token, weight and KV-cache memory.

In: an `Arch` (plan.shapes). Out: a `ModelCost`.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from moegraft.plan.shapes import Arch

BITS = {"fp32": 32, "bf16": 16, "int8": 8, "int4": 4}
KV_BYTES = 2  # the KV cache is reported in bf16 whatever the weight dtype
GIB = 2**30


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


def cost(arch: Arch, context: int, batch: int, gpu_memory_gb: float | None) -> ModelCost:
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
