"""Who may read an image from a peer (shoal.node.transfer, ``check_image_access``), end to
end on netns hosts with real agents and the real CLI.

Nodes hand each other images (``service create`` of an image one node holds: the others
fetch it from that peer). A worker may read from a peer only the images of its own tasks,
and of those only their blobs: a worker given no task of an image cannot copy it off a peer
that holds it (a private image pulled with another service's registry credentials, say).
Managers read any. The caller names the image with each blob; an agent of schema 12 did
not, so the rule holds once the cluster's schema is raised: a schema-12 worker still pulls
from today's peers during the upgrade."""

from __future__ import annotations

import json
import signal
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_runtime_cluster import import_busybox, running
from test_runtime_images import busybox_rootfs
from test_security_cluster import node_pem, probe

import oldrelease
from netlab import Host, Lab, wait_until
from shoal.raft.schema import IMAGE_ACCESS, SCHEMA

pytestmark = pytest.mark.netns

SCHEMA_12 = "3052b7c"  # the last commit of schema 12 (its peers fetched blobs unnamed)


def schema_of(h: Host) -> int:
    return int(json.loads(h.cli("info").stdout).get("cluster_schema", 0))


def layers_of(h: Host, ref: str) -> list[str]:
    out = h.cli_json("image", "inspect", ref)
    detail: dict[str, Any] = out[0] if isinstance(out, list) else out
    return [str(d) for d in detail["layers"]]


def blob(src: Host, dst: Host, digest: str, image: str | None) -> dict[str, Any]:
    query = "" if image is None else f"?image={image}"
    return probe(src, dst, f"/v1/cluster/images/blobs/{digest}{query}", method="GET",
                 cert=node_pem(src))


def refused(r: dict[str, Any], field: str) -> bool:
    return r.get("status") == 403 and r["body"]["error"]["field"] == field


def test_a_worker_reads_only_its_own_tasks_images_from_peers_once_every_node_names_them(
        lab_factory: Callable[..., Lab], tmp_path: Path) -> None:
    assert IMAGE_ACCESS <= SCHEMA  # (the release that names the image raised the schema)
    with oldrelease.old_release(SCHEMA_12) as rel:
        lab = lab_factory(3)
        h1, h2, h3 = lab.hosts  # h1 and h3 run the schema-12 release first, h2 today's
        for old in (h1, h3):
            old.use_shoal(rel.argv, rel.env)
        lab.form_cluster(managers=1, workers=2, timeout=90)
        assert schema_of(h1) == IMAGE_ACCESS - 1
        import_busybox(h2, tmp_path)
        root = busybox_rootfs(tmp_path / "private")
        (root / "private.txt").write_text("not for every node\n")
        tarball = tmp_path / "private.tar.gz"
        with tarfile.open(tarball, "w:gz") as tf:
            tf.add(root, arcname=".")
        h2.cli("image", "import", "private:1", str(tarball))
        (mine,), (private,) = layers_of(h2, "busybox:1"), layers_of(h2, "private:1")

        # schema 12: the old worker h3 fetches busybox from today's h2 without naming it
        h1.cli("service", "create", "--name", "bb", "--constraint", "node.hostname==h3",
               "--image", "busybox:1", "--", "sleep", "100000")
        running(h1, "bb", 1, timeout=60)

        # h1 and h3 upgraded in place: the schema is raised and the rule holds
        for old in (h1, h3):
            old.kill_agent(signal.SIGTERM, timeout=60)
            old.use_shoal()
            old.start_agent(timeout=60)
        # (h2 serves: its own copy of the state must read the schema too)
        wait_until(lambda: all(schema_of(h) == SCHEMA for h in lab.hosts), timeout=60,
                   what=f"cluster schema {SCHEMA} on every node")
        assert blob(h3, h2, mine, "busybox:1")["status"] == 200  # (its task bb runs it)
        # h3 has no task of private:1: neither its name nor its blobs
        r = probe(h3, h2, "/v1/cluster/images/resolve", {"ref": "private:1"},
                  cert=node_pem(h3))
        assert refused(r, "image") and "runs no task of image private:1" in \
            r["body"]["error"]["message"], r
        assert refused(blob(h3, h2, private, "private:1"), "image")
        assert refused(blob(h3, h2, private, None), "image")  # (the name is required)
        # nor a blob of it by naming an image it does run
        r = blob(h3, h2, private, "busybox:1")
        assert refused(r, "digest") and "is not part of image busybox:1" in \
            r["body"]["error"]["message"], r
        # a manager reads any image of a peer
        assert blob(h1, h2, private, None)["status"] == 200
        # a task of private:1 on h3: h3 fetches it from h2, naming it
        h1.cli("service", "create", "--name", "priv", "--constraint", "node.hostname==h3",
               "--image", "private:1", "--", "sleep", "100000")
        running(h1, "priv", 1, timeout=60)
        assert "private:1" in h3.cli("image", "ls").stdout
        assert blob(h3, h2, private, "private:1")["status"] == 200
