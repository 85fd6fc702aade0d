"""Router and expert training for converted MoE checkpoints: spec, balance losses, the accelerate recipe.

In: a `moegraft convert` output and text. Out: a trained native checkpoint, metrics and checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moegraft.train.loop import TrainingDivergedError, TrainResult, heldout_loss, train
    from moegraft.train.spec import TrainSpec

__all__ = ["TrainResult", "TrainSpec", "TrainingDivergedError", "heldout_loss", "train"]


def __getattr__(name: str):
    # lazy, so that the CLI can import moegraft.train.cli without loading torch
    if name == "TrainSpec":
        from moegraft.train.spec import TrainSpec

        return TrainSpec
    if name in __all__:
        from moegraft.train import loop

        return getattr(loop, name)
    raise AttributeError(name)
