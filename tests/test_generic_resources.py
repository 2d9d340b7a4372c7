"""Generic resources (Swarm's ``--generic-resource``) without a cluster: the spec's and the
node's rules, the CLI flags and Compose's form, the schema-10 gate, the scheduler's
filter and accounting, and the worker's choice of named IDs — through the control plane in
one process (tests/test_modes.py's Lab: `service create`, the leader's pass, each node's
worker on its fake runtime). Each test names the property it checks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from test_modes import Lab

from shoal.cli import specflags
from shoal.cli.compose import ComposeError, load_stack
from shoal.cli.errors import CliError
from shoal.cli.main import build_parser
from shoal.node.context import VoterChanges
from shoal.node.control.nodes import Nodes
from shoal.node.errors import BadRequest
from shoal.node.generic import claim
from shoal.node.membership import GossipControl
from shoal.node.scheduler import schedule
from shoal.node.security import Security
from shoal.node.worker import Worker
from shoal.raft import generic
from shoal.raft.errors import ValidationError
from shoal.raft.models import Node, NodeRole, TaskState, node_from_dict, to_dict
from shoal.raft.schema import SCHEMA, encode_command
from shoal.raft.state import ClusterState
from shoal.raft.validate import validate_spec
from shoal.runtime.errors import StartError
from shoal.runtime.records import RuntimeStatus
from shoal.runtime.testing import FakeController


def _spec(res: Any, **mode: Any) -> dict[str, Any]:
    return {"name": "gpu", "mode": mode or {"replicas": 1},
            "task": {"container": {"command": ["train"]},
                     "resources": {"reservations": {"generic_resources": res}}}}


# ----------------------------------------------------------------------- rules and flags

@pytest.mark.parametrize(("res", "says"), [
    ({"bad kind": 1}, "invalid kind 'bad kind'"),
    ({"-gpu": 1}, "invalid kind '-gpu'"),
    ({"g" * 64: 1}, "at most 63"),
    ({"gpu": 0}, "gpu: the count must be a whole number from 1"),
    ({"gpu": 1, "GPU": 1}, "kind 'GPU' given twice (kinds ignore case)"),
    ({"gpu": "1"}, "expected `int`"),
])
def test_a_bad_generic_reservation_is_refused_naming_the_field(res: Any, says: str) -> None:
    with pytest.raises(ValidationError) as exc:
        validate_spec(_spec(res))
    assert exc.value.field.startswith("task.resources.reservations.generic_resources")
    assert says in exc.value.message


def test_service_flags_reserve_counts_and_update_adds_and_removes_ignoring_case() -> None:
    args = build_parser().parse_args(["service", "create", "--name", "t", "--generic-resource",
                                      "gpu=1", "--generic-resource", "SSD=2", "busybox"])
    spec = validate_spec(specflags.spec_from_create_args(args))
    assert spec.task.resources.reservations.generic_resources == {"gpu": 1, "SSD": 2}
    args = build_parser().parse_args(["service", "update", "--generic-resource-add", "GPU=3",
                                      "--generic-resource-rm", "ssd", "t"])
    new = validate_spec(specflags.apply_update_args(to_dict(spec), args))
    assert new.task.resources.reservations.generic_resources == {"GPU": 3}
    for bad in ("gpu=x", "gpu=0", "gpu"):
        with pytest.raises(CliError, match="--generic-resource"):
            specflags.spec_from_create_args(build_parser().parse_args(
                ["service", "create", "--generic-resource", bad, "busybox"]))


def test_node_update_flags_go_to_the_api_as_given() -> None:
    args = build_parser().parse_args(["node", "update", "--generic-resource-add", "GPU=a",
                                      "--generic-resource-add", "GPU=b",
                                      "--generic-resource-rm", "ssd", "h2"])
    assert (args.generic_resource_add, args.generic_resource_rm) == (["GPU=a", "GPU=b"],
                                                                     ["ssd"])


def test_compose_generic_resources_and_a_malformed_entry_named_by_its_path(
        tmp_path: Path) -> None:
    f = tmp_path / "c.yml"
    f.write_text("services:\n  web:\n    image: busybox\n    deploy:\n      resources:\n"
                 "        reservations:\n          generic_resources:\n"
                 "            - discrete_resource_spec: {kind: gpu, value: 2}\n"
                 "            - discrete_resource_spec: {kind: SSD, value: 1}\n")
    (svc,) = load_stack("s", [f]).services
    assert svc.task.resources.reservations.generic_resources == {"gpu": 2, "SSD": 1}
    path = "services.web.deploy.resources.reservations.generic_resources"
    for entry, where in (("- named_resource_spec: {kind: gpu, value: a}", f"{path}[0]"),
                         ("- discrete_resource_spec: {kind: gpu}",
                          f"{path}[0].discrete_resource_spec"),
                         ("- discrete_resource_spec: {kind: gpu, value: x}",
                          f"{path}[0].discrete_resource_spec.value"),
                         ("- discrete_resource_spec: {kind: 'a b', value: 1}", path)):
        f.write_text("services:\n  web:\n    image: busybox\n    deploy:\n      resources:\n"
                     f"        reservations:\n          generic_resources:\n            {entry}\n")
        with pytest.raises(ComposeError) as exc:
            load_stack("s", [f])
        assert str(exc.value).startswith(where + ":"), str(exc.value)


def test_node_update_adds_named_ids_and_counts_and_refuses_mixing_them() -> None:
    res = generic.updated({}, ["GPU=a", "GPU=b", "ssd=3", "gpu=c"], [])
    assert res == {"GPU": ["a", "b", "c"], "ssd": 3}
    assert generic.updated(res, ["SSD=1"], ["gpu=b"]) == {"GPU": ["a", "c"], "ssd": 1}
    assert generic.updated(res, [], ["GPU"]) == {"ssd": 3}
    for add, rm, field, says in (
            (["GPU=4"], [], "generic_resource_add", "holds named IDs"),
            (["ssd=x"], [], "generic_resource_add", "is a count on this node"),
            (["bad kind=1"], [], "generic_resource_add", "invalid kind"),
            (["gpu="], [], "generic_resource_add", "expected KIND=VALUE"),
            (["gpu=a b"], [], "generic_resource_add", "invalid ID"),
            ([], ["fpga"], "generic_resource_rm", "has no generic resource 'fpga'"),
            ([], ["gpu=z"], "generic_resource_rm", "has no ID 'z'")):
        with pytest.raises(ValidationError) as exc:
            generic.updated(res, add, rm)
        assert exc.value.field == field and says in exc.value.message, exc.value.message


def test_the_node_update_command_is_checked_and_applied_and_records_without_it_read() -> None:
    st = ClusterState()
    st.apply({"op": "cluster_init", "cluster_id": "c", "now": 1.0, "worker_secret": "w",
              "manager_secret": "m", "digest": "d", "schema": SCHEMA})
    node = Node(id="n1", hostname="h1", addr="10.0.0.1", api_port=1, raft_port=2,
                role=NodeRole.MANAGER)
    assert "ok" in st.apply({"op": "node_add", "now": 1.0, "node": to_dict(node)})
    bads: tuple[Any, ...] = ({"gpu": []}, {"gpu": -1}, {"gpu": ["a", "a"]}, {"gpu": 1, "GPU": 2},
                             "x")
    for bad in bads:
        err = st.apply({"op": "node_update", "id": "n1", "now": 2.0,
                        "generic_resources": bad})["error"]
        assert err["field"].startswith("generic_resources"), err
    assert st.nodes["n1"].generic_resources == {}
    assert "ok" in st.apply({"op": "node_update", "id": "n1", "now": 2.0,
                             "generic_resources": {"GPU": ["a", "b"], "ssd": 2}})
    assert st.nodes["n1"].generic_resources == {"GPU": ["a", "b"], "ssd": 2}
    plain = to_dict(st.nodes["n1"])
    assert node_from_dict(plain) == st.nodes["n1"]
    from shoal.raft.wire import state_from_bytes, state_to_bytes
    assert state_from_bytes(state_to_bytes(st)).nodes == st.nodes  # (a snapshot, a dump)
    del plain["generic_resources"]  # (a record written before schema 10)
    assert node_from_dict(plain).generic_resources == {}
    assert node_from_dict({**plain, "generic_resources": {"x": {"?": 1}}}).generic_resources \
        == {}


def test_schema_10s_generic_resources_wait_for_every_node_to_read_them() -> None:
    """A schema-9 replica's decoder does not know the spec field: refused naming it on
    propose and by the state machine. Its state machine applies a node update or a node add
    without the node's resources: refused naming the field on propose, and today's state
    machine applies such a command as the schema-9 one does (without them), so every
    replica holds the same record; at schema 10 they are written and applied."""
    cmd = {"op": "service_create", "id": "s1", "now": 1.0, "spec": _spec({"gpu": 1})}
    field = "task.resources.reservations.generic_resources"
    with pytest.raises(ValidationError) as exc:
        encode_command(cmd, {}, 9)
    assert exc.value.field == field and "schema 10" in exc.value.message
    st = ClusterState()
    st.apply({"op": "cluster_init", "cluster_id": "c", "now": 1.0, "worker_secret": "w",
              "manager_secret": "m", "digest": "d", "schema": 9})
    node = Node(id="n1", hostname="h1", addr="10.0.0.1", api_port=1, raft_port=2,
                role=NodeRole.MANAGER)
    st.apply({"op": "node_add", "now": 1.0, "node": to_dict(node)})
    assert st.apply(cmd)["error"]["field"] == field
    update = {"op": "node_update", "id": "n1", "now": 2.0, "generic_resources": {"gpu": 1},
              "labels": {"zone": "b"}}
    joined = {"op": "node_add", "now": 2.0, "node": {**to_dict(node), "id": "n2",
                                                     "addr": "10.0.0.2",
                                                     "generic_resources": {"ssd": 2}}}
    for cmd9 in (update, joined):
        with pytest.raises(ValidationError) as exc:
            encode_command(cmd9, {}, 9)
        assert exc.value.field == "generic_resources" and "schema 10" in exc.value.message
        with pytest.raises(ValidationError):
            encode_command(cmd9, {}, 1)  # (a cluster 0.1 made: the same)
        assert "ok" in st.apply(cmd9)
    assert st.nodes["n1"].labels == {"zone": "b"}  # (the rest applied, as schema 9 does)
    assert st.nodes["n1"].generic_resources == {} == st.nodes["n2"].generic_resources
    assert encode_command({**update, "generic_resources": {}}, {}, 9)  # (none used: as is)
    plain = {"op": "service_create", "id": "s2", "now": 1.0,
             "spec": {"name": "p", "task": {"container": {"command": ["sh"]}}}}
    assert "generic_resources" not in str(encode_command(plain, {}, 9))
    st.apply({"op": "cluster_schema", "schema": 10})
    assert encode_command(cmd, {}, 10) == cmd and "ok" in st.apply(cmd)
    assert encode_command(update, {}, 10) == update
    assert "ok" in st.apply(update) and st.nodes["n1"].generic_resources == {"gpu": 1}


# ------------------------------------------------------------------ scheduler and worker

def test_claim_takes_free_named_ids_and_gives_discrete_counts() -> None:
    res: dict[str, int | list[str]] = {"GPU": ["a", "b", "c"], "ssd": 4}
    held = [{"DOCKER_RESOURCE_GPU": "a"}, {"OTHER": "b"}]
    assert claim(res, {"gpu": 2, "SSD": 3}, held) == {"DOCKER_RESOURCE_GPU": "b,c",
                                                      "DOCKER_RESOURCE_SSD": "3"}
    with pytest.raises(StartError, match="gpu: the task needs 3, 2 of the node's 3"):
        claim(res, {"gpu": 3}, held)
    with pytest.raises(StartError, match="fpga: this node advertises none"):
        claim(res, {"fpga": 1}, [])


async def _gpu_lab(tmp_path: Path) -> Lab:
    lab = Lab(tmp_path)
    await lab.boot(2)
    await lab.node_update("n2", generic_resources={"GPU": ["a", "b"]})
    return lab


def _env(lab: Lab, nid: str, tid: str) -> dict[str, str]:
    return dict(lab.runtimes[nid].config(tid).env)


async def test_a_node_with_two_gpus_runs_two_one_gpu_tasks_and_the_third_waits(
        tmp_path: Path) -> None:
    """Each task gets its own ID in DOCKER_RESOURCE_GPU; the third is PENDING saying why;
    a task that ends frees its unit (and its ID) for the one waiting."""
    lab = await _gpu_lab(tmp_path)
    await lab.services.create_service(_spec({"gpu": 1}, replicas=3))
    await lab.settle()
    placed = [t for t in lab.tasks("gpu") if t.node_id]
    assert [t.node_id for t in placed] == ["n2", "n2"]
    assert sorted(_env(lab, "n2", t.id)["DOCKER_RESOURCE_GPU"] for t in placed) == ["a", "b"]
    (waiting,) = [t for t in lab.tasks("gpu") if not t.node_id]
    assert waiting.status.state is TaskState.PENDING
    assert waiting.status.message == ("no suitable node (insufficient generic resource gpu "
                                      "2/2)")
    lab.exit(placed[0], 1)  # ends: its GPU is free again, for the waiting task or its own
    await lab.settle()
    live = [t for t in lab.live("gpu") if t.status.state is TaskState.RUNNING]
    assert len(live) == 2
    assert sorted(_env(lab, "n2", t.id)["DOCKER_RESOURCE_GPU"] for t in live) == ["a", "b"]


async def test_discrete_counts_and_kinds_that_differ_only_in_case(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    await lab.boot(2)
    await lab.node_update("n1", generic_resources={"SSD": 3})
    await lab.services.create_service(_spec({"ssd": 2}, replicas=2))
    await lab.settle()
    (placed,) = [t for t in lab.tasks("gpu") if t.node_id]
    assert placed.node_id == "n1" and _env(lab, "n1", placed.id)["DOCKER_RESOURCE_SSD"] == "2"
    (waiting,) = [t for t in lab.tasks("gpu") if not t.node_id]
    assert "insufficient generic resource ssd 2/2" in waiting.status.message


async def test_a_global_task_waits_on_a_node_without_the_resource(tmp_path: Path) -> None:
    lab = await _gpu_lab(tmp_path)
    await lab.services.create_service(_spec({"gpu": 2}, type="global"))
    await lab.settle()
    assert lab.running_on("gpu") == ["n2"]
    (waiting,) = [t for t in lab.tasks("gpu") if t.node_id == "n1"]
    assert waiting.status.state is TaskState.PENDING
    assert "insufficient generic resource gpu" in waiting.status.message


async def test_the_ids_a_running_task_holds_survive_an_agent_restart(tmp_path: Path) -> None:
    """A new worker (the agent restarted; its tasks kept running) learns which IDs its
    running tasks hold from their environment: a new task gets the free one."""
    lab = Lab(tmp_path)
    await lab.boot(2)
    await lab.node_update("n2", generic_resources={"GPU": ["a", "b", "c"]})
    await lab.services.create_service(_spec({"gpu": 1}, replicas=2))
    await lab.settle()
    held = {_env(lab, "n2", t.id)["DOCKER_RESOURCE_GPU"] for t in lab.live("gpu")}
    assert len(held) == 2
    lab.workers["n2"] = Worker("n2", lab.store, lab.runtimes["n2"], asyncio.Event())
    await lab.services.scale_service("gpu", 3)
    await lab.settle()
    got = sorted(_env(lab, "n2", t.id)["DOCKER_RESOURCE_GPU"] for t in lab.live("gpu"))
    assert got == ["a", "b", "c"]


async def test_a_start_with_no_free_id_fails_the_task_saying_why(tmp_path: Path) -> None:
    """The scheduler counted a free unit, but the node's IDs changed under it (here: a
    task the leader does not count holds the only ID): the task is rejected, saying so."""
    lab = await _gpu_lab(tmp_path)
    await lab.node_update("n2", generic_resources={"GPU": ["a"]})
    await lab.services.create_service({"name": "other", "task": {"container": {
        "command": ["x"]}}})
    await lab.services.create_service(_spec({"gpu": 1}, replicas=1))
    await lab.leader.one_pass()
    (task,) = lab.tasks("gpu")
    assert task.node_id == "n2"
    (other,) = lab.tasks("other")  # (a task the cluster wants running says it holds "a")
    lab.workers["n2"].claims.starting[other.id] = {"DOCKER_RESOURCE_GPU": "a"}
    await lab.workers["n2"].reconcile()
    await lab.workers["n2"].wait_started()
    (task,) = lab.tasks("gpu")
    assert task.status.state is TaskState.REJECTED
    assert "generic resource gpu: the task needs 1, 0 of the node's 1 IDs are free" in \
        task.status.message


async def test_node_update_through_the_control_plane_and_node_inspect(tmp_path: Path) -> None:
    """`node update --generic-resource-add/-rm` (the API's body) changes the node's record;
    `node inspect` shows it and what live tasks reserve; a bad value is a 400 naming the
    field, and nothing changes."""
    lab = Lab(tmp_path)
    await lab.boot(1)
    nodes = Nodes(lab.ctx, GossipControl(lab.ctx, Security(lab.ctx), lambda: None),
                  VoterChanges(10.0))
    out = await nodes.update_node("n1", {"generic_resource_add": ["GPU=a", "GPU=b",
                                                                  "ssd=2"]})
    assert out["resources"]["generic_resources"] == {"GPU": ["a", "b"], "ssd": 2}
    with pytest.raises(BadRequest) as exc:
        await nodes.update_node("n1", {"generic_resource_add": ["GPU=3"]})
    assert exc.value.field == "generic_resource_add"
    await lab.services.create_service(_spec({"gpu": 1}))
    await lab.settle()
    out = await nodes.node("n1")
    assert out["resources"]["reserved_generic_resources"] == {"gpu": 1}
    out = await nodes.update_node("n1", {"generic_resource_rm": ["GPU=a", "ssd"]})
    assert out["resources"]["generic_resources"] == {"GPU": ["b"]}
    lab.store.state.cluster.schema = 9  # (a cluster whose nodes do not all read it yet)
    with pytest.raises(BadRequest) as exc:
        await nodes.update_node("n1", {"generic_resource_rm": ["GPU"]})
    assert exc.value.field == "generic_resource_rm" and "schema 10" in str(exc.value)


def test_schedule_is_pure_and_counts_what_placed_tasks_hold() -> None:
    """The pure scheduler alone: a node with gpu=2 (named) takes two 1-gpu tasks of one
    pass, and none of a third."""
    st = ClusterState()
    st.apply({"op": "cluster_init", "cluster_id": "c", "now": 1.0, "worker_secret": "w",
              "manager_secret": "m", "digest": "d", "schema": SCHEMA})
    node = Node(id="n1", hostname="h1", addr="10.0.0.1", api_port=1, raft_port=2,
                role=NodeRole.MANAGER, generic_resources={"gpu": ["x", "y"]})
    st.apply({"op": "node_add", "now": 1.0, "node": to_dict(node)})
    st.apply({"op": "service_create", "id": "s1", "now": 1.0, "spec": _spec({"GPU": 1})})
    from shoal.raft.models import Service, template_task
    svc: Service = st.services["s1"]
    pending = [template_task(svc, f"t{i}", i, 1.0) for i in range(1, 4)]
    plan = schedule(st.snapshot(), pending)
    assert plan.assignments == [("t1", "n1"), ("t2", "n1")]
    assert plan.unschedulable == [("t3", "no suitable node (insufficient generic resource "
                                         "gpu 1/1)")]


async def test_a_start_first_update_with_one_gpu_per_node_stops_the_old_task_first(
        tmp_path: Path) -> None:
    """A global service reserving each node's only GPU: a start-first update has no room
    for the new task beside the old one (the old holds the GPU until it ended), so each
    node's old task stops first; never two tasks holding one GPU, and the new task gets it
    (a replicated start-first update does not: its new task waits, PENDING, for a node with
    a free GPU while the old one keeps serving — as Swarm's updater waits)."""
    lab = Lab(tmp_path)
    await lab.boot(2)
    for nid in ("n1", "n2"):
        await lab.node_update(nid, generic_resources={"gpu": [f"{nid}-gpu0"]})
    spec = _spec({"gpu": 1}, type="global")
    spec["update"] = {"monitor": 0, "order": "start-first"}
    await lab.services.create_service(spec)
    await lab.settle()
    assert lab.running_on("gpu") == ["n1", "n2"]
    spec = lab.view("gpu")["spec"]
    spec["task"]["container"]["command"] = ["v2"]
    await lab.services.update_service("gpu", spec, None)
    for _ in range(12):
        await lab.settle(1)
        for nid, rt in lab.runtimes.items():
            up = [tid for tid, st in rt.tasks().items() if st.exit_code is None]
            assert len(up) <= 1, (nid, up)
        if lab.view("gpu")["update_status"]["state"] == "completed":
            break
    assert lab.view("gpu")["update_status"]["state"] == "completed"
    for nid in ("n1", "n2"):
        (t,) = [t for t in lab.live("gpu") if t.node_id == nid]
        cfg = lab.runtimes[nid].config(t.id)
        assert cfg.command == ("v2",) and cfg.env["DOCKER_RESOURCE_GPU"] == f"{nid}-gpu0"


async def test_a_global_task_asking_more_than_its_node_has_holds_nothing_there(
        tmp_path: Path) -> None:
    """A global task waiting on its node (PENDING there: the node has 1 GPU, it asks 2)
    reserves nothing, so another service's task still gets the GPU (before: counted as
    holding 2, it kept the node's GPU from every other service for good)."""
    lab = Lab(tmp_path)
    await lab.boot(1)
    await lab.node_update("n1", generic_resources={"GPU": ["a"]})
    await lab.services.create_service({**_spec({"gpu": 2}, type="global"), "name": "big"})
    await lab.settle()
    await lab.services.create_service({**_spec({"gpu": 1}), "name": "small"})
    await lab.settle()
    (big,) = lab.tasks("big")
    assert big.node_id == "n1" and big.status.state is TaskState.PENDING
    (small,) = lab.tasks("small")
    assert small.status.state is TaskState.RUNNING, small.status
    assert _env(lab, "n1", small.id)["DOCKER_RESOURCE_GPU"] == "a"


class _SlowStop(FakeController):
    """A runtime whose stop takes ``stop_takes`` seconds (a task's grace period)."""

    stop_takes = 0.05

    async def stop(self, task_id: str, grace: float) -> RuntimeStatus:
        await asyncio.sleep(self.stop_takes)
        return await super().stop(task_id, grace)


async def _orphaned_gpu_task(tmp_path: Path, stop_takes: float, interval: float
                             ) -> tuple[Lab, Worker, Any]:
    """One node with one GPU, a task holding it running there, then orphaned by the leader
    (its node was cut off) while its container runs on: (the lab, the node's worker — a
    reconcile ``interval`` — , the orphaned task)."""
    lab = Lab(tmp_path)
    await lab.boot(1)
    rt = lab.runtimes["n1"] = _SlowStop()
    rt.stop_takes = stop_takes
    w = lab.workers["n1"] = Worker("n1", lab.store, rt, asyncio.Event(), interval=interval)
    await lab.node_update("n1", generic_resources={"GPU": ["a"]})
    await lab.services.create_service(_spec({"gpu": 1}))
    await lab.settle()
    (old,) = lab.tasks("gpu")
    assert "ok" in await lab.ctx.propose({"op": "leader", "term": lab.store.term(),
                                          "now": 5.0, "ops": [["orphan", old.id, "down"]]})
    return lab, w, old


async def test_a_replacement_waits_for_the_ids_of_a_task_still_stopping_on_its_node(
        tmp_path: Path) -> None:
    """The leader orphaned a task (its node was cut off) and placed its replacement on the
    same node once it came back, while the old container still stops (its grace): the
    replacement waits for the GPU (PREPARING), then gets it — not REJECTED."""
    lab, _, old = await _orphaned_gpu_task(tmp_path, stop_takes=0.05, interval=0.05)
    await lab.settle(2)
    await asyncio.sleep(0.06)
    await lab.settle(1)
    assert not [t for t in lab.tasks("gpu") if t.status.state is TaskState.REJECTED]
    (new,) = lab.live("gpu")
    assert new.id != old.id and new.status.state is TaskState.RUNNING
    assert _env(lab, "n1", new.id)["DOCKER_RESOURCE_GPU"] == "a"


async def test_a_variable_a_user_sets_is_no_claim(tmp_path: Path) -> None:
    """A service that reserves nothing but sets DOCKER_RESOURCE_GPU itself holds no GPU:
    a task reserving the node's only one still starts (before: rejected, again and again)."""
    lab = Lab(tmp_path)
    await lab.boot(1)
    await lab.node_update("n1", generic_resources={"GPU": ["a"]})
    plain = {"name": "plain", "task": {"container": {"command": ["x"],
                                                     "env": {"DOCKER_RESOURCE_GPU": "a"}}}}
    await lab.services.create_service(plain)
    await lab.settle()
    await lab.services.create_service(_spec({"gpu": 1}))
    await lab.settle()
    (task,) = lab.tasks("gpu")
    assert task.status.state is TaskState.RUNNING, task.status


def test_digits_other_than_ascii_are_no_count() -> None:
    """``²`` passes str.isdigit but is no number: a named ID's rules refuse it, naming the
    field (before: an uncaught ValueError, a 500 from the API, a traceback in the CLI)."""
    with pytest.raises(ValidationError, match=r"generic_resource_add\.ssd: invalid ID '²'"):
        generic.updated({}, ["ssd=²"], [])
    with pytest.raises(CliError, match="expected KIND=N"):
        specflags.spec_from_create_args(build_parser().parse_args(
            ["service", "create", "--generic-resource", "gpu=²", "busybox"]))


def test_the_agent_flag_and_the_node_record_compared() -> None:
    assert generic.flag_drift(["GPU=a", "gpu=b", "SSD=2"], {"gpu": ["b", "a"], "ssd": 2}) == ""
    assert "the flag gives" in generic.flag_drift(["GPU=a"], {"GPU": ["a", "b"]})
    assert "the flag gives" in generic.flag_drift(["SSD=2"], {})


async def test_a_waiting_start_is_tried_once_per_interval_and_said_once(
        tmp_path: Path) -> None:
    """While a task on its way out (orphaned, its container stopping for 1 s) holds the
    node's only GPU, its replacement's start waits: tried again once per reconcile interval
    and reported once, not on every wake-up (each report is a Raft write: before, ~9,000
    tries and writes in 1.2 s)."""
    lab, w, _ = await _orphaned_gpu_task(tmp_path, stop_takes=1.0, interval=1.0)
    await lab.leader.one_pass()
    tries = 0
    real_start = w._start

    async def start(task: Any) -> Any:
        nonlocal tries
        tries += 1
        return await real_start(task)

    w._start = start  # type: ignore[method-assign]
    index = lab.store.index
    run = asyncio.create_task(w.run())
    await asyncio.sleep(1.2)
    w.close()
    await asyncio.gather(run, return_exceptions=True)
    assert tries <= 3 and lab.store.index - index <= 3, (tries, lab.store.index - index)


async def test_a_start_in_flight_of_a_task_on_its_way_out_makes_the_replacement_wait(
        tmp_path: Path) -> None:
    """The node was cut off while a GPU task's start was in flight (a long image pull): the
    leader orphaned it and placed its replacement on the same node; the replacement waits
    for the GPU the old start claimed (PREPARING), it is not rejected."""
    class Gated(FakeController):
        gate = asyncio.Event()
        first = True

        async def start(self, cfg: Any, before_start: Any = None) -> RuntimeStatus:
            if self.first:
                self.first = False
                await self.gate.wait()
            return await super().start(cfg, before_start)

    lab = Lab(tmp_path)
    await lab.boot(1)
    rt = lab.runtimes["n1"] = Gated()
    w = lab.workers["n1"] = Worker("n1", lab.store, rt, asyncio.Event())
    await lab.node_update("n1", generic_resources={"GPU": ["a"]})
    await lab.services.create_service(_spec({"gpu": 1}))
    await lab.leader.one_pass()
    (old,) = lab.tasks("gpu")
    await w.reconcile()
    await asyncio.sleep(0)
    assert w.claims.starting == {old.id: {"DOCKER_RESOURCE_GPU": "a"}}
    assert "ok" in await lab.ctx.propose({"op": "leader", "term": lab.store.term(),
                                          "now": 5.0, "ops": [["orphan", old.id, "down"]]})
    await lab.leader.one_pass()
    await w.reconcile()
    await asyncio.sleep(0.05)
    (new,) = [t for t in lab.tasks("gpu") if t.id != old.id]
    assert new.status.state is TaskState.PREPARING, new.status
    assert "a task still stopping here holds them" in new.status.message
    rt.gate.set()
    await w.wait_started()


async def test_a_sidecars_variables_claim_nothing(tmp_path: Path) -> None:
    """A pod's sidecar setting DOCKER_RESOURCE_GPU (or its image's ENV) holds no GPU: a task
    reserving the node's only one starts (before: it waited for ever, as if the sidecar
    were a task on its way out)."""
    lab = Lab(tmp_path)
    await lab.boot(1)
    await lab.node_update("n1", generic_resources={"GPU": ["a"]})
    await lab.services.create_service({"name": "pod", "task": {
        "container": {"command": ["x"]},
        "sidecars": [{"name": "side", "command": ["y"], "env": {"DOCKER_RESOURCE_GPU": "a"}}]}})
    await lab.settle()
    assert len(lab.runtimes["n1"].tasks()) == 2  # (the task and its sidecar)
    await lab.services.create_service(_spec({"gpu": 1}))
    await lab.settle()
    (task,) = lab.tasks("gpu")
    assert task.status.state is TaskState.RUNNING, task.status


class _Sim:
    """The state machine and the leader's passes in one process, with agents that start
    what is placed (not what waits on its node) and stop what is told to stop."""

    def __init__(self, nodes: dict[str, Any]) -> None:
        from shoal.node.orchestrator import OrchestratorConfig

        self.st, self.now = ClusterState(), 1.0
        self.ids = iter(f"t{i:03d}" for i in range(1, 1000))
        self.config = OrchestratorConfig(task_history=1)
        assert "ok" in self.st.apply({"op": "cluster_schema", "schema": SCHEMA})
        for i, (nid, res) in enumerate(nodes.items()):
            assert "ok" in self.st.apply({"op": "node_add", "now": 1.0, "node": to_dict(Node(
                id=nid, hostname=nid, addr=f"10.0.0.{i + 1}", api_port=1, raft_port=2,
                role=NodeRole.WORKER, generic_resources=res))})

    def apply(self, cmd: dict[str, Any]) -> None:
        res = self.st.apply({"now": self.now, **cmd})
        assert "ok" in res, res

    def leader_pass(self) -> list[Any]:
        from shoal.node.leader import plan_pass

        self.now += 1.0
        ops, _ = plan_pass(self.st.snapshot(), dict.fromkeys(self.st.nodes, self.now),
                           self.now, self.now, self.config, liveness=False,
                           new_id=lambda: next(self.ids))
        if ops:
            self.apply({"op": "leader", "term": 1, "ops": ops})
        return ops

    def agents(self) -> None:
        for t in list(self.st.tasks.values()):
            if t.status.state.terminal or (t.alive and t.status.state < TaskState.ASSIGNED):
                continue
            state = TaskState.RUNNING if t.alive else TaskState.SHUTDOWN
            if state is not t.status.state:
                self.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id,
                            "status": {"state": int(state), "timestamp": self.now}})

    def settle(self, rounds: int = 8) -> None:
        for _ in range(rounds):
            self.leader_pass()
            self.agents()

    def on(self, nid: str) -> list[tuple[str, str, str]]:
        """(command, state, desired) of the node's tasks not ended."""
        return sorted((t.spec.container.command[0], t.status.state.name,
                       t.desired_state.name) for t in self.st.tasks.values()
                      if t.node_id == nid and not t.status.state.terminal)


