"""The service spec: what a user asks for, declared once per field.

Owns: the nested ``ServiceSpec`` (Swarm's shape) and every field's declaration — type,
default, bounds, unit, help text and CLI flag — as msgspec ``Struct`` fields annotated with
``decl(...)``. From these declarations come the API's validation (``msgspec.convert`` with
strict types: errors carry the field's path), the JSON Schema / OpenAPI description
(``msgspec.json.schema``), the CLI's create/update flags (``shoal.cli.specflags``) and the
spec reference in docs/api.md (``reference_markdown``). Cross-field rules that a type cannot
say live in each Struct's ``__post_init__`` and name their sub-field. Must not touch: I/O,
clocks, randomness; the records that carry a spec (``shoal.raft.models``).

Why msgspec (issue 11): one typed declaration gives strict decoding from JSON and msgpack
with error paths (``$.task.container.command``), JSON Schema for OpenAPI, and frozen,
hashable, comparable values — the hand-written ``spec_from_dict``/``validate_spec`` pair and
the CLI's copy of every field and default (six edits per field) are gone.

The layout follows swarmkit's ``ServiceSpec``::

    ServiceSpec
     ├─ name, labels
     ├─ task: TaskSpec               the template copied into every task (only a change
     │   ├─ container: ContainerSpec  here replaces tasks)
     │   │   └─ healthcheck: HealthCheck
     │   ├─ sidecars, init_containers: SidecarSpec...   more containers: a pod
     │   ├─ resources: Resources {limits, reservations}
     │   ├─ restart: RestartPolicy
     │   ├─ placement: Placement {constraints, max_replicas, preferences}
     │   ├─ force_update
     │   └─ networks                  user-defined networks the tasks join
     ├─ mode: ServiceMode {type, replicas, max_concurrent}
     │   ├─ schedule: Schedule {cron, timezone, policy, starting_deadline...}  (jobs: when)
     │   └─ autoscale: Autoscale {min, max, cpu, memory, window...}  (replicated: how many)
     ├─ update: UpdateConfig          how a changed template rolls out
     ├─ rollback: RollbackConfig      how a rollback rolls back
     └─ endpoint: EndpointSpec {mode, ports, expose, lb_algorithm}

A field's declaration (``decl``) keeps its CLI flag and parser kind in ``Meta.extra``:
``flag`` (long option, create and update), ``short``, ``cli`` (how the CLI parses it:
``str int float bytes duration choice map list command words flag struct``; ``words``: one
string split as a shell would (``--entrypoint 'sh -c'``); ``struct``: a
nested Struct given as one ``key=value,...`` flag, parsed by its ``item``; ``flag``: a switch
without a value that sets a bool, and that giving any other flag of its Struct on
`service update` turns off), ``item`` (the list item
parser: ``mount port secret config constraint``), ``unit`` and ``metavar``. A field without
``flag`` is set only through the API.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import msgspec

from shoal.raft.errors import SpecError
from shoal.raft.filerefs import docker_file_defaults  # noqa: F401 (re-exported)

# (re-exported: callers import the spec's records from here)
from shoal.raft.podspec import (  # noqa: F401
    CONFIGS_DIR,
    DAY,
    ENV_KEY_RE,
    FILE_NAME_RE,
    FILE_TARGETS,
    FORBIDDEN_FILE_DIRS,
    HOST_GATEWAY,
    HOSTNAME_RE,
    HTTP_CHECK_RE,
    IMAGE_RE,
    MAIN_CONTAINER,
    MAX_COMMAND_BYTES,
    MAX_ENV,
    MAX_FILE_REFS,
    MAX_GRACE,
    MAX_REPLICAS,
    NAME_RE,
    OBJECT_NAME_RE,
    OLD_MAX_GRACE,
    SECRETS_DIR,
    SERVICE_NAME_RE,
    SIGNALS,
    USER_RE,
    Command,
    ContainerSpec,
    FileRef,
    HealthCheck,
    Limits,
    Mount,
    Reservations,
    Resources,
    RestartPolicy,
    SidecarSpec,
    Ulimit,
    _Spec,
    check_files,
    check_pod,
    container_rows,
    decl,
    file_path,
    log_limits,
    parse_http_check,
)
from shoal.raft.schedule import MAX_SCHEDULE_HISTORY, Schedule, parse_cron  # noqa: F401

# placement constraints (Swarm's syntax and character sets)
CONSTRAINT_KEYS = ("node.id", "node.hostname", "node.role", "node.ip", "node.platform.os",
                   "node.platform.arch")
LABEL_PREFIX = "node.labels."
CONSTRAINT_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]+$")
CONSTRAINT_VALUE_RE = re.compile(r"^[A-Za-z0-9:_\s.*()?+\[\]\\^$|/-]+$")
MAX_CONSTRAINTS = 64
MAX_CONSTRAINT_LEN = 512
# ports the node itself uses: never published by a service
RESERVED_PORTS = {2377: "the node API", 2378: "Raft", 7946: "gossip"}
# where the managers pick a published port for ``-p TARGET`` (Docker's ingress range)
ASSIGNED_PORTS = range(30000, 32768)


SPREAD_RE = re.compile(r"^node\.labels\.[A-Za-z0-9_.-]+$", re.I)
MAX_PREFERENCES = 8


class PlacementPreference(_Spec, frozen=True):
    """``--placement-pref spread=node.labels.zone`` (Swarm's ``{Spread: {SpreadDescriptor}}``):
    spread the service's tasks evenly over the values of a node label (nodes without the
    label form one more group), then over the nodes of each value."""

    spread: Annotated[str, decl("the node label to spread over: node.labels.KEY")]

    def __post_init__(self) -> None:
        if not SPREAD_RE.match(self.spread):
            raise SpecError("spread", f"{self.spread!r}: spread over a node label, "
                            "node.labels.KEY (e.g. node.labels.zone)")
        canonical = LABEL_PREFIX + self.spread[len(LABEL_PREFIX):]
        if canonical != self.spread:
            msgspec.structs.force_setattr(self, "spread", canonical)

    @property
    def label(self) -> str:
        return self.spread[len(LABEL_PREFIX):]

    @property
    def key(self) -> str:
        """What ``--placement-pref-rm`` names: ``spread=node.labels.KEY``."""
        return f"spread={self.spread}"


class Placement(_Spec, frozen=True):
    """Where the scheduler may put the tasks (Swarm's Placement): nodes that satisfy every
    constraint, at most ``max_replicas`` tasks of the service per node, spread as the
    preferences say (each one within the groups of the previous), then over the nodes."""

    constraints: Annotated[tuple[str, ...], decl(
        "expressions every node of a task must satisfy: node.labels.KEY==VALUE, "
        "node.role==manager, node.hostname!=NAME, node.id==ID, node.ip==CIDR, "
        "node.platform.os==linux, node.platform.arch==aarch64", flag="--constraint",
        cli="list", item="constraint", metavar="EXPR", max_length=MAX_CONSTRAINTS)] = ()
    max_replicas: Annotated[int, decl(
        "tasks of the service one node runs at most (replicated modes); 0 = no limit",
        flag="--max-replicas-per-node", cli="int", metavar="N", ge=0,
        le=MAX_REPLICAS)] = 0
    preferences: Annotated[tuple[PlacementPreference, ...], decl(
        "spread the tasks evenly over the values of a node label, then over nodes; "
        "several: each spreads within the groups of the previous", flag="--placement-pref",
        cli="list", item="preference", metavar="spread=node.labels.KEY",
        max_length=MAX_PREFERENCES)] = ()

    def __post_init__(self) -> None:
        canonical: list[str] = []
        for i, expr in enumerate(self.constraints):
            text = str(parse_constraint(expr, f"constraints[{i}]"))
            if text not in canonical:
                canonical.append(text)
        if tuple(canonical) != self.constraints:  # stored in canonical form
            msgspec.structs.force_setattr(self, "constraints", tuple(canonical))
        spreads = [p.spread for p in self.preferences]
        if len(set(spreads)) != len(spreads):
            raise SpecError("preferences", "the same label is given twice")


# --network values that name a network mode rather than a user-defined network
NETWORK_MODES = ("host", "none")


class TaskSpec(_Spec, frozen=True):
    """The task template: copied into every task. Changing it replaces the tasks (a rolling
    update); changing anything else in the service spec does not."""

    container: ContainerSpec = ContainerSpec()
    resources: Resources = Resources()
    restart: RestartPolicy = RestartPolicy()
    placement: Placement = Placement()
    force_update: Annotated[int, decl("bumped by `service update --force` to redeploy every "
                                      "task with an unchanged spec", ge=0,
                                      le=(1 << 31))] = 0
    networks: Annotated[tuple[str, ...], decl(
        "user-defined networks (`shoal network create`) the tasks join, one interface each; "
        "the first is the task's primary address; none = the cluster's default network",
        flag="--network", cli="list", item="network",
        metavar="NETWORK|name=NETWORK,alias=NAME[,alias=NAME]", max_length=16)] = ()
    network_mode: Annotated[Literal["default", "host", "none"], decl(
        "the tasks' network: default = a network namespace of their own on the cluster "
        "network (an address, the service's VIP and DNS name, the routing mesh) and on "
        "--network's networks; host = the node's own network namespace (Docker's "
        "--network host, which means this too): no address of their own and no VIP (as "
        "Swarm): the service's name resolves to its tasks' nodes, published ports lead "
        "there, one task per node when it serves ports; "
        "none = a namespace with only lo", flag="--network-mode", cli="choice")] = "default"
    network_aliases: Annotated[dict[str, tuple[str, ...]], decl(
        "more DNS names of the service on a network it joins: network → names (Docker's "
        "--network name=NET,alias=NAME, Compose's networks: {NET: {aliases: [...]}}; "
        "needs cluster schema 7)")] = {}
    sidecars: Annotated[tuple[SidecarSpec, ...], decl(
        "more containers of the task (a pod), started after the main one in this order; "
        "they share its network namespace (localhost) and optionally its mounts",
        max_length=8)] = ()
    init_containers: Annotated[tuple[SidecarSpec, ...], decl(
        "containers run one after the other before the main one, in its network namespace; "
        "each must exit 0, else the task fails", max_length=8)] = ()

    def __post_init__(self) -> None:
        check_pod(self.container, self.sidecars, self.init_containers)
        if self.networks in (("host",), ("none",)) and self.network_mode == "default":
            # Docker's spelling (`--network host`): stored as the mode it names
            msgspec.structs.force_setattr(self, "network_mode", self.networks[0])
            msgspec.structs.force_setattr(self, "networks", ())
        if self.network_mode != "default" and self.networks:
            raise SpecError("networks", f"tasks with network mode {self.network_mode} join "
                            "no other network")
        for i, name in enumerate(self.networks):
            if name in NETWORK_MODES:
                raise SpecError(f"networks[{i}]", f"{name!r} is a network mode, not a "
                                f"network: give it alone (--network {name}) or as "
                                f"--network-mode {name}")
            if not OBJECT_NAME_RE.match(name):
                raise SpecError(f"networks[{i}]", f"{name!r} is not a network name")
            if name in self.networks[:i]:
                raise SpecError(f"networks[{i}]", f"network {name} is listed twice")
        # aliases: DNS names of the service on one of its networks (node/mesh.py ``lookup``):
        # dotted labels of letters, digits, '_' and '-' (a service name is one such label),
        # at most 63 bytes each and 253 in all, at most 16 per network, compared ignoring case
        label = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
        for net, aliases in self.network_aliases.items():
            where = f"network_aliases.{net}"
            if net not in self.networks:
                raise SpecError(where, f"{net!r} is not one of the service's networks "
                                f"({', '.join(self.networks) or 'none'}): an alias is a name "
                                "on a network the service joins")
            if len(aliases) > 16:
                raise SpecError(where, f"{len(aliases)} aliases: at most 16 per network")
            seen: set[str] = set()
            for i, alias in enumerate(aliases):
                low = alias.lower()
                if len(alias) > 253 or not re.fullmatch(rf"{label}(?:\.{label})*", alias):
                    raise SpecError(f"{where}[{i}]", f"{alias!r} is not a DNS name (labels "
                                    "of letters, digits, '_' and '-', at most 63 characters "
                                    "each, 253 in all)")
                if low.startswith("tasks.") or low.endswith(".shoal"):
                    # (the DNS server's own forms: tasks.NAME, NAME.shoal — node/dns.py)
                    raise SpecError(f"{where}[{i}]", f"{alias!r}: an alias may not start "
                                    "with 'tasks.' nor end in '.shoal' (the DNS server adds "
                                    "both to every name)")
                if low in seen:
                    raise SpecError(f"{where}[{i}]", f"alias {alias} is listed twice")
                seen.add(low)
        if any(not aliases for aliases in self.network_aliases.values()):  # (canonical form)
            msgspec.structs.force_setattr(self, "network_aliases", {
                net: aliases for net, aliases in self.network_aliases.items() if aliases})
        if self.network_mode == "host":
            for key in self.container.sysctls:
                if key.startswith("net."):
                    raise SpecError("container.sysctls", f"{key} would change the node's own "
                                    "network: tasks on the host's network take no net.* sysctls")


# --------------------------------------------------------------------------- service

MODES = ("replicated", "global", "replicated-job", "global-job")
class Autoscale(_Spec, frozen=True):
    """Horizontal autoscaling on CPU (and memory) usage (beyond Swarm: Kubernetes' HPA rule).
    ``--autoscale min=2,max=20,cpu=60%[,memory=70%][,window=30s][,period=15s]
    [,stabilization=5m][,step=N][,tolerance=10%]``; ``max`` 0 = off (``--autoscale none``,
    `service update --autoscale-rm`). The leader (shoal.node.autoscale) samples the running,
    healthy tasks' cgroup usage, averages it over ``window`` as a fraction of each task's CPU
    limit (else its reservation, else 1 CPU) — memory: of its memory limit or reservation —
    and every ``period`` sets ``replicas`` to ceil(current * usage / target), unless the ratio
    is within ``tolerance`` of 1, clamped to [min, max], at most ``step`` tasks per period,
    and no lower than the highest recommendation of the last ``stabilization`` seconds (so a
    dip does not scale down at once). Only for replicated services; while on, the replica
    count is the autoscaler's (`service scale` is refused)."""

    min: Annotated[int, decl("fewest replicas", ge=1, le=MAX_REPLICAS)] = 1
    max: Annotated[int, decl("most replicas; 0 = autoscaling off", ge=0,
                             le=MAX_REPLICAS)] = 0
    cpu: Annotated[float, decl("target CPU usage, a fraction of each task's CPU limit (else "
                               "reservation, else 1 CPU); 0 = not a metric", ge=0, le=100)] = 0.0
    memory: Annotated[float, decl("target memory usage, a fraction of each task's memory "
                                  "limit (else reservation); 0 = not a metric", ge=0,
                                  le=100)] = 0.0
    window: Annotated[float, decl("usage is averaged over this time", unit="seconds",
                                  ge=1, le=DAY)] = 30.0
    period: Annotated[float, decl("time between two decisions (HPA's sync period)",
                                  unit="seconds", ge=1, le=DAY)] = 15.0
    stabilization: Annotated[float, decl(
        "scale-down stabilisation: the highest recommendation of this last time wins",
        unit="seconds", ge=0, le=DAY)] = 300.0
    step: Annotated[int, decl("tasks added or removed per period at most; 0 = Kubernetes' "
                              "default (up: max(4, current), down: no limit)", ge=0,
                              le=MAX_REPLICAS)] = 0
    tolerance: Annotated[float, decl("no change while usage/target is within 1 ± this",
                                     ge=0, le=1)] = 0.1

    def __post_init__(self) -> None:
        if not self.max:
            return
        if self.min > self.max:
            raise SpecError("min", f"min={self.min} is above max={self.max}")
        if not self.cpu and not self.memory:
            raise SpecError("cpu", "give a target: cpu=PERCENT% and/or memory=PERCENT%")

    @property
    def enabled(self) -> bool:
        return self.max > 0


class ServiceMode(_Spec, frozen=True):
    """How many tasks the service runs (Swarm's service modes; Swarm's API nests one object
    per mode, ``{Replicated: {Replicas}}``, ``{ReplicatedJob: {MaxConcurrent,
    TotalCompletions}}``…; here one record: ``type`` says which, and ``replicas`` is
    Replicas or TotalCompletions, as the CLI's ``--replicas`` is in Docker).

    * replicated: ``replicas`` tasks, kept running; placed by the scheduler.
    * global: one task on every eligible node (ready, not drained or paused, satisfying the
      constraints and reservations), following nodes joining, leaving and being drained.
    * replicated-job: run until ``replicas`` tasks exited 0, at most ``max_concurrent`` at a
      time; a task that exits 0 is COMPLETE and not restarted, a failed one is retried as the
      restart policy says (``any`` means ``on-failure`` for a job). Any update re-runs it.
    * global-job: one task exiting 0 on every eligible node, nodes joining later included.
    """

    type: Annotated[Literal[MODES], decl(  # type: ignore[valid-type]
        "replicated: `replicas` tasks; global: one task per eligible node; replicated-job: "
        "run `replicas` completions, `max_concurrent` at a time; global-job: one completion "
        "per eligible node", flag="--mode", cli="choice")] = "replicated"
    replicas: Annotated[int, decl("number of tasks (replicated-job: completions to reach; "
                                  "not used by the global modes)", flag="--replicas",
                                  cli="int", metavar="N", ge=0, le=MAX_REPLICAS)] = 1
    max_concurrent: Annotated[int, decl(
        "replicated-job: tasks running at once at most; 0 = replicas",
        flag="--max-concurrent", cli="int", metavar="N", ge=0, le=MAX_REPLICAS)] = 0
    schedule: Schedule = Schedule()
    autoscale: Annotated[Autoscale, decl(
        "autoscale the replicas on CPU/memory usage (replicated services); keys min, max, "
        "cpu, memory, window (30s), period (15s), stabilization (5m), step, tolerance (10%); "
        "none = off", flag="--autoscale", cli="struct", item="autoscale",
        metavar="min=N,max=N,cpu=P%[,memory=P%][,KEY=VALUE...]")] = Autoscale()

    def __post_init__(self) -> None:
        if self.autoscale.enabled and self.type != "replicated":
            raise SpecError("autoscale", f"--autoscale is for replicated services, not "
                            f"{self.type}")
        if self.per_node and self.replicas != 1:  # (1: the default, i.e. not given)
            raise SpecError("replicas", f"a {self.type} service runs one task per eligible "
                            "node: replicas is for the replicated modes")
        if self.max_concurrent and self.type != "replicated-job":
            raise SpecError("max_concurrent", f"is for replicated-job services only, not "
                            f"{self.type}")
        if self.schedule.cron and not self.job:
            raise SpecError("schedule.cron", f"a schedule runs a job: it needs --mode "
                            f"replicated-job or global-job, not {self.type}")

    @property
    def scheduled(self) -> bool:
        """A job run by its schedule (not on create and on update)."""
        return self.job and bool(self.schedule.cron)

    @property
    def job(self) -> bool:
        """Runs to completion (replicated-job, global-job)."""
        return self.type.endswith("-job")

    @property
    def per_node(self) -> bool:
        """One task per eligible node (global, global-job)."""
        return self.type.startswith("global")

    @property
    def concurrency(self) -> int:
        """replicated-job: tasks running at once at most."""
        return self.max_concurrent or self.replicas


class UpdateConfig(_Spec, frozen=True):
    """How a changed task template rolls out (Swarm's UpdateConfig): ``parallelism`` slots at
    a time, the next batch once the previous one is up (running, and healthy when the task
    has a health check) and ``delay`` has passed. ``order`` stop-first stops a slot's old
    task before starting its new one; start-first starts the new one first and stops the old
    one once the new one is up (at most replicas + parallelism tasks run meanwhile).

    A new task *fails* when it ends or turns unhealthy before it is up, or within
    ``monitor`` after it came up. Once the failures exceed ``max_failure_ratio`` x the tasks
    being updated, ``failure_action`` applies: pause (status ``paused``, until the next
    `service update`), continue, or rollback (back to the previous spec at once, status
    ``rollback_started`` with the reason, then ``rollback_completed``)."""

    parallelism: Annotated[int, decl("tasks replaced at a time; 0 = all at once",
                                     flag="--update-parallelism", cli="int", metavar="N",
                                     ge=0, le=MAX_REPLICAS)] = 1
    delay: Annotated[float, decl("wait between one batch running and the next starting",
                                 flag="--update-delay", cli="duration", unit="seconds",
                                 ge=0, le=DAY)] = 0.0
    failure_action: Annotated[Literal["pause", "continue", "rollback"], decl(
        "what a failed update does: pause it, continue, or roll back to the previous spec",
        flag="--update-failure-action", cli="choice")] = "pause"
    monitor: Annotated[float, decl("time after a new task came up during which its failure "
                                   "counts as a failure of the update",
                                   flag="--update-monitor", cli="duration", unit="seconds",
                                   ge=0, le=DAY)] = 5.0
    max_failure_ratio: Annotated[float, decl(
        "failed tasks tolerated, as a fraction of the tasks being updated (0 to 1)",
        flag="--update-max-failure-ratio", cli="float", ge=0, le=1)] = 0.0
    order: Annotated[Literal["stop-first", "start-first"], decl(
        "stop-first: stop the old task, then start its replacement; start-first: start the "
        "replacement, stop the old task once the new one is up", flag="--update-order",
        cli="choice")] = "stop-first"


class RollbackConfig(_Spec, frozen=True):
    """Like UpdateConfig, for a rollback (`service rollback`, `service update --rollback`,
    or the ``rollback`` failure action): Swarm's RollbackConfig. Its failure action is pause
    (status ``rollback_paused``) or continue."""

    parallelism: Annotated[int, decl("tasks rolled back at a time; 0 = all at once",
                                     flag="--rollback-parallelism", cli="int", metavar="N",
                                     ge=0, le=MAX_REPLICAS)] = 1
    delay: Annotated[float, decl("wait between rolled-back batches",
                                 flag="--rollback-delay", cli="duration", unit="seconds",
                                 ge=0, le=DAY)] = 0.0
    failure_action: Annotated[Literal["pause", "continue"], decl(
        "what a failed rollback does: pause it or continue",
        flag="--rollback-failure-action", cli="choice")] = "pause"
    monitor: Annotated[float, decl("time after a rolled-back task came up during which its "
                                   "failure counts as a failure of the rollback",
                                   flag="--rollback-monitor", cli="duration", unit="seconds",
                                   ge=0, le=DAY)] = 5.0
    max_failure_ratio: Annotated[float, decl(
        "failed tasks tolerated, as a fraction of the tasks being rolled back (0 to 1)",
        flag="--rollback-max-failure-ratio", cli="float", ge=0, le=1)] = 0.0
    order: Annotated[Literal["stop-first", "start-first"], decl(
        "stop-first or start-first, as for an update", flag="--rollback-order",
        cli="choice")] = "stop-first"


class PortSpec(_Spec, frozen=True):
    """``--publish [HOST_IP:]PUBLISHED:TARGET/PROTOCOL``: every node listens on ``published``
    (only at ``host_ip`` when given, on the nodes that have that address) and forwards to a
    task's ``target`` port (the routing mesh). ``published`` 0 (``-p TARGET``,
    as Docker): the managers assign a free port of ``ASSIGNED_PORTS`` when they apply the
    create/update (raft/state.py) and store it here, so it stays across updates."""

    published: Annotated[int, decl("port every node listens on (0: the managers assign one "
                                   "of 30000-32767)", ge=0, le=65535)]
    target: Annotated[int, decl("port of the task", ge=1, le=65535)]
    protocol: Annotated[Literal["tcp", "udp"], decl("transport protocol")] = "tcp"
    host_ip: Annotated[str, decl(
        "the IPv4 address it listens on, on each node that has it (127.0.0.1: every node's "
        "own loopback, reachable from that node only); \"\" = every address; needs cluster "
        "schema 13")] = ""

    def __post_init__(self) -> None:
        if self.published in RESERVED_PORTS:
            raise SpecError("published", f"port {self.published} is used by shoal itself "
                            f"({RESERVED_PORTS[self.published]})")
        if self.host_ip:
            check_host_ip(self.host_ip)

    @property
    def key(self) -> str:
        """What ``--publish-rm`` names: ``PUBLISHED/PROTOCOL``."""
        return f"{self.published}/{self.protocol}"


def is_ipv6(text: str) -> bool:
    """Whether ``text`` is an IPv6 address (a zone, ``%eth0``, allowed)."""
    try:
        ipaddress.IPv6Address(text.partition("%")[0])
    except ValueError:
        return False
    return True


def check_host_ip(text: str) -> None:
    """A published port's ``host_ip``: one IPv4 address, written as ``ipaddress`` writes
    it, that a node can listen on. SpecError(host_ip) says why not."""
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        if ":" in text and is_ipv6(text):
            raise SpecError("host_ip", f"{text!r}: IPv6 is not supported (the routing mesh "
                            "and host-mode ports listen on IPv4 addresses only)") from None
        raise SpecError("host_ip", f"{text!r} is not an IPv4 address (e.g. 127.0.0.1)"
                        ) from None
    if str(addr) != text:
        raise SpecError("host_ip", f"{text!r}: write the address as {addr}")
    if addr.is_unspecified:
        raise SpecError("host_ip", "0.0.0.0: leave host_ip empty to publish on every address")
    if addr.is_multicast or addr == ipaddress.IPv4Address("255.255.255.255"):
        raise SpecError("host_ip", f"{text}: a port cannot listen on a multicast or "
                        "broadcast address")


class ExposeSpec(_Spec, frozen=True):
    """``--expose PORT[/PROTOCOL]``: a port the tasks serve on, reachable from other tasks at
    the service's VIP (Docker's EXPOSE / Compose ``expose:``; not published on the nodes)."""

    port: Annotated[int, decl("port of the task", ge=1, le=65535)]
    protocol: Annotated[Literal["tcp", "udp"], decl("transport protocol")] = "tcp"

    @property
    def key(self) -> str:
        """What ``--expose-rm`` names: ``PORT/PROTOCOL``."""
        return f"{self.port}/{self.protocol}"


class EndpointSpec(_Spec, frozen=True):
    """How other tasks and clients reach the service. ``vip``: the service name resolves to
    the service's virtual IP, balanced by every node over the tasks on each port the service
    declares (published targets, ``expose``, the image's ExposedPorts); ``dnsrr``: the name
    resolves to the tasks' own addresses, shuffled per query, and there is no VIP."""

    mode: Annotated[Literal["vip", "dnsrr"], decl(
        "service discovery: vip (one balanced virtual IP) or dnsrr (DNS round robin over "
        "the task addresses)", flag="--endpoint-mode", cli="choice")] = "vip"
    ports: Annotated[tuple[PortSpec, ...], decl(
        "serve TARGET of the tasks on PUBLISHED of every node (the routing mesh; at HOST_IP "
        "only, e.g. 127.0.0.1, when given: cluster schema 13)",
        flag="--publish", short="-p", cli="list", item="port",
        metavar="[[HOST_IP:]PUBLISHED[-LAST]:]TARGET[-LAST][/tcp|udp]", max_length=256)] = ()
    host_ports: Annotated[tuple[PortSpec, ...], decl(
        "ports published in host mode (--publish mode=host,published=N,target=N): only on "
        "the nodes running a task, straight to it, the client's address kept; one task per "
        "node; needs cluster schema 7", max_length=256)] = ()
    expose: Annotated[tuple[ExposeSpec, ...], decl(
        "a port of the tasks reachable at the service's VIP from other tasks",
        flag="--expose", cli="list", item="expose", metavar="PORT[/tcp|udp]",
        max_length=256)] = ()
    lb_algorithm: Annotated[Literal["round-robin", "least-conn"], decl(
        "how the routing mesh picks a task", flag="--lb", cli="choice")] = "round-robin"

    def __post_init__(self) -> None:
        seen: set[tuple[int, str]] = set()
        for i, p in enumerate(self.ports):
            if p.published and (p.published, p.protocol) in seen:
                raise SpecError(f"ports[{i}].published",
                                f"port {p.published}/{p.protocol} is published twice")
            seen.add((p.published, p.protocol))
        for i, p in enumerate(self.host_ports):
            where = f"host_ports[{i}].published"
            if p.host_ip.startswith("127."):  # (no OUTPUT rule: node/hostports.py)
                raise SpecError(f"host_ports[{i}].host_ip", f"{p.host_ip}: a port published "
                                "in host mode is not translated for the node's own "
                                "connections, so nothing could reach it there; publish it "
                                "through the routing mesh (mode=ingress) instead")
            if not p.published:
                raise SpecError(where, "a port published in host mode needs its published "
                                "port (published=N): shoal does not pick one")
            if (p.published, p.protocol) in seen:
                raise SpecError(where, f"port {p.published}/{p.protocol} is published twice")
            seen.add((p.published, p.protocol))
        if self.mode == "dnsrr" and self.ports:
            raise SpecError("mode", "dnsrr has no VIP for the routing mesh to balance: "
                            "published ports need endpoint mode vip")
        keys = [e.key for e in self.expose]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise SpecError(f"expose[{keys.index(dup)}]", f"port {dup} is exposed twice")

    def vip_ports(self, image_ports: tuple[tuple[int, str], ...] = ()
                  ) -> tuple[tuple[int, str], ...]:
        """(port, protocol) the VIP serves: published targets, ``expose``, then the image's
        ExposedPorts; none in dnsrr mode."""
        if self.mode != "vip":
            return ()
        found = [(p.target, p.protocol) for p in self.ports]
        found += [(e.port, e.protocol) for e in self.expose]
        return tuple(dict.fromkeys(found + list(image_ports)))


class ServiceSpec(_Spec, frozen=True):
    """What the user asked for. Validated (``shoal.raft.validate.validate_spec``) before it is
    proposed and again inside the state machine."""

    name: Annotated[str, decl("service name: 1-63 letters, digits, '-' and '_' (unique "
                              "whatever the case)", flag="--name", cli="str",
                              pattern=SERVICE_NAME_RE.pattern)]
    labels: Annotated[dict[str, str], decl("service labels", flag="--label", short="-l",
                                           cli="map", metavar="KEY=VALUE")] = {}
    task: TaskSpec = TaskSpec()
    mode: ServiceMode = ServiceMode()
    update: UpdateConfig = UpdateConfig()
    rollback: RollbackConfig = RollbackConfig()
    endpoint: EndpointSpec = EndpointSpec()

    def __post_init__(self) -> None:
        res = self.task.resources
        if self.mode.autoscale.memory and not (res.limits.memory or res.reservations.memory):
            raise SpecError("mode.autoscale.memory", "a memory target is a fraction of the "
                            "tasks' memory: give --limit-memory or --reserve-memory")
        net = self.task.network_mode
        if net == "none" and (self.endpoint.ports or self.endpoint.expose):
            field = "endpoint.ports" if self.endpoint.ports else "endpoint.expose"
            raise SpecError(field, "tasks with network mode none have no address to serve "
                            "a port on")
        if net != "default" and self.endpoint.host_ports:
            raise SpecError("endpoint.host_ports", f"tasks with network mode {net} have no "
                            "address of their own to publish a port to in host mode"
                            + (": they listen on the node's ports themselves"
                               if net == "host" else ""))
        if net == "host":
            self._check_host_ports()
        elif self.endpoint.host_ports:
            self._one_per_node("ports published in host mode")
        c = self.task.container
        if not c.command and not c.image and not c.entrypoint:
            raise SpecError("task.container.command",
                            "is required (the program to run and its arguments) when the "
                            "service names no image")

    def _check_host_ports(self) -> None:
        """Tasks on the host's network bind the node's ports themselves: the routing mesh
        cannot listen on one of them, and a new task cannot start beside the old one."""
        targets = {(p.target, p.protocol) for p in self.endpoint.ports}
        for i, p in enumerate(self.endpoint.ports):
            if (p.published, p.protocol) in targets:
                raise SpecError(f"endpoint.ports[{i}].published",
                                f"a task on the host's network listens on the node's port "
                                f"{p.published} itself, where the routing mesh would listen "
                                f"too: publish its target on another port or not at all")
        for field, order in (("update.order", self.update.order),
                             ("rollback.order", self.rollback.order)):
            if order == "start-first":
                raise SpecError(field, "tasks on the host's network share the node's ports: "
                                "a new task could not bind them while the old one runs "
                                "(use stop-first)")
        if self.endpoint.ports or self.endpoint.expose:
            self._one_per_node("tasks on the host's network that serve ports")

    def _one_per_node(self, what: str) -> None:
        """Two tasks on one node could not both hold the node ports the service serves: a
        replicated service is stored with ``max_replicas`` 1 (Swarm's scheduler counts a
        host-published port as a node resource likewise)."""
        if self.mode.type.startswith("global"):
            return
        place = self.task.placement
        if place.max_replicas > 1:
            raise SpecError("task.placement.max_replicas", f"{what} would collide on a node: "
                            "at most 1 task per node")
        if place.max_replicas == 0:
            msgspec.structs.force_setattr(self, "task", msgspec.structs.replace(
                self.task, placement=msgspec.structs.replace(place, max_replicas=1)))

    def vip_ports(self, image_ports: tuple[tuple[int, str], ...] = ()
                  ) -> tuple[tuple[int, str], ...]:
        """(port, protocol) the service's VIP serves (``EndpointSpec.vip_ports``); none for
        tasks not on the cluster network (as Swarm: a VIP listener on every node would hold
        the very port a task on the host's network listens on; their name resolves to their
        nodes' addresses instead)."""
        if self.task.network_mode != "default":
            return ()
        return self.endpoint.vip_ports(image_ports)

    @property
    def replicas(self) -> int:
        return self.mode.replicas


# --------------------------------------------------------------------------- constraints

class Constraint(msgspec.Struct, frozen=True):
    """One parsed placement constraint: ``node.<attribute> == | != value``.

    ``key`` is lower-case (``node.id``, ``node.hostname``, ``node.role``, ``node.ip``,
    ``node.platform.os``, ``node.platform.arch``) or ``node.labels.<NAME>`` with NAME as the
    user wrote it (label names are case-sensitive). Values are compared case-insensitively,
    as Swarm does."""

    key: str
    op: str  # "==" | "!="
    value: str

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value}"


def parse_constraint(expr: Any, field: str = "constraint") -> Constraint:
    """``"node.labels.zone == b"`` → Constraint, or SpecError naming ``field``.

    Swarm's syntax: ``KEY==VALUE`` or ``KEY!=VALUE`` (spaces around the operator allowed),
    KEY one of node.id, node.hostname, node.role (manager|worker), node.ip (an address or a
    CIDR), node.platform.os, node.platform.arch (``uname -m``: x86_64, aarch64; a cluster
    below schema 11 refuses it, shoal.raft.schema), node.labels.NAME. Keys other than the
    label name are case-insensitive. engine.labels is refused: shoal has no engine labels,
    and a constraint that can never match must not pass silently."""
    if not isinstance(expr, str) or not expr.strip():
        raise SpecError(field, "a constraint must be a non-empty string such as "
                        "node.labels.zone==b")
    if len(expr) > MAX_CONSTRAINT_LEN:
        raise SpecError(field, f"constraint is longer than {MAX_CONSTRAINT_LEN} characters")
    found = [(i, op) for op in ("==", "!=") if (i := expr.find(op)) >= 0]
    if not found:
        raise SpecError(field, f"{expr!r} has no operator: use KEY==VALUE or KEY!=VALUE "
                        "(e.g. node.labels.zone==b)")
    at, op = min(found)
    key, value = expr[:at].strip(), expr[at + 2:].strip()
    if not key or not CONSTRAINT_KEY_RE.match(key):
        raise SpecError(field, f"{expr!r}: invalid key {key!r}")
    lowered = key.lower()
    if lowered.startswith(LABEL_PREFIX) and len(key) > len(LABEL_PREFIX):
        key = LABEL_PREFIX + key[len(LABEL_PREFIX):]
    elif lowered in CONSTRAINT_KEYS:
        key = lowered
    else:
        why = ""
        if lowered.rstrip(".") == "node.labels":
            why = " (name the label: node.labels.NAME)"
        elif lowered.startswith("engine.labels"):
            why = " (shoal has no engine labels: use node labels, `shoal node update " \
                  "--label-add`)"
        raise SpecError(field, f"{expr!r}: unsupported key {key!r}{why}: use "
                        f"{', '.join(CONSTRAINT_KEYS)} or node.labels.NAME")
    if not value or not CONSTRAINT_VALUE_RE.match(value):
        raise SpecError(field, f"{expr!r}: invalid value {value!r} (letters, digits and "
                        ": _ . - / are allowed; no '=' or '!')")
    if key == "node.role":
        value = value.lower()
        if value not in ("manager", "worker"):
            raise SpecError(field, f"{expr!r}: node.role is manager or worker")
    if key == "node.ip":
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise SpecError(field, f"{expr!r}: node.ip takes an address or a CIDR "
                            "(e.g. 10.0.0.0/24)") from None
    return Constraint(key=key, op=op, value=value)


# --------------------------------------------------------------------------- declarations

class FieldDecl(msgspec.Struct, frozen=True):
    """A leaf field of ServiceSpec as the CLI and the docs see it."""

    path: str  # dotted path in the spec: "task.resources.limits.memory"
    type: Any  # the annotation without Annotated (int, tuple[Mount, ...], Literal[...])
    default: Any
    help: str
    flag: str  # "" = API only
    short: str
    cli: str
    item: str
    unit: str
    metavar: str
    choices: tuple[str, ...]  # for Literal types


def _unwrap(tp: Any) -> tuple[Any, msgspec.Meta | None]:
    import typing
    if typing.get_origin(tp) is Annotated:
        base, *metas = typing.get_args(tp)
        meta = next((m for m in metas if isinstance(m, msgspec.Meta)), None)
        return base, meta
    return tp, None


def fields(cls: type[msgspec.Struct] = ServiceSpec, prefix: str = "") -> Iterator[FieldDecl]:
    """Every leaf field of ``cls`` in declaration order (nested Structs are walked; a tuple of
    Structs such as ``mounts`` is one leaf)."""
    import typing
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in msgspec.structs.fields(cls):
        base, meta = _unwrap(hints[f.name])
        path = f"{prefix}{f.name}"
        if isinstance(base, type) and issubclass(base, msgspec.Struct) and not (
                meta is not None and (meta.extra or {}).get("cli") == "struct"):
            yield from fields(base, path + ".")
            continue
        extra = dict(meta.extra or {}) if meta is not None else {}
        choices: tuple[str, ...] = ()
        if typing.get_origin(base) is Literal:
            choices = tuple(str(a) for a in typing.get_args(base))
        default = f.default if f.default is not msgspec.NODEFAULT else (
            f.default_factory() if f.default_factory is not msgspec.NODEFAULT else None)
        yield FieldDecl(path=path, type=base, default=default,
                        help=(meta.description or "") if meta is not None else "",
                        flag=str(extra.get("flag", "")), short=str(extra.get("short", "")),
                        cli=str(extra.get("cli", "")), item=str(extra.get("item", "")),
                        unit=str(extra.get("unit", "")), metavar=str(extra.get("metavar", "")),
                        choices=choices)


def by_path() -> dict[str, FieldDecl]:
    return {f.path: f for f in fields()}


def flag_for(path: str) -> str:
    """The CLI flag of a field path from a validation error (``task.container.env`` →
    ``--env``); list indexes and sub-fields are ignored. "" when the field has no flag."""
    base = re.sub(r"\[\d+\].*$", "", path)
    decls = by_path()
    while base:
        d = decls.get(base)
        if d is not None:
            return d.flag
        base = base.rpartition(".")[0]
    return ""


def reference_markdown() -> str:
    """The spec reference table for docs/api.md, made from the declarations."""
    rows = ["| field | type | default | CLI flag | meaning |", "|---|---|---|---|---|"]
    for f in fields():
        if f.cli == "struct":  # one flag for the Struct: a row per key (--autoscale max=)
            rows.append(f"| `{f.path}` | object | | `{f.flag}` | {f.help} |")
            for sub in fields(f.type, f.path + "."):
                key = sub.path.rpartition(".")[2]
                unit = f" ({sub.unit})" if sub.unit else ""
                rows.append(f"| `{sub.path}` | {_type_name(sub.type)} | "
                            f"`{json.dumps(_plain(sub.default))}` | `{f.flag} {key}=` | "
                            f"{sub.help.replace('|', '/')}{unit} |")
            continue
        tname = _type_name(f.type)
        unit = f" ({f.unit})" if f.unit else ""
        default = "required" if f.default is None else \
            f"`{json.dumps(_plain(f.default))}`".replace("|", "\\|")
        flag = f"`{f.flag}`" if f.flag else (
            "`IMAGE CMD ARGS` or `-- CMD ARGS`" if f.cli == "command" else "")
        rows.append(f"| `{f.path}` | {tname} | {default} | {flag} | "
                    f"{f.help.replace('|', '/')}{unit} |")
    rows += ["", "Each item of `task.sidecars` and `task.init_containers` (API and spec file "
             "only; `limits`, `healthcheck` and `restart` take the same keys as the main "
             "container's `task.resources.limits`, `task.container.healthcheck` and "
             "`task.restart`):", "", *container_rows()]
    return "\n".join(rows) + "\n"


def _plain(value: Any) -> Any:
    if isinstance(value, msgspec.Struct):  # (a Struct given by one flag: --autoscale)
        return msgspec.to_builtins(value)
    return list(value) if isinstance(value, tuple) else value


def _type_name(tp: Any) -> str:
    import typing
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " \\| ".join(str(a) for a in typing.get_args(tp))
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        return f"list of {_type_name(inner)}"
    if origin is dict:
        return f"map of {_type_name(typing.get_args(tp)[1])}"
    if isinstance(tp, type):
        return {"str": "string", "int": "integer", "float": "number",
                "bool": "boolean"}.get(tp.__name__, tp.__name__)
    return str(tp)
