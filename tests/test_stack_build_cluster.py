"""`shoal stack deploy` of a service with ``build:`` on netns hosts, through the real CLI: the
image is built on h1 (the node the CLI talks to) from the Compose file's context and runs
on both nodes (h2 fetches it from h1) under its content tag ``st_web:HEX`` — the stage
``build.target`` names of a multi-stage Dockerfile, the stage it does not use not built; a
redeploy with
nothing changed rebuilds from the cache and replaces no task; a changed file in the context
rolls the service to the new image; a failing build changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_runtime_cluster import import_busybox

from netlab import Host, Lab, wait_until

pytestmark = pytest.mark.netns

COMPOSE = """
services:
  web:
    build: {context: ./web, target: prod}
    deploy:
      replicas: 2
      placement: {max_replicas_per_node: 1}
      update_config: {parallelism: 2, delay: 0s}
"""
DOCKERFILE = """\
FROM busybox:1 AS base
COPY msg.txt /msg.txt
FROM base AS debug
RUN exit 3
FROM base AS prod
CMD ["/bin/sh", "-c", "echo message: $(cat /msg.txt); while true; do sleep 1; done"]
FROM prod
CMD ["/bin/sh", "-c", "echo not the target; exit 1"]
"""


def running(h: Host) -> list[dict[str, Any]]:
    return sorted((t for t in h.cli_json("stack", "ps", "st")
                   if t["desired_state"] == "running" and t["state"] == "running"),
                  key=lambda t: str(t["id"]))


def image_ids(h: Host) -> dict[str, str]:
    return {tag: img["id"] for img in h.cli_json("image", "ls") for tag in img["tags"]}


def test_a_stack_builds_its_image_runs_it_on_two_nodes_and_rolls_only_when_it_changes(
        lab_factory: Callable[..., Lab], tmp_path: Path) -> None:
    lab = lab_factory(2)
    lab.form_cluster(managers=1, workers=1)
    h1, h2 = lab.hosts
    import_busybox(h1, tmp_path)
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "Dockerfile").write_text(DOCKERFILE)
    (tmp_path / "web" / "msg.txt").write_text("v1\n")
    compose = tmp_path / "compose.yml"
    compose.write_text(COMPOSE)

    out = h1.cli("stack", "deploy", "-c", str(compose), "st", timeout=120).stdout
    assert "Building service web" in out and "Step 2/4 : COPY msg.txt /msg.txt" in out, out
    assert "Skipping stage debug (line 3): stage prod does not use it" in out, out
    built = image_ids(h1)["st_web:latest"]
    ref = f"st_web:{built[7:19]}"
    assert image_ids(h1)[ref] == built and "Creating service st_web" in out, out
    [svc] = h1.cli_json("stack", "services", "st")
    assert svc["image"] == ref

    def two_nodes() -> list[dict[str, Any]] | None:
        ts = running(h1)
        return ts if len(ts) == 2 and len({t["node"] for t in ts}) == 2 else None
    first = wait_until(two_nodes, timeout=90, interval=0.3, what="web on both nodes")
    assert image_ids(h2)[ref] == built  # (fetched from h1: h2 never built anything)
    assert wait_until(lambda: (o := h1.cli("service", "logs", "st_web").stdout)
                      .count("message: v1") == 2 and o, timeout=30, what="both tasks' logs")

    # -- nothing changed: rebuilt from the cache, the same reference, no task replaced
    out = h1.cli("stack", "deploy", "-c", str(compose), "st", timeout=120).stdout
    assert "Using cache" in out and "Service st_web unchanged" in out, out
    assert "Updating service" not in out
    assert [t["id"] for t in running(h1)] == [t["id"] for t in first]

    # -- a failing build: the error names the service, the service stays as it was
    (tmp_path / "web" / "Dockerfile").write_text(DOCKERFILE.replace("msg.txt /", "gone.txt /"))
    res = h1.cli("stack", "deploy", "-c", str(compose), "st", check=False, timeout=120)
    assert res.returncode == 1 and "Error: services.web.build: build failed" in res.stderr, \
        res.stderr
    assert h1.cli_json("stack", "services", "st")[0]["image"] == ref

    # -- a changed file in the context: a new image, the service rolls to it
    (tmp_path / "web" / "Dockerfile").write_text(DOCKERFILE)
    (tmp_path / "web" / "msg.txt").write_text("v2\n")
    out = h1.cli("stack", "deploy", "-c", str(compose), "st", timeout=120).stdout
    assert "Updating service st_web" in out, out
    rebuilt = image_ids(h1)["st_web:latest"]
    assert rebuilt != built
    ref2 = f"st_web:{rebuilt[7:19]}"
    assert h1.cli_json("stack", "services", "st")[0]["image"] == ref2

    def rolled() -> list[dict[str, Any]] | None:
        ts = two_nodes()
        return ts if ts and not {t["id"] for t in ts} & {t["id"] for t in first} else None
    wait_until(rolled, timeout=90, interval=0.3, what="both tasks replaced")
    assert image_ids(h2)[ref2] == rebuilt
    assert wait_until(lambda: (o := h1.cli("service", "logs", "st_web").stdout)
                      .count("message: v2") == 2 and o, timeout=30, what="the new image's logs")
    h1.cli("stack", "rm", "st")
