"""Pods end to end (issue 17, must-show 2): a real agent on a netns host, driven by the CLI
with a spec file (`service create --spec`). A web container serving on 127.0.0.1 only and a
sidecar that fetches from it over localhost (they share the task's network namespace); an
init container that ran first and wrote the page into the volume it shares with the web
container; logs per container (`service logs --container`, kept across a sidecar's restart);
the sidecar killed with SIGKILL is restarted alone: the main container keeps its pid, the
task its id."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from netlab import Host, Lab, wait_until

pytestmark = pytest.mark.netns

# the init container: writes the page into the volume it shares with the web container
PREP = "echo pod-web > /data/index.html && echo init-done"
# the web container: serves /data on 127.0.0.1:8000 only (unreachable from any other
# network namespace)
WEB = "cd /data && exec python3 -m http.server 8000 --bind 127.0.0.1"
# the sidecar: fetches from localhost every 0.3 s and prints what it got
PROBE = ("import time, urllib.request\n"
         "while True:\n"
         "    try:\n"
         "        body = urllib.request.urlopen('http://127.0.0.1:8000/', timeout=2).read()\n"
         "        print('got', body.decode().strip(), flush=True)\n"
         "    except Exception as exc:\n"
         "        print('error', exc, flush=True)\n"
         "    time.sleep(0.3)\n")


def the_task(host: Host) -> dict[str, Any] | None:
    ts = [t for t in host.cli_json("service", "ps", "web") if t["desired_state"] == "running"]
    return ts[0] if len(ts) == 1 else None


def sidecar(t: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in t["containers"] if c["name"] == "probe")
    return found


@pytest.fixture
def cluster1(lab_factory: Callable[..., Lab]) -> Lab:
    lab = lab_factory(1)
    lab.form_cluster(managers=1)
    return lab


def test_a_pods_sidecar_reaches_the_web_container_on_localhost_and_restarts_alone(
        cluster1: Lab, tmp_path: Path) -> None:
    (h1,) = cluster1.hosts
    spec = {
        "name": "web",
        "task": {
            "container": {"command": ["sh", "-c", WEB], "mounts": [
                {"type": "volume", "source": "podvol", "target": "/data"}]},
            "init_containers": [{"name": "prep", "command": ["sh", "-c", PREP],
                                 "mounts": ["/data"]}],
            "sidecars": [{
                "name": "probe", "command": ["python3", "-c", PROBE],
                "healthcheck": {"tcp": 8000, "interval": 0.5},  # probed in the shared netns
                "restart": {"condition": "any", "delay": 0.2},
            }],
        },
    }
    path = tmp_path / "web.yaml"
    path.write_text(json.dumps(spec))  # (JSON is YAML)
    os.chmod(tmp_path, 0o755)
    h1.cli("service", "create", "--spec", str(path))

    def up() -> dict[str, Any] | None:
        t = the_task(h1)
        ok = t is not None and t["state"] == "running" and t["health"] == "healthy" and \
            sidecar(t)["state"] == "running" and sidecar(t)["pid"]
        return t if ok else None
    task = wait_until(up, timeout=60, what="the pod running, healthy, with its sidecar")
    prep = next(c for c in task["containers"] if c["name"] == "prep")
    assert (prep["kind"], prep["state"], prep["exit_code"]) == ("init", "exited", 0), prep
    (inspected,) = h1.cli_json("service", "inspect", "web")[0]["containers"]
    assert [c["name"] for c in inspected["containers"]] == ["prep", "probe"]
    assert "[sidecars 1/1]" in h1.cli("service", "ps", "web").stdout

    def logs(container: str) -> str:
        res = h1.cli("service", "logs", "web", "--container", container)
        return res.stdout + res.stderr
    wait_until(lambda: "got pod-web" in logs("probe"), timeout=30,
               what="the sidecar fetched from the web container over localhost")
    assert "init-done" in logs("prep")
    main = logs("main")  # http.server's access log (stderr): the sidecar's requests
    assert '"GET / HTTP/1.1" 200' in main and "got pod-web" not in main, main

    def stamped() -> list[str]:  # (a timestamp makes each line unique)
        res = h1.cli("service", "logs", "web", "--container", "probe", "--timestamps")
        return [line for line in res.stdout.splitlines() if "got pod-web" in line]
    first = stamped()[0]
    old_pid = sidecar(task)["pid"]
    os.kill(old_pid, signal.SIGKILL)  # (its init: the whole sidecar dies, exit 137)

    def restarted() -> dict[str, Any] | None:
        t = the_task(h1)
        if t is None:
            return None
        c = sidecar(t)
        ok = c["restarts"] == 1 and c["state"] == "running" and c["pid"] not in (None, old_pid)
        return t if ok else None
    after = wait_until(restarted, timeout=30, what="the sidecar restarted")
    assert (after["id"], after["pid"], after["state"]) == (task["id"], task["pid"], "running")
    assert Path(f"/proc/{task['pid']}").exists()  # the same web container, never restarted
    wait_until(lambda: logs("probe").count("got pod-web") > 0 and
               "got pod-web" in logs("probe").splitlines()[-1], timeout=30,
               what="the restarted sidecar fetching again")
    assert stamped()[0] == first  # the run before the restart: its logs are kept
    res = h1.cli("service", "logs", "web", "--container", "nope", check=False)
    assert res.returncode != 0 and "no container 'nope'" in res.stderr, res.stderr
    h1.cli("service", "rm", "web")
    pids = (task["pid"], sidecar(after)["pid"])
    wait_until(lambda: not [p for p in pids if Path(f"/proc/{p}").exists()], timeout=30,
               what="the whole pod (main container and sidecar) gone after service rm")
