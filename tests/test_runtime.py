"""shoal.runtime: the task lifecycle with real processes in real namespaces (root): exit codes,
env, workdir, stop, remove, start failures, events, recovery; plus the FakeController.

Fixtures and helpers: tests/test_runtime_support.py (per-test data dir, per-run cgroup parent, a
reaper that kills and removes whatever a test left, also when it fails).
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import dataclasses
import json
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop
from test_runtime_support import (
    CGROUP_PARENT,
    alive,
    kill_leftovers,
    needs_root,
    ns_members,
    open_fifo_writer,
    run_to_end,
    task,
    task_cgroups,
    wait_exited,
    wait_for_members,
    wait_for_output,
)

from shoal.runtime import process as process_mod
from shoal.runtime import procfs
from shoal.runtime.errors import (
    ImageUnavailable,
    InvalidTaskConfig,
    LaunchFailed,
    StartError,
    TaskExists,
    TaskNotFound,
)
from shoal.runtime.images import ImageConfig
from shoal.runtime.logs import LogLine
from shoal.runtime.process import ProcessController
from shoal.runtime.records import DEFAULT_PATH, RunState, RuntimeConfig, TaskConfig
from shoal.runtime.rootfs import MountSpec
from shoal.runtime.testing import FakeController

pytestmark = needs_root
pytest_plugins = ("test_runtime_support",)  # its fixtures

# Ignores SIGTERM (and says so once it does).
DEAF = "trap '' TERM; echo deaf; sleep 1000; sleep 1000"


def _ticks(pid: int) -> int | None:
    return procfs.start_ticks(pid)


_alive = alive


# ------------------------------------------------------------------------------ isolation


async def test_task_runs_in_its_own_pid_namespace_and_cannot_see_host_processes(
    ctl: ProcessController,
) -> None:
    st, out, _ = await run_to_end(
        ctl, task("pidns", "sh", "-c", "echo ppid=$PPID; cat /proc/1/comm; ls /proc")
    )
    assert st.exit_code == 0, st
    lines = out.split()
    assert lines[0] == "ppid=1"  # the command is the child of the namespace's init
    assert lines[1] == "init"  # tini, bind-mounted at /dev/init
    visible = sorted(int(x) for x in lines[2:] if x.isdigit())
    assert visible[0] == 1 and visible[-1] < 10, visible  # only tini, sh and ls: no host pids


async def test_task_has_its_own_hostname_and_namespaces_with_lo_up(
    ctl: ProcessController, shared: Path
) -> None:
    gate = shared / "gate"
    os.mkfifo(gate)
    cfg = task(
        "ns",
        "sh",
        "-c",
        f"hostname; ip -o link show; read x < {gate}",
        hostname="web-1.example",
        share=shared,
    )
    st = await ctl.start(cfg)
    assert st.state is RunState.RUNNING and st.pid is not None
    assert Path(f"/proc/{st.pid}/comm").read_text().strip() == "init"
    assert Path(f"/proc/{st.pid}/cmdline").read_bytes().split(b"\0")[0] == b"tini"
    for ns in ("pid", "mnt", "uts", "ipc", "net"):
        assert os.readlink(f"/proc/{st.pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    os.close(open_fifo_writer(gate))
    st = await wait_exited(ctl, "ns")
    out = [line.line for line in ctl.read_logs("ns")]
    assert out[0] == "web-1.example"
    links = out[1:]
    assert len(links) == 1 and links[0].startswith("1: lo: "), links  # loopback only
    assert "UP" in links[0].split("<")[1].split(">")[0].split(","), links  # and up
    assert os.uname().nodename != "web-1.example"


async def test_task_starts_with_no_ignored_or_blocked_signals(ctl: ProcessController) -> None:
    st, out, _ = await run_to_end(ctl, task("sigs", "grep", "^Sig[IB]", "/proc/self/status"))
    assert st.exit_code == 0
    assert sorted(out.split()) == sorted(
        ["SigBlk:", "0000000000000000", "SigIgn:", "0000000000000000"]
    )


async def test_orphans_are_reaped_by_the_tasks_init(ctl: ProcessController, shared: Path) -> None:
    gate = shared / "gate"
    os.mkfifo(gate)
    # The subshell exits at once; its sleep is orphaned to tini, exits, and must be reaped.
    st = await ctl.start(
        task("zomb", "sh", "-c", f"(sleep 0.01 &); read x < {gate}", share=shared)
    )
    assert st.pid is not None
    await asyncio.sleep(0.2)
    zombies = [
        pid
        for pid in os.listdir("/proc")
        if pid.isdigit()
        and Path(f"/proc/{pid}").exists()
        and _same_ns(int(pid), st.pid)
        and _state(int(pid)) == "Z"
    ]
    assert zombies == []
    os.close(open_fifo_writer(gate))
    await wait_exited(ctl, "zomb")


def _same_ns(pid: int, init_pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError:
        return False


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return "?"
    return stat[stat.rfind(b")") + 2 :][:1].decode()


# ------------------------------------------------------------------ exit codes, env, workdir


@pytest.mark.parametrize(
    ("command", "code", "message"),
    [
        (("true",), 0, "exit 0"),
        (("sh", "-c", "exit 3"), 3, "exit 3"),
        (("sh", "-c", "kill -TERM $$"), 143, "exit 143 (SIGTERM)"),
        (("no-such-command-xyz", "arg"), 127, "command not found: no-such-command-xyz"),
        (("/no/such/path",), 127, "command not found: /no/such/path"),
    ],
)
async def test_exit_codes_and_messages(
    ctl: ProcessController, command: tuple[str, ...], code: int, message: str
) -> None:
    st, _, err = await run_to_end(ctl, task("codes", *command))
    assert (st.exit_code, st.message, st.stopped) == (code, message, False)
    assert st.finished_at is not None and st.finished_at >= st.started_at
    assert st.pid is None
    if code == 127:
        assert message in err  # also visible in the task's logs


async def test_command_not_found_is_reported_by_start_without_a_hang(
    ctl: ProcessController,
) -> None:
    t0 = time.monotonic()
    st = await ctl.start(task("nf", "definitely-missing"))
    assert time.monotonic() - t0 < 2.0
    assert st.state is RunState.EXITED and st.exit_code == 127
    assert st.message == "command not found: definitely-missing"


async def test_env_is_exactly_the_tasks_plus_path_home_and_hostname(
    ctl: ProcessController,
) -> None:
    """The task's variables and what Docker adds unless the task sets them: PATH, HOME (from
    the user's passwd entry), HOSTNAME; nothing of the agent's own environment."""
    env = {"FOO": "bar baz", "TRICKY": 'it\'s "q" $HOME `x` \\ \n next', "EMPTY": "", "A.B": "1"}
    # /proc/PID/environ is exactly what execve() got; base64 keeps it on one log line.
    st, out, _ = await run_to_end(ctl, task("env", "base64", "-w0", "/proc/self/environ", env=env))
    assert st.exit_code == 0
    raw = base64.b64decode(out.strip()).decode()
    seen = dict(item.split("=", 1) for item in raw.split("\0") if item)
    assert seen == {**env, "PATH": DEFAULT_PATH, "HOME": "/root", "HOSTNAME": "host-env"}


async def test_env_path_is_used_for_the_command_lookup(
    ctl: ProcessController, shared: Path
) -> None:
    bindir = shared / "bin"
    bindir.mkdir()
    (bindir / "hello").write_text("#!/bin/sh\necho hello from $0\n")
    (bindir / "hello").chmod(0o755)
    st, out, _ = await run_to_end(
        ctl, task("lookup", "hello", env={"PATH": f"{bindir}:/usr/bin:/bin"}, share=shared)
    )
    assert (st.exit_code, out.strip()) == (0, f"hello from {bindir}/hello")


async def test_workdir_is_applied_and_relative_commands_resolve_from_it(
    ctl: ProcessController, shared: Path
) -> None:
    (shared / "run.sh").write_text("#!/bin/sh\npwd\n")
    (shared / "run.sh").chmod(0o755)
    st, out, _ = await run_to_end(ctl, task("wd", "./run.sh", workdir=str(shared), share=shared))
    assert (st.exit_code, out.strip()) == (0, str(shared))
    st, out, _ = await run_to_end(ctl, task("wdroot", "pwd"))
    assert (st.exit_code, out.strip()) == (0, "/")


async def test_logs_land_in_files_and_survive_the_task(ctl: ProcessController) -> None:
    st, out, err = await run_to_end(
        ctl, task("logs", "sh", "-c", "echo out1; echo err1 >&2; echo out2")
    )
    assert st.exit_code == 0
    assert (out, err) == ("out1\nout2\n", "err1\n")
    stdout, stderr = ctl.logs_path("logs")
    assert stdout.name == "stdout.log" and stderr.name == "stderr.log"
    with pytest.raises(TaskNotFound):
        ctl.logs_path("nosuch")


# -------------------------------------------------------------------------------- stopping


async def test_stop_sigterm_honoured_exits_143(ctl: ProcessController) -> None:
    await ctl.start(task("term", "sleep", "1000"))
    t0 = time.monotonic()
    st = await ctl.stop("term", grace=5.0)
    assert time.monotonic() - t0 < 1.0  # did not wait for the grace period
    assert (st.state, st.exit_code, st.stopped) == (RunState.EXITED, 143, True)
    assert st.message == "exit 143 (SIGTERM)"
    assert await ctl.stop("term", grace=5.0) == st  # idempotent


async def test_stop_sigterm_ignored_is_killed_after_grace(ctl: ProcessController) -> None:
    st = await ctl.start(task("deaf", "sh", "-c", DEAF))
    assert st.pid is not None
    await wait_for_output(ctl, "deaf", "deaf\n")  # the trap is set (RUNNING came before it)
    members = await wait_for_members(st.pid, 3)  # tini, sh, sleep
    t0 = time.monotonic()
    st = await ctl.stop("deaf", grace=0.3)
    elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 2.0
    assert (st.exit_code, st.stopped) == (137, True)
    assert st.message == "killed (SIGKILL after grace period)"
    assert not [m for m in members if _alive(*m)]


def test_children_of_a_gone_process_are_none_without_scanning_proc(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch abandoned after its shim died asks for the shim's children: the answer is
    none (they have another parent now), not a scan of every process in /proc — with 2,000
    processes on a node that scan was ~20 % of a worker's CPU while 1,000 tasks started."""
    import subprocess
    child = subprocess.Popen(["sleep", "30"])
    assert procfs.children(os.getpid()).count(child.pid) == 1
    child.kill()
    child.wait()

    def no_scan(path: object) -> Iterator[os.DirEntry[str]]:
        raise AssertionError(f"scanned {path}")
    monkeypatch.setattr(procfs.os, "scandir", no_scan)
    assert procfs.children(child.pid) == []


