"""The agent's wall clock, and the fault suite's way to skew it.

Owns: ``skew_from_env`` — with ``SHOAL_CLOCK_OFFSET=SECONDS`` in its environment an agent's
``time.time()`` runs that many seconds ahead (negative: behind) of the kernel's clock, for
the whole process. The lab's hosts share one kernel clock, so this is how the fault suite
gives one node a wall clock that is off by minutes (docs/reliability.md). Monotonic clocks
(timeouts, Raft, gossip) are not touched: only what a wrong wall clock would change —
timestamps in the state, certificate validity, restart and update delays measured from
those timestamps.

Must not touch: anything but this process's ``time.time``; never set outside tests.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("shoal.clock")

ENV = "SHOAL_CLOCK_OFFSET"


def skew_from_env() -> float:
    """Apply ``SHOAL_CLOCK_OFFSET`` (seconds) to ``time.time`` if set; the offset applied."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return 0.0
    try:
        offset = float(raw)
    except ValueError:
        log.error("%s=%r is not a number of seconds: the clock is not skewed", ENV, raw)
        return 0.0
    real = time.time

    def skewed() -> float:
        return real() + offset

    time.time = skewed
    log.warning("wall clock skewed by %+.1f s (%s: fault injection, tests only)", offset, ENV)
    return offset
