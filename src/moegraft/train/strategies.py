"""How a training recipe decides what trains: a model preparation strategy it is given.

In: the loaded model, its tokenizer and source. Out: `Prepared`, the model to train (requires_grad set on exactly
what trains, or the model wrapped in adapters) and what the preparation learned (e.g. the LoRA rank it chose).
`TrainPathways` is `moegraft train`'s; the LoRA strategies live in `moegraft.finetune.adapters`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from torch import nn

from moegraft.models import parameters_by_pathway


@dataclass(frozen=True)
class Prepared:
    model: nn.Module  # what trains: requires_grad set, possibly wrapped (PEFT)
    facts: object | None = None  # what the preparation learned, for the recipe's record and its caller


class ModelPreparation(Protocol):
    """A recipe's model preparation.

    `adapter` True: `prepare` wraps the model in adapters that decide what trains (finetune, compare's dense LoRA).
    The source may then be a dense model (an HF directory or a .gguf), a carve gets no automatic teacher and
    keeps the next-token loss, and OUT/model holds what the wrapper's save_pretrained writes, in its dtypes.
    """

    adapter: bool

    def prepare(self, model: nn.Module, tok, source: Path) -> Prepared: ...


@dataclass(frozen=True)
class TrainPathways:
    """`moegraft train`'s preparation: the named pathways (router, experts, ...) train, the rest is frozen."""

    pathways: tuple[str, ...]
    adapter: bool = False

    def prepare(self, model: nn.Module, tok, source: Path) -> Prepared:
        trainable = {n for p in self.pathways for n in parameters_by_pathway(model)[p]}
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
        return Prepared(model)
