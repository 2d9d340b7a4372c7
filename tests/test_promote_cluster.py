"""`shoal node promote` / `node demote` on real agents in netns hosts, through the CLI.

Each test names the user-visible property it checks: a promoted worker becomes a Raft
voter holding the Raft secret (and survives the old leader's death as one of the new
majority); a demoted manager forgets every manager secret; neither switch restarts the
node's tasks; the refusals are one `Error:` line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from netlab import Host, Lab, pid_alive, wait_until

pytestmark = pytest.mark.netns

SLEEP = ["--", "sleep", "100000"]


def node_json(host: Host) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((host.data_dir / "node.json").read_text())
    return data


def plain_json(host: Host, *args: str) -> Any:
    """Commands that print JSON without a --format option (`info`, `ca info`)."""
    return json.loads(host.cli(*args).stdout)


def raft_log_files(host: Host) -> list[str]:
    """The Raft journal (and its meta) and dump: the replicated log kept on disk."""
    d = host.data_dir / "raft"
    return sorted(p.name for p in [*d.glob("raft.journal*"), *d.glob("raft.dump*")])


def tasks_on(host: Host, ask: Host, service: str) -> dict[str, int]:
    """{task id: pid} of the running tasks of ``service`` on ``host``."""
    return {t["id"]: t["pid"] for t in ask.cli_json("service", "ps", service)
            if t["node"] == host.name and t["state"] == "running"
            and t["desired_state"] == "running"}


def node_row(ask: Host, name: str) -> dict[str, Any]:
    row: dict[str, Any] = next(n for n in ask.cli_json("node", "ls") if n["hostname"] == name)
    return row


def leader_of(lab: Lab, ask: Host) -> Host:
    row = next(n for n in ask.cli_json("node", "ls") if n["manager_status"] == "leader")
    return lab.host(row["addr"])


def error_line(host: Host, *args: str) -> str:
    res = host.cli(*args, check=False)
    assert res.returncode == 1, (args, res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    return lines[0]


def test_promote_then_demote_keeps_tasks_and_moves_the_secrets(
        lab_factory: Callable[..., Lab]) -> None:
    """1 manager + 2 workers running a service: promote both workers (Raft secret and 3
    voters), kill -9 the leader and a new leader takes writes; demoting the (new) leader hands
    leadership over first and the demoted node keeps no manager secret; the tasks of the
    promoted/demoted nodes are never restarted."""
    lab = lab_factory(3)
    lab.form_cluster(managers=1, workers=2)
    h1, h2, h3 = lab.hosts
    h1.cli("service", "create", "--name", "keep", "--replicas", "3", *SLEEP)
    wait_until(lambda: len(tasks_on(h2, h1, "keep")) == 1 == len(tasks_on(h3, h1, "keep")),
               timeout=30, what="one task on each worker")
    before = {h.name: tasks_on(h, h1, "keep") for h in (h2, h3)}
    assert node_json(h2)["raft_password"] == "" and node_json(h2)["manager_key"] == ""
    # managers probe every suspect they hear of (gossip confirmers), workers do not
    assert plain_json(h1, "info")["gossip"]["confirms_suspicions"] is True
    assert plain_json(h2, "info")["gossip"]["confirms_suspicions"] is False

    res = h1.cli("node", "promote", "h2")
    assert "Node h2 promoted to a manager" in res.stdout, res.stdout
    assert "Warning: the cluster now has 2 managers" in res.stderr, res.stderr
    wait_until(lambda: node_row(h1, "h2")["manager_status"] == "reachable", timeout=20,
               what="h2 reachable manager in node ls")
    wait_until(lambda: node_json(h2)["role"] == "manager", timeout=20, what="h2 switched")
    ident = node_json(h2)
    assert ident["raft_password"] == node_json(h1)["raft_password"] != ""
    assert ident["manager_key"] == node_json(h1)["manager_key"] != ""
    assert "raft.journal" in raft_log_files(h2)
    info = plain_json(h2, "info")
    assert info["role"] == "manager" and len(info["voters"]) == 2, info
    assert info["gossip"]["confirms_suspicions"] is True
    assert h2.cli_json("service", "ls")[0]["name"] == "keep"  # a manager's API now
    assert plain_json(h2, "ca", "info")["node_certificate"]["role"] == "manager"
    assert "Node h2 is already a manager" in h1.cli("node", "promote", "h2").stdout

    h2.cli("node", "promote", "h3")  # from the follower: forwarded to the leader
    # answered once h3 runs its voter (2 → 3 voters commits with the old two: the answer
    # came before h3 ran it, and a demote right after waited 20 s for its switch)
    assert node_row(h1, "h3")["manager_status"] == "reachable"
    wait_until(lambda: node_json(h3)["role"] == "manager"
               and len(plain_json(h3, "info")["voters"]) == 3, timeout=20, what="h3 a voter")

    # the two promoted nodes are a majority: the leader's death does not stop the cluster
    h1.kill_agent()

    def scaled() -> bool:
        return h2.cli("service", "scale", "keep=4", check=False, timeout=15).returncode == 0
    wait_until(scaled, timeout=20, interval=0.3, what="scale accepted by a new leader")
    new = leader_of(lab, h2)
    assert new in (h2, h3)
    # with h1 down, demoting h2 or h3 would leave 1 reachable of 2 managers
    assert "quorum" in error_line(new, "node", "demote", "h3" if new is h3 else "h2")
    h1.start_agent()

    def settled() -> bool:
        """h1 caught up, and every manager sees the same leader and the others connected:
        h1's restart may cost an election, and a new leader's view of its peers is what
        the demotion's quorum check reads."""
        if not plain_json(h1, "info")["ready"]:
            return False
        leaders = set()
        for ask in (h1, h2, h3):
            rows = [n for n in ask.cli_json("node", "ls") if n["role"] == "manager"]
            if len(rows) != 3 or any(n["state"] != "ready" or n["manager_status"] not in
                                     ("leader", "reachable") for n in rows):
                return False
            leaders |= {n["hostname"] for n in rows if n["manager_status"] == "leader"}
        return len(leaders) == 1
    wait_until(settled, timeout=30, what="h1 back as a reachable manager, one leader")
    new = leader_of(lab, h1)  # h2 or h3, or h1 if its restart won an election
    ask, other = (h for h in (h1, h2, h3) if h is not new)
    # a live manager is not removed behind its back, even with --force (Swarm: demote first;
    # its voter was removed and it went on as a manager no one answered)
    assert "demote it first" in error_line(ask, "node", "rm", "--force", other.name)
    assert len(plain_json(other, "info")["voters"]) == 3

    # demote the current leader, asked on a follower: leadership is handed over first
    res = ask.cli("node", "demote", new.name)
    assert f"Manager {new.name} demoted" in res.stdout, res.stdout
    assert "Warning: the cluster now has 2 managers" in res.stderr, res.stderr
    ident = node_json(new)
    assert ident["role"] == "worker" and ident["raft_password"] == "" \
        and ident["manager_key"] == "", ident
    assert raft_log_files(new) == []
    assert plain_json(new, "info")["gossip"]["confirms_suspicions"] is False
    assert plain_json(new, "ca", "info")["node_certificate"]["role"] == "worker"
    assert "worker" in error_line(new, "service", "ls")
    assert len(plain_json(other, "info")["voters"]) == 2
    assert leader_of(lab, ask) is not new
    assert node_row(ask, new.name)["role"] == "worker"
    assert "already a worker" in ask.cli("node", "demote", new.name).stdout
    ask.cli("service", "scale", "keep=5")  # the cluster still takes writes

    # the tasks of both switched nodes are the very same processes
    for h in (h2, h3):
        now = tasks_on(h, ask, "keep")
        assert before[h.name].items() <= now.items(), (h.name, before[h.name], now)
        assert all(pid_alive(p) for p in before[h.name].values())


