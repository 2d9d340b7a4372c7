"""Service modes and placement through the control plane in one process: `service create`
(node/control/services.py) → the leader's pass (node/leader.py: orchestrator and scheduler)
→ each node's worker (node/worker.py) on its own fake runtime → the reports → the views, on
the in-memory store. No root, no network, no Raft. Each test names the property it checks.
"""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path
from typing import Any

import pytest

from shoal.node.config import AgentConfig, NodeIdentity
from shoal.node.context import NodeContext
from shoal.node.control.services import Services
from shoal.node.errors import BadRequest
from shoal.node.leader import LeaderLoop
from shoal.node.orchestrator import OrchestratorConfig
from shoal.node.security import Security
from shoal.node.source import MemoryStore
from shoal.node.transfer import Transfer
from shoal.node.worker import Action, next_step
from shoal.raft.models import Node, NodeRole, Task, TaskState, TaskStatus, to_dict
from shoal.raft.schema import SCHEMA
from shoal.raft.spec import TaskSpec
from shoal.runtime.images import ImageStore
from shoal.runtime.testing import FakeController

GiB = 1 << 30


class Lab:
    """A manager (n1) and more nodes, each with its worker and fake runtime, sharing one
    in-memory store, wired as the agent wires them."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = MemoryStore(self_addr="10.0.0.1:2378")
        self.ctx = NodeContext(AgentConfig(data_dir=tmp_path, advertise_addr="10.0.0.1"), "h1")
        self.ctx.use(NodeIdentity(node_id="n1", cluster_id="c1", role="manager",
                                  raft_password="", voters=["10.0.0.1:2378"]),
                     self.store, self.store)
        self.runtimes: dict[str, FakeController] = {}
        self.workers: dict[str, Any] = {}
        transfer = Transfer(self.ctx, Security(self.ctx), FakeController(),
                            ImageStore(tmp_path / "img"))
        self.services = Services(self.ctx, transfer)
        self.leader = LeaderLoop(self.store, {}, OrchestratorConfig(), asyncio.Event())

    async def boot(self, n: int, **node: Any) -> None:
        await self.ctx.propose({"op": "cluster_init", "cluster_id": "c1", "now": 1.0,
                                "worker_secret": "", "manager_secret": "", "digest": "",
                                "schema": SCHEMA})
        for i in range(1, n + 1):
            await self.add_node(f"n{i}", **node)

    async def add_node(self, nid: str, labels: dict[str, str] | None = None,
                       memory: int = 8 * GiB) -> None:
        from shoal.node.worker import Worker
        i = len(self.runtimes) + 1
        await self.ctx.propose({"op": "node_add", "now": 1.0, "node": to_dict(Node(
            id=nid, hostname=f"h{i}", addr=f"10.0.0.{i}", api_port=2377, raft_port=2378,
            role=NodeRole.MANAGER if i == 1 else NodeRole.WORKER, labels=labels or {},
            memory_bytes=memory, cpus=4.0))})
        self.runtimes[nid] = FakeController()
        self.workers[nid] = Worker(nid, self.store, self.runtimes[nid], asyncio.Event())

    async def node_update(self, nid: str, **change: Any) -> None:
        await self.ctx.propose({"op": "node_update", "id": nid, "now": 2.0, **change})

    async def settle(self, rounds: int = 3) -> None:
        """Leader pass, then every worker's pass, ``rounds`` times."""
        for _ in range(rounds):
            await self.leader.one_pass()
            for w in self.workers.values():
                await w.reconcile()
                await w.wait_started()
                # (stops run in the background: let them end, as the next pass would see)
                await asyncio.gather(*w._stopping.values(), return_exceptions=True)

    def tasks(self, service: str) -> list[Task]:
        snap = self.store.snapshot()
        svc = snap.service_by_name(service)
        assert svc is not None
        return sorted(snap.tasks_of(svc.id), key=lambda t: (t.slot, t.node_id, t.created_at))

    def running_on(self, service: str) -> list[str]:
        """Nodes where a task of ``service`` runs (in the fake runtimes), sorted."""
        ids = {t.id for t in self.tasks(service)}
        return sorted(nid for nid, rt in self.runtimes.items() for tid, st in rt.tasks().items()
                      if tid in ids and st.pid and st.exit_code is None)

    def live(self, service: str) -> list[Task]:
        return [t for t in self.tasks(service) if t.alive]

    def view(self, service: str) -> dict[str, Any]:
        return self.services.service(service)

    def exit(self, task: Task, code: int) -> None:
        self.runtimes[task.node_id].exit(task.id, code)


