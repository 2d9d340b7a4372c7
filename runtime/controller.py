"""The per-node task controller: runs each task as real processes in their own namespaces.

Owns: ``RuntimeConfig.data_dir / "tasks"`` (one directory per task) and the processes started from
it: one shim per task (runtime/shim.sh, see its header for the process tree) and the task under it.
Must not touch: cluster state (the agent's reconciler decides what runs; this module only does it),
networking beyond bringing the task's own ``lo`` up, cgroups, and anything outside data_dir.

The agent is never forked to launch a task: a small setsid'ed shell shim is exec'ed per task
(``subprocess`` uses vfork: 0.13 ms at small RSS, 2.7 ms at 1 GB, where fork costs ~65 ms; and
unlike ``os.posix_spawn`` it leaves no signal ignored in the child: glibc's posix_spawn leaves
its internal signals 32/33 at SIG_IGN, which the task would inherit). The shim stays
outside the task, waits for it and writes its exit code to ``TASKDIR/exit``, so tasks survive an
agent restart and a restarted agent learns how they ended (:meth:`ProcessController.recover`).

Task directory (``data_dir/tasks/<task_id>/``)::

    config.json   the TaskConfig                          (agent, before launch)
    env           the environment, shell-quoted, 0600     (agent, before launch)
    pids.json     boot id, start time, shim + init pid    (agent: after spawn, again after ready)
                  and /proc start time, to re-identify them safely after pid reuse
    notes.json    what only the agent knows: stop requested, SIGKILL sent, command not found
    exit          the exit code                           (shim, atomically, when the task ended)
    stdout.log    stderr.log    the task's output (O_APPEND; the agent never holds them open)
    shim.log      the launcher's own messages

Exit detection uses a pidfd per watched process (``os.pidfd_open`` + ``loop.add_reader``), which
works for adopted shims that are not our children; nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shoal.runtime.errors import (
    ConfigError,
    InvalidTaskConfig,
    LaunchFailed,
    StopFailed,
    TaskExists,
    TaskNotFound,
)

log = logging.getLogger(__name__)

#: PATH given to a task whose env has none (Docker's default).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: The shim shipped with this package (package data ``*.sh``).
SHIM_PATH = str(Path(__file__).with_name("shim.sh"))

_TASK_ID_RE = re.compile(r"[a-z0-9]{1,64}")
# RFC 1123 host name; the kernel takes at most 64 bytes.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,64}}$){_LABEL}(\.{_LABEL})*")
_LOG_TAIL_BYTES = 2000
_LAUNCHER_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


# --------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class TaskConfig:
    """What to run. Immutable; stored as TASKDIR/config.json."""

    task_id: str  # unique, [a-z0-9]{1,64}: used as a directory name
    hostname: str  # set in the task's UTS namespace (RFC 1123, <= 64 bytes)
    command: tuple[str, ...]  # argv; command[0] is looked up in the task's PATH, from workdir
    env: dict[str, str]  # the task's whole environment; PATH=DEFAULT_PATH is added if absent
    workdir: str = ""  # absolute cwd inside the task; "" = "/"

    def validate(self) -> None:
        """Raise InvalidTaskConfig naming the first malformed field."""
        if not isinstance(self.task_id, str) or not _TASK_ID_RE.fullmatch(self.task_id):
            raise InvalidTaskConfig("task_id", f"must match [a-z0-9]{{1,64}}: {self.task_id!r}")
        if not isinstance(self.hostname, str) or not _HOSTNAME_RE.fullmatch(self.hostname):
            raise InvalidTaskConfig("hostname", f"not a valid host name: {self.hostname!r}")
        if not self.command or not all(isinstance(a, str) for a in self.command):
            raise InvalidTaskConfig("command", "must be a non-empty sequence of strings")
        if any("\0" in a for a in self.command):
            raise InvalidTaskConfig("command", "must not contain NUL bytes")
        if not self.command[0] or "=" in self.command[0]:
            # `env -i NAME=VALUE... CMD` would take a '=' in CMD for another variable.
            raise InvalidTaskConfig("command", f"bad program name: {self.command[0]!r}")
        if not isinstance(self.env, dict):
            raise InvalidTaskConfig("env", "must be a dict of str to str")
        for key, value in self.env.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise InvalidTaskConfig("env", "names and values must be strings")
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise InvalidTaskConfig("env", f"bad variable: {key!r}")
        if self.workdir and (
            not self.workdir.startswith("/") or re.search(r"[\0\n]", self.workdir)
        ):
            raise InvalidTaskConfig("workdir", f"must be an absolute path: {self.workdir!r}")

    def full_env(self) -> dict[str, str]:
        """The environment the command gets: ``env`` plus the default PATH if it has none."""
        return self.env if "PATH" in self.env else {**self.env, "PATH": DEFAULT_PATH}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TaskConfig:
        raw = json.loads(text)
        return cls(
            task_id=str(raw["task_id"]),
            hostname=str(raw["hostname"]),
            command=tuple(str(a) for a in raw["command"]),
            env={str(k): str(v) for k, v in raw["env"].items()},
            workdir=str(raw.get("workdir", "")),
        )


class RunState(enum.Enum):
    RUNNING = "running"
    EXITED = "exited"


@dataclass(frozen=True)
class RuntimeStatus:
    """What the runtime observed about one task."""

    state: RunState
    pid: int | None  # host pid of the task's init (tini) while running; None once exited
    started_at: float  # time.time() when the launch began
    exit_code: int | None = None  # when EXITED; None if it could not be learned (see message)
    finished_at: float | None = None  # time.time() when it ended (exit file mtime)
    message: str = ""  # "exit 0", "exit 143 (SIGTERM)", "killed (SIGKILL after grace period)"...
    stopped: bool = False  # it ended because stop() (or remove()) was called


@dataclass
class RuntimeConfig:
    """Settings of the task runtime. Paths must be absolute; times are seconds."""

    # Root of the runtime's state. Tasks live in data_dir / "tasks" / task_id /. Must be on a
    # local filesystem that survives an agent restart (not a tmpfs the agent unmounts). No default.
    data_dir: Path
    # tini (Debian package `tini`): the task's pid 1. Reaps zombies, forwards signals, returns the
    # command's exit code (128+N for signal N).
    tini_path: str = "/usr/bin/tini"
    # util-linux unshare (>= 2.36): creates the namespaces and mounts the task's /proc.
    unshare_path: str = "/usr/bin/unshare"
    # iproute2 `ip`: brings the task's loopback up in its network namespace.
    ip_path: str = "/usr/sbin/ip"
    # POSIX shell that runs the shim (dash on Debian). It must not add variables on exec: the task
    # environment is applied by `env -i` anyway, so any POSIX sh works.
    sh_path: str = "/bin/sh"
    # coreutils `env`: the last hop; sets exactly the task's environment and execs the command.
    env_path: str = "/usr/bin/env"
    # The shim script; default: the one shipped in this package.
    shim_path: str = SHIM_PATH
    # How long start() waits for the launcher to report ready (namespaces + /proc + tini + lookup)
    # before killing it and raising LaunchFailed. Normal: a few ms; raise it on very slow hosts.
    start_timeout: float = 10.0
    # How long stop() waits for the task to be gone after SIGKILL before raising StopFailed
    # (a process in uninterruptible sleep, e.g. hung NFS, can outlive SIGKILL for a while).
    kill_timeout: float = 10.0
    # Grace period remove() gives a task that is still running (SIGTERM, then SIGKILL).
    # 0 = SIGKILL at once, like `docker rm -f`.
    remove_grace: float = 0.0

    @property
    def tasks_dir(self) -> Path:
        return Path(self.data_dir) / "tasks"

    def validate(self) -> None:
        """Raise ConfigError unless every tool exists and every timeout is sane."""
        tools = {
            "tini_path": self.tini_path,
            "unshare_path": self.unshare_path,
            "ip_path": self.ip_path,
            "sh_path": self.sh_path,
            "env_path": self.env_path,
        }
        for name, path in tools.items():
            if not os.path.isabs(path) or not os.access(path, os.X_OK):
                raise ConfigError(f"{name}: not an executable absolute path: {path!r}")
        if not os.path.isabs(self.shim_path) or not os.path.isfile(self.shim_path):
            raise ConfigError(f"shim_path: no such file: {self.shim_path!r}")
        if self.start_timeout <= 0 or self.kill_timeout <= 0 or self.remove_grace < 0:
            raise ConfigError("start_timeout and kill_timeout must be > 0, remove_grace >= 0")


Listener = Callable[[str], None]


class Controller(Protocol):
    """What the agent's reconciler uses. ProcessController is real, FakeController in memory."""

    async def recover(self) -> None:
        """After an agent restart: adopt tasks still running, learn how the others ended."""

    async def start(self, cfg: TaskConfig) -> RuntimeStatus:
        """Launch a task; return its status (RUNNING, or EXITED if it already ended, e.g. command
        not found). Raise StartError if it could not be started at all."""

    async def stop(self, task_id: str, grace: float) -> RuntimeStatus:
        """SIGTERM the task's init, SIGKILL after `grace` s; the whole tree dies. Return the
        final EXITED status. Idempotent. Raise TaskNotFound for an unknown id."""

    def status(self, task_id: str) -> RuntimeStatus | None: ...

    def tasks(self) -> dict[str, RuntimeStatus]:
        """Every task known (running or exited, not yet removed)."""

    async def remove(self, task_id: str) -> None:
        """Stop (remove_grace) if running, delete its directory, forget it. Unknown id: no-op."""

    def set_listener(self, cb: Listener | None) -> None:
        """cb(task_id) is called on the event loop whenever a task this controller watches exits."""

    def logs_path(self, task_id: str) -> tuple[Path, Path]:
        """(stdout, stderr) log files. Raise TaskNotFound for an unknown id."""

    async def close(self) -> None:
        """Stop watching. Does NOT stop tasks: they survive the agent."""


