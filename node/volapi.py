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

from typing import Any

from shoal.node import crud
from shoal.node.context import NodeContext
from shoal.node.crud import BodyReader, Handler, ObjectsApi
from shoal.node.errors import NotFound
from shoal.raft import templates
from shoal.raft.models import Volume, resolve_mount
from shoal.raft.state import Snapshot


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


_FIELDS = {"name": str, "driver": str, "options": dict, "labels": dict}


class VolumesApi(ObjectsApi):
    def ls(self) -> list[dict[str, Any]]:
        snap = self._snap()
        return [volume_view(v, snap) for _, v in sorted(snap.volumes.items())]

    def inspect(self, name: str) -> dict[str, Any]:
        snap = self._snap()
        vol = snap.volumes.get(name)
        if vol is None:
            raise NotFound(f"no such volume: {name}", "volume")
        return volume_view(vol, snap)

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        cmd = self._create_command("volume_create", body, _FIELDS)
        await self.ctx.propose(cmd)
        return self.inspect(cmd["name"])

    async def remove(self, name: str) -> dict[str, Any]:
        vol = self._snap().volumes.get(name)
        if vol is None:
            raise NotFound(f"no such volume: {name}", "volume")
        await self.ctx.propose({"op": "volume_remove", "name": name})
        return {"id": vol.id, "name": vol.name, "removed": True}


def handlers(ctx: NodeContext, body: BodyReader) -> dict[str, Handler]:
    """/v1/volumes: create, ls, inspect, rm (the API server's handlers)."""
    return crud.handlers("volume", VolumesApi(ctx), body)


__all__ = ["VolumesApi", "handlers", "resolve_mount", "volume_view"]
