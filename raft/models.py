"""The cluster's objects: plain typed records replicated by Raft.

Owns: Node, Service (with its versioned ServiceSpec) and Task records, the ordered
task-state model, and their msgpack-friendly dict forms. Must not touch: I/O, Raft,
the clock (timestamps are passed in by whoever makes the record).

Every record is a frozen dataclass; "changing" one means `dataclasses.replace`.
On a task, three things are kept apart (as in swarmkit):

* ``spec``          what the user asked for (copied from the service version; never edited)
* ``desired_state`` what the leader wants (written only by the leader's controllers)
* ``status``        what the node observed (written only by the agent that runs it)

Task states are ordered integers spaced like swarmkit's, so that two observations
can be merged by keeping the greater and a transition never moves backwards.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


class TaskState(enum.IntEnum):
    """Ordered task lifecycle. Only append; the numbers are stored in the Raft log."""

    NEW = 0
    PENDING = 64  # waiting for the scheduler
    ASSIGNED = 192  # placed on a node by the scheduler
    ACCEPTED = 256  # the node saw the assignment
    PREPARING = 320
    STARTING = 384
    RUNNING = 512
    COMPLETE = 576  # exited 0
    SHUTDOWN = 640  # stopped because desired state said so
    FAILED = 704  # exited non-zero / could not start
    REJECTED = 768  # the node refused it (e.g. bad command)
    REMOVE = 800  # desired-only: stop and then delete the record
    ORPHANED = 832  # its node went down; state unknown

    @property
    def terminal(self) -> bool:
        return self >= TaskState.COMPLETE

    def lower(self) -> str:
        return self.name.lower()


class NodeRole(enum.StrEnum):
    MANAGER = "manager"
    WORKER = "worker"


class NodeState(enum.StrEnum):
    """Liveness as seen by the leader."""

    UNKNOWN = "unknown"
    READY = "ready"
    DOWN = "down"


class NodeAvailability(enum.StrEnum):
    ACTIVE = "active"  # may receive tasks
    PAUSE = "pause"  # keeps its tasks, gets no new ones
    DRAIN = "drain"  # its tasks are moved elsewhere


@dataclass(frozen=True)
class Node:
    id: str
    hostname: str
    addr: str  # advertise address (IP)
    api_port: int  # node-to-node TCP API
    raft_port: int
    role: NodeRole
    state: NodeState = NodeState.UNKNOWN
    availability: NodeAvailability = NodeAvailability.ACTIVE
    message: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    gossip_port: int = 7946  # UDP+TCP port of its gossip member
    subnet: str = ""  # its task subnet (CIDR), allocated from the cluster CIDR at join
    memory_bytes: int = 0  # total memory the node reported at join (0 = unknown)
    cpus: float = 0.0  # CPUs the node reported at join (0 = unknown)

    @property
    def raft_addr(self) -> str:
        return f"{self.addr}:{self.raft_port}"

    @property
    def api_addr(self) -> str:
        return f"{self.addr}:{self.api_port}"


@dataclass(frozen=True)
class Mount:
    """A filesystem mounted into the task (``--mount type=...,src=...,dst=...``)."""

    type: str  # "bind" (host path), "volume" (named, kept per node), "tmpfs"
    target: str  # absolute path inside the task
    source: str = ""  # host path (bind) or volume name (volume); "" for tmpfs
    readonly: bool = False
    tmpfs_size: int = 0  # bytes; 0 = kernel default (half of RAM)


@dataclass(frozen=True)
class FileRef:
    """A service's use of a secret or config (``--secret NAME[,target=F][,mode=0400]``): each
    task sees it as the file ``/run/secrets/<target>`` (configs: ``/run/configs/<target>``)."""

    name: str  # the secret's (config's) name
    target: str = ""  # file name in the task's /run/secrets (/run/configs); "" = name
    mode: int = 0o444  # file mode inside the task

    @property
    def file_name(self) -> str:
        return self.target or self.name


@dataclass(frozen=True)
class Secret:
    """A secret value (``shoal secret create``). ``data`` is *sealed* (AES-256-GCM under the
    managers' key, shoal.node.sealing): the replicated state — every worker's replica, the
    Raft files on disk — never holds the value in the clear. Immutable, like Swarm's."""

    id: str
    name: str
    data: bytes  # sealed
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True)
class Config:
    """A configuration file (``shoal config create``): like a secret, but not sealed."""

    id: str
    name: str
    data: bytes  # in the clear
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True)
class PortSpec:
    """``--publish PUBLISHED:TARGET/PROTOCOL``: every node listens on ``published`` and
    forwards to a task's ``target`` port (the routing mesh)."""

    published: int
    target: int
    protocol: str = "tcp"  # "tcp" | "udp"


