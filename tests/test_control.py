"""The state machine, scheduler and orchestrator as pure code: no network, no processes."""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
import pytest

from shoal.node.leader import plan_pass
from shoal.node.orchestrator import OrchestratorConfig, reconcile_services
from shoal.node.scheduler import schedule
from shoal.raft.models import (
    Node,
    NodeRole,
    NodeState,
    TaskState,
    task_from_dict,
    to_dict,
)
from shoal.raft.state import ClusterState

SPEC = {"name": "web", "command": ["sleep", "100"], "replicas": 3}


def node(i: int, state: NodeState = NodeState.READY, role: NodeRole = NodeRole.WORKER) -> Node:
    return Node(id=f"n{i}", hostname=f"h{i}", addr=f"10.0.0.{i}", api_port=2377, raft_port=2378,
                role=role, state=state)


def cluster(n_nodes: int = 3, spec: dict[str, Any] | None = None) -> ClusterState:
    st = ClusterState()
    for i in range(1, n_nodes + 1):
        assert "ok" in st.apply({"op": "node_add", "now": 1.0, "node": to_dict(node(i))})
    assert "ok" in st.apply({"op": "service_create", "id": "s1", "now": 1.0,
                             "spec": spec or SPEC})
    return st


def ids() -> Any:
    counter = itertools.count(1)
    return lambda: f"t{next(counter)}"


def converge(st: ClusterState, now: float = 10.0, rounds: int = 5,
             config: OrchestratorConfig | None = None) -> None:
    cfg = config or OrchestratorConfig()
    seen = {nid: now for nid in st.nodes}
    for _ in range(rounds):
        ops, _ = plan_pass(st.snapshot(), seen, now, now, cfg, liveness=False)
        if not ops:
            return
        res = st.apply({"op": "leader", "term": 1, "now": now, "ops": ops})
        assert "ok" in res, res


def run_all(st: ClusterState, now: float = 10.0) -> None:
    """Pretend every assigned task started."""
    for t in list(st.tasks.values()):
        if t.node_id and t.status.state == TaskState.ASSIGNED:
            st.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id, "now": now,
                      "status": {"state": int(TaskState.RUNNING), "timestamp": now}})


def live(st: ClusterState) -> list[Any]:
    return [t for t in st.tasks.values() if t.alive]


# ------------------------------------------------------------------ state machine
def test_bad_commands_are_rejected_not_raised() -> None:
    st = ClusterState()
    for cmd in [None, 3, {}, {"op": "nope"}, {"op": "service_create"},
                {"op": "service_create", "id": "x", "now": 1, "spec": {"name": "Bad Name"}},
                {"op": "leader", "term": "x"}, {"op": "task_status", "task_id": 5}]:
        res = st.apply(cmd)
        assert "error" in res, cmd
    assert st.index == 8 and not st.services


def test_spec_errors_name_the_field() -> None:
    st = ClusterState()
    res = st.apply({"op": "service_create", "id": "s", "now": 1,
                    "spec": {"name": "web", "command": ["x"], "replicas": -1}})
    assert res["error"]["field"] == "mode.replicas"
    res = st.apply({"op": "service_create", "id": "s", "now": 1,
                    "spec": {"name": "web", "command": []}})
    assert res["error"]["field"] == "task.container.command"


def test_duplicate_service_name_refused() -> None:
    st = cluster()
    res = st.apply({"op": "service_create", "id": "s2", "now": 1.0, "spec": SPEC})
    assert res["error"]["code"] == "exists" and res["error"]["field"] == "name"


def test_stale_leader_term_is_fenced() -> None:
    """A deposed leader's batch (older term) cannot overwrite its successor's decisions."""
    st = cluster()
    assert "ok" in st.apply({"op": "leader", "term": 5, "now": 2.0, "ops": []})
    res = st.apply({"op": "leader", "term": 4, "now": 2.0,
                    "ops": [("node_state", "n1", "down", "stale")]})
    assert res["error"]["code"] == "stale_term"
    assert st.nodes["n1"].state is NodeState.READY


