"""Rolling updates end to end (issue 12, must-shows 1, 2 and 5): real agents on netns hosts,
driven by the CLI, one lab for the whole module.

A load generator on another host sends requests through the published port without pause,
over keep-alive connections and over a new connection each, while the service is updated
start-first (a new image version, then a secret rotation): not one request fails, and none
reaches a task before it is healthy (each answer says whether its task had passed a health
probe yet). A change outside the task template restarts nothing; `service update --rollback`
goes back to the previous spec. A version that never becomes healthy is rolled back by itself
with ``--update-failure-action rollback`` (``rollback_completed`` with the reason) and stops
after its first failed batch with ``pause``; the next `service update` resumes.

(Must-show 3, an unhealthy task cut off and replaced, is tests/test_health_cluster.py's.)
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from netlab import Host, Lab, wait_until

pytestmark = pytest.mark.netns

# The task: HTTP on port 8000. GET / answers "VERSION TASK SECRET HEALTHY-YET" (HEALTHY-YET: 1
# once /health has answered 200, i.e. once a health probe could have passed); /health answers
# 200 from DELAY seconds after the start (argv: VERSION DELAY). On SIGTERM it drains as a real
# server does: 1.5 s more of answers, each closing its connection, then it exits.
SERVER = r"""
import http.server, signal, sys, threading, time
version, delay = sys.argv[1], float(sys.argv[2])
tid = open('/proc/sys/kernel/random/uuid').read().strip()[:8]
try:
    secret = open('/run/secrets/app').read().strip()
except OSError:
    secret = '-'
t0, state = time.monotonic(), {'healthy': 0, 'draining': False}
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def log_message(self, *a):
        pass
    def do_GET(self):
        if self.path == '/health':
            ok = time.monotonic() - t0 >= delay
            state['healthy'] |= ok
            code, body = (200, b'ok') if ok else (503, b'wait')
        else:
            code, body = 200, f"{version} {tid} {secret} {state['healthy']}".encode()
        self.send_response(code)
        self.send_header('Content-Length', str(len(body)))
        if state['draining']:
            self.send_header('Connection', 'close')
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
srv = http.server.ThreadingHTTPServer(('0.0.0.0', 8000), H)
srv.daemon_threads = True
def term(*_):
    state['draining'] = True
    threading.Timer(1.5, srv.shutdown).start()
signal.signal(signal.SIGTERM, term)
srv.serve_forever()
"""

# The load generator (argv: HOST PORT STOP_FILE OUT_FILE): two keep-alive clients (a new
# connection only when the server closes one) and two clients opening a connection per
# request, until STOP_FILE exists; then OUT_FILE gets [[kind, ok, body or error], ...].
LOADGEN = r"""
import http.client, json, os, sys, threading, time
host, port, stop, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
results, lock = [], threading.Lock()
def record(kind, ok, detail):
    with lock:
        results.append([kind, ok, detail])
def client(keepalive):
    kind, conn = ('keepalive' if keepalive else 'new'), None
    while not os.path.exists(stop):
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=5)
            conn.request('GET', '/')
            r = conn.getresponse()
            body = r.read().decode()
            record(kind, r.status == 200, body if r.status == 200 else f'HTTP {r.status}')
            if r.will_close or not keepalive:
                conn.close()
                conn = None
        except Exception as exc:
            record(kind, False, repr(exc))
            if conn is not None:
                conn.close()
            conn = None
        time.sleep(0.01)
threads = [threading.Thread(target=client, args=(k,)) for k in (True, True, False, False)]
for t in threads:
    t.start()
for t in threads:
    t.join()
with open(out + '.tmp', 'w') as f:
    json.dump(results, f)
