"""The scheduler: decides *where* pending tasks run. A pure function.

Owns: placement policy. ``schedule(snapshot, pending)`` → a Plan of assignments and,
for tasks that fit nowhere, a reason naming how many nodes each filter rejected
("no suitable node (not ready 2/5, drained 1/5)"). Must not touch: the store, the
network, clocks or randomness — tests run it with hand-made snapshots and a
deterministic node order.

Pipeline (swarmkit's shape): filters drop nodes that cannot take the task, then
rankers order the rest. Filters (``rejection``): node ready, availability active, the
task's placement constraints (``node.labels.zone==b``; see ``satisfies``), fewer tasks of
the service on the node than ``placement.max_replicas``, enough unreserved memory and CPU
for the task's reservations (against what the node reported at join), and enough
unreserved units of each generic resource kind it reserves (against what the node
advertises, ``node update --generic-resource-add``: shoal.raft.generic; a task holds its
units as long as it holds its place, ``holds``). Before the filters:
a task mounting a single-writer volume read-write (shoal.runtime.volumes) waits, whatever
the node, while another task holds that volume read-write (placed, not observed ended). Ranking
(``rank``): for each placement preference ``spread=node.labels.KEY`` in turn, fewest tasks
of the service among the eligible nodes with the same label value(s) (nodes without the
label form one group) — so tasks spread over zones first, then over nodes; then nodes
where the service's current version kept failing last (``avoided_nodes``, swarmkit's
"recent failures"); then fewest tasks of the same service on the node, then fewest tasks
in total, then node id (deterministic). "Eligible" for the spread groups: the nodes the
static filters (ready, active, constraints) accept. The orchestrator uses ``unsatisfied``
too, to move tasks off nodes that stopped satisfying their constraints, and ``rejection``
to place global tasks.

Cost: like tasks (one service, same constraints and reservations) share one heap of
candidate nodes keyed by the ranking (with spread preferences: a tree of heaps, one per
label group), so a pass costs O(nodes) per group plus O(log nodes) per placement, not
O(tasks * nodes); tests/sched_reference.py is the plain loop the result must equal.
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from shoal.raft import generic
from shoal.raft.errors import ValidationError
from shoal.raft.models import (
    Constraint,
    Node,
    NodeAvailability,
    NodeState,
    Service,
    Task,
    TaskState,
    Volume,
    resolve_mount,
)
from shoal.raft.spec import Reservations
from shoal.raft.state import Snapshot
from shoal.raft.validate import parse_constraint
from shoal.runtime import volumes


@dataclass
class Reserved:
    """Resources already reserved on a node by its live tasks."""

    memory: int = 0
    cpu: float = 0.0
    # generic resources (shoal.raft.generic): kind (``generic.key``) → units reserved
    generic: dict[str, int] = field(default_factory=dict)

    def copy(self) -> Reserved:
        return Reserved(self.memory, self.cpu, dict(self.generic))

    def add(self, need: Reservations, sign: int = 1) -> None:
        """Count (``sign`` -1: no longer) a task's reservations here."""
        self.memory += sign * need.memory
        self.cpu += sign * need.cpu
        for k, n in generic.reserved(need.generic_resources).items():
            self.generic[k] = self.generic.get(k, 0) + sign * n


def reserves(need: Reservations) -> bool:
    """Does a task with these reservations need a resource filter's check?"""
    return bool(need.memory or need.cpu or need.generic_resources)


# A filter returns None when the node can take the task, else the rejection's name as
# users see it, counted over nodes: "not ready" → "no suitable node (not ready 2/5)".
NodeFilter = Callable[[Node, Task, Reserved], str | None]


@functools.lru_cache(maxsize=4096)
def parse_constraints(texts: tuple[str, ...]) -> tuple[Constraint, ...]:
    """A spec's stored constraint texts → Constraints. Specs were validated before they
    were replicated; a text this version cannot parse (written by a newer one) becomes a
    constraint no node satisfies, so its tasks wait instead of running anywhere."""
    out: list[Constraint] = []
    for text in texts:
        try:
            out.append(parse_constraint(text))
        except ValidationError:
            out.append(Constraint(key=text, op="", value=""))  # unknown key: never holds
    return tuple(out)