def test_task_status_only_moves_forward_and_only_from_its_node() -> None:
    st = cluster()
    converge(st)
    t = next(iter(st.tasks.values()))
    other = next(n for n in st.nodes if n != t.node_id)
    res = st.apply({"op": "task_status", "task_id": t.id, "node_id": other, "now": 3.0,
                    "status": {"state": int(TaskState.RUNNING)}})
    assert res["error"]["code"] == "forbidden"
    for state in (TaskState.RUNNING, TaskState.STARTING):
        st.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id, "now": 3.0,
                  "status": {"state": int(state)}})
    assert st.tasks[t.id].status.state is TaskState.RUNNING


def test_state_survives_msgpack_round_trip_of_commands() -> None:
    """Commands are stored as msgpack in the log: what the leader proposes must decode."""
    st = cluster()
    ops, _ = plan_pass(st.snapshot(), {}, 0.0, 10.0, OrchestratorConfig(), liveness=False)
    blob = msgpack.packb({"op": "leader", "term": 1, "now": 10.0, "ops": ops})
    cmd = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    assert "ok" in st.apply(cmd)
    assert len(st.tasks) == 3


def test_a_new_leader_takes_a_node_gossip_saw_die_down_and_replaces_its_tasks_at_once(
        ) -> None:
    """Within the leadership grace (``liveness=False``) heartbeats are not judged, gossip's
    verdicts are: the dead node's tasks are orphaned and replaced in the same pass."""
    st = cluster()
    converge(st)
    run_all(st)
    gone = st.tasks[next(iter(st.tasks))].node_id
    gossip = {nid: "dead" if nid == gone else "alive" for nid in st.nodes}
    ops, _ = plan_pass(st.snapshot(), {}, 0.0, 20.0, OrchestratorConfig(), liveness=False,
                       gossip=gossip)
    assert ("node_state", gone, "down") in [op[:3] for op in ops]
    res = st.apply({"op": "leader", "term": 2, "now": 20.0, "ops": ops})
    assert "ok" in res, res
    live = [t for t in st.tasks.values() if t.desired_state is TaskState.RUNNING]
    assert len(live) == 3 and all(t.node_id != gone for t in live)
    # without gossip, a new leader judges no one yet (its heartbeat table is empty)
    assert not any(op[0] == "node_state" for op in plan_pass(
        st.snapshot(), {}, 0.0, 20.0, OrchestratorConfig(), liveness=False)[0])


# ------------------------------------------------------------------ scheduler
def test_scheduler_spreads_replicas() -> None:
    st = cluster(5, dict(SPEC, replicas=6))
    converge(st)
    per_node: dict[str, int] = {}
    for t in live(st):
        per_node[t.node_id] = per_node.get(t.node_id, 0) + 1
    assert sum(per_node.values()) == 6 and max(per_node.values()) <= 2


def test_scheduler_explains_unschedulable() -> None:
    st = cluster(2)
    for nid in list(st.nodes):
        st.nodes[nid] = st.nodes[nid].__class__(**{**st.nodes[nid].__dict__,
                                                   "state": NodeState.DOWN})
    converge(st)
    t = next(iter(st.tasks.values()))
    assert not t.node_id
    assert t.status.state is TaskState.PENDING
    assert "not ready 2/2" in t.status.message


def test_scheduler_is_deterministic() -> None:
    st = cluster(4, dict(SPEC, replicas=7))
    snap = st.snapshot()
    ops, _ = reconcile_services(snap, 1.0, ids(), OrchestratorConfig())
    scratch = cluster(4, dict(SPEC, replicas=7))
    scratch.apply({"op": "leader", "term": 1, "now": 1.0, "ops": ops})
    pending = [t for t in scratch.tasks.values() if not t.node_id]
    assert schedule(scratch.snapshot(), pending) == schedule(scratch.snapshot(), pending)


# ------------------------------------------------------------------ orchestrator
def test_scale_up_and_down_converges() -> None:
    st = cluster(3)
    converge(st)
    assert len(live(st)) == 3
    st.apply({"op": "service_update", "id": "s1", "now": 5.0, "replicas": 10})
    converge(st)
    assert len(live(st)) == 10
    assert sorted(t.slot for t in live(st)) == list(range(1, 11))
    st.apply({"op": "service_update", "id": "s1", "now": 6.0, "replicas": 2})
    converge(st)
    assert sorted(t.slot for t in live(st)) == [1, 2]
    shutting = [t for t in st.tasks.values() if t.desired_state == TaskState.SHUTDOWN]
    assert len(shutting) == 8


