"""The one state interface of a node: where it reads the cluster state and sends its writes.

Owns: ``StateSource`` — the surface every reader and writer in ``node/`` uses (snapshot,
index, readiness, leadership facts, ``propose``, change listeners) — and ``ManagerSource``,
what a manager's Raft replica adds (the commands since an index for workers' feeds, Raft
membership changes, leadership transfer). Three implementations:

* ``shoal.raft.store.RaftStore`` — a manager's Raft voter (``ManagerSource``);
* ``shoal.node.feed.StateFeed`` — a worker's replica fed over mTLS (``StateSource``);
* ``MemoryStore`` (here) — the same ``ClusterState`` state machine applied in-process, a
  single replica that is its own leader: unit tests drive the control modules, the leader's
  plan and the worker's reconciler on it with no network and no root (``ManagerSource``).

The protocols are structural (typing.Protocol): the Raft store does not import ``node``.
Must not touch: policy (what to write), the network, the runtime.

Listeners: ``cb(index)`` after each applied command (batch, for the feed). RaftStore calls
them on pysyncobj's tick thread, StateFeed and MemoryStore on the event loop: a listener must
work from both (the agent's hops to the loop with ``call_soon_threadsafe``). A loop that
follows the state waits for its next pass with ``after_applied``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgpack

from shoal.raft.errors import CommandRejected, NotReady
from shoal.raft.state import ClusterState, Snapshot
from shoal.raft.wire import state_to_bytes

log = logging.getLogger("shoal.source")

Listener = Callable[[int], None]


class StateSource(Protocol):
    """A node's view of the replicated cluster state, and its way to write to it."""

    # this node's Raft address if it is a voter (None on a worker's feed)
    self_addr: str | None

    @property
    def index(self) -> int:
        """Number of commands applied so far (the same on every caught-up replica)."""
        ...

    def snapshot(self) -> Snapshot:
        """A copy of the state to read from (records are frozen)."""
        ...

    def is_ready(self) -> bool:
        """Caught up with the cluster: acting on this replica is safe."""
        ...

    def is_leader(self) -> bool: ...

    def term(self) -> int: ...

    def leader_addr(self) -> str | None:
        """The Raft address of the leader, as this replica knows it."""
        ...

    def voters(self) -> list[str]:
        """Raft addresses of the managers (sorted)."""
        ...

    def peer_connected(self, addr: str) -> bool: ...

    def add_listener(self, cb: Listener) -> None:
        """``cb(index)`` after every applied command (see the module doc for the thread)."""
        ...

    async def propose(self, cmd: dict[str, Any], timeout: float | None = None
                      ) -> dict[str, Any]:
        """Write ``cmd``; the state machine's result. Raises shoal.raft.errors.StoreError:
        CommandRejected (the state machine said no), WriteTimeout, NotReady."""
        ...

    def close(self) -> None: ...


class ManagerSource(StateSource, Protocol):
    """What a manager's replica adds: feeding workers and changing the Raft membership."""

    def changes_since(self, after: int) -> tuple[int, list[bytes]] | None:
        """The applied commands after ``after`` (msgpack) and the index they lead to; None
        when they are no longer all kept (then :meth:`full_state`)."""
        ...

    def command_at(self, index: int) -> Any:
        """The command that led to ``index``, decoded (read-only), if it is the latest
        applied one, else None."""
        ...

    def full_state(self) -> tuple[int, bytes]: ...

    async def read_barrier(self, timeout: float | None = None) -> None:
        """Return once every write committed before the call is applied here, as confirmed
        by a leader holding a majority (a linearizable read follows); NotReady if not."""
        ...

    def start_add_voter(self, addr: str) -> asyncio.Future[int]:
        """Begin adding a Raft voter; the future gets pysyncobj's fail reason (0 = ok)."""
        ...

    async def remove_voter(self, addr: str, timeout: float = 10.0) -> None: ...

    def transfer_leadership(self, target: str | None = None) -> None: ...

    def add_role_listener(self, cb: Callable[[], None]) -> None:
        """``cb()`` when this replica's Raft role changes (the tick thread, for Raft)."""
        ...

    @property
    def encryptor(self) -> Any:
        """The Raft secret's keyring (shoal.raft.transport.AeadEncryptor; None when Raft
        traffic is not encrypted): shoal.node.keys rotates it."""
        ...


