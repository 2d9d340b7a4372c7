"""The leader's work at scale, as pure code: the indexed scheduler places exactly as the plain
reference (tests/sched_reference.py) on seeded random clusters, and a pass that changes many
tasks goes out as bounded Raft entries that all apply. No network, no processes."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import msgpack
import pytest
from sched_reference import reference_schedule

from shoal.node.leader import LeaderLoop, batches, plan_pass
from shoal.node.orchestrator import OrchestratorConfig
from shoal.node.scheduler import schedule
from shoal.node.source import MemoryStore
from shoal.raft.models import (
    Node,
    NodeAvailability,
    NodeRole,
    NodeState,
    Service,
    Task,
    TaskState,
    TaskStatus,
    to_dict,
)
from shoal.raft.schema import SCHEMA, upgrade_spec
from shoal.raft.state import MAX_BATCH_BYTES, MAX_BATCH_OPS, ClusterState, Snapshot
from shoal.raft.validate import validate_spec

GiB = 1 << 30
CONSTRAINTS: list[list[str]] = [
    [], [], [], ["node.labels.zone==a"], ["node.labels.zone!=c"], ["node.role==manager"],
    ["node.labels.zone==b", "node.labels.disk==ssd"], ["node.labels.zone==nowhere"],
]


def _generic(rng: random.Random) -> dict[str, int | list[str]]:
    """A node's generic resources: none, named GPUs, a discrete SSD count, or both."""
    roll = rng.random()
    gpus = [f"GPU-{i}" for i in range(rng.randrange(1, 4))]
    if roll < 0.4:
        return {}
    if roll < 0.6:
        return {"GPU": gpus}
    if roll < 0.8:
        return {"ssd": rng.randrange(0, 4)}
    return {"gpu": gpus, "SSD": rng.randrange(1, 4)}


