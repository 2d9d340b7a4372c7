"""The membership lifecycle of this node: uninitialised → (init | join) → member → (leave).

Owns: ``init`` (a new cluster: its CA, this node's certificate and keys, the first Raft voter
and the cluster's first records), ``join`` with a token (pin the CA by the token's digest, get
a certificate for a key made here; then ``_finish_join`` in the background: keys over mTLS,
node.json, catch-up — resumed after a restart from the saved Admitted record), ``leave`` (also
abandoning a join still finishing), and the undo of a membership (``_abandon_membership``).
init/join/leave are serialised by ``_lock`` (the VoterChanges lock).

Must not touch: the admission of other nodes (shoal.node.control.admission), the join protocol's
records and retry loop (shoal.node.joining), the role switch (shoal.node.roleswitch) or the
construction of components (shoal.node.agent, which mixes this class into its Agent, starts and
stops the member components and owns the attributes declared below). Nothing but
shoal.node.agent imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import secrets
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from shoal.node import pki, sealing, upgrade
from shoal.node.config import AgentConfig, NodeIdentity
from shoal.node.context import NodeContext, new_id
from shoal.node.describe import own_description
from shoal.node.errors import (
    AlreadyInCluster,
    ApiError,
    BadRequest,
    TokenError,
    Unavailable,
)
from shoal.node.joining import Admitted, JoinCall, JoinKey, request_join
from shoal.node.security import Security
from shoal.node.tokens import new_secret, parse_token
from shoal.node.worker import Worker
from shoal.raft import generic
from shoal.raft.errors import StoreError
from shoal.raft.models import Node, NodeRole, to_dict
from shoal.raft.schema import SCHEMA
from shoal.raft.state import ClusterState

log = logging.getLogger("shoal.agent")


class MembershipLifecycle:
    """Mixed into shoal.node.agent.Agent: init, join and leave (see the module)."""

    # --- state the Agent constructs (Agent.__init__ / _start_member)
    config: AgentConfig
    hostname: str
    data_dir: Path
    ctx: NodeContext
    security: Security
    _worker: Worker | None
    _leaving: bool
    _stop: asyncio.Event
    # --- this class's own state (initialised in Agent.__init__)
    _lock: asyncio.Lock
    _joining: asyncio.Task[None] | None
    _join_stage: str
    # --- what the Agent provides
    _start_member: Callable[[NodeIdentity], None]
    _stop_member: Callable[[], Coroutine[Any, Any, None]]
    _wait_for: Callable[[Any, float, str], Coroutine[Any, Any, None]]
    _remove_raft_files: Callable[[], None]

    def _self_node(self, node_id: str, role: str) -> dict[str, Any]:
        # (its description: refreshed later by shoal.node.describe when it differs; a cluster
        # below schema 11 keeps no arch)
        own = own_description()
        return to_dict(Node(id=node_id, hostname=self.hostname, addr=self.config.advertise_addr,
                            api_port=self.config.api_port, raft_port=self.config.raft_port,
                            role=NodeRole(role), gossip_port=self.config.gossip_port,
                            memory_bytes=own.memory_bytes, cpus=own.cpus, arch=own.arch,
                            # (--generic-resource: checked by AgentConfig.validate)
                            generic_resources=generic.updated(
                                {}, self.config.generic_resources, [])))

    async def init(self, cluster_cidr: str = "", default_addr_pool: str = ""
                   ) -> dict[str, Any]:
        async with self._lock:
            self._refuse_if_member()
            if cluster_cidr or default_addr_pool:  # refuse a bad network before anything
                try:
                    ClusterState._networks({"cluster_cidr": cluster_cidr,
                                            "default_addr_pool": default_addr_pool})
                except StoreError as exc:
                    raise BadRequest(exc.message, exc.field or "cluster_cidr") from None
            node_id, cluster_id = new_id(), secrets.token_hex(16)
            # the cluster CA and this node's certificate; the keys only managers get
            now = time.time()
            ca_pem, ca_key = pki.create_ca(cluster_id, now)
            ca = pki.CertificateAuthority(ca_pem, ca_key)
            key = pki.new_key()
            cert = ca.issue(pki.make_csr(key), node_id, pki.ROLE_MANAGER, cluster_id, now,
                            self.config.cert_lifetime, self.config.advertise_addr)
            self.security.files.save(ca_pem, cert, pki.key_pem(key))
            manager_key = sealing.new_key()
            identity = NodeIdentity(node_id=node_id, cluster_id=cluster_id, role="manager",
                                    raft_password=secrets.token_urlsafe(32),
                                    voters=[f"{self.config.advertise_addr}:"
                                            f"{self.config.raft_port}"],
                                    gossip_key=secrets.token_bytes(32), manager_key=manager_key)
            self._start_member(identity)
            store = self.ctx.require_member()
            try:
                await self._wait_for(store.is_leader, 15.0, "this node to become leader")
                now = time.time()
                sec = self.security
                await self.ctx.propose({"op": "cluster_init", "cluster_id": cluster_id, "now": now,
                                    "cluster_cidr": cluster_cidr,
                                    "default_addr_pool": default_addr_pool,
                                    "worker_secret": sec.seal_token_secret("worker",
                                                                           new_secret()),
                                    "manager_secret": sec.seal_token_secret("manager",
                                                                            new_secret()),
                                    "digest": ca.digest, "schema": SCHEMA})
                await self.ctx.propose({"op": "ca_init", "ca_cert": ca_pem.decode(),
                                    "ca_key": sealing.seal(manager_key, ca_key,
                                                           sealing.AAD_CA_KEY)})
                await self.ctx.propose({"op": "node_add", "now": now,
                                    "node": self._self_node(node_id, "manager")})
            except ApiError:
                await self._abandon_membership()
                raise
            identity.save(self.data_dir)
            log.info("initialised cluster %s; this node %s is the leader", cluster_id[:12],
                     node_id)
            return {"node_id": node_id, "cluster_id": cluster_id}

    async def _abandon_membership(self) -> None:
        await self._stop_member()
        self.ctx.identity = None
        NodeIdentity.remove(self.data_dir)
        self.security.clear(remove_files=True)
        self._remove_raft_files()

    def _refuse_if_member(self) -> None:
        if self.ctx.identity is not None:
            raise AlreadyInCluster("this node is already part of a cluster "
                                   "(`shoal leave` first)")
        if self._joining is not None and not self._joining.done():
            raise AlreadyInCluster("this node was admitted to a cluster and is finishing its "
                                   "join (`shoal info`; `shoal leave` abandons it)")

    async def join(self, token: str, remote: str) -> dict[str, Any]:
        """Join with a token: pin the manager's CA by the token's digest, get a certificate
        for a key made here (admission: only this phase fails on a timeout), then finish the
        join in the background (shoal.node.joining): keys over mTLS, node.json, catch-up.
        Waits ``join_wait`` for the catch-up, else answers ``catching_up``."""
        async with self._lock:
            self._refuse_if_member()
            token = token.strip()
            try:
                digest, _secret = parse_token(token)
            except TokenError as exc:
                raise BadRequest(str(exc), "token") from None
            if ":" not in remote:
                remote = f"{remote}:{self.config.api_port}"
            sec = self.security
            ca_pem = await sec.fetch_ca(remote, digest)  # CaMismatch unless pinned digest
            # the same key on every attempt (kept in the data dir until the join succeeded):
            # the node id follows from it, so a retry finds the node a lost reply added
            join_key = JoinKey(self.data_dir)
            key = join_key.load_or_create()
            body = {"token": token, "csr": pki.make_csr(key).decode(),
                    "node": self._self_node("", "worker"), "schema": upgrade.SCHEMA}
            client_ctx = pki.client_context(ca_pem)

            async def call(b: dict[str, Any], timeout: float) -> dict[str, Any]:
                # server-authenticated TLS (pinned CA, manager certificate): no cert yet
                return await sec.call(remote, "/v1/cluster/join", b, ctx=client_ctx,
                                      timeout=timeout)

            data = await request_join(call, body, self.config.join_retry)
            try:
                node_id, role, cert = str(data["node_id"]), str(data["role"]), \
                    str(data["cert"]).encode()
                info = pki.verify_issued(cert, ca_pem, key)
            except (KeyError, pki.PkiError) as exc:
                raise Unavailable(f"the manager at {remote} sent no usable certificate: "
                                  f"{exc}") from None
            if (info.subject_id, info.role) != (node_id, role):
                raise Unavailable(f"the manager at {remote} sent a certificate for "
                                  f"{info.role} {info.subject_id}, not {role} {node_id}")
            # admitted: from here on this node does not give up on its own
            sec.files.save(ca_pem, cert, pki.key_pem(key))
            admitted = Admitted(remote, node_id, role, info.cluster_id)
            admitted.save(self.data_dir)
            log.info("admitted to cluster %s as %s %s", info.cluster_id[:12], role, node_id)
            task = self._joining = asyncio.create_task(self._finish_join(admitted),
                                                       name="join")
        done, _ = await asyncio.wait([task], timeout=self.config.join_wait)
        if task in done:
            if task.cancelled():
                raise Unavailable("the agent is stopping: it finishes this join when it "
                                  "starts again" if self._stop.is_set() else
                                  "the join was abandoned (`shoal leave`)")
            task.result()  # a refusal after admission (the node was removed meanwhile)
        return {"node_id": node_id, "cluster_id": info.cluster_id, "role": role,
                "catching_up": task not in done}

    async def _finish_join(self, adm: Admitted) -> None:
        """After admission: fetch the keys (retried until a manager answers or refuses),
        write node.json and become a member, then wait for the replica/feed to catch up,
        logging progress. A refusal (the node was removed meanwhile) undoes the join."""
        sec = self.security
        self._join_stage = "fetching keys"
        try:
            sec.load()
            # the Raft secret, gossip key (and manager key) travel over mTLS only; retried
            # without a deadline (a manager busy with a join storm answers late)
            retry = dataclasses.replace(self.config.join_retry, deadline=math.inf)

            def fetch(path: str) -> JoinCall:
                return lambda b, t: sec.call(adm.remote, path, b, timeout=t)
            keys = await request_join(fetch("/v1/cluster/keys"), {}, retry)
            manager_key = b""
            if adm.role == "manager":
                mk = await request_join(fetch("/v1/cluster/manager-keys"), {}, retry)
                manager_key = bytes.fromhex(str(mk["manager_key"]))
            identity = NodeIdentity(node_id=adm.node_id, cluster_id=adm.cluster_id,
                                    role=adm.role, raft_password=str(keys["raft_password"]),
                                    voters=[str(v) for v in keys["voters"]],
                                    managers=[str(m) for m in keys.get("managers", [])]
                                    or [adm.remote],
                                    gossip_key=bytes.fromhex(str(keys["gossip_key"])),
                                    manager_key=manager_key)
        except (ApiError, OSError, pki.PkiError, KeyError, ValueError, TypeError) as exc:
            why = exc.message if isinstance(exc, ApiError) else f"malformed keys: {exc!r}"
            log.error("the cluster refused this node after admitting it (%s): join again",
                      why)
            sec.clear(remove_files=True)
            Admitted.remove(self.data_dir)
            self._join_stage = ""
            if isinstance(exc, ApiError):
                raise
            raise Unavailable(f"the manager at {adm.remote} sent {why}") from None
        async with self._lock:
            identity.save(self.data_dir)  # a restart resumes as this node from here on
            Admitted.remove(self.data_dir)
            JoinKey(self.data_dir).forget()
            self._start_member(identity)
        self._join_stage = ""
        started = time.monotonic()
        report = started + 5.0
        while (store := self.ctx.store) is not None and not (
                store.is_ready() and adm.node_id in store.snapshot().nodes):
            if time.monotonic() >= report:
                report += 5.0
                log.info("admitted %s %s: its %s is catching up (index %d, %.0f s)",
                         adm.role, adm.node_id, "Raft replica" if adm.role == "manager"
                         else "state feed", store.index, time.monotonic() - started)
            await asyncio.sleep(0.05)
        if store is not None:
            log.info("joined cluster %s as %s %s (caught up in %.1f s)", adm.cluster_id[:12],
                     adm.role, adm.node_id, time.monotonic() - started)

    async def leave(self, force: bool) -> dict[str, Any]:
        async with self._lock:
            joining = self._joining
            if self.ctx.identity is None and joining is not None and not joining.done():
                # admitted, keys not fetched yet: abandon (the join key stays: joining
                # again is the same node)
                joining.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await joining
                self.security.clear(remove_files=True)
                Admitted.remove(self.data_dir)
                return {"node_id": "", "left": True}
            self.ctx.require_member()
            assert self.ctx.identity is not None and self._worker is not None
            identity = self.ctx.identity
            raft = self.ctx.raft
            if identity.role == NodeRole.MANAGER:
                if not force:
                    raise BadRequest("this node is a manager: leaving can cost the cluster its "
                                     "quorum; use `shoal leave --force` (demote it first)",
                                     "force")
                with contextlib.suppress(StoreError):
                    if raft is not None and len(raft.voters()) > 1:
                        await raft.remove_voter(f"{self.config.advertise_addr}:"
                                                f"{self.config.raft_port}")
            with contextlib.suppress(ApiError):
                await self.ctx.propose({"op": "node_remove", "id": identity.node_id,
                                    "now": time.time(), "force": True, "leave": True},
                                   timeout=3.0)
            await self._worker.stop_all()
            self._leaving = True  # announce a graceful leave on gossip
            try:
                await self._abandon_membership()
            finally:
                self._leaving = False
            return {"node_id": identity.node_id, "left": True}
