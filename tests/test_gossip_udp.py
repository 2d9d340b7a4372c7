"""shoal.gossip over real UDP + TCP on loopback, in one process (default asyncio loop and
uvloop): join, metadata, events, leave, key rotation without downtime."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
import uvloop

from shoal.gossip import (
    Config,
    EventKind,
    JoinError,
    MemberEvent,
    Memberlist,
    MemberState,
)

K1 = bytes(range(32))
K2 = bytes(range(50, 82))


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def cluster(n: int, cfg: Config) -> AsyncIterator[list[Memberlist]]:
    members = [
        Memberlist(cfg.replace(name=f"u{i}"), meta={"role": "worker", "idx": i}) for i in range(n)
    ]
    try:
        for m in members:
            await m.start()
        for m in members[1:]:
            await m.join([members[0].address])
        await wait_for(lambda: all(m.num_live() == n for m in members))
        yield members
    finally:
        for m in members:
            await m.shutdown()


async def test_members_join_share_metadata_and_report_a_leave() -> None:
    async with cluster(3, Config.local(secret_key=K1)) as (a, b, c):
        events: list[MemberEvent] = []
        a.subscribe(events.append)
        stream = b.events()
        assert {m.name: m.meta["idx"] for m in a.members()} == {"u0": 0, "u1": 1, "u2": 2}
        assert a.member("u2").address == c.address
        await c.leave()
        await c.shutdown()
        await wait_for(lambda: a.member("u2").state == MemberState.LEFT)
        seen = await asyncio.wait_for(stream.get(), 5)
        assert (seen.kind, seen.member.name) == (EventKind.LEFT, "u2")
        assert [(e.kind, e.member.name) for e in events] == [(EventKind.LEFT, "u2")]
        assert a.stats.get("drop.internal", 0) == 0


async def test_keys_rotate_across_a_live_cluster_without_downtime() -> None:
    cfg = Config.local(secret_key=K1)
    async with cluster(3, cfg) as members:
        suspicions: list[MemberEvent] = []
        for m in members:
            m.subscribe(lambda e: suspicions.append(e) if e.kind != EventKind.UPDATE else None)

        def keyring_step(step: Callable[[Memberlist], None]) -> None:
            for m in members:
                step(m)

        keyring_step(lambda m: m.keyring.install_key(K2))
        await asyncio.sleep(0.5)
        # one member switches first: the others can already read K2
        members[0].keyring.use_key(K2)
        await asyncio.sleep(0.5)
        keyring_step(lambda m: m.keyring.use_key(K2))
        await asyncio.sleep(0.5)
        keyring_step(lambda m: m.keyring.remove_key(K1))
        await asyncio.sleep(1.0)
        assert suspicions == []
        assert all(m.num_live() == 3 for m in members)
        # A member that only knows the old key is locked out, and its traffic is counted.
        outsider = Memberlist(cfg.replace(name="old"))
        await outsider.start()
        try:
            before = members[0].stats.get("drop.decrypt", 0)
            with pytest.raises(JoinError):
                await outsider.join([members[0].address])
            assert members[0].stats.get("drop.decrypt", 0) > before
        finally:
            await outsider.shutdown()


async def test_crash_is_detected_over_udp() -> None:
    cfg = Config.local(secret_key=K1)
    async with cluster(4, cfg) as members:
        victim = members[3]
        await victim.shutdown()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await wait_for(
            lambda: all(
                m.member("u3").state == MemberState.DEAD
                for m in members[:3]
            ),
            timeout=cfg.detection_bound(4) + 5,
        )
        assert loop.time() - start < cfg.detection_bound(4) + 5


def test_works_on_uvloop() -> None:
    async def scenario() -> list[str]:
        async with cluster(3, Config.local(secret_key=K1)) as members:
            return [m.name for m in members[0].members() if m.state == MemberState.ALIVE]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario()) == ["u0", "u1", "u2"]
