"""The cluster network end to end (issue 5): real agents on netns hosts, driven by the CLI.

Each test names the user-visible property it checks: published ports answered on every node
and spread over every task (the routing mesh), no failed request after a scale-down or a killed
task and in-flight requests drained, service discovery by name and by VIP from inside a task,
UDP publishing, and cluster-unique task addresses. Requests are made from lab hosts with
``python3 -c`` (urllib / socket), so only addresses inside the lab's namespaces are used.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from netlab import Host, Lab, wait_until

pytestmark = pytest.mark.netns

# A tiny HTTP responder: GET / answers its hostname (SERVICE-SLOT); GET /slow/S waits S
# seconds first. On SIGTERM it keeps serving until no request is in flight (and none came for
# 0.5 s), then exits 0: what a well-behaved server does while it is drained.
RESPONDER = r"""
import http.server, os, signal, socket, sys, threading, time
port = int(sys.argv[1])
state = {"active": 0, "last": time.time(), "stopping": False}
lock = threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        with lock:
            state["active"] += 1
        try:
            if self.path.startswith("/slow/"):
                time.sleep(float(self.path.rsplit("/", 1)[1]))
            body = socket.gethostname().encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        finally:
            with lock:
                state["active"] -= 1
                state["last"] = time.time()
    def log_message(self, *a):
        pass
def term(*_):
    state["stopping"] = True
    print("SIGTERM: draining", flush=True)
def reaper():
    while True:
        time.sleep(0.1)
        with lock:
            done = state["stopping"] and state["active"] == 0 and \
                time.time() - state["last"] > 0.5
        if done:
            print("drained, exiting", flush=True)
            os._exit(0)
