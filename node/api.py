"""The agent's HTTP/JSON API.

Owns: routes and the error contract. Its listeners:

* a unix socket ``DATA_DIR/shoal.sock`` (mode 0600, root only) for the CLI: every
  user-facing route;
* optionally (``--remote-api-port``) the same routes on TCP over mutual TLS, for client
  certificates of the cluster (``shoal ca issue-client``) that were not revoked;
* TCP ``ADVERTISE_ADDR:API_PORT`` for other nodes: only ``/v1/cluster/*``, over TLS
  with the cluster's certificates. The CA fetch and join work without a client
  certificate (the join token authenticates); every other route requires the client
  certificate of a current member (mutual TLS), and some a manager's.

Which routes each listener serves is declared once, in shoal.node.openapi's route table:
``register`` adds them with the handlers below (by operation id) and refuses to start on a
mismatch, and ``GET /v1/openapi.json`` (every listener of the CLI's routes) serves the
OpenAPI 3.1 description made from the same table.

Every error is ``{"error": {"code", "message", "field"}}`` with a fitting status; a
request body that is not a JSON object is a 400, never a crash. Must not touch: policy —
routes only: handlers take the request apart, call the command modules (shoal.node.control),
the components listed in ``Controls`` or this node's ``Lifecycle`` (init/join/leave, the
role switch: the agent, which it never imports), and serialise what they return.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp import web

from shoal.node import crud, execs, imageapi, openapi, transfer, volapi
from shoal.node.config import AgentConfig
from shoal.node.context import NodeContext
from shoal.node.control.admission import Admission
from shoal.node.control.dispatcher import Dispatcher
from shoal.node.control.events import Events
from shoal.node.control.nodes import Nodes
from shoal.node.control.roles import Roles
from shoal.node.control.services import Services
from shoal.node.errors import ApiError, BadRequest, NotFound, TooManyRequests, http_error
from shoal.node.health import ExecHelper
from shoal.node.limits import ClientLimits
from shoal.node.membership import GossipControl
from shoal.node.metrics import Metrics, serve_metrics
from shoal.node.mqtt import MqttSettings
from shoal.node.netapi import NetworksApi
from shoal.node.pki import CertInfo, peer_info
from shoal.node.registries import Registries
from shoal.node.secrets import SecretsApi
from shoal.node.security import Security
from shoal.node.transfer import Transfer
from shoal.node.users import REQUEST_USER, ROOT, Users, require_admin
from shoal.runtime.controller import Controller
from shoal.runtime.images import ImageStore

if TYPE_CHECKING:  # (image build's modules load at the first build: test_lazy_imports)
    from shoal.runtime.buildnet import RunNetwork

log = logging.getLogger("shoal.api")
Handler = Callable[[web.Request], Awaitable[Any]]
# checks a request to route ``op`` before its handler (roles: shoal.node.users); raises ApiError
Guard = Callable[[web.Request, str], str]  # the user it let by
MAX_BODY = 1 << 20
# On stop, how long requests still in progress (a followed log, a worker's held state poll)
# may take before they are cancelled, seconds. aiohttp's default is 60 s; an agent stopping
# for a restart must be quick (shoal.node.shutdown).
STOP_GRACE = 0.5
# The integers msgpack (the Raft log's encoding) can hold: a request with a larger one is
# refused naming its field, not turned into a command that cannot be written.
_INT_RANGE = (-(2**63), 2**64 - 1)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("request body is not valid JSON", "body") from None
    except RecursionError:  # (json's C decoder recurses per nesting level)
        raise BadRequest("request body is nested too deeply", "body") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", "body")
    where = _int_out_of_range(data)
    if where is not None:
        raise BadRequest("a number out of range (integers fit in 64 bits)", where)
    return data


def _int_out_of_range(body: dict[str, Any]) -> str | None:
    """The path (``labels.k[0]``) of an integer in a parsed JSON body outside _INT_RANGE, or
    None. A loop, not recursion: the body may nest as deep as json's decoder allows."""
    low, high = _INT_RANGE
    stack: list[tuple[Any, str]] = [(v, str(k)) for k, v in body.items()]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            stack.extend((v, f"{path}.{k}") for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value))
        elif isinstance(value, int) and not low <= value <= high:
            return path
    return None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        result = await handler(request)
    except web.HTTPException as exc:
        reply = _json({"error": {"code": "http", "message": exc.reason, "field": ""}},
                      exc.status)
        if exc.status == 413:
            # A body over MAX_BODY: answer, then hang up instead of reading the rest to
            # throw it away (aiohttp would, for up to 10 s: a 1 GiB upload costs a core).
            reply.force_close()
            await reply.prepare(request)
            await reply.write_eof()
            if request.protocol is not None:
                request.protocol.force_close()
        return reply
    except Exception as exc:
        status, code, message, field = http_error(exc)  # the one mapping: node/errors.py
        if status >= 500 and status != 503:
            log.exception("internal error on %s %s", request.method, request.path)
        reply = _json({"error": {"code": code, "message": message, "field": field}}, status)
        if isinstance(exc, TooManyRequests):
            reply.headers["Retry-After"] = str(exc.retry_after)
        return reply
    if isinstance(result, web.StreamResponse):
        return result
    return _json(result)


