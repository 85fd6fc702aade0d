"""The interface every native output format implements, and the pieces they share.

In: the dense checkpoint's config and tensor names. Out: the MoE config.json and an ordered list of
output tensors, each with a recipe to compute it from the source when the writer asks.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from moegraft.config import GraftSpec
from moegraft.errors import SpecError
from moegraft.init.experts import ExpertInit
from moegraft.io.source import Source
from moegraft.io.writer import TensorSpec

# Pathway names shared by all formats: what `train` freezes and `finetune` targets.
PATHWAYS = ("router", "experts", "dense", "attention", "norms", "embeddings")
# Everything outside the text decoder of a multimodal checkpoint (Gemma4ForConditionalGeneration's vision and
# audio towers and their projections into the text model): its own pathway, matched before the text ones (the
# towers have MLPs and attention of their own), never trained and never given LoRA adapters.
TOWERS = "towers"
TOWER_PATTERNS = (r"(^|\.)(vision_tower|audio_tower|embed_vision|embed_audio|multi_modal_projector)\.",)

_MLP_KEY = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.(?P<idx>\d+)\.)mlp\.(?P<proj>gate|up|down)_proj\.weight$"
)
# The text decoder's layer prefixes in the model classes we read (multimodal wrappers nest it).
TEXT_LAYER_PREFIXES = ("model.layers.", "model.language_model.layers.", "language_model.model.layers.")


@dataclass(frozen=True)
class OutTensor:
    """An output tensor: its planned name/shape/dtype and how to compute it (fp32 or native)."""

    spec: TensorSpec
    make: Callable[[], torch.Tensor]


class SourceCache:
    """Keeps the last few source tensors, so a layer's dense FFN is read once for all its experts."""

    def __init__(self, source: Source, size: int = 3):
        self.source, self.size = source, size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, name: str) -> torch.Tensor:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        t = self.source.get(name).float()
        self._cache[name] = t
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return t


def dense_ffn_layers(source: Source) -> dict[int, str]:
    """Layer index → key prefix (e.g. 'model.layers.3.') of every dense FFN in the text decoder."""
    found: dict[int, str] = {}
    for name in source.tensor_names():
        m = _MLP_KEY.match(name)
        if m and m["prefix"].startswith(TEXT_LAYER_PREFIXES) and m["prefix"].count("layers.") == 1:
            found[int(m["idx"])] = m["prefix"]
    return found


