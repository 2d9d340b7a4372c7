"""In-memory network for protocol tests: many transports in one event loop.

Owns a fake network: endpoints keyed by (host, port), datagrams with seeded loss, duplication
and latency, reliable streams, partitions and isolated hosts. It runs on whatever asyncio loop
is running (use ``simloop.VirtualTimeLoop`` to make time jump), and must not open sockets or
read the wall clock. Every random choice comes from one ``random.Random(seed)``, so a run with the
same seed and the same sequence of calls is reproducible.

Semantics
---------
* Reachability is checked when a datagram is sent; one in flight when a partition starts still
  arrives (like a real network). Datagrams to a closed endpoint vanish.
* ``partition(groups)``: only members of the same group reach each other; addresses in no group
  form one more group together. ``heal()`` removes it. ``isolate(addr)`` cuts one address off
  in both directions until ``restore(addr)``. ``drop_filter`` is a hook for anything finer.
* Streams: ``open_stream`` to a closed port fails after one latency ("refused"); to an
  unreachable one it fails after the timeout. Frames keep their order; frames sent while the two
  ends cannot reach each other are lost (the reader times out, like a black-holed TCP stream).
"""

from __future__ import annotations

import asyncio
import heapq
import random
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from .errors import FrameTooLarge, TransportError
from .transport import Address, Mailbox, Packet, Stream, Transport


