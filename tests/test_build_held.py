"""What the image GC pass, `image prune` and `builder prune` leave to a running build (the
images it stands on: runtime/heldimages.py, checked by ImageStore under its lock): a build
paused between two stages (its next FROM is being pulled) keeps its first stage's untagged
image and that image's own layer through all three, and finishes with the file the first
stage made. Runs without root: no RUN step (the pull is the pause; the runtime, a fake, runs
nothing)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shoal.node.imagegc import ImageGC
from shoal.runtime import buildcache
from shoal.runtime.build import Builder, BuildOptions
from shoal.runtime.images import ImageGCConfig, ImageInfo, ImageStore
from shoal.runtime.testing import FakeController

DOCKERFILE = """\
FROM base:1 AS first
COPY made.txt /made.txt
FROM remote:1
COPY --from=first /made.txt /copied.txt
"""


async def test_gc_pass_and_prunes_keep_the_images_a_running_build_stands_on(
        tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "os-release").write_text("base\n")
    store.import_rootfs("base:1", rootfs)
    build_dir = tmp_path / "build"
    paused, go = asyncio.Event(), asyncio.Event()

    async def pull(ref: str) -> ImageInfo:  # (the registry: answers when the test says)
        assert ref == "remote:1"
        paused.set()
        await go.wait()
        return await asyncio.to_thread(store.import_rootfs, "remote:1", rootfs)

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "made.txt").write_text("made by the first stage\n")
    builder = Builder(FakeController(), store, build_dir, pull=pull)
    job = asyncio.create_task(builder.build(ctx, BuildOptions(tags=("app:1",)), lambda _: None))
    await asyncio.wait_for(paused.wait(), 30)
    first = [i for i in store.ls() if not i.tags]
    assert len(first) == 1  # the first stage's COPY: untagged, with a layer of its own

    gc = ImageGC(store, ImageGCConfig(max_age=1e-6, min_age=0.0, build_cache_keep=0), set)
    await gc.pass_once()  # every unused image is over max_age
    await asyncio.to_thread(store.prune, False)  # `image prune` (dangling)
    await buildcache.prune(store, build_dir, all=True)  # `builder prune -a`
    assert [i.id for i in store.ls() if not i.tags] == [first[0].id]
    assert all(store.has_blob(d) for d in first[0].layers)

    go.set()
    result = await asyncio.wait_for(job, 60)
    top = store.layer_dirs(result.image)[0]
    assert (top / "copied.txt").read_text() == "made by the first stage\n"


async def test_a_build_that_ends_leaves_another_builds_images_held(tmp_path: Path) -> None:
    """Two builds at once, the second ending (failing) while the first waits for its pull,
    both holding nothing yet: the first's images stay held to its end (a set of equal
    content is not the same build's), and it ends without error."""
    store = ImageStore(tmp_path / "images")
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "os-release").write_text("remote\n")
    pulling: asyncio.Queue[str] = asyncio.Queue()
    go: dict[str, asyncio.Event] = {"remote:1": asyncio.Event(), "remote:2": asyncio.Event()}

    async def pull(ref: str) -> ImageInfo:
        pulling.put_nowait(ref)
        await go[ref].wait()
        return await asyncio.to_thread(store.import_rootfs, ref, rootfs)

    builder = Builder(FakeController(), store, tmp_path / "build", pull=pull)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "Dockerfile").write_text("FROM remote:1 AS one\nCOPY a.txt /a.txt\n"
                                      "FROM remote:2\nCOPY --from=one /a.txt /b.txt\n")
    (first / "a.txt").write_text("a\n")
    (second / "Dockerfile").write_text("FROM scratch\n")  # (nothing to build: fails)
    job = asyncio.create_task(builder.build(first, BuildOptions(tags=("app:1",)),
                                            lambda _: None))
    assert await asyncio.wait_for(pulling.get(), 30) == "remote:1"
    try:
        await builder.build(second, BuildOptions(), lambda _: None)
    except Exception as exc:  # (its own failure: not what this test checks)
        assert "nothing to build" in str(exc)
    go["remote:1"].set()
    assert await asyncio.wait_for(pulling.get(), 30) == "remote:2"
    one = [i.id for i in store.ls() if not i.tags]  # stage one's COPY
    assert {store.inspect("remote:1").id, *one} <= buildcache.held_images()
    go["remote:2"].set()
    result = await asyncio.wait_for(job, 60)
    assert result.image.tags and buildcache.held_images() == set()
