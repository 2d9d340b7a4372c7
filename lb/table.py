"""A worker's table for one service: which endpoints get new connections, and draining.

Owns: ``ServiceTable`` and ``EndpointState`` -- endpoint selection (round robin, least
connections, passive fail back-off) and the bookkeeping of draining endpoints. Pure: the clock
is passed in (loop time), no sockets, no timers (the worker arms those from what ``update``
returns). Must not touch: sockets or the control channel.

Atomicity: ``update`` rebuilds the eligible list and swaps it in one step; the worker runs it
on its event loop between two callbacks, so a connection sees the whole old table or the whole
new one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from .model import Algorithm, Endpoint, ServiceLB

EndpointKey = tuple[str, str, int]  # (task_id, addr, port)


class Cuttable(Protocol):
    """A proxied connection or UDP flow that can be cut when its endpoint's drain ends."""

    def cut(self) -> None: ...


class EndpointState:
    """One endpoint as a worker sees it: counters, and the connections it holds."""

    __slots__ = ("active", "addr", "bytes_in", "bytes_out", "conns", "deadline", "down_until",
                 "failed", "gone", "key", "port", "task_id", "timer", "total")

    def __init__(self, addr: str, port: int, task_id: str) -> None:
        self.addr = addr
        self.port = port
        self.task_id = task_id
        self.key: EndpointKey = (task_id, addr, port)
        self.active = 0  # connections/flows open now (this worker)
        self.total = 0  # connections/flows ever opened (this worker)
        self.failed = 0  # connect attempts that failed (refused, unreachable, timeout)
        self.bytes_in = 0  # bytes forwarded from clients to it (TCP payload, UDP datagrams)
        self.bytes_out = 0  # bytes forwarded from it to clients
        self.down_until = 0.0  # loop time until which new connections skip it
        self.deadline: float | None = None  # loop time: drain ends, connections cut
        self.gone = False  # its drain deadline passed: any connection to it is cut at once
        self.conns: set[Cuttable] = set()
        self.timer: Any = None  # the worker's TimerHandle for the deadline

    def stats(self) -> dict[str, Any]:
        return {"addr": self.addr, "port": self.port, "active": self.active,
                "total": self.total, "failed": self.failed, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out}


