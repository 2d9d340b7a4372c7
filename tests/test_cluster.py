"""The walking skeleton end to end: real agents on netns hosts, driven by the real CLI.

Each test names the user-visible property it checks. Tasks are `sleep` processes (or
`python3 -m http.server`) started by the real runtime in their own namespaces.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from netlab import Host, Lab, pid_alive, wait_until
from shoal.cli.errors import CliError
from shoal.cli.main import Client
from shoal.node.version import version

pytestmark = pytest.mark.netns

SLEEP = ["--", "sleep", "100000"]


def running(host: Host, service: str) -> list[dict[str, Any]]:
    return [t for t in host.cli_json("service", "ps", service)
            if t["state"] == "running" and t["desired_state"] == "running"]


def wait_running(host: Host, service: str, n: int, timeout: float = 30.0
                 ) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        tasks = running(host, service)
        everything = host.cli_json("service", "ps", service)
        extra = [t for t in everything if t["state"] == "running"
                 and t["desired_state"] != "running"]
        return tasks if len(tasks) == n and not extra else None
    return wait_until(check, timeout=timeout, interval=0.3,
                      what=f"exactly {n} running tasks of {service} on {host.name}")


def leader_host(lab: Lab, ask: Host) -> Host:
    nodes = ask.cli_json("node", "ls")
    leader = next(n for n in nodes if n["manager_status"] == "leader")
    return lab.host(leader["addr"])


@pytest.fixture
def cluster5(lab_factory: Callable[..., Lab]) -> Lab:
    lab = lab_factory(5)
    lab.form_cluster(managers=3, workers=2)
    return lab


def test_replicas_spread_scale_and_rm_leaves_no_process(cluster5: Lab) -> None:
    """3 managers + 2 workers: 6 replicas spread ≤2 per host; scale 10 then 2 converge; rm
    stops every task process."""
    h1 = cluster5.hosts[0]
    # every node announces its agent's version on gossip: `node ls` shows it (issue 18)
    wait_until(lambda: {n["version"] for n in h1.cli_json("node", "ls")} == {version()},
               timeout=20, what="every node's version in node ls")
    assert "VERSION" in h1.cli("node", "ls").stdout.splitlines()[0]
    h1.cli("service", "create", "--name", "sleeper", "--replicas", "6", *SLEEP)
    tasks = wait_running(h1, "sleeper", 6)
    per_node = Counter(t["node"] for t in tasks)
    assert len(per_node) == 5 and max(per_node.values()) <= 2, per_node
    assert all(pid_alive(t["pid"]) for t in tasks)

    h1.cli("service", "scale", "sleeper=10")
    tasks = wait_running(h1, "sleeper", 10)
    assert sorted(t["slot"] for t in tasks) == list(range(1, 11))
    assert max(Counter(t["node"] for t in tasks).values()) == 2

    h1.cli("service", "scale", "sleeper=2")
    tasks = wait_running(h1, "sleeper", 2)
    assert sorted(t["slot"] for t in tasks) == [1, 2]
    ls = h1.cli_json("service", "ls")
    assert [(s["name"], s["replicas"], s["running"]) for s in ls] == [("sleeper", 2, 2)]

    pids = [t["pid"] for t in tasks]
    h1.cli("service", "rm", "sleeper")
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=20,
               what="task processes gone after rm")
    assert h1.cli_json("service", "ls") == []
    # every host's runtime forgot its tasks (no task dirs, no shims)
    wait_until(lambda: all(not list((h.data_dir / "tasks").glob("*"))
                           for h in cluster5.hosts), timeout=20, what="task dirs removed")


def test_leader_killed_new_leader_and_old_one_catches_up(cluster5: Lab) -> None:
    """kill -9 the leader: a new one is elected, writes succeed within seconds, nothing is
    lost; the old leader restarted rejoins as a follower and catches up."""
    h1 = cluster5.hosts[0]
    h1.cli("service", "create", "--name", "keep", "--replicas", "4", *SLEEP)
    before = wait_running(h1, "keep", 4)
    old = leader_host(cluster5, h1)
    survivor = next(h for h in cluster5.hosts[:3] if h is not old)
    old.kill_agent()

    # a write is accepted within a few seconds of the leader's death
    def scaled() -> bool:
        res = survivor.cli("service", "scale", "keep=5", check=False, timeout=15)
        return res.returncode == 0
    wait_until(scaled, timeout=15, interval=0.2, what="scale accepted after leader loss")
    new = leader_host(cluster5, survivor)
    assert new is not old
    after = wait_running(survivor, "keep", 5, timeout=40)
    # tasks not on the dead node are the same tasks as before (no record lost)
    kept = {t["id"] for t in before if t["node"] != old.name}
    assert kept <= {t["id"] for t in after}

    old.start_agent()

    def caught_up() -> bool:
        mine = old.cli_json("service", "ps", "keep")
        theirs = survivor.cli_json("service", "ps", "keep")
        info = old.cli_json("node", "ls")
        me = next(n for n in info if n["addr"] == old.ip)
        return (me["state"] == "ready" and me["manager_status"] == "reachable"
                and {t["id"] for t in mine} == {t["id"] for t in theirs})
    wait_until(caught_up, timeout=30, what="old leader rejoined as follower with same tasks")
    assert leader_host(cluster5, old) is not old
    wait_running(old, "keep", 5, timeout=40)


def test_worker_killed_tasks_replaced_and_stale_ones_stopped(cluster5: Lab) -> None:
    """kill -9 a worker's agent: its tasks run elsewhere; when it comes back its stale tasks
    are stopped, so there are never more replicas than asked once it has settled."""
    h1, worker = cluster5.hosts[0], cluster5.hosts[4]
    h1.cli("service", "create", "--name", "busy", "--replicas", "5", *SLEEP)
    tasks = wait_running(h1, "busy", 5)
    stale = [t for t in tasks if t["node"] == worker.name]
    assert stale, "the scheduler put a task on every node"
    worker.kill_agent()
    # the tasks themselves keep running while the agent is dead...
    assert all(pid_alive(t["pid"]) for t in stale)

    def replaced() -> list[dict[str, Any]] | None:
        nodes = {n["hostname"]: n["state"] for n in h1.cli_json("node", "ls")}
        r = running(h1, "busy")
        ok = nodes[worker.name] == "down" and len(r) == 5 and all(
            t["node"] != worker.name for t in r)
        return r if ok else None
    wait_until(replaced, timeout=30, what="worker down and its tasks replaced elsewhere")

    worker.start_agent()
    wait_until(lambda: not any(pid_alive(t["pid"]) for t in stale), timeout=30,
               what="stale tasks stopped after the worker came back")
    wait_until(lambda: {n["hostname"]: n["state"] for n in h1.cli_json("node", "ls")}[
        worker.name] == "ready", timeout=20, what="worker ready again")
    final = wait_running(h1, "busy", 5)
    assert len(final) == 5


def test_bad_inputs_give_one_clear_line(lab_factory: Callable[..., Lab]) -> None:
    """User mistakes: one line on stderr, non-zero exit, no traceback."""
    lab = lab_factory(3)
    h1, h2, h3 = lab.hosts
    lab.start_agents(lab.hosts)

    def err(host: Host, *args: str) -> str:
        res = host.cli(*args, check=False)
        assert res.returncode != 0, (args, res.stdout)
        assert "Traceback" not in res.stderr, res.stderr
        lines = res.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("Error: "), res.stderr
        return lines[-1]

    assert "not part of a cluster" in err(h1, "service", "ls")
    assert "overlaps" in err(h1, "init", "--cluster-cidr", "10.98.0.0/16")
    assert "CIDR" in err(h1, "init", "--cluster-cidr", "banana")
    h1.cli("init")
    assert "already part of a cluster" in err(h1, "init")
    assert "no such service: nope" in err(h1, "service", "ps", "nope")
    assert "no such service" in err(h1, "service", "scale", "nope=3")
    assert "replica" in err(h1, "service", "scale", "x=-1")
    assert "replicas" in err(h1, "service", "create", "--name", "a", "--replicas", "-2", *SLEEP)
    assert "name" in err(h1, "service", "create", "--name", "Bad.Name", *SLEEP)
    assert "needs a command" in err(h1, "service", "create", "--name", "a")
    assert "--env" in err(h1, "service", "create", "--name", "a", "--env", "=x", *SLEEP)
    h1.cli("service", "create", "--name", "dup", *SLEEP)
    assert "already exists" in err(h1, "service", "create", "--name", "dup", *SLEEP)
    assert "no such node" in err(h1, "node", "inspect", "ghost")

    # wrong tokens are refused, right ones distinguish worker from manager
    good = h1.cli("join-token", "worker", "-q").stdout.strip()
    wrong = good[:-4] + ("0000" if not good.endswith("0000") else "1111")
    assert "invalid join token" in err(h2, "join", "--token", wrong, f"{h1.ip}:2377")
    assert "invalid join token format" in err(h2, "join", "--token", "hello", f"{h1.ip}:2377")
    h2.cli("join", "--token", good, f"{h1.ip}:2377")
    assert "worker" in err(h2, "service", "ls")
    # a rotated token stops working; joined nodes are unaffected
    h1.cli("join-token", "worker", "--rotate")
    assert "invalid join token" in err(h3, "join", "--token", good, f"{h1.ip}:2377")
    new = h1.cli("join-token", "worker", "-q").stdout.strip()
    h3.cli("join", "--token", new, f"{h1.ip}:2377")

    # agent not running
    h3.kill_agent()
    assert "is it running" in err(h3, "node", "ls")
    res = h1.cli("service", "ps", "dup", "--format", "json")
    assert res.returncode == 0


def test_managers_restarted_after_kill_keep_their_state(lab_factory: Callable[..., Lab]
                                                        ) -> None:
    """Raft log and snapshot persist in the data dir: kill -9 every manager, restart them,
    and the cluster still knows its nodes, services and tasks (and the tasks kept running)."""
    lab = lab_factory(3)
    lab.form_cluster(managers=3)
    h1 = lab.hosts[0]
    h1.cli("service", "create", "--name", "durable", "--replicas", "3", *SLEEP)
    before = wait_running(h1, "durable", 3)
    nodes_before = {n["id"] for n in h1.cli_json("node", "ls")}
    for h in lab.hosts:
        h.kill_agent()
    lab.start_agents(lab.hosts)
    after = wait_running(h1, "durable", 3, timeout=40)
    assert {t["id"] for t in after} == {t["id"] for t in before}
    assert {t["pid"] for t in after} == {t["pid"] for t in before}  # adopted, not restarted
    assert {n["id"] for n in h1.cli_json("node", "ls")} == nodes_before
    # and it still takes writes
    h1.cli("service", "scale", "durable=4")
    wait_running(h1, "durable", 4, timeout=30)


def test_rolling_update_and_rollback(lab_factory: Callable[..., Lab]) -> None:
    """`service update` replaces tasks one at a time with the new spec; `rollback` returns
    to the previous one; a stale version is refused."""
    lab = lab_factory(3)
    lab.form_cluster(managers=1, workers=2)
    h1 = lab.hosts[0]
    h1.cli("service", "create", "--name", "roll", "--replicas", "3", "--env", "V=1", *SLEEP)
    v1 = {t["id"] for t in wait_running(h1, "roll", 3)}
    h1.cli("service", "update", "--env-add", "V=2", "roll")

    def updated() -> list[dict[str, Any]] | None:
        tasks = running(h1, "roll")
        ids = {t["id"] for t in tasks}
        return tasks if len(tasks) == 3 and not ids & v1 else None
    wait_until(updated, timeout=40, what="all 3 tasks replaced by the update")
    spec = h1.cli_json("service", "inspect", "roll")[0]
    env = spec["spec"]["task"]["container"]["env"]
    assert env == {"V": "2"} and spec["previous_spec"]["task"]["container"]["env"] == {"V": "1"}
    v2 = {t["id"] for t in running(h1, "roll")}
    h1.cli("service", "rollback", "roll")
    wait_until(lambda: len(running(h1, "roll")) == 3 and not {
        t["id"] for t in running(h1, "roll")} & v2, timeout=40, what="rolled back")
    back = h1.cli_json("service", "inspect", "roll")[0]
    assert back["spec"]["task"]["container"]["env"] == {"V": "1"}
    wait_until(lambda: h1.cli_json("service", "inspect", "roll")[0]["update_status"]["state"]
               == "rollback_completed", timeout=20, what="rollback_completed")
    stale = Client(f"unix://{h1.sock}")
    with pytest.raises(CliError, match="changed meanwhile"):
        stale.call("POST", "/v1/services/roll/update",
                   {"spec": spec["spec"], "version": spec["version"]})


def test_only_task_template_changes_replace_tasks(lab_factory: Callable[..., Lab]) -> None:
    """Changing update/rollback settings, the restart policy, the balancer or labels of a
    running 3-replica service restarts nothing (same tasks, same pids); changing its env
    replaces all three, one at a time (never fewer than 2 running), and the update status
    ends ``completed``."""
    lab = lab_factory(3)
    lab.form_cluster(managers=1, workers=2)
    h1 = lab.hosts[0]
    h1.cli("service", "create", "--name", "tmpl", "--replicas", "3", "-p", "8080:8000", *SLEEP)
    before = {t["id"]: t["pid"] for t in wait_running(h1, "tmpl", 3)}
    h1.cli("service", "update", "--update-parallelism", "1", "--update-delay", "1s",
           "--rollback-parallelism", "3", "--restart-delay", "2s", "--restart-max-attempts", "5",
           "--lb", "least-conn", "--label-add", "team=a", "tmpl")
    svc = h1.cli_json("service", "inspect", "tmpl")[0]
    assert svc["version"] == 2 and svc["spec"]["update"]["delay"] == 1.0
    assert svc["spec"]["endpoint"]["lb_algorithm"] == "least-conn"
    for _ in range(10):  # the leader has had several passes to (wrongly) replace something
        assert {t["id"]: t["pid"] for t in running(h1, "tmpl")} == before
    h1.cli("service", "update", "--env-add", "V=2", "tmpl")
    fewest = 3

    def replaced() -> bool:
        nonlocal fewest
        tasks = running(h1, "tmpl")
        fewest = min(fewest, len(tasks))
        return len(tasks) == 3 and not {t["id"] for t in tasks} & set(before)
    wait_until(replaced, timeout=60, interval=0.1, what="all 3 tasks replaced")
    assert fewest >= 2, f"{3 - fewest} tasks were down at once with update parallelism 1"
    wait_until(lambda: h1.cli_json("service", "inspect", "tmpl")[0]["update_status"]["state"]
               == "completed", timeout=20, what="update status completed")


def test_a_failing_update_pauses_after_the_first_task(lab_factory: Callable[..., Lab]) -> None:
    """Swarm's default failure action: an update whose first replacement fails stops there —
    at most one task replaced, two old tasks still running, ``service inspect`` says why —
    and `service rollback` restores the service."""
    lab = lab_factory(3)
    lab.form_cluster(managers=1, workers=2)
    h1 = lab.hosts[0]
    h1.cli("service", "create", "--name", "frail", "--replicas", "3", "--update-delay", "10s",
           "--restart-delay", "0.2s", *SLEEP)
    v1 = {t["id"] for t in wait_running(h1, "frail", 3)}
    h1.cli("service", "update", "frail", "--", "sh", "-c", "exit 3")

    def paused() -> dict[str, Any] | None:
        svc = h1.cli_json("service", "inspect", "frail")[0]
        return svc if svc["update_status"]["state"] == "paused" else None
    svc = wait_until(paused, timeout=30, what="the update paused")
    assert "exit" in svc["update_status"]["message"] or "3" in svc["update_status"]["message"]
    for _ in range(15):  # several restart delays later: still only one slot replaced
        old = {t["id"] for t in running(h1, "frail")} & v1
        assert len(old) == 2, f"old tasks still running: {len(old)}"
    h1.cli("service", "rollback", "frail")
    wait_until(lambda: len(running(h1, "frail")) == 3 and
               h1.cli_json("service", "inspect", "frail")[0]["update_status"]["state"] ==
               "rollback_completed", timeout=40, what="rolled back")
    # the two tasks that were never replaced run the rolled-back spec already: kept
    assert len({t["id"] for t in running(h1, "frail")} & v1) == 2
