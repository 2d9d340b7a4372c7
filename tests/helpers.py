"""Small helpers shared by the tests (and bench/ scripts that import from tests/): free loopback
ports and polling a condition from a coroutine.

Owns: ``free_port``, ``free_ports``, ``until``. Must not touch: network namespaces and agents
(tests/netlab.py: its ``wait_until`` polls from a thread and retries on exceptions), anything
outside loopback. ``until`` lets an exception from the condition propagate: a test that polls a
store wants to see a bug at once, not a timeout later.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"


def free_port(kind: int = socket.SOCK_STREAM, host: str = LOOPBACK) -> int:
    """A port nothing listens on now (the kernel's pick; another process may take it later)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """``n`` distinct free TCP ports (held open together while picked, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


async def until(cond: Callable[[], T | None], timeout: float, what: str = "condition",
                interval: float = 0.02) -> T:
    """Poll ``cond`` every ``interval`` s until it returns something truthy and return that;
    AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        await asyncio.sleep(interval)
    return value
