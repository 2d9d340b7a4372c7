"""Configuration of the agent process, and its on-disk identity file.

Owns: AgentConfig (one documented dataclass; sub-configs of the components it wires)
and NodeIdentity, the small 0600 JSON file in the data dir that says which cluster
this node belongs to. Must not touch: anything at runtime — it only describes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.node.events import EventsConfig
from shoal.node.feed import FeedConfig
from shoal.node.joining import JoinRetry
from shoal.node.limits import LimitsConfig
from shoal.node.mqttconfig import MqttConfig
from shoal.node.orchestrator import OrchestratorConfig
from shoal.node.pki import DEFAULT_CERT_LIFETIME
from shoal.raft import generic
from shoal.raft.errors import ValidationError
from shoal.raft.store import RaftConfig
from shoal.runtime.images import ImageGCConfig
from shoal.runtime.registry import RegistryConfig

DEFAULT_DATA_DIR = Path("/var/lib/shoal")
DEFAULT_API_PORT = 2377  # node-to-node API (join, heartbeats), like Swarm's 2377
DEFAULT_RAFT_PORT = 2378  # Raft traffic between managers
DEFAULT_GOSSIP_PORT = 7946  # gossip (UDP + TCP), like Swarm's 7946


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
    # UDP+TCP port of the gossip member (SWIM failure detection), like Swarm's 7946.
    gossip_port: int = DEFAULT_GOSSIP_PORT
    # Gossip timing preset: "lan" (shoal.gossip.Config.lan) or "local" (loopback/netns
    # test hosts: faster probes, not for real networks).
    gossip_preset: str = "lan"
    # Parent cgroup of this node's task groups, one path component under each hierarchy
    # (``<mount>/<cgroup_parent>/<task id>``), like dockerd's --cgroup-parent. All the tasks
    # share its CPU weight against the host's other top-level groups and processes.
    cgroup_parent: str = "shoal"
    # Seconds between heartbeats an agent sends to every manager. Must be well below
    # orchestrator.node_down_timeout.
    heartbeat_interval: float = 1.0
    # Seconds the agent's reconciler waits between passes when nothing wakes it.
    reconcile_interval: float = 1.0
    # Deadline of the steps of a role switch (promotion/demotion) and of a Raft voter
    # change, seconds.
    join_timeout: float = 20.0
    # Seconds `shoal join` waits, once this node is admitted, for its replica or state feed
    # to catch up before answering "admitted, catching up" (it keeps catching up after:
    # an admitted node never gives up its membership; shoal.node.joining). 0 = answer as
    # soon as admitted. Longer only delays the answer.
    join_wait: float = 20.0
    # How a joining node retries its join request when no answer comes (lost reply,
    # manager busy or changing leader): deadline, per-attempt timeout, backoff
    # (shoal.node.joining; a retry gets the same node id, never a second node).
    join_retry: JoinRetry = field(default_factory=JoinRetry)
    # Lifetime of the node and client certificates this node signs as a manager, seconds.
    # Default 90 days. Shorter limits how long a stolen key works; a node that stays down
    # longer than its certificate's lifetime must rejoin with a token.
    cert_lifetime: float = DEFAULT_CERT_LIFETIME
    # A node renews its certificate (over mTLS, no token) once this fraction of its lifetime
    # has passed. 0.5 = halfway, leaving the other half for retries while managers are away.
    cert_renew_fraction: float = 0.5
    # TCP port of the remote API (the CLI's routes over mTLS; only client certificates from
    # `shoal ca issue-client` are accepted). 0 = off (the default: unix socket only).
    remote_api_port: int = 0
    # Generic resources this node advertises, Swarm's node-generic-resources: "KIND=VALUE"
    # items, VALUE all digits = the kind's count (SSD=3), else one named ID of the kind
    # (GPU=UUID1; repeat for more); shoal.raft.generic. Written into the node's record when
    # it joins (or inits the cluster) only: later, `node update --generic-resource-add/-rm`.
    # () = none. A cluster below schema 10 refuses a join that gives any.
    generic_resources: tuple[str, ...] = ()
    # A planned stop (SIGTERM: upgrade, `systemctl restart`) announces on gossip that this
    # agent restarts within this many seconds: meanwhile the leader keeps the node READY and
    # its tasks (which run on without the agent) are not replaced; if no agent is back by
    # then, the node goes DOWN and its tasks are replaced, as after a crash. Seconds, default
    # 30, at most 300 (shoal.node.membership.MAX_RESTART_GRACE). Longer = slower upgrades
    # tolerated, but a host that never comes back keeps its tasks unreplaced that long.
    # 0 = announce nothing: a stopped agent is treated like a crashed one (detected by
    # gossip in ~1.5 s). A crash (kill -9, power loss) announces nothing in any case.
    restart_grace: float = 30.0
    # Bound of each step of a planned stop (handing Raft leadership over, the gossip
    # announcement), seconds; the steps run concurrently, so the agent exits within about
    # this plus the time to close its sockets and Raft.
    stop_step_timeout: float = 1.0
    # Also serve GET /metrics (Prometheus) on this ADDR:PORT, plain HTTP, or with
    # ``metrics_mtls`` over TLS requiring a client certificate of the cluster as the remote
    # API does. "" = off: /metrics is then only on the unix socket (and the remote API).
    metrics_addr: str = ""
    # Require a current client certificate (`shoal ca issue-client`) on metrics_addr.
    metrics_mtls: bool = False
    # Serve the web dashboard (shoal.node.dashboard) on this ADDR:PORT, on managers: plain
    # HTTP unless ``dashboard_tls``. "" = off (the default). Users log in with a password
    # (`shoal user add`); on a shared network use dashboard_tls or keep it on loopback
    # (127.0.0.1:PORT) behind an SSH tunnel or a TLS proxy.
    dashboard_addr: str = ""
    # Serve the dashboard over TLS with this node's certificate (signed by the cluster CA:
    # browsers must trust that CA); session cookies are then marked Secure.
    dashboard_tls: bool = False
    # Per-client request limits of every API listener (in flight, rate, burst): over them a
    # client gets 429 with Retry-After (shoal.node.limits).
    api_limits: LimitsConfig = field(default_factory=LimitsConfig)
    raft: RaftConfig = field(default_factory=RaftConfig)
    feed: FeedConfig = field(default_factory=FeedConfig)  # workers following the managers
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    events: EventsConfig = field(default_factory=EventsConfig)  # the managers' event ring
    # how this node talks to image registries: CA file, insecure (plain-HTTP) registries
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    # image garbage collection: disk thresholds, max age (shoal.runtime.images.ImageGCConfig;
    # --image-gc-*); defaults: 85% high, 80% low, no max age, a pass every 300 s
    image_gc: ImageGCConfig = field(default_factory=ImageGCConfig)
    # the optional MQTT bridge (shoal.node.mqttconfig; --mqtt-*); url "" = off
    mqtt: MqttConfig = field(default_factory=MqttConfig)

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "shoal.sock"

    @property
    def bind_addr(self) -> str:
        return self.listen_addr or self.advertise_addr

    def validate(self) -> None:
        if not self.advertise_addr:
            raise ValueError("--advertise-addr is required (this host's IP address)")
        try:
            generic.updated({}, self.generic_resources, [])
        except ValidationError as exc:
            raise ValueError(exc.message.replace("generic_resource_add",
                                                 "--generic-resource", 1)) from None
        self.image_gc.validate()
        if self.gossip_preset not in ("lan", "local"):
            raise ValueError("gossip_preset must be 'lan' or 'local'")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.cgroup_parent) or \
                self.cgroup_parent in (".", ".."):
            raise ValueError(f"--cgroup-parent must be one cgroup name (letters, digits, "
                             f"'_', '.', '-'), got {self.cgroup_parent!r}")
        if self.gossip_port in (self.api_port, self.raft_port):
            raise ValueError("gossip_port must differ from api_port and raft_port")
        for name in ("api_port", "raft_port", "gossip_port"):
            port = getattr(self, name)
            if not 1 <= port <= 65535:
                raise ValueError(f"{name} must be between 1 and 65535, got {port}")
        if not 0.0 <= self.join_wait <= 300.0:
            raise ValueError(f"join_wait must be between 0 and 300 s, got {self.join_wait:g}")
        if not 10.0 <= self.cert_lifetime <= 20 * 365 * 86400.0:
            raise ValueError("cert_lifetime must be between 10 s and 20 years")
        if not 0.1 <= self.cert_renew_fraction <= 0.9:
            raise ValueError("cert_renew_fraction must be between 0.1 and 0.9")
        if self.remote_api_port and (not 1 <= self.remote_api_port <= 65535 or
                                     self.remote_api_port in (self.api_port, self.raft_port,
                                                              self.gossip_port)):
            raise ValueError("remote_api_port must be a free port between 1 and 65535")
        if self.api_port == self.raft_port:
            raise ValueError("api_port and raft_port must differ")
        if not 0 <= self.restart_grace <= 300:
            raise ValueError("restart_grace must be between 0 and 300 seconds")
        if not 0 < self.stop_step_timeout <= 10:
            raise ValueError("stop_step_timeout must be > 0 and <= 10 seconds")
        if self.heartbeat_interval * 2 >= self.orchestrator.node_down_timeout:
            raise ValueError("heartbeat_interval must be < node_down_timeout / 2")
        if self.metrics_addr:
            host, _, port = self.metrics_addr.rpartition(":")
            if not host or not (port.isascii() and port.isdigit()) or \
                    not 1 <= int(port) <= 65535:
                raise ValueError("metrics_addr must be ADDR:PORT")
        if self.dashboard_addr:
            host, _, port = self.dashboard_addr.rpartition(":")
            if not host or not (port.isascii() and port.isdigit()) or \
                    not 1 <= int(port) <= 65535:
                raise ValueError("dashboard_addr must be ADDR:PORT")
        self.raft.validate()
        self.orchestrator.validate()
        self.events.validate()
        self.mqtt.validate()


@dataclass
class NodeIdentity:
    """Which cluster this node is in. Secret (holds keys; managers also the Raft password):
    mode 0600.

    The keys are bytes here and hex in the file; files written before they existed load
    with empty keys. The node's certificate and private key live in DATA_DIR/tls (see
    shoal.node.pki.TlsFiles).
    """

    node_id: str
    cluster_id: str
    role: str  # "manager" | "worker"
    raft_password: str
    voters: list[str]  # Raft addresses of the managers, as last known
    # AES-256-GCM key of the gossip layer (32 bytes), the same on every node; made at init,
    # delivered to joining nodes over mTLS. b"" in files older than the security issue.
    gossip_key: bytes = b""
    # Managers only: the key that seals the CA private key, join-token secrets and secret
    # values in the replicated state (shoal.node.sealing). b"" on workers.
    manager_key: bytes = b""
    # Other gossip keys this node accepts (decrypt only) while `shoal gossip rotate-key` is
    # in progress; gossip_key is the primary. [] outside a rotation (shoal.node.membership).
    gossip_extra_keys: list[bytes] = field(default_factory=list)
    # Workers: API addresses ("ip:port") of the managers, as last known — where the state
    # feed starts after a restart (shoal.node.feed). [] on managers and in older files.
    managers: list[str] = field(default_factory=list)
    # Autolock (shoal.node.keys): raft_password and manager_key sealed under the unlock key;
    # when set, the file holds those two empty and only this. "" = not locked at rest.
    key_wrap: str = ""
    # Managers: other Raft secrets this node accepts (decrypt only) while a Raft secret
    # rotation is in progress (`swarm rotate-key`, shoal.node.keys); raft_password is the
    # one it sends with. [] outside a rotation. Wrapped with the others under autolock.
    raft_extra_passwords: list[str] = field(default_factory=list)

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
                   raft_password=d["raft_password"], voters=list(d["voters"]),
                   gossip_key=bytes.fromhex(d.get("gossip_key", "")),
                   manager_key=bytes.fromhex(d.get("manager_key", "")),
                   gossip_extra_keys=[bytes.fromhex(k) for k in d.get("gossip_extra_keys", [])],
                   managers=[str(m) for m in d.get("managers", [])],
                   key_wrap=str(d.get("key_wrap", "")),
                   raft_extra_passwords=[str(p) for p in d.get("raft_extra_passwords", [])])

    def save(self, data_dir: Path) -> None:
        p = self.path(data_dir)
        tmp = p.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            data = asdict(self)
            data.update(gossip_key=self.gossip_key.hex(), manager_key=self.manager_key.hex(),
                        gossip_extra_keys=[k.hex() for k in self.gossip_extra_keys])
            if self.key_wrap:  # autolock: the clear keys live in memory only
                data.update(raft_password="", manager_key="", raft_extra_passwords=[])
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)

    @classmethod
    def remove(cls, data_dir: Path) -> None:
        cls.path(data_dir).unlink(missing_ok=True)
