"""Leader-only control loop: node liveness, orchestration and scheduling.

Owns: running the pure policies of shoal.node.orchestrator and shoal.node.scheduler on
the leader and proposing their decisions as term-fenced ``leader`` batches (one per pass,
split by ``batches`` when a pass changes more than one Raft entry should carry), and the
PassIndex that lets a pass look only at what changed since the previous one; raising the
cluster's data schema (``cluster_schema``) once every node announces it can run it, as decided
by shoal.node.upgrade.schema_to_raise over the gossip metadata. Node liveness comes from
gossip (this node's SWIM member list, and the planned restarts members announced on it) with
heartbeats as a fallback for nodes gossip has not heard of yet.
Started when this node gains leadership (with quorum), stopped when it loses it. Reads
and writes only through the state source (shoal.node.source.StateSource: the RaftStore in
the agent, the in-memory store in unit tests). Heartbeats arrive from the API (every agent
sends them to the leader, to every manager only when the leader does not answer: a new leader
counts every node as heard when it takes office, ``hear_from_all``).

Must not touch: the runtime, the CLI, anything outside the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgpack

from shoal.node import cron
from shoal.node.autoscale import Autoscaler, UsageFn
from shoal.node.orchestrator import (
    OrchestratorConfig,
    heartbeat_stretch,
    node_liveness,
    reconcile_services,
)
from shoal.node.rollout import Op
from shoal.node.scheduler import Load, avoided_nodes, schedule
from shoal.node.source import StateSource
from shoal.node.upgrade import schema_to_raise
from shoal.raft.errors import CommandRejected, StoreError
from shoal.raft.models import Node, NodeRole, Service, Task, spawn_ops, task_from_dict
from shoal.raft.schema import GATED_OPS
from shoal.raft.state import MAX_BATCH_BYTES, MAX_BATCH_OPS, ClusterState, Snapshot

if TYPE_CHECKING:
    from shoal.raft.store import RaftConfig

log = logging.getLogger("shoal.leader")
# Gossip metadata key: [append-entries period, minimum election timeout] of the node's Raft
# configuration, seconds (what the managers' timings must agree on: _check_raft_timing).
RAFT_TIMING_META = "raft"
# A pass longer than this, seconds, is logged with where its time went (at most one line per
# SLOW_PASS_EVERY s, naming the slowest pass since the last line): what a node's failure
# waits for between gossip's verdict and the replacements' commit.
SLOW_PASS = 0.5
SLOW_PASS_EVERY = 5.0


def new_task_id() -> str:
    return secrets.token_hex(10)


def _scratch(snap: Snapshot) -> ClusterState:
    """A copy of ``snap`` to apply the pass's own ops to, with the cluster's record (its
    schema decides rules: a scratch at schema 1 had the orchestrator refill a scale-down's
    slot holes and stop the tasks above replicas whenever a node changed state)."""
    return ClusterState(cluster=dataclasses.replace(snap.cluster), nodes=dict(snap.nodes),
                        services=dict(snap.services), tasks=dict(snap.tasks),
                        volumes=snap.volumes)  # (read-only here)


def _apply(scratch: ClusterState, ops: list[Op], now: float) -> None:
    """Apply ``ops`` to the scratch state as the replicas will (in batches the state machine
    accepts: one batch of more than MAX_BATCH_OPS would be refused as a whole)."""
    for start in range(0, len(ops), MAX_BATCH_OPS):
        scratch.apply({"op": "leader", "term": 0, "now": now,
                       "ops": ops[start:start + MAX_BATCH_OPS]})


class PassIndex:
    """What the leader's previous passes learnt, so a pass costs what changed, not the cluster.

    Kept by the LeaderLoop between passes (a cache: dropping it only costs one full pass).
    ``update`` compares the state a pass sees with the one the previous pass saw, by object
    identity (records are immutable and replaced on every change, so a dict lookup and an
    ``is`` per task find what changed), and keeps the tasks grouped by service. The services
    to reconcile are those that changed or were not ``settled`` last time; every service
    when a node changed (liveness, drain, labels) or on the first pass. A settled service
    whose tasks, spec and nodes did not change is settled still, and has no pending task.
    """

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.services: dict[str, Service] = {}
        self.tasks: dict[str, Task] = {}
        self.by_service: dict[str, dict[str, Task]] = {}
        self.quiet: set[str] = set()  # settled, every task placed, as last seen
        self.load = Load()  # what the live placed tasks hold per node, for the scheduler
        self.primed = False

    def update(self, snap: Snapshot) -> set[str] | None:
        """Take in ``snap``; the ids of the services to reconcile, or None for all."""
        dirty: set[str] = set()
        prev = self.tasks
        by_service = self.by_service
        load = self.load
        added = 0
        # (dict equality runs in C and takes identical records as equal without comparing
        # them: a quiet cluster's table is compared at C speed; a record replaced by an
        # equal one is no change either)
        for tid, t in () if snap.tasks == prev else snap.tasks.items():
            old = prev.get(tid)
            if old is not t:
                load.add(t)
                if old is None:
                    added += 1
                    by_service.setdefault(t.service_id, {})[tid] = t
                    dirty.add(t.service_id)
                    continue
                load.remove(old)
                if old.service_id != t.service_id:
                    by_service[old.service_id].pop(tid, None)
                    dirty.add(old.service_id)
                by_service.setdefault(t.service_id, {})[tid] = t
                dirty.add(t.service_id)
        if len(prev) + added != len(snap.tasks):  # some were deleted
            for tid in prev.keys() - snap.tasks.keys():
                load.remove(prev[tid])
                sid = prev[tid].service_id
                by_service[sid].pop(tid, None)
                dirty.add(sid)
        for sid in [sid for sid, tasks in by_service.items() if not tasks]:
            del by_service[sid]
        if added or dirty or len(prev) != len(snap.tasks):
            self.tasks = dict(snap.tasks)
        if snap.services != self.services:
            old_services, self.services = self.services, dict(snap.services)
            for sid in old_services.keys() | self.services.keys():
                if old_services.get(sid) is not self.services.get(sid):
                    dirty.add(sid)
        nodes_changed = snap.nodes != self.nodes
        if nodes_changed:
            self.nodes = dict(snap.nodes)
        if nodes_changed or not self.primed:
            self.primed = True
            self.quiet.clear()
            return None
        everything = self.services.keys() | by_service.keys()
        return (everything - self.quiet) | dirty

    def tasks_of(self, sids: set[str]) -> dict[str, Task]:
        return {tid: t for sid in sids for tid, t in self.by_service.get(sid, {}).items()}

    def settle(self, looked_at: set[str] | None, settled: set[str]) -> None:
        """After reconciling ``looked_at`` (None: all): remember which are quiet now."""
        for sid in (self.services.keys() | self.by_service.keys()) if looked_at is None \
                else looked_at:
            tasks = self.by_service.get(sid, {})
            if sid in settled and all(t.node_id for t in tasks.values()):
                self.quiet.add(sid)
            else:
                self.quiet.discard(sid)


def plan_pass(
    snap: Snapshot,
    last_seen: dict[str, float],
    mono_now: float,
    wall_now: float,
    config: OrchestratorConfig,
    liveness: bool = True,
    gossip: dict[str, str] | None = None,
    restarts: Mapping[str, float] | None = None,
    index: PassIndex | None = None,
    new_id: Callable[[], str] = new_task_id,
) -> tuple[list[Op], float | None]:
    """One leader pass as a pure function: liveness and scheduled jobs' runs (shoal.node.cron),
    then orchestration, then placement.

    The orchestration ops are applied to a scratch copy of the state so tasks created
    in this pass are placed in the same batch. With an ``index`` (kept from the previous
    passes), only the services that changed or were not settled are reconciled and only
    their tasks are candidates for placement: the same ops (tests/test_scheduler_scale.py
    compares the two), at the cost of the change.
    """
    ops: list[Op] = []
    if liveness or gossip:  # (within the leadership grace: gossip's verdicts alone)
        ops += node_liveness(snap, last_seen, mono_now, config.node_down_timeout, gossip,
                             restarts, gossip_only=not liveness)
    runs, runs_wake = cron.plan(snap, wall_now)  # scheduled jobs' runs due now (and progress)
    ops += runs
    scratch: ClusterState | None = None  # made only when ops must be applied (copies)
    view = snap
    if ops:
        scratch = _scratch(snap)
        _apply(scratch, ops, wall_now)
        view = scratch.snapshot()
    active = index.update(view) if index is not None else None
    settled: set[str] = set()
    if active is None:
        orch_ops, wake_at = reconcile_services(view, wall_now, new_id, config,
                                               settled_out=settled)
    else:
        assert index is not None
        part = Snapshot(index=view.index, cluster=view.cluster, nodes=view.nodes,
                        services=view.services, tasks=index.tasks_of(active))
        orch_ops, wake_at = reconcile_services(part, wall_now, new_id, config, only=active,
                                               settled_out=settled, load=index.load)
    if index is not None:
        index.settle(active, settled)
    ops += orch_ops
    projected = view
    if orch_ops:
        if scratch is None:
            scratch = _scratch(view)
        _apply(scratch, orch_ops, wall_now)
        projected = scratch.snapshot()
    if active is None:
        candidates: Iterable[Task] = projected.tasks.values()
    else:
        assert index is not None
        # only services looked at can have unplaced tasks (a quiet one has none), and the
        # tasks created now belong to them
        ids = [tid for sid in active for tid in index.by_service.get(sid, {})]
        ids += [op[1]["id"] for op in orch_ops if op[0] == "create"]
        candidates = (t for tid in ids if (t := projected.tasks.get(tid)) is not None)
    pending: list[Task] = [t for t in candidates if not t.node_id and t.alive]
    load = None
    if index is not None and pending:
        # the index's load is the view's: account for what the orchestration changed
        touched = list(dict.fromkeys(op[1] for op in orch_ops
                                     if op[0] in ("desired", "orphan", "delete")))
        # (global tasks are created on their node: they hold resources there already)
        touched += [op[1]["id"] for op in orch_ops if op[0] == "create" and op[1]["node_id"]]
        sids = {t.service_id for t in pending}
        sids.update(t.service_id for tid in touched if (t := view.tasks.get(tid)))
        load = index.load.working_copy(sids)
        for tid in touched:
            if (before := view.tasks.get(tid)) is not None:
                load.remove(before)
            if (after := projected.tasks.get(tid)) is not None:
                load.add(after)
    # (failed tasks are the view's — the index has them, or the view's own index — not the
    # projection's: a failure whose record this pass trims still counts)
    by_service = index.by_service if index is not None else None
    avoid = avoided_nodes(
        projected.services, {t.service_id for t in pending},
        view.tasks_of if by_service is None else
        (lambda sid: by_service.get(sid, {}).values()), wall_now)
    plan = schedule(projected, pending, load, avoid)
    ops += [("assign", tid, nid) for tid, nid in plan.assignments]
    for tid, reason in plan.unschedulable:
        t = projected.tasks[tid]
        if t.sched_message != reason:
            ops.append(("unschedulable", tid, reason))
    if runs_wake is not None and (wake_at is None or runs_wake < wake_at):
        wake_at = runs_wake
    return ops, wake_at


# msgpack overhead of the batch around its ops: {"op": "leader", "term", "now", "ops": [...]}
_BATCH_HEADER_BYTES = 64


def batches(ops: Sequence[Op], max_ops: int = MAX_BATCH_OPS,
            max_bytes: int = MAX_BATCH_BYTES) -> Iterator[list[Op]]:
    """``ops`` split, in order, into batches of at most ``max_ops`` ops and about
    ``max_bytes`` msgpack bytes (an op larger than that alone goes out alone). Order matters
    (a task's ``assign`` follows its ``create``): the batches are proposed one after another,
    and a pass cut short by a lost leadership leaves a consistent state the next leader's
    pass continues from (every op is level-triggered)."""
    batch: list[Op] = []
    size = _BATCH_HEADER_BYTES
    for op in ops:
        op_bytes = len(msgpack.packb(op, use_bin_type=True))
        if batch and (len(batch) >= max_ops or size + op_bytes > max_bytes):
            yield batch
            batch, size = [], _BATCH_HEADER_BYTES
        batch.append(op)
        size += op_bytes
    if batch:
        yield batch


class LeaderLoop:
    """Runs while this node leads. ``run()`` returns when leadership is lost."""

    def __init__(self, store: StateSource, heartbeats: dict[str, float],
                 config: OrchestratorConfig, wakeup: asyncio.Event,
                 gossip: Callable[[], dict[str, str]] | None = None,
                 gossip_meta: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None,
                 restarts: Callable[[], Mapping[str, float]] | None = None,
                 usage: UsageFn | None = None,
                 gossip_all: Callable[[], Awaitable[tuple[
                     dict[str, str], Mapping[str, Mapping[str, Any]],
                     Mapping[str, float]]]] | None = None,
                 heartbeat_interval: float = 1.0,
                 gossip_alive: set[str] | None = None,
                 raft: RaftConfig | None = None) -> None:
        self.store = store
        # this manager's Raft timing, checked against the other managers' (None: not checked)
        self.raft = raft
        self._timing_warned: frozenset[str] = frozenset()
        # ids of the nodes gossip saw alive at the last pass that had a gossip view: the
        # dispatcher gives them the longer heartbeat period (the agent passes its set)
        self.gossip_alive = gossip_alive if gossip_alive is not None else set()
        # the nodes' base heartbeat period (the agent's), stretched in big clusters
        # (OrchestratorConfig.max_heartbeats_per_second): node_down_timeout with it
        self.heartbeat_interval = heartbeat_interval
        # the three gossip reads below in one call (the agent's: one round trip to the gossip
        # thread per pass instead of three); when given, it replaces them
        self.gossip_all = gossip_all
        # the tasks' cgroup usage from their nodes (None: no autoscaling, as in unit tests)
        self.usage = usage
        self.autoscaler: Autoscaler | None = None
        self.gossip = gossip  # node id → gossip state, from this node's member list
        # node id → its announced gossip metadata (the schema gate); None: never raise
        self.gossip_meta = gossip_meta
        self._schema_refused: int | None = None  # a schema the state machine refused
        self.restarts = restarts  # node id → deadline of an announced planned restart
        self.heartbeats = heartbeats  # node id → time.monotonic() of last heartbeat
        self.config = config
        self.wakeup = wakeup
        self.passes = 0
        self.index = PassIndex()  # what earlier passes learnt (a cache: see PassIndex)
        # the slowest pass not logged yet: (seconds, its breakdown), and when one last was
        self._slowest: tuple[float, str] | None = None
        self._slow_logged = 0.0

    async def run(self) -> None:
        started = time.monotonic()
        term = self.store.term()
        self.index = PassIndex()
        self.autoscaler = Autoscaler(self.usage) if self.usage is not None else None
        log.info("leading (term %d): orchestrator and scheduler started", term)
        self.hear_from_all(started)
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

    def hear_from_all(self, started: float) -> None:
        """At the start of a leadership: every node counts as heard now unless heard since
        (it gets the leadership grace to reach this manager: nodes send their heartbeats to
        the leader, so a follower's table is old or empty — an entry from an earlier
        leadership of this manager must not count), and one whose record is younger than
        the join grace gets the join grace too: it may still be starting and not have
        reached this manager (a join storm changes leaders; without this, every node that
        joined just before the change went DOWN at once)."""
        now = time.time()
        for node in self.store.snapshot().nodes.values():
            recent = now - node.created_at < self.config.join_grace
            heard = started + (self.config.join_grace if recent else 0.0)
            self.heartbeats[node.id] = max(self.heartbeats.get(node.id, heard), heard)

    async def one_pass(self, led_for: float = 0.0) -> float | None:
        """One pass now, in the current term (heartbeats are judged once ``led_for``
        reaches the leadership grace, gossip's verdicts at once); when to wake for the next
        one (wall clock), if sooner."""
        return await self._pass(self.store.term(), led_for)

    async def _pass(self, term: int, led_for: float) -> float | None:
        started = time.monotonic()
        metas: Mapping[str, Mapping[str, Any]] | None = None
        view: dict[str, str] | None
        restarts: Mapping[str, float] | None
        if self.gossip_all is not None:  # (first: the snapshot below is then the newer)
            try:
                view, metas, restarts = await self.gossip_all()
            except TimeoutError:  # a wedged gossip thread: judge by heartbeats this pass
                log.warning("the gossip thread did not answer: this pass judges nodes by "
                            "their heartbeats alone")
                view, restarts = None, None
        else:
            view = self.gossip() if self.gossip else None
            restarts = self.restarts() if self.restarts else None
        if not view:  # (a running member list holds this node at least: gossip is off)
            view = None
        if view is not None:
            self.gossip_alive.clear()
            self.gossip_alive.update(
                nid for nid, state in view.items() if state in ("alive", "suspect"))
        viewed = time.monotonic()
        snap = self.store.snapshot()
        # a node that joined since: judged from when this leader first saw it plus the join
        # grace (as if heard from then), so it is not taken DOWN ("last heard never")
        # before its first heartbeat can arrive; a real heartbeat replaces this at once
        mono = time.monotonic()
        for node_id in snap.nodes.keys() - self.heartbeats.keys():
            self.heartbeats[node_id] = mono + self.config.join_grace
        liveness = led_for >= self.config.leadership_grace
        config = self.config
        limit = snap.cluster.task_history_limit  # (`swarm update --task-history-limit`)
        if limit is not None and limit != config.task_history:
            config = dataclasses.replace(config, task_history=limit)
        stretch = heartbeat_stretch(len(snap.nodes), self.heartbeat_interval,
                                    config.max_heartbeats_per_second)
        if stretch > 1.0:  # nodes beat less often in a big cluster: judged as patiently
            config = dataclasses.replace(
                config, node_down_timeout=config.node_down_timeout * stretch)
        if view is None and (self.gossip_all is not None or self.gossip is not None):
            # no gossip view this pass: every node is judged by its heartbeats, and the ones
            # gossip judged were given the longer period (by this leader or the one before)
            config = dataclasses.replace(config, node_down_timeout=(
                config.node_down_timeout + config.gossip_heartbeat_interval * 1.1))
        ops, wake_at = plan_pass(snap, self.heartbeats, time.monotonic(), time.time(),
                                 config, liveness=liveness, gossip=view,
                                 restarts=restarts, index=self.index)
        if self.autoscaler is not None:  # (shoal.node.autoscale: replica changes)
            ops += await self.autoscaler.plan(snap, time.monotonic())
        self.passes += 1
        planned = time.monotonic()
        if ops:
            now = time.time()
            entries = 0
            if snap.cluster.schema >= GATED_OPS["spawn"]:  # new tasks without their template
                ops = spawn_ops(ops, snap.services)
            for batch in batches(ops):
                cmd: dict[str, Any] = {"op": "leader", "term": term, "now": now, "ops": batch,
                                       "by": self.store.self_addr}
                await self.store.propose(cmd)
                entries += 1
            log.debug("leader pass proposed %d ops in %d entries", len(ops), entries)
        self._timed(started, viewed, planned, time.monotonic(), len(ops))
        await self._raise_schema(snap, metas)
        if metas is not None:
            self._check_raft_timing(snap, metas)
        return wake_at

    def _timed(self, started: float, viewed: float, planned: float, proposed: float,
               ops: int) -> None:
        """Log a slow pass (SLOW_PASS) with its parts: the gossip view (a round trip to the
        gossip thread), planning, and proposing (each batch waits for its commit)."""
        took = proposed - started
        if took < SLOW_PASS:
            return
        if self._slowest is None or took > self._slowest[0]:
            self._slowest = (took, f"gossip view {(viewed - started) * 1000:.0f} ms, plan "
                             f"{(planned - viewed) * 1000:.0f} ms, {ops} ops proposed and "
                             f"committed in {(proposed - planned) * 1000:.0f} ms")
        if proposed - self._slow_logged >= SLOW_PASS_EVERY:
            log.info("slow leader pass: %.0f ms (%s)", self._slowest[0] * 1000,
                     self._slowest[1])
            self._slowest, self._slow_logged = None, proposed

    def _check_raft_timing(self, snap: Snapshot,
                           metas: Mapping[str, Mapping[str, Any]]) -> None:
        """Warn (once per set of managers) when a manager's Raft timing does not fit this
        leader's: its election timeout not above 3 x this leader's append-entries period (it
        would call elections while this one leads), or the reverse. Different
        ``--raft-multiplier`` values do that; nothing else can fix it."""
        if self.raft is None:
            return
        mine = (self.raft.append_entries_period, self.raft.raft_min_timeout)
        off: dict[str, str] = {}
        for node in snap.nodes.values():
            timing = metas.get(node.id, {}).get(RAFT_TIMING_META)
            if node.role is not NodeRole.MANAGER or not isinstance(timing, list) or \
                    len(timing) != 2 or not all(isinstance(x, (int, float)) for x in timing):
                continue
            period, timeout = float(timing[0]), float(timing[1])
            if timeout <= 3 * mine[0] or mine[1] <= 3 * period:
                off[node.id] = (f"{node.hostname} (append-entries every {period:g} s, "
                                f"election timeout from {timeout:g} s)")
        if frozenset(off) != self._timing_warned:
            self._timing_warned = frozenset(off)
            if off:
                log.warning("Raft timing differs between managers: this leader sends "
                            "append-entries every %g s, election timeout from %g s; %s. "
                            "Give every manager the same --raft-multiplier, or elections "
                            "will keep interrupting writes", mine[0], mine[1],
                            "; ".join(off.values()))

    async def _raise_schema(self, snap: Snapshot,
                            metas: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Propose ``cluster_schema`` when every node announces the next schema (see
        shoal.node.upgrade). A refusal (a state machine that does not know the op, or a
        schema it will not take) is logged once and not retried in this term; a timeout is
        retried on the next pass."""
        if metas is None:
            if self.gossip_meta is None:
                return
            metas = self.gossip_meta()
        target = schema_to_raise(snap, metas)
        if target is None or target == self._schema_refused:
            return
        try:
            await self.store.propose({"op": "cluster_schema", "schema": target})
        except CommandRejected as exc:
            self._schema_refused = target
            log.warning("raising the cluster schema to %d was refused: %s", target, exc)
            return
        log.info("cluster schema raised to %d: every node announces it", target)


__all__ = ["RAFT_TIMING_META", "LeaderLoop", "PassIndex", "batches", "new_task_id", "plan_pass",
           "task_from_dict"]
