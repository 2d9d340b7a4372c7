"""Node-to-node data transfer over mTLS: image blobs and task logs.

Owns: pulling an image this node lacks from a peer that has it (content-addressed blobs,
each verified by digest on import, then the image committed locally) — or, for an image
that names its registry and that no peer holds, from the registry through
``registry_pull`` (shoal.node.registries), which asks ``blob_from_peers`` for each layer
first (a peer that has it, or the one peer that fetches it from the registry for all: a
rendezvous hash of the layer digest over the nodes assigned a task of the image, so the
registry serves each layer about once however many nodes start it) — and fetching or
following the logs of a task that runs on another node (for `shoal service logs`). Both
ride the cluster's node API (TCP, mutual TLS with the cluster CA; the server is pinned to
the node id it must be, and only cluster members are served). Must not touch: the store
(it reads snapshots), the runtime's internals (it uses the ImageStore blob API and the
Controller's read_logs/follow_logs).

Who may read an image here (``check_image_access``): a manager any; a worker only an image
of a task it is assigned (main container, sidecar or init container), and of that image
only its blobs (the manifest and layers of the image committed here, or the layers of this
node's own registry pull of it in flight) — so a worker cannot copy a private image it was
given no task of from a peer that holds it. The caller names the image with each blob
request; older agents did not, so the rule holds once every node sends it (cluster schema
``IMAGE_ACCESS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp

from shoal.node import pki
from shoal.node.context import NodeContext
from shoal.node.errors import ApiError, Forbidden, NotFound, Unavailable
from shoal.node.pod import container_id
from shoal.node.security import Security
from shoal.node.upgrade import cluster_schema
from shoal.raft.models import Node, NodeRole, NodeState, Task, TaskState
from shoal.raft.schema import IMAGE_ACCESS
from shoal.runtime.controller import Controller
from shoal.runtime.errors import ImageError
from shoal.runtime.images import ImageStore

log = logging.getLogger("shoal.transfer")
# How long `service ps` and `node ps` wait for a node's live resource use, seconds: a node
# answers in milliseconds; one that does not is shown without usage rather than delay the
# whole listing (`node ps`/`service ps` of Docker show none at all).
LISTING_USAGE_TIMEOUT = 0.3
# A node that did not answer a usage request is not asked again for this long, seconds.
USAGE_QUIET = 10.0
# How long a node asked for an image by a worker waits for its own copy of the state to show
# the worker's task of that image before refusing, seconds: the worker may have learned of
# the task a moment before this node did (both follow the managers' feed).
IMAGE_ACCESS_WAIT = 3.0


def task_images(task: Task) -> set[str]:
    """The images a task runs: its main container's, its sidecars' and init containers'."""
    s = task.spec
    return {s.container.image, *(c.image for c in (*s.sidecars, *s.init_containers))} - {""}