def random_cluster(rng: random.Random, n_nodes: int, n_services: int, n_tasks: int
                   ) -> tuple[Snapshot, list[Task]]:
    """Nodes of every state/availability/label mix, services with constraints and
    reservations (some of which fit nowhere), tasks running, ended, pending, of old templates."""
    nodes: dict[str, Node] = {}
    healthy = rng.random() < 0.3  # every node ready and active: only constraints can refuse
    for i in range(n_nodes):
        nid = f"n{rng.randrange(10 ** 6):06d}{i}"
        labels = {"zone": rng.choice("abc")}
        if rng.random() < 0.3:
            labels["disk"] = "ssd"
        nodes[nid] = Node(
            id=nid, hostname=f"h{i}", addr=f"10.0.{i // 250}.{i % 250 + 1}", api_port=2377,
            raft_port=2378, role=rng.choice([NodeRole.WORKER] * 3 + [NodeRole.MANAGER]),
            state=NodeState.READY if healthy else rng.choice([NodeState.READY] * 8 +
                                                             [NodeState.DOWN]),
            availability=NodeAvailability.ACTIVE if healthy else rng.choice(
                [NodeAvailability.ACTIVE] * 8 + [NodeAvailability.DRAIN,
                                                 NodeAvailability.PAUSE]),
            labels=labels, memory_bytes=rng.choice([0, 1 * GiB, 2 * GiB, 4 * GiB]),
            cpus=rng.choice([0.0, 1.0, 2.0, 4.0]), generic_resources=_generic(rng))
    services: dict[str, Service] = {}
    for k in range(n_services):
        spec: dict[str, Any] = {"name": f"svc{k}", "command": ["sleep", "1"],
                                "replicas": rng.randrange(1, 20),
                                "constraints": rng.choice(CONSTRAINTS)}
        if rng.random() < 0.5:
            spec["reserve_memory"] = rng.choice([64, 256, 512, 1024]) << 20
        if rng.random() < 0.4:
            spec["reserve_cpu"] = rng.choice([0.25, 0.5, 1.0, 1.5])
        sid = f"s{k}"
        nested = upgrade_spec(spec)
        if rng.random() < 0.3:  # generic resources, named or discrete (kinds ignore case)
            nested["task"].setdefault("resources", {}).setdefault("reservations", {})[
                "generic_resources"] = rng.choice(
                [{"gpu": 1}, {"GPU": 2}, {"ssd": 1}, {"gpu": 1, "ssd": 2}, {"fpga": 1}])
        placement = nested["task"]["placement"]
        if rng.random() < 0.3:
            placement["max_replicas"] = rng.choice([1, 2, 3])
        if rng.random() < 0.3:
            placement["preferences"] = rng.choice([
                [{"spread": "node.labels.zone"}], [{"spread": "node.labels.disk"}],
                [{"spread": "node.labels.zone"}, {"spread": "node.labels.disk"}]])
        services[sid] = Service(id=sid, spec=validate_spec(nested))
    svcs = list(services.values())
    node_ids = list(nodes)
    tasks: dict[str, Task] = {}
    pending: list[Task] = []
    for j in range(n_tasks):
        svc = rng.choice(svcs)
        template = svc.spec.task
        if rng.random() < 0.2:  # a task of another (older) template: other reservations
            template = rng.choice(svcs).spec.task
        placed = bool(node_ids) and rng.random() < 0.7
        state = rng.choice([TaskState.RUNNING] * 6 + [TaskState.ASSIGNED, TaskState.FAILED,
                                                      TaskState.SHUTDOWN]) \
            if placed else TaskState.PENDING
        desired = TaskState.SHUTDOWN if rng.random() < 0.05 else TaskState.RUNNING
        t = Task(id=f"t{rng.randrange(10 ** 9):09d}{j}", service_id=svc.id,
                 service_name=svc.spec.name, slot=rng.randrange(1, 30), spec=template,
                 service_version=1, desired_state=desired,
                 node_id=rng.choice(node_ids) if placed else "",
                 status=TaskStatus(state=state, timestamp=1.0))
        tasks[t.id] = t
        if not t.node_id and t.alive:
            pending.append(t)
    snap = ClusterState(nodes=nodes, services=services, tasks=tasks).snapshot()
    return snap, pending


@pytest.mark.parametrize("seed", range(40))
def test_the_indexed_scheduler_places_exactly_as_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    snap, pending = random_cluster(rng, n_nodes=rng.randrange(0, 60),
                                   n_services=rng.randrange(1, 8),
                                   n_tasks=rng.randrange(0, 400))
    rng.shuffle(pending)  # the input order must not matter
    assert schedule(snap, pending) == reference_schedule(snap, pending)


def test_the_reference_comparison_covers_every_outcome() -> None:
    """The seeded inputs above exercise placements, every rejection and mixed reasons."""
    placed = 0
    reasons: set[str] = set()
    for seed in range(40):
        rng = random.Random(seed)
        snap, pending = random_cluster(rng, n_nodes=rng.randrange(0, 60),
                                       n_services=rng.randrange(1, 8),
                                       n_tasks=rng.randrange(0, 400))
        plan = reference_schedule(snap, pending)
        placed += len(plan.assignments)
        reasons.update(r for _, r in plan.unschedulable)
    text = " ".join(reasons)
    assert placed > 800
    for why in ("not ready", "not active", "insufficient memory", "insufficient cpu",
                "insufficient generic resource gpu", "insufficient generic resource ssd",
                "insufficient generic resource fpga", "no node satisfies", "(no nodes)",
                "max replicas per node"):
        assert why in text, why


def test_the_indexed_scheduler_matches_at_a_thousand_nodes() -> None:
    rng = random.Random(1000)
    snap, pending = random_cluster(rng, n_nodes=1000, n_services=12, n_tasks=1500)
    assert len(pending) > 300
    assert schedule(snap, pending) == reference_schedule(snap, pending)


