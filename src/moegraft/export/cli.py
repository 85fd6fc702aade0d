"""The `moegraft export` command: one function whose signature is its CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape

out = Console()


def export_command(
    model: Annotated[
        str,
        typer.Argument(
            help="moegraft MoE directory (Qwen2-MoE, GLM-4.5 MoE, Qwen3.5 MoE, Gemma 4 MoE) or hub id; --dense: its dense source"
        ),
    ],
    out_file: Annotated[Path, typer.Argument(metavar="OUT.gguf", help="GGUF file to write")],
    outtype: Annotated[
        Literal["f32", "f16", "bf16", "q8_0"],
        typer.Option(help="GGUF type of every weight but the routed experts (f32 is exact)"),
    ] = "f32",
    experts_type: Annotated[
        Literal["q8_0", "q4_0", "q4_k", "q3_k", "q2_k"] | None,
        typer.Option(
            help="routed experts (ffn_*_exps) quantised to this by llama.cpp's quantiser; rest at --outtype"
        ),
    ] = None,
    imatrix: Annotated[
        Path | None, typer.Option(help="GGUF importance matrix (llama-imatrix) for llama.cpp's quantiser")
    ] = None,
    dense: Annotated[
        bool,
        typer.Option(
            "--dense", help="MODEL is a dense Llama/Mistral/Qwen2 (dir, hub id, .gguf): same converter"
        ),
    ] = False,
    check: Annotated[
        bool, typer.Option("--check", help="run the GGUF in llama.cpp and compare logits with transformers")
    ] = False,
    tokens: Annotated[int, typer.Option(help="--check: tokens of held-out prose to compare")] = 256,
    check_data: Annotated[
        str | None,
        typer.Option(
            help="perplexity in llama.cpp and in transformers on this text (file, folder, stdlib:heldout, ...)"
        ),
    ] = None,
    check_tokens: Annotated[int, typer.Option(help="--check-data: tokens to score")] = 4096,
    seq_len: Annotated[int, typer.Option(help="--check-data: tokens per scored block")] = 256,
    overwrite: Annotated[bool, typer.Option(help="replace OUT.gguf if it exists")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
):
    """Write a GGUF (llama.cpp, Ollama, LM Studio) that computes what transformers computes, or refuse."""
    from moegraft.export import export_gguf

    r = export_gguf(
        model,
        out_file,
        outtype=outtype,
        experts_type=experts_type,
        imatrix=imatrix,
        dense=dense,
        overwrite=overwrite,
    )
    report: dict = {
        "out": str(r.out),
        "target": r.target,
        "outtype": r.outtype,
        "experts_type": r.experts_type,
        "bytes": r.bytes_written,
        "seconds": round(r.seconds, 2),
        "changes": r.changes,
        "types": r.types,
        "substitutions": r.substitutions,
    }
    if not as_json:
        kind = r.outtype if r.experts_type is None else f"experts {r.experts_type}, rest {r.outtype}"
        out.print(f"wrote {r.out} ({r.target}, {kind}, {r.bytes_written / 1e6:,.1f} MB) in {r.seconds:.1f} s")
        for c in r.changes:
            out.print(f"  export-ready copy: {escape(c)}")  # a change may name "[gMASK]"
        out.print(
            "  tensor types written: "
            + "; ".join(
                f"{cls} " + ", ".join(f"{n} {t}" for t, n in by.items()) for cls, by in r.types.items()
            )
        )
        for sub in r.substitutions:
            out.print(f"  [yellow]warning[/]: {sub}")
    if check:
        from moegraft.export.check import check_gguf

        res = check_gguf(model, r.out, n_tokens=tokens)
        report["check"] = res.to_json()
        if not as_json:
            out.print(f"check vs transformers (fp32, f32 KV cache): {res.summary()}")
    if check_data is not None:  # implies --check's perplexity part
        from moegraft.export.check import check_perplexity

        ppl = check_perplexity(model, r.out, check_data, max_tokens=check_tokens, seq_len=seq_len)
        report["perplexity"] = ppl.to_json()
        if not as_json:
            out.print(f"perplexity: {ppl.summary()}")
    if as_json:
        print(json.dumps(report, indent=2))