def job(name: str, mode: str, replicas: int = 1, max_concurrent: int = 0,
        restart: str = "on-failure", **task: Any) -> dict[str, Any]:
    return {"name": name,
            "mode": {"type": mode, "replicas": replicas, "max_concurrent": max_concurrent},
            "task": {"container": {"command": ["run", "job"]},
                     "restart": {"condition": restart, "delay": 0.0}, **task}}


async def test_a_global_service_runs_one_task_on_every_node_and_follows_joins_and_drains(
        tmp_path: Path) -> None:
    """One task per eligible node: a node that joins gets one, a drained node's task stops
    and is not replaced elsewhere, a node that loses a constrained label loses its task, and
    `service ls` shows `global` with running/wanted."""
    lab = Lab(tmp_path)
    await lab.boot(2, labels={"agent": "yes"})
    await lab.services.create_service(
        {"name": "agent", "mode": {"type": "global"},
         "task": {"container": {"command": ["agent"]},
                  "placement": {"constraints": ["node.labels.agent==yes"]}}})
    await lab.settle()
    assert lab.running_on("agent") == ["n1", "n2"]
    assert {t.name for t in lab.tasks("agent")} == {"agent.n1", "agent.n2"}
    assert (lab.view("agent")["mode"], lab.view("agent")["running"],
            lab.view("agent")["replicas"]) == ("global", 2, 2)

    await lab.add_node("n3", labels={"agent": "yes"})
    await lab.add_node("n4")  # without the label: no task
    await lab.settle()
    assert lab.running_on("agent") == ["n1", "n2", "n3"]

    await lab.node_update("n2", availability="drain")
    await lab.settle()
    assert lab.running_on("agent") == ["n1", "n3"]
    assert [t.status.state for t in lab.tasks("agent") if t.node_id == "n2"] == \
        [TaskState.SHUTDOWN]
    await lab.node_update("n3", labels={})
    await lab.settle()
    assert lab.running_on("agent") == ["n1"]
    assert lab.view("agent")["replicas"] == 1

    await lab.node_update("n2", availability="active")
    await lab.settle()
    assert lab.running_on("agent") == ["n1", "n2"]
    assert len(lab.live("agent")) == 2
    # a pass over the settled service changes nothing
    index = lab.store.index
    await lab.settle(1)
    assert lab.store.index == index


