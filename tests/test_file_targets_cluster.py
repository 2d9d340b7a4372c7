"""Secrets and configs where Docker puts them, end to end (schema 11, raft/schema.py): real
agents on netns hosts, both CLIs, a real image. A cluster formed by the release before this
change (``BEFORE``: schema 10) makes a service whose config is a file name — in
/run/configs, where that release puts it — and refuses an absolute target naming the field
while that node runs it. Once the node runs today's code the cluster writes schema 11: the
old service's tasks, replaced, still find their config in /run/configs; a new service sees a
config at /etc/app/app.conf owned by uid 101 with mode 0440, a secret at an absolute path,
runs a config script (mode 0755) as its command, and an image's symlinks (/srv -> a host
directory, /opt -> ../../.. up to it) lead its files into its own root, never the host's.
"""

from __future__ import annotations

import json
import os
import signal
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_runtime_images import BUSYBOX, busybox_rootfs

import oldrelease
from netlab import Host, Lab, wait_until
from shoal.raft.schema import SCHEMA
from shoal.raft.spec import FILE_TARGETS

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static")]

BEFORE = "ccf4cf4"  # main just before secrets and configs at any path (schema 10)

START = """#!/bin/sh
echo "conf $(stat -c '%u:%g %a' /etc/app/app.conf) $(cat /etc/app/app.conf)"
echo "secret $(stat -c '%u:%g %a' /run/app/token) $(cat /run/app/token)"
echo "me $(id -u):$(id -g) script $(stat -c '%a' /usr/local/bin/start.sh)"
echo "srv $(cat /srv/escape.conf) opt $(cat /opt/escape.conf)"
echo started-by-config
exec sleep 100000
"""


def schema_of(h: Host) -> int:
    return int(json.loads(h.cli("info").stdout).get("cluster_schema", 0))


def logs_with(h: Host, svc: str, needle: str, count: int = 1) -> str | None:
    out: str = h.cli("service", "logs", svc).stdout
    return out if out.count(needle) >= count else None


def image_with_symlinks(tmp_path: Path, outside: Path) -> Path:
    """busybox, with /srv an absolute symlink to a directory of the host and /opt a
    relative one climbing to it: a bind that followed them from the host would land there.
    The image has that directory too (resolved in the root, they lead there; a symlink
    dangling in the root fails the start: tests/test_runtime_images.py)."""
    root = busybox_rootfs(tmp_path / "fs")
    (root / str(outside).lstrip("/")).mkdir(parents=True)
    (root / "srv").symlink_to(outside)
    (root / "opt").symlink_to("../../../../../../../../.." + str(outside))
    tarball = tmp_path / "fs.tar.gz"
    with tarfile.open(tarball, "w:gz") as tf:
        tf.add(root, arcname=".")
    return tarball


