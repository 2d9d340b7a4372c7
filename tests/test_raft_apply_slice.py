"""Applying a burst of committed entries must not silence the leader (regression).

pysyncobj applies every committed entry in one go on its tick thread — the thread that also
sends the leader's append-entries and reads a follower's. A 10,000-task scale commits ~10 MiB
of leader batches together, ~0.7 s of decoding and applying on an idle core: longer than the
0.35 s election timeout of then, so the followers hear nothing and elect another leader (issue 16's
scale lab saw leader changes at 1,000 tasks under load). shoal applies them a slice at a time
(shoal.raft.store.APPLY_SLICE) and ticks again at once between slices.

Two tests: one tick of a single-node SyncObj ticked by hand, with entries whose apply takes
50 ms — sliced, one tick applies one and the next ticks the rest; unsliced (the control:
APPLY_SLICE beyond the burst) the tick applies them all. Then three real RaftStores on
loopback keep their leader and term through ~2 s of slow entries proposed together.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import free_ports, raft_trio, until
from pysyncobj import SyncObjConf, SyncObjConsumer, replicated

import shoal.raft.store as raft_store
from shoal.raft.state import ClusterState
from shoal.raft.store import RaftConfig

SLOW_APPLY = 0.05


class _Slow(SyncObjConsumer):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.applied = 0

    @replicated  # type: ignore[misc]
    def add(self) -> int:
        time.sleep(SLOW_APPLY)
        self.applied += 1
        return self.applied


@pytest.mark.parametrize("sliced", [True, False])
def test_one_tick_applies_one_slice_of_the_committed_entries(
        monkeypatch: pytest.MonkeyPatch, sliced: bool) -> None:
    if not sliced:
        monkeypatch.setattr(raft_store, "APPLY_SLICE", 60.0)
    (port,) = free_ports(1)
    slow = _Slow()
    conf = SyncObjConf(autoTick=False, raftMinTimeout=0.05, raftMaxTimeout=0.1,
                       appendEntriesPeriod=0.01,
                       appendEntriesUseBatch=True)
    sync = raft_store._SafeSyncObj(f"127.0.0.1:{port}", [], conf=conf, consumers=[slow])
    try:
        deadline = time.monotonic() + 10
        while not sync._isLeader():
            assert time.monotonic() < deadline, "a single node should elect itself"
            sync.doTick(0.01)
        me: Any = sync
        first = me._SyncObj__raftLastApplied
        for _ in range(8):
            slow.add(callback=lambda *_: None)  # queued
        sync.doTick(0.0)  # appends the eight (at the end of the tick)
        assert slow.applied == 0 and me._SyncObj__getCurrentLogIndex() == first + 8
        sync.doTick(0.0)  # commits the eight (alone: no one to wait for) and applies
        assert me._SyncObj__raftCommitIndex == first + 8
        if sliced:
            assert slow.applied == 1  # one 50 ms entry fills the 20 ms slice
            while slow.applied < 8:
                sync.doTick(0.0)
        else:
            assert slow.applied == 8  # pysyncobj's way: the tick is blocked for all of them
    finally:
        sync.destroy()


async def test_a_burst_of_slow_entries_is_applied_without_losing_the_leader(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apply = ClusterState.apply

    def slow(self: ClusterState, cmd: Any) -> dict[str, Any]:
        if isinstance(cmd, dict) and str(cmd.get("id", "")).startswith("slow-"):
            time.sleep(SLOW_APPLY)  # (the tick thread: as a large leader batch would)
        return apply(self, cmd)

    monkeypatch.setattr(ClusterState, "apply", slow)
    stores = await raft_trio(tmp_path, RaftConfig())
    writes = 40  # x SLOW_APPLY = 2 s, twice the 1 s longest election timeout
    try:
        leader = next(s for s in stores if s.is_leader())
        term = leader.term()
        await asyncio.gather(*(leader.propose(
            {"op": "service_create", "id": f"slow-{i}", "now": 1.0,
             "spec": {"name": f"slow-{i}", "command": ["true"]}}) for i in range(writes)))
        await until(lambda: all(len(s.snapshot().services) == writes for s in stores), 30.0,
                    "every write applied everywhere")
        await asyncio.sleep(1.0)  # (an election the burst caused would be over by now)
        assert {s.term() for s in stores} == {term} and leader.is_leader()
    finally:
        for s in stores:
            s.close()
