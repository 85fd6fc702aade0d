"""`moegraft finetune`: the command's signature is its CLI; it builds a FinetuneSpec, calls `finetune`, prints.

In: command-line flags. Out: the adapter (and merged model) in OUT; typed library errors become one line, exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from moegraft.train.cli import (
    AuxCoef,
    BalanceName,
    Batch,
    CeWeight,
    Device,
    DistillWeight,
    EvalData,
    EvalEvery,
    GradAccum,
    GradientCheckpointing,
    LogEvery,
    Lr,
    Overwrite,
    Precision,
    Quiet,
    SaveEvery,
    SeqLen,
    Steps,
    Tokens,
    ZCoef,
    interrupted,
)


def finetune_command(
    model: Annotated[
        Path, typer.Argument(help="a MoE checkpoint (convert, train, or finetune --merge output)")
    ],
    out: Annotated[Path, typer.Argument(help="run directory: spec, metrics, checkpoints/, model/ (adapter)")],
    data: Annotated[
        str,
        typer.Option(help=".jsonl (text or chat messages), .txt/folder, .parquet, a dataset, stdlib:train"),
    ],
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
    loss_mask: Annotated[
        Literal["assistant", "all"], typer.Option(help="assistant: chat loss only on assistant tokens")
    ] = "assistant",
    eval_data: EvalData = None,
    tokens: Tokens = None,
    steps: Steps = None,
    seq_len: SeqLen = 256,
    batch: Batch = 4,
    grad_accum: GradAccum = 1,
    lr: Lr = 1e-3,
    balance: Annotated[
        BalanceName, typer.Option(help="with the router stage: aux or none (without it: none)")
    ] = "aux",
    aux_coef: AuxCoef = 0.01,
    z_coef: ZCoef = 0.001,
    distill: Annotated[
        str | None,
        typer.Option(
            help="dense teacher for a KL term (e.g. a LoRA recovery of a carve, with --ce-weight 0); default none"
        ),
    ] = None,
    distill_weight: DistillWeight = 1.0,
    ce_weight: CeWeight = None,
    save_every: SaveEvery = 0,
    eval_every: EvalEvery = 0,
    log_every: LogEvery = 10,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the latest checkpoint in OUT")
    ] = False,
    overwrite: Overwrite = False,
    seed: Annotated[int, typer.Option(help="seed for data order and LoRA initialisation")] = 0,
    device: Device = "auto",
    precision: Precision = "auto",
    gradient_checkpointing: GradientCheckpointing = False,
    quiet: Quiet = False,
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
            data=data,
            eval_data=eval_data,
            loss_mask=loss_mask,
            tokens=tokens,
            steps=steps,
            seq_len=seq_len,
            batch=batch,
            grad_accum=grad_accum,
            lr=lr,
            balance=balance,
            aux_coef=aux_coef,
            z_coef=z_coef,
            distill=distill,
            distill_weight=distill_weight,
            ce_weight=ce_weight,
            save_every=save_every,
            eval_every=eval_every,
            log_every=log_every,
            seed=seed,
            device=device,
            precision=precision,
            gradient_checkpointing=gradient_checkpointing,
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