class ServiceTable:
    """The endpoints of one service in one worker."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.algorithm = Algorithm.ROUND_ROBIN
        self.target_port = 0
        self.eligible: list[EndpointState] = []  # get new connections
        self.draining: dict[EndpointKey, EndpointState] = {}  # keep old ones until deadline
        self._rr = 0
        self.removed = False
        # counters (this worker)
        self.connections = 0  # client connections/flows accepted
        self.retries = 0  # connect attempts moved on to another endpoint
        self.failed = 0  # connections/flows that found no endpoint at all (client saw it)
        self.udp_dropped = 0  # datagrams dropped (no endpoint, flow limit, buffers full)
        self.bytes_in = 0  # bytes forwarded client → backend (kept when endpoints go)
        self.bytes_out = 0  # bytes forwarded backend → client

    # -- selection -----------------------------------------------------------------------------

    def pick(self, now: float, exclude: Sequence[EndpointState] = ()) -> EndpointState | None:
        """The endpoint for a new connection, or None if there is none left to try.

        Skips ``exclude`` (already tried for this connection) and, while any other is
        available, endpoints in fail back-off. Least-connections breaks ties in round-robin
        order, so equal endpoints still share the load.
        """
        eps = self.eligible
        n = len(eps)
        if n == 0:
            return None
        start = self._rr % n
        if self.algorithm is Algorithm.ROUND_ROBIN:
            spare = -1  # first endpoint in back-off: used when no other is left
            for i in range(n):
                idx = (start + i) % n
                ep = eps[idx]
                if ep in exclude:
                    continue
                if ep.down_until <= now:
                    self._rr = idx + 1  # the next pick starts after the one chosen
                    return ep
                if spare < 0:
                    spare = idx
            if spare < 0:
                return None
            self._rr = spare + 1
            return eps[spare]
        self._rr = start + 1
        best: EndpointState | None = None
        fallback: EndpointState | None = None
        for i in range(n):
            ep = eps[(start + i) % n]
            if ep in exclude:
                continue
            if ep.down_until > now:
                if fallback is None or ep.active < fallback.active:
                    fallback = ep
                continue
            if best is None or ep.active < best.active:
                best = ep
                if ep.active == 0:
                    break
        return best if best is not None else fallback

    # -- updates -------------------------------------------------------------------------------

    def update(self, svc: ServiceLB, now_loop: float, now_wall: float,
               drain_timeout: float) -> list[EndpointState]:
        """Apply a new table. Returns the endpoints that are draining with a (new) deadline
        (the caller arms a timer per endpoint for ``ep.deadline`` and cuts at it)."""
        old: dict[EndpointKey, EndpointState] = {ep.key: ep for ep in self.eligible}
        old.update(self.draining)
        eligible: list[EndpointState] = []
        draining: dict[EndpointKey, EndpointState] = {}
        eligible_keys: set[EndpointKey] = set()
        changed: list[EndpointState] = []
        for e in svc.endpoints:
            ep = self._reuse(old, e, svc.target_port)
            if e.drain_deadline is None:
                ep.deadline = None
                if ep.timer is not None:  # it was draining, and is back
                    ep.timer.cancel()
                    ep.timer = None
                eligible.append(ep)
                eligible_keys.add(ep.key)
                continue
            deadline = now_loop + (e.drain_deadline - now_wall)
            if ep.deadline != deadline:
                ep.deadline = deadline
                changed.append(ep)
            draining[ep.key] = ep
        for key, ep in old.items():  # disappeared: drain with their deadline or the default
            if key in draining or key in eligible_keys:
                continue
            if ep.active == 0:
                continue  # nothing to drain: forget it
            if ep.deadline is None:
                ep.deadline = now_loop + drain_timeout
                changed.append(ep)
            draining[key] = ep
        self.algorithm = Algorithm(svc.algorithm)
        self.target_port = svc.target_port
        self.eligible = eligible  # the atomic swap
        self.draining = draining
        return changed

    def remove(self, now_loop: float, drain_timeout: float) -> list[EndpointState]:
        """The service was removed: every endpoint drains (own deadline or the default)."""
        self.removed = True
        changed: list[EndpointState] = []
        for ep in self.eligible:
            if ep.active:
                ep.deadline = now_loop + drain_timeout
                changed.append(ep)
                self.draining[ep.key] = ep
        self.eligible = []
        return changed

    def release(self, ep: EndpointState) -> None:
        """A connection/flow of ``ep`` ended; forget a drained endpoint with none left."""
        if ep.active == 0 and ep.key in self.draining and self.draining[ep.key] is ep:
            del self.draining[ep.key]
            if ep.timer is not None:
                ep.timer.cancel()
                ep.timer = None

    @staticmethod
    def _reuse(old: dict[EndpointKey, EndpointState], e: Endpoint,
               target_port: int) -> EndpointState:
        port = e.port if e.port is not None else target_port
        ep = old.get((e.task_id, e.addr, port))
        return ep if ep is not None else EndpointState(e.addr, port, e.task_id)

    def active(self) -> int:
        return sum(ep.active for ep in self.eligible) + sum(
            ep.active for ep in self.draining.values())

    def stats(self) -> dict[str, Any]:
        endpoints = {ep.task_id: {**ep.stats(), "draining": False} for ep in self.eligible}
        for ep in self.draining.values():
            endpoints[ep.task_id] = {**ep.stats(), "draining": True}
        return {"connections": self.connections, "active": self.active(),
                "retries": self.retries, "failed": self.failed,
                "udp_dropped": self.udp_dropped, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "endpoints": endpoints}
