"""The MQTT bridge (shoal.node.mqttbridge, shoal.node.mqtt) against a REAL broker: Debian's
mosquitto, started by the test on loopback with a generated config — TLS from a test CA, a
password file, an ACL,
a second listener that authenticates by client certificate, persistence. The cluster is
the one-manager in-memory store behind a real ApiServer (wired like the agent), so the
services the tests create go through the real API and the real event ring.

Each test names the property it checks. ``Broker`` is also used by bench/mqtt_latency.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import free_port

from shoal.node.events import EventLog, EventsConfig
from shoal.node.mqttbridge import MqttBridge
from shoal.node.mqttconfig import MqttConfig, sign_scale

PREFIX = "shoal/c1"
PASSWORDS = {"admin": "admin-pw", "node1": "node1-secret-pw", "reader": "reader-pw",
             "operator": "operator-pw"}
ACL = """\
user admin
topic readwrite #

user node1
topic readwrite shoal/c1/#

user reader
topic read shoal/c1/#

user operator
topic write shoal/c1/cmd/#
topic read shoal/c1/cmd/result/#

user certnode
topic readwrite shoal/c1/#
"""


# --------------------------------------------------------------------------- the broker

def _key_and_cert(name: str, issuer: tuple[Any, x509.Name] | None, ca: bool = False,
                  ip: str | None = None) -> tuple[Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    sign_key, issuer_name = issuer if issuer is not None else (key, subject)
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip is not None:
        import ipaddress
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(ip)), x509.DNSName("localhost")]),
            critical=False)
    return key, b.sign(sign_key, hashes.SHA256())


def _write(path: Path, key: Any, cert: x509.Certificate) -> None:
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    path.with_suffix(".key").chmod(0o600)
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class Broker:
    """A mosquitto on ``ip`` (127.0.0.1, or a lab host's address when ``spawn`` starts it in
    that host's netns): ``port`` (TLS + password), ``cert_port`` (TLS + client certificate
    as the user name). ``stop()``/``start()`` keep the ports and the persistence file."""

    def __init__(self, root: Path, ip: str = "127.0.0.1",
                 spawn: Callable[[list[str]], subprocess.Popen[bytes]] | None = None) -> None:
        self.dir = root
        self.ip = ip
        self._spawn = spawn
        root.mkdir(parents=True, exist_ok=True)
        ca_key, ca = _key_and_cert("shoal test CA", None, ca=True)
        _write(root / "ca", ca_key, ca)
        for name, san in (("server", ip), ("certnode", None), ("stranger", None)):
            issuer = (ca_key, ca.subject) if name != "stranger" else None
            k, c = _key_and_cert(name, issuer, ip=san)
            _write(root / name, k, c)
        passwd = root / "passwd"
        passwd.write_text("")
        for user, pw in PASSWORDS.items():
            subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, pw], check=True,
                           capture_output=True)
        (root / "acl").write_text(ACL)
        self.port, self.cert_port = (free_port(), free_port()) if spawn is None else \
            (8883, 8884)
        tls = textwrap.dedent(f"""\
            cafile {root}/ca.crt
            certfile {root}/server.crt
            keyfile {root}/server.key
            """)
        (root / "mosquitto.conf").write_text(
            f"user root\nper_listener_settings false\nallow_anonymous false\n"
            "set_tcp_nodelay true\n"
            f"password_file {passwd}\nacl_file {root}/acl\n"
            f"persistence true\npersistence_location {root}/\nautosave_interval 1\n"
            f"log_dest file {root}/mosquitto.log\nlog_type error\nlog_type warning\n"
            f"log_type notice\nlog_type information\n"
            f"listener {self.port} {ip}\n{tls}"
            f"listener {self.cert_port} {ip}\n{tls}"
            "require_certificate true\nuse_identity_as_username true\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ca(self) -> str:
        return str(self.dir / "ca.crt")

    def start(self) -> None:
        """Start it and wait until it says it runs (its log, so this works from any netns)."""
        assert self.proc is None
        starts = self.log().count(" running")
        argv = ["mosquitto", "-c", str(self.dir / "mosquitto.conf")]
        self.proc = self._spawn(argv) if self._spawn is not None else subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.log().count(" running") > starts:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not start: {self.log()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file (retained messages, sessions)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log(self) -> str:
        p = self.dir / "mosquitto.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def password_file(self, user: str, password: str | None = None) -> str:
        p = self.dir / f"{user}.pw"
        p.write_text((password if password is not None else PASSWORDS[user]) + "\n")
        p.chmod(0o600)
        return str(p)

    def client(self, user: str = "admin", **kw: Any) -> aiomqtt.Client:
        ctx = ssl.create_default_context(cafile=self.ca)
        return aiomqtt.Client(self.ip, self.port, username=user,
                              password=PASSWORDS[user], tls_context=ctx, timeout=5, **kw)

    def bridge_config(self, user: str = "node1", **kw: Any) -> MqttConfig:
        base: dict[str, Any] = dict(
            url=f"mqtts://{user}@{self.ip}:{self.port}", password_file=self.password_file(user),
            ca_file=self.ca, topic_prefix=PREFIX, backoff_min=0.05, backoff_max=0.3,
            cursor_interval=0.1, state_interval=0.05)
        base.update(kw)
        return MqttConfig(**base)


pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None,
                                reason="Debian package mosquitto (Makefile DEB_PKGS)")


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    b = Broker(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()


# --------------------------------------------------------------------------- the node

class Node:
    """The one-manager in-memory cluster behind a real ApiServer, with a bridge."""

    def __init__(self, tmp_path: Path, retained: int = 10_000) -> None:
        from test_openapi import make_server
        self.server, self.store, self.ctx = make_server(tmp_path)
        self.ring = EventLog(EventsConfig(retained=retained))
        self.ring.attach(self.store)
        self.bridge: MqttBridge | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self, config: MqttConfig) -> MqttBridge:
        from test_events_api import boot
        await boot(self.ctx)
        await self.server.start()
        self.bridge = MqttBridge(self.ctx, config, self.ring,
                                 update_service=self.server.c.services.update_service)
        self.task = asyncio.create_task(self.bridge.run())
        return self.bridge

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.server.stop()

    def service(self, name: str) -> Any:
        svc = self.store.snapshot().service_by_name(name)
        assert svc is not None
        return svc

    async def create(self, name: str, replicas: int = 1) -> None:
        conn = aiohttp.UnixConnector(path=str(self.server.config.socket_path))
        async with aiohttp.ClientSession(connector=conn) as http, http.post(
                "http://shoal/v1/services", json={"spec": {
                    "name": name, "mode": {"replicas": replicas},
                    "task": {"container": {"image": "busybox", "command": ["sleep", "9"]}}}}
        ) as r:
            assert r.status == 200, await r.text()


@contextlib.asynccontextmanager
async def node(tmp_path: Path, config: MqttConfig, retained: int = 10_000
               ) -> AsyncIterator[Node]:
    n = Node(tmp_path, retained)
    await n.start(config)
    try:
        yield n
    finally:
        await n.stop()


async def until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.02)


async def gather(client: aiomqtt.Client, done: Callable[[dict[str, Any]], bool],
                 timeout: float = 10.0) -> dict[str, Any]:
    """topic → last payload (JSON-decoded when it can be) until ``done(seen)``."""
    seen: dict[str, Any] = {}
    async with asyncio.timeout(timeout):
        async for msg in client.messages:
            raw = bytes(msg.payload) if isinstance(msg.payload, bytes | bytearray) else b""
            try:
                seen[str(msg.topic)] = json.loads(raw) if raw.startswith(b"{") else raw.decode()
            except ValueError:
                seen[str(msg.topic)] = raw.decode(errors="replace")
            if done(seen):
                return seen
    return seen


# --------------------------------------------------------------------------- tests

async def test_a_late_subscriber_gets_retained_state_then_live_events(
        tmp_path: Path, broker: Broker) -> None:
    """Over TLS with a password: after the bridge published, a subscriber that connects late
    gets the node's availability, node and service state (with term and index) at once, then
    new events on …/events/TYPE at QoS 1; a clean stop leaves ``offline`` retained."""
    async with node(tmp_path, broker.bridge_config()) as n:
        await n.create("web", replicas=2)
        assert n.bridge is not None
        await until(lambda: n.bridge is not None and n.bridge.published["state"] >= 2,
                    what="state published")
        async with broker.client() as sub:
            await sub.subscribe(f"{PREFIX}/#", qos=1)
            seen = await gather(sub, lambda s: f"{PREFIX}/service/web/state" in s
                                and f"{PREFIX}/node/n1/state" in s
                                and f"{PREFIX}/node/n1/availability" in s)
            assert seen[f"{PREFIX}/node/n1/availability"] == "online"
            web = seen[f"{PREFIX}/service/web/state"]
            assert (web["desired"], web["running"], web["image"]) == (2, 0, "busybox")
            assert web["term"] == 1 and web["index"] >= 3
            assert seen[f"{PREFIX}/node/n1/state"]["hostname"] == "h1"
            await n.create("api")
            seen = await gather(sub, lambda s: f"{PREFIX}/events/service" in s
                                and s[f"{PREFIX}/events/service"]["name"] == "api")
            ev = seen[f"{PREFIX}/events/service"]
            assert ev["action"] == "create" and ev["cursor"] == \
                n.ring.retained()[-1].cursor
    async with broker.client() as sub:
        await sub.subscribe(f"{PREFIX}/node/n1/availability", qos=1)
        seen = await gather(sub, lambda s: bool(s))
        assert seen[f"{PREFIX}/node/n1/availability"] == "offline"


async def test_a_client_certificate_authenticates_without_a_password(
        tmp_path: Path, broker: Broker) -> None:
    """On the listener that requires client certificates, the certificate's name is the
    user (certnode), which the ACL lets publish under shoal/c1."""
    cfg = MqttConfig(url=f"mqtts://127.0.0.1:{broker.cert_port}", ca_file=broker.ca,
                     cert_file=str(broker.dir / "certnode.crt"),
                     key_file=str(broker.dir / "certnode.key"), topic_prefix=PREFIX,
                     backoff_min=0.05, backoff_max=0.3)
    async with node(tmp_path, cfg) as n, broker.client() as sub:
        await sub.subscribe(f"{PREFIX}/node/n1/availability", qos=1)
        seen = await gather(sub, lambda s: s.get(f"{PREFIX}/node/n1/availability") == "online")
        assert seen and n.bridge is not None and n.bridge.connects == 1


async def test_a_wrong_password_is_refused_reported_clearly_and_never_logged(
        tmp_path: Path, broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    """A bad password: the bridge says the broker refused it and what to check, once (not at
    every retry), counts it by reason in /metrics, keeps retrying with back-off, never logs
    the password, and the node's API works meanwhile."""
    caplog.set_level(logging.DEBUG, logger="shoal.mqtt")
    bad = "hunter2-wrong-password"
    cfg = broker.bridge_config(password_file=broker.password_file("node1-bad", bad))
    async with node(tmp_path, cfg) as n:
        b = n.bridge
        assert b is not None
        await until(lambda: b.failures["not_authorized"] + b.failures["bad_credentials"] >= 3,
                    what="three refused connects")
        await n.create("still-works")  # the API does not depend on the broker
        assert n.task is not None and not n.task.done()
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "connection failed" in warnings[0] and "password" in warnings[0]
        assert bad not in caplog.text
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.parser import text_string_to_metric_families
        reg = CollectorRegistry()
        from shoal.node.mqttbridge import MqttCollector
        reg.register(MqttCollector(b))
        fams = {f.name: f for f in text_string_to_metric_families(
            generate_latest(reg).decode())}
        refused = {s.labels["reason"]: s.value for s in fams["shoal_mqtt_connect_failures"]
                   .samples if s.name.endswith("_total")}
        assert refused["not_authorized"] + refused["bad_credentials"] >= 3
        assert fams["shoal_mqtt_connected"].samples[0].value == 0


