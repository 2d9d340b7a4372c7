"""The role switch of this node: worker ⇄ manager, without stopping its tasks.

Owns: deciding when this node's own role differs from the one it runs as (its record in the
state feed or Raft replica; or, for a manager demoted while it was away, the other managers'
word), and the switch itself: a manager certificate, the Raft secret and managers' key, a Raft
voter caught up before it replaces the state feed — or the other way: a worker certificate
signed while the managers' key is still here, a state feed caught up before the Raft replica
is closed and its secret, key and log removed. The worker, mesh, gossip and heartbeats keep
running; only the state source under them is swapped. One switch at a time (``_role_lock``);
a failed one is retried by the watcher after 5 s.

Must not touch: the decision to promote/demote a node (shoal.node.control.roles, the leader),
the membership lifecycle (shoal.node.lifecycle) or the construction of components
(shoal.node.agent, which mixes this class into its Agent and owns the attributes declared
below). Nothing but shoal.node.agent imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from shoal.node import pki
from shoal.node.config import AgentConfig, NodeIdentity
from shoal.node.context import NodeContext
from shoal.node.control.dispatcher import Dispatcher
from shoal.node.control.roles import hand_over_leadership
from shoal.node.errors import ApiError, BadRequest, NotInCluster, Unavailable
from shoal.node.events import EventLog
from shoal.node.feed import StateFeed
from shoal.node.membership import Membership
from shoal.node.security import Security
from shoal.node.source import StateSource
from shoal.node.worker import Worker
from shoal.raft.models import NodeRole
from shoal.raft.store import RaftStore

log = logging.getLogger("shoal.agent")
# The longest the role watch sleeps when nothing wakes it, seconds.
ROLE_WATCH = 5.0


class RoleSwitch:
    """Mixed into shoal.node.agent.Agent: the role switch of this node (see the module)."""

    # --- state the Agent constructs (Agent.__init__ / _start_member)
    config: AgentConfig
    data_dir: Path
    ctx: NodeContext
    security: Security
    dispatcher: Dispatcher
    event_log: EventLog
    membership: Membership | None
    _worker: Worker | None
    _member_tasks: list[asyncio.Task[Any]]
    _leader_task: asyncio.Task[None] | None
    _leaving: bool
    # --- this class's own state (initialised in Agent.__init__)
    _role_lock: asyncio.Lock
    _role_task: asyncio.Task[str | None] | None
    _role_wakeup: asyncio.Event
    _role_retry_at: float
    # --- what the Agent provides
    _make_raft: Callable[[NodeIdentity], RaftStore]
    _make_feed: Callable[[NodeIdentity], StateFeed]
    _on_apply: Callable[[int], None]
    _wake: Callable[[], None]
    _leadership_loop: Callable[[], Coroutine[Any, Any, None]]
    _wait_for: Callable[[Any, float, str], Coroutine[Any, Any, None]]
    _remove_raft_files: Callable[[], None]
    _gossip_meta: Callable[[NodeIdentity], dict[str, Any]]

    @property
    def _raft_self(self) -> str:
        return f"{self.config.advertise_addr}:{self.config.raft_port}"

    async def role_changed(self, peer: pki.CertInfo | None, role: Any) -> dict[str, Any]:
        """A manager tells this node its role changed (mTLS, a manager's certificate):
        switch now. Used for demotion, which a removed Raft voter cannot learn from Raft."""
        self.security.authorize(peer, manager=True)
        ident = self.ctx.identity
        if ident is None:
            raise NotInCluster("this node is not part of a cluster")
        if role not in ("manager", "worker"):
            raise BadRequest("role must be 'manager' or 'worker'", "role")
        task = self._request_role(str(role))
        try:
            problem = await asyncio.wait_for(asyncio.shield(task), self.config.join_timeout + 2)
        except TimeoutError:
            problem = "still switching"
        now = self.ctx.identity  # (the role it runs as after the switch)
        return {"node_id": ident.node_id, "role": now.role if now else "",
                "error_message": problem or ""}

    async def _role_watch(self) -> None:
        """Level-triggered: whenever this node's own record has another role than the one it
        runs as (seen in its state feed or Raft replica, also after a restart), switch."""
        unready_since: float | None = None
        while True:
            # woken by applied entries and a finished switch; else a look every ROLE_WATCH
            # s, or sooner when a failed switch's retry is due
            retry = self._role_retry_at - time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ROLE_WATCH if retry <= 0 else min(ROLE_WATCH,
                                                                             retry + 0.01)):
                    await self._role_wakeup.wait()
            self._role_wakeup.clear()
            ident, store = self.ctx.identity, self.ctx.store
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
            task.add_done_callback(lambda _t: self._role_wakeup.set())  # look again
        return task

    async def _switch_role(self, role: str) -> str | None:
        """Become ``role`` without stopping tasks: the worker, mesh, gossip and heartbeats
        keep running, only the state source is swapped (feed ⇄ Raft voter) once the new one
        has caught up. None on success, else why not (retried later by the watcher)."""
        async with self._role_lock:
            ident = self.ctx.identity
            if ident is None or self.ctx.store is None or ident.role == role:
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
        why, pause = "", 0.3
        while self.security.cert is None or self.security.cert.role != pki.ROLE_MANAGER:
            if time.monotonic() > deadline:
                raise Unavailable(f"no manager certificate for this node: {why}")
            me = feed.snapshot().nodes.get(ident.node_id)
            if me is None or me.role is not NodeRole.MANAGER:  # (demoted again meanwhile)
                raise Unavailable("this node's record no longer says manager")
            try:
                await self.security.renew()
                why = "a manager still issued a worker certificate"
            except ApiError as exc:
                why = exc.message
            if self.security.cert is not None and self.security.cert.role != pki.ROLE_MANAGER:
                await asyncio.sleep(pause)  # (backing off, as swarmkit's renewals)
                pause = min(pause * 2, 2.0)
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
        self._use_source(new, raft, raft)
        self._cancel_member_task("state-feed")
        feed.close()
        self._member_tasks.append(asyncio.create_task(self._leadership_loop(), name="lead"))
        self._switched(new)
        log.info("this node is now a manager (Raft voter %s)", self._raft_self)

    def _use_source(self, new: NodeIdentity, source: StateSource,
                    raft: RaftStore | None) -> None:
        """Put ``source`` (the Raft replica, or a state feed) under the running worker,
        mesh, events and API, as ``new``'s role."""
        self.ctx.use(new, source, raft)
        self.event_log.attach(raft)
        source.add_listener(self._on_apply)
        if self._worker is not None:
            self._worker.store = source

    def _switched(self, new: NodeIdentity) -> None:
        """The switch is done: persist the identity, announce the role, wake the loops."""
        new.save(self.data_dir)
        self._update_gossip_role(new)
        self._wake()

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
        self._use_source(new, feed, None)
        self._cancel_member_task("lead")
        if self._leader_task is not None:
            self._leader_task.cancel()
            self._leader_task = None
        self._member_tasks.append(run)
        self.dispatcher.heartbeats.clear()
        self.dispatcher.gossip_alive.clear()  # (what a leader of this node saw: none now)
        self._switched(new)
        await asyncio.to_thread(raft.close)
        self._remove_raft_files()
        log.info("this node is now a worker (Raft secret, managers' key and Raft log removed)")

    def _cancel_member_task(self, name: str) -> None:
        for t in [t for t in self._member_tasks if t.get_name() == name]:
            t.cancel()
            self._member_tasks.remove(t)

    def _update_gossip_role(self, identity: NodeIdentity) -> None:
        if self.membership is not None:
            with contextlib.suppress(Exception):
                self.membership.update_meta(self._gossip_meta(identity))
                self.membership.set_confirm_suspicions(identity.role == NodeRole.MANAGER)
