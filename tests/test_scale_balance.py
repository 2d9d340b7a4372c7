"""A replicated service's scale-down by balance (node/orchestrator.py ``replica_slots``,
swarmkit's rule): the slots on the nodes with the most of the service's tasks go first, not
the highest numbers; their tasks are told REMOVE; the slots left may have holes, which a
restart, a lost node and a rolling update keep, and a scale-up fills from the lowest free
number. A cluster still on schema 8 drops the highest slots as before. The state machine and
the leader's passes in one process (no network, no root). Each test names the property it
checks.
"""

from __future__ import annotations

from typing import Any

from helpers import converge

from shoal.node.leader import plan_pass
from shoal.node.orchestrator import OrchestratorConfig, replica_slots, settled
from shoal.raft.models import Node, NodeRole, NodeState, Task, TaskState, to_dict
from shoal.raft.schema import SCHEMA
from shoal.raft.state import ClusterState

SPEC: dict[str, Any] = {"name": "web", "task": {"container": {"command": ["sleep", "9"]}}}


def _node(st: ClusterState, i: int) -> None:
    assert "ok" in st.apply({"op": "node_add", "now": 1.0, "node": to_dict(Node(
        id=f"n{i}", hostname=f"h{i}", addr=f"10.0.0.{i}", api_port=2377, raft_port=2378,
        role=NodeRole.WORKER, state=NodeState.READY))})


def _scale(st: ClusterState, n: int, now: float) -> None:
    assert "ok" in st.apply({"op": "service_update", "id": "s1", "now": now,
                             "replicas": n}), n
    converge(st, now)
    _run_all(st, now)


def _run_all(st: ClusterState, now: float) -> None:
    """Every placed task the leader wants running reports RUNNING; every one it told to stop
    reports SHUTDOWN (what their nodes' workers would say)."""
    for t in list(st.tasks.values()):
        if t.status.state.terminal or not t.node_id:
            continue
        state = TaskState.RUNNING if t.alive else TaskState.SHUTDOWN
        if state is not t.status.state:
            assert "ok" in st.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id,
                                     "now": now, "status": {"state": int(state),
                                                            "timestamp": now}})
    converge(st, now)


def _live(st: ClusterState) -> dict[int, str]:
    """slot → the node of its live task."""
    out: dict[int, str] = {}
    for t in st.tasks.values():
        if t.alive:
            assert t.slot not in out, f"two live tasks in slot {t.slot}"
            out[t.slot] = t.node_id
    return dict(sorted(out.items()))


def _lopsided(schema: int = SCHEMA) -> ClusterState:
    """Slots 1-3 on n1 (the only node when they were made), slot 4 on n2 (joined later)."""
    st = ClusterState()
    assert "ok" in st.apply({"op": "cluster_schema", "schema": schema})
    _node(st, 1)
    assert "ok" in st.apply({"op": "service_create", "id": "s1", "now": 1.0,
                             "spec": {**SPEC, "mode": {"replicas": 3}}})
    converge(st, 2.0)
    _run_all(st, 2.0)
    _node(st, 2)
    _scale(st, 4, 3.0)
    assert _live(st) == {1: "n1", 2: "n1", 3: "n1", 4: "n2"}
    return st


def test_scale_down_removes_the_slots_of_the_busiest_node_and_marks_them_remove() -> None:
    st = _lopsided()
    assert "ok" in st.apply({"op": "service_update", "id": "s1", "now": 4.0, "replicas": 2})
    converge(st, 4.0)
    gone = sorted(t.slot for t in st.tasks.values() if t.desired_state is TaskState.REMOVE)
    assert gone == [2, 3] and _live(st) == {1: "n1", 4: "n2"}  # (before: slots 3 and 4 went)
    _run_all(st, 4.0)  # (they stop; their slots keep no history)
    assert sorted(t.slot for t in st.tasks.values()) == [1, 4]
    snap = st.snapshot()
    ops, _ = plan_pass(snap, {n: 4.0 for n in snap.nodes}, 4.0, 4.0, OrchestratorConfig(),
                       liveness=False)
    assert ops == [] and settled(snap.services["s1"], list(snap.tasks.values()), set())


def test_scale_up_fills_the_lowest_free_slot_numbers() -> None:
    st = _lopsided()
    _scale(st, 2, 4.0)
    _scale(st, 4, 5.0)
    assert sorted(_live(st)) == [1, 2, 3, 4]
    _scale(st, 2, 6.0)
    _scale(st, 3, 7.0)
    assert sorted(_live(st)) in ([1, 2, 3], [1, 2, 4], [1, 3, 4])
    assert len(set(_live(st).values())) == 2  # (both nodes still used)