def satisfies(node: Node, c: Constraint) -> bool:
    """Swarm's matching: values compare case-insensitively; a missing label is the empty
    value (so ``node.labels.zone!=b`` holds on a node without the label); ``node.ip``
    matches the node's address against an address or a CIDR; an architecture not reported
    (``Node.arch`` "", a node that joined below schema 11 until its agent describes it) is
    the empty value, which no ``==`` matches; an unknown key never holds."""
    if c.key == "node.ip":
        try:
            match = ipaddress.ip_address(node.addr) in ipaddress.ip_network(c.value,
                                                                            strict=False)
        except ValueError:
            return False
    else:
        if c.key.startswith("node.labels."):
            actual = node.labels.get(c.key[len("node.labels."):], "")
        elif c.key == "node.id":
            actual = node.id
        elif c.key == "node.hostname":
            actual = node.hostname
        elif c.key == "node.role":
            actual = node.role.value
        elif c.key == "node.platform.os":
            actual = "linux"  # the runtime (namespaces, cgroups) runs on Linux only
        elif c.key == "node.platform.arch":
            actual = node.arch
        else:
            return False
        match = actual.casefold() == c.value.casefold()
    return match if c.op == "==" else not match


def unsatisfied(node: Node, constraints: tuple[str, ...]) -> Constraint | None:
    """The first of ``constraints`` that ``node`` does not satisfy, or None."""
    for c in parse_constraints(constraints):
        if not satisfies(node, c):
            return c
    return None


def _constraints(n: Node, t: Task, r: Reserved) -> str | None:
    c = unsatisfied(n, t.spec.placement.constraints)
    return None if c is None else f"constraint {c}"


def _fits_memory(n: Node, t: Task, r: Reserved) -> bool:
    need = t.spec.resources.reservations.memory
    return not need or (n.memory_bytes > 0 and r.memory + need <= n.memory_bytes)


def _fits_cpu(n: Node, t: Task, r: Reserved) -> bool:
    need = t.spec.resources.reservations.cpu
    return not need or (n.cpus > 0 and r.cpu + need <= n.cpus + 1e-9)


def generic_shortage(n: Node, t: Task, r: Reserved) -> str | None:
    """The generic resource filter: the first kind the task reserves of which ``n`` has
    fewer free units than it needs (a node without the kind has none; kinds ignore case:
    shoal.raft.generic), named as users see it counted, else None."""
    for kind, need in t.spec.resources.reservations.generic_resources.items():
        have = generic.find(n.generic_resources, kind)
        k = generic.key(kind)
        if have is None or generic.units(n.generic_resources[have]) - r.generic.get(k, 0) < need:
            return f"insufficient generic resource {k}"
    return None


def max_replicas_reached(t: Task, on_node: int) -> str | None:
    """The max-replicas filter: ``on_node`` tasks of the service already on the node."""
    limit = t.spec.placement.max_replicas
    return f"max replicas per node ({limit})" if limit and on_node >= limit else None


def _only(name: str, accepts: Callable[[Node, Task, Reserved], bool]) -> NodeFilter:
    return lambda n, t, r: None if accepts(n, t, r) else name


FILTERS: tuple[NodeFilter, ...] = (
    _only("not ready", lambda n, t, r: n.state is NodeState.READY),
    _only("not active", lambda n, t, r: n.availability is NodeAvailability.ACTIVE),
    _constraints,
    _only("insufficient memory", _fits_memory),
    _only("insufficient cpu", _fits_cpu),
    generic_shortage,
)


@dataclass
class Plan:
    assignments: list[tuple[str, str]] = field(default_factory=list)  # (task id, node id)
    unschedulable: list[tuple[str, str]] = field(default_factory=list)  # (task id, reason)


def holds(t: Task) -> bool:
    """``t`` holds a place on its node: placed and not ended — told to stop included, until
    it reports that it ended (swarmkit frees a task's resources only then: a replacement
    must not be placed into a node the stopping task still fills, for its whole grace). A
    global task waiting on its node for resources (PENDING there) holds nothing: counted,
    one asking more than the node has would keep what it has from every other service."""
    return bool(t.node_id) and TaskState.ASSIGNED <= t.status.state < TaskState.COMPLETE


