"""The data path of a worker: proxied TCP connections and UDP flows.

Owns: the protocol objects of every proxied TCP connection (client side and backend side),
the UDP frontends with their per-flow table, and the per-connection accounting on
``EndpointState``. Must not touch: the tables' contents (``ServiceTable.update`` owns those)
or the control channel.

TCP: a client connection is accepted with reading paused; the worker connects to an endpoint
picked from the table (a refused/unreachable/slow endpoint is put in back-off and the next one
is tried, up to ``connect_attempts``), then bytes flow both ways through asyncio protocols
(``data_received`` -> ``write`` of the other transport; no streams, no per-chunk task), with
flow control (a full write buffer on one side pauses reading on the other) and half-close
(EOF is forwarded; the pair closes once both directions ended).

TCP with ``Config.splice``: the worker accepts on the raw listening socket itself and moves
bytes socket -> pipe -> socket with splice(2), one pipe per direction (``SpliceConn``): the
bytes never enter Python, which saves CPU on bulk transfers and costs extra system calls on
small messages. Same selection, retries, draining and accounting as the protocol path.

UDP: one frontend socket; each client address:port is a flow with its own connected socket to
the backend picked when the flow starts (so replies come back to the right client, and a flow
sticks to its backend). A flow ends after ``udp_idle_timeout`` without traffic either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, cast

from .config import Config
from .table import EndpointState, ServiceTable

T = TypeVar("T")

_UDP_BATCH = 64  # datagrams read per readiness callback before yielding to the loop


class WorkerContext(Protocol):
    """What the data path uses of its worker (lb/worker.py's ``Worker`` is the one
    implementation). A protocol, so that this module does not import the worker that imports
    it."""

    loop: asyncio.AbstractEventLoop  # the worker's event loop
    cfg: Config  # the worker's settings (from HELLO)
    conns: set[TcpClient | SpliceConn]  # open TCP connections, for draining at shutdown
    udp_flows: int  # live UDP flows, against cfg.udp_max_flows


def _sock_opts(transport: asyncio.BaseTransport, sndbuf: int, rcvbuf: int) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)


async def connect_any(table: ServiceTable, cfg: Config, loop: asyncio.AbstractEventLoop,
                      dial: Callable[[EndpointState], Awaitable[T]]
                      ) -> tuple[EndpointState, T] | None:
    """Connect a client's backend: up to ``cfg.connect_attempts`` endpoints (0 = each eligible
    one once) in ``table.pick`` order, each ``dial`` within ``cfg.connect_timeout``; a failed
    one (OSError, timeout) is counted, backed off for ``cfg.fail_backoff`` and the next one
    tried. (endpoint, what ``dial`` returned), or None when every try failed (counted in
    ``table.failed``)."""
    attempts = cfg.connect_attempts or max(1, len(table.eligible))
    tried: list[EndpointState] = []
    for _ in range(attempts):
        ep = table.pick(loop.time(), tried)
        if ep is None:
            break
        tried.append(ep)
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                return ep, await dial(ep)
        except (OSError, TimeoutError):
            ep.failed += 1
            if cfg.fail_backoff:
                ep.down_until = loop.time() + cfg.fail_backoff
            table.retries += 1
    table.failed += 1
    return None


class TcpClient(asyncio.Protocol):
    """The client-facing half of a proxied TCP connection (owns the pair's life cycle)."""

    __slots__ = (
        "backend",
        "closed",
        "early",
        "eof",
        "ep",
        "peer",
        "table",
        "task",
        "transport",
        "worker",
    )

    def __init__(self, worker: WorkerContext, table: ServiceTable) -> None:
        self.worker = worker
        self.table = table
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None  # the backend transport, once connected
        self.backend: TcpBackend | None = None
        self.ep: EndpointState | None = None
        self.task: asyncio.Task[None] | None = None
        self.early: list[bytes] = []  # bytes the client sent before the backend connected
        self.eof = False
        self.closed = False

    # -- set-up --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        # Stock asyncio honours this; uvloop starts reading after connection_made anyway, so
        # data_received also pauses (and keeps what came) until the backend is connected.
        self.transport.pause_reading()  # nothing to forward to until a backend is connected
        self.table.connections += 1
        self.worker.conns.add(self)
        self.task = self.worker.loop.create_task(self._connect())

    async def _connect(self) -> None:
        cfg, loop = self.worker.cfg, self.worker.loop

        async def dial(ep: EndpointState) -> tuple[TcpBackend, asyncio.BaseTransport]:
            backend = TcpBackend(self)
            if cfg.sndbuf or cfg.rcvbuf:
                transport, _ = await self._connect_tuned(ep, backend)
            else:
                transport, _ = await loop.create_connection(
                    lambda b=backend: b, ep.addr, ep.port)  # type: ignore[misc]
            return backend, transport

        got = await connect_any(self.table, cfg, loop, dial)
        if got is None:
            if self.transport is not None:
                self.transport.abort()  # every try failed: the client sees a reset
            return
        ep, (backend, transport) = got
        self._attach(ep, backend, cast(asyncio.Transport, transport))

    async def _connect_tuned(self, ep: EndpointState, backend: TcpBackend
                             ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        cfg, loop = self.worker.cfg, self.worker.loop
        family = socket.AF_INET6 if ":" in ep.addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if cfg.sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, cfg.sndbuf)
            if cfg.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cfg.rcvbuf)
            sock.setblocking(False)
            await loop.sock_connect(sock, (ep.addr, ep.port))
            return await loop.create_connection(lambda: backend, sock=sock)
        except BaseException:
            sock.close()
            raise

    def _attach(self, ep: EndpointState, backend: TcpBackend,
                transport: asyncio.Transport) -> None:
        cfg = self.worker.cfg
        if self.closed or self.transport is None:  # the client left meanwhile (released)
            transport.abort()
            return
        self.ep, self.backend, self.peer = ep, backend, transport
        ep.active += 1
        ep.total += 1
        ep.conns.add(self)
        if ep.gone:  # its drain ended while we connected: connection_lost releases it
            self.cut()
            return
        transport.set_write_buffer_limits(high=cfg.write_buffer_high)
        self.transport.set_write_buffer_limits(high=cfg.write_buffer_high)
        if cfg.sndbuf or cfg.rcvbuf:
            _sock_opts(self.transport, cfg.sndbuf, cfg.rcvbuf)
        if self.early:
            n = sum(len(b) for b in self.early)
            ep.bytes_in += n
            self.table.bytes_in += n
            transport.writelines(self.early)
            self.early = []
        if self.eof:
            transport.write_eof()
        else:
            self.transport.resume_reading()

    # -- data path (hot) -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:  # not connected yet (uvloop): keep it, stop reading
            self.early.append(data)
            self.transport.pause_reading()  # type: ignore[union-attr]
            return
        n = len(data)
        self.table.bytes_in += n
        ep = self.ep
        if ep is not None:
            ep.bytes_in += n
        peer.write(data)

    def pause_writing(self) -> None:  # the client is slow: stop reading the backend
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.is_closing():
            self.peer.resume_reading()

    # -- endings -------------------------------------------------------------------------------

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and not peer.is_closing() and peer.can_write_eof():
            peer.write_eof()
        if self.backend is not None and self.backend.eof:
            self._finish()
        return True  # keep the transport open: the other direction may still be flowing

    def _finish(self) -> None:
        """Both directions ended: close both sides (buffered data is still flushed)."""
        if self.transport is not None:
            self.transport.close()
        if self.peer is not None:
            self.peer.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
        peer = self.peer
        if peer is not None and not peer.is_closing():
            if exc is None:
                peer.close()
            else:
                peer.abort()
        self._release()

    def backend_lost(self, exc: Exception | None) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if exc is None:
                transport.close()  # flush what the backend sent, then FIN
            else:
                transport.abort()

    def cut(self) -> None:
        """Drop the connection now (drain deadline passed, or shutdown): RST both ways."""
        if self.peer is not None:
            self.peer.abort()
        if self.transport is not None:
            self.transport.abort()

    def _release(self) -> None:
        self.worker.conns.discard(self)
        ep = self.ep
        if ep is not None:
            self.ep = None
            ep.active -= 1
            ep.conns.discard(self)
            self.table.release(ep)


