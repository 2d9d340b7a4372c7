"""Small helpers shared by the tests (and bench/ scripts that import from tests/): free loopback
ports, polling a condition from a coroutine, recording a store's proposals, an sshd's set-up
files.

Owns: ``free_port``, ``free_ports``, ``UnixHTTPConnection`` (http.client over an agent's unix
socket) and ``scrape_metrics`` (its /metrics, parsed), ``until``, ``proposals``, ``raft_trio``
(three real RaftStores on loopback with a cuttable link between any two), ``sshd_config`` (the
files only: the caller starts and stops the sshd, where it wants it). Must not touch: network
namespaces and agents (tests/netlab.py: its ``wait_until`` polls from a thread and retries on
exceptions), anything outside loopback. ``until`` lets an exception from the condition
propagate: a test that polls a store wants to see a bug at once, not a timeout later.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
SSHD = Path("/usr/sbin/sshd")  # (Debian openssh-server, in the Makefile's DEB_PKGS)


def free_port(kind: int = socket.SOCK_STREAM, host: str = LOOPBACK) -> int:
    """A port nothing listens on now (the kernel's pick; another process may take it later)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """``n`` distinct free TCP ports (held open together while picked, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket (an agent's API socket, ``Host.sock``)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


def scrape_metrics(sock: Path) -> dict[str, Any]:
    """GET /metrics on an agent's unix socket, parsed by prometheus-client's parser: the
    metric families by name."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = UnixHTTPConnection(sock)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        text = resp.read().decode()
    finally:
        conn.close()
    return {f.name: f for f in text_string_to_metric_families(text)}


def proposals(store: Any) -> list[dict[str, Any]]:
    """Every command ``store.propose`` is given from now on, in order (a MemoryStore, or any
    store with that coroutine method); the store still applies each one."""
    seen: list[dict[str, Any]] = []
    propose = store.propose

    async def record(cmd: dict[str, Any], timeout: float | None = None) -> Any:
        seen.append(cmd)
        return await propose(cmd, timeout)
    store.propose = record
    return seen


async def until(cond: Callable[[], T | None], timeout: float, what: str = "condition",
                interval: float = 0.02) -> T:
    """Poll ``cond`` every ``interval`` s until it returns something truthy and return that;
    AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        await asyncio.sleep(interval)
    return value


async def raft_trio(tmp_path: Path, config: Any, cut: set[tuple[str, str]] | None = None,
                    timeout: float = 60.0) -> list[Any]:
    """Three RaftStores on loopback (in-memory logs, secret "secret"), once one leads and all
    are ready. ``cut`` holds (at, peer) address pairs: ``at`` neither hears nor talks to
    ``peer`` while the pair is in it (``AdmissionTransport(link_up=...)``). The caller
    closes the stores."""
    from shoal.raft.store import RaftStore  # (helpers is imported by tests without Raft)

    addrs = [f"{LOOPBACK}:{p}" for p in free_ports(3)]
    links = cut if cut is not None else set()

    def link_up(me: str) -> Callable[[str], bool]:
        return lambda peer: (me, peer) not in links
    stores = [RaftStore(a, addrs, tmp_path / f"n{i}", "secret", config=config, persist=False,
                        link_up=link_up(a)) for i, a in enumerate(addrs)]
    try:
        await until(lambda: any(s.is_leader() for s in stores) and all(
            s.is_ready() for s in stores), timeout, "a leader and ready replicas")
    except BaseException:
        for s in stores:
            s.close()
        raise
    return stores


def fill_filesystem(path: Path) -> int:
    """Write zeros into ``path`` until its filesystem is full (to the last byte); the bytes
    written."""
    st = os.statvfs(path.parent)
    if st.f_blocks * st.f_frsize > 1 << 30:  # never the machine's own disk
        raise RuntimeError(f"{path.parent} is not a small test filesystem (see small_disks)")
    written = 0
    with open(path, "ab", buffering=0) as fh:
        for size in (1 << 16, 4096, 512, 1):
            while True:
                try:
                    written += fh.write(b"\0" * size) or 0
                except OSError:
                    break
    return written


def sshd_config(work: Path, listen: str) -> Path:
    """The files of an sshd serving root over public keys only, in the existing directory
    ``work``: a client key pair (``key``, ``key.pub``, the public half also in
    ``authorized_keys``), a host key (``hostkey``, ``hostkey.pub``) and ``sshd_config``
    (listening on ``listen``, ADDR:PORT; no PAM, no passwords, sftp in-process). Returns the
    config's path: run ``SSHD -D -e -f CONFIG``. /run/sshd (its privilege separation
    directory) is made if missing and left in place (shared)."""
    key, hostkey = work / "key", work / "hostkey"
    for k in (key, hostkey):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)],
                       check=True, capture_output=True)
    shutil.copy(key.with_suffix(".pub"), work / "authorized_keys")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    cfg = work / "sshd_config"
    cfg.write_text("\n".join([
        f"ListenAddress {listen}", f"HostKey {hostkey}", "PidFile none",
        f"AuthorizedKeysFile {work / 'authorized_keys'}", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
        "StrictModes no", "UseDNS no", "Subsystem sftp internal-sftp", ""]))
    return cfg


def converge(st: Any, now: float = 10.0) -> None:
    """Run the leader's passes on ``st`` (a ClusterState) until it plans nothing more (at most
    5), every node heard from at ``now``: the state a cluster settles in."""
    from shoal.node.leader import plan_pass
    from shoal.node.orchestrator import OrchestratorConfig

    seen = {nid: now for nid in st.nodes}
    for _ in range(5):
        ops, _ = plan_pass(st.snapshot(), seen, now, now, OrchestratorConfig(), liveness=False)
        if not ops:
            return
        assert "ok" in st.apply({"op": "leader", "term": 1, "now": now, "ops": ops})
