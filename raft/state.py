"""The cluster state machine: applies commands to nodes, services and tasks.

Owns: the in-memory cluster state and the *only* code that mutates it (``apply``).
It is pure and deterministic: no I/O, no clock (timestamps come inside commands), no
randomness (ids come inside commands). Every replica applies the same log to the same
state. Must not touch: pysyncobj (see shoal.raft.store), the network, the runtime.

The op dispatch (``_HANDLERS``: op name → handler) and the handlers of nodes, services,
networks, volumes, leader batches and task status live here; cohesive groups live beside it
and are dispatched from here: shoal.raft.secops (CA, autolock, managers' key, client
certificates, users, secrets, configs), shoal.raft.mqttsetting (``mqtt_set``/``mqtt_unset``)
and shoal.raft.servicecheck (a service spec's checks against the rest of the state, port
assignment, task network addresses, job runs). A new op: a handler (here or in such a module)
and one ``_HANDLERS`` entry.

A command is a dict ``{"op": NAME, ...}``. ``apply`` never raises: a refused command
returns ``{"error": {"code", "message", "field"}}`` (pysyncobj wedges a replica whose
replicated method raises), a good one ``{"ok": True, ...}``.

Who may write what (swarmkit's split):

* users (via any manager's API): cluster_init, node_add/update/remove, service_*,
  network_create/remove (allocation rules: shoal.raft.networks; a task's addresses on its
  networks are allocated when the leader's batch assigns it)
* the leader's controllers: ``leader`` batches of task_create / task_desired /
  task_assign / task_delete / node_state / job_run (a scheduled job's run), fenced by
  Raft term: a batch whose term is
  lower than the highest term already seen is refused, so a deposed leader that still
  believes it leads cannot overwrite its successor's decisions.
* agents: task_status (one report) and task_statuses (many of one node) for tasks assigned
  to their own node, merged forward only; node_describe for their own node's record.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec

from shoal.raft import generic, ipam, raftkeys, secops, templates
from shoal.raft import networks as netalloc
from shoal.raft import schema as schema_mod
from shoal.raft.errors import IpamError, Rejected, ValidationError
from shoal.raft.models import (
    AUTOSCALE_HISTORY,
    AutoscaleDecision,
    AutoscaleStatus,
    Config,
    Network,
    Node,
    NodeAvailability,
    NodeRole,
    NodeState,
    Secret,
    Service,
    Task,
    TaskSpec,
    TaskState,
    UpdateStatus,
    User,
    Volume,
    evolve,
    node_from_dict,
    status_from_dict,
    task_from_dict,
    task_spec_from_dict,
    template_task,
    to_dict,
)
from shoal.raft.mqttsetting import MqttSetting, mqtt_set, mqtt_unset
from shoal.raft.servicecheck import (
    assign_ports,
    check_spec,
    job_op,
    net_addresses,
    refuse_manual_scale,
)
from shoal.raft.spec import NAME_RE, ServiceSpec
from shoal.raft.validate import (
    ID_RE,
    valid_arch,
    validate_description,
    validate_replicas,
    validate_spec,
)
from shoal.runtime import volumes as volumes_mod

# Bound on tasks created/changed by one leader batch; keeps log entries small. The state
# machine refuses a longer batch; the leader splits a pass's ops into batches of at most this
# many (shoal.node.leader.batches).
MAX_BATCH_OPS = 5000
# Bound on the msgpack size of one leader batch, bytes (the leader splits by it; a create op
# carries the task's whole template, ~0.5-2 KiB): every replica receives and applies the
# entry in one piece on its Raft tick thread, which sends and reads no heartbeat meanwhile —
# 1 MiB is ~1,000 tasks, ~70 ms to decode and apply on an idle core, well inside the 0.35 s
# election timeout; several committed together are applied one per tick
# (shoal.raft.store.APPLY_SLICE). Larger = fewer entries per pass (the leader proposes them
# one after another: 256 KiB made a 1,000-task scale four commits, and under issue 16's
# loaded lab its assignment took 26 s instead of 1-4 s); smaller = shorter stalls.
MAX_BATCH_BYTES = 1 << 20


def service_named(services: Mapping[str, Service], name: str) -> Service | None:
    """The service of that name, whatever its case: names are unique so (Swarm's rule; DNS
    names ignore case, and schema 9 allows upper case: shoal.raft.schema)."""
    key = name.lower()
    for s in services.values():
        if s.spec.name.lower() == key:
            return s
    return None


@dataclass
class ClusterInfo:
    cluster_id: str = ""
    created_at: float = 0.0
    # join-token secrets per role, sealed under the managers' key (shoal.node.sealing):
    # workers replicate this state too. Tokens are compared in constant time by the API.
    worker_secret: str = ""
    manager_secret: str = ""
    # digest embedded in tokens: SHA-256 of the CA certificate, which joining nodes pin
    digest: str = ""
    # task addresses: each node gets a /node_prefix of cluster_cidr; services get a
    # virtual IP from vip_cidr (shoal.raft.ipam)
    cluster_cidr: str = ipam.DEFAULT_CLUSTER_CIDR
    vip_cidr: str = ipam.DEFAULT_VIP_CIDR
    node_prefix: int = ipam.DEFAULT_NODE_PREFIX
    # the cluster CA: certificate (PEM, public) and private key (PEM sealed under the
    # managers' key: only managers can sign); set once by ``ca_init``
    ca_cert: str = ""
    ca_key: bytes = b""
    # client certificates (remote API) that are valid: name -> serial (hex) of the current
    # one; issuing again replaces it, ``ca revoke-client`` removes it. Replaced, never mutated.
    clients: dict[str, str] = field(default_factory=dict)
    # users of the API and the dashboard (shoal.node.users) by name, and the client
    # certificates issued for a user: certificate name -> user name. Replaced, never mutated.
    users: dict[str, User] = field(default_factory=dict)
    client_users: dict[str, str] = field(default_factory=dict)
    # the data schema every node can read (shoal.raft.schema): commands are written in it.
    # 1 for clusters made by shoal 0.1; raised by the leader's ``cluster_schema`` command
    # once every node announces a newer one.
    schema: int = schema_mod.LEGACY
    # user-defined networks (shoal.raft.networks): each gets a /network_prefix of this pool
    # unless it names its own subnet (`shoal init --default-addr-pool`)
    default_addr_pool: str = netalloc.DEFAULT_ADDR_POOL
    network_prefix: int = netalloc.DEFAULT_POOL_SIZE
    # the cluster-wide MQTT bridge setting (shoal.raft.mqttsetting; `shoal mqtt set`),
    # its secrets sealed under the managers' key; None = none set
    mqtt: MqttSetting | None = None
    # autolock (shoal.node.keys): the unlock key, sealed under the managers' key; "" = off.
    # Each manager re-wraps its own keys at rest whenever it changes (`unlock-key --rotate`).
    unlock_key: str = ""
    # CA rotation (`ca rotate`, shoal.node.keys): the new root (PEM), its key (sealed), the
    # new root cross-signed by the old one, its digest, the phase ("" = none; "trust": every
    # node adds the new root to its trust; "issue": managers sign with it and nodes renew)
    # and each node's progress (node id -> 1 trusts both roots, 2 holds a new-root cert).
    ca_next_cert: str = ""
    ca_next_key: bytes = b""
    ca_cross: str = ""
    ca_next_digest: str = ""
    ca_phase: str = ""
    ca_acks: dict[str, int] = field(default_factory=dict)
    # lifetime of node certificates, seconds (`ca rotate --cert-expiry`); 0 = each
    # manager's --cert-lifetime
    cert_expiry: float = 0.0
    # id (SHA-256 prefix, hex) of the managers' sealing key everything is sealed under now;
    # "" until the first `swarm rotate-key` (shoal.node.keys)
    key_id: str = ""
    # Raft secret rotation (shoal.raft.raftkeys): the id of the secret managers send with
    # ("" until the first rotation), the next one's, the phase ("" none, "accept",
    # "switch") and each manager's progress (node id -> 1 accepts, 2 sends with the new)
    raft_key_id: str = ""
    raft_next_key_id: str = ""
    raft_phase: str = ""
    raft_acks: dict[str, int] = field(default_factory=dict)
    # dead tasks kept per slot (`swarm update --task-history-limit`, Swarm's
    # TaskHistoryRetentionLimit); None = the leader's default (OrchestratorConfig.task_history)
    task_history_limit: int | None = None


@dataclass
class Snapshot:
    """An immutable-enough copy handed to readers (records are frozen dataclasses; readers
    do not change its dicts either: ``tasks_of`` keeps an index of ``tasks``)."""

    index: int
    cluster: ClusterInfo
    nodes: dict[str, Node]
    services: dict[str, Service]
    tasks: dict[str, Task]
    secrets: dict[str, Secret] = field(default_factory=dict)  # values sealed
    configs: dict[str, Config] = field(default_factory=dict)
    fence_term: int = 0  # highest Raft term seen on a leader batch (a new term = new leader)
    networks: dict[str, Network] = field(default_factory=dict)  # user-defined, by id
    volumes: dict[str, Volume] = field(default_factory=dict)  # `volume create`d, by name
    # service id → its tasks, built by the first ``tasks_of`` (a reader looking up every
    # service's tasks made one pass over all tasks per service: services x tasks); rebuilt
    # if ``tasks`` is another dict or changed size
    _by_service: tuple[int, int, dict[str, list[Task]]] | None = field(
        default=None, init=False, repr=False, compare=False)

    def network_by_name(self, name: str) -> Network | None:
        return next((n for n in self.networks.values() if n.name == name), None)

    def service_by_name(self, name: str) -> Service | None:
        return service_named(self.services, name)

    def tasks_of(self, service_id: str) -> list[Task]:
        """The service's tasks (a new list each call), in ``tasks`` order."""
        cached = self._by_service
        if cached is None or cached[0] != id(self.tasks) or cached[1] != len(self.tasks):
            index: dict[str, list[Task]] = {}
            for t in self.tasks.values():
                index.setdefault(t.service_id, []).append(t)
            cached = self._by_service = (id(self.tasks), len(self.tasks), index)
        return list(cached[2].get(service_id, ()))


