"""Configuration of the balancer (both the agent-side client and its worker processes).

Owns: ``Config``, one documented dataclass, with presets and ``validate()``. Must not touch:
anything at run time -- it only describes. The worker receives the fields it needs in the
HELLO message (``worker_fields()``), so worker and client can never disagree.
"""

from __future__ import annotations

import ipaddress
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import ConfigError

#: Fields the worker process needs (sent in HELLO; everything else is client-side only).
WORKER_FIELDS = (
    "backlog", "connect_timeout", "connect_attempts", "fail_backoff", "drain_timeout",
    "shutdown_grace", "write_buffer_high", "sndbuf", "rcvbuf", "udp_idle_timeout",
    "udp_max_flows", "udp_max_datagram", "worker_nice", "splice",
)


@dataclass
class Config:
    # Addresses the published ports listen on. "0.0.0.0" (default) = every IPv4 address of the
    # node, like Swarm's routing mesh. A VIP listener binds VIP:target_port and conflicts with a
    # wildcard listener on the same port: give node addresses here (e.g. ("10.0.0.11",
    # "127.0.0.1")) when VIPs and published ports may share port numbers.
    listen_addrs: tuple[str, ...] = ("0.0.0.0",)
    # Worker processes serving the data path. 1 is right for most nodes (one core's worth of
    # proxying); N > 1 share each TCP listening socket (one accept queue) across N processes.
    # Least-connections counts per worker; UDP is served by worker 0 only (keeps flows sticky).
    workers: int = 1
    # listen() backlog of every TCP frontend. Connections that arrive while a worker restarts
    # wait here (the agent keeps the listening socket open), so keep it generous.
    backlog: int = 4096
    # Seconds to wait for a backend's TCP handshake before trying the next endpoint.
    connect_timeout: float = 2.0
    # Endpoints tried per client connection when connecting fails (refused, unreachable,
    # timeout). 0 = every eligible endpoint. The client only sees a failure (a reset) when all
    # tries failed.
    connect_attempts: int = 3
    # Seconds an endpoint whose connect failed is skipped for new connections (passive health
    # check; it is still used when every endpoint is in backoff). 0 = never skip.
    fail_backoff: float = 1.0
    # Seconds connections to an endpoint that disappeared from the table *without* a
    # drain_deadline may continue before they are cut. 0 = cut at once. An endpoint sent with
    # a drain_deadline uses that deadline instead.
    drain_timeout: float = 10.0
    # Seconds existing connections may finish when the balancer shuts down (close(), SIGTERM,
    # or the agent's control socket closing because the agent died); then they are cut.
    shutdown_grace: float = 5.0
    # Bytes buffered towards one side of a connection before the other side's reading is
    # paused (flow control). Larger = fewer pauses on bulk transfers, more memory per
    # connection.
    write_buffer_high: int = 1024 * 1024
    # Move TCP bytes with splice(2) through a pipe per direction (the bytes never enter
    # Python) instead of asyncio protocols. Measured (docs/benchmarks.md): 8-20 % less CPU per
    # MiB on bulk transfers, 9-14 % more per small request; 4 more descriptors per connection
    # (the worker raises its RLIMIT_NOFILE soft limit to the hard limit). False = asyncio
    # protocols on uvloop.
    splice: bool = True
    # SO_SNDBUF / SO_RCVBUF for proxied TCP sockets, bytes. 0 = kernel default (and TCP buffer
    # autotuning, normally best; setting a value disables autotuning for that socket).
    sndbuf: int = 0
    rcvbuf: int = 0
    # Seconds a UDP flow (client addr:port -> backend) lives without traffic in either
    # direction. The next datagram after that starts a new flow (maybe to another backend).
    udp_idle_timeout: float = 30.0
    # Most concurrent UDP flows per worker; datagrams of new flows beyond it are dropped and
    # counted.
    udp_max_flows: int = 65536
    # Largest UDP datagram relayed, bytes (larger ones are truncated by the kernel: dropped).
    udp_max_datagram: int = 65535
    # Set IP_FREEBIND on VIP listeners, so a VIP can be bound before (or without) the address
    # being on an interface; traffic arrives once the node routes the VIP locally. False =
    # binding a missing VIP fails with AddressNotAvailable.
    vip_freebind: bool = True
    # Seconds to wait for a worker's answer to a control message; a worker that does not
    # answer in time is killed and restarted (a wedged data path must not wedge the agent).
    control_timeout: float = 5.0
    # Seconds between health probes of each worker (a STATS round trip). A worker that does
    # not answer within control_timeout is killed and restarted (a worker that dies is seen
    # at once: this is for a wedged one). Each probe wakes the agent and the worker.
    health_interval: float = 5.0
    # Seconds to wait for a new worker's first answer (process start + imports).
    start_timeout: float = 10.0
    # Restart back-off after a worker dies, seconds: starts at min, doubles up to max, and
    # resets once a worker lived 10 s.
    restart_backoff_min: float = 0.05
    restart_backoff_max: float = 5.0
    # Nice value of the worker processes (0..19). 0 = same priority as the agent. A positive
    # value makes the kernel prefer the agent (Raft heartbeats, gossip probes) over proxying
    # when the node's CPUs are saturated; it costs nothing while a core is free.
    worker_nice: int = 0
    # Python interpreter that runs the workers (``python -m shoal.lb``).
    python: str = field(default_factory=lambda: sys.executable)

    @classmethod
    def local(cls) -> Config:
        """For tests: loopback only, short timeouts."""
        return cls(listen_addrs=("127.0.0.1",), connect_timeout=1.0, drain_timeout=2.0,
                   shutdown_grace=1.0, udp_idle_timeout=1.0, control_timeout=5.0,
                   health_interval=0.5)

    def replace(self, **changes: Any) -> Config:
        return replace(self, **changes)

    def worker_fields(self) -> dict[str, Any]:
        """The settings a worker needs, as a plain dict (sent in HELLO)."""
        data = asdict(self)
        return {name: data[name] for name in WORKER_FIELDS}

    def validate(self) -> None:
        if not self.listen_addrs:
            raise ConfigError("listen_addrs must name at least one address", "listen_addrs")
        for addr in self.listen_addrs:
            try:
                ipaddress.ip_address(addr)
            except ValueError as exc:
                raise ConfigError(f"listen_addrs: {addr!r} is not an IP address",
                                  "listen_addrs") from exc
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"workers must be 1..64, got {self.workers}", "workers")
        if not 1 <= self.backlog <= 65535:
            raise ConfigError(f"backlog must be 1..65535, got {self.backlog}", "backlog")
        if self.connect_attempts < 0:
            raise ConfigError("connect_attempts must be >= 0", "connect_attempts")
        for name in ("connect_timeout", "control_timeout", "start_timeout", "health_interval",
                     "udp_idle_timeout", "restart_backoff_min", "restart_backoff_max"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value}",
                                  name)
        for name in ("fail_backoff", "drain_timeout", "shutdown_grace"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be >= 0 seconds, got {value}", name)
        if self.restart_backoff_min > self.restart_backoff_max:
            raise ConfigError("restart_backoff_min must be <= restart_backoff_max",
                              "restart_backoff_min")
        if not 16 * 1024 <= self.write_buffer_high <= 1 << 30:
            raise ConfigError("write_buffer_high must be 16 KiB..1 GiB", "write_buffer_high")
        for name in ("sndbuf", "rcvbuf"):
            if not 0 <= getattr(self, name) <= 1 << 30:
                raise ConfigError(f"{name} must be 0..1 GiB", name)
        if not 1 <= self.udp_max_flows <= 10_000_000:
            raise ConfigError("udp_max_flows must be 1..10,000,000", "udp_max_flows")
        if not 0 <= self.worker_nice <= 19:
            raise ConfigError("worker_nice must be 0..19", "worker_nice")
        if not 512 <= self.udp_max_datagram <= 65535:
            raise ConfigError("udp_max_datagram must be 512..65535", "udp_max_datagram")
