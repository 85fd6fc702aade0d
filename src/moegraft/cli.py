"""The `moegraft` command: parse, call one library function, print. The only place that exits.

Every library error (moegraft.errors.MoegraftError) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console
from rich.markup import escape

from moegraft.compare_cli import compare_command
from moegraft.convert_cli import convert_command
from moegraft.demo_cli import demo_command
from moegraft.errors import MoegraftError, missing_package
from moegraft.eval.cli import bench_command, eval_command
from moegraft.export.cli import export_command
from moegraft.finetune.cli import finetune_command
from moegraft.io.space import is_disk_full
from moegraft.plan_cli import plan_command
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


app.command("plan")(clean_errors(plan_command))
app.command("convert")(clean_errors(convert_command))


# -- subcommands: each lives beside its library code and imports torch only when it runs --
for _name, _command in (
    ("demo", demo_command),
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