class TcpBackend(asyncio.Protocol):
    """The backend-facing half of a proxied TCP connection."""

    __slots__ = ("client", "down", "eof", "transport")

    def __init__(self, client: TcpClient) -> None:
        self.client = client
        self.down = client.transport
        self.transport: asyncio.Transport | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        client = self.client
        n = len(data)
        client.table.bytes_out += n
        ep = client.ep
        if ep is not None:
            ep.bytes_out += n
        self.down.write(data)  # type: ignore[union-attr]

    def pause_writing(self) -> None:  # the backend is slow: stop reading the client
        self.down.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        down = self.down
        if down is not None and not down.is_closing():
            down.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        down = self.down
        if down is not None and not down.is_closing() and down.can_write_eof():
            down.write_eof()
        if self.client.eof:
            self.client._finish()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.backend_lost(exc)


# ---------------------------------------------------------------------------------------------
# UDP


class UdpFlow:
    """One client address:port and the connected socket towards its backend."""

    __slots__ = ("client", "ep", "frontend", "last", "sock")

    def __init__(self, frontend: UdpFrontend, client: Any, ep: EndpointState,
                 sock: socket.socket, now: float) -> None:
        self.frontend = frontend
        self.client = client
        self.ep = ep
        self.sock = sock
        self.last = now
        frontend.worker.loop.add_reader(sock.fileno(), self._readable)

    def send(self, data: bytes) -> bool:
        """Forward one datagram to the backend; False if the backend refuses (ICMP)."""
        try:
            self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            self.frontend.table.udp_dropped += 1
        except OSError:  # ECONNREFUSED from an earlier ICMP port unreachable, and the like
            return False
        else:
            self.ep.bytes_in += len(data)
            self.frontend.table.bytes_in += len(data)
        return True

    def _readable(self) -> None:
        fe = self.frontend
        out, client, size = fe.sock, self.client, fe.worker.cfg.udp_max_datagram
        for _ in range(_UDP_BATCH):
            try:
                data = self.sock.recv(size)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # the backend is gone (ICMP port unreachable)
                self.ep.failed += 1
                self.ep.down_until = fe.worker.loop.time() + fe.worker.cfg.fail_backoff
                self.close()
                return
            try:
                out.sendto(data, client)
            except OSError:
                fe.table.udp_dropped += 1
            else:
                self.ep.bytes_out += len(data)
                fe.table.bytes_out += len(data)
        self.last = fe.worker.loop.time()

    def cut(self) -> None:
        self.close()

    def close(self) -> None:
        fe = self.frontend
        if fe.flows.get(self.client) is not self:
            return
        del fe.flows[self.client]
        fe.worker.udp_flows -= 1
        with contextlib.suppress(ValueError, OSError):
            fe.worker.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        ep = self.ep
        ep.active -= 1
        ep.conns.discard(self)
        fe.table.release(ep)


