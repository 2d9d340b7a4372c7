"""Low-latency commits on top of pysyncobj's batching: wake on propose, send at tick end;
an idle tick thread that sleeps until its next timer.

Owns: waking pysyncobj's tick thread when a write is proposed and, on the leader,
sending append-entries as soon as a tick has added entries or advanced the commit index;
running other calls into pysyncobj on its tick thread (``call_soon``); how long the tick
thread's poll waits when nothing happens (``idle_wait``).
Must not touch: what is replicated, elections, membership (all pysyncobj's).

Why: with ``appendEntriesUseBatch=True`` (kept: it is what gives ~10k writes/s) pysyncobj
notices a queued write only when its poller next wakes (up to one tick period) and ships
new entries — and, later, the new commit index — only at the next append-entries period.
A chain of dependent writes (service → leader batch → task RUNNING) then costs ~50 ms per
link. pysyncobj's own answer, ``appendEntriesUseBatch=False``, sends one append-entries
per command; with several in flight a stale acknowledgement moves a follower's next index
back, entries are re-sent and followers log "truncating already-applied log entries"
CRITICAL lines (see shared LIBRARY-NOTES).

So here: a pipe registered with pysyncobj's poller is written on every propose (the tick
thread wakes at once), and an on-tick callback on the leader calls pysyncobj's
append-entries sender when the log or commit index moved — but only while every
responsive peer has acknowledged everything sent so far. With something still in flight
it leaves the batch to the periodic sender, so under load nothing changes and the
re-send / truncation path is never provoked.

Idle cost: pysyncobj's tick thread polls its sockets with a fixed timeout (``autoTickPeriod``;
20 ms here before: 50 wake-ups a second on every manager doing nothing). Its timers are few
and their times are in its state: the leader's next append-entries round, a follower's
election deadline, the journal's one-second timer. ``idle_wait`` makes the poll wait until
the earliest of them (at most ``autoTickPeriod``); a message, a propose (the pipe above) or a
``call_soon`` wakes it at once, so nothing waits longer than before. An idle follower then
wakes only for the leader's append-entries.

This reaches into pysyncobj 0.3.x private state (name-mangled ``_SyncObj__*``). If an
attribute is missing (another version) the hook turns itself off with one warning and
pysyncobj's periodic behaviour remains: slower, still correct.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from pysyncobj.monotonic import monotonic as monotonic_time
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.syncobj import _RAFT_STATE

# The tick thread's poll timeout when a timer is already due but the tick did not move it
# (a follower past its election deadline that is connected to nobody): pysyncobj's own
# fixed period before this, so such a state costs what it cost then and never spins.
OVERDUE_WAIT = 0.02

log = logging.getLogger("shoal.raft")


class IdlePoller:
    """pysyncobj's poller with the poll timeout cut to ``wait(timeout)`` (everything else
    is the wrapped poller's)."""

    def __init__(self, inner: Any, wait: Callable[[float], float]) -> None:
        self._inner = inner
        self._wait = wait

    def subscribe(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.subscribe(*args, **kwargs)

    def unsubscribe(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.unsubscribe(*args, **kwargs)

    def poll(self, timeout: float) -> None:
        self._inner.poll(self._wait(timeout))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class EagerReplication:
    """Installed on one SyncObj; ``wake()`` may be called from any thread."""

    def __init__(self, sync: Any, idle: bool = True) -> None:
        self._sync = sync
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._subscribed = False
        self._enabled = True
        self._last: tuple[int, int] = (-1, -1)  # (last log index, commit index) last sent
        self.eager_sends = 0  # append-entries rounds sent early (for tests / status)
        self._calls: collections.deque[Callable[[], object]] = collections.deque()
        self._timers = idle  # idle_wait reads pysyncobj's timers (off: its fixed period)
        sync.addOnTickCallback(self._on_tick)
        if idle:
            # (the attribute pysyncobj created in its __init__: left out of its snapshots)
            sync._poller = IdlePoller(sync._poller, self.idle_wait)

    # ------------------------------------------------------------------ any thread
    def wake(self) -> None:
        """Make the tick thread run a tick now (a write was queued)."""
        with contextlib.suppress(BlockingIOError, OSError):  # full pipe = already woken
            os.write(self._write_fd, b"w")

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the tick thread at the end of the next tick (now: it is woken).
        pysyncobj's methods that send (e.g. transferLeadership) must not race its thread."""
        self._calls.append(fn)
        self.wake()

    def close(self) -> None:
        """After the SyncObj is destroyed."""
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    # ------------------------------------------------------------------ tick thread
    def idle_wait(self, cap: float) -> float:
        """How long the tick thread may sleep in its poll: until pysyncobj's next timer is
        due, at most ``cap`` (its ``autoTickPeriod``)."""
        if not self._timers:
            return cap
        s = self._sync
        try:
            if s._SyncObj__raftLastApplied < s._SyncObj__raftCommitIndex:
                return 0.0  # committed entries left for the next slice (shoal.raft.store)
            now = monotonic_time()
            if s._SyncObj__raftState == _RAFT_STATE.LEADER:
                due = s._SyncObj__newAppendEntriesTime  # next append-entries round
            elif s._SyncObj__selfNode is not None:
                due = s._SyncObj__raftElectionDeadline  # (a read-only node has none)
            else:
                due = now + cap
            # the journal's one-second timer (it stores term/vote/commit index if changed)
            due = min(due, s._SyncObj__startTime + s._SyncObj__numOneSecondDumps)
        except AttributeError as exc:
            self._timers = False
            log.warning("pysyncobj internals changed (%s): the Raft tick thread polls every "
                        "%g s when idle", exc, cap)
            return cap
        left = due - now
        return min(cap, left) if left > 0 else min(cap, OVERDUE_WAIT)

    def _drain(self, _fd: int, _mask: int) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._read_fd, 4096):
                pass

    def _on_tick(self) -> None:
        while self._calls:
            fn = self._calls.popleft()
            try:
                fn()
            except Exception:
                log.exception("call on the Raft tick thread failed")
        if not self._enabled:
            return
        try:
            if not self._subscribed:
                # subscribe from the tick thread: the poller is not shared across threads
                self._sync._poller.subscribe(self._read_fd, self._drain, POLL_EVENT_TYPE.READ)
                self._subscribed = True
            self._push()
        except AttributeError as exc:
            self._enabled = False
            log.warning("pysyncobj internals changed (%s): commits fall back to its "
                        "periodic batching (higher write latency)", exc)

    def _push(self) -> None:
        s = self._sync
        if not s._isLeader():
            self._last = (-1, -1)
            return
        index = s._SyncObj__getCurrentLogIndex()
        commit = s._SyncObj__raftCommitIndex
        if (index, commit) == self._last:
            return
        voters = s._SyncObj__otherNodes
        if not voters and index > commit:
            # nobody to wait for: the next tick commits, let it run now
            self.wake()
        match, nxt = s._SyncObj__raftMatchIndex, s._SyncObj__raftNextIndex
        responded, connected = s._SyncObj__lastResponseTime, s._SyncObj__connectedNodes
        recent = monotonic_time() - s._SyncObj__conf.leaderFallbackTimeout
        for node in voters | s._SyncObj__readonlyNodes:
            if (node in connected and responded.get(node, 0.0) > recent
                    and match.get(node, 0) < nxt.get(node, 0) - 1):
                return  # an append-entries is in flight: leave it to the periodic sender
        self._last = (index, commit)
        self.eager_sends += 1
        s._SyncObj__sendAppendEntries()
