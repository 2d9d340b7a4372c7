"""A plain reference implementation of the scheduler and the orchestrator, for tests.

Owns: the placement policy and the orchestration as they were written before the leader's
work was indexed (shoal 0.1's ``schedule``: every filter — ``rejection``: FILTERS and max
replicas per node — on every node for every pending task, then the minimum of (tasks of the
service on the node, tasks on the node, node id), preceded, with spread preferences, by the
tasks of the service in the node's label group at each level, over the nodes the static
filters accept; and ``reconcile_services``'s rule of one live task per slot over the whole
task table). tests/test_scheduler_scale.py compares the optimised
functions against these on seeded random snapshots: same plan, same reasons, same ops.
Must not touch: anything but its inputs. It is deliberately slow and simple: change it
only when the policy itself changes (and then change the policy's docs too).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

from shoal.node.scheduler import FILTERS, Plan, Reserved, explain, holds, rejection
from shoal.raft.models import Node, Task
from shoal.raft.state import Snapshot


def _counts(tasks: Iterable[Task]
            ) -> tuple[Counter[str], Counter[tuple[str, str]], defaultdict[str, Reserved]]:
    per_node: Counter[str] = Counter()
    per_service: Counter[tuple[str, str]] = Counter()
    reserved: defaultdict[str, Reserved] = defaultdict(Reserved)
    for t in tasks:
        if holds(t):
            per_node[t.node_id] += 1
            per_service[(t.node_id, t.service_id)] += 1
            reserved[t.node_id].memory += t.spec.resources.reservations.memory
            reserved[t.node_id].cpu += t.spec.resources.reservations.cpu
            _add_generic(reserved[t.node_id], t)
    return per_node, per_service, reserved


def _group(n: Node, labels: list[str], level: int) -> tuple[str, ...]:
    return tuple(n.labels.get(lb, "") for lb in labels[:level + 1])


def reference_schedule(snapshot: Snapshot, pending: list[Task]) -> Plan:
    """Place ``pending`` tasks (unassigned, alive) on nodes of ``snapshot``: O(tasks * nodes)."""
    plan = Plan()
    nodes = sorted(snapshot.nodes.values(), key=lambda n: n.id)
    per_node, per_service, reserved = _counts(snapshot.tasks.values())
    for task in sorted(pending, key=lambda t: (t.service_name, t.slot, t.id)):
        rejected: Counter[str] = Counter()
        candidates: list[Node] = []
        for node in nodes:
            why = rejection(node, task, reserved[node.id], per_service[(node.id, task.service_id)])
            if why is not None:
                rejected[why] += 1
            else:
                candidates.append(node)
        if not candidates:
            plan.unschedulable.append((task.id, explain(task, rejected, len(nodes))))
            continue
        labels = [p.spread[len("node.labels."):] for p in task.spec.placement.preferences]
        static = [n for n in nodes if all(f(n, task, reserved[n.id]) is None
                                          for f in FILTERS[:3])]
        sid = task.service_id
        in_group: Counter[tuple[str, ...]] = Counter()  # tasks of the service per label group
        for m in static:
            for level in range(len(labels)):
                in_group[_group(m, labels, level)] += per_service[(m.id, sid)]
        best = min(
            candidates,
            key=lambda n: (*(in_group[_group(n, labels, i)] for i in range(len(labels))),
                           per_service[(n.id, sid)], per_node[n.id], n.id),
        )
        plan.assignments.append((task.id, best.id))
        per_node[best.id] += 1
        per_service[(best.id, task.service_id)] += 1
        reserved[best.id].memory += task.spec.resources.reservations.memory
        reserved[best.id].cpu += task.spec.resources.reservations.cpu
        _add_generic(reserved[best.id], task)
    return plan


def _add_generic(r: Reserved, t: Task) -> None:
    for kind, n in t.spec.resources.reservations.generic_resources.items():
        r.generic[kind.lower()] = r.generic.get(kind.lower(), 0) + n