class MemoryStore:
    """``ClusterState`` applied in-process: one replica that is its own, ready leader.

    Commands travel through msgpack as they do in the Raft log (so a command the log could
    not carry fails here too) and are applied by the same deterministic ``apply``.
    ``self_addr`` is its Raft address; more voters can be added (they are only names: this
    store replicates to nobody)."""

    def __init__(self, self_addr: str = "127.0.0.1:2378", term: int = 1,
                 recent: int = 4096) -> None:
        self.self_addr: str | None = self_addr
        self.state = ClusterState()
        self.leader = True  # tests flip it to act as a follower
        self.ready = True
        self.encryptor: Any = None  # (no Raft traffic to encrypt)
        self._term = term
        self._voters = {self_addr}
        self._listeners: list[Listener] = []
        self._recent: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=recent)
        self.closed = False

    # ------------------------------------------------------------------ reading
    @property
    def index(self) -> int:
        return self.state.index

    def snapshot(self) -> Snapshot:
        return self.state.snapshot()

    def is_ready(self) -> bool:
        return self.ready

    def is_leader(self) -> bool:
        return self.leader

    def term(self) -> int:
        return self._term

    def leader_addr(self) -> str | None:
        return self.self_addr if self.leader else None

    def voters(self) -> list[str]:
        return sorted(self._voters)

    def peer_connected(self, addr: str) -> bool:
        return addr in self._voters

    def add_listener(self, cb: Listener) -> None:
        self._listeners.append(cb)

    def add_role_listener(self, cb: Callable[[], None]) -> None:
        """(Its role changes only when a test flips ``leader``: nothing to announce.)"""

    def changes_since(self, after: int) -> tuple[int, list[bytes]] | None:
        index = self.state.index
        if after >= index:
            return index, []
        if not self._recent or self._recent[0][0] > after + 1:
            return None
        return index, [blob for i, blob in self._recent if i > after]

    def command_at(self, index: int) -> Any:
        if self._recent and self._recent[-1][0] == index:
            return msgpack.unpackb(self._recent[-1][1], raw=False, strict_map_key=False)
        return None

    def full_state(self) -> tuple[int, bytes]:
        return self.state.index, state_to_bytes(self.state)

    async def read_barrier(self, timeout: float | None = None) -> None:
        """One replica, its own leader: everything committed is applied already."""
        if self.closed:
            raise NotReady("the store is closed")

    # ------------------------------------------------------------------ writing
    async def propose(self, cmd: dict[str, Any], timeout: float | None = None
                      ) -> dict[str, Any]:
        if self.closed:
            raise NotReady("the store is closed")
        blob = msgpack.packb(cmd, use_bin_type=True)
        result = self.state.apply(msgpack.unpackb(blob, raw=False, strict_map_key=False))
        self._recent.append((self.state.index, blob))
        for cb in list(self._listeners):
            try:
                cb(self.state.index)
            except Exception:
                log.exception("state listener failed")
        if "error" in result:
            e = result["error"]
            raise CommandRejected(e.get("code", "rejected"), e.get("message", "rejected"),
                                  e.get("field", ""))
        return result

    def start_add_voter(self, addr: str) -> asyncio.Future[int]:
        self._voters.add(addr)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        fut.set_result(0)
        return fut

    async def remove_voter(self, addr: str, timeout: float = 10.0) -> None:
        self._voters.discard(addr)

    def transfer_leadership(self, target: str | None = None) -> None:
        self.leader = False

    def close(self) -> None:
        self.closed = True
        self._listeners.clear()


async def after_applied(applied: asyncio.Event, last: float, floor: float,
                        idle: float) -> None:
    """Wait for the next pass of a loop that follows the state: once an entry was applied
    (``applied`` set: the agent sets it after each), but not sooner than ``floor`` seconds
    after the last pass (``last``, time.monotonic()), else after ``idle`` seconds. An idle
    loop wakes once per ``idle``; a busy cluster makes it pass at most once per ``floor``.
    Clears ``applied``."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(idle):  # (wait_for can swallow a cancel)
            await applied.wait()
    applied.clear()
    gap = last + floor - time.monotonic()
    if gap > 0:
        await asyncio.sleep(gap)


__all__ = ["Listener", "ManagerSource", "MemoryStore", "StateSource", "after_applied"]