async def test_a_global_task_waits_on_its_node_for_reserved_memory(tmp_path: Path) -> None:
    """A node without room for a global task's reservation gets a PENDING task that says
    why and is not started; once the memory is free it runs there (and nowhere else)."""
    lab = Lab(tmp_path)
    await lab.boot(2, memory=2 * GiB)
    await lab.services.create_service(
        {"name": "big", "mode": {"type": "replicated", "replicas": 1},
         "task": {"container": {"command": ["big"]},
                  "resources": {"reservations": {"memory": 3 * GiB // 2}},
                  "placement": {"constraints": ["node.id==n2"]}}})
    await lab.settle()
    await lab.services.create_service(
        {"name": "mon", "mode": {"type": "global"},
         "task": {"container": {"command": ["mon"]},
                  "resources": {"reservations": {"memory": GiB}}}})
    await lab.settle()
    assert lab.running_on("mon") == ["n1"]
    (waiting,) = [t for t in lab.tasks("mon") if t.node_id == "n2"]
    assert waiting.status.state is TaskState.PENDING
    assert "insufficient memory" in waiting.status.message
    assert lab.view("mon")["running"] == 1 and lab.view("mon")["replicas"] == 2

    await lab.services.remove_service("big")
    await lab.settle()
    assert lab.running_on("mon") == ["n1", "n2"]
    assert len(lab.live("mon")) == 2


async def test_a_replicated_job_runs_its_completions_at_most_max_concurrent_at_a_time(
        tmp_path: Path) -> None:
    """6 completions, 2 at a time: never more than 2 run; a task that exits 0 is COMPLETE
    and never restarted; a failed one is retried; the job ends with exactly 6 completions
    and `service ls` shows the progress."""
    lab = Lab(tmp_path)
    await lab.boot(3)
    await lab.services.create_service(job("batch", "replicated-job", 6, 2))
    failed_once = False
    for _ in range(20):
        await lab.settle(1)
        live = lab.live("batch")
        assert len(live) <= 2
        running = [t for t in live if t.status.state is TaskState.RUNNING]
        if not running:
            break
        view = lab.view("batch")
        assert view["running"] == len(running) and view["replicas"] == 6
        for t in running:
            lab.exit(t, 1 if not failed_once else 0)
            failed_once = True
        for w in lab.workers.values():
            await w.reconcile()
    states = [t.status.state for t in lab.tasks("batch")]
    assert states.count(TaskState.COMPLETE) == 6 and states.count(TaskState.FAILED) == 1
    view = lab.view("batch")
    assert (view["mode"], view["completed"], view["failed"], view["running"]) == \
        ("replicated-job", 6, 1, 0)
    assert sorted(t.slot for t in lab.tasks("batch")
                  if t.status.state is TaskState.COMPLETE) == [1, 2, 3, 4, 5, 6]
    index = lab.store.index
    await lab.settle(2)
    assert lab.store.index == index  # complete: nothing restarts


async def test_a_completed_job_task_is_wanted_complete_and_never_run_again(
        tmp_path: Path) -> None:
    """A job task that exited 0 gets desired state COMPLETE (Swarm's `service ps` shows
    "Complete"), counts as a completion and is not run again; one completed in a state an
    older leader wrote (reported COMPLETE, still wanted RUNNING) gets it from the next pass;
    the running one keeps RUNNING; the list filter finds them by it."""
    from shoal.cli.output import FILTERS

    lab = Lab(tmp_path)
    await lab.boot(1)
    await lab.services.create_service(job("once", "replicated-job", 2, restart="any"))
    await lab.settle(1)
    a, b = lab.live("once")
    lab.exit(a, 0)
    await lab.workers["n1"].reconcile()  # reported, the leader not yet run: as 0.2 left it
    (a_now,) = [t for t in lab.tasks("once") if t.id == a.id]
    assert (a_now.status.state, a_now.desired_state) == (TaskState.COMPLETE, TaskState.RUNNING)
    await lab.settle(2)
    ps = {t["id"]: t for t in await lab.services.tasks("once")}
    assert (ps[a.id]["state"], ps[a.id]["desired_state"]) == ("complete", "complete")
    assert (ps[b.id]["state"], ps[b.id]["desired_state"]) == ("running", "running")
    keep = FILTERS["task"]["desired-state"]
    assert [i for i, t in ps.items() if keep(t, "complete")] == [a.id]
    assert len(lab.tasks("once")) == 2 and lab.view("once")["completed"] == 1
    lab.exit(b, 0)
    await lab.settle(2)
    assert [t.desired_state for t in lab.tasks("once")] == [TaskState.COMPLETE] * 2
    index = lab.store.index
    await lab.settle(2)
    assert lab.store.index == index and lab.view("once")["completed"] == 2  # settled


async def test_a_failed_job_task_is_retried_per_the_restart_policy(tmp_path: Path) -> None:
    """With max-attempts 1 a slot whose task fails twice is given up (the job stops short,
    showing the failures); with condition none a failure is never retried."""
    lab = Lab(tmp_path)
    await lab.boot(1)
    await lab.services.create_service(job("flaky", "replicated-job", 1,
                                          restart="on-failure"))
    spec = {"name": "once", "mode": {"type": "replicated-job", "replicas": 1},
            "task": {"container": {"command": ["x"]},
                     "restart": {"condition": "none"}}}
    await lab.services.create_service(spec)
    await lab.services.update_service("flaky", {**job("flaky", "replicated-job", 1),
                                                "task": {"container": {"command": ["x"]},
                                                         "restart": {"max_attempts": 1,
                                                                     "delay": 0.0}}}, None)
    for _ in range(4):
        await lab.settle(1)
        for name in ("flaky", "once"):
            for t in lab.live(name):
                if t.status.state is TaskState.RUNNING:
                    lab.exit(t, 2)
        for w in lab.workers.values():
            await w.reconcile()
    await lab.settle(2)
    assert [t.status.state for t in lab.tasks("once")] == [TaskState.FAILED]
    assert [t.status.state for t in lab.tasks("flaky")] == [TaskState.FAILED] * 2
    assert lab.view("flaky")["failed"] == 2 and lab.view("flaky")["completed"] == 0


async def test_updating_a_job_runs_it_again(tmp_path: Path) -> None:
    """A finished job re-runs on `service update --force` (Swarm's job iteration): new tasks
    run while the earlier completions no longer count; the update status completes."""
    lab = Lab(tmp_path)
    await lab.boot(2)
    await lab.services.create_service(job("mig", "replicated-job", 2))
    await lab.settle(1)
    for t in lab.live("mig"):
        lab.exit(t, 0)
    await lab.settle(2)
    assert lab.view("mig")["completed"] == 2
    spec = lab.view("mig")["spec"]
    spec["task"]["force_update"] += 1
    await lab.services.update_service("mig", spec, None)
    await lab.settle(1)
    assert lab.view("mig")["completed"] == 0
    assert len([t for t in lab.live("mig") if t.status.state is TaskState.RUNNING]) == 2
    assert lab.view("mig")["update_status"]["state"] == "completed"
    for t in lab.live("mig"):
        lab.exit(t, 0)
    await lab.settle(2)
    assert lab.view("mig")["completed"] == 2
    assert [t.status.state for t in lab.tasks("mig")].count(TaskState.COMPLETE) == 4


async def test_a_global_job_completes_once_per_node_including_nodes_that_join_later(
        tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    await lab.boot(2)
    await lab.services.create_service(job("prep", "global-job"))
    await lab.settle(1)
    assert lab.running_on("prep") == ["n1", "n2"]
    for t in lab.live("prep"):
        lab.exit(t, 0)
    await lab.settle(2)
    assert lab.running_on("prep") == []
    assert (lab.view("prep")["completed"], lab.view("prep")["replicas"]) == (2, 2)
    await lab.add_node("n3")
    await lab.settle(1)
    assert lab.running_on("prep") == ["n3"]
    (t3,) = lab.live("prep")
    lab.exit(t3, 0)
    await lab.settle(2)
    assert [t.status.state for t in lab.tasks("prep")] == [TaskState.COMPLETE] * 3
    assert (lab.view("prep")["completed"], lab.view("prep")["replicas"]) == (3, 3)


async def test_max_replicas_per_node_leaves_the_rest_pending_with_the_reason(
        tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    await lab.boot(2)
    await lab.services.create_service(
        {"name": "web", "mode": {"replicas": 5},
         "task": {"container": {"command": ["web"]}, "placement": {"max_replicas": 2}}})
    await lab.settle(1)
    placed = [t.node_id for t in lab.tasks("web") if t.node_id]
    assert sorted(placed) == ["n1", "n1", "n2", "n2"]
    (pending,) = [t for t in lab.tasks("web") if not t.node_id]
    assert pending.status.state is TaskState.PENDING
    assert pending.status.message == "no suitable node (max replicas per node (2) 2/2)"
    await lab.add_node("n3")
    await lab.settle(1)
    assert sorted(t.node_id for t in lab.tasks("web")) == ["n1", "n1", "n2", "n2", "n3"]


async def test_spread_preference_balances_label_values_before_nodes(tmp_path: Path) -> None:
    """Zone a has one node, zone b three, one node has no zone: 6 tasks spread by zone go
    2 to a, 2 over b's nodes and 2 to the unlabelled group, as Swarm spreads."""
    lab = Lab(tmp_path)
    await lab.boot(0)
    await lab.add_node("a1", labels={"zone": "a"})
    for i in range(3):
        await lab.add_node(f"b{i}", labels={"zone": "b"})
    await lab.add_node("x1")
    await lab.services.create_service(
        {"name": "web", "mode": {"replicas": 6},
         "task": {"container": {"command": ["web"]},
                  "placement": {"preferences": [{"spread": "node.labels.zone"}]}}})
    await lab.settle(1)
    where = sorted(t.node_id for t in lab.tasks("web"))
    assert where.count("a1") == 2 and where.count("x1") == 2
    assert sorted(n for n in where if n.startswith("b")) in (["b0", "b1"], ["b0", "b2"],
                                                              ["b1", "b2"])


async def test_scale_and_mode_changes_are_refused_where_swarm_refuses_them(
        tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    await lab.boot(1)
    await lab.services.create_service({"name": "g", "mode": {"type": "global"},
                                       "task": {"container": {"command": ["x"]}}})
    with pytest.raises(BadRequest, match="scale works only with the replicated"):
        await lab.services.scale_service("g", 3)
    spec = lab.view("g")["spec"]
    spec["mode"]["type"] = "replicated"
    with pytest.raises(BadRequest, match="cannot change") as err:
        await lab.services.update_service("g", spec, None)
    assert err.value.field == "mode.type"
    for bad, field in (({"type": "global", "replicas": 3}, "mode.replicas"),
                       ({"type": "replicated", "max_concurrent": 2}, "mode.max_concurrent"),
                       ({"type": "cron"}, "mode.type")):
        with pytest.raises(BadRequest) as err:
            await lab.services.create_service({"name": "x", "mode": bad,
                                               "task": {"container": {"command": ["x"]}}})
        assert err.value.field == field


def test_the_worker_does_not_start_a_task_waiting_on_its_node() -> None:
    """A global task PENDING on this node (its reservations do not fit yet) is not started;
    once ASSIGNED it is."""
    t = Task(id="t1", service_id="s", service_name="g", slot=0, spec=TaskSpec(),
             service_version=1, node_id="n1", status=TaskStatus(state=TaskState.PENDING))
    assert next_step(t, None).action is Action.NONE
    assigned = Task(**{**t.__dict__, "status": TaskStatus(state=TaskState.ASSIGNED)})
    assert next_step(assigned, None).action is Action.START


def test_the_mode_and_placement_flags_come_from_the_spec_declarations() -> None:
    """`--mode`, `--replicas`, `--max-concurrent`, `--max-replicas-per-node` and
    `--placement-pref` make the nested spec; `--placement-pref-add/-rm` edit it on update;
    a malformed preference names its flag."""
    from shoal.cli import specflags
    from shoal.cli.errors import CliError
    from shoal.cli.main import build_parser
    from shoal.raft.validate import validate_spec

    def parse(line: str) -> Any:
        return build_parser().parse_args(shlex.split(line))

    args = parse(
        "service create --name j --mode replicated-job --replicas 6 --max-concurrent 2 "
        "--max-replicas-per-node 2 --placement-pref spread=node.labels.zone -- true")
    spec = validate_spec(specflags.spec_from_create_args(args))
    assert (spec.mode.type, spec.mode.replicas, spec.mode.concurrency) == \
        ("replicated-job", 6, 2)
    assert spec.task.placement.max_replicas == 2
    assert [p.label for p in spec.task.placement.preferences] == ["zone"]
    update = parse(
        "service update --placement-pref-rm spread=node.labels.zone "
        "--placement-pref-add spread=node.labels.rack j")
    changed = specflags.apply_update_args(to_dict(spec), update)
    assert changed["task"]["placement"]["preferences"] == [{"spread": "node.labels.rack"}]
    with pytest.raises(CliError, match=r"--placement-pref expects spread=node\.labels\.KEY"):
        specflags.spec_from_create_args(parse(
            "service create --name j --placement-pref zone -- true"))
    assert specflags.flag_of_field("mode.max_concurrent") == "--max-concurrent"


async def test_lowering_max_replicas_moves_the_extra_tasks(tmp_path: Path) -> None:
    """4 tasks on 2 nodes, then `--max-replicas-per-node 1` on 3 nodes: one task per node
    stays, the extras move to the free node or wait pending, saying why."""
    lab = Lab(tmp_path)
    await lab.boot(2)
    await lab.services.create_service({"name": "web", "mode": {"replicas": 4},
                                       "task": {"container": {"command": ["web"]}}})
    await lab.settle()
    await lab.add_node("n3")
    spec = lab.view("web")["spec"]
    spec["task"]["placement"]["max_replicas"] = 1
    await lab.services.update_service("web", spec, None)
    await lab.settle()
    live = lab.live("web")
    assert sorted(t.node_id for t in live if t.node_id) == ["n1", "n2", "n3"]
    assert [t.status.message for t in live if not t.node_id] == \
        ["no suitable node (max replicas per node (1) 3/3)"]
    assert lab.running_on("web") == ["n1", "n2", "n3"]


async def test_a_global_service_rolls_out_an_update_node_by_node(tmp_path: Path) -> None:
    """A changed template replaces the global tasks `--update-parallelism` at a time, each
    on its own node, and the update completes."""
    lab = Lab(tmp_path)
    await lab.boot(3)
    await lab.services.create_service({"name": "g", "mode": {"type": "global"},
                                       "update": {"monitor": 0},  # (no wall-clock wait)
                                       "task": {"container": {"command": ["v1"]}}})
    await lab.settle()
    spec = lab.view("g")["spec"]
    spec["task"]["container"]["command"] = ["v2"]
    await lab.services.update_service("g", spec, None)
    seen_down = []
    for _ in range(12):
        await lab.settle(1)
        seen_down.append(3 - len(lab.running_on("g")))
        if lab.view("g")["update_status"]["state"] == "completed":
            break
    assert lab.view("g")["update_status"]["state"] == "completed"
    assert max(seen_down) == 1  # one node at a time (parallelism 1, stop-first)
    for nid in ("n1", "n2", "n3"):
        (t,) = [t for t in lab.live("g") if t.node_id == nid]
        assert t.spec.container.command == ("v2",)
        assert lab.runtimes[nid].config(t.id).command == ("v2",)


async def test_a_global_start_first_update_runs_old_and_new_side_by_side_on_each_node(
        tmp_path: Path) -> None:
    """Through the workers: with `--update-order start-first` each node's runtime starts the
    new task while the old one still runs (never a node without a running task, never more
    than two on one), then stops the old one; the update completes."""
    lab = Lab(tmp_path)
    await lab.boot(3)
    await lab.services.create_service({"name": "g", "mode": {"type": "global"},
                                       "update": {"monitor": 0, "order": "start-first"},
                                       "task": {"container": {"command": ["v1"]}}})
    await lab.settle()
    spec = lab.view("g")["spec"]
    spec["task"]["container"]["command"] = ["v2"]
    await lab.services.update_service("g", spec, None)
    ids = {t.id for t in lab.tasks("g")}
    most = 0
    for _ in range(12):
        await lab.settle(1)
        per_node = [sum(1 for tid, st in rt.tasks().items() if tid in {
            t.id for t in lab.tasks("g")} and st.exit_code is None)
            for rt in lab.runtimes.values()]
        assert min(per_node) >= 1, per_node
        most = max(most, *per_node)
        if lab.view("g")["update_status"]["state"] == "completed":
            break
    assert lab.view("g")["update_status"]["state"] == "completed" and most == 2
    for nid in ("n1", "n2", "n3"):
        (t,) = [t for t in lab.live("g") if t.node_id == nid]
        assert t.id not in ids and lab.runtimes[nid].config(t.id).command == ("v2",)


async def _zoned_global(tmp_path: Path, update: dict[str, Any]) -> Lab:
    """n1, n2 in zone a, n3 in zone b, and a global service `g` running `v1` on each."""
    lab = Lab(tmp_path)
    await lab.boot(2, labels={"zone": "a"})
    await lab.add_node("n3", labels={"zone": "b"})
    await lab.services.create_service({"name": "g", "mode": {"type": "global"},
                                       "update": update,
                                       "task": {"container": {"command": ["v1"]}}})
    await lab.settle()
    return lab


async def _update_to_zone_a(lab: Lab) -> None:
    """`g` updated to `v2`, constrained to zone a."""
    spec = lab.view("g")["spec"]
    spec["task"]["container"]["command"] = ["v2"]
    spec["task"]["placement"]["constraints"] = ["node.labels.zone==a"]
    await lab.services.update_service("g", spec, None)


async def test_a_global_start_first_update_adding_a_constraint_stops_the_tasks_it_excludes(
        tmp_path: Path) -> None:
    """A start-first update whose new constraint excludes a node stops that node's task and
    makes no new one there (before: the replacement was made beside the old task, on the
    node the constraint refuses — found by tests/test_orchestrator_fuzz.py); the other
    nodes roll start-first and the update completes."""
    lab = await _zoned_global(tmp_path, {"monitor": 0, "order": "start-first"})
    assert lab.running_on("g") == ["n1", "n2", "n3"]
    await _update_to_zone_a(lab)
    for _ in range(12):
        await lab.settle(1)
        assert all(t.node_id != "n3" or t.spec.container.command == ("v1",)
                   for t in lab.tasks("g")), "a new task made on the excluded node"
        if lab.view("g")["update_status"]["state"] == "completed":
            break
    assert lab.view("g")["update_status"]["state"] == "completed"
    assert lab.running_on("g") == ["n1", "n2"]
    assert sorted((t.node_id, t.spec.container.command) for t in lab.live("g")) == [
        ("n1", ("v2",)), ("n2", ("v2",))]


async def test_a_paused_node_keeps_its_global_task_through_an_update_unless_excluded(
        tmp_path: Path) -> None:
    """Swarm's global orchestrator: a paused node's task is neither updated nor replaced —
    but one the new constraints exclude is stopped (constraints are checked before pause;
    before, it kept running until the node was active again)."""
    lab = await _zoned_global(tmp_path, {"monitor": 0})
    for nid in ("n2", "n3"):
        await lab.node_update(nid, availability="pause")
    await _update_to_zone_a(lab)
    for _ in range(8):
        await lab.settle(1)
    assert sorted((t.node_id, t.spec.container.command) for t in lab.live("g")) == [
        ("n1", ("v2",)), ("n2", ("v1",))]  # (n2 paused and allowed: left as it is)
    assert lab.running_on("g") == ["n1", "n2"]


def test_a_schema_1_cluster_refuses_the_new_mode_and_placement_fields() -> None:
    """While a node may still run shoal 0.1 (cluster schema 1), a global service or a
    spread preference is refused, naming the field; a plain replicated one still goes."""
    from shoal.raft.errors import ValidationError
    from shoal.raft.schema import encode_command

    base = {"name": "a", "task": {"container": {"command": ["x"]}}}
    assert encode_command({"op": "service_create", "spec": base}, {})["spec"]["replicas"] == 1
    for spec, field in (({**base, "mode": {"type": "global"}}, "mode.type"),
                        ({**base, "task": {"container": {"command": ["x"]}, "placement": {
                            "preferences": [{"spread": "node.labels.z"}]}}},
                         "task.placement.preferences")):
        with pytest.raises(ValidationError) as err:
            encode_command({"op": "service_create", "spec": spec}, {})
        assert err.value.field == field
