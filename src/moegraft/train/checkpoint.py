"""Training checkpoints that are whole or absent, and the stop signals that ask for one.

In: the accelerator, the run directory and a step. Out: OUT/checkpoints/step-N/ (accelerate's state plus
`moegraft-checkpoint.json`), written as `.step-N.moegraft-tmp-PID` by every process and renamed by the main one
when all are done; `latest_checkpoint` returns only such complete ones, and `resume_point` checks OUT against
--resume / --overwrite and picks the one to continue from. `StopSignals`: a first SIGINT or SIGTERM asks for a
checkpoint at the next step boundary, then a stop; a second one stops at once, writing nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from moegraft import __version__
from moegraft.errors import MoegraftError, OutputExistsError, SpecError
from moegraft.io.atomic import (
    OWNER_FILE,
    clean_stale,
    fsync_tree,
    owner_record,
    publish,
    remove_path,
    temp_path,
    write_text_atomic,
)
from moegraft.io.space import check_free, disk_full, is_disk_full
from moegraft.train.spec import SPEC_FILE, TrainSpec, read_saved_spec

MARKER = "moegraft-checkpoint.json"  # written last, before the rename: its step names the state beside it
_STEP_DIR = re.compile(r"^step-(\d+)$")


class StopRequested(KeyboardInterrupt):
    """A first SIGINT/SIGTERM, honoured at a step boundary: the run checkpoints, then stops."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.checkpoint: Path | None = None  # the checkpoint the run stopped with (set by the loop)


class StopNow(StopRequested):
    """A second signal during a step: stop at once; no checkpoint is written for the step in progress."""


class StopSignals:
    """First SIGINT/SIGTERM: finish the step, checkpoint, stop. Second: stop at once, without a checkpoint."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    @property
    def set(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:
            raise StopNow(signum)
        self.signum = signum

    def request(self) -> StopRequested:
        """The exception that stops the run at this step boundary."""
        return StopRequested(self.signum or signal.SIGINT)

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}


def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step-{step}"


def latest_checkpoint(run: Path) -> Path | None:
    """The complete checkpoint of the highest step in OUT/checkpoints (renamed into place, marker present)."""
    root = Path(run) / "checkpoints"
    found = []
    for d in root.iterdir() if root.is_dir() else ():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and _marker_step(d) == int(m[1]):
            found.append((int(m[1]), d))
    return max(found)[1] if found else None


def _marker_step(d: Path) -> int | None:
    try:
        return int(json.loads((d / MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clean_stale_checkpoints(run: Path) -> None:
    """Remove checkpoint temporaries that killed runs left in OUT/checkpoints (never a live process's)."""
    clean_stale(Path(run) / "checkpoints")


def shared_pid(accelerator) -> int:
    """The main process's pid, on every process: it names the temporaries all of them write into."""
    if accelerator.num_processes == 1:
        return os.getpid()
    from accelerate.utils import broadcast_object_list

    return int(broadcast_object_list([os.getpid()])[0])


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, as a checkpoint or save_pretrained stores them."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes a checkpoint holds: the model's parameters and buffers and the optimizer's state tensors."""
    n = model_bytes(model)
    for per_param in optimizer.state_dict()["state"].values():
        n += sum(v.numel() * v.element_size() for v in per_param.values() if torch.is_tensor(v))
    return n


def save_checkpoint(accelerator, run: Path, step: int, *, pid: int, need: int) -> Path:
    """Write OUT/checkpoints/step-N whole: every process saves into the shared temporary, the main one renames it.

    Args:
        pid: `shared_pid(accelerator)`, the same on every process.
        need: bytes the checkpoint takes (`state_bytes`), checked against the free space first.

    Raises:
        DiskFullError: not enough space, before or while writing (the temporary is removed).
    """
    final = checkpoint_dir(run, step)
    tmp = temp_path(final, pid=pid)
    main = accelerator.is_main_process
    try:
        if main:
            final.parent.mkdir(parents=True, exist_ok=True)
            check_free(final, need)
            remove_path(tmp)
            tmp.mkdir()
            (tmp / OWNER_FILE).write_text(json.dumps(owner_record()))
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if main:
            (tmp / OWNER_FILE).unlink(missing_ok=True)
            (tmp / MARKER).write_text(json.dumps({"step": step, "moegraft_version": __version__}) + "\n")
            fsync_tree(tmp)
            publish(tmp, final)
        accelerator.wait_for_everyone()
    except BaseException as e:
        if main:
            remove_path(tmp)
        if is_disk_full(e):
            raise disk_full(final, need, e) from None
        raise
    return final


def trim_metrics(path: Path, step: int) -> None:
    """Keep the rows of metrics.jsonl up to `step` (a resumed run logs the later ones again), dropping a last line
    that a kill cut short."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # only the last line can be cut; nothing valid follows it
        if int(row.get("step", 0)) <= step and not row.get("final"):
            keep.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def resume_point(run: Path, spec: TrainSpec, *, resume: bool, overwrite: bool) -> Path | None:
    """Check OUT against --resume/--overwrite; return the checkpoint to resume from (or None)."""
    if resume:
        diff = read_saved_spec(run / SPEC_FILE, TrainSpec).differences(spec)
        if diff:
            raise SpecError(
                f"--resume: the spec differs from the saved run in {', '.join(diff)}; use the same flags"
            )
        clean_stale_checkpoints(run)  # what a killed run was still writing
        ckpt = latest_checkpoint(run)  # complete ones only: renamed into place with their marker
        if ckpt is None:
            raise MoegraftError(
                f"--resume: no complete checkpoint in {run / 'checkpoints'}; start without --resume"
            )
        trim_metrics(run / "metrics.jsonl", int(ckpt.name.split("-")[1]))
        return ckpt
    # with --overwrite, `staged_run` made `run` a fresh temporary: the old run is replaced only at the end
    if run.exists() and any(run.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{run} already exists; pass --overwrite, --resume, or choose another output path"
        )
    return None


@contextmanager
def staged_run(run: Path, *, overwrite: bool, cpu: bool = False) -> Iterator[Path]:
    """The directory a training run writes into: `run` itself, or, when --overwrite replaces an existing run, a
    temporary beside it that takes `run`'s place only once the new run holds its model or a complete checkpoint
    (at the end, or when it stops on a signal or diverges). A crash or an error before that, or a kill, leaves the
    old run as it was. `cpu`: what the run's Accelerator will be given (its process state is shared).
    """
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    main = state.is_main_process
    if main:
        clean_stale(run.parent, name=run.name)
    staged = overwrite and run.is_dir() and any(run.iterdir())
    pid = os.getpid()
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        pid, staged = broadcast_object_list([pid, staged])
    if not staged:
        yield run
        return
    work = temp_path(run, pid=pid)
    if main:
        remove_path(work)
    try:
        yield work
    except BaseException as e:
        if main:
            if latest_checkpoint(work) is not None or (work / "model").is_dir():
                publish(work, run)  # resumable: it replaces the old run, as asked
            else:
                remove_path(work)
        _retarget(e, work, run)
        raise
    if main:
        publish(work, run)


def _retarget(e: BaseException, work: Path, run: Path) -> None:
    """Make an error about the temporary run name the run's own path, where it now is (or would have been)."""
    ckpt = getattr(e, "checkpoint", None)
    if isinstance(ckpt, Path) and ckpt.is_relative_to(work):
        e.checkpoint = run / ckpt.relative_to(work)
    if isinstance(e, MoegraftError):
        e.args = tuple(a.replace(str(work), str(run)) if isinstance(a, str) else a for a in e.args)
