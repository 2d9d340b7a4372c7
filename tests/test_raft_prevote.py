"""Pre-vote (shoal.raft.prevote): a manager that alone lost the leader does not depose it.

Three real RaftStores on loopback. The link between the leader and one follower is cut
(``AdmissionTransport(link_up=...)`` drops every Raft message between those two only); the
other follower still hears the leader. The cut-off follower's election deadline passes over
and over. With pre-vote it asks, is refused (the other follower has a leader, the leader
never grants), and the term and leader stay as they were; writes go on through the
majority that still has its links. The control, pre-vote off, is pysyncobj's own: the
follower raises its term, the other follower takes it, and the leader is deposed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import raft_trio, until
from pysyncobj.monotonic import monotonic as pysyncobj_now
from pysyncobj.syncobj import _RAFT_STATE

from shoal.raft.errors import StoreError
from shoal.raft.prevote import PreVote
from shoal.raft.store import RaftConfig

# short timeouts so the cut-off follower's deadline passes several times in the window
CONFIG = RaftConfig(raft_min_timeout=0.65, raft_max_timeout=1.0, append_entries_period=0.2,
                    leader_lost_wait=0.0, leader_fallback_timeout=5.0, pre_vote=True)
WINDOW = 4.0  # seconds of cut link: >= 4 of the follower's election timeouts


def _service(name: str) -> dict[str, Any]:
    return {"op": "service_create", "id": name, "now": 1.0,
            "spec": {"name": name, "command": ["true"]}}


async def _cut_one_link(tmp_path: Path, config: RaftConfig) -> dict[str, Any]:
    cut: set[tuple[str, str]] = set()  # (at, peer): ``at`` neither hears nor talks to ``peer``
    stores = await raft_trio(tmp_path, config, cut)
    try:
        leader = next(s for s in stores if s.is_leader())
        lonely, other = [s for s in stores if s is not leader]
        term = leader.term()
        before = (lonely._pre_vote.asked, lonely._pre_vote.won,
                  other._pre_vote.refused + leader._pre_vote.refused)  # (the first election's)
        cut.update({(leader.self_addr, lonely.self_addr), (lonely.self_addr, leader.self_addr)})
        t0 = time.monotonic()
        writes = 0
        while time.monotonic() - t0 < WINDOW:
            if leader.is_leader():
                with contextlib.suppress(StoreError):  # (the control: a deposed leader
                    if "ok" in await leader.propose(_service(f"w{writes}")):  # refuses)
                        writes += 1
            await asyncio.sleep(0.1)
        return {"term_before": term, "terms": [s.term() for s in stores],
                "still_leader": leader.is_leader(), "writes": writes,
                "asked": lonely._pre_vote.asked - before[0],
                "won": lonely._pre_vote.won - before[1],
                "refused": other._pre_vote.refused + leader._pre_vote.refused - before[2]}
    finally:
        for s in stores:
            s.close()


async def test_a_follower_cut_off_from_the_leader_alone_does_not_depose_it(
        tmp_path: Path) -> None:
    got = await _cut_one_link(tmp_path, CONFIG)
    assert got["asked"] >= 2, got  # its deadline passed; it asked instead of standing
    assert got["won"] == 0 and got["refused"] >= got["asked"], got
    assert got["still_leader"], got
    assert got["terms"] == [got["term_before"]] * 3, got
    assert got["writes"] >= 10, got  # the majority with its links kept committing


async def test_without_pre_vote_that_follower_deposes_the_leader(tmp_path: Path) -> None:
    """The control: pysyncobj's own elections; the same cut raises the term."""
    got = await _cut_one_link(tmp_path, dataclasses.replace(CONFIG, pre_vote=False))
    assert got["asked"] == 0
    assert max(got["terms"]) > got["term_before"], got


