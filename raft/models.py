"""The cluster's objects: plain typed records replicated by Raft.

Owns: Node, Service (with its versioned ServiceSpec), Task and Network records, the ordered
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from shoal.raft import generic, schema
from shoal.raft.spec import (
    Constraint,
    FileRef,
    Mount,
    PortSpec,
    ServiceSpec,
    TaskSpec,
)

__all__ = ["Constraint", "FileRef", "Mount", "PortSpec", "ServiceSpec", "TaskSpec"]

R = TypeVar("R")  # a record (``evolve``)


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
        return self >= _COMPLETE

    def lower(self) -> str:
        return self.name.lower()


# Plain ints for the hot comparisons: looking a member up on the enum class costs ~0.5 µs on
# Python 3.11, and a leader pass makes a few per task (100,000 tasks → tenths of a second).
_RUNNING = int(TaskState.RUNNING)
_COMPLETE = int(TaskState.COMPLETE)


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
    # its description, as Swarm's Description: reported at join and refreshed by its agent
    # when it differs (the ``node_describe`` command, schema 11: shoal.raft.schema)
    memory_bytes: int = 0  # total memory of the node (0 = unknown)
    cpus: float = 0.0  # CPUs the node's agent may use (0 = unknown)
    # generic resources (Swarm's, shoal.raft.generic): kind → a count (discrete) or the
    # node's IDs of that kind (named); set by `node update --generic-resource-add`
    generic_resources: dict[str, int | list[str]] = field(default_factory=dict)
    # its architecture as Docker reports it (``uname -m``: x86_64, aarch64; Swarm's
    # Description.Platform.Architecture, the constraint ``node.platform.arch``); "" = not
    # reported (a node that joined below schema 11 until its agent describes it)
    arch: str = ""

    @property
    def raft_addr(self) -> str:
        return f"{self.addr}:{self.raft_port}"

    @property
    def api_addr(self) -> str:
        return f"{self.addr}:{self.api_port}"


# The roles of users (shoal.node.users), weakest first: each includes the ones before it.
USER_ROLES = ("viewer", "operator", "admin")


@dataclass(frozen=True)
class User:
    """A person or script using the API and the dashboard (``shoal user add``)."""

    name: str
    role: str  # one of USER_ROLES
    # the scrypt hash with its parameters (shoal.node.users), *sealed* under the managers'
    # key like the join-token secrets: workers' replicas never hold it in the clear
    password: str = ""
    token_hash: str = ""  # SHA-256 (hex) of its current API token; "" = none issued
    created_at: float = 0.0
    updated_at: float = 0.0


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
class Volume:
    """A named volume created with ``shoal volume create``: its driver and options hold
    cluster-wide (shoal.runtime.volumes mounts it on whichever node runs a task using it).
    Options name secrets (``IdentityFile-secret=NAME``), never hold their values."""

    id: str
    name: str
    driver: str = "local"
    options: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0


def resolve_mount(m: Mount, vols: Mapping[str, Volume]) -> tuple[str, dict[str, str]]:
    """The driver and options a volume mount uses: its own (``volume-driver``/``volume-opt``,
    which make the volume implicitly, as Docker), else the created volume's, else local."""
    if m.volume_driver or m.volume_opts:
        return m.volume_driver or "local", dict(m.volume_opts)
    vol = vols.get(m.source) if m.type == "volume" else None
    return (vol.driver, dict(vol.options)) if vol is not None else ("local", {})


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
class Network:
    """A user-defined network (``shoal network create``): a VXLAN overlay spanning every
    node, with its own subnet and VNI (allocated by the state, shoal.raft.networks).
    Immutable; removed only while no service uses it."""

    id: str
    name: str
    driver: str = "overlay"
    subnet: str = ""
    gateway: str = ""
    vni: int = 0
    internal: bool = False  # no route out of the network (only its own members and VIPs)
    attachable: bool = False  # recorded for Compose/Swarm parity (no standalone containers)
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0


