"""Secrets and configs: the user API, the managers' fetch route, and the files a task gets.

Owns (one ``SecretsApi`` per agent):

* ``secret create/ls/inspect/rm`` and ``config ...`` on managers. A secret value is sealed
  (shoal.node.sealing, AES-256-GCM under the managers' key) by the manager that receives
  it *before* it is proposed, so the Raft log, the Raft files and every worker's replica
  hold only ciphertext. Views never include a secret's value (configs show theirs). A
  secret or config used by a service cannot be removed (the state machine refuses);
* ``task_files`` (manager side of ``POST /v1/cluster/task-files``): a node gets the
  plaintext of the secrets of a task only over mTLS, only for a task assigned to *that*
  node (its certificate says which node it is) that is still meant to run;
* ``resolve_task_files(task)`` (node side): ``{path in the task: (bytes, mode[, uid,
  gid])}`` for a task about to start, where and whose each file is decided from the task's
  own spec (``FileRef.file_path``; no owner: the task's user, as specs written before schema
  11 mean). Configs come from the local replica; secrets are unsealed locally on a manager,
  fetched from a manager on a worker (only their bytes are taken from its answer). The bytes
  stay in memory: shoal never writes them to disk or logs them (the runtime mounts them on a
  tmpfs).

Must not touch: the runtime (it gets bytes), Raft internals, the network beyond
Security.call.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from typing import Any

from shoal.node import pki
from shoal.node.context import NodeContext, new_id
from shoal.node.errors import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    SealError,
    Unavailable,
    from_store_error,
)
from shoal.node.hostaccess import secret_access
from shoal.node.sealing import key_id, seal, secret_aad, unseal
from shoal.node.security import Security
from shoal.node.users import require_admin
from shoal.raft.errors import StoreError
from shoal.raft.models import Config, FileRef, NodeRole, Secret, ServiceSpec, Task, TaskState
from shoal.raft.secops import MAX_FILE_BYTES
from shoal.raft.state import Snapshot
from shoal.raft.validate import validate_object_name
from shoal.runtime.rootfs import FileValue

log = logging.getLogger("shoal.secrets")

# absolute path in the task -> (content, mode) owned by the task's user, or (content, mode,
# uid, gid) (shoal.runtime.records.TaskConfig.files)
TaskFiles = dict[str, FileValue]


def secret_path(ref: FileRef) -> str:
    return ref.file_path("secret")


def config_path(ref: FileRef) -> str:
    return ref.file_path("config")


def file_entry(ref: FileRef, data: bytes) -> FileValue:
    """A reference's file as the runtime takes it: its owner when the spec names one (an
    empty uid or gid, written before schema 11: the task's user, as then)."""
    if not ref.uid and not ref.gid:
        return data, ref.mode
    return data, ref.mode, int(ref.uid or 0), int(ref.gid or 0)


def _view(obj: Secret | Config, kind: str, detail: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"id": obj.id, "name": obj.name, "labels": dict(obj.labels),
                           "created_at": obj.created_at, "updated_at": obj.updated_at}
    if kind == "config" and detail:
        out["data"] = base64.b64encode(obj.data).decode()
    return out


def _find(objs: dict[str, Any], ref: str, kind: str) -> Any:
    if ref in objs:
        return objs[ref]
    by_name = [o for o in objs.values() if o.name == ref]
    if not by_name and len(ref) >= 4:
        by_name = [o for o in objs.values() if o.id.startswith(ref)]
    if len(by_name) == 1:
        return by_name[0]
    if not by_name:
        raise NotFound(f"no such {kind}: {ref}", kind)
    raise BadRequest(f"{kind} {ref!r} is ambiguous", kind)


def _by_name(objs: dict[str, Any], name: str) -> Any:
    return next((o for o in objs.values() if o.name == name), None)


def check_refs(snap: Snapshot, spec: ServiceSpec) -> None:
    """A service may only use secrets and configs that exist (checked before proposing)."""
    for kind, refs, objs in (("secret", spec.task.container.secrets, snap.secrets),
                             ("config", spec.task.container.configs, snap.configs)):
        for r in refs:
            if _by_name(objs, r.name) is None:
                raise NotFound(f"no such {kind}: {r.name} (create it with `shoal {kind} "
                               "create`)", f"{kind}s")


