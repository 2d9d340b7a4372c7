"""The orchestrator: decides *how many* tasks each service has. Pure functions.

Owns: the service-mode policies (swarmkit's replicated, global and job orchestrators):

* replicated — one live task per slot (``replica_slots``: 1..replicas, unless a scale-down
  left holes), replacing tasks that failed (after a restart delay), whose node went down,
  was removed or drained, or stopped satisfying the task's placement constraints; a
  scale-down removes the slots on the nodes with the most of the service's tasks (Swarm's
  balance), a scale-up fills the lowest free slot numbers;
* global — one live task per eligible node (``eligible_nodes``: ready, active, satisfying
  the constraints), created already placed on its node (slot 0; ASSIGNED, or PENDING with
  the reason when the node lacks the reserved resources), following nodes joining, leaving,
  drained and relabelled; rolled out like a replicated service;
* replicated-job — slots 1..replicas each run until one task of the current job
  iteration (the service version: any update re-runs the job, as Swarm's JobIteration)
  exits 0 (COMPLETE, never restarted; its desired state then COMPLETE too, as Swarm's
  `service ps` shows it), at most ``max_concurrent`` tasks at a time; a failed
  task is retried per the restart policy (``any`` acts as ``on-failure``); tasks of an
  older iteration are shut down;
* global-job — the same per eligible node, nodes joining later included;
* scheduled jobs (``mode.schedule``) — the same per run: a run is a job iteration the
  leader starts when the schedule says (shoal.node.cron), not an update (``of_current_run``).

The rolling update of replicated and global services is shoal.node.rollout's
(``plan_rollout``: order, failure action, monitor, failure ratio, as swarmkit's updater),
called from the slot and node loops here. Also deleting tasks of removed
services once they have stopped, trimming task history (a
job's completions are kept: they are its progress), and the node-liveness policy
(heartbeats → READY/DOWN). Must not touch:
the store or the network; ``shoal.node.leader`` runs these functions on the leader and
proposes what they return as fenced batches.

Ops are the tuples understood by ClusterState's ``leader`` command:
("create", task_dict) ("desired", task_id, state) ("orphan", task_id, reason)
("delete", task_id) ("assign", task_id, node_id) ("unschedulable", task_id, reason)
("node_state", node_id, state, message) ("update_status", service_id, state, message)
("rollback", service_id, reason) (a rolling update's failure action: back to the previous
spec).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from shoal.node.rollout import Op, new_task, outdated, plan_rollout, restart_decision, up
from shoal.node.scheduler import Load, holds, rejection, reserves, unsatisfied
from shoal.raft.models import (
    Node,
    NodeAvailability,
    NodeState,
    Service,
    Task,
    TaskState,
    task_from_dict,
    to_dict,
)
from shoal.raft.schema import SCHEMA, SLOT_HOLES
from shoal.raft.state import Snapshot


@dataclass
class OrchestratorConfig:
    """Policy knobs of the leader's control loops."""

    # Ended tasks kept per slot for `service ps` history; older ones are deleted.
    task_history: int = 3
    # A node whose agent has not sent a heartbeat for this long is marked DOWN and its
    # tasks are replaced elsewhere, seconds. Lower = faster healing, more false alarms
    # on a stalled machine. Gossip will take over detection.
    node_down_timeout: float = 4.0
    # After gaining leadership, wait this long for heartbeats before judging a node by them
    # (gossip's verdicts apply at once: a node that died with the old leader is not kept
    # READY for this long).
    leadership_grace: float = 3.0
    # A node that joins while this leader leads gets this long beyond node_down_timeout
    # for its first heartbeat, seconds: between its record being committed and its first
    # heartbeat it fetches its keys and the whole state and starts its agent, which in a
    # join storm on a loaded machine took over 4 s (30 joining at once: 4 nodes flapped
    # DOWN → READY). Gossip still decides as soon as it knows the node; a node never heard
    # from at all is DOWN after node_down_timeout + join_grace. 0 = no extra grace.
    join_grace: float = 10.0
    # How often the leader re-runs the loops when nothing changes, seconds.
    interval: float = 0.5
    # The leader takes at most this many heartbeats a second, whatever the cluster's size
    # (Nomad's max_heartbeats_per_second): in a cluster of more than heartbeat_interval x
    # this many nodes every node beats less often (the period is in each heartbeat's answer)
    # and node_down_timeout grows in proportion for the nodes judged by heartbeats — gossip
    # judges every node it knows, so detection stays gossip's ~1.5 s. 0 = no cap.
    max_heartbeats_per_second: float = 50.0
    # A node the leader's gossip sees alive beats at most this often, seconds: gossip judges
    # it, so its beat is only the fallback should the leader's gossip stall (each beat is an
    # mTLS request into the leader: at 1 s, 100 nodes cost the leader ~3 % of a core).
    # Swarm's dispatcher uses 5 s for every node, Nomad at least 10 s. 0 = no longer period.
    gossip_heartbeat_interval: float = 10.0

    def validate(self) -> None:
        if self.task_history < 0:
            raise ValueError("task_history must be >= 0")
        if self.node_down_timeout <= 0 or self.interval <= 0:
            raise ValueError("node_down_timeout and interval must be > 0")
        if self.join_grace < 0:
            raise ValueError("join_grace must be >= 0")
        if self.max_heartbeats_per_second < 0:
            raise ValueError("max_heartbeats_per_second must be >= 0")
        if not 0 <= self.gossip_heartbeat_interval <= 60:
            raise ValueError("gossip_heartbeat_interval must be between 0 and 60 seconds")


