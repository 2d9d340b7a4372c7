"""Per-client request limits of the agent's HTTP listeners: a flood is answered 429.

Owns: ``ClientLimits`` — for each client, how many of its requests are in progress (at most
``max_inflight``) and a token bucket of its request rate (``rate`` per second, bursts up to
``burst``) — and the aiohttp middleware that applies them. A request over either limit is
refused at once with 429 ``too_many_requests`` (and ``Retry-After``), before its handler
runs or its body is read: a client that floods the API gets cheap refusals, and the event
loop keeps time for what must not wait (gossip probes, Raft heartbeats, the other clients).
With the 1 MiB body limit of every listener (shoal.node.api.MAX_BODY) no request can make
the agent hold more than that per connection.

Who a client is: on the unix socket, the calling process (its uid and pid, from
SO_PEERCRED: a CLI invocation is one client); on TLS listeners, the name in the verified
client certificate (a node id, or a `shoal ca issue-client` name); otherwise the remote
address. Idle clients are forgotten, so the table stays small.

Must not touch: routes, authorization (who may call what: shoal.node.security), the
replies of admitted requests.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from shoal.node.errors import TooManyRequests
from shoal.node.pki import peer_info

Handler = Callable[[web.Request], Awaitable[Any]]
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass
class LimitsConfig:
    """Per-client limits of one listener. 0 = that limit is off."""

    max_inflight: int = 128  # requests of one client in progress at once (streams included)
    rate: float = 500.0  # sustained requests per second per client
    burst: int = 1000  # requests a client may send at once after being idle
    forget_after: float = 60.0  # seconds: an idle client's record is dropped


@dataclass
class _Client:
    inflight: int = 0
    tokens: float = 0.0
    seen: float = field(default_factory=time.monotonic)


def client_of(request: web.Request) -> str:
    """Who sent ``request`` (see the module docstring)."""
    transport = request.transport
    if transport is None:
        return "?"
    peer = peer_info(transport.get_extra_info("peercert"))
    if peer is not None:
        return f"cert:{peer.subject_id}"
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            pid, uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            return f"unix:{uid}:{pid}"
        except OSError:
            return "unix:?"
    return f"addr:{request.remote or '?'}"


class ClientLimits:
    """The limits of one listener, applied by ``middleware()``."""

    def __init__(self, config: LimitsConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or LimitsConfig()
        self.clock = clock
        self.clients: dict[str, _Client] = {}
        self.refused = 0  # requests answered 429 since start
        self._swept = clock()

    def admit(self, who: str) -> None:
        """Count a request of ``who`` in, or raise TooManyRequests; pair with ``done``."""
        cfg, now = self.config, self.clock()
        self._sweep(now)
        c = self.clients.get(who)
        if c is None:
            c = self.clients[who] = _Client(tokens=float(cfg.burst), seen=now)
        if cfg.rate > 0:
            c.tokens = min(float(cfg.burst), c.tokens + (now - c.seen) * cfg.rate)
        c.seen = now
        if cfg.max_inflight and c.inflight >= cfg.max_inflight:
            self.refused += 1
            raise TooManyRequests(f"too many requests in progress from this client "
                                  f"(at most {cfg.max_inflight}); retry later", retry_after=1)
        if cfg.rate > 0:
            if c.tokens < 1.0:
                self.refused += 1
                wait = max(1, int((1.0 - c.tokens) / cfg.rate + 0.999))
                raise TooManyRequests(f"request rate over {cfg.rate:g}/s from this client; "
                                      f"retry later", retry_after=wait)
            c.tokens -= 1.0
        c.inflight += 1

    def done(self, who: str) -> None:
        c = self.clients.get(who)
        if c is not None:
            c.inflight = max(0, c.inflight - 1)

    def _sweep(self, now: float) -> None:
        if now - self._swept < self.config.forget_after:
            return
        self._swept = now
        idle = [k for k, c in self.clients.items()
                if c.inflight == 0 and now - c.seen > self.config.forget_after]
        for k in idle:
            del self.clients[k]

    def middleware(self) -> Any:
        @web.middleware
        async def limit(request: web.Request, handler: Handler) -> Any:
            who = client_of(request)
            self.admit(who)
            try:
                return await handler(request)
            finally:
                self.done(who)
        return limit
