"""A planned stop of the agent (SIGTERM: an upgrade, `systemctl restart`), bounded in time.

Owns: the steps that make a planned restart invisible to the cluster before the agent closes
its components — run concurrently, each bounded by ``AgentConfig.stop_step_timeout``:

* Raft leadership: a leader hands it to the most caught-up follower (Raft TimeoutNow), so
  the cluster has a leader again within an election round instead of an election timeout
  after the leader's death;
* gossip: the node announces ``restart: restart_grace`` in its member metadata and leaves
  (shoal.node.membership.Membership.leave_for_restart); the leader's liveness policy
  (shoal.node.orchestrator.node_liveness) then waits that long for a new agent before it
  marks the node DOWN and replaces its tasks. A crash announces nothing and is detected by
  gossip as before.

``prepare_restart`` never raises: a step that fails or runs out of time is logged and the
stop goes on (the cluster then sees a crash, which it handles anyway).

Must not touch: stopping the agent's components (the agent closes them afterwards), the
tasks (they keep running and the next agent adopts them), the replicated state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from shoal.node.membership import Membership

log = logging.getLogger("shoal.shutdown")


class LeaderStore(Protocol):
    """What a leadership hand-over needs of the store (RaftStore has it; a worker's
    StateFeed is never the leader)."""

    def is_leader(self) -> bool: ...

    def voters(self) -> list[str]: ...

    def transfer_leadership(self, target: str | None = None) -> None: ...


# How often a hand-over is asked again while this node still leads, seconds: pysyncobj
# denies it while no follower has every entry (under a write load), so it is retried.
TRANSFER_RETRY = 0.1


async def hand_over_leadership(store: LeaderStore, timeout: float) -> bool:
    """If ``store`` leads a group of several voters, make another voter the leader; True once
    this node no longer leads (or never did), False if it still leads after ``timeout``."""
    if not store.is_leader() or len(store.voters()) < 2:
        return True
    deadline = time.monotonic() + timeout
    asked = 0.0
    while store.is_leader():
        now = time.monotonic()
        if now >= deadline:
            return False
        if now - asked >= TRANSFER_RETRY:
            asked = now
            store.transfer_leadership()
        await asyncio.sleep(0.02)
    return True


async def prepare_restart(store: LeaderStore | None, membership: Membership | None,
                          grace: float, timeout: float) -> None:
    """Hand leadership over (if ``store``, a Raft voter, leads) and announce the restart on
    gossip (if ``grace`` > 0), concurrently, within about ``timeout`` seconds. Never raises."""
    started = time.monotonic()

    async def leadership() -> str:
        if store is None:
            return ""
        was_leader = store.is_leader()
        if await hand_over_leadership(store, timeout):
            return "leadership handed over" if was_leader else ""
        return "still the leader (no follower caught up in time)"

    async def gossip() -> str:
        if membership is None or grace <= 0:
            return ""
        await membership.leave_for_restart(grace, timeout)
        return f"restart announced on gossip (others wait up to {grace:g} s)"

    results = await asyncio.gather(leadership(), gossip(), return_exceptions=True)
    done = []
    for what, res in zip(("leadership hand-over", "restart announcement"), results,
                         strict=True):
        if isinstance(res, BaseException):
            log.warning("planned stop: %s failed: %r", what, res)
        elif res:
            done.append(res)
    if done:
        log.info("planned stop: %s (%.2f s)", "; ".join(done), time.monotonic() - started)
