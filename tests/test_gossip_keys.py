"""Gossip key rotation: the keyring, and the agent's three-phase rotation coordinator
(shoal.node.membership.GossipControl) driving real gossip members over UDP on loopback.

The coordinator runs against fake agents: a fake store (the node list), a fake Security whose
``call`` delivers a rotation step straight to the target's GossipControl (the mTLS hop is
tested on netns hosts in test_gossip_cluster.py), and real ``Membership`` objects with
``Config.local()`` timings. Properties:

* a rotation leaves every node with only the new key, persisted, and never a suspicion;
* a rotation that cannot reach a node in phase 1 is rolled back and changes nothing;
* a node that missed a rotation catches up by itself (decrypt failures → refresh from a
  manager) and is alive again everywhere;
* the keyring's set_keys and the step validation refuse what they must.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from shoal.gossip import Config, Keyring, KeyringError
from shoal.gossip.events import EventKind, MemberEvent
from shoal.gossip.keyring import fingerprint
from shoal.node.errors import BadRequest, KeyRotationFailed, Unavailable
from shoal.node.membership import GossipControl, Membership, parse_key_op
from shoal.raft.models import Node, NodeRole, NodeState

K1, K2, K3 = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))


# ------------------------------------------------------------------------------ the keyring
def test_set_keys_makes_the_keyring_exactly_the_given_keys() -> None:
    ring = Keyring(K1)
    assert ring.set_keys([K1]) is False
    assert ring.set_keys([K2, K1]) is True
    assert ring.keys() == [K2, K1] and ring.primary == K2
    assert ring.set_keys([K2]) is True and ring.keys() == [K2]
    assert ring.fingerprints() == [fingerprint(K2)]
    with pytest.raises(KeyringError):
        ring.set_keys([])
    with pytest.raises(KeyringError):
        ring.set_keys([b"short"])
    assert ring.keys() == [K2]  # a refused call changes nothing


def test_fingerprints_are_short_stable_and_distinct() -> None:
    assert fingerprint(K1) == fingerprint(bytes(K1)) and len(fingerprint(K1)) == 16
    assert fingerprint(K1) != fingerprint(K2)
    assert K1.hex()[:16] not in fingerprint(K1)


@pytest.mark.parametrize(("body", "field"), [
    ({"op": "burn", "key": K1.hex()}, "op"),
    ({"key": K1.hex()}, "op"),
    ({"op": "use", "key": "zz"}, "key"),
    ({"op": "use", "key": "00" * 20}, "key"),
    ({"op": "use"}, "key"),
])
def test_rotation_steps_are_validated(body: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_key_op(body)
    assert info.value.field == field
    assert parse_key_op({"op": "retire", "key": K2.hex()}) == ("retire", K2)


# ------------------------------------------------------------------------------ fake agents
class FakeIdentity:
    def __init__(self, node_id: str, key: bytes) -> None:
        self.node_id = node_id
        self.gossip_key = key
        self.gossip_extra_keys: list[bytes] = []
        self.saves = 0

    def save(self, _data_dir: Path) -> None:
        self.saves += 1


class FakeSecurity:
    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster
        self.client_ctx = object()
        self.unreachable: set[str] = set()

    def authorize(self, peer: Any, manager: bool = False) -> None:
        assert peer == "manager-cert" and manager

    async def call(self, addr: str, path: str, body: dict[str, Any], **_: Any) -> dict[str, Any]:
        target = self.cluster.by_addr[addr]
        if target.identity.node_id in self.unreachable:
            raise Unavailable(f"cannot reach {addr}")
        if path == "/v1/cluster/gossip-keys":
            return target.gossip.apply_key_op("manager-cert", body)
        assert path == "/v1/cluster/keys"
        return {"gossip_key": target.identity.gossip_key.hex(),
                "gossip_keys": target.gossip.member_keys()}


class FakeAgent:
    def __init__(self, cluster: FakeCluster, node: Node, key: bytes) -> None:
        self.cluster = cluster
        self.node = node
        self.identity = FakeIdentity(node.id, key)
        self.security = FakeSecurity(cluster)
        self.config = SimpleNamespace(gossip_preset="local")
        self.data_dir = Path("/nonexistent")
        self.membership: Membership | None = None
        self.gossip = GossipControl(cast(Any, self), cast(Any, self.security),
                                    lambda: self.membership)

    @property
    def store(self) -> Any:
        nodes = {a.node.id: a.node for a in self.cluster.agents}
        return SimpleNamespace(snapshot=lambda: SimpleNamespace(nodes=nodes),
                               leader_addr=lambda: f"{self.cluster.agents[0].node.addr}:2378")

    def require_manager(self) -> Any:
        assert self.node.role is NodeRole.MANAGER
        return self.store


class FakeCluster:
    def __init__(self) -> None:
        self.agents: list[FakeAgent] = []
        self.by_addr: dict[str, FakeAgent] = {}
        self.events: list[tuple[str, MemberEvent]] = []

    def add(self, index: int, key: bytes) -> FakeAgent:
        role = NodeRole.MANAGER if index == 0 else NodeRole.WORKER
        node = Node(id=f"n{index}", hostname=f"h{index}", addr=f"10.0.0.{index + 1}",
                    api_port=2377, raft_port=2378, role=role, state=NodeState.READY)
        agent = FakeAgent(self, node, key)
        self.agents.append(agent)
        self.by_addr[node.api_addr] = agent
        return agent

    async def start(self, agent: FakeAgent) -> None:
        ident = agent.identity

        def record(ev: MemberEvent, me: str = ident.node_id) -> None:
            self.events.append((me, ev))

        m = Membership(ident.node_id, "127.0.0.1", 0, ident.gossip_key, {"i": ident.node_id},
                       Config.local(), on_change=record, extra_keys=ident.gossip_extra_keys,
                       refresh_keys=agent.gossip.refresh_keys)
        agent.membership = m
        others = [a.membership for a in self.agents if a.membership not in (None, m)]
        await m.start(lambda: [f"{o.list.address[0]}:{o.list.address[1]}" for o in others
                               if o is not None])

    def members(self) -> list[Membership]:
        return [a.membership for a in self.agents if a.membership is not None]

    def all_alive(self) -> bool:
        ms = self.members()
        return all(list(m.view().values()) == ["alive"] * len(ms) for m in ms)

    def kinds(self, *kinds: EventKind) -> list[tuple[str, str]]:
        return [(me, ev.member.name) for me, ev in self.events if ev.kind in kinds]


async def wait_for(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@asynccontextmanager
async def fake_cluster(n: int) -> AsyncIterator[FakeCluster]:
    cluster = FakeCluster()
    try:
        for i in range(n):
            await cluster.start(cluster.add(i, K1))
        await wait_for(cluster.all_alive)
        yield cluster
    finally:
        for m in cluster.members():
            await m.close(leave=False)


# ------------------------------------------------------------------------------ rotation
async def test_rotation_ends_with_only_the_new_key_everywhere_and_no_suspicion() -> None:
    async with fake_cluster(4) as cluster:
        manager = cluster.agents[0]
        report = await manager.gossip.rotate_key()
        assert report["old_keys"] == [fingerprint(K1)] and report["skipped"] == []
        assert sorted(report["nodes"]) == ["h0", "h1", "h2", "h3"]
        new = report["key"]
        await asyncio.sleep(1.0)  # traffic under the new key only
        for agent in cluster.agents:
            assert agent.membership is not None
            assert [fingerprint(k) for k in agent.membership.installed_keys()] == [new]
            assert fingerprint(agent.identity.gossip_key) == new  # persisted
            assert agent.identity.gossip_extra_keys == [] and agent.identity.saves >= 3
            assert agent.membership.stats().get("drop.decrypt", 0) == 0
        assert cluster.kinds(EventKind.SUSPECT, EventKind.DEAD) == []
        assert cluster.all_alive()
        info = manager.gossip.info()
        assert info is not None and info["keys"]["rotations"] == 1


async def test_rotation_that_cannot_reach_a_node_is_rolled_back() -> None:
    async with fake_cluster(3) as cluster:
        manager = cluster.agents[0]
        manager.security.unreachable.add("n2")
        with pytest.raises(KeyRotationFailed, match="phase 1") as info:
            await manager.gossip.rotate_key()
        assert "h2" in info.value.message
        for agent in cluster.agents:
            assert agent.membership is not None
            assert agent.membership.installed_keys() == [K1]
        manager.security.unreachable.clear()
        await manager.gossip.rotate_key()  # and it can simply be run again
        assert all(a.membership is not None and a.membership.installed_keys() != [K1]
                   for a in cluster.agents)


async def test_a_node_that_missed_the_rotation_catches_up_by_itself() -> None:
    async with fake_cluster(3) as cluster:
        manager, _w1, late = cluster.agents
        assert late.membership is not None
        # the rotation skips the late node (as if it were down), so it keeps only K1
        late_node = late.node
        late.node = dataclasses.replace(late_node, state=NodeState.DOWN)
        report = await manager.gossip.rotate_key()
        assert report["skipped"] == ["h2"]
        late.node = late_node
        # its K1 traffic is dropped by the others and theirs by it: its watchdog sees
        # drop.decrypt, asks the manager for the keyring and adopts it
        await wait_for(lambda: late.membership is not None and late.membership.refreshes >= 1,
                       timeout=30)
        assert fingerprint(late.identity.gossip_key) == report["key"]
        await wait_for(cluster.all_alive, timeout=30)