# ------------------------------------------------------------------------------ small helpers


def describe_exit(code: int) -> str:
    """Human text for an exit code: "exit 3", "exit 137 (SIGKILL)"."""
    if 128 < code < 128 + signal.NSIG:
        with contextlib.suppress(ValueError):
            return f"exit {code} ({signal.Signals(code - 128).name})"
    return f"exit {code}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot), None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    """Child pids of a (single-threaded) process."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]
    except FileNotFoundError:
        pass  # the process is gone, or the kernel lacks CONFIG_PROC_CHILDREN: scan
    except OSError:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if len(fields) > 1 and fields[1] == str(pid).encode():
                found.append(int(entry.name))
    return found


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _tail(path: Path, limit: int = _LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return fh.read().decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class _ProcRef:
    """A process identified by pid + start time, safe against pid reuse (within one boot)."""

    pid: int
    ticks: int

    @classmethod
    def of(cls, pid: int) -> _ProcRef | None:
        ticks = _start_ticks(pid)
        return None if ticks is None else cls(pid, ticks)

    def open(self) -> int | None:
        """A pidfd for this very process, or None if it is gone (or a zombie: exited but not yet
        reaped, e.g. a shim a previous controller in this same process spawned; it is reaped)."""
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return None
        # Checked after opening: if the start time still matches, the fd pins the right process.
        if _start_ticks(self.pid) != self.ticks:
            os.close(fd)
            return None
        if select.select([fd], [], [], 0)[0]:  # a pidfd is readable once the process exited
            _reap(self.pid, fd)
            os.close(fd)
            return None
        return fd

    def to_json(self) -> list[int]:
        return [self.pid, self.ticks]

    @classmethod
    def from_json(cls, raw: Any) -> _ProcRef | None:
        if raw is None:
            return None
        return cls(int(raw[0]), int(raw[1]))


@dataclass
class _Notes:
    """What only the agent knows about how a task ended (TASKDIR/notes.json)."""

    stop_requested: bool = False
    killed: bool = False  # SIGKILL sent after the grace period
    not_found: str | None = None  # command not found: this program name

    @classmethod
    def load(cls, path: Path) -> _Notes:
        try:
            raw = json.loads(path.read_text())
            return cls(bool(raw["stop_requested"]), bool(raw["killed"]), raw.get("not_found"))
        except (OSError, ValueError, KeyError, TypeError):
            return cls()

    def save(self, path: Path) -> None:
        """Best effort: a full disk must not stop a stop(); only the message after a restart
        would suffer."""
        try:
            _atomic_write(path, json.dumps(dataclasses.asdict(self)))
        except OSError as exc:
            log.warning("runtime: cannot write %s: %s", path, exc)


def _exited(
    started_at: float,
    code: int | None,
    finished_at: float | None,
    notes: _Notes,
    unknown: str = "",
) -> RuntimeStatus:
    if code is None:
        message = unknown
    elif notes.not_found is not None and code == 127:
        message = f"command not found: {notes.not_found}"
    elif notes.killed and code == 128 + signal.SIGKILL:
        message = "killed (SIGKILL after grace period)"
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


# Shims this process spawned and has not reaped yet, by pid. Process-wide (not per controller):
# a controller re-created in the same process (agent restart in tests, reload) adopts them, and
# whichever controller sees one exit reaps it through its Popen, so Popen never warns about it.
_UNREAPED: dict[int, subprocess.Popen[bytes]] = {}


def _reap(pid: int, pidfd: int) -> None:
    """Reap an exited process if it is our child: one we spawned (through its Popen), or one
    that became ours (a shim of an earlier agent, when the agent is a child subreaper)."""
    proc = _UNREAPED.pop(pid, None)
    if proc is not None:
        if proc.poll() is None:
            _UNREAPED[pid] = proc  # pidfd said it exited; should not happen, keep it for later
        return
    with contextlib.suppress(ChildProcessError):  # not our child: its parent reaps it
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)


