"""The per-node task controller: runs each task as a container (namespaces, cgroups, its own root
filesystem, reduced capabilities), in the manner of runc / Nomad's exec driver.

Owns: ``RuntimeConfig.data_dir`` / ``tasks`` (one directory per task), ``images`` (the image
store, runtime/images.py), ``volumes`` (named volumes), ``bin`` (the compiled launcher) and
``mnt`` (an empty directory: each task's staging tmpfs is mounted there, in the task's own mount
namespace; see runtime/rootfs.py), the task cgroups (runtime/cgroups.py), and the processes
started from them: one launcher/shim per task (runtime/launcher.c, see its header for the
process tree) and the task under it.
Must not touch: cluster state (the agent's reconciler decides what runs; this module only does it),
networking beyond bringing the task's own ``lo`` up, and anything outside data_dir except the
task's own cgroups.

The agent is never forked to launch a task: the compiled launcher is exec'ed per task
(``subprocess`` uses vfork: 0.13 ms at small RSS where fork costs ~65 ms at 1 GB; and unlike
``os.posix_spawn`` it leaves no signal ignored in the child). The launcher stays outside the task
as its shim: it pumps the task's output into rotated log files, waits for it and writes its exit
code to ``TASKDIR/exit``, so tasks survive an agent restart and a restarted agent learns how they
ended (:meth:`ProcessController.recover`).

Start order (what overlaps what): check what the user can get wrong (image, user, limits), make
the task directory, spawn the launcher (it clones the task's namespaces and waits for its spec
meanwhile), prepare the task (files, config.json, cgroups, runtime.json, the spec), record the
shim in pids.json, send the spec (the "go"), wait for the ready pipe's EOF (tini exec'ed; the
shim reports the init's pid on the same pipe), record the init. A failure before the go closes
the spec pipe unfinished: the launcher starts nothing and is killed and reaped.

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

Exit detection uses a pidfd per watched process (``os.pidfd_open`` + ``loop.add_reader``), which
works for adopted shims that are not our children; nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import enum
import errno
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shoal.runtime import cgroups as cg_mod
from shoal.runtime import logs as logs_mod
from shoal.runtime.cgroups import CgroupLayout, Limits, TaskCgroups, TaskUsage
from shoal.runtime.errors import (
    CgroupError,
    ConfigError,
    ImageNotFound,
    ImageUnavailable,
    InvalidTaskConfig,
    LaunchFailed,
    StopFailed,
    TaskExists,
    TaskNotFound,
    VolumeInUse,
)
from shoal.runtime.images import ImageConfig, ImageStore
from shoal.runtime.launcher import Spec, ensure_launcher
from shoal.runtime.logs import LogLine
from shoal.runtime.rootfs import (
    INIT_IN_TASK,
    MountSpec,
    RootfsPlan,
    User,
    build_plan,
    cap_name,
    capability_mask,
    check_task_path,
    hosts_file,
    read_rootfs_file,
    resolv_conf,
    resolve_user,
    root_dir,
    valid_volume_name,
)

log = logging.getLogger(__name__)

#: PATH given to a task whose env has none (Docker's default).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_TASK_ID_RE = re.compile(r"[a-z0-9]{1,64}")
# RFC 1123 host name; the kernel takes at most 64 bytes.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,64}}$){_LABEL}(\.{_LABEL})*")
_USER_RE = re.compile(r"[^:\s\0]+(:[^:\s\0]+)?")
_IMAGE_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,254}")
_LOG_TAIL_BYTES = 2000
_MAX_FILES_BYTES = 4 << 20
_MIN_MEMORY = 4 << 20
_FORBIDDEN_FILE_DIRS = ("/proc", "/sys", "/dev")


def parse_signal(value: str) -> signal.Signals:
    """A signal from "SIGTERM", "TERM", "term" or "15". Raise ValueError if unknown."""
    text = value.strip()
    if text.isdigit():
        return signal.Signals(int(text))
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"unknown signal: {value!r}") from None


# --------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class TaskConfig:
    """What to run. Immutable; stored as TASKDIR/config.json (without the files' contents)."""

    task_id: str  # unique, [a-z0-9]{1,64}: directory and cgroup name
    hostname: str  # set in the task's UTS namespace (RFC 1123, <= 64 bytes)
    command: tuple[str, ...]  # argv; command[0] is looked up in the task's PATH, from workdir,
    #                           inside the task's root filesystem, as the task's user
    env: dict[str, str]  # the task's whole environment; PATH=DEFAULT_PATH is added if absent
    workdir: str = ""  # absolute cwd inside the task; "" = "/"
    # --- since the "tasks as real containers" issue; all optional
    image: str = ""  # image reference in this node's store ("name[:tag]", "sha256:<id>", id
    #                  prefix); "" = the default image (read-only host /usr, /etc, /lib*...)
    user: str = ""  # "name", "uid", "name:group" or "uid:gid", resolved against the task's own
    #                 /etc/passwd and /etc/group; "" = root (uid 0) inside the task
    stop_signal: str = "SIGTERM"  # sent by stop() before the grace period ("SIGQUIT", "15"...)
    memory_limit: int = 0  # bytes (>= 4 MiB), 0 = unlimited; swap is always off
    cpu_limit: float = 0.0  # CPUs (0.5 = half a core, CFS quota), 0 = unlimited
    pids_limit: int = 0  # max processes + threads, 0 = unlimited
    cap_add: tuple[str, ...] = ()  # capabilities added to Docker's default set ("NET_ADMIN",
    #                                "ALL"); cap_drop is applied first
    cap_drop: tuple[str, ...] = ()  # capabilities removed from the default set ("ALL" = all)
    mounts: tuple[MountSpec, ...] = ()  # bind / volume / tmpfs, see rootfs.MountSpec
    files: Mapping[str, tuple[bytes, int]] = field(default_factory=dict)  # target path ->
    #   (content, mode), written into a tmpfs inside the task (never to disk), read-only, owned
    #   by the task's user: secrets (/run/secrets/NAME, 0o400) and configs
    extra_hosts: tuple[tuple[str, str], ...] = ()  # (name, ip) lines added to /etc/hosts

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
            # Kept from the env(1)-based launcher: a '=' in a program name is almost surely a
            # misplaced variable.
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
        if self.image and not _IMAGE_REF_RE.fullmatch(self.image):
            raise InvalidTaskConfig("image", f"not an image reference: {self.image!r}")
        if self.user and not _USER_RE.fullmatch(self.user):
            raise InvalidTaskConfig("user", f"expected user, uid, user:group or uid:gid: "
                                    f"{self.user!r}")  # fmt: skip
        try:
            parse_signal(self.stop_signal)
        except ValueError as exc:
            raise InvalidTaskConfig("stop_signal", str(exc)) from None
        self._validate_limits()
        for name in ("cap_add", "cap_drop"):
            for cap in getattr(self, name):
                try:
                    cap_name(cap)
                except (ValueError, AttributeError) as exc:
                    raise InvalidTaskConfig(name, str(exc)) from None
        self._validate_mounts_and_files()

    def _validate_limits(self) -> None:
        if not isinstance(self.memory_limit, int) or self.memory_limit < 0 or (
            0 < self.memory_limit < _MIN_MEMORY
        ):
            raise InvalidTaskConfig("memory_limit", f"must be 0 or >= {_MIN_MEMORY} bytes")
        if not isinstance(self.cpu_limit, int | float) or not 0 <= self.cpu_limit <= 4096:
            raise InvalidTaskConfig("cpu_limit", "must be a number of CPUs >= 0")
        if not isinstance(self.pids_limit, int) or self.pids_limit < 0:
            raise InvalidTaskConfig("pids_limit", "must be an integer >= 0")

    def _validate_mounts_and_files(self) -> None:
        targets: set[str] = set()
        for m in self.mounts:
            if not isinstance(m, MountSpec):
                raise InvalidTaskConfig("mounts", f"not a MountSpec: {m!r}")
            problem = m.problem()
            if problem:
                raise InvalidTaskConfig("mounts", problem)
            if m.target in targets:
                raise InvalidTaskConfig("mounts", f"two mounts on {m.target}")
            targets.add(m.target)
        total = 0
        for target, value in self.files.items():
            bad = check_task_path(target)
            if bad or target == "/" or any(
                target == d or target.startswith(d + "/") for d in _FORBIDDEN_FILE_DIRS
            ):
                raise InvalidTaskConfig("files", bad or f"not a file target: {target!r}")
            if target in targets:
                raise InvalidTaskConfig("files", f"{target} is also a mount target")
            if (
                not isinstance(value, tuple)
                or len(value) != 2
                or not isinstance(value[0], bytes)
                or not isinstance(value[1], int)
                or not 0 <= value[1] <= 0o7777
            ):
                raise InvalidTaskConfig("files", f"{target}: expected (bytes, mode)")
            total += len(value[0])
        if total > _MAX_FILES_BYTES:
            raise InvalidTaskConfig("files", f"more than {_MAX_FILES_BYTES} bytes in all")
        for pair in self.extra_hosts:
            if (
                not isinstance(pair, tuple)
                or len(pair) != 2
                or not _HOSTNAME_RE.fullmatch(pair[0])
                or not re.fullmatch(r"[0-9A-Fa-f:.]{2,45}", pair[1])
            ):
                raise InvalidTaskConfig("extra_hosts", f"expected (hostname, ip): {pair!r}")

    def full_env(self) -> dict[str, str]:
        """The environment the command gets: ``env`` plus the default PATH if it has none."""
        return self.env if "PATH" in self.env else {**self.env, "PATH": DEFAULT_PATH}

    def limits(self) -> Limits:
        return Limits(self.memory_limit, float(self.cpu_limit), self.pids_limit)

    def to_json(self) -> str:
        raw = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "files"
        }
        raw["mounts"] = [dataclasses.asdict(m) for m in self.mounts]
        # Never the contents: they may be secrets. What was there is enough for inspection.
        raw["files"] = {t: {"mode": m, "size": len(d)} for t, (d, m) in self.files.items()}
        return json.dumps(raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TaskConfig:
        """The config as stored; ``files`` come back empty (their contents are never stored)."""
        raw = json.loads(text)
        return cls(
            task_id=str(raw["task_id"]),
            hostname=str(raw["hostname"]),
            command=tuple(str(a) for a in raw["command"]),
            env={str(k): str(v) for k, v in raw["env"].items()},
            workdir=str(raw.get("workdir", "")),
            image=str(raw.get("image", "")),
            user=str(raw.get("user", "")),
            stop_signal=str(raw.get("stop_signal", "SIGTERM")),
            memory_limit=int(raw.get("memory_limit", 0)),
            cpu_limit=float(raw.get("cpu_limit", 0.0)),
            pids_limit=int(raw.get("pids_limit", 0)),
            cap_add=tuple(raw.get("cap_add", ())),
            cap_drop=tuple(raw.get("cap_drop", ())),
            mounts=tuple(MountSpec(**m) for m in raw.get("mounts", ())),
            extra_hosts=tuple((str(a), str(b)) for a, b in raw.get("extra_hosts", ())),
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
    message: str = ""  # "exit 0", "exit 143 (SIGTERM)", "killed (SIGKILL after grace period)",
    #                    "OOM killed"...
    stopped: bool = False  # it ended because stop() (or remove()) was called


@dataclass
class RuntimeConfig:
    """Settings of the task runtime. Paths must be absolute; times are seconds."""

    # Root of the runtime's state: tasks/, images/, volumes/, bin/ live below it. Must be on a
    # local filesystem that survives an agent restart and supports overlayfs upper dirs (ext4,
    # xfs, tmpfs; not NFS). No default.
    data_dir: Path
    # A *static* tini (Debian package `tini` ships /usr/bin/tini-static): bind-mounted read-only
    # at /dev/init in every task as its pid 1 (reaps zombies, forwards signals, returns the
    # command's exit code, 128+N for signal N). Static, so it runs in any image.
    tini_path: str = "/usr/bin/tini-static"
    # The compiled launcher (runtime/launcher.c). "" = build it with `cc_path` into
    # data_dir/bin on first use (~0.5 s once per source version; needs gcc + libc6-dev).
    launcher_path: str = ""
    # C compiler used when launcher_path is "".
    cc_path: str = "cc"
    # How long start() waits for the launcher to report ready (cgroups + namespaces + mounts +
    # lookup) before killing it and raising LaunchFailed. Normal: a few ms.
    start_timeout: float = 10.0
    # How long stop() waits for the task to be gone after SIGKILL before raising StopFailed
    # (a process in uninterruptible sleep, e.g. hung NFS, can outlive SIGKILL for a while).
    kill_timeout: float = 10.0
    # Grace period remove() gives a task that is still running (stop signal, then SIGKILL).
    # 0 = SIGKILL at once, like `docker rm -f`.
    remove_grace: float = 0.0
    # "auto": put every task in its own cgroups (limits, usage, OOM evidence, cgroup kill) using
    # whatever the host offers (v2, v1, hybrid; see runtime/cgroups.py); "off": no cgroups
    # (rootless hosts), and tasks with limits are refused.
    cgroups: str = "auto"
    # Parent of the task groups in each hierarchy: <mount>/<cgroup_parent>/<task_id>.
    cgroup_parent: str = "shoal"
    # Log rotation: a stream's file is rotated before it would exceed log_max_bytes; at most
    # log_max_files files per stream are kept (the active one included; 1 = truncate in place).
    # Trade-off: disk per task = 2 streams x bytes x files (default 60 MiB at most).
    log_max_bytes: int = 10 << 20
    log_max_files: int = 3
    # The default image (tasks without an image): host paths bound read-only into the task.
    # Symlinks (Debian's /bin -> usr/bin) are recreated as symlinks; missing ones are skipped.
    default_rootfs: tuple[str, ...] = (
        "/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
    )  # fmt: skip
    # Host paths hidden inside default-image tasks (/etc is shared with the host otherwise).
    default_masked: tuple[str, ...] = (
        "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/ssh",
    )  # fmt: skip
    # Copied (without loopback name servers) as each task's /etc/resolv.conf.
    resolv_conf: str = "/etc/resolv.conf"
    # Size of each task's /dev/shm tmpfs (bytes; counts against its memory limit when used).
    dev_shm_size: int = 64 << 20

    @property
    def tasks_dir(self) -> Path:
        return Path(self.data_dir) / "tasks"

    @property
    def images_dir(self) -> Path:
        return Path(self.data_dir) / "images"

    @property
    def volumes_dir(self) -> Path:
        return Path(self.data_dir) / "volumes"

    @property
    def mnt_dir(self) -> Path:
        """Empty on the host: each task's launcher mounts its staging tmpfs here, in the task's
        own mount namespace (see runtime/rootfs.py)."""
        return Path(self.data_dir) / "mnt"

    def validate(self) -> None:
        """Raise ConfigError unless tini exists and every value is sane."""
        if not os.path.isabs(self.tini_path) or not os.access(self.tini_path, os.X_OK):
            raise ConfigError(f"tini_path: not an executable absolute path: {self.tini_path!r}"
                              " (Debian: apt install tini)")  # fmt: skip
        if self.launcher_path and not os.access(self.launcher_path, os.X_OK):
            raise ConfigError(f"launcher_path: not executable: {self.launcher_path!r}")
        if self.start_timeout <= 0 or self.kill_timeout <= 0 or self.remove_grace < 0:
            raise ConfigError("start_timeout and kill_timeout must be > 0, remove_grace >= 0")
        if self.cgroups not in ("auto", "off"):
            raise ConfigError(f"cgroups: must be 'auto' or 'off': {self.cgroups!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.cgroup_parent):
            raise ConfigError(f"cgroup_parent: one path component please: {self.cgroup_parent!r}")
        if self.log_max_bytes < 4096 or self.log_max_files < 1:
            raise ConfigError("log_max_bytes must be >= 4096 and log_max_files >= 1")
        if self.dev_shm_size <= 0:
            raise ConfigError("dev_shm_size must be > 0")


Listener = Callable[[str], None]
# start()'s hook: called with the host pid of the task's init once its namespaces exist and
# before anything of the task runs (the agent attaches the task's network there)
BeforeStart = Callable[[int], Awaitable[None]]


class Controller(Protocol):
    """What the agent uses. ProcessController is real, FakeController in memory."""

    async def recover(self) -> None:
        """After an agent restart: adopt tasks still running, learn how the others ended."""

    async def start(self, cfg: TaskConfig, before_start: BeforeStart | None = None
                    ) -> RuntimeStatus:
        """Launch a task; return its status (RUNNING, or EXITED if it already ended, e.g. command
        not found). Raise StartError if it could not be started at all. ``before_start(pid)``
        runs once the task's namespaces exist (``pid``: its init, as the host sees it) and
        before its command or mounts; if it raises, nothing of the task runs and start raises
        LaunchFailed."""

    async def stop(self, task_id: str, grace: float) -> RuntimeStatus:
        """Send the task's stop signal to its init, SIGKILL after `grace` s; the whole tree (and
        cgroup) dies. Return the final EXITED status. Idempotent. TaskNotFound if unknown."""

    def status(self, task_id: str) -> RuntimeStatus | None: ...

    def tasks(self) -> dict[str, RuntimeStatus]:
        """Every task known (running or exited, not yet removed)."""

    async def remove(self, task_id: str) -> None:
        """Stop (remove_grace) if running, delete its cgroups and directory (its writable layer
        included), forget it. Unknown id: no-op."""

    def set_listener(self, cb: Listener | None) -> None:
        """cb(task_id) is called on the event loop whenever a task this controller watches exits."""

    def logs_path(self, task_id: str) -> tuple[Path, Path]:
        """(stdout, stderr) active log files (record format: runtime/logs.py). TaskNotFound."""

    def usage(self, task_id: str) -> TaskUsage | None:
        """Memory (current, peak) and CPU time of a task; None if unknown or no cgroups."""

    def read_logs(
        self,
        task_id: str,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> list[LogLine]:
        """The task's output lines (both streams, time order). TaskNotFound if unknown."""

    def follow_logs(
        self,
        task_id: str,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> AsyncIterator[LogLine]:
        """read_logs, then new lines as they come, until the task has ended."""

    def image_config(self, ref: str) -> ImageConfig:
        """The config (Entrypoint, Cmd, Env, WorkingDir, User) of an image on this node, for
        ImageConfig.apply(); ImageUnavailable (a StartError) if it is not here."""

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
    stat = _proc_stat(pid)
    return stat[1] if stat is not None else None


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) from /proc/PID/stat; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb", buffering=0) as fh:
            raw = fh.read(4096)
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[1]), int(fields[19])
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

    @classmethod
    def open_pid(cls, pid: int, parent: int | None = None) -> tuple[_ProcRef, int] | None:
        """A reference to the process now at ``pid`` and a pidfd for it (one /proc read instead
        of :meth:`of` + :meth:`open`); None if it is gone, has exited, or (``parent`` given) is
        not that process's child, i.e. the pid was reused."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        # Read after opening: what the fd pins is what we describe.
        stat = _proc_stat(pid)
        if stat is None or (parent is not None and stat[0] != parent):
            os.close(fd)
            return None
        ref = cls(pid, stat[1])
        if select.select([fd], [], [], 0)[0]:  # exited already (see open())
            _reap(pid, fd)
            os.close(fd)
            return None
        return ref, fd

    def to_json(self) -> list[int]:
        return [self.pid, self.ticks]

    @classmethod
    def read(cls, path: Path) -> _ProcRef | None:
        """The "PID TICKS" the shim records in TASKDIR/init.pid; None if absent or unreadable."""
        try:
            pid, ticks = path.read_text().split()
            return cls(int(pid), int(ticks))
        except (OSError, ValueError):
            return None

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


@dataclass(frozen=True)
class _Plan:
    """What start() resolved before making anything (see ProcessController._resolve)."""

    layers: list[Path] | None  # image layers, top first; None = the default image
    image_id: str
    user: User
    volumes: tuple[str, ...]  # named volumes the task mounts


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
    cgroups: TaskCgroups | None = None
    image_id: str = ""
    volumes: tuple[str, ...] = ()


_libc = ctypes.CDLL(None, use_errno=True)
# The shim's report of the init's host pid on the ready pipe (runtime/launcher.c).
_PID_RECORD = re.compile(rb"P([0-9]+)\n")
_MNT_DETACH = 2
# SigIgn bits of SIGTTIN and SIGTTOU: tini ignores them once its signal handling is set up.
_TINI_READY = 1 << (signal.SIGTTIN - 1) | 1 << (signal.SIGTTOU - 1)


def _mounts_under(path: Path) -> list[str]:
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


def _safe_rmtree(path: Path) -> None:
    """Delete a task directory, first detaching anything mounted below it (defensive: a bug
    must never make rmtree walk into a bind of the host's /usr)."""
    for mp in sorted(_mounts_under(path), key=len, reverse=True):
        if _libc.umount2(mp.encode(), _MNT_DETACH) != 0:
            log.error("runtime: cannot detach %s: errno %d; not deleting %s",
                      mp, ctypes.get_errno(), path)  # fmt: skip
            return
    shutil.rmtree(path, ignore_errors=True)


class ProcessController:
    """Runs tasks as containers. See the module docstring.

    All methods must be called from one event loop thread (the agent's), like the listener.
    ImageStore methods (``self.images``) block: call them from a thread.
    """

    def __init__(self, config: RuntimeConfig) -> None:
        config.validate()
        self._cfg = config
        self._tasks: dict[str, _Task] = {}
        self._starting: set[str] = set()
        self._starting_images: dict[str, str] = {}  # task id -> image id, while starting
        self._listener: Listener | None = None
        self._boot_id = _boot_id()
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            config.tasks_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            config.volumes_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
            config.mnt_dir.mkdir(exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create {config.data_dir}: {exc}") from exc
        self._launcher = config.launcher_path or str(
            ensure_launcher(Path(config.data_dir) / "bin", config.cc_path)
        )
        self.cgroup_layout: CgroupLayout = (
            cg_mod.detect() if config.cgroups == "auto" else CgroupLayout("none")
        )
        layout = self.cgroup_layout
        if layout.mode == "none":
            # e.g. an agent started with `ip netns exec`, which remounts /sys without cgroups
            log.warning("runtime: no cgroups (%s): tasks run without limits or usage",
                        "turned off" if config.cgroups == "off" else "none mounted")
        else:
            log.info("runtime: cgroups %s (limits: %s, cgroup2 at %s)", layout.mode,
                     layout.limits_version or "none", layout.unified)
        #: This node's image store (blocking methods: call them from a thread).
        self.images = ImageStore(config.images_dir, in_use=self._images_in_use)
        try:
            self._resolv = resolv_conf(Path(config.resolv_conf).read_text())
        except OSError:
            self._resolv = ""

    # -- Controller interface

    def set_listener(self, cb: Listener | None) -> None:
        self._listener = cb

    def status(self, task_id: str) -> RuntimeStatus | None:
        task = self._tasks.get(task_id)
        return task.status if task is not None else None

    def tasks(self) -> dict[str, RuntimeStatus]:
        return {tid: t.status for tid, t in self._tasks.items()}

    def _task(self, task_id: str) -> _Task:
        task = self._tasks.get(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    def logs_path(self, task_id: str) -> tuple[Path, Path]:
        task = self._task(task_id)
        return task.dir / "stdout.log", task.dir / "stderr.log"

    def usage(self, task_id: str) -> TaskUsage | None:
        task = self._tasks.get(task_id)
        if task is None or task.cgroups is None or not task.cgroups.dirs:
            return None
        return task.cgroups.usage()

    def read_logs(
        self,
        task_id: str,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> list[LogLine]:
        return logs_mod.read_logs(self._task(task_id).dir, tail, since, timestamps)

    def follow_logs(
        self,
        task_id: str,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> AsyncIterator[LogLine]:
        task = self._task(task_id)
        return logs_mod.follow_logs(
            task.dir, lambda: task.status.state is RunState.RUNNING, tail, since, timestamps
        )

    def image_config(self, ref: str) -> ImageConfig:
        try:
            return self.images.inspect(ref).config
        except ImageNotFound as exc:
            raise ImageUnavailable(f"image {ref!r} is not on this node") from exc

    def volumes(self) -> list[str]:
        """Named volumes on this node."""
        try:
            return sorted(p.name for p in self._cfg.volumes_dir.iterdir() if p.is_dir())
        except OSError:
            return []

    def remove_volume(self, name: str) -> None:
        """Delete a named volume and its data. VolumeInUse if a known task mounts it."""
        if not valid_volume_name(name):
            raise InvalidTaskConfig("mounts", f"not a volume name: {name!r}")
        users = [tid for tid, t in self._tasks.items() if name in t.volumes]
        if users:
            raise VolumeInUse(f"volume {name} is used by task(s) {', '.join(sorted(users))}")
        _safe_rmtree(self._cfg.volumes_dir / name)

    def _images_in_use(self) -> set[str]:
        used = {t.image_id for t in self._tasks.values() if t.image_id}
        return used | set(self._starting_images.values())

    async def start(self, cfg: TaskConfig, before_start: BeforeStart | None = None
                    ) -> RuntimeStatus:
        cfg.validate()
        if cfg.task_id in self._tasks or cfg.task_id in self._starting:
            raise TaskExists(f"task {cfg.task_id} is already known")
        loop = self._bind_loop()
        taskdir = self._cfg.tasks_dir / cfg.task_id
        self._starting.add(cfg.task_id)
        try:
            plan = self._resolve(cfg)  # what the user can get wrong, before anything is made
            self._starting_images[cfg.task_id] = plan.image_id
            try:
                taskdir.mkdir(mode=0o700)
            except FileExistsError as exc:
                raise TaskExists(f"task directory exists: {taskdir} (call recover()?)") from exc
            except OSError as exc:
                raise LaunchFailed(f"cannot create {taskdir}: {exc}") from exc
            task: _Task | None = None
            try:
                # The launcher first: its exec and the clone of the namespaces overlap the
                # preparation below (it waits for the spec, and starts nothing without it).
                task, spec_w, ready_r = self._spawn(loop, cfg, taskdir, plan)
                try:
                    spec = self._prepare(cfg, taskdir, plan, task)
                except BaseException:
                    os.close(spec_w)  # an incomplete spec: the launcher starts nothing
                    os.close(ready_r)
                    raise
                return await self._launch(loop, task, spec_w, ready_r, spec, before_start)
            except BaseException:
                if task is not None:
                    await self._abandon(task)  # no-op if the launch already did
                    if task.cgroups is not None:
                        await self._remove_cgroups(task.cgroups)
                _safe_rmtree(taskdir)
                raise
        finally:
            self._starting.discard(cfg.task_id)
            self._starting_images.pop(cfg.task_id, None)

    async def stop(self, task_id: str, grace: float) -> RuntimeStatus:
        task = self._task(task_id)
        if task.status.state is RunState.EXITED:
            return task.status
        if not task.notes.stop_requested:
            task.notes.stop_requested = True
            task.notes.save(task.dir / "notes.json")
        await self._init_ready(task)  # a stop right after start must not lose its signal
        self._signal_init(task, parse_signal(task.cfg.stop_signal))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task.done), timeout=max(grace, 0.0))
        if not task.done.done():
            if not task.notes.killed:
                task.notes.killed = True
                task.notes.save(task.dir / "notes.json")
            self._signal_init(task, signal.SIGKILL)
            if task.cgroups is not None:
                task.cgroups.kill()  # the final step: nothing of the task escapes
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
        if task.cgroups is not None:
            await self._remove_cgroups(task.cgroups)
        _safe_rmtree(task.dir)

    async def _remove_cgroups(self, cgroups: TaskCgroups) -> None:
        """Kill what is left in the groups and rmdir them (a group is busy for a moment after
        its last process died)."""
        deadline = time.monotonic() + self._cfg.kill_timeout
        while True:
            try:
                left = cgroups.remove_now()
            except CgroupError as exc:
                log.warning("runtime: %s", exc)
                return
            if not left:
                return
            if time.monotonic() > deadline:
                log.warning("runtime: cgroups still busy, left behind: %s", left)
                return
            cgroups.kill()
            await asyncio.sleep(0.01)

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

    def _resolve(self, cfg: TaskConfig) -> _Plan:
        """What start() checks before it makes anything: the image, the user, bind sources,
        whether the limits can be enforced here. Raises the user's errors; no side effects."""
        layers: list[Path] | None = None
        image_id = ""
        if cfg.image:
            try:
                info = self.images.resolve(cfg.image)
            except ImageNotFound as exc:
                raise ImageUnavailable(f"image {cfg.image!r} is not on this node") from exc
            layers = self.images.layer_dirs(info)
            image_id = info.id
            passwd = read_rootfs_file(layers, "etc/passwd")
            group = read_rootfs_file(layers, "etc/group")
        else:
            passwd = _read_host("/etc/passwd")
            group = _read_host("/etc/group")
        try:
            user = resolve_user(cfg.user, passwd, group)
        except ValueError as exc:
            raise InvalidTaskConfig("user", str(exc)) from None
        volumes = []
        for m in cfg.mounts:
            if m.type == "bind" and not os.path.exists(m.source):
                raise InvalidTaskConfig("mounts", f"bind source does not exist: {m.source}")
            if m.type == "volume":
                volumes.append(m.source)
        if self.cgroup_layout.mode != "none":
            cg_mod.check_limits(self.cgroup_layout, cfg.limits())
        elif cfg.limits().any:
            raise CgroupError("resource limits need cgroups, which are off on this node")
        return _Plan(layers, image_id, user, tuple(volumes))

    def _prepare(self, cfg: TaskConfig, taskdir: Path, plan: _Plan, task: _Task) -> bytearray:
        """Everything the launcher needs before the "go": directories, files, config.json, the
        cgroups (set on ``task`` as soon as they exist) and runtime.json, the launch spec."""
        layers, user = plan.layers, plan.user
        try:
            if layers is not None:  # the task's writable overlay layer
                os.mkdir(taskdir / "upper")
                os.mkdir(taskdir / "work")
            for name in plan.volumes:
                (self._cfg.volumes_dir / name).mkdir(mode=0o755, exist_ok=True)
            _write_new(taskdir / "config.json", cfg.to_json())
        except OSError as exc:
            raise LaunchFailed(f"cannot prepare {taskdir}: {exc}") from exc
        cgroups = None
        if self.cgroup_layout.mode != "none":
            cgroups = TaskCgroups.create(
                self.cgroup_layout, self._cfg.cgroup_parent, cfg.task_id, cfg.limits()
            )
            task.cgroups = cgroups  # removed by start() if anything below fails
        try:
            _write_new(
                taskdir / "runtime.json",
                json.dumps(
                    {
                        "cgroups": cgroups.to_json() if cgroups else None,
                        "image_id": plan.image_id,
                        "volumes": list(plan.volumes),
                    }
                ),
            )
        except OSError as exc:
            raise LaunchFailed(f"cannot prepare {taskdir}: {exc}") from exc

        env = cfg.full_env()
        spec = Spec()
        spec.add("H", cfg.hostname)
        spec.add("W", cfg.workdir or "/")
        spec.add("P", env["PATH"])
        spec.add("I", INIT_IN_TASK)
        spec.add("R", root_dir(self._cfg.mnt_dir))
        spec.add("K", str(capability_mask(cfg.cap_add, cfg.cap_drop)))
        spec.fields("U", user.uid, user.gid, ",".join(str(g) for g in user.groups))
        for path in cgroups.procs_files() if cgroups else ():
            spec.add("C", path)
        for arg in cfg.command:
            spec.add("A", arg)
        for key, value in env.items():
            spec.add("V", f"{key}={value}")
        build_plan(
            spec,
            RootfsPlan(
                stage=self._cfg.mnt_dir,
                taskdir=taskdir,
                init_files=(
                    ("hostname", cfg.hostname + "\n"),
                    ("hosts", hosts_file(cfg.hostname, cfg.extra_hosts)),
                    ("resolv.conf", self._resolv),
                ),
                tini=self._cfg.tini_path,
                layers=layers,
                default_binds=self._cfg.default_rootfs,
                default_masked=self._cfg.default_masked,
                volumes_dir=self._cfg.volumes_dir,
                dev_shm_size=self._cfg.dev_shm_size,
            ),
            cfg.mounts,
            cfg.files,
            user,
        )
        return bytearray(spec.encode())

    def _spawn(
        self, loop: asyncio.AbstractEventLoop, cfg: TaskConfig, taskdir: Path, plan: _Plan
    ) -> tuple[_Task, int, int]:
        """Start the launcher (it clones the task's init, which waits for the spec); return the
        task record watching it, the spec pipe's write end and the ready pipe's read end."""
        spec_r, spec_w = os.pipe()
        ready_r, ready_w = os.pipe()
        logs = (str(self._cfg.log_max_bytes), str(self._cfg.log_max_files))
        started_at = time.time()
        try:
            proc = subprocess.Popen(
                [self._launcher, "shim", str(taskdir), *logs],
                stdin=spec_r,
                stdout=ready_w,  # its stderr: TASKDIR/shim.log, which it opens itself
                env={},
                cwd="/",
                close_fds=True,
                start_new_session=True,
                restore_signals=True,
            )
        except OSError as exc:
            for fd in (spec_r, spec_w, ready_r, ready_w):
                os.close(fd)
            raise LaunchFailed(f"cannot spawn the launcher: {exc}") from exc
        os.close(spec_r)
        os.close(ready_w)
        _UNREAPED[proc.pid] = proc
        opened = _ProcRef.open_pid(proc.pid)
        task = _Task(
            cfg=cfg,
            dir=taskdir,
            started_at=started_at,
            status=RuntimeStatus(RunState.RUNNING, pid=None, started_at=started_at),
            done=loop.create_future(),
            shim=opened[0] if opened else None,
            image_id=plan.image_id,
            volumes=plan.volumes,
        )
        if opened is None:  # cannot happen while it waits for its spec
            os.close(spec_w)
            os.close(ready_r)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            _UNREAPED.pop(proc.pid, None)
            raise LaunchFailed(f"task {cfg.task_id}: the launcher died right after spawn")
        self._watch(task, opened[1], shim=True)
        return task, spec_w, ready_r

    async def _launch(
        self,
        loop: asyncio.AbstractEventLoop,
        task: _Task,
        spec_w: int,
        ready_r: int,
        spec: bytearray,
        before_start: BeforeStart | None = None,
    ) -> RuntimeStatus:
        """Record the shim, run ``before_start`` on the waiting init, give the launcher the spec
        (the "go") and wait until the task's init is exec'ed (RUNNING), or has failed."""
        cfg, taskdir = task.cfg, task.dir
        prefix = b""
        if before_start is not None:
            try:
                prefix, pid = await asyncio.wait_for(self._read_pid(loop, ready_r),
                                                     self._cfg.start_timeout)
                if pid is not None:  # (None: the launcher failed; the ready pipe tells why)
                    await before_start(pid)
            except BaseException as exc:
                spec[:] = bytes(len(spec))
                os.close(spec_w)  # no spec: the init starts nothing
                os.close(ready_r)
                await self._abandon(task)
                if isinstance(exc, Exception):
                    raise LaunchFailed(f"cannot start task {cfg.task_id}: preparing its "
                                       f"namespaces failed: {exc}") from exc
                raise
        try:
            self._write_pids(task, new=True)
            # The complete spec is the "go": the launcher may start the task now, it is recorded.
            await self._send(loop, spec_w, spec)
        except OSError as exc:
            os.close(ready_r)
            await self._abandon(task)  # a truncated spec: the launcher starts nothing
            raise LaunchFailed(f"cannot start task {cfg.task_id}: {exc}; "
                               f"shim.log: {_tail(taskdir / 'shim.log')!r}") from exc
        finally:
            spec[:] = bytes(len(spec))  # it may hold secrets
            os.close(spec_w)
        try:
            ready, init_pid = await asyncio.wait_for(
                self._read_ready(loop, ready_r, prefix), self._cfg.start_timeout
            )
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
                self._find_init(task, init_pid)
        elif ready == b"N":
            task.notes.not_found = cfg.command[0]
            task.notes.save(taskdir / "notes.json")
            await self._wait_done(task)
            if task.status.state is RunState.EXITED:  # may have been seen before the notes
                st = task.status
                task.status = _exited(st.started_at, st.exit_code, st.finished_at, task.notes)
        else:  # EOF: the launcher failed; it has exited or is about to
            await self._wait_done(task)
            self._unwatch(task)
            code, _ = self._read_exit(taskdir)
            reason = _tail(taskdir / "shim.log") or "no message"
            raise LaunchFailed(f"task {cfg.task_id}: launcher failed (exit {code}): {reason}")
        task.registered = True
        self._tasks[cfg.task_id] = task
        return task.status

    @staticmethod
    async def _send(loop: asyncio.AbstractEventLoop, fd: int, data: bytearray) -> None:
        """Write all of ``data`` to a pipe without blocking the loop (a spec with large files
        can exceed the pipe's buffer)."""
        os.set_blocking(fd, False)
        view = memoryview(data)
        try:
            while view:
                try:
                    view = view[os.write(fd, view) :]
                    continue
                except BlockingIOError:
                    pass
                fut: asyncio.Future[None] = loop.create_future()
                loop.add_writer(fd, _resolve_future, fut)
                try:
                    await fut
                finally:
                    loop.remove_writer(fd)
        finally:
            view.release()

    @staticmethod
    async def _read_pid(loop: asyncio.AbstractEventLoop, fd: int) -> tuple[bytes, int | None]:
        """What the ready pipe holds up to the shim's "P<pid>\n" (sent right after the clone,
        before the init can write anything) and that pid; (data, None) at EOF without one."""
        fut: asyncio.Future[tuple[bytes, int | None]] = loop.create_future()
        got = bytearray()

        def readable() -> None:
            if fut.done():
                return
            try:
                chunk = os.read(fd, 64)
            except OSError as exc:
                fut.set_exception(exc)
                return
            got.extend(chunk)
            m = _PID_RECORD.search(got)
            if m is not None or not chunk:
                fut.set_result((bytes(got), int(m.group(1)) if m else None))

        loop.add_reader(fd, readable)
        try:
            return await fut
        finally:
            loop.remove_reader(fd)

    @staticmethod
    async def _read_ready(loop: asyncio.AbstractEventLoop, fd: int, prefix: bytes = b""
                          ) -> tuple[bytes, int | None]:
        """The init's ready byte (b"" if none) and its host pid as the shim reported it (None if
        not), returned once the pipe is at EOF (for "R": once tini was exec'ed, the pipe being
        close-on-exec), without blocking the loop. ``prefix``: what was read from the pipe
        already. Closes fd."""
        fut: asyncio.Future[tuple[bytes, int | None]] = loop.create_future()
        got: list[bytes] = [prefix] if prefix else []

        def readable() -> None:
            if not fut.done():
                try:
                    chunk = os.read(fd, 64)
                except OSError as exc:
                    fut.set_exception(exc)
                    return
                if chunk:
                    got.append(chunk)
                else:
                    data = b"".join(got)
                    m = _PID_RECORD.search(data)
                    if m is not None:
                        data = data[: m.start()] + data[m.end() :]
                    fut.set_result((data[:1], int(m.group(1)) if m else None))

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
        """Kill a launch that failed half-way (its whole session: shim and init; the task cannot
        have left it yet) and wait until the watched shim is reaped."""
        if not task.done.done() and task.shim is not None:
            # Safe: the shim is our unreaped child until _on_exit resolves `done`.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(task.shim.pid, signal.SIGKILL)
        self._signal_init(task, signal.SIGKILL)
        if task.cgroups is not None:
            task.cgroups.kill()
        await self._wait_done(task)
        self._unwatch(task)

    async def _init_ready(self, task: _Task) -> None:
        """Wait (briefly: well under a millisecond after start, not at all later) until tini has
        set up its signal handling. Before that, a namespace init drops any signal it has no
        handler for: a stop() right after start() would lose its SIGTERM."""
        if task.init is None:
            return
        deadline = time.monotonic() + min(1.0, self._cfg.start_timeout)
        path = f"/proc/{task.init.pid}/status"
        while time.monotonic() < deadline:
            try:
                text = Path(path).read_text()
            except OSError:
                return
            # tini blocks what it forwards, then ignores SIGTTIN and SIGTTOU (it starts with
            # none ignored); while it waits in sigtimedwait() SigBlk reads 0, so look at SigIgn.
            ignored = next((ln for ln in text.splitlines() if ln.startswith("SigIgn:")), "")
            if ignored and int(ignored.split()[1], 16) & _TINI_READY == _TINI_READY:
                return
            await asyncio.sleep(0.0005)

    def _find_init(self, task: _Task, pid: int | None = None) -> None:
        """The shim's only child is the task's init (its pid 1). ``pid``: as the shim reported
        it (the shim also recorded it in init.pid); None: look it up, record it in pids.json."""
        if task.shim is None or task.init is not None:
            return
        reported = pid is not None
        if pid is None:
            inits = _children(task.shim.pid)
            if len(inits) != 1:
                return  # already gone (a very short task): its exit is on its way
            pid = inits[0]
        opened = _ProcRef.open_pid(pid, parent=task.shim.pid)
        if opened is None:
            return  # already gone (a very short task): its exit is on its way
        task.init, task.init_fd = opened
        if not reported:
            try:
                self._write_pids(task)
            except OSError as exc:
                log.warning("runtime: cannot record init pid of %s: %s", task.cfg.task_id, exc)
        task.status = dataclasses.replace(task.status, pid=task.init.pid)

    def _write_pids(self, task: _Task, new: bool = False) -> None:
        """pids.json: created (``new``, before the go) or replaced atomically."""
        (_write_new if new else _atomic_write)(
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
        self._finish(
            task,
            _exited(task.started_at, code, time.time(), task.notes, lost, _oom(task.cgroups)),
        )

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
            rt = json.loads((taskdir / "runtime.json").read_text())
            cgroups: TaskCgroups | None = (
                TaskCgroups.from_json(rt["cgroups"]) if rt.get("cgroups") else None
            )
            image_id = str(rt.get("image_id", ""))
            volumes = tuple(str(v) for v in rt.get("volumes", ()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            cgroups, image_id, volumes = None, "", ()
        extra: dict[str, Any] = {"cgroups": cgroups, "image_id": image_id, "volumes": volumes}
        try:
            pids = json.loads((taskdir / "pids.json").read_text())
            started_at = float(pids["started_at"])
            same_boot = pids.get("boot_id") == self._boot_id
            shim = _ProcRef.from_json(pids.get("shim"))
            init = _ProcRef.from_json(pids.get("init")) or _ProcRef.read(taskdir / "init.pid")
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            # The agent died before recording the shim, so the shim never got its spec.
            started_at = (taskdir / "config.json").stat().st_mtime
            status = _exited(started_at, None, started_at, notes, "never started: agent died")
            done.set_result(None)
            self._register(
                _Task(cfg, taskdir, started_at, status, done, None, notes=notes, **extra)
            )
            return
        running = RuntimeStatus(RunState.RUNNING, pid=None, started_at=started_at)
        task = _Task(cfg, taskdir, started_at, running, done, shim, init, notes, **extra)
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
            task.status = _exited(started_at, code, finished_at, notes, reason, _oom(cgroups))
            done.set_result(None)
        self._register(task)

    def _register(self, task: _Task) -> None:
        task.registered = True
        self._tasks[task.cfg.task_id] = task


def _write_new(path: Path, text: str) -> None:
    """Create ``path`` (it must not exist) with ``text``, in one write."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        data = text.encode()
        if os.write(fd, data) != len(data):
            raise OSError(errno.ENOSPC, f"short write to {path}")
    finally:
        os.close(fd)


def _resolve_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# Host files read per start (/etc/passwd, /etc/group): path -> (identity when read, text).
_HOST_FILES: dict[str, tuple[tuple[int, int, int, int], str]] = {}


def _read_host(path: str) -> str:
    """A host text file, "" if unreadable; re-read only when its inode, size, mtime or ctime
    changed (every start resolves the task's user against the host's /etc/passwd)."""
    try:
        st = os.stat(path)
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = _HOST_FILES.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    _HOST_FILES[path] = (key, text)
    return text


def _oom(cgroups: TaskCgroups | None) -> bool:
    return cgroups is not None and bool(cgroups.dirs) and cgroups.oom_kills() > 0


# ------------------------------------------------------------------------- the fake controller


class FakeController:
    """In-memory Controller for unit tests of the reconciler. No processes.

    Behaves like ProcessController: start() validates and returns RUNNING (or EXITED 127 for a
    program listed in ``missing_commands``); stop() ends the task with 143 (or, for a task started
    with a program in ``ignores_term``, 137 "killed (SIGKILL after grace period)"); the listener is
    called via loop.call_soon when a task exits. Tests drive exits with :meth:`exit`, logs with
    ``logs[task_id]``, images with ``image_configs[ref]`` (a task with another image is refused
    with ImageUnavailable, like a node that lacks it).
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
        #: Lines read_logs/follow_logs return, per task (tests append to it).
        self.logs: dict[str, list[LogLine]] = {}
        #: Images this fake node has: reference -> config (tests fill it).
        self.image_configs: dict[str, ImageConfig] = {}
        #: What usage() returns for a running task (tests may replace it).
        self.fake_usage = TaskUsage(memory_bytes=1 << 20, memory_peak_bytes=1 << 20,
                                    cpu_seconds=0.0, pids=2)  # fmt: skip

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

    def usage(self, task_id: str) -> TaskUsage | None:
        return self.fake_usage if task_id in self._status else None

    def image_config(self, ref: str) -> ImageConfig:
        if ref not in self.image_configs:
            raise ImageUnavailable(f"image {ref!r} is not on this node")
        return self.image_configs[ref]

    def read_logs(
        self,
        task_id: str,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> list[LogLine]:
        if task_id not in self._status:
            raise TaskNotFound(task_id)
        lines = [x for x in self.logs.get(task_id, []) if since is None or x.ts >= since]
        if tail is not None:
            lines = lines[-tail:] if tail > 0 else []
        if timestamps:
            lines = [x._replace(line=f"{_rfc3339(x.ts)} {x.line}") for x in lines]
        return lines

    async def follow_logs(
        self,
        task_id: str,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> AsyncIterator[LogLine]:
        for line in self.read_logs(task_id, tail, since, timestamps):
            yield line

    async def recover(self) -> None:
        return None

    async def start(self, cfg: TaskConfig, before_start: BeforeStart | None = None
                    ) -> RuntimeStatus:
        cfg.validate()
        if self.start_error is not None:
            err, self.start_error = self.start_error, None
            raise err
        if cfg.task_id in self._status:
            raise TaskExists(f"task {cfg.task_id} is already known")
        if cfg.image:
            self.image_config(cfg.image)
        now = self._clock()
        self._configs[cfg.task_id] = cfg
        if cfg.command[0] in self.missing_commands:
            status = RuntimeStatus(
                RunState.EXITED, None, now, 127, now, f"command not found: {cfg.command[0]}"
            )
        else:
            self._next_pid += 1
            status = RuntimeStatus(RunState.RUNNING, self._next_pid, now)
            if before_start is not None:
                try:
                    await before_start(self._next_pid)
                except Exception as exc:
                    del self._configs[cfg.task_id]
                    raise LaunchFailed(f"cannot start task {cfg.task_id}: preparing its "
                                       f"namespaces failed: {exc}") from exc
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


def _rfc3339(ts: float) -> str:
    whole = int(ts)
    frac = int((ts - whole) * 1e9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{frac:09d}Z"


def _conforms(real: ProcessController, fake: FakeController) -> tuple[Controller, Controller]:
    """Never called: makes mypy check that both classes satisfy the Controller protocol."""
    return real, fake


__all__ = [
    "DEFAULT_PATH",
    "Controller",
    "FakeController",
    "ImageConfig",
    "LogLine",
    "MountSpec",
    "ProcessController",
    "RunState",
    "RuntimeConfig",
    "RuntimeStatus",
    "TaskConfig",
    "TaskUsage",
    "describe_exit",
    "parse_signal",
]