async def test_stop_kills_daemons_and_double_forked_children(ctl: ProcessController) -> None:
    st = await ctl.start(
        task(
            "daemons",
            "sh",
            "-c",
            "sleep 1000 & setsid sleep 1000 & (sleep 1000 &); exec sleep 1000",
        )
    )
    assert st.pid is not None
    members = await wait_for_members(st.pid, 5)  # tini + 4 sleeps
    stopped = await ctl.stop("daemons", grace=0.5)
    assert stopped.stopped and stopped.exit_code in (143, 137)
    assert [m for m in members if _alive(*m)] == []


async def test_daemons_die_when_the_main_process_exits(ctl: ProcessController) -> None:
    st = await ctl.start(task("bg", "sh", "-c", "setsid sleep 1000 & sleep 1000 & sleep 0.3"))
    assert st.pid is not None
    members = await wait_for_members(st.pid, 4)
    st = await wait_exited(ctl, "bg")
    assert (st.exit_code, st.stopped) == (0, False)
    assert [m for m in members if _alive(*m)] == []


async def test_stop_unknown_task_raises(ctl: ProcessController) -> None:
    with pytest.raises(TaskNotFound):
        await ctl.stop("nosuch", grace=1.0)


async def test_remove_stops_and_forgets_and_deletes_the_dir(ctl: ProcessController) -> None:
    st = await ctl.start(task("rm", "sleep", "1000"))
    assert st.pid is not None
    taskdir = ctl.logs_path("rm")[0].parent
    members = ns_members(st.pid)
    await ctl.remove("rm")
    assert ctl.status("rm") is None and "rm" not in ctl.tasks()
    assert not taskdir.exists()
    assert [m for m in members if _alive(*m)] == []
    await ctl.remove("rm")  # unknown: no-op


