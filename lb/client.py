"""``Balancer``: the agent's handle on the node's balancer (the routing-mesh data path).

Owns: the desired tables (one ServiceLB per service), the listening sockets of every frontend
(bound here, in the agent, so a port conflict is an immediate typed error and the sockets
outlive a worker crash), and the worker processes -- starting them, feeding them, noticing
their death (control socket EOF, or no answer within ``control_timeout``) and restarting them
with every table re-sent. Must not touch: connections (workers own all traffic) and the
cluster state (the agent translates tasks into ServiceLB tables).

The agent's event loop only ever does control work here: a few small messages per update.
All proxying runs in the worker processes, so load on the data path cannot delay Raft or
gossip in the agent (and vice versa).

Process model::

    agent (event loop) ── Balancer
       │  holds: listening sockets (bound, listen()ing; never accepted from here)
       │  AF_UNIX SOCK_SEQPACKET socketpair per worker: msgpack messages + SCM_RIGHTS fds
       ▼
    python -m shoal.lb --control-fd N     (Config.workers of them)  (own session; uvloop)
       accept / connect / proxy; per-service tables; drain timers

While a worker restarts, TCP connections wait in the (agent-held) listen backlog instead of
being refused; they are served as soon as the new worker has its tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import subprocess
from collections import Counter
from collections.abc import Mapping
from typing import Any, TypedDict

from .channel import Channel, socketpair
from .config import Config
from .errors import (
    AddressNotAvailable,
    BalancerUnavailable,
    FrontendError,
    LBError,
    PortConflict,
    PortInUse,
    PortPermissionDenied,
    ProtocolError,
    WireError,
    WorkerGone,
)
from .model import Listener, Listeners, Proto, ServiceLB
from .wire import PROTOCOL_VERSION, Message, MessageType, decode, encode

log = logging.getLogger("shoal.lb")

_IP_FREEBIND = 15  # linux/in.h
_STABLE_AFTER = 10.0  # seconds a worker must live for the restart back-off to reset


class EndpointStats(TypedDict):
    addr: str
    port: int
    active: int  # connections/flows open now
    total: int  # connections/flows opened since the worker(s) started
    failed: int  # connect attempts that failed (refused, unreachable, timeout)
    bytes_in: int  # bytes forwarded from clients to it
    bytes_out: int  # bytes forwarded from it to clients
    draining: bool


class ServiceStats(TypedDict):
    connections: int  # client connections + UDP flows accepted
    active: int
    retries: int  # connect attempts that moved on to another endpoint
    failed: int  # connections/flows that found no working endpoint (client saw a reset)
    udp_dropped: int
    bytes_in: int  # bytes forwarded client → backend (TCP payload, UDP datagrams)
    bytes_out: int  # bytes forwarded backend → client
    listeners: list[str]
    endpoints: dict[str, EndpointStats]  # by task id


class WorkerStats(TypedDict):
    index: int
    pid: int | None
    alive: bool
    uptime: float
    tcp_active: int
    udp_flows: int
    control_handled: int
    control_rejected: dict[str, int]


class Stats(TypedDict):
    restarts: int  # worker restarts since start()
    control_rejected: dict[str, int]  # by DropReason, summed over workers
    workers: list[WorkerStats]
    services: dict[str, ServiceStats]  # summed over workers


class _Slot:
    """One worker process and its control channel."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.chan: Channel | None = None
        self.ready = False  # HELLO done and tables sent: updates go to it
        self.lock = asyncio.Lock()  # serialises what is sent to this worker
        self.gone = asyncio.Event()
        self.pending: dict[int, asyncio.Future[Message]] = {}
        self.last_id = 0
        self.started = 0.0
        self.supervisor: asyncio.Task[None] | None = None

    def next_id(self) -> int:
        self.last_id = self.last_id % (2**32 - 1) + 1
        return self.last_id


