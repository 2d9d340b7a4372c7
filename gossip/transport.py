"""The transport interface gossip talks through (memberlist transport.go, asyncio flavour).

Owns the contract between the protocol and the network: best-effort datagrams (``send_packet``,
``recv_packet``) and reliable message-framed streams (``open_stream``, ``accept_stream``). It must
not know about message types, encryption or membership. Two implementations ship:
``udp.UDPTransport`` (real UDP + TCP on asyncio, uvloop-compatible) and
``memnet.MemoryNetwork`` (in-memory, seeded loss/delay/duplication/partitions).

Contract
--------
* ``send_packet`` never blocks and never raises for network trouble: a datagram may be lost,
  duplicated or reordered. Errors are counted in ``stats``.
* ``recv_packet`` yields packets in arrival order; a full inbound queue drops (counted).
  After ``close()`` it raises ``TransportError``. Alternatively a consumer sets
  ``packet_handler`` and is called with each packet as it arrives (push mode).
* Streams carry whole frames (bytes) in order or fail with ``TransportError``; ``recv`` raises
  ``FrameTooLarge`` for a frame above ``max_size``. Callers bound every stream call with a timeout.
* Only one task consumes ``recv_packet`` and one consumes ``accept_stream``.
"""

from __future__ import annotations

import abc
import asyncio
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import TransportError

Address = tuple[str, int]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Packet:
    """One datagram as received."""

    data: bytes
    source: Address
    received_at: float  # event-loop time of arrival


class Stream(abc.ABC):
    """A reliable, ordered, message-framed connection to one remote address."""

    remote: Address

    @abc.abstractmethod
    async def send(self, frame: bytes) -> None:
        """Send one frame; raise TransportError if the stream is broken."""

    @abc.abstractmethod
    async def recv(self, max_size: int) -> bytes:
        """Receive one frame; TransportError at end of stream, FrameTooLarge above max_size."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the stream (idempotent)."""


class Transport(abc.ABC):
    """Datagrams and streams for one member."""

    stats: Counter[str]
    # Optional push mode: when set, the transport calls it synchronously with every inbound
    # datagram instead of queueing it for recv_packet() (one task switch less per packet).
    # The handler must neither block nor raise.
    packet_handler: Callable[[Packet], None] | None = None

    @property
    @abc.abstractmethod
    def local_address(self) -> Address:
        """The bound (host, port); valid after start()."""

    @abc.abstractmethod
    async def start(self) -> Address:
        """Bind and start receiving; return the bound address."""

    @abc.abstractmethod
    def send_packet(self, addr: Address, data: bytes) -> None:
        """Best-effort datagram to ``addr``."""

    @abc.abstractmethod
    async def recv_packet(self) -> Packet:
        """Next inbound datagram; TransportError once closed."""

    @abc.abstractmethod
    async def open_stream(self, addr: Address, timeout: float) -> Stream:
        """Connect a stream to ``addr`` within ``timeout`` seconds, or raise TransportError."""

    @abc.abstractmethod
    async def accept_stream(self) -> Stream:
        """Next inbound stream; TransportError once closed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop receiving and release sockets (idempotent)."""


class Mailbox(Generic[T]):
    """Single-consumer FIFO with a bound and a close that wakes the consumer.

    Cheaper than asyncio.Queue on the hot path (one future per wait, none when items are
    waiting), and closing makes ``get`` drain what is left, then raise TransportError.
    """

    __slots__ = ("_closed", "_items", "_maxsize", "_waiter")

    def __init__(self, maxsize: int = 0) -> None:
        self._items: deque[T] = deque()
        self._maxsize = maxsize
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> bool:
        """Append ``item``; False (not stored) if closed or full."""
        if self._closed or (self._maxsize and len(self._items) >= self._maxsize):
            return False
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    def get_nowait(self) -> T | None:
        """The next item, or None if there is none right now."""
        return self._items.popleft() if self._items else None

    async def get(self) -> T:
        while not self._items:
            if self._closed:
                raise TransportError("closed")
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def close(self) -> None:
        """No more puts; the consumer drains what is queued, then gets TransportError."""
        self._closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def drain(self) -> list[T]:
        """Remove and return everything queued."""
        items = list(self._items)
        self._items.clear()
        return items
