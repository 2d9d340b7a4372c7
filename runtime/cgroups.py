"""Task cgroups: detect what the host offers (v2, v1, hybrid), one group per task, limits, usage,
OOM evidence, kill, removal.

Owns: the directories ``<hierarchy mount>/<parent>/<task_id>`` this runtime creates (``parent`` is
RuntimeConfig.cgroup_parent, "shoal" by default) and the ``<parent>`` directories themselves.
Must not touch: any other cgroup (the agent's own included), or processes outside a task's group.

Layouts (detected from /proc/self/mountinfo, never assumed):

* ``v2``: one cgroup2 hierarchy with the memory/cpu/pids controllers: limits, usage, OOM events
  (memory.events), cgroup.kill all come from it.
* ``hybrid``: v1 hierarchies do the limits (memory.limit_in_bytes + memory.memsw.limit_in_bytes,
  cpu.cfs_quota_us/cfs_period_us, pids.max) and OOM evidence (memory.oom_control ``oom_kill``);
  a controller-less cgroup2 mount (often /sys/fs/cgroup/unified) tracks the task, gives CPU time
  (cpu.stat usage_usec) and cgroup.kill.
* ``v1``: v1 only; CPU time from cpuacct.usage; kill = SIGKILL every pid in cgroup.procs.
* ``none``: no cgroups: tasks run without limits; a task that asks for one is refused.

The task joins its groups itself: the launcher writes ``0`` to every cgroup.procs (see
runtime/launcher.c) before it runs anything, so nothing of the task escapes accounting and the
agent never forks. Swap is always off for a limited task (memsw = limit, or memory.swap.max 0).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.runtime.errors import CgroupError
from shoal.runtime.procfs import proc_stat

#: CFS period used for CPU limits (microseconds; Docker's default).
CPU_PERIOD_US = 100_000

_V1_WANTED = ("memory", "cpu", "cpuacct", "pids")


@dataclass(frozen=True)
class TaskUsage:
    """Resource use of one task, from its cgroups. None = not available on this host."""

    memory_bytes: int | None  # the working set: the memory charge less the file cache the
    #   kernel may drop first (inactive_file), as `docker stats` and Kubernetes count it
    memory_peak_bytes: int | None  # high-water mark since the task started
    cpu_seconds: float | None  # CPU time used by all its processes (user + system)
    pids: int | None = None  # processes/threads now in the task
    block_read_bytes: int | None = None  # read from / written to block devices, all of them
    block_write_bytes: int | None = None  # (cgroup v2's io.stat; else the task's processes'
    #   /proc/PID/io, which holds their reaped children's too: see ProcIOCounter)
    net_rx_bytes: int | None = None  # received / sent on the task's own network namespace,
    net_tx_bytes: int | None = None  # every interface but lo (None: it has none of its own)


@dataclass(frozen=True)
class Limits:
    """What a task may use. 0 = unlimited."""

    memory_bytes: int = 0
    cpus: float = 0.0
    pids: int = 0

    @property
    def any(self) -> bool:
        return bool(self.memory_bytes or self.cpus or self.pids)


@dataclass(frozen=True)
class CgroupLayout:
    """The cgroup hierarchies this host offers."""

    mode: str  # "v2" | "hybrid" | "v1" | "none"
    unified: Path | None = None  # the cgroup2 mount point, if any
    v1: dict[str, Path] = field(default_factory=dict)  # controller -> v1 hierarchy mount point
    v2_controllers: frozenset[str] = frozenset()  # controllers offered by the cgroup2 root

    @property
    def limits_version(self) -> str:
        """Which hierarchy enforces limits: "v2", "v1" or "" (none)."""
        if self.mode == "v2" and "memory" in self.v2_controllers:
            return "v2"
        if self.mode in ("hybrid", "v1"):
            return "v1"
        return ""

    def can_limit(self, what: str) -> bool:
        """Can this host enforce a limit on "memory", "cpu" or "pids"?"""
        if self.limits_version == "v2":
            return what in self.v2_controllers
        if self.limits_version == "v1":
            return what in self.v1
        return False


def _unescape(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and i + 4 <= len(path) and path[i + 1 : i + 4].isdigit():
            out.append(chr(int(path[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str, read_controllers: bool = True) -> CgroupLayout:
    """The layout described by a /proc/self/mountinfo text. With ``read_controllers``, the cgroup2
    root's cgroup.controllers file is read to learn which controllers it has."""
    unified: Path | None = None
    v1: dict[str, Path] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf, rf = left.split(), right.split()
        if len(lf) < 5 or len(rf) < 3:
            continue
        mountpoint = Path(_unescape(lf[4]))
        fstype, options = rf[0], rf[2].split(",")
        if fstype == "cgroup2" and unified is None:
            unified = mountpoint
        elif fstype == "cgroup":
            for ctrl in options:
                if ctrl in _V1_WANTED and ctrl not in v1:
                    v1[ctrl] = mountpoint
    controllers: frozenset[str] = frozenset()
    if unified is not None and read_controllers:
        with contextlib.suppress(OSError):
            controllers = frozenset((unified / "cgroup.controllers").read_text().split())
    if unified is not None and "memory" in controllers:
        mode = "v2"
    elif v1 and unified is not None:
        mode = "hybrid"
    elif v1:
        mode = "v1"
    elif unified is not None:
        mode = "v2"  # a cgroup2 mount without controllers: tracking and kill, no limits
    else:
        mode = "none"
    return CgroupLayout(mode, unified, v1, controllers)