class Transfer:
    def __init__(self, ctx: NodeContext, security: Security, runtime: Controller,
                 images: ImageStore) -> None:
        self.ctx = ctx  # identity, the state source, the HTTP session (shoal.node.context)
        self.security = security
        self.runtime = runtime
        self.images = images
        self._pulls: dict[str, asyncio.Future[None]] = {}
        # pull an image from its registry (shoal.node.registries.Registries.pull), used
        # when no peer has the image; None = peers only. ``registry_pullable(ref)`` says
        # whether a reference names a registry at all.
        self.registry_pull: Callable[[str], Awaitable[Any]] | None = None
        self.registry_pullable: Callable[[str], bool] = lambda _ref: False
        # the layer digests of this node's registry pull of an image in flight, once its
        # manifest is read (shoal.node.registries.Registries.pulling_layers); empty: none
        self.pulling_layers: Callable[[str], frozenset[str]] = lambda _ref: frozenset()
        # how long a node waits for the peer chosen to fetch a layer from the registry
        # before fetching it itself (seconds)
        self.peer_wait = 120.0
        # node id → time.monotonic() until which cluster_usage does not ask it (it did not
        # answer the last time)
        self.usage_quiet: dict[str, float] = {}

    # ------------------------------------------------------------------ plumbing
    def _peers(self) -> list[Node]:
        store, me = self.ctx.store, self.ctx.identity
        if store is None or me is None:
            return []
        return sorted((n for n in store.snapshot().nodes.values()
                       if n.id != me.node_id and n.state is NodeState.READY),
                      key=lambda n: n.id)

    async def _request(self, node: Node, method: str, path: str, body: Any = None,
                       timeout: float = 30.0) -> aiohttp.ClientResponse:
        http = self.ctx.http
        assert http is not None
        ctx = self.security.require_client()
        try:
            resp = await http.request(method, f"https://{node.api_addr}{path}", json=body,
                                      ssl=ctx, server_hostname=pki.node_hostname(node.id),
                                      timeout=aiohttp.ClientTimeout(total=None,
                                                                    sock_connect=5,
                                                                    sock_read=timeout))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Unavailable(f"cannot reach node {node.hostname}: {exc}") from None
        if resp.status >= 400:
            try:
                err = (await resp.json(content_type=None)).get("error", {})
            except (ValueError, aiohttp.ClientError):
                err = {}
            resp.release()
            cls = NotFound if resp.status == 404 else Unavailable
            raise cls(err.get("message") or f"node {node.hostname} answered {resp.status}")
        return resp

    # ------------------------------------------------------------------ images
    async def pull_image(self, ref: str) -> None:
        """Fetch image ``ref`` from the first peer that has it (one pull per ref at a time)."""
        running = self._pulls.get(ref)
        if running is not None:
            await asyncio.shield(running)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pulls[ref] = fut
        try:
            await self._pull(ref)
            fut.set_result(None)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters get it from shield
            raise
        finally:
            self._pulls.pop(ref, None)

    async def _pull(self, ref: str) -> None:
        store = self.images
        last: ApiError = NotFound(f"image {ref} is not on this node and no peer has it "
                                  "(`shoal image load` it on one node)", "image")
        for node in self._peers():
            try:
                resp = await self._request(node, "POST", "/v1/cluster/images/resolve",
                                           {"ref": ref}, timeout=10)
                info = await resp.json()
            except ApiError as exc:
                if not isinstance(exc, NotFound):
                    last = exc
                continue
            if not self._same_image(ref, info):
                continue
            image_id, tags = str(info["id"]), [str(t) for t in info.get("tags", [])]
            started = time.monotonic()
            for _ in range(1000):  # manifest first, then its layers
                needed = await asyncio.to_thread(store.blobs_needed, image_id)
                if not needed:
                    break
                for digest in needed:
                    await self._fetch_blob(node, digest, ref)
            await asyncio.to_thread(store.commit, image_id, tags)
            log.info("pulled image %s (%s) from %s in %.2fs", ref, image_id[:19],
                     node.hostname, time.monotonic() - started)
            return
        if self.registry_pull is not None and self.registry_pullable(ref):
            await self.registry_pull(ref)
            return
        raise last

    @staticmethod
    def _same_image(ref: str, info: Any) -> bool:
        """A peer's answer for a registry reference pinned to a digest is only taken if the
        peer's image carries that digest's tag (a tag alone may name other bytes there)."""
        if "@sha256:" not in ref:
            return True
        digest = ref.rsplit("@", 1)[1]
        return any(str(t).endswith(f"@{digest}") for t in info.get("tags", []))

    async def blob_from_peers(self, digest: str, image: str) -> bool:
        """Put blob ``digest`` into the store from a peer: one that has it now, or else the
        peer chosen (rendezvous hash) among the nodes assigned a task of ``image`` to fetch
        it from the registry, waited for up to ``peer_wait``. False: this node is the chosen
        one, or the chosen one did not deliver: fetch it from the registry."""
        if not self._peers_serve(image):
            return False
        peers = self._peers()
        for node in peers:
            with contextlib.suppress(ApiError, OSError, aiohttp.ClientError):
                await self._fetch_blob(node, digest, image)
                return True
        me = self.ctx.identity.node_id if self.ctx.identity is not None else ""
        owner = self._fetcher(digest, image, {n.id for n in peers} | {me})
        if owner is None or owner.id == me:
            return False
        deadline = time.monotonic() + self.peer_wait
        log.info("layer %s of %s: waiting for %s to fetch it from the registry", digest[:19],
                 image, owner.hostname)
        while time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            # the choice again: the chosen node's task may have failed (then another, or
            # this node, takes over), or nodes may have come or gone
            again = self._fetcher(digest, image, {n.id for n in self._peers()} | {me})
            if again is None or again.id == me:
                return False
            owner = again
            try:
                await self._fetch_blob(owner, digest, image)
                return True
            except NotFound:
                continue
            except (ApiError, OSError, aiohttp.ClientError) as exc:
                log.info("layer %s: %s cannot serve it (%s); fetching it here", digest[:19],
                         owner.hostname, exc)
                return False
        return False

    def _peers_serve(self, image: str) -> bool:
        """Whether peers serve this node ``image`` (``check_image_access``): it is a manager,
        the cluster is below ``IMAGE_ACCESS``, or a live task of this node runs the image. A
        worker's `image pull` or build of another image goes to the registry at once,
        instead of waiting on every peer's refusal."""
        store, me = self.ctx.store, self.ctx.identity
        if store is None or me is None or me.role is NodeRole.MANAGER:
            return True
        snap = store.snapshot()
        return cluster_schema(snap) < IMAGE_ACCESS or any(
            t.node_id == me.node_id and t.desired_state <= TaskState.RUNNING
            and image in task_images(t) for t in snap.tasks.values())

    def _fetcher(self, digest: str, image: str, ready: set[str]) -> Node | None:
        """The node that fetches ``digest`` from the registry for every node assigned a task
        of ``image`` (highest rendezvous hash among those that are ready)."""
        store = self.ctx.store
        if store is None:
            return None
        snap = store.snapshot()
        needing = {t.node_id for t in snap.tasks.values()
                   if t.spec.container.image == image and t.node_id in ready
                   and t.desired_state <= TaskState.RUNNING
                   and t.status.state <= TaskState.RUNNING}  # (not one that failed)
        if not needing:
            return None
        best = max(needing, key=lambda n: hashlib.sha256(f"{digest}/{n}".encode()).digest())
        return snap.nodes.get(best)

    async def _fetch_blob(self, node: Node, digest: str, image: str) -> None:
        """Blob ``digest`` of ``image`` (the reference a task of this node runs) from
        ``node`` into the store, verified."""
        store = self.images
        resp = await self._request(
            node, "GET", f"/v1/cluster/images/blobs/{digest}?image={quote(image, safe='')}",
            timeout=60)
        fd, tmp = tempfile.mkstemp(prefix="shoal-blob-", dir=str(self.ctx.data_dir))
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in resp.content.iter_chunked(1 << 20):
                    await asyncio.to_thread(f.write, chunk)
            resp.release()

            def load() -> None:
                with open(tmp, "rb") as src:
                    store.import_blob(digest, src)  # verifies the digest
            await asyncio.to_thread(load)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    # served to peers (authorised by the API: a member's certificate, then
    # check_image_access)
    async def check_image_access(self, node: Node, manager: bool, image: Any,
                                 digest: str | None = None) -> None:
        """Whether ``node`` may read ``image`` here (``digest``: that blob of it); see the
        module's doc. Forbidden naming the field if not; NotFound while this node's own pull
        of the image has not read its manifest (the caller waits or asks another peer)."""
        store = self.ctx.store
        if manager or store is None or cluster_schema(store.snapshot()) < IMAGE_ACCESS:
            return
        if not isinstance(image, str) or not image:
            raise Forbidden("a worker names the image it reads (the reference its task "
                            "runs)", "image")

        def has_task() -> bool:
            return any(t.node_id == node.id and t.desired_state <= TaskState.RUNNING
                       and image in task_images(t) for t in store.snapshot().tasks.values())
        deadline = time.monotonic() + IMAGE_ACCESS_WAIT
        while not has_task():
            if time.monotonic() >= deadline:
                raise Forbidden(f"node {node.hostname} runs no task of image {image}: a "
                                "worker reads only the images of its own tasks", "image")
            await asyncio.sleep(0.1)
        if digest is None:
            return
        pulling = self.pulling_layers(image)
        if digest in pulling:
            return
        try:
            info = await asyncio.to_thread(self.images.inspect, image)
        except ImageError:
            if self.registry_pullable(image) and not pulling:
                raise NotFound(f"image {image} is not here yet", "image") from None
            raise Forbidden(f"image {image} is not on this node", "image") from None
        if digest != info.id and digest not in info.layers:
            raise Forbidden(f"blob {digest} is not part of image {image}", "digest")

    def resolve_image(self, ref: Any) -> dict[str, Any]:
        if not isinstance(ref, str) or not ref:
            raise NotFound("ref is required", "ref")
        try:
            info = self.images.inspect(ref)
        except Exception as exc:
            raise NotFound(f"no image {ref} here: {exc}", "ref") from None
        return {"id": info.id, "tags": list(info.tags)}

    # ------------------------------------------------------------------ logs
    async def remote_logs(self, node: Node, task_id: str, tail: int | None, since: float | None,
                          timestamps: bool, follow: bool) -> AsyncIterator[dict[str, Any]]:
        """Log records of a task on another node, as dicts {ts, stream, line}."""
        body = {"task_id": task_id, "tail": tail, "since": since, "timestamps": timestamps,
                "follow": follow}
        resp = await self._request(node, "POST", "/v1/cluster/logs", body,
                                   timeout=3600 if follow else 30)
        try:
            async for raw in resp.content:
                if raw.strip():
                    yield json.loads(raw)
        finally:
            resp.release()