def test_many_like_tasks_spread_evenly_and_deterministically() -> None:
    """3,000 tasks of one service on 1,000 equal nodes: three on each, in node-id order."""
    nodes = {f"n{i:04d}": Node(id=f"n{i:04d}", hostname=f"h{i}", addr=f"10.1.{i // 250}."
                               f"{i % 250 + 1}", api_port=1, raft_port=2, role=NodeRole.WORKER,
                               state=NodeState.READY) for i in range(1000)}
    svc = Service(id="s1", spec=validate_spec({"name": "web", "command": ["x"],
                                               "replicas": 3000}))
    pending = [Task(id=f"t{k:05d}", service_id="s1", service_name="web", slot=k,
                    spec=svc.spec.task, service_version=1) for k in range(1, 3001)]
    snap = ClusterState(nodes=nodes, services={"s1": svc},
                        tasks={t.id: t for t in pending}).snapshot()
    plan = schedule(snap, pending)
    per_node: dict[str, int] = {}
    for _, nid in plan.assignments:
        per_node[nid] = per_node.get(nid, 0) + 1
    assert set(per_node.values()) == {3} and len(per_node) == 1000
    assert [nid for _, nid in plan.assignments[:3]] == ["n0000", "n0001", "n0002"]
    assert plan == schedule(snap, list(reversed(pending)))


# ------------------------------------------------------------------ Raft entries
def _scaled(n_nodes: int, replicas: int) -> ClusterState:
    st = ClusterState()
    st.nodes = {f"n{i:04d}": Node(id=f"n{i:04d}", hostname=f"h{i}", addr=f"10.2.{i // 250}."
                                  f"{i % 250 + 1}", api_port=1, raft_port=2,
                                  role=NodeRole.WORKER, state=NodeState.READY)
                for i in range(n_nodes)}
    res = st.apply({"op": "service_create", "id": "s1", "now": 1.0,
                    "spec": {"name": "web", "command": ["sleep", "1"], "replicas": replicas}})
    assert "ok" in res, res
    return st


def test_a_large_pass_splits_into_bounded_entries_that_keep_the_order() -> None:
    st = _scaled(100, 6000)
    ops, _ = plan_pass(st.snapshot(), {}, 0.0, 2.0, OrchestratorConfig(), liveness=False)
    assert len(ops) == 12000  # 6,000 creates and 6,000 assignments: over MAX_BATCH_OPS
    parts = list(batches(ops))
    assert [op for part in parts for op in part] == ops
    assert len(parts) > 1
    for part in parts:
        assert len(part) <= MAX_BATCH_OPS
        blob = msgpack.packb({"op": "leader", "term": 1, "now": 2.0, "ops": part},
                             use_bin_type=True)
        assert len(blob) <= MAX_BATCH_BYTES
    # an op larger than the byte bound still goes out (alone)
    big = [("unschedulable", "t1", "x" * 500), ("delete", "t2")]
    assert list(batches(big, max_bytes=100)) == [[big[0]], [big[1]]]
    assert list(batches(big, max_ops=1)) == [[big[0]], [big[1]]]


def test_a_ten_thousand_task_scale_is_committed_by_one_leader_pass() -> None:
    """Before the split, the pass was one entry of 20,000 ops that the state machine refused
    (MAX_BATCH_OPS), so a large scale never happened."""
    store = MemoryStore()
    scaled = _scaled(50, 10_000)
    store.state.nodes, store.state.services = scaled.nodes, scaled.services
    loop = LeaderLoop(store, {}, OrchestratorConfig(), asyncio.Event())
    before = store.index
    asyncio.run(loop.one_pass(led_for=0.0))
    tasks = list(store.state.tasks.values())
    assert len(tasks) == 10_000
    assert all(t.node_id and t.status.state is TaskState.ASSIGNED for t in tasks)
    assert store.index - before > 2  # several entries
    ops, _ = plan_pass(store.snapshot(), {}, 0.0, 3.0, OrchestratorConfig(), liveness=False)
    assert ops == []


