"""This node's images and the cluster's registries: the user API (``shoal image ...``,
``shoal registry login/logout``).

Owns: the handlers of ``/v1/images`` (ls, load/import, rm, tag, pull, push, build, prune,
the pulls in flight; a build's secrets: the body's first bytes, read into memory),
``/v1/builder/prune`` (the build cache: shoal.runtime.buildcache) and
``/v1/registries`` — taking each request apart, then the image store
(shoal.runtime.images, blocking: run in a thread), the registries (shoal.node.registries:
credentials, pulls, pushes) or the builder (shoal.runtime.build). Must not touch: the store's
files, Raft, other routes (shoal.node.api registers these with the rest).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import IO, TYPE_CHECKING, Any, cast

from aiohttp import web

from shoal.node.errors import BadRequest, NotFound, TooManyRequests
from shoal.node.registries import Registries
from shoal.runtime.controller import Controller
from shoal.runtime.errors import ImageError, ImageNotFound
from shoal.runtime.images import ImageStore

if TYPE_CHECKING:  # (image build's modules load at the first build: test_lazy_imports)
    from shoal.runtime.buildnet import RunNetwork

log = logging.getLogger("shoal.images")

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


# At most MAX_SAVES `image save`s at once, on a pool of threads of their own (not the loop's
# shared executor: a client that stops reading holds its thread, and the agent's other
# blocking work — mounts, health checks, blobs for peers, the feed — must never wait behind
# such threads); a write the client has not taken within SAVE_STALL seconds ends the save
MAX_SAVES = 4
SAVE_STALL = 300.0
_saves = concurrent.futures.ThreadPoolExecutor(MAX_SAVES, thread_name_prefix="image-save")


class _ToResponse:
    """A file the save thread writes the tar to: each write goes to the client from the
    event loop, and waits for it (the client's pace holds the thread back; TimeoutError
    after SAVE_STALL seconds)."""

    def __init__(self, resp: web.StreamResponse, loop: asyncio.AbstractEventLoop) -> None:
        self.resp, self.loop = resp, loop

    def write(self, data: bytes) -> int:
        sent = asyncio.run_coroutine_threadsafe(self.resp.write(bytes(data)), self.loop)
        try:
            sent.result(timeout=SAVE_STALL)
        except concurrent.futures.TimeoutError:
            sent.cancel()
            raise TimeoutError(f"the client took no data for {SAVE_STALL:.0f} s") from None
        return len(data)

    def flush(self) -> None:
        """(tarfile's stream mode flushes nothing itself)"""


#: the header of a build request whose body starts with its secrets (``--secret``): their
#: part's length in bytes; the build context's tar follows
SECRETS_HEADER = "X-Shoal-Build-Secrets"


async def _secrets_part(req: web.Request) -> bytes:
    """The first bytes of a build's body that ``SECRETS_HEADER`` says are its secrets, read
    into memory (never a file); b"" without the header. BadRequest for a bad length."""
    from shoal.runtime.buildmounts import MAX_SECRET, MAX_SECRETS

    text = req.headers.get(SECRETS_HEADER, "")
    if not text:
        return b""
    most = MAX_SECRETS * (MAX_SECRET * 4 // 3 + 200)  # (base64 and JSON around)
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= most:  # ("²" is a
        # digit to isdigit and no number to int)
        raise BadRequest(f"{SECRETS_HEADER} must be the secrets part's length (1 to {most} "
                         "bytes)", "secret")
    try:
        return await req.content.readexactly(int(text))
    except asyncio.IncompleteReadError:
        raise BadRequest("the body ended inside its secrets part", "secret") from None


def handlers(images: ImageStore, runtime: Controller, registries: Registries,
             wanted: Callable[[], set[str]], body: BodyReader, stream: Streamer,
             build_network: RunNetwork | None = None) -> dict[str, Handler]:
    """The handlers by operation id (shoal.node.openapi's route table); ``build_network``
    attaches a build's RUN steps to the node's task network (node/buildnet.py)."""
    saving = 0  # (image saves running)

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

    async def save(req: web.Request) -> web.StreamResponse:  # docker's `image save`
        nonlocal saving
        refs = (await body(req)).get("refs")
        if not isinstance(refs, list) or not refs or \
                not all(isinstance(r, str) and r for r in refs):
            raise BadRequest("refs must list image references", "refs")
        if saving >= MAX_SAVES:
            raise TooManyRequests(f"{MAX_SAVES} image saves are running on this node: try "
                                  "again when one is done", retry_after=5)
        saving += 1
        try:
            return await _save(req, refs)
        finally:
            saving -= 1

    async def _save(req: web.Request, refs: list[str]) -> web.StreamResponse:
        from shoal.runtime import imagesave  # (imported by a save: an idle agent never runs it)
        loop = asyncio.get_running_loop()
        try:  # (every layer read now: an error is still a reply)
            archive = await loop.run_in_executor(_saves, imagesave.plan, images, refs,
                                                 registries.platform())
        except ImageNotFound as exc:
            raise NotFound(str(exc), "refs") from None
        except (ImageError, OSError) as exc:
            raise BadRequest(f"cannot read the image: {exc}", "refs") from None
        resp = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
        await resp.prepare(req)
        whole = False
        try:
            await loop.run_in_executor(_saves, imagesave.write, images, archive,
                                       cast(IO[bytes], _ToResponse(resp, loop)))
            whole = True
        except (ImageError, OSError) as exc:  # (TimeoutError too: a client that stalled)
            log.warning("image save %s stopped: %s", " ".join(refs), exc)
            return resp
        finally:
            # once the reply has started, no error reply can follow (node/api.py's
            # middleware would write one into the body): the connection is cut before the
            # chunked body's end, so the client sees a cut archive, never a whole-looking one
            if not whole and req.transport is not None:
                req.transport.abort()
        await resp.write_eof()
        return resp

    async def build(req: web.Request) -> web.StreamResponse:  # (runtime/build.py)
        from shoal.runtime import build as build_mod
        from shoal.runtime import buildrequest
        from shoal.runtime.buildmounts import read_secrets

        try:
            opts = buildrequest.options_from_query(req.query)
            opts.secrets = read_secrets(await _secrets_part(req))
        except build_mod.BuildError as exc:
            raise BadRequest(str(exc), exc.field) from None
        builder = build_mod.Builder(runtime, images, images.root.parent / "build",
                                    pull=buildrequest.puller(registries),
                                    network=build_network)
        try:
            ctx = await buildrequest.receive_context(builder, req.content)
        except (build_mod.ImageError, OSError, ValueError) as exc:  # (tarfile's too)
            raise BadRequest(f"bad build context (expected a tar): {exc}", "body") from None
        return await stream(req, buildrequest.stream_build(
            builder, ctx, opts, cleanup=True,
            gone=lambda: req.transport is None or req.transport.is_closing()))

    async def builder_prune(req: web.Request) -> Any:  # (runtime/buildcache.py)
        from shoal.runtime import buildcache

        b = await body(req)
        every, items, keep = b.get("all", False), b.get("filters", []), b.get("keep_storage", 0)
        if not isinstance(every, bool):
            raise BadRequest("all must be true or false", "all")
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise BadRequest("filters must list KEY=VALUE strings", "filters")
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
            raise BadRequest("keep_storage must be a number of bytes (0 or more)",
                             "keep_storage")
        try:
            filters = buildcache.parse_filters(items)
        except buildcache.BuildError as exc:
            raise BadRequest(str(exc), exc.field) from None
        res = await buildcache.prune(images, images.root.parent / "build", every, filters,
                                     keep, wanted())
        return res.view()

    async def pulls(_: web.Request) -> Any:
        return registries.pulls()

    async def prune(req: web.Request) -> Any:
        b = await body(req)
        keep = wanted() | await build_cache_images()
        return await asyncio.to_thread(images.prune, bool(b.get("all")), b.get("until"), keep)

    async def build_cache_images() -> set[str]:
        """The images the build cache records (its steps' results) and running builds stand
        on: `image prune` leaves them, as Docker's leaves BuildKit's cache — `builder prune`
        and the build cache's bound remove them. A node that never built loads none of it."""
        build_dir = images.root.parent / "build"
        if not build_dir.exists():
            return set()
        from shoal.runtime import buildcache  # (image build's: an idle agent never loads it)

        steps = await asyncio.to_thread(buildcache.StepCache(build_dir).load)
        return {rec["image"] for rec in steps.values()} | buildcache.held_images()

    async def login(req: web.Request) -> Any:
        return await registries.login(await body(req))

    async def logout(req: web.Request) -> Any:
        return await registries.logout(req.match_info["ref"])

    return {"image_ls": ls, "image_inspect": inspect, "image_load": load, "image_rm": rm,
            "image_tag": tag, "image_save": save,
            "image_pull": pull, "image_push": push, "image_pulls": pulls,
            "image_prune": prune, "image_build": build, "builder_prune": builder_prune,
            "registry_login": login,
            "registry_logout": logout}


__all__ = ["handlers", "image_detail", "image_view", "image_views"]
