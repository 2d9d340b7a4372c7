"""A worker's copy of the cluster state, fed by the managers over mTLS — no Raft on workers.

Owns: the worker's ``ClusterState`` replica, keeping it current by long-polling a manager
for the commands applied since its index (or, when it is too far behind, the whole state),
failing over between managers, and sending the worker's own few writes (task status reports,
leaving) to a manager. Must not touch: Raft, the runtime.

Why not a read-only pysyncobj replica: every holder of the Raft secret is trusted by
pysyncobj — its messages are unpickled, it can claim leadership, and any command it forwards
is applied. A compromised worker would own the cluster. As in Swarm (workers talk to the
managers' dispatcher, never to Raft), workers here hold no Raft secret: managers admit only
managers on the Raft port, and the manager side of this feed (shoal.node.control.dispatcher:
``state_since``, ``worker_report``) accepts from a worker only status reports for its own
tasks and its own removal.

The replica applies exactly the commands the managers applied, in order, with the same
deterministic ``ClusterState.apply``, so its index and content match theirs. Listeners get
``cb(index)`` after each batch, on the event loop (RaftStore calls them on its tick thread;
the agent's listener works from both).

Also owns the manager side's reply building (``FeedServer``, used by the dispatcher): at 100
workers every commit answers ~100 held polls, nearly all asking "after the same index", and
a join storm asks for the whole state ~100 times at once. So replies are encoded once per
(after, index) and shared (``reply_cache`` entries), the whole state is built one poll at a
time and encoded once per index, shared by every poll that asks for it, replies above
``compress_min`` bytes are zlib-compressed for workers that ask for it (``{"z": ...}``
wrapping the same message), and a woken poll waits ``batch_wait`` so a burst of commits goes
out in one reply. Per-node filtering (``answer_by``, ``classify``): a commit only one
node needs now (its task below RUNNING, or a health-log refresh that changes no task's
state, health or address) answers only that node's poll; the others get it, unchanged and
in order, with their next needed commit or after ``defer_max``; a task's new RUNNING view
(what the other nodes' mesh and DNS add) reaches them within ``soon_wait``. Every worker
still applies every command, so its replica stays the managers' state at its index (the
mesh needs every service's endpoints: docs/scaling.md says why a filtered replica was not
built).
``FeedStats`` counts what was sent (``shoal_feed_*`` metrics).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import math
import random
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from shoal.node.errors import FeedError, PeerError, peer_call
from shoal.raft.errors import CommandRejected, NotReady, WireError, WriteTimeout
from shoal.raft.models import NodeRole, TaskState
from shoal.raft.state import ClusterState, Snapshot
from shoal.raft.wire import state_from_bytes

log = logging.getLogger("shoal.feed")

# (addr, path, body, timeout) → reply
CallBytes = Callable[[str, str, dict[str, Any], float], Awaitable[bytes]]
CallJson = Callable[[str, str, dict[str, Any], float], Awaitable[dict[str, Any]]]
# (addr, timeout) → whether addr accepts a TCP connection within timeout
Probe = Callable[[str, float], Awaitable[bool]]


async def tcp_probe(addr: str, timeout: float) -> bool:
    """Whether ``addr`` ("ip:port") accepts a TCP connection within ``timeout`` seconds
    (closed at once; a refusal raises OSError)."""
    host, _, port = addr.rpartition(":")
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(host, int(port))
    except TimeoutError:
        return False
    writer.close()
    return True


@dataclass
class FeedConfig:
    """How a worker follows the managers."""

    # How long a manager may hold a poll open when nothing changes, seconds. Longer = fewer
    # idle requests; a dead manager is noticed through the connection, not this.
    wait: float = 20.0
    # Pause before asking the next manager after a failure, seconds.
    retry: float = 0.3
    # Cut-off mode (after a failed or interrupted poll, until a poll succeeds): each attempt
    # first checks that the manager's port accepts a TCP connection within this long,
    # seconds, and tries the next manager at once if not. A healed link is then noticed
    # within about this long, instead of after TCP's SYN backoff (1, 2, 4 s…) or the
    # retransmissions of a reply the manager sent while the link was down. Costs one SYN
    # per this long while no manager is reachable. 0 = no probe (needs the agent's probe).
    probe_timeout: float = 0.25
    # ... and while a manager keeps failing the check, the next check of it starts this
    # much later at most (the gap doubles from probe_timeout; each with some jitter),
    # seconds. A manager too busy to accept connections drops SYNs as a dead link does:
    # 100 cut-off workers checking 5 managers every 0.25 s were 2,000 connections a second,
    # enough to keep a stalled manager's accept queue full (a 100-worker lab). Longer =
    # fewer connections, a healed link noticed later.
    probe_backoff_max: float = 0.5
    # Deadline of one status report, seconds (tried on every known manager in turn).
    write_timeout: float = 5.0
    # Worker side: ask managers for zlib-compressed replies. Off = plain msgpack (what a
    # shoal 0.1 worker gets; managers answer both).
    compress: bool = True
    # --- manager side (FeedServer; read by the dispatcher) ---
    # Replies of at least this many bytes are compressed for workers that ask, bytes.
    # Smaller ones (one status command: ~200 B) are not worth a zlib stream's header.
    compress_min: int = 1024
    # After a held poll is woken by a commit, wait this long before answering, seconds, so
    # that a burst of commits (a scale, a node's task reports) goes out as one reply instead
    # of one reply per commit per worker. Adds at most this much to a task's start. 0 = off.
    batch_wait: float = 0.01
    # Encoded increment replies kept for reuse, keyed by (after, index, ...): workers at the
    # same index share one encoding. 0 = encode every reply.
    reply_cache: int = 32
    # Per-node filtering of wake-ups: a worker's held poll is not answered for commits it
    # does not need yet — another node's task reporting a state below RUNNING (image pull
    # progress, waiting for a secret) or refreshing its health log without changing its
    # health, which nothing on a worker reads (``classify``) — for up to this
    # long, seconds; they go out, unchanged and in order, with the next reply it needs (so
    # its replica stays exactly the managers' at its index, only later). In a start storm
    # with image pulls most status commits are such reports; in an idle cluster with
    # health checks, nearly all. Longer = fewer replies; other nodes' starting tasks (and
    # the ``shoal_tasks`` gauge on workers) lag by up to this much. 0 = answer every commit.
    defer_max: float = 5.0
    # ... and answer anyway once this many commands are waiting (well below the 4,096 the
    # managers keep, so a deferring worker never falls back to the whole state).
    defer_commands: int = 512
    # ... and for up to this long, seconds, for a commit the other workers need soon but
    # not at once: another node's task reporting RUNNING with a new (state, health,
    # address), which their mesh and DNS add (a task leaving them — unhealthy, ended — goes
    # out at once). In a start storm (a scale, the replacements after nodes fail) each
    # report answered nearly every held poll: ~100 replies per report at 100 workers, every
    # worker woken to decode and apply each one; now each worker gets at most one reply per
    # this long for them. Costs: a new task joins the other nodes' balancers and DNS up to
    # this much later (its own node has its report at once). 0 = at once.
    soon_wait: float = 0.25


@dataclass
class FeedStats:
    """What a manager's feed sent (read by the metrics collector). ``kind``: "commands"
    (an increment), "state" (the whole state), "empty" (a poll that timed out)."""

    replies: dict[str, int] = field(default_factory=lambda: collections.Counter())
    bytes: dict[str, int] = field(default_factory=lambda: collections.Counter())
    encodes: int = 0  # replies encoded (the rest came from the cache)
    compressed: int = 0  # replies sent compressed
    held: int = 0  # polls held open right now
    deferred: int = 0  # polls not answered at a commit because it was not for that worker
    catchups_waiting: int = 0  # whole-state polls waiting for the one being built


_RUNNING = int(TaskState.RUNNING)
_TERMINAL = int(TaskState.COMPLETE)
# What a worker reads of another node's task status: (state, health, address).
MeshView = tuple[int, str, str]
_SEEN_MAX = 200_000  # task views remembered by FeedServer (forgotten all at once beyond)


class Need(enum.IntEnum):
    """How soon the workers other than a status report's own node need the command."""

    LATER = 0  # within defer_max: nothing on another worker reads what it changes
    SOON = 1  # within soon_wait: a task's new view for the mesh and DNS
    NOW = 2  # at once (everything that is not a status report of the above kinds)


