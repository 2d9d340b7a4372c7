"""Issue 17 must-show 4 on netns hosts through the real CLI: a 5-instruction Dockerfile
built by `shoal image build` (the context streamed to h1's agent as a tar, the build output
streamed back), run as a 3-replica service across 3 nodes (h2 and h3 fetch the built image
from h1, blob by blob, like any other), and a rebuild with no change made entirely from the
cache (no new layer, no new image); `image save` there and `image load` on another node give
the same image; a multi-stage Dockerfile built up to its ``--target``. Timings:
bench/image_build.py, not here."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
from test_runtime_images import busybox_rootfs

from netlab import Lab, wait_until

pytestmark = pytest.mark.netns

DOCKERFILE = """\
FROM busybox:1
RUN mkdir -p /app && echo "built by shoal" > /app/built.txt
COPY hello.txt /app/
ENV GREETING="hello from"
CMD ["/bin/sh", "-c", "echo $GREETING $(hostname): $(cat /app/built.txt /app/hello.txt); \\
     while true; do sleep 1; done"]
"""


def test_built_image_runs_as_a_3_replica_service_and_rebuilds_from_cache(
        lab_factory: Callable[..., Lab], tmp_path: Path) -> None:
    lab = lab_factory(3)
    lab.form_cluster(managers=1, workers=2)
    h1 = lab.hosts[0]
    h1.cli("image", "import", "busybox:1", str(busybox_rootfs(tmp_path / "bb")))
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "hello.txt").write_text("the context\n")
    (ctx / "big.bin").write_bytes(b"x" * 4096)
    (ctx / ".dockerignore").write_text("*.bin\n")

    out = h1.cli("image", "build", "-t", "web:1", str(ctx), timeout=120).stdout
    assert "Step 5/5 : CMD" in out and "Successfully tagged web:1" in out, out
    assert "0/5 steps from the cache, 2 new layers" in out, out
    layers = sorted(p.name for p in (h1.data_dir / "images" / "layers").iterdir())

    again = h1.cli_json("image", "build", "-t", "web:1", str(ctx), timeout=120)
    assert (again["cached"], again["layers_created"], again["images_created"]) == (4, 0, 0)
    assert sorted(p.name for p in (h1.data_dir / "images" / "layers").iterdir()) == layers
    built = {tag: img["id"] for img in h1.cli_json("image", "ls") for tag in img["tags"]}
    assert built["web:1"] == again["image"]

    # multi-stage, `--target`: up to that stage, the one after it not built
    (ctx / "Multi").write_text("FROM busybox:1 AS build\nCOPY hello.txt /src/\n"
                               "FROM busybox:1 AS debug\nCOPY --from=build /src /dbg\n"
                               "FROM scratch\nCOPY --from=0 /src/hello.txt /\n")
    ms = h1.cli_json("image", "build", "-f", str(ctx / "Multi"), "--target", "Debug", "-t",
                     "web:debug", str(ctx), timeout=120)
    assert (ms["steps"], ms["layers_created"], ms["tags"]) == (4, 2, ["web:debug"]), ms
    bad = h1.cli("image", "build", "-f", str(ctx / "Multi"), "--target", "prod", str(ctx),
                 check=False)
    assert bad.returncode != 0 and "target stage 'prod' is not in the Dockerfile (its " \
        "stages: build, debug)" in bad.stderr, bad.stderr

    # a bad Dockerfile: a clear error with its line, exit status non-zero
    (ctx / "Bad").write_text("FROM busybox:1\nSHELL [\"/bin/ash\", \"-c\"]\n")
    bad = h1.cli("image", "build", "-f", str(ctx / "Bad"), str(ctx), check=False)
    assert bad.returncode != 0 and "line 2: unsupported instruction 'SHELL'" in bad.stderr

    # `image save` (docker's) on h1, `image load` on h2: the same image, no registry; to
    # stdout as well; an image h1 lacks is an error and leaves no file
    saved, piped = tmp_path / "web.tar", tmp_path / "piped.tar"
    h1.cli("image", "save", "-o", str(saved), "web:1")
    h1.run("sh", "-c", f"{shlex.join([*h1.shoal_argv, '-H', f'unix://{h1.sock}'])} image "
           f"save web:1 > {piped}")
    assert piped.read_bytes() == saved.read_bytes()
    assert "Loaded image web:1" in lab.hosts[1].cli("image", "load", str(saved)).stdout
    ids = {tag: img["id"] for img in lab.hosts[1].cli_json("image", "ls") for tag in img["tags"]}
    assert ids["web:1"] == again["image"], ids
    gone = h1.cli("image", "save", "-o", str(tmp_path / "gone.tar"), "nope:1", check=False)
    assert gone.returncode != 0 and "nope:1" in gone.stderr, gone.stderr
    assert not list(tmp_path.glob("gone.tar*"))

    h1.cli("service", "create", "--name", "web", "--replicas", "3", "--image", "web:1")

    def three() -> list[dict[str, object]] | None:
        ts = [t for t in h1.cli_json("service", "ps", "web") if t["state"] == "running"]
        return ts if len(ts) == 3 else None
    ts = wait_until(three, timeout=90, interval=0.3, what="3 running web tasks")
    assert len({t["node"] for t in ts}) == 3
    for h in lab.hosts[1:]:  # fetched from h1: the same image id
        ids = {tag: img["id"] for img in h.cli_json("image", "ls") for tag in img["tags"]}
        assert ids.get("web:1") == again["image"], (h.name, ids)
    logs = wait_until(lambda: ((o := h1.cli("service", "logs", "web").stdout)
                      .count("built by shoal the context") >= 3 and o) or None,
                      timeout=30, what="3 greetings")
    assert logs.count("hello from web-") == 3, logs
