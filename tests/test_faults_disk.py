"""A manager whose disk fills up (the fault suite's "disk full" fault, docs/reliability.md).

Netns hosts, 3 managers. The leader's Raft directory is a small tmpfs of its own (mounted
under the lab's root, removed with the lab); the test fills it to the last byte, then writes
through the others. Before the fix the leader's agent died of SIGBUS (pysyncobj grows its
journal as a sparse memory map), and a leader that merely failed to append would have kept
leading with no write committing. What must hold: the agent lives, the two managers with
free disk (a majority) commit again, and once space is freed every manager ends with the
same state at the same index, every acknowledged write included.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

import pytest
from helpers import UnixHTTPConnection, fill_filesystem

from netlab import Host, Lab

pytestmark = pytest.mark.netns


def _digest(h: Host) -> tuple[int, str] | None:
    """(index, sha256) of ``h``'s state after a linearizable read (the fault suite's check)."""
    conn = UnixHTTPConnection(h.sock, timeout=20)
    try:
        conn.request("GET", "/v1/info?digest=1")
        resp = conn.getresponse()
        body = resp.read()
    except OSError:
        return None
    finally:
        conn.close()
    if resp.status != 200:
        return None
    d = json.loads(body).get("state_digest") or {}
    return (d["index"], d["sha256"]) if d else None


def _create(h: Host, name: str) -> bool:
    res = h.cli("service", "create", "--name", name, "--replicas", "0", "--", "sleep",
                "1000", check=False, timeout=40)
    if res.returncode != 0:
        print(f"create {name} through {h.name}: {res.stderr.strip()[-300:]}")
    return res.returncode == 0


def test_a_leader_with_a_full_disk_hands_over_and_neither_dies_nor_forks(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(3)
    h1, h2, h3 = lab.hosts  # h1 initialises the cluster: the leader
    raft_dir = h1.data_dir / "raft"
    raft_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs",
                    str(raft_dir)], check=True)
    lab.form_cluster(managers=3, timeout=120)
    acknowledged = [f"before{i}" for i in range(3)]
    for name in acknowledged:  # (retried: a fresh cluster on a loaded machine may re-elect)
        deadline = time.monotonic() + 60
        while not _create(h1, name):
            assert time.monotonic() < deadline, f"{name} not created"

    filler = raft_dir / "filler"
    fill_filesystem(filler)
    # writes through the others: the full leader cannot append and hands over; the two
    # with free disk (a majority) elect a leader and commit again
    deadline = time.monotonic() + 90
    while not _create(h2, "after-full"):
        assert time.monotonic() < deadline, "no write committed after the leader's disk filled"
        assert h1.agent_alive(), h1.log_tail()
    acknowledged.append("after-full")
    for i in range(6):
        host = (h2, h3)[i % 2]
        if _create(host, f"full{i}"):
            acknowledged.append(f"full{i}")
    assert len(acknowledged) >= 8, acknowledged
    assert h1.agent_alive(), h1.log_tail()

    filler.unlink()
    deadline = time.monotonic() + 120
    digests: list[tuple[int, str] | None] = []
    while time.monotonic() < deadline:
        _create(h2, f"heal{int(time.monotonic())}")  # moves the index on
        digests = [_digest(h) for h in (h1, h2, h3)]
        if digests[0] is not None and len(set(digests)) == 1:
            break
        time.sleep(1.0)
    assert digests[0] is not None and len(set(digests)) == 1, digests
    for h in (h1, h2, h3):
        names = {s["name"] for s in h.cli_json("service", "ls")}
        assert set(acknowledged) <= names, (h.name, set(acknowledged) - names)
    assert h1.agent_alive(), h1.log_tail()