def test_down_node_tasks_are_replaced_and_stale_ones_stopped() -> None:
    st = cluster(3, dict(SPEC, replicas=3))
    converge(st)
    run_all(st)
    victim = "n2"
    old = [t.id for t in live(st) if t.node_id == victim]
    assert old
    st.apply({"op": "leader", "term": 1, "now": 20.0,
              "ops": [("node_state", victim, "down", "test")]})
    converge(st, now=20.0)
    alive = live(st)
    assert len(alive) == 3 and all(t.node_id != victim for t in alive)
    for tid in old:  # the stale task is told to stop when its node comes back
        assert st.tasks[tid].desired_state >= TaskState.SHUTDOWN
        assert st.tasks[tid].status.state is TaskState.ORPHANED


def test_failed_task_replaced_after_restart_delay() -> None:
    st = cluster(1, dict(SPEC, replicas=1, restart_delay=2.0))
    cfg = OrchestratorConfig()
    converge(st, config=cfg)
    run_all(st)
    t = live(st)[0]
    st.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id, "now": 10.0,
              "status": {"state": int(TaskState.FAILED), "timestamp": 10.0, "exit_code": 3}})
    ops, wake = reconcile_services(st.snapshot(), 11.0, ids(), cfg)
    assert not [o for o in ops if o[0] == "create"] and wake == pytest.approx(12.0)
    ops, _ = reconcile_services(st.snapshot(), 12.5, ids(), cfg)
    created = [task_from_dict(o[1]) for o in ops if o[0] == "create"]
    assert len(created) == 1 and created[0].slot == 1


def test_removed_service_tasks_deleted_once_stopped() -> None:
    st = cluster(2)
    converge(st)
    run_all(st)
    st.apply({"op": "service_remove", "id": "s1", "now": 30.0})
    assert all(t.desired_state == TaskState.REMOVE for t in st.tasks.values())
    converge(st)
    assert len(st.tasks) == 3  # still running: not deleted yet
    for t in list(st.tasks.values()):
        st.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id, "now": 31.0,
                  "status": {"state": int(TaskState.SHUTDOWN), "timestamp": 31.0}})
    converge(st)
    assert not st.tasks


def test_node_liveness_marks_down_and_ready() -> None:
    st = cluster(2)
    cfg = OrchestratorConfig(node_down_timeout=4.0)
    seen = {"n1": 100.0, "n2": 90.0}
    ops, _ = plan_pass(st.snapshot(), seen, 101.0, 101.0, cfg)
    assert ops[0][:3] == ("node_state", "n2", "down")
    st.apply({"op": "leader", "term": 1, "now": 101.0, "ops": ops})
    seen["n2"] = 101.0
    ops, _ = plan_pass(st.snapshot(), seen, 102.0, 102.0, cfg)
    assert ("node_state", "n2", "ready", "") in ops


def test_drained_node_tasks_move_elsewhere() -> None:
    st = cluster(3, dict(SPEC, replicas=3))
    converge(st)
    run_all(st)
    on_n1 = [t.id for t in live(st) if t.node_id == "n1"]
    st.apply({"op": "node_update", "id": "n1", "now": 20.0, "availability": "drain"})
    converge(st, now=20.0)
    assert all(st.tasks[t].desired_state == TaskState.SHUTDOWN for t in on_n1)
    # their replacements wait until they stopped (as Swarm: a port or a single-writer
    # volume may be the task's own)
    assert len(live(st)) == 3 - len(on_n1)
    _finish_stopping(st, 21.0)
    converge(st, now=21.0)
    assert len(live(st)) == 3 and all(t.node_id != "n1" for t in live(st))


def _fail_slot(st: ClusterState, now: float, state: TaskState = TaskState.FAILED) -> None:
    for t in live(st):
        st.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id, "now": now,
                  "status": {"state": int(state), "timestamp": now,
                             "exit_code": 0 if state == TaskState.COMPLETE else 1}})


