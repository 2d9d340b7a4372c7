"""The agent's reconciler (shoal.node.worker.Worker) against the in-memory FakeController:
expected races between its own steps log no traceback."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shoal.node.feed import StateFeed
from shoal.node.worker import Worker
from shoal.runtime.testing import FakeController


async def _no_call(*_args: object) -> bytes:
    raise AssertionError("no manager call expected")


async def test_stopping_a_task_that_was_removed_meanwhile_logs_no_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    """A stop that finds the task already stopped and removed (e.g. just after an agent
    restart, the reconciler removed it while a stop was queued) is an expected race: an INFO
    line, no ERROR and no traceback; the stop is forgotten so a later pass can retry."""
    runtime = FakeController()
    feed = StateFeed("n1", [], call_bytes=_no_call, call_json=_no_call)  # type: ignore[arg-type]
    wakeup = asyncio.Event()
    worker = Worker("n1", feed, runtime, wakeup)
    caplog.set_level(logging.INFO, logger="shoal")
    worker._stop("gone-task", 1.0)
    await asyncio.gather(*worker._stopping.values())
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == [], [r.getMessage() for r in errors]
    assert not any(r.exc_info for r in caplog.records)
    assert any("already stopped" in r.getMessage() for r in caplog.records)
    assert "gone-task" not in worker._stopping and wakeup.is_set()
