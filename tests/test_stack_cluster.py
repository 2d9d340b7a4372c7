"""`shoal stack deploy` end to end (issue 13, must-show 3 and 4): real agents on netns hosts,
driven by the CLI, one lab for the whole story. A file with invalid values is refused with the
path of the error and nothing is deployed; a multi-service file (a web tier with a published
port and an HTTP health check, an API named ``appApi`` it reaches by its short name in lower
case, a worker, a secret and a
config from files, a named volume, variables from ``.env``, keys shoal does not hold) deploys
with warnings and answers through the published port on another node; a changed file rolls
only the changed service and ``--prune`` drops the one it no longer has; web and api meet on
the stack's overlay network; `stack rm` removes the stack's services, secrets, configs and
network and nothing else."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from netlab import Host, Lab, pid_alive, wait_until

pytestmark = pytest.mark.netns

# One program for web and api (a config of the stack, run from /app.py: Compose's short
# form puts it at /<key>, as docker's stack deploy does).
APP = r"""
import http.server, os, socket, urllib.request
ROLE, PORT = os.environ["ROLE"], int(os.environ["PORT"])

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health" or ROLE == "api":
            body = f"{ROLE} {os.environ.get('VERSION', '')}".strip()
        elif self.path == "/greeting":
            body = os.environ.get("GREETING", "")
        elif self.path == "/secret":
            body = open("/run/secrets/token").read().strip()
        elif self.path == "/api":  # the stack's appApi by its short name, in
            # another case (the stack's DNS: names are found whatever their case)
            body = urllib.request.urlopen("http://appapi:9000/", timeout=5).read().decode()
        elif self.path == "/volume":
            open("/data/written-by-web", "w").write("x")
            body = " ".join(sorted(os.listdir("/data")))
        else:
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("0.0.0.0", PORT), H).serve_forever()
"""

COMPOSE = """
version: "3.8"
services:
  web:
    command: [python3, /app.py]
    environment:
      ROLE: web
      PORT: "8000"
      GREETING: ${GREETING}
    ports: ["${WEB_PORT:-8080}:8000"]
    healthcheck:
      x-http: ":8000/health"
      interval: 500ms
      retries: 3
      start_period: 30s  # (a loaded machine can take seconds to start python)
    configs: [app.py]
    secrets: [token]
    volumes: ["data:/data"]
    deploy:
      replicas: 1
      update_config: {parallelism: 1, delay: 0s}
    depends_on: [appApi]
    networks: [back]
  appApi:  # (upper case: Swarm's and Compose's names)
    command: [python3, /app.py]
    environment: [ROLE=api, PORT=9000, VERSION=1]
    configs: [{source: app.py, mode: 0444}]
    networks: [back]
    container_name: api
    shm_size: 64m
  worker:
    command: [sh, -c, "test -s /run/secrets/token"]
    secrets: [token]
    deploy:
      mode: replicated-job
configs:
  app.py: {file: ./app.py}
secrets:
  token: {file: ./token.txt}
volumes:
  data: {}
networks:
  back: {}
"""


def get(host: Host, url: str) -> tuple[Any, str]:
    return host.http_get(url, url_timeout=8, timeout=30)[0]


def tasks(host: Host, stack: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = host.cli_json("stack", "ps", stack)
    return out


def serving(host: Host, stack: str) -> dict[str, dict[str, Any]] | None:
    """service name → its task, once web is healthy, api runs and the worker (a
    replicated-job) completed."""
    ts = tasks(host, stack)
    by = {t["service"]: t for t in ts if t["desired_state"] == "running"
          and t["state"] == "running"}
    done = [t for t in ts if t["service"] == "st_worker" and t["state"] == "complete"]
    if set(by) != {"st_web", "st_appApi"} or not done or by["st_web"]["health"] != "healthy":
        return None
    return {**by, "st_worker": done[0]}


def names_of(host: Host) -> tuple[list[str], ...]:
    """The names of the cluster's services, secrets and configs."""
    return tuple(sorted(o["name"] for o in host.cli_json(kind, "ls"))
                 for kind in ("service", "secret", "config"))


