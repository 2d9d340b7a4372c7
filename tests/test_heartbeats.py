"""Heartbeat routing (node/control/dispatcher.py): a node sends its heartbeat to the leader
alone while the leader answers as the leader, and to every manager in the same beat when it
does not (unknown, stale view, unreachable); a new leader counts every node as heard when it
takes office, also over an entry left from an earlier leadership (node/leader.py).

Three managers' real Dispatchers on MemoryStores holding the same cluster, one worker's
Dispatcher sending; the network between them is an in-memory table of API addresses (what a
test can cut), the receiving side is the real ``heartbeat`` route handler with its
certificate check. No clock: beats are driven one at a time (``heartbeat_once``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from shoal.node import pki
from shoal.node.config import AgentConfig, NodeIdentity
from shoal.node.context import NodeContext
from shoal.node.control.dispatcher import Dispatcher, heartbeat_targets
from shoal.node.errors import Unavailable
from shoal.node.leader import LeaderLoop
from shoal.node.orchestrator import OrchestratorConfig
from shoal.node.security import Security
from shoal.node.source import MemoryStore
from shoal.raft.models import Node, NodeRole, NodeState, to_dict
from shoal.raft.schema import SCHEMA

MANAGERS = {f"m{i}": f"10.0.0.{i}" for i in (1, 2, 3)}
WORKER = ("w1", "10.0.1.1")


def _node(node_id: str, addr: str, role: NodeRole) -> Node:
    return Node(id=node_id, hostname=node_id, addr=addr, api_port=2377, raft_port=2378,
                role=role)


class ViewStore(MemoryStore):
    """A replica whose view of the leader a test sets (``leader_at``: a Raft address)."""

    def __init__(self, self_addr: str) -> None:
        super().__init__(self_addr=self_addr)
        self.leader_at: str | None = None

    def leader_addr(self) -> str | None:
        return self.leader_at


class Net:
    """The API addresses of the lab's managers → their dispatchers; ``down`` ones refuse."""

    def __init__(self) -> None:
        self.managers: dict[str, Dispatcher] = {}
        self.down: set[str] = set()
        self.sent: list[str] = []  # API addresses, one per heartbeat request


class NetSecurity(Security):
    """The sender's side of mTLS replaced by the in-memory network (the certificate a real
    handshake would present is built from the sender's identity)."""

    def __init__(self, ctx: NodeContext, net: Net) -> None:
        super().__init__(ctx)
        self.net = net

    async def call(self, addr: str, path: str, body: dict[str, Any], *,
                   server_role: str = pki.ROLE_MANAGER, ctx: Any = None,
                   server_hostname: str | None = None, timeout: float = 10.0
                   ) -> dict[str, Any]:
        assert path == "/v1/cluster/heartbeat"
        self.net.sent.append(addr)
        if addr in self.net.down:
            raise Unavailable(f"cannot reach {addr}")
        ident = self.ctx.identity
        assert ident is not None
        peer = pki.CertInfo(subject_id=ident.node_id, role=ident.role,
                            cluster_id=ident.cluster_id, serial=1, not_before=0.0,
                            not_after=time.time() + 3600)
        return self.net.managers[addr].heartbeat(peer, body["node_id"])


async def _member(tmp_path: Path, net: Net, node_id: str, addr: str,
                  role: NodeRole) -> tuple[Dispatcher, ViewStore]:
    store = ViewStore(f"{addr}:2378")
    ctx = NodeContext(AgentConfig(data_dir=tmp_path / node_id, advertise_addr=addr), node_id)
    ctx.use(NodeIdentity(node_id=node_id, cluster_id="c1", role=role.value,
                         raft_password="", voters=[]), store,
            store if role is NodeRole.MANAGER else None)
    await store.propose({"op": "cluster_init", "cluster_id": "c1", "now": 1.0,
                         "worker_secret": "", "manager_secret": "", "digest": "",
                         "schema": SCHEMA})
    for nid, a in MANAGERS.items():
        await store.propose({"op": "node_add", "now": 1.0,
                             "node": to_dict(_node(nid, a, NodeRole.MANAGER))})
    await store.propose({"op": "node_add", "now": 1.0,
                         "node": to_dict(_node(*WORKER, NodeRole.WORKER))})
    return Dispatcher(ctx, NetSecurity(ctx, net), lambda: None), store


