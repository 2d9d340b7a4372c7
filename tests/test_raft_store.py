"""RaftStore over real pysyncobj on loopback: commits do not wait for pysyncobj's periods.

The Raft timings here are deliberately huge (1 s ticks, 1.3 s append-entries periods): with
pysyncobj's own batching every sequential write would wait for them, several seconds for
the chain below. The eager replication hook (shoal.raft.eager) must make each commit
follow its messages instead. The bounds asserted are many times the expected figure and
far below what batching alone could do, so load on the machine cannot flip them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import free_ports, until
from pysyncobj.monotonic import monotonic as pysyncobj_now
from pysyncobj.syncobj import _RAFT_STATE
from pysyncobj.transport import TCPTransport

from shoal.raft.eager import EagerReplication
from shoal.raft.leaderloss import LeaderLoss
from shoal.raft.models import Node, NodeRole, NodeState
from shoal.raft.store import RaftConfig, RaftStore
from shoal.raft.transport import AdmissionTransport

# (a wide election range: with ticks this long, candidacies are checked only once per tick,
# and a narrow range made split votes repeat for tens of seconds)
SLOW = RaftConfig(raft_min_timeout=4.0, raft_max_timeout=12.0, append_entries_period=1.3,
                  tick_period=1.0, leader_fallback_timeout=10.0, write_timeout=20.0)
# One voter cannot split a vote: a narrow election range only shortens the wait for its first
# election (4-12 s with SLOW's range); the ticks and periods stay SLOW's.
SINGLE = dataclasses.replace(SLOW, raft_max_timeout=4.5)
NODE = {"id": "n1", "hostname": "h1", "addr": "127.0.0.1", "api_port": 2377, "raft_port": 0,
        "role": "manager", "state": "ready"}


def _service(i: int) -> dict[str, Any]:
    return {"op": "service_create", "id": f"s{i}", "now": 1.0,
            "spec": {"name": f"svc{i}", "command": ["true"]}}


async def test_sequential_writes_do_not_wait_for_ticks_or_periods(tmp_path: Path) -> None:
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    stores = [RaftStore(a, addrs, tmp_path / f"n{i}", "secret", config=SLOW, persist=False)
              for i, a in enumerate(addrs)]
    try:
        await until(lambda: any(s.is_leader() for s in stores) and all(
            s.is_ready() for s in stores), 90.0)
        leader = next(s for s in stores if s.is_leader())
        follower = next(s for s in stores if not s.is_leader())
        # a chain of dependent writes alternating between the leader and a follower (the
        # follower forwards to the leader and learns of the commit from it)
        t0 = time.monotonic()
        for i in range(6):
            result = await (leader if i % 2 == 0 else follower).propose(_service(i))
            assert "ok" in result
        chain = time.monotonic() - t0
        # with batching alone: >= one tick or period per write, ~6 s or more
        assert chain < 3.0, f"6 sequential commits took {chain:.2f}s"
        # every replica applies the last write without waiting for a heartbeat period
        await until(lambda: all(len(s.snapshot().services) == 6 for s in stores), 1.0)
        assert sum(s._eager.eager_sends for s in stores) > 0
    finally:
        for s in stores:
            s.close()


async def test_single_node_commits_without_waiting_for_a_tick(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    store = RaftStore(addr, [addr], tmp_path, "secret", config=SINGLE, persist=False)
    try:
        await until(store.is_leader, 60.0)
        t0 = time.monotonic()
        for i in range(5):
            assert "ok" in await store.propose(_service(i))
        assert time.monotonic() - t0 < 2.0  # batching alone: one 1 s tick per write
    finally:
        store.close()


async def test_listeners_read_the_command_just_applied_without_decoding_it_again(
        tmp_path: Path) -> None:
    """``command_at(index)`` in an apply listener is the decoded command the state machine
    applied (the event log derives its events from it; decoding a 1,000-task batch a second
    time cost a leader ~10 % of its CPU during a scale); any older index is None."""
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    store = RaftStore(addr, [addr], tmp_path, "secret", config=SINGLE, persist=False)
    seen: list[tuple[int, Any]] = []
    store.add_listener(lambda index: seen.append((index, store.command_at(index))))
    try:
        await until(store.is_leader, 60.0)
        assert "ok" in await store.propose(_service(1))
        index, cmd = seen[-1]
        assert cmd["op"] == "service_create" and cmd["id"] == "s1"
        assert store.command_at(index) is cmd and store.command_at(index - 1) is None
    finally:
        store.close()


class _OtherVersion:
    """A SyncObj without the private state the hook reads (another pysyncobj version)."""

    def __init__(self) -> None:
        self.callbacks: list[Any] = []
        self._poller = None

    def addOnTickCallback(self, cb: Any) -> None:
        self.callbacks.append(cb)


def test_hook_turns_itself_off_on_an_unknown_pysyncobj(caplog: pytest.LogCaptureFixture) -> None:
    sync = _OtherVersion()
    hook = EagerReplication(sync)
    try:
        with caplog.at_level(logging.WARNING, logger="shoal.raft"):
            sync.callbacks[0]()  # the tick thread would call this
            sync.callbacks[0]()
        assert [r.message for r in caplog.records].count(
            next(r.message for r in caplog.records if "pysyncobj internals" in r.message)) == 1
        hook.wake()  # still harmless
    finally:
        hook.close()


async def test_an_idle_tick_thread_sleeps_until_its_next_raft_timer(tmp_path: Path) -> None:
    """Idle cost (raft/eager.py ``idle_wait``): the tick thread's poll waits until the
    leader's next append-entries round / a follower's election deadline or the journal's
    one-second timer, at most the configured cap — never pysyncobj's fixed short period,
    and never past a timer that is due."""
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    stores = [RaftStore(a, addrs, tmp_path / f"n{i}", "secret", config=SLOW, persist=False)
              for i, a in enumerate(addrs)]
    try:
        await until(lambda: any(s.is_leader() for s in stores) and all(
            s.is_ready() for s in stores), 90.0)
        leader = next(s for s in stores if s.is_leader())
        follower = next(s for s in stores if not s.is_leader())
        lead_wait = leader._eager.idle_wait(60.0)
        assert 0.0 < lead_wait <= SLOW.append_entries_period
        follow_wait = follower._eager.idle_wait(60.0)
        assert 0.0 < follow_wait <= 1.0  # the one-second timer comes before its deadline
        assert leader._eager.idle_wait(0.001) <= 0.001  # the cap holds
        # a write still commits at once: the propose wakes the sleeping thread
        assert "ok" in await follower.propose(_service(0))
    finally:
        for s in stores:
            s.close()


def test_idle_wait_is_the_cap_on_an_unknown_pysyncobj(caplog: pytest.LogCaptureFixture) -> None:
    sync = _OtherVersion()
    hook = EagerReplication(sync)
    try:
        with caplog.at_level(logging.WARNING, logger="shoal.raft"):
            assert hook.idle_wait(0.02) == 0.02
            assert hook.idle_wait(0.02) == 0.02
        assert sum("polls every" in r.message for r in caplog.records) == 1
    finally:
        hook.close()


def test_the_raft_multiplier_stretches_the_timeouts_and_the_period_alone() -> None:
    base = RaftConfig()
    two = base.scaled(2)
    assert (two.raft_min_timeout, two.raft_max_timeout, two.append_entries_period,
            two.leader_fallback_timeout) == (2 * base.raft_min_timeout,
                                            2 * base.raft_max_timeout,
                                            2 * base.append_entries_period,
                                            2 * base.leader_fallback_timeout)
    assert (two.tick_period, two.write_timeout, two.connection_retry_time) == \
        (base.tick_period, base.write_timeout, base.connection_retry_time)
    two.validate()
    assert base.scaled(1) == base
    for bad in (0.5, 10.5, float("nan")):
        with pytest.raises(ValueError, match="raft multiplier must be between 1 and 10"):
            base.scaled(bad)


# Long election timeouts, so that only the closed connection can explain a quick election.
LOSS = RaftConfig(raft_min_timeout=4.0, raft_max_timeout=6.0, append_entries_period=0.3,
                  tick_period=0.25, leader_fallback_timeout=10.0, leader_lost_wait=0.5)


async def _leader_closed(tmp_path: Path, config: RaftConfig
                         ) -> tuple[list[RaftStore], float | None]:
    """Three stores; close the leader (its sockets close, as its process dying closes
    them) and return the survivors and how long until one of them leads (None: not
    within 2.5 s)."""
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    stores = [RaftStore(a, addrs, tmp_path / f"n{i}", "secret", config=config, persist=False)
              for i, a in enumerate(addrs)]
    await until(lambda: any(s.is_leader() for s in stores) and all(
        s.is_ready() for s in stores), 90.0)
    leader = next(s for s in stores if s.is_leader())
    survivors = [s for s in stores if s is not leader]
    # the two survivors draw the two ends of the range: they never stand together (a split
    # vote would fall back to the 4-6 s election timeout; in production the draw is random)
    for store, draw in zip(survivors, (0.0, 1.0), strict=True):
        store._leader_loss._rand = lambda draw=draw: draw
    leader.close()
    t0 = time.monotonic()
    deadline = t0 + 2.5
    while time.monotonic() < deadline:
        if any(s.is_leader() for s in survivors):
            return survivors, time.monotonic() - t0
        await asyncio.sleep(0.02)
    return survivors, None


async def test_a_follower_that_loses_its_leaders_connection_stands_before_its_timeout(
        tmp_path: Path) -> None:
    """A leader whose process dies closes its connections: the followers stand after
    ``leader_lost_wait`` (0.1-0.5 s here), not after their 4-6 s election timeout
    (shoal.raft.leaderloss), and the new leader takes writes."""
    survivors, took = await _leader_closed(tmp_path, LOSS)
    try:
        assert took is not None, "no new leader 2.5 s after the leader's connections closed"
        assert sum(s._leader_loss.hastened for s in survivors) == 2
        new = next(s for s in survivors if s.is_leader())
        assert "ok" in await new.propose(_service(1))
    finally:
        for s in survivors:
            s.close()


async def test_without_leader_lost_wait_only_the_election_timeout_elects(
        tmp_path: Path) -> None:
    """The control: leader_lost_wait 0 leaves the followers waiting for their election
    timeout (>= 4 s here), so the quick election above is the closed connection's doing."""
    survivors, took = await _leader_closed(
        tmp_path, dataclasses.replace(LOSS, leader_lost_wait=0.0))
    try:
        assert took is None
        assert sum(s._leader_loss.hastened for s in survivors) == 0
    finally:
        for s in survivors:
            s.close()