@pytest.mark.parametrize(("condition", "ending", "restarted"), [
    ("any", TaskState.COMPLETE, True),
    ("any", TaskState.FAILED, True),
    ("on-failure", TaskState.COMPLETE, False),
    ("on-failure", TaskState.FAILED, True),
    ("none", TaskState.FAILED, False),
])
def test_restart_condition(condition: str, ending: TaskState, restarted: bool) -> None:
    st = cluster(1, dict(SPEC, replicas=1, restart_condition=condition, restart_delay=0))
    converge(st)
    run_all(st)
    _fail_slot(st, 11.0, ending)
    converge(st, now=12.0)
    assert (len(live(st)) == 1) is restarted


def test_restart_max_attempts_then_gives_up_and_history_is_kept() -> None:
    st = cluster(1, dict(SPEC, replicas=1, restart_max_attempts=4, restart_delay=0))
    now = 10.0
    converge(st, now=now)
    for _ in range(5):  # the first run and 4 restarts all fail
        run_all(st, now)
        now += 1
        _fail_slot(st, now)
        converge(st, now=now)
    assert not live(st)
    assert len(st.tasks) == 5  # history kept so the attempts stay counted
    converge(st, now=now + 100)
    assert not live(st)


def test_restart_window_forgets_old_attempts() -> None:
    st = cluster(1, dict(SPEC, replicas=1, restart_max_attempts=1, restart_window=10.0,
                         restart_delay=0))
    converge(st, now=10.0)
    run_all(st, 10.0)
    _fail_slot(st, 11.0)
    converge(st, now=11.0)
    run_all(st, 11.0)
    _fail_slot(st, 12.0)
    converge(st, now=12.0)
    assert not live(st)  # 1 restart used within the window
    converge(st, now=30.0)  # both failures are now outside the window
    assert len(live(st)) == 1


def test_reservations_filter_nodes_and_explain() -> None:
    st = ClusterState()
    for i, mem in ((1, 1 << 30), (2, 4 << 30)):
        n = Node(id=f"n{i}", hostname=f"h{i}", addr=f"10.0.0.{i}", api_port=1, raft_port=2,
                 role=NodeRole.WORKER, memory_bytes=mem, cpus=2.0)
        st.apply({"op": "node_add", "now": 1.0, "node": to_dict(n)})
    st.apply({"op": "service_create", "id": "s1", "now": 1.0,
              "spec": dict(SPEC, replicas=3, reserve_memory=(1 << 30) + 1)})
    converge(st)
    placed = [t for t in st.tasks.values() if t.node_id]
    assert len(placed) == 3 and {t.node_id for t in placed} == {"n2"}
    st.apply({"op": "service_update", "id": "s1", "now": 2.0, "replicas": 4})
    converge(st, now=2.0)
    stuck = [t for t in st.tasks.values() if not t.node_id]
    assert len(stuck) == 1
    assert "insufficient memory 2/2" in stuck[0].status.message


def _finish_stopping(st: ClusterState, now: float) -> None:
    """Agents report SHUTDOWN for tasks told to stop."""
    for t in list(st.tasks.values()):
        if t.desired_state >= TaskState.SHUTDOWN and not t.status.state.terminal and t.node_id:
            st.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id, "now": now,
                      "status": {"state": int(TaskState.SHUTDOWN), "timestamp": now}})


def test_rolling_update_replaces_one_at_a_time_and_scale_does_not_redeploy() -> None:
    st = cluster(3, dict(SPEC, replicas=3))
    converge(st)
    run_all(st)
    first = {t.id for t in live(st)}
    st.apply({"op": "service_update", "id": "s1", "now": 5.0, "replicas": 4})
    converge(st, now=5.0)
    run_all(st, 5.0)
    assert first < {t.id for t in live(st)}  # scaling kept the old tasks
    new_spec = dict(SPEC, replicas=4, env={"V": "2"})
    assert "ok" in st.apply({"op": "service_update", "id": "s1", "now": 6.0, "spec": new_spec})
    now = 6.0
    for _ in range(10):
        converge(st, now=now, rounds=1)
        stopping = [t for t in st.tasks.values()
                    if t.desired_state == TaskState.SHUTDOWN and not t.status.state.terminal]
        assert len(stopping) <= 1  # parallelism 1
        _finish_stopping(st, now)
        converge(st, now=now, rounds=2)
        run_all(st, now)
        now += 1
    assert len(live(st)) == 4
    assert all(t.spec.container.env == {"V": "2"} for t in live(st))



