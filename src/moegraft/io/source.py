"""Model sources: a local HF directory, a hub id, or a .gguf file, read one tensor at a time.

In: the user's SRC string. Out: a `Source` with the HF config dict, tensor names/shapes, and
tensors loaded on demand (one safetensors shard open at a time).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Protocol

import torch

from moegraft.errors import SourceError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
# A name ending so is a file the user meant, never a hub id or dataset name.
FILE_SUFFIXES = WEIGHT_SUFFIXES + (
    ".json",
    ".jsonl",
    ".txt",
    ".md",
    ".rst",
    ".csv",
    ".tsv",
    ".parquet",
    ".yaml",
)
_HUB_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
# Files that are rewritten for the output (config) or replaced by our own shards (weights).
SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "moegraft.json"}


class Source(Protocol):
    """What conversion needs from a dense checkpoint, without loading it whole."""

    config: dict
    origin: str

    def tensor_names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> torch.Tensor: ...

    def copy_aux(self, out_dir: Path) -> None:
        """Write tokenizer, generation config and other non-weight files to `out_dir`."""
        ...

    def close(self) -> None: ...


class DirSource:
    """A local Hugging Face directory: `model.safetensors` or shards with `model.safetensors.index.json`."""

    def __init__(self, path: str | Path, origin: str | None = None):
        self.path = Path(path)
        self.origin = origin or str(path)
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise SourceError(f"{self.path}: no config.json; point SRC at a Hugging Face model directory")
        try:
            self.config = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise SourceError(f"{cfg}: not valid JSON ({e.msg}); re-download the model") from None
        self._where: dict[str, str] = self._index()
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._span: dict[str, tuple[int, int]] = {}  # name -> absolute (begin, end) byte offsets in its shard
        for shard in sorted(set(self._where.values())) or [None]:
            self._read_header(shard)
        self._open_name: str | None = None
        self._fd: int | None = None

    def _index(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise SourceError(f"{index}: unreadable index ({e}); re-download the model") from None
            missing = sorted({s for s in weight_map.values() if not (self.path / s).is_file()})
            if missing:
                raise SourceError(
                    f"{self.path}: shard {missing[0]} listed in model.safetensors.index.json is missing "
                    f"({len(missing)} missing); re-download the model"
                )
            return dict(weight_map)
        single = self.path / "model.safetensors"
        if single.is_file():
            return {}  # filled by _read_header
        if any(self.path.glob("*.bin")):
            raise SourceError(
                f"{self.path}: only pickle (.bin) weights; moegraft reads safetensors only. Convert them "
                "with `transformers` (save_pretrained(safe_serialization=True)) first"
            )
        raise SourceError(f"{self.path}: no model.safetensors or model.safetensors.index.json found")

    def _read_header(self, shard: str | None) -> None:
        """Parse and check one shard's header with plain file I/O (safetensors' own reader maps the
        whole file, and the mapped pages then count in RSS for as long as the process lives)."""
        shard = shard or "model.safetensors"
        file = self.path / shard
        size = file.stat().st_size

        def bad(why: str) -> SourceError:
            return SourceError(
                f"{file}: corrupt or truncated safetensors header ({why}); re-download this shard"
            )

        with open(file, "rb") as fh:
            raw = fh.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if n < 2 or 8 + n > size:
                raise bad(f"header length {n} does not fit in a {size}-byte file")
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise bad(f"not JSON: {e}") from None
        if not isinstance(header, dict):
            raise bad("not a JSON object")
        data = size - 8 - n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            stored = info.get("dtype") if isinstance(info, dict) else None
            if stored in UNSUPPORTED_DTYPES:
                raise SourceError(
                    f"{file}: tensor {name!r} is stored as {stored} ({UNSUPPORTED_DTYPES[stored]}), which moegraft "
                    "does not convert (it reads F64/F32/F16/BF16 and I8-I64/U8/BOOL); dequantise the checkpoint to "
                    "bf16 or fp32 first"
                )
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise bad(f"entry {name!r} lacks a known dtype, shape or data_offsets") from None
            numel = 1
            for dim in shape:
                numel *= dim
            if not 0 <= begin <= end <= data or end - begin != numel * _ITEMSIZE[dtype]:
                raise bad(f"{name!r} spans bytes {begin}-{end} of {data}")
            self._meta[name] = (shape, dtype)
            self._span[name] = (8 + n + begin, 8 + n + end)
            self._where.setdefault(name, shard)

    def tensor_names(self) -> list[str]:
        return list(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory: RSS then holds this tensor, not the pages of a mapped shard."""
        shard = self._where[name]
        if shard != self._open_name:
            self.close()
            self._fd = os.open(self.path / shard, os.O_RDONLY)  # one shard open at a time
            self._open_name = shard
        shape, dtype = self._meta[name]
        begin, end = self._span[name]
        out = torch.empty(shape, dtype=dtype)
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # (nbytes,) view of `out`
        done = 0
        while done < end - begin:
            got = os.preadv(self._fd, [buf[done:]], begin + done)
            if got <= 0:
                raise SourceError(
                    f"{self.path / shard}: truncated while reading {name}; re-download this shard"
                )
            done += got
        return out

    def copy_aux(self, out_dir: Path) -> None:
        for f in sorted(self.path.iterdir()):
            if f.is_file() and f.name not in SKIP_FILES and not f.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(f, out_dir / f.name)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._open_name = None


