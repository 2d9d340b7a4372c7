"""The cluster's event stream: every state change as an event, derived from the applied log.

Owns: ``derive`` — the pure function (state before, command, state after, index) → events —
``EventLog``, the bounded ring a manager fills from its replica as it applies commands, and
the reading side of ``GET /v1/events`` (cursors, ``since``/``until``, filters, gaps).
Must not touch: the state machine (it only reads snapshots), the network, the runtime.

Why from the log: every manager applies the same commands in the same order, so every
manager derives the same events with the same cursors; a client may reconnect to any
manager with its last cursor. The cursor is ``INDEX-SEQ``: the state machine's applied
index (``ClusterState.index``, equal on every replica; it counts shoal's commands, not
pysyncobj's internal no-op and membership entries) and the event's position among the
events of that command. An event's ``time`` is the ``now`` the proposer put in the command,
so it is the same on every manager too.

Only managers keep events (workers' state feeds apply batches of commands, not one command
at a time, and workers serve no cluster-wide reads): ``GET /v1/events`` on a worker is
refused with ``not_manager`` like ``service ls``.

Local events: gossip suspicions (suspect / alive-again / dead / left as this node's SWIM
member list sees them) are not in the log. They carry ``"local": true``, are numbered after
the log events of the index current when they happened, and differ between managers; a
client that reconnects to another manager neither gets nor misses the first one's.

Gaps: the ring holds ``EventsConfig.retained`` events. A cursor older than the oldest
retained event — or than the moment this manager started deriving (after a restart, or a
Raft snapshot install, which replaces the state without its commands) — cannot be served
without loss: the stream then starts with one ``{"type": "gap", ...}`` record naming the
oldest cursor it can serve, and continues from there.

Errors: ``BadRequest`` (shoal.node.errors) for a malformed cursor, time or filter.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime as dt
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from shoal.node.errors import BadRequest
from shoal.raft.models import Node, Service, Task, TaskState
from shoal.raft.state import Snapshot

log = logging.getLogger("shoal.events")

TYPES = ("service", "task", "node", "secret", "config")
FILTER_KEYS = ("type", "service", "node", "event")
CURSOR_RE = re.compile(r"^([0-9]+)-([0-9]+)$")
# a seq above every real one (a command yields at most a few events per op, and a leader
# batch has at most 5,000 ops): "after every event of this index"
_TOP = 999_999

Key = tuple[int, int]


@dataclass
class EventsConfig:
    """How many events a manager keeps and how it streams them."""

    # Events kept in memory (the ring; the oldest go first). A client that reconnects with
    # a cursor older than the oldest kept event is told about the gap.
    # Each event is ~300 bytes: 10,000 ≈ 3 MB. 0 keeps none (only live streaming).
    retained: int = 10_000
    # Server-sent events: a comment line every this many seconds while idle, so proxies
    # and browsers keep the connection open. NDJSON streams send nothing while idle.
    keepalive: float = 15.0

    def validate(self) -> None:
        if self.retained < 0:
            raise ValueError("events retained must be >= 0")
        if self.keepalive <= 0:
            raise ValueError("events keepalive must be > 0")


@dataclass(frozen=True)
class Event:
    """One change. ``type``/``action``/``id``/``name`` say what; ``attributes`` the rest."""

    index: int  # applied index of the command it comes from
    seq: int  # position among the events of that index
    time: float  # the command's ``now`` (Unix seconds), the same on every manager
    type: str  # service | task | node | secret | config
    action: str
    id: str
    name: str = ""
    attributes: Mapping[str, Any] = field(default_factory=dict)
    local: bool = False  # not from the log (gossip): this manager's own observation

    @property
    def key(self) -> Key:
        return (self.index, self.seq)

    @property
    def cursor(self) -> str:
        return f"{self.index}-{self.seq}"

    def to_dict(self) -> dict[str, Any]:
        out = {"cursor": self.cursor, "index": self.index, "time": self.time,
               "type": self.type, "action": self.action, "id": self.id, "name": self.name,
               "attributes": dict(self.attributes)}
        if self.local:
            out["local"] = True
        return out


# --------------------------------------------------------------------------- derivation

_E = tuple[str, str, str, str, dict[str, Any]]  # type, action, id, name, attributes


def _node_attrs(n: Node) -> dict[str, Any]:
    return {"hostname": n.hostname, "addr": n.addr, "role": str(n.role),
            "state": str(n.state), "availability": str(n.availability)}


_DESCRIPTION = ("arch", "memory_bytes", "cpus")  # a node's own description (its agent's)


def _node_events(before: Snapshot, after: Snapshot, cmd: Mapping[str, Any]) -> list[_E]:
    out: list[_E] = []
    for nid in sorted(after.nodes.keys() | before.nodes.keys()):
        b, a = before.nodes.get(nid), after.nodes.get(nid)
        if a is b:
            continue
        if a is None:
            assert b is not None
            action = "leave" if cmd.get("leave") else "remove"
            out.append(("node", action, nid, b.hostname, _node_attrs(b)))
            continue
        attrs = _node_attrs(a)
        if b is None or (b.state != a.state and a.state.value == "ready"
                         and cmd.get("op") == "node_add"):
            out.append(("node", "join", nid, a.hostname, attrs))
            continue
        if b.state != a.state:
            out.append(("node", str(a.state), nid, a.hostname,
                        {**attrs, "message": a.message, "previous": str(b.state)}))
        if b.availability != a.availability:
            out.append(("node", "availability", nid, a.hostname,
                        {**attrs, "previous": str(b.availability)}))
        if b.role != a.role:
            out.append(("node", "role", nid, a.hostname, {**attrs, "previous": str(b.role)}))
        changed: dict[str, Any] = {"labels": dict(a.labels)} if b.labels != a.labels else {}
        if b.generic_resources != a.generic_resources:
            changed["generic_resources"] = dict(a.generic_resources)
        # (its description, refreshed by its agent: node_describe)
        changed.update({k: getattr(a, k) for k in _DESCRIPTION
                        if getattr(b, k) != getattr(a, k)})
        if changed:
            out.append(("node", "update", nid, a.hostname, {**attrs, **changed}))
    return out


def _service_attrs(s: Service) -> dict[str, Any]:
    return {"version": s.version, "replicas": s.spec.mode.replicas,
            "image": s.spec.task.container.image}


def _service_events(before: Snapshot, after: Snapshot) -> list[_E]:
    out: list[_E] = []
    for sid in sorted(after.services.keys() | before.services.keys()):
        b, a = before.services.get(sid), after.services.get(sid)
        if a is b:
            continue
        if a is None:
            assert b is not None
            out.append(("service", "remove", sid, b.spec.name, _service_attrs(b)))
            continue
        if b is None:
            out.append(("service", "create", sid, a.spec.name, _service_attrs(a)))
            continue
        if b.spec != a.spec:
            out.append(("service", "update", sid, a.spec.name,
                        {**_service_attrs(a), "previous_version": b.version,
                         "rollback": a.update_status.rollback
                         and a.update_status != b.update_status}))
        if b.update_status.state != a.update_status.state:
            out.append(("service", "update-state", sid, a.spec.name,
                        {**_service_attrs(a), "state": a.update_status.state,
                         "previous": b.update_status.state,
                         "message": a.update_status.message}))
        if a.autoscale.decisions != b.autoscale.decisions and a.autoscale.decisions:
            d = a.autoscale.decisions[-1]  # (shoal.node.autoscale: a replica change)
            out.append(("service", "autoscale", sid, a.spec.name,
                        {**_service_attrs(a), "current": d.current, "desired": d.desired,
                         "usage": d.usage, "target": d.target, "metric": d.metric,
                         "tasks": d.tasks, "reason": d.reason}))
        was = {r.scheduled_at: r.state for r in b.job_status.runs}
        for r in a.job_status.runs:  # a scheduled job's run started, skipped or ended
            if was.get(r.scheduled_at) != r.state:
                out.append(("service", f"job-{r.state}", sid, a.spec.name,
                            {**_service_attrs(a), "scheduled_at": r.scheduled_at,
                             "completed": r.completed, "failed": r.failed,
                             "message": r.message}))
    return out


# commands that never touch a task (an op not listed here, or node_remove/service_remove,
# makes the derivation compare every task)
_NO_TASKS = frozenset({"cluster_init", "cluster_schema", "rotate_secret", "node_add",
                       "node_update", "node_describe", "service_create", "service_update",
                       "ca_init", "secret_create", "secret_remove", "config_create",
                       "config_remove", "client_cert_add", "client_cert_remove",
                       "read_barrier"})
_TASK_OPS = frozenset({"spawn", "desired", "assign", "unschedulable", "orphan", "delete"})


def _touched_tasks(cmd: Mapping[str, Any]) -> set[str] | None:
    """The task ids ``cmd`` can change, or None when it may change any (then all are
    compared). Keeps the derivation O(changes), not O(tasks), for the common commands."""
    op = cmd.get("op")
    if op in _NO_TASKS:
        return set()
    if op == "task_status":
        return {str(cmd.get("task_id"))}
    if op == "task_statuses":
        reports = cmd.get("reports")
        if not isinstance(reports, (list, tuple)):
            return set()  # refused whole: changes nothing
        return {str(r[0]) for r in reports if isinstance(r, (list, tuple)) and r}
    if op == "leader":
        ids: set[str] = set()
        for o in cmd.get("ops") or ():
            if not isinstance(o, (list, tuple)) or not o:
                return None
            if o[0] == "create" and isinstance(o[1], Mapping):
                ids.add(str(o[1].get("id")))
            elif o[0] in _TASK_OPS:  # (spawn included: its task id is o[1] too)
                ids.add(str(o[1]))
            elif o[0] not in ("update_status", "node_state", "job_run", "job_run_status",
                              "autoscale"):
                return None
        return ids
    return None


def _changed(before: Mapping[str, Any], after: Mapping[str, Any], among: set[str] | None
             ) -> tuple[list[str], list[str]]:
    """Ids (of ``among``, or all) whose record was replaced or removed, and new ids, each
    sorted. Records are frozen and replaced on change, so an identity test finds them."""
    keys: Iterable[str] = (after.keys() | before.keys()) if among is None else among
    changed: list[str] = []
    new: list[str] = []
    for k in keys:
        b, a = before.get(k), after.get(k)
        if a is b:
            continue
        (new if b is None else changed).append(k)
    return sorted(changed), sorted(new)


def _task_attrs(t: Task, nodes: Mapping[str, Node]) -> dict[str, Any]:
    node = nodes.get(t.node_id)
    attrs: dict[str, Any] = {
        "service": t.service_name, "service_id": t.service_id, "slot": t.slot,
        "node": t.node_id, "node_name": node.hostname if node else "",
        "state": t.status.state.lower(), "desired_state": t.desired_state.lower(),
        "message": t.status.message}
    if t.status.err:
        attrs["error"] = t.status.err
    if t.status.exit_code is not None:
        attrs["exit_code"] = t.status.exit_code
    return attrs


def _task_events(before: Snapshot, after: Snapshot, cmd: Mapping[str, Any]) -> list[_E]:
    out: list[_E] = []
    changed, new = _changed(before.tasks, after.tasks, _touched_tasks(cmd))
    # tasks that existed first (ended, orphaned, …), then new ones (their replacements)
    for tid in [*changed, *new]:
        b, a = before.tasks.get(tid), after.tasks.get(tid)
        if a is None:
            assert b is not None
            out.append(("task", "remove", tid, b.name, _task_attrs(b, before.nodes)))
            continue
        attrs = _task_attrs(a, after.nodes)
        if b is None:
            out.append(("task", "create", tid, a.name, attrs))
        if b is None and a.status.state <= TaskState.NEW:
            continue
        if b is None or b.status.state != a.status.state:
            if a.status.state == TaskState.RUNNING and a.created_at and a.status.timestamp:
                # created → running, both on the cluster's clocks (metrics: start latency)
                attrs = {**attrs, "start_seconds":
                         round(max(0.0, a.status.timestamp - a.created_at), 6)}
            out.append(("task", a.status.state.lower(), tid, a.name, attrs))
        elif b.status.message != a.status.message and a.status.state == TaskState.PENDING:
            out.append(("task", "pending", tid, a.name, attrs))  # a new scheduling reason
        if b is not None and b.desired_state != a.desired_state:
            out.append(("task", "desired", tid, a.name, attrs))
    return out


def _object_events(before: Snapshot, after: Snapshot) -> list[_E]:
    out: list[_E] = []
    for kind, b_objs, a_objs in (("secret", before.secrets, after.secrets),
                                 ("config", before.configs, after.configs)):
        for oid in sorted(a_objs.keys() | b_objs.keys()):
            b, a = b_objs.get(oid), a_objs.get(oid)
            if a is b:
                continue
            obj = a or b
            assert obj is not None
            action = "create" if b is None else "remove" if a is None else "update"
            out.append((kind, action, oid, obj.name, {"labels": dict(obj.labels)}))
    return out


def _leader_events(before: Snapshot, cmd: Mapping[str, Any], after: Snapshot) -> list[_E]:
    if cmd.get("op") != "leader" or after.fence_term <= before.fence_term:
        return []
    by = cmd.get("by")
    node = next((n for n in after.nodes.values() if n.raft_addr == by), None) \
        if isinstance(by, str) else None
    return [("node", "leader", node.id if node else "", node.hostname if node else "",
             {"term": after.fence_term, "previous_term": before.fence_term,
              "raft_addr": by if isinstance(by, str) else ""})]


def derive(before: Snapshot, cmd: Mapping[str, Any], after: Snapshot, index: int
           ) -> list[Event]:
    """The events of one applied command, in a fixed order: leader change, nodes, services,
    tasks (those that existed before first, then new ones), secrets and configs; within
    each, by id. Pure: the same inputs give the same
    events on every manager. A refused command changes nothing and gives none."""
    now = cmd.get("now")
    when = float(now) if isinstance(now, (int, float)) else 0.0
    found = [*_leader_events(before, cmd, after), *_node_events(before, after, cmd),
             *_service_events(before, after), *_task_events(before, after, cmd),
             *_object_events(before, after)]
    return [Event(index=index, seq=i, time=when, type=t, action=action, id=oid, name=name,
                  attributes=attrs)
            for i, (t, action, oid, name, attrs) in enumerate(found)]


# --------------------------------------------------------------------------- queries

@dataclass(frozen=True)
class Bound:
    """A ``since``/``until`` value: a cursor or a Unix time."""

    key: Key | None = None
    time: float | None = None


def parse_bound(value: str, name: str, now: float | None = None) -> Bound:
    """``INDEX-SEQ`` (a cursor), Unix seconds, an ISO 8601 time, or a duration before now
    (``10m``, ``30s``, ``2h``, ``1d``)."""
    v = value.strip()
    m = CURSOR_RE.match(v)
    if m:
        return Bound(key=(int(m.group(1)), int(m.group(2))))
    with contextlib.suppress(ValueError):
        return Bound(time=float(v))
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(s|m|h|d)", v)
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return Bound(time=(time.time() if now is None else now) - float(m.group(1)) * unit)
    try:
        parsed = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{name} must be a cursor (INDEX-SEQ), a Unix time, an ISO 8601 "
                         f"time or a duration such as 10m; got {value!r}", name) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return Bound(time=parsed.timestamp())


def parse_filters(values: Iterable[str]) -> dict[str, set[str]]:
    """``KEY=VALUE`` strings → key → accepted values (docker's rule: the values of one key
    are alternatives, different keys must all match)."""
    out: dict[str, set[str]] = {}
    for item in values:
        k, sep, v = item.partition("=")
        k = k.strip()
        if not sep or k not in FILTER_KEYS or not v:
            raise BadRequest(f"filter must be KEY=VALUE with KEY one of "
                             f"{', '.join(FILTER_KEYS)}; got {item!r}", "filter")
        if k == "type" and v not in TYPES:
            raise BadRequest(f"type must be one of {', '.join(TYPES)}; got {v!r}", "filter")
        out.setdefault(k, set()).add(v)
    return out


def matches(ev: Event, filters: Mapping[str, set[str]]) -> bool:
    attrs = ev.attributes
    for k, wanted in filters.items():
        if k == "type":
            ok = ev.type in wanted
        elif k == "event":
            ok = ev.action in wanted
        elif k == "service":  # (a service's name whatever its case: its lookups' rule)
            names = {w.lower() for w in wanted}
            ok = (ev.type == "service" and (ev.id in wanted or ev.name.lower() in names)) or (
                ev.type == "task" and (str(attrs.get("service", "")).lower() in names
                                       or attrs.get("service_id") in wanted))
        else:  # node
            ok = (ev.type == "node" and (ev.id in wanted or ev.name in wanted)) or (
                ev.type == "task" and (attrs.get("node") in wanted
                                       or attrs.get("node_name") in wanted))
        if not ok:
            return False
    return True


# --------------------------------------------------------------------------- the ring

class EventSource(Protocol):
    """What the log needs of a manager's replica (shoal.node.source.ManagerSource has it)."""

    def snapshot(self) -> Snapshot: ...

    def command_at(self, index: int) -> Any: ...

    def add_listener(self, cb: Callable[[int], None]) -> None: ...


