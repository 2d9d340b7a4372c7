"""The worker's state feed (node/feed.py) and the state's wire form (raft/wire.py).

The managers here are in-process stand-ins that answer the feed's calls the way
the manager's dispatcher (node/control/dispatcher.py) does; the real one is exercised in
process by test_control_unit.py and over mTLS by the netns cluster tests (test_cluster.py,
test_security_cluster.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

import msgpack
import pytest

from shoal.node.errors import Forbidden, PeerError, Unavailable
from shoal.node.feed import FeedConfig, StateFeed
from shoal.raft.errors import CommandRejected, WireError, WriteTimeout
from shoal.raft.models import Node, NodeRole, to_dict
from shoal.raft.state import ClusterState
from shoal.raft.wire import state_from_bytes, state_to_bytes

FAST = FeedConfig(wait=0.05, retry=0.01, write_timeout=1.0)


def _node(i: int, role: NodeRole) -> dict[str, Any]:
    return to_dict(Node(id=f"n{i}", hostname=f"h{i}", addr=f"10.0.0.{i}", api_port=2377,
                        raft_port=2378, role=role))


def _commands() -> list[dict[str, Any]]:
    return [
        {"op": "cluster_init", "cluster_id": "c1", "now": 1.0},
        {"op": "node_add", "now": 1.0, "node": _node(1, NodeRole.MANAGER)},
        {"op": "node_add", "now": 1.0, "node": _node(2, NodeRole.MANAGER)},
        {"op": "node_add", "now": 1.0, "node": _node(3, NodeRole.WORKER)},
        {"op": "service_create", "id": "s1", "now": 2.0,
         "spec": {"name": "web", "command": ["sleep", "9"], "replicas": 2,
                  "env": {"A": "1"}, "mounts": [{"type": "tmpfs", "target": "/t"}],
                  "ports": [{"published": 8080, "target": 80}]}},
        {"op": "service_create", "id": "bad", "now": 2.0, "spec": {"name": "BAD NAME"}},
    ]


class Manager:
    """Applies commands like a manager's ReplicatedState and answers feed calls."""

    def __init__(self, keep: int = 1000) -> None:
        self.state = ClusterState()
        self.recent: list[tuple[int, bytes]] = []
        self.keep = keep
        self.down = False
        self.garbage: bytes | None = None
        self.reports: list[dict[str, Any]] = []
        self.drop_next = False  # lose the first command of the next reply

    def apply(self, cmd: dict[str, Any]) -> None:
        blob = msgpack.packb(cmd, use_bin_type=True)
        self.state.apply(cmd)
        self.recent = [*self.recent, (self.state.index, blob)][-self.keep:]

    async def call_bytes(self, path: str, body: dict[str, Any]) -> bytes:
        await asyncio.sleep(0.001)  # a network round trip
        if self.down:
            raise Unavailable("connection refused")
        if self.garbage is not None:
            return self.garbage
        assert path == "/v1/cluster/state"
        after = body["after"]
        msg: dict[str, Any] = {"index": self.state.index, "leader": "10.0.0.1:2378"}
        if after >= 0 and after >= self.state.index:
            await asyncio.sleep(body["wait"])  # nothing new: the poll is held open
            msg["commands"] = []
        elif after >= 0 and self.recent and self.recent[0][0] <= after + 1:
            msg["commands"] = [b for i, b in self.recent if i > after]
            if self.drop_next and len(msg["commands"]) > 1:
                self.drop_next = False
                msg["commands"] = msg["commands"][1:]
        else:
            msg["state"] = state_to_bytes(self.state)
        return bytes(msgpack.packb(msg, use_bin_type=True))

    async def call_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.down:
            raise Unavailable("connection refused")
        assert path == "/v1/cluster/report"
        cmd = body["cmd"]
        if cmd.get("node_id") != "n3":
            raise Forbidden("node n3 may only report its own tasks", "node_id")
        self.reports.append(cmd)
        return {"result": self.state.apply(cmd)}


def _feed(managers: dict[str, Manager]) -> StateFeed:
    def at(addr: str) -> Manager:
        if addr not in managers:
            raise Unavailable(f"cannot reach {addr}")
        return managers[addr]

    async def call_bytes(addr: str, path: str, body: dict[str, Any], _t: float) -> bytes:
        await asyncio.sleep(0.001)
        return await at(addr).call_bytes(path, body)

    async def call_json(addr: str, path: str, body: dict[str, Any], _t: float
                        ) -> dict[str, Any]:
        return await at(addr).call_json(path, body)

    return StateFeed("n3", sorted(managers), call_bytes, call_json, FAST)


