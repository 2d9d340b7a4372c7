"""The orchestrator: decides *how many* tasks each service has. Pure functions.

Owns: the replicated-service policy — one live task per slot 1..replicas, replacing
tasks that failed (after a restart delay), whose node went down, was removed or drained,
or stopped satisfying the task's placement constraints, shutting down extra slots on
scale-down, deleting tasks of removed services once they have stopped, and trimming
task history. Also the node-liveness policy (heartbeats → READY/DOWN). Must not touch:
the store or the network; ``shoal.node.leader`` runs these functions on the leader and
proposes what they return as fenced batches.

Ops are the tuples understood by ClusterState's ``leader`` command:
("create", task_dict) ("desired", task_id, state) ("orphan", task_id, reason)
("delete", task_id) ("assign", task_id, node_id) ("unschedulable", task_id, reason)
("node_state", node_id, state, message) ("update_status", service_id, state, message).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from msgspec import structs

from shoal.node.scheduler import unsatisfied
from shoal.raft.models import (
    Health,
    Node,
    NodeAvailability,
    NodeState,
    Service,
    Task,
    TaskState,
    TaskStatus,
    to_dict,
)
from shoal.raft.spec import Placement, RestartPolicy, TaskSpec
from shoal.raft.state import Snapshot

Op = tuple[Any, ...]


@dataclass
class OrchestratorConfig:
    """Policy knobs of the leader's control loops."""

    # Ended tasks kept per slot for `service ps` history; older ones are deleted.
    task_history: int = 3
    # A node whose agent has not sent a heartbeat for this long is marked DOWN and its
    # tasks are replaced elsewhere, seconds. Lower = faster healing, more false alarms
    # on a stalled machine. Gossip will take over detection.
    node_down_timeout: float = 4.0
    # After gaining leadership, wait this long for heartbeats before marking anyone down.
    leadership_grace: float = 3.0
    # How often the leader re-runs the loops when nothing changes, seconds.
    interval: float = 0.5

    def validate(self) -> None:
        if self.task_history < 0:
            raise ValueError("task_history must be >= 0")
        if self.node_down_timeout <= 0 or self.interval <= 0:
            raise ValueError("node_down_timeout and interval must be > 0")


def node_liveness(
    snapshot: Snapshot, last_seen: dict[str, float], now: float, timeout: float,
    gossip: dict[str, str] | None = None, restarts: Mapping[str, float] | None = None,
) -> list[Op]:
    """READY/DOWN transitions for every node.

    Gossip decides for the nodes it knows: "dead" or "left" → DOWN, "alive" or "suspect"
    → READY (a suspicion is not a death: SWIM/Lifeguard confirm it first, so one missed
    ack never takes a node down). Nodes gossip has not heard of yet fall back to heartbeat
    age (``now`` and ``last_seen`` monotonic).

    ``restarts``: node id → deadline (monotonic, like ``now``) of a planned restart the node
    announced before its agent stopped (upgrade, ``systemctl restart``). Until then a node
    gossip sees dead or left keeps its state — its tasks keep running without their agent —
    and the new agent is expected back; past the deadline it goes DOWN like a crash. A
    crash announces nothing, so it is still detected as fast as gossip can.
    """
    ops: list[Op] = []
    for node in sorted(snapshot.nodes.values(), key=lambda n: n.id):
        g = (gossip or {}).get(node.id)
        back_by = (restarts or {}).get(node.id)
        if g in ("alive", "suspect"):
            alive, reason = True, ""
        elif g in ("dead", "left") and back_by is not None:
            if now < back_by:
                continue  # a planned restart in progress: neither up nor down yet
            alive, reason = False, "gossip: the agent announced a restart but did not " \
                "come back within the restart grace period"
        elif g in ("dead", "left"):
            alive, reason = False, "gossip: node left the cluster" if g == "left" else \
                "gossip: node failed (no answer to direct and indirect probes)"
        else:
            seen = last_seen.get(node.id)
            alive = seen is not None and now - seen <= timeout
            age = "never" if seen is None else f"{now - seen:.1f}s ago"
            reason = f"heartbeat failure (last heard {age})"
        if alive and node.state is not NodeState.READY:
            ops.append(("node_state", node.id, NodeState.READY.value, ""))
        elif not alive and node.state is NodeState.READY:
            ops.append(("node_state", node.id, NodeState.DOWN.value, reason))
    return ops