_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ITEMSIZE = {dt: torch.empty((), dtype=dt).element_size() for dt in _DTYPES.values()}
# Valid safetensors dtypes that moegraft cannot copy or cast exactly: named in the error, not "corrupt header".
UNSUPPORTED_DTYPES = {
    "F8_E4M3": "8-bit float",
    "F8_E5M2": "8-bit float",
    "F8_E8M0": "8-bit scale",
    "F6_E2M3": "6-bit float",
    "F6_E3M2": "6-bit float",
    "F4": "4-bit float",
    "U16": "unsigned 16-bit integer",
    "U32": "unsigned 32-bit integer",
    "U64": "unsigned 64-bit integer",
    "C64": "complex",
}


def storage_dtype(source: Source) -> torch.dtype:
    """The floating dtype that holds most of the source's weight bytes (float32 if it has no floating tensor)."""
    size: dict[torch.dtype, int] = {}
    for name in source.tensor_names():
        dt = source.dtype(name)
        if dt.is_floating_point:
            size[dt] = size.get(dt, 0) + math.prod(source.shape(name)) * _ITEMSIZE[dt]
    return max(size, key=size.get) if size else torch.float32


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """storage_dtype of a local checkpoint directory (what a trained or merged model is written back in)."""
    source = open_source(str(path))
    try:
        return storage_dtype(source)
    finally:
        source.close()


def hub_name(src: str, what: str, *, single: bool = False) -> str:
    """`src`, which does not exist here, as a hub id, or a SourceError naming it as the local path it must be.

    It is taken for a hub id only if it has the form owner/name (or a bare name, with `single`, as datasets have),
    does not start like a path (./, /, ~), does not end in a file suffix, and its first part is not a directory
    here: a mistyped local path is never sent to the hub.

    Args:
        what: what was looked for locally, for the message ("model directory", "file or folder").
    """
    name = src.strip()
    owner = name.split("/")[0]
    shape = rf"^{_HUB_PART}(/{_HUB_PART})?$" if single else rf"^{_HUB_PART}/{_HUB_PART}$"
    if name.startswith((".", "/", "~")) or name.endswith(FILE_SUFFIXES):
        raise SourceError(f"{src}: no such {what} (a local path, so not tried as a hub id)")
    if "/" in name and Path(owner).is_dir():
        raise SourceError(f"{src}: no such {what} in {owner}/ (a local path, so not tried as a hub id)")
    if not re.match(shape, name):
        form = "name or owner/name" if single else "owner/name"
        raise SourceError(f"{src}: no such {what}, and not a hub id of the form {form}")
    return name


def open_source(src: str, *, trust_remote_code: bool = False) -> Source:
    """Open SRC: a .gguf file, a local directory, or a hub id (resolved through the local cache offline).

    Args:
        src: path or hub id.
        trust_remote_code: forwarded where a config or tokenizer needs custom code; off by default.

    Returns:
        A Source; call `close()` when done.
    """
    p = Path(src).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise SourceError(f"{src}: no such GGUF file")
        from moegraft.io.gguf_source import GGUFSource

        return GGUFSource(p)
    if p.is_dir():
        return DirSource(p)
    if p.exists():
        raise SourceError(f"{src}: not a model directory or .gguf file")
    return DirSource(_snapshot(hub_name(src, "directory")), origin=src)


def _snapshot(repo_id: str) -> Path:
    """Download (or find in the local cache) the safetensors and tokenizer files of a hub model."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise SourceError(
            f"{repo_id}: no such local directory; as a hub id it is not in the local Hugging Face cache and the "
            "hub is unreachable: download it once with `hf download` or pass a local directory"
        ) from None
    except HfHubHTTPError as e:
        raise SourceError(
            f"{repo_id}: no such local directory; as a hub id: hub error ({str(e).splitlines()[0]}); check the id "
            "and your token"
        ) from None


def read_config(src: str) -> dict:
    """config.json of SRC without reading any weight (for `plan`)."""
    p = Path(src).expanduser()
    if p.is_dir():
        p = p / "config.json"
        if not p.is_file():
            raise SourceError(f"{src}: no config.json; point SRC at a Hugging Face model directory")
    if p.suffix == ".gguf":
        source = open_source(src)
        try:
            return source.config
        finally:
            source.close()
    if p.is_file() and p.name.endswith(".json"):
        return json.loads(p.read_text())
    if p.exists():
        raise SourceError(f"{src}: not a model directory, .gguf file or config.json")
    src = hub_name(src, "directory or config.json")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(src, "config.json")).read_text())
    except (LocalEntryNotFoundError, HfHubHTTPError) as e:
        raise SourceError(
            f"{src}: no such local directory; as a hub id: cannot fetch its config.json ({str(e).splitlines()[0]})"
        ) from None
