"""JSON views of cluster objects: the stable field names of the API and `--format json`.

Owns: the shape users and scripts see (documented in docs/api.md), and naming a task as
users do (``find_task``: id, id prefix, SERVICE.SLOT[.ID]). Changing a field
name here is a breaking change. Must not touch: the store (it gets snapshots).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

from shoal.node.errors import Conflict, NotFound
from shoal.raft import generic
from shoal.raft.models import JobRun, Node, NodeRole, Service, Task, TaskState, to_dict
from shoal.raft.spec import Reservations
from shoal.raft.state import Snapshot


class RaftView(Protocol):
    def leader_addr(self) -> str | None: ...
    def peer_connected(self, addr: str) -> bool: ...
    @property
    def self_addr(self) -> str | None: ...


def manager_status(node: Node, store: RaftView) -> str:
    if node.role is not NodeRole.MANAGER:
        return ""
    if node.raft_addr == store.leader_addr():
        return "leader"
    if node.raft_addr == store.self_addr or store.peer_connected(node.raft_addr):
        return "reachable"
    return "unreachable"


def node_view(node: Node, snap: Snapshot, store: RaftView, detail: bool = False,
              gossip: dict[str, str] | None = None,
              metas: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """``metas``: node id → its gossip metadata, where each agent announces its version
    (shoal.node.version); "unknown" for a node gossip has not heard of, or one of shoal 0.1,
    which announced none."""
    running = sum(1 for t in snap.tasks.values()
                  if t.node_id == node.id and t.status.state is TaskState.RUNNING)
    out: dict[str, Any] = {
        "id": node.id,
        "hostname": node.hostname,
        "addr": node.addr,
        "role": node.role.value,
        "state": node.state.value,
        "availability": node.availability.value,
        "manager_status": manager_status(node, store),
        "message": node.message,
        "tasks": running,
        "membership": (gossip or {}).get(node.id, "unknown"),
        "version": str((metas or {}).get(node.id, {}).get("version") or "unknown"),
        "labels": dict(node.labels),  # (`node ls -f label=K=V`)
    }
    if detail:
        from shoal.node.scheduler import holds
        reserved = [t.spec.resources.reservations for t in snap.tasks.values()
                    if t.node_id == node.id and holds(t)]
        out.update(api_port=node.api_port, raft_port=node.raft_port,
                   gossip_port=node.gossip_port,
                   # (Docker's Description.Platform; "" = not reported yet: a node that
                   # joined below schema 11 until its agent describes it)
                   platform={"os": "linux", "architecture": node.arch},
                   # what it reported (at join, kept current by its agent: node_describe),
                   # and what its live tasks reserve of it (the scheduler's "insufficient
                   # memory 4/4" is against these)
                   resources={"memory_bytes": node.memory_bytes, "cpus": node.cpus,
                              "reserved_memory_bytes": sum(r.memory for r in reserved),
                              "reserved_cpus": round(sum(r.cpu for r in reserved), 3),
                              # (Swarm's: kind → count or named IDs; what tasks reserve per
                              # kind, lower case: kinds ignore case, shoal.raft.generic)
                              "generic_resources": dict(node.generic_resources),
                              "reserved_generic_resources": _generic_reserved(reserved)},
                   created_at=node.created_at, updated_at=node.updated_at)
    return out


def _generic_reserved(reserved: list[Reservations]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reserved:
        for kind, n in generic.reserved(r.generic_resources).items():
            out[kind] = out.get(kind, 0) + n
    return dict(sorted(out.items()))


def service_view(svc: Service, snap: Snapshot, detail: bool = False) -> dict[str, Any]:
    """``replicas``: the tasks wanted (global: the eligible nodes; jobs: the completions to
    reach); ``running``: those up; jobs add ``completed`` and ``failed`` (tasks of the
    current run that exited 0 / failed); scheduled jobs add ``schedule`` (its next run, the
    last one, and with ``detail`` the kept history of runs)."""
    from shoal.node.orchestrator import of_current_run
    tasks = snap.tasks_of(svc.id)
    mode = svc.spec.mode
    if mode.per_node:
        from shoal.node.orchestrator import eligible_nodes
        where = set(eligible_nodes(svc, snap.nodes))
        if mode.job:  # a node that completed its task and left the eligible set counts too
            where |= {t.node_id for t in tasks if t.status.state is TaskState.COMPLETE
                      and of_current_run(t, svc)}
        wanted = len(where)
    else:
        wanted = svc.spec.replicas
    out: dict[str, Any] = {
        "id": svc.id,
        "name": svc.spec.name,
        "labels": dict(svc.spec.labels),  # (`service ls -f label=K=V`)
        "mode": mode.type,
        "replicas": wanted,
        # (as Swarm's REPLICAS: a task still starting its health check, or unhealthy, is not
        # counted)
        "running": sum(1 for t in tasks if t.status.up and t.desired_state <= TaskState.RUNNING),
        "max_replicas_per_node": svc.spec.task.placement.max_replicas,  # (0: no limit)
        "image": svc.spec.task.container.image,  # ("" = the host's filesystem)
        "command": list(svc.spec.task.container.command),
        "version": svc.version,
        "vip": svc.vip,
        "ports": [{"published": p.published, "target": p.target, "protocol": p.protocol,
                   **({"host_ip": p.host_ip} if p.host_ip else {})}
                  for p in svc.spec.endpoint.ports],
        "created_at": svc.created_at,
        "updated_at": svc.updated_at,
        "update_status": to_dict(svc.update_status),
    }
    if mode.job:
        current = [t for t in tasks if of_current_run(t, svc)]
        out["completed"] = sum(1 for t in current if t.status.state is TaskState.COMPLETE)
        out["failed"] = sum(1 for t in current if t.status.state in (TaskState.FAILED,
                                                                     TaskState.REJECTED))
        out["max_concurrent"] = mode.concurrency if not mode.per_node else 0
        # the current run as a whole: "failed" once every slot that did not complete will
        # not be retried (its restart policy gave up) — a waiting CLI ends there, exit 1
        from shoal.node.cron import run_progress
        state, _, _, message = run_progress(
            svc, JobRun(scheduled_at=0.0, iteration=svc.job_status.iteration), current,
            snap.nodes, time.time(), latest=True)
        out["job_state"], out["job_message"] = state, message
    if mode.scheduled:  # (shoal.node.cron)
        from shoal.node.cron import next_time
        job = svc.job_status
        try:
            nxt: float | None = next_time(mode.schedule, max(time.time(), job.last_scheduled,
                                                              svc.created_at))
        except ValueError:  # (its schedule gives no more times)
            nxt = None
        out["schedule"] = {
            "cron": mode.schedule.cron, "timezone": mode.schedule.timezone or "UTC",
            "policy": mode.schedule.policy, "next_run": nxt,
            "last_run": to_dict(job.runs[-1]) if job.runs else None}
        if detail:
            out["schedule"]["runs"] = [to_dict(r) for r in job.runs]
    if mode.autoscale.enabled or svc.autoscale.decisions:  # (shoal.node.autoscale)
        out["autoscale"] = {**to_dict(mode.autoscale), "enabled": mode.autoscale.enabled,
                            "decisions": [to_dict(d) for d in svc.autoscale.decisions]}
    if detail:
        out["spec"] = to_dict(svc.spec)
        out["previous_spec"] = to_dict(svc.previous_spec) if svc.previous_spec else None
        # the health of its running tasks that have a check, with their last results
        out["health"] = [{"task": t.id, "name": t.name, "health": str(t.status.health),
                          "failing_streak": t.status.failing_streak,
                          "log": [to_dict(r) for r in t.status.health_log]}
                         for t in sorted(tasks, key=lambda t: (t.slot, t.id))
                         if t.status.state is TaskState.RUNNING and t.status.health]
        # a pod's containers (node/pod.py) in its running tasks
        out["containers"] = [{"task": t.id, "name": t.name,
                              "containers": [to_dict(c) for c in t.status.containers]}
                             for t in sorted(tasks, key=lambda t: (t.slot, t.id))
                             if t.status.state is TaskState.RUNNING and t.status.containers]
    return out


def desired_shown(t: Task, snap: Snapshot) -> str:
    """A task's desired state as Swarm shows it: one that ended while still wanted running
    (failed, rejected, exited, lost) is shown Shutdown — the orchestrator is done with it
    and replaces it or not per the restart policy — and a job's completion Complete."""
    if t.desired_state <= TaskState.RUNNING and t.status.state.terminal:
        svc = snap.services.get(t.service_id)
        if t.status.state is TaskState.COMPLETE and svc is not None and svc.spec.mode.job:
            return "complete"
        return "shutdown"
    return t.desired_state.lower()


