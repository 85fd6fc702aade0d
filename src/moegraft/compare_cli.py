"""`moegraft compare`: a thin shell that builds one TrainSpec from the flags, calls `compare`, prints the table.

In: command-line flags from CompareOptions and TrainSpec (the training ones are `moegraft train`'s). Out: OUT with both
runs and compare.json/.md/.png; typed library errors become one line and exit code 2 (moegraft.cli.clean_errors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from moegraft.options import Fields, Flag, build, spec_options
from moegraft.train.cli import training_fields
from moegraft.train.spec import FIXED_LR_HELP, LAYERWISE_FLAGS, RunOptions, TrainSpec


class CompareOptions(BaseModel):
    """What `compare` adds to the training run both sides share: the LoRA's rate, the forgetting text, reports."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    retain_data: str = Field(
        "stdlib:heldout", description="other text scored for all three models: shows forgetting"
    )
    lora_lr: float = Field(1e-3, description="peak learning rate of the dense LoRA")
    report: Path | None = Field(
        None, description="also write each model's eval report (and the comparison) here"
    )


@spec_options(
    Fields(CompareOptions, ("retain_data", "lora_lr")),
    training_fields(
        drop=("ce_weight", *LAYERWISE_FLAGS),  # CE: its weight follows from the checkpoint (for_checkpoint)
        flags={
            "lr": Flag(1e-3, help=FIXED_LR_HELP),
            "trainable": Flag("router,experts"),
            "distill": Flag(None),
        },
    ),
    Fields(CompareOptions, ("report",)),
    Fields(RunOptions, ("overwrite", "quiet")),
)
def compare_command(
    dense: Annotated[
        str, typer.Argument(help="the dense model MOE_DIR came from: HF directory or .gguf file")
    ],
    moe_dir: Annotated[Path, typer.Argument(help="its `moegraft convert` output")],
    out: Annotated[
        Path, typer.Argument(help="output: graft/ and lora/ runs, compare.json, compare.md, compare.png")
    ],
    **opts,
) -> None:
    """Graft vs a dense LoRA of the same trainable size: same data, tokens and block order; then both scored."""
    from moegraft.compare import compare

    spec = build(TrainSpec, opts)
    c, r = build(CompareOptions, opts), build(RunOptions, opts)
    # KeyboardInterrupt and library errors become one line in moegraft.cli.clean_errors; OUT is left unwritten
    result = compare(
        dense,
        moe_dir,
        out,
        spec,
        lora_lr=c.lora_lr,
        retain_data=c.retain_data,
        report_dir=c.report,
        progress=not r.quiet,
        overwrite=r.overwrite,
    )
    console = Console()
    result.render(console)
    console.print(
        f"wrote {out / 'compare.json'}, compare.md, compare.png (runs in {out / 'graft'} and {out / 'lora'})"
        + (f"; eval reports in {c.report}" if c.report is not None else ""),
        highlight=False,
    )
