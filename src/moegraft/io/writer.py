"""Streaming safetensors writer: shards are laid out from a plan, then filled tensor by tensor.

In: the ordered list of tensors to write (name, shape, dtype) and, one at a time, their values.
Out: `model.safetensors` or `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`.

The safetensors library can only save tensors it holds all at once; since every output shape is
known before any weight is computed, the header can be written first and each tensor appended as
it is made, so memory holds one tensor, not one shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moegraft.errors import MoegraftError
from moegraft.io.atomic import atomic_output_dir, check_output

__all__ = [
    "SAFETENSORS_DTYPE",
    "ShardedWriter",
    "TensorSpec",
    "atomic_output_dir",
    "check_output",
    "parse_size",
]

SAFETENSORS_DTYPE = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor, known before its value is computed."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def parse_size(size: str | int) -> int:
    """'2GB' / '500MB' / '1GiB' / 123 → bytes."""
    if isinstance(size, int):
        return size
    s = size.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    if s.isdigit():
        return int(s)
    raise MoegraftError(f"size {size!r} not understood; write it like 2GB, 500MB or 1GiB")


class ShardedWriter:
    """Writes tensors, in the planned order, into safetensors shards of at most `max_shard_bytes`."""

    def __init__(
        self, out_dir: Path, plan: list[TensorSpec], max_shard_bytes: int, metadata: dict | None = None
    ):
        self.out_dir = Path(out_dir)
        self.plan = plan
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards: list[list[TensorSpec]] = []
        size = 0
        for t in plan:
            if not self.shards or (size + t.nbytes > max_shard_bytes and self.shards[-1]):
                self.shards.append([])
                size = 0
            self.shards[-1].append(t)
            size += t.nbytes
        n = len(self.shards)
        self.files = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._shard = -1
        self._pos = 0  # index within the current shard
        self._fh = None

    def _open_next(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._shard += 1
        self._pos = 0
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for t in self.shards[self._shard]:
            header[t.name] = {
                "dtype": SAFETENSORS_DTYPE[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces to 8-byte alignment
        self._fh = open(self.out_dir / self.files[self._shard], "wb")  # noqa: SIM115 (closed in _open_next/finish)
        self._fh.write(len(raw).to_bytes(8, "little"))
        self._fh.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor; its name, shape and dtype must match the plan."""
        if self._fh is None or self._pos == len(self.shards[self._shard]):
            self._open_next()
        spec = self.shards[self._shard][self._pos]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(
                f"writer got {name} {tuple(tensor.shape)} {tensor.dtype}, planned {spec.name} {spec.shape} {spec.dtype}"
            )
        # (numel,) uint8 view of the little-endian bytes, written without another copy
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._fh.write(memoryview(data))
        self._pos += 1

    def finish(self) -> None:
        """Close the last shard and write the index (for more than one shard)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        written = sum(len(s) for s in self.shards[: self._shard]) + self._pos
        if written != len(self.plan):
            raise RuntimeError(f"writer finished after {written} of {len(self.plan)} planned tensors")
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for t in self.plan)},
                "weight_map": {t.name: self.files[i] for i, s in enumerate(self.shards) for t in s},
            }
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
