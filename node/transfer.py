"""Node-to-node data transfer over mTLS: image blobs and task logs.

Owns: pulling an image this node lacks from a peer that has it (content-addressed blobs,
each verified by digest on import, then the image committed locally), and fetching or
following the logs of a task that runs on another node (for `shoal service logs`). Both
ride the cluster's node API (TCP, mutual TLS with the cluster CA; the server is pinned to
the node id it must be, and only cluster members are served). Must not touch: the store
(it reads snapshots), the runtime's internals (it uses the ImageStore blob API and the
Controller's read_logs/follow_logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from shoal.node import pki
from shoal.node.context import NodeContext
from shoal.node.errors import ApiError, NotFound, Unavailable
from shoal.node.security import Security
from shoal.raft.models import Node, NodeState
from shoal.runtime.controller import Controller
from shoal.runtime.images import ImageStore

log = logging.getLogger("shoal.transfer")


class Transfer:
    def __init__(self, ctx: NodeContext, security: Security, runtime: Controller,
                 images: ImageStore) -> None:
        self.ctx = ctx  # identity, the state source, the HTTP session (shoal.node.context)
        self.security = security
        self.runtime = runtime
        self.images = images
        self._pulls: dict[str, asyncio.Future[None]] = {}

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
            image_id, tags = str(info["id"]), [str(t) for t in info.get("tags", [])]
            started = time.monotonic()
            for _ in range(1000):  # manifest first, then its layers
                needed = await asyncio.to_thread(store.blobs_needed, image_id)
                if not needed:
                    break
                for digest in needed:
                    await self._fetch_blob(node, digest)
            await asyncio.to_thread(store.commit, image_id, tags)
            log.info("pulled image %s (%s) from %s in %.2fs", ref, image_id[:19],
                     node.hostname, time.monotonic() - started)
            return
        raise last

    async def _fetch_blob(self, node: Node, digest: str) -> None:
        store = self.images
        resp = await self._request(node, "GET", f"/v1/cluster/images/blobs/{digest}",
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

    # served to peers (authorised by the API: a member's certificate)
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


async def service_logs(transfer: Transfer, service_id: str, tail: int | None,
                       since: float | None, timestamps: bool, follow: bool
                       ) -> AsyncIterator[dict[str, Any]]:
    """Logs of every task of service ``service_id`` across the cluster, merged: records
    {task, name, node, ts, stream, line}. Without ``follow`` they are sorted by time; with
    it, they stream as they arrive (new tasks started meanwhile are picked up)."""
    ctx = transfer.ctx
    me = ctx.node_id
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=10000)
    started: set[str] = set()
    workers: list[asyncio.Task[None]] = []

    async def pump(task_id: str, name: str, node: Node | None) -> None:
        try:
            if node is None or node.id == me:
                src = local_logs(transfer.runtime, task_id, tail, since, timestamps, follow)
            else:
                src = transfer.remote_logs(node, task_id, tail, since, timestamps,
                                                 follow)
            async for rec in src:
                await queue.put({"task": task_id, "name": name,
                                 "node": node.hostname if node else "", **rec})
        except ApiError as exc:
            log.debug("logs of %s unavailable: %s", task_id, exc.message)
        finally:
            await queue.put(None)

    def start_new() -> int:
        s = ctx.require_manager().snapshot()
        n = 0
        for t in s.tasks_of(service_id):
            if t.id in started or not t.node_id:
                continue
            started.add(t.id)
            workers.append(asyncio.create_task(pump(t.id, t.name, s.nodes.get(t.node_id))))
            n += 1
        return n

    pending = start_new()
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
        while True:
            try:
                rec = await asyncio.wait_for(queue.get(), 1.0)
            except TimeoutError:
                pending += start_new()
                continue
            if rec is not None:
                yield rec
    finally:
        for w in workers:
            w.cancel()


# ---------------------------------------------------------------------------- task usage
def local_usage(runtime: Controller, task_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Resource use of tasks running on this node (from their cgroups)."""
    out: dict[str, dict[str, Any]] = {}
    for tid in task_ids:
        u = runtime.usage(tid)
        if u is not None:
            out[tid] = {"memory_bytes": u.memory_bytes, "memory_peak_bytes": u.memory_peak_bytes,
                        "cpu_seconds": u.cpu_seconds, "pids": u.pids}
    return out


async def cluster_usage(transfer: Transfer, by_node: dict[str, list[str]],
                        timeout: float = 1.0) -> dict[str, dict[str, Any]]:
    """Usage of running tasks on every node, asked concurrently; a node that does not answer
    within ``timeout`` contributes nothing (the listing must not hang on a dead node)."""
    store, me = transfer.ctx.store, transfer.ctx.identity
    if store is None or me is None:
        return {}
    snap = store.snapshot()
    out: dict[str, dict[str, Any]] = {}

    async def ask(node_id: str, ids: list[str]) -> None:
        if node_id == me.node_id:
            out.update(local_usage(transfer.runtime, ids))
            return
        node = snap.nodes.get(node_id)
        if node is None:
            return
        with contextlib.suppress(ApiError, TimeoutError, ValueError, aiohttp.ClientError):
            async with asyncio.timeout(timeout):
                resp = await transfer._request(node, "POST", "/v1/cluster/usage",
                                                     {"task_ids": ids}, timeout=timeout)
                data = await resp.json()
                resp.release()
                if isinstance(data, dict):
                    out.update({k: v for k, v in data.items() if k in ids})
    await asyncio.gather(*(ask(n, ids) for n, ids in by_node.items()))
    return out
