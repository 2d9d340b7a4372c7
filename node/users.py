"""Users, roles and who may call which API route.

Owns:

* password hashing: scrypt (hashlib) with a per-user random salt, its parameters recorded
  with the hash (``scrypt$N$r$p$SALT$HASH``, base64), so they can be raised later without
  breaking old hashes; the hash is sealed under the managers' key before it is proposed
  (shoal.node.sealing), so workers' replicas and Raft files never hold it in the clear;
* API tokens (``shoal user token NAME``): 32 random bytes shown once; the replicated state
  keeps only their SHA-256;
* the user commands behind ``/v1/users`` (add, ls, update, rm, token) — ``ls`` never shows a
  hash or a token;
* the role table: ``required_role(op)`` for every route of the API (shoal.node.openapi), and
  ``Users.authorize`` which refuses (403, naming the role needed) a user whose *current* role
  (looked up at each request, so a role change applies at once) is too weak;
* ``LoginLimiter``: failed logins counted per client address and per user name.

Roles (weakest first; each includes the ones before it):

* viewer    GET routes only, except the join tokens (they admit nodes);
* operator  also changes services, nodes (drain/activate, labels, rm), secrets and configs
            (create/rm: a secret's value is never readable through the API), networks,
            images, registry pulls;
* admin     everything: users, client certificates, join tokens, promote/demote, init/join/
            leave, gossip keys, registry credentials, loading images from a node's files.

Who is who: on the unix socket (root on the node) the caller is ``ROOT``, an admin — that is
how the first admin is made. On the remote API (mutual TLS) a client certificate issued for a
user (``shoal ca issue-client NAME --user USER``) acts as that user; a certificate issued for no
user acts as an admin unless the request carries a user's ``Authorization: Bearer TOKEN``.
The dashboard (shoal.node.dashboard) uses a session cookie or a bearer token.

Errors (shoal.node.errors): ``Unauthenticated`` (401: unknown token, a removed user),
``Forbidden`` (403: role too weak), ``BadRequest``, ``NotFound``, ``TooManyRequests`` (429:
login rate limit), ``Unavailable`` (503: this node cannot unseal: not a manager).

Must not touch: HTTP (the API and the dashboard call this), the state machine's rules
(shoal.raft.state applies the ``user_*`` commands), certificates (shoal.node.security).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from shoal.node.context import NodeContext
from shoal.node.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    SealError,
    TooManyRequests,
    Unauthenticated,
    Unavailable,
)
from shoal.node.openapi import ROUTES
from shoal.node.sealing import seal_text, unseal_text
from shoal.raft.models import USER_ROLES, NodeRole, User
from shoal.raft.spec import OBJECT_NAME_RE

log = logging.getLogger("shoal.users")

ROOT = ""  # the identity of the unix socket's caller (root on the node): an admin
# the user a guard let by, for the request being handled (api.guarded sets it in the
# request's own task; exec's audit lines name it). None: an unguarded listener.
REQUEST_USER: contextvars.ContextVar[str | None] = contextvars.ContextVar("shoal_request_user",
                                                                          default=None)
# that user's role, as the guard found it (Users.authorize): what ``require_admin`` checks
REQUEST_ROLE: contextvars.ContextVar[str] = contextvars.ContextVar("shoal_request_role",
                                                                   default="admin")


def require_admin(what: str, field: str) -> None:
    """The request being handled asks for ``what``, which only an admin may (a service
    reaching beyond its sandbox: shoal.node.hostaccess; a node's role; registry
    credentials): 403 naming ``field`` for another role. An unguarded listener (the unix
    socket: root on the node) has no users and may."""
    user = REQUEST_USER.get()
    if user is None or user == ROOT:
        return
    role = REQUEST_ROLE.get()
    if rank(role) < rank("admin"):
        raise Forbidden(f"{what} needs the admin role; user {user!r} is a {role}", field)


# scrypt cost: N=2^15, r=8, p=1 (32 MiB, ~0.1 s per check on one core); recorded per hash
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
_MAX_N, _MAX_R, _MAX_P = 1 << 20, 32, 16  # refuse to verify costlier hashes (a bad record)
MIN_PASSWORD = 8
MAX_PASSWORD = 1024

# routes only an admin may call (besides every route a viewer/operator may not, below)
ADMIN_OPS = frozenset({
    "swarm_init", "swarm_join", "swarm_leave", "swarm_join_token", "swarm_join_token_rotate",
    "node_promote", "node_demote", "gossip_rotate_key", "ca_issue_client", "ca_revoke_client",
    "registry_login", "registry_logout", "image_load", "image_build", "builder_prune", "image_tag",
    "image_push", "image_save",
    "user_ls", "user_add", "user_update", "user_rm", "user_token",
    # the managers' keys (node/keys.py): autolock, the unlock key, rotations
    "swarm_update", "swarm_unlock", "swarm_unlock_key", "swarm_unlock_key_rotate",
    "swarm_rotate_key", "swarm_rotate_raft_key", "ca_rotate",
    # the MQTT bridge's setting and its command key (node/mqtt.py)
    "mqtt_set", "mqtt_unset", "mqtt_command_key"})


def rank(role: str) -> int:
    return USER_ROLES.index(role) if role in USER_ROLES else -1


# GET routes that change things: a command run in a task (`shoal exec`, a WebSocket's GET)
OPERATOR_GETS = frozenset({"task_exec"})


def required_role(op: str) -> str:
    """The weakest role that may call the route ``op`` (an operation id of the route
    table): admin for ADMIN_OPS, viewer for other GETs, operator for other changes."""
    if op in ADMIN_OPS:
        return "admin"
    if op in OPERATOR_GETS:
        return "operator"
    method = _METHODS.get(op, "POST")
    return "viewer" if method == "GET" else "operator"


_METHODS = {r.op: r.method for r in ROUTES}


# --------------------------------------------------------------------------- passwords

def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def hash_password(password: str, n: int = 0, r: int = 0, p: int = 0) -> str:
    """``scrypt$N$r$p$SALT$HASH`` (base64) of ``password`` with a new 16-byte salt; 0 = the
    module's SCRYPT_N / SCRYPT_R / SCRYPT_P."""
    n, r, p = n or SCRYPT_N, r or SCRYPT_R, p or SCRYPT_P
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32,
                            maxmem=256 * r * n)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Does ``password`` match ``encoded`` (from hash_password)? False for a malformed or
    over-costly record, never an exception."""
    try:
        kind, n_s, r_s, p_s, salt_s, digest_s = encoded.split("$")
        n, r, p = int(n_s), int(r_s), int(p_s)
        if kind != "scrypt" or not (2 <= n <= _MAX_N and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
            return False
        salt, want = base64.b64decode(salt_s), base64.b64decode(digest_s)
        got = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(want),
                             maxmem=256 * r * n)
    except (ValueError, TypeError, MemoryError):
        return False
    return hmac.compare_digest(got, want)


def _password_aad(name: str) -> bytes:
    return b"shoal/user-password/" + name.encode()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check_password(pw: Any) -> str:
    if not isinstance(pw, str) or not MIN_PASSWORD <= len(pw) <= MAX_PASSWORD:
        raise BadRequest(f"password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters",
                         "password")
    return pw


def _check_role(role: Any) -> str:
    if role not in USER_ROLES:
        raise BadRequest(f"role must be one of {', '.join(USER_ROLES)}", "role")
    return str(role)


def user_view(u: User) -> dict[str, Any]:
    """What ``user ls`` shows: never the hash, never the token."""
    return {"name": u.name, "role": u.role, "password": bool(u.password),
            "token": bool(u.token_hash), "created_at": u.created_at,
            "updated_at": u.updated_at}


# --------------------------------------------------------------------------- login limits

@dataclass
class LoginLimits:
    """How many failed logins are tolerated before further attempts get 429."""

    # failures within ``window`` seconds, per client address and per user name, before
    # every login from that address / for that user is refused until the oldest one ages
    # out. Lower = slower guessing, but a typo-prone user locks themselves out sooner.
    failures: int = 5
    window: float = 60.0  # seconds


@dataclass
class LoginLimiter:
    config: LoginLimits = field(default_factory=LoginLimits)
    _fails: dict[str, deque[float]] = field(default_factory=dict)

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._fails.setdefault(key, deque())
        while q and q[0] <= now - self.config.window:
            q.popleft()
        return q

    def check(self, client: str, user: str, now: float | None = None) -> None:
        """Raise TooManyRequests while ``client`` or ``user`` is over its failures."""
        now = time.monotonic() if now is None else now
        for key in (f"c:{client}", f"u:{user}"):
            q = self._recent(key, now)
            if len(q) >= self.config.failures:
                wait = max(1, int(q[0] + self.config.window - now) + 1)
                raise TooManyRequests("too many failed logins: try again later", wait)

    def attempt(self, client: str, user: str, now: float | None = None) -> float:
        """A login begins: TooManyRequests if ``client`` or ``user`` is over its failures;
        else the attempt counts as a failure from now on (logins in flight together count
        as theirs: concurrent guesses cannot all pass the check before any fails) until
        ``succeeded`` takes it back. Returns its time."""
        now = time.monotonic() if now is None else now
        self.check(client, user, now)
        self.failed(client, user, now)
        return now

    def succeeded(self, client: str, user: str, at: float) -> None:
        """The attempt made ``at`` (``attempt``) was the right password: not a failure."""
        for key in (f"c:{client}", f"u:{user}"):
            with contextlib.suppress(ValueError):
                self._fails.get(key, deque()).remove(at)

    def failed(self, client: str, user: str, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        counts = []
        for key in (f"c:{client}", f"u:{user}"):
            q = self._recent(key, now)
            q.append(now)
            counts.append(len(q))
        if len(self._fails) > 10_000:  # forget idle entries: the table stays small
            for k in [k for k, q in self._fails.items() if not self._recent(k, now)]:
                del self._fails[k]
        return max(counts)


# --------------------------------------------------------------------------- users

class Users:
    """The user commands and the identity checks (one per agent)."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        # password checks at once (scrypt: 32 MiB, ~0.1 s of a core each): a flood of logins
        # queues here instead of filling the thread pool the agent's other work shares
        self._hashing = asyncio.Semaphore(2)

    def _key(self) -> bytes:
        ident = self.ctx.identity
        if ident is None or ident.role != NodeRole.MANAGER or not ident.manager_key:
            raise Unavailable("only a manager can check or set user passwords")
        return ident.manager_key

    def _users(self) -> dict[str, User]:
        return self.ctx.require_member().snapshot().cluster.users

    def all(self) -> dict[str, User]:
        """Every user by name, as this node's copy of the state has them."""
        return self._users()

    def _user(self, name: Any) -> User:
        user = self._users().get(name) if isinstance(name, str) else None
        if user is None:
            raise NotFound(f"no user named {name}", "name")
        return user

    # ------------------------------------------------------------------ commands
    def ls(self) -> list[dict[str, Any]]:
        self.ctx.require_manager()
        return [user_view(u) for u in sorted(self._users().values(), key=lambda u: u.name)]

    async def _sealed_hash(self, name: str, password: str) -> str:
        key = self._key()
        encoded = await asyncio.to_thread(hash_password, password)
        return seal_text(key, encoded, _password_aad(name))

    async def add(self, body: dict[str, Any]) -> dict[str, Any]:
        self.ctx.require_manager()
        name = body.get("name")
        if not isinstance(name, str) or not OBJECT_NAME_RE.match(name):
            raise BadRequest("user name must be 1-64 letters, digits, '.', '_' or '-'", "name")
        role = _check_role(body.get("role"))
        if name in self._users():
            raise Conflict(f"a user named {name!r} already exists", "name", code="exists")
        sealed = await self._sealed_hash(name, _check_password(body.get("password")))
        await self.ctx.propose({"op": "user_add", "name": name, "role": role,
                                "password": sealed, "now": time.time()})
        log.info("user %r added with role %s", name, role)
        return user_view(self._user(name))

    async def update(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        self.ctx.require_manager()
        self._user(name)
        cmd: dict[str, Any] = {"op": "user_update", "name": name, "now": time.time()}
        if body.get("role") is not None:
            cmd["role"] = _check_role(body["role"])
        if body.get("password") is not None:
            cmd["password"] = await self._sealed_hash(name, _check_password(body["password"]))
        if len(cmd) == 3:
            raise BadRequest("nothing to update: give role and/or password", "role")
        await self.ctx.propose(cmd)
        log.info("user %r updated (%s)", name,
                 ", ".join(k for k in ("role", "password") if k in cmd))
        return user_view(self._user(name))

    async def remove(self, name: str) -> dict[str, Any]:
        self.ctx.require_manager()
        self._user(name)
        await self.ctx.propose({"op": "user_remove", "name": name})
        log.info("user %r removed", name)
        return {"name": name, "removed": True}

    async def new_token(self, name: str) -> dict[str, Any]:
        """A new API token for ``name`` (the old one stops working); shown only here."""
        self.ctx.require_manager()
        self._user(name)
        token = "shoal_" + secrets.token_urlsafe(32)
        await self.ctx.propose({"op": "user_update", "name": name,
                                "token_hash": token_hash(token), "now": time.time()})
        log.info("user %r got a new API token", name)
        return {"name": name, "token": token}

    # ------------------------------------------------------------------ identities
    async def check_password(self, name: str, password: str) -> User:
        """The user if ``password`` is theirs, else Unauthenticated (one message for an
        unknown user and a wrong password; the same work is done for both)."""
        key = self._key()
        user = self._users().get(name)
        encoded = ""
        if user is not None and user.password:
            try:
                encoded = unseal_text(key, user.password, _password_aad(user.name))
            except SealError as exc:
                raise Unavailable(f"cannot read the password of {name!r}: {exc}") from exc
        async with self._hashing:
            ok = await asyncio.to_thread(verify_password, password, encoded or _dummy_hash())
        if user is None or not encoded or not ok:
            raise Unauthenticated("wrong user name or password")
        return user

    def from_token(self, token: str) -> User:
        want = token_hash(token)
        for u in self._users().values():
            if u.token_hash and hmac.compare_digest(u.token_hash, want):
                return u
        raise Unauthenticated("this API token is not valid (replaced, or its user removed)")

    def bearer(self, header: str) -> User | None:
        """The user of an ``Authorization: Bearer TOKEN`` header; None without one."""
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("Authorization must be 'Bearer TOKEN' (`shoal user token`)")
        return self.from_token(token.strip())

    def current(self, name: str) -> User:
        """The user ``name`` as the state has it now (its current role)."""
        user = self._users().get(name)
        if user is None:
            raise Unauthenticated(f"user {name!r} no longer exists")
        return user

    def cert_user(self, client_name: str) -> str | None:
        """The user a client certificate was issued for, if any."""
        return self.ctx.require_member().snapshot().cluster.client_users.get(client_name)

    def authorize(self, user: str, op: str) -> None:
        """Refuse (403) ``op`` unless ``user``'s current role allows it; ROOT may do all. The
        role is kept for the request (REQUEST_ROLE: ``require_admin`` reads it)."""
        if user == ROOT:
            REQUEST_ROLE.set("admin")
            return
        role = self.current(user).role
        REQUEST_ROLE.set(role)
        need = required_role(op)
        if rank(role) < rank(need):
            raise Forbidden(f"this needs the {need} role; user {user!r} is a {role}", "role")


@functools.cache
def _dummy_hash() -> str:
    """Checked for an unknown user, so that it costs as much as a wrong password."""
    return hash_password(secrets.token_urlsafe(16))

__all__ = ["ADMIN_OPS", "ROOT", "LoginLimiter", "LoginLimits", "Users", "hash_password",
           "require_admin", "required_role", "verify_password"]
