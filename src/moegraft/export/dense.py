"""A dense Llama-family model → llama.cpp `llama`/`qwen2`, through the same converter as the MoE it was grafted from.

In: the dense source (directory, hub id or .gguf, dequantised). Out: its tensors unchanged, with a config.json
that names its architecture (a GGUF source has none on disk), so dense and MoE meet in the same runtime.
"""

from __future__ import annotations

from moegraft.export.base import GGUFTarget


class DenseGGUF(GGUFTarget):
    name = "dense"
    model_types = ("llama", "mistral", "qwen2")

    def refusal(self) -> str | None:
        if not self.config.get("architectures"):
            return (
                "config.json names no architectures; llama.cpp's converter needs one (e.g. LlamaForCausalLM)"
            )
        return None

    def ready_config(self) -> dict:
        c = dict(self.config)
        c.pop("quantization_config", None)  # a GGUF source's: the tensors written here are plain floats
        return c
