"""What the user API's create / ls / inspect / rm object families share (networks, volumes).

Owns: ``ObjectsApi`` (the base of such a family's command class: a manager's snapshot, the
shape check of a create request into its Raft command), ``handlers`` (the four aiohttp
handlers of a family, named ``KIND_ls``/``KIND_create``/``KIND_inspect``/``KIND_rm`` as in
shoal.node.openapi's route table). Must not touch: a family's own rules and views (its module:
shoal.node.netapi, shoal.node.volapi), the route table, the API server's middlewares.

Errors: ``BadRequest`` naming the field of a create request (node/errors.py); the state
machine's refusals arrive translated by ``NodeContext.propose``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web

from shoal.node.context import NodeContext, new_id
from shoal.node.errors import BadRequest
from shoal.raft.state import Snapshot

Handler = Callable[[web.Request], Awaitable[Any]]
BodyReader = Callable[[web.Request], Awaitable[dict[str, Any]]]

_TYPE_NAMES = {str: "string", bool: "boolean", dict: "map of strings"}


class Family(Protocol):
    """A family's commands, as the handlers call them (``ref``: a name, or an id / id prefix
    where the family has them)."""

    def ls(self) -> Any: ...
    def inspect(self, ref: str, /) -> Any: ...
    async def create(self, body: dict[str, Any], /) -> Any: ...
    async def remove(self, ref: str, /) -> Any: ...


class ObjectsApi:
    """The base of a family's command class: reads on a manager, create commands."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    def _snap(self) -> Snapshot:
        return self.ctx.require_manager().snapshot()

    def _create_command(self, op: str, body: dict[str, Any], fields: Mapping[str, type]
                        ) -> dict[str, Any]:
        """``{"op", "id", "now"}`` and each of ``fields`` the request has (field → type; a
        dict is a map of strings); BadRequest naming a field of the wrong type, or a missing
        name. On a manager only."""
        self.ctx.require_manager()
        cmd: dict[str, Any] = {"op": op, "id": new_id(), "now": time.time()}
        for key, tp in fields.items():
            value = body.get(key)
            if value is None:
                continue
            if not isinstance(value, tp) or (isinstance(value, dict) and not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
                raise BadRequest(f"{key} must be a {_TYPE_NAMES.get(tp, tp.__name__)}", key)
            cmd[key] = value
        if "name" not in cmd:
            raise BadRequest("name is required", "name")
        return cmd


def handlers(kind: str, family: Family, body: BodyReader) -> dict[str, Handler]:
    """The API server's handlers of /v1/KINDs: ls, create, inspect and rm (``{ref}``)."""

    async def ls(_: web.Request) -> Any:
        return family.ls()

    async def create(req: web.Request) -> Any:
        return await family.create(await body(req))

    async def inspect(req: web.Request) -> Any:
        return family.inspect(req.match_info["ref"])

    async def rm(req: web.Request) -> Any:
        return await family.remove(req.match_info["ref"])

    return {f"{kind}_ls": ls, f"{kind}_create": create, f"{kind}_inspect": inspect,
            f"{kind}_rm": rm}


__all__ = ["BodyReader", "Family", "Handler", "ObjectsApi", "handlers"]
