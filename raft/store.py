"""The replicated store: ClusterState behind pysyncobj, bridged to asyncio.

Owns: the SyncObj instance (Raft log, elections, membership, persistence: the data
directory's lock and the check of what a restart finds there), the threading boundary
between pysyncobj's tick thread and the agent's event loop, and translating pysyncobj fail
reasons into shoal.raft.errors. Must not touch: cluster policy (what to write is decided by
callers), the network beyond Raft's own port, the journal file's format and its hardened
methods (shoal.raft.journal).

Threading: pysyncobj runs with ``autoTick=True`` in a tick thread that applies log
entries. The SyncObj must be constructed on the main thread (the tick thread stops
when its creating thread ends). ``ClusterState`` is mutated only there, under
``_lock``; the event loop reads through :meth:`RaftStore.snapshot` (a copy made under
the same lock) and is woken through ``loop.call_soon_threadsafe`` after every apply.

Commands travel as msgpack bytes (not pickles) and the state machine never raises,
so a malformed entry is recorded as a rejection instead of wedging every replica.
"""

from __future__ import annotations

import _socket
import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import functools
import gzip
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pysyncobj.pickle as pysyncobj_pickle
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated

from shoal.raft import appendentries, migrate, schema
from shoal.raft.eager import EagerReplication
from shoal.raft.errors import CommandRejected, NotReady, PersistenceError, WriteTimeout
from shoal.raft.journal import harden_journal, read_journal, rewrite_journal
from shoal.raft.leaderloss import LeaderLoss
from shoal.raft.models import NodeRole, to_dict
from shoal.raft.prevote import PreVote
from shoal.raft.state import ClusterState, Snapshot
from shoal.raft.transport import AdmissionTransport, AeadEncryptor
from shoal.raft.wire import state_from_bytes, state_to_bytes

# pysyncobj 0.3.17 (win_inet_pton.py) replaces socket.inet_ntop on every platform with a
# Windows-only version; put the C function back for everything else in the process.
socket.inet_ntop = _socket.inet_ntop

log = logging.getLogger("shoal.raft")

# Longest the Raft tick thread applies committed entries before it reads and sends messages
# again, seconds (_SafeSyncObj._SyncObj__applyLogEntries); at least one entry per tick.
APPLY_SLICE = 0.02
# the no-op a linearizable read waits for (RaftStore.read_barrier)
_BARRIER = msgpack.packb({"op": "read_barrier"}, use_bin_type=True)


# Bounds of RaftConfig.scaled's multiplier (Nomad and Consul allow 1-10 too).
MIN_MULTIPLIER, MAX_MULTIPLIER = 1.0, 10.0


