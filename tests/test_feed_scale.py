"""The manager side of the workers' state feed at scale (node/feed.py FeedServer, served by
the real dispatcher, node/control/dispatcher.py): 20 workers' StateFeeds in one process on a
MemoryStore, no network. Checks what a 100-node cluster relies on: replies shared between
workers at the same index, large replies compressed (and still applied exactly), a join
storm's whole-state catch-ups built once, one at a time.
"""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
from feedrig import ADDR, feed_worker

from shoal.node.config import AgentConfig, NodeIdentity
from shoal.node.context import NodeContext
from shoal.node.control.dispatcher import Dispatcher
from shoal.node.errors import FeedError
from shoal.node.events import EventLog
from shoal.node.feed import FeedConfig, FeedServer, StateFeed, _inflate
from shoal.node.leader import LeaderLoop
from shoal.node.metrics import Metrics, Sources
from shoal.node.orchestrator import OrchestratorConfig
from shoal.node.security import Security
from shoal.node.source import MemoryStore
from shoal.raft.models import Node, NodeRole, NodeState, to_dict
from shoal.raft.schema import SCHEMA
from shoal.raft.wire import state_from_bytes
from shoal.runtime.testing import FakeController

WORKERS = 20


class CountingStore(MemoryStore):
    """A MemoryStore that counts (and can hold) whole-state builds."""

    def __init__(self) -> None:
        super().__init__(self_addr=f"{ADDR}:2378")
        self.full_builds = 0
        self.building = 0
        self.most_building = 0
        self.gate: threading.Event | None = None
        self._lock = threading.Lock()

    def full_state(self) -> tuple[int, bytes]:
        with self._lock:
            self.full_builds += 1
            self.building += 1
            self.most_building = max(self.most_building, self.building)
        try:
            if self.gate is not None:
                self.gate.wait(10)
            return super().full_state()
        finally:
            with self._lock:
                self.building -= 1


async def _manager(tmp_path: Path, store: MemoryStore, feed: FeedConfig) -> Dispatcher:
    ctx = NodeContext(AgentConfig(data_dir=tmp_path, advertise_addr=ADDR, feed=feed), "h1")
    ctx.use(NodeIdentity(node_id="n1", cluster_id="c1", role="manager", raft_password="",
                         voters=[f"{ADDR}:2378"]), store, store)
    await ctx.propose({"op": "cluster_init", "cluster_id": "c1", "now": 1.0,
                       "worker_secret": "", "manager_secret": "", "digest": "",
                       "schema": SCHEMA})
    await ctx.propose({"op": "node_add", "now": 1.0, "node": to_dict(Node(
        id="n1", hostname="h1", addr=ADDR, api_port=2377, raft_port=2378,
        role=NodeRole.MANAGER, memory_bytes=1 << 33, cpus=4.0))})
    for i in range(WORKERS):
        await ctx.propose({"op": "node_add", "now": 1.0, "node": to_dict(Node(
            id=f"w{i}", hostname=f"w{i}", addr=f"10.0.1.{i}", api_port=2377,
            raft_port=2378, role=NodeRole.WORKER))})
    dispatcher = Dispatcher(ctx, Security(ctx), lambda: None)
    store.add_listener(lambda _i: dispatcher.applied())
    return dispatcher


def _worker(dispatcher: Dispatcher, i: int, compress: bool = True) -> StateFeed:
    return feed_worker(dispatcher, f"w{i}", FeedConfig(wait=5.0, retry=0.01, compress=compress))


