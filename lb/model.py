"""The balancer's tables: what the agent tells it about one service.

Owns: ``ServiceLB`` and its parts (``Frontend``, ``Endpoint``, ``Algorithm``, ``Proto``), their
validation and their plain-dict wire form. Pure: no I/O, no clock. Must not touch: the cluster
state model (shoal.raft.models) -- the agent translates Services/Tasks into these records.

A ServiceLB is the *whole* table of one service; ``Balancer.set_service`` replaces the previous
one atomically (no partial update is ever visible to a connection).
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .errors import InvalidService

MAX_ENDPOINTS = 10_000
MAX_FRONTENDS = 64
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TASK_ID_MAX = 128


class Proto(StrEnum):
    TCP = "tcp"
    UDP = "udp"


class Algorithm(StrEnum):
    ROUND_ROBIN = "round-robin"  # each new connection/flow to the next endpoint
    LEAST_CONNECTIONS = "least-connections"  # fewest active connections; ties: round robin


@dataclass(frozen=True)
class Frontend:
    """A port the balancer listens on for this service.

    ``addr`` None = every address of ``Config.listen_addrs`` (a published port). A frontend
    with an explicit address is bound there only (this is what a VIP listener is).
    """

    port: int
    proto: Proto = Proto.TCP
    addr: str | None = None


@dataclass(frozen=True)
class Endpoint:
    """One task that can receive traffic.

    ``addr`` is an IP address (no names: the data path never resolves). ``port`` None = the
    service's ``target_port``. ``drain_deadline`` (wall clock, ``time.time()`` seconds):
    the task is being stopped -- it gets no new connections/flows, and the ones it has are cut
    at that time (typically stop time + the task's stop grace period). An endpoint that
    simply disappears from the table drains for ``Config.drain_timeout``.
    """

    addr: str
    task_id: str
    port: int | None = None
    drain_deadline: float | None = None


@dataclass(frozen=True)
class ServiceLB:
    """Everything the balancer knows about one service.

    ``vip``: the service's virtual IP; when set the balancer also listens on
    ``vip:target_port`` for each protocol among the published (address-less) ``frontends``
    (TCP if there are no frontends at all). Frontends with an explicit address -- e.g. the
    VIP on a port that is only exposed, not published -- are served as given.
    """

    name: str
    target_port: int
    frontends: tuple[Frontend, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    vip: str | None = None
    algorithm: Algorithm = Algorithm.ROUND_ROBIN

    def all_frontends(self) -> tuple[Frontend, ...]:
        """The explicit frontends plus the VIP ones."""
        if self.vip is None:
            return self.frontends
        protos = sorted({f.proto for f in self.frontends if f.addr is None})
        if not self.frontends:
            protos = [Proto.TCP]
        implied = (Frontend(self.target_port, p, self.vip) for p in protos)
        return self.frontends + tuple(f for f in implied if f not in self.frontends)

    # -- validation ----------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise InvalidService (``field`` names the offender) unless the table is usable."""
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise InvalidService(
                f"service name {self.name!r} must be 1-128 of A-Z a-z 0-9 _ . - "
                "(starting with a letter or digit)", "name")
        _check_port(self.target_port, "target_port")
        if self.vip is not None:
            _check_ip(self.vip, "vip")
        try:
            Algorithm(self.algorithm)
        except ValueError as exc:
            raise InvalidService(f"algorithm must be one of {[a.value for a in Algorithm]}, "
                                 f"got {self.algorithm!r}", "algorithm") from exc
        if len(self.frontends) > MAX_FRONTENDS:
            raise InvalidService(f"at most {MAX_FRONTENDS} frontends", "frontends")
        seen: set[tuple[str | None, int, Proto]] = set()
        for i, fe in enumerate(self.all_frontends()):
            where = f"frontends[{i}]" if i < len(self.frontends) else "vip"
            _check_port(fe.port, f"{where}.port")
            try:
                proto = Proto(fe.proto)
            except ValueError as exc:
                raise InvalidService(f"{where}.proto must be tcp or udp, got {fe.proto!r}",
                                     f"{where}.proto") from exc
            if fe.addr is not None:
                _check_ip(fe.addr, f"{where}.addr")
            key = (fe.addr, fe.port, proto)
            if key in seen:
                raise InvalidService(f"port {fe.port}/{proto} is listed twice", where)
            seen.add(key)
        if len(self.endpoints) > MAX_ENDPOINTS:
            raise InvalidService(f"at most {MAX_ENDPOINTS} endpoints", "endpoints")
        ids: set[str] = set()
        for i, ep in enumerate(self.endpoints):
            where = f"endpoints[{i}]"
            _check_ip(ep.addr, f"{where}.addr")
            if not isinstance(ep.task_id, str) or not 0 < len(ep.task_id) <= _TASK_ID_MAX:
                raise InvalidService(f"{where}.task_id must be 1-{_TASK_ID_MAX} characters",
                                     f"{where}.task_id")
            if ep.task_id in ids:
                raise InvalidService(f"task {ep.task_id} is listed twice", f"{where}.task_id")
            ids.add(ep.task_id)
            if ep.port is not None:
                _check_port(ep.port, f"{where}.port")
            if ep.drain_deadline is not None and not (
                    isinstance(ep.drain_deadline, int | float)
                    and not isinstance(ep.drain_deadline, bool)
                    and math.isfinite(ep.drain_deadline)):
                raise InvalidService(f"{where}.drain_deadline must be a finite number",
                                     f"{where}.drain_deadline")

    # -- wire form -----------------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target_port": self.target_port,
            "vip": self.vip,
            "algorithm": str(self.algorithm),
            "frontends": [[f.addr, f.port, str(f.proto)] for f in self.frontends],
            "endpoints": [[e.addr, e.task_id, e.port, e.drain_deadline] for e in self.endpoints],
        }

    @classmethod
    def from_wire(cls, data: Any) -> ServiceLB:
        """Parse and validate; raise InvalidService for any malformed input (never anything
        else, whatever ``data`` is)."""
        try:
            if not isinstance(data, dict):
                raise TypeError("not a map")
            frontends = tuple(Frontend(port=_int(p), proto=Proto(pr), addr=_opt_str(a))
                              for a, p, pr in _list(data["frontends"]))
            endpoints = tuple(
                Endpoint(addr=_str(a), task_id=_str(t), port=_opt_int(p),
                         drain_deadline=_opt_float(d))
                for a, t, p, d in _list(data["endpoints"]))
            svc = cls(name=_str(data["name"]), target_port=_int(data["target_port"]),
                      frontends=frontends, endpoints=endpoints, vip=_opt_str(data["vip"]),
                      algorithm=Algorithm(data["algorithm"]))
        except InvalidService:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidService(f"malformed service table: {exc}") from exc
        svc.validate()
        return svc


