"""Router and expert training for converted MoE checkpoints: spec, flags, balance losses, the accelerate recipe.

In: a `moegraft convert` output and text. Out: a trained native checkpoint, metrics and checkpoints. The recipe
(`loop.TrainRecipe`: setup, step, log, save, finish) runs `moegraft finetune` and `moegraft compare` too, given
their model preparation (`strategies.ModelPreparation`; the LoRA ones in `moegraft.finetune.adapters`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moegraft.train.loop import TrainingDivergedError, TrainRecipe, TrainResult, train
    from moegraft.train.losses import heldout_loss
    from moegraft.train.spec import TrainSpec

__all__ = ["TrainRecipe", "TrainResult", "TrainSpec", "TrainingDivergedError", "heldout_loss", "train"]


def __getattr__(name: str):
    # lazy, so that the CLI can import moegraft.train.cli without loading torch
    if name == "TrainSpec":
        from moegraft.train.spec import TrainSpec

        return TrainSpec
    if name in __all__:
        from moegraft.train import loop

        return getattr(loop, name)
    raise AttributeError(name)