def test_files_land_where_the_spec_says_old_ones_stay_and_none_escapes_the_root(
        lab_factory: Callable[..., Lab], tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    outside = tmp_path / "outside"  # (on the host: the lab's hosts share its filesystem)
    outside.mkdir()
    for name, text in (("conf", "legacy=1\n"), ("app", "listen 8080\n"),
                       ("start", START), ("escape", "in-the-root\n"), ("token", "s3cret\n")):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o644)

    with oldrelease.old_release(BEFORE) as rel:
        lab = lab_factory(2)
        old, new = lab.hosts
        old.use_shoal(rel.argv, rel.env)
        lab.form_cluster(managers=2, timeout=90)
        info: dict[str, Any] = json.loads(new.cli("info").stdout)
        assert info["cluster_schema"] == FILE_TARGETS - 1 and info["schema"] == SCHEMA, info

        # the older release's CLI and agent: a config by its file name, in /run/configs
        old.cli("config", "create", "conf", str(tmp_path / "conf"))
        old.cli("service", "create", "--name", "legacy", "--replicas", "2", "--config",
                "conf", "--", "sh", "-c", 'echo "legacy $(cat /run/configs/conf)"; '
                "sleep 100000")
        wait_until(lambda: logs_with(new, "legacy", "legacy legacy=1", 2), timeout=60,
                   what="both legacy tasks read /run/configs/conf")
        # an absolute target waits for every node: refused naming the field, not placed
        res = new.cli("service", "create", "--name", "early", "--config",
                      "source=conf,target=/etc/app/app.conf", "--", "sleep", "1", check=False)
        assert res.returncode != 0 and "task.container.configs[0].target" in res.stderr and \
            "upgrade every node first" in res.stderr, (res.stdout, res.stderr)
        old.cli("secret", "create", "early", str(tmp_path / "token"))
        res = new.cli("service", "create", "--name", "early", "--secret",
                      "source=early,uid=101", "--", "sleep", "1", check=False)
        assert res.returncode != 0 and "task.container.secrets[0].uid" in res.stderr, \
            (res.stdout, res.stderr)
        assert {s["name"] for s in new.cli_json("service", "ls")} == {"legacy"}

        # the older node upgraded in place: the leader raises the schema
        old.kill_agent(signal.SIGTERM, timeout=60)
        old.use_shoal()
        old.start_agent(timeout=60)
        wait_until(lambda: schema_of(old) == schema_of(new) == SCHEMA, timeout=60,
                   what=f"cluster schema {SCHEMA} once every node runs today's code")

    # the old service's spec is as it was written, and its new tasks find the file there
    spec = new.cli_json("service", "inspect", "legacy")[0]["spec"]
    assert spec["task"]["container"]["configs"] == [
        {"name": "conf", "target": "", "uid": "", "gid": "", "mode": 0o444}]
    new.cli("service", "update", "--force", "legacy", timeout=120)
    wait_until(lambda: logs_with(new, "legacy", "legacy legacy=1", 4), timeout=60,
               what="the replaced legacy tasks read /run/configs/conf too")

    # a new service: a real image, Docker's paths, owners and modes
    new.cli("image", "import", "fs:1", str(image_with_symlinks(tmp_path, outside)))
    new.cli("config", "create", "app", str(tmp_path / "app"))
    new.cli("config", "create", "start", str(tmp_path / "start"))
    new.cli("config", "create", "escape", str(tmp_path / "escape"))
    new.cli("secret", "create", "token", str(tmp_path / "token"))
    new.cli("service", "create", "--name", "web", "--user", "101:101",
            "--config", "source=app,target=/etc/app/app.conf,uid=101,gid=101,mode=0440",
            "--config", "source=start,target=/usr/local/bin/start.sh,mode=0755",
            "--config", "source=escape,target=/srv/escape.conf",
            "--config", "source=escape,target=/opt/escape.conf",
            "--secret", "source=token,target=/run/app/token,uid=101,gid=101,mode=0400",
            "fs:1", "/usr/local/bin/start.sh", timeout=120)
    out = wait_until(lambda: logs_with(new, "web", "started-by-config"), timeout=60,
                     what="the config script ran as the task's command")
    assert "conf 101:101 440 listen 8080" in out, out
    assert "secret 101:101 400 s3cret" in out, out
    assert "me 101:101 script 755" in out, out
    assert "srv in-the-root opt in-the-root" in out, out
    assert list(outside.iterdir()) == []  # (the host's directory: nothing bound or made)
    web = new.cli_json("service", "inspect", "web")[0]["spec"]["task"]["container"]
    assert [(c["target"], c["uid"], c["gid"], c["mode"]) for c in web["configs"]][:2] == [
        ("/etc/app/app.conf", "101", "101", 0o440), ("/usr/local/bin/start.sh", "0", "0",
                                                     0o755)]
    pretty = new.cli("service", "inspect", "--pretty", "legacy").stdout
    assert "/run/configs/conf" in pretty, pretty

    # `--config NAME` now: Docker's place, /NAME
    new.cli("service", "create", "--name", "short", "--config", "conf", "--", "sh", "-c",
            'echo "short $(cat /conf)"; sleep 100000')
    wait_until(lambda: logs_with(new, "short", "short legacy=1"), timeout=60,
               what="a new --config NAME at /NAME")