def reconcile_services(
    snapshot: Snapshot,
    now: float,
    new_id: Callable[[], str],
    config: OrchestratorConfig,
    only: Collection[str] | None = None,
    settled_out: set[str] | None = None,
) -> tuple[list[Op], float | None]:
    """Ops that move every service towards its spec, and when to look again.

    Returns ``(ops, wake_at)``; ``wake_at`` (wall-clock seconds) is the earliest time a
    waiting decision (a restart delay) becomes due, or None.

    ``only``: reconcile just these service ids; ``snapshot.tasks`` then needs to hold only
    (but all) the tasks of these services, its nodes and services stay whole. Every rule is
    per task (with its node and service) or per service, so this gives the ops the whole
    run gives for those services (the leader's PassIndex uses it to skip settled services).
    ``settled_out`` collects the ids of the services found ``settled``.
    """
    ops: list[Op] = []
    wake_at: float | None = None
    nodes, services = snapshot.nodes, snapshot.services
    down_nodes = {n.id for n in nodes.values() if n.state is NodeState.DOWN}
    drained = {n.id for n in nodes.values() if n.availability is NodeAvailability.DRAIN}

    # One walk over the task table (the rules below are per task; their ops are emitted in
    # the order of the rules, each in task order):
    by_service: dict[str, list[Task]] = defaultdict(list)
    orphans: list[Op] = []
    drains: list[Op] = []
    misplaced: list[Op] = []
    unplaced: list[Op] = []
    orphaned: set[str] = set()
    for t in snapshot.tasks.values():
        by_service[t.service_id].append(t)
        nid = t.node_id
        if not nid:
            # tasks told to stop before they were ever placed (an update or a scale-down
            # while they waited for a node a constraint or a reservation allows): nothing
            # runs and no agent will ever report them, so forget them (swarmkit's task
            # reaper does the same)
            if t.desired_state >= TaskState.SHUTDOWN and t.service_id in services:
                unplaced.append(("delete", t.id))
            continue
        node = nodes.get(nid)
        if node is None or nid in down_nodes:
            # tasks on nodes that are down or gone: orphan them so their slots get replaced
            if not t.status.state.terminal:
                reason = "node down" if nid in down_nodes else "node removed"
                orphans.append(("orphan", t.id, f"{reason}: task replaced elsewhere"))
                orphaned.add(t.id)
            continue
        if not t.alive:
            continue
        if nid in drained:
            # tasks on drained nodes: shut them down (they stop cleanly) so their slots move
            drains.append(("desired", t.id, int(TaskState.SHUTDOWN)))
            orphaned.add(t.id)
            continue
        # tasks on nodes that no longer satisfy their placement constraints (a label
        # removed, a role changed): shut them down so their slots move to a node that does,
        # or wait pending (Swarm's constraint enforcer). Only when the node fails both the
        # task's own constraints and the service's current ones: a task the current spec
        # still allows stays, and one only the current spec forbids is the rolling update's
        # to replace.
        svc = services.get(t.service_id)
        if svc is not None and unsatisfied(node, t.spec.placement.constraints) is not None \
                and unsatisfied(node, svc.spec.task.placement.constraints) is not None:
            misplaced.append(("desired", t.id, int(TaskState.SHUTDOWN)))
            orphaned.add(t.id)
    ops += orphans + drains + misplaced + unplaced

    def alive(t: Task) -> bool:
        return t.alive and t.id not in orphaned

    # tasks whose service is gone (desired REMOVE): delete once they stopped or cannot stop
    for sid, tasks in by_service.items():
        if sid in snapshot.services:
            continue
        for t in tasks:
            gone = not t.node_id or t.node_id in down_nodes or t.node_id not in snapshot.nodes
            if t.status.state.terminal or t.id in orphaned or gone:
                ops.append(("delete", t.id))
            elif t.desired_state < TaskState.REMOVE:
                ops.append(("desired", t.id, int(TaskState.REMOVE)))

    for svc in sorted(snapshot.services.values(), key=lambda s: s.spec.name):
        if only is not None and svc.id not in only:
            continue
        tasks = by_service.get(svc.id, [])
        if settled(svc, tasks, orphaned):
            if settled_out is not None:
                settled_out.add(svc.id)
            continue  # (what _reconcile_service finds for it: nothing to do, nothing to wait)
        svc_ops, svc_wake = _reconcile_service(svc, tasks, alive, now, new_id, config,
                                               snapshot.nodes)
        ops.extend(svc_ops)
        if svc_wake is not None and (wake_at is None or svc_wake < wake_at):
            wake_at = svc_wake
    return ops, wake_at


def settled(svc: Service, tasks: list[Task], orphaned: set[str]) -> bool:
    """The service is where its spec wants it, so ``_reconcile_service`` has nothing to do:
    no rollout in progress, exactly one live task per slot 1..replicas, each of the
    current template, and no ended task kept as history. A quick check, so that a leader
    pass over a quiet cluster costs one look at each task instead of the whole policy
    (tests/test_scheduler_scale.py checks the verdict against ``_reconcile_service``)."""
    if svc.update_status.state in ("updating", "rollback_started"):
        return False
    replicas = svc.spec.replicas
    if len(tasks) != replicas:
        return False
    spec = svc.spec.task
    slots = set()
    for t in tasks:
        if not (t.spec is spec or t.spec == spec) or not t.alive or t.id in orphaned or \
                not 1 <= t.slot <= replicas:
            return False
        slots.add(t.slot)
    return len(slots) == replicas


