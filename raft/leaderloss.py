"""A follower whose connection to the leader closes calls an election soon, not after the
election timeout.

Owns: bringing a follower's election deadline forward when pysyncobj reports its
connection to the current leader closed.
Must not touch: how elections run, votes, terms (all pysyncobj's); connections.

Why: a leader whose process dies (crash, kill -9, OOM kill, a restart) has its sockets closed
by its kernel, so every follower learns of it at once; without this they still wait for their
election timeout (0.65-1.0 s) before anyone stands. The election timeout has to stay long
enough for a leader that is only slow (a stalled host, a lost packet) not to be deposed, and
the append-entries period that keeps followers quiet is a fraction of it: that period is most
of an idle manager's Raft cost (docs/benchmarks.md, *Idle cost*). A closed connection is a
better signal than silence, so it gets its own short wait: a random time in
``[wait / 5, wait]`` (random, as the election timeout is, so the surviving followers do not
stand together and split the vote; a split vote falls back to the election timeout).

A leader that is alive but whose connection to this follower alone broke (a reset on the
network) keeps its office: the follower asks before it stands, and the others, still hearing
the leader, refuse (shoal.raft.prevote). A pulled cable closes nothing: then the election
timeout decides, as before.

This reads pysyncobj 0.3.x private state (name-mangled ``_SyncObj__*``, as raft/eager.py);
if an attribute is missing it turns itself off with one warning, and failover falls back to
the election timeout.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

from pysyncobj.monotonic import monotonic as monotonic_time
from pysyncobj.syncobj import _RAFT_STATE

log = logging.getLogger("shoal.raft")


class LeaderLoss:
    """Called by the transport (on pysyncobj's tick thread) for every closed peer
    connection; acts only on a follower's connection to its leader."""

    def __init__(self, wait: float, rand: Callable[[], float] = random.random) -> None:
        self.wait = wait  # 0 = off: the election timeout alone decides
        self._rand = rand
        self._sync: Any = None
        self.hastened = 0  # elections brought forward (for tests and status)

    def attach(self, sync: Any) -> None:
        """The SyncObj, once built (its transport exists before it does)."""
        self._sync = sync

    def on_disconnected(self, node: Any) -> None:
        s = self._sync
        if s is None or self.wait <= 0:
            return
        try:
            if s._SyncObj__raftState != _RAFT_STATE.FOLLOWER or s._SyncObj__selfNode is None \
                    or s._SyncObj__raftLeader != node:
                return
            soon = monotonic_time() + self.wait * (0.2 + 0.8 * self._rand())
            if soon >= s._SyncObj__raftElectionDeadline:
                return
            s._SyncObj__raftElectionDeadline = soon
        except AttributeError as exc:
            self.wait = 0.0
            log.warning("pysyncobj internals changed (%s): a follower that loses its leader's "
                        "connection waits for the election timeout", exc)
            return
        self.hastened += 1
        log.info("Raft: the connection to the leader %s closed: election in %.0f ms unless "
                 "it answers", node, (soon - monotonic_time()) * 1000)
