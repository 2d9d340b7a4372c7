"""This node's images and the cluster's registries: the user API (``shoal image ...``,
``shoal registry login/logout``).

Owns: the handlers of ``/v1/images`` (ls, load/import, rm, tag, pull, push, build, prune,
the pulls in flight) and ``/v1/registries`` — taking each request apart, then the image store
(shoal.runtime.images, blocking: run in a thread), the registries (shoal.node.registries:
credentials, pulls, pushes) or the builder (shoal.runtime.build). Must not touch: the store's
files, Raft, other routes (shoal.node.api registers these with the rest).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from shoal.node.errors import BadRequest, NotFound
from shoal.node.registries import Registries
from shoal.runtime.controller import Controller
from shoal.runtime.errors import ImageError, ImageNotFound
from shoal.runtime.images import ImageStore

Handler = Callable[[web.Request], Awaitable[Any]]
BodyReader = Callable[[web.Request], Awaitable[dict[str, Any]]]
Streamer = Callable[[web.Request, AsyncIterator[dict[str, Any]]],
                    Awaitable[web.StreamResponse]]


def image_view(info: Any) -> dict[str, Any]:
    return {"id": info.id, "tags": list(info.tags), "layers": len(info.layers),
            "size": info.size}


def image_views(images: ImageStore) -> list[dict[str, Any]]:
    return [image_view(i) for i in images.ls()]


def image_detail(info: Any) -> dict[str, Any]:
    return {"id": info.id, "tags": list(info.tags), "layers": list(info.layers),
            "size": info.size, "config": info.config.to_json()}


def _ref(body: dict[str, Any], name: str, required: bool = True) -> str:
    value = body.get(name, "")
    if not isinstance(value, str) or (required and not value):
        raise BadRequest(f"{name} must be an image reference", name)
    return value


def handlers(images: ImageStore, runtime: Controller, registries: Registries,
             wanted: Callable[[], set[str]], body: BodyReader, stream: Streamer
             ) -> dict[str, Handler]:
    """The handlers by operation id (shoal.node.openapi's route table)."""

    async def ls(_: web.Request) -> Any:
        return await asyncio.to_thread(image_views, images)

    async def load(req: web.Request) -> Any:
        b = await body(req)
        path = b.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise BadRequest("path must be an absolute path to the tarball", "path")
        ref = b.get("ref")
        try:
            if ref:
                return [image_view(await asyncio.to_thread(images.import_rootfs, str(ref),
                                                           path))]
            return [image_view(i) for i in await asyncio.to_thread(images.load, path)]
        except (OSError, ValueError, RuntimeError) as exc:
            raise BadRequest(f"cannot load {path}: {exc}", "path") from None

    async def inspect(req: web.Request) -> Any:
        try:
            return image_detail(await asyncio.to_thread(images.inspect, req.match_info["ref"]))
        except ImageNotFound as exc:
            raise NotFound(str(exc), "image") from None

    async def rm(req: web.Request) -> Any:
        try:
            await asyncio.to_thread(images.rm, req.match_info["ref"])
        except (OSError, ValueError, RuntimeError) as exc:
            raise BadRequest(str(exc), "image") from None
        return {"removed": req.match_info["ref"]}

    async def tag(req: web.Request) -> Any:  # docker's `image tag SOURCE TARGET`
        b = await body(req)
        source, target = _ref(b, "source"), _ref(b, "target")
        try:
            return image_view(await asyncio.to_thread(images.tag, source, target))
        except ImageNotFound as exc:
            raise NotFound(str(exc), "source") from None
        except ImageError as exc:  # (the target: no image name, or a digest)
            raise BadRequest(str(exc), "target") from None

    async def pull(req: web.Request) -> Any:
        ref = (await body(req)).get("ref")
        if not isinstance(ref, str) or not registries.pullable(ref):
            raise BadRequest("ref must name its registry: HOST[:PORT]/PATH[:TAG]", "ref")
        return image_view(await registries.pull(ref, stored_creds=True))

    async def push(req: web.Request) -> Any:
        b = await body(req)
        return await registries.push(_ref(b, "ref"), _ref(b, "target", required=False))

    async def build(req: web.Request) -> web.StreamResponse:  # (runtime/build.py)
        from shoal.runtime import build as build_mod

        try:
            opts = build_mod.options_from_query(req.query)
        except build_mod.BuildError as exc:
            raise BadRequest(str(exc), exc.field) from None
        builder = build_mod.Builder(runtime, images, images.root.parent / "build",
                                    pull=build_mod.puller(registries))
        try:
            ctx = await build_mod.receive_context(builder, req.content)
        except (build_mod.ImageError, OSError, ValueError) as exc:  # (tarfile's too)
            raise BadRequest(f"bad build context (expected a tar): {exc}", "body") from None
        return await stream(req, build_mod.stream_build(builder, ctx, opts, cleanup=True))

    async def pulls(_: web.Request) -> Any:
        return registries.pulls()

    async def prune(req: web.Request) -> Any:
        b = await body(req)
        return await asyncio.to_thread(images.prune, bool(b.get("all")), b.get("until"),
                                       wanted())

    async def login(req: web.Request) -> Any:
        return await registries.login(await body(req))

    async def logout(req: web.Request) -> Any:
        return await registries.logout(req.match_info["ref"])

    return {"image_ls": ls, "image_inspect": inspect, "image_load": load, "image_rm": rm,
            "image_tag": tag,
            "image_pull": pull, "image_push": push, "image_pulls": pulls,
            "image_prune": prune, "image_build": build, "registry_login": login,
            "registry_logout": logout}


__all__ = ["handlers", "image_detail", "image_view", "image_views"]