@dataclass(frozen=True)
class Listener:
    """One concrete socket of a frontend: (address, port, protocol)."""

    addr: str
    port: int
    proto: Proto

    def conflicts(self, other: Listener) -> bool:
        """Linux refuses two listeners on one port/protocol if their addresses are equal or
        either is the wildcard (even with SO_REUSEADDR), so we detect that ourselves."""
        if self.port != other.port or self.proto != other.proto:
            return False
        if self.addr == other.addr:
            return True
        mine, theirs = ipaddress.ip_address(self.addr), ipaddress.ip_address(other.addr)
        if mine.version != theirs.version:
            return False  # (an IPv6 wildcard with IPV6_V6ONLY off would also conflict)
        return mine.is_unspecified or theirs.is_unspecified

    def __str__(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"{host}:{self.port}/{self.proto}"


@dataclass
class Listeners:
    """The concrete listeners of a service, given the node's listen addresses."""

    items: list[Listener] = field(default_factory=list)

    @classmethod
    def of(cls, svc: ServiceLB, listen_addrs: tuple[str, ...]) -> Listeners:
        out: list[Listener] = []
        for fe in svc.all_frontends():
            addrs = (fe.addr,) if fe.addr is not None else listen_addrs
            out.extend(Listener(a, fe.port, Proto(fe.proto)) for a in addrs)
        return cls(out)


# -- helpers ------------------------------------------------------------------------------------


def _check_port(value: object, field_name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidService(f"{field_name} must be a port number 1-65535, got {value!r}",
                             field_name)


def _check_ip(value: object, field_name: str) -> None:
    try:
        if not isinstance(value, str):
            raise ValueError
        ipaddress.ip_address(value)
    except ValueError as exc:
        raise InvalidService(f"{field_name} must be an IP address, got {value!r}",
                             field_name) from exc


def _list(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise TypeError("expected a list")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("expected a string")
    return v


def _opt_str(v: Any) -> str | None:
    return None if v is None else _str(v)


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("expected an integer")
    return v


def _opt_int(v: Any) -> int | None:
    return None if v is None else _int(v)


def _opt_float(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError("expected a number")
    return float(v)