@dataclass(frozen=True)
class ServiceSpec:
    """What the user asked for. Validated by shoal.raft.validate before it is proposed."""

    name: str
    command: tuple[str, ...]
    replicas: int = 1
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    stop_grace_period: float = 10.0  # seconds between the stop signal and SIGKILL
    labels: dict[str, str] = field(default_factory=dict)
    # --- runtime (see shoal.runtime)
    image: str = ""  # "" = the host's read-only /usr, /etc, libraries (default image)
    user: str = ""  # "uid[:gid]" or a user name; "" = root inside the task
    stop_signal: str = "SIGTERM"
    limit_memory: int = 0  # bytes, 0 = unlimited (swap is always off)
    limit_cpu: float = 0.0  # CPUs (0.5 = half a core), 0 = unlimited
    limit_pids: int = 0  # max processes, 0 = unlimited
    reserve_memory: int = 0  # bytes the scheduler keeps free for the task
    reserve_cpu: float = 0.0  # CPUs the scheduler keeps free for the task
    mounts: tuple[Mount, ...] = ()
    # --- networking
    ports: tuple[PortSpec, ...] = ()
    lb_algorithm: str = "round-robin"  # "round-robin" | "least-conn"
    # --- restart policy (Swarm's): when a task ends, is its slot refilled?
    restart_condition: str = "any"  # "none" | "on-failure" | "any"
    restart_delay: float = 1.0  # seconds between a task ending and its replacement
    restart_max_attempts: int = 0  # restarts allowed per slot (within the window); 0 = no limit
    restart_window: float = 0.0  # seconds over which attempts are counted; 0 = forever
    # --- rolling update (Swarm's stop-first): how a changed spec replaces running tasks
    update_parallelism: int = 1  # tasks replaced at a time; 0 = all at once
    update_delay: float = 0.0  # seconds between one batch running and the next starting
    force_update: int = 0  # bump to redeploy every task with an unchanged spec
    # --- secrets and configs: files each task sees (shoal.node.secrets fetches them)
    secrets: tuple[FileRef, ...] = ()
    configs: tuple[FileRef, ...] = ()
    # --- placement (Swarm's --constraint): every expression must hold on a task's node.
    # Stored in the canonical text form shoal.raft.validate.parse_constraint gives
    # ("node.labels.zone==b"), as Swarm's Placement.Constraints; () = any node.
    constraints: tuple[str, ...] = ()


@dataclass(frozen=True)
class Constraint:
    """One parsed placement constraint: ``node.<attribute> == | != value``.

    ``key`` is lower-case (``node.id``, ``node.hostname``, ``node.role``, ``node.ip``,
    ``node.platform.os``) or ``node.labels.<NAME>`` with NAME as the user wrote it (label
    names are case-sensitive). Values are compared case-insensitively, as Swarm does."""

    key: str
    op: str  # "==" | "!="
    value: str

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value}"


@dataclass(frozen=True)
class Service:
    id: str
    spec: ServiceSpec
    version: int = 1  # bumped on every spec change (scale included)
    vip: str = ""  # stable virtual IP served by every node's balancer
    previous_spec: ServiceSpec | None = None
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True)
class TaskStatus:
    """Observed by the node that runs the task (or ORPHANED by the leader)."""

    state: TaskState = TaskState.NEW
    timestamp: float = 0.0
    message: str = ""
    exit_code: int | None = None
    pid: int | None = None
    err: str = ""
    addr: str = ""  # the task's IP address on its node's task subnet ("" = none yet)


@dataclass(frozen=True)
class Task:
    id: str
    service_id: str
    service_name: str
    slot: int
    spec: ServiceSpec
    service_version: int
    desired_state: TaskState = TaskState.RUNNING
    node_id: str = ""  # empty until scheduled
    status: TaskStatus = field(default_factory=TaskStatus)
    created_at: float = 0.0
    updated_at: float = 0.0
    # scheduler's explanation when it cannot place the task
    sched_message: str = ""

    @property
    def name(self) -> str:
        return f"{self.service_name}.{self.slot}"

    @property
    def alive(self) -> bool:
        """Counts towards the service's replicas: wanted running and not yet ended."""
        return self.desired_state <= TaskState.RUNNING and not self.status.state.terminal


# --------------------------------------------------------------------------- msgpack forms

