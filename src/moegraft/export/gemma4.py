"""Gemma 4 MoE → llama.cpp `gemma4`, for the text class and the multimodal class's text model.

In: a Gemma 4 MoE checkpoint (`Gemma4ForCausalLM` or `Gemma4ForConditionalGeneration`). Out: its tensors
unchanged, and the hparams llama.cpp's converter reads. Its Gemma4Model finds the full-attention head size in
`global_head_dim` or `per_layer_config`, but transformers 5's `to_dict()` drops both when the full-attention
layers use the sliding layers' head size (the per-layer override equals the default), and the converter then
stops on an assert. The head size and KV heads transformers itself resolves for a full-attention layer are
handed to the converter as `global_head_dim` / `num_global_key_value_heads`, and a model without a final-logit
soft cap gets one that computes the identity (llama.cpp would otherwise cap at its default, 30).
"""

from __future__ import annotations

from pathlib import Path

from moegraft.export.base import GGUFTarget

NO_SOFTCAP = 2**60


class Gemma4GGUF(GGUFTarget):
    name = "gemma4"
    model_types = ("gemma4_text", "gemma4")

    def refusal(self) -> str | None:
        text = self.config.get("text_config") or self.config
        rope = (text.get("rope_parameters") or {}).get("full_attention") or {}
        if rope.get("rope_type", "proportional") != "proportional":
            # the converter encodes the full layers' partial rotation as freq factors of a proportional RoPE only
            return f"full-attention rope_type {rope.get('rope_type')!r}: llama.cpp's converter reads only 'proportional'"
        return None

    def converter_hparams(self, ready: Path) -> dict | None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(ready)
        hparams = config.to_dict()  # what the converter itself would read
        text = config.get_text_config()
        full = next(
            i for i, t in enumerate(text.layer_types) if t == "full_attention"
        )  # Gemma 4 forces the last layer full
        layer = text.per_layer_config[full]
        # the text model's fields: the converter merges text_config over the top level for the multimodal class
        fields = hparams.get("text_config", hparams)
        fields["global_head_dim"] = int(layer.head_dim)
        fields["num_global_key_value_heads"] = int(layer.num_key_value_heads)
        if not fields.get("final_logit_softcapping"):
            # llama.cpp's gemma4 soft-caps the logits at 30 when the GGUF names no cap, and the converter writes
            # none for null or 0. A cap of 2^60 is the identity in fp32: x / 2^60 and y · 2^60 are exact, and
            # tanh(y) = y for |y| < 2^-12 (any logit below 2^48)
            fields["final_logit_softcapping"] = float(NO_SOFTCAP)
            self.changes.append(
                "no final-logit soft cap: written as 2^60 (llama.cpp caps at 30 when the GGUF names none)"
            )
        return hparams
