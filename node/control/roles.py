"""Promote and demote (the cluster side), and the quorum rule.

Owns: `node promote|demote` on the leader (a follower forwards the request over mTLS, as
swarmkit proxies its control API to the leader): the node record first, then the Raft voter
change, one membership change at a time (shoal.node.context.VoterChanges, shared with
joins); a leader that demotes itself hands leadership over first. ``quorum_after_removal``
is swarmkit's rule as a pure function: the managers left must still have a reachable
majority.

The node whose role changes switches by itself (the agent's role switch: it sees its record
in its state feed or Raft replica; a demoted voter is told over mTLS since a removed voter
hears nothing more from Raft). Must not touch: this node's own lifecycle, HTTP, the runtime.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from shoal.node import pki
from shoal.node.context import NodeContext, VoterChanges
from shoal.node.control.nodes import find_node
from shoal.node.errors import (
    ApiError,
    BadRequest,
    Conflict,
    NotFound,
    Unavailable,
    from_store_error,
)
from shoal.node.security import Security
from shoal.node.source import ManagerSource
from shoal.raft.errors import StoreError
from shoal.raft.models import Node, NodeRole, NodeState

log = logging.getLogger("shoal.roles")


@dataclass(frozen=True)
class Quorum:
    """The managers left after removing one voter: how many, how many reachable, how many
    are needed for a majority."""

    others: int
    reachable: int
    need: int

    @property
    def ok(self) -> bool:
        return self.reachable >= self.need


def quorum_after_removal(voters: Iterable[str], removed: str, reachable: Collection[str]
                         ) -> Quorum:
    """Would the voters other than ``removed`` still have a majority among those in
    ``reachable`` (the leader counts itself reachable)? Pure; swarmkit's demotion rule."""
    rest = [v for v in voters if v != removed]
    up = [v for v in rest if v in reachable]
    return Quorum(others=len(rest), reachable=len(up), need=len(rest) // 2 + 1)


def even_managers_warning(managers: int) -> str:
    if managers == 0 or managers % 2:
        return ""
    return (f"the cluster now has {managers} managers, which tolerate no more failures "
            f"than {managers - 1} would; run an odd number of managers (1, 3 or 5)")


def leader_node(store: ManagerSource) -> Node | None:
    """The node record of the current Raft leader, if known."""
    addr = store.leader_addr()
    return next((n for n in store.snapshot().nodes.values()
                 if n.raft_addr == addr and n.role is NodeRole.MANAGER), None)


async def hand_over_leadership(store: ManagerSource) -> Node:
    """Make another manager the leader (Raft TimeoutNow); its node record."""
    deadline = time.monotonic() + 5.0
    asked = 0.0
    while time.monotonic() < deadline:
        addr = store.leader_addr()
        if not store.is_leader() and addr and addr != store.self_addr:
            leader = leader_node(store)
            if leader is not None:
                log.info("handed leadership over to %s", leader.hostname)
                return leader
        elif store.is_leader() and time.monotonic() - asked > 0.5:
            asked = time.monotonic()
            store.transfer_leadership()
        await asyncio.sleep(0.05)
    raise Unavailable("could not hand the leadership over to another manager within 5 s "
                      "(are they caught up?); retry")


def _role_result(n: Node, role: str, changed: bool, message: str,
                 warning: str = "") -> dict[str, Any]:
    return {"id": n.id, "hostname": n.hostname, "role": role, "changed": changed,
            "message": message, "warning": warning}


class Roles:
    def __init__(self, ctx: NodeContext, security: Security, voters: VoterChanges) -> None:
        self.ctx = ctx
        self.security = security  # forwarding to the leader, telling a demoted node
        self.voters = voters

    async def set_role(self, ref: str, role: Any) -> dict[str, Any]:
        """`shoal node promote|demote NODE`: on any manager."""
        store = self.ctx.require_manager()
        if role not in ("manager", "worker"):
            raise BadRequest("role must be 'manager' or 'worker'", "role")
        n = find_node(store.snapshot(), ref)
        return await self._role_on_leader(store, n.id, str(role))

    async def _role_on_leader(self, store: ManagerSource, node_id: str, role: str
                              ) -> dict[str, Any]:
        if store.is_leader():
            return await self._leader_set_role(store, node_id, role)
        leader = leader_node(store)
        if leader is None:
            raise Unavailable("no leader (election in progress or quorum lost); retry")
        return await self.security.call(leader.api_addr, "/v1/cluster/node-role",
                                        {"node_id": node_id, "role": role},
                                        timeout=self.ctx.config.join_timeout + 20)

    async def node_role_request(self, peer: pki.CertInfo | None, node_id: Any, role: Any
                                ) -> dict[str, Any]:
        """A manager forwards a promote/demote to the leader (mTLS, manager certificate)."""
        self.security.authorize(peer, manager=True)
        store = self.ctx.require_manager()
        if not isinstance(node_id, str) or not node_id:
            raise BadRequest("node_id is required", "node_id")
        if role not in ("manager", "worker"):
            raise BadRequest("role must be 'manager' or 'worker'", "role")
        if not store.is_leader():
            raise Unavailable("this manager is no longer the leader; retry")
        return await self._leader_set_role(store, node_id, str(role))

    async def _leader_set_role(self, store: ManagerSource, node_id: str, role: str
                               ) -> dict[str, Any]:
        n = store.snapshot().nodes.get(node_id)
        if n is None:
            raise NotFound(f"no such node: {node_id}", "node")
        if role == "manager":
            return await self._promote(store, n)
        return await self._demote(store, n)

    async def _promote(self, store: ManagerSource, n: Node) -> dict[str, Any]:
        if n.role is NodeRole.MANAGER and n.raft_addr in store.voters():
            return _role_result(n, "manager", False, f"Node {n.hostname} is already a manager.")
        if n.state is not NodeState.READY:
            raise BadRequest(f"node {n.hostname} is {n.state.value}: only a running node can "
                             "be promoted (its Raft voter would count for quorum before it "
                             "runs)", "node")
        async with self.voters.lock:
            await self.voters.wait_previous("manager join or promotion")
            if n.role is not NodeRole.MANAGER:
                # first the record: the node sees it in its state feed and switches
                # (renewal then issues a manager certificate, /v1/cluster/keys the Raft
                # secret); the Raft port admits its address only from now on
                await self.ctx.propose({"op": "node_update", "id": n.id, "now": time.time(),
                                        "role": "manager"})
            fut: asyncio.Future[int] | None = None
            if n.raft_addr not in store.voters():
                # commits only once the node runs its voter (the new configuration counts it)
                fut = self.voters.pending = store.start_add_voter(n.raft_addr)
                self.voters.pending_addr = n.raft_addr
        if fut is not None:
            timeout = self.ctx.config.join_timeout
            try:
                err = await asyncio.wait_for(asyncio.shield(fut), timeout)
            except TimeoutError:
                raise Unavailable(f"node {n.hostname} is now a manager in the cluster state "
                                  f"but has not started its Raft voter within {timeout:g}s "
                                  "(it switches as soon as it can; see its agent log)") from None
            if err != 0:
                raise Unavailable(f"adding node {n.hostname} as a Raft voter failed "
                                  f"(pysyncobj reason {err}); retry")
            # the change commits with the old majority when there are 3 or more voters: the
            # answer waits until the node runs its voter (the leader has its connection), so
            # that a demote or a write right after finds it a manager (one came 20 s late)
            until = time.monotonic() + timeout
            while not store.peer_connected(n.raft_addr):
                if time.monotonic() > until:
                    raise Unavailable(f"node {n.hostname} is a Raft voter but has not "
                                      f"connected within {timeout:g}s (see its agent log)")
                await asyncio.sleep(0.1)
        return _role_result(n, "manager", True,
                            f"Node {n.hostname} promoted to a manager in the cluster.",
                            even_managers_warning(len(store.voters())))

    async def _demote(self, store: ManagerSource, n: Node) -> dict[str, Any]:
        voters = store.voters()
        if n.role is NodeRole.WORKER and n.raft_addr not in voters:
            return _role_result(n, "worker", False, f"Node {n.hostname} is already a worker.")
        snap = store.snapshot()
        managers = [m for m in snap.nodes.values() if m.role is NodeRole.MANAGER]
        if n.role is NodeRole.MANAGER and len(managers) <= 1:
            raise BadRequest(f"can't demote the last manager of the cluster ({n.hostname}): "
                             "promote another node first", "node")
        if n.state is not NodeState.READY:
            raise BadRequest(f"node {n.hostname} is {n.state.value}: it cannot be told to "
                             "stop its Raft voter; remove it with `shoal node rm --force`",
                             "node")
        reachable = {v for v in voters if v == store.self_addr or store.peer_connected(v)}
        q = quorum_after_removal(voters, n.raft_addr, reachable)
        if not q.ok:
            raise Conflict(f"demoting {n.hostname} would cost the cluster its quorum: "
                           f"{q.reachable} of the {q.others} other managers are "
                           f"reachable, {q.need} needed", "node")
        if n.raft_addr == store.self_addr:
            # the leader demotes itself: hand leadership over, then the new leader does it
            new = await hand_over_leadership(store)
            return await self.security.call(new.api_addr, "/v1/cluster/node-role",
                                            {"node_id": n.id, "role": "worker"},
                                            timeout=self.ctx.config.join_timeout + 20)
        async with self.voters.lock:
            await self.voters.wait_previous("manager join or promotion")
            if n.role is NodeRole.MANAGER:
                # the record first, while the node still votes: its replica sees it too
                await self.ctx.propose({"op": "node_update", "id": n.id, "now": time.time(),
                                        "role": "worker"})
            if n.raft_addr in store.voters():
                try:
                    await store.remove_voter(n.raft_addr)
                except StoreError as exc:
                    raise from_store_error(exc) from exc
        warning = even_managers_warning(q.others)
        try:  # tell the node now (a removed voter hears nothing more from Raft)
            reply = await self.security.call(
                n.api_addr, "/v1/cluster/role-changed", {"role": "worker"},
                server_hostname=pki.node_hostname(n.id),
                timeout=self.ctx.config.join_timeout + 5)
            problem = str(reply.get("error_message") or "")
        except ApiError as exc:
            problem = exc.message
        if problem:
            warning = "; ".join(x for x in (warning, f"node {n.hostname} has not switched to "
                                            f"a worker yet: {problem}") if x)
        return _role_result(n, "worker", True,
                            f"Manager {n.hostname} demoted in the cluster.", warning)


__all__ = ["Quorum", "Roles", "even_managers_warning", "hand_over_leadership", "leader_node",
           "quorum_after_removal"]