def task_view(t: Task, snap: Snapshot) -> dict[str, Any]:
    node = snap.nodes.get(t.node_id)
    return {
        "id": t.id,
        "name": t.name,
        "service": t.service_name,
        "service_id": t.service_id,
        "slot": t.slot,
        "node_id": t.node_id,
        "node": node.hostname if node else "",
        "desired_state": desired_shown(t, snap),
        "state": t.status.state.lower(),
        "message": t.status.message,
        "error": t.status.err,
        "exit_code": t.status.exit_code,
        "pid": t.status.pid,
        "addr": t.status.addr,
        "health": str(t.status.health),
        "failing_streak": t.status.failing_streak,
        "health_log": [to_dict(r) for r in t.status.health_log],
        "containers": [to_dict(c) for c in t.status.containers],  # a pod's (node/pod.py)
        "service_version": t.service_version,
        "image": t.spec.container.image,  # ("" = the node's own filesystem)
        "created_at": t.created_at,
        "updated_at": t.updated_at,
        "state_since": t.status.timestamp,
    }


def task_views(tasks: list[Task], snap: Snapshot) -> list[dict[str, Any]]:
    order = sorted(tasks, key=lambda t: (t.slot, -t.created_at, t.id))
    return [task_view(t, snap) for t in order]


def find_task(snap: Snapshot, ref: str) -> Task:
    """The task ``ref`` names: its id, Docker's container name ``SERVICE.SLOT.ID``, the running
    task of ``SERVICE.SLOT`` (a global service's: ``SERVICE.NODEID``, as `service ps` shows
    it), or a unique id prefix of 4+ characters; a service's name in any case, as it is
    found (Snapshot.service_by_name). NotFound / Conflict (ambiguous)."""
    tasks = snap.tasks
    if ref in tasks:
        return tasks[ref]
    last, name = ref.rsplit(".", 1)[-1], ref.lower()
    if "." in ref and last in tasks and tasks[last].name.lower() == name.rsplit(".", 1)[0]:
        return tasks[last]
    named = [t for t in tasks.values() if t.name.lower() == name]
    if named:
        running = [t for t in named if t.status.state is TaskState.RUNNING]
        return (running or sorted(named, key=lambda t: t.created_at))[-1]
    if len(ref) >= 4:
        matches = [t for tid, t in tasks.items() if tid.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise Conflict(f"task id prefix {ref!r} is ambiguous ({len(matches)} tasks)",
                           "task")
    raise NotFound(f"no task {ref!r} (give a task id, SERVICE.SLOT as `service ps` shows "
                   "it, or an id prefix of 4+ characters)", "task")
