"""Fault injection: kills (SIGKILL, SIGTERM, a second signal) and full disks at named points of convert and train.

After every fault: no output that looks complete, one line for the user, and a rerun (or --resume) that leaves no
leftovers and, for training, ends with bit-identical weights to a run nobody interrupted.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import build, byte_tokenizer, tiny_llama_config
from moegraft.cli import app
from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.data import read_texts
from moegraft.io import space
from moegraft.train import steps as train_steps
from moegraft.train.checkpoint import StopNow, StopRequested, latest_checkpoint
from moegraft.train.metrics import read_metrics

# Each scenario's child process patches one function of moegraft so that it kills itself at a named point, then
# runs the real CLI. (A patch in the child, not a hook in the library: nothing in moegraft knows it is tested.)
CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path

    point, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    calls = [0]

    def kill_at_nth(fn):
        def wrapped(*a, **kw):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **kw)
        return wrapped

    if point == "tensor":  # the n-th tensor written (mid-shard or in a later shard)
        from moegraft.io import writer
        writer.ShardedWriter.write = kill_at_nth(writer.ShardedWriter.write)
    elif point == "rename":  # the n-th directory rename: 1 = publishing the new output; with --overwrite,
        Path.rename = kill_at_nth(Path.rename)  # 1 = the old one moved aside, 2 = the new one moved in
    elif point == "checkpoint":  # the n-th checkpoint: every file written, before its marker and rename
        from moegraft.train import checkpoint
        checkpoint.fsync_tree = kill_at_nth(checkpoint.fsync_tree)

    from moegraft.cli import app
    app(args, prog_name="moegraft")
""")

E, K, I = 4, 2, 32
FAST = GraftSpec(num_experts=E, top_k=K, expert_size=I, init="zero", router_init="random")  # no calibration


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    dense = build(tiny_llama_config(), root / "dense")
    byte_tokenizer().save_pretrained(dense)
    convert(str(dense), root / "moe", FAST, progress=False)
    (root / "text.txt").write_text("\n\n".join(read_texts("stdlib:train")[:12]))
    (root / "child.py").write_text(CHILD)
    return root