class Load:
    """What the placed tasks that have not ended (``holds``) hold per node: how many
    (``per_node``), how many of each service (``per_service``: service id → node id → n)
    and the resources they reserve.
    ``schedule`` counts it over the snapshot's tasks, or takes one kept up to date by the
    leader's PassIndex (``add``/``remove`` per changed task), which it does not modify."""

    __slots__ = ("per_node", "per_service", "reserved")

    def __init__(self) -> None:
        self.per_node: Counter[str] = Counter()
        self.per_service: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.reserved: defaultdict[str, Reserved] = defaultdict(Reserved)

    @classmethod
    def of(cls, tasks: Iterable[Task]) -> Load:
        load = cls()
        for t in tasks:
            load.add(t)
        return load

    def add(self, t: Task, sign: int = 1) -> None:
        if holds(t):
            nid = t.node_id
            self.per_node[nid] += sign
            self.per_service[t.service_id][nid] += sign
            need = t.spec.resources.reservations
            if reserves(need):
                self.reserved[nid].add(need, sign)

    def remove(self, t: Task) -> None:
        self.add(t, -1)

    def working_copy(self, services: Iterable[str]) -> Load:
        """A copy ``schedule`` may change: per-node figures and the named services'."""
        out = Load()
        out.per_node = Counter(self.per_node)
        for sid in services:
            if sid in self.per_service:
                out.per_service[sid] = Counter(self.per_service[sid])
        for nid, r in self.reserved.items():
            out.reserved[nid] = r.copy()
        return out


# The filters that depend only on the node and the task's placement constraints (not on
# what is reserved): decided once per node for all tasks with the same constraints in a
# pass. The resource filters are checked when a node comes up as the best candidate. (A new
# filter goes in the right half; tests/test_scheduler_scale.py compares with the reference.)
_STATIC_FILTERS = FILTERS[:3]
_RESOURCE_FILTERS = FILTERS[3:]


def rejection(node: Node, task: Task, reserved: Reserved, on_node: int) -> str | None:
    """The first filter that refuses ``task`` on ``node`` (None: it fits), in the order
    users see them counted: static filters, max replicas per node, resources. ``on_node``:
    tasks of the task's service already on the node."""
    for f in _STATIC_FILTERS:
        why = f(node, task, reserved)
        if why is not None:
            return why
    why = max_replicas_reached(task, on_node)
    if why is not None:
        return why
    for f in _RESOURCE_FILTERS:
        why = f(node, task, reserved)
        if why is not None:
            return why
    return None


class _Group:
    """Tasks of one service with the same constraints and reservations: they accept the
    same nodes, so one heap of candidates keyed by the ranking serves them all.

    The heap holds at most one entry per node, keyed by (tasks of the service on the node,
    tasks on the node, node id) as it was when pushed. Placing only adds tasks, so a key
    can only grow: an entry whose key is out of date is a lower bound, re-pushed with its
    current key when it surfaces; the first entry that surfaces up to date is the minimum.
    A node that stops fitting the group's reservations never fits again in this pass.
    With spread preferences the candidates are a ``_Spread`` tree instead."""

    __slots__ = ("heap", "spread")

    def __init__(self, heap: list[tuple[int, int, str]], spread: _Spread | None = None
                 ) -> None:
        self.heap = heap
        self.spread = spread


class _Level:
    """One label group of a spread tree: tasks of the service on its (eligible) nodes, its
    sub-groups by the next label's value, and a heap of its candidates — of its sub-groups
    keyed by (their count, their best key) inside, or of its nodes at the last level."""

    __slots__ = ("children", "count", "heap")

    def __init__(self) -> None:
        self.count = 0
        self.children: dict[str, _Level] = {}
        self.heap: list[tuple[object, ...]] = []


