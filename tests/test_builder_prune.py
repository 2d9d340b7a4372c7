"""`shoal builder prune` (runtime/buildcache.py, node/imageapi.py, cli/builder.py) on real
builds: the real runtime and image store, builds with RUN --mount=type=cache, the agent's
handler on a unix socket in this process and the CLI's client. What a user notices: without
-a only dangling cache goes (the steps of an image that was rebuilt, cache mounts) and the
cache of the image a tag names still hits; a cache mount a running build holds (locked) is
kept; -a takes every step record but leaves tagged images; `until` and `id` filters; bad
filter values are refused naming the filter; docker's output and question; the agent's
collector keeps the cache under its bound. The pure parts (filters, the choice, sizes) run
without root."""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from test_runtime_images import BUSYBOX, busybox_rootfs
from test_runtime_support import needs_root

from shoal.cli import builder as builder_cli
from shoal.cli import output
from shoal.cli.client import Client
from shoal.cli.errors import CliError
from shoal.node import imageapi
from shoal.node.api import _body as read_body
from shoal.node.api import error_middleware
from shoal.runtime import buildcache
from shoal.runtime.build import Builder, BuildOptions
from shoal.runtime.buildcache import MOUNT, STEP, Filters, Record, choose, parse_filters
from shoal.runtime.buildmounts import busy_caches, take_cache
from shoal.runtime.errors import BuildError
from shoal.runtime.process import ProcessController

pytest_plugins = ("test_runtime_support",)  # its fixtures

DOCKERFILE = """\
FROM base:1
RUN --mount=type=cache,target=/var/cache/dl,id=dl \\
    cat /bin/busybox > /var/cache/dl/blob && echo step > /step.txt
COPY a.txt /a.txt
CMD ["cat", "/a.txt"]
"""
HELD = """\
FROM base:1
RUN --mount=type=cache,target=/h,id=held,sharing=locked \\
    touch /h/x && while [ ! -e /h/go ]; do sleep 0.05; done && echo held > /held.txt
"""


def _args(*argv: str) -> Any:
    from shoal.cli.main import build_parser

    return build_parser().parse_args(["builder", "prune", *argv])


@pytest.fixture
async def api(ctl: ProcessController, tmp_path: Path) -> AsyncIterator[Client]:
    """The agent's builder_prune handler on a unix socket, over ``ctl``'s image store."""
    handler = imageapi.handlers(ctl.images, ctl, Any, set,  # type: ignore[arg-type]
                                read_body, Any)["builder_prune"]  # type: ignore[arg-type]
    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/v1/builder/prune", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = tmp_path / "api.sock"
    await web.UnixSite(runner, str(sock)).start()
    try:
        yield Client(f"unix://{sock}")
    finally:
        await runner.cleanup()


