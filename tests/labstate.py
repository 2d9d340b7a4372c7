"""The lab's bookkeeping and clean-up: its state file, the processes and kernel objects it
owns, teardown and ``sweep``.

Owns: the state file ``STATE_DIR/<runid>.json`` (owner pid + start time, hosts, recorded
processes: written atomically), finding every live process of a lab (``_lab_targets``: by
record, netns, task shim, ``SHOAL_LAB`` marker, lab-dir path, then their children, sessions and
groups), teardown in the order MACHINE-NOTES asks for (processes, cgroups, veths, namespaces,
mounts, data dirs: ``_teardown``), ``_leftovers`` and ``sweep`` (what crashed labs left), the
/proc helpers these need, and the lab's error classes. Used by tests/netlab.py (``Lab.close``,
``python tests/netlab.py sweep``), which re-exports the public names. Must not touch: a live
lab (its owner alive), anything a state file or a lab name does not describe, a mount point
or symlink while deleting (``_safe_rmtree``), the test process and its ancestors.

Errors::

    LabError            setup or teardown failed (message says what and why)
     └─ CommandError    a command run in a host failed (carries argv, rc, stdout, stderr)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Where state files live (and the default base dir for data dirs): short, so unix socket paths fit.
STATE_DIR = Path(os.environ.get("SHOAL_LAB_STATE_DIR", "/tmp/shoal-lab"))
NETNS_PREFIX = "shoal-lab-"
IF_PREFIX = "sl"
ENV_MARKER = "SHOAL_LAB"
STATE_VERSION = 1
_RID_RE = re.compile(r"^[0-9a-f]{6}$")
_NETNS_RE = re.compile(r"^shoal-lab-([0-9a-f]{6})-(sw|h\d+)$")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
# How long a teardown goes on killing a lab's processes before it reports the survivors
# (seconds; test_netlab's unkillable process shortens it: it would wait all of it out).
KILL_TIMEOUT = 10.0


class LabError(Exception):
    """Setting up, using or tearing down the lab failed."""


class CommandError(LabError):
    """A command run inside a lab host exited non-zero (or timed out)."""

    def __init__(self, argv: Sequence[str], rc: int | None, stdout: str, stderr: str,
                 note: str = "") -> None:
        self.argv = list(argv)
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        status = f"timed out ({note})" if rc is None else f"exited {rc}"
        super().__init__(
            f"command {status}: {' '.join(self.argv)}\n"
            f"--- stdout ---\n{stdout.rstrip()}\n--- stderr ---\n{stderr.rstrip()}"
        )


# ---------------------------------------------------------------------------------------------
# /proc helpers


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    tty: int  # controlling terminal (0: none)
    state: str
    start: int  # clock ticks since boot (/proc/PID/stat field 22)
    comm: str


def _proc_info(pid: int) -> ProcInfo | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    lpar, rpar = raw.find("("), raw.rfind(")")
    rest = raw[rpar + 2:].split()
    try:
        return ProcInfo(pid=pid, ppid=int(rest[1]), pgid=int(rest[2]), sid=int(rest[3]),
                        tty=int(rest[4]), state=rest[0], start=int(rest[19]),
                        comm=raw[lpar + 1:rpar])
    except (IndexError, ValueError):
        return None


def _all_procs() -> dict[int, ProcInfo]:
    out: dict[int, ProcInfo] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _proc_info(int(entry))
            if info is not None:
                out[info.pid] = info
    return out


def _alive(pid: int, start: int | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when given, started at ``start``."""
    info = _proc_info(pid)
    if info is None or info.state in ("Z", "X"):
        return False
    return start is None or info.start == start


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists (for tests checking that tasks died)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _now_ticks() -> int:
    return int(float(Path("/proc/uptime").read_text().split()[0]) * _CLK_TCK)


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _ancestors(pid: int, procs: dict[int, ProcInfo]) -> set[int]:
    out: set[int] = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        info = procs.get(pid)
        if info is None:
            break
        pid = info.ppid
    return out