# How long a task told to stop may hold its slot before its replacement starts anyway
# (swarmkit's defaultOldTaskTimeout): an agent that never reports the stop must not keep the
# slot empty for good.
OLD_TASK_TIMEOUT = 60.0


def heartbeat_stretch(nodes: int, interval: float, max_rate: float) -> float:
    """How many times ``interval`` each of ``nodes`` waits between heartbeats so that the
    leader receives at most ``max_rate`` a second (1 in a small cluster; 0 = no cap)."""
    if max_rate <= 0 or interval <= 0:
        return 1.0
    return max(1.0, nodes / (max_rate * interval))


def heartbeat_period(interval: float, nodes: int, config: OrchestratorConfig,
                     gossip_alive: bool) -> tuple[float, float]:
    """The period the leader gives a node in its heartbeat answer, and how much longer than
    a node beating at the cluster's common period (``interval`` stretched to the cap,
    :func:`heartbeat_stretch`) it may stay silent — credited to its last beat, so that the
    heartbeat fallback (a pass without gossip) does not take it down between two beats.
    A node the leader's gossip sees alive gets ``gossip_heartbeat_interval`` (its beat
    jittered ±10 %: the credit covers the late side)."""
    common = interval * heartbeat_stretch(nodes, interval, config.max_heartbeats_per_second)
    slow = config.gossip_heartbeat_interval
    if not gossip_alive or slow <= common:
        return common, 0.0
    return slow, slow * 1.1 - common


