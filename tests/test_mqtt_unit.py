"""The MQTT bridge's pure parts, without a broker: settings (errors name the flag), the
reconnect back-off, how failures are classified, and the retained state documents.

Each test names the property it checks.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl

import aiomqtt
import pytest

from shoal.node.config import AgentConfig
from shoal.node.mqttbridge import service_states
from shoal.node.mqttconfig import MqttConfig, backoff, classify
from shoal.node.source import MemoryStore
from shoal.raft import spec
from shoal.raft.models import Node, NodeRole, Service, Task, TaskState, TaskStatus
from shoal.raft.state import Snapshot


@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"url": "http://broker"}, "--mqtt-url"),
    ({"url": "mqtts://"}, "--mqtt-url"),
    ({"url": "mqtts://u:secret@broker"}, "--mqtt-password-file"),
    ({"url": "mqtt://broker:99999"}, "--mqtt-url"),
    ({"url": "mqtt://broker/topic"}, "--mqtt-topic-prefix"),
    ({"url": "mqtt://broker", "ca_file": "/etc/hostname"}, "--mqtt-ca"),
    ({"url": "mqtts://broker", "password_file": "/etc/hostname"}, "--mqtt-password-file"),
    ({"url": "mqtts://u@broker", "password_file": "/nonexistent"}, "--mqtt-password-file"),
    ({"url": "mqtts://broker", "cert_file": "/etc/hostname"}, "--mqtt-key"),
    ({"url": "mqtts://broker", "topic_prefix": "a/#"}, "--mqtt-topic-prefix"),
    ({"url": "mqtts://broker", "keepalive": 0}, "--mqtt-keepalive"),
])
def test_a_bad_setting_is_refused_naming_its_flag(kwargs: dict[str, object], flag: str
                                                  ) -> None:
    """The agent refuses to start with a bad --mqtt-* setting and says which flag; a
    password is never accepted in the URL (it would show in `ps`)."""
    cfg = AgentConfig(advertise_addr="10.0.0.1", mqtt=MqttConfig(**kwargs))  # type: ignore
    with pytest.raises(ValueError, match=flag):
        cfg.validate()


def test_the_broker_url_gives_tls_host_port_and_user() -> None:
    """Default ports: 1883 plain, 8883 TLS; no URL = no bridge."""
    assert MqttConfig(url="mqtts://node1@broker.lan").broker() == (True, "broker.lan", 8883,
                                                                   "node1")
    assert MqttConfig(url="mqtt://10.0.0.5:1999").broker() == (False, "10.0.0.5", 1999, "")
    assert not MqttConfig().enabled
    MqttConfig().validate()  # off: nothing to check


def test_back_off_doubles_up_to_its_bound_with_jitter() -> None:
    """0.5, 1, 2, 4 … seconds up to 30, each ±20 %, so nodes do not reconnect in step."""
    mid = [backoff(n, 0.5, 30.0, rand=lambda: 0.5) for n in range(1, 9)]
    assert mid == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff(1, 0.5, 30.0, rand=lambda: 0.0) == pytest.approx(0.4)
    assert backoff(1, 0.5, 30.0, rand=lambda: 1.0) == pytest.approx(0.6)
    assert backoff(10_000, 0.5, 30.0, rand=lambda: 0.5) == 30.0


def test_failures_are_classified_for_the_log_and_metrics() -> None:
    """The reasons a user acts on: nothing listening, TLS, credentials, authorisation."""
    def wrapped(cause: BaseException) -> aiomqtt.MqttError:
        try:
            raise aiomqtt.MqttError(str(cause)) from cause
        except aiomqtt.MqttError as exc:
            return exc
    assert classify(wrapped(ConnectionRefusedError(111, "Connection refused"))) == "refused"
    assert classify(wrapped(ssl.SSLCertVerificationError("certificate verify failed"))) \
        == "tls"
    assert classify(wrapped(socket.gaierror(-2, "Name or service not known"))) == "dns"
    assert classify(aiomqtt.MqttCodeError(5, "Connection refused: Not authorised")) == \
        "not_authorized"
    assert classify(aiomqtt.MqttCodeError(134, "Bad user name or password")) == \
        "bad_credentials"
    assert classify(aiomqtt.MqttError("Operation timed out")) == "timeout"
    assert classify(RuntimeError("?")) == "error"


def _snapshot() -> Snapshot:
    snap = MemoryStore().snapshot()
    svc_spec = spec.ServiceSpec(name="web", mode=spec.ServiceMode(replicas=3),
                                task=spec.TaskSpec(container=spec.ContainerSpec(
                                    image="busybox", command=["sleep", "9"])))
    svc = Service(id="s1", spec=svc_spec)
    node = Node(id="n1", hostname="h1", addr="10.0.0.1", api_port=2377, raft_port=2378,
                role=NodeRole.MANAGER)
    tasks = {}
    for slot, state in ((1, TaskState.RUNNING), (2, TaskState.RUNNING), (3, TaskState.PENDING)):
        tid = f"t{slot}"
        tasks[tid] = Task(id=tid, service_id="s1", service_name="web", slot=slot,
                          node_id="n1", spec=svc_spec.task, service_version=1,
                          status=TaskStatus(state=state))
    return dataclasses.replace(snap, services={"s1": svc}, nodes={"n1": node}, tasks=tasks)


def test_service_state_counts_running_replicas_against_desired() -> None:
    """The retained service document: desired 3, running 2 (the pending one does not
    count), the image, the update state."""
    doc = service_states(_snapshot())["web"]
    assert (doc["desired"], doc["running"], doc["healthy"], doc["image"]) == \
        (3, 2, 2, "busybox")
    assert doc["update_state"] == ""



def test_the_setting_is_replicated_sealed_versioned_and_refused_when_malformed() -> None:
    """mqtt_set keeps only sealed secrets, raises the version, refuses a stale version (the
    field named) and a malformed url; it survives the state's wire form; unset removes it."""
    from shoal.raft.state import ClusterState
    from shoal.raft.wire import state_from_bytes, state_to_bytes
    st = ClusterState()
    good = {"url": "mqtts://node1@broker:8883", "password": "sealed:AAAA", "commands": True,
            "command_key": "sealed:BBBB", "command_key_version": 1}
    assert st.apply({"op": "mqtt_set", "setting": good, "now": 1.0, "version": 0}) == \
        {"ok": True, "version": 1}
    for bad, field in (({**good, "password": "in the clear"}, "password"),
                       ({**good, "url": "http://x"}, "url"),
                       ({**good, "commands": "yes"}, "commands"),
                       ({**good, "command_key": ""}, "command_key")):
        assert st.apply({"op": "mqtt_set", "setting": bad, "now": 2.0})["error"]["field"] \
            == field
    assert st.apply({"op": "mqtt_set", "setting": good, "now": 2.0, "version": 0}
                    )["error"]["field"] == "version"
    copy = state_from_bytes(state_to_bytes(st))
    assert copy.cluster.mqtt == st.cluster.mqtt and copy.cluster.mqtt is not None
    assert copy.cluster.mqtt.version == 1 and copy.cluster.mqtt.password == "sealed:AAAA"
    assert st.apply({"op": "mqtt_unset"}) == {"ok": True, "removed": True}
    assert st.cluster.mqtt is None