def _reconcile_service(
    svc: Service,
    tasks: list[Task],
    alive: Callable[[Task], bool],
    now: float,
    new_id: Callable[[], str],
    config: OrchestratorConfig,
    nodes: Mapping[str, Node],
) -> tuple[list[Op], float | None]:
    ops: list[Op] = []
    wake_at: float | None = None
    slots: dict[int, list[Task]] = defaultdict(list)
    for t in tasks:
        slots[t.slot].append(t)
    replicas = svc.spec.replicas
    created: dict[str, Any] | None = None  # the first task this pass creates, as plain values
    ops += rolling_update(svc, tasks, alive, now, nodes)

    for slot in range(1, max(replicas, max(slots, default=0)) + 1):
        slot_tasks = sorted(slots.get(slot, []), key=lambda t: (t.created_at, t.id))
        live = [t for t in slot_tasks if alive(t)]
        if slot > replicas:
            for t in live:
                ops.append(("desired", t.id, int(TaskState.SHUTDOWN)))
            # an emptied slot keeps no history
            for t in slot_tasks:
                if t.status.state.terminal and t.desired_state >= TaskState.SHUTDOWN:
                    ops.append(("delete", t.id))
            continue
        if len(live) > 1:
            # keep the most advanced (running beats pending), then the newest
            keep = max(live, key=lambda t: (t.status.state, t.created_at, t.id))
            for t in live:
                if t is not keep:
                    ops.append(("desired", t.id, int(TaskState.SHUTDOWN)))
        elif not live:
            ended = [t for t in slot_tasks if t.status.state.terminal]
            restart, due = restart_decision(svc.spec.task.restart, ended, now)
            if not restart:
                pass
            elif due > now:
                wake_at = due if wake_at is None else min(wake_at, due)
            elif created is None:
                task = Task(
                    id=new_id(), service_id=svc.id, service_name=svc.spec.name, slot=slot,
                    spec=svc.spec.task, service_version=svc.version,
                    desired_state=TaskState.RUNNING,
                    status=TaskStatus(state=TaskState.NEW, timestamp=now, message="created"),
                    created_at=now, updated_at=now,
                )
                created = to_dict(task)
                ops.append(("create", created))
            else:
                # the tasks a pass creates for a service differ only by id and slot: the
                # first one's plain form is converted once (a 10,000-task scale converts
                # one, not 10,000); the shared parts are only read (packed, or applied)
                ops.append(("create", {**created, "id": new_id(), "slot": slot}))
        # trim history: dead tasks beyond the newest `task_history` (but keep enough to
        # count restart attempts and to remember that a slot is not to be restarted)
        history = max(config.task_history, svc.spec.task.restart.max_attempts + 1, 1)
        dead = [t for t in slot_tasks if not alive(t) and t.status.state.terminal]
        dead.sort(key=lambda t: (t.status.timestamp, t.id), reverse=True)
        for t in dead[history:]:
            ops.append(("delete", t.id))
    return ops, wake_at


def outdated(t: Task, spec: TaskSpec, node: Node | None = None) -> bool:
    """The task runs another task template than the service's. Only the template counts:
    a change of replicas, update/rollback settings, ports or labels replaces no task
    (swarmkit copies only TaskSpec into tasks, too); nor does a change of the restart policy,
    which only the leader reads (for the task's successors).

    When only the placement constraints differ, a task whose ``node`` satisfies the new
    ones is kept (swarmkit's IsTaskDirtyPlacementConstraintsOnly): `--constraint-add` moves
    only the tasks that must move, `--constraint-rm` moves none."""
    if t.spec is spec or t.spec == spec:
        return False  # (the common case, without building a copy)
    if structs.replace(t.spec, restart=spec.restart) == spec:
        return False  # the restart policy is the leader's business: applies without redeploy
    nowhere = Placement()
    mine = structs.replace(t.spec, restart=spec.restart, placement=nowhere)
    if mine == structs.replace(spec, placement=nowhere):
        return node is None or unsatisfied(node, spec.placement.constraints) is not None
    return True