async def _lab(tmp_path: Path, leader: str) -> tuple[Net, Dispatcher, ViewStore,
                                                      dict[str, ViewStore]]:
    net = Net()
    stores: dict[str, ViewStore] = {}
    for nid, addr in MANAGERS.items():
        disp, store = await _member(tmp_path, net, nid, addr, NodeRole.MANAGER)
        net.managers[f"{addr}:2377"] = disp
        stores[nid] = store
    worker, wstore = await _member(tmp_path, net, *WORKER, NodeRole.WORKER)
    _elect(stores, wstore, leader)
    return net, worker, wstore, stores


def _elect(stores: dict[str, ViewStore], worker: ViewStore, leader: str,
           worker_view: str | None = None) -> None:
    """``leader`` leads; every manager knows it, the worker believes ``worker_view``."""
    for nid, store in stores.items():
        store.leader = nid == leader
        store.leader_at = f"{MANAGERS[leader]}:2378"
    worker.leader_at = f"{MANAGERS[worker_view or leader]}:2378"


def _heard(net: Net) -> dict[str, bool]:
    return {addr.split(":")[0]: WORKER[0] in d.heartbeats for addr, d in net.managers.items()}


def _clear(net: Net) -> None:
    net.sent.clear()
    for d in net.managers.values():
        d.heartbeats.clear()


def test_targets_are_the_leader_alone_when_known_else_every_manager() -> None:
    ms = [_node(nid, a, NodeRole.MANAGER) for nid, a in MANAGERS.items()]
    first, then = heartbeat_targets(ms, "10.0.0.2:2378", broadcast=False)
    assert [m.id for m in first] == ["m2"] and [m.id for m in then] == ["m1", "m3"]
    assert heartbeat_targets(ms, None, broadcast=False) == (ms, [])  # no leader known
    assert heartbeat_targets(ms, "10.0.0.9:2378", broadcast=False) == (ms, [])  # not a manager
    assert heartbeat_targets(ms, "10.0.0.2:2378", broadcast=True) == (ms, [])  # none answered


async def test_beats_go_to_the_leader_alone_once_it_answers_as_leader(tmp_path: Path) -> None:
    net, worker, _, _ = await _lab(tmp_path, leader="m2")
    await worker.heartbeat_once()  # the first beat asks everyone (no leader answered yet)
    assert len(net.sent) == 3 and all(_heard(net).values())
    for _ in range(3):
        _clear(net)
        await worker.heartbeat_once()
        assert net.sent == ["10.0.0.2:2377"]
        assert _heard(net) == {"10.0.0.1": False, "10.0.0.2": True, "10.0.0.3": False}


async def test_a_stale_view_of_the_leader_still_reaches_the_new_leader_in_the_same_beat(
        tmp_path: Path) -> None:
    """Leadership moved to m3 while the worker's state feed still names m2: the beat to m2 is
    answered "not the leader", so the same beat goes to the other managers — m3 hears it
    at once; the next beat, with the view caught up, goes to m3 alone."""
    net, worker, wstore, stores = await _lab(tmp_path, leader="m2")
    await worker.heartbeat_once()
    await worker.heartbeat_once()
    _elect(stores, wstore, "m3", worker_view="m2")
    _clear(net)
    await worker.heartbeat_once()
    assert net.sent[0] == "10.0.0.2:2377" and sorted(net.sent[1:]) == ["10.0.0.1:2377",
                                                                     "10.0.0.3:2377"]
    assert _heard(net)["10.0.0.3"]
    wstore.leader_at = f"{MANAGERS['m3']}:2378"
    _clear(net)
    await worker.heartbeat_once()
    assert net.sent == ["10.0.0.3:2377"]


async def test_an_unreachable_leader_makes_the_beat_go_to_every_manager(tmp_path: Path) -> None:
    net, worker, _, _ = await _lab(tmp_path, leader="m1")
    await worker.heartbeat_once()
    net.down.add("10.0.0.1:2377")
    _clear(net)
    await worker.heartbeat_once()
    assert sorted(net.sent) == ["10.0.0.1:2377", "10.0.0.2:2377", "10.0.0.3:2377"]
    assert _heard(net) == {"10.0.0.1": False, "10.0.0.2": True, "10.0.0.3": True}
    # no manager answered as the leader: the next beat asks every manager at once
    _clear(net)
    await worker.heartbeat_once()
    assert len(net.sent) == 3