class _Follower:
    """The pysyncobj state LeaderLoss reads, as a follower of ``leader``."""

    def __init__(self, leader: str, state: int = _RAFT_STATE.FOLLOWER,
                 deadline: float = 1e12) -> None:
        self._SyncObj__raftState = state
        self._SyncObj__selfNode = "me"
        self._SyncObj__raftLeader = leader
        self._SyncObj__raftElectionDeadline = deadline


def test_leader_loss_acts_only_on_a_followers_connection_to_its_leader(
        caplog: pytest.LogCaptureFixture) -> None:
    loss = LeaderLoss(0.25, rand=lambda: 0.5)
    loss.on_disconnected("a")  # not attached yet: nothing to do
    sync = _Follower("a")
    loss.attach(sync)
    loss.on_disconnected("b")  # another follower's connection
    assert sync._SyncObj__raftElectionDeadline == 1e12
    loss.on_disconnected("a")
    assert sync._SyncObj__raftElectionDeadline - pysyncobj_now() == pytest.approx(0.15, abs=0.05)
    for other in (_Follower("a", state=_RAFT_STATE.LEADER), _Follower("a", deadline=0.0)):
        loss.attach(other)  # a leader does not stand; a deadline already sooner stays
        loss.on_disconnected("a")
        assert other._SyncObj__raftElectionDeadline in (1e12, 0.0)
    assert loss.hastened == 1
    loss.attach(object())  # another pysyncobj version: off, with one warning
    with caplog.at_level(logging.WARNING, logger="shoal.raft"):
        loss.on_disconnected("a")
        loss.on_disconnected("a")
    assert sum("pysyncobj internals" in r.message for r in caplog.records) == 1
    assert loss.wait == 0.0