def test_gossip_decides_liveness_and_suspicion_is_not_death() -> None:
    st = cluster(3)
    cfg = OrchestratorConfig(node_down_timeout=4.0)
    stale = {"n1": 0.0, "n2": 0.0, "n3": 0.0}  # heartbeats long gone
    gossip = {"n1": "alive", "n2": "suspect", "n3": "dead"}
    ops, _ = plan_pass(st.snapshot(), stale, 100.0, 100.0, cfg, gossip=gossip)
    downs = {o[1] for o in ops if o[0] == "node_state" and o[2] == "down"}
    assert downs == {"n3"}
    st.apply({"op": "leader", "term": 1, "now": 100.0, "ops": ops})
    ops, _ = plan_pass(st.snapshot(), stale, 101.0, 101.0, cfg, gossip={"n3": "alive"})
    assert ("node_state", "n3", "ready", "") in ops


def test_node_subnets_never_overlap_and_are_reused_after_removal() -> None:
    st = cluster(3)
    subnets = [st.nodes[f"n{i}"].subnet for i in (1, 2, 3)]
    assert subnets == ["10.99.0.0/24", "10.99.1.0/24", "10.99.2.0/24"]
    st.apply({"op": "node_remove", "id": "n2", "now": 2.0, "force": True})
    n4 = Node(id="n4", hostname="h4", addr="10.0.0.4", api_port=2377, raft_port=2378,
              role=NodeRole.WORKER)
    st.apply({"op": "node_add", "now": 3.0, "node": to_dict(n4)})
    assert st.nodes["n4"].subnet == "10.99.1.0/24"  # released, then reused
    st.apply({"op": "node_add", "now": 4.0, "node": to_dict(n4)})  # re-add keeps it
    assert st.nodes["n4"].subnet == "10.99.1.0/24"


def test_service_vips_unique_and_published_ports_conflict_named() -> None:
    st = cluster(1, dict(SPEC, ports=[{"published": 8080, "target": 80}]))
    vip1 = st.services["s1"].vip
    res = st.apply({"op": "service_create", "id": "s2", "now": 1.0,
                    "spec": dict(SPEC, name="other",
                                 ports=[{"published": 8080, "target": 81}])})
    assert res["error"]["field"] == "endpoint.ports" and "already published by service web" in \
        res["error"]["message"]
    res = st.apply({"op": "service_create", "id": "s2", "now": 1.0,
                    "spec": dict(SPEC, name="other",
                                 ports=[{"published": 8080, "target": 81, "protocol": "udp"}])})
    assert "ok" in res and res["vip"] != vip1
    field = "endpoint.ports[0].published"
    res = st.apply({"op": "service_create", "id": "s4", "now": 1.0,
                    "spec": dict(SPEC, name="fourth", ports=[{"published": 0, "target": 80}])})
    assert "ok" in res  # 0: assigned by the state (Docker's `-p 80`)
    assigned = st.services["s4"].spec.endpoint.ports[0].published
    assert 30000 <= assigned <= 32767
    for bad in (-1, 70000, 2377):
        res = st.apply({"op": "service_create", "id": "s3", "now": 1.0,
                        "spec": dict(SPEC, name="third",
                                     ports=[{"published": bad, "target": 80}])})
        assert res["error"]["field"] == field, res


def test_cluster_cidr_validated_at_init() -> None:
    st = ClusterState()
    res = st.apply({"op": "cluster_init", "cluster_id": "c", "now": 1.0, "worker_secret": "",
                    "manager_secret": "", "digest": "", "cluster_cidr": "10.0.0.0/33"})
    assert res["error"]["field"] == "cluster_cidr"
    res = st.apply({"op": "cluster_init", "cluster_id": "c", "now": 1.0, "worker_secret": "",
                    "manager_secret": "", "digest": "", "cluster_cidr": "172.20.0.0/16"})
    assert "ok" in res and st.cluster.cluster_cidr == "172.20.0.0/16"