class MemoryNetwork:
    """A seeded, lossy, partitionable network of MemoryTransports."""

    def __init__(
        self,
        *,
        seed: int = 0,
        loss: float = 0.0,
        duplicate: float = 0.0,
        latency: tuple[float, float] = (0.0002, 0.002),
    ) -> None:
        self.rng = random.Random(seed)
        # Probability that a datagram is lost / delivered twice. Streams are never lossy.
        self.loss = loss
        self.duplicate = duplicate
        # One-way delay, uniform in [low, high] seconds, for datagrams and stream frames.
        self.latency = latency
        # Extra hook: drop_filter(src, dst, datagram) returning True drops that datagram.
        self.drop_filter: Callable[[Address, Address, bytes], bool] | None = None
        self.stats: Counter[str] = Counter()
        self._endpoints: dict[Address, MemoryTransport] = {}
        self._groups: dict[Address, int] | None = None
        self._isolated: set[Address] = set()
        self._next_port = 40000
        self._pending: list[tuple[float, int, Callable[..., object], tuple[Any, ...]]] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0

    # --- topology ----------------------------------------------------------------------------
    def transport(self, host: str, port: int = 0, *, queue_size: int = 4096) -> MemoryTransport:
        """A new endpoint; port 0 picks an unused one at start()."""
        return MemoryTransport(self, host, port, queue_size=queue_size)

    def partition(self, *groups: Iterable[Address]) -> None:
        """Split the network: only addresses in the same group reach each other."""
        table: dict[Address, int] = {}
        for index, group in enumerate(groups):
            for addr in group:
                table[addr] = index
        self._groups = table

    def heal(self) -> None:
        """Remove the partition (isolated addresses stay isolated)."""
        self._groups = None

    def isolate(self, addr: Address) -> None:
        """Cut ``addr`` off in both directions (a frozen or unplugged host)."""
        self._isolated.add(addr)

    def restore(self, addr: Address) -> None:
        self._isolated.discard(addr)

    def reachable(self, src: Address, dst: Address) -> bool:
        if src in self._isolated or dst in self._isolated:
            return False
        groups = self._groups
        return groups is None or groups.get(src, -1) == groups.get(dst, -1)

    def endpoints(self) -> list[Address]:
        return list(self._endpoints)

    # --- internals used by the transports -----------------------------------------------------
    def _schedule(self, when: float, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` at loop time ``when``. The network keeps its own heap of
        deliveries (tuples compare in C; ties keep FIFO order) and one loop timer for the
        earliest, which is much cheaper than one asyncio timer per datagram."""
        self._seq += 1
        heapq.heappush(self._pending, (when, self._seq, fn, args))
        if self._timer is None or when < self._timer_when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_at(when, self._fire)
            self._timer_when = when

    def _fire(self) -> None:
        self._timer = None
        pending = self._pending
        loop = asyncio.get_running_loop()
        # A real loop may run a timer up to its clock resolution early: honour what was due.
        now = max(loop.time(), self._timer_when)
        while pending and pending[0][0] <= now:
            _, _, fn, args = heapq.heappop(pending)
            fn(*args)
        if pending and self._timer is None:
            self._timer_when = pending[0][0]
            self._timer = loop.call_at(self._timer_when, self._fire)

    def _delay(self) -> float:
        low, high = self.latency
        return low if high <= low else self.rng.uniform(low, high)

    def _register(self, ep: MemoryTransport) -> Address:
        host, port = ep.requested
        if port == 0:
            while (host, self._next_port) in self._endpoints:
                self._next_port += 1
            port = self._next_port
            self._next_port += 1
        addr = (host, port)
        if addr in self._endpoints:
            raise TransportError(f"address in use: {host}:{port}")
        self._endpoints[addr] = ep
        return addr

    def _unregister(self, addr: Address) -> None:
        self._endpoints.pop(addr, None)

    def _send(self, src: Address, dst: Address, data: bytes) -> None:
        st = self.stats
        st["packets_sent"] += 1
        st["bytes_sent"] += len(data)
        dropped = self.drop_filter is not None and self.drop_filter(src, dst, data)
        if dropped or not self.reachable(src, dst):
            st["packets_blocked"] += 1
            return
        rng = self.rng
        if self.loss and rng.random() < self.loss:
            st["packets_lost"] += 1
            return
        now = asyncio.get_running_loop().time()
        self._schedule(now + self._delay(), self._arrive, src, dst, data)
        if self.duplicate and rng.random() < self.duplicate:
            st["packets_duplicated"] += 1
            self._schedule(now + self._delay(), self._arrive, src, dst, data)

    def _arrive(self, src: Address, dst: Address, data: bytes) -> None:
        ep = self._endpoints.get(dst)
        if ep is None:
            self.stats["packets_no_listener"] += 1
            return
        self.stats["packets_delivered"] += 1
        ep._deliver(Packet(data, src, asyncio.get_running_loop().time()))

    async def _connect(self, src: Address, dst: Address, timeout: float) -> MemoryStream:
        delay = self._delay()
        if not self.reachable(src, dst):
            await asyncio.sleep(timeout)
            raise TransportError(f"connect to {dst[0]}:{dst[1]} timed out")
        await asyncio.sleep(min(delay, timeout))
        ep = self._endpoints.get(dst)
        if ep is None:
            raise TransportError(f"connect to {dst[0]}:{dst[1]}: connection refused")
        client = MemoryStream(self, src, dst)
        server = MemoryStream(self, dst, src)
        client._peer, server._peer = server, client
        if not ep._accept(server):
            raise TransportError(f"connect to {dst[0]}:{dst[1]}: backlog full")
        self.stats["streams_opened"] += 1
        return client


class MemoryTransport(Transport):
    """One endpoint of a MemoryNetwork."""

    def __init__(self, net: MemoryNetwork, host: str, port: int, *, queue_size: int) -> None:
        self.net = net
        self.requested: Address = (host, port)
        self.stats: Counter[str] = Counter()
        self._addr: Address | None = None
        self._packets: Mailbox[Packet] = Mailbox(queue_size)
        self._streams: Mailbox[MemoryStream] = Mailbox(128)

    @property
    def local_address(self) -> Address:
        if self._addr is None:
            raise TransportError("transport not started")
        return self._addr

    async def start(self) -> Address:
        if self._addr is None:
            self._addr = self.net._register(self)
        return self._addr

    def send_packet(self, addr: Address, data: bytes) -> None:
        if self._addr is None or self._packets.closed:
            self.stats["send_closed"] += 1
            return
        self.stats["packets_out"] += 1
        self.stats["bytes_out"] += len(data)
        self.net._send(self._addr, addr, data)

    def _deliver(self, packet: Packet) -> None:
        if self._packets.closed:
            return
        handler = self.packet_handler
        if handler is not None:
            self.stats["packets_in"] += 1
            self.stats["bytes_in"] += len(packet.data)
            handler(packet)
            return
        if self._packets.put(packet):
            self.stats["packets_in"] += 1
            self.stats["bytes_in"] += len(packet.data)
        else:
            self.stats["packets_dropped_queue_full"] += 1

    async def recv_packet(self) -> Packet:
        return await self._packets.get()

    def recv_packet_nowait(self) -> Packet | None:
        """The next queued packet, or None (lets the receive loop drain without awaiting)."""
        return self._packets.get_nowait()

    def _accept(self, stream: MemoryStream) -> bool:
        return self._streams.put(stream)

    async def open_stream(self, addr: Address, timeout: float) -> Stream:
        if self._addr is None:
            raise TransportError("transport not started")
        return await self.net._connect(self._addr, addr, timeout)

    async def accept_stream(self) -> Stream:
        return await self._streams.get()

    async def close(self) -> None:
        if self._addr is not None:
            self.net._unregister(self._addr)
        self._packets.close()
        self._packets.drain()
        self._streams.close()
        for stream in self._streams.drain():
            await stream.close()


class MemoryStream(Stream):
    """One end of an in-memory stream."""

    def __init__(self, net: MemoryNetwork, local: Address, remote: Address) -> None:
        self.net = net
        self.local = local
        self.remote = remote
        self._peer: MemoryStream | None = None
        self._inbox: Mailbox[bytes] = Mailbox()
        self._closed = False
        self._last_arrival = 0.0

    async def send(self, frame: bytes) -> None:
        peer = self._peer
        if self._closed or peer is None or peer._closed:
            raise TransportError("stream closed")
        self.net.stats["stream_frames"] += 1
        self.net.stats["stream_bytes"] += len(frame)
        if not self.net.reachable(self.local, self.remote):
            self.net.stats["stream_frames_blackholed"] += 1
            return
        loop = asyncio.get_running_loop()
        self._last_arrival = at = self._arrival(loop)
        self.net._schedule(at, peer._inbox.put, bytes(frame))

    def _arrival(self, loop: asyncio.AbstractEventLoop) -> float:
        # Strictly after the previous frame: timers due at the same instant have no defined order.
        return max(loop.time() + self.net._delay(), self._last_arrival + 1e-6)

    async def recv(self, max_size: int) -> bytes:
        frame = await self._inbox.get()
        if len(frame) > max_size:
            raise FrameTooLarge(f"frame of {len(frame)} bytes > {max_size}")
        return frame

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.close()
        peer = self._peer
        if peer is not None:
            loop = asyncio.get_running_loop()
            self._last_arrival = at = self._arrival(loop)
            self.net._schedule(at, peer._inbox.close)
