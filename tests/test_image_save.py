"""`image save` through the agent's API and the CLI's client (node/imageapi.py, cli/client.py
``download``, cli/registry.py ``run_save``): the archive streams as it is written; an image
that is not there is a clear error before any byte; a save the agent cannot finish is cut
short so the CLI says so and keeps no partial file. An aiohttp server on a unix socket in
this process, the real handlers and image store (no root, no network). Each test names the
property it checks; the archive's contents and what docker, skopeo and `image load` make of
it: tests/test_registry.py."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from shoal.cli.client import Client
from shoal.cli.errors import CliError
from shoal.cli.registry import run_save
from shoal.node import imageapi
from shoal.node.api import _body as read_body
from shoal.node.api import error_middleware
from shoal.runtime import imagesave
from shoal.runtime.errors import ImageNotFound
from shoal.runtime.images import ImageStore


class _Registries:
    def platform(self) -> tuple[str, str, str]:
        return ("linux", "amd64", "")


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[Client, ImageStore]]:
    store = ImageStore(tmp_path / "images")
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "big").write_bytes(bytes(range(256)) * 16384)  # (4 MiB: many writes)
    await asyncio.to_thread(store.import_rootfs, "app:1", rootfs)
    handler = imageapi.handlers(store, Any, _Registries(), set,  # type: ignore[arg-type]
                                read_body, Any)["image_save"]  # type: ignore[arg-type]
    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/v1/images/save", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = tmp_path / "api.sock"
    await web.UnixSite(runner, str(sock)).start()
    try:
        yield Client(f"unix://{sock}"), store
    finally:
        await runner.cleanup()


def _fail_after_a_megabyte(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """The agent's save raises ``error`` once it has written the first megabyte."""
    real = imagesave.write

    def failing(store: ImageStore, archive: Any, out: Any) -> None:
        class Half:
            sent = 0

            def write(self, data: bytes) -> int:
                if self.sent > 1 << 20:
                    raise error
                self.sent += len(data)
                return int(out.write(data))

        real(store, archive, Half())  # type: ignore[arg-type]

    monkeypatch.setattr(imagesave, "write", failing)


async def test_the_archive_streams_whole_and_equals_a_local_save(
        agent: tuple[Client, ImageStore], tmp_path: Path) -> None:
    client, store = agent
    got = io.BytesIO()
    size = await asyncio.to_thread(client.download, "/v1/images/save", {"refs": ["app:1"]},
                                   got)
    local = io.BytesIO()
    imagesave.save(store, ["app:1"], local, ("linux", "amd64", ""))
    assert size == len(got.getvalue()) == len(local.getvalue()) > 4 << 20
    assert got.getvalue() == local.getvalue()


async def test_an_image_that_is_not_there_is_an_error_before_any_byte(
        agent: tuple[Client, ImageStore]) -> None:
    client, _ = agent
    out = io.BytesIO()
    with pytest.raises(CliError, match="nope") as err:
        await asyncio.to_thread(client.download, "/v1/images/save",
                                {"refs": ["app:1", "nope:1"]}, out)
    assert err.value.field == "refs" and out.getvalue() == b""
    with pytest.raises(CliError, match="refs must list"):
        await asyncio.to_thread(client.download, "/v1/images/save", {"refs": []}, out)