def node_liveness(
    snapshot: Snapshot, last_seen: dict[str, float], now: float, timeout: float,
    gossip: dict[str, str] | None = None, restarts: Mapping[str, float] | None = None,
    gossip_only: bool = False,
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

    ``gossip_only``: judge only the nodes gossip knows (a new leader within its leadership
    grace: the heartbeats of the others may not have reached it yet, gossip needs none).
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
        elif gossip_only:
            continue
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
    load: Load | None = None,
) -> tuple[list[Op], float | None]:
    """Ops that move every service towards its spec, and when to look again.

    Returns ``(ops, wake_at)``; ``wake_at`` (wall-clock seconds) is the earliest time a
    waiting decision (a restart delay) becomes due, or None.

    ``only``: reconcile just these service ids; ``snapshot.tasks`` then needs to hold only
    (but all) the tasks of these services, its nodes and services stay whole. Every rule is
    per task (with its node and service) or per service, so this gives the ops the whole
    run gives for those services (the leader's PassIndex uses it to skip settled services).
    ``settled_out`` collects the ids of the services found ``settled``. ``load``: what the
    whole state's live tasks hold per node (for the reservations of global tasks; counted
    from ``snapshot.tasks`` when needed and not given, so give it with ``only``); not
    modified.
    """
    ops: list[Op] = []
    wake_at: float | None = None
    nodes, services = snapshot.nodes, snapshot.services
    schema = snapshot.cluster.schema
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
    lost: set[str] = set()  # (orphaned because their node is down or gone)
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
                lost.add(t.id)
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

    def stopping_until(t: Task) -> float | None:
        """Until when ``t``, told to stop but still running on a live node, holds its slot:
        its replacement waits (as swarmkit's restart supervisor) so that the two never run
        at once — stop-first means it, and a port or volume may be the task's own — until
        it ended, its node went down, or OLD_TASK_TIMEOUT after the stop was ordered."""
        if alive(t) or not t.node_id or t.status.state.terminal or t.id in lost or \
                t.status.state < TaskState.ASSIGNED:  # (one waiting on its node never ran)
            return None
        if t.id in orphaned:  # (told to stop by this very pass)
            return now + OLD_TASK_TIMEOUT
        until = t.updated_at + OLD_TASK_TIMEOUT
        return until if now < until else None

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

    work: list[Load] = []  # the load as global tasks are placed (made when first needed)

    def placing() -> Load:
        if not work:
            base = load if load is not None else Load.of(snapshot.tasks.values())
            work.append(base.working_copy(()))
        return work[0]

    for svc in sorted(snapshot.services.values(), key=lambda s: s.spec.name):
        if only is not None and svc.id not in only:
            continue
        tasks = by_service.get(svc.id, [])
        if settled(svc, tasks, orphaned, nodes, schema):
            if settled_out is not None:
                settled_out.add(svc.id)
            continue  # (what _reconcile_service finds for it: nothing to do, nothing to wait)
        if svc.spec.mode.per_node:
            svc_ops, svc_wake = _reconcile_per_node(svc, tasks, alive, now, new_id, config,
                                                    nodes, placing, stopping_until, schema)
        elif svc.spec.mode.job:
            svc_ops, svc_wake = _reconcile_replicated_job(svc, tasks, alive, now, new_id,
                                                          config)
        else:
            svc_ops, svc_wake = _reconcile_service(svc, tasks, alive, now, new_id, config,
                                                   snapshot.nodes, stopping_until, schema)
        ops.extend(svc_ops)
        if svc_wake is not None and (wake_at is None or svc_wake < wake_at):
            wake_at = svc_wake
    return ops, wake_at


def settled(svc: Service, tasks: list[Task], orphaned: set[str],
            nodes: Mapping[str, Node] | None = None, schema: int = SCHEMA) -> bool:
    """The service is where its spec wants it, so its reconciler has nothing to do: no
    rollout in progress, exactly one live task per slot (``replicas`` of them: 1..replicas
    before schema SLOT_HOLES; global: per eligible node, placed), each of the current
    template, and no ended task kept as history; a job:
    one completion of the current iteration per slot (node) and nothing else. A quick check,
    so that a leader pass over a quiet cluster costs one look at each task instead of the
    whole policy (tests/test_scheduler_scale.py checks the verdict against the reconcilers).
    ``nodes``: needed for the global modes (without it they are never settled)."""
    if svc.update_status.state in ("updating", "rollback_started"):
        return False
    mode = svc.spec.mode
    if mode.per_node:
        if nodes is None:
            return False
        eligible = set(eligible_nodes(svc, nodes))
        if len(tasks) < len(eligible):
            return False
        where: set[str] = set()
        for t in tasks:
            if mode.job:
                if not _completed(t, svc) or t.desired_state is not TaskState.COMPLETE:
                    return False
            elif not (t.spec is svc.spec.task or t.spec == svc.spec.task) or not t.alive \
                    or t.id in orphaned or t.status.state < TaskState.ASSIGNED:
                return False
            where.add(t.node_id)
        return len(where) == len(tasks) and eligible <= where
    replicas = svc.spec.replicas
    if len(tasks) != replicas:
        return False
    if mode.job:
        return all(_completed(t, svc) and t.desired_state is TaskState.COMPLETE
                   for t in tasks) and {t.slot for t in tasks} == set(range(1, replicas + 1))
    spec = svc.spec.task
    holes = schema >= SLOT_HOLES  # (slots may be any numbers, not only 1..replicas)
    slots = set()
    for t in tasks:
        if not (t.spec is spec or t.spec == spec) or not t.alive or t.id in orphaned or \
                t.slot < 1 or (t.slot > replicas and not holes):
            return False
        slots.add(t.slot)
    return len(slots) == replicas


