"""The `moegraft parity` command: one function whose signature is its CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

out = Console()


def parity_command(
    model: Annotated[
        Path, typer.Argument(help="checkpoint directory (convert's or train's output, or a dense model)")
    ],
    runtimes: Annotated[
        str,
        typer.Option(help="comma-separated: transformers, vllm, llama.cpp (transformers is the reference)"),
    ] = "transformers,vllm,llama.cpp",
    data: Annotated[
        str, typer.Option(help="text the prompts are cut from (file, folder, stdlib:heldout, ...)")
    ] = ("stdlib:heldout"),
    tokens: Annotated[int, typer.Option(help="greedy tokens generated after each prompt")] = 32,
    prompts: Annotated[int, typer.Option(help="prompts, one per document of --data")] = 4,
    prompt_tokens: Annotated[int, typer.Option(help="tokens per prompt")] = 32,
    vllm_python: Annotated[
        Path | None,
        typer.Option(help="a python that imports vllm (default: the venv scripts/vllm_venv.sh builds)"),
    ] = None,
    vllm_url: Annotated[
        str | None,
        typer.Option(help="a running OpenAI-compatible vLLM server serving MODEL (instead of a python)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
):
    """Run the same real prompts through transformers, vLLM and llama.cpp: greedy tokens and logprobs compared."""
    from moegraft.serve import run_parity

    report = run_parity(
        model,
        runtimes=tuple(r.strip() for r in runtimes.split(",") if r.strip()),
        data=data,
        new_tokens=tokens,
        n_prompts=prompts,
        prompt_tokens=prompt_tokens,
        vllm_python=vllm_python,
        vllm_url=vllm_url,
    )
    if as_json:
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
