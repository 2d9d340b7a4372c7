"""Placement constraints as pure code: validation, the scheduler's filter, the orchestrator's
enforcement and the CLI's --constraint-add/--constraint-rm. No network, no processes."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgpack
import pytest

from shoal.cli import specflags
from shoal.cli.errors import CliError
from shoal.cli.main import build_parser
from shoal.node.leader import PassIndex, plan_pass
from shoal.node.orchestrator import OrchestratorConfig, outdated
from shoal.node.scheduler import (
    FAILURE_WINDOW,
    FAILURES_TO_AVOID,
    avoided_nodes,
    schedule,
    unsatisfied,
)
from shoal.raft.errors import ValidationError
from shoal.raft.models import (
    Node,
    NodeRole,
    NodeState,
    Task,
    TaskState,
    spec_from_dict,
    task_from_dict,
    to_dict,
)
from shoal.raft.state import ClusterState
from shoal.raft.validate import validate_spec

SPEC: dict[str, Any] = {"name": "web", "command": ["sleep", "100"], "replicas": 1}


def node(i: int, role: NodeRole = NodeRole.WORKER, **labels: str) -> Node:
    return Node(id=f"n{i}", hostname=f"h{i}", addr=f"10.0.0.{i}", api_port=2377,
                raft_port=2378, role=role, state=NodeState.READY, labels=labels)


def cluster(nodes: list[Node], spec: dict[str, Any]) -> ClusterState:
    st = ClusterState()
    for n in nodes:
        assert "ok" in st.apply({"op": "node_add", "now": 1.0, "node": to_dict(n)})
    res = st.apply({"op": "service_create", "id": "s1", "now": 1.0, "spec": spec})
    assert "ok" in res, res
    return st


def converge(st: ClusterState, now: float = 10.0, rounds: int = 5) -> None:
    seen = {nid: now for nid in st.nodes}
    for _ in range(rounds):
        ops, _ = plan_pass(st.snapshot(), seen, now, now, OrchestratorConfig(), liveness=False)
        if not ops:
            return
        res = st.apply({"op": "leader", "term": 1, "now": now, "ops": ops})
        assert "ok" in res, res


def settle(st: ClusterState, now: float = 10.0) -> None:
    """Agents do what they are told: assigned tasks run, tasks told to stop stop."""
    for t in list(st.tasks.values()):
        if not t.node_id or t.status.state.terminal:
            continue
        state = TaskState.SHUTDOWN if t.desired_state >= TaskState.SHUTDOWN else \
            TaskState.RUNNING
        if t.status.state != state:
            st.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id, "now": now,
                      "status": {"state": int(state), "timestamp": now}})


def live(st: ClusterState) -> list[Task]:
    return sorted((t for t in st.tasks.values() if t.alive), key=lambda t: t.slot)


def set_labels(st: ClusterState, node_id: str, now: float, **labels: str) -> None:
    assert "ok" in st.apply({"op": "node_update", "id": node_id, "now": now,
                             "labels": labels})


# ------------------------------------------------------------------ validation
def test_constraints_are_validated_with_the_entry_named() -> None:
    st = ClusterState()
    for bad, words in (("node.role=manager", "no operator"),
                       ("node.zone==b", "unsupported key 'node.zone'"),
                       ("engine.labels.os==linux", "no engine labels"),
                       ("node.role==boss", "manager or worker"),
                       ("node.labels.zone==", "invalid value"),
                       ("node.labels.==b", "node.labels.NAME"),
                       ("node.ip==banana", "CIDR")):
        res = st.apply({"op": "service_create", "id": "s", "now": 1.0,
                        "spec": dict(SPEC, constraints=["node.role==manager", bad])})
        err = res["error"]
        field = "task.placement.constraints[1]"
        assert err["code"] == "invalid" and err["field"] == field, err
        assert err["message"].startswith(f"{field}: ") and words in err["message"], err
    res = st.apply({"op": "service_create", "id": "s", "now": 1.0,
                    "spec": dict(SPEC, constraints="node.role==manager")})
    assert res["error"]["field"] == "task.placement.constraints"
    assert not st.services


def test_constraints_are_stored_canonical_and_without_duplicates() -> None:
    spec = validate_spec(dict(SPEC, constraints=[
        " Node.Labels.Zone == b", "node.ROLE!=Worker", "node.labels.Zone==b",
        "node.ip==10.0.0.0/24", "node.hostname==h1", "node.id==n1", "node.platform.os==linux"]))
    assert spec.task.placement.constraints == ("node.labels.Zone==b", "node.role!=worker",
                                "node.ip==10.0.0.0/24", "node.hostname==h1", "node.id==n1",
                                "node.platform.os==linux")


def test_old_specs_without_constraints_still_load_and_new_ones_survive_msgpack() -> None:
    old = {"name": "web", "command": ["x"], "replicas": 2}  # written before constraints
    assert spec_from_dict(old).task.placement.constraints == ()
    spec = validate_spec(dict(SPEC, constraints=["node.labels.zone==b"]))
    blob = msgpack.packb(to_dict(spec))
    assert spec_from_dict(msgpack.unpackb(blob, raw=False)) == spec
    task = Task(id="t1", service_id="s1", service_name="web", slot=1, spec=spec,
                service_version=1)
    back = msgpack.unpackb(msgpack.packb(to_dict(task)), raw=False)
    assert task_from_dict(back).spec.placement.constraints == ("node.labels.zone==b",)


# ------------------------------------------------------------------ matching
@pytest.mark.parametrize(("expr", "matching"), [
    ("node.labels.zone==b", {"n2"}),
    ("node.labels.zone==B", {"n2"}),  # values compare case-insensitively (Swarm)
    ("node.labels.zone!=b", {"n1", "n3"}),  # a node without the label has the empty value
    ("node.labels.Zone==b", set()),  # label names are case-sensitive
    ("node.role==manager", {"n1"}),
    ("node.role!=manager", {"n2", "n3"}),
    ("node.hostname==h3", {"n3"}),
    ("node.hostname!=h3", {"n1", "n2"}),
    ("node.id==n2", {"n2"}),
    ("node.ip==10.0.0.1", {"n1"}),
    ("node.ip!=10.0.0.0/31", {"n2", "n3"}),
    ("node.platform.os==linux", {"n1", "n2", "n3"}),
])
def test_constraint_matching(expr: str, matching: set[str]) -> None:
    nodes = [node(1, NodeRole.MANAGER, zone="a"), node(2, zone="b"), node(3)]
    constraints = validate_spec(dict(SPEC, constraints=[expr])).task.placement.constraints
    assert {n.id for n in nodes if unsatisfied(n, constraints) is None} == matching


def test_a_stored_constraint_this_version_cannot_read_never_holds() -> None:
    """Specs are validated before they are replicated, but a newer version may write a key
    this one does not know: its tasks must wait rather than run anywhere."""
    c = unsatisfied(node(1), ("node.platform.variant==v8",))
    assert c is not None and str(c) == "node.platform.variant==v8"
    assert unsatisfied(node(1), ("node.platform.variant!=v8",)) is not None


@pytest.mark.parametrize(("expr", "matching"), [
    ("node.platform.arch==aarch64", {"n2"}),
    ("node.platform.arch==AArch64", {"n2"}),  # values compare case-insensitively (Swarm)
    ("Node.Platform.Arch == x86_64", {"n1"}),  # keys too
    ("node.platform.arch!=x86_64", {"n2", "n3"}),  # not reported: "" is not x86_64
    ("node.platform.arch!=aarch64", {"n1", "n3"}),
])
def test_arch_constraints_match_the_architecture_each_node_reported(
        expr: str, matching: set[str]) -> None:
    """Swarm's node.platform.arch against ``Node.arch`` (``uname -m``); n3 reported none
    (it joined below schema 11): no ``==`` matches it, every ``!=`` does."""
    nodes = [replace(node(1), arch="x86_64"), replace(node(2), arch="aarch64"), node(3)]
    constraints = validate_spec(dict(SPEC, constraints=[expr])).task.placement.constraints
    assert constraints == (expr.replace(" ", "").replace("Node.Platform.Arch",
                                                         "node.platform.arch"),)
    assert {n.id for n in nodes if unsatisfied(n, constraints) is None} == matching


# ------------------------------------------------------------------ scheduler
def test_scheduler_places_only_on_nodes_satisfying_every_constraint() -> None:
    nodes = [node(1, NodeRole.MANAGER, zone="b"), node(2, zone="b", disk="ssd"),
             node(3, zone="b"), node(4, disk="ssd")]
    st = cluster(nodes, dict(SPEC, replicas=4,
                             constraints=["node.labels.zone==b", "node.role==worker"]))
    converge(st)
    assert {t.node_id for t in live(st)} == {"n2", "n3"}
    assert all(t.node_id for t in live(st))


def test_unsatisfiable_task_stays_pending_naming_the_constraint() -> None:
    st = cluster([node(1), node(2), node(3)], dict(SPEC, constraints=["node.labels.zone==b"]))
    converge(st)
    (t,) = live(st)
    assert not t.node_id and t.status.state is TaskState.PENDING
    assert t.sched_message == t.status.message == "no node satisfies node.labels.zone==b"


def test_unschedulable_reason_counts_constraints_with_other_filters() -> None:
    st = cluster([node(1, zone="b"), node(2), node(3)],
                 dict(SPEC, constraints=["node.labels.zone==b"]))
    st.apply({"op": "leader", "term": 1, "now": 2.0,
              "ops": [("node_state", "n1", "down", "test")]})
    converge(st)
    (t,) = live(st)
    assert t.status.message == \
        "no suitable node (constraint node.labels.zone==b 2/3, not ready 1/3)"
    # two constraints failing on different nodes: none satisfies both
    st = cluster([node(1, zone="b"), node(2, disk="ssd")],
                 dict(SPEC, constraints=["node.labels.zone==b", "node.labels.disk==ssd"]))
    pending = [task_from_dict(to_dict(Task(id="t1", service_id="s1", service_name="web",
                                           slot=1, spec=st.services["s1"].spec,
                                           service_version=1)))]
    plan = schedule(st.snapshot(), pending)
    assert plan.unschedulable == [("t1", "no node satisfies node.labels.zone==b and "
                                   "node.labels.disk==ssd (constraint node.labels.disk==ssd "
                                   "1/2, constraint node.labels.zone==b 1/2)")]


def test_pending_task_is_placed_once_a_node_gets_the_label() -> None:
    st = cluster([node(1), node(2), node(3)], dict(SPEC, constraints=["node.labels.zone==b"]))
    converge(st)
    assert not live(st)[0].node_id
    set_labels(st, "n3", 11.0, zone="b")
    converge(st, now=11.0)
    (t,) = live(st)
    assert t.node_id == "n3" and t.sched_message == ""


# ------------------------------------------------------------------ orchestrator
def test_label_removed_task_moves_to_a_node_that_still_satisfies() -> None:
    st = cluster([node(1, zone="b"), node(2, zone="b"), node(3)],
                 dict(SPEC, replicas=2, constraints=["node.labels.zone==b"]))
    converge(st)
    settle(st)
    assert {t.node_id for t in live(st)} == {"n1", "n2"}
    set_labels(st, "n3", 20.0, zone="b")
    set_labels(st, "n1", 20.0)  # n1 leaves zone b
    gone = [t.id for t in live(st) if t.node_id == "n1"]
    converge(st, now=20.0)
    assert st.tasks[gone[0]].desired_state is TaskState.SHUTDOWN
    settle(st, 21.0)  # (its replacement waits until it stopped)
    converge(st, now=21.0)
    settle(st, 21.0)
    assert {t.node_id for t in live(st)} == {"n2", "n3"}
    assert all(t.status.state is TaskState.RUNNING for t in live(st))


def test_label_removed_with_no_other_node_leaves_the_task_pending() -> None:
    st = cluster([node(1, zone="b"), node(2)], dict(SPEC, constraints=["node.labels.zone==b"]))
    converge(st)
    settle(st)
    first = live(st)[0]
    assert first.node_id == "n1"
    set_labels(st, "n1", 20.0, zone="a")
    converge(st, now=20.0)
    assert st.tasks[first.id].desired_state is TaskState.SHUTDOWN
    assert live(st) == []  # the replacement waits until it stopped
    settle(st, 20.0)
    converge(st, now=20.0)
    (t,) = live(st)
    assert t.id != first.id and not t.node_id
    assert t.status.message == "no node satisfies node.labels.zone==b"
    set_labels(st, "n2", 30.0, zone="b")  # and it runs as soon as a node qualifies
    converge(st, now=30.0)
    assert live(st)[0].node_id == "n2"


def test_tasks_without_constraints_ignore_label_changes() -> None:
    st = cluster([node(1, zone="b"), node(2)], dict(SPEC, replicas=2))
    converge(st)
    settle(st)
    before = {t.id for t in live(st)}
    set_labels(st, "n1", 20.0)
    converge(st, now=20.0)
    assert {t.id for t in live(st)} == before


def test_constraint_add_moves_only_violating_tasks_through_the_rolling_update() -> None:
    """`service update --constraint-add` is a spec change, so the rolling update moves the
    tasks (update_parallelism at a time, stop-first); tasks on nodes that satisfy the new
    constraint stay (swarmkit: a placement-only change is not dirty on a matching node)."""
    nodes = [node(1, zone="b"), node(2, zone="b"), node(3), node(4)]
    st = cluster(nodes, dict(SPEC, replicas=4))
    converge(st)
    settle(st)
    assert {t.node_id for t in live(st)} == {"n1", "n2", "n3", "n4"}
    kept = {t.id for t in live(st) if t.node_id in ("n1", "n2")}
    res = st.apply({"op": "service_update", "id": "s1", "now": 20.0,
                    "spec": dict(SPEC, replicas=4, constraints=["node.labels.zone==b"])})
    assert res.get("version") == 2
    now = 20.0
    for _ in range(8):
        converge(st, now=now, rounds=1)
        stopping = [t for t in st.tasks.values()
                    if t.desired_state >= TaskState.SHUTDOWN and not t.status.state.terminal]
        assert len(stopping) <= 1  # update_parallelism 1
        settle(st, now)
        now += 1
    tasks = live(st)
    assert len(tasks) == 4 and {t.node_id for t in tasks} == {"n1", "n2"}
    assert kept <= {t.id for t in tasks}  # never restarted
    # removing the constraint again moves nothing
    st.apply({"op": "service_update", "id": "s1", "now": now, "spec": dict(SPEC, replicas=4)})
    converge(st, now=now)
    assert {t.id for t in live(st)} == {t.id for t in tasks}


def test_a_task_kept_by_a_constraint_change_is_held_to_the_current_constraints() -> None:
    """A task kept through a constraint-only update still carries its old constraints; a
    label change that breaks only those leaves it running (the current spec allows its
    node); one that breaks the current constraints too moves it."""
    st = cluster([node(1, zone="a", disk="ssd"), node(2, disk="ssd")],
                 dict(SPEC, constraints=["node.labels.zone==a"]))
    converge(st)
    settle(st)
    (t,) = live(st)
    st.apply({"op": "service_update", "id": "s1", "now": 20.0,
              "spec": dict(SPEC, constraints=["node.labels.disk==ssd"])})
    converge(st, now=20.0)
    assert [x.id for x in live(st)] == [t.id]  # n1 satisfies disk==ssd: not redeployed
    set_labels(st, "n1", 21.0, disk="ssd")  # zone removed: only the old constraint breaks
    converge(st, now=21.0)
    assert [x.id for x in live(st)] == [t.id]
    set_labels(st, "n1", 22.0)  # disk removed too
    converge(st, now=22.0)
    settle(st, 22.0)
    converge(st, now=22.0)
    settle(st, 22.0)
    (moved,) = live(st)
    assert moved.id != t.id and moved.node_id == "n2"
    assert moved.spec.placement.constraints == ("node.labels.disk==ssd",)


def test_update_of_tasks_still_waiting_for_a_node_does_not_stall() -> None:
    """Tasks pending on an unsatisfiable constraint are replaced by `--constraint-rm`: a task
    stopped before it was ever placed is forgotten at once (nothing runs), so it does not
    hold up the rolling update nor linger in `service ps`."""
    st = cluster([node(1), node(2)],
                 dict(SPEC, replicas=3, constraints=["node.labels.zone==b"]))
    converge(st)
    assert [t.node_id for t in live(st)] == ["", "", ""]
    st.apply({"op": "service_update", "id": "s1", "now": 20.0, "spec": dict(SPEC, replicas=3)})
    now = 20.0
    for _ in range(6):
        converge(st, now=now)
        settle(st, now)
        now += 1
    tasks = live(st)
    assert len(tasks) == 3 and all(t.node_id and t.spec.placement.constraints == () for t in tasks)
    assert len(st.tasks) == 3  # the never-placed ones are gone


def test_outdated_forgives_constraint_only_changes_on_satisfying_nodes() -> None:
    base = validate_spec(dict(SPEC, constraints=["node.role==worker"]))
    task = Task(id="t", service_id="s1", service_name="web", slot=1, spec=base.task,
                service_version=1, node_id="n1")
    zoned = validate_spec(dict(SPEC, constraints=["node.labels.zone==b"]))
    assert not outdated(task, zoned.task, node(1, zone="b"))
    assert outdated(task, zoned.task, node(1))
    assert outdated(task, zoned.task)  # unknown node: replace it
    other = validate_spec(dict(SPEC, env={"V": "2"}, constraints=["node.labels.zone==b"]))
    assert outdated(task, other.task, node(1, zone="b"))  # any other change redeploys


# ------------------------------------------------------------------ CLI
def test_cli_constraint_flags() -> None:
    args = build_parser().parse_args([
        "service", "create", "--name", "web", "--constraint", "node.labels.zone==b",
        "--constraint", "node.role!=manager", "--", "sleep", "1"])
    spec = specflags.spec_from_create_args(args)
    assert spec["task"]["placement"]["constraints"] == ["node.labels.zone==b",
                                                        "node.role!=manager"]
    current = to_dict(validate_spec(spec))

    def update(*flags: str) -> list[str]:
        args = build_parser().parse_args(["service", "update", *flags, "web"])
        new = specflags.apply_update_args(current, args)
        return list(new["task"]["placement"]["constraints"])

    assert update("--constraint-add", "node.labels.disk==ssd", "--constraint-rm",
                  "node.role != manager") == ["node.labels.zone==b", "node.labels.disk==ssd"]
    # a removal wins over an addition of the same constraint; unknown removals are ignored
    assert update("--constraint-add", "node.id==x", "--constraint-rm", "node.id == x",
                  "--constraint-rm", "node.id==y") == ["node.labels.zone==b",
                                                       "node.role!=manager"]
    with pytest.raises(CliError, match="--constraint-add: 'zone' has no operator"):
        update("--constraint-add", "zone")


def test_validation_error_type_names_field() -> None:
    with pytest.raises(ValidationError) as exc:
        validate_spec(dict(SPEC, constraints=["node.labels.zone==b", 3]))
    assert exc.value.field == "task.placement.constraints[1]"



def _fail_running(st: ClusterState, now: float) -> None:
    for t in list(st.tasks.values()):
        if t.node_id and t.status.state is TaskState.RUNNING:
            assert "ok" in st.apply({"op": "task_status", "task_id": t.id,
                                     "node_id": t.node_id, "now": now, "status": {
                                         "state": int(TaskState.FAILED), "timestamp": now,
                                         "err": "exit 1", "exit_code": 1}})


@pytest.mark.parametrize("indexed", [False, True])
def test_a_node_where_the_task_keeps_failing_is_tried_last(indexed: bool) -> None:
    """swarmkit's "recent failures": a crash-looping task was placed back on the node its
    failed task left every time (no task of the service there any more, fewest tasks in
    total, lowest id), while it failed only there — 66 times in a row in a review's lab.
    Once FAILURES_TO_AVOID of the current version failed on a node within the window, its
    replacement goes elsewhere; a new version starts afresh."""
    spec = {"name": "web", "mode": {"replicas": 1}, "task": {
        "container": {"command": ["sleep", "100"]}, "restart": {"delay": 0}}}
    st = cluster([node(1), node(2), node(3)], spec)
    index = PassIndex() if indexed else None
    now = 10.0

    def step() -> list[str]:
        """Passes and the agents' answers until nothing changes; the live tasks' nodes."""
        for _ in range(6):
            seen = {nid: now for nid in st.nodes}
            ops, _ = plan_pass(st.snapshot(), seen, now, now, OrchestratorConfig(),
                               index=index)
            if ops:
                assert "ok" in st.apply({"op": "leader", "term": 1, "now": now, "ops": ops})
            settle(st, now)
        return [t.node_id for t in live(st)]

    assert step() == ["n1"]
    for i in range(FAILURES_TO_AVOID - 1):  # (the ranking favours the node its task left)
        now += 1
        _fail_running(st, now)
        assert step() == ["n1"], i
    now += 1
    _fail_running(st, now)
    assert step() == ["n2"]  # n1 failed it FAILURES_TO_AVOID times: tried last now
    now += 1
    assert "ok" in st.apply({"op": "service_update", "id": "s1", "now": now, "spec": {
        **spec, "task": {**spec["task"], "container": {"command": ["sleep", "200"]}}}})
    assert step() == ["n1"]  # a new version: n1's failures were the old one's


def test_avoided_nodes_counts_the_current_versions_recent_failures_only() -> None:
    st = cluster([node(1), node(2)], SPEC)
    converge(st)
    (t,) = live(st)
    svc = st.services["s1"]
    fails = [replace(t, id=f"f{i}", node_id="n2", status=replace(
        t.status, state=TaskState.FAILED, timestamp=1000.0 + i))
        for i in range(FAILURES_TO_AVOID)]
    tasks = {"s1": fails}
    assert avoided_nodes(st.services, ["s1"], lambda sid: tasks.get(sid, []), 1010.0) == \
        {"s1": frozenset({"n2"})}
    assert avoided_nodes(st.services, ["s1"], lambda sid: tasks.get(sid, []),
                         1000.0 + FAILURE_WINDOW + 1) == {}  # the first aged out
    tasks = {"s1": [replace(f, service_version=svc.version - 1) for f in fails]}
    assert avoided_nodes(st.services, ["s1"], lambda sid: tasks.get(sid, []), 1010.0) == {}


def test_a_task_told_to_stop_holds_its_node_until_it_ended() -> None:
    """Its reservation and its place (max replicas per node) were freed when it was *told*
    to stop: a new task was placed into a node the stopping one still filled, for its whole
    stop grace period (swarmkit frees them once the task is observed past running)."""
    full = Node(id="n1", hostname="h1", addr="10.0.0.1", api_port=2377, raft_port=2378,
                role=NodeRole.WORKER, state=NodeState.READY, memory_bytes=1 << 30)
    st = cluster([full], {"name": "big", "mode": {"replicas": 1}, "task": {
        "container": {"command": ["sleep", "1"]},
        "resources": {"reservations": {"memory": 1 << 30}}}})
    converge(st)
    settle(st)
    (old,) = live(st)
    assert "ok" in st.apply({"op": "service_create", "id": "s2", "now": 11.0, "spec": {
        "name": "next", "mode": {"replicas": 1}, "task": {
            "container": {"command": ["sleep", "1"]},
            "resources": {"reservations": {"memory": 1 << 30}}}}})
    assert "ok" in st.apply({"op": "service_update", "id": "s1", "now": 11.0, "replicas": 0})
    converge(st, now=12.0)
    assert st.tasks[old.id].status.state is TaskState.RUNNING  # (still stopping)
    (waiting,) = [t for t in st.tasks.values() if t.service_id == "s2"]
    assert not waiting.node_id and "insufficient memory" in waiting.sched_message
    settle(st, now=13.0)  # it reports its end
    converge(st, now=14.0)
    (placed,) = [t for t in st.tasks.values() if t.service_id == "s2"]
    assert placed.node_id == "n1"