async def test_a_manager_leading_itself_records_its_own_beat_and_sends_none(
        tmp_path: Path) -> None:
    net, _, _, _ = await _lab(tmp_path, leader="m1")
    m1 = net.managers["10.0.0.1:2377"]
    await m1.heartbeat_once()
    await m1.heartbeat_once()
    _clear(net)
    await m1.heartbeat_once()
    assert net.sent == [] and "m1" in m1.heartbeats


async def test_a_new_leader_does_not_judge_by_heartbeats_from_an_earlier_leadership(
        tmp_path: Path) -> None:
    """m1 led once and heard w1 then; w1 then beat to another leader for long. When m1 leads
    again it must not take w1 DOWN for a silence it could not hear (only the leader is told):
    w1 counts as heard when m1 takes office, and goes DOWN only if it stays silent past the
    timeout from then."""
    net, _, _, stores = await _lab(tmp_path, leader="m1")
    m1 = net.managers["10.0.0.1:2377"]
    config = OrchestratorConfig()
    m1.heartbeats.update({nid: time.monotonic() for nid in MANAGERS})
    m1.heartbeats[WORKER[0]] = time.monotonic() - 3600.0  # from its earlier leadership
    leader = LeaderLoop(stores["m1"], m1.heartbeats, config, asyncio.Event())
    leader.hear_from_all(time.monotonic())
    await leader.one_pass(led_for=config.leadership_grace)
    assert stores["m1"].snapshot().nodes[WORKER[0]].state is NodeState.READY
    m1.heartbeats[WORKER[0]] -= config.node_down_timeout + 1  # then silent: a real failure
    await leader.one_pass(led_for=config.leadership_grace)
    assert stores["m1"].snapshot().nodes[WORKER[0]].state is NodeState.DOWN


class CatchingUp(ViewStore):
    """A worker's feed still downloading the whole state: not ready, an empty replica, only
    the managers' API addresses it joined through (``managers``, as StateFeed has them)."""

    def __init__(self, self_addr: str, seeds: list[str]) -> None:
        super().__init__(self_addr)
        self.ready = False
        self.seeds = seeds

    def managers(self) -> list[str]:
        return list(self.seeds)


async def test_a_worker_catching_up_beats_to_the_managers_it_joined_through(
        tmp_path: Path) -> None:
    """An admitted worker whose replica is still empty (a slow whole-state download after a
    join) must not go silent: the leader would judge it DOWN after the join grace (the
    100-worker storm: 55 such nodes at once). Its beat goes to the managers its feed knows."""
    net, _, _, _ = await _lab(tmp_path, leader="m2")
    ctx = NodeContext(AgentConfig(data_dir=tmp_path / "w1c", advertise_addr=WORKER[1]),
                      WORKER[0])
    feed = CatchingUp(f"{WORKER[1]}:2378", [f"{a}:2377" for a in MANAGERS.values()])
    ctx.use(NodeIdentity(node_id=WORKER[0], cluster_id="c1", role="worker",
                         raft_password="", voters=[]), feed, None)
    worker = Dispatcher(ctx, NetSecurity(ctx, net), lambda: None)
    await worker.heartbeat_once()
    assert sorted(net.sent) == sorted(feed.seeds) and all(_heard(net).values())


async def _add_workers(stores: list[ViewStore], n: int) -> None:
    for store in stores:
        for i in range(n):
            await store.propose({"op": "node_add", "now": 1.0, "node": to_dict(
                _node(f"x{i}", f"10.0.{2 + i // 250}.{1 + i % 250}", NodeRole.WORKER))})


async def test_the_leader_caps_its_heartbeats_per_second_by_stretching_the_period(
        tmp_path: Path) -> None:
    """Nomad's max_heartbeats_per_second: the leader's answer carries the period every node
    must keep so that it receives at most 50 beats a second (1 s up to 50 nodes; 3 s at
    150), and the worker keeps it; a follower's answer carries none."""
    net, worker, wstore, stores = await _lab(tmp_path, leader="m1")
    await worker.heartbeat_once()
    assert worker.heartbeat_period == 1.0  # 4 nodes: the configured period
    await _add_workers([*stores.values(), wstore], 146)  # 150 nodes in all
    await worker.heartbeat_once()
    assert worker.heartbeat_period == 3.0
    follower = net.managers["10.0.0.2:2377"]
    peer = pki.CertInfo(subject_id=WORKER[0], role="worker", cluster_id="c1", serial=1,
                        not_before=0.0, not_after=time.time() + 3600)
    assert "interval" not in follower.heartbeat(peer, WORKER[0])


