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
    real = imagesave.write

    def failing(store: ImageStore, archive: Any, out: Any) -> None:
        class Half:
            sent = 0

            def write(self, data: bytes) -> int:
                if self.sent > 1 << 20:
                    raise OSError(5, "Input/output error")
                self.sent += len(data)
                return int(out.write(data))

        real(store, archive, Half())  # type: ignore[arg-type]

    monkeypatch.setattr(imagesave, "write", failing)
    with pytest.raises(CliError, match="stopped sending"):
        await asyncio.to_thread(client.download, "/v1/images/save", {"refs": ["app:1"]},
                                io.BytesIO())
    target = tmp_path / "out.tar"
    args = argparse.Namespace(output=str(target), refs=["app:1"])
    with pytest.raises(CliError, match="stopped sending"):
        await asyncio.to_thread(run_save, client, args)
    assert not target.exists() and not Path(f"{target}.part").exists()
