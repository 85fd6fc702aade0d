"""The training flags, declared once from TrainSpec and shared by `train`, `finetune` and `compare` (and so by
`accelerate launch -m moegraft.cli ...`, which runs the same commands).

In: TrainSpec's fields (type, default, and a description that is the flag's help line). Out: `training_options`,
a decorator that adds them to a command's signature; the command receives them as `**train` for TrainSpec.build.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from moegraft.train.spec import TrainSpec

# The TrainSpec fields a training command offers, in --help order. The others (eval_fraction, eval_blocks,
# min_lr_ratio, warmup_steps, weight_decay, max_grad_norm, distill_chunk) are for library callers.
TRAIN_FLAGS = (
    "data",
    "eval_data",
    "tokens",
    "steps",
    "seq_len",
    "batch",
    "grad_accum",
    "lr",
    "trainable",
    "balance",
    "aux_coef",
    "z_coef",
    "bias_rate",
    "loss_mask",
    "distill",
    "distill_weight",
    "ce_weight",
    "layerwise_epochs",
    "layerwise_lr",
    "layerwise_tokens",
    "save_every",
    "eval_every",
    "log_every",
    "seed",
    "device",
    "precision",
    "gradient_checkpointing",
    "tensorboard",
    "peak_tflops",
)
# The layer-wise phase is `train`'s recovery of a carve: commands that train adapters drop its flags.
LAYERWISE_FLAGS = ("layerwise_epochs", "layerwise_lr", "layerwise_tokens")
# On the command line the text is always named: the embedded stdlib text is the library's default, not a run's.
REQUIRED = frozenset({"data"})
# A list on the command line is one comma-separated string (TrainSpec.build splits it).
CLI_TYPES: dict[str, Any] = {"trainable": str | None}
# The help line of a fixed learning rate (finetune, compare): TrainSpec's says how 'auto' picks one.
FIXED_LR_HELP = "peak learning rate (warmup, then cosine)"

_SPEC_DEFAULT = object()

# Options of the commands themselves, beside the training flags.
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace an existing OUT")]
Resume = Annotated[bool, typer.Option("--resume", help="continue from the latest checkpoint in OUT")]
Quiet = Annotated[bool, typer.Option("--quiet", help="no progress bar")]


@dataclass(frozen=True)
class Flag:
    """A command's own take on one training flag: another default, help line, or type (e.g. choice order)."""

    default: Any = _SPEC_DEFAULT
    help: str | None = None
    type: Any = None


def _parameter(name: str, flag: Flag) -> inspect.Parameter:
    field = TrainSpec.model_fields[name]
    kind = flag.type or CLI_TYPES.get(name, field.annotation)
    decls = (f"--{name.replace('_', '-')}",) if kind is bool else ()  # a switch: --x, without --no-x
    option = typer.Option(*decls, help=flag.help or field.description)
    if flag.default is not _SPEC_DEFAULT:
        default = flag.default
    else:
        default = inspect.Parameter.empty if name in REQUIRED else field.default
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
    )


def training_options(
    *, drop: tuple[str, ...] = (), flags: dict[str, Flag] | None = None
) -> Callable[[Callable], Callable]:
    """Add the training flags (TRAIN_FLAGS less `drop`) to a typer command that takes `**train`.

    The command's own parameters stay where they are: positional and ordinary ones before the training flags,
    keyword-only ones (after `*`) after them. typer reads the signature this sets.

    Args:
        drop: training flags this command does not offer.
        flags: per-flag changes of default, help or type for this command.
    """
    flags = flags or {}
    unknown = set(flags) - set(TRAIN_FLAGS)
    if unknown:  # a typo here would silently leave the flag as TrainSpec has it
        raise ValueError(f"not a training flag: {', '.join(sorted(unknown))}")

    def decorate(command: Callable) -> Callable:
        # evaluated annotations: typer does not resolve the strings of a signature set by hand
        sig = inspect.signature(command, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        added = [_parameter(n, flags.get(n, Flag())) for n in TRAIN_FLAGS if n not in drop]
        params = [
            *(p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY),
            *added,
            *(p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY),
        ]
        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
