"""runtime/procfs.py: a process pinned by its pidfd, whatever number the descriptor gets."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from shoal.runtime.procfs import ProcRef


def _pidfds() -> set[int]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[pidfd]":
                out.add(int(name))
        except OSError:
            continue
    return out


@pytest.fixture
def busy() -> Iterator[subprocess.Popen[bytes]]:
    """A child, and this process with every descriptor number below 1024 in use (an agent
    with ~500 tasks holds two pidfds each)."""
    fillers = []
    while (fd := os.open("/dev/null", os.O_RDONLY)) < 1024:
        fillers.append(fd)
    os.close(fd)
    child = subprocess.Popen(["sleep", "30"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()
        for fd in fillers:
            os.close(fd)


@pytest.mark.parametrize("how", ["open_pid", "of().open"])
def test_a_pidfd_past_1023_pins_its_process(busy: subprocess.Popen[bytes], how: str) -> None:
    """Before: select() refused the descriptor (ValueError), the pidfd stayed open, and every
    task start and an agent's restart (adoption opens one per task) failed."""
    before = _pidfds()
    if how == "open_pid":
        got = ProcRef.open_pid(busy.pid)
        assert got is not None
        fd = got[1]
    else:
        ref = ProcRef.of(busy.pid)
        assert ref is not None
        opened = ref.open()
        assert opened is not None
        fd = opened
    try:
        assert fd >= 1024 and _pidfds() - before == {fd}
    finally:
        os.close(fd)


def test_a_pidfd_of_a_process_that_exited_is_none_and_closed() -> None:
    child = subprocess.Popen(["true"])
    ref = ProcRef.of(child.pid)
    assert ref is not None
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # (exited, not yet reaped)
    before = _pidfds()
    assert ref.open() is None and _pidfds() == before
    child.wait()


def test_the_agent_raises_its_open_files_limit_to_the_hard_one() -> None:
    """An agent started from a shell with the usual soft limit (1,024) would fail its ~500th
    task; it takes the hard limit, as dockerd does."""
    import sys

    code = ("import resource\n"
            "from shoal.node.agent import raise_open_files_limit\n"
            "raise_open_files_limit()\n"
            "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n")
    out = subprocess.run(["prlimit", "--nofile=1024:4096", sys.executable, "-c", code],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.split() == ["4096", "4096"], out