def test_demote_and_promote_refusals(lab_factory: Callable[..., Lab]) -> None:
    """The last manager cannot be demoted; unknown nodes are named; a worker cannot promote
    anyone; promoting/demoting a node already in that role says so and changes nothing."""
    lab = lab_factory(2)
    lab.form_cluster(managers=1, workers=1)
    h1, h2 = lab.hosts
    assert "can't demote the last manager" in error_line(h1, "node", "demote", "h1")
    assert "no such node: nope" in error_line(h1, "node", "promote", "nope")
    assert "no such node: nope" in error_line(h1, "node", "demote", "nope")
    assert "worker" in error_line(h2, "node", "promote", "h2")
    assert "can't demote the last manager" in error_line(h1, "node", "update", "--role",
                                                         "worker", "h1")
    assert "Node h1 is already a manager." in h1.cli("node", "promote", "h1").stdout
    assert "Node h2 is already a worker." in h1.cli("node", "demote", "h2").stdout
    assert len(plain_json(h1, "info")["voters"]) == 1
    assert node_json(h2)["role"] == "worker"


def test_a_manager_that_left_is_removed_and_one_still_voting_is_not(
        lab_factory: Callable[..., Lab]) -> None:
    """The Ansible role removes a manager with `leave --force` (its voter goes) and then
    `node rm --force` if its record is left: that works whatever state the record shows;
    a live manager still in the Raft group is refused even with --force (Swarm: demote
    first), and stays a voter."""
    lab = lab_factory(3)
    lab.form_cluster(managers=3)
    h1, _, h3 = lab.hosts
    assert "demote it first" in error_line(h1, "node", "rm", "--force", "h2")
    assert len(plain_json(h1, "info")["voters"]) == 3
    h3.cli("leave", "--force")
    wait_until(lambda: len(plain_json(h1, "info")["voters"]) == 2, timeout=20,
               what="h3's voter gone")
    if any(n["hostname"] == "h3" for n in h1.cli_json("node", "ls")):
        h1.cli("node", "rm", "--force", "h3")
    assert all(n["hostname"] != "h3" for n in h1.cli_json("node", "ls"))
    h1.cli("service", "create", "--name", "still", "--replicas", "1", *SLEEP)  # (a quorum)
