"""The leader's compact ``spawn`` op (schema 5; shoal.raft.models.spawn_ops): a new task
named by its service's version instead of carrying the template. Every replica and worker
must make exactly the task the full ``create`` makes; anything off the template stays a
create; a cluster below schema 5 refuses it as 0.4 does; and the leader writes it only once
the cluster's schema is 5. Also ``evolve``, the record copy of the state's hot paths."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from typing import Any

import msgpack
import pytest
from helpers import proposals

from shoal.node.events import _touched_tasks
from shoal.node.leader import LeaderLoop, plan_pass
from shoal.node.orchestrator import OrchestratorConfig
from shoal.node.source import MemoryStore
from shoal.raft.models import (
    Node,
    NodeRole,
    NodeState,
    TaskState,
    evolve,
    spawn_ops,
    to_dict,
)
from shoal.raft.state import ClusterState

NOW = 100.0


def cluster(schema: int = 5, nodes: int = 3) -> ClusterState:
    st = ClusterState()
    st.apply({"op": "cluster_init", "cluster_id": "c1", "now": 1.0, "worker_secret": "",
              "manager_secret": "", "digest": "", "schema": schema})
    for i in range(1, nodes + 1):
        st.apply({"op": "node_add", "now": 1.0, "node": to_dict(Node(
            id=f"n{i}", hostname=f"h{i}", addr=f"10.0.0.{i}", api_port=2377, raft_port=2378,
            role=NodeRole.WORKER, state=NodeState.READY, memory_bytes=1 << 30, cpus=2.0))})
    return st


def create(st: ClusterState, sid: str, **spec: Any) -> None:
    res = st.apply({"op": "service_create", "id": sid, "now": 2.0,
                    "spec": {"name": sid, "task": {"container": {"command": ["sleep", "9"]}},
                             **spec}})
    assert "ok" in res, res


def planned(st: ClusterState, down: tuple[str, ...] = (), first: int = 0) -> list[Any]:
    """One leader pass; the nodes ``down`` last heard from long ago; task ids from ``first``."""
    ids = (f"t{i:04d}" for i in itertools.count(first))
    seen = {nid: NOW - 10_000 if nid in down else NOW for nid in st.nodes}
    ops, _ = plan_pass(st.snapshot(), seen, NOW, NOW, OrchestratorConfig(), liveness=True,
                       new_id=ids.__next__)
    return ops


def applied(st: ClusterState, ops: list[Any]) -> dict[str, Any]:
    """The tasks after the batch went through msgpack and the state machine, as plain values."""
    blob = msgpack.packb({"op": "leader", "term": 1, "now": NOW, "ops": ops},
                         use_bin_type=True)
    res = st.apply(msgpack.unpackb(blob, raw=False, strict_map_key=False))
    assert "ok" in res, res
    return {tid: to_dict(t) for tid, t in st.tasks.items()}


def twins(schema: int = 5) -> tuple[ClusterState, ClusterState]:
    """Two identical states: services replicated, global, a global one whose tasks wait on
    their nodes for memory, and a job."""
    out = []
    for _ in range(2):
        st = cluster(schema)
        create(st, "web", mode={"replicas": 5})
        create(st, "agent", mode={"type": "global"})
        create(st, "big", mode={"type": "global"},
               task={"container": {"command": ["x"]},
                     "resources": {"reservations": {"memory": 2 << 30}}})
        create(st, "batch", mode={"type": "replicated-job", "replicas": 2})
        out.append(st)
    return out[0], out[1]


def test_spawns_make_exactly_the_tasks_the_creates_make() -> None:
    full, lean = twins()
    ops = planned(full)
    assert ops == planned(lean)
    compact = spawn_ops(ops, lean.services)
    creates = [o for o in ops if o[0] == "create"]
    spawns = [o for o in compact if o[0] == "spawn"]
    assert len(creates) == len(spawns) == 5 + 3 + 3 + 2  # every create was on template
    assert {o[6] for o in spawns} >= {""} and any(o[6] for o in spawns)  # pending: "big"
    assert any(o[5] for o in spawns)  # global tasks are made placed
    assert applied(full, ops) == applied(lean, compact)
    assert all(t.spec is lean.services[t.service_id].spec.task for t in lean.tasks.values())
    size = {name: len(msgpack.packb(o, use_bin_type=True)) for name, o in
            (("full", ops), ("lean", compact))}
    assert size["lean"] * 4 < size["full"], size


def test_a_create_off_its_services_template_stays_a_create() -> None:
    st, _ = twins()
    ops = [o for o in planned(st) if o[0] == "create"]
    web = next(o for o in ops if o[1]["service_id"] == "web")
    off = [
        ("create", {**web[1], "service_version": 7}),  # another version of the service
        ("create", {**web[1], "spec": {**web[1]["spec"], "force_update": 3}}),
        ("create", {**web[1], "status": {**web[1]["status"], "message": "hand-made"}}),
        ("create", {**web[1], "net_addrs": {"front": "10.1.0.9"}}),
        ("create", {**web[1], "service_id": "gone"}),
        ("create", {**web[1], "extra": 1}),
    ]
    assert spawn_ops(off, st.services) == off
    assert spawn_ops([web], st.services)[0][0] == "spawn"


def test_the_state_machine_spawns_only_for_the_service_version_it_names() -> None:
    st, _ = twins()
    web = st.services["web"]
    op = ("spawn", "x1", "web", web.version, 1, "", "", 0)
    res = st.apply({"op": "leader", "term": 1, "now": NOW, "ops": [
        op, ("spawn", "x2", "web", web.version + 1, 2, "", "", 0),  # a template it lacks
        ("spawn", "x3", "nope", 1, 1, "", "", 0), op]})  # no such service; a repeat
    assert res == {"ok": True, "applied": 1}, res
    t = st.tasks["x1"]
    assert (t.service_name, t.slot, t.status.state, t.status.timestamp, t.created_at) == \
        ("web", 1, TaskState.NEW, NOW, NOW)
    assert set(st.tasks) == {"x1"}
    bad = st.apply({"op": "leader", "term": 1, "now": NOW, "ops": [("spawn", "x4", "web")]})
    assert bad["error"]["code"] == "invalid", bad  # malformed: named, never raised


def test_below_schema_5_a_spawn_is_refused_as_0_4_refuses_it() -> None:
    st = cluster(schema=4)
    create(st, "web")
    res = st.apply({"op": "leader", "term": 1, "now": NOW, "ops": [
        ("spawn", "x1", "web", 1, 1, "", "", 0)]})
    assert res["error"] == {"code": "invalid", "message": "unknown leader op 'spawn'",
                            "field": "ops"}
    assert not st.tasks


def test_the_event_log_derives_the_spawned_tasks_alone() -> None:
    cmd = {"op": "leader", "term": 1, "now": NOW,
           "ops": [("spawn", "x1", "web", 1, 1, "", "", 0), ("assign", "x1", "n1")]}
    assert _touched_tasks(cmd) == {"x1"}


async def leader_pass(schema: int) -> tuple[list[Any], MemoryStore]:
    """A real LeaderLoop's first pass over a 4-replica service on a cluster at ``schema``:
    the create/spawn ops it proposed, and the store."""
    store = MemoryStore(self_addr="10.0.0.1:2378")
    seen = proposals(store)
    st = cluster(schema)
    create(st, "web", mode={"replicas": 4})
    for cmd in ({"op": "cluster_init", "cluster_id": "c1", "now": 1.0, "worker_secret": "",
                 "manager_secret": "", "digest": "", "schema": schema},
                *({"op": "node_add", "now": 1.0, "node": to_dict(n)} for n in st.nodes.values()),
                {"op": "service_create", "id": "web", "now": 2.0,
                 "spec": to_dict(st.services["web"].spec)}):
        await store.propose(cmd)
    loop = LeaderLoop(store, dict.fromkeys(st.nodes, 1e12), OrchestratorConfig(),
                      asyncio.Event())
    await loop.one_pass()
    return [o for c in seen if c["op"] == "leader" for o in c["ops"]
            if o[0] in ("create", "spawn")], store


async def test_the_leader_writes_spawns_only_at_schema_5() -> None:
    for schema, kind in ((4, "create"), (5, "spawn")):
        made, store = await leader_pass(schema)
        assert [o[0] for o in made] == [kind] * 4, (schema, made)
        tasks = store.snapshot().tasks.values()
        assert len(tasks) == 4 and all(t.node_id for t in tasks), tasks
        web = store.snapshot().services["web"]
        assert all(t.spec == web.spec.task and t.service_version == web.version
                   for t in tasks)


def test_a_pass_of_replaced_tasks_keeps_its_history_the_same_way() -> None:
    """After a node goes down, the replacements of its tasks are spawned too, and the
    orphaned ones keep their own records."""
    full, lean = twins()
    applied(full, planned(full))
    applied(lean, spawn_ops(planned(lean), lean.services))
    spawned = 0
    for _ in range(3):  # down, orphaned, replaced (as many passes as it takes)
        ops = planned(full, down=("n2",), first=len(full.tasks))
        assert ops == planned(lean, down=("n2",), first=len(lean.tasks))
        compact = spawn_ops(ops, lean.services)
        spawned += sum(1 for o in compact if o[0] == "spawn")
        assert applied(full, ops) == applied(lean, compact)
    assert spawned >= 2, spawned  # web's replacements (the jobs' and global ones differ)
    assert any(t.status.state is TaskState.ORPHANED for t in lean.tasks.values())
    assert sum(1 for t in lean.tasks.values() if t.service_id == "web"
               and t.desired_state is TaskState.RUNNING) == 5


def test_evolve_copies_a_record_as_replace_does() -> None:
    """The state's hot paths copy tasks with ``evolve`` (no ``__init__``): the same record as
    ``dataclasses.replace`` makes, still frozen, the original untouched; a name that is not a
    field is refused."""
    st, _ = twins()
    applied(st, planned(st))
    t = next(iter(st.tasks.values()))
    changes = {"node_id": "n9", "updated_at": 5.0,
               "status": evolve(t.status, state=TaskState.FAILED, message="x")}
    made = evolve(t, **changes)
    assert made == dataclasses.replace(t, **changes) and type(made) is type(t)
    assert made.status.state is TaskState.FAILED and t.status.state is not TaskState.FAILED
    assert t.node_id != "n9" and made.spec is t.spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.node_id = "n1"  # type: ignore[misc]
    with pytest.raises(TypeError, match="no field 'nodeid'"):
        evolve(t, nodeid="n1")
