"""The web dashboard: a small single-page app served by every manager (``--dashboard-addr``).

Owns the dashboard's listener app:

* ``GET /`` and ``/static/*``: the page (static HTML/CSS/vanilla JS shipped in the package,
  ``static/``; nothing is fetched from elsewhere at run time);
* ``POST /login`` ``{user, password}``: checks the password (shoal.node.users) and sets a
  session cookie (HttpOnly, SameSite=Strict, Secure when served over TLS); failed logins are
  logged and rate-limited per client address and per user name (429 with Retry-After);
  ``POST /logout``; ``GET /session``: who is logged in, their current role and the CSRF token;
* ``GET /overview``: nodes, services and tasks in one read for the page's periodic refresh;
* ``/api/v1/...``: the ordinary API (shoal.node.api's routes, same handlers), each request
  checked with the identity of the session — or of an ``Authorization: Bearer TOKEN``
  (`shoal user token`) — and that user's *current* role. Every change made with a session
  cookie must carry the session's CSRF token in ``X-CSRF-Token`` (403 otherwise); the page
  reads the event stream here (``/api/v1/events``, server-sent events) to refresh live.

Sessions live in this manager's memory (a restart logs everyone out) and end after
``SESSION_IDLE`` seconds without a request, at logout, or when the user's password changes or
the user is removed. Must not touch: the API's handlers and policy (it mounts the app
shoal.node.api builds), the role table (shoal.node.users), cluster state (read only).
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from shoal.node import views
from shoal.node.control.nodes import Nodes
from shoal.node.control.services import Services
from shoal.node.errors import (
    BadRequest,
    Forbidden,
    TooManyRequests,
    Unauthenticated,
    http_error,
)
from shoal.node.users import OPERATOR_GETS, LoginLimiter, Users
from shoal.raft.models import TaskState, User

log = logging.getLogger("shoal.dashboard")
STATIC = Path(__file__).parent / "static"
COOKIE = "shoal_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_IDLE = 8 * 3600.0  # seconds without a request before a session ends
MAX_SESSIONS = 10_000  # the oldest are dropped beyond this
MAX_TASKS = 500  # tasks in one overview (the newest)
Guard = Callable[[web.Request, str], str]  # the user it let by
_SAFE = ("GET", "HEAD")


@dataclass
class Session:
    user: str
    csrf: str
    password: str  # the user's sealed password when logging in: a change ends the session
    last_seen: float


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


@web.middleware
async def _errors(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        status, code, message, field = http_error(exc)
        if status >= 500 and status != 503:
            log.exception("internal error on %s %s", request.method, request.path)
        reply = _json({"error": {"code": code, "message": message, "field": field}}, status)
        if isinstance(exc, TooManyRequests):
            reply.headers["Retry-After"] = str(exc.retry_after)
        return reply


@web.middleware
async def _headers(request: web.Request,
                   handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                   ) -> web.StreamResponse:
    """No framing by other sites, no inline scripts or foreign sources."""
    resp = await handler(request)
    if resp.prepared:  # a stream (events, logs): its headers are already sent
        return resp
    resp.headers.setdefault("X-Frame-Options", "DENY")
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Referrer-Policy", "no-referrer")
    resp.headers.setdefault("Content-Security-Policy",
                            "default-src 'self'; frame-ancestors 'none'; form-action 'self'")
    return resp


class Dashboard:
    def __init__(self, users: Users, services: Services, nodes: Nodes,
                 api_app: Callable[[Guard], web.Application],
                 limiter: LoginLimiter | None = None) -> None:
        self.users = users
        self.services = services
        self.nodes = nodes
        self._api_app = api_app  # the ordinary API's routes, checked with a guard
        self.limiter = limiter or LoginLimiter()
        self.sessions: dict[str, Session] = {}

    # ------------------------------------------------------------------ identities
    def _session(self, request: web.Request) -> tuple[str, Session] | None:
        sid = request.cookies.get(COOKIE, "")
        s = self.sessions.get(sid) if sid else None
        if s is None:
            return None
        now = time.monotonic()
        user = self.users.all().get(s.user)
        if now - s.last_seen > SESSION_IDLE or user is None or user.password != s.password:
            del self.sessions[sid]
            return None
        s.last_seen = now
        return sid, s

    def identity(self, request: web.Request, op: str = "") -> str:
        """The user making ``request`` (the route ``op``): a bearer token's, else the
        session's (a change with a session must carry its CSRF token — `exec` too, a GET:
        without it a page of any service published on the manager's address could open an
        operator's exec WebSocket with their cookie). Unauthenticated without either."""
        token_user = self.users.bearer(request.headers.get("Authorization", ""))
        if token_user is not None:
            return token_user.name
        found = self._session(request)
        if found is None:
            raise Unauthenticated("log in first (or send Authorization: Bearer TOKEN)")
        _sid, s = found
        changes = request.method not in _SAFE or op in OPERATOR_GETS  # (exec: a GET)
        if changes and not hmac.compare_digest(request.headers.get(CSRF_HEADER, ""), s.csrf):
            raise Forbidden(f"missing or wrong CSRF token: send the session's {CSRF_HEADER}",
                            "csrf")
        return s.user

    def guard(self, request: web.Request, op: str) -> str:
        user = self.identity(request, op)
        self.users.authorize(user, op)
        return user

    # ------------------------------------------------------------------ app
    def app(self) -> web.Application:
        app = web.Application(middlewares=[_headers, _errors], client_max_size=64 * 1024)
        app.router.add_get("/", self._index)
        app.router.add_static("/static/", STATIC, show_index=False)
        app.router.add_post("/login", self._login)
        app.router.add_post("/logout", self._logout)
        app.router.add_get("/session", self._whoami)
        app.router.add_get("/overview", self._overview)
        app.add_subapp("/api/", self._api_app(self.guard))
        return app

    async def _index(self, _: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def _client(self, request: web.Request) -> str:
        return request.remote or "unknown"

    async def _login(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":  # no cross-site form posts
            raise BadRequest("send the login as application/json", "body")
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("request body is not valid JSON", "body") from None
        name = body.get("user") if isinstance(body, dict) else None
        password = body.get("password") if isinstance(body, dict) else None
        if not isinstance(name, str) or not isinstance(password, str) or not name:
            raise BadRequest("user and password are required", "user")
        name = name[:64]
        client = self._client(request)
        at = self.limiter.attempt(client, name)  # (a failure until it proves otherwise)
        try:
            user = await self.users.check_password(name, password[:1024])
        except Unauthenticated:
            log.warning("failed dashboard login for user %r from %s", name, client)
            raise
        self.limiter.succeeded(client, name, at)
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        if len(self.sessions) >= MAX_SESSIONS:
            oldest = min(self.sessions, key=lambda k: self.sessions[k].last_seen)
            del self.sessions[oldest]
        self.sessions[sid] = Session(user.name, csrf, user.password, time.monotonic())
        log.info("user %r logged in to the dashboard from %s", user.name, client)
        resp = _json(self._who(user, csrf))
        resp.set_cookie(COOKIE, sid, httponly=True, samesite="Strict", secure=request.secure,
                        path="/")
        return resp

    async def _logout(self, request: web.Request) -> web.Response:
        found = self._session(request)
        if found is not None:
            sid, s = found
            if not hmac.compare_digest(request.headers.get(CSRF_HEADER, ""), s.csrf):
                raise Forbidden(f"missing or wrong CSRF token ({CSRF_HEADER})", "csrf")
            del self.sessions[sid]
        resp = _json({"logged_out": True})
        resp.del_cookie(COOKIE, path="/")
        return resp

    @staticmethod
    def _who(user: User, csrf: str) -> dict[str, Any]:
        return {"user": user.name, "role": user.role, "csrf": csrf}

    async def _whoami(self, request: web.Request) -> web.Response:
        found = self._session(request)
        if found is None:
            raise Unauthenticated("not logged in")
        _sid, s = found
        return _json(self._who(self.users.current(s.user), s.csrf))

    async def _overview(self, request: web.Request) -> web.Response:
        """Nodes, services and tasks from this manager's copy of the state (a viewer's read;
        not linearized: the page refreshes it every few seconds anyway)."""
        self.guard(request, "node_ls")
        store = self.services.ctx.require_manager()
        snap = store.snapshot()
        nodes = await self.nodes.nodes()
        for n in nodes:
            rec = snap.nodes.get(n["id"])
            if rec is not None:
                n.update(labels=dict(rec.labels), cpus=rec.cpus, memory_bytes=rec.memory_bytes,
                         leader=n["manager_status"] == "leader")
        services = []
        for svc in sorted(snap.services.values(), key=lambda s: s.spec.name):
            v = views.service_view(svc, snap)
            tasks = snap.tasks_of(svc.id)
            v["image"] = svc.spec.task.container.image
            v["healthy"] = sum(1 for t in tasks if t.status.up
                               and str(t.status.health) == "healthy")
            v["has_previous"] = svc.previous_spec is not None
            services.append(v)
        live = [t for t in snap.tasks.values()
                if t.desired_state <= TaskState.RUNNING or t.status.state <= TaskState.RUNNING
                or t.status.err]
        live.sort(key=lambda t: -t.updated_at)
        return _json({"index": snap.index, "nodes": nodes, "services": services,
                      "tasks": views.task_views(live[:MAX_TASKS], snap),
                      "time": time.time()})


__all__ = ["COOKIE", "CSRF_HEADER", "Dashboard", "Session"]