# ---------------------------------------------------------------------------- service logs
async def local_logs(rt: Controller, task_id: str, tail: int | None, since: float | None,
                     timestamps: bool, follow: bool) -> AsyncIterator[dict[str, Any]]:
    if rt.status(task_id) is None:
        raise NotFound(f"task {task_id} has no logs on this node", "task_id")
    if follow:
        async for line in rt.follow_logs(task_id, tail=tail, since=since,
                                         timestamps=timestamps):
            yield {"ts": line.ts, "stream": line.stream, "line": line.line}
    else:
        lines = await asyncio.to_thread(rt.read_logs, task_id, tail, since, timestamps)
        for line in lines:
            yield {"ts": line.ts, "stream": line.stream, "line": line.line}


FOLLOW_SCAN = 1.0  # seconds: how often `service logs -f` looks for the service's new tasks


async def service_logs(transfer: Transfer, service_id: str, tail: int | None,
                       since: float | None, timestamps: bool, follow: bool,
                       container: str = "", task_id: str = ""
                       ) -> AsyncIterator[dict[str, Any]]:
    """Logs of every task of service ``service_id`` across the cluster, merged: records
    {task, name, node, ts, stream, line}. Without ``follow`` they are sorted by time; with
    it, they stream as they arrive (a task started meanwhile is picked up within
    FOLLOW_SCAN, from its first line, however busy the stream is) until the
    service is removed. ``task_id``: that task's alone (docker's `service logs TASK`; with
    ``follow``, until its log ends).
    ``container``: a pod's container (its runtime id: shoal.node.pod.container_id); "" or
    "main" = the task's own."""
    ctx = transfer.ctx
    me = ctx.node_id
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=10000)
    started: set[str] = set()
    workers: list[asyncio.Task[None]] = []

    async def pump(task_id: str, name: str, node: Node | None, tail: int | None) -> None:
        rid = container_id(task_id, container)
        try:
            if node is None or node.id == me:
                src = local_logs(transfer.runtime, rid, tail, since, timestamps, follow)
            else:
                src = transfer.remote_logs(node, rid, tail, since, timestamps, follow)
            async for rec in src:
                await queue.put({"task": task_id, "name": name,
                                 "node": node.hostname if node else "", **rec})
        except ApiError as exc:
            log.debug("logs of %s unavailable: %s", task_id, exc.message)
        finally:
            await queue.put(None)

    def start_new(tail: int | None) -> int:
        s = ctx.require_manager().snapshot()
        n = 0
        for t in s.tasks_of(service_id):
            if t.id in started or not t.node_id or (task_id and t.id != task_id):
                continue
            if follow and t.status.state < TaskState.RUNNING:
                continue  # its node has no record of it yet: picked up once it ran
            started.add(t.id)
            workers.append(asyncio.create_task(pump(t.id, t.name, s.nodes.get(t.node_id),
                                                    tail)))
            n += 1
        return n

    pending = start_new(tail)
    try:
        if not follow:
            records: list[dict[str, Any]] = []
            while pending:
                rec = await queue.get()
                if rec is None:
                    pending -= 1
                else:
                    records.append(rec)
            records.sort(key=lambda r: r["ts"])
            for rec in records:
                yield rec
            return
        clock = asyncio.get_running_loop().time
        scan = clock() + FOLLOW_SCAN
        while True:  # new tasks are looked for every FOLLOW_SCAN, however busy the stream
            try:
                rec = await asyncio.wait_for(queue.get(), max(0.0, scan - clock()))
            except TimeoutError:
                rec = None
            else:
                if rec is None and task_id:
                    return  # (the one task's log ended)
            if rec is not None:
                yield rec
            if clock() >= scan:
                if service_id not in ctx.require_manager().snapshot().services:
                    return  # (removed: `logs -f` ends, as docker's)
                pending += start_new(None)  # (a task new since: all it printed)
                scan = clock() + FOLLOW_SCAN
    finally:
        for w in workers:
            w.cancel()


