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


# --------------------------------------------------------------- the leader's inputs, published
async def test_the_leaders_gossip_inputs_are_published_by_the_gossip_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two real members on loopback. After the first read (asked of the gossip thread), the
    leader's reads take what the gossip thread published: no hop per pass. An event reaches
    the agent's loop only after the inputs it changed were published (the leader it wakes
    reads them). A gossip thread that stops publishing (wedged) is asked again: TimeoutError,
    which the leader answers by judging that pass on heartbeats alone."""
    from shoal.gossip import Config
    from shoal.gossip.events import EventKind, MemberEvent
    from shoal.node import membership
    from shoal.node.membership import LeaderInputs, Membership

    key = bytes(range(32))
    seen: list[tuple[str, str | None]] = []  # (event, n2's state in the inputs read then)
    m1: Membership | None = None

    def on_change(ev: MemberEvent) -> None:  # on this loop, as the agent's hop
        if m1 is not None and ev.member.name == "n2":
            reading = asyncio.ensure_future(m1.leader_inputs())
            reading.add_done_callback(lambda f: seen.append(
                (ev.kind.value, f.result()[0].get("n2"))))

    m1 = Membership("n1", "127.0.0.1", 0, key, {}, Config.local(), on_change=on_change)
    m2 = Membership("n2", "127.0.0.1", 0, key, {}, Config.local())
    await m1.start(lambda: [])
    await m2.start(lambda: [f"127.0.0.1:{m1.list.address[1]}"])
    try:
        deadline = time.monotonic() + 10
        while (await m1.leader_inputs())[0].get("n2") != "alive":
            assert time.monotonic() < deadline, "n2 never joined"
            await asyncio.sleep(0.05)

        async def no_hop(fn: object) -> LeaderInputs:
            raise AssertionError("a read hopped to the gossip thread")
        monkeypatch.setattr(m1.thread, "ask", no_hop)
        monkeypatch.setattr(membership, "INPUTS_STALE", 1.5)
        first = await m1.leader_inputs()
        await asyncio.sleep(2.5)  # past INPUTS_STALE: kept fresh every second, no hop
        again = await m1.leader_inputs()
        assert again[0] == first[0] == {"n1": "alive", "n2": "alive"}

        await m2.close(leave=False)  # n2 dies: suspect, then dead
        deadline = time.monotonic() + 10
        while ("dead", "dead") not in seen:
            assert time.monotonic() < deadline, f"no dead event for n2: {seen}"
            await asyncio.sleep(0.05)
        for kind, state in seen:  # what each event woke read at least that event's change
            if kind in (EventKind.SUSPECT.value, EventKind.DEAD.value):
                assert state in ("suspect", "dead"), seen

        monkeypatch.undo()  # the real ask again
        monkeypatch.setattr(membership, "SYNC_TIMEOUT", 0.2)
        monkeypatch.setattr(membership, "INPUTS_STALE", 0.5)
        release = threading.Event()
        m1.thread.loop.call_soon_threadsafe(release.wait, 5.0)  # wedged
        await asyncio.sleep(0.6)
        try:
            with pytest.raises(TimeoutError):
                await m1.leader_inputs()
        finally:
            release.set()
        await asyncio.sleep(0.1)
        assert (await m1.leader_inputs())[0]["n2"] == "dead"  # asked, then published again
    finally:
        await m1.close(leave=False)
        await m2.close(leave=False)
