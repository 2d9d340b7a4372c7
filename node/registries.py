"""Registries for the cluster: credentials, tag-to-digest resolution, a node's pulls and
pushes.

Owns:

* ``registry login/logout`` (managers): the credentials are checked against the registry,
  then kept as a cluster *secret* named ``registry-auth.<host>`` (``:`` → ``-``), sealed by
  the receiving manager before it is proposed (shoal.node.secrets / sealing: the Raft log and
  every replica hold ciphertext). Never logged, never shown (``secret inspect`` shows no
  value), never written to disk in plaintext;
* resolving a service's image tag to its digest when the service is created or updated
  (``resolve_image`` = ``always | changed | never``, as Swarm's ``--resolve-image``), so
  every node runs the same bytes: the spec's image becomes ``HOST/NAME:TAG@sha256:…``;
* the credentials a node may use to pull a task's image: only when the service asked for
  them (``task.container.registry_auth``, Swarm's ``--with-registry-auth``), only for the
  node the task is assigned to (``POST /v1/cluster/registry-auth``, mTLS), unsealed on a
  manager;
* a node's registry pull (``pull``): the manifest from the registry, then each layer from a
  peer if one has it or is fetching it, else from the registry (shoal.node.transfer
  ``blob_from_peers``), so N nodes starting a new image cost the registry about one copy;
* a node's push (``push``, `shoal image push`: shoal.runtime.regpush) with the cluster's
  credentials for the target registry (a manager's).

Must not touch: the image store's files (shoal.runtime.registry and ImageStore do), Raft
internals, secrets other than ``registry-auth.*``.

Only references that name their registry (``reg:5000/app:1``, ``docker.io/x``) are resolved
or pulled from a registry: a bare ``app:1`` stays what it always was here, an image loaded
on some node (``shoal image load``) and shared by peers.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from typing import Any

from shoal.node import pki
from shoal.node.context import NodeContext
from shoal.node.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    NotFound,
    SealError,
    Unavailable,
)
from shoal.node.hostaccess import SECRET_PREFIX
from shoal.node.sealing import secret_aad, unseal
from shoal.node.secrets import SecretsApi
from shoal.node.security import Security
from shoal.node.transfer import Transfer
from shoal.raft.models import NodeRole, ServiceSpec, TaskState
from shoal.runtime.errors import DigestMismatch, ImageError, ImageNotFound
from shoal.runtime.images import ImageInfo, ImageStore
from shoal.runtime.reference import InvalidReference, Reference, has_registry_host
from shoal.runtime.reference import parse_reference as _parse
from shoal.runtime.registry import (
    ManifestUnknown,
    PullProgress,
    RegistryAuthError,
    RegistryClient,
    RegistryConfig,
    RegistryUnreachable,
    UnsupportedImage,
)

log = logging.getLogger("shoal.registries")

RESOLVE_MODES = ("always", "changed", "never")
Creds = tuple[str, str]


def secret_name(host: str) -> str:
    """The cluster secret holding ``host``'s credentials (a secret name has at most 64
    characters: a longer host is named by its hash)."""
    name = SECRET_PREFIX + host.replace(":", "-").replace("[", "").replace("]", "")
    if len(name) <= 64:
        return name
    return SECRET_PREFIX + hashlib.sha256(host.encode()).hexdigest()[:32]


def translate(exc: Exception, ref: str, what: str = "pull") -> ApiError:
    """A registry failure (of a ``what``: pull, push) as the API error a user (and `service
    ps`) sees."""
    # (the cause first: `service ps` shows the start of the message)
    if isinstance(exc, RegistryUnreachable):
        return Unavailable(f"registry unreachable: {exc}", "image")
    if isinstance(exc, RegistryAuthError):
        return Forbidden(f"registry auth: {exc}", "image")
    if isinstance(exc, ManifestUnknown):
        return NotFound(f"image not found: {exc}", "image")
    if isinstance(exc, ImageNotFound):  # (a push's image is not in this node's store)
        return NotFound(f"{exc} on this node", "ref")
    if isinstance(exc, DigestMismatch):
        return BadRequest(f"digest mismatch (refused, nothing kept): {exc}" if what == "pull"
                          else f"digest mismatch: {exc}", "image")
    if isinstance(exc, (UnsupportedImage, InvalidReference, ImageError)):
        return BadRequest(f"unusable image: {exc}", "image")
    return Unavailable(f"{what} of {ref} failed: {exc}", "image")


class Registries:
    def __init__(self, ctx: NodeContext, security: Security, secrets: SecretsApi,
                 config: RegistryConfig, images: ImageStore, transfer: Transfer) -> None:
        self.ctx = ctx
        self.security = security
        self.secrets = secrets
        self.config = config
        self.images = images
        self.transfer = transfer
        self._pulls: dict[str, asyncio.Future[ImageInfo]] = {}
        # the registry pulls in flight on this node, by reference (`image pull` and
        # `service ps` show them: progress_message, GET /v1/images/pulls)
        self.progress: dict[str, PullProgress] = {}

    # ------------------------------------------------------------ credentials (managers)
    def _stored(self, host: str) -> Creds | None:
        """The credentials kept for ``host`` (unsealed; managers only), or None."""
        store = self.ctx.store
        ident = self.ctx.identity
        if store is None or ident is None or ident.role != NodeRole.MANAGER:
            return None
        name = secret_name(host)
        sec = next((s for s in store.snapshot().secrets.values() if s.name == name), None)
        if sec is None:
            return None
        try:
            raw = json.loads(unseal(self.security.manager_key(), sec.data, secret_aad(sec.id)))
            return str(raw["username"]), str(raw["password"])
        except (SealError, ValueError, KeyError, TypeError) as exc:
            log.warning("registry credentials for %s are unusable: %s", host,
                        type(exc).__name__)
            return None

    def platform(self) -> tuple[str, str, str]:
        """(os, arch, variant) this node pulls as, and says its images are (push, save)."""
        return self._client(None).platform()

    def _client(self, creds: Creds | None) -> RegistryClient:
        return RegistryClient(self.config, credentials=lambda _host: creds)

    async def login(self, body: dict[str, Any]) -> dict[str, Any]:
        """Check ``username``/``password`` against registry ``server`` and keep them."""
        self.ctx.require_manager()
        server, user, password = body.get("server"), body.get("username"), body.get("password")
        if not isinstance(server, str) or not server or "/" in server:
            raise BadRequest("server must be a registry HOST[:PORT]", "server")
        if not isinstance(user, str) or not user:
            raise BadRequest("username is required", "username")
        if not isinstance(password, str) or not password:
            raise BadRequest("password is required", "password")
        try:
            _parse(f"{server}/x")
        except InvalidReference:
            raise BadRequest(f"{server!r} is not a registry HOST[:PORT]", "server") from None
        host = _parse(f"{server}/x").registry
        try:
            await asyncio.to_thread(self._client((user, password)).check_login, host)
        except (RegistryAuthError, RegistryUnreachable, ImageError) as exc:
            raise translate(exc, host) from None
        await self.logout(host, missing_ok=True)
        data = json.dumps({"username": user, "password": password}).encode()
        await self.secrets.create("secret", {
            "name": secret_name(host), "data": base64.b64encode(data).decode(),
            "labels": {"shoal.registry": host}})
        log.info("stored registry credentials for %s", host)  # (never the values)
        return {"server": host, "username": user, "stored": True}

    async def logout(self, server: str, missing_ok: bool = False) -> dict[str, Any]:
        store = self.ctx.require_manager()
        name = secret_name(server)
        found = [s for s in store.snapshot().secrets.values() if s.name == name]
        if not found and not missing_ok:
            raise NotFound(f"no credentials stored for {server}", "server")
        for sec in found:
            await self.secrets.remove("secret", sec.id)
        return {"server": server, "removed": bool(found)}

    # ----------------------------------------------------------------- resolution
    async def resolve_spec(self, spec: ServiceSpec, mode: Any,
                           previous: ServiceSpec | None = None
                           ) -> tuple[ServiceSpec, list[str]]:
        """``spec`` with its image pinned to the registry's digest (per ``mode``), and
        warnings (a registry that cannot be asked leaves the image as given, as Swarm)."""
        if mode is None or mode == "":
            mode = "changed" if previous is not None else "always"
        if mode not in RESOLVE_MODES:
            raise BadRequest("resolve_image must be always, changed or never", "resolve_image")
        image = spec.task.container.image
        if mode == "never" or not image or not has_registry_host(image):
            return spec, []
        try:
            ref = _parse(image)
        except InvalidReference as exc:
            raise BadRequest(str(exc), "task.container.image") from None
        if ref.digest:
            if mode != "always" or not ref.tag:
                return spec, []  # pinned already (by the user, or kept from the last resolve)
            ref = Reference(ref.registry, ref.repository, ref.tag)
        try:
            digest = await asyncio.to_thread(
                self._client(self._stored(ref.registry)).resolve, ref)
        except (ImageError, OSError) as exc:
            msg = (f"image {image} could not be resolved to a digest ({exc}); nodes pull "
                   "the tag as it is when they start a task, which may differ between nodes")
            log.warning("%s", msg)
            return spec, [msg]
        pinned = ref.with_digest(digest).familiar()
        container = _replace(spec.task.container, image=pinned)
        return _replace(spec, task=_replace(spec.task, container=container)), []

    # ---------------------------------------------------------- credentials for tasks
    def task_auth(self, peer: pki.CertInfo | None, task_id: Any) -> dict[str, Any]:
        """Manager side: the credentials for the image of ``task_id``, for the node that
        runs it, if its service asked for them (``--with-registry-auth``)."""
        store = self.ctx.require_manager()
        node = self.security.authorize(peer)
        if not isinstance(task_id, str):
            raise BadRequest("task_id is required", "task_id")
        task = store.snapshot().tasks.get(task_id)
        if task is None or task.node_id != node.id:
            raise Forbidden(f"task {task_id} is not assigned to node {node.id}", "task_id")
        if task.desired_state > TaskState.RUNNING or not task.spec.container.registry_auth:
            raise Forbidden(f"task {task_id} has no registry credentials", "task_id")
        creds = self._stored(_parse(task.spec.container.image).registry)
        if creds is None:
            return {"username": "", "password": ""}
        return {"username": creds[0], "password": creds[1]}

    async def _creds_for(self, image: str) -> Creds | None:
        """Node side: credentials for pulling ``image``, if a task of this node that uses it
        was created with ``--with-registry-auth``."""
        store, ident = self.ctx.store, self.ctx.identity
        if store is None or ident is None:
            return None
        snap = store.snapshot()
        task = next((t for t in snap.tasks.values()
                     if t.node_id == ident.node_id and t.spec.container.image == image
                     and t.spec.container.registry_auth
                     and t.desired_state <= TaskState.RUNNING), None)
        if task is None:
            return None
        host = _parse(image).registry
        if ident.role == NodeRole.MANAGER and ident.manager_key:
            return self._stored(host)
        leader = (store.leader_addr() if hasattr(store, "leader_addr") else None) or ""
        managers = sorted((n for n in snap.nodes.values() if n.role is NodeRole.MANAGER),
                          key=lambda n: (n.raft_addr != leader, n.id))
        for m in managers:
            try:
                reply = await self.security.call(m.api_addr, "/v1/cluster/registry-auth",
                                                 {"task_id": task.id}, timeout=5.0)
            except ApiError as exc:
                log.info("registry credentials for task %s from %s: %s", task.id,
                         m.hostname, exc.message)
                continue
            user, pw = str(reply.get("username") or ""), str(reply.get("password") or "")
            return (user, pw) if user else None
        raise Unavailable(f"cannot fetch the registry credentials of task {task.id}: "
                          "no manager answered")

    # ----------------------------------------------------------------------- pull
    def pullable(self, image: str) -> bool:
        return has_registry_host(image)

    def progress_message(self, image: str) -> str | None:
        """How far this node's pull of ``image`` is (None: no registry pull of it now)."""
        p = self.progress.get(image)
        return p.message() if p is not None else None

    def pulling_layers(self, image: str) -> frozenset[str]:
        """The layer digests of this node's pull of ``image`` in flight (empty: none, or
        its manifest is not read yet)."""
        p = self.progress.get(image)
        return p.layers if p is not None else frozenset()

    def pulls(self) -> list[dict[str, Any]]:
        """The registry pulls in flight on this node."""
        return [p.to_json() for p in list(self.progress.values())]

    async def pull(self, image: str, stored_creds: bool = False) -> ImageInfo:
        """Pull ``image`` from its registry into this node's store, layers from peers
        first (one pull per reference at a time). Credentials: those of a task here that
        asked for them; with ``stored_creds`` (`shoal image pull` on a manager) the
        cluster's. Raises ApiErrors (see ``translate``)."""
        key = f"{image}\0{stored_creds}"
        running = self._pulls.get(key)
        if running is not None:
            return await asyncio.shield(running)
        fut: asyncio.Future[ImageInfo] = asyncio.get_running_loop().create_future()
        self._pulls[key] = fut
        try:
            info = await self._pull(image, stored_creds)
            fut.set_result(info)
            return info
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()
            raise
        finally:
            self._pulls.pop(key, None)

    async def _pull(self, image: str, stored_creds: bool) -> ImageInfo:
        try:
            ref = _parse(image)
        except InvalidReference as exc:
            raise BadRequest(str(exc), "image") from None
        creds = self._stored(ref.registry) if stored_creds else None
        creds = creds or await self._creds_for(image)
        client = self._client(creds)
        loop = asyncio.get_running_loop()
        started = time.monotonic()

        def from_peers(digest: str) -> bool:
            fut = asyncio.run_coroutine_threadsafe(
                self.transfer.blob_from_peers(digest, image), loop)
            return fut.result()

        progress = self.progress[image] = PullProgress(image)
        try:
            info = await asyncio.to_thread(client.pull, ref, self.images, from_peers, progress)
        except (ImageError, OSError) as exc:
            err = translate(exc, image)
            if isinstance(exc, RegistryAuthError) and creds is None:
                err.message += ("; this node pulls anonymously: create the service with "
                                "--with-registry-auth after `shoal registry login`")
            raise err from None
        finally:
            if self.progress.get(image) is progress:
                del self.progress[image]
        log.info("pulled %s (%s): %d bytes from the registry in %.2fs", image, info.id[:19],
                 client.bytes_fetched, time.monotonic() - started)
        return info


    async def push(self, source: str, target: str = "") -> dict[str, Any]:
        """Push the image ``source`` of this node's store to ``target`` (default: its own
        name), which names a registry, with the cluster's credentials for that registry (a
        manager's: ``registry login``; anonymous elsewhere). ApiErrors (``translate``)."""
        where = target or source
        if not self.pullable(where):
            raise BadRequest("push to a reference that names its registry: "
                             "HOST[:PORT]/PATH[:TAG] (`image tag` one first)",
                             "target" if target else "ref")
        creds = self._stored(_parse(where).registry)
        client = self._client(creds)
        started = time.monotonic()
        from shoal.runtime import regpush  # (imported by a push: an idle agent never runs it)
        try:
            result = await asyncio.to_thread(regpush.push, client, self.images, source, target)
        except (ImageError, OSError) as exc:
            err = translate(exc, where, "push")
            if isinstance(exc, RegistryAuthError) and creds is None:
                err.message += ("; this node has no credentials for it: `shoal registry "
                                "login` on a manager, and push from a manager")
            raise err from None
        log.info("pushed %s as %s (%s): %d of %d blobs uploaded in %.2fs", source,
                 result.ref, result.digest[:19],
                 sum(1 for _, s in result.blobs if s == "pushed"), len(result.blobs),
                 time.monotonic() - started)
        return result.to_json()


def _replace(obj: Any, **changes: Any) -> Any:
    import msgspec
    return msgspec.structs.replace(obj, **changes)


__all__ = ["RESOLVE_MODES", "Registries", "secret_name", "translate"]