@dataclass(frozen=True)
class UpdateStatus:
    """Progress of the latest rolling update (or rollback) of a service, written by the leader
    (Swarm's UpdateStatus). ``state`` "" = no update since the service was created."""

    state: str = ""  # "updating" | "paused" | "completed" | "rollback_started" |
    #                  "rollback_paused" | "rollback_completed"
    message: str = ""
    started_at: float = 0.0
    completed_at: float = 0.0

    @property
    def paused(self) -> bool:
        return self.state in ("paused", "rollback_paused")

    @property
    def rollback(self) -> bool:
        return self.state.startswith("rollback")


@dataclass(frozen=True)
class JobRun:
    """One run of a scheduled job (shoal.node.cron), written by the leader."""

    scheduled_at: float  # the time the schedule gave (wall clock): the run's identity
    iteration: int = 0  # the job iteration its tasks carry (0 for a skipped run)
    state: str = "running"  # "running" | "completed" | "failed" | "skipped"
    started_at: float = 0.0  # when the leader started (or skipped) it
    finished_at: float = 0.0
    completed: int = 0  # its tasks that exited 0
    failed: int = 0  # its tasks that failed or were rejected
    message: str = ""


@dataclass(frozen=True)
class JobStatus:
    """A job's runs (Swarm's JobStatus: JobIteration, LastExecution), written by the leader.
    ``iteration`` goes up with every scheduled run: the tasks of a run carry it
    (``Task.job_iteration``). ``last_scheduled``: the scheduled time of the latest run
    (started or skipped); a run is started at most once per scheduled time, whoever leads."""

    iteration: int = 0
    last_scheduled: float = 0.0
    runs: tuple[JobRun, ...] = ()  # the latest ``schedule.history`` runs, oldest first


@dataclass(frozen=True)
class AutoscaleDecision:
    """One replica change the autoscaler (shoal.node.autoscale) made, with its inputs."""

    at: float  # when (the leader's wall clock)
    current: int  # replicas before
    desired: int  # replicas after
    usage: float  # averaged usage over the window, fraction of the tasks' limits (-1: none)
    target: float  # the target it was compared with
    metric: str = "cpu"  # "cpu" | "memory": the metric that asked for the most replicas
    tasks: int = 0  # tasks whose usage counted (running, not starting or unhealthy)
    reason: str = ""


@dataclass(frozen=True)
class AutoscaleStatus:
    """The autoscaler's last decisions (newest last, at most AUTOSCALE_HISTORY), written by
    the leader; shown by `service inspect`."""

    decisions: tuple[AutoscaleDecision, ...] = ()


AUTOSCALE_HISTORY = 10


@dataclass(frozen=True)
class Service:
    id: str
    spec: ServiceSpec
    version: int = 1  # bumped on every spec change (scale included)
    vip: str = ""  # stable virtual IP served by every node's balancer
    previous_spec: ServiceSpec | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    update_status: UpdateStatus = field(default_factory=UpdateStatus)
    job_status: JobStatus = field(default_factory=JobStatus)  # scheduled jobs' runs
    # the autoscaler's decisions (a class-level default: Services pickled before it have it)
    autoscale: AutoscaleStatus = AutoscaleStatus()


class Health(enum.StrEnum):
    """A running task's health (Docker's), ordered: ``rank`` only grows (an unhealthy task is
    stopped, never healthy again), so two RUNNING reports merge by keeping the greater."""

    NONE = ""  # the task has no health check
    STARTING = "starting"  # checked, not yet healthy
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # `retries` consecutive failures: it is stopped and replaced

    @property
    def rank(self) -> int:
        return _HEALTH_RANK[self]


_HEALTH_RANK = {Health.NONE: 0, Health.STARTING: 1, Health.HEALTHY: 2, Health.UNHEALTHY: 3}


@dataclass(frozen=True)
class HealthResult:
    """One health probe (Docker's health log entry)."""

    start: float  # wall-clock seconds
    end: float
    exit_code: int  # 0 = passed, 1 = failed, -1 = timed out / could not run
    output: str = ""  # the command's output (first 4 KiB) or the probe's answer/error