@pytest.fixture
def pin() -> Iterator[Callable[[Path], Path]]:
    """``pin(group)`` makes a child group in a task's group, which keeps it busy (rmdir:
    EBUSY) until the test removes the child; any left are removed at teardown."""
    made: list[Path] = []

    def make(group: Path) -> Path:
        (group / "pin").mkdir()
        made.append(group / "pin")
        return group / "pin"
    yield make
    for p in made:
        if p.exists():
            p.rmdir()


async def test_cgroups_busy_at_remove_are_kept_on_record_and_removed_later(
    config: RuntimeConfig, data_dir: Path, pin: Callable[[Path], Path]
) -> None:
    # A group still busy after kill_timeout used to be dropped with the task directory: no
    # agent, restart or sweep by task id knew it any more (a leak seen in CI).
    config = dataclasses.replace(config, kill_timeout=0.2)
    ctl = ProcessController(config)
    try:
        st = await ctl.start(task("busy", "sleep", "1000"))
        members = ns_members(st.pid or 0)
        groups = task_cgroups(["busy"])
        assert groups, "this test needs cgroups"
        pinned = pin(groups[0])
        await ctl.remove("busy")
        assert "busy" not in ctl.tasks() and [m for m in members if _alive(*m)] == []
        taskdir = data_dir / "tasks" / "busy"
        assert sorted(p.name for p in taskdir.iterdir()) == ["cgroups-left.json"]
        assert groups[0].is_dir()

        # an agent restarted meanwhile knows the group from the record, adopts no task
        ctl2 = ProcessController(config)
        await ctl2.recover()
        assert ctl2.tasks() == {} and groups[0].is_dir()
        await ctl2.close()

        pinned.rmdir()
        await ctl.remove("no-such-task")  # any later remove() tries again
        assert task_cgroups(["busy"]) == [] and not taskdir.exists()
    finally:
        await ctl.close()