async def _until(cond: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------ wire

def test_state_round_trips_through_the_wire_form() -> None:
    m = Manager()
    for cmd in _commands():
        m.apply(cmd)
    again = state_from_bytes(state_to_bytes(m.state))
    assert again == m.state and again.index == 6 and again.services["s1"].spec.task.container.mounts


@pytest.mark.parametrize("data", [
    b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"index": "x"}),
    msgpack.packb({"index": 1, "nodes": {"n1": {"id": "n1"}}}),
    msgpack.packb({"index": 1, "tasks": [1]}),
])
def test_malformed_state_bytes_are_a_wire_error(data: bytes) -> None:
    with pytest.raises(WireError):
        state_from_bytes(data)


# ------------------------------------------------------------------------------ feed

async def test_feed_catches_up_follows_and_fails_over() -> None:
    a, b = Manager(), Manager()
    for cmd in _commands():
        a.apply(cmd)
        b.apply(cmd)
    feed = _feed({"10.0.0.1:2377": a, "10.0.0.2:2377": b})
    seen: list[int] = []
    feed.add_listener(seen.append)
    runner = asyncio.create_task(feed.run())
    try:
        await _until(feed.is_ready)
        assert feed.snapshot().services["s1"].spec.name == "web"
        assert feed.index == a.state.index and seen[-1] == feed.index
        assert feed.leader_addr() == "10.0.0.1:2378"
        # the managers known from the state replace the seed list
        assert feed.managers()[0] == "10.0.0.1:2377"
        # new commands arrive one by one
        for m in (a, b):
            m.apply({"op": "node_update", "id": "n3", "now": 3.0, "labels": {"z": "1"}})
        await _until(lambda: feed.index == a.state.index)
        assert feed.snapshot().nodes["n3"].labels == {"z": "1"}
        # a goes down: b takes over from the same index
        a.down = True
        b.apply({"op": "service_remove", "id": "s1", "now": 4.0})
        await _until(lambda: "s1" not in feed.snapshot().services)
        assert feed.status()["feed_source"] == "10.0.0.2:2377"
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def test_feed_survives_garbage_and_resyncs_after_divergence() -> None:
    a = Manager(keep=3)
    for cmd in _commands():
        a.apply(cmd)
    feed = _feed({"10.0.0.1:2377": a})
    runner = asyncio.create_task(feed.run())
    try:
        await _until(feed.is_ready)
        for junk in (b"\x00\x01", msgpack.packb({"index": 1, "commands": "x"}),
                     msgpack.packb({"index": 9, "state": b"nonsense"})):
            a.garbage = junk
            await asyncio.sleep(0.1)
            assert "10.0.0.1:2377" in feed.status()["errors"]
        a.garbage = None
        # commands that do not lead to the manager's index (one lost on the way): the
        # replica is not trusted any more and starts over from the manager's whole state
        a.drop_next = True
        a.apply({"op": "node_update", "id": "n3", "now": 9.0, "labels": {"x": "y"}})
        a.apply({"op": "node_update", "id": "n2", "now": 9.0, "labels": {"k": "v"}})
        await _until(lambda: feed.is_ready() and feed.index == a.state.index)
        assert feed.snapshot() == a.state.snapshot()
        assert feed.status()["resyncs"] == 1
        # too far behind for the kept commands: the whole state
        for i in range(10):
            a.apply({"op": "node_update", "id": "n1", "now": 10.0 + i, "labels": {"i": str(i)}})
        await _until(lambda: feed.index == a.state.index)
        assert feed.snapshot().nodes["n1"].labels == {"i": "9"}
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def test_feed_writes_go_to_a_manager_and_refusals_are_rejections() -> None:
    a, b = Manager(), Manager()
    feed = _feed({"10.0.0.1:2377": a, "10.0.0.2:2377": b})
    a.down = True
    with pytest.raises(CommandRejected):  # the state machine's answer (unknown task)
        await feed.propose({"op": "task_status", "task_id": "t9", "node_id": "n3",
                            "now": 1.0, "status": {"state": "running"}})
    assert b.reports  # a was down: b took it
    # with this node's clock when it was sent to b, not when it was first made: a report
    # delayed by a manager that did not answer is not a clock that far off
    assert abs(b.reports[-1]["now"] - time.time()) < 5.0
    with pytest.raises(CommandRejected) as exc:  # the manager's refusal
        await feed.propose({"op": "task_status", "task_id": "t9", "node_id": "n2",
                            "now": 1.0, "status": {"state": "running"}})
    assert exc.value.field == "node_id"
    b.down = True
    with pytest.raises(WriteTimeout):
        await feed.propose({"op": "task_status", "task_id": "t9", "node_id": "n3",
                            "now": 1.0, "status": {"state": "running"}})


