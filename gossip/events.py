"""What the agent sees of membership: Member snapshots, MemberEvents and event streams.

Owns the public, immutable view of members and the delivery of events to subscribers (bounded
async iterators and synchronous callbacks). It must not change membership state: the protocol
(memberlist.py) decides, this module only reports.

Event kinds, for an observed member X (X may be the local member too)::

    join         X appeared alive for the first time, or came back after having left
    update       X's metadata or address changed while it stayed alive
    suspect      X missed its probes and is suspected (may still refute)
    alive-again  X is alive again: it refuted a suspicion, or came back after being dead
    dead         X was declared failed (suspicion timed out, or we learnt it from others)
    left         X announced a graceful leave (never reported as dead)
    reaped       X (dead or left) was forgotten after Config.dead_retention
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .errors import TransportError
from .transport import Address, Mailbox
from .wire import MemberState, Version


class EventKind(StrEnum):
    JOIN = "join"
    UPDATE = "update"
    SUSPECT = "suspect"
    ALIVE_AGAIN = "alive-again"
    DEAD = "dead"
    LEFT = "left"
    REAPED = "reaped"


@dataclass(frozen=True, slots=True)
class Member:
    """An immutable snapshot of one member as seen by the local member."""

    name: str
    addr: str
    port: int
    meta: Mapping[str, Any]
    incarnation: int
    state: MemberState
    state_since: float  # event-loop time of the last state change
    protocol: Version  # (min, max, current) protocol versions it speaks

    @property
    def address(self) -> Address:
        return (self.addr, self.port)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "name": self.name,
            "addr": self.addr,
            "port": self.port,
            "meta": dict(self.meta),
            "incarnation": self.incarnation,
            "state": self.state.name.lower(),
        }


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A change of membership observed by the local member."""

    kind: EventKind
    member: Member
    previous: MemberState | None  # state before the change (None for a first sighting)
    at: float  # event-loop time

    def to_dict(self) -> dict[str, Any]:
        out = {"event": self.kind.value, **self.member.to_dict()}
        out["previous"] = self.previous.name.lower() if self.previous is not None else None
        return out


class EventStream:
    """A subscriber's bounded stream of MemberEvents: ``async for ev in stream``.

    If the subscriber falls behind by more than ``maxsize`` events, new events are dropped,
    ``dropped`` counts them and ``overflowed`` turns True: resynchronise from
    ``Memberlist.members()``. Iteration ends when the member shuts down or ``close()`` is called.
    """

    def __init__(self, maxsize: int) -> None:
        self._box: Mailbox[MemberEvent] = Mailbox(maxsize)
        self.dropped = 0

    @property
    def overflowed(self) -> bool:
        return self.dropped > 0

    def _push(self, event: MemberEvent) -> None:
        if not self._box.put(event) and not self._box.closed:
            self.dropped += 1

    def get_nowait(self) -> MemberEvent | None:
        """The next buffered event, or None."""
        return self._box.get_nowait()

    async def get(self) -> MemberEvent:
        """The next event; raises StopAsyncIteration once the stream is closed and drained."""
        try:
            return await self._box.get()
        except TransportError:
            raise StopAsyncIteration from None

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> MemberEvent:
        return await self.get()

    def close(self) -> None:
        self._box.close()

    @property
    def closed(self) -> bool:
        return self._box.closed