async def _until(cond: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def test_twenty_workers_share_replies_and_compressed_increments_apply_exactly(
        tmp_path: Path) -> None:
    """20 workers (half asking for compression, half not, like a mixed-version cluster)
    join at once and follow a burst of commits: every replica ends equal to the manager's
    state; the whole state was built once for the 20 joiners; increments were encoded far
    fewer times than sent; the big one went out compressed to those that asked."""
    store = CountingStore()
    dispatcher = await _manager(tmp_path, store, FeedConfig())
    feeds = [_worker(dispatcher, i, compress=i % 2 == 0) for i in range(WORKERS)]
    runs = [asyncio.create_task(f.run()) for f in feeds]
    try:
        await _until(lambda: all(f.is_ready() and f.index == store.index for f in feeds))
        assert store.full_builds == 1  # 20 catch-ups at one index: one build
        assert dispatcher.feed.stats.replies["state"] == WORKERS
        stats = dispatcher.feed.stats
        replies0, encodes0 = stats.replies["commands"], stats.encodes
        # a burst: 20 small commits, then one big one (a service with a long env: ~40 KiB)
        for i in range(20):
            await store.propose({"op": "node_update", "id": f"w{i}", "now": 2.0,
                                 "labels": {"k": str(i)}})
        await store.propose({"op": "service_create", "id": "s1", "now": 3.0, "spec": {
            "name": "web", "command": ["sleep", "9"], "replicas": 3,
            "env": {f"V{i}": "x" * 40 for i in range(800)}}})
        await _until(lambda: all(f.index == store.index for f in feeds))
        for f in feeds:
            assert f.snapshot() == store.snapshot()
        replies = stats.replies["commands"] - replies0
        encodes = stats.encodes - encodes0
        assert replies >= WORKERS  # every worker got the increments...
        assert encodes * 4 <= replies  # ...from a handful of shared encodings
        assert stats.compressed >= 1
        # what the scale lab reads: the counters on the manager's /metrics
        text = (await Metrics(Sources(
            store=lambda: store, runtime=FakeController(), gossip=lambda: None,
            balancer=lambda: None, events=EventLog(),
            feed=lambda: dispatcher.feed.stats)).render()).decode()
        assert f'shoal_feed_replies_total{{kind="state"}} {WORKERS}.0' in text
        assert f"shoal_feed_encodes_total {stats.encodes}.0" in text
    finally:
        for r in runs:
            r.cancel()
        await asyncio.gather(*runs, return_exceptions=True)


async def test_whole_state_catch_ups_wait_for_the_one_being_built(tmp_path: Path) -> None:
    """Ten whole-state polls at once (a join storm): one builds the state, the other nine
    wait for it (back-pressure) and then share it; none builds its own copy."""
    store = CountingStore()
    server = FeedServer(FeedConfig())
    await _manager(tmp_path, store, FeedConfig())
    store.gate = threading.Event()
    polls = [asyncio.create_task(server.reply(store, -1)) for _ in range(10)]
    await _until(lambda: store.building == 1 and server.stats.catchups_waiting == 9)
    store.gate.set()
    replies = await asyncio.gather(*polls)
    assert store.most_building == 1 and store.full_builds == 1
    assert server.stats.catchups_waiting == 0
    msg = msgpack.unpackb(replies[0], raw=False)
    assert state_from_bytes(msg["state"]) == store.state
    assert len(set(replies)) == 1


def test_a_compressed_reply_may_not_inflate_without_bound(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """A zlib bomb from a bad manager is a FeedError (the feed drops it and asks again)."""
    monkeypatch.setattr("shoal.node.feed.MAX_INFLATED", 1 << 16)
    with pytest.raises(FeedError, match="inflates beyond"):
        _inflate(zlib.compress(b"\0" * (1 << 20)))
    assert _inflate(zlib.compress(b"ok")) == b"ok"


async def test_a_garbled_compressed_reply_is_a_feed_error_not_a_crash() -> None:
    async def call_bytes(addr: str, path: str, body: dict[str, Any], timeout: float) -> bytes:
        return bytes(msgpack.packb({"z": b"not zlib"}, use_bin_type=True))

    async def call_json(addr: str, path: str, body: dict[str, Any], timeout: float
                        ) -> dict[str, Any]:
        raise AssertionError("no writes here")

    feed = StateFeed("w1", ["10.0.0.1:2377"], call_bytes, call_json,
                     FeedConfig(wait=0.05, retry=0.01))
    run = asyncio.create_task(feed.run())
    try:
        await _until(lambda: "10.0.0.1:2377" in feed.status()["errors"])
        assert "compressed" in feed.status()["errors"]["10.0.0.1:2377"]
        assert not feed.is_ready()
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


async def test_a_node_that_just_joined_is_not_taken_down_before_its_first_heartbeat(
        tmp_path: Path) -> None:
    """Join storm, leader side: a node added while the leader leads (no heartbeat yet, gossip
    has not heard of it) stays READY for node_down_timeout + join_grace from when the leader
    first saw it (it is still fetching the state and starting); without any heartbeat after
    that it goes DOWN."""
    store = MemoryStore(self_addr=f"{ADDR}:2378")
    await _manager(tmp_path, store, FeedConfig())
    heartbeats: dict[str, float] = {}
    config = OrchestratorConfig()
    leader = LeaderLoop(store, heartbeats, config, asyncio.Event())
    await leader.one_pass(led_for=3600.0)  # liveness judged: w0 was never heard from
    assert store.snapshot().nodes["w0"].state is NodeState.READY
    # node_down_timeout later: still starting, within the join grace
    heartbeats["w0"] -= config.node_down_timeout + 1
    await leader.one_pass(led_for=3600.0)
    assert store.snapshot().nodes["w0"].state is NodeState.READY
    # past the join grace too, still not a single heartbeat: a real failure
    heartbeats["w0"] -= config.join_grace
    await leader.one_pass(led_for=3600.0)
    assert store.snapshot().nodes["w0"].state is NodeState.DOWN
    assert store.snapshot().nodes["w1"].state is NodeState.READY


async def test_a_new_leader_gives_a_node_that_just_joined_the_join_grace(
        tmp_path: Path) -> None:
    """Join storm with a leader change: a node that joined moments before this manager took
    the lead, and has not reached it yet, gets the join grace like one that joins while it
    leads; a node that joined long ago and was never heard from does not."""
    store = MemoryStore(self_addr=f"{ADDR}:2378")
    await _manager(tmp_path, store, FeedConfig())  # w0.. joined long ago (now=1.0)
    await store.propose({"op": "node_add", "now": time.time(), "node": to_dict(Node(
        id="fresh", hostname="fresh", addr="10.0.2.1", api_port=2377, raft_port=2378,
        role=NodeRole.WORKER))})
    heartbeats: dict[str, float] = {f"w{i}": time.monotonic() for i in range(1, WORKERS)}
    config = OrchestratorConfig()
    leader = LeaderLoop(store, heartbeats, config, asyncio.Event())
    leader.hear_from_all(time.monotonic() - config.node_down_timeout - 1)  # led for a while
    await leader.one_pass(led_for=3600.0)
    nodes = store.snapshot().nodes
    assert nodes["fresh"].state is NodeState.READY  # still within the join grace
    assert nodes["w0"].state is NodeState.DOWN  # never heard from, and not new
    assert nodes["w1"].state is NodeState.READY


async def test_replies_cached_for_one_store_are_not_served_for_another(tmp_path: Path) -> None:
    """After the manager's store is replaced (it left and joined another cluster), the same
    (after, index) is another cluster's history: nothing cached from the old store is sent."""
    server = FeedServer(FeedConfig())
    a, b = MemoryStore(self_addr=f"{ADDR}:2378"), MemoryStore(self_addr=f"{ADDR}:2378")
    await _manager(tmp_path / "a", a, FeedConfig())
    await _manager(tmp_path / "b", b, FeedConfig())
    await a.propose({"op": "node_update", "id": "w1", "now": 2.0, "labels": {"c": "a"}})
    await b.propose({"op": "node_update", "id": "w1", "now": 2.0, "labels": {"c": "b"}})
    assert a.index == b.index
    for after in (-1, a.index - 1):
        got_a = msgpack.unpackb(await server.reply(a, after), raw=False)
        got_b = msgpack.unpackb(await server.reply(b, after), raw=False)
        assert got_a != got_b
    state_b = msgpack.unpackb(await server.reply(b, -1), raw=False)["state"]
    assert state_from_bytes(state_b).nodes["w1"].labels == {"c": "b"}