def replica_slots(replicas: int, tasks: list[Task], alive: Callable[[Task], bool],
                  schema: int = SCHEMA) -> tuple[set[int], set[int]]:
    """A replicated service's slots: (the slots it keeps, the slots this pass removes).

    Before schema SLOT_HOLES: 1..replicas (a scale-down drops the highest). From it, as
    swarmkit's replicated orchestrator: a slot is in use while it has a task not told to go
    away (desired state below REMOVE: a failed task waiting for its restart, a replaced
    one's history, keep their slot). More slots in use than ``replicas``: keep first the
    slots whose task is the 1st of the service on its node, then the 2nd, …, then those
    with no placed task or several — running ones before the others, lower numbers first
    — and remove the rest (so 3 tasks on A and 1 on B scaled to 2 leave one on each, where
    dropping slots 3 and 4 left both on A). Fewer: the lowest free numbers are added."""
    if schema < SLOT_HOLES:
        return set(range(1, replicas + 1)), set()
    in_use: dict[int, list[Task]] = defaultdict(list)
    for t in tasks:
        if t.desired_state < TaskState.REMOVE and t.slot >= 1:
            in_use[t.slot].append(t)
    if len(in_use) <= replicas:
        keep = set(in_use)
        free = (n for n in range(1, replicas + len(in_use) + 1) if n not in keep)
        keep.update(next(free) for _ in range(replicas - len(in_use)))
        return keep, set()

    def running(slot: int) -> bool:
        return any(alive(t) and t.status.state is TaskState.RUNNING for t in in_use[slot])

    order = sorted(in_use, key=lambda s: (not running(s), s))
    copies: dict[str, int] = defaultdict(int)
    nth: dict[int, float] = {}
    for slot in order:
        live = [t for t in in_use[slot] if alive(t)]
        if len(live) == 1 and live[0].node_id:
            copies[live[0].node_id] += 1
            nth[slot] = copies[live[0].node_id]
        else:
            nth[slot] = float("inf")
    keep = set(sorted(order, key=lambda s: (nth[s], not running(s), s))[:replicas])
    return keep, set(in_use) - keep


def eligible_nodes(svc: Service, nodes: Mapping[str, Node]) -> list[str]:
    """The nodes a global service runs a task on (sorted ids): ready, active (a paused node
    keeps its task but gets no new one; a drained one loses it), satisfying the service's
    placement constraints. Reservations are checked when the task is made (it then waits,
    PENDING, on its node)."""
    constraints = svc.spec.task.placement.constraints
    return sorted(n.id for n in nodes.values()
                  if n.state is NodeState.READY and n.availability is NodeAvailability.ACTIVE
                  and unsatisfied(n, constraints) is None)


def _keep_one(live: list[Task]) -> list[Op]:
    """Several live tasks in one slot (or on one node): keep the most advanced (running
    beats pending, healthy beats starting), then the newest; shut the others down."""
    if len(live) < 2:
        return []
    keep = max(live, key=lambda t: (t.status.state, up(t), t.created_at, t.id))
    return [("desired", t.id, int(TaskState.SHUTDOWN)) for t in live if t is not keep]


def _one_of_each(svc: Service, live: list[Task], nodes: Mapping[str, Node]) -> list[Op]:
    """A start-first slot (global: node): its old task and its replacement, one of each. An
    update that came while an earlier one's replacement had not started (no room for it)
    left that replacement old too: the most advanced old task keeps serving, the others
    stop (else each such update added a live task to the slot for good)."""
    old = [t for t in live if outdated(t, svc.spec.task, nodes.get(t.node_id))]
    return _keep_one(old) + _keep_one([t for t in live if t not in old])


