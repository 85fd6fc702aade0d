"""`moegraft finetune`: a thin shell that builds a FinetuneSpec from the flags, calls `finetune`, prints.

In: command-line flags from FinetuneOptions, TrainSpec (`moegraft train`'s) and RunOptions. Out: the adapter
(and merged model) in OUT; typed library errors become one line and exit code 2 (moegraft.cli.clean_errors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from moegraft.config import flag_names
from moegraft.options import Fields, Flag, build, spec_options, take
from moegraft.train.cli import interrupted, training_fields
from moegraft.train.spec import FIXED_LR_HELP, LAYERWISE_FLAGS, RunOptions, TrainSpec


class FinetuneOptions(BaseModel):
    """The adapter part of a FinetuneSpec as the command line gives it (`--stage` one comma-separated string).

    FinetuneSpec (moegraft.finetune.recipe) imports torch, and `moegraft --help` must not; a test checks that the
    defaults here are FinetuneSpec's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stages: str = Field(
        description="pathways to adapt: dense, experts, router, attention (comma-separated)",
        json_schema_extra=flag_names("--stage"),
    )
    rank: int = Field(16, description="LoRA rank (per expert for the experts stage)")
    alpha: float = Field(32.0, description="LoRA alpha (scale alpha/rank)")
    dropout: float = Field(0.05, description="LoRA dropout on nn.Linear targets")
    experts_select: str = Field(
        "all", description="all, top-used:N (routing on --data), top-used:N@report.json, or ids 0,3,5"
    )
    merge: bool = Field(
        False,
        description="also write OUT/merged, a native checkpoint",
        json_schema_extra=flag_names("--merge"),
    )


@spec_options(
    Fields(FinetuneOptions),
    training_fields(
        # LoRA factors train, not pathways; the selection bias is no LoRA factor; the run logs to metrics.jsonl only
        drop=("trainable", "bias_rate", "tensorboard", *LAYERWISE_FLAGS),
        flags={
            "data": Flag(
                help=".jsonl (text or chat messages), .txt/folder, .parquet, a dataset, stdlib:train"
            ),
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
    ),
    Fields(RunOptions),
)
def finetune_command(
    model: Annotated[
        Path, typer.Argument(help="a MoE checkpoint (convert, train, or finetune --merge output)")
    ],
    out: Annotated[Path, typer.Argument(help="run directory: spec, metrics, checkpoints/, model/ (adapter)")],
    **opts,
) -> None:
    """LoRA-fine-tune chosen pathways (dense first, then experts, then router) of a MoE checkpoint."""
    from moegraft.finetune.recipe import FinetuneSpec, finetune

    console = Console(stderr=True)
    r = build(RunOptions, opts)
    try:
        # the training flags go in as given: FinetuneSpec.build fills in what depends on the stages
        spec = FinetuneSpec.build(**build(FinetuneOptions, opts).model_dump(), **take(opts, TrainSpec))
        result = finetune(model, out, spec, progress=not r.quiet, resume=r.resume, overwrite=r.overwrite)
    except KeyboardInterrupt as e:  # library errors become one line in moegraft.cli.clean_errors
        raise interrupted(e, console) from None
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one line per run, not one per process
        return
    t = result.train
    typer.echo(
        f"fine-tuned {','.join(spec.stages)} for {t.steps} steps ({t.tokens:,} tokens, {t.trainable_params:,} LoRA "
        f"parameters) in {t.seconds:.0f}s; held-out perplexity {t.eval_ppl:.3f}; adapter in {result.adapter_dir}"
        + (f"; merged model in {result.merged_dir}" if result.merged_dir else "")
    )