async def test_nodes_judged_by_heartbeats_get_a_timeout_stretched_like_their_period(
        tmp_path: Path) -> None:
    """In a 150-node cluster nodes beat every 3 s, so a node gossip does not know (here: no
    gossip at all) is DOWN after 3 x node_down_timeout of silence, not 1 x."""
    net, _, wstore, stores = await _lab(tmp_path, leader="m1")
    await _add_workers([*stores.values(), wstore], 146)
    m1 = net.managers["10.0.0.1:2377"]
    config = OrchestratorConfig()
    leader = LeaderLoop(stores["m1"], m1.heartbeats, config, asyncio.Event())
    now = time.monotonic()
    for nid in stores["m1"].snapshot().nodes:
        m1.heartbeats[nid] = now
    m1.heartbeats[WORKER[0]] = now - (config.node_down_timeout + 1)  # 5 s: stretched 12 s
    await leader.one_pass(led_for=config.leadership_grace)
    assert stores["m1"].snapshot().nodes[WORKER[0]].state is NodeState.READY
    m1.heartbeats[WORKER[0]] = now - (3 * config.node_down_timeout + 1)
    await leader.one_pass(led_for=config.leadership_grace)
    assert stores["m1"].snapshot().nodes[WORKER[0]].state is NodeState.DOWN


async def test_a_node_the_leaders_gossip_sees_alive_beats_at_the_gossip_period(
        tmp_path: Path) -> None:
    """Gossip judges such a node, so its beat is only the fallback: the leader asks for one
    every gossip_heartbeat_interval (10 s), credits the silence to its last beat, and a node
    gossip does not know keeps the common period (1 s)."""
    net, worker, _, _stores = await _lab(tmp_path, leader="m1")
    m1 = net.managers["10.0.0.1:2377"]
    await worker.heartbeat_once()
    assert worker.heartbeat_period == 1.0 and m1.heartbeats_received == 1
    m1.gossip_alive.add(WORKER[0])
    before = time.monotonic()
    await worker.heartbeat_once()
    assert worker.heartbeat_period == OrchestratorConfig().gossip_heartbeat_interval == 10.0
    # heard "10 s later": silent for 11 s (the period's late jitter), it is as fresh as a
    # node beating every second that was heard just now
    assert m1.heartbeats[WORKER[0]] - before >= 10.0
    m1.gossip_alive.clear()  # gossip lost it: the common period again at its next beat
    await worker.heartbeat_once()
    assert worker.heartbeat_period == 1.0


async def test_the_leader_pass_keeps_the_nodes_gossip_sees_alive(tmp_path: Path) -> None:
    net, _, _, stores = await _lab(tmp_path, leader="m1")
    m1 = net.managers["10.0.0.1:2377"]
    config = OrchestratorConfig()
    view = {"m1": "alive", "m2": "suspect", "m3": "dead", WORKER[0]: "alive"}

    async def gossip_all() -> tuple[dict[str, str], dict[str, Any], dict[str, float]]:
        return view, {}, {}
    leader = LeaderLoop(stores["m1"], m1.heartbeats, config, asyncio.Event(),
                        gossip_all=gossip_all, gossip_alive=m1.gossip_alive)
    await leader.one_pass(led_for=config.leadership_grace)
    assert m1.gossip_alive == {"m1", "m2", WORKER[0]}


@pytest.mark.parametrize("gossip", ["wedged", "off"])
async def test_a_pass_without_gossip_judges_the_slow_beaters_patiently(
        tmp_path: Path, gossip: str) -> None:
    """The gossip thread did not answer this pass ("wedged"), or gossip is not running: its
    view is empty ("off": a running member list holds this node at least; it failed to
    bind). Every node is then judged by heartbeat age, and a node given the 10 s period (by
    this leader or the previous one) is not DOWN for being silent 5 s — only past
    node_down_timeout + the longer period."""
    net, _, _, stores = await _lab(tmp_path, leader="m1")
    m1 = net.managers["10.0.0.1:2377"]
    config = OrchestratorConfig()

    async def gossip_all() -> tuple[dict[str, str], dict[str, Any], dict[str, float]]:
        if gossip == "wedged":
            raise TimeoutError
        return {}, {}, {}
    leader = LeaderLoop(stores["m1"], m1.heartbeats, config, asyncio.Event(),
                        gossip_all=gossip_all, gossip_alive=m1.gossip_alive)
    now = time.monotonic()
    m1.heartbeats.update({nid: now for nid in MANAGERS})
    m1.heartbeats[WORKER[0]] = now - (config.node_down_timeout + 1)
    await leader.one_pass(led_for=config.leadership_grace)
    assert stores["m1"].snapshot().nodes[WORKER[0]].state is NodeState.READY
    m1.heartbeats[WORKER[0]] = now - (config.node_down_timeout +
                                      config.gossip_heartbeat_interval * 1.1 + 1)
    await leader.one_pass(led_for=config.leadership_grace)
    assert stores["m1"].snapshot().nodes[WORKER[0]].state is NodeState.DOWN


