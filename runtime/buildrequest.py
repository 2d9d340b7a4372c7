"""A build as the agent's API serves it: the request's options, its context, its output.

Owns: ``BuildOptions`` from the API's query (``options_from_query``: BuildError names the bad
field), the FROM fallback to the node's registries (``puller``), the build context received
from the request body (``receive_context``: unpacked safely under ``DATA_DIR/build/tmp``) and
the build's output as a stream of records that ends the build if its client goes away
(``stream_build``). Must not touch: the steps of a build (shoal.runtime.build's Builder), the
HTTP side (node/imageapi.py reads the request and writes the stream).
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from shoal.runtime.build import Builder, BuildOptions, Pull
from shoal.runtime.buildnet import check_network
from shoal.runtime.buildstages import STAGE_NAME
from shoal.runtime.errors import BuildError, ImageError
from shoal.runtime.images import ImageInfo

GONE_POLL = 0.5  # seconds between two looks at whether a build's client is still there


def options_from_query(query: Any) -> BuildOptions:
    """BuildOptions from the API's query (``t``, ``dockerfile``, ``buildarg``, ``nocache``,
    ``label``, ``network``, ``target``), a MultiDict; BuildError names the bad field."""
    from shoal.runtime.images import normalize_ref

    tags = tuple(query.getall("t", []))
    for tag in tags:
        try:
            normalize_ref(tag)
        except (ImageError, ValueError) as exc:
            raise BuildError(f"bad tag {tag!r}: {exc}", field="t") from None
    dockerfile = query.get("dockerfile") or "Dockerfile"
    norm = posixpath.normpath(dockerfile)
    if norm.startswith(("/", "..")):
        raise BuildError("dockerfile must be a path inside the context", field="dockerfile")
    args: dict[str, str] = {}
    for item in query.getall("buildarg", []):
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"\w+", key):
            raise BuildError(f"expected K=V, got {item!r}", field="buildarg")
        args[key] = value
    labels: dict[str, str] = {}
    for item in query.getall("label", []):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BuildError(f"expected K=V, got {item!r}", field="label")
        labels[key] = value
    target = query.get("target") or ""
    if target and not STAGE_NAME.fullmatch(target.lower()):
        raise BuildError(f"{target!r} is not a stage name (a letter, then letters, digits, "
                         "'.', '_' or '-')", field="target")
    return BuildOptions(tags=tags, dockerfile=norm, build_args=args,
                        no_cache=query.get("nocache") == "1", labels=labels,
                        network=check_network(query.get("network", ""), "network"),
                        target=target)


def puller(registries: Any) -> Pull | None:
    """The FROM fallback: pull through the node's registries (shoal.node.registries) when the
    reference names a registry host."""
    if registries is None:
        return None

    async def pull(ref: str) -> ImageInfo:
        if not registries.pullable(ref):
            raise BuildError(f"no image {ref} on this node (and it names no registry to pull "
                             "from)")
        info: ImageInfo = await registries.pull(ref, stored_creds=True)
        return info

    return pull


async def receive_context(builder: Builder, content: Any) -> Path:
    """The build context from a request body stream (a tar, as `docker build` sends it),
    unpacked safely (no absolute paths, no ``..``, no path through a symlink) into a fresh
    directory under ``DATA_DIR/build/tmp``."""
    import asyncio

    from shoal.runtime.layers import extract_layer

    fd, tarpath = tempfile.mkstemp(dir=builder.tmp, prefix="ctx-", suffix=".tar")
    ctx = Path(tempfile.mkdtemp(dir=builder.tmp, prefix="ctx-"))
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in content.iter_chunked(1 << 20):
                out.write(chunk)

        def unpack() -> None:
            try:
                with open(tarpath, "rb") as fh:
                    extract_layer(fh, ctx)
            except tarfile.TarError as exc:
                raise BuildError(f"the build context is not a tar: {exc}") from None

        await asyncio.to_thread(unpack)
    except BaseException:
        shutil.rmtree(ctx, ignore_errors=True)
        raise
    finally:
        os.unlink(tarpath)
    return ctx


async def stream_build(builder: Builder, ctx: Path, opts: BuildOptions, cleanup: bool = False,
                       gone: Callable[[], bool] | None = None
                       ) -> AsyncIterator[dict[str, Any]]:
    """Run a build, yielding ``{"stream": line}`` records as it goes and finally
    ``{"image", "tags", "steps", "cached", "layers_created", "images_created"}`` or
    ``{"error", "line"}``; ``cleanup``: remove ``ctx`` at the end. ``gone()``: whether the
    client went away, looked at every GONE_POLL seconds while no record comes (a RUN that
    prints nothing: writing is not how the client's leaving would be noticed) — then the
    build is cancelled (its RUN removed, its address released) and the stream ends."""
    import asyncio

    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def work() -> None:
        try:
            res = await builder.build(ctx, opts, lambda s: queue.put_nowait({"stream": s}))
            queue.put_nowait({"image": res.image.id, "tags": list(res.image.tags),
                              "steps": res.steps, "cached": res.cached,
                              "layers_created": res.layers_created,
                              "images_created": res.images_created})
        except BuildError as exc:
            queue.put_nowait({"error": str(exc), "line": exc.line})
        except (ImageError, OSError) as exc:
            queue.put_nowait({"error": str(exc), "line": 0})
        except Exception as exc:  # a builder's bug: said, not a stream ended without a word
            logging.getLogger(__name__).exception("image build failed")
            queue.put_nowait({"error": f"internal error: {type(exc).__name__}: {exc}",
                              "line": 0})
        finally:
            queue.put_nowait(None)

    job = asyncio.ensure_future(work())
    try:
        while True:
            try:
                async with asyncio.timeout(GONE_POLL if gone is not None else None):
                    rec = await queue.get()
            except TimeoutError:
                if gone is not None and gone():
                    return  # (the finally cancels the build)
                continue
            if rec is None:
                break
            yield rec
    finally:
        if not job.done():
            job.cancel()
            with contextlib.suppress(BaseException):
                await job
        if cleanup:
            import asyncio as _asyncio

            await _asyncio.to_thread(shutil.rmtree, ctx, ignore_errors=True)
