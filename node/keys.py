"""Manager key safety: autolock (keys at rest under an unlock key) and CA rotation.

Owns (one ``KeyManager`` per agent, made by its Security):

* **autolock** (Docker's ``swarm init --autolock``, ``swarm update --autolock``,
  ``swarm unlock``, ``swarm unlock-key [--rotate]``). With autolock on, a manager's keys at
  rest — the Raft secret and the managers' key in ``node.json`` (the latter seals the CA
  key, the join-token secrets and every secret value in the replicated state) and its TLS
  private key in ``tls/node.pem`` — are unreadable without the unlock key: ``node.json``
  holds them wrapped under a key derived from it (shoal.node.sealing.wrap_keys), together
  with the random password of the PKCS#8-encrypted TLS key. The unlock key itself lives in
  the replicated state sealed under the managers' key; every unlocked manager watches it and
  re-wraps its own keys when it changes (one atomic rename of ``node.json``), so a rotation
  reaches every running manager through Raft. A manager that was down during a rotation
  still opens with the key from before, then re-wraps with the new one (as Swarm's
  pending-key window). A restarted autolocked node comes up *locked*: no Raft, gossip,
  feed or task reconciling; its API answers every route but info and unlock with 503
  ``locked``, and its node-to-node TLS cannot start (its key is encrypted). ``unlock``
  checks the key against the wrapped keys: a wrong key changes nothing.
* **CA rotation** (``ca rotate``, Docker's ``swarm ca --rotate``): a new root (its own
  name, cross-signed by the old one) goes into the state; then, driven by the state and
  by each node's loop here, with no connection ever losing trust:

  1. *trust*: every node writes ``ca.pem`` = old root + new root and acknowledges;
  2. *issue* (once every node that is not down trusts both): managers sign with the new
     root (the leaf is served with the cross-signed root after it); every node renews its
     certificate and acknowledges;
  3. *finish* (once every such node holds a new-root certificate): the leader makes the
     new root the cluster CA (join tokens now pin its digest) and every node drops the old
     root from its trust. A node removed meanwhile gets nothing (renewal needs membership);
     a node that was down keeps a certificate nobody trusts any more and must rejoin.

* **the managers' key** (``swarm rotate-key``): a new sealing key; the CA key(s), join-token
  secrets, unlock key and every secret value re-sealed under it in one command
  (``manager_key_rotate``, refused if anything sealed changed meanwhile). The new key never
  enters the log: the other managers see that theirs no longer opens the state and fetch
  it over mTLS from a manager that has it, so a removed or demoted manager cannot read what
  is sealed from then on.

* **the Raft secret** (``swarm rotate-key``; shoal.raft.raftkeys has the phases): the secret
  that seals Raft traffic between managers, replaced without downtime. The manager that
  starts it makes a new secret and accepts it at once; every manager fetches it over mTLS
  (``/v1/cluster/keys``: current managers only) and accepts it (phase ``accept``), then
  sends with it (``switch``), then drops the old one (done). A removed or demoted manager
  gets no new secret, so it can no longer read the log. A manager down during the whole
  rotation meets messages its secrets do not open and fetches the current one the same way.

Must not touch: Raft internals, the runtime, membership decisions; it proposes commands
(``cluster_autolock``, ``ca_rotate_*`` in shoal.raft.state) and calls managers through
Security.

Errors (node/errors.py)::

    BadRequest    malformed or wrong unlock key (field ``key``), bad --cert-expiry
    Conflict      unlock on a node that is not locked (``not_locked``)
    Unavailable   code ``locked``: this node waits for `shoal unlock`
"""

from __future__ import annotations

import asyncio
import logging
import secrets as pysecrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from aiohttp import web

from shoal.node import pki
from shoal.node.config import NodeIdentity
from shoal.node.context import NodeContext
from shoal.node.errors import ApiError, BadRequest, Conflict, SealError, Unavailable
from shoal.node.sealing import (
    AAD_CA_KEY,
    AAD_NEXT_CA_KEY,
    AAD_UNLOCK_KEY,
    derive_gossip_key,
    key_id,
    new_key,
    new_unlock_key,
    parse_unlock_key,
    seal,
    seal_text,
    secret_aad,
    token_aad,
    unseal,
    unseal_text,
    unwrap_keys,
    wrap_keys,
)
from shoal.node.source import after_applied
from shoal.raft.models import Node, NodeRole, NodeState
from shoal.raft.raftkeys import secret_id
from shoal.raft.schema import GATED_COMMANDS
from shoal.raft.secops import MAX_TASK_HISTORY
from shoal.raft.state import Snapshot