def rolling_update(svc: Service, tasks: list[Task], alive: Callable[[Task], bool],
                   now: float, nodes: Mapping[str, Node] | None = None) -> list[Op]:
    """Stop-first rolling update: shut down up to ``parallelism`` outdated tasks at a time;
    their slots are then refilled with the current template by the slot loop. The next batch
    starts once every updated slot runs (and is healthy) and ``delay`` has passed since. The
    rollout follows the service's ``update`` config, or its ``rollback`` config while rolling back.

    A task with a health check counts as up only once healthy; a replacement that fails
    (exits, is refused, never runs, turns unhealthy) pauses the rollout, as Swarm's
    default failure action does: no further task is replaced until the next `service update`
    (or `service rollback`); ``update_status`` says which task failed and why. When every
    task runs the current template, the status becomes ``completed``.
    ``nodes`` (by id) lets a constraint-only change keep tasks on nodes that satisfy it."""
    spec, status = svc.spec, svc.update_status
    cfg = spec.rollback if status.rollback else spec.update
    rolling = status.state in ("updating", "rollback_started")

    def old_spec(t: Task) -> bool:
        return outdated(t, spec.task, (nodes or {}).get(t.node_id))

    live = [t for t in tasks if alive(t) and t.slot <= spec.replicas]
    old = sorted((t for t in live if old_spec(t)), key=lambda t: (t.slot, t.id))
    fresh = [t for t in live if not old_spec(t)]
    stopping = [t for t in tasks if old_spec(t) and not alive(t) and t.node_id
                and not t.status.state.terminal and t.slot <= spec.replicas]
    if not old:
        if rolling and not stopping and len(fresh) >= spec.replicas and \
                all(up(t) for t in fresh):
            done = "rollback_completed" if status.rollback else "completed"
            return [("update_status", svc.id, done,
                     "rollback completed" if status.rollback else "update completed")]
        return []
    if status.paused:
        return []
    failed = sorted((t for t in tasks if not old_spec(t)
                     and (self_ended(t) or t.status.health is Health.UNHEALTHY)
                     and t.created_at >= status.started_at),
                    key=lambda t: (t.status.timestamp, t.id))
    if rolling and failed:
        t = failed[0]
        why = t.status.err or ("unhealthy" if t.status.health is Health.UNHEALTHY else "") \
            or t.status.message or t.status.state.lower()
        state = "rollback_paused" if status.rollback else "paused"
        what = "rollback" if status.rollback else "update"
        return [("update_status", svc.id, state,
                 f"{what} paused due to failure or early termination of task {t.name} "
                 f"({t.id[:12]}): {why}")]
    in_flight = [t for t in fresh if not up(t)]
    # a slot whose old task is stopping and whose new task is not yet created counts too
    # (a task that was never placed has nothing to stop)
    busy = len(in_flight) + len(stopping)
    if fresh and busy == 0 and cfg.delay:
        last_up = max(up_since(t) for t in fresh)
        if now - last_up < cfg.delay:
            return []
    room = (cfg.parallelism or len(old)) - busy
    return [("desired", t.id, int(TaskState.SHUTDOWN)) for t in old[:max(room, 0)]]


def up(t: Task) -> bool:
    """Running, and healthy if it has a health check: what an updated task must reach before
    the rollout moves on."""
    return t.status.up


def up_since(t: Task) -> float:
    """When ``t`` came up: it started, or — with a health check — its current run of passing
    probes began (from its health log; the update delay counts from there)."""
    since = t.status.timestamp
    if t.status.health is Health.HEALTHY:
        for r in reversed(t.status.health_log):
            if r.exit_code != 0:
                break
            since = max(t.status.timestamp, r.end)
    return since


def self_ended(t: Task) -> bool:
    """Ended on its own (exit, failure, refusal), not stopped by the orchestrator or lost."""
    return t.desired_state <= TaskState.RUNNING and t.status.state in (
        TaskState.COMPLETE, TaskState.FAILED, TaskState.REJECTED)


def restart_decision(policy: RestartPolicy, ended: list[Task], now: float
                     ) -> tuple[bool, float]:
    """Should an empty slot get a new task, and from when? ``(restart, due)``.

    A slot emptied by the orchestrator (scale, drain) or by a lost node is refilled at
    once. A task that ended on its own is replaced according to the restart policy:
    ``none`` never, ``on-failure`` only after a failure, ``any`` always; after
    ``delay``; at most ``max_attempts`` times within ``window``.
    """
    last = max(ended, key=lambda t: (t.status.timestamp, t.created_at), default=None)
    if last is None or not self_ended(last):
        return True, now
    cond = policy.condition
    if cond == "none" or (cond == "on-failure" and last.status.state is TaskState.COMPLETE):
        return False, now
    if policy.max_attempts:
        window = policy.window
        runs = [t for t in ended if self_ended(t)
                and (not window or now - t.status.timestamp <= window)]
        if len(runs) - 1 >= policy.max_attempts:
            return False, now
    return True, last.status.timestamp + policy.delay
