"""Every command's options come from its spec (moegraft.options), and every format name has its format class."""

from __future__ import annotations

import inspect
from typing import get_args

import pytest
import typer
from typer.main import get_command

from moegraft.cli import app
from moegraft.config import FormatName
from moegraft.options import options_of

# every command: its options all come from specs
FROM_SPECS = ("plan", "convert", "demo", "train", "finetune", "compare", "eval", "bench", "export", "parity")


def _callback(name: str):
    (info,) = [c for c in app.registered_commands if (c.name or c.callback.__name__) == name]
    return inspect.unwrap(info.callback)


@pytest.mark.parametrize("name", FROM_SPECS)
def test_every_option_of_a_command_is_a_field_of_its_spec(name):
    callback = _callback(name)
    sources = options_of(callback)
    assert sources, f"{name}: no options made by moegraft.options.spec_options"
    for option, spec in sources.items():
        assert option in spec.model_fields, (name, option, spec.__name__)
        assert spec.model_fields[option].description, (
            f"{name}: --{option} has no help line in {spec.__name__}"
        )
    params = inspect.signature(callback).parameters.values()
    arguments = {p.name for p in params if isinstance(get_args(p.annotation)[1], typer.models.ArgumentInfo)}
    cli = get_command(app).commands[name]
    assert {p.name for p in cli.params} == set(sources) | arguments


def test_finetune_options_keep_finetune_spec_defaults():
    from moegraft.finetune.cli import FinetuneOptions
    from moegraft.finetune.recipe import FinetuneSpec

    for name, field in FinetuneOptions.model_fields.items():
        if not field.is_required():
            assert FinetuneSpec.model_fields[name].default == field.default, name


def test_every_format_name_has_a_format_class_and_back():
    from moegraft.formats import BY_NAME, FORMATS

    names = set(get_args(FormatName)) - {"auto"}
    assert names == {f.name for f in FORMATS} == set(BY_NAME)


def test_a_tuple_field_is_one_comma_separated_option_and_back():
    from moegraft.eval.spec import BenchSpec
    from moegraft.options import build, cli_type

    assert cli_type(BenchSpec.model_fields["batch_sizes"].annotation) is str
    assert build(BenchSpec, {"batch_sizes": "1, 2", "experts_impls": "eager"}).batch_sizes == (1, 2)
    assert build(BenchSpec, {"experts_impls": "eager,grouped_mm"}).experts_impls == ("eager", "grouped_mm")


def test_every_command_is_made_from_specs():
    assert set(get_command(app).commands) == set(FROM_SPECS)
