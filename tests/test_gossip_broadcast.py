"""Transmit-limited broadcast queue and Lifeguard's suspicion timer / health score."""

from __future__ import annotations

import asyncio

import pytest

from shoal.gossip.broadcast import BroadcastQueue
from shoal.gossip.lifeguard import Awareness, Suspicion
from shoal.gossip.simloop import run_simulation


def test_a_broadcast_is_retired_after_its_transmit_limit() -> None:
    q = BroadcastQueue()
    done: list[str] = []
    q.queue("n1", b"a" * 10, lambda: done.append("n1"))
    for _ in range(3):
        assert q.take(100, limit=3) == [b"a" * 10]
    assert q.take(100, limit=3) == []
    assert done == ["n1"] and len(q) == 0


def test_newer_news_about_a_member_replaces_the_older() -> None:
    q = BroadcastQueue()
    done: list[str] = []
    q.queue("n1", b"old", lambda: done.append("old"))
    q.queue("n1", b"new")
    assert done == ["old"]
    assert q.take(100, limit=5) == [b"new"]


def test_least_transmitted_first_and_only_what_fits() -> None:
    q = BroadcastQueue()
    q.queue("a", b"A" * 40)
    q.take(100, limit=10)  # "a" transmitted once
    q.queue("b", b"B" * 40)
    q.queue("c", b"C" * 30)
    # fresh ones first (larger first among equals), "a" only if it still fits
    assert q.take(75, limit=10) == [b"B" * 40, b"C" * 30]
    # all sent once now: larger first, newer first among equals
    assert q.take(45, limit=10) == [b"B" * 40]
    assert q.take(45, limit=10) == [b"A" * 40]
    assert q.take(10, limit=10) == []


def test_reset_runs_completion_callbacks() -> None:
    q = BroadcastQueue()
    done: list[int] = []
    q.queue("a", b"x", lambda: done.append(1))
    q.reset()
    assert done == [1] and not q


@pytest.mark.parametrize(
    ("confirmers", "expected"),
    [
        # memberlist suspicion_test.go TestSuspicion_Timer: k=3, min 0.5 s, max 2 s
        ([], 2.0),
        (["me", "foo"], 1.25),
        (["me", "foo", "foo", "foo"], 1.25),
        (["me", "foo", "bar"], 0.811),  # memberlist's table says 810 ms ± 25 ms
        (["me", "foo", "bar", "baz"], 0.5),
        (["me", "foo", "bar", "baz", "zoo"], 0.5),
    ],
)
def test_suspicion_fires_earlier_with_each_independent_confirmation(
    confirmers: list[str], expected: float
) -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        s = Suspicion("me", 3, 0.5, 2.0, lambda n, due: fired.append(loop.time()))
        for who in confirmers:
            await asyncio.sleep(0.025)
            s.confirm(who)
        await asyncio.sleep(5)
        s.confirm("late")  # after firing: no second call
        await asyncio.sleep(5)
        assert len(fired) == 1
        return fired[0]

    assert run_simulation(scenario()) == pytest.approx(expected, abs=1e-6)


def test_suspicion_that_is_overdue_fires_immediately_on_confirmation() -> None:
    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        s = Suspicion("me", 1, 0.1, 30.0, lambda n, due: fired.append(loop.time()))
        await asyncio.sleep(0.2)
        assert s.confirm("foo")
        await asyncio.sleep(0)
        return fired

    assert run_simulation(scenario()) == [pytest.approx(0.2)]


def test_suspicion_calls_back_lead_seconds_before_it_expires_with_when_it_does() -> None:
    """The last-chance probe runs in the suspicion's last probe period (``lead``): the
    callback comes that much early and is told when the suspicion expires, also after a
    confirmation moved it; never more than half the suspicion early."""

    async def scenario() -> list[tuple[float, float]]:
        loop = asyncio.get_running_loop()
        calls: list[tuple[float, float]] = []
        Suspicion("me", 0, 1.0, 6.0, lambda n, due: calls.append((loop.time(), due)),
                  lead=0.2)
        s = Suspicion("me", 1, 1.0, 6.0, lambda n, due: calls.append((loop.time(), due)),
                      lead=0.2)
        assert s.deadline == pytest.approx(6.0)
        await asyncio.sleep(0.5)
        assert s.confirm("foo")  # k reached: the minimum, 1.0 s after the start
        assert s.deadline == pytest.approx(1.0)
        await asyncio.sleep(5)
        late = Suspicion("me", 0, 0.1, 1.0, lambda n, due: calls.append((loop.time(), due)),
                         lead=0.2)
        assert late.deadline == pytest.approx(loop.time() + 0.1)
        await asyncio.sleep(1)
        return calls

    start = 0.0
    calls = run_simulation(scenario())
    assert calls[0] == (pytest.approx(start + 0.8), pytest.approx(1.0))
    assert calls[1] == (pytest.approx(start + 0.8), pytest.approx(1.0))
    assert calls[2] == (pytest.approx(5.55), pytest.approx(5.6))  # half of 0.1 s early


def test_cancelled_suspicion_never_fires() -> None:
    async def scenario() -> list[int]:
        fired: list[int] = []
        s = Suspicion("me", 0, 0.1, 1.0, lambda n, due: fired.append(n))
        s.cancel()
        await asyncio.sleep(2)
        return fired

    assert run_simulation(scenario()) == []


def test_awareness_scales_timeouts_and_recovers() -> None:
    a = Awareness(8)
    for _ in range(20):
        a.apply_delta(1)
    assert a.score == 7 and a.scale(1.0) == 8.0
    for _ in range(20):
        a.apply_delta(-1)
    assert a.score == 0 and a.scale(1.0) == 1.0