def _mountpoints() -> list[str]:
    points: list[str] = []
    for line in _read_bytes("/proc/self/mountinfo").decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) > 4:
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4]))
    return points


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _run(argv: Sequence[str], check: bool = False, timeout: float = 20.0
         ) -> subprocess.CompletedProcess[str]:
    """Run a short setup/teardown command (never a daemon: output is captured)."""
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, None, "", "", f"{timeout}s") from exc
    if check and res.returncode != 0:
        raise CommandError(argv, res.returncode, res.stdout, res.stderr)
    return res


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    res = _run(["ip", "netns", "list"])
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def netns_pids(netns: str) -> list[int]:
    """Processes whose network namespace is ``netns`` (``ip netns pids``)."""
    res = _run(["ip", "netns", "pids", netns])
    return [int(tok) for tok in res.stdout.split() if tok.isdigit()]


def _root_links(prefix: str) -> list[str]:
    res = _run(["ip", "-o", "link", "show"])
    names = []
    for line in res.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            name = parts[1].strip().split("@")[0]
            if name.startswith(prefix):
                names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# State file and teardown (shared by Lab.close() and sweep())


@dataclass
class _State:
    runid: str
    owner_pid: int
    owner_start: int
    created_ticks: int
    root: str  # BASE/shoal-lab-RID: every data dir is below it
    switch_netns: str
    hosts: list[dict[str, str]] = field(default_factory=list)  # name, ip, netns, data_dir, port
    procs: list[dict[str, int]] = field(default_factory=list)  # pid, start
    keep_data: bool = False

    @property
    def netns(self) -> list[str]:
        return [h["netns"] for h in self.hosts] + [self.switch_netns]

    def to_json(self) -> str:
        return json.dumps({"version": STATE_VERSION, **self.__dict__}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> _State:
        data: dict[str, Any] = json.loads(text)
        if data.pop("version", None) != STATE_VERSION:
            raise ValueError("unknown state file version")
        return cls(**data)


def _state_path(runid: str) -> Path:
    return STATE_DIR / f"{runid}.json"


def _write_state(state: _State, exclusive: bool = False) -> None:
    """Write atomically: a reader sees the old or the new file, never a partial one.
    ``exclusive`` fails with FileExistsError if the run id is taken."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    final = _state_path(state.runid)
    tmp = final.with_name(f".{state.runid}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(state.to_json())
    try:
        if exclusive:
            os.link(tmp, final)
        else:
            os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _task_shims(state: _State) -> list[int]:
    """Shim pids recorded by agents under DATA_DIR/tasks/<task_id>/shim.pid that still run and
    started after the lab was created (a guard against pid reuse)."""
    pids: list[int] = []
    for host in state.hosts:
        for pidfile in Path(host["data_dir"]).glob("tasks/*/shim.pid"):
            try:
                pid = int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            info = _proc_info(pid)
            if info is not None and info.state != "Z" and info.start >= state.created_ticks:
                pids.append(pid)
    return pids


def _task_ids(state: _State) -> set[str]:
    ids: set[str] = set()
    for host in state.hosts:
        tasks = Path(host["data_dir"]) / "tasks"
        with contextlib.suppress(OSError):
            ids.update(p.name for p in tasks.iterdir() if p.is_dir() and len(p.name) >= 8)
    return ids


def _lab_targets(state: _State, existing_netns: Iterable[str] | None = None) -> dict[int, str]:
    """Every live process that belongs to the lab, with the reason it was picked.

    Roots: recorded processes (pid + start time), processes in the lab's netns, task shims
    (shim.pid), processes with SHOAL_LAB=<runid> in their environment, and processes without a
    terminal whose cmdline or cwd points into the lab dir. Closure: descendants of any of them,
    and members of the session or process group of all but the path-matched ones (catches task
    processes in their own netns and pid namespace, never a user's whole terminal session).
    """
    procs = _all_procs()
    protected = _ancestors(os.getpid(), procs)
    roots: dict[int, str] = {}
    for rec in state.procs:
        if _alive(rec["pid"], rec["start"]):
            roots[rec["pid"]] = "started by the lab"
    names = set(list_netns() if existing_netns is None else existing_netns)
    for ns in state.netns:
        if ns in names:
            for pid in netns_pids(ns):
                roots.setdefault(pid, f"in netns {ns}")
    for pid in _task_shims(state):
        roots.setdefault(pid, "task shim (shim.pid)")
    root_b = state.root.rstrip("/").encode()
    marker = f"{ENV_MARKER}={state.runid}".encode()
    loose: dict[int, str] = {}  # matched by path only: closure over children, not sessions
    for pid, info in procs.items():
        if pid in roots or pid in protected or info.state == "Z":
            continue
        if marker in _read_bytes(f"/proc/{pid}/environ").split(b"\0"):
            roots[pid] = f"environment has {ENV_MARKER}={state.runid}"
            continue
        if info.tty:  # someone's terminal (a shell or `less` looking at the logs): spare it
            continue
        if root_b in _read_bytes(f"/proc/{pid}/cmdline"):
            loose[pid] = "cmdline mentions the lab dir"
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        if cwd and _under(cwd, state.root):
            loose[pid] = "cwd in the lab dir"
    # Closure: children of any target; members of a strong target's session or process group
    # (a task shim is a session leader, its task processes stay in that session).
    targets = {**loose, **roots}
    strong = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, info in procs.items():
            if pid in targets or pid in protected or info.state == "Z":
                continue
            for rel, how in ((info.ppid, "child"), (info.sid, "session"), (info.pgid, "group")):
                if rel in targets and rel != pid and (how == "child" or rel in strong):
                    targets[pid] = f"{how} of {rel}"
                    if rel in strong:
                        strong.add(pid)
                    changed = True
                    break
    return {pid: why for pid, why in targets.items() if pid not in protected}


def _kill_all(state: _State, reap: Callable[[], None], keep: Callable[[], set[int]],
              timeout: float | None = None) -> None:
    """SIGKILL every lab process until none is left (re-scanning catches late forks), then reap
    the zombies this process adopted as subreaper (all but ``keep()``: pids its Popen objects
    will reap themselves). ``timeout`` defaults to KILL_TIMEOUT."""
    deadline = time.monotonic() + (KILL_TIMEOUT if timeout is None else timeout)
    seen: set[int] = set()
    passes = 0
    while True:
        reap()
        targets = _lab_targets(state)
        seen.update(targets)
        if not targets:
            break
        passes += 1
        # Group kills first: a task shim is a session leader, tini/unshare sit in its group.
        for pid in targets:
            info = _proc_info(pid)
            if info is not None and info.pgid == pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        for pid in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        # (the deadline is checked after the kills, never before: on a machine at load 180
        # one scan of /proc took longer than the whole timeout, and a check before the
        # kills left a 105-agent lab running while its teardown said it was gone; and not
        # before a second pass, which catches what the agents forked during the first scan)
        if time.monotonic() > deadline and passes >= 2:
            break
        time.sleep(0.05)
    _reap_adopted(seen - keep())


def _reap_adopted(pids: Iterable[int]) -> None:
    """Reap those of ``pids`` that are zombie children of this process."""
    me = os.getpid()
    for pid in pids:
        info = _proc_info(pid)
        if info is not None and info.ppid == me and info.state == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _become_subreaper() -> None:
    """Make orphans of processes we start (task shims whose agent died, tini after unshare)
    reparent to this process instead of PID 1, so teardown can reap them: on machines whose
    PID 1 does not reap, they would stay zombies for good."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _cgroup_dirs(task_ids: set[str]) -> list[Path]:
    """Cgroup directories named after one of the lab's task ids (best effort, depth <= 4)."""
    if not task_ids:
        return []
    found: list[Path] = []
    base = Path("/sys/fs/cgroup")
    for dirpath, dirnames, _files in os.walk(base):
        depth = len(Path(dirpath).relative_to(base).parts)
        if depth >= 4:
            dirnames[:] = []
        for d in dirnames:
            if any(tid in d for tid in task_ids):
                found.append(Path(dirpath) / d)
    return found


def _remove_cgroups(dirs: list[Path], timeout: float = 5.0) -> None:
    """Kill what is left in each cgroup (cgroup.kill where the kernel has it, else SIGKILL to
    every listed pid) and remove it, retrying while the dying processes drain out (a task
    with many processes, e.g. a capped fork bomb, takes a moment after its init died)."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            if not d.exists():
                continue
            kill = d / "cgroup.kill"
            if kill.exists():
                with contextlib.suppress(OSError):
                    kill.write_text("1")
            with contextlib.suppress(OSError, ValueError):
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()),
                              key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            try:
                d.rmdir()
            except OSError:
                left.append(d)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    remove_empty_cgroup_parents()


def remove_empty_cgroup_parents(name: str = "shoal") -> list[Path]:
    """rmdir the runtime's parent cgroup (``name`` under each hierarchy) where no task group
    is left in it; one still in use keeps it (rmdir of a non-empty group fails), and an agent
    makes it again when it starts its next task. Returns those removed."""
    removed = []
    base = Path("/sys/fs/cgroup")
    for parent in [base / name, *base.glob(f"*/{name}")]:
        with contextlib.suppress(OSError):
            parent.rmdir()
            removed.append(parent)
    return removed


def _safe_rmtree(top: str) -> None:
    """Remove ``top`` without ever descending into a mount point or following a symlink."""
    mounts = set(_mountpoints())
    try:
        top_dev = os.lstat(top).st_dev
    except FileNotFoundError:
        return

    def rm(path: str) -> None:
        with os.scandir(path) as it:
            entries = list(it)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if entry.path in mounts or entry.stat(follow_symlinks=False).st_dev != top_dev:
                    raise LabError(f"refusing to delete across mount point {entry.path}")
                rm(entry.path)
                os.rmdir(entry.path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    if top in mounts:
        raise LabError(f"refusing to delete mount point {top}")
    rm(top)
    os.rmdir(top)


def _teardown(state: _State, reap: Callable[[], None] = lambda: None,
              keep: Callable[[], set[int]] = set,
              seen_tasks: set[str] | None = None) -> list[str]:
    """Remove everything ``state`` describes, in the order MACHINE-NOTES asks for: processes,
    then veths, then namespaces, then mounts and data dirs. Returns problems (empty = clean).
    ``seen_tasks`` gains the task ids found (for the caller's leftover check, which runs
    once the data dirs that name them are gone)."""
    problems: list[str] = []
    task_ids = _task_ids(state)
    _kill_all(state, reap, keep)
    # again: agents go on starting tasks while the kills proceed (a loaded lab's kills take
    # seconds), and each start made a cgroup named after its task (52 leaked once so)
    task_ids |= _task_ids(state)
    if seen_tasks is not None:
        seen_tasks |= task_ids
    # Verified, not assumed: a process still running after the kills is reported (and keeps
    # the state file, so the next sweep tries again) instead of being counted as removed.
    for pid, why in sorted(_lab_targets(state).items()):
        info = _proc_info(pid)
        problems.append(f"process {pid} ({info.comm if info else '?'}, {why}) survived SIGKILL")
    _remove_cgroups(_cgroup_dirs(task_ids))
    existing = set(list_netns())
    if state.switch_netns in existing:
        for host in state.hosts:
            _run(["ip", "-n", state.switch_netns, "link", "del", host["port"]])
    for ns in state.netns:
        if ns in existing:
            res = _run(["ip", "netns", "del", ns])
            if res.returncode != 0:
                problems.append(f"ip netns del {ns}: {res.stderr.strip()}")
    for link in _root_links(f"{IF_PREFIX}{state.runid}"):
        _run(["ip", "link", "del", link])
    for mnt in sorted((m for m in _mountpoints() if _under(m, state.root)),
                      key=len, reverse=True):
        res = _run(["umount", "-l", mnt])
        if res.returncode != 0:
            problems.append(f"umount {mnt}: {res.stderr.strip()}")
    if any(p.endswith("survived SIGKILL") for p in problems):
        # the data dir names the tasks whose cgroups the survivors hold: kept, so the next
        # sweep (the state file stays too) can remove those cgroups
        problems.append(f"kept {state.root} for the next sweep")
    elif not state.keep_data:
        try:
            _safe_rmtree(state.root)
        except (OSError, LabError) as exc:
            problems.append(f"removing {state.root}: {exc}")
    return problems


def _leftovers(state: _State, task_ids: set[str] | None = None) -> list[str]:
    out: list[str] = []
    task_ids = _task_ids(state) | (task_ids or set())
    existing = list_netns()
    for pid, why in sorted(_lab_targets(state, existing).items()):
        info = _proc_info(pid)
        comm = info.comm if info else "?"
        out.append(f"process {pid} ({comm}): {why}")
    out += [f"netns {ns}" for ns in state.netns if ns in existing]
    out += [f"link {name}" for name in _root_links(f"{IF_PREFIX}{state.runid}")]
    out += [f"mount {m}" for m in _mountpoints() if _under(m, state.root)]
    out += [f"cgroup {d}" for d in _cgroup_dirs(task_ids)]
    if not state.keep_data and os.path.lexists(state.root):
        out.append(f"data dir {state.root}")
    return out


def sweep(verbose: bool = False) -> list[str]:
    """Remove leftovers of earlier labs whose owning process is dead; never touch a live lab.

    A lab is identified by its state file STATE_DIR/<runid>.json (owner pid + start time); a
    netns named shoal-lab-<runid>-* whose run id has no state file at all is an orphan and is
    removed too. Returns a description of what was removed.
    """
    removed: list[str] = []
    if not shutil.which("ip"):
        return removed
    # List namespaces before reading state files: a live lab writes its state file before it
    # creates any namespace, so every namespace seen here has a state file visible below.
    netns_by_rid: dict[str, list[str]] = {}
    for ns in list_netns():
        m = _NETNS_RE.match(ns)
        if m:
            netns_by_rid.setdefault(m.group(1), []).append(ns)
    known: set[str] = set()
    for path in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []:
        rid = path.stem
        if not _RID_RE.match(rid):
            continue
        known.add(rid)
        try:
            state = _State.from_json(path.read_text())
        except (OSError, ValueError, TypeError) as exc:
            if verbose:
                print(f"sweep: skipping unreadable {path}: {exc}", file=sys.stderr)
            continue
        if _alive(state.owner_pid, state.owner_start):
            continue
        what = _leftovers(state)
        problems = _teardown(state)
        if not problems:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        # Only what is really gone counts as removed (checked again after the teardown).
        left = {w.split(":")[0] for w in _leftovers(state)}
        gone = [w for w in what if w.split(":")[0] not in left]
        removed += [f"lab {rid}: {w}" for w in gone] or [f"lab {rid}: state file"]
        removed += [f"lab {rid}: could not remove: {p}" for p in problems]
    for rid, names in netns_by_rid.items():
        if rid in known:
            continue
        killed: list[int] = []
        for ns in names:
            for pid in netns_pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in killed) and time.monotonic() < deadline:
            time.sleep(0.02)
        _reap_adopted(killed)
        for ns in sorted(names, key=lambda n: n.endswith("-sw")):
            _run(["ip", "netns", "del", ns])
            removed.append(f"orphan netns {ns}")
    if verbose:
        for line in removed:
            print(f"sweep: removed {line}", file=sys.stderr)
    return removed
