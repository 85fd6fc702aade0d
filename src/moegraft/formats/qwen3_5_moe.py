"""Qwen3.5 dense (`Qwen3_5ForCausalLM`) → Qwen3.5 MoE (`Qwen3_5MoeForCausalLM`), the same layer stack.

Both classes are generated from one modular file: Gated DeltaNet and gated-attention layers, the `1 + weight`
RMSNorms and the rotary embedding are the same code, so every non-FFN tensor is copied as it is. The dense MLP
becomes the shared expert behind `sigmoid(shared_expert_gate · x)` with a zero gate (sigmoid(0) = 0.5, so its
down_proj is doubled: exact in any float format); routed experts start with a zero output path. The router
always renormalises its top-k weights, and every layer is MoE (the class has no `mlp_only_layers`).
"""

from __future__ import annotations

import copy

import torch

from moegraft.errors import SpecError
from moegraft.formats.base import OutputFormat, OutTensor
from moegraft.init.experts import ExpertInit
from moegraft.io.writer import TensorSpec

DENSE_TYPE = "qwen3_5_text"
MOE_TYPE = "qwen3_5_moe_text"


class Qwen3_5MoeFormat(OutputFormat):
    name = "qwen3_5_moe"
    architecture = "Qwen3_5MoeForCausalLM"
    dense_types = (DENSE_TYPE,)
    moe_types = (MOE_TYPE,)

    @classmethod
    def unsupported_reason(cls, config: dict) -> str | None:
        mt = config.get("model_type")
        if mt == "qwen3_5":
            return (
                "Qwen3_5ForConditionalGeneration (vision + text) is not converted yet; save its language model as "
                "Qwen3_5ForCausalLM (model_type qwen3_5_text) and convert that"
            )
        if mt != DENSE_TYPE:
            return f"qwen3_5_moe takes Qwen3.5 dense text models ({DENSE_TYPE}), not {mt}"
        if config.get("hidden_act", "silu") not in ("silu", "swish"):
            return f"hidden_act {config.get('hidden_act')!r}: Qwen3.5 MoE's experts are SiLU-gated"
        return None

    def check_layers(self, moe_layers: list[int], num_layers: int) -> None:
        super().check_layers(moe_layers, num_layers)
        if len(moe_layers) != num_layers:
            raise SpecError(
                "Qwen3.5 MoE makes every layer MoE (it has no mlp_only_layers): use --layers all with this model"
            )

    def moe_config(self, moe_layers: list[int], dtype: torch.dtype) -> dict:
        # the dense config.json as it is (its layer_types, rope and linear-attention sizes parse the same way in
        # both classes), with the FFN fields of the MoE class in place of intermediate_size
        out = copy.deepcopy(self.config)
        I = out.pop("intermediate_size")
        # a GGUF-loaded source names its quantisation; the tensors written are dequantised
        for key in ("torch_dtype", "_name_or_path", "transformers_version", "quantization_config"):
            out.pop(key, None)
        out.update(
            architectures=[self.architecture],
            model_type=MOE_TYPE,
            num_experts=self.spec.num_experts,
            num_experts_per_tok=self.spec.top_k,
            moe_intermediate_size=self.spec.expert_size,
            # carve: the shared expert holds only the S kept neurons
            shared_expert_intermediate_size=self.spec.shared_size if self.spec.init == "carve" else I,
            router_aux_loss_coef=0.01,
            output_router_logits=False,
            dtype=str(dtype).removeprefix("torch."),
        )
        return out

    def zero_router_weight(self) -> float:
        return 1.0 / self.spec.top_k

    def renormalises(self) -> bool:
        return True  # Qwen3_5MoeTopKRouter always divides the top-k weights by their sum

    def moe_layer_tensors(self, prefix: str, init: ExpertInit, out_dtype: torch.dtype) -> list[OutTensor]:
        H, E, I_e = init.ffn.hidden_size, self.spec.num_experts, self.spec.expert_size
        p, dt = prefix + "mlp.", out_dtype
        shared_down = 2.0 * init.dense_scale  # sigmoid(0) = 0.5 halves the shared expert
        S, shared = init.shared_size, init.shared_part

        def gate_up() -> (
            torch.Tensor
        ):  # (E, 2·I_e, H): gate rows then up rows, as Qwen3_5MoeExperts chunks them
            return torch.stack([torch.cat(init.expert(e)[:2], dim=0) for e in range(E)]).to(dt)

        def down() -> torch.Tensor:  # (E, H, I_e)
            return torch.stack([init.expert(e)[2] for e in range(E)]).to(dt)

        # fused 3D expert tensors: the layout the class holds and saves (its loader has no per-expert key mapping)
        return [
            OutTensor(TensorSpec(p + "gate.weight", (E, H), dt), lambda: init.router(E).to(dt)),
            OutTensor(TensorSpec(p + "experts.gate_up_proj", (E, 2 * I_e, H), dt), gate_up),
            OutTensor(TensorSpec(p + "experts.down_proj", (E, H, I_e), dt), down),
            OutTensor(TensorSpec(p + "shared_expert.gate_proj.weight", (S, H), dt), lambda: shared(0).to(dt)),
            OutTensor(TensorSpec(p + "shared_expert.up_proj.weight", (S, H), dt), lambda: shared(1).to(dt)),
            OutTensor(
                TensorSpec(p + "shared_expert.down_proj.weight", (H, S), dt),
                lambda: (shared(2) * shared_down).to(dt),
            ),
            OutTensor(
                TensorSpec(p + "shared_expert_gate.weight", (1, H), dt), lambda: torch.zeros(1, H, dtype=dt)
            ),
        ]

    @classmethod
    def pathways(cls) -> dict[str, tuple[str, ...]]:
        return {
            "router": (r"\.mlp\.gate\.weight$", r"\.mlp\.shared_expert_gate\.weight$"),
            "experts": (r"\.mlp\.experts\.",),
            "dense": (r"\.mlp\.shared_expert\.",),
            # gated attention and Gated DeltaNet layers (their own norms included)
            "attention": (r"\.self_attn\.", r"\.linear_attn\."),
            "norms": (r"layernorm\.weight$", r"(^|\.)norm\.weight$"),
            "embeddings": (r"embed_tokens\.", r"^lm_head\."),
        }
