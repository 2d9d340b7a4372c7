"""Process identity from /proc: a process named by pid + start time (safe against pid reuse
within one boot), pidfds for it, and reaping the launcher shims this process spawned.

Owns: reads of ``/proc/PID/stat``, ``/proc/PID/task/PID/children``, ``/proc/PID/net/dev`` (the
traffic of a process's network namespace) and the boot id; the process-wide table of unreaped
shims (``UNREAPED``).
Must not touch: the task directory, cgroups, or any signal sending (runtime/process.py decides
what to signal; this module only says which process is which).
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot), None if gone."""
    stat = proc_stat(pid)
    return stat[1] if stat is not None else None


def proc_stat(pid: int) -> tuple[int, int] | None:
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


def net_dev_bytes(proc: ProcRef) -> tuple[int, int] | None:
    """Bytes received and sent on every interface but ``lo`` of ``proc``'s network namespace
    (/proc/PID/net/dev: "eth0: rx_bytes rx_packets ... tx_bytes ..." after two header lines),
    None if it is gone — or if its pid now names another process (checked after the read)."""
    try:
        text = Path(f"/proc/{proc.pid}/net/dev").read_text()
    except OSError:
        return None
    if start_ticks(proc.pid) != proc.ticks:
        return None
    rx = tx = 0
    for line in text.splitlines()[2:]:
        name, sep, counters = line.partition(":")
        fields = counters.split()
        if sep and name.strip() != "lo" and len(fields) >= 9:
            rx += int(fields[0])
            tx += int(fields[8])
    return rx, tx


def children(pid: int) -> list[int]:
    """Child pids of a (single-threaded) process; none once it is gone (its children have
    another parent then)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            return []  # (no scan: with 2,000 processes one cost ~20 % of an agent's CPU)
        # the kernel lacks CONFIG_PROC_CHILDREN: scan
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



def exited(pidfd: int) -> bool:
    """Whether the process of ``pidfd`` has exited (a pidfd is readable then). poll, not
    select: an agent with many tasks holds descriptors past select's 1023."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))

@dataclass(frozen=True)
class ProcRef:
    """A process identified by pid + start time, safe against pid reuse (within one boot)."""

    pid: int
    ticks: int

    @classmethod
    def of(cls, pid: int) -> ProcRef | None:
        ticks = start_ticks(pid)
        return None if ticks is None else cls(pid, ticks)

    def open(self) -> int | None:
        """A pidfd for this very process, or None if it is gone (or a zombie: exited but not yet
        reaped, e.g. a shim a previous controller in this same process spawned; it is reaped)."""
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return None
        # Checked after opening: if the start time still matches, the fd pins the right process.
        if start_ticks(self.pid) != self.ticks:
            os.close(fd)
            return None
        if exited(fd):
            reap(self.pid, fd)
            os.close(fd)
            return None
        return fd

    @classmethod
    def open_pid(cls, pid: int, parent: int | None = None) -> tuple[ProcRef, int] | None:
        """A reference to the process now at ``pid`` and a pidfd for it (one /proc read instead
        of :meth:`of` + :meth:`open`); None if it is gone, has exited, or (``parent`` given) is
        not that process's child, i.e. the pid was reused."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        # Read after opening: what the fd pins is what we describe.
        stat = proc_stat(pid)
        if stat is None or (parent is not None and stat[0] != parent):
            os.close(fd)
            return None
        ref = cls(pid, stat[1])
        if exited(fd):
            reap(pid, fd)
            os.close(fd)
            return None
        return ref, fd

    def to_json(self) -> list[int]:
        return [self.pid, self.ticks]

    @classmethod
    def read(cls, path: Path) -> ProcRef | None:
        """The "PID TICKS" the shim records in TASKDIR/init.pid; None if absent or unreadable."""
        try:
            pid, ticks = path.read_text().split()
            return cls(int(pid), int(ticks))
        except (OSError, ValueError):
            return None

    @classmethod
    def from_json(cls, raw: Any) -> ProcRef | None:
        if raw is None:
            return None
        return cls(int(raw[0]), int(raw[1]))


# Shims this process spawned and has not reaped yet, by pid. Process-wide (not per controller):
# a controller re-created in the same process (agent restart in tests, reload) adopts them, and
# whichever controller sees one exit reaps it through its Popen, so Popen never warns about it.
UNREAPED: dict[int, subprocess.Popen[bytes]] = {}


def reap(pid: int, pidfd: int) -> None:
    """Reap an exited process if it is our child: one we spawned (through its Popen), or one
    that became ours (a shim of an earlier agent, when the agent is a child subreaper)."""
    proc = UNREAPED.pop(pid, None)
    if proc is not None:
        if proc.poll() is None:
            UNREAPED[pid] = proc  # pidfd said it exited; should not happen, keep it for later
        return
    with contextlib.suppress(ChildProcessError):  # not our child: its parent reaps it
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)