class _Spread:
    """The candidates of a group with spread preferences: a tree of label groups, each
    with a lazy heap like ``_Group``'s (counts only grow in a pass, so out-of-date entries
    are lower bounds, fixed when they surface). The best node is the minimum of (tasks of
    the service in its group at each level, then on the node, on the node in total, id);
    a placement makes only the entries on its path out of date, so it costs O(levels *
    log) instead of re-ranking every node of its group."""

    __slots__ = ("labels", "paths", "root")

    def __init__(self, labels: tuple[str, ...], nodes: list[Node],
                 svc_get: Callable[[str, int], int], node_get: Callable[[str, int], int]
                 ) -> None:
        self.labels = labels
        # node id → its label values, one per level ("" for a node without the label)
        self.paths = {n.id: tuple(n.labels.get(label, "") for label in labels) for n in nodes}
        self.root = _Level()
        for nid, path in self.paths.items():
            level = self.root
            for value in path:
                level = level.children.setdefault(value, _Level())
                level.count += svc_get(nid, 0)
            level.heap.append((svc_get(nid, 0), node_get(nid, 0), nid))
        self._build(self.root, 0)

    def _build(self, level: _Level, depth: int) -> None:
        if depth == len(self.labels):
            heapq.heapify(level.heap)
            return
        for child in level.children.values():
            self._build(child, depth + 1)
            top = child.heap[0] if child.heap else None
            if top is not None:  # (every leaf has a node: lower bounds from the heaps)
                level.heap.append((child.count, *top))
        heapq.heapify(level.heap)

    def placed(self, nid: str) -> None:
        """A task of the service went to ``nid``: count it in the groups on its path."""
        path = self.paths.get(nid)
        if path is not None:
            level = self.root
            for value in path:
                level = level.children[value]
                level.count += 1

    def best(self, node_key: Callable[[str], tuple[object, ...]],
             fits: Callable[[str], bool]) -> tuple[object, ...] | None:
        """The best candidate's full key (its id last), dropping nodes that no longer fit."""
        return self._best(self.root, 0, node_key, fits)

    def _best(self, level: _Level, depth: int, node_key: Callable[[str], tuple[object, ...]],
              fits: Callable[[str], bool]) -> tuple[object, ...] | None:
        heap = level.heap
        leaf = depth == len(self.labels)
        while heap:
            entry = heap[0]
            nid = str(entry[-1])
            if leaf:
                current = node_key(nid)
                if current == entry and not fits(nid):
                    heapq.heappop(heap)  # counts and reservations only grow: never again
                    continue
            else:
                child = level.children[self.paths[nid][depth]]
                sub = self._best(child, depth + 1, node_key, fits)
                if sub is None:
                    heapq.heappop(heap)
                    continue
                current = (child.count, *sub)
            if current != entry:
                heapq.heapreplace(heap, current)
                continue
            return entry
        return None


# a node where this many tasks of a service's current version failed (or were rejected)
# within FAILURE_WINDOW seconds is tried last for it (swarmkit's scheduler: 5 failures in 5
# minutes, counted in the leader's memory; shoal counts the failed tasks the state keeps,
# at least 3 ended ones per slot — so 3, and the count survives a change of leader)
FAILURES_TO_AVOID = 3
FAILURE_WINDOW = 300.0
_AVOIDED = 1 << 40  # added to an avoided node's rank: after every other node, still a node


def avoided_nodes(services: Mapping[str, Service], sids: Iterable[str],
                  tasks_of: Callable[[str], Iterable[Task]], now: float
                  ) -> dict[str, frozenset[str]]:
    """Service id → the nodes its pending tasks should try last: where FAILURES_TO_AVOID of
    its current version's tasks failed or were rejected within FAILURE_WINDOW (a node whose
    disk, image or network breaks the task would otherwise get every replacement: the
    ranking favours the node its failed task left)."""
    out: dict[str, frozenset[str]] = {}
    bad = (TaskState.FAILED, TaskState.REJECTED)
    for sid in sids:
        svc = services.get(sid)
        if svc is None:
            continue
        failed = Counter(t.node_id for t in tasks_of(sid)
                         if t.node_id and t.status.state in bad
                         and t.service_version == svc.version
                         and t.status.timestamp >= now - FAILURE_WINDOW)
        nodes = frozenset(n for n, c in failed.items() if c >= FAILURES_TO_AVOID)
        if nodes:
            out[sid] = nodes
    return out


