"""The gossip member's records: one entry per known member, and an outstanding probe.

Owns: ``NodeEntry`` (a member's mutable state inside a Memberlist: never handed out, see
``Member``), ``AckWaiter`` (a probe or relay waiting for its ack), ``ProbeResult``, the member
states' short names (``ALIVE``… ``GONE``) and ``parse_address``. Plain data, no protocol logic
(shoal.gossip.view decides the transitions, shoal.gossip.memberlist runs the loops). Must not
touch: the network, timers, anything outside this package.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, NamedTuple

from . import wire
from .events import Member
from .transport import Address
from .wire import MemberState, NodeRecord

ALIVE = MemberState.ALIVE
SUSPECT = MemberState.SUSPECT
DEAD = MemberState.DEAD
LEFT = MemberState.LEFT
GONE = (DEAD, LEFT)


def parse_address(value: Address | str, default_port: int = 7946) -> Address:
    """``("host", port)``, ``"host:port"``, ``"[v6]:port"`` or ``"host"`` → (host, port)."""
    if isinstance(value, tuple):
        host, port = value
        return (str(host), int(port))
    text = value.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
        return (host, port)
    if text.count(":") == 1:
        host, _, port_s = text.partition(":")
        return (host, int(port_s))
    return (text, default_port)


class NodeEntry:
    """Mutable per-member state inside a Memberlist (never handed out: see Member)."""

    __slots__ = (
        "addr",
        "incarnation",
        "meta",
        "meta_obj",
        "name",
        "port",
        "state",
        "state_change",
        "vsn",
    )

    def __init__(
        self,
        name: str,
        addr: str,
        port: int,
        meta: bytes,
        incarnation: int,
        state: MemberState,
        state_change: float,
        vsn: wire.Version,
    ) -> None:
        self.name = name
        self.addr = addr
        self.port = port
        self.meta = meta
        self.meta_obj: dict[str, Any] = wire.decode_meta(meta)
        self.incarnation = incarnation
        self.state = state
        self.state_change = state_change
        self.vsn = vsn

    @property
    def address(self) -> Address:
        return (self.addr, self.port)

    def set_meta(self, meta: bytes) -> None:
        if meta != self.meta:
            self.meta = meta
            self.meta_obj = wire.decode_meta(meta)

    def snapshot(self) -> Member:
        return Member(
            name=self.name,
            addr=self.addr,
            port=self.port,
            meta=MappingProxyType(self.meta_obj),
            incarnation=self.incarnation,
            state=self.state,
            state_since=self.state_change,
            protocol=self.vsn,
        )

    def record(self) -> NodeRecord:
        return NodeRecord(
            self.name, self.addr, self.port, self.meta, self.incarnation, self.state, self.vsn
        )


class AckWaiter:
    """An outstanding probe (future) or relay (callback) waiting for an ack; counts nacks."""

    __slots__ = ("future", "nacks", "on_ack")

    def __init__(
        self,
        future: asyncio.Future[None] | None = None,
        on_ack: Callable[[], None] | None = None,
    ) -> None:
        self.future = future
        self.on_ack = on_ack
        self.nacks = 0

    def ack(self) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(None)
        if self.on_ack is not None:
            self.on_ack()


class ProbeResult(NamedTuple):
    acked: bool
    relays: int  # members asked to probe indirectly
    nacks: int  # nacks they sent back
    late: float  # how late we woke up past our own deadlines (our own slowness)


__all__ = ["ALIVE", "DEAD", "GONE", "LEFT", "SUSPECT", "AckWaiter", "NodeEntry", "ProbeResult",
           "parse_address"]