# ---------------------------------------------------------------------------- task usage
def local_usage(runtime: Controller, task_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Resource use of tasks running on this node (from their cgroups, and their network
    namespaces' counters), with when it was read
    (``read_at``: this node's monotonic clock, seconds — a rate is taken between two reads of
    one node, not between two replies that wait for the slowest node: cli/stats.py)."""
    out: dict[str, dict[str, Any]] = {}
    for tid in task_ids:
        u = runtime.usage(tid)
        if u is not None:
            out[tid] = {"memory_bytes": u.memory_bytes, "memory_peak_bytes": u.memory_peak_bytes,
                        "cpu_seconds": u.cpu_seconds, "pids": u.pids,
                        "block_read_bytes": u.block_read_bytes,
                        "block_write_bytes": u.block_write_bytes,
                        "net_rx_bytes": u.net_rx_bytes, "net_tx_bytes": u.net_tx_bytes,
                        "read_at": time.monotonic()}
    return out


async def cluster_usage(transfer: Transfer, by_node: dict[str, list[str]],
                        timeout: float = 1.0, listing: bool = False
                        ) -> dict[str, dict[str, Any]]:
    """Usage of running tasks on every node, asked concurrently; a node that does not answer
    within ``timeout`` contributes nothing. For a ``listing`` (`service ps`, `node ps`) it is
    then not asked again for USAGE_QUIET seconds: a listing must not hang on a dead or
    cut-off node, nor every listing in a row wait for it while gossip has not judged it yet
    (the autoscaler, which needs the samples, asks every node each time)."""
    store, me = transfer.ctx.store, transfer.ctx.identity
    if store is None or me is None:
        return {}
    snap = store.snapshot()
    out: dict[str, dict[str, Any]] = {}
    quiet = transfer.usage_quiet if listing else {}
    for gone in quiet.keys() - snap.nodes.keys():  # (removed nodes)
        del quiet[gone]

    async def ask(node_id: str, ids: list[str]) -> None:
        if node_id == me.node_id:  # (cgroup files: off the event loop, as the peers')
            out.update(await asyncio.to_thread(local_usage, transfer.runtime, ids))
            return
        node = snap.nodes.get(node_id)
        if node is None or quiet.get(node_id, -math.inf) > time.monotonic():
            return
        try:
            async with asyncio.timeout(timeout):
                resp = await transfer._request(node, "POST", "/v1/cluster/usage",
                                               {"task_ids": ids}, timeout=timeout)
                data = await resp.json()
                resp.release()
        except (ApiError, TimeoutError, ValueError, aiohttp.ClientError):
            quiet[node_id] = time.monotonic() + USAGE_QUIET
            return
        quiet.pop(node_id, None)
        if isinstance(data, dict):
            out.update({k: v for k, v in data.items() if k in ids})
    await asyncio.gather(*(ask(n, ids) for n, ids in by_node.items()))
    return out