def classify(blob: bytes, seen: dict[str, MeshView] | None = None) -> tuple[str | None, Need]:
    """Which node needs the command ``blob`` at once, and how soon the others do.

    ``(node, LATER)``: a ``task_status`` (or a ``task_statuses`` whose every report is such)
    reporting a state below RUNNING, or (with ``seen``: the view of each task's previous
    report, updated here) one that leaves the task's (state, health, address) as its
    previous report had it — a health-log refresh, a failing streak counting up. On other
    workers nothing reads what those change: the mesh and DNS use RUNNING tasks' addresses
    and health (and terminal ones, which are above RUNNING), the overlay uses addresses the
    leader assigned, a registry fetch asks "at most RUNNING", which stays true.
    ``(node, SOON)``: some report is a RUNNING task's new view (it started, got its address,
    became healthy): the mesh and DNS of the other workers add it, which can wait a moment.
    ``(None, NOW)``: anything else, a task leaving the mesh (unhealthy, ended) included.

    A previous report that the state machine refused does not make this wrong: states and
    health only grow, so a report with the same view as a refused one is refused too."""
    if b"task_status" not in blob or len(blob) > 65536:
        return None, Need.NOW
    try:
        cmd = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except Exception:
        return None, Need.NOW
    if not isinstance(cmd, dict):
        return None, Need.NOW
    node, op = cmd.get("node_id"), cmd.get("op")
    if not isinstance(node, str):
        return None, Need.NOW
    if op == "task_status":
        reports = [(cmd.get("task_id"), cmd.get("status"))]
    elif op == "task_statuses" and isinstance(cmd.get("reports"), list):
        reports = [tuple(r) if isinstance(r, list) and len(r) == 2 else (None, None)
                   for r in cmd["reports"]]
    else:
        return None, Need.NOW
    # the command is needed as soon as its most needed report (each one updates ``seen``)
    need = max([_need(task_id, status, seen) for task_id, status in reports],
               default=Need.NOW)
    return (None, need) if need is Need.NOW else (node, need)


