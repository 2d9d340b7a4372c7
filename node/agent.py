"""The agent: the one long-running process every node runs — wiring and this node's lifecycle.

Owns: constructing the components of a node, starting and stopping them as the node becomes
and stops being a member, and the state the two mixins of the Agent use: its membership
lifecycle — uninitialised → (init | join) → member → (leave) → uninitialised — in
shoal.node.lifecycle, and its role switch (worker ⇄ manager, swapping the state source under
the running tasks) in shoal.node.roleswitch. As a member it runs:

* the cluster state source (shoal.node.source.StateSource): the RaftStore on managers (a
  voter); on workers a StateFeed fed by the managers over mTLS (shoal.node.feed) — workers
  hold no Raft secret,
* a leadership watcher that starts/stops the LeaderLoop (orchestrator + scheduler),
* the heartbeat sender and the workers' dispatcher (shoal.node.control.dispatcher),
* the Worker reconciler over the runtime Controller,
* this node's description (arch, memory, CPUs) kept in its record (shoal.node.describe),
* the API (shoal.node.api): a unix socket for the CLI, TCP for other nodes; its routes call
  the command modules (shoal.node.control.*) built here.

Components get the narrow NodeContext (shoal.node.context), never the agent; nothing under
node/ imports this module (and only this one imports the two mixins). Must not touch: commands
(shoal.node.control), policy (orchestrator/scheduler/state machine own it) or the runtime's
internals. Everything here is glue, so it reads top to bottom.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import time
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from shoal.gossip import Config as GossipConfig
from shoal.gossip import EventKind, MemberEvent
from shoal.node import pki, shutdown, upgrade
from shoal.node.api import ApiServer, Controls
from shoal.node.buildnet import MeshRunNetwork, remove_cut_short
from shoal.node.config import AgentConfig, NodeIdentity
from shoal.node.context import NodeContext, VoterChanges, new_id
from shoal.node.control.admission import Admission
from shoal.node.control.dispatcher import Dispatcher
from shoal.node.control.events import Events
from shoal.node.control.nodes import Nodes
from shoal.node.control.roles import Roles
from shoal.node.control.services import Services
from shoal.node.describe import Describer
from shoal.node.errors import Unavailable
from shoal.node.events import EventLog
from shoal.node.feed import StateFeed, tcp_probe
from shoal.node.health import ExecHelper, HealthMonitor
from shoal.node.imagegc import ImageGC, wanted_images
from shoal.node.joining import Admitted
from shoal.node.leader import RAFT_TIMING_META, LeaderLoop
from shoal.node.lifecycle import MembershipLifecycle
from shoal.node.membership import GossipControl, Membership, join_seeds
from shoal.node.mesh import Mesh
from shoal.node.metrics import Metrics, Sources
from shoal.node.mqtt import MqttSupervisor
from shoal.node.netapi import NetworksApi
from shoal.node.registries import Registries
from shoal.node.roleswitch import RoleSwitch
from shoal.node.sealing import derive_gossip_key
from shoal.node.secrets import SecretsApi
from shoal.node.security import Security
from shoal.node.source import StateSource
from shoal.node.transfer import Transfer, cluster_usage
from shoal.node.version import version
from shoal.node.worker import Worker
from shoal.raft import generic
from shoal.raft.models import NodeRole
from shoal.raft.state import Snapshot
from shoal.raft.store import RaftStore
from shoal.runtime.process import ProcessController
from shoal.runtime.records import RuntimeConfig

log = logging.getLogger("shoal.agent")
# The longest the leadership watch sleeps without a Raft role change or an applied entry
# waking it, seconds.
LEADERSHIP_WATCH = 2.0
# seconds during which every manager refused this node's certificate before `info` says it
# was removed
REMOVED_AFTER = 10.0
#: What this agent's API takes that an older one's does not, as `info` says (``features``):
#: a client asks before it sends what an older agent would mistake for something else
#: (``build-secrets``: a build request's secrets part, which an older agent would write to
#: its disk as the start of the context's tar)
FEATURES = ("build-secrets",)


class Agent(MembershipLifecycle, RoleSwitch):
    """A node's agent. Its membership lifecycle (init/join/leave) is MembershipLifecycle
    (node/lifecycle.py), its role switch RoleSwitch (node/roleswitch.py): mixins that declare
    the attributes they use, all constructed here."""

    def __init__(self, config: AgentConfig, hostname: str | None = None) -> None:
        config.validate()
        self.config = config
        self.hostname = hostname or socket.gethostname()
        self.data_dir = config.data_dir
        # identity, config, the current state source: what components get (never the agent)
        self.ctx = NodeContext(config, self.hostname)
        self.runtime = ProcessController(RuntimeConfig(
            data_dir=self.data_dir, cgroup_parent=config.cgroup_parent))
        # shoal-execdrop, sealed once for the exec health checks and `shoal exec` alike
        self.exec_helper = ExecHelper(self.data_dir / "bin", seccomp_of=self.runtime.exec_filter)
        self._leader_wakeup = asyncio.Event()
        self._leadership_wakeup = asyncio.Event()  # (_leadership_loop)
        self._worker_wakeup = asyncio.Event()
        self._describe_wakeup = asyncio.Event()  # (Describer)
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
        self.transfer.pulling_layers = self.registries.pulling_layers
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
            events=self.event_log, feed=lambda: self.dispatcher.feed.stats,
            heartbeats=self.dispatcher.heartbeats_received_total))
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
        await remove_cut_short(  # (before the Mesh: it releases their addresses)
            self.runtime, self.runtime.images.root.parent / "build" / "tmp")
        api = ApiServer(self.config, Controls(
            lifecycle=self, services=self.services, nodes=self.nodes, roles=self.roles,
            admission=self.admission, dispatcher=self.dispatcher, security=self.security,
            secrets=self.secrets, gossip=self.gossip, transfer=self.transfer,
            runtime=self.runtime, images=self.runtime.images, events=self.events,
            metrics=self.metrics, registries=self.registries,
            networks=NetworksApi(self.ctx), images_wanted=self._images_wanted,
            exec_helper=self.exec_helper, build_network=MeshRunNetwork(lambda: self.mesh)))
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
                              clock_offset=self.dispatcher.measured_offset,
                              health=HealthMonitor(helper=self.exec_helper))
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
            asyncio.create_task(self._generic_flag_check(identity.node_id), name="generic"),
            asyncio.create_task(Describer(self.ctx, identity.node_id,
                                          self._describe_wakeup).run(), name="describe"),
        ]
        if feed is None:
            self._member_tasks.append(asyncio.create_task(self._leadership_loop(), name="lead"))
        else:
            self._member_tasks.append(asyncio.create_task(feed.run(), name="state-feed"))

    async def _generic_flag_check(self, node_id: str) -> None:
        """``--generic-resource`` goes into the node's record when it joins, not later: once
        the record is known, warn if this start's flag says otherwise (a changed flag on a
        restart is not applied: `node update --generic-resource-add/-rm` changes it)."""
        if not self.config.generic_resources:
            return
        for _ in range(120):  # (the state may take a while: a worker's first download)
            snap = self._current_snapshot() if self._current_ready() else None
            node = snap.nodes.get(node_id) if snap is not None else None  # (caught up)
            if node is not None:
                drift = generic.flag_drift(self.config.generic_resources,
                                           node.generic_resources)
                if drift:
                    log.warning("--generic-resource is applied when a node joins only: %s",
                                drift)
                return
            await asyncio.sleep(5.0)

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
        # managers confirm every suspicion they hear of with a probe of their own
        preset = preset.replace(confirm_suspicions=identity.role == NodeRole.MANAGER)
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
            return join_seeds(store.snapshot().nodes.values(), self.identity.node_id)
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
        self._describe_wakeup.set()
        self._role_wakeup.set()
        self.dispatcher.applied()
        self.security.keys.wake()
        self.mqtt.wake()
        self._leadership_wakeup.set()
        if self.mesh is not None:
            self.mesh.wake()

    async def _leadership_loop(self) -> None:
        assert self.ctx.raft is not None
        last_voters: list[str] = []
        # woken at once by a Raft role change and by applied entries, else every
        # LEADERSHIP_WATCH s (voter changes, which no event announces, are only recorded
        # for the next start) instead of a 50 ms poll (idle cost)
        wakeup, ev_loop, heard = self._leadership_wakeup, asyncio.get_running_loop(), None

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
                                  usage=partial(cluster_usage, self.transfer),
                                  heartbeat_interval=self.config.heartbeat_interval,
                                  gossip_alive=self.dispatcher.gossip_alive,
                                  raft=self.config.raft)
                self._leader_task = asyncio.create_task(loop.run(), name="leader-loop")
                # (leading again before this one noticed it lost: start the next at once)
                self._leader_task.add_done_callback(lambda _t: wakeup.set())
            voters = store.voters()
            if voters != last_voters and self.identity and store.is_ready():
                last_voters = voters
                if voters != self.identity.voters:
                    self.identity.voters = voters
                    self.identity.save(self.data_dir)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LEADERSHIP_WATCH):
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

    # ================================================================== queries and changes
    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hostname": self.hostname, "addr": self.config.advertise_addr,
                               "api_port": self.config.api_port, "member": False,
                               "version": version(), "features": list(FEATURES),
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
                       task_history_limit=self.store.snapshot().cluster.task_history_limit,
                       network=self.mesh.describe() if self.mesh is not None else None)
            refused = self.dispatcher.refused
            if refused is not None and time.monotonic() - refused[1] > REMOVED_AFTER:
                # (told, not acted on: its tasks are not stopped — a refusal for another
                # cause must not take a node's tasks down; these were replaced elsewhere)
                out["removed"] = (f"the managers refuse this node ({refused[0]}): it was "
                                  "removed from the cluster; its tasks run unmanaged. "
                                  "`shoal leave --force`, then join again with a token")
        return out

    def _remove_raft_files(self) -> None:
        for name in ("raft.journal", "raft.journal.meta", "raft.dump"):
            (self.data_dir / "raft" / name).unlink(missing_ok=True)

    def _gossip_meta(self, identity: NodeIdentity) -> dict[str, Any]:
        return {**upgrade.gossip_meta(identity.role, self.hostname,
                                      f"{self.config.advertise_addr}:{self.config.api_port}"),
                "version": version(),
                # this node's Raft timing, should it be a manager (LeaderLoop checks that the
                # managers' timings agree: --raft-multiplier)
                RAFT_TIMING_META: [self.config.raft.append_entries_period,
                                   self.config.raft.raft_min_timeout]}


def run_agent(config: AgentConfig, hostname: str | None = None) -> None:
    import uvloop

    from shoal.node.clock import skew_from_env

    skew_from_env()  # (the fault suite's skewed wall clock; nothing without the variable)
    raise_open_files_limit()

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(quiet_closed_tls)
        await Agent(config, hostname).run()

    uvloop.run(main())


def raise_open_files_limit() -> None:
    """Open files up to the hard limit, as dockerd's Go runtime does: a shell's soft limit
    (often 1,024) is a few hundred tasks (two pidfds each, their pipes) or a thousand
    workers' feed connections. Tasks inherit it unless their --ulimit says otherwise
    (Docker's containers get dockerd's too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("open files: soft limit %d raised to the hard limit %d", soft, hard)


def quiet_closed_tls(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's handler of exceptions nothing awaited: as asyncio's, except uvloop's
    "Fatal error on SSL protocol" for a TLS connection whose peer already closed it
    (RuntimeError "... the handler is closed": uvloop issue #506, open) — logged once per
    connection with a traceback at ERROR, ~40 at an instant on a busy manager of the scale
    lab when the workers' held feed polls are cut. Nothing is lost (the peer is gone); it
    is logged at DEBUG."""
    exc = context.get("exception")
    if isinstance(exc, RuntimeError) and "handler is closed" in str(exc) and \
            str(context.get("message", "")).startswith("Fatal error on SSL"):
        log.debug("TLS connection already closed by its peer: %s", exc)
        return
    loop.default_exception_handler(context)


__all__ = ["Agent", "Path", "new_id", "quiet_closed_tls", "run_agent"]
