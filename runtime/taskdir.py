"""One task's directory and its in-memory record.

Owns: the files of ``data_dir/tasks/<task_id>/`` as the agent writes and reads them (layout
below), how a task's end is described from them (``exited_status``), the safe deletion of a task
directory, and ``TaskRecord``, what the controller knows about one task while it watches it.
Must not touch: processes (runtime/procfs.py identifies them, runtime/process.py signals them),
cgroups (runtime/cgroups.py), the launcher's pipes (runtime/launcher.py).

Task directory (``data_dir/tasks/<task_id>/``)::

    config.json   the TaskConfig (file contents elided)     (agent, before the go)
    runtime.json  cgroup dirs, image id, volumes             (agent, before the go)
    pids.json     boot id, start time, shim pid and /proc start time, to re-identify it safely
                  after pid reuse (agent, before the go; rewritten, atomically, with the init's
                  pid too if adoption had to look the init up)
    init.pid      the init's pid and /proc start time        (shim, one write, after the clone)
    notes.json    what only the agent knows: stop requested, SIGKILL sent, command not found
    exit          the exit code                              (shim, atomically, when the task ended)
    stdout.log[.N] stderr.log[.N]  timestamped, size-rotated (shim; see runtime/logs.py)
    shim.log      the launcher's own messages
    upper/ work/  the task's writable overlay layer (image tasks)

config.json, runtime.json and pids.json are each written once, with one write(2), into the new
task directory before the go (O_EXCL, no temporary file and rename): an agent that dies before
or while writing one leaves it missing or unparseable, which adoption treats the same way (the
launcher starts nothing without the go, sent only after all three).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from shoal.runtime import cgroups as cg_mod
from shoal.runtime.cgroups import TaskCgroups
from shoal.runtime.procfs import ProcRef
from shoal.runtime.records import RunState, RuntimeStatus, TaskConfig, describe_exit

log = logging.getLogger(__name__)

_LOG_TAIL_BYTES = 2000
_libc = ctypes.CDLL(None, use_errno=True)
_MNT_DETACH = 2


def write_new(path: Path, text: str) -> None:
    """Create ``path`` (it must not exist) with ``text``, in one write."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        data = text.encode()
        if os.write(fd, data) != len(data):
            raise OSError(errno.ENOSPC, f"short write to {path}")
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def tail(path: Path, limit: int = _LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return fh.read().decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class Notes:
    """What only the agent knows about how a task ended (TASKDIR/notes.json)."""

    stop_requested: bool = False
    killed: bool = False  # SIGKILL sent after the grace period
    not_found: str | None = None  # command not found: this program name

    @classmethod
    def load(cls, path: Path) -> Notes:
        try:
            raw = json.loads(path.read_text())
            return cls(bool(raw["stop_requested"]), bool(raw["killed"]), raw.get("not_found"))
        except (OSError, ValueError, KeyError, TypeError):
            return cls()

    def save(self, path: Path) -> None:
        """Best effort: a full disk must not stop a stop(); only the message after a restart
        would suffer."""
        try:
            atomic_write(path, json.dumps(dataclasses.asdict(self)))
        except OSError as exc:
            log.warning("runtime: cannot write %s: %s", path, exc)


def exited_status(
    started_at: float,
    code: int | None,
    finished_at: float | None,
    notes: Notes,
    unknown: str = "",
    oom: bool = False,
) -> RuntimeStatus:
    if code is None:
        message = unknown
    elif notes.not_found is not None and code == 127:
        message = f"command not found: {notes.not_found}"
    elif notes.killed and code == 128 + signal.SIGKILL:
        message = "killed (SIGKILL after grace period)"
    elif oom and code == 128 + signal.SIGKILL:
        message = "OOM killed"
    elif oom:
        message = f"{describe_exit(code)}; the OOM killer killed one of its processes"
    else:
        message = describe_exit(code)
    return RuntimeStatus(
        state=RunState.EXITED,
        pid=None,
        started_at=started_at,
        exit_code=code,
        finished_at=finished_at if finished_at is not None else time.time(),
        message=message,
        stopped=notes.stop_requested,
    )


def read_exit(taskdir: Path) -> tuple[int | None, float | None]:
    """The shim's exit code and the file's mtime (coarse: a few ms early is possible)."""
    path = taskdir / "exit"
    try:
        text = path.read_text()
        return int(text.strip()), path.stat().st_mtime
    except (OSError, ValueError):
        return None, None


@dataclass
class TaskRecord:
    """What the controller knows about one task while it watches it (in memory only)."""

    cfg: TaskConfig
    dir: Path
    started_at: float
    status: RuntimeStatus
    done: asyncio.Future[None]  # resolved when the task is observed EXITED
    shim: ProcRef | None
    init: ProcRef | None = None
    notes: Notes = field(default_factory=Notes)
    watch_fd: int | None = None  # pidfd being watched: the shim's, or init's if the shim is gone
    watching_shim: bool = True
    init_fd: int | None = None  # pidfd used to signal init
    registered: bool = False  # visible in tasks() (False while start() is still deciding)
    cgroups: TaskCgroups | None = None
    image_id: str = ""
    volumes: tuple[str, ...] = ()
    volumes_released: bool = False  # exited and let go of its volumes (release())


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in the agent's namespace (there should be none: task
    mounts live in the task's own namespace). Checked before deleting a task directory."""
    prefix = str(path)
    found = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) > 4:
            mp = cg_mod._unescape(parts[4])
            if mp == prefix or mp.startswith(prefix + "/"):
                found.append(mp)
    return found


#: The one file a removed task's directory keeps while some of its cgroups outlive the task.
CGROUPS_LEFT = "cgroups-left.json"


def keep_only_cgroups(taskdir: Path, cgroups: TaskCgroups) -> None:
    """Empty a removed task's directory but for a record of its cgroups that are still busy
    (CGROUPS_LEFT): with the directory gone, neither this agent, the next one after a restart,
    nor a sweep by task id would know the groups any more. Raises OSError if the record cannot
    be written (the directory is then left whole)."""
    atomic_write(taskdir / CGROUPS_LEFT, json.dumps(cgroups.to_json()))
    for child in taskdir.iterdir():
        if child.name == CGROUPS_LEFT:
            continue
        if child.is_dir() and not child.is_symlink():
            safe_rmtree(child)
        else:
            with contextlib.suppress(OSError):
                child.unlink()


def cgroups_left(taskdir: Path) -> TaskCgroups | None:
    """The groups a removed task left behind (see keep_only_cgroups); None for any other
    task directory."""
    try:
        raw = json.loads((taskdir / CGROUPS_LEFT).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("runtime: %s: unreadable %s (%s)", taskdir, CGROUPS_LEFT, exc)
        return TaskCgroups({}, "")
    return TaskCgroups.from_json(raw)


def safe_rmtree(path: Path) -> None:
    """Delete a task directory, first detaching anything mounted below it (defensive: a bug
    must never make rmtree walk into a bind of the host's /usr)."""
    for mp in sorted(mounts_under(path), key=len, reverse=True):
        if _libc.umount2(mp.encode(), _MNT_DETACH) != 0:
            log.error("runtime: cannot detach %s: errno %d; not deleting %s",
                      mp, ctypes.get_errno(), path)  # fmt: skip
            return
    shutil.rmtree(path, ignore_errors=True)


