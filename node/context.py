"""The narrow context a node's components share: who this node is, its config, and its
current state source.

Owns: ``NodeContext`` — this node's identity (None outside a cluster), its AgentConfig and
hostname, the current ``StateSource`` (a manager's Raft replica or a worker's feed; swapped in
place on promotion/demotion) and, on a manager, the same store as a ``ManagerSource``; the
HTTP client session for calls to other nodes; and the guards every command starts with
(``require_member``, ``require_manager``) and ``propose`` (store errors translated to API
errors; refused at once while the agent stops). ``VoterChanges``: Raft membership changes go
one at a time (pysyncobj's own guard is dead code), shared by joins, promotion/demotion, node
removal and this node's own init/join/leave.

Components (node/control/*, Security, SecretsApi, Transfer, GossipControl) receive this, never
the Agent; only the agent (the wiring) changes what it holds. Must not touch: the runtime,
policy, the network.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import aiohttp

from shoal.node.config import AgentConfig, NodeIdentity
from shoal.node.errors import NotInCluster, NotManager, Unavailable, from_store_error
from shoal.node.source import ManagerSource, StateSource
from shoal.raft.errors import StoreError
from shoal.raft.models import NodeRole


def new_id() -> str:
    """A new object id (nodes, services, secrets): 20 hex digits."""
    return secrets.token_hex(10)


class NodeContext:
    def __init__(self, config: AgentConfig, hostname: str) -> None:
        self.config = config
        self.hostname = hostname
        self.data_dir = config.data_dir
        self.identity: NodeIdentity | None = None
        self.store: StateSource | None = None
        # the store again when this node is a manager (its Raft replica), else None
        self.raft: ManagerSource | None = None
        # the agent's client session for calls to other nodes (set while it runs)
        self.http: aiohttp.ClientSession | None = None
        # set once the agent is stopping (SIGTERM): changes are refused at once, so a client
        # goes to another manager instead of waiting for this one's Raft and API to close
        self.stopping = False

    def use(self, identity: NodeIdentity, store: StateSource,
            raft: ManagerSource | None) -> None:
        """This node is now ``identity``, reading ``store`` (``raft``: the same, a manager's)."""
        self.identity, self.store, self.raft = identity, store, raft

    def forget(self) -> None:
        self.store = self.raft = None

    @property
    def node_id(self) -> str:
        return self.identity.node_id if self.identity is not None else ""

    def require_member(self) -> StateSource:
        if self.store is None or self.identity is None:
            raise NotInCluster("this node is not part of a cluster: run `shoal init` or "
                               "`shoal join` first")
        return self.store

    def require_manager(self) -> ManagerSource:
        self.require_member()
        assert self.identity is not None
        raft = self.raft
        if self.identity.role != NodeRole.MANAGER or raft is None:
            raise NotManager("this node is a worker: cluster state can only be viewed or "
                             "changed on a manager")
        if not raft.is_ready():
            raise Unavailable("this manager has not caught up with the cluster yet; retry")
        return raft

    async def read_manager(self, stale: bool = False) -> ManagerSource:
        """``require_manager`` for a read of cluster state: unless ``stale``, first confirm
        through the leader that this replica holds every write committed so far
        (linearizable; ``RaftStore.read_barrier``), else 503 naming the ``stale`` option."""
        raft = self.require_manager()
        if not stale:
            try:
                await raft.read_barrier()
            except StoreError as exc:
                raise Unavailable(f"{exc}; to read this manager's own, possibly stale copy "
                                  "use --stale (?stale=1)") from exc
        return raft

    async def propose(self, cmd: dict[str, Any], timeout: float | None = None
                      ) -> dict[str, Any]:
        store = self.require_member()
        if self.stopping:
            raise Unavailable("this node is stopping (a planned restart): send the change to "
                              "another manager")
        try:
            return await store.propose(cmd, timeout)
        except StoreError as exc:
            raise from_store_error(exc) from exc


class VoterChanges:
    """One Raft membership change at a time. ``lock`` also serialises this node's own
    init/join/leave; ``pending`` is the voter addition still waiting for its node to run."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.lock = asyncio.Lock()
        self.pending: asyncio.Future[int] | None = None
        self.pending_addr = ""  # the Raft address ``pending`` adds

    async def wait_previous(self, what: str) -> None:
        """Wait for the pending change (call with ``lock`` held); Unavailable naming ``what``
        if it does not complete in time."""
        pending = self.pending
        if pending is not None and not pending.done():
            try:
                await asyncio.wait_for(asyncio.shield(pending), self.timeout)
            except TimeoutError:
                raise Unavailable(f"a previous {what} has not completed yet (is that node "
                                  "running?); retry later") from None


__all__ = ["NodeContext", "VoterChanges", "new_id"]
