"""A member node's security: its TLS identity, peer authorisation, certificate issuing
and renewal, and mTLS calls to managers.

Owns (one ``Security`` per agent, created with it):

* the node's TLS contexts, built from ``DATA_DIR/tls`` (shoal.node.pki.TlsFiles) and
  rebuilt after a renewal — the API server picks them up per connection, so existing
  connections and tasks are untouched;
* ``authorize``: who is calling the node-to-node API. A caller must present a
  certificate of this cluster whose node id is a *current member* of the replicated
  state (so removing a node revokes its certificate, with no CRL) and, for manager-only
  routes, whose certificate and current record both say manager (a demoted manager's old
  certificate counts as a worker's);
* issuing certificates with the CA key, which lives in the replicated state sealed under
  the managers' key (shoal.node.sealing) and is unsealed only in a manager's memory;
* the join-token secrets (sealed the same way);
* ``keys`` (shoal.node.keys.KeyManager): autolock and CA rotation; during a rotation's
  *issue* phase ``issue`` signs with the new root and serves the cross-signed root after
  the leaf;
* the renewal loop of the node's own certificate;
* ``call``: an mTLS request to another node with the role of the server checked by TLS.

Must not touch: membership decisions (the agent's), Raft, the runtime. It gets the node's
narrow context (shoal.node.context.NodeContext), never the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
import time
from typing import Any

import aiohttp

from shoal.node import pki
from shoal.node.context import NodeContext
from shoal.node.errors import (
    ApiError,
    BadRequest,
    CaMismatch,
    Forbidden,
    NotInCluster,
    NotManager,
    SealError,
    Unauthenticated,
    Unavailable,
    from_reply,
)
from shoal.node.keys import KeyManager
from shoal.node.sealing import (
    AAD_CA_KEY,
    AAD_NEXT_CA_KEY,
    seal_text,
    token_aad,
    unseal,
    unseal_text,
)
from shoal.raft.models import Node, NodeRole
from shoal.raft.state import Snapshot

log = logging.getLogger("shoal.security")
_CLIENT_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$")


class Security:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx  # identity, config, the state source (shoal.node.context)
        self.files = pki.TlsFiles(ctx.data_dir / "tls")
        # peer API on :2377: client certificate optional (join and the CA fetch come
        # before a node has one); every other route checks it (authorize)
        self.server_ctx: ssl.SSLContext | None = None
        # remote API: client certificate required
        self.remote_ctx: ssl.SSLContext | None = None
        # calls to other nodes, presenting our certificate
        self.client_ctx: ssl.SSLContext | None = None
        self.cert: pki.CertInfo | None = None
        self.renewals = 0  # certificates this node renewed since the agent started
        self._ca: pki.CertificateAuthority | None = None
        self._ca_source: tuple[str, bytes] = ("", b"")
        self._next_ca: pki.CertificateAuthority | None = None  # during a CA rotation
        self._next_source: tuple[str, bytes] = ("", b"")
        self.keys = KeyManager(ctx, self)  # autolock, CA rotation (node/keys.py)

    # ================================================================== TLS identity
    def load(self) -> None:
        """(Re)build the contexts from DATA_DIR/tls. Connections made later use the new ones."""
        ca = self.files.ca_pem()
        pw = self.files.password  # an autolocked manager's key is encrypted
        server = pki.server_context(ca, self.files.cert, require_client_cert=False, password=pw)
        # (read as TLS reads it: an agent then never imports cryptography.x509 for it)
        cert = pki.own_info(server, ca) or self.files.info()
        remote = pki.server_context(ca, self.files.cert, require_client_cert=True, password=pw)
        client = pki.client_context(ca, self.files.cert, password=pw)
        self.server_ctx, self.remote_ctx, self.client_ctx, self.cert = \
            server, remote, client, cert

    def clear(self, remove_files: bool = False) -> None:
        self.server_ctx = self.remote_ctx = self.client_ctx = None
        self.cert = None
        self._ca = self._next_ca = None
        self._ca_source = self._next_source = ("", b"")
        if remove_files:
            self.files.password = None
            self.files.remove()

    def require_client(self) -> ssl.SSLContext:
        if self.client_ctx is None:
            raise NotInCluster("this node has no cluster certificate (run `shoal join`)")
        return self.client_ctx

    # ================================================================== manager secrets
    def manager_key(self) -> bytes:
        ident = self.ctx.identity
        if ident is None or ident.role != NodeRole.MANAGER or not ident.manager_key:
            raise NotManager("only a manager holds the cluster's keys")
        return ident.manager_key

    def seal_token_secret(self, role: str, secret: str) -> str:
        return seal_text(self.manager_key(), secret, token_aad(role))

    def token_secrets(self, snap: Snapshot) -> tuple[str, str]:
        """(worker secret, manager secret) in the clear."""
        key = self.manager_key()
        try:
            return (unseal_text(key, snap.cluster.worker_secret, token_aad("worker")),
                    unseal_text(key, snap.cluster.manager_secret, token_aad("manager")))
        except SealError as exc:
            raise Unavailable(f"cannot read the join tokens: {exc}") from exc

    def ca(self, snap: Snapshot) -> pki.CertificateAuthority:
        """The CA with its key, unsealed from the replicated state (cached)."""
        c = snap.cluster
        if not c.ca_cert or not c.ca_key:
            raise Unavailable("the cluster CA is not set up yet; retry")
        if self._ca is None or self._ca_source != (c.ca_cert, c.ca_key):
            try:
                key = unseal(self.manager_key(), c.ca_key, AAD_CA_KEY)
                self._ca = pki.CertificateAuthority(c.ca_cert, key)
            except (SealError, pki.PkiError) as exc:
                raise Unavailable(f"cannot use the cluster CA: {exc}") from exc
            self._ca_source = (c.ca_cert, c.ca_key)
        return self._ca

    def next_ca(self, snap: Snapshot) -> pki.CertificateAuthority:
        """The new root of a CA rotation in progress, with its key (cached)."""
        c = snap.cluster
        if self._next_ca is None or self._next_source != (c.ca_next_cert, c.ca_next_key):
            try:
                key = unseal(self.manager_key(), c.ca_next_key, AAD_NEXT_CA_KEY)
                self._next_ca = pki.CertificateAuthority(c.ca_next_cert, key)
            except (SealError, pki.PkiError) as exc:
                raise Unavailable(f"cannot use the new root of the CA rotation: {exc}") \
                    from exc
            self._next_source = (c.ca_next_cert, c.ca_next_key)
        return self._next_ca

    def issue(self, snap: Snapshot, csr: Any, subject_id: str, role: str, addr: str = "",
              lifetime: float | None = None) -> bytes:
        """Sign a node's (or client's) certificate request; only a manager can. During a CA
        rotation's issue phase: with the new root, the cross-signed root after the leaf."""
        if not isinstance(csr, str) or not csr:
            raise BadRequest("a certificate request (csr) is required", "csr")
        c = snap.cluster
        rotating = c.ca_phase == "issue" and bool(c.ca_next_cert)
        ca = self.next_ca(snap) if rotating else self.ca(snap)
        try:
            cert = ca.issue(csr, subject_id, role, c.cluster_id, time.time(),
                            lifetime or c.cert_expiry or self.ctx.config.cert_lifetime, addr)
        except pki.PkiError as exc:
            raise BadRequest(str(exc), "csr") from exc
        return pki.bundle(cert, c.ca_cross) if rotating else cert

    # ================================================================== who is calling
    def authorize(self, peer: pki.CertInfo | None, manager: bool = False) -> Node:
        """The member node behind a verified client certificate, or Unauthenticated /
        Forbidden. ``manager``: only a manager may do this."""
        node, is_manager = self.member(peer)
        if manager and not is_manager:
            raise Forbidden(f"only a manager may do this; node {node.id} calls with a "
                            "worker's rights", "role")
        return node

    def member(self, peer: pki.CertInfo | None) -> tuple[Node, bool]:
        """The member node behind a verified client certificate and whether it calls with a
        manager's rights (its certificate and its record say manager); Unauthenticated if it
        is no member."""
        ident, store = self.ctx.identity, self.ctx.store
        if ident is None or store is None:
            raise NotInCluster("this node is not part of a cluster")
        if peer is None:
            raise Unauthenticated("a client certificate of this cluster is required")
        if peer.cluster_id != ident.cluster_id or peer.role not in (pki.ROLE_MANAGER,
                                                                    pki.ROLE_WORKER):
            raise Unauthenticated("this certificate is not a node certificate of this cluster")
        node = store.snapshot().nodes.get(peer.subject_id)
        if node is None:
            if not store.is_ready():
                # a restarted or newly joined manager that has not caught up may simply not
                # know the caller yet: retryable, unlike a removal
                raise Unavailable(f"this manager is still catching up with the cluster and "
                                  f"does not know node {peer.subject_id} yet; retry")
            raise Unauthenticated(f"node {peer.subject_id} is not a member of this cluster "
                                  "(removed?): its certificate is no longer accepted")
        return node, peer.role == pki.ROLE_MANAGER and node.role is NodeRole.MANAGER

    def authorize_client(self, peer: pki.CertInfo | None) -> str:
        """The remote API's check: a client certificate of this cluster that is the current
        one for its name (``ca issue-client``; ``ca revoke-client`` removes it)."""
        ident, store = self.ctx.identity, self.ctx.store
        if ident is None or store is None:
            raise NotInCluster("this node is not part of a cluster")
        if peer is None or peer.cluster_id != ident.cluster_id or \
                peer.role != pki.ROLE_CLIENT:
            raise Unauthenticated("the remote API needs a client certificate of this cluster "
                                  "(`shoal ca issue-client`)")
        if store.snapshot().cluster.clients.get(peer.subject_id) != f"{peer.serial:x}":
            raise Unauthenticated(f"client certificate {peer.subject_id!r} was revoked or "
                                  "replaced")
        return peer.subject_id

    # ================================================================== the CA, for users
    def ca_info(self) -> dict[str, Any]:
        store = self.ctx.require_member()
        c = store.snapshot().cluster
        ca = pki.cert_info(c.ca_cert) if c.ca_cert else None
        return {"digest": c.digest, "not_after": ca.not_after if ca else None,
                "clients": sorted(c.clients), "autolock": bool(c.unlock_key),
                "rotation": self.keys.rotation_view(store.snapshot()),
                "node_certificate": None if self.cert is None else {
                    "node_id": self.cert.subject_id, "role": self.cert.role,
                    "serial": f"{self.cert.serial:x}", "not_before": self.cert.not_before,
                    "not_after": self.cert.not_after, "renewals": self.renewals}}

    async def issue_client(self, name: Any, csr: Any, lifetime: Any = None, user: Any = ""
                           ) -> dict[str, Any]:
        """A certificate for the remote API; replaces (revokes) an older one of that name.
        ``user``: issued for that user (shoal.node.users), it acts with the user's role."""
        store = self.ctx.require_manager()
        if user and (not isinstance(user, str) or
                     user not in store.snapshot().cluster.users):
            raise BadRequest(f"no user named {user} (`shoal user add`)", "user")
        if not isinstance(name, str) or not _CLIENT_NAME_RE.match(name):
            raise BadRequest("client name must be 1-64 letters, digits, '.', '_' or '-'",
                             "name")
        if lifetime is not None and (isinstance(lifetime, bool) or
                                     not isinstance(lifetime, (int, float)) or
                                     not 60 <= lifetime <= 10 * 365 * 86400):
            raise BadRequest("lifetime must be between 60 s and 10 years (seconds)",
                             "lifetime")
        snap = store.snapshot()
        cert = self.issue(snap, csr, name, pki.ROLE_CLIENT,
                          lifetime=float(lifetime) if lifetime else None)
        info = pki.cert_info(cert)
        cmd = {"op": "client_cert_add", "name": name, "serial": f"{info.serial:x}",
               "now": time.time()}
        if user:
            cmd["user"] = user
        await self.ctx.propose(cmd)
        return {"name": name, "cert": cert.decode(), "ca_cert": snap.cluster.ca_cert,
                "not_after": info.not_after, "user": user or None}

    async def revoke_client(self, name: str) -> dict[str, Any]:
        self.ctx.require_manager()
        await self.ctx.propose({"op": "client_cert_remove", "name": name})
        return {"name": name, "revoked": True}

    # ================================================================== calls to peers
    async def call(self, addr: str, path: str, body: dict[str, Any], *,
                   server_role: str = pki.ROLE_MANAGER, ctx: ssl.SSLContext | None = None,
                   server_hostname: str | None = None, timeout: float = 10.0
                   ) -> dict[str, Any]:
        """POST ``body`` to ``https://addr{path}`` over mTLS; TLS checks that the server holds
        a certificate of this cluster for ``server_role`` (or ``server_hostname``).
        Returns the JSON reply or raises the ApiError the server sent / Unavailable."""
        status, _ctype, raw = await self._post(addr, path, body, server_role, ctx,
                                               server_hostname, timeout)
        return self._json_reply(addr, status, raw)

    async def call_bytes(self, addr: str, path: str, body: dict[str, Any], *,
                         timeout: float = 10.0) -> bytes:
        """Like :meth:`call` to a manager, for routes that answer with bytes
        (``application/msgpack``); errors still come as JSON."""
        status, ctype, raw = await self._post(addr, path, body, pki.ROLE_MANAGER, None, None,
                                              timeout)
        if status == 200 and ctype == "application/msgpack":
            return raw
        self._json_reply(addr, status, raw)  # raises the error the server sent
        raise Unavailable(f"{addr} answered {path} without data (HTTP {status})")

    async def _post(self, addr: str, path: str, body: dict[str, Any], server_role: str,
                    ctx: ssl.SSLContext | None, server_hostname: str | None, timeout: float
                    ) -> tuple[int, str, bytes]:
        http = self.ctx.http
        assert http is not None
        context = ctx or self.require_client()
        hostname = server_hostname or pki.role_hostname(server_role)
        try:
            async with http.post(f"https://{addr}{path}", json=body, ssl=context,
                                 server_hostname=hostname,
                                 timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                return resp.status, resp.content_type, await resp.read()
        except aiohttp.ClientConnectorCertificateError as exc:
            raise Unauthenticated(
                f"the node at {addr} has no {hostname.split('.')[0]} certificate of this "
                f"cluster: {exc.certificate_error}") from None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise Unavailable(f"cannot reach {addr}: {str(exc) or type(exc).__name__} (if this "
                              "persists, this node's certificate may have expired or been "
                              "revoked)") from None

    @staticmethod
    def _json_reply(addr: str, status: int, raw: bytes) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict):
            raise Unavailable(f"{addr} sent a malformed reply (HTTP {status})")
        if "error" in data:
            raise from_reply(status, data["error"])
        return data

    async def fetch_ca(self, addr: str, digest: str) -> bytes:
        """The CA certificate of the manager at ``addr``, accepted only if its digest is the
        one the join token pins (no trust on first use)."""
        http = self.ctx.http
        assert http is not None
        try:
            async with http.get(f"https://{addr}/v1/cluster/ca",
                                ssl=pki.unverified_client_context(),
                                timeout=aiohttp.ClientTimeout(total=30)) as resp:
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise Unavailable(f"cannot reach manager at {addr}: {str(exc) or type(exc).__name__}"
                              ) from None
        pem = data.get("ca_cert") if isinstance(data, dict) else None
        if not isinstance(pem, str):
            raise Unavailable(f"{addr} did not send a cluster CA (is it a shoal manager in a "
                              "cluster?)")
        try:
            got = pki.ca_digest(pem)
        except pki.PkiError as exc:
            raise CaMismatch(f"{addr} sent a malformed CA certificate: {exc}", "token") \
                from None
        if got != digest:
            raise CaMismatch(f"the manager at {addr} belongs to another cluster: its CA "
                             "does not match the join token's CA digest (refusing to join)",
                             "token")
        return pem.encode()

    # ================================================================== renewal
    async def renew(self) -> pki.CertInfo:
        """Get a new certificate for a new key, authenticated by the current certificate."""
        ident, store = self.ctx.identity, self.ctx.store
        if ident is None or store is None or self.cert is None:
            raise NotInCluster("this node is not part of a cluster")
        key = pki.new_key()
        csr = pki.make_csr(key).decode()
        snap = store.snapshot()
        cert: bytes | None = None
        errors: list[str] = []
        if ident.role == NodeRole.MANAGER and store.is_ready():
            me = snap.nodes.get(ident.node_id)
            if me is not None:
                with contextlib.suppress(ApiError):
                    cert = self.issue(snap, csr, me.id, me.role.value, me.addr)
        if cert is None:
            managers = sorted((n for n in snap.nodes.values()
                               if n.role is NodeRole.MANAGER and n.id != ident.node_id),
                              key=lambda n: n.addr != (store.leader_addr() or "").split(":")[0])
            for m in managers:
                try:
                    reply = await self.call(m.api_addr, "/v1/cluster/renew", {"csr": csr})
                    cert = str(reply["cert"]).encode()
                    break
                except (ApiError, KeyError) as exc:
                    errors.append(f"{m.hostname}: {exc}")
        if cert is None:
            raise Unavailable("certificate renewal failed: " + ("; ".join(errors) or
                                                               "no manager to ask"))
        c = store.snapshot().cluster  # (a CA rotation: the new root may be newer than ca.pem)
        ca_pem = pki.bundle(c.ca_cert, c.ca_next_cert) if c.ca_phase and c.ca_cert else \
            self.files.ca_pem()
        try:
            info = pki.verify_issued(cert, ca_pem, key)
        except pki.PkiError as exc:
            raise Unavailable(f"renewed certificate is not valid: {exc}") from exc
        if info.subject_id != ident.node_id:
            raise Unavailable("renewed certificate is for another node")
        self.files.save(ca_pem, cert, pki.key_pem(key))
        self.load()
        self.renewals += 1
        log.info("renewed this node's certificate (serial %x, valid until %s)", info.serial,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.not_after)))
        return info

    async def renew_loop(self) -> None:
        """Renew once ``cert_renew_fraction`` of the certificate's lifetime has passed; retry
        every few seconds (at most 30 s) while no manager answers."""
        fraction = self.ctx.config.cert_renew_fraction
        while True:
            cert = self.cert
            if cert is None:
                await asyncio.sleep(1.0)
                continue
            due = cert.issued_at + cert.lifetime * fraction
            wait = due - time.time()
            if wait > 0:
                await asyncio.sleep(min(wait, 30.0))
                continue
            try:
                await self.renew()
            except ApiError as exc:
                retry = min(30.0, max(1.0, cert.lifetime / 20))
                left = cert.not_after - time.time()
                log.warning("%s; retrying in %.0f s (certificate expires in %.0f s)",
                            exc.message, retry, left)
                await asyncio.sleep(retry)


__all__ = ["Security"]
