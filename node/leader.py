"""Leader-only control loop: node liveness, orchestration and scheduling.

Owns: running the pure policies of shoal.node.orchestrator and shoal.node.scheduler on
the leader and proposing their decisions as one term-fenced ``leader`` batch per pass. Node
liveness comes from gossip (this node's SWIM member list) with heartbeats as a fallback
for nodes gossip has not heard of yet.
Started when this node gains leadership (with quorum), stopped when it loses it. Reads
and writes only through the state source (shoal.node.source.StateSource: the RaftStore in
the agent, the in-memory store in unit tests). Heartbeats arrive from the API (every agent
sends them to every manager, so a new leader already knows who is alive).

Must not touch: the runtime, the CLI, anything outside the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from shoal.node.orchestrator import (
    Op,
    OrchestratorConfig,
    node_liveness,
    reconcile_services,
)
from shoal.node.scheduler import schedule
from shoal.node.source import StateSource
from shoal.raft.errors import StoreError
from shoal.raft.models import Task, task_from_dict
from shoal.raft.state import ClusterState, Snapshot

log = logging.getLogger("shoal.leader")


def new_task_id() -> str:
    return secrets.token_hex(10)


def plan_pass(
    snap: Snapshot,
    last_seen: dict[str, float],
    mono_now: float,
    wall_now: float,
    config: OrchestratorConfig,
    liveness: bool = True,
    gossip: dict[str, str] | None = None,
) -> tuple[list[Op], float | None]:
    """One leader pass as a pure function: liveness, then orchestration, then placement.

    The orchestration ops are applied to a scratch copy of the state so tasks created
    in this pass are placed in the same batch.
    """
    ops: list[Op] = []
    if liveness:
        ops += node_liveness(snap, last_seen, mono_now, config.node_down_timeout, gossip)
    scratch = ClusterState(nodes=dict(snap.nodes), services=dict(snap.services),
                           tasks=dict(snap.tasks))
    if ops:
        scratch.apply({"op": "leader", "term": 0, "now": wall_now, "ops": ops})
    orch_ops, wake_at = reconcile_services(scratch.snapshot(), wall_now, new_task_id, config)
    ops += orch_ops
    if orch_ops:
        scratch.apply({"op": "leader", "term": 0, "now": wall_now, "ops": orch_ops})
    projected = scratch.snapshot()
    pending: list[Task] = [t for t in projected.tasks.values() if not t.node_id and t.alive]
    plan = schedule(projected, pending)
    ops += [("assign", tid, nid) for tid, nid in plan.assignments]
    for tid, reason in plan.unschedulable:
        t = projected.tasks[tid]
        if t.sched_message != reason:
            ops.append(("unschedulable", tid, reason))
    return ops, wake_at


class LeaderLoop:
    """Runs while this node leads. ``run()`` returns when leadership is lost."""

    def __init__(self, store: StateSource, heartbeats: dict[str, float],
                 config: OrchestratorConfig, wakeup: asyncio.Event,
                 gossip: Callable[[], dict[str, str]] | None = None) -> None:
        self.store = store
        self.gossip = gossip  # node id → gossip state, from this node's member list
        self.heartbeats = heartbeats  # node id → time.monotonic() of last heartbeat
        self.config = config
        self.wakeup = wakeup
        self.passes = 0

    async def run(self) -> None:
        started = time.monotonic()
        term = self.store.term()
        log.info("leading (term %d): orchestrator and scheduler started", term)
        # give every agent a chance to reach us before judging liveness
        for node_id in self.store.snapshot().nodes:
            self.heartbeats.setdefault(node_id, started)
        # announce the new term at once (an empty fenced batch): fences older leaders now,
        # and the event stream shows the leader change even when there is nothing to do
        with contextlib.suppress(StoreError):
            await self.store.propose({"op": "leader", "term": term, "now": time.time(),
                                      "ops": [], "by": self.store.self_addr})
        while self.store.is_leader() and self.store.term() == term:
            self.wakeup.clear()
            timeout = self.config.interval
            try:
                wake_at = await self._pass(term, time.monotonic() - started)
                if wake_at is not None:
                    timeout = max(0.05, min(timeout, wake_at - time.time()))
            except StoreError as exc:
                log.warning("leader pass failed: %s", exc)
                if getattr(exc, "code", "") == "stale_term":
                    break
            except Exception:
                log.exception("leader pass crashed; retrying")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):  # (wait_for can swallow a cancel)
                    await self.wakeup.wait()
        log.info("no longer leading (term %d): orchestrator and scheduler stopped", term)

    async def one_pass(self, led_for: float = 0.0) -> float | None:
        """One pass now, in the current term (liveness is judged once ``led_for`` reaches
        the leadership grace); when to wake for the next one (wall clock), if sooner."""
        return await self._pass(self.store.term(), led_for)

    async def _pass(self, term: int, led_for: float) -> float | None:
        snap = self.store.snapshot()
        liveness = led_for >= self.config.leadership_grace
        ops, wake_at = plan_pass(snap, self.heartbeats, time.monotonic(), time.time(),
                                 self.config, liveness=liveness,
                                 gossip=self.gossip() if self.gossip else None)
        self.passes += 1
        if ops:
            cmd: dict[str, Any] = {"op": "leader", "term": term, "now": time.time(), "ops": ops,
                                   "by": self.store.self_addr}
            await self.store.propose(cmd)
            log.debug("leader pass proposed %d ops", len(ops))
        return wake_at


__all__ = ["LeaderLoop", "new_task_id", "plan_pass", "task_from_dict"]