@pytest.mark.parametrize("suspected", ["source", "peer"])
async def test_a_cut_off_feed_drops_its_held_poll_and_follows_the_first_manager_it_reaches(
        suspected: str) -> None:
    """A worker whose link is cut: the reply to its held poll would only come with TCP's
    retransmissions. Once gossip suspects that manager, and it then accepts no connection,
    the feed drops that poll, sends no poll into the dead link but probes every manager,
    and follows the first that accepts a connection again: it gets the commands committed
    meanwhile at once. Another member's suspicion leaves the poll alone (on a loaded
    machine members are suspected all the time: dropping polls for them melted a
    100-worker lab down)."""
    managers = {"10.0.0.1:2377": Manager(), "10.0.0.2:2377": Manager()}
    for cmd in _commands():
        for m in managers.values():
            m.apply(cmd)
    cut: set[str] = set()
    polls_into_the_cut: list[str] = []
    never = asyncio.Event()

    async def call_bytes(addr: str, path: str, body: dict[str, Any], _t: float) -> bytes:
        if addr in cut:
            polls_into_the_cut.append(addr)
            await never.wait()  # a dead link: no answer
        return await managers[addr].call_bytes(path, body)

    async def call_json(addr: str, path: str, body: dict[str, Any], _t: float
                        ) -> dict[str, Any]:
        return await managers[addr].call_json(path, body)

    async def probe(addr: str, timeout: float) -> bool:
        if addr in cut:
            await asyncio.sleep(timeout)
            return False
        return True

    # held polls last 30 s (the default is 20): only the interrupt ends one early
    feed = StateFeed("n3", sorted(managers), call_bytes, call_json,
                     FeedConfig(wait=30.0, retry=0.01, probe_timeout=0.05), probe=probe)
    run = asyncio.create_task(feed.run())
    try:
        await _until(lambda: feed.is_ready() and feed.index == 6)
        await asyncio.sleep(0.05)  # its poll is held now
        source = feed.status()["feed_source"]
        cut.update(managers)
        polls_into_the_cut.clear()
        for m in managers.values():  # what the cluster decides while the worker is away
            m.apply({"op": "node_add", "now": 3.0, "node": _node(4, NodeRole.WORKER)})
        # gossip suspects that manager, or another member (a worker peer)
        feed.suspect(source.rpartition(":")[0] if suspected == "source" else "10.0.0.9")
        await asyncio.sleep(0.3)
        if suspected == "peer":  # not dropped: the poll is still held at its manager
            held = feed._inflight
            assert held is not None and held[0] == source and not held[1].done()
            return
        assert feed.index == 6 and polls_into_the_cut == []
        cut.discard("10.0.0.2:2377")  # the link to one manager is back
        await _until(lambda: feed.index == 7, timeout=2.0)
        assert feed.status()["feed_source"] == "10.0.0.2:2377"
        assert polls_into_the_cut == []
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run


async def test_a_cut_off_feed_checks_each_manager_less_often_while_it_stays_unreachable(
        ) -> None:
    """Cut off from every manager, the feed checks each one with a growing gap (up to
    probe_backoff_max), not every probe_timeout: 100 cut-off workers checking 5 stalled
    managers every 0.25 s kept their accept queues full. A manager that answers again is
    followed at once."""
    managers = {"10.0.0.1:2377": Manager(), "10.0.0.2:2377": Manager()}
    for cmd in _commands():
        for m in managers.values():
            m.apply(cmd)
    reachable = False
    checks: list[tuple[str, float]] = []

    async def call_bytes(addr: str, path: str, body: dict[str, Any], _t: float) -> bytes:
        if not reachable:
            raise PeerError(f"{addr}: connection timed out")
        return await managers[addr].call_bytes(path, body)

    async def call_json(addr: str, path: str, body: dict[str, Any], _t: float
                        ) -> dict[str, Any]:
        return await managers[addr].call_json(path, body)

    async def probe(addr: str, timeout: float) -> bool:
        checks.append((addr, time.monotonic()))
        if not reachable:
            await asyncio.sleep(timeout)
        return reachable

    feed = StateFeed("n3", sorted(managers), call_bytes, call_json,
                     FeedConfig(retry=0.01, probe_timeout=0.02, probe_backoff_max=0.2),
                     probe=probe)
    run = asyncio.create_task(feed.run())
    try:
        await asyncio.sleep(1.5)
        per_manager = collections.Counter(a for a, _ in checks)
        # without the back-off: one check every 0.02 s, ~70 per manager in 1.5 s; with it
        # 0.02, 0.04, 0.08, 0.16, then every 0.15-0.2 s: ~11
        assert all(3 <= n <= 16 for n in per_manager.values()), per_manager
        reachable = True
        await _until(lambda: feed.is_ready(), timeout=2.0)
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