def deferrable_owner(blob: bytes, seen: dict[str, MeshView] | None = None) -> str | None:
    """The node whose feed alone needs ``blob`` at once when the others can wait up to
    defer_max for it (``classify``'s LATER), else None."""
    node, need = classify(blob, seen)
    return node if need is Need.LATER else None


def _need(task_id: Any, status: Any, seen: dict[str, MeshView] | None) -> Need:
    state = status.get("state") if isinstance(status, dict) else None
    if not isinstance(state, int) or isinstance(state, bool):
        return Need.NOW
    if state < _RUNNING:
        return Need.LATER
    if seen is None or not isinstance(task_id, str) or not isinstance(status, dict):
        return Need.NOW
    if state >= _TERMINAL:
        seen.pop(task_id, None)
        return Need.NOW
    view = (state, str(status.get("health", "")), str(status.get("addr", "")))
    previous = seen.get(task_id)
    if len(seen) >= _SEEN_MAX:
        seen.clear()
    seen[task_id] = view
    if previous == view:
        return Need.LATER
    return Need.NOW if view[1] == "unhealthy" else Need.SOON


# A compressed reply may not inflate beyond this (a whole state of 100k tasks is ~60 MiB):
# a zlib bomb from a bad manager must not take the worker's memory.
MAX_INFLATED = 512 << 20


def _inflate(data: bytes) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(data, MAX_INFLATED)
    if d.unconsumed_tail:
        raise FeedError(f"compressed feed message inflates beyond {MAX_INFLATED} bytes")
    return out


