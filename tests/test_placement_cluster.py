"""Placement constraints end to end: real agents on netns hosts, driven by the real CLI."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from netlab import Host, Lab, pid_alive, wait_until

pytestmark = pytest.mark.netns

SLEEP = ["--", "sleep", "100000"]


def tasks(host: Host, service: str) -> list[dict[str, Any]]:
    return [t for t in host.cli_json("service", "ps", service)
            if t["desired_state"] == "running"]


def wait_pending(host: Host, service: str, reason: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        live = tasks(host, service)
        ok = len(live) == 1 and live[0]["state"] == "pending" and live[0]["message"] == reason
        return live[0] if ok else None
    return wait_until(check, timeout=20, interval=0.3,
                      what=f"{service} pending with {reason!r}")


def wait_running_on(host: Host, service: str, node: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        ps = host.cli_json("service", "ps", service)
        running = [t for t in ps if t["state"] == "running"]
        live = [t for t in ps if t["desired_state"] == "running"]
        ok = len(running) == 1 and len(live) == 1 and running[0]["id"] == live[0]["id"] \
            and running[0]["node"] == node
        return running[0] if ok else None
    return wait_until(check, timeout=30, interval=0.3,
                      what=f"{service}'s one task running on {node} and nowhere else")


def test_constraint_waits_for_a_labelled_node_and_follows_the_label(
        lab_factory: Callable[..., Lab]) -> None:
    """`--constraint node.labels.zone==b`: pending (saying why) while no node has the label;
    runs on the node that gets it, and only there; moves when the label moves; goes back to
    pending (its process stopped) when no node has it any more; runs again once
    `service update --constraint-rm` drops the constraint."""
    lab = lab_factory(3)
    lab.form_cluster(managers=1, workers=2)
    h1, h2, h3 = lab.hosts
    h1.cli("service", "create", "--name", "zoned", "--constraint", "node.labels.zone == b",
           *SLEEP)
    reason = "no node satisfies node.labels.zone==b"
    wait_pending(h1, "zoned", reason)
    (svc,) = h1.cli_json("service", "inspect", "zoned")
    assert svc["spec"]["task"]["placement"]["constraints"] == ["node.labels.zone==b"]

    h1.cli("node", "update", "--label-add", "zone=b", h3.name)
    first = wait_running_on(h1, "zoned", h3.name)
    assert pid_alive(first["pid"])

    h1.cli("node", "update", "--label-add", "zone=b", h2.name)
    h1.cli("node", "update", "--label-rm", "zone", h3.name)
    moved = wait_running_on(h1, "zoned", h2.name)
    assert moved["id"] != first["id"]
    wait_until(lambda: not pid_alive(first["pid"]), timeout=20, what="old task stopped")

    h1.cli("node", "update", "--label-rm", "zone", h2.name)
    wait_pending(h1, "zoned", reason)
    wait_until(lambda: not pid_alive(moved["pid"]), timeout=20, what="moved task stopped")

    # dropping the constraint lets the waiting slot run anywhere
    h1.cli("service", "update", "--constraint-rm", "node.labels.zone==b", "zoned")
    wait_until(lambda: [t["state"] for t in tasks(h1, "zoned")] == ["running"], timeout=30,
               what="zoned running once its constraint is removed")
    assert h1.cli_json("service", "inspect", "zoned")[0]["spec"]["task"]["placement"][
        "constraints"] == []