def test_a_failed_task_and_a_lost_node_keep_their_slot_number_in_a_slot_set_with_holes(
        ) -> None:
    """A restart replaces slot 4 in slot 4 (a volume named by {{.Task.Slot}} stays its own),
    not in the free number 2."""
    st = _lopsided()
    _scale(st, 2, 4.0)
    assert sorted(_live(st)) == [1, 4]
    (four,) = [t for t in st.tasks.values() if t.alive and t.slot == 4]
    assert "ok" in st.apply({"op": "task_status", "task_id": four.id, "node_id": four.node_id,
                             "now": 5.0, "status": {"state": int(TaskState.FAILED),
                                                    "timestamp": 5.0, "exit_code": 1}})
    converge(st, 20.0)  # (past the restart delay)
    _run_all(st, 20.0)
    assert sorted(_live(st)) == [1, 4] and four.id not in {
        t.id for t in st.tasks.values() if t.alive}
    # n2 goes down: its slot-4 task is orphaned and replaced in slot 4, on n1
    assert "ok" in st.apply({"op": "leader", "term": 1, "now": 21.0, "ops": [
        ("node_state", "n2", NodeState.DOWN.value, "test")]})
    converge(st, 21.0)
    _run_all(st, 21.0)
    assert _live(st) == {1: "n1", 4: "n1"}


def test_a_rolling_update_rolls_the_kept_slots_and_makes_none_in_the_holes() -> None:
    st = _lopsided()
    _scale(st, 2, 4.0)
    spec = {**SPEC, "mode": {"replicas": 2},
            "task": {"container": {"command": ["sleep", "10"]}}}
    assert "ok" in st.apply({"op": "service_update", "id": "s1", "now": 5.0, "spec": spec})
    for now in range(6, 16):  # (stop-first, parallelism 1: one slot at a time)
        _run_all(st, float(now))
    live = [t for t in st.tasks.values() if t.alive]
    assert sorted(t.slot for t in live) == [1, 4]
    assert all(t.spec.container.command == ("sleep", "10") for t in live), live
    assert st.services["s1"].update_status.state == "completed"


def test_a_running_slot_is_kept_before_one_whose_task_is_not_running() -> None:
    """Same count on every node: the slot without a running task goes first (then the
    highest number, as before)."""
    tasks = [_task(1, "n1", TaskState.RUNNING), _task(2, "n2", TaskState.RUNNING),
             _task(3, "n1", TaskState.STARTING), _task(4, "n2", TaskState.RUNNING)]
    assert replica_slots(3, tasks, lambda t: t.alive) == ({1, 2, 4}, {3})
    assert replica_slots(2, tasks, lambda t: t.alive) == ({1, 2}, {3, 4})
    # a slot whose task failed (waiting for its restart) still counts, and goes first
    failed = [*tasks[:2], _task(3, "n1", TaskState.FAILED)]
    assert replica_slots(2, failed, lambda t: t.alive) == ({1, 2}, {3})
    assert replica_slots(4, failed, lambda t: t.alive) == ({1, 2, 3, 4}, set())
    # schema 8: slots 1..replicas whatever runs where
    assert replica_slots(2, tasks, lambda t: t.alive, schema=8) == ({1, 2}, set())


def _task(slot: int, node: str, state: TaskState) -> Task:
    from shoal.raft.models import TaskStatus
    from shoal.raft.spec import TaskSpec

    return Task(id=f"t{slot}", service_id="s1", service_name="web", slot=slot, node_id=node,
                service_version=1,
                spec=TaskSpec(), status=TaskStatus(state=state))


def test_a_cluster_on_schema_8_drops_the_highest_slots() -> None:
    """A schema-8 leader refills holes and drops the highest slots: until every node reads
    schema 9, the leader does as they would."""
    st = _lopsided(schema=8)
    _scale(st, 2, 4.0)
    assert _live(st) == {1: "n1", 2: "n1"}
    assert not any(t.desired_state is TaskState.REMOVE for t in st.tasks.values())


