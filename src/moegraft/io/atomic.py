"""Outputs that appear whole or not at all: a temporary beside the target, fsynced, then renamed into place.

In: a target path (a directory or a file). Out: the temporary `.NAME.moegraft-tmp-PID` the caller fills; on success
its data and directory entries are fsynced and it is renamed to NAME. With overwrite, an existing NAME is first
renamed aside to `.NAME.moegraft-old-PID` and deleted only once the new one is in place. A process killed before
its rename leaves only such temporaries; the next run for the same target removes them once their owner is dead
(and puts an aside-renamed old output back if the new one never arrived). Nothing else is ever removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moegraft.errors import OutputExistsError
from moegraft.io.space import check_free, disk_full, is_disk_full

TMP_TAG = "moegraft-tmp"  # being written
OLD_TAG = "moegraft-old"  # the output it replaces, moved aside until the new one is in place
OWNER_FILE = ".moegraft-owner"  # inside a temporary directory: pid, start time and host of its writer
_LEFTOVER = re.compile(rf"^\.(?P<name>.+)\.(?P<tag>{TMP_TAG}|{OLD_TAG})-(?P<pid>\d+)$")


def temp_path(target: str | Path, *, tag: str = TMP_TAG, pid: int | None = None) -> Path:
    """The temporary (or moved-aside) path of `target` owned by process `pid` (default: this one)."""
    target = Path(target)
    return target.parent / f".{target.name}.{tag}-{os.getpid() if pid is None else pid}"


def check_output(out: Path, overwrite: bool) -> None:
    """Raise OutputExistsError if `out` exists and may not be replaced (call it before any heavy work).

    What killed runs left for `out` is cleaned first, so an old output that an interrupted overwrite had moved
    aside counts as existing again.
    """
    out = Path(out)
    clean_stale(out.parent, name=out.name)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite or choose another output path")


# -- who owns a temporary ---------------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if no such process or no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3, starttime field 22
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie is dead, only not yet reaped


def owner_record() -> dict:
    """This process, as written into the temporaries it makes."""
    return {"pid": os.getpid(), "start": _start_time(os.getpid()), "host": socket.gethostname()}


def owner_alive(pid: int, start: str | None = None, host: str | None = None) -> bool:
    """Whether the process that made a temporary may still be writing it (when unsure: yes)."""
    if host is not None and host != socket.gethostname():
        return True  # another machine's process (shared filesystem): cannot tell, so keep it
    if Path("/proc/self/stat").exists():
        now = _start_time(pid)
        # a live pid with another start time is a new process that reuses the number
        return now is not None and (start is None or start == now)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftover_owner_alive(path: Path, pid: int) -> bool:
    owner = path / OWNER_FILE
    if path.is_dir() and owner.is_file():
        try:
            rec = json.loads(owner.read_text())
            return owner_alive(int(rec["pid"]), rec.get("start"), rec.get("host"))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return owner_alive(pid)


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(directory: str | Path, *, name: str | None = None) -> list[Path]:
    """Remove the temporaries in `directory` (those of the target `name` only, if given) whose owner is dead.

    An output moved aside by an overwrite that never completed is renamed back to its name when nothing took its
    place. Only entries named like moegraft's own temporaries are touched, and never one of a live process.

    Returns:
        The paths removed or restored.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    done = []
    entries = sorted(directory.iterdir(), key=lambda p: p.name)
    for path in entries:
        m = _LEFTOVER.match(path.name)
        if not m or (name is not None and m["name"] != name):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _leftover_owner_alive(path, pid):
            continue
        target = directory / m["name"]
        if m["tag"] == OLD_TAG and not target.exists() and not target.is_symlink():
            path.rename(target)  # the replacement never arrived: the old output is still the output
        else:
            remove_path(path)
        done.append(path)
    return done


