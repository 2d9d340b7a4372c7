"""Generic resources end to end (Swarm's ``--generic-resource``): real agents on netns
hosts, driven by the real CLI; a task's DOCKER_RESOURCE_* read from its process."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from netlab import Host, Lab, pid_alive, wait_until

pytestmark = pytest.mark.netns

REASON = "no suitable node (insufficient generic resource gpu 3/3)"


def live(host: Host, service: str) -> list[dict[str, Any]]:
    return [t for t in host.cli_json("service", "ps", service)
            if t["desired_state"] == "running"]


def gpu_of(pid: int) -> str:
    """The DOCKER_RESOURCE_GPU the task's process was started with."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    values = [e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"DOCKER_RESOURCE_GPU=")]
    assert len(values) == 1, env
    return values[0]


def test_named_gpus_go_one_per_task_and_the_rest_wait_saying_why(
        lab_factory: Callable[..., Lab]) -> None:
    """A node given SSD=2 by its agent's flag advertises it; a node advertising GPU=a and
    GPU=b (`node update`) runs two of three 1-gpu tasks, each with its own
    ID; the third is pending with the reason; scaled to 2 all run; after an agent restart
    (tasks running on) a new task gets the node's free ID, not one a running task holds;
    taking the node's GPUs away keeps the running tasks running (shoal's rule,
    docs/architecture.md) and places no new one."""
    lab = lab_factory(3)
    h1, h2, h3 = lab.hosts
    h3.agent_args = ("--generic-resource", "SSD=2")  # (Swarm's node-generic-resources)
    lab.form_cluster(managers=1, workers=2)
    (node,) = h1.cli_json("node", "inspect", h3.name)
    assert node["resources"]["generic_resources"] == {"SSD": 2}
    h1.cli("node", "update", "--generic-resource-add", "GPU=a", "--generic-resource-add",
           "GPU=b", h2.name)
    (node,) = h1.cli_json("node", "inspect", h2.name)
    assert node["resources"]["generic_resources"] == {"GPU": ["a", "b"]}
    bad = h1.cli("node", "update", "--generic-resource-add", "GPU=3", h2.name, check=False)
    assert bad.returncode != 0 and "generic_resource_add" in bad.stderr + bad.stdout

    h1.cli("service", "create", "--name", "train", "--replicas", "3", "--generic-resource",
           "gpu=1", "--", "sleep", "100000")

    def placed() -> list[dict[str, Any]] | None:
        tasks = live(h1, "train")
        running = [t for t in tasks if t["state"] == "running" and t.get("pid")]
        pending = [t for t in tasks if t["state"] == "pending" and t["message"] == REASON]
        return running if len(running) == 2 and len(pending) == 1 else None
    running = wait_until(placed, timeout=60, interval=0.5,
                         what="two tasks running, one pending with the reason")
    assert {t["node"] for t in running} == {h2.name}
    assert sorted(gpu_of(t["pid"]) for t in running) == ["a", "b"]
    (node,) = h1.cli_json("node", "inspect", h2.name)
    assert node["resources"]["reserved_generic_resources"] == {"gpu": 2}

    h1.cli("service", "scale", "train=2")
    wait_until(lambda: [t["state"] for t in live(h1, "train")] == ["running", "running"],
               timeout=30, interval=0.5, what="both tasks running, none pending")
    held = {t["id"]: gpu_of(t["pid"]) for t in running}

    # the agent restarts, its tasks run on: it reads back which IDs they hold
    h2.restart_agent()
    h1.cli("node", "update", "--generic-resource-add", "GPU=c", h2.name)
    h1.cli("service", "scale", "train=3")

    def three() -> list[dict[str, Any]] | None:
        tasks = [t for t in live(h1, "train") if t["state"] == "running" and t.get("pid")]
        return tasks if len(tasks) == 3 else None
    now = wait_until(three, timeout=60, interval=0.5, what="three tasks running on h2")
    assert {t["id"]: gpu_of(t["pid"]) for t in now if t["id"] in held} == held
    assert sorted(gpu_of(t["pid"]) for t in now) == ["a", "b", "c"]

    h1.cli("node", "update", "--generic-resource-rm", "GPU", h2.name)
    (node,) = h1.cli_json("node", "inspect", h2.name)
    assert node["resources"]["generic_resources"] == {}
    h1.cli("service", "scale", "train=4")
    wait_until(lambda: any(t["state"] == "pending" and t["message"] == REASON
                           for t in live(h1, "train")), timeout=30, interval=0.5,
               what="the new task pending: the node has no GPU any more")
    time.sleep(2)  # (a pass or two of the leader and the worker)
    still = [t for t in live(h1, "train") if t["state"] == "running"]
    assert sorted(t["id"] for t in still) == sorted(t["id"] for t in now)
    assert all(pid_alive(t["pid"]) for t in still)
