"""An admitted node keeps its membership while its state feed is slow (shoal.node.joining).

Issue 16's 100-worker storm: 20 `shoal join` calls failed with "timed out after 20 s waiting
for this node's replica to catch up" although the cluster had admitted the node, and that
agent then threw its membership away. Here, on netns hosts: the manager's link is throttled
and the cluster state is made large, so the joining worker's first full-state download
takes seconds — longer than the joiner's ``--join-wait``. The join must still answer success
("admitted ... catching up"), the agent must keep catching up (also across a kill -9 in the
middle: it resumes as the same node, not as a new one) and end Ready and running; a wrong
token is still refused at once.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from netlab import CommandError, Host, Lab, wait_until

pytestmark = pytest.mark.netns

BIG = 200 * 1024  # random bytes in a config: the state a new worker downloads (incompressible)


def info_of(host: Host) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(host.cli("info").stdout)
    return out


def test_a_join_whose_feed_is_slow_ends_ready_and_survives_a_restart_mid_catch_up(
        lab_factory: Callable[..., Lab], tmp_path: Path) -> None:
    lab = lab_factory(2)
    mgr, joiner = lab.hosts
    mgr.start_agent()
    joiner.start_agent("--join-wait", "1s")
    mgr.cli("init")
    token = mgr.cli("join-token", "worker", "-q").stdout.strip()
    blob = tmp_path / "big"
    blob.write_bytes(os.urandom(BIG))
    mgr.cli("config", "create", "big", str(blob))

    bad = joiner.cli("join", "--token", token[:-4] + "0000", f"{mgr.ip}:2377", check=False)
    assert bad.returncode != 0 and "invalid join token" in bad.stderr, bad

    # ~32 KB/s out of the manager: the joiner's first full state takes several seconds
    mgr.throttle("256kbit")
    res = joiner.cli("join", "--token", token, f"{mgr.ip}:2377", timeout=120)
    assert res.returncode == 0 and "admitted to the cluster as a worker" in res.stdout \
        and "catching up" in res.stdout, res.stdout
    info: dict[str, Any] = info_of(joiner)
    node_id = info["node_id"]
    assert info["member"] and info["ready"] is False, info  # still catching up
    assert (joiner.data_dir / "node.json").exists()

    # killed in the middle of the catch-up: the restarted agent resumes as the same node
    joiner.restart_agent(signal.SIGKILL)
    again: dict[str, Any] = info_of(joiner)
    assert again["member"] and again["node_id"] == node_id, again

    def caught_up() -> dict[str, Any] | None:
        i: dict[str, Any] = info_of(joiner)
        return i if i.get("ready") else None

    wait_until(caught_up, timeout=90, interval=0.5, what="the joiner's feed to catch up")
    mgr.heal()

    def ready() -> list[dict[str, Any]] | None:
        nodes: list[dict[str, Any]] = mgr.cli_json("node", "ls")
        return nodes if [n["state"] for n in nodes] == ["ready", "ready"] else None

    nodes = wait_until(ready, timeout=60, interval=0.5, what="both nodes ready")
    assert node_id in {n["id"] for n in nodes}  # one record: the same node, not a second
    assert joiner.agent_alive()
    assert "refused" not in joiner.agent_log.read_text()
    with pytest.raises(CommandError, match="already part of a cluster"):
        joiner.cli("join", "--token", token, f"{mgr.ip}:2377")
