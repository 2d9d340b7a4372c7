"""Versions of the replicated data and the conversions between them.

Owns: the schema number (``SCHEMA``), how a version-1 record (shoal 0.1's flat ServiceSpec) maps
onto today's nested spec and back, the encoding of commands for a cluster that still runs
schema 1 somewhere, and the migration of a Raft dump file written by schema 1. Must not touch:
the network, Raft itself, clocks.

Schema history::

    1  shoal 0.1: ServiceSpec flat (≈30 fields), copied whole into each task (Task.spec);
       the Raft dump pickles the ClusterState with its dataclasses.
    2  ServiceSpec nested (shoal.raft.spec): Task.spec is the task template only; the
       dump holds the state as msgpack of plain values (``ReplicatedState``).
    3  pods and autoscaling: ``task.sidecars``, ``task.init_containers``, ``mode.autoscale``
       and the leader's ``autoscale`` op (``GATED``, ``GATED_OPS``).
    4  host and none networking: ``task.network_mode``.
    5  the leader's ``spawn`` op: a new task of its service's current template, named by the
       service's version instead of carrying the template (shoal.raft.models.spawn_ops).
    6  ``task.container.entrypoint`` and ``task.container.healthcheck.exec``; the leader's
       ``rollout_start`` op (a rollout's start stamped by a manager whose clock runs ahead is
       moved back to the leader's time); and a rule every replica must apply alike
       (``ROLLOUT_CLOCK``): an automatic rollback leaves no previous spec (Swarm).
    7  a container's security and kernel settings: ``task.container.read_only``,
       ``cap_add``, ``cap_drop``, ``group_add``, ``extra_hosts``, ``ulimits``, ``sysctls``;
       its DNS settings ``dns``, ``dns_search``, ``dns_options``; a service's DNS aliases
       on its networks, ``task.network_aliases``; placeholders in a host name
       (``GATED_VALUES``); a container's log settings ``log_driver``, ``log_options``;
       ports published in host mode, ``endpoint.host_ports``.
    8  a container's terminal and labels: ``task.container.tty``, ``stdin_open``,
       ``oom_score_adj``, ``labels``; the ``cluster_update`` command (the cluster's task
       history limit, ``ClusterInfo.task_history_limit``).
    9  a service name with upper-case letters (``GATED_VALUES``; Swarm's names, Compose's
       ``webApp``): names are unique, and found, whatever their case — which schema 8's
       replicas, comparing exactly, would not enforce. And the scale-down by balance
       (``SLOT_HOLES``): the leader removes the slots of the nodes with the most tasks of
       the service, marking their tasks desired REMOVE, so a service's slots may have holes
       (1, 2, 4); a schema-8 leader would refill the holes and drop the highest slots.
    10 generic resources (Swarm's ``--generic-resource``):
       ``task.resources.reservations.generic_resources``, and a node's
       ``generic_resources`` set by ``node update`` or at join (the ``node_update`` and
       ``node_add`` commands' field, ``GATED_NODE_FIELDS``: a schema-9 replica applies the
       command without it, so today's does too below schema 10, and a proposal is refused).
    11 values as Docker takes them, where schema 10's validation (on every replica) was
       narrower (``GATED_VALUES``): environment variable names without '=', NUL or white
       space (Elasticsearch's ``discovery.type``; schema 10 took only the shell's names),
       a stop grace period over an hour (up to 30 days), an extra host at Docker's
       ``host-gateway`` (the node fills in its address on the task network). And rules
       every replica must apply alike: an automatic rollback of an autoscaled service keeps
       the autoscaler's replica count, an ``autoscale`` op is clamped to the range in force
       when applied (``AUTOSCALED_ROLLBACK``); a scheduled job's run still going is never
       trimmed from its history by skipped runs (``RUNS_KEPT``).
       And secrets and configs at any path, owned by anyone (Docker's ``target``, ``uid``,
       ``gid``): an absolute ``target`` of ``task.container.secrets[i]`` and ``configs[i]``
       (schema 10 reads file names only) and the ``uid``/``gid`` keys (``GATED_ITEMS``).
       The meaning of what older schemas wrote does not change: a config's file name stays
       in /run/configs, an empty owner the task's user; from 11 the managers write Docker's
       defaults for new references explicitly (``shoal.raft.spec.docker_file_defaults``).
       And a node's platform and resources as Swarm's nodes describe them: ``Node.arch`` in the
       ``node_add`` command's node (``KEPT_NODE_FIELDS``: every agent sends it, a schema-10
       replica's decoder drops it, so today's drops it too below 11 — never refused), the
       ``node_describe`` command (``GATED_COMMANDS``: a node's agent refreshes its own
       record's arch, memory and CPUs when they differ), and the constraint
       ``node.platform.arch`` (``GATED_VALUES``: schema 10 refused the key).
    12 a container's seccomp profile, ``task.container.seccomp`` (Docker's --security-opt
       seccomp=unconfined|PATH). Every node of this release runs tasks under Docker's default
       profile whatever the schema; a schema-11 node would run an unconfined or custom one
       with no filter, or its own, so the field waits for the schema. And a scheduled job's
       ``replace`` policy (``GATED_VALUES``: schema 11's decoder knew forbid and allow) and
       ``mode.schedule.starting_deadline`` (Kubernetes' CronJob rules, decided by the
       leader: a schema-11 leader would start a run late, or beside the previous one).
    13 anonymous volumes (Docker's): a volume mount without a source (``GATED_VALUES``:
       schema 12's spec refused it; the node that runs the task makes the volume for it,
       fills it with the image's content and removes it with the task), and a volume
       mount's ``nocopy`` (``GATED_ITEMS``: a key schema 12's decoder does not know). An
       image's VOLUME paths get anonymous volumes too, node-local (no spec change, no gate).
       And a published port's ``host_ip`` (``GATED_ITEMS`` of ``endpoint.ports`` and
       ``endpoint.host_ports``: a key schema 12's decoder does not know; Compose's
       ``127.0.0.1:5432:5432``), which a schema-12 node would publish on every address.
       And a node names the image with each blob it fetches from a peer (``IMAGE_ACCESS``),
       so a peer serves a worker only the blobs of its own tasks' images: a schema-12 node
       names none, so the check waits for the schema (shoal.node.transfer).
    14 a host name with a domain (``GATED_VALUES``; Docker's ``--hostname mail.example.com``,
       Compose's ``hostname:``): schema 13's spec took one DNS label of at most 63 bytes;
       from 14 an RFC 1123 name of at most 64 bytes (the kernel's limit), and the task's
       /etc/hosts names the bare host name beside it, as Docker's.

Reading is always forgiving: records and commands of schema 1 are upgraded when they are
decoded (``upgrade_spec``/``upgrade_task_spec``, used by ``shoal.raft.validate`` and
``shoal.raft.models``), so a log written by 0.1 replays into today's model. Writing follows the
cluster: while ``ClusterInfo.schema`` is 1 (some node may still run 0.1), every command is
encoded in schema 1 (``encode_command``), so an old replica applies exactly what a new one
applies; a field that schema 1 cannot express is refused then, naming the field. The leader
raises the schema (the ``cluster_schema`` command) once every node of the cluster announces
schema 2 in its gossip metadata.

Fields added after schema 2 are gated one by one (``GATED``: path → the schema that reads
it), since a schema-2 node's strict decoder refuses a spec with a key it does not know:
while the cluster writes an older schema, a spec is written without them when it leaves
them at their defaults (commands: ``encode_command``; whole states: ``strip_state``), so an
older node reads exactly what it wrote itself, and a spec that uses one is refused naming
it (``gate_refusal``: on propose, and again by the state machine; so is an update of a
service that already uses one, made before this gate, until the schema is raised). Keys of
list items likewise (``GATED_ITEMS``: a secret's ``uid``, an absolute ``target``), named
with the item's index. In a
leader batch, an op the cluster cannot carry (a ``GATED_OPS`` op such as ``autoscale``, a
task create of a pod service made before this gate) is left out rather than the batch
refused; the state machine refuses a gated op as the older code does (an unknown op).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec

from shoal.raft.errors import ValidationError
from shoal.raft.spec import (
    ENV_KEY_RE,
    FILE_TARGETS,
    HOST_GATEWAY,
    OLD_MAX_GRACE,
    SIGNALS,
    ServiceSpec,
    fields,
)

SCHEMA = 14  # what this code writes once the whole cluster runs it
LEGACY = 1
NESTED = 2  # the first schema with the nested spec (shoal 0.2)
ROLLOUT_CLOCK = 6  # the state machine's rollback rule of schema 6 (history above)
PLACEHOLDERS = 7  # the schema whose nodes fill in Docker's placeholders (raft/templates.py)
SLOT_HOLES = 9  # the schema whose leaders scale down by balance (shoal.node.orchestrator)
GENERIC = 10  # the schema whose nodes and specs carry generic resources (shoal.raft.generic)
ENV_NAMES = 11  # the schema whose replicas take Docker's env names and longer grace periods
# rules every replica of schema 11 applies alike (history above): an automatic rollback of an
# autoscaled service keeps the autoscaler's replica count, an ``autoscale`` op is clamped to
# the range in force when it is applied; a scheduled job's history never drops a run that
# is still going
AUTOSCALED_ROLLBACK = RUNS_KEPT = 11
# (FILE_TARGETS = 11, from shoal.raft.spec: secrets and configs at absolute paths, uid, gid)
# the schema whose nodes report their platform (``node_describe``, ``node.platform.arch``):
# the same release as ENV_NAMES
PLATFORM = ENV_NAMES
SECCOMP = 12  # the schema whose specs carry a container's seccomp profile, and whose
# leaders take a scheduled job's replace policy and starting deadline
ANON_VOLUMES = 13  # the schema whose specs carry anonymous volumes (a volume mount without
# a source) and a volume mount's nocopy
PORT_HOST_IP = 13  # the schema whose specs carry a published port's host_ip (the address
# it listens on)
IMAGE_ACCESS = 13  # the schema whose nodes name the image with each blob they fetch from a
# peer, so a peer checks a worker's reads against its tasks (shoal.node.transfer)
HOSTNAME_DOMAIN = 14  # the schema whose specs carry a host name with a domain (or of 64
# bytes: schema 13 took one DNS label of at most 63)
OLD_HOSTNAME_RE = re.compile(r"^(?=.{1,63}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$")


def _beyond_shell_names(env: Any) -> bool:
    """Whether an ``env`` mapping has a name schema 10 refused (not the shell's rule)."""
    return isinstance(env, dict) and any(not ENV_KEY_RE.match(str(k)) for k in env)


def _uses_arch(constraints: Any) -> bool:
    """Whether a ``task.placement.constraints`` value uses ``node.platform.arch`` (schema
    10's parser refused the key)."""
    return isinstance(constraints, (list, tuple)) and any(
        isinstance(c, str) and re.split(r"[=!]=", c, maxsplit=1)[0].strip().lower()
        == "node.platform.arch" for c in constraints)


def _containers_beyond_shell_names(containers: Any) -> bool:
    return isinstance(containers, list) and any(
        isinstance(c, dict) and _beyond_shell_names(c.get("env")) for c in containers)


# spec fields (paths) written only once the cluster's schema reads them: path → schema
GATED: dict[str, int] = {"task.sidecars": 3, "task.init_containers": 3, "mode.autoscale": 3,
                         "task.network_mode": 4, "task.container.entrypoint": 6,
                         "task.container.healthcheck.exec": 6,
                         **{f"task.container.{name}": 7 for name in (
                             "read_only", "cap_add", "cap_drop", "group_add", "extra_hosts",
                             "ulimits", "sysctls", "dns", "dns_search", "dns_options",
                             "log_driver", "log_options")},
                         "task.network_aliases": 7, "endpoint.host_ports": 7,
                         **{f"task.container.{name}": 8 for name in (
                             "tty", "stdin_open", "oom_score_adj", "labels")},
                         "task.resources.reservations.generic_resources": GENERIC,
                         "task.container.seccomp": SECCOMP,
                         "mode.schedule.starting_deadline": SECCOMP}
# values an older schema's code refuses, in fields it has: (path, is the value one of them?,
# the schema that reads them); refused like a GATED field in use (placeholders in a host
# name: Docker's "{{.Node.Hostname}}", which schema 6's host name pattern does not take). A
# path may come more than once, each time for other values
GATED_VALUES: tuple[tuple[str, Callable[[Any], bool], int], ...] = (
    ("name", lambda v: isinstance(v, str) and v != v.lower(), 9),
    ("task.container.hostname", lambda v: isinstance(v, str) and "{{" in v, PLACEHOLDERS),
    ("task.container.hostname", lambda v: isinstance(v, str) and "{{" not in v and v != ""
     and not OLD_HOSTNAME_RE.match(v), HOSTNAME_DOMAIN),
    # (any signal: schema 6's stop_signal was one of 8 names)
    ("task.container.stop_signal", lambda v: isinstance(v, str) and v not in SIGNALS, 7),
    # (a volume's name likewise: data-{{.Task.Slot}})
    ("task.container.mounts", lambda v: isinstance(v, list) and any(
        isinstance(m, dict) and m.get("type") == "volume" and "{{" in str(m.get("source"))
        for m in v), PLACEHOLDERS),
    # (an anonymous volume: a volume mount without a source, which schema 12 refused)
    ("task.container.mounts", lambda v: isinstance(v, list) and any(
        isinstance(m, dict) and m.get("type") == "volume" and not m.get("source")
        for m in v), ANON_VOLUMES),
    ("task.container.env", _beyond_shell_names, ENV_NAMES),
    ("task.container.extra_hosts", lambda v: isinstance(v, list) and any(
        isinstance(line, str) and line.endswith(f":{HOST_GATEWAY}") for line in v),
     ENV_NAMES),
    ("task.container.stop_grace_period",
     lambda v: isinstance(v, (int, float)) and v > OLD_MAX_GRACE, ENV_NAMES),
    ("task.sidecars", _containers_beyond_shell_names, ENV_NAMES),
    ("task.init_containers", _containers_beyond_shell_names, ENV_NAMES),
    ("task.placement.constraints", _uses_arch, PLATFORM),
    ("mode.schedule.policy", lambda v: v == "replace", SECCOMP))
# keys of the items of a spec's lists that an older schema cannot read: list path →
# {key: (is it used?, the schema that reads it, whether an older node knows the key)}. A used
# one is refused naming the item's key (``task.container.configs[1].target``) like a GATED
# field; an unused key an older node does not know is left out of what it is sent
_FILE_KEYS: dict[str, tuple[Callable[[Any], bool], int, bool]] = {
    "target": (lambda v: isinstance(v, str) and v.startswith("/"), FILE_TARGETS, True),
    "uid": (lambda v: v not in (None, ""), FILE_TARGETS, False),
    "gid": (lambda v: v not in (None, ""), FILE_TARGETS, False)}
GATED_ITEMS: dict[str, dict[str, tuple[Callable[[Any], bool], int, bool]]] = {
    "task.container.secrets": _FILE_KEYS, "task.container.configs": _FILE_KEYS,
    # (Docker's volume-nocopy: a key schema 12's decoder does not know)
    "task.container.mounts": {"nocopy": (bool, ANON_VOLUMES, False)},
    # (a published port's address: a key schema 12's decoder does not know)
    "endpoint.ports": {"host_ip": (bool, PORT_HOST_IP, False)},
    "endpoint.host_ports": {"host_ip": (bool, PORT_HOST_IP, False)}}
# leader ops (shoal.raft.state's ``leader`` command) likewise: op → schema
GATED_OPS: dict[str, int] = {"autoscale": 3, "spawn": 5, "rollout_start": 6}
# fields of node records (the ``node_update`` and ``node_add`` commands' node fields) an
# older node's state machine drops without a word: field → the schema that keeps them. A
# command that sets one is refused naming it on propose (``encode_command``) while the
# cluster writes an older schema; the state machine then ignores it, as the older one does
GATED_NODE_FIELDS: dict[str, int] = {"generic_resources": GENERIC}
# fields of the ``node_add`` command's node that every agent sends and an older node's state
# machine drops without a word: field → the schema that keeps them. Never refused (a join
# must not fail for them): below that schema the state machine drops them too
KEPT_NODE_FIELDS: dict[str, int] = {"arch": PLATFORM}
# top-level commands an older node does not know: the schema from which they may be written
GATED_COMMANDS: dict[str, int] = {"task_statuses": 3, "cluster_update": 8,
                                  "node_describe": PLATFORM}

# schema-1 flat field → its path in today's ServiceSpec
V1_PATHS: dict[str, str] = {
    "name": "name",
    "labels": "labels",
    "replicas": "mode.replicas",
    "command": "task.container.command",
    "env": "task.container.env",
    "workdir": "task.container.workdir",
    "stop_grace_period": "task.container.stop_grace_period",
    "image": "task.container.image",
    "user": "task.container.user",
    "stop_signal": "task.container.stop_signal",
    "mounts": "task.container.mounts",
    "secrets": "task.container.secrets",
    "configs": "task.container.configs",
    "limit_memory": "task.resources.limits.memory",
    "limit_cpu": "task.resources.limits.cpu",
    "limit_pids": "task.resources.limits.pids",
    "reserve_memory": "task.resources.reservations.memory",
    "reserve_cpu": "task.resources.reservations.cpu",
    "restart_condition": "task.restart.condition",
    "restart_delay": "task.restart.delay",
    "restart_max_attempts": "task.restart.max_attempts",
    "restart_window": "task.restart.window",
    "constraints": "task.placement.constraints",
    "force_update": "task.force_update",
    "update_parallelism": "update.parallelism",
    "update_delay": "update.delay",
    "ports": "endpoint.ports",
    "lb_algorithm": "endpoint.lb_algorithm",
}
_NESTED_KEYS = {"task", "mode", "update", "rollback", "endpoint"}
_V1_ONLY = set(V1_PATHS) - {"name", "labels"}


def is_legacy_spec(d: Any) -> bool:
    """A schema-1 (flat) service spec dict?"""
    return isinstance(d, dict) and not (_NESTED_KEYS & d.keys()) and bool(_V1_ONLY & d.keys())


def is_legacy_task_spec(d: Any) -> bool:
    """A schema-1 task spec (a whole flat ServiceSpec) rather than a task template?"""
    return isinstance(d, dict) and "name" in d and not ({"container", "resources", "restart",
                                                         "placement"} & d.keys())


def upgrade_spec(flat: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 flat spec dict → today's nested dict (unknown keys kept at the top, so
    validation names them)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        path = V1_PATHS.get(key, key)
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def upgrade_task_spec(flat: dict[str, Any]) -> dict[str, Any]:
    """The task template held in a schema-1 task (which carried the whole flat spec)."""
    return dict(upgrade_spec(flat).get("task", {}))


def _get(d: dict[str, Any], path: str) -> Any:
    node: Any = d
    for p in path.split("."):
        node = node[p]
    return node


def downgrade_spec(nested: dict[str, Any]) -> dict[str, Any]:
    """Today's spec (as plain values, complete) → a schema-1 flat dict. Raises ValidationError
    naming the field when the spec uses something schema 1 cannot express."""
    err = _items_refusal(nested, LEGACY)
    if err is not None:
        raise err
    nested = _strip_items(nested, LEGACY)
    flat = {key: _get(nested, path) for key, path in V1_PATHS.items()}
    expressible = set(V1_PATHS.values())
    for f in fields():
        if f.path not in expressible and _norm(_get(nested, f.path)) != _norm(f.default):
            raise ValidationError(
                f"{f.path} needs every node of the cluster on shoal >= 0.2 (cluster schema "
                f"{SCHEMA}); some node still runs schema {LEGACY}: upgrade it first", f.path)
    return flat


def _norm(value: Any) -> Any:
    if isinstance(value, msgspec.Struct):  # (a field given as one Struct: mode.autoscale)
        value = msgspec.to_builtins(value)
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value


def encode_command(cmd: dict[str, Any], service_specs: dict[str, Any],
                   writes: int = LEGACY) -> dict[str, Any]:
    """``cmd`` as a replica of a cluster at schema ``writes`` must see it. Schema 1: specs
    flat, a task's spec the whole flat service spec, as 0.1 stored it (``service_specs``:
    service id → its current spec as plain values, for tasks). A later schema below
    ``SCHEMA``: specs without the ``GATED`` fields it cannot read (ValidationError naming
    one that is used). A node command that sets a ``GATED_NODE_FIELDS`` field the cluster
    cannot carry yet: ValidationError naming it. Other commands are returned unchanged."""
    op = cmd.get("op")
    if op in ("node_add", "node_update"):  # (a node record's later fields: refused by name)
        fields = cmd.get("node") if op == "node_add" else cmd
        used = {k for k in GATED_NODE_FIELDS if isinstance(fields, dict) and fields.get(k)}
        err = node_refusal(used, writes)
        if err is not None:
            raise err
        return cmd
    if writes >= NESTED:
        return _gate_command(cmd, writes)
    if op in ("service_create", "service_update") and isinstance(cmd.get("spec"), dict):
        full = _complete(cmd["spec"])
        return cmd if full is None else {**cmd, "spec": downgrade_spec(full)}
    if op == "leader" and isinstance(cmd.get("ops"), list):
        ops = []
        for o in cmd["ops"]:
            if isinstance(o, (list, tuple)) and o and o[0] == "create":
                task = dict(o[1])
                svc = service_specs.get(task["service_id"])
                full = None if svc is None else _complete({**svc, "task": task["spec"]})
                if full is not None:
                    task["spec"] = downgrade_spec(full)
                o = ("create", task)
            ops.append(o)
        return {**cmd, "ops": ops}
    return cmd


def _complete(spec: dict[str, Any]) -> dict[str, Any] | None:
    """A spec dict with every field (defaults filled in), or None if it is not a valid spec
    (then every replica, old or new, refuses the command alike)."""
    if is_legacy_spec(spec):
        spec = upgrade_spec(spec)
    try:
        return _norm(msgspec.to_builtins(msgspec.convert(spec, ServiceSpec)))
    except msgspec.ValidationError:
        return None


# --------------------------------------------------------------------------- fields after 2

def _defaults() -> dict[str, Any]:
    decl = {f.path: f.default for f in fields()}
    return {path: _norm(decl[path]) for path in GATED}


_DEFAULTS: dict[str, Any] = {}


def gated_default(path: str) -> Any:
    """A ``GATED`` field's default as plain values."""
    if not _DEFAULTS:
        _DEFAULTS.update(_defaults())
    return _DEFAULTS[path]


def gate_refusal(spec: dict[str, Any], writes: int, prefix: str = "") -> ValidationError | None:
    """The error for a spec (plain values, complete; ``prefix`` "task.": a task template)
    that uses a field a cluster at schema ``writes`` cannot carry yet, or None."""
    for path, needs in GATED.items():
        if needs <= writes or not path.startswith(prefix):
            continue
        node: Any = spec
        for p in path[len(prefix):].split("."):
            node = node.get(p) if isinstance(node, dict) else None
        if node is not None and _norm(node) != gated_default(path):
            return _needs(path, needs, writes)
    for path, used, needs in GATED_VALUES:
        if needs <= writes or not path.startswith(prefix):
            continue
        node = spec
        for p in path[len(prefix):].split("."):
            node = node.get(p) if isinstance(node, dict) else None
        if used(node):
            return _needs(path, needs, writes)
    return _items_refusal(spec, writes, prefix)


def _items(spec: dict[str, Any], path: str, prefix: str) -> Any:
    node: Any = spec
    for p in path[len(prefix):].split("."):
        node = node.get(p) if isinstance(node, dict) else None
    return node


def _items_refusal(spec: dict[str, Any], writes: int, prefix: str = ""
                   ) -> ValidationError | None:
    """The error for a list item's key in use that schema ``writes`` cannot read
    (``GATED_ITEMS``), naming it (``task.container.configs[0].target``), or None."""
    for path, keys in GATED_ITEMS.items():
        if not path.startswith(prefix):
            continue
        items = _items(spec, path, prefix)
        for i, item in enumerate(items if isinstance(items, list) else ()):
            for key, (used, needs, _) in keys.items():
                if needs > writes and isinstance(item, dict) and used(item.get(key)):
                    return _needs(f"{path}[{i}].{key}", needs, writes)
    return None


def _strip_items(spec: dict[str, Any], writes: int, prefix: str = "") -> dict[str, Any]:
    """``spec`` without the ``GATED_ITEMS`` keys an older schema does not know (left unused:
    check ``_items_refusal`` first); copies only what leads to a removed key."""
    out = spec
    for path, keys in GATED_ITEMS.items():
        drop = {k for k, (_, needs, known) in keys.items() if needs > writes and not known}
        items = _items(out, path, prefix) if drop and path.startswith(prefix) else None
        if not isinstance(items, list) or not any(
                isinstance(x, dict) and drop & x.keys() for x in items):
            continue
        *parents, leaf = path[len(prefix):].split(".")
        out, node = _copied_to(out, parents)
        node[leaf] = [{k: v for k, v in x.items() if k not in drop}
                      if isinstance(x, dict) else x for x in items]
    return out


def _copied_to(spec: dict[str, Any], parents: list[str]) -> tuple[dict[str, Any], Any]:
    """A copy of ``spec`` whose dicts on the way down ``parents`` are copies too (the rest
    shared), and the innermost of them: what may then be changed in place."""
    out = dict(spec)
    node = out
    for p in parents:
        node[p] = dict(node[p])
        node = node[p]
    return out, node


def node_refusal(fields: Any, writes: int) -> ValidationError | None:
    """The error for a node record's ``fields`` (the names a command sets) that a cluster at
    schema ``writes`` cannot carry yet (``GATED_NODE_FIELDS``), or None."""
    for name, needs in GATED_NODE_FIELDS.items():
        if needs > writes and name in fields:
            return _needs(name, needs, writes)
    return None


def _needs(path: str, needs: int, writes: int) -> ValidationError:
    return ValidationError(
        f"{path} needs every node of the cluster on a shoal that reads data schema "
        f"{needs}; the cluster still writes schema {writes} (some node runs an older "
        f"shoal): upgrade every node first", path)


def strip_gated(spec: dict[str, Any], writes: int, prefix: str = "") -> dict[str, Any]:
    """``spec`` (plain values) without the ``GATED`` fields (and ``GATED_ITEMS`` keys)
    schema ``writes`` cannot read (which it leaves at their defaults: check
    ``gate_refusal`` first); copies only the dicts on the way to a removed key."""
    out = spec
    for path, needs in GATED.items():
        if needs <= writes or not path.startswith(prefix):
            continue
        *parents, leaf = path[len(prefix):].split(".")
        node: Any = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        out, node = _copied_to(out, parents)
        del node[leaf]
    return _strip_items(out, writes, prefix)


def _placeholders_refusal(spec: dict[str, Any], writes: int) -> ValidationError | None:
    """On propose only (older replicas take any text there, so the state machine must too):
    placeholders in env values and mounts, which a node of an older shoal would not fill
    in, wait for the schema that reads them (``GATED_VALUES``' schema)."""
    if writes >= PLACEHOLDERS:
        return None
    task = spec.get("task", {})
    c = task.get("container", {})
    texts = [(f"task.container.env.{k}", v) for k, v in (c.get("env") or {}).items()] + \
        [(f"task.container.mounts[{i}]", f"{m.get('source')} {m.get('target')}")
         for i, m in enumerate(c.get("mounts") or []) if isinstance(m, dict)] + \
        [(f"task.{kind}[{i}].env.{k}", v) for kind in ("sidecars", "init_containers")
         for i, x in enumerate(task.get(kind) or []) if isinstance(x, dict)
         for k, v in (x.get("env") or {}).items()]
    for path, text in texts:
        if isinstance(text, str) and "{{" in text:
            return _needs(path, PLACEHOLDERS, writes)
    return None


def _gate_command(cmd: dict[str, Any], writes: int) -> dict[str, Any]:
    if writes >= SCHEMA:
        return cmd
    op = cmd.get("op")
    if op in ("service_create", "service_update") and isinstance(cmd.get("spec"), dict):
        full = _complete(cmd["spec"])
        if full is None:
            return cmd  # (every replica refuses it alike)
        err = gate_refusal(full, writes) or _placeholders_refusal(full, writes)
        if err is not None:
            raise err
        return {**cmd, "spec": strip_gated(cmd["spec"], writes)}
    if op == "leader" and isinstance(cmd.get("ops"), list):
        # an op the cluster cannot carry yet is left out, not the whole batch refused: the
        # leader's other work goes on (it decides that op again in its next pass)
        done: dict[int, Any] = {}  # (creates of one pass share their template; None: left out)
        ops = []
        for o in cmd["ops"]:
            if isinstance(o, (list, tuple)) and o and o[0] in GATED_OPS and \
                    GATED_OPS[o[0]] > writes:
                continue
            if isinstance(o, (list, tuple)) and len(o) > 1 and o[0] == "create" and \
                    isinstance(o[1], dict) and isinstance(o[1].get("spec"), dict):
                raw = o[1]["spec"]
                if id(raw) not in done:  # (a pod service made before this gate existed)
                    done[id(raw)] = None if gate_refusal(raw, writes, "task.") else \
                        strip_gated(raw, writes, "task.")
                if done[id(raw)] is None:
                    continue
                o = ("create", {**o[1], "spec": done[id(raw)]})
            ops.append(o)
        return {**cmd, "ops": ops}
    return cmd


def strip_state(raw: dict[str, Any], writes: int) -> dict[str, Any]:
    """A whole state as plain values (``to_dict``) as a cluster at schema ``writes`` (>= 2)
    writes it: its specs without the ``GATED`` fields left at their defaults (one in use
    stays: it was written before this gate existed, and only its readers can read it), its
    node records without the fields that schema lacks (``KEPT_NODE_FIELDS``,
    ``GATED_NODE_FIELDS``: below their schema the state machine leaves them empty), so the
    bytes are the older release's own (a mixed cluster's state digests agree)."""
    later = [k for k, s in (*KEPT_NODE_FIELDS.items(), *GATED_NODE_FIELDS.items())
             if s > writes]

    def keep_used(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        if gate_refusal(spec, writes, prefix) is not None:
            return spec
        return strip_gated(spec, writes, prefix)

    for svc in raw.get("services", {}).values():
        svc["spec"] = keep_used(svc["spec"])
        if svc.get("previous_spec"):
            svc["previous_spec"] = keep_used(svc["previous_spec"])
    for task in raw.get("tasks", {}).values():
        task["spec"] = keep_used(task["spec"], "task.")
    for node in raw.get("nodes", {}).values():
        for key in later:
            if not node.get(key):
                node.pop(key, None)
    return raw
