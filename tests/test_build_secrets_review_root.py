"""Build secrets for real, what review 96 checked: a secret's mount point made inside a cache
mount does not stay in the cache (an empty file on the node's disk, seen by every later RUN
that uses the cache); a RUN given more secret bytes than a task's files hold fails naming the
line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_runtime_images import BUSYBOX, busybox_rootfs
from test_runtime_support import needs_root

from shoal.runtime.build import Builder, BuildOptions
from shoal.runtime.process import ProcessController

pytest_plugins = ("test_runtime_support",)  # its fixtures
pytestmark = [
    needs_root,
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static"),
]


async def test_a_secret_mounted_inside_a_cache_leaves_no_stub_in_it(
        ctl: ProcessController, tmp_path: Path) -> None:
    """(failing before: the empty mount point stayed in the cache's directory)"""
    ctl.images.import_rootfs("base:1", busybox_rootfs(tmp_path / "rootfs"))
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        "FROM base:1\n"
        "RUN --mount=type=cache,target=/root --mount=type=secret,id=npmrc,"
        "target=/root/.npmrc test -s /root/.npmrc\n"
        "RUN --mount=type=cache,target=/root test ! -e /root/.npmrc\n")
    builder = Builder(ctl, ctl.images, tmp_path / "build")
    await builder.build(ctx, BuildOptions(secrets={"npmrc": b"token"}), lambda _: None)
    assert ctl.tasks() == {}


async def test_a_run_given_more_secret_bytes_than_a_task_takes_fails_naming_the_line(
        ctl: ProcessController, tmp_path: Path) -> None:
    """Nine secrets of 500 KiB (each within BuildKit's cap, the build's 64 within the
    request's) are more than a task's files may hold (4 MiB): a BuildError naming the line
    and the cap, never a value, and no task left."""
    from shoal.runtime.build import BuildError
    from shoal.runtime.buildmounts import MAX_SECRET

    ctl.images.import_rootfs("base:1", busybox_rootfs(tmp_path / "rootfs"))
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    flags = " ".join(f"--mount=type=secret,id=s{i}" for i in range(9))
    (ctx / "Dockerfile").write_text(f"FROM base:1\nRUN {flags} true\n")
    builder = Builder(ctl, ctl.images, tmp_path / "build")
    secrets = {f"s{i}": b"v" * MAX_SECRET for i in range(9)}
    with pytest.raises(BuildError, match=r"line 2: .*more than 4194304 bytes") as exc:
        await builder.build(ctx, BuildOptions(secrets=secrets), lambda _: None)
    assert "vvvv" not in str(exc.value)
    assert ctl.tasks() == {}
