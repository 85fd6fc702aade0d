"""moegraft.io.atomic / space: temporaries recognised and cleaned, old outputs replaced only by complete new ones,
data fsynced before the rename, a full disk one line with nothing left behind."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from moegraft.errors import DiskFullError, OutputExistsError
from moegraft.io import atomic, space
from moegraft.io.atomic import (
    OLD_TAG,
    OWNER_FILE,
    atomic_output_dir,
    clean_stale,
    owner_record,
    temp_path,
    write_text_atomic,
)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: no such process any more (pid reuse within the test is astronomically unlikely)
    return p.pid


@pytest.fixture
def live_pid():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


def make_dir(path: Path, owner: dict | None = None) -> Path:
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"half")
    if owner is not None:
        (path / OWNER_FILE).write_text(json.dumps(owner))
    return path


def test_clean_stale_removes_only_dead_owners_own_temporaries(tmp_path, live_pid):
    dead = dead_pid()
    stale = make_dir(tmp_path / f".out.moegraft-tmp-{dead}")
    stale_file = tmp_path / f".out.moegraft-tmp-{dead_pid()}"
    stale_file.write_text("x")  # a file temporary (atomic_file): judged by its pid alone
    live = make_dir(tmp_path / f".out.moegraft-tmp-{live_pid}")
    # a live pid that a new process reuses: its start time differs from the one the writer recorded
    me = owner_record()
    reused = make_dir(tmp_path / f".out.moegraft-tmp-{live_pid}0", {**me, "pid": live_pid, "start": "1"})
    other_host = make_dir(
        tmp_path / f".out.moegraft-tmp-{dead}1", {"pid": dead, "start": "1", "host": "elsewhere"}
    )
    unrelated = [
        make_dir(tmp_path / f".other.moegraft-tmp-{dead}"),  # another output's (not asked for)
        make_dir(tmp_path / f".out.tmp-{dead}"),  # not moegraft's naming
        make_dir(tmp_path / f"out.moegraft-tmp-{dead}"),  # not hidden: a user's directory
        make_dir(tmp_path / "out"),
    ]
    assert socket.gethostname() != "elsewhere"
    removed = clean_stale(tmp_path, name="out")
    assert not stale.exists() and not reused.exists()
    assert live.exists() and other_host.exists() and all(p.exists() for p in unrelated)
    assert set(removed) == {stale, stale_file, reused}
    # without a name: every output's dead temporaries in the directory, still never a live one
    clean_stale(tmp_path)
    assert not (tmp_path / f".other.moegraft-tmp-{dead}").exists() and live.exists()


def test_moved_aside_old_output_comes_back_if_the_new_never_arrived(tmp_path):
    dead = dead_pid()
    old = make_dir(tmp_path / f".out.{OLD_TAG}-{dead}")
    assert clean_stale(tmp_path, name="out") == [old]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"half" and not old.exists()
    # once a new output is in place, an aside copy is simply deleted
    old = make_dir(tmp_path / f".out.{OLD_TAG}-{dead}")
    clean_stale(tmp_path, name="out")
    assert not old.exists() and (tmp_path / "out").is_dir()


def test_overwrite_keeps_old_until_new_is_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "a").write_text("new")
        assert (out / "a").read_text() == "old"  # still the old one while the new is written
        assert tmp.name == f".out.moegraft-tmp-{os.getpid()}" and (tmp / OWNER_FILE).is_file()
    assert (out / "a").read_text() == "new" and sorted(p.name for p in out.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "a").write_text("broken")
        raise RuntimeError("crash")
    assert (out / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(OutputExistsError), atomic_output_dir(out):
        pass


def test_everything_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, Path.rename
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))
    )
    monkeypatch.setattr(
        Path, "rename", lambda self, t: (events.append(("rename", str(self))), real_rename(self, t))[1]
    )
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"1" * 100)
        (tmp / "config.json").write_text("{}")
    synced = [p for kind, p in events[: events.index(("rename", str(tmp)))] if kind == "fsync"]
    assert {str(tmp / "sub" / "w.bin"), str(tmp / "config.json"), str(tmp / "sub"), str(tmp)} <= set(synced)
    assert events[-1] == ("fsync", str(tmp_path))  # the rename itself made durable


def test_write_text_atomic_replaces_in_one_step(tmp_path):
    p = tmp_path / "r.json"
    write_text_atomic(p, "1")
    write_text_atomic(p, "2")
    assert p.read_text() == "2" and sorted(x.name for x in tmp_path.iterdir()) == ["r.json"]


def test_merge_keeps_other_files(tmp_path):
    d = tmp_path / "rep"
    d.mkdir()
    (d / "mine.txt").write_text("keep")
    (d / "report.md").write_text("old")
    with atomic_output_dir(d, overwrite=True, merge=True) as tmp:
        (tmp / "report.md").write_text("new")
    assert (d / "mine.txt").read_text() == "keep" and (d / "report.md").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_free_space_checked_before_writing(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(space.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(DiskFullError) as e, atomic_output_dir(tmp_path / "out", need=10**8):
        raise AssertionError("the body must not run")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "out") in msg and "100,000,000 bytes" in msg
    assert list(tmp_path.iterdir()) == []


def test_enospc_while_writing_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(DiskFullError) as e, atomic_output_dir(out, overwrite=True, need=1234) as tmp:
        (tmp / "a").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "a"))
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg and "1,234 bytes" in msg and "disk full" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "a").read_text() == "old"
    with pytest.raises(DiskFullError), atomic.atomic_file(tmp_path / "f.json") as tmp:
        tmp.write_text("x")
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert temp_path(out).name == f".out.moegraft-tmp-{os.getpid()}"
