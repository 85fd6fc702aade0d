"""moegraft's Gemma 2 / Gemma 3 MoE: the family's own decoder block with Gemma 4-style routed experts beside the
dense MLP. Self-contained (torch and transformers only): moegraft copies this file into every checkpoint it writes
(`auto_map`), so `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads it without moegraft.

In: a checkpoint whose config.json has model_type `moegraft_gemma2` or `moegraft_gemma3_text`. Out: a causal LM.
Per decoder layer, with r the residual after attention (dense MLP, attention and norms are the family's own code):

    m = mlp(pre_feedforward_layernorm(r))                                    # the dense MLP, always on
    w, idx = router(r)              # Gemma 4's router: rmsnorm(r) * scale * H^-0.5 -> softmax -> top-k -> renormalise
    e = experts(pre_feedforward_layernorm_2(r), idx, w * per_expert_scale[idx])
    out = r + post_feedforward_layernorm(m + post_feedforward_layernorm_2(e))

Unlike Gemma 4, the dense path gets no norm of its own (Gemma 4's post_feedforward_layernorm_1), so with
`post_feedforward_layernorm_2.weight = 0` the model is the dense one bit for bit: m + 0 = m. That norm scales by
its weight (Gemma 4's convention), not by 1 + weight as Gemma 2/3's norms do, so its zero is a plain 0 that
weight decay keeps near zero rather than pulling to 1.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation
from transformers.models.gemma2.configuration_gemma2 import Gemma2Config
from transformers.models.gemma2.modeling_gemma2 import (
    Gemma2DecoderLayer,
    Gemma2ForCausalLM,
    Gemma2Model,
    Gemma2PreTrainedModel,
    Gemma2RMSNorm,
    Gemma2RotaryEmbedding,
    Gemma2TextScaledWordEmbedding,
)
from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3DecoderLayer,
    Gemma3ForCausalLM,
    Gemma3PreTrainedModel,
    Gemma3RMSNorm,
    Gemma3RotaryEmbedding,
    Gemma3TextModel,
    Gemma3TextScaledWordEmbedding,
)


class MoegraftGemmaScaleNorm(nn.Module):
    """RMSNorm times `weight` (Gemma 4's convention), in fp32 as Gemma's norms compute."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps, self.with_scale = eps, with_scale
        if with_scale:
            self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.with_scale:
            out = out * self.weight.float()
        return out.type_as(x)


class MoegraftGemmaTextRouter(nn.Module):
    """Gemma 4's router (Gemma4TextRouter's math and parameter names): reads the residual, not the MLP input."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.top_k_experts
        self.scalar_root_size = config.hidden_size**-0.5
        self.norm = MoegraftGemmaScaleNorm(config.hidden_size, eps=config.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.norm(hidden_states) * self.scale * self.scalar_root_size  # (T, H)
        probs = nn.functional.softmax(self.proj(x), dim=-1, dtype=torch.float32)  # (T, E), fp32 as Gemma 4
        top_k_weights, top_k_index = torch.topk(probs, k=self.top_k, dim=-1)  # (T, K) each
        top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        top_k_weights = top_k_weights * self.per_expert_scale[top_k_index]
        return probs, top_k_weights, top_k_index


@use_experts_implementation
class MoegraftGemmaExperts(nn.Module):
    """E GeGLU experts as fused 3D tensors, gate rows before up rows (transformers' layout, so every
    `experts_implementation` transformers knows, and moegraft's, runs them)."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        E, H, I = self.num_experts, self.hidden_dim, self.intermediate_dim
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.act_fn = ACT2FN[config.hidden_activation]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)  # (T, H)
        for e in top_k_index.unique().tolist():
            token, k = torch.where(top_k_index == e)  # rows routed to e, and at which of their K slots
            gate, up = nn.functional.linear(hidden_states[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])  # (n, H)
            out.index_add_(0, token, (y * top_k_weights[token, k, None]).to(out.dtype))
        return out


def _add_experts(layer: nn.Module, config, norm_cls: type[nn.Module]) -> None:
    """Give a Gemma decoder layer its router, experts and their two norms."""
    H = config.hidden_size
    layer.router = MoegraftGemmaTextRouter(config)
    layer.experts = MoegraftGemmaExperts(config)
    layer.pre_feedforward_layernorm_2 = norm_cls(H, eps=config.rms_norm_eps)  # the family's (1 + weight) norm
    layer.post_feedforward_layernorm_2 = MoegraftGemmaScaleNorm(H, eps=config.rms_norm_eps)


def _moe_layer_forward(
    self,
    hidden_states,
    position_embeddings=None,
    attention_mask=None,
    position_ids=None,
    cache=None,
    **kwargs,
):
    """Gemma 2/3's decoder layer forward (the two are the same code), with the experts added inside the
    post-feedforward norm."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        position_embeddings=position_embeddings,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        **kwargs,
    )
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = residual + hidden_states

    residual = hidden_states  # (B, T, H)
    dense = self.mlp(self.pre_feedforward_layernorm(hidden_states))
    flat = residual.reshape(-1, residual.shape[-1])  # (B·T, H)
    _, top_k_weights, top_k_index = self.router(flat)
    routed = self.experts(self.pre_feedforward_layernorm_2(flat), top_k_index, top_k_weights)  # (B·T, H)
    routed = self.post_feedforward_layernorm_2(routed.reshape(residual.shape))
    hidden_states = self.post_feedforward_layernorm(dense + routed)
    return residual + hidden_states


class _MoeInit:
    """The family's init, then the new modules' (the experts' output norm at 0: a fresh model is its dense one).
    transformers' `initialization` functions skip tensors already loaded from a checkpoint."""

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MoegraftGemmaExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, MoegraftGemmaTextRouter):
            init.ones_(module.scale)
            init.ones_(module.per_expert_scale)
        elif isinstance(module, MoegraftGemmaScaleNorm) and module.with_scale:
            init.zeros_(module.weight)


def _build_text_model(model, config, layer_cls, embed_cls, norm_cls, rotary_cls) -> None:
    """The body of Gemma2Model / Gemma3TextModel.__init__ with the MoE layer class: theirs builds its layers by
    name, and building them twice would fail (the family's layers cannot take an experts implementation)."""
    model.padding_idx = config.pad_token_id
    model.vocab_size = config.vocab_size
    model.embed_tokens = embed_cls(
        config.vocab_size, config.hidden_size, model.padding_idx, embed_scale=config.hidden_size**0.5
    )
    model.layers = nn.ModuleList([layer_cls(config, i) for i in range(config.num_hidden_layers)])
    model.norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
    model.rotary_emb = rotary_cls(config)
    model.gradient_checkpointing = False
    model.post_init()


def _build_causal_lm(model, config, text_model_cls) -> None:
    """The body of Gemma2ForCausalLM / Gemma3ForCausalLM.__init__ with the MoE text model."""
    model.model = text_model_cls(config)
    model.vocab_size = config.vocab_size
    model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    model.post_init()


# -- Gemma 3 -------------------------------------------------------------------------------------------------


@strict
class MoegraftGemma3TextConfig(Gemma3TextConfig):
    model_type = "moegraft_gemma3_text"
    num_experts: int = 8
    top_k_experts: int = 2
    moe_intermediate_size: int = 256


class MoegraftGemma3DecoderLayer(Gemma3DecoderLayer):
    def __init__(self, config: MoegraftGemma3TextConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        _add_experts(self, config, Gemma3RMSNorm)

    forward = _moe_layer_forward


class MoegraftGemma3TextModel(_MoeInit, Gemma3TextModel):
    config_class = MoegraftGemma3TextConfig

    def __init__(self, config: MoegraftGemma3TextConfig):
        Gemma3PreTrainedModel.__init__(self, config)
        _build_text_model(
            self,
            config,
            MoegraftGemma3DecoderLayer,
            Gemma3TextScaledWordEmbedding,
            Gemma3RMSNorm,
            Gemma3RotaryEmbedding,
        )


class MoegraftGemma3ForCausalLM(_MoeInit, Gemma3ForCausalLM):
    config_class = MoegraftGemma3TextConfig

    def __init__(self, config: MoegraftGemma3TextConfig):
        Gemma3PreTrainedModel.__init__(self, config)
        _build_causal_lm(self, config, MoegraftGemma3TextModel)


# -- Gemma 2 -------------------------------------------------------------------------------------------------


@strict
class MoegraftGemma2Config(Gemma2Config):
    model_type = "moegraft_gemma2"
    num_experts: int = 8
    top_k_experts: int = 2
    moe_intermediate_size: int = 256


class MoegraftGemma2DecoderLayer(Gemma2DecoderLayer):
    def __init__(self, config: MoegraftGemma2Config, layer_idx: int):
        super().__init__(config, layer_idx)
        _add_experts(self, config, Gemma2RMSNorm)

    forward = _moe_layer_forward


class MoegraftGemma2Model(_MoeInit, Gemma2Model):
    config_class = MoegraftGemma2Config

    def __init__(self, config: MoegraftGemma2Config):
        Gemma2PreTrainedModel.__init__(self, config)
        _build_text_model(
            self,
            config,
            MoegraftGemma2DecoderLayer,
            Gemma2TextScaledWordEmbedding,
            Gemma2RMSNorm,
            Gemma2RotaryEmbedding,
        )


class MoegraftGemma2ForCausalLM(_MoeInit, Gemma2ForCausalLM):
    config_class = MoegraftGemma2Config

    def __init__(self, config: MoegraftGemma2Config):
        Gemma2PreTrainedModel.__init__(self, config)
        _build_causal_lm(self, config, MoegraftGemma2Model)


# save_pretrained copies this file beside the weights and writes auto_map, so a trained or merged model stays
# loadable without moegraft too
for _cls in (MoegraftGemma3TextConfig, MoegraftGemma2Config):
    _cls.register_for_auto_class("AutoConfig")
for _cls in (MoegraftGemma3ForCausalLM, MoegraftGemma2ForCausalLM):
    _cls.register_for_auto_class("AutoModelForCausalLM")
