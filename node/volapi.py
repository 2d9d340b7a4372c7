"""Named volumes: the user API (``shoal volume create/ls/inspect/rm``).

Owns: the shape check of a ``volume create`` request before it is proposed (the state
machine checks the driver and options with shoal.runtime.volumes and refuses duplicates),
the views of volumes (with the services using each), ``volume rm`` (refused by the state
machine while a service or a live task uses the volume). A task's ``--mount
type=volume,src=NAME`` without options of its own takes the created volume's driver and
options: shoal.raft.models.resolve_mount (re-exported here; the worker and the scheduler
call it). Must not touch: mounting (the runtime's, shoal.runtime.volumes), Raft internals.

Options name secrets (``IdentityFile-secret=NAME``) and never hold their values, so a view
shows them whole.
"""

from __future__ import annotations

import os
from typing import Any

from shoal.node import crud
from shoal.node.context import NodeContext
from shoal.node.crud import BodyReader, Handler, ObjectsApi
from shoal.node.errors import Conflict, NotFound
from shoal.node.hostaccess import volume_access
from shoal.node.users import require_admin
from shoal.raft import templates
from shoal.raft.models import TaskState, Volume, resolve_mount
from shoal.raft.state import Snapshot
from shoal.runtime.controller import Controller
from shoal.runtime.errors import VolumeInUse
from shoal.runtime.taskvols import anon_name

_ARCH = os.uname().machine  # {{.Node.Platform.Architecture}} of this node (as the worker's)


def volume_view(vol: Volume, snap: Snapshot | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": vol.id, "name": vol.name, "driver": vol.driver,
                           "options": dict(vol.options), "labels": dict(vol.labels),
                           "scope": "global" if vol.driver != "local" or vol.options
                           else "local", "created_at": vol.created_at}
    if snap is not None:
        out["services"] = sorted(
            s.spec.name for s in snap.services.values()
            if any(m.type == "volume" and templates.could_be(m.source, vol.name)
                   for m in s.spec.task.container.mounts))
    return out


def implicit_volumes(snap: Snapshot) -> dict[str, dict[str, Any]]:
    """Volumes without a record that live tasks mount (``--mount type=volume,src=NAME``
    without ``volume create``, as Docker makes them): name → view, each with the services
    and the nodes (hostnames) that use it. A templated source counts as each task's name
    (``data-{{.Task.Slot}}`` → data-1, data-2)."""
    found: dict[str, dict[str, Any]] = {}
    # (only the tasks of services that mount a volume without a record: `volume ls` on a
    # big cluster is not a walk over every task)
    users = [sid for sid, svc in snap.services.items()
             if any(m.type == "volume" and (templates.has_placeholders(m.source)
                                            or m.source not in snap.volumes)
                    for m in svc.spec.task.container.mounts)]
    for task in (t for sid in users for t in snap.tasks_of(sid)):
        mounts = [m for m in task.spec.container.mounts if m.type == "volume"]
        if not mounts or not task.node_id or task.status.state.terminal or \
                task.desired_state > TaskState.RUNNING:
            continue
        node = snap.nodes.get(task.node_id)
        hostname = node.hostname if node is not None else task.node_id
        # (.Node.Platform.Architecture: nodes do not record theirs; this one's is assumed)
        values = templates.task_values(task, hostname, _ARCH)
        svc = snap.services.get(task.service_id)
        labels = dict(svc.spec.labels) if svc is not None else {}
        for m in mounts:
            if not m.source:  # (an anonymous volume: named as its node names it)
                try:
                    target = templates.expand(m.target, values, labels)
                except ValueError:
                    target = m.target
                name = anon_name(task.id, target)
                found[name] = {"id": "", "name": name, "driver": "local", "options": {},
                               "labels": {}, "scope": "local", "created_at": None,
                               "implicit": True, "anonymous": True, "target": target,
                               "services": {task.service_name}, "nodes": {hostname}}
                continue
            try:  # (in lower case, as the node fills it in: shoal.node.worker)
                name = templates.expand(m.source, values, labels).lower()
            except ValueError:  # (a spec from before placeholders: taken as text)
                name = m.source
            if name in snap.volumes:
                continue
            driver, options = resolve_mount(m, snap.volumes)
            view = found.setdefault(name, {
                "id": "", "name": name, "driver": driver, "options": options, "labels": {},
                "scope": "global" if driver != "local" or options else "local",
                "created_at": None, "implicit": True, "services": set(), "nodes": set()})
            view["services"].add(task.service_name)
            view["nodes"].add(hostname)
    for view in found.values():
        view["services"], view["nodes"] = sorted(view["services"]), sorted(view["nodes"])
    return found


