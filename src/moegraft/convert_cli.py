"""`moegraft convert`: a thin shell that builds a GraftSpec from the flags, calls `convert`, prints one line.

In: command-line flags, made from GraftSpec and ConvertRun by moegraft.options. Out: the MoE checkpoint in OUT;
typed library errors become one line and exit code 2 (moegraft.cli.clean_errors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from moegraft.config import ConvertRun, GraftSpec
from moegraft.errors import MoegraftError
from moegraft.options import Fields, Flag, build, spec_options

_SIZE = GraftSpec.model_fields["expert_size"]
GRAFT_FLAGS = (
    "num_experts",
    "top_k",
    "expert_size",
    "layers",
    "init",
    "router_init",
    "router_entropy",
    "shared_size",
    "calib_data",
    "calib_tokenizer",
    "calib_tokens",
    "split",
    "carve_fit",
    "format",
    "dtype",
    "seed",
    "noise",
    "norm_topk_prob",
    "llama_cpp",
)


@spec_options(
    # carve derives the expert size, so the command line leaves it unset unless the user names it
    Fields(
        GraftSpec,
        GRAFT_FLAGS,
        flags={"expert_size": Flag(None, help=f"{_SIZE.description} (default {_SIZE.default})")},
    ),
    Fields(ConvertRun),
)
def convert_command(
    src: Annotated[str, typer.Argument(help="dense model: directory, hub id, or .gguf file")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="output directory (must not exist)")],
    **opts,
) -> None:
    """Build a native MoE checkpoint that computes the dense model's function until trained."""
    from moegraft.convert import convert as run
    from moegraft.malloc import fix_mmap_threshold

    fix_mmap_threshold()  # the layer-by-layer calibration's peak memory stays flat in the model's depth
    if opts["init"] == "carve" and opts["expert_size"] is not None:
        raise MoegraftError("--init carve derives the expert size as (I - S) / E; drop --expert-size")
    if opts["expert_size"] is None:
        opts["expert_size"] = _SIZE.default
    spec = build(GraftSpec, opts)
    c = build(ConvertRun, opts)
    r = run(src, out_dir, spec, **c.model_dump())
    Console().print(
        f"wrote {r.out} ({r.format}, {len(r.moe_layers)} MoE layers, {r.tensors} tensors, "
        f"{r.bytes_written / 1e6:,.1f} MB) in {r.seconds:.1f} s"
    )