def _trim(tasks: list[Task], alive: Callable[[Task], bool], keep: int,
          svc: Service | None = None) -> list[Op]:
    """Delete the ended tasks of one slot (node) beyond the newest ``keep``; with ``svc`` (a
    job) its completions of the current iteration are kept whatever their age."""
    dead = [t for t in tasks if not alive(t) and t.status.state.terminal]
    dead.sort(key=lambda t: (t.status.timestamp, t.id), reverse=True)
    return [("delete", t.id) for t in dead[keep:]
            if svc is None or not _completed(t, svc)]


def _completed(t: Task, svc: Service) -> bool:
    """A completion of the job's current iteration."""
    return t.status.state is TaskState.COMPLETE and of_current_run(t, svc)


def of_current_run(t: Task, svc: Service) -> bool:
    """``t`` belongs to the job's current iteration: made for its current scheduled run
    (``job_status.iteration``) and — unless the job is scheduled — for its current service
    version (any update re-runs a job, as Swarm's JobIteration). A scheduled job runs only
    when its schedule says (shoal.node.cron): an update changes what its runs run."""
    if t.job_iteration != svc.job_status.iteration:
        return False
    return svc.spec.mode.scheduled or t.service_version == svc.version


def _idle(svc: Service) -> bool:
    """A scheduled job before its first run: nothing to run yet."""
    return svc.spec.mode.scheduled and not svc.job_status.iteration


def _job_iteration(svc: Service, tasks: list[Task], alive: Callable[[Task], bool]
                   ) -> list[Op]:
    """A job's update: tasks of older iterations (service versions) still running are shut
    down (the new iteration runs from scratch), and an update or rollback in progress is
    done at once (a job has no rolling update). A scheduled job: the tasks of an older
    template are shut down (the current run replaces its own), those of earlier runs run
    on (policy allow: runs overlap) or are shut down (policy replace)."""
    if svc.spec.mode.scheduled:
        replace = svc.spec.mode.schedule.policy == "replace"
        ops: list[Op] = [("desired", t.id, int(TaskState.SHUTDOWN)) for t in tasks
                         if alive(t) and (outdated(t, svc.spec.task) or (
                             replace and t.job_iteration != svc.job_status.iteration))]
    else:
        ops = [("desired", t.id, int(TaskState.SHUTDOWN)) for t in tasks
               if alive(t) and t.service_version != svc.version]
    # a task that completed (exited 0) is wanted complete: Swarm's desired state "Complete"
    # (`service ps`), never run again (tasks completed before this rule get it too)
    ops += [("desired", t.id, int(TaskState.COMPLETE)) for t in tasks
            if t.status.state is TaskState.COMPLETE and t.desired_state < TaskState.COMPLETE]
    status = svc.update_status
    if status.state in ("updating", "rollback_started"):
        done = "rollback_completed" if status.rollback else "completed"
        which = "previous spec" if status.rollback else "new spec"
        ops.append(("update_status", svc.id, done,
                    f"the next scheduled runs use the {which}" if svc.spec.mode.scheduled
                    else f"job re-run with the {which}"))
    return ops


def _reconcile_replicated_job(
    svc: Service,
    tasks: list[Task],
    alive: Callable[[Task], bool],
    now: float,
    new_id: Callable[[], str],
    config: OrchestratorConfig,
) -> tuple[list[Op], float | None]:
    """Slots 1..replicas, each until a task of this iteration completes; at most
    ``max_concurrent`` live at once (lowest slots first)."""
    ops = _job_iteration(svc, tasks, alive)
    wake_at: float | None = None
    mode, policy = svc.spec.mode, svc.spec.task.restart
    slots: dict[int, list[Task]] = defaultdict(list)
    for t in tasks:
        slots[t.slot].append(t)
    current = [t for t in tasks if of_current_run(t, svc)]
    running = sum(1 for t in current if alive(t))
    room = 0 if _idle(svc) else mode.concurrency - running
    history = max(config.task_history, policy.max_attempts + 1, 1)
    created: dict[str, Any] | None = None
    for slot in range(1, max(mode.replicas, max(slots, default=0)) + 1):
        slot_tasks = sorted(slots.get(slot, []), key=lambda t: (t.created_at, t.id))
        mine = [t for t in slot_tasks if of_current_run(t, svc)]
        if slot > mode.replicas:  # (an older iteration's): no history kept
            ops += [("delete", t.id) for t in slot_tasks
                    if t.status.state.terminal and not alive(t)]
            continue
        ops += _trim(slot_tasks, alive, history, svc)
        live = [t for t in mine if alive(t)]
        ops += _keep_one(live)
        if live or any(_completed(t, svc) for t in mine):
            continue
        restart, due = restart_decision(policy, [t for t in mine if t.status.state.terminal],
                                        now, job=True)
        if not restart or room <= 0:
            continue
        if due > now:
            wake_at = due if wake_at is None else min(wake_at, due)
            continue
        room -= 1
        if created is None:
            created = to_dict(new_task(svc, slot, now, new_id))
            ops.append(("create", created))
        else:
            ops.append(("create", {**created, "id": new_id(), "slot": slot}))
    return ops, wake_at