class FeedServer:
    """Builds a manager's feed replies (the dispatcher checks the caller and holds the poll).
    ``store`` is a ManagerSource: ``changes_since``, ``full_state``, ``leader_addr``."""

    def __init__(self, config: FeedConfig | None = None) -> None:
        self.config = config or FeedConfig()
        self.stats = FeedStats()
        self._cache: collections.OrderedDict[tuple[Any, ...], bytes] = \
            collections.OrderedDict()
        self._state: tuple[int, bytes] | None = None  # the whole state, encoded, and its index
        self._catchup: asyncio.Lock | None = None
        self._store: Any = None  # the store the cached replies came from
        # per-node filtering of wake-ups (``wakes``): commands classified up to _scanned;
        # the last index every worker needs, and per node the last one only it needs
        self._scanned = -1
        self._scan_base = -1  # commands up to here were never classified
        self._last_all = -1
        self._last_own: dict[str, int] = {}
        self._seen: dict[str, MeshView] = {}  # task id → view of its last report scanned
        # the SOON commands scanned less than soon_wait ago, as (index, when scanned), and
        # the last index of one whose wait is over (every poll before it is answered)
        self._soon: collections.deque[tuple[int, float]] = collections.deque()
        self._soon_due = -1

    def _use(self, store: Any) -> None:
        if store is not self._store:  # another cluster's store (rejoin, role change): the
            self._cache.clear()  # same (after, index) means other commands there
            self._state, self._store = None, store
            self._scanned, self._scan_base, self._last_all, self._last_own = -1, -1, -1, {}
            self._seen, self._soon, self._soon_due = {}, collections.deque(), -1

    def _scan(self, store: Any) -> None:
        """Classify the commands applied since the last scan (once per commit, shared by
        every held poll): needed by all at once, or by one node at once and by the others
        soon or later (``classify``)."""
        index = store.index
        if index <= self._scanned:
            return
        changes = store.changes_since(self._scanned)
        if changes is None:  # no longer kept: count them as needed by all
            self._last_all = index
        else:
            index, blobs = changes
            first = index - len(blobs) + 1
            now = time.monotonic()
            for i, blob in enumerate(blobs, first):
                owner, need = classify(blob, self._seen)
                if owner is None or (need is Need.SOON and self.config.soon_wait <= 0):
                    self._last_all = i
                    continue
                self._last_own[owner] = i
                if need is Need.SOON:
                    self._soon.append((i, now))
        self._scanned = index

    def answer_by(self, store: Any, after: int, node_id: str) -> float:
        """When a poll of node ``node_id`` at index ``after`` must be answered, as
        time.monotonic(): at once (-inf) if a command after ``after`` is one it needs now, or
        ``defer_commands`` are waiting, or filtering is off; ``soon_wait`` after the first
        command after ``after`` that the other nodes need soon; +inf when it can wait for
        all of them (``defer_max`` then bounds the wait)."""
        self._use(store)
        if self.config.defer_max <= 0 or store.index - after >= self.config.defer_commands:
            return -math.inf
        if self._scanned < 0:  # the first poll to ask: classify from its index on
            self._scanned = self._scan_base = after
        if after < self._scan_base:
            return -math.inf  # (commands before the first scan are not classified)
        self._scan(store)
        if self._last_all > after or self._last_own.get(node_id, -1) > after:
            return -math.inf
        wait, now = self.config.soon_wait, time.monotonic()
        while self._soon and self._soon[0][1] + wait <= now:
            self._soon_due = max(self._soon_due, self._soon.popleft()[0])
        if self._soon_due > after:
            return -math.inf
        return next((at + wait for i, at in self._soon if i > after), math.inf)

    def _remember(self, key: tuple[Any, ...], data: bytes) -> None:
        if self.config.reply_cache <= 0:
            return
        self._cache[key] = data
        while len(self._cache) > self.config.reply_cache:
            self._cache.popitem(last=False)

    def _encode(self, msg: dict[str, Any], compress: bool) -> bytes:
        self.stats.encodes += 1
        raw = bytes(msgpack.packb(msg, use_bin_type=True))
        if compress and len(raw) >= self.config.compress_min:
            self.stats.compressed += 1
            return bytes(msgpack.packb({"z": zlib.compress(raw, 1)}, use_bin_type=True))
        return raw

    def _count(self, kind: str, data: bytes) -> bytes:
        self.stats.replies[kind] += 1
        self.stats.bytes[kind] += len(data)
        return data

    async def reply(self, store: Any, after: int, compress: bool = False) -> bytes:
        """The reply to a poll for what follows index ``after`` (-1: the whole state)."""
        self._use(store)
        leader = store.leader_addr()
        changes = store.changes_since(after) if after >= 0 else None
        if changes is not None:
            index, commands = changes
            kind = "commands" if commands else "empty"
            key = (after, index, leader, compress)
            data = self._cache.get(key)
            if data is None:
                data = self._encode({"leader": leader, "index": index, "commands": commands},
                                    compress)
                self._remember(key, data)
            return self._count(kind, data)
        # one whole state built at a time: a join storm of N workers waits for the first
        # build and shares it, instead of building N copies at once (back-pressure)
        if self._catchup is None:
            self._catchup = asyncio.Lock()
        self.stats.catchups_waiting += 1
        try:
            await self._catchup.acquire()
        finally:
            self.stats.catchups_waiting -= 1
        try:
            cached = self._state
            if cached is not None and cached[0] == store.index:
                index, blob = cached
            else:
                index, blob = await asyncio.to_thread(store.full_state)
                self._state = (index, blob)
            skey: tuple[Any, ...] = ("state", index, leader, compress)
            data = self._cache.get(skey)
            if data is None:
                data = await asyncio.to_thread(
                    self._encode, {"leader": leader, "index": index, "state": blob}, compress)
                self._remember(skey, data)
            return self._count("state", data)
        finally:
            self._catchup.release()


