"""moegraft's own Gemma 2/3 MoE class → llama.cpp: refused, because no native llama.cpp architecture holds it.

llama.cpp's gemma2/gemma3 graphs have no experts, and its gemma4 graph (the only Gemma one with experts)
RMS-normalises every attention value vector (`ggml_rms_norm(Vcur)` in src/models/gemma4.cpp), which Gemma 2/3
do not and no weight change can undo.
"""

from __future__ import annotations

from moegraft.export.base import GGUFTarget


class GemmaMoeGGUF(GGUFTarget):
    name = "gemma_moe"
    model_types = ("moegraft_gemma3_text", "moegraft_gemma2")

    def refusal(self) -> str | None:
        return (
            "moegraft's Gemma 2/3 MoE class has no native llama.cpp architecture (gemma2/gemma3 have no experts; "
            "gemma4 always RMS-normalises the attention values, which Gemma 2/3 do not)"
        )
