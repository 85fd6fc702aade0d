"""`moegraft compare`: a thin shell that builds one TrainSpec from the flags, calls `compare`, prints the table.

In: command-line flags (the training ones are `moegraft train`'s, from moegraft.train.options). Out: OUT with both
runs and compare.json/.md/.png; typed library errors become one line and exit code 2 (moegraft.cli.clean_errors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moegraft.train.options import FIXED_LR_HELP, LAYERWISE_FLAGS, Flag, Overwrite, Quiet, training_options


@training_options(
    drop=(
        "ce_weight",
        *LAYERWISE_FLAGS,
    ),  # CE: its weight follows from the checkpoint (TrainSpec.for_checkpoint)
    flags={
        "lr": Flag(1e-3, help=FIXED_LR_HELP),
        "trainable": Flag("router,experts"),
        "distill": Flag(None),
    },
)
def compare_command(
    dense: Annotated[
        str, typer.Argument(help="the dense model MOE_DIR came from: HF directory or .gguf file")
    ],
    moe_dir: Annotated[Path, typer.Argument(help="its `moegraft convert` output")],
    out: Annotated[
        Path, typer.Argument(help="output: graft/ and lora/ runs, compare.json, compare.md, compare.png")
    ],
    retain_data: Annotated[
        str, typer.Option(help="other text scored for all three models: shows forgetting")
    ] = "stdlib:heldout",
    lora_lr: Annotated[float, typer.Option(help="peak learning rate of the dense LoRA")] = 1e-3,
    *,
    report: Annotated[
        Path | None, typer.Option(help="also write each model's eval report (and the comparison) here")
    ] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    **train,
) -> None:
    """Graft vs a dense LoRA of the same trainable size: same data, tokens and block order; then both scored."""
    from moegraft.compare import compare
    from moegraft.train.spec import TrainSpec

    spec = TrainSpec.build(**train)
    # KeyboardInterrupt and library errors become one line in moegraft.cli.clean_errors; OUT is left unwritten
    result = compare(
        dense,
        moe_dir,
        out,
        spec,
        lora_lr=lora_lr,
        retain_data=retain_data,
        report_dir=report,
        progress=not quiet,
        overwrite=overwrite,
    )
    console = Console()
    result.render(console)
    console.print(
        f"wrote {out / 'compare.json'}, compare.md, compare.png (runs in {out / 'graft'} and {out / 'lora'})"
        + (f"; eval reports in {report}" if report is not None else ""),
        highlight=False,
    )