async def test_a_loop_following_the_state_passes_after_an_applied_entry_not_sooner_than_floor(
) -> None:
    """The cluster-wide MQTT setting watch (and the key loop) wait with ``after_applied``:
    a look after an applied entry (the agent's wake), at most once per floor (a look copies
    the state), and every ``idle`` s otherwise."""
    import asyncio
    import time

    from shoal.node.events import EventLog
    from shoal.node.mqtt import MqttSupervisor
    from shoal.node.source import after_applied

    sup = MqttSupervisor(ctx=None, flags=MqttConfig(), ring=EventLog(),  # type: ignore[arg-type]
                         poll=0.3, idle=0.6)
    looked = time.monotonic()
    sup.wake()  # an entry applied right after the look: the next one waits for the floor
    await after_applied(sup._applied, looked, sup.poll, sup.idle)
    assert time.monotonic() - looked >= 0.3
    looked = time.monotonic()
    await after_applied(sup._applied, looked, sup.poll, sup.idle)  # nothing applied: idle
    assert time.monotonic() - looked >= 0.6
    asyncio.get_running_loop().call_later(0.05, sup.wake)  # the floor passed: at once
    await asyncio.wait_for(after_applied(sup._applied, time.monotonic() - 1.0, 0.3, 300.0),
                           60)
