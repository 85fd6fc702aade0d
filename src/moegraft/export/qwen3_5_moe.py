"""Qwen3.5 MoE → llama.cpp `qwen35moe`: the checkpoint as it is, converted without multi-token prediction.

In: a Qwen3.5 MoE checkpoint (moegraft's graft of a Qwen3.5 dense). Out: the same tensors. llama.cpp's qwen35moe
renormalises the top-k weights (as Qwen3_5MoeTopKRouter does) and takes a true sigmoid of the shared-expert gate
(so a zero gate needs no change, unlike qwen2moe). The converter expects MTP layers unless told `--no-mtp`;
moegraft writes none.
"""

from __future__ import annotations

from moegraft.export.base import GGUFTarget


class Qwen3_5MoeGGUF(GGUFTarget):
    name = "qwen3_5_moe"
    model_types = ("qwen3_5_moe_text",)
    converter_flags = ("--no-mtp",)

    def refusal(self) -> str | None:
        if int(self.config.get("mtp_num_hidden_layers") or 0):
            return "multi-token-prediction layers: moegraft writes none, and exports none"
        if self.config.get("hidden_act", "silu") not in ("silu", "swish"):
            return f"hidden_act {self.config.get('hidden_act')!r}: llama.cpp's qwen35moe is SiLU-gated only"
        return None
