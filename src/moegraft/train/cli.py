"""`moegraft train`: the command's signature is its CLI; it builds a TrainSpec, calls `train`, prints one summary.

In: command-line flags. Out: the trained run in OUT; typed library errors become one line and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

# imported lazily so that `moegraft --help` does not load torch
BalanceName = Literal["aux", "bias", "none"]

# Options shared with `moegraft finetune`, which runs the same recipe.
EvalData = Annotated[str | None, typer.Option(help="held-out text (default: the tail of --data)")]
Tokens = Annotated[int | None, typer.Option(help="budget in tokens")]
Steps = Annotated[int | None, typer.Option(help="budget in optimizer steps (default: one epoch)")]
SeqLen = Annotated[int, typer.Option(help="tokens per block")]
Batch = Annotated[int, typer.Option(help="blocks per micro-batch per process")]
GradAccum = Annotated[int, typer.Option(help="micro-batches per optimizer step")]
Lr = Annotated[float, typer.Option(help="peak learning rate (warmup, then cosine)")]
AuxCoef = Annotated[float, typer.Option(help="Switch/GShard loss coefficient")]
ZCoef = Annotated[float, typer.Option(help="router z-loss coefficient (0: off)")]
SaveEvery = Annotated[int, typer.Option(help="checkpoint every N steps (0: only on Ctrl-C)")]
EvalEvery = Annotated[int, typer.Option(help="held-out perplexity every N steps (0: at the end)")]
LogEvery = Annotated[int, typer.Option(help="metrics row every N steps")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace an existing OUT")]
Device = Annotated[str, typer.Option(help="auto or cpu (GPUs: use `accelerate launch`)")]
Quiet = Annotated[bool, typer.Option("--quiet", help="no progress bar")]
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
Precision = Annotated[
    PrecisionName,
    typer.Option(help="mixed precision (accelerate); auto: bf16 on a CUDA GPU that has it, fp32 on CPU"),
]
GradientCheckpointing = Annotated[
    bool,
    typer.Option(
        "--gradient-checkpointing", help="recompute decoder layers in backward: less activation memory"
    ),
]
# ... and with `moegraft compare`, which runs `train` twice (graft and dense LoRA) on the same TrainSpec.
Data = Annotated[
    str, typer.Option(help="text: .txt/folder, .jsonl, .parquet, a dataset name, or stdlib:train")
]
Trainable = Annotated[
    str | None,
    typer.Option(
        help="pathways to train: router,experts,dense,attention,norms,embeddings (default: router,experts; "
        "a carved checkpoint: router,experts,dense, its shared part included)"
    ),
]
Balance = Annotated[
    BalanceName, typer.Option(help="aux: Switch loss per layer; bias: selection bias (GLM); none")
]
BiasRate = Annotated[float, typer.Option(help="selection-bias update rate (--balance bias)")]
LossMask = Annotated[
    Literal["all", "assistant"],
    typer.Option(help="assistant: loss only on assistant tokens of chat .jsonl"),
]
Distill = Annotated[
    str | None,
    typer.Option(
        help="dense teacher for a KL term; auto: a carved checkpoint's dense source (from moegraft.json), "
        "no teacher for a graft; none: no teacher"
    ),
]
CeWeight = Annotated[
    float | None,
    typer.Option(help="weight of the next-token loss (default: 0 when a carve distils, else 1)"),
]
DistillWeight = Annotated[float, typer.Option(help="weight of the KL term")]
Seed = Annotated[int, typer.Option(help="seed for data order and initialisation")]
Tensorboard = Annotated[bool, typer.Option("--tensorboard", help="also log to OUT/tensorboard")]


def interrupted(e: KeyboardInterrupt, console: Console) -> typer.Exit:
    """One line for a stopped run (which checkpoint holds it, or why none does) and the signal's exit code."""
    import signal

    from moegraft.train.checkpoint import StopNow

    signum = getattr(e, "signum", signal.SIGINT)
    name = signal.Signals(signum).name
    ckpt = getattr(e, "checkpoint", None)
    resume = f"continue from {ckpt} with --resume" if ckpt else "no checkpoint yet: nothing to resume"
    if isinstance(e, StopNow):
        line = f"stopped at once by a second {name}; the step in progress was not saved; {resume}"
    else:
        line = f"interrupted ({name}); {resume}"
    console.print(line, soft_wrap=True, markup=False, highlight=False)
    return typer.Exit(128 + signum)


def spec_from_options(options: dict):
    """A TrainSpec from a command's parameters (its `locals()`): every TrainSpec field the command has."""
    from moegraft.train.spec import TrainSpec

    return TrainSpec.build(**{k: v for k, v in options.items() if k in TrainSpec.model_fields})


def train_command(
    moe_dir: Annotated[Path, typer.Argument(help="a MoE checkpoint written by `moegraft convert`")],
    out: Annotated[Path, typer.Argument(help="run directory: spec, metrics, checkpoints/, model/")],
    data: Data,
    eval_data: EvalData = None,
    tokens: Tokens = None,
    steps: Steps = None,
    seq_len: SeqLen = 256,
    batch: Batch = 4,
    grad_accum: GradAccum = 1,
    lr: Annotated[
        float | None, typer.Option(help="peak learning rate (default: 1e-3 graft, 1e-4 carve)")
    ] = None,
    trainable: Trainable = None,
    balance: Balance = "aux",
    aux_coef: AuxCoef = 0.01,
    z_coef: ZCoef = 0.001,
    bias_rate: BiasRate = 0.001,
    loss_mask: LossMask = "all",
    distill: Distill = "auto",
    distill_weight: DistillWeight = 1.0,
    ce_weight: CeWeight = None,
    save_every: SaveEvery = 0,
    eval_every: EvalEvery = 0,
    log_every: LogEvery = 10,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the latest checkpoint in OUT")
    ] = False,
    overwrite: Overwrite = False,
    seed: Seed = 0,
    device: Device = "auto",
    precision: Precision = "auto",
    gradient_checkpointing: GradientCheckpointing = False,
    tensorboard: Tensorboard = False,
    quiet: Quiet = False,
) -> None:
    """Train the grafted router and experts (the dense model frozen), load-balanced, on accelerate.

    A carved checkpoint instead recovers: shared part, experts and router, distilled from its dense source."""
    from moegraft.train.loop import train

    console = Console(stderr=True)
    try:
        spec = spec_from_options(locals())
        result = train(moe_dir, out, spec, progress=not quiet, resume=resume, overwrite=overwrite)
    except KeyboardInterrupt as e:  # library errors become one line in moegraft.cli.clean_errors
        raise interrupted(e, console) from None
    typer.echo(
        f"trained {result.steps} steps ({result.tokens:,} tokens, {result.trainable_params:,} trainable parameters) "
        f"in {result.seconds:.0f}s; held-out perplexity {result.eval_ppl:.3f}; model in {result.model_dir}"
    )