@dataclass(frozen=True)
class ContainerStatus:
    """One extra container of a pod (a sidecar or an init container), as its node saw it
    (shoal.node.pod); the main container's is the task's own status."""

    name: str
    kind: str = "sidecar"  # sidecar | init
    state: str = "waiting"  # waiting | running | exited
    pid: int | None = None  # its init's host pid while running
    exit_code: int | None = None  # its last exit
    restarts: int = 0  # times its node restarted it (its own restart policy)
    health: Health = Health.NONE
    message: str = ""


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
    health: Health = Health.NONE  # RUNNING tasks with a health check (node/health.py)
    failing_streak: int = 0  # consecutive failed probes (counted after the start period)
    health_log: tuple[HealthResult, ...] = ()  # the last probes, oldest first (at most 5)
    containers: tuple[ContainerStatus, ...] = ()  # a pod's sidecars and init containers

    @property
    def up(self) -> bool:
        """Running, and healthy if it has a health check: it may receive connections, counts
        as a running replica, and lets a rolling update move on."""
        return self.state is TaskState.RUNNING and self.health in (Health.NONE, Health.HEALTHY)

    def merges_over(self, old: TaskStatus) -> bool:
        """Is this report newer than ``old``? States only grow; within RUNNING, health only
        grows too (a late "starting" cannot hide "healthy" or "unhealthy")."""
        if self.state != old.state:
            return self.state > old.state
        if self.state is TaskState.RUNNING and self.health.rank < old.health.rank:
            return False
        return self != old


@dataclass(frozen=True)
class Task:
    id: str
    service_id: str
    service_name: str
    slot: int
    spec: TaskSpec  # the service's task template when the task was made (never edited)
    service_version: int
    desired_state: TaskState = TaskState.RUNNING
    node_id: str = ""  # empty until scheduled
    status: TaskStatus = field(default_factory=TaskStatus)
    created_at: float = 0.0
    updated_at: float = 0.0
    # scheduler's explanation when it cannot place the task
    sched_message: str = ""
    # network name → the task's address on it, for each of ``spec.networks`` (allocated by
    # the state when the task is assigned; released once the task has ended)
    net_addrs: dict[str, str] = field(default_factory=dict)
    # a scheduled job's run the task belongs to (Service.job_status.iteration when made)
    job_iteration: int = 0
    # when the task first came up (running, and healthy if it has a health check), by the
    # state's clock; 0 = not yet (a rolling update's monitor window counts from there)
    up_at: float = 0.0

    @property
    def name(self) -> str:
        """``web.3``; a global task (slot 0) is named after its node, as in Swarm."""
        if self.slot == 0 and self.node_id:
            return f"{self.service_name}.{self.node_id[:12]}"
        return f"{self.service_name}.{self.slot}"

    @property
    def alive(self) -> bool:
        """Counts towards the service's replicas: wanted running and not yet ended."""
        return self.desired_state <= _RUNNING and self.status.state < _COMPLETE


# --------------------------------------------------------------------------- msgpack forms

def evolve(record: R, **changes: Any) -> R:
    """``dataclasses.replace`` for the state's hot paths (an assignment, a status report:
    applied by every manager and every worker): a copy of a frozen record with ``changes``,
    made without running ``__init__`` — 0.6 µs instead of 3.8 µs for a Task. Only for these
    records, which have no ``__post_init__`` and no slots; a name that is not a field
    raises TypeError as ``replace`` does."""
    if not changes.keys() <= record.__dict__.keys():
        raise TypeError(f"{type(record).__name__} has no field "
                        f"{sorted(changes.keys() - record.__dict__.keys())[0]!r}")
    copy = object.__new__(type(record))
    object.__setattr__(copy, "__dict__", {**record.__dict__, **changes})
    return copy