def detect() -> CgroupLayout:
    """The layout of this host, from /proc/self/mountinfo."""
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return CgroupLayout("none")
    return parse_mountinfo(text)


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_keyed(path: Path, key: str) -> int | None:
    """A "key value" line of a flat-keyed file (memory.events, cpu.stat, memory.oom_control)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def _read_io_stat(path: Path) -> tuple[int, int] | None:
    """Bytes read and written over every device, from cgroup v2's io.stat
    ("8:0 rbytes=1 wbytes=2 rios=3 ..." per device)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    read = written = 0
    for line in text.splitlines():
        for item in line.split()[1:]:
            key, _, value = item.partition("=")
            if key in ("rbytes", "wbytes") and value.isdigit():
                if key == "rbytes":
                    read += int(value)
                else:
                    written += int(value)
    return read, written


def _proc_io_table(procs: Path) -> dict[tuple[int, int], tuple[int, int, int]] | None:
    """The processes listed in a cgroup.procs file: (pid, start ticks) -> (parent pid, bytes
    read from, bytes written to storage) from /proc/PID/stat and /proc/PID/io (``read_bytes``,
    ``write_bytes``: bytes submitted to block devices, a write counted when it dirties the
    page cache); None if the file cannot be read."""
    try:
        pids = procs.read_text().split()
    except OSError:
        return None
    out: dict[tuple[int, int], tuple[int, int, int]] = {}
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/io").read_text()
        except OSError:
            continue  # (exited since)
        stat = proc_stat(int(pid))
        if stat is None:
            continue
        read = written = 0
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == "read_bytes":
                read = int(value)
            elif key == "write_bytes":
                written = int(value)
        out[(int(pid), stat[1])] = (stat[0], read, written)
    return out


def _read_proc_io(procs: Path) -> tuple[int, int] | None:
    """Bytes read from and written to storage by the processes listed in a cgroup.procs file
    now (``_proc_io_table`` summed). The kernel adds a process's counts into its parent's
    when the parent reaps it, so the live processes of a task hold the history of those the
    task itself reaped (its init reaps orphans) — not of those reaped outside it
    (``ProcIOCounter`` keeps them). Where no cgroup counts I/O: v1's blkio only counts bios
    that pass a throttle limit on this kernel, and a cgroup2 mount without controllers has
    no io.stat."""
    table = _proc_io_table(procs)
    if table is None:
        return None
    return sum(r for _, r, _ in table.values()), sum(w for _, _, w in table.values())


@dataclass
class ProcIOCounter:
    """A task's block I/O from its processes' counters, as a counter that never goes back:
    a process whose parent is outside the task (an exec, a healthcheck: reaped by the agent)
    takes its counts with it when it ends, so what it had at the last read is kept here; a
    process a process of the task reaps is in its reaper's counts from then on (a read
    between its end and its reaping, or an exec whose children end with it between two
    reads, would show less: the figure then stays where it was). Reads may come from
    several threads (``shoal stats``, /metrics)."""

    seen: dict[tuple[int, int], tuple[int, int, int]] = field(default_factory=dict)
    gone: tuple[int, int] = (0, 0)  # the counts of ended processes reaped outside the task
    last: tuple[int, int] = (0, 0)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def read(self, procs: Path) -> tuple[int, int] | None:
        table = _proc_io_table(procs)
        if table is None:
            return None
        with self.lock:
            pids = {pid for pid, _ in self.seen}
            read, written = self.gone
            for key, (ppid, r, w) in self.seen.items():
                if key not in table and ppid not in pids:
                    read, written = read + r, written + w
            self.gone, self.seen = (read, written), table
            read += sum(r for _, r, _ in table.values())
            written += sum(w for _, _, w in table.values())
            self.last = (max(self.last[0], read), max(self.last[1], written))
            return self.last


