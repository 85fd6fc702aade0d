"""Llama / Mistral / Qwen2 (and SmolLM) dense → Qwen2-MoE (`Qwen2MoeForCausalLM`).

The dense FFN becomes the shared expert behind a sigmoid gate of weight 0 (sigmoid(0) = 0.5, so its
down_proj is doubled: exact in any float format); routed experts start with a zero output path.
With `spec.llama_cpp` the head is untied and the gate is a tiny non-zero constant instead (llama.cpp
computes the gate as silu(t)/t, NaN at t = 0); sigmoid(eps * sum(x)) = 0.5 to ~eps * |sum(x)| / 4.
"""

from __future__ import annotations

import torch

from moegraft.formats._hf import hf_config
from moegraft.formats.base import OutputFormat, OutTensor, per_expert_tensors, untied_head
from moegraft.init.experts import ExpertInit
from moegraft.io.writer import TensorSpec

DENSE_TYPES = ("llama", "mistral", "qwen2", "phi3")
# Families whose every layer slides over one window (Qwen2 and Qwen3 name theirs per layer in layer_types).
SLIDING_ALL_LAYERS = ("mistral", "phi3")


def llama_cpp_gate_eps(dtype: torch.dtype) -> float:
    """The shared-expert gate weight of a llama.cpp-friendly graft: tiny, non-zero and exact in `dtype`.

    2^-40 keeps sigmoid(eps * sum(x)) = 0.5 far below fp32 resolution; fp16 cannot hold it, so there it is
    fp16's smallest subnormal power of two, 2^-24.
    """
    return 2.0**-24 if dtype == torch.float16 else 2.0**-40


def llama_family_reason(
    config: dict, name: str, label: str, types: tuple[str, ...], readers: str
) -> str | None:
    """Why the Llama-family MoE format `name` (shown as `label`, taking the dense `types`) cannot hold this dense
    model exactly, or None.

    Qwen2-MoE and GLM-4.5 MoE share the dense families they take and what they lack: MLP biases, an o_proj
    bias, any gate activation but SiLU (what `readers` assume).
    """
    mt = config.get("model_type")
    if mt not in types:
        return f"{name} takes {', '.join(types)} models, not {mt}"
    c = hf_config(config)
    if getattr(c, "mlp_bias", False):
        return f"the dense MLP has biases (mlp_bias=true), which {label}'s experts lack"
    if mt != "qwen2" and getattr(c, "attention_bias", False):
        return f"attention_bias=true puts a bias on o_proj, which {label} lacks"
    if c.hidden_act not in ("silu", "swish"):
        return f"hidden_act {c.hidden_act!r}: {label} checkpoints are read as SiLU-gated by {readers}"
    return None


def llama_family_fields(c) -> dict:
    """The config fields a Llama-family dense model and its Qwen2-MoE / GLM-4.5 MoE form share, as they are."""
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        "hidden_act": c.hidden_act,
        "max_position_embeddings": c.max_position_embeddings,
        "initializer_range": c.initializer_range,
        "rms_norm_eps": c.rms_norm_eps,
    }


def rope_parameters(c) -> dict:
    """The source's RoPE parameters, with Phi-3's top-level original_max_position_embeddings moved in: long-RoPE
    (Phi-3-128k, Phi-4-mini) switches factors and scales attention by it, and the MoE configs read it only there."""
    rope = dict(c.rope_parameters)
    original = getattr(c, "original_max_position_embeddings", None)
    if rope.get("rope_type") == "longrope" and original:
        rope.setdefault("original_max_position_embeddings", original)
    return rope