class StateFeed:
    """A worker's ``StateSource`` (shoal.node.source), fed over mTLS. ``managers`` are API
    addresses ("ip:port") to start from; the replica's own manager list takes over once it
    has one."""

    self_addr: str | None = None  # not a Raft member

    def __init__(self, node_id: str, managers: list[str], call_bytes: CallBytes,
                 call_json: CallJson, config: FeedConfig | None = None,
                 on_managers: Callable[[list[str]], None] | None = None,
                 probe: Probe | None = None) -> None:
        self.node_id = node_id
        self.config = config or FeedConfig()
        self._call_bytes, self._call_json = peer_call(call_bytes), peer_call(call_json)
        self._seed = list(managers)
        self._on_managers = on_managers
        self._known: list[str] = []
        self.state = ClusterState()
        self._ready = False
        self._resync = False
        self._listeners: list[Callable[[int], None]] = []
        self._source: str | None = None  # the manager currently feeding us
        self._leader: str | None = None  # the Raft leader's address, as that manager knows it
        self._synced_at = 0.0
        self._errors: dict[str, str] = {}
        self.resyncs = 0  # times the replica diverged and was replaced by a manager's state
        # cut-off mode (see FeedConfig.probe_timeout): set by a failure, cleared by a poll
        self._probe, self._cut_off = probe, False
        # the poll in flight: (addr, call, held: an increment poll, not a whole-state one)
        self._inflight: tuple[str, asyncio.Future[bytes], bool] | None = None
        self._dropped = False  # a held poll was dropped since the last successful one
        self._checking: asyncio.Task[None] | None = None  # suspect(): the held poll's path

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> Snapshot:
        return self.state.snapshot()

    @property
    def index(self) -> int:
        return self.state.index

    def add_listener(self, cb: Callable[[int], None]) -> None:
        self._listeners.append(cb)

    def is_ready(self) -> bool:
        return self._ready

    def is_leader(self) -> bool:
        return False

    def term(self) -> int:
        return 0

    def leader_addr(self) -> str | None:
        return self._leader

    def voters(self) -> list[str]:
        return sorted(n.raft_addr for n in self.state.nodes.values()
                      if n.role is NodeRole.MANAGER)

    def peer_connected(self, addr: str) -> bool:
        return False

    def status(self) -> dict[str, Any]:
        return {"feed_source": self._source, "ready": self._ready, "index": self.index,
                "synced_ago": round(time.monotonic() - self._synced_at, 3)
                if self._synced_at else None, "errors": dict(self._errors),
                "resyncs": self.resyncs}

    def managers(self) -> list[str]:
        """API addresses to ask, the one that last answered first."""
        known = [n.api_addr for n in sorted(self.state.nodes.values(), key=lambda n: n.id)
                 if n.role is NodeRole.MANAGER] or self._seed
        if known != self._known:
            self._known = known
            if self._on_managers is not None and self.state.nodes:
                self._on_managers(list(known))
        source = self._source
        if source is not None and source in known:
            return [source, *(m for m in known if m != source)]
        # spread the workers over the managers: each starts at its own place in the list
        start = zlib.crc32(self.node_id.encode()) % len(known) if known else 0
        return known[start:] + known[:start]

    # ------------------------------------------------------------------ following
    async def run(self) -> None:
        """Follow the managers until cancelled."""
        probing = self._probe is not None and self.config.probe_timeout > 0
        rounds = 0
        while True:
            progressed = False
            managers = self.managers()
            if self._cut_off and probing and managers:
                # cut off: ask only a manager that accepts a connection (a poll sent into
                # a dead link would wait for TCP's backoff); each round starts with
                # another manager (one that connects but fails does not win every time)
                rounds += 1
                k = rounds % len(managers)
                managers = [await self._first_reachable(managers[k:] + managers[:k])]
            for addr in managers:
                try:
                    while True:  # stay with a manager that answers
                        await self._poll(addr)
                        progressed = True
                except (PeerError, FeedError, WireError) as exc:
                    self._failed(addr, str(exc))
                    await asyncio.sleep(self.config.retry)
                except Exception as exc:  # never let the feed die: a worker would go stale
                    log.exception("state feed from %s failed", addr)
                    self._failed(addr, repr(exc))
                    await asyncio.sleep(self.config.retry)
                if probing:
                    break  # failed (cut-off mode now): probe before the next poll
            if not progressed:
                await asyncio.sleep(self.config.retry)

    async def _first_reachable(self, managers: list[str]) -> str:
        """Cut-off mode: probe every manager, each in its own loop (a connection attempt
        in flight at all times, a new one every ``probe_timeout``); the first that accepts
        a TCP connection (its poll comes next). The loops start spread over a second:
        after a cut, each manager's address waits on its own ARP resolution, retried by the
        kernel once a second; spread, the first retry of any of them after the link came
        back lets its connection through (at once, they would all retry together)."""
        assert self._probe is not None
        probe, timeout = self._probe, self.config.probe_timeout
        found: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def keep_probing(addr: str, delay: float) -> None:
            await asyncio.sleep(delay)
            gap = timeout
            while True:
                started = time.monotonic()
                try:
                    if await probe(addr, timeout):
                        if not found.done():
                            found.set_result(addr)
                        return
                    self._errors[addr] = f"no TCP connection within {timeout:g} s"
                except OSError as exc:  # refused: the host is there, its agent is not
                    self._errors[addr] = f"refused: {exc}"[:200]
                    await asyncio.sleep(self.config.retry)
                # back off (see probe_backoff_max), jittered so workers cut off together
                # do not probe together
                gap = min(2 * gap, max(timeout, self.config.probe_backoff_max))
                await asyncio.sleep(max(0.0, started + gap * random.uniform(0.75, 1.0)
                                        - time.monotonic()))

        loops = [asyncio.create_task(keep_probing(m, i / len(managers)))
                 for i, m in enumerate(managers)]
        try:
            return await found
        finally:
            for t in loops:
                t.cancel()

    def suspect(self, host: str) -> None:
        """Gossip suspects the member at ``host`` (an IP address). If it is the manager this
        feed's poll is held at (an increment poll: a whole-state download is never dropped,
        a slow link must not restart it for ever), check that it still accepts a TCP
        connection and drop the poll if not: a reply sent while the link is down comes only
        with TCP's retransmissions, seconds after it heals.

        Only that manager's suspicion, and one drop until a poll succeeds again: checking on
        *any* member's suspicion made a loaded 100-worker lab melt down (on a starved
        machine members are suspected all the time, a busy manager's accept queue misses
        the check's deadline, every worker dropped its poll every ~2.5 s and re-polled with
        a new TLS handshake, which loaded the managers more: elections, term 1 → 245). A
        node really cut off suspects every member within a few probe rounds, its poll's
        manager included."""
        inflight = self._inflight
        if inflight is None or inflight[1].done() or not inflight[2] or self._dropped:
            return
        if inflight[0].rpartition(":")[0] != host:
            return
        if self._probe is not None and self.config.probe_timeout > 0 and \
                self._checking is None:
            self._checking = asyncio.create_task(self._check(inflight[0], inflight[1]))

    async def _check(self, addr: str, call: asyncio.Future[bytes]) -> None:
        assert self._probe is not None
        try:
            ok = await self._probe(addr, 4 * self.config.probe_timeout)
        except OSError:
            ok = False
        finally:
            self._checking = None
        if not ok:
            self._drop(addr, call, "it accepts no TCP connection")

    def _drop(self, addr: str, call: asyncio.Future[bytes], why: str) -> None:
        if not call.done():
            log.info("state feed: dropping the poll held at %s: %s", addr, why)
            self._dropped = True  # (until a poll succeeds: see suspect)
            call.cancel()

    def _failed(self, addr: str, why: str) -> None:
        self._cut_off = True
        self._errors[addr] = why[:200]
        if self._source == addr:
            log.info("state feed from %s interrupted: %s", addr, why)
            self._source = None

    async def _poll(self, addr: str) -> None:
        after = -1 if self._resync or not self._ready else self.index
        body: dict[str, Any] = {"after": after, "wait": self.config.wait}
        if self.config.compress:
            body["compress"] = "zlib"
        call = asyncio.ensure_future(self._call_bytes(addr, "/v1/cluster/state", body,
                                                      self.config.wait + 10.0))
        self._inflight = (addr, call, after >= 0)
        try:
            raw = await call
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                call.cancel()
                raise  # the feed itself is being cancelled
            raise FeedError(f"poll of {addr} dropped: the link seems down") from None
        finally:
            self._inflight = None
        self._cut_off = False
        self._dropped = False
        self._apply(raw)
        if self._source != addr:
            log.info("state feed from manager %s (index %d)", addr, self.index)
        self._source = addr
        self._errors.pop(addr, None)
        self._synced_at = time.monotonic()

    def _apply(self, raw: bytes) -> None:
        try:
            msg = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception as exc:
            raise FeedError(f"undecodable feed message: {exc}") from None
        if isinstance(msg, dict) and isinstance(msg.get("z"), bytes):  # FeedServer compressed
            try:
                msg = msgpack.unpackb(_inflate(msg["z"]), raw=False, strict_map_key=False)
            except Exception as exc:
                raise FeedError(f"undecodable compressed feed message: {exc}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("index"), int):
            raise FeedError("feed message without an index")
        leader = msg.get("leader")
        self._leader = leader if isinstance(leader, str) else None
        if "state" in msg:
            if not isinstance(msg["state"], bytes):
                raise FeedError("feed state is not bytes")
            state = state_from_bytes(msg["state"])
            if state.index != msg["index"]:
                raise FeedError(f"feed state has index {state.index}, not {msg['index']}")
            self.state, self._resync = state, False
        else:
            commands = msg.get("commands")
            if not isinstance(commands, list) or not all(isinstance(c, bytes) for c in commands):
                raise FeedError("feed commands are not a list of bytes")
            if not commands:
                return  # nothing new (or that manager is behind us)
            for blob in commands:
                self._apply_one(blob)
            if self.state.index != msg["index"]:
                # not the sequence the manager has: distrust the replica (readers see it
                # as not ready) and start over from the manager's whole state
                self._resync, self._ready = True, False
                self.resyncs += 1
                raise FeedError(f"replica diverged: index {self.state.index} after the "
                                f"commands, the manager is at {msg['index']}")
        self._ready = True
        self.managers()  # refresh (and persist) the manager list
        for cb in list(self._listeners):
            try:
                cb(self.state.index)
            except Exception:
                log.exception("state listener failed")

    def _apply_one(self, blob: bytes) -> None:
        """As ReplicatedState.apply does on the managers (same index accounting)."""
        try:
            cmd = msgpack.unpackb(blob, raw=False, strict_map_key=False)
        except Exception:
            self.state.index += 1
            return
        self.state.apply(cmd)

    # ------------------------------------------------------------------ writing
    async def propose(self, cmd: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one of this worker's writes to a manager, which proposes it to Raft.

        A command with a ``now`` is sent with this node's clock at each attempt: the manager
        reads ``now`` as the moment it was sent (shoal.node.control.dispatcher
        ``in_manager_time``), and a report that waited seconds for a first manager that did
        not answer was taken for a clock that far off — its task times moved by that much,
        and "keep clocks in sync" logged for a node whose clock was right (issue 16's lab).

        Raises CommandRejected (the state machine or the manager said no), WriteTimeout (no
        manager took it in time; it may still apply) or NotReady (no manager known)."""
        deadline = time.monotonic() + (timeout or self.config.write_timeout)
        errors: list[str] = []
        for addr in self.managers():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sent = {**cmd, "now": time.time()} if "now" in cmd else cmd
            try:
                reply = await self._call_json(addr, "/v1/cluster/report", {"cmd": sent}, left)
            except PeerError as exc:
                if exc.code in ("invalid", "forbidden"):  # the manager refused the write itself
                    raise CommandRejected(exc.code, exc.message, exc.field) from None
                errors.append(f"{addr}: {exc.message}")
                continue
            result = reply.get("result")
            if not isinstance(result, dict):
                errors.append(f"{addr}: malformed reply")
                continue
            if "error" in result:
                e = result["error"]
                raise CommandRejected(e.get("code", "rejected"), e.get("message", "rejected"),
                                      e.get("field", ""))
            return result
        if not errors:
            raise NotReady("no manager known to send the write to")
        raise WriteTimeout("no manager took the write: " + "; ".join(errors))

    def close(self) -> None:
        """Forget the listeners; nothing else to release (the agent cancels :meth:`run`)."""
        self._listeners.clear()
