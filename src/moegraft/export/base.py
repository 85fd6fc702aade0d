"""The interface of one GGUF export target, and the streamed export-ready copy every target writes.

In: a moegraft MoE checkpoint (a `Source`). Out: a directory holding the same function in the form
llama.cpp's converter and runtime read exactly (or a one-line reason why no such form exists).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from moegraft.errors import MoegraftError
from moegraft.formats.base import OutTensor
from moegraft.io.source import Source
from moegraft.io.writer import ShardedWriter, TensorSpec, parse_size


class ExportError(MoegraftError):
    """The model cannot be exported so that llama.cpp computes what transformers computes."""


class GGUFTarget(ABC):
    """One MoE architecture as llama.cpp reads it: what it refuses, and how the copy is made exact."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.json model_type values this target reads
    converter_flags: ClassVar[tuple[str, ...]] = ()  # extra flags for llama.cpp's convert_hf_to_gguf.py

    def __init__(self, source: Source):
        self.source = source
        self.config = source.config
        self.changes: list[str] = []  # what the export-ready copy changed, for the user to read

    @classmethod
    def supports(cls, config: dict) -> bool:
        return config.get("model_type") in cls.model_types

    @abstractmethod
    def refusal(self) -> str | None:
        """None if llama.cpp can compute this model's function exactly, else why not (one line)."""

    def ready_config(self) -> dict:
        """config.json of the export-ready copy (default: unchanged)."""
        return dict(self.config)

    def converter_hparams(self, ready: Path) -> dict | None:
        """The hparams llama.cpp's converter reads for the export-ready copy at `ready`, when its own reading
        of config.json (through transformers' AutoConfig) misses a field it needs; None: let it read them."""
        return None

    def finish_ready(self, out_dir: Path) -> None:
        """Write what the export-ready copy needs beside its tensors and config (default: nothing)."""
        return None

    def ready_tensors(self) -> list[OutTensor]:
        """Tensors of the export-ready copy, in order (default: every source tensor unchanged)."""
        return [self.copy(n) for n in self.source.tensor_names()]

    def copy(self, name: str, new_name: str | None = None, scale: float | None = None) -> OutTensor:
        """The source tensor `name`, unchanged or multiplied by `scale`, written as `new_name`."""
        src, shape, dtype = self.source, self.source.shape(name), self.source.dtype(name)

        def make():
            t = src.get(name)
            return t if scale is None else (t.float() * scale).to(dtype)

        return OutTensor(TensorSpec(new_name or name, shape, dtype), make)


def write_ready_copy(target: GGUFTarget, out_dir: Path, outputs: list[OutTensor] | None = None) -> None:
    """Stream the export-ready copy (`outputs`, default `target.ready_tensors()`, which records the target's
    changes: call it once) into `out_dir`, one tensor in memory at a time."""
    outputs = target.ready_tensors() if outputs is None else outputs
    names = [o.spec.name for o in outputs]
    if len(set(names)) != len(names):
        raise RuntimeError(f"{target.name}: export-ready copy plans a tensor twice")
    writer = ShardedWriter(out_dir, [o.spec for o in outputs], parse_size("2GB"))
    for o in outputs:
        writer.write(o.spec.name, o.make())
    writer.finish()
    target.source.copy_aux(out_dir)
    (out_dir / "config.json").write_text(json.dumps(target.ready_config(), indent=2) + "\n")
    target.finish_ready(out_dir)
