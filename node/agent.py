"""The agent: the one long-running process every node runs — wiring and this node's lifecycle.

Owns: constructing the components of a node and its membership lifecycle —
uninitialised → (init | join) → member → (leave) → uninitialised — and its role switch
(worker ⇄ manager, swapping the state source under the running tasks). As a member it runs:

* the cluster state source (shoal.node.source.StateSource): the RaftStore on managers (a
  voter); on workers a StateFeed fed by the managers over mTLS (shoal.node.feed) — workers
  hold no Raft secret,
* a leadership watcher that starts/stops the LeaderLoop (orchestrator + scheduler),
* the heartbeat sender and the workers' dispatcher (shoal.node.control.dispatcher),
* the Worker reconciler over the runtime Controller,
* the API (shoal.node.api): a unix socket for the CLI, TCP for other nodes; its routes call
  the command modules (shoal.node.control.*) built here.

Components get the narrow NodeContext (shoal.node.context), never the agent; nothing under
node/ imports this module. Must not touch: commands (shoal.node.control), policy
(orchestrator/scheduler/state machine own it) or the runtime's internals. Everything here is
glue, so it reads top to bottom.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import secrets
import signal
import socket
import time
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from shoal.gossip import Config as GossipConfig
from shoal.gossip import EventKind, MemberEvent
from shoal.node import pki, sealing, shutdown, upgrade
from shoal.node.api import ApiServer, Controls
from shoal.node.config import AgentConfig, NodeIdentity
from shoal.node.context import NodeContext, VoterChanges, new_id
from shoal.node.control.admission import Admission
from shoal.node.control.dispatcher import Dispatcher
from shoal.node.control.events import Events
from shoal.node.control.nodes import Nodes
from shoal.node.control.roles import Roles, hand_over_leadership
from shoal.node.control.services import Services
from shoal.node.errors import (
    AlreadyInCluster,
    ApiError,
    BadRequest,
    NotInCluster,
    TokenError,
    Unavailable,
)
from shoal.node.events import EventLog
from shoal.node.feed import StateFeed, tcp_probe
from shoal.node.health import HealthConfig, HealthMonitor
from shoal.node.imagegc import ImageGC, wanted_images
from shoal.node.joining import Admitted, JoinCall, JoinKey, request_join
from shoal.node.leader import LeaderLoop
from shoal.node.membership import GossipControl, Membership
from shoal.node.mesh import Mesh
from shoal.node.metrics import Metrics, Sources
from shoal.node.mqtt import MqttSupervisor
from shoal.node.netapi import NetworksApi
from shoal.node.registries import Registries
from shoal.node.sealing import derive_gossip_key
from shoal.node.secrets import SecretsApi
from shoal.node.security import Security
from shoal.node.source import StateSource
from shoal.node.tokens import (
    new_secret,
    parse_token,
)
from shoal.node.transfer import Transfer, cluster_usage
from shoal.node.version import version
from shoal.node.worker import Worker
from shoal.raft.errors import StoreError
from shoal.raft.models import Node, NodeRole, to_dict
from shoal.raft.schema import SCHEMA
from shoal.raft.state import ClusterState, Snapshot
from shoal.raft.store import RaftStore
from shoal.runtime.process import ProcessController
from shoal.runtime.records import RuntimeConfig

log = logging.getLogger("shoal.agent")


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
        # identity, config, the current state source: what components get (never the agent)
        self.ctx = NodeContext(config, self.hostname)
        self.runtime = ProcessController(RuntimeConfig(data_dir=self.data_dir))
        self._leader_wakeup = asyncio.Event()
        self._worker_wakeup = asyncio.Event()
        self._member_tasks: list[asyncio.Task[Any]] = []
        self._leader_task: asyncio.Task[None] | None = None
        self._worker: Worker | None = None
        # Raft membership changes one at a time; its lock also serialises init/join/leave
        self.voters = VoterChanges(config.join_timeout)
        self._lock = self.voters.lock
        # a join the cluster admitted, finishing in the background (see join)
        self._joining: asyncio.Task[None] | None = None
        self._join_stage = ""
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.membership: Membership | None = None
        self.mesh: Mesh | None = None  # task network, routing mesh, DNS (node/mesh.py)
        self._leaving = False
        ctx = self.ctx
        self.security = Security(ctx)  # TLS identity, peer checks, CA (node/security.py)
        self.secrets = SecretsApi(ctx, self.security)  # secrets/configs, task files
        # image pulls and task logs between nodes
        self.transfer = Transfer(ctx, self.security, self.runtime, self.runtime.images)
        # gossip info, keyring, rotation (membership.py)
        self.gossip = GossipControl(ctx, self.security, lambda: self.membership)
        # the commands (node/control/*)
        self.dispatcher = Dispatcher(ctx, self.security, self._leader_wakeup.set)
        self.services = Services(ctx, self.transfer)
        # registry login, tag → digest at service create/update, registry pulls
        self.registries = Registries(ctx, self.security, self.secrets, config.registry,
                                     self.runtime.images, self.transfer)
        self.services.resolve_image = self.registries.resolve_spec
        self.transfer.registry_pull = self.registries.pull
        self.transfer.registry_pullable = self.registries.pullable
        self.nodes = Nodes(ctx, self.gossip, self.voters)
        self.roles = Roles(ctx, self.security, self.voters)
        self.admission = Admission(ctx, self.security, self.gossip, self.voters)
        # the event stream (managers: derived from their Raft replica) and /metrics
        self.event_log = EventLog(config.events)
        self.events = Events(ctx, self.event_log)
        self.metrics = Metrics(Sources(
            store=lambda: self.ctx.store, runtime=self.runtime,
            gossip=lambda: self.membership,
            balancer=lambda: self.mesh.balancer if self.mesh is not None else None,
            events=self.event_log, feed=lambda: self.dispatcher.feed.stats))
        # the optional MQTT bridge (node/mqtt.py): runs while this node is a member, from
        # its --mqtt-* flags or else the cluster-wide setting (`shoal mqtt set`), live
        self.mqtt = MqttSupervisor(ctx, config.mqtt, self.event_log, self.metrics.registry,
                                   self.services.update_service, self.security)
        # promotion/demotion of this node (see _switch_role): one switch at a time
        self._role_lock = asyncio.Lock()
        self._role_task: asyncio.Task[str | None] | None = None
        self._role_wakeup = asyncio.Event()
        self._role_retry_at = 0.0

    @property
    def identity(self) -> NodeIdentity | None:
        return self.ctx.identity

    @property
    def store(self) -> StateSource | None:
        return self.ctx.store

    # ================================================================== lifecycle
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self._http = self.ctx.http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=5))
        await self.runtime.recover()
        api = ApiServer(self.config, Controls(
            lifecycle=self, services=self.services, nodes=self.nodes, roles=self.roles,
            admission=self.admission, dispatcher=self.dispatcher, security=self.security,
            secrets=self.secrets, gossip=self.gossip, transfer=self.transfer,
            runtime=self.runtime, images=self.runtime.images, events=self.events,
            metrics=self.metrics, registries=self.registries,
            networks=NetworksApi(self.ctx), images_wanted=self._images_wanted))
        await api.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._stop.set)
        identity = NodeIdentity.load(self.data_dir)
        admitted = Admitted.load(self.data_dir)
        if identity is not None and admitted is not None:  # (saved just before removed)
            Admitted.remove(self.data_dir)
        elif admitted is not None:  # admitted before a restart: finish, as the same node
            log.info("finishing the join of %s %s to cluster %s (admitted before a restart)",
                     admitted.role, admitted.node_id, admitted.cluster_id[:12])
            self._joining = asyncio.create_task(self._finish_join(admitted), name="join")
        if identity is not None and self.security.keys.is_locked(identity):  # autolock
            self.security.keys.hold(identity, self._start_member)
        elif identity is not None:
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
            self.dispatcher.stopping = True
            self.ctx.stopping = True  # writes through this node fail fast: clients move on
            self._wake()  # held state polls answer "stopping" now (Dispatcher.state_since)
            if self._joining is not None:  # (a pending join resumes at the next start)
                self._joining.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._joining
            if self.identity is not None:  # a planned restart: see node/shutdown.py
                await shutdown.prepare_restart(
                    self.ctx.raft,
                    self.membership, self.config.restart_grace, self.config.stop_step_timeout)
            await self._stop_member()
            await api.stop()
            await self.runtime.close()
            await self._http.close()
            log.info("agent stopped in %.2f s", time.monotonic() - stopping)

    def _start_member(self, identity: NodeIdentity) -> None:
        self.ctx.identity = identity
        try:
            self.security.load()
        except (OSError, pki.PkiError) as exc:
            log.error("no usable TLS identity in %s (%s): this node cannot talk to other "
                      "nodes; `shoal leave` and join again", self.security.files.dir, exc)
        manager = identity.role == NodeRole.MANAGER
        feed: StateFeed | None = None
        store: StateSource
        if manager:
            store = raft = self._make_raft(identity)
            self.ctx.use(identity, raft, raft)
            self.event_log.attach(raft)
        else:
            store = feed = self._make_feed(identity)
            self.ctx.use(identity, feed, None)
        store.add_listener(self._on_apply)
        # the mesh reads whichever store is current: promotion/demotion swaps it in place
        self.mesh = Mesh(self.data_dir, identity.node_id, self.config.advertise_addr,
                         snapshot=self._current_snapshot, is_ready=self._current_ready,
                         live_tasks=lambda: self.runtime.tasks().keys(),
                         image_ports=lambda ref: self.runtime.images.inspect(
                             ref).config.exposed_ports)
        self._worker = Worker(identity.node_id, store, self.runtime, self._worker_wakeup,
                              self.config.reconcile_interval, mesh=self.mesh,
                              task_files=self.secrets.resolve_task_files,
                              pull_image=self.transfer.pull_image,
                              pull_progress=self.registries.progress_message,
                              health=HealthMonitor(HealthConfig(
                                  helper_dir=self.data_dir / "bin")))
        self.membership = self._make_membership(identity)
        self._member_tasks = [
            asyncio.create_task(self._start_gossip(self.membership), name="gossip-start"),
            asyncio.create_task(self._worker.run(), name="worker"),
            asyncio.create_task(self.mesh.run(), name="mesh"),
            asyncio.create_task(self.dispatcher.heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self.security.renew_loop(), name="cert-renew"),
            asyncio.create_task(self._role_watch(), name="role-watch"),
            asyncio.create_task(ImageGC(self.runtime.images, self.config.image_gc,
                                        self._images_wanted).run(), name="image-gc"),
            asyncio.create_task(self.security.keys.run(), name="keys"),  # node/keys.py
            asyncio.create_task(self.mqtt.run(), name="mqtt"),
        ]
        if feed is None:
            self._member_tasks.append(asyncio.create_task(self._leadership_loop(), name="lead"))
        else:
            self._member_tasks.append(asyncio.create_task(feed.run(), name="state-feed"))

    def _make_raft(self, identity: NodeIdentity) -> RaftStore:
        """A manager's Raft voter. Built on the event loop's thread, the main thread:
        pysyncobj's tick thread dies with the thread that created it."""
        return RaftStore(
            self_addr=self._raft_self,
            peers=identity.voters,
            data_dir=self.data_dir / "raft",
            password=identity.raft_password,
            extra_passwords=tuple(identity.raft_extra_passwords),
            config=self.config.raft,
            bind_addr=f"{self.config.bind_addr}:{self.config.raft_port}",
        )

    def _make_feed(self, identity: NodeIdentity) -> StateFeed:
        """A worker's state feed (not started: the caller runs its ``run``)."""
        # (identities written before workers were fed over mTLS know only Raft addresses)
        seeds = identity.managers or [f"{v.rsplit(':', 1)[0]}:{self.config.api_port}"
                                      for v in identity.voters]
        return StateFeed(
            identity.node_id, seeds,
            call_bytes=lambda addr, path, body, timeout: self.security.call_bytes(
                addr, path, body, timeout=timeout),
            call_json=lambda addr, path, body, timeout: self.security.call(
                addr, path, body, timeout=timeout),
            config=self.config.feed, on_managers=self._managers_changed, probe=tcp_probe)

    @property
    def _raft_self(self) -> str:
        return f"{self.config.advertise_addr}:{self.config.raft_port}"

    def _current_snapshot(self) -> Snapshot | None:
        store = self.store
        return store.snapshot() if store is not None else None

    def _images_wanted(self) -> set[str]:
        ident = self.identity
        return wanted_images(self.runtime.images, self._current_snapshot(),
                             ident.node_id if ident is not None else "")

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
        self.event_log.attach(None)
        if self.store:
            store = self.store
            self.ctx.forget()
            await asyncio.to_thread(store.close)

    # ------------------------------------------------------------------ gossip
    def _make_membership(self, identity: NodeIdentity) -> Membership:
        # (identities older than the gossip key derive it from the Raft secret; a Raft
        # secret rotation pins it first, shoal.node.keys)
        key = getattr(identity, "gossip_key", b"") or derive_gossip_key(identity.raft_password)
        preset = GossipConfig.local() if self.config.gossip_preset == "local" else \
            GossipConfig.lan()
        meta = self._gossip_meta(identity)
        return Membership(identity.node_id, self.config.advertise_addr, self.config.gossip_port,
                          key, meta, preset, on_change=self._gossip_changed,
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

    _GOSSIP_EVENTS = {EventKind.SUSPECT: "suspect", EventKind.ALIVE_AGAIN: "alive-again",
                      EventKind.DEAD: "dead", EventKind.LEFT: "left"}

    def _gossip_changed(self, ev: MemberEvent) -> None:
        """A change in this node's gossip member list: wake the leader; on a manager, a
        local event (not from the log: see shoal.node.events)."""
        self._leader_wakeup.set()
        if ev.kind in (EventKind.SUSPECT, EventKind.DEAD) and isinstance(self.store, StateFeed):
            self.store.suspect(ev.member.addr)  # its held poll may be cut off
        action = self._GOSSIP_EVENTS.get(ev.kind)
        if action is None or self.ctx.raft is None:
            return
        self.event_log.add_local(
            "node", f"gossip-{action}", ev.member.name, str(ev.member.meta.get("hostname", "")),
            {"source": "gossip", "incarnation": ev.member.incarnation,
             "previous": ev.previous.name.lower() if ev.previous is not None else ""})

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
        self.dispatcher.applied()
        if self.mesh is not None:
            self.mesh.wake()

    async def _leadership_loop(self) -> None:
        assert self.ctx.raft is not None
        last_voters: list[str] = []
        # woken at once by a Raft role change, else every 0.5 s (voter changes, hasQuorum,
        # which no event announces) instead of a 50 ms poll (idle cost)
        wakeup, ev_loop, heard = asyncio.Event(), asyncio.get_running_loop(), None

        def role_changed() -> None:  # (tick thread)
            if not ev_loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    ev_loop.call_soon_threadsafe(wakeup.set)
        while True:
            store = self.ctx.raft
            if store is None:
                return
            if store is not heard:
                heard = store
                store.add_role_listener(role_changed)
            if store.is_leader() and (self._leader_task is None or self._leader_task.done()):
                loop = LeaderLoop(store, self.dispatcher.heartbeats, self.config.orchestrator,
                                  self._leader_wakeup, gossip_all=self.gossip.leader_inputs,
                                  usage=partial(cluster_usage, self.transfer))
                self._leader_task = asyncio.create_task(loop.run(), name="leader-loop")
            voters = store.voters()
            if voters != last_voters and self.identity and store.is_ready():
                last_voters = voters
                if voters != self.identity.voters:
                    self.identity.voters = voters
                    self.identity.save(self.data_dir)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await wakeup.wait()
            wakeup.clear()

    # ================================================================== helpers
    async def propose(self, cmd: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        return await self.ctx.propose(cmd, timeout)

    def require_member(self) -> StateSource:
        return self.ctx.require_member()

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
            store = self.require_member()
            try:
                await self._wait_for(store.is_leader, 15.0, "this node to become leader")
                now = time.time()
                sec = self.security
                await self.propose({"op": "cluster_init", "cluster_id": cluster_id, "now": now,
                                    "cluster_cidr": cluster_cidr,
                                    "default_addr_pool": default_addr_pool,
                                    "worker_secret": sec.seal_token_secret("worker",
                                                                           new_secret()),
                                    "manager_secret": sec.seal_token_secret("manager",
                                                                            new_secret()),
                                    "digest": ca.digest, "schema": SCHEMA})
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
        self.ctx.identity = None
        NodeIdentity.remove(self.data_dir)
        self.security.clear(remove_files=True)
        self._remove_raft_files()

    def _refuse_if_member(self) -> None:
        if self.identity is not None:
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
        while (store := self.store) is not None and not (
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
            if self.identity is None and joining is not None and not joining.done():
                # admitted, keys not fetched yet: abandon (the join key stays: joining
                # again is the same node)
                joining.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await joining
                self.security.clear(remove_files=True)
                Admitted.remove(self.data_dir)
                return {"node_id": "", "left": True}
            self.require_member()
            assert self.identity is not None and self._worker is not None
            identity = self.identity
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
                await self.propose({"op": "node_remove", "id": identity.node_id,
                                    "now": time.time(), "force": True, "leave": True},
                                   timeout=3.0)
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
                               "version": version(),
                               "locked": self.security.keys.locked is not None}
        if self._join_stage:
            out["joining"] = self._join_stage
        if self.identity and self.store:
            out.update(member=True, node_id=self.identity.node_id,
                       cluster_id=self.identity.cluster_id, role=self.identity.role,
                       is_leader=self.store.is_leader(), leader=self.store.leader_addr(),
                       ready=self.store.is_ready(), term=self.store.term(),
                       voters=self.store.voters(), index=self.store.index,
                       gossip=self.gossip.info(),
                       schema=upgrade.SCHEMA,
                       cluster_schema=upgrade.cluster_schema(self.store.snapshot()),
                       network=self.mesh.describe() if self.mesh is not None else None)
        return out

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

    async def _demoted_while_away(self, ident: NodeIdentity, store: StateSource) -> bool:
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
        feed = self.ctx.require_member()
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
        raft = self._make_raft(new)
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
        self.ctx.use(new, raft, raft)
        self.event_log.attach(raft)
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

    async def _fetch_manager_keys(self, feed: StateSource, ident: NodeIdentity,
                                  deadline: float) -> tuple[dict[str, Any], bytes]:
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
        raft = self.ctx.raft
        if raft is None:
            raise Unavailable("this node runs no Raft replica to step down from")
        if raft.is_leader():  # (the leader hands over before demoting itself)
            await hand_over_leadership(raft)
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
        feed = self._make_feed(new)
        run = asyncio.create_task(feed.run(), name="state-feed")
        try:
            await self._wait_for(feed.is_ready, self.config.join_timeout,
                                 "this node's state feed to catch up")
        except BaseException:
            run.cancel()
            raise
        # 3. swap, forget the Raft secret, the managers' key and the Raft log
        self.ctx.use(new, feed, None)
        self.event_log.attach(None)
        feed.add_listener(self._on_apply)
        if self._worker is not None:
            self._worker.store = feed
        self._cancel_member_task("lead")
        if self._leader_task is not None:
            self._leader_task.cancel()
            self._leader_task = None
        self._member_tasks.append(run)
        new.save(self.data_dir)
        self.dispatcher.heartbeats.clear()
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
                self.membership.update_meta(self._gossip_meta(identity))

    def _gossip_meta(self, identity: NodeIdentity) -> dict[str, Any]:
        return {**upgrade.gossip_meta(identity.role, self.hostname,
                                      f"{self.config.advertise_addr}:{self.config.api_port}"),
                "version": version()}


def run_agent(config: AgentConfig, hostname: str | None = None) -> None:
    import uvloop

    from shoal.node.clock import skew_from_env

    skew_from_env()  # (the fault suite's skewed wall clock; nothing without the variable)

    async def main() -> None:
        await Agent(config, hostname).run()

    uvloop.run(main())


__all__ = ["Agent", "Path", "new_id", "run_agent"]