def test_a_waiting_global_task_told_to_stop_holds_up_no_replacement() -> None:
    """A stop-first update of a global task that waits on its node (PENDING: it never ran)
    makes its replacement at once; before, the replacement waited for the node to report
    the stop of a task it never started (up to 60 s for an unresponsive node)."""
    sim = _Sim({"n1": {"GPU": ["g0"]}})
    spec = _spec({"gpu": 2}, type="global")
    spec["update"] = {"order": "stop-first", "monitor": 0}
    sim.apply({"op": "service_create", "id": "s1", "spec": spec})
    sim.leader_pass()
    (waiting,) = sim.st.tasks.values()
    assert waiting.status.state is TaskState.PENDING and waiting.node_id == "n1"
    spec["task"]["container"]["command"] = ["v2"]
    sim.apply({"op": "service_update", "id": "s1", "spec": spec})
    assert sim.leader_pass() == [("desired", waiting.id, int(TaskState.SHUTDOWN))]
    assert [op[0] for op in sim.leader_pass()] == ["create"]  # (no report of it awaited)


def test_a_global_start_first_update_that_cannot_fit_a_node_keeps_its_old_task_serving(
        ) -> None:
    """Start-first, a new template the node could not run even alone (it has no GPU): the
    old task keeps serving and the new one waits beside it, PENDING with the reason, as
    Swarm's start-first does (before: the old one was stopped for a replacement that could
    never start). Once the node gets a GPU the new task is placed, and the old one stops
    when it runs."""
    sim = _Sim({"n1": {"GPU": ["g0"]}, "n2": {}})
    spec: dict[str, Any] = {"name": "g", "mode": {"type": "global"},
                            "update": {"order": "start-first", "monitor": 0},
                            "task": {"container": {"command": ["v1"]}}}
    sim.apply({"op": "service_create", "id": "s1", "spec": spec})
    sim.settle()
    spec["task"]["container"]["command"] = ["v2"]
    spec["task"]["resources"] = {"reservations": {"generic_resources": {"gpu": 1}}}
    sim.apply({"op": "service_update", "id": "s1", "spec": spec})
    sim.settle()
    assert sim.on("n1") == [("v2", "RUNNING", "RUNNING")]
    assert sim.on("n2") == [("v1", "RUNNING", "RUNNING"), ("v2", "PENDING", "RUNNING")]
    (waiting,) = [t for t in sim.st.tasks.values() if t.status.state is TaskState.PENDING]
    assert waiting.status.message == "insufficient generic resource gpu"
    assert sim.st.services["s1"].update_status.state == "updating"
    sim.apply({"op": "node_update", "id": "n2", "generic_resources": {"GPU": ["g0"]}})
    sim.settle()
    assert sim.on("n2") == [("v2", "RUNNING", "RUNNING")]
    assert sim.st.services["s1"].update_status.state == "completed"
