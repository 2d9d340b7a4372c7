"""The balancer worker process: one event loop (uvloop) serving the data path.

Owns: its end of the control socketpair, the listening sockets it was handed (duplicates of
the agent's), every proxied connection and flow, the per-service tables and drain timers, and
its counters. Must not touch: anything of the agent -- it learns everything from control
messages and can only answer them. It never binds a port itself (the agent does, so conflicts
are reported synchronously and the listening sockets outlive a worker crash).

Life cycle: started by ``Balancer`` as ``python -m shoal.lb --control-fd N``; waits for HELLO
(its settings), then applies SET_SERVICE / REMOVE_SERVICE, answers STATS. It stops gracefully
(stop accepting, let connections finish for the grace period, then cut them) on SHUTDOWN, on
SIGTERM, and when the control socket closes -- which is how it notices that the agent died,
so a worker never outlives its agent for more than ``shutdown_grace``.

Messages are handled one at a time, in order. A malformed message is answered with an error,
counted under its DropReason, and forgotten; nothing a message contains can stop the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .channel import Channel
from .config import WORKER_FIELDS, Config
from .errors import ConfigError, DropReason, InvalidService, WireError
from .model import Listener, Proto, ServiceLB
from .proxy import RawTcpListener, SpliceConn, TcpClient, UdpFrontend
from .table import EndpointState, ServiceTable
from .wire import (
    PROTOCOL_VERSION,
    PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
    Message,
    MessageType,
    decode,
    encode_reply,
    peek_id,
)

log = logging.getLogger("shoal.lb.worker")

_QUEUE_MAX = 10_000  # control messages waiting to be handled; beyond: rejected


@dataclass
class _Service:
    table: ServiceTable
    tcp: dict[Listener, asyncio.AbstractServer | RawTcpListener] = field(default_factory=dict)
    udp: dict[Listener, UdpFrontend] = field(default_factory=dict)

    def listeners(self) -> list[str]:
        return sorted(str(x) for x in [*self.tcp, *self.udp])


class Worker:
    def __init__(self, sock: socket.socket) -> None:
        self.loop = asyncio.get_running_loop()
        self.cfg = Config()  # replaced by HELLO's settings
        self.hello = False
        self.index = 0
        self.started = time.monotonic()
        self.services: dict[str, _Service] = {}
        self.conns: set[TcpClient | SpliceConn] = set()
        self.udp_flows = 0
        self.handled = 0
        self.rejected: Counter[str] = Counter()
        self._queue: asyncio.Queue[tuple[bytes, list[int], bool]] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._grace: float | None = None
        self.chan = Channel(sock, self._on_message, self._on_close)

    # -- life cycle ----------------------------------------------------------------------------

    async def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stop, None)
        consumer = self.loop.create_task(self._consume())
        await self._stop.wait()
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        grace = self.cfg.shutdown_grace if self._grace is None else self._grace
        await self._shutdown(grace)
        self.chan.close()
        return 0

    def stop(self, grace: float | None) -> None:
        if not self._stop.is_set():
            self._grace = grace
            self._stop.set()

    def _on_close(self) -> None:
        log.info("control channel closed: shutting down")
        self.stop(self.cfg.shutdown_grace if self.hello else 0.0)

    async def _shutdown(self, grace: float) -> None:
        """Stop accepting; let connections finish for ``grace`` seconds; cut the rest."""
        for svc in self.services.values():
            for server in svc.tcp.values():
                server.close()
            for fe in svc.udp.values():
                fe.close()
        deadline = self.loop.time() + grace
        while self.conns and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.conns):
            conn.cut()
        await asyncio.sleep(0)  # let the aborts run

    # -- control messages ----------------------------------------------------------------------

    def _on_message(self, data: bytes, fds: list[int], truncated: bool) -> None:
        if self._queue.qsize() >= _QUEUE_MAX:
            _close_fds(fds)
            self.rejected[DropReason.STATE] += 1
            return
        self._queue.put_nowait((data, fds, truncated))

    async def _consume(self) -> None:
        while True:
            data, fds, truncated = await self._queue.get()
            await self._handle(data, fds, truncated)

    async def _handle(self, data: bytes, fds: list[int], truncated: bool) -> None:
        msg_id = 0
        try:
            if truncated:
                raise WireError(DropReason.TRUNCATED, "message or descriptors truncated")
            msg = decode(data)
            msg_id = msg.id
            result = await self._dispatch(msg, fds)
        except WireError as exc:
            self._reject(exc.reason, msg_id or peek_id(data), exc.to_dict())
        except InvalidService as exc:
            self._reject(DropReason.INVALID, msg_id, exc.to_dict())
        except ConfigError as exc:
            self._reject(DropReason.INVALID, msg_id, exc.to_dict())
        except Exception as exc:  # a bug: answer, count, and live on
            log.exception("control message failed")
            self._reject(DropReason.INTERNAL, msg_id,
                         {"code": "internal", "message": f"{type(exc).__name__}: {exc}",
                          "field": None})
        else:
            self.handled += 1
            await self._reply(encode_reply(msg_id, result))
        finally:
            _close_fds(fds)  # handlers dup what they keep

    def _reject(self, reason: DropReason, msg_id: int, error: dict[str, Any]) -> None:
        self.rejected[reason] += 1
        log.warning("rejected control message (%s): %s", reason, error.get("message"))
        self.loop.create_task(self._reply(encode_reply(msg_id, error=error)))

    async def _reply(self, data: bytes) -> None:
        with contextlib.suppress(Exception):  # the agent is gone: _on_close handles that
            await self.chan.send(data)

    async def _dispatch(self, msg: Message, fds: list[int]) -> dict[str, Any]:
        if msg.type is MessageType.REPLY:
            raise WireError(DropReason.SHAPE, "a worker takes requests, not replies", "t")
        if fds and msg.type is not MessageType.SET_SERVICE:
            raise WireError(DropReason.FDS, "descriptors attached to a message that takes none")
        if msg.type is MessageType.HELLO:
            return self._hello(msg.body)
        if not self.hello:
            raise WireError(DropReason.STATE, "HELLO must come first")
        if msg.type is MessageType.SET_SERVICE:
            return await self._set_service(msg.body, fds)
        if msg.type is MessageType.REMOVE_SERVICE:
            return self._remove_service(msg.body)
        if msg.type is MessageType.STATS:
            return self.stats()
        if msg.type is MessageType.SHUTDOWN:
            grace = msg.body.get("grace")
            if isinstance(grace, bool) or not isinstance(grace, int | float) or grace < 0:
                raise WireError(DropReason.INVALID, "grace must be a number >= 0", "grace")
            self.loop.call_soon(self.stop, float(grace))
            return {}
        raise WireError(DropReason.UNKNOWN_TYPE, f"unhandled message type {msg.type}", "t")

    def _hello(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.hello:
            raise WireError(DropReason.STATE, "HELLO was already received")
        version, index, settings = body.get("version"), body.get("index"), body.get("config")
        if (isinstance(version, bool) or not isinstance(version, int)
                or not PROTOCOL_VERSION_MIN <= version <= PROTOCOL_VERSION_MAX):
            raise WireError(DropReason.VERSION, f"protocol version {version!r} not in "
                            f"{PROTOCOL_VERSION_MIN}..{PROTOCOL_VERSION_MAX}", "version")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise WireError(DropReason.SHAPE, "index must be an integer >= 0", "index")
        if not isinstance(settings, dict):
            raise WireError(DropReason.SHAPE, "config must be a map", "config")
        cfg = Config()
        for key, value in settings.items():
            if key not in WORKER_FIELDS:
                raise WireError(DropReason.INVALID, f"unknown setting {key!r}", "config")
            default = getattr(cfg, key)
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, float):
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            else:
                ok = isinstance(value, type(default)) and not isinstance(value, bool)
            if not ok:
                raise WireError(DropReason.INVALID, f"setting {key} has the wrong type", key)
            setattr(cfg, key, value)
        cfg.validate()
        if cfg.worker_nice:
            os.setpriority(os.PRIO_PROCESS, 0, cfg.worker_nice)
        self.cfg, self.index, self.hello = cfg, index, True
        return {"version": PROTOCOL_VERSION, "pid": os.getpid()}

    async def _set_service(self, body: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        svc = ServiceLB.from_wire(body.get("service"))
        raw = body.get("listeners")
        if not isinstance(raw, list):
            raise WireError(DropReason.SHAPE, "listeners must be a list", "listeners")
        if len(raw) != len(fds):
            raise WireError(DropReason.FDS, f"{len(raw)} listeners but {len(fds)} descriptors")
        wanted: dict[Listener, int] = {}
        for item, fd in zip(raw, fds, strict=True):
            try:
                addr, port, proto = item
                lst = Listener(str(addr), int(port), Proto(proto))
            except (TypeError, ValueError) as exc:
                raise WireError(DropReason.SHAPE, f"bad listener {item!r}", "listeners"
                                ) from exc
            wanted[lst] = fd
        state = self.services.get(svc.name)
        if state is None:
            state = _Service(ServiceTable(svc.name))
        new_tcp: dict[Listener, asyncio.AbstractServer | RawTcpListener] = {}
        new_udp: dict[Listener, UdpFrontend] = {}
        table = state.table
        try:
            for lst, fd in wanted.items():
                if lst in state.tcp or lst in state.udp:
                    continue  # already serving it (the received fd is a duplicate)
                sock = _adopt(fd, lst)
                if lst.proto is Proto.TCP and self.cfg.splice:
                    sock.listen(self.cfg.backlog)
                    new_tcp[lst] = RawTcpListener(self, table, sock)
                elif lst.proto is Proto.TCP:
                    new_tcp[lst] = await self.loop.create_server(
                        lambda t=table: TcpClient(self, t),  # type: ignore[misc]
                        sock=sock, backlog=self.cfg.backlog, start_serving=False)
                else:
                    new_udp[lst] = UdpFrontend(self, table, sock)
        except BaseException:
            for server in new_tcp.values():
                server.close()
            for fe in new_udp.values():
                fe.close()
            raise
        # The switch: one synchronous step, so a connection sees the old or the new table.
        self._arm(table, table.update(svc, self.loop.time(), time.time(),
                                      self.cfg.drain_timeout))
        table.removed = False
        self.services[svc.name] = state
        for lst in [x for x in state.tcp if x not in wanted]:
            state.tcp.pop(lst).close()
        for lst in [x for x in state.udp if x not in wanted]:
            state.udp.pop(lst).close()
        state.tcp.update(new_tcp)
        state.udp.update(new_udp)
        for fe in new_udp.values():
            fe.start()
        for server in new_tcp.values():
            if isinstance(server, RawTcpListener):
                server.start()
            else:
                await server.start_serving()
        return {"listeners": state.listeners()}

    def _remove_service(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("name")
        if not isinstance(name, str):
            raise WireError(DropReason.SHAPE, "name must be a string", "name")
        state = self.services.pop(name, None)
        if state is None:
            return {"existed": False}
        for server in state.tcp.values():
            server.close()
        for fe in state.udp.values():
            fe.close()  # UDP flows end with their frontend
        self._arm(state.table, state.table.remove(self.loop.time(), self.cfg.drain_timeout))
        return {"existed": True}

    # -- draining ------------------------------------------------------------------------------

    def _arm(self, table: ServiceTable, changed: list[EndpointState]) -> None:
        for ep in changed:
            if ep.timer is not None:
                ep.timer.cancel()
            assert ep.deadline is not None
            ep.timer = self.loop.call_at(ep.deadline, self._deadline, table, ep)

    def _deadline(self, table: ServiceTable, ep: EndpointState) -> None:
        ep.timer = None
        ep.gone = True
        for conn in list(ep.conns):
            conn.cut()
        if table.draining.get(ep.key) is ep:
            del table.draining[ep.key]

    # -- stats ---------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        services = {}
        for name, state in self.services.items():
            services[name] = {**state.table.stats(), "listeners": state.listeners()}
        return {
            "pid": os.getpid(), "index": self.index,
            "uptime": round(time.monotonic() - self.started, 3),
            "tcp_active": len(self.conns), "udp_flows": self.udp_flows,
            "control_handled": self.handled, "control_rejected": dict(self.rejected),
            "services": services,
        }


def _adopt(fd: int, lst: Listener) -> socket.socket:
    """A socket object on a duplicate of ``fd``, checked to be the listener it claims."""
    dup = os.dup(fd)
    try:
        sock = socket.socket(fileno=dup)
    except OSError as exc:
        os.close(dup)
        raise WireError(DropReason.FDS, f"descriptor for {lst} is not a socket") from exc
    try:
        want = socket.SOCK_STREAM if lst.proto is Proto.TCP else socket.SOCK_DGRAM
        if sock.type != want or sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise WireError(DropReason.FDS, f"descriptor for {lst} is not an IP {lst.proto} "
                            "socket")
        if lst.proto is Proto.TCP and not sock.getsockopt(socket.SOL_SOCKET,
                                                          socket.SO_ACCEPTCONN):
            raise WireError(DropReason.FDS, f"descriptor for {lst} is not listening")
        if sock.getsockname()[1] != lst.port:
            raise WireError(DropReason.FDS, f"descriptor for {lst} is bound to another port")
    except BaseException:
        sock.close()
        raise
    return sock


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


async def serve(control_fd: int) -> int:
    """Run a worker on the inherited control descriptor until it is told (or made) to stop."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # each spliced connection holds 6 descriptors
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sock = socket.socket(fileno=control_fd)
    worker = Worker(sock)
    return await worker.run()