async def test_a_dead_leader_is_still_replaced_at_once(tmp_path: Path) -> None:
    """A closed leader connection ends the lease: the survivors grant each other's
    pre-votes, and leader_lost_wait's quick election still happens (shoal.raft.leaderloss)."""
    config = RaftConfig(raft_min_timeout=4.0, raft_max_timeout=6.0,
                        append_entries_period=0.3, leader_lost_wait=0.5,
                        leader_fallback_timeout=10.0, pre_vote=True)
    stores = await raft_trio(tmp_path, config, timeout=90.0)
    leader = next(s for s in stores if s.is_leader())
    try:
        survivors = [s for s in stores if s is not leader]
        for store, draw in zip(survivors, (0.0, 1.0), strict=True):
            store._leader_loss._rand = lambda draw=draw: draw  # never stand together
        leader.close()
        await until(lambda: any(s.is_leader() for s in survivors), 2.5,
                    "a new leader well within the 4-6 s election timeout")
        assert sum(s._pre_vote.won for s in survivors) >= 1
        new = next(s for s in survivors if s.is_leader())
        assert "ok" in await new.propose(_service("after"))
    finally:
        for s in stores:
            if s is not leader:  # (closed above)
                s.close()


# ---------------------------------------------------------------------- the logic, on a stub
class _Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, dict[str, Any]]] = []

    def send(self, node: Any, message: dict[str, Any]) -> bool:
        self.sent.append((node, message))
        return True


class _Sync:
    """The pysyncobj state PreVote reads: a follower of ``leader`` at ``term``, log (5, 10)."""

    def __init__(self, leader: Any = "L", term: int = 3, others: tuple[str, ...] = ("L", "B"),
                 state: int = _RAFT_STATE.FOLLOWER) -> None:
        self._SyncObj__raftState = state
        self._SyncObj__selfNode = "me"
        self._SyncObj__raftLeader = leader
        self._SyncObj__raftCurrentTerm = term
        self._SyncObj__raftElectionDeadline = 0.0  # passed
        self._SyncObj__transferInProgress = False
        self._SyncObj__otherNodes = set(others)
        self._SyncObj__transport = _Transport()

    def _SyncObj__connectedToAnyone(self) -> bool:
        return True

    def _SyncObj__generateRaftTimeout(self) -> float:
        return 0.8

    def _SyncObj__getCurrentLogIndex(self) -> int:
        return 10

    def _SyncObj__getCurrentLogTerm(self) -> int:
        return 3


def _request(term: int = 4, index: int = 10, log_term: int = 3) -> dict[str, Any]:
    return {"type": "pre_vote", "term": term, "last_log_index": index, "last_log_term": log_term}


def test_a_candidate_asks_and_stands_only_with_a_majority() -> None:
    pv, s = PreVote(0.45), _Sync(leader=None)
    pv.attach(s)
    pv.before_tick()
    sent = s._SyncObj__transport.sent
    assert {n for n, _ in sent} == {"L", "B"}
    assert all(m == {"type": "pre_vote", "term": 4, "last_log_index": 10, "last_log_term": 3}
               for _, m in sent)
    assert s._SyncObj__raftElectionDeadline - pysyncobj_now() == pytest.approx(0.8, abs=0.1)
    pv.before_tick()  # deadline not passed: nothing more
    assert len(sent) == 2
    assert pv.on_message("B", {"type": "pre_vote_response", "term": 3, "granted": True})
    assert pv.on_message("B", {"type": "pre_vote_response", "term": 4, "granted": False})
    # a grant from a node that is no voter here (a stranger's link: shoal.raft.transport)
    assert pv.on_message("X", {"type": "pre_vote_response", "term": 4, "granted": True})
    assert s._SyncObj__raftElectionDeadline > 0 and pv.won == 0  # not those
    assert pv.on_message("B", {"type": "pre_vote_response", "term": 4, "granted": True})
    assert pv.won == 1 and s._SyncObj__raftElectionDeadline == 0.0  # 2 of 3: stand now
    pv.before_tick()  # the tick in which pysyncobj stands: no new round, deadline left passed
    assert len(sent) == 2 and s._SyncObj__raftElectionDeadline == 0.0
    # won, but a leader's append-entries came first: the grant is void, the next round asks
    assert pv.on_message("B", {"type": "pre_vote_response", "term": 4, "granted": True}) \
        is True  # (no campaign now: ignored)
    pv._won = 4
    assert not pv.on_message("L", {"type": "append_entries", "term": 3})
    pv.before_tick()
    assert len(sent) == 4 and pv.won == 1