async def test_the_acl_keeps_a_user_to_its_own_topics(tmp_path: Path, broker: Broker) -> None:
    """node1 may only write under shoal/c1: a bridge of node1 told to use shoal/other
    connects, but the broker delivers none of its messages; a read-only user's publish under
    shoal/c1 is dropped too, while node1's own prefix works."""
    async with broker.client() as sub:
        await sub.subscribe("#", qos=1)
        cfg = broker.bridge_config(topic_prefix="shoal/other", timeout=1.0)
        async with node(tmp_path / "a", cfg) as n:
            await until(lambda: n.bridge is not None and n.bridge.published["state"] >= 1,
                        what="the denied publishes to be acknowledged")
            assert n.bridge is not None and n.bridge.failures["acl"] == 1  # and said so
            async with broker.client("reader") as reader:
                await reader.publish(f"{PREFIX}/cmd/forged", b"x", qos=1)
            await sub.publish("marker/1", b"m", qos=1)  # after everything above
            seen = await gather(sub, lambda s: "marker/1" in s)
            assert [t for t in seen if t.startswith("shoal/")] == [], seen
        async with node(tmp_path / "b", broker.bridge_config()):
            seen = await gather(sub, lambda s: f"{PREFIX}/node/n1/state" in s)
            assert f"{PREFIX}/node/n1/state" in seen


