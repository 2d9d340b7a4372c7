"""pysyncobj weak point: an exception raised inside a replicated apply wedges every replica
(the entry is re-applied on every tick forever and no later write commits). shoal's state
machine must never raise; the fault suite's fuzzing of ClusterState.apply found commands
that did (a leader batch with an empty op, a term of infinity). Real pysyncobj, 3 voters."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgpack
import pytest
from helpers import free_ports, until

from shoal.raft.state import ClusterState
from shoal.raft.store import RaftConfig, RaftStore

# commands that made ClusterState.apply raise (IndexError, OverflowError)
POISON = [{"op": "leader", "term": 0, "now": 1.0, "ops": [[]]},
          {"op": "leader", "term": float("inf"), "ops": []}]


@pytest.mark.parametrize("cmd", POISON)
def test_the_state_machine_records_a_malformed_leader_batch_instead_of_raising(
        cmd: dict[str, Any]) -> None:
    state = ClusterState()
    result = state.apply(cmd)
    assert result["error"]["code"] == "invalid" and state.index == 1


async def test_a_poisoned_entry_does_not_wedge_the_replicas(tmp_path: Path) -> None:
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    stores = [RaftStore(a, addrs, tmp_path / f"n{i}", "secret", persist=False,
                        config=RaftConfig(write_timeout=10.0)) for i, a in enumerate(addrs)]
    try:
        leader = await until(lambda: next((s for s in stores if s.is_leader() and all(
            x.is_ready() for x in stores)), None), 60.0, "a leader, every replica ready")
        loop = asyncio.get_running_loop()
        for cmd in POISON:  # straight into the log, as a buggy or hostile proposer would
            done: asyncio.Future[int] = loop.create_future()
            leader.consumer.apply(msgpack.packb(cmd), callback=lambda _r, err, f=done: (
                loop.call_soon_threadsafe(f.set_result, err)))
            assert await asyncio.wait_for(done, 10.0) == 0
        await leader.propose({"op": "service_create", "id": "s1", "now": 1.0,
                              "spec": {"name": "after", "command": ["true"]}})
        await until(lambda: all("s1" in s.snapshot().services for s in stores), 10.0,
                    "every replica applies the write after the poisoned entries")
    finally:
        for s in stores:
            s.close()
