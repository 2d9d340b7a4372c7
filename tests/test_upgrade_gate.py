"""The schema gate of a rolling upgrade (node/upgrade.py), table-tested without network or root,
and the leader loop proposing what it decides, on the in-memory store.

Each test names the property it checks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import msgpack
import pytest

from shoal.node.leader import LeaderLoop
from shoal.node.orchestrator import OrchestratorConfig
from shoal.node.source import MemoryStore
from shoal.node.upgrade import (
    META_KEY,
    SCHEMA,
    announced_schema,
    cluster_schema,
    gossip_meta,
    join_refusal,
    schema_to_raise,
)
from shoal.raft.models import Node, NodeRole, NodeState, to_dict
from shoal.raft.state import ClusterInfo, Snapshot

_ADDRS = {"m1": "10.0.0.1", "m2": "10.0.0.2", "w1": "10.0.0.3"}


def _node(nid: str, role: NodeRole, state: NodeState = NodeState.READY) -> Node:
    return Node(id=nid, hostname=nid, addr=_ADDRS[nid], api_port=2377, raft_port=2378,
                role=role, state=state)


def _snap(schema: int | None = None) -> Snapshot:
    """Two managers (one down) and a worker; the cluster at ``schema`` (None: a state written
    before ClusterInfo had a schema)."""
    cluster = ClusterInfo(cluster_id="c1")
    if schema is not None:
        cluster.schema = schema  # type: ignore[attr-defined,unused-ignore]
    nodes = {"m1": _node("m1", NodeRole.MANAGER),
             "m2": _node("m2", NodeRole.MANAGER, NodeState.DOWN),
             "w1": _node("w1", NodeRole.WORKER)}
    return Snapshot(index=7, cluster=cluster, nodes=nodes, services={}, tasks={})


OLD: dict[str, Any] = {"role": "manager", "hostname": "x", "api": "10.0.0.1:2377"}  # 0.1
NEW: dict[str, Any] = {**OLD, META_KEY: 2}


@pytest.mark.parametrize(("name", "cluster", "metas", "expected"), [
    ("every node announces 2: raise to 2", None,
     {"m1": NEW, "m2": NEW, "w1": NEW}, 2),
    ("a worker still runs 0.1 (no mark): nothing", None,
     {"m1": NEW, "m2": NEW, "w1": OLD}, None),
    ("a down manager announced 2 before going down: it counts", None,
     {"m1": NEW, "m2": NEW, "w1": NEW}, 2),
    ("a node gossip never heard of counts as schema 1", None,
     {"m1": NEW, "w1": NEW}, None),
    ("already at 2: nothing", 2, {"m1": NEW, "m2": NEW, "w1": NEW}, None),
    ("a node announces 3, the others 2: raise to 2 only", None,
     {"m1": NEW, "m2": {**NEW, META_KEY: 3}, "w1": NEW}, 2),
    ("everyone announces 3 but this leader runs 2: capped at its own", None,
     {n: {**NEW, META_KEY: 3} for n in ("m1", "m2", "w1")}, 2),
    ("at 2, everyone announces 3 but this leader runs 2: nothing", 2,
     {n: {**NEW, META_KEY: 3} for n in ("m1", "m2", "w1")}, None),
    ("a malformed mark (string) counts as schema 1", None,
     {"m1": NEW, "m2": {**NEW, META_KEY: "2"}, "w1": NEW}, None),
    ("a boolean mark counts as schema 1", None,
     {"m1": NEW, "m2": {**NEW, META_KEY: True}, "w1": NEW}, None),
    ("metadata of nodes no longer in the cluster is ignored", None,
     {"m1": NEW, "m2": NEW, "w1": NEW, "gone": OLD}, 2),
])
def test_schema_to_raise_only_when_every_node_of_the_snapshot_announces_it(
        name: str, cluster: int | None, metas: Mapping[str, Mapping[str, Any]],
        expected: int | None) -> None:
    assert schema_to_raise(_snap(cluster), metas) == expected, name


def test_a_leader_running_a_newer_schema_raises_to_what_every_node_can_run() -> None:
    """own=3 (a later release leading): a cluster at 2 with every node on 3 goes to 3; with
    one node on 2 it stays."""
    three = {n: {**NEW, META_KEY: 3} for n in ("m1", "m2", "w1")}
    assert schema_to_raise(_snap(2), three, own=3) == 3
    assert schema_to_raise(_snap(2), {**three, "w1": NEW}, own=3) is None


def test_an_empty_cluster_raises_nothing() -> None:
    snap = Snapshot(index=0, cluster=ClusterInfo(), nodes={}, services={}, tasks={})
    assert schema_to_raise(snap, {}) is None


def test_a_state_without_a_schema_is_schema_1_and_this_code_announces_its_own() -> None:
    assert cluster_schema(_snap()) == 1
    assert announced_schema(None) == 1 and announced_schema(OLD) == 1
    meta = gossip_meta("worker", "h4", "10.0.0.4:2377")
    assert meta == {"role": "worker", "hostname": "h4", "api": "10.0.0.4:2377",
                    META_KEY: SCHEMA}
    assert announced_schema(meta) == SCHEMA == 2


class _Cluster:
    """A manager and a worker on the in-memory store, led by a LeaderLoop whose gossip
    metadata the test sets."""

    def __init__(self) -> None:
        self.store = MemoryStore()
        self.metas: dict[str, dict[str, Any]] = {}
        self.leader = LeaderLoop(self.store, {}, OrchestratorConfig(), asyncio.Event(),
                                 gossip_meta=lambda: self.metas)

    async def boot(self) -> None:
        await self.store.propose({"op": "cluster_init", "cluster_id": "c1", "now": 1.0,
                                  "worker_secret": "", "manager_secret": "", "digest": ""})
        for nid, role in (("m1", NodeRole.MANAGER), ("w1", NodeRole.WORKER)):
            await self.store.propose({"op": "node_add", "now": 1.0,
                                      "node": to_dict(_node(nid, role))})

    def schema_commands(self) -> list[dict[str, Any]]:
        _, blobs = self.store.changes_since(0) or (0, [])
        cmds = [msgpack.unpackb(b, raw=False, strict_map_key=False) for b in blobs]
        return [c for c in cmds if c.get("op") == "cluster_schema"]


async def test_the_leader_proposes_cluster_schema_once_and_only_when_every_node_announces(
        ) -> None:
    """While the worker runs 0.1 no pass proposes; once it announces 2 one pass proposes
    ``cluster_schema`` 2, and later passes do not propose it again (raised, or refused by a
    state machine that does not know it: either way, no write per pass)."""
    c = _Cluster()
    await c.boot()
    c.metas = {"m1": NEW, "w1": OLD}
    await c.leader.one_pass()
    await c.leader.one_pass()
    assert c.schema_commands() == []

    c.metas = {"m1": NEW, "w1": NEW}
    await c.leader.one_pass()
    assert c.schema_commands() == [{"op": "cluster_schema", "schema": 2}]
    for _ in range(3):
        await c.leader.one_pass()
    assert len(c.schema_commands()) == 1


async def test_a_leader_without_gossip_metadata_never_proposes_a_schema() -> None:
    c = _Cluster()
    c.leader.gossip_meta = None
    await c.boot()
    await c.leader.one_pass()
    assert c.schema_commands() == []


@pytest.mark.parametrize(("cluster", "joiner", "refused"), [
    (None, None, False),  # a 0.1 cluster takes a 0.1 node
    (None, 2, False),  # and a node on today's code
    (2, 2, False),
    (2, 3, False),  # a newer agent joins an older cluster (it reads the older schema)
    (2, None, True),  # after the raise, a 0.1 agent (its request says nothing) is refused
    (2, 1, True),
    (2, "2", True),  # a malformed mark counts as schema 1
])
def test_a_node_whose_code_cannot_read_the_cluster_schema_is_refused_at_join(
        cluster: int | None, joiner: Any, refused: bool) -> None:
    problem = join_refusal(_snap(cluster), joiner)
    assert (problem is not None) == refused, problem
    if problem is not None:
        assert "upgrade shoal on this node" in problem
