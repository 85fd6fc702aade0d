"""Every command's options, made from its spec: each choice, default and help line is declared once, on a field.

In: frozen pydantic specs (a field's type and Literal choices, its default, its description as the help line, and
`flag_names` for a name or short alias other than `--field-name`). Out: `spec_options`, a decorator that adds the
chosen fields to a typer command's signature; the command receives them as `**opts`, keyed by field name.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel

from moegraft.config import build_spec

SPEC_OPTIONS = "__spec_options__"  # the attribute that records, per option, the spec it came from
_SPEC_DEFAULT = object()
Spec = TypeVar("Spec", bound=BaseModel)


@dataclass(frozen=True)
class Flag:
    """A command's own take on one field: another default, help line or type (e.g. a narrower Literal)."""

    default: Any = _SPEC_DEFAULT
    help: str | None = None
    type: Any = None


@dataclass(frozen=True)
class Fields:
    """The fields of `spec` a command offers as options, in --help order.

    Args:
        spec: a pydantic model whose fields carry the defaults, choices and help lines.
        names: the fields offered, in order (default: all of them, in declaration order).
        flags: per-field changes of default, help or type for this command.
        required: fields the command line must name although the spec has a default.
    """

    spec: type[BaseModel]
    names: tuple[str, ...] | None = None
    flags: dict[str, Flag] = field(default_factory=dict)
    required: frozenset[str] = frozenset()

    def offered(self) -> tuple[str, ...]:
        names = tuple(self.spec.model_fields) if self.names is None else self.names
        unknown = (set(names) | set(self.flags) | set(self.required)) - set(self.spec.model_fields)
        if unknown:  # a typo here would silently leave the flag as the spec has it, or drop it
            raise ValueError(f"not a field of {self.spec.__name__}: {', '.join(sorted(unknown))}")
        stray = set(self.flags) - set(names)
        if stray:
            raise ValueError(
                f"{self.spec.__name__}: changes for fields not offered: {', '.join(sorted(stray))}"
            )
        return names


def _is_tuple(t: Any) -> bool:
    return get_origin(t) is tuple


def cli_type(t: Any) -> Any:
    """The type typer parses for a field of type `t`: a tuple is one comma-separated string (the spec splits it)."""
    if _is_tuple(t):
        return str
    if get_origin(t) in (Union, types.UnionType) and any(_is_tuple(a) for a in get_args(t)):
        return str | None if type(None) in get_args(t) else str
    return t


def _cli_default(value: Any) -> Any:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else value


def _parameter(spec: type[BaseModel], name: str, flag: Flag, required: bool) -> inspect.Parameter:
    info = spec.model_fields[name]
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if flag.default is not _SPEC_DEFAULT:
        default = flag.default
    elif required or info.is_required():
        default = inspect.Parameter.empty
    else:
        default = _cli_default(info.default)
    kind = flag.type or cli_type(info.annotation)
    if default is None and flag.type is None and type(None) not in get_args(kind):
        kind = kind | None  # the command's default is 'not given', the spec's a value
    option = typer.Option(*extra.get("flags", ()), help=flag.help or info.description)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
    )


def spec_options(*groups: Fields) -> Callable[[Callable], Callable]:
    """Add the fields of `groups`, in order, as options to a typer command that takes `**opts`.

    The command's own parameters (its positional arguments) come first; keyword-only ones (after `*`) after the
    options. typer reads the signature this sets; `options_of(command)` says which spec each option came from.
    """
    sources: dict[str, type[BaseModel]] = {}
    params: list[inspect.Parameter] = []
    for g in groups:
        for name in g.offered():
            if name in sources:
                raise ValueError(f"option {name!r} comes from {sources[name].__name__} and {g.spec.__name__}")
            sources[name] = g.spec
            params.append(_parameter(g.spec, name, g.flags.get(name, Flag()), name in g.required))

    def decorate(command: Callable) -> Callable:
        # evaluated annotations: typer does not resolve the strings of a signature set by hand
        sig = inspect.signature(command, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        clash = {p.name for p in own} & set(sources)
        if clash:
            raise ValueError(
                f"{command.__name__}: own parameters named like options: {', '.join(sorted(clash))}"
            )
        ordered = [
            *(p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY),
            *params,
            *(p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY),
        ]
        command.__signature__ = sig.replace(parameters=ordered)
        command.__annotations__ = {p.name: p.annotation for p in ordered}
        setattr(command, SPEC_OPTIONS, dict(sources))
        return command

    return decorate


def options_of(command: Callable) -> dict[str, type[BaseModel]]:
    """option (field) name -> the spec it came from, for a command made by `spec_options` (else empty)."""
    return dict(getattr(command, SPEC_OPTIONS, {}))


def take(opts: dict[str, Any], spec: type[BaseModel]) -> dict[str, Any]:
    """The options in `opts` that are fields of `spec`."""
    return {k: v for k, v in opts.items() if k in spec.model_fields}


def build(spec: type[Spec], opts: dict[str, Any]) -> Spec:
    """`spec` from its options in `opts`, by its own `build` where it has one (which may parse command-line text),
    else with pydantic's report turned into one SpecError line."""
    kwargs = take(opts, spec)
    for name, value in kwargs.items():  # a list given as one comma-separated string (cli_type)
        if (
            isinstance(value, str)
            and cli_type(spec.model_fields[name].annotation) is not spec.model_fields[name].annotation
        ):
            kwargs[name] = tuple(v.strip() for v in value.split(",") if v.strip())
    maker = getattr(spec, "build", None)
    return maker(**kwargs) if maker is not None else build_spec(spec, kwargs)