def schedule(snapshot: Snapshot, pending: list[Task], load: Load | None = None,
             avoid: Mapping[str, frozenset[str]] | None = None) -> Plan:
    """Place ``pending`` tasks (unassigned, alive) on nodes of ``snapshot``.

    Same result as running every filter on every node for every task and taking the
    minimum of the ranking, at O(nodes) per group of like tasks plus O(log nodes) per
    placement (tests/sched_reference.py is that plain version; tests compare the two).
    ``load``: what the snapshot's tasks hold, if the caller keeps it (else counted here,
    one walk over the task table); it is not modified. ``avoid``: service id → nodes its
    tasks go to only when no other node takes them (``avoided_nodes``)."""
    plan = Plan()
    if not pending:
        return plan
    nodes = sorted(snapshot.nodes.values(), key=lambda n: n.id)
    if load is None:
        work = Load.of(snapshot.tasks.values())
    else:
        work = load.working_copy({t.service_id for t in pending})
    per_node, per_service, reserved = work.per_node, work.per_service, work.reserved
    groups: dict[tuple[object, ...], _Group] = {}
    eligible: dict[tuple[str, ...], list[str]] = {}  # constraints → nodes the static filters pass
    # why tasks of a group fit nowhere: valid until the next placement changes reservations
    explained: dict[tuple[object, ...], str] = {}
    heapreplace = heapq.heapreplace
    # the groups with spread preferences, by service: a placement counts in each of them
    spreading: dict[str, list[_Spread]] = {}
    node_get = per_node.get
    vols = snapshot.volumes
    writers = single_writers(snapshot.tasks.values(), vols) if _any_volumes(pending) else {}
    for task in sorted(pending, key=lambda t: (t.service_name, t.slot, t.id)):
        sid = task.service_id
        busy = writer_conflict(task, writers, vols) if writers else None
        if busy is not None:
            plan.unschedulable.append((task.id, busy))
            continue
        need = task.spec.resources.reservations
        place = task.spec.placement
        key = (sid, place.constraints, need.memory, need.cpu,
               tuple(need.generic_resources.items()), place.max_replicas, place.preferences)
        of_service = per_service[sid]
        svc_get = of_service.get  # (.get: a Counter's missing key costs a Python call)
        avoided = avoid.get(sid) if avoid else None
        # the ranking's first figure: the service's tasks on the node, after every other
        # node for an avoided one
        rank = svc_get if not avoided else functools.partial(_rank, svc_get=svc_get,
                                                              avoided=avoided)
        group = groups.get(key)
        if group is None:
            constraints = place.constraints
            ids = eligible.get(constraints)
            if ids is None:  # the static filters depend on the node and the constraints only
                ids = eligible[constraints] = [
                    n.id for n in nodes
                    if all(f(n, task, reserved[n.id]) is None for f in _STATIC_FILTERS)]
            if place.preferences:
                labels = tuple(p.label for p in place.preferences)
                tree = _Spread(labels, [snapshot.nodes[nid] for nid in ids], svc_get, node_get)
                group = groups[key] = _Group([], tree)
                spreading.setdefault(sid, []).append(tree)
            else:
                group = groups[key] = _Group(
                    [(rank(nid, 0), node_get(nid, 0), nid) for nid in ids])
                heapq.heapify(group.heap)
        heap = group.heap
        needs = reserves(need)
        limit = place.max_replicas

        fits = functools.partial(_fits, task=task, nodes=snapshot.nodes, reserved=reserved,
                                 on_node=svc_get)
        best: str | None = None
        if group.spread is not None:
            found = group.spread.best(
                functools.partial(_node_key, svc_get=rank, node_get=node_get), fits)
            best = None if found is None else str(found[-1])
        while group.spread is None and heap:
            entry = heap[0]
            nid = entry[2]
            current = (rank(nid, 0), node_get(nid, 0), nid)
            if current != entry:
                heapreplace(heap, current)
                continue
            if (limit or needs) and not fits(nid):
                heapq.heappop(heap)  # counts and reservations only grow: never fits again
                continue
            best = nid
            break
        if best is None:
            reason = explained.get(key)
            if reason is None:
                reason = explained[key] = _explain_by_filters(task, nodes, reserved,
                                                              of_service)
            plan.unschedulable.append((task.id, reason))
            continue
        plan.assignments.append((task.id, best))
        if task.spec.container.mounts:
            for name in _rw_single_writer(task, vols):
                writers[name] = (task.id, task.name)
        per_node[best] += 1
        of_service[best] += 1
        for tree in spreading.get(sid, ()):  # (any placement of the service counts there)
            tree.placed(best)
        if group.spread is None:
            heapreplace(heap, (rank(best, 0), per_node[best], best))
        if needs:
            reserved[best].add(need)
        # (reservations and max-replicas counts change what the filters say)
        if needs or limit:
            explained.clear()
    return plan


