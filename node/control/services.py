"""Service commands: create, update, scale, rollback, remove, and the ls/inspect/ps/logs views.

Owns: turning a user's service request into a validated command proposed to the cluster
state (the leader's orchestrator and scheduler act on it from there, node/leader.py), and
the JSON views of services and their tasks. Managers only (``require_manager``).
Must not touch: placement or task lifecycle (the leader's and the workers'), the runtime
(live usage and logs come through shoal.node.transfer), HTTP.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from shoal.node import transfer, views
from shoal.node.context import NodeContext, new_id
from shoal.node.errors import BadRequest, Conflict, NotFound, from_store_error
from shoal.node.hostaccess import host_access
from shoal.node.secrets import check_refs
from shoal.node.transfer import Transfer
from shoal.node.users import require_admin
from shoal.node.views import find_task
from shoal.raft import templates
from shoal.raft.errors import SpecError, StoreError, ValidationError
from shoal.raft.models import Service, ServiceSpec, TaskState, to_dict
from shoal.raft.spec import MAIN_CONTAINER, Autoscale, check_files, docker_file_defaults
from shoal.raft.state import Snapshot
from shoal.raft.validate import validate_replicas, validate_spec


def find_service(snap: Snapshot, ref: str) -> Service:
    """A service by name, id, or unique id prefix (4+ characters)."""
    svc = snap.service_by_name(ref) or snap.services.get(ref)
    if svc is None:
        matches = [s for s in snap.services.values() if s.id.startswith(ref)] if len(
            ref) >= 4 else []
        if len(matches) == 1:
            return matches[0]
        raise NotFound(f"no such service: {ref}", "service")
    return svc


def file_defaults(spec: ServiceSpec, previous: ServiceSpec | None, schema: int) -> ServiceSpec:
    """``spec`` with its secrets' and configs' references as the cluster writes them at
    ``schema`` (shoal.raft.spec.docker_file_defaults: from schema 11, Docker's place and owner
    for a new reference, explicitly, and the current form for one the service has, whose
    files must not move; ``previous``: the service's current spec, None for a new one).
    ValidationError if the result is not a valid spec (two files at one path)."""
    c = spec.task.container
    before = previous.task.container if previous is not None else None
    secrets = docker_file_defaults(c.secrets, "secret", before.secrets if before else (), schema)
    configs = docker_file_defaults(c.configs, "config", before.configs if before else (), schema)
    if secrets != c.secrets or configs != c.configs:
        raw = to_dict(spec)
        raw["task"]["container"].update(secrets=msgspec.to_builtins(secrets),
                                        configs=msgspec.to_builtins(configs))
        spec = validate_spec(raw)
    try:  # (a file name at a mount's target too: the spec's rule spares what schema 10 took)
        check_files(spec.task.container)
    except SpecError as exc:
        raise ValidationError(f"task.container.{exc.message}",
                              f"task.container.{exc.field}") from None
    return spec


class Services:
    def __init__(self, ctx: NodeContext, transfer: Transfer) -> None:
        self.ctx = ctx
        self.transfer = transfer  # live usage (ps) and logs of tasks on every node
        # pins a spec's image tag to its registry digest (shoal.node.registries); None = off
        self.resolve_image: Callable[[ServiceSpec, Any, ServiceSpec | None],
                                     Awaitable[tuple[ServiceSpec, list[str]]]] | None = None

    @staticmethod
    def _admin_if_host_access(spec: ServiceSpec) -> None:
        """A spec reaching beyond its sandbox (shoal.node.hostaccess) is an admin's: 403."""
        access = host_access(spec)
        if access is not None:
            field, what = access
            require_admin(what, field)

    async def _resolve(self, spec: ServiceSpec, mode: Any, previous: ServiceSpec | None
                       ) -> tuple[ServiceSpec, list[str]]:
        if self.resolve_image is None:
            return spec, []
        return await self.resolve_image(spec, mode, previous)

    def find_service(self, snap: Snapshot, ref: str) -> Service:
        return find_service(snap, ref)

    async def _current(self, ref: str) -> tuple[Snapshot, Service]:
        """The service a write names: from this replica's copy, or — when this copy does
        not know it (a follower a little behind the write that created it) — after a read
        barrier (shoal.raft.store), so a service just created elsewhere is found."""
        snap = self.ctx.require_manager().snapshot()
        try:
            return snap, self.find_service(snap, ref)
        except NotFound:
            snap = (await self.ctx.read_manager()).snapshot()
            return snap, self.find_service(snap, ref)

    def services(self) -> list[dict[str, Any]]:
        snap = self.ctx.require_manager().snapshot()
        return [views.service_view(s, snap) for s in
                sorted(snap.services.values(), key=lambda s: s.spec.name)]

    def service(self, ref: str) -> dict[str, Any]:
        snap = self.ctx.require_manager().snapshot()
        return views.service_view(self.find_service(snap, ref), snap, detail=True)

    async def tasks(self, ref: str) -> list[dict[str, Any]]:
        """`service ps`: the service's tasks, with live resource use of the running ones."""
        snap = self.ctx.require_manager().snapshot()
        svc = self.find_service(snap, ref)
        out = views.task_views(snap.tasks_of(svc.id), snap)
        by_node: dict[str, list[str]] = {}
        for t in out:
            if t["state"] == "running" and t["node_id"]:
                by_node.setdefault(t["node_id"], []).append(t["id"])
        usage = await transfer.cluster_usage(self.transfer, by_node,
                                             transfer.LISTING_USAGE_TIMEOUT, listing=True)
        for t in out:
            t["usage"] = usage.get(t["id"])
        return out

    async def node_tasks(self, ref: str) -> list[dict[str, Any]]:
        """`node ps`: the tasks on a node (``self``: this one), every service's, newest
        first per slot, with live resource use of the running ones."""
        from shoal.node.control.nodes import find_node
        snap = self.ctx.require_manager().snapshot()
        node = find_node(snap, self.ctx.node_id if ref == "self" else ref)
        tasks = [t for t in snap.tasks.values() if t.node_id == node.id]
        tasks.sort(key=lambda t: (t.service_name, t.slot, -t.created_at, t.id))
        out = [views.task_view(t, snap) for t in tasks]
        running = [t["id"] for t in out if t["state"] == "running"]
        usage = await transfer.cluster_usage(self.transfer, {node.id: running} if running
                                             else {}, transfer.LISTING_USAGE_TIMEOUT,
                                             listing=True)
        for t in out:
            t["usage"] = usage.get(t["id"])
        return out

    async def stats(self, services: list[str], nodes: list[str]) -> list[dict[str, Any]]:
        """`shoal stats`: the running tasks (of ``services``, on ``nodes``: names, ids or
        prefixes; all when empty) with their live resource use, and what it is a share of
        (``memory_limit``, ``cpu_limit``): the task's limits, else its node's memory and CPUs,
        as `docker stats` shows the host's for a container without a limit."""
        from shoal.node.control.nodes import find_node
        snap = self.ctx.require_manager().snapshot()
        svc_ids = {find_service(snap, ref).id for ref in services}
        node_ids = {find_node(snap, self.ctx.node_id if ref == "self" else ref).id
                    for ref in nodes}
        tasks = sorted((t for t in snap.tasks.values() if t.node_id
                        and t.status.state is TaskState.RUNNING
                        and (not svc_ids or t.service_id in svc_ids)
                        and (not node_ids or t.node_id in node_ids)),
                       key=lambda t: (t.service_name, t.slot, t.id))
        by_node: dict[str, list[str]] = {}
        for t in tasks:
            by_node.setdefault(t.node_id, []).append(t.id)
        usage = await transfer.cluster_usage(self.transfer, by_node,
                                             transfer.LISTING_USAGE_TIMEOUT, listing=True)
        out = []
        for t in tasks:
            node, limits = snap.nodes.get(t.node_id), t.spec.resources.limits
            out.append({**views.task_view(t, snap), "usage": usage.get(t.id),
                        "memory_limit": limits.memory or (node.memory_bytes if node else 0),
                        "cpu_limit": limits.cpu or (node.cpus if node else 0.0)})
        return out

    def logs(self, ref: str, tail: int | None, since: float | None, timestamps: bool,
             follow: bool, container: str = "") -> AsyncIterator[dict[str, Any]]:
        """`service logs`: the merged logs of the service's tasks on every node (of one
        container of each task's pod: ``container``, "" = the main one); ``ref`` may name
        one task instead (docker's `service logs TASK`: its id, an id prefix,
        SERVICE.SLOT[.ID] as `service ps` shows it)."""
        snap = self.ctx.require_manager().snapshot()
        task_id = ""
        try:
            svc = self.find_service(snap, ref)
        except NotFound:
            try:
                task = find_task(snap, ref)
            except (NotFound, Conflict):
                raise NotFound(f"no such service or task: {ref}", "service") from None
            found = snap.services.get(task.service_id)
            if found is None:
                raise NotFound(f"the service of task {ref} is gone", "service") from None
            svc, task_id = found, task.id
        if container and container != MAIN_CONTAINER and container not in {
                c.name for c in svc.spec.task.sidecars + svc.spec.task.init_containers}:
            raise BadRequest(f"service {svc.spec.name} has no container {container!r}",
                             "container")
        return transfer.service_logs(self.transfer, svc.id, tail, since, timestamps, follow,
                                     container, task_id)

    async def create_service(self, spec: Any, resolve_image: Any = None) -> dict[str, Any]:
        snap = self.ctx.require_manager().snapshot()
        try:
            parsed = file_defaults(validate_spec(spec), None, snap.cluster.schema)
        except StoreError as exc:
            raise from_store_error(exc) from exc
        if snap.service_by_name(parsed.name):
            raise Conflict(f"a service named {parsed.name!r} already exists", "name",
                           code="exists")
        check_refs(snap, parsed)
        _check_new(parsed)
        self._admin_if_host_access(parsed)
        parsed, warnings = await self._resolve(parsed, resolve_image, None)
        sid = new_id()
        await self.ctx.propose({"op": "service_create", "id": sid, "now": time.time(),
                                "spec": to_dict(parsed)})
        return {"id": sid, "name": parsed.name, "image": parsed.task.container.image,
                **({"warnings": warnings} if warnings else {})}

    async def scale_service(self, ref: str, replicas: Any, version: Any = None
                            ) -> dict[str, Any]:
        """Set the replica count; with ``version``, only if the service is still at it
        (compare-and-set, checked by the state machine: 409 conflict otherwise)."""
        _, svc = await self._current(ref)
        if svc.spec.mode.per_node:
            raise BadRequest(f"service {svc.spec.name} is {svc.spec.mode.type}: scale works "
                             "only with the replicated and replicated-job modes", "replicas")
        try:
            n = validate_replicas(replicas)
        except StoreError as exc:
            raise from_store_error(exc) from exc
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise BadRequest("version must be an integer", "version")
        cmd: dict[str, Any] = {"op": "service_update", "id": svc.id, "now": time.time(),
                               "replicas": n}
        if version is not None:
            cmd["version"] = version
        res = await self.ctx.propose(cmd)
        return {"id": svc.id, "name": svc.spec.name, "replicas": n,
                "version": res.get("version")}

    async def update_service(self, ref: str, spec: Any, version: Any,
                             resolve_image: Any = None) -> dict[str, Any]:
        """Replace a service's spec; running tasks are replaced by a rolling update."""
        snap, svc = await self._current(ref)
        try:
            parsed = file_defaults(validate_spec(spec), svc.spec, snap.cluster.schema)
        except StoreError as exc:
            raise from_store_error(exc) from exc
        if version is not None and not isinstance(version, int):
            raise BadRequest("version must be an integer", "version")
        if parsed.mode.type != svc.spec.mode.type:  # (as Swarm: remove and create it again)
            raise BadRequest(f"the mode of service {svc.spec.name} cannot change "
                             f"({svc.spec.mode.type} to {parsed.mode.type}): remove the "
                             "service and create it again", "mode.type")
        check_refs(snap, parsed)
        _check_new(parsed)
        self._admin_if_host_access(parsed)  # (also one it had: a new image runs with it)
        parsed, warnings = await self._resolve(parsed, resolve_image, svc.spec)
        res = await self.ctx.propose({"op": "service_update", "id": svc.id, "now": time.time(),
                                      "spec": to_dict(parsed), "version": version})
        return {"id": svc.id, "name": svc.spec.name, "version": res.get("version"),
                "image": parsed.task.container.image,
                **({"warnings": warnings} if warnings else {})}

    async def rollback_service(self, ref: str) -> dict[str, Any]:
        snap = self.ctx.require_manager().snapshot()
        svc = self.find_service(snap, ref)
        if svc.previous_spec is None:
            raise BadRequest(f"service {svc.spec.name} has no previous spec to roll back to",
                             "service")
        previous = svc.previous_spec
        if previous.mode.autoscale.enabled and svc.spec.mode.autoscale.enabled:
            # (the replica count is the autoscaler's now, not the one the spec had then)
            previous = msgspec.structs.replace(previous, mode=msgspec.structs.replace(
                previous.mode, replicas=svc.spec.mode.replicas))
        res = await self.ctx.propose({"op": "service_update", "id": svc.id, "now": time.time(),
                                      "spec": to_dict(previous),
                                      "version": svc.version, "rollback": True})
        return {"id": svc.id, "name": svc.spec.name, "version": res.get("version")}

    async def remove_service(self, ref: str) -> dict[str, Any]:
        _, svc = await self._current(ref)
        await self.ctx.propose({"op": "service_remove", "id": svc.id, "now": time.time()})
        return {"id": svc.id, "name": svc.spec.name, "removed": True}


# croniter's "R" (a random value, R or R(1-30) in a field; not the R of MAR or FRI)
_RANDOM_CRON = re.compile(r"(?:^|[\s,/])R(?:\(|$|[\s,/])", re.IGNORECASE)


def _check_new(spec: ServiceSpec) -> None:
    """What a new spec may not say, though specs stored before may (checked here, not by the
    state machine, which must keep accepting what older replicas accepted): max replicas per
    node in a global mode, where it never applied (docker refuses it too)."""
    if spec.mode.per_node and spec.task.placement.max_replicas:
        raise BadRequest(f"max replicas per node applies to the replicated modes only (a "
                         f"{spec.mode.type} service runs one task per node)",
                         "task.placement.max_replicas")
    auto = spec.mode.autoscale
    if not auto.enabled and auto != Autoscale():  # (its max left out: it would be off)
        raise BadRequest("autoscaling needs its largest replica count: give max=N (or "
                         "turn it off with --autoscale none)", "mode.autoscale.max")
    if spec.mode.scheduled and _RANDOM_CRON.search(spec.mode.schedule.cron):
        raise BadRequest(f"{spec.mode.schedule.cron!r}: R (a random value) picks another "
                         "time at every reading, so leaders would disagree: give the "
                         "value itself", "mode.schedule.cron")
    # placeholders (Docker's {{.Node.Hostname}}…) in env values and mounts: checked here,
    # as older replicas take any text there (the host name's are the spec's own check)
    c = spec.task.container
    texts = [(f"task.container.env.{k}", v) for k, v in c.env.items()] + \
        [(f"task.container.mounts[{i}].{part}", getattr(m, part))
         for i, m in enumerate(c.mounts) for part in ("source", "target")] + \
        [(f"task.{kind}[{i}].env.{k}", v) for kind in ("sidecars", "init_containers")
         for i, x in enumerate(getattr(spec.task, kind)) for k, v in x.env.items()]
    for field, text in texts:
        if templates.has_placeholders(text):
            try:
                templates.check(text)
            except ValueError as exc:
                raise BadRequest(str(exc), field) from None


__all__ = ["Services", "find_service"]
