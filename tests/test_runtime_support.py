"""Shared fixtures and helpers of the runtime tests (tests/test_runtime*.py). No tests here.

Every test's tasks live under its own tmp data dir and in cgroups under a per-run parent
(``shoal-test-<run id>``), so concurrent test runs on one machine never collide; the autouse
``reaper`` fixture kills whatever a test left running (by the pids recorded in each task dir,
then by a sweep for processes whose command line names the data dir, then by the task cgroups)
and removes the task cgroups, also when the test fails. The launcher is compiled once per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shoal.runtime import cgroups as cg_mod
from shoal.runtime import procfs
from shoal.runtime.launcher import ensure_launcher
from shoal.runtime.process import ProcessController
from shoal.runtime.records import RunState, RuntimeConfig, RuntimeStatus, TaskConfig
from shoal.runtime.rootfs import MountSpec

_TOOLS = ("/usr/bin/tini-static", "/usr/bin/unshare")
_MISSING = [t for t in _TOOLS if not os.path.exists(t)] + (
    [] if shutil.which("cc") else ["cc (gcc)"]
)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or bool(_MISSING),
    reason=f"needs root and {_MISSING or 'tini, cc'} (namespaces, cgroups)",
)

#: cgroup parent of this test run (unique: concurrent runs do not collide).
CGROUP_PARENT = f"shoal-test-{secrets.token_hex(3)}"
LAYOUT = cg_mod.detect()


def _ticks(pid: int) -> int | None:
    return procfs.start_ticks(pid)


def alive(pid: int, ticks: int) -> bool:
    """The process (pid, start ticks) exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    rest = stat[stat.rfind(b")") + 2 :].split()
    return rest[0] != b"Z" and int(rest[19]) == ticks


def ns_members(init_pid: int) -> list[tuple[int, int]]:
    """(pid, start ticks) of every live process in init_pid's pid namespace (host pids)."""
    target = os.readlink(f"/proc/{init_pid}/ns/pid")
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != target:
                    continue
            except OSError:
                continue
            ticks = _ticks(int(entry))
            if ticks is not None and alive(int(entry), ticks):
                members.append((int(entry), ticks))
    return members


def task_cgroups(task_ids: list[str] | None = None) -> list[Path]:
    """This run's task cgroup directories (all, or of the given tasks)."""
    found = []
    mounts = set(LAYOUT.v1.values()) | ({LAYOUT.unified} if LAYOUT.unified else set())
    for m in mounts:
        base = m / CGROUP_PARENT
        if base.is_dir():
            found += [p for p in base.iterdir() if p.is_dir()
                      and (task_ids is None or p.name in task_ids)]
    return sorted(found)


