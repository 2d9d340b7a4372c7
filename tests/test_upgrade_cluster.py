"""Rolling upgrade from shoal 0.1 on netns hosts (issue 11, item 4): one node at a time, the
cluster stays writable, tasks keep running, and the data schema rises only at the end.

Three managers and a worker start on the previous release (tests/oldrelease.py: commit
e37643f, flat ServiceSpec, schema 1); a 3-replica service is created with that release's CLI.
Then each node in turn — the followers, then the leader, then the worker — gets SIGTERM and
is started with today's code on the same data dir. A write is accepted while the node is
away, and another after it is back (through a restarted manager's CLI); every manager (old
and new CLIs alike) converges on the same service list, every service runs its replicas,
tasks on nodes not restarted yet keep their pids, and while any node runs 0.1 the cluster
schema stays 1. At the end today's CLI shows every service with its replicas, every agent
announces today's schema, the leader has raised the cluster schema to it (``cluster_schema`` in
``shoal info``, shoal.node.upgrade), the cluster still takes writes, and a 0.1 agent that
tries to join now is refused.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

import pytest

import oldrelease
from netlab import Host, Lab, pid_alive, wait_until
from shoal.raft.schema import SCHEMA

pytestmark = pytest.mark.netns

SLEEP = ["--", "sleep", "100000"]


def info(h: Host) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(h.cli("info").stdout)
    return out


def service_list(h: Host) -> dict[str, int]:
    """name → replicas, as this host's CLI (old or new) shows it."""
    return {s["name"]: int(s["replicas"]) for s in h.cli_json("service", "ls")}


def running(h: Host, svc: str, n: int, timeout: float = 60) -> dict[str, tuple[str, int]]:
    """Wait for exactly ``n`` running tasks of ``svc``: task id → (node id, pid)."""
    def check() -> dict[str, tuple[str, int]] | None:
        ts = [t for t in h.cli_json("service", "ps", svc)
              if t["state"] == "running" and t["desired_state"] == "running"]
        return {t["id"]: (t["node_id"], int(t["pid"])) for t in ts} if len(ts) == n else None
    return wait_until(check, timeout=timeout, interval=0.3, what=f"{n} running {svc} on {h}")


def create(h: Host, name: str, replicas: int = 1) -> None:
    """Create ``name`` through ``h`` until it exists (a write that timed out during an
    election may still apply: then the service is there and the retry is not needed)."""
    def once() -> bool:
        if name in service_list(h):
            return True
        h.cli("service", "create", "--name", name, "--replicas", str(replicas), *SLEEP,
              timeout=40)
        return True
    wait_until(once, timeout=60, interval=0.5, what=f"service {name} created through {h}")


def converged(managers: list[Host], expected: dict[str, int]) -> None:
    """Every manager's CLI lists exactly ``expected``."""
    def check() -> bool:
        views = {h.name: service_list(h) for h in managers}
        assert_msg.clear()
        assert_msg.update(views)
        return all(v == expected for v in views.values())
    assert_msg: dict[str, Any] = {}
    try:
        wait_until(check, timeout=60, interval=0.5, what=f"every manager lists {expected}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last views: {assert_msg}") from None


def test_rolling_upgrade_from_0_1_keeps_the_cluster_writable_and_raises_the_schema_last(
        lab_factory: Callable[..., Lab], old_release: oldrelease.Release) -> None:
    lab = lab_factory(5)  # h5: a 0.1 node that tries to join after the upgrade
    for h in lab:
        h.use_shoal(old_release.argv, old_release.env)
    lab.form_cluster(managers=3, workers=1, timeout=90)
    managers, worker, late = lab.hosts[:3], lab.hosts[3], lab.hosts[4]
    members = lab.hosts[:4]
    node_of = {h.name: info(h)["node_id"] for h in members}
    assert all("schema" not in info(h) for h in members)  # really 0.1: no schema in info

    h1 = lab.hosts[0]
    h1.cli("service", "create", "--name", "web", "--replicas", "3", *SLEEP)  # the old CLI
    web = running(h1, "web", 3)
    expected = {"web": 3}

    leader = next(h for h in managers if info(h)["is_leader"])
    order = [h for h in managers if h is not leader] + [leader, worker]
    restarted: list[Host] = []
    for step, h in enumerate(order, start=1):
        rc = h.kill_agent(signal.SIGTERM, timeout=60)  # 0.1 managers take ~20 s
        assert rc is not None, f"{h}: no agent to stop"
        # writable while the node is away (through a restarted manager if any, else 0.1's CLI)
        up = [m for m in managers if m.agent_alive()]
        via = next((m for m in reversed(restarted) if m in up), up[0])
        create(via, f"down{step}")
        expected[f"down{step}"] = 1
        h.use_shoal()  # today's code, same data dir
        h.start_agent(timeout=60)
        restarted.append(h)
        new_managers = [m for m in restarted if m in managers]
        writer = new_managers[-1]

        def rejoined(h: Host = h, writer: Host = writer) -> bool:
            me = info(h)
            nodes = writer.cli_json("node", "ls")
            return bool(me.get("member") and me.get("ready") and me.get("schema") == SCHEMA
                        and len(nodes) == 4 and all(n["state"] == "ready" for n in nodes))
        wait_until(rejoined, timeout=60, interval=0.5,
                   what=f"step {step}: {h.name} back on today's code, all 4 nodes ready")
        assert info(h)["node_id"] == node_of[h.name]  # same identity, same data dir

        # the cluster takes a write through today's CLI while older nodes still run 0.1
        create(writer, f"step{step}")
        expected[f"step{step}"] = 1
        if step == 2:
            writer.cli("service", "scale", "web=4")
            expected["web"] = 4
        converged(managers, expected)
        for name, n in expected.items():
            now = running(writer, name, n)
            if name == "web":
                for tid, (nid, pid) in web.items():
                    if nid not in {node_of[r.name] for r in restarted}:
                        assert now.get(tid) == (nid, pid), (
                            f"step {step}: task {tid} on a node not yet restarted changed: "
                            f"{(nid, pid)} -> {now.get(tid)}")
                        assert pid_alive(pid)
        if step < len(order):  # mixed cluster: still schema 1
            assert info(writer)["cluster_schema"] == 1

    # every node on today's code: today's CLI shows every service with its replicas. (Tasks
    # of a node while it restarts are not checked: a 0.1 agent cannot announce a planned
    # restart, so the leader may see the node down and replace them — Swarm does the same.)
    assert service_list(h1) == expected
    for name, n in expected.items():
        running(h1, name, n)

    views: dict[str, tuple[Any, Any]] = {}

    def raised() -> bool:
        views.update({h.name: (info(h).get("schema"), info(h).get("cluster_schema"))
                      for h in members})
        return all(v == (SCHEMA, SCHEMA) for v in views.values())
    try:
        wait_until(raised, timeout=30, interval=0.5,
                   what=f"every node announcing schema {SCHEMA} and seeing cluster schema "
                        f"{SCHEMA}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; (schema, cluster_schema) per host: {views}") from None
    # and the cluster still takes writes at today's schema
    create(h1, "after")
    running(h1, "after", 1)

    # a 0.1 agent can no longer join: it could not read what the cluster now writes
    late.start_agent()
    token = h1.cli("join-token", "worker", "-q").stdout.strip()
    res = late.cli("join", "--token", token, f"{h1.ip}:2377", check=False)
    assert res.returncode != 0, res.stdout
    assert "upgrade shoal on this node" in res.stdout + res.stderr, (res.stdout, res.stderr)
    assert len(h1.cli_json("node", "ls")) == 4