class UdpFrontend:
    """A UDP listener of one service: demultiplexes datagrams into flows."""

    def __init__(self, worker: WorkerContext, table: ServiceTable, sock: socket.socket) -> None:
        self.worker = worker
        self.table = table
        self.sock = sock
        self.flows: dict[Any, UdpFlow] = {}
        self.closed = True
        self._sweeper: asyncio.TimerHandle | None = None
        sock.setblocking(False)

    def start(self) -> None:
        self.closed = False
        self.worker.loop.add_reader(self.sock.fileno(), self._readable)
        self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        period = min(1.0, self.worker.cfg.udp_idle_timeout / 4)
        self._sweeper = self.worker.loop.call_later(period, self._sweep)

    def _sweep(self) -> None:
        cutoff = self.worker.loop.time() - self.worker.cfg.udp_idle_timeout
        for flow in [f for f in self.flows.values() if f.last < cutoff]:
            flow.close()
        if not self.closed:
            self._schedule_sweep()

    def _readable(self) -> None:
        sock, flows, size = self.sock, self.flows, self.worker.cfg.udp_max_datagram
        now = self.worker.loop.time()
        for _ in range(_UDP_BATCH):
            try:
                data, client = sock.recvfrom(size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            flow = flows.get(client)
            if flow is None:
                self.table.connections += 1
                flow = self._new_flow(client, now, data)
                continue
            flow.last = now
            if not flow.send(data):
                self._refused(flow)
                self._new_flow(client, now, data)

    def _refused(self, flow: UdpFlow) -> None:
        flow.ep.failed += 1
        flow.ep.down_until = self.worker.loop.time() + self.worker.cfg.fail_backoff
        flow.close()

    def _new_flow(self, client: Any, now: float, first: bytes) -> UdpFlow | None:
        worker, table = self.worker, self.table
        if worker.udp_flows >= worker.cfg.udp_max_flows:
            table.udp_dropped += 1
            return None
        attempts = worker.cfg.connect_attempts or max(1, len(table.eligible))
        tried: list[EndpointState] = []
        for _ in range(attempts):
            ep = table.pick(now, tried)
            if ep is None:
                break
            tried.append(ep)
            family = socket.AF_INET6 if ":" in ep.addr else socket.AF_INET
            bsock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                bsock.setblocking(False)
                bsock.connect((ep.addr, ep.port))
            except OSError:
                bsock.close()
                ep.failed += 1
                table.retries += 1
                continue
            flow = UdpFlow(self, client, ep, bsock, now)
            self.flows[client] = flow
            worker.udp_flows += 1
            ep.active += 1
            ep.total += 1
            ep.conns.add(flow)
            if ep.gone:
                flow.close()
                break
            if flow.send(first):
                return flow
            self._refused(flow)
            table.retries += 1
        table.failed += 1
        table.udp_dropped += 1
        return None

    def close(self) -> None:
        """Stop listening and end every flow (replies leave through this socket, so UDP
        flows cannot outlive their frontend; flows to a draining endpoint do, while the
        frontend stays)."""
        self.close_flows()
        if not self.closed:
            self.closed = True
            with contextlib.suppress(ValueError, OSError):
                self.worker.loop.remove_reader(self.sock.fileno())
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.sock.close()

    def close_flows(self) -> None:
        for flow in list(self.flows.values()):
            flow.close()


# ---------------------------------------------------------------------------------------------
# TCP through splice(2) (Config.splice): bytes move socket -> pipe -> socket inside the kernel.

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_PIPE_SIZE = 1 << 20  # bytes per direction (capped by /proc/sys/fs/pipe-max-size for non-root)
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


class RawTcpListener:
    """A TCP frontend in splice mode: accepts by itself (a uvloop server would own the client
    sockets, and a transport's fd cannot be spliced)."""

    def __init__(self, worker: WorkerContext, table: ServiceTable, sock: socket.socket) -> None:
        self.worker = worker
        self.table = table
        self.sock = sock
        self.serving = False
        sock.setblocking(False)

    def start(self) -> None:
        self.serving = True
        self.worker.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and the like: try again on the next wakeup
                return
            client.setblocking(False)
            with contextlib.suppress(OSError):
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            SpliceConn(self.worker, self.table, client)

    def close(self) -> None:
        if self.serving:
            self.serving = False
            with contextlib.suppress(ValueError, OSError):
                self.worker.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class SpliceConn:
    """A proxied TCP connection moved by splice(2): one pipe per direction."""

    __slots__ = ("backend", "client", "closed", "dirs", "ep", "table", "task", "worker")

    def __init__(self, worker: WorkerContext, table: ServiceTable, client: socket.socket) -> None:
        self.worker = worker
        self.table = table
        self.client = client
        self.backend: socket.socket | None = None
        self.ep: EndpointState | None = None
        self.dirs: list[_SpliceDir] = []
        self.closed = False
        table.connections += 1
        worker.conns.add(self)
        self.task: asyncio.Task[None] | None = worker.loop.create_task(self._connect())

    async def _connect(self) -> None:
        loop = self.worker.loop

        async def dial(ep: EndpointState) -> socket.socket:
            family = socket.AF_INET6 if ":" in ep.addr else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, (ep.addr, ep.port))
            except BaseException:
                sock.close()
                raise
            return sock

        got = await connect_any(self.table, self.worker.cfg, loop, dial)
        self.task = None
        if got is None:
            self._close(abort=True)
            return
        self._attach(*got)

    def _attach(self, ep: EndpointState, sock: socket.socket) -> None:
        if self.closed:
            sock.close()
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.backend, self.ep = sock, ep
        ep.active += 1
        ep.total += 1
        ep.conns.add(self)
        if ep.gone:
            self.cut()
            return
        try:  # (each kept as soon as made: a cut closes the pipe and the watch it has)
            self.dirs.append(_SpliceDir(self, self.client, sock))
            self.dirs.append(_SpliceDir(self, sock, self.client, up=False))
        except OSError:  # out of descriptors for a pipe
            self.cut()

    def count(self, n: int, up: bool) -> None:
        """``n`` bytes moved (up: client → backend)."""
        ep = self.ep
        if up:
            self.table.bytes_in += n
            if ep is not None:
                ep.bytes_in += n
        else:
            self.table.bytes_out += n
            if ep is not None:
                ep.bytes_out += n

    def dir_done(self) -> None:
        if all(d.done for d in self.dirs):
            self._close()

    def cut(self) -> None:
        self._close(abort=True)

    def _close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self.task is not None:
            self.task.cancel()
        for d in self.dirs:
            d.close()
        for sock in (self.client, self.backend):
            if sock is None:
                continue
            if abort:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            sock.close()
        self.worker.conns.discard(self)
        ep = self.ep
        if ep is not None:
            self.ep = None
            ep.active -= 1
            ep.conns.discard(self)
            self.table.release(ep)


