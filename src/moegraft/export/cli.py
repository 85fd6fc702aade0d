"""The `moegraft export` command: one function whose signature is its CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

out = Console()


def export_command(
    model: Annotated[str, typer.Argument(help="moegraft MoE directory (Qwen2-MoE or Gemma 4 MoE) or hub id")],
    out_file: Annotated[Path, typer.Argument(metavar="OUT.gguf", help="GGUF file to write")],
    outtype: Annotated[
        Literal["f32", "f16", "bf16", "q8_0"], typer.Option(help="GGUF weight type (f32 is exact)")
    ] = "f32",
    check: Annotated[
        bool, typer.Option("--check", help="run the GGUF in llama.cpp and compare logits with transformers")
    ] = False,
    tokens: Annotated[int, typer.Option(help="--check: tokens of held-out prose to compare")] = 256,
    overwrite: Annotated[bool, typer.Option(help="replace OUT.gguf if it exists")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
):
    """Write a GGUF (llama.cpp, Ollama, LM Studio) that computes what transformers computes, or refuse."""
    from moegraft.export import export_gguf

    r = export_gguf(model, out_file, outtype=outtype, overwrite=overwrite)
    report: dict = {
        "out": str(r.out),
        "target": r.target,
        "outtype": r.outtype,
        "bytes": r.bytes_written,
        "seconds": round(r.seconds, 2),
        "changes": r.changes,
    }
    if not as_json:
        out.print(
            f"wrote {r.out} ({r.target}, {r.outtype}, {r.bytes_written / 1e6:,.1f} MB) in {r.seconds:.1f} s"
        )
        for c in r.changes:
            out.print(f"  export-ready copy: {c}")
    if check:
        from moegraft.export.check import check_gguf

        res = check_gguf(model, r.out, n_tokens=tokens)
        report["check"] = res.to_json()
        if not as_json:
            out.print(f"check vs transformers (fp32, f32 KV cache): {res.summary()}")
    if as_json:
        print(json.dumps(report, indent=2))
