"""The scheduler: decides *where* pending tasks run. A pure function.

Owns: placement policy. ``schedule(snapshot, pending)`` → a Plan of assignments and,
for tasks that fit nowhere, a reason naming how many nodes each filter rejected
("no suitable node (not ready 2/5, drained 1/5)"). Must not touch: the store, the
network, clocks or randomness — tests run it with hand-made snapshots and a
deterministic node order.

Pipeline (swarmkit's shape): filters drop nodes that cannot take the task, then
rankers order the rest. Filters: node ready, availability active, enough unreserved
memory and CPU for the task's reservations (against what the node reported at join).
Ranking: fewest tasks of the same service on the node (spread), then fewest tasks in
total, then node id (deterministic).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from shoal.raft.models import Node, NodeAvailability, NodeState, Task
from shoal.raft.state import Snapshot


@dataclass
class Reserved:
    """Resources already reserved on a node by its live tasks."""

    memory: int = 0
    cpu: float = 0.0


NodeFilter = Callable[[Node, Task, Reserved], bool]


def _fits_memory(n: Node, t: Task, r: Reserved) -> bool:
    need = t.spec.reserve_memory
    return not need or (n.memory_bytes > 0 and r.memory + need <= n.memory_bytes)


def _fits_cpu(n: Node, t: Task, r: Reserved) -> bool:
    need = t.spec.reserve_cpu
    return not need or (n.cpus > 0 and r.cpu + need <= n.cpus + 1e-9)


@dataclass(frozen=True)
class Filter:
    name: str  # shown to users: "not ready 2/5"
    accepts: NodeFilter


FILTERS: tuple[Filter, ...] = (
    Filter("not ready", lambda n, t, r: n.state is NodeState.READY),
    Filter("not active", lambda n, t, r: n.availability is NodeAvailability.ACTIVE),
    Filter("insufficient memory", _fits_memory),
    Filter("insufficient cpu", _fits_cpu),
)


@dataclass
class Plan:
    assignments: list[tuple[str, str]] = field(default_factory=list)  # (task id, node id)
    unschedulable: list[tuple[str, str]] = field(default_factory=list)  # (task id, reason)


def _counts(tasks: Iterable[Task]
            ) -> tuple[Counter[str], Counter[tuple[str, str]], defaultdict[str, Reserved]]:
    per_node: Counter[str] = Counter()
    per_service: Counter[tuple[str, str]] = Counter()
    reserved: defaultdict[str, Reserved] = defaultdict(Reserved)
    for t in tasks:
        if t.node_id and t.alive:
            per_node[t.node_id] += 1
            per_service[(t.node_id, t.service_id)] += 1
            reserved[t.node_id].memory += t.spec.reserve_memory
            reserved[t.node_id].cpu += t.spec.reserve_cpu
    return per_node, per_service, reserved


def schedule(snapshot: Snapshot, pending: list[Task]) -> Plan:
    """Place ``pending`` tasks (unassigned, alive) on nodes of ``snapshot``."""
    plan = Plan()
    nodes = sorted(snapshot.nodes.values(), key=lambda n: n.id)
    per_node, per_service, reserved = _counts(snapshot.tasks.values())
    for task in sorted(pending, key=lambda t: (t.service_name, t.slot, t.id)):
        rejected: Counter[str] = Counter()
        candidates: list[Node] = []
        for node in nodes:
            for f in FILTERS:
                if not f.accepts(node, task, reserved[node.id]):
                    rejected[f.name] += 1
                    break
            else:
                candidates.append(node)
        if not candidates:
            total = len(nodes)
            detail = ", ".join(f"{name} {n}/{total}" for name, n in sorted(rejected.items()))
            reason = f"no suitable node ({detail})" if total else "no suitable node (no nodes)"
            plan.unschedulable.append((task.id, reason))
            continue
        best = min(
            candidates,
            key=lambda n: (per_service[(n.id, task.service_id)], per_node[n.id], n.id),
        )
        plan.assignments.append((task.id, best.id))
        per_node[best.id] += 1
        per_service[(best.id, task.service_id)] += 1
        reserved[best.id].memory += task.spec.reserve_memory
        reserved[best.id].cpu += task.spec.reserve_cpu
    return plan
