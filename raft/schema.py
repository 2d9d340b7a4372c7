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

Reading is always forgiving: records and commands of schema 1 are upgraded when they are
decoded (``upgrade_spec``/``upgrade_task_spec``, used by ``shoal.raft.validate`` and
``shoal.raft.models``), so a log written by 0.1 replays into today's model. Writing follows the
cluster: while ``ClusterInfo.schema`` is 1 (some node may still run 0.1), every command is
encoded in schema 1 (``encode_command``), so an old replica applies exactly what a new one
applies; a field that schema 1 cannot express is refused then, naming the field. The leader
raises the schema (the ``cluster_schema`` command) once every node of the cluster announces
schema 2 in its gossip metadata.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
from pathlib import Path
from typing import Any

from shoal.raft.errors import ValidationError

SCHEMA = 2  # what this code writes once the whole cluster runs it
LEGACY = 1

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
    from shoal.raft.spec import fields
    flat = {key: _get(nested, path) for key, path in V1_PATHS.items()}
    expressible = set(V1_PATHS.values())
    for f in fields():
        if f.path not in expressible and _norm(_get(nested, f.path)) != _norm(f.default):
            raise ValidationError(
                f"{f.path} needs every node of the cluster on shoal >= 0.2 (cluster schema "
                f"{SCHEMA}); some node still runs schema {LEGACY}: upgrade it first", f.path)
    return flat


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value


def encode_command(cmd: dict[str, Any], service_specs: dict[str, Any]) -> dict[str, Any]:
    """``cmd`` as a schema-1 replica must see it (specs flat; a task's spec the whole flat
    service spec, as 0.1 stored it). ``service_specs``: service id → its current spec as
    plain values (for tasks). Commands without specs are returned unchanged."""
    op = cmd.get("op")
    if op in ("service_create", "service_update") and isinstance(cmd.get("spec"), dict):
        return {**cmd, "spec": downgrade_spec(cmd["spec"])}
    if op == "leader" and isinstance(cmd.get("ops"), list):
        ops = []
        for o in cmd["ops"]:
            if isinstance(o, (list, tuple)) and o and o[0] == "create":
                task = dict(o[1])
                svc = service_specs.get(task["service_id"])
                if svc is not None:
                    task["spec"] = downgrade_spec({**svc, "task": task["spec"]})
                o = ("create", task)
            ops.append(o)
        return {**cmd, "ops": ops}
    return cmd


# --------------------------------------------------------------------------- dump migration

class _LegacyRecord:
    """Stands in for a schema-1 spec class while a schema-1 dump is unpickled: keeps the
    record's fields as a dict."""

    def __init__(self, *args: Any) -> None:
        self.fields: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.fields = dict(state)


_LEGACY_CLASSES = {"ServiceSpec", "Mount", "PortSpec", "FileRef"}


class _LegacyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "shoal.raft.models" and name in _LEGACY_CLASSES:
            return _LegacyRecord
        return super().find_class(module, name)


def _plain(value: Any) -> Any:
    if isinstance(value, _LegacyRecord):
        return {k: _plain(v) for k, v in value.fields.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def migrate_dump(path: Path) -> bool:
    """Rewrite a pysyncobj dump whose state was pickled by schema 1 in today's format (the
    state as msgpack bytes, see ReplicatedState), before pysyncobj reads it. The original is
    kept as ``raft.dump.schema1``. Returns True if it migrated something. A dump that is not
    schema 1 (or unreadable: the store's persistence check deals with that) is left alone."""
    if not path.exists():
        return False
    try:
        with gzip.open(path, "rb") as f:
            dump = _LegacyUnpickler(f).load()
        consumers = dump[0]
        data = consumers[1]
        old = data["state"]
    except Exception:
        return False
    from shoal.raft.wire import state_to_bytes
    state = upgrade_state(old)
    consumers[1] = {"state_v2": state_to_bytes(state)}
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as g:
        pickle.dump(dump, g, protocol=2)
    backup = path.with_name(path.name + ".schema1")
    tmp = path.with_name(path.name + ".migrating")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    if not backup.exists():
        os.link(path, backup)
    os.replace(tmp, path)
    return True


def upgrade_state(old: Any) -> Any:
    """A ClusterState unpickled from a schema-1 dump (spec records as _LegacyRecord) → a
    ClusterState of today's model, through plain values."""
    import dataclasses

    from shoal.raft.models import to_dict
    from shoal.raft.wire import state_from_plain

    def plain(obj: Any) -> Any:
        if isinstance(obj, _LegacyRecord):
            return _plain(obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                    if hasattr(obj, f.name)}
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        return to_dict(obj)

    raw = plain(old)
    return state_from_plain(raw)
