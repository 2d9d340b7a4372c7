"""Service modes end to end: real agents on netns hosts, driven by the real CLI."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from netlab import Host, Lab, pid_alive, wait_until

pytestmark = pytest.mark.netns


def running(host: Host, service: str) -> dict[str, dict[str, Any]]:
    """Node hostname → the running task of ``service`` there."""
    return {t["node"]: t for t in host.cli_json("service", "ps", service)
            if t["state"] == "running"}


def test_a_global_service_follows_nodes_and_a_replicated_job_completes(
        lab_factory: Callable[..., Lab]) -> None:
    """`--mode global` runs one task on every node, starts one on a node that joins and
    stops the one of a drained node (`node ps` shows it); `--mode replicated-job` with 4
    completions, 2 at a time, runs to completion and is not restarted; `service ls` shows
    both modes and the job's progress; `--max-replicas-per-node` and `--placement-pref
    spread=...` place as asked and a task that fits nowhere says why."""
    lab = lab_factory(3)
    lab.form_cluster(managers=1, workers=1)
    h1, h2, h3 = lab.hosts
    h1.cli("service", "create", "--name", "agents", "--mode", "global", "--",
           "sleep", "100000")
    wait_until(lambda: sorted(running(h1, "agents")) == [h1.name, h2.name] or None,
               timeout=30, interval=0.3, what="a global task on h1 and h2")

    h3.start_agent()
    token = h1.cli("join-token", "worker", "-q").stdout.strip()
    h3.cli("join", "--token", token, f"{h1.ip}:2377", timeout=60)
    on = wait_until(lambda: ((r := running(h1, "agents")) and len(r) == 3 and r) or None,
                    timeout=40, interval=0.3, what="a global task on the joined h3")
    assert sorted(on) == sorted([h1.name, h2.name, h3.name])

    h1.cli("node", "update", "--availability", "drain", h2.name)
    wait_until(lambda: not pid_alive(on[h2.name]["pid"]), timeout=30,
               what="the drained node's task stopped")
    wait_until(lambda: sorted(running(h1, "agents")) == sorted([h1.name, h3.name]) or None,
               timeout=30, interval=0.3, what="global tasks on h1 and h3 only")
    on_h2 = h1.cli_json("node", "ps", h2.name)
    assert [(t["service"], t["desired_state"]) for t in on_h2] == [("agents", "shutdown")]

    h1.cli("service", "create", "--name", "batch", "--mode", "replicated-job",
           "--replicas", "4", "--max-concurrent", "2", "--restart-delay", "0s", "--",
           "sh", "-c", "sleep 0.3")

    def done() -> dict[str, Any] | None:
        (svc,) = [s for s in h1.cli_json("service", "ls") if s["name"] == "batch"]
        return svc if svc["completed"] == 4 else None

    svc = wait_until(done, timeout=60, interval=0.3, what="the job's 4 completions")
    assert (svc["mode"], svc["replicas"], svc["failed"]) == ("replicated-job", 4, 0)
    time.sleep(2)  # a completed job is not restarted
    ps = h1.cli_json("service", "ps", "batch")
    assert sorted(t["state"] for t in ps) == ["complete"] * 4
    assert sorted(t["slot"] for t in ps) == [1, 2, 3, 4]
    table = h1.cli("service", "ls").stdout
    assert "global" in table and "2/2" in table
    assert "replicated-job" in table and "4/4 (0 running)" in table
    assert [t["service"] for t in h1.cli_json("node", "ps")].count("agents") == 1

    # h2 active again: the global task is back; spread over zones (h2 has none: a group of
    # its own) with at most 2 tasks a node; a task beyond that waits, saying why
    h1.cli("node", "update", "--availability", "active", h2.name)
    wait_until(lambda: len(running(h1, "agents")) == 3 or None, timeout=30, interval=0.3,
               what="the global task back on the reactivated h2")
    h1.cli("node", "update", "--label-add", "zone=a", h1.name)
    h1.cli("node", "update", "--label-add", "zone=b", h3.name)
    h1.cli("service", "create", "--name", "web", "--replicas", "5",
           "--max-replicas-per-node", "2", "--placement-pref", "spread=node.labels.zone",
           "--", "sleep", "100000")

    def per_node() -> list[int] | None:
        ps = [t for t in h1.cli_json("service", "ps", "web") if t["state"] == "running"]
        return sorted(Counter(t["node"] for t in ps).values()) if len(ps) == 5 else None

    assert wait_until(per_node, timeout=30, interval=0.3, what="web's 5 tasks") == [1, 2, 2]
    h1.cli("service", "scale", "web=7")

    def waiting() -> str | None:
        ps = h1.cli_json("service", "ps", "web")
        pending = [t for t in ps if t["state"] == "pending"]
        return pending[0]["message"] if len(pending) == 1 and \
            sum(t["state"] == "running" for t in ps) == 6 else None

    assert wait_until(waiting, timeout=30, interval=0.3, what="one task of 7 pending") == \
        "no suitable node (max replicas per node (2) 3/3)"