def test_leader_lost_wait_must_fit_under_the_election_timeout() -> None:
    for bad in (-0.1, 0.65):
        with pytest.raises(ValueError, match="leader_lost_wait"):
            dataclasses.replace(RaftConfig(), leader_lost_wait=bad).validate()
    assert RaftConfig().scaled(2).leader_lost_wait == RaftConfig().leader_lost_wait


def test_the_agent_flag_takes_a_multiplier_from_1_to_10(
        capsys: pytest.CaptureFixture[str]) -> None:
    from shoal.cli.main import build_parser
    parser = build_parser()
    args = parser.parse_args(["agent", "--advertise-addr", "10.0.0.1", "--raft-multiplier",
                              "2.5"])
    assert args.raft_multiplier == 2.5
    assert parser.parse_args(["agent", "--advertise-addr", "10.0.0.1"]).raft_multiplier == 1.0
    for bad in ("0", "11", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["agent", "--advertise-addr", "10.0.0.1", "--raft-multiplier",
                               bad])
        assert "--raft-multiplier: a number from 1 to 10" in capsys.readouterr().err


def test_raft_connections_are_admitted_from_managers_and_from_its_own_peers(
        tmp_path: Path) -> None:
    """A manager restarted from an older dump learns a later promotion from its saved peer
    list before its replica applies it: that peer's connections are admitted at once (the
    promoted node may be the leader it must catch up from); other addresses are refused
    once the state names its managers, and a voter it does not know of only from a node of
    the cluster."""
    port, peer_port = free_ports(2)
    store = RaftStore(f"127.0.0.1:{port}", [f"127.0.0.1:{port}", f"127.0.0.7:{peer_port}"],
                      tmp_path / "n", "secret", config=RaftConfig(), persist=False)
    try:
        assert store._admit("10.0.0.9")  # no nodes yet: bootstrap
        store.consumer.state.nodes["m1"] = Node(
            id="m1", hostname="h1", addr="10.0.0.1", api_port=2377, raft_port=2378,
            role=NodeRole.MANAGER, state=NodeState.READY)
        store.consumer.state.nodes["w2"] = Node(
            id="w2", hostname="h2", addr="10.0.0.2", api_port=2377, raft_port=2378,
            role=NodeRole.WORKER, state=NodeState.READY)
        assert store._admit("10.0.0.1")  # a manager in the state
        assert store._admit("127.0.0.7")  # a Raft peer the state does not know of yet
        assert not store._admit("10.0.0.2")  # a worker
        assert not store._admit("10.0.0.9")  # a stranger
        # a connection claiming to be a voter this replica does not know of (promoted while
        # it was down): any node of the state, as a read-only link (shoal.raft.transport)
        assert store._admit_member("10.0.0.2") and store._admit_member("10.0.0.1")
        assert not store._admit_member("10.0.0.9")
    finally:
        store.close()


def test_a_stranger_is_never_sent_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only link kept for a voter this replica does not know of (shoal.raft.transport,
    "Strangers") gets answers but never a leader's append-entries, were this replica to
    lead: its address only has to be a worker's."""
    sent: list[Any] = []
    monkeypatch.setattr(TCPTransport, "send", lambda _s, n, m: sent.append((n, m)) or True)

    class Recording(AdmissionTransport):
        def __init__(self) -> None:  # (no SyncObj: only send() is under test)
            self._link_up, self._strangers = None, {"ro-0": "10.0.0.2:2378"}

    t = Recording()
    assert not t.send("ro-0", {"type": "append_entries", "term": 3})
    assert t.send("ro-0", {"type": "next_node_idx", "term": 3})
    assert t.send("voter", {"type": "append_entries", "term": 3})
    assert [n for n, _m in sent] == ["ro-0", "voter"]