@dataclass
class RaftConfig:
    """Timing and persistence of the Raft group (see docs/architecture.md#raft-tuning).

    The defaults target a leader failover (kill -9 → first accepted write) under 1 s on a
    LAN while not flapping on a busy 2-core machine.
    """

    # Election timeout range, seconds. A follower that hears nothing from the leader for a
    # random time in [min, max] starts an election. Lower = faster failover after a pulled
    # cable, but more spurious elections when the machine stalls. pysyncobj default 0.4/1.4.
    # A leader whose process dies closes its connections: then leader_lost_wait decides.
    raft_min_timeout: float = 0.65
    raft_max_timeout: float = 1.0
    # Leader heartbeat / append-entries batch period, seconds. Must be < min_timeout / 3.
    # Each period wakes every manager's Raft thread (an idle manager's largest cost); writes
    # never wait for it (eager replication, shoal.raft.eager). Was 0.1 s with 0.35/0.7 s
    # timeouts, before a closed leader connection started elections on its own.
    append_entries_period: float = 0.2
    # A follower whose connection to the leader closes (its process died) starts an election
    # after a random time in [wait / 5, wait] instead of the election timeout, seconds
    # (shoal.raft.leaderloss). Random so that two followers rarely split the vote. Not
    # scaled by the Raft multiplier. 0 = off.
    leader_lost_wait: float = 0.25
    # Ask the other managers before standing for election, and stand only if a majority
    # would vote (shoal.raft.prevote): a manager that alone lost the leader (a broken link,
    # a starved Raft thread, back from a partition) does not depose it. A manager grants
    # only if it heard no leader for raft_min_timeout - append_entries_period. Off, a
    # manager still answers others' pre-votes (a mixed setting never holds one up).
    pre_vote: bool = True
    # Longest the Raft tick thread sleeps when idle, seconds (pysyncobj's autoTickPeriod, its
    # poll timeout). It sleeps only until its next timer (the leader's next append-entries,
    # a follower's election deadline, the journal's one-second timer: raft/eager.py
    # ``idle_wait``) and a message, a propose or a call into it wakes it at once, so this
    # caps only what no timer covers: redialling a lost peer on a node with no timer due
    # sooner, noticing a finished log compaction. Was a fixed 0.02 s poll (50 wake-ups/s
    # idle). Lower = more idle wake-ups; higher = those checks later.
    tick_period: float = 0.25
    # A connection with no traffic for this long is dropped, seconds. pysyncobj's 3.5 s
    # drops idle follower-to-follower links, so the first vote request after a leader
    # dies fails and elections need a second round; rely on TCP keepalive instead.
    connection_timeout: float = 1e5
    # How often to redial an unreachable peer, seconds (also delays catch-up of a
    # restarted node that must wait to be dialled).
    connection_retry_time: float = 0.5
    # A leader that hears from no majority for this long steps down, seconds.
    leader_fallback_timeout: float = 2.0
    # Deadline for a write to commit, seconds. A timed-out write may still apply later:
    # every command shoal writes is safe to apply twice or late.
    write_timeout: float = 5.0
    # Compact the log after this many entries (snapshot to the dump file in a fork).
    log_compaction_min_entries: int = 5000
    log_compaction_min_time: float = 60.0
    # How long a starting store waits for its data directory's lock (held by another live
    # store, or by a log compaction a killed predecessor forked), seconds.
    data_dir_lock_timeout: float = 30.0

    def validate(self) -> None:
        if not self.raft_min_timeout > 3 * self.append_entries_period:
            raise ValueError("raft_min_timeout must be > 3 x append_entries_period")
        if not self.raft_max_timeout > self.raft_min_timeout:
            raise ValueError("raft_max_timeout must be > raft_min_timeout")
        if not self.leader_fallback_timeout > self.append_entries_period:
            raise ValueError("leader_fallback_timeout must be > append_entries_period")
        if self.write_timeout <= 0 or self.tick_period <= 0:
            raise ValueError("write_timeout and tick_period must be > 0")
        if not 0 <= self.leader_lost_wait < self.raft_min_timeout:
            raise ValueError("leader_lost_wait must be >= 0 and < raft_min_timeout")

    def scaled(self, multiplier: float) -> RaftConfig:
        """These timings stretched by ``multiplier``, as Nomad's and Consul's raft_multiplier:
        the election timeout range, the append-entries (heartbeat) period and the leader's
        step-down timeout (not ``leader_lost_wait``: a killed leader is still replaced in
        ~0.1 s). 1 = these; 2 = half the idle Raft messages and wake-ups on every manager,
        twice the tolerance of a stalled machine or network, and twice the election timeout
        a pulled cable's failover waits for (docs/architecture.md, "Raft tuning")."""
        if not MIN_MULTIPLIER <= multiplier <= MAX_MULTIPLIER:
            raise ValueError(f"raft multiplier must be between {MIN_MULTIPLIER:g} and "
                             f"{MAX_MULTIPLIER:g}, got {multiplier}")
        return dataclasses.replace(
            self, raft_min_timeout=self.raft_min_timeout * multiplier,
            raft_max_timeout=self.raft_max_timeout * multiplier,
            append_entries_period=self.append_entries_period * multiplier,
            leader_fallback_timeout=self.leader_fallback_timeout * multiplier)


def _lock_data_dir(data_dir: Path, timeout: float) -> int:
    """Take ``raft.lock`` (flock) for this store's lifetime and return its fd.

    pysyncobj compacts in a forked child that writes ``raft.dump.tmp`` and renames it over
    ``raft.dump``; a kill -9 of the store does not kill that child. The child inherits this
    lock (flock locks belong to the open file, which fork shares; O_CLOEXEC drops it only
    from exec'd programs), so waiting for the lock waits for a predecessor's leftover
    compaction to finish before this store reads the dump — and refuses a second live store
    on the same directory."""
    fd = os.open(data_dir / "raft.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise PersistenceError(
                    f"{data_dir} is in use: another Raft store, or a log compaction left "
                    f"by a killed one, still holds {data_dir / 'raft.lock'} after "
                    f"{timeout:g}s") from None
            time.sleep(0.05)


def _set_aside(path: Path) -> None:
    if path.exists():
        os.replace(path, path.with_name(path.name + ".unusable"))