class EventLog:
    """A manager's retained events, filled as its replica applies commands.

    ``attach(source)`` follows a replica (again after a role switch); its listener runs on
    the thread that applies (pysyncobj's tick thread for the RaftStore): it derives the
    command's events from the previous and the current snapshot and appends them under a
    lock; streams on the event loop are woken with ``call_soon_threadsafe``. ``on_event``
    callbacks (metrics) run on that thread too and must be quick and thread-safe.
    """

    def __init__(self, config: EventsConfig | None = None) -> None:
        self.config = config or EventsConfig()
        self.config.validate()
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._keys: list[Key] = []
        # every event after this key is still here (older ones were dropped or never seen)
        self._floor: Key = (0, -1)
        self._prev: Snapshot | None = None
        self._source: EventSource | None = None
        self._last_index = 0
        self._next_local_seq: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()
        self.on_event: list[Callable[[Event], None]] = []
        self.derived = 0  # events derived since start (metrics)
        self.gaps = 0  # times the log lost continuity (snapshot install, restart)

    # ------------------------------------------------------------------ filling
    def attach(self, source: EventSource | None) -> None:
        """Follow ``source`` (None: stop). Called on the event loop."""
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        with self._lock:
            self._source = source
            self._prev = None
        if source is not None:
            source.add_listener(lambda index: self._on_applied(source, index))
            with self._lock:
                if self._prev is None and self._source is source:
                    self._baseline(source.snapshot())

    def _baseline(self, snap: Snapshot) -> None:
        """Start deriving from ``snap`` (under the lock): what came before is unknown here."""
        if self._prev is not None or self._events:
            self.gaps += 1
        self._prev = snap
        self._last_index = snap.index
        if snap.index > 0:  # (a new cluster's first manager starts at 0: nothing before)
            self._floor = max(self._floor, (snap.index, _TOP))

    def _on_applied(self, source: EventSource, index: int) -> None:
        with self._lock:
            if source is not self._source:
                return  # a replica this node no longer uses
            prev = self._prev
            if prev is None or index != prev.index + 1:
                self._baseline(source.snapshot())
                return
            cmd = source.command_at(index)
            after = source.snapshot()
            if cmd is None or after.index != index:
                self._baseline(after)
                return
            try:
                events = derive(prev, cmd, after, index) if isinstance(cmd, dict) else []
            except Exception:  # a bug here must not break the apply thread
                log.exception("deriving the events of command %d failed", index)
                events = []
            self._prev = after
            self._last_index = index
            for ev in events:
                self._append(ev)
        self._announce(events)

    def add_local(self, type_: str, action: str, id_: str, name: str,
                  attributes: Mapping[str, Any], when: float | None = None) -> Event:
        """An event this manager observed itself (gossip), not from the log."""
        with self._lock:
            index = self._last_index
            seq = self._next_local_seq.get(index, 0)
            if self._events and self._events[-1].index == index:
                seq = max(seq, self._events[-1].seq + 1)
            self._next_local_seq = {index: seq + 1}
            ev = Event(index=index, seq=seq, time=time.time() if when is None else when,
                       type=type_, action=action, id=id_, name=name,
                       attributes=dict(attributes), local=True)
            self._append(ev)
        self._announce([ev])
        return ev

    def _append(self, ev: Event) -> None:
        self._events.append(ev)
        self._keys.append(ev.key)
        self.derived += 1
        excess = len(self._events) - self.config.retained
        if excess > 0:
            self._floor = max(self._floor, self._keys[excess - 1])
            del self._events[:excess]
            del self._keys[:excess]

    def _announce(self, events: list[Event]) -> None:
        for ev in events:
            for cb in self.on_event:
                try:
                    cb(ev)
                except Exception:
                    log.exception("event callback failed")
        loop = self._loop
        if events and loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # ------------------------------------------------------------------ reading
    @property
    def last_cursor(self) -> str:
        with self._lock:
            if self._events:
                return self._events[-1].cursor
            return f"{self._last_index}-0"

    def after(self, key: Key) -> tuple[list[Event], Key | None]:
        """The retained events after ``key``, and the floor if some after it are lost."""
        with self._lock:
            start = bisect.bisect_right(self._keys, key)
            # (the initial floor, nothing dropped and derived from index 0: no gap)
            lost = self._floor if key < self._floor and self._floor != (0, -1) else None
            return self._events[start:], lost

    def __len__(self) -> int:
        return len(self._events)

    def retained(self) -> list[Event]:
        return self.after((-1, -1))[0]

    async def stream(self, since: Bound | None, until: Bound | None,
                     filters: Mapping[str, set[str]], follow: bool = True
                     ) -> AsyncIterator[dict[str, Any]]:
        """Records (event dicts, perhaps one ``gap`` first) from ``since`` (None: only new
        ones) up to ``until`` (None: forever). ``follow`` False ends at the present."""
        if since is None:
            with self._lock:
                pos: Key = self._keys[-1] if self._keys else (self._last_index, _TOP)
        elif since.key is not None:
            pos = since.key
        else:
            pos = (-1, -1)
        first = True
        while True:
            changed = self._changed
            events, lost = self.after(pos)
            if first and lost is not None and since is not None and (
                    since.time is None or not events or events[0].time > since.time):
                yield gap_record(lost)
            first = False
            for ev in events:
                pos = ev.key
                if until is not None and (
                        (until.key is not None and ev.key > until.key)
                        or (until.time is not None and ev.time > until.time)):
                    return
                if since is not None and since.time is not None and ev.time < since.time:
                    continue
                if matches(ev, filters):
                    yield ev.to_dict()
            if not follow:
                return
            if until is not None and until.time is not None and time.time() >= until.time:
                return
            if until is not None and until.key is not None and pos >= until.key:
                return
            wait = None if until is None or until.time is None else \
                max(0.0, until.time - time.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await changed.wait()


def gap_record(floor: Key) -> dict[str, Any]:
    """The record a stream starts with when events after the asked point are lost: its
    cursor is the point it resumes after (reconnecting with it does not repeat the gap)."""
    cursor = f"{floor[0]}-{floor[1]}"
    return {"cursor": cursor, "index": floor[0], "time": time.time(), "type": "gap",
            "action": "gap", "id": "", "name": "",
            "attributes": {"message": "older events are no longer retained on this manager "
                           f"(events.retained, or it started deriving at index {floor[0]}); "
                           f"the stream resumes after {cursor}"}}


__all__ = ["Bound", "Event", "EventLog", "EventsConfig", "derive", "gap_record", "matches",
           "parse_bound", "parse_filters"]
