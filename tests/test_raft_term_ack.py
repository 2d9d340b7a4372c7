"""A deposed leader must not count a follower's answer from another term (regression).

The fault suite's long run (seed 42, docs/reliability.md) saw a manager acknowledge a
compare-and-set that never committed. pysyncobj's append-entries answer, ``next_node_idx``
("I hold the log up to N"), carries no term: a leader that receives one late, after the
follower moved on to another leader's log, counts it as a match for entries of its own
term and commits what no majority holds. shoal's followers add their term to the answer
(shoal.raft.store._SafeSyncObj) and the transport drops answers from another term
(shoal.raft.transport.AdmissionTransport).

The test makes the race deterministic: three real RaftStores on loopback; the followers
stop hearing from and talking to the leader (they elect a new one), so the old leader hears
nothing — except one delayed answer, handed to its transport on its own tick thread: "I hold
everything up to index + 10". With pysyncobj's term-less answer (the control) the old leader
commits a new write on that answer alone, held by no one else: an acknowledged write the
cluster loses. With the term the follower answered in, it is dropped and the write is not
acknowledged.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import raft_trio, until

from shoal.raft.errors import WriteTimeout
from shoal.raft.store import RaftConfig, RaftStore

# a deposed leader that keeps believing it leads (its fallback far beyond the test), and a
# short write deadline: the write below either commits at once or never
CONFIG = RaftConfig(leader_fallback_timeout=60.0, write_timeout=2.0)


def _service(name: str) -> dict[str, Any]:
    return {"op": "service_create", "id": name, "now": 1.0,
            "spec": {"name": name, "command": ["true"]}}


def _deliver_late(store: RaftStore, from_addr: str, message: dict[str, Any]) -> None:
    """Hand ``message`` to ``store``'s transport as if it arrived from ``from_addr`` now,
    on the store's tick thread (pysyncobj's state is only touched there)."""
    sync = store._sync
    node = next(n for n in sync._SyncObj__otherNodes if str(n.id) == from_addr)
    transport = sync._SyncObj__transport
    done = threading.Event()

    def once() -> None:
        if not done.is_set():
            done.set()
            transport._onMessageReceived(node, message)

    sync.addOnTickCallback(once)
    assert done.wait(5.0), "the tick thread did not run the delivery"


@pytest.mark.parametrize("answer", ["termless", "stale-term"])
async def test_a_late_answer_from_another_term_does_not_commit(tmp_path: Path,
                                                              answer: str) -> None:
    cut: set[tuple[str, str]] = set()  # (at, peer): ``at`` neither hears nor talks to ``peer``
    stores = await raft_trio(tmp_path, CONFIG, cut)
    try:
        old = next(s for s in stores if s.is_leader())
        followers = [s for s in stores if s is not old]
        assert "ok" in await old.propose(_service("before"))
        await until(lambda: all("before" in s.snapshot().services for s in stores), 10.0,
                    "the first write everywhere")
        old_term = old.term()
        # the followers stop hearing from and talking to the old leader; they elect anew
        for f in followers:
            cut.add((f.self_addr or "", old.self_addr or ""))
        await until(lambda: any(f.term() > old_term and f.is_leader() for f in followers),
                    30.0, "a new leader among the followers")
        assert old._sync._isLeader(), "the old leader should still believe it leads"
        assert old.term() == old_term

        # a delayed answer from a follower: "I hold everything up to index + 10"
        late: dict[str, Any] = {"type": "next_node_idx", "reset": False, "success": True,
                                "next_node_idx": old.index + 10}
        if answer == "stale-term":
            late["term"] = old_term - 1  # answered an append-entries of an earlier term
        _deliver_late(old, followers[0].self_addr or "", late)

        if answer == "termless":
            # pysyncobj's own answer: the old leader counts it and acknowledges a write only
            # it holds — the hazard the term closes (shows this test can see it)
            assert "ok" in await old.propose(_service("lost"))
            assert not any("lost" in f.snapshot().services for f in followers)
        else:
            with pytest.raises(WriteTimeout):
                await old.propose(_service("lost"))
            assert "lost" not in old.snapshot().services
    finally:
        for s in stores:
            s.close()