signal.signal(signal.SIGTERM, term)
threading.Thread(target=reaper, daemon=True).start()
srv = http.server.ThreadingHTTPServer(("", port), H)
srv.daemon_threads = True
srv.serve_forever()
"""


def fetch(host: Host, *urls: str, timeout: float = 120.0) -> list[tuple[Any, str]]:
    return host.http_get(*urls, url_timeout=15, timeout=timeout)


def wait_running(host: Host, service: str, n: int, timeout: float = 60.0
                 ) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        tasks = host.cli_json("service", "ps", service)
        up = [t for t in tasks if t["state"] == "running" and t["desired_state"] == "running"]
        extra = [t for t in tasks if t["state"] == "running" and t["desired_state"] != "running"]
        return up if len(up) == n and not extra else None
    return wait_until(check, timeout=timeout, interval=0.3,
                      what=f"exactly {n} running tasks of {service} on {host.name}")


def network_info(host: Host) -> dict[str, Any]:
    net: dict[str, Any] = json.loads(host.cli("info").stdout)["network"]
    return net


def wait_published(lab: Lab, table: str, endpoints: int, timeout: float = 30.0) -> None:
    """Until every member's balancer serves ``table`` (SERVICE.TARGET) and all its tasks have
    an address (so every endpoint is known everywhere)."""
    def check() -> bool:
        for h in lab.hosts:
            info = network_info(h)
            if table not in info["services"] or info["errors"]:
                return False
        return True
    wait_until(check, timeout=timeout, interval=0.3, what=f"{table} published on every node")


def task_log(lab: Lab, task: dict[str, Any], stream: str = "stdout") -> list[str]:
    """A task's output lines (the runtime's log records: 'TIMESTAMP F text')."""
    path = lab.host(task["node"]).data_dir / "tasks" / task["id"] / f"{stream}.log"
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line.split(" ", 2)[2] for line in text.splitlines() if line.count(" ") >= 2]


@pytest.fixture
def cluster3(lab_factory: Callable[..., Lab]) -> Lab:
    lab = lab_factory(3)
    lab.form_cluster(managers=3)
    return lab


def create_web(host: Host, name: str = "web", replicas: int = 3, published: int = 8080,
               target: int = 8000, *extra: str) -> None:
    host.cli("service", "create", "--name", name, "--replicas", str(replicas),
             "--publish", f"{published}:{target}", *extra,
             "--", "python3", "-c", RESPONDER, str(target))


def test_published_port_answers_on_every_node_spread_over_all_tasks(cluster3: Lab) -> None:
    """Must-show 1: a 3-replica HTTP service published on 8080 answers on every node's 8080;
    the answers come from all 3 tasks, so tasks on other nodes are reached."""
    h1 = cluster3.hosts[0]
    create_web(h1)
    tasks = wait_running(h1, "web", 3)
    assert len({t["node"] for t in tasks}) == 3  # one per node: most answers cross nodes
    wait_published(cluster3, "web.8000", 3)
    for h in cluster3.hosts:
        urls = [f"http://{x.ip}:8080/" for x in cluster3.hosts for _ in range(4)]
        answers = fetch(h, *urls)
        assert all(status == 200 for status, _ in answers), answers
        seen = Counter(body for _, body in answers)
        assert set(seen) == {f"web-{i}" for i in (1, 2, 3)}, seen

# Fetch URLs (argv[1:]) all at once, one thread each; print [[status or error, body], ...].
FETCH_PARALLEL = r"""
import json, sys, threading, urllib.request
out = [None] * (len(sys.argv) - 1)
def one(i, url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            out[i] = [r.status, r.read().decode()]
    except Exception as exc:
        out[i] = [repr(exc), ""]
ts = [threading.Thread(target=one, args=(i, u)) for i, u in enumerate(sys.argv[1:])]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps(out))
"""


def test_scale_down_drains_in_flight_and_fails_no_later_request(cluster3: Lab) -> None:
    """Must-show 2 (scale down): requests in flight on the tasks being removed complete
    (they drain until the stop grace period), and no request sent after the change has
    propagated (1.5 s) fails or reaches a removed task."""
    h1, h2 = cluster3.hosts[0], cluster3.hosts[1]
    create_web(h1, "web", 3, 8080, 8000, "--stop-grace-period", "8")
    wait_running(h1, "web", 3)
    wait_published(cluster3, "web.8000", 3)
    import threading

    slow: dict[str, Any] = {}

    def in_flight() -> None:
        res = h2.run("python3", "-c", FETCH_PARALLEL,
                     *[f"http://{h2.ip}:8080/slow/4"] * 3, timeout=60)
        slow["answers"] = json.loads(res.stdout)

    t = threading.Thread(target=in_flight)
    t.start()
    time.sleep(1.0)  # the three slow requests are in flight, one on each task (round robin)
    h1.cli("service", "scale", "web=1")
    time.sleep(1.5)  # propagation: the state change reaches every node's balancer
    urls = [f"http://{x.ip}:8080/" for x in cluster3.hosts for _ in range(5)]
    answers = fetch(h1, *urls)
    assert all(status == 200 for status, _ in answers), answers
    assert {body for _, body in answers} == {"web-1"}, answers
    t.join(timeout=60)
    assert slow["answers"] is not None
    assert all(status == 200 for status, _ in slow["answers"]), slow
    assert sorted(body for _, body in slow["answers"]) == ["web-1", "web-2", "web-3"], slow
    wait_running(h1, "web", 1)
    answers = fetch(h2, *urls)
    assert all(status == 200 and body == "web-1" for status, body in answers), answers


def test_killed_task_leaves_the_mesh_without_failed_requests(cluster3: Lab) -> None:
    """Must-show 2 (kill): once a killed task's failure has propagated, no request fails."""
    h1 = cluster3.hosts[0]
    create_web(h1, "web", 3, 8080, 8000, "--restart-condition", "none")
    tasks = wait_running(h1, "web", 3)
    wait_published(cluster3, "web.8000", 3)
    victim = next(t for t in tasks if t["slot"] == 2)
    os.kill(victim["pid"], signal.SIGKILL)

    def gone() -> bool:
        ts = h1.cli_json("service", "ps", "web")
        return any(t["id"] == victim["id"] and t["state"] != "running" for t in ts)
    wait_until(gone, timeout=30, interval=0.2, what="the killed task to be reported")
    time.sleep(1.5)
    urls = [f"http://{x.ip}:8080/" for x in cluster3.hosts for _ in range(6)]
    for h in cluster3.hosts:
        answers = fetch(h, *urls)
        assert all(status == 200 for status, _ in answers), answers
        assert {body for _, body in answers} == {"web-1", "web-3"}, answers