def _reconcile_per_node(
    svc: Service,
    tasks: list[Task],
    alive: Callable[[Task], bool],
    now: float,
    new_id: Callable[[], str],
    config: OrchestratorConfig,
    nodes: Mapping[str, Node],
    placing: Callable[[], Load],
    stopping_until: Callable[[Task], float | None] = lambda t: None,
    schema: int = SCHEMA,
) -> tuple[list[Op], float | None]:
    """global and global-job: one task per eligible node (one completion, for a job),
    created on its node (slot 0). ``placing()``: the load to check and add reservations to;
    ``stopping_until``: see reconcile_services (a node's task still stopping holds it)."""
    mode, policy = svc.spec.mode, svc.spec.task.restart
    eligible = eligible_nodes(svc, nodes)
    need = svc.spec.task.resources.reservations
    ops: list[Op] = []
    wake_at: float | None = None
    paired: frozenset[int | str] = frozenset()
    if mode.job:
        ops += _job_iteration(svc, tasks, alive)
    else:
        def room_on(nid: str) -> bool:  # (start-first: can the node hold one more task?)
            node = nodes.get(nid)
            if not reserves(need) or node is None:
                return node is not None
            return rejection(node, new_task(svc, 0, now, lambda: ""),
                             placing().reserved[nid], 0) is None

        rollout = plan_rollout(svc, tasks, alive, now, nodes, wanted=len(eligible),
                               new_id=new_id, room_on=room_on, schema=schema,
                               eligible=frozenset(eligible),
                               fit_alone=lambda old: fit_alone(svc, old, nodes, placing(),
                                                               now))
        ops += rollout.ops
        wake_at, paired = rollout.wake_at, rollout.paired
        for op in rollout.ops:  # (start-first's new tasks reserve on their nodes too)
            if op[0] == "create" and reserves(need):
                placing().add(task_from_dict(op[1], svc.spec.task))
    by_node: dict[str, list[Task]] = defaultdict(list)
    for t in tasks:
        by_node[t.node_id].append(t)
    history = max(config.task_history, policy.max_attempts + 1, 1)
    probe: Task | None = None  # the template as a task, for the resource filters
    placed: dict[str, Any] | None = None  # the first placed task this pass makes, plain
    for nid in sorted(by_node.keys() | set(eligible)):
        node_tasks = sorted(by_node.get(nid, []), key=lambda t: (t.created_at, t.id))
        mine = [t for t in node_tasks if not mode.job or of_current_run(t, svc)]
        node = nodes.get(nid)
        if node is None:  # a removed node: its tasks were orphaned; keep no history
            ops += [("delete", t.id) for t in node_tasks
                    if not alive(t) and t.status.state.terminal]
            continue
        ops += _trim(node_tasks, alive, history, svc if mode.job else None)
        live = [t for t in mine if alive(t)]
        if nid in paired:  # start-first: the old task and its replacement, side by side
            ops += _one_of_each(svc, live, nodes)
            ops += _placed_beside(svc, live, nodes, placing(), now, new_id)
            continue
        ops += _keep_one(live)
        if nid not in eligible:
            continue
        waiting = [t for t in live if t.status.state < TaskState.ASSIGNED]
        if live and not waiting:
            continue
        if mode.job and (_idle(svc) or any(_completed(t, svc) for t in mine)):
            continue
        if not live:
            held = [u for t in node_tasks if (u := stopping_until(t)) is not None]
            if held:  # its last task is still stopping there
                wake_at = min([*held, *([wake_at] if wake_at is not None else [])])
                continue
            ended = [t for t in mine if t.status.state.terminal] if mode.job else \
                _restart_history(mine, svc)  # (a job's history is its iteration's: `mine`)
            restart, due = restart_decision(policy, ended, now, job=mode.job)
            if not restart:
                continue
            if due > now:
                wake_at = due if wake_at is None else min(wake_at, due)
                continue
        why = None
        if reserves(need):
            if probe is None:
                probe = new_task(svc, 0, now, lambda: "")
            why = rejection(node, probe, placing().reserved[nid], 0)
        if waiting:
            # a task waiting for resources on its node: replaced by a placed one once they
            # are there (it never ran: nothing to stop)
            if why is not None:
                continue
            ops.append(("delete", waiting[0].id))
        if why is None and placed is not None:  # (one conversion of the template per pass)
            ops.append(("create", {**placed, "id": new_id(), "node_id": nid}))
        else:
            task = new_task(svc, 0, now, new_id, node_id=nid, pending=why or "")
            ops.append(("create", to_dict(task)))
            if why is None:
                placed = ops[-1][1]
        if why is None and reserves(need):
            placing().add(task_from_dict(ops[-1][1], svc.spec.task))
    return ops, wake_at


