"""`moegraft compare`: the command's signature is its CLI; it builds one TrainSpec, calls `compare`, prints the table.

In: command-line flags (the training ones are `moegraft train`'s own definitions). Out: OUT with both runs and
compare.json/.md/.png; typed library errors become one line and exit code 2 (moegraft.cli.clean_errors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moegraft.train.cli import (
    AuxCoef,
    Balance,
    Batch,
    BiasRate,
    Data,
    Device,
    Distill,
    DistillWeight,
    EvalData,
    EvalEvery,
    GradAccum,
    GradientCheckpointing,
    LogEvery,
    LossMask,
    Lr,
    Overwrite,
    Precision,
    Quiet,
    SaveEvery,
    Seed,
    SeqLen,
    Steps,
    Tensorboard,
    Tokens,
    Trainable,
    ZCoef,
    spec_from_options,
)


def compare_command(
    dense: Annotated[
        str, typer.Argument(help="the dense model MOE_DIR came from: HF directory or .gguf file")
    ],
    moe_dir: Annotated[Path, typer.Argument(help="its `moegraft convert` output")],
    out: Annotated[
        Path, typer.Argument(help="output: graft/ and lora/ runs, compare.json, compare.md, compare.png")
    ],
    data: Data,
    eval_data: EvalData = None,
    retain_data: Annotated[
        str, typer.Option(help="other text scored for all three models: shows forgetting")
    ] = "stdlib:heldout",
    tokens: Tokens = None,
    steps: Steps = None,
    seq_len: SeqLen = 256,
    batch: Batch = 4,
    grad_accum: GradAccum = 1,
    lr: Lr = 1e-3,
    lora_lr: Annotated[float, typer.Option(help="peak learning rate of the dense LoRA")] = 1e-3,
    trainable: Trainable = "router,experts",
    balance: Balance = "aux",
    aux_coef: AuxCoef = 0.01,
    z_coef: ZCoef = 0.001,
    bias_rate: BiasRate = 0.001,
    loss_mask: LossMask = "all",
    distill: Distill = None,
    distill_weight: DistillWeight = 1.0,
    save_every: SaveEvery = 0,
    eval_every: EvalEvery = 0,
    log_every: LogEvery = 10,
    overwrite: Overwrite = False,
    seed: Seed = 0,
    device: Device = "auto",
    precision: Precision = "auto",
    gradient_checkpointing: GradientCheckpointing = False,
    tensorboard: Tensorboard = False,
    report: Annotated[
        Path | None, typer.Option(help="also write each model's eval report (and the comparison) here")
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Graft vs a dense LoRA of the same trainable size: same data, tokens and block order; then both scored."""
    from moegraft.compare import compare

    spec = spec_from_options(locals())
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
