"""The sshfs volume driver for real, at the runtime's level: sshd on loopback serving a
directory, the key handed over as a task file (a secret), FUSE here. Tasks sharing the volume
mount it once; it is unmounted when the last one is removed; a server that does not answer
fails the start and leaves nothing mounted. Needs root, sshd and sshfs."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import SSHD, free_port, sshd_config
from test_runtime_support import needs_root, run_to_end, task, wait_for_output

from shoal.runtime.process import ProcessController
from shoal.runtime.rootfs import MountSpec
from shoal.runtime.volumes import VolumeMountFailed

pytestmark = [needs_root]


@pytest.fixture(autouse=True)
def _tools() -> None:
    """sshd and sshfs are in the Makefile's DEB_PKGS: missing means a broken set-up, not a
    reason to skip the driver's test."""
    assert SSHD.exists() and shutil.which("sshfs"), \
        "needs sshd and sshfs (Debian openssh-server, sshfs): run `make venv`"
pytest_plugins = ("test_runtime_support",)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[int, bytes, Path]]:
    """(port, private key, exported directory) of an sshd on 127.0.0.1."""
    port = free_port()
    cfg = sshd_config(tmp_path, f"127.0.0.1:{port}")
    export = tmp_path / "export"
    export.mkdir()
    log = open(tmp_path / "sshd.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(cfg)], stdout=log, stderr=log)
    try:
        for _ in range(200):
            if "Server listening" in (tmp_path / "sshd.log").read_text():
                break
            proc.poll()
            assert proc.returncode is None, (tmp_path / "sshd.log").read_text()
            subprocess.run(["sleep", "0.05"], check=True)
        yield port, (tmp_path / "key").read_bytes(), export
    finally:
        proc.kill()
        proc.wait()
        log.close()


def _sshfs_mounts(under: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line for line in f if " fuse.sshfs " in line and str(under) in line]


def _vol(port: int, export: Path, name: str = "shared") -> tuple[MountSpec, ...]:
    opts = (("IdentityFile-secret", "sshkey"), ("port", str(port)),
            ("sshcmd", f"root@127.0.0.1:{export}"))
    return (MountSpec("volume", "/data", name, False, 0, "sshfs", opts),)


async def test_sshfs_volume_is_mounted_once_and_unmounted_after_its_last_task(
        ctl: ProcessController, data_dir: Path, sshd: tuple[int, bytes, Path]) -> None:
    port, key, export = sshd
    files = {"/run/secrets/sshkey": (key, 0o400)}
    mounts = _vol(port, export)
    try:
        st, _, err = await run_to_end(ctl, task("w1", "sh", "-c", "echo hello > /data/f",
                                                mounts=mounts, files=files), timeout=40)
        assert st.exit_code == 0, err
        assert (export / "f").read_text() == "hello\n"  # written on the server
        assert len(_sshfs_mounts(data_dir)) == 1
        await ctl.start(task("w2", "sh", "-c", "cat /data/f; echo up; exec sleep 100",
                             mounts=mounts, files=files))
        await wait_for_output(ctl, "w2", "up")
        assert len(_sshfs_mounts(data_dir)) == 1  # one mount for both tasks
        await ctl.remove("w1")
        assert len(_sshfs_mounts(data_dir)) == 1  # w2 still uses it
        await ctl.remove("w2")
        assert _sshfs_mounts(data_dir) == []  # the last user gone: unmounted
    finally:
        for tid in ("w1", "w2"):
            await ctl.remove(tid)


async def test_an_unreachable_server_fails_the_start_and_leaves_nothing_mounted(
        ctl: ProcessController, data_dir: Path, sshd: tuple[int, bytes, Path]) -> None:
    _, key, export = sshd
    files = {"/run/secrets/sshkey": (key, 0o400)}
    with pytest.raises(VolumeMountFailed, match="sshfs"):
        await asyncio.wait_for(ctl.start(task("bad", "true", mounts=_vol(
            free_port(), export, "gone"), files=files)), timeout=60)
    assert _sshfs_mounts(data_dir) == []
    with pytest.raises(Exception, match="--secret sshkey"):  # the key must be a task secret
        await ctl.start(task("nokey", "true", mounts=_vol(1, export, "nokey")))
