"""`moegraft eval` and `moegraft bench`: thin typer commands over moegraft.eval.evaluate / bench.

In: command-line options. Out: a summary (and report directory / JSON file) on stdout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from moegraft.errors import MoegraftError

out = Console()


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise MoegraftError(f"{what} {text!r}: give comma-separated integers, e.g. 1,4,16") from None
    if not vals:
        raise MoegraftError(f"{what} is empty")
    return vals


def eval_command(
    model: Annotated[str, typer.Argument(help="MoE (or dense) model: directory, hub id or .gguf file")],
    baseline: Annotated[str | None, typer.Option(help="dense model to compare with (same tokenizer)")] = None,
    data: Annotated[
        str, typer.Option(help="stdlib:heldout, a .txt/.jsonl/.parquet file or folder, or a dataset")
    ] = "stdlib:heldout",
    retain_data: Annotated[
        str | None,
        typer.Option(help="a second dataset (other text): perplexity/KL there show forgetting"),
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="evaluate at most this many tokens")] = 8192,
    seq_len: Annotated[int, typer.Option(help="tokens per block")] = 256,
    batch_size: Annotated[int, typer.Option(help="blocks per forward")] = 2,
    report: Annotated[
        Path | None, typer.Option(help="write report.md, report.json and PNG plots here")
    ] = None,
    lm_eval: Annotated[
        str | None,
        typer.Option("--lm-eval", help="lm-eval tasks: names and/or local task .yaml files, comma-separated"),
    ] = None,
    lm_eval_limit: Annotated[
        int | None, typer.Option(help="at most this many documents per lm-eval task")
    ] = None,
    device: Annotated[
        str, typer.Option(help="auto (a CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:1, mps")
    ] = "auto",
    dtype: Annotated[
        Literal["auto", "float32", "bfloat16", "float16"],
        typer.Option(help="weights dtype of model and baseline; auto: bfloat16 on CUDA, float32 on CPU"),
    ] = "auto",
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
):
    """Perplexity, KL to the dense baseline, top-1 agreement and router health per MoE layer."""
    from moegraft.eval.evaluate import evaluate

    r = evaluate(
        model,
        baseline=baseline,
        data=data,
        retain_data=retain_data,
        max_tokens=max_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        report_dir=report,
        lm_eval_tasks=lm_eval,
        lm_eval_limit=lm_eval_limit,
        device=device,
        dtype=dtype,
        progress=progress,
    )
    out.print(r.summary(), highlight=False, markup=False)


def bench_command(
    model: Annotated[str, typer.Argument(help="MoE (or dense) model: directory, hub id or .gguf file")],
    baseline: Annotated[str | None, typer.Option(help="dense model to compare with")] = None,
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,4,16",
    prompt_len: Annotated[int, typer.Option(help="prompt tokens per sequence")] = 128,
    new_tokens: Annotated[int, typer.Option(help="greedy decode steps (EOS ignored)")] = 32,
    dtype: Annotated[
        Literal["auto", "float32", "bfloat16", "float16"],
        typer.Option(help="weights dtype; auto: bfloat16 on CUDA, float32 on CPU"),
    ] = "auto",
    device: Annotated[
        str, typer.Option(help="auto (a CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:1, mps")
    ] = "auto",
    experts_impls: Annotated[
        str | None,
        typer.Option(
            "--experts-impls",
            help="comma-separated experts implementations: moegraft, eager, grouped_mm, batched_mm (default: all)",
        ),
    ] = None,
    reps: Annotated[int, typer.Option(help="timed repetitions (median reported)")] = 3,
    warmup: Annotated[int, typer.Option(help="untimed warm-up runs")] = 1,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="also write the result as JSON here")
    ] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
):
    """Prefill / decode tokens/s and peak memory, model vs baseline, per experts implementation and batch size."""
    from moegraft.eval.bench import bench

    impls = tuple(x.strip() for x in experts_impls.split(",") if x.strip()) if experts_impls else None
    r = bench(
        model,
        baseline=baseline,
        batch_sizes=_ints(batch_sizes, "--batch-sizes"),
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        dtype=dtype,
        device=device,
        experts_impls=impls,
        reps=reps,
        warmup=warmup,
        progress=progress,
    )
    r.render(out)
    if json_path is not None:
        from moegraft.io.atomic import write_text_atomic

        write_text_atomic(json_path, json.dumps(r.to_json(), indent=2) + "\n")
        out.print(f"wrote {json_path}")
