"""The cluster state machine: applies commands to nodes, services and tasks.

Owns: the in-memory cluster state and the *only* code that mutates it (``apply``).
It is pure and deterministic: no I/O, no clock (timestamps come inside commands), no
randomness (ids come inside commands). Every replica applies the same log to the same
state. Must not touch: pysyncobj (see shoal.raft.store), the network, the runtime.

A command is a dict ``{"op": NAME, ...}``. ``apply`` never raises: a refused command
returns ``{"error": {"code", "message", "field"}}`` (pysyncobj wedges a replica whose
replicated method raises), a good one ``{"ok": True, ...}``.

Who may write what (swarmkit's split):

* users (via any manager's API): cluster_init, node_add/update/remove, service_*
* the leader's controllers: ``leader`` batches of task_create / task_desired /
  task_assign / task_delete / node_state, fenced by Raft term: a batch whose term is
  lower than the highest term already seen is refused, so a deposed leader that still
  believes it leads cannot overwrite its successor's decisions.
* agents: task_status for tasks assigned to their own node, merged forward only.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from shoal.raft.errors import StoreError, ValidationError
from shoal.raft.models import (
    Node,
    NodeAvailability,
    NodeRole,
    NodeState,
    Service,
    Task,
    TaskState,
    node_from_dict,
    spec_from_dict,
    status_from_dict,
    task_from_dict,
)
from shoal.raft.validate import validate_replicas, validate_spec

NODE_ID_RE = re.compile(r"^[a-z0-9]{1,64}$")

# Bound on tasks created/changed by one leader batch; keeps log entries small.
MAX_BATCH_OPS = 5000


class Rejected(StoreError):
    def __init__(self, code: str, message: str, field: str = "") -> None:
        super().__init__(message, field)
        self.code = code


@dataclass
class ClusterInfo:
    cluster_id: str = ""
    created_at: float = 0.0
    # join-token secrets per role; tokens are compared in constant time by the API
    worker_secret: str = ""
    manager_secret: str = ""
    # digest embedded in tokens (cluster id hash now, CA digest with the security issue)
    digest: str = ""


@dataclass
class Snapshot:
    """An immutable-enough copy handed to readers (records are frozen dataclasses)."""

    index: int
    cluster: ClusterInfo
    nodes: dict[str, Node]
    services: dict[str, Service]
    tasks: dict[str, Task]

    def service_by_name(self, name: str) -> Service | None:
        for s in self.services.values():
            if s.spec.name == name:
                return s
        return None

    def tasks_of(self, service_id: str) -> list[Task]:
        return [t for t in self.tasks.values() if t.service_id == service_id]


@dataclass
class ClusterState:
    index: int = 0  # number of commands applied (successful or not)
    fence_term: int = 0  # highest Raft term seen on a leader batch
    cluster: ClusterInfo = field(default_factory=ClusterInfo)
    nodes: dict[str, Node] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> Snapshot:
        return Snapshot(
            index=self.index,
            cluster=dataclasses.replace(self.cluster),
            nodes=dict(self.nodes),
            services=dict(self.services),
            tasks=dict(self.tasks),
        )

    # ------------------------------------------------------------------ writing
    def apply(self, cmd: Any) -> dict[str, Any]:
        """Apply one command; never raises."""
        self.index += 1
        try:
            if not isinstance(cmd, dict):
                raise Rejected("invalid", "command must be a map")
            op = cmd.get("op")
            handler = _HANDLERS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise Rejected("invalid", f"unknown op {op!r}", "op")
            result = handler(self, cmd)
            return {"ok": True, **(result or {})}
        except Rejected as exc:
            return {"error": {"code": exc.code, "message": exc.message, "field": exc.field}}
        except ValidationError as exc:
            return {"error": {"code": exc.code, "message": exc.message, "field": exc.field}}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return {"error": {"code": "invalid", "message": f"malformed command: {exc!r}",
                              "field": ""}}

    # --- cluster
    def _cluster_init(self, cmd: dict[str, Any]) -> None:
        if self.cluster.cluster_id:
            raise Rejected("exists", "this node is already part of a cluster")
        self.cluster = ClusterInfo(
            cluster_id=str(cmd["cluster_id"]),
            created_at=float(cmd["now"]),
            worker_secret=str(cmd["worker_secret"]),
            manager_secret=str(cmd["manager_secret"]),
            digest=str(cmd["digest"]),
        )

    def _rotate_secret(self, cmd: dict[str, Any]) -> None:
        role = NodeRole(cmd["role"])
        if role is NodeRole.WORKER:
            self.cluster = replace(self.cluster, worker_secret=str(cmd["secret"]))
        else:
            self.cluster = replace(self.cluster, manager_secret=str(cmd["secret"]))

    # --- nodes
    def _node_add(self, cmd: dict[str, Any]) -> None:
        node = node_from_dict(cmd["node"])
        if not NODE_ID_RE.match(node.id):
            raise Rejected("invalid", f"node id {node.id!r} is invalid", "node.id")
        now = float(cmd["now"])
        for other in self.nodes.values():
            if (other.id != node.id and other.addr == node.addr
                    and other.api_port == node.api_port and other.state is not NodeState.DOWN):
                raise Rejected(
                    "exists", f"address {node.api_addr} is already used by node {other.id}",
                    "addr")
        old = self.nodes.get(node.id)
        created = old.created_at if old else now
        self.nodes[node.id] = replace(node, created_at=created, updated_at=now,
                                      state=NodeState.READY)

    def _node_update(self, cmd: dict[str, Any]) -> None:
        node = self._node(cmd["id"])
        changes: dict[str, Any] = {}
        if "availability" in cmd:
            changes["availability"] = NodeAvailability(cmd["availability"])
        if "role" in cmd:
            changes["role"] = NodeRole(cmd["role"])
        if "labels" in cmd:
            changes["labels"] = dict(cmd["labels"])
        self.nodes[node.id] = replace(node, updated_at=float(cmd["now"]), **changes)

    def _node_remove(self, cmd: dict[str, Any]) -> None:
        node = self._node(cmd["id"])
        if node.state is NodeState.READY and not cmd.get("force"):
            raise Rejected("conflict", f"node {node.hostname} ({node.id}) is ready: "
                           "stop its agent or make it leave first, or use --force", "id")
        del self.nodes[node.id]
        # its tasks can never report again: make them eligible for replacement/removal
        for t in list(self.tasks.values()):
            if t.node_id == node.id and not t.status.state.terminal:
                self.tasks[t.id] = replace(
                    t, desired_state=max(t.desired_state, TaskState.SHUTDOWN),
                    status=replace(t.status, state=TaskState.ORPHANED,
                                   message="node removed", timestamp=float(cmd["now"])))

    def _node(self, node_id: Any) -> Node:
        if not isinstance(node_id, str):
            raise Rejected("invalid", "node id must be a string", "id")
        node = self.nodes.get(node_id)
        if node is None:
            raise Rejected("not_found", f"no such node: {node_id}", "id")
        return node

    # --- services
    def _service_create(self, cmd: dict[str, Any]) -> dict[str, Any]:
        spec = validate_spec(cmd["spec"])
        sid = str(cmd["id"])
        if sid in self.services:
            raise Rejected("exists", f"service id {sid} already exists", "id")
        for s in self.services.values():
            if s.spec.name == spec.name:
                raise Rejected("exists", f"a service named {spec.name!r} already exists", "name")
        now = float(cmd["now"])
        self.services[sid] = Service(id=sid, spec=spec, version=1, created_at=now, updated_at=now)
        return {"id": sid}

    def _service_update(self, cmd: dict[str, Any]) -> dict[str, Any]:
        svc = self._service(cmd["id"])
        expected = cmd.get("version")
        if expected is not None and expected != svc.version:
            raise Rejected("conflict", f"service {svc.spec.name} was changed meanwhile "
                           f"(version {svc.version}, expected {expected}); retry", "version")
        if "spec" in cmd:
            spec = validate_spec(cmd["spec"])
            if spec.name != svc.spec.name:
                raise Rejected("invalid", "a service cannot be renamed", "name")
        else:
            spec = replace(svc.spec, replicas=validate_replicas(cmd["replicas"]))
        if spec == svc.spec:
            return {"id": svc.id, "version": svc.version}
        self.services[svc.id] = replace(svc, spec=spec, version=svc.version + 1,
                                        previous_spec=svc.spec, updated_at=float(cmd["now"]))
        return {"id": svc.id, "version": svc.version + 1}

    def _service_remove(self, cmd: dict[str, Any]) -> None:
        svc = self._service(cmd["id"])
        del self.services[svc.id]
        now = float(cmd["now"])
        for t in list(self.tasks.values()):
            if t.service_id == svc.id:
                self.tasks[t.id] = replace(t, desired_state=TaskState.REMOVE, updated_at=now)

    def _service(self, sid: Any) -> Service:
        if not isinstance(sid, str):
            raise Rejected("invalid", "service id must be a string", "id")
        svc = self.services.get(sid)
        if svc is None:
            raise Rejected("not_found", f"no such service: {sid}", "id")
        return svc

    # --- leader batches (fenced)
    def _leader(self, cmd: dict[str, Any]) -> dict[str, Any]:
        term = int(cmd["term"])
        if term < self.fence_term:
            raise Rejected("stale_term", f"leader term {term} is older than {self.fence_term}",
                           "term")
        self.fence_term = term
        ops = cmd["ops"]
        if not isinstance(ops, list) or len(ops) > MAX_BATCH_OPS:
            raise Rejected("invalid", "ops must be a list of at most "
                           f"{MAX_BATCH_OPS} operations", "ops")
        now = float(cmd["now"])
        applied = 0
        for op in ops:
            kind = op[0]
            if kind == "create":
                t = task_from_dict(op[1])
                if t.id in self.tasks or t.service_id not in self.services:
                    continue
                self.tasks[t.id] = replace(t, created_at=now, updated_at=now)
            elif kind == "desired":
                t = self.tasks.get(op[1])
                if t is None:
                    continue
                want = TaskState(op[2])
                if want > t.desired_state:  # desired state only moves forward too
                    self.tasks[t.id] = replace(t, desired_state=want, updated_at=now)
            elif kind == "assign":
                t = self.tasks.get(op[1])
                if t is None or t.node_id or op[2] not in self.nodes:
                    continue
                self.tasks[t.id] = replace(
                    t, node_id=op[2], sched_message="", updated_at=now,
                    status=replace(t.status, state=TaskState.ASSIGNED, timestamp=now,
                                   message="scheduled"))
            elif kind == "unschedulable":
                t = self.tasks.get(op[1])
                if t is None or t.node_id:
                    continue
                self.tasks[t.id] = replace(
                    t, sched_message=str(op[2]),
                    status=replace(t.status, state=TaskState.PENDING, timestamp=now,
                                   message=str(op[2])))
            elif kind == "orphan":
                t = self.tasks.get(op[1])
                if t is None or t.status.state.terminal:
                    continue
                self.tasks[t.id] = replace(
                    t, desired_state=max(t.desired_state, TaskState.SHUTDOWN), updated_at=now,
                    status=replace(t.status, state=TaskState.ORPHANED, timestamp=now,
                                   message=str(op[2])))
            elif kind == "delete":
                self.tasks.pop(op[1], None)
            elif kind == "node_state":
                n = self.nodes.get(op[1])
                if n is None:
                    continue
                self.nodes[n.id] = replace(n, state=NodeState(op[2]), message=str(op[3]),
                                           updated_at=now)
            else:
                raise Rejected("invalid", f"unknown leader op {kind!r}", "ops")
            applied += 1
        return {"applied": applied}

    # --- agents
    def _task_status(self, cmd: dict[str, Any]) -> dict[str, Any]:
        t = self.tasks.get(cmd["task_id"])
        if t is None:
            raise Rejected("not_found", f"no such task: {cmd['task_id']}", "task_id")
        if t.node_id != cmd["node_id"]:
            raise Rejected("forbidden", f"task {t.id} is not assigned to node {cmd['node_id']}",
                           "node_id")
        status = status_from_dict(cmd["status"])
        if status.state < t.status.state:
            return {"changed": False}  # older observation: keep the greater (ordered states)
        if status.state == t.status.state and status == t.status:
            return {"changed": False}
        self.tasks[t.id] = replace(t, status=status, updated_at=float(cmd["now"]))
        return {"changed": True}


_HANDLERS: dict[str, Callable[[ClusterState, dict[str, Any]], dict[str, Any] | None]] = {
    "cluster_init": ClusterState._cluster_init,
    "rotate_secret": ClusterState._rotate_secret,
    "node_add": ClusterState._node_add,
    "node_update": ClusterState._node_update,
    "node_remove": ClusterState._node_remove,
    "service_create": ClusterState._service_create,
    "service_update": ClusterState._service_update,
    "service_remove": ClusterState._service_remove,
    "leader": ClusterState._leader,
    "task_status": ClusterState._task_status,
}

__all__ = ["ClusterInfo", "ClusterState", "Snapshot", "spec_from_dict"]