def test_creates_of_one_pass_share_the_template_but_apply_as_separate_tasks() -> None:
    st = _scaled(3, 5)
    ops, _ = plan_pass(st.snapshot(), {}, 0.0, 2.0, OrchestratorConfig(), liveness=False)
    creates = [op[1] for op in ops if op[0] == "create"]
    assert sorted(c["slot"] for c in creates) == [1, 2, 3, 4, 5]
    assert len({c["id"] for c in creates}) == 5
    assert "ok" in st.apply({"op": "leader", "term": 1, "now": 2.0, "ops": ops})
    svc_task = st.services["s1"].spec.task
    assert all(t.spec == svc_task and t.node_id for t in st.tasks.values())
    assert {t.id: t.slot for t in st.tasks.values()} == {c["id"]: c["slot"] for c in creates}
    assert all(to_dict(t)["status"]["state"] == int(TaskState.ASSIGNED)
               for t in st.tasks.values())


# ------------------------------------------------------------------ incremental passes
def _step(st: ClusterState, rng: random.Random, now: float) -> None:
    """One random thing happening to the cluster between two leader passes."""
    placed = [t for t in st.tasks.values() if t.node_id and not t.status.state.terminal]
    roll = rng.random()
    if roll < 0.45 and placed:
        for t in rng.sample(placed, min(len(placed), rng.randrange(1, 6))):
            state = rng.choice([TaskState.RUNNING] * 4 + [TaskState.FAILED, TaskState.COMPLETE,
                                                          TaskState.SHUTDOWN])
            if t.desired_state >= TaskState.SHUTDOWN:
                state = TaskState.SHUTDOWN
            st.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id, "now": now,
                      "status": {"state": int(state), "timestamp": now}})
    elif roll < 0.55:
        nid = rng.choice(sorted(st.nodes))
        change: dict[str, Any] = rng.choice([
            {"availability": rng.choice(["active", "drain", "pause"])},
            {"labels": {"zone": rng.choice("ab")}}])
        st.apply({"op": "node_update", "id": nid, "now": now, **change})
    elif roll < 0.62:
        nid = rng.choice(sorted(st.nodes))
        st.apply({"op": "leader", "term": 1, "now": now,
                  "ops": [("node_state", nid, rng.choice(["ready", "down"]), "")]})
    elif roll < 0.75 and st.services:
        sid = rng.choice(sorted(st.services))
        st.apply({"op": "service_update", "id": sid, "now": now,
                  "replicas": rng.randrange(0, 12)})
    elif roll < 0.82 and st.services:
        svc = st.services[rng.choice(sorted(st.services))]
        spec = to_dict(svc.spec)
        spec["task"]["container"]["command"] = ["sleep", str(rng.randrange(3))]
        spec["task"]["placement"]["constraints"] = rng.choice(CONSTRAINTS[:5])
        st.apply({"op": "service_update", "id": svc.id, "now": now, "spec": spec})
    elif roll < 0.86 and st.services:
        st.apply({"op": "service_remove", "id": rng.choice(sorted(st.services)), "now": now})
    elif roll < 0.92:
        k = rng.randrange(10 ** 6)
        spec = upgrade_spec({"name": f"svc{k}", "command": ["sleep", "1"],
                             "replicas": rng.randrange(0, 10),
                             "constraints": rng.choice(CONSTRAINTS),
                             "reserve_memory": rng.choice([0, 1 << 30, 3 << 30]),
                             "reserve_cpu": rng.choice([0.0, 0.5, 1.5]),
                             "restart_delay": rng.choice([0.0, 2.0])})
        if rng.random() < 0.3:
            spec["task"].setdefault("resources", {}).setdefault("reservations", {})[
                "generic_resources"] = {"gpu": 1}
        # every service mode, and placement limits and preferences
        spec["mode"]["type"] = rng.choice(["replicated"] * 3 + ["global", "replicated-job",
                                                                 "global-job"])
        if spec["mode"]["type"].startswith("global"):
            spec["mode"]["replicas"] = 1
        if spec["mode"]["type"] == "replicated-job":
            spec["mode"]["max_concurrent"] = rng.randrange(0, 4)
        if rng.random() < 0.3:
            spec["task"]["placement"]["max_replicas"] = rng.randrange(1, 3)
        if rng.random() < 0.3:
            spec["task"]["placement"]["preferences"] = [{"spread": "node.labels.zone"}]
        st.apply({"op": "service_create", "id": f"s{k}", "now": now, "spec": spec})
    # else: nothing happened (a quiet pass)


