"""Gemma 4 dense (`Gemma4ForCausalLM`, enable_moe_block off) → Gemma 4 MoE, the 26B-A4B layout.

The dense MLP stays; each layer gains router, experts and three norms. The expert path enters through
post_feedforward_layernorm_2 with weight 0, so the graft is exact up to RMSNorm eps effects.
"""

from __future__ import annotations

import copy

import torch

from moegraft.errors import SpecError
from moegraft.formats.base import OutputFormat, OutTensor
from moegraft.init.experts import ExpertInit
from moegraft.io.writer import TensorSpec


def _text(config: dict) -> dict:
    return config.get("text_config") or config


def dense_router_experts(p: str, init: ExpertInit, E: int, I_e: int, dt: torch.dtype) -> list[OutTensor]:
    """Gemma 4's MoE block at key prefix `p`: the dense MLP as it was, the router (proj, scale, per-expert scale)
    and the fused experts; moegraft's Gemma 2/3 class has the same block."""
    ffn = init.ffn
    I, H = ffn.intermediate_size, ffn.hidden_size

    def gate_up() -> torch.Tensor:  # (E, 2·I_e, H): gate rows then up rows, as Gemma4TextExperts chunks
        return torch.stack([torch.cat(init.expert(e)[:2], dim=0) for e in range(E)]).to(dt)

    def down() -> torch.Tensor:  # (E, H, I_e)
        return torch.stack([init.expert(e)[2] for e in range(E)]).to(dt)

    return [
        OutTensor(TensorSpec(p + "mlp.gate_proj.weight", (I, H), dt), lambda: ffn.gate().to(dt)),
        OutTensor(TensorSpec(p + "mlp.up_proj.weight", (I, H), dt), lambda: ffn.up().to(dt)),
        OutTensor(TensorSpec(p + "mlp.down_proj.weight", (H, I), dt), lambda: ffn.down().to(dt)),
        OutTensor(TensorSpec(p + "router.proj.weight", (E, H), dt), lambda: init.router(E).to(dt)),
        OutTensor(TensorSpec(p + "router.scale", (H,), dt), lambda: torch.ones(H, dtype=dt)),
        OutTensor(TensorSpec(p + "router.per_expert_scale", (E,), dt), lambda: torch.ones(E, dtype=dt)),
        OutTensor(TensorSpec(p + "experts.gate_up_proj", (E, 2 * I_e, H), dt), gate_up),
        OutTensor(TensorSpec(p + "experts.down_proj", (E, H, I_e), dt), down),
    ]


class Gemma4MoeFormat(OutputFormat):
    name = "gemma4"
    architecture = "Gemma4ForCausalLM"
    dense_types = ("gemma4_text", "gemma4")
    moe_types = ("gemma4_text", "gemma4")  # the same classes, with enable_moe_block=True
    top_k_key = "top_k_experts"
    carve_refusal = (
        "Gemma 4 keeps its dense MLP beside the experts and normalises the expert output, so the experts cannot "
        "carry the dense neurons exactly"
    )
    zero_down = False  # the zero lives in post_feedforward_layernorm_2.weight
    router_reads_residual = True

    @classmethod
    def unsupported_reason(cls, config: dict) -> str | None:
        text = _text(config)
        if text.get("model_type") not in cls.dense_types:
            return f"gemma4 takes Gemma 4 dense models, not {config.get('model_type')}"
        if text.get("enable_moe_block"):
            return "this Gemma 4 model is already MoE (enable_moe_block=true)"
        return None

    def check_layers(self, moe_layers: list[int], num_layers: int) -> None:
        super().check_layers(moe_layers, num_layers)
        if len(moe_layers) != num_layers:
            raise SpecError(
                "Gemma 4's enable_moe_block is all-or-nothing: use --layers all with --format gemma4"
            )

    def moe_config(self, moe_layers: list[int], dtype: torch.dtype) -> dict:
        out = copy.deepcopy(self.config)
        text = _text(out)
        text.update(
            enable_moe_block=True,
            num_experts=self.spec.num_experts,
            top_k_experts=self.spec.top_k,
            moe_intermediate_size=self.spec.expert_size,
        )
        out["dtype"] = str(dtype).removeprefix("torch.")
        out.pop("torch_dtype", None)
        return out

    def zero_router_weight(self) -> float:
        return 1.0 / self.spec.top_k

    def renormalises(self) -> bool:
        return True  # Gemma4TextRouter always renormalises the top-k weights

    def moe_layer_tensors(self, prefix: str, init: ExpertInit, out_dtype: torch.dtype) -> list[OutTensor]:
        H, I, E, I_e = self.sizes(init)
        ffn, dt = init.ffn, out_dtype
        w1 = init.dense_scale  # 1 (zero/slices) or 0.5 (upcycled copies carry the other half)
        w2 = 1.0 - w1

        pre_ln = prefix + "pre_feedforward_layernorm.weight"
        return [
            *dense_router_experts(prefix, init, E, I_e, dt),
            OutTensor(
                TensorSpec(prefix + "post_feedforward_layernorm_1.weight", (H,), dt),
                lambda: torch.full((H,), w1, dtype=dt),
            ),
            OutTensor(
                TensorSpec(prefix + "post_feedforward_layernorm_2.weight", (H,), dt),
                lambda: torch.full((H,), w2, dtype=dt),
            ),
            # the experts see the dense MLP's input scale at the start
            OutTensor(
                TensorSpec(prefix + "pre_feedforward_layernorm_2.weight", (H,), dt),
                lambda: ffn.read(pre_ln).to(dt),
            ),
        ]

    @classmethod
    def pathways(cls) -> dict[str, tuple[str, ...]]:
        return {
            "router": (r"\.router\.",),
            "experts": (
                r"\.experts\.",
                r"\.post_feedforward_layernorm_2\.",
                r"\.pre_feedforward_layernorm_2\.",
            ),
            "dense": (r"\.mlp\.", r"\.post_feedforward_layernorm_1\."),
            "attention": (r"\.self_attn\.",),
            "norms": (r"layernorm\.weight$", r"(^|\.)norm\.weight$", r"layer_scalar$"),
            "embeddings": (r"embed_tokens", r"^lm_head\.", r"per_layer"),
        }