async def test_a_restarted_agent_removes_the_cgroups_a_removed_task_left(
    config: RuntimeConfig, data_dir: Path, pin: Callable[[Path], Path]
) -> None:
    config = dataclasses.replace(config, kill_timeout=0.2)
    ctl = ProcessController(config)
    try:
        await ctl.start(task("busy2", "sleep", "1000"))
        pins = [pin(g) for g in task_cgroups(["busy2"])]
        await ctl.remove("busy2")
        await ctl.close()
        assert len(task_cgroups(["busy2"])) == len(pins)
        for p in pins:
            p.rmdir()
        ctl = ProcessController(config)
        await ctl.recover()
        assert task_cgroups(["busy2"]) == [] and list((data_dir / "tasks").iterdir()) == []
    finally:
        await ctl.close()


# ------------------------------------------------------------------------- start failures


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        (TaskConfig("Bad_Id", "h", ("true",), {}), "task_id"),
        (TaskConfig("../x", "h", ("true",), {}), "task_id"),
        (TaskConfig("ok", "-bad-", ("true",), {}), "hostname"),
        (TaskConfig("ok", "h" * 65, ("true",), {}), "hostname"),
        (TaskConfig("ok", "h", (), {}), "command"),
        (TaskConfig("ok", "h", ("a=b",), {}), "command"),
        (TaskConfig("ok", "h", ("true",), {"A=B": "1"}), "env"),
        (TaskConfig("ok", "h", ("true",), {"A": "x\0y"}), "env"),
        (TaskConfig("ok", "h", ("true",), {}, workdir="relative"), "workdir"),
    ],
)
async def test_invalid_task_config_is_rejected_before_anything_runs(
    ctl: ProcessController, data_dir: Path, cfg: TaskConfig, field: str
) -> None:
    with pytest.raises(InvalidTaskConfig) as info:
        await ctl.start(cfg)
    assert info.value.field == field
    assert isinstance(info.value, StartError)
    assert list((data_dir / "tasks").iterdir()) == []


async def test_duplicate_task_id_is_rejected(ctl: ProcessController) -> None:
    await ctl.start(task("dup", "sleep", "1000"))
    with pytest.raises(TaskExists):
        await ctl.start(task("dup", "true"))
    await ctl.stop("dup", 0)


async def test_a_workdir_that_cannot_be_made_fails_the_start_and_leaves_nothing(
    ctl: ProcessController, data_dir: Path
) -> None:
    """A missing workdir is made (test_runtime_container.py); under the default root's
    read-only /usr it cannot be: the start fails naming it."""
    with pytest.raises(LaunchFailed, match="cannot create /usr/no/such/dir"):
        await ctl.start(task("nowd", "true", workdir="/usr/no/such/dir"))
    assert ctl.status("nowd") is None
    assert list((data_dir / "tasks").iterdir()) == []
    assert kill_leftovers(data_dir) == []


async def test_a_failing_mount_fails_the_start_with_its_message(
    ctl: ProcessController, data_dir: Path
) -> None:
    # /usr is a read-only bind in the default image: no mount point can be made in it.
    bad = task("badmnt", "true", mounts=(MountSpec("tmpfs", "/usr/shoal-new"),))
    with pytest.raises(LaunchFailed, match="cannot create mount point /usr/shoal-new"):
        await ctl.start(bad)
    assert ctl.tasks() == {}
    assert list((data_dir / "tasks").iterdir()) == []