async def test_a_broker_restart_mid_stream_loses_no_event(
        tmp_path: Path, broker: Broker) -> None:
    """Services created while the broker restarts: after the bridge reconnects, a
    subscriber with a persistent session has every event of the ring, in cursor order
    (duplicates allowed: at least once), and the retained state is republished."""
    got: list[str] = []
    stop = asyncio.Event()

    async def subscribe() -> None:
        while not stop.is_set():
            with contextlib.suppress(aiomqtt.MqttError):
                async with broker.client(identifier="persistent-sub",
                                         clean_session=False) as sub:
                    await sub.subscribe(f"{PREFIX}/events/#", qos=1)
                    async for msg in sub.messages:
                        assert isinstance(msg.payload, bytes)
                        got.append(json.loads(msg.payload)["cursor"])
            await asyncio.sleep(0.05)

    reader = asyncio.create_task(subscribe())
    try:
        async with node(tmp_path, broker.bridge_config()) as n:
            b = n.bridge
            assert b is not None
            await until(lambda: len(got) >= 1, what="the first event")
            for i in range(24):
                await n.create(f"s{i}")
                if i == 8:
                    broker.stop()
                if i == 16:
                    await until(lambda: b.failures["lost"] >= 1, what="the bridge to notice")
                    broker.start()
                await asyncio.sleep(0.01)
            want = [ev.cursor for ev in n.ring.retained()]
            await until(lambda: set(want) <= set(got), what="every event")
            assert b.connects >= 2
            first_seen = list(dict.fromkeys(got))
            assert first_seen[:len(want)] == want
            await until(lambda: b.published["availability"] >= 2, what="republished online")
    finally:
        stop.set()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def test_while_the_broker_is_away_the_ring_buffers_and_a_gap_is_reported(
        tmp_path: Path, broker: Broker) -> None:
    """The broker stops; the node keeps working (its API, its ring); the bridge retries.
    More events than the ring keeps (5) happen meanwhile: after the broker is back, the
    subscriber gets one ``gap`` record, then the 5 retained events, and the gap is counted."""
    async with broker.client(identifier="gap-sub", clean_session=False) as sub:
        await sub.subscribe(f"{PREFIX}/events/#", qos=1)
    async with node(tmp_path, broker.bridge_config(), retained=5) as n:
        b = n.bridge
        assert b is not None
        await until(lambda: b.published["event"] >= 1, what="the join event")
        broker.stop()
        for i in range(8):
            await n.create(f"away{i}")  # the API does not wait for the broker
        await until(lambda: b.failures["refused"] >= 2, what="refused reconnects")
        broker.start()
        async with broker.client(identifier="gap-sub", clean_session=False) as sub:
            await sub.subscribe(f"{PREFIX}/events/#", qos=1)
            records: list[dict[str, Any]] = []
            async with asyncio.timeout(10):
                async for msg in sub.messages:
                    assert isinstance(msg.payload, bytes)
                    records.append(json.loads(msg.payload))
                    if records[-1].get("name") == "away7":
                        break
        kinds = [r["type"] for r in records]
        assert "gap" in kinds
        after_gap = records[kinds.index("gap") + 1:]
        assert [r["name"] for r in after_gap] == [f"away{i}" for i in range(3, 8)]
        assert b.gaps == 1


