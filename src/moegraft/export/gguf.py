"""`moegraft export`: a MoE checkpoint → export-ready copy → llama.cpp's converter (→ llama.cpp's quantiser) →
one GGUF file.

In: a moegraft MoE directory (or hub id), or with `dense` its dense source. Out: OUT.gguf, renamed into place
only when complete, the changes the export-ready copy made and the tensor types llama.cpp wrote; nothing is
written when llama.cpp would compute another function.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from moegraft.export.base import ExportError, GGUFTarget, write_ready_copy
from moegraft.export.dense import DenseGGUF
from moegraft.export.gemma4 import Gemma4GGUF
from moegraft.export.gemma_moe import GemmaMoeGGUF
from moegraft.export.glm4_moe import Glm4MoeGGUF
from moegraft.export.llama_cpp import run_converter
from moegraft.export.quantize import (
    BITS,
    USES_IMATRIX,
    QuantPlan,
    check_types,
    quantize_gguf,
    substitutions,
    tensor_layout,
    type_summary,
)
from moegraft.export.qwen2_moe import Qwen2MoeGGUF
from moegraft.export.qwen3_5_moe import Qwen3_5MoeGGUF
from moegraft.export.spec import ExpertsType, OutType
from moegraft.io.atomic import check_output, fsync_tree, publish, staging_dir
from moegraft.io.source import Source, open_source

TARGETS: list[type[GGUFTarget]] = [Qwen2MoeGGUF, Gemma4GGUF, Glm4MoeGGUF, Qwen3_5MoeGGUF, GemmaMoeGGUF]


@dataclass(frozen=True)
class ExportResult:
    out: Path
    target: str
    outtype: str
    bytes_written: int
    seconds: float
    changes: list[str] = field(default_factory=list)
    experts_type: str | None = None
    types: dict[str, dict[str, int]] = field(default_factory=dict)  # tensor class -> {type written: count}
    substitutions: list[str] = field(default_factory=list)  # where llama.cpp wrote another type than asked


def pick_target(source: Source, *, dense: bool = False) -> GGUFTarget:
    """The export target for this checkpoint, or ExportError with why llama.cpp cannot run it exactly."""
    mt = source.config.get("model_type")
    for cls in [DenseGGUF] if dense else TARGETS:
        if cls.supports(source.config):
            target = cls(source)
            if why := target.refusal():
                raise ExportError(f"cannot export {source.origin} to GGUF exactly: {why}")
            return target
    if dense:
        raise ExportError(
            f"--dense exports a dense {', '.join(DenseGGUF.model_types)} model; {source.origin} is {mt!r}"
            + (" (a MoE: drop --dense)" if any(c.supports(source.config) for c in TARGETS) else "")
        )
    if DenseGGUF.supports(source.config):
        raise ExportError(f"{source.origin} is a dense {mt} model: export it with --dense")
    raise ExportError(
        f"no GGUF export for model_type {mt!r}: supported are {', '.join(t for c in TARGETS for t in c.model_types)}"
    )


def quant_plan(outtype: OutType, experts_type: ExpertsType | None, imatrix: Path | None) -> QuantPlan | None:
    """What llama.cpp's quantiser is asked for after the converter, or None when the converter writes `outtype`
    itself (no experts type, no imatrix)."""
    if imatrix is not None:
        if experts_type not in USES_IMATRIX:
            raise ExportError(
                "--imatrix: llama.cpp weighs only q4_0 and the k-quants by it (q8_0 and float types ignore it); "
                "add --experts-type q4_0|q4_k|q3_k|q2_k"
            )
        if not Path(imatrix).is_file():
            raise ExportError(f"--imatrix {imatrix}: no such file")
    if experts_type is None:
        return None
    return QuantPlan(rest=outtype, experts=experts_type, imatrix=None if imatrix is None else str(imatrix))


def export_gguf(
    model: str | Path,
    out: str | Path,
    *,
    outtype: OutType = "f32",
    experts_type: ExpertsType | None = None,
    imatrix: str | Path | None = None,
    dense: bool = False,
    overwrite: bool = False,
    keep_ready_copy: Path | None = None,
) -> ExportResult:
    """Write `out` (.gguf) computing what transformers computes from `model`.

    Args:
        model: a moegraft MoE directory or hub id (Qwen2-MoE, GLM-4.5 MoE, Qwen3.5 MoE or Gemma 4 MoE); with
            `dense`, a dense Llama/Mistral/Qwen2 directory, hub id or .gguf (the source a graft was made from).
        out: the GGUF file to write; must not exist unless `overwrite`.
        outtype: GGUF type of every weight but the routed experts; f32 is exact, f16/bf16/q8_0 round.
        experts_type: llama.cpp type of the routed-expert stacks (`ffn_*_exps`), quantised by llama.cpp's own
            quantiser from an f32 conversion; where a row length does not fit the type, llama.cpp substitutes
            another, listed in `substitutions`.
        imatrix: a GGUF importance matrix (`llama-imatrix`) handed to llama.cpp's quantiser.
        keep_ready_copy: also keep the export-ready HF directory here (for debugging).

    Returns:
        What was written, what the export-ready copy changed, and the types llama.cpp wrote.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix != ".gguf":
        raise ExportError(f"{out}: the output must be a .gguf file")
    if dense and experts_type is not None:
        raise ExportError(
            "--experts-type with --dense: a dense model has no routed experts; drop one of them"
        )
    plan = quant_plan(outtype, experts_type, None if imatrix is None else Path(imatrix))
    check_output(out, overwrite)
    source = open_source(str(model))
    try:
        target = pick_target(source, dense=dense)
        # the export-ready copy and the GGUF(s) all sit beside OUT until the GGUF is renamed into place
        outputs = target.ready_tensors()
        numel = sum(math.prod(o.spec.shape) for o in outputs)
        need = sum(o.spec.nbytes for o in outputs) + math.ceil(numel * BITS[outtype] / 8)
        if plan is not None:
            need += numel * 4  # the f32 conversion llama.cpp's quantiser reads
        with staging_dir(out, need=need) as tmp:
            ready = Path(tmp) / "ready"
            ready.mkdir()
            write_ready_copy(target, ready, outputs)
            source.close()
            if keep_ready_copy is not None:
                shutil.copytree(ready, keep_ready_copy, dirs_exist_ok=True)
            hparams = target.converter_hparams(ready)
            part = Path(tmp) / out.name
            log = Path(tmp) / "convert.log"
            try:
                if plan is None:
                    run_converter(
                        ready, part, outtype, log=log, hparams=hparams, flags=target.converter_flags
                    )
                else:
                    f32 = Path(tmp) / "f32.gguf"
                    run_converter(ready, f32, "f32", log=log, hparams=hparams, flags=target.converter_flags)
                    shutil.rmtree(ready)
                    quantize_gguf(f32, part, plan, log=log)
                    f32.unlink()
            except ExportError as e:
                if not log.is_file():  # the converter never ran (e.g. llama.cpp is not installed)
                    raise
                kept = out.parent / f"{out.name}.convert.log"
                shutil.copy(log, kept)
                raise ExportError(f"{e} (full log: {kept})") from None
            types, rows, dims = tensor_layout(part)
            if plan is not None:
                check_types(types, rows, dims, plan)
            fsync_tree(part)
            publish(part, out)  # same filesystem: one atomic rename (replacing OUT with --overwrite)
        return ExportResult(
            out,
            target.name,
            outtype,
            out.stat().st_size,
            time.perf_counter() - t0,
            list(target.changes),
            experts_type=experts_type,
            types=type_summary(types),
            substitutions=[] if plan is None else substitutions(types, rows, plan),
        )
    finally:
        source.close()
