"""Pre-vote: a manager asks before it stands, so one that alone lost the leader does not
depose it.

Owns: the pre-vote round before each election (Raft thesis §9.6, as etcd's ``PreVote`` and
hashicorp/raft's): the messages ``pre_vote`` / ``pre_vote_response``, which manager grants
one, and when pysyncobj's own election may start.
Must not touch: terms, votes, the log, the leader's state (all pysyncobj's); a pre-vote
changes no state on either side.

Why: pysyncobj stands as soon as a follower's election deadline passes: it raises its term
and asks for votes, and every manager that sees the higher term drops its leader, the
leader included — one election (writes paused ~1 s) even when the leader is fine and only
this follower missed it: a link between the two alone broken, a follower whose Raft thread
was starved past its timeout on a loaded host (the 100-node lab's leader changes,
docs/scaling.md), a manager back from a partition. With pre-vote the follower first asks
"would you vote for me in term T+1?", and a manager grants only if it would (the
candidate's log is at least as up to date as its own) *and* it has no leader of its own to
believe in: it heard no append-entries from one within ``lease`` seconds and its connection
to it has not closed. The leader never grants. Only with a majority of grants (its own
included) does the follower let pysyncobj stand; otherwise it waits a new election timeout
and asks again, its term unchanged, and takes the leader's next append-entries as before.

On by default (``RaftConfig.pre_vote``). It needs every manager to hear the current leader:
one that refused the leader's connection would be refused every pre-vote and wait forever
(no disruptive election gets it out any more). So a restarted replica takes the voters of
its whole log, and follows a voter it does not know yet (shoal.raft.store
``_adopt_log_membership``, shoal.raft.transport "Strangers"; docs/architecture.md). Off, this
still answers the pre-votes of managers that have it on. Only grants from known voters count.

Costs: one round trip before an election that will happen (a killed leader is still replaced
in ~0.1 s: a closed connection ends the lease, shoal.raft.leaderloss); nothing on a quiet
cluster. A leadership transfer (pysyncobj's ``timeout_now``) stands without asking.

``lease`` is shorter than the election timeout by one append-entries period: a follower that
hears a healthy leader is well inside it (append-entries come every period), and one whose
leader really went silent is out of it by the time a candidate's timeout (at least the
minimum) runs out, whatever the skew of their last messages.

Reads pysyncobj 0.3.x private state (name-mangled ``_SyncObj__*``, as raft/eager.py); if an
attribute is missing it turns itself off with one warning and elections are pysyncobj's own.
Runs on pysyncobj's tick thread only (its tick, its message callbacks, its transport's
disconnect callback).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from pysyncobj.monotonic import monotonic as monotonic_time
from pysyncobj.syncobj import _RAFT_STATE

log = logging.getLogger("shoal.raft")

REQUEST, RESPONSE = "pre_vote", "pre_vote_response"


class PreVote:
    def __init__(self, lease: float, enabled: bool = True) -> None:
        self.lease = lease
        self.enabled = enabled
        self._sync: Any = None
        self._campaign: int | None = None  # the term this node asks about
        self._grants: set[Any] = set()  # nodes that granted it (this node included)
        self._won: int | None = None  # a majority granted this term: pysyncobj may stand
        self._heard_at = -math.inf  # last append-entries from a leader (monotonic)
        self._leader_gone = False  # the connection to the leader closed since
        # counters (tests, status): rounds asked, rounds won, pre-votes granted / refused
        self.asked = self.won = self.granted = self.refused = 0

    def attach(self, sync: Any) -> None:
        """The SyncObj, once built."""
        self._sync = sync

    # ------------------------------------------------------------------ the candidate side
    def before_tick(self) -> None:
        """Called at the start of each of pysyncobj's ticks, before its election check:
        past the election deadline, ask (and push the deadline on) instead of standing,
        unless a majority granted."""
        s = self._sync
        if not self.enabled or s is None:
            return
        try:
            self._before_tick(s)
        except AttributeError as exc:
            self._off(exc)

    def _before_tick(self, s: Any) -> None:
        if s._SyncObj__raftState == _RAFT_STATE.LEADER or s._SyncObj__selfNode is None:
            self._campaign = self._won = None
            return
        if s._SyncObj__transferInProgress:
            return  # the leader handed over: pysyncobj stands at once, as asked
        now = monotonic_time()
        if s._SyncObj__raftElectionDeadline >= now or not s._SyncObj__connectedToAnyone():
            return  # (pysyncobj does not stand without a connection either)
        term = s._SyncObj__raftCurrentTerm + 1
        if self._won == term:
            self._won = None
            return  # granted: pysyncobj stands in this tick
        self._campaign, self._grants = term, {s._SyncObj__selfNode}
        self.asked += 1
        s._SyncObj__raftElectionDeadline = now + s._SyncObj__generateRaftTimeout()
        request = {"type": REQUEST, "term": term,
                   "last_log_index": s._SyncObj__getCurrentLogIndex(),
                   "last_log_term": s._SyncObj__getCurrentLogTerm()}
        for node in s._SyncObj__otherNodes:
            s._SyncObj__transport.send(node, request)
        self._count(s)

    def _count(self, s: Any) -> None:
        voters = len(s._SyncObj__otherNodes) + 1
        if self._campaign is not None and len(self._grants) > voters / 2:
            self._won, self._campaign = self._campaign, None
            self.won += 1
            s._SyncObj__raftElectionDeadline = 0.0  # stand now (this tick or the next)

    # ------------------------------------------------------------------ messages
    def on_message(self, node: Any, message: dict[str, Any]) -> bool:
        """Every message pysyncobj receives, first; True: a pre-vote message, handled here
        (pysyncobj would ignore its type anyway)."""
        s = self._sync
        kind = message.get("type")
        if s is None or kind not in (REQUEST, RESPONSE, "append_entries"):
            return False
        try:
            return self._on_message(s, node, kind, message)
        except AttributeError as exc:
            self._off(exc)
            return kind != "append_entries"

    def _on_message(self, s: Any, node: Any, kind: str, message: dict[str, Any]) -> bool:
        term = message.get("term")
        if not isinstance(term, int) or isinstance(term, bool):
            return kind != "append_entries"  # malformed: pysyncobj's to judge, or dropped
        if kind == "append_entries":
            if term >= s._SyncObj__raftCurrentTerm:  # a leader: no campaign, a new lease
                self._heard_at, self._leader_gone = monotonic_time(), False
                self._campaign = self._won = None  # (a grant won before it is void)
            return False
        if kind == RESPONSE:
            if message.get("granted") is True and term == self._campaign and \
                    term == s._SyncObj__raftCurrentTerm + 1 and node in s._SyncObj__otherNodes:
                self._grants.add(node)
                self._count(s)
            return True
        grant = self._grant(s, term, message.get("last_log_index"),
                            message.get("last_log_term"))
        if grant:
            self.granted += 1
        else:
            self.refused += 1
        s._SyncObj__transport.send(node, {"type": RESPONSE, "term": term, "granted": grant})
        return True

    def _grant(self, s: Any, term: int, last_index: Any, last_term: Any) -> bool:
        """Would this node vote for that candidate in ``term``, now?"""
        if not all(isinstance(v, int) and not isinstance(v, bool)
                   for v in (last_index, last_term)):
            return False
        if not self.enabled:  # (pre-vote off here, on there: do not hold its election up)
            return term > s._SyncObj__raftCurrentTerm
        if term <= s._SyncObj__raftCurrentTerm or s._SyncObj__raftState == _RAFT_STATE.LEADER:
            return False
        if s._SyncObj__raftLeader is not None and not self._leader_gone and \
                monotonic_time() - self._heard_at < self.lease:
            return False  # it has a leader it heard lately
        mine = s._SyncObj__getCurrentLogTerm()
        return last_term > mine or (last_term == mine and
                                    last_index >= s._SyncObj__getCurrentLogIndex())

    def on_disconnected(self, node: Any) -> None:
        """A closed voter connection (the transport, after pysyncobj): the leader's ends
        the lease."""
        s = self._sync
        if s is None:
            return
        try:
            if node == s._SyncObj__raftLeader:
                self._leader_gone = True
        except AttributeError as exc:
            self._off(exc)

    def _off(self, exc: Exception) -> None:
        if self.enabled:
            self.enabled = False
            log.warning("pysyncobj internals changed (%s): managers stand for election "
                        "without a pre-vote", exc)