def fit_alone(svc: Service, old: Task, nodes: Mapping[str, Node], load: Load,
              now: float) -> str | None:
    """Why a task of ``svc``'s template would not fit ``old``'s node even once ``old``
    ended (its reservation given back), or None when it would."""
    node = nodes.get(old.node_id)
    if node is None:
        return None
    without = load.reserved[old.node_id].copy()
    if holds(old):
        without.add(old.spec.resources.reservations, -1)
    return rejection(node, new_task(svc, 0, now, lambda: ""), without, 0)


def _placed_beside(svc: Service, live: list[Task], nodes: Mapping[str, Node], load: Load,
                   now: float, new_id: Callable[[], str]) -> list[Op]:
    """A start-first node whose new task waits beside the old one (it would not fit even
    alone: ``plan_rollout``'s ``fit_alone``), once that changed: placed, when the node now
    holds both; else, when it would fit alone, the old task stops first (as when there is
    no room for both)."""
    old = [t for t in live if outdated(t, svc.spec.task, nodes.get(t.node_id))]
    waiting = [t for t in live if t not in old and t.status.state < TaskState.ASSIGNED]
    if not old or not waiting:
        return []
    node = nodes.get(waiting[0].node_id)
    if node is None:
        return []
    probe = new_task(svc, 0, now, lambda: "")
    if rejection(node, probe, load.reserved[node.id], 0) is None:
        placed = new_task(svc, 0, now, new_id, node_id=node.id)
        load.add(placed)
        return [("delete", waiting[0].id), ("create", to_dict(placed))]
    if fit_alone(svc, old[0], nodes, load, now) is None:
        return [("desired", t.id, int(TaskState.SHUTDOWN)) for t in old]
    return []


