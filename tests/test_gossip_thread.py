"""The agent's loop never blocks on the gossip thread for the leader's reads.

The leader reads gossip (member states, metadata, planned restarts) every pass. That read used
to wait for the gossip thread synchronously, on the agent's event loop: in a 100-worker lab
under load the gossip thread was busy with packets for seconds, and the leader's loop
accepted no connection meanwhile (its API port's accept queue filled up, every worker's
feed gave up on it). ``GossipThread.ask`` awaits instead.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from shoal.node.membership import GossipThread


@pytest.fixture
def gossip_thread() -> Iterator[GossipThread]:
    t = GossipThread("gossip-test")
    t.start()
    yield t
    t.stop()


async def test_ask_lets_the_loop_run_while_the_gossip_thread_is_busy(
        gossip_thread: GossipThread) -> None:
    release = threading.Event()
    gossip_thread.loop.call_soon_threadsafe(release.wait, 5.0)  # the gossip thread is busy
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(ticker())
    asked = asyncio.create_task(gossip_thread.ask(lambda: threading.current_thread().name))
    await asyncio.sleep(0.3)
    assert not asked.done(), "the gossip thread is still busy"
    assert ticks >= 5, "the agent's loop kept running while it waited"
    release.set()
    assert await asyncio.wait_for(asked, 5.0) == "gossip-test"  # ran on the gossip thread
    ticking.cancel()


async def test_ask_gives_up_on_a_wedged_gossip_thread(
        gossip_thread: GossipThread, monkeypatch: pytest.MonkeyPatch) -> None:
    from shoal.node import membership
    monkeypatch.setattr(membership, "SYNC_TIMEOUT", 0.2)
    release = threading.Event()
    gossip_thread.loop.call_soon_threadsafe(release.wait, 5.0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await gossip_thread.ask(lambda: 1)
    assert time.monotonic() - t0 < 3.0
    release.set()


async def test_ask_from_the_gossip_thread_itself_runs_at_once(
        gossip_thread: GossipThread) -> None:
    async def inside() -> str:
        return await gossip_thread.ask(lambda: "direct")
    assert await gossip_thread.run(inside()) == "direct"