# Runs as a task of service "a": resolves and fetches service b by name, by b.shoal, by the
# VIP "b" resolves to, and resolves tasks.b; prints one "OK ..." line (retries until then).
DISCOVER = r"""
import socket, time, urllib.request
def get(url):
    return urllib.request.urlopen(url, timeout=5).read().decode()
for _ in range(240):
    try:
        vip = socket.gethostbyname("b")
        line = " ".join(["OK", vip, get("http://b:8000/"), get("http://b.shoal:8000/"),
                         get(f"http://{vip}:8000/"),
                         ",".join(sorted(socket.gethostbyname_ex("tasks.b")[2]))])
        print(line, flush=True)
        break
    except Exception as exc:
        print("retry", repr(exc), flush=True)
        time.sleep(0.5)
time.sleep(100000)
"""


def test_task_reaches_another_service_by_name_and_vip(cluster3: Lab) -> None:
    """Must-show 3: a task of service a reaches service b by name (b, b.shoal: the node's DNS
    answers b's VIP) and by that VIP; tasks.b resolves to b's task addresses."""
    h1 = cluster3.hosts[0]
    create_web(h1, "b", 2, 9090, 8000)
    wait_running(h1, "b", 2)
    wait_published(cluster3, "b.8000", 2)
    h1.cli("service", "create", "--name", "a", "--", "python3", "-c", DISCOVER)
    (a_task,) = wait_running(h1, "a", 1)

    def ok_line() -> str | None:
        return next((x for x in task_log(cluster3, a_task) if x.startswith("OK ")), None)
    line = wait_until(ok_line, timeout=60, interval=0.5, what="task a's OK line")
    _, vip, by_name, by_fqdn, by_vip, task_ips = line.split(" ")
    assert ipaddress.ip_address(vip) in ipaddress.ip_network("10.98.0.0/16"), line
    assert {by_name, by_fqdn, by_vip} <= {"b-1", "b-2"}, line
    addrs = {a for h in cluster3.hosts for a in network_info(h)["tasks"].values()}
    assert set(task_ips.split(",")) <= addrs and len(task_ips.split(",")) == 2, line

    # the network is there before the task's first instruction (attached between the clone of
    # its namespaces and its exec): a one-shot client, no retries, succeeds
    h1.cli("service", "create", "--name", "first", "--replicas", "3", "--restart-condition",
           "none", "--", "bash", "-c", "exec 3<>/dev/tcp/b/8000")  # (bash: starts in ~1 ms)

    def ended() -> list[dict[str, Any]] | None:
        tasks = h1.cli_json("service", "ps", "first")
        done = [t for t in tasks if t["state"] in ("complete", "failed", "rejected")]
        return tasks if len(done) == 3 else None
    tasks = wait_until(ended, timeout=60, interval=0.3, what="the one-shot tasks to end")
    assert {t["state"] for t in tasks} == {"complete"}, tasks


# A UDP responder (argv[1] = port): answers each datagram with "HOSTNAME:payload".
UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", int(sys.argv[1])))
while True:
    data, addr = s.recvfrom(2048)
    s.sendto(socket.gethostname().encode() + b":" + data, addr)
"""

# Send one datagram to each ADDR:PORT (argv[1:]) from a new socket; print the answers as JSON.
UDP_ASK = r"""
import json, socket, sys
out = []
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    answer = None
    for _ in range(5):
        try:
            s.sendto(b"ping", (host, int(port)))
            answer = s.recvfrom(2048)[0].decode()
            break
        except OSError:
            continue
    out.append(answer)
    s.close()
