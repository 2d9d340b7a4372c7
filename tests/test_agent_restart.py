"""Planned agent restarts (SIGTERM: an upgrade, `systemctl restart`) on netns hosts.

Each test names the user-visible property it checks. The agents run with the default (lan)
gossip timings, as on real hosts: a crash is detected in ~1.5 s, so a restart that were not
announced would mark the node down and replace its tasks.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from netlab import Host, Lab, pid_alive, wait_until

pytestmark = pytest.mark.netns

SLEEP = ["--", "sleep", "100000"]


def tasks_of(host: Host, service: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = host.cli_json("service", "ps", service)
    return out


def running(host: Host, service: str, n: int) -> dict[str, int]:
    """task id → pid of the service's running tasks, once exactly ``n`` run."""
    def check() -> dict[str, int] | None:
        tasks = [t for t in tasks_of(host, service)
                 if t["state"] == "running" and t["desired_state"] == "running"]
        return {t["id"]: t["pid"] for t in tasks} if len(tasks) == n else None
    return wait_until(check, timeout=40, interval=0.3, what=f"{n} running tasks of {service}")


def leader_host(lab: Lab, ask: Host) -> Host:
    nodes = ask.cli_json("node", "ls")
    return lab.host(next(n for n in nodes if n["manager_status"] == "leader")["addr"])


def restart(host: Host) -> None:
    """A planned restart: SIGTERM, wait for the exit, start the agent again."""
    rc = host.kill_agent(signal.SIGTERM, timeout=15)
    assert rc == 0, f"{host.name}: agent exited {rc} on SIGTERM\n{host.log_tail()}"
    host.start_agent()


@pytest.fixture
def cluster(lab_factory: Callable[..., Lab]) -> Lab:
    lab = lab_factory(4)
    lab.form_cluster(managers=3, workers=1)
    return lab


def test_restarting_managers_and_a_worker_keeps_every_task_and_its_pid(cluster: Lab) -> None:
    """SIGTERM + start on the leader, then a follower, then the worker, each while a 6-replica
    service runs on every host: every task keeps its pid (adopted, not restarted), none is
    orphaned or replaced, no node is marked down, leadership moved off the stopped leader
    before it stopped, and no agent logged a traceback."""
    lab = cluster
    h1 = lab.hosts[0]
    h1.cli("service", "create", "--name", "keep", "--replicas", "6", *SLEEP)
    before = running(h1, "keep", 6)
    assert len({t["node_id"] for t in tasks_of(h1, "keep")}) == 4  # spread over all hosts

    old_leader = leader_host(lab, h1)
    follower = next(h for h in lab.hosts[:3] if h is not old_leader)
    for host in (old_leader, follower, lab.hosts[3]):
        restart(host)
        ask = next(h for h in lab.hosts[:3] if h is not host)

        def back(host: Host = host, ask: Host = ask) -> bool:
            info = json.loads(host.cli("info").stdout)
            nodes = ask.cli_json("node", "ls")
            return bool(info.get("ready")) and all(n["state"] == "ready" for n in nodes)
        wait_until(back, timeout=40, interval=0.3, what=f"{host.name} back")
    assert "leadership handed over" in old_leader.agent_log.read_text()

    time.sleep(3.0)  # longer than gossip's crash detection: a missed mark would show by now
    ask = lab.hosts[0]
    after = running(ask, "keep", 6)
    assert after == before  # same tasks, same pids
    assert all(pid_alive(p) for p in after.values())
    every = tasks_of(ask, "keep")
    assert [t for t in every if t["state"] == "orphaned"] == []
    assert len(every) == 6  # nothing replaced: no history either
    for node in ask.cli_json("node", "ls"):
        assert node["state"] == "ready", node
    for host in lab.hosts:
        log = host.agent_log.read_text()
        assert "Traceback" not in log, host.log_tail(80)
        assert "node down" not in log


def test_a_planned_restart_that_never_comes_back_is_a_failure_after_the_grace(
        lab_factory: Callable[..., Lab]) -> None:
    """A worker whose agent announced an 8 s restart and stays away: the node stays ready
    during the grace, then goes down and its task is replaced elsewhere; a kill -9 (no
    announcement) goes down at gossip's speed."""
    lab = lab_factory(4)
    h1, h2, h3, h4 = lab.hosts
    lab.start_agents([h1, h2])
    # (8 s: the check at 3 s must be over before the grace ends, and a CLI call takes over a
    # second on a loaded 2-core machine)
    h3.start_agent("--restart-grace", "8")
    h4.start_agent()
    lab.form_cluster(managers=1, workers=3)
    h1.cli("node", "update", "--availability", "drain", h1.name)
    h1.cli("service", "create", "--name", "one", "--replicas", "3", *SLEEP)
    running(h1, "one", 3)

    def state_of(name: str) -> str:
        return str(next(n["state"] for n in h1.cli_json("node", "ls") if n["hostname"] == name))

    stopped = time.monotonic()  # the grace starts when the others see the announcement
    assert h3.kill_agent(signal.SIGTERM) == 0
    time.sleep(max(0.0, stopped + 3.0 - time.monotonic()))  # past gossip's ~1.5 s crash
    assert state_of(h3.name) == "ready"                     # detection, within the grace
    wait_until(lambda: state_of(h3.name) == "down", timeout=20, interval=0.2,
               what=f"{h3.name} down after its restart grace")
    assert time.monotonic() - stopped >= 8.0
    wait_until(lambda: all(t["node"] != h3.name for t in tasks_of(h1, "one")
                           if t["state"] == "running"), timeout=30, what="task moved")
    down = next(n for n in h1.cli_json("node", "ls") if n["hostname"] == h3.name)
    assert "restart" in h1.cli_json("node", "inspect", down["id"])[0]["message"]

    h4.kill_agent(signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: state_of(h4.name) == "down", timeout=15, interval=0.1,
               what=f"{h4.name} down after kill -9")
    assert time.monotonic() - killed < 4.0  # a crash is not given the grace
