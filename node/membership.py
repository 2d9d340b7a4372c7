"""Gossip membership of a node: runs the SWIM member and tells the leader who is alive.

Owns: the agent's shoal.gossip Memberlist (name = node id, meta = role, hostname and API
address), choosing its seeds from the replicated node list, and the liveness view the
leader uses (`view()`: node id → "alive" | "suspect" | "dead" | "left"). Must not touch:
the store (the leader's orchestrator turns the view into READY/DOWN), the runtime.

Flapping protection comes from the protocol itself: a node is declared dead only after a
suspicion period confirmed by independent members (Lifeguard), never on one missed ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from shoal.gossip import Config, JoinError, Memberlist, MemberState
from shoal.gossip.events import MemberEvent

log = logging.getLogger("shoal.membership")


def derive_gossip_key(raft_password: str) -> bytes:
    """A 32-byte gossip key for identities written before keys were delivered on join."""
    return hashlib.sha256(b"shoal gossip key\0" + raft_password.encode()).digest()


class Membership:
    def __init__(self, node_id: str, addr: str, port: int, key: bytes, meta: dict[str, Any],
                 config: Config | None = None,
                 on_change: Callable[[MemberEvent], None] | None = None) -> None:
        base = config or Config.lan()
        self.config = base.replace(name=node_id, bind_addr=addr, bind_port=port,
                                   advertise_addr=addr, secret_key=key)
        self.node_id = node_id
        self.port = port
        self.list = Memberlist(self.config, meta=meta)
        self._on_change = on_change
        self._unsubscribe: Callable[[], None] | None = None
        self._join_task: asyncio.Task[None] | None = None

    async def start(self, seeds: Callable[[], Iterable[str]]) -> None:
        """Bind and start; join the cluster in the background (retrying) from ``seeds()``,
        a function returning "addr:port" of other nodes as currently known."""
        await self.list.start()
        if self._on_change is not None:
            self._unsubscribe = self.list.subscribe(self._on_change)
        self._join_task = asyncio.create_task(self._join_loop(seeds), name="gossip-join")

    async def _join_loop(self, seeds: Callable[[], Iterable[str]]) -> None:
        delay = 0.2
        while True:
            candidates = [s for s in seeds() if s]
            if candidates:
                try:
                    n = await self.list.join(candidates)
                    log.info("gossip: joined through %d of %d seeds", n, len(candidates))
                    return
                except JoinError as exc:
                    log.debug("gossip join failed (%s); retrying", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def view(self) -> dict[str, str]:
        """Node id → gossip state of every member this node has heard of."""
        return {m.name: _STATE_NAMES[m.state] for m in self.list.members(include_gone=True)}

    def state_of(self, node_id: str) -> str | None:
        m = self.list.member(node_id)
        return None if m is None else _STATE_NAMES[m.state]

    def update_meta(self, meta: dict[str, Any]) -> None:
        self.list.update_meta(meta)

    async def close(self, leave: bool) -> None:
        """Stop gossiping; ``leave`` announces a graceful leave first (not a failure)."""
        if self._join_task is not None:
            self._join_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._join_task
        if self._unsubscribe is not None:
            self._unsubscribe()
        if leave:
            with contextlib.suppress(Exception):
                await self.list.leave(timeout=1.0)
        await self.list.shutdown()


_STATE_NAMES = {
    MemberState.ALIVE: "alive",
    MemberState.SUSPECT: "suspect",
    MemberState.DEAD: "dead",
    MemberState.LEFT: "left",
}