WILL_SCRIPT = """
import asyncio, sys
from shoal.node.config import AgentConfig, NodeIdentity
from shoal.node.context import NodeContext
from shoal.node.events import EventLog
from shoal.node.mqttbridge import MqttBridge
from shoal.node.mqttconfig import MqttConfig, sign_scale
from shoal.node.source import MemoryStore

async def main():
    store = MemoryStore()
    ctx = NodeContext(AgentConfig(advertise_addr="127.0.0.1"), "h9")
    ctx.use(NodeIdentity("n9", "c1", "manager", "", []), store, store)
    ring = EventLog()
    ring.attach(store)
    cfg = MqttConfig(url=sys.argv[1], password_file=sys.argv[2], ca_file=sys.argv[3],
                     topic_prefix="shoal/c1", keepalive=1)
    bridge = MqttBridge(ctx, cfg, ring)
    await bridge.run()

asyncio.run(main())
"""


async def test_a_killed_node_is_announced_offline_by_its_last_will(
        tmp_path: Path, broker: Broker) -> None:
    """kill -9 of a process running a bridge (keepalive 1 s): the broker publishes its
    retained ``offline`` (after 1.5 x keepalive) for it."""
    url = f"mqtts://node1@127.0.0.1:{broker.port}"
    proc = subprocess.Popen(
        [sys.executable, "-c", WILL_SCRIPT, url,
         broker.password_file("node1"), broker.ca],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with broker.client() as sub:
            await sub.subscribe(f"{PREFIX}/node/n9/availability", qos=1)
            await gather(sub, lambda s: s.get(f"{PREFIX}/node/n9/availability") == "online",
                         timeout=15)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            # (no wall-clock assertion: without a will it would never come; the bench and
            # docs/benchmarks.md give the delay, ~1.5 x keepalive)
            seen = await gather(
                sub, lambda s: s.get(f"{PREFIX}/node/n9/availability") == "offline",
                timeout=15)
        assert seen[f"{PREFIX}/node/n9/availability"] == "offline"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_signed_scale_command_applies_once_and_others_change_nothing(
        tmp_path: Path, broker: Broker) -> None:
    """Opt-in commands: the operator's signed scale, delivered twice, scales once (the second
    is answered as a duplicate, also after another change in between); a wrong HMAC is
    answered `unauthorized` and changes nothing; the read-only user's command never reaches
    the bridge (the broker's ACL drops it)."""
    key = b"k" * 32
    key_file = broker.dir / "cmd.key"
    key_file.write_bytes(key + b"\n")
    cfg = broker.bridge_config(command_key_file=str(key_file))
    async with node(tmp_path, cfg) as n, broker.client("operator") as op:
        b = n.bridge
        assert b is not None
        await n.create("web", replicas=1)
        await op.subscribe(f"{PREFIX}/cmd/result/#", qos=1)
        await until(lambda: b.published["state"] >= 2, what="the bridge leading")

        async def command(rid: str, replicas: int, mac: str | None = None) -> dict[str, Any]:
            body = {"replicas": replicas, "request_id": rid,
                    "hmac": mac or sign_scale(key, "web", replicas, rid)}
            await op.publish(f"{PREFIX}/cmd/service/web/scale", json.dumps(body), qos=1)
            seen = await gather(op, lambda s: f"{PREFIX}/cmd/result/{rid}" in s)
            result: dict[str, Any] = seen[f"{PREFIX}/cmd/result/{rid}"]
            return result

        first = await command("req-1", 3)
        assert first["ok"] and not first["duplicate"] and first["replicas"] == 3
        version = n.service("web").version
        again = await command("req-1", 3)  # QoS 1 redelivery
        assert again["ok"] and again["duplicate"]
        assert n.service("web").version == version
        await command("req-2", 5)
        late = await command("req-1", 3)  # a stale duplicate after another change
        assert late["duplicate"] and n.service("web").spec.mode.replicas == 5
        forged = await command("req-3", 9, mac="0" * 64)
        assert not forged["ok"] and forged["error"]["code"] == "unauthorized"
        async with broker.client("reader") as reader:
            await reader.publish(f"{PREFIX}/cmd/service/web/scale", json.dumps(
                {"replicas": 7, "request_id": "req-4",
                 "hmac": sign_scale(key, "web", 7, "req-4")}), qos=1)
        await command("req-5", 5)  # answered after anything the reader's could have done
        assert n.service("web").spec.mode.replicas == 5
        assert b.command_results == {"applied": 3, "duplicate": 2, "refused": 1,
                                     "invalid": 0, "failed": 0}
        # a signed expiry: applied before it, refused after it (a captured command cannot be
        # replayed once 16 newer ids pushed its own out of the labels), or too far ahead
        async def expiring(rid: str, replicas: int, expires: Any, sign: Any) -> dict[str, Any]:
            body = {"replicas": replicas, "request_id": rid, "expires": expires,
                    "hmac": sign_scale(key, "web", replicas, rid, sign)}
            await op.publish(f"{PREFIX}/cmd/service/web/scale", json.dumps(body), qos=1)
            seen = await gather(op, lambda s: f"{PREFIX}/cmd/result/{rid}" in s)
            result: dict[str, Any] = seen[f"{PREFIX}/cmd/result/{rid}"]
            return result

        now = int(time.time())
        assert (await expiring("req-6", 4, now + 60, now + 60))["ok"]
        assert n.service("web").spec.mode.replicas == 4
        for rid, expires, code in (("req-7", now - 5, "expired"), ("req-8", now + 3600, "expired")):
            res = await expiring(rid, 6, expires, expires)
            assert not res["ok"] and res["error"]["code"] == code, res
        res = await expiring("req-9", 6, now + 60, None)  # (its expiry not signed: forged)
        assert res["error"]["code"] == "unauthorized", res
        res = await expiring("req-10", 6, "soon", None)
        assert res["error"] == {"code": "invalid", "field": "expires", "message": res[
            "error"]["message"]}, res
        assert n.service("web").spec.mode.replicas == 4


async def test_a_new_leader_resumes_after_the_retained_cursor_and_clears_stale_state(
        tmp_path: Path, broker: Broker) -> None:
    """Manager A's bridge publishes and stops; meanwhile two services are created and one is
    removed; manager B's bridge (the same replicated log: the same cursors) resumes after the
    cursor A left on the broker — the subscriber gets only the new events, none again — and
    clears the removed service's retained state."""
    from shoal.node.config import NodeIdentity
    from shoal.node.context import NodeContext

    async with broker.client() as sub:
        await sub.subscribe(f"{PREFIX}/#", qos=1)
        n = Node(tmp_path)
        ring_b = EventLog()  # manager B's ring follows the same log from the start
        ring_b.attach(n.store)
        await n.start(broker.bridge_config())
        try:
            await n.create("gone")
            await n.create("kept")
            last = n.ring.retained()[-1].cursor
            await gather(sub, lambda s: s.get(f"{PREFIX}/bridge/cursor", {}).get("cursor")
                         == last and f"{PREFIX}/service/gone/state" in s)
            assert n.task is not None
            n.task.cancel()  # manager A stops (a planned restart or a lost leadership)
            await asyncio.gather(n.task, return_exceptions=True)
            n.task = None
            await n.create("new1")
            await n.create("new2")
            conn = aiohttp.UnixConnector(path=str(n.server.config.socket_path))
            async with aiohttp.ClientSession(connector=conn) as http, \
                    http.delete("http://shoal/v1/services/gone") as r:
                assert r.status == 200, await r.text()
            ctx_b = NodeContext(n.ctx.config, "h2")  # manager B: another node, same log
            ctx_b.use(NodeIdentity("n2", "c1", "manager", "", []), n.store, n.store)
            b = MqttBridge(ctx_b, broker.bridge_config(), ring_b)
            task_b = asyncio.create_task(b.run())
            try:
                events: list[dict[str, Any]] = []
                cleared = False
                async with asyncio.timeout(10):
                    async for msg in sub.messages:
                        topic = str(msg.topic)
                        if topic.startswith(f"{PREFIX}/events/"):
                            assert isinstance(msg.payload, bytes)
                            events.append(json.loads(msg.payload))
                        if topic == f"{PREFIX}/service/gone/state" and not msg.payload:
                            cleared = True
                        if cleared and any(e["action"] == "remove" for e in events):
                            break
                assert [(e["type"], e["action"], e["name"]) for e in events] == [
                    ("service", "create", "new1"), ("service", "create", "new2"),
                    ("service", "remove", "gone")]
            finally:
                task_b.cancel()
                await asyncio.gather(task_b, return_exceptions=True)
        finally:
            await n.stop()


async def test_the_supervisor_follows_the_cluster_wide_setting_live(
        tmp_path: Path, broker: Broker) -> None:
    """Through the real API (POST/GET/DELETE /v1/mqtt): set → a bridge runs with the sealed
    password (never in the state in the clear, never in GET /v1/mqtt); a new prefix → a new
    bridge under it; unset → no bridge; the agent's own --mqtt-url would win (tested by
    the flags tests above)."""
    from dataclasses import replace

    from test_events_api import boot, session

    from shoal.node.mqtt import MqttSupervisor
    from shoal.node.sealing import new_key
    n = Node(tmp_path)
    assert n.ctx.identity is not None
    n.ctx.use(replace(n.ctx.identity, manager_key=new_key()), n.store, n.store)
    await boot(n.ctx)
    await n.server.start()
    sup = MqttSupervisor(n.ctx, MqttConfig(backoff_min=0.05, backoff_max=0.3), n.ring,
                         None, n.server.c.services.update_service, n.server.c.security,
                         poll=0.1)
    loop = asyncio.get_running_loop()  # as the agent does: every applied entry wakes it
    n.store.add_listener(lambda _index: loop.call_soon_threadsafe(sup.wake))
    task = asyncio.create_task(sup.run())
    url = f"mqtts://node1@{broker.ip}:{broker.port}"
    ca = Path(broker.ca).read_text()
    try:
        async with session(n.server) as http:
            async def call(method: str, path: str, body: Any = None) -> dict[str, Any]:
                async with http.request(method, f"http://shoal{path}", json=body) as r:
                    doc: dict[str, Any] = await r.json()
                    assert r.status == 200, doc
                    return doc
            shown = await call("POST", "/v1/mqtt", {
                "url": url, "password": PASSWORDS["node1"], "topic_prefix": PREFIX,
                "ca": ca, "commands": True})
            assert shown["password"] is True and PASSWORDS["node1"] not in json.dumps(shown)
            setting = n.store.snapshot().cluster.mqtt
            assert setting is not None and PASSWORDS["node1"] not in repr(setting)
            await until(lambda: sup.bridge is not None and sup.bridge.connected,
                        what="the bridge connected")
            first = sup.bridge
            key = (await call("GET", "/v1/mqtt/command-key"))["command_key"]
            assert first is not None and first.config.key() == key.encode()
            await call("POST", "/v1/mqtt", {"url": url, "topic_prefix": PREFIX + "/b",
                                            "commands": True})
            await until(lambda: sup.bridge is not first and sup.bridge is not None and
                        sup.bridge.connected and sup.bridge.prefix == PREFIX + "/b",
                        what="a new bridge under the new prefix (password kept)")
            assert (await call("GET", "/v1/mqtt/command-key"))["command_key"] == key
            await call("POST", "/v1/mqtt", {"url": url, "topic_prefix": PREFIX + "/b",
                                            "commands": True, "rotate_command_key": True})
            assert (await call("GET", "/v1/mqtt/command-key"))["command_key"] != key
            assert (await call("DELETE", "/v1/mqtt"))["removed"] is True
            await until(lambda: sup.bridge is None, what="the bridge stopped")
            assert (await call("GET", "/v1/mqtt")) == {"set": False}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await n.server.stop()
