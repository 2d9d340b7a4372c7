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


async def test_a_runtime_bug_in_a_start_is_reported_rejected_not_left_pending(
        caplog: pytest.LogCaptureFixture) -> None:
    """An exception the runtime does not name (a bug: a ValueError from a malformed image's
    walk) still ends the start: the task is reported REJECTED with the error, so the leader
    places it again, and the address it may have been given goes back, as for a StartError
    — not a start retried at every pass with nothing reported."""
    from shoal.raft.models import Task, TaskState, TaskStatus
    from shoal.raft.spec import TaskSpec

    class Broken(FakeController):
        async def start(self, cfg: object, before_start: object = None) -> object:
            raise ValueError("not enough values to unpack")

    class Mesh:
        ready, detached = True, []  # type: ignore[var-annotated]

        async def detach(self, task_id: str) -> None:
            self.detached.append(task_id)

    feed = StateFeed("n1", [], call_bytes=_no_call, call_json=_no_call)  # type: ignore[arg-type]
    worker = Worker("n1", feed, Broken(), asyncio.Event())
    worker.mesh = Mesh()  # type: ignore[assignment]

    async def config(_task: object) -> object:  # (what the runtime gets: not read here)
        return object()
    worker.task_config = config  # type: ignore[method-assign,assignment]
    task = Task(id="t1", service_id="s1", service_name="web", slot=1, spec=TaskSpec(),
                service_version=1, node_id="n1", created_at=1.0,
                status=TaskStatus(state=TaskState.ASSIGNED, timestamp=1.0))
    caplog.set_level(logging.INFO, logger="shoal")
    status = await worker._start(task)
    assert status.state is TaskState.REJECTED and "not enough values" in status.err, status
    assert Mesh.detached == ["t1"]
    assert any(r.exc_info for r in caplog.records)  # (a bug: its traceback logged once)