def test_a_pass_that_also_changes_a_node_state_keeps_the_holes() -> None:
    """The leader applies a pass's node-state ops to a scratch copy before it reconciles:
    that copy carries the cluster's schema (before: schema 1, so any node coming back or
    going down made the pass refill the holes and stop slot 4's running task)."""
    st = _lopsided()
    _scale(st, 2, 4.0)
    assert "ok" in st.apply({"op": "node_add", "now": 5.0, "node": to_dict(Node(
        id="n3", hostname="h3", addr="10.0.0.3", api_port=2377, raft_port=2378,
        role=NodeRole.WORKER, state=NodeState.READY))})
    assert "ok" in st.apply({"op": "leader", "term": 1, "now": 5.0, "ops": [
        ("node_state", "n3", NodeState.DOWN.value, "test")]})
    snap = st.snapshot()  # n3 (no tasks) is heard from again: a liveness op in this pass
    ops, _ = plan_pass(snap, {n: 5.0 for n in snap.nodes}, 5.0, 5.0, OrchestratorConfig())
    assert [op[0] for op in ops] == ["node_state"], ops
    # and n2 lost: slot 4 is replaced in slot 4 in the same pass that takes n2 down
    snap = st.snapshot()
    ops, _ = plan_pass(snap, {"n1": 30.0, "n2": 0.0, "n3": 30.0}, 30.0, 30.0,
                       OrchestratorConfig())
    assert ("node_state", "n2", NodeState.DOWN.value) in [op[:3] for op in ops], ops
    assert [op[1]["slot"] for op in ops if op[0] == "create"] == [4], ops


def test_the_cli_progress_numbers_slots_by_position_and_hides_the_removed() -> None:
    """`service scale` waits with one line per slot: 1/N..N/N as Docker's CLI (slots 1 and
    4 after a scale-down), not the slots going away (before: "2/2" was the removed slot 2's
    task still stopping, and slot 4 was never shown)."""
    from shoal.cli.progress import _slot_lines

    def task(slot: int, desired: str, state: str) -> dict[str, Any]:
        return {"slot": slot, "desired_state": desired, "state": state, "created_at": slot,
                "node": "h1", "node_id": "n1"}

    svc = {"mode": "replicated", "replicas": 2}
    tasks = [task(1, "running", "running"), task(2, "remove", "running"),
             task(3, "remove", "shutdown"), task(4, "running", "starting")]
    assert _slot_lines(svc, tasks) == ["1/2: running", "2/2: starting"]
    # a cluster on schema 8: the highest slots go, told shutdown
    old = [task(1, "running", "running"), task(2, "running", "running"),
           task(3, "shutdown", "running")]
    assert _slot_lines(svc, old) == ["1/2: running", "2/2: running"]
    # an ended task of an older run in a lower slot does not take a live slot's line
    ended = [task(1, "running", "running"), task(2, "shutdown", "failed"),
             task(5, "running", "starting")]
    assert _slot_lines(svc, ended) == ["1/2: running", "2/2: starting"]


def test_start_first_updates_never_pile_tasks_up_in_a_slot() -> None:
    """An update that comes while an earlier start-first update's replacement never started
    (no room: max one per node here) makes that replacement an old task too: the slot keeps
    its most advanced old task and one new one (before: every update added a live task to
    the slot, 9 for 2 replicas in the reviewer's run, none ever stopped)."""
    st = ClusterState()
    assert "ok" in st.apply({"op": "cluster_schema", "schema": SCHEMA})
    _node(st, 1)
    spec: dict[str, Any] = {**SPEC, "mode": {"replicas": 1},
                            "update": {"order": "start-first"},
                            "task": {"container": {"command": ["sleep", "1"]},
                                     "placement": {"max_replicas": 1}}}
    assert "ok" in st.apply({"op": "service_create", "id": "s1", "now": 1.0, "spec": spec})
    converge(st, 2.0)
    _run_all(st, 2.0)
    for i in range(2, 6):
        spec["task"]["container"]["command"] = ["sleep", str(i)]
        assert "ok" in st.apply({"op": "service_update", "id": "s1", "now": 2.0 + i,
                                 "spec": spec})
        _run_all(st, 2.0 + i)
        live = [t for t in st.tasks.values() if t.alive]
        assert len(live) <= 2, [(t.slot, t.spec.container.command, t.status.state)
                                for t in live]
    # the one that runs is the first, still serving; the newest waits for room
    running = [t for t in st.tasks.values() if t.status.state is TaskState.RUNNING]
    assert [t.spec.container.command for t in running] == [("sleep", "1")]
