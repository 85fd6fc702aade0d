"""Layered LoRA fine-tuning by pathway (`moegraft finetune`): dense MLP, routed experts, router, attention.

In: a MoE checkpoint and text or chat data. Out: a PEFT adapter (and optionally a merged native checkpoint).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moegraft.finetune.recipe import (
        FinetuneResult,
        FinetuneSpec,
        LoraTargets,
        finetune,
        load_adapter,
        lora_targets,
        merge_adapter,
    )

__all__ = [
    "FinetuneResult",
    "FinetuneSpec",
    "LoraTargets",
    "finetune",
    "load_adapter",
    "lora_targets",
    "merge_adapter",
]


def __getattr__(name: str):
    # lazy, so that the CLI can import moegraft.finetune.cli without loading torch and peft
    if name in __all__:
        from moegraft.finetune import recipe

        return getattr(recipe, name)
    raise AttributeError(name)