class Balancer:
    """The node's load balancer. One per agent; all methods run on the agent's event loop.

    ``start()`` spawns the workers; then call ``set_service`` whenever a service's published
    ports, VIP or set of healthy RUNNING tasks changes (the whole table, each time), and
    ``remove_service`` when a service goes. ``close()`` stops everything.
    """

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self.config.validate()
        self.restarts = 0
        self._services: dict[str, ServiceLB] = {}
        self._socks: dict[str, dict[Listener, socket.socket]] = {}
        self._slots = [_Slot(i) for i in range(self.config.workers)]
        self._update_lock = asyncio.Lock()
        self._started = False
        self._closing = False

    # -- public API ----------------------------------------------------------------------------

    @property
    def services(self) -> Mapping[str, ServiceLB]:
        """The tables as last set (what the workers serve, or will once restarted)."""
        return dict(self._services)

    @property
    def pids(self) -> list[int | None]:
        """The worker processes' pids (None while one is being restarted)."""
        return [s.proc.pid if s.proc is not None and s.ready else None for s in self._slots]

    async def start(self) -> None:
        """Start the worker processes; raise BalancerUnavailable if one cannot start."""
        if self._started:
            raise BalancerUnavailable("balancer already started")
        self._started = True
        try:
            for slot in self._slots:
                await self._spawn(slot)
        except BaseException:
            await self.close()
            raise
        for slot in self._slots:
            slot.supervisor = asyncio.get_running_loop().create_task(self._supervise(slot))

    async def set_service(self, service: ServiceLB) -> None:
        """Serve ``service`` exactly as described, replacing its previous table atomically.

        Opens new frontends first (raising InvalidService, PortConflict, PortInUse,
        AddressNotAvailable or PortPermissionDenied with nothing changed), then returns once
        every running worker applied the table. Endpoints no longer listed (or listed with a
        ``drain_deadline``) get no new connections from then on; their open connections drain
        until the deadline (``Config.drain_timeout`` when none was given).
        """
        self._check_open()
        service.validate()
        async with self._update_lock:
            wanted = Listeners.of(service, self.config.listen_addrs).items
            self._check_conflicts(service, wanted)
            current = self._socks.get(service.name, {})
            fresh: dict[Listener, socket.socket] = {}
            try:
                for lst in wanted:
                    if lst not in current:
                        fresh[lst] = self._bind(lst, service)
            except BaseException:
                for sock in fresh.values():
                    sock.close()
                raise
            socks = {lst: current.get(lst) or fresh[lst] for lst in wanted}
            stale = [sock for lst, sock in current.items() if lst not in socks]
            self._services[service.name] = service
            self._socks[service.name] = socks
            try:
                await self._broadcast(service.name)
            finally:
                for sock in stale:
                    sock.close()

    async def remove_service(self, name: str) -> bool:
        """Stop serving ``name``: its ports close now, open connections drain for
        ``Config.drain_timeout`` (UDP flows end at once). False if it was not served."""
        self._check_open()
        async with self._update_lock:
            if name not in self._services:
                return False
            del self._services[name]
            socks = self._socks.pop(name, {})
            try:
                await self._broadcast(name)
            finally:
                for sock in socks.values():
                    sock.close()
            return True

    async def stats(self) -> Stats:
        """Counters of every worker, summed per service and endpoint."""
        self._check_open()
        answers = await asyncio.gather(*(self._stats_of(s) for s in self._slots))
        rejected: Counter[str] = Counter()
        workers: list[WorkerStats] = []
        services: dict[str, ServiceStats] = {}
        for slot, ans in zip(self._slots, answers, strict=True):
            pid = slot.proc.pid if slot.proc is not None else None
            if ans is None:
                workers.append(WorkerStats(index=slot.index, pid=pid, alive=False, uptime=0.0,
                                           tcp_active=0, udp_flows=0, control_handled=0,
                                           control_rejected={}))
                continue
            rejected.update(ans["control_rejected"])
            workers.append(WorkerStats(
                index=slot.index, pid=pid, alive=True, uptime=ans["uptime"],
                tcp_active=ans["tcp_active"], udp_flows=ans["udp_flows"],
                control_handled=ans["control_handled"],
                control_rejected=dict(ans["control_rejected"])))
            for name, svc in ans["services"].items():
                _merge_service(services, name, svc)
        return Stats(restarts=self.restarts, control_rejected=dict(rejected), workers=workers,
                     services=services)

    async def close(self) -> None:
        """Stop the workers (connections get ``Config.shutdown_grace`` to finish) and close
        every frontend. Idempotent."""
        if self._closing:
            return
        self._closing = True
        grace = self.config.shutdown_grace
        for slot in self._slots:
            if slot.supervisor is not None:
                slot.supervisor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await slot.supervisor

        async def stop(slot: _Slot) -> None:
            if slot.ready:
                with contextlib.suppress(WorkerGone, LBError):
                    await self._request(slot, MessageType.SHUTDOWN, {"grace": grace})
            else:  # half-started (close() interrupted a restart): nothing to drain
                self._kill(slot)
            await self._reap(slot, grace + 2.0)

        await asyncio.gather(*(stop(s) for s in self._slots))
        for socks in self._socks.values():
            for sock in socks.values():
                sock.close()
        self._socks.clear()

    # -- frontends -----------------------------------------------------------------------------

    def _check_conflicts(self, service: ServiceLB, wanted: list[Listener]) -> None:
        for i, a in enumerate(wanted):
            for b in wanted[i + 1:]:
                if a.conflicts(b):
                    raise PortConflict(
                        f"service {service.name!r}: listeners {a} and {b} overlap (a "
                        "wildcard listen address and a VIP cannot share a port; set "
                        "Config.listen_addrs to the node's addresses)", _field(service, b))
        for other, socks in self._socks.items():
            if other == service.name:
                continue
            for a in wanted:
                for b in socks:
                    if a.conflicts(b):
                        raise PortConflict(f"port {a.port}/{a.proto} is already published by "
                                           f"service {other!r} ({b})", _field(service, a))

    def _bind(self, lst: Listener, service: ServiceLB) -> socket.socket:
        family = socket.AF_INET6 if ":" in lst.addr else socket.AF_INET
        tcp = lst.proto is Proto.TCP
        sock = socket.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
        try:
            if tcp:  # rebinding while old connections sit in TIME_WAIT (no effect on LISTEN)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if self.config.vip_freebind and lst.addr == service.vip:
                sock.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
            sock.bind((lst.addr, lst.port))
            if tcp:
                sock.listen(self.config.backlog)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise _bind_error(lst, exc, _field(service, lst)) from exc
        return sock

    # -- workers -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._started:
            raise BalancerUnavailable("balancer not started (call start() first)")
        if self._closing:
            raise BalancerUnavailable("balancer is closed")

    async def _spawn(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        parent, child = socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                self.config.python, "-m", "shoal.lb", "--control-fd", str(child.fileno()),
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            parent.close()
            raise BalancerUnavailable(f"cannot start {self.config.python} -m shoal.lb: "
                                      f"{exc}") from exc
        finally:
            child.close()
        slot.proc, slot.started = proc, loop.time()
        slot.gone = asyncio.Event()
        slot.chan = Channel(parent, lambda d, f, t: self._on_message(slot, d, f, t),
                            lambda: self._on_gone(slot))
        async with slot.lock:
            try:
                await self._request(slot, MessageType.HELLO, {
                    "version": PROTOCOL_VERSION, "index": slot.index,
                    "config": self.config.worker_fields()}, self.config.start_timeout,
                    starting=True)
                for name in list(self._services):
                    await self._push(slot, name, starting=True)
            except BaseException as exc:  # leave no half-started worker behind
                self._kill(slot)
                await self._reap(slot, 2.0)
                if isinstance(exc, WorkerGone):
                    raise BalancerUnavailable(f"balancer worker {slot.index} did not start "
                                              f"(exit code {proc.returncode})") from exc
                raise
            slot.ready = True
        log.info("balancer worker %d running (pid %d)", slot.index, proc.pid)

    async def _supervise(self, slot: _Slot) -> None:
        """Probe the worker every ``health_interval`` (no answer within control_timeout: it
        is killed) and restart it whenever it dies, with back-off, until close()."""
        cfg = self.config
        backoff = cfg.restart_backoff_min
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                await asyncio.wait_for(slot.gone.wait(), cfg.health_interval)
            except TimeoutError:
                await self._stats_of(slot)  # a wedged worker is killed by _request
                continue
            if self._closing:
                return
            lived = loop.time() - slot.started
            await self._reap(slot, 2.0)
            self.restarts += 1
            code = slot.proc.returncode if slot.proc is not None else None
            log.warning("balancer worker %d died (exit code %s) after %.1fs: restarting",
                        slot.index, code, lived)
            if lived >= _STABLE_AFTER:
                backoff = cfg.restart_backoff_min
            while not self._closing:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, cfg.restart_backoff_max)
                try:
                    await self._spawn(slot)
                    break
                except BalancerUnavailable as exc:
                    log.error("%s; retrying in %.2fs", exc, backoff)

    async def _broadcast(self, name: str) -> None:
        async def one(slot: _Slot) -> None:
            async with slot.lock:
                if slot.ready:
                    with contextlib.suppress(WorkerGone):
                        await self._push(slot, name)

        await asyncio.gather(*(one(s) for s in self._slots))

    async def _push(self, slot: _Slot, name: str, starting: bool = False) -> None:
        """Send the *current* table of ``name`` (so the last update always wins)."""
        svc = self._services.get(name)
        if svc is None:
            await self._request(slot, MessageType.REMOVE_SERVICE, {"name": name},
                                starting=starting)
            return
        socks = self._socks.get(name, {})
        items = [(lst, sock) for lst, sock in socks.items()
                 if slot.index == 0 or lst.proto is Proto.TCP]  # UDP: worker 0 only
        body = {"service": svc.to_wire(),
                "listeners": [[lst.addr, lst.port, str(lst.proto)] for lst, _ in items]}
        await self._request(slot, MessageType.SET_SERVICE, body,
                            fds=[sock.fileno() for _, sock in items], starting=starting)

    async def _stats_of(self, slot: _Slot) -> dict[str, Any] | None:
        async with slot.lock:
            if not slot.ready:
                return None
            try:
                return await self._request(slot, MessageType.STATS, {})
            except WorkerGone:
                return None

    async def _request(self, slot: _Slot, mtype: MessageType, body: dict[str, Any],
                       timeout: float | None = None, fds: list[int] | None = None,
                       starting: bool = False) -> dict[str, Any]:
        chan = slot.chan
        if chan is None or chan.closed or not (slot.ready or starting):
            raise WorkerGone
        msg_id = slot.next_id()
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        slot.pending[msg_id] = fut
        try:
            await chan.send(encode(mtype, msg_id, body), fds or ())
            reply = await asyncio.wait_for(fut, timeout or self.config.control_timeout)
        except TimeoutError:
            log.error("balancer worker %d did not answer %s in time: killing it", slot.index,
                      mtype.name)
            self._kill(slot)
            raise WorkerGone from None
        except BalancerUnavailable:
            raise WorkerGone from None
        finally:
            slot.pending.pop(msg_id, None)
        if not reply.ok:
            err = reply.error or {}
            raise ProtocolError(f"balancer worker refused {mtype.name}: "
                                f"{err.get('code')}: {err.get('message')}",
                                err.get("field") if isinstance(err.get("field"), str)
                                else None)
        return reply.body

    def _on_message(self, slot: _Slot, data: bytes, fds: list[int], truncated: bool) -> None:
        for fd in fds:  # workers never send descriptors
            with contextlib.suppress(OSError):
                socket.close(fd)
        try:
            msg = decode(data)
        except WireError as exc:
            log.error("balancer worker %d sent a bad message: %s", slot.index, exc)
            return
        fut = slot.pending.get(msg.id)
        if msg.type is MessageType.REPLY and fut is not None and not fut.done():
            fut.set_result(msg)

    def _on_gone(self, slot: _Slot) -> None:
        slot.ready = False
        for fut in slot.pending.values():
            if not fut.done():
                fut.set_exception(WorkerGone())
        slot.pending.clear()
        slot.gone.set()

    def _kill(self, slot: _Slot) -> None:
        if slot.proc is not None and slot.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                slot.proc.kill()

    async def _reap(self, slot: _Slot, timeout: float) -> None:
        proc = slot.proc
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                self._kill(slot)
                await proc.wait()
        if slot.chan is not None:
            slot.chan.close()