class OutputFormat(ABC):
    """One native MoE format: which dense models it represents exactly, its config, its tensors."""

    name: ClassVar[str]
    architecture: ClassVar[str]
    # model_types this format converts (dense inputs), and the model_types of what it writes (its MoE outputs)
    dense_types: ClassVar[tuple[str, ...]]
    moe_types: ClassVar[tuple[str, ...]]
    # the output config's key for K, the experts each token runs
    top_k_key: ClassVar[str] = "num_experts_per_tok"
    # why `--init carve` cannot write this format exactly; None where it can
    carve_refusal: ClassVar[str | None] = "carve is implemented for qwen2_moe only"
    # Where the zero output path of a fresh graft lives: the experts' down_proj (True) or a norm weight.
    zero_down: ClassVar[bool] = True
    # How router logits become routing weights: "softmax" or "sigmoid" (scores, normalised for balance stats).
    router_score: ClassVar[str] = "softmax"
    # Whether the router reads the residual stream (Gemma 4's router) rather than the dense FFN's input.
    router_reads_residual: ClassVar[bool] = False

    def __init__(self, config: dict, spec: GraftSpec):
        self.config, self.spec = config, spec

    @classmethod
    @abstractmethod
    def unsupported_reason(cls, config: dict) -> str | None:
        """None if this format represents the dense model in `config` exactly, else why not."""

    def check_layers(self, moe_layers: list[int], num_layers: int) -> None:
        """Raise SpecError if the format cannot make exactly these layers MoE."""
        if not moe_layers:
            raise SpecError("--layers selects no layer; choose at least one")

    def check_sizes(self, intermediate_size: int) -> None:  # noqa: B027 (most formats take any size)
        """Raise SpecError if the spec's sizes cannot hold a dense FFN of `intermediate_size` (I)."""

    @abstractmethod
    def moe_config(self, moe_layers: list[int], dtype: torch.dtype) -> dict:
        """The output config.json."""

    @abstractmethod
    def zero_router_weight(self) -> float:
        """Weight each chosen expert gets when the router weight is all zero."""

    @abstractmethod
    def renormalises(self) -> bool:
        """Whether chosen weights are rescaled to sum to 1."""

    def sizes(self, init: ExpertInit) -> tuple[int, int, int, int]:
        """(H, I, E, I_e) of a MoE layer: the dense FFN's hidden and intermediate sizes, the spec's experts."""
        return init.ffn.hidden_size, init.ffn.intermediate_size, self.spec.num_experts, self.spec.expert_size

    @abstractmethod
    def moe_layer_tensors(self, prefix: str, init: ExpertInit, out_dtype: torch.dtype) -> list[OutTensor]:
        """Tensors replacing the dense FFN at `prefix` ('model.layers.3.'); `init.ffn` reads the dense one."""

    def passthrough(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, read: Callable[[], torch.Tensor]
    ) -> list[OutTensor]:
        """Tensors written for a source tensor outside the MoE layers' FFNs (default: copy it)."""
        return [OutTensor(TensorSpec(name, shape, dtype), lambda: read().to(dtype))]

    def extra_files(self) -> dict[str, Path]:
        """Files copied into the output beside the weights, by name (a modeling file for remote code)."""
        return {}

    @classmethod
    @abstractmethod
    def pathways(cls) -> dict[str, tuple[str, ...]]:
        """Pathway → regexes over the loaded model's parameter names (router / experts / dense / ...)."""

    @property
    def text_config(self) -> dict:
        """The decoder's config (multimodal wrappers keep it under text_config)."""
        return self.config.get("text_config") or self.config


def untied_head(
    tied: bool, name: str, shape: tuple[int, ...], dtype: torch.dtype, read: Callable[[], torch.Tensor]
) -> list[OutTensor] | None:
    """For a dense model whose lm_head is tied to its embeddings: the tensors that write the head as its own
    `lm_head.weight` (a copy of the embeddings), for runtimes that never tie (llama.cpp's qwen2moe, vLLM's
    Glm4MoeForCausalLM). None where `name` needs no change; the caller then passes it through as usual."""
    if not tied:
        return None
    if name == "lm_head.weight":  # a tied checkpoint that stores it anyway: written beside the embeddings
        return []
    if name.endswith("embed_tokens.weight"):
        return [
            OutTensor(TensorSpec(name, shape, dtype), lambda: read().to(dtype)),
            OutTensor(TensorSpec("lm_head.weight", shape, dtype), lambda: read().to(dtype)),
        ]
    return None


def expert_tensor(init: ExpertInit, e: int, part: int, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """Recipe for part 0/1/2 (gate/up/down) of expert e."""
    return lambda: init.expert(e)[part].to(dtype)


def per_expert_tensors(
    prefix: str, init: ExpertInit, num_experts: int, expert_size: int, dtype: torch.dtype
) -> list[OutTensor]:
    """`{prefix}experts.{e}.{gate,up,down}_proj.weight` for every expert: the per-expert keys that Qwen's
    and GLM's released checkpoints use, which vLLM and llama.cpp's converter read and transformers fuses."""
    H, I_e = init.ffn.hidden_size, expert_size
    parts = ((0, "gate_proj", (I_e, H)), (1, "up_proj", (I_e, H)), (2, "down_proj", (H, I_e)))
    return [
        OutTensor(
            TensorSpec(f"{prefix}experts.{e}.{proj}.weight", shape, dtype),
            expert_tensor(init, e, part, dtype),
        )
        for e in range(num_experts)
        for part, proj, shape in parts
    ]