async def test_a_start_failing_while_the_launcher_waits_for_its_spec_leaves_nothing(
    ctl: ProcessController, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The launcher is spawned before the task is prepared (its namespaces are cloned meanwhile);
    # a failure after the cgroups were made must still leave no process, cgroup or directory.
    def broken_plan(*args: object, **kwargs: object) -> None:
        raise LaunchFailed("injected failure")

    monkeypatch.setattr(process_mod, "build_plan", broken_plan)
    with pytest.raises(LaunchFailed, match="injected failure"):
        await ctl.start(task("prepfail", "true"))
    assert ctl.tasks() == {}
    assert list((data_dir / "tasks").iterdir()) == []
    assert not any(str(data_dir) in " ".join(map(str, p.args))
                   for p in procfs.UNREAPED.values())  # fmt: skip
    assert task_cgroups(["prepfail"]) == []
    assert kill_leftovers(data_dir) == []  # no launcher left running


async def test_before_start_runs_in_the_tasks_namespaces_before_its_command(
    ctl: ProcessController,
) -> None:
    # The agent attaches the task's network in this hook: what it sets up in the task's net
    # namespace must be there when the command's first instruction runs.
    seen: list[int] = []

    async def hook(pid: int) -> str:
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        proc = await asyncio.create_subprocess_exec(
            "nsenter", "-t", str(pid), "-n", "ip", "link", "add", "early0", "type", "veth",
            "peer", "name", "early1")
        assert await proc.wait() == 0
        seen.append(pid)
        return "10.99.7.7"  # the address the hook gave it

    # /etc/hosts names the task's host name with its address (as Docker: a program telling
    # peers its resolved host name told them 127.0.1.1)
    cfg = task("hook", "sh", "-c", "ip -o link show early0; getent hosts $(hostname)")
    await ctl.start(cfg, before_start=hook)
    st = await wait_exited(ctl, cfg.task_id, 10.0)
    out = "".join(line.line for line in ctl.read_logs(cfg.task_id))
    assert seen and st.exit_code == 0 and "early0" in out
    last = list(ctl.read_logs(cfg.task_id))[-1].line
    assert last.split() == ["10.99.7.7", "host-hook"], out


async def test_a_failing_before_start_runs_nothing_and_leaves_nothing(
    ctl: ProcessController, data_dir: Path, shared: Path
) -> None:
    async def hook(pid: int) -> None:
        raise OSError("no veth for you")

    with pytest.raises(LaunchFailed, match="preparing its namespaces failed: no veth for you"):
        await ctl.start(task("hookfail", "sh", "-c", f"touch {shared}/ran", share=shared),
                        before_start=hook)
    await asyncio.sleep(0.2)
    assert not (shared / "ran").exists()
    assert ctl.tasks() == {}
    assert list((data_dir / "tasks").iterdir()) == []
    assert task_cgroups(["hookfail"]) == []
    assert kill_leftovers(data_dir) == []


# ----------------------------------------------------------------------- events, listener


async def test_listener_is_called_once_on_the_loop_thread_when_a_task_exits(
    ctl: ProcessController, shared: Path
) -> None:
    calls: list[tuple[str, int]] = []
    ctl.set_listener(lambda tid: calls.append((tid, threading.get_ident())))
    gate = shared / "gate"
    os.mkfifo(gate)
    await ctl.start(task("ev", "sh", "-c", f"read x < {gate}; exit 4", share=shared))
    fd = open_fifo_writer(gate)
    t0 = time.monotonic()
    os.write(fd, b"go\n")
    os.close(fd)
    while not calls and time.monotonic() - t0 < 5:
        await asyncio.sleep(0.001)
    latency = time.monotonic() - t0
    print(f"\nexit detection latency: {latency * 1000:.1f} ms")
    assert latency < 1.0
    await asyncio.sleep(0.05)
    assert calls == [("ev", threading.get_ident())]
    st = ctl.status("ev")
    assert st is not None and st.exit_code == 4


# -------------------------------------------------------------------------------- recovery


async def test_recover_adopts_a_running_task_and_then_sees_its_exit(
    config: RuntimeConfig, shared: Path
) -> None:
    gate = shared / "gate"
    first = ProcessController(config)
    os.mkfifo(gate)
    started = await first.start(
        task("adopt", "sh", "-c", f"read x < {gate}; exit 7", share=shared)
    )
    await first.close()  # the agent goes away; the task must not
    assert started.pid is not None and _ticks(started.pid) is not None

    second = ProcessController(config)
    events: list[str] = []
    second.set_listener(events.append)
    try:
        await second.recover()
        st = second.status("adopt")
        assert st is not None
        assert (st.state, st.pid, st.started_at) == (
            RunState.RUNNING,
            started.pid,
            started.started_at,
        )
        fd = open_fifo_writer(gate)
        os.write(fd, b"x\n")
        os.close(fd)
        st = await wait_exited(second, "adopt")
        assert (st.exit_code, st.message) == (7, "exit 7")
        assert events == ["adopt"]
    finally:
        await second.close()


async def test_recover_stop_of_an_adopted_task_kills_its_tree(
    config: RuntimeConfig,
) -> None:
    first = ProcessController(config)
    st = await first.start(task("adoptstop", "sh", "-c", "setsid sleep 1000 & exec sleep 1000"))
    assert st.pid is not None
    members = await wait_for_members(st.pid, 3)
    await first.close()
    second = ProcessController(config)
    try:
        await second.recover()
        st = await second.stop("adoptstop", grace=2.0)
        assert (st.exit_code, st.stopped) == (143, True)
        assert [m for m in members if _alive(*m)] == []
    finally:
        await second.close()


async def test_recover_learns_the_exit_code_of_a_task_that_ended_while_no_agent_ran(
    config: RuntimeConfig, data_dir: Path, shared: Path
) -> None:
    gate = shared / "gate"
    first = ProcessController(config)
    os.mkfifo(gate)
    await first.start(task("away", "sh", "-c", f"read x < {gate}; exit 5", share=shared))
    await first.start(task("awaystop", "sleep", "1000"))
    stopped = await first.stop("awaystop", 1.0)
    await first.close()

    fd = open_fifo_writer(gate)
    os.write(fd, b"x\n")
    os.close(fd)
    exit_file = data_dir / "tasks" / "away" / "exit"
    deadline = time.monotonic() + 5
    while not exit_file.exists():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)

    second = ProcessController(config)
    try:
        await second.recover()
        st = second.status("away")
        assert st is not None
        assert (st.state, st.exit_code, st.message, st.stopped) == (
            RunState.EXITED,
            5,
            "exit 5",
            False,
        )
        assert st.finished_at is not None and st.finished_at >= st.started_at
        # What only the agent knew (stop() was called) survives the restart too.
        again = second.status("awaystop")
        assert again is not None
        assert (again.exit_code, again.stopped) == (stopped.exit_code, True)
        assert set(second.tasks()) == {"away", "awaystop"}
    finally:
        await second.close()