os.rename(out + '.tmp', out)
"""

HEALTH = ["--health-http", ":8000/health", "--health-interval", "0.5s",
          "--health-retries", "2", "--health-start-period", "3s"]


def server(version: str, delay: float = 1.0) -> list[str]:
    return ["python3", "-c", SERVER, version, str(delay)]


def inspect(h: Host, service: str = "web") -> dict[str, Any]:
    out: dict[str, Any] = h.cli_json("service", "inspect", service)[0]
    return out


def live(h: Host, service: str = "web") -> list[dict[str, Any]]:
    return [t for t in h.cli_json("service", "ps", service)
            if t["desired_state"] == "running" and t["state"] == "running"]


def status_is(h: Host, state: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        svc = inspect(h)
        return svc if svc["update_status"]["state"] == state else None
    return check


def healthy_ids(h: Host, n: int) -> set[str] | None:
    ts = live(h)
    ok = len(ts) == n and all(t["health"] == "healthy" for t in ts)
    return {t["id"] for t in ts} if ok else None


class Load:
    """The load generator running on ``host`` against ``target``:8080."""

    def __init__(self, host: Host, target: Host, name: str) -> None:
        self.stop_file = host.data_dir / f"{name}.stop"
        self.out_file = host.data_dir / f"{name}.json"
        self.proc = host.spawn("python3", "-c", LOADGEN, target.ip, "8080",
                               str(self.stop_file), str(self.out_file), log_name=name)

    def results(self) -> list[tuple[str, bool, str]]:
        self.stop_file.touch()
        wait_until(self.out_file.exists, timeout=30, what="the load generator's results")
        self.proc.wait(timeout=10)
        return [(k, ok, d) for k, ok, d in json.loads(self.out_file.read_text())]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(2)
    try:
        lab.form_cluster(managers=1, workers=1)
        h1 = lab.hosts[0]
        for name, value in (("s1", "first"), ("s2", "second")):
            path = h1.data_dir / f"{name}.txt"
            path.write_text(value)
            h1.cli("secret", "create", name, str(path))
        h1.cli("service", "create", "--name", "web", "--replicas", "3",
               "--publish", "8080:8000", *HEALTH, "--secret", "s1,target=app",
               "--update-order", "start-first", "--update-monitor", "1s",
               "--restart-delay", "0s", "--", *server("v1"))
        wait_until(lambda: healthy_ids(h1, 3), timeout=90, what="3 healthy v1 tasks")
        yield lab
    finally:
        left = lab.close()
        assert not left, f"lab teardown left things behind: {left}"


def test_start_first_updates_and_a_secret_rotation_fail_no_request(lab: Lab) -> None:
    """Must-shows 1 and 5: a start-first update of 3 HTTP-checked replicas, then a secret
    rotation (``--secret-rm s1 --secret-add s2,target=app``), under continuous load from
    another host: 0 failed requests, and every answer came from a task already healthy."""
    h1, h2 = lab.hosts
    load = Load(h2, h1, "load1")
    h1.cli("service", "update", "web", "--", *server("v2"))
    wait_until(status_is(h1, "completed"), timeout=90, what="the v2 update completed")
    h1.cli("service", "update", "--secret-rm", "s1", "--secret-add", "s2,target=app",
           "--update-parallelism", "3", "web")  # (6 tasks side by side for a moment)
    svc = wait_until(status_is(h1, "completed"), timeout=90, what="the rotation completed")
    assert [s["name"] for s in svc["spec"]["task"]["container"]["secrets"]] == ["s2"]
    wait_until(lambda: healthy_ids(h1, 3), timeout=30, what="3 healthy tasks")
    results = load.results()
    failed = [r for r in results if not r[1]]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:10]}"
    answers = [d.split() for _, _, d in results]
    versions = {(v, s) for v, _, s, _ in answers}
    assert {("v1", "first"), ("v2", "first"), ("v2", "second")} <= versions, versions
    assert [a for a in answers if a[3] != "1"] == []  # no answer from a task not yet healthy
    for kind in ("keepalive", "new"):  # both kinds of client were served throughout
        assert sum(k == kind for k, _, _ in results) > 50, kind
    # the last answers all come from the new tasks
    assert {tuple(a[::2][:2]) for a in answers[-20:]} == {("v2", "second")}


def test_a_change_outside_the_template_restarts_nothing(lab: Lab) -> None:
    """Must-show 5: a service label and update settings change, and `service update
    --rollback` undoes that change: the same tasks keep running throughout."""
    h1 = lab.hosts[0]
    wait_until(lambda: healthy_ids(h1, 3), timeout=30, what="3 healthy tasks")
    before = {t["id"] for t in h1.cli_json("service", "ps", "web")}  # (history included)
    status = inspect(h1)["update_status"]
    h1.cli("service", "update", "--label-add", "tier=front", "--update-parallelism", "2",
           "--rollback-monitor", "2s", "web")
    svc = inspect(h1)
    assert svc["spec"]["labels"] == {"tier": "front"}
    assert svc["spec"]["update"]["parallelism"] == 2
    h1.cli("service", "update", "--rollback", "web")
    svc = inspect(h1)
    assert svc["spec"]["labels"] == {} and svc["spec"]["update"]["parallelism"] == 3
    time.sleep(2.0)  # (a window for a wrong restart to show: the leader passes every 0.5 s)
    assert {t["id"] for t in h1.cli_json("service", "ps", "web")} == before
    assert healthy_ids(h1, 3) is not None and {t["id"] for t in live(h1)} <= before
    assert inspect(h1)["update_status"] == status


def test_a_version_that_never_becomes_healthy_rolls_back_or_pauses(lab: Lab) -> None:
    """Must-show 2: ``--update-failure-action rollback``: the first new task turns unhealthy,
    the service goes back to its previous spec by itself and `service inspect` says
    ``rollback_completed`` and why. ``pause``: the update stops after its first failed batch
    (the other slots untouched), and the next `service update` resumes it."""
    h1, h2 = lab.hosts
    load = Load(h2, h1, "load2")
    before = wait_until(lambda: healthy_ids(h1, 3), timeout=30, what="3 healthy tasks")
    good = inspect(h1)["spec"]["task"]
    h1.cli("service", "update", "--update-failure-action", "rollback",
           "--update-parallelism", "1", "web",
           "--", *server("bad", 1e9))
    svc = wait_until(status_is(h1, "rollback_completed"), timeout=90, what="rolled back")
    message = svc["update_status"]["message"]
    assert "update rolled back due to failure or early termination of task web." in message
    assert "unhealthy" in message, message
    assert svc["spec"]["task"] == good
    # start-first: the old tasks served throughout and still do
    assert wait_until(lambda: healthy_ids(h1, 3), timeout=30, what="3 healthy") == before

    h1.cli("service", "update", "--update-failure-action", "pause",
           "--update-parallelism", "1", "web",
           "--", *server("bad2", 1e9))
    svc = wait_until(status_is(h1, "paused"), timeout=90, what="the update paused")
    assert "update paused due to failure or early termination of task web." in \
        svc["update_status"]["message"], svc["update_status"]
    new = [t for t in h1.cli_json("service", "ps", "web") if t["id"] not in before
           and t["service_version"] == svc["version"]]
    assert {t["slot"] for t in new} == {1}, new  # the first batch only (parallelism 1)
    assert {t["id"] for t in live(h1)} >= before - {t["id"] for t in new}
    results = load.results()
    failed = [r for r in results if not r[1]]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:10]}"
    assert {d.split()[0] for _, _, d in results} == {"v2"}  # the bad versions served none

    # the next update resumes (here with a fixed version)
    h1.cli("service", "update", "--args", shlex.join(server("v3")),
           "--update-parallelism", "3", "web")
    wait_until(status_is(h1, "completed"), timeout=90, what="the resumed update completed")
    after = wait_until(lambda: healthy_ids(h1, 3), timeout=30, what="3 healthy v3 tasks")
    assert not after & before
    assert inspect(h1)["spec"]["task"]["container"]["command"] == server("v3")