@pytest.fixture
def cluster2(lab_factory: Callable[..., Lab]) -> Lab:
    lab = lab_factory(2)
    lab.form_cluster(managers=1, workers=1)
    return lab


def test_a_compose_stack_deploys_redeploys_only_what_changed_and_is_removed(
        cluster2: Lab, tmp_path: Path) -> None:
    h1, h2 = cluster2.hosts
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "token.txt").write_text("t0ps3cret\n")
    (tmp_path / ".env").write_text("GREETING=hello-from-dotenv\n")
    compose = tmp_path / "compose.yml"
    # not the stack's: must survive `stack rm`
    (tmp_path / "keep").write_text("keep")
    h1.cli("secret", "create", "keep", str(tmp_path / "keep"))
    h1.cli("config", "create", "keep", str(tmp_path / "keep"))

    # -- an invalid file: refused with the path of the error, nothing deployed
    compose.write_text(COMPOSE.replace("replicas: 1", "replicas: one"))
    res = h1.cli("stack", "deploy", "-c", str(compose), "st", check=False)
    assert res.returncode == 1
    assert res.stderr.splitlines()[-1] == \
        "Error: services.web.deploy.replicas: expected an integer, got 'one'", res.stderr
    assert names_of(h1) == ([], ["keep"], ["keep"])

    # -- the file: deployed with warnings naming the keys shoal does not hold
    compose.write_text(COMPOSE)
    res = h1.cli("stack", "deploy", "-c", str(compose), "st")
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("Warning: ")]
    for key in ("container_name:", "depends_on:", "shm_size:"):
        assert sum(w.startswith(f"Warning: {key}") for w in warnings) == 1, (key, res.stderr)
    assert "Creating service st_web" in res.stdout and "Creating secret st_token" in res.stdout
    assert "Creating config st_app.py" in res.stdout
    assert "Creating network st_back" in res.stdout  # web and api meet on the stack's overlay
    first = wait_until(lambda: serving(h1, "st"), timeout=90, what="the stack running")
    assert h1.cli_json("stack", "ls") == [{"name": "st", "services": 3}]
    assert sorted(s["name"] for s in h1.cli_json("stack", "services", "st")) == \
        ["st_appApi", "st_web", "st_worker"]

    url = f"http://{h2.ip}:8080"  # the routing mesh on the other node too
    assert wait_until(lambda: (r := get(h2, f"{url}/greeting"))[0] == 200 and r,
                      timeout=20, what="web through the published port") == \
        (200, "hello-from-dotenv")
    assert get(h2, f"{url}/secret") == (200, "t0ps3cret")
    assert wait_until(lambda: (r := get(h2, f"{url}/api"))[0] == 200 and r, timeout=20,
                      what="api by its short name") == (200, "api 1")
    assert get(h2, f"{url}/volume") == (200, "written-by-web")
    web_node = cluster2.host(first["st_web"]["node"])
    assert (web_node.data_dir / "volumes" / "st_data" / "written-by-web").exists()

    # -- a changed file: only the changed service rolls; --prune drops the one it lost
    changed = COMPOSE.replace("VERSION=1", "VERSION=2")
    changed = changed[:changed.index("  worker:")] + changed[changed.index("configs:\n  app"):]
    compose.write_text(changed)
    res = h1.cli("stack", "deploy", "--prune", "-c", str(compose), "st")
    assert "Updating service st_appApi" in res.stdout, res.stdout
    assert "Service st_web unchanged" in res.stdout and "Removing service st_worker" in \
        res.stdout
    assert "Updating service st_web" not in res.stdout

    def rolled() -> dict[str, dict[str, Any]] | None:
        ts = tasks(h1, "st")
        live = {t["service"]: t for t in ts if t["desired_state"] == "running"
                and t["state"] == "running"}
        return live if set(live) == {"st_web", "st_appApi"} and \
            live["st_appApi"]["id"] != first["st_appApi"]["id"] else None
    after = wait_until(rolled, timeout=60, what="api replaced, worker gone")
    assert after["st_web"]["id"] == first["st_web"]["id"]  # web's task never restarted
    assert wait_until(lambda: (r := get(h2, f"{url}/api"))[1] == "api 2" and r, timeout=20,
                      what="the new api") == (200, "api 2")

    # -- a changed secret file (beyond Swarm, which refuses): a new secret named after its
    # content, web rolls to it (same target), api does not; the old one stays while web's
    # previous spec (a rollback) needs it, and a deploy after web moved on drops it
    (first_token,) = [n for n in names_of(h1)[1] if n.startswith("st_token")]
    (tmp_path / "token.txt").write_text("n3w-s3cret\n")
    res = h1.cli("stack", "deploy", "-c", str(compose), "st")
    assert "Creating secret st_token-" in res.stdout and "Updating service st_web" in \
        res.stdout and "Service st_appApi unchanged" in res.stdout, res.stdout
    assert wait_until(lambda: (r := get(h2, f"{url}/secret"))[1] == "n3w-s3cret" and r,
                      timeout=60, what="web with the new secret") == (200, "n3w-s3cret")

    res = h1.cli("stack", "deploy", "-c", str(compose), "st")
    assert f"Keeping secret {first_token}" in res.stdout, res.stdout
    assert first_token in names_of(h1)[1]
    (tmp_path / "token.txt").write_text("th1rd\n")
    h1.cli("stack", "deploy", "-c", str(compose), "st")  # (web rolls on: v2 is its previous)

    def swept() -> list[str] | None:
        h1.cli("stack", "deploy", "-c", str(compose), "st")
        tokens = [n for n in names_of(h1)[1] if n.startswith("st_token")]
        return tokens if len(tokens) == 2 and first_token not in tokens else None
    wait_until(swept, timeout=60, interval=2, what="the first secret removed by a later deploy")

    # -- stack rm: the stack's services, secrets and configs, nothing else
    res = h1.cli("stack", "rm", "st")
    assert "Removing service st_web" in res.stdout and "Removing secret st_token" in res.stdout
    assert "Removing network st_back" in res.stdout
    assert names_of(h1) == ([], ["keep"], ["keep"]) and h1.cli_json("network", "ls") == []
    assert h1.cli_json("stack", "ls") == []
    res = h1.cli("stack", "ps", "st", check=False)
    assert res.returncode == 1 and "nothing found in stack: st" in res.stderr
    pids = {t["pid"] for t in [*first.values(), *after.values()] if t["pid"]}
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=30,
               what="every task of the stack stopped")

    # -- the default network, once a file names it: a network of the stack that every
    # service listing no network joins (as Swarm's STACK_default)
    compose.write_text("services:\n  a: {command: [sleep, '100000'], networks: [default]}\n"
                       "  b: {command: [sleep, '100000']}\n")
    res = h1.cli("stack", "deploy", "-c", str(compose), "dn")
    assert "Creating network dn_default" in res.stdout, res.stdout

    def on_default() -> dict[str, Any] | None:
        net = h1.cli_json("network", "inspect", "dn_default")
        net = net[0] if isinstance(net, list) else net
        return net if len(net["tasks"]) == 2 else None
    net = wait_until(on_default, timeout=60, what="a's and b's tasks on dn_default")
    assert net["labels"] == {"com.docker.stack.namespace": "dn"}
    res = h1.cli("stack", "rm", "dn")
    assert "Removing network dn_default" in res.stdout
    wait_until(lambda: h1.cli_json("network", "ls") == [], timeout=30,
               what="dn_default removed")
