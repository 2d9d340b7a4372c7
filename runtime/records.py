"""The runtime's records: what to run (TaskConfig), what was observed (RuntimeStatus), and the
runtime's own settings (RuntimeConfig), with their validation.

Owns: the TaskConfig fields and their checks (``InvalidTaskConfig`` names the field), the
RuntimeConfig fields and their checks (``ConfigError``), the JSON form of a TaskConfig stored as
``TASKDIR/config.json``, and the human text of exit codes.
Must not touch: processes, files, cgroups, the image store — these records are plain values;
runtime/process.py acts on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shoal.runtime import seccomp
from shoal.runtime.cgroups import Limits
from shoal.runtime.errors import ConfigError, InvalidTaskConfig
from shoal.runtime.kernelparams import check_sysctl, check_ulimit
from shoal.runtime.rootfs import FileValue, MountSpec, cap_name, check_task_path

#: PATH given to a task whose env has none (Docker's default).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Task ids of `image build` RUN steps start with this (cluster task ids are hex: never
#: "build..."); the worker's reconciler leaves such runtime tasks alone (node/worker.py).
#: Here, not in runtime/build.py: the worker needs the prefix, not the builder.
BUILD_TASK_PREFIX = "build"

# a task's id; a pod's extra container (shoal.node.pod) runs as "<task id>-<container name>"
_TASK_ID_RE = re.compile(r"[a-z0-9]{1,64}(-[a-z0-9][a-z0-9-]{0,31})?")
# RFC 1123 host name; the kernel takes at most 64 bytes.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,64}}$){_LABEL}(\.{_LABEL})*")
_USER_RE = re.compile(r"[^:\s\0]+(:[^:\s\0]+)?")
_GROUP_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}|[0-9]{1,10}")
_IMAGE_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,254}")
_MAX_FILES_BYTES = 4 << 20
_MIN_MEMORY = 4 << 20
# a task's own log rotation: the least file the shim takes, and sane most (a file, files kept)
_MIN_LOG_BYTES, _MAX_LOG_BYTES, _MAX_LOG_FILES = 4096, 1 << 40, 100
_FORBIDDEN_FILE_DIRS = ("/proc", "/sys", "/dev")
_MAX_ID = (1 << 32) - 2  # a uid or gid (-1 is "unchanged" to chown)


# Linux's real-time signals as Docker numbers them (moby's fixed table: SIGRTMIN 34, as
# glibc and the kernel; musl's C library says 35). Fixed, not this host's C library's: the
# spec check runs in the state machine, and every replica must judge a signal alike.
RTMIN, RTMAX = 34, 64


def parse_signal(value: str) -> int:
    """A signal number from "SIGTERM", "TERM", "term", "15" or a real-time one as Docker
    names them, "SIGRTMIN+3" (systemd's: 37) or "SIGRTMAX-2". Raise ValueError if unknown."""
    text = value.strip()
    if text.isdigit():
        if not 1 <= int(text) <= RTMAX:
            raise ValueError(f"unknown signal: {value!r}")
        return int(text)
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    rt = re.fullmatch(r"SIGRT(MIN|MAX)([+-][0-9]{1,2})?", name)
    if rt is not None:
        number = (RTMIN if rt.group(1) == "MIN" else RTMAX) + int(rt.group(2) or 0)
        if not RTMIN <= number <= RTMAX:
            raise ValueError(f"unknown signal: {value!r} (real-time signals are SIGRTMIN to "
                             f"SIGRTMIN+{RTMAX - RTMIN})")
        return number
    if name in ("SIGRTMIN", "SIGRTMAX") or name not in signal.Signals.__members__:
        raise ValueError(f"unknown signal: {value!r}")
    return int(signal.Signals[name])



@dataclass(frozen=True)
class TaskConfig:
    """What to run. Immutable; stored as TASKDIR/config.json (without the files' contents)."""

    task_id: str  # unique, [a-z0-9]{1,64}[-NAME]: directory and cgroup name
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
    group_add: tuple[str, ...] = ()  # more supplementary groups of the task's user (Docker's
    #   --group-add): names in the task's /etc/group, or numbers (which need not be there)
    mounts: tuple[MountSpec, ...] = ()  # bind / volume / tmpfs, see rootfs.MountSpec
    files: Mapping[str, FileValue] = field(default_factory=dict)  # target path -> (content,
    #   mode[, uid, gid]), written into a tmpfs inside the task (never to disk) and bound
    #   read-only (not noexec: a 0755 one runs, as Docker's) onto the target, created inside
    #   the root; owned by uid:gid, or by the task's user without them: secrets
    #   (/run/secrets/NAME, 0o400), configs (/etc/nginx/nginx.conf), resolv.conf
    extra_hosts: tuple[tuple[str, str], ...] = ()  # (name, ip) lines added to /etc/hosts
    join_netns: str = ""  # a pod's sidecar or init container: the network namespace it joins
    #   (/proc/PID/ns/net of the task's main container) instead of a new one; "" = its own
    host_network: bool = False  # no network namespace of its own: the node's (Docker's
    #   --network host); nothing is cloned or set up for it, so starts skip the netns cost
    read_only: bool = False  # an image task's root filesystem mounted read-only (Docker's
    #   --read-only): the task cannot write its writable layer; /proc, /dev (/dev/shm), the
    #   user's mounts (volumes, tmpfs, binds) and files keep their own modes. The default
    #   image's root is read-only anyway: True changes nothing there
    ulimits: tuple[tuple[str, int, int], ...] = ()  # (name, soft, hard) resource limits of
    #   the task (Docker's --ulimit), set with setrlimit before it drops privileges, so tini and
    #   the command inherit them; names: kernelparams.ULIMITS, each once; -1 = unlimited;
    #   () = the agent's own limits
    sysctls: tuple[tuple[str, str], ...] = ()  # (key, value) namespaced kernel parameters
    #   (Docker's --sysctl, dotted keys: "net.ipv4.ip_unprivileged_port_start") written in the
    #   task's own network / IPC namespaces before the command starts; which keys: see
    #   kernelparams.check_sysctl. One the kernel lacks fails the start (LaunchFailed)
    log_max_bytes: int = 0  # this task's log rotation (Docker's --log-opt max-size and
    log_max_files: int = 0  # max-file): as RuntimeConfig's, which a 0 leaves in force
    tty: bool = False  # the command's stdin, stdout and stderr are one pseudo-terminal of the
    #   task's own devpts (Docker's --tty); its output goes to the stdout log
    stdin_open: bool = False  # stdin is a pipe held open and never written (Docker's
    #   OpenStdin, Compose's stdin_open): a read waits instead of seeing end-of-file
    oom_score_adj: int = 0  # the task's /proc/PID/oom_score_adj (Docker's --oom-score-adj),
    #   -1000..1000; below the agent's own needs CAP_SYS_RESOURCE, else the start fails
    seccomp: str = ""  # the task's seccomp profile: "" Docker's default rules (runtime/
    #   seccomp.py), "unconfined" none, or a custom profile's JSON in Docker's format

    def validate(self) -> None:
        """Raise InvalidTaskConfig naming the first malformed field."""
        if not isinstance(self.task_id, str) or not _TASK_ID_RE.fullmatch(self.task_id):
            raise InvalidTaskConfig("task_id", f"must match [a-z0-9]{{1,64}}[-NAME]: "
                                    f"{self.task_id!r}")
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
        if self.join_netns and not re.fullmatch(r"/proc/[0-9]{1,10}/ns/net", self.join_netns):
            raise InvalidTaskConfig("join_netns", f"expected /proc/PID/ns/net: "
                                    f"{self.join_netns!r}")
        if self.host_network and self.join_netns:
            raise InvalidTaskConfig("host_network", "a task joins one network namespace: "
                                    "the host's or join_netns, not both")
        self._validate_limits()
        self._validate_kernel_params()
        for group in self.group_add:
            if not isinstance(group, str) or not _GROUP_RE.fullmatch(group) or (
                    group.isdigit() and int(group) > (1 << 31) - 1):
                raise InvalidTaskConfig("group_add", f"expected a group name or number: "
                                        f"{group!r}")
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
        if not isinstance(self.log_max_bytes, int) or not (self.log_max_bytes == 0 or (
                _MIN_LOG_BYTES <= self.log_max_bytes <= _MAX_LOG_BYTES)):
            raise InvalidTaskConfig("log_max_bytes", f"must be 0 (the runtime's) or from "
                                    f"{_MIN_LOG_BYTES} to {_MAX_LOG_BYTES} bytes")
        if not isinstance(self.log_max_files, int) or not (
                0 <= self.log_max_files <= _MAX_LOG_FILES):
            raise InvalidTaskConfig("log_max_files", f"must be 0 (the runtime's) or from 1 to "
                                    f"{_MAX_LOG_FILES}")

    def _validate_kernel_params(self) -> None:
        for flag in ("read_only", "tty", "stdin_open"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidTaskConfig(flag, "must be true or false")
        if not isinstance(self.oom_score_adj, int) or isinstance(self.oom_score_adj, bool) or \
                not -1000 <= self.oom_score_adj <= 1000:
            raise InvalidTaskConfig("oom_score_adj", "must be an integer from -1000 to 1000")
        if not isinstance(self.seccomp, str):
            raise InvalidTaskConfig("seccomp", "must be a string")
        if self.seccomp not in (seccomp.DEFAULT, seccomp.UNCONFINED):
            try:
                seccomp.check_profile(self.seccomp)
            except ValueError as exc:
                raise InvalidTaskConfig("seccomp", f"profile: {exc}") from None
        names: set[str] = set()
        for limit in self.ulimits:
            if not isinstance(limit, tuple) or len(limit) != 3:
                raise InvalidTaskConfig("ulimits", f"expected (name, soft, hard): {limit!r}")
            try:
                check_ulimit(*limit)
            except ValueError as exc:
                raise InvalidTaskConfig("ulimits", str(exc)) from None
            if limit[0] in names:
                raise InvalidTaskConfig("ulimits", f"ulimit {limit[0]} is set twice")
            names.add(limit[0])
        keys: set[str] = set()
        for item in self.sysctls:
            if not isinstance(item, tuple) or len(item) != 2:
                raise InvalidTaskConfig("sysctls", f"expected (key, value): {item!r}")
            try:
                check_sysctl(item[0], item[1], self.host_network)
            except ValueError as exc:
                raise InvalidTaskConfig("sysctls", str(exc)) from None
            if item[0] in keys:
                raise InvalidTaskConfig("sysctls", f"sysctl {item[0]} is set twice")
            keys.add(item[0])
            if self.join_netns and item[0].startswith("net."):
                # a pod's extra container shares its task's network namespace: its net.*
                # would change the main container's (and every sibling's) setting
                raise InvalidTaskConfig("sysctls", f"sysctl {item[0]}: a container that joins "
                                        "another's network namespace cannot set net.* (set "
                                        "it on the task's main container)")  # fmt: skip

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
                or len(value) not in (2, 4)
                or not isinstance(value[0], bytes)
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value[1:])
                or not 0 <= value[1] <= 0o7777
                or not all(0 <= v <= _MAX_ID for v in value[2:])
            ):
                raise InvalidTaskConfig("files", f"{target}: expected (bytes, mode[, uid, gid])")
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
        # (anonymous and nocopy only when set: an older agent, after a downgrade, still
        # adopts a task that has neither)
        raw["mounts"] = [{k: v for k, v in dataclasses.asdict(m).items()
                          if v or k not in ("anonymous", "nocopy")} for m in self.mounts]
        # Never the contents: they may be secrets. What was there is enough for inspection.
        raw["files"] = {t: {"mode": v[1], "size": len(v[0]),
                            **({"uid": v[2], "gid": v[3]} if len(v) == 4 else {})}
                        for t, v in self.files.items()}
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
            group_add=tuple(str(g) for g in raw.get("group_add", ())),
            mounts=tuple(MountSpec(**{**m, "driver_opts": tuple(
                (str(k), str(v)) for k, v in m.get("driver_opts", ()))})
                for m in raw.get("mounts", ())),
            extra_hosts=tuple((str(a), str(b)) for a, b in raw.get("extra_hosts", ())),
            join_netns=str(raw.get("join_netns", "")),
            host_network=bool(raw.get("host_network", False)),
            read_only=bool(raw.get("read_only", False)),
            ulimits=tuple((str(n), int(s), int(h)) for n, s, h in raw.get("ulimits", ())),
            sysctls=tuple((str(k), str(v)) for k, v in raw.get("sysctls", ())),
            log_max_bytes=int(raw.get("log_max_bytes", 0)),
            log_max_files=int(raw.get("log_max_files", 0)),
            tty=bool(raw.get("tty", False)),
            stdin_open=bool(raw.get("stdin_open", False)),
            oom_score_adj=int(raw.get("oom_score_adj", 0)),
            # (a task an agent before seccomp started runs without a filter: its execs too)
            seccomp=str(raw.get("seccomp", seccomp.UNCONFINED)),
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
    # lookup) before killing it and raising LaunchFailed. Normal: a few ms; on a node starved
    # by hundreds of starts at once, seconds: 10 s failed 18 % of 1,000 starts in the scale
    # lab (each then started again elsewhere, adding to the load), hence 30.
    start_timeout: float = 30.0
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
    def anon_dir(self) -> Path:
        """The records of the anonymous volumes (shoal.runtime.taskvols)."""
        return Path(self.data_dir) / "anonymous"

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


def describe_exit(code: int) -> str:
    """Human text for an exit code: "exit 3", "exit 137 (SIGKILL)"."""
    if 128 < code < 128 + signal.NSIG:
        with contextlib.suppress(ValueError):
            return f"exit {code} ({signal.Signals(code - 128).name})"
    return f"exit {code}"