class _SpliceDir:
    """One direction of a SpliceConn: src socket -> pipe -> dst socket."""

    __slots__ = ("conn", "done", "dst", "dst_sock", "eof", "loop", "queued", "r", "src", "up",
                 "w", "waiting")

    def __init__(self, conn: SpliceConn, src: socket.socket, dst: socket.socket,
                 up: bool = True) -> None:
        self.conn = conn
        self.up = up  # client → backend (counted as bytes_in), else backend → client
        self.loop = conn.worker.loop
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        self.src, self.dst, self.dst_sock = src.fileno(), dst.fileno(), dst
        self.queued = 0  # bytes in the pipe
        self.eof = False
        self.done = False
        self.waiting = False  # dst is full: waiting for it to drain, src not read meanwhile
        self.loop.add_reader(self.src, self._readable)

    def _readable(self) -> None:
        try:
            n = os.splice(self.src, self.w, _PIPE_SIZE, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.conn.cut()
            return
        if n == 0:
            self.eof = True
            self.loop.remove_reader(self.src)
            if not self.queued:
                self._finish()
            return
        self.queued += n
        self._flush()

    def _flush(self) -> None:
        while self.queued:
            try:
                n = os.splice(self.r, self.dst, self.queued, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                if not self.waiting:
                    self.waiting = True
                    if not self.eof:
                        self.loop.remove_reader(self.src)
                    self.loop.add_writer(self.dst, self._flush)
                return
            except OSError:
                self.conn.cut()
                return
            self.queued -= n
            self.conn.count(n, self.up)
        if self.waiting:
            self.waiting = False
            self.loop.remove_writer(self.dst)
            if not self.eof:
                self.loop.add_reader(self.src, self._readable)
        if self.eof:
            self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        with contextlib.suppress(OSError):
            self.dst_sock.shutdown(socket.SHUT_WR)  # forward the EOF
        self.conn.dir_done()

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.src)
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_writer(self.dst)
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)