def kill_leftovers(data_dir: Path) -> list[str]:
    """SIGKILL everything started under data_dir, remove its cgroups; return what was left."""
    left: list[str] = []
    for pids_file in data_dir.glob("tasks/*/pids.json"):
        try:
            pids = json.loads(pids_file.read_text())
        except (OSError, ValueError):
            continue
        if not pids.get("init"):  # recorded by the shim
            with contextlib.suppress(OSError, ValueError):
                pids["init"] = [int(x) for x in (pids_file.parent / "init.pid").read_text().split()]
        for role in ("init", "shim"):
            ref = pids.get(role)
            if ref and alive(ref[0], ref[1]):
                left.append(f"{pids_file.parent.name} {role} {ref[0]}")
                with contextlib.suppress(ProcessLookupError):
                    if role == "init":
                        os.kill(ref[0], signal.SIGKILL)  # kills the whole pid namespace
                    else:
                        os.killpg(ref[0], signal.SIGKILL)
    needle = str(data_dir).encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmdline:
                left.append(f"sweep {entry} {cmdline[:80]!r}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry), signal.SIGKILL)
    ids = [p.name for p in data_dir.glob("tasks/*")]
    for group in task_cgroups(ids):
        left.append(f"cgroup {group}")
        with contextlib.suppress(OSError):
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 5
        while group.exists() and time.monotonic() < deadline:
            try:
                group.rmdir()
            except OSError:
                time.sleep(0.01)
    for pid, proc in list(procfs.UNREAPED.items()):
        if needle in b" ".join(str(a).encode() for a in proc.args):
            try:
                proc.wait(timeout=5)
            finally:
                procfs.UNREAPED.pop(pid, None)
    return left


@pytest.fixture(scope="session")
def launcher_bin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(ensure_launcher(tmp_path_factory.mktemp("launcher")))
    yield path
    for m in set(LAYOUT.v1.values()) | ({LAYOUT.unified} if LAYOUT.unified else set()):
        with contextlib.suppress(OSError):
            (m / CGROUP_PARENT).rmdir()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "shoal-rt"


@pytest.fixture(autouse=True)
def reaper(data_dir: Path) -> Iterator[None]:
    yield
    kill_leftovers(data_dir)


@pytest.fixture
def config(data_dir: Path, launcher_bin: str) -> RuntimeConfig:
    return RuntimeConfig(
        data_dir=data_dir,
        start_timeout=5.0,
        kill_timeout=5.0,
        launcher_path=launcher_bin,
        cgroup_parent=CGROUP_PARENT,
    )


@pytest.fixture
async def ctl(config: RuntimeConfig) -> AsyncIterator[ProcessController]:
    c = ProcessController(config)
    yield c
    await c.close()


@pytest.fixture
def shared(data_dir: Path) -> Path:
    """A host directory every task made with ``task(..., share=True)`` sees at the same path."""
    path = data_dir.parent / "shared"
    path.mkdir(exist_ok=True)
    return path


def task(
    task_id: str,
    *command: str,
    env: dict[str, str] | None = None,
    hostname: str = "",
    workdir: str = "",
    share: Path | None = None,
    **kwargs: object,
) -> TaskConfig:
    """A TaskConfig; ``share`` bind-mounts a host directory at the same path in the task."""
    mounts: tuple[MountSpec, ...] = tuple(kwargs.pop("mounts", ()))  # type: ignore[arg-type]
    if share is not None:
        mounts += (MountSpec("bind", str(share), str(share)),)
    return TaskConfig(
        task_id, hostname or f"host-{task_id}", command, env or {}, workdir,
        mounts=mounts, **kwargs,
    )


async def wait_exited(c: ProcessController, task_id: str, timeout: float = 10.0) -> RuntimeStatus:
    deadline = time.monotonic() + timeout
    while True:
        st = c.status(task_id)
        assert st is not None
        if st.state is RunState.EXITED:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"{task_id} still running after {timeout}s: {st}")
        await asyncio.sleep(0.01)


def output(c: ProcessController, task_id: str, stream: str = "stdout") -> str:
    """A stream's text as the task wrote it (lines joined with newlines)."""
    return "".join(line.line + "\n" for line in c.read_logs(task_id) if line.stream == stream)


async def run_to_end(
    c: ProcessController, cfg: TaskConfig, timeout: float = 10.0
) -> tuple[RuntimeStatus, str, str]:
    await c.start(cfg)
    st = await wait_exited(c, cfg.task_id, timeout)
    return st, output(c, cfg.task_id), output(c, cfg.task_id, "stderr")


async def wait_for_output(c: ProcessController, task_id: str, text: str,
                          timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in output(c, task_id):
        assert time.monotonic() < deadline, f"{task_id} did not print {text!r}"
        await asyncio.sleep(0.005)


async def wait_for_members(init_pid: int, n: int, timeout: float = 5.0) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    while len(members := ns_members(init_pid)) < n:
        assert time.monotonic() < deadline, f"only {members} in the task"
        await asyncio.sleep(0.01)
    return members


def open_fifo_writer(path: Path, timeout: float = 5.0) -> int:
    """Open a FIFO for writing once the task has opened it for reading."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def release(gate: Path, data: bytes = b"x\n") -> None:
    fd = open_fifo_writer(gate)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
