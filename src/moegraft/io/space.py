"""Free space: checked before a large write, and a full disk at any point turned into one line.

In: a path about to be written and the bytes it needs. Out: nothing, or a DiskFullError naming both.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from moegraft.errors import DiskFullError

# ENOSPC: no space left on the device; EDQUOT: the user's quota is used up. Both mean "free space, then rerun".
_FULL = {errno.ENOSPC, errno.EDQUOT}
# File-system metadata, the config and tokenizer files: a little more than the tensors themselves.
SLACK_BYTES = 4 * 2**20


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes free (for this user) on the file system that holds `path` (or its nearest existing parent)."""
    return shutil.disk_usage(_existing(Path(path))).free


def human(n: float) -> str:
    for div, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def check_free(path: str | Path, need: int) -> None:
    """Raise DiskFullError if writing `need` bytes at `path` cannot fit in the free space."""
    free = free_bytes(path)
    if need + SLACK_BYTES > free:
        raise DiskFullError(
            f"{path}: needs {human(need)} ({need:,} bytes, plus {human(SLACK_BYTES)} of headroom) but only "
            f"{human(free)} are free there; free some space or choose another output path"
        )


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` is the operating system saying the disk (or the quota) is full."""
    return isinstance(e, OSError) and e.errno in _FULL


def disk_full(path: str | Path, need: int | None, e: OSError) -> DiskFullError:
    """The one-line error for a write at `path` that hit a full disk (nothing of it is left behind)."""
    wanted = f"it needs {human(need)} ({need:,} bytes), " if need else ""
    return DiskFullError(
        f"{path}: disk full while writing ({e.strerror or 'no space left'}); {wanted}{human(free_bytes(path))} "
        "free now; nothing half-written was left: free some space or choose another output path"
    )
