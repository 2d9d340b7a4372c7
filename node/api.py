"""The agent's HTTP/JSON API.

Owns: routes and the error contract. Two listeners:

* a unix socket ``DATA_DIR/shoal.sock`` (mode 0600, root only) for the CLI: every
  user-facing route;
* TCP ``ADVERTISE_ADDR:API_PORT`` for other nodes: only ``/v1/cluster/*`` (join,
  heartbeat). (mTLS arrives with the security issue.)

Every error is ``{"error": {"code", "message", "field"}}`` with a fitting status; a
request body that is not a JSON object is a 400, never a crash. Must not touch: policy —
handlers call Agent methods and serialise what they return.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from shoal.node.errors import ApiError, BadRequest

if TYPE_CHECKING:
    from shoal.node.agent import Agent

log = logging.getLogger("shoal.api")
Handler = Callable[[web.Request], Awaitable[Any]]
MAX_BODY = 1 << 20


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("request body is not valid JSON", "body") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", "body")
    return data


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        result = await handler(request)
    except ApiError as exc:
        return _json(exc.to_json(), exc.status)
    except web.HTTPException as exc:
        return _json({"error": {"code": "http", "message": exc.reason, "field": ""}},
                     exc.status)
    except Exception as exc:
        log.exception("internal error on %s %s", request.method, request.path)
        return _json({"error": {"code": "internal", "message": f"internal error: {exc}",
                                "field": ""}}, 500)
    if isinstance(result, web.StreamResponse):
        return result
    return _json(result)


class ApiServer:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._runners: list[web.AppRunner] = []

    def local_app(self) -> web.Application:
        a = self.agent
        app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY)
        r = app.router

        async def info(_: web.Request) -> Any:
            return a.info()

        async def init(_: web.Request) -> Any:
            return await a.init()

        async def join(req: web.Request) -> Any:
            body = await _body(req)
            token, remote = body.get("token"), body.get("remote")
            if not isinstance(token, str) or not token:
                raise BadRequest("token is required", "token")
            if not isinstance(remote, str) or not remote:
                raise BadRequest("manager address is required (ADDR:PORT)", "remote")
            return await a.join(token, remote)

        async def join_token(req: web.Request) -> Any:
            role = req.match_info["role"]
            if req.method == "POST":
                return {"role": role, "token": await a.rotate_token(role)}
            return {"role": role, "token": a.join_token(role)}

        async def leave(req: web.Request) -> Any:
            body = await _body(req)
            return await a.leave(bool(body.get("force", False)))

        async def nodes(_: web.Request) -> Any:
            return a.nodes()

        async def node(req: web.Request) -> Any:
            return a.node(req.match_info["ref"])

        async def node_rm(req: web.Request) -> Any:
            return await a.remove_node(req.match_info["ref"], req.query.get("force") == "1")

        async def node_update(req: web.Request) -> Any:
            return await a.update_node(req.match_info["ref"], await _body(req))

        async def services(_: web.Request) -> Any:
            return a.services()

        async def service_create(req: web.Request) -> Any:
            body = await _body(req)
            return await a.create_service(body.get("spec", body))

        async def service(req: web.Request) -> Any:
            return a.service(req.match_info["ref"])

        async def service_tasks(req: web.Request) -> Any:
            return a.tasks(req.match_info["ref"])

        async def service_scale(req: web.Request) -> Any:
            body = await _body(req)
            if "replicas" not in body:
                raise BadRequest("replicas is required", "replicas")
            return await a.scale_service(req.match_info["ref"], body["replicas"])

        async def service_update(req: web.Request) -> Any:
            body = await _body(req)
            if "spec" not in body:
                raise BadRequest("spec is required", "spec")
            return await a.update_service(req.match_info["ref"], body["spec"],
                                          body.get("version"))

        async def service_rollback(req: web.Request) -> Any:
            return await a.rollback_service(req.match_info["ref"])

        async def service_rm(req: web.Request) -> Any:
            return await a.remove_service(req.match_info["ref"])

        r.add_get("/v1/info", info)
        r.add_post("/v1/swarm/init", init)
        r.add_post("/v1/swarm/join", join)
        r.add_get("/v1/swarm/join-token/{role}", join_token)
        r.add_post("/v1/swarm/join-token/{role}", join_token)
        r.add_post("/v1/swarm/leave", leave)
        r.add_get("/v1/nodes", nodes)
        r.add_get("/v1/nodes/{ref}", node)
        r.add_delete("/v1/nodes/{ref}", node_rm)
        r.add_post("/v1/nodes/{ref}", node_update)
        r.add_get("/v1/services", services)
        r.add_post("/v1/services", service_create)
        r.add_get("/v1/services/{ref}", service)
        r.add_get("/v1/services/{ref}/tasks", service_tasks)
        r.add_post("/v1/services/{ref}/scale", service_scale)
        r.add_post("/v1/services/{ref}/update", service_update)
        r.add_post("/v1/services/{ref}/rollback", service_rollback)
        r.add_delete("/v1/services/{ref}", service_rm)
        return app

    def peer_app(self) -> web.Application:
        a = self.agent
        app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY)

        async def join(req: web.Request) -> Any:
            body = await _body(req)
            return await a.accept_join(body.get("token"), body.get("node"))

        async def heartbeat(req: web.Request) -> Any:
            body = await _body(req)
            node_id = body.get("node_id")
            if not isinstance(node_id, str):
                raise BadRequest("node_id is required", "node_id")
            a.record_heartbeat(node_id)
            return {"ok": True}

        app.router.add_post("/v1/cluster/join", join)
        app.router.add_post("/v1/cluster/heartbeat", heartbeat)
        return app

    async def start(self) -> None:
        cfg = self.agent.config
        sock = cfg.socket_path
        sock.unlink(missing_ok=True)
        local = web.AppRunner(self.local_app(), access_log=None)
        await local.setup()
        old = os.umask(0o177)
        try:
            await web.UnixSite(local, str(sock)).start()
        finally:
            os.umask(old)
        os.chmod(sock, 0o600)
        peer = web.AppRunner(self.peer_app(), access_log=None)
        await peer.setup()
        await web.TCPSite(peer, cfg.bind_addr, cfg.api_port, reuse_address=True).start()
        self._runners = [local, peer]

    async def stop(self) -> None:
        for r in self._runners:
            await r.cleanup()
        self.agent.config.socket_path.unlink(missing_ok=True)
