"""The `moegraft parity` command: its options are ParitySpec's fields (moegraft.options)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moegraft.options import Fields, build, spec_options
from moegraft.serve.spec import ParitySpec

out = Console()


@spec_options(Fields(ParitySpec))
def parity_command(
    model: Annotated[
        Path, typer.Argument(help="checkpoint directory (convert's or train's output, or a dense model)")
    ],
    **opts,
):
    """Run the same real prompts through transformers, vLLM and llama.cpp: greedy tokens and logprobs compared."""
    from moegraft.serve import run_parity

    spec = build(ParitySpec, opts)
    report = run_parity(model, **spec.model_dump(exclude={"as_json"}))
    if spec.as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    out.print(
        f"{report.model} ({report.architecture}): {report.prompts} prompts of {report.prompt_tokens} tokens "
        f"from {report.data}, {report.new_tokens} greedy tokens each, against transformers (fp32)",
        highlight=False,
        soft_wrap=True,
    )
    for row in report.runtimes:
        out.print("  " + row.summary(), highlight=False, markup=False, soft_wrap=True)