# ------------------------------------------------------------------------- the real controller


@dataclass
class _Task:
    cfg: TaskConfig
    dir: Path
    started_at: float
    status: RuntimeStatus
    done: asyncio.Future[None]  # resolved when the task is observed EXITED
    shim: _ProcRef | None
    init: _ProcRef | None = None
    notes: _Notes = field(default_factory=_Notes)
    watch_fd: int | None = None  # pidfd being watched: the shim's, or init's if the shim is gone
    watching_shim: bool = True
    init_fd: int | None = None  # pidfd used to signal init
    registered: bool = False  # visible in tasks() (False while start() is still deciding)


class ProcessController:
    """Runs tasks as real processes in namespaces. See the module docstring.

    All methods must be called from one event loop thread (the agent's), like the listener.
    """

    def __init__(self, config: RuntimeConfig) -> None:
        config.validate()
        self._cfg = config
        self._tasks: dict[str, _Task] = {}
        self._starting: set[str] = set()
        self._listener: Listener | None = None
        self._boot_id = _boot_id()
        self._loop: asyncio.AbstractEventLoop | None = None
        config.tasks_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- Controller interface

    def set_listener(self, cb: Listener | None) -> None:
        self._listener = cb

    def status(self, task_id: str) -> RuntimeStatus | None:
        task = self._tasks.get(task_id)
        return task.status if task is not None else None

    def tasks(self) -> dict[str, RuntimeStatus]:
        return {tid: t.status for tid, t in self._tasks.items()}

    def logs_path(self, task_id: str) -> tuple[Path, Path]:
        task = self._tasks.get(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task.dir / "stdout.log", task.dir / "stderr.log"

    async def start(self, cfg: TaskConfig) -> RuntimeStatus:
        cfg.validate()
        if cfg.task_id in self._tasks or cfg.task_id in self._starting:
            raise TaskExists(f"task {cfg.task_id} is already known")
        loop = self._bind_loop()
        taskdir = self._cfg.tasks_dir / cfg.task_id
        self._starting.add(cfg.task_id)
        try:
            try:
                taskdir.mkdir(mode=0o700)
            except FileExistsError as exc:
                raise TaskExists(f"task directory exists: {taskdir} (call recover()?)") from exc
            except OSError as exc:
                raise LaunchFailed(f"cannot create {taskdir}: {exc}") from exc
            try:
                return await self._launch(loop, cfg, taskdir)
            except BaseException:
                shutil.rmtree(taskdir, ignore_errors=True)
                raise
        finally:
            self._starting.discard(cfg.task_id)

    async def stop(self, task_id: str, grace: float) -> RuntimeStatus:
        task = self._tasks.get(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        if task.status.state is RunState.EXITED:
            return task.status
        if not task.notes.stop_requested:
            task.notes.stop_requested = True
            task.notes.save(task.dir / "notes.json")
        self._signal_init(task, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task.done), timeout=max(grace, 0.0))
        if not task.done.done():
            if not task.notes.killed:
                task.notes.killed = True
                task.notes.save(task.dir / "notes.json")
            self._signal_init(task, signal.SIGKILL)
            try:
                await asyncio.wait_for(asyncio.shield(task.done), timeout=self._cfg.kill_timeout)
            except TimeoutError as exc:
                raise StopFailed(f"task {task_id} still running after SIGKILL") from exc
        return task.status

    async def remove(self, task_id: str) -> None:
        task = self._tasks.get(task_id)
        if task is None:
            return
        if task.status.state is RunState.RUNNING:
            await self.stop(task_id, self._cfg.remove_grace)
        self._unwatch(task)
        del self._tasks[task_id]
        shutil.rmtree(task.dir, ignore_errors=True)

    async def close(self) -> None:
        for task in self._tasks.values():
            self._unwatch(task)
            if not task.done.done():
                task.done.cancel()
        self._tasks.clear()

    async def recover(self) -> None:
        self._bind_loop()
        try:
            entries = sorted(self._cfg.tasks_dir.iterdir())
        except OSError as exc:
            log.error("runtime: cannot list %s: %s", self._cfg.tasks_dir, exc)
            return
        for taskdir in entries:
            if taskdir.name in self._tasks or not taskdir.is_dir():
                continue
            try:
                cfg = TaskConfig.from_json((taskdir / "config.json").read_text())
                if cfg.task_id != taskdir.name:
                    raise ValueError(f"task_id {cfg.task_id!r} does not match the directory")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("runtime: ignoring %s: unreadable config.json (%s)", taskdir, exc)
                continue
            self._adopt(cfg, taskdir)

    # -- launching

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("ProcessController used from two event loops")
        return loop

    def _launcher_env(self, cfg: TaskConfig) -> dict[str, str]:
        c = self._cfg
        return {
            "PATH": _LAUNCHER_PATH,
            "LC_ALL": "C",
            "SHOAL_UNSHARE": c.unshare_path,
            "SHOAL_SH": c.sh_path,
            "SHOAL_IP": c.ip_path,
            "SHOAL_TINI": c.tini_path,
            "SHOAL_ENV": c.env_path,
            "SHOAL_WORKDIR": cfg.workdir or "/",
            "SHOAL_TASK_PATH": cfg.full_env()["PATH"],
        }

    async def _launch(
        self, loop: asyncio.AbstractEventLoop, cfg: TaskConfig, taskdir: Path
    ) -> RuntimeStatus:
        env_words = " ".join(shlex.quote(f"{k}={v}") for k, v in cfg.full_env().items())
        try:
            _atomic_write(taskdir / "config.json", cfg.to_json())
            _atomic_write(taskdir / "env", f'set -- {env_words} "$@"\n', mode=0o600)
            for name in ("stdout.log", "stderr.log"):
                (taskdir / name).touch(mode=0o640)
            shim_log = os.open(
                taskdir / "shim.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
            )
        except OSError as exc:
            raise LaunchFailed(f"cannot prepare {taskdir}: {exc}") from exc
        go_r, go_w = os.pipe()
        ready_r, ready_w = os.pipe()
        started_at = time.time()
        try:
            proc = subprocess.Popen(
                [
                    self._cfg.sh_path,
                    self._cfg.shim_path,
                    "shim",
                    str(taskdir),
                    cfg.hostname,
                    "--",
                    *cfg.command,
                ],
                stdin=go_r,
                stdout=ready_w,
                stderr=shim_log,
                env=self._launcher_env(cfg),
                cwd="/",
                close_fds=True,
                start_new_session=True,
                restore_signals=True,
            )
        except OSError as exc:
            for fd in (go_r, go_w, ready_r, ready_w):
                os.close(fd)
            raise LaunchFailed(f"cannot spawn the shim: {exc}") from exc
        finally:
            os.close(shim_log)
        os.close(go_r)
        os.close(ready_w)
        _UNREAPED[proc.pid] = proc
        task = _Task(
            cfg=cfg,
            dir=taskdir,
            started_at=started_at,
            status=RuntimeStatus(RunState.RUNNING, pid=None, started_at=started_at),
            done=loop.create_future(),
            shim=_ProcRef.of(proc.pid),
        )
        shim_fd = task.shim.open() if task.shim is not None else None
        if shim_fd is None:  # cannot happen while it waits for "go"
            os.close(go_w)
            os.close(ready_r)
            raise LaunchFailed(f"task {cfg.task_id}: the shim died right after spawn")
        self._watch(task, shim_fd, shim=True)
        try:
            self._write_pids(task)
            os.write(go_w, b"g\n")  # the shim may start the task now: it is recorded
        except OSError as exc:
            os.close(ready_r)
            await self._abandon(task)  # EOF instead of "g": the shim starts nothing
            raise LaunchFailed(f"cannot record task {cfg.task_id}: {exc}") from exc
        finally:
            os.close(go_w)
        try:
            ready = await asyncio.wait_for(self._read_byte(loop, ready_r), self._cfg.start_timeout)
        except TimeoutError:
            await self._abandon(task)
            raise LaunchFailed(
                f"task {cfg.task_id}: launcher not ready after {self._cfg.start_timeout}s; "
                f"shim.log: {_tail(taskdir / 'shim.log')!r}"
            ) from None
        except BaseException:
            await self._abandon(task)
            raise
        if ready == b"R":
            if task.status.state is RunState.RUNNING:
                self._find_init(task)
        elif ready == b"N":
            task.notes.not_found = cfg.command[0]
            task.notes.save(taskdir / "notes.json")
            await self._wait_done(task)
            if task.status.state is RunState.EXITED:  # may have been seen before the notes
                st = task.status
                task.status = _exited(st.started_at, st.exit_code, st.finished_at, task.notes)
        else:  # EOF: the launcher failed; the shim has exited (it held the pipe)
            await self._wait_done(task)
            self._unwatch(task)
            code, _ = self._read_exit(taskdir)
            reason = _tail(taskdir / "shim.log") or _tail(taskdir / "stderr.log") or "no message"
            raise LaunchFailed(f"task {cfg.task_id}: launcher failed (exit {code}): {reason}")
        task.registered = True
        self._tasks[cfg.task_id] = task
        return task.status

    @staticmethod
    async def _read_byte(loop: asyncio.AbstractEventLoop, fd: int) -> bytes:
        """One byte from a pipe (b"" on EOF) without blocking the loop. Closes fd."""
        fut: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            if not fut.done():
                try:
                    fut.set_result(os.read(fd, 1))
                except OSError as exc:
                    fut.set_exception(exc)

        loop.add_reader(fd, readable)
        try:
            return await fut
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    async def _wait_done(self, task: _Task) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task.done), self._cfg.kill_timeout)

    async def _abandon(self, task: _Task) -> None:
        """Kill a launch that failed half-way (its whole session: shim, holder, init; the task
        cannot have left it yet) and wait until the watched shim is reaped."""
        if not task.done.done() and task.shim is not None:
            # Safe: the shim is our unreaped child until _on_exit resolves `done`.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(task.shim.pid, signal.SIGKILL)
        self._signal_init(task, signal.SIGKILL)
        await self._wait_done(task)
        self._unwatch(task)

    def _find_init(self, task: _Task) -> None:
        """shim -> holder -> init (the task's pid 1), recorded once the launcher reported ready."""
        if task.shim is None or task.init is not None:
            return
        holders = _children(task.shim.pid)
        inits = _children(holders[0]) if len(holders) == 1 else []
        if len(inits) != 1:
            return  # already gone (a very short task): its exit is on its way
        task.init = _ProcRef.of(inits[0])
        if task.init is None:
            return
        task.init_fd = task.init.open()
        if task.init_fd is None:
            task.init = None
            return
        try:
            self._write_pids(task)
        except OSError as exc:
            log.warning("runtime: cannot record init pid of %s: %s", task.cfg.task_id, exc)
        task.status = dataclasses.replace(task.status, pid=task.init.pid)

    def _write_pids(self, task: _Task) -> None:
        _atomic_write(
            task.dir / "pids.json",
            json.dumps(
                {
                    "boot_id": self._boot_id,
                    "started_at": task.started_at,
                    "shim": task.shim.to_json() if task.shim else None,
                    "init": task.init.to_json() if task.init else None,
                }
            ),
        )

    def _signal_init(self, task: _Task, sig: signal.Signals) -> None:
        if task.init is None:
            self._find_init(task)
        if task.init_fd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(task.init_fd, sig)
        elif sig == signal.SIGKILL and task.shim is not None and task.watching_shim:
            # init unknown (agent died mid-start): the whole session is the task's.
            fd = task.shim.open()
            if fd is not None:
                os.close(fd)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(task.shim.pid, sig)

    # -- watching

    def _watch(self, task: _Task, fd: int, *, shim: bool) -> None:
        assert self._loop is not None
        task.watch_fd = fd
        task.watching_shim = shim
        self._loop.add_reader(fd, self._on_exit, task)

    def _unwatch(self, task: _Task) -> None:
        for attr in ("watch_fd", "init_fd"):
            fd = getattr(task, attr)
            if fd is not None:
                if attr == "watch_fd" and self._loop is not None:
                    self._loop.remove_reader(fd)
                os.close(fd)
                setattr(task, attr, None)

    def _on_exit(self, task: _Task) -> None:
        """The watched pidfd is readable: that process has exited."""
        assert self._loop is not None and task.watch_fd is not None
        fd, was_shim = task.watch_fd, task.watching_shim
        self._loop.remove_reader(fd)
        if was_shim and task.shim is not None:
            _reap(task.shim.pid, fd)
        os.close(fd)
        task.watch_fd = None
        code, _ = self._read_exit(task.dir)
        if was_shim and code is None and task.init is not None:
            init_fd = task.init.open()
            if init_fd is not None:  # the shim died, not the task: watch the task itself
                log.warning("runtime: shim of %s died; watching its init", task.cfg.task_id)
                self._watch(task, init_fd, shim=False)
                return
        lost = (
            "exit status unknown: the shim died before the task"
            if task.init is not None
            else "exit status unknown: the launcher died before recording it"
        )
        self._finish(task, _exited(task.started_at, code, time.time(), task.notes, lost))

    def _finish(self, task: _Task, status: RuntimeStatus) -> None:
        task.status = status
        if task.init_fd is not None:
            os.close(task.init_fd)
            task.init_fd = None
        if not task.done.done():
            task.done.set_result(None)
        if task.registered and self._listener is not None:
            try:
                self._listener(task.cfg.task_id)
            except Exception:
                log.exception("runtime: task listener failed for %s", task.cfg.task_id)

    @staticmethod
    def _read_exit(taskdir: Path) -> tuple[int | None, float | None]:
        """The shim's exit code and the file's mtime (coarse: a few ms early is possible)."""
        path = taskdir / "exit"
        try:
            text = path.read_text()
            return int(text.strip()), path.stat().st_mtime
        except (OSError, ValueError):
            return None, None

    # -- recovery

    def _adopt(self, cfg: TaskConfig, taskdir: Path) -> None:
        assert self._loop is not None
        notes = _Notes.load(taskdir / "notes.json")
        done: asyncio.Future[None] = self._loop.create_future()
        try:
            pids = json.loads((taskdir / "pids.json").read_text())
            started_at = float(pids["started_at"])
            same_boot = pids.get("boot_id") == self._boot_id
            shim = _ProcRef.from_json(pids.get("shim"))
            init = _ProcRef.from_json(pids.get("init"))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            # The agent died before recording the shim, so the shim never got "go".
            started_at = (taskdir / "config.json").stat().st_mtime
            status = _exited(started_at, None, started_at, notes, "never started: agent died")
            done.set_result(None)
            self._register(_Task(cfg, taskdir, started_at, status, done, None, notes=notes))
            return
        running = RuntimeStatus(RunState.RUNNING, pid=None, started_at=started_at)
        task = _Task(cfg, taskdir, started_at, running, done, shim, init, notes)
        shim_fd = shim.open() if shim is not None and same_boot else None
        if shim_fd is not None:  # still running: watch the shim, it records the exit code
            task.init_fd = init.open() if init is not None else None
            if task.init_fd is None:
                task.init = None
                self._find_init(task)
            elif init is not None:
                task.status = dataclasses.replace(running, pid=init.pid)
            self._watch(task, shim_fd, shim=True)
            self._register(task)
            return
        code, mtime = self._read_exit(taskdir)
        finished_at = max(mtime, started_at) if mtime is not None else None
        init_fd = init.open() if init is not None and same_boot and code is None else None
        if init is not None and init_fd is not None:  # the shim died, the task runs on
            log.warning("runtime: shim of %s is gone; watching its init", cfg.task_id)
            task.init_fd = init.open()
            task.status = dataclasses.replace(running, pid=init.pid)
            self._watch(task, init_fd, shim=False)
        else:
            reason = (
                "exit status unknown: the shim died without recording it"
                if same_boot
                else "exit status unknown: the host rebooted"
            )
            task.status = _exited(started_at, code, finished_at, notes, reason)
            done.set_result(None)
        self._register(task)

    def _register(self, task: _Task) -> None:
        task.registered = True
        self._tasks[task.cfg.task_id] = task