async def _cli(c: Client, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    await asyncio.to_thread(builder_cli.run, c, _args(*argv))
    return capsys.readouterr().out


def _deleted(out: str) -> set[str]:
    if not out.startswith("Deleted build cache objects:\n"):
        return set()
    return set(out.split("\n\n")[0].splitlines()[1:])


@needs_root
@pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static")
async def test_prune_takes_dangling_cache_keeps_what_tags_and_running_builds_use(
        ctl: ProcessController, api: Client, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    images = ctl.images
    images.import_rootfs("base:1", busybox_rootfs(tmp_path / "rootfs"))
    build_dir = images.root.parent / "build"  # (the agent's: DATA_DIR/build)
    builder = Builder(ctl, images, build_dir)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "a.txt").write_bytes(b"one\n" * 50000)
    lines: list[str] = []
    first = await builder.build(ctx, BuildOptions(tags=("app:1",)), lines.append)
    (ctx / "a.txt").write_bytes(b"two\n" * 50000)  # rebuilt: the old COPY and CMD dangle
    second = await builder.build(ctx, BuildOptions(tags=("app:1",)), lines.append)
    assert second.cached == 1 and second.image.id != first.image.id
    old_copy_layer = first.image.layers[-1]
    dl = build_dir / "cache" / buildcache_key("dl")
    assert (dl / "blob").stat().st_size == os.path.getsize(BUSYBOX)

    records = {r.id: r for r in buildcache.usage(images, build_dir)}
    steps = buildcache.StepCache(build_dir).load()
    dangling = {k for k, r in steps.items()  # (build 1's COPY and CMD: its layers)
                if images.inspect(r["image"]).layers == first.image.layers}
    assert len(steps) == 5 and len(dangling) == 2
    assert {k for k, r in records.items() if r.type == STEP and not r.shared} == dangling
    assert records[dl.name].type == MOUNT and records[dl.name].name == "dl"

    # a build holds a locked cache mount while `builder prune` runs
    hctx = tmp_path / "held"
    hctx.mkdir()
    (hctx / "Dockerfile").write_text(HELD)
    held_build = asyncio.ensure_future(builder.build(hctx, BuildOptions(tags=("held:1",)),
                                                     lines.append))
    held = build_dir / "cache" / buildcache_key("held")
    deadline = time.monotonic() + 30
    while not (held / "x").exists() or str(held) not in busy_caches():
        assert time.monotonic() < deadline and not held_build.done(), lines
        await asyncio.sleep(0.05)
    try:
        # no -f: docker's question; anything but y/yes removes nothing
        for argv, what in ((["-a"], "all build cache"), ([], "all dangling build cache")):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr("sys.stdin", io.StringIO("n\n"))
                capsys.readouterr()
                await asyncio.to_thread(builder_cli.run, api, _args(*argv))
            out, err = capsys.readouterr()
            assert out == "" and err == (f"WARNING! This will remove {what}.\nAre you sure "
                                         "you want to continue? [y/N] ")
        assert held.is_dir() and dl.is_dir()

        blobs_before = _blob_bytes(images)
        out = await _cli(api, capsys, "-f")  # (dangling only)
        assert _deleted(out) == dangling | {dl.name}, out
        reclaimed = out.rsplit("Total reclaimed space: ", 1)[1].strip()
        assert not dl.exists() and held.is_dir() and (held / "x").exists()
        assert not images.has_blob(old_copy_layer)  # (build 1's COPY layer: gone)
        assert images.inspect("app:1").id == second.image.id
        freed = blobs_before - _blob_bytes(images)
        assert freed >= 200_000 and reclaimed.endswith(("kB", "MB")), (freed, reclaimed)
        # -a while the build runs: its locked cache mount stays; and if a prune chose it
        # before the RUN took it, the RUN's hold still wins when the prune comes to take it
        out = await _cli(api, capsys, "-a", "-f", "--filter", "id=held")
        assert out == "Total reclaimed space: 0B\n" and held.is_dir()
        assert not take_cache(held, build_dir / "tmp" / "taken") and (held / "x").exists()
    finally:
        (held / "go").touch()
        await held_build
    assert (held / "go").exists() and str(held) not in busy_caches()

    # the cache of the tagged app:1 still hits (no -a kept it)
    third = await builder.build(ctx, BuildOptions(tags=("app:1",)), lines.append)
    assert (third.cached, third.image.id) == (3, second.image.id)

    # until: everything was used within the hour: nothing goes
    out = await _cli(api, capsys, "-a", "-f", "--filter", "until=1h")
    assert out == "Total reclaimed space: 0B\n"
    # bad filters: refused, naming the filter, nothing removed
    for bad, said in (("until=soon", "filter until: invalid value 'soon'"),
                      ("color=red", "filter 'color=red'"), ("id=", "filter id: empty")):
        with pytest.raises(CliError, match=said):
            await _cli(api, capsys, "-a", "-f", "--filter", bad)
    with pytest.raises(CliError, match="--keep-storage: invalid size"):
        await _cli(api, capsys, "-f", "--keep-storage", "lots")
    # id=: the cache mount of that id only (its build is over)
    out = await _cli(api, capsys, "-f", "--filter", "id=held")
    assert _deleted(out) == {held.name} and not held.exists()
    # -a: every step record; the tagged images stay, the next build runs every step
    out = await _cli(api, capsys, "-a", "-f")
    assert len(_deleted(out)) == 4  # (app:1's RUN, COPY, CMD; held:1's RUN)
    assert buildcache.StepCache(build_dir).load() == {}
    assert images.inspect("app:1").id == second.image.id and images.inspect("held:1")
    assert images.inspect("base:1")
    fourth = await builder.build(ctx, BuildOptions(), lines.append)
    assert fourth.cached == 0
    assert ctl.tasks() == {}


def buildcache_key(name: str) -> str:
    import hashlib

    return hashlib.sha256(name.encode()).hexdigest()[:32]


def _blob_bytes(images: Any) -> int:
    return sum(p.stat().st_size for p in (images.root / "blobs" / "sha256").iterdir())


# ------------------------------------------------------------------------ no root needed


def test_filters_take_durations_and_timestamps_and_name_a_bad_one() -> None:
    now = 1_700_000_000.0
    assert parse_filters(["until=1h30m"], now).until == now - 5400
    assert parse_filters(["until=90s", "until=2h"], now).until == now - 7200
    assert parse_filters(["until=2020-01-01T00:00:00Z"], now).until == 1577836800
    assert parse_filters(["until=2020-01-01T00:00:00"], now).until == time.mktime(
        (2020, 1, 1, 0, 0, 0, 0, 0, -1))  # (no zone: the node's local time, as docker's)
    assert parse_filters(["until=2020-01-01T02:00:00+02:00"], now).until == 1577836800
    assert parse_filters(["until=1577836800"], now).until == 1577836800
    assert parse_filters(["id=ab", "id=cd"], now).ids == ("ab", "cd")
    for bad, said in (("until=soon", "filter until: invalid value 'soon'"),
                      ("until=-1h", "filter until"), ("until=", "filter until: empty"),
                      ("type=regular", "filter 'type=regular': expected one of until, id"),
                      ("until", "filter 'until'")):
        with pytest.raises(BuildError, match=said) as exc:
            parse_filters([bad], now)
        assert exc.value.field == "filters"


def _rec(id: str, size: int, used: float, **kw: Any) -> Record:
    return Record(id=id, type=kw.pop("type", STEP), description="", size=size, created=0,
                  last_used=used, **kw)


def test_the_choice_never_takes_what_is_in_use_and_takes_shared_steps_only_with_all() -> None:
    recs = [_rec("a1", 10, 1), _rec("b2", 20, 2, shared=True), _rec("c3", 30, 3, in_use=True),
            _rec("d4", 40, 4, type=MOUNT, name="pip"), _rec("e5", 50, 5, type=MOUNT,
                                                           in_use=True)]
    assert [r.id for r in choose(recs)] == ["a1", "d4"]
    assert [r.id for r in choose(recs, all=True)] == ["a1", "b2", "d4"]
    assert [r.id for r in choose(recs, True, Filters(until=3.5))] == ["a1", "b2"]
    assert [r.id for r in choose(recs, True, Filters(ids=("pip", "b")))] == ["b2", "d4"]
    # keep_storage: least recently used first, until the whole cache (150) is <= the bound
    assert [r.id for r in choose(recs, True, keep_storage=125)] == ["a1", "b2"]
    assert [r.id for r in choose(recs, True, keep_storage=150)] == []
    assert [r.id for r in choose(recs, True, keep_storage=1)] == ["a1", "b2", "d4"]


def test_sizes_read_as_dockers_and_an_old_step_cache_is_read(tmp_path: Path) -> None:
    assert [output.decimal_size(n) for n in (0, 999, 1000, 1_116_000_000, 12_345)] == [
        "0B", "999B", "1kB", "1.116GB", "12.35kB"]
    (tmp_path / "cache.json").write_text('{"k1": "sha256:' + "a" * 64 + '"}')
    rec = buildcache.StepCache(tmp_path).load()["k1"]
    assert rec["image"] == "sha256:" + "a" * 64
    assert rec["used"] == rec["created"] == (tmp_path / "cache.json").stat().st_mtime


@needs_root
@pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static")
async def test_the_agents_collector_bounds_the_build_cache_least_recently_used_first(
        ctl: ProcessController, tmp_path: Path) -> None:
    """ImageGCConfig.build_cache_keep (`shoal agent --builder-gc-keep-storage`): under the
    bound nothing goes; over it, what was not used for min_age goes, least recently used
    first, dangling before shared; the tagged images stay."""
    from shoal.node.imagegc import ImageGC, build_cache_bound
    from shoal.runtime.images import ImageGCConfig

    images = ctl.images
    images.import_rootfs("base:1", busybox_rootfs(tmp_path / "rootfs"))
    build_dir = images.root.parent / "build"
    builder = Builder(ctl, images, build_dir)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    for text in (b"one\n", b"two\n"):
        (ctx / "a.txt").write_bytes(text * 50000)
        await builder.build(ctx, BuildOptions(tags=("app:1",)), print)
    records = buildcache.usage(images, build_dir)
    total = sum(r.size for r in records)
    dl = build_dir / "cache" / buildcache_key("dl")

    def gc(keep: int, min_age: float = 0.0) -> ImageGC:
        return ImageGC(images, ImageGCConfig(build_cache_keep=keep, min_age=min_age), set)

    assert await gc(total).build_cache_pass() == ([], 0)
    assert await gc(1, min_age=3600).build_cache_pass() == ([], 0)  # (all used just now)
    # just over: the least recently used record goes (the cache mount, let go in build 1)
    deleted, freed = await gc(total - 1).build_cache_pass()
    assert deleted == [dl.name] and freed >= os.path.getsize(BUSYBOX) and not dl.exists()
    # far over: every record that weighs anything, the shared ones last; the record of the
    # tagged app:1 itself (0 bytes: the image is kept anyway) stays, as do the tagged images
    deleted, _ = await gc(1).build_cache_pass()
    left = buildcache.StepCache(build_dir).load()
    assert len(deleted) == 4 and [r["image"] for r in left.values()] == [
        images.inspect("app:1").id]
    assert images.inspect("base:1")
    assert build_cache_bound(5, build_dir) == 5
    st = os.statvfs(build_dir)
    assert build_cache_bound(-1, build_dir) == \
        (st.f_blocks * st.f_frsize // 10 // 10**9 + 1) * 10**9


@needs_root
@pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static")
async def test_image_prune_leaves_the_build_cache_to_builder_prune(
        ctl: ProcessController, tmp_path: Path) -> None:
    """As Docker's `image prune` leaves BuildKit's cache: the untagged images the step cache
    records survive `image prune` (-a too), so the next build still hits every step; `builder
    prune -a` is what lets them go."""
    images = ctl.images
    images.import_rootfs("base:1", busybox_rootfs(tmp_path / "rootfs"))
    builder = Builder(ctl, images, images.root.parent / "build")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM base:1\nRUN echo one > /one\nRUN echo two > /two\n")
    first = await builder.build(ctx, BuildOptions(tags=("app:1",)), lambda _: None)
    assert first.cached == 0
    prune = imageapi.handlers(images, ctl, Any, set, read_body, Any)[  # type: ignore[arg-type]
        "image_prune"]
    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/v1/images/prune", prune)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = tmp_path / "api.sock"
    await web.UnixSite(runner, str(sock)).start()
    try:
        c = Client(f"unix://{sock}")
        out = await asyncio.to_thread(c.call, "POST", "/v1/images/prune", {})
        assert out["deleted"] == [], out  # (the step between base:1 and app:1 dangles)
        again = await builder.build(ctx, BuildOptions(tags=("app:2",)), lambda _: None)
        assert again.cached == 2 and again.image.id == first.image.id
        base = images.inspect("base:1").id
        out = await asyncio.to_thread(c.call, "POST", "/v1/images/prune", {"all": True})
        assert out["deleted"] == [base], out  # (-a: unused tagged images too, not the cache)
    finally:
        await runner.cleanup()
    steps = buildcache.StepCache(images.root.parent / "build").load()
    assert {r["image"] for r in steps.values()} <= {i.id for i in images.ls()}