async def test_recover_does_not_adopt_a_reused_pid_or_another_boot(
    config: RuntimeConfig, data_dir: Path
) -> None:
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    me = _ticks(os.getpid())
    assert me is not None
    cases = {
        "reused": {"boot_id": boot, "shim": [os.getpid(), me + 1], "init": None},
        "reboot": {"boot_id": "another-boot", "shim": [os.getpid(), me], "init": None},
    }
    for tid, pids in cases.items():
        d = data_dir / "tasks" / tid
        d.mkdir(parents=True)
        (d / "config.json").write_text(task(tid, "true").to_json())
        (d / "pids.json").write_text(json.dumps({**pids, "started_at": time.time()}))
    never = data_dir / "tasks" / "never"
    never.mkdir()
    (never / "config.json").write_text(task("never", "true").to_json())
    (data_dir / "tasks" / "garbage").mkdir()

    c = ProcessController(config)
    try:
        await c.recover()
        sts = c.tasks()
        assert set(sts) == {"reused", "reboot", "never"}
        assert all(s.state is RunState.EXITED and s.exit_code is None for s in sts.values())
        assert "rebooted" in sts["reboot"].message
        assert "never started" in sts["never"].message
    finally:
        await c.close()


async def test_close_does_not_stop_tasks(config: RuntimeConfig) -> None:
    first = ProcessController(config)
    st = await first.start(task("survive", "sleep", "1000"))
    assert st.pid is not None
    ticks = _ticks(st.pid)
    assert ticks is not None
    await first.close()
    await asyncio.sleep(0.05)
    assert _alive(st.pid, ticks)
    second = ProcessController(config)
    try:
        await second.recover()
        await second.remove("survive")
        assert not _alive(st.pid, ticks)
    finally:
        await second.close()


async def test_a_task_whose_shim_died_is_adopted_through_the_init_the_shim_recorded(
    config: RuntimeConfig, data_dir: Path
) -> None:
    first = ProcessController(config)
    st = await first.start(task("orphan", "sleep", "1000"))
    assert st.pid is not None
    ticks = _ticks(st.pid)
    await first.close()
    taskdir = data_dir / "tasks" / "orphan"
    assert (taskdir / "init.pid").read_text().split() == [str(st.pid), str(ticks)]
    shim_pid = json.loads((taskdir / "pids.json").read_text())["shim"][0]
    os.kill(shim_pid, 9)  # the task runs on without its shim
    second = ProcessController(config)
    try:
        await second.recover()
        adopted = second.status("orphan")
        assert adopted is not None
        assert (adopted.state, adopted.pid) == (RunState.RUNNING, st.pid)
        stopped = await second.stop("orphan", 2.0)
        assert stopped.state is RunState.EXITED and stopped.exit_code is None
        assert "shim died" in stopped.message
        assert ticks is not None and not _alive(st.pid, ticks)
    finally:
        await second.close()