def register(app: web.Application, listener: openapi.Listener,
             handlers: Mapping[str, Handler]) -> None:
    """Add ``listener``'s routes of the one route table (shoal.node.openapi.ROUTES), each
    with the handler named by its ``op``. A route without a handler or a handler without a
    route is refused here, at startup: what is served is what /v1/openapi.json describes."""
    table = openapi.routes(listener)
    ops = {r.op for r in table}
    missing, unrouted = sorted(ops - handlers.keys()), sorted(handlers.keys() - ops)
    if missing or unrouted:
        raise RuntimeError(f"{listener} API: no handler for {missing}, no route for {unrouted}")
    for r in table:
        if r.method == "GET":  # with HEAD, as aiohttp's add_get does
            app.router.add_get(r.path, handlers[r.op])
        else:
            app.router.add_route(r.method, r.path, handlers[r.op])


def _version(request: web.Request, body: dict[str, Any]) -> Any:
    """A service write's version precondition: the body's ``version``, else ``?version=N``."""
    if body.get("version") is not None:
        return body["version"]
    if not (q := request.query.get("version")):
        return None
    if not (q.isascii() and q.isdigit()):
        raise BadRequest("version must be a whole number", "version")
    return int(q)


def linearized(handler: Handler, ctx: NodeContext) -> Handler:
    """``handler`` (a read of cluster state) after the read barrier, unless ``?stale=1``."""
    async def read(request: web.Request) -> Any:
        await ctx.read_manager(stale=request.query.get("stale") == "1")
        return await handler(request)
    return read


def guarded(handler: Handler, op: str, guard: Guard) -> Handler:
    """``handler`` once ``guard(request, op)`` let its user by (then users.REQUEST_USER)."""
    async def checked(request: web.Request) -> Any:
        REQUEST_USER.set(guard(request, op))
        return await handler(request)
    return checked


def peer_of(request: web.Request) -> CertInfo | None:
    """The identity in the client certificate TLS verified on this connection, if any."""
    transport = request.transport
    return None if transport is None else peer_info(transport.get_extra_info("peercert"))


def tls_listener(current: Callable[[], ssl.SSLContext | None], require_client_cert: bool
                 ) -> ssl.SSLContext:
    """A listening context that hands every new connection to the node's *current* context
    (``current()``): None before init/join (the handshake fails: nothing to serve), a fresh
    one after a certificate renewal or a rejoin (other CA) — without restarting the listener
    or touching open connections."""
    base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    base.minimum_version = ssl.TLSVersion.TLSv1_2
    # OpenSSL keeps the verify mode of the context a connection started with
    base.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL

    def pick(conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext
             ) -> int | None:
        ctx = current()
        if ctx is None:
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        conn.context = ctx
        return None

    base.sni_callback = pick
    return base


