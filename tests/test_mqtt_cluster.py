"""The MQTT bridge in real agents (`shoal agent --mqtt-*`) on netns hosts, with a real
mosquitto (TLS, password file, ACL) in host h1 and a real `mosquitto_sub` in host h2.

Each test names the user-visible property it checks.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_events_cluster import scrape
from test_mqtt import PASSWORDS, Broker

from netlab import Lab, wait_until
from shoal.node.mqttconfig import sign_scale

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



def test_the_cluster_wide_setting_is_followed_live_by_every_node(
        lab_factory: Callable[..., Lab], tmp_path: Path) -> None:
    """`shoal mqtt set` (no agent flag anywhere) → the manager's and the worker's bridges
    connect (the worker gets the sealed password from a manager) and publish retained state;
    `mqtt show` never shows the password; a scale command signed with the cluster's key
    (`mqtt command-key`) applies once although sent twice, one signed otherwise changes
    nothing; a new prefix → everything republished under it with the password kept;
    `mqtt unset` → every bridge stops (a clean `offline`) without an agent restart."""
    lab = lab_factory(2)
    h1, h2 = lab.hosts
    broker = Broker(tmp_path / "broker", ip=h1.ip,
                    spawn=lambda argv: h1.spawn(*argv, log_name="mosquitto"))
    nodes = lab.form_cluster(managers=1, workers=1)
    ids = [n["id"] for n in sorted(nodes, key=lambda n: n["hostname"])]
    broker.start()
    h1.cli("service", "create", "--name", "web", "--", "sleep", "100000")
    sub_log = h2.data_dir / "mqtt-sub-all.log"
    h2.spawn("mosquitto_sub", "-h", h1.ip, "-p", str(broker.port), "--cafile", broker.ca,
             "-u", "admin", "-P", PASSWORDS["admin"], "-t", "shoal/#", "-v", "-q", "1",
             log_name="mqtt-sub-all")
    url = f"mqtts://node1@{h1.ip}:{broker.port}"

    def mqtt_set(*flags: str, password: str | None = None) -> None:
        argv = [*h1.shoal_argv, "-H", f"unix://{h1.sock}", "mqtt", "set", url, "--ca",
                broker.ca, "--commands", *flags]
        if password is not None:
            argv.append("--password-stdin")
            h1.run("sh", "-c", f"printf '%s\\n' {shlex.quote(password)} | {shlex.join(argv)}")
        else:
            h1.run(*argv)

    def latest(topic: str) -> str | None:
        return next((p for t, p in reversed(received(sub_log)) if t == topic), None)

    def published(prefix: str) -> bool | None:
        web = latest(f"{prefix}/service/web/state")
        return (all(latest(f"{prefix}/node/{i}/availability") == "online" for i in ids)
                and web is not None and json.loads(web)["running"] >= 1) or None

    mqtt_set("--topic-prefix", PREFIX, password=PASSWORDS["node1"])
    shown = h1.cli("mqtt", "show", "--format", "json").stdout
    assert PASSWORDS["node1"] not in shown
    assert json.loads(shown)["password"] is True and json.loads(shown)["commands"] is True
    wait_until(lambda: published(PREFIX), timeout=45,
               what=f"both nodes and web published under {PREFIX} ({sub_log})")

    key = h1.cli_json("mqtt", "command-key")["command_key"]
    before = h1.cli_json("service", "inspect", "web")[0]["version"]

    def command(rid: str, replicas: int, mac: str) -> None:
        h2.run("mosquitto_pub", "-h", h1.ip, "-p", str(broker.port), "--cafile", broker.ca,
               "-u", "admin", "-P", PASSWORDS["admin"], "-q", "1",
               "-t", f"{PREFIX}/cmd/service/web/scale",
               "-m", json.dumps({"replicas": replicas, "request_id": rid, "hmac": mac}))

    command("r1", 2, sign_scale(key.encode(), "web", 2, "r1"))
    command("r1", 2, sign_scale(key.encode(), "web", 2, "r1"))  # (QoS 1 redelivery)
    command("r2", 5, sign_scale(b"not the cluster's key, 32 bytes!", "web", 5, "r2"))

    def results(rid: str) -> list[dict[str, Any]]:
        return [json.loads(p) for t, p in received(sub_log)
                if t == f"{PREFIX}/cmd/result/{rid}"]
    wait_until(lambda: (len(results("r1")) == 2 and len(results("r2")) == 1) or None,
               timeout=20, what="the answers to r1 (twice) and r2")
    assert sorted(r["duplicate"] for r in results("r1")) == [False, True]
    assert results("r2")[0]["ok"] is False and results("r2")[0]["error"]["field"] == "hmac"
    svc = h1.cli_json("service", "inspect", "web")[0]
    assert svc["spec"]["mode"]["replicas"] == 2 and svc["version"] == before + 1

    # a new prefix (same user: the sealed password is kept) → republished under it
    mqtt_set("--topic-prefix", f"{PREFIX}/b")
    wait_until(lambda: published(f"{PREFIX}/b"), timeout=45,
               what=f"everything republished under {PREFIX}/b")
    assert h1.cli_json("mqtt", "command-key")["command_key"] == key

    h1.cli("mqtt", "unset")
    wait_until(lambda: all(latest(f"{PREFIX}/b/node/{i}/availability") == "offline"
                           for i in ids) or None, timeout=30, what="both bridges stopped")
    assert "shoal_mqtt_connected" not in scrape(h1) and "shoal_mqtt_connected" not in scrape(h2)
    assert json.loads(h1.cli("mqtt", "show", "--format", "json").stdout) == {"set": False}