# -------------------------------------------------------------------- uvloop, latency figures


def test_lifecycle_under_uvloop_like_the_agent(config: RuntimeConfig) -> None:
    async def scenario() -> None:
        c = ProcessController(config)
        events: list[str] = []
        c.set_listener(events.append)
        try:
            st, out, _ = await run_to_end(c, task("u1", "sh", "-c", "echo hi; exit 2"))
            assert (st.exit_code, out) == (2, "hi\n")
            assert (await c.start(task("u2", "missing-cmd"))).exit_code == 127
            await c.start(task("u3", "sh", "-c", DEAF))
            await wait_for_output(c, "u3", "deaf\n")
            st = await c.stop("u3", 0.2)
            assert st.message == "killed (SIGKILL after grace period)"
            await c.start(task("u4", "sleep", "1000"))
            await c.close()
            c = ProcessController(config)
            c.set_listener(events.append)
            await c.recover()
            assert (await c.stop("u4", 2.0)).exit_code == 143
            # every exit is told, also one before start() returned (u2's missing command;
            # u1 when the machine is slow enough) — the worker reconciles on it
            assert sorted(events) == ["u1", "u2", "u3", "u4"]
        finally:
            await c.close()

    uvloop.run(scenario())


async def test_measure_start_latency(ctl: ProcessController) -> None:
    """Prints start() -> RUNNING latency (figures, not a pass/fail)."""
    samples = []
    for i in range(15):
        t0 = time.perf_counter()
        st = await ctl.start(task(f"lat{i}", "sleep", "1000"))
        samples.append((time.perf_counter() - t0) * 1000)
        assert st.state is RunState.RUNNING
    for i in range(15):
        await ctl.stop(f"lat{i}", 0)
    samples.sort()
    print(
        f"\nstart() -> RUNNING: median {statistics.median(samples):.1f} ms, "
        f"p90 {samples[int(len(samples) * 0.9)]:.1f} ms, max {samples[-1]:.1f} ms "
        f"(n={len(samples)})"
    )


# ------------------------------------------------------------------------- FakeController


async def test_fake_controller_behaves_like_the_interface() -> None:
    now = [100.0]
    fake = FakeController(
        clock=lambda: now[0],
        missing_commands=frozenset({"nope"}),
        ignores_term=frozenset({"deaf"}),
    )
    events: list[str] = []
    fake.set_listener(events.append)
    await fake.recover()

    st = await fake.start(TaskConfig("a", "h", ("sleep", "1"), {}))
    assert (st.state, st.started_at) == (RunState.RUNNING, 100.0) and st.pid is not None
    with pytest.raises(TaskExists):
        await fake.start(TaskConfig("a", "h", ("true",), {}))
    with pytest.raises(InvalidTaskConfig):
        await fake.start(TaskConfig("B!", "h", ("true",), {}))

    now[0] = 105.0
    fake.exit("a", 3)
    await asyncio.sleep(0)
    assert events == ["a"]
    st2 = fake.status("a")
    assert st2 is not None
    assert (st2.state, st2.exit_code, st2.message, st2.finished_at) == (
        RunState.EXITED,
        3,
        "exit 3",
        105.0,
    )

    nf = await fake.start(TaskConfig("b", "h", ("nope",), {}))
    assert (nf.exit_code, nf.message) == (127, "command not found: nope")

    await fake.start(TaskConfig("c", "h", ("sleep", "1"), {}))
    st3 = await fake.stop("c", 1.0)
    assert (st3.exit_code, st3.stopped) == (143, True)
    await fake.start(TaskConfig("d", "h", ("deaf",), {}))
    st4 = await fake.stop("d", 1.0)
    assert (st4.exit_code, st4.message) == (137, "killed (SIGKILL after grace period)")
    await asyncio.sleep(0)
    assert events == ["a", "c", "d"]

    fake.start_error = LaunchFailed("boom")
    with pytest.raises(LaunchFailed):
        await fake.start(TaskConfig("e", "h", ("true",), {}))

    assert set(fake.tasks()) == {"a", "b", "c", "d"}
    fake.logs["a"] = [LogLine(1.5, "stdout", "x"), LogLine(2.0, "stderr", "y")]
    assert fake.read_logs("a", tail=1) == [LogLine(2.0, "stderr", "y")]
    assert fake.read_logs("a", since=1.6) == [LogLine(2.0, "stderr", "y")]
    assert fake.read_logs("a", timestamps=True)[0].line == "1970-01-01T00:00:01.500000000Z x"
    assert [x async for x in fake.follow_logs("a")] == fake.logs["a"]
    assert fake.usage("a") is not None and fake.usage("zz") is None
    with pytest.raises(ImageUnavailable):
        await fake.start(TaskConfig("f", "h", ("true",), {}, image="web:1"))
    fake.image_configs["web:1"] = ImageConfig(cmd=("serve",))
    assert fake.image_config("web:1").apply()[0] == ("serve",)
    await fake.start(TaskConfig("f", "h", ("serve",), {}, image="web:1"))
    await fake.remove("f")
    await fake.remove("a")
    await fake.remove("a")
    assert fake.status("a") is None
    with pytest.raises(TaskNotFound):
        await fake.stop("a", 1.0)
    with pytest.raises(TaskNotFound):
        fake.logs_path("a")
    await fake.close()