class Qwen2MoeFormat(OutputFormat):
    name = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    dense_types = DENSE_TYPES
    moe_types = ("qwen2_moe",)
    carve_refusal = None  # the shared expert holds the kept neurons, the routed experts the rest

    @classmethod
    def unsupported_reason(cls, config: dict) -> str | None:
        if config.get("model_type") == "qwen3":
            return "Qwen3's per-head q/k RMSNorm has no Qwen2-MoE equivalent; use --format glm4_moe (use_qk_norm)"
        why = llama_family_reason(config, cls.name, "Qwen2-MoE", DENSE_TYPES, readers="vLLM and llama.cpp")
        if why is not None:
            return why
        c = hf_config(config)
        if c.rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
            # Phi-4-mini rotates 3/4 of each head; Qwen2-MoE rotates all of it
            return (
                f"partial_rotary_factor {c.rope_parameters['partial_rotary_factor']}: Qwen2-MoE rotates the whole "
                "head; use --format glm4_moe"
            )
        return None

    def moe_config(self, moe_layers: list[int], dtype: torch.dtype) -> dict:
        c = hf_config(self.config)
        L = c.num_hidden_layers
        sliding = getattr(c, "sliding_window", None)
        if c.model_type == "qwen2":
            window = {
                "use_sliding_window": c.use_sliding_window,
                "sliding_window": c.sliding_window,
                "max_window_layers": c.max_window_layers,
                "layer_types": list(c.layer_types),
            }
        elif c.model_type in SLIDING_ALL_LAYERS and sliding:
            # Mistral and Phi-3 slide every layer; Qwen2-MoE's default pattern would slide only every other one
            window = {
                "use_sliding_window": True,
                "sliding_window": sliding,
                "max_window_layers": L,
                "layer_types": ["sliding_attention"] * L,
            }
        else:
            window = {"use_sliding_window": False, "layer_types": ["full_attention"] * L}
        out = {
            "architectures": [self.architecture],
            "model_type": "qwen2_moe",
            **llama_family_fields(c),
            # llama.cpp's qwen2moe needs its own output.weight
            "tie_word_embeddings": bool(c.tie_word_embeddings) and not self.spec.llama_cpp,
            "rope_parameters": rope_parameters(c),
            "attention_dropout": c.attention_dropout,
            **window,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(L) if i not in set(moe_layers)],
            "num_experts": self.spec.num_experts,
            "num_experts_per_tok": self.spec.top_k,
            "moe_intermediate_size": self.spec.expert_size,
            # carve: the shared expert holds only the S kept neurons
            "shared_expert_intermediate_size": (
                self.spec.shared_size if self.spec.init == "carve" else c.intermediate_size
            ),
            "norm_topk_prob": self.spec.norm_topk_prob,
            "router_aux_loss_coef": 0.01,
            "output_router_logits": False,
            # vLLM always builds q/k/v biases for Qwen2-MoE; zero ones keep the function
            "qkv_bias": True,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id,
            "pad_token_id": getattr(c, "pad_token_id", None),
            "dtype": str(dtype).removeprefix("torch."),
        }
        return out

    def zero_router_weight(self) -> float:
        return 1.0 / self.spec.top_k if self.spec.norm_topk_prob else 1.0 / self.spec.num_experts

    def renormalises(self) -> bool:
        return self.spec.norm_topk_prob

    def passthrough(self, name, shape, dtype, read):
        # llama.cpp's qwen2moe needs its own output.weight
        tied = self.spec.llama_cpp and bool(hf_config(self.config).tie_word_embeddings)
        out = untied_head(tied, name, shape, dtype, read)
        if out is None:
            out = super().passthrough(name, shape, dtype, read)
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            bias = name.removesuffix("weight") + "bias"
            if self.config.get("model_type") != "qwen2":  # Qwen2 already has these biases
                out.append(
                    OutTensor(
                        TensorSpec(bias, (shape[0],), dtype), lambda: torch.zeros(shape[0], dtype=dtype)
                    )
                )
        return out

    def moe_layer_tensors(self, prefix: str, init: ExpertInit, out_dtype: torch.dtype) -> list[OutTensor]:
        H, _, E, I_e = self.sizes(init)
        p = prefix + "mlp."
        shared_down = 2.0 * init.dense_scale  # sigmoid(0) = 0.5 halves the shared expert
        gate_w = llama_cpp_gate_eps(out_dtype) if self.spec.llama_cpp else 0.0
        # the shared expert: the whole dense FFN (graft), or only its S kept neurons (carve)
        S, shared = init.shared_size, init.shared_part
        outs = [
            OutTensor(TensorSpec(p + "gate.weight", (E, H), out_dtype), lambda: init.router(E).to(out_dtype)),
            OutTensor(
                TensorSpec(p + "shared_expert.gate_proj.weight", (S, H), out_dtype),
                lambda: shared(0).to(out_dtype),
            ),
            OutTensor(
                TensorSpec(p + "shared_expert.up_proj.weight", (S, H), out_dtype),
                lambda: shared(1).to(out_dtype),
            ),
            OutTensor(
                TensorSpec(p + "shared_expert.down_proj.weight", (H, S), out_dtype),
                lambda: (shared(2) * shared_down).to(out_dtype),
            ),
            OutTensor(
                TensorSpec(p + "shared_expert_gate.weight", (1, H), out_dtype),
                lambda: torch.full((1, H), gate_w, dtype=out_dtype),
            ),
        ]
        return outs + per_expert_tensors(p, init, E, I_e, out_dtype)

    @classmethod
    def pathways(cls) -> dict[str, tuple[str, ...]]:
        return {
            "router": (r"\.mlp\.gate\.weight$", r"\.mlp\.shared_expert_gate\.weight$"),
            "experts": (r"\.mlp\.experts\.",),
            "dense": (r"\.mlp\.shared_expert\.", r"\.mlp\.(gate|up|down)_proj\."),
            "attention": (r"\.self_attn\.",),
            "norms": (r"layernorm\.weight$", r"(^|\.)norm\.weight$"),
            "embeddings": (r"embed_tokens\.", r"^lm_head\."),
        }