def _check_persistence(data_dir: Path, can_refetch: bool) -> None:
    """Make ``raft.journal`` + ``raft.dump`` a pair pysyncobj restores correctly (under the
    data-dir lock, before pysyncobj opens them).

    pysyncobj's compaction is: the child renames the new dump in, then the parent drops
    the journal entries the dump covers (FileJournal.deleteEntriesTo: clear, then re-add
    every kept entry). A kill -9 between the two leaves a journal that still starts before
    the dump; pysyncobj then replaces the whole journal by the dump's last two entries,
    losing every entry after the dump this voter had already acknowledged. So:

    * journal holds the dump's last two entries further in: finish the interrupted
      truncation (atomically: a new journal renamed over the old) — nothing is lost;
    * dump unreadable, or no dump but a journal that does not start at index 1: pysyncobj
      would keep the journal with an empty state machine that never applies anything
      again. With other voters to fetch from (``can_refetch``) both files are set aside
      (``*.unusable``) and the node starts empty: the leader sends it a snapshot. Alone,
      refuse to start (PersistenceError) rather than silently dropping committed data.
      A dump alone is kept when the journal is complete (starts at index 1)."""
    journal_path, dump_path = data_dir / "raft.journal", data_dir / "raft.dump"
    for tmp in (data_dir / "raft.dump.tmp", data_dir / "raft.dump.1.tmp",
                data_dir / "raft.journal.repair"):
        tmp.unlink(missing_ok=True)  # half-written by a killed store (we hold the lock)
    entries = read_journal(journal_path)
    dump: Any = None
    dump_error = ""
    if dump_path.exists():
        try:
            with gzip.open(dump_path, "rb") as f:
                dump = pysyncobj_pickle.load(f)
            if not all(isinstance(dump[i], tuple) and len(dump[i]) == 3 for i in (1, 2)):
                raise ValueError("no log entries in it")
        except Exception as exc:
            dump, dump_error = None, f"unreadable dump ({exc!r})"
    first = entries[0][1] if entries else 1
    if dump is None and first > 1:
        problem = dump_error or f"no dump, and the journal starts at index {first}"
    elif dump is None:
        if dump_error:  # the journal alone is complete
            log.warning("Raft: %s in %s; the journal is complete, restoring from it",
                        dump_error, data_dir)
            _set_aside(dump_path)
        return
    else:
        keys = [(e[1], e[2]) for e in entries]
        prev, last = (dump[2][1], dump[2][2]), (dump[1][1], dump[1][2])
        if keys[:2] == [prev, last] or prev not in keys:
            return  # restored as is (or pysyncobj restarts the log at the dump: consistent)
        k = keys.index(prev)
        if k + 1 >= len(keys) or keys[k + 1] != last:
            return
        rewrite_journal(journal_path, entries[k:])
        log.warning("Raft: finished a log compaction interrupted by a crash in %s (dropped "
                    "%d journal entries covered by the dump, kept %d)", data_dir, k,
                    len(entries) - k)
        return
    if not can_refetch:
        raise PersistenceError(
            f"Raft data in {data_dir} cannot be restored: {problem}. This is the only voter, "
            "so starting empty would lose committed state; restore raft.journal/raft.dump "
            "from a backup (or move them away to start a new, empty cluster)")
    log.error("Raft: %s in %s; setting raft.journal and raft.dump aside (*.unusable) and "
              "starting empty: the leader will send a snapshot", problem, data_dir)
    _set_aside(journal_path)
    _set_aside(dump_path)
    meta_path = journal_path.with_name(journal_path.name + ".meta")
    if meta_path.exists():  # the term and vote must survive; the commit index must not
        kept = pysyncobj_pickle.loads(meta_path.read_bytes())
        kept.pop("raftCommitIndex", None)
        tmp = meta_path.with_name(meta_path.name + ".tmp")
        tmp.write_bytes(pysyncobj_pickle.dumps(kept))
        os.replace(tmp, meta_path)


