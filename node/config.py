"""Configuration of the agent process, and its on-disk identity file.

Owns: AgentConfig (one documented dataclass; sub-configs of the components it wires)
and NodeIdentity, the small 0600 JSON file in the data dir that says which cluster
this node belongs to. Must not touch: anything at runtime — it only describes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.node.orchestrator import OrchestratorConfig
from shoal.raft.store import RaftConfig

DEFAULT_DATA_DIR = Path("/var/lib/shoal")
DEFAULT_API_PORT = 2377  # node-to-node API (join, heartbeats), like Swarm's 2377
DEFAULT_RAFT_PORT = 2378  # Raft traffic between managers


@dataclass
class AgentConfig:
    # Where this node keeps its identity, Raft log and task files; one per agent.
    data_dir: Path = DEFAULT_DATA_DIR
    # Address other nodes use to reach this one (IPv4 of this host). Required.
    advertise_addr: str = ""
    # Address the TCP listeners bind to; "" = advertise_addr.
    listen_addr: str = ""
    # TCP port of the node-to-node API.
    api_port: int = DEFAULT_API_PORT
    # TCP port of Raft (managers only listen on it).
    raft_port: int = DEFAULT_RAFT_PORT
    # Seconds between heartbeats an agent sends to every manager. Must be well below
    # orchestrator.node_down_timeout.
    heartbeat_interval: float = 1.0
    # Seconds the agent's reconciler waits between passes when nothing wakes it.
    reconcile_interval: float = 1.0
    # Seconds to wait for a new node's replica to catch up during `join`.
    join_timeout: float = 20.0
    raft: RaftConfig = field(default_factory=RaftConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "shoal.sock"

    @property
    def bind_addr(self) -> str:
        return self.listen_addr or self.advertise_addr

    def validate(self) -> None:
        if not self.advertise_addr:
            raise ValueError("--advertise-addr is required (this host's IP address)")
        for name in ("api_port", "raft_port"):
            port = getattr(self, name)
            if not 1 <= port <= 65535:
                raise ValueError(f"{name} must be between 1 and 65535, got {port}")
        if self.api_port == self.raft_port:
            raise ValueError("api_port and raft_port must differ")
        if self.heartbeat_interval * 2 >= self.orchestrator.node_down_timeout:
            raise ValueError("heartbeat_interval must be < node_down_timeout / 2")
        self.raft.validate()
        self.orchestrator.validate()


@dataclass
class NodeIdentity:
    """Which cluster this node is in. Secret (holds the Raft password): mode 0600."""

    node_id: str
    cluster_id: str
    role: str  # "manager" | "worker"
    raft_password: str
    voters: list[str]  # Raft addresses of the managers, as last known

    @staticmethod
    def path(data_dir: Path) -> Path:
        return data_dir / "node.json"

    @classmethod
    def load(cls, data_dir: Path) -> NodeIdentity | None:
        p = cls.path(data_dir)
        if not p.exists():
            return None
        d = json.loads(p.read_text())
        return cls(node_id=d["node_id"], cluster_id=d["cluster_id"], role=d["role"],
                   raft_password=d["raft_password"], voters=list(d["voters"]))

    def save(self, data_dir: Path) -> None:
        p = self.path(data_dir)
        tmp = p.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)

    @classmethod
    def remove(cls, data_dir: Path) -> None:
        cls.path(data_dir).unlink(missing_ok=True)
