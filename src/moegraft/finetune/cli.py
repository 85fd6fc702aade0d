"""`moegraft finetune`: a thin shell that builds a FinetuneSpec from the flags, calls `finetune`, prints.

In: command-line flags (the training ones are `moegraft train`'s, from moegraft.train.options). Out: the adapter
(and merged model) in OUT; typed library errors become one line and exit code 2 (moegraft.cli.clean_errors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from moegraft.train.cli import interrupted
from moegraft.train.options import (
    FIXED_LR_HELP,
    LAYERWISE_FLAGS,
    Flag,
    Overwrite,
    Quiet,
    Resume,
    training_options,
)


@training_options(
    # LoRA factors train, not pathways; the selection bias is no LoRA factor; the run logs to metrics.jsonl only
    drop=("trainable", "bias_rate", "tensorboard", *LAYERWISE_FLAGS),
    flags={
        "data": Flag(help=".jsonl (text or chat messages), .txt/folder, .parquet, a dataset, stdlib:train"),
        "loss_mask": Flag(
            "assistant",
            help="assistant: chat loss only on assistant tokens",
            type=Literal["assistant", "all"],
        ),
        "lr": Flag(1e-3, help=FIXED_LR_HELP),
        "balance": Flag(help="with the router stage: aux or none (without it: none)"),
        "distill": Flag(
            None,
            help="dense teacher for a KL term (e.g. a LoRA recovery of a carve, with --ce-weight 0); default none",
        ),
        "seed": Flag(help="seed for data order and LoRA initialisation"),
    },
)
def finetune_command(
    model: Annotated[
        Path, typer.Argument(help="a MoE checkpoint (convert, train, or finetune --merge output)")
    ],
    out: Annotated[Path, typer.Argument(help="run directory: spec, metrics, checkpoints/, model/ (adapter)")],
    stage: Annotated[
        str, typer.Option(help="pathways to adapt: dense, experts, router, attention (comma-separated)")
    ],
    rank: Annotated[int, typer.Option(help="LoRA rank (per expert for the experts stage)")] = 16,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scale alpha/rank)")] = 32.0,
    dropout: Annotated[float, typer.Option(help="LoRA dropout on nn.Linear targets")] = 0.05,
    experts_select: Annotated[
        str, typer.Option(help="all, top-used:N (routing on --data), top-used:N@report.json, or ids 0,3,5")
    ] = "all",
    merge: Annotated[
        bool, typer.Option("--merge", help="also write OUT/merged, a native checkpoint")
    ] = False,
    *,
    resume: Resume = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    **train,
) -> None:
    """LoRA-fine-tune chosen pathways (dense first, then experts, then router) of a MoE checkpoint."""
    from moegraft.finetune.recipe import FinetuneSpec, finetune

    console = Console(stderr=True)
    try:
        spec = FinetuneSpec.build(
            stages=stage,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            experts_select=experts_select,
            merge=merge,
            **train,
        )
        result = finetune(model, out, spec, progress=not quiet, resume=resume, overwrite=overwrite)
    except KeyboardInterrupt as e:  # library errors become one line in moegraft.cli.clean_errors
        raise interrupted(e, console) from None
    t = result.train
    typer.echo(
        f"fine-tuned {','.join(spec.stages)} for {t.steps} steps ({t.tokens:,} tokens, {t.trainable_params:,} LoRA "
        f"parameters) in {t.seconds:.0f}s; held-out perplexity {t.eval_ppl:.3f}; adapter in {result.adapter_dir}"
        + (f"; merged model in {result.merged_dir}" if result.merged_dir else "")
    )
