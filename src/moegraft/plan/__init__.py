"""Parameters, FLOPs per token and memory of a model and of the MoE a GraftSpec would make of it.

In: a config.json dict (no weights) and an optional GraftSpec. Out: a PlanReport (JSON or rich tables).
The jobs are split: `shapes` reads what a model is made of off the model transformers builds (for a graft, from
the output format's own config), `cost` turns shapes into parameters, FLOPs and bytes, `report` renders them.
"""

from __future__ import annotations

from moegraft.config import GraftSpec
from moegraft.errors import SpecError
from moegraft.plan.cost import BITS, GIB, KV_BYTES, ModelCost, cost
from moegraft.plan.report import PlanReport
from moegraft.plan.shapes import SUPPORTED_TYPES, Arch, Layer, graft_config, read_arch, read_model

# The "52B-A36B" graft of Gemma 4 31B (30.7B): 16 experts of I/16 = 1344 each, top-4, on all 60
# layers, beside the dense FFN that stays on. The experts hold one more dense FFN's worth of weights
# and each token runs a quarter of it: 51.5B total (x1.68, memory), 35.9B active (x1.17, compute).
#     moegraft plan google/gemma-4-31B-it --experts 16 --top-k 4 --expert-size 1344
EXAMPLE_52B_A36B = GraftSpec(num_experts=16, top_k=4, expert_size=1344, layers="all", format="gemma4")


def graft_arch(config: dict, spec: GraftSpec) -> tuple[Arch, str, list[str]]:
    """(shapes of the MoE the graft writes, its format name, notes): the model transformers builds from the
    format's own output config."""
    fmt_cls, spec, moe_config = graft_config(config, spec)
    arch = read_arch(moe_config, fmt_cls)
    notes: list[str] = []
    if fmt_cls.name == "glm4_moe":
        notes.append("GLM-4.5 MoE: e_score_correction_bias (E per MoE layer) is a buffer, not counted")
    if spec.init == "carve":
        I, S, K, E, Ie = (
            arch.intermediate_size,
            spec.shared_size,
            spec.top_k,
            spec.num_experts,
            spec.expert_size,
        )
        active = S + K * Ie
        notes.append(
            f"carve: each token runs {active} of {I} FFN neurons ({active / I:.0%}): the shared expert's {S} + "
            f"top-{K} of {E} experts x {Ie}; the FFN's FLOPs fall by {1 - active / I:.0%}, its weights stay"
        )
        notes.append(
            "carve costs quality until recovered: `moegraft train CARVED OUT --data DOMAIN` fits each FFN to the "
            "dense one layer by layer, then distils end to end (measured costs and times: docs/carve.md, 'Graft or "
            "carve?')"
        )
    return arch, fmt_cls.name, notes


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
    arch, notes = read_model(config)
    moe, fmt = None, None
    if spec is not None:
        arch_moe, fmt, graft_notes = graft_arch(config, spec)
        moe = cost(arch_moe, context, batch, gpu_memory_gb)
        notes += [n for n in graft_notes if n not in notes]
    dense = cost(arch, context, batch, gpu_memory_gb)
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


__all__ = [
    "BITS",
    "EXAMPLE_52B_A36B",
    "GIB",
    "KV_BYTES",
    "SUPPORTED_TYPES",
    "Arch",
    "Layer",
    "ModelCost",
    "PlanReport",
    "graft_arch",
    "plan",
    "read_model",
]
