"""The leader's pass (node/leader.py): a slow pass is logged with where its time went — the
gossip view, planning, proposing and waiting for the commits — once per SLOW_PASS_EVERY
seconds, naming the slowest since the last line.

A real LeaderLoop on a MemoryStore (node/source.py) whose commits are made slow by a delay
in ``propose``, and a gossip view that answers after a delay, as the agent's gossip thread
does under load.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest

from shoal.node import leader as leader_mod
from shoal.node.leader import LeaderLoop
from shoal.node.orchestrator import OrchestratorConfig
from shoal.node.source import MemoryStore

ADDR = "10.0.0.1"


class SlowStore(MemoryStore):
    """Commits that take ``delay`` seconds, as a loaded Raft group's."""

    def __init__(self, delay: float) -> None:
        super().__init__(self_addr=f"{ADDR}:2378")
        self.delay = delay

    async def propose(self, cmd: dict[str, Any], timeout: float | None = None
                      ) -> dict[str, Any]:
        if cmd.get("op") == "leader":
            await asyncio.sleep(self.delay)
        return await super().propose(cmd, timeout)


async def test_a_slow_pass_is_logged_with_its_parts_and_a_fast_one_is_not(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leader_mod, "SLOW_PASS", 0.1)
    store = SlowStore(delay=0.0)
    await store.propose({"op": "service_create", "id": "s1", "now": 3.0, "spec": {
        "name": "web", "command": ["sleep", "9"], "replicas": 3}})

    async def gossip_all() -> tuple[dict[str, str], dict[str, Any], dict[str, float]]:
        await asyncio.sleep(0.06)
        return {}, {}, {}

    loop = LeaderLoop(store, {}, OrchestratorConfig(), asyncio.Event(), gossip_all=gossip_all)
    caplog.set_level(logging.INFO, logger="shoal.leader")
    await loop.one_pass()  # (3 tasks created, committed at once: 60 ms in all)
    assert "slow leader pass" not in caplog.text
    store.delay = 0.2
    await store.propose({"op": "service_update", "id": "s1", "now": 4.0, "spec": {
        "name": "web", "command": ["sleep", "9"], "replicas": 5}})
    await loop.one_pass()
    (line,) = [r.getMessage() for r in caplog.records if "slow leader pass" in r.getMessage()]
    assert re.search(r"gossip view [6-9]\d ms, plan \d+ ms, 4 ops proposed and committed "
                     r"in [2-9]\d\d ms", line), line  # (2 new tasks: created and assigned)
    # within SLOW_PASS_EVERY: held back, the slowest of them named by the next line
    await store.propose({"op": "service_update", "id": "s1", "now": 5.0, "spec": {
        "name": "web", "command": ["sleep", "9"], "replicas": 6}})
    await loop.one_pass()
    assert sum("slow leader pass" in r.getMessage() for r in caplog.records) == 1
