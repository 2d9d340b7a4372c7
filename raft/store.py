"""The replicated store: ClusterState behind pysyncobj, bridged to asyncio.

Owns: the SyncObj instance (Raft log, elections, membership, persistence), the
threading boundary between pysyncobj's tick thread and the agent's event loop, and
translating pysyncobj fail reasons into shoal.raft.errors. Must not touch: cluster
policy (what to write is decided by callers), the network beyond Raft's own port.

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
import functools
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated

from shoal.raft.eager import EagerReplication
from shoal.raft.errors import CommandRejected, NotReady, WriteTimeout
from shoal.raft.models import NodeRole
from shoal.raft.state import ClusterState, Snapshot
from shoal.raft.transport import AdmissionTransport, AeadEncryptor
from shoal.raft.wire import state_to_bytes

# pysyncobj 0.3.17 (win_inet_pton.py) replaces socket.inet_ntop on every platform with a
# Windows-only version; put the C function back for everything else in the process.
socket.inet_ntop = _socket.inet_ntop

log = logging.getLogger("shoal.raft")


@dataclass
class RaftConfig:
    """Timing and persistence of the Raft group (see docs/architecture.md#raft-tuning).

    The defaults target a leader failover (kill -9 → first accepted write) under 1 s on a
    LAN while not flapping on a busy 2-core machine.
    """

    # Election timeout range, seconds. A follower that hears nothing from the leader for a
    # random time in [min, max] starts an election. Lower = faster failover, but more
    # spurious elections when the machine stalls. pysyncobj default 0.4/1.4.
    raft_min_timeout: float = 0.35
    raft_max_timeout: float = 0.7
    # Leader heartbeat / append-entries batch period, seconds. Must be < min_timeout / 3.
    append_entries_period: float = 0.05
    # pysyncobj tick period, seconds: how often queued writes are picked up. Each
    # sequential write waits ~1-3 ticks. Lower = lower write latency, more idle CPU.
    tick_period: float = 0.02
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

    def validate(self) -> None:
        if not self.raft_min_timeout > 3 * self.append_entries_period:
            raise ValueError("raft_min_timeout must be > 3 x append_entries_period")
        if not self.raft_max_timeout > self.raft_min_timeout:
            raise ValueError("raft_max_timeout must be > raft_min_timeout")
        if not self.leader_fallback_timeout > self.append_entries_period:
            raise ValueError("leader_fallback_timeout must be > append_entries_period")
        if self.write_timeout <= 0 or self.tick_period <= 0:
            raise ValueError("write_timeout and tick_period must be > 0")


class ReplicatedState(SyncObjConsumer):
    """pysyncobj consumer holding the ClusterState. Only ``apply`` is replicated."""

    def __init__(self, recent: int = 4096) -> None:
        # attributes set before super().__init__() are excluded from snapshots
        self._lock = threading.RLock()
        self._listeners: list[Callable[[int], None]] = []
        # the last applied commands as (index after applying, blob): what workers fetch to
        # catch up (shoal.node.feed); emptied when a snapshot replaces the state
        self._recent: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=recent)
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
            return {"error": {"code": "invalid", "message": f"undecodable command: {exc}",
                              "field": ""}}
        with self._lock:
            result = self.state.apply(cmd)
            index = self.state.index
            self._recent.append((index, blob))
        for cb in list(self._listeners):
            try:
                cb(index)
            except Exception:  # a listener must never break the tick thread
                log.exception("state listener failed")
        return result

    def _deserialize(self, data: dict[str, Any]) -> None:
        with self._lock:
            super()._deserialize(data)
            self._recent.clear()
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
    ) -> None:
        self.config = config or RaftConfig()
        self.config.validate()
        self.self_addr = self_addr
        self.consumer = ReplicatedState()
        data_dir.mkdir(parents=True, exist_ok=True)
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
            logCompactionMinEntries=self.config.log_compaction_min_entries,
            logCompactionMinTime=self.config.log_compaction_min_time,
            journalFile=str(data_dir / "raft.journal") if persist else None,
            fullDumpFile=str(data_dir / "raft.dump") if persist else None,
        )
        # Raft messages sealed with AES-256-GCM under the password (pysyncobj's own Fernet
        # is several times slower), incoming connections only from members' addresses:
        # see shoal.raft.transport
        self._sync = SyncObj(self_addr, [p for p in peers if p != self_addr], conf=conf,
                             consumers=[self.consumer],
                             transportClass=functools.partial(
                                 AdmissionTransport, admit=self._admit,
                                 encryptor=AeadEncryptor(password) if password else None))
        # wake the tick thread on propose, ship entries/commits at the end of their tick
        self._eager = EagerReplication(self._sync)

    def _admit(self, ip: str) -> bool:
        """Is ``ip`` the address of a manager? (tick thread; no nodes yet: bootstrap).
        Workers hold no Raft secret and never connect (shoal.node.feed)."""
        with self.consumer._lock:
            nodes = self.consumer.state.nodes
            return not nodes or any(n.addr == ip and n.role is NodeRole.MANAGER
                                    for n in nodes.values())

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

    def full_state(self) -> tuple[int, bytes]:
        """The whole state as bytes (shoal.raft.wire) and its index."""
        with self.consumer._lock:
            return self.consumer.state.index, state_to_bytes(self.consumer.state)

    def add_listener(self, cb: Callable[[int], None]) -> None:
        """``cb(index)`` runs on the tick thread after every applied command."""
        self.consumer._listeners.append(cb)

    def is_leader(self) -> bool:
        """True only while this node leads *and* hears from a majority."""
        return bool(self._sync._isLeader() and self._sync.hasQuorum)

    def term(self) -> int:
        return int(self._sync._getTerm())

    def leader_addr(self) -> str | None:
        leader = self._sync._getLeader()
        return None if leader is None else str(leader.id if hasattr(leader, "id") else leader)

    def is_ready(self) -> bool:
        return bool(self._sync.isReady())

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

    # ------------------------------------------------------------------ writing
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

        blob = msgpack.packb(cmd, use_bin_type=True)
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
        self._sync.transferLeadership(target)

    def close(self) -> None:
        self._sync.destroy()
        # the wake-up pipe may be closed only once the tick thread (which polls it) is gone
        thread = getattr(self._sync, "_SyncObj__thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
        if thread is None or not thread.is_alive():
            self._eager.close()