async def stream_ndjson(req: web.Request,
                       records: AsyncIterator[dict[str, Any]]) -> web.StreamResponse:
    """Stream records as JSON lines; an ApiError before the first record is a normal error
    reply, one after it ends the stream."""
    it = aiter(records)
    try:
        first = await anext(it)
    except StopAsyncIteration:
        first = None
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(req)
    try:
        if first is not None:
            await resp.write((json.dumps(first) + "\n").encode())
            async for rec in it:
                await resp.write((json.dumps(rec) + "\n").encode())
    except (ConnectionResetError, aiohttp.ClientError, ApiError):
        return resp  # the client went away, or the source failed mid-stream
    with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
        await resp.write_eof()
    return resp


async def stream_events(req: web.Request, records: AsyncIterator[dict[str, Any]],
                        keepalive: float, stopping: asyncio.Event) -> web.StreamResponse:
    """Stream event records as JSON lines, or as server-sent events when the client asks
    (``Accept: text/event-stream``: ``id:`` = the cursor, ``event:`` = the type, a comment
    every ``keepalive`` seconds while idle). Headers go out at once: a live stream may stay
    quiet for long. Ends when the records end, the client goes away (checked every second
    while idle) or the server stops (``stopping``)."""
    sse = "text/event-stream" in req.headers.get("Accept", "")
    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream" if sse else "application/x-ndjson",
        "Cache-Control": "no-cache"})
    await resp.prepare(req)
    it = aiter(records)
    nxt: asyncio.Future[Any] | None = None
    stop: asyncio.Future[Any] = asyncio.ensure_future(stopping.wait())
    idle = 0.0
    try:
        while not stopping.is_set():
            if nxt is None:
                nxt = asyncio.ensure_future(anext(it))
            done, _ = await asyncio.wait({nxt, stop}, timeout=1.0,
                                         return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                if req.transport is None or req.transport.is_closing():
                    break  # the client went away
                idle += 1.0
                if sse and idle >= keepalive:
                    idle = 0.0
                    await resp.write(b": keepalive\n\n")
                continue
            idle = 0.0
            try:
                rec = nxt.result()
            except StopAsyncIteration:
                nxt = None
                break
            nxt = None
            if sse:
                await resp.write(f"id: {rec['cursor']}\nevent: {rec['type']}\ndata: "
                                 f"{json.dumps(rec)}\n\n".encode())
            else:
                await resp.write((json.dumps(rec) + "\n").encode())
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
            await resp.write_eof()
    except (ConnectionResetError, aiohttp.ClientError):
        pass  # the client went away
    finally:
        stop.cancel()
        if nxt is not None and not nxt.done():
            nxt.cancel()
            with contextlib.suppress(BaseException):
                await nxt
        with contextlib.suppress(Exception):
            await it.aclose()  # type: ignore[attr-defined]
    return resp


class Lifecycle(Protocol):
    """This node's own membership (the agent implements it)."""

    def info(self) -> dict[str, Any]: ...
    async def init(self, cluster_cidr: str = "", default_addr_pool: str = ""
                   ) -> dict[str, Any]: ...
    async def join(self, token: str, remote: str) -> dict[str, Any]: ...
    async def leave(self, force: bool) -> dict[str, Any]: ...
    async def role_changed(self, peer: CertInfo | None, role: Any) -> dict[str, Any]: ...


@dataclass
class Controls:
    """What the routes call: this node's lifecycle, the command modules, the components."""

    lifecycle: Lifecycle
    services: Services
    nodes: Nodes
    roles: Roles
    admission: Admission
    dispatcher: Dispatcher
    security: Security
    secrets: SecretsApi
    gossip: GossipControl
    transfer: Transfer
    runtime: Controller
    images: ImageStore
    events: Events
    metrics: Metrics
    registries: Registries  # registry login, image pull, resolve (node/registries.py)
    networks: NetworksApi
    # image ids the cluster wants on this node (`image prune` keeps them; node/imagegc.py)
    images_wanted: Callable[[], set[str]] = set
    # attaches `image build`'s RUN steps to the task network (node/buildnet.py; None: lo only)
    build_network: RunNetwork | None = None
    exec_helper: ExecHelper = field(default_factory=lambda: ExecHelper(None))  # (+ checks)


class ApiServer:
    def __init__(self, config: AgentConfig, controls: Controls) -> None:
        self.config = config
        self.c = controls
        self._runners: list[web.AppRunner] = []
        self._stopping = asyncio.Event()  # ends open event streams when the server stops
        # per-client request limits of each listener (shoal.node.limits): a flood gets 429s
        self.limits = {name: ClientLimits(config.api_limits)
                       for name in ("local", "remote", "peer", "metrics", "dashboard")}
        self.users = Users(controls.services.ctx)  # users and roles (shoal.node.users)
        # `shoal exec` (shoal.node.execs): the CLI's route and the peer route managers relay to
        self._exec_local, self._exec_peer = execs.handlers(
            controls.services.ctx, controls.runtime, controls.security,
            execs.Executor(controls.exec_helper), peer_of)

    def local_app(self, remote: bool = False, guard: Guard | None = None,
                  limits: str = "") -> web.Application:
        """The CLI's routes: on the unix socket, and (``remote``) on the remote API port,
        where every request needs a current client certificate of the cluster. ``guard``
        checks each request's identity and role first (the remote API's users, the
        dashboard's sessions: shoal.node.users); without one (the unix socket) all is
        allowed."""
        c = self.c
        a = c.lifecycle
        middlewares: list[Any] = [c.metrics.middleware(), error_middleware, self.limits[
            limits or ("remote" if remote else "local")].middleware()]
        if remote and guard is None:
            guard = self.remote_guard
        if remote:
            @web.middleware
            async def client_auth(request: web.Request, handler: Handler) -> Any:
                c.security.authorize_client(peer_of(request))
                return await handler(request)
            middlewares.append(client_auth)
        middlewares.append(c.security.keys.middleware())  # a locked node: info/unlock only
        app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)

        async def info(req: web.Request) -> Any:
            out = a.info()
            raft = c.services.ctx.raft
            if req.query.get("digest") == "1" and raft is not None:  # the fault suite's check
                index, blob = raft.full_state()
                out["state_digest"] = {"index": index,
                                       "sha256": hashlib.sha256(blob).hexdigest()}
            return out

        async def init(req: web.Request) -> Any:
            body = await _body(req)
            cidr = body.get("cluster_cidr", "") or ""
            if not isinstance(cidr, str):
                raise BadRequest("cluster_cidr must be a string like 10.99.0.0/16",
                                 "cluster_cidr")
            pool = body.get("default_addr_pool", "") or ""
            if not isinstance(pool, str):
                raise BadRequest("default_addr_pool must be a string like 10.96.0.0/15",
                                 "default_addr_pool")
            return await a.init(cidr, pool)

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
                return {"role": role, "token": await c.admission.rotate_token(role)}
            return {"role": role, "token": c.admission.join_token(role)}

        async def leave(req: web.Request) -> Any:
            body = await _body(req)
            return await a.leave(bool(body.get("force", False)))

        nodes_, roles, svcs = c.nodes, c.roles, c.services

        async def nodes(_: web.Request) -> Any:
            return await nodes_.nodes()

        async def node(req: web.Request) -> Any:
            return await nodes_.node(req.match_info["ref"])

        async def node_rm(req: web.Request) -> Any:
            return await nodes_.remove_node(req.match_info["ref"],
                                            req.query.get("force") == "1")

        async def node_update(req: web.Request) -> Any:
            body = await _body(req)
            if "role" in body:  # `node update --role` is promote/demote: an admin's
                require_admin("changing a node's role (promote, demote)", "role")
                await roles.set_role(req.match_info["ref"], body.pop("role"))
                if not body:
                    return await nodes_.node(req.match_info["ref"])
            return await nodes_.update_node(req.match_info["ref"], body)

        async def node_promote(req: web.Request) -> Any:
            return await roles.set_role(req.match_info["ref"], "manager")

        async def node_demote(req: web.Request) -> Any:
            return await roles.set_role(req.match_info["ref"], "worker")

        async def services(_: web.Request) -> Any:
            return svcs.services()

        async def service_create(req: web.Request) -> Any:
            body = await _body(req)
            return await svcs.create_service(body.get("spec", body),
                                             body.get("resolve_image") if "spec" in body
                                             else None)

        async def service(req: web.Request) -> Any:
            return svcs.service(req.match_info["ref"])

        async def service_tasks(req: web.Request) -> Any:
            return await svcs.tasks(req.match_info["ref"])

        async def node_tasks(req: web.Request) -> Any:
            return await svcs.node_tasks(req.match_info["ref"])

        async def stats(req: web.Request) -> Any:
            return await svcs.stats(req.query.getall("service", []),
                                    req.query.getall("node", []))

        async def service_scale(req: web.Request) -> Any:
            body = await _body(req)
            if "replicas" not in body:
                raise BadRequest("replicas is required", "replicas")
            return await svcs.scale_service(req.match_info["ref"], body["replicas"],
                                            _version(req, body))

        async def service_update(req: web.Request) -> Any:
            body = await _body(req)
            if "spec" not in body:
                raise BadRequest("spec is required", "spec")
            return await svcs.update_service(req.match_info["ref"], body["spec"],
                                             _version(req, body), body.get("resolve_image"))

        async def service_rollback(req: web.Request) -> Any:
            return await svcs.rollback_service(req.match_info["ref"])

        async def service_logs(req: web.Request) -> web.StreamResponse:
            q = req.query
            try:
                tail = int(q["tail"]) if q.get("tail") not in (None, "", "all") else None
                since = float(q["since"]) if q.get("since") else None
            except ValueError:
                raise BadRequest("tail must be a whole number and since a time in seconds",
                                 "tail") from None
            follow = q.get("follow") == "1"
            records = svcs.logs(req.match_info["ref"], tail, since,
                                q.get("timestamps") == "1", follow, q.get("container", ""))
            return await stream_ndjson(req, records)

        async def service_rm(req: web.Request) -> Any:
            return await svcs.remove_service(req.match_info["ref"])

        async def openapi_doc(_: web.Request) -> Any:
            return web.Response(text=openapi.openapi_json(), content_type="application/json")

        async def events(req: web.Request) -> web.StreamResponse:
            q = req.query
            since = q.get("since") or req.headers.get("Last-Event-ID") or None
            records = c.events.stream(since, q.get("until") or None, q.getall("filter", []))
            return await stream_events(req, records, c.events.log.config.keepalive,
                                       self._stopping)

        async def metrics(req: web.Request) -> web.StreamResponse:
            return await serve_metrics(c.metrics, req)

        handlers: dict[str, Handler] = {
            "openapi": openapi_doc, "info": info, "swarm_init": init, "swarm_join": join,
            "swarm_join_token": join_token, "swarm_join_token_rotate": join_token,
            "swarm_leave": leave,
            "node_ls": nodes, "node_inspect": node, "node_rm": node_rm,
            "node_update": node_update, "node_promote": node_promote,
            "node_demote": node_demote, "node_ps": node_tasks, "stats": stats,
            "service_ls": services, "service_create": service_create,
            "service_inspect": service, "service_ps": service_tasks,
            "service_scale": service_scale, "service_update": service_update,
            "service_rollback": service_rollback, "service_logs": service_logs,
            "service_rm": service_rm, "events": events, "metrics": metrics,
            **imageapi.handlers(c.images, c.runtime, c.registries, c.images_wanted, _body,
                                stream_ndjson, c.build_network),
            **self._secret_handlers(), **self._gossip_handlers(), **self._ca_handlers(),
            **self._network_handlers(), **self._mqtt_handlers(), **self._user_handlers(),
            **volapi.handlers(svcs.ctx, _body, c.runtime), **self._exec_local,
            **c.security.keys.local_handlers(_body)}
        for op in openapi.read_ops("local"):  # linearizable unless ?stale=1
            handlers[op] = linearized(handlers[op], svcs.ctx)
        if guard is not None:
            handlers = {op: guarded(h, op, guard) for op, h in handlers.items()}
        register(app, "local", handlers)
        return app

    def remote_guard(self, request: web.Request, op: str) -> str:
        """The remote API's roles: a client certificate issued for a user acts as that user;
        one issued for nobody acts as an admin, or as the user of a bearer token it
        carries (shoal.node.users)."""
        name = self.c.security.authorize_client(peer_of(request))
        user = self.users.cert_user(name)
        if user is None:
            token_user = self.users.bearer(request.headers.get("Authorization", ""))
            user = ROOT if token_user is None else token_user.name
        self.users.authorize(user, op)
        return user

    def _user_handlers(self) -> dict[str, Handler]:
        """/v1/users: users and roles (shoal.node.users; admins only)."""
        users = self.users

        async def ls(_: web.Request) -> Any:
            return users.ls()

        async def add(req: web.Request) -> Any:
            return await users.add(await _body(req))

        async def update(req: web.Request) -> Any:
            return await users.update(req.match_info["name"], await _body(req))

        async def rm(req: web.Request) -> Any:
            return await users.remove(req.match_info["name"])

        async def token(req: web.Request) -> Any:
            return await users.new_token(req.match_info["name"])

        return {"user_ls": ls, "user_add": add, "user_update": update, "user_rm": rm,
                "user_token": token}

    def _gossip_handlers(self) -> dict[str, Handler]:
        """/v1/gossip: key rotation (managers; see shoal.node.membership)."""
        gossip = self.c.gossip

        async def rotate_key(_: web.Request) -> Any:
            return await gossip.rotate_key()

        return {"gossip_rotate_key": rotate_key}

    def _ca_handlers(self) -> dict[str, Handler]:
        """/v1/ca: CA digest and clients; client certificates for the remote API."""
        sec = self.c.security

        async def ca(_: web.Request) -> Any:
            return sec.ca_info()

        async def issue_client(req: web.Request) -> Any:
            body = await _body(req)
            return await sec.issue_client(body.get("name"), body.get("csr"),
                                          body.get("lifetime"), body.get("user") or "")

        async def revoke_client(req: web.Request) -> Any:
            return await sec.revoke_client(req.match_info["name"])

        return {"ca_info": ca, "ca_issue_client": issue_client,
                "ca_revoke_client": revoke_client}

    def _mqtt_handlers(self) -> dict[str, Handler]:
        """/v1/mqtt: the cluster-wide MQTT bridge setting (shoal.node.mqtt.MqttSettings)."""
        mq = MqttSettings(self.c.services.ctx, self.c.security)

        async def show(_: web.Request) -> Any:
            return mq.show()

        async def set_(req: web.Request) -> Any:
            return await mq.set(await _body(req))

        async def unset(_: web.Request) -> Any:
            return await mq.unset()

        async def command_key(_: web.Request) -> Any:
            return mq.command_key()

        return {"mqtt_show": show, "mqtt_set": set_, "mqtt_unset": unset,
                "mqtt_command_key": command_key}

    def _network_handlers(self) -> dict[str, Handler]:
        """/v1/networks: create, ls, inspect, rm (shoal.node.netapi)."""
        return crud.handlers("network", self.c.networks, _body)

    def _secret_handlers(self) -> dict[str, Handler]:
        """/v1/secrets and /v1/configs: create, ls, inspect (never a secret's value), rm."""
        objs = self.c.secrets
        out: dict[str, Handler] = {}
        for kind in ("secret", "config"):
            async def ls(_: web.Request, kind: str = kind) -> Any:
                return objs.ls(kind)

            async def create(req: web.Request, kind: str = kind) -> Any:
                return await objs.create(kind, await _body(req))

            async def inspect(req: web.Request, kind: str = kind) -> Any:
                return objs.inspect(kind, req.match_info["ref"])

            async def rm(req: web.Request, kind: str = kind) -> Any:
                return await objs.remove(kind, req.match_info["ref"])

            out.update({f"{kind}_ls": ls, f"{kind}_create": create,
                        f"{kind}_inspect": inspect, f"{kind}_rm": rm})
        return out

    def peer_app(self) -> web.Application:
        c = self.c
        adm, disp, sec = c.admission, c.dispatcher, c.security
        app = web.Application(middlewares=[c.metrics.middleware(), error_middleware,
                                           self.limits["peer"].middleware()],
                              client_max_size=MAX_BODY)

        # Served over TLS only (see start). ca and join need no client certificate (the
        # joining node has none yet: the token authenticates it); every other route calls
        # sec.authorize(peer), which wants a certificate of a *current* member.

        async def ca(_: web.Request) -> Any:
            return adm.ca_cert()

        async def join(req: web.Request) -> Any:
            body = await _body(req)
            return await adm.accept_join(body.get("token"), body.get("node"), body.get("csr"),
                                         body.get("schema"))

        async def keys(req: web.Request) -> Any:
            return adm.member_keys(peer_of(req))

        async def manager_keys(req: web.Request) -> Any:
            return adm.manager_keys(peer_of(req))

        async def renew(req: web.Request) -> Any:
            body = await _body(req)
            return adm.renew_certificate(peer_of(req), body.get("csr"))

        async def node_role(req: web.Request) -> Any:  # promote/demote, run by the leader
            body = await _body(req)
            return await c.roles.node_role_request(peer_of(req), body.get("node_id"),
                                                   body.get("role"))

        async def role_changed(req: web.Request) -> Any:  # a manager: "you are now ROLE"
            body = await _body(req)
            return await c.lifecycle.role_changed(peer_of(req), body.get("role"))

        async def gossip_keys(req: web.Request) -> Any:  # a manager's rotation step
            return c.gossip.apply_key_op(peer_of(req), await _body(req))

        async def task_files(req: web.Request) -> Any:
            body = await _body(req)
            return c.secrets.task_files(peer_of(req), body.get("task_id"))

        async def registry_auth(req: web.Request) -> Any:
            body = await _body(req)
            return c.registries.task_auth(peer_of(req), body.get("task_id"))

        async def state(req: web.Request) -> Any:  # a worker's state feed (node/feed.py)
            body = await _body(req)
            data = await disp.state_since(peer_of(req), body.get("after"), body.get("wait", 0),
                                         body.get("compress"))
            return web.Response(body=data, content_type="application/msgpack")

        async def report(req: web.Request) -> Any:  # a worker's own writes
            body = await _body(req)
            return await disp.worker_report(peer_of(req), body.get("cmd"))

        async def heartbeat(req: web.Request) -> Any:
            body = await _body(req)
            return disp.heartbeat(peer_of(req), body.get("node_id"))

        async def image_resolve(req: web.Request) -> Any:
            node, manager = sec.member(peer_of(req))
            ref = (await _body(req)).get("ref")
            found = await asyncio.to_thread(c.transfer.resolve_image, ref)  # (NotFound first)
            await c.transfer.check_image_access(node, manager, ref)
            return found

        async def image_blob(req: web.Request) -> web.StreamResponse:
            node, manager = sec.member(peer_of(req))
            digest = req.match_info["digest"]
            try:
                f = await asyncio.to_thread(c.images.export_blob, digest)
            except Exception as exc:
                raise NotFound(f"no blob {digest}: {exc}", "digest") from None
            try:
                await c.transfer.check_image_access(node, manager, req.query.get("image"),
                                                    digest)
                resp = web.StreamResponse(
                    headers={"Content-Type": "application/octet-stream"})
                await resp.prepare(req)
                while chunk := await asyncio.to_thread(f.read, 1 << 20):
                    await resp.write(chunk)
            finally:
                f.close()
            await resp.write_eof()
            return resp

        async def task_logs(req: web.Request) -> web.StreamResponse:
            # (a manager's `service logs` asks; a worker may not read other nodes' task logs,
            # which may carry what their tasks were given)
            sec.authorize(peer_of(req), manager=True)
            body = await _body(req)
            task_id = body.get("task_id")
            if not isinstance(task_id, str):
                raise BadRequest("task_id is required", "task_id")
            tail, since = body.get("tail"), body.get("since")
            records = transfer.local_logs(
                c.runtime, task_id, tail if isinstance(tail, int) else None,
                float(since) if isinstance(since, (int, float)) else None,
                bool(body.get("timestamps")), bool(body.get("follow")))
            return await stream_ndjson(req, records)

        async def task_usage(req: web.Request) -> Any:
            sec.authorize(peer_of(req))
            body = await _body(req)
            ids = body.get("task_ids")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise BadRequest("task_ids must be a list of task ids", "task_ids")
            # (a few cgroup files a task: thousands would hold the event loop)
            return await asyncio.to_thread(transfer.local_usage, c.runtime, ids[:10000])

        async def mqtt_credentials(req: web.Request) -> Any:  # a worker's MQTT bridge
            return MqttSettings(c.services.ctx, sec).credentials(peer_of(req))

        register(app, "peer", {
            "cluster_ca": ca, "cluster_join": join, "cluster_keys": keys,
            "cluster_manager_keys": manager_keys, "cluster_renew": renew,
            "cluster_heartbeat": heartbeat, "cluster_state": state, "cluster_report": report,
            "cluster_task_files": task_files, "cluster_registry_auth": registry_auth,
            "cluster_gossip_keys": gossip_keys,
            "cluster_node_role": node_role, "cluster_role_changed": role_changed,
            "cluster_image_resolve": image_resolve, "cluster_image_blob": image_blob,
            "cluster_logs": task_logs, "cluster_usage": task_usage,
            "cluster_mqtt": mqtt_credentials, **self._exec_peer,
            **sec.keys.peer_handlers(_body, peer_of)})
        return app

    async def start(self) -> None:
        cfg = self.config
        sock = cfg.socket_path
        sock.unlink(missing_ok=True)
        local = web.AppRunner(self.local_app(), access_log=None, shutdown_timeout=STOP_GRACE)
        await local.setup()
        old = os.umask(0o177)
        try:
            await web.UnixSite(local, str(sock)).start()
        finally:
            os.umask(old)
        os.chmod(sock, 0o600)
        peer = web.AppRunner(self.peer_app(), access_log=None, shutdown_timeout=STOP_GRACE)
        await peer.setup()
        sec = self.c.security
        await web.TCPSite(peer, cfg.bind_addr, cfg.api_port, reuse_address=True,
                          ssl_context=tls_listener(lambda: sec.server_ctx, False)).start()
        self._runners = [local, peer]
        if cfg.remote_api_port:
            remote = web.AppRunner(self.local_app(remote=True), access_log=None,
                                   shutdown_timeout=STOP_GRACE)
            await remote.setup()
            await web.TCPSite(remote, cfg.bind_addr, cfg.remote_api_port, reuse_address=True,
                              ssl_context=tls_listener(lambda: sec.remote_ctx, True)).start()
            self._runners.append(remote)
        if cfg.metrics_addr:
            await self._start_metrics(cfg.metrics_addr, cfg.metrics_mtls)
        if cfg.dashboard_addr:  # the web dashboard
            from shoal.node.dashboard import Dashboard  # (imported only when it is served)
            dash = Dashboard(self.users, self.c.services, self.c.nodes,
                             lambda g: self.local_app(guard=g, limits="dashboard"))
            runner = web.AppRunner(dash.app(), access_log=None, shutdown_timeout=STOP_GRACE)
            await runner.setup()
            host, _, port = cfg.dashboard_addr.rpartition(":")
            sec = self.c.security
            await web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True,
                              ssl_context=tls_listener(lambda: sec.server_ctx, False)
                              if cfg.dashboard_tls else None).start()
            self._runners.append(runner)

    def metrics_app(self, mtls: bool) -> web.Application:
        """Only ``GET /metrics`` (the route table's handler), for ``--metrics-addr``; with
        ``mtls`` every request needs a current client certificate, as on the remote API."""
        c = self.c
        middlewares: list[Any] = [error_middleware, self.limits["metrics"].middleware()]
        if mtls:
            @web.middleware
            async def client_auth(request: web.Request, handler: Handler) -> Any:
                c.security.authorize_client(peer_of(request))
                return await handler(request)
            middlewares.append(client_auth)
        app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)

        async def metrics(req: web.Request) -> web.StreamResponse:
            return await serve_metrics(c.metrics, req)
        route = next(r for r in openapi.ROUTES if r.op == "metrics")
        app.router.add_get(route.path, metrics)
        return app

    async def _start_metrics(self, addr: str, mtls: bool) -> None:
        host, _, port = addr.rpartition(":")
        runner = web.AppRunner(self.metrics_app(mtls), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True,
                          ssl_context=tls_listener(lambda: self.c.security.remote_ctx, True)
                          if mtls else None).start()
        self._runners.append(runner)

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.gather(*(r.cleanup() for r in self._runners))
        self.config.socket_path.unlink(missing_ok=True)
