"""The scheduler: decides *where* pending tasks run. A pure function.

Owns: placement policy. ``schedule(snapshot, pending)`` → a Plan of assignments and,
for tasks that fit nowhere, a reason naming how many nodes each filter rejected
("no suitable node (not ready 2/5, drained 1/5)"). Must not touch: the store, the
network, clocks or randomness — tests run it with hand-made snapshots and a
deterministic node order.

Pipeline (swarmkit's shape): filters drop nodes that cannot take the task, then
rankers order the rest. Filters today: node ready, availability active. Ranking:
fewest tasks of the same service on the node (spread), then fewest tasks in total,
then node id (deterministic). Resource filters slot in with the runtime issue.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from shoal.raft.models import Node, NodeAvailability, NodeState, Task
from shoal.raft.state import Snapshot

NodeFilter = Callable[[Node, Task], bool]


@dataclass(frozen=True)
class Filter:
    name: str  # shown to users: "not ready 2/5"
    accepts: NodeFilter


FILTERS: tuple[Filter, ...] = (
    Filter("not ready", lambda n, t: n.state is NodeState.READY),
    Filter("not active", lambda n, t: n.availability is NodeAvailability.ACTIVE),
)


@dataclass
class Plan:
    assignments: list[tuple[str, str]] = field(default_factory=list)  # (task id, node id)
    unschedulable: list[tuple[str, str]] = field(default_factory=list)  # (task id, reason)


def _counts(tasks: Iterable[Task]) -> tuple[Counter[str], Counter[tuple[str, str]]]:
    per_node: Counter[str] = Counter()
    per_service: Counter[tuple[str, str]] = Counter()
    for t in tasks:
        if t.node_id and t.alive:
            per_node[t.node_id] += 1
            per_service[(t.node_id, t.service_id)] += 1
    return per_node, per_service


def schedule(snapshot: Snapshot, pending: list[Task]) -> Plan:
    """Place ``pending`` tasks (unassigned, alive) on nodes of ``snapshot``."""
    plan = Plan()
    nodes = sorted(snapshot.nodes.values(), key=lambda n: n.id)
    per_node, per_service = _counts(snapshot.tasks.values())
    for task in sorted(pending, key=lambda t: (t.service_name, t.slot, t.id)):
        rejected: Counter[str] = Counter()
        candidates: list[Node] = []
        for node in nodes:
            for f in FILTERS:
                if not f.accepts(node, task):
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
    return plan
