"""Health checks end to end (issue 12, must-show 3 and 7): real agents on netns hosts, driven
by the CLI. An HTTP-checked task receives no connection before it is healthy; a task whose
check starts failing is out of the balancer within interval * retries + 1 s, reported failed as
unhealthy and replaced; an exec check runs inside the task's namespaces and cgroup; bad flag
values get one clear error naming the flag. Requests come from lab hosts (``python3 -c``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from netlab import Host, Lab, wait_until

pytestmark = pytest.mark.netns

# Serves /tmp/w over HTTP on port 8000: "id" (a random token naming this task), and "health"
# once the task has waited DELAY seconds (its argv[1]): the health check's target.
SERVER = ("mkdir -p /tmp/w; cd /tmp/w || exit 1; cat /proc/sys/kernel/random/uuid > id; "
          "(sleep $1; echo ok > health) & exec python3 -m http.server 8000 --bind 0.0.0.0")


def fetch(host: Host, url: str, n: int) -> list[tuple[Any, str]]:
    return host.http_get(*[url] * n, url_timeout=5, timeout=60)


def token(lab: Lab, t: dict[str, Any]) -> str:
    """The task's random id, read through its init's root (as the host sees it)."""
    return Path(f"/proc/{t['pid']}/root/tmp/w/id").read_text().strip()


def tasks(host: Host, service: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = host.cli_json("service", "ps", service)
    return out


def running(host: Host, service: str, health: str, n: int) -> list[dict[str, Any]] | None:
    ts = [t for t in tasks(host, service)
          if t["state"] == "running" and t["desired_state"] == "running"]
    return ts if len(ts) == n and all(t["health"] == health for t in ts) else None


@pytest.fixture
def cluster2(lab_factory: Callable[..., Lab]) -> Lab:
    lab = lab_factory(2)
    lab.form_cluster(managers=1, workers=1)
    return lab


def test_http_check_gates_traffic_and_an_unhealthy_task_is_cut_off_and_replaced(
        cluster2: Lab) -> None:
    """No request reaches a task before its check passes; once a task's check fails it gets
    no request after interval * retries + 1 s, is reported failed (unhealthy) and replaced by
    a healthy task."""
    h1, h2 = cluster2.hosts
    interval, retries = 0.5, 2
    h1.cli("service", "create", "--name", "web", "--replicas", "2", "--publish", "8080:8000",
           "--health-http", ":8000/health", "--health-interval", f"{interval}s",
           "--health-retries", str(retries), "--health-start-period", "20s",
           "--restart-delay", "0s",
           "--", "sh", "-c", SERVER, "sh", "4")
    url = f"http://{h2.ip}:8080/id"
    starting = wait_until(lambda: running(h1, "web", "starting", 2), timeout=60,
                          what="2 running tasks still starting")
    # running and serving HTTP, but not yet healthy: the balancer has no endpoint for them
    assert all(status != 200 for status, _ in fetch(h2, url, 3))
    assert all(t["health_log"] == [] or t["health_log"][-1]["exit_code"] != 0
               for t in starting)
    healthy = wait_until(lambda: running(h1, "web", "healthy", 2), timeout=30,
                         what="2 healthy tasks")
    tokens = {token(cluster2, t) for t in healthy}

    def both_served() -> bool:
        return {b for _, b in fetch(h2, url, 6)} == tokens
    wait_until(both_served, timeout=10, what="both healthy tasks served")

    victim = next(t for t in healthy if t["slot"] == 1)
    victim_token = token(cluster2, victim)
    Path(f"/proc/{victim['pid']}/root/tmp/w/health").unlink()  # its check now gets a 404
    time.sleep(interval * retries + 1.0)
    answers = fetch(h2, url, 10)
    assert all(status == 200 for status, _ in answers), answers
    assert victim_token not in {b for _, b in answers}, answers

    def replaced() -> dict[str, Any] | None:
        ts = tasks(h1, "web")
        old = next(t for t in ts if t["id"] == victim["id"])
        new = [t for t in ts if t["slot"] == 1 and t["id"] != victim["id"]
               and t["state"] == "running" and t["health"] == "healthy"]
        return old if old["state"] == "failed" and new else None
    old = wait_until(replaced, timeout=30, what="the unhealthy task failed and replaced")
    assert old["error"].startswith("unhealthy: 2 health checks failed"), old
    assert "404" in old["health_log"][-1]["output"], old["health_log"]
    wait_until(lambda: len({b for _, b in fetch(h2, url, 8)}) == 2, timeout=15,
               what="the replacement served")


def test_exec_check_runs_inside_the_tasks_namespaces_and_cgroup(cluster2: Lab) -> None:
    """--health-cmd runs through /bin/sh -c in the task: its hostname, its files (/tmp is the
    task's own), its cgroup, its credentials and capabilities; the output is kept in the
    health log; it has the task's --ulimit; when it fails, the task is replaced."""
    h1 = cluster2.hosts[0]
    h1.cli("service", "create", "--name", "ex", "--constraint", "node.role==manager",
           "--ulimit", "nofile=100:200",
           "--health-cmd", "test -f /tmp/ok && hostname && grep -E '^(Cap|Uid)' "
           "/proc/self/status && cat /proc/self/cgroup && grep 'open files' /proc/self/limits",
           "--health-interval", "0.5s", "--health-retries", "1",
           "--", "sh", "-c", "touch /tmp/ok; exec sleep 1000")
    (t,) = wait_until(lambda: running(h1, "ex", "healthy", 1), timeout=60,
                      what="the exec-checked task healthy")

    def logged() -> dict[str, Any] | None:
        (task,) = running(h1, "ex", "healthy", 1) or [None]
        return task if task and task["health_log"] else None
    t = wait_until(logged, timeout=60, what="a health log entry")  # (log_refresh: 30 s)
    out = t["health_log"][-1]["output"]
    assert out.splitlines()[0] == "ex-1", out  # the task's hostname (its uts namespace)
    assert t["id"] in out, out  # it ran in the task's cgroup
    # with the task's credentials and capabilities, not the agent's (root, every capability)
    task_status = Path(f"/proc/{t['pid']}/status").read_text().splitlines()
    for key in ("CapEff", "CapBnd", "Uid"):
        mine = next(ln for ln in task_status if ln.startswith(key + ":"))
        assert mine in out.splitlines(), (key, mine, out)
    # and its resource limits (Docker runs an exec check with the container's)
    assert out.splitlines()[-1].split()[3:5] == ["100", "200"], out
    (inspect,) = h1.cli_json("service", "inspect", "ex")
    assert [(x["task"], x["health"]) for x in inspect["health"]] == [(t["id"], "healthy")]
    Path(f"/proc/{t['pid']}/root/tmp/ok").unlink()

    def failed() -> dict[str, Any] | None:
        old = next(x for x in tasks(h1, "ex") if x["id"] == t["id"])
        return old if old["state"] == "failed" else None
    old = wait_until(failed, timeout=15, what="the task failed as unhealthy")
    assert old["error"].startswith("unhealthy: 1 health checks failed"), old
    wait_until(lambda: running(h1, "ex", "healthy", 1), timeout=30, what="a healthy successor")


BAD_FLAGS = [
    (["--health-interval", "soon"], "--health-interval"),
    (["--health-http", "localhost/x"], "--health-http"),
    (["--health-cmd", "true", "--health-tcp", "80"], "--health-tcp"),
    (["--health-retries", "-1"], "--health-retries"),
    (["--no-healthcheck", "--health-cmd", "true"], "--no-healthcheck"),
]


def test_bad_health_flags_get_one_clear_error_naming_the_flag(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(1)
    lab.form_cluster(managers=1)
    h1 = lab.hosts[0]
    for argv, flag in BAD_FLAGS:
        res = h1.cli("service", "create", "--name", "bad", *argv, "--", "sleep", "9",
                     check=False)
        assert res.returncode != 0, argv
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:") and flag in lines[0], \
            (argv, res.stderr)
    assert h1.cli_json("service", "ls") == []


async def test_probes_run_inside_the_tasks_network_namespace(tmp_path: Path) -> None:
    """The real probes against a process in its own network namespace (its loopback is not
    the host's): HTTP status decides, TCP connects, exec runs inside it, and a check longer
    than its timeout is killed and fails."""
    import subprocess

    from shoal.node.health import Check, HealthConfig, Probes

    (tmp_path / "health").write_text("ok\n")
    server = subprocess.Popen(
        ["unshare", "--net", "sh", "-c",
         f"ip link set lo up && cd {tmp_path} && exec python3 -m http.server 8765 "
         "--bind 127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        probes = Probes(HealthConfig())
        pid = server.pid

        async def probe(check: Check) -> tuple[int, str]:
            r = await probes(check, pid)
            return r.exit_code, r.output

        async def up() -> None:
            for _ in range(100):
                if (await probe(Check(kind="tcp", port=8765, timeout=1)))[0] == 0:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("server did not start")
        await up()
        assert await probe(Check(kind="http", port=8765, path="/health", timeout=2)) == \
            (0, "GET /health: HTTP/1.0 200 OK")
        code, out = await probe(Check(kind="http", port=8765, path="/nope", timeout=2))
        assert code == 1 and "404" in out
        code, out = await probe(Check(kind="tcp", port=8766, timeout=2))
        assert code == 1 and "refused" in out
        code, out = await probe(Check(kind="exec", timeout=5, argv=(
            "/bin/sh", "-c", "ip -o link | wc -l; echo to-stderr >&2; exit 3")))
        assert code == 3 and out.split() == ["1", "to-stderr"]  # only lo: the task's netns
        start = time.monotonic()
        code, out = await probe(Check(kind="exec", argv=("sleep", "30"), timeout=0.3))
        assert code == -1 and "timeout" in out and time.monotonic() - start < 2
    finally:
        server.kill()
        server.wait()
