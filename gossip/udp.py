"""Real network transport: UDP datagrams and TCP streams on one port, on asyncio.

Owns the sockets of one member. Uses only the portable asyncio APIs (create_datagram_endpoint,
start_server, open_connection), so it runs on the default loop and on uvloop (started with
``uvloop.run``; this module never installs a policy). Streams are length-prefixed frames
(4-byte big-endian length, then the frame). It must not interpret the bytes it carries.

Port 0 binds TCP first to let the OS pick a port, then UDP on the same number (retried if the
UDP port is taken). The UDP receive buffer is raised to 4 MiB where the OS allows it, so a
paused process (SIGSTOP) finds its datagrams queued when it resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
from collections import Counter
from typing import Any

from .errors import FrameTooLarge, TransportError
from .transport import Address, Mailbox, Packet, Stream, Transport

_LEN = struct.Struct(">I")
UDP_RECV_BUFFER = 4 * 1024 * 1024


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class _DatagramProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: UDPTransport) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        owner = self._owner
        packet = Packet(data, (addr[0], addr[1]), owner._loop_time())
        handler = owner.packet_handler
        if handler is not None and not owner._packets.closed:
            owner.stats["packets_in"] += 1
            owner.stats["bytes_in"] += len(data)
            handler(packet)
        elif owner._packets.put(packet):
            owner.stats["packets_in"] += 1
            owner.stats["bytes_in"] += len(data)
        else:
            owner.stats["packets_dropped_queue_full"] += 1

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable…) surface here on Linux; they are normal for gossip.
        self._owner.stats["udp_errors"] += 1


class TCPStream(Stream):
    """A framed TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        peer = writer.get_extra_info("peername")
        self.remote: Address = (peer[0], peer[1]) if peer else ("?", 0)
        self._closed = False

    async def send(self, frame: bytes) -> None:
        if self._closed:
            raise TransportError("stream closed")
        try:
            self._writer.write(_LEN.pack(len(frame)) + frame)
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            raise TransportError(f"stream send to {self.remote}: {exc}") from exc

    async def recv(self, max_size: int) -> bytes:
        if self._closed:
            raise TransportError("stream closed")
        try:
            header = await self._reader.readexactly(_LEN.size)
            (length,) = _LEN.unpack(header)
            if length > max_size:
                raise FrameTooLarge(f"frame of {length} bytes > {max_size}")
            return await self._reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise TransportError(f"stream from {self.remote} ended") from exc
        except OSError as exc:
            raise TransportError(f"stream recv from {self.remote}: {exc}") from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        with contextlib.suppress(OSError, RuntimeError, asyncio.CancelledError):
            await self._writer.wait_closed()


class UDPTransport(Transport):
    """UDP + TCP on (bind_addr, bind_port)."""

    def __init__(
        self,
        bind_addr: str = "127.0.0.1",
        bind_port: int = 0,
        *,
        queue_size: int = 4096,
        accept_backlog: int = 128,
    ) -> None:
        self.bind_addr = bind_addr
        self.bind_port = bind_port
        self.stats: Counter[str] = Counter()
        self._packets: Mailbox[Packet] = Mailbox(queue_size)
        self._streams: Mailbox[TCPStream] = Mailbox(accept_backlog)
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._addr: Address | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _loop_time(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    @property
    def local_address(self) -> Address:
        if self._addr is None:
            raise TransportError("transport not started")
        return self._addr

    async def start(self) -> Address:
        if self._addr is not None:
            return self._addr
        self._loop = asyncio.get_running_loop()
        last: OSError | None = None
        for _ in range(20):
            try:
                await self._bind()
                assert self._addr is not None
                return self._addr
            except OSError as exc:
                last = exc
                await self._close_sockets()
                if self.bind_port != 0 or exc.errno != errno.EADDRINUSE:
                    break
        raise TransportError(f"cannot bind {self.bind_addr}:{self.bind_port}: {last}") from last

    async def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(
            self._on_connection,
            host=self.bind_addr,
            port=self.bind_port,
            family=_family(self.bind_addr),
            reuse_address=True,
        )
        port = self._server.sockets[0].getsockname()[1]
        sock = socket.socket(_family(self.bind_addr), socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECV_BUFFER)
            sock.bind((self.bind_addr, port))
            sock.setblocking(False)
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _DatagramProtocol(self), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        self._addr = (self.bind_addr, port)

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        stream = TCPStream(reader, writer)
        if not self._streams.put(stream):
            self.stats["streams_refused"] += 1
            await stream.close()
            return
        self.stats["streams_in"] += 1

    def send_packet(self, addr: Address, data: bytes) -> None:
        udp = self._udp
        if udp is None or udp.is_closing():
            self.stats["send_closed"] += 1
            return
        try:
            udp.sendto(data, addr)
        except (OSError, ValueError, TypeError):  # bad address, unreachable…
            self.stats["send_errors"] += 1
            return
        self.stats["packets_out"] += 1
        self.stats["bytes_out"] += len(data)

    async def recv_packet(self) -> Packet:
        return await self._packets.get()

    def recv_packet_nowait(self) -> Packet | None:
        return self._packets.get_nowait()

    async def open_stream(self, addr: Address, timeout: float) -> Stream:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(addr[0], addr[1])
        except TimeoutError as exc:
            raise TransportError(f"connect to {addr[0]}:{addr[1]} timed out") from exc
        except OSError as exc:
            raise TransportError(f"connect to {addr[0]}:{addr[1]}: {exc}") from exc
        self.stats["streams_out"] += 1
        return TCPStream(reader, writer)

    async def accept_stream(self) -> Stream:
        return await self._streams.get()

    async def _close_sockets(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):
                await self._server.wait_closed()
            self._server = None

    async def close(self) -> None:
        self._packets.close()
        self._packets.drain()
        self._streams.close()
        for stream in self._streams.drain():
            await stream.close()
        await self._close_sockets()