def _field(service: ServiceLB, lst: Listener) -> str:
    for i, fe in enumerate(service.frontends):
        if fe.port == lst.port and fe.proto == lst.proto and fe.addr in (None, lst.addr):
            return f"frontends[{i}].port"
    return "vip"


def _bind_error(lst: Listener, exc: OSError, field: str) -> FrontendError:
    if exc.errno == errno.EADDRINUSE:
        return PortInUse(f"cannot listen on {lst}: the port is already in use on this node "
                         "(another program listens on it)", field)
    if exc.errno == errno.EADDRNOTAVAIL:
        return AddressNotAvailable(f"cannot listen on {lst}: {lst.addr} is not an address of "
                                   "this node", field)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PortPermissionDenied(f"cannot listen on {lst}: ports below 1024 need root or "
                                    "CAP_NET_BIND_SERVICE", field)
    return FrontendError(f"cannot listen on {lst}: {exc.strerror or exc}", field)


def _merge_service(out: dict[str, ServiceStats], name: str, svc: dict[str, Any]) -> None:
    cur = out.get(name)
    if cur is None:
        out[name] = ServiceStats(
            connections=svc["connections"], active=svc["active"], retries=svc["retries"],
            failed=svc["failed"], udp_dropped=svc["udp_dropped"],
            bytes_in=svc.get("bytes_in", 0), bytes_out=svc.get("bytes_out", 0),
            listeners=list(svc["listeners"]),
            endpoints={k: _ep_stats(v) for k, v in svc["endpoints"].items()})
        return
    for key in ("connections", "active", "retries", "failed", "udp_dropped"):
        cur[key] += svc[key]
    for key in ("bytes_in", "bytes_out"):
        cur[key] += svc.get(key, 0)  # type: ignore[literal-required]
    cur["listeners"] = sorted(set(cur["listeners"]) | set(svc["listeners"]))
    for task_id, ep in svc["endpoints"].items():
        mine = cur["endpoints"].get(task_id)
        if mine is None:
            cur["endpoints"][task_id] = _ep_stats(ep)
        else:
            for key in ("active", "total", "failed", "bytes_in", "bytes_out"):
                mine[key] += ep.get(key, 0)  # type: ignore[literal-required]
            mine["draining"] = mine["draining"] and ep["draining"]


def _ep_stats(ep: dict[str, Any]) -> EndpointStats:
    return EndpointStats(addr=ep["addr"], port=ep["port"], active=ep["active"],
                         total=ep["total"], failed=ep["failed"],
                         bytes_in=ep.get("bytes_in", 0), bytes_out=ep.get("bytes_out", 0),
                         draining=ep["draining"])
