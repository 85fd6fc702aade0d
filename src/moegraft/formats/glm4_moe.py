"""Llama / Mistral / Qwen2 / Qwen3 / Phi-3 dense → GLM-4.5 MoE (`Glm4MoeForCausalLM`), the format with a selection bias.

The dense FFN is split into I/I_e shared experts (one MLP on disk); routed experts start with a zero
output path; `e_score_correction_bias` (DeepSeek-V3's auxiliary-loss-free balancing) starts at 0.
Qwen3's per-head q/k RMSNorm before RoPE is GLM's `use_qk_norm` (same placement, same norm class); Phi-4-mini's
partial rotary is GLM's `partial_rotary_factor` (same rotate-the-first-dims convention).
"""

from __future__ import annotations

import torch

from moegraft.errors import SpecError
from moegraft.formats._hf import hf_config
from moegraft.formats.base import OutputFormat, OutTensor, per_expert_tensors, untied_head
from moegraft.formats.qwen2_moe import (
    DENSE_TYPES,
    SLIDING_ALL_LAYERS,
    llama_family_fields,
    llama_family_reason,
    rope_parameters,
)
from moegraft.init.experts import ExpertInit
from moegraft.io.writer import TensorSpec

# qwen3: q_norm/k_norm (use_qk_norm), no q/k/v-only biases (its attention_bias also biases o_proj)
GLM_DENSE_TYPES = (*DENSE_TYPES, "qwen3")


class Glm4MoeFormat(OutputFormat):
    name = "glm4_moe"
    architecture = "Glm4MoeForCausalLM"
    dense_types = GLM_DENSE_TYPES
    moe_types = ("glm4_moe",)
    router_score = "sigmoid"

    @classmethod
    def unsupported_reason(cls, config: dict) -> str | None:
        why = llama_family_reason(config, cls.name, "GLM-4.5 MoE", GLM_DENSE_TYPES, readers="vLLM")
        if why is not None:
            return why
        c = hf_config(config)
        if getattr(c, "sliding_window", None) and (
            c.model_type in SLIDING_ALL_LAYERS or getattr(c, "use_sliding_window", False)
        ):
            hint = (
                "; use --format qwen2_moe" if c.model_type in DENSE_TYPES else ""
            )  # Qwen2-MoE slides, not Qwen3
            return f"sliding-window attention has no GLM-4.5 MoE equivalent{hint}"
        return None

    def check_layers(self, moe_layers: list[int], num_layers: int) -> None:
        super().check_layers(moe_layers, num_layers)
        k = moe_layers[0]
        if moe_layers != list(range(k, num_layers)):
            raise SpecError(
                f"GLM-4.5 MoE grafts only a suffix of layers (first_k_dense_replace): use --layers "
                f"{k}-{num_layers - 1}, or --format qwen2_moe for any layer set"
            )
        if self.spec.num_experts < 2:
            raise SpecError("GLM-4.5 MoE's grouped router needs --experts >= 2")

    def moe_config(self, moe_layers: list[int], dtype: torch.dtype) -> dict:
        c = hf_config(self.config)
        n_shared = self._n_shared(c.intermediate_size)
        # Llama rotates the whole head (GLM's default is half); Phi-4-mini names its own fraction
        rotary = float(c.rope_parameters.get("partial_rotary_factor", 1.0))
        rope = {**rope_parameters(c), "partial_rotary_factor": rotary}
        return {
            "architectures": [self.architecture],
            "model_type": "glm4_moe",
            **llama_family_fields(c),
            # always untied: vLLM's Glm4MoeForCausalLM (0.32) builds its own lm_head and never reads this
            # flag, so a tied head would be served as the random init (see passthrough)
            "tie_word_embeddings": False,
            "rope_parameters": rope,
            "partial_rotary_factor": rotary,
            "attention_bias": c.model_type == "qwen2",  # Qwen2's q/k/v biases; GLM has none on o_proj either
            "attention_dropout": c.attention_dropout,
            "use_qk_norm": c.model_type == "qwen3",
            "moe_intermediate_size": self.spec.expert_size,
            "num_experts_per_tok": self.spec.top_k,
            "n_shared_experts": n_shared,
            "n_routed_experts": self.spec.num_experts,
            "routed_scaling_factor": 1.0,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": moe_layers[0],
            "norm_topk_prob": self.spec.norm_topk_prob,
            "num_mtp_layers": 0,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id,
            "pad_token_id": getattr(c, "pad_token_id", None),
            "dtype": str(dtype).removeprefix("torch."),
        }

    def passthrough(self, name, shape, dtype, read):
        # a tied dense head is written out as its own lm_head.weight (a copy of the embeddings): the same
        # function in transformers, and the one vLLM serves (tests/test_vllm.py)
        out = untied_head(bool(hf_config(self.config).tie_word_embeddings), name, shape, dtype, read)
        return super().passthrough(name, shape, dtype, read) if out is None else out

    def check_sizes(self, intermediate_size: int) -> None:
        self._n_shared(intermediate_size)

    def _n_shared(self, I: int) -> int:
        if I % self.spec.expert_size:
            raise SpecError(
                f"GLM-4.5 MoE stores the dense FFN as shared experts of --expert-size neurons: "
                f"{self.spec.expert_size} must divide the dense intermediate size {I}"
            )
        return I // self.spec.expert_size

    def zero_router_weight(self) -> float:
        return 1.0 / self.spec.top_k if self.spec.norm_topk_prob else 0.5  # sigmoid(0) = 0.5

    def renormalises(self) -> bool:
        return self.spec.norm_topk_prob

    def moe_layer_tensors(self, prefix: str, init: ExpertInit, out_dtype: torch.dtype) -> list[OutTensor]:
        H, I, E, I_e = self.sizes(init)
        self._n_shared(I)
        p, ffn, dt, s = prefix + "mlp.", init.ffn, out_dtype, init.dense_scale
        outs = [
            OutTensor(TensorSpec(p + "gate.weight", (E, H), dt), lambda: init.router(E).to(dt)),
            # the model keeps this buffer in fp32 whatever the weights' dtype
            OutTensor(
                TensorSpec(p + "gate.e_score_correction_bias", (E,), torch.float32), lambda: torch.zeros(E)
            ),
            OutTensor(
                TensorSpec(p + "shared_experts.gate_proj.weight", (I, H), dt), lambda: ffn.gate().to(dt)
            ),
            OutTensor(TensorSpec(p + "shared_experts.up_proj.weight", (I, H), dt), lambda: ffn.up().to(dt)),
            OutTensor(
                TensorSpec(p + "shared_experts.down_proj.weight", (H, I), dt), lambda: (ffn.down() * s).to(dt)
            ),
        ]
        return outs + per_expert_tensors(p, init, E, I_e, dt)

    @classmethod
    def pathways(cls) -> dict[str, tuple[str, ...]]:
        return {
            "router": (r"\.mlp\.gate\.(weight|e_score_correction_bias)$",),
            "experts": (r"\.mlp\.experts\.",),
            "dense": (r"\.mlp\.shared_experts\.", r"\.mlp\.(gate|up|down)_proj\."),
            "attention": (r"\.self_attn\.",),
            "norms": (r"layernorm\.weight$", r"(^|\.)norm\.weight$"),
            "embeddings": (r"embed_tokens\.", r"^lm_head\."),
        }
