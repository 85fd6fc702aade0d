"""The `moegraft export` command: its options are ExportSpec's fields (moegraft.options)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from moegraft.export.spec import WRITE_FIELDS, ExportSpec
from moegraft.options import Fields, build, spec_options

out = Console()


@spec_options(Fields(ExportSpec))
def export_command(
    model: Annotated[
        str,
        typer.Argument(
            help="moegraft MoE directory (Qwen2-MoE, GLM-4.5 MoE, Qwen3.5 MoE, Gemma 4 MoE) or hub id; --dense: its dense source"
        ),
    ],
    out_file: Annotated[Path, typer.Argument(metavar="OUT.gguf", help="GGUF file to write")],
    **opts,
):
    """Write a GGUF (llama.cpp, Ollama, LM Studio) that computes what transformers computes, or refuse."""
    from moegraft.export import export_gguf

    spec = build(ExportSpec, opts)
    r = export_gguf(model, out_file, **spec.model_dump(include=set(WRITE_FIELDS)))
    as_json = spec.as_json
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
    if spec.check:
        from moegraft.export.check import check_gguf

        res = check_gguf(model, r.out, n_tokens=spec.tokens)
        report["check"] = res.to_json()
        if not as_json:
            out.print(f"check vs transformers (fp32, f32 KV cache): {res.summary()}")
    if spec.check_data is not None:  # implies --check's perplexity part
        from moegraft.export.check import check_perplexity

        ppl = check_perplexity(
            model, r.out, spec.check_data, max_tokens=spec.check_tokens, seq_len=spec.seq_len
        )
        report["perplexity"] = ppl.to_json()
        if not as_json:
            out.print(f"perplexity: {ppl.summary()}")
    if as_json:
        print(json.dumps(report, indent=2))
