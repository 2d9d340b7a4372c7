"""One gossip member's view of the cluster and the rules that change it (SWIM + Lifeguard).

Owns: ``MemberView``, the base of shoal.gossip.memberlist.Memberlist: the node table, the
suspicion timers, the broadcast queue, local health (awareness), outstanding acks, counters,
event delivery, the probe order, and the state transitions — alive / suspect / dead messages
merged by incarnation, refutation, answering stale accusations, merging a remote full state
(memberlist's state.go aliveNode/suspectNode/deadNode/mergeState). Handlers are synchronous
and never await: a transition is atomic between the loops' awaits. The I/O it asks for goes
through ``_send`` (a packet with piggybacked broadcasts), ``_last_chance`` (the probe a
subclass runs when a suspicion expires) and ``_confirm`` (the probe a confirmer runs when it
hears of a suspicion). Must not touch: the protocol loops, the public API
and the streams (shoal.gossip.memberlist), the raft store, the runtime, anything outside this
package.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from . import timing, wire
from .broadcast import BroadcastQueue
from .config import Config
from .errors import StateError
from .events import EventKind, EventStream, MemberEvent
from .keyring import Keyring
from .lifeguard import Awareness, Suspicion
from .nodes import ALIVE, DEAD, GONE, LEFT, SUSPECT, AckWaiter, NodeEntry
from .transport import Address, Transport
from .wire import Alive, Dead, MemberState, NodeRecord, Suspect

log = logging.getLogger("shoal.gossip")


class MemberView:
    """A member's state and its transition rules; Memberlist adds the loops and the API."""

    def __init__(self, config: Config, transport: Transport, rng: random.Random) -> None:
        self.config = config
        self._name = config.name
        self._transport = transport
        self._keyring: Keyring | None = (
            Keyring(config.secret_key, config.extra_keys) if config.secret_key is not None else None
        )
        self._rng = rng
        self._packet_aad = wire.aad_for(wire.PACKET_AAD_KIND, config.label)
        self._stream_aad = wire.aad_for(wire.STREAM_AAD_KIND, config.label)

        self._nodes: dict[str, NodeEntry] = {}
        self._num_live = 0  # alive + suspect, ourselves included
        self._probe_list: list[str] = []
        self._probe_index = 0
        self._suspicions: dict[str, Suspicion] = {}
        self._broadcasts = BroadcastQueue()
        self._acks: dict[int, AckWaiter] = {}
        # round-trip times (s) of the latest direct probes that were acked, oldest first:
        # read and emptied by ``take_probe_rtts`` (the agent's /metrics)
        self._probe_rtts: collections.deque[float] = collections.deque(maxlen=1024)
        self._seq = self._rng.randrange(2**32)
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._stats: Counter[str] = Counter()
        self._streams: list[EventStream] = []
        self._callbacks: list[Callable[[MemberEvent], None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gossip_wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._local: NodeEntry | None = None
        self._lifecycle = "new"  # new → running → (left) → shutdown
        self._leaving = False
        # probe at once a member another member suspects (Config.confirm_suspicions; the
        # agent switches it with the node's role)
        self.confirm_suspicions = config.confirm_suspicions

    # ======================================================================= helpers
    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise StateError("member not started")
        return self._loop

    def _require_local(self) -> NodeEntry:
        if self._local is None:
            raise StateError("member not started")
        return self._local

    def _require_running(self, what: str) -> NodeEntry:
        if self._lifecycle not in ("running", "left"):
            raise StateError(f"{what}: member is {self._lifecycle}")
        return self._require_local()

    def _spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        task = asyncio.get_running_loop().create_task(self._guard(coro, what))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, coro: Awaitable[None], what: str) -> bool:
        """Await ``coro``; True if it returned, False if it crashed (counted and logged)."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            self._stats["internal_errors"] += 1
            log.exception("%s: %s failed", self._name, what)
            return False
        return True

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % 2**32
        return self._seq

    def _set_state(self, node: NodeEntry, state: MemberState) -> None:
        was_live = node.state not in GONE
        is_live = state not in GONE
        node.state = state
        node.state_change = self._require_loop().time()
        self._num_live += int(is_live) - int(was_live)

    def _retransmit_limit(self) -> int:
        return max(1, timing.retransmit_limit(self.config.retransmit_mult, self._num_live))

    def _emit(self, kind: EventKind, node: NodeEntry, previous: MemberState | None) -> None:
        self._stats[f"event.{kind.value}"] += 1
        if not self._streams and not self._callbacks:
            return
        event = MemberEvent(kind, node.snapshot(), previous, self._require_loop().time())
        if any(stream.closed for stream in self._streams):
            self._streams = [stream for stream in self._streams if not stream.closed]
        for stream in self._streams:
            stream._push(event)
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:
                self._stats["event_callback_errors"] += 1
                log.exception("%s: event callback failed", self._name)

    def _random_nodes(self, k: int, accept: Callable[[NodeEntry], bool]) -> list[NodeEntry]:
        """Up to ``k`` distinct random members (never ourselves) that ``accept`` approves.

        memberlist's kRandomNodes: up to 3n random draws, so it is cheap when k << n and
        still exhaustive enough when n is small.
        """
        nodes = list(self._nodes.values())
        n = len(nodes)
        picked: list[NodeEntry] = []
        if k <= 0 or n <= 1:
            return picked
        rng = self._rng
        local = self._local
        for _ in range(3 * n):
            node = nodes[int(rng.random() * n)]
            if node is local or node in picked or not accept(node):
                continue
            picked.append(node)
            if len(picked) >= k:
                break
        return picked

    # =========================================================================== sending
    def _send(self, addr: Address, msgs: list[bytes], piggyback: bool = True) -> None:
        """Send ``msgs`` plus (with ``piggyback``) as many queued broadcasts as fit in one
        packet."""
        used = sum(len(m) for m in msgs) + wire.SEAL_OVERHEAD + 4
        space = self.config.packet_size - used
        extra = self._broadcasts.take(space, self._retransmit_limit()) if piggyback else []
        if not msgs and not extra:
            return
        payload = wire.build_payload(msgs + extra if extra else msgs)
        data = wire.seal(payload, self._keyring, self._packet_aad)
        self._stats["packets_out"] += 1
        self._stats["bytes_out"] += len(data)
        if extra:
            self._stats["broadcasts_out"] += len(extra)
        self._transport.send_packet(addr, data)

    def _queue_broadcast(self, name: str, msg: Alive | Suspect | Dead) -> None:
        self._broadcasts.queue(name, wire.encode_message(msg))
        self._wake_gossip()

    def _wake_gossip(self) -> None:
        if self._gossip_wakeup is not None:
            self._gossip_wakeup.set()

    def _broadcast_alive(self, node: NodeEntry) -> None:
        self._queue_broadcast(
            node.name,
            Alive(node.incarnation, node.name, node.addr, node.port, node.meta, node.vsn),
        )

    # =========================================================================== state machine
    def _on_alive(self, a: Alive, *, from_state_sync: bool = False) -> None:
        lo, hi, _cur = a.vsn
        if lo > wire.PROTOCOL_VERSION_MAX or hi < wire.PROTOCOL_VERSION_MIN:
            self._stats["drop.incompatible"] += 1
            return
        now = self._require_loop().time()
        node = self._nodes.get(a.node)
        is_local = a.node == self._name
        if node is None:
            node = NodeEntry(a.node, a.addr, a.port, a.meta, a.incarnation, ALIVE, now, a.vsn)
            self._nodes[a.node] = node
            self._num_live += 1
            self._insert_probe_target(a.node)
            self._queue_broadcast(a.node, a)
            self._emit(EventKind.JOIN, node, None)
            return
        updates_node = False
        if (a.addr, a.port) != node.address and not is_local:
            reclaim = self.config.dead_node_reclaim_time
            can_reclaim = reclaim > 0 and now - node.state_change > reclaim
            if node.state == LEFT or (node.state == DEAD and can_reclaim):
                updates_node = True
            else:
                self._stats["name_conflicts"] += 1
                log.warning(
                    "%s: name conflict: %s claimed by %s:%d, known at %s:%d",
                    self._name, a.node, a.addr, a.port, node.addr, node.port,
                )
                return
        if is_local:
            if a.incarnation < node.incarnation:
                return
            if (
                a.incarnation == node.incarnation
                and a.meta == node.meta
                and (a.addr, a.port) == node.address
                and a.vsn == node.vsn
            ):
                return
            self._refute(node, a.incarnation)
            return
        if a.incarnation <= node.incarnation and not updates_node:
            return
        suspicion = self._suspicions.pop(a.node, None)
        if suspicion is not None:
            suspicion.cancel()
        old_state = node.state
        old_meta = node.meta
        old_addr = node.address
        self._queue_broadcast(a.node, a)
        node.incarnation = a.incarnation
        node.set_meta(a.meta)
        node.addr, node.port = a.addr, a.port
        node.vsn = a.vsn
        if old_state != ALIVE:
            self._set_state(node, ALIVE)
        if old_state == LEFT:
            self._emit(EventKind.JOIN, node, old_state)
        elif old_state in (DEAD, SUSPECT):
            self._emit(EventKind.ALIVE_AGAIN, node, old_state)
        elif old_meta != node.meta or old_addr != node.address:
            self._emit(EventKind.UPDATE, node, old_state)

    def _on_suspect(self, s: Suspect, source: Address | None = None) -> None:
        node = self._nodes.get(s.node)
        if node is None:
            return
        if s.incarnation < node.incarnation:
            if node is self._local and source is not None:
                self._answer_stale_accusation(source, again=False)
            return
        suspicion = self._suspicions.get(s.node)
        if suspicion is not None:
            if suspicion.confirm(s.sender):
                self._stats["suspicion_confirmations"] += 1
                self._queue_broadcast(s.node, s)
            return
        if node.state != ALIVE:
            return
        if s.node == self._name:
            self._refute(node, s.incarnation)
            return
        self._queue_broadcast(s.node, s)
        node.incarnation = s.incarnation
        self._set_state(node, SUSPECT)
        self._stats["suspicions"] += 1
        n = self._num_live
        k = timing.suspicion_confirmations(self.config.suspicion_mult, n)
        low, high = self.config.suspicion_timeouts(n)
        self._arm_suspicion(node, s.sender, k, low, high)
        self._emit(EventKind.SUSPECT, node, ALIVE)
        if self.confirm_suspicions and s.sender != self._name:
            self._spawn(self._confirm(s.node, node.state_change), "confirming probe")

    def _arm_suspicion(self, node: NodeEntry, sender: str, k: int, low: float, high: float) -> None:
        change = node.state_change
        name = node.name

        def on_timeout(confirmations: int, due: float) -> None:
            if self._suspicions.get(name) is suspicion:
                del self._suspicions[name]
            current = self._nodes.get(name)
            if current is not None and current.state == SUSPECT and current.state_change == change:
                self._spawn(self._last_chance(name, change, due), "last-chance probe")

        # the last-chance probe starts one probe period before the suspicion expires
        lead = self._awareness.scale(self.config.probe_interval)
        suspicion = Suspicion(sender, k, low, high, on_timeout, lead=lead)
        old = self._suspicions.pop(name, None)
        if old is not None:
            old.cancel()
        self._suspicions[name] = suspicion

    def _on_dead(self, d: Dead, source: Address | None = None) -> None:
        node = self._nodes.get(d.node)
        if node is None:
            return
        if d.incarnation < node.incarnation:
            if node is self._local and source is not None and not self._leaving:
                self._answer_stale_accusation(source, again=True)
            return
        suspicion = self._suspicions.pop(d.node, None)
        if suspicion is not None:
            suspicion.cancel()
        left = d.sender == d.node
        if node.state in GONE:
            # shoal: a member we saw die that then turns out to have left is reported left.
            if node.state == DEAD and left:
                self._queue_broadcast(d.node, d)
                node.incarnation = d.incarnation
                self._set_state(node, LEFT)
                self._emit(EventKind.LEFT, node, DEAD)
            return
        if d.node == self._name:
            if not self._leaving:
                self._refute(node, d.incarnation)
            return
        self._queue_broadcast(d.node, d)
        old_state = node.state
        node.incarnation = d.incarnation
        self._set_state(node, LEFT if left else DEAD)
        self._emit(EventKind.LEFT if left else EventKind.DEAD, node, old_state)

    def _answer_stale_accusation(self, source: Address, *, again: bool) -> None:
        """shoal addition: an accusation older than our incarnation means its sender missed our
        refutation. Tell it directly (and, for a death, re-gossip our alive message: whoever
        believed the death missed the refutation too)."""
        local = self._require_local()
        self._stats["stale_accusations_answered"] += 1
        alive = Alive(local.incarnation, local.name, local.addr, local.port, local.meta, local.vsn)
        self._send(source, [wire.encode_message(alive)])
        if again:
            self._broadcast_alive(local)

    def _refute(self, local: NodeEntry, accused: int) -> None:
        """We were suspected or declared dead: outbid the accusation with a higher incarnation."""
        inc = local.incarnation + 1
        if accused >= inc:
            inc = accused + 1
        local.incarnation = inc
        self._awareness.apply_delta(1)
        self._stats["refutes"] += 1
        self._broadcast_alive(local)

    def _merge(self, records: tuple[NodeRecord, ...]) -> None:
        """Fold a remote full state into ours (memberlist mergeState): remote dead is only a
        suspicion here, so a wrongly-dead member still gets its chance to refute."""
        for r in records:
            if r.state == ALIVE:
                self._on_alive(Alive(r.incarnation, r.name, r.addr, r.port, r.meta, r.vsn))
            elif r.state == LEFT:
                self._on_dead(Dead(r.incarnation, r.name, r.name))
            else:
                self._on_suspect(Suspect(r.incarnation, r.name, self._name))

    # ======================================================================= probe order
    def _insert_probe_target(self, name: str) -> None:
        index = self._rng.randint(0, len(self._probe_list))
        self._probe_list.insert(index, name)
        if index < self._probe_index:
            self._probe_index += 1

    def _reset_probe_list(self) -> None:
        """Start a new round: forget members gone for longer than dead_retention, reshuffle."""
        now = self._require_loop().time()
        retention = self.config.dead_retention
        for node in list(self._nodes.values()):
            expired = node.state in GONE and now - node.state_change > retention
            if expired and node is not self._local:
                del self._nodes[node.name]
                self._stats["reaped"] += 1
                self._emit(EventKind.REAPED, node, node.state)
        self._probe_list = [name for name in self._nodes if name != self._name]
        self._rng.shuffle(self._probe_list)
        self._probe_index = 0

    def _next_probe_target(self) -> NodeEntry | None:
        for _ in range(len(self._probe_list) + 2):
            if self._probe_index >= len(self._probe_list):
                self._reset_probe_list()
                if not self._probe_list:
                    return None
            name = self._probe_list[self._probe_index]
            self._probe_index += 1
            node = self._nodes.get(name)
            if node is not None and node.state not in GONE and name != self._name:
                return node
        return None

    async def _last_chance(self, name: str, change: float, due: float) -> None:
        """Probe suspect ``name`` once more and declare it dead at loop time ``due`` if it
        fails (the loops' part: Memberlist). ``change`` is its state_change when the
        suspicion was armed."""
        raise NotImplementedError

    async def _confirm(self, name: str, change: float) -> None:
        """Probe suspect ``name``, which another member suspects, and confirm the suspicion
        if it fails (the loops' part: Memberlist). ``change`` as for _last_chance."""
        raise NotImplementedError


__all__ = ["MemberView"]
