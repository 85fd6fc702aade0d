"""The training recipe's explicit state: what `setup` built (frozen), what the steps count and measure, the result.

In: the pieces `moegraft.train.setup` loads. Out: `RunState` (frozen), `Losses` and `StepResult` (one optimizer
step, read by name), the few mutable counters a run checkpoints or logs (`Position`, `Counters`, `Window`), and
`TrainResult`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from accelerate import Accelerator
from torch import nn

from moegraft.train.batches import BlockStream
from moegraft.train.metrics import LoadWindow, MetricsLog
from moegraft.train.spec import TrainSpec

if TYPE_CHECKING:
    from moegraft.plan.training import TrainFlops


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path  # OUT: spec, metrics, checkpoints
    model_dir: Path  # OUT/model: the trained native checkpoint
    steps: int
    tokens: int
    final_loss: float  # mean training loss of the last logging window
    eval_loss: float
    eval_ppl: float
    trainable_params: int
    seconds: float  # wall time of train(): loading, data, training, evaluation, saving
    train_seconds: float = math.nan  # the training loop alone (what an equal-budget comparison times)
    tokens_per_s: float = math.nan  # tokens fed over the steps' wall time (evaluation and saving left out)
    flops_per_token: float | None = None  # model FLOPs of a step per token (plan.training.TrainFlops)
    mfu: float | None = None  # model FLOPs utilisation: achieved FLOP/s / (peak per device x processes)
    # the held-out blocks (N, T) or (N, 2, T) behind eval_loss, so other models can be scored on exactly them
    eval_blocks: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # what the model preparation learned (Prepared.facts: e.g. the dense LoRA's rank), None for `train`'s
    adapted: object | None = field(default=None, repr=False, compare=False)


class Losses(NamedTuple):
    """The loss terms of a step: mean over its micro-batches and the processes (nats per token)."""

    loss: float  # what was minimised: ce_weight · ce + distill_weight · kl + aux_coef · aux + z_coef · z
    ce: float
    kl: float
    aux: float
    z: float


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step measured, the same on every process."""

    losses: Losses
    stop: bool  # some process was asked to stop (a signal): every process stops after this step
    counts: dict[int, torch.Tensor]  # layer → (E,) the global batch's expert assignments
    entropy: dict[int, float]  # layer → this process's router entropy, mean over micro-batches
    tokens: int = 0  # token ids fed to the model in the step, over every process


class Fitted(NamedTuple):
    """What the end-to-end steps left for `finish`."""

    train_seconds: float  # the training loop alone
    eval_loss: float  # on the held-out blocks, after the last step


class Position:
    """Position of the run, checkpointed with the model so that --resume continues at the same data."""

    def __init__(self) -> None:
        self.step, self.tokens = 0, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.tokens = int(d["step"]), int(d["tokens"])


class NoRouters:
    """RouterTap's stand-in for a model without routers (a dense model under an adapter): records nothing."""

    def __init__(self) -> None:
        self.records: dict = {}
        self.recording = True

    def __enter__(self) -> NoRouters:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def clear(self) -> None:
        pass


@dataclass
class Counters:
    """What the steps change besides the model: the last checkpoint, whether a step is whole, the timed tokens."""

    saved_step: int  # -1 before the first save of a fresh run
    at_boundary: bool = (
        True  # False from a step's first forward until its optimizer step and counters are done
    )
    timed_tokens: int = 0  # over every logging window: the run's tokens/s
    timed_seconds: float = 0.0
    last_row: dict = field(default_factory=dict)  # the last metrics row written


@dataclass
class Window:
    """The steps since the last metrics row: their summed losses, routing, tokens and start time."""

    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(5, dtype=torch.float64))  # Losses' order
    load: LoadWindow = field(default_factory=LoadWindow)
    steps: int = 0
    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, step: StepResult) -> None:
        self.load.add(step.counts, step.entropy)
        self.sums += torch.tensor(step.losses, dtype=torch.float64)
        self.steps += 1
        self.tokens += step.tokens

    def mean(self) -> Losses:
        return Losses(*(self.sums / self.steps).tolist())

    def reset(self) -> None:
        self.sums.zero_()
        self.steps, self.tokens, self.t0 = 0, 0, time.perf_counter()


@dataclass(frozen=True)
class Processes:
    """The processes and what they share: accelerate, the precision, the checkpoint a resumed run starts from."""

    accelerator: Accelerator
    precision: str  # fp32 | bf16 | fp16
    main: bool
    device: torch.device
    ckpt: Path | None  # the checkpoint --resume loads, or None for a fresh run

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, "sum") if self.accelerator.num_processes > 1 else t


@dataclass(frozen=True)
class Data:
    """The train stream, the held-out blocks, and the step budget they give."""

    stream: BlockStream
    eval_blocks: torch.Tensor  # (N, T), or (N, 2, T) with the loss mask
    steps: int
    warmup: int
    tokens_per_step: int


@dataclass(frozen=True)
class RunState:
    """Everything `TrainRecipe.setup` built, in the order it built it; the steps read it and never rebind it.

    `position` (checkpointed) and `counters` are the only parts that change during the run.
    """

    spec: TrainSpec  # resolved for the checkpoint
    run_dir: Path  # OUT itself, or the temporary that replaces it under --overwrite
    procs: Processes
    saved_dtype: torch.dtype  # what OUT/model is written in: the checkpoint's own dtype
    tok: object  # the tokenizer
    adapted: object | None  # what the model preparation learned (ModelPreparation's Prepared.facts)
    n_trainable: int
    data: Data
    resolved: dict  # what the spec resolved to: the run's record in moegraft-train.json
    teacher: nn.Module | None
    flops: TrainFlops | None  # None for a model plan cannot read
    peak_flops: float | None  # of every process together
    model: nn.Module  # as accelerate prepared it (DDP, FSDP)
    # the model itself, unwrapped and, under --compile, uncompiled: the same parameters and modules under their own
    # names, which the saved model and PEFT's adapter keys take (compiled regions add `_orig_mod.`)
    core: nn.Module
    params: list[nn.Parameter]  # the trainable ones, as the optimizer holds them (FSDP2: shards)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR  # stepped by hand once per optimizer step
    position: Position
    owner: int  # names the checkpoint temporaries every process writes into
    metrics: MetricsLog
    counters: Counters

    def mfu(self, tokens_per_s: float) -> float | None:
        if self.flops is None or self.peak_flops is None:
            return None
        return tokens_per_s * self.flops.per_token / self.peak_flops

    def throughput(self, tokens_per_s: float) -> dict:
        """flops_per_token and, when the peak is known, mfu for a metrics row."""
        out: dict = {}
        if self.flops is not None:
            out["flops_per_token"] = self.flops.per_token
        mfu = self.mfu(tokens_per_s)
        if mfu is not None:
            out["mfu"] = mfu
        return out