def _working_set(charge: int | None, inactive_file: int | None) -> int | None:
    """A cgroup's working set: its memory charge less its inactive file cache (Docker's and
    Kubernetes' rule: a task that reads or writes big files is not counted the cache the
    kernel reclaims first)."""
    if charge is None or inactive_file is None:
        return charge
    return max(charge - inactive_file, 0)


def check_limits(layout: CgroupLayout, limits: Limits) -> None:
    """Raise CgroupError if this host cannot enforce one of ``limits``."""
    for what, wanted in (
        ("memory", limits.memory_bytes),
        ("cpu", limits.cpus),
        ("pids", limits.pids),
    ):
        if wanted and not layout.can_limit(what):
            raise CgroupError(
                f"cannot enforce a {what} limit: no {what} cgroup controller on this host "
                f"(cgroup layout: {layout.mode})"
            )


# Parent groups made (and, on v2, given their controllers) by this process: done once.
_READY_PARENTS: set[Path] = set()


@dataclass
class TaskCgroups:
    """The cgroup directories of one task, by role: v1 controller names and/or "unified"."""

    dirs: dict[str, Path]
    limits_version: str  # "v2", "v1" or "" (no limits enforced)
    # block I/O where no cgroup counts it (this process's reads only: not persisted)
    proc_io: ProcIOCounter = field(default_factory=ProcIOCounter, repr=False, compare=False)

    # -- persistence (TASKDIR/runtime.json)

    def to_json(self) -> dict[str, Any]:
        return {"dirs": {k: str(v) for k, v in self.dirs.items()}, "limits": self.limits_version}

    @classmethod
    def from_json(cls, raw: Any) -> TaskCgroups:
        if not isinstance(raw, dict):
            return cls({}, "")
        return cls(
            {str(k): Path(v) for k, v in dict(raw.get("dirs", {})).items()},
            str(raw.get("limits", "")),
        )

    # -- creation

    @classmethod
    def create(
        cls, layout: CgroupLayout, parent: str, task_id: str, limits: Limits
    ) -> TaskCgroups:
        """Make the task's groups and write its limits. Raise CgroupError (nothing left behind)
        if a limit cannot be enforced here or the groups cannot be made."""
        check_limits(layout, limits)
        roots: dict[str, Path] = {}
        if layout.unified is not None:
            roots["unified"] = layout.unified
        if layout.limits_version == "v1" or layout.mode in ("hybrid", "v1"):
            seen: set[Path] = set()
            for ctrl in _V1_WANTED:
                mount = layout.v1.get(ctrl)
                if ctrl == "cpuacct" and layout.unified is not None:
                    continue  # CPU time comes from the unified cpu.stat
                if mount is not None and mount not in seen:
                    seen.add(mount)
                    roots[ctrl] = mount
        cg = cls({}, layout.limits_version)
        try:
            for role, mount in roots.items():
                base = mount / parent
                if base not in _READY_PARENTS:
                    if role == "unified" and layout.limits_version == "v2":
                        cls._enable_v2_controllers(mount, base, layout.v2_controllers)
                    base.mkdir(exist_ok=True)
                    _READY_PARENTS.add(base)
                path = base / task_id
                try:
                    try:
                        path.mkdir()
                    except FileNotFoundError:  # the parent was removed since (a sweep)
                        base.mkdir(exist_ok=True)
                        path.mkdir()
                except FileExistsError:
                    # A leftover of a crashed agent is reused only when empty.
                    if (path / "cgroup.procs").read_text().strip():
                        raise CgroupError(f"cgroup {path} exists and has processes") from None
                cg.dirs[role] = path
            cg._write_limits(limits)
        except CgroupError:
            cg.remove_now()
            raise
        except OSError as exc:
            cg.remove_now()
            raise CgroupError(f"cannot set up the task's cgroups: {exc}") from exc
        return cg

    @staticmethod
    def _enable_v2_controllers(mount: Path, base: Path, offered: frozenset[str]) -> None:
        wanted = " ".join(f"+{c}" for c in ("memory", "cpu", "pids", "io") if c in offered)
        for level in (mount, base):
            if level == base:
                base.mkdir(exist_ok=True)
            enabled = set((level / "cgroup.subtree_control").read_text().split())
            if not {w[1:] for w in wanted.split()} <= enabled:
                _write(level / "cgroup.subtree_control", wanted)

    def _write_limits(self, limits: Limits) -> None:
        if self.limits_version == "v2":
            d = self.dirs["unified"]
            if limits.memory_bytes:
                _write(d / "memory.max", str(limits.memory_bytes))
                if (d / "memory.swap.max").exists():
                    _write(d / "memory.swap.max", "0")
            if limits.cpus:
                quota = max(1000, round(limits.cpus * CPU_PERIOD_US))
                _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            if limits.pids:
                _write(d / "pids.max", str(limits.pids))
        elif self.limits_version == "v1":
            if limits.memory_bytes:
                d = self.dirs["memory"]
                _write(d / "memory.limit_in_bytes", str(limits.memory_bytes))
                if (d / "memory.memsw.limit_in_bytes").exists():
                    _write(d / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
                else:  # no swap accounting: at least do not prefer swapping
                    _write(d / "memory.swappiness", "0")
            if limits.cpus:
                d = self.dirs["cpu"]
                _write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(d / "cpu.cfs_quota_us", str(max(1000, round(limits.cpus * CPU_PERIOD_US))))
            if limits.pids:
                _write(self.dirs["pids"] / "pids.max", str(limits.pids))

    # -- what the launcher needs

    def procs_files(self) -> list[str]:
        """Every cgroup.procs the task must join (the launcher writes 0 to each)."""
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    # -- observation

    def usage(self) -> TaskUsage:
        mem = peak = pids = None
        cpu: float | None = None
        io: tuple[int, int] | None = None
        if self.limits_version == "v2" or ("memory" not in self.dirs and "unified" in self.dirs):
            u = self.dirs.get("unified")
            if u is not None:
                mem = _working_set(_read_int(u / "memory.current"),
                                   _read_keyed(u / "memory.stat", "inactive_file"))
                peak = _read_int(u / "memory.peak")
                pids = _read_int(u / "pids.current")
                if (u / "io.stat").exists():
                    io = _read_io_stat(u / "io.stat")
        if "memory" in self.dirs:
            mem = _working_set(_read_int(self.dirs["memory"] / "memory.usage_in_bytes"),
                               _read_keyed(self.dirs["memory"] / "memory.stat",
                                           "total_inactive_file"))
            peak = _read_int(self.dirs["memory"] / "memory.max_usage_in_bytes")
        if "pids" in self.dirs:
            pids = _read_int(self.dirs["pids"] / "pids.current")
        if "unified" in self.dirs:
            usec = _read_keyed(self.dirs["unified"] / "cpu.stat", "usage_usec")
            cpu = usec / 1e6 if usec is not None else None
        elif "cpuacct" in self.dirs:
            ns = _read_int(self.dirs["cpuacct"] / "cpuacct.usage")
            cpu = ns / 1e9 if ns is not None else None
        if io is None and self.dirs:
            io = self.proc_io.read(next(iter(self.dirs.values())) / "cgroup.procs")
        return TaskUsage(mem, peak, cpu, pids, *(io or (None, None)))

    def oom_kills(self) -> int:
        """How many processes of the task the kernel's OOM killer killed (0 if unknown)."""
        if "memory" in self.dirs:
            n = _read_keyed(self.dirs["memory"] / "memory.oom_control", "oom_kill")
        elif self.limits_version == "v2":
            n = _read_keyed(self.dirs["unified"] / "memory.events", "oom_kill")
        else:
            n = None
        return n or 0

    def pids_in(self) -> list[int]:
        found: set[int] = set()
        for d in self.dirs.values():
            with contextlib.suppress(OSError, ValueError):
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        return sorted(found)

    # -- ending

    def kill(self) -> None:
        """SIGKILL everything in the task's groups: cgroup.kill where the kernel has it (atomic,
        catches forks in flight), else each pid listed (v1)."""
        unified = self.dirs.get("unified")
        if unified is not None and (unified / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(unified / "cgroup.kill", "1")
                return
        for pid in self.pids_in():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def remove_now(self) -> list[Path]:
        """rmdir every group; return those that could not be removed yet (still busy)."""
        left: list[Path] = []
        for role, d in list(self.dirs.items()):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    raise CgroupError(f"cannot remove cgroup {d}: {exc}") from exc
                left.append(d)
                continue
            del self.dirs[role]
        return left


def leftover_groups(layout: CgroupLayout, parent: str, task_ids: Iterable[str]) -> list[Path]:
    """Existing group directories of the given task ids (for sweeps and tests)."""
    ids = set(task_ids)
    mounts = set(layout.v1.values())
    if layout.unified is not None:
        mounts.add(layout.unified)
    return sorted(m / parent / t for m in mounts for t in ids if (m / parent / t).is_dir())


def remove_parent(layout: CgroupLayout, parent: str) -> list[Path]:
    """rmdir the ``parent`` group in every hierarchy, for a caller that owns it alone (a bench
    run with its own parent); a group still holding tasks stays. Returns those left."""
    mounts = set(layout.v1.values())
    if layout.unified is not None:
        mounts.add(layout.unified)
    left = []
    for d in sorted(m / parent for m in mounts):
        try:
            d.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            left.append(d)
    return left

