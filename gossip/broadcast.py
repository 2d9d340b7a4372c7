"""Transmit-limited broadcast queue (memberlist queue.go, simplified).

Owns the membership changes waiting to be piggybacked: which to send next and when to stop. A
broadcast is keyed by the member it is about, so a newer change about a member replaces the
older one (the older is "invalidated"). ``take()`` picks the least-transmitted broadcasts first
(then larger, then newer) that fit the space left in a packet, counts one transmission for each,
and retires a broadcast after ``limit`` transmissions. It holds encoded bytes only: no I/O, no
clock, no knowledge of the message types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Item:
    key: str
    data: bytes
    transmits: int
    order: int
    on_done: Callable[[], None] | None


class BroadcastQueue:
    """Broadcasts waiting to be piggybacked, at most one per member name."""

    __slots__ = ("_items", "_order")

    def __init__(self) -> None:
        self._items: dict[str, _Item] = {}
        self._order = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def queue(self, key: str, data: bytes, on_done: Callable[[], None] | None = None) -> None:
        """Queue ``data`` about member ``key``, replacing any older broadcast about it.

        ``on_done`` runs once, when this broadcast is retired (transmit limit reached),
        invalidated by a newer one, or dropped by ``reset()``.
        """
        self._order += 1
        old = self._items.pop(key, None)
        self._items[key] = _Item(key, data, 0, self._order, on_done)
        if old is not None and old.on_done is not None:
            old.on_done()

    def take(self, space: int, limit: int) -> list[bytes]:
        """Broadcasts fitting in ``space`` bytes; each counts one transmission of ``limit``."""
        if not self._items or space <= 0:
            return []
        ordered = sorted(
            self._items.values(), key=lambda i: (i.transmits, -len(i.data), -i.order)
        )
        out: list[bytes] = []
        used = 0
        for item in ordered:
            size = len(item.data)
            if used + size > space:
                continue
            used += size
            out.append(item.data)
            item.transmits += 1
            if item.transmits >= limit:
                del self._items[item.key]
                if item.on_done is not None:
                    item.on_done()
            if space - used < 8:  # nothing useful fits any more
                break
        return out

    def pending(self) -> list[tuple[str, int]]:
        """(member, transmissions so far) for each queued broadcast, for tests and debugging."""
        return [(i.key, i.transmits) for i in self._items.values()]

    def reset(self) -> None:
        """Drop everything (shutdown), running the completion callbacks."""
        items = list(self._items.values())
        self._items.clear()
        for item in items:
            if item.on_done is not None:
                item.on_done()
