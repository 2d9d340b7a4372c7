"""Events and metrics on real agents in netns hosts, through the real CLI (`shoal events`)
and the real endpoints (`GET /metrics` on the unix socket and on `--metrics-addr`).

Each test names the user-visible property it checks.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import scrape_metrics
from prometheus_client.parser import text_string_to_metric_families

from netlab import Host, Lab, wait_until
from shoal.node.events import CURSOR_RE

pytestmark = pytest.mark.netns

SLEEP = ["--", "sleep", "100000"]


def scrape(host: Host) -> dict[str, Any]:
    """GET /metrics on the agent's unix socket, parsed by prometheus-client's parser."""
    return scrape_metrics(host.sock)


def spawn_events(host: Host, name: str, *args: str) -> Path:
    """`shoal events --format json ARGS` left running on ``host``; its output file."""
    host.spawn(str(host.lab.shoal), "-H", f"unix://{host.sock}", "events", "--format", "json",
               *args, log_name=name)
    return host.data_dir / f"{name}.log"


def read_events(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def history(host: Host, since: str = "0-0", until: str = "") -> list[dict[str, Any]]:
    """Every event ``host`` retains after ``since`` up to ``until`` (a cursor; default now):
    the stream ends there by itself."""
    res = host.cli("events", "--format", "json", "--since", since, "--until",
                   until or f"{time.time():.6f}")
    return [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]


def story(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["type"], e["action"], e["name"]) for e in events if not e.get("local")]


def leader_host(lab: Lab, ask: Host) -> Host:
    leader = next(n for n in ask.cli_json("node", "ls") if n["manager_status"] == "leader")
    return lab.host(leader["addr"])


def running(host: Host, service: str) -> list[dict[str, Any]]:
    return [t for t in host.cli_json("service", "ps", service)
            if t["state"] == "running" and t["desired_state"] == "running"]


@pytest.fixture
def cluster(lab_factory: Callable[..., Lab]) -> Lab:
    lab = lab_factory(5)
    for h in lab.hosts:  # /metrics also on a TCP address of its own
        h.start_agent("--metrics-addr", f"{h.ip}:9109")
    lab.form_cluster(managers=3, workers=2)
    return lab


def test_events_tell_the_story_of_a_node_failure_and_a_cursor_survives_a_leader_change(
        cluster: Lab) -> None:
    """`shoal events` shows, in order: service create → task assigned → running → (the
    node's agent killed) node down → the task orphaned → its replacement assigned →
    running. Then the leader's agent is killed while a client streams from it: reconnecting
    to another manager with the last cursor it got yields exactly the events it had not
    seen — the same events, with the same cursors, as a manager that saw everything."""
    h1 = cluster.hosts[0]
    log = spawn_events(h1, "events-story")
    time.sleep(1.0)  # the stream is open before anything happens
    h1.cli("service", "create", "--name", "web", "--replicas", "1",
           "--constraint", "node.role==worker", *SLEEP)
    first = wait_until(lambda: running(h1, "web") or None, timeout=30, what="web running")[0]
    victim = cluster.host(first["node"])
    assert victim in cluster.hosts[3:]
    victim.kill_agent()

    def replaced() -> list[dict[str, Any]] | None:
        r = running(h1, "web")
        return r if r and r[0]["node"] != victim.name else None
    new = wait_until(replaced, timeout=30, what="web replaced on the other worker")[0]

    def told() -> list[tuple[str, str, str]] | None:
        s = story(read_events(log))
        down = ("node", "down", victim.name)
        if down not in s:
            return None
        return s if ("task", "running", "web.1") in s[s.index(down) + 1:] else None
    s = wait_until(told, timeout=15, what="the replacement's running event")
    want = [("service", "create", "web"), ("task", "assigned", "web.1"),
            ("task", "running", "web.1"), ("node", "down", victim.name),
            ("task", "orphaned", "web.1"), ("task", "assigned", "web.1"),
            ("task", "running", "web.1")]
    positions = []
    for item in want:  # each in order, after the previous one
        start = positions[-1] + 1 if positions else 0
        positions.append(s.index(item, start))
    evs = [e for e in read_events(log) if not e.get("local")]
    assigned = [e for e in evs if e["type"] == "task" and e["action"] == "assigned"]
    assert assigned[0]["attributes"]["node_name"] == victim.name
    assert assigned[-1]["attributes"]["node_name"] == new["node"]
    assert assigned[0]["id"] != assigned[-1]["id"]
    cursors = [tuple(int(x) for x in CURSOR_RE.match(e["cursor"]).groups())  # type: ignore
               for e in read_events(log)]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)

    # --- a client streaming from the leader; the leader's agent dies
    old = leader_host(cluster, h1)
    stream = spawn_events(old, "events-leader", "--since", "0-0")
    wait_until(lambda: len(read_events(stream)) > 5 or None, timeout=10,
               what="the leader's stream has the history")
    old.kill_agent()
    seen = read_events(stream)
    cursor = seen[-1]["cursor"]
    survivors = [h for h in cluster.hosts[:3] if h is not old]
    other = survivors[0]
    wait_until(lambda: leader_host(cluster, other) is not old or None, timeout=20,
               what="a new leader")
    wait_until(lambda: {n["hostname"]: n["state"] for n in other.cli_json("node", "ls")}[
        old.name] == "down" or None, timeout=20, what="the old leader down")
    other.cli("service", "scale", "web=2")
    other.cli("secret", "create", "pw", "/etc/hostname")
    wait_until(lambda: len(running(other, "web")) == 2 or None, timeout=30,
               what="web scaled to 2")
    reference = history(survivors[1], since=cursor)
    last = [e for e in reference if not e.get("local")][-1]["cursor"]
    resumed = history(other, since=cursor, until=last)  # the same span of the log
    assert all(e["type"] != "gap" for e in resumed), resumed[:1]
    assert story(resumed) == story(reference)
    assert [e["cursor"] for e in resumed if not e.get("local")] == \
        [e["cursor"] for e in reference if not e.get("local")]
    got = story(resumed)
    assert ("node", "leader", leader_host(cluster, other).name) in got
    assert ("node", "down", old.name) in got
    assert ("service", "update", "web") in got and ("secret", "create", "pw") in got
    assert got.count(("task", "running", "web.2")) == 1
    # nothing the first client saw comes again
    assert not {e["cursor"] for e in seen} & {e["cursor"] for e in resumed}


def test_metrics_during_a_scale_up_show_the_new_tasks_and_start_latency(cluster: Lab
                                                                       ) -> None:
    """/metrics scraped while a service scales 1 → 8 shows the running tasks grow to 8 and
    the start-latency histogram count grow with them; the output parses with the
    prometheus-client text parser, on the unix socket and on --metrics-addr."""
    h1 = cluster.hosts[0]
    h1.cli("service", "create", "--name", "app", "--replicas", "1", *SLEEP)
    wait_until(lambda: len(running(h1, "app")) == 1 or None, timeout=30, what="app running")
    leader = leader_host(cluster, h1)

    def count(fams: dict[str, Any]) -> float:
        return next(s.value for s in fams["shoal_task_start_latency_seconds"].samples
                    if s.name.endswith("_count"))

    def tasks_running(fams: dict[str, Any]) -> float:
        return next(s.value for s in fams["shoal_tasks"].samples
                    if s.labels["state"] == "running")

    before = scrape(leader)
    assert tasks_running(before) == 1
    h1.cli("service", "scale", "app=8")
    seen = []

    def grown() -> dict[str, Any] | None:
        fams = scrape(leader)
        seen.append(tasks_running(fams))
        return fams if tasks_running(fams) == 8 else None
    after = wait_until(grown, timeout=30, interval=0.1, what="8 running tasks in /metrics")
    assert count(after) - count(before) >= 7
    buckets = [s for s in after["shoal_task_start_latency_seconds"].samples
               if s.name.endswith("_bucket")]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == count(after)
    assert after["shoal_raft_leader"].samples[0].value == 1
    assert after["shoal_raft_apply_lag"].samples[0].value >= 0
    members = {s.labels["state"]: s.value for s in after["shoal_gossip_members"].samples}
    assert members["alive"] == 5
    rtt = next(x.value for x in after["shoal_gossip_probe_rtt_seconds"].samples
               if x.name.endswith("_count"))
    assert rtt > 0  # acked probes were timed
    # per-task CPU and memory of the tasks running on the leader's node, from cgroups
    mine = [t for t in running(h1, "app") if t["node"] == leader.name]
    if mine:
        mem = {s.labels["task"]: s.value for s in after["shoal_task_memory_bytes"].samples}
        assert all(mem.get(t["id"], 0) > 0 for t in mine)
    # the same endpoint on --metrics-addr, from inside the host's network namespace
    res = leader.run(sys.executable, "-c", "import urllib.request, sys; sys.stdout.write("
                     f"urllib.request.urlopen('http://{leader.ip}:9109/metrics').read()"
                     ".decode())")
    fams = {f.name: f for f in text_string_to_metric_families(res.stdout)}
    assert tasks_running(fams) == 8
    # the cluster API is timed too: the workers' heartbeats and status reports, as the
    # managers served them; not the state feed's held polls (their time is the wait)
    routes = {(s.labels["route"], s.labels["status"]) for m in cluster.hosts[:3]
              for s in scrape(m)["shoal_api_request_duration_seconds"].samples}
    assert ("/v1/cluster/heartbeat", "200") in routes
    assert ("/v1/cluster/report", "200") in routes
    assert not any(route == "/v1/cluster/state" for route, _ in routes)


FETCH = """
import ssl, sys, urllib.request
url, tls = sys.argv[1], sys.argv[2]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(tls + "/ca.pem")
if sys.argv[3] == "cert":
    ctx.load_cert_chain(tls + "/cert.pem", tls + "/key.pem")
try:
    sys.stdout.write(urllib.request.urlopen(url, context=ctx, timeout=10).read().decode())
except Exception as exc:
    sys.stdout.write("REFUSED " + type(exc).__name__)
"""


def test_metrics_addr_with_mtls_needs_a_client_certificate(lab_factory: Callable[..., Lab],
                                                          tmp_path: Path) -> None:
    """`--metrics-addr ... --metrics-mtls`: /metrics answers a client certificate from
    `shoal ca issue-client` and refuses a connection without one."""
    lab = lab_factory(1)
    h1 = lab.hosts[0]
    h1.start_agent("--metrics-addr", f"{h1.ip}:9110", "--metrics-mtls")
    lab.form_cluster(managers=1)
    tls = tmp_path / "prom"
    h1.cli("ca", "issue-client", "prometheus", "--out", str(tls))
    url = f"https://{h1.ip}:9110/metrics"
    ok = h1.run(sys.executable, "-c", FETCH, url, str(tls), "cert").stdout
    fams = {f.name: f for f in text_string_to_metric_families(ok)}
    assert fams["shoal_raft_leader"].samples[0].value == 1
    refused = h1.run(sys.executable, "-c", FETCH, url, str(tls), "none").stdout
    assert refused.startswith("REFUSED"), refused[:200]
