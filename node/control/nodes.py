"""Node commands: `node ls`, `node inspect`, `node update`, `node rm`.

Owns: the views of the cluster's nodes (with the manager status from the Raft replica and
the membership seen by gossip) and the user's changes to a node record (availability,
labels, generic resources: shoal.raft.generic) and its removal — which also revokes its
certificate, since every node-to-node route accepts only certificates of current members
(Security.authorize). Managers only.
Promotion/demotion: shoal.node.control.roles. Must not touch: this node's own lifecycle,
HTTP, the runtime.
"""

from __future__ import annotations

import time
from typing import Any

from shoal.node import views
from shoal.node.context import NodeContext, VoterChanges
from shoal.node.errors import BadRequest, NotFound, from_store_error
from shoal.node.membership import GossipControl
from shoal.raft import generic, schema
from shoal.raft.errors import StoreError, ValidationError
from shoal.raft.models import Node, NodeRole, NodeState
from shoal.raft.state import Snapshot


def find_node(snap: Snapshot, ref: str) -> Node:
    """A node by id, hostname or unique id prefix."""
    if ref in snap.nodes:
        return snap.nodes[ref]
    matches = [n for n in snap.nodes.values() if n.hostname == ref] or \
              [n for n in snap.nodes.values() if n.id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NotFound(f"no such node: {ref}", "node")
    raise BadRequest(f"node {ref!r} is ambiguous: {len(matches)} nodes match", "node")


class Nodes:
    def __init__(self, ctx: NodeContext, gossip: GossipControl, voters: VoterChanges) -> None:
        self.ctx = ctx
        self.gossip = gossip  # membership view and member detail
        self.voters = voters  # Raft membership changes, one at a time

    def _ref(self, ref: str) -> str:
        """``self`` is the node asked (docker's `node inspect self`)."""
        return self.ctx.node_id if ref == "self" else ref

    async def nodes(self) -> list[dict[str, Any]]:
        store = self.ctx.require_manager()
        gossip, metas, _ = await self.gossip.node_views()
        snap = store.snapshot()
        return [views.node_view(n, snap, store, gossip=gossip, metas=metas) for n in
                sorted(snap.nodes.values(), key=lambda n: (n.hostname, n.id))]

    async def node(self, ref: str) -> dict[str, Any]:
        store = self.ctx.require_manager()
        n = find_node(store.snapshot(), self._ref(ref))
        gossip, metas, detail = await self.gossip.node_views(n.id)
        snap = store.snapshot()
        n = snap.nodes.get(n.id, n)
        out = views.node_view(n, snap, store, detail=True, gossip=gossip, metas=metas)
        out["gossip"] = detail  # state, incarnation, state_since
        return out

    async def update_node(self, ref: str, body: dict[str, Any]) -> dict[str, Any]:
        store = self.ctx.require_manager()
        n = find_node(store.snapshot(), self._ref(ref))
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
            if str(k) not in labels:  # (docker's error too: a typo is not a silent no-op)
                raise BadRequest(f"node {n.hostname} has no label {k!r}", "label_rm")
            labels.pop(str(k))
        if labels != n.labels:
            cmd["labels"] = labels
        g_add, g_rm = body.get("generic_resource_add", []), body.get("generic_resource_rm", [])
        if g_add or g_rm:
            if not isinstance(g_add, list) or not isinstance(g_rm, list):
                raise BadRequest("generic_resource_add and generic_resource_rm must be lists",
                                 "generic_resource_add")
            field = "generic_resource_add" if g_add else "generic_resource_rm"
            err = schema.node_refusal(("generic_resources",), store.snapshot().cluster.schema)
            if err is not None:
                raise BadRequest(err.message.replace("generic_resources", field, 1), field)
            try:
                res = generic.updated(n.generic_resources, g_add, g_rm)
            except ValidationError as exc:
                raise BadRequest(exc.message, exc.field) from None
            if res != n.generic_resources:
                cmd["generic_resources"] = res
        await self.ctx.propose(cmd)
        return await self.node(n.id)

    async def remove_node(self, ref: str, force: bool) -> dict[str, Any]:
        """Remove a node. This also revokes its certificate: every node-to-node route accepts
        only certificates of current members (Security.authorize), so the removed agent is
        refused from the next request on and needs a (new) token to come back."""
        store = self.ctx.require_manager()
        n = find_node(store.snapshot(), self._ref(ref))
        if n.id == self.ctx.node_id:
            raise BadRequest("cannot remove the node you are on; use `shoal leave`", "node")
        if n.role is NodeRole.MANAGER:
            if n.state is NodeState.READY and n.raft_addr in store.voters():
                # (even with --force, as Swarm: its voter removed, a live manager would go on
                # as a manager nobody answers — demote it, and it becomes a worker that knows;
                # one that left (`leave --force` removed its voter) is removed as any node)
                raise BadRequest(f"node {n.hostname} is a manager and a member of the Raft "
                                 f"group: demote it first (`shoal node demote {n.hostname}`), "
                                 "then remove it", "node")
            async with self.voters.lock:
                if n.raft_addr in store.voters():
                    try:
                        await store.remove_voter(n.raft_addr)
                    except StoreError as exc:
                        raise from_store_error(exc) from exc
        await self.ctx.propose({"op": "node_remove", "id": n.id, "now": time.time(),
                                "force": force})
        return {"id": n.id, "removed": True}


__all__ = ["Nodes", "find_node"]