def to_dict(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """A record → plain dicts/lists/ints/strs for msgpack and JSON.

    ``memo`` (one conversion's, kept only while ``obj`` is alive): each spec (a frozen
    msgspec Struct) is converted once and its plain form shared by every record holding that
    same object — the tasks of a service share its template — so the caller must not modify
    the result in place."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name), memo) for f in dataclasses.fields(obj)}
    if isinstance(obj, msgspec.Struct):
        if memo is None:
            return {name: to_dict(getattr(obj, name)) for name in obj.__struct_fields__}
        plain = memo.get(id(obj))
        if plain is None:
            plain = memo[id(obj)] = {name: to_dict(getattr(obj, name), memo)
                                     for name in obj.__struct_fields__}
        return plain
    if isinstance(obj, enum.IntEnum):
        return int(obj)
    if isinstance(obj, enum.StrEnum):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [to_dict(x, memo) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v, memo) for k, v in obj.items()}
    return obj


def spec_from_dict(d: dict[str, Any]) -> ServiceSpec:
    """A service spec from the log or the state (validated before it was proposed): today's
    nested form, or schema 1's flat one (upgraded). Missing fields take their defaults."""
    if schema.is_legacy_spec(d):
        d = schema.upgrade_spec(d)
    return msgspec.convert(d, ServiceSpec)


def task_spec_from_dict(d: dict[str, Any]) -> TaskSpec:
    """A task's spec: the task template, or the whole flat service spec schema 1 stored."""
    if schema.is_legacy_task_spec(d):
        d = schema.upgrade_task_spec(d)
    return msgspec.convert(d, TaskSpec)


def status_from_dict(d: dict[str, Any]) -> TaskStatus:
    return TaskStatus(
        state=TaskState(d["state"]),
        timestamp=float(d.get("timestamp", 0.0)),
        message=d.get("message", ""),
        exit_code=d.get("exit_code"),
        pid=d.get("pid"),
        err=d.get("err", ""),
        addr=d.get("addr", ""),
        health=Health(d.get("health", "")),
        failing_streak=int(d.get("failing_streak", 0)),
        health_log=tuple(HealthResult(start=float(r["start"]), end=float(r["end"]),
                                      exit_code=int(r["exit_code"]),
                                      output=str(r.get("output", "")))
                         for r in d.get("health_log", ())[-5:]),
        containers=tuple(container_status_from_dict(c) for c in d.get("containers", ())[:16]),
    )


def container_status_from_dict(d: dict[str, Any]) -> ContainerStatus:
    code, pid = d.get("exit_code"), d.get("pid")
    return ContainerStatus(
        name=str(d["name"]), kind=str(d.get("kind", "sidecar")),
        state=str(d.get("state", "waiting")), pid=int(pid) if pid is not None else None,
        exit_code=int(code) if code is not None else None,
        restarts=int(d.get("restarts", 0)), health=Health(d.get("health", "")),
        message=str(d.get("message", ""))[:1024])


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
        generic_resources=generic.node_resources(d.get("generic_resources")),
        arch=str(d.get("arch", "")),
    )


def template_task(svc: Service, task_id: str, slot: int, now: float, node_id: str = "",
                  pending: str = "", job_iteration: int = 0) -> Task:
    """A new task of the service's current template and version, made at ``now``: what the
    orchestrator creates (shoal.node.rollout.new_task), and what the leader's compact
    ``spawn`` op stands for (``spawn_ops``; made at the batch's ``now``). With ``node_id``
    (global modes) it is made placed: ASSIGNED, or PENDING on that node with the
    scheduler's reason ``pending`` when the node lacks the reserved resources."""
    if node_id and not pending:
        status = TaskStatus(state=TaskState.ASSIGNED, timestamp=now, message="scheduled")
    elif node_id:
        status = TaskStatus(state=TaskState.PENDING, timestamp=now, message=pending)
    else:
        status = TaskStatus(state=TaskState.NEW, timestamp=now, message="created")
    return Task(id=task_id, service_id=svc.id, service_name=svc.spec.name, slot=slot,
                spec=svc.spec.task, service_version=svc.version, node_id=node_id,
                desired_state=TaskState.RUNNING, status=status, created_at=now,
                updated_at=now, sched_message=pending, job_iteration=job_iteration)


