"""The agent: the one long-running process every node runs.

Owns: wiring the components of a node and its membership lifecycle —
uninitialised → (init | join) → member → (leave) → uninitialised. As a member it runs:

* the cluster state: the RaftStore on managers (a voter); on workers a StateFeed fed by
  the managers over mTLS (shoal.node.feed) — workers hold no Raft secret,
* a leadership watcher that starts/stops the LeaderLoop (orchestrator + scheduler),
* the heartbeat sender (to every manager) and, on managers, the heartbeat table,
* the Worker reconciler over the runtime Controller,
* the API (shoal.node.api): a unix socket for the CLI, TCP for other nodes.

Must not touch: policy (orchestrator/scheduler/state machine own it) or the runtime's
internals. Everything here is glue, so it reads top to bottom.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgpack

from shoal.gossip import Config as GossipConfig
from shoal.node import pki, sealing, shutdown, transfer, views
from shoal.node.config import AgentConfig, NodeIdentity
from shoal.node.errors import (
    AlreadyInCluster,
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    NotInCluster,
    NotManager,
    Unauthenticated,
    Unavailable,
    from_store_error,
)
from shoal.node.feed import StateFeed
from shoal.node.leader import LeaderLoop
from shoal.node.membership import GossipControl, Membership, derive_gossip_key
from shoal.node.mesh import Mesh
from shoal.node.secrets import SecretsApi
from shoal.node.security import Security
from shoal.node.tokens import (
    TokenError,
    make_token,
    new_secret,
    parse_token,
    role_for,
)
from shoal.node.transfer import Transfer
from shoal.node.version import version
from shoal.node.worker import Worker
from shoal.raft.errors import CommandRejected, StoreError
from shoal.raft.models import Node, NodeRole, NodeState, Service, node_from_dict, to_dict
from shoal.raft.state import ClusterState, Snapshot
from shoal.raft.store import RaftStore
from shoal.raft.validate import validate_replicas, validate_spec
from shoal.runtime.controller import ProcessController, RuntimeConfig

log = logging.getLogger("shoal.agent")


def new_id() -> str:
    return secrets.token_hex(10)


def _total_memory() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


class Agent:
    def __init__(self, config: AgentConfig, hostname: str | None = None) -> None:
        config.validate()
        self.config = config
        self.hostname = hostname or socket.gethostname()
        self.data_dir = config.data_dir
        self.identity: NodeIdentity | None = None
        self.store: RaftStore | StateFeed | None = None
        # set (and replaced) after every applied command: wakes workers' state polls
        self._applied = asyncio.Event()
        self.runtime = ProcessController(RuntimeConfig(data_dir=self.data_dir))
        self.heartbeats: dict[str, float] = {}
        self._leader_wakeup = asyncio.Event()
        self._worker_wakeup = asyncio.Event()
        self._member_tasks: list[asyncio.Task[Any]] = []
        self._leader_task: asyncio.Task[None] | None = None
        self._worker: Worker | None = None
        self._http: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()  # serialises init/join/leave and membership changes
        self._pending_membership: asyncio.Future[int] | None = None
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.membership: Membership | None = None
        self.mesh: Mesh | None = None  # task network, routing mesh, DNS (node/mesh.py)
        self._leaving = False
        self.security = Security(self)  # TLS identity, peer checks, CA (node/security.py)
        self.secrets = SecretsApi(self)  # secrets/configs and task files (node/secrets.py)
        self.transfer = Transfer(self)  # image pulls and task logs between nodes
        self.gossip = GossipControl(self)  # gossip info, keyring, rotation (membership.py)
        self._refused_logged = 0.0
        # promotion/demotion of this node (see _switch_role): one switch at a time
        self._role_lock = asyncio.Lock()
        self._role_task: asyncio.Task[str | None] | None = None
        self._role_wakeup = asyncio.Event()
        self._role_retry_at = 0.0

    # ================================================================== lifecycle
    async def run(self) -> None:
        from shoal.node.api import ApiServer

        self._loop = asyncio.get_running_loop()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        await self.runtime.recover()
        api = ApiServer(self)
        await api.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._stop.set)
        identity = NodeIdentity.load(self.data_dir)
        if identity is not None:
            log.info("rejoining cluster %s as %s %s", identity.cluster_id[:12], identity.role,
                     identity.node_id)
            self._start_member(identity)
        log.info("agent ready: api unix://%s and %s:%d", self.config.socket_path,
                 self.config.bind_addr, self.config.api_port)
        try:
            await self._stop.wait()
        finally:
            log.info("agent stopping (tasks keep running)")
            stopping = time.monotonic()
            self._stop.set()
            self._wake()  # held state polls answer "stopping" now (state_since)
            if self.identity is not None:  # a planned restart: see node/shutdown.py
                await shutdown.prepare_restart(
                    self.store if isinstance(self.store, RaftStore) else None,
                    self.membership, self.config.restart_grace, self.config.stop_step_timeout)
            await self._stop_member()
            await api.stop()
            await self.runtime.close()
            await self._http.close()
            log.info("agent stopped in %.2f s", time.monotonic() - stopping)

    def _start_member(self, identity: NodeIdentity) -> None:
        self.identity = identity
        try:
            self.security.load()
        except (OSError, pki.PkiError) as exc:
            log.error("no usable TLS identity in %s (%s): this node cannot talk to other "
                      "nodes; `shoal leave` and join again", self.security.files.dir, exc)
        manager = identity.role == NodeRole.MANAGER
        store = self._make_store(identity)
        self.store = store
        store.add_listener(self._on_apply)
        # the mesh reads whichever store is current: promotion/demotion swaps it in place
        self.mesh = Mesh(self.data_dir, identity.node_id, self.config.advertise_addr,
                         snapshot=self._current_snapshot, is_ready=self._current_ready,
                         live_tasks=lambda: self.runtime.tasks().keys())
        self._worker = Worker(identity.node_id, self.store, self.runtime, self._worker_wakeup,
                              self.config.reconcile_interval, mesh=self.mesh,
                              task_files=self.secrets.resolve_task_files,
                              pull_image=self.transfer.pull_image)
        self.membership = self._make_membership(identity)
        self._member_tasks = [
            asyncio.create_task(self._start_gossip(self.membership), name="gossip-start"),
            asyncio.create_task(self._worker.run(), name="worker"),
            asyncio.create_task(self.mesh.run(), name="mesh"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self.security.renew_loop(), name="cert-renew"),
            asyncio.create_task(self._role_watch(), name="role-watch"),
        ]
        if manager:
            self._member_tasks.append(asyncio.create_task(self._leadership_loop(), name="lead"))
        else:
            assert isinstance(store, StateFeed)
            self._member_tasks.append(asyncio.create_task(store.run(), name="state-feed"))

    def _make_store(self, identity: NodeIdentity) -> RaftStore | StateFeed:
        """A manager's Raft voter or a worker's state feed (not started: the caller runs
        the feed's ``run``). Built on the event loop's thread, the main thread: pysyncobj's
        tick thread dies with the thread that created it."""
        if identity.role == NodeRole.MANAGER:
            return RaftStore(
                self_addr=self._raft_self,
                peers=identity.voters,
                data_dir=self.data_dir / "raft",
                password=identity.raft_password,
                config=self.config.raft,
                bind_addr=f"{self.config.bind_addr}:{self.config.raft_port}",
            )
        # (identities written before workers were fed over mTLS know only Raft addresses)
        seeds = identity.managers or [f"{v.rsplit(':', 1)[0]}:{self.config.api_port}"
                                      for v in identity.voters]
        return StateFeed(
            identity.node_id, seeds,
            call_bytes=lambda addr, path, body, timeout: self.security.call_bytes(
                addr, path, body, timeout=timeout),
            call_json=lambda addr, path, body, timeout: self.security.call(
                addr, path, body, timeout=timeout),
            config=self.config.feed, on_managers=self._managers_changed)

    @property
    def _raft_self(self) -> str:
        return f"{self.config.advertise_addr}:{self.config.raft_port}"

    def _current_snapshot(self) -> Snapshot | None:
        store = self.store
        return store.snapshot() if store is not None else None

    def _current_ready(self) -> bool:
        store = self.store
        return store is not None and store.is_ready()

    def _managers_changed(self, managers: list[str]) -> None:
        """A worker's list of manager API addresses changed: keep it for the next start."""
        ident = self.identity
        if ident is not None and ident.role == NodeRole.WORKER and ident.managers != managers:
            ident.managers = list(managers)
            with contextlib.suppress(OSError):
                ident.save(self.data_dir)

    async def _stop_member(self) -> None:
        if self._role_task is not None and not self._role_task.done():
            self._role_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._role_task
        self._role_task = None
        if self._worker:
            self._worker.close()
        for t in self._member_tasks:
            t.cancel()
        if self._leader_task:
            self._leader_task.cancel()
        if self.mesh is not None:
            self.mesh._closed = True  # its loop must not start another pass
        pending = [*self._member_tasks, *([self._leader_task] if self._leader_task else [])]
        if pending:
            _, stuck = await asyncio.wait(pending, timeout=10)
            for t in stuck:
                log.error("member task %s did not stop within 10 s", t.get_name())
        self._member_tasks = []
        self._leader_task = None
        if self.mesh is not None:  # on leave: tasks are gone, remove bridge/routes/NAT too
            mesh, self.mesh = self.mesh, None
            with contextlib.suppress(Exception):
                await mesh.close(teardown=self._leaving)
        if self.membership is not None:
            membership, self.membership = self.membership, None
            with contextlib.suppress(Exception):
                await membership.close(leave=self._leaving)
        if self.store:
            store, self.store = self.store, None
            await asyncio.to_thread(store.close)

    # ------------------------------------------------------------------ gossip
    def _make_membership(self, identity: NodeIdentity) -> Membership:
        key = getattr(identity, "gossip_key", b"") or derive_gossip_key(identity.raft_password)
        preset = GossipConfig.local() if self.config.gossip_preset == "local" else \
            GossipConfig.lan()
        meta = {"role": identity.role, "hostname": self.hostname,
                "api": f"{self.config.advertise_addr}:{self.config.api_port}",
                "version": version()}
        return Membership(identity.node_id, self.config.advertise_addr, self.config.gossip_port,
                          key, meta, preset, on_change=lambda _ev: self._leader_wakeup.set(),
                          extra_keys=identity.gossip_extra_keys,
                          refresh_keys=self.gossip.refresh_keys)

    async def _start_gossip(self, membership: Membership) -> None:
        def seeds() -> list[str]:
            store = self.store
            if store is None or self.identity is None:
                return []
            return [f"{n.addr}:{n.gossip_port}" for n in store.snapshot().nodes.values()
                    if n.id != self.identity.node_id]
        try:
            await membership.start(seeds)
        except OSError as exc:
            log.error("gossip could not start on %s:%d: %s (failure detection falls back "
                      "to heartbeats)", self.config.advertise_addr, self.config.gossip_port, exc)

    def gossip_view(self) -> dict[str, str]:
        m = self.membership
        return m.view() if m is not None and m.list.running else {}

    def _on_apply(self, _index: int) -> None:
        """Runs after each applied command: on pysyncobj's tick thread (managers) or on the
        event loop (a worker's StateFeed)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._leader_wakeup.set()
        self._worker_wakeup.set()
        self._role_wakeup.set()
        applied, self._applied = self._applied, asyncio.Event()
        applied.set()
        if self.mesh is not None:
            self.mesh.wake()

    async def _leadership_loop(self) -> None:
        assert self.store is not None
        last_voters: list[str] = []
        while True:
            store = self.store
            if store is None:
                return
            if store.is_leader() and (self._leader_task is None or self._leader_task.done()):
                loop = LeaderLoop(store, self.heartbeats, self.config.orchestrator,
                                  self._leader_wakeup, gossip=self.gossip_view,
                                  restarts=self.gossip.restarts)
                self._leader_task = asyncio.create_task(loop.run(), name="leader-loop")
            voters = store.voters()
            if voters != last_voters and self.identity and store.is_ready():
                last_voters = voters
                if voters != self.identity.voters:
                    self.identity.voters = voters
                    self.identity.save(self.data_dir)
            await asyncio.sleep(0.05)

    async def _heartbeat_loop(self) -> None:
        assert self.identity is not None and self._http is not None
        node_id = self.identity.node_id
        while True:
            store = self.store
            if store is not None and store.is_ready():
                managers = [n for n in store.snapshot().nodes.values()
                            if n.role is NodeRole.MANAGER]
                await asyncio.gather(*(self._send_heartbeat(m, node_id) for m in managers))
            await asyncio.sleep(self.config.heartbeat_interval)

    async def _send_heartbeat(self, manager: Node, node_id: str) -> None:
        assert self._http is not None
        if manager.id == node_id:
            self.heartbeats[node_id] = time.monotonic()
            return
        # mTLS: TLS checks the receiver holds a manager certificate of this cluster
        try:
            await self.security.call(manager.api_addr, "/v1/cluster/heartbeat",
                                     {"node_id": node_id}, timeout=1.0)
        except Unauthenticated as exc:  # e.g. this node was removed: its cert is refused
            now = time.monotonic()
            if now - self._refused_logged > 60:
                self._refused_logged = now
                log.warning("manager %s refuses this node: %s", manager.hostname, exc.message)
        except ApiError:
            pass

    def record_heartbeat(self, node_id: str) -> None:
        """A heartbeat from ``node_id``; the API has checked it is the caller's own id."""
        if self.identity is None or self.identity.role != NodeRole.MANAGER:
            raise NotManager("heartbeats go to managers")
        self.heartbeats[node_id] = time.monotonic()
        if self.store and self.store.is_leader():
            node = self.store.snapshot().nodes.get(node_id)
            if node is not None and node.state is not NodeState.READY:
                self._leader_wakeup.set()

    # ================================================================== helpers
    def require_member(self) -> RaftStore | StateFeed:
        if self.store is None or self.identity is None:
            raise NotInCluster("this node is not part of a cluster: run `shoal init` or "
                               "`shoal join` first")
        return self.store

    def require_manager(self) -> RaftStore:
        store = self.require_member()
        assert self.identity is not None
        if self.identity.role != NodeRole.MANAGER or not isinstance(store, RaftStore):
            raise NotManager("this node is a worker: cluster state can only be viewed or "
                             "changed on a manager")
        if not store.is_ready():
            raise Unavailable("this manager has not caught up with the cluster yet; retry")
        return store

    async def propose(self, cmd: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        store = self.require_member()
        try:
            return await store.propose(cmd, timeout)
        except StoreError as exc:
            raise from_store_error(exc) from exc

    async def _wait_for(self, pred: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise Unavailable(f"timed out after {timeout:g}s waiting for {what}")
            await asyncio.sleep(0.02)

    def _self_node(self, node_id: str, role: str) -> dict[str, Any]:
        return to_dict(Node(id=node_id, hostname=self.hostname, addr=self.config.advertise_addr,
                            api_port=self.config.api_port, raft_port=self.config.raft_port,
                            role=NodeRole(role), gossip_port=self.config.gossip_port,
                            memory_bytes=_total_memory(),
                            cpus=float(len(os.sched_getaffinity(0)))))

    # ================================================================== init / join / leave
    async def init(self, cluster_cidr: str = "") -> dict[str, Any]:
        async with self._lock:
            if self.identity is not None:
                raise AlreadyInCluster("this node is already part of a cluster "
                                       "(`shoal leave` first)")
            if cluster_cidr:  # refuse a bad network before anything is created
                try:
                    ClusterState._networks({"cluster_cidr": cluster_cidr})
                except StoreError as exc:
                    raise BadRequest(exc.message, "cluster_cidr") from None
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
            store = self.require_member()
            try:
                await self._wait_for(store.is_leader, 15.0, "this node to become leader")
                now = time.time()
                sec = self.security
                await self.propose({"op": "cluster_init", "cluster_id": cluster_id, "now": now,
                                    "cluster_cidr": cluster_cidr,
                                    "worker_secret": sec.seal_token_secret("worker",
                                                                           new_secret()),
                                    "manager_secret": sec.seal_token_secret("manager",
                                                                            new_secret()),
                                    "digest": ca.digest})
                await self.propose({"op": "ca_init", "ca_cert": ca_pem.decode(),
                                    "ca_key": sealing.seal(manager_key, ca_key,
                                                           sealing.AAD_CA_KEY)})
                await self.propose({"op": "node_add", "now": now,
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
        self.identity = None
        NodeIdentity.remove(self.data_dir)
        self.security.clear(remove_files=True)
        self._remove_raft_files()

    async def join(self, token: str, remote: str) -> dict[str, Any]:
        """Join with a token: pin the manager's CA by the token's digest, get a certificate
        for a key made here, then fetch the cluster's keys over mTLS with it."""
        async with self._lock:
            if self.identity is not None:
                raise AlreadyInCluster("this node is already part of a cluster "
                                       "(`shoal leave` first)")
            token = token.strip()
            try:
                digest, _secret = parse_token(token)
            except TokenError as exc:
                raise BadRequest(str(exc), "token") from None
            if ":" not in remote:
                remote = f"{remote}:{self.config.api_port}"
            sec = self.security
            ca_pem = await sec.fetch_ca(remote, digest)  # CaMismatch unless pinned digest
            key = pki.new_key()
            body = {"token": token, "csr": pki.make_csr(key).decode(),
                    "node": self._self_node("", "worker")}
            # server-authenticated TLS (pinned CA, manager certificate): we have no cert yet
            data = await sec.call(remote, "/v1/cluster/join", body,
                                  ctx=pki.client_context(ca_pem), timeout=30)
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
            sec.files.save(ca_pem, cert, pki.key_pem(key))
            try:
                sec.load()
                # the Raft secret, gossip key (and manager key) travel over mTLS only
                keys = await sec.call(remote, "/v1/cluster/keys", {})
                manager_key = b""
                if role == "manager":
                    mk = await sec.call(remote, "/v1/cluster/manager-keys", {})
                    manager_key = bytes.fromhex(str(mk["manager_key"]))
                identity = NodeIdentity(node_id=node_id, cluster_id=info.cluster_id, role=role,
                                        raft_password=str(keys["raft_password"]),
                                        voters=[str(v) for v in keys["voters"]],
                                        managers=[str(m) for m in keys.get("managers", [])]
                                        or [remote],
                                        gossip_key=bytes.fromhex(str(keys["gossip_key"])),
                                        manager_key=manager_key)
            except (ApiError, KeyError, ValueError, TypeError) as exc:
                sec.clear(remove_files=True)
                if isinstance(exc, ApiError):
                    raise
                raise Unavailable(f"the manager at {remote} sent malformed keys: {exc!r}"
                                  ) from None
            self._start_member(identity)
            store = self.require_member()
            try:
                await self._wait_for(
                    lambda: store.is_ready() and node_id in store.snapshot().nodes,
                    self.config.join_timeout, "this node's replica to catch up")
            except ApiError:
                await self._abandon_membership()
                raise
            identity.save(self.data_dir)
            log.info("joined cluster %s as %s %s", identity.cluster_id[:12], identity.role,
                     node_id)
            return {"node_id": node_id, "cluster_id": identity.cluster_id, "role": identity.role}

    async def accept_join(self, token: Any, node: Any, csr: Any = None) -> dict[str, Any]:
        """A manager admits a new node (called over TLS by the joining node's agent, which has
        no certificate yet: the token authenticates it). Nothing is written unless the token
        is valid. The manager picks the node id and signs the node's key for it."""
        store = self.require_manager()
        if not isinstance(token, str) or not isinstance(node, dict) or \
                not isinstance(csr, str):
            raise BadRequest("join request needs a token, a certificate request and a node",
                             "token")
        snap = store.snapshot()
        c = snap.cluster
        worker_secret, manager_secret = self.security.token_secrets(snap)
        role = role_for(token, c.digest, worker_secret, manager_secret)
        if role is None:
            raise Forbidden("invalid join token: it does not belong to this cluster or was "
                            "rotated", "token")
        node_id = new_id()
        node = dict(node, id=node_id, role=role)
        try:
            node_from_dict(node)
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"malformed node record: {exc!r}", "node") from None
        cert = self.security.issue(snap, csr, node_id, role, str(node.get("addr", "")))
        raft_addr = f"{node.get('addr')}:{node.get('raft_port')}"
        async with self._lock:
            # Raft membership changes go one at a time: wait for the previous one
            pending = self._pending_membership
            if pending is not None and not pending.done():
                try:
                    await asyncio.wait_for(asyncio.shield(pending), self.config.join_timeout)
                except TimeoutError:
                    raise Unavailable("a previous manager join has not completed yet (is that "
                                      "node running?); retry later") from None
            # record first (commits with the current quorum), then add the voter: that
            # change commits only once the new manager runs, after it fetched its keys
            await self.propose({"op": "node_add", "now": time.time(), "node": node})
            if role == "manager" and raft_addr not in store.voters():
                self._pending_membership = store.start_add_voter(raft_addr)
        return {"cluster_id": c.cluster_id, "node_id": node_id, "role": role,
                "cert": cert.decode()}

    def member_keys(self, peer: pki.CertInfo | None) -> dict[str, Any]:
        """What a member needs (voters, manager addresses, gossip key; the Raft secret if it
        is a manager); mTLS members only."""
        store = self.require_manager()
        node = self.security.authorize(peer)
        assert self.identity is not None
        voters = store.voters()
        if node.role is NodeRole.MANAGER and node.raft_addr not in voters:
            voters.append(node.raft_addr)  # its voter change is pending until it runs
        # the Raft secret goes to managers only: workers are fed over mTLS (node/feed.py)
        secret = self.identity.raft_password if node.role is NodeRole.MANAGER else ""
        # voter: whether the answering manager's Raft configuration already has it (a
        # promoted node starts its voter only once the leader has added it, see promote)
        return {"raft_password": secret, "voters": voters,
                "voter": node.raft_addr in store.voters(),
                "managers": [n.api_addr for n in store.snapshot().nodes.values()
                             if n.role is NodeRole.MANAGER],
                "gossip_key": self.identity.gossip_key.hex(),
                "gossip_keys": self.gossip.member_keys()}  # whole keyring, primary first

    def manager_keys(self, peer: pki.CertInfo | None) -> dict[str, Any]:
        """The managers' sealing key: manager certificates of current managers only."""
        self.require_manager()
        self.security.authorize(peer, manager=True)
        return {"manager_key": self.security.manager_key().hex()}

    # ------------------------------------------------------------------ feeding workers
    async def state_since(self, peer: pki.CertInfo | None, after: Any, wait: Any) -> bytes:
        """A worker's state poll (shoal.node.feed): the commands applied after index
        ``after`` — waiting up to ``wait`` seconds for one — or the whole state when they are
        no longer kept (or ``after`` is -1). msgpack bytes."""
        self.security.authorize(peer)
        if isinstance(after, bool) or not isinstance(after, int) or after < -1:
            raise BadRequest("after must be an index (an integer >= -1)", "after")
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 60:
            raise BadRequest("wait must be a number of seconds between 0 and 60", "wait")
        store = self.require_manager()
        if not store.is_ready():
            raise Unavailable("this manager has not caught up with the cluster yet; retry")
        deadline = time.monotonic() + float(wait)
        while after >= 0 and store.index <= after and self.store is store:
            if self._stop.is_set():  # (woken by run's shutdown) the worker asks another one
                raise Unavailable("this manager is stopping")
            applied = self._applied
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await applied.wait()
        self.security.authorize(peer)  # still a member after the wait (node rm revokes)
        msg: dict[str, Any] = {"leader": store.leader_addr()}
        changes = store.changes_since(after) if after >= 0 else None
        if changes is None:
            msg["index"], msg["state"] = await asyncio.to_thread(store.full_state)
        else:
            msg["index"], msg["commands"] = changes
        return bytes(msgpack.packb(msg, use_bin_type=True))

    async def worker_report(self, peer: pki.CertInfo | None, cmd: Any) -> dict[str, Any]:
        """A write from a worker, proposed on its behalf: only status reports for tasks on
        the calling node and the node's own removal (leaving) are accepted."""
        node = self.security.authorize(peer)
        self.require_manager()
        if not isinstance(cmd, dict):
            raise BadRequest("cmd must be a command object", "cmd")
        op = cmd.get("op")
        if op == "task_status":
            if cmd.get("node_id") != node.id:
                raise Forbidden(f"node {node.id} may only report its own tasks", "node_id")
        elif op == "node_remove":
            if cmd.get("id") != node.id:
                raise Forbidden(f"node {node.id} may only remove itself", "id")
        else:
            raise Forbidden(f"a node may not write {op!r} through the worker channel", "op")
        try:
            return {"result": await self.require_manager().propose(cmd)}
        except CommandRejected as exc:
            return {"result": {"error": {"code": exc.code, "message": exc.message,
                                         "field": exc.field}}}
        except StoreError as exc:
            raise from_store_error(exc) from exc

    def renew_certificate(self, peer: pki.CertInfo | None, csr: Any) -> dict[str, Any]:
        """Sign a new certificate for a current member, with its *current* role."""
        store = self.require_manager()
        node = self.security.authorize(peer)
        cert = self.security.issue(store.snapshot(), csr, node.id, node.role.value, node.addr)
        return {"cert": cert.decode()}

    async def leave(self, force: bool) -> dict[str, Any]:
        async with self._lock:
            store = self.require_member()
            assert self.identity is not None and self._worker is not None
            identity = self.identity
            if identity.role == NodeRole.MANAGER:
                if not force:
                    raise BadRequest("this node is a manager: leaving can cost the cluster its "
                                     "quorum; use `shoal leave --force` (demote it first)",
                                     "force")
                with contextlib.suppress(StoreError):
                    if len(store.voters()) > 1:
                        await store.remove_voter(f"{self.config.advertise_addr}:"
                                                 f"{self.config.raft_port}")
            with contextlib.suppress(ApiError):
                await self.propose({"op": "node_remove", "id": identity.node_id,
                                    "now": time.time(), "force": True}, timeout=3.0)
            await self._worker.stop_all()
            self._leaving = True  # announce a graceful leave on gossip
            try:
                await self._abandon_membership()
            finally:
                self._leaving = False
            return {"node_id": identity.node_id, "left": True}

    # ================================================================== queries and changes
    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hostname": self.hostname, "addr": self.config.advertise_addr,
                               "api_port": self.config.api_port, "member": False,
                               "version": version()}
        if self.identity and self.store:
            out.update(member=True, node_id=self.identity.node_id,
                       cluster_id=self.identity.cluster_id, role=self.identity.role,
                       is_leader=self.store.is_leader(), leader=self.store.leader_addr(),
                       ready=self.store.is_ready(), term=self.store.term(),
                       voters=self.store.voters(), index=self.store.index,
                       gossip=self.gossip.info(),
                       network=self.mesh.describe() if self.mesh is not None else None)
        return out

    def join_token(self, role: str) -> str:
        store = self.require_manager()
        if role not in ("worker", "manager"):
            raise BadRequest("role must be 'worker' or 'manager'", "role")
        snap = store.snapshot()
        worker_secret, manager_secret = self.security.token_secrets(snap)
        return make_token(snap.cluster.digest,
                          worker_secret if role == "worker" else manager_secret)

    async def rotate_token(self, role: str) -> str:
        """New secret for ``role`` (sealed in the state): the old token stops working; joined
        nodes are unaffected (they authenticate with their certificates)."""
        self.require_manager()
        if role not in ("worker", "manager"):
            raise BadRequest("role must be 'worker' or 'manager'", "role")
        await self.propose({"op": "rotate_secret", "role": role,
                            "secret": self.security.seal_token_secret(role, new_secret())})
        return self.join_token(role)

    def nodes(self) -> list[dict[str, Any]]:
        store = self.require_manager()
        snap = store.snapshot()
        gossip = self.gossip_view()
        return [views.node_view(n, snap, store, gossip=gossip) for n in
                sorted(snap.nodes.values(), key=lambda n: (n.hostname, n.id))]

    def find_node(self, snap: Snapshot, ref: str) -> Node:
        if ref in snap.nodes:
            return snap.nodes[ref]
        matches = [n for n in snap.nodes.values() if n.hostname == ref] or \
                  [n for n in snap.nodes.values() if n.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFound(f"no such node: {ref}", "node")
        raise BadRequest(f"node {ref!r} is ambiguous: {len(matches)} nodes match", "node")

    def node(self, ref: str) -> dict[str, Any]:
        store = self.require_manager()
        snap = store.snapshot()
        n = self.find_node(snap, ref)
        out = views.node_view(n, snap, store, detail=True, gossip=self.gossip_view())
        out["gossip"] = self.gossip.member_detail(n.id)  # state, incarnation, state_since
        return out

    async def update_node(self, ref: str, body: dict[str, Any]) -> dict[str, Any]:
        store = self.require_manager()
        n = self.find_node(store.snapshot(), ref)
        cmd: dict[str, Any] = {"op": "node_update", "id": n.id, "now": time.time()}
        if "availability" in body:
            if body["availability"] not in ("active", "pause", "drain"):
                raise BadRequest("availability must be active, pause or drain",
                                 "availability")
            cmd["availability"] = body["availability"]
        labels = dict(n.labels)
        add, rm = body.get("label_add", {}), body.get("label_rm", [])
        if not isinstance(add, dict) or not isinstance(rm, list):
            raise BadRequest("label_add must be a map and label_rm a list", "labels")
        labels.update({str(k): str(v) for k, v in add.items()})
        for k in rm:
            labels.pop(str(k), None)
        if labels != n.labels:
            cmd["labels"] = labels
        await self.propose(cmd)
        return self.node(n.id)

    async def remove_node(self, ref: str, force: bool) -> dict[str, Any]:
        """Remove a node. This also revokes its certificate: every node-to-node route accepts
        only certificates of current members (Security.authorize), so the removed agent is
        refused from the next request on and needs a (new) token to come back."""
        store = self.require_manager()
        n = self.find_node(store.snapshot(), ref)
        if self.identity and n.id == self.identity.node_id:
            raise BadRequest("cannot remove the node you are on; use `shoal leave`", "node")
        if n.role is NodeRole.MANAGER:
            if n.state is NodeState.READY and not force:
                raise BadRequest(f"node {n.hostname} is a ready manager: stop it first or use "
                                 "--force", "node")
            async with self._lock:
                if n.raft_addr in store.voters():
                    try:
                        await store.remove_voter(n.raft_addr)
                    except StoreError as exc:
                        raise from_store_error(exc) from exc
        await self.propose({"op": "node_remove", "id": n.id, "now": time.time(),
                            "force": force})
        return {"id": n.id, "removed": True}

    # ================================================================== promote / demote
    # The cluster side runs on the leader (a follower forwards the request over mTLS, as
    # swarmkit proxies its control API to the leader): it serialises Raft membership
    # changes with joins and can hand leadership over before demoting itself. The node
    # side (_switch_role) runs on the node whose role changes.

    async def set_role(self, ref: str, role: Any) -> dict[str, Any]:
        """`shoal node promote|demote NODE`: on any manager."""
        store = self.require_manager()
        if role not in ("manager", "worker"):
            raise BadRequest("role must be 'manager' or 'worker'", "role")
        n = self.find_node(store.snapshot(), ref)
        return await self._role_on_leader(store, n.id, str(role))

    async def _role_on_leader(self, store: RaftStore, node_id: str, role: str
                              ) -> dict[str, Any]:
        if store.is_leader():
            return await self._leader_set_role(store, node_id, role)
        leader = self._leader_node(store)
        if leader is None:
            raise Unavailable("no leader (election in progress or quorum lost); retry")
        return await self.security.call(leader.api_addr, "/v1/cluster/node-role",
                                        {"node_id": node_id, "role": role},
                                        timeout=self.config.join_timeout + 20)

    def _leader_node(self, store: RaftStore) -> Node | None:
        addr = store.leader_addr()
        return next((n for n in store.snapshot().nodes.values()
                     if n.raft_addr == addr and n.role is NodeRole.MANAGER), None)

    async def node_role_request(self, peer: pki.CertInfo | None, node_id: Any, role: Any
                                ) -> dict[str, Any]:
        """A manager forwards a promote/demote to the leader (mTLS, manager certificate)."""
        self.security.authorize(peer, manager=True)
        store = self.require_manager()
        if not isinstance(node_id, str) or not node_id:
            raise BadRequest("node_id is required", "node_id")
        if role not in ("manager", "worker"):
            raise BadRequest("role must be 'manager' or 'worker'", "role")
        if not store.is_leader():
            raise Unavailable("this manager is no longer the leader; retry")
        return await self._leader_set_role(store, node_id, str(role))

    async def _leader_set_role(self, store: RaftStore, node_id: str, role: str
                               ) -> dict[str, Any]:
        n = store.snapshot().nodes.get(node_id)
        if n is None:
            raise NotFound(f"no such node: {node_id}", "node")
        if role == "manager":
            return await self._promote(store, n)
        return await self._demote(store, n)

    @staticmethod
    def _role_result(n: Node, role: str, changed: bool, message: str,
                     warning: str = "") -> dict[str, Any]:
        return {"id": n.id, "hostname": n.hostname, "role": role, "changed": changed,
                "message": message, "warning": warning}

    async def _wait_membership_change(self) -> None:
        """Raft membership changes go one at a time (pysyncobj's own guard is dead code):
        wait for the previous one. Call with self._lock held."""
        pending = self._pending_membership
        if pending is not None and not pending.done():
            try:
                await asyncio.wait_for(asyncio.shield(pending), self.config.join_timeout)
            except TimeoutError:
                raise Unavailable("a previous manager join or promotion has not completed "
                                  "yet (is that node running?); retry later") from None

    async def _promote(self, store: RaftStore, n: Node) -> dict[str, Any]:
        if n.role is NodeRole.MANAGER and n.raft_addr in store.voters():
            return self._role_result(n, "manager", False,
                                     f"Node {n.hostname} is already a manager.")
        if n.state is not NodeState.READY:
            raise BadRequest(f"node {n.hostname} is {n.state.value}: only a running node can "
                             "be promoted (its Raft voter would count for quorum before it "
                             "runs)", "node")
        async with self._lock:
            await self._wait_membership_change()
            if n.role is not NodeRole.MANAGER:
                # first the record: the node sees it in its state feed and switches
                # (renewal then issues a manager certificate, /v1/cluster/keys the Raft
                # secret); the Raft port admits its address only from now on
                await self.propose({"op": "node_update", "id": n.id, "now": time.time(),
                                    "role": "manager"})
            fut: asyncio.Future[int] | None = None
            if n.raft_addr not in store.voters():
                # commits only once the node runs its voter (the new configuration counts it)
                fut = self._pending_membership = store.start_add_voter(n.raft_addr)
        if fut is not None:
            timeout = self.config.join_timeout
            try:
                err = await asyncio.wait_for(asyncio.shield(fut), timeout)
            except TimeoutError:
                raise Unavailable(f"node {n.hostname} is now a manager in the cluster state "
                                  f"but has not started its Raft voter within {timeout:g}s "
                                  "(it switches as soon as it can; see its agent log)") from None
            if err != 0:
                raise Unavailable(f"adding node {n.hostname} as a Raft voter failed "
                                  f"(pysyncobj reason {err}); retry")
        return self._role_result(n, "manager", True,
                                 f"Node {n.hostname} promoted to a manager in the cluster.",
                                 self._even_managers_warning(len(store.voters())))

    @staticmethod
    def _even_managers_warning(managers: int) -> str:
        if managers == 0 or managers % 2:
            return ""
        return (f"the cluster now has {managers} managers, which tolerate no more failures "
                f"than {managers - 1} would; run an odd number of managers (1, 3 or 5)")

    async def _demote(self, store: RaftStore, n: Node) -> dict[str, Any]:
        voters = store.voters()
        if n.role is NodeRole.WORKER and n.raft_addr not in voters:
            return self._role_result(n, "worker", False,
                                     f"Node {n.hostname} is already a worker.")
        snap = store.snapshot()
        managers = [m for m in snap.nodes.values() if m.role is NodeRole.MANAGER]
        if n.role is NodeRole.MANAGER and len(managers) <= 1:
            raise BadRequest(f"can't demote the last manager of the cluster ({n.hostname}): "
                             "promote another node first", "node")
        if n.state is not NodeState.READY:
            raise BadRequest(f"node {n.hostname} is {n.state.value}: it cannot be told to "
                             "stop its Raft voter; remove it with `shoal node rm --force`",
                             "node")
        # swarmkit's rule: the managers left must still have a reachable majority
        rest = [v for v in voters if v != n.raft_addr]
        reachable = [v for v in rest if v == store.self_addr or store.peer_connected(v)]
        need = len(rest) // 2 + 1
        if len(reachable) < need:
            raise Conflict(f"demoting {n.hostname} would cost the cluster its quorum: "
                           f"{len(reachable)} of the {len(rest)} other managers are "
                           f"reachable, {need} needed", "node")
        if n.raft_addr == store.self_addr:
            # the leader demotes itself: hand leadership over, then the new leader does it
            new = await self._hand_over_leadership(store)
            return await self.security.call(new.api_addr, "/v1/cluster/node-role",
                                            {"node_id": n.id, "role": "worker"},
                                            timeout=self.config.join_timeout + 20)
        async with self._lock:
            await self._wait_membership_change()
            if n.role is NodeRole.MANAGER:
                # the record first, while the node still votes: its replica sees it too
                await self.propose({"op": "node_update", "id": n.id, "now": time.time(),
                                    "role": "worker"})
            if n.raft_addr in store.voters():
                try:
                    await store.remove_voter(n.raft_addr)
                except StoreError as exc:
                    raise from_store_error(exc) from exc
        warning = self._even_managers_warning(len(rest))
        try:  # tell the node now (a removed voter hears nothing more from Raft)
            reply = await self.security.call(
                n.api_addr, "/v1/cluster/role-changed", {"role": "worker"},
                server_hostname=pki.node_hostname(n.id), timeout=self.config.join_timeout + 5)
            problem = str(reply.get("error_message") or "")
        except ApiError as exc:
            problem = exc.message
        if problem:
            warning = "; ".join(x for x in (warning, f"node {n.hostname} has not switched to "
                                            f"a worker yet: {problem}") if x)
        return self._role_result(n, "worker", True,
                                 f"Manager {n.hostname} demoted in the cluster.", warning)

    async def _hand_over_leadership(self, store: RaftStore) -> Node:
        """Make another manager the leader (Raft TimeoutNow); its node record."""
        deadline = time.monotonic() + 5.0
        asked = 0.0
        while time.monotonic() < deadline:
            addr = store.leader_addr()
            if not store.is_leader() and addr and addr != store.self_addr:
                leader = self._leader_node(store)
                if leader is not None:
                    log.info("handed leadership over to %s", leader.hostname)
                    return leader
            elif store.is_leader() and time.monotonic() - asked > 0.5:
                asked = time.monotonic()
                store.transfer_leadership()
            await asyncio.sleep(0.05)
        raise Unavailable("could not hand the leadership over to another manager within 5 s "
                          "(are they caught up?); retry")

    # ------------------------------------------------------------------ this node's side
    async def role_changed(self, peer: pki.CertInfo | None, role: Any) -> dict[str, Any]:
        """A manager tells this node its role changed (mTLS, a manager's certificate):
        switch now. Used for demotion, which a removed Raft voter cannot learn from Raft."""
        self.security.authorize(peer, manager=True)
        ident = self.identity
        if ident is None:
            raise NotInCluster("this node is not part of a cluster")
        if role not in ("manager", "worker"):
            raise BadRequest("role must be 'manager' or 'worker'", "role")
        task = self._request_role(str(role))
        try:
            problem = await asyncio.wait_for(asyncio.shield(task), self.config.join_timeout + 2)
        except TimeoutError:
            problem = "still switching"
        return {"node_id": ident.node_id, "role": self.identity.role if self.identity else "",
                "error_message": problem or ""}

    async def _role_watch(self) -> None:
        """Level-triggered: whenever this node's own record has another role than the one it
        runs as (seen in its state feed or Raft replica, also after a restart), switch."""
        unready_since: float | None = None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._role_wakeup.wait()
            self._role_wakeup.clear()
            ident, store = self.identity, self.store
            if ident is None or store is None or self._leaving:
                continue
            if time.monotonic() < self._role_retry_at or (
                    self._role_task is not None and not self._role_task.done()):
                continue
            if not store.is_ready():
                # a manager demoted while it was unreachable is no Raft member any more and
                # never catches up: ask the other managers what this node is
                now = time.monotonic()
                unready_since = unready_since or now
                if ident.role == NodeRole.MANAGER and now - unready_since > 10.0:
                    unready_since = now
                    if await self._demoted_while_away(ident, store):
                        log.info("the managers say this node is a worker now: switching")
                        self._request_role(NodeRole.WORKER.value)
                continue
            unready_since = None
            me = store.snapshot().nodes.get(ident.node_id)
            if me is not None and me.role.value != ident.role:
                log.info("this node's record says %s, it runs as %s: switching",
                         me.role.value, ident.role)
                self._request_role(me.role.value)
            await asyncio.sleep(0.1)

    async def _demoted_while_away(self, ident: NodeIdentity, store: RaftStore | StateFeed
                                  ) -> bool:
        """True if a caught-up manager hands this node no Raft secret (its record says
        worker there)."""
        for n in store.snapshot().nodes.values():
            if n.role is NodeRole.MANAGER and n.id != ident.node_id:
                with contextlib.suppress(ApiError):
                    keys = await self.security.call(n.api_addr, "/v1/cluster/keys", {},
                                                    timeout=2.0)
                    return keys.get("raft_password") == ""
        return False

    def _request_role(self, role: str) -> asyncio.Task[str | None]:
        task = self._role_task
        if task is None or task.done():
            task = self._role_task = asyncio.create_task(self._switch_role(role),
                                                         name=f"become-{role}")
        return task

    async def _switch_role(self, role: str) -> str | None:
        """Become ``role`` without stopping tasks: the worker, mesh, gossip and heartbeats
        keep running, only the state source is swapped (feed ⇄ Raft voter) once the new one
        has caught up. None on success, else why not (retried later by the watcher)."""
        async with self._role_lock:
            ident = self.identity
            if ident is None or self.store is None or ident.role == role:
                return None
            try:
                if role == NodeRole.MANAGER:
                    await self._become_manager(ident)
                else:
                    await self._become_worker(ident)
            except ApiError as exc:
                self._role_retry_at = time.monotonic() + 5.0
                log.warning("could not switch this node to %s: %s (retrying in 5 s)", role,
                            exc.message)
                return exc.message
            except Exception as exc:
                self._role_retry_at = time.monotonic() + 5.0
                log.exception("could not switch this node to %s", role)
                return repr(exc)
            return None

    async def _become_manager(self, ident: NodeIdentity) -> None:
        feed = self.store
        assert isinstance(feed, StateFeed)
        deadline = time.monotonic() + self.config.join_timeout
        # 1. a manager certificate: renewal issues the role of the node's current record
        why = ""
        while self.security.cert is None or self.security.cert.role != pki.ROLE_MANAGER:
            if time.monotonic() > deadline:
                raise Unavailable(f"no manager certificate for this node: {why}")
            try:
                await self.security.renew()
                why = "a manager still issued a worker certificate"
            except ApiError as exc:
                why = exc.message
            if self.security.cert is not None and self.security.cert.role != pki.ROLE_MANAGER:
                await asyncio.sleep(0.3)
        # 2. the Raft secret, voters and the managers' key, once the leader added the voter
        keys, manager_key = await self._fetch_manager_keys(feed, ident, deadline)
        new = dataclasses.replace(
            ident, role="manager", raft_password=str(keys["raft_password"]),
            voters=sorted({str(v) for v in keys["voters"]} | {self._raft_self}),
            manager_key=manager_key, managers=[])
        # 3. a Raft voter, started from a clean journal, fed by the leader
        self._remove_raft_files()
        raft = self._make_store(new)
        assert isinstance(raft, RaftStore)
        try:
            await self._wait_for(
                lambda: raft.is_ready() and raft.index >= feed.index and
                (me := raft.snapshot().nodes.get(ident.node_id)) is not None and
                me.role is NodeRole.MANAGER,
                self.config.join_timeout, "this node's Raft replica to catch up")
        except BaseException:  # (also when cancelled: the voter must not keep running)
            raft.close()
            self._remove_raft_files()
            raise
        # 4. swap the state source under the running worker, mesh and gossip
        self.identity, self.store = new, raft
        raft.add_listener(self._on_apply)
        if self._worker is not None:
            self._worker.store = raft
        self._cancel_member_task("state-feed")
        feed.close()
        self._member_tasks.append(asyncio.create_task(self._leadership_loop(), name="lead"))
        new.save(self.data_dir)
        self._update_gossip_role(new)
        self._wake()
        log.info("this node is now a manager (Raft voter %s)", self._raft_self)

    async def _fetch_manager_keys(self, feed: StateFeed, ident: NodeIdentity, deadline: float
                                  ) -> tuple[dict[str, Any], bytes]:
        why = "no manager known"
        while time.monotonic() < deadline:
            snap = feed.snapshot()
            leader = feed.leader_addr()
            managers = sorted((n for n in snap.nodes.values()
                               if n.role is NodeRole.MANAGER and n.id != ident.node_id),
                              key=lambda n: n.raft_addr != leader)
            for m in managers:
                try:
                    keys = await self.security.call(m.api_addr, "/v1/cluster/keys", {})
                    if not keys.get("raft_password"):
                        why = f"{m.hostname} does not see this node as a manager yet"
                        continue
                    if not keys.get("voter"):
                        why = f"{m.hostname} has not added this node's Raft voter yet"
                        continue
                    mk = await self.security.call(m.api_addr, "/v1/cluster/manager-keys", {})
                    return keys, bytes.fromhex(str(mk["manager_key"]))
                except ApiError as exc:
                    why = f"{m.hostname}: {exc.message}"
                except (KeyError, ValueError, TypeError) as exc:
                    why = f"{m.hostname} sent malformed keys: {exc!r}"
            await asyncio.sleep(0.2)
        raise Unavailable(f"could not fetch the managers' keys: {why}")

    async def _become_worker(self, ident: NodeIdentity) -> None:
        raft = self.store
        assert isinstance(raft, RaftStore)
        if raft.is_leader():  # (the leader hands over before demoting itself)
            await self._hand_over_leadership(raft)
        snap = raft.snapshot()
        me = snap.nodes.get(ident.node_id)
        # 1. a worker certificate, signed here while this node still holds the managers' key
        key = pki.new_key()
        cert = self.security.issue(snap, pki.make_csr(key).decode(), ident.node_id,
                                   pki.ROLE_WORKER, me.addr if me else
                                   self.config.advertise_addr)
        ca_pem = self.security.files.ca_pem()
        try:
            pki.verify_issued(cert, ca_pem, key)
        except pki.PkiError as exc:
            raise Unavailable(f"the worker certificate is not valid: {exc}") from exc
        managers = [n.api_addr for n in sorted(snap.nodes.values(), key=lambda n: n.id)
                    if n.role is NodeRole.MANAGER and n.id != ident.node_id]
        new = dataclasses.replace(
            ident, role="worker", raft_password="", manager_key=b"", managers=managers,
            voters=[v for v in raft.voters() if v != self._raft_self])
        self.security.files.save(ca_pem, cert, pki.key_pem(key))
        self.security.clear()  # forgets the unsealed CA key too
        self.security.load()
        # 2. a state feed, caught up before it replaces the Raft replica
        feed = self._make_store(new)
        assert isinstance(feed, StateFeed)
        run = asyncio.create_task(feed.run(), name="state-feed")
        try:
            await self._wait_for(feed.is_ready, self.config.join_timeout,
                                 "this node's state feed to catch up")
        except BaseException:
            run.cancel()
            raise
        # 3. swap, forget the Raft secret, the managers' key and the Raft log
        self.identity, self.store = new, feed
        feed.add_listener(self._on_apply)
        if self._worker is not None:
            self._worker.store = feed
        self._cancel_member_task("lead")
        if self._leader_task is not None:
            self._leader_task.cancel()
            self._leader_task = None
        self._member_tasks.append(run)
        new.save(self.data_dir)
        self.heartbeats.clear()
        self._update_gossip_role(new)
        self._wake()
        await asyncio.to_thread(raft.close)
        self._remove_raft_files()
        log.info("this node is now a worker (Raft secret, managers' key and Raft log removed)")

    def _cancel_member_task(self, name: str) -> None:
        for t in [t for t in self._member_tasks if t.get_name() == name]:
            t.cancel()
            self._member_tasks.remove(t)

    def _remove_raft_files(self) -> None:
        for name in ("raft.journal", "raft.journal.meta", "raft.dump"):
            (self.data_dir / "raft" / name).unlink(missing_ok=True)

    def _update_gossip_role(self, identity: NodeIdentity) -> None:
        if self.membership is not None:
            with contextlib.suppress(Exception):
                self.membership.update_meta(
                    {"role": identity.role, "hostname": self.hostname,
                     "api": f"{self.config.advertise_addr}:{self.config.api_port}",
                     "version": version()})

    def find_service(self, snap: Snapshot, ref: str) -> Service:
        svc = snap.service_by_name(ref) or snap.services.get(ref)
        if svc is None:
            matches = [s for s in snap.services.values() if s.id.startswith(ref)] if len(
                ref) >= 4 else []
            if len(matches) == 1:
                return matches[0]
            raise NotFound(f"no such service: {ref}", "service")
        return svc

    def services(self) -> list[dict[str, Any]]:
        snap = self.require_manager().snapshot()
        return [views.service_view(s, snap) for s in
                sorted(snap.services.values(), key=lambda s: s.spec.name)]

    def service(self, ref: str) -> dict[str, Any]:
        snap = self.require_manager().snapshot()
        return views.service_view(self.find_service(snap, ref), snap, detail=True)

    async def tasks(self, ref: str) -> list[dict[str, Any]]:
        """`service ps`: the service's tasks, with live resource use of the running ones."""
        snap = self.require_manager().snapshot()
        svc = self.find_service(snap, ref)
        out = views.task_views(snap.tasks_of(svc.id), snap)
        by_node: dict[str, list[str]] = {}
        for t in out:
            if t["state"] == "running" and t["node_id"]:
                by_node.setdefault(t["node_id"], []).append(t["id"])
        usage = await transfer.cluster_usage(self, by_node)
        for t in out:
            t["usage"] = usage.get(t["id"])
        return out

    async def create_service(self, spec: Any) -> dict[str, Any]:
        snap = self.require_manager().snapshot()
        try:
            parsed = validate_spec(spec)
        except StoreError as exc:
            raise from_store_error(exc) from exc
        if snap.service_by_name(parsed.name):
            raise Conflict(f"a service named {parsed.name!r} already exists", "name",
                           code="exists")
        self.secrets.check_refs(snap, parsed)
        sid = new_id()
        await self.propose({"op": "service_create", "id": sid, "now": time.time(),
                            "spec": to_dict(parsed)})
        return {"id": sid, "name": parsed.name}

    async def scale_service(self, ref: str, replicas: Any) -> dict[str, Any]:
        snap = self.require_manager().snapshot()
        svc = self.find_service(snap, ref)
        try:
            n = validate_replicas(replicas)
        except StoreError as exc:
            raise from_store_error(exc) from exc
        res = await self.propose({"op": "service_update", "id": svc.id, "now": time.time(),
                                  "replicas": n})
        return {"id": svc.id, "name": svc.spec.name, "replicas": n,
                "version": res.get("version")}

    async def update_service(self, ref: str, spec: Any, version: Any) -> dict[str, Any]:
        """Replace a service's spec; running tasks are replaced by a rolling update."""
        snap = self.require_manager().snapshot()
        svc = self.find_service(snap, ref)
        try:
            parsed = validate_spec(spec)
        except StoreError as exc:
            raise from_store_error(exc) from exc
        if version is not None and not isinstance(version, int):
            raise BadRequest("version must be an integer", "version")
        self.secrets.check_refs(snap, parsed)
        res = await self.propose({"op": "service_update", "id": svc.id, "now": time.time(),
                                  "spec": to_dict(parsed), "version": version})
        return {"id": svc.id, "name": svc.spec.name, "version": res.get("version")}

    async def rollback_service(self, ref: str) -> dict[str, Any]:
        snap = self.require_manager().snapshot()
        svc = self.find_service(snap, ref)
        if svc.previous_spec is None:
            raise BadRequest(f"service {svc.spec.name} has no previous spec to roll back to",
                             "service")
        res = await self.propose({"op": "service_update", "id": svc.id, "now": time.time(),
                                  "spec": to_dict(svc.previous_spec), "version": svc.version})
        return {"id": svc.id, "name": svc.spec.name, "version": res.get("version")}

    async def remove_service(self, ref: str) -> dict[str, Any]:
        snap = self.require_manager().snapshot()
        svc = self.find_service(snap, ref)
        await self.propose({"op": "service_remove", "id": svc.id, "now": time.time()})
        return {"id": svc.id, "name": svc.spec.name, "removed": True}


def run_agent(config: AgentConfig, hostname: str | None = None) -> None:
    import uvloop

    async def main() -> None:
        await Agent(config, hostname).run()

    uvloop.run(main())


__all__ = ["Agent", "Path", "run_agent"]