def test_what_a_manager_grants() -> None:
    pv, s = PreVote(0.45), _Sync(leader=None)
    pv.attach(s)

    def answer(message: dict[str, Any], node: str = "C") -> bool:
        assert pv.on_message(node, message)
        got_node, got = s._SyncObj__transport.sent.pop()
        assert got_node == node and got["type"] == "pre_vote_response"
        assert got["term"] == message["term"]
        return bool(got["granted"])

    assert answer(_request())  # no leader, an up-to-date log, a newer term
    assert answer(_request(index=11)) and answer(_request(index=1, log_term=4))
    assert not answer(_request(term=3))  # not a newer term
    assert not answer(_request(index=9))  # a shorter log of the same term
    assert not answer(_request(index=99, log_term=2))  # an older last term
    assert not answer({"type": "pre_vote", "term": 4})  # malformed: refused, answered
    assert not answer(_request(index=True))  # type: ignore[arg-type]
    # a leader it heard lately: refused; once the lease ran out, or its connection closed, or
    # the follower stands itself (no leader): granted
    s._SyncObj__raftLeader = "L"
    assert not pv.on_message("L", {"type": "append_entries", "term": 3})  # pysyncobj's
    assert not answer(_request())
    pv.lease = 0.0
    assert answer(_request())
    pv.lease = 0.45
    assert not answer(_request())
    pv.on_disconnected("B")
    assert not answer(_request())
    pv.on_disconnected("L")
    assert answer(_request())
    # the leader never grants
    s._SyncObj__raftState = _RAFT_STATE.LEADER
    assert not answer(_request(term=9))
    assert pv.granted == 5 and pv.refused == 9


def test_a_transfer_a_leader_and_a_lone_node_stand_without_asking() -> None:
    pv, s = PreVote(0.45), _Sync()
    pv.attach(s)
    s._SyncObj__transferInProgress = True  # the leader handed over: pysyncobj stands
    pv.before_tick()
    assert s._SyncObj__transport.sent == [] and s._SyncObj__raftElectionDeadline == 0.0
    s._SyncObj__transferInProgress, s._SyncObj__raftState = False, _RAFT_STATE.LEADER
    pv.before_tick()
    assert s._SyncObj__transport.sent == []
    lone = _Sync(leader=None, others=())
    pv.attach(lone)
    pv.before_tick()  # its own grant is a majority of one: stands in this tick
    assert pv.won == 1 and lone._SyncObj__raftElectionDeadline == 0.0


def test_off_by_config_it_stands_as_pysyncobj_does_and_still_answers() -> None:
    pv, s = PreVote(0.45, enabled=False), _Sync()
    pv.attach(s)
    pv.before_tick()
    assert s._SyncObj__transport.sent == [] and s._SyncObj__raftElectionDeadline == 0.0
    assert pv.on_message("L", {"type": "append_entries", "term": 3}) is False
    assert pv.on_message("B", _request())  # a peer with pre-vote on is not held up
    assert s._SyncObj__transport.sent[-1][1]["granted"] is True


def test_an_unknown_pysyncobj_turns_it_off_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    pv = PreVote(0.45)
    pv.attach(object())
    with caplog.at_level(logging.WARNING, logger="shoal.raft"):
        pv.before_tick()
        pv.before_tick()
        pv.on_disconnected("L")
    assert sum("pysyncobj internals" in r.message for r in caplog.records) == 1
    assert not pv.enabled
