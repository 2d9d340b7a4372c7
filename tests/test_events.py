"""The event stream without a network: derivation from the applied log, the ring, cursors,
gaps, filters and the streaming generator (node/events.py), on the in-memory store that
applies the same ClusterState state machine as the Raft store.

Each test names the property it checks.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from shoal.node.errors import BadRequest
from shoal.node.events import (
    Bound,
    EventLog,
    EventsConfig,
    derive,
    matches,
    parse_bound,
    parse_filters,
)
from shoal.node.leader import plan_pass
from shoal.node.orchestrator import OrchestratorConfig
from shoal.node.source import MemoryStore
from shoal.raft.models import Node, NodeRole, TaskState, to_dict
from shoal.raft.schema import SCHEMA
from shoal.raft.state import ClusterState

ADDR = "10.0.0.1"


def node(nid: str, host: str, last: int) -> dict[str, Any]:
    return to_dict(Node(id=nid, hostname=host, addr=f"10.0.0.{last}", api_port=2377,
                        raft_port=2378, role=NodeRole.MANAGER if last == 1 else NodeRole.WORKER,
                        memory_bytes=1 << 33, cpus=4.0))


def spec(name: str = "web", replicas: int = 1, image: str = "") -> dict[str, Any]:
    return {"name": name, "mode": {"replicas": replicas},
            "task": {"container": {"command": ["sleep", "100"], "image": image}}}


BOOT: list[dict[str, Any]] = [
    {"op": "cluster_init", "cluster_id": "c1", "now": 1.0, "worker_secret": "",
     "manager_secret": "", "digest": "", "schema": SCHEMA},
    {"op": "node_add", "now": 2.0, "node": node("n1", "h1", 1)},
    {"op": "node_add", "now": 3.0, "node": node("n2", "h2", 2)},
]


class Log:
    """A ClusterState and the events each applied command yields, straight from ``derive``."""

    def __init__(self) -> None:
        self.state = ClusterState()
        self.events: list[tuple[str, str, str]] = []
        self.all: list[Any] = []

    def apply(self, cmd: dict[str, Any]) -> list[Any]:
        before = self.state.snapshot()
        result = self.state.apply(cmd)
        evs = derive(before, cmd, self.state.snapshot(), self.state.index)
        self.all += evs
        self.events += [(e.type, e.action, e.name) for e in evs]
        self.result = result
        return evs

    def leader_pass(self, term: int = 1, now: float = 10.0,
                    gossip: dict[str, str] | None = None) -> list[Any]:
        ops, _ = plan_pass(self.state.snapshot(), {}, 0.0, now, OrchestratorConfig(),
                           liveness=gossip is not None, gossip=gossip)
        return self.apply({"op": "leader", "term": term, "now": now, "ops": ops,
                           "by": f"{ADDR}:2378"})

    def task(self, name: str) -> Any:
        return next(t for t in self.state.tasks.values() if t.name == name
                    and t.status.state < TaskState.COMPLETE)


def booted() -> Log:
    log = Log()
    for cmd in BOOT:
        log.apply(cmd)
    return log


def test_joins_then_a_service_create_assignment_and_running_report_give_ordered_events(
) -> None:
    log = booted()
    assert log.events == [("node", "join", "h1"), ("node", "join", "h2")]
    log.events.clear()
    log.apply({"op": "service_create", "id": "s1", "now": 5.0, "spec": spec()})
    evs = log.leader_pass()
    t = log.task("web.1")
    log.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id, "now": 11.5,
               "status": {"state": int(TaskState.RUNNING), "timestamp": 11.5, "pid": 7}})
    assert log.events == [
        ("service", "create", "web"),
        ("node", "leader", "h1"),
        ("task", "create", "web.1"), ("task", "assigned", "web.1"),
        ("task", "running", "web.1")]
    leader = evs[0]
    assert leader.attributes["term"] == 1 and leader.id == "n1"
    running = log.all[-1]
    assert running.attributes["service"] == "web"
    assert running.attributes["node_name"] in ("h1", "h2")
    assert running.attributes["start_seconds"] == pytest.approx(1.5)  # created at 10.0
    assert running.time == 11.5 and running.index == log.state.index
    assert [e.seq for e in evs] == [0, 1, 2]


def test_a_node_death_gives_node_down_then_orphaned_then_the_replacement() -> None:
    log = booted()
    log.apply({"op": "service_create", "id": "s1", "now": 5.0, "spec": spec()})
    log.leader_pass()
    t = log.task("web.1")
    other = "n2" if t.node_id == "n1" else "n1"
    log.events.clear()
    log.leader_pass(now=20.0, gossip={t.node_id: "dead", other: "alive"})
    assert log.events[0] == ("node", "down", log.state.nodes[t.node_id].hostname)
    actions = [(typ, act) for typ, act, _ in log.events[1:]]
    assert ("task", "orphaned") in actions and ("task", "assigned") in actions
    assert actions.index(("task", "orphaned")) < actions.index(("task", "create")) < \
        actions.index(("task", "assigned"))
    new = log.task("web.1")
    assert new.id != t.id and new.node_id == other
    down = log.all[-len(log.events)]
    assert down.attributes["previous"] == "ready"


def test_the_same_term_gives_no_second_leader_event_a_new_term_does() -> None:
    log = booted()
    log.events.clear()
    log.leader_pass(term=3)
    log.leader_pass(term=3)
    log.leader_pass(term=4)
    assert [a for _, a, _ in log.events] == ["leader", "leader"]
    assert log.all[-1].attributes == {"term": 4, "previous_term": 3,
                                      "raft_addr": f"{ADDR}:2378"}


def test_service_update_scale_update_state_and_remove() -> None:
    log = booted()
    log.apply({"op": "service_create", "id": "s1", "now": 5.0, "spec": spec()})
    log.leader_pass()
    log.events.clear()
    log.apply({"op": "service_update", "id": "s1", "now": 6.0, "replicas": 3})
    assert log.events == [("service", "update", "web")]
    assert log.all[-1].attributes["replicas"] == 3
    log.events.clear()
    log.apply({"op": "service_update", "id": "s1", "now": 7.0,
               "spec": spec(replicas=3, image="busybox")})
    assert log.events == [("service", "update", "web"), ("service", "update-state", "web")]
    assert log.all[-1].attributes["state"] == "updating"
    log.events.clear()
    log.apply({"op": "service_remove", "id": "s1", "now": 8.0})
    assert log.events[0] == ("service", "remove", "web")
    assert {a for t, a, _ in log.events[1:]} == {"desired"}


def test_node_availability_role_labels_leave_and_remove() -> None:
    log = booted()
    log.events.clear()
    first = len(log.all)
    log.apply({"op": "node_update", "id": "n2", "now": 5.0, "availability": "drain"})
    log.apply({"op": "node_update", "id": "n2", "now": 5.0, "role": "manager"})
    log.apply({"op": "node_update", "id": "n2", "now": 5.0, "labels": {"zone": "a"}})
    log.apply({"op": "node_remove", "id": "n2", "now": 6.0, "force": True, "leave": True})
    log.apply({"op": "node_add", "now": 7.0, "node": node("n3", "h3", 3)})
    log.apply({"op": "node_remove", "id": "n3", "now": 8.0, "force": True})
    assert log.events == [("node", "availability", "h2"), ("node", "role", "h2"),
                          ("node", "update", "h2"), ("node", "leave", "h2"),
                          ("node", "join", "h3"), ("node", "remove", "h3")]
    assert log.all[first].attributes["previous"] == "active"
    assert log.all[first].attributes["availability"] == "drain"


def test_a_node_generic_resources_change_is_a_node_update_event() -> None:
    log = booted()
    log.events.clear()
    log.apply({"op": "node_update", "id": "n2", "now": 5.0,
               "generic_resources": {"GPU": ["a", "b"]}})
    assert log.events == [("node", "update", "h2")]
    assert log.all[-1].attributes["generic_resources"] == {"GPU": ["a", "b"]}
    assert "labels" not in log.all[-1].attributes


def test_secrets_and_configs_create_and_remove() -> None:
    log = booted()
    log.events.clear()
    first = len(log.all)
    log.apply({"op": "secret_create", "id": "x1", "name": "pw", "data": b"sealed",
               "now": 5.0})
    log.apply({"op": "config_create", "id": "x2", "name": "cfg", "data": b"a=1", "now": 5.0,
               "labels": {"k": "v"}})
    log.apply({"op": "secret_remove", "id": "x1", "now": 6.0})
    log.apply({"op": "config_remove", "id": "x2", "now": 6.0})
    assert log.events == [("secret", "create", "pw"), ("config", "create", "cfg"),
                          ("secret", "remove", "pw"), ("config", "remove", "cfg")]
    assert log.all[first + 1].attributes == {"labels": {"k": "v"}}


def test_a_refused_command_yields_no_event() -> None:
    log = booted()
    log.events.clear()
    log.apply({"op": "service_create", "id": "s1", "now": 5.0, "spec": spec()})
    evs = log.apply({"op": "service_create", "id": "s2", "now": 5.0, "spec": spec()})
    assert "error" in log.result and evs == []
    assert log.apply({"op": "leader", "term": 0, "now": 1.0, "ops": []}) == []  # stale term


def test_a_failed_task_carries_its_error_and_exit_code() -> None:
    log = booted()
    log.apply({"op": "service_create", "id": "s1", "now": 5.0, "spec": spec()})
    log.leader_pass()
    t = log.task("web.1")
    evs = log.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id, "now": 12.0,
                     "status": {"state": int(TaskState.FAILED), "timestamp": 12.0,
                                "exit_code": 3, "err": "exit status 3",
                                "message": "exited"}})
    assert [(e.action, e.attributes["exit_code"], e.attributes["error"]) for e in evs] == \
        [("failed", 3, "exit status 3")]


def test_two_replicas_applying_the_same_log_derive_identical_events() -> None:
    """Every manager produces the same stream: the same log on two state machines gives the
    same events, cursors and times (dict order of the state does not matter)."""
    a, b = booted(), booted()
    for log in (a, b):
        log.apply({"op": "service_create", "id": "s1", "now": 5.0, "spec": spec(replicas=4)})
    ops, _ = plan_pass(a.state.snapshot(), {}, 0.0, 10.0, OrchestratorConfig(),
                       liveness=False)
    cmd = {"op": "leader", "term": 1, "now": 10.0, "ops": ops, "by": f"{ADDR}:2378"}
    b.state.tasks = dict(reversed(list(b.state.tasks.items())))
    assert [e.to_dict() for e in a.apply(cmd)] == [e.to_dict() for e in b.apply(cmd)]


# --------------------------------------------------------------------------- the ring

async def boot_store(store: MemoryStore) -> None:
    for cmd in BOOT:
        await store.propose(cmd)


async def test_the_log_fills_from_the_store_and_a_cursor_resumes_without_loss() -> None:
    store = MemoryStore(self_addr=f"{ADDR}:2378")
    events = EventLog()
    events.attach(store)
    await boot_store(store)
    for i in range(5):
        await store.propose({"op": "secret_create", "id": f"x{i}", "name": f"s{i}",
                             "data": b"v", "now": 10.0 + i})
    got = [e.to_dict() for e in events.retained()]
    assert [(e["type"], e["action"]) for e in got][:2] == [("node", "join")] * 2
    cursor = got[3]["cursor"]
    rest, lost = events.after(Bound(key=(got[3]["index"], 0)).key or (0, 0))
    assert lost is None
    assert [e.cursor for e in rest] == [g["cursor"] for g in got[4:]]
    stream = events.stream(parse_bound(cursor, "since"), None, {}, follow=False)
    assert [r["cursor"] async for r in stream] == [g["cursor"] for g in got[4:]]
    # `--since 0` on a log that lost nothing: everything, and no gap record ("the stream
    # resumes after 0--1" it said)
    everything = [r async for r in events.stream(parse_bound("0", "since"), None, {},
                                                 follow=False)]
    assert [r["cursor"] for r in everything] == [g["cursor"] for g in got]


async def test_a_cursor_older_than_the_retained_window_is_told_about_the_gap() -> None:
    store = MemoryStore(self_addr=f"{ADDR}:2378")
    events = EventLog(EventsConfig(retained=3))
    events.attach(store)
    await boot_store(store)
    for i in range(5):
        await store.propose({"op": "secret_create", "id": f"x{i}", "name": f"s{i}",
                             "data": b"v", "now": 10.0 + i})
    kept = events.retained()
    assert [e.name for e in kept] == ["s2", "s3", "s4"]
    recs = [r async for r in events.stream(Bound(key=(1, 0)), None, {}, follow=False)]
    assert recs[0]["type"] == "gap"
    assert "no longer retained" in recs[0]["attributes"]["message"]
    assert [r["name"] for r in recs[1:]] == ["s2", "s3", "s4"]
    # resuming from the gap record's cursor does not report the gap again
    again = [r async for r in events.stream(Bound(key=parse_bound(
        recs[0]["cursor"], "since").key), None, {}, follow=False)]
    assert [r["name"] for r in again] == ["s2", "s3", "s4"]
    # a cursor inside the window: no gap
    inside = [r async for r in events.stream(Bound(key=kept[0].key), None, {},
                                             follow=False)]
    assert [r["name"] for r in inside] == ["s3", "s4"]


async def test_attaching_to_a_replica_that_already_applied_commands_marks_a_gap() -> None:
    """A manager that starts deriving late (restart, snapshot install) cannot serve older
    cursors without loss, and says so."""
    store = MemoryStore(self_addr=f"{ADDR}:2378")
    await boot_store(store)
    events = EventLog()
    events.attach(store)
    await store.propose({"op": "secret_create", "id": "x1", "name": "a", "data": b"v",
                         "now": 5.0})
    recs = [r async for r in events.stream(Bound(key=(0, 0)), None, {}, follow=False)]
    assert [r["type"] for r in recs] == ["gap", "secret"]
    assert recs[0]["cursor"].startswith(f"{len(BOOT)}-")


async def test_a_follower_stream_gets_new_events_live_and_until_ends_it() -> None:
    store = MemoryStore(self_addr=f"{ADDR}:2378")
    events = EventLog()
    events.attach(store)
    await boot_store(store)
    got: list[dict[str, Any]] = []

    async def read() -> None:
        async for rec in events.stream(None, Bound(key=(len(BOOT) + 2, 0)),
                                       parse_filters(["type=secret"])):
            got.append(rec)

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.01)
    for i in range(4):
        await store.propose({"op": "secret_create", "id": f"x{i}", "name": f"s{i}",
                             "data": b"v", "now": 10.0 + i})
        await asyncio.sleep(0)
    await asyncio.wait_for(reader, 2)
    assert [r["name"] for r in got] == ["s0", "s1"]  # until = the second command's cursor


async def test_an_until_time_ends_an_idle_stream() -> None:
    events = EventLog()
    events.attach(MemoryStore())
    t0 = asyncio.get_running_loop().time()
    recs = [r async for r in events.stream(None, Bound(time=time.time() + 0.2), {})]
    assert recs == [] and asyncio.get_running_loop().time() - t0 >= 0.15


async def test_local_gossip_events_are_marked_and_numbered_after_the_log() -> None:
    store = MemoryStore(self_addr=f"{ADDR}:2378")
    events = EventLog()
    events.attach(store)
    await boot_store(store)
    ev = events.add_local("node", "suspect", "n2", "h2", {"source": "gossip"})
    assert ev.local and ev.to_dict()["local"] is True
    assert ev.key > events.retained()[-2].key
    await store.propose({"op": "secret_create", "id": "x1", "name": "a", "data": b"v",
                         "now": 5.0})
    assert events.retained()[-1].key > ev.key


def test_filters_follow_docker_rules_and_bad_ones_are_refused() -> None:
    log = booted()
    log.apply({"op": "service_create", "id": "s1", "now": 5.0, "spec": spec()})
    log.apply({"op": "service_create", "id": "s2", "now": 5.0, "spec": spec("db")})
    log.leader_pass()
    evs = log.all

    def sel(*f: str) -> list[tuple[str, str, str]]:
        fl = parse_filters(f)
        return [(e.type, e.action, e.name) for e in evs if matches(e, fl)]

    assert sel("service=web") == [("service", "create", "web"), ("task", "create", "web.1"),
                                  ("task", "assigned", "web.1")] == sel("service=WEB")
    assert sel("service=web", "service=db", "type=service") == [
        ("service", "create", "web"), ("service", "create", "db")]
    assert sel("type=task", "event=assigned", "service=s2") == [("task", "assigned", "db.1")]
    assert sel("node=h2", "type=node") == [("node", "join", "h2")]
    for bad in (["colour=red"], ["type=volume"], ["service"], ["event="]):
        with pytest.raises(BadRequest):
            parse_filters(bad)


def test_since_and_until_accept_cursors_times_and_durations() -> None:
    assert parse_bound("12-3", "since").key == (12, 3)
    assert parse_bound("1700000000.5", "since").time == 1700000000.5
    assert parse_bound("10m", "since", now=1000.0).time == 400.0
    assert parse_bound("2026-12-04T14:00:00Z", "since").time == 1796392800.0
    with pytest.raises(BadRequest):
        parse_bound("yesterday", "since")


def test_comparing_only_the_tasks_a_command_names_misses_no_task_change() -> None:
    """The derivation compares only the tasks a command can touch (speed with thousands of
    tasks); across create, scale, reports, a node death, scale down and removal it finds
    exactly what comparing every task finds."""
    from shoal.node.events import _changed, _touched_tasks

    log = booted()
    seen = 0
    original = log.apply

    def checked(cmd: dict[str, Any]) -> list[Any]:
        nonlocal seen
        before = log.state.snapshot()
        out = original(cmd)
        after = log.state.snapshot()
        assert _changed(before.tasks, after.tasks, _touched_tasks(cmd)) == \
            _changed(before.tasks, after.tasks, None), cmd["op"]
        seen += len(_changed(before.tasks, after.tasks, None)[0])
        return out

    log.apply = checked  # type: ignore[method-assign]
    log.apply({"op": "service_create", "id": "s1", "now": 5.0, "spec": spec(replicas=4)})
    log.leader_pass()
    for t in list(log.state.tasks.values()):
        log.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id, "now": 11.0,
                   "status": {"state": int(TaskState.RUNNING), "timestamp": 11.0}})
    log.leader_pass(now=20.0, gossip={"n1": "dead", "n2": "alive"})
    log.apply({"op": "service_update", "id": "s1", "now": 21.0, "replicas": 1})
    log.leader_pass(now=22.0, gossip={"n1": "dead", "n2": "alive"})
    log.apply({"op": "node_remove", "id": "n1", "now": 23.0, "force": True})
    log.apply({"op": "service_remove", "id": "s1", "now": 24.0})
    log.leader_pass(now=25.0, gossip={"n2": "alive"})
    assert seen > 10
