"""`moegraft plan`: a thin shell that builds an optional GraftSpec and a PlanRun from the flags, prints the plan.

In: command-line flags, made from GraftSpec (the shape of the MoE) and PlanRun (what to count) by moegraft.options.
Out: the cost tables (or JSON) on stdout; typed library errors become one line and exit code 2
(moegraft.cli.clean_errors).
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

import typer
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from moegraft.config import GraftSpec, flag_names
from moegraft.errors import MoegraftError
from moegraft.options import Fields, Flag, build, spec_options


class PlanRun(BaseModel):
    """What `plan` counts beside the model's shape: the KV cache's context and batch, the GPU, training memory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu_memory: float | None = Field(None, description="GB of accelerator memory")
    context: int = Field(4096, description="tokens of context for the KV cache")
    batch: int = Field(1, description="sequences in the KV cache")
    as_json: bool = Field(
        False, description="print JSON instead of tables", json_schema_extra=flag_names("--json")
    )
    train: bool = Field(
        False,
        description="also the training memory per GPU and the FSDP GPU count",
        json_schema_extra=flag_names("--train"),
    )
    trainable: tuple[str, ...] = Field(("router", "experts"), description="--train: pathways that train")
    precision: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="--train: training precision")
    seq_len: int = Field(4096, description="--train: tokens per sequence (--batch sequences per GPU)")


def graft_spec(opts: dict) -> GraftSpec | None:
    """The MoE `plan` counts: none without --experts (dense only); a carve with --shared-size, else a graft.

    Raises:
        MoegraftError: --experts with neither --expert-size nor --shared-size, or with both.
    """
    if opts["num_experts"] is None:
        return None
    if opts["shared_size"] is not None:  # carve: the expert size follows from I, S and E
        if opts["expert_size"] is not None:
            raise MoegraftError(
                "--shared-size (carve) derives the expert size as (I - S) / E; drop --expert-size"
            )
        return build(
            GraftSpec, {**opts, "expert_size": GraftSpec.model_fields["expert_size"].default, "init": "carve"}
        )
    if opts["expert_size"] is None:
        raise MoegraftError(
            "--experts needs --expert-size (graft) or --shared-size (carve: split the dense FFN)"
        )
    return build(GraftSpec, opts)


@spec_options(
    # no --experts: the dense model alone; no default size: a graft names it, a carve derives it
    Fields(
        GraftSpec,
        ("num_experts", "top_k", "expert_size", "shared_size", "layers", "format"),
        flags={
            "num_experts": Flag(None, help="E: routed experts per MoE layer (omit: the dense model alone)"),
            "expert_size": Flag(None),
        },
    ),
    Fields(PlanRun),
)
def plan_command(
    src: Annotated[str, typer.Argument(help="model directory, hub id, .gguf file or config.json")],
    **opts,
) -> None:
    """Parameters, FLOPs/token and memory of the dense model and the MoE it would become (reads config.json only)."""
    from moegraft.io.source import read_config
    from moegraft.plan import plan as make_plan

    spec = graft_spec(opts)
    run = build(PlanRun, opts)
    config = read_config(src)
    report = make_plan(config, spec, context=run.context, batch=run.batch, gpu_memory_gb=run.gpu_memory)
    train_plan = None
    if run.train:
        from moegraft.plan.training import plan_train

        train_plan = plan_train(
            config,
            spec,
            trainable=run.trainable,
            precision=run.precision,
            seq_len=run.seq_len,
            batch=run.batch,
            gpu_memory_gb=run.gpu_memory if run.gpu_memory is not None else 80.0,
        )
    if run.as_json:
        doc = report.to_json()
        if train_plan is not None:
            doc["train"] = train_plan.model_dump(mode="json")
        print(json.dumps(doc, indent=2))
        return
    out = Console()
    report.render(out)
    if train_plan is not None:
        train_plan.render(out)
