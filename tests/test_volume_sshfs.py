"""Must-show 3 of issue 17 on netns hosts through the real CLI: an sshfs volume (FUSE here,
sshd on another netns host serving a directory, the private key from a shoal secret) follows
its task to another node when the node is drained; the data written on the first node is
read on the second; the single-writer volume is never mounted read-write twice; nothing stays
mounted once the service is gone. The server's host key is checked (``KnownHosts-secret``):
a wrong one makes the mount fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import SSHD, sshd_config

from netlab import Host, wait_until

pytestmark = pytest.mark.netns

# first task: writes the note; a later one (on another node): reads it back into /data/read
SCRIPT = ("if [ -f /data/note ]; then cat /data/note > /data/read; "
          "else echo written-on-first-node > /data/note; fi; exec sleep 100000")


def _sshfs_mounts(root: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line for line in f if " fuse.sshfs " in line and str(root) in line]


def _start_sshd(host: Host, work: Path) -> None:
    work.mkdir(mode=0o700)
    cfg = sshd_config(work, f"{host.ip}:22")
    host.spawn(str(SSHD), "-D", "-e", "-f", str(cfg), log_name="sshd")
    log = host.data_dir / "sshd.log"
    wait_until(lambda: log.exists() and "Server listening" in log.read_text(), timeout=15,
               interval=0.05, what="sshd listening")


def _running(h1: Host) -> dict[str, Any]:
    def one() -> dict[str, Any] | None:
        tasks = [t for t in h1.cli_json("service", "ps", "vol")
                 if t["state"] == "running" and t["desired_state"] == "running"]
        return tasks[0] if len(tasks) == 1 else None
    return wait_until(one, timeout=60, interval=0.3, what="the task running")


def test_sshfs_volume_follows_its_task_to_another_node(lab_factory: Any) -> None:
    assert SSHD.exists() and shutil.which("sshfs"), \
        "needs sshd and sshfs (Debian openssh-server, sshfs, in DEB_PKGS): run `make venv`"
    lab = lab_factory(3)
    h1, _h2, h3 = lab.hosts
    lab.form_cluster(managers=1, workers=1)  # h1, h2 run tasks; h3 only serves the files
    work = lab.root / "sshfs"
    _start_sshd(h3, work)
    export = work / "export"
    export.mkdir()
    h1.cli("secret", "create", "sshkey", str(work / "key"))
    hostkey = (work / "hostkey.pub").read_text().split()
    (work / "known_hosts").write_text(f"{h3.ip} {hostkey[0]} {hostkey[1]}\n")
    h1.cli("secret", "create", "sshhost", str(work / "known_hosts"))
    h1.cli("volume", "create", "--driver", "sshfs", "-o", f"sshcmd=root@{h3.ip}:{export}",
           "-o", "IdentityFile-secret=sshkey", "-o", "KnownHosts-secret=sshhost",
           "-o", "single-writer=true", "data")
    vol = h1.cli_json("volume", "inspect", "data")[0]
    assert vol["driver"] == "sshfs" and vol["scope"] == "global"
    assert "sshkey" in vol["options"]["IdentityFile-secret"]  # the name, never the key
    assert "PRIVATE KEY" not in h1.cli("volume", "inspect", "data").stdout

    h1.cli("service", "create", "--name", "vol", "--secret", "sshkey", "--secret", "sshhost",
           "--mount", "type=volume,src=data,dst=/data", "--", "sh", "-c", SCRIPT)
    first = _running(h1)
    wait_until(lambda: (export / "note").exists(), timeout=30, what="the note written")
    assert len(_sshfs_mounts(lab.root)) == 1
    refused = h1.cli("volume", "rm", "data", check=False)
    assert refused.returncode != 0 and "in use" in refused.stderr + refused.stdout

    h1.cli("node", "update", "--availability", "drain", first["node"])
    wait_until(lambda: _running(h1)["node"] != first["node"], timeout=60, interval=0.5,
               what="the task moved off the drained node")
    read = wait_until(lambda: (export / "read").exists() and (export / "read").read_text(),
                      timeout=30, what="the note read on the other node")
    assert read == "written-on-first-node\n"
    wait_until(lambda: len(_sshfs_mounts(lab.root)) == 1, timeout=30,
               what="the drained node's mount gone")  # single-writer: never two at once

    h1.cli("service", "rm", "vol")
    wait_until(lambda: not _sshfs_mounts(lab.root), timeout=30, what="no sshfs mount left")
    wait_until(lambda: h1.cli("volume", "rm", "data", check=False).returncode == 0,
               timeout=30, what="volume rm once the tasks are gone")
    assert h1.cli("volume", "ls", "-q").stdout.strip() == ""

    # the same mount with the server's host key works; with another key, ssh refuses it
    other = work / "otherkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True, capture_output=True)
    wrong = other.with_suffix(".pub").read_text().split()
    for line, want in ((f"{h3.ip} {hostkey[0]} {hostkey[1]}", 0),
                       (f"{h3.ip} {wrong[0]} {wrong[1]}", 3)):
        res = h1.run(sys.executable, "-c", _PROBE.format(
            path=str(work / "probe"), sshcmd=f"root@{h3.ip}:{export}",
            key=str(work / "key"), known=line), check=False, timeout=60)
        assert res.returncode == want, res.stdout + res.stderr
    assert not _sshfs_mounts(lab.root)


# mounts the volume in the calling netns as the runtime does, then unmounts it; exit 3 if
# the mount fails
_PROBE = """import sys
from pathlib import Path
from shoal.runtime import volumes
files = {{"/run/secrets/k": (Path("{key}").read_bytes(), 0o400),
         "/run/secrets/hk": (b"{known}\\n", 0o400)}}
try:
    fds = volumes.mount(Path("{path}"), "sshfs", {{"sshcmd": "{sshcmd}",
                        "IdentityFile-secret": "k", "KnownHosts-secret": "hk"}}, files)
except volumes.VolumeMountFailed as e:
    print(e)
    sys.exit(3)
volumes.unmount(Path("{path}"), fds)
"""
