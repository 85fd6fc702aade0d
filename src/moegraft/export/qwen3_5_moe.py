"""Qwen3.5 MoE → llama.cpp `qwen35moe`: the checkpoint as it is, converted without multi-token prediction.

In: a Qwen3.5 MoE checkpoint (moegraft's graft of a Qwen3.5 dense). Out: the same tensors. llama.cpp's qwen35moe
renormalises the top-k weights (as Qwen3_5MoeTopKRouter does) and takes a true sigmoid of the shared-expert gate
(so a zero gate needs no change, unlike qwen2moe). The converter expects MTP layers unless told `--no-mtp`;
moegraft writes none. Without `mrope_section` in the config it writes Qwen3.5's default [11, 11, 10] (32 of
the rotary dimension's pairs), which llama.cpp refuses for a smaller rotary dimension (GGML_ASSERT(sect_dims <=
ne0)); for text every section sees the same position, so the export-ready copy names sections that interleave
over exactly its pairs (llama.cpp's imrope gives pair i to section i mod 3 while that section lasts, and any pair
past the sections to a fourth whose text position is 0).
"""

from __future__ import annotations

from moegraft.export.base import GGUFTarget

DEFAULT_MROPE_PAIRS = 11 + 11 + 10  # transformers' and the converter's default mrope_section, summed


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

    def ready_config(self) -> dict:
        c = dict(self.config)
        rope = dict(c.get("rope_parameters") or {})
        head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // int(c["num_attention_heads"]))
        pairs = int(head_dim * float(rope.get("partial_rotary_factor", 1.0))) // 2  # rotary dims / 2
        if "mrope_section" not in rope and pairs != DEFAULT_MROPE_PAIRS:
            # pairs i ≡ 0, 1, 2 (mod 3) each covered: [11, 11, 10] for 32 pairs, [1, 1, 0] for 2
            sections = [-(-(pairs - k) // 3) for k in range(3)]
            rope["mrope_section"] = sections
            c["rope_parameters"] = rope
            self.changes.append(
                f"mrope_section {sections} for {2 * pairs} rotary dims (the default [11, 11, 10] needs 64)"
            )
        return c
