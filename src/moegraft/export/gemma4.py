"""Gemma 4 MoE → llama.cpp `gemma4`: refused, with the reason, until llama.cpp's converter reads it.

llama.cpp's converter (as vendored in llama-cpp-python 0.3.36) registers Gemma4ForCausalLM with MoE, but reads
hparams through transformers' AutoConfig, which in transformers 5 no longer returns `global_head_dim` or a
per-layer head_dim; the converter then stops (assert in Gemma4Model.generate_extra_tensors).
"""

from __future__ import annotations

from moegraft.export.base import GGUFTarget


class Gemma4GGUF(GGUFTarget):
    name = "gemma4"
    model_types = ("gemma4_text", "gemma4")

    def refusal(self) -> str | None:
        return (
            "Gemma 4 MoE: llama.cpp's converter (llama-cpp-python 0.3.36) cannot read transformers 5's Gemma 4 "
            "config (no global_head_dim after AutoConfig), so no GGUF is written; use the transformers checkpoint"
        )
