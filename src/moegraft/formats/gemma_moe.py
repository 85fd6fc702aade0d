"""Gemma 2 / Gemma 3 dense → moegraft's own Gemma MoE class (`modeling_moegraft_gemma.py`, copied beside the weights).

No native MoE class holds these exactly (Gemma 4 normalises values and the dense MLP's output), so the output is
the family's own decoder block with Gemma 4's router and fused experts added inside the post-feedforward norm
(see the modeling file). The experts' output norm starts at weight 0, so the graft is the dense model bit for bit.
Gemma3ForConditionalGeneration gives its text model; the vision tower and projector are left out.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from moegraft.errors import SpecError
from moegraft.formats.base import OutputFormat, OutTensor
from moegraft.formats.gemma4 import dense_router_experts
from moegraft.init.experts import ExpertInit
from moegraft.io.writer import TensorSpec

MODELING_FILE = Path(__file__).with_name("modeling_moegraft_gemma.py")
# dense text model_type -> (MoE model_type, config class, model class) in the modeling file
OUTPUT = {
    "gemma3_text": ("moegraft_gemma3_text", "MoegraftGemma3TextConfig", "MoegraftGemma3ForCausalLM"),
    "gemma2": ("moegraft_gemma2", "MoegraftGemma2Config", "MoegraftGemma2ForCausalLM"),
}
# Gemma3ForConditionalGeneration's parts outside its language model, dropped from the output
_TOWERS = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")
_TEXT_PREFIX = "model.language_model."


def _text(config: dict) -> dict:
    return config.get("text_config") or config


class GemmaMoeFormat(OutputFormat):
    name = "gemma_moe"
    dense_types = (
        "gemma3_text",
        "gemma2",
        "gemma3",
    )  # gemma3: the text model of Gemma3ForConditionalGeneration
    moe_types = tuple(moe for moe, _, _ in OUTPUT.values())
    top_k_key = "top_k_experts"
    carve_refusal = (
        "the experts' output is normalised on its own (Gemma 4's layout), so they cannot carry the dense neurons "
        "exactly"
    )
    zero_down = False  # the zero lives in post_feedforward_layernorm_2.weight, as in Gemma 4
    router_reads_residual = True  # Gemma 4's router

    @classmethod
    def unsupported_reason(cls, config: dict) -> str | None:
        mt = _text(config).get("model_type")
        if mt not in OUTPUT:
            return f"gemma_moe takes Gemma 2 and Gemma 3 dense models (gemma2, gemma3_text, gemma3), not {mt}"
        return None

    @property
    def architecture(self) -> str:  # type: ignore[override]  (one format, two output classes)
        return OUTPUT[_text(self.config)["model_type"]][2]

    def check_layers(self, moe_layers: list[int], num_layers: int) -> None:
        super().check_layers(moe_layers, num_layers)
        if len(moe_layers) != num_layers:
            raise SpecError(
                "moegraft's Gemma MoE puts experts in every layer: use --layers all with Gemma 2/3"
            )

    def check_sizes(self, intermediate_size: int) -> None:
        if self.spec.init == "upcycle" and self.spec.expert_size == intermediate_size:
            raise SpecError(
                "--init upcycle with full copies is not exact for Gemma 2/3: the experts' output is normalised on "
                "its own (post_feedforward_layernorm_2), so half of it cannot stand in for half the dense MLP; use "
                "--init neurons (default) or upcycle slices (--expert-size below the dense size)"
            )

    def moe_config(self, moe_layers: list[int], dtype: torch.dtype) -> dict:
        out = copy.deepcopy(_text(self.config))
        if "text_config" in self.config:  # Gemma3ForConditionalGeneration: its head is tied at the top level
            out["tie_word_embeddings"] = self.config.get(
                "tie_word_embeddings", out.get("tie_word_embeddings", True)
            )
        moe_type, config_cls, model_cls = OUTPUT[out["model_type"]]
        # a GGUF-loaded source names its quantisation; the tensors written are dequantised
        for key in ("torch_dtype", "_name_or_path", "transformers_version", "quantization_config"):
            out.pop(key, None)
        module = MODELING_FILE.stem
        out.update(
            architectures=[model_cls],
            model_type=moe_type,
            num_experts=self.spec.num_experts,
            top_k_experts=self.spec.top_k,
            moe_intermediate_size=self.spec.expert_size,
            auto_map={
                "AutoConfig": f"{module}.{config_cls}",
                "AutoModelForCausalLM": f"{module}.{model_cls}",
            },
            dtype=str(dtype).removeprefix("torch."),
        )
        return out

    def extra_files(self) -> dict[str, Path]:
        return {MODELING_FILE.name: MODELING_FILE}

    def zero_router_weight(self) -> float:
        return 1.0 / self.spec.top_k

    def renormalises(self) -> bool:
        return True  # Gemma 4's router, which always renormalises the top-k weights

    @staticmethod
    def _rename(name: str) -> str:
        """The text model's key in MoegraftGemma*ForCausalLM (a multimodal checkpoint nests it)."""
        return "model." + name.removeprefix(_TEXT_PREFIX) if name.startswith(_TEXT_PREFIX) else name

    def passthrough(self, name, shape, dtype, read):
        if name.startswith(_TOWERS):
            return []
        return [OutTensor(TensorSpec(self._rename(name), shape, dtype), lambda: read().to(dtype))]

    def moe_layer_tensors(self, prefix: str, init: ExpertInit, out_dtype: torch.dtype) -> list[OutTensor]:
        H, _, E, I_e = self.sizes(init)
        ffn, dt, p = init.ffn, out_dtype, self._rename(prefix)
        pre_ln = prefix + "pre_feedforward_layernorm.weight"
        return [
            *dense_router_experts(p, init, E, I_e, dt),
            # the experts' way in: the dense MLP's own input norm (same 1 + weight class), so they see what it sees
            OutTensor(
                TensorSpec(p + "pre_feedforward_layernorm_2.weight", (H,), dt),
                lambda: ffn.read(pre_ln).to(dt),
            ),
            # their way out: weight 0, so they add exactly +0 until trained
            OutTensor(
                TensorSpec(p + "post_feedforward_layernorm_2.weight", (H,), dt),
                lambda: torch.zeros(H, dtype=dt),
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
            "dense": (r"\.mlp\.",),
            "attention": (r"\.self_attn\.",),
            "norms": (r"layernorm\.weight$", r"(^|\.)norm\.weight$"),
            "embeddings": (r"embed_tokens", r"^lm_head\."),
        }