class _SafeSyncObj(SyncObj):
    """SyncObj with shoal's fixes to pysyncobj (methods of a subclass, not instance
    attributes: the compaction pickles the instance's dict).

    * Its answers (``next_node_idx``) carry the follower's term, so the leader drops answers
      from another term (raft/transport.py). pysyncobj's carry none: a leader re-elected
      after losing its leadership counted a delayed "I hold up to N" sent for its previous
      term's log, committed an entry no majority held, and acknowledged a write the cluster
      then lost (the fault suite's long run, docs/reliability.md).
    * An incoming append-entries deletes entries only from the first conflict
      (shoal.raft.appendentries): pysyncobj deleted everything after ``prevLogIdx``, so an
      older or partial batch shortened a log the follower had acknowledged.
    * A new term or vote is stored before it is taken (:meth:`_SyncObj__setCurrentTerm`).
    * Committed entries are applied a slice at a time (:meth:`_SyncObj__applyLogEntries`).
    * A follower asks before it stands for election (shoal.raft.prevote, :meth:`_onTick`;
      its messages go through the transport).
    * A restarted replica takes the membership of its whole log, committed or not
      (:meth:`_adopt_log_membership`)."""

    def __init__(self, *args: Any, pre_vote: PreVote | None = None, **kwargs: Any) -> None:
        # before SyncObj's __init__: it leaves the attributes it finds there out of snapshots
        self._shoal_transmissions = appendentries.Transmissions()
        self._shoal_pre_vote = pre_vote
        self._shoal_log_membership = False  # adopted (after the first ready tick)
        super().__init__(*args, **kwargs)

    def _onTick(self, timeToWait: float = 0.0) -> None:
        if self._shoal_pre_vote is not None:
            self._shoal_pre_vote.before_tick()  # before its election check
        super()._onTick(timeToWait)
        if not self._shoal_log_membership:
            self._adopt_log_membership()

    def _adopt_log_membership(self) -> None:
        """Once, at start (tick thread): apply the membership changes of the log entries not
        applied yet, as Raft has every server use the latest configuration in its log,
        committed or not (Ongaro's thesis, 4.1). pysyncobj applies a change when it appends it,
        and on a restart only when the entry commits — which it learns from a leader. A
        manager killed right after it had appended "add h3" restarted without h3 among its
        voters; pysyncobj refuses a connection from a node it does not know (and the higher
        address dials the lower), so when h3 led the cluster the restarted manager never
        heard a leader: with pre-vote, it never got elected either (CI,
        tests/test_promote_cluster.py). A change from an entry a new leader later
        truncates is undone by pysyncobj, as for one it appended itself."""
        me: Any = self  # pysyncobj's private state
        if not me._SyncObj__transport.ready or me._SyncObj__needLoadDumpFile:
            return  # the dump, and the membership it holds, loads on the first ready tick
        self._shoal_log_membership = True
        start, end = me._SyncObj__raftLastApplied + 1, me._SyncObj__getCurrentLogIndex()
        if end < start:
            return
        for entry in me._SyncObj__getEntries(start, end - start + 1):
            change = me._SyncObj__parseChangeClusterRequest(entry[0])
            if change is not None and me._SyncObj__doChangeCluster(change):
                log.info("Raft: voter %s %s from the log's unapplied entry %d", change[1],
                         "added" if change[0] == "add" else "removed", entry[1])

    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> None:
        handle = super()._SyncObj__onMessageReceived
        if not (isinstance(message, dict) and message.get("type") == "append_entries"
                and "prevLogIdx" in message and message.get("term", -1) >= self._getTerm()):
            return handle(node, message)
        if "transmission" in message:
            whole = self._shoal_transmissions.entry_message(node, message)
            if whole is None:  # start/process: pysyncobj only buffers and answers
                return handle(node, message)
            if "transmission" in whole:  # an early "finish" relabelled: buffer it too
                return handle(node, whole)
            message = whole
        me: Any = self  # pysyncobj's private state
        journal = me._SyncObj__raftLog
        first = journal[0][1]
        trimmed, verified = appendentries.trim(
            message, first, journal[-1][1], lambda i: int(journal[i - first][2]))
        committed = me._SyncObj__raftCommitIndex
        handle(node, trimmed)
        if verified is None:
            return
        # pysyncobj commits up to min(leader's commit, its whole log): the tail beyond what
        # the message verified may be another term's entries
        allowed = max(committed, min(int(message["commit_index"]), verified))
        if me._SyncObj__raftCommitIndex > allowed:
            me._SyncObj__raftCommitIndex = allowed
            journal.setRaftCommitIndex(allowed)
        self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=verified + 1, success=True)

    def _SyncObj__applyLogEntries(self) -> bool:
        """Apply committed entries for at most ``APPLY_SLICE`` seconds (one entry at least);
        the rest on the next ticks, which come at once (raft/eager.py ``idle_wait``).

        pysyncobj applies every committed entry in one go on its tick thread, and the same
        thread sends the leader's append-entries and reads a follower's. A 1,000-task scale
        is ~1 MiB of leader batch as creates (~70 ms to decode and apply on an idle core; schema
        5's spawns are 12 times smaller and a third of the time); a 10,000-task
        one ~10 entries committed together, ~0.7 s in one tick — longer than the 0.35 s
        election timeout: the followers heard nothing and elected another leader (and on
        issue 16's loaded lab a 1,000-task scale did it already). Sliced, the tick between
        two slices sends and reads the heartbeats."""
        me: Any = self
        commit = me._SyncObj__raftCommitIndex
        if commit - me._SyncObj__raftLastApplied <= 1:
            return bool(super()._SyncObj__applyLogEntries())
        started, need = time.monotonic(), False
        try:
            while me._SyncObj__raftLastApplied < commit:
                before = me._SyncObj__raftLastApplied
                me._SyncObj__raftCommitIndex = before + 1  # (pysyncobj's loop: one entry)
                need = bool(super()._SyncObj__applyLogEntries()) or need
                if me._SyncObj__raftLastApplied == before or \
                        time.monotonic() - started >= APPLY_SLICE:
                    break  # (an entry it could not apply is pysyncobj's to log and retry)
        finally:
            me._SyncObj__raftCommitIndex = commit
        return need

    def _SyncObj__setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        """Store the term and vote, then take them; a failed store changes nothing.

        pysyncobj took them in memory first: when the store failed (a full disk), the
        exception left the new term in memory and skipped what followed it. A leader asked
        for its vote in a higher term then stayed leader *in that term* — a term it never
        won, beside the candidate that did: two leaders in one term, each committing its own
        entry at the same index (the full-disk test's fork, tests/test_faults_disk.py). Here
        the exception leaves the node as it was: it ignores the message, and its leadership
        lapses on ``leaderFallbackTimeout`` once no follower answers its old term."""
        me: Any = self
        journal = me._SyncObj__raftLog
        meta = getattr(journal, "_FileJournal__meta", None)
        before = {k: meta[k] for k in ("currentTerm", "votedForNodeId") if k in meta} \
            if isinstance(meta, dict) else None
        try:
            journal.setCurrentTerm(term, votedForNodeId)
        except BaseException:
            if isinstance(meta, dict) and before is not None:  # (not half-stored either)
                meta.pop("currentTerm", None)
                meta.pop("votedForNodeId", None)
                meta.update(before)
            raise
        me._SyncObj__raftCurrentTerm = term
        me._SyncObj__votedForNodeId = votedForNodeId

    def _SyncObj__sendNextNodeIdx(self, node: Any, reset: bool = False,
                                  nextNodeIdx: int | None = None,
                                  success: bool = False) -> None:
        if nextNodeIdx is None:
            nextNodeIdx = self._SyncObj__getCurrentLogIndex() + 1
        self._SyncObj__transport.send(node, {
            "type": "next_node_idx", "next_node_idx": nextNodeIdx, "reset": reset,
            "success": success, "term": self._getTerm()})