def test_runtime_config_validate_rejects_missing_tools(tmp_path: Path) -> None:
    from shoal.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="tini_path"):
        ProcessController(RuntimeConfig(data_dir=tmp_path, tini_path="/no/tini"))
    with pytest.raises(ConfigError, match=r"cc_path|compiler"):
        ProcessController(RuntimeConfig(data_dir=tmp_path, cc_path="/no/cc"))
    for bad in ({"start_timeout": 0}, {"cgroups": "maybe"}, {"log_max_files": 0},
                {"cgroup_parent": "a/b"}):
        with pytest.raises(ConfigError):
            RuntimeConfig(data_dir=tmp_path, **bad).validate()
    assert shutil.which("tini-static") is not None


async def test_task_inherits_only_stdio_with_stdin_empty(ctl: ProcessController) -> None:
    # No agent socket, pipe or log fd may leak into a task; stdin is /dev/null.
    st, out, _ = await run_to_end(
        ctl, task("fds", "sh", "-c", "ls /proc/$$/fd; readlink /proc/$$/fd/0; cat")
    )
    assert st.exit_code == 0
    lines = out.split()
    assert lines[:-1] == ["0", "1", "2"] and lines[-1] == "/dev/null"


_AGENT = """
import asyncio, json, sys
from collections.abc import Callable, Iterator
from pathlib import Path
from shoal.runtime.process import ProcessController
from shoal.runtime.records import RuntimeConfig, TaskConfig

async def main() -> None:
    c = ProcessController(RuntimeConfig(data_dir=Path(sys.argv[1]), launcher_path=sys.argv[2],
                                        cgroup_parent=sys.argv[3]))
    st = await c.start(TaskConfig("victim", "v", ("sleep", "1000"), {}))
    print(json.dumps({"pid": st.pid, "started_at": st.started_at}), flush=True)
    await asyncio.sleep(1000)

asyncio.run(main())
"""


def _set_child_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, int(on), 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


async def test_a_killed_agent_process_leaves_its_task_running_for_the_next_one(
    config: RuntimeConfig, data_dir: Path
) -> None:
    # This test process stands in for the host's init (which must reap orphaned shims; on some
    # machines PID 1 does not): the killed agent's shim becomes our child and must be reaped.
    _set_child_subreaper(True)
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _AGENT, str(data_dir), config.launcher_path, CGROUP_PARENT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert agent.stdout is not None
        line = await asyncio.wait_for(agent.stdout.readline(), 20)
    finally:
        agent.kill()  # SIGKILL: no cleanup at all
        await agent.wait()
        _set_child_subreaper(False)
    first = json.loads(line)
    shim_pid = json.loads((data_dir / "tasks" / "victim" / "pids.json").read_text())["shim"][0]
    stat = Path(f"/proc/{shim_pid}/stat").read_bytes()
    assert int(stat[stat.rfind(b")") + 2 :].split()[1]) == os.getpid()  # the shim is ours now
    c = ProcessController(config)
    try:
        await c.recover()
        st = c.status("victim")
        assert st is not None
        assert (st.state, st.pid, st.started_at) == (
            RunState.RUNNING,
            first["pid"],
            first["started_at"],
        )
        st = await c.stop("victim", 2.0)
        assert (st.exit_code, st.stopped) == (143, True)
        assert not Path(f"/proc/{shim_pid}").exists()  # reaped, not a zombie
    finally:
        await c.close()