async def test_a_save_cut_midway_is_an_error_and_leaves_no_file(
        agent: tuple[Client, ImageStore], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent fails after the first megabyte (a blob gone, a disk error): the client
    must not take the bytes it got for a whole archive (before: aiohttp would have ended
    the chunked body as if complete)."""
    client, _ = agent
    _fail_after_a_megabyte(monkeypatch, OSError(5, "Input/output error"))
    with pytest.raises(CliError, match="stopped sending"):
        await asyncio.to_thread(client.download, "/v1/images/save", {"refs": ["app:1"]},
                                io.BytesIO())
    target = tmp_path / "out.tar"
    args = argparse.Namespace(output=str(target), refs=["app:1"])
    with pytest.raises(CliError, match="stopped sending"):
        await asyncio.to_thread(run_save, client, args)
    assert not target.exists() and not Path(f"{target}.part").exists()


async def test_a_failure_of_any_kind_midway_cuts_the_stream(
        agent: tuple[Client, ImageStore], monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug (not an I/O error) after the reply started: still a cut stream, never an
    error reply written into the archive's body by the API's middleware."""
    client, _ = agent
    _fail_after_a_megabyte(monkeypatch, ValueError("a bug"))
    with pytest.raises(CliError, match="stopped sending"):
        await asyncio.to_thread(client.download, "/v1/images/save", {"refs": ["app:1"]},
                                io.BytesIO())


async def test_a_client_that_stops_reading_holds_no_thread_for_long_and_saves_are_bounded(
        agent: tuple[Client, ImageStore], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Saves run on a small pool of their own (never the loop's shared executor, which the
    agent's other blocking work needs); one more than MAX_SAVES is told to retry (429); a
    client that takes no data for SAVE_STALL seconds ends its save, and its place is free
    again."""
    client, _ = agent
    monkeypatch.setattr(imageapi, "MAX_SAVES", 1)
    monkeypatch.setattr(imageapi, "SAVE_STALL", 0.5)
    reader, writer = await asyncio.open_unix_connection(client.path)
    request = b'{"refs": ["app:1"]}'
    writer.write(b"POST /v1/images/save HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(request), request))
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")  # (then never reads on)
    with pytest.raises(CliError, match="image saves are running"):
        await asyncio.to_thread(client.download, "/v1/images/save", {"refs": ["app:1"]},
                                io.BytesIO())
    ok = False
    for _ in range(50):  # (the stalled save ends within SAVE_STALL of its last write)
        await asyncio.sleep(0.2)
        try:
            await asyncio.to_thread(client.download, "/v1/images/save", {"refs": ["app:1"]},
                                    io.BytesIO())
            ok = True
            break
        except CliError:
            continue
    writer.close()
    assert ok, "the stalled save never gave its place back"


async def test_save_refuses_outputs_it_would_replace_and_writes_through_a_link(
        agent: tuple[Client, ImageStore], tmp_path: Path) -> None:
    """-o a directory, a device or a FIFO is refused before anything is asked (before: the
    archive was renamed over /dev/null as a regular file); -o a symbolic link writes its
    target; an output the CLI cannot write is its own error, not the agent's."""
    import os

    client, _ = agent
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for bad in (tmp_path, fifo, Path("/dev/null")):
        with pytest.raises(CliError, match="not a regular file"):
            run_save(client, argparse.Namespace(output=str(bad), refs=["app:1"]))
    target, link = tmp_path / "real.tar", tmp_path / "link.tar"
    link.symlink_to(target)
    await asyncio.to_thread(run_save, client, argparse.Namespace(output=str(link),
                                                                 refs=["app:1"]))
    assert link.is_symlink() and target.stat().st_size > 4 << 20

    class Full(io.BytesIO):
        def write(self, data: Any) -> int:
            raise OSError(28, "No space left on device")

    with pytest.raises(CliError, match="cannot write the output after 0 bytes: No space"):
        await asyncio.to_thread(client.download, "/v1/images/save", {"refs": ["app:1"]},
                                Full())


def test_a_repository_named_without_a_tag_saves_every_tag_of_it(tmp_path: Path) -> None:
    """docker save's rule: ``app`` is every ``app:*`` the node has (not only ``app:latest``,
    which need not exist), ``app:1`` that tag alone; another repository's tags stay out."""
    store = ImageStore(tmp_path / "images")
    for n, ref in enumerate(("app:1", "app:2", "apple:1")):
        rootfs = tmp_path / f"rootfs{n}"
        (rootfs / "etc").mkdir(parents=True)
        (rootfs / "etc" / "which").write_text(ref)
        store.import_rootfs(ref, rootfs)
    store.tag("app:1", "reg.example:5000/app:9")  # (another registry: another repository)

    def names(refs: list[str]) -> list[str]:
        archive = imagesave.plan(store, refs, ("linux", "amd64", ""))
        return sorted(n for ns in archive.names.values() for n in ns)

    assert names(["app"]) == ["app:1", "app:2"]
    assert names(["app:2"]) == ["app:2"]
    assert names(["docker.io/library/app"]) == ["app:1", "app:2"]
    assert names(["app", "apple"]) == ["app:1", "app:2", "apple:1"]
    with pytest.raises(ImageNotFound):
        imagesave.plan(store, ["nothere"])
    # a repository the node holds by digest alone (pulled as NAME@sha256:…): its image goes
    # in, unnamed (docker's RepoTags cannot hold a digest reference)
    apple = store.inspect("apple:1")
    store.commit(apple.id, [f"pinned@{apple.id}"])  # (as a pull by digest names it)
    archive = imagesave.plan(store, ["pinned"], ("linux", "amd64", ""))
    assert list(archive.images) == [apple.id]
    out = io.BytesIO()
    imagesave.write(store, archive, out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert [m["RepoTags"] for m in manifest] == [[]]
