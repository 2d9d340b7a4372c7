"""The MQTT bridge in real agents (`shoal agent --mqtt-*`) on netns hosts, with a real
mosquitto (TLS, password file, ACL) in host h1 and a real `mosquitto_sub` in host h2.

Each test names the user-visible property it checks.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_events_cluster import scrape
from test_mqtt import PASSWORDS, Broker

from netlab import Lab, wait_until
from shoal.node.mqtt import sign_scale

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(shutil.which("mosquitto_sub") is None,
                                 reason="Debian packages mosquitto, mosquitto-clients "
                                 "(Makefile DEB_PKGS)")]

PREFIX = "shoal/c1"


def received(path: Path) -> list[tuple[str, str]]:
    """(topic, payload) lines a `mosquitto_sub -v` wrote."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        topic, _, payload = line.partition(" ")
        out.append((topic, payload))
    return out


def sample(fams: dict[str, Any], name: str, **labels: str) -> float:
    fam = fams.get(name)
    if fam is None:
        return 0.0
    for s in fam.samples:
        if all(s.labels.get(k) == v for k, v in labels.items()) and \
                not s.name.endswith("_created"):
            return float(s.value)
    return 0.0


def test_agents_publish_once_the_broker_appears_and_a_killed_agent_goes_offline(
        lab_factory: Callable[..., Lab], tmp_path: Path) -> None:
    """Agents started while the broker is absent run normally (init, join, service create)
    and count refused connects in /metrics; once mosquitto starts they connect by
    themselves: a late subscriber gets every node's retained `online`, the service's
    retained state (desired/running replicas, term, index) and the event cursor, then live
    events; the operator's signed scale command scales the service; kill -9 of the worker's
    agent → the broker announces it `offline` (its will)."""
    lab = lab_factory(2)
    h1, h2 = lab.hosts
    broker = Broker(tmp_path / "broker", ip=h1.ip,
                    spawn=lambda argv: h1.spawn(*argv, log_name="mosquitto"))
    key_file = tmp_path / "cmd.key"
    key_file.write_text("0123456789abcdef0123456789abcdef\n")
    flags = ["--mqtt-command-key-file", str(key_file),
             "--mqtt-url", f"mqtts://node1@{h1.ip}:{broker.port}",
             "--mqtt-password-file", broker.password_file("node1"), "--mqtt-ca", broker.ca,
             "--mqtt-topic-prefix", PREFIX, "--mqtt-keepalive", "2"]
    for h in (h1, h2):
        h.start_agent(*flags)
    nodes = lab.form_cluster(managers=1, workers=1)
    ids = {n["hostname"]: n["id"] for n in nodes}
    h1.cli("service", "create", "--name", "web", "--replicas", "2", "--", "sleep", "100000")
    wait_until(lambda: sample(scrape(h1), "shoal_mqtt_connect_failures",
                              reason="refused") >= 1 or None, timeout=15,
               what="refused connects counted on h1")

    broker.start()
    sub_log = h2.data_dir / "mqtt-sub.log"
    h2.spawn("mosquitto_sub", "-h", h1.ip, "-p", str(broker.port), "--cafile", broker.ca,
             "-u", "admin", "-P", PASSWORDS["admin"], "-t", f"{PREFIX}/#", "-v", "-q", "1",
             log_name="mqtt-sub")

    def state_of(topic: str) -> dict[str, Any] | None:
        for t, payload in reversed(received(sub_log)):
            if t == topic and payload.startswith("{"):
                doc: dict[str, Any] = json.loads(payload)
                return doc
        return None

    def settled() -> bool | None:
        got = dict(received(sub_log))
        web = state_of(f"{PREFIX}/service/web/state")
        return (got.get(f"{PREFIX}/node/{ids[h1.name]}/availability") == "online"
                and got.get(f"{PREFIX}/node/{ids[h2.name]}/availability") == "online"
                and f"{PREFIX}/bridge/cursor" in got
                and web is not None and web["desired"] == 2 and web["running"] == 2) or None
    wait_until(settled, timeout=45, what=f"retained availability and state in {sub_log}")
    web = state_of(f"{PREFIX}/service/web/state")
    assert web is not None and web["term"] >= 1 and web["index"] > 0
    node1 = state_of(f"{PREFIX}/node/{ids[h1.name]}/state")
    assert node1 is not None and node1["leader"] is True and node1["role"] == "manager"

    h1.cli("service", "create", "--name", "api", "--", "sleep", "100000")
    wait_until(lambda: any(t == f"{PREFIX}/events/service" and json.loads(p)["name"] == "api"
                           for t, p in received(sub_log)) or None,
               timeout=15, what="the live event of service api")
    fams = scrape(h1)
    assert sample(fams, "shoal_mqtt_connected") == 1
    assert sample(fams, "shoal_mqtt_published", kind="event") >= 1

    # a signed scale command from the operator, through the real agent's wiring
    body = json.dumps({"replicas": 3, "request_id": "r1", "hmac": sign_scale(
        b"0123456789abcdef0123456789abcdef", "web", 3, "r1")})
    h2.run("mosquitto_pub", "-h", h1.ip, "-p", str(broker.port), "--cafile", broker.ca,
           "-u", "operator", "-P", PASSWORDS["operator"], "-q", "1",
           "-t", f"{PREFIX}/cmd/service/web/scale", "-m", body)
    wait_until(lambda: h1.cli_json("service", "inspect", "web")[0]["spec"]["mode"]["replicas"]
               == 3 or None, timeout=15, what="web scaled to 3 by the MQTT command")

    h2.kill_agent(signal.SIGKILL)
    wait_until(lambda: dict(received(sub_log)).get(
        f"{PREFIX}/node/{ids[h2.name]}/availability") == "offline" or None,
        timeout=15, what="h2 announced offline by the broker")