def _any_volumes(tasks: Iterable[Task]) -> bool:
    return any(m.type == "volume" for t in tasks for m in t.spec.container.mounts)


def _rw_single_writer(task: Task, vols: Mapping[str, Volume]) -> list[str]:
    """The single-writer volumes ``task`` mounts read-write (shoal.runtime.volumes; the
    mount's own options, else those of the created volume)."""
    out = []
    for m in task.spec.container.mounts:
        if m.type == "volume" and not m.readonly:
            try:
                if volumes.single_writer(resolve_mount(m, vols)[1]):
                    out.append(m.source)
            except volumes.VolumeOptionError:
                continue  # (validated when stored; a newer version's value: not ours)
    return out


def single_writers(tasks: Iterable[Task], vols: Mapping[str, Volume]
                   ) -> dict[str, tuple[str, str]]:
    """Single-writer volume name -> the task (id, name) holding it read-write: one placed on a
    node that has not been observed to end (a task being stopped on a drained node still
    holds its volume until its node reports it gone; a global task waiting on its node,
    PENDING there, holds nothing: ``holds``)."""
    held: dict[str, tuple[str, str]] = {}
    for t in tasks:
        if holds(t):
            for name in _rw_single_writer(t, vols):
                held[name] = (t.id, t.name)
    return held


def writer_conflict(task: Task, writers: Mapping[str, tuple[str, str]],
                    vols: Mapping[str, Volume]) -> str | None:
    """Why ``task`` cannot be placed now: a single-writer volume it mounts read-write is
    held by another task; None when it can."""
    for name in _rw_single_writer(task, vols):
        holder = writers.get(name)
        if holder is not None and holder[0] != task.id:
            return (f"volume {name} is single-writer and mounted read-write by task "
                    f"{holder[1]} ({holder[0][:12]}): waiting until it ends")
    return None


def _fits(nid: str, task: Task, nodes: Mapping[str, Node], reserved: defaultdict[str, Reserved],
          on_node: Callable[[str, int], int]) -> bool:
    """The dynamic filters: max replicas per node, then resources."""
    if max_replicas_reached(task, on_node(nid, 0)) is not None:
        return False
    if reserves(task.spec.resources.reservations):  # (else the resource filters accept any)
        node, r = nodes[nid], reserved[nid]
        return all(f(node, task, r) is None for f in _RESOURCE_FILTERS)
    return True


def _rank(nid: str, default: int, svc_get: Callable[[str, int], int],
          avoided: frozenset[str]) -> int:
    return svc_get(nid, default) + (_AVOIDED if nid in avoided else 0)


def _node_key(nid: str, svc_get: Callable[[str, int], int],
              node_get: Callable[[str, int], int]) -> tuple[object, ...]:
    return (svc_get(nid, 0), node_get(nid, 0), nid)


def _explain_by_filters(task: Task, nodes: list[Node], reserved: defaultdict[str, Reserved],
                        of_service: Counter[str]) -> str:
    """Run the filters in order on every node, counting each node's first rejection."""
    rejected: Counter[str] = Counter()
    for node in nodes:
        why = rejection(node, task, reserved[node.id], of_service.get(node.id, 0))
        if why is not None:
            rejected[why] += 1
    return explain(task, rejected, len(nodes))


def explain(task: Task, rejected: Counter[str], total: int) -> str:
    """Why ``task`` fits nowhere. When only its constraints stand in the way, say which:
    "no node satisfies node.labels.zone==b"; otherwise count every rejection:
    "no suitable node (constraint node.labels.zone==b 2/3, not ready 1/3)"."""
    if not total:
        return "no suitable node (no nodes)"
    detail = ", ".join(f"{name} {n}/{total}" for name, n in sorted(rejected.items()))
    failed = [str(c) for c in parse_constraints(task.spec.placement.constraints)
              if rejected[f"constraint {c}"]]
    if failed and sum(rejected[f"constraint {c}"] for c in failed) == total:
        reason = "no node satisfies " + " and ".join(failed)
        return reason if len(failed) == 1 else f"{reason} ({detail})"
    return f"no suitable node ({detail})"