def _ids(prefix: str) -> Any:
    counter = iter(range(10 ** 9))
    return lambda: f"{prefix}{next(counter):08d}"


@pytest.mark.parametrize("seed", range(12))
def test_an_incremental_pass_decides_what_a_whole_pass_decides(seed: int) -> None:
    """Over random histories (tasks failing, nodes drained, relabelled, down, services
    scaled, updated, removed, created), a pass with the PassIndex proposes the same ops as a
    pass over the whole state, and a quiet cluster gives both nothing to do."""
    from shoal.node.leader import PassIndex

    rng = random.Random(seed)
    st = ClusterState()
    assert "ok" in st.apply({"op": "cluster_schema", "schema": SCHEMA, "now": 1.0})
    for i in range(rng.randrange(1, 12)):
        node = Node(id=f"n{i}", hostname=f"h{i}", addr=f"10.3.0.{i + 1}", api_port=1,
                    raft_port=2, role=rng.choice([NodeRole.WORKER, NodeRole.MANAGER]),
                    labels={"zone": rng.choice("abc")}, memory_bytes=4 * GiB, cpus=4.0,
                    generic_resources=_generic(rng))
        assert "ok" in st.apply({"op": "node_add", "now": 1.0, "node": to_dict(node)})
    index = PassIndex()
    now = 10.0
    quiet_passes = 0
    for step in range(120):
        now += rng.choice([0.1, 0.5, 3.0])
        _step(st, rng, now)
        snap = st.snapshot()
        cfg = OrchestratorConfig()
        whole, wake_whole = plan_pass(snap, {}, 0.0, now, cfg, liveness=False,
                                      new_id=_ids(f"t{step}-"))
        part, wake_part = plan_pass(snap, {}, 0.0, now, cfg, liveness=False, index=index,
                                    new_id=_ids(f"t{step}-"))
        assert sorted(map(repr, part)) == sorted(map(repr, whole)), step
        assert wake_part == wake_whole
        quiet_passes += not whole
        for start in range(0, len(whole), MAX_BATCH_OPS):
            res = st.apply({"op": "leader", "term": 1, "now": now,
                            "ops": whole[start:start + MAX_BATCH_OPS]})
            assert "ok" in res, res
    assert quiet_passes > 5


def test_a_quiet_pass_looks_only_at_what_changed() -> None:
    from shoal.node.leader import PassIndex

    st = _scaled(20, 200)
    index = PassIndex()
    ops, _ = plan_pass(st.snapshot(), {}, 0.0, 2.0, OrchestratorConfig(), liveness=False,
                       index=index)
    assert len(ops) == 400  # created and placed
    assert "ok" in st.apply({"op": "leader", "term": 1, "now": 2.0, "ops": ops})
    ops, _ = plan_pass(st.snapshot(), {}, 0.0, 3.0, OrchestratorConfig(), liveness=False,
                       index=index)
    assert ops == [] and index.quiet == {"s1"}
    assert index.update(st.snapshot()) == set()  # nothing changed: nothing to look at
    t = next(iter(st.tasks.values()))
    st.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id, "now": 4.0,
              "status": {"state": int(TaskState.FAILED), "timestamp": 4.0}})
    assert index.update(st.snapshot()) == {"s1"}
    st.apply({"op": "node_update", "id": t.node_id, "now": 5.0, "availability": "drain"})
    assert index.update(st.snapshot()) is None  # a node changed: every service
