"""Qwen2-MoE → llama.cpp `qwen2moe`: refuse what llama.cpp computes differently, fix what can be made exact.

In: a Qwen2-MoE checkpoint. Out: an export-ready copy with an untied head, non-zero shared gates, and
every layer sparse (llama.cpp's qwen2moe has no dense layers), computing the same function.
"""

from __future__ import annotations

import re

import torch

from moegraft.export.base import GGUFTarget
from moegraft.formats.base import OutTensor
from moegraft.formats.qwen2_moe import llama_cpp_gate_eps
from moegraft.io.writer import TensorSpec

_DENSE_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
_SHARED_GATE = re.compile(r"^model\.layers\.(\d+)\.mlp\.shared_expert_gate\.weight$")


class Qwen2MoeGGUF(GGUFTarget):
    name = "qwen2_moe"
    model_types = ("qwen2_moe",)

    def refusal(self) -> str | None:
        c = self.config
        E, K = int(c["num_experts"]), int(c["num_experts_per_tok"])
        if c.get("norm_topk_prob") and K < E:
            return (
                "norm_topk_prob=true: llama.cpp's qwen2moe never renormalises the top-k weights, so no GGUF "
                "can compute this model; convert with --llama-cpp (norm_topk_prob=false) and retrain"
            )
        if c.get("hidden_act") not in ("silu", "swish"):
            return f"hidden_act {c.get('hidden_act')!r}: llama.cpp's qwen2moe is SiLU-gated only"
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            return f"rope_type {rope_type!r}: only default RoPE is exported exactly to llama.cpp's qwen2moe"
        types = c.get("layer_types") or []
        if c.get("use_sliding_window") and "sliding_attention" in types:
            return "sliding-window layers: llama.cpp's qwen2moe attends over the whole context"
        H, nh = int(c["hidden_size"]), int(c["num_attention_heads"])
        if int(c.get("head_dim") or H // nh) * nh != H:
            return f"head_dim x heads != hidden_size {H}: llama.cpp's qwen2moe assumes they are equal"
        if self._dense_layers() and int(c["shared_expert_intermediate_size"]) != int(c["intermediate_size"]):
            return (
                "dense (mlp_only) layers with a shared expert of another size: llama.cpp's qwen2moe needs every "
                "layer sparse with one shared size; convert with --layers all"
            )
        return None

    def _dense_layers(self) -> list[int]:
        return sorted({int(m[1]) for n in self.source.tensor_names() if (m := _DENSE_MLP.match(n))})

    def _tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def ready_config(self) -> dict:
        c = dict(self.config)
        c["tie_word_embeddings"] = False
        c["mlp_only_layers"] = []
        c["decoder_sparse_step"] = 1
        c["norm_topk_prob"] = False  # equal when top_k == num_experts (refused otherwise)
        return c

    def ready_tensors(self) -> list[OutTensor]:
        names = self.source.tensor_names()
        dense = set(self._dense_layers())
        eps = llama_cpp_gate_eps(torch.float32)
        out: list[OutTensor] = []
        zero_gates = 0
        for name in names:
            if self._tied() and name == "lm_head.weight":
                continue  # written from embed_tokens below
            if (m := _DENSE_MLP.match(name)) and int(m[1]) in dense:
                i, proj = int(m[1]), m[2]
                prefix = f"model.layers.{i}.mlp."
                # the dense FFN becomes the shared expert; its gate sigmoid(eps*sum x) = 0.5 is undone by x2
                out.append(
                    self.copy(
                        name, f"{prefix}shared_expert.{proj}_proj.weight", 2.0 if proj == "down" else None
                    )
                )
                if proj == "down":
                    out += self._zero_routed(prefix, eps)
                continue
            if _SHARED_GATE.match(name) and not bool(self.source.get(name).any()):
                # llama.cpp computes sigmoid(t) as silu(t)/t: NaN at t = 0. A gate of eps*ones gives
                # sigmoid(eps * sum x) = 0.5 + O(eps * |sum x|), below fp32 resolution for eps = 2^-40.
                zero_gates += 1
                shape = self.source.shape(name)
                out.append(
                    OutTensor(TensorSpec(name, shape, torch.float32), lambda s=shape: torch.full(s, eps))
                )
                continue
            out.append(self.copy(name))
            if self._tied() and name.endswith("embed_tokens.weight"):
                out.append(self.copy(name, "lm_head.weight"))
        if self._tied():
            self.changes.append("untied the output head (llama.cpp's qwen2moe needs output.weight)")
        if zero_gates:
            self.changes.append(
                f"shared-expert gate 0 -> {eps:.3g} in {zero_gates} layers (llama.cpp's silu(t)/t is NaN at t=0)"
            )
        if dense:
            self.changes.append(
                f"dense layers {sorted(dense)} -> shared expert + {self.config['num_experts']} zero routed experts "
                "(llama.cpp's qwen2moe has no dense layers)"
            )
        return out

    def _zero_routed(self, prefix: str, eps: float) -> list[OutTensor]:
        """A dense layer's MoE part: router 0, experts 0 (output exactly 0), shared gate eps."""
        c = self.config
        E, H, I_e = int(c["num_experts"]), int(c["hidden_size"]), int(c["moe_intermediate_size"])
        dtype = self.source.dtype(f"{prefix}down_proj.weight")

        def zeros(name: str, shape: tuple[int, ...], dt: torch.dtype = dtype, fill: float = 0.0) -> OutTensor:
            return OutTensor(TensorSpec(name, shape, dt), lambda: torch.full(shape, fill, dtype=dt))

        out = [
            zeros(f"{prefix}gate.weight", (E, H)),
            zeros(f"{prefix}shared_expert_gate.weight", (1, H), torch.float32, eps),
        ]
        for e in range(E):
            out += [
                zeros(f"{prefix}experts.{e}.gate_proj.weight", (I_e, H)),
                zeros(f"{prefix}experts.{e}.up_proj.weight", (I_e, H)),
                zeros(f"{prefix}experts.{e}.down_proj.weight", (H, I_e)),
            ]
        return out