class Security(Protocol):
    """What the key manager uses of its node's shoal.node.security.Security (which owns it)."""

    files: pki.TlsFiles

    def manager_key(self) -> bytes: ...
    def ca(self, snap: Snapshot) -> pki.CertificateAuthority: ...
    def authorize(self, peer: pki.CertInfo | None, manager: bool = False) -> Node: ...
    def load(self) -> None: ...
    async def renew(self) -> pki.CertInfo: ...
    async def call(self, addr: str, path: str, body: dict[str, Any], *,
                   server_role: str = ..., ctx: Any = None, server_hostname: str | None = None,
                   timeout: float = 10.0) -> dict[str, Any]: ...

log = logging.getLogger("shoal.keys")
_T = TypeVar("_T")
Handler = Callable[[web.Request], Awaitable[Any]]

LOCKED = ("this node is locked (autolock): its keys are encrypted at rest; run `shoal unlock` "
          "with the cluster's unlock key")
# what a locked node still serves on its CLI listeners
UNLOCKED_PATHS = frozenset({"/v1/info", "/v1/swarm/unlock", "/v1/openapi.json", "/metrics"})
LOOP_PERIOD = 0.5  # the least time between passes of the key loop, seconds
# between passes when no applied command wakes the loop (retries, "lagging since" timers)
IDLE_PERIOD = 2.0
MIN_CERT_EXPIRY = 60.0  # seconds; `ca rotate --cert-expiry` floor
MAX_CERT_EXPIRY = 20 * 365 * 86400.0