@dataclass
class ClusterState:
    index: int = 0  # number of commands applied (successful or not)
    fence_term: int = 0  # highest Raft term seen on a leader batch
    cluster: ClusterInfo = field(default_factory=ClusterInfo)
    nodes: dict[str, Node] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    secrets: dict[str, Secret] = field(default_factory=dict)  # by id; values sealed
    configs: dict[str, Config] = field(default_factory=dict)  # by id
    networks: dict[str, Network] = field(default_factory=dict)  # user-defined, by id
    volumes: dict[str, Volume] = field(default_factory=dict)  # `volume create`d, by name

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> Snapshot:
        return Snapshot(
            index=self.index,
            cluster=dataclasses.replace(self.cluster),
            nodes=dict(self.nodes),
            services=dict(self.services),
            tasks=dict(self.tasks),
            secrets=dict(self.secrets),
            configs=dict(self.configs),
            fence_term=self.fence_term,
            networks=dict(self.networks),
            volumes=dict(self.volumes),
        )

    # ------------------------------------------------------------------ writing
    def apply(self, cmd: Any) -> dict[str, Any]:
        """Apply one command; never raises."""
        self.index += 1
        try:
            if not isinstance(cmd, dict):
                raise Rejected("invalid", "command must be a map")
            op = cmd.get("op")
            handler = _HANDLERS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise Rejected("invalid", f"unknown op {op!r}", "op")
            result = handler(self, cmd)
            return {"ok": True, **(result or {})}
        except Rejected as exc:
            return {"error": {"code": exc.code, "message": exc.message, "field": exc.field}}
        except ValidationError as exc:
            return {"error": {"code": exc.code, "message": exc.message, "field": exc.field}}
        except (LookupError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:
            return {"error": {"code": "invalid", "message": f"malformed command: {exc!r}",
                              "field": ""}}

    # --- reads
    def _read_barrier(self, cmd: dict[str, Any]) -> None:
        """A no-op: its commit proves a leader held a majority after the read began
        (shoal.raft.store.RaftStore.read_barrier). Changes nothing but the index."""

    # --- cluster
    def _cluster_init(self, cmd: dict[str, Any]) -> None:
        if self.cluster.cluster_id:
            raise Rejected("exists", "this node is already part of a cluster")
        self.cluster = ClusterInfo(
            cluster_id=str(cmd["cluster_id"]),
            created_at=float(cmd["now"]),
            worker_secret=str(cmd["worker_secret"]),
            manager_secret=str(cmd["manager_secret"]),
            digest=str(cmd["digest"]),
            schema=int(cmd.get("schema", schema_mod.LEGACY)),
            **self._networks(cmd),
        )

    def _cluster_schema(self, cmd: dict[str, Any]) -> dict[str, Any]:
        want = cmd["schema"]
        if isinstance(want, bool) or not isinstance(want, int) or want > schema_mod.SCHEMA:
            raise Rejected("invalid", f"schema must be a whole number <= {schema_mod.SCHEMA}",
                           "schema")
        if want <= self.cluster.schema:
            return {"changed": False, "schema": self.cluster.schema}
        self.cluster = replace(self.cluster, schema=want)
        return {"changed": True, "schema": want}

    @staticmethod
    def _networks(cmd: dict[str, Any]) -> dict[str, Any]:
        try:
            cluster = ipam.validate_cidr(str(cmd.get("cluster_cidr") or
                                             ipam.DEFAULT_CLUSTER_CIDR), "cluster_cidr", 8, 22)
            vip = ipam.validate_cidr(str(cmd.get("vip_cidr") or ipam.DEFAULT_VIP_CIDR),
                                     "vip_cidr", 8, 28)
        except IpamError as exc:
            raise Rejected("invalid", str(exc), "cluster_cidr") from None
        a, b = ipaddress.ip_network(cluster), ipaddress.ip_network(vip)
        if a.overlaps(b):
            raise Rejected("invalid", f"cluster_cidr {cluster} overlaps vip_cidr {vip}",
                           "cluster_cidr")
        out = {"cluster_cidr": cluster, "vip_cidr": vip}
        if cmd.get("default_addr_pool"):
            try:
                pool = ipam.validate_cidr(str(cmd["default_addr_pool"]), "default_addr_pool",
                                          8, netalloc.DEFAULT_POOL_SIZE)
            except IpamError as exc:
                raise Rejected("invalid", str(exc), "default_addr_pool") from None
            c = ipaddress.ip_network(pool)
            if c.overlaps(a) or c.overlaps(b):
                raise Rejected("invalid", f"default_addr_pool {pool} overlaps the cluster "
                               f"network {cluster} or the VIP range {vip}", "default_addr_pool")
            out["default_addr_pool"] = pool
        return out  # (networks never take a subnet overlapping cluster_cidr or vip_cidr)

    def _rotate_secret(self, cmd: dict[str, Any]) -> None:
        role = NodeRole(cmd["role"])
        if role is NodeRole.WORKER:
            self.cluster = replace(self.cluster, worker_secret=str(cmd["secret"]))
        else:
            self.cluster = replace(self.cluster, manager_secret=str(cmd["secret"]))

    # --- nodes
    def _node_add(self, cmd: dict[str, Any]) -> None:
        node = node_from_dict(cmd["node"])
        if self.cluster.schema < schema_mod.GENERIC:  # (as an older replica reads the node)
            node = replace(node, generic_resources={})
        elif cmd["node"].get("generic_resources"):
            node = replace(node, generic_resources=generic.check_node(
                cmd["node"]["generic_resources"], "node.generic_resources"))
        if self.cluster.schema < schema_mod.KEPT_NODE_FIELDS["arch"] or \
                not valid_arch(node.arch):
            # (as a schema-10 replica reads the node; a join is never refused for its arch:
            # one that is not a valid name is not kept, its agent's node_describe says why)
            node = replace(node, arch="")
        if not ID_RE.match(node.id):
            raise Rejected("invalid", f"node id {node.id!r} is invalid", "node.id")
        now = float(cmd["now"])
        for other in self.nodes.values():
            if (other.id != node.id and other.addr == node.addr
                    and other.api_port == node.api_port and other.state is not NodeState.DOWN):
                raise Rejected(
                    "exists", f"address {node.api_addr} is already used by node {other.id}",
                    "addr")
        old = self.nodes.get(node.id)
        created = old.created_at if old else now
        subnet = old.subnet if old and old.subnet else ""
        if not subnet:
            try:
                subnet = ipam.allocate_subnet(self.cluster.cluster_cidr, self.cluster.node_prefix,
                                              (n.subnet for n in self.nodes.values()))
            except IpamError as exc:
                raise Rejected("exhausted", str(exc), "subnet") from None
        self.nodes[node.id] = replace(node, created_at=created, updated_at=now,
                                      state=NodeState.READY, subnet=subnet)

    def _node_update(self, cmd: dict[str, Any]) -> None:
        node = self._node(cmd["id"])
        changes: dict[str, Any] = {}
        if "availability" in cmd:
            changes["availability"] = NodeAvailability(cmd["availability"])
        if "role" in cmd:
            changes["role"] = NodeRole(cmd["role"])
        if "labels" in cmd:
            changes["labels"] = dict(cmd["labels"])
        if "generic_resources" in cmd and self.cluster.schema >= schema_mod.GENERIC:
            # (the whole new set: shoal.raft.generic.updated; below schema 10 ignored, as an
            # older replica ignores it: shoal.raft.schema.GATED_NODE_FIELDS)
            changes["generic_resources"] = generic.check_node(cmd["generic_resources"])
        self.nodes[node.id] = replace(node, updated_at=float(cmd["now"]), **changes)

    def _node_describe(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """A node's description of itself (Swarm's Description: its agent sends it when the
        record differs, shoal.node.describe): arch, memory and CPUs replace the record's.
        Unknown to a schema-10 replica, so refused as it refuses it below schema 11."""
        if self.cluster.schema < schema_mod.GATED_COMMANDS["node_describe"]:
            raise Rejected("invalid", "unknown op 'node_describe'", "op")  # (as schema 10)
        node = self._node(cmd.get("id"))
        desc = validate_description(cmd)
        if all(getattr(node, k) == v for k, v in desc.items()):
            return {"changed": False}
        self.nodes[node.id] = replace(node, updated_at=float(cmd["now"]), **desc)
        return {"changed": True}

    def _node_remove(self, cmd: dict[str, Any]) -> None:
        node = self._node(cmd["id"])
        if node.state is NodeState.READY and not cmd.get("force"):
            raise Rejected("conflict", f"node {node.hostname} ({node.id}) is ready: "
                           "stop its agent or make it leave first, or use --force", "id")
        del self.nodes[node.id]
        # its tasks can never report again: make them eligible for replacement/removal
        for t in list(self.tasks.values()):
            if t.node_id == node.id and not t.status.state.terminal:
                self.tasks[t.id] = replace(
                    t, desired_state=max(t.desired_state, TaskState.SHUTDOWN),
                    status=replace(t.status, state=TaskState.ORPHANED,
                                   message="node removed", timestamp=float(cmd["now"])))

    def _node(self, node_id: Any) -> Node:
        if not isinstance(node_id, str):
            raise Rejected("invalid", "node id must be a string", "id")
        node = self.nodes.get(node_id)
        if node is None:
            raise Rejected("not_found", f"no such node: {node_id}", "id")
        return node

    # --- services
    def _gate(self, spec: ServiceSpec) -> None:
        """A field the cluster's schema cannot carry yet is refused, as an older replica
        refuses it (shoal.raft.schema.GATED)."""
        if self.cluster.schema < schema_mod.SCHEMA:
            err = schema_mod.gate_refusal(to_dict(spec), self.cluster.schema)
            if err is not None:
                raise err

    def _service_create(self, cmd: dict[str, Any]) -> dict[str, Any]:
        spec = validate_spec(cmd["spec"])
        self._gate(spec)
        sid = str(cmd["id"])
        if sid in self.services:
            raise Rejected("exists", f"service id {sid} already exists", "id")
        if (same := service_named(self.services, spec.name)) is not None:
            raise Rejected("exists", f"a service named {same.spec.name!r} already exists",
                           "name")
        spec = assign_ports(self, spec, sid, None)
        check_spec(self, spec, sid)
        try:
            vip = ipam.allocate_address(self.cluster.vip_cidr,
                                        (s.vip for s in self.services.values()))
        except IpamError as exc:
            raise Rejected("exhausted", str(exc), "vip") from None
        now = float(cmd["now"])
        self.services[sid] = Service(id=sid, spec=spec, version=1, created_at=now, updated_at=now,
                                     vip=vip)
        return {"id": sid, "vip": vip}

    # --- networks
    def _network_create(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.cluster.schema < schema_mod.NESTED:
            raise Rejected("invalid", "networks need every node of the cluster on shoal "
                           ">= 0.2 (cluster schema 2)", "name")
        nid = str(cmd["id"])
        if not ID_RE.match(nid) or nid in self.networks:
            raise Rejected("invalid", f"bad or duplicate network id {nid!r}", "id")
        try:
            name = netalloc.validate_name(cmd["name"])
        except IpamError as exc:
            raise Rejected("invalid", str(exc), "name") from None
        if any(n.name == name for n in self.networks.values()):
            raise Rejected("exists", f"a network named {name!r} already exists", "name")
        driver = cmd.get("driver") or "overlay"
        if driver not in netalloc.DRIVERS:
            raise Rejected("invalid", f"driver {driver!r} is not supported (use "
                           f"{', '.join(netalloc.DRIVERS)})", "driver")
        labels = cmd.get("labels") or {}
        if not isinstance(labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise Rejected("invalid", "labels must be a map of strings", "labels")
        c = self.cluster
        try:
            subnet = netalloc.pick_subnet(
                c.default_addr_pool, c.network_prefix,
                (n.subnet for n in self.networks.values()), str(cmd.get("subnet") or ""),
                avoid=(c.cluster_cidr, c.vip_cidr))
        except IpamError as exc:
            raise Rejected("invalid" if cmd.get("subnet") else "exhausted", str(exc),
                           "subnet") from None
        try:
            gateway = netalloc.pick_gateway(subnet, str(cmd.get("gateway") or ""))
        except IpamError as exc:
            raise Rejected("invalid", str(exc), "gateway") from None
        vni = netalloc.pick_vni(n.vni for n in self.networks.values())
        self.networks[nid] = Network(
            id=nid, name=name, driver=str(driver), subnet=subnet, gateway=gateway, vni=vni,
            internal=bool(cmd.get("internal")), attachable=bool(cmd.get("attachable")),
            labels=dict(labels), created_at=float(cmd["now"]))
        return {"id": nid, "subnet": subnet, "vni": vni}

    def _network_remove(self, cmd: dict[str, Any]) -> None:
        nid = cmd["id"]
        net = self.networks.get(nid) if isinstance(nid, str) else None
        if net is None:
            raise Rejected("not_found", f"no such network: {nid}", "id")
        users = sorted(s.spec.name for s in self.services.values()
                       if net.name in s.spec.task.networks)
        users += sorted({t.service_name for t in self.tasks.values()
                         if net.name in t.net_addrs and not t.status.state.terminal}
                        - set(users))
        if users:
            raise Rejected("in_use", f"network {net.name} is in use by service(s) "
                           f"{', '.join(users)}: remove it from them first", "name")
        del self.networks[net.id]

    # --- volumes (shoal.runtime.volumes checks the driver and options)
    def _volume_create(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name, driver = cmd.get("name"), cmd.get("driver") or "local"
        opts, labels = cmd.get("options") or {}, cmd.get("labels") or {}
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise Rejected("invalid", "a volume name is lower-case letters, digits, '-', '_'",
                           "name")
        if name in self.volumes:
            raise Rejected("exists", f"a volume named {name!r} already exists", "name")
        for what, m in (("options", opts), ("labels", labels)):
            if not isinstance(m, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
                raise Rejected("invalid", f"{what} must be a map of strings", what)
        try:
            volumes_mod.check(str(driver), opts)
        except volumes_mod.VolumeOptionError as exc:
            raise Rejected("invalid", str(exc), exc.field) from None
        self.volumes[name] = Volume(id=str(cmd["id"]), name=name, driver=str(driver),
                                    options=dict(opts), labels=dict(labels),
                                    created_at=float(cmd["now"]))
        return {"id": str(cmd["id"]), "name": name}

    def _volume_remove(self, cmd: dict[str, Any]) -> None:
        vol = self.volumes.get(cmd.get("name"))  # type: ignore[arg-type]
        if vol is None:
            raise Rejected("not_found", f"no such volume: {cmd.get('name')}", "name")
        users = sorted({s.spec.name for s in self.services.values()
                        if any(m.type == "volume" and templates.could_be(m.source, vol.name)
                               for m in s.spec.task.container.mounts)}
                       | {t.service_name for t in self.tasks.values()
                          if not t.status.state.terminal and any(
                              m.type == "volume" and templates.could_be(m.source, vol.name)
                              for m in t.spec.container.mounts)})
        if users:
            raise Rejected("in_use", f"volume {vol.name} is in use by service(s) "
                           f"{', '.join(users)}", "name")
        del self.volumes[vol.name]

    def _service_update(self, cmd: dict[str, Any]) -> dict[str, Any]:
        svc = self._service(cmd["id"])
        expected = cmd.get("version")
        if expected is not None and expected != svc.version:
            raise Rejected("conflict", f"service {svc.spec.name} was changed meanwhile "
                           f"(version {svc.version}, expected {expected}); retry", "version")
        if "spec" in cmd:
            spec = validate_spec(cmd["spec"])
            self._gate(spec)
            if spec.name != svc.spec.name:
                raise Rejected("invalid", "a service cannot be renamed", "name")
            spec = assign_ports(self, spec, svc.id, svc.spec)
            check_spec(self, spec, svc.id)
            if svc.spec.mode.autoscale.enabled and spec.mode.autoscale.enabled and \
                    spec.mode.replicas != svc.spec.mode.replicas:
                refuse_manual_scale(svc)
        else:
            replicas = validate_replicas(cmd["replicas"])
            if svc.spec.mode.autoscale.enabled and replicas != svc.spec.mode.replicas:
                refuse_manual_scale(svc)
            spec = msgspec.structs.replace(
                svc.spec, mode=msgspec.structs.replace(svc.spec.mode, replicas=replicas))
        now = float(cmd["now"])
        status = svc.update_status
        legacy = self.cluster.schema < schema_mod.NESTED  # (0.1 replicas apply it too)
        if spec.task != svc.spec.task or (status.paused and not legacy):
            # a new rollout (or rollback) starts; a paused one resumes with any update, as
            # in Swarm (its failures so far no longer count)
            state = "rollback_started" if cmd.get("rollback") else "updating"
            manual = "rollback started" if legacy else "manually requested rollback"
            # (stamped with the proposing manager's clock: the leader's ``rollout_start``
            # op moves a start its clock has not reached yet back to its own time)
            status = UpdateStatus(state=state, started_at=now,
                                  message=manual if cmd.get("rollback") else
                                  "update in progress")
        if spec == svc.spec:
            if status != svc.update_status:  # (only a resumed update: the spec stays)
                self.services[svc.id] = replace(svc, update_status=status, updated_at=now)
            return {"id": svc.id, "version": svc.version}
        self.services[svc.id] = replace(svc, spec=spec, version=svc.version + 1,
                                        previous_spec=svc.spec, updated_at=now,
                                        update_status=status)
        return {"id": svc.id, "version": svc.version + 1}

    def _service_remove(self, cmd: dict[str, Any]) -> None:
        svc = self._service(cmd["id"])
        del self.services[svc.id]
        now = float(cmd["now"])
        for t in list(self.tasks.values()):
            if t.service_id == svc.id:
                self.tasks[t.id] = replace(t, desired_state=TaskState.REMOVE, updated_at=now)

    def _service(self, sid: Any) -> Service:
        if not isinstance(sid, str):
            raise Rejected("invalid", "service id must be a string", "id")
        svc = self.services.get(sid)
        if svc is None:
            raise Rejected("not_found", f"no such service: {sid}", "id")
        return svc

    # --- leader batches (fenced)
    def _leader(self, cmd: dict[str, Any]) -> dict[str, Any]:
        term = int(cmd["term"])
        if term < self.fence_term:
            raise Rejected("stale_term", f"leader term {term} is older than {self.fence_term}",
                           "term")
        self.fence_term = term
        ops = cmd["ops"]
        if not isinstance(ops, list) or len(ops) > MAX_BATCH_OPS:
            raise Rejected("invalid", "ops must be a list of at most "
                           f"{MAX_BATCH_OPS} operations", "ops")
        now = float(cmd["now"])
        applied = 0
        t: Task | None
        # creates whose template is one shared dict (the leader's scratch state applies its
        # own ops unpacked) convert it once; after msgpack every create has its own
        templates: dict[int, TaskSpec] = {}
        net_used: dict[str, set[str]] = {}  # network name → addresses taken (filled lazily)
        for op in ops:
            kind = op[0]
            if kind == "create":
                raw = op[1]["spec"]
                spec = templates.get(id(raw))
                if spec is None:
                    spec = task_spec_from_dict(raw)
                    svc = self.services.get(op[1]["service_id"])
                    # the service's current template (the usual case) is shared, not copied
                    # per task: less memory, and the leader compares templates by identity
                    if svc is not None and spec == svc.spec.task:
                        spec = svc.spec.task
                    if isinstance(raw, dict):
                        templates[id(raw)] = spec
                t = task_from_dict({**op[1], "created_at": now, "updated_at": now}, spec)
                if t.id in self.tasks or t.service_id not in self.services:
                    continue
                self.tasks[t.id] = t
            elif kind == "spawn":  # (id, service_id, version, slot, node_id, pending, run)
                if self.cluster.schema < schema_mod.GATED_OPS["spawn"]:  # (as 0.4 does)
                    raise Rejected("invalid", "unknown leader op 'spawn'", "ops")
                svc = self.services.get(op[2])
                # a template is named by its service's version: if the service changed since
                # the leader planned this, the task is not made (its next pass makes it anew)
                if svc is None or svc.version != op[3] or op[1] in self.tasks:
                    continue
                t = template_task(svc, str(op[1]), int(op[4]), now, str(op[5]), str(op[6]),
                                  int(op[7]))
                self.tasks[t.id] = t
            elif kind == "desired":
                t = self.tasks.get(op[1])
                if t is None:
                    continue
                want = TaskState(op[2])
                if want > t.desired_state:  # desired state only moves forward too
                    self.tasks[t.id] = evolve(t, desired_state=want, updated_at=now)
            elif kind == "assign":
                t = self.tasks.get(op[1])
                if t is None or t.node_id or op[2] not in self.nodes:
                    continue
                self.tasks[t.id] = evolve(
                    t, node_id=op[2], sched_message="", updated_at=now,
                    status=evolve(t.status, state=TaskState.ASSIGNED, timestamp=now,
                                  message="scheduled"),
                    net_addrs=net_addresses(self, t, net_used) if t.spec.networks else {})
            elif kind == "unschedulable":
                t = self.tasks.get(op[1])
                if t is None or t.node_id:
                    continue
                self.tasks[t.id] = evolve(
                    t, sched_message=str(op[2]),
                    status=evolve(t.status, state=TaskState.PENDING, timestamp=now,
                                  message=str(op[2])))
            elif kind == "orphan":
                t = self.tasks.get(op[1])
                if t is None or t.status.state.terminal:
                    continue
                self.tasks[t.id] = evolve(
                    t, desired_state=max(t.desired_state, TaskState.SHUTDOWN), updated_at=now,
                    status=evolve(t.status, state=TaskState.ORPHANED, timestamp=now,
                                  message=str(op[2])))
            elif kind == "delete":
                self.tasks.pop(op[1], None)
            elif kind == "rollback":  # ("rollback", service_id, reason): failure action
                svc = self.services.get(op[1])
                if svc is None or svc.previous_spec is None or svc.update_status.state != \
                        "updating":
                    continue
                # (Swarm's automatic rollback leaves no previous spec: a later `service
                # rollback` must not bring back the version that just failed)
                previous = None if self.cluster.schema >= schema_mod.ROLLOUT_CLOCK else \
                    svc.spec
                back = svc.previous_spec
                if self.cluster.schema >= schema_mod.AUTOSCALED_ROLLBACK and \
                        back.mode.autoscale.enabled and svc.spec.mode.autoscale.enabled:
                    # (the replica count is the autoscaler's now, not the one back then)
                    back = msgspec.structs.replace(back, mode=msgspec.structs.replace(
                        back.mode, replicas=svc.spec.mode.replicas))
                self.services[svc.id] = replace(
                    svc, spec=back, previous_spec=previous,
                    version=svc.version + 1, updated_at=now,
                    update_status=UpdateStatus(state="rollback_started", message=str(op[2]),
                                               started_at=now))
            elif kind == "rollout_start":  # ("rollout_start", service_id, started_at seen)
                # a rollout's start stamped by a manager whose clock runs ahead of the
                # leader's: the rollout tells its new tasks by ``created_at >= started_at``
                # (the leader's clock), so until then it saw none (no failure, no rollback)
                if self.cluster.schema < schema_mod.GATED_OPS["rollout_start"]:
                    raise Rejected("invalid", "unknown leader op 'rollout_start'", "ops")
                svc = self.services.get(op[1])
                if svc is None or svc.update_status.started_at != op[2] or \
                        svc.update_status.started_at <= now:
                    continue  # (another update since, or nothing to move)
                self.services[svc.id] = replace(svc, update_status=replace(
                    svc.update_status, started_at=now))
            elif kind == "update_status":  # ("update_status", service_id, state, message)
                svc = self.services.get(op[1])
                if svc is None:
                    continue
                done = now if str(op[2]).endswith("completed") else 0.0
                self.services[svc.id] = replace(svc, update_status=replace(
                    svc.update_status, state=str(op[2]), message=str(op[3]),
                    completed_at=done))
            elif kind in ("job_run", "job_run_status"):
                svc = self.services.get(op[1])
                if svc is None:
                    continue
                self.services[svc.id] = replace(svc, job_status=job_op(
                    svc, op, now, keep_running=self.cluster.schema >= schema_mod.RUNS_KEPT))
            elif kind == "autoscale":  # ("autoscale", service_id, replicas, decision)
                if self.cluster.schema < schema_mod.GATED_OPS["autoscale"]:  # (as 0.2 does)
                    raise Rejected("invalid", "unknown leader op 'autoscale'", "ops")
                svc = self.services.get(op[1])
                if svc is None or not svc.spec.mode.autoscale.enabled:
                    continue
                decision = AutoscaleDecision(**{**op[3], "at": now})
                replicas = validate_replicas(op[2])
                if self.cluster.schema >= schema_mod.AUTOSCALED_ROLLBACK:
                    # (planned before the range changed: the range in force wins)
                    auto = svc.spec.mode.autoscale
                    replicas = min(max(replicas, auto.min), auto.max)
                scaled = msgspec.structs.replace(svc.spec, mode=msgspec.structs.replace(
                    svc.spec.mode, replicas=replicas))
                self.services[svc.id] = replace(
                    svc, spec=scaled, version=svc.version + 1, updated_at=now,
                    autoscale=AutoscaleStatus(decisions=(*svc.autoscale.decisions,
                                                         decision)[-AUTOSCALE_HISTORY:]))
            elif kind == "node_state":
                n = self.nodes.get(op[1])
                if n is None:
                    continue
                self.nodes[n.id] = replace(n, state=NodeState(op[2]), message=str(op[3]),
                                           updated_at=now)
            else:
                raise Rejected("invalid", f"unknown leader op {kind!r}", "ops")
            applied += 1
        return {"applied": applied}

    # --- agents
    def _task_status(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return {"changed": self._apply_status(cmd["task_id"], cmd["node_id"], cmd["status"],
                                              float(cmd["now"]))}

    def _task_statuses(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Many reports of one node in one entry (shoal.node.reports). Each is applied as a
        ``task_status`` would be; one that is refused (its task gone or moved) does not
        stop the others: it is named in ``refused``."""
        if self.cluster.schema < schema_mod.GATED_COMMANDS["task_statuses"]:
            raise Rejected("invalid", "unknown op 'task_statuses'", "op")  # (as 0.2 does)
        node, reports, now = cmd.get("node_id"), cmd.get("reports"), cmd.get("now")
        if not isinstance(node, str):
            raise Rejected("invalid", "node_id must be a node id", "node_id")
        if isinstance(now, bool) or not isinstance(now, (int, float)):
            raise Rejected("invalid", "now must be a time in seconds", "now")
        if not isinstance(reports, list) or not all(
                isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str)
                and isinstance(r[1], dict) for r in reports):
            raise Rejected("invalid", "reports must be a list of [task_id, status] pairs",
                           "reports")
        changed = 0
        refused: dict[str, str] = {}
        for task_id, status in reports:
            try:
                changed += self._apply_status(task_id, node, status, float(now))
            except Rejected as exc:
                refused[task_id] = exc.message
            except (LookupError, TypeError, ValueError, AttributeError) as exc:
                refused[task_id] = f"malformed status: {exc!r}"
        return {"changed": changed, "refused": refused}

    def _apply_status(self, task_id: str, node_id: str, raw: dict[str, Any], now: float
                      ) -> bool:
        t = self.tasks.get(task_id)
        if t is None:
            raise Rejected("not_found", f"no such task: {task_id}", "task_id")
        if t.node_id != node_id:
            raise Rejected("forbidden", f"task {t.id} is not assigned to node {node_id}",
                           "node_id")
        status = status_from_dict(raw)
        if not status.merges_over(t.status):
            # older observation: keep the greater (ordered states, then ordered health)
            return False
        # when it first came up (running, and healthy if checked): a rolling update's
        # monitor window counts from there
        up_at = t.up_at or (now if status.up else 0.0)
        self.tasks[t.id] = evolve(t, status=status, updated_at=now, up_at=up_at)
        return True

_HANDLERS: dict[str, Callable[[ClusterState, dict[str, Any]], dict[str, Any] | None]] = {
    "cluster_init": ClusterState._cluster_init,
    "rotate_secret": ClusterState._rotate_secret,
    "node_add": ClusterState._node_add,
    "node_update": ClusterState._node_update,
    "node_remove": ClusterState._node_remove,
    "node_describe": ClusterState._node_describe,
    "service_create": ClusterState._service_create,
    "service_update": ClusterState._service_update,
    "service_remove": ClusterState._service_remove,
    "leader": ClusterState._leader,
    "cluster_schema": ClusterState._cluster_schema,
    "read_barrier": ClusterState._read_barrier,
    "task_status": ClusterState._task_status,
    "task_statuses": ClusterState._task_statuses,
    "ca_init": secops.ca_init,
    "secret_create": secops.secret_create,
    "secret_remove": secops.secret_remove,
    "config_create": secops.config_create,
    "config_remove": secops.config_remove,
    "client_cert_add": secops.client_cert_add,
    "client_cert_remove": secops.client_cert_remove,
    "user_add": secops.user_add,
    "user_update": secops.user_update,
    "user_remove": secops.user_remove,
    "network_create": ClusterState._network_create,
    "network_remove": ClusterState._network_remove,
    "volume_create": ClusterState._volume_create,
    "volume_remove": ClusterState._volume_remove,
    "mqtt_set": mqtt_set,
    "mqtt_unset": mqtt_unset,
    "cluster_autolock": secops.cluster_autolock,
    "cluster_update": secops.cluster_update,
    "ca_rotate_start": secops.ca_rotate_start,
    "ca_rotate_ack": secops.ca_rotate_ack,
    "ca_rotate_phase": secops.ca_rotate_phase,
    "ca_rotate_finish": secops.ca_rotate_finish,
    "manager_key_rotate": secops.manager_key_rotate,
    **raftkeys.OPS,
}

__all__ = ["ClusterInfo", "ClusterState", "Snapshot"]