# -- durability ---------------------------------------------------------------------------------------------------


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file under `path` (or `path` itself), then every directory, so a rename publishes only data
    that is on disk."""
    path = Path(path)
    if not path.is_dir():
        _fsync_path(path)
        return
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(root))


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while two renames happen, so that no Ctrl-C leaves the target between them."""
    held = {signal.SIGINT, signal.SIGTERM}
    on_main = threading.current_thread() is threading.main_thread()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held) if on_main else None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def publish(tmp: Path, target: Path) -> None:
    """Rename the complete (and fsynced) `tmp` to `target`; an existing target is moved aside first and deleted
    after, so at every instant `target` is the old output or the new one."""
    with _signals_held():
        old = None
        if target.exists() or target.is_symlink():
            if target.is_file() and tmp.is_file():
                os.replace(tmp, target)  # one atomic step for a file
            else:
                old = temp_path(target, tag=OLD_TAG)
                remove_path(old)
                target.rename(old)
                tmp.rename(target)
        else:
            tmp.rename(target)
        _fsync_path(target.parent)
    if old is not None:
        remove_path(old)


# -- the context managers ------------------------------------------------------------------------------------------


@contextmanager
def atomic_output_dir(
    out: str | Path, overwrite: bool = False, *, need: int | None = None, merge: bool = False
) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; rename it to `out` only if the body succeeds.

    Args:
        out: the directory to produce.
        overwrite: replace an existing `out` (only once the new one is complete).
        need: bytes the body will write: checked against the free space first, and named if the disk fills.
        merge: if `out` exists, move the new files into it one by one (each replaced atomically, in the order they
            were written) and leave its other files alone, instead of replacing the whole directory (a report
            written into a folder that also holds other things).

    A crash, Ctrl-C or a full disk leaves no half-written output at `out`; an error removes the temporary, and a
    kill leaves it for the next run's `clean_stale`.
    """
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _owned_temp(out, need)
    with _removed_on_failure(tmp, out, need):
        yield tmp
        (tmp / OWNER_FILE).unlink()
        fsync_tree(tmp)
        if merge and out.is_dir():
            _merge_into(tmp, out)
        else:
            publish(tmp, out)


@contextmanager
def _removed_on_failure(tmp: Path, out: Path, need: int | None) -> Iterator[None]:
    """Remove the temporary `tmp` if the body fails; a full disk becomes the one-line DiskFullError for `out`."""
    try:
        yield
    except BaseException as e:
        remove_path(tmp)
        if is_disk_full(e):
            raise disk_full(out, need, e) from None
        raise


def _owned_temp(target: Path, need: int | None) -> Path:
    """A fresh `.NAME.moegraft-tmp-PID` beside `target`, holding its owner record (after the free-space check)."""
    if need is not None:
        check_free(target, need)
    tmp = temp_path(target)
    remove_path(tmp)
    try:
        tmp.mkdir()
        (tmp / OWNER_FILE).write_text(json.dumps(owner_record()))
    except BaseException as e:
        remove_path(tmp)
        if is_disk_full(e):
            raise disk_full(target, need, e) from None
        raise
    return tmp


def _merge_into(staging: Path, dest: Path) -> None:
    with _signals_held():
        for f in sorted(staging.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name)):
            if f.is_dir() and (dest / f.name).exists():
                publish(f, dest / f.name)
            else:
                os.replace(f, dest / f.name)
        _fsync_path(dest)
    staging.rmdir()


@contextmanager
def staging_dir(target: str | Path, *, need: int | None = None) -> Iterator[Path]:
    """A scratch directory beside `target` (`.NAME.moegraft-tmp-PID`), removed when the body ends however it ends;
    the body publishes what it made with `publish`. A kill leaves it for the next run's `clean_stale`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent, name=target.name)
    tmp = _owned_temp(target, need)
    try:
        yield tmp
    except BaseException as e:
        if is_disk_full(e):
            raise disk_full(target, need, e) from None
        raise
    finally:
        remove_path(tmp)


@contextmanager
def atomic_file(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success fsync it and replace `path` with it in one step."""
    path = Path(path)
    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    with _removed_on_failure(tmp, path, None):
        yield tmp
        fsync_tree(tmp)
        publish(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` whole or not at all (replacing any existing file)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return path
