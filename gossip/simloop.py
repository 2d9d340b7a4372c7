"""A virtual-time asyncio event loop for whole-cluster simulations.

Owns simulated time: ``loop.time()`` starts at 0 and, whenever no callback is ready, jumps
straight to the next scheduled timer instead of sleeping. Ordinary asyncio code (sleep,
wait_for, timeout, call_later, futures, tasks) runs unchanged, so the gossip protocol that runs on
a real loop is the same code that runs here, only minutes of protocol pass in a second.

It supports no file descriptors, sockets, subprocesses, threads or signal handlers: use it with
``memnet`` only. If the simulation has nothing left to do (no ready callback, no timer) while
``run_until_complete`` still waits, ``SimulationStalled`` is raised instead of hanging.

Usage::

    loop = VirtualTimeLoop()
    try:
        loop.run_until_complete(scenario())
    finally:
        close_loop(loop)

or simply ``run_simulation(scenario())``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from .errors import SimulationStalled

T = TypeVar("T")


class _VirtualSelector:
    """Stands in for the selector: "waiting" for I/O just advances the clock."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop

    def select(self, timeout: float | None) -> list[Any]:
        if timeout is None:
            raise SimulationStalled("no timers and no ready callbacks: the simulation is stuck")
        if timeout > 0:
            self._loop._advance(timeout)
        return []

    def close(self) -> None:
        pass


class VirtualTimeLoop(asyncio.BaseEventLoop):
    """Event loop whose clock only moves when nothing is ready, jumping to the next timer."""

    def __init__(self, start: float = 0.0) -> None:
        super().__init__()
        self._now = float(start)
        self._selector = _VirtualSelector(self)

    def time(self) -> float:
        return self._now

    def _advance(self, seconds: float) -> None:
        # Land exactly on the next timer, so `when <= now` holds without float drift.
        target = self._now + seconds
        scheduled: list[asyncio.TimerHandle] = self._scheduled  # type: ignore[attr-defined]
        if scheduled:
            head = scheduled[0].when()
            if target >= head - 1e-9:
                target = max(head, self._now)
        self._now = target

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is still running on ``loop``, let it unwind, and close it."""
    try:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


def run_simulation(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on a fresh VirtualTimeLoop and close the loop afterwards."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        close_loop(loop)
