"""`moegraft export`: a MoE checkpoint → export-ready copy → llama.cpp's converter → one GGUF file.

In: a moegraft MoE directory (or hub id). Out: OUT.gguf, renamed into place only when complete, and the
list of changes the export-ready copy made; nothing is written when llama.cpp would compute another function.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from moegraft.export.base import ExportError, GGUFTarget, write_ready_copy
from moegraft.export.gemma4 import Gemma4GGUF
from moegraft.export.llama_cpp import run_converter
from moegraft.export.qwen2_moe import Qwen2MoeGGUF
from moegraft.io.atomic import check_output, fsync_tree, publish, staging_dir
from moegraft.io.source import Source, open_source

OutType = Literal["f32", "f16", "bf16", "q8_0"]
TARGETS: list[type[GGUFTarget]] = [Qwen2MoeGGUF, Gemma4GGUF]
# bytes per weight of each GGUF type, for the free-space check (q8_0: 32 int8 and one fp16 scale per block)
GGUF_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}


@dataclass(frozen=True)
class ExportResult:
    out: Path
    target: str
    outtype: str
    bytes_written: int
    seconds: float
    changes: list[str] = field(default_factory=list)


def pick_target(source: Source) -> GGUFTarget:
    """The export target for this checkpoint, or ExportError with why llama.cpp cannot run it exactly."""
    mt = source.config.get("model_type")
    for cls in TARGETS:
        if cls.supports(source.config):
            target = cls(source)
            if why := target.refusal():
                raise ExportError(f"cannot export {source.origin} to GGUF exactly: {why}")
            return target
    if mt in ("llama", "mistral", "qwen2", "gemma4_text", "gemma3_text"):
        raise ExportError(
            f"{source.origin} is a dense {mt} model; llama.cpp's own converter exports it directly"
        )
    raise ExportError(
        f"no GGUF export for model_type {mt!r}: supported are {', '.join(t for c in TARGETS for t in c.model_types)}"
    )


def export_gguf(
    model: str | Path,
    out: str | Path,
    *,
    outtype: OutType = "f32",
    overwrite: bool = False,
    keep_ready_copy: Path | None = None,
) -> ExportResult:
    """Write `out` (.gguf) computing what transformers computes from `model`.

    Args:
        model: a moegraft MoE directory or hub id (Qwen2-MoE or Gemma 4 MoE).
        out: the GGUF file to write; must not exist unless `overwrite`.
        outtype: GGUF weight type; f32 is exact, f16/bf16/q8_0 round the weights.
        keep_ready_copy: also keep the export-ready HF directory here (for debugging).

    Returns:
        What was written and what the export-ready copy changed.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix != ".gguf":
        raise ExportError(f"{out}: the output must be a .gguf file")
    check_output(out, overwrite)
    source = open_source(str(model))
    try:
        target = pick_target(source)
        # the export-ready copy and the GGUF both sit beside OUT until the GGUF is renamed into place
        outputs = target.ready_tensors()
        numel = sum(math.prod(o.spec.shape) for o in outputs)
        ready_bytes = sum(o.spec.nbytes for o in outputs)
        with staging_dir(out, need=ready_bytes + math.ceil(numel * GGUF_BYTES[outtype])) as tmp:
            ready = Path(tmp) / "ready"
            ready.mkdir()
            write_ready_copy(target, ready, outputs)
            source.close()
            if keep_ready_copy is not None:
                shutil.copytree(ready, keep_ready_copy, dirs_exist_ok=True)
            part = Path(tmp) / out.name
            log = Path(tmp) / "convert.log"
            try:
                run_converter(ready, part, outtype, log=log)
            except ExportError as e:
                if not log.is_file():  # the converter never ran (e.g. llama.cpp is not installed)
                    raise
                kept = out.parent / f"{out.name}.convert.log"
                shutil.copy(log, kept)
                raise ExportError(f"{e} (full log: {kept})") from None
            fsync_tree(part)
            publish(part, out)  # same filesystem: one atomic rename (replacing OUT with --overwrite)
        return ExportResult(
            out, target.name, outtype, out.stat().st_size, time.perf_counter() - t0, list(target.changes)
        )
    finally:
        source.close()
