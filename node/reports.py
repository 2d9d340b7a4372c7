"""A worker's task status reports, gathered into one Raft write per round trip.

Owns: the queue of this node's status reports not yet written and the one flush in flight
that writes them: ``{"op": "task_statuses", "node_id", "now", "reports": [[task_id,
status], ...]}`` (shoal.raft.state), or one ``task_status`` per report while the cluster
writes a schema older than 3 (an older node does not know the batch; the state machine
refuses it there as that node does). Must not touch: what
the reports say (shoal.node.worker decides), the state source's transport (node/feed.py).

Why: a worker starting 30 tasks at once reported each one in its own write: 30 mTLS calls
to a manager, 30 Raft entries, each woken held feed poll answered 30 times (issue 16's
scale lab: ~1.2 commits per task started). swarmkit's dispatcher batches UpdateTaskStatus
the same way. No timer: the first report goes out at once; reports made while a write is
in flight wait for it and go together in the next one, so an idle node's report is as
fast as before and a busy node's reports coalesce by themselves.

A report that is refused or not committed is not retried here: the worker is
level-triggered, its next pass observes the task again and reports what it sees (as with
a single report before). Errors of the whole write are logged; the caller's ``report``
returns either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from shoal.node.source import StateSource
from shoal.raft.errors import CommandRejected, StoreError
from shoal.raft.models import TaskStatus, to_dict
from shoal.raft.schema import GATED_COMMANDS, LEGACY

log = logging.getLogger("shoal.worker")

MAX_BATCH = 256  # reports per write (a write of 256 statuses is ~60 KiB)


class Reporter:
    """Writes this node's task status reports, many per write when they come together."""

    def __init__(self, node_id: str, store: Callable[[], StateSource],
                 clock_offset: Callable[[], float | None] = lambda: None) -> None:
        self.node_id = node_id
        self._store = store  # the current state source (the agent swaps it on role changes)
        # the managers' clock minus this node's, as its heartbeats measured it (None: not
        # known); sent with each write as "skew" (shoal.node.control.dispatcher)
        self.clock_offset = clock_offset
        # task id → (its newest report, futures of the callers waiting for it)
        self._pending: dict[str, tuple[TaskStatus, list[asyncio.Future[None]]]] = {}
        self._flushing: asyncio.Task[None] | None = None
        self.writes = 0  # writes proposed (for tests and stats)

    async def report(self, task_id: str, status: TaskStatus) -> None:
        """Queue ``status`` for ``task_id`` and wait until the write carrying it ended
        (committed, refused or failed: see the module docstring)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queued = self._pending.get(task_id)
        if queued is None:
            self._pending[task_id] = (status, [fut])
        else:  # one report per task per write: the one the state machine would keep
            kept = status if status.merges_over(queued[0]) else queued[0]
            self._pending[task_id] = (kept, [*queued[1], fut])
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush(), name="status-reports")
        await asyncio.shield(fut)

    async def _flush(self) -> None:
        while self._pending:
            ids = list(self._pending)[:MAX_BATCH]
            batch = {tid: self._pending.pop(tid) for tid in ids}
            try:
                await self._write({tid: status for tid, (status, _) in batch.items()})
            except Exception:  # never leave a caller waiting
                log.exception("writing %d status reports failed", len(batch))
            finally:
                for _, futs in batch.values():
                    for f in futs:
                        if not f.done():
                            f.set_result(None)

    async def _write(self, statuses: dict[str, TaskStatus]) -> None:
        store = self._store()
        schema = getattr(store.snapshot().cluster, "schema", LEGACY)
        if schema < GATED_COMMANDS["task_statuses"]:  # older nodes apply the log too
            await asyncio.gather(*(self._propose(store, {
                "op": "task_status", "task_id": tid, "node_id": self.node_id,
                "now": time.time(), "status": to_dict(s)}) for tid, s in statuses.items()))
            return
        cmd: dict[str, Any] = {
            "op": "task_statuses", "node_id": self.node_id, "now": time.time(),
            "reports": [[tid, to_dict(s)] for tid, s in statuses.items()]}
        skew = self.clock_offset()
        if skew is not None:
            cmd["skew"] = skew
        await self._propose(store, cmd)

    async def _propose(self, store: StateSource, cmd: dict[str, Any]) -> None:
        self.writes += 1
        what = cmd.get("task_id") or f"{len(cmd['reports'])} tasks"
        try:
            result = await store.propose(cmd)
        except CommandRejected as exc:
            log.debug("status report for %s refused: %s", what, exc)
            return
        except StoreError as exc:
            log.warning("status report for %s not committed (will retry): %s", what, exc)
            return
        refused = result.get("refused") if isinstance(result, dict) else None
        if refused:
            log.debug("status reports refused: %s", refused)