def _reconcile_service(
    svc: Service,
    tasks: list[Task],
    alive: Callable[[Task], bool],
    now: float,
    new_id: Callable[[], str],
    config: OrchestratorConfig,
    nodes: Mapping[str, Node],
    stopping_until: Callable[[Task], float | None] = lambda t: None,
    schema: int = SCHEMA,
) -> tuple[list[Op], float | None]:
    """replicated: each slot of ``replica_slots`` with one live task (``stopping_until``: see
    reconcile_services, a slot whose task is still stopping waits for it); the tasks of a
    slot it removes are told REMOVE, an emptied slot's history is deleted."""
    ops: list[Op] = []
    wake_at: float | None = None
    slots: dict[int, list[Task]] = defaultdict(list)
    for t in tasks:
        slots[t.slot].append(t)
    replicas = svc.spec.replicas
    created: dict[str, Any] | None = None  # the first task this pass creates, as plain values
    excess = _over_max_replicas(svc, tasks, alive)
    if excess:
        ops += [("desired", t.id, int(TaskState.SHUTDOWN)) for t in excess]
        was_alive, gone = alive, {t.id for t in excess}

        def alive(t: Task) -> bool:
            return was_alive(t) and t.id not in gone
    keep, removed = replica_slots(replicas, tasks, alive, schema)
    rollout = plan_rollout(svc, tasks, alive, now, nodes, new_id=new_id, schema=schema,
                           slots=keep)
    ops += rollout.ops
    wake_at = rollout.wake_at

    for slot in sorted(slots.keys() | keep):
        slot_tasks = sorted(slots.get(slot, []), key=lambda t: (t.created_at, t.id))
        live = [t for t in slot_tasks if alive(t)]
        if slot in rollout.paired and slot in keep:
            # start-first: the old task and its replacement, side by side
            ops += _one_of_each(svc, live, nodes)
        elif slot in removed:  # (a scale-down's: the slot goes away, history and all)
            ops += [("desired", t.id, int(TaskState.REMOVE)) for t in slot_tasks
                    if t.desired_state < TaskState.REMOVE]
            continue
        elif slot not in keep:
            for t in live:
                ops.append(("desired", t.id, int(TaskState.SHUTDOWN)))
            # an emptied slot keeps no history (tasks that ended on their own too: their
            # desired state still says running, and nothing else would ever delete them)
            for t in slot_tasks:
                if t.status.state.terminal and not alive(t):
                    ops.append(("delete", t.id))
            continue
        elif len(live) > 1:
            ops += _keep_one(live)
        elif not live:
            held = [u for t in slot_tasks if (u := stopping_until(t)) is not None]
            restart, due = (False, now) if held else restart_decision(
                svc.spec.task.restart, _restart_history(slot_tasks, svc), now)
            if held:  # the slot's last task is still stopping
                wake_at = min([*held, *([wake_at] if wake_at is not None else [])])
            elif not restart:
                pass
            elif due > now:
                wake_at = due if wake_at is None else min(wake_at, due)
            elif created is None:
                created = to_dict(new_task(svc, slot, now, new_id))
                ops.append(("create", created))
            else:
                # the tasks a pass creates for a service differ only by id and slot: the
                # first one's plain form is converted once (a 10,000-task scale converts
                # one, not 10,000); the shared parts are only read (packed, or applied)
                ops.append(("create", {**created, "id": new_id(), "slot": slot}))
        # trim history: dead tasks beyond the newest `task_history` (but keep enough to
        # count restart attempts and to remember that a slot is not to be restarted)
        history = max(config.task_history, svc.spec.task.restart.max_attempts + 1, 1)
        ops += _trim(slot_tasks, alive, history)
    return ops, wake_at


def _restart_history(tasks: list[Task], svc: Service) -> list[Task]:
    """The ended tasks a slot's restart decision counts: those of the service's current
    version. A new version (an update, a rollback, a scale) starts the history afresh, as
    swarmkit's restart supervisor does: a slot that used up its attempts, or whose task
    ended under condition none, runs again after `service update` (--force too)."""
    return [t for t in tasks if t.status.state.terminal and t.service_version == svc.version]


def _over_max_replicas(svc: Service, tasks: list[Task], alive: Callable[[Task], bool]
                       ) -> list[Task]:
    """Live tasks beyond ``placement.max_replicas`` on a node (the limit was lowered): the
    newest, least advanced ones, to be shut down and placed again (Swarm's constraint
    enforcer does the same)."""
    limit = svc.spec.task.placement.max_replicas
    if not limit:
        return []
    on_node: dict[str, list[Task]] = defaultdict(list)
    for t in tasks:
        if t.node_id and alive(t):
            on_node[t.node_id].append(t)
    excess: list[Task] = []
    for nid in sorted(on_node):
        live = on_node[nid]
        if len(live) > limit:
            live.sort(key=lambda t: (-t.status.state, t.created_at, t.id))
            excess += live[limit:]
    return excess
