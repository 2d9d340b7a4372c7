"""Build secrets (``--secret``, ``RUN --mount=type=secret``) for real: a RUN reads the secret
as a file and as a variable and stores only its hash; the secret's bytes are in no layer
tar, no file of the image, not its config or history, not the build's output, not the step
cache, not the node's build directory; a changed secret does not rebuild (BuildKit's); a
required one that was not given fails naming the line, another is skipped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from test_runtime_images import BUSYBOX, busybox_rootfs
from test_runtime_support import needs_root

from shoal.runtime.build import Builder, BuildError, BuildOptions
from shoal.runtime.process import ProcessController

pytest_plugins = ("test_runtime_support",)  # its fixtures
pytestmark = [
    needs_root,
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static"),
]

SECRET = b"tok-4f9c1e-very-secret-bytes\n"

DOCKERFILE = """\
FROM base:1
RUN adduser -D -u 1000 app 2>/dev/null || echo "app:x:1000:1000::/:/bin/sh" >> /etc/passwd
RUN --mount=type=secret,id=npmrc cat /run/secrets/npmrc > /dev/null \\
    && test -s /run/secrets/npmrc && sha256sum /run/secrets/npmrc | cut -d' ' -f1 > /h1 \\
    && stat -c '%a %u' /run/secrets/npmrc > /mode1
RUN --mount=type=secret,id=npmrc,target=/home/app/.npmrc,uid=1000,mode=0440,required=true \\
    su app -s /bin/sh -c 'sha256sum /home/app/.npmrc' | cut -d' ' -f1 > /h2 \\
    && stat -c '%a %u' /home/app/.npmrc > /mode2
RUN --mount=type=secret,id=token,env=TOKEN \\
    printf %s "$TOKEN" | sha256sum | cut -d' ' -f1 > /h3 && test ! -e /run/secrets/token
RUN --mount=type=secret,id=absent ls /run/secrets/absent 2>/dev/null; echo skipped > /h4
"""


def _files(ctl: ProcessController, ref: str) -> dict[str, bytes]:
    from shoal.runtime.buildstages import LayeredFS

    fs = LayeredFS(ctl.images.layer_dirs(ctl.images.inspect(ref)))
    found = fs.lookup("/")
    assert found is not None
    return {rel: b"" if p.is_dir() or p.is_symlink() else p.read_bytes()
            for rel, p in fs.walk(found[1])}


def _grep(root: Path, needle: bytes) -> list[str]:
    """Every file under ``root`` whose bytes hold ``needle`` (layer tars, blobs, cache)."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
            hits.append(str(path))
    return hits


async def test_a_secret_is_read_by_run_and_left_nowhere(ctl: ProcessController,
                                                         tmp_path: Path) -> None:
    ctl.images.import_rootfs("base:1", busybox_rootfs(tmp_path / "rootfs"))
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    builder = Builder(ctl, ctl.images, tmp_path / "build")
    lines: list[str] = []
    token = b"gh-token-77a1b2"
    first = await builder.build(ctx, BuildOptions(tags=("sec:1",), secrets={
        "npmrc": SECRET, "token": token}), lines.append)
    files = _files(ctl, "sec:1")
    digest = hashlib.sha256(SECRET).hexdigest().encode()
    assert files["h1"].strip() == files["h2"].strip() == digest  # (it saw the right bytes)
    assert files["h3"].strip() == hashlib.sha256(token).hexdigest().encode()
    assert (files["mode1"], files["mode2"]) == (b"400 0\n", b"440 1000\n")
    assert files["h4"] == b"skipped\n"
    for gone in ("run/secrets", "home/app/.npmrc", ".shoal-secret-env"):
        assert gone not in files, gone
    if "run" in files:  # (the image's own /run, if any, has no trace of the mount point)
        assert not any(k.startswith("run/secrets") for k in files)
    for needle in (SECRET.strip(), token):
        assert not any(needle in v for v in files.values())
        assert not any(needle.decode() in line for line in lines)
        # every layer blob, manifest, config (its history), the runtime's task directories
        # (config.json, logs), the step cache, the build dir
        assert _grep(ctl.images.root.parent, needle) == []
        assert _grep(tmp_path / "build", needle) == []
        assert needle.decode() not in repr(BuildOptions(secrets={"x": needle}))
    assert ctl.tasks() == {}
    assert list((tmp_path / "build" / "tmp").iterdir()) == []

    # another secret: every step from the cache (a secret's content is not in the key)
    again = await builder.build(ctx, BuildOptions(secrets={"npmrc": b"other", "token": b"x"}),
                                lines.append)
    assert (again.image.id, again.layers_created) == (first.image.id, 0)


async def test_a_required_secret_not_given_fails_naming_the_line(ctl: ProcessController,
                                                                 tmp_path: Path) -> None:
    ctl.images.import_rootfs("base:1", busybox_rootfs(tmp_path / "rootfs"))
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM base:1\nRUN true\nRUN --mount=type=secret,id=key,"
                                    "required cat /run/secrets/key\n")
    builder = Builder(ctl, ctl.images, tmp_path / "build")
    with pytest.raises(BuildError, match=r"line 3: .*secret 'key' is required") as exc:
        await builder.build(ctx, BuildOptions(secrets={"other": b"s3cr3t-value"}),
                            lambda _: None)
    assert "s3cr3t-value" not in str(exc.value) and exc.value.line == 3
    assert ctl.tasks() == {}
    (ctx / "Dockerfile").write_text("FROM base:1\nRUN --mount=type=ssh true\n")
    with pytest.raises(BuildError, match=r"line 2: RUN --mount=type=ssh is not supported"):
        await builder.build(ctx, BuildOptions(), lambda _: None)