print(json.dumps(out))
"""


def test_udp_published_port_and_clear_publish_errors(cluster3: Lab) -> None:
    """Must-show 4: a UDP published port answers on every node, from every task. And the CLI
    refuses a port already published or an invalid one with one clear line."""
    h1 = cluster3.hosts[0]
    h1.cli("service", "create", "--name", "echo", "--replicas", "2", "--publish",
           "5353:5000/udp", "--", "python3", "-c", UDP_ECHO, "5000")
    wait_running(h1, "echo", 2)
    wait_published(cluster3, "echo.5000", 2)
    targets = [f"{x.ip}:5353" for x in cluster3.hosts for _ in range(4)]
    for h in cluster3.hosts:
        answers = json.loads(h.run("python3", "-c", UDP_ASK, *targets).stdout)
        assert all(a is not None and a.endswith(":ping") for a in answers), answers
        assert {a.split(":")[0] for a in answers} == {"echo-1", "echo-2"}, answers

    clash = h1.cli("service", "create", "--name", "other", "--publish", "5353:7000/udp",
                   "--", "sleep", "1000", check=False)
    assert clash.returncode != 0 and "5353" in clash.stderr, clash
    assert len(clash.stderr.strip().splitlines()) == 1, clash.stderr
    bad = h1.cli("service", "create", "--name", "other", "--publish", "70000:80",
                 "--", "sleep", "1000", check=False)
    assert bad.returncode != 0 and "70000" in bad.stderr, bad
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not any(s["name"] == "other" for s in h1.cli_json("service", "ls"))


def test_task_addresses_unique_and_reused_only_after_release(cluster3: Lab) -> None:
    """Must-show 5: node subnets do not overlap, every task address is inside its node's subnet
    and unique in the cluster; an address is given again only after its task was removed —
    and not at once: a node goes round its subnet first (serial, as Docker's IPAM)."""
    h1 = cluster3.hosts[0]
    h1.cli("service", "create", "--name", "s", "--replicas", "9", "--", "sleep", "100000")
    wait_running(h1, "s", 9)

    def snapshot_addrs() -> dict[str, dict[str, str]] | None:
        infos = {h.name: network_info(h) for h in cluster3.hosts}
        if sum(len(i["tasks"]) for i in infos.values()) != 9:
            return None
        return {name: dict(i["tasks"], _subnet=i["subnet"]) for name, i in infos.items()}
    first = wait_until(snapshot_addrs, timeout=30, interval=0.3, what="9 task addresses")
    subnets = [ipaddress.ip_network(v["_subnet"]) for v in first.values()]
    assert all(not a.overlaps(b) for i, a in enumerate(subnets) for b in subnets[i + 1:])
    seen: list[str] = []
    for v in first.values():
        net = ipaddress.ip_network(v.pop("_subnet"))
        for addr in v.values():
            assert ipaddress.ip_address(addr) in net and addr != str(next(net.hosts()))
            seen.append(addr)
    assert len(seen) == len(set(seen)) == 9

    # scale 9 → 3: the 6 removed tasks release their addresses; the next 6 get new ones
    h1.cli("service", "scale", "s=3")
    wait_running(h1, "s", 3)

    def released() -> set[str] | None:
        now = {a for h in cluster3.hosts for a in network_info(h)["tasks"].values()}
        return now if len(now) == 3 else None
    kept = wait_until(released, timeout=60, interval=0.3, what="6 addresses released")
    h1.cli("service", "scale", "s=9")
    wait_running(h1, "s", 9)
    second = wait_until(snapshot_addrs, timeout=30, interval=0.3, what="9 task addresses")
    again = [a for v in second.values() for k, a in v.items() if k != "_subnet"]
    assert len(again) == len(set(again)) == 9
    assert kept <= set(again)
    # the ones just given back are not the next tasks' (a host-port rule may still name one)
    assert not (set(seen) - kept) & set(again), (seen, again)


def test_agent_restart_keeps_task_addresses_and_published_port(cluster3: Lab) -> None:
    """Deliverable 1: after kill -9 and restart of every agent, the adopted tasks keep their
    addresses (network.json + their netns) and the published port answers from all of them."""
    h1 = cluster3.hosts[0]
    create_web(h1)
    before = wait_running(h1, "web", 3)
    wait_published(cluster3, "web.8000", 3)
    addrs = {h.name: network_info(h)["tasks"] for h in cluster3.hosts}
    for h in cluster3.hosts:
        h.kill_agent()
    cluster3.start_agents(cluster3.hosts)
    after = wait_running(h1, "web", 3, timeout=60)
    assert {t["id"] for t in after} == {t["id"] for t in before}
    wait_published(cluster3, "web.8000", 3)
    assert {h.name: network_info(h)["tasks"] for h in cluster3.hosts} == addrs
    # every request is answered; all three tasks answer again once the balancers' back-off
    # of endpoints that refused during the restart has expired
    seen: set[str] = set()

    def all_answer() -> bool:
        answers = fetch(cluster3.hosts[2], *[f"http://{x.ip}:8080/" for x in cluster3.hosts] * 3)
        assert all(status == 200 for status, _ in answers), answers
        seen.update(body for _, body in answers)
        return seen == {"web-1", "web-2", "web-3"}
    wait_until(all_answer, timeout=20, interval=0.5, what="answers from all three tasks")
