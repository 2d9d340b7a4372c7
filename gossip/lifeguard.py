"""Lifeguard's stateful pieces: the suspicion timer and the local health (awareness) score.

Owns the timer of one suspicion (with its independent confirmations) and the local health
score; the arithmetic lives in timing.py, the decisions in memberlist.py. Timers use the
running event loop's clock, so they follow a VirtualTimeLoop in simulations.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from . import timing


class Suspicion:
    """Timer that declares a suspect dead, shortened by independent confirmations.

    Starts at ``max_timeout`` (or ``min_timeout`` when ``k == 0``); every new confirmer
    recomputes the remaining time with ``timing.remaining_suspicion_time``. ``on_timeout`` is
    called at most once, with the number of confirmations received and the loop time at
    which the suspicion expires (``due``); it is called ``lead`` seconds before that (at most
    half the suspicion), so the caller's last-chance probe (one probe period) ends when the
    suspicion does instead of after it.
    """

    __slots__ = (
        "_confirmers",
        "_due",
        "_fired",
        "_handle",
        "_loop",
        "_on_timeout",
        "confirmations",
        "k",
        "lead",
        "max_timeout",
        "min_timeout",
        "start",
    )

    def __init__(
        self,
        sender: str,
        k: int,
        min_timeout: float,
        max_timeout: float,
        on_timeout: Callable[[int, float], None],
        loop: asyncio.AbstractEventLoop | None = None,
        lead: float = 0.0,
    ) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self.k = k
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout
        self.lead = lead
        self.confirmations = 0
        self._confirmers = {sender}
        self._on_timeout = on_timeout
        self._fired = False
        self.start = self._loop.time()
        self._due = self.start + (max_timeout if k >= 1 else min_timeout)
        self._handle = self._schedule()

    @property
    def deadline(self) -> float:
        """Loop time at which the suspicion expires (as currently scheduled)."""
        return self._due

    def _schedule(self) -> asyncio.TimerHandle:
        # at most half the suspicion early: the last-chance probe stays a look at the end of
        # it, also when a slowed member's probe period is long (a time already past runs at
        # the loop's next iteration)
        lead = min(self.lead, (self._due - self.start) / 2)
        return self._loop.call_at(self._due - lead, self._fire)

    def confirm(self, sender: str) -> bool:
        """Count ``sender`` as an independent confirmation; True if it was new information."""
        if self._fired or self.confirmations >= self.k or sender in self._confirmers:
            return False
        self._confirmers.add(sender)
        self.confirmations += 1
        elapsed = self._loop.time() - self.start
        remaining = timing.remaining_suspicion_time(
            self.confirmations, self.k, elapsed, self.min_timeout, self.max_timeout
        )
        self._handle.cancel()
        self._due = self._loop.time() + max(remaining, 0.0)
        self._handle = self._schedule()
        return True

    def cancel(self) -> None:
        self._fired = True
        self._handle.cancel()

    def _fire(self) -> None:
        if self._fired:
            return
        self._fired = True
        self._on_timeout(self.confirmations, self._due)


class Awareness:
    """Local health score (Lifeguard LHA): 0 is healthy, up to ``max_multiplier - 1``."""

    __slots__ = ("max_multiplier", "score")

    def __init__(self, max_multiplier: int) -> None:
        self.max_multiplier = max_multiplier
        self.score = 0

    def apply_delta(self, delta: int) -> None:
        self.score = timing.apply_health_delta(self.score, delta, self.max_multiplier)

    def scale(self, duration: float) -> float:
        return timing.scale_by_health(duration, self.score)