def child(work: Path, point: str, n: int, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(work / "child.py"), point, str(n), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def convert_args(work: Path, out: Path, *extra) -> list[str]:
    return ["convert", str(work / "dense"), str(out), "-E", str(E), "-K", str(K), "-I", str(I), "--init", "zero",
            "--router-init", "random", "--max-shard-size", "40KB", "--no-progress", *extra]  # fmt: skip


def entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# -- convert killed ------------------------------------------------------------------------------------------------

# (kill point, its call number, --overwrite of an earlier output): mid-first-shard, in a later shard, with every
# byte written but before the rename, and between the two renames of an overwrite (old moved aside, new not in)
KILLS = {
    "first-shard": ("tensor", 3, False),
    "later-shard": ("tensor", 40, False),
    "before-rename": ("rename", 1, False),
    "mid-overwrite": ("rename", 2, True),
}


def test_convert_killed_leaves_nothing_that_looks_complete(work, tmp_path):
    # the killed children run side by side (each one's cost is mostly importing torch)
    procs = {}
    for name, (point, n, overwrite) in KILLS.items():
        (tmp_path / name).mkdir()
        out = tmp_path / name / "moe"
        if overwrite:
            assert CliRunner().invoke(app, convert_args(work, out, "--seed", "1")).exit_code == 0
        args = [str(work / "child.py"), point, str(n), *convert_args(work, out, "--seed", "2", "--overwrite")]
        procs[name] = subprocess.Popen(
            [sys.executable, *args],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    old = (tmp_path / "mid-overwrite" / ".moe.moegraft-old-{}").as_posix()
    for name, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == -signal.SIGKILL, (name, err[-2000:])
        d, out = tmp_path / name, tmp_path / name / "moe"
        assert not out.exists()  # nothing at OUT: only the dead run's hidden temporaries
        expected = [f".moe.moegraft-tmp-{p.pid}"] + ([f".moe.moegraft-old-{p.pid}"] if KILLS[name][2] else [])
        assert entries(d) == sorted(expected), name
    # an interrupted overwrite: the next run puts the old output back (the new one never arrived) and will not
    # replace it unasked
    before = old.format(procs["mid-overwrite"].pid)
    kept = {f.name: f.read_bytes() for f in Path(before).iterdir()}
    res = CliRunner().invoke(app, convert_args(work, tmp_path / "mid-overwrite" / "moe", "--seed", "3"))
    assert res.exit_code == 2 and "already exists" in one_line(res.output)
    restored = tmp_path / "mid-overwrite" / "moe"
    assert (
        entries(restored.parent) == ["moe"] and {f.name: f.read_bytes() for f in restored.iterdir()} == kept
    )
    # elsewhere the rerun removes the dead run's temporary and writes the whole output
    for name in ("first-shard", "before-rename"):
        res = CliRunner().invoke(app, convert_args(work, tmp_path / name / "moe"))
        assert res.exit_code == 0, res.output
        assert entries(tmp_path / name) == ["moe"]
        index = json.loads((tmp_path / name / "moe" / "model.safetensors.index.json").read_text())
        assert all((tmp_path / name / "moe" / f).is_file() for f in set(index["weight_map"].values()))


# -- a full disk -----------------------------------------------------------------------------------------------------


def test_convert_disk_full_midway_is_one_line_and_leaves_nothing(work, tmp_path, monkeypatch):
    from moegraft.io import writer

    real, seen = writer.ShardedWriter.write, []

    def full_after_20(self, name, tensor):
        seen.append(name)
        if len(seen) == 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, tensor)

    monkeypatch.setattr(writer.ShardedWriter, "write", full_after_20)
    res = CliRunner().invoke(app, convert_args(work, tmp_path / "moe"))
    line = one_line(res.output)
    assert res.exit_code == 2 and "disk full while writing" in line and str(tmp_path / "moe") in line
    assert "bytes" in line and entries(tmp_path) == []


def test_convert_refuses_before_reading_weights_when_space_is_short(work, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(space.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 50_000, 50_000))
    res = CliRunner().invoke(app, convert_args(work, tmp_path / "moe"))
    line = one_line(res.output)
    assert (
        res.exit_code == 2
        and "needs" in line
        and "only 48.8 KiB are free" in line
        and entries(tmp_path) == []
    )


def test_checkpoint_disk_full_keeps_no_partial_checkpoint(work, tmp_path, monkeypatch):
    from moegraft.train import checkpoint

    calls = []

    def full_on_second(path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.sync()

    monkeypatch.setattr(checkpoint, "fsync_tree", full_on_second)
    res = CliRunner().invoke(app, train_args(work, tmp_path / "run", "--steps", "4", "--save-every", "2"))
    line = one_line(res.output)
    assert res.exit_code == 2 and "disk full while writing" in line and "step-4" in line
    assert (
        entries(tmp_path / "run" / "checkpoints") == ["step-2"] and not (tmp_path / "run" / "model").exists()
    )


# -- training stopped by signals, resumed --------------------------------------------------------------------------


def train_args(work: Path, run: Path, *extra) -> list[str]:
    return ["train", str(work / "moe"), str(run), "--data", str(work / "text.txt"), "--seq-len", "32", "--batch",
            "2", "--lr", "3e-3", "--log-every", "1", "--quiet", *extra]  # fmt: skip


STEPS = ["--steps", "6", "--save-every", "2"]


def signal_at(monkeypatch, fn_name: str, at: dict[int, int]):
    """Patch train.steps' `fn_name` (the step's losses and counts live there) so that its n-th call first sends this process signal at[n]."""
    real, calls = getattr(train_steps, fn_name), [0]

    def wrapped(*a, **kw):
        calls[0] += 1
        if calls[0] in at:
            os.kill(os.getpid(), at[calls[0]])
        return real(*a, **kw)

    monkeypatch.setattr(train_steps, fn_name, wrapped)


@pytest.fixture(scope="module")
def uninterrupted(work) -> Path:
    res = CliRunner().invoke(app, train_args(work, work / "full", *STEPS))
    assert res.exit_code == 0, res.output
    return work / "full"


def test_sigterm_then_sigkill_each_resumed_is_bit_identical(work, tmp_path, monkeypatch, uninterrupted):
    run = tmp_path / "run"
    # SIGTERM during step 3's forward: the step finishes, is checkpointed, the run stops with one line
    with monkeypatch.context() as m:
        signal_at(m, "balance_losses", {3: signal.SIGTERM})
        res = CliRunner().invoke(app, train_args(work, run, *STEPS))
    assert res.exit_code == 128 + signal.SIGTERM
    assert one_line(res.output) == (
        f"interrupted (SIGTERM); continue from {run / 'checkpoints' / 'step-3'} with --resume"
    )
    assert entries(run / "checkpoints") == ["step-2", "step-3"] and not (run / "model").exists()
    # resumed, then SIGKILLed while writing step 4's checkpoint: its files are there but not its marker or name
    r = child(work, "checkpoint", 1, *train_args(work, run, *STEPS, "--resume"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ckpts = entries(run / "checkpoints")
    assert ckpts[:1] == [f".step-4.moegraft-tmp-{ckpts[0].rsplit('-', 1)[1]}"] and ckpts[1:] == [
        "step-2",
        "step-3",
    ]
    assert latest_checkpoint(run).name == "step-3"  # a checkpoint counts once it has its name
    # resumed again: from step 3 (the half-written step 4 is neither picked nor kept), to the end
    res = CliRunner().invoke(app, train_args(work, run, *STEPS, "--resume"))
    assert res.exit_code == 0, res.output
    assert entries(run / "checkpoints") == ["step-2", "step-3", "step-4", "step-6"]
    a, b = (load_file(d / "model" / "model.safetensors") for d in (uninterrupted, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [read_metrics(d / "metrics.jsonl") for d in (uninterrupted, run)]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4, 5, 6, 6]  # no step logged twice
    assert [r.get("loss") for r in rows[0]] == [r.get("loss") for r in rows[1]]


def test_second_signal_mid_step_writes_no_checkpoint(work, tmp_path, monkeypatch):
    # first SIGTERM in step 2's forward, the second after its optimizer step but before the step is counted:
    # stopping there must not save step 2's half-finished state as a checkpoint of step 1
    run = tmp_path / "run"
    signal_at(monkeypatch, "balance_losses", {2: signal.SIGTERM})
    signal_at(monkeypatch, "layer_counts", {2: signal.SIGINT})
    res = CliRunner().invoke(app, train_args(work, run, "--steps", "4"))
    assert res.exit_code == 128 + signal.SIGINT
    assert one_line(res.output) == (
        "stopped at once by a second SIGINT; the step in progress was not saved; "
        "no checkpoint yet: nothing to resume"
    )
    assert not (run / "checkpoints").exists() or entries(run / "checkpoints") == []
    assert issubclass(StopNow, StopRequested)


def test_overwrite_keeps_the_old_run_until_the_new_one_has_something(work, tmp_path, uninterrupted):
    run = tmp_path / "run"
    res = CliRunner().invoke(app, train_args(work, run, "--steps", "2"))
    assert res.exit_code == 0
    old = (run / "model" / "model.safetensors").read_bytes()
    # the new run fails on its data: the old run is untouched, no temporary is left
    res = CliRunner().invoke(app, [*train_args(work, run, "--steps", "2", "--overwrite")[:3], "--data",
                                   str(tmp_path / "missing.txt"), "--overwrite"])  # fmt: skip
    assert res.exit_code == 2 and "missing.txt" in one_line(res.output)
    assert entries(tmp_path) == ["run"] and (run / "model" / "model.safetensors").read_bytes() == old
    # a complete new run replaces it
    res = CliRunner().invoke(app, train_args(work, run, "--steps", "3", "--overwrite"))
    assert res.exit_code == 0 and entries(tmp_path) == ["run"]
    assert json.loads((run / "moegraft-train.json").read_text())["resolved"]["steps"] == 3