class _EncodeOnPickle:
    """The consumer's state, pickled as the ``bytes`` of ``state_to_bytes`` (so the dump holds
    exactly what an eager ``_serialize`` put there, and any shoal reads it).

    pysyncobj calls ``_serialize`` on the tick thread and pickles its result in a child it
    forks right after (``fullDumpFile``; without a dump file, on the tick thread itself). The
    child holds a copy of the state as of the fork, taken by the tick thread, the only
    thread that changes it, between two applies: consistent without the lock — which the
    child must not take (another thread may have held it at the fork, forever in the
    child)."""

    def __init__(self, consumer: ReplicatedState) -> None:
        self.state = consumer.state  # (a later snapshot install replaces the consumer's)

    def __reduce__(self) -> tuple[type[bytes], tuple[bytes]]:
        return bytes, (state_to_bytes(self.state),)


class ReplicatedState(SyncObjConsumer):
    """pysyncobj consumer holding the ClusterState. Only ``apply`` is replicated."""

    def __init__(self, recent: int = 4096) -> None:
        # attributes set before super().__init__() are excluded from snapshots
        self._lock = threading.RLock()
        self._listeners: list[Callable[[int], None]] = []
        # the last applied commands as (index after applying, blob): what workers fetch to
        # catch up (shoal.node.feed); emptied when a snapshot replaces the state
        self._recent: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=recent)
        # the last applied command decoded, with its index: the event log reads it right after
        # the apply (decoding a 1,000-task batch again cost the leader ~10 % during a scale)
        self._last: tuple[int, Any] = (0, None)
        super().__init__()
        self.state = ClusterState()

    @replicated
    def apply(self, blob: bytes) -> dict[str, Any]:
        try:
            cmd = msgpack.unpackb(blob, raw=False, strict_map_key=False)
        except Exception as exc:
            with self._lock:
                self.state.index += 1
                self._recent.append((self.state.index, blob))
                self._last = (self.state.index, blob)  # (not a dict: no events of its own)
            return {"error": {"code": "invalid", "message": f"undecodable command: {exc}",
                              "field": ""}}
        with self._lock:
            before = self.state.index
            try:
                result = self.state.apply(cmd)
            except Exception as exc:  # never out of here: pysyncobj would re-apply it on
                # every tick forever and every replica would stop committing (wedged)
                log.error("Raft: the state machine raised on command %d (%r); recorded as "
                          "a rejection", before + 1, exc)
                self.state.index = before + 1
                result = {"error": {"code": "invalid", "field": "",
                                    "message": f"malformed command: {exc!r}"}}
            index = self.state.index
            self._recent.append((index, blob))
            self._last = (index, cmd)
        for cb in list(self._listeners):
            try:
                cb(index)
            except Exception:  # a listener must never break the tick thread
                log.exception("state listener failed")
        return result

    def _serialize(self) -> dict[str, Any]:
        """What a snapshot (dump file, snapshot sent to a follower) holds: the state as
        msgpack of plain values (shoal.raft.wire), never a pickle of our classes, so a later
        model reads it (schema 2; shoal.raft.schema migrates schema 1's pickled dumps).

        The bytes are made when pysyncobj pickles the dump (:class:`_EncodeOnPickle`): in its
        forked compaction child, off the tick thread (encoding 100k tasks takes seconds —
        longer than an election timeout — and every write waited for it)."""
        return {"state_v2": _EncodeOnPickle(self)}

    def _deserialize(self, data: dict[str, Any]) -> None:
        with self._lock:
            if "state_v2" in data:
                self.state = state_from_bytes(data["state_v2"])
            else:  # a schema-1 snapshot from a shoal 0.1 leader (pickled ClusterState)
                self.state = migrate.upgrade_state(data["state"])
            self._recent.clear()
            self._last = (0, None)
        for cb in list(self._listeners):
            cb(self.state.index)