def spawn_ops(ops: list[Any], services: Mapping[str, Service]) -> list[Any]:
    """A leader batch's ops with each ``create`` of a task exactly as ``template_task``
    makes it for the service as it is now (``services``: the state the batch will be
    applied to) written as the compact ``spawn`` op (schema 5): ``("spawn", task_id,
    service_id, service_version, slot, node_id, pending, job_iteration)``. A create holds
    the whole task, template included (~920 bytes for a plain one); a spawn ~70 bytes, and
    every replica and worker shares the service's template instead of decoding a copy per
    task: a 1,000-task scale was 0.9 MB to replicate to each manager and feed to each
    worker. Any other create (a template the service no longer has, a field off the
    template) stays as it is."""
    # (id of a create's spec dict, service id) → it is that service's template (the creates
    # of one service in a pass share one spec dict: compared once)
    templates: dict[tuple[int, str], bool] = {}
    statuses: dict[tuple[str, str], dict[str, Any]] = {}  # (node, pending) → status at 0
    out: list[Any] = []
    for op in ops:
        d = op[1] if op[0] == "create" and len(op) == 2 and isinstance(op[1], dict) else None
        svc = services.get(d.get("service_id", "")) if d is not None else None
        if d is None or svc is None or not _is_template_task(d, svc, templates, statuses):
            out.append(op)
            continue
        out.append(("spawn", d["id"], svc.id, svc.version, d["slot"], d["node_id"],
                    d["sched_message"], d["job_iteration"]))
    return out


_TASK_KEYS = frozenset(f.name for f in dataclasses.fields(Task))


def _is_template_task(d: dict[str, Any], svc: Service,
                      templates: dict[tuple[int, str], bool],
                      statuses: dict[tuple[str, str], dict[str, Any]]) -> bool:
    raw = d.get("spec")
    same = templates.get((id(raw), svc.id))
    if same is None:  # (every op is alive meanwhile: an id is not reused within a batch)
        same = templates[(id(raw), svc.id)] = raw == to_dict(svc.spec.task)
    if not same or d.keys() != _TASK_KEYS:
        return False
    node_id, pending, ts = d["node_id"], d["sched_message"], d["created_at"]
    if d["service_version"] != svc.version or d["service_name"] != svc.spec.name or \
            d["desired_state"] != TaskState.RUNNING or d["net_addrs"] or d["up_at"] or \
            not isinstance(d["id"], str) or not isinstance(d["slot"], int) or \
            not isinstance(node_id, str) or not isinstance(pending, str) or \
            not isinstance(d["job_iteration"], int) or d["updated_at"] != ts:
        return False
    made = statuses.get((node_id and "placed", pending))  # (any node: the same status)
    if made is None:
        made = statuses[(node_id and "placed", pending)] = to_dict(
            template_task(svc, "", 0, 0.0, node_id, pending).status)
    return bool(d["status"] == {**made, "timestamp": ts})


def task_from_dict(d: dict[str, Any], spec: TaskSpec | None = None) -> Task:
    """``spec``: ``d["spec"]`` already converted (a batch of creates sharing one template)."""
    return Task(
        id=d["id"],
        service_id=d["service_id"],
        service_name=d["service_name"],
        slot=int(d["slot"]),
        spec=spec if spec is not None else task_spec_from_dict(d["spec"]),
        service_version=int(d["service_version"]),
        desired_state=TaskState(d["desired_state"]),
        node_id=d.get("node_id", ""),
        status=status_from_dict(d["status"]),
        created_at=float(d.get("created_at", 0.0)),
        updated_at=float(d.get("updated_at", 0.0)),
        sched_message=d.get("sched_message", ""),
        net_addrs=dict(d.get("net_addrs") or {}),
        job_iteration=int(d.get("job_iteration", 0)),
        up_at=float(d.get("up_at", 0.0)),
    )
