"""The MQTT bridge: this node's part of the cluster, published to an MQTT broker (aiomqtt 2.x).

Owns: ``MqttBridge`` — one connection per node to the broker, reconnected with exponential
back-off, publishing the topics below and (on the leader) taking scale commands — the retained
state documents (``node_states``, ``service_states``) and the bridge's Prometheus collector
(``shoal_mqtt_*``). Must not touch: the cluster state (it only reads snapshots and the event
ring; for a scale command it proposes only through Services.update_service), the event ring's
filling, which bridge runs (shoal.node.mqtt.MqttSupervisor), its settings' rules
(shoal.node.mqttconfig). The broker is never on the critical path: nothing here runs on Raft's
apply thread except a ``call_soon_threadsafe`` wake-up, and every publish happens on the event
loop in this bridge's own task; a slow or absent broker only delays the bridge.

Topics, under ``PREFIX`` (``--mqtt-topic-prefix``, default ``shoal/CLUSTER``: the first 12
characters of the cluster id)::

    PREFIX/node/ID/availability  "online" | "offline"  retained, QoS 1; every node, for itself.
                                 "offline" is also its last will: a node that dies is
                                 announced by the broker — at once after kill -9 (the kernel
                                 closes the socket), after 1.5 x keepalive after a power loss
                                 or a network cut; a clean stop publishes it before leaving.
    PREFIX/node/ID/state         JSON, retained, QoS 1; the leader, for every node
    PREFIX/service/NAME/state    JSON, retained, QoS 1; the leader, for every service (an
                                 empty retained message clears a removed service)
    PREFIX/events/TYPE           JSON event (as GET /v1/events), QoS 1, not retained; the
                                 leader. TYPE: service task node secret config, or ``gap``
    PREFIX/bridge/cursor         retained, QoS 1: the last event cursor the broker acknowledged
                                 (the leader's bridge writes it; a new leader resumes after it)
    PREFIX/cmd/service/NAME/scale  in: {"replicas", "request_id", "hmac"} (opt-in, see below)
    PREFIX/cmd/result/REQUEST_ID   out: {"request_id", "ok", "duplicate", "service",
                                 "replicas", "version" | "error": {code, message, field}}

State payloads carry ``term`` and ``index`` (the Raft term of the publishing leader and the
applied index of the snapshot): a subscriber keeps the message with the greater (term, index)
and so drops a stale update that a deposed leader sent late.

Why these QoS/retain choices: state and availability are *current values* — retained, so a
late subscriber (Home Assistant, Node-RED, Grafana) gets them at once; QoS 1 so the broker
confirms them. Events are a *stream* — never retained (a retained event would be replayed as
if new), QoS 1 (at least once; QoS 2 costs two more round trips per event and still cannot
give exactly-once across a leader change or a reconnect).

Delivery of events: at least once, in cursor order, resumable. The bridge reads the
manager's event ring (shoal.node.events.EventLog) from the last cursor the broker
acknowledged (PUBACK). The ring *is* the bounded buffer: while the broker is away the events
stay there (``--events-retained``, 10,000 by default); if the ring rolls past the bridge's
cursor, the bridge publishes one ``PREFIX/events/gap`` record (the GET /v1/events gap record),
counts it (``shoal_mqtt_event_gaps_total``) and resumes with the oldest retained event; the
retained state topics are republished on every connect, so subscribers resync from them.
Duplicates: an event whose PUBACK was lost with the connection is published again after the
reconnect; a new leader resumes after the retained cursor, written every
``cursor_interval`` seconds, so it may repeat up to that much. Subscribers drop duplicates by
the event's ``cursor`` (INDEX-SEQ, ordered). Events reach subscribers that were disconnected
only through their own persistent session (clean_session false, QoS 1) on the broker.

Errors: none escapes ``MqttBridge.run`` except cancellation. Connection failures are logged
once per kind of failure (not at every retry) with a reason — ``refused`` (nothing listens),
``tls`` (certificate or handshake), ``bad_credentials``, ``not_authorized``, ``timeout``,
``dns``, ``lost`` (the connection dropped), ``error`` — and counted by reason in /metrics.
A bad ``--mqtt-*`` setting is a ValueError naming the flag, at agent start (as every
AgentConfig check).

Commands (opt-in with ``--mqtt-command-key-file``; the leader subscribes): a scale command is
authorised twice — by the broker's ACL (only the operators' user may write ``PREFIX/cmd/#``;
MQTT 3.1.1 brokers drop denied messages silently) and by an HMAC-SHA256 over
``scale\nNAME\nREPLICAS\nREQUEST_ID`` with the key in that file (``sign_scale``; the same
file on every manager). Applied exactly once even when QoS 1 delivers it twice or a new leader
sees it again: the request id is written into the service's labels
(``shoal.mqtt.requests``, the last 16) in the same Raft write as the new replica count, with
the expected service version (a concurrent change makes it re-check); a request id already
there is answered as a duplicate without a write. A command may carry ``expires`` (Unix
seconds, at most MAX_EXPIRY ahead, signed: ``...\nREQUEST_ID\nEXPIRES``): after it, it is
refused (``expired``), so a captured command cannot be replayed once its id was pushed
out of the last 16; one without it stays valid as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import socket
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shoal.node.errors import ApiError
from shoal.node.events import CURSOR_RE, EventLog, Key, gap_record
from shoal.node.mqttconfig import HINTS, REASONS, MqttConfig, backoff, classify, sign_scale
from shoal.node.source import ManagerSource, StateSource
from shoal.raft.models import Health, TaskState, to_dict
from shoal.raft.state import Snapshot


class Identity(Protocol):
    """Who this node is (shoal.node.config.NodeIdentity has it)."""

    node_id: str
    cluster_id: str


class BridgeContext(Protocol):
    """What the bridge reads (shoal.node.context.NodeContext has it; a Protocol, so the
    bridge depends on these few things only)."""

    @property
    def identity(self) -> Identity | None: ...

    @property
    def store(self) -> StateSource | None: ...

    @property
    def raft(self) -> ManagerSource | None: ...

    @property
    def node_id(self) -> str: ...

# (ref, spec as a dict, expected version) → {"id", "name", "version"}; raises ApiError
UpdateService = Callable[[str, Any, Any], Awaitable[dict[str, Any]]]

if TYPE_CHECKING:  # (imported where used: only an agent with --mqtt-url pays for paho)
    import aiomqtt

log = logging.getLogger("shoal.mqtt")

EVENT_TYPES = ("service", "task", "node", "secret", "config", "gap")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# service label where the leader records the last applied command request ids (in Raft, so
# a duplicate is recognised after a leader change too): the last REQUESTS_KEPT of them
REQUESTS_LABEL = "shoal.mqtt.requests"
REQUESTS_KEPT = 16
# the furthest ahead a command's ``expires`` may be, seconds (a replay is possible within it
# once REQUESTS_KEPT newer commands were applied)
MAX_EXPIRY = 600
COMMAND_OUTCOMES = ("applied", "duplicate", "refused", "invalid", "failed")
_TOP = 999_999  # a seq after every event of an index (as in shoal.node.events)


def _cancel_pending() -> None:
    """Raise CancelledError if this task was asked to stop. Python 3.11's ``asyncio.wait_for``
    (inside aiomqtt's publish/subscribe) can swallow a cancellation that arrives as the
    awaited reply does (CPython gh-86296, fixed in 3.12); the request stays counted in
    ``Task.cancelling()``, so the loop checks it rather than idling on forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def parse_cursor(text: str) -> Key | None:
    m = CURSOR_RE.match(text.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


def node_states(snap: Snapshot, leader_addr: str | None) -> dict[str, dict[str, Any]]:
    """node id → its retained state (without term/index)."""
    running: dict[str, int] = {}
    for t in snap.tasks.values():
        if t.status.state is TaskState.RUNNING:
            running[t.node_id] = running.get(t.node_id, 0) + 1
    return {n.id: {"id": n.id, "hostname": n.hostname, "addr": n.addr, "role": str(n.role),
                   "state": str(n.state), "availability": str(n.availability),
                   "leader": bool(leader_addr) and n.raft_addr == leader_addr,
                   "labels": dict(n.labels), "tasks_running": running.get(n.id, 0)}
            for n in snap.nodes.values()}


def service_states(snap: Snapshot) -> dict[str, dict[str, Any]]:
    """service name → its retained state (without term/index): desired, running and healthy
    replicas of the current version, image, update state."""
    counts: dict[str, list[int]] = {sid: [0, 0] for sid in snap.services}
    for t in snap.tasks.values():
        c = counts.get(t.service_id)
        if c is None or t.status.state is not TaskState.RUNNING:
            continue
        c[0] += 1
        if t.status.health in (Health.NONE, Health.HEALTHY):
            c[1] += 1
    out = {}
    for sid, s in snap.services.items():
        running, healthy = counts[sid]
        out[s.spec.name] = {
            "id": s.id, "name": s.spec.name, "image": s.spec.task.container.image,
            "version": s.version, "desired": s.spec.mode.replicas, "running": running,
            "healthy": healthy, "update_state": s.update_status.state,
            "update_message": s.update_status.message}
    return out


class MqttBridge:
    """This node's connection to the broker; ``run()`` until cancelled (never raises).

    Reads ``ctx`` (identity, the current state source, the Raft replica on a manager) and the
    manager's event ``ring``; ``registry``, if given, gets the ``shoal_mqtt_*`` collector.
    """

    def __init__(self, ctx: BridgeContext, config: MqttConfig, ring: EventLog,
                 registry: Any = None, update_service: UpdateService | None = None) -> None:
        config.validate()
        # scale commands go through this (shoal.node.control.services.Services.update_service)
        self._update_service = update_service
        self._commands: asyncio.Queue[aiomqtt.Message] = asyncio.Queue(maxsize=1000)
        self.command_results: dict[str, int] = dict.fromkeys(COMMAND_OUTCOMES, 0)
        self.ctx = ctx
        self.config = config
        self.ring = ring
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listening: set[int] = set()  # ids of the state sources we listen to
        # the last event the broker acknowledged (None: not publishing events yet)
        self._acked: Key | None = None
        self._cursor_written: Key | None = None
        self._published: dict[str, str] = {}  # retained topic → payload, this connection
        self._reader: asyncio.Task[None] | None = None
        self._inbox: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
        # figures for /metrics and tests
        self.connected = False
        self.connects = 0
        self.failures: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.published: dict[str, int] = {"event": 0, "state": 0, "availability": 0,
                                          "cursor": 0, "command": 0}
        self.gaps = 0
        self.last_error = ""
        self._closed = False
        ring.on_event.append(self._on_event)
        if registry is not None:
            registry.register(MqttCollector(self))

    # ------------------------------------------------------------------ topics
    @property
    def prefix(self) -> str:
        if self.config.topic_prefix:
            return self.config.topic_prefix
        ident = self.ctx.identity
        return f"shoal/{ident.cluster_id[:12] if ident else 'none'}"

    def topic(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    @property
    def broker_label(self) -> str:
        """The broker as logged: scheme://user@host:port, never the password."""
        tls, host, port, user = self.config.broker()
        return f"{'mqtts' if tls else 'mqtt'}://{user + '@' if user else ''}{host}:{port}"

    def close(self) -> None:
        """Stop listening to the ring and the stores (a bridge replaced by another)."""
        self._closed = True
        with contextlib.suppress(ValueError):
            self.ring.on_event.remove(self._on_event)

    # ------------------------------------------------------------------ wake-ups
    def _on_event(self, _ev: Any) -> None:
        self._wake_threadsafe()

    def _wake_threadsafe(self) -> None:
        """From Raft's apply thread (or the loop): wake the bridge. Never blocks."""
        loop = self._loop
        if loop is not None and not loop.is_closed() and not self._closed:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake.set)

    def _follow_store(self) -> None:
        store = self.ctx.store
        if store is not None and id(store) not in self._listening:
            self._listening.add(id(store))
            store.add_listener(lambda _i: self._wake_threadsafe())

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        """Connect, publish, reconnect with back-off; until cancelled."""
        import aiomqtt  # (lazy: see the top)
        self._loop = asyncio.get_running_loop()
        attempt = 0
        last_reason = ""
        while True:
            while self.ctx.identity is None:  # not (or no longer) in a cluster
                await asyncio.sleep(0.5)
            started = time.monotonic()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # aiomqtt.MqttError, OSError, a bug: never fatal
                reason = classify(exc) if not self.connected else "lost"
                self.failures[reason] = self.failures.get(reason, 0) + 1
                self.last_error = f"{reason}: {exc}"
                level = logging.WARNING if reason != last_reason else logging.DEBUG
                if not isinstance(exc, aiomqtt.MqttError | OSError):
                    log.exception("mqtt: bridge to %s failed", self.broker_label)
                else:
                    hint = HINTS.get(reason, "")
                    log.log(level, "mqtt: %s %s (%s)%s; retrying with back-off",
                            self.broker_label,
                            "connection lost" if reason == "lost" else "connection failed",
                            str(exc) or type(exc).__name__, f": {hint}" if hint else "")
                last_reason = reason
            finally:
                self.connected = False
                if self._reader is not None:
                    self._reader.cancel()
                    self._reader = None
            _cancel_pending()
            if time.monotonic() - started > 10:
                attempt = 0  # it worked for a while: start the back-off again
            attempt += 1
            await asyncio.sleep(backoff(attempt, self.config.backoff_min,
                                        self.config.backoff_max))

    def _client(self) -> aiomqtt.Client:
        import aiomqtt  # (lazy: see the top)
        tls, host, port, user = self.config.broker()
        cfg = self.config
        password = cfg.password or None
        if cfg.password_file:
            lines = Path(cfg.password_file).read_text().splitlines()
            password = lines[0] if lines else ""
        context = None
        if tls:
            context = ssl.create_default_context(cafile=cfg.ca_file or None,
                                                 cadata=cfg.ca_pem or None)
            if cfg.cert_file:
                context.load_cert_chain(cfg.cert_file, cfg.key_file)
            elif cfg.cert_pem:
                _load_chain(context, cfg.cert_pem, cfg.key_pem)
        node_id = self.ctx.node_id
        return aiomqtt.Client(
            host, port, username=user or None, password=password,
            identifier=f"shoal-{node_id}", clean_session=True, keepalive=self.config.keepalive,
            timeout=self.config.timeout, tls_context=context,
            # (paho leaves Nagle on: small QoS 1 messages would wait for delayed ACKs)
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            will=aiomqtt.Will(self.topic("node", node_id, "availability"), b"offline", qos=1,
                              retain=True))

    async def _session(self) -> None:
        import aiomqtt  # (lazy: see the top)
        client = self._client()
        async with asyncio.timeout(self.config.timeout):
            await client.__aenter__()
        try:
            self.connected = True
            self.connects += 1
            self._published = {}
            self._inbox = asyncio.Queue()
            self._reader = asyncio.create_task(self._read(client), name="mqtt-reader")
            log.info("mqtt: connected to %s, topics under %s/", self.broker_label, self.prefix)
            node_id = self.ctx.node_id
            await self._publish(client, self.topic("node", node_id, "availability"),
                                b"online", retain=True, kind="availability")
            retained: dict[str, bytes] | None = None
            key = b""
            resume = True  # on (again) leading: where do events resume, what is stale?
            next_state = next_cursor = 0.0
            while True:
                _cancel_pending()
                self._wake.clear()
                self._follow_store()
                raft = self.ctx.raft
                leader = raft is not None and raft.is_leader()
                deadlines = [time.monotonic() + 1.0]  # (leadership is polled every second)
                if not leader:
                    if not resume and self.config.commands:
                        with contextlib.suppress(aiomqtt.MqttError):
                            await client.unsubscribe(self._command_filter(), timeout=1.0)
                    resume = True
                else:
                    if resume:
                        self._published = {}  # another leader may have written since
                        retained = await self._retained(client)
                        self._resume_from(retained)
                        await self._clear_stale(client, retained)
                        if self.config.commands:
                            key = self.config.key()
                            await client.subscribe(self._command_filter(), qos=1)
                        resume = False
                    while key and not self._commands.empty():
                        await self._command(client, self._commands.get_nowait(), key)
                    # events first (latency), then the periodic writes
                    await self._publish_events(client)
                    if self._pending_events():
                        continue
                    now = time.monotonic()
                    if self._acked != self._cursor_written:
                        if now >= next_cursor:
                            await self._write_cursor(client)
                            next_cursor = now + self.config.cursor_interval
                        else:
                            deadlines.append(next_cursor)
                    if now >= next_state:
                        await self._publish_state(client)
                        next_state = time.monotonic() + self.config.state_interval
                    else:
                        deadlines.append(next_state)  # woken meanwhile: the state may change
                    if self._pending_events():
                        continue
                await self._wait(max(0.0, min(deadlines) - time.monotonic()))
        except asyncio.CancelledError:
            # a clean stop: leave the cursor for the next leader, say offline (the last will
            # is only for unclean ends)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    raft = self.ctx.raft
                    if raft is not None and raft.is_leader() and self._acked is not None \
                            and self._acked != self._cursor_written:
                        await self._write_cursor(client)
                    await client.publish(self.topic("node", self.ctx.node_id, "availability"),
                                         b"offline", qos=1, retain=True)
            raise
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await client.__aexit__(None, None, None)

    async def _read(self, client: aiomqtt.Client) -> None:
        """Reads incoming messages (only the retained ones asked for after a connect); ends
        with MqttError when the connection drops, which wakes the session to reconnect."""
        cmd = self.topic("cmd", "service", "+", "scale")
        async for msg in client.messages:
            if msg.topic.matches(cmd):
                try:
                    self._commands.put_nowait(msg)
                except asyncio.QueueFull:
                    self.command_results["failed"] += 1  # (bounded: a flood is dropped)
                self._wake.set()
            else:
                self._inbox.put_nowait(msg)

    async def _wait(self, seconds: float) -> None:
        """Until woken, ``seconds`` pass, or the connection drops (then MqttError)."""
        import aiomqtt  # (lazy: see the top)
        _cancel_pending()
        reader = self._reader
        assert reader is not None
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({woken, reader}, timeout=seconds,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
        if reader.done():
            reader.result()  # raises the MqttError
            raise aiomqtt.MqttError("the connection ended")

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: bytes,
                       retain: bool = False, kind: str = "state") -> None:
        """QoS 1: returns once the broker acknowledged it; MqttError if the connection drops
        (not after the full timeout: the reader notices first)."""
        import aiomqtt  # (lazy: see the top)
        reader = self._reader
        assert reader is not None
        pub = asyncio.ensure_future(client.publish(topic, payload, qos=1, retain=retain))
        try:
            done, _ = await asyncio.wait({pub, reader}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled: do not leave the publish behind
            pub.cancel()
            raise
        if pub not in done:
            pub.cancel()
            with contextlib.suppress(BaseException):
                await pub
            reader.result()
            raise aiomqtt.MqttError("the connection ended")
        pub.result()
        self.published[kind] += 1

    async def _retained(self, client: aiomqtt.Client) -> dict[str, bytes]:
        """The retained cursor and state topics now on the broker (topic → payload), to
        resume events and clear what no longer exists (the leader, when it starts leading
        or connects)."""
        import aiomqtt  # (lazy: see the top)
        filters = [self.topic("bridge", "cursor"), self.topic("service", "+", "state"),
                   self.topic("node", "+", "state")]
        marker = self.topic("bridge", "sync", self.ctx.node_id)
        found: dict[str, bytes] = {}
        for f in [*filters, marker]:
            await client.subscribe(f, qos=1)
        token = os.urandom(8).hex().encode()
        await self._publish(client, marker, token, kind="cursor")
        # the broker sends the retained messages of a subscription before anything published
        # after it: once our marker is back, we have them all
        try:
            async with asyncio.timeout(self.config.timeout):
                while True:
                    msg = await self._inbox.get()
                    topic = str(msg.topic)
                    if topic == marker and msg.payload == token:
                        break
                    if msg.retain and isinstance(msg.payload, bytes | bytearray):
                        found[topic] = bytes(msg.payload)
        except TimeoutError:
            # MQTT 3.1.1 brokers drop what an ACL denies without telling the publisher: our
            # own marker not coming back is the only sign
            self.failures["acl"] += 1
            level = logging.WARNING if self.failures["acl"] == 1 else logging.DEBUG
            log.log(level, "mqtt: the broker does not deliver this node's messages under "
                    "%s/ back to it: its ACL must let user %r read and write %s/# "
                    "(publishing anyway; events resume from this node's own cursor)",
                    self.prefix, self.config.broker()[3], self.prefix)
        # (a broker may not answer an unsubscribe its ACL denies: don't wait for it)
        with contextlib.suppress(aiomqtt.MqttError):
            await client.unsubscribe([*filters, marker], timeout=1.0)
        return found

    def _resume_from(self, retained: dict[str, bytes]) -> None:
        """Where events resume: after the broker's retained cursor or this process's own
        acknowledged one, whichever is later; neither: from the oldest retained event."""
        theirs = None
        cluster = self.ctx.identity.cluster_id if self.ctx.identity else ""
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            doc = json.loads(retained.get(self.topic("bridge", "cursor"), b"{}"))
            if isinstance(doc, dict) and doc.get("cluster", cluster) == cluster:
                theirs = parse_cursor(str(doc.get("cursor", "")))
        present = self.ring.retained()
        last = present[-1].key if present else (self.ring_index(), _TOP)
        if theirs is not None and theirs > last:
            theirs = None  # this manager is behind (or the cursor is from elsewhere)
        best = max((k for k in (self._acked, theirs) if k is not None), default=None)
        if best is None:  # the first publisher: from the oldest event still here, no gap
            best = (present[0].index, present[0].seq - 1) if present else last
        self._acked = best
        self._cursor_written = theirs

    def ring_index(self) -> int:
        store = self.ctx.store
        return store.index if store is not None else 0

    def _pending_events(self) -> bool:
        if self._acked is None:
            return False
        events, lost = self.ring.after(self._acked)
        return bool(events) or lost is not None

    async def _publish_events(self, client: aiomqtt.Client) -> None:
        assert self._acked is not None
        events, lost = self.ring.after(self._acked)
        if lost is not None:
            self.gaps += 1
            log.warning("mqtt: events after %d-%d are no longer in this manager's ring "
                        "(broker away too long, or events.retained too small): publishing "
                        "a gap record", self._acked[0], self._acked[1])
            rec = gap_record(lost)
            await self._publish(client, self.topic("events", "gap"),
                                json.dumps(rec).encode(), kind="event")
            self._acked = lost
            events, _ = self.ring.after(self._acked)
        raft = self.ctx.raft
        for n, ev in enumerate(events):
            if n % 64 == 0 and (raft is None or not raft.is_leader()):
                return
            await self._publish(client, self.topic("events", ev.type),
                                json.dumps(ev.to_dict(), default=str).encode(), kind="event")
            self._acked = ev.key

    async def _write_cursor(self, client: aiomqtt.Client) -> None:
        key = self._acked
        if key is None:
            return
        ident = self.ctx.identity
        payload = json.dumps({"cursor": f"{key[0]}-{key[1]}", "node": self.ctx.node_id,
                              "cluster": ident.cluster_id if ident else "",
                              "time": time.time()}).encode()
        await self._publish(client, self.topic("bridge", "cursor"), payload, retain=True,
                            kind="cursor")
        self._cursor_written = key

    async def _publish_state(self, client: aiomqtt.Client) -> None:
        """Retained node and service state that changed since the last publish on this
        connection (all of it after a connect)."""
        raft = self.ctx.raft
        if raft is None:
            return
        snap = raft.snapshot()
        stamp = {"term": raft.term(), "index": snap.index}
        topics: dict[str, dict[str, Any] | None] = {}
        for nid, doc in node_states(snap, raft.leader_addr()).items():
            topics[self.topic("node", nid, "state")] = doc
        for name, doc in service_states(snap).items():
            topics[self.topic("service", name, "state")] = doc
        for topic in [t for t in self._published if t not in topics]:
            topics[topic] = None  # removed since: clear the retained message
        for topic, state in topics.items():
            body = "" if state is None else json.dumps(state, sort_keys=True)
            if self._published.get(topic) == body:
                continue
            payload = b"" if state is None else json.dumps({**state, **stamp}).encode()
            await self._publish(client, topic, payload, retain=True, kind="state")
            if state is None:
                self._published.pop(topic, None)
            else:
                self._published[topic] = body

    # ------------------------------------------------------------------ commands
    def _command_filter(self) -> str:
        return self.topic("cmd", "service", "+", "scale")

    async def _command(self, client: aiomqtt.Client, msg: aiomqtt.Message, key: bytes
                       ) -> None:
        """One scale command (the leader): checked, applied once, answered on
        ``cmd/result/REQUEST_ID``. Never raises for a bad command (counted, answered)."""
        service = str(msg.topic).split("/")[-2]
        try:
            doc = json.loads(msg.payload if isinstance(msg.payload, bytes | bytearray)
                             else b"")
        except ValueError:
            doc = None
        rid = doc.get("request_id") if isinstance(doc, dict) else None
        if not isinstance(rid, str) or not REQUEST_ID_RE.match(rid):
            self.command_results["invalid"] += 1  # nowhere to answer
            log.warning("mqtt: ignored a command on %s without a valid request_id",
                        msg.topic)
            return
        assert isinstance(doc, dict)
        replicas, mac, expires = doc.get("replicas"), doc.get("hmac"), doc.get("expires")
        result: dict[str, Any] = {"request_id": rid, "service": service}
        now = time.time()
        if not isinstance(replicas, int) or isinstance(replicas, bool) or \
                not isinstance(mac, str) or (expires is not None and (
                    not isinstance(expires, int) or isinstance(expires, bool))):
            field = "replicas" if not isinstance(replicas, int) or isinstance(replicas, bool) \
                else "hmac" if not isinstance(mac, str) else "expires"
            outcome, result["error"] = "invalid", {
                "code": "invalid", "field": field, "message": "a scale command is {replicas: "
                "int, request_id, hmac[, expires: Unix seconds]}"}
        elif not hmac.compare_digest(mac, sign_scale(key, service, replicas, rid, expires)):
            outcome, result["error"] = "refused", {
                "code": "unauthorized", "field": "hmac",
                "message": "the command's HMAC does not match the cluster's command key"}
            log.warning("mqtt: refused a scale command for %s (request %s): bad HMAC",
                        service, rid)
        elif expires is not None and not now <= expires <= now + MAX_EXPIRY:
            # (signed: a captured command cannot be replayed once it expired, however many
            # request ids later pushed its own out of the service's labels)
            outcome, result["error"] = "refused", {
                "code": "expired", "field": "expires", "message":
                f"the command expired or expires more than {MAX_EXPIRY} s ahead (this "
                "manager's clock: keep clocks in sync)"}
        else:
            outcome, extra = await self._scale_once(service, replicas, rid)
            result.update(extra)
        self.command_results[outcome] += 1
        result["ok"] = outcome in ("applied", "duplicate")
        result["duplicate"] = outcome == "duplicate"
        await self._publish(client, self.topic("cmd", "result", rid),
                            json.dumps(result).encode(), kind="command")

    async def _scale_once(self, service: str, replicas: int, rid: str
                          ) -> tuple[str, dict[str, Any]]:
        """Scale ``service`` unless ``rid`` was applied already. The request id goes into
        the service's labels in the same write (expected version: a concurrent change makes
        it retry), so a duplicate is recognised on any manager, after a leader change too."""
        raft = self.ctx.raft
        if raft is None or self._update_service is None:
            return "failed", {"error": {"code": "unavailable", "field": "",
                                        "message": "commands are not wired on this node"}}
        for _ in range(5):
            svc = raft.snapshot().service_by_name(service)
            if svc is None:
                return "failed", {"error": {"code": "not_found", "field": "service",
                                            "message": f"no service {service!r}"}}
            done = [r for r in svc.spec.labels.get(REQUESTS_LABEL, "").split(",") if r]
            if rid in done:
                return "duplicate", {"replicas": svc.spec.mode.replicas,
                                     "version": svc.version}
            spec = to_dict(svc.spec)
            spec["mode"]["replicas"] = replicas
            spec["labels"] = {**spec["labels"],
                              REQUESTS_LABEL: ",".join([*done, rid][-REQUESTS_KEPT:])}
            try:
                res = await self._update_service(svc.id, spec, svc.version)
            except ApiError as exc:
                if exc.code == "conflict":
                    continue  # changed meanwhile: look again
                return "failed", {"error": {"code": exc.code, "field": exc.field,
                                            "message": exc.message}}
            log.info("mqtt: scaled %s to %d (request %s)", service, replicas, rid)
            return "applied", {"replicas": replicas, "version": res.get("version")}
        return "failed", {"error": {"code": "conflict", "field": "version",
                                    "message": "the service kept changing; retry"}}

    async def _clear_stale(self, client: aiomqtt.Client, retained: dict[str, bytes]) -> None:
        """Retained node/service state on the broker for objects that no longer exist (a
        service removed while no bridge was connected): cleared with an empty message."""
        raft = self.ctx.raft
        if raft is None:
            return
        snap = raft.snapshot()
        live = {self.topic("node", nid, "state") for nid in snap.nodes}
        live |= {self.topic("service", s.spec.name, "state") for s in snap.services.values()}
        for topic, payload in retained.items():
            if topic.endswith("/state") and payload and topic not in live:
                await self._publish(client, topic, b"", retain=True, kind="state")


def _load_chain(context: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """``load_cert_chain`` from PEM in memory: through a 0600 file in a private temporary
    directory, removed at once (the ssl module reads certificates from files only)."""
    with tempfile.TemporaryDirectory(prefix="shoal-mqtt-") as d:
        path = Path(d) / "client.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(cert_pem.rstrip("\n") + "\n" + key_pem)
        context.load_cert_chain(str(path))


def _counter(name: str, doc: str, label: str, values: dict[str, int]) -> Metric:
    """A counter family with one sample per ``label`` value (sorted)."""
    fam = CounterMetricFamily(name, doc, labels=[label] if label else None)
    for value, n in sorted(values.items()):
        fam.add_metric([value] if label else [], n)
    return fam


class MqttCollector(Collector):
    """``shoal_mqtt_*`` for /metrics: of the bridge running now (``source()``; nothing while
    there is none). A bridge replaced after ``shoal mqtt set`` starts its counters at 0."""

    def __init__(self, source: MqttBridge | Callable[[], MqttBridge | None]) -> None:
        self.source = source if callable(source) else (lambda: source)

    def collect(self) -> Iterator[Metric]:
        b = self.source()
        if b is None:
            return
        yield GaugeMetricFamily("shoal_mqtt_connected", "1 while the MQTT bridge is connected",
                                value=1.0 if b.connected else 0.0)
        yield _counter("shoal_mqtt_connects", "Successful MQTT connects", "",
                       {"": b.connects})
        yield _counter("shoal_mqtt_connect_failures", "Failed or lost MQTT connections, by "
                       "reason", "reason", b.failures)
        yield _counter("shoal_mqtt_published", "Messages the broker acknowledged, by kind",
                       "kind", b.published)
        yield _counter("shoal_mqtt_event_gaps", "Times events were dropped: the event ring "
                       "rolled past the bridge's cursor while the broker was away", "",
                       {"": b.gaps})
        yield _counter("shoal_mqtt_commands", "Commands received over MQTT, by outcome",
                       "outcome", b.command_results)
        pending = 0
        if b._acked is not None:
            pending = len(b.ring.after(b._acked)[0])
        yield GaugeMetricFamily("shoal_mqtt_events_pending", "Events in the ring not yet "
                                "acknowledged by the broker (the bounded buffer)",
                                value=pending)


__all__ = ["BridgeContext", "Identity", "MqttBridge", "MqttCollector", "UpdateService",
           "node_states", "parse_cursor", "service_states"]
