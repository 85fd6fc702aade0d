"""`moegraft train`: a thin shell that builds a TrainSpec from the flags, calls `train`, prints one summary.

In: command-line flags, made from TrainSpec and RunOptions by moegraft.options. Out: the trained run in
OUT; typed library errors become one line and exit code 2 (moegraft.cli.clean_errors), a stop signal its own code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moegraft.options import Fields, Flag, build, spec_options
from moegraft.train.spec import TRAIN_FLAGS, RunOptions, TrainSpec


def training_fields(drop: tuple[str, ...] = (), flags: dict[str, Flag] | None = None) -> Fields:
    """The training flags (TrainSpec's TRAIN_FLAGS less `drop`), shared by `train`, `finetune` and `compare`.

    On the command line the text is always named: the embedded stdlib text is the library's default, not a run's.
    """
    names = tuple(n for n in TRAIN_FLAGS if n not in drop)
    return Fields(TrainSpec, names, flags=flags or {}, required=frozenset({"data"}))


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


@spec_options(training_fields(), Fields(RunOptions))
def train_command(
    moe_dir: Annotated[Path, typer.Argument(help="a MoE checkpoint written by `moegraft convert`")],
    out: Annotated[Path, typer.Argument(help="run directory: spec, metrics, checkpoints/, model/")],
    **opts,
) -> None:
    """Train the grafted router and experts (the dense model frozen), load-balanced, on accelerate.

    A carved checkpoint instead recovers: shared part, experts and router, distilled from its dense source."""
    from moegraft.train.loop import train as run

    console = Console(stderr=True)
    r = build(RunOptions, opts)
    try:
        spec = build(TrainSpec, opts)
        result = run(moe_dir, out, spec, progress=not r.quiet, resume=r.resume, overwrite=r.overwrite)
    except KeyboardInterrupt as e:  # library errors become one line in moegraft.cli.clean_errors
        raise interrupted(e, console) from None
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one line per run, not one per process
        return
    typer.echo(
        f"trained {result.steps} steps ({result.tokens:,} tokens, {result.trainable_params:,} trainable parameters) "
        f"in {result.seconds:.0f}s ({throughput(result)}); held-out perplexity {result.eval_ppl:.3f}; "
        f"model in {result.model_dir}"
    )


def throughput(result) -> str:
    """'12,345 tokens/s, 1.2 GFLOP/token, MFU 35.0%' of a TrainResult (MFU only where the device's peak is known)."""
    parts = [f"{result.tokens_per_s:,.0f} tokens/s"]
    if result.flops_per_token is not None:
        parts.append(f"{result.flops_per_token / 1e9:.3g} GFLOP/token")
    if result.mfu is not None:
        parts.append(f"MFU {100 * result.mfu:.1f}%")
    return ", ".join(parts)
