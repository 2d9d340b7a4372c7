"""Rolling updates and the task-level rules the orchestrator's slot loops share. Pure.

Owns: ``plan_rollout`` (one pass of a rolling update of a replicated or global service:
order, parallelism, delay, failure action, monitor, failure ratio — swarmkit's updater as a
pure function of the tasks) and what it is built from: whether a task runs an outdated
template (``outdated``), when a new task failed the rollout (``rollout_failed``,
``too_many_failures``, ``failure_response``), when a task is up (``up``, ``up_since``),
whether it ended on its own and when its slot is refilled (``self_ended``,
``restart_decision``), and making a task of the service's current template (``new_task``).
shoal.node.orchestrator (the service modes' slot and node loops) calls these and re-exports
them. Must not touch: the store, the network, clocks (``now`` is passed in).

Ops are the tuples of ClusterState's ``leader`` command (see shoal.node.orchestrator).
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
    Service,
    Task,
    TaskState,
    template_task,
    to_dict,
)
from shoal.raft.schema import GATED_OPS, SCHEMA
from shoal.raft.spec import Placement, RestartPolicy, RollbackConfig, TaskSpec, UpdateConfig

Op = tuple[Any, ...]


def new_task(svc: Service, slot: int, now: float, new_id: Callable[[], str],
             node_id: str = "", pending: str = "") -> Task:
    """A task of the service's current template and version (and job iteration); see
    shoal.raft.models.template_task for ``node_id`` and ``pending`` (global modes)."""
    return template_task(svc, new_id(), slot, now, node_id, pending,
                         svc.job_status.iteration if svc.spec.mode.job else 0)


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


@dataclass
class Rollout:
    """What a rolling update decides in one pass: its ops, when to look again (a delay or a
    monitor window ending; wall-clock seconds, None = nothing to wait for), and the slots
    where start-first runs a slot's old and new task side by side (global: the nodes; the slot
    or node loop must keep both)."""

    ops: list[Op]
    wake_at: float | None = None
    paired: frozenset[int | str] = frozenset()


def rolling_update(svc: Service, tasks: list[Task], alive: Callable[[Task], bool],
                   now: float, nodes: Mapping[str, Node] | None = None,
                   wanted: int | None = None) -> list[Op]:
    """The ops of ``plan_rollout`` (for callers that neither wait nor pair slots)."""
    return plan_rollout(svc, tasks, alive, now, nodes, wanted).ops


def plan_rollout(svc: Service, tasks: list[Task], alive: Callable[[Task], bool],
                 now: float, nodes: Mapping[str, Node] | None = None,
                 wanted: int | None = None,
                 new_id: Callable[[], str] | None = None,
                 room_on: Callable[[str], bool] | None = None,
                 schema: int = SCHEMA, slots: Collection[int] | None = None,
                 eligible: Collection[str] | None = None,
                 fit_alone: Callable[[Task], str | None] | None = None) -> Rollout:
    """One pass of a rolling update (swarmkit's updater, as a pure function of the tasks).

    The rollout follows the service's ``update`` config, or its ``rollback`` config while
    rolling back. At most ``parallelism`` slots are in flight at a time (as swarmkit's update
    workers: a slot is in flight until its new task is up — running, and healthy if it has
    a health check, ``up`` — and ``delay`` has passed since). ``order``:

    * stop-first: the slot's old task is shut down; the slot loop then refills the slot
      with the current template;
    * start-first: a task of the current template is created in the slot beside the old
      one, which is shut down once the new one is up (``paired``: the slots running both).
      Old tasks still stopping count as in flight, so at most replicas + parallelism tasks
      run (docs/reliability.md). Global: the new task is made on the old one's node (one
      extra task per node at most), unless ``room_on(node)`` says the node cannot hold both
      (its reserved resources), or the node is not among ``eligible`` (the new template's
      constraints refuse it): that node's old task stops first. When the new task would
      not fit the node even alone (``fit_alone(old)``: why), the old one keeps serving and
      the new one waits beside it, PENDING with the reason (Swarm's start-first).

    A new task (made since the rollout started) *fails* when it ends on its own or turns
    unhealthy before it came up, or within ``monitor`` after (``rollout_failed``). Once the
    failures exceed ``max_failure_ratio`` x the slots being updated (``too_many_failures``)
    ``failure_action`` applies: pause (``paused`` / ``rollback_paused``: nothing more is
    replaced until the next `service update`), continue, or rollback (the ``rollback`` op:
    back to the previous spec, ``rollback_started`` with the reason). When every task runs
    the current template, is up, and ``monitor`` has passed since the last came up, the
    status becomes ``completed`` (``rollback_completed``); with ``continue``, also once
    every slot was given the new template and ``monitor`` has passed, up or not (a crash
    loop does not keep it ``updating``). Swarm does the same.

    ``nodes`` (by id) lets a constraint-only change keep tasks on nodes that satisfy it.
    ``wanted``: the tasks the service should have (global: its eligible nodes, each node a
    "slot"; default: replicas, whose slots — ``slots``, default 1..replicas: the
    orchestrator's ``replica_slots`` — are the ones rolled).
    ``new_id``: ids for the tasks start-first creates (without it, the rollout is
    stop-first). ``schema``: the cluster's (its leader ops: ``rollout_start`` from 6)."""
    spec, status = svc.spec, svc.update_status
    per_node = wanted is not None
    want = spec.replicas if wanted is None else wanted
    kept = frozenset(range(1, want + 1) if slots is None else slots)

    def in_slot(t: Task) -> bool:
        """(a replicated task in one of the slots the service keeps)"""
        return t.slot in kept

    cfg: UpdateConfig | RollbackConfig = spec.rollback if status.rollback else spec.update
    rolling = status.state in ("updating", "rollback_started")
    start_first = cfg.order == "start-first" and new_id is not None

    def old_spec(t: Task) -> bool:
        return outdated(t, spec.task, (nodes or {}).get(t.node_id))

    def key(t: Task) -> str | int:
        return t.node_id if per_node else t.slot

    def paused(t: Task) -> bool:
        """Global: a paused node's task is left as it is, neither stopped nor replaced
        (Swarm: no task is added or updated there) — unless the node fails the current
        constraints: then it is stopped, as Swarm's global orchestrator checks constraints
        before pause; the node is not among ``wanted``."""
        node = (nodes or {}).get(t.node_id) if per_node else None
        return node is not None and node.availability is NodeAvailability.PAUSE and \
            unsatisfied(node, spec.task.placement.constraints) is None

    live = [t for t in tasks if alive(t) and (per_node or in_slot(t)) and not paused(t)]
    old = sorted((t for t in live if old_spec(t)),
                 key=lambda t: (t.node_id, t.id) if per_node else (t.slot, t.id))
    fresh = [t for t in live if not old_spec(t)]
    stopping = [t for t in tasks if old_spec(t) and not alive(t) and t.node_id
                and not t.status.state.terminal and (per_node or in_slot(t))
                and not paused(t)]
    since = status.started_at
    if rolling and since > now and schema >= GATED_OPS["rollout_start"]:
        # stamped by a manager whose clock runs ahead of ours: every task made from now on
        # would look older than the rollout (no failure seen); move the start to our time
        return Rollout([("rollout_start", svc.id, since)])
    new = [t for t in tasks if not old_spec(t) and t.created_at >= since] if rolling else []
    # start-first slots (global: nodes) running an old task and its replacement (kept side
    # by side, also while paused: the old one serves until the new one is up)
    by_slot: dict[int | str, list[Task]] = defaultdict(list)
    if start_first:
        for t in fresh:
            by_slot[key(t)].append(t)
    paired = {key(t) for t in old if by_slot.get(key(t))}
    # (checked before "no old task left": with stop-first and one replica, the failing new
    # task is the only one there is)
    if rolling:
        failed = sorted((t for t in new if rollout_failed(t, cfg.monitor)),
                        key=lambda t: (t.updated_at, t.id))
        touched = {key(t) for t in old} | {key(t) for t in stopping} | \
            {key(t) for t in new} | {key(t) for t in tasks if old_spec(t)
                                     and t.updated_at >= since}
        if failed and too_many_failures(len(failed), len(touched), cfg.max_failure_ratio):
            action = failure_response(cfg.failure_action, status.rollback,
                                      svc.previous_spec is not None)
            if action != "continue":
                return Rollout([_failure_op(svc, failed[-1], action)],
                               paired=frozenset(paired))
    if not old:
        if not rolling or stopping:
            return Rollout([])
        if len(fresh) < want or not all(up(t) for t in fresh):
            if cfg.failure_action != "continue":
                return Rollout([])
            # continue (as swarmkit): done once every slot was given the new template and
            # `monitor` has passed since the last was, up or not (a crash loop included)
            dispatched: dict[int | str, float] = {}
            for t in new:
                if per_node or in_slot(t):
                    dispatched[key(t)] = min(dispatched.get(key(t), t.created_at),
                                             t.created_at)
            if len(dispatched) < want:
                return Rollout([])
            last = max(dispatched.values())
            if now < last + cfg.monitor:
                return Rollout([], wake_at=last + cfg.monitor)
            state = "rollback_completed" if status.rollback else "completed"
            down = want - sum(1 for t in fresh if up(t))
            return Rollout([("update_status", svc.id, state,
                             f"{'rollback' if status.rollback else 'update'} completed "
                             f"({down} of {want} tasks not up: failure action continue)")])
        # the last tasks must stay up for the monitor window before the rollout is done
        last = max((t.up_at for t in new), default=0.0)
        if last and now < last + cfg.monitor:
            return Rollout([], wake_at=last + cfg.monitor)
        if status.rollback:
            manual = status.message in ("manually requested rollback", "rollback started", "")
            return Rollout([("update_status", svc.id, "rollback_completed",
                             "rollback completed" if manual else
                             f"rollback completed ({status.message})")])
        return Rollout([("update_status", svc.id, "completed", "update completed")])
    if status.paused:
        return Rollout([], paired=frozenset(paired))
    in_flight = [t for t in fresh if not up(t)]
    if paired and rolling:
        # the new task is up: stop the old one (the slot stays paired until it has stopped)
        ops: list[Op] = [("desired", t.id, int(TaskState.SHUTDOWN)) for t in old
                         if any(up(m) for m in by_slot.get(key(t), ()))]
        if ops:
            return Rollout(ops, paired=frozenset(paired))
    # a slot whose old task is stopping, or has stopped and whose new task is not yet
    # created, counts too (a task that was never placed has nothing to stop)
    # and, as each of swarmkit's `parallelism` update workers waits `delay` after its slot
    # is up before it takes the next, a task up for less than `delay` still holds its place
    cooling = [up_since(t) + cfg.delay for t in fresh
               if cfg.delay and up(t) and now < up_since(t) + cfg.delay]
    busy = len(in_flight) + len(stopping) + len(cooling) + len(
        _emptied(tasks, alive, old_spec, kept) if not per_node else ())
    room = (cfg.parallelism or len(old)) - busy
    if room <= 0:
        return Rollout([], wake_at=min(cooling, default=None), paired=frozenset(paired))
    if not start_first or not rolling:
        return Rollout([("desired", t.id, int(TaskState.SHUTDOWN)) for t in old[:room]])
    # start-first: a new task beside the old one, in slots without one yet
    ops = []
    wake_at: float | None = None
    created: dict[str, Any] | None = None
    for t in old:
        if room <= 0:
            break
        if key(t) in paired:
            continue
        ended = [x for x in new if key(x) == key(t) and x.status.state.terminal]
        restart, due = restart_decision(spec.task.restart, ended, now)
        if not restart:
            continue  # (the old task keeps serving the slot)
        if due > now:
            wake_at = due if wake_at is None else min(wake_at, due)
            continue
        room -= 1
        if per_node and eligible is not None and t.node_id not in eligible:
            ops.append(("desired", t.id, int(TaskState.SHUTDOWN)))  # no new task there
            continue
        waits = None
        if per_node and room_on is not None and not room_on(t.node_id):
            waits = fit_alone(t) if fit_alone is not None else None
            if waits is None:  # no room for both: the old one stops first
                ops.append(("desired", t.id, int(TaskState.SHUTDOWN)))
                continue
        paired.add(key(t))
        assert new_id is not None  # (start_first)
        where = {"node_id": t.node_id} if per_node else {}
        if waits is not None:  # (it could not run there even alone: it waits beside)
            ops.append(("create", to_dict(new_task(svc, t.slot, now, new_id, pending=waits,
                                                   **where))))
        elif created is None:
            created = to_dict(new_task(svc, t.slot, now, new_id, **where))
            ops.append(("create", created))
        else:
            ops.append(("create", {**created, "id": new_id(), "slot": t.slot, **where}))
    return Rollout(ops, wake_at=wake_at, paired=frozenset(paired))


def _emptied(tasks: list[Task], alive: Callable[[Task], bool],
             old_spec: Callable[[Task], bool], kept: Collection[int]) -> set[int]:
    """The ``kept`` slots without a live task whose newest task is of the old template: the
    rollout emptied them and their replacements are yet to be made."""
    newest: dict[int, Task] = {}
    live: set[int] = set()
    for t in tasks:
        if alive(t):
            live.add(t.slot)
        elif t.slot in kept:
            n = newest.get(t.slot)
            if n is None or (t.created_at, t.id) > (n.created_at, n.id):
                newest[t.slot] = t
    return {s for s, t in newest.items() if s not in live and old_spec(t)}


def rollout_failed(t: Task, monitor: float) -> bool:
    """Does this task of the rollout count as a failure? It ended on its own or turned
    unhealthy, before it ever came up or within ``monitor`` seconds after (``up_at``; the
    time of its last change, ``updated_at``, as when it failed)."""
    if not (self_ended(t) or t.status.health is Health.UNHEALTHY):
        return False
    return not t.up_at or t.updated_at - t.up_at <= monitor


def too_many_failures(failed: int, updating: int, max_ratio: float) -> bool:
    """Swarm's test: the failures exceed ``max_ratio`` x the tasks being updated (so with
    the default ratio 0, the first failure is too many)."""
    return failed > 0 and failed > max_ratio * max(updating, 1)


def failure_response(action: str, rolling_back: bool, has_previous: bool) -> str:
    """What a rollout with too many failures does: ``pause``, ``continue`` or ``rollback``.
    A rollback cannot roll back (its own action is pause or continue), and a service with
    no previous spec pauses instead."""
    if action == "rollback" and (rolling_back or not has_previous):
        return "pause"
    return action


def _failure_op(svc: Service, t: Task, action: str) -> Op:
    why = t.status.err or ("unhealthy" if t.status.health is Health.UNHEALTHY else "") \
        or t.status.message or t.status.state.lower()
    task = f"task {t.name} ({t.id[:12]}): {why}"
    if action == "rollback":
        return ("rollback", svc.id,
                f"update rolled back due to failure or early termination of {task}")
    rolling_back = svc.update_status.rollback
    return ("update_status", svc.id, "rollback_paused" if rolling_back else "paused",
            f"{'rollback' if rolling_back else 'update'} paused due to failure or early "
            f"termination of {task}")


def up(t: Task) -> bool:
    """Running, and healthy if it has a health check: what an updated task must reach before
    the rollout moves on."""
    return t.status.up


def up_since(t: Task) -> float:
    """When ``t`` came up: it started, or — with a health check — its current run of passing
    probes began (from its health log; the update delay counts from there), and not before
    the state saw it up (``up_at``: the health log the agent reports may lag behind)."""
    since = t.status.timestamp
    if t.status.health is Health.HEALTHY:
        for r in reversed(t.status.health_log):
            if r.exit_code != 0:
                break
            since = max(t.status.timestamp, r.end)
    return max(since, t.up_at)


def self_ended(t: Task) -> bool:
    """Ended on its own (exit, failure, refusal), not stopped by the orchestrator or lost (a
    job's completion, then wanted COMPLETE, included)."""
    return t.desired_state <= TaskState.COMPLETE and t.status.state in (
        TaskState.COMPLETE, TaskState.FAILED, TaskState.REJECTED)


def restart_decision(policy: RestartPolicy, ended: list[Task], now: float,
                     job: bool = False) -> tuple[bool, float]:
    """Should an empty slot get a new task, and from when? ``(restart, due)``.

    A slot emptied by the orchestrator (scale, drain) or by a lost node is refilled at
    once. A task that ended on its own is replaced according to the restart policy:
    ``none`` never, ``on-failure`` only after a failure, ``any`` always; after
    ``delay``; at most ``max_attempts`` times within ``window``. For a ``job``, ``any``
    means ``on-failure``: a completed job task is never run again.
    """
    last = max(ended, key=lambda t: (t.status.timestamp, t.created_at), default=None)
    if last is None or not self_ended(last):
        return True, now
    cond = policy.condition
    if cond == "none" or ((cond == "on-failure" or job)
                          and last.status.state is TaskState.COMPLETE):
        return False, now
    if policy.max_attempts:
        window = policy.window
        runs = [t for t in ended if self_ended(t)
                and (not window or now - t.status.timestamp <= window)]
        if len(runs) - 1 >= policy.max_attempts:
            return False, now
    return True, last.status.timestamp + policy.delay