async def test_the_leaders_beat_to_itself_gets_the_period_a_remote_node_would(
        tmp_path: Path) -> None:
    net, _, _, _ = await _lab(tmp_path, leader="m1")
    m1 = net.managers["10.0.0.1:2377"]
    await m1.heartbeat_once()
    await m1.heartbeat_once()
    assert m1.heartbeat_period == 1.0  # gossip has not seen it (yet): the common period
    m1.gossip_alive.add("m1")
    _clear(net)
    before = time.monotonic()
    await m1.heartbeat_once()
    assert m1.heartbeat_period == 10.0 and m1.heartbeats["m1"] - before >= 10.0
    assert net.sent == []  # (still to no one else)


async def test_a_worker_being_promoted_does_not_beat_to_itself(tmp_path: Path) -> None:
    """Its record says manager before its identity does (the switch takes seconds): with no
    leader known it is among its own beat's targets. Recording its own beat raised
    NotManager and ended its heartbeat loop for good; now it skips itself."""
    net, worker, wstore, _stores = await _lab(tmp_path, leader="m1")
    await wstore.propose({"op": "node_update", "id": WORKER[0], "role": "manager", "now": 2.0})
    assert wstore.snapshot().nodes[WORKER[0]].role is NodeRole.MANAGER
    wstore.leader_at = None  # no leader known: every manager, itself included
    await worker.heartbeat_once()
    assert WORKER[0] not in worker.heartbeats
    assert sorted(net.sent) == sorted(f"{a}:2377" for a in MANAGERS.values())


async def test_the_leader_warns_once_when_the_managers_raft_timings_do_not_fit(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Managers announce their Raft timing in gossip (append-entries period, election
    timeout). A manager at --raft-multiplier 1 under a leader at 4 times out before the
    leader's next append-entries: it would call elections for ever. The leader says so, once
    per set of such managers, naming them and the flag."""
    from shoal.node.leader import RAFT_TIMING_META
    from shoal.raft.store import RaftConfig

    net, _, _, stores = await _lab(tmp_path, leader="m1")
    m1 = net.managers["10.0.0.1:2377"]
    mine, fast = RaftConfig().scaled(4), RaftConfig()
    metas: dict[str, dict[str, Any]] = {
        nid: {RAFT_TIMING_META: [mine.append_entries_period, mine.raft_min_timeout]}
        for nid in MANAGERS}

    async def gossip_all() -> tuple[dict[str, str], dict[str, Any], dict[str, float]]:
        return {nid: "alive" for nid in [*MANAGERS, WORKER[0]]}, metas, {}
    leader = LeaderLoop(stores["m1"], m1.heartbeats, OrchestratorConfig(), asyncio.Event(),
                        gossip_all=gossip_all, gossip_alive=m1.gossip_alive, raft=mine)
    caplog.set_level(logging.WARNING, logger="shoal.leader")
    await leader.one_pass()
    assert "Raft timing differs" not in caplog.text  # the same multiplier everywhere
    metas["m2"] = {RAFT_TIMING_META: [fast.append_entries_period, fast.raft_min_timeout]}
    await leader.one_pass()
    await leader.one_pass()
    warnings = [r.getMessage() for r in caplog.records if "Raft timing differs" in r.getMessage()]
    assert len(warnings) == 1 and "m2 (" in warnings[0] and "m3" not in warnings[0]
    assert "--raft-multiplier" in warnings[0]
    metas["m2"] = {RAFT_TIMING_META: "garbage"}  # a peer's bad metadata: ignored
    await leader.one_pass()