class KeyManager:
    def __init__(self, ctx: NodeContext, security: Security) -> None:
        self.ctx = ctx
        self.security = security
        # the identity of a locked node (autolock), until `unlock`; None otherwise
        self.locked: NodeIdentity | None = None
        self._start: Callable[[NodeIdentity], None] | None = None
        # the unlock key this node's keys are wrapped with now ("": in the clear)
        self._wrapped_with = ""
        # (the roots ca.pem was last seen to hold, TlsFiles.ca_writes then): _ca_step
        self._trusted: tuple[bytes, int] | None = None
        self.rewraps = 0  # times this node re-wrapped its keys (tests, info)
        self._rotating = False  # this node is rotating the managers' key
        self._opens: tuple[bytes, bytes] = (b"", b"")  # (managers' key, ca_key) known to open
        self._raft_fetched = 0.0  # monotonic time of the last fetch of the Raft secret
        self._unready_since: float | None = None  # since when this manager's Raft lags
        self._wakeup = asyncio.Event()  # set by ``wake()``: a command was applied

    # ================================================================== locked state
    @staticmethod
    def is_locked(identity: NodeIdentity) -> bool:
        """Whether ``identity`` as loaded from disk needs the unlock key to start."""
        return bool(identity.key_wrap)

    def hold(self, identity: NodeIdentity, start: Callable[[NodeIdentity], None]) -> None:
        """Wait for `shoal unlock`; then ``start(identity)`` with its keys in memory."""
        self.locked, self._start = identity, start
        log.warning("this node is locked (autolock): its keys stay encrypted until "
                    "`shoal unlock`; it does not join Raft or run tasks meanwhile")

    def middleware(self) -> Any:
        """Refuses every CLI route but info/unlock while this node is locked."""
        @web.middleware
        async def gate(request: web.Request, handler: Any) -> Any:
            if self.locked is not None and request.path not in UNLOCKED_PATHS:
                raise Unavailable(LOCKED, code="locked")
            return await handler(request)
        return gate

    async def unlock(self, key: Any) -> dict[str, Any]:
        ident = self.locked
        if ident is None or self._start is None:
            raise Conflict("this node is not locked", "key", code="not_locked")
        if not isinstance(key, str) or not key.strip():
            raise BadRequest("the unlock key is required", "key")
        try:
            parse_unlock_key(key)
            keys = await asyncio.to_thread(unwrap_keys, key.strip(), ident.node_id,
                                           ident.key_wrap)
            manager_key = bytes.fromhex(keys["manager_key"])
            tls_pw = keys["tls_password"].encode() or None
        except (SealError, KeyError, ValueError) as exc:
            raise BadRequest(f"cannot unlock: {exc}", "key") from None
        files = self.security.files
        before, files.password = files.password, tls_pw
        try:
            if files.cert.exists():  # (a missing file: security.load reports it)
                await asyncio.to_thread(files.key)
        except (OSError, pki.PkiError) as exc:
            files.password = before
            raise BadRequest(f"cannot unlock: the TLS key does not open: {exc}", "key") \
                from None
        if ident.role == NodeRole.MANAGER:  # (demoted while locked: the keys are dropped)
            ident.raft_password, ident.manager_key = keys["raft_password"], manager_key
            ident.raft_extra_passwords = [k for k in keys.get("raft_extra", "").split() if k]
        self._wrapped_with = key.strip()
        start, self.locked, self._start = self._start, None, None
        start(ident)
        log.info("unlocked: this node rejoins the cluster")
        return {"node_id": ident.node_id, "unlocked": True}

    # ================================================================== autolock, for users
    def _unlock_key_of(self, snap: Snapshot) -> str:
        sealed = snap.cluster.unlock_key
        if not sealed:
            return ""
        try:
            return unseal_text(self.security.manager_key(), sealed, AAD_UNLOCK_KEY)
        except SealError as exc:
            raise Unavailable(f"cannot read the unlock key: {exc}") from exc

    async def update(self, autolock: Any, task_history_limit: Any = None) -> dict[str, Any]:
        """`swarm update --autolock=true|false` (the key is shown once, when turned on) and
        `--task-history-limit N` (the cluster's ``cluster_update``, schema 8)."""
        store = self.ctx.require_manager()
        if task_history_limit is not None:
            await self._task_history(store, task_history_limit)
        limit = store.snapshot().cluster.task_history_limit
        return {**(await self._autolock(store, autolock)), "task_history_limit": limit}

    async def _task_history(self, store: Any, limit: Any) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or not \
                0 <= limit <= MAX_TASK_HISTORY:
            raise BadRequest(f"task_history_limit must be a number from 0 to "
                             f"{MAX_TASK_HISTORY}", "task_history_limit")
        if store.snapshot().cluster.schema < GATED_COMMANDS["cluster_update"]:
            raise Conflict("the task history limit needs cluster schema "
                           f"{GATED_COMMANDS['cluster_update']}: upgrade every node first",
                           "task_history_limit")
        await self.ctx.propose({"op": "cluster_update", "task_history_limit": limit})

    async def _autolock(self, store: Any, autolock: Any) -> dict[str, Any]:
        if autolock is None:
            return {"autolock": bool(store.snapshot().cluster.unlock_key), "unlock_key": ""}
        if not isinstance(autolock, bool):
            raise BadRequest("autolock must be true or false", "autolock")
        on = bool(store.snapshot().cluster.unlock_key)
        if autolock == on:
            return {"autolock": on, "unlock_key": ""}
        key = new_unlock_key() if autolock else ""
        await self._set_key(key)
        return {"autolock": autolock, "unlock_key": key}

    async def _set_key(self, key: str) -> None:
        sealed = seal_text(self.security.manager_key(), key, AAD_UNLOCK_KEY) if key else ""
        await self.ctx.propose({"op": "cluster_autolock", "unlock_key": sealed})

    async def unlock_key(self, rotate: bool) -> dict[str, Any]:
        """`unlock-key [--rotate]`: the current key (managers only), or a new one."""
        store = self.ctx.require_manager()
        if not store.snapshot().cluster.unlock_key:
            raise Conflict("autolock is off: turn it on with `shoal swarm update "
                           "--autolock=true`", "autolock", code="autolock_off")
        if rotate:
            key = new_unlock_key()
            await self._set_key(key)
            return {"unlock_key": key, "rotated": True}
        return {"unlock_key": self._unlock_key_of(store.snapshot()), "rotated": False}

    # ================================================================== CA rotation, for users
    async def rotate_ca(self, cert_expiry: Any = None) -> dict[str, Any]:
        store = self.ctx.require_manager()
        if cert_expiry is not None and (
                isinstance(cert_expiry, bool) or not isinstance(cert_expiry, (int, float))
                or not MIN_CERT_EXPIRY <= cert_expiry <= MAX_CERT_EXPIRY):
            raise BadRequest(f"cert_expiry must be between {MIN_CERT_EXPIRY:g} s and 20 years "
                             "(seconds)", "cert_expiry")
        snap = store.snapshot()
        old = self.security.ca(snap)
        now = time.time()
        cert, key = await asyncio.to_thread(pki.create_ca, snap.cluster.cluster_id, now,
                                            pki.CA_LIFETIME, True)
        cross = old.cross_sign(cert, now)
        digest = pki.ca_digest(cert)
        await self.ctx.propose({
            "op": "ca_rotate_start", "cert": cert.decode(), "cross": cross.decode(),
            "key": seal(self.security.manager_key(), key, AAD_NEXT_CA_KEY),
            "digest": digest, "cert_expiry": float(cert_expiry or 0.0)})
        log.info("CA rotation started: new root %s", digest[:12])
        return {"digest": digest, "phase": "trust"}

    @staticmethod
    def rotation_view(snap: Snapshot) -> dict[str, Any]:
        c = snap.cluster
        live = [n for n in snap.nodes.values() if n.state is not NodeState.DOWN]
        return {"phase": c.ca_phase, "digest": c.digest, "next_digest": c.ca_next_digest,
                "nodes": len(live),
                "trusting": sum(1 for n in live if c.ca_acks.get(n.id, 0) >= 1),
                "reissued": sum(1 for n in live if c.ca_acks.get(n.id, 0) >= 2)}

    async def ack(self, peer: pki.CertInfo | None, stage: Any, digest: Any) -> dict[str, Any]:
        """Peer route: a node reports its progress in the CA rotation (its own only)."""
        self.ctx.require_manager()
        node = self.security.authorize(peer)
        if stage not in (1, 2) or isinstance(stage, bool):
            raise BadRequest("stage must be 1 or 2", "stage")
        if not isinstance(digest, str):
            raise BadRequest("digest is required", "digest")
        return await self.ctx.propose({"op": "ca_rotate_ack", "node_id": node.id,
                                       "stage": stage, "digest": digest})

    # ================================================================== the managers' key
    async def rotate_managers_key(self) -> dict[str, Any]:
        """`swarm rotate-key`: a new managers' key; the CA key(s), join-token secrets, unlock
        key and every secret value re-sealed under it in one command. Other managers notice
        that their key no longer opens the state and fetch the new one over mTLS from a
        manager that has it (`/v1/cluster/manager-keys`: current managers only), so it never
        enters the Raft log, and a removed or demoted manager cannot get it."""
        store = self.ctx.require_manager()
        ident = self.ctx.identity
        assert ident is not None
        snap = store.snapshot()
        c, old = snap.cluster, self.security.manager_key()
        new = new_key()
        try:
            cmd = {
                "op": "manager_key_rotate", "old_key_id": c.key_id, "key_id": key_id(new),
                "ca_key": seal(new, unseal(old, c.ca_key, AAD_CA_KEY), AAD_CA_KEY),
                "ca_next_key": seal(new, unseal(old, c.ca_next_key, AAD_NEXT_CA_KEY),
                                    AAD_NEXT_CA_KEY) if c.ca_next_key else b"",
                "worker_secret": seal_text(new, unseal_text(old, c.worker_secret,
                                                            token_aad("worker")),
                                           token_aad("worker")),
                "manager_secret": seal_text(new, unseal_text(old, c.manager_secret,
                                                             token_aad("manager")),
                                            token_aad("manager")),
                "unlock_key": seal_text(new, unseal_text(old, c.unlock_key, AAD_UNLOCK_KEY),
                                        AAD_UNLOCK_KEY) if c.unlock_key else "",
                "secrets": {s.id: seal(new, unseal(old, s.data, secret_aad(s.id)),
                                       secret_aad(s.id)) for s in snap.secrets.values()}}
        except SealError as exc:
            raise Unavailable(f"this manager cannot open the state to re-seal it ({exc}); "
                              "retry on another manager") from exc
        self._rotating = True
        try:
            await self.ctx.propose(cmd)
            await asyncio.to_thread(self._adopt, ident, new)
        finally:
            self._rotating = False
        log.info("rotated the managers' key (now %s): secrets, CA key and tokens re-sealed",
                 key_id(new))
        return {"key_id": key_id(new), "secrets": len(cmd["secrets"])}

    def _adopt(self, ident: NodeIdentity, key: bytes) -> None:
        ident.manager_key = key
        if ident.key_wrap:
            self._wrap(ident, self._wrapped_with)
        else:
            ident.save(self.ctx.data_dir)

    async def _follow_managers_key(self, ident: NodeIdentity, snap: Snapshot) -> None:
        """After another manager rotated the managers' key: fetch and adopt it."""
        ca_key = snap.cluster.ca_key
        if self._rotating or not ca_key or self._opens == (ident.manager_key, ca_key):
            return
        try:
            unseal(ident.manager_key, ca_key, AAD_CA_KEY)
            self._opens = (ident.manager_key, ca_key)
            return
        except SealError:
            pass

        def accept(reply: dict[str, Any]) -> bytes:
            key = bytes.fromhex(str(reply["manager_key"]))
            unseal(key, ca_key, AAD_CA_KEY)
            return key

        key, why = await self._ask_managers(ident, snap, "/v1/cluster/manager-keys", accept,
                                            (KeyError, ValueError, SealError))
        if key is None:
            raise Unavailable("the managers' key was rotated and no manager gave this node the "
                              "new one yet: " + "; ".join(why))
        await asyncio.to_thread(self._adopt, ident, key)
        log.info("the managers' key was rotated: adopted the new one (%s)", key_id(key))

    async def _ask_managers(self, ident: NodeIdentity, snap: Snapshot, path: str,
                            accept: Callable[[dict[str, Any]], _T | None],
                            refused: tuple[type[Exception], ...] = ()
                            ) -> tuple[_T | None, list[str]]:
        """Ask the other managers (in node id order) for ``path`` over mTLS until one's
        reply is accepted: (what ``accept`` made of it, or None if no manager's was, and why
        each manager asked did not do: an ApiError or one of ``refused`` raised by
        ``accept``, or "does not hold it" when ``accept`` returned None)."""
        caught: tuple[type[Exception], ...] = (ApiError, *refused)
        why: list[str] = []
        for m in sorted((n for n in snap.nodes.values() if n.role is NodeRole.MANAGER
                         and n.id != ident.node_id), key=lambda n: n.id):
            try:
                reply = await self.security.call(m.api_addr, path, {}, timeout=5.0)
                got = accept(reply)
            except caught as exc:
                why.append(f"{m.hostname}: {exc}")
                continue
            if got is not None:
                return got, why
            why.append(f"{m.hostname}: does not hold it")
        return None, why

    # ================================================================== the Raft secret
    async def rotate_raft_secret(self) -> dict[str, Any]:
        """`swarm rotate-key` (with the managers' key, or `--raft-only`): a new Raft secret.
        This manager accepts it at once; the leader moves every manager through the phases
        (``_raft_step``, ``_raft_drive``)."""
        store = self.ctx.require_manager()
        ident = self.ctx.identity
        assert ident is not None
        if store.snapshot().cluster.raft_phase == "switch":
            raise Conflict("a Raft secret rotation is switching managers over: wait for it to "
                           "finish", "raft_phase", code="conflict")
        new = pysecrets.token_urlsafe(32)
        await asyncio.to_thread(self._set_raft_secrets, ident, ident.raft_password,
                                [new, *ident.raft_extra_passwords])
        reply = await self.ctx.propose({"op": "raft_rotate_start", "key_id": secret_id(new)})
        log.info("Raft secret rotation started: new secret %s", secret_id(new))
        return {"key_id": secret_id(new), "phase": str(reply.get("phase", "accept"))}

    @staticmethod
    def raft_rotation_view(snap: Snapshot) -> dict[str, Any]:
        c = snap.cluster
        managers = [n for n in snap.nodes.values() if n.role is NodeRole.MANAGER
                    and n.state is not NodeState.DOWN]
        return {"key_id": c.raft_key_id, "next_key_id": c.raft_next_key_id,
                "phase": c.raft_phase, "managers": len(managers),
                "accepting": sum(1 for n in managers if c.raft_acks.get(n.id, 0) >= 1),
                "switched": sum(1 for n in managers if c.raft_acks.get(n.id, 0) >= 2)}

    def _set_raft_secrets(self, ident: NodeIdentity, primary: str, extra: list[str]) -> None:
        """Send with ``primary``, accept ``extra`` too; in memory (the Raft transport) and
        at rest (node.json, wrapped under autolock)."""
        if not ident.gossip_key:  # an old identity derives its gossip key from the secret
            ident.gossip_key = derive_gossip_key(ident.raft_password)
        ident.raft_password = primary
        ident.raft_extra_passwords = [e for e in dict.fromkeys(extra) if e and e != primary]
        raft = self.ctx.raft
        if raft is not None and raft.encryptor is not None:
            raft.encryptor.set_secrets(primary, ident.raft_extra_passwords)
        if ident.key_wrap:
            self._wrap(ident, self._wrapped_with)
        else:
            ident.save(self.ctx.data_dir)

    async def _fetch_raft_secret(self, snap: Snapshot, want: str | None) -> str:
        """A Raft secret from another manager over mTLS: the one with id ``want``, or (None)
        the one it sends with."""
        ident = self.ctx.identity
        assert ident is not None

        def accept(reply: dict[str, Any]) -> str | None:
            held = [str(p) for p in reply.get("raft_passwords") or [reply["raft_password"]]]
            return next((secret for secret in held
                         if secret and (want is None or secret_id(secret) == want)), None)

        secret, why = await self._ask_managers(ident, snap, "/v1/cluster/keys", accept)
        if secret is None:
            raise Unavailable("cannot fetch the Raft secret " + (want or "in use") + " from "
                              "another manager: " + ("; ".join(why) or "no other manager"))
        return secret

    async def _raft_step(self, ident: NodeIdentity, snap: Snapshot) -> None:
        """Follow the cluster's Raft secret rotation (a manager's part), then drive it
        (the leader's)."""
        c = snap.cluster
        ring = [ident.raft_password, *ident.raft_extra_passwords]
        held = {secret_id(p): p for p in ring}
        if c.raft_phase:
            nxt = held.get(c.raft_next_key_id) or await self._fetch_raft_secret(
                snap, c.raft_next_key_id)
            done = c.raft_acks.get(ident.node_id, 0)
            if c.raft_phase == "accept" and nxt not in ring:
                await asyncio.to_thread(self._set_raft_secrets, ident, ident.raft_password,
                                        [nxt, *ident.raft_extra_passwords])
                log.info("Raft secret rotation: accepting the new secret %s", secret_id(nxt))
            elif c.raft_phase == "switch" and ident.raft_password != nxt:
                await asyncio.to_thread(self._set_raft_secrets, ident, nxt, ring)
                log.info("Raft secret rotation: sending with the new secret %s",
                         secret_id(nxt))
            stage = 1 if c.raft_phase == "accept" else 2
            if done < stage:
                await self.ctx.propose({"op": "raft_rotate_ack", "node_id": ident.node_id,
                                        "stage": stage, "key_id": c.raft_next_key_id})
        elif c.raft_key_id and secret_id(ident.raft_password) != c.raft_key_id:
            current = held.get(c.raft_key_id) or await self._fetch_raft_secret(
                snap, c.raft_key_id)
            await asyncio.to_thread(self._set_raft_secrets, ident, current, [])
            log.info("Raft secret: now %s (a rotation finished meanwhile)", c.raft_key_id)
        elif ident.raft_extra_passwords and c.raft_key_id:
            await asyncio.to_thread(self._set_raft_secrets, ident, ident.raft_password, [])
            log.info("Raft secret rotation finished: the old secret is dropped")
        raft = self.ctx.raft
        if c.raft_phase and raft is not None and raft.is_leader():
            await self._raft_drive(snap)

    async def _raft_drive(self, snap: Snapshot) -> None:
        c = snap.cluster
        view = self.raft_rotation_view(snap)
        if c.raft_phase == "accept" and view["accepting"] == view["managers"]:
            await self.ctx.propose({"op": "raft_rotate_phase", "phase": "switch",
                                    "key_id": c.raft_next_key_id})
            log.info("Raft secret rotation: every manager accepts the new secret; switching")
        elif c.raft_phase == "switch" and view["switched"] == view["managers"]:
            await self.ctx.propose({"op": "raft_rotate_finish", "key_id": c.raft_next_key_id})
            log.info("Raft secret rotation finished: secret %s", c.raft_next_key_id)

    async def _recover_raft_secret(self, ident: NodeIdentity, snap: Snapshot) -> None:
        """A manager that missed a rotation (down meanwhile) cannot open its peers'
        messages, nor they its own (whichever side connects): when it meets a message no
        secret of its opens, or its Raft has not caught up for 5 s, it fetches the secret
        the other managers send with over mTLS (at most every 2 s)."""
        raft = self.ctx.raft
        enc = raft.encryptor if raft is not None else None
        now = time.monotonic()
        if raft is None or enc is None or raft.is_ready():
            self._unready_since = None
        elif self._unready_since is None:
            self._unready_since = now
        stuck = self._unready_since is not None and now - self._unready_since > 5.0
        if enc is None or not (stuck or now - enc.last_unknown < 5.0) or \
                now - self._raft_fetched < 2.0:
            return
        self._raft_fetched = now
        try:
            secret = await self._fetch_raft_secret(snap, None)
        except Unavailable as exc:  # (cut off, or peers down: an ordinary lagging replica)
            log.debug("Raft secret check: %s", exc.message)
            return
        if secret != ident.raft_password and secret not in ident.raft_extra_passwords:
            await asyncio.to_thread(self._set_raft_secrets, ident, secret,
                                    [ident.raft_password, *ident.raft_extra_passwords])
            log.warning("Raft: peers send with a secret this manager did not hold (a "
                        "rotation while it was down): fetched it (%s)", secret_id(secret))

    # ================================================================== routes
    def local_handlers(self, body: Callable[[web.Request], Awaitable[dict[str, Any]]]
                       ) -> dict[str, Handler]:
        """The CLI's routes (shoal.node.openapi), by operation id; ``body`` reads a request's
        JSON object (shoal.node.api)."""
        async def update(req: web.Request) -> Any:
            b = await body(req)
            return await self.update(b.get("autolock"), b.get("task_history_limit"))

        async def unlock(req: web.Request) -> Any:
            return await self.unlock((await body(req)).get("key"))

        async def unlock_key(req: web.Request) -> Any:
            return await self.unlock_key(req.method == "POST")

        async def rotate(req: web.Request) -> Any:
            return await self.rotate_ca((await body(req)).get("cert_expiry"))

        async def rotate_key(_: web.Request) -> Any:
            return await self.rotate_managers_key()

        async def rotate_raft(req: web.Request) -> Any:
            if req.method == "POST":
                return await self.rotate_raft_secret()
            return self.raft_rotation_view(self.ctx.require_manager().snapshot())

        return {"swarm_update": update, "swarm_unlock": unlock, "swarm_unlock_key": unlock_key,
                "swarm_unlock_key_rotate": unlock_key, "ca_rotate": rotate,
                "swarm_rotate_key": rotate_key, "swarm_rotate_raft_key": rotate_raft,
                "swarm_raft_key": rotate_raft}

    def peer_handlers(self, body: Callable[[web.Request], Awaitable[dict[str, Any]]],
                      peer_of: Callable[[web.Request], pki.CertInfo | None]
                      ) -> dict[str, Handler]:
        async def ca_ack(req: web.Request) -> Any:
            b = await body(req)
            return await self.ack(peer_of(req), b.get("stage"), b.get("digest"))

        return {"cluster_ca_ack": ca_ack}

    # ================================================================== the loop
    async def run(self) -> None:
        """While this node is a member: keep its keys wrapped as the cluster says, its trust
        and certificate in step with a CA rotation, and (leader) drive the rotation."""
        passed = time.monotonic()
        while True:
            await after_applied(self._wakeup, passed, LOOP_PERIOD, IDLE_PERIOD)
            try:
                await self._pass()
            except ApiError as exc:
                log.info("key loop: %s (retrying)", exc.message)
            except (OSError, pki.PkiError, SealError) as exc:
                log.warning("key loop: %s (retrying)", exc)
            passed = time.monotonic()

    def wake(self) -> None:
        """A command was applied (on the event loop): pass again soon (at most every
        LOOP_PERIOD): the steps of a rotation follow the state."""
        self._wakeup.set()

    async def _pass(self) -> None:
        ident, store = self.ctx.identity, self.ctx.store
        if ident is None or store is None or self.locked is not None:
            return
        if ident.role == NodeRole.MANAGER and ident.raft_password:
            await self._recover_raft_secret(ident, store.snapshot())
        if not store.is_ready():
            return
        snap = store.snapshot()
        if ident.role == NodeRole.MANAGER and ident.raft_password:
            await self._raft_step(ident, snap)
        if ident.role == NodeRole.MANAGER and ident.manager_key:
            await self._follow_managers_key(ident, snap)
            want = self._unlock_key_of(snap)
            if want != self._wrapped_with or bool(want) != bool(ident.key_wrap):
                await asyncio.to_thread(self._wrap, ident, want)
        elif ident.key_wrap or self.security.files.password is not None:
            await asyncio.to_thread(self._wrap, ident, "")  # a worker keeps no lock
        await self._ca_step(ident, snap)

    def _wrap(self, ident: NodeIdentity, key: str) -> None:
        """(Re-)wrap this node's keys under ``key`` ("": store them in the clear). The order
        survives a crash at any point: node.json first when locking, node.pem first when
        unlocking (a key in the clear opens with or without the password)."""
        files = self.security.files
        if key:
            pw = (files.password or pysecrets.token_hex(32).encode()).decode()
            ident.key_wrap = wrap_keys(key, ident.node_id, {
                "raft_password": ident.raft_password, "manager_key": ident.manager_key.hex(),
                "tls_password": pw, "raft_extra": "\n".join(ident.raft_extra_passwords)})
            ident.save(self.ctx.data_dir)
            if files.password is None:
                files.repassword(pw.encode())
        else:
            if files.password is not None:
                files.repassword(None)
            if ident.key_wrap:
                ident.key_wrap = ""
                ident.save(self.ctx.data_dir)
        self._wrapped_with = key
        self.rewraps += 1
        log.info("this node's keys at rest are now %s", "locked under the cluster's unlock "
                 "key" if key else "in the clear (autolock off)")

    # ------------------------------------------------------------------ CA rotation steps
    async def _ca_step(self, ident: NodeIdentity, snap: Snapshot) -> None:
        c = snap.cluster
        if not c.ca_cert:
            return
        files, sec = self.security.files, self.security
        trust = pki.bundle(c.ca_cert, c.ca_next_cert if c.ca_phase else "")
        # (ca.pem is read again only when the roots or the file changed since: not every pass)
        if (trust, files.ca_writes) != self._trusted and files.exists():
            writes = files.ca_writes
            if files.ca_pem() != trust:
                await asyncio.to_thread(files.set_ca, trust)
                sec.load()
                log.info("trusted roots now: %s", "old and new (CA rotation)" if c.ca_phase
                         else "the cluster CA")
                writes += 1
            # (remembered only if nobody else wrote ca.pem meanwhile: a renewal during the
            # write above may have put other roots there; the next pass reads it again)
            self._trusted = (trust, writes) if files.ca_writes == writes else None
        if c.ca_phase:
            done = c.ca_acks.get(ident.node_id, 0)
            if done < 1:
                await self._ack(1, c.ca_next_digest)
            elif c.ca_phase == "issue":
                if not self._under(files.cert_pem(), c.ca_next_cert):
                    await sec.renew()
                elif done < 2:
                    await self._ack(2, c.ca_next_digest)
        raft = self.ctx.raft
        if raft is not None and raft.is_leader() and c.ca_phase:
            await self._drive(snap)

    @staticmethod
    def _under(cert_pem: bytes, root_pem: str) -> bool:
        try:
            pki.verify_issued_by(cert_pem, root_pem)
        except pki.PkiError:
            return False
        return True

    async def _ack(self, stage: int, digest: str) -> None:
        if self.ctx.raft is not None:
            await self.ctx.propose({"op": "ca_rotate_ack", "node_id": self.ctx.node_id,
                                    "stage": stage, "digest": digest})
            return
        store = self.ctx.require_member()
        errors = []
        for m in sorted((n for n in store.snapshot().nodes.values()
                         if n.role is NodeRole.MANAGER), key=lambda n: n.id):
            try:
                await self.security.call(m.api_addr, "/v1/cluster/ca-ack",
                                         {"stage": stage, "digest": digest}, timeout=5.0)
                return
            except ApiError as exc:
                errors.append(f"{m.hostname}: {exc.message}")
        raise Unavailable("cannot report CA rotation progress: " + "; ".join(errors))

    async def _drive(self, snap: Snapshot) -> None:
        """The leader's part: next phase once every node that is not down is ready for it."""
        c = snap.cluster
        live = [n for n in snap.nodes.values() if n.state is not NodeState.DOWN]
        if c.ca_phase == "trust" and all(c.ca_acks.get(n.id, 0) >= 1 for n in live):
            await self.ctx.propose({"op": "ca_rotate_phase", "phase": "issue",
                                    "digest": c.ca_next_digest})
            log.info("CA rotation: every node trusts the new root; re-issuing certificates")
        elif c.ca_phase == "issue" and all(c.ca_acks.get(n.id, 0) >= 2 for n in live):
            mk = self.security.manager_key()
            key = unseal(mk, c.ca_next_key, AAD_NEXT_CA_KEY)
            await self.ctx.propose({"op": "ca_rotate_finish", "digest": c.ca_next_digest,
                                    "ca_key": seal(mk, key, AAD_CA_KEY)})
            log.info("CA rotation finished: root %s; the old root is no longer trusted",
                     c.ca_next_digest[:12])


__all__ = ["LOCKED", "UNLOCKED_PATHS", "KeyManager"]