class RaftStore:
    """A node's handle on the replicated state: propose writes, read snapshots.

    ``self_addr`` None makes a read-only replica: it receives the log, never votes and does
    not count for quorum; its writes are forwarded to the leader. (The agent does not use
    this: workers hold no Raft secret and are fed over mTLS, see shoal.node.feed.)
    """

    def __init__(
        self,
        self_addr: str | None,
        peers: list[str],
        data_dir: Path,
        password: str | None,  # Raft secret; None = plaintext (benchmarks only)
        config: RaftConfig | None = None,
        bind_addr: str | None = None,
        persist: bool = True,
        link_up: Callable[[str], bool] | None = None,  # tests: see AdmissionTransport
        extra_passwords: tuple[str, ...] = (),  # also accepted (a Raft secret rotation)
    ) -> None:
        self.config = config or RaftConfig()
        self.config.validate()
        self.self_addr = self_addr
        self.consumer = ReplicatedState()
        migrate.read_legacy_snapshots()  # a snapshot from a 0.1 leader must load too
        data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None
        if persist:
            self._lock_fd = _lock_data_dir(data_dir, self.config.data_dir_lock_timeout)
            try:
                if migrate.migrate_dump(data_dir / "raft.dump"):
                    log.warning("Raft: migrated the schema-1 dump in %s (original kept as "
                                "raft.dump.schema1)", data_dir)
                _check_persistence(data_dir, can_refetch=self_addr is None or bool(
                    set(peers) - {self_addr}))
            except BaseException:
                os.close(self._lock_fd)
                raise
        # the Raft secret's keyring (None: plaintext, benchmarks); rotated live by
        # shoal.node.keys through ``set_secrets``
        self.encryptor: AeadEncryptor | None = AeadEncryptor(password, extra_passwords) \
            if password else None
        self._role_listeners: list[Callable[[], None]] = []
        # a follower that loses its leader's connection stands soon (shoal.raft.leaderloss)
        self._leader_loss = LeaderLoss(self.config.leader_lost_wait)
        # and one that alone lost it asks before it stands (shoal.raft.prevote)
        self._pre_vote = PreVote(
            self.config.raft_min_timeout - self.config.append_entries_period,
            enabled=self.config.pre_vote)
        conf = SyncObjConf(
            password=None,  # encryption: AeadEncryptor, installed by the transport below
            bindAddress=bind_addr,
            dynamicMembershipChange=True,
            raftMinTimeout=self.config.raft_min_timeout,
            raftMaxTimeout=self.config.raft_max_timeout,
            appendEntriesPeriod=self.config.append_entries_period,
            autoTickPeriod=self.config.tick_period,
            connectionTimeout=self.config.connection_timeout,
            connectionRetryTime=self.config.connection_retry_time,
            leaderFallbackTimeout=self.config.leader_fallback_timeout,
            onStateChanged=self._state_changed,
            logCompactionMinEntries=self.config.log_compaction_min_entries,
            logCompactionMinTime=self.config.log_compaction_min_time,
            journalFile=str(data_dir / "raft.journal") if persist else None,
            fullDumpFile=str(data_dir / "raft.dump") if persist else None,
        )
        # Raft messages sealed with AES-256-GCM under the password (pysyncobj's own Fernet
        # is several times slower), incoming connections only from members' addresses:
        # see shoal.raft.transport
        self._sync = _SafeSyncObj(self_addr, [p for p in peers if p != self_addr], conf=conf,
                             consumers=[self.consumer],
                             transportClass=functools.partial(
                                 AdmissionTransport, admit=self._admit,
                                 admit_member=self._admit_member, link_up=link_up,
                                 encryptor=self.encryptor,
                                 lost_peer=self._lost_peer, pre_vote=self._pre_vote),
                             pre_vote=self._pre_vote)
        self._leader_loss.attach(self._sync)
        self._pre_vote.attach(self._sync)
        harden_journal(self._sync)
        # wake the tick thread on propose, ship entries/commits at the end of their tick
        self._eager = EagerReplication(self._sync)
        self._trusted = False  # see is_ready
        # the read barrier the next linearizable reads will share (see read_barrier)
        self._barrier: asyncio.Future[int] | None = None

    def _lost_peer(self, node: Any) -> None:
        """(tick thread) A voter connection closed."""
        self._pre_vote.on_disconnected(node)
        self._leader_loss.on_disconnected(node)

    def _admit(self, ip: str) -> bool:
        """Is ``ip`` the address of a manager? (tick thread; no nodes yet: bootstrap).
        Workers hold no Raft secret and never connect (shoal.node.feed); a demoted one
        that kept a copy is refused.

        A Raft peer of this node's own configuration is one too: a manager restarted from
        an older dump knows of a later promotion from its peer list (the agent saves the
        voters) before its replica has applied it, and the promoted node may be the leader
        it has to catch up from."""
        sync = getattr(self, "_sync", None)  # (None while SyncObj builds its transport)
        if sync is not None and any(n.id.rpartition(":")[0].strip("[]") == ip
                                   for n in sync.otherNodes):
            return True
        with self.consumer._lock:
            nodes = self.consumer.state.nodes
            return not nodes or any(n.addr == ip and n.role is NodeRole.MANAGER
                                    for n in nodes.values())

    def _admit_member(self, ip: str) -> bool:
        """Is ``ip`` the address of any node of the cluster, or a Raft peer? (tick thread)
        For a connection that claims to be a voter this replica does not know of: its state
        may predate that node's promotion (shoal.raft.transport, "Strangers")."""
        if self._admit(ip):
            return True
        with self.consumer._lock:
            return any(n.addr == ip for n in self.consumer.state.nodes.values())

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> Snapshot:
        with self.consumer._lock:
            return self.consumer.state.snapshot()

    @property
    def index(self) -> int:
        return self.consumer.state.index

    def changes_since(self, after: int) -> tuple[int, list[bytes]] | None:
        """The applied commands after index ``after`` (and the index they lead to), in order;
        None when they are no longer all kept (the caller then needs :meth:`full_state`)."""
        c = self.consumer
        with c._lock:
            index = c.state.index
            if after >= index:
                return index, []
            if not c._recent or c._recent[0][0] > after + 1:
                return None
            return index, [blob for i, blob in c._recent if i > after]

    def command_at(self, index: int) -> Any:
        """The applied command that led to ``index``, decoded, if it is the latest one (the
        event log's fast path, called right after each apply); None otherwise. Read-only: it
        is the very value the state machine applied."""
        c = self.consumer
        with c._lock:
            last_index, cmd = c._last
            return cmd if last_index == index else None

    def full_state(self) -> tuple[int, bytes]:
        """The whole state as bytes (shoal.raft.wire) and its index; in schema 1's shape while
        the cluster's schema is 1 (a worker may still run shoal 0.1).

        Encoded from a snapshot, outside the state lock (the records are immutable; only the
        dicts holding them are copied under it): encoding 100k tasks takes ~10 s, and every
        apply on the tick thread waited for the lock meanwhile (bench/snapshot_bench.py)."""
        with self.consumer._lock:
            snap = self.consumer.state.snapshot()
        state = ClusterState(**{f.name: getattr(snap, f.name)
                                for f in dataclasses.fields(ClusterState)})
        return snap.index, state_to_bytes(state, legacy=state.cluster.schema < 2)

    def add_listener(self, cb: Callable[[int], None]) -> None:
        """``cb(index)`` runs on the tick thread after every applied command."""
        self.consumer._listeners.append(cb)

    def add_role_listener(self, cb: Callable[[], None]) -> None:
        """``cb()`` runs on the tick thread when this replica's Raft role changes (follower,
        candidate, leader): who waits to act on leadership need not poll for it."""
        self._role_listeners.append(cb)

    def _state_changed(self, _old: Any, _new: Any) -> None:
        for cb in list(self._role_listeners):
            try:
                cb()
            except Exception:
                log.exception("Raft role listener failed")

    def is_leader(self) -> bool:
        """True only while this node leads *and* hears from a majority."""
        return bool(self._sync._isLeader() and self._sync.hasQuorum)

    def term(self) -> int:
        return int(self._sync._getTerm())

    def leader_addr(self) -> str | None:
        leader = self._sync._getLeader()
        return None if leader is None else str(leader.id if hasattr(leader, "id") else leader)

    def is_ready(self) -> bool:
        """Has this replica caught up with the cluster, so acting on it is safe?

        pysyncobj's own ``isReady`` means "applied up to the commit index the leader sent".
        After every manager restarted, a new leader only knows the commit index it persisted
        (pysyncobj saves it about once a second, so up to a second old) until it commits an
        entry of its own term: replicas "ready" at that index lack the newest commands — a
        worker would stop tasks it does not see yet. So also wait, once per store, until an
        entry of the current term is applied (the new leader's no-op): everything committed
        before is then applied too (Raft's leader completeness)."""
        if self._trusted:
            return True
        sync = self._sync
        if not sync.isReady():
            return False
        try:  # (read from the event loop while the tick thread appends: may race, retried)
            applied = sync._SyncObj__raftLastApplied
            entries = sync._SyncObj__getEntries(applied, 1)
            current = bool(entries) and entries[0][2] == sync._getTerm()
        except AttributeError:  # another pysyncobj version: its own readiness
            current = True
        except (IndexError, KeyError, TypeError, ValueError):
            return False
        self._trusted = current
        return current

    def status(self) -> dict[str, Any]:
        return dict(self._sync.getStatus())

    def voters(self) -> list[str]:
        nodes = [n.id for n in self._sync.otherNodes]
        if self.self_addr:
            nodes.append(self.self_addr)
        return sorted(nodes)

    def peer_connected(self, addr: str) -> bool:
        for n in self._sync.otherNodes:
            if n.id == addr:
                return bool(self._sync.isNodeConnected(n))
        return False

    async def read_barrier(self, timeout: float | None = None) -> None:
        """Return once this replica has applied every write committed before the call, as
        confirmed by a leader that still holds a majority; then :meth:`snapshot` is a
        linearizable read. Raises NotReady if that cannot be confirmed within ``timeout``
        (default ``write_timeout``): no leader, no quorum, or this node is cut off — a
        deposed leader that still believes it leads cannot commit, so it never answers.

        How: a ``read_barrier`` no-op goes through the log (forwarded to the leader by
        pysyncobj from a follower) and the read waits until this replica applies it. Its
        commit proves that a leader of the newest term replicated it to a majority after the
        read began; its index is above every write acknowledged before (Raft's leader
        completeness), and this replica applies in log order. pysyncobj offers no read
        index or lease (its leader learns of a lost majority only after
        ``leader_fallback_timeout``, and a quorum heartbeat round would need its private
        state), and the no-op costs one small log entry — the same network round as a
        heartbeat round. Reads waiting at the same moment share one barrier; a read never
        joins a barrier sent before it began (that one may order before a write the reader
        saw acknowledged). Every replica applies the no-op alike (shoal 0.1 records it as an
        unknown op: same index), so the state stays identical on all of them."""
        loop = asyncio.get_running_loop()
        fut = self._barrier
        if fut is None or fut.get_loop() is not loop:
            fut = self._barrier = loop.create_future()
            loop.call_soon(self._send_barrier, fut)
        wait = timeout if timeout is not None else self.config.write_timeout
        try:
            err = await asyncio.wait_for(asyncio.shield(fut), wait)
        except TimeoutError:
            raise NotReady(
                f"could not confirm within {wait:g}s that this manager's copy is current (no "
                "leader, no quorum, or this manager is cut off from the majority)") from None
        if err != FAIL_REASON.SUCCESS:
            raise NotReady(f"could not confirm that this manager's copy is current (Raft "
                           f"fail reason {err}: leader changed or missing); retry")

    def _send_barrier(self, fut: asyncio.Future[int]) -> None:
        if self._barrier is fut:
            self._barrier = None  # later reads need a barrier sent after they began
        loop = fut.get_loop()

        def settle(err: int) -> None:
            if not fut.done():
                fut.set_result(err)

        def done(_result: Any, err: int) -> None:  # tick thread, after applying it here
            loop.call_soon_threadsafe(settle, err)

        self.consumer.apply(_BARRIER, callback=done)
        self._eager.wake()

    # ------------------------------------------------------------------ writing
    def _encode(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """``cmd`` as every replica can apply it: in schema 1 while the cluster is at schema 1,
        without the fields added later while it is below schema.SCHEMA (shoal.raft.schema;
        raises ValidationError for what the cluster's schema cannot express)."""
        op = cmd.get("op")
        if op not in ("service_create", "service_update", "leader", "node_add", "node_update"):
            return cmd  # carries no spec or node fields: the same in every schema
        with self.consumer._lock:
            state = self.consumer.state
            writes = state.cluster.schema
            if writes >= schema.NESTED:
                return schema.encode_command(cmd, {}, writes)  # (as is, at schema.SCHEMA)
            creates = op == "leader" and any(
                isinstance(o, (list, tuple)) and o and o[0] == "create"
                for o in cmd.get("ops") or ())
            specs = {sid: to_dict(svc.spec) for sid, svc in state.services.items()} \
                if creates else {}
        return schema.encode_command(cmd, specs)

    async def propose(self, cmd: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Replicate ``cmd``; return the state machine's result or raise.

        Raises CommandRejected (the state machine said no), WriteTimeout (no commit in
        time; it may still apply later) or NotReady.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[Any, int]] = loop.create_future()

        def done(result: Any, err: int) -> None:
            def settle() -> None:
                if not fut.done():
                    fut.set_result((result, err))
            loop.call_soon_threadsafe(settle)

        blob = msgpack.packb(self._encode(cmd), use_bin_type=True)
        self.consumer.apply(blob, callback=done)
        self._eager.wake()
        wait = timeout if timeout is not None else self.config.write_timeout
        try:
            result, err = await asyncio.wait_for(fut, wait)
        except TimeoutError:
            raise WriteTimeout(
                f"the cluster did not commit the change within {wait:g}s "
                "(no leader or no quorum?); it may still be applied") from None
        if err != FAIL_REASON.SUCCESS:
            reason = {FAIL_REASON.MISSING_LEADER: "no leader (election in progress or quorum "
                      "lost)", FAIL_REASON.QUEUE_FULL: "write queue full"}.get(
                          err, f"leader changed before the write committed (reason {err})")
            raise WriteTimeout(f"write not committed: {reason}")
        if not isinstance(result, dict):
            raise NotReady(f"unexpected state machine result {result!r}")
        if "error" in result:
            e = result["error"]
            raise CommandRejected(e.get("code", "rejected"), e.get("message", "rejected"),
                                  e.get("field", ""))
        return result

    def _membership_start(self, fn: Callable[..., None], addr: str) -> asyncio.Future[int]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()

        def settle(err: int) -> None:
            if not fut.done():
                fut.set_result(err)

        def done(_result: Any, err: int) -> None:
            loop.call_soon_threadsafe(settle, err)

        fn(addr, callback=done)
        self._eager.wake()
        return fut

    def start_add_voter(self, addr: str) -> asyncio.Future[int]:
        """Begin adding a voter; the future gets the pysyncobj fail reason (0 = success).

        The change commits only once the new member runs and acknowledges (the new
        configuration counts it), so callers must not wait for it before the new node
        has been told to start.
        """
        return self._membership_start(self._sync.addNodeToCluster, addr)

    async def _membership(self, fn: Callable[..., None], addr: str, timeout: float) -> None:
        fut = self._membership_start(fn, addr)
        try:
            err = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise WriteTimeout(f"Raft membership change for {addr} did not commit in "
                               f"{timeout:g}s") from None
        if err != FAIL_REASON.SUCCESS:
            raise WriteTimeout(f"Raft membership change for {addr} failed (reason {err})")

    async def add_voter(self, addr: str, timeout: float = 10.0) -> None:
        await self._membership(self._sync.addNodeToCluster, addr, timeout)

    async def remove_voter(self, addr: str, timeout: float = 10.0) -> None:
        await self._membership(self._sync.removeNodeFromCluster, addr, timeout)

    def transfer_leadership(self, target: str | None = None) -> None:
        """Hand leadership to ``target`` (or the most caught-up follower); leader only."""
        # on pysyncobj's tick thread: it sends on connections that thread also uses
        self._eager.call_soon(lambda: self._sync.transferLeadership(target))

    def close(self) -> None:
        self._sync.destroy()
        self._eager.wake()  # (an idle tick thread would notice only at its next timer)
        # the wake-up pipe may be closed only once the tick thread (which polls it) is gone
        thread = getattr(self._sync, "_SyncObj__thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
        if thread is None or not thread.is_alive():
            self._eager.close()
            if self._lock_fd is not None:  # (a compaction child may hold it a bit longer)
                with contextlib.suppress(OSError):
                    os.close(self._lock_fd)
                self._lock_fd = None
