"""`moegraft eval` and `moegraft bench`: thin typer commands over moegraft.eval.evaluate / bench.

In: command-line options, made from EvalSpec / BenchSpec (moegraft.options). Out: a summary (and report
directory / JSON file) on stdout.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from moegraft.eval.spec import BenchSpec, EvalSpec
from moegraft.options import Fields, build, spec_options

out = Console()


@spec_options(Fields(EvalSpec))
def eval_command(
    model: Annotated[str, typer.Argument(help="MoE (or dense) model: directory, hub id or .gguf file")],
    **opts,
):
    """Perplexity, KL to the dense baseline, top-1 agreement and router health per MoE layer."""
    from moegraft.eval.evaluate import evaluate

    r = evaluate(model, **build(EvalSpec, opts).model_dump())
    out.print(r.summary(), highlight=False, markup=False)


@spec_options(Fields(BenchSpec))
def bench_command(
    model: Annotated[str, typer.Argument(help="MoE (or dense) model: directory, hub id or .gguf file")],
    **opts,
):
    """Prefill / decode tokens/s and peak memory, model vs baseline, per experts implementation and batch size."""
    from moegraft.eval.bench import bench

    spec = build(BenchSpec, opts)
    r = bench(model, **spec.model_dump(exclude={"json_path"}))
    r.render(out)
    if spec.json_path is not None:
        from moegraft.io.atomic import write_text_atomic

        write_text_atomic(spec.json_path, json.dumps(r.to_json(), indent=2) + "\n")
        out.print(f"wrote {spec.json_path}")
