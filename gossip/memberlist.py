"""The gossip member: SWIM failure detection with Lifeguard, dissemination and anti-entropy.

Owns the public member (``Memberlist``: start, join, leave, shutdown, members, events) and the
protocol loops that keep its view current: probe, gossip, push-pull, reconnect, receive and
accept. The view itself — node table, suspicion timers, broadcast queue, local health, and the
alive/suspect/dead transition rules — is its base class shoal.gossip.view.MemberView; the
records are in shoal.gossip.nodes. It talks to the network only through a ``Transport`` and to
the agent only through ``Member`` snapshots, ``MemberEvent``s and ``stats``. It must not touch
the raft store, the runtime or anything outside this package; the agent decides what
membership means.

Protocol (one period of ``probe_interval * (health + 1)``)::

    ping target ──(probe_timeout * (health+1))──> no ack?
        ping-req to indirect_checks live members (they ping it, relay ack, or nack at 80 %)
        ──(rest of the period)──> no ack? → suspect(target), health += missing nacks
    suspect  → gossiped; every member starts a Suspicion timer (max → min as independent
               confirmations arrive); the suspect refutes with a higher incarnation
    timeout  → last-chance probe in the suspicion's last period; no answer → dead(target) when
               it expires, gossiped; dead members are no longer probed
    leave()  → dead(self, from=self) = "left", gossiped; never reported as dead

Every membership change is queued in a transmit-limited broadcast queue and piggybacked on all
outgoing packets (and on gossip rounds) retransmit_mult * ceil(log10(n+1)) times. A periodic
push-pull over a stream exchanges full state with one random member; ``join`` is a push-pull
with seeds; ``reconnect_interval`` push-pulls with a dead member so healed partitions merge.

Additions to memberlist's protocol, each aimed at "a live member is never declared dead":

* last-chance probe: a suspicion is executed only if the suspect also fails one more probe,
  run in the suspicion's last probe period (it carries the suspicion, so a live suspect
  answers with its newest alive message); otherwise it is re-armed. Costs no time on a real
  failure.
* stale accusations are answered: a member that receives a suspicion or death about itself
  older than its incarnation sends its alive message straight back (and re-gossips it after a
  stale death), so members that missed the refutation catch up.
* a member that notices it woke up far past its own probe deadline (SIGSTOP, overload) does
  not accuse the member it was probing; it only lowers its own health score.
* reconnect: dead (not left) members are periodically tried with a push-pull, so the two
  sides of a healed partition merge without an explicit join (serf does this above memberlist).
* a member known dead that is later announced as left is reported ``left``.
* confirmers (Config.confirm_suspicions, shoal's managers): a member that hears of a
  suspicion probes the suspect at once, so a real failure gets its independent confirmations
  within a probe period rather than from the others' round-robin probes.

Concurrency: everything runs on one asyncio event loop; no locks. Handlers are synchronous and
never await, so state changes are atomic between awaits. Nothing raised while handling inbound
traffic escapes a loop: wire errors are counted as ``drop.<reason>``, anything unexpected as
``drop.internal`` (and logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from . import timing, wire
from .config import Config
from .errors import (
    ConfigError,
    FrameTooLarge,
    GossipError,
    JoinError,
    StateError,
    TransportError,
    WireError,
)
from .events import EventKind, EventStream, Member, MemberEvent
from .keyring import Keyring
from .nodes import (
    ALIVE,
    DEAD,
    GONE,
    LEFT,
    SUSPECT,
    AckWaiter,
    NodeEntry,
    ProbeResult,
    parse_address,
)
from .transport import Address, Packet, Stream, Transport
from .view import MemberView
from .wire import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Nack,
    Ping,
    PushPull,
    Suspect,
)

log = logging.getLogger("shoal.gossip")

_RECV_BATCH = 64  # packets handled before yielding to other tasks
_MAX_INBOUND_STREAMS = 64  # push-pulls served at once; more are closed at once (counted)


class Memberlist(MemberView):
    """One gossip member. Create, ``await start()``, ``await join(seeds)``, read ``members()``.

    ``transport`` defaults to a UDPTransport on (bind_addr, bind_port). ``meta`` is a small
    msgpack-able dict (≤ Config.meta_max_bytes encoded) that travels with membership.
    ``rng`` makes probe order and peer choice reproducible (simulations).
    """

    def __init__(
        self,
        config: Config,
        *,
        transport: Transport | None = None,
        meta: dict[str, Any] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        config.validate()
        if transport is None:
            from .udp import UDPTransport

            transport = UDPTransport(
                config.bind_addr, config.bind_port, queue_size=config.packet_queue_size
            )
        super().__init__(config, transport, rng if rng is not None else random.Random())
        self._meta = self._encode_meta(meta or {})
        self._inbound_streams = 0

    # =========================================================================== public API
    @property
    def name(self) -> str:
        return self._name

    @property
    def address(self) -> Address:
        """The advertised (addr, port) other members reach us at."""
        return self._require_local().address

    @property
    def local_member(self) -> Member:
        return self._require_local().snapshot()

    @property
    def keyring(self) -> Keyring | None:
        """The cluster keyring (install_key / use_key / remove_key); None without encryption."""
        return self._keyring

    @property
    def health_score(self) -> int:
        """Lifeguard local health: 0 healthy … awareness_max_multiplier - 1 degraded."""
        return self._awareness.score

    def take_probe_rtts(self) -> list[float]:
        """Round-trip times (seconds) of direct probes acked since the last call."""
        out = list(self._probe_rtts)
        self._probe_rtts.clear()
        return out

    @property
    def running(self) -> bool:
        return self._lifecycle in ("running", "left")

    @property
    def stats(self) -> dict[str, int]:
        """Counters: traffic, probes, suspicions, refutes, and ``drop.<reason>`` per dropped
        packet or frame (see errors.DropReason; ``drop.internal`` would be a bug)."""
        out: dict[str, int] = dict(self._stats)
        for key, value in self._transport.stats.items():
            out[f"transport.{key}"] = value
        out["health_score"] = self._awareness.score
        out["members_live"] = self._num_live
        return out

    def members(self, *, include_gone: bool = True) -> list[Member]:
        """Every known member (ourselves included), sorted by name.

        ``include_gone=False`` leaves out dead and left members.
        """
        return [
            n.snapshot()
            for n in sorted(self._nodes.values(), key=lambda n: n.name)
            if include_gone or n.state not in GONE
        ]

    def member(self, name: str) -> Member | None:
        node = self._nodes.get(name)
        return node.snapshot() if node is not None else None

    def num_live(self) -> int:
        """Alive + suspect members, ourselves included."""
        return self._num_live

    def events(self, maxsize: int | None = None) -> EventStream:
        """Subscribe to membership events (async iterator). Subscribe before start() to also
        see the local member's own join."""
        stream = EventStream(maxsize or self.config.event_queue_size)
        if self._lifecycle == "shutdown":
            stream.close()
        self._streams.append(stream)
        return stream

    def subscribe(self, callback: Callable[[MemberEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` synchronously on every event; returns an unsubscribe
        function. The callback must not block; exceptions are logged and counted."""
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return unsubscribe

    async def start(self) -> Address:
        """Bind the transport, become alive (alone) and start the protocol loops."""
        if self._lifecycle != "new":
            raise StateError(f"start: member is {self._lifecycle}")
        self._loop = asyncio.get_running_loop()
        self._gossip_wakeup = asyncio.Event()
        try:
            bound = await self._transport.start()
        except TransportError:
            raise
        except OSError as exc:
            raise TransportError(f"cannot start transport: {exc}") from exc
        cfg = self.config
        addr = cfg.advertise_addr or bound[0]
        port = cfg.advertise_port or bound[1]
        if addr in ("0.0.0.0", "::"):
            raise ConfigError("advertise_addr", "required when bound to a wildcard address")
        now = self._loop.time()
        self._local = NodeEntry(cfg.name, addr, port, self._meta, 1, ALIVE, now, wire.LOCAL_VERSION)
        self._nodes[cfg.name] = self._local
        self._num_live = 1
        self._lifecycle = "running"
        self._emit(EventKind.JOIN, self._local, None)
        # Push mode: packets are handled in the transport's delivery callback, no task switch.
        self._transport.packet_handler = self._on_packet_safe
        self._spawn_loop(self._recv_loop, "recv")
        self._spawn_loop(self._accept_loop, "accept")
        self._spawn_loop(self._probe_loop, "probe")
        if cfg.gossip_interval > 0:
            self._spawn_loop(self._gossip_loop, "gossip")
        if cfg.push_pull_interval > 0:
            pp = cfg.push_pull_interval
            self._spawn_loop(lambda: self._periodic(pp, self._push_pull_round), "push-pull")
        if cfg.reconnect_interval > 0:
            rc = cfg.reconnect_interval
            self._spawn_loop(lambda: self._periodic(rc, self._reconnect_round), "reconnect")
        log.debug("%s: started on %s:%d", cfg.name, addr, port)
        return (addr, port)

    async def join(self, seeds: Iterable[Address | str]) -> int:
        """Push-pull with every seed concurrently; return how many answered.

        Raises JoinError if seeds were given and none answered. Our own address is skipped.
        """
        self._require_running("join")
        addrs = []
        for seed in seeds:
            addr = parse_address(seed)
            if addr != self.address and addr not in addrs:
                addrs.append(addr)
        if not addrs:
            return 0
        results = await asyncio.gather(
            *(self._push_pull(a, join=True) for a in addrs), return_exceptions=True
        )
        causes: dict[Address, BaseException] = {}
        ok = 0
        for addr, result in zip(addrs, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, GossipError | OSError | TimeoutError):
                    raise result
                causes[addr] = result
            else:
                ok += 1
        if ok == 0:
            raise JoinError(causes)
        return ok

    def update_meta(self, meta: dict[str, Any]) -> None:
        """Replace our metadata and re-broadcast it with a higher incarnation."""
        local = self._require_running("update_meta")
        encoded = self._encode_meta(meta)
        self._meta = encoded
        local.incarnation += 1
        local.set_meta(encoded)
        self._broadcast_alive(local)
        self._emit(EventKind.UPDATE, local, ALIVE)

    async def leave(self, timeout: float | None = None, *,
                    meta: dict[str, Any] | None = None) -> None:
        """Announce a graceful leave (others mark us "left", not dead) and wait until the
        announcement has been retransmitted, at most ``timeout`` (default Config.leave_timeout).
        Call ``shutdown()`` afterwards.

        ``meta``: metadata to announce just before leaving (e.g. "restarting, back soon"); the
        others keep a left member's last metadata. It goes out as an alive update and gets up
        to half of ``timeout`` to be retransmitted before the leave.

        Both the update and the leave are sent to every live member directly as well as
        broadcast: the leave replaces any broadcast about this member still queued — here
        and at every member passing the update on — so with gossip alone a member the update
        had not reached yet never got it (a restarting node's leader then replaced its
        tasks), and one the leave had not reached saw a failure instead."""
        local = self._require_running("leave")
        if self._leaving:
            return
        wait = self.config.leave_timeout if timeout is None else timeout
        others = self._num_live > 1
        if meta is not None:
            encoded = self._encode_meta(meta)
            self._meta = encoded
            local.incarnation += 1
            local.set_meta(encoded)
            alive = Alive(local.incarnation, local.name, local.addr, local.port, local.meta,
                          local.vsn)
            self._emit(EventKind.UPDATE, local, ALIVE)
            self._tell_everyone(alive)
            await self._broadcast_and_wait(local.name, alive, wait / 2 if others else 0.0)
        self._leaving = True
        self._lifecycle = "left"
        self._set_state(local, LEFT)
        self._emit(EventKind.LEFT, local, ALIVE)
        msg = Dead(local.incarnation, local.name, local.name)
        self._tell_everyone(msg)
        await self._broadcast_and_wait(local.name, msg, wait / 2 if meta is not None and others
                                       else wait if others else 0.0)

    def _tell_everyone(self, msg: Alive | Dead) -> None:
        """Send ``msg`` about this member to every live member at once, each in a packet of
        its own (a planned leave: one packet per member, once)."""
        data = wire.encode_message(msg)
        for node in list(self._nodes.values()):
            if node.name != self.config.name and node.state in (ALIVE, SUSPECT):
                self._send(node.address, [data], piggyback=False)

    async def _broadcast_and_wait(self, name: str, msg: Alive | Dead, wait: float) -> None:
        """Queue ``msg`` about ``name`` and wait (at most ``wait`` s) until it was retransmitted
        as often as the queue's limit (or replaced by a newer broadcast)."""
        done: asyncio.Future[None] = self._require_loop().create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        self._broadcasts.queue(name, wire.encode_message(msg), finished)
        self._wake_gossip()
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await done

    async def shutdown(self) -> None:
        """Stop every loop and close the transport, without announcing anything (to others
        this looks like a crash unless leave() ran first). Idempotent."""
        if self._lifecycle == "shutdown":
            return
        self._lifecycle = "shutdown"
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for suspicion in self._suspicions.values():
            suspicion.cancel()
        self._suspicions.clear()
        for waiter in self._acks.values():
            if waiter.future is not None and not waiter.future.done():
                waiter.future.cancel()
        self._acks.clear()
        self._broadcasts.reset()
        self._transport.packet_handler = None
        await self._transport.close()
        for stream in self._streams:
            stream.close()

    async def __aenter__(self) -> Memberlist:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # ======================================================================= helpers
    def _encode_meta(self, meta: dict[str, Any]) -> bytes:
        try:
            encoded = wire.encode_meta(meta)
        except TypeError as exc:
            raise ConfigError("meta", str(exc)) from exc
        if len(encoded) > self.config.meta_max_bytes:
            raise ConfigError(
                "meta",
                f"{len(encoded)} bytes encoded > meta_max_bytes {self.config.meta_max_bytes}",
            )
        return encoded

    def _spawn_loop(self, factory: Callable[[], Coroutine[Any, Any, None]], what: str) -> None:
        """Run a protocol loop for the member's lifetime; a loop that crashes (a bug: counted
        in ``internal_errors`` and logged) is restarted after a second instead of leaving a
        member that answers nothing."""

        async def forever() -> None:
            while not await self._guard(factory(), f"{what} loop"):
                await asyncio.sleep(1.0)

        self._spawn(forever(), what)
    # =========================================================================== receiving
    async def _recv_loop(self) -> None:
        transport = self._transport
        handled = 0
        while True:
            try:
                packet = await transport.recv_packet()
            except TransportError:
                return
            self._on_packet(packet)
            handled += 1
            if handled % _RECV_BATCH == 0:
                await asyncio.sleep(0)

    def _on_packet_safe(self, packet: Packet) -> None:
        try:
            self._on_packet(packet)
        except Exception:
            self._stats["drop.internal"] += 1
            log.exception("%s: handling a packet from %s failed", self._name, packet.source)

    def _on_packet(self, packet: Packet) -> None:
        try:
            msgs = wire.open_packet(
                packet.data, self._keyring, self._packet_aad, self.config.max_packet_in
            )
        except WireError as exc:
            self._stats[f"drop.{exc.reason.value}"] += 1
            return
        except Exception:
            self._stats["drop.internal"] += 1
            log.exception("%s: decoding a packet from %s failed", self._name, packet.source)
            return
        self._stats["packets_in"] += 1
        self._stats["bytes_in"] += len(packet.data)
        if self._lifecycle == "shutdown":
            return
        for msg in msgs:
            try:
                self._handle(msg, packet.source)
            except WireError as exc:
                self._stats[f"drop.{exc.reason.value}"] += 1
            except Exception:
                self._stats["drop.internal"] += 1
                log.exception("%s: handling %r failed", self._name, msg)

    def _handle(self, msg: wire.Message, source: Address) -> None:
        match msg:
            case Ping():
                if msg.target != self._name:
                    self._stats["drop.unexpected"] += 1
                    return
                self._send(source, [wire.encode_message(Ack(msg.seq))])
            case IndirectPing():
                self._relay(msg, source)
            case Ack():
                waiter = self._acks.get(msg.seq)
                if waiter is None:
                    self._stats["stale_acks"] += 1
                else:
                    waiter.ack()
            case Nack():
                waiter = self._acks.get(msg.seq)
                if waiter is not None:
                    waiter.nacks += 1
            case Alive():
                self._on_alive(msg)
            case Suspect():
                self._on_suspect(msg, source)
            case Dead():
                self._on_dead(msg, source)
            case _:
                self._stats["drop.unexpected"] += 1

    def _relay(self, req: IndirectPing, requester: Address) -> None:
        """Probe ``req.target`` for ``requester``: relay its ack, or nack at 80 % of the timeout."""
        loop = self._require_loop()
        self._stats["relays"] += 1
        local_seq = self._next_seq()
        done = False

        def on_ack() -> None:
            nonlocal done
            if done:
                return
            done = True
            self._send(requester, [wire.encode_message(Ack(req.seq))])

        def on_nack_timer() -> None:
            if not done:
                self._send(requester, [wire.encode_message(Nack(req.seq))])

        def expire() -> None:
            self._acks.pop(local_seq, None)

        self._acks[local_seq] = AckWaiter(on_ack=on_ack)
        timeout = self.config.probe_timeout
        if req.nack:
            loop.call_later(timing.nack_timeout(timeout), on_nack_timer)
        loop.call_later(timeout, expire)
        self._send((req.addr, req.port), [wire.encode_message(Ping(local_seq, req.target))])

    # =========================================================================== probing
    async def _probe_loop(self) -> None:
        loop = self._require_loop()
        await asyncio.sleep(self._rng.uniform(0, self.config.probe_interval))
        while True:
            start = loop.time()
            period = self._awareness.scale(self.config.probe_interval)
            node = self._next_probe_target()
            if node is not None and not self._leaving:
                await self._probe(node, period)
            delay = start + period - loop.time()
            await asyncio.sleep(max(delay, 0.0))

    async def _wait_ack(self, future: asyncio.Future[None], timeout: float) -> float:
        """Wait up to ``timeout`` for ``future``; return -1.0 if it completed, else how late
        (seconds past the deadline) this task woke up: a measure of our own slowness."""
        loop = self._require_loop()
        if future.done():
            return -1.0
        deadline = loop.time() + timeout
        wake: asyncio.Future[None] = loop.create_future()

        def wakeup(_: object = None) -> None:
            if not wake.done():
                wake.set_result(None)

        handle = loop.call_at(deadline, wakeup)
        future.add_done_callback(wakeup)
        try:
            await wake
        finally:
            handle.cancel()
            future.remove_done_callback(wakeup)
        if not future.done():
            # Let the receive loop handle what arrived while we slept (an ack may be queued).
            await asyncio.sleep(0)
        return -1.0 if future.done() else max(0.0, loop.time() - deadline)

    async def _probe_round(self, node: NodeEntry, period: float, timeout: float) -> ProbeResult:
        """One SWIM probe of ``node``: ping, then ping-req through indirect_checks members.

        A suspect is pinged together with the suspicion (Lifeguard's buddy system) so that it
        learns at once and can refute.
        """
        loop = self._require_loop()
        seq = self._next_seq()
        future: asyncio.Future[None] = loop.create_future()
        waiter = AckWaiter(future=future)
        self._acks[seq] = waiter
        try:
            msgs = [wire.encode_message(Ping(seq, node.name))]
            if node.state != ALIVE:
                msgs.append(wire.encode_message(Suspect(node.incarnation, node.name, self._name)))
            sent = loop.time()
            self._stats["probes"] += 1
            self._send(node.address, msgs)
            late = await self._wait_ack(future, timeout)
            if late < 0:
                self._probe_rtts.append(loop.time() - sent)
                return ProbeResult(True, 0, 0, 0.0)
            relays = self._random_nodes(
                self.config.indirect_checks, lambda n: n.state == ALIVE and n.name != node.name
            )
            if relays:
                req = wire.encode_message(IndirectPing(seq, node.name, node.addr, node.port, True))
                for relay in relays:
                    self._send(relay.address, [req])
            self._stats["probes_indirect"] += 1
            window = max(sent + period - loop.time(), timeout)
            late_indirect = await self._wait_ack(future, window)
            if late_indirect < 0:
                self._stats["probes_indirect_ok"] += 1
                return ProbeResult(True, len(relays), waiter.nacks, 0.0)
            return ProbeResult(False, len(relays), waiter.nacks, max(late, late_indirect))
        finally:
            self._acks.pop(seq, None)

    async def _probe(self, node: NodeEntry, period: float) -> None:
        """A periodic probe: on failure suspect ``node``; always update our health score."""
        timeout = self._awareness.scale(self.config.probe_timeout)
        incarnation = node.incarnation
        delta = -1
        try:
            result = await self._probe_round(node, period, timeout)
            if result.acked:
                return
            # Lifeguard: missing nacks mean *we* may be the problem.
            relays = result.relays
            delta = max(0, relays - result.nacks) if relays else 1
            if result.late > timeout:
                # We woke up far too late to trust the silence (paused, overloaded): do not
                # accuse anybody, just count ourselves less healthy.
                self._stats["probes_skipped_self_slow"] += 1
                delta = max(delta, 1)
                return
            self._stats["probes_failed"] += 1
            current = self._nodes.get(node.name)
            if current is not None and current.state not in GONE:
                self._on_suspect(Suspect(incarnation, node.name, self._name))
        finally:
            self._awareness.apply_delta(delta)

    async def _last_chance(self, name: str, change: float, due: float) -> None:
        """shoal addition: before executing a suspicion, probe the suspect once more.

        Dissemination is probabilistic: under heavy loss a member can miss the refutation of
        a suspicion (and the next push-pull). A suspect that still answers a probe is alive by
        SWIM's own definition, so its suspicion is re-armed (minimum timeout) instead of
        executed; the ping carries the suspicion, so the suspect answers with its current
        alive message and the suspicion ends. The probe runs during the suspicion's last
        probe period (Suspicion's ``lead``) and the verdict waits for ``due``, when the
        suspicion expires: a really dead member costs no more time than the suspicion itself
        (a probe period more before 2026-12-06), and the suspect still has the whole
        suspicion to refute.
        """
        node = self._nodes.get(name)
        if node is None or node.state != SUSPECT or node.state_change != change:
            return
        period = self._awareness.scale(self.config.probe_interval)
        timeout = self._awareness.scale(self.config.probe_timeout)
        result = await self._probe_round(node, period, timeout)
        node = self._nodes.get(name)
        if node is None or node.state != SUSPECT or node.state_change != change:
            return  # refuted (or settled) while we were probing
        if result.acked or result.late > timeout:
            self._stats["suspicions_rearmed"] += 1
            low, _ = self.config.suspicion_timeouts(self._num_live)
            self._arm_suspicion(node, self._name, 0, low, low)
            return
        wait = due - self._require_loop().time()
        if wait > 0:
            await asyncio.sleep(wait)
            node = self._nodes.get(name)
            if node is None or node.state != SUSPECT or node.state_change != change:
                return  # refuted in the suspicion's last moments
        self._stats["suspicion_timeouts"] += 1
        self._on_dead(Dead(node.incarnation, name, self._name))

    async def _confirm(self, name: str, change: float) -> None:
        """shoal addition (Config.confirm_suspicions): probe a member another member suspects.

        A failed probe — direct, then through indirect_checks other members — is a check
        independent of the accuser's, so it confirms the suspicion (Lifeguard): with two
        confirmers a dead member waits only the minimum suspicion timeout. The ping carries
        the suspicion, so a live suspect refutes it at once; a probe we woke up too late for
        accuses nobody (as in _probe).
        """
        node = self._nodes.get(name)
        if node is None or node.state != SUSPECT or node.state_change != change:
            return
        self._stats["probes_confirming"] += 1
        await self._probe(node, self._awareness.scale(self.config.probe_interval))

    # =========================================================================== gossip
    def _gossip_targets(self) -> list[NodeEntry]:
        now = self._require_loop().time()
        to_the_dead = self.config.gossip_to_the_dead_time

        def eligible(n: NodeEntry) -> bool:
            if n.state in GONE:
                return now - n.state_change <= to_the_dead
            return True

        return self._random_nodes(self.config.gossip_nodes, eligible)

    def _gossip_round(self) -> None:
        for node in self._gossip_targets():
            if not self._broadcasts:
                break
            self._send(node.address, [])

    async def _gossip_loop(self) -> None:
        wakeup = self._gossip_wakeup
        assert wakeup is not None
        interval = self.config.gossip_interval
        await asyncio.sleep(self._rng.uniform(0, interval))
        while True:
            if not self._broadcasts:
                wakeup.clear()
                await wakeup.wait()
            self._gossip_round()
            await asyncio.sleep(interval)

    # =========================================================================== push-pull
    async def _periodic(self, interval: float, action: Callable[[], Awaitable[None]]) -> None:
        await asyncio.sleep(self._rng.uniform(0, interval))
        while True:
            await action()
            await asyncio.sleep(timing.push_pull_scale(interval, self._num_live))

    async def _push_pull_round(self) -> None:
        peers = self._random_nodes(1, lambda n: n.state == ALIVE)
        if peers:
            await self._sync_with(peers[0].address)

    async def _reconnect_round(self) -> None:
        now = self._require_loop().time()
        retention = self.config.dead_retention
        peers = self._random_nodes(
            1, lambda n: n.state == DEAD and now - n.state_change <= retention
        )
        if peers:
            self._stats["reconnect_attempts"] += 1
            await self._sync_with(peers[0].address)

    async def _sync_with(self, addr: Address) -> None:
        try:
            await self._push_pull(addr, join=False)
        except (GossipError, OSError, TimeoutError) as exc:
            self._stats["push_pull_failures"] += 1
            log.debug("%s: push-pull with %s:%d failed: %s", self._name, addr[0], addr[1], exc)

    def _state_frame(self, join: bool) -> bytes:
        records = tuple(n.record() for n in self._nodes.values())
        payload = wire.build_payload([wire.encode_message(PushPull(join, records))])
        return wire.seal(payload, self._keyring, self._stream_aad)

    def _open_frame(self, frame: bytes) -> PushPull:
        try:
            return wire.open_frame(frame, self._keyring, self._stream_aad)
        except WireError as exc:
            self._stats[f"drop.{exc.reason.value}"] += 1
            self._stats["drop.stream_frames"] += 1
            raise

    async def _push_pull(self, addr: Address, *, join: bool) -> None:
        """Exchange full state with ``addr`` over a stream and merge the answer."""
        cfg = self.config
        self._stats["push_pulls"] += 1
        stream = await self._transport.open_stream(addr, cfg.tcp_timeout)
        try:
            async with asyncio.timeout(cfg.tcp_timeout):
                await stream.send(self._state_frame(join))
                frame = await stream.recv(cfg.max_stream_frame)
        except TimeoutError as exc:
            raise TransportError(f"push-pull with {addr[0]}:{addr[1]} timed out") from exc
        except FrameTooLarge:
            self._stats["drop.oversize"] += 1
            raise
        finally:
            await stream.close()
        remote = self._open_frame(frame)
        if self._lifecycle != "shutdown":
            self._merge(remote.nodes)

    async def _accept_loop(self) -> None:
        while True:
            try:
                stream = await self._transport.accept_stream()
            except TransportError:
                return
            if self._inbound_streams >= _MAX_INBOUND_STREAMS:
                self._stats["streams_refused"] += 1
                await stream.close()
                continue
            self._spawn(self._serve_stream(stream), "stream")

    async def _serve_stream(self, stream: Stream) -> None:
        cfg = self.config
        self._inbound_streams += 1
        try:
            async with asyncio.timeout(cfg.tcp_timeout):
                frame = await stream.recv(cfg.max_stream_frame)
                remote = self._open_frame(frame)
                await stream.send(self._state_frame(False))
            self._stats["push_pulls_served"] += 1
            self._merge(remote.nodes)
        except WireError:
            pass  # counted in _open_frame
        except FrameTooLarge:
            self._stats["drop.oversize"] += 1
        except (TransportError, TimeoutError, OSError):
            self._stats["stream_errors"] += 1
        finally:
            self._inbound_streams -= 1
            await stream.close()
