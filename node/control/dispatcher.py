"""The dispatcher: what workers talk to on a manager, and every node's heartbeats.

Owns (Swarm's dispatcher, over the node API's mTLS):

* ``state_since`` — the manager side of a worker's state feed (shoal.node.feed): the
  commands applied after an index, long-polled (a commit only other nodes need at once
  does not answer the poll: ``FeedServer.wakes``), or the whole state when they are no
  longer kept; the reply itself is built (shared, compressed, catch-ups one at a time) and counted
  by ``FeedServer`` (shoal.node.feed);
* ``worker_report`` — a worker's own writes, proposed on its behalf: only status reports for
  tasks on the calling node, the node's description of itself (``node_describe``, stamped
  with this manager's time) and the node's own removal; a report from a node whose wall
  clock is off is moved into this manager's time (``in_manager_time``);
* heartbeats: the table the leader's liveness check reads (node id → monotonic time of the
  last heartbeat), ``heartbeat`` (a node's heartbeat arriving on a manager) and
  ``heartbeat_loop`` (this node sending its own: to the leader alone while the leader
  answers as the leader, else to every manager; ``heartbeat_targets``).

Must not touch: Raft internals (it reads the ManagerSource), this node's lifecycle, HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

from shoal.node import pki
from shoal.node.context import NodeContext
from shoal.node.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    NotManager,
    Unauthenticated,
    Unavailable,
    from_store_error,
)
from shoal.node.feed import FeedServer
from shoal.node.orchestrator import heartbeat_period
from shoal.node.security import Security
from shoal.raft.errors import CommandRejected, StoreError, ValidationError
from shoal.raft.models import Node, NodeRole, NodeState
from shoal.raft.validate import validate_description

log = logging.getLogger("shoal.dispatcher")

# The longest heartbeat period a leader's answer can ask for, seconds (a bound against a
# bogus answer; 50 beats a second reach it at 3,000 nodes).
MAX_HEARTBEAT_PERIOD = 60.0

# A report whose sender's clock differs from this manager's by more than this (seconds) has
# its times moved into the manager's clock.
CLOCK_TOLERANCE = 5.0
# A heartbeat's round trip short enough to measure the clock offset by (its error is at most
# half of it), and how long a measurement is used for, seconds.
CLOCK_SAMPLE_RTT = 0.5
CLOCK_SAMPLE_AGE = 600.0


def _seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def in_manager_time(cmd: dict[str, Any], now: float) -> tuple[dict[str, Any], float]:
    """A worker's ``task_status`` (or ``task_statuses``) report with its times in this
    manager's clock; and how far the worker's clock is off (0 within ``CLOCK_TOLERANCE``).

    The leader compares the times in task statuses with its own clock: when a failed task
    is restarted (``ended + restart delay``), restart windows, update delays. A worker whose
    clock ran 10 minutes ahead had its failed tasks restarted 10 minutes late
    (tests/test_faults_clock.py). Every time in the report is shifted by the offset: the
    one the worker measured with its heartbeats' round trips (``skew``: this manager's
    clock minus its own, to within half a round trip of at most CLOCK_SAMPLE_RTT; see
    Dispatcher._beat), else this manager's ``now`` minus the worker's ``now`` when it sent
    the report — which counts the report's transit as clock error: on the loaded scale lab
    reports waited 5 to 7 s for a busy manager and correct clocks were "corrected" by that.
    Only offsets beyond the tolerance are corrected. Managers are assumed to agree with each
    other (their own reports are not moved)."""
    sent: Any = cmd.get("now")
    skew: Any = cmd.get("skew")
    if "skew" in cmd:
        cmd = {k: v for k, v in cmd.items() if k != "skew"}  # (not for the Raft log)
    if not _seconds(sent):
        return cmd, 0.0
    offset = float(skew) if _seconds(skew) else now - float(sent)
    if abs(offset) <= CLOCK_TOLERANCE:
        return cmd, 0.0
    moved: dict[str, Any] = {**cmd, "now": float(sent) + offset}
    if isinstance(cmd.get("status"), dict):
        moved["status"] = _moved(cmd["status"], offset)
    reports = cmd.get("reports")
    if isinstance(reports, list):  # task_statuses: [[task_id, status], ...]
        moved["reports"] = [[r[0], _moved(r[1], offset)]
                            if isinstance(r, list) and len(r) == 2 and isinstance(r[1], dict)
                            else r for r in reports]
    return moved, offset


def _moved(status: dict[str, Any], offset: float) -> dict[str, Any]:
    """One status with its times shifted by ``offset`` seconds."""
    moved = dict(status)
    if _seconds(moved.get("timestamp")) and moved["timestamp"]:
        moved["timestamp"] += offset
    log_ = moved.get("health_log")
    if isinstance(log_, list):
        moved["health_log"] = [
            {**r, **{k: r[k] + offset for k in ("start", "end") if _seconds(r.get(k))}}
            if isinstance(r, dict) else r for r in log_]
    return moved


def heartbeat_targets(managers: list[Node], leader_raft_addr: str | None,
                      broadcast: bool) -> tuple[list[Node], list[Node]]:
    """Where this node's next heartbeat goes: ``(first, then)`` — ``first`` now, ``then``
    only if no manager in ``first`` answers as the leader.

    Only the leader reads heartbeats (its liveness check; a new leader counts every node
    as heard when it takes office, ``LeaderLoop.hear_from_all``), so a beat goes to the
    manager this node knows as the leader (``leader_raft_addr``: its Raft replica's
    leader, or the one its state feed names) and to the others only when that one does not
    answer as the leader (unknown, stale, unreachable). ``broadcast``: the previous beat
    found no leader — every manager at once, as before (so a node whose view of the leader
    lags still reaches the new one within the beat). Swarm's agents likewise heartbeat one
    manager. Each manager then receives ~1 request per second per node only while it leads,
    instead of every manager receiving one from every node."""
    if not broadcast and leader_raft_addr:
        leader = [m for m in managers if m.raft_addr == leader_raft_addr]
        if leader:
            return leader, [m for m in managers if m.raft_addr != leader_raft_addr]
    return managers, []


class Dispatcher:
    def __init__(self, ctx: NodeContext, security: Security,
                 wake_leader: Callable[[], None]) -> None:
        self.ctx = ctx
        self.security = security
        self.wake_leader = wake_leader  # a node not READY was heard from: re-judge liveness
        # node id → time.monotonic() of its last heartbeat (read by the LeaderLoop)
        self.heartbeats: dict[str, float] = {}
        # ids of the nodes the leader's gossip saw alive at its last pass (the LeaderLoop
        # keeps it): they are given the longer heartbeat period (heartbeat_period)
        self.gossip_alive: set[str] = set()
        self.heartbeats_received = 0  # from other nodes (shoal_heartbeats_received_total)
        # set (and replaced) after every applied command: wakes workers' state polls
        self._applied = asyncio.Event()
        # builds, shares and counts the replies (encoding cache, compression, catch-up limit)
        self.feed = FeedServer(ctx.config.feed)
        self._refused_logged = 0.0
        # why managers refuse this node's certificate (it was removed: `node rm --force`),
        # since when; cleared by any manager's answer (`shoal info` shows it)
        self.refused: tuple[str, float] | None = None
        self._hb_broadcast = True  # the last heartbeat found no leader: ask every manager
        # the period the leader asked for in its last answer (a big cluster: longer than
        # the configured heartbeat_interval, which stays the minimum)
        self.heartbeat_period = 0.0
        self._skew_logged: dict[str, float] = {}  # node id → monotonic time last warned
        # this node's clock offset from the managers' (theirs minus its own), measured by
        # its heartbeats' round trips, and when (monotonic); see measured_offset
        self._clock_offset: tuple[float, float] | None = None
        # set when this agent stops: held polls answer "stopping" at once, so the API closes
        # without waiting for them (shoal.node.shutdown); the worker asks another manager
        self.stopping = False

    def applied(self) -> None:
        """A command was applied (on the event loop): answer the waiting polls."""
        applied, self._applied = self._applied, asyncio.Event()
        applied.set()

    # ------------------------------------------------------------------ feeding workers
    async def state_since(self, peer: pki.CertInfo | None, after: Any, wait: Any,
                          compress: Any = None) -> bytes:
        """A worker's state poll (shoal.node.feed): the commands applied after index
        ``after`` — waiting up to ``wait`` seconds for one — or the whole state when they are
        no longer kept (or ``after`` is -1). msgpack bytes, zlib-wrapped if ``compress`` is
        "zlib" and the reply is large (FeedServer)."""
        node = self.security.authorize(peer)
        if isinstance(after, bool) or not isinstance(after, int) or after < -1:
            raise BadRequest("after must be an index (an integer >= -1)", "after")
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 60:
            raise BadRequest("wait must be a number of seconds between 0 and 60", "wait")
        store = self.ctx.require_manager()
        if not store.is_ready():
            raise Unavailable("this manager has not caught up with the cluster yet; retry")
        deadline = time.monotonic() + float(wait)
        held = False
        feed = self.feed
        defer_until: float | None = None
        while after >= 0 and self.ctx.store is store:
            limit = deadline
            if store.index > after:
                # per-node filtering: commits only other nodes need now do not wake this
                # poll (FeedServer.answer_by); they go out with the next one it needs, or
                # when the soonest of them is due
                answer_by = feed.answer_by(store, after, node.id)
                if answer_by <= time.monotonic():
                    break
                feed.stats.deferred += 1
                if defer_until is None:
                    defer_until = time.monotonic() + feed.config.defer_max
                limit = min(deadline, defer_until, answer_by)
            if self.stopping:
                raise Unavailable("this manager is stopping")
            applied = self._applied
            left = limit - time.monotonic()
            if left <= 0:
                break
            held = True
            self.feed.stats.held += 1
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await applied.wait()
            finally:
                self.feed.stats.held -= 1
        batch = self.feed.config.batch_wait
        if held and batch > 0 and store.index > after:  # let a burst of commits gather
            await asyncio.sleep(batch)
        self.security.authorize(peer)  # still a member after the wait (node rm revokes)
        return await self.feed.reply(store, after, compress == "zlib")

    async def worker_report(self, peer: pki.CertInfo | None, cmd: Any) -> dict[str, Any]:
        """A write from a worker, proposed on its behalf: only status reports for tasks on
        the calling node, its description of itself and its own removal (leaving) are
        accepted."""
        node = self.security.authorize(peer)
        self.ctx.require_manager()
        if not isinstance(cmd, dict):
            raise BadRequest("cmd must be a command object", "cmd")
        op = cmd.get("op")
        if op in ("task_status", "task_statuses"):
            if cmd.get("node_id") != node.id:
                raise Forbidden(f"node {node.id} may only report its own tasks", "node_id")
            cmd, offset = in_manager_time(cmd, time.time())
            if offset and time.monotonic() - self._skew_logged.get(node.id, -1e9) > 600:
                self._skew_logged[node.id] = time.monotonic()
                log.warning("the wall clock of node %s is off by %+.1f s from this manager's: "
                            "its task times are corrected (keep clocks in sync, e.g. NTP)",
                            node.id, -offset)
        elif op == "node_remove":
            if cmd.get("id") != node.id:
                raise Forbidden(f"node {node.id} may only remove itself", "id")
        elif op == "node_describe":
            if cmd.get("id") != node.id:
                raise Forbidden(f"node {node.id} may only describe itself", "id")
            try:  # (refused here rather than written to the log to be refused there)
                desc = validate_description(cmd)
            except ValidationError as exc:
                raise BadRequest(exc.message, exc.field) from None
            cmd = {"op": op, "id": node.id, **desc, "now": time.time()}
        else:
            raise Forbidden(f"a node may not write {op!r} through the worker channel", "op")
        try:
            return {"result": await self.ctx.require_manager().propose(cmd)}
        except CommandRejected as exc:
            return {"result": {"error": {"code": exc.code, "message": exc.message,
                                         "field": exc.field}}}
        except StoreError as exc:
            raise from_store_error(exc) from exc

    # ------------------------------------------------------------------ heartbeats
    def heartbeat(self, peer: pki.CertInfo | None, node_id: Any) -> dict[str, Any]:
        """``POST /v1/cluster/heartbeat``: a member's heartbeat, for its own id only."""
        node = self.security.authorize(peer)
        if not isinstance(node_id, str):
            raise BadRequest("node_id is required", "node_id")
        if node_id != node.id:
            raise Forbidden(f"node {node.id} cannot send heartbeats for {node_id}", "node_id")
        store = self.ctx.store
        # (the sender then beats to this manager alone while it leads: heartbeat_targets)
        leads = bool(store is not None and store.is_leader())
        # "now": the sender measures its clock's offset from the round trip (in_manager_time)
        reply: dict[str, Any] = {"ok": True, "leader": leads, "now": time.time()}
        credit = 0.0
        if leads and store is not None:  # the period this leader wants from this node
            config = self.ctx.config
            reply["interval"], credit = heartbeat_period(
                config.heartbeat_interval, len(store.snapshot().nodes), config.orchestrator,
                node_id in self.gossip_alive)
        self.record_heartbeat(node_id, credit)
        self.heartbeats_received += 1
        return reply

    def heartbeats_received_total(self) -> int | None:
        """For the metrics: heartbeats received so far, None on a worker."""
        ident = self.ctx.identity
        return self.heartbeats_received if ident is not None and \
            ident.role == NodeRole.MANAGER else None

    def record_heartbeat(self, node_id: str, credit: float = 0.0) -> None:
        """A heartbeat from ``node_id``; the caller has checked it is the sender's own id.
        ``credit``: seconds it may stay silent beyond the common period (it was given a
        longer one: heartbeat_period), recorded as heard that much later."""
        ident, store = self.ctx.identity, self.ctx.store
        if ident is None or ident.role != NodeRole.MANAGER:
            raise NotManager("heartbeats go to managers")
        self.heartbeats[node_id] = time.monotonic() + credit
        if store and store.is_leader():
            node = store.snapshot().nodes.get(node_id)
            if node is not None and node.state is not NodeState.READY:
                self.wake_leader()

    async def heartbeat_loop(self) -> None:
        """Send this node's heartbeat every ``heartbeat_interval`` (``heartbeat_once``)."""
        while True:
            try:
                await self.heartbeat_once()
            except Exception:  # one bad beat must not end this node's heartbeats for good
                log.exception("heartbeat failed; trying again next period")
            # this node's own period, or the leader's longer one (a big cluster), jittered
            # so that the nodes' beats spread over the period
            period = max(self.ctx.config.heartbeat_interval, self.heartbeat_period)
            await asyncio.sleep(period * random.uniform(0.9, 1.1)
                                if period > self.ctx.config.heartbeat_interval else period)

    async def heartbeat_once(self) -> None:
        """One heartbeat of this node: to the leader, or to every manager when the leader
        does not answer as the leader (``heartbeat_targets``)."""
        ident, store = self.ctx.identity, self.ctx.store
        if ident is None or store is None:
            return
        if not store.is_ready():
            # a worker still catching up (a join's whole state, a resync): its replica does
            # not know the managers yet, its feed does (the ones it joined through). Beat to
            # them all, so the leader does not judge an admitted node dead while it downloads
            # (it has not joined gossip either: its seeds come from the state)
            addrs = getattr(store, "managers", None)
            if callable(addrs):
                await asyncio.gather(*(self._beat(a, a, ident.node_id) for a in addrs()))
            return
        managers = [n for n in store.snapshot().nodes.values() if n.role is NodeRole.MANAGER]
        first, then = heartbeat_targets(managers, store.leader_addr(), self._hb_broadcast)
        led = await asyncio.gather(*(self._send_heartbeat(m, ident.node_id) for m in first))
        if not any(led) and then:
            led += await asyncio.gather(*(self._send_heartbeat(m, ident.node_id)
                                          for m in then))
        self._hb_broadcast = not any(led)

    async def _send_heartbeat(self, manager: Node, node_id: str) -> bool:
        """One heartbeat to ``manager``; True if it answered as the leader."""
        if manager.id == node_id:  # a manager's beat to itself: what a remote one is told
            ident, store = self.ctx.identity, self.ctx.store
            if ident is None or ident.role != NodeRole.MANAGER:
                return False  # a worker being promoted: its record says manager already
            leads = bool(store is not None and store.is_leader())
            credit = 0.0
            if leads and store is not None:
                config = self.ctx.config
                period, credit = heartbeat_period(
                    config.heartbeat_interval, len(store.snapshot().nodes),
                    config.orchestrator, node_id in self.gossip_alive)
                self.heartbeat_period = min(period, MAX_HEARTBEAT_PERIOD)
            self.record_heartbeat(node_id, credit)
            return leads
        return await self._beat(manager.api_addr, manager.hostname, node_id)

    async def _beat(self, api_addr: str, name: str, node_id: str) -> bool:
        """One heartbeat to the manager at ``api_addr``; True if it answered as the leader."""
        # mTLS: TLS checks the receiver holds a manager certificate of this cluster
        try:
            sent = time.time()
            reply = await self.security.call(api_addr, "/v1/cluster/heartbeat",
                                             {"node_id": node_id}, timeout=1.0)
            if reply.get("leader") is True:  # the clock that judges the tasks' times
                self._sample_clock(sent, reply.get("now"), time.time())
        except Unauthenticated as exc:  # e.g. this node was removed: its cert is refused
            now = time.monotonic()
            if self.refused is None:
                self.refused = (exc.message, now)
            if now - self._refused_logged > 60:
                self._refused_logged = now
                log.warning("manager %s refuses this node: %s", name, exc.message)
            return False
        except ApiError:
            return False  # unreachable or busy manager: expected, the others are tried
        self.refused = None
        # (a manager of an older version answers without "leader": every manager is asked)
        leads = reply.get("leader") is True
        period = reply.get("interval")
        if leads and isinstance(period, (int, float)) and not isinstance(period, bool) \
                and math.isfinite(period):
            self.heartbeat_period = min(float(period), MAX_HEARTBEAT_PERIOD)
        return leads

    def _sample_clock(self, sent: float, manager_now: Any, received: float) -> None:
        """One heartbeat's measurement of this node's clock offset (NTP's, one sample): the
        leader's ``now`` against the middle of the round trip, kept only when the round
        trip was short enough to bound the error (a manager of an older version sends no
        ``now``). Only the leader's answers are sampled: its clock judges restart delays and
        windows, and a node that beats every manager (no leader known yet) would otherwise
        keep whichever answered last — tests/test_faults_clock.py caught a worker that kept
        the offset of a manager as far ahead as itself, and its task was restarted 10
        minutes late."""
        if _seconds(manager_now) and 0.0 <= received - sent <= CLOCK_SAMPLE_RTT:
            self._clock_offset = (float(manager_now) - (sent + received) / 2,
                                  time.monotonic())

    def measured_offset(self) -> float | None:
        """The managers' clock minus this node's, from a recent heartbeat; None if none
        measured it lately (then a manager estimates it from a report's one-way time)."""
        if self._clock_offset is None:
            return None
        offset, at = self._clock_offset
        return offset if time.monotonic() - at <= CLOCK_SAMPLE_AGE else None


__all__ = ["Dispatcher", "heartbeat_targets"]