# ------------------------------------------------------------------------- the fake controller


class FakeController:
    """In-memory Controller for unit tests of the reconciler. No processes.

    Behaves like ProcessController: start() validates and returns RUNNING (or EXITED 127 for a
    program listed in ``missing_commands``); stop() ends the task with 143 (or, for a task started
    with a program in ``ignores_term``, 137 "killed (SIGKILL after grace period)"); the listener is
    called via loop.call_soon when a task exits. Tests drive exits with :meth:`exit`.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        missing_commands: frozenset[str] = frozenset(),
        ignores_term: frozenset[str] = frozenset(),
        log_dir: Path = Path("/nonexistent/shoal-fake"),
    ) -> None:
        self._clock = clock
        self.missing_commands = missing_commands
        self.ignores_term = ignores_term
        self._log_dir = log_dir
        self._configs: dict[str, TaskConfig] = {}
        self._status: dict[str, RuntimeStatus] = {}
        self._listener: Listener | None = None
        self._next_pid = 10_000
        self.start_error: Exception | None = None  # raised (once) by the next start()
        self.closed = False

    def set_listener(self, cb: Listener | None) -> None:
        self._listener = cb

    def status(self, task_id: str) -> RuntimeStatus | None:
        return self._status.get(task_id)

    def tasks(self) -> dict[str, RuntimeStatus]:
        return dict(self._status)

    def config(self, task_id: str) -> TaskConfig:
        """The TaskConfig a task was started with (test helper)."""
        return self._configs[task_id]

    def logs_path(self, task_id: str) -> tuple[Path, Path]:
        if task_id not in self._status:
            raise TaskNotFound(task_id)
        return self._log_dir / task_id / "stdout.log", self._log_dir / task_id / "stderr.log"

    async def recover(self) -> None:
        return None

    async def start(self, cfg: TaskConfig) -> RuntimeStatus:
        cfg.validate()
        if self.start_error is not None:
            err, self.start_error = self.start_error, None
            raise err
        if cfg.task_id in self._status:
            raise TaskExists(f"task {cfg.task_id} is already known")
        now = self._clock()
        self._configs[cfg.task_id] = cfg
        if cfg.command[0] in self.missing_commands:
            status = RuntimeStatus(
                RunState.EXITED, None, now, 127, now, f"command not found: {cfg.command[0]}"
            )
        else:
            self._next_pid += 1
            status = RuntimeStatus(RunState.RUNNING, self._next_pid, now)
        self._status[cfg.task_id] = status
        return status

    def exit(self, task_id: str, code: int, *, message: str = "", stopped: bool = False) -> None:
        """Make a running task end with ``code`` (test driver); notifies the listener."""
        status = self._status.get(task_id)
        if status is None:
            raise TaskNotFound(task_id)
        if status.state is RunState.EXITED:
            return
        self._status[task_id] = dataclasses.replace(
            status,
            state=RunState.EXITED,
            pid=None,
            exit_code=code,
            finished_at=self._clock(),
            message=message or describe_exit(code),
            stopped=stopped,
        )
        if self._listener is not None:
            asyncio.get_running_loop().call_soon(self._listener, task_id)

    async def stop(self, task_id: str, grace: float) -> RuntimeStatus:
        status = self._status.get(task_id)
        if status is None:
            raise TaskNotFound(task_id)
        if status.state is RunState.RUNNING:
            if self._configs[task_id].command[0] in self.ignores_term:
                self.exit(task_id, 137, message="killed (SIGKILL after grace period)", stopped=True)
            else:
                self.exit(task_id, 143, stopped=True)
        return self._status[task_id]

    async def remove(self, task_id: str) -> None:
        if task_id in self._status:
            await self.stop(task_id, 0.0)
            del self._status[task_id]
            del self._configs[task_id]

    async def close(self) -> None:
        self.closed = True


def _conforms(real: ProcessController, fake: FakeController) -> tuple[Controller, Controller]:
    """Never called: makes mypy check that both classes satisfy the Controller protocol."""
    return real, fake


__all__ = [
    "DEFAULT_PATH",
    "Controller",
    "FakeController",
    "ProcessController",
    "RunState",
    "RuntimeConfig",
    "RuntimeStatus",
    "TaskConfig",
    "describe_exit",
]