_FIELDS = {"name": str, "driver": str, "options": dict, "labels": dict}


class VolumesApi(ObjectsApi):
    def __init__(self, ctx: NodeContext, runtime: Controller | None = None) -> None:
        super().__init__(ctx)
        self.runtime = runtime  # (this node's: its anonymous volumes)

    def _local(self, snap: Snapshot, found: dict[str, dict[str, Any]]) -> None:
        """This node's anonymous volumes into ``found`` (Docker's `volume ls` is a node's):
        each with the runtime's tasks that mount it (``tasks``: an exited task kept in the
        history holds its volume too) and that task's service; one no task mounts is an
        orphan that ``volume prune`` removes."""
        for name, rec in (self.runtime.anonymous_volumes() if self.runtime else {}).items():
            task = snap.tasks.get(str(rec["task"]).split("-", 1)[0]) or \
                snap.tasks.get(str(rec["task"]))
            view = found.setdefault(name, {
                "id": "", "name": name, "driver": "local", "options": {}, "labels": {},
                "scope": "local", "created_at": None, "anonymous": True,
                "target": rec["target"], "services": [task.service_name] if task else [],
                "nodes": [self.ctx.hostname]})
            view["tasks"] = list(rec["users"])

    def ls(self) -> list[dict[str, Any]]:
        """The created volumes, the implicit and anonymous ones live tasks mount (the
        anonymous ones of this node's tasks whatever their state), by name."""
        snap = self._snap()
        views = {name: volume_view(v, snap) for name, v in snap.volumes.items()}
        found = implicit_volumes(snap)
        self._local(snap, found)
        return [view for _, view in sorted({**found, **views}.items())]

    def inspect(self, name: str) -> dict[str, Any]:
        snap = self._snap()
        vol = snap.volumes.get(name)
        if vol is None:
            found = implicit_volumes(snap)
            self._local(snap, found)
            if name in found:
                return found[name]
            raise NotFound(f"no such volume: {name}", "volume")
        return volume_view(vol, snap)

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        cmd = self._create_command("volume_create", body, _FIELDS)
        why = volume_access(cmd.get("driver", ""), cmd.get("options") or {})
        if why:  # (an operator must not make the node mount its disks or any share)
            require_admin(why, "options")
        await self.ctx.propose(cmd)
        return self.inspect(cmd["name"])

    async def remove(self, name: str) -> dict[str, Any]:
        snap = self._snap()
        vol = snap.volumes.get(name)
        if vol is None:
            implicit = implicit_volumes(snap).get(name)
            if implicit is not None:  # (its directories go with the tasks' nodes' data)
                raise Conflict(f"volume {name} is in use by service "
                               f"{', '.join(implicit['services'])} (on "
                               f"{', '.join(implicit['nodes'])})", "volume", code="in_use")
            try:  # (this node's anonymous volume no task uses any more)
                if self.runtime is not None and \
                        await self.runtime.remove_anonymous_volume(name):
                    return {"id": "", "name": name, "removed": True}
            except VolumeInUse as exc:
                raise Conflict(str(exc), "volume", code="in_use") from exc
            raise NotFound(f"no such volume: {name}", "volume")
        await self.ctx.propose({"op": "volume_remove", "name": name})
        return {"id": vol.id, "name": vol.name, "removed": True}


def handlers(ctx: NodeContext, body: BodyReader, runtime: Controller | None = None
             ) -> dict[str, Handler]:
    """/v1/volumes: create, ls, inspect, rm (the API server's handlers); ``runtime``: this
    node's, whose anonymous volumes they show and remove too."""
    return crud.handlers("volume", VolumesApi(ctx, runtime), body)


__all__ = ["VolumesApi", "handlers", "implicit_volumes", "resolve_mount", "volume_view"]
