"""The security and access commands of the state machine: the cluster CA and its rotation,
autolock, the managers' key rotation, client certificates, users, secrets and configs; and
`swarm update`'s other cluster settings (``cluster_update``).

Owns: those command handlers (``ca_init``, ``ca_rotate_*``, ``cluster_autolock``,
``cluster_update``, ``manager_key_rotate``, ``client_cert_*``, ``user_*``, ``secret_*``,
``config_*``) and ``MAX_FILE_BYTES``. Like every handler of shoal.raft.state it is pure and
deterministic (no I/O, no clock, no randomness: all of it comes inside the command) and raises
only ``Rejected``/``ValidationError``, which ``ClusterState.apply`` records. Values arrive sealed
under the managers' key (shoal.node.security, shoal.node.secrets): the state never sees a key.
Must not touch: the op dispatch (``shoal.raft.state._HANDLERS`` maps op names to these), the
rest of the state (nodes, tasks, networks…), sealing, pysyncobj, the network.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Protocol

from shoal.raft.errors import Rejected
from shoal.raft.models import USER_ROLES, Config, Node, Secret, Service, User
from shoal.raft.schema import GATED_COMMANDS
from shoal.raft.validate import ID_RE, validate_object_name

# Largest secret or config value (Docker's limit); sealing adds 29 bytes.
MAX_FILE_BYTES = 500 * 1024


class ClusterState(Protocol):
    """What these handlers touch of shoal.raft.state.ClusterState (not imported: it imports
    this module)."""

    cluster: Any  # shoal.raft.state.ClusterInfo
    nodes: dict[str, Node]
    services: dict[str, Service]
    secrets: dict[str, Secret]
    configs: dict[str, Config]


# --- security (shoal.node.security): values arrive sealed; the state never sees a key
def ca_init(state: ClusterState, cmd: dict[str, Any]) -> None:
    if state.cluster.ca_cert:
        raise Rejected("exists", "the cluster CA is already set", "ca_cert")
    ca_cert, ca_key = cmd["ca_cert"], cmd["ca_key"]
    if not isinstance(ca_cert, str) or not isinstance(ca_key, bytes):
        raise Rejected("invalid", "ca_cert must be PEM text and ca_key sealed bytes",
                       "ca_cert")
    state.cluster = replace(state.cluster, ca_cert=ca_cert, ca_key=ca_key)


def cluster_autolock(state: ClusterState, cmd: dict[str, Any]) -> None:
    key = cmd["unlock_key"]
    if not isinstance(key, str):
        raise Rejected("invalid", "unlock_key must be sealed text or empty", "unlock_key")
    state.cluster = replace(state.cluster, unlock_key=key)


MAX_TASK_HISTORY = 1000


def cluster_update(state: ClusterState, cmd: dict[str, Any]) -> None:
    """`swarm update`'s cluster settings: ``task_history_limit`` (None: the default)."""
    if state.cluster.schema < GATED_COMMANDS["cluster_update"]:
        raise Rejected("invalid", "unknown op 'cluster_update'", "op")  # (as schema 7 does)
    limit = cmd.get("task_history_limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or not 0 <= limit <= MAX_TASK_HISTORY):
        raise Rejected("invalid", f"task_history_limit must be a number from 0 to "
                       f"{MAX_TASK_HISTORY}", "task_history_limit")
    state.cluster = replace(state.cluster, task_history_limit=limit)


def ca_rotate_start(state: ClusterState, cmd: dict[str, Any]) -> None:
    cert, key, cross, digest = cmd["cert"], cmd["key"], cmd["cross"], cmd["digest"]
    expiry = cmd.get("cert_expiry", 0.0)
    if not (isinstance(cert, str) and isinstance(key, bytes) and isinstance(cross, str)
            and isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise Rejected("invalid", "a CA rotation needs cert, sealed key, cross and digest",
                       "cert")
    if isinstance(expiry, bool) or not isinstance(expiry, (int, float)) or expiry < 0:
        raise Rejected("invalid", "cert_expiry must be seconds >= 0", "cert_expiry")
    if not state.cluster.ca_cert:
        raise Rejected("invalid", "the cluster has no CA yet", "ca_cert")
    if state.cluster.ca_phase == "issue":  # certificates of the pending root are out
        raise Rejected("conflict", "a CA rotation is re-issuing certificates: wait for it "
                       "to finish (`shoal ca info`), then rotate again", "ca")
    state.cluster = replace(state.cluster, ca_next_cert=cert, ca_next_key=key,
                           ca_cross=cross, ca_next_digest=digest, ca_phase="trust",
                           ca_acks={}, cert_expiry=float(expiry) or
                           state.cluster.cert_expiry)


def manager_key_rotate(state: ClusterState, cmd: dict[str, Any]) -> None:
    """Everything sealed under the managers' key, re-sealed under a new one, in one entry.
    Refused if anything sealed changed since the proposer read it (retry)."""
    c = state.cluster
    if cmd["old_key_id"] != c.key_id:
        raise Rejected("conflict", "the managers' key changed meanwhile: retry", "key_id")
    secrets, key_id = cmd["secrets"], cmd["key_id"]
    if not isinstance(secrets, dict) or set(secrets) != set(state.secrets) or not all(
            isinstance(v, bytes) for v in secrets.values()):
        raise Rejected("conflict", "secrets changed meanwhile: retry", "secrets")
    if not isinstance(key_id, str) or not re.fullmatch(r"[0-9a-f]{16}", key_id):
        raise Rejected("invalid", "key_id must be 16 hex digits", "key_id")
    if (cmd["ca_next_key"] == b"") != (c.ca_next_key == b""):
        raise Rejected("conflict", "a CA rotation started meanwhile: retry", "ca")
    fields = {f: cmd[f] for f in ("ca_key", "ca_next_key", "worker_secret",
                                  "manager_secret", "unlock_key")}
    if not (isinstance(fields["ca_key"], bytes) and isinstance(fields["ca_next_key"], bytes)
            and all(isinstance(fields[f], str) for f in
                    ("worker_secret", "manager_secret", "unlock_key"))):
        raise Rejected("invalid", "re-sealed fields have the wrong types", "ca_key")
    if (fields["unlock_key"] == "") != (c.unlock_key == ""):
        raise Rejected("conflict", "autolock changed meanwhile: retry", "unlock_key")
    state.cluster = replace(c, key_id=key_id, **fields)
    for sid, data in secrets.items():
        state.secrets[sid] = replace(state.secrets[sid], data=data)


def ca_rotate_ack(state: ClusterState, cmd: dict[str, Any]) -> dict[str, Any]:
    node_id, stage, digest = cmd["node_id"], cmd["stage"], cmd["digest"]
    if digest != state.cluster.ca_next_digest or not state.cluster.ca_phase:
        return {"stale": True}  # an ack for a rotation that is over or replaced
    if node_id not in state.nodes or stage not in (1, 2):
        raise Rejected("invalid", "unknown node or stage", "node_id")
    if state.cluster.ca_acks.get(node_id, 0) < stage:
        state.cluster = replace(state.cluster,
                               ca_acks={**state.cluster.ca_acks, node_id: stage})
    return {"stale": False}


def ca_rotate_phase(state: ClusterState, cmd: dict[str, Any]) -> None:
    if cmd["digest"] != state.cluster.ca_next_digest or cmd["phase"] != "issue":
        raise Rejected("stale", "not the CA rotation in progress", "digest")
    state.cluster = replace(state.cluster, ca_phase="issue")


def ca_rotate_finish(state: ClusterState, cmd: dict[str, Any]) -> None:
    """The new root replaces the old one (key re-sealed for the CA slot); nodes then
    drop the old root from their trust."""
    c = state.cluster
    if cmd["digest"] != c.ca_next_digest or c.ca_phase != "issue":
        raise Rejected("stale", "not the CA rotation in progress", "digest")
    if not isinstance(cmd["ca_key"], bytes):
        raise Rejected("invalid", "ca_key must be sealed bytes", "ca_key")
    state.cluster = replace(c, ca_cert=c.ca_next_cert, ca_key=cmd["ca_key"],
                           digest=c.ca_next_digest, ca_next_cert="", ca_next_key=b"",
                           ca_cross="", ca_next_digest="", ca_phase="", ca_acks={})


def _file_object(state: ClusterState, cmd: dict[str, Any], kind: str, existing: dict[str, Any]
                 ) -> tuple[str, str, bytes, dict[str, str], float]:
    oid, name, data = str(cmd["id"]), validate_object_name(cmd["name"], kind), cmd["data"]
    if not ID_RE.match(oid) or oid in existing:
        raise Rejected("invalid", f"bad or duplicate {kind} id {oid!r}", "id")
    if not isinstance(data, bytes) or len(data) > MAX_FILE_BYTES + 64:
        raise Rejected("invalid", f"{kind} data must be at most {MAX_FILE_BYTES // 1024} "
                       "KiB", "data")
    if any(o.name == name for o in existing.values()):
        raise Rejected("exists", f"a {kind} named {name!r} already exists", "name")
    labels = cmd.get("labels") or {}
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise Rejected("invalid", "labels must be a map of strings", "labels")
    return oid, name, data, dict(labels), float(cmd["now"])


def client_cert_add(state: ClusterState, cmd: dict[str, Any]) -> None:
    name, serial = validate_object_name(cmd["name"], "client"), cmd["serial"]
    if not isinstance(serial, str) or not re.fullmatch(r"[0-9a-f]{1,40}", serial):
        raise Rejected("invalid", "serial must be hex", "serial")
    user = cmd.get("user") or ""  # a certificate issued for a user acts with its role
    if user and user not in state.cluster.users:
        raise Rejected("not_found", f"no user named {user}", "user")
    bound = {k: v for k, v in state.cluster.client_users.items() if k != name}
    state.cluster = replace(state.cluster, clients={**state.cluster.clients, name: serial},
                           client_users={**bound, name: user} if user else bound)


def client_cert_remove(state: ClusterState, cmd: dict[str, Any]) -> None:
    name = cmd["name"]
    if name not in state.cluster.clients:
        raise Rejected("not_found", f"no client certificate named {name}", "name")
    state.cluster = replace(state.cluster, clients={
        k: v for k, v in state.cluster.clients.items() if k != name}, client_users={
        k: v for k, v in state.cluster.client_users.items() if k != name})


# --- users (shoal.node.users validates and seals before proposing)
def user_add(state: ClusterState, cmd: dict[str, Any]) -> None:
    name = validate_object_name(cmd["name"], "user")
    if name in state.cluster.users:
        raise Rejected("exists", f"a user named {name!r} already exists", "name")
    now = float(cmd["now"])
    user = User(name=name, role=_user_role(cmd["role"]), password=str(cmd["password"]),
                created_at=now, updated_at=now)
    state.cluster = replace(state.cluster, users={**state.cluster.users, name: user})


def user_update(state: ClusterState, cmd: dict[str, Any]) -> None:
    name = cmd["name"]
    user = state.cluster.users.get(name) if isinstance(name, str) else None
    if user is None:
        raise Rejected("not_found", f"no user named {name}", "name")
    changes: dict[str, Any] = {"updated_at": float(cmd["now"])}
    if "role" in cmd:
        changes["role"] = _user_role(cmd["role"])
    for key in ("password", "token_hash"):
        if key in cmd:
            changes[key] = str(cmd[key])
    state.cluster = replace(state.cluster, users={**state.cluster.users,
                                                name: replace(user, **changes)})


def user_remove(state: ClusterState, cmd: dict[str, Any]) -> None:
    """Also revokes the client certificates issued for the user."""
    name = cmd["name"]
    if not isinstance(name, str) or name not in state.cluster.users:
        raise Rejected("not_found", f"no user named {name}", "name")
    certs = {k for k, v in state.cluster.client_users.items() if v == name}
    state.cluster = replace(
        state.cluster,
        users={k: v for k, v in state.cluster.users.items() if k != name},
        client_users={k: v for k, v in state.cluster.client_users.items() if k not in certs},
        clients={k: v for k, v in state.cluster.clients.items() if k not in certs})


def secret_create(state: ClusterState, cmd: dict[str, Any]) -> dict[str, Any]:
    """``data`` arrives sealed by the proposing manager (shoal.node.secrets)."""
    oid, name, data, labels, now = _file_object(state, cmd, "secret", state.secrets)
    if cmd.get("key_id", state.cluster.key_id) != state.cluster.key_id:
        raise Rejected("conflict", "the managers' key was rotated while this secret was "
                       "sealed: retry", "data")
    state.secrets[oid] = Secret(id=oid, name=name, data=data, labels=labels,
                               created_at=now, updated_at=now)
    return {"id": oid}


def config_create(state: ClusterState, cmd: dict[str, Any]) -> dict[str, Any]:
    oid, name, data, labels, now = _file_object(state, cmd, "config", state.configs)
    state.configs[oid] = Config(id=oid, name=name, data=data, labels=labels,
                               created_at=now, updated_at=now)
    return {"id": oid}


def _users_of(state: ClusterState, kind: str, name: str) -> list[str]:
    """Services whose spec uses the secret/config ``name`` (a removal would break them)."""
    return sorted(s.spec.name for s in state.services.values()
                  if any(r.name == name for r in getattr(s.spec.task.container, kind)))


def _file_remove(state: ClusterState, cmd: dict[str, Any], kind: str,
                 existing: dict[str, Any]) -> None:
    oid = cmd["id"]
    obj = existing.get(oid) if isinstance(oid, str) else None
    if obj is None:
        raise Rejected("not_found", f"no such {kind}: {oid}", "id")
    users = _users_of(state, f"{kind}s", obj.name)
    if users:
        raise Rejected("in_use", f"{kind} {obj.name} is in use by service(s) "
                       f"{', '.join(users)}: remove it from them first", "name")
    del existing[oid]


def secret_remove(state: ClusterState, cmd: dict[str, Any]) -> None:
    _file_remove(state, cmd, "secret", state.secrets)


def config_remove(state: ClusterState, cmd: dict[str, Any]) -> None:
    _file_remove(state, cmd, "config", state.configs)


def _user_role(role: Any) -> str:
    if role not in USER_ROLES:
        raise Rejected("invalid", f"role must be one of {', '.join(USER_ROLES)}", "role")
    return str(role)