def to_dict(obj: Any) -> Any:
    """A record → plain dicts/lists/ints/strs for msgpack and JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.IntEnum):
        return int(obj)
    if isinstance(obj, enum.StrEnum):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def mount_from_dict(d: dict[str, Any]) -> Mount:
    return Mount(type=d["type"], target=d["target"], source=d.get("source", ""),
                 readonly=bool(d.get("readonly", False)), tmpfs_size=int(d.get("tmpfs_size", 0)))


def spec_from_dict(d: dict[str, Any]) -> ServiceSpec:
    """A spec dict (already validated, or from the log) → ServiceSpec. Missing fields take
    their defaults, so records written by older versions still load."""
    defaults = ServiceSpec(name="", command=())
    return ServiceSpec(
        name=d["name"],
        command=tuple(d["command"]),
        replicas=int(d.get("replicas", 1)),
        env=dict(d.get("env", {})),
        workdir=d.get("workdir", ""),
        stop_grace_period=float(d.get("stop_grace_period", 10.0)),
        labels=dict(d.get("labels", {})),
        image=d.get("image", ""),
        user=d.get("user", ""),
        stop_signal=d.get("stop_signal", "SIGTERM"),
        limit_memory=int(d.get("limit_memory", 0)),
        limit_cpu=float(d.get("limit_cpu", 0.0)),
        limit_pids=int(d.get("limit_pids", 0)),
        reserve_memory=int(d.get("reserve_memory", 0)),
        reserve_cpu=float(d.get("reserve_cpu", 0.0)),
        mounts=tuple(mount_from_dict(m) for m in d.get("mounts", ())),
        ports=tuple(PortSpec(published=int(p["published"]), target=int(p["target"]),
                             protocol=p.get("protocol", "tcp")) for p in d.get("ports", ())),
        lb_algorithm=d.get("lb_algorithm", "round-robin"),
        restart_condition=d.get("restart_condition", defaults.restart_condition),
        restart_delay=float(d.get("restart_delay", defaults.restart_delay)),
        restart_max_attempts=int(d.get("restart_max_attempts", 0)),
        restart_window=float(d.get("restart_window", 0.0)),
        update_parallelism=int(d.get("update_parallelism", 1)),
        update_delay=float(d.get("update_delay", 0.0)),
        force_update=int(d.get("force_update", 0)),
        secrets=tuple(file_ref_from_dict(r) for r in d.get("secrets", ())),
        configs=tuple(file_ref_from_dict(r) for r in d.get("configs", ())),
        constraints=tuple(str(c) for c in d.get("constraints", ())),
    )


def file_ref_from_dict(d: dict[str, Any]) -> FileRef:
    return FileRef(name=d["name"], target=d.get("target", ""), mode=int(d.get("mode", 0o444)))


def status_from_dict(d: dict[str, Any]) -> TaskStatus:
    return TaskStatus(
        state=TaskState(d["state"]),
        timestamp=float(d.get("timestamp", 0.0)),
        message=d.get("message", ""),
        exit_code=d.get("exit_code"),
        pid=d.get("pid"),
        err=d.get("err", ""),
        addr=d.get("addr", ""),
    )


def node_from_dict(d: dict[str, Any]) -> Node:
    return Node(
        id=d["id"],
        hostname=d["hostname"],
        addr=d["addr"],
        api_port=int(d["api_port"]),
        raft_port=int(d["raft_port"]),
        role=NodeRole(d["role"]),
        state=NodeState(d.get("state", "unknown")),
        availability=NodeAvailability(d.get("availability", "active")),
        message=d.get("message", ""),
        created_at=float(d.get("created_at", 0.0)),
        updated_at=float(d.get("updated_at", 0.0)),
        labels=dict(d.get("labels", {})),
        gossip_port=int(d.get("gossip_port", 7946)),
        subnet=d.get("subnet", ""),
        memory_bytes=int(d.get("memory_bytes", 0)),
        cpus=float(d.get("cpus", 0.0)),
    )


def task_from_dict(d: dict[str, Any]) -> Task:
    return Task(
        id=d["id"],
        service_id=d["service_id"],
        service_name=d["service_name"],
        slot=int(d["slot"]),
        spec=spec_from_dict(d["spec"]),
        service_version=int(d["service_version"]),
        desired_state=TaskState(d["desired_state"]),
        node_id=d.get("node_id", ""),
        status=status_from_dict(d["status"]),
        created_at=float(d.get("created_at", 0.0)),
        updated_at=float(d.get("updated_at", 0.0)),
        sched_message=d.get("sched_message", ""),
    )