class SecretsApi:
    def __init__(self, ctx: NodeContext, security: Security) -> None:
        self.ctx = ctx  # identity, the state source, propose (shoal.node.context)
        self.security = security

    # ================================================================== user API (managers)
    def _objs(self, kind: str) -> dict[str, Any]:
        snap = self.ctx.require_manager().snapshot()
        return snap.secrets if kind == "secret" else snap.configs

    def ls(self, kind: str) -> list[dict[str, Any]]:
        return [_view(o, kind, False) for o in
                sorted(self._objs(kind).values(), key=lambda o: o.name)]

    def inspect(self, kind: str, ref: str) -> dict[str, Any]:
        return _view(_find(self._objs(kind), ref, kind), kind, True)

    async def create(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        store = self.ctx.require_manager()
        try:
            name = validate_object_name(body.get("name"), kind)
        except StoreError as exc:
            raise from_store_error(exc) from exc
        raw = body.get("data")
        try:
            data = base64.b64decode(raw, validate=True) if isinstance(raw, str) else None
        except (binascii.Error, ValueError):
            data = None
        if data is None:
            raise BadRequest("data must be the value, base64-encoded", "data")
        if not data or len(data) > MAX_FILE_BYTES:  # (Swarm: more than 0, at most 500 KB)
            raise BadRequest(f"a {kind} holds 1 byte to {MAX_FILE_BYTES // 1024} KiB, this one "
                             f"{len(data)} bytes", "data")
        labels = body.get("labels") or {}
        if not isinstance(labels, dict):
            raise BadRequest("labels must be a map of strings", "labels")
        if kind == "secret" and secret_access(name):
            require_admin(secret_access(name), "name")
        objs = store.snapshot().secrets if kind == "secret" else store.snapshot().configs
        if _by_name(objs, name) is not None:
            raise Conflict(f"a {kind} named {name!r} already exists", "name", code="exists")
        oid = new_id()
        if kind == "secret":
            data = seal(self.security.manager_key(), data, secret_aad(oid))
        cmd = {"op": f"{kind}_create", "id": oid, "name": name, "data": data,
               "labels": labels, "now": time.time()}
        if kind == "secret":  # refused unless sealed under the cluster's key (node/keys.py)
            cmd["key_id"] = key_id(self.security.manager_key()) \
                if store.snapshot().cluster.key_id else ""
        await self.ctx.propose(cmd)
        return {"id": oid, "name": name}

    async def remove(self, kind: str, ref: str) -> dict[str, Any]:
        obj = _find(self._objs(kind), ref, kind)
        if kind == "secret" and secret_access(obj.name):
            require_admin(secret_access(obj.name), "name")
        # a service's previous spec counts too: `service rollback` (or an automatic one)
        # would deploy tasks that cannot start (the state machine checks the current specs)
        rollback = sorted(s.spec.name for s in self.ctx.require_manager().snapshot()
                          .services.values() if s.previous_spec is not None and any(
                              r.name == obj.name for r in getattr(
                                  s.previous_spec.task.container, f"{kind}s")))
        if rollback:
            raise Conflict(f"{kind} {obj.name} is in use by the previous spec of service(s) "
                           f"{', '.join(rollback)} (a rollback would need it): update them "
                           "again first", "name", code="in_use")
        await self.ctx.propose({"op": f"{kind}_remove", "id": obj.id})
        return {"id": obj.id, "name": obj.name, "removed": True}

    def check_refs(self, snap: Snapshot, spec: ServiceSpec) -> None:
        check_refs(snap, spec)

    # ================================================================== files of a task
    def _secret_files(self, snap: Snapshot, task: Task) -> TaskFiles:
        """Unseal a task's secrets (managers only: needs the managers' key)."""
        key = self.security.manager_key()
        out: TaskFiles = {}
        for ref in task.spec.container.secrets:
            sec = _by_name(snap.secrets, ref.name)
            if sec is None:
                raise NotFound(f"no such secret: {ref.name}", "secrets")
            try:
                out[secret_path(ref)] = file_entry(ref, unseal(key, sec.data,
                                                               secret_aad(sec.id)))
            except SealError as exc:
                raise Unavailable(f"cannot unseal secret {ref.name}: {exc}") from exc
        return out

    def task_files(self, peer: pki.CertInfo | None, task_id: Any) -> dict[str, Any]:
        """Manager side of the fetch: the secrets of ``task_id`` for the node running it."""
        store = self.ctx.require_manager()
        node = self.security.authorize(peer)
        if not isinstance(task_id, str):
            raise BadRequest("task_id is required", "task_id")
        snap = store.snapshot()
        task = snap.tasks.get(task_id)
        if task is None or task.node_id != node.id:
            raise Forbidden(f"task {task_id} is not assigned to node {node.id}", "task_id")
        if task.desired_state > TaskState.RUNNING:
            raise Forbidden(f"task {task_id} is being stopped", "task_id")
        files = self._secret_files(snap, task)
        # (path and mode as before schema 11; the node that runs the task takes the bytes
        # and decides the file's place and owner from its own copy of the spec)
        return {"files": [{"path": p, "mode": v[1], "data": base64.b64encode(v[0]).decode()}
                          for p, v in files.items()]}

    async def resolve_task_files(self, task: Task) -> TaskFiles:
        """The files a task must see, ``{absolute path in the task: (content, mode)}``, e.g.
        ``{"/run/secrets/db": (b"...", 0o400), "/etc/app.conf": (b"...", 0o440, 101, 101)}``;
        {} when it uses none.

        Raises NotFound (a referenced secret/config does not exist: the task cannot run) or
        Unavailable (no manager reachable or none has seen the assignment yet: retry)."""
        if not task.spec.container.secrets and not task.spec.container.configs:
            return {}
        store = self.ctx.require_member()
        snap = store.snapshot()
        files: TaskFiles = {}
        for ref in task.spec.container.configs:
            cfg = _by_name(snap.configs, ref.name)
            if cfg is None:
                raise NotFound(f"no such config: {ref.name}", "configs")
            files[config_path(ref)] = file_entry(ref, cfg.data)
        if not task.spec.container.secrets:
            return files
        ident = self.ctx.identity
        if ident is not None and ident.role == NodeRole.MANAGER and ident.manager_key:
            files.update(self._secret_files(snap, task))
            return files
        files.update(await self._fetch_secrets(snap, task))
        return files

    async def _fetch_secrets(self, snap: Snapshot, task: Task) -> TaskFiles:
        leader = (self.ctx.store.leader_addr() if self.ctx.store else None) or ""
        managers = sorted((n for n in snap.nodes.values() if n.role is NodeRole.MANAGER),
                          key=lambda n: (n.raft_addr != leader, n.id))
        errors: list[str] = []
        for m in managers:
            try:
                reply = await self.security.call(
                    m.api_addr, "/v1/cluster/task-files", {"task_id": task.id}, timeout=5.0)
            except NotFound:
                raise
            except ApiError as exc:
                errors.append(f"{m.hostname}: {exc.message}")
                continue
            try:
                got = {str(f["path"]): base64.b64decode(f["data"]) for f in reply["files"]}
            except (KeyError, TypeError, ValueError, binascii.Error):
                errors.append(f"{m.hostname}: malformed reply")
                continue
            out: TaskFiles = {}
            for ref in task.spec.container.secrets:
                path = secret_path(ref)
                if path not in got:
                    errors.append(f"{m.hostname}: no {path} in its reply")
                    break
                out[path] = file_entry(ref, got[path])
            else:
                return out
        raise Unavailable(f"cannot fetch the secrets of task {task.id}: "
                          + ("; ".join(errors) or "no manager known"))


__all__ = ["SecretsApi", "TaskFiles", "check_refs", "config_path", "file_entry",
           "secret_path"]
